"""Agent sessions through nginx in front of several hearth instances.

bench/team.sh starts the instances and nginx, then runs this. Each session
sends its whole conversation again every turn, as agents do, with its own
session header; nginx hashes that header to pick the instance. After
TURNS turns the instance holding most sessions is killed (SIGKILL) and
every session runs AFTER more turns. Checks:

  - a 3 MB request passes nginx (HTTP 200);
  - each session header (X-Claude-Code-Session-Id, session_id, X-Session-Id)
    reaches the hash: 16 random ids in it do not all land on one instance
    (they do when nginx drops the header, e.g. `session_id` without
    `underscores_in_headers on`, and hashes the client's address);
  - before the kill, each session's turns all went to one instance, with
    no retry;
  - the killed instance stops accepting connections;
  - every turn got HTTP 200 and a reply with usage, none after the kill
    from the killed instance;
  - a hit: every later turn of a session found the whole previous prompt
    cached (cached >= the previous turn's prompt tokens), except the first
    turn of a moved session on its new instance;
  - that first turn is a miss: cached < the previous turn's prompt tokens
    (the new instance holds at most the system prompt other sessions share);
  - after the kill, a session on the killed instance moved to one live
    instance and stayed there; every other session stayed where it was.

Standard library only. Exits 1 when a check fails.

  python3 bench/team.py --proxy http://127.0.0.1:PORT \\
      --instance a=127.0.0.1:P1=PID1 --instance b=127.0.0.1:P2=PID2
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import sys
import time
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

SYSTEM = (
    "You are a careful coding agent working in a Rust repository. Read the task, "
    "plan in short steps, and answer with one short sentence per step. Rules: keep "
    "changes small; run the tests after each change; never edit generated files; "
    "prefer the standard library; explain every command before you run it; when a "
    "test fails, read its output before changing code; keep the style of the code "
    "around you; write commit messages in the imperative mood; do not add "
    "dependencies without a reason; report what you changed and what you checked. "
) * 3

TASKS = [
    "Rename the function parse_args to parse_flags everywhere.",
    "Add a --verbose flag that prints each request's path.",
    "Fix the off-by-one error in the pagination of the list command.",
    "Write a test for the config loader's handling of empty files.",
    "Make the retry delay grow exponentially, capped at 30 seconds.",
]
STEPS = [
    "What is your first step?",
    "Good. What next?",
    "The tests pass. Anything else?",
    "Summarise the change in one line.",
    "A reviewer asks why. Answer briefly.",
    "Last: what would you test next?",
]


@dataclass
class Session:
    name: str
    api: str  # "openai" or "anthropic"
    stream: bool
    header: str  # the session header it sends
    sid: str = ""
    messages: list = field(default_factory=list)


@dataclass
class Turn:
    session: str
    api: str
    turn: int
    tried: list  # instance names nginx tried, the last one answered
    status: int
    prompt: int = 0
    cached: int = 0
    seconds: float = 0.0
    error: str = ""

    @property
    def instance(self) -> str:
        return self.tried[-1] if self.tried else "?"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--proxy", required=True, help="nginx's URL")
    p.add_argument("--instance", action="append", required=True, metavar="NAME=HOST:PORT=PID")
    p.add_argument("--turns", type=int, default=4, help="turns before the kill (default 4)")
    p.add_argument("--after", type=int, default=2, help="turns after the kill (default 2)")
    p.add_argument("--max-tokens", type=int, default=16)
    args = p.parse_args()
    if args.turns < 2 or args.after < 2:
        p.error("--turns and --after must be at least 2")
    return args


class Team:
    def __init__(self, proxy: str, instances: list[str]):
        u = urllib.parse.urlsplit(proxy)
        self.host, self.port = u.hostname, u.port
        self.names: dict[str, str] = {}  # upstream address -> instance name
        self.pids: dict[str, int] = {}
        self.addrs: dict[str, str] = {}
        for spec in instances:
            name, addr, pid = spec.split("=")
            self.names[addr] = name
            self.pids[name] = int(pid)
            self.addrs[name] = addr

    def request(self, method: str, path: str, headers: dict, body: bytes | None = None):
        """Returns (status, instances tried, the response, still unread)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=300)
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        upstream = resp.getheader("X-Upstream", "")
        tried = [self.names.get(a.strip(), a.strip()) for a in upstream.split(",") if a.strip()]
        return resp.status, tried, resp

    def instance_of(self, s: Session) -> str:
        status, tried, resp = self.request("GET", "/v1/models", {s.header: s.sid})
        resp.read()
        return tried[-1] if status == 200 and tried else "?"


def sse_events(resp):
    """The JSON data of each server-sent event, as it arrives."""
    for raw in resp:
        line = raw.decode("utf-8", "replace").strip()
        if line.startswith("data:") and line[5:].strip() != "[DONE]":
            try:
                yield json.loads(line[5:])
            except ValueError:
                pass


def run_turn(team: Team, s: Session, turn: int, max_tokens: int) -> Turn:
    s.messages.append({"role": "user", "content": STEPS[(turn - 1) % len(STEPS)]})
    headers = {"Content-Type": "application/json", s.header: s.sid}
    if s.api == "openai":
        path = "/v1/chat/completions"
        body = {"model": "any", "messages": [{"role": "system", "content": SYSTEM}] + s.messages,
                "max_tokens": max_tokens, "temperature": 0}
        if s.stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
    else:
        path = "/v1/messages"
        headers |= {"anthropic-version": "2023-06-01", "x-api-key": "unused"}
        body = {"model": "any", "system": SYSTEM, "messages": s.messages,
                "max_tokens": max_tokens, "temperature": 0, "stream": s.stream}
    start = time.monotonic()
    t = Turn(s.name, s.api + (" sse" if s.stream else ""), turn, [], 0)
    try:
        t.status, t.tried, resp = team.request("POST", path, headers, json.dumps(body).encode())
        if t.status != 200:
            t.error = resp.read()[:200].decode("utf-8", "replace")
            s.messages.pop()
            return t
        text, usage = read_reply(s, resp)
    except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError, TypeError) as e:
        t.error = f"{type(e).__name__}: {e}"
        s.messages.pop()
        return t
    t.seconds = time.monotonic() - start
    s.messages.append({"role": "assistant", "content": text})
    if s.api == "openai":
        t.prompt = usage.get("prompt_tokens", 0)
        t.cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    else:
        # input_tokens counts only what was not read from the cache.
        t.cached = usage.get("cache_read_input_tokens", 0)
        t.prompt = usage.get("input_tokens", 0) + t.cached + usage.get("cache_creation_input_tokens", 0)
    return t


def read_reply(s: Session, resp) -> tuple[str, dict]:
    if not s.stream:
        reply = json.loads(resp.read())
        if s.api == "openai":
            return reply["choices"][0]["message"]["content"], reply["usage"]
        return "".join(b.get("text", "") for b in reply["content"]), reply["usage"]
    text, usage = [], {}
    for ev in sse_events(resp):
        if s.api == "openai":
            for c in ev.get("choices") or []:
                text.append((c.get("delta") or {}).get("content") or "")
            usage |= ev.get("usage") or {}
        elif ev.get("type") == "message_start":
            usage |= ev["message"].get("usage") or {}
        elif ev.get("type") == "content_block_delta":
            text.append(ev["delta"].get("text", ""))
        elif ev.get("type") == "message_delta":
            usage |= ev.get("usage") or {}
        elif ev.get("type") == "error":
            raise ValueError(f"stream error: {ev}")
    if not usage:
        raise ValueError("the stream ended without usage")
    return "".join(text), usage


def big_body(team: Team) -> int:
    """A 3 MB request (JSON whitespace) must pass nginx's body limit; its status."""
    body = ('{"model": "any",' + " " * 3_000_000 +
            '"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 1}').encode()
    headers = {"Content-Type": "application/json", "X-Claude-Code-Session-Id": "big-body"}
    status, tried, resp = team.request("POST", "/v1/chat/completions", headers, body)
    resp.read()
    return status


def pick_ids(team: Team, sessions: list[Session]) -> None:
    """Random session ids; the last one is drawn again until both instances
    hold a session, so the kill test sees sessions that move and sessions
    that stay."""
    for s in sessions:
        s.sid = str(uuid.uuid4())
    where = [team.instance_of(s) for s in sessions]
    for _ in range(64):
        if len(set(where)) > 1:
            return
        sessions[-1].sid = str(uuid.uuid4())
        where[-1] = team.instance_of(sessions[-1])
    raise SystemExit("team.py: every session id hashes to one instance")


def headers_spread(team: Team) -> list[str]:
    """Each session header must reach the hash: 16 random ids on one header
    all landing on one instance means nginx ignored it (and hashed the
    client's address)."""
    failures = []
    for header in ("X-Claude-Code-Session-Id", "session_id", "X-Session-Id"):
        probe = Session("probe", "openai", False, header)
        seen = set()
        for _ in range(16):
            probe.sid = str(uuid.uuid4())
            seen.add(team.instance_of(probe))
        if len(seen) < 2:
            failures.append(f"16 ids in {header} all went to {sorted(seen)}: is the header dropped?")
    return failures


def kill(team: Team, name: str) -> bool:
    """SIGKILL; whether its port stopped accepting within 5 s."""
    os.kill(team.pids[name], signal.SIGKILL)
    host, port = team.addrs[name].rsplit(":", 1)
    for _ in range(100):
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
        except OSError:
            return True
        time.sleep(0.05)
    return False


def table(turns: list[Turn]) -> str:
    rows = [("session", "api", "turn", "instance", "status", "prompt", "cached", "new", "seconds")]
    for t in sorted(turns, key=lambda t: (t.session, t.turn)):
        rows.append((t.session, t.api, str(t.turn), "→".join(t.tried) or "-", str(t.status),
                     str(t.prompt), str(t.cached), str(t.prompt - t.cached),
                     f"{t.seconds:.2f}" if not t.error else t.error[:40]))
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


def main() -> int:
    args = parse_args()
    team = Team(args.proxy, args.instance)
    cc = "X-Claude-Code-Session-Id"
    sessions = [
        Session("cc-1", "anthropic", True, cc),
        Session("oa-1", "openai", False, cc),
        Session("oa-2", "openai", False, cc),
        Session("oa-3", "openai", True, cc),
        Session("cx-1", "openai", False, "session_id"),  # as Codex sends it
    ]
    for s, task in zip(sessions, TASKS):
        s.messages.append({"role": "user", "content": f"Task: {task}"})
        s.messages.append({"role": "assistant", "content": "Understood."})
    failures, notes = [], []
    status = big_body(team)
    notes.append(f"a 3 MB request body through nginx: HTTP {status}")
    if status != 200:
        failures.append(f"the 3 MB request got HTTP {status}")
    spread = headers_spread(team)
    failures += spread
    notes.append("random ids in each session header (X-Claude-Code-Session-Id, session_id, "
                 "X-Session-Id) reached both instances" if not spread else "a session header was not hashed")
    pick_ids(team, sessions)

    turns: list[Turn] = []
    total = args.turns + args.after
    rounds = []  # wall seconds of each round
    start = time.monotonic()
    with ThreadPoolExecutor(len(sessions)) as pool:
        for turn in range(1, total + 1):
            if turn == args.turns + 1:
                held = {n: sum(1 for t in turns if t.turn == args.turns and t.instance == n) for n in team.pids}
                victim = max(held, key=held.get)
                if not kill(team, victim):
                    failures.append(f"instance {victim} still accepts connections 5 s after SIGKILL")
                notes.append(f"after turn {args.turns}: killed instance {victim} (SIGKILL), "
                             f"which held {held[victim]} of {len(sessions)} sessions")
            # A team works at once: each round's turns run together.
            t0 = time.monotonic()
            turns += pool.map(lambda s: run_turn(team, s, turn, args.max_tokens), sessions)
            rounds.append(time.monotonic() - t0)
            print(f"turn {turn} done", file=sys.stderr, flush=True)
    wall = time.monotonic() - start

    print(table(turns))
    print()
    by = {s.name: sorted((t for t in turns if t.session == s.name), key=lambda t: t.turn) for s in sessions}
    for name, ts in by.items():
        before, after = ts[: args.turns], ts[args.turns:]
        homes = {t.instance for t in before}
        home = before[0].instance
        if len(homes) != 1 or any(len(t.tried) != 1 for t in before):
            failures.append(f"{name}: turns before the kill went to {sorted(homes)}")
        for t in ts:
            if t.status != 200 or t.error:
                failures.append(f"{name} turn {t.turn}: HTTP {t.status} {t.error}")
            elif t.instance == victim and t.turn > args.turns:
                failures.append(f"{name} turn {t.turn}: answered by the dead instance")
        moved = home == victim
        ok = [t for t in ts if t.status == 200 and not t.error]
        homes_after = {t.instance for t in after}
        if moved and (len(homes_after) != 1 or victim in homes_after):
            failures.append(f"{name}: after the kill its turns went to {sorted(homes_after)}")
        if not moved and homes_after != {home}:
            failures.append(f"{name}: stayed on no instance: {home}, then {sorted(homes_after)}")
        # A hit: the previous turn's prompt (all of it a prefix of this
        # one's) was found cached. Each turn but the first, and but the
        # first turn of a moved session on its new instance: a miss.
        for prev, t in zip(ts, ts[1:]):
            if t not in ok or prev not in ok:
                continue
            if moved and t.turn == args.turns + 1:
                if t.cached >= prev.prompt:
                    failures.append(f"{name} turn {t.turn}: first turn on {t.instance} after the "
                                    f"move, yet {t.cached} cached >= the {prev.prompt} of its "
                                    f"previous prompt: did it move?")
            elif t.cached < prev.prompt:
                failures.append(f"{name} turn {t.turn}: a miss on {t.instance}, {t.cached} cached "
                                f"< the {prev.prompt} of its previous prompt")
        if moved:
            first, second = after[0], after[-1]
            notes.append(f"{name}: moved {home} → {first.instance}; first turn there cached "
                         f"{first.cached} of {first.prompt} (the shared system prompt at most), "
                         f"next {second.cached} of {second.prompt}")
        else:
            notes.append(f"{name}: stayed on {home}; after the kill cached "
                         + ", ".join(f"{t.cached} of {t.prompt}" for t in after))
    notes.append(f"wall time of the {total} rounds ({len(sessions)} sessions at once): {wall:.1f} s; "
                 "per round " + ", ".join(f"{r:.1f}" for r in rounds) + " s "
                 f"(the kill came before round {args.turns + 1})")
    for n in notes:
        print(n)
    print()
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        return 1
    print(f"ok: {len(sessions)} sessions pinned before the kill, all {len(turns)} turns answered, "
          "later turns hit the cache, moved sessions missed once on their new instance")
    return 0


if __name__ == "__main__":
    sys.exit(main())

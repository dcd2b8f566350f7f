#!/usr/bin/env python3
"""Real agents, turn after turn: Claude Code and Codex against hearth.

    .venv/bin/python bench/agents.py                 # both agents, 5 turns each, then a restart
    .venv/bin/python bench/agents.py --agents claude --turns 3
    .venv/bin/python bench/agents.py --stall 20      # the seed scenario: a prefill stall past the
                                                     # client's stream idle limit
    .venv/bin/python bench/agents.py --capture tests/fixtures/claude_code   # keep request fixtures

The pinned agents are installed from npm into a cache outside the repository
(`$HEARTH_AGENTS_DIR`, default ~/.cache/hearth-agents). hearth serves Gemma 3
270M at 32k context with a disk KV cache; each agent works in a scratch
directory with no network. Between the agent and hearth sits a recording
proxy (`agent_proxy.py`) that sees every byte the agent sees, so the figures
are the client's: time to first content, the largest silence on the stream,
whether the stream ended cleanly.

Per turn: prompt tokens; tokens new since the previous turn (this prompt
less the previous prompt and reply: what the agent added); tokens actually
prefilled (prompt less cached); tokens dropped (what hearth's KV held for
the conversation before the request, from `/slots`, that the request did not
send back unchanged: the agent trimmed or left out part of its history);
cached tokens and where they came from
(hearth's log); time to first token; the largest silence; the agent's own
outcome and how many requests it sent (more than one per turn is a retry
or a side request). After the last turn hearth gets a SIGTERM and restarts
on the same `--kv-disk-dir`, and the agent takes one more turn.

Prints a table and writes CSV (`--csv`, default bench/results/agents.csv).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import agent_proxy  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CLAUDE_VERSION = "2.1.332"
CODEX_VERSION = "0.171.0"
AGENTS_DIR = Path(os.environ.get("HEARTH_AGENTS_DIR", Path.home() / ".cache" / "hearth-agents"))
MODELS = Path(os.environ.get("HEARTH_HOME", Path.home() / ".cache" / "hearth")) / "models"

TURNS = [
    "What does calc.py do? Answer in one sentence.",
    "Which function in calc.py would you test first, and why?",
    "Suggest a better name for the function add.",
    "Write a one-line docstring for add.",
    "Summarise our conversation in one sentence.",
]
AFTER_RESTART = "Thank you. Anything else to add about calc.py?"

CALC = '''def add(a, b):
    return a + b


def sub(a, b):
    return a - b
'''


def install_agents() -> Path:
    """The pinned agents, installed once into the cache."""
    bin_dir = AGENTS_DIR / "node_modules" / ".bin"
    want = {"claude": CLAUDE_VERSION, "codex": CODEX_VERSION}
    ok = True
    for name, version in want.items():
        try:
            out = subprocess.run([str(bin_dir / name), "--version"], capture_output=True, text=True, timeout=60).stdout
            ok &= version in out
        except (OSError, subprocess.TimeoutExpired):
            ok = False
    if not ok:
        AGENTS_DIR.mkdir(parents=True, exist_ok=True)
        pkg = AGENTS_DIR / "package.json"
        if not pkg.exists():
            pkg.write_text('{"private": true}\n')
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", "--prefix", str(AGENTS_DIR),
             f"@anthropic-ai/claude-code@{CLAUDE_VERSION}", f"@openai/codex@{CODEX_VERSION}"],
            check=True,
        )
    return bin_dir


class Hearth:
    """hearth serve on the long-context model, JSON logs to a file."""

    def __init__(self, binary: str, port: int, kv_dir: Path, log: Path, extra_env: dict):
        self.binary, self.port, self.kv_dir, self.log = binary, port, kv_dir, log
        self.extra_env = extra_env
        self.proc: subprocess.Popen | None = None
        self.log_offset = 0

    def start(self) -> float:
        env = {**os.environ, "HEARTH_LOG_FORMAT": "json", **self.extra_env}
        args = [self.binary, "serve", "--model", str(MODELS / "gemma-3-270m-q4_k_m.gguf"),
                "--ctx", "32768", "--port", str(self.port), "--kv-disk-dir", str(self.kv_dir),
                "--max-tokens", str(MAX_OUTPUT), "--heartbeat-secs", "5"]
        started = time.monotonic()
        self.log_file = open(self.log, "ab")
        self.proc = subprocess.Popen(args, env=env, stdout=self.log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - started
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"hearth exited with {self.proc.returncode}; see {self.log}")
            time.sleep(0.3)
        raise RuntimeError("hearth did not become healthy in 180 s")

    def stop(self) -> int:
        assert self.proc
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=120)
        self.log_file.close()
        return rc

    def prefix_lines(self) -> list[dict]:
        """The admission log lines (`prefix: ...`) since the last call."""
        out = []
        with open(self.log, "rb") as f:
            f.seek(self.log_offset)
            data = f.read()
            self.log_offset += len(data)
        for line in data.decode("utf-8", "replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            fields = {**rec, **rec.get("fields", {})}
            if str(fields.get("message", "")).startswith("prefix:"):
                out.append(fields)
        return out


def usage_of(rec: dict) -> dict:
    """Prompt, cached and generated tokens of a recorded exchange."""
    u = rec.get("usage") or {}
    if "cache_read_input_tokens" in u:  # Anthropic: input_tokens is the uncached part
        cached = u.get("cache_read_input_tokens") or 0
        return {"prompt": (u.get("input_tokens") or 0) + cached, "cached": cached,
                "generated": u.get("output_tokens") or 0}
    if "input_tokens" in u:  # Responses
        cached = (u.get("input_tokens_details") or {}).get("cached_tokens") or 0
        return {"prompt": u.get("input_tokens") or 0, "cached": cached, "generated": u.get("output_tokens") or 0}
    return {}


class Agent:
    name = ""

    def __init__(self, bin_dir: Path, work: Path, base_url: str):
        self.bin_dir, self.work, self.base_url = bin_dir, work, base_url
        self.home = work / "home"
        self.scratch = work / "scratch"
        self.home.mkdir(parents=True, exist_ok=True)
        self.scratch.mkdir(parents=True, exist_ok=True)
        (self.scratch / "calc.py").write_text(CALC)

    def env(self) -> dict:
        return {**os.environ, "HOME": str(self.home), "NO_PROXY": "127.0.0.1,localhost"}


class Claude(Agent):
    name = "claude"

    def run(self, prompt: str, first: bool, timeout: float) -> dict:
        env = {**self.env(), "ANTHROPIC_BASE_URL": self.base_url, "ANTHROPIC_AUTH_TOKEN": "hearth",
               "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(MAX_OUTPUT),
               "DISABLE_AUTOUPDATER": "1", **EXTRA_AGENT_ENV}
        args = [str(self.bin_dir / "claude"), "-p", prompt, "--output-format", "json"]
        if not first:
            args.append("--continue")
        p = subprocess.run(args, cwd=self.scratch, env=env, capture_output=True, text=True, timeout=timeout)
        try:
            out = json.loads(p.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {"ok": False, "outcome": f"exit {p.returncode}: {(p.stderr or p.stdout)[-200:]}"}
        ok = p.returncode == 0 and not out.get("is_error")
        return {"ok": ok, "outcome": ("ok: " if ok else "error: ") + str(out.get("result", ""))[:80].replace("\n", " ")}


class Codex(Agent):
    name = "codex"

    def env(self) -> dict:
        home = self.home / ".codex"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            'model = "gemma"\nmodel_provider = "hearth"\n'
            'model_reasoning_effort = "none"\n'
            "[model_providers.hearth]\n"
            'name = "hearth"\n'
            f'base_url = "{self.base_url}/v1"\n'
            'wire_api = "responses"\n'
            'env_key = "HEARTH_CODEX_KEY"\n'
            f"stream_idle_timeout_ms = {CODEX_IDLE_MS}\n"
        )
        return {**super().env(), "CODEX_HOME": str(home), "HEARTH_CODEX_KEY": "hearth", **EXTRA_AGENT_ENV}

    def run(self, prompt: str, first: bool, timeout: float) -> dict:
        base = [str(self.bin_dir / "codex"), "exec", "--skip-git-repo-check", "--sandbox", "read-only"]
        args = base + [prompt] if first else base + ["resume", "--last", prompt]
        p = subprocess.run(args, cwd=self.scratch, env=self.env(), capture_output=True, text=True, timeout=timeout)
        last = (p.stdout.strip().splitlines() or [""])[-1]
        ok = p.returncode == 0
        return {"ok": ok, "outcome": ("ok: " if ok else f"exit {p.returncode}: ") + (last if ok else p.stderr[-160:]).replace("\n", " ")[:80]}


EXTRA_AGENT_ENV: dict = {}
# The output cap: hearth's --max-tokens and Claude Code's CLAUDE_CODE_MAX_OUTPUT_TOKENS.
MAX_OUTPUT = 256
# Codex's own stream idle limit (its default: 300 s); lowered for the seed scenario.
CODEX_IDLE_MS = 300_000

FIELDS = ["agent", "turn", "requests", "retries", "prompt", "new", "prefilled", "ratio", "dropped", "cached", "source",
          "ttft_s", "max_silence_s", "complete", "outcome"]


def conversation(rec: dict) -> str:
    body = rec.get("body") or {}
    return json.dumps([body.get("system"), body.get("messages"), body.get("input"), body.get("instructions")])


def one_turn(agent: Agent, hearth: Hearth, recorder, label, prompt, first, prev, timeout) -> dict:
    """One agent turn: every request it sent, summed.

    A turn may hold several requests: the agent continues a reply cut at
    its output cap, or runs a tool. `new` counts, request by request, the
    tokens beyond the previous request's prompt and reply (what the agent
    added); `prefilled` the tokens hearth computed (prompt less cached);
    `dropped` the tokens hearth held for the conversation that the request
    did not send back unchanged (the agent trimmed or left out part of its
    history), so `prefilled` = `new` + `dropped` when nothing is lost. A
    request whose conversation repeats an earlier one of the turn is a
    retry."""
    n0 = recorder.count()
    res = agent.run(prompt, first, timeout)
    recs = [r for r in recorder.since(n0) if r["method"] == "POST" and "/v1/" in r["path"]
            and not r["path"].rstrip("/").endswith(("count_tokens", "input_tokens"))]
    prefixes = hearth.prefix_lines()
    seen: set[str] = set()
    retries = new = prefilled = dropped = 0
    last = prev
    for r in recs:
        conv = conversation(r)
        retries += conv in seen
        seen.add(conv)
        u = usage_of(r)
        if not u:
            continue
        new += max(0, u["prompt"] - (last["prompt"] + last["generated"])) if last else u["prompt"]
        prefilled += u["prompt"] - u["cached"]
        if last and r.get("kv_held") is not None:
            dropped += max(0, r["kv_held"] - u["cached"])
        last = u
    head = recs[0] if recs else {}
    u0 = usage_of(head) if head else {}
    row = {
        "agent": agent.name, "turn": label, "requests": len(recs), "retries": retries,
        "prompt": u0.get("prompt", ""), "new": new, "prefilled": prefilled,
        "ratio": round(prefilled / new, 3) if new else "",
        "dropped": dropped,
        "cached": u0.get("cached", ""),
        "source": prefixes[0].get("source", "") if prefixes else "",
        "ttft_s": round(head.get("ttfc") or head.get("ttfb") or 0, 2) if head else "",
        "max_silence_s": round(max((r.get("max_gap") or 0) for r in recs), 2) if recs else "",
        "complete": all(r.get("complete") for r in recs),
        "outcome": res["outcome"],
    }
    row["_usage"] = last
    row["_records"] = recs
    return row


ANON = [
    (re.compile(r'"device_id\\?":\\?"[0-9a-f]+'), '"device_id\\":\\"0000'),
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), "00000000-0000-4000-8000-000000000000"),
]


def anonymise(rec: dict, scratch: Path, max_text: int = 300) -> dict:
    """A recorded request as a fixture: no ids, no local paths, long texts cut."""
    keep = {"anthropic-beta", "anthropic-version", "content-type", "x-app", "user-agent",
            "x-claude-code-session-id", "originator", "openai-beta", "session_id", "version"}
    headers = {k: v for k, v in rec["headers"].items() if k.lower() in keep}

    def cut(x):
        if isinstance(x, str):
            x = x.replace(str(scratch), "/work/project").replace(str(scratch.parent), "/work")
            return x if len(x) <= max_text else x[: max_text - 20] + " [...cut...]"
        if isinstance(x, list):
            return [cut(v) for v in x]
        if isinstance(x, dict):
            return {k: (v if k in ("signature", "encrypted_content") else cut(v)) for k, v in x.items()}
        return x

    text = json.dumps({"path": rec["path"], "headers": headers, "body": cut(rec.get("body"))}, indent=1)
    for pat, sub in ANON:
        text = pat.sub(sub, text)
    return json.loads(text)


def print_table(rows: list[dict]) -> None:
    widths = {f: max(len(f), *(len(str(r.get(f, ""))) for r in rows)) for f in FIELDS}
    widths["outcome"] = min(widths["outcome"], 60)
    print("  ".join(f.ljust(widths[f]) for f in FIELDS))
    for r in rows:
        print("  ".join(str(r.get(f, ""))[: widths[f]].ljust(widths[f]) for f in FIELDS))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", default="claude,codex")
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--no-restart", action="store_true")
    ap.add_argument("--bin", default=os.environ.get("HEARTH_BIN", str(ROOT / "target/release/hearth")))
    ap.add_argument("--port", type=int, default=18480)
    ap.add_argument("--csv", default=str(ROOT / "bench/results/agents.csv"))
    ap.add_argument("--stall", type=float, default=0,
                    help="inject HEARTH_FAULT=prefill_stall:SECS:1 into each agent's first turn, and set the "
                         "agents' stream idle limits to their lowest (Claude Code: 10 s)")
    ap.add_argument("--capture", default=None, help="write anonymised request fixtures into this directory")
    ap.add_argument("--timeout", type=float, default=900, help="seconds one agent turn may take")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--threads", type=int, default=0, help="hearth's --threads (0: its default)")
    ap.add_argument("--max-output", type=int, default=256,
                    help="the output cap (hearth --max-tokens, CLAUDE_CODE_MAX_OUTPUT_TOKENS)")
    ap.add_argument("--install-only", action="store_true", help="install the pinned agents and exit")
    args = ap.parse_args()

    global MAX_OUTPUT, CODEX_IDLE_MS
    MAX_OUTPUT = args.max_output
    bin_dir = install_agents()
    if args.install_only:
        return 0
    work = Path(tempfile.mkdtemp(prefix="hearth-agents-"))
    rows: list[dict] = []
    extra_env = {"HEARTH_THREADS": str(args.threads)} if args.threads else {}
    if args.stall:
        # One stall inside the first prefill chunk of the first request.
        extra_env["HEARTH_FAULT"] = f"prefill_stall:{args.stall}:1"
        EXTRA_AGENT_ENV["CLAUDE_BYTE_STREAM_IDLE_TIMEOUT_MS"] = "10000"
        EXTRA_AGENT_ENV["CLAUDE_ENABLE_BYTE_WATCHDOG"] = "1"
        CODEX_IDLE_MS = 10_000
    try:
        for name in args.agents.split(","):
            aw = work / name
            aw.mkdir()
            hearth = Hearth(args.bin, args.port, aw / "kv", aw / "hearth.log", extra_env)
            hearth.start()
            proxy, recorder = agent_proxy.start(0, f"http://127.0.0.1:{args.port}", str(aw / "exchanges.jsonl"))
            base = f"http://127.0.0.1:{proxy.server_address[1]}"
            agent = {"claude": Claude, "codex": Codex}[name](bin_dir, aw, base)
            prev = None
            for i, prompt in enumerate(TURNS[: args.turns]):
                row = one_turn(agent, hearth, recorder, str(i + 1), prompt, i == 0, prev, args.timeout)
                prev = row["_usage"]
                rows.append(row)
                print_table([row])
                if args.capture and name == "claude":
                    out = Path(args.capture)
                    out.mkdir(parents=True, exist_ok=True)
                    for k, rec in enumerate(row["_records"]):
                        fixture = anonymise(rec, agent.scratch)
                        (out / f"turn{i + 1}-{k + 1}.json").write_text(json.dumps(fixture, indent=1) + "\n")
            if not args.no_restart:
                rc = hearth.stop()
                ready = hearth.start()
                hearth.prefix_lines()
                row = one_turn(agent, hearth, recorder, "restart", AFTER_RESTART, False, prev, args.timeout)
                row["outcome"] += f" (exit {rc}, ready in {ready:.1f} s)"
                rows.append(row)
                print_table([row])
            hearth.stop()
            proxy.shutdown()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work directory: {work}")
    print()
    print_table(rows)
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    print(f"\nwrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

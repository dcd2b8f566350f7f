#!/usr/bin/env python3
"""Load test: many concurrent clients against a real `hearth serve`, on loopback.

    python3 bench/load.py                      # 32 clients, 60 s, default model
    python3 bench/load.py --clients 8 --duration 20 --json bench/results/load.json
    python3 bench/load.py -- --cache-ram-mb 0  # flags after -- go to `hearth serve`

It starts the release binary on 127.0.0.1 (port 0) with the default model and
runs, for a fixed time, N clients that each send one request after another: a
mix of OpenAI chat completions and Anthropic messages, streaming and not, and
a quarter of them abandoned at a random moment (the socket is closed
mid-request). Meanwhile it probes GET /health twice a second and samples the
server's resident memory (with its engine process's) from /proc every second. When the time is
up no new requests start; those in flight get a bounded time to finish; then
the server is sent SIGTERM and must exit 0.

It checks, and exits non-zero unless:
  - every completed response is well-formed for its protocol (streams: the
    full event sequence, properly ended; non-streams: the whole JSON shape);
  - no stream is silent (no byte from the server, headers included) for
    longer than one heartbeat interval plus 0.25 s;
  - /health answers every probe;
  - resident memory is flat: it grows by at most --rss-slack-mb between the
    end of the first quarter of the run and the end;
  - the server exits 0 on SIGTERM.

Standard library only (asyncio sockets and a small HTTP/1.1 reader), so the
timings are the socket's, not a client library's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("HEARTH_HOME", Path.home() / ".cache" / "hearth")) / "models"

QUESTIONS = [
    "Name three colours.", "What is 7 times 8?", "Write a haiku about rain.", "Say hello in French.",
    "List two prime numbers.", "What is the capital of Italy?", "Describe a cat in one sentence.",
    "Give me a word that rhymes with light.", "Count from one to five.", "What day comes after Monday?",
    "Suggest a name for a dog.", "Why is the sky blue? One sentence.",
]


@dataclass
class Result:
    kind: str              # openai|anthropic + stream|json
    status: int = 0
    ok: bool = False       # completed and well-formed
    refused: bool = False  # 429/529/503 with a well-formed error body
    abandoned: bool = False
    problem: str = ""
    latency: float = 0.0
    max_silence: float = 0.0
    heartbeats: int = 0


@dataclass
class Stats:
    results: list[Result] = field(default_factory=list)
    health: list[float] = field(default_factory=list)
    health_failures: list[str] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)


# --- a minimal HTTP/1.1 client -------------------------------------------------

class Conn:
    """One request on its own connection; records when bytes arrive."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.last = time.monotonic()
        self.max_silence = 0.0

    @classmethod
    async def open(cls, host: str, port: int) -> "Conn":
        r, w = await asyncio.open_connection(host, port)
        return cls(r, w)

    async def _read(self, coro):
        data = await coro
        now = time.monotonic()
        self.max_silence = max(self.max_silence, now - self.last)
        self.last = now
        return data

    async def send(self, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> None:
        head = [f"{method} {path} HTTP/1.1", "host: 127.0.0.1", "connection: close", f"content-length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await self.writer.drain()
        self.last = time.monotonic()  # silence is counted from the request's end

    async def head(self) -> tuple[int, dict[str, str]]:
        raw = await self._read(self.reader.readuntil(b"\r\n\r\n"))
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        return status, headers

    async def chunks(self, headers: dict[str, str]):
        """Yield body pieces as they arrive (chunked or not)."""
        if "chunked" in headers.get("transfer-encoding", ""):
            while True:
                size_line = await self._read(self.reader.readuntil(b"\r\n"))
                size = int(size_line.strip().split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    return
                data = await self._read(self.reader.readexactly(size + 2))
                yield data[:-2]
        else:
            n = int(headers.get("content-length", "0"))
            if n:
                yield await self._read(self.reader.readexactly(n))

    def close(self) -> None:
        self.writer.close()


# --- well-formedness -------------------------------------------------------------

def sse_frames(text: str) -> list[tuple[str | None, str | None, bool]]:
    """(event, data, is_comment) for each frame."""
    frames = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        event, data, comment = None, [], False
        for line in block.split("\n"):
            if line.startswith(":"):
                comment = True
            elif line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
            else:
                raise ValueError(f"bad SSE line {line!r}")
        frames.append((event, "\n".join(data) if data else None, comment and not data and event is None))
    return frames


def check_openai_stream(text: str) -> tuple[str, int]:
    frames = sse_frames(text)
    beats = sum(1 for f in frames if f[2])
    data = [f[1] for f in frames if not f[2]]
    if not data or data[-1] != "[DONE]":
        return "stream does not end with [DONE]", beats
    chunks = [json.loads(d) for d in data[:-1]]
    if any("error" in c for c in chunks):
        return "error event: " + json.dumps(chunks[-1])[:200], beats
    if chunks[0]["choices"][0]["delta"].get("role") != "assistant":
        return "first chunk has no role", beats
    if not all(c.get("object") == "chat.completion.chunk" for c in chunks):
        return "a chunk is not a chat.completion.chunk", beats
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    if len(finishes) != 1 or finishes[0] not in ("stop", "length"):
        return f"finish reasons {finishes}", beats
    return "", beats


def check_anthropic_stream(text: str) -> tuple[str, int]:
    frames = sse_frames(text)
    beats = sum(1 for f in frames if f[0] == "ping")
    events = [(e, json.loads(d)) for e, d, c in frames if not c and e != "ping"]
    names = [e for e, _ in events]
    if "error" in names:
        return "error event: " + json.dumps(events[names.index("error")][1])[:200], beats
    if not names or names[0] != "message_start" or names[-1] != "message_stop":
        return f"event sequence {names[:3]}...{names[-3:]}", beats
    if names[-2] != "message_delta" or events[-2][1]["delta"]["stop_reason"] not in ("end_turn", "max_tokens", "stop_sequence"):
        return "no proper message_delta", beats
    for e, d in events:
        if d.get("type") != e:
            return f"event {e} carries type {d.get('type')}", beats
    opened = sum(1 for n in names if n == "content_block_start")
    if opened != sum(1 for n in names if n == "content_block_stop") or opened < 1:
        return "content blocks not balanced", beats
    return "", beats


def check_openai_json(body: dict) -> str:
    try:
        choice = body["choices"][0]
        assert body["object"] == "chat.completion"
        assert isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length")
        assert body["usage"]["completion_tokens"] >= 0
    except (KeyError, IndexError, TypeError, AssertionError):
        return "malformed chat.completion: " + json.dumps(body)[:200]
    return ""


def check_anthropic_json(body: dict) -> str:
    try:
        assert body["type"] == "message" and body["role"] == "assistant"
        assert isinstance(body["content"][0]["text"], str)
        assert body["stop_reason"] in ("end_turn", "max_tokens", "stop_sequence")
        assert body["usage"]["output_tokens"] >= 0
    except (KeyError, IndexError, TypeError, AssertionError):
        return "malformed message: " + json.dumps(body)[:200]
    return ""


def is_refusal(status: int, body: bytes, anthropic: bool) -> bool:
    if status not in (429, 503, 529):
        return False
    try:
        b = json.loads(body)
    except ValueError:
        return False
    return (b.get("type") == "error" and "error" in b) if anthropic else ("error" in b)


# --- the clients ---------------------------------------------------------------

def make_request(rng: random.Random) -> tuple[str, str, bytes, bool, bool]:
    anthropic = rng.random() < 0.5
    stream = rng.random() < 0.75
    messages = [{"role": "user", "content": rng.choice(QUESTIONS)}]
    if rng.random() < 0.3:  # a follow-up turn: exercises prefix reuse
        messages += [{"role": "assistant", "content": "Sure."}, {"role": "user", "content": rng.choice(QUESTIONS)}]
    body = {"model": "load", "max_tokens": rng.randint(8, 48), "messages": messages, "stream": stream,
            "temperature": rng.choice([0, 0.7])}
    path = "/v1/messages" if anthropic else "/v1/chat/completions"
    kind = ("anthropic" if anthropic else "openai") + ("-stream" if stream else "-json")
    return path, kind, json.dumps(body).encode(), anthropic, stream


async def one_request(port: int, rng: random.Random, abandon_p: float) -> Result:
    path, kind, body, anthropic, stream = make_request(rng)
    res = Result(kind=kind)
    abandon_after = rng.uniform(0.0, 4.0) if rng.random() < abandon_p else None
    t0 = time.monotonic()
    conn = await Conn.open("127.0.0.1", port)

    async def run() -> None:
        headers = {"content-type": "application/json"}
        if anthropic:
            headers |= {"anthropic-version": "2023-06-01", "x-api-key": "load"}
        await conn.send("POST", path, body, headers)
        res.status, h = await conn.head()
        raw = b""
        async for piece in conn.chunks(h):
            raw += piece
        res.latency = time.monotonic() - t0
        if res.status != 200:
            res.refused = is_refusal(res.status, raw, anthropic)
            res.problem = "" if res.refused else f"status {res.status}: {raw[:200]!r}"
            return
        text = raw.decode("utf-8")
        if stream:
            check = check_anthropic_stream if anthropic else check_openai_stream
            res.problem, res.heartbeats = check(text)
        else:
            check = check_anthropic_json if anthropic else check_openai_json
            res.problem = check(json.loads(text))
        res.ok = not res.problem

    try:
        if abandon_after is None:
            await run()
        else:
            try:
                await asyncio.wait_for(run(), abandon_after)
            except asyncio.TimeoutError:
                res.abandoned = True
    except Exception as e:  # noqa: BLE001 - any failure is a finding
        res.problem = f"{type(e).__name__}: {e}"
    finally:
        res.max_silence = conn.max_silence
        conn.close()
    return res


async def client(port: int, seed: int, deadline: float, abandon_p: float, stats: Stats) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        stats.results.append(await one_request(port, rng, abandon_p))


async def probe_health(port: int, stop: asyncio.Event, stats: Stats) -> None:
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            conn = await Conn.open("127.0.0.1", port)
            try:
                await conn.send("GET", "/health")
                status, h = await asyncio.wait_for(conn.head(), 5)
                async for _ in conn.chunks(h):
                    pass
            finally:
                conn.close()
            if status != 200:
                stats.health_failures.append(f"status {status}")
            stats.health.append(time.monotonic() - t0)
        except Exception as e:  # noqa: BLE001
            stats.health_failures.append(f"{type(e).__name__}: {e}")
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except asyncio.TimeoutError:
            pass


def rss_kib(pid: int) -> int:
    """The server's resident memory with its engine process's (a child)."""
    total = 0
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        children = []
    for p in [pid, *children]:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


async def sample_rss(pid: int, t0: float, stop: asyncio.Event, stats: Stats) -> None:
    while not stop.is_set():
        stats.rss.append((time.monotonic() - t0, rss_kib(pid)))
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except asyncio.TimeoutError:
            pass


async def fetch_metrics(port: int) -> str:
    conn = await Conn.open("127.0.0.1", port)
    try:
        await conn.send("GET", "/metrics")
        _, h = await conn.head()
        return b"".join([p async for p in conn.chunks(h)]).decode()
    finally:
        conn.close()


# --- the run -----------------------------------------------------------------

def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, int]:
    cmd = [str(args.bin), "serve", "--host", "127.0.0.1", "--port", "0", "--model", str(args.model),
           "--heartbeat-secs", str(args.heartbeat), *args.server_args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_") or k == "HEARTH_HOME"}
    log = open(args.log, "wb")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
    if not m:
        proc.kill()
        sys.exit(f"load: the server did not start (see {args.log}): {line!r}")
    return proc, int(m.group(1))


def percentile(xs: list[float], p: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def main_async(args: argparse.Namespace) -> int:
    proc, port = start_server(args)
    stats = Stats()
    stop = asyncio.Event()
    t0 = time.monotonic()
    deadline = t0 + args.duration
    background = [asyncio.create_task(probe_health(port, stop, stats)),
                  asyncio.create_task(sample_rss(proc.pid, t0, stop, stats))]
    clients = [asyncio.create_task(client(port, args.seed * 1000 + i, deadline, args.abandon, stats))
               for i in range(args.clients)]
    done, pending = await asyncio.wait(clients, timeout=args.duration + args.drain)
    for task in pending:
        task.cancel()
    metrics = await fetch_metrics(port)
    stop.set()
    await asyncio.gather(*background)
    wall = time.monotonic() - t0

    proc.send_signal(signal.SIGTERM)
    try:
        exit_code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        exit_code = None

    # --- figures and verdicts
    rs = stats.results
    completed = [r for r in rs if not r.abandoned and not r.problem and (r.ok or r.refused)]
    problems = [r for r in rs if r.problem]
    streams = [r for r in rs if r.kind.endswith("stream")]
    silence_limit = args.heartbeat + 0.25
    silent = [r for r in streams if r.max_silence > silence_limit]
    rss_start = next((kib for t, kib in stats.rss if t >= args.duration / 4), stats.rss[-1][1] if stats.rss else 0)
    rss_end = stats.rss[-1][1] if stats.rss else 0
    rss_max = max((kib for _, kib in stats.rss), default=0)
    by_kind: dict[str, int] = {}
    for r in rs:
        if r.ok:
            by_kind[r.kind] = by_kind.get(r.kind, 0) + 1
    gen_tokens = re.search(r"^hearth_generated_tokens_total (\S+)$", metrics, re.M)
    summary = {
        "clients": args.clients, "duration_s": args.duration, "wall_s": round(wall, 1), "heartbeat_s": args.heartbeat,
        "requests": len(rs), "completed_ok": sum(r.ok for r in rs), "refused_overload": sum(r.refused for r in rs),
        "abandoned": sum(r.abandoned for r in rs), "malformed_or_failed": len(problems),
        "completed_by_kind": by_kind,
        "generated_tokens": float(gen_tokens.group(1)) if gen_tokens else None,
        "latency_s": {k: round(v, 2) for k, v in {
            "p50": percentile([r.latency for r in rs if r.ok], 50),
            "p95": percentile([r.latency for r in rs if r.ok], 95),
            "max": max([r.latency for r in rs if r.ok], default=0)}.items()},
        "stream_max_silence_s": {k: round(v, 3) for k, v in {
            "p50": percentile([r.max_silence for r in streams], 50),
            "p99": percentile([r.max_silence for r in streams], 99),
            "max": max([r.max_silence for r in streams], default=0)}.items()},
        "stream_heartbeats": sum(r.heartbeats for r in streams),
        "silent_streams": len(silent),
        "health": {"probes": len(stats.health), "failures": len(stats.health_failures),
                   "p50_ms": round(1000 * (statistics.median(stats.health) if stats.health else 0), 1),
                   "max_ms": round(1000 * max(stats.health, default=0), 1)},
        "rss_mib": {"at_quarter": round(rss_start / 1024, 1), "end": round(rss_end / 1024, 1), "max": round(rss_max / 1024, 1)},
        "server_exit_code": exit_code,
    }
    checks = {
        "every completed response well-formed": not problems,
        f"no stream silent > {silence_limit:.2f} s": not silent,
        "/health answered every probe": not stats.health_failures and bool(stats.health),
        f"RSS flat (growth <= {args.rss_slack_mb} MiB after the first quarter)": (rss_end - rss_start) / 1024 <= args.rss_slack_mb,
        "exit 0 on SIGTERM": exit_code == 0,
        "some requests completed": summary["completed_ok"] > 0,
    }
    summary["checks"] = checks
    print(json.dumps(summary, indent=2))
    for r in problems[:10]:
        print(f"  problem ({r.kind}, status {r.status}): {r.problem}", file=sys.stderr)
    for r in silent[:10]:
        print(f"  silent {r.max_silence:.2f} s ({r.kind}, abandoned={r.abandoned})", file=sys.stderr)
    for f in stats.health_failures[:5]:
        print(f"  /health: {f}", file=sys.stderr)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    failed = [k for k, ok in checks.items() if not ok]
    print(("load: FAILED: " + "; ".join(failed)) if failed else "load: all checks passed", file=sys.stderr)
    return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=60.0, help="seconds during which requests start")
    p.add_argument("--drain", type=float, default=60.0, help="seconds more for requests in flight to end")
    p.add_argument("--heartbeat", type=float, default=1.0, help="--heartbeat-secs for the server")
    p.add_argument("--abandon", type=float, default=0.25, help="share of requests abandoned at a random moment")
    p.add_argument("--rss-slack-mb", type=float, default=64.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--bin", type=Path, default=REPO / "target" / "release" / "hearth")
    p.add_argument("--model", type=Path, default=MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--log", type=Path, default=Path("/tmp/hearth-load.log"), help="the server's stderr")
    p.add_argument("--json", help="also write the summary here")
    p.add_argument("server_args", nargs="*", help="after --: flags for hearth serve")
    args = p.parse_args()
    if not args.bin.exists():
        sys.exit(f"load: {args.bin} is missing: cargo build --release")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())

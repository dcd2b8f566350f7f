#!/usr/bin/env python3
"""The cost of spreading a model over llama.cpp RPC workers: one server
holding the whole model against one whose layers sit on two
`hearth rpc-worker`s on loopback, in the same run, rounds interleaved.
Prefill and decode tokens per second of a streamed greedy chat reply,
min / median / max. Standard library only.

    python3 bench/rpc.py [--rounds 5] [--prompt 1500] [--decode 128] [--threads 2]

On one machine the workers share its cores with the server, so this
measures what the protocol costs (a graph per step over a socket per
worker), not what more machines would gain."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("HEARTH_BIN", ROOT / "target" / "release" / "hearth"))
LOGS = Path(tempfile.mkdtemp(prefix="hearth-rpc-bench-"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_")}


def worker(threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    p = subprocess.Popen([str(BIN), "rpc-worker", "--port", str(port), "--threads", str(threads)],
                         stdout=open(LOGS / f"worker-{port}.log", "wb"), stderr=subprocess.STDOUT, env=clean_env())
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return p, f"127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline or p.poll() is not None:
                sys.exit(f"the worker on {port} did not start: see {LOGS}")
            time.sleep(0.05)


def server(name: str, extra: list[str], threads: int) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([str(BIN), "serve", "--port", "0", "--parallel", "1", "--threads", str(threads),
                          "--cache-ram-mb", "0", *extra],
                         stdout=subprocess.PIPE, stderr=open(LOGS / f"{name}.log", "wb"), env=clean_env())
    line = p.stdout.readline().decode()
    m = re.search(r"http://(\S+)", line)
    if not m:
        sys.exit(f"{name} did not start: see {LOGS}")
    return p, m.group(1)


def one(url: str, i: int, prompt: int, decode: int) -> tuple[float, float]:
    host, port = url.split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=600)
    words = " ".join(f"w{i}x{k}" for k in range(prompt // 3))
    body = {"model": "m", "messages": [{"role": "user", "content": f"{i} {words}. Write a long essay about ships."}],
            "max_tokens": decode, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    t0 = time.monotonic()
    c.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
    r = c.getresponse()
    first, n, usage = None, 0, None
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: {"):
            continue
        d = json.loads(line[6:])
        if d.get("usage"):
            usage = d["usage"]
        if d["choices"] and d["choices"][0]["delta"].get("content"):
            n += 1
            if first is None:
                first = time.monotonic()
    end = time.monotonic()
    assert usage and first, "no reply"
    return usage["prompt_tokens"] / (first - t0), (n - 1) / (end - first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=1500, help="prompt tokens, about")
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="the server's threads; each worker gets half")
    a = ap.parse_args()
    procs = []
    ws = [worker(max(1, a.threads // 2)) for _ in range(2)]
    procs += [p for p, _ in ws]
    servers = {
        "one machine": server("local", [], a.threads),
        "two RPC workers": server("rpc", ["--rpc", ",".join(e for _, e in ws)], a.threads),
    }
    procs += [p for p, _ in servers.values()]
    res = {k: ([], []) for k in servers}
    try:
        for rnd in range(a.rounds):
            for name, (_, url) in servers.items():
                pf, dc = one(url, rnd, a.prompt, a.decode)
                res[name][0].append(pf)
                res[name][1].append(dc)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
    f = lambda v: f"{min(v):.1f} / {statistics.median(v):.1f} / {max(v):.1f}"
    print(f"{a.rounds} rounds, prompt ~{a.prompt} tokens, {a.decode} decoded, min / median / max (logs: {LOGS})")
    print("| | prefill t/s | decode t/s |\n|---|---|---|")
    for name, (pf, dc) in res.items():
        print(f"| {name} | {f(pf)} | {f(dc)} |")


if __name__ == "__main__":
    main()

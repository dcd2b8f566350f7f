#!/usr/bin/env python3
"""From an engine death to serving again: a server with the disk KV cache
answers one long turn (about 8k tokens), its engine process is killed
(SIGKILL), and the script times /health's return to 200 and the next turn,
which takes its prefix from disk. Standard library only.

    python3 bench/engine_restart.py [TRIALS]     (default 3)"""

import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(os.environ.get("HEARTH_BIN", Path(__file__).resolve().parent.parent / "target" / "release" / "hearth"))


def req(url, method, path, body=None):
    host, port = url.split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=600)
    c.request(method, path, json.dumps(body) if body else None, {"content-type": "application/json"})
    r = c.getresponse()
    return r.status, json.loads(r.read() or b"{}")


def trial(k: int) -> tuple:
    d = tempfile.mkdtemp(prefix="hearth-restart-")
    env = {n: v for n, v in os.environ.items() if not n.startswith("HEARTH_")}
    p = subprocess.Popen([str(BIN), "serve", "--port", "0", "--parallel", "1", "--kv-disk-dir", d],
                         stdout=subprocess.PIPE, stderr=open(Path(d) / "server.log", "wb"), env=env)
    try:
        url = re.search(r"http://(\S+)", p.stdout.readline().decode()).group(1)
        text = " ".join(f"line {i}: the value of item {i} is {i * 7}." for i in range(400))
        msgs = [{"role": "user", "content": f"trial {k}. {text}"}]
        ask = lambda: {"model": "m", "messages": msgs, "max_tokens": 8, "temperature": 0}
        t0 = time.monotonic()
        _, r1 = req(url, "POST", "/v1/chat/completions", ask())
        cold = time.monotonic() - t0
        msgs += [{"role": "assistant", "content": r1["choices"][0]["message"]["content"]},
                 {"role": "user", "content": "And item 3?"}]
        time.sleep(1.0)  # the disk writer
        pid = req(url, "GET", "/health")[1]["engine_pid"]
        os.kill(pid, signal.SIGKILL)
        k0 = time.monotonic()
        while True:
            s, h = req(url, "GET", "/health")
            if s == 200 and h.get("engine_pid") != pid:
                break
            time.sleep(0.02)
        back = time.monotonic() - k0
        t1 = time.monotonic()
        _, r2 = req(url, "POST", "/v1/chat/completions", ask())
        warm = time.monotonic() - t1
        u = r2["usage"]
        return r1["usage"]["prompt_tokens"], cold, back, warm, u["prompt_tokens"], u["prompt_tokens_details"]["cached_tokens"]
    finally:
        p.terminate()
        p.wait(60)


def main() -> None:
    out = [trial(k) for k in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3)]
    for o in out:
        print("prompt %d, cold %.2f s | death to /health 200 %.2f s | next turn %.2f s (prompt %d, cached %d)" % o)
    f = lambda v: f"{min(v):.2f} / {statistics.median(v):.2f} / {max(v):.2f}"
    print("min / median / max: back", f([o[2] for o in out]), "| next turn", f([o[3] for o in out]),
          "| cold", f([o[1] for o in out]))


if __name__ == "__main__":
    main()

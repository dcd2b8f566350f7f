"""`--trace FILE` when the file cannot keep up: the lines waiting for it
are bounded, requests never wait on it, and the file says what was lost."""

from __future__ import annotations

import http.client
import json
import os
import select
import time
from urllib.parse import urlsplit

from conftest import HearthServer
from hearth_http import request

BODY_MIB = 1
REQUESTS = 300  # 300 MiB of trace lines, far beyond the 64 MiB the queue may hold


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_stuck_trace_file_cannot_grow_memory_without_bound(start_hearth, tmp_path):
    # A pipe nobody reads: the writer blocks as soon as its 64 KiB buffer
    # fills, as on a disk that has stopped answering.
    fifo = tmp_path / "trace.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        srv: HearthServer = start_hearth("--trace", str(fifo))
        parts = urlsplit(srv.url)
        # Each request is refused at once (temperature 5), and a refusal is
        # traced with its whole raw body.
        body = json.dumps({"model": "m", "temperature": 5, "max_tokens": 1,
                           "messages": [{"role": "user", "content": "x" * (BODY_MIB << 20)}]})
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        base = rss_mib(srv.proc.pid)
        peak = base
        t0 = time.monotonic()
        for i in range(REQUESTS):
            conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 400, resp.status
            if i % 20 == 0:
                peak = max(peak, rss_mib(srv.proc.pid))
        took = time.monotonic() - t0
        conn.close()
        peak = max(peak, rss_mib(srv.proc.pid))
        print(f"{REQUESTS} MiB traced into a stuck pipe in {took:.1f} s: RSS {base:.0f} -> peak {peak:.0f} MiB")
        assert peak - base < 160, f"RSS grew {peak - base:.0f} MiB for {REQUESTS} MiB of trace lines"
        # Requests never waited on the stuck writer.
        assert took < 120, f"{REQUESTS} refusals took {took:.0f} s"
        t0 = time.monotonic()
        assert request("GET", srv.url + "/health").status == 200
        assert time.monotonic() - t0 < 2
        assert "trace lines are being dropped" in srv.log_path.read_text()

        # Once the file drains, it records how many lines were lost.
        tail, note = b"", None
        deadline = time.monotonic() + 60
        while note is None and time.monotonic() < deadline:
            if not select.select([reader], [], [], 1)[0]:
                continue
            # Search the new bytes with the end of the old (the lines
            # themselves are megabytes; only the note matters).
            tail += os.read(reader, 1 << 20)
            at = tail.find(b'{"dropped_lines"')
            if at < 0:
                at = tail.find(b'"dropped_lines"')
            if at >= 0 and b"\n" in tail[at:]:
                start = tail.rfind(b"\n", 0, at) + 1
                note = json.loads(tail[start:tail.index(b"\n", at)])
            elif at < 0:
                tail = tail[-4096:]
        assert note is not None, "no line in the trace says lines were dropped"
        assert note["dropped_lines"] > 0, note
        # The bound: at most 64 MiB waited, so most of the 300 lines were dropped.
        assert note["dropped_lines"] >= REQUESTS - 80, note
    finally:
        os.close(reader)

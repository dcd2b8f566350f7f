"""A model spread over llama.cpp RPC workers: two `hearth rpc-worker`
processes on loopback take the layers of `hearth serve --rpc`. Greedy
replies match a server that holds the whole model; a worker killed
mid-stream ends the stream with the protocol's error, and the restarted
engine waits for the worker, saying so on /health, then serves again."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import HEARTH_BIN
from hearth_http import request
from test_engine_process import chat, error_ending, health, wait_for
from test_parallel import RawStream, metric

ASK = "Name three colours of the rainbow."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


class Worker:
    """One `hearth rpc-worker` on a loopback port."""

    def __init__(self, port: int, log: Path, *extra: str):
        self.port = port
        env = {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_")}
        self.log = log
        self.proc = subprocess.Popen(
            [str(HEARTH_BIN), "rpc-worker", "--port", str(port), "--threads", "1", *extra],
            stdin=subprocess.DEVNULL, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 20
        while not listening(port):
            assert self.proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the worker did not listen"
            time.sleep(0.05)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def workers(tmp_path):
    started: list[Worker] = []

    def start(port: int | None = None, *extra: str) -> Worker:
        w = Worker(port or free_port(), tmp_path / f"worker-{len(started)}.log", *extra)
        started.append(w)
        return w

    yield start
    for w in started:
        w.kill()


def greedy(url: str, n: int = 24) -> str:
    r = request("POST", url + "/v1/chat/completions", chat(ASK, n, stream=False))
    assert r.status == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_two_workers_hold_the_layers_and_replies_match_one_machine(start_hearth, workers):
    local = start_hearth("--engine-in-process")
    expected = greedy(local.url)
    local.stop()
    a, b = workers(), workers()
    idle = a.rss_mib(), b.rss_mib()
    srv = start_hearth("--rpc", f"{a.endpoint},{b.endpoint}")
    assert greedy(srv.url) == expected
    # The weights (92 MiB) and the KV are on the workers, about half each.
    grown = a.rss_mib() - idle[0], b.rss_mib() - idle[1]
    assert all(g > 30 for g in grown), grown
    log = srv.log_path.read_text()
    assert log.count("RPC worker connected") == 2, log[-2000:]


def test_tensor_split_puts_the_layers_where_it_says(start_hearth, workers):
    a, b = workers(), workers()
    idle = a.rss_mib(), b.rss_mib()
    srv = start_hearth("--rpc", f"{a.endpoint},{b.endpoint}", "--tensor-split", "1,0")
    assert greedy(srv.url, 8)
    grown = a.rss_mib() - idle[0], b.rss_mib() - idle[1]
    assert grown[0] > 60 and grown[1] < grown[0] / 4, grown


def test_a_worker_killed_mid_stream_ends_it_and_the_engine_waits_for_it(start_hearth, workers):
    a, b = workers(), workers()
    srv = start_hearth("--rpc", f"{a.endpoint},{b.endpoint}")
    expected = greedy(srv.url)
    s = RawStream(srv.url, "/v1/chat/completions", chat("Write a long story about a lighthouse keeper.", 400))
    wait_for(lambda: len(s.data()) >= 5, what="five chunks")
    b.kill()
    assert s.done.wait(30), s.lines[-3:]
    gap, kind = error_ending("chat", s)
    assert gap < 2.0, gap
    assert kind in ("server_error", "api_error"), kind
    # The restarted engine waits for the worker and says so.
    def waiting() -> bool:
        status, body = health(srv.url)
        return status == 503 and f"waiting for RPC worker {b.endpoint}" in body.get("error", "")
    wait_for(waiting, timeout=30, what="/health to say it waits for the worker")
    # Requests meanwhile wait too, and are served once it is back.
    queued = RawStream(srv.url, "/v1/chat/completions", chat(ASK, 24))
    time.sleep(1)
    assert not queued.done.is_set()
    workers(b.port)
    wait_for(lambda: health(srv.url)[0] == 200, timeout=60, what="/health to be 200 again")
    assert queued.done.wait(60)
    assert queued.lines[-1][1] == "data: [DONE]"
    assert greedy(srv.url) == expected
    assert metric(srv.url, "hearth_engine_restarts_total") == 1
    assert srv.proc.poll() is None


def test_an_unreachable_worker_is_refused_at_start(server_logs):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_")}
    t0 = time.monotonic()
    r = subprocess.run([str(HEARTH_BIN), "serve", "--port", "0", "--rpc", f"127.0.0.1:{port}",
                        "--rpc-wait-secs", "2"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"cannot reach RPC worker 127.0.0.1:{port}" in r.stderr, r.stderr[-2000:]
    assert time.monotonic() - t0 < 30
    bad = subprocess.run([str(HEARTH_BIN), "serve", "--rpc", "nohost"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr, bad.stderr
    bad = subprocess.run([str(HEARTH_BIN), "serve", "--tensor-split", "1,-2"], capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2 and "share" in bad.stderr, bad.stderr


def test_a_worker_off_loopback_warns(workers):
    w = workers(None, "--host", "0.0.0.0")
    time.sleep(0.5)
    assert "no authentication" in w.log.read_text()

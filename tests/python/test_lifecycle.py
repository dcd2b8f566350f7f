"""Starting, configuring and stopping the server process."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import threading
import time
from urllib.parse import urlsplit

import pytest

from conftest import HEARTH_BIN, HearthServer
from hearth_http import request


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_the_server(start_hearth, sig):
    srv: HearthServer = start_hearth()
    assert request("GET", srv.url + "/health").status == 200
    srv.proc.send_signal(sig)
    try:
        srv.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hearth still running 10 s after {sig.name}")


def test_sigterm_stops_the_server_mid_stall(start_hearth):
    """A stream stuck in a long stall must not hold the process up for longer
    than a short grace period (the 60 s stall must not be waited out)."""
    srv: HearthServer = start_hearth("--heartbeat-secs", "0.5", env={"HEARTH_FAULT": "decode_stall:60"})
    parts = urlsplit(srv.url)
    got_bytes = threading.Event()

    def stream() -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        body = {"model": "m", "max_tokens": 16, "stream": True,
                "messages": [{"role": "user", "content": "Tell me a long story."}]}
        try:
            conn.request("POST", "/v1/messages", json.dumps(body), {"content-type": "application/json"})
            resp = conn.getresponse()
            while resp.read1(4096):
                got_bytes.set()
        except (OSError, http.client.HTTPException):
            pass  # the server going away mid-stream is the point
        finally:
            conn.close()

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    assert got_bytes.wait(10), "the stream never started"
    time.sleep(2)  # well inside the stall now
    srv.proc.send_signal(signal.SIGTERM)
    try:
        srv.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail("hearth still running 15 s after SIGTERM while a request was stalled")


def test_flags_come_from_the_environment(start_hearth):
    srv: HearthServer = start_hearth(env={"HEARTH_MODEL_ALIAS": "alias-from-env"})
    data = request("GET", srv.url + "/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["alias-from-env"]


def test_missing_model_fails_cleanly(tmp_path):
    missing = tmp_path / "no-such-model.gguf"
    proc = subprocess.run(
        [str(HEARTH_BIN), "serve", "--port", "0", "--model", str(missing)],
        capture_output=True, timeout=60, text=True,
    )
    assert proc.returncode != 0
    assert "listening on" not in proc.stdout
    assert "panicked" not in proc.stderr, proc.stderr
    assert str(missing) in proc.stderr or "no-such-model" in proc.stderr, proc.stderr


def test_help_lists_the_serve_flags():
    out = subprocess.run([str(HEARTH_BIN), "serve", "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    for flag in ("--model", "--host", "--port", "--ctx", "--threads", "--batch",
                 "--heartbeat-secs", "--model-alias", "--chat-template", "--cors"):
        assert flag in out.stdout, f"{flag} missing from `hearth serve --help`"


def test_shutdown_ends_a_responses_stream_with_response_failed(start_hearth):
    """A Responses stream cut by shutdown ends with `response.failed`, the
    event its clients (Codex) read, not chat completions' error chunk."""
    srv: HearthServer = start_hearth("--heartbeat-secs", "0.5", "--shutdown-grace-secs", "1",
                                     env={"HEARTH_FAULT": "decode_stall:60"})
    parts = urlsplit(srv.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    body = {"model": "m", "input": "Tell me a long story.", "max_output_tokens": 16, "stream": True}
    conn.request("POST", "/v1/responses", json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    raw = b""
    while b"response.in_progress" not in raw:
        raw += resp.read1(4096)
    srv.proc.send_signal(signal.SIGTERM)
    while chunk := resp.read1(4096):
        raw += chunk
    conn.close()
    events = [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert events[-1]["type"] == "response.failed", events[-3:]
    assert events[-1]["response"]["status"] == "failed"
    assert events[-1]["response"]["error"]["message"]
    assert srv.proc.wait(timeout=15) == 0

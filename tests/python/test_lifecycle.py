"""Starting, configuring and stopping the server process."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import anthropic
import openai
import pytest

from conftest import HEARTH_BIN, HearthServer
from hearth_http import anthropic_client, openai_client, request


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_the_server(start_hearth, sig):
    srv: HearthServer = start_hearth()
    assert request("GET", srv.url + "/health").status == 200
    srv.proc.send_signal(sig)
    try:
        status = srv.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hearth still running 10 s after {sig.name}")
    assert status == 0, f"exit status {status} after {sig.name}"


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
        status = srv.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail("hearth still running 15 s after SIGTERM while a request was stalled")
    assert status == 0, f"exit status {status}"


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
    events = [json.loads(line[6:]) for line in raw.decode().split("\n") if line.startswith("data: ")]
    assert events[-1]["type"] == "response.failed", events[-3:]
    assert events[-1]["response"]["status"] == "failed"
    assert events[-1]["response"]["error"]["message"]
    assert srv.proc.wait(timeout=15) == 0


def wait_metric(url: str, line: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = request("GET", url + "/metrics").text
        if line in text.splitlines():
            return
        time.sleep(0.05)
    pytest.fail(f"/metrics never showed {line!r}:\n{text}")


def test_shutdown_answers_waiting_non_streaming_requests_503_and_529(start_hearth):
    """Past the grace period, requests still waiting for a whole response
    (one stalled in the engine, one queued behind it) get their protocol's
    retryable error, and the process exits 0."""
    srv: HearthServer = start_hearth("--shutdown-grace-secs", "1", env={"HEARTH_FAULT": "decode_stall:60"})
    oai, claude = openai_client(srv.url, 60), anthropic_client(srv.url, 60)
    errors: dict[str, Exception] = {}

    def call(name, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the error is the result
            errors[name] = e

    running = threading.Thread(target=call, args=("openai", lambda: oai.chat.completions.create(
        model="m", max_tokens=16, messages=[{"role": "user", "content": "Tell me a story."}])))
    running.start()
    wait_metric(srv.url, "hearth_sequences_running 1")
    queued = threading.Thread(target=call, args=("anthropic", lambda: claude.messages.create(
        model="m", max_tokens=16, messages=[{"role": "user", "content": "Say hi."}])))
    queued.start()
    wait_metric(srv.url, "hearth_requests_in_flight 2")
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    running.join(30)
    queued.join(30)
    status = srv.proc.wait(timeout=15)
    took = time.monotonic() - t0
    assert isinstance(errors.get("openai"), openai.InternalServerError), errors
    assert errors["openai"].status_code == 503
    assert errors["openai"].body["type"] == "server_error", errors["openai"].body
    assert isinstance(errors.get("anthropic"), anthropic.APIStatusError), errors
    assert errors["anthropic"].status_code == 529
    assert errors["anthropic"].body["error"]["type"] == "overloaded_error", errors["anthropic"].body
    assert status == 0, f"exit status {status}"
    assert took < 10, f"shutdown took {took:.1f} s with a 1 s grace period"


def snapshots(d: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in d.glob("*.kv")}


def has_text(raw: bytes) -> bool:
    """Whether the whole lines of a chat completions stream carry text."""
    for line in raw.split(b"\n")[:-1]:
        if line.startswith(b"data: {"):
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                return True
    return False


def test_second_signal_exits_130_without_saving(start_hearth, tmp_path):
    """One signal saves the KV cache on the way out and exits 0; a second
    one, during the grace period, exits 130 at once and saves nothing."""
    kv = tmp_path / "kv"
    # About 300 tokens: more than the disk cache's minimum, less than a
    # chunk, so nothing is saved before shutdown.
    prompt = " ".join(f"Item {i} is on shelf {i % 7}." for i in range(30)) + " Tell me a story."
    flags = ("--kv-disk-dir", str(kv), "--shutdown-grace-secs", "30", "--heartbeat-secs", "0.5")

    def stalled_stream(srv: HearthServer) -> http.client.HTTPConnection:
        parts = urlsplit(srv.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        body = {"model": "m", "max_tokens": 32, "stream": True, "messages": [{"role": "user", "content": prompt}]}
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        raw = b""
        # Until the first text: the prompt is in the KV, the stall holds
        # the fifth decode step.
        while not has_text(raw):
            raw += resp.read1(4096)
        return conn

    srv: HearthServer = start_hearth(*flags, env={"HEARTH_FAULT": "decode_stall:60"})
    conn = stalled_stream(srv)
    before = snapshots(kv)
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # draining, inside the 30 s grace period
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    status = srv.proc.wait(timeout=10)
    took = time.monotonic() - t0
    conn.close()
    assert status == 130, f"exit status {status} after a second signal"
    assert took < 3, f"the second signal took {took:.1f} s to end the process"
    assert snapshots(kv) == before, "the second signal still saved the KV cache"
    assert "second signal" in srv.log_path.read_text()

    # The same with one signal (and a short grace): the cache is saved.
    srv = start_hearth(*flags[:-4], "--shutdown-grace-secs", "1", env={"HEARTH_FAULT": "decode_stall:60"})
    conn = stalled_stream(srv)
    srv.proc.send_signal(signal.SIGTERM)
    status = srv.proc.wait(timeout=15)
    conn.close()
    assert status == 0, f"exit status {status}"
    assert len(snapshots(kv)) > len(before), "one signal did not save the KV cache"

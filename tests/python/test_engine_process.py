"""The engine in its own process: when it dies (an abort inside compute,
`HEARTH_FAULT=engine_abort:COUNT`, or a real `kill -9`), every stream in
flight ends with its protocol's error, queued requests wait and are
served by the restarted engine, `/health` says 503 and then 200 again; a
crash loop stops the restarts."""

from __future__ import annotations

import json
import os
import signal
import time

import anthropic
import openai
import pytest

from hearth_http import request
from test_parallel import RawStream, metric, slots

# A prompt long enough that its prefill takes a visible moment, so a
# second request can be queued behind it before the first one decodes.
LONG = "Here is a list of fruit: " + ", ".join(["apple", "pear", "plum", "fig"] * 60) + ". Name one."


def chat(text: str, max_tokens: int, stream: bool = True) -> dict:
    return {
        "model": "any",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


BODIES = {
    "chat": ("/v1/chat/completions", lambda text, n: chat(text, n)),
    "messages": (
        "/v1/messages",
        lambda text, n: {"model": "any", "max_tokens": n, "stream": True, "temperature": 0,
                         "messages": [{"role": "user", "content": text}]},
    ),
    "responses": (
        "/v1/responses",
        lambda text, n: {"model": "any", "input": text, "max_output_tokens": n, "stream": True, "temperature": 0},
    ),
}


def health(url: str) -> tuple[int, dict]:
    r = request("GET", url + "/health")
    return r.status, r.json()


def watch_recovery(url: str, timeout: float = 60) -> list[tuple[int, str]]:
    """Poll /health until it answers 200; the statuses and reasons seen."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = health(url)
        seen.append((status, body.get("error", "")))
        if status == 200:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"/health never came back: {seen[-3:]}")


def wait_for(cond, timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def error_ending(api: str, s: RawStream) -> tuple[float, str]:
    """When the stream's error ending arrived (seconds after the line
    before it), and its error type; the stream must end right there."""
    lines = [(t, l) for t, l in s.lines if l.startswith("data: ")]
    if api == "chat":
        assert lines[-1][1] == "data: [DONE]", lines[-3:]
        t, line = lines[-2]
        err = json.loads(line[6:])["error"]
        return t - lines[-3][0], err["type"]
    last = json.loads(lines[-1][1][6:])
    gap = lines[-1][0] - lines[-2][0]
    if api == "messages":
        assert last["type"] == "error", last
        return gap, last["error"]["type"]
    assert last["type"] == "response.failed", last
    return gap, last["response"]["error"]["code"]


@pytest.mark.parametrize("api", ["chat", "messages", "responses"])
def test_an_engine_abort_mid_stream_ends_it_and_the_queue_is_served(start_hearth, api):
    srv = start_hearth("--parallel", "1", env={"HEARTH_FAULT": "engine_abort:1"})
    status, body = health(srv.url)
    first_pid = body["engine_pid"]
    assert status == 200 and first_pid != srv.proc.pid
    path, make = BODIES[api]
    doomed = RawStream(srv.url, path, make(LONG, 48))
    # Queued behind it while it runs (its prompt prefilled or its first
    # tokens decoded: one prefill step can end between two polls): never
    # started when the engine dies, so it goes to the next engine process.
    wait_for(lambda: any(s["state"] in ("prefill", "decode") for s in slots(srv.url)["slots"]),
             what="the first request running")
    queued = RawStream(srv.url, "/v1/chat/completions", chat("Say hi.", 8))
    assert doomed.done.wait(60), doomed.lines[-3:]
    seen = watch_recovery(srv.url)
    gap, kind = error_ending(api, doomed)
    # The error ending comes as soon as the death is seen, not after a
    # timeout (the bound is generous: this machine is noisy).
    assert gap < 2.0, gap
    assert kind in ("server_error", "overloaded_error", "api_error"), kind
    assert seen[0][0] == 503 and "signal 6" in seen[0][1], seen[:2]
    assert queued.done.wait(60)
    assert queued.data()[-1]["choices"][0]["finish_reason"] in ("stop", "length"), queued.lines[-3:]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in queued.data() if c["choices"])
    status, body = health(srv.url)
    assert body["engine_pid"] != first_pid
    ok = request("POST", srv.url + "/v1/chat/completions", chat("Say hi.", 8, stream=False))
    assert ok.status == 200, ok.text
    assert metric(srv.url, "hearth_engine_restarts_total") == 1
    assert srv.proc.poll() is None


def test_kill_9_of_the_engine_process_mid_stream(start_hearth):
    srv = start_hearth("--parallel", "2")
    pid = health(srv.url)[1]["engine_pid"]
    s = RawStream(srv.url, "/v1/chat/completions", chat("Write a long story about a lighthouse keeper.", 400))
    wait_for(lambda: len(s.data()) >= 5, what="five chunks")
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    assert s.done.wait(30)
    errors = [line for _, line in s.lines if line.startswith('data: {"error"')]
    assert errors and "signal 9" in errors[0], s.lines[-3:]
    assert s.lines[-1][1] == "data: [DONE]"
    # The error ending within a second of the death.
    error_at = next(t for t, line in s.lines if line.startswith('data: {"error"'))
    assert error_at - killed < 1.0, error_at - killed
    seen = watch_recovery(srv.url)
    assert seen[0][0] == 503 and "restarting" in seen[0][1], seen[:2]
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    again = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Say hi."}],
                                           max_tokens=8, temperature=0)
    assert again.choices[0].message.content
    assert health(srv.url)[1]["engine_pid"] != pid


def test_a_non_streaming_request_gets_its_apis_overloaded_status(start_hearth):
    srv = start_hearth("--parallel", "1", env={"HEARTH_FAULT": "engine_abort:2"})
    client = anthropic.Anthropic(base_url=srv.url, api_key="unused", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as err:
        client.messages.create(model="any", max_tokens=32, messages=[{"role": "user", "content": "Count to ten."}],
                               extra_body={"temperature": 0})
    assert err.value.status_code == 529
    assert err.value.body["error"]["type"] == "overloaded_error"
    watch_recovery(srv.url)
    oa = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIStatusError) as err:
        oa.chat.completions.create(model="any", messages=[{"role": "user", "content": "Count to ten."}],
                                   max_tokens=32, temperature=0)
    assert err.value.status_code == 503
    watch_recovery(srv.url)
    ok = oa.chat.completions.create(model="any", messages=[{"role": "user", "content": "Say hi."}],
                                    max_tokens=8, temperature=0)
    assert ok.choices[0].message.content


def test_a_crash_loop_stops_the_restarts(start_hearth):
    srv = start_hearth("--parallel", "1", env={"HEARTH_FAULT": "engine_abort"})
    for _ in range(3):
        r = request("POST", srv.url + "/v1/chat/completions", chat("Count to ten.", 32, stream=False))
        assert r.status == 503, r.text
        if health(srv.url)[0] == 503 and "not restarted" in health(srv.url)[1]["error"]:
            break
        watch_recovery(srv.url)
    time.sleep(1.0)
    status, body = health(srv.url)
    assert status == 503 and "not restarted" in body["error"], body
    assert metric(srv.url, "hearth_engine_up") == 0
    started = time.monotonic()
    r = request("POST", srv.url + "/v1/chat/completions", chat("Say hi.", 8, stream=False))
    assert r.status == 503 and time.monotonic() - started < 5, r.text
    # The server itself is still up and stops cleanly.
    assert srv.stop() == 0


def test_a_panicking_engine_thread_restarts_the_process(start_hearth):
    srv = start_hearth("--parallel", "2", env={"HEARTH_FAULT": "engine_panic:1"})
    s = RawStream(srv.url, "/v1/chat/completions", chat("Say hi.", 8))
    assert s.done.wait(30)
    assert any(line.startswith('data: {"error"') for _, line in s.lines), s.lines
    watch_recovery(srv.url)
    ok = request("POST", srv.url + "/v1/chat/completions", chat("Say hi.", 8, stream=False))
    assert ok.status == 200, ok.text

"""Many agents at once: several sequences decoded in one batch, shared
prefixes, forked choices, cancellation, stalls and a full KV, through the
official SDKs and raw streams against the real binary and model."""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import anthropic
import openai

from hearth_http import request


def metric(url: str, name: str) -> float:
    text = request("GET", url + "/metrics").text
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def slots(url: str) -> dict:
    return request("GET", url + "/slots").json()


class RawStream:
    """One streaming request on its own connection, read line by line in a
    thread, recording when each line arrived."""

    def __init__(self, url: str, path: str, body: dict, headers: dict | None = None):
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        self.conn.request("POST", path, body=json.dumps(body), headers={"content-type": "application/json", **(headers or {})})
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200, self.resp.read()
        self.lines: list[tuple[float, str]] = []
        self.started = time.monotonic()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while True:
                line = self.resp.readline()
                if not line:
                    break
                text = line.decode("utf-8", "replace").rstrip("\r\n")
                if text:
                    self.lines.append((time.monotonic(), text))
        except (OSError, ValueError, AttributeError, http.client.HTTPException):
            # The test closed the connection (a client that leaves).
            pass
        finally:
            self.done.set()

    def close(self) -> None:
        self.conn.sock.shutdown(2)
        self.conn.close()

    def data(self) -> list[dict]:
        out = []
        for _, line in self.lines:
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]))
        return out

    def text(self) -> str:
        return "".join((c["choices"][0]["delta"].get("content") or "") for c in self.data() if c.get("choices"))

    def max_silence(self) -> float:
        times = [self.started] + [t for t, _ in self.lines]
        return max(b - a for a, b in zip(times, times[1:]))


def chat_body(content: str, max_tokens: int, **extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, **extra}


def test_four_clients_of_both_sdks_are_decoded_together(start_hearth):
    srv = start_hearth("--parallel", "4")
    oa = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    an = anthropic.Anthropic(base_url=srv.url, api_key="x", max_retries=0)
    ask = "Write a long story about a lighthouse keeper and the sea, with many details."
    n = 48

    def openai_stream():
        chunks = list(oa.chat.completions.create(model="m", messages=[{"role": "user", "content": ask}], max_tokens=n,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens

    def openai_plain():
        r = oa.chat.completions.create(model="m", messages=[{"role": "user", "content": ask + " Begin."}], max_tokens=n, temperature=0)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        return r.choices[0].message.content, r.usage.prompt_tokens, r.usage.completion_tokens

    def anthropic_stream():
        with an.messages.stream(model="m", max_tokens=n, messages=[{"role": "user", "content": ask + " Now."}]) as s:
            text = "".join(s.text_stream)
            final = s.get_final_message()
        usage = final.usage
        return text, usage.input_tokens + (usage.cache_read_input_tokens or 0), usage.output_tokens

    def anthropic_plain():
        r = an.messages.create(model="m", max_tokens=n, messages=[{"role": "user", "content": ask + " Go."}])
        return r.content[0].text, r.usage.input_tokens + (r.usage.cache_read_input_tokens or 0), r.usage.output_tokens

    before = metric(srv.url, "hearth_engine_multi_sequence_steps_total")
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(f) for f in (openai_stream, openai_plain, anthropic_stream, anthropic_plain)]
        results = [f.result(timeout=120) for f in futures]
    for text, prompt_tokens, completion_tokens in results:
        assert text.strip()
        assert prompt_tokens > 10
        assert 0 < completion_tokens <= n
    shared = metric(srv.url, "hearth_engine_multi_sequence_steps_total") - before
    assert shared >= n // 2, f"only {shared} steps held more than one sequence"
    assert metric(srv.url, "hearth_sequences_running") == 0


def test_a_client_that_leaves_frees_its_sequence_and_the_others_finish(start_hearth):
    srv = start_hearth("--parallel", "4", "--heartbeat-secs", "1")
    streams = [RawStream(srv.url, "/v1/chat/completions", chat_body(f"Count slowly from {k} to 900, one number per line.", 200))
               for k in range(4)]
    deadline = time.monotonic() + 60
    while not all(s.text() for s in streams):
        assert time.monotonic() < deadline, "the streams did not start"
        time.sleep(0.05)
    assert sum(1 for s in slots(srv.url)["slots"] if s["state"] == "decode") == 4
    streams[1].close()
    left = time.monotonic()
    while sum(1 for s in slots(srv.url)["slots"] if s["state"] == "decode") > 3:
        assert time.monotonic() - left < 1.0, "the leaving client's sequence was not freed within a second"
        time.sleep(0.02)
    for k in (0, 2, 3):
        assert streams[k].done.wait(120)
        assert streams[k].lines[-1][1] == "data: [DONE]"
        finishes = [c["choices"][0]["finish_reason"] for c in streams[k].data() if c.get("choices")]
        assert finishes[-1] in ("stop", "length")
    assert metric(srv.url, "hearth_engine_failed_steps_total") == 0


def test_a_second_agent_copies_the_running_agents_prefix(start_hearth, tmp_path):
    srv = start_hearth("--parallel", "4")
    system = "You are a careful assistant for a software team. " + " ".join(
        f"Rule {i}: keep answers short, cite file names, and never invent APIs." for i in range(60))
    first = RawStream(srv.url, "/v1/chat/completions", {
        "model": "m", "stream": True, "max_tokens": 300, "temperature": 0,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Describe the rules at length."}]})
    deadline = time.monotonic() + 60
    while not first.text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    second = {"model": "m", "max_tokens": 8, "temperature": 0,
              "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Say hi."}]}
    a = request("POST", srv.url + "/tokenize", {"messages": first_messages(system, "Describe the rules at length.")}).json()["tokens"]
    b = request("POST", srv.url + "/tokenize", {"messages": second["messages"]}).json()["tokens"]
    common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    assert common > 600
    r = request("POST", srv.url + "/v1/chat/completions", second)
    assert r.status == 200, r.text
    cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert not first.done.is_set(), "the first agent should still be decoding"
    assert cached >= common - 1, (cached, common)
    assert metric(srv.url, "hearth_prefix_shared_tokens_total") >= common - 1
    first.close()


def first_messages(system: str, user: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def test_n_choices_are_one_prefill_forked(start_hearth):
    srv = start_hearth("--parallel", "4")
    oa = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    long_ask = "Tell me three different facts about owls. " * 20
    r = oa.chat.completions.create(model="m", messages=[{"role": "user", "content": long_ask}], max_tokens=24, n=3,
                                   temperature=1.0, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content for c in r.choices)
    assert r.usage.completion_tokens <= 3 * 24
    log = srv.log_path.read_text()
    assert log.count("forked from the prefilled prompt") == 2
    # The prompt was computed once: one prefix decision, one prefill.
    assert log.count("prefix: KV best") == 1
    # Streamed: three choices, each closed with its own finish reason.
    chunks = list(oa.chat.completions.create(model="m", messages=[{"role": "user", "content": long_ask + "Again."}],
                                             max_tokens=16, n=3, temperature=1.0, seed=9, stream=True))
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1, 2}
    assert srv.log_path.read_text().count("forked from the prefilled prompt") == 4


def test_a_prefill_stall_keeps_every_stream_of_the_batch_alive(start_hearth):
    srv = start_hearth("--parallel", "4", "--heartbeat-secs", "1", env={"HEARTH_FAULT": "prefill_stall:4:1"})
    streams = [RawStream(srv.url, "/v1/chat/completions", chat_body(f"Name {k + 3} colours.", 24)) for k in range(4)]
    for s in streams:
        assert s.done.wait(120)
        assert s.lines[-1][1] == "data: [DONE]"
        assert s.max_silence() < 2.0, f"silent for {s.max_silence():.2f} s"
    # The stall really happened, and the streams heard heartbeats through it.
    assert max(t for t, _ in streams[0].lines) - streams[0].started >= 4.0
    assert all(any(line == ": keepalive" for _, line in s.lines) for s in streams)


def test_more_requests_than_the_kv_holds_all_complete(start_hearth):
    srv = start_hearth("--parallel", "4", "--ctx", "1024", "--kv-size", "1024", "--heartbeat-secs", "0.5",
                       "--cache-ram-mb", "64")
    topics = ["the ocean", "mountains", "a city at night", "an old library"]
    streams = []
    for k, topic in enumerate(topics):
        context = " ".join(f"Note {k}.{i}: {topic} matters for reason {i}." for i in range(40))
        streams.append(RawStream(srv.url, "/v1/chat/completions",
                                 chat_body(context + f" Write a long essay about {topic}.", 300, stream_options={"include_usage": True})))
    crowded = False
    while not all(s.done.is_set() for s in streams):
        st = slots(srv.url)
        assert st["kv_used"] <= st["kv_cells"]
        crowded |= st["waiting"] > 0 or bool(st["preempted"])
        time.sleep(0.05)
    assert crowded, "every request fit at once: the test did not fill the KV"
    for s in streams:
        assert s.lines[-1][1] == "data: [DONE]"
        assert not any('"error"' in line for _, line in s.lines)
        usage = s.data()[-1]["usage"]
        assert usage["completion_tokens"] > 0
        assert s.max_silence() < 1.5, f"silent for {s.max_silence():.2f} s"
    assert metric(srv.url, "hearth_engine_failed_steps_total") == 0


def test_a_panicking_step_fails_its_requests_and_the_engine_goes_on(start_hearth):
    srv = start_hearth("--parallel", "4", env={"HEARTH_FAULT": "step_panic:1"})
    streams = [RawStream(srv.url, "/v1/chat/completions", chat_body(f"List {k + 5} animals.", 32)) for k in range(2)]
    for s in streams:
        assert s.done.wait(60)
    # The first request's step panicked: its stream ends with the protocol's
    # error event, then [DONE]; it is not torn.
    errors = [json.loads(line[6:]) for _, line in streams[0].lines if line.startswith('data: {"error"')]
    assert errors and errors[0]["error"]["type"], streams[0].lines[-3:]
    assert streams[0].lines[-1][1] == "data: [DONE]"
    assert metric(srv.url, "hearth_engine_failed_steps_total") == 1
    # The other request's rows were fine: it finishes.
    assert streams[1].data()[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    # The engine carries on.
    r = request("POST", srv.url + "/v1/chat/completions", {**chat_body("Say hi.", 8), "stream": False})
    assert r.status == 200, r.text
    assert request("GET", srv.url + "/health").status == 200


def test_health_says_when_the_engine_is_gone(start_hearth):
    # In one process: with the engine in a child process of its own, the
    # supervisor starts it again instead (test_engine_process.py).
    srv = start_hearth("--parallel", "2", "--engine-in-process", env={"HEARTH_FAULT": "engine_panic"})
    assert request("GET", srv.url + "/health").status == 200
    s = RawStream(srv.url, "/v1/chat/completions", chat_body("Say hi.", 8))
    assert s.done.wait(30)
    assert any(line.startswith('data: {"error"') for _, line in s.lines), s.lines
    h = request("GET", srv.url + "/health")
    assert h.status == 503, h.text
    assert "engine" in h.json()["error"]
    assert metric(srv.url, "hearth_engine_up") == 0

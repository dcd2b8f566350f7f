"""An engine error fails its request in the protocol's shape and leaves the
engine usable. The error is injected inside llama.cpp's compute
(`HEARTH_FAULT=decode_error:COUNT` aborts the fifth decode step)."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import anthropic
import openai
import pytest

MESSAGES = [{"role": "user", "content": "Count from one to twenty in words."}]


def test_openai_non_streaming_failure_is_a_500_then_the_engine_serves_again(start_hearth):
    srv = start_hearth(env={"HEARTH_FAULT": "decode_error:1"})
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model="any", messages=MESSAGES, max_tokens=16, temperature=0)
    assert err.value.body["type"] == "server_error"
    ok = client.chat.completions.create(model="any", messages=MESSAGES, max_tokens=16, temperature=0)
    assert ok.choices[0].message.content


def test_anthropic_stream_ends_with_an_error_event_then_the_engine_serves_again(start_hearth):
    srv = start_hearth(env={"HEARTH_FAULT": "decode_error:1"})
    body = {"model": "any", "max_tokens": 16, "stream": True, "temperature": 0, "messages": MESSAGES}
    events = []
    url = urlsplit(srv.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("POST", "/v1/messages", json.dumps(body), {"content-type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    name = None
    for raw in r:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
    conn.close()
    names = [n for n, _ in events]
    assert names[0] == "message_start"
    assert names[-1] == "error", names
    assert events[-1][1]["error"]["type"] == "api_error"
    assert "message_stop" not in names
    client = anthropic.Anthropic(base_url=srv.url, api_key="unused", max_retries=0)
    ok = client.messages.create(model="any", max_tokens=16, messages=MESSAGES, extra_body={"temperature": 0})
    assert ok.stop_reason in ("end_turn", "max_tokens") and ok.content[0].text

"""Raw HTTP for the tests that must send what an SDK would refuse to send
(malformed JSON, wrong types) and look at the exact status and body."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import jsonschema

# The error body of OpenAI's API: every field present, param/code may be null.
OPENAI_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string", "minLength": 1},
                "type": {"type": "string", "minLength": 1},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

# The error body of Anthropic's API.
ANTHROPIC_ERROR_SCHEMA = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {
                "type": {"type": "string"},
                "message": {"type": "string", "minLength": 1},
            },
        },
    },
}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


def request(method: str, url: str, body: bytes | str | dict | list | None = None,
            headers: dict[str, str] | None = None, timeout: float = 60.0) -> Reply:
    """One request on a fresh connection; `body` as bytes/str is sent verbatim."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    if isinstance(body, (dict, list)):
        data: bytes | None = json.dumps(body).encode()
    elif isinstance(body, str):
        data = body.encode()
    else:
        data = body
    hdrs = {"content-type": "application/json"} if data is not None else {}
    hdrs.update(headers or {})
    try:
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body=data, headers=hdrs)
        resp = conn.getresponse()
        text = resp.read().decode("utf-8", "replace")
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, text)
    finally:
        conn.close()


def post(url: str, body: bytes | str | dict | list, headers: dict[str, str] | None = None) -> Reply:
    return request("POST", url, body, headers)


def assert_client_error(reply: Reply, schema: dict, status: int | None = 400) -> dict:
    """A 4xx (exactly `status` when given) whose JSON body matches `schema`."""
    assert reply.status != 500, f"a client mistake got a 500: {reply.text[:500]}"
    if status is not None:
        assert reply.status == status, f"expected {status}, got {reply.status}: {reply.text[:500]}"
    else:
        assert 400 <= reply.status < 500, f"expected a 4xx, got {reply.status}: {reply.text[:500]}"
    assert reply.headers.get("content-type", "").startswith("application/json"), reply.headers
    body = reply.json()
    jsonschema.validate(body, schema)
    return body


def openai_client(url: str, timeout: float = 120):
    """The official OpenAI SDK pointed at a hearth URL, with no retries."""
    import openai
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=timeout)


def anthropic_client(url: str, timeout: float = 120):
    """The official Anthropic SDK pointed at a hearth URL, with no retries."""
    import anthropic
    return anthropic.Anthropic(base_url=url, api_key="x", max_retries=0, timeout=timeout)

"""OpenAI `response_format`: `json_object` and strict `json_schema` answers
are made valid by a grammar; unusable schemas are the client's mistake (400)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from hearth_http import OPENAI_ERROR_SCHEMA, assert_client_error, post, openai_client

MODEL = "any-model-name"
ASK = [{"role": "user", "content": "Describe a person called Ada, aged 36, as JSON."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "languages": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "role": {"type": "string", "enum": ["engineer", "artist", "other"]},
    },
    "required": ["name", "age", "languages", "role"],
    "additionalProperties": False,
}
STRICT = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}}


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai_client(base_url, 120)


def chat(client: openai.OpenAI, **kw):
    args = {"model": MODEL, "messages": ASK, "max_tokens": 96, "temperature": 0}
    args.update(kw)
    return client.chat.completions.create(**args)


def test_json_schema_answer_validates(client: openai.OpenAI):
    r = chat(client, response_format=STRICT)
    c = r.choices[0]
    assert c.finish_reason == "stop", f"the grammar ends the answer with the object: {c.message.content!r}"
    assert not c.message.tool_calls
    jsonschema.validate(json.loads(c.message.content), PERSON)


def test_json_schema_answer_streamed_equals_non_streamed(client: openai.OpenAI):
    chat(client, response_format=STRICT)
    whole = chat(client, response_format=STRICT).choices[0].message.content
    chunks = list(chat(client, response_format=STRICT, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object_answer_parses(client: openai.OpenAI):
    r = chat(client, response_format={"type": "json_object"},
             messages=[{"role": "user", "content": "Reply with a JSON object with one key, ok, set to true."}])
    c = r.choices[0]
    if c.finish_reason == "stop":
        assert isinstance(json.loads(c.message.content), dict)
    else:
        # Cut short by max_tokens: still the start of an object.
        assert c.message.content.lstrip().startswith("{")


def test_json_schema_with_tools_and_tool_choice_none(client: openai.OpenAI):
    """Tools offered but not to be called: the answer follows the schema."""
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    r = chat(client, response_format=STRICT, tools=tools, tool_choice="none")
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_text_format_is_plain(client: openai.OpenAI):
    chat(client, max_tokens=12)
    # Repeats of one prompt are computed alike (as on a cold start); the
    # first may have reused part of an earlier prompt.
    plain = chat(client, max_tokens=12)
    text = chat(client, max_tokens=12, response_format={"type": "text"})
    assert text.choices[0].message.content == plain.choices[0].message.content


BAD_FORMATS = {
    "type a number": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 12}}},
    "unresolvable ref": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}},
    "schema not an object": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1, 2]}},
    "schema missing": {"type": "json_schema", "json_schema": {"name": "x"}},
    "unknown type": {"type": "yaml"},
}


@pytest.mark.parametrize("fmt", BAD_FORMATS.values(), ids=BAD_FORMATS.keys())
@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_bad_response_format_is_400(base_url: str, fmt, stream: bool):
    reply = post(base_url + "/v1/chat/completions",
                 {"model": MODEL, "messages": ASK, "max_tokens": 4, "response_format": fmt, "stream": stream})
    err = assert_client_error(reply, OPENAI_ERROR_SCHEMA)
    assert err["error"]["type"] == "invalid_request_error"
    assert err["error"]["param"].startswith("response_format"), err


def test_sdk_raises_bad_request_for_a_bad_schema(client: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, response_format=BAD_FORMATS["type a number"])
    assert info.value.status_code == 400

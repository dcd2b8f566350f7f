"""README's per-route field table, checked against the server: every field
of it is sent to every route it has a cell for. `honoured` fields are
taken (200), and the sampling ones change a reply where they should;
`ignored` fields leave the greedy reply exactly as it is; `refused` fields
get a 400 in the route's error shape naming the field. Raw HTTP: the SDKs
cannot send most of these fields."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hearth_http import ANTHROPIC_ERROR_SCHEMA, OPENAI_ERROR_SCHEMA, assert_client_error, post

README = Path(__file__).resolve().parents[2] / "README.md"
ROUTES = ("chat", "completions", "responses", "messages")
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions",
         "responses": "/v1/responses", "messages": "/v1/messages"}
PROMPT = "Write the word hello fifty times, separated by spaces."
# SmolLM2's template, so the legacy route continues the same conversation.
RAW_PROMPT = f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
MAX = 6
# Long enough for the reply to repeat itself, for the penalties.
LONG = 16
DROP = object()


def readme_table() -> dict[str, dict[str, str]]:
    """{field: {route: cell}} from the tables under "Fields, route by route"."""
    text = README.read_text("utf-8")
    section = text.split("## Fields, route by route", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, dict[str, str]] = {}
    for line in section.splitlines():
        m = re.match(r"\| `([a-z_]+)` \|(.*)\|\s*$", line)
        if m:
            cells = [c.strip() for c in m.group(2).split("|")]
            assert m.group(1) not in rows, f"{m.group(1)} is listed twice"
            rows[m.group(1)] = dict(zip(ROUTES, cells[:4]))
    return rows


TABLE = readme_table()
CELLS = [(f, r, c) for f, row in TABLE.items() for r, c in row.items() if c != "·"]


def limit(route: str, n: int) -> dict:
    return {"max_output_tokens" if route == "responses" else "max_tokens": n}


def base(route: str) -> dict:
    if route == "chat":
        return {"model": "m", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX, "temperature": 0}
    if route == "completions":
        return {"model": "m", "prompt": RAW_PROMPT, "max_tokens": MAX, "temperature": 0}
    if route == "responses":
        return {"model": "m", "input": PROMPT, "max_output_tokens": MAX, "temperature": 0}
    return {"model": "m", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX, "temperature": 0}


def send(url: str, route: str, extra: dict):
    body = {**base(route), **extra}
    return post(url + PATHS[route], {k: v for k, v in body.items() if v is not DROP})


def text_of(route: str, reply) -> str:
    assert reply.status == 200, reply.text[:500]
    j = reply.json()
    if route == "chat":
        return j["choices"][0]["message"]["content"]
    if route == "completions":
        return j["choices"][0]["text"]
    if route == "responses":
        return "".join(c["text"] for o in j["output"] if o["type"] == "message" for c in o["content"])
    return "".join(b["text"] for b in j["content"] if b["type"] == "text")


# The value each field is sent with to check its cell (per route where the
# shapes differ). Refused fields get a value that asks for something.
VALUES: dict[str, object] = {
    "temperature": 1.0, "top_p": 0.01, "top_k": 1, "min_p": 0.99, "typical_p": 0.01, "seed": 8,
    "frequency_penalty": 2, "presence_penalty": 2, "repeat_penalty": 1.5, "repeat_last_n": 0,
    "ignore_eos": True,
    "dry_multiplier": 0.8, "xtc_probability": 0.5, "mirostat": 2, "top_n_sigma": 1.0,
    "dynatemp_range": 0.5, "min_keep": 5, "samplers": ["top_k", "temperature"], "n_probs": 3,
    "post_sampling_probs": True, "grammar": 'root ::= "a"', "json_schema": {"type": "object"},
    "n_predict": 4, "t_max_predict_ms": 100, "n_indent": 2, "lora": [{"id": 0, "scale": 1.0}],
    "dry_base": 2.5, "xtc_threshold": 0.2, "mirostat_tau": 4.0, "dynatemp_exponent": 2.0,
    "cache_prompt": False, "penalize_nl": True,
    "model": "another-model-name", "max_tokens": 3, "max_completion_tokens": 3, "max_output_tokens": 3,
    "stop": ["l"], "stop_sequences": ["l"], "n": 2, "stream": True,
    "stream_options": {"include_usage": True}, "echo": True, "best_of": 2, "suffix": "the end",
    "response_format": {"type": "json_object"}, "text": {"format": {"type": "text"}, "verbosity": "low"},
    "output_config": {"effort": "low"}, "reasoning_effort": "low", "reasoning": {"effort": "low"},
    "thinking": {"type": "disabled"}, "instructions": "Be brief.", "truncation": "auto",
    "store": False, "include": ["reasoning.encrypted_content"], "background": True,
    "conversation": "conv_123", "max_tool_calls": 1,
    "functions": [{"name": "f", "parameters": {"type": "object"}}], "function_call": "auto",
    "audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"],
    "web_search_options": {}, "mcp_servers": [{"type": "url", "url": "http://127.0.0.1:9", "name": "x"}],
    "container": "container_123", "prediction": {"type": "content", "content": "hello hello"},
    "verbosity": "low", "user": "user-1", "safety_identifier": "user-1", "metadata": {"k": "v"},
    "service_tier": "flex", "prompt_cache_key": "key-1", "system": "Be brief.",
    "parallel_tool_calls": False,
}
ROUTE_VALUES: dict[tuple[str, str], object] = {
    ("logprobs", "chat"): True, ("logprobs", "completions"): 2,
    ("top_logprobs", "chat"): 2, ("top_logprobs", "responses"): 3,
    ("prompt", "responses"): {"id": "pmpt_123"},
    ("tools", "chat"): [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    ("tools", "responses"): [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
    ("tools", "messages"): [{"name": "f", "input_schema": {"type": "object"}}],
    ("tool_choice", "chat"): "none", ("tool_choice", "responses"): "none",
    ("tool_choice", "messages"): {"type": "none"},
}
# Fields every request of the route already carries: its cell is checked
# by every other row.
IN_BASE = {("messages", "chat"), ("messages", "messages"), ("prompt", "completions"),
           ("input", "responses")}
# Honoured fields that must change a reply: (extra fields of the reference
# request, extra fields of the probe beside the field itself). Sampling
# fields that act only when sampling are probed on a seeded sampled reply.
SAMPLED = {"temperature": 1.0, "seed": 7}
PENALISED = {"long": True}
PROBES: dict[str, dict] = {
    "temperature": {"seed": 7}, "top_p": SAMPLED, "top_k": SAMPLED, "min_p": SAMPLED,
    "typical_p": SAMPLED, "seed": SAMPLED, "logit_bias": {}, "frequency_penalty": PENALISED,
    "presence_penalty": PENALISED, "repeat_penalty": PENALISED,
    "repeat_last_n": {"long": True, "repeat_penalty": 1.5},
    "max_tokens": {}, "max_completion_tokens": {}, "max_output_tokens": {}, "stop": {},
    "stop_sequences": {},
}
# Fields a field needs beside it.
COMPANIONS = {("top_logprobs", "chat"): {"logprobs": True}}


@pytest.fixture(scope="module")
def url(base_url: str) -> str:
    return base_url


@pytest.fixture(scope="module")
def banana(url: str) -> int:
    r = post(url + "/tokenize", {"content": " banana"})
    assert r.status == 200, r.text
    (token,) = r.json()["tokens"]
    return token


@pytest.fixture(scope="module")
def references(url: str) -> dict:
    """Each route's greedy reply, computed twice: the first time may reuse a
    prefix another test left (README: batch rounding); repeats are exact."""
    out = {}
    for route in ROUTES:
        send(url, route, {})
        out[route] = text_of(route, send(url, route, {}))
        assert out[route].strip(), route
    return out


def value_for(field: str, route: str, url: str, banana: int):
    if field == "logit_bias":
        return {str(banana): 100}
    if field == "previous_response_id":
        r = send(url, "responses", {})
        return r.json()["id"]
    return ROUTE_VALUES.get((field, route), VALUES.get(field, DROP))


def test_the_table_lists_what_the_code_refuses():
    """Every field the server refuses on every route is a `refused` row
    with four refused cells, and the table has no stray cell values."""
    src = (Path(__file__).resolve().parents[2] / "src/api/sampling.rs").read_text("utf-8")
    block = src.split("pub const LLAMA_SERVER_REFUSED", 1)[1].split("];", 1)[0]
    for name in re.findall(r'refused\("([a-z_]+)"', block):
        assert TABLE.get(name) == dict.fromkeys(ROUTES, "refused"), name
    for field, row in TABLE.items():
        assert set(row.values()) <= {"honoured", "ignored", "refused", "·"}, (field, row)
        assert len(row) == 4, field


@pytest.mark.parametrize("field,route,cell", CELLS, ids=[f"{r}-{f}" for f, r, _ in CELLS])
def test_field_cell(url: str, references: dict, banana: int, field: str, route: str, cell: str):
    if (field, route) in IN_BASE:
        return
    value = value_for(field, route, url, banana)
    assert value is not DROP, f"no test value for {field}"
    extra = {**COMPANIONS.get((field, route), {}), field: value}
    if cell == "honoured" and field in PROBES:
        ref_extra = dict(PROBES[field])
        if ref_extra.pop("long", False):
            ref_extra.update(limit(route, LONG))
        reference = references[route] if not ref_extra else text_of(route, send(url, route, ref_extra))
        probed = text_of(route, send(url, route, {**ref_extra, **extra}))
        assert probed != reference, f"{field}={json.dumps(value)} left the reply as it was: {probed!r}"
        return
    if cell == "honoured":
        # Taken is all there is to see here (their effects have tests of
        # their own): one token will do.
        extra = {**limit(route, 1), **extra}
    reply = send(url, route, extra)
    if cell == "refused":
        schema = ANTHROPIC_ERROR_SCHEMA if route == "messages" else OPENAI_ERROR_SCHEMA
        err = assert_client_error(reply, schema)
        if route == "messages":
            assert field in err["error"]["message"], err
        else:
            assert err["error"]["param"] == field, err
        return
    assert reply.status == 200, f"{field} on {route}: {reply.text[:500]}"
    if field == "stream":
        assert "data:" in reply.text
    elif cell == "ignored":
        assert text_of(route, reply) == references[route], f"{field} changed the reply"


@pytest.mark.parametrize("route", ROUTES)
def test_ignore_eos_runs_to_the_limit(url: str, route: str):
    """A reply that ends by itself goes on to the token limit with
    `ignore_eos` (llama-server's, for fixed-length replies)."""
    short = {"chat": {"messages": [{"role": "user", "content": "Say OK."}]},
             "completions": {"prompt": "<|im_start|>user\nSay OK.<|im_end|>\n<|im_start|>assistant\n"},
             "responses": {"input": "Say OK."},
             "messages": {"messages": [{"role": "user", "content": "Say OK."}]}}[route]
    limit = {"max_output_tokens": 48} if route == "responses" else {"max_tokens": 48}

    def used(reply) -> int:
        assert reply.status == 200, reply.text
        u = reply.json()["usage"]
        return u.get("completion_tokens", u.get("output_tokens"))

    assert used(send(url, route, {**short, **limit})) < 48
    assert used(send(url, route, {**short, **limit, "ignore_eos": True})) == 48

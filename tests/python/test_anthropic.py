"""Anthropic Messages, through the official `anthropic` SDK and raw HTTP."""

from __future__ import annotations

import json
import time
from pathlib import Path

import anthropic
import pytest

from hearth_http import ANTHROPIC_ERROR_SCHEMA, assert_client_error, post, request, anthropic_client

MODEL = "any-model-name"
STORY = [{"role": "user", "content": "Write a short story about a cat who learns to sail."}]
LONG_TEXT = " ".join(f"Sentence number {i} describes the quiet harbour at dawn." for i in range(400))
# The SDK has no temperature argument of its own; it travels in the body.
GREEDY = {"temperature": 0}
HEADERS = {"anthropic-version": "2023-06-01", "x-api-key": "x"}


def make_client(url: str) -> anthropic.Anthropic:
    return anthropic_client(url, 120)


@pytest.fixture(scope="module")
def client(base_url: str) -> anthropic.Anthropic:
    return make_client(base_url)


def create(client: anthropic.Anthropic, **kw):
    args = {"model": MODEL, "messages": STORY, "max_tokens": 24, "extra_body": GREEDY}
    args.update(kw)
    return client.messages.create(**args)


def prompt_tokens(usage) -> int:
    """The whole prompt: Anthropic's input_tokens leaves out cached tokens."""
    return usage.input_tokens + (usage.cache_read_input_tokens or 0) + (usage.cache_creation_input_tokens or 0)


def text_of(message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


def stream_events(client: anthropic.Anthropic, **kw) -> list:
    args = {"model": MODEL, "messages": STORY, "max_tokens": 24, "extra_body": GREEDY, "stream": True}
    args.update(kw)
    return list(client.messages.create(**args))


def streamed(client: anthropic.Anthropic, **kw):
    """Stream with the SDK's helper; returns (text, final message)."""
    args = {"model": MODEL, "messages": STORY, "max_tokens": 24, "extra_body": GREEDY}
    args.update(kw)
    with client.messages.stream(**args) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    return text, final


# --- generation --------------------------------------------------------------

def test_non_streaming_text(client: anthropic.Anthropic):
    m = create(client)
    assert m.type == "message"
    assert m.role == "assistant"
    assert m.id
    assert len(m.content) == 1 and m.content[0].type == "text"
    assert m.content[0].text.strip()
    assert m.stop_reason in ("end_turn", "max_tokens")
    assert m.usage.input_tokens >= 0
    assert prompt_tokens(m.usage) > 0
    assert 1 <= m.usage.output_tokens <= 24


def test_streaming_event_order(client: anthropic.Anthropic):
    events = [e for e in stream_events(client) if e.type != "ping"]
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start", kinds
    assert kinds[1] == "content_block_start", kinds
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"], kinds
    deltas = events[2:-3]
    assert deltas and all(e.type == "content_block_delta" for e in deltas), kinds
    assert all(e.delta.type == "text_delta" for e in deltas)
    assert events[1].content_block.type == "text"
    start = events[0].message
    assert start.role == "assistant" and prompt_tokens(start.usage) > 0
    delta = events[-2]
    assert delta.delta.stop_reason in ("end_turn", "max_tokens")
    assert 1 <= delta.usage.output_tokens <= 24
    assert "".join(e.delta.text for e in deltas).strip()


def test_stream_and_non_stream_agree(client: anthropic.Anthropic):
    m = create(client)
    text, final = streamed(client)
    assert text == text_of(m)
    assert text_of(final) == text_of(m)
    assert final.stop_reason == m.stop_reason
    assert prompt_tokens(final.usage) == prompt_tokens(m.usage)
    assert final.usage.output_tokens == m.usage.output_tokens


def test_greedy_is_repeatable(client: anthropic.Anthropic):
    a, b = create(client), create(client)
    assert text_of(a) == text_of(b)
    assert a.usage.output_tokens == b.usage.output_tokens


def test_seed_makes_sampling_repeatable(client: anthropic.Anthropic):
    """`seed` is not Anthropic's; hearth takes it as llama-server does."""
    # The first may have reused part of an earlier prompt; repeats of one
    # prompt are computed alike.
    texts = [text_of(create(client, max_tokens=32, extra_body={"temperature": 1.0, "seed": s})) for s in (7, 7, 7, 8, 9)]
    assert texts[1] == texts[2]
    assert len(set(texts[2:])) > 1, texts


def test_top_k_changes_sampling(client: anthropic.Anthropic):
    """Anthropic's `top_k` reaches the sampler: `top_k: 1` at temperature 1
    is greedy whatever the seed, while sampling without it is not."""
    greedy = text_of(create(client, max_tokens=24))
    sampled = [text_of(create(client, max_tokens=24, extra_body={"temperature": 1.0, "top_k": 1, "seed": s}))
               for s in (1, 2, 3)]
    assert sampled == [greedy] * 3, (greedy, sampled)
    free = {text_of(create(client, max_tokens=24, extra_body={"temperature": 1.0, "seed": s})) for s in (1, 2, 3)}
    assert free != {greedy}, "the control: sampling at temperature 1 gave the greedy text every time"


def test_models_in_anthropic_shape(client: anthropic.Anthropic, base_url: str):
    """The Anthropic SDK's models API: the page, the model's context size
    as `max_input_tokens`, an RFC 3339 `created_at`, and a 404 in
    Anthropic's shape for another id."""
    page = client.models.list()
    assert page.has_more is False and len(page.data) == 1
    m = page.data[0]
    assert page.first_id == page.last_id == m.id
    assert m.type == "model" and m.display_name
    assert m.created_at is not None and m.created_at.year >= 2024
    assert m.max_input_tokens == 8192
    assert 0 < m.max_tokens <= m.max_input_tokens
    assert client.models.retrieve(m.id).id == m.id
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("no-such-model")
    assert_client_error(request("GET", base_url + "/v1/models/no-such-model", headers=HEADERS),
                        ANTHROPIC_ERROR_SCHEMA, status=404)


def test_max_tokens_stop_reason(client: anthropic.Anthropic):
    m = create(client, max_tokens=4)
    assert m.stop_reason == "max_tokens"
    assert m.usage.output_tokens == 4
    _, final = streamed(client, max_tokens=4)
    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 4


def test_stop_sequence(client: anthropic.Anthropic):
    full = text_of(create(client, max_tokens=32))
    words = [w for w in full.split() if w.isalpha() and len(w) >= 3]
    assert len(words) >= 3, f"greedy output too short to pick a stop word from: {full!r}"
    stop = words[len(words) // 2]
    expected = full[: full.index(stop)]

    m = create(client, max_tokens=32, stop_sequences=[stop, "NEVER-APPEARS-123"])
    assert m.stop_reason == "stop_sequence"
    assert m.stop_sequence == stop
    assert stop not in text_of(m)
    assert text_of(m) == expected

    text, final = streamed(client, max_tokens=32, stop_sequences=[stop])
    assert final.stop_reason == "stop_sequence"
    assert final.stop_sequence == stop
    assert text == expected


def test_system_as_string_or_blocks(client: anthropic.Anthropic):
    system = "You are a pirate. Answer like one."
    as_string = create(client, system=system)
    as_blocks = create(client, system=[{"type": "text", "text": system}])
    assert text_of(as_string) == text_of(as_blocks)
    assert prompt_tokens(as_string.usage) == prompt_tokens(as_blocks.usage)
    longer = create(client, system=system + " Always mention the sea, the wind, the ship and the crew.")
    assert prompt_tokens(longer.usage) > prompt_tokens(as_string.usage), "the system prompt is not in the prompt"


def test_content_blocks_equal_plain_string(client: anthropic.Anthropic):
    blocks = [{"role": "user", "content": [{"type": "text", "text": STORY[0]["content"]}]}]
    assert text_of(create(client, messages=blocks)) == text_of(create(client))


def test_multi_turn(client: anthropic.Anthropic):
    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    m = create(client, messages=messages, max_tokens=16)
    assert text_of(m).strip()
    assert prompt_tokens(m.usage) > prompt_tokens(create(client, messages=messages[-1:], max_tokens=16).usage)


def test_unimplemented_fields_are_ignored(client: anthropic.Anthropic):
    """Fields hearth does not implement are accepted and change nothing."""
    plain = create(client, max_tokens=12, system="Be brief.")
    m = create(
        client,
        max_tokens=12,
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": [
            {"type": "text", "text": STORY[0]["content"], "cache_control": {"type": "ephemeral", "ttl": "5m"}},
        ]}],
        metadata={"user_id": "user-123"},
        service_tier="auto",
        extra_body={
            **GREEDY,
            "output_config": {"effort": "low"},
            "cache_control": {"type": "ephemeral"},
            "some_future_field": {"nested": [1, 2, 3]},
        },
    )
    assert m.type == "message"
    assert m.stop_reason == plain.stop_reason
    assert prompt_tokens(m.usage) == prompt_tokens(plain.usage)
    assert text_of(m) == text_of(plain)
    assert text_of(m).strip()


def test_sdk_stream_survives_pings_during_a_stall(start_hearth, client: anthropic.Anthropic):
    expected = text_of(create(client, max_tokens=12))
    srv = start_hearth("--heartbeat-secs", "0.5", env={"HEARTH_FAULT": "decode_stall:3"})
    sdk = make_client(srv.url)
    t0 = time.monotonic()
    events = stream_events(sdk, max_tokens=12)
    elapsed = time.monotonic() - t0
    # The SDK drops ping events itself; tests/node counts them on the wire.
    kinds = [e.type for e in events]
    assert kinds[-1] == "message_stop", kinds
    assert events[-2].usage.output_tokens >= 5, "the stall is injected at the fifth decode step"
    assert elapsed >= 2.5, f"the injected 3 s stall did not happen (took {elapsed:.1f} s)"
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert text == expected


# --- client mistakes ---------------------------------------------------------

GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
NO_MAX = {k: v for k, v in GOOD.items() if k != "max_tokens"}

BAD_REQUESTS = {
    "malformed json": b'{"model": "m", "messages": [',
    "empty body": b"",
    "body not an object": [1, 2, 3],
    "missing max_tokens": NO_MAX,
    "missing messages": {"model": MODEL, "max_tokens": 4},
    "messages not a list": {**GOOD, "messages": "hello"},
    "unknown role": {**GOOD, "messages": [{"role": "wizard", "content": "hi"}]},
    "message without role": {**GOOD, "messages": [{"content": "hi"}]},
    "content a number": {**GOOD, "messages": [{"role": "user", "content": 42}]},
    "temperature a string": {**GOOD, "temperature": "hot"},
    "max_tokens a string": {**GOOD, "max_tokens": "ten"},
    "max_tokens zero": {**GOOD, "max_tokens": 0},
    "max_tokens negative": {**GOOD, "max_tokens": -5},
    "max_tokens absurd": {**GOOD, "max_tokens": 10**12},
    "stop_sequences not a list": {**GOOD, "stop_sequences": 7},
    "stream a string": {**GOOD, "stream": "yes"},
}


@pytest.mark.parametrize("body", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_request_is_400_with_anthropic_error(base_url: str, body):
    reply = post(base_url + "/v1/messages", body, HEADERS)
    err = assert_client_error(reply, ANTHROPIC_ERROR_SCHEMA)
    assert err["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_prompt_longer_than_context_is_400(small_ctx_url: str, stream: bool):
    body = {**GOOD, "messages": [{"role": "user", "content": LONG_TEXT}], "stream": stream}
    reply = post(small_ctx_url + "/v1/messages", body, HEADERS)
    err = assert_client_error(reply, ANTHROPIC_ERROR_SCHEMA)
    assert err["error"]["type"] == "invalid_request_error"


def test_sdk_raises_bad_request(client: anthropic.Anthropic):
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "wizard", "content": "hi"}])
    assert info.value.status_code == 400


def traced_prompts(trace: Path, n: int) -> list[str]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [json.loads(l) for l in trace.read_text().split("\n") if l] if trace.exists() else []
        done = [l["prompt"] for l in lines if l.get("outcome") == "finished"]
        if len(done) >= n:
            return done
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} finished requests in {trace}")


BILLING = "x-anthropic-billing-header: cc_version=2.0.14.abc; cc_entrypoint=cli; cch={};"


def test_billing_header_is_dropped_end_to_end(start_hearth, tmp_path):
    """Claude Code's per-request billing line never reaches the prompt (as
    a string system prompt or as its own block), so two requests that differ
    only in it render alike; `--keep-billing-header` keeps it."""
    trace = tmp_path / "trace.jsonl"
    srv = start_hearth("--trace", str(trace))
    client = make_client(srv.url)
    rules = "You are a careful assistant.\nAnswer briefly."
    ask = [{"role": "user", "content": "Say hi."}]
    plain = client.messages.count_tokens(model=MODEL, system=rules, messages=ask).input_tokens
    for system in (BILLING.format("a1b2") + "\n" + rules,
                   [{"type": "text", "text": BILLING.format("c3d4")}, {"type": "text", "text": rules}]):
        assert client.messages.count_tokens(model=MODEL, system=system, messages=ask).input_tokens == plain
        create(client, system=system, messages=ask, max_tokens=2)
    first, second = traced_prompts(trace, 2)
    assert first == second and "billing" not in first and "Answer briefly." in first, first
    srv.stop()

    trace = tmp_path / "kept.jsonl"
    srv = start_hearth("--trace", str(trace), "--keep-billing-header")
    client = make_client(srv.url)
    system = BILLING.format("a1b2") + "\n" + rules
    assert client.messages.count_tokens(model=MODEL, system=system, messages=ask).input_tokens > plain
    create(client, system=system, messages=ask, max_tokens=2)
    (kept,) = traced_prompts(trace, 1)
    assert BILLING.format("a1b2") in kept, kept

"""OpenAI chat completions, through the official `openai` SDK and raw HTTP."""

from __future__ import annotations

import json
import math
import time

import openai
import pytest

from hearth_http import OPENAI_ERROR_SCHEMA, assert_client_error, post, request, openai_client

MODEL = "any-model-name"
STORY = [{"role": "user", "content": "Write a short story about a cat who learns to sail."}]
LONG_TEXT = " ".join(f"Sentence number {i} describes the quiet harbour at dawn." for i in range(400))


def make_client(url: str) -> openai.OpenAI:
    return openai_client(url, 120)


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return make_client(base_url)


def chat(client: openai.OpenAI, **kw):
    args = {"model": MODEL, "messages": STORY, "max_tokens": 24, "temperature": 0}
    args.update(kw)
    return client.chat.completions.create(**args)


def stream_chat(client: openai.OpenAI, **kw):
    """Stream a chat; returns (text, chunks, finish_reason, usage)."""
    args = {"model": MODEL, "messages": STORY, "max_tokens": 24, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    args.update(kw)
    chunks = list(client.chat.completions.create(**args))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1, f"want exactly one finish_reason, got {finishes}"
    return text, chunks, finishes[0], chunks[-1].usage


# --- discovery ---------------------------------------------------------------

def test_health(base_url: str):
    reply = request("GET", base_url + "/health")
    assert reply.status == 200, reply.text
    assert reply.json()["status"] == "ok"


def test_models_lists_one_model(client: openai.OpenAI, base_url: str):
    models = list(client.models.list())
    assert len(models) == 1, models
    assert models[0].id
    assert models[0].object == "model"
    raw = request("GET", base_url + "/v1/models").json()
    assert raw["object"] == "list"
    assert [m["id"] for m in raw["data"]] == [models[0].id]


def test_models_retrieve(client: openai.OpenAI, base_url: str):
    listed = list(client.models.list())[0]
    got = client.models.retrieve(listed.id)
    assert got.id == listed.id and got.object == "model" and got.owned_by == "hearth"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    assert_client_error(request("GET", base_url + "/v1/models/no-such-model"), OPENAI_ERROR_SCHEMA, status=404)


def test_model_alias_is_listed(start_hearth):
    srv = start_hearth("--model-alias", "house-model")
    models = list(make_client(srv.url).models.list())
    assert [m.id for m in models] == ["house-model"]


# --- generation --------------------------------------------------------------

def test_non_streaming_text(client: openai.OpenAI):
    r = chat(client)
    assert r.object == "chat.completion"
    assert r.id
    assert isinstance(r.created, int)
    assert len(r.choices) == 1
    msg = r.choices[0].message
    assert msg.role == "assistant"
    assert isinstance(msg.content, str) and msg.content.strip(), r
    assert r.choices[0].finish_reason in ("stop", "length")
    u = r.usage
    assert u is not None
    assert u.prompt_tokens > 0
    assert 1 <= u.completion_tokens <= 24
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_streaming_text(client: openai.OpenAI):
    text, chunks, finish, usage = stream_chat(client)
    assert text.strip()
    assert finish in ("stop", "length")
    assert chunks[0].choices and chunks[0].choices[0].delta.role == "assistant"
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1, "every chunk of one stream carries the same id"
    assert usage is not None, "stream_options.include_usage asks for usage in the final chunk"
    assert all(c.usage is None for c in chunks[:-1]), "usage belongs only to the final chunk"
    assert usage.prompt_tokens > 0
    assert 1 <= usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_stream_and_non_stream_agree(client: openai.OpenAI):
    r = chat(client)
    text, _, finish, usage = stream_chat(client)
    assert text == r.choices[0].message.content
    assert finish == r.choices[0].finish_reason
    assert (usage.prompt_tokens, usage.completion_tokens) == (r.usage.prompt_tokens, r.usage.completion_tokens)


def test_greedy_is_repeatable(client: openai.OpenAI):
    a = chat(client)
    b = chat(client)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.completion_tokens == b.usage.completion_tokens


def test_seed_makes_sampling_repeatable(client: openai.OpenAI):
    def sample(seed: int) -> str:
        return chat(client, temperature=1.3, top_p=0.95, seed=seed, max_tokens=16).choices[0].message.content

    assert sample(1234) == sample(1234)
    # And the sampler really samples: different seeds at a high temperature
    # do not all give the same text.
    assert len({sample(s) for s in (1, 2, 3, 4, 5)}) > 1


def sampled(client: openai.OpenAI, seed: int, **extra) -> list[tuple[float, list[float]]]:
    """Each generated token's log-probability beside the five best of the
    model's distribution at that position (logprobs are the model's own,
    before any truncation), at a temperature that picks unlikely tokens."""
    r = chat(client, temperature=2.0, seed=seed, max_tokens=24, logprobs=True, top_logprobs=5, extra_body=extra)
    return [(t.logprob, [c.logprob for c in t.top_logprobs]) for t in r.choices[0].logprobs.content]


def test_top_k_samples_only_the_k_likeliest(client: openai.OpenAI):
    """`top_k` (llama-server's) changes what is sampled: with it, every
    token is one of the k likeliest; without it, at this temperature, many
    are not."""
    k = 2
    free = [t for seed in (1, 2, 3) for t in sampled(client, seed)]
    kept = [t for seed in (1, 2, 3) for t in sampled(client, seed, top_k=k)]
    outside = [lp for lp, top in kept if lp < top[k - 1] - 1e-3]
    assert not outside, f"top_k={k} sampled tokens outside the {k} likeliest: {outside}"
    assert sum(lp < top[k - 1] - 1e-3 for lp, top in free) >= 5, "without top_k the control never left the top 2"
    assert len(kept) >= 30


def test_min_p_drops_the_unlikely_tokens(client: openai.OpenAI):
    """`min_p`: every sampled token is at least min_p times as likely as
    the best one; without it, at this temperature, many are not."""
    min_p = 0.2
    floor = math.log(min_p)
    free = [t for seed in (1, 2, 3) for t in sampled(client, seed)]
    kept = [t for seed in (1, 2, 3) for t in sampled(client, seed, min_p=min_p)]
    below = [(lp, top[0]) for lp, top in kept if lp < top[0] + floor - 1e-3]
    assert not below, f"min_p={min_p} sampled tokens below the floor: {below}"
    assert sum(lp < top[0] + floor - 1e-3 for lp, top in free) >= 5, "without min_p the control stayed above it"
    assert len(kept) >= 30


def test_max_tokens_gives_length(client: openai.OpenAI):
    r = chat(client, max_tokens=4)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 4
    _, _, finish, usage = stream_chat(client, max_tokens=4)
    assert finish == "length"
    assert usage.completion_tokens == 4


def _pick_stop(text: str) -> str:
    """A word from the middle of `text`, to use as a stop sequence."""
    words = [w for w in text.split() if w.isalpha() and len(w) >= 3]
    assert len(words) >= 3, f"greedy output too short to pick a stop word from: {text!r}"
    return words[len(words) // 2]


def test_stop_sequence(client: openai.OpenAI):
    full = chat(client, max_tokens=32).choices[0].message.content
    stop = _pick_stop(full)
    expected = full[: full.index(stop)]

    r = chat(client, max_tokens=32, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert stop not in r.choices[0].message.content
    assert r.choices[0].message.content == expected

    text, _, finish, _ = stream_chat(client, max_tokens=32, stop=stop)
    assert finish == "stop"
    assert text == expected


def test_system_and_multi_turn(client: openai.OpenAI):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    r = chat(client, messages=messages, max_tokens=16)
    assert r.choices[0].message.content.strip()
    single = chat(client, messages=messages[-1:], max_tokens=16)
    assert r.usage.prompt_tokens > single.usage.prompt_tokens


def test_text_content_parts_equal_plain_string(client: openai.OpenAI):
    parts = [{"role": "user", "content": [{"type": "text", "text": STORY[0]["content"]}]}]
    assert chat(client, messages=parts).choices[0].message.content == chat(client).choices[0].message.content


def test_sdk_stream_survives_heartbeats_during_a_stall(start_hearth, client: openai.OpenAI):
    """Heartbeat comments mid-stream must be invisible to the SDK's parser."""
    expected = chat(client, max_tokens=12).choices[0].message.content
    srv = start_hearth("--heartbeat-secs", "0.5", env={"HEARTH_FAULT": "decode_stall:3"})
    t0 = time.monotonic()
    text, _, _, usage = stream_chat(make_client(srv.url), max_tokens=12)
    elapsed = time.monotonic() - t0
    assert usage.completion_tokens >= 5, "the stall is injected at the fifth decode step"
    assert elapsed >= 2.5, f"the injected 3 s stall did not happen (took {elapsed:.1f} s)"
    assert text == expected


# --- several choices ---------------------------------------------------------

def test_n_choices_non_streamed(client: openai.OpenAI):
    """`n` choices of one prompt: the prompt counts once in the usage, every
    choice's output counts, and seeded choices differ from one another."""
    # The first may have reused part of an earlier prompt; repeats of one
    # prompt are computed alike.
    chat(client, max_tokens=1)
    one = chat(client, max_tokens=12, temperature=1.0, seed=11)
    r = chat(client, max_tokens=12, temperature=1.0, seed=11, n=3, logprobs=True)
    assert [c.index for c in r.choices] == [0, 1, 2]
    # The first choice has the request's seed: the same text as n=1.
    assert r.choices[0].message.content == one.choices[0].message.content
    assert len({c.message.content for c in r.choices}) > 1
    assert r.usage.prompt_tokens == one.usage.prompt_tokens
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)


def test_n_choices_streamed_equal_non_streamed(client: openai.OpenAI):
    """Streamed, each choice's deltas stay under its own index, in turn."""
    args = {"max_tokens": 12, "temperature": 1.0, "seed": 5, "n": 3}
    chat(client, max_tokens=1)
    whole = chat(client, **args)
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}, **args))
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    order = []
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
            if not order or order[-1] != c.index:
                order.append(c.index)
    assert order == [0, 1, 2]
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finishes == {c.index: c.finish_reason for c in whole.choices}
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_n_forced_tool_calls(client: openai.OpenAI):
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    r = chat(client, n=2, tools=[tool], tool_choice="required",
             messages=[{"role": "user", "content": "Weather in Paris?"}], max_tokens=48)
    assert len(r.choices) == 2
    ids = set()
    for c in r.choices:
        assert c.finish_reason == "tool_calls"
        call = c.message.tool_calls[0]
        assert "city" in json.loads(call.function.arguments)
        ids.add(call.id)
    assert len(ids) == 2, "each choice's call has its own id"


# --- client mistakes ---------------------------------------------------------

GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

BAD_REQUESTS = {
    "malformed json": b'{"model": "m", "messages": [',
    "empty body": b"",
    "body not an object": [1, 2, 3],
    "missing messages": {"model": MODEL, "max_tokens": 4},
    "messages not a list": {**GOOD, "messages": "hello"},
    "messages empty": {**GOOD, "messages": []},
    "unknown role": {**GOOD, "messages": [{"role": "wizard", "content": "hi"}]},
    "message without role": {**GOOD, "messages": [{"content": "hi"}]},
    "content a number": {**GOOD, "messages": [{"role": "user", "content": 42}]},
    "temperature a string": {**GOOD, "temperature": "hot"},
    "max_tokens a string": {**GOOD, "max_tokens": "ten"},
    "max_tokens zero": {**GOOD, "max_tokens": 0},
    "max_tokens negative": {**GOOD, "max_tokens": -5},
    "max_tokens absurd": {**GOOD, "max_tokens": 10**12},
    "stream a string": {**GOOD, "stream": "yes"},
    "n zero": {**GOOD, "n": 0},
    "n too large": {**GOOD, "n": 9},
}


@pytest.mark.parametrize("body", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_request_is_400_with_openai_error(base_url: str, body):
    reply = post(base_url + "/v1/chat/completions", body)
    err = assert_client_error(reply, OPENAI_ERROR_SCHEMA)
    assert err["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_prompt_longer_than_context_is_400(small_ctx_url: str, stream: bool):
    body = {**GOOD, "messages": [{"role": "user", "content": LONG_TEXT}], "stream": stream}
    reply = post(small_ctx_url + "/v1/chat/completions", body)
    err = assert_client_error(reply, OPENAI_ERROR_SCHEMA)
    assert err["error"]["type"] == "invalid_request_error"


def test_sdk_raises_bad_request(client: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, max_tokens=-1)
    assert info.value.status_code == 400


def test_server_still_serves_after_bad_requests(base_url: str, client: openai.OpenAI):
    for body in BAD_REQUESTS.values():
        post(base_url + "/v1/chat/completions", body)
    assert chat(client, max_tokens=4).choices[0].message.content


# --- logprobs ----------------------------------------------------------------

def test_logprobs_match_the_text_streamed_or_not(client: openai.OpenAI):
    whole = chat(client, max_tokens=12, logprobs=True, top_logprobs=3)
    content = whole.choices[0].logprobs.content
    assert content, whole
    assert "".join(t.token for t in content) == whole.choices[0].message.content
    for t in content:
        assert t.logprob <= 0
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token
        tops = [a.logprob for a in t.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True), tops
        # Greedy: the chosen token is the most likely one.
        assert t.top_logprobs[0].token == t.token
        assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-4

    chunks = list(client.chat.completions.create(
        model=MODEL, messages=STORY, max_tokens=12, temperature=0, stream=True, logprobs=True, top_logprobs=3))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]
    # Each chunk's logprobs are those of its own text.
    for c in chunks:
        if c.choices and c.choices[0].logprobs and c.choices[0].delta.content:
            assert "".join(t.token for t in c.choices[0].logprobs.content) == c.choices[0].delta.content


def test_logprobs_bounds(client: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, logprobs=True, top_logprobs=21)
    assert e.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError):
        chat(client, top_logprobs=2)
    plain = chat(client, max_tokens=4)
    assert plain.choices[0].logprobs is None

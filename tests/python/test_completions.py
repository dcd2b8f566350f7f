"""OpenAI legacy completions (`/v1/completions`), through the official
`openai` SDK and raw HTTP."""

from __future__ import annotations

import openai
import pytest

from hearth_http import OPENAI_ERROR_SCHEMA, assert_client_error, post, openai_client

MODEL = "any-model-name"
PROMPT = "Once upon a time, in a small village by the sea, there lived"
LONG_TEXT = " ".join(f"Sentence number {i} describes the quiet harbour at dawn." for i in range(400))


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai_client(base_url, 120)


def complete(client: openai.OpenAI, **kw):
    args = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "seed": 7}
    args.update(kw)
    return client.completions.create(**args)


def stream(client: openai.OpenAI, **kw):
    """Stream a completion; returns ({index: text}, {index: finish_reason},
    chunks)."""
    args = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "seed": 7,
            "stream": True, "stream_options": {"include_usage": True}}
    args.update(kw)
    chunks = list(client.completions.create(**args))
    texts: dict[int, str] = {}
    finishes: dict[int, list[str]] = {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
            if ch.finish_reason:
                finishes.setdefault(ch.index, []).append(ch.finish_reason)
    assert all(len(f) == 1 for f in finishes.values()), f"one finish_reason per choice, got {finishes}"
    return texts, {i: f[0] for i, f in finishes.items()}, chunks


# --- generation --------------------------------------------------------------

def test_non_streaming_text_and_usage(client: openai.OpenAI):
    r = complete(client)
    assert r.object == "text_completion"
    assert r.id.startswith("cmpl-")
    assert r.model == MODEL
    assert len(r.choices) == 1
    c = r.choices[0]
    assert c.index == 0
    assert isinstance(c.text, str) and c.text.strip(), r
    assert c.finish_reason in ("stop", "length")
    assert c.logprobs is None
    u = r.usage
    assert u.prompt_tokens > 0
    assert 1 <= u.completion_tokens <= 12
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens <= u.prompt_tokens


def test_max_tokens_defaults_to_16(client: openai.OpenAI):
    r = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0)
    assert 1 <= r.usage.completion_tokens <= 16


def test_max_tokens_gives_length(client: openai.OpenAI):
    r = complete(client, max_tokens=3)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3


def test_prompt_list_gives_a_choice_per_prompt(client: openai.OpenAI):
    prompts = ["The capital of France is", "One, two, three,"]
    r = complete(client, prompt=prompts, max_tokens=4)
    assert [c.index for c in r.choices] == [0, 1]
    for p, c in zip(prompts, r.choices):
        assert c.text == complete(client, prompt=p, max_tokens=4).choices[0].text
    # n choices per prompt, indexed prompt * n + j.
    r2 = complete(client, prompt=prompts, max_tokens=4, n=2)
    assert [c.index for c in r2.choices] == [0, 1, 2, 3]
    assert [c.text for c in r2.choices] == [r.choices[0].text] * 2 + [r.choices[1].text] * 2
    # A prompt counts once in the usage, each choice's output counts.
    assert r2.usage.prompt_tokens == r.usage.prompt_tokens
    assert r2.usage.completion_tokens == 2 * r.usage.completion_tokens


def test_stream_matches_non_stream(client: openai.OpenAI):
    r = complete(client)
    texts, finishes, chunks = stream(client)
    assert texts == {0: r.choices[0].text}
    assert finishes == {0: r.choices[0].finish_reason}
    assert {c.object for c in chunks} == {"text_completion"}
    assert len({c.id for c in chunks}) == 1
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None, "include_usage: a last chunk with the usage"
    assert all(c.usage is None for c in chunks[:-1])
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (r.usage.prompt_tokens, r.usage.completion_tokens)


def test_stream_runs_every_choice(client: openai.OpenAI):
    prompts = ["The capital of France is", "One, two, three,"]
    r = complete(client, prompt=prompts, max_tokens=4)
    texts, finishes, _ = stream(client, prompt=prompts, max_tokens=4)
    assert texts == {c.index: c.text for c in r.choices}
    assert finishes == {c.index: c.finish_reason for c in r.choices}


def _pick_stop(text: str) -> str:
    words = [w for w in text.split() if w.isalpha() and len(w) >= 3]
    assert len(words) >= 3, f"greedy output too short to pick a stop word from: {text!r}"
    return words[len(words) // 2]


def test_stop_sequence(client: openai.OpenAI):
    full = complete(client, max_tokens=16).choices[0].text
    stop = _pick_stop(full)
    expected = full[: full.index(stop)]
    r = complete(client, max_tokens=16, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == expected
    texts, finishes, _ = stream(client, max_tokens=16, stop=stop)
    assert texts == {0: expected}
    assert finishes == {0: "stop"}


def test_echo_prepends_the_prompt(client: openai.OpenAI):
    plain = complete(client, max_tokens=4).choices[0].text
    r = complete(client, max_tokens=4, echo=True)
    assert r.choices[0].text == PROMPT + plain
    texts, _, _ = stream(client, max_tokens=4, echo=True)
    assert texts == {0: PROMPT + plain}


def test_token_id_prompt(client: openai.OpenAI):
    r = complete(client, prompt=[[50, 60, 70], [80, 90]], max_tokens=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.prompt_tokens == 5


def _check_logprobs(lp, text: str, n: int) -> None:
    assert "".join(lp.tokens) == text
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == len(lp.text_offset)
    assert all(v <= 0 for v in lp.token_logprobs)
    for tok, top in zip(lp.tokens, lp.top_logprobs):
        # Greedy: the chosen token is the best one, so it is among the n.
        assert 1 <= len(top) <= n, top
        assert tok in top
        assert all(v <= 0 for v in top.values())


def test_logprobs(client: openai.OpenAI):
    r = complete(client, max_tokens=8, logprobs=2)
    c = r.choices[0]
    _check_logprobs(c.logprobs, c.text, 2)
    assert c.logprobs.text_offset[0] == 0
    assert c.logprobs.text_offset == sorted(c.logprobs.text_offset)
    chunks = list(complete(client, max_tokens=8, logprobs=2, stream=True))
    tokens = [t for ch in chunks for x in ch.choices if x.logprobs for t in x.logprobs.tokens]
    offsets = [o for ch in chunks for x in ch.choices if x.logprobs for o in x.logprobs.text_offset]
    assert tokens == c.logprobs.tokens
    assert offsets == c.logprobs.text_offset


# --- client mistakes ---------------------------------------------------------

GOOD = {"model": MODEL, "prompt": "hi", "max_tokens": 4}

BAD_REQUESTS = {
    "missing prompt": {"model": MODEL, "max_tokens": 4},
    "prompt a number": {**GOOD, "prompt": 42},
    "prompt an object": {**GOOD, "prompt": {"text": "hi"}},
    "prompt null": {**GOOD, "prompt": None},
    "prompt empty list": {**GOOD, "prompt": []},
    "prompt mixed ids and text": {**GOOD, "prompt": [1, "a"]},
    "token id out of vocab": {**GOOD, "prompt": [10**9]},
    "token id negative": {**GOOD, "prompt": [[5, -1]]},
    "n zero": {**GOOD, "n": 0},
    "n too large": {**GOOD, "n": 9},
    "max_tokens negative": {**GOOD, "max_tokens": -1},
    "max_tokens zero": {**GOOD, "max_tokens": 0},
    "temperature too high": {**GOOD, "temperature": 5},
    "logprobs too many": {**GOOD, "logprobs": 6},
    "echo with logprobs": {**GOOD, "echo": True, "logprobs": 1},
    "suffix": {**GOOD, "suffix": "end"},
    "presence_penalty out of range": {**GOOD, "presence_penalty": 3},
    "logit_bias id out of vocab": {**GOOD, "logit_bias": {"99999999": 1}},
    "dry_multiplier": {**GOOD, "dry_multiplier": 0.8},
    "best_of above n": {**GOOD, "best_of": 3},
}


@pytest.mark.parametrize("body", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_request_is_400_with_openai_error(base_url: str, body):
    err = assert_client_error(post(base_url + "/v1/completions", body), OPENAI_ERROR_SCHEMA)
    assert err["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("kw,param", [
    ({"n": 0}, "n"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
])
def test_sdk_raises_bad_request(client: openai.OpenAI, kw, param):
    with pytest.raises(openai.BadRequestError) as info:
        complete(client, **kw)
    assert info.value.status_code == 400
    assert info.value.body["param"] == param


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_prompt_longer_than_context_is_400(small_ctx_url: str, stream: bool):
    reply = post(small_ctx_url + "/v1/completions", {**GOOD, "prompt": LONG_TEXT, "stream": stream})
    err = assert_client_error(reply, OPENAI_ERROR_SCHEMA)
    assert err["error"]["code"] == "context_length_exceeded"
    assert err["error"]["param"] == "prompt"

"""Logit bias and penalties on the real model, on chat and legacy
completions, streamed and not: +100 on a token makes it the greedy reply's
first token (and its logprob, reported after the bias, near 0); -100 on
the greedy first token changes it; a frequency penalty lowers the
repetition of a reply that invites it; the samplers hold under a grammar;
bad values are 400s naming the field. Through the official SDKs, with the
non-OpenAI fields in `extra_body`."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest

from hearth_http import anthropic_client, openai_client, post

PROMPT = "Write the word hello fifty times, separated by spaces."
RAW_PROMPT = f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
# A text whose plain continuation repeats itself.
REPEATING = "1, 1, 1, 1, 1, 1, 1, 1, 1, 1,"
# A chat request the default model answers by repeating itself, greedily.
REPEATING_CHAT = "Write the word hello fifty times."
STREAM = [False, True]
STREAM_IDS = ["non-stream", "stream"]


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai_client(base_url, 120)


@pytest.fixture(scope="module")
def claude(base_url: str) -> anthropic.Anthropic:
    return anthropic_client(base_url, 120)


def token_id(base_url: str, text: str) -> int:
    r = post(base_url + "/tokenize", {"content": text})
    assert r.status == 200, r.text
    (token,) = r.json()["tokens"]
    return token


def chat_tokens(client: openai.OpenAI, stream: bool, max_tokens: int = 16, content: str = PROMPT,
                **kw) -> list[tuple[str, float]]:
    """(token, logprob) of a greedy chat reply."""
    args = dict(model="m", messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
                temperature=0, logprobs=True, **kw)
    if not stream:
        r = client.chat.completions.create(**args)
        return [(t.token, t.logprob) for t in r.choices[0].logprobs.content]
    out = []
    for chunk in client.chat.completions.create(stream=True, **args):
        for ch in chunk.choices:
            if ch.logprobs and ch.logprobs.content:
                out.extend((t.token, t.logprob) for t in ch.logprobs.content)
    return out


def completion_tokens(client: openai.OpenAI, stream: bool, max_tokens: int = 16, prompt: str = RAW_PROMPT,
                      **kw) -> list[tuple[str, float]]:
    """(token, logprob) of a greedy legacy completion."""
    args = dict(model="m", prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=0, **kw)
    if not stream:
        lp = client.completions.create(**args).choices[0].logprobs
        return list(zip(lp.tokens, lp.token_logprobs))
    out = []
    for chunk in client.completions.create(stream=True, **args):
        for ch in chunk.choices:
            if ch.logprobs and ch.logprobs.tokens:
                out.extend(zip(ch.logprobs.tokens, ch.logprobs.token_logprobs))
    return out


ROUTES = {"chat": chat_tokens, "completions": completion_tokens}


def distinct_ratio(tokens: list[tuple[str, float]]) -> float:
    return len({t for t, _ in tokens}) / len(tokens)


@pytest.mark.parametrize("stream", STREAM, ids=STREAM_IDS)
@pytest.mark.parametrize("route", ROUTES)
def test_plus_100_makes_a_token_the_first(client, base_url: str, route: str, stream: bool):
    banana = token_id(base_url, " banana")
    plain = ROUTES[route](client, stream, 4)
    assert plain[0][0] != " banana"
    biased = ROUTES[route](client, stream, 4, logit_bias={str(banana): 100})
    token, logprob = biased[0]
    assert token == " banana", biased
    # Reported under the distribution it was drawn from: after the bias.
    assert logprob > -0.01, biased


@pytest.mark.parametrize("stream", STREAM, ids=STREAM_IDS)
@pytest.mark.parametrize("route", ROUTES)
def test_minus_100_bans_the_greedy_first_token(client, base_url: str, route: str, stream: bool):
    first = ROUTES[route](client, stream, 4)[0][0]
    banned = token_id(base_url, first)
    again = ROUTES[route](client, stream, 4, logit_bias={str(banned): -100})
    assert again[0][0] != first, (first, again)


@pytest.mark.parametrize("stream", STREAM, ids=STREAM_IDS)
@pytest.mark.parametrize("route", ROUTES)
def test_frequency_penalty_lowers_repetition(client, route: str, stream: bool):
    kw = {"prompt": REPEATING} if route == "completions" else {"content": REPEATING_CHAT}
    plain = ROUTES[route](client, stream, 40, frequency_penalty=0, **kw)
    damped = ROUTES[route](client, stream, 40, frequency_penalty=2, **kw)
    before, after = distinct_ratio(plain), distinct_ratio(damped)
    print(f"{route} distinct-token ratio: {before:.2f} without, {after:.2f} with frequency_penalty 2")
    assert before < 0.6, plain
    assert after > before + 0.2, (plain, damped)


@pytest.mark.parametrize("field", ["presence_penalty", "repeat_penalty"])
def test_other_penalties_lower_repetition(client, field: str):
    value = 2 if field == "presence_penalty" else 1.5
    plain = chat_tokens(client, False, 40)
    damped = chat_tokens(client, False, 40, extra_body={field: value})
    assert distinct_ratio(damped) > distinct_ratio(plain) + 0.2, (plain, damped)


def test_streamed_and_whole_agree_under_penalties(client):
    kw = dict(frequency_penalty=1, presence_penalty=0.5, logit_bias={"28": -5},
              extra_body={"repeat_penalty": 1.2, "repeat_last_n": 16})
    assert chat_tokens(client, False, 32, **kw) == chat_tokens(client, True, 32, **kw)


def test_penalties_hold_under_a_json_grammar(client):
    """A grammar still has the last word: the reply is valid JSON, and the
    penalties changed it."""
    args = dict(model="m", max_tokens=96, temperature=0, response_format={"type": "json_object"},
                messages=[{"role": "user", "content": "Give a JSON object listing five colours."}])
    plain = client.chat.completions.create(**args).choices[0]
    damped = client.chat.completions.create(frequency_penalty=2, presence_penalty=1, **args).choices[0]
    assert plain.message.content != damped.message.content
    for choice in (plain, damped):
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict), choice.message.content


def test_bias_towards_a_token_outside_a_forced_tool_call(client, base_url: str):
    """+100 on a token the grammar does not allow cannot break a forced call."""
    banana = token_id(base_url, " banana")
    r = client.chat.completions.create(
        model="m", max_tokens=96, temperature=0, logit_bias={str(banana): 100},
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
            "required": ["city"]}}}],
        tool_choice="required")
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")


def test_anthropic_and_responses_take_the_same_fields(client, claude, base_url: str):
    banana = token_id(base_url, " banana")
    extra = {"logit_bias": {str(banana): 100}, "temperature": 0}
    msg = claude.messages.create(model="m", max_tokens=4, extra_body=extra,
                                 messages=[{"role": "user", "content": "What is 2+2?"}])
    assert msg.content[0].text.lstrip().startswith("banana"), msg.content
    r = client.responses.create(model="m", input="What is 2+2?", max_output_tokens=4, extra_body=extra)
    assert r.output_text.lstrip().startswith("banana"), r.output_text


BAD = [
    ("logit_bias", {"99999999": 5}), ("logit_bias", {"5": 101}), ("logit_bias", {"five": 1}),
    ("logit_bias", [[5, 1]]), ("frequency_penalty", 2.5), ("presence_penalty", -3),
    ("repeat_penalty", 0), ("repeat_last_n", -2), ("typical_p", 1.5), ("top_k", -1),
    ("dry_multiplier", 0.8),
]


@pytest.mark.parametrize("field,value", BAD, ids=[f"{f}={json.dumps(v)}" for f, v in BAD])
@pytest.mark.parametrize("route", ["chat", "completions", "messages"])
def test_bad_values_are_400s_naming_the_field(base_url: str, route: str, field: str, value):
    body = {"model": "m", "max_tokens": 4, field: value}
    if route == "completions":
        r = post(base_url + "/v1/completions", {**body, "prompt": "hi"})
    else:
        path = "/v1/chat/completions" if route == "chat" else "/v1/messages"
        r = post(base_url + path, {**body, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status == 400, r.text
    err = r.json()["error"]
    if route == "messages":
        assert r.json()["type"] == "error" and field in err["message"], err
    else:
        assert err["param"] == field, err

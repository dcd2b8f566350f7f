"""Speculative decoding, by prompt lookup and by a draft model: the
model's greedy tokens with and without it, token for token (on the CPU a
row's attention is computed alike in a step of any size, README), and
with `--flash-attn off` against the fused kernel up to a near tie
(checked with logprobs); with penalties and logit bias too (their token
history holds verified tokens only), deterministic across both APIs,
streamed and not, grammar-constrained replies (a forced tool call, a JSON
schema) that hold, high acceptance on text that copies the prompt, and
exact endings when a stop sequence, max_tokens or a client that leaves
falls inside a verified draft. Two real servers side by side, one with
--no-spec; each test runs with prompt lookup, with prompt lookup and
`--flash-attn off` (attention as matrix products against the plain
server's fused kernel), and with a draft model: the model's own first 6
layers and output head (`make_draft.py`), which shares its vocabulary by
construction and guesses worse, so drafts are rejected as well as
accepted; `--draft-min` keeps it drafting where the cost model would stop
it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import anthropic
import openai
import pytest

from conftest import GEMMA, HEARTH_BIN, SMOLLM2
from hearth_http import request
from make_draft import truncate
from test_parallel import RawStream, metric, slots

CODE = "\n".join(f"def function_{i}(values):\n    total = sum(values) * {i}\n    return total + {i * 7}\n" for i in range(24))
COPY = "Repeat this code exactly, changing nothing:\n\n" + CODE


DRAFTS = ("lookup", "lookup-flash-attn-off", "draft-model")


@pytest.fixture(scope="module", params=DRAFTS)
def pair(server_logs, request, tmp_path_factory):
    from conftest import _factory

    if request.param == "lookup":
        args: tuple[str, ...] = ("--spec",)
    elif request.param == "lookup-flash-attn-off":
        # Attention as matrix products, against the plain server's fused
        # kernel: still the model's greedy tokens up to near ties.
        args = ("--spec", "--flash-attn", "off")
    else:
        draft = tmp_path_factory.mktemp("draft") / "smollm2-6-layers.gguf"
        truncate(SMOLLM2, draft, 6)
        args = ("--draft-model", str(draft), "--draft-min", "2")
    start, started = _factory(server_logs)
    spec = start("--heartbeat-secs", "1", *args)
    plain = start("--heartbeat-secs", "1", "--no-spec")
    # Both servers compute attention with the same kernel: greedy replies
    # must be equal token for token, not just up to a near tie.
    spec.exact = request.param != "lookup-flash-attn-off"
    yield spec, plain
    for s in started:
        s.stop()


def chat(url: str, content: str, **extra) -> dict:
    body = {"model": "m", "messages": [{"role": "user", "content": content}], "temperature": 0, **extra}
    r = request("POST", url + "/v1/chat/completions", body, timeout=300)
    assert r.status == 200, r.text
    return r.json()


NEAR_TIE = 0.3


def tokens_of(reply: dict) -> list[tuple[str, float, dict]]:
    """(token, logprob, {alternative: logprob}) for each generated token."""
    return [(t["token"], t["logprob"], {a["token"]: a["logprob"] for a in t["top_logprobs"]})
            for t in reply["choices"][0]["logprobs"]["content"]]


def assert_same_greedy(spec_reply: dict, plain_reply: dict, what: str, exact: bool = False) -> None:
    """Greedy tokens with speculation equal those without: `exact`, token
    for token and logprob for logprob; otherwise up to where a near tie
    rounds the other way (attention as matrix products against the fused
    kernel, or KV cells placed differently, README). At the first
    difference both tokens must be near-equal choices of the model; a
    wrongly accepted draft would not be."""
    if exact:
        assert tokens_of(spec_reply) == tokens_of(plain_reply), what
        return
    if near_tie_at(spec_reply, plain_reply, what) is None:
        assert len(tokens_of(spec_reply)) == len(tokens_of(plain_reply)), what


def near_tie_at(spec_reply: dict, plain_reply: dict, what: str) -> int | None:
    """The first token where two greedy replies differ (None: one is a
    prefix of the other), asserting that the difference is a near tie."""
    a, b = tokens_of(spec_reply), tokens_of(plain_reply)
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x[0] != y[0]), None)
    if k is None:
        return None
    token, logprob, _ = a[k]
    best, best_lp, alternatives = b[k]
    if token not in alternatives:
        # Under a grammar both may be chosen below the model's unconstrained
        # top choices: then the two chosen tokens' own logprobs must be near.
        assert abs(best_lp - logprob) < NEAR_TIE, f"{what}: token {k}: {token!r} ({logprob}) vs {best!r} ({best_lp}) is no near tie"
        return k
    # A batch of several rows moves this CPU build's logprobs by up to
    # about 0.15 against a batch of one; a wrongly kept draft would be far
    # from the best choice.
    assert best_lp - alternatives[token] < NEAR_TIE, f"{what}: token {k}: {token!r} vs {best!r} is no near tie"
    assert abs(logprob - alternatives[token]) < NEAR_TIE, what
    return k


def test_greedy_tokens_are_the_models_with_and_without_speculation(pair):
    spec, plain = pair
    before = metric(spec.url, "hearth_spec_drafted_tokens_total")
    diverged = 0
    prompts = (COPY, "Write a short story about a lighthouse.", "List ten fruits, one per line.",
               "Copy this line three times: the cat sat on the mat.")
    for content in prompts:
        a = chat(spec.url, content, max_tokens=160, logprobs=True, top_logprobs=5)
        b = chat(plain.url, content, max_tokens=160, logprobs=True, top_logprobs=5)
        assert_same_greedy(a, b, content[:40], exact=spec.exact)
        diverged += a["choices"][0]["message"]["content"] != b["choices"][0]["message"]["content"]
    assert diverged < len(prompts), "every reply diverged"
    assert metric(spec.url, "hearth_spec_drafted_tokens_total") > before, "nothing was drafted"
    assert metric(plain.url, "hearth_spec_drafted_tokens_total") == 0


def test_penalties_and_bias_see_only_verified_tokens(pair):
    """Penalties count the reply's tokens: under speculation a rejected
    draft must leave no trace in that count, so greedy replies with
    penalties and bias are the same with and without drafts (up to a near
    tie, as above), and some drafts were rejected on the way."""
    spec, plain = pair
    drafted0 = metric(spec.url, "hearth_spec_drafted_tokens_total")
    accepted0 = metric(spec.url, "hearth_spec_accepted_tokens_total")
    kw = dict(max_tokens=120, logprobs=True, top_logprobs=5, frequency_penalty=0.3, presence_penalty=0.2,
              repeat_penalty=1.1, logit_bias={"28": -3})
    a = chat(spec.url, COPY, **kw)
    b = chat(plain.url, COPY, **kw)
    assert_same_greedy(a, b, "penalised copy", exact=spec.exact)
    assert chat(plain.url, COPY, max_tokens=120)["choices"][0]["message"]["content"] != b["choices"][0]["message"]["content"]
    drafted = metric(spec.url, "hearth_spec_drafted_tokens_total") - drafted0
    accepted = metric(spec.url, "hearth_spec_accepted_tokens_total") - accepted0
    assert drafted > accepted > 0, (drafted, accepted)


def test_speculation_is_deterministic_across_apis_and_streaming(pair):
    spec, _ = pair
    oa = openai.OpenAI(base_url=spec.url + "/v1", api_key="x", max_retries=0)
    plain = oa.chat.completions.create(model="m", messages=[{"role": "user", "content": COPY}], max_tokens=120, temperature=0)
    chunks = oa.chat.completions.create(model="m", messages=[{"role": "user", "content": COPY}], max_tokens=120,
                                        temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == plain.choices[0].message.content
    an = anthropic.Anthropic(base_url=spec.url, api_key="x", max_retries=0)
    msg = an.messages.create(model="m", max_tokens=120, messages=[{"role": "user", "content": COPY}],
                             extra_body={"temperature": 0})
    with an.messages.stream(model="m", max_tokens=120, messages=[{"role": "user", "content": COPY}],
                            extra_body={"temperature": 0}) as s:
        an_streamed = "".join(s.text_stream)
    assert an_streamed == msg.content[0].text
    assert msg.content[0].text.strip()


def test_forced_tool_calls_and_schemas_hold_under_speculation(pair):
    tools = [{"type": "function", "function": {"name": "write_file", "description": "Write a file",
              "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
                             "required": ["path", "content"]}}}]
    schema = {"type": "json_schema", "json_schema": {"name": "f", "schema": {
        "type": "object", "properties": {"names": {"type": "array", "items": {"type": "string"}}}, "required": ["names"],
        "additionalProperties": False}}}
    spec, plain = pair
    d0 = metric(spec.url, "hearth_spec_drafted_tokens_total")
    for srv in pair:
        call = chat(srv.url, "Save this code to main.py:\n" + CODE[:400], tools=tools, tool_choice="required",
                    max_tokens=200, logprobs=True, top_logprobs=5)
        calls = call["choices"][0]["message"]["tool_calls"]
        assert len(calls) == 1 and calls[0]["function"]["name"] == "write_file"
        args = json.loads(calls[0]["function"]["arguments"])
        assert set(args) >= {"path", "content"}
        answer = chat(srv.url, "Give the function names in: " + CODE[:300], response_format=schema, max_tokens=160)
        parsed = json.loads(answer["choices"][0]["message"]["content"])
        assert set(parsed) == {"names"} and all(isinstance(n, str) for n in parsed["names"])
        if srv is spec:
            spec_call = call
        else:
            assert_same_greedy(spec_call, call, "forced tool call", exact=spec.exact)
    # The grammar-constrained replies were drafted too (they copy the code).
    assert metric(spec.url, "hearth_spec_drafted_tokens_total") > d0


def test_copied_text_is_mostly_accepted(pair, request):
    spec, plain = pair
    d0 = metric(spec.url, "hearth_spec_drafted_tokens_total")
    a0 = metric(spec.url, "hearth_spec_accepted_tokens_total")
    a = chat(spec.url, COPY + "\n\n", max_tokens=300, logprobs=True, top_logprobs=5)
    b = chat(plain.url, COPY + "\n\n", max_tokens=300, logprobs=True, top_logprobs=5)
    assert_same_greedy(a, b, "copy", exact=spec.exact)
    text = a["choices"][0]["message"]["content"]
    # A 135M model copies the shape faithfully (names, signatures).
    assert all(f"def function_{i}(values):" in text for i in range(8)), text
    drafted = metric(spec.url, "hearth_spec_drafted_tokens_total") - d0
    accepted = metric(spec.url, "hearth_spec_accepted_tokens_total") - a0
    generated = a["usage"]["completion_tokens"]
    if "draft-model" in request.node.callspec.id:
        # A 6-layer cut of the model guesses far worse than prompt lookup
        # (a few in a hundred): its drafts were made and judged, and the
        # copy is still the model's; the floor below is prompt lookup's.
        assert drafted >= generated / 2, (drafted, generated)
        return
    # Most of the reply came from accepted drafts (measured: about 3 in 4
    # tokens, over half the drafted ones accepted).
    assert accepted >= 0.5 * generated, (accepted, drafted, generated)
    assert accepted / drafted >= 0.4, (accepted, drafted)
    log = spec.log_path.read_text()
    assert re.search(r"done: .*drafted=\d+ accepted=\d+", log)


def test_stop_and_max_tokens_inside_a_draft_end_exactly(pair):
    spec, plain = pair
    # Warm first, so that both requests below find the whole prompt cached
    # and compute it alike (README: partial-chunk reuse).
    # Each reply's verified steps are sized by measured step times, so two
    # runs of one greedy request can split a near tie differently (batch
    # rounding, README): where the texts part, it must be at a near tie.
    chat(spec.url, COPY, max_tokens=8)
    lp = dict(logprobs=True, top_logprobs=5)
    whole = chat(spec.url, COPY, max_tokens=250, **lp)
    full = whole["choices"][0]["message"]["content"]
    # A stop sequence that falls inside copied (drafted and accepted) text.
    stop = next(s for s in ("function_9", "function_5", "total") if s in full[20:])
    cut = chat(spec.url, COPY, max_tokens=250, stop=[stop], **lp)
    assert cut["choices"][0]["finish_reason"] == "stop"
    text = cut["choices"][0]["message"]["content"]
    assert stop not in text
    if near_tie_at(cut, whole, "stop") is None:
        assert text == full[: full.index(stop, 0)]
    # max_tokens reached inside a draft: exactly that many tokens.
    capped = chat(spec.url, COPY, max_tokens=57, **lp)
    assert capped["usage"]["completion_tokens"] == 57
    assert len(capped["choices"][0]["logprobs"]["content"]) == 57
    assert capped["choices"][0]["finish_reason"] == "length"
    if near_tie_at(capped, whole, "max_tokens") is None:
        assert full.startswith(capped["choices"][0]["message"]["content"])
    plain_capped = chat(plain.url, COPY, max_tokens=57)
    assert plain_capped["usage"]["completion_tokens"] == 57


def test_a_client_that_leaves_mid_draft_leaves_a_consistent_kv(pair):
    spec, plain = pair
    s = RawStream(spec.url, "/v1/chat/completions", {"model": "m", "stream": True, "temperature": 0, "max_tokens": 300,
                                                      "messages": [{"role": "user", "content": COPY + " Now."}]})
    deadline = time.monotonic() + 60
    while len(s.text()) < 80:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    s.close()
    left = time.monotonic()
    while any(x["state"] != "idle" for x in slots(spec.url)["slots"]):
        assert time.monotonic() - left < 1.0, "the sequence was not freed within a second"
        time.sleep(0.02)
    # The KV it left behind is reused, and gives the model's answer.
    a = chat(spec.url, COPY + " Now.", max_tokens=120, logprobs=True, top_logprobs=5)
    b = chat(plain.url, COPY + " Now.", max_tokens=120, logprobs=True, top_logprobs=5)
    assert_same_greedy(a, b, "after a cancel")
    assert a["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_a_draft_model_with_another_vocabulary_is_refused_at_start():
    proc = subprocess.run([str(HEARTH_BIN), "serve", "--port", "0", "--model", str(SMOLLM2), "--draft-model", str(GEMMA),
                           "--ctx", "512", "--parallel", "1"], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if not k.startswith("HEARTH_")})
    assert proc.returncode != 0
    err = proc.stderr
    assert "cannot draft for this model" in err and "tokenizer" in err, err[-2000:]
    assert "listening" not in proc.stdout

"""Reasoning through the official SDKs, on SmolLM2 with a Qwen3-style
template fixture (tests/fixtures/templates/qwen3_think.jinja): its
generation prompt opens the reasoning (`<think>\\n`), or writes an empty
thinking block when `enable_thinking` is false, and it renders tools
natively, Hermes style.

SmolLM2 was never taught to think, so it does not write `</think>` itself:
whatever it writes after the opened `<think>` is reasoning, cut short by
max_tokens or by its end-of-turn token. Only a reasoning budget (Anthropic
`thinking.budget_tokens`) makes the engine close the reasoning and the
model answer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import anthropic
import jsonschema
import openai
import pytest

from conftest import _factory
from hearth_http import openai_client, anthropic_client

MODEL = "any-model-name"
TEMPLATE = Path(__file__).resolve().parents[1] / "fixtures" / "templates" / "qwen3_think.jinja"
ASK = [{"role": "user", "content": "What is 2+2?"}]
STORY = [{"role": "user", "content": "Write a long story about a cat who learns to sail."}]
GREEDY = {"temperature": 0}
OPENED = "<|im_start|>assistant\n<think>\n"
EMPTY_THINK = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Get the weather for a city",
                                           "parameters": WEATHER}}]


@pytest.fixture(scope="module")
def think_url(server_logs: Path):
    start, started = _factory(server_logs)
    srv = start("--chat-template", str(TEMPLATE), "--heartbeat-secs", "1")
    yield srv.url
    for s in started:
        s.stop()


@pytest.fixture(scope="module")
def oai(think_url: str) -> openai.OpenAI:
    return openai_client(think_url, 120)


@pytest.fixture(scope="module")
def claude(think_url: str) -> anthropic.Anthropic:
    return anthropic_client(think_url, 180)


def chat(client: openai.OpenAI, **kw):
    args = {"model": MODEL, "messages": ASK, "max_tokens": 48, "temperature": 0}
    args.update(kw)
    return client.chat.completions.create(**args)


def reasoning_of(msg) -> str | None:
    return getattr(msg, "reasoning_content", None)


def rendered(url: str, body: dict) -> str:
    from hearth_http import post

    reply = post(url + "/apply-template", body)
    assert reply.status == 200, reply.text
    return reply.json()["prompt"]


def raw_of(choice) -> str:
    """What the model generated, token by token (from logprobs)."""
    return "".join(t.token for t in choice.logprobs.content)


# --- rendering --------------------------------------------------------------------

def test_native_tools_and_thinking_switch_are_rendered(think_url: str):
    prompt = rendered(think_url, {"messages": ASK})
    assert prompt.endswith(OPENED), prompt
    off = rendered(think_url, {"messages": ASK, "reasoning_effort": "none"})
    assert off.endswith(EMPTY_THINK), off
    with_tools = rendered(think_url, {"messages": ASK, "tools": TOOLS})
    assert "<tools>\n" in with_tools and '"name": "get_weather"' in with_tools, "the template renders the tools itself"
    assert "# Tools\n\nYou can call functions" not in with_tools, "no fallback system prompt for a native template"
    # A forced call leaves no room for thinking: thinking is turned off.
    forced = rendered(think_url, {"messages": ASK, "tools": TOOLS, "tool_choice": "required"})
    assert forced.endswith(EMPTY_THINK), forced


def test_history_reasoning_and_tool_turns_render_natively(think_url: str):
    call = {"id": "call_h1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}}
    prompt = rendered(think_url, {"tools": TOOLS, "messages": [
        *ASK,
        {"role": "assistant", "content": None, "reasoning_content": "Need the weather.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_h1", "content": "3 degrees"},
    ]})
    assert "<think>\nNeed the weather.\n</think>\n\n<tool_call>\n{\"name\": \"get_weather\"" in prompt, prompt
    assert "<|im_start|>user\n<tool_response>\n3 degrees\n</tool_response><|im_end|>" in prompt, prompt


# --- OpenAI ---------------------------------------------------------------------------

def test_reasoning_is_never_content(oai: openai.OpenAI):
    r = chat(oai, logprobs=True)
    c = r.choices[0]
    raw = raw_of(c)
    before, closed, after = raw.partition("</think>")
    assert (reasoning_of(c.message) or "").strip() == before.strip(), (raw, c.message)
    if closed:
        assert (c.message.content or "").strip() == after.strip()
    else:
        assert not c.message.content, f"no `</think>`: everything is reasoning, got content {c.message.content!r}"
    assert c.finish_reason in ("stop", "length")


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_reasoning_cut_by_max_tokens_is_reasoning_only(oai: openai.OpenAI, stream: bool):
    if not stream:
        r = chat(oai, messages=STORY, max_tokens=8)
        c = r.choices[0]
        assert c.finish_reason == "length"
        assert not c.message.content, c.message.content
        assert reasoning_of(c.message), c.message
        assert r.usage.completion_tokens == 8
        return
    chunks = list(chat(oai, messages=STORY, max_tokens=8, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not "".join(d.content or "" for d in deltas)
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


def test_reasoning_streams_as_reasoning_deltas(oai: openai.OpenAI):
    chat(oai)
    whole = chat(oai).choices[0]  # a repeat: computed as on a cold start, as the stream will be
    chunks = list(chat(oai, stream=True))
    kinds = []
    for c in chunks:
        if not c.choices:
            continue
        d = c.choices[0].delta
        if getattr(d, "reasoning_content", None):
            kinds.append("reasoning")
        if d.content:
            kinds.append("content")
    assert "reasoning" in kinds
    assert kinds == sorted(kinds, key=lambda k: k != "reasoning"), f"reasoning deltas come first: {kinds}"
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert reasoning == reasoning_of(whole.message)
    assert content == (whole.message.content or "")


def test_reasoning_effort_none_turns_thinking_off(oai: openai.OpenAI):
    chat(oai, reasoning_effort="none", max_tokens=16)
    r = chat(oai, reasoning_effort="none", max_tokens=16)  # a repeat, computed as the stream will be
    msg = r.choices[0].message
    assert not reasoning_of(msg), msg
    assert msg.content and msg.content.strip()
    chunks = list(chat(oai, reasoning_effort="none", max_tokens=16, stream=True))
    assert not any(getattr(c.choices[0].delta, "reasoning_content", None) for c in chunks if c.choices)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == msg.content


def test_forced_native_call_with_thinking_default(oai: openai.OpenAI):
    r = chat(oai, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS, tool_choice="required",
             max_tokens=64)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    assert not reasoning_of(c.message)
    call = c.message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_auto_tools_leave_the_reasoning_alone(oai: openai.OpenAI):
    """A lazy tool grammar must not start inside the reasoning: a model that
    writes `<tool_call>` while thinking is not held to a call there. With
    tools on `auto`, the reasoning is what it is with `none` (the same
    prompt, nothing constrained)."""
    ask = [{"role": "user", "content": "Repeat exactly: <tool_call> hello"}]
    chat(oai, messages=ask, tools=TOOLS, tool_choice="none", max_tokens=48)
    auto = chat(oai, messages=ask, tools=TOOLS, tool_choice="auto", max_tokens=48).choices[0]
    none = chat(oai, messages=ask, tools=TOOLS, tool_choice="none", max_tokens=48).choices[0]
    assert reasoning_of(auto.message) == reasoning_of(none.message)
    assert "<tool_call>" in (reasoning_of(none.message) or ""), "the model writes the opener while thinking"
    assert not auto.message.tool_calls
    assert auto.finish_reason == none.finish_reason


# --- Anthropic ------------------------------------------------------------------------

def tokens_in(url: str, text: str) -> int:
    from hearth_http import post

    reply = post(url + "/tokenize", {"content": text})
    assert reply.status == 200, reply.text
    return len(reply.json()["tokens"])


# Greedy SmolLM2 reasons about this story for well over 1024 tokens without
# ending it: every run reaches the budget, so every run shows the engine
# closing the reasoning.
BUDGET = 1024


def assert_budget_enforced(think_url: str, m) -> None:
    assert m.usage.output_tokens > BUDGET, (
        f"the model stopped after {m.usage.output_tokens} tokens: the prompt no longer reaches the budget")
    assert [b.type for b in m.content] == ["thinking", "text"], m.content
    thinking, text = m.content
    assert thinking.thinking.strip() and thinking.signature
    assert "</think>" not in thinking.thinking and "</think>" not in text.text
    assert text.text.strip(), "no answer after the closed reasoning"
    # The reasoning stopped at the budget: within it, and not far short.
    spent = tokens_in(think_url, thinking.thinking)
    assert BUDGET - 64 <= spent <= BUDGET, f"{spent} tokens of reasoning for a budget of {BUDGET}"


@pytest.mark.slow  # about 16 s on 2 CPU cores: 1100 tokens
def test_thinking_budget_closes_the_reasoning(claude: anthropic.Anthropic, think_url: str, record_property):
    t0 = time.monotonic()
    m = claude.messages.create(model=MODEL, max_tokens=1100, messages=STORY,
                               thinking={"type": "enabled", "budget_tokens": BUDGET}, extra_body=GREEDY)
    elapsed = time.monotonic() - t0
    record_property("thinking_budget_seconds", round(elapsed, 1))
    print(f"thinking budget 1024 + answer: {elapsed:.1f} s, {m.usage.output_tokens} output tokens")
    assert m.stop_reason == "max_tokens", m.stop_reason
    assert_budget_enforced(think_url, m)


def test_thinking_streams_thinking_then_signature(claude: anthropic.Anthropic):
    """Without a `</think>`, the stream is one thinking block, signed."""
    events = [e for e in claude.messages.create(model=MODEL, max_tokens=16, messages=STORY, stream=True,
                                                thinking={"type": "adaptive"}, extra_body=GREEDY)]
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop", kinds
    starts = [e.content_block.type for e in events if e.type == "content_block_start"]
    assert starts[0] == "thinking", starts
    deltas = [e.delta.type for e in events if e.type == "content_block_delta"]
    first_sig = deltas.index("signature_delta")
    assert set(deltas[:first_sig]) == {"thinking_delta"}, deltas

    with claude.messages.stream(model=MODEL, max_tokens=16, messages=STORY, thinking={"type": "adaptive"},
                                extra_body=GREEDY) as s:
        final = s.get_final_message()
    assert final.content[0].type == "thinking" and final.content[0].signature
    assert final.stop_reason == "max_tokens"


@pytest.mark.slow
def test_thinking_budget_streamed(claude: anthropic.Anthropic, think_url: str):
    """thinking_delta..., signature_delta, then a text block."""
    t0 = time.monotonic()
    with claude.messages.stream(model=MODEL, max_tokens=1100, messages=STORY,
                                thinking={"type": "enabled", "budget_tokens": BUDGET}, extra_body=GREEDY) as s:
        events = [e for e in s]
        final = s.get_final_message()
    print(f"streamed thinking budget: {time.monotonic() - t0:.1f} s")
    order = []
    for e in events:
        if e.type == "content_block_start":
            order.append(("start", e.content_block.type))
        elif e.type == "content_block_delta" and (not order or order[-1] != ("delta", e.delta.type)):
            order.append(("delta", e.delta.type))
    assert order == [("start", "thinking"), ("delta", "thinking_delta"), ("delta", "signature_delta"),
                     ("start", "text"), ("delta", "text_delta")], order
    assert_budget_enforced(think_url, final)


@pytest.mark.slow  # about 20 s on 2 CPU cores
def test_call_after_budgeted_reasoning_is_replayed_exactly(claude: anthropic.Anthropic, think_url: str):
    """A call made after reasoning that the prompt opened: the round trip
    replays the reply from the prompt's `<think>\n` on, so the KV cache
    covers the whole first request, reasoning and call."""
    tools = [{"name": "get_weather", "description": "Get the weather for a city", "input_schema": WEATHER}]
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = claude.messages.create(model=MODEL, max_tokens=1100, messages=ask, tools=tools, tool_choice={"type": "any"},
                                   thinking={"type": "enabled", "budget_tokens": 1024}, extra_body=GREEDY)
    assert [b.type for b in first.content] == ["thinking", "tool_use"], first.content
    thinking, use = first.content
    jsonschema.validate(use.input, WEATHER)
    assert first.stop_reason == "tool_use"
    history = [*ask, {"role": "assistant", "content": first.content},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 degrees"}]}]
    second = claude.messages.create(model=MODEL, max_tokens=8, messages=history, tools=tools,
                                    thinking={"type": "disabled"}, extra_body=GREEDY)
    u1, u2 = first.usage, second.usage
    whole_first = u1.input_tokens + (u1.cache_read_input_tokens or 0) + u1.output_tokens
    assert (u2.cache_read_input_tokens or 0) >= whole_first - 1, (u1, u2)
    # The same history in OpenAI's shape renders the reply's exact text.
    prompt = rendered(think_url, {"tools": TOOLS, "messages": [
        *ask,
        {"role": "assistant", "content": None, "reasoning_content": thinking.thinking, "tool_calls": [
            {"id": use.id, "type": "function", "function": {"name": use.name, "arguments": json.dumps(use.input)}}]},
        {"role": "tool", "tool_call_id": use.id, "content": "18 degrees"},
    ]})
    # (The newline the model writes after the prompt's `<think>\n` is layout,
    # left out of the thinking block; it is part of the replayed text.)
    at = prompt.index("<|im_start|>assistant\n<think>\n")
    replayed = prompt[at:]
    assert replayed.removeprefix("<|im_start|>assistant\n<think>\n").lstrip("\n").startswith(thinking.thinking), replayed[:300]
    assert "</think>" in replayed and "<tool_call>" in replayed
    assert replayed.index("</think>") < replayed.index("<tool_call>")


def test_thinking_cut_short_is_one_thinking_block_streamed_or_not(claude: anthropic.Anthropic):
    kw = {"model": MODEL, "max_tokens": 8, "messages": STORY, "thinking": {"type": "adaptive"}, "extra_body": GREEDY}
    claude.messages.create(**kw)
    m = claude.messages.create(**kw)  # a repeat, computed as the stream will be
    assert m.stop_reason == "max_tokens"
    assert [b.type for b in m.content] == ["thinking"], m.content
    with claude.messages.stream(**kw) as s:
        final = s.get_final_message()
    assert [b.type for b in final.content] == ["thinking"], final.content
    assert final.content[0].signature == m.content[0].signature
    assert final.content[0].thinking == m.content[0].thinking


def test_thinking_disabled_gives_text_only(claude: anthropic.Anthropic):
    m = claude.messages.create(model=MODEL, max_tokens=16, messages=ASK, thinking={"type": "disabled"},
                               extra_body=GREEDY)
    assert [b.type for b in m.content] == ["text"], m.content
    assert m.content[0].text.strip()


def test_thinking_in_history_is_rendered_and_counted(claude: anthropic.Anthropic):
    def count(thinking: str) -> int:
        return claude.messages.count_tokens(model=MODEL, messages=[
            *ASK,
            {"role": "assistant", "content": [{"type": "thinking", "thinking": thinking, "signature": "s"},
                                              {"type": "text", "text": "4"}]},
            {"role": "user", "content": "And 3+3?"},
        ]).input_tokens

    assert count("Two plus two is four, a simple sum of small numbers.") > count("Sum.")

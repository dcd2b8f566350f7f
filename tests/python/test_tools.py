"""Tool calling through the official SDKs: OpenAI chat completions and
Anthropic Messages, against the real binary and SmolLM2 (whose template has
no tools: hearth's fallback system prompt and Hermes `<tool_call>` markup).

Forced choices (`required`, a named function, Anthropic `any`/`tool`) run
under a grammar built from the tool's JSON Schema, so even a 135M model
writes a valid call; every call is checked against its schema here.
"""

from __future__ import annotations

import copy
import json

import anthropic
import jsonschema
import openai
import pytest

from hearth_http import ANTHROPIC_ERROR_SCHEMA, OPENAI_ERROR_SCHEMA, assert_client_error, post, openai_client, anthropic_client

MODEL = "any-model-name"
HEADERS = {"anthropic-version": "2023-06-01", "x-api-key": "x"}
GREEDY = {"temperature": 0}

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "The city name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_SCHEMA = {
    "type": "object",
    "properties": {"timezone": {"type": "string"}, "hours24": {"type": "boolean"}},
    "required": ["timezone", "hours24"],
    "additionalProperties": False,
}
SCHEMAS = {"get_weather": WEATHER_SCHEMA, "get_time": TIME_SCHEMA}
DESCRIPTIONS = {"get_weather": "Get the current weather in a city.", "get_time": "Get the current time in a timezone."}

OPENAI_TOOLS = [
    {"type": "function", "function": {"name": n, "description": DESCRIPTIONS[n], "parameters": s}}
    for n, s in SCHEMAS.items()
]
ANTHROPIC_TOOLS = [{"name": n, "description": DESCRIPTIONS[n], "input_schema": s} for n, s in SCHEMAS.items()]

ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]
NAMED_TIME = {"type": "function", "function": {"name": "get_time"}}


# --- helpers -------------------------------------------------------------------

@pytest.fixture(scope="module")
def oai(base_url: str) -> openai.OpenAI:
    return openai_client(base_url, 120)


@pytest.fixture(scope="module")
def claude(base_url: str) -> anthropic.Anthropic:
    return anthropic_client(base_url, 120)


def chat(client: openai.OpenAI, **kw):
    args = {"model": MODEL, "messages": ASK, "tools": OPENAI_TOOLS, "max_tokens": 64, "temperature": 0}
    args.update(kw)
    return client.chat.completions.create(**args)


def stream_chat(client: openai.OpenAI, **kw) -> list:
    return list(chat(client, stream=True, stream_options={"include_usage": True}, **kw))


def check_args(name: str, arguments) -> dict:
    """A call's arguments (JSON text or a dict) parse and follow the tool's schema."""
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    assert isinstance(args, dict), arguments
    jsonschema.validate(args, SCHEMAS[name])
    return args


def streamed_calls(chunks: list) -> tuple[list[dict], str, str | None]:
    """Rebuild the calls of a chat stream, checking the delta protocol: one
    header delta per call (index, id, type, name) and then only argument
    fragments. Returns (calls, content, finish_reason)."""
    calls: dict[int, dict] = {}
    content = ""
    finishes = []
    for c in chunks:
        if not c.choices:
            continue
        choice = c.choices[0]
        if choice.finish_reason:
            finishes.append(choice.finish_reason)
        d = choice.delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            if tc.index not in calls:
                assert tc.id and tc.type == "function" and tc.function and tc.function.name, \
                    f"the first delta of call {tc.index} must carry its id, type and name: {tc}"
                assert tc.index == len(calls), "calls are numbered from 0, in order"
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": tc.function.arguments or "",
                                   "fragments": 0}
            else:
                assert tc.id is None and (tc.function.name is None), \
                    f"later deltas of call {tc.index} carry only argument fragments: {tc}"
                assert tc.function.arguments is not None
                calls[tc.index]["arguments"] += tc.function.arguments
                calls[tc.index]["fragments"] += 1
    assert len(finishes) == 1, finishes
    return [calls[i] for i in sorted(calls)], content, finishes[0]


def settled(request):
    """A request made twice; the second reply. Greedy output is repeatable
    only between requests computed alike: a prompt the KV cache holds whole
    is recomputed as on a cold start, while the first request may have
    reused part of an earlier prompt (a batch split differently, logits
    rounded differently). The second run is computed as every identical
    request after it will be."""
    request()
    return request()


def anthropic_create(client: anthropic.Anthropic, **kw):
    args = {"model": MODEL, "messages": ASK, "tools": ANTHROPIC_TOOLS, "max_tokens": 64, "extra_body": GREEDY}
    args.update(kw)
    return client.messages.create(**args)


def prompt_tokens(usage) -> int:
    return usage.input_tokens + (usage.cache_read_input_tokens or 0) + (usage.cache_creation_input_tokens or 0)


# --- OpenAI: forced calls ------------------------------------------------------

@pytest.mark.parametrize("choice,want", [("required", None), (NAMED_TIME, "get_time")], ids=["required", "named"])
def test_openai_forced_call(oai: openai.OpenAI, choice, want):
    r = chat(oai, tool_choice=choice)
    choice0 = r.choices[0]
    assert choice0.finish_reason == "tool_calls", r
    msg = choice0.message
    assert msg.content is None, f"a reply that only calls has no content: {msg.content!r}"
    assert msg.tool_calls and len(msg.tool_calls) == 1, "a forced choice is met by one call"
    call = msg.tool_calls[0]
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name in SCHEMAS
    if want:
        assert call.function.name == want
    check_args(call.function.name, call.function.arguments)
    assert r.usage.completion_tokens >= 5


@pytest.mark.parametrize("choice", ["required", NAMED_TIME], ids=["required", "named"])
def test_openai_forced_call_streamed_matches_non_streamed(oai: openai.OpenAI, choice):
    whole = settled(lambda: chat(oai, tool_choice=choice)).choices[0].message.tool_calls[0]
    chunks = stream_chat(oai, tool_choice=choice)
    calls, content, finish = streamed_calls(chunks)
    assert finish == "tool_calls"
    assert content == "", f"no visible text around a forced call: {content!r}"
    assert len(calls) == 1
    got = calls[0]
    assert got["id"].startswith("call_")
    assert got["name"] == whole.function.name
    assert got["fragments"] >= 1, "arguments stream as fragments after the header"
    assert got["arguments"] == whole.function.arguments, "the fragments concatenate exactly to the arguments"
    check_args(got["name"], got["arguments"])
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens >= 5


def test_openai_tool_choice_none_gives_text(oai: openai.OpenAI):
    r = settled(lambda: chat(oai, tool_choice="none", max_tokens=24))
    c = r.choices[0]
    assert not c.message.tool_calls
    assert isinstance(c.message.content, str)
    assert c.finish_reason in ("stop", "length")
    calls, content, finish = streamed_calls(stream_chat(oai, tool_choice="none", max_tokens=24))
    assert calls == []
    assert content == c.message.content
    assert finish == c.finish_reason


def round_trip_messages(call) -> list:
    return [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"},
    ]


@pytest.fixture(scope="module")
def forced_call(oai: openai.OpenAI):
    """One call the model made (tool_choice required), for the round trips."""
    return chat(oai, tool_choice="required").choices[0].message.tool_calls[0]


@pytest.fixture(scope="module")
def forced_use(claude: anthropic.Anthropic):
    return next(b for b in anthropic_create(claude, tool_choice={"type": "any"}).content if b.type == "tool_use")


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_openai_round_trip_gives_text(oai: openai.OpenAI, forced_call, stream: bool):
    call = forced_call
    messages = round_trip_messages(call)
    if stream:
        calls, content, finish = streamed_calls(stream_chat(oai, messages=messages, tool_choice="none", max_tokens=32))
        assert calls == []
    else:
        r = chat(oai, messages=messages, tool_choice="none", max_tokens=32)
        content, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert not r.choices[0].message.tool_calls
    assert finish in ("stop", "length")
    assert isinstance(content, str) and content.strip()


def test_openai_round_trip_with_auto_is_well_formed(oai: openai.OpenAI, forced_call):
    """`auto` after a result: the model may answer or call again; either way
    the reply is well formed (a lazy grammar only constrains a call)."""
    r = chat(oai, messages=round_trip_messages(forced_call), tool_choice="auto", max_tokens=48)
    c = r.choices[0]
    if c.message.tool_calls:
        assert c.finish_reason in ("tool_calls", "length")
        for tc in c.message.tool_calls:
            assert tc.function.name in SCHEMAS
            if c.finish_reason == "tool_calls":
                check_args(tc.function.name, tc.function.arguments)
    else:
        assert c.finish_reason in ("stop", "length")
        assert isinstance(c.message.content, str)


# --- Anthropic: forced calls ---------------------------------------------------

@pytest.mark.parametrize("choice,want", [({"type": "any"}, None), ({"type": "tool", "name": "get_time"}, "get_time")],
                         ids=["any", "tool"])
def test_anthropic_forced_tool_use(claude: anthropic.Anthropic, choice, want):
    m = anthropic_create(claude, tool_choice=choice)
    assert m.stop_reason == "tool_use", m
    uses = [b for b in m.content if b.type == "tool_use"]
    assert len(uses) == 1, m.content
    assert [b.type for b in m.content] == ["tool_use"], "no text around a forced call"
    use = uses[0]
    assert use.id.startswith("toolu_")
    assert use.name in SCHEMAS
    if want:
        assert use.name == want
    assert isinstance(use.input, dict)
    check_args(use.name, use.input)


@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "get_time"}], ids=["any", "tool"])
def test_anthropic_forced_tool_use_streamed(claude: anthropic.Anthropic, choice):
    whole = next(b for b in settled(lambda: anthropic_create(claude, tool_choice=choice)).content if b.type == "tool_use")

    # Raw events.
    events = [e for e in anthropic_create(claude, tool_choice=choice, stream=True) if e.type != "ping"]
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"], kinds
    starts = [e for e in events if e.type == "content_block_start"]
    assert len(starts) == 1 and starts[0].content_block.type == "tool_use", kinds
    block = starts[0].content_block
    assert block.id.startswith("toolu_") and block.name == whole.name
    assert block.input == {}
    deltas = [e for e in events if e.type == "content_block_delta"]
    assert deltas and all(e.delta.type == "input_json_delta" and e.index == starts[0].index for e in deltas)
    text = "".join(e.delta.partial_json for e in deltas)
    assert json.loads(text) == whole.input, "the input_json_delta fragments concatenate to the input"
    assert events[-2].delta.stop_reason == "tool_use"

    # The SDK's stream helper accumulates the same call.
    fragments = []
    with claude.messages.stream(model=MODEL, messages=ASK, tools=ANTHROPIC_TOOLS, tool_choice=choice,
                                max_tokens=64, extra_body=GREEDY) as s:
        for ev in s:
            if ev.type == "input_json":
                fragments.append(ev.partial_json)
        final = s.get_final_message()
    assert final.stop_reason == "tool_use"
    uses = [b for b in final.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == whole.name
    assert uses[0].input == whole.input
    assert json.loads("".join(fragments)) == whole.input
    check_args(uses[0].name, uses[0].input)


def anthropic_round_trip(use, result_content, is_error: bool = False) -> list:
    result = {"type": "tool_result", "tool_use_id": use.id, "content": result_content}
    if is_error:
        result["is_error"] = True
    return [
        *ASK,
        {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},
        {"role": "user", "content": [result]},
    ]


@pytest.mark.parametrize("content,is_error", [
    ("18 degrees and sunny", False),
    ([{"type": "text", "text": "18 degrees"}, {"type": "text", "text": "sunny"}], False),
    ("the weather service is down", True),
], ids=["string", "blocks", "is_error"])
def test_anthropic_round_trip_gives_text(claude: anthropic.Anthropic, forced_use, content, is_error):
    use = forced_use
    messages = anthropic_round_trip(use, content, is_error)
    m = anthropic_create(claude, messages=messages, tool_choice={"type": "none"}, max_tokens=32)
    assert m.stop_reason in ("end_turn", "max_tokens"), m
    assert [b.type for b in m.content] == ["text"]
    assert m.content[0].text.strip()
    # The result is in the prompt: a longer result makes a longer prompt.
    longer = anthropic_round_trip(use, "18 degrees and sunny, with a light breeze from the west all afternoon")
    n_long = claude.messages.count_tokens(model=MODEL, messages=longer, tools=ANTHROPIC_TOOLS).input_tokens
    n = claude.messages.count_tokens(model=MODEL, messages=messages, tools=ANTHROPIC_TOOLS).input_tokens
    if content == "18 degrees and sunny":
        assert n_long > n


def test_anthropic_is_error_reaches_the_prompt(base_url: str):
    """is_error marks the result in the rendered prompt."""
    msgs = lambda err: [  # noqa: E731
        *ASK,
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_x1", "name": "get_weather",
                                           "input": {"city": "Paris", "unit": "celsius"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x1", "content": "boom",
                                      "is_error": err}]},
    ]
    plain = post(base_url + "/v1/messages/count_tokens", {"model": MODEL, "messages": msgs(False), "tools": ANTHROPIC_TOOLS}, HEADERS)
    error = post(base_url + "/v1/messages/count_tokens", {"model": MODEL, "messages": msgs(True), "tools": ANTHROPIC_TOOLS}, HEADERS)
    assert plain.status == 200 and error.status == 200, (plain.text, error.text)
    assert error.json()["input_tokens"] > plain.json()["input_tokens"]


# --- count_tokens ---------------------------------------------------------------

@pytest.mark.parametrize("choice", [None, {"type": "any"}], ids=["auto", "any"])
def test_count_tokens_equals_the_prompt_of_create(claude: anthropic.Anthropic, choice):
    kw = {"system": "You are a weather bot. Answer briefly.", "tools": ANTHROPIC_TOOLS}
    if choice:
        kw["tool_choice"] = choice
    counted = claude.messages.count_tokens(model=MODEL, messages=ASK, **kw).input_tokens
    m = anthropic_create(claude, max_tokens=8, **kw)
    assert counted == prompt_tokens(m.usage)
    # Without the tools the prompt is much shorter: they are counted.
    bare = claude.messages.count_tokens(model=MODEL, messages=ASK, system=kw["system"]).input_tokens
    assert bare < counted - 50


# --- exact replay ------------------------------------------------------------------

def test_exact_replay_of_a_call(oai: openai.OpenAI, base_url: str):
    """The round trip renders the model's own bytes for a call the server
    made (found by id), so the KV cache covers the first prompt and the call;
    a call the server does not know is re-rendered from its structure."""
    first = chat(oai, tool_choice="required", logprobs=True)
    call = first.choices[0].message.tool_calls[0]
    raw = "".join(t.token for t in first.choices[0].logprobs.content)
    assert "<tool_call>" in raw and call.function.name in raw, raw

    # The client sends the arguments back re-serialized (compact), as many do.
    compact = json.dumps(json.loads(call.function.arguments), separators=(",", ":"))
    assert compact != call.function.arguments

    def history(call_id: str) -> list:
        return [
            *ASK,
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": call.function.name, "arguments": compact}}]},
            {"role": "tool", "tool_call_id": call_id, "content": "18 degrees and sunny"},
        ]

    rendered = post(base_url + "/apply-template", {"messages": history(call.id), "tools": OPENAI_TOOLS})
    assert rendered.status == 200, rendered.text
    assert raw in rendered.json()["prompt"], "the history holds the model's exact bytes"
    made_up = post(base_url + "/apply-template", {"messages": history("call_madeup000"), "tools": OPENAI_TOOLS})
    assert raw not in made_up.json()["prompt"]
    assert compact in made_up.json()["prompt"]

    second = chat(oai, messages=history(call.id), tool_choice="none", max_tokens=8)
    u1, u2 = first.usage, second.usage
    # Everything request 1 put in the KV cache: its prompt and every
    # generated token but the end-of-turn token (never decoded).
    assert u2.prompt_tokens_details.cached_tokens >= u1.prompt_tokens + u1.completion_tokens - 1, (u1, u2)

    third = chat(oai, messages=history("call_madeup000"), tool_choice="none", max_tokens=8)
    assert third.usage.prompt_tokens_details.cached_tokens < u2.prompt_tokens_details.cached_tokens, (u2, third.usage)


def test_replay_follows_the_call_the_client_sends(oai: openai.OpenAI, base_url: str):
    """A call sent back with the server's id but other arguments (the client
    changed them) is rendered as sent, not as the model first wrote it."""
    call = chat(oai, tool_choice="required").choices[0].message.tool_calls[0]
    args = json.loads(call.function.arguments)
    args[next(iter(args))] = "Reykjavik"
    edited = json.dumps(args)

    def history(arguments: str) -> dict:
        return {"tools": OPENAI_TOOLS, "messages": [
            *ASK,
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": call.id, "content": "ok"},
        ]}

    prompt = post(base_url + "/apply-template", history(edited)).json()["prompt"]
    assert "Reykjavik" in prompt
    assert call.function.arguments not in prompt
    # The same arguments, spaced differently, are the same call: replayed.
    same = json.dumps(json.loads(call.function.arguments), separators=(",", ":"))
    prompt = post(base_url + "/apply-template", history(same)).json()["prompt"]
    assert call.function.arguments in prompt and same not in prompt


# --- bad histories and tool definitions ----------------------------------------------

GOOD_CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}


def oai_body(**kw) -> dict:
    body = {"model": MODEL, "messages": ASK, "tools": OPENAI_TOOLS, "max_tokens": 4}
    body.update(kw)
    return body


OPENAI_BAD = {
    "unknown tool_call_id": oai_body(messages=[
        *ASK, {"role": "assistant", "content": None, "tool_calls": [GOOD_CALL]},
        {"role": "tool", "tool_call_id": "call_nope", "content": "x"}]),
    "tool result with no call at all": oai_body(messages=[*ASK, {"role": "tool", "tool_call_id": "call_1", "content": "x"}]),
    "arguments not json": oai_body(messages=[
        *ASK, {"role": "assistant", "content": None, "tool_calls": [
            {**GOOD_CALL, "function": {"name": "get_weather", "arguments": "not json"}}]}]),
    "arguments a json array": oai_body(messages=[
        *ASK, {"role": "assistant", "content": None, "tool_calls": [
            {**GOOD_CALL, "function": {"name": "get_weather", "arguments": "[1, 2]"}}]}]),
    "tool message without tool_call_id": oai_body(messages=[
        *ASK, {"role": "assistant", "content": None, "tool_calls": [GOOD_CALL]}, {"role": "tool", "content": "x"}]),
    "tool_choice names an unknown tool": oai_body(tool_choice={"type": "function", "function": {"name": "nope"}}),
    "tool_choice required without tools": {"model": MODEL, "messages": ASK, "max_tokens": 4, "tool_choice": "required"},
    "tool_choice a bad string": oai_body(tool_choice="sometimes"),
    "duplicate tool names": oai_body(tools=[OPENAI_TOOLS[0], OPENAI_TOOLS[0]]),
    "bad tool name": oai_body(tools=[{"type": "function", "function": {"name": "has space", "parameters": WEATHER_SCHEMA}}]),
    "parameters not an object": oai_body(tools=[{"type": "function", "function": {"name": "f", "parameters": [1]}}]),
    "parameters schema unusable": oai_body(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": 12}}}],
                                         tool_choice="required"),
    "tool of another type": oai_body(tools=[{"type": "web_search"}]),
}


@pytest.mark.parametrize("body", OPENAI_BAD.values(), ids=OPENAI_BAD.keys())
@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_openai_bad_tool_request_is_400(base_url: str, body, stream: bool):
    reply = post(base_url + "/v1/chat/completions", {**body, "stream": stream})
    err = assert_client_error(reply, OPENAI_ERROR_SCHEMA)
    assert err["error"]["type"] == "invalid_request_error"


def test_openai_bad_history_names_the_message(base_url: str):
    err = post(base_url + "/v1/chat/completions", OPENAI_BAD["unknown tool_call_id"]).json()["error"]
    assert err["param"] == "messages[2]", err
    assert "call_nope" in err["message"]
    err = post(base_url + "/v1/chat/completions", OPENAI_BAD["tool_choice names an unknown tool"]).json()["error"]
    assert err["param"] == "tool_choice", err


def anth_body(**kw) -> dict:
    body = {"model": MODEL, "messages": ASK, "tools": ANTHROPIC_TOOLS, "max_tokens": 4}
    body.update(kw)
    return body


USE = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris", "unit": "celsius"}}

ANTHROPIC_BAD = {
    "unknown tool_use_id": anth_body(messages=[
        *ASK, {"role": "assistant", "content": [USE]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_nope", "content": "x"}]}]),
    "tool_use input a string": anth_body(messages=[
        *ASK, {"role": "assistant", "content": [{**USE, "input": '{"city": "Paris"}'}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "x"}]}]),
    "tool_use in a user message": anth_body(messages=[{"role": "user", "content": [USE]}]),
    "tool_result in an assistant message": anth_body(messages=[
        *ASK, {"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "x"}]}]),
    "tool_result without tool_use_id": anth_body(messages=[
        *ASK, {"role": "assistant", "content": [USE]},
        {"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]),
    "tool_result content a number": anth_body(messages=[
        *ASK, {"role": "assistant", "content": [USE]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": 7}]}]),
    "tool_choice names an unknown tool": anth_body(tool_choice={"type": "tool", "name": "nope"}),
    "tool_choice any without tools": {"model": MODEL, "messages": ASK, "max_tokens": 4, "tool_choice": {"type": "any"}},
    "duplicate tool names": anth_body(tools=[ANTHROPIC_TOOLS[0], ANTHROPIC_TOOLS[0]]),
    "tool without input_schema": anth_body(tools=[{"name": "f", "description": "d"}]),
}


@pytest.mark.parametrize("body", ANTHROPIC_BAD.values(), ids=ANTHROPIC_BAD.keys())
@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"], ids=["messages", "count_tokens"])
def test_anthropic_bad_tool_request_is_400(base_url: str, body, path: str):
    reply = post(base_url + path, body, HEADERS)
    err = assert_client_error(reply, ANTHROPIC_ERROR_SCHEMA)
    assert err["error"]["type"] == "invalid_request_error"


def test_sdks_raise_bad_request_for_bad_histories(oai: openai.OpenAI, claude: anthropic.Anthropic):
    body = copy.deepcopy(OPENAI_BAD["unknown tool_call_id"])
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(**body)
    body = copy.deepcopy(ANTHROPIC_BAD["unknown tool_use_id"])
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(**body)


# --- one call or several ---------------------------------------------------------

# SmolLM2 repeats what it is told: two calls in a row, under `auto`.
TWO_CALLS = [{"role": "user", "content": (
    'Repeat after me: <tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>\n'
    '<tool_call>{"name": "get_weather", "arguments": {"city": "London", "unit": "celsius"}}</tool_call>')}]


def test_parallel_tool_calls_false_allows_one_call(oai: openai.OpenAI):
    """`parallel_tool_calls: false` holds an `auto` reply to one call; the
    same request with it true (the default) makes more."""
    both = settled(lambda: chat(oai, messages=TWO_CALLS, max_tokens=96)).choices[0]
    # (The same prompt, now held whole by the cache: computed as the second run was.)
    one = chat(oai, messages=TWO_CALLS, max_tokens=96, parallel_tool_calls=False).choices[0]
    calls = lambda m: [(c.function.name, check_args(c.function.name, c.function.arguments))  # noqa: E731
                       for c in m.tool_calls or []]
    assert len(calls(both.message)) >= 2, both.message
    assert calls(one.message) == calls(both.message)[:1], one.message
    assert both.finish_reason == one.finish_reason == "tool_calls"
    # Streamed, the same one call.
    streamed, _, finish = streamed_calls(stream_chat(oai, messages=TWO_CALLS, max_tokens=96,
                                                     parallel_tool_calls=False))
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed] == calls(one.message)
    assert finish == "tool_calls"


def test_disable_parallel_tool_use_allows_one_call(claude: anthropic.Anthropic):
    """Anthropic's `disable_parallel_tool_use` on `auto`: one tool_use
    block; without it, more."""
    both = settled(lambda: anthropic_create(claude, messages=TWO_CALLS, max_tokens=96, tool_choice={"type": "auto"}))
    one = anthropic_create(claude, messages=TWO_CALLS, max_tokens=96,
                           tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    uses = lambda m: [(b.name, check_args(b.name, b.input)) for b in m.content if b.type == "tool_use"]  # noqa: E731
    assert len(uses(both)) >= 2, both.content
    assert uses(one) == uses(both)[:1], one.content
    assert one.stop_reason == both.stop_reason == "tool_use"


def test_responses_parallel_tool_calls_false_allows_one_call(base_url: str):
    """The Responses API's `parallel_tool_calls: false`, echoed and held."""
    client = openai_client(base_url, 120)
    tools = [{"type": "function", "name": t["function"]["name"], "description": t["function"]["description"],
              "parameters": t["function"]["parameters"]} for t in OPENAI_TOOLS]
    args = {"model": MODEL, "input": TWO_CALLS[0]["content"], "tools": tools, "max_output_tokens": 96,
            "temperature": 0}
    both = settled(lambda: client.responses.create(**args))
    one = client.responses.create(**args, parallel_tool_calls=False)
    calls = lambda r: [(i.name, check_args(i.name, i.arguments)) for i in r.output  # noqa: E731
                       if i.type == "function_call"]
    assert len(calls(both)) >= 2, both.output
    assert calls(one) == calls(both)[:1], one.output
    assert one.parallel_tool_calls is False and both.parallel_tool_calls is True

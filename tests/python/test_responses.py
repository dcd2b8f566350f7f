"""OpenAI Responses (`/v1/responses`), through the official `openai` SDK and raw HTTP."""

from __future__ import annotations

import json

import openai
import pytest

from hearth_http import OPENAI_ERROR_SCHEMA, anthropic_client, assert_client_error, post, request, openai_client

MODEL = "any-model-name"
# SmolLM2 answers this in 10 tokens at temperature 0, so replies complete.
QUESTION = "Hi"
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather for a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
# A forced call in the fallback convention takes about 31 tokens.
CALL_TOKENS = 48


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai_client(base_url, 120)


def create(client: openai.OpenAI, **kw):
    args = {"model": MODEL, "input": QUESTION, "max_output_tokens": 24, "temperature": 0}
    args.update(kw)
    return client.responses.create(**args)


def stream_events(client: openai.OpenAI, **kw) -> list:
    return list(create(client, stream=True, **kw))


def check_event_order(events: list) -> None:
    """The documented order: created, in_progress, then each item's events
    nested in its added/done pair, then one terminal event; sequence numbers
    count up from 0."""
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created"
    assert events[0].response.status == "in_progress"
    assert events[1].type == "response.in_progress"
    assert events[-1].type in ("response.completed", "response.incomplete")
    body = events[2:-1]
    i = 0
    output_index = 0
    while i < len(body):
        added = body[i]
        assert added.type == "response.output_item.added", [e.type for e in body]
        assert added.output_index == output_index
        kind = added.item.type
        i += 1
        inner = []
        while body[i].type != "response.output_item.done":
            inner.append(body[i])
            i += 1
        done = body[i]
        i += 1
        assert done.output_index == output_index and done.item.id == added.item.id
        types = [e.type for e in inner]
        if kind == "message":
            assert types[0] == "response.content_part.added"
            assert set(types[1:-2]) <= {"response.output_text.delta"}
            assert types[-2:] == ["response.output_text.done", "response.content_part.done"]
        elif kind == "function_call":
            assert set(types[:-1]) <= {"response.function_call_arguments.delta"}
            assert types[-1] == "response.function_call_arguments.done"
        elif kind == "reasoning":
            assert types[0] == "response.content_part.added"
            assert set(types[1:-2]) <= {"response.reasoning_text.delta"}
            assert types[-2:] == ["response.reasoning_text.done", "response.content_part.done"]
        else:
            pytest.fail(f"unexpected item type {kind}")
        for e in inner:
            assert e.item_id == added.item.id and e.output_index == output_index
        output_index += 1
    assert output_index == len(events[-1].response.output)


# --- text --------------------------------------------------------------------

def test_text_response_with_usage(client: openai.OpenAI):
    r = create(client)
    assert r.object == "response"
    assert r.id.startswith("resp_")
    assert r.status == "completed", r
    assert r.incomplete_details is None and r.error is None
    assert r.model == MODEL
    assert [item.type for item in r.output] == ["message"]
    msg = r.output[0]
    assert msg.id.startswith("msg_") and msg.role == "assistant" and msg.status == "completed"
    assert msg.content[0].type == "output_text"
    assert r.output_text.strip()
    u = r.usage
    assert u.input_tokens > 0 and 0 < u.output_tokens <= 24
    assert u.total_tokens == u.input_tokens + u.output_tokens
    assert u.input_tokens_details.cached_tokens >= 0
    assert u.output_tokens_details.reasoning_tokens == 0
    assert r.max_output_tokens == 24 and r.temperature == 0
    assert r.tools == [] and r.tool_choice == "auto" and r.parallel_tool_calls is True


def test_seed_makes_sampling_repeatable(client: openai.OpenAI):
    """`seed`, `top_k` and `min_p` are llama-server's, taken here too."""
    texts = [create(client, input="Tell me a story.", max_output_tokens=32, temperature=1.0,
                    extra_body={"seed": s, "top_k": 40, "min_p": 0.05}).output_text for s in (7, 7, 7, 8, 9)]
    # The first may have reused part of an earlier prompt; repeats of one
    # prompt are computed alike.
    assert texts[1] == texts[2]
    assert len(set(texts[2:])) > 1, texts


def test_instructions_are_a_system_message_first(client: openai.OpenAI):
    rules = "You answer in one short sentence."
    r = create(client, instructions=rules)
    assert r.instructions == rules
    as_message = create(client, input=[{"role": "system", "content": rules}, {"role": "user", "content": QUESTION}])
    assert as_message.instructions is None
    assert r.usage.input_tokens == as_message.usage.input_tokens
    assert r.output_text.strip()


def test_items_without_type_and_content_parts(client: openai.OpenAI):
    as_string = create(client)
    for item in ({"role": "user", "content": QUESTION},
                 {"type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]}):
        r = create(client, input=[item])
        assert r.usage.input_tokens == as_string.usage.input_tokens, item
        assert r.output_text.strip()


def test_streaming_events_in_documented_order(client: openai.OpenAI):
    events = stream_events(client)
    check_event_order(events)
    final = events[-1]
    assert final.type == "response.completed"
    assert final.response.status == "completed" and final.response.usage.output_tokens > 0
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = [e.text for e in events if e.type == "response.output_text.done"]
    assert done == [deltas]
    assert final.response.output[0].content[0].text == deltas
    # The same request, not streamed, says the same (greedy).
    assert create(client).output_text == deltas


def test_stream_events_are_named_sse_events(base_url: str):
    reply = post(base_url + "/v1/responses", {"model": MODEL, "input": QUESTION, "max_output_tokens": 8,
                                              "temperature": 0, "stream": True})
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/event-stream")
    frames = [f for f in reply.text.split("\n\n") if f.strip() and not f.startswith(":")]
    assert frames
    for frame in frames:
        lines = frame.split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), frame
        assert json.loads(lines[1][len("data: "):])["type"] == lines[0][len("event: "):]
    assert "[DONE]" not in reply.text


def test_max_output_tokens_one_is_incomplete(client: openai.OpenAI):
    r = create(client, max_output_tokens=1)
    assert r.status == "incomplete"
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 1
    assert r.output[-1].status == "incomplete"
    events = stream_events(client, max_output_tokens=1)
    check_event_order(events)
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"


# --- stored responses ----------------------------------------------------------------

def test_previous_response_id_continues_the_conversation(client: openai.OpenAI):
    first = create(client, input="My name is Ana.", max_output_tokens=8)
    second = create(client, input="What is my name?", max_output_tokens=8, previous_response_id=first.id)
    assert second.previous_response_id == first.id
    # The second prompt holds the first exchange.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    # A streamed response is stored too, and can be continued.
    streamed = stream_events(client, input="And my age is 30.", max_output_tokens=8, previous_response_id=second.id)
    third_id = streamed[-1].response.id
    third = create(client, input="Thanks.", max_output_tokens=4, previous_response_id=third_id)
    assert third.usage.input_tokens > second.usage.input_tokens


def test_unknown_previous_response_id_is_400(client: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as info:
        create(client, previous_response_id="resp_doesnotexist")
    body = info.value.body
    assert body["code"] == "previous_response_not_found"
    assert body["param"] == "previous_response_id"
    assert "resp_doesnotexist" in body["message"]


def test_retrieve_a_stored_response(client: openai.OpenAI, base_url: str):
    r = create(client, max_output_tokens=4)
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.status == r.status
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_doesnotexist")
    reply = request("GET", base_url + "/v1/responses/resp_doesnotexist")
    assert_client_error(reply, OPENAI_ERROR_SCHEMA, status=404)


def test_delete_a_stored_response(client: openai.OpenAI, base_url: str):
    r = create(client, max_output_tokens=4)
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(r.id)
    with pytest.raises(openai.BadRequestError):
        create(client, previous_response_id=r.id)
    assert_client_error(request("DELETE", base_url + "/v1/responses/" + r.id), OPENAI_ERROR_SCHEMA, status=404)


def test_input_tokens_count_equals_the_usage_of_create(client: openai.OpenAI):
    args = {"input": [{"role": "user", "content": "What is the weather in Paris?"}],
            "instructions": "Be brief.", "tools": [WEATHER_TOOL]}
    counted = client.responses.input_tokens.count(model=MODEL, **args)
    assert counted.object == "response.input_tokens"
    r = create(client, max_output_tokens=4, **args)
    assert counted.input_tokens == r.usage.input_tokens
    # A continuation counts the stored conversation too.
    follow = {"previous_response_id": r.id, "input": "And in Rome?"}
    counted = client.responses.input_tokens.count(model=MODEL, **follow)
    assert counted.input_tokens == create(client, max_output_tokens=4, **follow).usage.input_tokens
    with pytest.raises(openai.BadRequestError):
        client.responses.input_tokens.count(model=MODEL, previous_response_id="resp_doesnotexist", input="x")


def test_counts_past_the_context_are_counts(small_ctx_url: str):
    """A client counts to learn whether its conversation still fits: past
    the 256-token context the count is an answer (the request itself is a
    400)."""
    client = openai_client(small_ctx_url, 120)
    long_input = "word " * 400
    n = client.responses.input_tokens.count(model=MODEL, input=long_input).input_tokens
    assert n > 256
    with pytest.raises(openai.BadRequestError):
        create(client, input=long_input)
    claude = anthropic_client(small_ctx_url, 120)
    counted = claude.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": long_input}])
    assert counted.input_tokens > 256


def test_store_false_keeps_nothing(client: openai.OpenAI):
    r = create(client, max_output_tokens=4, store=False)
    assert r.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.BadRequestError):
        create(client, previous_response_id=r.id)


# --- function calls ----------------------------------------------------------------

def test_function_call_round_trip(client: openai.OpenAI):
    question = {"role": "user", "content": "What is the weather in Paris?"}
    r = create(client, input=[question], tools=[WEATHER_TOOL], tool_choice="required", max_output_tokens=CALL_TOKENS)
    assert r.status == "completed", r
    calls = [item for item in r.output if item.type == "function_call"]
    assert len(calls) == 1, r.output
    call = calls[0]
    assert call.name == "get_weather" and call.status == "completed"
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    args = json.loads(call.arguments)
    assert isinstance(args.get("city"), str), args
    assert r.tools[0].name == "get_weather" and r.tool_choice == "required"

    # The whole history, as items.
    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature_c": 18, "sky": "clear"}'}
    history = [question, {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments}, result]
    answer = create(client, input=history, tools=[WEATHER_TOOL], tool_choice="none")
    assert [item.type for item in answer.output] == ["message"], answer.output
    assert answer.output_text.strip()

    # The same, continuing the stored response: only the result is sent.
    cont = create(client, input=[result], previous_response_id=r.id, tools=[WEATHER_TOOL], tool_choice="none")
    assert [item.type for item in cont.output] == ["message"], cont.output
    # The stored conversation renders to the very same prompt.
    assert cont.usage.input_tokens == answer.usage.input_tokens


def test_streamed_function_call(client: openai.OpenAI):
    events = stream_events(client, input="What is the weather in Rome?", tools=[WEATHER_TOOL],
                           tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=CALL_TOKENS)
    check_event_order(events)
    assert events[-1].type == "response.completed"
    added = [e for e in events if e.type == "response.output_item.added" and e.item.type == "function_call"]
    assert len(added) == 1
    assert added[0].item.call_id.startswith("call_") and added[0].item.name == "get_weather"
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and done[0].arguments == deltas
    assert isinstance(json.loads(deltas)["city"], str)
    item = [e.item for e in events if e.type == "response.output_item.done" and e.item.type == "function_call"][0]
    assert item.arguments == deltas and item.call_id == added[0].item.call_id
    assert events[-1].response.output[-1].arguments == deltas


def test_hosted_tools_are_ignored(client: openai.OpenAI):
    r = create(client, tools=[{"type": "web_search"}, {"type": "local_shell"}, WEATHER_TOOL], tool_choice="auto")
    assert r.status in ("completed", "incomplete")
    assert len(r.tools) == 3


def test_json_schema_text_format(client: openai.OpenAI):
    schema = {"type": "object", "properties": {"capital": {"type": "string"}}, "required": ["capital"],
              "additionalProperties": False}
    r = create(client, max_output_tokens=24,
               text={"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}})
    assert r.text.format.type == "json_schema"
    if r.status == "completed":
        assert isinstance(json.loads(r.output_text)["capital"], str)


# --- truncation ----------------------------------------------------------------------

def _long_history(turns: int) -> list:
    items = []
    for i in range(turns):
        items.append({"role": "user", "content": f"Tell me fact number {i} about the sea, please."})
        if i == 1:
            # A call and its result travel with their turn.
            items.append({"type": "function_call", "call_id": f"call_{i}", "name": "get_weather", "arguments": '{"city": "Brest"}'})
            items.append({"type": "function_call_output", "call_id": f"call_{i}", "output": "Rain, 12 C"})
        items.append({"role": "assistant", "content": f"Fact {i}: the sea covers most of the planet and is salty."})
    items.append({"role": "user", "content": QUESTION})
    return items


def test_truncation_auto_drops_the_oldest_turns(small_ctx_url: str):
    """256-token context: the history does not fit. `disabled` (the
    default) is a 400; `auto` drops the fewest oldest whole turns that
    leave room for `max_output_tokens`, and keeps the instructions."""
    client = openai_client(small_ctx_url, 120)
    history = _long_history(8)
    args = {"instructions": "Be brief.", "max_output_tokens": 16}
    with pytest.raises(openai.BadRequestError) as info:
        create(client, input=history, **args)
    assert info.value.code == "context_length_exceeded"
    r = create(client, input=history, truncation="auto", **args)
    assert r.truncation == "auto"
    assert r.status in ("completed", "incomplete")
    used = r.usage.input_tokens
    assert used + 16 <= 256
    # The same prompt as the kept turns sent whole: the cut is at a user
    # turn, and the instructions stayed.
    starts = [i for i, item in enumerate(history) if item.get("role") == "user"]
    kept = None
    for s in starts:
        try:
            whole = create(client, input=history[s:], **args)
        except openai.BadRequestError:
            continue
        if whole.usage.input_tokens + 16 <= 256:
            kept = s
            assert whole.usage.input_tokens == used
            break
    assert kept is not None and kept > 0
    # One more turn would not have left the room.
    previous = starts[starts.index(kept) - 1]
    try:
        assert create(client, input=history[previous:], **args).usage.input_tokens + 16 > 256
    except openai.BadRequestError as e:
        assert e.code == "context_length_exceeded"


def test_truncation_auto_that_cannot_fit_is_400(small_ctx_url: str):
    client = openai_client(small_ctx_url, 120)
    with pytest.raises(openai.BadRequestError) as info:
        create(client, input="word " * 400, truncation="auto", max_output_tokens=16)
    assert info.value.code == "context_length_exceeded"


# --- engine failures ----------------------------------------------------------------

def test_a_failure_mid_stream_is_response_failed(start_hearth):
    """`decode_error:2` fails the fifth decode step of the first two jobs."""
    srv = start_hearth(env={"HEARTH_FAULT": "decode_error:2"})
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    story = "Count from one to twenty in words."
    events = list(create(client, input=story, stream=True, max_output_tokens=16))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created"
    final = events[-1]
    assert final.type == "response.failed", [e.type for e in events]
    assert final.response.status == "failed"
    assert final.response.error.code == "server_error" and final.response.error.message
    # Not streamed: a 500 in OpenAI's shape.
    with pytest.raises(openai.InternalServerError):
        create(client, input=story, max_output_tokens=16)
    # The engine serves again.
    assert create(client, max_output_tokens=4).output_text


# --- bad requests ----------------------------------------------------------------

GOOD = {"model": MODEL, "input": QUESTION, "max_output_tokens": 8, "temperature": 0}

BAD_REQUESTS = {
    "no input": ({"model": MODEL}, "input"),
    "input a number": ({**GOOD, "input": 5}, "input"),
    "input empty": ({**GOOD, "input": []}, "input"),
    "bad role": ({**GOOD, "input": [{"role": "wizard", "content": "x"}]}, "input[0].role"),
    "unknown item type": ({**GOOD, "input": [{"type": "teleport"}]}, "input[0].type"),
    "image part": ({**GOOD, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
                   "input[0].content[0].type"),
    "output for an unknown call": ({**GOOD, "input": [{"role": "user", "content": "hi"},
                                                     {"type": "function_call_output", "call_id": "call_nope", "output": "1"}]},
                                   "input[1].call_id"),
    "call arguments not an object": ({**GOOD, "input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}]},
                                     "input[0].arguments"),
    "bad tool_choice": ({**GOOD, "tool_choice": "sometimes"}, "tool_choice"),
    "tool_choice names no tool": ({**GOOD, "tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "name": "nope"}},
                                  "tool_choice"),
    "required without tools": ({**GOOD, "tool_choice": "required"}, "tool_choice"),
    "unknown tool type": ({**GOOD, "tools": [{"type": "teleport"}]}, "tools[0].type"),
    "function without name": ({**GOOD, "tools": [{"type": "function", "parameters": {}}]}, "tools[0].name"),
    "max_output_tokens zero": ({**GOOD, "max_output_tokens": 0}, "max_output_tokens"),
    "max_output_tokens a string": ({**GOOD, "max_output_tokens": "ten"}, "max_output_tokens"),
    "temperature too high": ({**GOOD, "temperature": 3}, "temperature"),
    "schema missing": ({**GOOD, "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    "bad format type": ({**GOOD, "text": {"format": {"type": "yaml"}}}, "text.format.type"),
    "bad effort": ({**GOOD, "reasoning": {"effort": "extreme"}}, "reasoning.effort"),
    "background": ({**GOOD, "background": True}, "background"),
    "logprobs asked by include": ({**GOOD, "include": ["message.output_text.logprobs"]}, "include"),
    "top_logprobs": ({**GOOD, "top_logprobs": 3}, "top_logprobs"),
    "bad truncation": ({**GOOD, "truncation": "sometimes"}, "truncation"),
}


@pytest.mark.parametrize("body,param", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_request_is_400_naming_the_param(base_url: str, body, param):
    reply = post(base_url + "/v1/responses", body)
    err = assert_client_error(reply, OPENAI_ERROR_SCHEMA)
    assert err["error"]["type"] == "invalid_request_error"
    assert err["error"]["param"] == param, err


def test_sdk_raises_bad_request(client: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as info:
        create(client, input=[{"type": "function_call_output", "call_id": "call_nope", "output": "x"}])
    assert info.value.status_code == 400
    with pytest.raises(openai.BadRequestError):
        create(client, max_output_tokens=-1, stream=True)


def test_server_still_serves_after_bad_requests(base_url: str, client: openai.OpenAI):
    for body, _ in BAD_REQUESTS.values():
        post(base_url + "/v1/responses", body)
    assert create(client, max_output_tokens=4).output_text


def test_a_silent_stream_repeats_in_progress_events_the_sdk_reads(start_hearth):
    """A stall inside the prefill: the Responses stream's heartbeat is a
    repeated `response.in_progress` event (Codex's idle timer counts only
    events, not SSE comments), with its own sequence number, and the SDK's
    stream helper still builds the whole response."""
    srv = start_hearth("--heartbeat-secs", "0.5", env={"HEARTH_FAULT": "prefill_stall:3:1"})
    c = openai_client(srv.url, 60)
    with c.responses.stream(model="m", input="Say hi.", max_output_tokens=8, temperature=0) as s:
        events = list(s)
    assert events[-1].type in ("response.completed", "response.incomplete"), events[-1].type
    final = events[-1].response
    kinds = [e.type for e in events]
    beats = kinds.count("response.in_progress") - 1
    assert beats >= 3, kinds[:12]
    seqs = [e.sequence_number for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert all(e.response.id == final.id for e in events if e.type == "response.in_progress")
    assert final.status in ("completed", "incomplete") and final.output, final

"""The real llama.cpp code paths of architectures too big to test with, run
on tiny random-weight GGUFs that scripts/tiny_gguf.py writes:

- deepseek4 (DeepSeek V4 Flash): hybrid memory (sliding-window KV, two
  compressed KV caches, compressor states) and DSML tool calls;
- mamba2: purely recurrent memory.

The replies are gibberish; what is checked is that they come, that greedy
decoding repeats itself, how the prefix cache behaves on memory that cannot
be cut back, and that grammars still force well-formed tool calls.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from conftest import REPO
from hearth_http import post, request
from test_parallel import metric

SCRIPT = REPO / "scripts" / "tiny_gguf.py"
ARCHS = ["deepseek4", "mamba2"]
FLAGS = ("--ctx", "2048", "--threads", "1", "--threads-batch", "1")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                # An enum and a boolean: the grammar leaves the random model
                # only choices, so the call ends within a few hundred tokens.
                "city": {"type": "string", "enum": ["Paris", "Tokyo"]},
                "celsius": {"type": "boolean"},
            },
            "required": ["city", "celsius"],
        },
    },
}


def write_gguf(arch: str, out: Path, seed: int = 0) -> Path:
    subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", arch, "--out", str(out), "--seed", str(seed)],
        check=True,
        timeout=60,
    )
    return out


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tiny-gguf")
    return {a: write_gguf(a, d / f"{a}.gguf") for a in ARCHS}


def oa(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat(client: openai.OpenAI, messages, max_tokens: int = 16, **kw):
    return client.chat.completions.create(
        model="any", messages=messages, max_tokens=max_tokens, temperature=0, **kw
    )


def cached(usage) -> int:
    return usage.prompt_tokens_details.cached_tokens


def test_the_script_is_deterministic(tmp_path: Path):
    a = write_gguf("deepseek4", tmp_path / "a.gguf", seed=7).read_bytes()
    b = write_gguf("deepseek4", tmp_path / "b.gguf", seed=7).read_bytes()
    c = write_gguf("deepseek4", tmp_path / "c.gguf", seed=8).read_bytes()
    assert a == b
    assert a != c


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_chat_repeats_itself(start_hearth, gguf, arch):
    client = oa(start_hearth(*FLAGS, model=gguf[arch]))
    messages = [{"role": "user", "content": "Hello, what is the weather in Paris?"}]
    first = chat(client, messages)
    second = chat(client, messages)
    assert first.usage.completion_tokens == 16
    assert first.choices[0].message.content
    assert second.choices[0].message.content == first.choices[0].message.content
    # Hybrid and recurrent memory cannot be cut back to recompute the last
    # prompt token, and a prompt this short (under 64 tokens) keeps no
    # checkpoint, so a repeated prompt is computed again from scratch.
    assert cached(second.usage) == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_extending_the_live_sequence_reuses_it_exactly(start_hearth, gguf, arch):
    """Token-id prompts, so the second prompt extends the first request's
    sequence token for token (a reply's text does not always tokenize back
    to the tokens that were generated). logit_bias makes the generated
    tokens known."""
    forced = 300  # some token id the bias makes the only greedy choice
    # 200 tokens: past the sliding window (128 tokens) and one 128-token
    # block of deepseek4's most compressed layer.
    head = [(i * 37) % 250 + 1 for i in range(200)]
    tail = [(i * 11) % 250 + 1 for i in range(60)]
    prompt = head + [forced] * 5 + tail

    warm = oa(start_hearth(*FLAGS, model=gguf[arch]))
    first = warm.completions.create(
        model="any", prompt=head, max_tokens=5, temperature=0, logit_bias={str(forced): 100}
    )
    assert first.usage.completion_tokens == 5
    reused = warm.completions.create(model="any", prompt=prompt, max_tokens=16, temperature=0)
    # The whole live sequence: the first prompt and all of its reply.
    assert cached(reused.usage) == len(head) + 5

    cold = oa(start_hearth(*FLAGS, model=gguf[arch]))
    fresh = cold.completions.create(model="any", prompt=prompt, max_tokens=16, temperature=0)
    assert cached(fresh.usage) == 0
    # Resuming from the kept state decodes exactly what a cold prefill does.
    assert reused.choices[0].text == fresh.choices[0].text

    # A prompt that leaves the live sequence part way is not served from it:
    # the memory cannot be cut back to the common prefix, and no checkpoint
    # lies at or before it (the first is at the end of the 200-token
    # prompt), so all of it is computed (a transformer would reuse 150).
    diverged = warm.completions.create(
        model="any", prompt=head[:150] + tail, max_tokens=4, temperature=0
    )
    assert cached(diverged.usage) == 0


def complete(client: openai.OpenAI, prompt: list[int], max_tokens: int = 12):
    return client.completions.create(model="any", prompt=prompt, max_tokens=max_tokens, temperature=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_prompt_that_leaves_the_sequence_restarts_from_a_checkpoint(start_hearth, gguf, arch):
    """Memory that cannot be cut back keeps RAM checkpoints of each prompt:
    at the last chunk end at least 32 tokens before its end, and at its end.
    A retry, or a prompt that edits the last message, restarts from the
    newest checkpoint it repeats whole and decodes exactly what a cold
    prefill does; one that keeps the prompt but not the reply (a client
    that drops it) restarts from the prompt's end. `--ctx-checkpoints 0`
    turns them off."""
    flags = (*FLAGS, "--batch", "64")
    head = [(i * 37) % 250 + 1 for i in range(200)]
    tail = [(i * 11) % 250 + 1 for i in range(100)]
    other = [(i * 13) % 250 + 3 for i in range(40)]
    a = head + tail  # 300 tokens in chunks of 64: checkpoints at 256 and 300
    edited = head + tail[:60] + other  # leaves `a` at 260

    warm = oa(start_hearth(*flags, model=gguf[arch]))
    first = complete(warm, a)
    assert cached(first.usage) == 0
    again = complete(warm, edited)
    assert cached(again.usage) == 256
    retried = complete(warm, a)
    assert cached(retried.usage) == 256
    assert retried.choices[0].text == first.choices[0].text
    without_reply = complete(warm, a + other)
    assert cached(without_reply.usage) == len(a)

    cold = oa(start_hearth(*flags, model=gguf[arch]))
    fresh = complete(cold, edited)
    assert cached(fresh.usage) == 0
    assert fresh.choices[0].text == again.choices[0].text
    assert complete(cold, a + other).choices[0].text == without_reply.choices[0].text

    off = oa(start_hearth(*flags, "--ctx-checkpoints", "0", model=gguf[arch]))
    complete(off, a)
    assert cached(complete(off, edited).usage) == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_chat_continuation_after_a_json_answer(start_hearth, gguf, arch):
    """A grammar keeps the first answer plain ASCII, so its text reads back
    as the tokens that were generated (matched by text) and the next turn
    extends the live sequence. A free gibberish reply would not: its stray
    bytes come back as U+FFFD and the match stops inside the reply."""
    client = oa(start_hearth(*FLAGS, model=gguf[arch]))
    schema = {"type": "object", "properties": {"a": {"enum": ["yes", "no"]}}, "required": ["a"]}
    messages = [{"role": "user", "content": "Say yes or no."}]
    first = chat(
        client,
        messages,
        max_tokens=64,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    assert first.choices[0].finish_reason == "stop"
    assert json.loads(first.choices[0].message.content)["a"] in ("yes", "no")
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Again."},
    ]
    second = chat(client, messages)
    assert second.usage.completion_tokens == 16
    assert cached(second.usage) == first.usage.prompt_tokens + first.usage.completion_tokens


def test_speculation_is_refused_for_recurrent_memory_without_rollback(start_hearth, gguf):
    # llama.cpp has no recurrent-state rollback for Mamba 2.
    srv = start_hearth(*FLAGS, "--spec", model=gguf["mamba2"])
    r = chat(oa(srv), [{"role": "user", "content": "Hi"}], max_tokens=4)
    assert r.usage.completion_tokens == 4
    log = srv.log_path.read_text("utf-8", "replace")
    assert "speculative decoding off: this model's memory cannot drop rejected drafts" in log
    assert metric(srv.url, "hearth_spec_drafted_tokens_total") == 0


def token_ids_by_bytes(path: Path) -> dict[bytes, int]:
    """The tiny model's tokens by their bytes, from its GGUF."""
    import importlib.util

    import gguf as gguf_lib

    spec = importlib.util.spec_from_file_location("tiny_gguf", SCRIPT)
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    byte_of = {c: b for b, c in enumerate(tiny.byte_symbols())}
    field = gguf_lib.GGUFReader(str(path)).fields["tokenizer.ggml.tokens"]
    ids: dict[bytes, int] = {}
    for i, part in enumerate(field.data):
        text = bytes(field.parts[part]).decode("utf-8")
        try:
            raw = bytes(byte_of[c] for c in text)
        except KeyError:
            raw = text.encode()  # a special token
        ids.setdefault(raw, i)
    return ids


def test_deepseek4_speculation_rolls_rejected_drafts_back(start_hearth, gguf):
    """deepseek4's recurrent state rolls back through llama.cpp's snapshots
    (`n_rs_seq`): prompt lookup drafts, rejected drafts are dropped, and the
    sequence left behind is exactly what decoding without speculation
    leaves: a continuation from it equals a cold prefill's."""
    spec_srv = start_hearth(*FLAGS, "--spec", model=gguf["deepseek4"])
    cold_srv = start_hearth(*FLAGS, "--no-spec", model=gguf["deepseek4"])
    log = spec_srv.log_path.read_text("utf-8", "replace")
    assert "rejected drafts are rolled back through llama.cpp's recurrent-state snapshots" in log
    msgs = [{"role": "user", "content": "Read the file and repeat the weather city name parameter string " * 4}]
    reply = request("POST", spec_srv.url + "/v1/chat/completions", {
        "model": "any", "messages": msgs, "max_tokens": 120, "temperature": 0, "logprobs": True,
    })
    assert reply.status == 200, reply.text
    drafted = metric(spec_srv.url, "hearth_spec_drafted_tokens_total")
    accepted = metric(spec_srv.url, "hearth_spec_accepted_tokens_total")
    assert 0 < accepted < drafted, (drafted, accepted)  # some drafts were rolled back
    ids = token_ids_by_bytes(gguf["deepseek4"])
    generated = [ids[bytes(t["bytes"])] for t in reply.json()["choices"][0]["logprobs"]["content"]]
    prompt = tokens_of(spec_srv, {"messages": msgs}) + generated + [(i * 11) % 250 + 1 for i in range(20)]

    def go_on(srv):
        r = request("POST", srv.url + "/v1/completions", {
            "model": "any", "prompt": prompt, "max_tokens": 40, "temperature": 0, "logprobs": 1,
        })
        assert r.status == 200, r.text
        return r.json()

    warm, cold = go_on(spec_srv), go_on(cold_srv)
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] == len(prompt) - 20
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert warm["choices"][0]["text"] == cold["choices"][0]["text"]
    a = warm["choices"][0]["logprobs"]["token_logprobs"]
    b = cold["choices"][0]["logprobs"]["token_logprobs"]
    # Decoding and a prefill round differently by about 0.007 here, with
    # or without speculation; a state that kept a rejected draft would not.
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.05


def test_deepseek4_forced_call_is_dsml_and_the_next_turn_reuses_it(start_hearth, gguf):
    srv = start_hearth(*FLAGS, model=gguf["deepseek4"])
    assert "tool_format=DeepSeekV4Dsml" in srv.log_path.read_text("utf-8", "replace")
    client = oa(srv)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    # Random weights pick single bytes as often as merged tokens, so the
    # forced call takes a couple of hundred tokens.
    first = chat(client, messages, max_tokens=1000, tools=[WEATHER], tool_choice="required")
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert set(args) == {"city", "celsius"}
    assert args["city"] in ("Paris", "Tokyo")
    assert isinstance(args["celsius"], bool)

    # The template writes the call back as the grammar made the model write
    # it, so the tool turn extends the live sequence.
    messages += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    second = chat(client, messages, tools=[WEATHER])
    assert second.usage.completion_tokens > 0
    assert cached(second.usage) == first.usage.prompt_tokens + first.usage.completion_tokens


def test_deepseek4_forced_call_through_the_messages_api(start_hearth, gguf):
    import anthropic

    srv = start_hearth(*FLAGS, model=gguf["deepseek4"])
    client = anthropic.Anthropic(base_url=srv.url, api_key="unused", max_retries=0, timeout=60)
    fn = WEATHER["function"]
    tools = [{"name": fn["name"], "description": fn["description"], "input_schema": fn["parameters"]}]
    request = dict(
        model="any",
        max_tokens=1000,
        extra_body={"temperature": 0},
        tools=tools,
        tool_choice={"type": "any"},
        messages=[{"role": "user", "content": "What is the weather in Tokyo?"}],
    )
    msg = client.messages.create(**request)
    assert msg.stop_reason == "tool_use"
    (use,) = [b for b in msg.content if b.type == "tool_use"]
    assert use.name == "get_weather"
    assert set(use.input) == {"city", "celsius"}
    assert use.input["city"] in ("Paris", "Tokyo") and isinstance(use.input["celsius"], bool)
    # Streamed, the same call arrives as input_json_delta events.
    with client.messages.stream(**request) as stream:
        final = stream.get_final_message()
    (streamed,) = [b for b in final.content if b.type == "tool_use"]
    assert streamed.input == use.input


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoints_and_snapshots_survive_a_restart(start_hearth, gguf, arch, tmp_path):
    """Checkpoints go to the disk store too: after a restart, a prompt that
    drops the last reply restarts from the prompt-end checkpoint, and one
    that edits the last part from the one before it, each equal to a cold
    prefill."""
    flags = (*FLAGS, "--batch", "64")
    disk = ("--kv-disk-dir", str(tmp_path / "kv"))
    head = [(i * 37) % 250 + 1 for i in range(200)]
    tail = [(i * 11) % 250 + 1 for i in range(100)]
    other = [(i * 13) % 250 + 3 for i in range(40)]
    a = head + tail  # checkpoints at 256 and 300
    edited = head + tail[:60] + other  # leaves `a` at 260

    first_srv = start_hearth(*flags, *disk, model=gguf[arch])
    first = complete(oa(first_srv), a)
    assert first_srv.stop() == 0
    files = list((tmp_path / "kv").glob("*.kv"))
    # 256 and 300 (the checkpoints), 312 (the live sequence, at shutdown)
    assert len(files) >= 3, files

    warm_srv = start_hearth(*flags, *disk, model=gguf[arch])
    warm = oa(warm_srv)
    dropped = complete(warm, a + other)
    assert cached(dropped.usage) == len(a)
    again = complete(warm, edited)
    assert cached(again.usage) == 256
    assert 'source="disk"' in warm_srv.log_path.read_text("utf-8", "replace")

    cold = oa(start_hearth(*flags, model=gguf[arch]))
    assert complete(cold, a + other).choices[0].text == dropped.choices[0].text
    assert complete(cold, edited).choices[0].text == again.choices[0].text
    assert complete(cold, a).choices[0].text == first.choices[0].text


# How each tiny model's template opens the assistant's turn in a prompt
# (deepseek4 with thinking on).
TURN_OPENS = {"deepseek4": "<｜Assistant｜><think>", "mamba2": "<|im_start|>assistant\n"}


def tokens_of(srv, body: dict) -> list[int]:
    reply = post(srv.url + "/tokenize", body)
    assert reply.status == 200, reply.text
    return reply.json()["tokens"]


@pytest.mark.parametrize("arch", ARCHS)
def test_a_turn_that_rewrites_the_last_reply_restarts_where_that_turn_opened(start_hearth, gguf, arch):
    """An agent that drops the thinking from the history, or sends the last
    reply back rewritten, leaves the sequence where the assistant's turn
    opened: the checkpoint taken there (not at a chunk end before it)
    serves the next turn, which decodes exactly what a cold prefill does."""
    flags = (*FLAGS, "--batch", "64")
    think = {"reasoning_effort": "high"}
    system = {"role": "system", "content": "You read files. " * 12}
    ask = [system, {"role": "user", "content": "Read src/main.rs and say what it does, in brief."}]

    warm_srv = start_hearth(*flags, model=gguf[arch])
    warm = oa(warm_srv)
    first_prompt = tokens_of(warm_srv, {"messages": ask, **think})
    opens = tokens_of(warm_srv, {"content": TURN_OPENS[arch], "add_special": False, "parse_special": True})
    assert first_prompt[-len(opens):] == opens
    # The old rule would checkpoint a chunk end (a multiple of 64) instead.
    assert (len(first_prompt) - len(opens)) % 64 != 0, len(first_prompt)
    chat(warm, ask, max_tokens=12, extra_body=think)
    turn = [*ask, {"role": "assistant", "content": "It starts the server."},
            {"role": "user", "content": "Now read src/lib.rs."}]
    again = chat(warm, turn, max_tokens=12, extra_body=think)
    assert cached(again.usage) == len(first_prompt) - len(opens)

    cold = chat(oa(start_hearth(*flags, model=gguf[arch])), turn, max_tokens=12, extra_body=think)
    assert cached(cold.usage) == 0
    assert cold.choices[0].message.content == again.choices[0].message.content
    assert getattr(cold.choices[0].message, "reasoning_content", None) == getattr(
        again.choices[0].message, "reasoning_content", None
    )

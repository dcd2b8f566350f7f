"""What current Claude Code sends, through the real binary.

`tests/fixtures/claude_code/` holds anonymised copies of requests Claude
Code 2.1.332 sent (captured by `bench/agents.py --capture`: headers and
body as sent, ids zeroed, local paths replaced, long texts cut so they fit
the default model's context). Each is replayed as it was, and must be
accepted, answered in the Messages stream's shape, and kept alive with
`ping`s.

Then one test per row of README's "Claude Code's betas and fields" table.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import anthropic
import pytest

from conftest import _factory
from hearth_http import ANTHROPIC_ERROR_SCHEMA, anthropic_client, assert_client_error, post

FIXTURES = sorted((Path(__file__).resolve().parents[1] / "fixtures" / "claude_code").glob("*.json"))
TEMPLATE = Path(__file__).resolve().parents[1] / "fixtures" / "templates" / "qwen3_think.jinja"
MODEL = "claude-opus-5-5"
ASK = [{"role": "user", "content": "What is 2+2?"}]
INTERLEAVED = {"anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14"}


@pytest.fixture(scope="module")
def urls(server_logs: Path):
    """A plain server whose heartbeat is short enough to show in any
    stream, and one with a thinking template."""
    start, started = _factory(server_logs)
    plain = start("--heartbeat-secs", "0.2")
    think = start("--chat-template", str(TEMPLATE), "--heartbeat-secs", "1")
    yield plain.url, think.url
    for s in started:
        s.stop()


@pytest.fixture(scope="module")
def claude(urls) -> anthropic.Anthropic:
    return anthropic_client(urls[1], 180)


def sse(text: str) -> list[tuple[str, dict | None]]:
    """(event name, data) in order; `(ping)` for each ping."""
    out = []
    for block in text.split("\n\n"):
        name, data = None, None
        # SSE lines end at \r or \n only: `splitlines` would also split
        # on U+2028 or U+0085, which JSON leaves unescaped in the text.
        for line in re.split(r"\r\n|\r|\n", block):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data = json.loads(line[5:])
        if name:
            out.append((name, data))
    return out


def test_there_are_fixtures():
    assert len(FIXTURES) >= 3, FIXTURES
    shapes = [json.loads(f.read_text())["body"] for f in FIXTURES]
    # The captures include the output-cap case: a budget above max_tokens.
    assert any((b.get("thinking") or {}).get("budget_tokens", 0) > b["max_tokens"] for b in shapes)


@pytest.mark.parametrize("fixture", FIXTURES, ids=[f.stem for f in FIXTURES])
def test_claude_code_request_is_answered_in_shape(urls, fixture: Path):
    rec = json.loads(fixture.read_text())
    body = rec["body"]
    reply = post(urls[0] + rec["path"], body, rec["headers"])
    assert reply.status == 200, reply.text[:500]
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = sse(reply.text)
    names = [n for n, _ in events]
    assert names[0] == "message_start" and names[-1] == "message_stop", names
    assert "ping" in names, names
    assert "error" not in names, reply.text[-500:]
    starts = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert starts, names
    assert names.count("content_block_start") == names.count("content_block_stop")
    delta = next(d for n, d in events if n == "message_delta")
    assert delta["delta"]["stop_reason"] in ("end_turn", "max_tokens", "tool_use", "stop_sequence")
    assert delta["usage"]["output_tokens"] <= body["max_tokens"]
    if body.get("context_management"):
        assert delta["context_management"] == {"applied_edits": []}
    if (body.get("thinking") or {}).get("display") == "omitted":
        assert not any(d and d.get("delta", {}).get("type") == "thinking_delta" for _, d in events)


# --- README's table, row by row ---------------------------------------------------------------


def test_interleaved_thinking_takes_a_budget_above_max_tokens(urls):
    body = {"model": MODEL, "max_tokens": 16, "messages": ASK,
            "thinking": {"type": "enabled", "budget_tokens": 1024}, "temperature": 0}
    refused = post(urls[1] + "/v1/messages", body)
    err = assert_client_error(refused, ANTHROPIC_ERROR_SCHEMA)
    assert "budget_tokens" in err["error"]["message"]
    taken = post(urls[1] + "/v1/messages", body, INTERLEAVED)
    assert taken.status == 200, taken.text
    m = taken.json()
    # The reply still stops at max_tokens, thinking included.
    assert m["usage"]["output_tokens"] <= 16
    assert m["content"][0]["type"] == "thinking"


def test_display_omitted_sends_no_thinking_text_and_the_signature_brings_it_back(claude, urls):
    kw = {"model": MODEL, "max_tokens": 24, "messages": ASK, "extra_body": {"temperature": 0}}
    shown = claude.messages.create(thinking={"type": "adaptive"}, **kw)
    omitted = claude.messages.create(thinking={"type": "adaptive", "display": "omitted"}, **kw)
    assert shown.content[0].type == omitted.content[0].type == "thinking"
    assert shown.content[0].thinking.strip()
    assert omitted.content[0].thinking == ""
    with claude.messages.stream(thinking={"type": "adaptive", "display": "omitted"}, **kw) as s:
        kinds = [e.delta.type for e in s if e.type == "content_block_delta"]
        final = s.get_final_message()
    assert "thinking_delta" not in kinds and "signature_delta" in kinds, kinds
    assert final.content[0].signature == omitted.content[0].signature

    def count(block: dict) -> int:
        return claude.messages.count_tokens(model=MODEL, messages=[
            *ASK, {"role": "assistant", "content": [block, {"type": "text", "text": "4"}]},
            {"role": "user", "content": "And 3+3?"}]).input_tokens

    # Sent back in history, the omitted block renders its reasoning, as the shown one does.
    full = count({"type": "thinking", "thinking": shown.content[0].thinking, "signature": shown.content[0].signature})
    back = count({"type": "thinking", "thinking": "", "signature": omitted.content[0].signature})
    bare = count({"type": "thinking", "thinking": "", "signature": "other"})
    assert back == full > bare
    bad = post(urls[1] + "/v1/messages", {"model": MODEL, "max_tokens": 8, "messages": ASK,
                                          "thinking": {"type": "adaptive", "display": "full"}})
    assert "thinking.display" in assert_client_error(bad, ANTHROPIC_ERROR_SCHEMA)["error"]["message"]


def test_context_management_is_checked_and_reports_no_edits(urls):
    body = {"model": MODEL, "max_tokens": 4, "messages": ASK, "temperature": 0,
            "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"},
                                             {"type": "clear_tool_uses_20250919"}]}}
    headers = {"anthropic-beta": "context-management-2025-06-27"}
    reply = post(urls[0] + "/v1/messages", body, headers)
    assert reply.status == 200, reply.text
    assert reply.json()["context_management"] == {"applied_edits": []}
    plain = post(urls[0] + "/v1/messages", {**body, "context_management": None})
    assert "context_management" not in plain.json()
    bad = post(urls[0] + "/v1/messages", {**body, "context_management": {"edits": [{"type": "summarise"}]}}, headers)
    msg = assert_client_error(bad, ANTHROPIC_ERROR_SCHEMA)["error"]["message"]
    assert msg.startswith("context_management.edits.0.type"), msg


def test_deferred_tools_stay_out_of_the_prompt(claude):
    schema = {"type": "object", "properties": {"q": {"type": "string"}}}
    tool = {"name": "lookup", "description": "Look a thing up in a long catalogue of things.", "input_schema": schema}

    def count(tools) -> int:
        return claude.messages.count_tokens(model=MODEL, messages=ASK, tools=tools).input_tokens

    assert count([tool, {**tool, "name": "later", "defer_loading": True}]) == count([tool])
    assert count([tool, {**tool, "name": "later"}]) > count([tool])


def test_metadata_user_id_as_a_json_string_and_beta_query(urls):
    body = {"model": MODEL, "max_tokens": 4, "messages": ASK, "temperature": 0,
            "metadata": {"user_id": json.dumps({"device_id": "0", "session_id": "s"})}}
    reply = post(urls[0] + "/v1/messages?beta=true", body, {"anthropic-beta": "claude-code-20250219"})
    assert reply.status == 200, reply.text
    assert reply.json()["type"] == "message"


@pytest.mark.parametrize("beta", ["thinking-token-count-2026-05-13", "advanced-tool-use-2025-11-20",
                                  "effort-2025-11-24", "per-turn-control-2026-07-01",
                                  "mid-conversation-tool-changes-2026-07-01", "some-future-beta-2027-01-01"])
def test_other_betas_are_accepted(urls, beta):
    body = {"model": MODEL, "max_tokens": 4, "messages": ASK, "temperature": 0, "stream": True,
            "output_config": {"effort": "medium"}}
    reply = post(urls[0] + "/v1/messages", body, {"anthropic-beta": f"claude-code-20250219,{beta}"})
    assert reply.status == 200, reply.text
    assert [n for n, _ in sse(reply.text)][-1] == "message_stop"


def test_system_messages_between_turns_are_rendered(claude):
    def count(messages) -> int:
        return claude.messages.count_tokens(model=MODEL, messages=messages).input_tokens

    note = {"role": "system", "content": [{"type": "text", "text": "# Environment\nWorking directory: /work"}]}
    assert count([*ASK, note]) > count(ASK)

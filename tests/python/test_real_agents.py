"""Real Claude Code and real Codex, two turns each, against the real binary
on Gemma 3 270M at 32k context, through the recording proxy of
`bench/agents.py` (which installs the pinned agents; `scripts/setup.sh
--all` runs it).

The first turn is the seed scenario with the real client: a prefill stall
longer than the agent's stream watchdog (Claude Code's byte-stream
watchdog at its 10 s floor) must end in a completed stream and no retry,
because hearth's pings keep the bytes coming. The second turn must reuse
the first: tokens prefilled at most a little over the tokens the agent
added.

Gemma 3 270M is a base model that never ends a turn by itself, so every
reply stops at the output cap, and both agents report that as their own
error (Claude Code after continuing the cut reply, Codex at once:
"Incomplete response returned"). The tests check what the server owes
the agent, not what the model says.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import GEMMA, _factory

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import agent_proxy  # noqa: E402
import agents  # noqa: E402

HEARTBEAT = 1.0
STALL = 14


@pytest.fixture(scope="module")
def bin_dir() -> Path:
    return agents.install_agents()


def served(server_logs: Path):
    start, started = _factory(server_logs)
    srv = start("--ctx", "32768", "--max-tokens", "64", "--heartbeat-secs", str(HEARTBEAT),
                env={"HEARTH_FAULT": f"prefill_stall:{STALL}:1"}, model=GEMMA)
    proxy, recorder = agent_proxy.start(0, srv.url, None)
    return srv, started, proxy, recorder


def turns(agent, recorder, prompts) -> list[list[dict]]:
    out = []
    for i, prompt in enumerate(prompts):
        n0 = recorder.count()
        res = agent.run(prompt, i == 0, 600)
        recs = [r for r in recorder.since(n0) if r["method"] == "POST" and "/v1/" in r["path"]]
        assert recs, f"turn {i + 1} sent nothing: {res}"
        out.append(recs)
    return out


def check(turn_records: list[list[dict]]) -> None:
    first, second = turn_records
    # Turn 1: the stall sits inside the first request's prefill.
    head = first[0]
    assert head["status"] == 200, head
    assert head["secs"] >= STALL, "the stall did not happen"
    convs = [agents.conversation(r) for r in first]
    assert len(set(convs)) == len(convs), "the agent retried a request"
    for r in first + second:
        assert r["status"] == 200 and r["complete"], r
        assert r["max_gap"] <= HEARTBEAT + 0.5, f"a silence of {r['max_gap']:.2f} s on {r['path']}"
    # Turn 2 prefills only what the agent added.
    last = agents.usage_of(first[-1])
    nxt = agents.usage_of(second[0])
    new = nxt["prompt"] - (last["prompt"] + last["generated"])
    prefilled = nxt["prompt"] - nxt["cached"]
    assert prefilled <= 1.05 * max(new, 0) + 8, (new, prefilled, last, nxt)


@pytest.mark.slow  # about 2 minutes on 2 CPU cores
def test_claude_code_two_turns(bin_dir, server_logs, tmp_path):
    srv, started, proxy, recorder = served(server_logs)
    try:
        agents.EXTRA_AGENT_ENV.update({"CLAUDE_BYTE_STREAM_IDLE_TIMEOUT_MS": "10000",
                                       "CLAUDE_ENABLE_BYTE_WATCHDOG": "1", "CLAUDE_CODE_MAX_OUTPUT_TOKENS": "64"})
        agent = agents.Claude(bin_dir, tmp_path, f"http://127.0.0.1:{proxy.server_address[1]}")
        recs = turns(agent, recorder, agents.TURNS[:2])
        check(recs)
        body = recs[0][0]["body"]
        assert body["max_tokens"] == 64 and recs[0][0]["path"].startswith("/v1/messages")
        assert "ping" in recs[0][0]["events"], recs[0][0]["events"]
    finally:
        agents.EXTRA_AGENT_ENV.clear()
        proxy.shutdown()
        for s in started:
            s.stop()


@pytest.mark.slow  # about 2 minutes on 2 CPU cores
def test_codex_two_turns(bin_dir, server_logs, tmp_path):
    srv, started, proxy, recorder = served(server_logs)
    agents.CODEX_IDLE_MS = 10_000
    try:
        agent = agents.Codex(bin_dir, tmp_path, f"http://127.0.0.1:{proxy.server_address[1]}")
        recs = turns(agent, recorder, agents.TURNS[:2])
        check(recs)
        assert recs[0][0]["path"] == "/v1/responses", recs[0][0]["path"]
        assert json.dumps(recs[0][0]["body"]).count('"type"') > 0
    finally:
        agents.CODEX_IDLE_MS = 300_000
        proxy.shutdown()
        for s in started:
            s.stop()

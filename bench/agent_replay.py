#!/usr/bin/env python3
"""Agent-replay benchmark: how much prefill the KV cache saves an agent.

Replays a scripted 10-turn, tool-using coding-agent conversation against a
real `hearth serve` over HTTP (OpenAI chat completions, streaming), the way
an agent resends the whole conversation every turn. Per turn it reports the
prompt tokens, the tokens the client added since the last turn ("new"), the
tokens the server actually prefilled, the cached tokens and the time to
first token. Then it restarts the server on the same --kv-disk-dir and
replays the same turns: with a warm disk cache the first turn should not be
prefilled again.

    bench/agent_replay.py [--model PATH] [--binary PATH] [--json OUT]

Defaults: Gemma 3 270M (long context) from scripts/fetch-models.sh, the
release binary. Standard library only.
"""

import argparse
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(os.environ.get("HEARTH_HOME", os.path.expanduser("~/.cache/hearth")), "models")


def system_prompt():
    """An agent's long system prompt: instructions and tool documentation."""
    tools = []
    for i in range(56):
        tools.append(
            f"### Tool `tool_{i}`\n"
            f"Use tool_{i} to inspect or change part {i} of the repository. It takes a JSON object "
            f"with `path` (string, relative to the workspace root), `line` (integer, 1-based) and "
            f"`mode` (one of read, write, diff). It returns the affected lines with numbers, or an "
            f"error message when the path does not exist. Never call it on files outside the "
            f"workspace; prefer small ranges; explain each change before making it.\n"
        )
    return (
        "You are a careful coding assistant working in a Rust repository. Follow the user's "
        "instructions exactly. To use a tool, write a line `CALL tool_name {json arguments}` and "
        "wait for its result, which arrives as the next user message starting with RESULT.\n\n"
        + "\n".join(tools)
    )


def tool_result(turn):
    lines = [f"RESULT of call {turn}: src/module_{turn}.rs"]
    for n in range(1, 61):
        lines.append(f"{n:4} | fn helper_{turn}_{n}(x: u32) -> u32 {{ x.wrapping_mul({n + turn}) ^ {n * 7} }}")
    return "\n".join(lines)


class Server:
    def __init__(self, binary, model, kv_dir, log_path):
        self.log = open(log_path, "ab")
        args = [binary, "serve", "--port", "0", "--model", model, "--kv-disk-dir", kv_dir, "--heartbeat-secs", "1"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log)
        line = self.proc.stdout.readline().decode()
        if "listening on http://" not in line:
            raise SystemExit(f"server did not start: {line!r}; see {log_path}")
        hostport = line.split("http://", 1)[1].strip()
        self.host, port = hostport.rsplit(":", 1)
        self.port = int(port)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def stream_chat(server, messages, max_tokens):
    """One streaming request; returns (text, usage, ttft seconds)."""
    body = json.dumps({
        "model": "bench",
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    })
    conn = http.client.HTTPConnection(server.host, server.port, timeout=600)
    t0 = time.monotonic()
    conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise SystemExit(f"HTTP {resp.status}: {resp.read()[:500]!r}")
    text, usage, ttft = [], None, None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices", []):
            piece = choice.get("delta", {}).get("content")
            if piece:
                if ttft is None:
                    ttft = time.monotonic() - t0
                text.append(piece)
    conn.close()
    if ttft is None:
        ttft = time.monotonic() - t0
    return "".join(text), usage, ttft


def replay(server, turns, max_tokens, recorded=None):
    """Run the conversation; with `recorded` replies, resend those instead
    of the new ones so both runs send identical prompts."""
    messages = [{"role": "system", "content": system_prompt()}]
    rows, replies = [], []
    prev_total = None
    for turn in range(turns):
        if turn == 0:
            messages.append({"role": "user", "content": "Find where helper values are computed and explain the pattern."})
        else:
            messages.append({"role": "user", "content": tool_result(turn)})
        reply, usage, ttft = stream_chat(server, messages, max_tokens)
        if recorded is not None:
            reply = recorded[turn]
        replies.append(reply)
        messages.append({"role": "assistant", "content": reply})
        prompt = usage["prompt_tokens"]
        cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        new = prompt if prev_total is None else prompt - prev_total
        rows.append({"turn": turn + 1, "prompt_tokens": prompt, "new_tokens": new, "prefilled": prompt - cached,
                     "cached": cached, "ttft_s": round(ttft, 3), "completion_tokens": usage["completion_tokens"]})
        prev_total = prompt + usage["completion_tokens"]
    return rows, replies


def show(title, rows):
    print(f"\n{title}")
    print(f"{'turn':>4} {'prompt':>7} {'new':>6} {'prefilled':>9} {'cached':>7} {'ttft s':>7}")
    for r in rows:
        print(f"{r['turn']:>4} {r['prompt_tokens']:>7} {r['new_tokens']:>6} {r['prefilled']:>9} {r['cached']:>7} {r['ttft_s']:>7.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(MODELS, "gemma-3-270m-q4_k_m.gguf"))
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "hearth"))
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--json", help="write the figures here as JSON")
    args = ap.parse_args()
    if not os.path.exists(args.model):
        subprocess.run([os.path.join(ROOT, "scripts", "fetch-models.sh"), "--all"], check=True, stdout=sys.stderr)
    kv_dir = tempfile.mkdtemp(prefix="hearth-replay-kv-")
    log_path = os.path.join(tempfile.gettempdir(), "hearth-agent-replay.log")
    try:
        server = Server(args.binary, args.model, kv_dir, log_path)
        cold, replies = replay(server, args.turns, args.max_tokens)
        server.stop()
        server = Server(args.binary, args.model, kv_dir, log_path)
        warm, _ = replay(server, args.turns, args.max_tokens, recorded=replies)
        server.stop()
    finally:
        shutil.rmtree(kv_dir, ignore_errors=True)
    show("cold start, empty disk cache", cold)
    show("after a restart, warm disk cache", warm)
    later = cold[1:]
    new = sum(r["new_tokens"] for r in later)
    prefilled = sum(r["prefilled"] for r in later)
    summary = {
        "turns_2_on_new_tokens": new,
        "turns_2_on_prefilled": prefilled,
        "prefill_overhead_pct": round(100.0 * (prefilled - new) / max(new, 1), 2),
        "first_turn_prompt_tokens": cold[0]["prompt_tokens"],
        "first_turn_ttft_cold_s": cold[0]["ttft_s"],
        "first_turn_ttft_after_restart_s": warm[0]["ttft_s"],
        "restart_ttft_pct_of_cold": round(100.0 * warm[0]["ttft_s"] / max(cold[0]["ttft_s"], 1e-9), 1),
    }
    print("\nsummary")
    for k, v in summary.items():
        print(f"  {k}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cold": cold, "after_restart": warm, "summary": summary}, f, indent=2)
    ok = summary["prefill_overhead_pct"] <= 5.0 and summary["restart_ttft_pct_of_cold"] <= 15.0
    print("\ngoals (prefilled within 5% of new; restart TTFT at most 15% of cold):", "met" if ok else "NOT met")


if __name__ == "__main__":
    main()

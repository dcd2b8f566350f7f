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

With --divergent it replays instead a conversation that leaves what the
server holds, the way agents do: one turn sends the last reply back
rewritten (a client that drops the thinking block), a later one clears an
earlier tool result (a client that compacts its history). It runs once with
state checkpoints and once with `--ctx-checkpoints 0`, on the same prompts,
and reports per turn the tokens after the divergence point (where the new
prompt leaves the previous prompt and reply) against the tokens prefilled.
With --thinking the requests ask for reasoning (`reasoning_effort: high`),
so a template that drops past reasoning makes every turn diverge.

    bench/agent_replay.py --divergent [--model PATH] [--thinking]
        [--tools N] [--result-lines N] [--ctx N]

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


def system_prompt(n_tools=56):
    """An agent's long system prompt: instructions and tool documentation."""
    tools = []
    for i in range(n_tools):
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


def tool_result(turn, n_lines=60):
    lines = [f"RESULT of call {turn}: src/module_{turn}.rs"]
    for n in range(1, n_lines + 1):
        lines.append(f"{n:4} | fn helper_{turn}_{n}(x: u32) -> u32 {{ x.wrapping_mul({n + turn}) ^ {n * 7} }}")
    return "\n".join(lines)


class Server:
    def __init__(self, binary, model, kv_dir, log_path, extra=()):
        self.log = open(log_path, "ab")
        args = [binary, "serve", "--port", "0", "--model", model, "--heartbeat-secs", "1", *extra]
        if kv_dir:
            args += ["--kv-disk-dir", kv_dir]
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


def post_json(server, path, body):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=600)
    conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    if resp.status != 200:
        raise SystemExit(f"{path}: HTTP {resp.status}: {data[:500]!r}")
    return json.loads(data)


def stream_chat(server, messages, max_tokens, extra=None):
    """One streaming request; returns (text, usage, ttft seconds)."""
    body = json.dumps({
        "model": "bench",
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(extra or {}),
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


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# The divergent conversation: a question, tool results, then a turn that
# sends the last reply back rewritten and one that clears the oldest tool
# result, each followed by an ordinary turn.
DIVERGENT = ["ask", "result", "result", "result", "result", "rewrite", "result", "clear", "result"]


def divergent_replay(server, args, recorded=None):
    """Per turn: the prompt, the tokens after the divergence point and the
    tokens prefilled. `recorded` replies are sent back instead of this
    run's, so both runs send the same prompts."""
    extra = {"reasoning_effort": "high"} if args.thinking else {}
    messages = [{"role": "system", "content": system_prompt(args.tools)}]
    rows, replies, results = [], [], []
    prev_prompt, prev_reply = None, ""
    for turn, kind in enumerate(DIVERGENT, 1):
        if kind == "ask":
            messages.append({"role": "user", "content": "Find where helper values are computed and explain the pattern."})
        elif kind == "rewrite":
            # What the server generated first is no longer in the history.
            last = messages[-1]["content"]
            messages[-1]["content"] = "In short: " + last[len(last) // 2:]
            messages.append({"role": "user", "content": "Go on with the next module."})
        else:
            if kind == "clear":
                oldest = results.pop(0)
                messages[oldest]["content"] = "[this tool result was cleared to save context]"
            results.append(len(messages))
            messages.append({"role": "user", "content": tool_result(turn, args.result_lines)})
        tokens = post_json(server, "/tokenize", {"messages": messages, **extra})["tokens"]
        if prev_prompt is None:
            point = 0
        else:
            # The server holds the last prompt and what it generated.
            point = common_prefix(tokens, prev_prompt)
            if point == len(prev_prompt):
                gen = post_json(server, "/tokenize", {"content": prev_reply, "add_special": False,
                                                      "parse_special": False})["tokens"]
                point += common_prefix(tokens[point:], gen)
        reply, usage, ttft = stream_chat(server, messages, args.max_tokens, extra)
        prompt = usage["prompt_tokens"]
        if prompt != len(tokens):
            print(f"warning: turn {turn}: /tokenize gave {len(tokens)} tokens, the request {prompt}", file=sys.stderr)
        cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        after = prompt - point
        rows.append({"turn": turn, "kind": kind, "prompt_tokens": prompt, "after_divergence": after,
                     "prefilled": prompt - cached, "ratio": round((prompt - cached) / max(after, 1), 3),
                     "ttft_s": round(ttft, 3)})
        prev_prompt, prev_reply = tokens, reply
        sent = recorded[turn - 1] if recorded is not None else reply
        replies.append(sent)
        messages.append({"role": "assistant", "content": sent})
    return rows, replies


def run_divergent(args):
    log_path = os.path.join(tempfile.gettempdir(), "hearth-agent-replay.log")
    extra = ["--ctx", str(args.ctx)] if args.ctx else []
    server = Server(args.binary, args.model, None, log_path, extra)
    with_ckpt, replies = divergent_replay(server, args)
    server.stop()
    server = Server(args.binary, args.model, None, log_path, extra + ["--ctx-checkpoints", "0"])
    without, _ = divergent_replay(server, args, recorded=replies)
    server.stop()
    print(f"\n{os.path.basename(args.model)}: tokens prefilled per turn, with state checkpoints and without")
    print("(each run's own replies set where its sequence leaves the history: 'after' can differ)")
    print(f"{'turn':>4} {'kind':>8} {'prompt':>7} | {'after':>6} {'ckpt':>6} {'ratio':>6} | "
          f"{'after':>6} {'none':>6} {'ratio':>6}")
    for a, b in zip(with_ckpt, without):
        print(f"{a['turn']:>4} {a['kind']:>8} {a['prompt_tokens']:>7} | {a['after_divergence']:>6} "
              f"{a['prefilled']:>6} {a['ratio']:>6.3f} | {b['after_divergence']:>6} {b['prefilled']:>6} "
              f"{b['ratio']:>6.3f}")
    later = with_ckpt[1:]
    summary = {
        "worst_ratio_with_checkpoints": max(r["ratio"] for r in later),
        "worst_ratio_without": max(r["ratio"] for r in without[1:]),
        "prefilled_turns_2_on_with_checkpoints": sum(r["prefilled"] for r in later),
        "prefilled_turns_2_on_without": sum(r["prefilled"] for r in without[1:]),
        "after_divergence_turns_2_on": sum(r["after_divergence"] for r in later),
    }
    print("\nsummary")
    for k, v in summary.items():
        print(f"  {k}: {v}")
    ok = summary["worst_ratio_with_checkpoints"] <= 1.1
    print("\ngoal (prefilled at most 1.1x the tokens after the divergence, every turn):", "met" if ok else "NOT met")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"with_checkpoints": with_ckpt, "without": without, "summary": summary}, f, indent=2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(MODELS, "gemma-3-270m-q4_k_m.gguf"))
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "hearth"))
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--json", help="write the figures here as JSON")
    ap.add_argument("--divergent", action="store_true", help="the divergent conversation, with and without checkpoints")
    ap.add_argument("--thinking", action="store_true", help="ask for reasoning (reasoning_effort: high)")
    ap.add_argument("--tools", type=int, default=56, help="tools documented in the system prompt")
    ap.add_argument("--result-lines", type=int, default=60, help="lines in each tool result")
    ap.add_argument("--ctx", type=int, default=0, help="--ctx for the server (0: its default)")
    args = ap.parse_args()
    if not os.path.exists(args.model):
        subprocess.run([os.path.join(ROOT, "scripts", "fetch-models.sh"), "--all"], check=True, stdout=sys.stderr)
    if args.divergent:
        return run_divergent(args)
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

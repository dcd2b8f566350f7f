#!/usr/bin/env python3
"""Many agents at once: hearth beside llama-server, in the same run.

    bench/parallel.py                      # both servers, default figures
    bench/parallel.py --no-llama-server    # hearth only
    bench/parallel.py --streams 1,4 --reps 2 --tokens 128

1. Aggregate decode tokens/s over HTTP with 1, 2, 4 and 8 concurrent
   streaming clients (greedy, `ignore_eos`, 192 tokens each, distinct
   prompts) on the default model, each server started with --parallel N.
   Aggregate = all streams' tokens / (last token - first of the first
   tokens): the time every stream was decoding.
2. Time to first token of a second agent whose prompt shares a 9k-token
   prefix with a running one (Gemma 3 270M, 32k context), against the same
   prompt cold on a fresh server, and the KV cells four such agents hold
   against one (hearth's /slots; llama-server reports no cells).
3. A stream's decode speed while a 6k-token prompt is prefilled beside
   it, against the same stream decoding the same token positions alone.
4. How often a greedy reply decoded beside three others equals the same
   request decoded alone (hearth).

Each figure is min/median/max over --reps runs. Results go to
bench/results/parallel.json and a table on stdout. Standard library only;
llama-server is built from the llama.cpp tree hearth links
(bench/llama-bench.sh --target llama-server).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODELS = Path(os.environ.get("HEARTH_HOME", Path.home() / ".cache" / "hearth")) / "models"
SMOL = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA = MODELS / "gemma-3-270m-q4_k_m.gguf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_amx() -> bool:
    try:
        return any(l.startswith("flags") and " amx_int8" in l for l in open("/proc/cpuinfo"))
    except OSError:
        return False


class Server:
    def __init__(self, argv: list[str], port: int, log: Path, ready_path: str):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log, "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "HEARTH_LOG": os.environ.get("BENCH_HEARTH_LOG", "warn")})
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited: {' '.join(argv)} (log {log})")
            try:
                with urllib.request.urlopen(self.url + ready_path, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise SystemExit(f"server did not start: {' '.join(argv)}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def hearth(bin_: str, model: Path, parallel: int, ctx: int, threads: int, logs: Path, tag: str,
           extra: list[str] | None = None) -> Server:
    port = free_port()
    argv = [bin_, "serve", "--model", str(model), "--port", str(port), "--parallel", str(parallel), "--ctx", str(ctx),
            *(extra or ["--cache-ram-mb", "0"])]
    if threads:
        argv += ["--threads", str(threads)]
    return Server(argv, port, logs / f"hearth-{tag}.log", "/health")


def llama_server(bin_: str, model: Path, parallel: int, ctx: int, threads: int, logs: Path, tag: str,
                 extra: list[str] | None = None) -> Server:
    port = free_port()
    argv = [bin_, "-m", str(model), "--port", str(port), "--parallel", str(parallel), "-c", str(ctx * parallel),
            "--kv-unified", "-b", "512", "-ub", "512", "--cache-ram", "0", "--no-webui"]
    if threads:
        argv += ["-t", str(threads), "-tb", str(threads)]
    if has_amx():
        # The same weights layout hearth uses on AMX CPUs (see llama.rs).
        argv += ["--no-repack"]
    return Server(argv + (extra or []), port, logs / f"llama-server-{tag}.log", "/health")


def stream(url: str, body: dict, out: dict) -> None:
    """One streaming chat completion; records first/last token times, each
    piece's arrival and the token count."""
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    t0 = time.monotonic()
    first = last = None
    tokens = 0
    text = []
    times = out.setdefault("times", [])
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices") or []:
                piece = (c.get("delta") or {}).get("content")
                if piece:
                    now = time.monotonic()
                    first = first or now
                    last = now
                    text.append(piece)
                    times.append(now)
    out.update(start=t0, first=first, last=last, tokens=tokens, text="".join(text))


def run_streams(url: str, bodies: list[dict]) -> list[dict]:
    outs = [dict() for _ in bodies]
    threads = [threading.Thread(target=stream, args=(url, b, o)) for b, o in zip(bodies, outs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outs


def chat(content: str, tokens: int, ignore_eos: bool = True) -> dict:
    body = {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    return body


def mmm(xs: list[float]) -> dict:
    return {"min": round(min(xs), 2), "median": round(statistics.median(xs), 2), "max": round(max(xs), 2)}


def aggregate(url: str, n: int, tokens: int, rep: int) -> float:
    bodies = [chat(f"Story {rep}-{k}: tell a long tale about a river town number {k}.", tokens) for k in range(n)]
    outs = run_streams(url, bodies)
    total = sum(o["tokens"] for o in outs)
    span = max(o["last"] for o in outs) - min(o["first"] for o in outs)
    return total / max(span, 1e-9)


def http_json(url: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=900) as r:
        return json.loads(r.read())


def shared_prefix(kind: str, bin_: str, threads: int, logs: Path, reps: int) -> dict:
    """TTFT of a second agent sharing a 9k-token prefix with a running one,
    against cold; KV cells of four such agents against one."""
    start = hearth if kind == "hearth" else llama_server
    system = " ".join(f"Tool {i}: reads file {i}.rs and reports the functions it defines, one per line." for i in range(365))

    def prompt(user: str) -> list[dict]:
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def ttft(url: str, user: str) -> float:
        out: dict = {}
        stream(url, {"model": "m", "messages": prompt(user), "max_tokens": 1, "temperature": 0, "stream": True}, out)
        return out["first"] - out["start"]

    cold, warm, cells_one, cells_four, snap_step, max_step = [], [], [], [], [], []
    for rep in range(reps):
        srv = start(bin_, GEMMA, 4, 32768, threads, logs, f"{kind}-prefix-{rep}")
        try:
            cold.append(ttft(srv.url, f"Cold question {rep}."))
        finally:
            srv.stop()
        # hearth saves the long prompt to disk once prefilled (a snapshot
        # copy taken while the other agents decode): its longest step then
        # is what a snapshot costs the streams beside it.
        disk = logs / f"kv-{rep}"
        extra = ["--kv-disk-dir", str(disk)] if kind == "hearth" else None
        srv = start(bin_, GEMMA, 4, 32768, threads, logs, f"{kind}-prefix-warm-{rep}", extra)
        try:
            # The first agent: prefill the prefix, then keep decoding.
            first: dict = {}
            body = {"model": "m", "messages": prompt(f"First agent {rep}: list every tool."), "max_tokens": 400,
                    "temperature": 0, "stream": True, "ignore_eos": True}
            t = threading.Thread(target=stream, args=(srv.url, body, first))
            t.start()
            while not first.get("first") and t.is_alive():
                # Wait until it decodes.
                time.sleep(0.05)
                if kind == "hearth":
                    st = http_json(srv.url, "/slots")
                    if any(s["state"] == "decode" for s in st["slots"]):
                        break
                else:
                    break
            if kind != "hearth":
                time.sleep(0.5)
                while not first.get("first") and t.is_alive():
                    time.sleep(0.05)
            if kind == "hearth":
                cells_one.append(http_json(srv.url, "/slots")["kv_used"])
            warm.append(ttft(srv.url, f"Second agent {rep}: which tool reads 7.rs?"))
            if kind == "hearth":
                others = [threading.Thread(target=stream, args=(srv.url, {"model": "m", "messages": prompt(f"Agent {k}."),
                          "max_tokens": 200, "temperature": 0, "stream": True, "ignore_eos": True}, {})) for k in range(3)]
                for o in others:
                    o.start()
                time.sleep(3)
                st = http_json(srv.url, "/slots")
                cells_four.append(st["kv_used"])
                for o in others:
                    o.join()
                snap_step.append(metric_of(srv.url, "hearth_engine_max_snapshot_step_seconds"))
                max_step.append(metric_of(srv.url, "hearth_engine_max_step_seconds"))
            t.join()
        finally:
            srv.stop()
    out = {"cold_ttft_s": mmm(cold), "shared_ttft_s": mmm(warm),
           "ratio": round(statistics.median(warm) / statistics.median(cold), 3)}
    if cells_one:
        out["kv_cells_one_agent"] = mmm(cells_one)
        out["kv_cells_four_agents"] = mmm(cells_four)
        out["kv_ratio"] = round(statistics.median(cells_four) / statistics.median(cells_one), 3)
        out["longest_step_with_snapshot_s"] = mmm(snap_step)
        out["longest_step_s"] = mmm(max_step)
    return out


def starvation(kind: str, bin_: str, threads: int, logs: Path, reps: int) -> dict:
    """A stream's decode speed while a 6k-token prompt is prefilled beside
    it (from that request's start to its first token), against the same
    stream decoding the same token positions alone on a fresh server.

    Decode slows with depth on its own (attention over the stream's own
    cells: SmolLM2 on this CPU decodes ~75 t/s at position 100 and ~30 t/s
    at 1,400, on llama-server too), so "alone" is measured over the same
    token indices as "beside", never over the stream's shallow start."""
    start = hearth if kind == "hearth" else llama_server
    long_prompt = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(470))
    alone, beside, prefill, shallow = [], [], [], []
    for rep in range(reps):
        story = chat(f"Story {rep}: a long tale.", 1500)
        srv = start(bin_, SMOL, 2, 8192, threads, logs, f"{kind}-alone-{rep}")
        try:
            ref: dict = {}
            stream(srv.url, story, ref)
        finally:
            srv.stop()
        srv = start(bin_, SMOL, 2, 8192, threads, logs, f"{kind}-starve-{rep}")
        try:
            a: dict = {}
            ta = threading.Thread(target=stream, args=(srv.url, story, a))
            ta.start()
            time.sleep(4)
            b: dict = {}
            stream(srv.url, chat(long_prompt + f" Summarize {rep}.", 1, ignore_eos=False), b)
            b_start, b_first = b["start"], b["first"] or time.monotonic()
            ta.join()
        finally:
            srv.stop()
        ts, rs = a["times"], ref["times"]
        # Until the prompt's first token, or the stream's end if sooner.
        window_end = min(b_first, ts[-1])
        during = [i for i, t in enumerate(ts) if b_start <= t <= window_end]
        i0, i1 = during[0], min(during[-1], len(rs) - 1)
        beside.append((i1 - i0) / max(ts[i1] - ts[i0], 1e-9))
        alone.append((i1 - i0) / max(rs[i1] - rs[i0], 1e-9))
        before = [t for t in ts if b_start - 3 <= t < b_start]
        shallow.append((len(before) - 1) / max(before[-1] - before[0], 1e-9) if len(before) > 1 else 0.0)
        prefill.append(b_first - b_start)
        print(f"  {kind} rep {rep}: tokens {i0}..{i1} beside {beside[-1]:.1f} t/s, alone {alone[-1]:.1f} t/s, "
              f"6k prefill {prefill[-1]:.1f} s", file=sys.stderr)
    return {"decode_alone_tps": mmm(alone), "decode_beside_6k_prefill_tps": mmm(beside),
            "ratio": round(statistics.median(beside) / max(statistics.median(alone), 1e-9), 3),
            "ratio_per_run": mmm([b / max(a, 1e-9) for a, b in zip(alone, beside)]),
            "decode_before_prefill_tps": mmm(shallow), "prefill_6k_ttft_s": mmm(prefill)}


def metric_of(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return float("nan")


def determinism(bin_: str, threads: int, logs: Path) -> dict:
    """Greedy replies decoded beside three others, against alone."""
    prompts = [f"Question {k}: explain in a few sentences how {topic} works."
               for k, topic in enumerate(["a compiler", "a bicycle", "the moon's phases", "a hash map", "photosynthesis",
                                          "TCP", "a refrigerator", "a vaccine"])]
    srv = hearth(bin_, SMOL, 4, 8192, threads, logs, "determinism")
    try:
        alone = [run_streams(srv.url, [chat(p, 64, ignore_eos=False)])[0]["text"] for p in prompts]
        together: list[str] = []
        for i in range(0, len(prompts), 4):
            together += [o["text"] for o in run_streams(srv.url, [chat(p, 64, ignore_eos=False) for p in prompts[i:i + 4]])]
    finally:
        srv.stop()
    same = sum(a == b for a, b in zip(alone, together))
    return {"prompts": len(prompts), "same_text": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hearth", default=str(REPO / "target" / "release" / "hearth"))
    ap.add_argument("--llama-server", default=None, help="llama-server binary (default: build it)")
    ap.add_argument("--no-llama-server", action="store_true")
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--tokens", type=int, default=192)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--skip-prefix", action="store_true", help="skip the shared-prefix (Gemma) part")
    ap.add_argument("--only", choices=["aggregate", "prefix", "starvation", "determinism"], help="run one part")
    ap.add_argument("--out", default=str(HERE / "results" / "parallel.json"))
    args = ap.parse_args()
    logs = HERE / "results" / "parallel-logs"
    logs.mkdir(parents=True, exist_ok=True)
    servers = {"hearth": (hearth, args.hearth)}
    if not args.no_llama_server:
        ls = args.llama_server or subprocess.run([str(HERE / "llama-bench.sh"), "--target", "llama-server"], check=True,
                                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
        servers["llama-server"] = (llama_server, ls)
    counts = [int(x) for x in args.streams.split(",")]
    results: dict = {"tokens_per_stream": args.tokens, "reps": args.reps, "aggregate_tps": {}, "amx": has_amx()}
    def part(name: str) -> bool:
        return args.only in (None, name)

    for name, (start, bin_) in servers.items() if part("aggregate") else []:
        per: dict = {}
        for n in counts:
            srv = start(bin_, SMOL, n, 2048, args.threads, logs, f"{name}-{n}")
            try:
                aggregate(srv.url, n, 16, 99)  # warm-up
                xs = [aggregate(srv.url, n, args.tokens, rep) for rep in range(args.reps)]
            finally:
                srv.stop()
            per[n] = mmm(xs)
            print(f"{name:13s} {n} streams: {per[n]['median']:.1f} t/s aggregate (min {per[n]['min']}, max {per[n]['max']})",
                  flush=True)
        base = per[counts[0]]["median"]
        results["aggregate_tps"][name] = {"streams": per, "scaling": {n: round(per[n]["median"] / base, 2) for n in counts}}
    if not args.skip_prefix and GEMMA.exists() and part("prefix"):
        for name, (_, bin_) in servers.items():
            results.setdefault("shared_prefix", {})[name] = shared_prefix(name, bin_, args.threads, logs, max(1, args.reps - 1))
            print(f"{name:13s} shared 9k prefix: {results['shared_prefix'][name]}", flush=True)
    for name, (_, bin_) in servers.items() if part("starvation") else []:
        results.setdefault("starvation", {})[name] = starvation(name, bin_, args.threads, logs, max(1, args.reps - 1))
        print(f"{name:13s} decode beside a 6k prefill: {results['starvation'][name]}", flush=True)
    if part("determinism"):
        results["determinism"] = determinism(args.hearth, args.threads, logs)
        print(f"determinism: {results['determinism']}")
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["aggregate_tps"], indent=1))


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Speculative decoding by prompt lookup: hearth with and without it,
beside llama-server with and without `--spec-type ngram-simple`, in the
same run.

    bench/speculative.py                     # SmolLM2 and Gemma 3 270M
    bench/speculative.py --no-llama-server --reps 2

Workloads, greedy, streamed:
- edit: a ~250-line source file and a request to return it with one
  small change (what an agent's file rewrite looks like);
- prose: a short request for free text.
Decode tokens/s = completion tokens / (last token - first token). Each
figure is min/median/max over --reps; acceptance is drafted/accepted tokens
(hearth's /metrics, llama-server's `timings`). The same with 4 concurrent
edit streams (--parallel 4). Results: bench/results/speculative.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import statistics
import subprocess
import sys
import threading
from pathlib import Path

from parallel import GEMMA, HERE, REPO, SMOL, Server, free_port, has_amx, llama_server, metric_of, mmm, stream


def source_file() -> str:
    lines = ["import math", "", ""]
    for i in range(40):
        lines += [f"def step_{i}(state, rate):",
                  f"    \"\"\"Advance the state by one tick of kind {i}.\"\"\"",
                  f"    value = state.get('v{i}', 0.0) * rate + {i}",
                  f"    return math.floor(value) if value > {i * 3} else value", ""]
    lines += ["", "def main():", "    state = {}"] + [f"    state['v{i}'] = step_{i}(state, 1.5)" for i in range(10)]
    return "\n".join(lines) + "\n"


EDIT = ("Here is a Python file:\n\n" + source_file() +
        "\nReturn the whole file unchanged except that step_3 must multiply by 2 instead of rate. "
        "Answer with the file only.")
PROSE = "Write a short story about a fisherman who finds a message in a bottle."


def body(prompt: str, tokens: int) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}


def start_hearth(bin_: str, model: Path, spec: bool, parallel: int, logs: Path, tag: str,
                 spec_flags: tuple[str, ...] = ()) -> Server:
    port = free_port()
    argv = [bin_, "serve", "--model", str(model), "--port", str(port), "--parallel", str(parallel), "--cache-ram-mb", "0",
            "--ctx", "8192"]
    argv += ["--spec", *spec_flags] if spec else ["--no-spec"]
    return Server(argv, port, logs / f"hearth-{tag}.log", "/health")


def start_llama(bin_: str, model: Path, spec: bool, parallel: int, logs: Path, tag: str) -> Server:
    extra = ["--cache-prompt"] + (["--spec-type", "ngram-simple"] if spec else [])
    return llama_server(bin_, model, parallel, 8192, 0, logs, tag, extra)


def decode_tps(url: str, prompt: str, tokens: int, n: int = 1) -> float:
    outs = [dict() for _ in range(n)]
    threads = [threading.Thread(target=stream, args=(url, body(prompt + (f" ({k})" if k else ""), tokens), o))
               for k, o in enumerate(outs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = sum(o["tokens"] for o in outs)
    span = max(o["last"] for o in outs) - min(o["first"] for o in outs)
    return total / max(span, 1e-9)


def acceptance(kind: str, url: str, prompt: str) -> tuple[float, float]:
    """(drafted, accepted) for one more edit request."""
    if kind == "hearth":
        d0, a0 = metric_of(url, "hearth_spec_drafted_tokens_total"), metric_of(url, "hearth_spec_accepted_tokens_total")
        decode_tps(url, prompt, 400)
        return metric_of(url, "hearth_spec_drafted_tokens_total") - d0, metric_of(url, "hearth_spec_accepted_tokens_total") - a0
    import urllib.request
    b = {**body(prompt, 400), "stream": False}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(b).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        t = json.loads(r.read()).get("timings", {})
    return float(t.get("draft_n", 0)), float(t.get("draft_n_accepted", 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hearth", default=str(REPO / "target" / "release" / "hearth"))
    ap.add_argument("--llama-server", default=None)
    ap.add_argument("--no-llama-server", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--out", default=str(HERE / "results" / "speculative.json"))
    ap.add_argument("--servers", default="hearth,llama-server", help="which servers to run, comma-separated")
    ap.add_argument("--models", default="smollm2,gemma", help="which models to run, comma-separated")
    ap.add_argument("--no-x4", action="store_true", help="skip the 4-stream figures")
    ap.add_argument("--hearth-spec-flags", default="", help="more flags for hearth's speculating runs "
                    "(e.g. '--draft-max 64 --draft-min 32')")
    args = ap.parse_args()
    logs = HERE / "results" / "speculative-logs"
    logs.mkdir(parents=True, exist_ok=True)
    spec_flags = tuple(shlex.split(args.hearth_spec_flags))
    servers = {"hearth": (functools.partial(start_hearth, spec_flags=spec_flags), args.hearth)}
    if not args.no_llama_server:
        ls = args.llama_server or subprocess.run([str(HERE / "llama-bench.sh"), "--target", "llama-server"], check=True,
                                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
        servers["llama-server"] = (start_llama, ls)
    results: dict = {"reps": args.reps, "tokens": args.tokens, "amx": has_amx(), "runs": {}}
    models = [m for key, m in (("smollm2", SMOL), ("gemma", GEMMA)) if key in args.models.split(",")]
    for model in models:
        if not model.exists():
            continue
        for name, (start, bin_) in servers.items():
            if name not in args.servers.split(","):
                continue
            for spec in (False, True):
                tag = f"{name}-{model.stem}-{'spec' if spec else 'plain'}"
                srv = start(bin_, model, spec, 1, logs, tag)
                try:
                    decode_tps(srv.url, "Say hi.", 8)
                    row = {"edit_tps": mmm([decode_tps(srv.url, EDIT, args.tokens) for _ in range(args.reps)]),
                           "prose_tps": mmm([decode_tps(srv.url, PROSE, args.tokens) for _ in range(args.reps)])}
                    if spec:
                        d, a = acceptance(name, srv.url, EDIT)
                        row["edit_acceptance"] = round(a / d, 3) if d else None
                        row["edit_drafted"] = d
                finally:
                    srv.stop()
                if model == SMOL and not args.no_x4:
                    srv = start(bin_, model, spec, 4, logs, tag + "-x4")
                    try:
                        decode_tps(srv.url, "Say hi.", 8, 4)
                        row["edit_x4_tps"] = mmm([decode_tps(srv.url, EDIT, args.tokens, 4) for _ in range(args.reps)])
                    finally:
                        srv.stop()
                results["runs"][tag] = row
                print(f"{tag:40s} {row}", flush=True)
    ratios = {}
    for tag, row in results["runs"].items():
        if tag.endswith("-spec"):
            plain = results["runs"][tag[:-5] + "-plain"]
            ratios[tag[:-5]] = {k: round(row[k]["median"] / plain[k]["median"], 3)
                                for k in ("edit_tps", "prose_tps", "edit_x4_tps") if k in row}
    results["speedup"] = ratios
    print(json.dumps(ratios, indent=1))
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())

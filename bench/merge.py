#!/usr/bin/env python3
"""Merge llama-bench's JSON and `hearth bench --json` lines into one table.

Used by bench/run.sh. Prints the side-by-side table and writes
latest.json (summary rows, run metadata and both raw outputs) and
latest.md (the same table in markdown) into --out. Standard library only.
"""

import argparse
import datetime
import json
import os
import sys


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--llama-bench", required=True, help="llama-bench -o json output")
    p.add_argument("--hearth", required=True, help="hearth bench --json output (one object per line)")
    p.add_argument("--out", required=True, help="directory for latest.json and latest.md")
    p.add_argument("--model-path", required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--reps", type=int, required=True)
    p.add_argument("--n-prompt", type=int, required=True)
    p.add_argument("--n-gen", type=int, required=True)
    p.add_argument("--loadavg-before", default="unknown")
    p.add_argument("--llama-bench-cpu", help="measure.py stats of the llama-bench run")
    p.add_argument("--hearth-cpu", help="measure.py stats of the hearth bench run")
    p.add_argument("--busy-pct", type=float, default=10.0,
                   help="warn when other processes used more than this share of the CPUs")
    return p.parse_args(argv)


def lb_test_name(r):
    """llama-bench's own test naming: pp<N> for prompt-only, tg<N> for generation-only."""
    n_prompt, n_gen = r.get("n_prompt", 0), r.get("n_gen", 0)
    if n_gen == 0:
        return "pp%d" % n_prompt
    if n_prompt == 0:
        return "tg%d" % n_gen
    return "pp%d+tg%d" % (n_prompt, n_gen)


def pct(a, b):
    return 100.0 * a / b if a is not None and b else None


def fmt_ts(v, sd=None):
    if v is None:
        return "n/a"
    return "%.2f ± %.2f" % (v, sd) if sd is not None else "%.2f" % v


def fmt_pct(v):
    return "n/a" if v is None else "%.1f %%" % v


def load_stats(path):
    if not path:
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def fmt_other(s):
    if not s or s.get("other_cpu_pct") is None:
        return "n/a"
    return "%.0f %%" % s["other_cpu_pct"]


def main(argv):
    a = parse_args(argv)
    with open(a.llama_bench) as f:
        lb = json.load(f)
    with open(a.hearth) as f:
        hearth = [json.loads(line) for line in f if line.lstrip().startswith("{")]
    if not lb:
        sys.exit("merge.py: llama-bench produced no results")
    if not hearth:
        sys.exit("merge.py: hearth bench produced no results")

    ref = {lb_test_name(r): r for r in lb}
    ours = {(r["engine"], r["test"]): r for r in hearth}
    tests = ["pp%d" % a.n_prompt, "tg%d" % a.n_gen]

    rows = []
    for t in tests:
        r = ref.get(t) or {}
        h = ours.get(("hearth", t)) or {}
        raw = ours.get(("llama.cpp-raw", t)) or {}
        row = {
            "test": t,
            "llama_bench_ts": r.get("avg_ts"),
            "llama_bench_sd": r.get("stddev_ts"),
            "hearth_ts": h.get("avg_ts"),
            "hearth_sd": h.get("stddev_ts"),
            "hearth_raw_ts": raw.get("avg_ts"),
            "hearth_raw_sd": raw.get("stddev_ts"),
        }
        row["hearth_pct_of_llama_bench"] = pct(row["hearth_ts"], row["llama_bench_ts"])
        row["raw_pct_of_llama_bench"] = pct(row["hearth_raw_ts"], row["llama_bench_ts"])
        rows.append(row)

    first = lb[0]
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model_path": a.model_path,
        "model": first.get("model_type") or hearth[0].get("model"),
        "model_size": first.get("model_size"),
        "model_n_params": first.get("model_n_params"),
        "cpu": first.get("cpu_info"),
        "nproc": os.cpu_count(),
        "threads": a.threads,
        "batch": a.batch,
        "reps": a.reps,
        "n_prompt": a.n_prompt,
        "n_gen": a.n_gen,
        "llama_bench_build": "b%s (%s)" % (first.get("build_number"), first.get("build_commit")),
        "llama_bench_flash_attn": first.get("flash_attn"),
        "loadavg_before": a.loadavg_before,
        "cpu_use": {"llama_bench": load_stats(a.llama_bench_cpu), "hearth": load_stats(a.hearth_cpu)},
    }
    others = [s["other_cpu_pct"] for s in meta["cpu_use"].values() if s and s.get("other_cpu_pct") is not None]
    busy = bool(others) and max(others) > a.busy_pct
    meta["machine_busy"] = busy
    cpu_line = "other processes' share of the CPUs during the run: llama-bench %s, hearth %s" % (
        fmt_other(meta["cpu_use"]["llama_bench"]), fmt_other(meta["cpu_use"]["hearth"]))
    warning = (
        "WARNING: the machine was busy (more than %.0f %% of its CPUs used by other processes); "
        "these numbers measure that load as much as the engines. Rerun on a quiet machine." % a.busy_pct
        if busy else None)

    header = ["test", "llama-bench t/s", "hearth t/s", "hearth raw-loop t/s", "hearth / llama-bench"]
    table = [
        [
            r["test"],
            fmt_ts(r["llama_bench_ts"], r["llama_bench_sd"]),
            fmt_ts(r["hearth_ts"], r["hearth_sd"]),
            fmt_ts(r["hearth_raw_ts"], r["hearth_raw_sd"]),
            fmt_pct(r["hearth_pct_of_llama_bench"]),
        ]
        for r in rows
    ]
    title = "model %s (%s), %d threads, batch %d, %d reps; llama-bench %s" % (
        os.path.basename(a.model_path), meta["model"], a.threads, a.batch, a.reps, meta["llama_bench_build"])

    widths = [max(len(x) for x in col) for col in zip(header, *table)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    print()
    print(title)
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for cells in table:
        print(line(cells))
    print(cpu_line)
    if warning:
        print(warning)

    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "latest.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "raw": {"llama_bench": lb, "hearth": hearth}}, f, indent=2)
        f.write("\n")

    md = [
        "# hearth vs llama-bench: latest run",
        "",
        "- date: %s" % meta["date"],
        "- model: `%s` (%s)" % (os.path.basename(a.model_path), meta["model"]),
        "- cpu: %s (%s logical CPUs); threads %d, batch %d, %d reps"
        % (meta["cpu"], meta["nproc"], a.threads, a.batch, a.reps),
        "- llama-bench: %s" % meta["llama_bench_build"],
        "- load average before the run: %s" % a.loadavg_before,
        "- %s" % cpu_line,
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    md += ["| " + " | ".join(cells) + " |" for cells in table]
    if warning:
        md += ["", "**%s**" % warning]
    with open(os.path.join(a.out, "latest.md"), "w") as f:
        f.write("\n".join(md) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])

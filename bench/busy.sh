#!/usr/bin/env bash
# Prefill and decode speed of `hearth bench -p 128 -n 64` on the default
# model, on a quiet machine and on a busy one:
#
#   quiet  nothing else running (beyond whatever the machine already runs)
#   hog    one CPU-bound process per core beside it
#   build  a real C++ build beside it: the vendored llama.cpp's ggml sources
#          compiled over and over, one compiler per core
#
# Under each load, RUNS rounds of: this build with its default threads
# (`auto`), this build with each fixed thread count (`-t N`), and, when
# HEARTH_OLD_BIN is set, that build with its default and the same fixed
# counts; then llama-bench with each `-t` (and `--poll`, when it is built
# without OpenMP) when one is found. Each run is its own process. Last, the
# collapse check: COLLAPSE_RUNS decode runs of this build beside the hog.
# Every figure is printed as min/median/max with the load average seen.
#
#   bench/busy.sh                       # about 10 minutes on two cores
#   RUNS=3 COLLAPSE_RUNS=10 bench/busy.sh
#   HEARTH_OLD_BIN=/path/to/old/hearth bench/busy.sh
#
# Environment: HEARTH_BIN (default target/release/hearth), HEARTH_OLD_BIN
# (optional), LLAMA_BENCH (default bench/build/.../llama-bench if built;
# `none`: skip it), LLAMA_BENCH_NOOMP (default: the build-noomp one, if built),
# MODEL (default: the embedded default model), RUNS (5), COLLAPSE_RUNS (20),
# RUN_TIMEOUT (120: seconds one run may take; a run past it is recorded at
# 0 t/s and counted as timed out),
# LOADS (default "quiet hog build"), THREADS (fixed counts to try; default
# every count up to 4 cores, else 1, half and all), KEEP (directory for the
# raw JSON lines; default a temporary one, removed).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
bin="${HEARTH_BIN:-$root/target/release/hearth}"
old="${HEARTH_OLD_BIN:-}"
runs="${RUNS:-5}"
collapse_runs="${COLLAPSE_RUNS:-20}"
run_timeout="${RUN_TIMEOUT:-120}"
loads="${LOADS:-quiet hog build}"
cores="$(nproc)"
if [[ -z "${THREADS:-}" ]]; then
    if ((cores <= 4)); then THREADS="$(seq -s' ' 1 "$cores")"
    else THREADS="1 $((cores / 2)) $cores"; fi
fi
model="${MODEL:-}"
lb="${LLAMA_BENCH:-}"
if [[ -z "$lb" ]]; then
    for c in "$here/build/llama.cpp-b11434/build/bin/llama-bench" \
             "$here/build/llama.cpp-b11434/build-noomp/bin/llama-bench"; do
        [[ -x "$c" ]] && lb="$c" && break
    done
fi
[[ "$lb" == none ]] && lb=""
# A second llama-bench built without OpenMP, for --poll.
lb_noomp="${LLAMA_BENCH_NOOMP:-$here/build/llama.cpp-b11434/build-noomp/bin/llama-bench}"
[[ -x "$lb_noomp" && "$lb_noomp" != "$lb" ]] || lb_noomp=""

say() { echo "==> $*" >&2; }
die() { echo "busy.sh: $*" >&2; exit 1; }
[[ -x "$bin" ]] || die "no hearth binary at $bin (cargo build --release, or set HEARTH_BIN)"
[[ -z "$old" || -x "$old" ]] || die "HEARTH_OLD_BIN=$old is not an executable"
# The default model (src/config.rs, default_model_path).
[[ -n "$model" ]] || model="${HEARTH_HOME:-$HOME/.cache/hearth}/models/SmolLM2-135M-Instruct.Q4_1.gguf"
[[ -f "$model" ]] || die "model not found: '$model' (scripts/fetch-models.sh, or set MODEL)"

work="${KEEP:-}"
if [[ -z "$work" ]]; then work="$(mktemp -d)"; trap 'stop_load; rm -rf "$work"' EXIT
else mkdir -p "$work"; trap 'stop_load' EXIT; fi
raw="$work/busy.jsonl"
: >"$raw"

# --- loads -------------------------------------------------------------------
load_pids=()
stop_load() {
    local p
    for p in "${load_pids[@]}"; do kill -- "-$p" 2>/dev/null || kill "$p" 2>/dev/null || true; done
    for p in "${load_pids[@]}"; do wait "$p" 2>/dev/null || true; done
    load_pids=()
}
llama_src() {
    local d
    for d in "$HOME"/.cargo/registry/src/*/llama-cpp-sys-2-*/llama.cpp; do
        [[ -d "$d/ggml/src" ]] && { echo "$d"; return; }
    done
}
start_load() {
    case "$1" in
        quiet) ;;
        hog)
            for ((i = 0; i < cores; i++)); do
                setsid bash -c 'while :; do :; done' &
                load_pids+=("$!")
            done ;;
        build)
            local src cxx
            src="$(llama_src)"
            [[ -n "$src" ]] || die "no vendored llama.cpp under ~/.cargo/registry for the build load"
            cxx="$(command -v g++ || command -v c++ || true)"
            [[ -n "$cxx" ]] || die "no C++ compiler for the build load"
            # One compiler per core, over ggml's sources, round after round.
            setsid bash -c '
                src="$1"; cxx="$2"; jobs="$3"; out="$4"
                cd "$src/ggml/src"
                flags="-O2 -w -I. -I../include -Iggml-cpu -D_GNU_SOURCE"
                compile() {
                    case "$1" in
                        *.c) cc $flags -c "$1" -o "$out/$BASHPID.o" ;;
                        *) "$cxx" $flags -std=gnu++17 -c "$1" -o "$out/$BASHPID.o" ;;
                    esac
                }
                export -f compile; export cxx out flags
                while :; do
                    printf "%s\n" ggml-alloc.c ggml-backend.cpp ggml-quants.c ggml-opt.cpp gguf.cpp \
                        ggml-cpu/ggml-cpu.c ggml-cpu/ops.cpp ggml-cpu/vec.cpp ggml-cpu/quants.c \
                        ggml-cpu/repack.cpp ggml-cpu/binary-ops.cpp ggml-cpu/unary-ops.cpp |
                        xargs -P "$jobs" -n 1 bash -c "compile \"\$0\"" 2>/dev/null || true
                    rm -f "$out"/*.o
                done' _ "$src" "$cxx" "$cores" "$work" &
            load_pids+=("$!") ;;
        *) die "unknown load: $1 (quiet, hog or build)" ;;
    esac
    # Let the load reach its pace before measuring.
    [[ "$1" == quiet ]] || sleep 3
}

# --- one run -------------------------------------------------------------------
# run_hearth LOAD LABEL BIN [ARGS...]: one `hearth bench` process, its pp and
# tg rows appended to the raw file with the label, load and load average.
run_hearth() {
    local load="$1" label="$2" exe="$3"
    shift 3
    local la out
    la="$(cut -d' ' -f1-3 /proc/loadavg)"
    if out="$(timeout "$run_timeout" "$exe" bench -m "$model" -p 128 -n 64 -r 1 --json "$@" 2>/dev/null)"; then
        grep '"engine":"hearth"' <<<"$out" | python3 -c '
import json, sys
load, label, la = sys.argv[1:4]
for line in sys.stdin:
    r = json.loads(line)
    print(json.dumps({"load": load, "variant": label, "test": r["test"][:2],
                      "ts": r["avg_ts"], "threads": r.get("threads"), "loadavg": la}))
' "$load" "$label" "$la" >>"$raw"
    else
        local rc=$?
        if ((rc == 124)); then
            # A run that cannot finish in time is as good as a collapse:
            # recorded at 0 t/s, and counted as timed out.
            say "  $label timed out after $run_timeout s"
            for t in pp tg; do
                printf '{"load": "%s", "variant": "%s", "test": "%s", "ts": 0.0, "threads": null, "loadavg": "%s", "timed_out": true}\n' \
                    "$load" "$label" "$t" "$la" >>"$raw"
            done
        else
            say "  $label failed (rc $rc)"
        fi
    fi
}

# run_llama_bench LOAD EXE LABEL [ARGS...]: RUNS samples per thread count.
run_llama_bench() {
    local load="$1" exe="$2" label="$3"
    shift 3
    local la tlist
    la="$(cut -d' ' -f1-3 /proc/loadavg)"
    tlist="$(tr ' ' ',' <<<"$THREADS")"
    timeout "$((run_timeout * runs * 2))" "$exe" -m "$model" -p 128 -n 64 -r "$runs" --repack 0 -t "$tlist" -o jsonl "$@" 2>/dev/null |
    python3 -c '
import json, sys
load, label, la = sys.argv[1:4]
for line in sys.stdin:
    try:
        r = json.loads(line)
    except ValueError:
        continue
    test = "pp" if r.get("n_prompt", 0) > 0 else "tg"
    for ts in r.get("samples_ts", []):
        print(json.dumps({"load": load, "variant": "%s -t %d%s" % (label, r["n_threads"], ""),
                          "test": test, "ts": ts, "threads": r["n_threads"], "loadavg": la}))
' "$load" "$label" "$la" >>"$raw" || say "  $label failed"
}

say "hearth: $bin"
[[ -n "$old" ]] && say "old build: $old"
[[ -n "$lb" ]] && say "llama-bench: $lb"
[[ -n "$lb_noomp" ]] && say "llama-bench without OpenMP: $lb_noomp"
say "model: $model; $cores cores; fixed thread counts: $THREADS; $runs runs per load"

start=$SECONDS
for load in $loads; do
    say "load: $load"
    start_load "$load"
    for ((r = 1; r <= runs; r++)); do
        say "  round $r/$runs (load average $(cut -d' ' -f1 /proc/loadavg))"
        run_hearth "$load" "new auto" "$bin" --no-reference
        for t in $THREADS; do
            run_hearth "$load" "new -t $t" "$bin" --no-reference -t "$t"
        done
        if [[ -n "$old" ]]; then
            run_hearth "$load" "old default" "$old"
            for t in $THREADS; do
                ((t == cores)) && continue  # the old default is one per core
                run_hearth "$load" "old -t $t" "$old" -t "$t"
            done
        fi
    done
    [[ -n "$lb" ]] && run_llama_bench "$load" "$lb" "llama-bench"
    if [[ -n "$lb_noomp" ]]; then
        run_llama_bench "$load" "$lb_noomp" "llama-bench-noomp --poll 0" --poll 0
        run_llama_bench "$load" "$lb_noomp" "llama-bench-noomp --poll 50" --poll 50
    fi
    stop_load
done

if ((collapse_runs > 0)); then
    say "collapse check: $collapse_runs runs of 'new auto' beside the hog"
    start_load hog
    for ((r = 1; r <= collapse_runs; r++)); do
        run_hearth collapse "new auto" "$bin" --no-reference
    done
    stop_load
fi
say "done in $((SECONDS - start)) s; raw results: $raw"

python3 - "$raw" "$cores" <<'PY'
import json, statistics, sys
from collections import defaultdict
raw, cores = sys.argv[1], int(sys.argv[2])
rows = [json.loads(l) for l in open(raw) if l.strip()]
by = defaultdict(list)
las = defaultdict(list)
for r in rows:
    by[(r["load"], r["test"], r["variant"])].append(r["ts"])
    las[r["load"]].append(float(r["loadavg"].split()[0]))
def stats(xs):
    return min(xs), statistics.median(xs), max(xs)
loads = []
for r in rows:
    if r["load"] not in loads:
        loads.append(r["load"])
print()
print(f"{'load':8} {'test':4} {'variant':32} {'n':>3} {'min':>8} {'median':>8} {'max':>8}  threads")
for load in loads:
    for test in ("pp", "tg"):
        for (l, t, v), xs in by.items():
            if l != load or t != test:
                continue
            thr = sorted({str(r["threads"]) for r in rows
                          if r["load"] == l and r["test"] == t and r["variant"] == v})
            lo, med, hi = stats(xs)
            print(f"{load:8} {test:4} {v:32} {len(xs):3} {lo:8.1f} {med:8.1f} {hi:8.1f}  {','.join(thr)}")
    la = las[load]
    print(f"{load:8} load average (1 min) seen: {min(la):.2f}-{max(la):.2f}")
    out = sorted({r["variant"] for r in rows if r["load"] == load and r.get("timed_out")})
    if out:
        print(f"{load:8} timed out (recorded at 0 t/s): {', '.join(out)}")
print()
print("goals (decode, tg):")
def med(load, variant, test="tg"):
    xs = by.get((load, test, variant))
    return statistics.median(xs) if xs else None
for load in loads:
    if load == "collapse":
        continue
    new = med(load, "new auto")
    if new is None:
        continue
    if load == "quiet":
        o = med(load, "old default")
        if o:
            print(f"  quiet: new auto / old default = {new / o:.3f} (goal >= 0.97)")
        po, pn = med(load, "old default", "pp"), med(load, "new auto", "pp")
        if po and pn:
            print(f"  quiet: prefill new auto / old default = {pn / po:.3f}")
        continue
    fixed = {v: m for (l, t, v), xs in by.items()
             if l == load and t == "tg" and (" -t " in v) and v.split()[0] in ("new", "old")
             for m in [statistics.median(xs)]}
    if not fixed:
        continue
    best_v = max(fixed, key=fixed.get)
    best = fixed[best_v]
    low = min(by[(load, "tg", "new auto")])
    print(f"  {load}: new auto median {new:.1f} / best fixed ({best_v}) {best:.1f} = {new / best:.3f} "
          f"(goal >= 0.9); slowest run {low:.1f} = {low / best:.3f} of it (goal >= 0.5)")
xs = by.get(("collapse", "tg", "new auto"))
if xs:
    ref = [statistics.median(v) for (l, t, var), v in by.items()
           if l == "hog" and t == "tg" and " -t " in var and var.split()[0] in ("new", "old")]
    base = max(ref) if ref else statistics.median(xs)
    bad = [x for x in xs if x < 0.5 * base]
    lo, m, hi = stats(xs)
    print(f"  collapse check beside the hog: {len(xs)} runs, min/median/max {lo:.1f}/{m:.1f}/{hi:.1f} t/s; "
          f"{len(bad)} below half of {base:.1f} (goal: none)")
PY

#!/usr/bin/env bash
# Compare hearth's prefill and decode speed with llama.cpp's reference
# benchmark, llama-bench, in one run, on the same model, threads and batch.
#
#   bench/run.sh                     default model, threads = nproc
#   bench/run.sh --model PATH        another GGUF model
#   bench/run.sh --threads N         thread count for both (default: nproc)
#   bench/run.sh --reps N            repetitions per test (default: 5)
#   bench/run.sh --no-build          use the binaries already built
#
# Steps: `cargo build --release` (hearth), bench/llama-bench.sh (llama-bench
# from the matching llama.cpp source), scripts/fetch-models.sh when the
# default model is missing; then llama-bench and `hearth bench` run one after
# the other (pp512 and tg128, batch 512). The side-by-side table is printed
# and written to bench/results/latest.json and bench/results/latest.md.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
results="$here/results"

model="${HEARTH_HOME:-$HOME/.cache/hearth}/models/SmolLM2-135M-Instruct.Q4_1.gguf"
model_given=0
threads="$(nproc)"
reps=5
build=1
n_prompt=512
n_gen=128
batch=512

say() { echo "==> $*" >&2; }
die() { echo "bench/run.sh: $*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        -m|--model) [[ $# -ge 2 ]] || die "$1 needs a path"; model="$2"; model_given=1; shift 2 ;;
        --model=*) model="${1#*=}"; model_given=1; shift ;;
        -t|--threads) [[ $# -ge 2 ]] || die "$1 needs a number"; threads="$2"; shift 2 ;;
        --threads=*) threads="${1#*=}"; shift ;;
        -r|--reps) [[ $# -ge 2 ]] || die "$1 needs a number"; reps="$2"; shift 2 ;;
        --reps=*) reps="${1#*=}"; shift ;;
        --no-build) build=0; shift ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
[[ "$threads" =~ ^[1-9][0-9]*$ ]] || die "--threads must be a positive integer"
[[ "$reps" =~ ^[1-9][0-9]*$ ]] || die "--reps must be a positive integer"

# --- build --------------------------------------------------------------------
hearth="$root/target/release/hearth"
if [[ $build -eq 1 ]]; then
    say "building hearth (cargo build --release)"
    (cd "$root" && cargo build --release) || die "cargo build --release failed"
    say "building llama-bench (bench/llama-bench.sh)"
    llama_bench="$("$here/llama-bench.sh")" || die "bench/llama-bench.sh failed"
else
    llama_bench="$(ls "$here"/build/llama.cpp-b*/build/bin/llama-bench 2>/dev/null | head -n1 || true)"
    [[ -n "$llama_bench" ]] || die "--no-build: llama-bench not built yet (run bench/llama-bench.sh)"
fi
[[ -x "$hearth" ]] || die "missing $hearth"
[[ -x "$llama_bench" ]] || die "missing $llama_bench"

# --- model --------------------------------------------------------------------
if [[ ! -f "$model" ]]; then
    [[ $model_given -eq 0 ]] || die "model not found: $model"
    say "default model missing; fetching it (scripts/fetch-models.sh)"
    "$root/scripts/fetch-models.sh" || die "scripts/fetch-models.sh failed"
    [[ -f "$model" ]] || die "model still missing after fetch: $model"
fi
model="$(cd "$(dirname "$model")" && pwd)/$(basename "$model")"

# --- run ----------------------------------------------------------------------
work="$(mktemp -d "${TMPDIR:-/tmp}/hearth-bench.XXXXXX")"
trap 'rm -rf "$work"' EXIT
load_before="$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)"
measure() { python3 "$here/measure.py" "$@"; }

say "llama-bench: pp$n_prompt, tg$n_gen, threads $threads, batch $batch, reps $reps"
measure "$work/llama-bench.cpu.json" -- "$llama_bench" -m "$model" -p "$n_prompt" -n "$n_gen" -t "$threads" \
    -b "$batch" -ub "$batch" -r "$reps" -o json >"$work/llama-bench.json" 2>"$work/llama-bench.log" \
    || { tail -n 30 "$work/llama-bench.log" >&2; die "llama-bench failed"; }

say "hearth bench: pp$n_prompt, tg$n_gen, threads $threads, batch $batch, reps $reps"
measure "$work/hearth.cpu.json" -- "$hearth" bench -m "$model" -p "$n_prompt" -n "$n_gen" -t "$threads" \
    -b "$batch" -r "$reps" --json >"$work/hearth.jsonl" 2>"$work/hearth.log" \
    || { tail -n 30 "$work/hearth.log" >&2; die "hearth bench failed"; }

# --- merge --------------------------------------------------------------------
python3 "$here/merge.py" \
    --llama-bench "$work/llama-bench.json" --hearth "$work/hearth.jsonl" --out "$results" \
    --model-path "$model" --threads "$threads" --batch "$batch" --reps "$reps" \
    --n-prompt "$n_prompt" --n-gen "$n_gen" \
    --loadavg-before "$load_before" \
    --llama-bench-cpu "$work/llama-bench.cpu.json" --hearth-cpu "$work/hearth.cpu.json"
say "wrote ${results#"$root"/}/latest.json and ${results#"$root"/}/latest.md"

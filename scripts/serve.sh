#!/usr/bin/env bash
# Build hearth if needed, fetch the default model, and serve it.
#
#   scripts/serve.sh [hearth serve flags...]     e.g. scripts/serve.sh --port 8080
#
# Setup progress goes to stderr, so stdout carries only the server's own
# "hearth listening on http://..." line.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh --no-test-deps >&2
exec "${CARGO_TARGET_DIR:-target}/release/hearth" serve "$@"

#!/usr/bin/env bash
# Exec round-trip bench (release build): polling vs NDJSON vs `docker exec`, one `serve`
# process and one echo workspace on the local Docker engine (needs dockerd and the echo
# image: infra/build-agent-image.sh). Extra arguments go to the bench (e.g. --samples 50).
# `--smoke` runs three samples on the dev build (the test suite keeps the bench working).
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/molecule-target}"
if [[ "${1:-}" == "--smoke" ]]; then
    shift
    cargo build -q --workspace --bins --tests   # no-op after tests/run.sh's build
    exec "$CARGO_TARGET_DIR/debug/molecule-bench-exec" --samples 3 --provisions 1 "$@"
fi
cargo build -q --release --bin molecule --bin molecule-bench-exec
exec "$CARGO_TARGET_DIR/release/molecule-bench-exec" "$@"

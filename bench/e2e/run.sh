#!/usr/bin/env bash
# API and end-to-end bench (release build): raw single-row INSERTs, POST /workspaces and
# POST /workspaces/{id}/exec with 64 clients against one `molecule serve` on the same
# PostgreSQL, and serve's RSS idle and under that load. Extra arguments go to the bench
# (e.g. --secs 20). `--smoke` runs a short round on the dev build (the test suite keeps it working).
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/molecule-target}"
if [[ "${1:-}" == "--smoke" ]]; then
    shift
    cargo build -q --workspace --bins --tests   # no-op after tests/run.sh's build
    exec "$CARGO_TARGET_DIR/debug/molecule-bench-e2e" --secs 1 --clients 8 "$@"
fi
cargo build -q --release --bin molecule --bin molecule-bench-e2e
exec "$CARGO_TARGET_DIR/release/molecule-bench-e2e" "$@"

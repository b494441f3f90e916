#!/usr/bin/env bash
# Queue benchmark (release build). Uses DATABASE_URL when set, else a private cluster.
# Extra arguments go to the benchmark (e.g. --jobs 100000). `--smoke` runs a small,
# quick round on the dev build instead (the test suite uses it to keep the bench working).
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/molecule-target}"
if [[ "${1:-}" == "--smoke" ]]; then
    shift
    cargo build -q --workspace --bins --tests   # no-op after tests/run.sh's build
    exec "$CARGO_TARGET_DIR/debug/molecule-bench-queue" --jobs 2000 --rounds 1 --samples 30 "$@"
fi
cargo build -q --release -p molecule-bench-queue
exec "$CARGO_TARGET_DIR/release/molecule-bench-queue" "$@"

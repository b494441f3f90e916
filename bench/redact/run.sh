#!/usr/bin/env bash
# The redactor's throughput (release build). Extra arguments go to the bench (e.g.
# --mib 64 --rounds 9). `--smoke` runs a small round on the dev build (the test suite uses
# it to keep the bench working).
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/molecule-target}"
if [[ "${1:-}" == "--smoke" ]]; then
    shift
    cargo build -q --workspace --bins --tests   # no-op after tests/run.sh's build
    exec "$CARGO_TARGET_DIR/debug/molecule-bench-redact" --mib 2 --rounds 1 "$@"
fi
cargo build -q --release -p molecule-bench-redact
exec "$CARGO_TARGET_DIR/release/molecule-bench-redact" "$@"

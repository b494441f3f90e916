#!/usr/bin/env bash
# Our job core beside awa and graphile_worker (Rust) on one PostgreSQL, in one run.
# Release build in a target dir of its own (this workspace is separate from the main one
# and is never built by CI). Uses DATABASE_URL when set, else a private cluster removed
# at exit. Extra arguments go to the benchmark (e.g. --jobs 50000 --rounds 5).
set -euo pipefail
cd "$(dirname "$0")"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/peers-target}"
nice -n 10 cargo build -q --release --locked
exec "$CARGO_TARGET_DIR/release/molecule-bench-peers" "$@"

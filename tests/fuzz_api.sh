#!/usr/bin/env bash
# Fuzzes the API from its own OpenAPI document with schemathesis (PyPI), bounded:
# no 5xx (but the console's documented 501), and no response that breaks the documented
# schema or status codes.
# Runs `molecule serve` on its own embedded PostgreSQL in a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/molecule-target}"
VENV="${MOLECULE_VENV:-$HOME/.cache/molecule-venv}"
MAX_EXAMPLES="${FUZZ_MAX_EXAMPLES:-40}"

if [[ ! -x "$VENV/bin/schemathesis" ]]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q 'schemathesis>=4,<5'
fi
cargo build -q --workspace --bins --tests   # no-op after tests/run.sh's build
BIN="$CARGO_TARGET_DIR/debug/molecule"

WORK="$(mktemp -d /tmp/molecule-fuzz.XXXXXX)"
chmod 755 "$WORK"
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
# No workspace backend: the fuzz exercises the API, not the engine.
export MOLECULE_DATA_DIR="$WORK/data" LISTEN_ADDR="127.0.0.1:$PORT" ADMIN_TOKEN="fuzz-admin-$RANDOM$RANDOM" MOLECULE_BACKEND=none
unset DATABASE_URL
"$BIN" serve >"$WORK/serve.log" 2>&1 &
SERVE=$!
cleanup() { kill -TERM "$SERVE" 2>/dev/null || true; wait "$SERVE" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 1 120); do
    curl -sf "http://$LISTEN_ADDR/readyz" >/dev/null && break
    sleep 0.5
done
TOKEN="$("$BIN" org create fuzz --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')"
# A few real rows so some generated requests reach existing ids.
for n in 1 2 3; do
    curl -sf -X POST "http://$LISTEN_ADDR/workspaces" -H "Authorization: Bearer $TOKEN" \
        -H 'Content-Type: application/json' -d "{\"name\":\"seed$n\",\"runtime\":\"echo\"}" >/dev/null
done

CHECKS=not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance
# The console answers a documented 501 on the Docker backend (A8): it is fuzzed on its
# own, with every check but "no 5xx".
"$VENV/bin/schemathesis" run "http://$LISTEN_ADDR/openapi.json" \
    --exclude-path '/workspaces/{id}/console' \
    --checks "$CHECKS" \
    -H "Authorization: Bearer $TOKEN" \
    --max-examples "$MAX_EXAMPLES" \
    --seed 42 \
    --no-color
"$VENV/bin/schemathesis" run "http://$LISTEN_ADDR/openapi.json" \
    --include-path '/workspaces/{id}/console' \
    --checks "${CHECKS#not_a_server_error,}" \
    -H "Authorization: Bearer $TOKEN" \
    --max-examples "$MAX_EXAMPLES" \
    --seed 42 \
    --no-color
echo "fuzz: schemathesis found no failures"

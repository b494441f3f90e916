#!/usr/bin/env bash
# Builds the reference agent image (runtime `echo`) locally — no registry involved:
# a root filesystem with the agent binary, the shared libraries `ldd` lists, and
# busybox-static (a shell and the usual tools, for exec and rescue), imported with
# `docker import`. Needs a running Docker engine.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/molecule-target}"
IMAGE="${ECHO_IMAGE:-molecule-local/echo-agent:v1}"
PROFILE="${AGENT_PROFILE:-release}"

# A static busybox (the dynamic one would need its libraries in the image too).
if ! command -v busybox >/dev/null || ! (ldd "$(command -v busybox)" 2>&1 || true) | grep -q "not a dynamic"; then
    apt-get update -q && apt-get install -y -q busybox-static
fi
# Same flags as tests/run.sh's build, so this is a no-op there (a package-only build
# unifies features differently and would rebuild dependencies).
if [[ "$PROFILE" == release ]]; then
    cargo build -q --release -p molecule-agent
    BIN="$CARGO_TARGET_DIR/release/molecule-agent"
else
    cargo build -q --workspace --bins --tests
    BIN="$CARGO_TARGET_DIR/debug/molecule-agent"
fi

ROOT="$(mktemp -d)"
trap 'rm -rf "$ROOT"' EXIT
mkdir -p "$ROOT"/{bin,usr/local/bin,configs,tmp,etc}
cp "$(command -v busybox)" "$ROOT/bin/busybox"
for tool in sh ash cat tail head ls ps env echo printf sleep grep sed awk id kill wc tr yes dd timeout base64; do
    ln -sf busybox "$ROOT/bin/$tool"
done
cp "$BIN" "$ROOT/usr/local/bin/molecule-agent"
# The agent's shared libraries, at the same paths.
ldd "$BIN" | awk '/=>/ {print $3} /^[ \t]*\// {print $1}' | while read -r lib; do
    [[ -f "$lib" ]] || continue
    mkdir -p "$ROOT$(dirname "$lib")"
    cp -L "$lib" "$ROOT$lib"
done
echo "root:x:0:0:root:/:/bin/sh" > "$ROOT/etc/passwd"
# The agent runs as this non-root user (backends/src/isolation.rs), owner of its /configs.
echo "nonroot:x:65532:65532:nonroot:/tmp:/bin/sh" >> "$ROOT/etc/passwd"
echo "nonroot:x:65532:" > "$ROOT/etc/group"
chown 65532:65532 "$ROOT/configs"
chmod 1777 "$ROOT/tmp"
tar -C "$ROOT" -c . | docker import \
    --change 'ENTRYPOINT ["/usr/local/bin/molecule-agent"]' \
    --change 'ENV PATH=/usr/local/bin:/bin' \
    - "$IMAGE" >/dev/null
echo "built $IMAGE"

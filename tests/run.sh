#!/usr/bin/env bash
# The whole test suite, from a fresh machine (Debian, root, Rust and PostgreSQL 15
# binaries present). Installs what the tests need (PostgreSQL, a Docker engine, the
# a2a-sdk agents' virtualenvs), builds once (dev profile), runs the smoke rounds of both
# benchmarks, then every test. Tests start their own PostgreSQL
# clusters (set MOLECULE_TEST_PG_URL to use an existing superuser URL instead).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/molecule-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# PostgreSQL binaries (initdb, pg_ctl, postgres) and, when root, a `postgres` user to run them.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then
    apt-get update -q && apt-get install -y -q postgresql-15 postgresql-contrib-15
fi
if [[ "$(id -u)" == 0 ]] && ! id postgres >/dev/null 2>&1; then
    useradd --system --create-home --home-dir /var/lib/postgresql --shell /bin/bash postgres
fi

# A Docker engine (no bridge, no iptables: containers use host networking, loopback only).
if ! command -v dockerd >/dev/null; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io
fi
# `script` (a terminal for the log-format test), curl (the README's quick start) and an
# OpenSSH server (every EC2 test instance is a local sshd, NOTES).
command -v script >/dev/null && command -v curl >/dev/null && [[ -x /usr/sbin/sshd ]] || {
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q bsdutils curl openssh-server
}
# A headless Chromium and its WebDriver (the dashboard's browser test, tests/tests/operations.rs).
if [[ ! -x /usr/bin/chromium || ! -x /usr/bin/chromedriver ]]; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver
fi
if ! docker info >/dev/null 2>&1; then
    mkdir -p /var/log
    # A pid file left by an engine from before a reboot: dockerd waits for "its" containerd
    # when another process has that pid now, and gives up ("timeout waiting for containerd").
    pgrep -x dockerd >/dev/null || pgrep -x containerd >/dev/null || rm -f /var/run/docker/containerd/containerd.pid
    nohup dockerd --bridge=none --iptables=false --ip-masq=false >/var/log/molecule-dockerd.log 2>&1 &
    for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || { echo "dockerd did not start; see /var/log/molecule-dockerd.log" >&2; exit 1; }
fi

# Real A2A agents of both SDK generations (tests/a2a_agents/), each in a virtualenv of its
# own: a2a-sdk 0.3.x speaks protocol v0.3, 1.x speaks v1.0 (NOTES: keep them apart).
A2A_VENVS="$HOME/.cache/molecule-a2a"
for spec in "v03:a2a-sdk[http-server]>=0.3,<0.4" "v10:a2a-sdk[http-server]>=1.3,<2"; do
    gen="${spec%%:*}"
    if [[ ! -x "$A2A_VENVS/$gen/bin/python" ]] || ! "$A2A_VENVS/$gen/bin/python" -c 'import a2a, uvicorn' 2>/dev/null; then
        python3 -m venv "$A2A_VENVS/$gen"
        "$A2A_VENVS/$gen/bin/pip" install -q "${spec#*:}" uvicorn
    fi
done

# moto's AWS API server (EC2, EC2 Instance Connect) for the EC2 backend's tests.
MOTO_VENV="$HOME/.cache/molecule-moto"
if [[ ! -x "$MOTO_VENV/bin/moto_server" ]]; then
    python3 -m venv "$MOTO_VENV"
    "$MOTO_VENV/bin/pip" install -q 'moto[server]>=5,<6'
fi

# The deployment files' offline validator (infra/k8s/validate.py, run by tests/tests/deploy.rs):
# kubernetes-validate ships Kubernetes' JSON schemas (and brings jsonschema and PyYAML).
INFRA_VENV="${MOLECULE_INFRA_VENV:-$HOME/.cache/molecule-infra}"
if ! "$INFRA_VENV/bin/python" -c 'import kubernetes_validate, jsonschema, yaml' 2>/dev/null; then
    python3 -m venv "$INFRA_VENV"
    "$INFRA_VENV/bin/pip" install -q 'kubernetes-validate==1.37.0'
fi

# One format for everyone (rustfmt.toml): a change that `cargo fmt` would rewrite fails here,
# before the build, not in review.
cargo fmt --check

# A DATABASE_URL in the environment never reaches the compiler (.cargo/config.toml sets
# SQLX_OFFLINE): the build runs with one that points nowhere, so a cold build proves it.
DATABASE_URL=postgres://the-build-needs-no-database@127.0.0.1:1/none cargo build --locked --workspace --bins --tests
# The reference agent's image (runtime `echo`), built locally.
AGENT_PROFILE=debug infra/build-agent-image.sh

# The API only validates and enqueues: it must never link a workspace backend.
if cargo tree --locked -p molecule-api -e normal --prefix none | grep -E '^(bollard|aws-|russh)' ; then
    echo "molecule-api depends on a backend crate (above); it must not" >&2
    exit 1
fi

# Every test runs its own platform (its own database) on one shared Docker engine. To the
# orphan sweeper (S2) of a `serve` a test starts, the other tests' containers look like
# those of a wiped database, and it would reap them: it is off in the processes tests
# start, and tested on its own (tests/tests/sweeps.rs) against the containers it is shown.
export MOLECULE_SWEEP_ORPHANS=off

bench/queue/run.sh --smoke
bench/queue/run.sh --smoke --designs 1
bench/queue/run.sh --smoke --processes 2
bench/exec/run.sh --smoke
bench/redact/run.sh --smoke
bench/e2e/run.sh --smoke
tests/fuzz_api.sh
cargo test --locked --workspace "$@"

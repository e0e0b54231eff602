#!/usr/bin/env bash
# Runs Aiki's whole test suite: makes sure PostgreSQL is up (starting or installing it, and
# creating the `aiki` role, through `aiki dev postgres`), installs grpcurl and gRPC for Python
# if they are missing (the README's grpcurl examples and the Python example are tested), then
# runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${CARGO_HOME:-${HOME:-/root}/.cargo}/bin:$PATH"

cargo build --workspace --all-targets
# The tests' own PostgreSQL, if one is named; else the local one, started or installed.
if [ -z "${AIKI_TEST_DATABASE_URL:-}" ]; then
    "${CARGO_TARGET_DIR:-target}/debug/aiki" dev postgres >/dev/null
fi

if ! command -v grpcurl >/dev/null 2>&1; then
    echo "installing grpcurl (cargo install --locked grpcurl-rs)…" >&2
    cargo install --locked grpcurl-rs
fi

# The Python example (examples/python) is run by a test: it needs gRPC for Python.
if ! python3 -c "import grpc, grpc_tools" >/dev/null 2>&1; then
    echo "installing grpcio and grpcio-tools (pip)…" >&2
    python3 -m pip install --quiet grpcio grpcio-tools
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole suite (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "workspace: %d passed, %d failed\n", p, f }' "$log"
exit "$status"

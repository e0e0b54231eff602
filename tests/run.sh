#!/usr/bin/env bash
# Runs Aiki's whole test suite: makes sure PostgreSQL is up (starting or installing it, and
# creating the `aiki` role, through `aiki dev postgres`), installs grpcurl if it is missing
# (the README's grpcurl examples are tested), then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --workspace --all-targets
target/debug/aiki dev postgres >/dev/null

if ! command -v grpcurl >/dev/null 2>&1; then
    echo "installing grpcurl (cargo install --locked grpcurl-rs)…" >&2
    cargo install --locked grpcurl-rs
    export PATH="$HOME/.cargo/bin:$PATH"
fi

cargo test --workspace

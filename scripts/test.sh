#!/usr/bin/env bash
# Runs fngate's whole test suite: formatting, lints, then every unit, property and end-to-end
# test. The end-to-end tests start real processes and need python3 and curl on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked

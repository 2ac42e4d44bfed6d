#!/usr/bin/env bash
# Runs fngate's whole test suite: formatting, lints, every unit, property and end-to-end test,
# the criterion benches in test mode, and a quick run of every benchmark scenario so the harness
# cannot rot (it asserts nothing about timings). The end-to-end tests start real processes and
# need python3 and curl on PATH, and the manifest test needs kubernetes-validate (pip). The quick
# benchmark run needs nginx, haproxy and oha. The image build needs podman, runc and debootstrap;
# it is skipped with a message when podman is missing (.ci/run installs it).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
FNGATE_REQUIRE_KUBERNETES_VALIDATE=1 cargo test --workspace --locked
cargo test --locked -p fngate-proxy --benches
cargo build --locked -p fngate -p fngate-loadtest
target/debug/fngate-loadtest all --quick --fngate-bin target/debug/fngate --out target/loadtest-quick
if command -v podman >/dev/null; then
    scripts/test-images.sh target/debug
else
    echo "SKIPPED scripts/test-images.sh: podman is not installed (apt-get install podman runc debootstrap)"
fi

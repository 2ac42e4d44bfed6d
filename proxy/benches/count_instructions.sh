#!/usr/bin/env bash
# Counts the proxy's instructions per request with callgrind, using the request_path bench.
#
# Usage: proxy/benches/count_instructions.sh [RUNS] [extra request_path options]
#
# For each function kind, runs the proxy RUNS times (default 3) with 2000 and with 22000
# requests, and prints the mean and each run of (count at 22000 - count at 2000) / 20000.
# Needs valgrind. Builds the bench in the release profile first.
set -euo pipefail

runs=${1:-3}
shift || true

cd "$(dirname "$0")/../.."
binary=$(cargo bench -p fngate-proxy --bench request_path --no-run --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*request_path[^"]*\)".*/\1/p' | tail -n 1)
if [[ -z "$binary" ]]; then
    echo "count_instructions: failed to build the request_path bench; run cargo bench --no-run to see why" >&2
    exit 1
fi

count() {
    valgrind --tool=callgrind --callgrind-out-file=/dev/null "$binary" --bench "$@" 2>&1 |
        sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}

for kind in web event; do
    per_request=()
    for _ in $(seq "$runs"); do
        small=$(count --kind "$kind" --requests 2000 "$@")
        large=$(count --kind "$kind" --requests 22000 "$@")
        per_request+=($(((large - small) / 20000)))
    done
    total=0
    for value in "${per_request[@]}"; do
        total=$((total + value))
    done
    echo "$kind: $((total / runs)) instructions per request (runs: ${per_request[*]})"
done

#!/usr/bin/env bash
# Import and reconcile against the Webex simulator (examples/population_bench.rs): import rate
# against the simulator's rate limit R, and reconcile time for USERS subscribers against its
# floor (pages × page latency), and live acknowledgements during an import through a node.
# Usage: bench/population.sh [USERS] [RATE] [PAGE_LATENCY_MS] [IMPORT_MAX_RATE]
set -euo pipefail
cd "$(dirname "$0")/.."
users=${1:-10000}
rate=${2:-200}
page_ms=${3:-20}
cargo build --locked --release --bin flowthrough --example population_bench
target=${CARGO_TARGET_DIR:-target}
"$target/release/examples/population_bench" "$target/release/flowthrough" "$users" "$rate" "$page_ms" ${4:+"$4"}

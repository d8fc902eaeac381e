#!/usr/bin/env bash
# Import and reconcile against the Webex simulator (examples/population_bench.rs): import rate
# against the simulator's rate limit R, and reconcile time for USERS subscribers against its
# floor (pages × page latency). Usage: bench/population.sh [USERS] [RATE] [PAGE_LATENCY_MS]
set -euo pipefail
cd "$(dirname "$0")/.."
users=${1:-10000}
rate=${2:-200}
page_ms=${3:-20}
cargo build --locked --release --bin flowthrough --example population_bench
target=${CARGO_TARGET_DIR:-target}
"$target/release/examples/population_bench" "$target/release/flowthrough" "$users" "$rate" "$page_ms"

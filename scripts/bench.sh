#!/usr/bin/env bash
# Runs every benchmark (scheduling cost wasm vs native, end to end through Envoy, routing
# quality) in release mode and rewrites docs/benchmarks.md with the tables, the machine and
# the date. About 5 minutes after the build. Extra arguments go to epp-bench
# (e.g. `scripts/bench.sh --smoke --out /tmp/bench.md` for a quick check of the harness).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prepare.sh
cargo build --release -p epp -p bench
if [ "$#" -eq 0 ]; then
    set -- --out docs/benchmarks.md
fi
exec cargo run --release -p bench -- all "$@"

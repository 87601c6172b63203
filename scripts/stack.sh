#!/usr/bin/env bash
# Starts the whole local stack on loopback: N simulated vLLM workers, the EPP (default
# config: optimized baseline + file discovery) and a real Envoy, then sends a few requests
# to show the routing. Ctrl-C stops everything.
#
#   scripts/stack.sh                 # 3 workers on 8000..8002, Envoy on :8081
#   WORKERS=5 BASE_PORT=8100 scripts/stack.sh
#   EPP_CONFIG=my-config.yaml SIM_ARGS="--max-num-seqs 4" scripts/stack.sh
#   KV_EVENTS=1 EPP_CONFIG=config/precise.yaml scripts/stack.sh   # precise prefix routing
#   REPLICAS=2 scripts/stack.sh      # two EPPs sharing routing state through redis-server
#
# EPP_CONFIG: the EndpointPickerConfig to start with (copied to .stack/epp-config.yaml, whose
# discovery path is pointed at .stack/endpoints.yaml; edit that copy to reload it live).
# SIM_ARGS: extra flags for every simulated worker (see `sim-worker --help`).
# KV_EVENTS=1: every worker publishes its KV-cache events as vLLM does (worker i on ports
# KV_BASE_PORT+2i and +2i+1, default 5557), named in the endpoints file by labels.
# REPLICAS=2: a redis-server on REDIS_PORT (default 6390) and a second EPP (ext_proc :9012,
# health :9013, metrics :9091), both with --state-store, behind config/envoy-replicas.yaml.
# PROFILE=debug builds faster and runs slower (default: release, as in production).
#
# Ports: Envoy 8081 (admin 19000), EPP ext_proc 9002, health 9003. The endpoints file is
# .stack/endpoints.yaml: edit and rename a new version over it to change the pool live.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prepare.sh

WORKERS="${WORKERS:-3}"
BASE_PORT="${BASE_PORT:-8000}"
KV_BASE_PORT="${KV_BASE_PORT:-5557}"
STACK=.stack
mkdir -p "$STACK"

PROFILE="${PROFILE:-release}"
echo "==> building the epp and sim-worker binaries ($PROFILE)"
if [ "$PROFILE" = release ]; then
    cargo build --release -p epp -p sim --bins
    BIN=target/release
else
    cargo build -p epp -p sim --bins
    BIN=target/debug
fi

pids=()
cleanup() {
    echo
    echo "==> stopping the stack"
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

echo "==> starting $WORKERS simulated workers"
{
    echo "endpoints:"
    for ((i = 0; i < WORKERS; i++)); do
        port=$((BASE_PORT + i))
        kv_args=()
        if [ "${KV_EVENTS:-0}" = 1 ]; then
            kv_args=(--kv-events-port $((KV_BASE_PORT + 2 * i)) --kv-events-replay-port $((KV_BASE_PORT + 2 * i + 1)))
        fi
        # shellcheck disable=SC2086 # SIM_ARGS is a list of flags
        "$BIN/sim-worker" --host 127.0.0.1 --port "$port" --name "sim-$i" --served-model-name sim-model \
            "${kv_args[@]}" ${SIM_ARGS:-} > "$STACK/sim-$i.log" 2>&1 &
        pids+=($!)
        printf '  - name: sim-%d\n    address: 127.0.0.1\n    port: "%d"\n    labels:\n      model: sim-model\n' "$i" "$port"
        if [ "${KV_EVENTS:-0}" = 1 ]; then
            printf '      kv-events-endpoint: "tcp://127.0.0.1:%d"\n      kv-events-replay-endpoint: "tcp://127.0.0.1:%d"\n' \
                $((KV_BASE_PORT + 2 * i)) $((KV_BASE_PORT + 2 * i + 1))
        fi
    done
} > "$STACK/endpoints.yaml.tmp"
mv "$STACK/endpoints.yaml.tmp" "$STACK/endpoints.yaml"
# The config's file-discovery path is pointed at the stack's endpoints file.
sed -E 's#^([[:space:]]*path:[[:space:]]*).*endpoints\.yaml.*$#\1endpoints.yaml#' \
    "${EPP_CONFIG:-config/epp-config.yaml}" > "$STACK/epp-config.yaml"

REPLICAS="${REPLICAS:-1}"
epp_args=()
ENVOY_CONFIG=config/envoy.yaml
if [ "$REPLICAS" = 2 ]; then
    REDIS_PORT="${REDIS_PORT:-6390}"
    echo "==> starting redis-server on :$REDIS_PORT (logs: $STACK/redis.log)"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no > "$STACK/redis.log" 2>&1 &
    pids+=($!)
    # Ready when it answers PING (bash's /dev/tcp: redis-cli is not needed).
    for _ in $(seq 1 100); do
        timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$REDIS_PORT && printf 'PING\r\n' >&3 && head -c 5 <&3" 2>/dev/null |
            grep -q PONG && break
        if ! kill -0 "${pids[-1]}" 2>/dev/null; then cat "$STACK/redis.log"; exit 1; fi
        sleep 0.1
    done
    epp_args=(--state-store "redis://127.0.0.1:$REDIS_PORT/0")
    ENVOY_CONFIG=config/envoy-replicas.yaml
elif [ "$REPLICAS" != 1 ]; then
    echo "REPLICAS must be 1 or 2" >&2
    exit 1
fi

start_epp() { # name grpc-port health-port metrics-port
    echo "==> starting the EPP $1 (logs: $STACK/$1.log)"
    "$BIN/epp" --config-file "$STACK/epp-config.yaml" --bind-address 127.0.0.1 --reuse-port \
        --grpc-port "$2" --grpc-health-port "$3" --metrics-port "$4" --v=2 "${epp_args[@]}" > "$STACK/$1.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 1 300); do
        grep -q "health is SERVING" "$STACK/$1.log" 2>/dev/null && break
        if ! kill -0 "${pids[-1]}" 2>/dev/null; then cat "$STACK/$1.log"; exit 1; fi
        sleep 0.2
    done
}
start_epp epp 9002 9003 9090
if [ "$REPLICAS" = 2 ]; then
    start_epp epp-2 9012 9013 9091
fi

echo "==> starting Envoy on :8081 with $ENVOY_CONFIG (logs: $STACK/envoy.log)"
"$ENVOY_BIN" -c "$ENVOY_CONFIG" --use-dynamic-base-id --log-level warn > "$STACK/envoy.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 150); do
    curl -sf http://127.0.0.1:19000/ready > /dev/null 2>&1 && break
    sleep 0.2
done

echo "==> requests through Envoy: two conversations, each with its own long system prompt"
echo "    (x-sim-worker names the worker that answered; a shared prefix stays on one worker)"
# Long enough to fill several of the prefix index's 64-token blocks (about 1.4 KB each).
sys_a=$(printf 'You are a travel agent. You answer questions about trains, flights and hotels in Europe, briefly. %.0s' $(seq 1 14))
sys_b=$(printf 'You are a cooking assistant. You answer questions about recipes, spices and baking times, briefly. %.0s' $(seq 1 14))
for turn in 1 2 3; do
    for conv in a b; do
        if [ "$conv" = a ]; then system=$sys_a; else system=$sys_b; fi
        worker=$(curl -s -o /dev/null -D - http://127.0.0.1:8081/v1/completions \
            -H 'content-type: application/json' \
            -d "{\"model\":\"sim-model\",\"prompt\":\"$system Question $turn?\",\"max_tokens\":8}" |
            tr -d '\r' | awk -F': ' 'tolower($1)=="x-sim-worker"{print $2}')
        echo "    conversation $conv, turn $turn -> ${worker:-(no answer)}"
    done
done

cat <<MSG

The stack is running. Try:
  curl -s http://127.0.0.1:8081/v1/chat/completions -H 'content-type: application/json' \\
    -d '{"model":"sim-model","messages":[{"role":"user","content":"hello"}],"stream":true}'

Change the pool live by rewriting $STACK/endpoints.yaml (write a temp file, then mv it over).
EPP log: $STACK/epp.log   Envoy log: $STACK/envoy.log   Press Ctrl-C to stop.
MSG
wait

#!/usr/bin/env bash
# Sweeps `epp replay` over cluster shapes and workloads and compares policies with the model
# of the peer routers' `cache_aware` policy, so a routing change is judged on the general
# case rather than on the bench's four workloads (docs/replay.md, "Sweeps").
#
#   scripts/replay-sweep.sh                      # the default profile (`baseline`)
#   scripts/replay-sweep.sh --policy guide --policy mine=path/to/config.yaml
#
# Shapes: 4 and 8 workers (WORKERS="2 16" for other pools; POOL="--worker-speed 1,1,1,0.5"
# makes every shape a mixed pool, see docs/replay.md); 512, 1024 and 2048 KV blocks per
# worker; 2.5, 5 and 10 req/s per worker (the last overloads most shapes); workloads
# multi-turn, shared-prefix, bursts, lora-mix, unique and one-prompt (WORKLOADS="tenants
# long-output" for others; MODEL=8b-1gpu for the other worker model); 1500 requests each,
# seed 1 (SEED=… to change). About 4 minutes for one policy on 2 cores (NOBUILD=1 sweeps
# the `epp` built already, without building it first). Prints, per policy and workload, the
# mean prefix-hit difference with `cache_aware` (points), the geometric mean of the TTFT p90
# ratios, and in how many shapes the policy had fewer hits (by more than half a point) or a
# TTFT p90 over 5 % worse.
# The per-shape rows are kept in the CSV named at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$#" -eq 0 ]; then
    set -- --policy baseline
fi
[ -n "${NOBUILD:-}" ] || cargo build --release --quiet -p epp
epp=target/release/epp
seed="${SEED:-1}"
pools="${WORKERS:-4 8}"
workloads="${WORKLOADS:-multi-turn shared-prefix bursts lora-mix unique one-prompt}"
model="${MODEL:-small}"
read -r -a pool_flags <<< "${POOL:-}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
rows="$(mktemp --suffix=.csv /tmp/replay-sweep.XXXXXX)"
echo "workload,workers,blocks,rate,policy,prefix_hit_rate,ttft_p90_ms,completed" > "$rows"
for workload in $workloads; do
    for workers in $pools; do
        for blocks in 512 1024 2048; do
            for per_worker in 2.5 5 10; do
                rate="$(awk -v w="$workers" -v r="$per_worker" 'BEGIN { print w * r }')"
                "$epp" replay --workload "$workload" --requests 1500 --workers "$workers" --rate "$rate" \
                    --num-gpu-blocks "$blocks" --model-profile "$model" ${pool_flags[@]+"${pool_flags[@]}"} --seed "$seed" --no-progress \
                    --policy cache-aware "$@" \
                    --csv "$work/run.csv" > /dev/null
                # CSV columns: policy, …, ttft_p90_ms (5), …, prefix_hit_rate (12); completed (3).
                awk -F, -v pre="$workload,$workers,$blocks,$rate" 'NR > 1 { print pre "," $1 "," $12 "," $5 "," $3 }' \
                    "$work/run.csv" >> "$rows"
            done
        done
    done
    echo "  $workload done" >&2
done
awk -F, '
    NR == 1 { next }
    { key = $1 "," $2 "," $3 "," $4; hit[key, $5] = $6; p90[key, $5] = $7; shapes[key] = 1
      if (!($5 in seen)) { seen[$5] = 1; if ($5 != "cache-aware") order[++n] = $5 }
      if (!($1 in wl_seen)) { wl_seen[$1] = 1; wls[++m] = $1 } }
    END {
        printf "%-16s %-14s %10s %10s %9s %9s\n", "policy", "workload", "hit (pts)", "TTFT p90", "fewer hits", "slower"
        for (i = 1; i <= n; i++) for (j = 1; j <= m; j++) {
            p = order[i]; w = wls[j]; c = 0; dh = 0; lr = 0; worse_hit = 0; worse_p90 = 0
            for (k in shapes) {
                split(k, f, ","); if (f[1] != w) continue
                c++; d = hit[k, p] - hit[k, "cache-aware"]; dh += d
                r = (p90[k, "cache-aware"] > 0 && p90[k, p] > 0) ? p90[k, p] / p90[k, "cache-aware"] : 1
                lr += log(r); if (d < -0.005) worse_hit++; if (r > 1.05) worse_p90++
            }
            if (c) printf "%-16s %-14s %+10.1f %9.2fx %6d/%-3d %5d/%-3d\n", p, w, 100 * dh / c, exp(lr / c), worse_hit, c, worse_p90, c
        }
    }' "$rows"
echo "per-shape rows: $rows"

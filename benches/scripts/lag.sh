#!/usr/bin/env bash
# Replication-lag benchmark: a two-region `geokv dev` (us-east-1 and
# eu-west-1, 40 ms one-way through the fault proxy), a write load at
# us-east-1 from geokv-load, and the apply delay of every replicated entry at
# eu-west-1 (geokv_replication_apply_delay_seconds: receiver clock at apply
# minus the write's HLC stamp at the source), reported as p50/p99 from the
# histogram. Usage: benches/scripts/lag.sh [clients] [seconds]
set -euo pipefail
source "$(dirname "$0")/../../scripts/env.sh"
clients="${1:-4}"
seconds="${2:-20}"
bin="$CARGO_TARGET_DIR/debug"
dir="$(mktemp -d)"
port=$((20000 + RANDOM % 20000 / 100 * 100))
"$bin/geokv" dev --regions us-east-1,eu-west-1 --base-port "$port" --data-dir "$dir" --fresh > "$dir/dev.log" 2>&1 &
dev=$!
trap 'kill -TERM $dev 2>/dev/null; wait $dev 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 1 100); do grep -q "Ctrl-C stops" "$dir/dev.log" && break; sleep 0.1; done
"$bin/geokv-load" --target geokv --endpoint "127.0.0.1:$port" --clients "$clients" --duration-s "$seconds" \
  --warmup-s 2 --put-ratio 1.0 --value-bytes 100 --consistency local
sleep 1
curl -s "127.0.0.1:$((port + 11))/metrics" | python3 -c '
import sys
buckets = []; count = 0
for line in sys.stdin:
    if line.startswith("geokv_replication_apply_delay_seconds_bucket"):
        le = line.split("le=\"")[1].split("\"")[0]
        buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    elif line.startswith("geokv_replication_apply_delay_seconds_count"):
        count = float(line.rsplit(" ", 1)[1])
def q(p):
    target = p * count; prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= target:
            if le == float("inf"): return prev_le
            return prev_le + (le - prev_le) * ((target - prev_c) / max(c - prev_c, 1e-9))
        prev_le, prev_c = le, c
    return float("nan")
print("replicated entries applied at eu-west-1: %d" % count)
print("apply delay p50 %.1f ms, p99 %.1f ms (one-way 40 ms; targets p50 <= 60 ms, p99 <= 190 ms)" % (q(0.5) * 1000, q(0.99) * 1000))
'

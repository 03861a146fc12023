#!/usr/bin/env bash
# Catch-up benchmark: PostgreSQL native logical replication against pgferry (master -> Kafka ->
# replica), draining the same pgbench TPC-B backlog, measured in the same run.
#
#   bench/catchup.sh            scale 10, 20000 transactions, release build
#   bench/catchup.sh --smoke    scale 1, 1000 transactions, debug build (CI: keeps the script
#                               working; its figures are not representative)
#   SCALE=10 TXNS=50000 bench/catchup.sh
#   PERF_OUT=/tmp/catchup.perf bench/catchup.sh   also records a CPU profile of pgferry
#
# Both replicas are first brought level with the master (native: initial table sync; pgferry:
# its snapshot), then stopped (subscription disabled / pgferry stopped) while pgbench builds the
# backlog. Each is then timed from restart until its pgbench_history row count equals the
# master's: every transaction inserts one history row and both apply in commit order.
# Prints both rates (transactions/s), the ratio pgferry / native, pgferry's peak RSS and the CPU
# time pgferry and the broker spent.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

bench_build "${1:-}"
SCALE=${SCALE:-$(smoke_or 1 10)}; TXNS=${TXNS:-$(smoke_or 1000 20000)}
CLIENTS=4

start_pg src
start_pg dst
start_tansu
src=$PGPORT_src; dst=$PGPORT_dst
psql_at "$src" postgres "CREATE DATABASE bench" >/dev/null
psql_at "$dst" postgres "CREATE DATABASE native" >/dev/null
psql_at "$dst" postgres "CREATE DATABASE ferry" >/dev/null

echo "initialising pgbench scale $SCALE ..." >&2
pgbench_at "$src" bench -i -s "$SCALE" -q >/dev/null 2>&1
pgbench_at "$dst" native -i -I dtp >/dev/null 2>&1
pgbench_at "$dst" ferry -i -I dtp >/dev/null 2>&1
psql_at "$src" bench "CREATE PUBLICATION native_pub FOR TABLE pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history" >/dev/null

history_count() { psql_at "$1" "$2" "SELECT count(*) FROM pgbench_history"; }
unsynced_tables() { psql_at "$1" "$2" "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'"; }
accounts_count() { psql_at "$1" "$2" "SELECT count(*) FROM pgbench_accounts"; }
wait_until_equal() { # port db reference-value counter
  local port=$1 db=$2 want=$3 counter=$4 deadline=$((SECONDS + ${BENCH_TIMEOUT:-900}))
  while [[ "$($counter "$port" "$db")" != "$want" ]]; do
    if (( SECONDS > deadline )); then
      echo "timed out waiting for $counter on $db to reach $want" >&2
      tail -20 "$WORK"/pg-dst/log "$WORK"/*.log >&2 || true
      exit 1
    fi
    sleep 0.05
  done
}

# Native: subscribe, let the initial sync finish, then disable.
psql_at "$dst" native "CREATE SUBSCRIPTION native_sub CONNECTION 'host=127.0.0.1 port=$src dbname=bench user=postgres' PUBLICATION native_pub" >/dev/null
wait_until_equal "$dst" native "$(accounts_count "$src" bench)" accounts_count
wait_until_equal "$dst" native 0 unsynced_tables
psql_at "$dst" native "ALTER SUBSCRIPTION native_sub DISABLE" >/dev/null

# pgferry: capture + apply in one process; snapshot and apply the initial data, then stop.
replica_yaml "$src" bench "$dst" ferry bench "  status_interval: 1s" >"$WORK/pgferry.yaml"
"$BIN" run --config "$WORK/pgferry.yaml" 2>"$WORK/ferry-initial.log" &
ferry=$!
wait_until_equal "$dst" ferry "$(accounts_count "$src" bench)" accounts_count
kill -TERM $ferry; wait $ferry || true

echo "building a backlog of $TXNS TPC-B transactions ..." >&2
pgbench_at "$src" bench -n -c "$CLIENTS" -j 2 -t $((TXNS / CLIENTS)) >/dev/null 2>&1
want=$(history_count "$src" bench)
wal=$(psql_at "$src" bench "SELECT pg_current_wal_lsn() - confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'native_sub'")

t0=$(now)
psql_at "$dst" native "ALTER SUBSCRIPTION native_sub ENABLE" >/dev/null
wait_until_equal "$dst" native "$want" history_count
t1=$(now)
native_secs=$(echo "$t1 - $t0" | bc -l)

ferry_caught_up() { [[ "$(history_count "$dst" ferry)" == "$want" ]]; }
broker_before=$(cpu_secs "$TANSU_PID")
time_ferry_until "$WORK/pgferry.yaml" ferry_caught_up
broker_cpu=$(echo "$(cpu_secs "$TANSU_PID") - $broker_before" | bc -l)
ferry_secs=$FERRY_SECS
rss=$FERRY_RSS
cpu=$FERRY_CPU

printf '\ncatch-up benchmark (%s build): pgbench scale %d, %d transactions, %.1f MB of WAL\n' \
  "$PROFILE" "$SCALE" "$TXNS" "$(echo "$wal / 1048576" | bc -l)"
printf '  native logical replication   %8.2f s  %8.0f txn/s\n' "$native_secs" "$(echo "$TXNS / $native_secs" | bc -l)"
printf '  pgferry (via Kafka)          %8.2f s  %8.0f txn/s\n' "$ferry_secs" "$(echo "$TXNS / $ferry_secs" | bc -l)"
printf '  ratio pgferry / native: %.3f   (pgferry peak RSS %s MB, %s CPU s; the broker %.2f CPU s)\n' \
  "$(echo "$native_secs / $ferry_secs" | bc -l)" "$rss" "$cpu" "$broker_cpu"
printf 'result replica_catchup_ratio=%.3f replica_rss_mb=%s replica_cpu_s=%s broker_cpu_s=%.2f\n' \
  "$(echo "$native_secs / $ferry_secs" | bc -l)" "$rss" "$cpu" "$broker_cpu"

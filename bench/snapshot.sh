#!/usr/bin/env bash
# Initial-snapshot benchmark: PostgreSQL's own initial table synchronization
# (CREATE SUBSCRIPTION ... copy_data = true) against pgferry's initial snapshot (master ->
# Kafka -> replica), copying the same table, measured in the same run.
#
#   bench/snapshot.sh           10,000,000 rows, release build
#   bench/snapshot.sh --smoke   100,000 rows, debug build (CI: keeps the script working; its
#                               figures are not representative)
#   ROWS=2000000 bench/snapshot.sh
#
# The table has a bigint key, an int, a timestamptz and a 40-character text (about 100 bytes a
# row on disk). Native is timed from CREATE SUBSCRIPTION until the table is synchronized
# (pg_subscription_rel state 'r'); pgferry from start until the replica holds every row, so
# both include their setup (slot, snapshot) and the writes to the replica. Prints both rates
# (rows/s), the ratio pgferry / native (1.0 = as fast), pgferry's peak RSS and CPU time and the
# broker's CPU time. This is the baseline issue 13's chunked, parallel snapshots are measured
# against: today pgferry reads the table in one exported-snapshot transaction.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

bench_build "${1:-}"
ROWS=${ROWS:-$(smoke_or 100000 10000000)}

start_pg src
start_pg dst
start_tansu
src=$PGPORT_src; dst=$PGPORT_dst
psql_at "$src" postgres "CREATE DATABASE bench" >/dev/null
psql_at "$dst" postgres "CREATE DATABASE native" >/dev/null
psql_at "$dst" postgres "CREATE DATABASE ferry" >/dev/null
ddl="CREATE TABLE items (id bigint PRIMARY KEY, n int NOT NULL, at timestamptz NOT NULL, note text NOT NULL)"
for target in "$src bench" "$dst native" "$dst ferry"; do
  # shellcheck disable=SC2086  # "port db" pairs
  psql_at $target "$ddl" >/dev/null
done

echo "loading $ROWS rows ..." >&2
psql_at "$src" bench "INSERT INTO items SELECT g, ((g::bigint * 7919) % 1000003)::int, timestamptz '2026-01-01' + g * interval '1 second', md5(g::text) || lpad(g::text, 8, '0') FROM generate_series(1, $ROWS) g" >/dev/null
psql_at "$src" bench "VACUUM ANALYZE items" >/dev/null
size=$(psql_at "$src" bench "SELECT pg_total_relation_size('items')")
psql_at "$src" bench "CREATE PUBLICATION native_pub FOR TABLE items" >/dev/null

rows_at() { psql_at "$1" "$2" "SELECT count(*) FROM items"; }
synchronized() { [[ "$(psql_at "$dst" native "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'")" == 0 ]]; }

t0=$(now)
psql_at "$dst" native "CREATE SUBSCRIPTION native_sub CONNECTION 'host=127.0.0.1 port=$src dbname=bench user=postgres' PUBLICATION native_pub WITH (copy_data = true)" >/dev/null
deadline=$((SECONDS + ${BENCH_TIMEOUT:-1800}))
until synchronized && [[ "$(rows_at "$dst" native)" == "$ROWS" ]]; do
  (( SECONDS > deadline )) && { echo "native sync did not finish in time" >&2; exit 1; }
  sleep 0.05
done
native_secs=$(echo "$(now) - $t0" | bc -l)
psql_at "$dst" native "ALTER SUBSCRIPTION native_sub DISABLE" >/dev/null

replica_yaml "$src" bench "$dst" ferry bench "  tables: [public.items]
  status_interval: 1s" >"$WORK/pgferry.yaml"
ferry_copied() { [[ "$(rows_at "$dst" ferry)" == "$ROWS" ]]; }
broker_before=$(cpu_secs "$TANSU_PID")
time_ferry_until "$WORK/pgferry.yaml" ferry_copied
broker_cpu=$(echo "$(cpu_secs "$TANSU_PID") - $broker_before" | bc -l)
[[ "$(psql_at "$dst" ferry "SELECT sum(n)::text || max(note) FROM items")" == \
   "$(psql_at "$src" bench "SELECT sum(n)::text || max(note) FROM items")" ]] \
  || { echo "the pgferry replica differs from the source" >&2; exit 1; }

printf '\nsnapshot benchmark (%s build): %d rows, %.1f MB on disk\n' \
  "$PROFILE" "$ROWS" "$(echo "$size / 1048576" | bc -l)"
printf '  native initial sync (copy_data)  %8.2f s  %10.0f rows/s\n' "$native_secs" "$(echo "$ROWS / $native_secs" | bc -l)"
printf '  pgferry snapshot (via Kafka)     %8.2f s  %10.0f rows/s\n' "$FERRY_SECS" "$(echo "$ROWS / $FERRY_SECS" | bc -l)"
printf '  ratio pgferry / native: %.3f   (pgferry peak RSS %s MB, %s CPU s; the broker %.2f CPU s)\n' \
  "$(echo "$native_secs / $FERRY_SECS" | bc -l)" "$FERRY_RSS" "$FERRY_CPU" "$broker_cpu"
printf 'result snapshot_ratio=%.3f snapshot_rows=%d snapshot_rss_mb=%s snapshot_cpu_s=%s broker_cpu_s=%.2f\n' \
  "$(echo "$native_secs / $FERRY_SECS" | bc -l)" "$ROWS" "$FERRY_RSS" "$FERRY_CPU" "$broker_cpu"

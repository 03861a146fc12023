#!/usr/bin/env bash
# Snapshot benchmark: PostgreSQL's own initial table synchronization (CREATE SUBSCRIPTION ...
# copy_data = true) against pgferry's snapshot (master -> Kafka -> replica) of the same table,
# measured in the same run: the chunked snapshot with 1, 2 and 4 readers, the exported
# (single-transaction) mode for reference, and `pgferry seed` (the replica copied straight
# from the source, not through Kafka) with 1, 2 and 4 readers.
#
#   bench/snapshot.sh           10,000,000 rows, release build
#   bench/snapshot.sh --smoke   100,000 rows, debug build, 2 readers, exported, seed2 (CI: keeps
#                               the script working; its figures are not representative)
#   ROWS=2000000 READERS="1 4" bench/snapshot.sh
#
# The table has a bigint key, an int, a timestamptz and a 40-character text (about 100 bytes a
# row on disk). Native is timed from CREATE SUBSCRIPTION until the table is synchronized
# (pg_subscription_rel state 'r'); pgferry from start until the replica holds every row, so
# both include their setup (slot, snapshot) and the writes to the replica. Each pgferry run
# starts from scratch (new slot, empty replica database, own topics). Prints each rate
# (rows/s), the ratio pgferry / native (1.0 = as fast), pgferry's peak RSS, and the CPU
# seconds of pgferry, the broker and both clusters (their backends' included) during each
# run, to show where the time goes.
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
ddl="CREATE TABLE items (id bigint PRIMARY KEY, n int NOT NULL, at timestamptz NOT NULL, note text NOT NULL)"
for target in "$src bench" "$dst native"; do
  # shellcheck disable=SC2206  # "port db" pairs
  psql_at $target "$ddl" >/dev/null
done

echo "loading $ROWS rows ..." >&2
psql_at "$src" bench "INSERT INTO items SELECT g, ((g::bigint * 7919) % 1000003)::int, timestamptz '2026-01-01' + g * interval '1 second', md5(g::text) || lpad(g::text, 8, '0') FROM generate_series(1, $ROWS) g" >/dev/null
psql_at "$src" bench "VACUUM ANALYZE items" >/dev/null
size=$(psql_at "$src" bench "SELECT pg_total_relation_size('items')")
psql_at "$src" bench "CREATE PUBLICATION native_pub FOR TABLE items" >/dev/null

rows_at() { psql_at "$1" "$2" "SELECT count(*) FROM items"; }
synchronized() { [[ "$(psql_at "$dst" native "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'")" == 0 ]]; }

src_before=$(cluster_cpu src); dst_before=$(cluster_cpu dst)
t0=$(now)
psql_at "$dst" native "CREATE SUBSCRIPTION native_sub CONNECTION 'host=127.0.0.1 port=$src dbname=bench user=postgres' PUBLICATION native_pub WITH (copy_data = true)" >/dev/null
deadline=$((SECONDS + ${BENCH_TIMEOUT:-1800}))
until synchronized && [[ "$(rows_at "$dst" native)" == "$ROWS" ]]; do
  (( SECONDS > deadline )) && { echo "native sync did not finish in time" >&2; exit 1; }
  sleep 0.05
done
native_secs=$(echo "$(now) - $t0" | bc -l)
psql_at "$dst" native "ALTER SUBSCRIPTION native_sub DISABLE" >/dev/null
sleep 0.5  # the subscription's workers exit, so their CPU is counted
native_src_cpu=$(echo "$(cluster_cpu src) - $src_before" | bc -l)
native_dst_cpu=$(echo "$(cluster_cpu dst) - $dst_before" | bc -l)

printf '\nsnapshot benchmark (%s build): %d rows, %.1f MB on disk\n' \
  "$PROFILE" "$ROWS" "$(echo "$size / 1048576" | bc -l)"
printf '  native initial sync (copy_data)  %8.2f s  %10.0f rows/s  (CPU s: source %.2f, replica %.2f)\n' \
  "$native_secs" "$(echo "$ROWS / $native_secs" | bc -l)" "$native_src_cpu" "$native_dst_cpu"
result="result snapshot_rows=$ROWS native_rows_per_s=$(echo "$ROWS / $native_secs" | bc -l | xargs printf '%.0f')"
first_run=1
for readers in ${READERS:-$(smoke_or "2 exported seed2" "exported 1 2 4 seed1 seed2 seed4")}; do
  # A fresh broker for each run: tansu's memory storage keeps every record of every run, and
  # at 10M rows the fourth run's broker had filled the machine's 24 GB.
  if (( ! first_run )); then
    kill -9 "$TANSU_PID" 2>/dev/null || true
    start_tansu
  fi
  first_run=0
  db="ferry_$readers"
  psql_at "$dst" postgres "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1
  psql_at "$dst" postgres "CREATE DATABASE $db" >/dev/null
  psql_at "$dst" "$db" "$ddl" >/dev/null
  psql_at "$src" bench "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'ferry_slot'" >/dev/null
  psql_at "$src" bench "DROP SCHEMA IF EXISTS pgferry CASCADE" >/dev/null 2>&1
  if [[ "$readers" == seed* ]]; then
    # `pgferry seed`: the replica copied straight from the source (N readers), the stream
    # taking over after it. Timed from capture's slot (created here as capture would) to the
    # end of the seed; then capture and apply run until the applier is ready.
    n=${readers#seed}
    replica_yaml "$src" bench "$dst" "$db" "bench_$readers" "  tables: [public.items]
  snapshot: never" >"$WORK/pgferry-$readers.yaml"
    psql_at "$src" bench "CREATE PUBLICATION ferry_pub FOR TABLE items" >/dev/null 2>&1 || true
    src_before=$(cluster_cpu src); dst_before=$(cluster_cpu dst)
    t0=$(now)
    psql_at "$src" bench "SELECT pg_create_logical_replication_slot('ferry_slot', 'pgoutput')" >/dev/null
    TIMEFORMAT='%U %S'
    { time "$BIN" seed --config "$WORK/pgferry-$readers.yaml" --readers "$n" >"$WORK/seed-$n.log" 2>&1; } 2>"$WORK/seed-$n.cpu" \
      || { echo "pgferry seed failed:" >&2; cat "$WORK/seed-$n.log" >&2; exit 1; }
    FERRY_SECS=$(echo "$(now) - $t0" | bc -l)
    FERRY_CPU=$(awk '{printf "%.2f", $1 + $2}' "$WORK/seed-$n.cpu")
    sleep 0.5  # the seed's sessions end, so their CPU is counted
    src_cpu=$(echo "$(cluster_cpu src) - $src_before" | bc -l)
    dst_cpu=$(echo "$(cluster_cpu dst) - $dst_before" | bc -l)
    [[ "$(rows_at "$dst" "$db")" == "$ROWS" ]] || { echo "the seed left $(rows_at "$dst" "$db") rows" >&2; exit 1; }
    # The stream takes over: capture and apply start on the seeded replica.
    ferry_ready() { "$BIN" healthcheck --addr "$(sed -n 's/^  listen: //p' "$WORK/pgferry-$readers.yaml")" --path /readyz 2>/dev/null; }
    seed_secs=$FERRY_SECS; seed_cpu=$FERRY_CPU
    time_ferry_until "$WORK/pgferry-$readers.yaml" ferry_ready
    [[ "$(psql_at "$dst" "$db" "SELECT sum(n)::text || max(note) FROM items")" == \
       "$(psql_at "$src" bench "SELECT sum(n)::text || max(note) FROM items")" ]] \
      || { echo "the seeded replica ($n) differs from the source" >&2; exit 1; }
    ratio=$(echo "$native_secs / $seed_secs" | bc -l)
    printf '  %-32s %8.2f s  %10.0f rows/s  ratio %.3f  (CPU s: pgferry seed %s, source %.2f, replica %.2f)\n' \
      "pgferry seed, $n reader(s)" "$seed_secs" "$(echo "$ROWS / $seed_secs" | bc -l)" "$ratio" "$seed_cpu" "$src_cpu" "$dst_cpu"
    result+=" snapshot_ratio_seed$n=$(printf '%.3f' "$ratio")"
    psql_at "$src" bench "DROP PUBLICATION IF EXISTS ferry_pub" >/dev/null 2>&1
    continue
  fi
  if [[ "$readers" == exported ]]; then mode="snapshot: exported"; else mode="snapshot_readers: $readers"; fi
  replica_yaml "$src" bench "$dst" "$db" "bench_$readers" "  tables: [public.items]
  status_interval: 1s
  $mode" >"$WORK/pgferry-$readers.yaml"
  # count(*) of the replica only once pgferry has applied as many snapshot rows: polled every
  # 50 ms from the start, the count of a growing table took about a fifth of the machine's
  # CPU during pgferry's run (native's wait counts only after pg_subscription_rel says done).
  ferry_copied() {
    (( $(ferry_metric "$WORK/pgferry-$readers.yaml" '^pgferry_apply_changes_total[{].*op="r"') >= ROWS )) \
      && [[ "$(rows_at "$dst" "$db")" == "$ROWS" ]]
  }
  broker_before=$(cpu_secs "$TANSU_PID"); src_before=$(cluster_cpu src); dst_before=$(cluster_cpu dst)
  time_ferry_until "$WORK/pgferry-$readers.yaml" ferry_copied
  broker_cpu=$(echo "$(cpu_secs "$TANSU_PID") - $broker_before" | bc -l)
  sleep 0.5  # pgferry's sessions end, so their CPU is counted
  src_cpu=$(echo "$(cluster_cpu src) - $src_before" | bc -l)
  dst_cpu=$(echo "$(cluster_cpu dst) - $dst_before" | bc -l)
  [[ "$(psql_at "$dst" "$db" "SELECT sum(n)::text || max(note) FROM items")" == \
     "$(psql_at "$src" bench "SELECT sum(n)::text || max(note) FROM items")" ]] \
    || { echo "the pgferry replica ($readers) differs from the source" >&2; exit 1; }
  ratio=$(echo "$native_secs / $FERRY_SECS" | bc -l)
  if [[ "$readers" == exported ]]; then label="pgferry exported snapshot"; else label="pgferry chunked, $readers reader(s)"; fi
  printf '  %-32s %8.2f s  %10.0f rows/s  ratio %.3f  (peak RSS %s MB; CPU s: pgferry %s, broker %.2f, source %.2f, replica %.2f)\n' \
    "$label" "$FERRY_SECS" "$(echo "$ROWS / $FERRY_SECS" | bc -l)" "$ratio" "$FERRY_RSS" "$FERRY_CPU" "$broker_cpu" "$src_cpu" "$dst_cpu"
  result+=" snapshot_ratio_$readers=$(printf '%.3f' "$ratio")"
done
echo "$result"

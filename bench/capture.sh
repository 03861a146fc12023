#!/usr/bin/env bash
# Capture throughput: pgferry (PostgreSQL -> Kafka, waiting for broker acknowledgement) against
# pg_recvlogical draining the same pgoutput backlog to /dev/null, measured in the same run.
#
#   bench/capture.sh            200k rows, release build
#   bench/capture.sh --smoke    20k rows, debug build (CI: keeps the script working; the
#                               figures are not representative)
#   ROWS=500000 bench/capture.sh
#   PERF_OUT=/tmp/ferry.perf bench/capture.sh   also records a CPU profile of pgferry's run
#
# Prints rows/s for both, the ratio pgferry / pg_recvlogical, and pgferry's peak RSS.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

bench_build "${1:-}"
ROWS=${ROWS:-$(smoke_or 20000 200000)}
PER_TXN=${PER_TXN:-100}

start_pg src
start_tansu
port=$PGPORT_src
psql_at "$port" postgres "CREATE DATABASE bench" >/dev/null
psql_at "$port" bench "CREATE TABLE orders (id bigint PRIMARY KEY, customer int, amount numeric(12,2), note text, created timestamptz)"

cat >"$WORK/pgferry.yaml" <<YAML
node_id: bench
source:
  url: postgres://postgres@127.0.0.1:$port/bench
  slot: bench_ferry
  publication: bench_pub
  snapshot: never
  status_interval: 100ms
  heartbeat_interval: 1h
$(ferry_yaml_common bench)
YAML

# Create pgferry's slot (and the publication), then stop it, so both consumers face the
# same backlog from the same starting point.
"$BIN" run --config "$WORK/pgferry.yaml" 2>"$WORK/ferry-setup.log" &
ferry=$!
for _ in $(seq 300); do
  [[ -n $(psql_at "$port" bench "SELECT 1 FROM pg_replication_slots WHERE slot_name='bench_ferry'") ]] && break
  sleep 0.1
done
sleep 1
kill -TERM $ferry; wait $ferry || true
"$PG_BIN/pg_recvlogical" -h 127.0.0.1 -p "$port" -U postgres -d bench -S bench_recv \
  -P pgoutput --create-slot

echo "building a backlog of $ROWS rows in transactions of $PER_TXN ..." >&2
psql_at "$port" bench "
  DO \$\$
  BEGIN
    FOR b IN 0 .. ($ROWS / $PER_TXN) - 1 LOOP
      INSERT INTO orders
        SELECT g, g % 1000, (g % 100000) / 100.0, 'note ' || md5(g::text), now()
          FROM generate_series(b * $PER_TXN + 1, (b + 1) * $PER_TXN) g;
      COMMIT;
    END LOOP;
  END \$\$"
end_lsn=$(psql_at "$port" bench "SELECT pg_current_wal_lsn()")
wal_bytes=$(psql_at "$port" bench "SELECT pg_current_wal_lsn() - confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name='bench_recv'")

t0=$(now)
"$PG_BIN/pg_recvlogical" -h 127.0.0.1 -p "$port" -U postgres -d bench -S bench_recv --start \
  -o proto_version=1 -o publication_names=bench_pub -f /dev/null --endpos="$end_lsn" --no-loop
t1=$(now)
recv_secs=$(echo "$t1 - $t0" | bc -l)

slot_confirmed_backlog() {
  [[ "$(psql_at "$port" bench "SELECT confirmed_flush_lsn >= '$end_lsn' FROM pg_replication_slots WHERE slot_name='bench_ferry'")" == t ]]
}
time_ferry_until "$WORK/pgferry.yaml" slot_confirmed_backlog
ferry_secs=$FERRY_SECS
rss=$FERRY_RSS

printf '\ncapture benchmark (%s build): %d rows, %d transactions, %.1f MB of WAL\n' \
  "$PROFILE" "$ROWS" "$((ROWS / PER_TXN))" "$(echo "$wal_bytes / 1048576" | bc -l)"
printf '  pg_recvlogical -> /dev/null   %8.2f s  %10.0f rows/s\n' "$recv_secs" "$(echo "$ROWS / $recv_secs" | bc -l)"
printf '  pgferry -> Kafka (acked)      %8.2f s  %10.0f rows/s\n' "$ferry_secs" "$(echo "$ROWS / $ferry_secs" | bc -l)"
printf '  ratio pgferry / pg_recvlogical: %.3f   (pgferry peak RSS %s MB)\n' \
  "$(echo "$recv_secs / $ferry_secs" | bc -l)" "$rss"
printf 'result capture_ratio=%.3f capture_rss_mb=%s\n' "$(echo "$recv_secs / $ferry_secs" | bc -l)" "$rss"

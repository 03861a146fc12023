#!/usr/bin/env bash
# Steady-state latency benchmark: at half of pgferry's measured maximum rate, how long a
# committed source transaction takes to be committed on the target, for a replica (master ->
# Kafka -> replica) and a multi-master pair, against PostgreSQL's native logical replication
# driven at the same rates in the same run.
#
#   bench/latency.sh            20 s per timed phase, release build
#   bench/latency.sh --smoke    3 s per phase, debug build (CI: keeps the script working; its
#                               figures are not representative)
#   SECS=60 BACKLOG=20000 SHARES="2 4 10" bench/latency.sh
#
# Each transaction inserts one row stamped with clock_timestamp() on the source (it commits
# right after: one statement, autocommit). On each target a deferred constraint trigger,
# enabled ALWAYS so that it fires in apply sessions too, records clock_timestamp() when the
# applying transaction commits; latency = that minus the row's stamp (one machine, one clock).
#
# The maximum rate is measured first, as the catch-up rate of a backlog of the same
# transactions (the application stopped while the backlog builds); pgbench then offers a share
# of it (--rate; SHARES, default "2 10": half and a tenth) for SECS seconds to each pipeline in
# turn (after a second of warm-up), the others idle. Prints p50, p99 and max per pipeline, the ratios native / pgferry of p50 and p99 (higher
# is better, as in the other benchmarks), and pgferry's peak RSS.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

bench_build "${1:-}"
SECS=${SECS:-$(smoke_or 3 20)}
# Offered rates, as shares of the maximum: 2 (half, the figure asked for) and 10 (a load this
# 2-core machine sustains with the writer, PostgreSQL and the broker on it; at half, native
# replication itself fell seconds behind in some runs).
SHARES=${SHARES:-2 10}
BACKLOG=${BACKLOG:-$(smoke_or 2000 20000)}
CLIENTS=2

start_pg a
start_pg b
start_tansu
a=$PGPORT_a; b=$PGPORT_b
# Source commits flush their WAL (the test clusters default to synchronous_commit = off, where
# the WAL writer flushes every 200 ms, and no walsender sends WAL before it is flushed).
for db in src mm; do
  psql_at "$a" postgres "CREATE DATABASE $db" >/dev/null
  psql_at "$a" postgres "ALTER DATABASE $db SET synchronous_commit = on" >/dev/null
done
for db in native ferry mm; do psql_at "$b" postgres "CREATE DATABASE $db" >/dev/null; done

# lat_<name>: the timed table. On targets, arrivals records when each row's transaction
# commits there.
table_sql() {
  echo "CREATE TABLE $1 (id bigint PRIMARY KEY, t0 timestamptz NOT NULL DEFAULT clock_timestamp(), pad text NOT NULL DEFAULT repeat('x', 100));"
}
arrivals_sql() {
  cat <<SQL
CREATE TABLE arrivals (id bigint PRIMARY KEY, at timestamptz NOT NULL);
CREATE FUNCTION note_arrival() RETURNS trigger LANGUAGE plpgsql AS \$\$
BEGIN
  -- Qualified: apply workers run with an empty search_path.
  INSERT INTO public.arrivals VALUES (NEW.id, clock_timestamp()) ON CONFLICT (id) DO NOTHING;
  RETURN NULL;
END \$\$;
CREATE CONSTRAINT TRIGGER arrival AFTER INSERT ON $1 DEFERRABLE INITIALLY DEFERRED
  FOR EACH ROW EXECUTE FUNCTION note_arrival();
ALTER TABLE $1 ENABLE ALWAYS TRIGGER arrival;
SQL
}
psql_at "$a" src "$(table_sql lat_native) $(table_sql lat_ferry)" >/dev/null
psql_at "$b" native "$(table_sql lat_native) $(arrivals_sql lat_native)" >/dev/null
psql_at "$b" ferry "$(table_sql lat_ferry) $(arrivals_sql lat_ferry)" >/dev/null
psql_at "$a" mm "$(table_sql lat_mm)" >/dev/null
psql_at "$b" mm "$(table_sql lat_mm) $(arrivals_sql lat_mm)" >/dev/null
for t in lat_native lat_ferry; do psql_at "$a" src "CREATE SEQUENCE ${t}_ids" >/dev/null; done
psql_at "$a" mm "CREATE SEQUENCE lat_mm_ids" >/dev/null

# Native: the subscription, enabled only for its timed phases.
psql_at "$a" src "CREATE PUBLICATION native_pub FOR TABLE lat_native" >/dev/null
psql_at "$b" native "CREATE SUBSCRIPTION native_sub CONNECTION 'host=127.0.0.1 port=$a dbname=src user=postgres' PUBLICATION native_pub WITH (enabled = false)" >/dev/null

replica_yaml "$a" src "$b" ferry lat "  snapshot: never
  tables: [public.lat_ferry]" >"$WORK/replica.yaml"
mm_yaml() { # self other port
  cat <<YAML
node_id: $1
source:
  url: postgres://postgres@127.0.0.1:$3/mm
  slot: slot_$1
  publication: pub_$1
  snapshot: never
  tables: [public.lat_mm]
apply:
  mode: multi_master
  nodes: [$2]
  tables: [public.lat_mm]
  targets:
    - url: postgres://postgres@127.0.0.1:$3/mm
$(ferry_yaml_common latmm)
YAML
}
mm_yaml a b "$a" >"$WORK/mm-a.yaml"
mm_yaml b a "$b" >"$WORK/mm-b.yaml"

# start_ferry CONFIG: runs pgferry in the background until the script ends; sets FERRY_PID.
start_ferry() {
  "$BIN" run --config "$1" 2>>"$WORK/$(basename "$1" .yaml).log" &
  FERRY_PID=$!
  CLEANUP+=("kill -9 $FERRY_PID")
  wait_ready "$1"
}
stop_ferry() { kill -TERM "$1"; wait "$1" || true; }

# write_rows PORT DB TABLE then pgbench options: one-row insert transactions.
write_rows() {
  local port=$1 db=$2 table=$3
  shift 3
  echo "INSERT INTO $table (id) VALUES (nextval('${table}_ids'));" >"$WORK/insert-$table.sql"
  pgbench_at "$port" "$db" -n -c "$CLIENTS" -j "$CLIENTS" -f "$WORK/insert-$table.sql" "$@" >/dev/null 2>&1
}
count_on() { psql_at "$1" "$2" "SELECT count(*) FROM $3"; }
# wait_count PORT DB TABLE WANT: until the table holds WANT rows.
wait_count() {
  local deadline=$((SECONDS + ${BENCH_TIMEOUT:-900}))
  until [[ "$(count_on "$1" "$2" "$3")" == "$4" ]]; do
    (( SECONDS < deadline )) || { echo "$2.$3 did not reach $4 rows" >&2; tail -n 20 "$WORK"/*.log "$WORK"/pg-b/log >&2; exit 1; }
    sleep 0.05
  done
}

# max_rate CONFIG PORT_SRC DB_SRC PORT_DST DB_DST TABLE: pgferry's catch-up rate (txn/s) of a
# backlog of BACKLOG transactions written while it is stopped; sets MAX_RATE and RSS.
max_rate() {
  local config=$1 src=$2 sdb=$3 dst=$4 ddb=$5 table=$6 want
  write_rows "$src" "$sdb" "$table" -t $((BACKLOG / CLIENTS))
  want=$(count_on "$src" "$sdb" "$table")
  caught_up() { [[ "$(count_on "$dst" "$ddb" "$table")" == "$want" ]]; }
  time_ferry_until "$config" caught_up
  MAX_RATE=$(echo "$BACKLOG / $FERRY_SECS" | bc -l)
  RSS=$FERRY_RSS
}

# timed PORT_SRC DB_SRC PORT_DST DB_DST TABLE RATE: offers RATE txn/s for SECS seconds, waits
# for every row on the target, and sets P50, P99, PMAX (ms) over the phase's rows.
timed() {
  local src=$1 sdb=$2 dst=$3 ddb=$4 table=$5 rate=$6 first want
  # Warm-up, not measured: a second at the rate, until it has all arrived (connections,
  # prepared statements and the broker's first requests are not the steady state).
  write_rows "$src" "$sdb" "$table" -R "$rate" -T 1
  wait_count "$dst" "$ddb" "$table" "$(count_on "$src" "$sdb" "$table")"
  first=$(psql_at "$src" "$sdb" "SELECT coalesce(max(id), 0) FROM $table")
  write_rows "$src" "$sdb" "$table" -R "$rate" -T "$SECS"
  want=$(count_on "$src" "$sdb" "$table")
  wait_count "$dst" "$ddb" "$table" "$want"
  read -r P50 P99 PMAX < <(psql_at "$dst" "$ddb" "
    SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 1),
           round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric, 1),
           round(max(ms)::numeric, 1)
      FROM (SELECT extract(epoch FROM a.at - l.t0) * 1000 AS ms
              FROM $table l JOIN arrivals a USING (id) WHERE l.id > $first) d" | tr '|' ' ')
  local arrived
  arrived=$(psql_at "$dst" "$ddb" "SELECT count(*) FROM $table l JOIN arrivals a USING (id) WHERE l.id > $first")
  [[ "$arrived" == "$(psql_at "$src" "$sdb" "SELECT count(*) FROM $table WHERE id > $first")" ]] || {
    echo "$ddb.$table: $arrived rows have an arrival time, fewer than the phase wrote" >&2; exit 1; }
}

# native_phase RATE: the native subscription at RATE; sets N50, N99, NMAX.
native_phase() {
  psql_at "$b" native "ALTER SUBSCRIPTION native_sub ENABLE" >/dev/null
  wait_count "$b" native lat_native "$(count_on "$a" src lat_native)"
  timed "$a" src "$b" native lat_native "$1"
  psql_at "$b" native "ALTER SUBSCRIPTION native_sub DISABLE" >/dev/null
  N50=$P50; N99=$P99; NMAX=$PMAX
}

report() { # TITLE RATE SHARE MAX
  printf '\n%s: %d txn/s offered for %d s (1/%d of pgferry'"'"'s measured maximum, %.0f txn/s)\n' \
    "$1" "$2" "$SECS" "$3" "$4"
  printf '  native logical replication   p50 %7.1f ms   p99 %7.1f ms   max %7.1f ms\n' "$N50" "$N99" "$NMAX"
  printf '  pgferry                      p50 %7.1f ms   p99 %7.1f ms   max %7.1f ms   (peak RSS %s MB)\n' \
    "$P50" "$P99" "$PMAX" "$RSS"
  printf '  ratio native / pgferry: p50 %s   p99 %s\n' "$(ratio "$N50" "$P50")" "$(ratio "$N99" "$P99")"
}
ratio() { printf '%.3f' "$(echo "$1 / $2" | bc -l)"; }

# phases NAME CONFIG PORT_SRC DB_SRC PORT_DST DB_DST TABLE MAX: for each share in SHARES, native
# then pgferry at MAX/share; appends to RESULT (keys NAME_<share>_...).
phases() {
  local name=$1 config=$2 src=$3 sdb=$4 dst=$5 ddb=$6 table=$7 max=$8 share rate
  for share in $SHARES; do
    rate=$(printf '%.0f' "$(echo "$max / $share" | bc -l)")
    echo "$name: $rate txn/s (1/$share of the maximum) for $SECS s, native then pgferry ..." >&2
    native_phase "$rate"
    start_ferry "$config"
    timed "$src" "$sdb" "$dst" "$ddb" "$table" "$rate"
    RSS=$(peak_rss_mb "$FERRY_PID"); stop_ferry "$FERRY_PID"
    report "$name steady state" "$rate" "$share" "$max"
    RESULT+=" ${name}_${share}_p50_ms=$P50 ${name}_${share}_p99_ms=$P99"
    RESULT+=" ${name}_${share}_native_p50_ms=$N50 ${name}_${share}_native_p99_ms=$N99"
    RESULT+=" ${name}_${share}_latency_p50_ratio=$(ratio "$N50" "$P50")"
    RESULT+=" ${name}_${share}_latency_p99_ratio=$(ratio "$N99" "$P99") ${name}_${share}_rss_mb=$RSS"
  done
}
RESULT=""

# Replica. pgferry once to create its slot, publication and topics.
start_ferry "$WORK/replica.yaml"; stop_ferry "$FERRY_PID"
echo "replica: measuring the maximum rate ($BACKLOG transactions) ..." >&2
max_rate "$WORK/replica.yaml" "$a" src "$b" ferry lat_ferry
replica_max=$MAX_RATE
phases replica "$WORK/replica.yaml" "$a" src "$b" ferry lat_ferry "$replica_max"

# Multi-master: node a writes, node b applies (and captures its own table, idle here).
start_ferry "$WORK/mm-b.yaml"; stop_ferry "$FERRY_PID"
start_ferry "$WORK/mm-a.yaml"; ferry_a=$FERRY_PID
echo "multi-master: measuring the maximum rate ($BACKLOG transactions) ..." >&2
max_rate "$WORK/mm-b.yaml" "$a" mm "$b" mm lat_mm
mm_max=$MAX_RATE
phases mm "$WORK/mm-b.yaml" "$a" mm "$b" mm lat_mm "$mm_max"
stop_ferry "$ferry_a"

printf 'result replica_max_txn_s=%.0f mm_max_txn_s=%.0f%s\n' "$replica_max" "$mm_max" "$RESULT"

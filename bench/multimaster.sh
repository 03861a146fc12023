#!/usr/bin/env bash
# Multi-master catch-up against PostgreSQL's native logical replication, measured in the same
# run on the same backlog, and the local write overhead of a multi-master node.
#
#   bench/multimaster.sh            100k-row table, 30000 + 10000 transactions, release build
#   bench/multimaster.sh --smoke    1000 + 500 transactions, debug build (CI: keeps the script
#                                   working and checks its oracles; figures not representative)
#   TXNS=50000 HOT_TXNS=20000 bench/multimaster.sh
#   MM_PERF_OUT=/tmp/mm.perf bench/multimaster.sh   also records a CPU profile of node b
#   CATCHUP_ONLY=1 bench/multimaster.sh   stops after the catch-up (1.), to compare builds
#
# Node a and node b start with identical pgbench_accounts (100k rows per SCALE). A native
# subscription on a third server (database `native`; its own cluster, so that neither side's
# WAL is in the other's way: node b's capture would otherwise read past the native copy's
# writes) takes node a's rows by its initial sync
# and is disabled; node b's pgferry is stopped. Node a then writes a backlog, and each side is
# timed from start (ALTER SUBSCRIPTION ... ENABLE; starting node b's pgferry) until it holds
# node a's last transaction (a marker row written last; both apply in commit order):
#  1. catch-up: TXNS single-row updates of random rows;
#  2. conflict-heavy catch-up: while apart, node b updates HOT_KEYS rows LOCAL_TXNS times and
#     node a updates the same rows HOT_TXNS times. Afterwards both nodes must converge, and
#     the conflicts pgferry counted (pgferry_conflicts_total) must equal the rows it logged in
#     pgferry.conflicts; the script fails otherwise.
#  3. scale-out: the catch-up of TXNS more updates with node b at 1, 2 and 4 apply lanes
#     (SCALE_OUT_LANES), each with its own backlog;
#  4. local write overhead: pgbench TPS of single-row updates on node a (version trigger,
#     REPLICA IDENTITY FULL, pgferry capturing) against a database on the third server,
#     where nothing captures; medians.
# Prints both rates, the ratio pgferry / native, and node b's peak RSS, for 1 and 2; the
# rate and RSS per lane count for 3; and a closing `result` line of key=value figures
# (bench/plot.py draws the README's chart from such lines).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

bench_build "${1:-}"
SCALE=${SCALE:-1}
TXNS=${TXNS:-$(smoke_or 1000 30000)}
HOT_KEYS=${HOT_KEYS:-100}
HOT_TXNS=${HOT_TXNS:-$(smoke_or 500 10000)}
LOCAL_TXNS=${LOCAL_TXNS:-$(smoke_or 100 1000)}
LANES=${LANES:-2}   # node b's apply.lanes in the timed runs
CLIENTS=4

start_pg a
start_pg b
start_pg n
start_tansu
a=$PGPORT_a; b=$PGPORT_b; n=$PGPORT_n
psql_at "$a" postgres "CREATE DATABASE bank" >/dev/null
psql_at "$b" postgres "CREATE DATABASE bank" >/dev/null
psql_at "$n" postgres "CREATE DATABASE native" >/dev/null
echo "initialising $((SCALE * 100000)) accounts on both nodes ..." >&2
pgbench_at "$a" bank -i -s "$SCALE" -q >/dev/null 2>&1
pgbench_at "$b" bank -i -s "$SCALE" -q >/dev/null 2>&1
pgbench_at "$n" native -i -I dtp -s "$SCALE" >/dev/null 2>&1
MARKER="CREATE TABLE bench_marker (id int PRIMARY KEY, n int NOT NULL)"
psql_at "$a" bank "$MARKER; INSERT INTO bench_marker VALUES (1, 0)" >/dev/null
psql_at "$b" bank "$MARKER; INSERT INTO bench_marker VALUES (1, 0)" >/dev/null
psql_at "$n" native "$MARKER" >/dev/null

node_config() { # self other port [lanes]
  cat <<YAML
node_id: $1
source:
  url: postgres://postgres@127.0.0.1:$3/bank
  slot: slot_$1
  publication: pub_$1
  snapshot: never
  tables: [public.pgbench_accounts, public.bench_marker]
  status_interval: 1s
apply:
  mode: multi_master
  nodes: [$2]
  tables: [public.pgbench_accounts, public.bench_marker]
  lanes: ${4:-1}
  targets:
    - url: postgres://postgres@127.0.0.1:$3/bank
$(ferry_yaml_common mm)
YAML
}
node_config a b "$a" >"$WORK/a.yaml"
node_config b a "$b" "$LANES" >"$WORK/b.yaml"

# Node b's pgferry once, to prepare its tables (version trigger, replica identity) and slot.
"$BIN" run --config "$WORK/b.yaml" 2>"$WORK/b-initial.log" &
pid=$!
wait_ready "$WORK/b.yaml"
kill -TERM $pid; wait $pid || true

# Node a's pgferry captures (and applies node b's stream) for the whole run.
"$BIN" run --config "$WORK/a.yaml" 2>"$WORK/a.log" &
ferry_a=$!
CLEANUP+=("kill -9 $ferry_a")
wait_ready "$WORK/a.yaml"

# The native subscription: initial sync, then disabled while the backlog builds. The launcher
# restarts a subscription's worker at most every wal_retrieve_retry_interval (5 s by default):
# shorter, so that enabling it starts applying at once, as pgferry does.
psql_at "$n" postgres "ALTER SYSTEM SET wal_retrieve_retry_interval = '50ms'" >/dev/null
psql_at "$n" postgres "SELECT pg_reload_conf()" >/dev/null
psql_at "$a" bank "CREATE PUBLICATION native_pub FOR TABLE pgbench_accounts, bench_marker" >/dev/null
psql_at "$n" native "CREATE SUBSCRIPTION native_sub CONNECTION 'host=127.0.0.1 port=$a dbname=bank user=postgres' PUBLICATION native_pub" >/dev/null
native_synced() { [[ "$(psql_at "$n" native "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'")" == 0 ]]; }
deadline=$((SECONDS + 300))
until native_synced; do (( SECONDS < deadline )) || { echo "native initial sync timed out" >&2; exit 1; }; sleep 0.2; done
psql_at "$n" native "ALTER SUBSCRIPTION native_sub DISABLE" >/dev/null

marker_on() { psql_at "$1" "$2" "SELECT n FROM bench_marker"; }
# write_marker: node a's last transaction of a backlog; sets WANT.
write_marker() { WANT=$(psql_at "$a" bank "UPDATE bench_marker SET n = n + 1 RETURNING n"); }
native_done() { [[ "$(marker_on "$n" native)" == "$WANT" ]]; }
ferry_done() { [[ "$(marker_on "$b" bank)" == "$WANT" ]]; }

# time_native: enables the subscription until it holds the marker; sets NATIVE_SECS.
time_native() {
  local t0 deadline=$((SECONDS + ${BENCH_TIMEOUT:-900}))
  t0=$(now)
  psql_at "$n" native "ALTER SUBSCRIPTION native_sub ENABLE" >/dev/null
  until native_done; do
    (( SECONDS < deadline )) || { echo "native replication did not catch up in time" >&2; exit 1; }
    sleep 0.02
  done
  NATIVE_SECS=$(echo "$(now) - $t0" | bc -l)
  psql_at "$n" native "ALTER SUBSCRIPTION native_sub DISABLE" >/dev/null
}

# report TITLE TXNS: both rates and the ratio.
report() {
  printf '\n%s (%s build)\n' "$1" "$PROFILE"
  printf '  native logical replication   %8.2f s  %8.0f txn/s\n' "$NATIVE_SECS" "$(echo "$2 / $NATIVE_SECS" | bc -l)"
  printf '  pgferry multi-master         %8.2f s  %8.0f txn/s  (peak RSS %s MB)\n' \
    "$FERRY_SECS" "$(echo "$2 / $FERRY_SECS" | bc -l)" "$FERRY_RSS"
  printf '  ratio pgferry / native: %.3f\n' "$(echo "$NATIVE_SECS / $FERRY_SECS" | bc -l)"
}

cat >"$WORK/update.sql" <<'SQL'
\set aid random(1, 100000 * :scale)
\set delta random(1, 1000)
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SQL
cat >"$WORK/hot.sql" <<SQL
\set aid random(1, $HOT_KEYS)
\set delta random(1, 1000)
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SQL

# 1. Catch-up.
echo "building a backlog of $TXNS single-row updates on node a ..." >&2
pgbench_at "$a" bank -n -c "$CLIENTS" -j 2 -t $((TXNS / CLIENTS)) -f "$WORK/update.sql" >/dev/null 2>&1
write_marker
time_native
PERF_OUT=${MM_PERF_OUT:-} time_ferry_until "$WORK/b.yaml" ferry_done
report "multi-master catch-up: $TXNS single-row update transactions over $((SCALE * 100000)) rows" "$TXNS"
catchup_ratio=$(echo "$NATIVE_SECS / $FERRY_SECS" | bc -l)
sums() { psql_at "$1" "$2" "SELECT sum(abalance) FROM pgbench_accounts"; }
if [[ "$(sums "$b" bank)" != "$(sums "$a" bank)" || "$(sums "$n" native)" != "$(sums "$a" bank)" ]]; then
  echo "after catch-up, node b or the native copy differs from node a" >&2
  exit 1
fi

if [[ "${CATCHUP_ONLY:-0}" == 1 ]]; then
  printf '\nresult mm_catchup_ratio=%.3f\n' "$catchup_ratio"
  exit 0
fi

# 2. Conflict-heavy catch-up: both nodes write the same rows while apart.
echo "building conflicting backlogs: $LOCAL_TXNS updates on node b, $HOT_TXNS on node a, over $HOT_KEYS rows ..." >&2
for at in "$b bank" "$n native"; do
  # shellcheck disable=SC2086  # "port db"
  pgbench_at $at -n -c 2 -j 2 -t $((LOCAL_TXNS / 2)) -f "$WORK/hot.sql" >/dev/null 2>&1
done
pgbench_at "$a" bank -n -c "$CLIENTS" -j 2 -t $((HOT_TXNS / CLIENTS)) -f "$WORK/hot.sql" >/dev/null 2>&1
write_marker
logged_before=$(psql_at "$b" bank "SELECT count(*) FROM pgferry.conflicts")
time_native
METRICS_OUT="$WORK/b-metrics.txt" time_ferry_until "$WORK/b.yaml" ferry_done
report "conflict-heavy catch-up: $HOT_TXNS updates from node a meet $LOCAL_TXNS of node b's over $HOT_KEYS rows" "$HOT_TXNS"
hot_ratio=$(echo "$NATIVE_SECS / $FERRY_SECS" | bc -l)
logged=$(( $(psql_at "$b" bank "SELECT count(*) FROM pgferry.conflicts") - logged_before ))
counted=$(awk '/^pgferry_conflicts_total[{ ]/ {n += $NF} END {printf "%d", n}' "$WORK/b-metrics.txt")
printf '  conflicts: %d logged in pgferry.conflicts, %d counted in pgferry_conflicts_total\n' "$logged" "$counted"
if [[ "$logged" != "$counted" ]]; then
  echo "the conflict log and the conflict counter disagree" >&2
  exit 1
fi
# Node b's local writes travel too: both nodes must converge.
"$BIN" run --config "$WORK/b.yaml" 2>"$WORK/b-converge.log" &
ferry_b=$!
CLEANUP+=("kill -9 $ferry_b")
deadline=$((SECONDS + 300))
until [[ "$(sums "$a" bank)" == "$(sums "$b" bank)" ]]; do
  (( SECONDS < deadline )) || { echo "nodes a and b did not converge" >&2; exit 1; }
  sleep 0.2
done
echo "  nodes a and b converged (sum of balances $(sums "$a" bank))"

kill -TERM $ferry_b; wait $ferry_b || true

# 3. Scale-out: the same catch-up with 1, 2 and 4 lanes on node b.
printf '\nscale-out (%s build): catch-up of %d single-row updates by apply lanes\n' "$PROFILE" "$TXNS"
scale_out=()
for lanes in ${SCALE_OUT_LANES:-$(smoke_or "1 2" "1 2 4")}; do
  node_config b a "$b" "$lanes" >"$WORK/b-lanes.yaml"
  pgbench_at "$a" bank -n -c "$CLIENTS" -j 2 -t $((TXNS / CLIENTS)) -f "$WORK/update.sql" >/dev/null 2>&1
  write_marker
  time_ferry_until "$WORK/b-lanes.yaml" ferry_done
  printf '  %d lane(s)   %8.2f s  %8.0f txn/s  (peak RSS %s MB)\n' \
    "$lanes" "$FERRY_SECS" "$(echo "$TXNS / $FERRY_SECS" | bc -l)" "$FERRY_RSS"
  scale_out+=("mm_lanes_${lanes}_txn_s=$(echo "$TXNS / $FERRY_SECS" | bc -l | xargs printf '%.0f')")
done

# 4. Local write overhead, with node a's pgferry capturing.
ROUNDS=${ROUNDS:-$(smoke_or 1 5)}; SECS=${SECS:-$(smoke_or 2 10)}
# The plain database is on the third server (idle now), where no walsender reads its WAL.
psql_at "$n" postgres "CREATE DATABASE plain" >/dev/null
pgbench_at "$n" plain -i -s "$SCALE" -q >/dev/null 2>&1
tps() { pgbench_at "$1" "$2" -n -c "$CLIENTS" -j 2 -T "$SECS" -f "$WORK/update.sql" 2>/dev/null \
          | awk '/^tps = / {print $3; exit}'; }
plain_runs=(); mm_runs=()
for ((r = 1; r <= ROUNDS; r++)); do
  plain_runs+=("$(tps "$n" plain)")
  mm_runs+=("$(tps "$a" bank)")
done
plain_tps=$(printf '%s\n' "${plain_runs[@]}" | median)
mm_tps=$(printf '%s\n' "${mm_runs[@]}" | median)
printf '\nlocal write overhead (%s build): pgbench single-row updates, %d clients, %d x %d s\n' \
  "$PROFILE" "$CLIENTS" "$ROUNDS" "$SECS"
printf '  without pgferry   median %8.0f tps  (runs: %s)\n' "$plain_tps" "${plain_runs[*]}"
printf '  multi-master node median %8.0f tps  (runs: %s)\n' "$mm_tps" "${mm_runs[*]}"
write_ratio=$(echo "$mm_tps / $plain_tps" | bc -l)
printf '  ratio multi-master / without: %.3f\n' "$write_ratio"
printf '\nresult mm_catchup_ratio=%.3f mm_conflict_heavy_ratio=%.3f mm_local_write_ratio=%.3f %s\n' \
  "$catchup_ratio" "$hot_ratio" "$write_ratio" "${scale_out[*]}"

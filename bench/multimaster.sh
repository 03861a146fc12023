#!/usr/bin/env bash
# Multi-master benchmark, two figures, each against a reference measured in the same run:
#  1. catch-up: how fast a node applies another node's backlog through the last-writer-wins
#     path, against pgferry's own replica-mode apply of the same node stream;
#  2. local write overhead: pgbench TPS of single-row updates on a multi-master node (version
#     trigger, REPLICA IDENTITY FULL, pgferry capturing) against a database on the same server
#     without pgferry; medians of several alternating rounds.
#
#   bench/multimaster.sh            scale 10, 20000 single-row update transactions, release
#   bench/multimaster.sh --smoke    scale 1, 1000 transactions, debug build (keeps it working)
#
# Node A and node B start with identical pgbench_accounts (pgbench -i on both). Node A's
# pgferry captures a backlog of random single-row updates; then (1) a replica-mode applier
# into a third database and (2) node B's multi-master pgferry each drain it, timed from start
# until their sum(abalance) equals node A's. Every update is a remote change with a newer
# version, so (2) applies all of them, paying the probe and the versioned write of each change.
# Prints both rates and the ratio multi-master / replica, then the write-overhead ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

bench_build "${1:-}"
SCALE=${SCALE:-$(smoke_or 1 10)}; TXNS=${TXNS:-$(smoke_or 1000 20000)}
CLIENTS=4

start_pg a
start_pg b
start_tansu
a=$PGPORT_a; b=$PGPORT_b
pgbench_at() { "$PG_BIN/pgbench" -h 127.0.0.1 -p "$1" -U postgres "${@:3}" "$2"; }
for port in $a $b; do psql_at "$port" postgres "CREATE DATABASE bank" >/dev/null; done
psql_at "$b" postgres "CREATE DATABASE ref" >/dev/null
echo "initialising pgbench scale $SCALE on both nodes ..." >&2
for target in "$a bank" "$b bank" "$b ref"; do
  # shellcheck disable=SC2086
  pgbench_at $target -i -s "$SCALE" -q >/dev/null 2>&1
done

node_config() { # self other port mode target-db
  cat <<YAML
node_id: $1
source:
  url: postgres://postgres@127.0.0.1:$3/bank
  slot: slot_$1
  publication: pub_$1
  snapshot: never
  tables: [public.pgbench_accounts]
  status_interval: 1s
kafka:
  brokers: 127.0.0.1:$BROKER_PORT
  topic_prefix: mm
apply:
  mode: $4
  nodes: [$2]
  tables: [public.pgbench_accounts]
  targets:
    - url: postgres://postgres@127.0.0.1:$3/$5
metrics:
  listen: 127.0.0.1:$(free_port)
log:
  format: text
  level: warn
YAML
}
node_config a b "$a" multi_master bank >"$WORK/a.yaml"
node_config b a "$b" multi_master bank >"$WORK/b.yaml"
cat >"$WORK/ref.yaml" <<YAML
node_id: ref
kafka:
  brokers: 127.0.0.1:$BROKER_PORT
  topic_prefix: mm
apply:
  mode: replica
  nodes: [a]
  targets:
    - url: postgres://postgres@127.0.0.1:$b/ref
metrics:
  listen: 127.0.0.1:$(free_port)
log:
  format: text
  level: warn
YAML

# Node B's pgferry once, to prepare its tables (trigger, replica identity) and create its slot.
"$BIN" run --config "$WORK/b.yaml" 2>"$WORK/b-initial.log" &
pid=$!
wait_ready "$WORK/b.yaml"
kill -TERM $pid; wait $pid || true

# Node A captures the backlog.
"$BIN" run --config "$WORK/a.yaml" 2>"$WORK/a.log" &
ferry_a=$!
CLEANUP+=("kill -9 $ferry_a")
wait_ready "$WORK/a.yaml"
cat >"$WORK/update.sql" <<'SQL'
\set aid random(1, 100000 * :scale)
\set delta random(1, 1000)
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SQL
echo "building a backlog of $TXNS single-row updates on node a ..." >&2
pgbench_at "$a" bank -n -c "$CLIENTS" -j 2 -t $((TXNS / CLIENTS)) -f "$WORK/update.sql" >/dev/null 2>&1
want=$(psql_at "$a" bank "SELECT sum(abalance) FROM pgbench_accounts")
sum_on() { psql_at "$b" "$1" "SELECT sum(abalance) FROM pgbench_accounts"; }
ref_done() { [[ "$(sum_on ref)" == "$want" ]]; }
mm_done() { [[ "$(sum_on bank)" == "$want" ]]; }

time_ferry_until "$WORK/ref.yaml" ref_done
ref_secs=$FERRY_SECS
time_ferry_until "$WORK/b.yaml" mm_done
mm_secs=$FERRY_SECS
rss=$FERRY_RSS
conflicts=$(psql_at "$b" bank "SELECT count(*) FROM pgferry.conflicts")

printf '\nmulti-master apply benchmark (%s build): pgbench scale %d, %d single-row updates\n' "$PROFILE" "$SCALE" "$TXNS"
printf '  replica-mode apply (reference)  %8.2f s  %8.0f txn/s\n' "$ref_secs" "$(echo "$TXNS / $ref_secs" | bc -l)"
printf '  multi-master apply (LWW)        %8.2f s  %8.0f txn/s\n' "$mm_secs" "$(echo "$TXNS / $mm_secs" | bc -l)"
printf '  ratio multi-master / replica: %.3f   (peak RSS %s MB, %s conflicts logged)\n' \
  "$(echo "$ref_secs / $mm_secs" | bc -l)" "$rss" "$conflicts"

# 2. Local write overhead, with node a's pgferry still capturing.
ROUNDS=${ROUNDS:-$(smoke_or 1 5)}; SECS=${SECS:-$(smoke_or 2 10)}
psql_at "$a" postgres "CREATE DATABASE plain" >/dev/null
pgbench_at "$a" plain -i -s "$SCALE" -q >/dev/null 2>&1
tps() { pgbench_at "$a" "$1" -n -c "$CLIENTS" -j 2 -T "$SECS" -f "$WORK/update.sql" 2>/dev/null \
          | awk '/^tps = / {print $3; exit}'; }
median() { sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
plain_runs=(); mm_runs=()
for ((r = 1; r <= ROUNDS; r++)); do
  plain_runs+=("$(tps plain)")
  mm_runs+=("$(tps bank)")
done
plain_tps=$(printf '%s\n' "${plain_runs[@]}" | median)
mm_tps=$(printf '%s\n' "${mm_runs[@]}" | median)
printf '\nlocal write overhead (%s build): pgbench single-row updates, %d clients, %d x %d s\n' \
  "$PROFILE" "$CLIENTS" "$ROUNDS" "$SECS"
printf '  without pgferry   median %8.0f tps  (runs: %s)\n' "$plain_tps" "${plain_runs[*]}"
printf '  multi-master node median %8.0f tps  (runs: %s)\n' "$mm_tps" "${mm_runs[*]}"
printf '  ratio multi-master / without: %.3f\n' "$(echo "$mm_tps / $plain_tps" | bc -l)"

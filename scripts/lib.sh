# Shared helpers for the demo and benchmark scripts: a throwaway PostgreSQL 15 cluster and a tansu
# broker on loopback ports, stopped when the script exits. Source it; do not run it.

PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
TANSU="${TANSU_BIN:-${PGFERRY_TOOLS:-$HOME/.cache/pgferry/tools}/bin/tansu}"
WORK=$(mktemp -d /tmp/pgferry-run.XXXXXX)
chmod 777 "$WORK"
CLEANUP=()
cleanup() {
  for cmd in "${CLEANUP[@]}"; do eval "$cmd" >/dev/null 2>&1 || true; done
  # KEEP_WORK=1 keeps the clusters' data, configs and logs for a look after a failure.
  if [[ "${KEEP_WORK:-0}" == 1 ]]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

as_pg() {
  if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# start_pg NAME -> sets PGPORT_<NAME>
start_pg() {
  local name=$1 port dir
  port=$(free_port)
  dir="$WORK/pg-$name"
  mkdir -p "$dir" && chmod 777 "$dir"
  as_pg "$PG_BIN/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C --no-sync >/dev/null
  cat >>"$dir/data/postgresql.auto.conf" <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
wal_level = logical
track_commit_timestamp = on
max_replication_slots = 16
max_wal_senders = 16
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 256MB
max_wal_size = 4GB
${PG_EXTRA_CONF:-}
CONF
  as_pg "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/log" -w start >/dev/null
  CLEANUP+=("as_pg $PG_BIN/pg_ctl -D $dir/data -m immediate stop")
  printf -v "PGPORT_$name" '%s' "$port"
}

# start_tansu: a tansu broker on a free port (BROKER_PORT, TANSU_PID), in memory unless TANSU_STORAGE
# names another engine (e.g. s3://bucket/ with the AWS_* variables of a local S3 server).
start_tansu() {
  BROKER_PORT=$(free_port)
  "$TANSU" broker --listener-url "tcp://127.0.0.1:$BROKER_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$BROKER_PORT" \
    --storage-engine "${TANSU_STORAGE:-memory://tansu/}" >"$WORK/tansu.log" 2>&1 &
  TANSU_PID=$!
  disown "$TANSU_PID"
  CLEANUP+=("kill -9 $TANSU_PID")
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$BROKER_PORT") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "tansu did not start" >&2
  return 1
}

# psql_at PORT DB SQL
psql_at() {
  "$PG_BIN/psql" -X -q -At -h 127.0.0.1 -p "$1" -U postgres -d "$2" -c "$3"
}

# ferry_yaml_common TOPIC_PREFIX: the part of a benchmark's pgferry config every script shares
# (this run's broker, a free metrics port, warnings only unless FERRY_LOG_LEVEL says otherwise).
# KAFKA_PROPS="k=v k=v" adds librdkafka properties (`kafka.properties`), to try a setting
# against the defaults.
ferry_yaml_common() {
  cat <<YAML
kafka:
  brokers: 127.0.0.1:$BROKER_PORT
  topic_prefix: $1
  properties: {$(for kv in ${KAFKA_PROPS:-}; do printf '"%s": "%s", ' "${kv%%=*}" "${kv#*=}"; done)}
metrics:
  listen: 127.0.0.1:$(free_port)
log:
  format: text
  level: ${FERRY_LOG_LEVEL:-warn}
YAML
}

# replica_yaml SRC_PORT SRC_DB DST_PORT DST_DB TOPIC_PREFIX [SOURCE_LINES]: a master -> replica
# pgferry config, capture and apply in one process (node `master`, slot ferry_slot,
# publication ferry_pub). SOURCE_LINES are more `source:` keys, each line indented by two.
replica_yaml() {
  cat <<YAML
node_id: master
source:
  url: postgres://postgres@127.0.0.1:$1/$2
  slot: ferry_slot
  publication: ferry_pub
${6:-}
apply:
  mode: replica
  nodes: [master]
  targets:
    - url: postgres://postgres@127.0.0.1:$3/$4
$(ferry_yaml_common "$5")
YAML
}

# pgbench_at PORT DB ARGS...
pgbench_at() { "$PG_BIN/pgbench" -h 127.0.0.1 -p "$1" -U postgres "${@:3}" "$2"; }

now() { date +%s.%N; }

# cpu_secs PID: CPU time (user + system, every thread) the process has used so far, in seconds.
cpu_secs() {
  awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$1/stat" 2>/dev/null || echo "?"
}

# cluster_cpu NAME: CPU seconds the cluster started as NAME (start_pg) has used so far: its
# postmaster and every backend that has exited (a live backend counts once it ends).
cluster_cpu() {
  awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15 + $16 + $17) / hz}' \
    "/proc/$(head -1 "$WORK/pg-$1/data/postmaster.pid")/stat" 2>/dev/null || echo "?"
}

# peak_rss_mb PID
peak_rss_mb() {
  awk '/VmHWM/ {printf "%.1f", $2/1024}' "/proc/$1/status" 2>/dev/null || echo "?"
}

# ferry_metrics CONFIG: the /metrics page of the pgferry running with CONFIG (its `listen:`).
ferry_metrics() {
  curl -s "http://$(awk '/^  listen:/ {print $2; exit}' "$1")/metrics" 2>/dev/null
}

# ferry_metric CONFIG REGEX: the sum of the samples of ferry_metrics whose line matches REGEX
# (0 when none does or pgferry does not answer yet). A cheap gate before an exact check that
# costs the machine more (a count(*) of a big table).
ferry_metric() {
  ferry_metrics "$1" | awk -v re="$2" '$0 ~ re && !/^#/ {n += $NF} END {printf "%d", n}'
}

# time_ferry_until CONFIG CONDITION...: starts `$BIN run --config CONFIG` (under perf when
# PERF_OUT is set; with PERF_SYSTEM=1 the profile covers every process of the machine while
# pgferry runs: PostgreSQL, the broker and pgferry side by side), waits until the CONDITION
# command succeeds, then stops pgferry. Sets
# FERRY_SECS (wall time to the condition), FERRY_RSS (peak RSS in MB) and FERRY_CPU (CPU
# seconds pgferry used). Fails with the log when pgferry exits early or BENCH_TIMEOUT (default
# 900 s) passes. METRICS_OUT: where to save pgferry's /metrics at the condition.
time_ferry_until() {
  local config=$1 log pid deadline t0 wrapper=()
  log="$WORK/ferry-$(basename "$config" .yaml)-$(date +%s%N).log"
  shift
  local perf_pid=
  if [[ -n "${PERF_OUT:-}" && "${PERF_SYSTEM:-0}" == 1 ]]; then
    perf record -a -e cpu-clock -F 999 -g -o "$PERF_OUT" 2>/dev/null &
    perf_pid=$!
    sleep 0.5
  elif [[ -n "${PERF_OUT:-}" ]]; then
    # shellcheck disable=SC2206  # PERF_ARGS is a list of words, e.g. "--call-graph dwarf"
    wrapper=(perf record -e cpu-clock -F 999 ${PERF_ARGS:--g} -o "$PERF_OUT" --)
  fi
  t0=$(now)
  "${wrapper[@]}" "$BIN" run --config "$config" 2>"$log" &
  pid=$!
  CLEANUP+=("kill -9 $pid")
  deadline=$((SECONDS + ${BENCH_TIMEOUT:-900}))
  until "$@"; do
    kill -0 "$pid" 2>/dev/null || { echo "pgferry exited:" >&2; cat "$log" >&2; exit 1; }
    (( SECONDS > deadline )) && { echo "pgferry did not reach '$*' in time" >&2; tail -30 "$log" >&2; exit 1; }
    sleep 0.05
  done
  FERRY_SECS=$(echo "$(now) - $t0" | bc -l)
  [[ -n "$perf_pid" ]] && { kill -INT "$perf_pid"; wait "$perf_pid" || true; }
  FERRY_RSS=$(peak_rss_mb "$pid")
  FERRY_CPU=$(cpu_secs "$pid")
  if [[ -n "${METRICS_OUT:-}" ]]; then
    sleep 1  # counters move just after the commit that the condition saw
    ferry_metrics "$config" >"$METRICS_OUT" || true
  fi
  kill -TERM "$pid"; wait "$pid" || true
}

# bench_build [--smoke]: builds pgferry, debug for --smoke (CI keeps the benchmark scripts
# working) or release; sets SMOKE (1/0), PROFILE and BIN. FERRY_BIN=PATH runs that binary
# instead of building one (to compare two builds on the same machine, run after run).
bench_build() {
  if [[ "${1:-}" == "--smoke" ]]; then
    SMOKE=1; PROFILE=debug
  else
    SMOKE=0; PROFILE=release
  fi
  if [[ -n "${FERRY_BIN:-}" ]]; then
    BIN=$FERRY_BIN
  elif (( SMOKE )); then
    cargo build --quiet; BIN="target/$PROFILE/pgferry"
  else
    cargo build --quiet --release; BIN="target/$PROFILE/pgferry"
  fi
}

# median: the median of the numbers on stdin, one per line.
median() { sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

# smoke_or SMOKE_VALUE FULL_VALUE: the value for this run's size (after bench_build).
smoke_or() { if (( SMOKE )); then echo "$1"; else echo "$2"; fi; }

# wait_ready CONFIG: waits until the pgferry running with CONFIG answers /readyz.
wait_ready() {
  local addr
  addr=$(sed -n 's/^  listen: //p' "$1")
  until "$BIN" healthcheck --addr "$addr" --path /readyz 2>/dev/null; do sleep 0.2; done
}

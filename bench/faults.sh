#!/usr/bin/env bash
# Fault campaign, for as long as you like: randomized writes on a master -> replica pair and on
# a three-node multi-master cluster while random faults hit every part (kill -9 of any
# pgferry, fast and immediate restarts of any PostgreSQL, the broker frozen and thawed; and a
# PostgreSQL 17 primary failed over to its standby mid-run); then checks the replica equals
# the master
# and every multi-master node equals the last-writer-wins oracle. CI runs the same test
# briefly (20 s per topology, seed 1).
#
#   bench/faults.sh                 10 minutes per topology, seeds 1-3
#   bench/faults.sh 3600 7,8        an hour per topology, seeds 7 and 8
#   FAULT_KINDS=kill,broker bench/faults.sh 600    only some fault kinds
#                                   (kill, pg_fast, pg_immediate, broker; broker_restart,
#                                   not in the default set, kills and restarts the broker on
#                                   S3 storage, see the README)
#
# Prints, per topology and seed, the faults injected and the rows checked.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}
seeds=${2:-1,2,3}
scripts/setup --test >/dev/null
FAULT_SECONDS=$seconds FAULT_SEEDS=$seeds \
  cargo test --release --test fault_campaign -- --nocapture --test-threads 1 2>&1 |
  tee "${FAULTS_LOG:-/dev/null}" | grep -E '^fault campaign|^test |panicked|did not converge|test result'

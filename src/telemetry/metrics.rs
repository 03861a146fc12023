//! Every Prometheus metric pgferry exports, defined once. Names follow
//! `pgferry_<what>_<unit>[_total]`; labels are low-cardinality (table, op), never a key.

use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// The registry and handles to each metric.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Row changes decoded from the source, by table and op.
    pub changes_captured: IntCounterVec,
    /// Row changes acknowledged by Kafka, by table and op.
    pub changes_published: IntCounterVec,
    /// Kafka messages acknowledged (changes and tombstones).
    pub kafka_messages_delivered: IntCounter,
    /// Kafka deliveries that failed.
    pub kafka_delivery_errors: IntCounter,
    /// Messages handed to the producer and not yet acknowledged.
    pub kafka_in_flight: IntGauge,
    /// Highest WAL position received from the server.
    pub source_received_lsn: IntGauge,
    /// Highest WAL position confirmed to the server (durable in Kafka).
    pub source_confirmed_lsn: IntGauge,
    /// Server WAL insert position minus the slot's confirmed_flush_lsn.
    pub source_lag_bytes: IntGauge,
    /// Server WAL insert position minus the slot's restart_lsn (WAL the slot pins).
    pub slot_retained_wal_bytes: IntGauge,
    /// Unix time of the last heartbeat written.
    pub heartbeat_timestamp: IntGauge,
    /// Rows published by snapshots, by table.
    pub snapshot_rows: IntCounterVec,
    /// Rows a table's snapshot expects (the planner's estimate when it started), by table.
    pub snapshot_rows_estimated: IntGaugeVec,
    /// Snapshot rows left out because the stream carried a newer state, by table.
    pub snapshot_rows_reconciled: IntCounterVec,
    /// Snapshot chunks published, by table.
    pub snapshot_chunks: IntCounterVec,
    /// Re-snapshot chunks published without their key range (targets keep rows the source
    /// deleted there), by table.
    pub snapshot_ranges_unpruned: IntCounterVec,
    /// Target rows a re-snapshot deleted because the source no longer has them, by table.
    pub apply_rows_pruned: IntCounterVec,
    /// Tables whose snapshot is queued or running.
    pub snapshot_tables_remaining: IntGauge,
    /// Schema changes captured from the source, by table.
    pub schema_changes: IntCounterVec,
    /// Schema changes applied to targets, by table and outcome (`applied`, `failed`).
    pub schema_changes_applied: IntCounterVec,
    /// 1 when capture is streaming.
    pub ready: IntGauge,
    /// Capture restarts after transient errors.
    pub restarts: IntCounter,
    /// Changes applied to targets, by table and op.
    pub apply_changes: IntCounterVec,
    /// Batches of inserted rows apply tried to write with COPY, by outcome (`written`,
    /// `conflict`, `refused`: the last two went as upserts).
    pub apply_copy_batches: IntCounterVec,
    /// Source transactions applied.
    pub apply_transactions: IntCounter,
    /// Target transactions committed (each holds one or more source transactions).
    pub apply_batches: IntCounter,
    /// Records sent to the dead-letter topic (or that stopped apply).
    pub apply_dead_letters: IntCounter,
    /// Changes capture could not publish, dead-lettered (or that stopped capture), by table.
    pub capture_dead_letters: IntCounterVec,
    /// Tables with unresolved dead letters on a target (1), by target and table: the
    /// target misses changes to them until an operator replays or resolves the letters.
    pub tables_diverged: IntGaugeVec,
    /// Whether each stage (capture, apply:<node>:<db>, maintenance) is running (1) or down and
    /// retrying (0).
    pub stage_up: IntGaugeVec,
    /// Times a stage failed and was restarted, by stage.
    pub stage_restarts: IntCounterVec,
    /// Records between the oldest the node stream keeps and the next one to apply, by source
    /// node: near 0, retention is about to delete records this target has not applied.
    pub apply_retention_headroom: IntGaugeVec,
    /// Target transactions undone and replayed after a lock conflict (deadlock, serialization
    /// failure, lock timeout), by source node.
    pub apply_lock_conflicts: IntCounterVec,
    /// Multi-master: 1 while the worker of `node` waits for this target to apply `waits_for`'s
    /// changes that a schema change (or what followed one) depends on.
    pub apply_waiting_for: IntGaugeVec,
    /// Changes skipped because their (announced) table is not in `apply.tables`, by source
    /// node.
    pub apply_filtered: IntCounterVec,
    /// Seconds between the source commit and its apply commit, for the last batch.
    pub apply_lag_seconds: Gauge,
    /// Seconds from handing a message to the producer to Kafka's acknowledgement.
    pub kafka_delivery_latency: Histogram,
    /// Source changes per committed target transaction.
    pub apply_batch_changes: Histogram,
    /// Seconds from a target transaction's first statement to its commit.
    pub apply_batch_duration: Histogram,
    /// Seconds since the last heartbeat was written (set at each scrape; 0 before the first).
    pub heartbeat_age: Gauge,
    /// WAL the server may still write before the slot loses WAL it needs (-1: unlimited).
    pub slot_safe_wal_bytes: IntGauge,
    /// Changes skipped by capture because pgferry applied them (loop prevention).
    pub capture_echoes_skipped: IntCounter,
    /// Multi-master conflicts, by table, type and resolution.
    pub conflicts: IntCounterVec,
    /// How far ahead of this node's clock the newest version applied from a peer was, in
    /// milliseconds (0 when not ahead): the observed clock skew, by peer node.
    pub peer_clock_ahead_ms: IntGaugeVec,
    /// Remote TRUNCATEs refused in multi-master (dead-lettered).
    pub truncates_refused: IntCounter,
    /// Refusals because tombstone collection went past a node's acknowledgements, by the
    /// node that was away.
    pub horizon_refusals: IntCounterVec,
    /// Tombstones collected because every node had acknowledged them.
    pub tombstones_collected: IntCounter,
    /// Tombstones removed by the retention backstop (some node had not acknowledged them).
    pub tombstones_expired: IntCounter,
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("metric definition is valid");
    registry
        .register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric definition is valid");
    registry
        .register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("metric definition is valid");
    registry
        .register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("metric definition is valid");
    registry
        .register(Box::new(h.clone()))
        .expect("metric registered once");
    h
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("metric definition is valid");
    registry
        .register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

impl Metrics {
    /// Creates and registers every metric. The definitions are constants, so the `expect`s
    /// can only fire on a programming error, which the unit test below catches.
    pub fn new(node_id: &str) -> Self {
        let registry = Registry::new();
        let build = IntGaugeVec::new(
            Opts::new("pgferry_build_info", "Build information; always 1."),
            &["version", "git_sha", "node"],
        )
        .expect("metric definition is valid");
        registry
            .register(Box::new(build.clone()))
            .expect("metric registered once");
        build
            .with_label_values(&[env!("CARGO_PKG_VERSION"), env!("BUILD_GIT_SHA"), node_id])
            .set(1);
        let r = &registry;
        Metrics {
            changes_captured: counter_vec(
                r,
                "pgferry_changes_captured_total",
                "Row changes decoded from the source.",
                &["table", "op"],
            ),
            changes_published: counter_vec(
                r,
                "pgferry_changes_published_total",
                "Row changes acknowledged by Kafka.",
                &["table", "op"],
            ),
            kafka_messages_delivered: counter(
                r,
                "pgferry_kafka_messages_delivered_total",
                "Kafka messages acknowledged, tombstones included.",
            ),
            kafka_delivery_errors: counter(
                r,
                "pgferry_kafka_delivery_errors_total",
                "Kafka deliveries that failed.",
            ),
            kafka_in_flight: gauge(
                r,
                "pgferry_kafka_in_flight_messages",
                "Messages handed to the producer and not yet acknowledged.",
            ),
            source_received_lsn: gauge(
                r,
                "pgferry_source_received_lsn",
                "Highest WAL position received from the source, as a byte offset.",
            ),
            source_confirmed_lsn: gauge(
                r,
                "pgferry_source_confirmed_lsn",
                "Highest WAL position confirmed to the source, as a byte offset.",
            ),
            source_lag_bytes: gauge(
                r,
                "pgferry_source_lag_bytes",
                "Source WAL insert position minus the slot's confirmed_flush_lsn.",
            ),
            slot_retained_wal_bytes: gauge(
                r,
                "pgferry_slot_retained_wal_bytes",
                "Source WAL insert position minus the slot's restart_lsn.",
            ),
            heartbeat_timestamp: gauge(
                r,
                "pgferry_heartbeat_timestamp_seconds",
                "Unix time of the last heartbeat written to the source.",
            ),
            snapshot_rows: counter_vec(
                r,
                "pgferry_snapshot_rows_total",
                "Rows published by snapshots.",
                &["table"],
            ),
            snapshot_rows_estimated: gauge_vec(
                r,
                "pgferry_snapshot_rows_estimated",
                "Rows a table's snapshot expects (the planner's estimate when it started).",
                &["table"],
            ),
            snapshot_rows_reconciled: counter_vec(
                r,
                "pgferry_snapshot_rows_reconciled_total",
                "Snapshot rows left out because the stream carried a newer state of them.",
                &["table"],
            ),
            snapshot_chunks: counter_vec(
                r,
                "pgferry_snapshot_chunks_total",
                "Snapshot chunks published.",
                &["table"],
            ),
            snapshot_ranges_unpruned: counter_vec(
                r,
                "pgferry_snapshot_ranges_unpruned_total",
                "Re-snapshot chunks published without their key range: targets keep rows the \
                 source deleted in it.",
                &["table"],
            ),
            apply_rows_pruned: counter_vec(
                r,
                "pgferry_apply_rows_pruned_total",
                "Target rows a re-snapshot deleted because the source no longer has them.",
                &["table"],
            ),
            snapshot_tables_remaining: gauge(
                r,
                "pgferry_snapshot_tables_remaining",
                "Tables whose snapshot is queued or running.",
            ),
            schema_changes: counter_vec(
                r,
                "pgferry_schema_changes_total",
                "Schema changes captured from the source.",
                &["table"],
            ),
            schema_changes_applied: counter_vec(
                r,
                "pgferry_schema_changes_applied_total",
                "Schema changes applied to targets, by outcome (applied; already: the target had it; failed: dead-lettered).",
                &["table", "outcome"],
            ),
            ready: gauge(
                r,
                "pgferry_ready",
                "1 when /readyz would answer ready (every component running, lag within limits), else 0.",
            ),
            restarts: counter(
                r,
                "pgferry_restarts_total",
                "Pipeline restarts after transient errors.",
            ),
            apply_changes: counter_vec(
                r,
                "pgferry_apply_changes_total",
                "Changes applied to target databases.",
                &["table", "op"],
            ),
            apply_copy_batches: counter_vec(
                r,
                "pgferry_apply_copy_batches_total",
                "Batches of inserted rows written with COPY (written), or sent as upserts after COPY met an existing key (conflict) or another refusal (refused).",
                &["outcome"],
            ),
            apply_transactions: counter(
                r,
                "pgferry_apply_transactions_total",
                "Source transactions applied.",
            ),
            apply_batches: counter(
                r,
                "pgferry_apply_batches_total",
                "Target transactions committed by apply.",
            ),
            apply_dead_letters: counter(
                r,
                "pgferry_apply_dead_letters_total",
                "Records that could not be applied (dead-lettered or stopped apply).",
            ),
            capture_dead_letters: counter_vec(
                r,
                "pgferry_capture_dead_letters_total",
                "Changes capture could not publish (dead-lettered or stopped capture), by table.",
                &["table"],
            ),
            tables_diverged: gauge_vec(
                r,
                "pgferry_table_diverged",
                "1 while a target table has unresolved dead letters (it misses changes).",
                &["target", "table"],
            ),
            stage_up: gauge_vec(
                r,
                "pgferry_stage_up",
                "1 while a stage runs, 0 while it is down and retrying.",
                &["stage"],
            ),
            apply_retention_headroom: gauge_vec(
                r,
                "pgferry_apply_retention_headroom_records",
                "Records between the oldest kept in the node stream and the next to apply; \
                 near 0, retention is about to delete unapplied records.",
                &["node"],
            ),
            apply_waiting_for: gauge_vec(
                r,
                "pgferry_apply_waiting_for_node",
                "1 while the worker of node waits for this target to apply waits_for's changes \
                 that a schema change, or what followed one, depends on (multi-master).",
                &["node", "waits_for"],
            ),
            apply_lock_conflicts: counter_vec(
                r,
                "pgferry_apply_lock_conflicts_total",
                "Target transactions undone and replayed after a lock conflict (deadlock, \
                 serialization failure or lock timeout) with local writers or other workers.",
                &["node"],
            ),
            apply_filtered: counter_vec(
                r,
                "pgferry_apply_filtered_total",
                "Changes skipped because their table, announced by the node stream, is not in \
                 apply.tables, or was dropped on the target by a DROP TABLE (multi-master: \
                 written before the writer saw the drop).",
                &["node"],
            ),
            stage_restarts: counter_vec(
                r,
                "pgferry_stage_restarts_total",
                "Times a stage failed (or panicked) and was restarted.",
                &["stage"],
            ),
            apply_lag_seconds: {
                let g = Gauge::new(
                    "pgferry_apply_lag_seconds",
                    "Seconds from source commit to apply commit, last batch.",
                )
                .expect("metric definition is valid");
                r.register(Box::new(g.clone()))
                    .expect("metric registered once");
                g
            },
            heartbeat_age: {
                let g = Gauge::new(
                    "pgferry_heartbeat_age_seconds",
                    "Seconds since pgferry last wrote a heartbeat into its source database.",
                )
                .expect("metric definition is valid");
                r.register(Box::new(g.clone()))
                    .expect("metric registered once");
                g
            },
            slot_safe_wal_bytes: gauge(
                r,
                "pgferry_slot_safe_wal_bytes",
                "WAL that can still be written before the slot exceeds max_slot_wal_keep_size and loses WAL it needs; -1 when unlimited.",
            ),
            kafka_delivery_latency: histogram(
                r,
                "pgferry_kafka_delivery_latency_seconds",
                "Time from handing a message to the producer to Kafka's acknowledgement.",
                vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
            ),
            apply_batch_changes: histogram(
                r,
                "pgferry_apply_batch_changes",
                "Source changes per committed target transaction.",
                vec![1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 5000.0, 20000.0],
            ),
            apply_batch_duration: histogram(
                r,
                "pgferry_apply_batch_duration_seconds",
                "Time from a target transaction's first statement to its commit.",
                vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
            ),
            capture_echoes_skipped: counter(
                r,
                "pgferry_capture_echoes_skipped_total",
                "Changes not published because pgferry itself applied them (loop prevention).",
            ),
            conflicts: counter_vec(
                r,
                "pgferry_conflicts_total",
                "Multi-master conflicts detected, by table, type and resolution.",
                &["table", "type", "resolution"],
            ),
            peer_clock_ahead_ms: gauge_vec(
                r,
                "pgferry_peer_clock_ahead_milliseconds",
                "How far ahead of this node's clock the newest version applied from a peer was (0 when not ahead), by peer node.",
                &["node"],
            ),
            truncates_refused: counter(
                r,
                "pgferry_truncates_refused_total",
                "Remote TRUNCATEs refused (dead-lettered) by multi-master apply.",
            ),
            horizon_refusals: counter_vec(
                r,
                "pgferry_horizon_refusals_total",
                "Multi-master refusals of a node that was away past the tombstone horizon (rebuild it), by that node.",
                &["node"],
            ),
            tombstones_collected: counter(
                r,
                "pgferry_tombstones_collected_total",
                "Multi-master tombstones removed once every node had acknowledged them.",
            ),
            tombstones_expired: counter(
                r,
                "pgferry_tombstones_expired_total",
                "Multi-master tombstones removed by the apply.conflict.tombstone_retention backstop before every node had acknowledged them.",
            ),
            registry,
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let last = self.heartbeat_timestamp.get();
        if last > 0 {
            let now = crate::pgtime::PgTimestamp::now().unix_millis() as f64 / 1000.0;
            self.heartbeat_age.set((now - last as f64).max(0.0));
        }
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_metrics_register_and_render() {
        let m = Metrics::new("n1");
        m.changes_captured
            .with_label_values(&["public.t", "c"])
            .inc();
        let text = m.render();
        assert!(text.contains("pgferry_changes_captured_total{op=\"c\",table=\"public.t\"} 1"));
        assert!(text.contains("pgferry_build_info{"));
    }
}

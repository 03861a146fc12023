//! The streaming phase: START_REPLICATION, then a loop over replication messages, status
//! timer and shutdown signal, plus the heartbeat task.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::time::MissedTickBehavior;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::{lock, Capture, CaptureError, OpenTxn};
use crate::lsn::Lsn;
use crate::naming::is_pgferry_origin;
use crate::pg::replication::wire::ReplicationMessage;
use crate::pg::replication::ReplicationConnection;
use crate::pgtime::PgTimestamp;
use crate::pipeline::progress::Progress;
use crate::sink::kafka::encode::TxnStamp;
use crate::source::assemble::{Assembler, CaptureEvent};
use crate::source::catalog;
use crate::source::pgoutput::{ReplicaIdentity, StreamDecoder};
use crate::source::snapshot::driver::{self, Published};
use crate::sql::{quote_ident, quote_literal};
use crate::telemetry::Metrics;

/// How long a graceful shutdown waits for Kafka to acknowledge what was sent.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(30);

/// The replication connection plus what we have told the server.
pub(super) struct StreamState<'a> {
    repl: &'a mut ReplicationConnection,
    received: Lsn,
    last_status: Instant,
    interval: Duration,
}

impl StreamState<'_> {
    /// Reports `flush = watermark`: the only way confirmed_flush_lsn ever advances.
    async fn send_status(
        &mut self,
        progress: &Mutex<Progress>,
        metrics: &Metrics,
        reply: bool,
    ) -> Result<(), CaptureError> {
        let flushed = lock(progress).watermark();
        self.repl
            .send_status(self.received.max(flushed), flushed, reply)
            .await?;
        metrics.source_confirmed_lsn.set(flushed.0 as i64);
        metrics.source_received_lsn.set(self.received.0 as i64);
        self.last_status = Instant::now();
        Ok(())
    }

    /// Sends a status update if one is due; called while waiting on a full Kafka queue so the
    /// server does not time the connection out.
    pub(super) async fn keep_alive(
        &mut self,
        progress: &Mutex<Progress>,
        metrics: &Metrics,
    ) -> Result<(), CaptureError> {
        if self.last_status.elapsed() >= self.interval {
            self.send_status(progress, metrics, false).await?;
        }
        Ok(())
    }
}

/// Aborts the heartbeat task when the run ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn spawn_heartbeat(
    sql: Arc<Client>,
    slot: String,
    interval: Duration,
    metrics: Arc<Metrics>,
) -> AbortOnDrop {
    AbortOnDrop(tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Warn when the heartbeat starts failing, not at every tick while it keeps failing
        // (the replication connection's own failure restarts the stage and this task).
        let mut failing = false;
        loop {
            tick.tick().await;
            let beat = async {
                catalog::emit_heartbeat(&sql).await?;
                metrics
                    .heartbeat_timestamp
                    .set(PgTimestamp::now().unix_millis() / 1000);
                if let Some(slot) = catalog::slot_lag(&sql, &slot).await? {
                    metrics.source_lag_bytes.set(slot.lag);
                    metrics.slot_retained_wal_bytes.set(slot.retained);
                    metrics.slot_safe_wal_bytes.set(slot.safe.unwrap_or(-1));
                }
                Ok::<_, tokio_postgres::Error>(())
            };
            match beat.await {
                Ok(()) => {
                    if failing {
                        tracing::info!("heartbeat works again");
                    }
                    failing = false;
                }
                Err(error) if !failing => {
                    tracing::warn!(%error, "heartbeat failed; retrying at every interval");
                    failing = true;
                }
                Err(error) => tracing::debug!(%error, "heartbeat still failing"),
            }
        }
    }))
}

enum Step {
    Stop,
    Status,
    Message(ReplicationMessage),
}

impl Capture {
    /// Streams changes until shutdown or error.
    pub(super) async fn stream(
        &mut self,
        mut repl: ReplicationConnection,
        published: tokio::sync::mpsc::UnboundedReceiver<Published>,
        shutdown: CancellationToken,
    ) -> Result<(), CaptureError> {
        let source = &self.settings.source;
        // proto_version 1: the server spills large transactions to disk and sends each one
        // whole at commit, so memory stays bounded without streaming (v2) support here.
        let command = format!(
            "START_REPLICATION SLOT {} LOGICAL 0/0 (\"proto_version\" '1', \"publication_names\" {}, \"messages\" 'true')",
            quote_ident(&self.slot),
            quote_literal(&quote_ident(&source.publication)),
        );
        repl.start_replication(&command).await?;
        tracing::info!(slot = %self.slot, "streaming");
        let _heartbeat = spawn_heartbeat(
            self.sql.clone(),
            self.slot.clone(),
            source.heartbeat_interval,
            self.metrics.clone(),
        );
        // The snapshot driver runs beside the stream; it stops with this run, and its failure
        // ends the run.
        let driver_stop = shutdown.child_token();
        let _stop_driver = driver_stop.clone().drop_guard();
        let (driver_failed_tx, mut driver_failed) = tokio::sync::mpsc::channel(1);
        let driver = driver::Driver::start(
            driver::DriverSettings {
                source: source.clone(),
                node_id: self.settings.node_id.clone(),
                slot: self.slot.clone(),
                prune: self.settings.compact_snapshot_rows,
            },
            &self.snapshots,
            published,
            self.progress.clone(),
            self.metrics.clone(),
        )
        .await?;
        let _driver = AbortOnDrop(tokio::spawn(async move {
            if let Err(error) = driver.run(driver_stop).await {
                let _ = driver_failed_tx.send(error).await;
            }
        }));
        let watermark = lock(&self.progress).watermark();
        let mut state = StreamState {
            repl: &mut repl,
            received: watermark,
            last_status: Instant::now(),
            interval: source.status_interval,
        };
        self.health.set_ready(super::COMPONENT, true);
        let result = self
            .stream_loop(&mut state, &shutdown, &mut driver_failed)
            .await;
        self.health.set_ready(super::COMPONENT, false);
        result?;
        // Graceful stop: intake has stopped; drain Kafka, confirm what it holds, leave.
        if let Err(error) = self.sink.drain(SHUTDOWN_DRAIN).await {
            tracing::warn!(%error, "shutdown drain incomplete; unacknowledged changes will be re-sent on restart");
        }
        state
            .send_status(&self.progress, &self.metrics, false)
            .await?;
        tracing::info!(confirmed = %lock(&self.progress).watermark(), "capture stopped");
        repl.terminate().await;
        Ok(())
    }

    async fn stream_loop(
        &mut self,
        state: &mut StreamState<'_>,
        shutdown: &CancellationToken,
        driver_failed: &mut tokio::sync::mpsc::Receiver<CaptureError>,
    ) -> Result<(), CaptureError> {
        let silence_limit = (state.interval * 6).max(Duration::from_secs(120));
        let mut tick = tokio::time::interval(state.interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut decoder = StreamDecoder::default();
        let mut assembler = Assembler::default();
        let mut events = Vec::new();
        let mut current: Option<OpenTxn> = None;
        let mut last_message = Instant::now();
        loop {
            self.sink.check_failed()?;
            self.health.beat();
            let step = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Step::Stop,
                Some(error) = driver_failed.recv() => return Err(error),
                _ = tick.tick() => Step::Status,
                msg = state.repl.recv() => Step::Message(msg?),
            };
            match step {
                Step::Stop => return Ok(()),
                Step::Status => {
                    if last_message.elapsed() > silence_limit {
                        return Err(CaptureError::SourceSilent(last_message.elapsed()));
                    }
                    state
                        .send_status(&self.progress, &self.metrics, false)
                        .await?;
                }
                Step::Message(ReplicationMessage::Keepalive {
                    wal_end,
                    reply_requested,
                    ..
                }) => {
                    last_message = Instant::now();
                    state.received = state.received.max(wal_end);
                    // Between transactions the server has sent everything before wal_end, so
                    // once earlier work is acknowledged, wal_end is safe to confirm. This is
                    // what lets an idle database's slot advance.
                    if current.is_none() {
                        lock(&self.progress).position(wal_end);
                    }
                    if reply_requested {
                        state
                            .send_status(&self.progress, &self.metrics, false)
                            .await?;
                    }
                }
                Step::Message(ReplicationMessage::XLogData {
                    wal_start, data, ..
                }) => {
                    last_message = Instant::now();
                    state.received = state.received.max(wal_start);
                    let msg = decoder
                        .decode(data)
                        .map_err(|source| CaptureError::Decode {
                            lsn: wal_start,
                            source,
                        })?;
                    assembler
                        .push(msg, wal_start, &mut events)
                        .map_err(|source| CaptureError::Assemble {
                            lsn: wal_start,
                            source,
                        })?;
                    for event in events.drain(..) {
                        self.handle(event, &mut current, &mut assembler, state)
                            .await?;
                    }
                }
            }
        }
    }

    async fn handle(
        &mut self,
        event: CaptureEvent,
        current: &mut Option<OpenTxn>,
        assembler: &mut Assembler,
        state: &mut StreamState<'_>,
    ) -> Result<(), CaptureError> {
        match event {
            CaptureEvent::Relation(mut relation) => {
                let sql = self.sql.clone();
                if relation.replica_identity == ReplicaIdentity::Full {
                    let pk = catalog::primary_key_columns(&sql, relation.oid)
                        .await
                        .map_err(CaptureError::sql("reading primary key columns"))?;
                    relation = assembler.rekey(relation.oid, &pk).unwrap_or(relation);
                }
                let first = !self.schemas.contains_key(&relation.oid);
                self.relation_seen(&sql, &relation).await?;
                if let Some(txn) = current.as_mut().filter(|_| first) {
                    self.born_unannounced(txn, &relation).await?;
                }
            }
            CaptureEvent::Begin(meta) => {
                let ticket = lock(&self.progress).open();
                let mut txn = OpenTxn::new(TxnStamp::new(&meta), ticket, false);
                // Loop prevention: what pgferry applied came from another node's stream.
                txn.echo = meta.origin.as_deref().is_some_and(is_pgferry_origin);
                *current = Some(txn);
            }
            CaptureEvent::Change(mut change) => {
                let Some(txn) = current.as_mut() else {
                    return Err(CaptureError::Assemble {
                        lsn: change.lsn,
                        source: crate::source::assemble::AssembleError::Unexpected(
                            "change",
                            "outside a transaction",
                        ),
                    });
                };
                // pgferry's own bookkeeping is never replicated; a version stamped for a row
                // change goes with that change (the next one of its table).
                let bookkeeping = change.relation.schema == crate::naming::BOOKKEEPING_SCHEMA;
                // Applied changes too: they changed rows a snapshot chunk may hold. Only while
                // a snapshot is planned or running (or a window is still open).
                let reconciled = self
                    .snapshots
                    .active
                    .load(std::sync::atomic::Ordering::Relaxed)
                    || self.reconciler.is_busy();
                if !bookkeeping && reconciled {
                    self.reconciler
                        .changed(txn.stamp.xid().unwrap_or(0), &change);
                }
                txn.unreconciled |= !bookkeeping && !reconciled;
                if txn.echo {
                    self.metrics.capture_echoes_skipped.inc();
                    return Ok(());
                }
                if bookkeeping {
                    if change.relation.table == crate::naming::VERSIONS_TABLE {
                        txn.versions
                            .stamped(&change.relation, change.after.as_ref());
                    }
                    return Ok(());
                }
                change.version = txn.versions.take(&change.relation);
                if txn.unborn.contains(&change.relation.oid) {
                    // Its table's snapshot carries it (see `Capture::born_unannounced`).
                    return Ok(());
                }
                self.publish(txn, &change, Some(state)).await?;
            }
            CaptureEvent::Commit { end_lsn } => {
                if let Some(txn) = current.take() {
                    // Whether a chunk that could not see it may prune (see `reconcile`).
                    self.reconciler
                        .committed(txn.stamp.xid().unwrap_or(0), !txn.unreconciled);
                    self.finish_txn(txn, end_lsn, Some(state)).await?;
                }
            }
            CaptureEvent::Position(lsn) => lock(&self.progress).position(lsn),
            CaptureEvent::Ddl(content) => {
                // DDL pgferry applied (an echo) came from another node, which published it.
                if let Some(txn) = current.as_mut().filter(|t| !t.echo) {
                    self.schema_change(txn, &content, Some(state)).await?;
                }
            }
            CaptureEvent::Watermark(content) => {
                if let Some(txn) = current.as_mut() {
                    self.watermark(txn, &content, Some(state)).await?;
                }
            }
            CaptureEvent::After(content) => {
                // Written by pgferry's own worker, so in an echo transaction: published anyway
                // (the only items of that transaction capture publishes), since what this node
                // writes next may depend on the schema change the worker applied.
                if let Some(txn) = current.as_mut() {
                    self.publish_after(txn, &content, Some(state)).await?;
                }
            }
            CaptureEvent::Ack(content) => {
                if let Some(txn) = current.as_mut().filter(|t| !t.echo) {
                    self.publish_ack(txn, &content, Some(state)).await?;
                }
            }
        }
        Ok(())
    }
}

//! The capture pipeline for one source: slot and publication setup, the initial snapshot, then
//! the replication stream, each change encoded and handed to the Kafka sink.
//!
//! Delivery rule: the only LSN ever reported as `flush` is the [`Progress`] watermark, which
//! moves only when Kafka has acknowledged every message up to it. A crash anywhere therefore
//! restarts from a position whose changes are all in Kafka; changes after it are re-sent
//! (at-least-once, duplicates possible, no gaps).
//!
//! This module only connects things together; decoding, assembling, encoding and the
//! watermark are pure modules elsewhere.

mod error;
mod slot;
pub mod slot_plan;
mod stream;
mod versions;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::IntCounter;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

pub use error::CaptureError;

/// The capture stage's name in `/readyz`, `pgferry_stage_up` and the log.
pub const COMPONENT: &str = "capture";

use super::catalog;
use super::reconcile::Reconciler;
use super::snapshot::driver::{self, Mark, MarkKind, Published};
use super::snapshot::{self, chunk, TableReader};
use crate::config::{KafkaConfig, OnPoison, SourceConfig};
use crate::error::ErrorChain;
use crate::event::{Op, PruneRange, RelationMeta, RowChange, TxnMeta};
use crate::lsn::Lsn;
use crate::pg::replication::ReplicationConnection;
use crate::pgtime::PgTimestamp;
use crate::pipeline::progress::{Progress, Ticket};
use crate::sink::kafka::dead_letter;
use crate::sink::kafka::encode::{EnvelopeSource, Frame, Record, TxnStamp};
use crate::sink::kafka::node_stream::{self, ColumnSchema};
use crate::sink::kafka::producer::{KafkaSink, Queued};
use crate::source::pgoutput::{Datum, Tuple};
use crate::telemetry::{Health, Metrics};
use crate::value::{copy_text, TypeRegistry};

/// How long to wait between offers of a record to a full producer queue.
const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(5);

/// Everything a capture run needs from the config.
#[derive(Debug, Clone)]
pub struct CaptureSettings {
    /// This node's id.
    pub node_id: String,
    /// `source:`.
    pub source: SourceConfig,
    /// `kafka:`.
    pub kafka: KafkaConfig,
    /// Snapshot rows go to the node stream as `rows` items (COPY text), not one change item
    /// each: every node but a multi-master one, whose appliers need a version per row.
    pub compact_snapshot_rows: bool,
    /// Re-snapshot a table whose schema change gave its rows values targets cannot compute
    /// ([`crate::ddl::rewrites_rows`]): every node but a multi-master one, whose peers made
    /// values of their own (a snapshot row never wins over a version they hold).
    pub resnapshot_rewritten: bool,
}

/// A chunk's range as it is being published: the relation its key is read by, and what is
/// left of the range (its lower bound moves up with each item).
struct Pruning {
    target: Arc<chunk::Target>,
    range: PruneRange,
}

/// Whether schema-change ops create a table.
fn creates_table(ops: &[crate::ddl::DdlOp]) -> bool {
    ops.iter()
        .any(|op| matches!(op, crate::ddl::DdlOp::CreateTable { .. }))
}

/// State of one capture run (one connection lifetime).
struct Capture {
    settings: CaptureSettings,
    slot: String,
    sql: Arc<Client>,
    sink: KafkaSink,
    progress: Arc<Mutex<Progress>>,
    types: TypeRegistry,
    envelope: EnvelopeSource,
    metrics: Arc<Metrics>,
    health: Health,
    warned_keyless: HashSet<u32>,
    /// (captured, published) counters per relation and op, so the hot path does not build
    /// label strings; cleared whenever a relation is (re)described.
    counters: HashMap<(u32, Op), (IntCounter, IntCounter)>,
    /// Column types of each relation, for the node stream's `relation` records.
    schemas: HashMap<u32, Vec<ColumnSchema>>,
    /// Relations whose schema this run has already announced on the node stream.
    announced: HashSet<u32>,
    /// Snapshot chunks' windows (see [`crate::source::reconcile`]).
    reconciler: Reconciler,
    /// The link to this run's snapshot driver.
    snapshots: driver::Link,
}

fn lock(p: &Mutex<Progress>) -> std::sync::MutexGuard<'_, Progress> {
    p.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs capture until `shutdown` fires (returns `Ok`) or an error ends the run.
pub async fn run(
    settings: CaptureSettings,
    metrics: Arc<Metrics>,
    health: Health,
    shutdown: CancellationToken,
) -> Result<(), CaptureError> {
    let source = &settings.source;
    let slot = source.slot_name(&settings.node_id);
    let app_name = format!("pgferry-{}", settings.node_id);
    let sql = crate::pg::connect(&source.url, &app_name)
        .await
        .map_err(CaptureError::sql("connecting to the source"))?;
    catalog::ensure_internal_schema(&sql)
        .await
        .map_err(CaptureError::sql("creating the pgferry schema"))?;
    let run = catalog::next_capture_run(&sql)
        .await
        .map_err(CaptureError::sql("numbering the capture run"))?;
    if catalog::ensure_publication(&sql, &source.publication, &source.tables)
        .await
        .map_err(CaptureError::sql("creating the publication"))?
    {
        tracing::info!(publication = %source.publication, "created publication");
    }
    if source.capture_ddl {
        if let Err(e) = catalog::ensure_ddl_capture(&sql).await {
            // A deadlock with DDL running at the same moment, a lock or connection lost: not
            // a refusal, so the run starts again (left alone, triggers of an earlier version
            // stayed in place, reported as an administrator's).
            if crate::error::classify_pg(&e) == crate::error::ErrorClass::Transient {
                return Err(CaptureError::sql(
                    "installing the schema-change event triggers",
                )(e));
            }
            // A role that may not create event triggers cannot update them either: fine when
            // an administrator installed them (`pgferry roles`).
            if catalog::ddl_capture_installed(&sql).await.unwrap_or(false) {
                tracing::info!(error = %ErrorChain(&e),
                    "schema changes are captured by the event triggers an administrator \
                     installed; this role may not update them (after a pgferry upgrade, run \
                     `pgferry roles` output again as a superuser)");
            } else {
                tracing::warn!(error = %ErrorChain(&e),
                    "schema changes are NOT replicated: installing pgferry's event triggers \
                     failed (event triggers need a superuser). Run `pgferry roles` output as a \
                     superuser, or capture once as a superuser, to install them; or set \
                     source.capture_ddl: false to silence this");
            }
        }
    }
    let mut repl = ReplicationConnection::connect(&source.url, &app_name).await?;
    let progress = Arc::new(Mutex::new(Progress::default()));
    let sink = KafkaSink::new(&settings.kafka, progress.clone(), metrics.clone())?;
    let envelope = EnvelopeSource {
        node: settings.node_id.clone(),
        database: source.url.dbname().to_owned(),
        topic_prefix: settings.kafka.topic_prefix.clone(),
        tombstones: settings.kafka.tombstones,
        run,
    };
    let (link, published) = driver::link(run);
    let mut capture = Capture {
        slot,
        sql: Arc::new(sql),
        sink,
        progress,
        types: TypeRegistry::default(),
        envelope,
        metrics,
        health,
        warned_keyless: HashSet::new(),
        counters: HashMap::new(),
        schemas: HashMap::new(),
        announced: HashSet::new(),
        reconciler: Reconciler::default(),
        snapshots: link,
        settings,
    };
    capture.prepare_slot(&mut repl).await?;
    capture.stream(repl, published, shutdown).await
}

impl Capture {
    /// Publishes every published table's rows as `op: "r"`, inside the exported snapshot, and
    /// waits until Kafka has all of them.
    async fn publish_snapshot(
        &mut self,
        snapshot_name: &str,
        consistent: Lsn,
    ) -> Result<(), CaptureError> {
        let source = &self.settings.source;
        let app_name = format!("pgferry-{}-snapshot", self.settings.node_id);
        let snap = crate::pg::connect(&source.url, &app_name)
            .await
            .map_err(CaptureError::sql("connecting for the snapshot"))?;
        snap.batch_execute(snapshot::ROW_SECURITY_OFF)
            .await
            .map_err(CaptureError::sql("setting up the snapshot connection"))?;
        snapshot::begin(&snap, snapshot_name)
            .await
            .map_err(CaptureError::sql("importing the exported snapshot"))?;
        let tables = catalog::published_tables(&snap, &source.publication)
            .await
            .map_err(CaptureError::sql("listing published tables"))?;
        let stamp = TxnStamp::new(&TxnMeta {
            xid: None,
            commit_lsn: consistent,
            commit_ts: PgTimestamp::now(),
            origin: None,
        });
        let ticket = lock(&self.progress).open();
        let mut txn = OpenTxn::new(stamp, ticket, true);
        let batch_rows = source.snapshot_batch_rows;
        let publication = source.publication.clone();
        for (schema, table) in tables {
            let Some((meta, published)) =
                snapshot::describe_published(&snap, &publication, &schema, &table)
                    .await
                    .map_err(CaptureError::sql("describing a snapshot table"))?
            else {
                continue;
            };
            let relation = Arc::new(meta);
            self.relation_seen(&snap, &relation).await?;
            tracing::info!(table = %relation.qualified_name(), "snapshotting table");
            let mut reader = TableReader::new(&snap, relation.clone(), &published, batch_rows);
            while let Some(rows) = reader
                .next_batch()
                .await
                .map_err(|e| CaptureError::snapshot_read(&relation.qualified_name(), e))?
            {
                self.publish_snapshot_rows(&mut txn, &relation, consistent, rows, None, None)
                    .await?;
                self.health.beat();
            }
        }
        snapshot::finish(&snap)
            .await
            .map_err(CaptureError::sql("ending the snapshot transaction"))?;
        self.finish_txn(txn, consistent, None).await?;
        self.sink
            .drain(self.settings.kafka.delivery_timeout + Duration::from_secs(30))
            .await?;
        tracing::info!("initial snapshot is in Kafka");
        Ok(())
    }

    /// A snapshot watermark in the stream (see [`driver`]): opens a chunk's window, publishes
    /// a chunk's reconciled rows in this transaction, or truncates the targets of a table
    /// without a key before its chunks.
    async fn watermark(
        &mut self,
        txn: &mut OpenTxn,
        content: &[u8],
        repl: Option<&mut stream::StreamState<'_>>,
    ) -> Result<(), CaptureError> {
        let Some(mark) = Mark::parse(content) else {
            tracing::warn!(commit_lsn = %txn.stamp.commit_lsn(),
                           "ignoring a pgferry.snapshot message pgferry did not write");
            return Ok(());
        };
        if mark.run != self.snapshots.run {
            // A watermark of an earlier run (replayed after a restart): its chunk is gone.
            return Ok(());
        }
        let board = self.snapshots.board.clone();
        let lsn: Lsn = txn.stamp.commit_lsn().parse().unwrap_or_default();
        match mark.mark {
            MarkKind::Low => {
                if let Some(target) = board.target(mark.id) {
                    self.reconciler.open(mark.id, target.chunk_relation.oid);
                }
            }
            MarkKind::Start => {
                let Some(deposit) = board.take(mark.id) else {
                    return Ok(());
                };
                let relation = deposit.target.relation.clone();
                self.describe_once(&relation).await?;
                let truncate = RowChange {
                    op: Op::Truncate,
                    relation: relation.clone(),
                    lsn,
                    before: None,
                    before_is_key_only: false,
                    after: None,
                    version: None,
                };
                self.publish(txn, &truncate, repl).await?;
                self.reconciler.start_keyless(relation.oid);
            }
            MarkKind::High => {
                let Some(deposit) = board.take(mark.id) else {
                    return Ok(());
                };
                let target = deposit.target.clone();
                let rows = deposit.rows.unwrap_or_default();
                // Only where ranges are pruned (`DriverSettings::prune`).
                let range = deposit.prune;
                let running = range.as_ref().map(|r| &r.running[..]);
                let Some(closed) =
                    self.reconciler
                        .close(mark.id, &target.chunk_relation, rows, running)
                else {
                    return Ok(());
                };
                if deposit.finishes_keyless {
                    self.reconciler.finish_keyless(target.relation.oid);
                }
                let prune = match (range, closed.unsure) {
                    (Some(_), Some(xid)) => {
                        self.unpruned(
                            &target.name(),
                            &format!(
                                "transaction {xid}, which the stream already carried, was not \
                                 visible to the chunk's read, and its changes are not all \
                                 remembered"
                            ),
                        );
                        None
                    }
                    (Some(range), None) => Some(Pruning {
                        target: target.clone(),
                        range: PruneRange {
                            key: target.key.iter().map(|k| k.name.clone()).collect(),
                            types: target.key.iter().map(|k| k.type_name.clone()).collect(),
                            orders: target
                                .key
                                .iter()
                                .map(|k| k.order.clone().unwrap_or_default())
                                .collect(),
                            after: range.after,
                            through: range.through,
                            keep: closed
                                .keep
                                .iter()
                                .filter_map(|k| chunk::key_text(&target.in_key_order(k)))
                                .collect(),
                        },
                    }),
                    (None, _) => None,
                };
                if closed.completed > 0 {
                    tracing::debug!(table = %target.name(), rows = closed.completed,
                        "chunk rows updated without their TOASTed values inside the window, \
                         completed with the chunk's");
                }
                self.describe_once(&target.relation).await?;
                txn.snapshot = true;
                let emitted = closed.emit.len();
                self.publish_snapshot_rows(txn, &target.relation, lsn, closed.emit, repl, prune)
                    .await?;
                self.health.beat();
                txn.chunks.push(Published {
                    id: mark.id,
                    end_lsn: Lsn::default(),
                    emitted,
                    dropped: closed.dropped,
                    reread: closed.reread,
                });
            }
        }
        Ok(())
    }

    /// A schema change from pgferry's event trigger (see [`crate::ddl`]): published on the
    /// table's topic and on the node stream, in this transaction, at this place.
    async fn schema_change(
        &mut self,
        txn: &mut OpenTxn,
        content: &[u8],
        mut repl: Option<&mut stream::StreamState<'_>>,
    ) -> Result<(), CaptureError> {
        let message: crate::ddl::TriggerMessage = match serde_json::from_slice(content) {
            Ok(m) => m,
            Err(error) => {
                tracing::warn!(commit_lsn = %txn.stamp.commit_lsn(), %error,
                               "ignoring a pgferry.ddl message that pgferry's trigger did not write");
                return Ok(());
            }
        };
        let ops = crate::ddl::diff(&message);
        if message.persistence == Some(crate::ddl::Persistence::Unlogged) {
            self.made_unlogged(txn, &message).await?;
        }
        // No op, yet rows may have been rewritten: `ALTER COLUMN … TYPE <the same type> USING
        // expr` (`lower(email)`) changes values and no column's shape.
        let rewritten_in_place = ops.is_empty()
            && message.using
            && message.tag == "ALTER TABLE"
            && self.settings.resnapshot_rewritten;
        if ops.is_empty() && !rewritten_in_place {
            return Ok(());
        }
        let schema = message.old_schema.as_deref().unwrap_or(&message.schema);
        let table = message.old_table.as_deref().unwrap_or(&message.table);
        // Only tables this capture publishes (the trigger sees every table of the database).
        // A dropped table is gone from the catalog: its drop travels under FOR ALL TABLES.
        let publication = &self.settings.source.publication;
        let published = if message.tag == "DROP TABLE" {
            catalog::publishes_all_tables(&self.sql, publication).await
        } else {
            let detached_from = message
                .old_partition
                .as_ref()
                .map(|p| (p.relid, p.schema.as_str(), p.table.as_str()));
            // The DDL's transaction is decoded at its commit, which this session may see a
            // moment later: a CREATE TABLE decoded before it was visible here was taken for a
            // table outside the publication, and its rows reached no target.
            self.await_visible(txn).await?;
            catalog::publishes_table_tree(
                &self.sql,
                publication,
                (message.relid, &message.schema, &message.table),
                detached_from,
                false,
            )
            .await
        }
        .map_err(CaptureError::sql("reading the publication's tables"))?;
        if !published {
            tracing::debug!(table = %format!("{schema}.{table}"), tag = %message.tag,
                            "schema change of a table outside the publication; not published");
            return Ok(());
        }
        if rewritten_in_place {
            let name = (message.schema.as_str(), message.table.as_str());
            return self
                .resnapshot(message.relid, name, "an ALTER TABLE with USING (or run by a function) that changed no column's shape may have rewritten values (a type changed to itself USING an expression); re-snapshotting the table")
                .await;
        }
        tracing::info!(table = %format!("{schema}.{table}"), tag = %message.tag, ?ops,
                       "schema change captured");
        if creates_table(&ops) {
            txn.created
                .insert(format!("{}.{}", message.schema, message.table));
        }
        self.metrics
            .schema_changes
            .with_label_values(&[&format!("{schema}.{table}")])
            .inc();
        self.begin_if_needed(txn, repl.as_deref_mut()).await?;
        // Appliers change only tables the stream announced: announce an altered table that
        // this run has not published a change of yet (under its name before the change), and
        // the parent a partition is created in, attached to or detached from.
        if message.tag != "DROP TABLE" && !creates_table(&ops) {
            self.announce(
                txn,
                message.relid,
                (&message.schema, &message.table),
                (schema, table),
                repl.as_deref_mut(),
            )
            .await?;
        }
        for parent in ops.iter().filter_map(crate::ddl::parent_table) {
            let name = (parent.schema.as_str(), parent.table.as_str());
            self.announce(txn, parent.relid, name, name, repl.as_deref_mut())
                .await?;
        }
        let on_topic = crate::sink::kafka::encode::schema_change_record(
            &self.envelope,
            &txn.stamp,
            &message.schema,
            &message.table,
            &ops,
            &message.new,
            PgTimestamp::now().unix_millis(),
        );
        self.send(txn.ticket, &on_topic, None, repl.as_deref_mut())
            .await?;
        if (schema, table) != (message.schema.as_str(), message.table.as_str()) {
            // Renamed or moved to another schema: the old name's topic learns where its table
            // went (its records stop there), under the old name.
            let on_old_topic = crate::sink::kafka::encode::schema_change_record(
                &self.envelope,
                &txn.stamp,
                schema,
                table,
                &ops,
                &message.new,
                PgTimestamp::now().unix_millis(),
            );
            self.send(txn.ticket, &on_old_topic, None, repl.as_deref_mut())
                .await?;
        }
        let resnapshot =
            self.settings.resnapshot_rewritten && crate::ddl::rewrites_rows(&message, &ops);
        let item = node_stream::ddl_record(
            &self.envelope,
            schema,
            table,
            &ops,
            &message.applied,
            &message.settings,
            resnapshot,
        );
        self.stage(txn, &item, repl).await?;
        if resnapshot {
            let name = (message.schema.as_str(), message.table.as_str());
            self.resnapshot(message.relid, name, "the schema change gave existing rows values targets cannot compute (a volatile DEFAULT, an identity, USING); re-snapshotting the table").await?;
        }
        if message.persistence == Some(crate::ddl::Persistence::Logged) {
            self.made_logged(&message).await?;
        }
        Ok(())
    }

    /// `ALTER TABLE … SET UNLOGGED` of a table the publication would publish were it logged
    /// (`FOR ALL TABLES`, `FOR TABLES IN SCHEMA`; PostgreSQL refuses it for a table a
    /// publication lists): from now on PostgreSQL writes none of its changes to the WAL, and
    /// no change of it reaches Kafka or a target. Warned about, and counted as a schema
    /// change; `SET LOGGED` brings it back ([`Capture::made_logged`]).
    async fn made_unlogged(
        &self,
        txn: &OpenTxn,
        message: &crate::ddl::TriggerMessage,
    ) -> Result<(), CaptureError> {
        self.await_visible(txn).await?;
        let table = (
            message.relid,
            message.schema.as_str(),
            message.table.as_str(),
        );
        let would_publish = catalog::publishes_table_tree(
            &self.sql,
            &self.settings.source.publication,
            table,
            None,
            true,
        )
        .await
        .map_err(CaptureError::sql("reading the publication's tables"))?;
        if would_publish {
            let name = format!("{}.{}", message.schema, message.table);
            self.metrics
                .schema_changes
                .with_label_values(&[&name])
                .inc();
            tracing::warn!(table = %name,
                           "the table was made UNLOGGED: PostgreSQL writes none of its changes to the WAL, so none reach Kafka or any target until ALTER TABLE … SET LOGGED (which re-snapshots it on replicas)");
        }
        Ok(())
    }

    /// `ALTER TABLE … SET LOGGED`, reported as the table's creation: a table new to the
    /// publication is snapshotted as any new table is; one this slot snapshotted before it
    /// was made unlogged (its record kept: the publication was not polled meanwhile) is
    /// re-snapshotted, since its changes while unlogged reached no target. Multi-master nodes
    /// do not re-snapshot (a snapshot row never wins over a version a peer holds): they warn.
    async fn made_logged(&self, message: &crate::ddl::TriggerMessage) -> Result<(), CaptureError> {
        let name = (message.schema.as_str(), message.table.as_str());
        if !self.settings.resnapshot_rewritten {
            tracing::warn!(table = %format!("{}.{}", name.0, name.1),
                           "the table was made LOGGED again: the changes made here while it was UNLOGGED reached no other node");
            return Ok(());
        }
        let known = chunk::known_tables(&self.sql, &self.slot)
            .await
            .map_err(CaptureError::sql("reading the snapshot records"))?;
        if known.contains(&(name.0.to_owned(), name.1.to_owned())) {
            self.resnapshot(message.relid, name, "the table was made LOGGED again: its changes while it was UNLOGGED reached no target; re-snapshotting the table").await?;
        }
        Ok(())
    }

    /// Requests a snapshot of table `(schema, table)`, logging `why`, while the open
    /// transaction is decoded: before its position can be acknowledged, so a crash in between
    /// decodes it again and requests once more, never not at all. The snapshot reads the
    /// table after the transaction's commit, and its rows follow the transaction's in the
    /// stream. With the table's `oid`, the request follows the table through renames made
    /// before the driver takes it (the change is decoded after they committed).
    async fn resnapshot(
        &self,
        oid: Option<u32>,
        (schema, table): (&str, &str),
        why: &str,
    ) -> Result<(), CaptureError> {
        tracing::info!(table = %format!("{schema}.{table}"), "{why}");
        // Quoted as SQL reads it: the driver reads requests so, and a name holding a quote,
        // a dot or an outer space is otherwise another name or none.
        let name = crate::sql::qualified(schema, table);
        crate::source::snapshot::chunk::request(&self.sql, &name, oid)
            .await
            .map_err(CaptureError::sql("requesting a snapshot"))
    }

    /// A relation first seen by this run, in `txn`: whether the transaction created the table
    /// before its schema change said so (rows of `CREATE TABLE … AS` / `SELECT … INTO` come
    /// before the trigger's message). If so, its rows in this transaction are withheld (see
    /// [`OpenTxn::unborn`]) and the table is snapshotted ([`Capture::resnapshot`]). Only with
    /// DDL capture, on nodes other than multi-master ones.
    async fn born_unannounced(
        &mut self,
        txn: &mut OpenTxn,
        relation: &RelationMeta,
    ) -> Result<(), CaptureError> {
        let name = relation.qualified_name();
        if !self.settings.source.capture_ddl
            || !self.settings.resnapshot_rewritten
            || txn.echo
            || txn.created.contains(&name)
        {
            return Ok(());
        }
        let Some(xid) = txn.stamp.xid() else {
            return Ok(());
        };
        self.await_visible(txn).await?;
        let born = catalog::created_by(&self.sql, relation.oid, xid)
            .await
            .map_err(CaptureError::sql("reading when a table was created"))?;
        if born {
            txn.unborn.insert(relation.oid);
            let name = (relation.schema.as_str(), relation.table.as_str());
            self.resnapshot(Some(relation.oid), name, "rows of a table created by the same command (CREATE TABLE … AS, SELECT … INTO) come before its creation reaches targets; snapshotting the table instead").await?;
        }
        Ok(())
    }

    /// Waits until capture's SQL session sees the open transaction as committed (see
    /// [`catalog::sees_transaction`]): a moment at most; past 10 s it warns and goes on.
    async fn await_visible(&self, txn: &OpenTxn) -> Result<(), CaptureError> {
        let Some(xid) = txn.stamp.xid() else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        while !catalog::sees_transaction(&self.sql, xid)
            .await
            .map_err(CaptureError::sql("checking a transaction's visibility"))?
        {
            if started.elapsed() > std::time::Duration::from_secs(10) {
                tracing::warn!(xid, commit_lsn = %txn.stamp.commit_lsn(),
                               "a decoded transaction is still not visible to capture's session after 10 s; going on");
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Announces a table on the node stream (a relation record under `announced_as`) unless
    /// this run already did. The table is found by its oid where the trigger gave one (it may
    /// have been renamed since the change, which capture decodes later), else by `now`, its
    /// name after the change. A table that is gone is not announced.
    async fn announce(
        &mut self,
        txn: &mut OpenTxn,
        relid: Option<u32>,
        now: (&str, &str),
        announced_as: (&str, &str),
        repl: Option<&mut stream::StreamState<'_>>,
    ) -> Result<(), CaptureError> {
        let described = match relid {
            Some(oid) => snapshot::describe_table_by_oid(&self.sql, oid, now.0, now.1).await,
            None => snapshot::describe_table(&self.sql, now.0, now.1).await,
        }
        .map_err(CaptureError::sql("describing a table of a schema change"))?;
        let Some(relation) = described.filter(|r| !self.announced.contains(&r.oid)) else {
            return Ok(());
        };
        self.describe_once(&relation).await?;
        self.announce_once(txn, relation.oid, announced_as, repl)
            .await
    }

    /// Describes a snapshot table unless this run already has its schema.
    async fn describe_once(&mut self, relation: &RelationMeta) -> Result<(), CaptureError> {
        if !self.schemas.contains_key(&relation.oid) {
            let sql = self.sql.clone();
            self.relation_seen(&sql, relation).await?;
        }
        Ok(())
    }

    /// Resolves a relation's column types and warns once about tables without a key.
    async fn relation_seen(
        &mut self,
        client: &Client,
        relation: &RelationMeta,
    ) -> Result<(), CaptureError> {
        self.counters.clear();
        catalog::resolve_types(
            client,
            &mut self.types,
            relation.columns.iter().map(|c| c.type_oid),
        )
        .await
        .map_err(CaptureError::sql("resolving column types"))?;
        let types = catalog::column_types(client, relation.oid, &relation.columns)
            .await
            .map_err(CaptureError::sql("reading column types"))?;
        let columns = relation
            .columns
            .iter()
            .map(|c| {
                let (type_name, not_null) = types
                    .get(&c.name)
                    .cloned()
                    .unwrap_or(("text".into(), false));
                ColumnSchema {
                    name: c.name.clone(),
                    type_name,
                    not_null,
                    key: c.is_key,
                }
            })
            .collect();
        self.schemas.insert(relation.oid, columns);
        self.announced.remove(&relation.oid);
        if !relation.has_key() && self.warned_keyless.insert(relation.oid) {
            tracing::warn!(
                table = %relation.qualified_name(),
                "table has no primary key or replica identity: its rows are published without a \
                 Kafka key, and the source rejects UPDATE/DELETE on it. Fix: add a primary key, \
                 or ALTER TABLE ... REPLICA IDENTITY FULL"
            );
        }
        Ok(())
    }

    /// Encodes one change and hands its records to the sink: the per-table record(s), then
    /// the node-stream record (preceded by the transaction's begin marker if this is its first
    /// change). `false`: it became poison (dead-lettered) instead.
    async fn publish(
        &mut self,
        txn: &mut OpenTxn,
        change: &RowChange,
        mut repl: Option<&mut stream::StreamState<'_>>,
    ) -> Result<bool, CaptureError> {
        match self
            .publish_envelope(txn, change, None, repl.as_deref_mut())
            .await?
        {
            Some(Some(item)) => {
                self.stage(txn, &item, repl).await?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Publishes a change's table-topic records and announces its table on the node stream;
    /// returns the change's node-stream item for the caller to stage, or `None` when the
    /// change became poison (dead-lettered) instead. With `row_item_bytes` (the size of a
    /// `rows` item holding only this row), the row goes to the node stream in a `rows` item
    /// (see [`Self::publish_snapshot_rows`]) and no change item is made.
    async fn publish_envelope(
        &mut self,
        txn: &mut OpenTxn,
        change: &RowChange,
        row_item_bytes: Option<usize>,
        mut repl: Option<&mut stream::StreamState<'_>>,
    ) -> Result<Option<Option<Record>>, CaptureError> {
        let metrics = &self.metrics;
        let (captured, published) = self
            .counters
            .entry((change.relation.oid, change.op))
            .or_insert_with(|| {
                let labels = [
                    change.relation.qualified_name(),
                    change.op.code().to_owned(),
                ];
                (
                    metrics.changes_captured.with_label_values(&labels),
                    metrics.changes_published.with_label_values(&labels),
                )
            })
            .clone();
        captured.inc();
        let now_ms = PgTimestamp::now().unix_millis();
        let frame = txn.frame(&self.envelope, change);
        let encoded = match row_item_bytes {
            Some(_) => frame.encode_envelope(change, &self.types, now_ms),
            None => frame.encode(change, &self.types, now_ms),
        };
        // An update to another key (one that left a TOASTed value out, see `assemble`): the
        // node stream carries the update, the table topic a delete (and tombstone) and a
        // create, as for any change of key.
        let encoded = encoded.and_then(|mut encoded| {
            if crate::source::assemble::moves_key(change) {
                encoded.records =
                    key_move_records(txn, &self.envelope, &self.types, change, now_ms)?;
            }
            Ok(encoded)
        });
        let encoded = match encoded {
            Ok(encoded) => encoded,
            Err(e) => {
                let error = format!("cannot encode: {}", ErrorChain(&e));
                self.poison(txn, change, None, error, repl).await?;
                return Ok(None);
            }
        };
        let (node_record, node_size) = match row_item_bytes {
            Some(bytes) => (None, bytes + RECORD_OVERHEAD),
            None => {
                let item = node_stream::change_record(&self.envelope, &encoded);
                let size = record_size(&item);
                (Some(item), size)
            }
        };
        let records = encoded.records;
        let size = records
            .iter()
            .map(record_size)
            .max()
            .unwrap_or(0)
            .max(node_size);
        let limit = self.settings.kafka.max_message_bytes;
        if size > limit as usize {
            let error = format!(
                "the change is {size} bytes as a Kafka record, over kafka.max_message_bytes \
                 ({limit}); raise it (and the broker's limit) to publish rows this large"
            );
            self.poison(txn, change, Some(&records[0]), error, repl)
                .await?;
            return Ok(None);
        }
        self.begin_if_needed(txn, repl.as_deref_mut()).await?;
        for record in &records {
            // Tombstones are not changes; only envelopes count as published.
            let counter = record.value.is_some().then(|| published.clone());
            self.send(txn.ticket, record, counter, repl.as_deref_mut())
                .await?;
        }
        let relation = &change.relation;
        let name = (relation.schema.as_str(), relation.table.as_str());
        self.announce_once(txn, relation.oid, name, repl).await?;
        txn.changes += 1;
        Ok(Some(node_record))
    }

    /// Stages table `oid`'s `relation` record on the node stream under `announced_as`, once
    /// per run (appliers write only tables their stream announced).
    async fn announce_once(
        &mut self,
        txn: &mut OpenTxn,
        oid: u32,
        announced_as: (&str, &str),
        repl: Option<&mut stream::StreamState<'_>>,
    ) -> Result<(), CaptureError> {
        if self.announced.contains(&oid) {
            return Ok(());
        }
        if let Some(columns) = self.schemas.get(&oid) {
            let record = node_stream::relation_record(
                &self.envelope,
                announced_as.0,
                announced_as.1,
                columns,
            );
            self.stage(txn, &record, repl).await?;
        }
        self.announced.insert(oid);
        Ok(())
    }

    /// Publishes snapshot rows of one table (`op: "r"`, at `lsn`): each as its own envelope on
    /// the table topic, and on the node stream in `rows` items (COPY text, many rows to an
    /// item, see [`node_stream`]) unless this node is multi-master, else as one change item
    /// each. Rows that became poison are not counted in `pgferry_snapshot_rows_total`.
    /// `prune`: the chunk's key range, split among the items at their last rows' keys (an
    /// empty item carries it when no row is published).
    async fn publish_snapshot_rows(
        &mut self,
        txn: &mut OpenTxn,
        relation: &Arc<RelationMeta>,
        lsn: Lsn,
        rows: Vec<Tuple>,
        mut repl: Option<&mut stream::StreamState<'_>>,
        mut prune: Option<Pruning>,
    ) -> Result<(), CaptureError> {
        let counter = self
            .metrics
            .snapshot_rows
            .with_label_values(&[&relation.qualified_name()]);
        let read = |row: Tuple| RowChange {
            op: Op::Read,
            relation: relation.clone(),
            lsn,
            before: None,
            before_is_key_only: false,
            after: Some(row),
            version: None,
        };
        if !self.settings.compact_snapshot_rows {
            for row in rows {
                if self.publish(txn, &read(row), repl.as_deref_mut()).await? {
                    counter.inc();
                }
            }
            return Ok(());
        }
        let names: Vec<&str> = relation.columns.iter().map(|c| c.name.as_str()).collect();
        let head =
            node_stream::rows_head(&self.envelope, &relation.schema, &relation.table, &names);
        let item_bytes = |rows: usize| head.len() + rows + node_stream::ROWS_TAIL_BYTES;
        let limit = (self.settings.kafka.max_message_bytes as usize)
            .saturating_sub(RECORD_OVERHEAD)
            .min(node_stream::BUNDLE_BYTES);
        // The range's part an item covers ends at its last row's key; the last item's at the
        // chunk's end. A key that has no text form (never for a key column) ends the pruning
        // of the chunk: the item's part would have no upper bound.
        let tail = |prune: &mut Option<Pruning>, last: Option<&Tuple>| {
            let p = prune.as_mut()?;
            let through = match last {
                Some(row) => match p.target.key_text_of(row) {
                    Some(key) => Some(key),
                    None => {
                        *prune = None;
                        return None;
                    }
                },
                None => p.range.through.clone(),
            };
            let part = PruneRange {
                through: through.clone(),
                ..p.range.clone()
            };
            p.range.after = through;
            Some(node_stream::rows_tail(Some(&part)))
        };
        // Room for the range (twice: its bounds grow by a key), unless the keys that stay
        // would crowd out the rows: then the range is not pruned.
        let tail_room = prune
            .as_ref()
            .map_or(0, |p| node_stream::rows_tail(Some(&p.range)).len() * 2);
        if tail_room > limit / 2 {
            self.unpruned(
                &relation.qualified_name(),
                &format!(
                    "the keys changed while it was read ({tail_room} bytes) do not fit in a \
                     record beside its rows"
                ),
            );
            prune = None;
        }
        let limit = limit.saturating_sub(tail_room);
        let mut pending = Vec::with_capacity(limit);
        let mut line = Vec::new();
        let mut last_row: Option<Tuple> = None;
        let mut sent = false;
        for row in rows {
            line.clear();
            copy_text::push_row_json(
                &mut line,
                row.iter().map(|datum| match datum {
                    Datum::Text(bytes) => Some(&bytes[..]),
                    _ => None,
                }),
            );
            let change = read(row);
            let bytes = item_bytes(line.len());
            if self
                .publish_envelope(txn, &change, Some(bytes), repl.as_deref_mut())
                .await?
                .is_none()
            {
                // Dead-lettered: the source has the row, so a target keeps its copy.
                if let (Some(p), Some(row)) = (prune.as_mut(), change.after.as_ref()) {
                    p.range.keep.extend(p.target.key_text_of(row));
                }
                continue;
            }
            if !pending.is_empty() && item_bytes(pending.len() + line.len()) > limit {
                let tail = tail(&mut prune, last_row.as_ref());
                let item =
                    node_stream::rows_record(&self.envelope, &head, &pending, tail.as_deref());
                self.stage(txn, &item, repl.as_deref_mut()).await?;
                pending.clear();
                sent = true;
            }
            pending.extend_from_slice(&line);
            if prune.is_some() {
                last_row = change.after;
            }
            counter.inc();
        }
        if !pending.is_empty() || (prune.is_some() && !sent) {
            // A range without rows still opens the transaction on the node stream, and
            // announces its table: an empty table's range was refused by appliers as "never
            // announced" (a dead letter, the table diverged, nothing pruned).
            self.begin_if_needed(txn, repl.as_deref_mut()).await?;
            let name = (relation.schema.as_str(), relation.table.as_str());
            self.announce_once(txn, relation.oid, name, repl.as_deref_mut())
                .await?;
            let tail = tail(&mut prune, None);
            let item = node_stream::rows_record(&self.envelope, &head, &pending, tail.as_deref());
            self.stage(txn, &item, repl).await?;
        }
        Ok(())
    }

    /// A chunk of `table` published without its key range (`why`): logged and counted, since
    /// targets may keep rows the source deleted in it.
    fn unpruned(&self, table: &str, why: &str) {
        tracing::warn!(
            table,
            "a snapshot chunk's range is not pruned: {why}; rows the source \
            deleted may stay on targets in this range until the table is snapshotted again"
        );
        self.metrics
            .snapshot_ranges_unpruned
            .with_label_values(&[table])
            .inc();
    }

    /// Publishes a multi-master acknowledgement in its transaction; one whose content is not
    /// a JSON object (not written by pgferry) is logged and left out.
    async fn publish_ack(
        &mut self,
        txn: &mut OpenTxn,
        content: &[u8],
        mut repl: Option<&mut stream::StreamState<'_>>,
    ) -> Result<(), CaptureError> {
        let Some(record) = node_stream::ack_record(&self.envelope, content) else {
            tracing::warn!(commit_lsn = %txn.stamp.commit_lsn(),
                           "ignoring a pgferry.ack message that is not a JSON object");
            return Ok(());
        };
        self.begin_if_needed(txn, repl.as_deref_mut()).await?;
        self.stage(txn, &record, repl).await
    }

    /// Publishes where this node's worker applied other nodes' schema changes (see
    /// [`node_stream::after_record`]).
    async fn publish_after(
        &mut self,
        txn: &mut OpenTxn,
        content: &[u8],
        mut repl: Option<&mut stream::StreamState<'_>>,
    ) -> Result<(), CaptureError> {
        let applied: std::collections::BTreeMap<String, crate::lsn::Lsn> =
            match serde_json::from_slice(content) {
                Ok(applied) => applied,
                Err(error) => {
                    tracing::warn!(commit_lsn = %txn.stamp.commit_lsn(), %error,
                                   "ignoring a pgferry.after message that pgferry did not write");
                    return Ok(());
                }
            };
        let record = node_stream::after_record(&self.envelope, &applied);
        self.begin_if_needed(txn, repl.as_deref_mut()).await?;
        self.stage(txn, &record, repl).await
    }

    /// Sends the transaction's begin marker before its first record.
    async fn begin_if_needed(
        &mut self,
        txn: &mut OpenTxn,
        repl: Option<&mut stream::StreamState<'_>>,
    ) -> Result<(), CaptureError> {
        if !txn.begun {
            let begin = node_stream::begin_record(&self.envelope, &txn.stamp, txn.snapshot);
            self.stage(txn, &begin, repl).await?;
            txn.begun = true;
        }
        Ok(())
    }

    /// A change that cannot be published (`source.on_poison`): stop, or send a dead letter
    /// and a `skipped` marker in its place, both counted against the transaction's ticket so
    /// the slot confirms past the change only once Kafka holds the letter.
    async fn poison(
        &mut self,
        txn: &mut OpenTxn,
        change: &RowChange,
        encoded: Option<&Record>,
        error: String,
        mut repl: Option<&mut stream::StreamState<'_>>,
    ) -> Result<(), CaptureError> {
        let table = change.relation.qualified_name();
        self.metrics
            .capture_dead_letters
            .with_label_values(&[&table])
            .inc();
        if self.settings.source.on_poison == OnPoison::Stop {
            return Err(CaptureError::Poison {
                lsn: change.lsn,
                table,
                error,
            });
        }
        let topic = self.settings.kafka.dead_letter_topic();
        tracing::warn!(%table, lsn = %change.lsn, %error, %topic,
                       "dead-lettering a change capture cannot publish; replicas of this table now miss it");
        let letter = dead_letter::capture_letter(
            &self.envelope.node,
            &txn.stamp,
            change,
            encoded,
            &error,
            self.settings.kafka.max_message_bytes,
        )
        .record(&topic);
        self.send(txn.ticket, &letter, None, repl.as_deref_mut())
            .await?;
        self.begin_if_needed(txn, repl.as_deref_mut()).await?;
        let skipped = node_stream::skipped_record(
            &self.envelope,
            &change.relation.schema,
            &change.relation.table,
            change.lsn,
            &error,
        );
        self.stage(txn, &skipped, repl).await
    }

    /// Closes a transaction: its commit marker (if it published anything), then the seal that
    /// lets the watermark pass `end_lsn` once Kafka has acknowledged all of it.
    async fn finish_txn(
        &mut self,
        mut txn: OpenTxn,
        end_lsn: Lsn,
        mut repl: Option<&mut stream::StreamState<'_>>,
    ) -> Result<(), CaptureError> {
        if txn.begun {
            let commit =
                node_stream::commit_record(&self.envelope, &txn.stamp, end_lsn, txn.changes);
            self.stage(&mut txn, &commit, repl.as_deref_mut()).await?;
            self.send_bundle(&mut txn, repl).await?;
        }
        lock(&self.progress).seal(txn.ticket, end_lsn);
        for mut chunk in txn.chunks.drain(..) {
            chunk.end_lsn = end_lsn;
            // The driver is gone only when the run is ending.
            let _ = self.snapshots.published.send(chunk);
        }
        Ok(())
    }

    /// Adds a node-stream item to the transaction's bundle, sending the bundle first when the
    /// item would not fit in its record (see [`node_stream::Bundle`]).
    async fn stage(
        &mut self,
        txn: &mut OpenTxn,
        item: &Record,
        repl: Option<&mut stream::StreamState<'_>>,
    ) -> Result<(), CaptureError> {
        let limit =
            (self.settings.kafka.max_message_bytes as usize).saturating_sub(RECORD_OVERHEAD);
        if !txn.bundle.fits(item, limit) {
            self.send_bundle(txn, repl).await?;
        }
        txn.bundle.push(item);
        Ok(())
    }

    /// Sends the node-stream items the transaction holds as one record.
    async fn send_bundle(
        &mut self,
        txn: &mut OpenTxn,
        repl: Option<&mut stream::StreamState<'_>>,
    ) -> Result<(), CaptureError> {
        match txn.bundle.take(&self.envelope) {
            Some(record) => self.send(txn.ticket, &record, None, repl).await,
            None => Ok(()),
        }
    }

    /// Offers one record to the producer until it is queued. While the queue is full, keeps
    /// the replication connection alive with status updates; never drops the record.
    async fn send(
        &mut self,
        ticket: Ticket,
        record: &Record,
        counter: Option<IntCounter>,
        mut repl: Option<&mut stream::StreamState<'_>>,
    ) -> Result<(), CaptureError> {
        while self.sink.try_send(ticket, record, counter.clone()).await? == Queued::No {
            if let Some(state) = repl.as_deref_mut() {
                state.keep_alive(&self.progress, &self.metrics).await?;
            }
            tokio::time::sleep(QUEUE_FULL_BACKOFF).await;
        }
        Ok(())
    }
}

/// Bytes a record occupies against librdkafka's `message.max.bytes` (payload, key, and
/// librdkafka's per-message overhead).
fn record_size(record: &Record) -> usize {
    record.value.as_ref().map_or(0, Vec::len)
        + record.key.as_ref().map_or(0, Vec::len)
        + RECORD_OVERHEAD
}

/// librdkafka's per-message overhead, and room for a node-stream record's key.
const RECORD_OVERHEAD: usize = 512;

/// A source transaction being published.
pub(super) struct OpenTxn {
    stamp: TxnStamp,
    /// Snapshot chunks published in this transaction, reported to the driver at its end.
    chunks: Vec<Published>,
    ticket: Ticket,
    snapshot: bool,
    begun: bool,
    changes: u64,
    /// Applied by pgferry (its origin is one of pgferry's): not published again.
    pub(super) echo: bool,
    /// Multi-master versions stamped and not yet paired with their row change.
    versions: versions::Pending,
    /// Node-stream items not yet sent.
    bundle: node_stream::Bundle,
    /// The frames of this transaction's changes so far, by relation and op, the latest
    /// last (a transaction touches few tables, and a snapshot's rows come table by table); a
    /// new relation message replaces the relation, and so misses here.
    frames: Vec<(Arc<RelationMeta>, Frame)>,
    /// Tables this transaction's schema changes created (`schema.table`), so far.
    created: HashSet<String>,
    /// Tables this transaction created whose rows came before their creation's schema change
    /// (`CREATE TABLE … AS`, `SELECT … INTO`: the trigger fires once the rows are written):
    /// targets would get rows of a table they do not have yet, so these rows are not
    /// published and the table is snapshotted instead ([`Capture::born_unannounced`]).
    unborn: HashSet<u32>,
    /// Some of its changes were not given to the reconciler (no snapshot was running).
    pub(super) unreconciled: bool,
}

/// The table-topic records of an update that moves its row to another key: those of a
/// delete of the old key and a create of the new one.
fn key_move_records(
    txn: &mut OpenTxn,
    envelope: &EnvelopeSource,
    types: &TypeRegistry,
    change: &RowChange,
    now_ms: i64,
) -> Result<Vec<Record>, crate::sink::kafka::encode::EncodeError> {
    let parts = [
        RowChange {
            op: Op::Delete,
            after: None,
            ..change.clone()
        },
        RowChange {
            op: Op::Create,
            before: None,
            before_is_key_only: false,
            ..change.clone()
        },
    ];
    let mut records = Vec::new();
    for part in &parts {
        records.extend(
            txn.frame(envelope, part)
                .encode_envelope(part, types, now_ms)?
                .records,
        );
    }
    Ok(records)
}

impl OpenTxn {
    pub(super) fn new(stamp: TxnStamp, ticket: Ticket, snapshot: bool) -> Self {
        OpenTxn {
            stamp,
            chunks: Vec::new(),
            ticket,
            snapshot,
            begun: false,
            changes: 0,
            echo: false,
            versions: versions::Pending::default(),
            bundle: node_stream::Bundle::default(),
            frames: Vec::new(),
            created: HashSet::new(),
            unborn: HashSet::new(),
            unreconciled: false,
        }
    }

    /// The frame of `change`, written on its first use in the transaction.
    fn frame(&mut self, source: &EnvelopeSource, change: &RowChange) -> &Frame {
        let found = self
            .frames
            .iter()
            .rposition(|(r, f)| Arc::ptr_eq(r, &change.relation) && f.op() == change.op);
        let i = match found {
            Some(i) => i,
            None => {
                let frame = Frame::new(source, &self.stamp, &change.relation, change.op);
                self.frames.push((change.relation.clone(), frame));
                self.frames.len() - 1
            }
        };
        &self.frames[i].1
    }
}

//! One apply worker: a source node's stream into one target database.
//!
//! Reads `<prefix>.__node.<node>` from the offset stored in the target, frames it into source
//! transactions ([`Framer`]), and applies whole source transactions in commit order, several
//! per target transaction when they arrive back to back. Statements are pipelined. The
//! progress row and the replication origin are written in the same target transaction as the
//! data, so a crash at any point neither loses nor repeats a change.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesOrdered, StreamExt};
use futures_util::FutureExt;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;
use serde_json::value::RawValue;
use tokio_postgres::{Client, Statement};
use tokio_util::sync::CancellationToken;

use super::error::ApplyError;
use super::multimaster;
use super::params::json_to_text;
use super::sql;
use super::stream::{parse_framed, ChangeItem, Framer, RelationItem, RowImage, Step};
use super::target::{self, param_kind, TargetTable, TextParam};
use crate::config::{ApplyConfig, ApplyMode, KafkaConfig, OnBadMessage, TargetConfig};
use crate::event::Op;
use crate::lsn::Lsn;
use crate::pgtime::PgTimestamp;
use crate::sink::kafka::node_stream::node_stream_topic;
use crate::sink::kafka::producer::{client_config, create_topic};
use crate::telemetry::{Health, Metrics};

mod lww;

/// Statements in flight before the worker waits for their results.
const PIPELINE_DEPTH: usize = 512;
/// How often an idle worker wakes to report liveness.
const IDLE_BEAT: Duration = Duration::from_secs(1);

type Pending<'a> = Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'a>>;

/// What one worker needs.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Source node whose stream is applied.
    pub node: String,
    /// This node's own id (`node_id`): the node of locally written rows in multi-master.
    pub local_node: String,
    /// The target.
    pub target: TargetConfig,
    /// `apply:`.
    pub apply: ApplyConfig,
    /// `kafka:`.
    pub kafka: KafkaConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct StatementKey {
    schema: String,
    table: String,
    kind: &'static str,
    columns: Vec<String>,
}

/// A source transaction boundary that is complete in the open target transaction.
#[derive(Debug, Clone, Copy)]
struct Completed {
    commit_lsn: Lsn,
    commit_ts_us: i64,
    offset: i64,
}

struct Worker {
    settings: WorkerSettings,
    metrics: Arc<Metrics>,
    health: Health,
    dead_letters: FutureProducer,
    dead_letter_topic: String,
    /// Target tables by `schema.table` (`None`: missing on the target).
    tables: HashMap<String, Option<TargetTable>>,
    /// Applied-changes counters by `schema.table`, indexed by op.
    counters: HashMap<String, [Option<prometheus::IntCounter>; 5]>,
    statements: HashMap<StatementKey, Statement>,
    /// Committed position: what the target durably holds.
    committed: target::Progress,
    in_target_txn: bool,
    last_completed: Option<Completed>,
    batch_changes: u64,
    batch_txns: u64,
    /// When the open target transaction began.
    batch_started: std::time::Instant,
    /// Multi-master state; `None` in replica mode.
    lww: Option<lww::LwwState>,
}

/// Runs one worker until shutdown or an error.
pub async fn run(
    settings: WorkerSettings,
    metrics: Arc<Metrics>,
    health: Health,
    shutdown: CancellationToken,
) -> Result<(), ApplyError> {
    let app_name = format!("pgferry-apply-{}", settings.node);
    let client = crate::source::catalog::connect(settings.target.url.config(), &app_name)
        .await
        .map_err(ApplyError::sql("connecting to the target"))?;
    target::prepare_session(&client, &settings.node, settings.target.url.dbname())
        .await
        .map_err(ApplyError::sql(
            "preparing the apply session (needs superuser or replication origin privileges)",
        ))?;
    let lww = if settings.apply.mode == ApplyMode::MultiMaster {
        client
            .batch_execute(multimaster::SESSION_SETTINGS)
            .await
            .map_err(ApplyError::sql("preparing the multi-master session"))?;
        Some(lww::LwwState {
            local_node: settings.local_node.clone(),
            origins: multimaster::origin_nodes(&client)
                .await
                .map_err(ApplyError::sql("reading pgferry.origins"))?,
            conflicts: Vec::new(),
            clock_seen_us: 0,
        })
    } else {
        None
    };
    let committed = target::read_progress(&client, &settings.node)
        .await
        .map_err(ApplyError::sql("reading pgferry.apply_progress"))?
        .unwrap_or(target::Progress {
            next_offset: 0,
            commit_lsn: Lsn::ZERO,
        });
    let topic = node_stream_topic(&settings.kafka.topic_prefix, &settings.node);
    let mut consumer_config = client_config(&settings.kafka);
    if !settings
        .kafka
        .properties
        .contains_key("queued.max.messages.kbytes")
    {
        // librdkafka prefetches up to 64 MB per partition by default; a sidecar wants less.
        consumer_config.set("queued.max.messages.kbytes", "16384");
    }
    let consumer: StreamConsumer = consumer_config
        .set("group.id", format!("pgferry-apply-{}", settings.node))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("fetch.wait.max.ms", "50")
        .create()
        .map_err(ApplyError::Kafka)?;
    let dead_letters: FutureProducer = client_config(&settings.kafka)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .map_err(ApplyError::Kafka)?;
    let dead_letter_topic = settings
        .apply
        .dead_letter_topic
        .clone()
        .unwrap_or_else(|| format!("{}.__dead_letter", settings.kafka.topic_prefix));
    if settings.kafka.create_topics {
        for t in [&topic, &dead_letter_topic] {
            create_topic(&settings.kafka, t, 1)
                .await
                .map_err(ApplyError::Kafka)?;
        }
    }
    let mut worker = Worker {
        settings,
        metrics,
        health,
        dead_letters,
        dead_letter_topic,
        tables: HashMap::new(),
        counters: HashMap::new(),
        statements: HashMap::new(),
        committed,
        in_target_txn: false,
        last_completed: None,
        batch_changes: 0,
        batch_txns: 0,
        batch_started: std::time::Instant::now(),
        lww,
    };
    tracing::info!(node = %worker.settings.node, target = %worker.settings.target.url.display_target(),
                   offset = committed.next_offset, applied = %committed.commit_lsn, "applying");
    let mut framer = Framer::new(committed.commit_lsn);
    worker.assign(&consumer, &topic)?;
    let component = format!(
        "apply:{}:{}",
        worker.settings.node,
        worker.settings.target.url.display_target()
    );
    worker.health.set_ready(&component, true);
    let result = worker
        .apply_loop(&client, &consumer, &topic, &mut framer, &shutdown)
        .await;
    worker.health.set_ready(&component, false);
    result
}

impl Worker {
    fn assign(&self, consumer: &StreamConsumer, topic: &str) -> Result<(), ApplyError> {
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(topic, 0, Offset::Offset(self.committed.next_offset))
            .map_err(ApplyError::Kafka)?;
        consumer.assign(&list).map_err(ApplyError::Kafka)
    }

    async fn apply_loop(
        &mut self,
        client: &Client,
        consumer: &StreamConsumer,
        topic: &str,
        framer: &mut Framer,
        shutdown: &CancellationToken,
    ) -> Result<(), ApplyError> {
        let mut pending: InFlight<'_> = InFlight::default();
        loop {
            self.health.beat();
            // Shutdown: stop reading between source transactions and commit what is whole; a
            // transaction half read is finished first (it was committed at the source, and
            // the rest is already in Kafka).
            if shutdown.is_cancelled() && !framer.is_open() {
                self.commit_if_between_transactions(client, &mut pending, framer)
                    .await?;
                return Ok(());
            }
            // Take what is already fetched without arming a timer; only when the stream is
            // empty, commit the whole transactions we hold and wait.
            let ready = consumer.recv().now_or_never();
            let message = match ready {
                Some(m) => Some(m),
                None => {
                    self.commit_if_between_transactions(client, &mut pending, framer)
                        .await?;
                    tokio::select! {
                        _ = shutdown.cancelled() => None,
                        m = consumer.recv() => Some(m),
                        _ = tokio::time::sleep(IDLE_BEAT) => continue,
                    }
                }
            };
            let message = match message {
                Some(Ok(m)) => m,
                Some(Err(e)) => return Err(ApplyError::Kafka(e)),
                None => {
                    self.commit_if_between_transactions(client, &mut pending, framer)
                        .await?;
                    return Ok(());
                }
            };
            let offset = message.offset();
            let (run, item) = match parse_framed(message.payload()) {
                Ok(framed) => framed,
                Err(e) => {
                    self.bad_message(&message, &e.to_string()).await?;
                    continue;
                }
            };
            match framer.step_run(offset, run, item) {
                Step::Ignore => {}
                Step::Stray(reason) => {
                    tracing::error!(node = %self.settings.node, offset, reason,
                                    "node stream record out of place");
                    self.bad_message(&message, reason).await?;
                }
                Step::Relation(relation) => {
                    if self.settings.apply.create_tables {
                        self.create_if_missing(client, &mut pending, &message, &relation)
                            .await?;
                    }
                }
                Step::Start(_) => {
                    if !self.in_target_txn {
                        self.batch_started = std::time::Instant::now();
                        pending.send(Box::pin(async move {
                            client.batch_execute("BEGIN").await.map(|_| 0)
                        }));
                        self.in_target_txn = true;
                    }
                }
                Step::Apply(change) if self.lww.is_some() => {
                    let applied = self
                        .apply_change_lww(
                            client,
                            &mut pending,
                            &message,
                            change,
                            framer.open_commit_ts_us().unwrap_or_default(),
                        )
                        .await;
                    if let Err(ApplyError::Sql { source, .. }) = &applied {
                        if is_lock_conflict(source) {
                            // A deadlock or serialisation failure with local writers or another
                            // worker: undo the open transaction and replay it.
                            tracing::info!(node = %self.settings.node, error = %source,
                                           "lock conflict with a concurrent writer; replaying the transaction");
                            drop(message);
                            self.rollback(client, &mut pending).await?;
                            *framer = Framer::new(self.committed.commit_lsn);
                            self.assign(consumer, topic)?;
                            continue;
                        }
                    }
                    applied?;
                }
                Step::Apply(change) => {
                    self.apply_change(client, &mut pending, &message, change)
                        .await?;
                    if pending.len() >= PIPELINE_DEPTH {
                        pending
                            .wait_below(PIPELINE_DEPTH / 2)
                            .await
                            .map_err(ApplyError::sql("applying changes"))?;
                    }
                }
                Step::End(commit) => {
                    self.batch_txns += 1;
                    self.last_completed = Some(Completed {
                        commit_lsn: commit.commit_lsn,
                        commit_ts_us: framer.commit_ts_us(),
                        offset,
                    });
                    // Multi-master commits each source transaction alone: the commit carries
                    // its origin timestamp, which is every row's version.
                    if self.lww.is_some()
                        || self.batch_changes >= u64::from(self.settings.apply.batch_max_changes)
                    {
                        self.commit_batch(client, &mut pending).await?;
                    }
                }
                Step::Orphaned(begin_offset) => {
                    tracing::warn!(node = %self.settings.node, offset = begin_offset,
                                   "transaction cut off by a capture restart; replaying from the last commit");
                    drop(message);
                    self.rollback(client, &mut pending).await?;
                    framer.orphan(begin_offset, self.committed.commit_lsn);
                    self.assign(consumer, topic)?;
                }
            }
        }
    }

    /// Commits the whole source transactions held in the open target transaction, unless a
    /// source transaction is still half applied in it (committing then would expose half of it).
    async fn commit_if_between_transactions<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
        framer: &Framer,
    ) -> Result<(), ApplyError> {
        if framer.is_open() {
            return Ok(());
        }
        self.commit_batch(client, pending).await
    }

    async fn rollback(
        &mut self,
        client: &Client,
        pending: &mut InFlight<'_>,
    ) -> Result<(), ApplyError> {
        let _ = pending.drain().await;
        if self.in_target_txn {
            client
                .batch_execute("ROLLBACK")
                .await
                .map_err(ApplyError::sql("rolling back"))?;
        }
        self.in_target_txn = false;
        self.last_completed = None;
        if let Some(lww) = &mut self.lww {
            lww.conflicts.clear();
        }
        self.batch_changes = 0;
        self.batch_txns = 0;
        // A rolled-back transaction may have created tables: forget what we learned in it.
        self.tables.clear();
        self.statements.clear();
        Ok(())
    }

    /// `apply.create_tables`: creates a table the target lacks, in the open target
    /// transaction, from the source's announced schema.
    async fn create_if_missing<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
        message: &BorrowedMessage<'_>,
        relation: &RelationItem,
    ) -> Result<(), ApplyError> {
        let qualified = format!("{}.{}", relation.schema, relation.table);
        let wanted = &self.settings.apply.tables;
        if !wanted.is_empty() && !wanted.contains(&qualified) {
            return Ok(());
        }
        let names = (relation.schema.as_str(), relation.table.as_str());
        if self
            .table(client, &qualified, names, false)
            .await?
            .is_some()
        {
            return Ok(());
        }
        let columns: Vec<(&str, &str, bool)> = relation
            .columns
            .iter()
            .map(|c| (c.name.as_str(), c.type_name.as_str(), c.not_null))
            .collect();
        let key: Vec<&str> = relation
            .columns
            .iter()
            .filter(|c| c.key)
            .map(|c| c.name.as_str())
            .collect();
        // A table whose whole row is its identity (REPLICA IDENTITY FULL, no primary key) gets
        // no primary key: duplicates are legal there.
        let key = if key.len() == relation.columns.len() && key.len() > 1 {
            Vec::new()
        } else {
            key
        };
        let Some(ddl) = sql::create_table(&relation.schema, &relation.table, &columns, &key) else {
            return self
                .bad_message(
                    message,
                    &format!("relation record for {qualified} has an unacceptable type name"),
                )
                .await;
        };
        tracing::info!(table = %qualified, "creating the table on the target (apply.create_tables)");
        pending.send(Box::pin(async move {
            client.batch_execute(&ddl).await.map(|_| 0)
        }));
        self.tables.remove(&qualified);
        Ok(())
    }

    /// Stamps the origin, records progress, commits: all in the target transaction that
    /// holds the data.
    async fn commit_batch<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
    ) -> Result<(), ApplyError> {
        let Some(done) = self.last_completed.take() else {
            return Ok(());
        };
        if self.lww.is_some() {
            pending
                .drain()
                .await
                .map_err(ApplyError::sql("applying changes"))?;
            self.wait_for_clock(client, done.commit_ts_us).await?;
        }
        let lsn = done.commit_lsn.to_string();
        let ts = PgTimestamp::from_unix_micros(done.commit_ts_us).to_rfc3339();
        let next = (done.offset + 1).to_string();
        let node = self.settings.node.clone();
        pending.send(Box::pin(async move {
            client
                .execute(target::ORIGIN_XACT_SETUP, &[&lsn, &ts])
                .await?;
            client
                .execute(target::RECORD_PROGRESS, &[&node, &next, &lsn])
                .await?;
            client.batch_execute("COMMIT").await.map(|_| 0)
        }));
        pending
            .drain()
            .await
            .map_err(ApplyError::sql("committing applied transactions"))?;
        self.in_target_txn = false;
        self.committed = target::Progress {
            next_offset: done.offset + 1,
            commit_lsn: done.commit_lsn,
        };
        self.count_conflicts();
        self.metrics.apply_transactions.inc_by(self.batch_txns);
        self.metrics.apply_batches.inc();
        self.metrics
            .apply_batch_changes
            .observe(self.batch_changes as f64);
        self.metrics
            .apply_batch_duration
            .observe(self.batch_started.elapsed().as_secs_f64());
        self.metrics
            .apply_lag_seconds
            .set((PgTimestamp::now().unix_micros() - done.commit_ts_us) as f64 / 1e6);
        self.batch_changes = 0;
        self.batch_txns = 0;
        Ok(())
    }

    async fn table(
        &mut self,
        client: &Client,
        qualified: &str,
        (schema, table): (&str, &str),
        refresh: bool,
    ) -> Result<Option<TargetTable>, ApplyError> {
        if refresh || !self.tables.contains_key(qualified) {
            let described = target::describe(client, schema, table)
                .await
                .map_err(ApplyError::sql("describing a target table"))?;
            self.tables.insert(qualified.to_owned(), described);
        }
        Ok(self.tables.get(qualified).cloned().flatten())
    }

    fn count_applied(&mut self, qualified: &str, op: Op) {
        let slot = match op {
            Op::Read => 0,
            Op::Create => 1,
            Op::Update => 2,
            Op::Delete => 3,
            Op::Truncate => 4,
        };
        let metrics = &self.metrics;
        let counters = self.counters.entry(qualified.to_owned()).or_default();
        counters[slot]
            .get_or_insert_with(|| {
                metrics
                    .apply_changes
                    .with_label_values(&[qualified, op.code()])
            })
            .inc();
    }

    async fn statement(
        &mut self,
        client: &Client,
        key: StatementKey,
        text: impl FnOnce() -> String,
    ) -> Result<Statement, ApplyError> {
        if let Some(s) = self.statements.get(&key) {
            return Ok(s.clone());
        }
        let stmt = client
            .prepare(&text())
            .await
            .map_err(ApplyError::sql("preparing an apply statement"))?;
        self.statements.insert(key, stmt.clone());
        Ok(stmt)
    }

    /// The target table a change goes to, with every column the change names. `None`: the
    /// table is filtered out by `apply.tables`, or missing and the record was dead-lettered.
    async fn target_table(
        &mut self,
        client: &Client,
        message: &BorrowedMessage<'_>,
        change: &ChangeItem,
        qualified: &str,
    ) -> Result<Option<TargetTable>, ApplyError> {
        let wanted = &self.settings.apply.tables;
        if !wanted.is_empty() && !wanted.iter().any(|t| t == qualified) {
            return Ok(None);
        }
        let names = (change.schema.as_str(), change.table.as_str());
        let Some(mut table) = self.table(client, qualified, names, false).await? else {
            self.bad_message(
                message,
                &format!("table {qualified} does not exist on the target"),
            )
            .await?;
            return Ok(None);
        };
        let row_columns = |m: &Option<RowImage>| -> Vec<String> {
            m.as_ref()
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default()
        };
        let mut used = row_columns(&change.after);
        used.extend(row_columns(&change.before));
        if let Some(missing) = used.iter().find(|c| !table.columns.contains(c)) {
            // The source may have gained a column: look again before giving up.
            table = self
                .table(client, qualified, names, true)
                .await?
                .unwrap_or(table);
            if !table.columns.contains(missing) {
                return Err(ApplyError::ColumnMissing {
                    table: qualified.to_owned(),
                    column: missing.clone(),
                });
            }
        }
        Ok(Some(table))
    }

    /// Renders JSON values as text parameters for a prepared statement, by the statement's
    /// parameter types. `json_nulls`: columns whose JSON `null` is a json value, not SQL NULL.
    fn render_params(
        types: &[tokio_postgres::types::Type],
        columns: &[String],
        values: &[Box<RawValue>],
        json_nulls: &[String],
        qualified: &str,
    ) -> Result<Vec<TextParam>, String> {
        let mut params = Vec::with_capacity(values.len());
        for ((value, column), ty) in values.iter().zip(columns).zip(types) {
            if value.get() == "null" && json_nulls.contains(column) {
                params.push(TextParam(Some("null".to_owned())));
                continue;
            }
            match json_to_text(&param_kind(ty), value) {
                Ok(text) => params.push(TextParam(text)),
                Err(e) => return Err(format!("{qualified}: {e}")),
            }
        }
        Ok(params)
    }

    async fn apply_change<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
        message: &BorrowedMessage<'_>,
        change: Box<ChangeItem>,
    ) -> Result<(), ApplyError> {
        let change = *change;
        let qualified = format!("{}.{}", change.schema, change.table);
        let Some(table) = self
            .target_table(client, message, &change, &qualified)
            .await?
        else {
            return Ok(());
        };
        let key: Vec<&str> = table.key.iter().map(String::as_str).collect();
        // Which image each bound value comes from, to honour its json_null list.
        let mut from_before = false;
        let (kind, columns, values): (&'static str, Vec<String>, Vec<Box<RawValue>>) = match change.op {
            Op::Create | Op::Read => {
                let after = change.after.unwrap_or_default();
                ("upsert", after.keys().cloned().collect(), after.into_iter().map(|(_, v)| v).collect())
            }
            Op::Update if !key.is_empty() => {
                let after = change.after.unwrap_or_default();
                let key_source = |k: &str| {
                    after.get(k).or_else(|| change.before.as_ref().and_then(|b| b.get(k))).map(RawValue::to_owned)
                };
                let key_values: Option<Vec<Box<RawValue>>> = key.iter().map(|k| key_source(k)).collect();
                let Some(key_values) = key_values else {
                    return self.bad_message(message, &format!("update on {qualified} lacks key columns")).await;
                };
                let sets: Vec<(String, Box<RawValue>)> = after.into_iter().filter(|(c, _)| !table.key.contains(c)).collect();
                if sets.is_empty() {
                    return Ok(());
                }
                let mut columns: Vec<String> = sets.iter().map(|(c, _)| c.clone()).collect();
                let mut values: Vec<Box<RawValue>> = sets.into_iter().map(|(_, v)| v).collect();
                columns.extend(table.key.iter().cloned());
                values.extend(key_values);
                ("update", columns, values)
            }
            Op::Delete if !key.is_empty() => {
                let before = change.before.unwrap_or_default();
                let values: Option<Vec<Box<RawValue>>> = key.iter().map(|k| before.get(k).map(RawValue::to_owned)).collect();
                let Some(values) = values else {
                    return self.bad_message(message, &format!("delete on {qualified} lacks key columns")).await;
                };
                from_before = true;
                ("delete", table.key.clone(), values)
            }
            Op::Delete => match change.before {
                Some(before) if before.len() == table.columns.len() => {
                    from_before = true;
                    ("delete_matching", before.keys().cloned().collect(), before.into_iter().map(|(_, v)| v).collect())
                }
                _ => {
                    return self
                        .bad_message(message, &format!("delete on {qualified}: the target has no primary key and the change no full old row"))
                        .await
                }
            },
            Op::Update => {
                return self
                    .bad_message(message, &format!("update on {qualified}: the target table has no primary key"))
                    .await
            }
            Op::Truncate => ("truncate", Vec::new(), Vec::new()),
        };
        let json_nulls = if from_before {
            &change.json_null_before
        } else {
            &change.json_null_after
        };
        let (schema, name) = (change.schema.clone(), change.table.clone());
        let cols: Vec<&str> = columns.iter().map(String::as_str).collect();
        let text = || match kind {
            "upsert" => sql::upsert(&schema, &name, &cols, &key),
            "update" => sql::update(&schema, &name, &cols[..cols.len() - key.len()], &key),
            "delete" => sql::delete(&schema, &name, &key),
            "delete_matching" => sql::delete_one_matching(&schema, &name, &cols),
            _ => sql::truncate(&schema, &name),
        };
        let stmt_key = StatementKey {
            schema: change.schema.clone(),
            table: change.table.clone(),
            kind,
            columns: columns.clone(),
        };
        let stmt = self.statement(client, stmt_key, text).await?;
        let params =
            match Self::render_params(stmt.params(), &columns, &values, json_nulls, &qualified) {
                Ok(params) => params,
                Err(reason) => return self.bad_message(message, &reason).await,
            };
        pending.send(Box::pin(
            async move { client.execute_raw(&stmt, params).await },
        ));
        self.batch_changes += 1;
        self.count_applied(&qualified, change.op);
        Ok(())
    }

    /// A record that cannot be applied: to the dead-letter topic (durably, before the batch
    /// that skips it can commit), or stop, as configured. Never silently dropped.
    async fn bad_message(
        &mut self,
        message: &BorrowedMessage<'_>,
        reason: &str,
    ) -> Result<(), ApplyError> {
        self.metrics.apply_dead_letters.inc();
        let location = format!(
            "{}[{}]@{}",
            message.topic(),
            message.partition(),
            message.offset()
        );
        if self.settings.apply.on_bad_message == OnBadMessage::Stop {
            return Err(ApplyError::BadMessage {
                location,
                reason: reason.to_owned(),
            });
        }
        tracing::warn!(%location, %reason, topic = %self.dead_letter_topic, "dead-lettering a record");
        let body = json!({
            "reason": reason,
            "source_topic": message.topic(),
            "partition": message.partition(),
            "offset": message.offset(),
            "node": self.settings.node,
            "payload": message.payload().map(|p| String::from_utf8_lossy(p).into_owned()),
        })
        .to_string();
        let record = FutureRecord::<[u8], str>::to(&self.dead_letter_topic).payload(&body);
        self.dead_letters
            .send(record, Duration::from_secs(60))
            .await
            .map_err(|(e, _)| ApplyError::Kafka(e))?;
        Ok(())
    }
}

/// Deadlock or serialisation failure: the transaction can simply be replayed.
fn is_lock_conflict(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED
            || *c == tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE
    })
}

/// Statements sent to the target and not yet answered, in send order. Each is polled as soon
/// as it is added, which sends it: the connection stays busy while the worker decodes the next
/// records, instead of alternating send-a-batch / wait-for-all.
#[derive(Default)]
struct InFlight<'a> {
    queue: FuturesOrdered<Pending<'a>>,
    /// The first error seen while collecting results early.
    failed: Option<tokio_postgres::Error>,
}

impl<'a> InFlight<'a> {
    fn len(&self) -> usize {
        self.queue.len()
    }

    /// Sends a statement (polls it once) and collects any results already back.
    fn send(&mut self, statement: Pending<'a>) {
        self.queue.push_back(statement);
        self.collect_ready();
    }

    fn collect_ready(&mut self) {
        while let Some(Some(result)) = self.queue.next().now_or_never() {
            if let Err(e) = result {
                self.failed.get_or_insert(e);
            }
        }
    }

    /// Waits until fewer than `limit` statements are in flight.
    async fn wait_below(&mut self, limit: usize) -> Result<(), tokio_postgres::Error> {
        while self.queue.len() >= limit {
            if let Some(Err(e)) = self.queue.next().await {
                self.failed.get_or_insert(e);
            }
        }
        self.take_error()
    }

    /// Waits for every statement; returns the first error.
    async fn drain(&mut self) -> Result<(), tokio_postgres::Error> {
        while let Some(result) = self.queue.next().await {
            if let Err(e) = result {
                self.failed.get_or_insert(e);
            }
        }
        self.take_error()
    }

    fn take_error(&mut self) -> Result<(), tokio_postgres::Error> {
        self.failed.take().map_or(Ok(()), Err)
    }
}

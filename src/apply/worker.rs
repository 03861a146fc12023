//! One apply worker: a source node's stream into one target database.
//!
//! Reads `<prefix>.__node.<node>` from the offset stored in the target, frames it into source
//! transactions ([`Framer`]), and applies whole source transactions in commit order, several
//! per target transaction when they arrive back to back. Statements are pipelined. The
//! progress row and the replication origin are written in the same target transaction as the
//! data, so a crash at any point neither loses nor repeats a change.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio_postgres::{Client, Statement};
use tokio_util::sync::CancellationToken;

use self::in_flight::InFlight;
use super::admit::{self, Admission};
use super::contention::Contention;
use super::copy;
use super::dead_letters::{self, StoredDeadLetter};
use super::error::ApplyError;
use super::multimaster;
use super::params::json_to_text;
use super::plan::{self, Coalescer, RowChange, RowWrite, StatementKind, Waves};
use super::sql;
use super::stream::{
    parse_framed, ChangeItem, Framer, RelationItem, RowsItem, SkippedItem, Step, StreamItem,
    WritesColumns,
};
use super::target::{self, param_kind, TargetTable, TextParam};
use crate::config::{ApplyConfig, ApplyMode, KafkaConfig, OnPoison, TargetConfig};
use crate::error::ErrorChain;
use crate::event::Op;
use crate::kafka::{client_config, create_topics, set_default};
use crate::lsn::Lsn;
use crate::pgtime::PgTimestamp;
use crate::sink::kafka::dead_letter::{self, DeadLetter};
use crate::sink::kafka::node_stream::{items_of, node_stream_topic};
use crate::telemetry::{Health, Metrics};
use crate::value::copy_text;

mod holds;
mod horizon;
mod in_flight;
mod lww;
mod lww_rows;
mod retype;

/// Statements in flight before the worker waits for their results.
const PIPELINE_DEPTH: usize = 512;
/// Rows a set batch gathers before it is sent (a multi-row statement each group). 5,000 (the
/// default `apply.batch_max_changes`) rather than 2,000: a same-session A/B of the
/// multi-master catch-up gave 15–17k against 13–14k txn/s. Multi-master batches hold their
/// row locks until the first source-commit boundary after this many keys were written in the
/// target transaction, so local writers of those keys wait for at most that much work.
const ROWS_PER_STATEMENT: usize = 5000;
/// The lock timeout of every connection of a worker with lanes (see `Worker::open_lanes`).
const LANE_LOCK_TIMEOUT: &str = "SET lock_timeout = '2s'";
/// How long a schema change waits for its lock on a target table before the transaction is
/// replayed (a worker with lanes otherwise waits 2 s, see [`LANE_LOCK_TIMEOUT`]).
const DDL_LOCK_TIMEOUT: &str = "60s";
/// How often a worker re-reads which of its target tables have unresolved dead letters.
const DIVERGED_RECHECK: Duration = Duration::from_secs(10);
/// How often a worker tries again the letters of a table parked behind a schema change the
/// target refused ([`Worker::unpark_due`]).
const PARK_RETRY: Duration = Duration::from_secs(5);
/// How often an idle worker wakes to report liveness.
const IDLE_BEAT: Duration = Duration::from_secs(1);
/// How long a worker waits without a record, while the broker says there are more, before it
/// calls its consumer stuck.
const STALL_AFTER: Duration = Duration::from_secs(30);

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
    /// Lock contention, shared by the workers of the same target.
    pub contention: Arc<Contention>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct StatementKey {
    schema: String,
    table: String,
    kind: StatementKind,
    columns: Vec<String>,
    /// Old-image columns the statement compares with the live row, where that is apart from
    /// `columns` ([`StatementKind::LwwCleanUpdateRows`]); empty otherwise.
    compared: Vec<String>,
    /// Columns the statement sets to their DEFAULT (multi-master writes of remote rows, see
    /// [`crate::apply::sql::WholeRow`]); empty otherwise.
    defaults: Vec<String>,
}

impl StatementKey {
    /// The key of a statement that writes or reads `columns` of a table, comparing and
    /// defaulting none besides.
    fn new(
        schema: impl Into<String>,
        table: impl Into<String>,
        kind: StatementKind,
        columns: Vec<String>,
    ) -> StatementKey {
        StatementKey {
            schema: schema.into(),
            table: table.into(),
            kind,
            columns,
            compared: Vec::new(),
            defaults: Vec::new(),
        }
    }
}

/// A source transaction boundary that is complete in the open target transaction.
#[derive(Debug, Clone, Copy)]
struct Completed {
    commit_lsn: Lsn,
    commit_ts_us: i64,
    offset: i64,
}

/// A target transaction whose COMMIT is sent and not yet answered.
struct Committing {
    done: Completed,
    txns: u64,
    changes: u64,
    started: std::time::Instant,
    /// Tables first announced in it ([`Worker::announcing`]).
    announced: Vec<String>,
}

/// The statements that end every target transaction, prepared once per connection.
struct CommitStatements {
    /// [`target::ORIGIN_XACT_SETUP`].
    origin: Statement,
    /// [`target::RECORD_PROGRESS`].
    progress: Statement,
}

struct Worker {
    settings: WorkerSettings,
    metrics: Arc<Metrics>,
    health: Health,
    dead_letters: FutureProducer,
    dead_letter_topic: String,
    /// Target tables by `schema.table` (only those that exist on the target).
    tables: HashMap<String, Arc<TargetTable>>,
    /// Where a column a change carries, missing from a target table, went (renamed: `Some`,
    /// dropped: `None`; from `pgferry.ddl_history`), by `(schema.table, column)`, with the
    /// table's columns it was found for: while they are the same, later changes written
    /// under the old column follow it without describing the table and reading the history
    /// again (each such change cost both, and a node's rows written before it learnt of a
    /// drop or rename applied 30 to 90 times slower than others).
    follows: HashMap<(String, String), (Vec<String>, Option<String>)>,
    /// Tables this node's stream has announced (`pgferry.stream_tables`): the only ones its
    /// changes may write ([`super::admit`]).
    announced: HashSet<String>,
    /// Those of `announced` recorded in the open target transaction: a rollback forgets
    /// them, since their rows in `pgferry.stream_tables` go with it (kept, a replay would not
    /// record them again, and the worker would refuse their changes after a restart).
    announcing: Vec<String>,
    /// Applied-changes counters by `schema.table`, indexed by op.
    counters: HashMap<String, [Option<prometheus::IntCounter>; 5]>,
    statements: HashMap<StatementKey, Statement>,
    /// The statement of the last change `apply_change` sent (also in `statements`).
    last_statement: Option<(StatementKey, Statement)>,
    /// Replica mode: rows gathered for multi-row statements (one change per key, coalesced),
    /// not yet sent.
    rows: Coalescer,
    /// Replica mode: which tables' batches of upserts try COPY first.
    copy: copy::CopyChoice,
    /// Multi-master: changes gathered to be decided and written together, not yet sent.
    lww_rows: Waves<lww_rows::ProbeGroup, lww_rows::LwwRow>,
    /// Multi-master: the extra connections (`apply.lanes` - 1) that write a batch's keys in
    /// parallel with this worker's own; lane `i` is `lanes[i - 1]`.
    lanes: Vec<Arc<Client>>,
    /// The open target transaction ran a schema change: it holds the table's ACCESS
    /// EXCLUSIVE lock, so the rest of the source transaction goes through the worker's own
    /// connection (a lane would wait for that lock) and the target transaction commits at its
    /// end.
    ddl_open: bool,
    /// Whether each extra lane has an open transaction.
    lane_open: Vec<bool>,
    /// Statements prepared on each extra lane.
    lane_statements: Vec<HashMap<StatementKey, Statement>>,
    /// Multi-master: keys written by set batches since the target transaction began.
    lww_rows_sent: usize,
    /// Multi-master under lock contention: the open target transaction holds the target's
    /// apply turn ([`Worker::take_turn`]).
    turn_held: bool,
    /// Types of each target table's columns, by `schema.table`, for rendering values.
    column_types: HashMap<String, Vec<tokio_postgres::types::Type>>,
    /// Committed position: what the target durably holds.
    committed: target::Progress,
    /// The consistent point of the target's seed (`pgferry seed`): the node's transactions
    /// committed before it are in the copy. `0/0` for a target not seeded.
    seeded_at: Lsn,
    in_target_txn: bool,
    last_completed: Option<Completed>,
    /// The batch whose COMMIT is sent and not yet answered (replica mode reads on meanwhile).
    committing: Option<Committing>,
    commit_statements: CommitStatements,
    batch_changes: u64,
    batch_txns: u64,
    /// When the open target transaction began.
    batch_started: std::time::Instant,
    /// Multi-master state; `None` in replica mode.
    lww: Option<lww::LwwState>,
    /// `apply:<node>:<target>`: this worker's name in readiness and metrics.
    component: String,
    /// The begin offset of a source transaction whose schema change had to wait for another
    /// node's changes ([`ApplyError::SchemaChangeWaits`]): the replay commits the target
    /// transaction before it, so a waiting worker holds nothing the other one may need.
    commit_before: Option<i64>,
    /// After the target rejected a change somewhere in a batch: until the replayed batch
    /// commits, changes are applied one at a time under a savepoint, so the rejected one is
    /// found and dead-lettered while the rest apply.
    careful: bool,
    /// The offset the next record read must have at least.
    next_read: i64,
    /// When the last record arrived (or reading started), and when a stall was last checked.
    last_record: std::time::Instant,
    stall_checked: std::time::Instant,
    /// A dead letter was recorded since the diverged tables were last read.
    letters_pending: bool,
    /// Target tables with unresolved dead letters of this node, as last read.
    diverged: Vec<String>,
    /// When they were last read.
    diverged_checked: std::time::Instant,
    /// Tables parked behind a schema change the target refused ([`dead_letters::PARKED`]),
    /// as the target's open transaction has them, with when the worker last tried to unpark
    /// each: every change of such a table is dead-lettered after it, so that none applies out
    /// of order, until [`Worker::unpark_due`] applies them all.
    parked: HashMap<String, std::time::Instant>,
    /// Replica mode: the rows behind this node's unresolved dead letters ([`holds`]).
    held: crate::apply::holds::Held,
    /// The letters `held` was read from: their count and the sum of their ids.
    held_seen: Option<(i64, i64)>,
    /// How apply writes values of each key type held rows are compared by (type name →
    /// kind).
    key_kinds: HashMap<String, crate::value::PgType>,
    /// Replaying dead letter `id` (`pgferry dead-letters replay`, or a parked table
    /// resuming): only letters before it are behind its change, and nothing is held.
    replaying: Option<i64>,
    /// Tables whose re-snapshot ranges cannot be pruned here (logged once each).
    unpruned: HashSet<String>,
    /// Multi-master: the stream's column types, for values written under a column's old type.
    retyping: retype::Retyping,
}

/// What [`Worker::apply_carefully`] applies: one change, or snapshot rows.
enum Work {
    Change(Box<ChangeItem>),
    Rows(Box<RowsItem>),
}

/// Where a record came from, and its bytes: a Kafka message, or a stored dead letter being
/// replayed.
pub(crate) struct RecordRef<'a> {
    topic: &'a str,
    partition: i32,
    offset: i64,
    /// The item's place in its record (a bundle, see `node_stream`), 0 for the first.
    item: u32,
    /// The row's place in a `rows` item (1 for the first), for a letter of one snapshot row.
    row: Option<u32>,
    payload: Option<&'a [u8]>,
}

impl<'a> RecordRef<'a> {
    fn of(message: &'a BorrowedMessage<'_>) -> Self {
        RecordRef {
            topic: message.topic(),
            partition: message.partition(),
            offset: message.offset(),
            item: 0,
            row: None,
            payload: message.payload(),
        }
    }
}

/// A row of the target's `pgferry.dead_letters`, apart from where the record was read.
struct StoredLetter<'a> {
    /// `capture` or `apply`.
    stage: &'static str,
    table: Option<String>,
    lsn: Option<String>,
    reason: &'a str,
    payload: Option<String>,
}

/// The parts of a node-stream change item that [`commit_ts_of`] and [`named_table`] read, in
/// both shapes: compact (top level) and, written before it, the wrapped envelope (`change`).
#[derive(Deserialize)]
struct ItemFacts {
    #[serde(default)]
    commit_ts_us: Option<i64>,
    #[serde(default)]
    schema: Option<String>,
    #[serde(default)]
    table: Option<String>,
    #[serde(default)]
    change: Option<Box<WrappedFacts>>,
}

#[derive(Deserialize)]
struct WrappedFacts {
    source: ItemFacts,
}

impl ItemFacts {
    fn of(payload: &[u8]) -> Option<ItemFacts> {
        let facts: ItemFacts = serde_json::from_slice(payload).ok()?;
        Some(match facts.change {
            Some(wrapped) => wrapped.source,
            None => facts,
        })
    }
}

/// The source commit time a node-stream change item carries (compact items carry it only
/// for changes without a row version, the only ones that need it).
fn commit_ts_of(payload: &[u8]) -> Option<i64> {
    ItemFacts::of(payload)?.commit_ts_us
}

/// The table a node-stream change item names, read without decoding its rows.
fn named_table(payload: Option<&[u8]>) -> Option<String> {
    let facts = ItemFacts::of(payload?)?;
    Some(format!("{}.{}", facts.schema?, facts.table?))
}

/// Connects to the target and prepares a worker: session settings, bookkeeping tables, the
/// replication origin `origin`, the stored progress.
async fn open(
    settings: WorkerSettings,
    metrics: Arc<Metrics>,
    health: Health,
    origin: &str,
) -> Result<(Worker, Client), ApplyError> {
    let app_name = format!("pgferry-apply-{}", settings.node);
    let client = crate::pg::connect(&settings.target.url, &app_name)
        .await
        .map_err(ApplyError::sql("connecting to the target"))?;
    target::prepare_session(&client, &settings.node, origin)
        .await
        .map_err(ApplyError::sql(
            "preparing the apply session (needs superuser or replication origin privileges)",
        ))?;
    let lww = if settings.apply.mode == ApplyMode::MultiMaster {
        client
            .batch_execute(multimaster::SESSION_SETTINGS)
            .await
            .map_err(ApplyError::sql("preparing the multi-master session"))?;
        Some(lww::LwwState::default())
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
    let seeded_at = match target::read_seed(&client, &settings.node)
        .await
        .map_err(ApplyError::sql("reading pgferry.seeds"))?
    {
        Some(target::Seed {
            consistent: Some(lsn),
            ..
        }) => lsn,
        Some(_) => {
            return Err(ApplyError::SeedUnfinished {
                node: settings.node.clone(),
            })
        }
        None => Lsn::ZERO,
    };
    let announced = target::stream_tables(&client, &settings.node, committed.next_offset > 0)
        .await
        .map_err(ApplyError::sql("reading pgferry.stream_tables"))?;
    let commit_statements = CommitStatements {
        origin: client
            .prepare(target::ORIGIN_XACT_SETUP)
            .await
            .map_err(ApplyError::sql("preparing the commit statements"))?,
        progress: client
            .prepare(target::RECORD_PROGRESS)
            .await
            .map_err(ApplyError::sql("preparing the commit statements"))?,
    };
    let dead_letters: FutureProducer = crate::kafka::create(
        client_config(&settings.kafka)
            .set("enable.idempotence", "true")
            .set("acks", "all"),
    )
    .map_err(ApplyError::Kafka)?;
    let asking = dead_letters.clone();
    crate::kafka::request_producer_id(move |t| asking.client().fetch_metadata(None, t));
    let dead_letter_topic = settings
        .apply
        .dead_letter_topic
        .clone()
        .unwrap_or_else(|| settings.kafka.dead_letter_topic());
    let component = component_name(&settings.node, &settings.target.url.display_target());
    let mut worker = Worker {
        settings,
        metrics,
        health,
        dead_letters,
        dead_letter_topic,
        tables: HashMap::new(),
        follows: HashMap::new(),
        announced,
        announcing: Vec::new(),
        counters: HashMap::new(),
        statements: HashMap::new(),
        last_statement: None,
        rows: Coalescer::default(),
        copy: copy::CopyChoice::default(),
        lww_rows: Waves::default(),
        lanes: Vec::new(),
        ddl_open: false,
        lane_open: Vec::new(),
        lane_statements: Vec::new(),
        lww_rows_sent: 0,
        turn_held: false,
        column_types: HashMap::new(),
        committed,
        seeded_at,
        in_target_txn: false,
        last_completed: None,
        committing: None,
        commit_statements,
        batch_changes: 0,
        batch_txns: 0,
        batch_started: std::time::Instant::now(),
        lww,
        component,
        commit_before: None,
        careful: false,
        letters_pending: true,
        next_read: 0,
        last_record: std::time::Instant::now(),
        stall_checked: std::time::Instant::now(),
        diverged: Vec::new(),
        diverged_checked: std::time::Instant::now(),
        parked: HashMap::new(),
        held: Default::default(),
        held_seen: None,
        key_kinds: HashMap::new(),
        replaying: None,
        unpruned: HashSet::new(),
        retyping: retype::Retyping::default(),
    };
    worker.reload_parked(&client).await?;
    if worker.lww.is_some() {
        let relations = target::stream_relations(&client, &worker.settings.node)
            .await
            .map_err(ApplyError::sql("reading pgferry.stream_relations"))?;
        for (qualified, offset, columns) in relations {
            worker.retyping.restore(qualified, offset, columns);
        }
    }
    Ok((worker, client))
}

/// Runs a type change `statement`; where the target's cast refuses a value (SQLSTATE class
/// 22), runs `lenient` instead ([`crate::ddl::to_sql_lenient`]: NULL for those values, which
/// the re-snapshot that follows replaces), with a warning naming `table`.
async fn retype_leniently(
    client: &Client,
    table: &str,
    statement: &str,
    lenient: &str,
) -> Result<(), tokio_postgres::Error> {
    client.batch_execute("SAVEPOINT pgferry_cast").await?;
    match client.batch_execute(statement).await {
        Ok(()) => client.batch_execute("RELEASE SAVEPOINT pgferry_cast").await,
        Err(e) if e.code().is_some_and(|c| c.code().starts_with("22")) => {
            tracing::warn!(table, statement, error = %crate::error::ErrorChain(&e),
                           "the target cannot cast every value to the column's new type (the \
                            source computed them by USING): those are NULL until the re-snapshot \
                            that follows brings the source's values");
            client
                .batch_execute("ROLLBACK TO SAVEPOINT pgferry_cast; RELEASE SAVEPOINT pgferry_cast")
                .await?;
            client.batch_execute(lenient).await
        }
        Err(e) => Err(e),
    }
}

/// Runs one worker until shutdown or an error.
pub async fn run(
    settings: WorkerSettings,
    metrics: Arc<Metrics>,
    health: Health,
    shutdown: CancellationToken,
) -> Result<(), ApplyError> {
    let origin = target::origin_name(&settings.node, settings.target.url.dbname());
    let (mut worker, client) = open(settings, metrics, health, &origin).await?;
    worker.open_lanes(&client, &origin).await?;
    let settings = &worker.settings;
    let topic = node_stream_topic(&settings.kafka.topic_prefix, &settings.node);
    let mut consumer_config = client_config(&settings.kafka);
    let kafka = &settings.kafka;
    // librdkafka prefetches up to 64 MB per partition by default; a sidecar wants less.
    set_default(
        &mut consumer_config,
        kafka,
        "queued.max.messages.kbytes",
        "16384",
    );
    // When the prefetch queue is full, librdkafka waits this long (1 s by default) before
    // fetching again, even if the worker empties the queue in a few milliseconds: in a
    // catch-up the worker then idles for most of each second.
    set_default(&mut consumer_config, kafka, "fetch.queue.backoff.ms", "10");
    // How long the broker may hold a fetch that finds nothing new: brokers that answer a
    // waiting fetch as soon as records arrive make this free; others add up to this much
    // latency per record.
    set_default(&mut consumer_config, kafka, "fetch.wait.max.ms", "50");
    consumer_config
        .set("group.id", format!("pgferry-apply-{}", settings.node))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // An offset that is no longer in the topic is an error, never a jump to either end.
        .set("auto.offset.reset", "error");
    let consumer: StreamConsumer =
        crate::kafka::create(&consumer_config).map_err(ApplyError::Kafka)?;
    // The target applied from this topic, so it exists (if it does not, the position check
    // reports the gap): fetching, creating the dead-letter topic and checking the position
    // overlap, each a fresh broker round trip. Nothing is applied before the check passes.
    let resuming = worker.committed.next_offset > 0;
    if resuming {
        worker.assign(&consumer, &topic)?;
    }
    let create = async {
        if worker.settings.kafka.create_topics {
            create_topics(
                &worker.settings.kafka,
                &[&topic, &worker.dead_letter_topic],
                1,
            )
            .await
            .map_err(ApplyError::Kafka)?;
        }
        Ok::<_, ApplyError>(())
    };
    tracing::info!(node = %worker.settings.node, target = %worker.settings.target.url.display_target(),
                   offset = worker.committed.next_offset, applied = %worker.committed.commit_lsn, "applying");
    if resuming {
        let (created, verified) = tokio::join!(create, worker.verify_position(&topic));
        created?;
        verified?;
    } else {
        create.await?;
        // Fetching starts now, while the position is checked.
        worker.assign(&consumer, &topic)?;
        worker.verify_position(&topic).await?;
    }
    worker.refresh_diverged(&client).await?;
    worker.health.set_ready(&worker.component, true);
    let mut assigned = true;
    // Replays for stale table shapes from one committed offset: schema changes may come one
    // after another (each replay can meet the next: on a multi-master node, other workers
    // and local sessions change the same tables), but one that keeps failing for this long
    // is a real error. (Five replays, about a second, were too few under a steady stream of
    // schema changes: the stage stopped as needing an operator, for a minute.)
    const STALE_REPLAY_WINDOW: Duration = Duration::from_secs(30);
    let mut stale_replays: (i64, Option<std::time::Instant>) = (-1, None);
    let result = loop {
        let mut framer = Framer::new(worker.applied_floor());
        if !std::mem::take(&mut assigned) {
            worker.assign(&consumer, &topic)?;
        }
        let result = worker
            .apply_loop(&client, &consumer, &topic, &mut framer, &shutdown)
            .await;
        match result {
            Err(ApplyError::Sql { source, .. }) if is_lock_conflict(&source) => {
                // A deadlock or serialisation failure with local writers or another worker:
                // undo the open transaction and replay it from the committed position.
                tracing::info!(node = %worker.settings.node, error = %ErrorChain(&source),
                               "lock conflict with a concurrent writer; replaying the transaction");
                worker
                    .metrics
                    .apply_lock_conflicts
                    .with_label_values(&[&worker.settings.node])
                    .inc();
                // The target's workers now take turns for a while.
                worker.settings.contention.record(std::time::Instant::now());
                worker.rollback(&client, &mut InFlight::default()).await?;
                if !worker.lanes.is_empty() {
                    // Workers with lanes break their lock cycles by timeout, possibly several
                    // at once: replay after a random pause so they do not meet again.
                    tokio::time::sleep(replay_pause()).await;
                }
            }
            Err(ApplyError::SchemaChangeWaits { from, node, lsn }) => {
                // Nothing of the transaction is kept while waiting: its row locks could hold
                // up the very worker it waits for.
                worker.rollback(&client, &mut InFlight::default()).await?;
                // With source transactions before it in the batch, the replay commits those
                // first and meets the dependency again; then it waits.
                if worker.commit_before.is_none()
                    && !worker
                        .wait_applied(&client, &from, &node, lsn, &shutdown)
                        .await?
                {
                    break Ok(());
                }
            }
            Err(e)
                if e.is_stale_shape()
                    && (stale_replays.0 != worker.committed.next_offset
                        || stale_replays
                            .1
                            .is_none_or(|first| first.elapsed() < STALE_REPLAY_WINDOW)) =>
            {
                tracing::info!(node = %worker.settings.node, error = %ErrorChain(&e),
                               "a table changed since this worker described it (a schema \
                                change by another session); describing again and replaying \
                                the transaction");
                let again = stale_replays.0 == worker.committed.next_offset;
                stale_replays = (
                    worker.committed.next_offset,
                    if again {
                        stale_replays.1
                    } else {
                        Some(std::time::Instant::now())
                    },
                );
                // Rolling back forgets every table shape and prepared statement.
                worker.rollback(&client, &mut InFlight::default()).await?;
                if again {
                    // Another session's schema change may still be on its way in.
                    tokio::time::sleep(replay_pause()).await;
                }
            }
            Err(e) if e.is_rejection() && !worker.careful => {
                // Pipelined statements do not say which change the target rejected: undo the
                // batch and replay it one change at a time to find it.
                tracing::warn!(node = %worker.settings.node, error = %ErrorChain(&e),
                               "the target rejected a change; replaying the batch change by change to dead-letter it");
                worker.rollback(&client, &mut InFlight::default()).await?;
                worker.careful = true;
            }
            other => break other,
        }
    };
    worker.health.set_ready(&worker.component, false);
    result
}

/// Re-applies stored dead letters of one source node (`pgferry dead-letters replay`), each in
/// its own target transaction that also marks it resolved. Any failure (the cause is still
/// there) leaves that letter unresolved and is returned with it; `apply.on_poison` is `stop`
/// here, so nothing is dead-lettered again. `Ok(false)`: the letter was resolved meanwhile.
/// Letters of a parked table apply here like the rest, oldest first (the apply worker, which
/// tries them itself too, waits for each, then finds it resolved).
pub async fn replay(
    mut settings: WorkerSettings,
    letters: &[StoredDeadLetter],
) -> Result<Vec<(i64, Result<bool, ApplyError>)>, ApplyError> {
    settings.apply.on_poison = OnPoison::Stop;
    let origin = target::origin_name(
        &format!("{}_replay", settings.node),
        settings.target.url.dbname(),
    );
    let metrics = Arc::new(Metrics::new(&settings.local_node));
    let (mut worker, client) = open(settings, metrics, Health::default(), &origin).await?;
    worker.parked.clear();
    worker.read_held(&client, true).await?;
    // The letters that park their tables: a letter of a table behind one of them waits for
    // it, as the worker's own changes of the table do (applied first, a later change would
    // be undone by it, a TRUNCATE say, or meet the table in its old shape).
    let mut parking: HashMap<String, std::collections::BTreeSet<i64>> = HashMap::new();
    for (id, table) in dead_letters::parking(&client, &worker.settings.node)
        .await
        .map_err(ApplyError::sql("reading pgferry.dead_letters"))?
    {
        parking.entry(table).or_default().insert(id);
    }
    let mut outcomes = Vec::with_capacity(letters.len());
    for letter in letters {
        let parked_first = letter
            .table
            .as_ref()
            .and_then(|t| parking.get(t))
            .and_then(|ids| ids.iter().copied().find(|id| *id < letter.id));
        // A letter behind an unresolved one of its row waits for it: applied first, it would
        // be undone by it (letters come in id order, so one that failed again stays first).
        let outcome = match parked_first {
            Some(first) => Err(refused_letter(
                letter,
                &format!(
                    "dead letter #{first} parks its table and comes before it, unresolved: \
                     replay it first (or resolve it)"
                ),
            )),
            None => match worker.first_behind(&client, letter).await {
                Ok(Some(first)) => Err(refused_letter(
                    letter,
                    &format!(
                        "dead letter #{first} of the same row comes before it and is \
                         unresolved: replay it first (or resolve it)"
                    ),
                )),
                Ok(None) => worker.replay_one(&client, letter).await,
                Err(e) => Err(e),
            },
        };
        if outcome.is_ok() {
            for ids in parking.values_mut() {
                ids.remove(&letter.id);
            }
        }
        if outcome.is_err() {
            let _ = client.batch_execute("ROLLBACK").await;
            worker.tables.clear();
            worker.statements.clear();
        }
        outcomes.push((letter.id, outcome));
    }
    Ok(outcomes)
}

/// A letter that cannot be replayed, and why.
fn refused_letter(letter: &StoredDeadLetter, reason: &str) -> ApplyError {
    ApplyError::BadMessage {
        location: format!(
            "dead letter #{} ({}@{})",
            letter.id, letter.topic, letter.offset
        ),
        reason: reason.to_owned(),
    }
}

/// `apply:<node>:<target>`.
pub fn component_name(node: &str, target: &str) -> String {
    format!("apply:{node}:{target}")
}

impl Worker {
    /// Multi-master with `apply.lanes` > 1: connects the extra lanes. Each has its own
    /// replication origin (`<origin>_l<i>`, registered to the same node), so capture knows
    /// their writes as applied ones.
    async fn open_lanes(&mut self, client: &Client, origin: &str) -> Result<(), ApplyError> {
        if self.lww.is_none() || self.settings.apply.lanes <= 1 {
            return Ok(());
        }
        // A lane waiting for a row that another worker holds, while that worker waits for a
        // sibling of this lane, closes a cycle PostgreSQL cannot see (the sibling is idle in
        // its transaction, waiting for this worker's commit). Waits are therefore bounded on
        // every connection of the worker; a timeout replays the transaction like a deadlock.
        client
            .batch_execute(LANE_LOCK_TIMEOUT)
            .await
            .map_err(ApplyError::sql("setting the lock timeout"))?;
        let app_name = format!("pgferry-apply-{}", self.settings.node);
        for i in 1..usize::from(self.settings.apply.lanes) {
            let client = crate::pg::connect(&self.settings.target.url, &app_name)
                .await
                .map_err(ApplyError::sql("connecting an apply lane to the target"))?;
            let lane_origin = crate::naming::lane_origin_name(origin, i);
            target::prepare_session(&client, &self.settings.node, &lane_origin)
                .await
                .map_err(ApplyError::sql("preparing an apply lane's session"))?;
            client
                .batch_execute(multimaster::SESSION_SETTINGS)
                .await
                .map_err(ApplyError::sql("preparing the multi-master session"))?;
            client
                .batch_execute(LANE_LOCK_TIMEOUT)
                .await
                .map_err(ApplyError::sql("setting the lock timeout"))?;
            self.lanes.push(Arc::new(client));
            self.lane_open.push(false);
            self.lane_statements.push(HashMap::new());
        }
        Ok(())
    }

    /// Commits the open transactions of the extra lanes: before the worker's own, which holds
    /// the progress. A crash in between replays their changes, which then find their own
    /// versions stored and change nothing.
    async fn commit_lanes(&mut self) -> Result<(), ApplyError> {
        let commits = self
            .lanes
            .iter()
            .zip(&self.lane_open)
            .filter(|(_, open)| **open)
            .map(|(lane, _)| lane.batch_execute("COMMIT"));
        futures_util::future::try_join_all(commits)
            .await
            .map_err(ApplyError::sql("committing an apply lane"))?;
        self.lane_open.iter_mut().for_each(|open| *open = false);
        Ok(())
    }

    fn assign(&mut self, consumer: &StreamConsumer, topic: &str) -> Result<(), ApplyError> {
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(topic, 0, Offset::Offset(self.committed.next_offset))
            .map_err(ApplyError::Kafka)?;
        self.next_read = self.committed.next_offset;
        self.last_record = std::time::Instant::now();
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
        let pump = pending.clone();
        let result = pump
            .beside(Box::pin(self.read_and_apply(
                client,
                consumer,
                topic,
                framer,
                shutdown,
                &mut pending,
            )))
            .await;
        // However reading ended, the COMMIT sent last is answered before the position is used
        // again (a replay starts from it).
        let confirmed = self.confirm_commit(&mut pending).await;
        result.and(confirmed)
    }

    async fn read_and_apply<'c>(
        &mut self,
        client: &'c Client,
        consumer: &StreamConsumer,
        topic: &str,
        framer: &mut Framer,
        shutdown: &CancellationToken,
        pending: &mut InFlight<'c>,
    ) -> Result<(), ApplyError> {
        loop {
            self.health.beat();
            // Shutdown: stop reading between source transactions and commit what is whole; a
            // transaction half read is finished first (it was committed at the source, and
            // the rest is already in Kafka).
            if shutdown.is_cancelled() && !framer.is_open() {
                self.commit_if_between_transactions(client, pending, framer)
                    .await?;
                return Ok(());
            }
            // Take what is already fetched without arming a timer; only when the stream is
            // empty, commit the whole transactions we hold and wait.
            let ready = consumer.recv().now_or_never();
            let message = match ready {
                Some(m) => Some(m),
                None => {
                    // Idle: the batch is committed and its answer awaited, so the position
                    // and the metrics are current while nothing arrives.
                    self.commit_if_between_transactions(client, pending, framer)
                        .await?;
                    self.confirm_commit(pending).await?;
                    tokio::select! {
                        _ = shutdown.cancelled() => None,
                        m = consumer.recv() => Some(m),
                        _ = tokio::time::sleep(IDLE_BEAT) => {
                            if !self.in_target_txn {
                                self.refresh_diverged(client).await?;
                                self.unpark_idle(client, pending).await?;
                            }
                            self.check_stall(consumer, topic)?;
                            continue;
                        }
                    }
                }
            };
            let message = match message {
                Some(Ok(m)) => m,
                Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset))) => {
                    return Err(self.gap(
                        topic,
                        format!(
                            "the broker no longer has the offsets after {} (auto.offset.reset)",
                            self.committed.next_offset - 1
                        ),
                    ))
                }
                Some(Err(e)) => return Err(ApplyError::Kafka(e)),
                None => {
                    self.commit_if_between_transactions(client, pending, framer)
                        .await?;
                    return Ok(());
                }
            };
            let offset = message.offset();
            // Offsets only grow from where reading started. A smaller one means the partition
            // is not the one the stored position belongs to (recreated under the same name).
            if offset < self.next_read {
                return Err(self.gap(
                    topic,
                    format!(
                        "the broker returned offset {offset} when reading from offset {}: the \
                         topic was deleted and recreated",
                        self.next_read
                    ),
                ));
            }
            self.next_read = offset + 1;
            self.last_record = std::time::Instant::now();
            // A record holds a bundle of items, one per line (see `node_stream`); each is
            // parsed, framed and, when bad, dead-lettered on its own.
            let mut lines = message.payload().map(items_of);
            let mut index = 0u32;
            let mut after_commit = false;
            let mut orphaned = None;
            loop {
                let line = match lines.as_mut() {
                    Some(items) => match items.next() {
                        Some(line) => Some(line),
                        None => break,
                    },
                    None if index == 0 => None,
                    None => break,
                };
                let record = RecordRef {
                    item: index,
                    payload: line,
                    ..RecordRef::of(&message)
                };
                index += 1;
                if after_commit {
                    // Nothing may follow a commit in its record: the position stored with
                    // that commit is the next record, so an item here would be skipped on a
                    // restart. Capture never writes one.
                    self.bad_message(client, &record, "an item after the commit in its node-stream record (a commit must end its record)").await?;
                    continue;
                }
                let (run, item) = match parse_framed(line) {
                    Ok(framed) => framed,
                    Err(e) => {
                        self.bad_message(client, &record, &e.to_string()).await?;
                        continue;
                    }
                };
                after_commit = matches!(item, StreamItem::Commit(_));
                if let Some(begin_offset) = self
                    .step_item(client, pending, framer, &record, offset, run, item)
                    .await?
                {
                    orphaned = Some(begin_offset);
                    break;
                }
            }
            if let Some(begin_offset) = orphaned {
                tracing::warn!(node = %self.settings.node, offset = begin_offset,
                               "transaction cut off by a capture restart; replaying from the last commit");
                drop(lines);
                drop(message);
                self.rollback(client, pending).await?;
                framer.orphan(begin_offset, self.applied_floor());
                self.assign(consumer, topic)?;
            }
        }
    }

    /// Applies one node-stream item as the framer decides. Returns the begin offset of an
    /// orphaned transaction (the caller rolls back and replays from the last commit).
    #[allow(clippy::too_many_arguments)]
    async fn step_item<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
        framer: &mut Framer,
        record: &RecordRef<'_>,
        offset: i64,
        run: Option<u64>,
        item: StreamItem,
    ) -> Result<Option<i64>, ApplyError> {
        match framer.step_run(offset, run, item) {
            Step::Ignore => {}
            Step::Stray(reason) => {
                tracing::error!(node = %self.settings.node, offset, reason,
                                "node stream record out of place");
                self.bad_message(client, record, reason).await?;
            }
            Step::Relation(relation) => {
                if let Some(reason) = admit::admit_relation(&relation.schema, &relation.table) {
                    self.bad_message(client, record, &reason).await?;
                } else {
                    self.remember_relation(client, pending, offset, &relation);
                    self.announce(client, pending, &relation);
                    if self.settings.apply.create_tables {
                        self.create_if_missing(client, pending, record, &relation)
                            .await?;
                    }
                }
            }
            Step::Ack(ack) => {
                self.record_ack(client, pending, &ack).await?;
            }
            Step::Ddl(ddl) => {
                let commit_lsn = framer.open_commit_lsn().unwrap_or_default();
                let applied = self
                    .apply_ddl(client, pending, record, &ddl, commit_lsn)
                    .await;
                self.note_wait(&applied, framer);
                applied?;
            }
            Step::After(after) => {
                let applied = self.require_applied(client, &after.applied).await;
                self.note_wait(&applied, framer);
                applied?;
            }
            Step::Skipped(skipped) => {
                self.record_capture_letter(client, pending, record, &skipped)
                    .await?;
            }
            Step::Apply(change) if self.careful => {
                let commit_ts = framer.open_commit_ts_us().unwrap_or_default();
                self.apply_carefully(client, pending, record, Work::Change(change), commit_ts)
                    .await?;
            }
            Step::Rows(rows) if self.careful && self.lww.is_none() => {
                // Row by row, so that a row the target rejects is dead-lettered alone (as a
                // `rows` item of its own, which can be replayed).
                let commit_ts = framer.open_commit_ts_us().unwrap_or_default();
                // A re-snapshot's range goes last, alone, keeping the rows' keys.
                let range = rows.range_only();
                if range.is_none() && rows.prune.is_some() {
                    self.unpruned(&rows, "its rows' key values cannot be read");
                }
                for (at, row) in rows.split().map(Some).chain([range]).flatten().enumerate() {
                    let payload = row.to_json();
                    let one = RecordRef {
                        row: u32::try_from(at + 1).ok(),
                        payload: Some(payload.as_bytes()),
                        ..*record
                    };
                    self.apply_carefully(
                        client,
                        pending,
                        &one,
                        Work::Rows(Box::new(row)),
                        commit_ts,
                    )
                    .await?;
                }
            }
            Step::Rows(rows) => {
                self.apply_rows(client, pending, record, rows).await?;
                pending.throttle().await?;
            }
            Step::Start(begin) => {
                if self.commit_before == Some(offset) {
                    // A schema change in this transaction waited for another node's changes:
                    // commit the transactions before it (see `Step::Ddl`).
                    self.commit_before = None;
                    self.commit_batch(client, pending).await?;
                }
                if let Some(lww) = &mut self.lww {
                    lww.fallback_written.clear();
                    lww.commit_lsn = begin.commit_lsn;
                }
                self.check_horizon(client, pending).await?;
                if !self.in_target_txn {
                    self.batch_started = std::time::Instant::now();
                    pending.send(Box::pin(async move {
                        client.batch_execute("BEGIN").await.map(|_| 0)
                    }));
                    self.in_target_txn = true;
                    self.unpark_due(client, pending).await?;
                }
            }
            Step::Apply(change) if self.lww.is_some() => {
                self.apply_change_lww(
                    client,
                    pending,
                    record,
                    change,
                    framer.open_commit_ts_us().unwrap_or_default(),
                )
                .await?;
            }
            Step::Apply(change) => {
                self.apply_change(client, pending, record, change).await?;
                pending.throttle().await?;
            }
            Step::End(commit) => {
                self.batch_txns += 1;
                self.last_completed = Some(Completed {
                    commit_lsn: commit.commit_lsn,
                    commit_ts_us: framer.commit_ts_us(),
                    offset,
                });
                // Versions travel with the changes (multi-master too), so several
                // source transactions share one target transaction. In multi-master, sent
                // batches hold row locks that local writers wait for: commit at the first
                // boundary after a batch's worth of keys was written, so no local write
                // waits longer than that. (A batch may be sent before it is full, ahead of
                // a change that goes alone.)
                if self.batch_changes >= u64::from(self.settings.apply.batch_max_changes)
                    || self.lww_rows_sent >= ROWS_PER_STATEMENT
                    || std::mem::take(&mut self.ddl_open)
                {
                    self.commit_batch(client, pending).await?;
                }
            }
            Step::Orphaned(begin_offset) => return Ok(Some(begin_offset)),
        }
        Ok(None)
    }

    /// After [`ApplyError::SchemaChangeWaits`]: the replay commits everything before this
    /// source transaction first, so that the waiting worker holds nothing (no row lock, no
    /// uncommitted progress) the worker it waits for may need.
    fn note_wait(&mut self, result: &Result<(), ApplyError>, framer: &Framer) {
        if let Err(ApplyError::SchemaChangeWaits { .. }) = result {
            self.commit_before = framer.open_begin_offset().filter(|_| self.batch_txns > 0);
        }
    }

    /// After [`STALL_AFTER`] without a record, asks the broker for the high watermark (at most
    /// once per [`STALL_AFTER`]): records past the next offset that do not arrive mean the
    /// consumer is stuck, and the worker restarts from its durable position.
    fn check_stall(&mut self, consumer: &StreamConsumer, topic: &str) -> Result<(), ApplyError> {
        let now = std::time::Instant::now();
        if now.duration_since(self.last_record) < STALL_AFTER
            || now.duration_since(self.stall_checked) < STALL_AFTER
        {
            return Ok(());
        }
        self.stall_checked = now;
        let watermarks = tokio::task::block_in_place(|| {
            consumer.fetch_watermarks(topic, 0, super::position::TIMEOUT)
        });
        match watermarks {
            Ok((_, high)) if high > self.next_read => Err(ApplyError::Stalled {
                topic: topic.to_owned(),
                next: self.next_read,
                high,
                idle_secs: self.last_record.elapsed().as_secs(),
            }),
            // Caught up, or the broker does not answer (its own errors surface on reads).
            _ => Ok(()),
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
        for table in self.announcing.drain(..) {
            self.announced.remove(&table);
        }
        // The replay starts from the committed position: the last COMMIT's answer first.
        self.confirm_commit(pending).await?;
        self.retyping.rewind(self.committed.next_offset);
        if self.in_target_txn {
            client
                .batch_execute("ROLLBACK")
                .await
                .map_err(ApplyError::sql("rolling back"))?;
        }
        // Tables parked, and letters recorded or superseded, in the rolled-back transaction (or
        // one whose COMMIT failed, found after it was sent) are read again from the target: its
        // replay parks, holds and supersedes them again.
        self.reload_parked(client).await?;
        self.read_held(client, true).await?;
        for (lane, open) in self.lanes.iter().zip(self.lane_open.iter_mut()) {
            if *open {
                // A lane that lost its connection has nothing left to roll back.
                let _ = lane.batch_execute("ROLLBACK").await;
                *open = false;
            }
        }
        self.ddl_open = false;
        self.in_target_txn = false;
        self.last_completed = None;
        self.lww_rows_sent = 0;
        self.turn_held = false;
        self.rows.clear();
        self.lww_rows.clear();
        if let Some(lww) = &mut self.lww {
            lww.conflicts.clear();
        }
        self.batch_changes = 0;
        self.batch_txns = 0;
        // A rolled-back transaction may have created tables: forget what we learned in it.
        self.forget_tables();
        Ok(())
    }

    /// Multi-master: fails with [`ApplyError::SchemaChangeWaits`] unless the target has
    /// applied every node's changes up to `applied` (see [`super::stream::first_unapplied`]).
    async fn require_applied(
        &self,
        client: &Client,
        applied: &std::collections::BTreeMap<String, Lsn>,
    ) -> Result<(), ApplyError> {
        if applied.is_empty() {
            return Ok(());
        }
        let here = target::applied_lsns(client)
            .await
            .map_err(ApplyError::sql("reading pgferry.apply_progress"))?;
        let skip = [
            self.settings.node.as_str(),
            self.settings.local_node.as_str(),
        ];
        match super::stream::first_unapplied(applied, &here, &self.settings.apply.nodes, &skip) {
            None => Ok(()),
            Some((node, lsn)) => Err(ApplyError::SchemaChangeWaits {
                from: self.settings.node.clone(),
                node,
                lsn,
            }),
        }
    }

    /// Waits, outside any transaction, until the target has applied `node`'s changes up to
    /// `lsn` (see [`ApplyError::SchemaChangeWaits`]); `false` on shutdown. Another worker
    /// applies them: this one stays live meanwhile and says what it waits for.
    async fn wait_applied(
        &self,
        client: &Client,
        from: &str,
        node: &str,
        lsn: Lsn,
        shutdown: &CancellationToken,
    ) -> Result<bool, ApplyError> {
        /// Sets the waiting gauge back to 0 however the wait ends.
        struct Waiting(prometheus::IntGauge);
        impl Drop for Waiting {
            fn drop(&mut self) {
                self.0.set(0);
            }
        }
        let waiting = Waiting(
            self.metrics
                .apply_waiting_for
                .with_label_values(&[&self.settings.node, node]),
        );
        waiting.0.set(1);
        const POLL: Duration = Duration::from_millis(200);
        const REMIND: Duration = Duration::from_secs(60);
        let started = std::time::Instant::now();
        let mut reminded = started;
        tracing::info!(node = %self.settings.node, waits_for = %node, %lsn,
                       "changes from {from} wait until this target has applied {node}'s \
                        changes as far as {from} had (schema changes order them)");
        loop {
            let here = target::applied_lsns(client)
                .await
                .map_err(ApplyError::sql("reading pgferry.apply_progress"))?;
            if super::stream::has_applied(&here, node, lsn) {
                tracing::info!(node = %self.settings.node, waited_ms = started.elapsed().as_millis() as u64,
                               "applying the changes from {from} again");
                return Ok(true);
            }
            if reminded.elapsed() >= REMIND {
                reminded = std::time::Instant::now();
                tracing::warn!(node = %self.settings.node, waits_for = %node, %lsn,
                               waited_s = started.elapsed().as_secs(),
                               "changes from {from} still wait for {node}'s changes (is \
                                this target's worker for {node} running?)");
            }
            self.health.beat();
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(false),
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }

    /// Records a table the stream announced, in the open target transaction (so it commits
    /// with the changes that follow it, or not at all).
    fn announce<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
        relation: &RelationItem,
    ) {
        let qualified = format!("{}.{}", relation.schema, relation.table);
        self.announced_table(client, pending, &qualified);
    }

    /// Schema changes of one table, at their place in the source transaction: everything
    /// before them is written first, then each op runs under a savepoint. An op the target
    /// refuses (or an unacceptable type name) is dead-lettered with the statement and the
    /// server's reason; the transaction goes on.
    async fn apply_ddl<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
        message: &RecordRef<'_>,
        ddl: &super::stream::DdlItem,
        commit_lsn: Lsn,
    ) -> Result<(), ApplyError> {
        let qualified = format!("{}.{}", ddl.schema, ddl.table);
        if let Some(reason) = admit::admit_relation(&ddl.schema, &ddl.table) {
            return self.bad_message(client, message, &reason).await;
        }
        let wanted = &self.settings.apply.tables;
        if !wanted.is_empty() && !wanted.contains(&qualified) {
            return Ok(());
        }
        // Like changes, schema changes only touch tables this stream announced; a new table
        // announces itself, and a dropped one cannot be (capture finds it in no catalog any
        // more): a multi-master node drops a table its stream never carried a row of.
        let creates_or_drops = ddl.ops.iter().any(|op| {
            matches!(
                op,
                crate::ddl::DdlOp::CreateTable { .. } | crate::ddl::DdlOp::DropTable
            )
        });
        if !creates_or_drops && !self.announced.contains(&qualified) {
            // A table that left the publication by a move (`SET SCHEMA` out of a `FOR TABLES
            // IN SCHEMA` one, whose change never travelled) and comes back by the reverse
            // move: the target still holds it where it returns to, so the move is made
            // (capture snapshots the table again, as one published again).
            let back = match ddl.ops.as_slice() {
                [crate::ddl::DdlOp::SetSchema { to }] => Some(format!("{to}.{}", ddl.table)),
                [crate::ddl::DdlOp::RenameTable { to }] => Some(format!("{}.{to}", ddl.schema)),
                _ => None,
            };
            if let Some(back) = back.filter(|b| self.announced.contains(b)) {
                tracing::info!(table = %qualified, to = %back,
                    "a table moved back to where this target holds it (its move away never \
                     travelled: the table had left the publication); nothing to do");
                self.metrics
                    .schema_changes_applied
                    .with_label_values(&[&back, "already"])
                    .inc();
                return Ok(());
            }
            let reason =
                format!("schema change of {qualified}, a table this node stream never announced");
            return self.bad_message(client, message, &reason).await;
        }
        if self.held_back(client, message, &qualified).await? {
            return Ok(());
        }
        self.send_rows(client, pending).await?;
        self.send_lww_rows(client, pending).await?;
        pending
            .drain()
            .await
            .map_err(ApplyError::sql("applying changes"))?;
        // Multi-master: the node made the change after applying other nodes' changes it may
        // act on (a column one of them added or renamed); this target applies it after them.
        self.require_applied(client, &ddl.applied).await?;
        // A lane holding rows of the table would block the DDL's lock until it commits.
        self.commit_lanes().await?;
        self.ddl_open = true;
        let (mut schema, mut table) = (ddl.schema.clone(), ddl.table.clone());
        let mut any_applied = false;
        for op in &ddl.ops {
            let name = format!("{schema}.{table}");
            if let Some(default) = crate::ddl::uncopied_default(op) {
                // Rows carry their values, so the table does not wait for it (not parked);
                // the letter keeps the difference visible.
                let reason = format!(
                    "default not copied to {name}: {default:?} is not a constant, and pgferry \
                     copies constant defaults only (no expression from the stream runs here); \
                     set it on the target by hand"
                );
                self.bad_message(client, message, &reason).await?;
                continue;
            }
            if let Some(why) = self.ddl_refusal(&table, op) {
                let reason = format!("schema change of {name}: {why}");
                // The table waits for it (its later ops are in the letter).
                self.park(client, message, &qualified, &reason).await?;
                break;
            }
            if matches!(op, crate::ddl::DdlOp::DropTable) && !self.settings.apply.drop_tables {
                tracing::warn!(table = %name, "the source dropped this table; keeping it on the target (apply.drop_tables: false)");
                continue;
            }
            let statement = crate::ddl::to_sql(&schema, &table, op);
            // A replica whose table the source re-snapshots after this change: a type change
            // whose cast the target refuses (the source's USING computed values a cast cannot)
            // is made with NULL for those values, which the re-snapshot then replaces,
            // rather than parking the table for an operator. (Multi-master nodes are not
            // re-snapshotted: there the refusal parks the table, as any other.)
            let lenient = if ddl.resnapshot && self.lww.is_none() {
                crate::ddl::to_sql_lenient(&schema, &table, op)
            } else {
                None
            };
            // The DDL's ACCESS EXCLUSIVE lock waits for other sessions' transactions on the
            // table (local writers, other nodes' workers) longer than a row change would; a
            // lock conflict or deadlock replays the transaction like any other. The lock is
            // taken before the table is looked at: another worker making the same change (the
            // same schema change made on two nodes) has then committed it, and this one finds
            // it made instead of making it a second time.
            let target_name = crate::sql::qualified(&schema, &table);
            // The node the change came from, and this one.
            let nodes = (
                self.settings.node.as_str(),
                self.settings.local_node.as_str(),
            );
            let run = async {
                client
                    .batch_execute(&format!(
                        "SAVEPOINT pgferry_ddl; SELECT set_config('lock_timeout', '{DDL_LOCK_TIMEOUT}', true)"
                    ))
                    .await?;
                let attempt = async {
                    // Workers making a change to one table take turns (a table two of them
                    // create is not there to lock yet).
                    client
                        .execute(
                            "SELECT pg_advisory_xact_lock(hashtext('pgferry.ddl ' || $1))",
                            &[&target_name],
                        )
                        .await?;
                    let exists: bool = client
                        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&target_name])
                        .await?
                        .get(0);
                    if exists {
                        client
                            .batch_execute(&format!(
                                "LOCK TABLE {target_name} IN ACCESS EXCLUSIVE MODE"
                            ))
                            .await?;
                    }
                    let described = target::describe(client, &schema, &table).await?;
                    let shape = described.as_ref().map(|t| crate::ddl::TableShape {
                        columns: &t.columns,
                        types: &t.types,
                        key: &t.primary_key,
                        expressions: &t.expressions,
                    });
                    let moved = match (op, &described) {
                        (
                            crate::ddl::DdlOp::AddColumn {
                                column: crate::ddl::DdlColumn { name: column, .. },
                                ..
                            }
                            | crate::ddl::DdlOp::AlterColumnType { name: column, .. },
                            Some(t),
                        ) if !t.columns.contains(column) => {
                            let moves = target::column_moves(client, &name).await?;
                            unseen_move(&moves, column, &ddl.applied, nodes)
                        }
                        _ => None,
                    };
                    let present =
                        crate::ddl::on_target(op, shape, moved.as_ref().map(Option::as_deref));
                    // The same column, made here too: by the same ADD, or by another one that
                    // gave existing rows another value (two nodes at once).
                    let differs = match (&present, op, &described) {
                        (
                            crate::ddl::OnTarget::Already,
                            crate::ddl::DdlOp::AddColumn { column, existing },
                            Some(t),
                        ) if t.columns.contains(&column.name) => {
                            target::added_otherwise(client, t, column, existing.as_ref()).await?
                        }
                        _ => None,
                    };
                    let present = differs.map_or(present, crate::ddl::OnTarget::Differs);
                    if present == crate::ddl::OnTarget::Apply {
                        // Under the source session's settings, then the worker's own again
                        // (a refused statement's savepoint undoes them by itself).
                        let settings = crate::ddl::session_settings(&ddl.settings);
                        let own = target::set_settings(client, &settings).await?;
                        match &lenient {
                            None => client.batch_execute(&statement).await?,
                            Some(lenient) => {
                                retype_leniently(client, &name, &statement, lenient).await?
                            }
                        }
                        let own: Vec<(&str, &str)> =
                            own.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
                        target::set_settings(client, &own).await?;
                    }
                    Ok::<_, tokio_postgres::Error>(present)
                }
                .await;
                if let Err(e) = &attempt {
                    if is_lock_conflict(e) {
                        return Err(attempt.unwrap_err());
                    }
                }
                let made = matches!(
                    attempt,
                    Ok(crate::ddl::OnTarget::Apply | crate::ddl::OnTarget::Already)
                );
                client
                    .batch_execute(&format!(
                        "{} SAVEPOINT pgferry_ddl; SET LOCAL lock_timeout TO DEFAULT",
                        if made {
                            "RELEASE"
                        } else {
                            "ROLLBACK TO SAVEPOINT pgferry_ddl; RELEASE"
                        }
                    ))
                    .await?;
                Ok(attempt)
            };
            let attempt = run
                .await
                .map_err(ApplyError::sql("applying a schema change"))?;
            let (outcome, refused) = match attempt {
                Ok(crate::ddl::OnTarget::Apply) => ("applied", None),
                Ok(crate::ddl::OnTarget::Already) => ("already", None),
                Ok(crate::ddl::OnTarget::Differs(why)) => ("failed", Some(why)),
                Err(e) => (
                    "failed",
                    Some(format!(
                        "refused by the target: {}",
                        crate::error::ErrorChain(&e)
                    )),
                ),
            };
            self.metrics
                .schema_changes_applied
                .with_label_values(&[&name, outcome])
                .inc();
            match refused {
                None => {
                    if outcome == "already" {
                        tracing::info!(table = %name, %statement,
                                       "schema change already made on the target; skipped");
                    } else {
                        any_applied = true;
                        tracing::info!(table = %name, %statement, "schema change applied");
                    }
                    let followed = match op {
                        crate::ddl::DdlOp::RenameColumn { from, to } => {
                            Some((from.clone(), Some(to.clone())))
                        }
                        crate::ddl::DdlOp::DropColumn { name } => Some((name.clone(), None)),
                        _ => None,
                    };
                    if let Some((from, to)) = followed {
                        target::record_column_history(
                            client,
                            &name,
                            (&from, to.as_deref()),
                            (&self.settings.node, commit_lsn),
                        )
                        .await
                        .map_err(ApplyError::sql("recording pgferry.ddl_history"))?;
                    }
                    if let crate::ddl::DdlOp::CreateTable { .. } = op {
                        self.announced_table(client, pending, &name);
                    }
                    if let crate::ddl::DdlOp::RenameTable { to } = op {
                        let new_name = format!("{schema}.{to}");
                        self.announced_table(client, pending, &new_name);
                        table = to.clone();
                    }
                    if let crate::ddl::DdlOp::SetSchema { to } = op {
                        let new_name = format!("{to}.{table}");
                        self.announced_table(client, pending, &new_name);
                        schema = to.clone();
                    }
                }
                Some(why) => {
                    let reason = format!("schema change of {name}: {statement}: {why}");
                    self.park(client, message, &qualified, &reason).await?;
                    break;
                }
            }
        }
        if any_applied && self.lww.is_some() {
            // What this node writes from now on may depend on the change (a value only the
            // new type holds, the new name): its stream says so (see `stream::AfterItem`).
            let applied = serde_json::json!({ &self.settings.node: commit_lsn.to_string() });
            client
                .execute(
                    "SELECT pg_logical_emit_message(true, 'pgferry.after', $1::text)",
                    &[&applied.to_string()],
                )
                .await
                .map_err(ApplyError::sql("marking an applied schema change"))?;
        }
        self.forget_tables();
        Ok(())
    }

    /// Why one op of a schema change of `table` must not run here, if so: a type name, a
    /// partition clause or a generation expression pgferry does not copy, a parent table the stream never announced (or
    /// in a protected schema), or a move into a protected schema.
    fn ddl_refusal(&self, table: &str, op: &crate::ddl::DdlOp) -> Option<String> {
        if let Some(bad) = crate::ddl::type_names(op)
            .into_iter()
            .find(|t| !sql::is_safe_type_name(t))
        {
            return Some(format!("unacceptable type name {bad:?}"));
        }
        if let Some(bad) = crate::ddl::partition_clauses(op)
            .into_iter()
            .find(|c| !crate::ddl::is_safe_partition_clause(c))
        {
            return Some(format!(
                "partition clause {bad:?} is not one pgferry copies (words, literals, \
                 parentheses and commas only); make the change on the target by hand"
            ));
        }
        if let Some(bad) = crate::ddl::expressions(op)
            .into_iter()
            .find(|e| !crate::ddl::is_safe_expression(e))
        {
            return Some(format!(
                "generation expression {bad:?} is not one pgferry copies (a backslash, dollar \
                 sign, comment, semicolon or unbalanced parenthesis); make the change on the \
                 target by hand"
            ));
        }
        if let Some(parent) = crate::ddl::parent_table(op) {
            let parent_name = format!("{}.{}", parent.schema, parent.table);
            return admit::admit_relation(&parent.schema, &parent.table).or_else(|| {
                (!self.announced.contains(&parent_name)).then(|| {
                    format!("its parent {parent_name} is a table this node stream never announced")
                })
            });
        }
        if let crate::ddl::DdlOp::SetSchema { to } = op {
            return admit::admit_relation(to, table);
        }
        None
    }

    /// Records a table as written by this stream (see [`Worker::announce`]).
    fn announced_table<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
        qualified: &str,
    ) {
        if self.announced.insert(qualified.to_owned()) {
            self.announcing.push(qualified.to_owned());
            let node = self.settings.node.clone();
            let qualified = qualified.to_owned();
            pending.send(Box::pin(async move {
                client
                    .execute(target::RECORD_STREAM_TABLE, &[&node, &qualified])
                    .await
            }));
        }
    }

    /// Forgets what the worker knows of its tables' shapes after a schema change: not only
    /// of the table it named, since a change to a partitioned table changes its partitions
    /// too (rows of those may travel under their own names), and attaching or detaching a
    /// partition changes two tables. Schema changes are rare; describing again is cheap.
    fn forget_tables(&mut self) {
        self.tables.clear();
        self.statements.clear();
        self.last_statement = None;
        self.column_types.clear();
        for statements in &mut self.lane_statements {
            statements.clear();
        }
    }

    /// `apply.create_tables`: creates a table the target lacks, in the open target
    /// transaction, from the source's announced schema.
    async fn create_if_missing<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
        message: &RecordRef<'_>,
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
                    client,
                    message,
                    &format!("relation record for {qualified} has an unacceptable type name"),
                )
                .await;
        };
        if let Some(unknown) = Self::unresolved_type(client, pending, relation).await? {
            return self
                .bad_message(
                    client,
                    message,
                    &format!("relation record for {qualified}: type {unknown:?} does not exist on the target"),
                )
                .await;
        }
        tracing::info!(table = %qualified, "creating the table on the target (apply.create_tables)");
        pending.send(Box::pin(async move {
            client.batch_execute(&ddl).await.map(|_| 0)
        }));
        self.tables.remove(&qualified);
        Ok(())
    }

    /// The first column type of `relation` that does not resolve in the target's `pg_type`
    /// (`to_regtype`), checked under a savepoint so that a name PostgreSQL's parser refuses
    /// cannot abort the open target transaction.
    async fn unresolved_type<'c>(
        client: &'c Client,
        pending: &mut InFlight<'c>,
        relation: &RelationItem,
    ) -> Result<Option<String>, ApplyError> {
        pending
            .drain()
            .await
            .map_err(ApplyError::sql("applying changes"))?;
        client
            .batch_execute("SAVEPOINT pgferry_types")
            .await
            .map_err(ApplyError::sql("checking column types"))?;
        let mut unknown = None;
        for column in &relation.columns {
            let resolved = client
                .query_one("SELECT to_regtype($1) IS NOT NULL", &[&column.type_name])
                .await
                .map(|r| r.get::<_, bool>(0));
            if resolved.is_err() {
                client
                    .batch_execute("ROLLBACK TO SAVEPOINT pgferry_types")
                    .await
                    .map_err(ApplyError::sql("checking column types"))?;
            }
            if resolved.unwrap_or(false) {
                continue;
            }
            unknown = Some(column.type_name.clone());
            break;
        }
        client
            .batch_execute("RELEASE SAVEPOINT pgferry_types")
            .await
            .map_err(ApplyError::sql("checking column types"))?;
        Ok(unknown)
    }

    /// Stamps the origin, records progress and commits, all in the target transaction that
    /// holds the data: the position after its last whole source transaction. Replica mode
    /// does not wait for the COMMIT's answer: it reads and sends the next batch while the
    /// target executes and commits this one, and [`Worker::confirm_commit`] takes the answer
    /// before the next COMMIT goes out (or before the worker idles, rolls back or stops).
    /// Multi-master and careful replays wait here.
    async fn commit_batch<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
    ) -> Result<(), ApplyError> {
        let Some(done) = self.last_completed.take() else {
            return Ok(());
        };
        self.send_rows(client, pending).await?;
        self.send_lww_rows(client, pending).await?;
        if self.lww.is_some() {
            pending
                .drain()
                .await
                .map_err(ApplyError::sql("applying changes"))?;
            self.commit_lanes().await?;
        }
        // A COMMIT goes out only once the one before it succeeded: had that one failed, this
        // one's progress row would skip its records.
        self.confirm_commit(pending).await?;
        let lsn = done.commit_lsn.to_string();
        let commit_lsn = lsn.clone();
        let ts = PgTimestamp::from_unix_micros(done.commit_ts_us).to_rfc3339();
        let next = (done.offset + 1).to_string();
        let node = self.settings.node.clone();
        // Three requests, each sent when `send` polls it: nothing else may go out between.
        let origin = self.commit_statements.origin.clone();
        pending.send(Box::pin(async move {
            client.execute(&origin, &[&lsn, &ts]).await
        }));
        let progress = self.commit_statements.progress.clone();
        pending.send(Box::pin(async move {
            client
                .execute(&progress, &[&node, &next, &commit_lsn])
                .await
        }));
        pending.send(Box::pin(async move {
            client.batch_execute("COMMIT").await.map(|_| 0)
        }));
        pending.detach();
        self.committing = Some(Committing {
            done,
            txns: self.batch_txns,
            changes: self.batch_changes,
            started: self.batch_started,
            announced: std::mem::take(&mut self.announcing),
        });
        self.in_target_txn = false;
        self.batch_changes = 0;
        self.batch_txns = 0;
        self.lww_rows_sent = 0;
        self.turn_held = false;
        if self.lww.is_some() || self.careful {
            self.confirm_commit(pending).await?;
            self.careful = false;
        }
        self.count_conflicts();
        self.observe_peer_clock(client).await?;
        // Its queries go out behind the COMMIT just sent and read what it committed; the pump
        // beside the apply loop reads the COMMIT's answer meanwhile (`in_flight`).
        self.refresh_diverged(client).await
    }

    /// Waits for the answer to the COMMIT sent last, if any, and once it succeeded takes its
    /// batch as durable: the position moves and the batch is counted. A failed COMMIT (or a
    /// statement of its transaction that failed) is returned, and the position stays.
    async fn confirm_commit(&mut self, pending: &mut InFlight<'_>) -> Result<(), ApplyError> {
        let Some(sent) = self.committing.take() else {
            return Ok(());
        };
        if let Err(e) = pending.settle().await {
            for table in &sent.announced {
                self.announced.remove(table);
            }
            return Err(ApplyError::sql("committing applied transactions")(e));
        }
        let done = sent.done;
        self.committed = target::Progress {
            next_offset: done.offset + 1,
            commit_lsn: done.commit_lsn,
        };
        self.metrics.apply_transactions.inc_by(sent.txns);
        self.metrics.apply_batches.inc();
        self.metrics
            .apply_batch_changes
            .observe(sent.changes as f64);
        self.metrics
            .apply_batch_duration
            .observe(sent.started.elapsed().as_secs_f64());
        self.metrics
            .apply_lag_seconds
            .set((PgTimestamp::now().unix_micros() - done.commit_ts_us) as f64 / 1e6);
        Ok(())
    }

    async fn table(
        &mut self,
        client: &Client,
        qualified: &str,
        (schema, table): (&str, &str),
        refresh: bool,
    ) -> Result<Option<Arc<TargetTable>>, ApplyError> {
        // A table missing on the target is looked up again each time: it may be created later.
        if refresh || !self.tables.contains_key(qualified) {
            match target::describe(client, schema, table)
                .await
                .map_err(ApplyError::sql("describing a target table"))?
            {
                Some(described) => {
                    if !described.always_identity.is_empty() && !self.tables.contains_key(qualified)
                    {
                        tracing::warn!(
                            table = qualified,
                            columns = ?described.always_identity,
                            "columns outside the primary key are GENERATED ALWAYS AS IDENTITY on \
                             the target: PostgreSQL lets no UPDATE set them, so they keep the \
                             value their row was inserted with; make them GENERATED BY DEFAULT \
                             on the target (ALTER TABLE … ALTER COLUMN … SET GENERATED BY DEFAULT) \
                             for updates of them to apply"
                        );
                    }
                    self.tables
                        .insert(qualified.to_owned(), Arc::new(described))
                }
                None => self.tables.remove(qualified),
            };
        }
        Ok(self.tables.get(qualified).cloned())
    }

    fn count_applied(&mut self, qualified: &str, op: Op, rows: u64) {
        let slot = match op {
            Op::Read => 0,
            Op::Create => 1,
            Op::Update => 2,
            Op::Delete => 3,
            Op::Truncate => 4,
        };
        let metrics = &self.metrics;
        // Looked up before inserting: an entry() would allocate the name for every change.
        if !self.counters.contains_key(qualified) {
            self.counters
                .insert(qualified.to_owned(), Default::default());
        }
        let Some(counters) = self.counters.get_mut(qualified) else {
            return;
        };
        counters[slot]
            .get_or_insert_with(|| {
                metrics
                    .apply_changes
                    .with_label_values(&[qualified, op.code()])
            })
            .inc_by(rows);
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

    /// The target table a change (or snapshot rows) goes to, with every column the item names
    /// (renames and drops made on the target since are followed). `None`: the table is
    /// filtered out by `apply.tables`, or missing and the record was dead-lettered.
    async fn target_table(
        &mut self,
        client: &Client,
        message: &RecordRef<'_>,
        change: &mut impl WritesColumns,
        qualified: &str,
    ) -> Result<Option<Arc<TargetTable>>, ApplyError> {
        match admit::admit(
            change.schema(),
            qualified,
            &self.settings.apply.tables,
            &self.announced,
        ) {
            Admission::Apply => {}
            Admission::Filtered => {
                self.metrics
                    .apply_filtered
                    .with_label_values(&[&self.settings.node])
                    .inc();
                return Ok(None);
            }
            Admission::Refused(reason) => {
                self.bad_message(client, message, &reason).await?;
                return Ok(None);
            }
        }
        if self.held_back(client, message, qualified).await? {
            return Ok(None);
        }
        let names = (change.schema(), change.table());
        let mut found = self.table(client, qualified, names, false).await?;
        let renamed_to;
        let original = qualified;
        let mut qualified = qualified;
        if found.is_none() {
            // Multi-master: the writer had not seen the table dropped or renamed here yet.
            match target::table_fate(client, qualified)
                .await
                .map_err(ApplyError::sql("reading pgferry.ddl_history"))?
            {
                // Every node drops it, so the row has nowhere to be, and nothing diverges.
                Some(target::TableFate::Dropped) => {
                    self.metrics
                        .apply_filtered
                        .with_label_values(&[&self.settings.node])
                        .inc();
                    tracing::debug!(table = %qualified, "a change of a table dropped here; skipped");
                    return Ok(None);
                }
                // Every node renames it: the row goes where the table went (the caller reads
                // the new name from the item).
                Some(target::TableFate::Renamed(schema, table)) => {
                    renamed_to = format!("{schema}.{table}");
                    tracing::debug!(from = %qualified, to = %renamed_to,
                                    "a change written under a table's old name; following its rename");
                    change.follow_table(&schema, &table);
                    qualified = &renamed_to;
                    if self.held_back(client, message, qualified).await? {
                        return Ok(None);
                    }
                    let names = (change.schema(), change.table());
                    found = self.table(client, qualified, names, false).await?;
                }
                None => {}
            }
        }
        let Some(mut table) = found else {
            // Parks the table: its later changes wait behind this one, in order, and apply
            // once the table is there (a refused `SET SCHEMA` or `RENAME TO` to it, applied
            // once its cause is fixed; or the table made by hand). Plain letters were never
            // tried again, and the rows written under the new name were lost.
            let reason = format!(
                "{}table {qualified} does not exist on the target; create it there (or fix \
                 the schema change that makes it) and the table resumes",
                dead_letters::MISSING_TABLE
            );
            self.park(client, message, qualified, &reason).await?;
            return Ok(None);
        };
        if change.column_names().any(|c| !table.columns.contains(c)) {
            // Columns this table's changes were found to follow before, while the table has
            // the columns it had then.
            let missing: Vec<String> = change
                .column_names()
                .filter(|c| !table.columns.contains(c))
                .cloned()
                .collect();
            let known: Option<Vec<Option<String>>> = missing
                .iter()
                .map(|c| {
                    self.follows
                        .get(&(qualified.to_owned(), c.clone()))
                        .filter(|(columns, _)| *columns == table.columns)
                        .map(|(_, to)| to.clone())
                })
                .collect();
            if let Some(known) = known {
                for (column, to) in missing.iter().zip(known) {
                    change.follow_column(column, to.as_deref());
                }
                return Ok(Some(table));
            }
            // The source may have gained a column, or a column was renamed or dropped here
            // after the change was written (`pgferry.ddl_history`). A rename committing while
            // this looks may show in one of the table and the history and not yet in the
            // other: both are read again once before giving up.
            for attempt in 0..2 {
                let names = (change.schema(), change.table());
                table = self
                    .table(client, qualified, names, true)
                    .await?
                    .unwrap_or(table);
                let columns: Vec<String> = change
                    .column_names()
                    .filter(|c| !table.columns.contains(c))
                    .cloned()
                    .collect();
                if columns.is_empty() {
                    break;
                }
                let history = target::column_history(client, qualified)
                    .await
                    .map_err(ApplyError::sql("reading pgferry.ddl_history"))?;
                let mut unresolved = None;
                for column in columns {
                    match target::follow(&history, &column) {
                        Some(to)
                            if to
                                .as_deref()
                                .is_none_or(|t| table.columns.iter().any(|c| c == t)) =>
                        {
                            change.follow_column(&column, to.as_deref());
                            self.follows.insert(
                                (qualified.to_owned(), column.clone()),
                                (table.columns.clone(), to.clone()),
                            );
                        }
                        _ => {
                            unresolved = Some(column);
                            break;
                        }
                    }
                }
                match unresolved {
                    None => break,
                    // A change that followed its table's rename goes to the dead letters under
                    // the name it was written under, which a park (by the name here) would
                    // not hold back behind it.
                    Some(column) if attempt == 1 && qualified != original => {
                        let reason = format!(
                            "{}{column} of {qualified} (written as {original})",
                            dead_letters::MISSING_COLUMN
                        );
                        self.bad_message(client, message, &reason).await?;
                        return Ok(None);
                    }
                    Some(column) if attempt == 1 => {
                        // Parks the table, as a refused schema change does: its changes wait
                        // in order while every other table goes on, and it resumes by itself
                        // once the column exists here. (It stopped every table before.)
                        let reason = format!(
                            "{}{column} of {qualified}; add it there (ALTER TABLE {qualified} \
                             ADD COLUMN …) and the table resumes",
                            dead_letters::MISSING_COLUMN
                        );
                        self.park(client, message, qualified, &reason).await?;
                        return Ok(None);
                    }
                    Some(_) => {}
                }
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
        message: &RecordRef<'_>,
        change: Box<ChangeItem>,
    ) -> Result<(), ApplyError> {
        let mut change = *change;
        let source_table = format!("{}.{}", change.schema, change.table);
        let Some(table) = self
            .target_table(client, message, &mut change, &source_table)
            .await?
        else {
            return Ok(());
        };
        if self.held.has_table(&source_table)
            && self
                .behind_letters(client, pending, message, &source_table, &table, &change)
                .await?
        {
            return Ok(());
        }
        let qualified = format!("{}.{}", change.schema, change.table);
        let key: Vec<&str> = table.key.iter().map(String::as_str).collect();
        // Which image each bound value comes from, to honour its json_null list.
        let mut from_before = false;
        // An update carrying the whole row, as the source sends it, is applied as an upsert:
        // on a target that lacks the row (a chunked snapshot has not reached it, or dropped
        // its chunk row because this newer change went by) it inserts it; where the row
        // exists it is the same UPDATE (the upsert sets only the columns it carries). The
        // row is whole unless a TOASTed value went unsent: columns the change never carries
        // (left out of the publication's column list, generated, the target's own) get
        // their DEFAULT on insert, as the snapshot's rows of the table did.
        let whole_row = change.op == Op::Update
            && !key.is_empty()
            && change.after.is_some()
            && change.unchanged_toast.is_empty();
        let op = if whole_row { Op::Create } else { change.op };
        let (kind, columns, values): (StatementKind, Vec<String>, Vec<Box<RawValue>>) = match op {
            Op::Create | Op::Read => {
                let (columns, values) = change.after.unwrap_or_default().into_iter().unzip();
                (StatementKind::Upsert, columns, values)
            }
            Op::Update if !key.is_empty() => {
                let after = change.after.unwrap_or_default();
                // An update that moves its row to another key (capture sends one as an update,
                // not a delete and a create, when it left a TOASTed value out: the value stays
                // with the row): found by its old key, the new one set with the rest.
                let old_key: Option<Vec<Box<RawValue>>> = change
                    .before
                    .as_ref()
                    .and_then(|b| key.iter().map(|k| b.get(k).map(RawValue::to_owned)).collect());
                let moved = old_key.as_ref().is_some_and(|old| {
                    key.iter()
                        .zip(old)
                        .any(|(k, o)| after.get(k).is_some_and(|n| n.get() != o.get()))
                });
                let key_source = |k: &str| {
                    after.get(k).or_else(|| change.before.as_ref().and_then(|b| b.get(k))).map(RawValue::to_owned)
                };
                let key_values: Option<Vec<Box<RawValue>>> = if moved {
                    old_key
                } else {
                    key.iter().map(|k| key_source(k)).collect()
                };
                let Some(key_values) = key_values else {
                    return self.bad_message(client, message, &format!("update on {qualified} lacks key columns")).await;
                };
                let sets: Vec<(String, Box<RawValue>)> = after
                    .into_iter()
                    .filter(|(c, _)| (moved || !table.key.contains(c)) && !table.always_identity.contains(c))
                    .collect();
                if sets.is_empty() {
                    return Ok(());
                }
                let mut columns: Vec<String> = sets.iter().map(|(c, _)| c.clone()).collect();
                let mut values: Vec<Box<RawValue>> = sets.into_iter().map(|(_, v)| v).collect();
                columns.extend(table.key.iter().cloned());
                values.extend(key_values);
                let kind = if moved { StatementKind::UpdateKey } else { StatementKind::Update };
                (kind, columns, values)
            }
            Op::Delete if !key.is_empty() => {
                let before = change.before.unwrap_or_default();
                let values: Option<Vec<Box<RawValue>>> = key.iter().map(|k| before.get(k).map(RawValue::to_owned)).collect();
                let Some(values) = values else {
                    return self.bad_message(client, message, &format!("delete on {qualified} lacks key columns")).await;
                };
                from_before = true;
                (StatementKind::Delete, table.key.clone(), values)
            }
            Op::Delete => match change.before {
                Some(before) if before.len() == table.columns.len() => {
                    from_before = true;
                    let (columns, values) = before.into_iter().unzip();
                    (StatementKind::DeleteMatching, columns, values)
                }
                _ => {
                    return self
                        .bad_message(client, message, &format!("delete on {qualified}: the target has no primary key and the change no full old row"))
                        .await
                }
            },
            Op::Update
                if table.always_identity.is_empty()
                    && change.before.as_ref().is_some_and(|b| b.len() == table.columns.len()) =>
            {
                return self.apply_update_matching(client, pending, message, &table, change).await;
            }
            Op::Update => {
                return self
                    .bad_message(client, message, &format!("update on {qualified}: the target table has no primary key, and the change no full old row or the table a GENERATED ALWAYS identity column to find and set its row by"))
                    .await
            }
            Op::Truncate => (StatementKind::Truncate, Vec::new(), Vec::new()),
        };
        let json_nulls = if from_before {
            &change.json_null_before
        } else {
            &change.json_null_after
        };
        let (schema, name) = (change.schema.as_str(), change.table.as_str());
        let stmt = self
            .change_statement(
                client,
                (schema, name),
                kind,
                &columns,
                &key,
                &table.always_identity,
            )
            .await?;
        let params =
            match Self::render_params(stmt.params(), &columns, &values, json_nulls, &qualified) {
                Ok(params) => params,
                Err(reason) => return self.bad_message(client, message, &reason).await,
            };
        self.write_row(
            client,
            pending,
            &table,
            &key,
            (schema, name),
            &qualified,
            kind,
            stmt,
            columns,
            params,
        )
        .await?;
        self.batch_changes += 1;
        self.count_applied(&qualified, change.op, 1);
        Ok(())
    }

    /// An update of a table without a key, carrying its whole old row (`REPLICA IDENTITY
    /// FULL`): one row equal to the old image takes the new one, or the new one is inserted
    /// where none is. Capture sends most such updates as a delete and a create; these are the
    /// rest: one that changed no value (`SET v = v`: during a snapshot by pages, the chunk
    /// leaves the row to it), and one keyed by a primary key the table got later.
    async fn apply_update_matching<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
        message: &RecordRef<'_>,
        table: &TargetTable,
        change: ChangeItem,
    ) -> Result<(), ApplyError> {
        let qualified = format!("{}.{}", change.schema, change.table);
        let before = change.before.unwrap_or_default();
        let after = change.after.unwrap_or_default();
        // Columns the new image leaves out (unchanged TOAST) keep the old image's values.
        let (columns, old): (Vec<String>, Vec<Box<RawValue>>) = before.into_iter().unzip();
        let new: Vec<Box<RawValue>> = columns
            .iter()
            .zip(&old)
            .map(|(c, o)| after.get(c).unwrap_or(o).to_owned())
            .collect();
        let doubled: Vec<String> = columns.iter().chain(&columns).cloned().collect();
        let (schema, name) = (change.schema.as_str(), change.table.as_str());
        let kind = StatementKind::UpdateMatching;
        let stmt = self
            .change_statement(client, (schema, name), kind, &doubled, &[], &[])
            .await?;
        let n = columns.len();
        let types = stmt.params();
        let rendered = Self::render_params(
            &types[..n],
            &columns,
            &old,
            &change.json_null_before,
            &qualified,
        )
        .and_then(|mut params| {
            params.extend(Self::render_params(
                &types[n..],
                &columns,
                &new,
                &change.json_null_after,
                &qualified,
            )?);
            Ok(params)
        });
        let params = match rendered {
            Ok(params) => params,
            Err(reason) => return self.bad_message(client, message, &reason).await,
        };
        self.write_row(
            client,
            pending,
            table,
            &[],
            (schema, name),
            &qualified,
            kind,
            stmt,
            doubled,
            params,
        )
        .await?;
        self.batch_changes += 1;
        self.count_applied(&qualified, Op::Update, 1);
        Ok(())
    }

    /// Applies snapshot rows (a `rows` item) as `op: "r"` changes: with one `COPY` when they
    /// are many and the table takes batches (see [`copy`]; a COPY that meets an existing key
    /// gives way to upserts, same outcome), else each as an upsert.
    async fn apply_rows<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
        message: &RecordRef<'_>,
        rows: Box<RowsItem>,
    ) -> Result<(), ApplyError> {
        if self.lww.is_some() {
            let reason = "snapshot rows in COPY form (a `rows` item) reached a multi-master \
                          applier, which needs each row's version: the node that wrote this \
                          stream is not configured as multi-master";
            return self.bad_message(client, message, reason).await;
        }
        let mut rows = *rows;
        let source_table = format!("{}.{}", rows.schema, rows.table);
        // Read before columns are followed to the target's names (the range names the
        // source's key).
        let row_keys = rows.row_keys();
        let Some(table) = self
            .target_table(client, message, &mut rows, &source_table)
            .await?
        else {
            return Ok(());
        };
        if self.held.has_table(&source_table) {
            let held = self
                .rows_behind_letters(client, pending, message, &source_table, &table, &rows)
                .await?;
            if !held.is_empty() {
                self.hold_rows(client, message, &mut rows, &held).await?;
            }
        }
        let qualified = format!("{}.{}", rows.schema, rows.table);
        let count = rows.len();
        let text = bytes::Bytes::from(std::mem::take(&mut rows.copy));
        let names = (rows.schema.as_str(), rows.table.as_str());
        self.batch_changes += count as u64;
        self.count_applied(&qualified, Op::Read, count as u64);
        let worth = copy::worth_copying(count, text.len());
        if !self.careful && table.uniques.is_empty() && self.copy.try_copy(&qualified, worth) {
            // The changes before the rows are written first.
            self.send_rows(client, pending).await?;
            let pieces = std::slice::from_ref(&text);
            let outcome = self
                .copy_after(client, pending, names, &rows.names, pieces)
                .await?;
            if outcome == copy::Outcome::Written {
                return self.prune(client, pending, &table, &rows, row_keys).await;
            }
        }
        // The rows go into a set batch of their own: the batch folds a key's changes by the
        // spelling of the key's values, and COPY's text spells some values (a timestamptz,
        // say) other than the changes' JSON does, so one row could otherwise sit in a batch
        // twice, and its two writes would not be ordered (or the upsert would meet it twice).
        self.send_rows(client, pending).await?;
        let key: Vec<&str> = table.key.iter().map(String::as_str).collect();
        let stmt = self
            .change_statement(
                client,
                names,
                StatementKind::Upsert,
                &rows.names,
                &key,
                &table.always_identity,
            )
            .await?;
        for values in copy_text::decode(&text) {
            if values.len() != rows.names.len() {
                let reason = format!(
                    "snapshot rows of {qualified}: a row has {} values for {} columns",
                    values.len(),
                    rows.names.len()
                );
                return self.bad_message(client, message, &reason).await;
            }
            let params = values.into_iter().map(TextParam).collect();
            let (kind, columns) = (StatementKind::Upsert, rows.names.clone());
            self.write_row(
                client,
                pending,
                &table,
                &key,
                names,
                &qualified,
                kind,
                stmt.clone(),
                columns,
                params,
            )
            .await?;
            pending.throttle().await?;
        }
        self.send_rows(client, pending).await?;
        self.prune(client, pending, &table, &rows, row_keys).await
    }

    /// A re-snapshot's range ([`crate::event::PruneRange`]): deletes the target's rows in it
    /// whose key is neither one of the item's rows (`row_keys`, written just before) nor
    /// kept. Skipped, and logged once per table, when the target's key is not the range's
    /// (other columns or types, so not ordered as the source's chunk was) or the rows' keys
    /// cannot be read.
    async fn prune<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
        table: &TargetTable,
        rows: &RowsItem,
        row_keys: Option<Vec<Vec<String>>>,
    ) -> Result<(), ApplyError> {
        let Some(range) = &rows.prune else {
            return Ok(());
        };
        // Ordered alike: the same key columns, of the same types, under the same collations.
        // (Whatever order the target declares them in: the range compares them in its own.)
        let same_key = table.key.len() == range.key.len()
            && range.key.iter().all(|k| table.key.contains(k))
            && range.types.len() == range.key.len()
            && range.orders.len() == range.key.len()
            && range.key.iter().enumerate().all(|(i, k)| {
                table.type_of(k) == Some(range.types[i].as_str())
                    && table.order_of(k) == Some(range.orders[i].as_str())
            });
        let Some(row_keys) = row_keys else {
            self.unpruned(rows, "its rows' key values cannot be read");
            return Ok(());
        };
        if !same_key {
            let why = format!(
                "the target's key columns, their types or their collations are not the \
                 source's ({:?} {:?} {:?} here), so a key range may hold other rows here",
                range.key, range.types, range.orders
            );
            self.unpruned(rows, &why);
            return Ok(());
        }
        self.send_rows(client, pending).await?;
        pending
            .drain()
            .await
            .map_err(ApplyError::sql("applying changes"))?;
        let typed: Vec<sql::Typed<'_>> = range
            .key
            .iter()
            .zip(&range.types)
            .map(|(name, ty)| sql::Typed {
                name,
                ty,
                fixed: false,
            })
            .collect();
        let (after, through, only) = (
            range.after.is_some(),
            range.through.is_some(),
            // A partitioned table holds no rows itself; a plain one is pruned without its
            // inheritance children, as the source read it.
            !table.partitioned,
        );
        let text = || sql::prune_range(&rows.schema, &rows.table, &typed, after, through, only);
        let key = StatementKey::new(
            rows.schema.as_str(),
            rows.table.as_str(),
            StatementKind::Prune {
                after,
                through,
                only,
            },
            range.key.iter().chain(&range.types).cloned().collect(),
        );
        let stmt = self.statement(client, key, text).await?;
        let mut params: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> = Vec::new();
        for bound in [&range.after, &range.through].into_iter().flatten() {
            params.extend(bound.iter().map(|v| {
                Box::new(v.clone()) as Box<dyn tokio_postgres::types::ToSql + Sync + Send>
            }));
        }
        let keys = row_keys.iter().chain(&range.keep);
        let columns = plan::columns_of(
            keys.map(|k| k.iter().cloned().map(Some).collect())
                .collect(),
            range.key.len(),
        );
        params.extend(
            columns
                .into_iter()
                .map(|c| Box::new(c) as Box<dyn tokio_postgres::types::ToSql + Sync + Send>),
        );
        let deleted = client
            .execute_raw(&stmt, params)
            .await
            .map_err(ApplyError::sql("deleting rows a re-snapshot did not find"))?;
        let qualified = format!("{}.{}", rows.schema, rows.table);
        if deleted > 0 {
            self.metrics
                .apply_rows_pruned
                .with_label_values(&[&qualified])
                .inc_by(deleted);
            tracing::debug!(table = %qualified, deleted, "re-snapshot removed rows the source no longer has");
        }
        Ok(())
    }

    /// The prepared statement of `kind` for `columns` of a table (`fixed`: its columns no
    /// UPDATE may set, [`TargetTable::always_identity`]). Runs of changes share their
    /// statement (a snapshot's rows, a bulk load): compared in place, without building and
    /// hashing a key per change.
    async fn change_statement(
        &mut self,
        client: &Client,
        (schema, name): (&str, &str),
        kind: StatementKind,
        columns: &[String],
        key: &[&str],
        fixed: &[String],
    ) -> Result<Statement, ApplyError> {
        let last = self.last_statement.as_ref().filter(|(k, _)| {
            k.kind == kind && k.table == name && k.schema == schema && k.columns == columns
        });
        if let Some((_, stmt)) = last {
            return Ok(stmt.clone());
        }
        let cols: Vec<&str> = columns.iter().map(String::as_str).collect();
        let text = || match kind {
            StatementKind::Upsert => {
                let fixed: Vec<&str> = fixed.iter().map(String::as_str).collect();
                sql::upsert(schema, name, &cols, key, &fixed)
            }
            StatementKind::Update | StatementKind::UpdateKey => {
                sql::update(schema, name, &cols[..cols.len() - key.len()], key)
            }
            StatementKind::Delete => sql::delete(schema, name, key),
            StatementKind::DeleteMatching => sql::delete_one_matching(schema, name, &cols),
            StatementKind::UpdateMatching => {
                sql::update_one_matching(schema, name, &cols[..cols.len() / 2])
            }
            _ => sql::truncate(schema, name),
        };
        let stmt_key = StatementKey::new(schema, name, kind, columns.to_vec());
        let stmt = self.statement(client, stmt_key.clone(), text).await?;
        self.last_statement = Some((stmt_key, stmt.clone()));
        Ok(stmt)
    }

    /// Writes one row change, its values as text parameters of `stmt`: rows of keyed tables
    /// without secondary unique indexes go into the set batch (see [`super::plan`]); anything
    /// else is sent alone, after the batch.
    #[allow(clippy::too_many_arguments)]
    async fn write_row<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
        table: &TargetTable,
        key: &[&str],
        (schema, name): (&str, &str),
        qualified: &str,
        kind: StatementKind,
        stmt: Statement,
        columns: Vec<String>,
        params: Vec<TextParam>,
    ) -> Result<(), ApplyError> {
        let write = match kind {
            StatementKind::Upsert => Some(RowWrite::Upsert),
            StatementKind::Update => Some(RowWrite::Update {
                set: columns.len() - key.len(),
            }),
            StatementKind::Delete => Some(RowWrite::Delete),
            _ => None,
        };
        match write {
            Some(write) if !self.careful && table.uniques.is_empty() && table.key_spelled_once => {
                let key_at: Vec<usize> = match write {
                    RowWrite::Upsert => key
                        .iter()
                        .filter_map(|k| columns.iter().position(|c| c == k))
                        .collect(),
                    RowWrite::Update { set } => (set..columns.len()).collect(),
                    RowWrite::Delete => (0..columns.len()).collect(),
                };
                // A keyless table's inserts commute with each other (its deletes are sent
                // alone, after the batch): each row gets a key of its own.
                let row_key = if key.is_empty() {
                    plan::row_key(qualified, [Some(self.rows.len().to_string().as_str())])
                } else {
                    plan::row_key(qualified, key_at.iter().map(|&i| params[i].0.as_deref()))
                };
                let mut values: plan::Values = columns
                    .into_iter()
                    .zip(params.into_iter().map(|p| p.0))
                    .collect();
                let row = match write {
                    RowWrite::Upsert => RowChange::Upsert(values),
                    RowWrite::Update { set } => {
                        let key = values.split_off(set);
                        RowChange::Update { set: values, key }
                    }
                    RowWrite::Delete => RowChange::Delete(values),
                };
                if let Err((row_key, row)) = self.rows.push(schema, name, row_key, row) {
                    // The key's changes cannot fold into one: send the batch, start anew.
                    self.send_rows(client, pending).await?;
                    self.rows.add(schema, name, row_key, row);
                }
                if self.rows.len() >= ROWS_PER_STATEMENT {
                    self.send_rows(client, pending).await?;
                }
            }
            _ => {
                self.send_rows(client, pending).await?;
                pending.send(Box::pin(
                    async move { client.execute_raw(&stmt, params).await },
                ));
            }
        }
        Ok(())
    }

    /// Writes rows with COPY ([`copy_rows`]) once the statements sent before have answered (a
    /// failure of theirs would otherwise be taken for the COPY's), and records the outcome for
    /// the table's next batches ([`copy::CopyChoice`]) and the metric.
    async fn copy_after<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
        (schema, table): (&str, &str),
        columns: &[String],
        pieces: &[bytes::Bytes],
    ) -> Result<copy::Outcome, ApplyError> {
        pending
            .drain()
            .await
            .map_err(ApplyError::sql("applying changes"))?;
        let outcome = copy_rows(client, (schema, table), columns, pieces).await?;
        self.metrics
            .apply_copy_batches
            .with_label_values(&[outcome.label()])
            .inc();
        self.copy.record(&format!("{schema}.{table}"), outcome);
        Ok(outcome)
    }

    /// Sends the set batch of replica mode: one multi-row statement per group.
    async fn send_rows<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
    ) -> Result<(), ApplyError> {
        for (group, rows) in self.rows.take() {
            let qualified = format!("{}.{}", group.schema, group.table);
            let names = (group.schema.as_str(), group.table.as_str());
            let Some(table) = self.table(client, &qualified, names, false).await? else {
                return Err(ApplyError::ColumnMissing {
                    table: qualified,
                    column: group.columns.first().cloned().unwrap_or_default(),
                });
            };
            let rows = if group.write == RowWrite::Upsert
                && self.copy.try_copy(&qualified, rows.len() >= copy::MIN_ROWS)
            {
                let pieces = copy::encode(rows);
                let names = (group.schema.as_str(), group.table.as_str());
                let outcome = self
                    .copy_after(client, pending, names, &group.columns, &pieces)
                    .await?;
                if outcome == copy::Outcome::Written {
                    continue;
                }
                copy::decode(&pieces)
            } else {
                rows
            };
            let typed = lww::typed(&table, &group.columns);
            let text = match group.write {
                RowWrite::Upsert => {
                    let key: Vec<&str> = table.key.iter().map(String::as_str).collect();
                    sql::upsert_rows(&group.schema, &group.table, &typed, &key)
                }
                RowWrite::Update { set } => {
                    sql::update_rows(&group.schema, &group.table, &typed[..set], &typed[set..])
                }
                RowWrite::Delete => sql::delete_rows(&group.schema, &group.table, &typed),
            };
            let width = group.columns.len();
            let key = StatementKey::new(
                group.schema,
                group.table,
                StatementKind::Rows(group.write),
                group.columns,
            );
            let stmt = self.statement(client, key, || text).await?;
            let arrays = plan::columns_of(rows, width);
            pending.send(Box::pin(
                async move { client.execute_raw(&stmt, arrays).await },
            ));
        }
        Ok(())
    }

    /// Dead-letters a record whose table must wait for it (`reason` begins as one of
    /// [`dead_letters`]' parking reasons), and parks the table: its later changes are
    /// dead-lettered behind it, in order, until they all apply ([`Worker::unpark_due`]).
    async fn park(
        &mut self,
        client: &Client,
        message: &RecordRef<'_>,
        table: &str,
        reason: &str,
    ) -> Result<(), ApplyError> {
        self.bad_message(client, message, reason).await?;
        self.parked
            .insert(table.to_owned(), std::time::Instant::now());
        Ok(())
    }

    /// A record that cannot be applied (`apply.on_poison`): stop, or dead-letter it: to the
    /// dead-letter topic (durably, before the batch that skips it can commit) and into the
    /// target's `pgferry.dead_letters` (in the open target transaction, so it commits with
    /// the progress that skips the record), which marks its table diverged. Never silently
    /// dropped.
    async fn bad_message(
        &mut self,
        client: &Client,
        message: &RecordRef<'_>,
        reason: &str,
    ) -> Result<(), ApplyError> {
        self.metrics.apply_dead_letters.inc();
        let mut location = format!(
            "{}[{}]@{} item {}",
            message.topic, message.partition, message.offset, message.item
        );
        if let Some(row) = message.row {
            location.push_str(&format!(" row {row}"));
        }
        if self.settings.apply.on_poison == OnPoison::Stop {
            return Err(ApplyError::BadMessage {
                location,
                reason: reason.to_owned(),
            });
        }
        let table = named_table(message.payload);
        tracing::warn!(%location, table = table.as_deref().unwrap_or("?"), %reason,
                       topic = %self.dead_letter_topic, "dead-lettering a record");
        let payload = message.payload.map(String::from_utf8_lossy);
        let payload_bytes = payload.as_ref().map_or(0, |p| p.len());
        let max_bytes = self.settings.kafka.max_message_bytes;
        let target = self.settings.target.url.display_target();
        let letter = DeadLetter {
            stage: "apply",
            node: &self.settings.node,
            table: table.clone(),
            topic: Some(message.topic),
            partition: Some(message.partition),
            offset: Some(message.offset),
            item: Some(message.item),
            row: message.row,
            target: Some(target),
            error: reason,
            payload: payload
                .as_deref()
                .filter(|p| dead_letter::fits(p.len(), max_bytes)),
            payload_bytes,
            ..DeadLetter::default()
        }
        .record(&self.dead_letter_topic);
        let mut kafka = FutureRecord::<[u8], [u8]>::to(&letter.topic);
        if let Some(key) = &letter.key {
            kafka = kafka.key(key.as_slice());
        }
        if let Some(value) = &letter.value {
            kafka = kafka.payload(value.as_slice());
        }
        self.dead_letters
            .send(kafka, Duration::from_secs(60))
            .await
            .map_err(|(e, _)| ApplyError::Kafka(e))?;
        let letter = StoredLetter {
            stage: "apply",
            table,
            lsn: None,
            reason,
            payload: payload.map(|p| p.into_owned()),
        };
        self.store_letter(client, message, letter).await
    }

    /// Records a dead letter in the target's `pgferry.dead_letters`: in the open target
    /// transaction, or alone when none is open.
    async fn store_letter(
        &mut self,
        client: &Client,
        message: &RecordRef<'_>,
        letter: StoredLetter<'_>,
    ) -> Result<(), ApplyError> {
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 10] = [
            &self.settings.node,
            &letter.stage,
            &letter.table,
            &message.topic,
            &message.offset.to_string(),
            &letter.lsn,
            &letter.reason,
            &letter.payload,
            &message.item.to_string(),
            &message.row.unwrap_or(0).to_string(),
        ];
        let id = client
            .query_opt(target::RECORD_DEAD_LETTER, &params)
            .await
            .map_err(ApplyError::sql(
                "recording a dead letter in pgferry.dead_letters",
            ))?
            .map(|row| row.get::<_, i64>(0));
        self.letters_pending = true;
        match (id, letter.stage, &letter.payload) {
            (Some(id), "apply", Some(payload)) => self.hold_letter(client, id, payload).await,
            // Recorded before (a replayed batch): already read into `held`.
            _ => Ok(()),
        }
    }

    /// A `skipped` record: capture dead-lettered a change of this table, so the target misses
    /// it. Recorded like an apply dead letter (the letter itself is already in Kafka).
    async fn record_capture_letter<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
        message: &RecordRef<'_>,
        skipped: &SkippedItem,
    ) -> Result<(), ApplyError> {
        self.metrics.apply_dead_letters.inc();
        pending
            .drain()
            .await
            .map_err(ApplyError::sql("applying changes"))?;
        let table = format!("{}.{}", skipped.schema, skipped.table);
        tracing::warn!(node = %self.settings.node, %table, lsn = %skipped.lsn, error = %skipped.error,
                       "capture dead-lettered a change of this table; the target misses it");
        let letter = StoredLetter {
            stage: "capture",
            table: Some(table),
            lsn: Some(skipped.lsn.clone()),
            reason: &skipped.error,
            payload: None,
        };
        self.store_letter(client, message, letter).await
    }

    /// Applies one change by the mode's rules and waits for every statement's result.
    async fn apply_and_wait<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
        message: &RecordRef<'_>,
        work: Work,
        commit_ts_us: i64,
    ) -> Result<(), ApplyError> {
        match work {
            Work::Change(change) if self.lww.is_some() => {
                self.apply_change_lww(client, pending, message, change, commit_ts_us)
                    .await?;
                self.send_lww_rows(client, pending).await?;
            }
            Work::Change(change) => {
                self.apply_change(client, pending, message, change).await?;
                self.send_rows(client, pending).await?;
            }
            Work::Rows(rows) => {
                self.apply_rows(client, pending, message, rows).await?;
                self.send_rows(client, pending).await?;
            }
        }
        pending
            .drain()
            .await
            .map_err(ApplyError::sql("applying a change"))
    }

    /// Applies one change under a savepoint, waiting for its result: a change the target
    /// rejects (see [`ApplyError::is_rejection`]) is rolled back to the savepoint and
    /// dead-lettered, and the transaction goes on.
    async fn apply_carefully<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
        message: &RecordRef<'_>,
        work: Work,
        commit_ts_us: i64,
    ) -> Result<(), ApplyError> {
        pending
            .drain()
            .await
            .map_err(ApplyError::sql("applying changes"))?;
        // Outside the savepoint: rolling back to it would give the turn up.
        self.take_turn(client).await?;
        client
            .batch_execute("SAVEPOINT pgferry_change")
            .await
            .map_err(ApplyError::sql("setting a savepoint"))?;
        // The letters the change would supersede stay unless it applies.
        let held = (self.held.clone(), self.held_seen);
        let truncates = matches!(&work, Work::Change(c) if c.op == Op::Truncate);
        let applied = self
            .apply_and_wait(client, pending, message, work, commit_ts_us)
            .await;
        match applied {
            Ok(()) => client
                .batch_execute("RELEASE SAVEPOINT pgferry_change")
                .await
                .map_err(ApplyError::sql("releasing a savepoint")),
            Err(e) if e.is_rejection() => {
                client
                    .batch_execute("ROLLBACK TO SAVEPOINT pgferry_change")
                    .await
                    .map_err(ApplyError::sql("rolling back to a savepoint"))?;
                (self.held, self.held_seen) = held;
                let parks = if e.is_access_refused() {
                    Some(format!(
                        "{}{}: grant the apply role SELECT, INSERT, UPDATE, DELETE and TRUNCATE \
                         on it, and BYPASSRLS where it has row-level security (`pgferry roles` \
                         prints them); the table resumes by itself",
                        dead_letters::ACCESS_REFUSED,
                        ErrorChain(&e)
                    ))
                } else if truncates {
                    Some(format!(
                        "{}{}: the table's later changes wait behind it; fix the cause and the \
                         table resumes by itself",
                        dead_letters::TRUNCATE_REFUSED,
                        ErrorChain(&e)
                    ))
                } else {
                    None
                };
                if let (Some(reason), Some(table)) = (parks, named_table(message.payload)) {
                    return self.park(client, message, &table, &reason).await;
                }
                let reason = format!("the target rejected the change: {}", ErrorChain(&e));
                self.bad_message(client, message, &reason).await
            }
            Err(e) => Err(e),
        }
    }

    /// The last commit LSN the target holds: the committed one, or just below the seed's
    /// consistent point while the worker has not applied past it (transactions committed
    /// before that point are in the seed's copy; the framer skips them).
    fn applied_floor(&self) -> Lsn {
        self.committed
            .commit_lsn
            .max(Lsn(self.seeded_at.0.saturating_sub(1)))
    }

    /// Checks that the stored position still points into this node's stream as the target
    /// last saw it ([`super::position`]), and sets the retention headroom metric.
    async fn verify_position(&self, topic: &str) -> Result<(), ApplyError> {
        let (kafka, owned_topic) = (self.settings.kafka.clone(), topic.to_owned());
        let (next, applied) = (self.committed.next_offset, self.committed.commit_lsn);
        let verdict = tokio::task::spawn_blocking(move || {
            super::position::check(&kafka, &owned_topic, next, applied)
        })
        .await
        .map_err(|_| ApplyError::Kafka(KafkaError::Canceled))?
        .map_err(ApplyError::Kafka)?;
        self.metrics
            .apply_retention_headroom
            .with_label_values(&[&self.settings.node])
            .set(next - verdict.low);
        match verdict.gap {
            Some(detail) => Err(self.gap(topic, detail)),
            None => Ok(()),
        }
    }

    /// The stream lost records this target has not applied.
    fn gap(&self, topic: &str, detail: String) -> ApplyError {
        ApplyError::Gap {
            node: self.settings.node.clone(),
            topic: topic.to_owned(),
            next_offset: self.committed.next_offset,
            commit_lsn: self.committed.commit_lsn,
            detail,
        }
    }

    /// Replays one letter in its own target transaction (`pgferry dead-letters replay`).
    /// `false`: the letter was resolved meanwhile (by the apply worker, which applies a
    /// parked table's letters itself, see [`Worker::unpark_due`]): nothing to do.
    async fn replay_one(
        &mut self,
        client: &Client,
        letter: &StoredDeadLetter,
    ) -> Result<bool, ApplyError> {
        client
            .batch_execute("BEGIN")
            .await
            .map_err(ApplyError::sql("beginning the replay"))?;
        let open = client
            .query_opt(
                "SELECT 1 FROM pgferry.dead_letters WHERE id = $1 AND resolved_at IS NULL FOR UPDATE",
                &[&letter.id],
            )
            .await
            .map_err(ApplyError::sql("locking the letter"))?
            .is_some();
        if open {
            self.replay_letter(client, letter).await?;
        }
        client
            .batch_execute("COMMIT")
            .await
            .map_err(ApplyError::sql("committing the replay"))?;
        Ok(open)
    }

    /// Applies one letter's record in the open target transaction and marks it replayed.
    async fn replay_letter(
        &mut self,
        client: &Client,
        letter: &StoredDeadLetter,
    ) -> Result<(), ApplyError> {
        let refuse = |reason: &str| refused_letter(letter, reason);
        let Some(payload) = letter.payload.as_deref() else {
            return Err(refuse(
                "it holds no record (capture could not publish the change): copy the row from \
                 the source, then `pgferry dead-letters resolve`",
            ));
        };
        let (_, item) = parse_framed(Some(payload.as_bytes()))
            .map_err(|e| refuse(&format!("its record does not parse: {e}")))?;
        let commit_ts_us = commit_ts_of(payload.as_bytes()).unwrap_or_default();
        let record = RecordRef {
            topic: &letter.topic,
            partition: 0,
            offset: letter.offset,
            item: u32::try_from(letter.item).unwrap_or_default(),
            row: None,
            payload: Some(payload.as_bytes()),
        };
        let mut pending = InFlight::default();
        let pump = pending.clone();
        self.replaying = Some(letter.id);
        let applied = pump
            .beside(self.replay_item(client, &mut pending, &record, item, letter, commit_ts_us))
            .await;
        self.replaying = None;
        applied?;
        client
            .execute(
                "UPDATE pgferry.dead_letters SET resolved_at = now(), resolution = 'replayed'
                  WHERE id = $1",
                &[&letter.id],
            )
            .await
            .map_err(ApplyError::sql("marking the letter resolved"))?;
        self.held.remove(letter.id);
        self.held_seen = None;
        Ok(())
    }

    /// Applies a letter's parsed record (see [`Worker::replay_letter`]).
    async fn replay_item<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
        record: &RecordRef<'_>,
        item: StreamItem,
        letter: &StoredDeadLetter,
        commit_ts_us: i64,
    ) -> Result<(), ApplyError> {
        let refuse = |reason: &str| refused_letter(letter, reason);
        let work =
            match item {
                StreamItem::Change(change) => Some(Work::Change(change)),
                // A re-snapshot's range is pruned only where nothing of the table applied after
                // it: behind a parking schema change (every later change of the table is a letter
                // after it). Elsewhere the stream went on, and the range would remove rows written
                // since; the rows are upserted alone.
                StreamItem::Rows(mut rows) => {
                    if rows.prune.is_some() && !dead_letters::parks(letter) {
                        tracing::info!(letter = letter.id,
                        "replaying a re-snapshot's rows without pruning their range: the table's \
                         later changes were applied meanwhile");
                        rows.prune = None;
                    }
                    Some(Work::Rows(rows))
                }
                // A schema change the target refused (a type it lacked, …): its ops again, each
                // made or found made. Its commit LSN is not kept with the letter, so the move it
                // records (multi-master) counts as seen by every node.
                StreamItem::Ddl(ddl) => {
                    self.apply_ddl(client, pending, record, &ddl, Lsn::default())
                        .await?;
                    pending
                        .drain()
                        .await
                        .map_err(ApplyError::sql("replaying a schema change"))?;
                    None
                }
                _ => return Err(refuse("its record is neither a change nor a schema change")),
            };
        if let Some(work) = work {
            self.apply_and_wait(client, pending, record, work, commit_ts_us)
                .await?;
        }
        Ok(())
    }

    /// The table of `rows` cannot be pruned here (`why`): logged once per table.
    fn unpruned(&mut self, rows: &RowsItem, why: &str) {
        let qualified = format!("{}.{}", rows.schema, rows.table);
        if self.unpruned.insert(qualified.clone()) {
            tracing::warn!(table = %qualified,
                "a re-snapshot does not delete this table's rows the source no longer has: {why}");
        }
    }

    /// Whether `table` is parked ([`Worker::parked`]): if so, the record is dead-lettered
    /// behind the schema change it waits for.
    async fn held_back(
        &mut self,
        client: &Client,
        message: &RecordRef<'_>,
        table: &str,
    ) -> Result<bool, ApplyError> {
        if !self.parked.contains_key(table) {
            return Ok(false);
        }
        self.bad_message(client, message, dead_letters::PARKED)
            .await?;
        Ok(true)
    }

    /// Reads which tables are parked ([`Worker::parked`]) from the target.
    async fn reload_parked(&mut self, client: &Client) -> Result<(), ApplyError> {
        let tables = dead_letters::parked_tables(client, &self.settings.node)
            .await
            .map_err(ApplyError::sql("reading pgferry.dead_letters"))?;
        let now = std::time::Instant::now();
        let mut parked = HashMap::with_capacity(tables.len());
        for table in tables {
            // A table parked before keeps its last try; one newly read is tried at once.
            let tried = self.parked.get(&table).copied().unwrap_or(now - PARK_RETRY);
            parked.insert(table, tried);
        }
        self.parked = parked;
        Ok(())
    }

    /// While the stream is idle, between target transactions: [`Worker::unpark_due`] in a
    /// transaction of its own, so that a parked table resumes once its cause is fixed, not
    /// only when the next change arrives.
    async fn unpark_idle<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
    ) -> Result<(), ApplyError> {
        let due = self.parked_due();
        if due.is_empty() {
            return Ok(());
        }
        client
            .batch_execute("BEGIN")
            .await
            .map_err(ApplyError::sql("beginning a transaction"))?;
        self.unpark(client, pending, due).await?;
        self.commit_lanes().await?;
        client
            .batch_execute("COMMIT")
            .await
            .map_err(ApplyError::sql("committing a parked table's letters"))?;
        self.ddl_open = false;
        self.refresh_diverged(client).await
    }

    /// At the start of a target transaction: for each parked table not tried for
    /// [`PARK_RETRY`], applies its letters again, oldest first (the refused schema change,
    /// then the changes parked behind it), under a savepoint. If they all apply (the operator
    /// fixed the cause: created the type, freed the name, …), they are marked replayed and
    /// the table resumes, its changes in their order; if one fails, everything of the attempt
    /// is undone and the table stays parked.
    async fn unpark_due<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
    ) -> Result<(), ApplyError> {
        let due = self.parked_due();
        if due.is_empty() {
            return Ok(());
        }
        self.unpark(client, pending, due).await
    }

    /// Parked tables not tried for [`PARK_RETRY`].
    fn parked_due(&self) -> Vec<String> {
        self.parked
            .iter()
            .filter(|(_, tried)| tried.elapsed() >= PARK_RETRY)
            .map(|(table, _)| table.clone())
            .collect()
    }

    /// [`Worker::unpark_due`] of the tables `due`.
    async fn unpark<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
        due: Vec<String>,
    ) -> Result<(), ApplyError> {
        pending
            .drain()
            .await
            .map_err(ApplyError::sql("beginning a transaction"))?;
        for table in due {
            self.parked.remove(&table);
            client
                .batch_execute("SAVEPOINT pgferry_unpark")
                .await
                .map_err(ApplyError::sql("setting a savepoint"))?;
            // A letter that fails again fails the attempt rather than being dead-lettered.
            let on_poison = std::mem::replace(&mut self.settings.apply.on_poison, OnPoison::Stop);
            let attempt = async {
                let letters = dead_letters::parked(client, &self.settings.node, &table)
                    .await
                    .map_err(ApplyError::sql("reading the parked letters"))?;
                for letter in &letters {
                    self.replay_letter(client, letter).await?;
                }
                Ok::<_, ApplyError>(letters.len())
            }
            .await;
            self.settings.apply.on_poison = on_poison;
            match attempt {
                Ok(letters) => {
                    client
                        .batch_execute("RELEASE SAVEPOINT pgferry_unpark")
                        .await
                        .map_err(ApplyError::sql("releasing a savepoint"))?;
                    tracing::info!(node = %self.settings.node, %table, letters,
                                   "parked table resumes: the schema change the target refused, and the table's changes since, applied in order");
                    self.letters_pending = true;
                }
                Err(e) => {
                    tracing::debug!(%table, error = %ErrorChain(&e), "table still parked");
                    client
                        .batch_execute(
                            "ROLLBACK TO SAVEPOINT pgferry_unpark; RELEASE SAVEPOINT pgferry_unpark",
                        )
                        .await
                        .map_err(ApplyError::sql("undoing an attempt to unpark a table"))?;
                    // Shapes and statements may describe what the savepoint undid.
                    self.forget_tables();
                    self.read_held(client, true).await?;
                    self.parked.insert(table, std::time::Instant::now());
                }
            }
        }
        Ok(())
    }

    /// Whether [`Worker::refresh_diverged`] reads the letters again: one was recorded (or
    /// resolved) since, or [`DIVERGED_RECHECK`] passed.
    fn diverged_refresh_due(&self) -> bool {
        self.letters_pending || self.diverged_checked.elapsed() >= DIVERGED_RECHECK
    }

    /// Reads which tables have unresolved dead letters, for readiness and the metric.
    /// Runs after a letter was recorded, and every [`DIVERGED_RECHECK`] between transactions
    /// (an operator may have resolved letters).
    async fn refresh_diverged(&mut self, client: &Client) -> Result<(), ApplyError> {
        if !self.diverged_refresh_due() {
            return Ok(());
        }
        let tables = target::diverged_tables(client, &self.settings.node)
            .await
            .map_err(ApplyError::sql("reading pgferry.dead_letters"))?;
        self.diverged_checked = std::time::Instant::now();
        let target = self.settings.target.url.display_target();
        for table in self.diverged.iter().filter(|t| !tables.contains(t)) {
            self.metrics
                .tables_diverged
                .with_label_values(&[&target, table])
                .set(0);
        }
        for table in &tables {
            self.metrics
                .tables_diverged
                .with_label_values(&[&target, table])
                .set(1);
        }
        if !tables.is_empty() && (self.letters_pending || tables != self.diverged) {
            tracing::warn!(node = %self.settings.node, %target, tables = %tables.join(", "),
                           "target tables diverged: changes to them were dead-lettered; \
                            `pgferry dead-letters list` shows them, `replay` or `resolve` clears them");
        }
        self.health.set_diverged(&self.component, tables.clone());
        self.diverged = tables;
        self.letters_pending = false;
        // An operator may have replayed or resolved letters.
        self.read_held(client, false).await
    }
}

/// Where `column` (missing on the target) went in a rename or drop recorded here that the
/// node of a schema change had not seen when it made the change, followed to its latest name
/// (`Some(None)`: dropped): what [`crate::ddl::on_target`] takes as `moved`. `applied` is what
/// that node had applied from each node then; `nodes` is (that node, this target's node). A
/// move made by that node itself, or by a node whose change it had applied, or recorded
/// without an origin (by an earlier pgferry), was seen: the change then reuses the name.
fn unseen_move(
    moves: &HashMap<String, target::ColumnMove>,
    column: &str,
    applied: &std::collections::BTreeMap<String, Lsn>,
    (source, local): (&str, &str),
) -> Option<Option<String>> {
    let first = moves.get(column)?;
    let lsn = first.lsn?;
    let origin = first.origin.as_deref().unwrap_or(local);
    if origin == source || applied.get(origin).is_some_and(|had| *had >= lsn) {
        return None;
    }
    target::follow(&target::renames(moves), column)
}

/// A random pause of up to half a second.
fn replay_pause() -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(std::time::Instant::now().elapsed().as_nanos());
    Duration::from_millis(hasher.finish() % 500)
}

/// Deadlock or serialisation failure: the transaction can simply be replayed.
fn is_lock_conflict(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED
            || *c == tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE
            || *c == tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE
    })
}

/// Writes a batch of upserts ([`copy::encode`]d) with COPY inside a savepoint (see [`copy`]).
/// A refusal of the rows (an existing key, a value, row-level security) rolls back to the savepoint and is
/// returned as its [`copy::Outcome`], for the batch to go as an upsert; any other failure
/// (the connection, a lock conflict) is the caller's error.
async fn copy_rows(
    client: &Client,
    (schema, table): (&str, &str),
    columns: &[String],
    pieces: &[bytes::Bytes],
) -> Result<copy::Outcome, ApplyError> {
    use futures_util::SinkExt;
    client
        .batch_execute("SAVEPOINT pgferry_copy")
        .await
        .map_err(ApplyError::sql("starting a COPY"))?;
    let statement = copy::statement(schema, table, columns);
    let written = async {
        let sink = client.copy_in::<_, bytes::Bytes>(&statement).await?;
        futures_util::pin_mut!(sink);
        for piece in pieces {
            sink.feed(piece.clone()).await?;
        }
        sink.finish().await
    }
    .await;
    let source = match written {
        Ok(_) => {
            client
                .batch_execute("RELEASE SAVEPOINT pgferry_copy")
                .await
                .map_err(ApplyError::sql("finishing a COPY"))?;
            return Ok(copy::Outcome::Written);
        }
        Err(source) => source,
    };
    let conflict = source.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION);
    let error = ApplyError::Sql {
        context: "copying rows",
        source,
    };
    if !error.is_rejection() {
        return Err(error);
    }
    client
        .batch_execute("ROLLBACK TO SAVEPOINT pgferry_copy; RELEASE SAVEPOINT pgferry_copy")
        .await
        .map_err(ApplyError::sql("undoing a refused COPY"))?;
    if conflict {
        return Ok(copy::Outcome::Conflict);
    }
    tracing::info!(table = %format!("{schema}.{table}"), error = %ErrorChain(&error),
                   "COPY refused; this table's batches go as multi-row upserts from now on");
    Ok(copy::Outcome::Refused)
}

#[cfg(test)]
mod tests {
    use super::{commit_ts_of, named_table};

    #[test]
    fn a_move_counts_only_where_the_changes_node_had_not_seen_it() {
        use super::{target::ColumnMove, unseen_move};
        use std::collections::{BTreeMap, HashMap};
        let lsn = |s: &str| s.parse::<crate::lsn::Lsn>().unwrap();
        let moves = |origin: Option<&str>, at: Option<&str>| -> HashMap<String, ColumnMove> {
            [
                (
                    "n".to_owned(),
                    ColumnMove {
                        to: Some("m".to_owned()),
                        origin: origin.map(str::to_owned),
                        lsn: at.map(lsn),
                    },
                ),
                (
                    "m".to_owned(),
                    ColumnMove {
                        to: Some("z".to_owned()),
                        origin: None,
                        lsn: Some(lsn("0/500")),
                    },
                ),
            ]
            .into_iter()
            .collect()
        };
        let applied = |pairs: &[(&str, &str)]| -> BTreeMap<String, crate::lsn::Lsn> {
            pairs
                .iter()
                .map(|(n, l)| ((*n).to_owned(), lsn(l)))
                .collect()
        };
        let nodes = ("b", "a");
        // Renamed here (n → m → z), b had not applied it: followed to the end.
        let here = moves(None, Some("0/100"));
        assert_eq!(
            unseen_move(&here, "n", &applied(&[]), nodes),
            Some(Some("z".to_owned()))
        );
        assert_eq!(
            unseen_move(&here, "n", &applied(&[("a", "0/99")]), nodes),
            Some(Some("z".to_owned()))
        );
        // b had applied it: b's change reuses the name.
        assert_eq!(
            unseen_move(&here, "n", &applied(&[("a", "0/100")]), nodes),
            None
        );
        // Made by b itself, or recorded without an origin: seen.
        assert_eq!(
            unseen_move(&moves(Some("b"), Some("0/100")), "n", &applied(&[]), nodes),
            None
        );
        assert_eq!(
            unseen_move(&moves(None, None), "n", &applied(&[]), nodes),
            None
        );
        // A third node's change, by what b had applied from it.
        let third = moves(Some("c"), Some("0/100"));
        assert!(unseen_move(&third, "n", &applied(&[("c", "0/50")]), nodes).is_some());
        assert_eq!(
            unseen_move(&third, "n", &applied(&[("c", "0/200")]), nodes),
            None
        );
        // A name never moved here.
        assert_eq!(unseen_move(&here, "q", &applied(&[]), nodes), None);
    }

    #[test]
    fn item_facts_read_both_item_shapes() {
        let compact = br#"{"type":"change","run":1,"op":"u","schema":"s","table":"t","before":null,"after":{"id":1},"commit_ts_us":42}"#;
        let wrapped = br#"{"type":"change","run":1,"topic":"p.s.t","key":{"id":1},"change":{"op":"u","before":null,"after":{"id":1},"source":{"schema":"s","table":"t","commit_ts_us":42}}}"#;
        for payload in [&compact[..], &wrapped[..]] {
            assert_eq!(commit_ts_of(payload), Some(42));
            assert_eq!(named_table(Some(payload)).as_deref(), Some("s.t"));
        }
        // A versioned compact item carries no commit time; a non-change names no table.
        let versioned = br#"{"type":"change","op":"u","schema":"s","table":"t","version":{"t_us":5,"node":"a"}}"#;
        assert_eq!(commit_ts_of(versioned), None);
        assert_eq!(named_table(Some(br#"{"type":"commit"}"#)), None);
        assert_eq!(named_table(Some(b"not json")), None);
    }
}

//! The chunked snapshot's I/O side, beside the stream: finds what to snapshot (unfinished
//! parts, requests, tables added to the publication), reads chunks between watermarks on
//! `source.snapshot_readers` connections, and records each chunk's progress once Kafka holds
//! it.
//!
//! Division of work with the capture loop, which owns the stream: a reader leaves each chunk
//! on the [`Board`] before writing its high watermark; the capture loop takes it there when the
//! stream reaches that watermark, reconciles it ([`crate::source::reconcile`]), publishes it in
//! the watermark's transaction, and reports back a [`Published`] with that transaction's end.
//! Once the delivery watermark has passed that end, the chunk's progress is written to
//! `pgferry.snapshot_progress`, so a restart resumes after the last chunk Kafka holds.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::chunk::{self, Locked, Part, Target};
use crate::config::{SnapshotMode, SourceConfig};
use crate::lsn::Lsn;
use crate::pipeline::progress::Progress;
use crate::source::capture::CaptureError;
use crate::source::catalog;
use crate::source::reconcile::{ChunkRow, Key};
use crate::telemetry::Metrics;

/// Chunks each reader may have read and not yet seen published.
const CHUNKS_IN_FLIGHT_PER_READER: usize = 4;

/// How often Kafka's progress is checked against published chunks.
const ACK_POLL: Duration = Duration::from_millis(100);

/// How often each running table's progress is logged.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// How long the snapshot of a table the capture role may not read waits before it is tried
/// again.
const UNREADABLE_RETRY: Duration = Duration::from_secs(15);

/// What a watermark says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MarkKind {
    /// Before a chunk's SELECT.
    Low,
    /// After it: the chunk is published here.
    High,
    /// A table without a key starts: its targets are truncated here.
    Start,
}

/// A watermark's content (JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// The capture run that wrote it; marks of other runs are ignored.
    pub run: u64,
    /// The chunk.
    pub id: u64,
    /// Which watermark.
    pub mark: MarkKind,
}

impl Mark {
    /// Parses a watermark's content; `None` when it is not one pgferry wrote.
    pub fn parse(content: &[u8]) -> Option<Mark> {
        serde_json::from_slice(content).ok()
    }
}

/// A chunk left for the capture loop.
pub struct Deposit {
    /// The table.
    pub target: Arc<Target>,
    /// Its rows; `None` for a start mark (and until the SELECT returns).
    pub rows: Option<Vec<ChunkRow>>,
    /// The last chunk of a table without a key: its reconciliation ends here.
    pub finishes_keyless: bool,
    /// A chunk whose key range targets prune.
    pub prune: Option<ChunkRange>,
    _permit: OwnedSemaphorePermit,
}

/// The key range a chunk covered, for targets to prune (see [`crate::event::PruneRange`]).
#[derive(Debug)]
pub struct ChunkRange {
    /// Exclusive lower bound (`None`: from the first key).
    pub after: Option<Vec<String>>,
    /// Inclusive upper bound (`None`: to the last key).
    pub through: Option<Vec<String>>,
    /// The transactions in progress for the chunk's `SELECT`.
    pub running: Vec<u32>,
}

/// Chunks between their SELECT and the capture loop's high watermark.
#[derive(Default)]
pub struct Board {
    chunks: Mutex<HashMap<u64, Deposit>>,
}

impl Board {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Deposit>> {
        self.chunks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The table of chunk `id`, if this run has it.
    pub fn target(&self, id: u64) -> Option<Arc<Target>> {
        self.lock().get(&id).map(|d| d.target.clone())
    }

    /// Takes chunk `id` (at its high watermark or start mark).
    pub fn take(&self, id: u64) -> Option<Deposit> {
        self.lock().remove(&id)
    }
}

/// A chunk the capture loop published, reported back to the driver.
#[derive(Debug)]
pub struct Published {
    /// The chunk.
    pub id: u64,
    /// End of the transaction it was published in: Kafka holds it once the delivery watermark
    /// passes this.
    pub end_lsn: Lsn,
    /// Rows published.
    pub emitted: usize,
    /// Rows left out (the stream carried a newer state).
    pub dropped: usize,
    /// Keys to read again.
    pub reread: Vec<Key>,
}

/// The link between the capture loop and the driver.
pub struct Link {
    /// This capture run.
    pub run: u64,
    /// A snapshot is planned or running: the capture loop remembers recent changes for the
    /// reconciler only then (see [`crate::source::reconcile::RECENT_CHANGES`]).
    pub active: Arc<std::sync::atomic::AtomicBool>,
    /// Chunks waiting for their high watermark.
    pub board: Arc<Board>,
    /// Published chunks, back to the driver.
    pub published: mpsc::UnboundedSender<Published>,
}

/// Work for a reader.
#[derive(Clone)]
enum Work {
    /// A key range (or the pages of a table without a key).
    Part(Arc<Target>, Part),
    /// Keys to read again.
    Reread(Arc<Target>, Vec<Vec<String>>),
}

/// What the driver remembers of a chunk until Kafka holds it.
struct InFlight {
    table: String,
    part: Option<Part>,
    last: Option<Vec<String>>,
    done: bool,
}

struct Shared {
    run: u64,
    board: Arc<Board>,
    queue: Mutex<VecDeque<Work>>,
    wake: Notify,
    next_id: AtomicU64,
    in_flight: Mutex<HashMap<u64, InFlight>>,
    permits: Arc<Semaphore>,
    batch_rows: u32,
    chunk_bytes: u64,
    /// The publication: what of each table a chunk reads (its column list and row filter).
    publication: String,
    /// Work put aside until a time: a table the capture role may not read, tried again.
    deferred: Mutex<Vec<(Instant, Work)>>,
}

impl Shared {
    fn push(&self, work: Work) {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(work);
        self.wake.notify_waiters();
    }

    fn pop(&self) -> Option<Work> {
        let queued = self
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front();
        queued.or_else(|| {
            let mut deferred = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
            let due = deferred.iter().position(|(at, _)| *at <= Instant::now())?;
            Some(deferred.remove(due).1)
        })
    }

    /// Puts `work` aside for `delay`.
    fn defer(&self, work: Work, delay: Duration) {
        self.deferred
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((Instant::now() + delay, work));
    }
}

/// Everything the driver needs.
pub struct DriverSettings {
    /// `source:`.
    pub source: SourceConfig,
    /// This node's id (for connection names).
    pub node_id: String,
    /// The slot (progress rows are per slot).
    pub slot: String,
    /// Re-snapshots publish their chunks' key ranges for targets to prune ([`Part::prune`]):
    /// every node but a multi-master one, whose snapshot rows go as change items and whose
    /// peers may hold newer versions than the source's rows.
    pub prune: bool,
}

/// Creates the link for a capture run, and the driver's end of it.
pub fn link(run: u64) -> (Link, mpsc::UnboundedReceiver<Published>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Link {
            run,
            active: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            board: Arc::new(Board::default()),
            published: tx,
        },
        rx,
    )
}

/// A driver that has resumed its unfinished work and is ready to run.
pub struct Driver {
    settings: DriverSettings,
    control: Client,
    shared: Arc<Shared>,
    tables: Tables,
    published: mpsc::UnboundedReceiver<Published>,
    progress: Arc<Mutex<Progress>>,
    metrics: Arc<Metrics>,
}

impl Driver {
    /// Connects and queues the unfinished parts of this slot's snapshots (so that metrics show
    /// them before capture reports ready).
    pub async fn start(
        settings: DriverSettings,
        link: &Link,
        published: mpsc::UnboundedReceiver<Published>,
        progress: Arc<Mutex<Progress>>,
        metrics: Arc<Metrics>,
    ) -> Result<Driver, CaptureError> {
        let source = &settings.source;
        let app_name = format!("pgferry-{}-snapshot", settings.node_id);
        let control = crate::pg::connect(&source.url, &app_name)
            .await
            .map_err(CaptureError::sql("connecting for snapshots"))?;
        let readers = source.snapshot_readers as usize;
        let shared = Arc::new(Shared {
            run: link.run,
            board: link.board.clone(),
            queue: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            next_id: AtomicU64::new(1),
            in_flight: Mutex::new(HashMap::new()),
            permits: Arc::new(Semaphore::new(readers * CHUNKS_IN_FLIGHT_PER_READER)),
            batch_rows: source.snapshot_batch_rows,
            chunk_bytes: source.snapshot_chunk_bytes,
            deferred: Mutex::new(Vec::new()),
            publication: source.publication.clone(),
        });
        let mut tables = Tables {
            active: link.active.clone(),
            ..Tables::default()
        };
        resume(&control, &settings, &shared, &mut tables, &metrics).await?;
        tables.running_changed(&metrics);
        Ok(Driver {
            settings,
            control,
            shared,
            tables,
            published,
            progress,
            metrics,
        })
    }

    /// Runs until `shutdown`, or until a reader fails (the capture run then restarts).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), CaptureError> {
        let Driver {
            settings,
            control,
            shared,
            mut tables,
            mut published,
            progress,
            metrics,
        } = self;
        let source = &settings.source;
        let app_name = format!("pgferry-{}-snapshot", settings.node_id);
        let readers = source.snapshot_readers as usize;
        let (failed_tx, mut failed) = mpsc::channel::<CaptureError>(readers);
        let mut reader_tasks = tokio::task::JoinSet::new();
        for _ in 0..readers {
            let shared = shared.clone();
            let url = source.url.clone();
            let name = app_name.clone();
            let failed = failed_tx.clone();
            let stop = shutdown.clone();
            reader_tasks.spawn(async move {
                let result = async {
                    let client = crate::pg::connect(&url, &name)
                        .await
                        .map_err(CaptureError::sql("connecting a snapshot reader"))?;
                    // A chunk is published when its high watermark comes back through the
                    // slot, and the walsender sends only flushed WAL: under an asynchronous
                    // commit the watermark waited for the WAL writer (up to
                    // wal_writer_delay, 200 ms by default) while the source was otherwise
                    // quiet. Watermarks flush at commit instead (`local`: a synchronous
                    // standby's answer is not needed, and one that is down must not stop the
                    // snapshot). Row-level security off: a policy that would hide rows from
                    // the capture role fails the read (see [`super::ROW_SECURITY_OFF`]).
                    client
                        .batch_execute(&format!(
                            "SET synchronous_commit = local; {}",
                            super::ROW_SECURITY_OFF
                        ))
                        .await
                        .map_err(CaptureError::sql("setting up a snapshot reader"))?;
                    reader(&client, &shared, &stop).await
                }
                .await;
                if let Err(e) = result {
                    let _ = failed.send(e).await;
                }
            });
        }

        let mut poll = tokio::time::interval(source.snapshot_poll_interval);
        let mut ack = tokio::time::interval(ACK_POLL);
        let mut waiting: VecDeque<Published> = VecDeque::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                Some(error) = failed.recv() => return Err(error),
                _ = poll.tick() => {
                    discover(&control, &settings, &shared, &mut tables, &metrics).await?;
                }
                Some(p) = published.recv() => {
                    if !p.reread.is_empty() {
                        let target = shared.in_flight.lock().unwrap_or_else(|e| e.into_inner())
                            .get(&p.id).and_then(|f| tables.targets.get(&f.table).cloned());
                        if let Some(target) = target {
                            let keys = p
                                .reread
                                .iter()
                                .filter_map(|k| chunk::key_text(&target.in_key_order(k)))
                                .collect();
                            shared.push(Work::Reread(target, keys));
                        }
                    }
                    waiting.push_back(p);
                }
                _ = ack.tick() => {
                    let held = progress.lock().unwrap_or_else(|e| e.into_inner()).watermark();
                    while waiting.front().is_some_and(|p| p.end_lsn <= held) {
                        let Some(p) = waiting.pop_front() else { break };
                        let flight = shared.in_flight.lock().unwrap_or_else(|e| e.into_inner()).remove(&p.id);
                        let Some(InFlight { part: Some(part), last, done, .. }) = flight else { continue };
                        chunk::record_chunk(&control, &settings.slot, &part, last.as_deref(), p.emitted as i64, done)
                            .await
                            .map_err(CaptureError::sql("recording snapshot progress"))?;
                        tables.chunk(&part, p.emitted, p.dropped, done, &metrics);
                    }
                }
            }
        }
    }
}

/// Per-table bookkeeping for metrics and the log.
#[derive(Default)]
struct Tables {
    targets: HashMap<String, Arc<Target>>,
    running: HashMap<String, TableRun>,
    /// Tables with a request waiting for their running snapshot to end (logged once).
    waiting: HashSet<String>,
    active: Arc<std::sync::atomic::AtomicBool>,
}

struct TableRun {
    parts_left: usize,
    rows: i64,
    estimated: i64,
    started: Instant,
    logged: Instant,
}

impl Tables {
    /// `finished`: rows that parts finished before a restart read.
    fn start(
        &mut self,
        target: Arc<Target>,
        parts: &[Part],
        (estimated, finished): (i64, i64),
        metrics: &Metrics,
    ) {
        let name = target.name();
        metrics
            .snapshot_rows_estimated
            .with_label_values(&[&name])
            .set(estimated);
        self.running.insert(
            name.clone(),
            TableRun {
                parts_left: parts.len(),
                rows: finished + parts.iter().map(|p| p.rows_done).sum::<i64>(),
                estimated,
                started: Instant::now(),
                logged: Instant::now(),
            },
        );
        self.targets.insert(name, target);
        self.running_changed(metrics);
    }

    fn running_changed(&self, metrics: &Metrics) {
        metrics
            .snapshot_tables_remaining
            .set(self.running.len() as i64);
        self.active
            .store(!self.running.is_empty(), Ordering::Relaxed);
    }

    fn chunk(
        &mut self,
        part: &Part,
        emitted: usize,
        dropped: usize,
        done: bool,
        metrics: &Metrics,
    ) {
        let name = part.table_name();
        metrics.snapshot_chunks.with_label_values(&[&name]).inc();
        metrics
            .snapshot_rows_reconciled
            .with_label_values(&[&name])
            .inc_by(dropped as u64);
        let Some(run) = self.running.get_mut(&name) else {
            return;
        };
        run.rows += emitted as i64;
        if done {
            run.parts_left = run.parts_left.saturating_sub(1);
        }
        if run.parts_left == 0 {
            tracing::info!(table = %name, rows = run.rows, seconds = run.started.elapsed().as_secs(),
                           "snapshot of table finished; Kafka holds every chunk");
            self.running.remove(&name);
            self.running_changed(metrics);
        } else if run.logged.elapsed() >= LOG_EVERY {
            run.logged = Instant::now();
            let progress = crate::pipeline::snapshot_progress::SnapshotProgress {
                rows: run.rows,
                estimated: run.estimated,
                elapsed: run.started.elapsed(),
            };
            tracing::info!(table = %name, rows = run.rows, estimated = run.estimated,
                           progress = %progress, "snapshotting");
        }
    }
}

/// At the start of a run: queues unfinished parts (a keyless table restarts from its first
/// page), and records the baseline for slots created before chunked snapshots existed.
async fn resume(
    control: &Client,
    settings: &DriverSettings,
    shared: &Shared,
    tables: &mut Tables,
    metrics: &Metrics,
) -> Result<(), CaptureError> {
    let slot = &settings.slot;
    let known = chunk::known_tables(control, slot)
        .await
        .map_err(CaptureError::sql("reading pgferry.snapshot_progress"))?;
    if known.is_empty() {
        // A slot from before chunked snapshots: what it published so far is its baseline.
        let published = catalog::published_tables(control, &settings.source.publication)
            .await
            .map_err(CaptureError::sql("listing published tables"))?;
        chunk::record_covered(control, slot, &published)
            .await
            .map_err(CaptureError::sql("recording the snapshot baseline"))?;
    }
    let parts = chunk::unfinished_parts(control, slot)
        .await
        .map_err(CaptureError::sql("reading pgferry.snapshot_progress"))?;
    let finished = chunk::finished_rows(control, slot)
        .await
        .map_err(CaptureError::sql("reading pgferry.snapshot_progress"))?;
    let mut by_table: HashMap<String, Vec<Part>> = HashMap::new();
    for part in parts {
        by_table.entry(part.table_name()).or_default().push(part);
    }
    for (name, mut parts) in by_table {
        let (schema, table) = (parts[0].schema.clone(), parts[0].table.clone());
        let Some(target) = chunk::target(control, &settings.source.publication, &schema, &table)
            .await
            .map_err(CaptureError::sql("describing a snapshot table"))?
        else {
            tracing::warn!(table = %name, "a table with an unfinished snapshot no longer exists; forgetting it");
            continue;
        };
        // A key other than the one the parts were planned by (other columns, or a type or
        // collation that sorts otherwise, changed while the snapshot ran): their bounds mean
        // nothing any more; the table is planned again.
        let arity = target.key.len();
        let signature = target.key_signature();
        let stale = |k: &Option<Vec<String>>| k.as_ref().is_some_and(|k| k.len() != arity);
        if parts.iter().any(|p| {
            p.keyed != target.keyed()
                || (p.keyed
                    && (stale(&p.lower)
                        || stale(&p.upper)
                        || stale(&p.last)
                        || p.key_signature.as_ref().is_some_and(|s| *s != signature)))
        }) {
            tracing::warn!(table = %name, "the table's key changed since its snapshot was planned; planning it again");
            plan(control, settings, shared, tables, metrics, &schema, &table).await?;
            continue;
        }
        for part in parts.iter_mut().filter(|p| !p.keyed && p.last.is_some()) {
            chunk::restart_part(control, slot, part)
                .await
                .map_err(CaptureError::sql("restarting a snapshot without a key"))?;
            part.last = None;
            part.rows_done = 0;
        }
        let finished = finished.get(&(schema, table)).copied().unwrap_or(0);
        let done = finished + parts.iter().map(|p| p.rows_done).sum::<i64>();
        tracing::info!(table = %name, parts = parts.len(), rows_done = done, "resuming snapshot");
        let target = Arc::new(target);
        let estimated = parts.iter().map(|p| p.estimated).max().unwrap_or(0);
        tables.start(target.clone(), &parts, (estimated, finished), metrics);
        for part in parts {
            shared.push(Work::Part(target.clone(), part));
        }
    }
    Ok(())
}

/// Every poll: snapshot requests, and tables added to the publication.
async fn discover(
    control: &Client,
    settings: &DriverSettings,
    shared: &Shared,
    tables: &mut Tables,
    metrics: &Metrics,
) -> Result<(), CaptureError> {
    let source = &settings.source;
    // (table, the requests that asked for it: one plan answers every request made before it)
    let mut wanted: Vec<((String, String), Vec<i64>)> = Vec::new();
    let mut want = |table: &(String, String), request: Option<i64>| match wanted
        .iter_mut()
        .find(|(t, _)| t == table)
    {
        Some((_, ids)) => ids.extend(request),
        None => wanted.push((table.clone(), request.into_iter().collect())),
    };
    let requests = chunk::pending_requests(control)
        .await
        .map_err(CaptureError::sql("reading pgferry.snapshot_requests"))?;
    let published = catalog::published_tables(control, &source.publication)
        .await
        .map_err(CaptureError::sql("listing published tables"))?;
    let mut refused = Vec::new();
    for (id, request) in requests {
        let readings = crate::sql::table_name_readings(&request).unwrap_or_default();
        let found: Vec<&(String, String)> =
            published.iter().filter(|p| readings.contains(p)).collect();
        match found.as_slice() {
            [name] => want(name, Some(id)),
            [] => {
                refused.push(id);
                tracing::warn!(table = %request,
                    publication = %source.publication,
                    "ignoring a snapshot request: no table of the publication has this name \
                     (schema.table, quoted like SQL where a part has dots; without a schema, public)")
            }
            _ => {
                refused.push(id);
                tracing::warn!(table = %request,
                    "ignoring a snapshot request: the name reads as more than one published table; \
                     quote its parts (\"schema\".\"table\")")
            }
        }
    }
    chunk::forget_requests(control, &refused)
        .await
        .map_err(CaptureError::sql("removing refused snapshot requests"))?;
    let (renamed, forgotten) =
        chunk::follow_publication(control, &settings.slot, &source.publication)
            .await
            .map_err(CaptureError::sql("following the publication's tables"))?;
    for name in renamed {
        tracing::info!(table = %name, "table renamed; its snapshot record follows it");
    }
    for name in forgotten {
        tracing::info!(table = %name, "table no longer published; its snapshot record is forgotten (published again, it is snapshotted again)");
    }
    if source.snapshot_new_tables && source.snapshot != SnapshotMode::Never {
        let known = chunk::known_tables(control, &settings.slot)
            .await
            .map_err(CaptureError::sql("reading pgferry.snapshot_progress"))?;
        for table in published.iter().filter(|t| !known.contains(t)) {
            tracing::info!(table = %format!("{}.{}", table.0, table.1), "table added to the publication; snapshotting it");
            want(table, None);
        }
    }
    for ((schema, table), requests) in wanted {
        let name = format!("{schema}.{table}");
        if tables.running.contains_key(&name) {
            // Its run may have passed key ranges a target changed since: the requests wait
            // in the table (durably) and one run starts once the running one ends.
            if !requests.is_empty() && tables.waiting.insert(name.clone()) {
                tracing::info!(table = %name, "a snapshot of this table is running; the requested one starts when it ends");
            }
            continue;
        }
        if !requests.is_empty() {
            tables.waiting.remove(&name);
            tracing::info!(table = %name, requests = requests.len(), "snapshot requested");
        }
        plan(control, settings, shared, tables, metrics, &schema, &table).await?;
        // Planned: its parts are recorded, and a restart resumes them. The run reads the
        // whole table after every request so far, so it answers all of them.
        chunk::forget_requests(control, &requests)
            .await
            .map_err(CaptureError::sql("removing planned snapshot requests"))?;
    }
    Ok(())
}

/// Plans one table's snapshot and queues its parts.
async fn plan(
    control: &Client,
    settings: &DriverSettings,
    shared: &Shared,
    tables: &mut Tables,
    metrics: &Metrics,
    schema: &str,
    table: &str,
) -> Result<(), CaptureError> {
    let Some(target) = chunk::target(control, &settings.source.publication, schema, table)
        .await
        .map_err(CaptureError::sql("describing a snapshot table"))?
    else {
        return Ok(());
    };
    let source = &settings.source;
    let (parts, estimated) = chunk::plan_table(
        control,
        &settings.slot,
        &target,
        source.snapshot_readers,
        source.snapshot_batch_rows,
        settings.prune,
    )
    .await
    .map_err(CaptureError::sql("planning a table's snapshot"))?;
    if settings.prune && target.keyed() && !target.prunable() {
        tracing::warn!(table = %target.name(),
            "this snapshot upserts rows but does not delete target rows the source no longer \
             has: the table's key has a column whose order may differ between servers (an \
             enum, domain, array, range or extension type)");
    }
    if !target.keyed() {
        tracing::warn!(table = %target.name(),
            "table has no primary key or identity index: snapshotting it by ctid pages, after a \
             truncate on its targets; exact when its rows are distinct or only inserted, and \
             restarted from the first page after a crash or a rewrite of the table");
    }
    tracing::info!(table = %target.name(), parts = parts.len(), estimated, "snapshot planned");
    let target = Arc::new(target);
    tables.start(target.clone(), &parts, (estimated, 0), metrics);
    for part in parts {
        shared.push(Work::Part(target.clone(), part));
    }
    Ok(())
}

/// One reader: takes work off the queue until shutdown.
async fn reader(
    client: &Client,
    shared: &Shared,
    shutdown: &CancellationToken,
) -> Result<(), CaptureError> {
    loop {
        let Some(work) = shared.pop() else {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = shared.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            continue;
        };
        let done = match work.clone() {
            Work::Part(target, part) if part.keyed => {
                read_range(client, shared, &target, part, shutdown).await
            }
            Work::Part(target, part) => read_pages(client, shared, &target, part, shutdown).await,
            Work::Reread(target, keys) => {
                let query = |t: &Target| chunk::keys_query(t, &keys);
                chunk_between_marks(client, shared, &target, &query, None, false, None)
                    .await
                    .map(drop)
            }
        };
        match done {
            // One table the role may not read waits, and is tried again; the stream and the
            // other tables' snapshots go on.
            Err(e @ CaptureError::SnapshotUnreadable { .. }) => {
                tracing::warn!(error = %crate::error::ErrorChain(&e),
                               retry_in_s = UNREADABLE_RETRY.as_secs(),
                               "this table's snapshot waits; streaming and other tables go on");
                shared.defer(work, UNREADABLE_RETRY);
            }
            done => done?,
        }
    }
}

/// Reads a key range chunk by chunk, from where Kafka's copy ends.
async fn read_range(
    client: &Client,
    shared: &Shared,
    target: &Arc<Target>,
    part: Part,
    shutdown: &CancellationToken,
) -> Result<(), CaptureError> {
    let mut after = part.last.clone().or_else(|| part.lower.clone());
    // Bytes per row: the table's average on disk until a chunk shows what its rows read as.
    let mut width = chunk::average_row_bytes(client, target.relation.oid)
        .await
        .map_err(CaptureError::sql("estimating the size of a table's rows"))?;
    let mut limit = first_limit(shared.batch_rows, shared.chunk_bytes, width);
    while !shutdown.is_cancelled() {
        // Where `limit` rows as wide as seen could pass snapshot_chunk_bytes, the query itself
        // ends the chunk at the bound (a part is then done at an empty chunk).
        let bound = (width * f64::from(limit) > shared.chunk_bytes as f64 / 2.0)
            .then_some(shared.chunk_bytes);
        let query = |t: &Target| {
            chunk::chunk_query(t, after.as_deref(), part.upper.as_deref(), limit, bound)
        };
        let prune_from = part.prune.then(|| after.clone());
        let done_below = if bound.is_some() { 1 } else { limit };
        let (read, last) = chunk_between_marks(
            client,
            shared,
            target,
            &query,
            Some((&part, done_below)),
            false,
            prune_from,
        )
        .await?;
        if read.rows > 0 {
            width = read.bytes as f64 / read.rows as f64;
        }
        // Rows per chunk adapt to snapshot_chunk_bytes: halve after a chunk over it, grow back
        // after one under half of it.
        if read.bytes > shared.chunk_bytes {
            limit = (limit / 2).max(1);
        } else if read.bytes < shared.chunk_bytes / 2 {
            limit = (limit.saturating_mul(2)).min(shared.batch_rows);
        }
        if read.done {
            return Ok(());
        }
        after = last;
    }
    Ok(())
}

/// Reads a table without a key by heap pages, after a start mark that truncates its targets.
async fn read_pages(
    client: &Client,
    shared: &Shared,
    target: &Arc<Target>,
    part: Part,
    shutdown: &CancellationToken,
) -> Result<(), CaptureError> {
    let files = |client| async move {
        chunk::heap_files(client, target.relation.oid)
            .await
            .map_err(CaptureError::sql("reading the table's files"))
    };
    'table: loop {
        // A rewrite moves rows between pages, some into pages already read, where no chunk
        // would see them and no change carries them: the table starts over (another truncate
        // of its targets) whenever its files are not the ones it started with.
        let started_with = files(client).await?;
        if started_with.is_empty() {
            return Ok(()); // dropped
        }
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let permit = acquire(shared).await;
        shared.board.lock().insert(
            id,
            Deposit {
                target: target.clone(),
                rows: None,
                finishes_keyless: false,
                prune: None,
                _permit: permit,
            },
        );
        mark(client, shared.run, id, MarkKind::Start).await?;
        // Pages that exist now; rows added later are streamed.
        let (pages, per_page) = chunk::heap_pages(client, target.relation.oid)
            .await
            .map_err(CaptureError::sql("reading the table's size"))?;
        // Pages per chunk: `snapshot_batch_rows` rows' worth, and no more than
        // `snapshot_chunk_bytes` by what the chunk before read per page. The first chunk is
        // one page: what a page reads as is not known before (a page of TOASTed or compressed
        // values reads as megabytes, and the size on disk tells little of it).
        let most = ((f64::from(shared.batch_rows) / per_page.max(1.0)) as u64).max(1);
        let mut step = 1;
        let mut from = 0;
        while !shutdown.is_cancelled() {
            let to = from + step;
            let mut page_part = part.clone();
            page_part.last = Some(vec![to.to_string()]);
            let range = Some((&page_part, u32::MAX));
            let query = |t: &Target| chunk::pages_query(t, from, to);
            let (read, _) =
                chunk_between_marks(client, shared, target, &query, range, false, None).await?;
            step = fitting(
                shared.chunk_bytes,
                read.bytes as f64 / (to - from) as f64,
                most,
            );
            let now = files(client).await?;
            if !now.is_empty() && now != started_with {
                tracing::info!(table = %target.name(),
                    "table rewritten (VACUUM FULL, CLUSTER, ALTER TABLE, or a partition attached \
                     or detached) during its snapshot by ctid pages: rows moved between pages, \
                     so its snapshot starts over from the first page");
                continue 'table;
            }
            if to >= pages {
                // Every page was read from the files the table started with (they are the
                // table's still): an empty chunk ends the table.
                let query = |t: &Target| chunk::pages_query(t, to, to);
                chunk_between_marks(client, shared, target, &query, range, true, None).await?;
                return Ok(());
            }
            from = to;
        }
        return Ok(());
    }
}

/// How many units (rows, pages) `each` bytes wide `chunk_bytes` holds: at least one (a unit
/// is not split), at most `most`, and `most` when a unit's width is not known (0).
fn fitting(chunk_bytes: u64, each: f64, most: u64) -> u64 {
    if each <= 0.0 {
        return most;
    }
    ((chunk_bytes as f64 / each).floor() as u64).clamp(1, most)
}

/// What one chunk read.
struct ChunkRead {
    bytes: u64,
    rows: u64,
    done: bool,
}

/// Rows in a table's first chunk: `batch_rows`, or as many rows `width` bytes wide as
/// `chunk_bytes` holds if fewer (at least one).
fn first_limit(batch_rows: u32, chunk_bytes: u64, width: f64) -> u32 {
    // At most `batch_rows`, so it fits.
    fitting(chunk_bytes, width, u64::from(batch_rows)) as u32
}

async fn acquire(shared: &Shared) -> OwnedSemaphorePermit {
    // The semaphore is never closed.
    shared
        .permits
        .clone()
        .acquire_owned()
        .await
        .unwrap_or_else(|_| unreachable!("the snapshot semaphore is never closed"))
}

async fn mark(client: &Client, run: u64, id: u64, mark: MarkKind) -> Result<(), CaptureError> {
    let content = serde_json::to_string(&Mark { run, id, mark }).unwrap_or_default();
    chunk::emit_watermark(client, &content)
        .await
        .map_err(CaptureError::sql("writing a snapshot watermark"))
}

/// One chunk: low watermark, SELECT, deposit, high watermark. The SELECT is `query` of the
/// table as described under its lock ([`chunk::read_locked`]): rows are read, reconciled and
/// published by the table's schema at the time of the read, so a schema change committed
/// since the table was planned is followed. `part` is `Some((part, limit))` for range and page
/// chunks (progress is recorded for them); `finishes_keyless` marks a keyless table's last
/// chunk; `prune_from` is `Some(after)` for a range chunk whose targets prune the range it
/// covers, from the exclusive bound `after`. Returns what was read and the last key read.
async fn chunk_between_marks(
    client: &Client,
    shared: &Shared,
    target: &Arc<Target>,
    query: &(dyn Fn(&Target) -> String + Sync),
    part: Option<(&Part, u32)>,
    finishes_keyless: bool,
    prune_from: Option<Option<Vec<String>>>,
) -> Result<(ChunkRead, Option<Vec<String>>), CaptureError> {
    let permit = acquire(shared).await;
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    shared.board.lock().insert(
        id,
        Deposit {
            target: target.clone(),
            rows: None,
            finishes_keyless,
            prune: None,
            _permit: permit,
        },
    );
    mark(client, shared.run, id, MarkKind::Low).await?;
    let locked = match chunk::read_locked(
        client,
        &shared.publication,
        target,
        prune_from.is_some(),
        query,
    )
    .await
    {
        Ok(locked) => locked,
        Err(e) => {
            let e = CaptureError::snapshot_read(&target.name(), e);
            if matches!(e, CaptureError::SnapshotUnreadable { .. }) {
                // The table's snapshot waits, the stream goes on: the chunk closes empty, so
                // the stream's window for it ends.
                mark(client, shared.run, id, MarkKind::High).await?;
            }
            return Err(e);
        }
    };
    let (mut read, read_as, sql) = match locked {
        Locked::Read { target, read, sql } => (read, Arc::new(target), sql),
        Locked::Gone => {
            tracing::info!(table = %target.name(), "the table was dropped while its snapshot ran; its snapshot ends");
            (chunk::Read::default(), target.clone(), String::new())
        }
        Locked::Changed { detail } => {
            return Err(CaptureError::SnapshotTableChanged {
                table: target.name(),
                detail,
            })
        }
    };
    let last_key = read.rows.last().and_then(|r| read_as.key_text_of(&r.tuple));
    let done = match part {
        Some((_, limit)) if target.keyed() => (read.rows.len() as u64) < u64::from(limit),
        _ => finishes_keyless,
    };
    let last = match part {
        Some((part, _)) if !target.keyed() => part.last.clone(),
        _ => last_key.clone(),
    };
    shared
        .in_flight
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            id,
            InFlight {
                table: target.name(),
                part: part.map(|(p, _)| p.clone()),
                last,
                done,
            },
        );
    tracing::debug!(table = %target.name(), id, rows = read.rows.len(), bytes = read.bytes, done, %sql,
                    "snapshot chunk read");
    // The range this chunk covered: up to the part's end once the part is done.
    let prune = match (prune_from, part, read.running.take()) {
        (Some(after), Some((part, _)), Some(running)) if read_as.prunable() => Some(ChunkRange {
            after,
            through: if done {
                part.upper.clone()
            } else {
                last_key.clone()
            },
            running,
        }),
        (Some(_), Some(_), None) if read_as.prunable() && !sql.is_empty() => {
            tracing::warn!(table = %target.name(),
                "a snapshot chunk's range is not pruned: the server's pg_current_snapshot() \
                 could not be read");
            None
        }
        _ => None,
    };
    let bytes = read.bytes;
    let rows = read.rows.len() as u64;
    if let Some(deposit) = shared.board.lock().get_mut(&id) {
        deposit.target = read_as;
        deposit.rows = Some(read.rows);
        deposit.prune = prune;
    }
    mark(client, shared.run, id, MarkKind::High).await?;
    Ok((ChunkRead { bytes, rows, done }, last_key))
}

#[cfg(test)]
mod tests {
    use super::first_limit;

    #[test]
    fn a_chunk_of_pages_holds_what_the_bytes_hold() {
        use super::fitting;
        // Narrow rows: the row bound.
        assert_eq!(fitting(64 << 20, 8_192.0, 40), 40);
        // 57 MB a page (TOASTed rows) in 1 MiB: one page.
        assert_eq!(fitting(1 << 20, 57e6, 40), 1);
        // 100 KB a page: ten pages in 1 MiB.
        assert_eq!(fitting(1 << 20, 100_000.0, 40), 10);
        // Empty pages: the row bound.
        assert_eq!(fitting(1 << 20, 0.0, 40), 40);
    }

    #[test]
    fn a_first_chunk_holds_what_the_bytes_hold_of_the_average_row() {
        // Narrow rows: the row bound.
        assert_eq!(first_limit(10_000, 64 << 20, 100.0), 10_000);
        // 2 MB rows in 1 MiB: one row at least.
        assert_eq!(first_limit(10_000, 1 << 20, 2_000_000.0), 1);
        // 10 KB rows in 1 MiB.
        assert_eq!(first_limit(10_000, 1 << 20, 10_240.0), 102);
        // No estimate: the row bound.
        assert_eq!(first_limit(500, 1 << 20, 0.0), 500);
    }
}

//! `pgferry seed`: fills a new replica straight from the source database, in parallel, the
//! way PostgreSQL's own initial table synchronization does, and records where the node stream
//! takes over. The rows never pass through Kafka: seeding a replica of a big database costs
//! what a native `CREATE SUBSCRIPTION … copy_data = true` costs, not a snapshot's worth of
//! broker traffic. (Consumers of the per-table topics get their snapshot from capture,
//! `source.snapshot`.)
//!
//! 1. The node stream's last commit record `(o, L)` (before the snapshot below, so everything
//!    published later commits after it) and capture's slot, which must exist: its stream
//!    holds every transaction that commits after the snapshot.
//! 2. A temporary logical slot on the source with an exported snapshot. Its consistent point
//!    `C` splits the source's history exactly: a transaction whose commit record lies before
//!    `C` is in the snapshot, one at or after `C` is not (logical decoding's own rule, which
//!    native table synchronization relies on).
//! 3. `readers` sessions import the snapshot. Each published table (`apply.tables` filters
//!    them) is cut into ranges of heap pages (`ctid`, one range per reader for a table of at
//!    least [`MIN_RANGE_PAGES`] pages each); the readers take ranges, biggest table first,
//!    and stream each with `COPY (SELECT <published columns> … WHERE <row filter>) TO STDOUT`
//!    into `COPY … FROM STDIN` on a target session of their own (`session_replication_role =
//!    replica`, as apply), one target transaction per range: in COPY's binary format where
//!    every column has the same built-in type on both sides ([`binary_copy`]), in text
//!    otherwise.
//! 4. Before the first row, `pgferry.seeds` records the seed as `copying` (committed); the
//!    last transaction records the worker's starting position `(o + 1, L)`, the tables as
//!    announced by the stream (their announcements lie in transactions the worker skips), and
//!    the seed as `done` at `C`. The worker then reads from `o + 1` and skips every
//!    transaction whose commit LSN is below `C` (the copy holds it): exactly once. A worker refuses a target
//!    whose seed is still `copying` (a seed that died); seeding again empties the tables that
//!    seed had started to fill and copies from a new snapshot.
//!
//! A seed needs empty target tables (or its own unfinished ones), no applier running on the
//! target for the node, and a source role that may create a replication slot and read the
//! tables (capture's role has both).

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use tokio_postgres::Client;

use crate::apply::admit;
use crate::apply::target;
use crate::config::{ApplyConfig, ApplyMode, Config, PgUrl, TargetConfig};
use crate::lsn::Lsn;
use crate::pg::replication::ReplicationConnection;
use crate::pg::CopySide;
use crate::sink::kafka::node_stream::node_stream_topic;
use crate::sql::{qualified, quote_ident, quote_literal};

/// The smallest range of heap pages a reader copies alone (8 MB of 8 kB pages): a table of
/// fewer than twice this goes whole to one reader.
pub const MIN_RANGE_PAGES: i64 = 1024;

/// Most readers a seed runs.
pub const MAX_READERS: usize = 16;

/// Why a seed could not be done.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// The config, the options or the databases are not in a state to seed.
    #[error("{0}")]
    Refused(String),
    /// A statement failed.
    #[error("{context}")]
    Sql {
        /// What we were doing.
        context: String,
        /// Why.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The replication connection to the source failed.
    #[error("replication connection to the source")]
    Replication(#[source] crate::pg::replication::ReplicationError),
    /// Kafka could not say where the node stream ends.
    #[error("reading the end of {topic}")]
    Kafka {
        /// The node-stream topic.
        topic: String,
        /// Why.
        #[source]
        source: rdkafka::error::KafkaError,
    },
}

fn sql(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> SeedError {
    let context = context.into();
    move |source| SeedError::Sql { context, source }
}

/// What the command line asks for; what it leaves out comes from the config.
#[derive(Debug, Clone, Default)]
pub struct SeedOptions {
    /// The source node (one of `apply.nodes`); default: the only one.
    pub node: Option<String>,
    /// The source database; default: `source.url` when `node` is this config's own node.
    pub source_url: Option<String>,
    /// Capture's slot on the source; default as capture names it.
    pub slot: Option<String>,
    /// Capture's publication; default as capture's.
    pub publication: Option<String>,
    /// Parallel readers (sessions on each side), 1 to [`MAX_READERS`].
    pub readers: usize,
}

/// What a seed of one target copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seeded {
    /// The target, as logs print it.
    pub target: String,
    /// Tables copied, with their row counts.
    pub tables: Vec<(String, u64)>,
    /// The snapshot's consistent point: the worker applies transactions from here on.
    pub consistent: Lsn,
    /// Where the worker starts reading the node stream.
    pub offset: i64,
    /// Tables a seed that died had started to fill, emptied first.
    pub emptied: Vec<String>,
}

/// The settings of a seed, resolved from the options and the config.
struct Plan<'a> {
    apply: &'a ApplyConfig,
    node: String,
    source: PgUrl,
    slot: String,
    publication: String,
    readers: usize,
}

/// A published table as the seed copies it.
#[derive(Debug, Clone)]
struct SeedTable {
    /// `schema.table`, as letters and logs name it.
    name: String,
    /// Quoted, qualified.
    sql_name: String,
    /// The publication's columns, generated ones left out: names and type OIDs on the source.
    columns: Vec<(String, u32)>,
    /// Copied in binary: every column has the same built-in type on both sides (set by
    /// [`check_target_table`]); text otherwise, as native initial synchronization copies.
    binary: bool,
    /// The publication's row filter, if any.
    row_filter: Option<String>,
    /// A partitioned table (published by its root): read whole, not by pages.
    partitioned: bool,
    pages: i64,
}

impl SeedTable {
    /// The columns, quoted, as a `SELECT` or `COPY` lists them.
    fn column_list(&self) -> String {
        let quoted: Vec<String> = self.columns.iter().map(|(c, _)| quote_ident(c)).collect();
        quoted.join(", ")
    }
}

/// One range of one table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Job {
    table: usize,
    /// Heap pages `[from, to)`; `to` open for the last range; `None`: the whole table.
    pages: Option<(i64, Option<i64>)>,
}

/// Seeds every target of `config` (replica mode) from the source database.
pub async fn seed(config: &Config, options: &SeedOptions) -> Result<Vec<Seeded>, SeedError> {
    let plan = resolve(config, options)?;
    let mut seeded = Vec::new();
    for target in &plan.apply.targets {
        seeded.push(seed_target(config, &plan, target).await?);
    }
    Ok(seeded)
}

fn resolve<'a>(config: &'a Config, options: &SeedOptions) -> Result<Plan<'a>, SeedError> {
    let Some(apply) = config
        .apply
        .as_ref()
        .filter(|a| a.mode == ApplyMode::Replica)
    else {
        return Err(SeedError::Refused(
            "seed needs a replica config (apply.mode: replica); a multi-master node joins with \
             `pgferry join`"
                .into(),
        ));
    };
    let node = match &options.node {
        Some(node) if apply.nodes.contains(node) => node.clone(),
        Some(node) => {
            return Err(SeedError::Refused(format!(
                "--node {node} is not in apply.nodes {:?}",
                apply.nodes
            )))
        }
        None if apply.nodes.len() == 1 => apply.nodes[0].clone(),
        None => {
            return Err(SeedError::Refused(format!(
                "apply.nodes lists {:?}: say which node's database to seed from (--node)",
                apply.nodes
            )))
        }
    };
    if !(1..=MAX_READERS).contains(&options.readers) {
        return Err(SeedError::Refused(format!(
            "--readers {}: between 1 and {MAX_READERS}",
            options.readers
        )));
    }
    // This config's own capture, when it is the node's: its URL, slot and publication.
    let own = config.source.as_ref().filter(|_| config.node_id == node);
    let source: PgUrl = match (&options.source_url, own) {
        (Some(url), _) => {
            let url: PgUrl = url.parse().map_err(|e: crate::config::PgUrlError| {
                SeedError::Refused(format!("--source-url: {e}"))
            })?;
            // Like the config's passwords: never printed.
            url.register_secrets();
            url
        }
        (None, Some(source)) => source.url.clone(),
        (None, None) => {
            return Err(SeedError::Refused(format!(
                "--source-url: the database of node {node} (a role that may create a \
                 replication slot and read its tables, such as capture's)"
            )))
        }
    };
    let slot = options.slot.clone().unwrap_or_else(|| match own {
        Some(source) => source.slot_name(&node),
        None => crate::config::default_slot_name(&node),
    });
    let publication = options.publication.clone().unwrap_or_else(|| match own {
        Some(source) => source.publication.clone(),
        None => crate::config::DEFAULT_PUBLICATION.to_owned(),
    });
    Ok(Plan {
        apply,
        node,
        source,
        slot,
        publication,
        readers: options.readers,
    })
}

async fn seed_target(
    config: &Config,
    plan: &Plan<'_>,
    target: &TargetConfig,
) -> Result<Seeded, SeedError> {
    let shown = target.url.display_target();
    let local = crate::pg::connect(&target.url, "pgferry-seed")
        .await
        .map_err(sql(format!("connecting to the target {shown}")))?;
    check_target_idle(&local, &plan.node).await?;
    // The bookkeeping, and the node's replication origin held by this session while it
    // seeds: an applier of the node that starts meanwhile cannot set it up, and waits.
    let origin = target::origin_name(&plan.node, target.url.dbname());
    target::prepare_session(&local, &plan.node, &origin)
        .await
        .map_err(sql("preparing the apply bookkeeping on the target"))?;
    let source = crate::pg::connect(&plan.source, "pgferry-seed-read")
        .await
        .map_err(sql("connecting to the source"))?;
    // Only a seed that did not finish is taken over; a finished one left a stored position.
    let unfinished = target::read_seed(&local, &plan.node)
        .await
        .map_err(sql("reading pgferry.seeds"))?
        .filter(|seed| seed.consistent.is_none());
    if unfinished.is_none()
        && target::read_progress(&local, &plan.node)
            .await
            .map_err(sql("reading pgferry.apply_progress"))?
            .is_some()
    {
        return Err(SeedError::Refused(format!(
            "{shown} already applies {}'s stream (pgferry.apply_progress): seed fills a new \
             replica; to copy one table again while streaming, use `pgferry snapshot --table`",
            plan.node
        )));
    }
    let has_slot: bool = source
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_replication_slots
                             WHERE slot_name = $1 AND database = current_database())",
            &[&plan.slot],
        )
        .await
        .map_err(sql("looking for capture's slot"))?
        .get(0);
    if !has_slot {
        return Err(SeedError::Refused(format!(
            "the source has no replication slot {} in this database: start capture for {} first \
             (source.snapshot: never is enough); the seed's copy is exact only together with \
             the stream of a slot created before it (--slot names another)",
            plan.slot, plan.node
        )));
    }

    // 1. The node stream's last commit, before the snapshot.
    let topic = node_stream_topic(&config.kafka.topic_prefix, &plan.node);
    let (kafka, t) = (config.kafka.clone(), topic.clone());
    let (offset, start_lsn) =
        tokio::task::spawn_blocking(move || crate::apply::position::stream_start(&kafka, &t))
            .await
            .map_err(|e| SeedError::Refused(format!("reading the stream end: {e}")))?
            .map_err(|source| SeedError::Kafka {
                topic: topic.clone(),
                source,
            })?;

    // 2. A temporary slot with an exported snapshot.
    let mut repl = ReplicationConnection::connect(&plan.source, "pgferry-seed")
        .await
        .map_err(SeedError::Replication)?;
    let (consistent, snapshot) = repl
        .export_snapshot(&format!("pgferry_seed_{}", std::process::id()))
        .await
        .map_err(SeedError::Replication)?;
    // A role's or server's timeouts must not cut a long range short, nor end a reader that
    // waits, its ranges done, in its snapshot transaction for the others.
    let import = format!(
        "SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0;
         BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
        quote_literal(&snapshot)
    );
    source
        .batch_execute(&import)
        .await
        .map_err(sql("importing the source's snapshot"))?;
    let mut readers = Vec::with_capacity(plan.readers);
    for i in 1..plan.readers {
        let from = crate::pg::connect(&plan.source, "pgferry-seed-read")
            .await
            .map_err(sql("connecting a reader to the source"))?;
        from.batch_execute(&import)
            .await
            .map_err(sql("importing the source's snapshot"))?;
        readers.push((i, from));
    }
    let readers: Vec<(usize, Client)> = std::iter::once((0, source)).chain(readers).collect();

    // 3. The tables, checked on the target, then copied.
    let mut tables = published_tables(&readers[0].1, plan).await?;
    let emptied = unfinished.map(|u| u.tables).unwrap_or_default();
    for table in &mut tables {
        let ours = emptied.contains(&table.name);
        check_target_table(&local, table, ours).await?;
    }
    let names: Vec<String> = tables.iter().map(|t| t.name.clone()).collect();
    local
        .execute(target::START_SEED, &[&plan.node, &names])
        .await
        .map_err(sql("recording the seed in pgferry.seeds"))?;
    if !emptied.is_empty() {
        let list: Vec<String> = tables
            .iter()
            .filter(|t| emptied.contains(&t.name))
            .map(|t| t.sql_name.clone())
            .collect();
        if !list.is_empty() {
            tracing::info!(tables = ?emptied, "emptying the tables an unfinished seed had started to fill");
            local
                .batch_execute(&format!("TRUNCATE {}", list.join(", ")))
                .await
                .map_err(sql("emptying the tables of an unfinished seed"))?;
        }
    }
    let queue = Mutex::new(jobs(&tables, plan.readers));
    let rows: Vec<std::sync::atomic::AtomicU64> = tables.iter().map(|_| 0.into()).collect();
    tracing::info!(target = %shown, tables = tables.len(), readers = plan.readers,
                   consistent = %consistent, "seeding from the source's snapshot");
    let copies = readers
        .iter()
        .map(|(i, from)| reader(*i, from, target, &tables, &queue, &rows));
    futures_util::future::try_join_all(copies).await?;

    // 4. The starting position and the seed's end, in one transaction.
    local
        .batch_execute("BEGIN")
        .await
        .map_err(sql("recording the starting position"))?;
    local
        .execute(
            target::RECORD_PROGRESS,
            &[&plan.node, &offset.to_string(), &start_lsn.to_string()],
        )
        .await
        .map_err(sql("recording the starting position"))?;
    // The stream announced these tables in transactions the worker skips (the copy holds
    // them): what an announcement would have recorded, the seed records.
    for table in &tables {
        local
            .execute(target::RECORD_STREAM_TABLE, &[&plan.node, &table.name])
            .await
            .map_err(sql("recording the seeded tables as announced"))?;
    }
    local
        .execute(target::FINISH_SEED, &[&plan.node, &consistent.to_string()])
        .await
        .map_err(sql("recording the seed's end"))?;
    local
        .batch_execute("COMMIT")
        .await
        .map_err(sql("recording the starting position"))?;
    for (_, from) in &readers {
        let _ = from.batch_execute("COMMIT").await;
    }
    repl.terminate().await;
    let copied = tables
        .iter()
        .zip(&rows)
        .map(|(t, n)| (t.name.clone(), n.load(std::sync::atomic::Ordering::Relaxed)))
        .collect();
    Ok(Seeded {
        target: shown.to_string(),
        tables: copied,
        consistent,
        offset,
        emptied,
    })
}

/// An applier of the node on the target would apply the stream onto a half-filled copy, and
/// another seed would copy the same rows again.
async fn check_target_idle(local: &Client, node: &str) -> Result<(), SeedError> {
    let busy: Option<String> = local
        .query_one(
            "SELECT min(application_name) FROM pg_stat_activity
              WHERE datname = current_database() AND pid <> pg_backend_pid()
                AND (application_name = $1 OR application_name LIKE 'pgferry-seed%')",
            &[&format!("pgferry-apply-{node}")],
        )
        .await
        .map_err(sql("looking for a running applier or seed"))?
        .get(0);
    match busy {
        Some(name) if name.starts_with("pgferry-seed") => Err(SeedError::Refused(format!(
            "another pgferry seed is copying into this target (application_name {name}): let \
             it finish"
        ))),
        Some(_) => Err(SeedError::Refused(format!(
            "an applier of {node} is connected to this target (application_name \
             pgferry-apply-{node}): stop it, seed, then start it again"
        ))),
        None => Ok(()),
    }
}

/// The tables of the publication the seed copies: not pgferry's own or system ones
/// ([`admit::admit_relation`]), only `apply.tables` when it lists some.
async fn published_tables(source: &Client, plan: &Plan<'_>) -> Result<Vec<SeedTable>, SeedError> {
    let exists: bool = source
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_publication WHERE pubname = $1)",
            &[&plan.publication],
        )
        .await
        .map_err(sql("looking for capture's publication"))?
        .get(0);
    if !exists {
        return Err(SeedError::Refused(format!(
            "the source has no publication {} (--publication names capture's)",
            plan.publication
        )));
    }
    let rows = source
        .query(
            "SELECT p.schemaname::text, p.tablename::text, c.relkind = 'p', cols.names, cols.types,
                    p.rowfilter,
                    pg_relation_size(c.oid) / current_setting('block_size')::int8
               FROM pg_publication_tables p
               JOIN pg_namespace n ON n.nspname = p.schemaname
               JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename
               CROSS JOIN LATERAL (
                   SELECT coalesce(array_agg(a.attname::text ORDER BY a.attnum), '{}') AS names,
                          coalesce(array_agg(a.atttypid ORDER BY a.attnum), '{}') AS types
                     FROM pg_attribute a
                    WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                      AND a.attgenerated = ''
                      AND (p.attnames IS NULL OR a.attname = ANY (p.attnames))) AS cols
              WHERE p.pubname = $1
              ORDER BY 1, 2",
            &[&plan.publication],
        )
        .await
        .map_err(sql("listing the publication's tables"))?;
    let mut tables = Vec::new();
    for row in rows {
        let (schema, table): (String, String) = (row.get(0), row.get(1));
        let name = format!("{schema}.{table}");
        if admit::admit_relation(&schema, &table).is_some()
            || (!plan.apply.tables.is_empty() && !plan.apply.tables.contains(&name))
        {
            continue;
        }
        let (names, types): (Vec<String>, Vec<u32>) = (row.get(3), row.get(4));
        tables.push(SeedTable {
            sql_name: qualified(&schema, &table),
            name,
            columns: names.into_iter().zip(types).collect(),
            binary: false,
            partitioned: row.get(2),
            row_filter: row.get(5),
            pages: row.get(6),
        });
    }
    Ok(tables)
}

/// The target has the table, and it is empty (or the unfinished seed's, emptied next).
async fn check_target_table(
    local: &Client,
    table: &mut SeedTable,
    ours: bool,
) -> Result<(), SeedError> {
    let exists: bool = local
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table.sql_name])
        .await
        .map_err(sql("looking for a table on the target"))?
        .get(0);
    if !exists {
        return Err(SeedError::Refused(format!(
            "{} is published but missing on the target: create it there first (its columns \
             and primary key, as the source has them)",
            table.name
        )));
    }
    let target_types: std::collections::HashMap<String, u32> = local
        .query(
            "SELECT attname::text, atttypid FROM pg_attribute
              WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped",
            &[&table.sql_name],
        )
        .await
        .map_err(sql("reading a table's columns on the target"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    table.binary = binary_copy(&table.columns, &target_types).map_err(|column| {
        SeedError::Refused(format!(
            "column {column} of {} is published but missing on the target: add it there first",
            table.name
        ))
    })?;
    if ours {
        return Ok(());
    }
    let rows: bool = local
        .query_one(
            &format!("SELECT EXISTS (SELECT FROM {})", table.sql_name),
            &[],
        )
        .await
        .map_err(sql(format!("reading {} on the target", table.name)))?
        .get(0);
    if rows {
        return Err(SeedError::Refused(format!(
            "{} is not empty on the target: seed fills a new replica (empty its tables, or \
             re-snapshot a table with `pgferry snapshot --table`)",
            table.name
        )));
    }
    Ok(())
}

/// Whether a table's rows can travel in COPY's binary format: every published column has the
/// same built-in type on the target (a binary value is read as its column's type, so any
/// difference, or a user-defined type whose OID differs between databases, needs text). `Err`:
/// a column the target lacks.
fn binary_copy(
    source: &[(String, u32)],
    target: &std::collections::HashMap<String, u32>,
) -> Result<bool, String> {
    /// OIDs below this are the server's own (FirstNormalObjectId).
    const FIRST_USER_OID: u32 = 16384;
    let mut binary = true;
    for (column, oid) in source {
        let Some(theirs) = target.get(column) else {
            return Err(column.clone());
        };
        binary &= theirs == oid && *oid < FIRST_USER_OID;
    }
    Ok(binary)
}

/// The ranges to copy, biggest table first. Readers take whole tables first: ranges of one
/// table written at once land in different places of its key's B-tree when the heap follows
/// the key (as it does for sequential ids), and lose the rightmost-page fast path (in the
/// benchmark, one 2M-row table: 2 readers cost the replica ~50 % more CPU than 1). So a table is cut
/// only when there are more readers than tables: a table of at least `2 ×`
/// [`MIN_RANGE_PAGES`] pages into up to `readers - tables + 1` equal page ranges, the last one
/// open (the table may have grown since the snapshot; rows it sees lie in pages it had).
fn jobs(tables: &[SeedTable], readers: usize) -> VecDeque<Job> {
    let mut order: Vec<usize> = (0..tables.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(tables[i].pages));
    let spare = (readers + 1).saturating_sub(tables.len()).max(1) as i64;
    let mut jobs = VecDeque::new();
    for i in order {
        let table = &tables[i];
        let ranges = if table.partitioned {
            1
        } else {
            (table.pages / MIN_RANGE_PAGES).clamp(1, spare)
        };
        if ranges == 1 {
            jobs.push_back(Job {
                table: i,
                pages: None,
            });
            continue;
        }
        for r in 0..ranges {
            let from = table.pages * r / ranges;
            let to = (r + 1 < ranges).then(|| table.pages * (r + 1) / ranges);
            jobs.push_back(Job {
                table: i,
                pages: Some((from, to)),
            });
        }
    }
    jobs
}

/// The `SELECT` a job copies.
fn job_select(table: &SeedTable, pages: Option<(i64, Option<i64>)>) -> String {
    let mut conditions = Vec::new();
    if let Some((from, to)) = pages {
        conditions.push(format!("ctid >= '({from},0)'::tid"));
        if let Some(to) = to {
            conditions.push(format!("ctid < '({to},0)'::tid"));
        }
    }
    if let Some(filter) = &table.row_filter {
        conditions.push(format!("({filter})"));
    }
    let only = if table.partitioned { "" } else { "ONLY " };
    let mut select = format!(
        "SELECT {} FROM {only}{}",
        table.column_list(),
        table.sql_name
    );
    if !conditions.is_empty() {
        select.push_str(" WHERE ");
        select.push_str(&conditions.join(" AND "));
    }
    select
}

/// One reader: takes jobs until none is left, each streamed from `from` (in the snapshot) into
/// a target session of its own, committed alone.
async fn reader(
    index: usize,
    from: &Client,
    target: &TargetConfig,
    tables: &[SeedTable],
    queue: &Mutex<VecDeque<Job>>,
    rows: &[std::sync::atomic::AtomicU64],
) -> Result<(), SeedError> {
    let to = crate::pg::connect(&target.url, &format!("pgferry-seed-{index}"))
        .await
        .map_err(sql("connecting a reader to the target"))?;
    to.batch_execute("SET session_replication_role = replica; SET statement_timeout = 0")
        .await
        .map_err(sql(
            "preparing a target session (SET session_replication_role, as apply)",
        ))?;
    loop {
        let job = queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop_front();
        let Some(job) = job else {
            return Ok(());
        };
        let table = &tables[job.table];
        if table.columns.is_empty() {
            // No column to copy (none, or only generated ones): as many rows of defaults.
            let count: i64 = from
                .query_one(
                    &format!(
                        "SELECT count(*) FROM ({}) AS rows",
                        job_select(table, job.pages)
                    ),
                    &[],
                )
                .await
                .map_err(sql(format!("counting {} on the source", table.name)))?
                .get(0);
            let copied = to
                .execute(
                    &format!(
                        "INSERT INTO {} SELECT FROM generate_series(1, $1::int8)",
                        table.sql_name
                    ),
                    &[&count],
                )
                .await
                .map_err(sql(format!("writing {} into the target", table.name)))?;
            rows[job.table].fetch_add(copied, std::sync::atomic::Ordering::Relaxed);
            continue;
        }
        let format = if table.binary { " (FORMAT binary)" } else { "" };
        let out = from
            .copy_out(&format!(
                "COPY ({}) TO STDOUT{format}",
                job_select(table, job.pages)
            ))
            .await
            .map_err(sql(format!("copying {} out of the source", table.name)))?;
        let into = to
            .copy_in::<_, Bytes>(&format!(
                "COPY {} ({}) FROM STDIN{format}",
                table.sql_name,
                table.column_list()
            ))
            .await
            .map_err(sql(format!("copying {} into the target", table.name)))?;
        let copied = crate::pg::pipe_copy(out, into)
            .await
            .map_err(|(side, e)| match side {
                CopySide::Out => sql(format!("reading {} from the source", table.name))(e),
                CopySide::In => sql(format!("writing {} into the target", table.name))(e),
            })?;
        rows[job.table].fetch_add(copied, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(table = %table.name, pages = ?job.pages, rows = copied, reader = index,
                        binary = table.binary, "seed range copied");
    }
}

#[cfg(test)]
mod tests {
    use super::{binary_copy, job_select, jobs, SeedTable, MIN_RANGE_PAGES};

    fn table(name: &str, pages: i64) -> SeedTable {
        SeedTable {
            name: format!("public.{name}"),
            sql_name: format!("\"public\".\"{name}\""),
            columns: vec![("id".into(), 20), ("v".into(), 23)],
            binary: false,
            row_filter: None,
            partitioned: false,
            pages,
        }
    }

    /// Whatever the sizes and reader counts, the ranges of each table cover its pages
    /// `[0, ∞)` exactly once, in order, and never number more than the readers.
    #[test]
    fn ranges_cover_every_page_once() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |bound: i64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % bound as u64) as i64
        };
        for _ in 0..500 {
            let tables: Vec<SeedTable> = (0..next(5) + 1)
                .map(|i| table(&format!("t{i}"), next(MIN_RANGE_PAGES * 20)))
                .collect();
            let readers = next(16) as usize + 1;
            let jobs = jobs(&tables, readers);
            for (i, t) in tables.iter().enumerate() {
                let mine: Vec<_> = jobs.iter().filter(|j| j.table == i).collect();
                // Whole tables while there are readers for them; cut tables fill the rest.
                assert!(
                    !mine.is_empty() && mine.len() + tables.len() <= readers.max(tables.len()) + 1
                );
                if mine.len() == 1 {
                    assert_eq!(mine[0].pages, None, "{} pages", t.pages);
                    assert!(t.pages < 2 * MIN_RANGE_PAGES || readers <= tables.len());
                    continue;
                }
                let mut expect = 0;
                for (k, job) in mine.iter().enumerate() {
                    let (from, to) = job.pages.unwrap();
                    assert_eq!(from, expect);
                    match to {
                        Some(to) => {
                            assert!(to > from && k + 1 < mine.len());
                            expect = to;
                        }
                        None => assert_eq!(k + 1, mine.len()),
                    }
                }
            }
            // Biggest table first.
            let sizes: Vec<i64> = jobs.iter().map(|j| tables[j.table].pages).collect();
            assert!(sizes.windows(2).all(|w| w[0] >= w[1]));
        }
    }

    #[test]
    fn binary_only_where_every_column_has_the_same_built_in_type() {
        use std::collections::HashMap;
        let source = vec![("id".to_owned(), 20), ("v".to_owned(), 23)];
        let target = |pairs: &[(&str, u32)]| -> HashMap<String, u32> {
            pairs.iter().map(|(c, o)| (c.to_string(), *o)).collect()
        };
        assert_eq!(
            binary_copy(&source, &target(&[("id", 20), ("v", 23)])),
            Ok(true)
        );
        // The target's own extra columns do not matter.
        assert_eq!(
            binary_copy(&source, &target(&[("id", 20), ("v", 23), ("own", 25)])),
            Ok(true)
        );
        // int4 on the source, int8 on the target: text.
        assert_eq!(
            binary_copy(&source, &target(&[("id", 20), ("v", 20)])),
            Ok(false)
        );
        // A user-defined type (an enum, a domain): text, whatever its OIDs.
        let user = vec![("id".to_owned(), 20), ("mood".to_owned(), 16_500)];
        assert_eq!(
            binary_copy(&user, &target(&[("id", 20), ("mood", 16_500)])),
            Ok(false)
        );
        assert_eq!(
            binary_copy(&source, &target(&[("id", 20)])),
            Err("v".to_owned())
        );
    }

    #[test]
    fn a_job_reads_its_pages_the_published_columns_and_the_row_filter() {
        let mut t = table("items", 10);
        assert_eq!(
            job_select(&t, None),
            "SELECT \"id\", \"v\" FROM ONLY \"public\".\"items\""
        );
        t.row_filter = Some("(v > 3)".into());
        assert_eq!(
            job_select(&t, Some((4, Some(8)))),
            "SELECT \"id\", \"v\" FROM ONLY \"public\".\"items\" WHERE ctid >= '(4,0)'::tid \
             AND ctid < '(8,0)'::tid AND ((v > 3))"
        );
        t.partitioned = true;
        assert_eq!(
            job_select(&t, None),
            "SELECT \"id\", \"v\" FROM \"public\".\"items\" WHERE ((v > 3))"
        );
    }
}

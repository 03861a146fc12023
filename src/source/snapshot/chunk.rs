//! Chunked snapshots on the source: the SQL that reads one chunk, the watermarks written around
//! it, how a big table is split into key ranges, and the durable progress table
//! (`pgferry.snapshot_progress`) a restart resumes from.
//!
//! The reconciliation itself is pure, in [`crate::source::reconcile`].

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use memchr::memchr;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, SimpleQueryMessage};

use super::describe_published;
use crate::event::RelationMeta;
use crate::source::pgoutput::Datum;
use crate::source::reconcile::{ChunkRow, Key};
use crate::sql::{qualified, quote_ident, quote_literal};
use crate::value::copy_text::{self, Field};

/// Prefix of the transactional `pg_logical_emit_message` watermarks around each chunk.
pub use crate::source::assemble::SNAPSHOT_PREFIX;

/// A key column and its SQL type (`format_type`), to write key values back as literals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyColumn {
    /// Column name.
    pub name: String,
    /// Its number in the table (`attnum`): a key column renamed is the same column.
    pub attnum: i16,
    /// Its type, as `format_type` spells it.
    pub type_name: String,
    /// How the source orders its values ([`crate::sql::COLUMN_ORDER`]; `None`: a type that
    /// may order otherwise elsewhere): a target whose key column orders alike compares a key
    /// range as the source's chunk query did.
    pub order: Option<String>,
}

/// A table to snapshot, as read from the catalog.
#[derive(Debug, Clone)]
pub struct Target {
    /// The table as pgoutput would describe it (what the records are encoded with).
    pub relation: Arc<RelationMeta>,
    /// The same with only the primary key or identity index as key: what the chunks are
    /// ordered and reconciled by. No key columns (no primary key or identity index; REPLICA
    /// IDENTITY FULL alone is not a key) means chunks by `ctid`.
    pub chunk_relation: Arc<RelationMeta>,
    /// The key columns, in order.
    pub key: Vec<KeyColumn>,
    /// A partitioned table: read with its partitions (see [`super::scan_source`]).
    pub partitioned: bool,
    /// The publication's row filter for the table, parenthesized ([`super::Published`]):
    /// every chunk reads only the rows it passes.
    pub row_filter: Option<String>,
}

impl Target {
    /// What a part's key bounds mean: per key column, in key order, its number, the family of
    /// its type and how its values sort ([`KeyColumn::order`]). Bounds planned under one
    /// signature are meaningless under another: a key of other columns (as many of them), or
    /// a key column given a type or collation that sorts otherwise (`int` to `text`: `'15000'`
    /// then sorts after `'100000'`), would make a part skip rows it never read. A renamed key
    /// column keeps its signature, and so does a type change within a family whose values and
    /// order stay (`integer` to `bigint`, `varchar(n)` to `text`).
    pub fn key_signature(&self) -> String {
        self.key
            .iter()
            .map(|k| {
                format!(
                    "{}:{}:{}",
                    k.attnum,
                    order_family(&k.type_name),
                    k.order.as_deref().unwrap_or("?")
                )
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Whether chunks go by key (else by `ctid` page ranges).
    pub fn keyed(&self) -> bool {
        !self.key.is_empty()
    }

    /// A key as [`key_of`](crate::source::reconcile::key_of) reads it from a row of
    /// [`Target::chunk_relation`] (its values in the table's column order), in the key's own
    /// order (the index's): the order chunk queries sort and compare by, and targets prune by.
    /// The two differ for a key declared in another order than its columns (`PRIMARY KEY (b,
    /// a)`, or a key changed to such while the snapshot ran). In the table's order, a chunk's
    /// last key was compared as if it were the index's: the next chunk started past rows it
    /// never read, and the snapshot ended short.
    pub fn in_key_order(&self, key: &Key) -> Key {
        let in_table_order: Vec<&str> = self
            .chunk_relation
            .columns
            .iter()
            .filter(|c| c.is_key)
            .map(|c| c.name.as_str())
            .collect();
        self.key
            .iter()
            .filter_map(|k| in_table_order.iter().position(|n| *n == k.name))
            .filter_map(|i| key.get(i).cloned())
            .collect()
    }

    /// The key of a row of [`Target::chunk_relation`] in text form, in the key's order (see
    /// [`Target::in_key_order`]); `None` for a table without a key.
    pub fn key_text_of(&self, row: &crate::source::pgoutput::Tuple) -> Option<Vec<String>> {
        let key = crate::source::reconcile::key_of(&self.chunk_relation, row)?;
        key_text(&self.in_key_order(&key))
    }

    /// Whether targets can prune a chunk's key range (see [`crate::event::PruneRange`]): each
    /// key column has a [`KeyColumn::order`] a target can match.
    pub fn prunable(&self) -> bool {
        self.keyed() && self.key.iter().all(|k| k.order.is_some())
    }

    /// `schema.table`.
    pub fn name(&self) -> String {
        self.relation.qualified_name()
    }

    /// What the chunk queries read from.
    fn source(&self) -> String {
        super::scan_source(&self.relation, self.partitioned)
    }
}

/// Reads a table's description and key, with what `publication` sends of it (its column
/// list and row filter); `None` when it no longer exists.
pub async fn target(
    client: &Client,
    publication: &str,
    schema: &str,
    table: &str,
) -> Result<Option<Target>, tokio_postgres::Error> {
    let Some((relation, published)) =
        describe_published(client, publication, schema, table).await?
    else {
        return Ok(None);
    };
    let rows = client
        .query(
            &format!(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), {}, a.attnum
               FROM pg_index i
               JOIN pg_class c ON c.oid = i.indrelid
               JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) ON true
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
               JOIN pg_type t ON t.oid = a.atttypid
              WHERE i.indrelid = $1
                AND ((c.relreplident IN ('d', 'f') AND i.indisprimary)
                  OR (c.relreplident = 'i' AND i.indisreplident))
              ORDER BY k.ord",
                crate::sql::COLUMN_ORDER
            ),
            &[&relation.oid],
        )
        .await?;
    let key: Vec<KeyColumn> = rows
        .iter()
        .map(|r| KeyColumn {
            name: r.get(0),
            type_name: r.get(1),
            order: r.get(2),
            attnum: r.get(3),
        })
        .collect();
    let partitioned = super::is_partitioned(client, relation.oid).await?;
    let mut chunk_relation = relation.clone();
    for c in &mut chunk_relation.columns {
        c.is_key = key.iter().any(|k| k.name == c.name);
    }
    Ok(Some(Target {
        relation: Arc::new(relation),
        chunk_relation: Arc::new(chunk_relation),
        key,
        partitioned,
        row_filter: published.condition(),
    }))
}

/// The types whose values keep their text and order when a column changes among them (a
/// bound's text then reads as the same value, in the same place): the integers and
/// `numeric`, and `text` with `varchar`; any other type is its own family.
fn order_family(type_name: &str) -> &str {
    let base = type_name.split('(').next().unwrap_or(type_name).trim();
    match base {
        "smallint" | "integer" | "bigint" | "numeric" => "number",
        "text" | "character varying" => "text",
        _ => type_name,
    }
}

/// The select list of every chunk query: the columns, then `xmax` and `xmin`.
fn select_list(target: &Target) -> String {
    let mut columns: Vec<String> = target
        .relation
        .columns
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect();
    columns.push("xmax::text".into());
    columns.push("xmin::text".into());
    columns.join(", ")
}

/// `(k1, k2)` for the key columns.
fn key_tuple(target: &Target) -> String {
    let names: Vec<String> = target.key.iter().map(|k| quote_ident(&k.name)).collect();
    format!("({})", names.join(", "))
}

/// `('v1'::t1, 'v2'::t2)` for key values in text form.
fn key_literal(target: &Target, values: &[String]) -> String {
    let literals: Vec<String> = target
        .key
        .iter()
        .zip(values)
        .map(|(k, v)| format!("{}::{}", quote_literal(v), k.type_name))
        .collect();
    format!("({})", literals.join(", "))
}

/// The next chunk of a key range: rows with key in `(after, upper]`, in key order, at most
/// `limit`; with `bytes`, only as many of those as come to at most `bytes` by [`row_size`]
/// (at least one). The bounded form first finds, in the same statement and snapshot, the
/// last key within the bound from the keys and the values' sizes alone (no TOASTed value is
/// read for it), then reads the rows up to that key.
pub fn chunk_query(
    target: &Target,
    after: Option<&[String]>,
    upper: Option<&[String]>,
    limit: u32,
    bytes: Option<u64>,
) -> String {
    let key = key_tuple(target);
    let mut conditions = filtered(target);
    if let Some(after) = after {
        conditions.push(format!("{key} > {}", key_literal(target, after)));
    }
    if let Some(upper) = upper {
        conditions.push(format!("{key} <= {}", key_literal(target, upper)));
    }
    let order: Vec<String> = target.key.iter().map(|k| quote_ident(&k.name)).collect();
    let order = order.join(", ");
    let source = target.source();
    let cut = bytes.map(|bytes| {
        let size = row_size(target);
        format!(
            "WITH pgferry_cut AS (
                 SELECT {order} FROM (
                     SELECT {order}, sum({size}) OVER (ORDER BY {order} ROWS UNBOUNDED PRECEDING) - {size} AS pgferry_before
                       FROM {source}{filter} ORDER BY {order} LIMIT {limit}) AS s
                  WHERE pgferry_before < {bytes}
                  ORDER BY pgferry_before DESC LIMIT 1) ",
            filter = where_clause(&conditions),
        )
    });
    if cut.is_some() {
        conditions.push(format!("{key} <= (SELECT {order} FROM pgferry_cut)"));
    }
    format!(
        "{}SELECT {} FROM {source}{} ORDER BY {order} LIMIT {limit}",
        cut.unwrap_or_default(),
        select_list(target),
        where_clause(&conditions),
    )
}

/// The first condition of every query that reads a table's rows: the publication's row
/// filter, where it has one.
fn filtered(target: &Target) -> Vec<String> {
    target.row_filter.iter().cloned().collect()
}

/// ` WHERE a AND b`, or nothing for no condition.
fn where_clause(conditions: &[String]) -> String {
    if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    }
}

/// A row's size as SQL, close to its length in `COPY`'s text and read from the values'
/// headers alone: `octet_length` of text types and twice that of `bytea` (hex), the length of
/// the value uncompressed, which PostgreSQL reads without fetching a TOASTed value; the stored
/// size (`pg_column_size`) of other types; one more for the row.
fn row_size(target: &Target) -> String {
    const TEXT: u32 = 25;
    const VARCHAR: u32 = 1043;
    const BPCHAR: u32 = 1042;
    const BYTEA: u32 = 17;
    let terms: Vec<String> = target
        .relation
        .columns
        .iter()
        .map(|c| {
            let q = quote_ident(&c.name);
            match c.type_oid {
                TEXT | VARCHAR | BPCHAR => format!("coalesce(octet_length({q}), 0)"),
                BYTEA => format!("coalesce(2 * octet_length({q}), 0)"),
                _ => format!("coalesce(pg_column_size({q}), 0)"),
            }
        })
        .collect();
    format!("({} + 1)::int8", terms.join(" + "))
}

/// Bytes a row of table `oid` (its partitions, for a partitioned one) takes on disk on
/// average, TOASTed values included: how wide a chunk of its rows may be before one is read.
/// A table the planner has no row count for yet counts as one row.
pub async fn average_row_bytes(client: &Client, oid: u32) -> Result<f64, tokio_postgres::Error> {
    let row = client
        .query_one(
            &format!(
                "SELECT (coalesce(sum(pg_table_size(c.oid)), 0)
                         / greatest(sum(greatest(c.reltuples, 0)), 1))::float8
                   FROM pg_class c WHERE {STORAGE}"
            ),
            &[&oid],
        )
        .await?;
    Ok(row.get(0))
}

/// The rows of the given keys (a re-read).
pub fn keys_query(target: &Target, keys: &[Vec<String>]) -> String {
    let lists: Vec<String> = keys.iter().map(|k| key_literal(target, k)).collect();
    let mut conditions = filtered(target);
    conditions.push(format!("{} IN ({})", key_tuple(target), lists.join(", ")));
    format!(
        "SELECT {} FROM {}{}",
        select_list(target),
        target.source(),
        where_clause(&conditions)
    )
}

/// The rows of heap pages `[from, to)` (a table without a key).
pub fn pages_query(target: &Target, from: u64, to: u64) -> String {
    let mut conditions = filtered(target);
    conditions.push(format!(
        "ctid >= '({from},0)'::tid AND ctid < '({to},0)'::tid"
    ));
    format!(
        "SELECT {} FROM {}{}",
        select_list(target),
        target.source(),
        where_clause(&conditions)
    )
}

/// A chunk as read: its rows and their size in bytes (as text).
#[derive(Debug, Default)]
pub struct Read {
    /// The rows, in the order the query returned them.
    pub rows: Vec<ChunkRow>,
    /// Bytes of text read.
    pub bytes: u64,
    /// When asked for: the transactions in progress for the read's snapshot (the low 32 bits
    /// of `pg_current_snapshot()`'s `xip`, as the stream numbers transactions).
    pub running: Option<Vec<u32>>,
}

/// The in-progress transactions of a `pg_snapshot`'s text form (`xmin:xmax:xip,…`), as the
/// stream numbers them (the low 32 bits of each `xid8`); `None` when it is not that form.
pub fn running_of(snapshot: &str) -> Option<Vec<u32>> {
    let mut fields = snapshot.split(':');
    let (_, _, xip) = (fields.next()?, fields.next()?, fields.next()?);
    if fields.next().is_some() {
        return None;
    }
    xip.split(',')
        .filter(|x| !x.is_empty())
        .map(|x| x.parse::<u64>().ok().map(|x| x as u32))
        .collect()
}

/// Runs a chunk query (one statement: one snapshot, one short transaction) as `COPY (query) TO
/// STDOUT`: PostgreSQL sends each row as one message of its values' text output, which the
/// client takes as it is, instead of a data row it parses and checks value by value.
///
/// The chunk's rows are copied into one buffer, and each value is a slice of it (a value with
/// a backslash sequence, rare, gets its own bytes): one allocation per chunk instead of one
/// per value. The rows are read on a reader's task and dropped on capture's after publishing;
/// values allocated one by one cost the allocator, and glibc's per-thread arenas, more than
/// their copying (the chunked snapshot spent more CPU than the exported one in malloc and
/// free).
pub async fn read(client: &Client, sql: &str) -> Result<Read, tokio_postgres::Error> {
    let stream = client.copy_out(&format!("COPY ({sql}) TO STDOUT")).await?;
    futures_util::pin_mut!(stream);
    // One message per row, each a slice of the connection's read buffer: gathered, then
    // copied into a buffer of the chunk's exact size (one grown by doubling held up to twice
    // the chunk, for as long as any of its values lived).
    let mut pieces = Vec::new();
    while let Some(piece) = stream.next().await {
        pieces.push(piece?);
    }
    let mut buffer = BytesMut::with_capacity(pieces.iter().map(Bytes::len).sum());
    for piece in pieces {
        buffer.extend_from_slice(&piece);
    }
    Ok(parse_rows(buffer.freeze()))
}

/// How [`read_locked`] found a chunk's table.
#[derive(Debug)]
pub enum Locked {
    /// Read as the table is now.
    Read {
        /// The table as described under the lock: what the rows are laid out by.
        target: Target,
        /// The chunk.
        read: Read,
        /// The query that read it.
        sql: String,
    },
    /// The table no longer exists.
    Gone,
    /// The table's key is not the planned one any more, or it was renamed again each time it
    /// was looked up: `detail` says which.
    Changed {
        /// What changed.
        detail: String,
    },
}

/// Reads one chunk in a transaction of its own that first locks the table in `ACCESS SHARE`
/// mode (as the chunk's `SELECT` would) and describes it again, then runs the query `query`
/// builds from that description. A schema change committed since the table was planned (a
/// column added, dropped, renamed or given another type, the table renamed) is read as the
/// table now is, and none can commit between the description and the read. The table is
/// found by its oid: a renamed one is locked under its new name. The transaction is
/// `REPEATABLE READ`, so with `running` the read's snapshot is known ([`Read::running`]).
pub async fn read_locked(
    client: &Client,
    publication: &str,
    planned: &Target,
    running: bool,
    query: impl Fn(&Target) -> String,
) -> Result<Locked, tokio_postgres::Error> {
    let oid = planned.relation.oid;
    let mut name = (
        planned.relation.schema.clone(),
        planned.relation.table.clone(),
    );
    for _ in 0..3 {
        let attempt = locked_attempt(client, publication, &name, planned, running, &query).await;
        let end = match &attempt {
            Ok(Some(Locked::Read { .. })) => "COMMIT",
            _ => "ROLLBACK",
        };
        let ended = client.batch_execute(end).await;
        let attempt = attempt?;
        ended?;
        match attempt {
            Some(found) => return Ok(found),
            // Renamed, or gone: its name now, by its oid.
            None => match name_of(client, oid).await? {
                Some(now) => name = now,
                None => return Ok(Locked::Gone),
            },
        }
    }
    Ok(Locked::Changed {
        detail: "it was renamed each time it was looked up".into(),
    })
}

/// One try of [`read_locked`]: begins the transaction (the caller ends it), locks `name`,
/// describes it and, when it is still the planned table (same oid) with a key of as many
/// columns, reads the chunk. `None`: no table of that name is the planned one (renamed or
/// dropped).
async fn locked_attempt(
    client: &Client,
    publication: &str,
    (schema, table): &(String, String),
    planned: &Target,
    running: bool,
    query: &impl Fn(&Target) -> String,
) -> Result<Option<Locked>, tokio_postgres::Error> {
    // LOCK takes no snapshot: the transaction's is taken after the lock is held.
    let lock = format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ; LOCK TABLE {} IN ACCESS SHARE MODE",
        qualified(schema, table)
    );
    match client.batch_execute(&lock).await {
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => return Ok(None),
        locked => locked?,
    }
    let running = if running {
        let snapshot: String = client
            .query_one("SELECT pg_current_snapshot()::text", &[])
            .await?
            .get(0);
        running_of(&snapshot)
    } else {
        None
    };
    let Some(fresh) = target(client, publication, schema, table)
        .await?
        .filter(|t| t.relation.oid == planned.relation.oid)
    else {
        return Ok(None);
    };
    if fresh.key_signature() != planned.key_signature() {
        let names = |t: &Target| {
            let k: Vec<String> = t
                .key
                .iter()
                .map(|k| format!("{} {}", k.name, k.type_name))
                .collect();
            format!("({})", k.join(", "))
        };
        return Ok(Some(Locked::Changed {
            detail: format!(
                "its key is {} now, the snapshot was planned with {}, which orders otherwise",
                names(&fresh),
                names(planned)
            ),
        }));
    }
    let sql = query(&fresh);
    let mut read = read(client, &sql).await?;
    read.running = running;
    Ok(Some(Locked::Read {
        target: fresh,
        read,
        sql,
    }))
}

/// A table's schema and name now; `None` when no table has the oid.
async fn name_of(
    client: &Client,
    oid: u32,
) -> Result<Option<(String, String)>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT n.nspname::text, c.relname::text
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.oid = $1",
            &[&oid],
        )
        .await?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// The rows of a chunk query's `COPY` output: the row's values, then `xmax` and `xmin`.
fn parse_rows(text: Bytes) -> Read {
    let mut read = Read {
        rows: Vec::with_capacity(memchr::memchr_iter(b'\n', &text).count()),
        bytes: text.len() as u64,
        running: None,
    };
    let mut start = 0;
    while start < text.len() {
        let end = memchr(b'\n', &text[start..]).map_or(text.len(), |n| start + n);
        let line = start..end;
        start = end + 1;
        // The last two columns are xmax and xmin, not the row's. The values are allocated at
        // the row's width: the chunks in flight hold every row's.
        let tabs = || memchr::memchr_iter(b'\t', &text[line.clone()]).map(|n| line.start + n);
        let width = tabs().count() + 1;
        let mut tuple = Vec::with_capacity(width.saturating_sub(2));
        let mut xids = [0u32; 2];
        let mut at = line.start;
        for (i, stop) in tabs().chain([end]).enumerate() {
            let range = at..stop;
            at = stop + 1;
            let value = &text[range.clone()];
            if i + 2 >= width {
                xids[i + 2 - width] = std::str::from_utf8(value)
                    .ok()
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(0);
            } else {
                tuple.push(match copy_text::field(value) {
                    Field::Null => Datum::Null,
                    Field::Plain(_) => Datum::Text(text.slice(range)),
                    Field::Unescaped(value) => Datum::Text(Bytes::from(value)),
                });
            }
        }
        let [xmax, xmin] = xids;
        read.rows.push(ChunkRow { tuple, xmax, xmin });
    }
    read
}

/// A key in text form (for literals and the progress table); `None` when a value is NULL or
/// not UTF-8 (a key column never holds either).
pub fn key_text(key: &Key) -> Option<Vec<String>> {
    key.iter()
        .map(|v| {
            v.as_ref()
                .and_then(|b| std::str::from_utf8(b).ok().map(str::to_owned))
        })
        .collect()
}

/// Writes a snapshot watermark into the WAL, in a transaction of its own (committed, and
/// reader sessions commit synchronously, so the WAL is flushed and the stream reaches it
/// without waiting for other writes or the WAL writer).
pub async fn emit_watermark(client: &Client, content: &str) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "SELECT pg_logical_emit_message(true, $1, $2)",
            &[&SNAPSHOT_PREFIX, &content],
        )
        .await
        .map(drop)
}

/// Split points for `parts` key ranges of a table, from a sample of its keys. Fewer points
/// come back when the sample holds fewer distinct keys.
pub async fn split_points(
    client: &Client,
    target: &Target,
    estimated_rows: i64,
    parts: u32,
) -> Result<Vec<Vec<String>>, tokio_postgres::Error> {
    if parts < 2 || !target.keyed() || estimated_rows <= 0 {
        return Ok(Vec::new());
    }
    // About 200 sampled keys per part; TABLESAMPLE SYSTEM picks whole pages.
    let percent = (100.0 * f64::from(parts) * 200.0 / estimated_rows as f64).clamp(0.01, 100.0);
    // The key columns themselves (the simple protocol returns them as text), ordered by their
    // own type: ordering by a `::text` output column would sort 10 before 9 and make ranges
    // overlap.
    let keys: Vec<String> = target.key.iter().map(|k| quote_ident(&k.name)).collect();
    let sql = format!(
        "SELECT {keys} FROM {} TABLESAMPLE SYSTEM ({percent}) ORDER BY {keys}",
        target.source(),
        keys = keys.join(", "),
    );
    let mut sample = Vec::new();
    let messages = match client.simple_query(&sql).await {
        // A role that may not read the table: one part, whose read says so (and waits).
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
            return Ok(Vec::new())
        }
        other => other?,
    };
    for message in messages {
        if let SimpleQueryMessage::Row(row) = message {
            let key: Option<Vec<String>> = (0..row.len())
                .map(|i| row.get(i).map(str::to_owned))
                .collect();
            sample.extend(key);
        }
    }
    Ok(pick_split_points(&sample, parts))
}

/// Evenly spaced, distinct keys of a sorted sample: the upper bounds of all parts but the last.
pub fn pick_split_points(sample: &[Vec<String>], parts: u32) -> Vec<Vec<String>> {
    let mut points: Vec<Vec<String>> = Vec::new();
    if sample.is_empty() {
        return points;
    }
    for i in 1..parts as usize {
        let at = i * sample.len() / parts as usize;
        let Some(key) = sample.get(at) else { break };
        if points.last() != Some(key) {
            points.push(key.clone());
        }
    }
    points
}

/// One key range of a table's snapshot, as stored in `pgferry.snapshot_progress`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// Schema.
    pub schema: String,
    /// Table.
    pub table: String,
    /// Range number within the table.
    pub part: i32,
    /// Exclusive lower bound (`None`: from the first row).
    pub lower: Option<Vec<String>>,
    /// Inclusive upper bound (`None`: to the last row).
    pub upper: Option<Vec<String>>,
    /// Last key Kafka holds (`None`: nothing yet).
    pub last: Option<Vec<String>>,
    /// Chunks go by key; else by pages, and the table restarts from its first page.
    pub keyed: bool,
    /// Rows published so far.
    pub rows_done: i64,
    /// Rows the table's snapshot expected when it was planned.
    pub estimated: i64,
    /// Chunks carry their key range, and targets delete the rows of it the source does not
    /// have (a re-snapshot; not the first snapshot of a new slot, whose targets start empty).
    pub prune: bool,
    /// The table's [`Target::key_signature`] when the part was planned (`None`: planned by a
    /// version that did not record it).
    pub key_signature: Option<String>,
}

impl Part {
    /// `schema.table`.
    pub fn table_name(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }
}

/// Parts of this slot's snapshots that are not done, in table order.
pub async fn unfinished_parts(
    client: &Client,
    slot: &str,
) -> Result<Vec<Part>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT table_schema, table_name, part, lower_key, upper_key, last_key, keyed, rows_done,
                    rows_estimated, prune, key_signature
               FROM pgferry.snapshot_progress
              WHERE slot_name = $1 AND NOT done
              ORDER BY table_schema, table_name, part",
            &[&slot],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Part {
            schema: r.get(0),
            table: r.get(1),
            part: r.get(2),
            lower: r.get(3),
            upper: r.get(4),
            last: r.get(5),
            keyed: r.get(6),
            rows_done: r.get(7),
            estimated: r.get(8),
            prune: r.get(9),
            key_signature: r.get(10),
        })
        .collect())
}

/// Rows the finished parts of this slot's unfinished table snapshots read, per table: a
/// resumed table's count starts from them, not from zero.
pub async fn finished_rows(
    client: &Client,
    slot: &str,
) -> Result<std::collections::HashMap<(String, String), i64>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT table_schema, table_name, sum(rows_done)::bigint
               FROM pgferry.snapshot_progress p
              WHERE slot_name = $1 AND done
                AND EXISTS (SELECT 1 FROM pgferry.snapshot_progress u
                             WHERE u.slot_name = p.slot_name AND NOT u.done
                               AND u.table_schema = p.table_schema AND u.table_name = p.table_name)
              GROUP BY table_schema, table_name",
            &[&slot],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect())
}

/// Tables this slot has a snapshot record of (done or not).
pub async fn known_tables(
    client: &Client,
    slot: &str,
) -> Result<std::collections::HashSet<(String, String)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT DISTINCT table_schema, table_name FROM pgferry.snapshot_progress WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Keeps this slot's snapshot records in step with the publication, before new tables are
/// looked for: a record of a table renamed (or moved to another schema) takes its new name,
/// found by the table's oid, so the table is not snapshotted again as new; a record of a
/// table no longer published is forgotten, so that the table, published again, is
/// snapshotted again (its changes while it was out never reached the stream). Returns the
/// tables renamed (`old → new`) and forgotten, for the log. Nothing is forgotten while the
/// publication itself is missing.
pub async fn follow_publication(
    client: &Client,
    slot: &str,
    publication: &str,
) -> Result<(Vec<String>, Vec<String>), tokio_postgres::Error> {
    const PUBLISHED: &str = "SELECT c.oid, pt.schemaname::text AS s, pt.tablename::text AS t
               FROM pg_publication_tables pt
               JOIN pg_namespace n ON n.nspname = pt.schemaname
               JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
              WHERE pt.pubname = $2";
    // Each statement reads the publication's tables once (`MATERIALIZED`): inlined, the
    // planner may run `pg_get_publication_tables` again for every progress row, a cost that
    // grows with the square of the tables (two seconds a poll at 1,500 tables).
    in_transaction(client, async {
        // Records already under the new name (planned as new meanwhile) win.
        client
            .execute(
                &format!(
                    "WITH pub AS MATERIALIZED ({PUBLISHED})
                     DELETE FROM pgferry.snapshot_progress p USING pub
                      WHERE p.slot_name = $1 AND p.table_oid = pub.oid
                        AND (p.table_schema, p.table_name) <> (pub.s, pub.t)
                        AND EXISTS (SELECT 1 FROM pgferry.snapshot_progress q
                                     WHERE q.slot_name = $1 AND q.table_schema = pub.s
                                       AND q.table_name = pub.t)"
                ),
                &[&slot, &publication],
            )
            .await?;
        let renamed = client
            .query(
                &format!(
                    "WITH pub AS MATERIALIZED ({PUBLISHED}),
                          moved AS (
                         UPDATE pgferry.snapshot_progress p SET table_schema = pub.s, table_name = pub.t
                           FROM pub
                          WHERE p.slot_name = $1 AND p.table_oid = pub.oid
                            AND (p.table_schema, p.table_name) <> (pub.s, pub.t)
                      RETURNING p.table_oid)
                     SELECT DISTINCT pub.s || '.' || pub.t FROM moved JOIN pub ON pub.oid = moved.table_oid"
                ),
                &[&slot, &publication],
            )
            .await?;
        let forgotten = client
            .query(
                "WITH pub AS MATERIALIZED (
                     SELECT schemaname::text AS s, tablename::text AS t FROM pg_publication_tables
                      WHERE pubname = $2),
                      gone AS (
                     DELETE FROM pgferry.snapshot_progress p
                      WHERE p.slot_name = $1
                        AND EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $2)
                        AND NOT EXISTS (SELECT 1 FROM pub
                                         WHERE pub.s = p.table_schema AND pub.t = p.table_name)
                  RETURNING p.table_schema, p.table_name)
                 SELECT DISTINCT table_schema || '.' || table_name FROM gone",
                &[&slot, &publication],
            )
            .await?;
        Ok((
            renamed.iter().map(|r| r.get(0)).collect(),
            forgotten.iter().map(|r| r.get(0)).collect(),
        ))
    })
    .await
}

/// Runs `work` (statements on `client`, not yet started) in one transaction: committed when it
/// succeeds, rolled back when it fails.
async fn in_transaction<T>(
    client: &Client,
    work: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, tokio_postgres::Error> {
    client.batch_execute("BEGIN").await?;
    match work.await {
        Ok(done) => {
            client.batch_execute("COMMIT").await?;
            Ok(done)
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

/// Records tables as needing no snapshot (they were covered some other way: the exported
/// snapshot, or `snapshot: never` when the slot was created).
pub async fn record_covered(
    client: &Client,
    slot: &str,
    tables: &[(String, String)],
) -> Result<(), tokio_postgres::Error> {
    for (schema, table) in tables {
        client
            .execute(
                "INSERT INTO pgferry.snapshot_progress
                     (slot_name, table_schema, table_name, part, keyed, done, table_oid)
                 VALUES ($1, $2, $3, 0, true, true,
                         to_regclass(quote_ident($2) || '.' || quote_ident($3)))
                 ON CONFLICT DO NOTHING",
                &[&slot, schema, table],
            )
            .await?;
    }
    Ok(())
}

/// Plans a table's snapshot anew: forgets its earlier parts, splits it into up to `parts` key
/// ranges, and stores them. Returns the parts and the estimated row count. `prune`: see
/// [`Part::prune`].
pub async fn plan_table(
    client: &Client,
    slot: &str,
    target: &Target,
    parts: u32,
    chunk_rows: u32,
    prune: bool,
) -> Result<(Vec<Part>, i64), tokio_postgres::Error> {
    let estimated: i64 = client
        .query_one(
            &format!(
                "SELECT COALESCE(sum(GREATEST(c.reltuples, 0)), 0)::int8 FROM pg_class c
                  WHERE {STORAGE}"
            ),
            &[&target.relation.oid],
        )
        .await?
        .get(0);
    // Split only tables worth several chunks per part.
    let wanted = (estimated / (i64::from(chunk_rows) * 4)).clamp(1, i64::from(parts)) as u32;
    let points = split_points(client, target, estimated, wanted).await?;
    let schema = &target.relation.schema;
    let table = &target.relation.table;
    let mut planned = Vec::new();
    let mut lower: Option<Vec<String>> = None;
    for (i, upper) in points.into_iter().map(Some).chain([None]).enumerate() {
        planned.push(Part {
            schema: schema.clone(),
            table: table.clone(),
            part: i as i32,
            lower: lower.clone(),
            upper: upper.clone(),
            last: None,
            keyed: target.keyed(),
            rows_done: 0,
            estimated,
            prune,
            key_signature: Some(target.key_signature()),
        });
        lower = upper;
    }
    in_transaction(client, async {
        client
            .execute(
                "DELETE FROM pgferry.snapshot_progress WHERE slot_name = $1 AND table_schema = $2 AND table_name = $3",
                &[&slot, schema, table],
            )
            .await?;
        for p in &planned {
            client
                .execute(
                    "INSERT INTO pgferry.snapshot_progress
                         (slot_name, table_schema, table_name, part, lower_key, upper_key, keyed, rows_estimated,
                          prune, key_signature, table_oid)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                    &[&slot, schema, table, &p.part, &p.lower, &p.upper, &p.keyed, &estimated, &p.prune,
                      &p.key_signature, &target.relation.oid],
                )
                .await?;
        }
        Ok(())
    })
    .await?;
    Ok((planned, estimated))
}

/// Records a chunk Kafka holds: the part's last key and row count, and whether it is done.
pub async fn record_chunk(
    client: &Client,
    slot: &str,
    part: &Part,
    last: Option<&[String]>,
    rows: i64,
    done: bool,
) -> Result<(), tokio_postgres::Error> {
    let last: Option<Vec<String>> = last.map(<[String]>::to_vec);
    client
        .execute(
            "UPDATE pgferry.snapshot_progress
                SET last_key = COALESCE($5, last_key), rows_done = rows_done + $6, chunks = chunks + 1,
                    done = $7, updated_at = now()
              WHERE slot_name = $1 AND table_schema = $2 AND table_name = $3 AND part = $4",
            &[&slot, &part.schema, &part.table, &part.part, &last, &rows, &done],
        )
        .await
        .map(drop)
}

/// Starts a page-chunked (keyless) part over from its first page after a restart.
pub async fn restart_part(
    client: &Client,
    slot: &str,
    part: &Part,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "UPDATE pgferry.snapshot_progress SET last_key = NULL, rows_done = 0, chunks = 0, updated_at = now()
              WHERE slot_name = $1 AND table_schema = $2 AND table_name = $3 AND part = $4",
            &[&slot, &part.schema, &part.table, &part.part],
        )
        .await
        .map(drop)
}

/// The pending snapshot requests (id, `schema.table`), oldest first. They stay in the table
/// until [`forget_requests`]: taken out before the snapshot was planned, a request was lost
/// to a crash in between. A request that names its table's oid names the table as it is
/// called now (quoted, as SQL reads it): renamed or moved since, it is still the table meant.
pub async fn pending_requests(
    client: &Client,
) -> Result<Vec<(i64, String)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT t.id, CASE WHEN c.oid IS NULL THEN t.table_name
                               ELSE format('%I.%I', n.nspname, c.relname) END
               FROM pgferry.snapshot_requests t
               LEFT JOIN pg_class c ON c.oid = t.table_oid
               LEFT JOIN pg_namespace n ON n.oid = c.relnamespace
              ORDER BY t.id",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Removes requests that were planned (their parts are recorded) or refused.
pub async fn forget_requests(client: &Client, ids: &[i64]) -> Result<(), tokio_postgres::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    client
        .execute(
            "DELETE FROM pgferry.snapshot_requests WHERE id = ANY($1)",
            &[&ids],
        )
        .await
        .map(drop)
}

/// Requests a snapshot of `schema.table` (what `pgferry snapshot --table` does), or of the
/// table with `oid` under whatever name it has when the request is taken.
pub async fn request(
    client: &Client,
    table: &str,
    oid: Option<u32>,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO pgferry.snapshot_requests (table_name, table_oid) VALUES ($1, $2)",
            &[&table, &oid],
        )
        .await
        .map(drop)
}

/// The relations that hold the rows of table `$1`: the table itself, or a partitioned table's
/// leaf partitions (`pg_partition_tree` lists nothing for a plain table).
const STORAGE: &str = "c.relkind <> 'p'
    AND c.oid IN (SELECT $1::oid
                  UNION SELECT relid::oid FROM pg_partition_tree($1::oid::regclass) WHERE isleaf)";

/// Heap pages of a table now, and rows per page by the planner's statistics. For a
/// partitioned table, the pages of its largest partition: a page range read through the
/// partitioned table reads those pages of every partition.
pub async fn heap_pages(client: &Client, oid: u32) -> Result<(u64, f64), tokio_postgres::Error> {
    let row = client
        .query_one(
            &format!(
                "SELECT COALESCE(max(pg_relation_size(c.oid) / current_setting('block_size')::int8), 0)::int8,
                        CASE WHEN sum(c.relpages) > 0 THEN sum(GREATEST(c.reltuples, 0)) / sum(c.relpages) ELSE 0 END::float8
                   FROM pg_class c
                  WHERE {STORAGE}"
            ),
            &[&oid],
        )
        .await?;
    Ok((row.get::<_, i64>(0).max(0) as u64, row.get(1)))
}

/// The files that hold a table's rows now (each storage relation's oid and file node, see
/// [`heap_pages`]). A rewrite (`VACUUM FULL`, `CLUSTER`, a type change, `TRUNCATE`) gives a
/// relation a new file; attaching or detaching a partition changes the list.
pub async fn heap_files(
    client: &Client,
    oid: u32,
) -> Result<Vec<(u32, u32)>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "SELECT c.oid, pg_relation_filenode(c.oid) FROM pg_class c WHERE {STORAGE}
                  ORDER BY c.oid"
            ),
            &[&oid],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get::<_, Option<u32>>(1).unwrap_or(0)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A chunk's COPY output (as the server escapes it) reads back as its values, NULLs,
        /// and each row's xmax and xmin.
        #[test]
        fn copy_output_reads_back_as_the_rows(
            rows in prop::collection::vec(
                (
                    prop::collection::vec(
                        prop::option::of(prop::collection::vec(any::<u8>(), 0..12)),
                        1..4,
                    ),
                    any::<u32>(),
                    any::<u32>(),
                ),
                0..20,
            )
        ) {
            let mut text = Vec::new();
            for (values, xmax, xmin) in &rows {
                for value in values {
                    match value {
                        None => text.extend_from_slice(b"\\N"),
                        Some(v) => text.extend(crate::value::copy_text::testing::server_escaped(v)),
                    }
                    text.push(b'\t');
                }
                text.extend(format!("{xmax}\t{xmin}\n").bytes());
            }
            let read = parse_rows(Bytes::from(text.clone()));
            prop_assert_eq!(read.bytes, text.len() as u64);
            prop_assert_eq!(read.rows.len(), rows.len());
            for (row, (values, xmax, xmin)) in read.rows.iter().zip(&rows) {
                prop_assert_eq!((row.xmax, row.xmin), (*xmax, *xmin));
                let got: Vec<Option<Vec<u8>>> = row
                    .tuple
                    .iter()
                    .map(|d| match d {
                        Datum::Text(t) => Some(t.to_vec()),
                        _ => None,
                    })
                    .collect();
                prop_assert_eq!(&got, values);
            }
        }
    }

    use crate::source::pgoutput::{Column, ReplicaIdentity};

    fn target(key: &[(&str, &str)]) -> Target {
        let columns = ["id", "sub", "v"]
            .iter()
            .map(|n| Column {
                is_key: key.iter().any(|(k, _)| k == n),
                name: (*n).into(),
                type_oid: 23,
                type_modifier: -1,
            })
            .collect();
        let relation = Arc::new(RelationMeta {
            oid: 1,
            schema: "s".into(),
            table: "t".into(),
            replica_identity: ReplicaIdentity::Default,
            columns,
        });
        Target {
            relation: relation.clone(),
            chunk_relation: relation,
            key: key
                .iter()
                .map(|(n, t)| KeyColumn {
                    name: (*n).into(),
                    attnum: ["id", "sub", "v"].iter().position(|c| c == n).unwrap_or(9) as i16 + 1,
                    type_name: (*t).into(),
                    order: (*t != "text").then(String::new),
                })
                .collect(),
            partitioned: false,
            row_filter: None,
        }
    }

    #[test]
    fn chunk_queries_compare_whole_keys_with_typed_literals() {
        let t = target(&[("id", "bigint"), ("sub", "text")]);
        let after = vec!["5".to_owned(), "o'k".to_owned()];
        assert_eq!(
            chunk_query(&t, Some(&after), None, 100, None),
            r#"SELECT "id", "sub", "v", xmax::text, xmin::text FROM ONLY "s"."t" WHERE ("id", "sub") > ('5'::bigint, 'o''k'::text) ORDER BY "id", "sub" LIMIT 100"#
        );
        let upper = vec!["9".to_owned(), "z".to_owned()];
        assert!(chunk_query(&t, None, Some(&upper), 7, None)
            .contains(r#"WHERE ("id", "sub") <= ('9'::bigint, 'z'::text) ORDER BY"#));
        assert!(keys_query(&t, &[after.clone(), upper]).ends_with(
            r#"WHERE ("id", "sub") IN (('5'::bigint, 'o''k'::text), ('9'::bigint, 'z'::text))"#
        ));
        assert!(pages_query(&t, 3, 8).ends_with("ctid >= '(3,0)'::tid AND ctid < '(8,0)'::tid"));
    }

    #[test]
    fn every_chunk_query_reads_only_rows_the_row_filter_passes() {
        let mut t = target(&[("id", "bigint")]);
        t.row_filter = Some("(v > 3 AND sub <> 'x')".into());
        let after = vec!["5".to_owned()];
        let upper = vec!["9".to_owned()];
        let filtered = r#"WHERE (v > 3 AND sub <> 'x') AND"#;
        let plain = chunk_query(&t, Some(&after), Some(&upper), 100, None);
        assert!(
            plain.contains(&format!(
                r#"{filtered} ("id") > ('5'::bigint) AND ("id") <= ('9'::bigint) ORDER BY"#
            )),
            "{plain}"
        );
        let first = chunk_query(&t, None, None, 100, None);
        assert!(
            first.ends_with(
                r#"FROM ONLY "s"."t" WHERE (v > 3 AND sub <> 'x') ORDER BY "id" LIMIT 100"#
            ),
            "{first}"
        );
        // Bounded by bytes: the cut sums the sizes of the rows the filter passes only.
        let bounded = chunk_query(&t, Some(&after), None, 100, Some(4096));
        assert_eq!(bounded.matches(filtered).count(), 2, "{bounded}");
        let keys = keys_query(&t, &[after]);
        assert!(
            keys.ends_with(&format!(r#"{filtered} ("id") IN (('5'::bigint))"#)),
            "{keys}"
        );
        let pages = pages_query(&t, 3, 8);
        assert!(
            pages.ends_with(&format!(
                "{filtered} ctid >= '(3,0)'::tid AND ctid < '(8,0)'::tid"
            )),
            "{pages}"
        );
    }

    #[test]
    fn bounded_chunk_queries_cut_at_the_last_key_within_the_bytes() {
        let mut t = target(&[("id", "bigint")]);
        let mut relation = (*t.relation).clone();
        relation.columns[1].type_oid = 25; // text
        relation.columns[2].type_oid = 17; // bytea
        t.relation = Arc::new(relation);
        let after = vec!["5".to_owned()];
        let sql = chunk_query(&t, Some(&after), None, 100, Some(4096));
        let size = r#"(coalesce(pg_column_size("id"), 0) + coalesce(octet_length("sub"), 0) + coalesce(2 * octet_length("v"), 0) + 1)::int8"#;
        assert!(sql.starts_with("WITH pgferry_cut AS ("), "{sql}");
        assert!(sql.contains(&format!("sum({size}) OVER (ORDER BY \"id\" ROWS UNBOUNDED PRECEDING) - {size} AS pgferry_before")), "{sql}");
        assert!(
            sql.contains(
                r#"FROM ONLY "s"."t" WHERE ("id") > ('5'::bigint) ORDER BY "id" LIMIT 100) AS s"#
            ),
            "{sql}"
        );
        assert!(sql.contains("WHERE pgferry_before < 4096"), "{sql}");
        assert!(sql.ends_with(r#"WHERE ("id") > ('5'::bigint) AND ("id") <= (SELECT "id" FROM pgferry_cut) ORDER BY "id" LIMIT 100"#), "{sql}");
        // Unbounded: the plain query.
        assert!(!chunk_query(&t, Some(&after), None, 100, None).contains("pgferry_cut"));
    }

    #[test]
    fn key_signatures_change_with_what_orders_the_bounds() {
        let sig = |key: &[(&str, &str)]| target(key).key_signature();
        let planned = sig(&[("id", "integer")]);
        // The same order: a wider integer, numeric; text and varchar alike.
        assert_eq!(planned, sig(&[("id", "bigint")]));
        assert_eq!(planned, sig(&[("id", "numeric(20,0)")]));
        let collated = |ty: &str, order: &str| {
            let mut t = target(&[("sub", ty)]);
            t.key[0].order = Some(order.into());
            t.key_signature()
        };
        assert_eq!(
            collated("text", "C"),
            collated("character varying(40)", "C")
        );
        assert_ne!(collated("text", "C"), collated("text", "i:und:153.1:true"));
        // Another order: a type that sorts otherwise, another column as many, another order
        // of the same columns, more columns.
        assert_ne!(planned, sig(&[("id", "text")]));
        assert_ne!(planned, sig(&[("v", "integer")]));
        assert_ne!(
            sig(&[("id", "integer"), ("sub", "text")]),
            sig(&[("sub", "text"), ("id", "integer")])
        );
        assert_ne!(planned, sig(&[("id", "integer"), ("sub", "text")]));
        // A renamed key column is the same column.
        let mut renamed = target(&[("id", "integer")]);
        renamed.key[0].name = "ident".into();
        assert_eq!(planned, renamed.key_signature());
    }

    #[test]
    fn a_snapshots_running_transactions_in_stream_numbering() {
        assert_eq!(running_of("10:20:"), Some(vec![]));
        assert_eq!(running_of("10:20:12,15"), Some(vec![12, 15]));
        // An xid8 past the first epoch: the stream numbers it by its low 32 bits.
        assert_eq!(
            running_of("4294967300:4294967310:4294967301"),
            Some(vec![5])
        );
        assert_eq!(running_of("10:20"), None);
        assert_eq!(running_of("10:20:x"), None);
    }

    #[test]
    fn split_points_are_distinct_and_ordered() {
        let sample: Vec<Vec<String>> = [1, 1, 1, 2, 3, 4, 5, 6, 7, 8]
            .iter()
            .map(|n| vec![n.to_string()])
            .collect();
        let points = pick_split_points(&sample, 4);
        assert_eq!(
            points,
            vec![
                vec!["1".to_owned()],
                vec!["4".to_owned()],
                vec!["6".to_owned()]
            ]
        );
        assert_eq!(
            pick_split_points(&sample[..1], 4),
            vec![vec!["1".to_owned()]]
        );
        assert!(pick_split_points(&[], 4).is_empty());
        assert!(pick_split_points(&sample, 1).is_empty());
    }
}

//! `pgferry dead-letters list|replay|resolve`: what apply could not write, as each target's
//! `pgferry.dead_letters` records it, and the operator's ways out.
//!
//! - `list` shows unresolved letters (all with `--all`) per target.
//! - `replay` re-applies apply-stage letters from their stored record, each in its own target
//!   transaction, after the operator fixed the cause (dropped the constraint, created the
//!   table, …); a letter that fails again stays unresolved, with the new error printed. Replays
//!   run under their own replication origin (`pgferry_<node>_replay_<db>`), so in multi-master
//!   the local capture does not publish them again.
//! - `resolve` marks letters handled without applying them (the operator repaired the rows by
//!   hand, or re-copied the table). Capture-stage letters have no record to replay (capture
//!   could not publish it); their row is in the source at the letter's LSN.
//!
//! A table is *diverged* while it has unresolved letters: `/readyz`, `pgferry_table_diverged`
//! and `pgferry status` say so.

use std::fmt::Write as _;

use tokio_postgres::Client;

use super::error::ApplyError;
use super::worker::{self, WorkerSettings};
use crate::config::{Config, TargetConfig};
use crate::error::ErrorChain;

/// One stored dead letter.
#[derive(Debug, Clone)]
pub struct StoredDeadLetter {
    /// Row id in `pgferry.dead_letters`.
    pub id: i64,
    /// Node whose change it is.
    pub node: String,
    /// `capture` or `apply`.
    pub stage: String,
    /// `schema.table`, when known.
    pub table: Option<String>,
    /// Node-stream topic of the record.
    pub topic: String,
    /// Its offset there.
    pub offset: i64,
    /// The item's place in that record (a bundle of items, one per line), 0 for the first.
    pub item: i32,
    /// A snapshot row's place in its `rows` item, 1 for the first; 0 for other items.
    pub item_row: i32,
    /// WAL position (capture-stage letters).
    pub lsn: Option<String>,
    /// Why it was dead-lettered.
    pub error: String,
    /// The node-stream record (apply-stage letters).
    pub payload: Option<String>,
    /// When it was recorded.
    pub created_at: String,
    /// How it was resolved, if it was.
    pub resolution: Option<String>,
}

/// Which letters a command acts on.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// These ids only (empty: no id filter).
    pub ids: Vec<i64>,
    /// This table only.
    pub table: Option<String>,
    /// Resolved letters too (`list --all`).
    pub include_resolved: bool,
}

/// Reads the selected letters of one target, oldest first.
pub async fn read(
    client: &Client,
    selection: &Selection,
) -> Result<Vec<StoredDeadLetter>, tokio_postgres::Error> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('pgferry.dead_letters') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            &format!(
                "{COLUMNS} WHERE ($1 OR resolved_at IS NULL)
                   AND (cardinality($2::int8[]) = 0 OR id = ANY($2))
                   AND ($3::text IS NULL OR table_name = $3)
                 ORDER BY id"
            ),
            &[
                &selection.include_resolved,
                &selection.ids,
                &selection.table,
            ],
        )
        .await?;
    Ok(rows.iter().map(letter).collect())
}

/// What [`read`] and [`parked`] select. `item` and `item_row` through to_jsonb: a target
/// whose table predates the columns (no apply worker of this version has started there yet)
/// reads as 0.
const COLUMNS: &str = "SELECT id, source_node, stage, table_name, topic, kafka_offset, lsn, error,
        payload, created_at::text, resolution, coalesce((to_jsonb(d) ->> 'item')::int, 0),
        coalesce((to_jsonb(d) ->> 'item_row')::int, 0)
   FROM pgferry.dead_letters AS d";

fn letter(r: &tokio_postgres::Row) -> StoredDeadLetter {
    StoredDeadLetter {
        id: r.get(0),
        node: r.get(1),
        stage: r.get(2),
        table: r.get(3),
        topic: r.get(4),
        offset: r.get(5),
        lsn: r.get(6),
        error: r.get(7),
        payload: r.get(8),
        created_at: r.get(9),
        resolution: r.get(10),
        item: r.get(11),
        item_row: r.get(12),
    }
}

/// The reason of a change dead-lettered because its table is parked (see [`PARKING`]).
pub const PARKED: &str =
    "parked behind an earlier change of its table that the target refused (a schema change, \
     a missing table or column, or access refused; see the table's first letter)";

/// How the reason of a change naming a column the target table lacks begins (DDL capture
/// off, or a column dropped there by hand): it parks its table like a refused schema change.
pub const MISSING_COLUMN: &str = "column missing on the target: ";

/// How the reason of a change of a table the target lacks begins: it parks the table, so
/// that its changes apply in order once the table is there (made by hand, or by a refused
/// schema change that creates or moves it once the cause is fixed).
pub const MISSING_TABLE: &str = "table missing on the target: ";

/// How the reason of a change the target refused the apply role (SQLSTATE 42501: no privilege
/// on the table, or row-level security it does not bypass) begins: it parks its table, whose
/// changes all fail alike until the role is granted what it needs, while the other tables go
/// on.
pub const ACCESS_REFUSED: &str = "access to the table refused on the target: ";

/// How the reason of a `TRUNCATE` the target refused begins (a foreign key of the target's
/// own references the table, say): it parks its table, since every later change of the table
/// was made after it (applied past it, a replay of the truncate would remove them).
pub const TRUNCATE_REFUSED: &str = "truncate refused on the target: ";

/// How the reasons of letters that park their table begin: a schema change the target
/// refused, a change naming a column or a table the target lacks ([`MISSING_COLUMN`],
/// [`MISSING_TABLE`]), a change the apply role may not make ([`ACCESS_REFUSED`]), a refused
/// `TRUNCATE` ([`TRUNCATE_REFUSED`]), and every change of the table after any of them ([`PARKED`]). While a
/// table has an unresolved apply-stage one, each later change of it is parked too, so that
/// nothing of the table applies out of order; the apply worker tries the letters again now
/// and then, and once they all apply, the table resumes (apply's `Worker::unpark_due`).
const PARKING: [&str; 6] = [
    "schema change of ",
    "parked behind ",
    MISSING_COLUMN,
    MISSING_TABLE,
    ACCESS_REFUSED,
    TRUNCATE_REFUSED,
];

/// Whether a letter parks its table (see [`PARKING`]).
pub fn parks(letter: &StoredDeadLetter) -> bool {
    letter.stage == "apply"
        && letter.resolution.is_none()
        && PARKING.iter().any(|p| letter.error.starts_with(p))
}

/// [`parks`] in SQL, for the letters of node `$1`.
fn parked_letters() -> String {
    let reasons: Vec<String> = PARKING
        .iter()
        .map(|p| format!("error LIKE '{p}%'"))
        .collect();
    format!(
        "source_node = $1 AND stage = 'apply' AND resolved_at IS NULL AND ({})",
        reasons.join(" OR ")
    )
}

/// Tables with letters that park them (see [`PARKED`]).
pub async fn parked_tables(
    client: &Client,
    node: &str,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "SELECT DISTINCT table_name FROM pgferry.dead_letters
                  WHERE {} AND table_name IS NOT NULL",
                parked_letters()
            ),
            &[&node],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The unresolved letters of node `$1` that park their table ([`parks`]): (id, table).
pub async fn parking(
    client: &Client,
    node: &str,
) -> Result<Vec<(i64, String)>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "SELECT id, table_name FROM pgferry.dead_letters
                  WHERE {} AND table_name IS NOT NULL",
                parked_letters()
            ),
            &[&node],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The letters that park `table`, oldest first, locked until the transaction ends (a
/// `pgferry dead-letters replay` of the same letters waits, then finds them resolved).
pub async fn parked(
    client: &Client,
    node: &str,
    table: &str,
) -> Result<Vec<StoredDeadLetter>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "{COLUMNS} WHERE {} AND table_name = $2 ORDER BY id FOR UPDATE",
                parked_letters()
            ),
            &[&node, &table],
        )
        .await?;
    Ok(rows.iter().map(letter).collect())
}

async fn connect(target: &TargetConfig) -> Result<Client, ApplyError> {
    crate::pg::connect(&target.url, "pgferry-dead-letters")
        .await
        .map_err(ApplyError::sql("connecting to the target"))
}

fn targets(config: &Config) -> &[TargetConfig] {
    config.apply.as_ref().map_or(&[], |a| &a.targets)
}

/// `list`: the selected letters of every target, as text.
pub async fn list(config: &Config, selection: &Selection) -> Result<String, ApplyError> {
    let mut out = String::new();
    for target in targets(config) {
        let client = connect(target).await?;
        let letters = read(&client, selection)
            .await
            .map_err(ApplyError::sql("reading pgferry.dead_letters"))?;
        let _ = writeln!(
            out,
            "target {}: {} dead letter(s)",
            target.url.display_target(),
            letters.len()
        );
        for l in letters {
            let position = match &l.lsn {
                Some(lsn) => format!("lsn {lsn}"),
                None if l.item_row > 0 => format!(
                    "{}@{} item {} row {}",
                    l.topic, l.offset, l.item, l.item_row
                ),
                None => format!("{}@{} item {}", l.topic, l.offset, l.item),
            };
            let _ = writeln!(
                out,
                "  #{} {} from {} ({} stage) {} at {}: {}{}",
                l.id,
                l.table.as_deref().unwrap_or("(unknown table)"),
                l.node,
                l.stage,
                position,
                l.created_at,
                l.error,
                l.resolution
                    .map(|r| format!(" [resolved: {r}]"))
                    .unwrap_or_default(),
            );
        }
    }
    Ok(out)
}

/// Marks letters `$1` (ids) resolved with the note `$2`, those not resolved yet.
pub const RESOLVE: &str = "UPDATE pgferry.dead_letters SET resolved_at = now(), resolution = $2
     WHERE id = ANY($1) AND resolved_at IS NULL";

/// `resolve`: marks the selected unresolved letters handled with `note`; returns how many.
pub async fn resolve(
    config: &Config,
    selection: &Selection,
    note: &str,
) -> Result<u64, ApplyError> {
    let mut resolved = 0;
    for target in targets(config) {
        let client = connect(target).await?;
        let ids: Vec<i64> = read(&client, selection)
            .await
            .map_err(ApplyError::sql("reading pgferry.dead_letters"))?
            .iter()
            .map(|l| l.id)
            .collect();
        resolved += client
            .execute(RESOLVE, &[&ids, &note])
            .await
            .map_err(ApplyError::sql("resolving dead letters"))?;
    }
    Ok(resolved)
}

/// `replay`: re-applies the selected apply-stage letters; returns one line per letter, and
/// how many could not be replayed.
pub async fn replay(config: &Config, selection: &Selection) -> Result<(String, usize), ApplyError> {
    let Some(apply) = &config.apply else {
        return Ok(("no apply section: nothing to replay\n".to_owned(), 0));
    };
    let mut out = String::new();
    let mut failed = 0;
    for target in &apply.targets {
        let client = connect(target).await?;
        let letters = read(&client, selection)
            .await
            .map_err(ApplyError::sql("reading pgferry.dead_letters"))?;
        drop(client);
        let mut by_node: Vec<(String, Vec<StoredDeadLetter>)> = Vec::new();
        for letter in letters {
            match by_node.iter_mut().find(|(n, _)| *n == letter.node) {
                Some((_, v)) => v.push(letter),
                None => by_node.push((letter.node.clone(), vec![letter])),
            }
        }
        for (node, letters) in by_node {
            let settings = WorkerSettings {
                node,
                local_node: config.node_id.clone(),
                target: target.clone(),
                apply: apply.clone(),
                kafka: config.kafka.clone(),
                contention: Default::default(),
            };
            for (id, outcome) in worker::replay(settings, &letters).await? {
                let _ = match outcome {
                    Ok(true) => writeln!(out, "#{id}: replayed"),
                    Ok(false) => writeln!(out, "#{id}: resolved meanwhile (nothing to do)"),
                    Err(e) => {
                        failed += 1;
                        writeln!(out, "#{id}: not replayed: {}", ErrorChain(&e))
                    }
                };
            }
        }
    }
    if out.is_empty() {
        out.push_str("no unresolved dead letters selected\n");
    }
    Ok((out, failed))
}

//! Set-based last-writer-wins: the changes of a target transaction are gathered into a
//! [`Batch`] (each key once, see [`crate::apply::plan`]) and decided and written together,
//! a few statements for many changes:
//!
//! 1. one probe per table ([`sql::probe_rows`]) locks every live row of the batch's keys and
//!    reads each key's row and version;
//! 2. [`decide`] (pure) settles each change exactly as the one-change path does;
//! 3. one guarded statement per table writes the winners ([`sql::stamp_and_upsert_rows`],
//!    [`sql::stamp_and_delete_rows`]): it stamps each version only where it is still greater
//!    than the stored one and writes exactly those rows, and returns which.
//!
//! A change whose stamp lost (a local writer stamped its key between probe and write) is
//! decided again with the next round, as the one-change path does. Conflicts are logged once
//! a change's outcome is final. Changes the batch does not take (resolver tables, tables
//! with secondary unique indexes, changes without a version) go the one-change way, after the
//! batch is written, so every key's changes keep the stream's order.

use std::sync::Arc;

use serde_json::value::RawValue;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Statement};

use super::lww::{typed, Probed};
use super::{InFlight, StatementKey, Worker, ROWS_PER_STATEMENT};
use crate::apply::conflict::{decide, Action, ConflictType, Resolution, Version};
use crate::apply::error::ApplyError;
use crate::apply::plan::{self, StatementKind};
use crate::apply::sql;
use crate::apply::stream::{object_text, ChangeItem, RowImage};
use crate::apply::target::TargetTable;
use crate::event::Op;
use crate::lsn::Lsn;

/// How often a change is decided again when local writers keep stamping its key.
const MAX_ROUNDS: usize = 10;

/// Changes probed by one statement: a table, and which old-image columns they compare.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct ProbeGroup {
    schema: String,
    table: String,
    /// Old-image columns compared with the live row (empty: none, as for inserts).
    before: Vec<String>,
}

/// One change in the batch, its values rendered for the target.
#[derive(Debug)]
pub(super) struct LwwRow {
    change: Box<ChangeItem>,
    remote: Version,
    /// Key values as JSON (for the conflict log), in the table's key order.
    key_json: Vec<Box<RawValue>>,
    /// Key values as text, in the table's key order.
    key: Vec<Option<String>>,
    /// Old-image values, in the group's `before` order.
    before: Vec<Option<String>>,
    /// The full new row (columns, values); empty for deletes.
    after_columns: Vec<String>,
    after: Vec<Option<String>>,
    /// The target columns the new row does not carry, written as their DEFAULT
    /// ([`sql::WholeRow`]); empty for deletes.
    defaults: Vec<String>,
    /// Commit LSN of its source transaction: where a delete sits in the stream.
    commit_lsn: Lsn,
    /// The lane (connection) that writes its key: always the same one for a key.
    lane: usize,
}

/// The column set of a batch statement's rows: the columns they write, and those they set
/// to their DEFAULT.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Columns {
    written: Vec<String>,
    defaults: Vec<String>,
}

impl LwwRow {
    fn columns(&self) -> Columns {
        Columns {
            written: self.after_columns.clone(),
            defaults: self.defaults.clone(),
        }
    }

    /// Whether the row has the column set `c` (compared without copying it).
    fn has_columns(&self, c: &Columns) -> bool {
        self.after_columns == c.written && self.defaults == c.defaults
    }
}

/// A change decided to be written, with what the probe found and the conflict to log if
/// its write holds.
struct Decided {
    row: LwwRow,
    found: Probed,
    conflict: Option<(ConflictType, Resolution)>,
}

impl Worker {
    /// Takes a versioned change of a table without resolver or secondary unique indexes into
    /// the batch. `Ok(Err(reason))`: a value cannot be rendered for its column.
    pub(super) async fn batch_lww<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
        table: &TargetTable,
        change: Box<ChangeItem>,
        key_json: Vec<Box<RawValue>>,
        remote: Version,
    ) -> Result<Result<(), String>, ApplyError> {
        let qualified = format!("{}.{}", change.schema, change.table);
        let types = self.column_types(client, &qualified, table).await?;
        let render = |columns: &[String], values: &[Box<RawValue>], nulls: &[String]| {
            let tys: Vec<Type> = columns
                .iter()
                .map(|c| {
                    table
                        .columns
                        .iter()
                        .position(|t| t == c)
                        .map_or(Type::TEXT, |i| types[i].clone())
                })
                .collect();
            Self::render_params(&tys, columns, values, nulls, &qualified)
                .map(|params| params.into_iter().map(|p| p.0).collect::<Vec<_>>())
        };
        let key = match render(&table.key, &key_json, &[]) {
            Ok(key) => key,
            Err(reason) => return Ok(Err(reason)),
        };
        // Compare the whole old image when the change carries one (REPLICA IDENTITY FULL);
        // a key-only image says nothing about concurrency.
        let before_columns: Vec<String> = match &change.before {
            Some(b) if b.keys().any(|c| !table.key.contains(c)) => b
                .keys()
                .filter(|c| table.columns.contains(c))
                .cloned()
                .collect(),
            _ => Vec::new(),
        };
        let before_values: Vec<Box<RawValue>> = before_columns
            .iter()
            .map(|c| {
                change
                    .before
                    .as_ref()
                    .and_then(|b| b.get(c))
                    .unwrap_or(RawValue::NULL)
                    .to_owned()
            })
            .collect();
        let before = match render(&before_columns, &before_values, &change.json_null_before) {
            Ok(before) => before,
            Err(reason) => return Ok(Err(reason)),
        };
        let (mut after_columns, mut after) = if change.op == Op::Delete {
            (Vec::new(), Vec::new())
        } else {
            let (columns, values) = full_after(&change, table, &key_json);
            // Columns taken from the old image keep its JSON-null marks.
            let mut nulls = change.json_null_after.clone();
            nulls.extend(
                change
                    .json_null_before
                    .iter()
                    .filter(|c| change.after.as_ref().is_none_or(|a| a.get(c).is_none()))
                    .cloned(),
            );
            match render(&columns, &values, &nulls) {
                Ok(after) => (columns, after),
                Err(reason) => return Ok(Err(reason)),
            }
        };
        let defaults = if change.op == Op::Delete {
            Vec::new()
        } else {
            let not = not_carried(table, &after_columns, &change.unchanged_toast);
            for (column, value) in not.added {
                after_columns.push(column);
                after.push(value);
            }
            not.defaults
        };
        let row_key = plan::row_key(&qualified, key.iter().map(Option::as_deref));
        // After a schema change in the open target transaction, only the worker's own
        // connection may write the table (it holds its lock).
        let lane = if self.ddl_open {
            0
        } else {
            plan::lane_of(&row_key, self.lanes.len() + 1)
        };
        let group = ProbeGroup {
            schema: change.schema.clone(),
            table: change.table.clone(),
            before: before_columns,
        };
        let row = LwwRow {
            change,
            remote,
            key_json,
            key,
            before,
            after_columns,
            after,
            defaults,
            commit_lsn: self.open_commit_lsn(),
            lane,
        };
        self.lww_rows.push(group, row_key, row);
        if self.lww_rows.len() >= ROWS_PER_STATEMENT {
            self.send_lww_rows(client, pending).await?;
        }
        Ok(Ok(()))
    }

    /// Decides and writes every change in the batch, wave by wave.
    pub(super) async fn send_lww_rows<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
    ) -> Result<(), ApplyError> {
        if self.lww_rows.is_empty() {
            return Ok(());
        }
        pending
            .drain()
            .await
            .map_err(ApplyError::sql("applying changes"))?;
        self.take_turn(client).await?;
        self.lww_rows_sent += self.lww_rows.len();
        // A wave's keys are settled (written, or decided and logged) before the next
        // wave's changes of the same keys are looked at.
        for wave in self.lww_rows.take() {
            for (group, rows) in wave {
                let qualified = format!("{}.{}", group.schema, group.table);
                let names = (group.schema.as_str(), group.table.as_str());
                let Some(table) = self.table(client, &qualified, names, false).await? else {
                    return Err(ApplyError::UnexpectedAnswer(format!(
                        "table {qualified} disappeared from the target during a transaction"
                    )));
                };
                let mut remaining = if group.before.is_empty() {
                    rows
                } else {
                    self.clean_updates(client, &qualified, &group, &table, rows)
                        .await?
                };
                for _ in 0..MAX_ROUNDS {
                    if remaining.is_empty() {
                        break;
                    }
                    remaining = self
                        .settle_round(client, pending, &qualified, &group, &table, remaining)
                        .await?;
                }
                if !remaining.is_empty() {
                    return Err(ApplyError::Contention { table: qualified });
                }
            }
        }
        Ok(())
    }

    /// Writes the updates among `rows` (one table, distinct keys, old images compared) that
    /// find their live row as the old image says and older than their version, one statement
    /// per lane ([`sql::clean_update_rows`]): the common case of a catch-up, settled without a
    /// probe. Returns every other change, untouched, for [`Worker::settle_round`].
    async fn clean_updates(
        &mut self,
        client: &Client,
        qualified: &str,
        group: &ProbeGroup,
        table: &TargetTable,
        rows: Vec<LwwRow>,
    ) -> Result<Vec<LwwRow>, ApplyError> {
        let lanes = self.lanes.clone();
        let lane_client = |lane: usize| lane_connection(client, &lanes, lane);
        let mut rest = Vec::new();
        // One statement per lane and column set (one column set per table, normally).
        let mut batches: Vec<(usize, Columns, Vec<LwwRow>)> = Vec::new();
        for row in rows {
            let clean = row.change.op == Op::Update
                && row.after_columns.iter().any(|c| !table.key.contains(c));
            if !clean {
                rest.push(row);
                continue;
            }
            match batches
                .iter_mut()
                .find(|(lane, c, _)| *lane == row.lane && row.has_columns(c))
            {
                Some((_, _, batch)) => batch.push(row),
                None => batches.push((row.lane, row.columns(), vec![row])),
            }
        }
        let mut runs = Vec::new();
        for (lane, columns, batch) in &batches {
            self.open_lane(*lane, lane_client(*lane)).await?;
            let stmt = self
                .clean_update_statement(*lane, lane_client(*lane), group, table, columns)
                .await?;
            runs.push(clean_update_exec(
                lane_client(*lane),
                stmt,
                qualified,
                batch,
            ));
        }
        let won = futures_util::future::try_join_all(runs).await?;
        for ((_, _, batch), won) in batches.into_iter().zip(won) {
            for (row, won) in batch.into_iter().zip(won) {
                if won {
                    self.applied(qualified, &row);
                } else {
                    rest.push(row);
                }
            }
        }
        Ok(rest)
    }

    /// Counts a change whose row and version are written.
    fn applied(&mut self, qualified: &str, row: &LwwRow) {
        self.note_newest_version(&row.remote);
        self.batch_changes += 1;
        self.count_applied(qualified, row.change.op, 1);
    }

    /// Probes, decides and writes `rows` (one table, distinct keys); returns the changes
    /// whose stamp lost to a version stamped since the probe. Each lane's rows go to its own
    /// connection, all lanes at once.
    async fn settle_round<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
        qualified: &str,
        group: &ProbeGroup,
        table: &TargetTable,
        rows: Vec<LwwRow>,
    ) -> Result<Vec<LwwRow>, ApplyError> {
        let lanes = self.lanes.clone();
        let lane_client = |lane: usize| lane_connection(client, &lanes, lane);
        let mut parts: Vec<Vec<LwwRow>> = (0..=lanes.len()).map(|_| Vec::new()).collect();
        for row in rows {
            parts[row.lane].push(row);
        }
        let mut probes = Vec::new();
        for (lane, part) in parts.iter().enumerate().filter(|(_, p)| !p.is_empty()) {
            self.open_lane(lane, lane_client(lane)).await?;
            let stmt = self
                .probe_statement(lane, lane_client(lane), group, table)
                .await?;
            probes.push(probe_exec(lane_client(lane), stmt, qualified, part));
        }
        let found = futures_util::future::try_join_all(probes).await?;
        let mut writes: Vec<(usize, Decided)> = Vec::new();
        let mut deletes: Vec<(usize, Decided)> = Vec::new();
        let probed = parts.into_iter().filter(|p| !p.is_empty()).zip(found);
        for (row, found) in probed.flat_map(|(rows, found)| rows.into_iter().zip(found)) {
            let decision = decide(row.change.op, &row.remote, &found.local, false);
            let lane = row.lane;
            match decision.action {
                Action::Write | Action::Delete => {
                    let to = if decision.action == Action::Write {
                        &mut writes
                    } else {
                        &mut deletes
                    };
                    to.push((
                        lane,
                        Decided {
                            row,
                            found,
                            conflict: decision.conflict,
                        },
                    ));
                }
                Action::Skip | Action::Merge => {
                    // Merge needs a resolver, and resolver tables are not batched.
                    self.settled(
                        client,
                        pending,
                        qualified,
                        table,
                        &row,
                        &found,
                        decision.conflict,
                    );
                    self.note_newest_version(&row.remote);
                }
            }
        }
        // One statement per lane and column set (one column set per table, normally).
        let mut batches: Vec<(usize, bool, Columns, Vec<Decided>)> = Vec::new();
        for (deleting, list) in [(false, writes), (true, deletes)] {
            for (lane, d) in list {
                match batches
                    .iter_mut()
                    .find(|(l, del, c, _)| *l == lane && *del == deleting && d.row.has_columns(c))
                {
                    Some((_, _, _, ds)) => ds.push(d),
                    None => batches.push((lane, deleting, d.row.columns(), vec![d])),
                }
            }
        }
        let stream_node = self.settings.node.clone();
        let mut stamps = Vec::new();
        for (lane, deleting, columns, ds) in &batches {
            let stmt = self
                .stamp_statement(*lane, lane_client(*lane), group, table, columns, *deleting)
                .await?;
            stamps.push(stamp_exec(
                lane_client(*lane),
                stmt,
                qualified,
                ds,
                *deleting,
                &stream_node,
            ));
        }
        let won = futures_util::future::try_join_all(stamps).await?;
        let mut lost = Vec::new();
        for ((_, _, _, ds), won) in batches.into_iter().zip(won) {
            self.finish(client, pending, qualified, table, ds, &won, &mut lost);
        }
        Ok(lost)
    }

    /// Opens the target transaction of a lane (lane 0, the worker's own connection, is
    /// opened by the batch itself).
    async fn open_lane(&mut self, lane: usize, client: &Client) -> Result<(), ApplyError> {
        if lane == 0 || self.lane_open[lane - 1] {
            return Ok(());
        }
        client
            .batch_execute("BEGIN")
            .await
            .map_err(ApplyError::sql("beginning a lane's transaction"))?;
        self.lane_open[lane - 1] = true;
        Ok(())
    }

    /// A statement prepared on a lane's connection.
    async fn lane_statement(
        &mut self,
        lane: usize,
        client: &Client,
        key: StatementKey,
        text: impl FnOnce() -> String,
    ) -> Result<Statement, ApplyError> {
        if lane == 0 {
            return self.statement(client, key, text).await;
        }
        if let Some(s) = self.lane_statements[lane - 1].get(&key) {
            return Ok(s.clone());
        }
        let stmt = client
            .prepare(&text())
            .await
            .map_err(ApplyError::sql("preparing an apply statement"))?;
        self.lane_statements[lane - 1].insert(key, stmt.clone());
        Ok(stmt)
    }

    /// Settles the written changes: `won[i]` says whether change `i` stamped its version.
    #[allow(clippy::too_many_arguments)]
    fn finish<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
        qualified: &str,
        table: &TargetTable,
        rows: Vec<Decided>,
        won: &[bool],
        lost: &mut Vec<LwwRow>,
    ) {
        for (
            Decided {
                row,
                found,
                conflict,
            },
            won,
        ) in rows.into_iter().zip(won)
        {
            if *won {
                self.settled(client, pending, qualified, table, &row, &found, conflict);
                self.applied(qualified, &row);
            } else {
                lost.push(row);
            }
        }
    }

    /// Logs a settled change's conflict, if it had one (sent with the batch, not waited for).
    #[allow(clippy::too_many_arguments)]
    fn settled<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
        qualified: &str,
        table: &TargetTable,
        row: &LwwRow,
        found: &Probed,
        conflict: Option<(ConflictType, Resolution)>,
    ) {
        let Some((kind, resolution)) = conflict else {
            return;
        };
        let key = object_text(
            table
                .key
                .iter()
                .map(String::as_str)
                .zip(row.key_json.iter().map(|v| v.get())),
        );
        let remote_row = match row.change.op {
            Op::Delete => row.change.before.as_ref(),
            _ => row.change.after.as_ref(),
        }
        .map(RowImage::to_json_text);
        self.log_conflict_sent(
            client,
            pending,
            ConflictRecord {
                table: qualified.to_owned(),
                key,
                kind,
                resolution,
                local: found.version.clone(),
                local_row: found.row.clone(),
                remote: row.remote.clone(),
                remote_row,
            },
        );
    }

    /// The batch probe of `group`, prepared on a lane's connection.
    async fn probe_statement(
        &mut self,
        lane: usize,
        client: &Client,
        group: &ProbeGroup,
        table: &TargetTable,
    ) -> Result<Statement, ApplyError> {
        let key = typed(table, &table.key);
        let before = typed(table, &group.before);
        let text = || sql::probe_rows(&group.schema, &group.table, &key, &before);
        let statement_key = StatementKey::new(
            group.schema.as_str(),
            group.table.as_str(),
            StatementKind::LwwProbeRows,
            group.before.clone(),
        );
        self.lane_statement(lane, client, statement_key, text).await
    }

    /// The statement that stamps and writes rows of `group`: upserts of `columns`, or with
    /// `deleting` tombstones and deletes; prepared on a lane's connection.
    async fn stamp_statement(
        &mut self,
        lane: usize,
        client: &Client,
        group: &ProbeGroup,
        table: &TargetTable,
        columns: &Columns,
        deleting: bool,
    ) -> Result<Statement, ApplyError> {
        let (kind, text) = if deleting {
            let key = typed(table, &table.key);
            let text = sql::stamp_and_delete_rows(&group.schema, &group.table, &key);
            (StatementKind::LwwDeleteRows, text)
        } else {
            let key: Vec<&str> = table.key.iter().map(String::as_str).collect();
            let typed_columns = typed(table, &columns.written);
            let whole = sql::WholeRow {
                defaults: &columns.defaults,
                shape: &table.shape,
            };
            let text = sql::stamp_and_upsert_rows(
                &group.schema,
                &group.table,
                &typed_columns,
                &key,
                whole,
            );
            (StatementKind::LwwWriteRows, text)
        };
        let statement_key = StatementKey {
            defaults: columns.defaults.clone(),
            ..StatementKey::new(
                group.schema.as_str(),
                group.table.as_str(),
                kind,
                columns.written.clone(),
            )
        };
        self.lane_statement(lane, client, statement_key, || text)
            .await
    }

    /// The statement of [`Worker::clean_updates`] for rows of `group` that write `columns`,
    /// prepared on a lane's connection.
    async fn clean_update_statement(
        &mut self,
        lane: usize,
        client: &Client,
        group: &ProbeGroup,
        table: &TargetTable,
        columns: &Columns,
    ) -> Result<Statement, ApplyError> {
        let key: Vec<&str> = table.key.iter().map(String::as_str).collect();
        let typed_columns = typed(table, &columns.written);
        let before = typed(table, &group.before);
        let whole = sql::WholeRow {
            defaults: &columns.defaults,
            shape: &table.shape,
        };
        let text = sql::clean_update_rows(
            &group.schema,
            &group.table,
            &typed_columns,
            &key,
            &before,
            whole,
        );
        let statement_key = StatementKey {
            compared: group.before.clone(),
            defaults: columns.defaults.clone(),
            ..StatementKey::new(
                group.schema.as_str(),
                group.table.as_str(),
                StatementKind::LwwCleanUpdateRows,
                columns.written.clone(),
            )
        };
        self.lane_statement(lane, client, statement_key, || text)
            .await
    }

    /// The tokio-postgres types of a target table's columns (in its column order), looked
    /// up once per table: values are rendered by them.
    async fn column_types(
        &mut self,
        client: &Client,
        qualified: &str,
        table: &TargetTable,
    ) -> Result<Vec<Type>, ApplyError> {
        if let Some(types) = self.column_types.get(qualified) {
            if types.len() == table.columns.len() {
                return Ok(types.clone());
            }
        }
        let select: Vec<String> = table.types.iter().map(|t| format!("NULL::{t}")).collect();
        let stmt = client
            .prepare(&format!("SELECT {}", select.join(", ")))
            .await
            .map_err(ApplyError::sql("reading the target's column types"))?;
        let types: Vec<Type> = stmt.columns().iter().map(|c| c.type_().clone()).collect();
        self.column_types
            .insert(qualified.to_owned(), types.clone());
        Ok(types)
    }

    /// Keeps the greatest version clock applied in the open target transaction.
    pub(super) fn note_newest_version(&mut self, remote: &Version) {
        if let Some(lww) = &mut self.lww {
            let newest = lww.newest_us.get_or_insert(remote.ts_us);
            *newest = (*newest).max(remote.ts_us);
        }
    }
}

/// The connection of `lane`: the worker's own (`client`) for lane 0, else an extra lane's.
fn lane_connection<'a>(client: &'a Client, lanes: &'a [Arc<Client>], lane: usize) -> &'a Client {
    match lane {
        0 => client,
        n => &lanes[n - 1],
    }
}

/// Runs the batch probe for `rows`: what this node holds for each key, in order.
async fn probe_exec(
    client: &Client,
    stmt: Statement,
    qualified: &str,
    rows: &[LwwRow],
) -> Result<Vec<Probed>, ApplyError> {
    let width = rows.first().map_or(0, |r| r.key.len() + r.before.len());
    let arrays = column_arrays(rows.iter().map(|r| r.key.iter().chain(&r.before)), width);
    let mut params: Vec<&(dyn ToSql + Sync)> =
        arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
    params.push(&qualified);
    let result = client
        .query(&stmt, &params)
        .await
        .map_err(ApplyError::sql("reading the local rows and versions"))?;
    if result.len() != rows.len() {
        return Err(ApplyError::UnexpectedAnswer(format!(
            "the batch probe of {qualified} returned {} rows for {} keys",
            result.len(),
            rows.len()
        )));
    }
    Ok(result
        .iter()
        .map(|r| Probed::from_parts(r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect())
}

/// Stamps the versions of `rows` and writes them with `stmt` (see
/// [`Worker::stamp_statement`]); which of them won. `stream_node`: whose stream the deletes
/// sit in.
async fn stamp_exec(
    client: &Client,
    stmt: Statement,
    qualified: &str,
    rows: &[Decided],
    deleting: bool,
    stream_node: &str,
) -> Result<Vec<bool>, ApplyError> {
    let width = rows.first().map_or(0, |d| {
        if deleting {
            d.row.key.len()
        } else {
            d.row.after.len()
        }
    });
    let arrays = column_arrays(
        rows.iter()
            .map(|d| if deleting { &d.row.key } else { &d.row.after }.iter()),
        width,
    );
    let ts: Vec<i64> = rows.iter().map(|d| d.row.remote.ts_us).collect();
    let nodes: Vec<&str> = rows.iter().map(|d| d.row.remote.node.as_str()).collect();
    let lsns: Vec<String> = if deleting {
        rows.iter().map(|d| d.row.commit_lsn.to_string()).collect()
    } else {
        Vec::new()
    };
    let mut params: Vec<&(dyn ToSql + Sync)> =
        arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
    params.push(&ts);
    params.push(&nodes);
    if deleting {
        params.push(&lsns);
    }
    params.push(&qualified);
    if deleting {
        params.push(&stream_node);
    }
    written(
        client,
        &stmt,
        &params,
        rows.len(),
        "writing rows and their versions",
    )
    .await
}

/// Runs the clean update of `rows` (see [`Worker::clean_update_statement`]); which of them
/// were written.
async fn clean_update_exec(
    client: &Client,
    stmt: Statement,
    qualified: &str,
    rows: &[LwwRow],
) -> Result<Vec<bool>, ApplyError> {
    let width = rows.first().map_or(0, |r| r.after.len() + r.before.len());
    let arrays = column_arrays(rows.iter().map(|r| r.after.iter().chain(&r.before)), width);
    let ts: Vec<i64> = rows.iter().map(|r| r.remote.ts_us).collect();
    let nodes: Vec<&str> = rows.iter().map(|r| r.remote.node.as_str()).collect();
    let mut params: Vec<&(dyn ToSql + Sync)> =
        arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
    params.push(&ts);
    params.push(&nodes);
    params.push(&qualified);
    written(
        client,
        &stmt,
        &params,
        rows.len(),
        "updating rows and their versions",
    )
    .await
}

/// Runs a batch statement over `n` rows that returns the ordinals of the rows it wrote;
/// which of them it wrote.
async fn written(
    client: &Client,
    stmt: &Statement,
    params: &[&(dyn ToSql + Sync)],
    n: usize,
    doing: &'static str,
) -> Result<Vec<bool>, ApplyError> {
    let rows = client
        .query(stmt, params)
        .await
        .map_err(ApplyError::sql(doing))?;
    Ok(won_flags(n, rows.iter().map(|r| r.get::<_, i64>(0))))
}

/// One array per column (`width` of them) of the rows' text values, for `unnest`.
fn column_arrays<'r, I>(
    rows: impl ExactSizeIterator<Item = I>,
    width: usize,
) -> Vec<Vec<Option<&'r str>>>
where
    I: Iterator<Item = &'r Option<String>>,
{
    let mut arrays: Vec<Vec<Option<&str>>> = vec![Vec::with_capacity(rows.len()); width];
    for values in rows {
        for (a, v) in arrays.iter_mut().zip(values) {
            a.push(v.as_deref());
        }
    }
    arrays
}

/// Which of `n` rows won, from the 1-based ordinals a batch statement returned.
fn won_flags(n: usize, ordinals: impl Iterator<Item = i64>) -> Vec<bool> {
    let mut won = vec![false; n];
    for ord in ordinals {
        if let Some(flag) = usize::try_from(ord - 1).ok().and_then(|i| won.get_mut(i)) {
            *flag = true;
        }
    }
    won
}

/// The full new row of an insert or update: the after image, plus every column it omits
/// (unchanged TOAST values, which equal the old ones) from the old image, plus the key. An
/// update that re-creates a missing row then writes the whole row, not NULLs.
pub(super) fn full_after(
    change: &ChangeItem,
    table: &TargetTable,
    key_values: &[Box<RawValue>],
) -> (Vec<String>, Vec<Box<RawValue>>) {
    let (mut columns, mut values): (Vec<String>, Vec<Box<RawValue>>) =
        change.after.clone().unwrap_or_default().into_iter().unzip();
    if let Some(before) = &change.before {
        for (c, v) in before.clone() {
            if !columns.contains(&c) && table.columns.contains(&c) {
                columns.push(c);
                values.push(v);
            }
        }
    }
    for (k, v) in table.key.iter().zip(key_values) {
        if !columns.contains(k) {
            columns.push(k.clone());
            values.push(v.clone());
        }
    }
    (columns, values)
}

/// The target columns a remote row does not carry, by what is written into them
/// ([`not_carried`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct NotCarried {
    /// Columns written as their DEFAULT.
    pub(super) defaults: Vec<String>,
    /// Columns written with the value their ADD COLUMN gave existing rows (`None`: NULL).
    pub(super) added: Vec<(String, Option<String>)>,
}

/// The target columns a remote row does not carry: every column of the table but those its
/// full new row writes (`written`), those it keeps from the old row without sending them
/// (`unchanged_toast`, should the old image lack one), and those no write sets (generated, and
/// `GENERATED ALWAYS AS IDENTITY` outside the key). The row's node did not have them when it
/// wrote it; its own row got, when each reached it, the value the ADD COLUMN gave existing
/// rows. Where that value is known ([`TargetTable::added`]) the row is written with it, else
/// with the column's DEFAULT ([`sql::WholeRow::defaults`]).
pub(super) fn not_carried(
    table: &TargetTable,
    written: &[String],
    unchanged_toast: &[String],
) -> NotCarried {
    let mut out = NotCarried::default();
    if written.len() >= table.columns.len() {
        // Every column (a change's columns are the table's, once admitted).
        return out;
    }
    for c in &table.columns {
        if written.contains(c)
            || unchanged_toast.contains(c)
            || table.key.contains(c)
            || table.generated.contains(c)
            || table.always_identity.contains(c)
        {
            continue;
        }
        match table.added.iter().find(|(name, _)| name == c) {
            Some(added) => out.added.push(added.clone()),
            None => out.defaults.push(c.clone()),
        }
    }
    out
}

/// A conflict to log in `pgferry.conflicts`.
pub(super) struct ConflictRecord {
    pub(super) table: String,
    pub(super) key: String,
    pub(super) kind: ConflictType,
    pub(super) resolution: Resolution,
    pub(super) local: Option<Version>,
    pub(super) local_row: Option<String>,
    pub(super) remote: Version,
    pub(super) remote_row: Option<String>,
}

/// Inserts one conflict; the statement is `$1..$10` as [`ConflictRecord`] lists them.
pub(super) const INSERT_CONFLICT: &str =
    "INSERT INTO pgferry.conflicts (table_name, key, conflict_type, resolution,
         local_commit_ts, local_node, local_row, remote_commit_ts, remote_node, remote_row)
     VALUES ($1, $2::text::jsonb, $3, $4,
         'epoch'::timestamptz + $5::int8 * interval '1 microsecond', $6, $7::text::jsonb,
         'epoch'::timestamptz + $8::int8 * interval '1 microsecond', $9, $10::text::jsonb)";

impl Worker {
    /// Sends the insert of a conflict into the open transaction without waiting for it, and
    /// counts it once the transaction commits.
    pub(super) fn log_conflict_sent<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
        record: ConflictRecord,
    ) {
        if let Some(lww) = &mut self.lww {
            lww.conflicts
                .push((record.table.clone(), record.kind, record.resolution));
        }
        tracing::debug!(table = %record.table, kind = record.kind.as_str(),
                        resolution = record.resolution.as_str(), remote = %record.remote, "conflict");
        pending.send(Box::pin(async move {
            let known = record.local.filter(|v| *v != Version::unknown());
            let params: [&(dyn ToSql + Sync); 10] = [
                &record.table,
                &record.key,
                &record.kind.as_str(),
                &record.resolution.as_str(),
                &known.as_ref().map(|v| v.ts_us),
                &known.as_ref().map(|v| v.node.clone()),
                &record.local_row,
                &record.remote.ts_us,
                &record.remote.node,
                &record.remote_row,
            ];
            client.execute(INSERT_CONFLICT, &params).await
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::{not_carried, won_flags, NotCarried};
    use crate::apply::target::TargetTable;
    use proptest::prelude::*;

    fn table(added: Vec<(String, Option<String>)>) -> TargetTable {
        let names = ["k", "v", "note", "extra", "later", "gen", "ident"];
        TargetTable {
            columns: names.iter().map(|c| (*c).to_owned()).collect(),
            key: vec!["k".to_owned()],
            primary_key: vec!["k".to_owned()],
            types: vec!["integer".to_owned(); names.len()],
            orders: vec![Some(String::new()); names.len()],
            partitioned: false,
            uniques: Vec::new(),
            always_identity: vec!["ident".to_owned()],
            generated: vec!["gen".to_owned()],
            expressions: Vec::new(),
            added,
            shape: String::new(),
            key_spelled_once: true,
        }
    }

    #[test]
    fn columns_a_row_lacks_get_their_add_value_where_known() {
        let t = table(vec![
            ("extra".to_owned(), Some("5".to_owned())),
            ("later".to_owned(), None),
        ]);
        let written = ["k".to_owned(), "v".to_owned()];
        assert_eq!(
            not_carried(&t, &written, &["note".to_owned()]),
            NotCarried {
                defaults: Vec::new(),
                added: vec![
                    ("extra".to_owned(), Some("5".to_owned())),
                    ("later".to_owned(), None)
                ],
            }
        );
        // Without a record, the DEFAULT; never the key, generated or identity columns.
        let t = table(vec![("later".to_owned(), None)]);
        assert_eq!(
            not_carried(&t, &written, &[]),
            NotCarried {
                defaults: vec!["note".to_owned(), "extra".to_owned()],
                added: vec![("later".to_owned(), None)],
            }
        );
    }

    proptest! {
        /// Every column of the table is exactly one of: written, kept (unchanged TOAST), never
        /// written (key, generated, identity), or not carried (its ADD value or its DEFAULT).
        #[test]
        fn not_carried_columns_are_the_rest(
            written in proptest::sample::subsequence(vec!["k", "v", "note", "extra", "later"], 0..=5),
            toast in proptest::sample::subsequence(vec!["note", "extra"], 0..=2),
            recorded in proptest::sample::subsequence(vec!["note", "extra", "later"], 0..=3),
        ) {
            let t = table(recorded.iter().map(|c| ((*c).to_owned(), Some(format!("{c}!")))).collect());
            let written: Vec<String> = written.iter().map(|c| (*c).to_owned()).collect();
            let toast: Vec<String> = toast.iter().map(|c| (*c).to_owned()).collect();
            let not = not_carried(&t, &written, &toast);
            for c in &t.columns {
                let fixed = t.key.contains(c) || t.generated.contains(c) || t.always_identity.contains(c);
                let kept = written.contains(c) || toast.contains(c) || fixed;
                let as_added = not.added.iter().filter(|(n, _)| n == c).count();
                let as_default = not.defaults.iter().filter(|n| *n == c).count();
                prop_assert_eq!(as_added + as_default, usize::from(!kept), "column {}", c);
                if as_added == 1 {
                    prop_assert!(recorded.contains(&c.as_str()));
                    let value = Some(format!("{c}!"));
                    prop_assert!(not.added.contains(&(c.clone(), value)));
                } else if as_default == 1 {
                    prop_assert!(!recorded.contains(&c.as_str()));
                }
            }
        }
    }

    #[test]
    fn won_flags_mark_returned_ordinals_only() {
        assert_eq!(won_flags(4, [2, 4].into_iter()), [false, true, false, true]);
        assert_eq!(won_flags(2, std::iter::empty()), [false, false]);
        // Ordinals outside the batch (never produced by the statement) are ignored.
        assert_eq!(won_flags(2, [0, 3, -1].into_iter()), [false, false]);
    }
}

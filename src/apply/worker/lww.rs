//! The multi-master apply path of a worker: each change is checked against what this node
//! holds (the row, under its row lock, and the key's version in `pgferry.versions`), decided
//! by [`crate::apply::conflict::decide`], and written: first the key's version (a guarded
//! upsert that takes the key's version lock and loses to any newer version stamped since the
//! probe), then the row. Conflicts are logged to `pgferry.conflicts` in the same
//! transaction. Nothing waits for a clock: versions, not commit times, order the writes.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::value::RawValue;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};

use super::RecordRef;
use super::{InFlight, StatementKey, Worker};
use crate::apply::conflict::{
    decide, merged_version, Action, ConflictType, Local, Resolution, Version,
};
use crate::apply::error::ApplyError;
use crate::apply::plan::StatementKind;
use crate::apply::sql::{self, Typed};
use crate::apply::stream::{object_text, ChangeItem, Followed, RowImage};
use crate::apply::target::{TargetTable, TextParam};
use crate::event::Op;

/// How often one change is decided again when a local writer stamps its key between the
/// probe and the write, or a unique-key contest removes a row.
const MAX_ATTEMPTS: usize = 10;

/// Multi-master state of a worker.
#[derive(Debug, Default)]
pub(super) struct LwwState {
    /// Conflicts in the open target transaction, counted once it commits.
    pub(super) conflicts: Vec<(String, ConflictType, Resolution)>,
    /// Keys written in the open source transaction by changes that carry no version (the
    /// stream of an earlier pgferry, or an unversioned table): they all get the transaction's
    /// commit time, so a later change of the same key in the same transaction, whose version
    /// equals the one stored, still applies.
    pub(super) fallback_written: HashSet<String>,
    /// The greatest version clock (µs) applied in the open target transaction.
    pub(super) newest_us: Option<i64>,
    /// Commit LSN of the open source transaction: where its deletes sit in the stream.
    pub(super) commit_lsn: crate::lsn::Lsn,
    /// When `pgferry.horizon_bypassed` was last read, and whether it named the stream's node.
    pub(super) horizon_checked: Option<(std::time::Instant, bool)>,
}

/// What the probe found.
pub(super) struct Probed {
    pub(super) local: Local,
    /// The live row as jsonb text.
    pub(super) row: Option<String>,
    /// The key's stored version (row's, else tombstone's), if any.
    pub(super) version: Option<Version>,
}

impl Probed {
    /// From a probe row's columns: whether a live row exists, the row, whether it equals the
    /// old image, and the stored version's `t` and node (NULL when the key has none).
    pub(super) fn from_parts(
        has_row: bool,
        row: Option<String>,
        matches_before: Option<bool>,
        t: Option<i64>,
        node: Option<String>,
    ) -> Probed {
        let stored = match (t, node) {
            (Some(ts_us), Some(node)) => Some(Version { ts_us, node }),
            _ => None,
        };
        if has_row {
            // A row without a version predates the table's protection and never had its
            // commit time: the oldest version.
            let version = stored.unwrap_or_else(Version::unknown);
            Probed {
                local: Local::Row {
                    version: Some(version.clone()),
                    matches_before,
                },
                row,
                version: Some(version),
            }
        } else if let Some(version) = stored {
            Probed {
                local: Local::Tombstone {
                    version: Some(version.clone()),
                },
                row: None,
                version: Some(version),
            }
        } else {
            Probed {
                local: Local::Nothing,
                row: None,
                version: None,
            }
        }
    }
}

/// One change, prepared for the multi-master path.
struct Prepared<'a> {
    qualified: String,
    table: Arc<TargetTable>,
    change: &'a ChangeItem,
    key_values: Vec<Box<RawValue>>,
    remote: Version,
    /// The change carries no version of its own: `remote` is its commit time.
    fallback: bool,
}

impl Prepared<'_> {
    fn key_typed(&self) -> Vec<Typed<'_>> {
        typed(&self.table, &self.table.key)
    }

    /// The image that describes the remote row: the after image, or for deletes the before.
    fn remote_row(&self) -> Option<&RowImage> {
        match self.change.op {
            Op::Delete => self.change.before.as_ref(),
            _ => self.change.after.as_ref(),
        }
    }

    /// The key as text, for the set of keys a source transaction wrote.
    fn key_text(&self) -> String {
        let values: Vec<&str> = self.key_values.iter().map(|v| v.get()).collect();
        format!("{}\u{0}{}", self.qualified, values.join("\u{0}"))
    }

    /// The full new row: the after image, plus every column it omits (unchanged TOAST
    /// values, which equal the old ones) from the old image, plus the key. An update that
    /// re-creates a missing row then writes the whole row, not NULLs.
    fn full_after(&self) -> (Vec<String>, Vec<Box<RawValue>>) {
        super::lww_rows::full_after(self.change, &self.table, &self.key_values)
    }

    /// The target columns the full new row (`columns`) does not carry
    /// ([`super::lww_rows::not_carried`]).
    fn not_carried(&self, columns: &[String]) -> super::lww_rows::NotCarried {
        super::lww_rows::not_carried(&self.table, columns, &self.change.unchanged_toast)
    }
}

pub(super) fn typed<'t>(table: &'t TargetTable, columns: &'t [String]) -> Vec<Typed<'t>> {
    columns
        .iter()
        .map(|c| Typed {
            name: c,
            ty: table.type_of(c).unwrap_or("text"),
            fixed: table.always_identity.contains(c),
        })
        .collect()
}

fn version_json(v: &Option<Version>) -> String {
    match v {
        Some(v) if *v != Version::unknown() => {
            serde_json::json!({"t_us": v.ts_us, "commit_ts_us": v.ts_us, "node": v.node})
                .to_string()
        }
        _ => "null".to_owned(),
    }
}

fn param(text: impl Into<String>) -> TextParam {
    TextParam(Some(text.into()))
}

fn refs(params: &[TextParam]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect()
}

/// Whether a write lost a unique-key contest on an index other than the primary key (the
/// write's `ON CONFLICT` absorbs the primary key's and the version store's).
fn secondary_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

/// A prepared versioned write: the statement, its parameters, and the row it writes.
struct VersionedWrite {
    stmt: Statement,
    params: Vec<TextParam>,
    columns: Vec<String>,
    values: Vec<Box<RawValue>>,
}

/// What writing the row came to.
enum Written {
    /// The row is written.
    Done,
    /// A local row with a greater version holds one of its unique values: the remote row
    /// lost, and its key is now a tombstone with the remote version.
    Lost,
}

impl Worker {
    /// Under lock contention ([`crate::apply::contention`]): waits for the target's apply
    /// turn, an advisory lock held until the target transaction ends, before the transaction
    /// writes its first row. Only one worker of the target writes at a time then, so no two
    /// wait for each other's rows in a cycle. Called before every write of a multi-master
    /// target transaction; a no-op once the turn is held, and while there is no contention.
    pub(super) async fn take_turn(&mut self, client: &Client) -> Result<(), ApplyError> {
        if self.turn_held
            || self.lww.is_none()
            || !self
                .settings
                .contention
                .contended(std::time::Instant::now())
        {
            return Ok(());
        }
        client
            .batch_execute(crate::apply::contention::APPLY_TURN)
            .await
            .map_err(ApplyError::sql("waiting for the target's apply turn"))?;
        self.turn_held = true;
        Ok(())
    }

    /// Applies one change under last-writer-wins. `commit_ts_us`: its origin commit time,
    /// the version of changes that carry none.
    pub(super) async fn apply_change_lww<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
        message: &RecordRef<'_>,
        change: Box<ChangeItem>,
        commit_ts_us: i64,
    ) -> Result<(), ApplyError> {
        let mut change = change;
        let qualified = format!("{}.{}", change.schema, change.table);
        if change.op == Op::Truncate {
            self.metrics.truncates_refused.inc();
            let reason = format!(
                "{qualified}: TRUNCATE is refused in multi-master (it carries no row versions, so \
                 nodes would diverge); nodes refuse local TRUNCATEs, use DELETE"
            );
            return self.bad_message(client, message, &reason).await;
        }
        let mut followed = Followed::new(&mut *change);
        let Some(table) = self
            .target_table(client, message, &mut followed, &qualified)
            .await?
        else {
            return Ok(());
        };
        // The writer's types are known by the names it wrote, which columns renamed since no
        // longer have.
        let writers_names = followed.writers_names();
        self.convert_retyped(
            client,
            pending,
            &qualified,
            &mut change,
            &table,
            &writers_names,
        )
        .await?;
        // The table's name here, if it was renamed since the change was written.
        let qualified = format!("{}.{}", change.schema, change.table);
        if table.key.is_empty() {
            let reason = format!("multi_master needs a primary key on {qualified}");
            return self.bad_message(client, message, &reason).await;
        }
        let image = |k: &str| match change.op {
            Op::Delete => change.before.as_ref().and_then(|b| b.get(k)),
            _ => change
                .after
                .as_ref()
                .and_then(|a| a.get(k))
                .or_else(|| change.before.as_ref().and_then(|b| b.get(k))),
        };
        let Some(key_values) = table
            .key
            .iter()
            .map(|k| image(k).map(RawValue::to_owned))
            .collect::<Option<Vec<Box<RawValue>>>>()
        else {
            let reason = format!("{qualified}: the change lacks primary-key columns");
            return self.bad_message(client, message, &reason).await;
        };
        if change.op == Op::Update {
            let moved = table.key.iter().any(|k| {
                let before = change.before.as_ref().and_then(|b| b.get(k));
                let after = change.after.as_ref().and_then(|a| a.get(k));
                matches!((before, after), (Some(b), Some(a)) if a.get() != b.get())
            });
            if moved {
                let reason = format!(
                    "{qualified}: an update that changes the primary key cannot be resolved by \
                     last-writer-wins; delete and re-insert the row instead"
                );
                return self.bad_message(client, message, &reason).await;
            }
        }
        pending
            .drain()
            .await
            .map_err(ApplyError::sql("applying changes"))?;
        let (remote, fallback) = match &change.version {
            Some(v) => (v.clone(), false),
            None => (
                Version {
                    ts_us: commit_ts_us,
                    node: self.settings.node.clone(),
                },
                true,
            ),
        };
        let prepared = Prepared {
            qualified,
            table,
            change: &change,
            key_values,
            remote,
            fallback,
        };
        let resolver = self
            .settings
            .apply
            .conflict
            .resolvers
            .get(&prepared.qualified)
            .cloned();
        let batched = !prepared.fallback
            && resolver.is_none()
            && prepared.table.uniques.is_empty()
            && prepared.table.key_spelled_once
            && !self.careful;
        if batched {
            let Prepared {
                table,
                key_values,
                remote,
                ..
            } = prepared;
            return match self
                .batch_lww(client, pending, &table, change, key_values, remote)
                .await?
            {
                Ok(()) => Ok(()),
                Err(reason) => self.bad_message(client, message, &reason).await,
            };
        }
        // Not batched: after the batch, one change at a time, on the worker's own connection.
        // A lane may hold this key's row from the batch just sent: its transaction commits
        // first, or the worker would wait for its own lane until the lock timeout, and again
        // after every replay. (A crash before the worker's commit replays the lanes' changes,
        // which find their versions stored and change nothing.)
        self.send_lww_rows(client, pending).await?;
        self.commit_lanes().await?;
        self.take_turn(client).await?;
        // An insert of a key this node has never seen (no version at all) cannot conflict:
        // one statement stamps and writes it. Anything else goes the full way.
        let fresh_candidate = matches!(change.op, Op::Create | Op::Read)
            && resolver.is_none()
            && prepared.table.uniques.is_empty();
        if fresh_candidate && self.insert_fresh(client, &prepared).await? {
            self.note_applied(&prepared, change.op);
            return Ok(());
        }
        for _ in 0..MAX_ATTEMPTS {
            let mut probed = self.probe(client, &prepared).await?;
            let rewrite = prepared.fallback
                && probed.version.as_ref() == Some(&prepared.remote)
                && self
                    .lww
                    .as_ref()
                    .is_some_and(|l| l.fallback_written.contains(&prepared.key_text()));
            if rewrite {
                // Written earlier in this source transaction: later changes follow it.
                probed.local = match probed.local {
                    Local::Row { matches_before, .. } => Local::Row {
                        version: None,
                        matches_before,
                    },
                    _ => Local::Tombstone { version: None },
                };
            }
            let decision = decide(
                change.op,
                &prepared.remote,
                &probed.local,
                resolver.is_some(),
            );
            let mut resolution = decision.conflict.map(|(_, r)| r);
            let mut conflict = decision.conflict.map(|(c, _)| c);
            let done = match decision.action {
                Action::Skip => true,
                Action::Write => match self.write(client, &prepared, message).await? {
                    None => false,
                    Some(Written::Lost) => {
                        conflict = Some(ConflictType::UniqueKey);
                        resolution = Some(Resolution::KeepLocal);
                        true
                    }
                    Some(_) => true,
                },
                Action::Delete => self.delete(client, &prepared).await?,
                Action::Merge => {
                    let function = resolver.as_deref().unwrap_or_default();
                    match self.merge(client, &prepared, &probed, function).await? {
                        Some(done) => done,
                        None => {
                            // The resolver declined: last writer wins.
                            let newer =
                                probed.version.as_ref().is_none_or(|v| &prepared.remote > v);
                            resolution = Some(if newer {
                                Resolution::ApplyRemote
                            } else {
                                Resolution::KeepLocal
                            });
                            !newer || self.write(client, &prepared, message).await?.is_some()
                        }
                    }
                }
            };
            if !done {
                continue;
            }
            if let (Some(kind), Some(resolution)) = (conflict, resolution) {
                self.log_conflict(client, &prepared, &probed, kind, resolution)
                    .await?;
            }
            if decision.action == Action::Skip {
                self.note_newest(&prepared);
            } else {
                self.note_applied(&prepared, change.op);
            }
            return Ok(());
        }
        Err(ApplyError::Contention {
            table: prepared.qualified,
        })
    }

    /// Keeps the greatest version clock applied in the open target transaction.
    fn note_newest(&mut self, p: &Prepared<'_>) {
        self.note_newest_version(&p.remote);
    }

    /// Counts a change that was written.
    fn note_applied(&mut self, p: &Prepared<'_>, op: Op) {
        self.note_newest(p);
        if p.fallback {
            if let Some(lww) = &mut self.lww {
                lww.fallback_written.insert(p.key_text());
            }
        }
        self.batch_changes += 1;
        self.count_applied(&p.qualified, op, 1);
    }

    /// The fast path of an insert ([`sql::insert_fresh`]): true when the key had no version
    /// and the row is written.
    async fn insert_fresh(
        &mut self,
        client: &Client,
        p: &Prepared<'_>,
    ) -> Result<bool, ApplyError> {
        let Ok(write) = self.versioned_write(client, p, true).await? else {
            // The full path reports what cannot be rendered.
            return Ok(false);
        };
        let row = client
            .query_one(&write.stmt, &refs(&write.params))
            .await
            .map_err(ApplyError::sql("inserting a row"))?;
        Ok(row.get::<_, i64>(0) == 1)
    }

    /// The statement that stamps the remote version and upserts the full new row
    /// ([`sql::stamp_and_upsert`], or with `only_new` [`sql::insert_fresh`]), with its
    /// parameters. `Ok(Err(reason))`: a value cannot be rendered for its column.
    async fn versioned_write(
        &mut self,
        client: &Client,
        p: &Prepared<'_>,
        only_new: bool,
    ) -> Result<Result<VersionedWrite, String>, ApplyError> {
        let (mut columns, values) = p.full_after();
        let not = p.not_carried(&columns);
        let defaults = not.defaults;
        // Columns written with their ADD COLUMN's value follow the row's own, as text.
        let (added, added_values): (Vec<String>, Vec<Option<String>>) =
            not.added.into_iter().unzip();
        let n = columns.len();
        columns.extend(added);
        let key: Vec<&str> = p.table.key.iter().map(String::as_str).collect();
        let typed_columns = typed(&p.table, &columns);
        let whole = sql::WholeRow {
            defaults: &defaults,
            shape: &p.table.shape,
        };
        let (schema, table) = (&p.change.schema, &p.change.table);
        let (kind, text) = if only_new {
            let text = sql::insert_fresh(schema, table, &typed_columns, &key, whole);
            (StatementKind::LwwInsertFresh, text)
        } else {
            let text = sql::stamp_and_upsert(schema, table, &typed_columns, &key, whole);
            (StatementKind::LwwWrite, text)
        };
        let key = StatementKey {
            defaults,
            ..StatementKey::new(schema.as_str(), table.as_str(), kind, columns.clone())
        };
        let stmt = self.statement(client, key, || text).await?;
        // Columns taken from the old image keep its JSON-null marks.
        let mut json_nulls = p.change.json_null_after.clone();
        json_nulls.extend(
            p.change
                .json_null_before
                .iter()
                .filter(|c| p.change.after.as_ref().is_none_or(|a| a.get(c).is_none()))
                .cloned(),
        );
        let mut params = match Self::render_params(
            &stmt.params()[..n],
            &columns[..n],
            &values,
            &json_nulls,
            &p.qualified,
        ) {
            Ok(params) => params,
            Err(reason) => return Ok(Err(reason)),
        };
        params.extend(added_values.into_iter().map(TextParam));
        params.extend(self.stamp_params(p, &p.remote));
        Ok(Ok(VersionedWrite {
            stmt,
            params,
            columns,
            values,
        }))
    }

    async fn cached(
        &mut self,
        client: &Client,
        p: &Prepared<'_>,
        kind: StatementKind,
        columns: Vec<String>,
        text: impl FnOnce() -> String,
    ) -> Result<Statement, ApplyError> {
        let key = StatementKey::new(
            p.change.schema.as_str(),
            p.change.table.as_str(),
            kind,
            columns,
        );
        self.statement(client, key, text).await
    }

    /// Renders values for `stmt`, whose first parameters are the key (rendering errors cannot
    /// happen here for values that already passed the probe, but are reported all the same).
    fn values(
        types: &[tokio_postgres::types::Type],
        p: &Prepared<'_>,
        columns: &[String],
        values: &[Box<RawValue>],
        json_nulls: &[String],
    ) -> Result<Vec<TextParam>, ApplyError> {
        Self::render_params(types, columns, values, json_nulls, &p.qualified).map_err(|reason| {
            ApplyError::BadMessage {
                location: p.qualified.clone(),
                reason,
            }
        })
    }

    /// Locks the live row (if any) and reads it and the key's version, in one statement. The
    /// version is read in the statement's snapshot, so after waiting for a local writer it may
    /// be older than the row; the guarded stamp then catches the newer one.
    async fn probe(&mut self, client: &Client, p: &Prepared<'_>) -> Result<Probed, ApplyError> {
        let key = p.key_typed();
        // Compare the whole old image when the change carries one (REPLICA IDENTITY FULL);
        // a key-only image says nothing about concurrency.
        let before: Vec<String> = match &p.change.before {
            Some(b) if b.keys().any(|c| !p.table.key.contains(c)) => b
                .keys()
                .filter(|c| p.table.columns.contains(c))
                .cloned()
                .collect(),
            _ => Vec::new(),
        };
        let before_typed = typed(&p.table, &before);
        let probe_text = sql::probe(&p.change.schema, &p.change.table, &key, &before_typed);
        let probe = self
            .cached(client, p, StatementKind::LwwProbe, before.clone(), || {
                probe_text
            })
            .await?;
        let mut columns = p.table.key.clone();
        columns.extend(before.iter().cloned());
        let mut values = p.key_values.clone();
        if let Some(b) = &p.change.before {
            values.extend(
                before
                    .iter()
                    .map(|c| b.get(c).unwrap_or(RawValue::NULL).to_owned()),
            );
        }
        let mut params = Self::values(
            probe.params(),
            p,
            &columns,
            &values,
            &p.change.json_null_before,
        )?;
        params.push(param(p.qualified.clone()));
        let row = client
            .query_one(&probe, &refs(&params))
            .await
            .map_err(ApplyError::sql("reading the local row version"))?;
        Ok(Probed::from_parts(
            row.get(0),
            row.get(1),
            row.get(2),
            row.get(3),
            row.get(4),
        ))
    }

    /// Stamps the key's version (`deleted`: as a tombstone) if `version` is still greater
    /// than the stored one (or equal, with `allow_equal`). `false`: a writer stamped a newer
    /// one since the probe.
    async fn stamp(
        &mut self,
        client: &Client,
        p: &Prepared<'_>,
        version: &Version,
        deleted: bool,
        allow_equal: bool,
    ) -> Result<bool, ApplyError> {
        let key = p.key_typed();
        let text = sql::stamp_version(&key);
        let stmt = self
            .cached(
                client,
                p,
                StatementKind::LwwStamp,
                p.table.key.clone(),
                || text,
            )
            .await?;
        let mut params = vec![
            param(p.qualified.clone()),
            param(version.ts_us.to_string()),
            param(version.node.clone()),
            param(deleted.to_string()),
            param(allow_equal.to_string()),
            param(self.settings.node.clone()),
            param(self.open_commit_lsn().to_string()),
        ];
        params.extend(Self::values(
            &stmt.params()[7..],
            p,
            &p.table.key,
            &p.key_values,
            &[],
        )?);
        let won = client
            .query(&stmt, &refs(&params))
            .await
            .map_err(ApplyError::sql("stamping the key's version"))?;
        Ok(!won.is_empty())
    }

    /// Stamps the remote version and writes the remote row (insert, or update of the live
    /// row) in one statement. `None`: a newer version was stamped meanwhile; decide again.
    async fn write(
        &mut self,
        client: &Client,
        p: &Prepared<'_>,
        message: &RecordRef<'_>,
    ) -> Result<Option<Written>, ApplyError> {
        let VersionedWrite {
            stmt,
            params,
            columns,
            values,
        } = match self.versioned_write(client, p, false).await? {
            Ok(write) => write,
            Err(reason) => {
                self.bad_message(client, message, &reason).await?;
                return Ok(Some(Written::Done));
            }
        };
        let uniques = !p.table.uniques.is_empty();
        let args = refs(&params);
        for _ in 0..MAX_ATTEMPTS {
            let result = if uniques {
                // Pipelined: one round trip for the savepoint and the write.
                let (saved, written) = tokio::join!(
                    client.batch_execute("SAVEPOINT pgferry_unique"),
                    client.query_one(&stmt, &args)
                );
                saved.map_err(ApplyError::sql("opening a savepoint"))?;
                written
            } else {
                client.query_one(&stmt, &args).await
            };
            match result {
                Ok(row) => {
                    if uniques {
                        client
                            .batch_execute("RELEASE SAVEPOINT pgferry_unique")
                            .await
                            .map_err(ApplyError::sql("releasing a savepoint"))?;
                    }
                    return Ok((row.get::<_, i64>(0) == 1).then_some(Written::Done));
                }
                Err(e) if uniques && secondary_unique_violation(&e) => {
                    client
                        .batch_execute("ROLLBACK TO SAVEPOINT pgferry_unique")
                        .await
                        .map_err(ApplyError::sql("rolling back to a savepoint"))?;
                    if !self.unique_contest(client, p, &columns, &values).await? {
                        // The remote row lost: its key ends deleted at its own version.
                        if !self.stamp(client, p, &p.remote, true, p.fallback).await? {
                            return Ok(None);
                        }
                        return Ok(Some(Written::Lost));
                    }
                }
                Err(e) => return Err(ApplyError::sql("writing a row")(e)),
            }
        }
        Err(ApplyError::Contention {
            table: p.qualified.clone(),
        })
    }

    /// The parameters that follow the row's in the combined statements: table name, version,
    /// allow-equal, and where the change sits in the stream.
    fn stamp_params(&self, p: &Prepared<'_>, version: &Version) -> [TextParam; 6] {
        [
            param(p.qualified.clone()),
            param(version.ts_us.to_string()),
            param(version.node.clone()),
            param(p.fallback.to_string()),
            param(self.settings.node.clone()),
            param(self.open_commit_lsn().to_string()),
        ]
    }

    /// Settles a unique-key collision between the remote row and local rows under other keys
    /// the same way on every node: the greater version keeps the value. Removes the local
    /// rows that lost and returns true (write again), or false when a local row wins.
    async fn unique_contest(
        &mut self,
        client: &Client,
        p: &Prepared<'_>,
        columns: &[String],
        values: &[Box<RawValue>],
    ) -> Result<bool, ApplyError> {
        let key: Vec<&str> = p.table.key.iter().map(String::as_str).collect();
        let find = sql::unique_holders(&p.change.schema, &p.change.table, &key, &p.table.uniques);
        let find = self
            .cached(
                client,
                p,
                StatementKind::LwwUniqueHolders,
                Vec::new(),
                || find,
            )
            .await?;
        let remote_row = object_text(
            columns
                .iter()
                .map(String::as_str)
                .zip(values.iter().map(|v| v.get())),
        );
        let holders = client
            .query(&find, &[&remote_row, &p.qualified])
            .await
            .map_err(ApplyError::sql("finding the rows that hold a unique value"))?;
        let mut losers = Vec::new();
        for holder in &holders {
            let version = match (
                holder.get::<_, Option<i64>>(1),
                holder.get::<_, Option<String>>(2),
            ) {
                (Some(ts_us), Some(node)) => Version { ts_us, node },
                _ => Version::unknown(),
            };
            if version > p.remote {
                return Ok(false);
            }
            losers.push((
                holder.get::<_, String>(0),
                version,
                holder.get::<_, String>(3),
            ));
        }
        if losers.is_empty() {
            // The violation was not on the values of a plain unique index (an expression or
            // partial index): nothing to settle by version.
            return Err(ApplyError::BadMessage {
                location: p.qualified.clone(),
                reason: "a unique index other than the primary key (with an expression or a \
                         predicate) rejects the row; multi-master resolves only plain unique \
                         columns"
                    .into(),
            });
        }
        let drop = sql::drop_unique_loser(&p.change.schema, &p.change.table, &key);
        let drop = self
            .cached(client, p, StatementKind::LwwUniqueLoser, Vec::new(), || {
                drop
            })
            .await?;
        let (node, lsn) = (
            self.settings.node.clone(),
            self.open_commit_lsn().to_string(),
        );
        for (loser, version, key) in losers {
            client
                .execute(&drop, &[&loser, &p.qualified, &node, &lsn, &key])
                .await
                .map_err(ApplyError::sql(
                    "removing a row that lost a unique-key contest",
                ))?;
            self.log_unique_loser(client, p, &key, &version).await?;
        }
        Ok(true)
    }

    /// Stamps the remote tombstone and deletes the live row, if any, in one statement.
    /// `false`: a newer version was stamped meanwhile; decide again.
    async fn delete(&mut self, client: &Client, p: &Prepared<'_>) -> Result<bool, ApplyError> {
        let key = p.key_typed();
        let text = sql::stamp_and_delete(&p.change.schema, &p.change.table, &key);
        let stmt = self
            .cached(
                client,
                p,
                StatementKind::LwwDelete,
                p.table.key.clone(),
                || text,
            )
            .await?;
        let n = p.table.key.len();
        let mut params = Self::values(&stmt.params()[..n], p, &p.table.key, &p.key_values, &[])?;
        params.extend(self.stamp_params(p, &p.remote));
        let row = client
            .query_one(&stmt, &refs(&params))
            .await
            .map_err(ApplyError::sql("deleting a row"))?;
        Ok(row.get::<_, i64>(0) == 1)
    }

    /// Calls the table's resolver and writes its result with a version above both inputs.
    /// `None`: it returned NULL. `Some(false)`: a newer version was stamped meanwhile.
    async fn merge(
        &mut self,
        client: &Client,
        p: &Prepared<'_>,
        probed: &Probed,
        function: &str,
    ) -> Result<Option<bool>, ApplyError> {
        let text = sql::call_resolver(function, &p.change.schema, &p.change.table);
        let call = self
            .cached(client, p, StatementKind::LwwResolver, Vec::new(), || text)
            .await?;
        let remote = p
            .remote_row()
            .map(RowImage::to_json_text)
            .unwrap_or_else(|| "{}".to_owned());
        let params = [
            param(p.qualified.clone()),
            TextParam(probed.row.clone()),
            param(remote),
            param(version_json(&probed.version)),
            param(version_json(&Some(p.remote.clone()))),
        ];
        let row = client
            .query_one(&call, &refs(&params))
            .await
            .map_err(ApplyError::sql("calling the conflict resolver"))?;
        let Some(merged): Option<String> = row.get(0) else {
            return Ok(None);
        };
        let version = merged_version(probed.version.as_ref(), &p.remote);
        // Merging in an older input leaves the version where it was (the merge is a join).
        let same = probed.version.as_ref() == Some(&version);
        if !self.stamp(client, p, &version, false, same).await? {
            return Ok(Some(false));
        }
        let columns: Vec<String> = p
            .table
            .columns
            .iter()
            .filter(|c| {
                !p.table.key.contains(c)
                    && !p.table.always_identity.contains(c)
                    && !p.table.generated.contains(c)
            })
            .cloned()
            .collect();
        if columns.is_empty() {
            return Ok(Some(true));
        }
        let cols: Vec<&str> = columns.iter().map(String::as_str).collect();
        let key = p.key_typed();
        let text = sql::write_merged(
            &p.change.schema,
            &p.change.table,
            &cols,
            &key,
            &p.table.shape,
        );
        let stmt = self
            .cached(client, p, StatementKind::LwwMerged, Vec::new(), || text)
            .await?;
        let mut params = vec![param(merged)];
        params.extend(Self::values(
            &stmt.params()[1..],
            p,
            &p.table.key,
            &p.key_values,
            &[],
        )?);
        client
            .execute_raw(&stmt, params)
            .await
            .map_err(ApplyError::sql("writing the merged row"))?;
        Ok(Some(true))
    }

    async fn log_conflict(
        &mut self,
        client: &Client,
        p: &Prepared<'_>,
        probed: &Probed,
        kind: ConflictType,
        resolution: Resolution,
    ) -> Result<(), ApplyError> {
        let key = object_text(
            p.table
                .key
                .iter()
                .map(String::as_str)
                .zip(p.key_values.iter().map(|v| v.get())),
        );
        let remote_row = p.remote_row().map(RowImage::to_json_text);
        self.insert_conflict(
            client,
            p,
            &key,
            kind,
            resolution,
            probed.version.as_ref(),
            probed.row.as_deref(),
            remote_row.as_deref(),
        )
        .await
    }

    /// Logs a local row removed because the remote row won its unique value.
    async fn log_unique_loser(
        &mut self,
        client: &Client,
        p: &Prepared<'_>,
        key: &str,
        version: &Version,
    ) -> Result<(), ApplyError> {
        let remote_row = p.remote_row().map(RowImage::to_json_text);
        self.insert_conflict(
            client,
            p,
            key,
            ConflictType::UniqueKey,
            Resolution::ApplyRemote,
            Some(version),
            None,
            remote_row.as_deref(),
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn insert_conflict(
        &mut self,
        client: &Client,
        p: &Prepared<'_>,
        key: &str,
        kind: ConflictType,
        resolution: Resolution,
        local: Option<&Version>,
        local_row: Option<&str>,
        remote_row: Option<&str>,
    ) -> Result<(), ApplyError> {
        let known = local.filter(|v| **v != Version::unknown());
        let params: [&(dyn ToSql + Sync); 10] = [
            &p.qualified,
            &key,
            &kind.as_str(),
            &resolution.as_str(),
            &known.map(|v| v.ts_us),
            &known.map(|v| v.node.clone()),
            &local_row,
            &p.remote.ts_us,
            &p.remote.node,
            &remote_row,
        ];
        client
            .execute(super::lww_rows::INSERT_CONFLICT, &params)
            .await
            .map_err(ApplyError::sql("logging a conflict"))?;
        if let Some(lww) = &mut self.lww {
            lww.conflicts.push((p.qualified.clone(), kind, resolution));
        }
        tracing::debug!(table = %p.qualified, kind = kind.as_str(), resolution = resolution.as_str(),
                        remote = %p.remote, "conflict");
        Ok(())
    }

    pub(super) fn open_commit_lsn(&self) -> crate::lsn::Lsn {
        self.lww.as_ref().map(|l| l.commit_lsn).unwrap_or_default()
    }

    /// Records how far ahead of this node's database clock the newest version applied in the
    /// committed transaction was: the observed skew of that peer's clock (0 when behind, as
    /// any backlog is).
    pub(super) async fn observe_peer_clock(&mut self, client: &Client) -> Result<(), ApplyError> {
        let Some(newest) = self.lww.as_mut().and_then(|l| l.newest_us.take()) else {
            return Ok(());
        };
        let now: i64 = client
            .query_one(
                "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::int8",
                &[],
            )
            .await
            .map_err(ApplyError::sql("reading the database clock"))?
            .get(0);
        self.metrics
            .peer_clock_ahead_ms
            .with_label_values(&[&self.settings.node])
            .set((newest - now).max(0) / 1000);
        Ok(())
    }

    /// Counts the committed transaction's conflicts.
    pub(super) fn count_conflicts(&mut self) {
        let Some(lww) = &mut self.lww else {
            return;
        };
        for (table, kind, resolution) in lww.conflicts.drain(..) {
            self.metrics
                .conflicts
                .with_label_values(&[&table, kind.as_str(), resolution.as_str()])
                .inc();
        }
    }
}

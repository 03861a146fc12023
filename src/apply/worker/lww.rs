//! The multi-master apply path of a worker: each change is checked against what this node
//! holds (row or tombstone, under a row lock), decided by [`crate::apply::conflict::decide`],
//! written, and any conflict logged to `pgferry.conflicts` in the same transaction. Before
//! each commit the worker waits for the local clock to pass the origin commit time.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};

use super::RecordRef;
use super::{InFlight, StatementKey, Worker};
use crate::apply::conflict::{decide, Action, ConflictType, Local, Resolution, Version};
use crate::apply::error::ApplyError;
use crate::apply::multimaster::database_clock_us;
use crate::apply::sql::{self, Typed};
use crate::apply::stream::{object_text, ChangeItem, RowImage};
use crate::apply::target::{TargetTable, TextParam};
use crate::config::ClockSkewAction;
use crate::event::Op;

/// How often one change is decided again when a local writer inserts its key between the
/// probe and the write.
const MAX_ATTEMPTS: usize = 10;

/// Multi-master state of a worker.
#[derive(Debug)]
pub(super) struct LwwState {
    /// This node's id: the node of rows written locally (origin 0).
    pub(super) local_node: String,
    /// Replication origin id → node id.
    pub(super) origins: HashMap<i64, String>,
    /// Conflicts in the open target transaction, counted once it commits.
    pub(super) conflicts: Vec<(String, ConflictType, Resolution)>,
    /// The latest database clock reading (µs): origin times before it need no new reading.
    pub(super) clock_seen_us: i64,
}

/// What the probe found.
struct Probed {
    local: Local,
    /// The live row as jsonb text.
    row: Option<String>,
    /// The local version (row's, else tombstone's), if known.
    version: Option<Version>,
}

/// One change, prepared for the multi-master path.
struct Prepared<'a> {
    qualified: String,
    table: TargetTable,
    change: &'a ChangeItem,
    key_values: Vec<Box<RawValue>>,
    remote: Version,
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
}

fn typed<'t>(table: &'t TargetTable, columns: &'t [String]) -> Vec<Typed<'t>> {
    columns
        .iter()
        .map(|c| Typed {
            name: c,
            ty: table.type_of(c).unwrap_or("text"),
        })
        .collect()
}

fn version_json(v: &Option<Version>) -> String {
    match v {
        Some(v) if *v != Version::unknown() => {
            serde_json::json!({"commit_ts_us": v.ts_us, "node": v.node}).to_string()
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

impl Worker {
    /// Applies one change under last-writer-wins. `commit_ts_us`: its origin commit time.
    pub(super) async fn apply_change_lww<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
        message: &RecordRef<'_>,
        change: Box<ChangeItem>,
        commit_ts_us: i64,
    ) -> Result<(), ApplyError> {
        if change.op == Op::Truncate {
            return self.apply_change(client, pending, message, change).await;
        }
        let qualified = format!("{}.{}", change.schema, change.table);
        let Some(table) = self
            .target_table(client, message, &change, &qualified)
            .await?
        else {
            return Ok(());
        };
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
        let prepared = Prepared {
            qualified,
            table,
            change: &change,
            key_values,
            remote: Version {
                ts_us: commit_ts_us,
                node: self.settings.node.clone(),
            },
        };
        let resolver = self
            .settings
            .apply
            .conflict
            .resolvers
            .get(&prepared.qualified)
            .cloned();
        for _ in 0..MAX_ATTEMPTS {
            let probed = self.probe(client, &prepared).await?;
            let decision = decide(
                change.op,
                &prepared.remote,
                &probed.local,
                resolver.is_some(),
            );
            let mut resolution = decision.conflict.map(|(_, r)| r);
            let done = match decision.action {
                Action::Skip => true,
                Action::Write => {
                    self.write(client, &prepared, &probed.local, message)
                        .await?
                }
                Action::Delete => {
                    self.delete(client, &prepared, &probed.local).await?;
                    true
                }
                Action::Merge => {
                    let function = resolver.as_deref().unwrap_or_default();
                    match self.merge(client, &prepared, &probed, function).await? {
                        Some(()) => true,
                        None => {
                            // The resolver declined: last writer wins.
                            let newer =
                                probed.version.as_ref().is_none_or(|v| &prepared.remote > v);
                            resolution = Some(if newer {
                                Resolution::ApplyRemote
                            } else {
                                Resolution::KeepLocal
                            });
                            !newer
                                || self
                                    .write(client, &prepared, &probed.local, message)
                                    .await?
                        }
                    }
                }
            };
            if !done {
                continue;
            }
            if let (Some((kind, _)), Some(resolution)) = (decision.conflict, resolution) {
                self.log_conflict(client, &prepared, &probed, kind, resolution)
                    .await?;
            }
            if decision.action != Action::Skip {
                self.batch_changes += 1;
                self.count_applied(&prepared.qualified, change.op);
            }
            return Ok(());
        }
        Err(ApplyError::Contention {
            table: prepared.qualified,
        })
    }

    async fn cached(
        &mut self,
        client: &Client,
        p: &Prepared<'_>,
        kind: &'static str,
        columns: Vec<String>,
        text: impl FnOnce() -> String,
    ) -> Result<Statement, ApplyError> {
        let key = StatementKey {
            schema: p.change.schema.clone(),
            table: p.change.table.clone(),
            kind,
            columns,
        };
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

    /// Locks the live row (if any) and reads the row, its version and the tombstone.
    async fn probe(&mut self, client: &Client, p: &Prepared<'_>) -> Result<Probed, ApplyError> {
        let key = p.key_typed();
        let lock_text = sql::lock_row(&p.change.schema, &p.change.table, &key);
        let lock = self
            .cached(client, p, "lww_lock", p.table.key.clone(), || lock_text)
            .await?;
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
            .cached(client, p, "lww_probe", before.clone(), || probe_text)
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
        let lock_params = params[..p.table.key.len()].to_vec();
        let key_lock_text = sql::lock_key(&key);
        let key_lock = self
            .cached(client, p, "lww_lock_key", p.table.key.clone(), || {
                key_lock_text
            })
            .await?;
        Self::execute_then_key(client, &key_lock, p, param(p.qualified.clone()))
            .await
            .map_err(ApplyError::sql("locking the key against other appliers"))?;
        client
            .query(&lock, &refs(&lock_params))
            .await
            .map_err(ApplyError::sql("locking the local row"))?;
        let row = client
            .query_one(&probe, &refs(&params))
            .await
            .map_err(ApplyError::sql("reading the local row version"))?;
        let row_mine: Option<bool> = row.get(2);
        let tomb_mine: Option<bool> = row.get(7);
        let version_at = |ts: usize, origin: usize, mine: bool| -> Option<Version> {
            if mine {
                return None;
            }
            let ts_us: Option<i64> = row.get(ts);
            let roident: Option<i64> = row.get(origin);
            Some(match (ts_us, roident) {
                (Some(ts_us), Some(roident)) => Version {
                    ts_us,
                    node: self.node_of(roident),
                },
                _ => Version::unknown(),
            })
        };
        let (local, version) = match (row_mine, tomb_mine) {
            (Some(mine), _) => {
                let version = version_at(0, 1, mine);
                let matches_before: Option<bool> = row.get(4);
                (
                    Local::Row {
                        version: version.clone(),
                        matches_before,
                    },
                    version,
                )
            }
            (None, Some(mine)) => {
                let version = version_at(5, 6, mine);
                (
                    Local::Tombstone {
                        version: version.clone(),
                    },
                    version,
                )
            }
            (None, None) => (Local::Nothing, None),
        };
        let row_json: Option<String> = row.get(3);
        // Origins registered since the map was read show up as unknown ids: refresh once.
        if let Some(v) = &version {
            if v.node.starts_with("origin#") {
                self.refresh_origins(client).await?;
            }
        }
        Ok(Probed {
            local,
            row: row_json,
            version,
        })
    }

    fn node_of(&self, roident: i64) -> String {
        let Some(lww) = &self.lww else {
            return String::new();
        };
        if roident == 0 {
            return lww.local_node.clone();
        }
        lww.origins
            .get(&roident)
            .cloned()
            .unwrap_or_else(|| format!("origin#{roident}"))
    }

    async fn refresh_origins(&mut self, client: &Client) -> Result<(), ApplyError> {
        let origins = crate::apply::multimaster::origin_nodes(client)
            .await
            .map_err(ApplyError::sql("reading pgferry.origins"))?;
        if let Some(lww) = &mut self.lww {
            lww.origins = origins;
        }
        Ok(())
    }

    /// Writes the remote after image: over the live row, or as a new row. `Ok(false)`: a
    /// local writer inserted the key meanwhile; decide again.
    async fn write(
        &mut self,
        client: &Client,
        p: &Prepared<'_>,
        local: &Local,
        message: &RecordRef<'_>,
    ) -> Result<bool, ApplyError> {
        let after = p.change.after.clone().unwrap_or_default();
        let (schema, table) = (&p.change.schema, &p.change.table);
        let over_row = matches!(local, Local::Row { .. });
        // Over a live row: update its non-key columns. Else: insert the whole image.
        let (kind, context, columns, values, text) = if over_row {
            let (mut columns, mut values): (Vec<String>, Vec<Box<RawValue>>) = after
                .into_iter()
                .filter(|(c, _)| !p.table.key.contains(c))
                .unzip();
            if columns.is_empty() {
                return Ok(true);
            }
            let cols: Vec<&str> = columns.iter().map(String::as_str).collect();
            let key: Vec<&str> = p.table.key.iter().map(String::as_str).collect();
            let text = sql::update(schema, table, &cols, &key);
            columns.extend(p.table.key.iter().cloned());
            values.extend(p.key_values.iter().cloned());
            ("lww_update", "updating a row", columns, values, text)
        } else {
            let (mut columns, mut values): (Vec<String>, Vec<Box<RawValue>>) =
                after.into_iter().unzip();
            for (k, v) in p.table.key.iter().zip(&p.key_values) {
                if !columns.contains(k) {
                    columns.push(k.clone());
                    values.push(v.clone());
                }
            }
            let cols: Vec<&str> = columns.iter().map(String::as_str).collect();
            let text = sql::insert_if_absent(schema, table, &cols);
            ("lww_insert", "inserting a row", columns, values, text)
        };
        let stmt = self
            .cached(client, p, kind, columns.clone(), || text)
            .await?;
        let json_nulls = &p.change.json_null_after;
        let params =
            match Self::render_params(stmt.params(), &columns, &values, json_nulls, &p.qualified) {
                Ok(params) => params,
                Err(reason) => {
                    self.bad_message(client, message, &reason).await?;
                    return Ok(true);
                }
            };
        let written = client
            .execute_raw(&stmt, params)
            .await
            .map_err(ApplyError::sql(context))?;
        Ok(over_row || written == 1)
    }

    /// Deletes the live row, if any, and records the tombstone with this transaction's
    /// (the remote) version.
    async fn delete(
        &mut self,
        client: &Client,
        p: &Prepared<'_>,
        local: &Local,
    ) -> Result<(), ApplyError> {
        let key = p.key_typed();
        if matches!(local, Local::Row { .. }) {
            let names: Vec<&str> = p.table.key.iter().map(String::as_str).collect();
            let text = sql::delete(&p.change.schema, &p.change.table, &names);
            let stmt = self
                .cached(client, p, "lww_delete", p.table.key.clone(), || text)
                .await?;
            let params = Self::values(stmt.params(), p, &p.table.key, &p.key_values, &[])?;
            client
                .execute_raw(&stmt, params)
                .await
                .map_err(ApplyError::sql("deleting a row"))?;
        }
        let text = sql::upsert_tombstone(&key);
        let stmt = self
            .cached(client, p, "lww_tombstone", p.table.key.clone(), || text)
            .await?;
        Self::execute_then_key(client, &stmt, p, param(p.qualified.clone()))
            .await
            .map_err(ApplyError::sql("recording a tombstone"))
    }

    /// Calls the table's resolver and writes its result. `None`: it returned NULL.
    async fn merge(
        &mut self,
        client: &Client,
        p: &Prepared<'_>,
        probed: &Probed,
        function: &str,
    ) -> Result<Option<()>, ApplyError> {
        let text = sql::call_resolver(function, &p.change.schema, &p.change.table);
        let call = self
            .cached(client, p, "lww_resolver", Vec::new(), || text)
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
        let columns: Vec<String> = p
            .table
            .columns
            .iter()
            .filter(|c| !p.table.key.contains(c))
            .cloned()
            .collect();
        if columns.is_empty() {
            return Ok(Some(()));
        }
        let cols: Vec<&str> = columns.iter().map(String::as_str).collect();
        let key = p.key_typed();
        let text = sql::write_merged(&p.change.schema, &p.change.table, &cols, &key);
        let stmt = self
            .cached(client, p, "lww_merged", Vec::new(), || text)
            .await?;
        Self::execute_then_key(client, &stmt, p, param(merged))
            .await
            .map_err(ApplyError::sql("writing the merged row"))?;
        Ok(Some(()))
    }

    /// Runs a statement whose parameters are `first`, then the key (typed by the statement).
    async fn execute_then_key(
        client: &Client,
        stmt: &Statement,
        p: &Prepared<'_>,
        first: TextParam,
    ) -> Result<(), tokio_postgres::Error> {
        let mut params = vec![first];
        // The key values already rendered for the probe with the same types; cannot fail.
        if let Ok(key) = Self::values(&stmt.params()[1..], p, &p.table.key, &p.key_values, &[]) {
            params.extend(key);
        }
        client.execute_raw(stmt, params).await.map(drop)
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
        let known = probed
            .version
            .as_ref()
            .filter(|v| **v != Version::unknown());
        let remote_row = p.remote_row().map(RowImage::to_json_text);
        let params: [&(dyn ToSql + Sync); 10] = [
            &p.qualified,
            &key,
            &kind.as_str(),
            &resolution.as_str(),
            &known.map(|v| v.ts_us),
            &known.map(|v| v.node.clone()),
            &probed.row,
            &p.remote.ts_us,
            &p.remote.node,
            &remote_row,
        ];
        client
            .execute(
                "INSERT INTO pgferry.conflicts (table_name, key, conflict_type, resolution,
                     local_commit_ts, local_node, local_row, remote_commit_ts, remote_node, remote_row)
                 VALUES ($1, $2::text::jsonb, $3, $4,
                     'epoch'::timestamptz + $5::int8 * interval '1 microsecond', $6, $7::text::jsonb,
                     'epoch'::timestamptz + $8::int8 * interval '1 microsecond', $9, $10::text::jsonb)",
                &params,
            )
            .await
            .map_err(ApplyError::sql("logging a conflict"))?;
        if let Some(lww) = &mut self.lww {
            lww.conflicts.push((p.qualified.clone(), kind, resolution));
        }
        tracing::debug!(table = %p.qualified, kind = kind.as_str(), resolution = resolution.as_str(),
                        remote = %p.remote, "conflict");
        Ok(())
    }

    /// The skew rule: before committing a change stamped `origin_ts_us`, waits until the
    /// local database clock has passed it, so that later local writes get later timestamps.
    /// Bounded by `apply.conflict.max_clock_skew`; beyond it, acts as configured.
    pub(super) async fn wait_for_clock(
        &mut self,
        client: &Client,
        origin_ts_us: i64,
    ) -> Result<(), ApplyError> {
        // A backlog's changes are older than a clock reading already taken: skip the query.
        if self
            .lww
            .as_ref()
            .is_some_and(|l| origin_ts_us < l.clock_seen_us)
        {
            return Ok(());
        }
        let conflict = &self.settings.apply.conflict;
        let (bound, action) = (conflict.max_clock_skew, conflict.on_clock_skew);
        let started = Instant::now();
        let mut waited = false;
        let mut exceeded = false;
        loop {
            let now = database_clock_us(client)
                .await
                .map_err(ApplyError::sql("reading the database clock"))?;
            if let Some(lww) = &mut self.lww {
                lww.clock_seen_us = lww.clock_seen_us.max(now);
            }
            if now > origin_ts_us {
                break;
            }
            let ahead = Duration::from_micros((origin_ts_us - now + 1).unsigned_abs());
            waited = true;
            let elapsed = started.elapsed();
            if !exceeded && elapsed + ahead > bound {
                exceeded = true;
                self.metrics.clock_skew_exceeded.inc();
                tracing::warn!(node = %self.settings.node, ahead_ms = ahead.as_millis() as u64,
                               max_clock_skew_ms = bound.as_millis() as u64, ?action,
                               "origin commit time is ahead of the local clock by more than apply.conflict.max_clock_skew");
            }
            let nap = if exceeded && action == ClockSkewAction::Apply {
                let left = bound.saturating_sub(elapsed);
                if left.is_zero() {
                    break;
                }
                left.min(ahead)
            } else {
                ahead
            };
            self.health.beat();
            tokio::time::sleep(nap).await;
        }
        if waited {
            self.metrics.clock_skew_waits.inc();
            self.metrics
                .clock_skew_wait_seconds
                .observe(started.elapsed().as_secs_f64());
        }
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

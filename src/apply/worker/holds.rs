//! Replica mode: rows behind their dead letters, the worker's side ([`crate::apply::holds`]
//! has the rules). The worker keeps the keys of its node's unresolved letters on the target,
//! read from `pgferry.dead_letters` (again after a rollback, and when an operator's replay or
//! resolve changed them) and kept up to date as it records and supersedes letters in its own
//! transactions.

use tokio_postgres::Client;

use super::{InFlight, RecordRef, Worker};
use crate::apply::dead_letters::{self, StoredDeadLetter};
use crate::apply::error::ApplyError;
use crate::apply::holds::{self, Held, Key};
use crate::apply::sql::is_safe_type_name;
use crate::apply::stream::{parse_framed, ChangeItem, RowsItem, StreamItem};
use crate::apply::target::TargetTable;
use crate::event::Op;
use crate::value::{builtin, PgType};

/// The node's unresolved apply letters that hold a record: how many, and the sum of their
/// ids (which changes when an operator replays or resolves one).
const LETTERS_SEEN: &str = "SELECT count(*), coalesce(sum(id), 0)::int8 FROM pgferry.dead_letters
     WHERE source_node = $1 AND resolved_at IS NULL AND stage = 'apply' AND payload IS NOT NULL";

const LETTERS: &str = "SELECT id, payload FROM pgferry.dead_letters
     WHERE source_node = $1 AND resolved_at IS NULL AND stage = 'apply' AND payload IS NOT NULL
     ORDER BY id";

impl Worker {
    /// Reads which rows are behind letters, unless the letters are as last read (`force`:
    /// read anyway, after a rollback undid what the worker noted). Multi-master holds nothing.
    pub(super) async fn read_held(
        &mut self,
        client: &Client,
        force: bool,
    ) -> Result<(), ApplyError> {
        if self.lww.is_some() {
            return Ok(());
        }
        let node = &self.settings.node;
        let seen = client
            .query_one(LETTERS_SEEN, &[node])
            .await
            .map_err(ApplyError::sql("reading pgferry.dead_letters"))?;
        let seen: (i64, i64) = (seen.get(0), seen.get(1));
        if !force && self.held_seen == Some(seen) {
            return Ok(());
        }
        let mut held = Held::default();
        if seen.0 > 0 {
            let rows = client
                .query(LETTERS, &[node])
                .await
                .map_err(ApplyError::sql("reading pgferry.dead_letters"))?;
            for row in rows {
                let (id, payload): (i64, String) = (row.get(0), row.get(1));
                held.add_letter(id, self.letter_keys(client, payload.as_bytes()).await?);
            }
        }
        self.held = held;
        self.held_seen = Some(seen);
        Ok(())
    }

    /// Notes letter `id`, just recorded with `payload`, in [`Worker::held`].
    pub(super) async fn hold_letter(
        &mut self,
        client: &Client,
        id: i64,
        payload: &str,
    ) -> Result<(), ApplyError> {
        if self.lww.is_some() {
            return Ok(());
        }
        let keys = self.letter_keys(client, payload.as_bytes()).await?;
        self.held.add_letter(id, keys);
        self.held_seen = self.held_seen.map(|(n, sum)| (n + 1, sum + id));
        Ok(())
    }

    /// The rows a letter's record writes: `(schema.table, key)` for each; none for a record
    /// that does not parse, a schema change, or a table the target lacks.
    pub(super) async fn letter_keys(
        &mut self,
        client: &Client,
        payload: &[u8],
    ) -> Result<Vec<(String, Key)>, ApplyError> {
        let Ok((_, item)) = parse_framed(Some(payload)) else {
            return Ok(Vec::new());
        };
        let (schema, name) = match &item {
            StreamItem::Change(change) => (change.schema.clone(), change.table.clone()),
            StreamItem::Rows(rows) => (rows.schema.clone(), rows.table.clone()),
            _ => return Ok(Vec::new()),
        };
        let qualified = format!("{schema}.{name}");
        let Some(table) = self
            .table(client, &qualified, (&schema, &name), false)
            .await?
        else {
            return Ok(Vec::new());
        };
        let keys = match &item {
            StreamItem::Change(change) => self.change_keys(client, &table, change).await?,
            StreamItem::Rows(rows) => self
                .rows_keys(client, &table, rows)
                .await?
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        Ok(keys.into_iter().map(|k| (qualified.clone(), k)).collect())
    }

    /// The keys `change` writes in `table` ([`holds::change_keys`]), as compared.
    async fn change_keys(
        &mut self,
        client: &Client,
        table: &TargetTable,
        change: &ChangeItem,
    ) -> Result<Vec<Key>, ApplyError> {
        let key: Vec<&str> = table.key.iter().map(String::as_str).collect();
        let kinds = self.key_kinds(client, table).await?;
        spelled(client, table, holds::change_keys(change, &key, &kinds)).await
    }

    /// The keys of snapshot `rows` of `table` ([`holds::rows_keys`]), as compared; `None`
    /// when a key column is not among the rows' columns.
    async fn rows_keys(
        &mut self,
        client: &Client,
        table: &TargetTable,
        rows: &RowsItem,
    ) -> Result<Option<Vec<Key>>, ApplyError> {
        let key: Vec<&str> = table.key.iter().map(String::as_str).collect();
        match holds::rows_keys(rows, &key) {
            Some(keys) => spelled(client, table, keys).await.map(Some),
            None => Ok(None),
        }
    }

    /// The first unresolved letter before `letter` of a row `letter` writes.
    pub(super) async fn first_behind(
        &mut self,
        client: &Client,
        letter: &StoredDeadLetter,
    ) -> Result<Option<i64>, ApplyError> {
        let Some(payload) = &letter.payload else {
            return Ok(None);
        };
        let keys = self.letter_keys(client, payload.as_bytes()).await?;
        Ok(keys
            .iter()
            .filter_map(|(table, key)| self.held.first(table, key, Some(letter.id)))
            .min())
    }

    /// A change of `source_table` (as its letters name it) whose table has rows behind
    /// letters: one that sets its row whole or deletes it (or truncates the table) resolves
    /// their letters as superseded, in the open transaction; an update that depends on the
    /// row before it is dead-lettered behind them. True when it was.
    pub(super) async fn behind_letters(
        &mut self,
        client: &Client,
        pending: &mut InFlight<'_>,
        message: &RecordRef<'_>,
        source_table: &str,
        table: &TargetTable,
        change: &ChangeItem,
    ) -> Result<bool, ApplyError> {
        self.settle(pending).await?;
        // Replaying a letter: only letters before it are behind it.
        let below = self.replaying;
        if change.op == Op::Truncate {
            let ids = self.held.take_table(source_table, below);
            self.supersede(client, message, ids, "its table was truncated later")
                .await?;
            return Ok(false);
        }
        let keys = self.change_keys(client, table, change).await?;
        let Some(first) = keys
            .iter()
            .filter_map(|k| self.held.first(source_table, k, below))
            .min()
        else {
            return Ok(false);
        };
        // A letter that moved its row to another key is superseded by nothing of one key.
        let behind_move = keys
            .iter()
            .any(|k| self.held.behind_move(source_table, k, below));
        if !holds::sets_whole_row(change) || behind_move {
            if below.is_some() {
                return Ok(false);
            }
            let why = if behind_move {
                "a letter before it moved the row to another key"
            } else {
                "this update leaves a TOASTed value unsent"
            };
            let reason = format!(
                "held behind dead letter #{first} of the same row of {source_table}: {why}, \
                 so it applies only after that letter (`pgferry dead-letters replay` applies \
                 them in order)"
            );
            self.bad_message(client, message, &reason).await?;
            return Ok(true);
        }
        let ids: Vec<i64> = keys
            .iter()
            .flat_map(|k| self.held.take(source_table, k, below))
            .collect();
        self.supersede(
            client,
            message,
            ids,
            "a later change set its row or deleted it",
        )
        .await?;
        Ok(false)
    }

    /// Snapshot rows of a table with rows behind letters: each row resolves its key's letters
    /// as superseded (it is the row as the source had it after them), but one behind a letter
    /// that moved its row to another key, which is held. Returns the places (0 for the first)
    /// of the rows to hold.
    pub(super) async fn rows_behind_letters(
        &mut self,
        client: &Client,
        pending: &mut InFlight<'_>,
        message: &RecordRef<'_>,
        source_table: &str,
        table: &TargetTable,
        rows: &RowsItem,
    ) -> Result<Vec<usize>, ApplyError> {
        self.settle(pending).await?;
        let Some(keys) = self.rows_keys(client, table, rows).await? else {
            return Ok(Vec::new());
        };
        let below = self.replaying;
        let mut held = Vec::new();
        let mut ids = Vec::new();
        for (at, k) in keys.iter().enumerate() {
            if self.held.behind_move(source_table, k, below) {
                if below.is_none() {
                    held.push(at);
                }
            } else {
                ids.extend(self.held.take(source_table, k, below));
            }
        }
        self.supersede(client, message, ids, "a later snapshot row set its row")
            .await?;
        Ok(held)
    }

    /// Dead-letters the rows of `rows` at `held` (places, 0 for the first) behind the letters
    /// of their keys, each alone (a `rows` item of one row, replayable), and leaves the rest.
    pub(super) async fn hold_rows(
        &mut self,
        client: &Client,
        message: &RecordRef<'_>,
        rows: &mut RowsItem,
        held: &[usize],
    ) -> Result<(), ApplyError> {
        let reason = format!(
            "held behind a dead letter of the same row of {}.{}: a letter before it moved the \
             row to another key, so it applies only after that letter (`pgferry dead-letters \
             replay` applies them in order)",
            rows.schema, rows.table
        );
        let mut kept = String::new();
        let split: Vec<RowsItem> = rows.split().collect();
        for (at, row) in split.into_iter().enumerate() {
            if !held.contains(&at) {
                kept.push_str(&row.copy);
                continue;
            }
            let payload = row.to_json();
            let one = RecordRef {
                row: message.row.or(u32::try_from(at + 1).ok()),
                payload: Some(payload.as_bytes()),
                ..*message
            };
            self.bad_message(client, &one, &reason).await?;
        }
        rows.copy = kept;
        Ok(())
    }

    /// The kinds of `table`'s key columns' types, as apply writes values of them
    /// ([`crate::value::builtin`]; `Unknown` for the rest).
    async fn key_kinds(
        &mut self,
        client: &Client,
        table: &TargetTable,
    ) -> Result<Vec<PgType>, ApplyError> {
        let names: Vec<String> = table
            .key
            .iter()
            .map(|k| {
                table
                    .columns
                    .iter()
                    .position(|c| c == k)
                    .and_then(|at| table.types.get(at).cloned())
                    .unwrap_or_default()
            })
            .collect();
        let unknown: Vec<&String> = names
            .iter()
            .filter(|n| !self.key_kinds.contains_key(*n))
            .collect();
        if !unknown.is_empty() {
            let rows = client
                .query(
                    "SELECT t, to_regtype(t)::oid FROM unnest($1::text[]) AS t",
                    &[&unknown],
                )
                .await
                .map_err(ApplyError::sql("reading the types of a table's key"))?;
            for row in rows {
                let (name, oid): (String, Option<u32>) = (row.get(0), row.get(1));
                let kind = oid.and_then(builtin).unwrap_or(PgType::Unknown);
                self.key_kinds.insert(name, kind);
            }
        }
        Ok(names
            .iter()
            .map(|n| self.key_kinds.get(n).cloned().unwrap_or(PgType::Unknown))
            .collect())
    }

    /// Waits for every statement in flight (the last transaction's COMMIT, then the open
    /// transaction's) before the statements of this module, so that a failure of theirs is
    /// returned as theirs, before this module notes or supersedes letters, and not as its own
    /// query meeting an aborted transaction.
    async fn settle(&mut self, pending: &mut InFlight<'_>) -> Result<(), ApplyError> {
        self.confirm_commit(pending).await?;
        pending
            .drain()
            .await
            .map_err(ApplyError::sql("applying changes"))
    }

    /// Resolves letters `ids` as superseded by `message`, in the open transaction.
    async fn supersede(
        &mut self,
        client: &Client,
        message: &RecordRef<'_>,
        ids: Vec<i64>,
        why: &str,
    ) -> Result<(), ApplyError> {
        if ids.is_empty() {
            return Ok(());
        }
        let resolution = format!(
            "superseded: {why} ({}@{} item {})",
            message.topic, message.offset, message.item
        );
        let resolved = client
            .execute(dead_letters::RESOLVE, &[&ids, &resolution])
            .await
            .map_err(ApplyError::sql("resolving superseded dead letters"))?;
        tracing::info!(node = %self.settings.node, letters = ?ids, %resolution,
                       "dead letters superseded by a later change of their rows");
        self.held_seen = match self.held_seen {
            Some((n, sum)) if resolved == ids.len() as u64 => {
                Some((n - ids.len() as i64, sum - ids.iter().sum::<i64>()))
            }
            _ => None,
        };
        self.letters_pending = true;
        Ok(())
    }
}

/// `keys` with the values of key columns whose type has more than one spelling
/// ([`holds::one_spelling`]) as the target prints them (a value it cannot read stays as it
/// came).
async fn spelled(
    client: &Client,
    table: &TargetTable,
    mut keys: Vec<Key>,
) -> Result<Vec<Key>, ApplyError> {
    if keys.is_empty() {
        return Ok(keys);
    }
    for (j, column) in table.key.iter().enumerate() {
        let Some(at) = table.columns.iter().position(|c| c == column) else {
            continue;
        };
        let Some(type_name) = table.types.get(at) else {
            continue;
        };
        if holds::one_spelling(type_name) || !is_safe_type_name(type_name) {
            continue;
        }
        let values: Vec<Option<String>> =
            keys.iter().map(|k| k.get(j).cloned().flatten()).collect();
        let rows = client
            .query(
                "SELECT coalesce(pgferry.cast_or_null(v, $2), v)
                   FROM unnest($1::text[]) WITH ORDINALITY AS u(v, i) ORDER BY i",
                &[&values, type_name],
            )
            .await
            .map_err(ApplyError::sql(
                "reading key values as the target prints them",
            ))?;
        for (key, row) in keys.iter_mut().zip(rows) {
            if let Some(value) = key.get_mut(j) {
                *value = row.get(0);
            }
        }
    }
    Ok(keys)
}

//! Multi-master: values written under a column's old type. A node that has not yet applied
//! another node's `ALTER COLUMN … TYPE` writes rows under the old type, and they arrive after
//! the change here: `427.77` for a column that is `bigint` now, which the new type's input
//! refuses, or `2026-01-01 10:00+02` for a `timestamp` column, whose input would drop the
//! offset where the `ALTER` converted it. Such a value is converted as the `ALTER` converted
//! the rows it found (`value::old_type::new_type`, the cast it made without `USING`), on this
//! target, before the change is decided and written. The old type is the writer's, from its
//! stream's `relation` record; a value the cast refuses is left as it came, and the write
//! fails as it did before (a dead letter with the server's reason).

use std::collections::HashMap;

use serde_json::value::RawValue;
use serde_json::Value;
use tokio_postgres::Client;

use super::{InFlight, Worker};
use crate::apply::error::ApplyError;
use crate::apply::sql::is_safe_type_name;
use crate::apply::stream::{ChangeItem, RelationItem, WritesColumns};
use crate::apply::target::{self, TargetTable};

/// Column name → type, as a `relation` record gives them.
type ColumnTypes = HashMap<String, String>;

/// What the worker knows of the writers' column types.
#[derive(Debug, Default)]
pub(super) struct Retyping {
    /// `schema.table` → the stream's `relation` records of the table this run read, oldest
    /// first, each with its offset and its columns' types where the stream's node wrote
    /// them (`format_type`): the last describes the changes that follow it. A rollback drops
    /// those at or past the offset the replay starts from ([`Retyping::rewind`]).
    written_as: HashMap<String, Vec<(i64, ColumnTypes)>>,
    /// (written type, target type) → whether they are different types here (a modifier
    /// alone, `numeric(12,2)` against `numeric(10,0)`, is not: the statements' own casts
    /// apply it).
    differ: HashMap<(String, String), bool>,
}

impl Retyping {
    /// Remembers a table's column types as the stream's node describes them from `offset` on.
    pub(super) fn relation(&mut self, offset: i64, relation: &RelationItem) {
        tracing::trace!(table = %format!("{}.{}", relation.schema, relation.table),
                        "the stream's column types");
        let columns = relation
            .columns
            .iter()
            .map(|c| (c.name.clone(), c.type_name.clone()))
            .collect();
        let records = self
            .written_as
            .entry(format!("{}.{}", relation.schema, relation.table))
            .or_default();
        records.retain(|(at, _)| *at < offset);
        records.push((offset, columns));
        // The latest few are enough: a replay goes back to the last commit.
        if records.len() > 8 {
            records.remove(0);
        }
    }

    /// Takes back a record a previous run committed (`pgferry.stream_relations`): the last
    /// before the position this run resumes from, so the changes after it are described by
    /// it until the stream gives a newer one.
    pub(super) fn restore(&mut self, qualified: String, offset: i64, columns: ColumnTypes) {
        self.written_as
            .entry(qualified)
            .or_default()
            .push((offset, columns));
    }

    /// Forgets the records read at or past `offset`, where a replay starts: it reads them
    /// again, and the changes before them are described by the earlier ones.
    pub(super) fn rewind(&mut self, offset: i64) {
        for records in self.written_as.values_mut() {
            records.retain(|(at, _)| *at < offset);
        }
    }

    /// The columns of `change` whose writer's type is known and whose target type is named
    /// otherwise, with both types: the candidates for a conversion. Call after the change's
    /// columns follow the target's renames and drops; `writers_names` gives the name each
    /// renamed column had for its writer (see [`crate::apply::stream::Followed`]); the others
    /// have it still.
    fn candidates(
        &self,
        qualified: &str,
        change: &ChangeItem,
        table: &TargetTable,
        writers_names: &HashMap<String, String>,
    ) -> Vec<(String, String, String)> {
        let Some((_, written_as)) = self.written_as.get(qualified).and_then(|r| r.last()) else {
            return Vec::new();
        };
        let mut found: Vec<(String, String, String)> = Vec::new();
        for column in change.column_names() {
            let writers = written_as.get(writers_names.get(column).unwrap_or(column));
            let (Some(from), Some(to)) = (writers, table.type_of(column)) else {
                continue;
            };
            if from != to
                && convertible(from)
                && convertible(to)
                && !found.iter().any(|(c, _, _)| c == column)
            {
                found.push((column.clone(), from.clone(), to.to_owned()));
            }
        }
        found
    }
}

/// A type whose values travel as one JSON scalar holding their text, and that a cast may
/// take from or give to: not `bytea` (base64), `json`/`jsonb` (the document itself) or an
/// array (a JSON array), and a name safe to put in SQL.
fn convertible(type_name: &str) -> bool {
    !matches!(type_name, "bytea" | "json" | "jsonb")
        && !type_name.ends_with(']')
        && is_safe_type_name(type_name)
}

/// A scalar value's text (`Some(None)`: NULL); `None` for anything else.
fn scalar_text(raw: &RawValue) -> Option<Option<String>> {
    match serde_json::from_str::<Value>(raw.get()).ok()? {
        Value::Null => Some(None),
        Value::String(s) => Some(Some(s)),
        Value::Number(n) => Some(Some(n.to_string())),
        Value::Bool(b) => Some(Some(b.to_string())),
        Value::Array(_) | Value::Object(_) => None,
    }
}

impl Worker {
    /// Remembers a `relation` record's column types (multi-master; replicas convert nothing),
    /// here and in `pgferry.stream_relations` in the open target transaction, so a restarted
    /// worker knows them too ([`Retyping::restore`]).
    pub(super) fn remember_relation<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
        offset: i64,
        relation: &RelationItem,
    ) {
        if self.lww.is_none() {
            return;
        }
        self.retyping.relation(offset, relation);
        let node = self.settings.node.clone();
        let qualified = format!("{}.{}", relation.schema, relation.table);
        let types: serde_json::Map<String, Value> = relation
            .columns
            .iter()
            .map(|c| (c.name.clone(), Value::String(c.type_name.clone())))
            .collect();
        let types = Value::Object(types).to_string();
        pending.send(Box::pin(async move {
            client
                .execute(
                    target::RECORD_STREAM_RELATION,
                    &[&node, &qualified, &offset, &types],
                )
                .await
        }));
    }

    /// Converts the values of `change` written under a column's old type (see the module
    /// docs). Runs statements on the target's open transaction, each conversion under a
    /// savepoint, so a value the cast refuses leaves the transaction as it was.
    pub(super) async fn convert_retyped<'c>(
        &mut self,
        client: &'c Client,
        pending: &mut InFlight<'c>,
        qualified: &str,
        change: &mut ChangeItem,
        table: &TargetTable,
        writers_names: &HashMap<String, String>,
    ) -> Result<(), ApplyError> {
        let candidates = self
            .retyping
            .candidates(qualified, change, table, writers_names);
        if !candidates.is_empty() {
            // The statements in flight first: a failure among them is theirs, not a cast's.
            pending
                .drain()
                .await
                .map_err(ApplyError::sql("applying changes"))?;
        }
        for (column, from, to) in candidates {
            if !self.types_differ(client, &from, &to).await? {
                continue;
            }
            for image in [&mut change.before, &mut change.after]
                .into_iter()
                .flatten()
            {
                for (name, value) in image.iter_mut() {
                    if *name != column {
                        continue;
                    }
                    let Some(Some(text)) = scalar_text(value) else {
                        continue;
                    };
                    if let Some(converted) = cast(client, &text, &from, &to).await? {
                        tracing::debug!(table = %qualified, %column, %from, %to, %text, ?converted,
                                        "a value written under the column's old type, converted");
                        if let Ok(raw) = serde_json::value::to_raw_value(&converted) {
                            *value = raw;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether types `from` and `to` (both [`convertible`]) are different types on the
    /// target; `false` when `from` is unknown there. Cached.
    async fn types_differ(
        &mut self,
        client: &Client,
        from: &str,
        to: &str,
    ) -> Result<bool, ApplyError> {
        let pair = (from.to_owned(), to.to_owned());
        if let Some(differ) = self.retyping.differ.get(&pair) {
            return Ok(*differ);
        }
        let differ: bool = client
            .query_one(
                "SELECT to_regtype($1) IS NOT NULL AND to_regtype($1) IS DISTINCT FROM to_regtype($2)",
                &[&from, &to],
            )
            .await
            .map_err(ApplyError::sql("comparing a column's old and new type"))?
            .get(0);
        self.retyping.differ.insert(pair, differ);
        Ok(differ)
    }
}

/// `text::from::to` on the target, as text: `Some(value)` (inner `None`: NULL), or `None`
/// when the cast refuses it (rolled back to a savepoint).
async fn cast(
    client: &Client,
    text: &str,
    from: &str,
    to: &str,
) -> Result<Option<Option<String>>, ApplyError> {
    const CONVERTING: &str = "converting a value written under a column's old type";
    client
        .batch_execute("SAVEPOINT pgferry_retype")
        .await
        .map_err(ApplyError::sql(CONVERTING))?;
    let query = format!("SELECT $1::text::{from}::{to}::text");
    match client.query_one(&query, &[&text]).await {
        Ok(row) => {
            client
                .batch_execute("RELEASE SAVEPOINT pgferry_retype")
                .await
                .map_err(ApplyError::sql("releasing a savepoint"))?;
            Ok(Some(row.get(0)))
        }
        Err(e) if e.as_db_error().is_some() => {
            client
                .batch_execute(
                    "ROLLBACK TO SAVEPOINT pgferry_retype; RELEASE SAVEPOINT pgferry_retype",
                )
                .await
                .map_err(ApplyError::sql("rolling back to a savepoint"))?;
            tracing::debug!(%from, %to, %text, error = %e, "a value the cast to the column's new type refuses; left as it came");
            Ok(None)
        }
        Err(e) => Err(ApplyError::sql(CONVERTING)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_scalar_types_with_safe_names_convert() {
        for ok in [
            "numeric",
            "bigint",
            "timestamp without time zone",
            "numeric(10,2)",
            "public.mood",
            "character varying(3)",
        ] {
            assert!(convertible(ok), "{ok}");
        }
        for not in [
            "bytea",
            "json",
            "jsonb",
            "integer[]",
            "text[]",
            "int; DROP TABLE x",
            "",
        ] {
            assert!(!convertible(not), "{not}");
        }
    }

    #[test]
    fn a_rewind_forgets_the_records_the_replay_reads_again() {
        let relation = |ty: &str| RelationItem {
            schema: "public".into(),
            table: "t".into(),
            columns: vec![crate::apply::stream::RelationColumn {
                name: "n".into(),
                type_name: ty.into(),
                not_null: false,
                key: false,
            }],
        };
        let mut r = Retyping::default();
        r.relation(10, &relation("numeric"));
        r.relation(20, &relation("bigint"));
        let last = |r: &Retyping| r.written_as["public.t"].last().map(|(_, c)| c["n"].clone());
        assert_eq!(last(&r).as_deref(), Some("bigint"));
        // A replay from 15 reads the record at 20 again; the change at 16 is numeric's.
        r.rewind(15);
        assert_eq!(last(&r).as_deref(), Some("numeric"));
        // Read again at 20 (no duplicate), then a rewind to before both.
        r.relation(20, &relation("bigint"));
        assert_eq!(r.written_as["public.t"].len(), 2);
        r.rewind(5);
        assert_eq!(last(&r), None);
    }

    #[test]
    fn scalar_text_reads_json_scalars_only() {
        let raw = |s: &str| RawValue::from_string(s.to_owned()).unwrap();
        assert_eq!(scalar_text(&raw("\"427.77\"")), Some(Some("427.77".into())));
        assert_eq!(scalar_text(&raw("427.77")), Some(Some("427.77".into())));
        assert_eq!(scalar_text(&raw("true")), Some(Some("true".into())));
        assert_eq!(scalar_text(&raw("null")), Some(None));
        assert_eq!(scalar_text(&raw("[1,2]")), None);
        assert_eq!(scalar_text(&raw("{\"a\":1}")), None);
    }
}

//! Row changes → Kafka records: topic, JSON key, and a Debezium-shaped JSON envelope.
//!
//! Pure. The envelope is
//! `{"op","before","after","source":{node,db,schema,table,lsn,commit_lsn,commit_ts,xid,origin,
//! snapshot},"ts_ms","unchanged_toast"}`.
//!
//! Unchanged TOAST values (`u` in the tuple) are *omitted* from `after` and their column names
//! listed in `unchanged_toast`. A missing column can never be mistaken for NULL, and no
//! placeholder string can collide with real data. Consumers that apply the change must leave
//! those columns as they are.

use serde_json::{Map, Value};

use crate::event::{Op, RelationMeta, RowChange, TxnMeta};
use crate::source::pgoutput::{Datum, Tuple};
use crate::value::{text_to_json, TypeRegistry, ValueError};

/// Names the envelope key that lists unchanged TOAST columns.
pub const UNCHANGED_TOAST_FIELD: &str = "unchanged_toast";

/// One Kafka record, ready to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Destination topic.
    pub topic: String,
    /// JSON key, `None` for tables without a key (and for TRUNCATE).
    pub key: Option<Vec<u8>>,
    /// JSON envelope, `None` for a tombstone.
    pub value: Option<Vec<u8>>,
}

/// A change could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A column value did not convert.
    #[error("{table}.{column}: {source}")]
    Value {
        /// `schema.table`.
        table: String,
        /// Column name.
        column: String,
        /// Why.
        #[source]
        source: ValueError,
    },
    /// A binary-format value arrived although pgferry requests text.
    #[error("{table}.{column}: binary-format value received, but pgferry requests text format")]
    Binary {
        /// `schema.table`.
        table: String,
        /// Column name.
        column: String,
    },
}

/// Fixed facts stamped on every envelope.
#[derive(Debug, Clone)]
pub struct EnvelopeSource {
    /// This node's `node_id`.
    pub node: String,
    /// Source database name.
    pub database: String,
    /// Topic prefix.
    pub topic_prefix: String,
    /// Whether deletes are followed by a tombstone.
    pub tombstones: bool,
}

/// `<prefix>.<schema>.<table>`, with characters Kafka does not allow in topic names replaced
/// by `_` (Debezium does the same). Kafka allows `[a-zA-Z0-9._-]`, at most 249 characters.
pub fn topic_name(prefix: &str, schema: &str, table: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    let mut topic = format!("{}.{}.{}", clean(prefix), clean(schema), clean(table));
    topic.truncate(249);
    topic
}

struct RowJson {
    object: Map<String, Value>,
    unchanged: Vec<String>,
}

/// Renders a tuple as a JSON object. `only_keys` limits it to key columns (for key-only old
/// images, whose other columns the server sends as NULL although they are not).
fn row_json(
    relation: &RelationMeta,
    tuple: &Tuple,
    types: &TypeRegistry,
    only_keys: bool,
) -> Result<RowJson, EncodeError> {
    let mut object = Map::new();
    let mut unchanged = Vec::new();
    for (column, datum) in relation.columns.iter().zip(tuple) {
        if only_keys && !column.is_key {
            continue;
        }
        let value = match datum {
            Datum::Null => Value::Null,
            Datum::UnchangedToast => {
                unchanged.push(column.name.clone());
                continue;
            }
            Datum::Text(bytes) => {
                let ty = types.resolve(column.type_oid);
                let text = String::from_utf8_lossy(bytes);
                text_to_json(&ty, &text).map_err(|source| EncodeError::Value {
                    table: relation.qualified_name(),
                    column: column.name.clone(),
                    source,
                })?
            }
            Datum::Binary(_) => {
                return Err(EncodeError::Binary {
                    table: relation.qualified_name(),
                    column: column.name.clone(),
                })
            }
        };
        object.insert(column.name.clone(), value);
    }
    Ok(RowJson { object, unchanged })
}

/// The key object of a change: key columns from the new image, or from the old image when the
/// new one has none (deletes) or withheld a key column as unchanged TOAST.
fn key_json(change: &RowChange, types: &TypeRegistry) -> Result<Option<Vec<u8>>, EncodeError> {
    let relation = &change.relation;
    if !relation.has_key() || change.op == Op::Truncate {
        return Ok(None);
    }
    let usable = |t: &&Tuple| {
        relation
            .key_indices()
            .all(|i| !matches!(t.get(i), Some(Datum::UnchangedToast) | None))
    };
    let image = change
        .after
        .as_ref()
        .filter(usable)
        .or(change.before.as_ref().filter(usable));
    let Some(image) = image else {
        return Ok(None);
    };
    let row = row_json(relation, image, types, true)?;
    Ok(Some(
        serde_json::to_vec(&Value::Object(row.object)).unwrap_or_default(),
    ))
}

/// Renders one change into its record, plus a tombstone after deletes when configured.
pub fn encode_change(
    source: &EnvelopeSource,
    txn: &TxnMeta,
    change: &RowChange,
    types: &TypeRegistry,
    ts_ms: i64,
) -> Result<Vec<Record>, EncodeError> {
    let relation = &change.relation;
    let before = match &change.before {
        Some(t) => Some(row_json(relation, t, types, change.before_is_key_only)?),
        None => None,
    };
    let after = match &change.after {
        Some(t) => Some(row_json(relation, t, types, false)?),
        None => None,
    };
    let unchanged: Vec<String> = after
        .as_ref()
        .map(|a| a.unchanged.clone())
        .unwrap_or_default();
    let mut envelope = Map::new();
    envelope.insert("op".into(), Value::from(change.op.code()));
    envelope.insert(
        "before".into(),
        before.map_or(Value::Null, |b| Value::Object(b.object)),
    );
    envelope.insert(
        "after".into(),
        after.map_or(Value::Null, |a| Value::Object(a.object)),
    );
    envelope.insert("source".into(), source_block(source, txn, change));
    envelope.insert("ts_ms".into(), Value::from(ts_ms));
    if !unchanged.is_empty() {
        envelope.insert(UNCHANGED_TOAST_FIELD.into(), Value::from(unchanged));
    }
    let topic = topic_name(&source.topic_prefix, &relation.schema, &relation.table);
    let key = key_json(change, types)?;
    // Serializing a Map of Values cannot fail: no non-string keys, no custom Serialize impls.
    let value = serde_json::to_vec(&Value::Object(envelope)).unwrap_or_default();
    let mut records = vec![Record {
        topic: topic.clone(),
        key: key.clone(),
        value: Some(value),
    }];
    if change.op == Op::Delete && source.tombstones && key.is_some() {
        records.push(Record {
            topic,
            key,
            value: None,
        });
    }
    Ok(records)
}

fn source_block(source: &EnvelopeSource, txn: &TxnMeta, change: &RowChange) -> Value {
    let mut s = Map::new();
    s.insert("node".into(), Value::from(source.node.as_str()));
    s.insert("db".into(), Value::from(source.database.as_str()));
    s.insert(
        "schema".into(),
        Value::from(change.relation.schema.as_str()),
    );
    s.insert("table".into(), Value::from(change.relation.table.as_str()));
    s.insert("lsn".into(), Value::from(change.lsn.to_string()));
    s.insert("commit_lsn".into(), Value::from(txn.commit_lsn.to_string()));
    s.insert("commit_ts".into(), Value::from(txn.commit_ts.to_rfc3339()));
    s.insert(
        "commit_ts_us".into(),
        Value::from(txn.commit_ts.unix_micros()),
    );
    s.insert("xid".into(), txn.xid.map_or(Value::Null, Value::from));
    s.insert(
        "origin".into(),
        txn.origin.as_deref().map_or(Value::Null, Value::from),
    );
    s.insert("snapshot".into(), Value::from(change.op == Op::Read));
    Value::Object(s)
}

#[cfg(test)]
mod tests;

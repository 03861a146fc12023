//! Row changes → Kafka records: topic, JSON key, and a Debezium-shaped JSON envelope.
//!
//! Pure. The envelope is
//! `{"op","before","after","source":{node,db,schema,table,lsn,commit_lsn,commit_ts,xid,origin,
//! snapshot,version},"ts_ms","unchanged_toast"}`; `source.version` (`{"t_us","node"}`) only on
//! multi-master nodes, for tables the version store covers.
//!
//! A json/jsonb column holding the JSON literal `null` renders as `null` like SQL NULL does; such
//! columns are listed in `"json_null": {"before": [...], "after": [...]}` so the two stay
//! distinguishable.
//!
//! Unchanged TOAST values (`u` in the tuple) are *omitted* from `after` and their column names
//! listed in `unchanged_toast`. A missing column can never be mistaken for NULL, and no
//! placeholder string can collide with real data. Consumers that apply the change must leave
//! those columns as they are.

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::event::{Op, RelationMeta, RowChange, TxnMeta};
use crate::source::pgoutput::{Datum, Tuple};
use crate::value::{text_to_json, ColumnJson, TypeRegistry, ValueError};

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
    /// The topic must have exactly one partition (the ordered node stream).
    pub single_partition: bool,
}

/// A change could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A column value did not convert.
    #[error("{table}.{column}")]
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
    /// This capture run's id (see [`super::node_stream`]), stamped on node-stream records.
    pub run: u64,
}

/// `<prefix>.<schema>.<table>`, with characters Kafka does not allow in topic names replaced
/// by `_` (Debezium does the same). Kafka allows `[a-zA-Z0-9._-]`, at most 249 characters.
pub fn topic_name(prefix: &str, schema: &str, table: &str) -> String {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    let mut topic = String::with_capacity(prefix.len() + schema.len() + table.len() + 2);
    for (i, part) in [prefix, schema, table].into_iter().enumerate() {
        if i > 0 {
            topic.push('.');
        }
        // Names are usually clean already: copy them whole (this runs for every change).
        if part.chars().all(allowed) {
            topic.push_str(part);
        } else {
            topic.extend(part.chars().map(|c| if allowed(c) { c } else { '_' }));
        }
    }
    // Every character is ASCII now, so any length is a character boundary.
    topic.truncate(249);
    topic
}

/// The per-transaction part of `source`, rendered once per transaction rather than per change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnStamp {
    xid: Option<u32>,
    commit_lsn: String,
    commit_ts: String,
    commit_ts_us: i64,
    origin: Option<String>,
}

impl TxnStamp {
    /// Transaction id (`None` for snapshot reads).
    pub fn xid(&self) -> Option<u32> {
        self.xid
    }

    /// Commit LSN as `X/Y`.
    pub fn commit_lsn(&self) -> &str {
        &self.commit_lsn
    }

    /// Commit time, RFC 3339 with microseconds.
    pub fn commit_ts(&self) -> &str {
        &self.commit_ts
    }

    /// Commit time in microseconds since the Unix epoch.
    pub fn commit_ts_us(&self) -> i64 {
        self.commit_ts_us
    }

    /// Replication origin, if the transaction was applied from elsewhere.
    pub fn origin(&self) -> Option<&str> {
        self.origin.as_deref()
    }

    /// Renders a transaction's fields.
    pub fn new(txn: &TxnMeta) -> Self {
        TxnStamp {
            xid: txn.xid,
            commit_lsn: txn.commit_lsn.to_string(),
            commit_ts: txn.commit_ts.to_rfc3339(),
            commit_ts_us: txn.commit_ts.unix_micros(),
            origin: txn.origin.clone(),
        }
    }
}

/// Names the envelope key that lists json/jsonb columns holding the JSON literal `null`.
pub const JSON_NULL_FIELD: &str = "json_null";

/// A row as an ordered JSON object, borrowing column names from the relation.
struct RowJson<'a> {
    fields: Vec<(&'a str, ColumnJson)>,
    unchanged: Vec<&'a str>,
    /// json/jsonb columns whose value is the JSON literal `null`, which would otherwise be
    /// indistinguishable from SQL NULL in the envelope.
    json_nulls: Vec<&'a str>,
}

impl Serialize for RowJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.fields.len()))?;
        for (name, value) in &self.fields {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

/// Renders a tuple as a JSON object. `only_keys` limits it to key columns (for key-only old
/// images, whose other columns the server sends as NULL although they are not).
fn row_json<'a>(
    relation: &'a RelationMeta,
    tuple: &Tuple,
    types: &TypeRegistry,
    only_keys: bool,
) -> Result<RowJson<'a>, EncodeError> {
    let mut fields = Vec::with_capacity(relation.columns.len());
    let mut unchanged = Vec::new();
    let mut json_nulls = Vec::new();
    for (column, datum) in relation.columns.iter().zip(tuple) {
        if only_keys && !column.is_key {
            continue;
        }
        let value = match datum {
            Datum::Null => ColumnJson::Value(Value::Null),
            Datum::UnchangedToast => {
                unchanged.push(column.name.as_str());
                continue;
            }
            Datum::Text(bytes) => {
                let ty = types.resolve(column.type_oid);
                let value_error = |source| EncodeError::Value {
                    table: relation.qualified_name(),
                    column: column.name.clone(),
                    source,
                };
                // Never lossy: bytes that are not UTF-8 (a database whose encoding is not
                // UTF8) are an error, not replacement characters.
                let text = std::str::from_utf8(bytes).map_err(|_| {
                    value_error(ValueError {
                        ty: "text",
                        reason: "the value is not valid UTF-8 (pgferry needs a UTF8 database)"
                            .into(),
                    })
                })?;
                let value = text_to_json(&ty, text).map_err(value_error)?;
                if value.is_null() {
                    json_nulls.push(column.name.as_str());
                }
                value
            }
            Datum::Binary(_) => {
                return Err(EncodeError::Binary {
                    table: relation.qualified_name(),
                    column: column.name.clone(),
                })
            }
        };
        fields.push((column.name.as_str(), value));
    }
    Ok(RowJson {
        fields,
        unchanged,
        json_nulls,
    })
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
    Ok(Some(to_json(&row)))
}

#[derive(Serialize)]
struct SourceBlock<'a> {
    node: &'a str,
    db: &'a str,
    schema: &'a str,
    table: &'a str,
    lsn: String,
    commit_lsn: &'a str,
    commit_ts: &'a str,
    commit_ts_us: i64,
    xid: Option<u32>,
    origin: Option<&'a str>,
    snapshot: bool,
    /// Multi-master: the row version the change was made with.
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<VersionJson<'a>>,
}

/// `source.version`: `{"t_us": 1700000000000000, "node": "a"}`.
#[derive(Serialize)]
struct VersionJson<'a> {
    t_us: i64,
    node: &'a str,
}

#[derive(Serialize, Clone, Copy)]
struct JsonNulls<'a> {
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    before: &'a [&'a str],
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    after: &'a [&'a str],
}

impl JsonNulls<'_> {
    fn is_empty(&self) -> bool {
        self.before.is_empty() && self.after.is_empty()
    }
}

#[derive(Serialize)]
struct Envelope<'a> {
    op: &'static str,
    before: Option<&'a RawValue>,
    after: Option<&'a RawValue>,
    source: SourceBlock<'a>,
    ts_ms: i64,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    unchanged_toast: &'a [&'a str],
    #[serde(skip_serializing_if = "JsonNulls::is_empty")]
    json_null: JsonNulls<'a>,
}

/// What an applier reads of a change on the node stream (see [`super::node_stream`]): the
/// envelope without its `source` block, which would double the stream's bytes and the
/// applier's parsing for facts its transaction markers already carry.
#[derive(Serialize)]
struct StreamChange<'a> {
    op: &'static str,
    schema: &'a str,
    table: &'a str,
    before: Option<&'a RawValue>,
    after: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<VersionJson<'a>>,
    /// The source commit time, for changes without a version only: a multi-master applier
    /// replaying a dead letter of such a change takes it as the version.
    #[serde(skip_serializing_if = "Option::is_none")]
    commit_ts_us: Option<i64>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    unchanged_toast: &'a [&'a str],
    #[serde(skip_serializing_if = "JsonNulls::is_empty")]
    json_null: JsonNulls<'a>,
}

/// One change rendered for Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedChange {
    /// The per-table record, then a tombstone after deletes when configured.
    pub records: Vec<Record>,
    /// The change as its node-stream item carries it: a JSON object of `op`, `schema`,
    /// `table`, `before`, `after`, then `version` or (without one) `commit_ts_us`, and when
    /// present `unchanged_toast` and `json_null`, with the same row images as the envelope
    /// (rendered once for both).
    pub stream: Vec<u8>,
}

/// Serializes a value made of strings, numbers and maps with string keys, which cannot fail.
fn to_json(value: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// A row image as raw JSON, to place in both the envelope and the node-stream item.
fn raw_row(row: &RowJson<'_>) -> Option<Box<RawValue>> {
    serde_json::value::to_raw_value(row).ok()
}

/// Renders one change into its record, plus a tombstone after deletes when configured.
pub fn encode_change(
    source: &EnvelopeSource,
    txn: &TxnStamp,
    change: &RowChange,
    types: &TypeRegistry,
    ts_ms: i64,
) -> Result<Vec<Record>, EncodeError> {
    encode_change_for_stream(source, txn, change, types, ts_ms).map(|e| e.records)
}

/// [`encode_change`], plus the change as its node-stream item carries it.
pub fn encode_change_for_stream(
    source: &EnvelopeSource,
    txn: &TxnStamp,
    change: &RowChange,
    types: &TypeRegistry,
    ts_ms: i64,
) -> Result<EncodedChange, EncodeError> {
    let relation = &change.relation;
    let before = match &change.before {
        Some(t) => Some(row_json(relation, t, types, change.before_is_key_only)?),
        None => None,
    };
    let after = match &change.after {
        Some(t) => Some(row_json(relation, t, types, false)?),
        None => None,
    };
    let before_raw = before.as_ref().and_then(raw_row);
    let after_raw = after.as_ref().and_then(raw_row);
    let unchanged: Vec<&str> = after
        .as_ref()
        .map(|a| a.unchanged.clone())
        .unwrap_or_default();
    let json_nulls_before: Vec<&str> = before
        .as_ref()
        .map(|b| b.json_nulls.clone())
        .unwrap_or_default();
    let json_nulls_after: Vec<&str> = after
        .as_ref()
        .map(|a| a.json_nulls.clone())
        .unwrap_or_default();
    let version = || {
        change.version.as_ref().map(|v| VersionJson {
            t_us: v.ts_us,
            node: &v.node,
        })
    };
    let json_null = JsonNulls {
        before: &json_nulls_before,
        after: &json_nulls_after,
    };
    let envelope = Envelope {
        op: change.op.code(),
        before: before_raw.as_deref(),
        after: after_raw.as_deref(),
        source: SourceBlock {
            node: &source.node,
            db: &source.database,
            schema: &relation.schema,
            table: &relation.table,
            lsn: change.lsn.to_string(),
            commit_lsn: &txn.commit_lsn,
            commit_ts: &txn.commit_ts,
            commit_ts_us: txn.commit_ts_us,
            xid: txn.xid,
            origin: txn.origin.as_deref(),
            snapshot: change.op == Op::Read,
            version: version(),
        },
        ts_ms,
        unchanged_toast: &unchanged,
        json_null,
    };
    let stream = to_json(&StreamChange {
        op: change.op.code(),
        schema: &relation.schema,
        table: &relation.table,
        before: before_raw.as_deref(),
        after: after_raw.as_deref(),
        version: version(),
        commit_ts_us: change.version.is_none().then_some(txn.commit_ts_us),
        unchanged_toast: &unchanged,
        json_null,
    });
    let topic = topic_name(&source.topic_prefix, &relation.schema, &relation.table);
    let key = key_json(change, types)?;
    let value = to_json(&envelope);
    let mut records = vec![Record {
        topic: topic.clone(),
        key: key.clone(),
        value: Some(value),
        single_partition: false,
    }];
    if change.op == Op::Delete && source.tombstones && key.is_some() {
        records.push(Record {
            topic,
            key,
            value: None,
            single_partition: false,
        });
    }
    Ok(EncodedChange { records, stream })
}

#[cfg(test)]
mod tests;

#[derive(Serialize)]
struct SchemaChangeEnvelope<'a> {
    schema_change: SchemaChange<'a>,
    source: SchemaChangeSource<'a>,
    ts_ms: i64,
}

#[derive(Serialize)]
struct SchemaChange<'a> {
    /// The changes, as targets apply them.
    ops: &'a [crate::ddl::DdlOp],
    /// The table's columns after the change.
    columns: &'a [crate::ddl::DdlColumn],
}

#[derive(Serialize)]
struct SchemaChangeSource<'a> {
    node: &'a str,
    db: &'a str,
    schema: &'a str,
    table: &'a str,
    commit_lsn: &'a str,
    commit_ts: &'a str,
    xid: Option<u32>,
}

/// The schema-change record on a table's topic, written at the DDL's place among the table's
/// changes: key `null`, value `{"schema_change":{"ops":[...],"columns":[...]},"source":{...},
/// "ts_ms"}`. It has no `op` field, so Debezium-style consumers that dispatch on `op` skip it.
pub fn schema_change_record(
    source: &EnvelopeSource,
    txn: &TxnStamp,
    schema: &str,
    table: &str,
    ops: &[crate::ddl::DdlOp],
    columns: &[crate::ddl::DdlColumn],
    now_ms: i64,
) -> Record {
    let envelope = SchemaChangeEnvelope {
        schema_change: SchemaChange { ops, columns },
        source: SchemaChangeSource {
            node: &source.node,
            db: &source.database,
            schema,
            table,
            commit_lsn: txn.commit_lsn(),
            commit_ts: txn.commit_ts(),
            xid: txn.xid(),
        },
        ts_ms: now_ms,
    };
    Record {
        topic: topic_name(&source.topic_prefix, schema, table),
        key: None,
        value: Some(serde_json::to_vec(&envelope).unwrap_or_default()),
        single_partition: false,
    }
}

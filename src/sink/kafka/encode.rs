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

use std::io::Write as _;

use serde::Serialize;

use crate::event::{Op, RelationMeta, RowChange, TxnMeta, Version};
use crate::source::pgoutput::{Datum, Tuple};
use crate::value::{push_json_str, write_json, TypeRegistry, ValueError};

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

/// A row image rendered once as a JSON object, placed as-is in both the envelope and the
/// node-stream item.
struct RowJson<'a> {
    /// `{"column":value,...}`, in column order.
    text: Vec<u8>,
    unchanged: Vec<&'a str>,
    /// json/jsonb columns whose value is the JSON literal `null`, which would otherwise be
    /// indistinguishable from SQL NULL in the envelope.
    json_nulls: Vec<&'a str>,
}

/// Renders a tuple as a JSON object. `only_keys` limits it to key columns (for key-only old
/// images, whose other columns the server sends as NULL although they are not).
fn row_json<'a>(
    relation: &'a RelationMeta,
    tuple: &Tuple,
    types: &TypeRegistry,
    only_keys: bool,
) -> Result<RowJson<'a>, EncodeError> {
    let mut text = Vec::with_capacity(2 + 32 * relation.columns.len());
    let mut unchanged = Vec::new();
    let mut json_nulls = Vec::new();
    text.push(b'{');
    for (column, datum) in relation.columns.iter().zip(tuple) {
        if only_keys && !column.is_key {
            continue;
        }
        let value = match datum {
            Datum::UnchangedToast => {
                unchanged.push(column.name.as_str());
                continue;
            }
            Datum::Binary(_) => {
                return Err(EncodeError::Binary {
                    table: relation.qualified_name(),
                    column: column.name.clone(),
                })
            }
            Datum::Null => None,
            Datum::Text(bytes) => Some(bytes),
        };
        if text.len() > 1 {
            text.push(b',');
        }
        push_json_str(&mut text, &column.name);
        text.push(b':');
        let Some(bytes) = value else {
            text.extend_from_slice(b"null");
            continue;
        };
        let value_error = |source| EncodeError::Value {
            table: relation.qualified_name(),
            column: column.name.clone(),
            source,
        };
        // Never lossy: bytes that are not UTF-8 (a database whose encoding is not UTF8) are
        // an error, not replacement characters.
        let value = std::str::from_utf8(bytes).map_err(|_| {
            value_error(ValueError {
                ty: "text",
                reason: "the value is not valid UTF-8 (pgferry needs a UTF8 database)".into(),
            })
        })?;
        if write_json(&types.resolve(column.type_oid), value, &mut text).map_err(value_error)? {
            json_nulls.push(column.name.as_str());
        }
    }
    text.push(b'}');
    Ok(RowJson {
        text,
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
    Ok(Some(row_json(relation, image, types, true)?.text))
}

/// A JSON object written field by field, in order. Keys are pgferry's own ASCII names, so
/// they need no escaping; values are escaped or already JSON. Envelopes are written this way,
/// not through `serde`, so the row images rendered once go in as they are.
struct Object<'a> {
    out: &'a mut Vec<u8>,
    empty: bool,
}

impl<'a> Object<'a> {
    fn open(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Object { out, empty: true }
    }

    /// Fields that continue an object written elsewhere (each starts with a comma); not
    /// closed.
    fn resume(out: &'a mut Vec<u8>) -> Self {
        Object { out, empty: false }
    }

    /// Fields written by [`Object::resume`] (nothing, or fields each starting with a comma).
    fn fragment(&mut self, fields: &[u8]) {
        self.empty &= fields.is_empty();
        self.out.extend_from_slice(fields);
    }

    /// Writes `"key":` and returns the output for the value.
    fn key(&mut self, key: &str) -> &mut Vec<u8> {
        if !self.empty {
            self.out.push(b',');
        }
        self.empty = false;
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
        self.out
    }

    fn raw(&mut self, key: &str, json: &[u8]) {
        self.key(key).extend_from_slice(json);
    }

    fn str(&mut self, key: &str, value: &str) {
        push_json_str(self.key(key), value);
    }

    fn opt_str(&mut self, key: &str, value: Option<&str>) {
        match value {
            Some(v) => self.str(key, v),
            None => self.raw(key, b"null"),
        }
    }

    fn int(&mut self, key: &str, value: impl itoa::Integer) {
        self.raw(key, itoa::Buffer::new().format(value).as_bytes());
    }

    fn row(&mut self, key: &str, row: Option<&RowJson<'_>>) {
        self.raw(key, row.map_or(&b"null"[..], |r| &r.text));
    }

    /// `"key":["a","b"]`, left out when empty.
    fn names(&mut self, key: &str, names: &[&str]) {
        if names.is_empty() {
            return;
        }
        let out = self.key(key);
        out.push(b'[');
        for (i, name) in names.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            push_json_str(out, name);
        }
        out.push(b']');
    }

    /// `"version":{"t_us","node"}`, left out without a version.
    fn version(&mut self, version: Option<&Version>) {
        if let Some(v) = version {
            let mut object = Object::open(self.key("version"));
            object.int("t_us", v.ts_us);
            object.str("node", &v.node);
            object.close();
        }
    }

    /// `"json_null":{"before":[..],"after":[..]}`, left out when both are empty.
    fn json_nulls(&mut self, before: Option<&RowJson<'_>>, after: Option<&RowJson<'_>>) {
        let before = before.map_or(&[][..], |r| &r.json_nulls[..]);
        let after = after.map_or(&[][..], |r| &r.json_nulls[..]);
        if before.is_empty() && after.is_empty() {
            return;
        }
        let mut object = Object::open(self.key(JSON_NULL_FIELD));
        object.names("before", before);
        object.names("after", after);
        object.close();
    }

    fn close(self) {
        self.out.push(b'}');
    }
}

/// One change rendered for Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedChange {
    /// The per-table record, then a tombstone after deletes when configured.
    pub records: Vec<Record>,
    /// The change as its node-stream item carries it: a JSON object of `op`, `schema`,
    /// `table`, `before`, `after`, then `version` or (without one) `commit_ts_us`, and when
    /// present `unchanged_toast` and `json_null`, with the same row images as the envelope
    /// (rendered once for both). The applier reads the envelope without its `source` block,
    /// which would double the stream's bytes and its parsing for facts the transaction
    /// markers already carry; `commit_ts_us` lets a multi-master applier replaying a dead
    /// letter of a change without a version take the commit time as its version.
    pub stream: Vec<u8>,
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
    Frame::new(source, txn, &change.relation, change.op).encode(change, types, ts_ms)
}

/// What the envelopes and node-stream items of one table's changes of one kind in one
/// transaction share: the table, op, transaction, and topic. Written once and reused for
/// each such change (a streamed transaction's run of changes to a table, a snapshot chunk's
/// rows), so that each change then costs only its own images, LSN, version and time.
#[derive(Debug, Clone)]
pub struct Frame {
    op: Op,
    /// `,"source":{"node":N,"db":D,"schema":S,"table":T,"lsn":`; the change's LSN follows.
    source_head: Vec<u8>,
    /// `,"commit_lsn":...,"snapshot":B`; the change's version and `}` follow.
    source_tail: Vec<u8>,
    /// `,"schema":S,"table":T`.
    names: Vec<u8>,
    commit_ts_us: i64,
    topic: String,
    tombstones: bool,
}

impl Frame {
    /// The frame of changes of kind `op` to `relation` in transaction `txn`.
    pub fn new(source: &EnvelopeSource, txn: &TxnStamp, relation: &RelationMeta, op: Op) -> Self {
        let mut source_head = Vec::with_capacity(96);
        let mut envelope = Object::resume(&mut source_head);
        let mut object = Object::open(envelope.key("source"));
        object.str("node", &source.node);
        object.str("db", &source.database);
        object.str("schema", &relation.schema);
        object.str("table", &relation.table);
        object.key("lsn");

        let mut source_tail = Vec::with_capacity(192);
        let mut object = Object::resume(&mut source_tail);
        object.str("commit_lsn", &txn.commit_lsn);
        object.str("commit_ts", &txn.commit_ts);
        object.int("commit_ts_us", txn.commit_ts_us);
        match txn.xid {
            Some(xid) => object.int("xid", xid),
            None => object.raw("xid", b"null"),
        }
        object.opt_str("origin", txn.origin.as_deref());
        let snapshot: &[u8] = if op == Op::Read { b"true" } else { b"false" };
        object.raw("snapshot", snapshot);

        let mut names = Vec::with_capacity(16 + relation.schema.len() + relation.table.len());
        let mut item = Object::resume(&mut names);
        item.str("schema", &relation.schema);
        item.str("table", &relation.table);
        Frame {
            op,
            source_head,
            source_tail,
            names,
            commit_ts_us: txn.commit_ts_us,
            topic: topic_name(&source.topic_prefix, &relation.schema, &relation.table),
            tombstones: source.tombstones,
        }
    }

    /// The op of the changes this frame is for.
    pub fn op(&self) -> Op {
        self.op
    }

    /// Renders `change`, which must have the frame's relation and op: its record, a tombstone
    /// after a delete when configured, and its node-stream item. `ts_ms` is the envelope's
    /// processing time.
    pub fn encode(
        &self,
        change: &RowChange,
        types: &TypeRegistry,
        ts_ms: i64,
    ) -> Result<EncodedChange, EncodeError> {
        self.render(change, types, ts_ms, true)
    }

    /// [`Self::encode`] without the node-stream item (`stream` is empty): for a snapshot row
    /// that travels on the node stream in a `rows` item.
    pub fn encode_envelope(
        &self,
        change: &RowChange,
        types: &TypeRegistry,
        ts_ms: i64,
    ) -> Result<EncodedChange, EncodeError> {
        self.render(change, types, ts_ms, false)
    }

    fn render(
        &self,
        change: &RowChange,
        types: &TypeRegistry,
        ts_ms: i64,
        with_item: bool,
    ) -> Result<EncodedChange, EncodeError> {
        debug_assert_eq!(change.op, self.op, "a change encoded in another op's frame");
        let relation = &change.relation;
        let before = match &change.before {
            Some(t) => Some(row_json(relation, t, types, change.before_is_key_only)?),
            None => None,
        };
        let after = match &change.after {
            Some(t) => Some(row_json(relation, t, types, false)?),
            None => None,
        };
        let (before, after) = (before.as_ref(), after.as_ref());
        let unchanged = after.map_or(&[][..], |a| &a.unchanged[..]);
        let rows_len = before.map_or(0, |r| r.text.len()) + after.map_or(0, |r| r.text.len());
        let version = change.version.as_ref();

        let source_len = self.source_head.len() + self.source_tail.len() + 96;
        let mut value = Vec::with_capacity(rows_len + source_len);
        let mut envelope = Object::open(&mut value);
        envelope.str("op", self.op.code());
        envelope.row("before", before);
        envelope.row("after", after);
        envelope.fragment(&self.source_head);
        // `X/Y` needs no escaping; written in place (a Vec takes any write).
        let _ = write!(envelope.out, "\"{}\"", change.lsn);
        envelope.fragment(&self.source_tail);
        let mut object = Object::resume(envelope.out);
        object.version(version);
        object.close();
        envelope.int("ts_ms", ts_ms);
        envelope.names(UNCHANGED_TOAST_FIELD, unchanged);
        envelope.json_nulls(before, after);
        envelope.close();

        let mut stream = Vec::new();
        if with_item {
            self.write_item(&mut stream, before, after, version, unchanged);
        }

        let key = key_json(change, types)?;
        let tombstone =
            (self.op == Op::Delete && self.tombstones && key.is_some()).then(|| Record {
                topic: self.topic.clone(),
                key: key.clone(),
                value: None,
                single_partition: false,
            });
        let mut records = Vec::with_capacity(2);
        records.push(Record {
            topic: self.topic.clone(),
            key,
            value: Some(value),
            single_partition: false,
        });
        records.extend(tombstone);
        Ok(EncodedChange { records, stream })
    }

    /// The node-stream item of a change (see [`EncodedChange::stream`]).
    fn write_item(
        &self,
        stream: &mut Vec<u8>,
        before: Option<&RowJson<'_>>,
        after: Option<&RowJson<'_>>,
        version: Option<&Version>,
        unchanged: &[&str],
    ) {
        let rows_len = before.map_or(0, |r| r.text.len()) + after.map_or(0, |r| r.text.len());
        stream.reserve(rows_len + self.names.len() + 96);
        let mut item = Object::open(stream);
        item.str("op", self.op.code());
        item.fragment(&self.names);
        item.row("before", before);
        item.row("after", after);
        item.version(version);
        if version.is_none() {
            item.int("commit_ts_us", self.commit_ts_us);
        }
        item.names(UNCHANGED_TOAST_FIELD, unchanged);
        item.json_nulls(before, after);
        item.close();
    }
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

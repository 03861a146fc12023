//! The per-node ordered change stream: `<topic_prefix>.__node.<node_id>`, one partition.
//!
//! Per-table topics are what other consumers read, but they cannot tell an applier where a
//! source transaction starts and ends, nor how changes to different tables interleave. This
//! stream carries every change of one node in commit order, framed by transaction markers:
//!
//! ```text
//! {"type":"begin","run","node","xid","commit_lsn","commit_ts","commit_ts_us","origin","snapshot"}
//! {"type":"change","run","op","schema","table","before","after","version"|"commit_ts_us","unchanged_toast"?,"json_null"?}   (repeated)
//! {"type":"commit","run","node","commit_lsn","end_lsn","changes"}
//! {"type":"rows","run","schema","table","names":[…],"copy":"<rows in COPY text format>"}  (repeated)
//! {"type":"relation","run","schema","table","columns":[{"name","type","not_null","key"}]}
//! {"type":"skipped","run","schema","table","lsn","error"}
//! {"type":"ack","run","ack":{"node","applied":{"<node>":"<lsn>",…},"bypassed":["<node>",…]}}
//! ```
//!
//! A `rows` item carries snapshot rows (`op: "r"`) of one table, many to an item, in
//! PostgreSQL's COPY text format (the source's text output of each value, tab-separated,
//! `\N` for NULL) under the column `names`: an applier hands them to `COPY … FROM STDIN` as they
//! are, instead of decoding one JSON item per row. Capture writes them on nodes that are not
//! multi-master (whose appliers need each row's version, so read change items); the per-table
//! topics carry every snapshot row as its own envelope either way.
//!
//! An `ack` record (multi-master only) stands inside its own source transaction, so it sits in
//! the stream after every earlier commit of that node: an applier that has applied it has
//! applied everything the node wrote before it, and learns what the node had applied from
//! every other node. Tombstone collection rests on that (see `apply::multimaster`).
//!
//! A `skipped` record stands, inside its transaction, for a change capture could not publish
//! and dead-lettered (see [`super::dead_letter`]): appliers record it and mark the table
//! diverged, since the target now misses that change.
//!
//! `run` numbers capture runs (a sequence in the source database, so it only grows). When a
//! capture is killed, the broker may still append requests the dead producer had sent after
//! the new run's first records; appliers recognise those late records by their older run and
//! skip them, instead of mixing them into the new run's transactions.
//!
//! One Kafka record carries a *bundle* of these items, one per line (`\n` between items; JSON
//! text never holds a raw newline inside a string, and [`Bundle`] turns any newline between
//! tokens into a space). Capture fills a bundle with one source transaction and sends it at
//! the commit, or earlier when the next item would pass `kafka.max_message_bytes` or
//! [`BUNDLE_BYTES`]; so a commit is always the last item of its record and a begin the first,
//! and an applier's Kafka position (the offset after a commit's record) still falls between
//! transactions. Bundles cut the node stream's record count (and the broker's and both
//! clients' per-record work) from one per change to about one per transaction. A record of
//! one item, as earlier versions wrote, is a bundle of one: appliers read both.
//!
//! A `relation` record (the table's column types as `format_type` prints them) precedes the
//! first change of each table in a capture run, so appliers can create missing tables.
//!
//! The begin marker is emitted lazily with the first change, so transactions that publish
//! nothing (pgferry's own bookkeeping) leave no trace. After a capture crash the stream can
//! hold a begin without its commit, followed by the replay of the same transaction; appliers
//! discard such orphans. Pure: this module only renders bytes.

use std::collections::BTreeMap;

use serde::Serialize;

use super::encode::{topic_name, EncodedChange, EnvelopeSource, Record, TxnStamp};
use crate::lsn::Lsn;

/// `<prefix>.__node.<node_id>`.
pub fn node_stream_topic(prefix: &str, node: &str) -> String {
    topic_name(prefix, "__node", node)
}

#[derive(Serialize)]
struct Begin<'a> {
    r#type: &'static str,
    run: u64,
    node: &'a str,
    xid: Option<u32>,
    commit_lsn: &'a str,
    commit_ts: &'a str,
    commit_ts_us: i64,
    origin: Option<&'a str>,
    snapshot: bool,
}

#[derive(Serialize)]
struct Commit<'a> {
    r#type: &'static str,
    run: u64,
    node: &'a str,
    commit_lsn: &'a str,
    end_lsn: String,
    changes: u64,
}

fn record(source: &EnvelopeSource, value: Vec<u8>) -> Record {
    Record {
        topic: node_stream_topic(&source.topic_prefix, &source.node),
        key: Some(source.node.as_bytes().to_vec()),
        value: Some(value),
        single_partition: true,
    }
}

/// Bytes after which capture sends a bundle even inside a transaction: large transactions
/// travel as several records instead of one that the broker and the applier hold whole.
pub const BUNDLE_BYTES: usize = 256 * 1024;

/// Node-stream items waiting to travel as one record (see the module docs).
#[derive(Debug, Default)]
pub struct Bundle {
    value: Vec<u8>,
    items: usize,
}

impl Bundle {
    /// Whether `item` fits beside what the bundle holds within `limit` bytes (an empty bundle
    /// takes any item: the caller has checked it alone against the limit).
    pub fn fits(&self, item: &Record, limit: usize) -> bool {
        let len = item.value.as_ref().map_or(0, Vec::len);
        self.items == 0 || self.value.len() + 1 + len <= limit.min(BUNDLE_BYTES)
    }

    /// Appends one node-stream item (a record rendered by this module).
    pub fn push(&mut self, item: &Record) {
        let Some(value) = &item.value else { return };
        if self.items > 0 {
            self.value.push(b'\n');
        }
        let start = self.value.len();
        self.value.extend_from_slice(value);
        // Valid JSON holds raw newlines only as whitespace between tokens.
        for b in &mut self.value[start..] {
            if *b == b'\n' {
                *b = b' ';
            }
        }
        self.items += 1;
    }

    /// Items held.
    pub fn len(&self) -> usize {
        self.items
    }

    /// Whether the bundle holds nothing.
    pub fn is_empty(&self) -> bool {
        self.items == 0
    }

    /// The record carrying every item pushed since the last take; `None` when empty.
    pub fn take(&mut self, source: &EnvelopeSource) -> Option<Record> {
        if self.items == 0 {
            return None;
        }
        self.items = 0;
        Some(record(source, std::mem::take(&mut self.value)))
    }
}

/// The items of one node-stream record: its lines (a record written before bundles is one).
pub fn items_of(payload: &[u8]) -> impl Iterator<Item = &[u8]> {
    payload.split(|b| *b == b'\n')
}

/// The marker that opens a transaction.
pub fn begin_record(source: &EnvelopeSource, txn: &TxnStamp, snapshot: bool) -> Record {
    let begin = Begin {
        r#type: "begin",
        run: source.run,
        node: &source.node,
        xid: txn.xid(),
        commit_lsn: txn.commit_lsn(),
        commit_ts: txn.commit_ts(),
        commit_ts_us: txn.commit_ts_us(),
        origin: txn.origin(),
        snapshot,
    };
    record(source, serde_json::to_vec(&begin).unwrap_or_default())
}

/// One change: `{"type":"change","run",…}` followed by the members of the change's stream
/// form ([`EncodedChange::stream`]), without re-encoding them.
pub fn change_record(source: &EnvelopeSource, change: &EncodedChange) -> Record {
    let fields = change.stream.strip_prefix(b"{").unwrap_or(b"}");
    let mut value = Vec::with_capacity(40 + fields.len());
    value.extend_from_slice(b"{\"type\":\"change\",\"run\":");
    value.extend_from_slice(source.run.to_string().as_bytes());
    if fields != b"}" {
        value.push(b',');
    }
    value.extend_from_slice(fields);
    record(source, value)
}

/// A multi-master acknowledgement, `{"type":"ack","run","ack":<content>}`; `content` is the
/// JSON object the node's maintenance emitted (checked to be one).
pub fn ack_record(source: &EnvelopeSource, content: &[u8]) -> Option<Record> {
    let object: &serde_json::value::RawValue = serde_json::from_slice(content).ok()?;
    if !object.get().trim_start().starts_with('{') {
        return None;
    }
    let mut value = Vec::with_capacity(40 + content.len());
    value.extend_from_slice(b"{\"type\":\"ack\",\"run\":");
    value.extend_from_slice(source.run.to_string().as_bytes());
    value.extend_from_slice(b",\"ack\":");
    value.extend_from_slice(object.get().as_bytes());
    value.push(b'}');
    Some(record(source, value))
}

#[derive(Serialize)]
struct After<'a> {
    r#type: &'static str,
    run: u64,
    applied: &'a BTreeMap<String, Lsn>,
}

/// Multi-master: `{"type":"after","run","applied":{node: commit LSN}}`, inside the transaction
/// in which this node applied those nodes' schema changes. A target applies what follows in
/// this stream only once it has applied as much from them (see apply's `AfterItem`).
pub fn after_record(source: &EnvelopeSource, applied: &BTreeMap<String, Lsn>) -> Record {
    let after = After {
        r#type: "after",
        run: source.run,
        applied,
    };
    record(source, serde_json::to_vec(&after).unwrap_or_default())
}

/// One column of a `relation` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ColumnSchema {
    /// Column name.
    pub name: String,
    /// SQL type as `format_type(atttypid, atttypmod)` prints it, e.g. `numeric(12,2)`.
    #[serde(rename = "type")]
    pub type_name: String,
    /// `NOT NULL`.
    pub not_null: bool,
    /// Part of the key (primary key, or replica identity).
    pub key: bool,
}

#[derive(Serialize)]
struct Relation<'a> {
    r#type: &'static str,
    run: u64,
    schema: &'a str,
    table: &'a str,
    columns: &'a [ColumnSchema],
}

/// A table's schema, announced before its first change.
pub fn relation_record(
    source: &EnvelopeSource,
    schema: &str,
    table: &str,
    columns: &[ColumnSchema],
) -> Record {
    let relation = Relation {
        r#type: "relation",
        run: source.run,
        schema,
        table,
        columns,
    };
    record(source, serde_json::to_vec(&relation).unwrap_or_default())
}

#[derive(Serialize)]
struct Skipped<'a> {
    r#type: &'static str,
    run: u64,
    schema: &'a str,
    table: &'a str,
    lsn: String,
    error: &'a str,
}

/// Stands for a change capture dead-lettered instead of publishing.
pub fn skipped_record(
    source: &EnvelopeSource,
    schema: &str,
    table: &str,
    lsn: Lsn,
    error: &str,
) -> Record {
    let skipped = Skipped {
        r#type: "skipped",
        run: source.run,
        schema,
        table,
        lsn: lsn.to_string(),
        error,
    };
    record(source, serde_json::to_vec(&skipped).unwrap_or_default())
}

/// The start of a `rows` item for `names` of one table, up to the opening quote of its `copy`
/// string: [`rows_record`] appends the rows (escaped by
/// [`crate::value::copy_text::push_row_json`]) and the closing `"}`.
pub fn rows_head(source: &EnvelopeSource, schema: &str, table: &str, names: &[&str]) -> Vec<u8> {
    #[derive(Serialize)]
    struct Head<'a> {
        r#type: &'static str,
        run: u64,
        schema: &'a str,
        table: &'a str,
        names: &'a [&'a str],
    }
    let head = Head {
        r#type: "rows",
        run: source.run,
        schema,
        table,
        names,
    };
    let mut value = serde_json::to_vec(&head).unwrap_or_default();
    value.pop(); // the closing brace
    value.extend_from_slice(b",\"copy\":\"");
    value
}

/// Bytes a `rows` item adds to its head and rows.
pub const ROWS_TAIL_BYTES: usize = 2;

/// The end of a `rows` item: the JSON string's close, the range it prunes (see
/// [`crate::event::PruneRange`]) and the object's close.
pub fn rows_tail(prune: Option<&crate::event::PruneRange>) -> Vec<u8> {
    let mut tail = b"\"".to_vec();
    if let Some(prune) = prune {
        tail.extend_from_slice(b",\"prune\":");
        tail.extend(serde_json::to_vec(prune).unwrap_or_default());
    }
    tail.push(b'}');
    tail
}

/// A `rows` item: snapshot rows of one table in COPY's text format, one item for many rows
/// (see the module docs). `rows` is the inside of the JSON string; `tail` is
/// [`rows_tail`]'s (`None`: without a range).
pub fn rows_record(
    source: &EnvelopeSource,
    head: &[u8],
    rows: &[u8],
    tail: Option<&[u8]>,
) -> Record {
    let tail = tail.unwrap_or(b"\"}");
    let mut value = Vec::with_capacity(head.len() + rows.len() + tail.len());
    value.extend_from_slice(head);
    value.extend_from_slice(rows);
    value.extend_from_slice(tail);
    record(source, value)
}

/// The marker that closes a transaction after `changes` change records.
pub fn commit_record(
    source: &EnvelopeSource,
    txn: &TxnStamp,
    end_lsn: Lsn,
    changes: u64,
) -> Record {
    let commit = Commit {
        r#type: "commit",
        run: source.run,
        node: &source.node,
        commit_lsn: txn.commit_lsn(),
        end_lsn: end_lsn.to_string(),
        changes,
    };
    record(source, serde_json::to_vec(&commit).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::TxnMeta;
    use crate::pgtime::PgTimestamp;
    use serde_json::{json, Value};

    fn src() -> EnvelopeSource {
        EnvelopeSource {
            node: "node-a".into(),
            database: "db".into(),
            topic_prefix: "p".into(),
            tombstones: true,
            run: 4,
        }
    }

    fn item(json: &str) -> Record {
        record(&src(), json.as_bytes().to_vec())
    }

    #[test]
    fn bundles_hold_items_one_per_line_within_the_limit() {
        let mut bundle = Bundle::default();
        assert!(bundle.take(&src()).is_none());
        let items = [
            r#"{"type":"begin"}"#,
            "{\"type\":\n\"ack\"}",
            r#"{"type":"commit"}"#,
        ];
        for i in items {
            assert!(bundle.fits(&item(i), 1000));
            bundle.push(&item(i));
        }
        assert_eq!(bundle.len(), 3);
        // The next item would pass a limit the bundle is close to.
        assert!(!bundle.fits(&item(r#"{"type":"x"}"#), 50));
        let record = bundle.take(&src()).unwrap();
        assert!(bundle.is_empty());
        assert_eq!(record.topic, "p.__node.node-a");
        assert!(record.single_partition);
        let read: Vec<Value> = items_of(record.value.as_ref().unwrap())
            .map(|line| serde_json::from_slice(line).unwrap())
            .collect();
        assert_eq!(
            read,
            [
                json!({"type": "begin"}),
                json!({"type": "ack"}),
                json!({"type": "commit"})
            ]
        );
        // An empty bundle takes an item whatever its size; the caller checks it alone.
        assert!(bundle.fits(&item(r#"{"type":"large"}"#), 1));
        // A record of one item, as earlier versions wrote, reads as itself.
        assert_eq!(items_of(br#"{"a":1}"#).collect::<Vec<_>>(), [br#"{"a":1}"#]);
    }

    proptest::proptest! {
        /// Whatever JSON the items hold (newlines in strings, pretty-printed whitespace), a
        /// bundle gives back each item, in order, as the same value.
        #[test]
        fn bundles_give_back_their_items(
            texts in proptest::collection::vec(proptest::collection::vec("[a\n\r\"\\\\ {}]{0,8}", 0..4), 1..12),
            limit in 16usize..400,
        ) {
            let values: Vec<Value> = texts.iter().map(|t| json!({"type": "change", "t": t})).collect();
            let mut bundle = Bundle::default();
            let mut read = Vec::new();
            let drain = |record: Option<Record>, read: &mut Vec<Value>| {
                if let Some(record) = record {
                    let value = record.value.as_ref().unwrap();
                    let lines: Vec<&[u8]> = items_of(value).collect();
                    // Only an item alone may pass the limit.
                    assert!(lines.len() == 1 || value.len() <= limit, "{} bytes", value.len());
                    for line in lines {
                        read.push(serde_json::from_slice(line).unwrap());
                    }
                }
            };
            for v in &values {
                let rendered = item(&serde_json::to_string_pretty(v).unwrap());
                if !bundle.fits(&rendered, limit) {
                    drain(bundle.take(&src()), &mut read);
                }
                bundle.push(&rendered);
            }
            drain(bundle.take(&src()), &mut read);
            proptest::prop_assert_eq!(read, values);
        }
    }

    #[test]
    fn markers_and_wrapped_change_are_json() {
        let txn = TxnStamp::new(&TxnMeta {
            xid: Some(7),
            commit_lsn: Lsn(0x20),
            commit_ts: PgTimestamp(0),
            origin: None,
        });
        let b = begin_record(&src(), &txn, false);
        assert_eq!(b.topic, "p.__node.node-a");
        assert!(b.single_partition);
        let v: Value = serde_json::from_slice(b.value.as_ref().unwrap()).unwrap();
        assert_eq!(v["type"], "begin");
        assert_eq!(v["commit_lsn"], "0/20");
        let change = EncodedChange {
            records: Vec::new(),
            stream: br#"{"op":"c","after":{"id":1}}"#.to_vec(),
        };
        let c: Value =
            serde_json::from_slice(change_record(&src(), &change).value.as_ref().unwrap()).unwrap();
        assert_eq!(
            c,
            json!({"type": "change", "run": 4, "op": "c", "after": {"id": 1}})
        );
        let e: Value = serde_json::from_slice(
            commit_record(&src(), &txn, Lsn(0x28), 3)
                .value
                .as_ref()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            e,
            json!({"type": "commit", "run": 4, "node": "node-a", "commit_lsn": "0/20", "end_lsn": "0/28", "changes": 3})
        );
    }
}

#[derive(Serialize)]
struct Ddl<'a> {
    r#type: &'static str,
    run: u64,
    schema: &'a str,
    table: &'a str,
    ops: &'a [crate::ddl::DdlOp],
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    applied: &'a BTreeMap<String, Lsn>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    settings: &'a BTreeMap<String, String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    resnapshot: bool,
}

/// A schema change of one table, applied by targets at its place in the transaction:
/// `{"type":"ddl","run","schema","table","ops":[{"op":"add_column",...},...],"applied":{…},
/// "settings":{…}}`. `schema` and `table` name the table as it was before the change (a
/// rename op gives the new name). `applied` (multi-master; left out when empty) is what the
/// node had applied from each other node when the change ran: a node applies the change only
/// after it has applied as much (see apply's `Worker::apply_ddl`). `settings` are the source
/// session's settings the change ran under ([`crate::ddl::SESSION_SETTINGS`]), which targets
/// run it under too. `"resnapshot": true` (left out when false) says the source re-snapshots
/// the table after the change (its rows got values targets cannot compute, such as a
/// `USING`'s), so a replica may give NULL to values its cast cannot take until then.
pub fn ddl_record(
    source: &EnvelopeSource,
    schema: &str,
    table: &str,
    ops: &[crate::ddl::DdlOp],
    applied: &BTreeMap<String, Lsn>,
    settings: &BTreeMap<String, String>,
    resnapshot: bool,
) -> Record {
    let ddl = Ddl {
        r#type: "ddl",
        run: source.run,
        schema,
        table,
        ops,
        applied,
        settings,
        resnapshot,
    };
    record(source, serde_json::to_vec(&ddl).unwrap_or_default())
}

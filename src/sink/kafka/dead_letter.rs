//! Dead letters: changes that could not be published (capture) or applied (apply), written to
//! the dead-letter topic (`kafka.dead_letter_topic`, default `<topic_prefix>.__dead_letter`)
//! instead of stopping the pipeline. Pure: this module only renders bytes.
//!
//! One JSON object per record, the same shape from both stages:
//!
//! ```text
//! {"stage": "capture"|"apply", "node", "table", "op", "lsn", "commit_lsn",
//!  "topic", "partition", "offset", "item", "row", "target",  (apply: where the item was read and applied)
//!  "key", "error", "payload", "payload_bytes", "row_text"}
//! ```
//!
//! - `item` (apply) is the item's place in its node-stream record, which holds a bundle of
//!   items one per line (see [`super::node_stream`]); 0 for the first. `row` (apply) is a
//!   snapshot row's place in its `rows` item, 1 for the first (an item holds many rows: each
//!   is its own letter, its `payload` a `rows` item of that row alone).
//! - `payload` is the record as text: the per-table envelope (capture) or the node-stream
//!   item (apply), when it fits under `kafka.max_message_bytes`; `payload_bytes` is
//!   its full size either way. `pgferry dead-letters replay` re-applies apply-stage letters
//!   from it.
//! - `row_text` (capture, when the change could not be encoded at all) holds the new row's
//!   columns as PostgreSQL printed them (not-UTF-8 bytes replaced, and flagged by the error).
//! - `key` is the change's JSON key when it could be encoded.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::value::RawValue;

use super::encode::{Record, TxnStamp};
use crate::event::RowChange;
use crate::source::pgoutput::Datum;

/// Room left under `kafka.max_message_bytes` for the dead letter's own fields.
const ENVELOPE_ROOM: usize = 64 * 1024;

/// One dead letter.
#[derive(Debug, Default, Serialize)]
pub struct DeadLetter<'a> {
    /// `capture` or `apply`.
    pub stage: &'static str,
    /// The node whose change this is.
    pub node: &'a str,
    /// `schema.table`.
    pub table: Option<String>,
    /// `c`, `u`, `d`, `r`, `t`.
    pub op: Option<&'static str>,
    /// WAL position of the change (capture).
    pub lsn: Option<String>,
    /// Commit LSN of its source transaction.
    pub commit_lsn: Option<String>,
    /// Kafka topic the record was read from (apply).
    pub topic: Option<&'a str>,
    /// Its partition (apply).
    pub partition: Option<i32>,
    /// Its offset (apply).
    pub offset: Option<i64>,
    /// The item's place in that record (apply), 0 for the first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item: Option<u32>,
    /// The row's place in its `rows` item (apply, a snapshot row), 1 for the first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub row: Option<u32>,
    /// The target database (apply), as `host:port/db`.
    pub target: Option<String>,
    /// The change's JSON key.
    pub key: Option<&'a RawValue>,
    /// Why it could not go on, with every cause.
    pub error: &'a str,
    /// The record, when it fits.
    pub payload: Option<&'a str>,
    /// The record's full size in bytes.
    pub payload_bytes: usize,
    /// The new row as PostgreSQL's text output, when the change could not be encoded.
    pub row_text: Option<BTreeMap<&'a str, Option<String>>>,
}

impl DeadLetter<'_> {
    /// The letter as a record on `topic`, keyed like the change (so letters of one row stay
    /// in order).
    pub fn record(&self, topic: &str) -> Record {
        Record {
            topic: topic.to_owned(),
            key: self.key.map(|k| k.get().as_bytes().to_vec()),
            value: Some(serde_json::to_vec(self).unwrap_or_default()),
            single_partition: false,
        }
    }
}

/// Whether `payload` may ride inside a dead letter under a `max_bytes` record limit.
pub fn fits(payload_len: usize, max_bytes: u32) -> bool {
    payload_len + ENVELOPE_ROOM <= max_bytes as usize
}

/// The dead letter for a change capture could not publish. `encoded` is its per-table record
/// when it could be encoded (it was too large); otherwise its row goes in as text, if it fits.
pub fn capture_letter<'a>(
    node: &'a str,
    txn: &'a TxnStamp,
    change: &'a RowChange,
    encoded: Option<&'a Record>,
    error: &'a str,
    max_bytes: u32,
) -> DeadLetter<'a> {
    let payload = encoded.and_then(|r| r.value.as_deref());
    let payload_bytes = payload.map_or(0, <[u8]>::len);
    let row_text = match (encoded, change.after.as_ref().or(change.before.as_ref())) {
        (None, Some(tuple)) => {
            let row: BTreeMap<&str, Option<String>> = change
                .relation
                .columns
                .iter()
                .zip(tuple)
                .filter_map(|(column, datum)| {
                    let text = match datum {
                        Datum::Null => None,
                        Datum::UnchangedToast => return None,
                        Datum::Text(b) | Datum::Binary(b) => {
                            Some(String::from_utf8_lossy(b).into_owned())
                        }
                    };
                    Some((column.name.as_str(), text))
                })
                .collect();
            let size: usize = row.values().flatten().map(String::len).sum();
            fits(size, max_bytes).then_some(row)
        }
        _ => None,
    };
    DeadLetter {
        stage: "capture",
        node,
        table: Some(change.relation.qualified_name()),
        op: Some(change.op.code()),
        lsn: Some(change.lsn.to_string()),
        commit_lsn: Some(txn.commit_lsn().to_owned()),
        key: encoded
            .and_then(|r| r.key.as_deref())
            .and_then(|k| std::str::from_utf8(k).ok())
            .and_then(|k| serde_json::from_str(k).ok()),
        error,
        payload: payload
            .filter(|p| fits(p.len(), max_bytes))
            .and_then(|p| std::str::from_utf8(p).ok()),
        payload_bytes,
        row_text,
        ..DeadLetter::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_only_when_it_fits() {
        assert!(fits(1000, 1 << 20));
        assert!(!fits(1 << 20, 1 << 20));
        let letter = DeadLetter {
            stage: "apply",
            node: "a",
            table: Some("public.t".into()),
            offset: Some(7),
            error: "boom",
            payload: Some("{\"x\":1}"),
            payload_bytes: 7,
            ..DeadLetter::default()
        };
        let record = letter.record("p.__dead_letter");
        let v: serde_json::Value = serde_json::from_slice(&record.value.unwrap()).unwrap();
        assert_eq!(v["stage"], "apply");
        assert_eq!(v["offset"], 7);
        assert_eq!(v["payload"], "{\"x\":1}");
        assert!(record.key.is_none());
    }
}

//! Domain types that flow from the source to the sinks: relations, transactions, row changes.
//!
//! Owns no behaviour beyond small accessors. Decoding produces these
//! ([`crate::source::assemble`]); the Kafka sink renders them ([`crate::sink::kafka::encode`]).

use std::cmp::Ordering;
use std::fmt;
use std::sync::Arc;

use crate::lsn::Lsn;
use crate::pgtime::PgTimestamp;
use crate::source::pgoutput::{Column, ReplicaIdentity, Tuple};

/// The envelope's `op` letter, as Debezium spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `r`: a row read by the initial snapshot.
    Read,
    /// `c`: INSERT.
    Create,
    /// `u`: UPDATE.
    Update,
    /// `d`: DELETE.
    Delete,
    /// `t`: TRUNCATE.
    Truncate,
}

impl Op {
    /// The single-letter code used in the envelope and in metric labels.
    pub fn code(self) -> &'static str {
        match self {
            Op::Read => "r",
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Truncate => "t",
        }
    }
}

/// A published table as the replication stream describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationMeta {
    /// Relation OID on the source.
    pub oid: u32,
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub table: String,
    /// Replica identity setting.
    pub replica_identity: ReplicaIdentity,
    /// Published columns in tuple order; `is_key` marks the replica identity (the Kafka key).
    pub columns: Vec<Column>,
}

impl RelationMeta {
    /// Indices of the key columns, in column order.
    pub fn key_indices(&self) -> impl Iterator<Item = usize> + '_ {
        self.columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_key)
            .map(|(i, _)| i)
    }

    /// True when the table has a primary key or another replica identity.
    pub fn has_key(&self) -> bool {
        self.columns.iter().any(|c| c.is_key)
    }

    /// The same relation keyed by `columns` instead. pgoutput flags *every* column as identity
    /// under REPLICA IDENTITY FULL; a table that also has a primary key is keyed by that, so the
    /// Kafka key stays the primary key. An empty list leaves the relation as it is.
    pub fn keyed_by(mut self, columns: &[String]) -> RelationMeta {
        if !columns.is_empty() {
            for c in &mut self.columns {
                c.is_key = columns.contains(&c.name);
            }
        }
        self
    }

    /// `schema.table`, for logs and metric labels.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }
}

/// What is known about the source transaction that produced a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnMeta {
    /// Transaction id; `None` for snapshot reads.
    pub xid: Option<u32>,
    /// LSN of the commit record (for snapshot reads: the slot's consistent point).
    pub commit_lsn: Lsn,
    /// Commit timestamp (for snapshot reads: when the snapshot was taken).
    pub commit_ts: PgTimestamp,
    /// Replication origin name when the transaction was applied from elsewhere.
    pub origin: Option<String>,
}

/// One row-level change, or a TRUNCATE of one table.
#[derive(Debug, Clone, PartialEq)]
pub struct RowChange {
    /// What happened.
    pub op: Op,
    /// The table.
    pub relation: Arc<RelationMeta>,
    /// LSN of this change's WAL record.
    pub lsn: Lsn,
    /// Old image: the key only (`before_is_key_only`) or the full row (REPLICA IDENTITY FULL).
    pub before: Option<Tuple>,
    /// True when `before` holds only key columns.
    pub before_is_key_only: bool,
    /// New image.
    pub after: Option<Tuple>,
    /// The row version the change was made with (multi-master nodes: from the version store,
    /// paired by capture); `None` for tables without one.
    pub version: Option<Version>,
}

/// A multi-master row version `(t, node)`, compared in that order: `t` a clock value in
/// microseconds since the Unix epoch (a hybrid clock: never below the previous version of the
/// key plus one), `node` the writing node's id as the tiebreak. Every node compares versions
/// the same way (bytewise node ids), so every node picks the same greatest one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Version {
    /// Clock value, microseconds since the Unix epoch.
    pub ts_us: i64,
    /// Writing node id (empty for a resolver's merge, which outranks both of its inputs by
    /// `ts_us`).
    pub node: String,
}

impl Version {
    /// A version older than any real one: a row whose version is unknown (written before
    /// pgferry prepared the table, with commit timestamps off).
    pub fn unknown() -> Version {
        Version {
            ts_us: i64::MIN,
            node: String::new(),
        }
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.ts_us, self.node.as_bytes()).cmp(&(other.ts_us, other.node.as_bytes()))
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.ts_us, self.node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_by_replaces_the_identity_flags() {
        let col = |name: &str| Column {
            is_key: true,
            name: name.into(),
            type_oid: 23,
            type_modifier: -1,
        };
        let full = RelationMeta {
            oid: 1,
            schema: "s".into(),
            table: "t".into(),
            replica_identity: ReplicaIdentity::Full,
            columns: vec![col("a"), col("id"), col("b")],
        };
        let keyed = full.clone().keyed_by(&["id".to_owned()]);
        assert_eq!(keyed.key_indices().collect::<Vec<_>>(), vec![1]);
        assert_eq!(full.clone().keyed_by(&[]), full);
    }
}

/// A snapshot chunk's key range, published with its rows on the node stream (`prune` of a
/// `rows` item) when a re-snapshot makes targets exact: a target deletes the rows of the
/// range whose key is neither a row of the item nor in `keep`. Items of one chunk split its
/// range at their last rows' keys, so each names the part its rows cover.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PruneRange {
    /// The key columns, in key order.
    pub key: Vec<String>,
    /// Their types, as the source's `format_type` spells them (a target prunes only when its
    /// key columns have the same types: the range is ordered by them).
    pub types: Vec<String>,
    /// How the source orders each ([`crate::sql::COLUMN_ORDER`]: `""` for a type without a
    /// collation, else its collation); a target prunes only when its columns order alike.
    #[serde(default)]
    pub orders: Vec<String>,
    /// Exclusive lower bound, the key's values in text form; `None`: from the first key.
    pub after: Option<Vec<String>>,
    /// Inclusive upper bound; `None`: to the last key.
    pub through: Option<Vec<String>>,
    /// Keys that stay besides the item's rows (see
    /// [`crate::source::reconcile::Closed::keep`]).
    #[serde(default)]
    pub keep: Vec<Vec<String>>,
}

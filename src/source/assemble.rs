//! pgoutput messages → domain events, with the relation cache and transaction context.
//!
//! Pure: the replication loop feeds messages in, and gets [`CaptureEvent`]s out. Decisions that
//! depend on protocol semantics live here, next to the reasoning:
//! - an UPDATE that changes the key becomes a delete of the old key plus a create of the new
//!   one, so that a compacted topic keyed by primary key stays correct (as Debezium does);
//! - rows of pgferry's own schema are never published.

use std::collections::HashMap;
use std::sync::Arc;

use crate::event::{Op, RelationMeta, RowChange, TxnMeta};
use crate::lsn::Lsn;
use crate::source::pgoutput::{Datum, LogicalMessage, OldTuple, Relation, Tuple};

/// Schema that holds pgferry's own bookkeeping tables; never published.
pub use crate::naming::BOOKKEEPING_SCHEMA as INTERNAL_SCHEMA;

/// Prefix of the `pg_logical_emit_message` heartbeats pgferry writes.
pub const HEARTBEAT_PREFIX: &str = "pgferry.heartbeat";

/// Prefix of the transactional messages that mark snapshot chunks (low and high watermarks).
pub const SNAPSHOT_PREFIX: &str = "pgferry.snapshot";

/// Prefix of the transactional messages pgferry's event trigger writes for schema changes.
pub const DDL_PREFIX: &str = "pgferry.ddl";

/// Prefix of the transactional messages that carry a multi-master node's acknowledgements.
pub const ACK_PREFIX: &str = "pgferry.ack";

/// Prefix of the transactional messages a multi-master worker writes where it applied
/// another node's schema change (see apply's `AfterItem`).
pub const AFTER_PREFIX: &str = "pgferry.after";

/// What the capture pipeline acts on.
#[derive(Debug, Clone, PartialEq)]
pub enum CaptureEvent {
    /// A relation was (re)described; the I/O layer may need to resolve its types.
    Relation(Arc<RelationMeta>),
    /// A transaction starts.
    Begin(TxnMeta),
    /// A row change (or truncate) inside the current transaction.
    Change(RowChange),
    /// The current transaction committed; `end_lsn` may be confirmed once it is durable.
    Commit {
        /// LSN just past the commit record.
        end_lsn: Lsn,
    },
    /// A position with nothing to publish (a heartbeat): confirmable once earlier work is.
    Position(Lsn),
    /// A multi-master acknowledgement (a transactional `pgferry.ack` message) inside the
    /// current transaction: its JSON content.
    Ack(bytes::Bytes),
    /// A snapshot watermark (a transactional `pgferry.snapshot` message) inside the current
    /// transaction: its JSON content.
    Watermark(bytes::Bytes),
    /// A schema change (a transactional `pgferry.ddl` message from pgferry's event trigger)
    /// inside the current transaction: its JSON content.
    Ddl(bytes::Bytes),
    /// Where a multi-master worker applied other nodes' schema changes (a transactional
    /// `pgferry.after` message, in pgferry's own transaction): its JSON content.
    After(bytes::Bytes),
}

/// The stream broke a protocol rule; capture must stop rather than guess.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssembleError {
    /// A change referenced a relation that no Relation message described.
    #[error("change for relation oid {0} arrived before its Relation message")]
    UnknownRelation(u32),
    /// A tuple's width did not match the relation.
    #[error("{table}: tuple has {got} columns, relation has {expected}")]
    ColumnCount {
        /// `schema.table`.
        table: String,
        /// Columns in the Relation message.
        expected: usize,
        /// Columns in the tuple.
        got: usize,
    },
    /// A message arrived where the protocol does not allow it.
    #[error("unexpected pgoutput {0} message {1}")]
    Unexpected(&'static str, &'static str),
}

/// Turns a pgoutput message stream into capture events.
#[derive(Debug, Default)]
pub struct Assembler {
    relations: HashMap<u32, Arc<RelationMeta>>,
    in_transaction: bool,
    /// A Begin not yet emitted: held until the next message, because an Origin message may
    /// follow it (in a later batch) and belongs in its `TxnMeta`.
    pending_begin: Option<TxnMeta>,
}

impl Assembler {
    /// Re-keys a cached relation (see [`RelationMeta::keyed_by`]) and returns the new version.
    pub fn rekey(&mut self, oid: u32, key_columns: &[String]) -> Option<Arc<RelationMeta>> {
        let current = self.relations.get(&oid)?;
        let rekeyed = Arc::new(RelationMeta::clone(current).keyed_by(key_columns));
        self.relations.insert(oid, rekeyed.clone());
        Some(rekeyed)
    }

    /// Feeds one message; `lsn` is the WAL position of its record (from the XLogData header).
    pub fn push(
        &mut self,
        msg: LogicalMessage,
        lsn: Lsn,
        out: &mut Vec<CaptureEvent>,
    ) -> Result<(), AssembleError> {
        if !matches!(msg, LogicalMessage::Origin(_)) {
            if let Some(meta) = self.pending_begin.take() {
                out.push(CaptureEvent::Begin(meta));
            }
        }
        match msg {
            LogicalMessage::Begin(b) => {
                self.in_transaction = true;
                self.pending_begin = Some(TxnMeta {
                    xid: Some(b.xid),
                    commit_lsn: b.final_lsn,
                    commit_ts: b.commit_ts,
                    origin: None,
                });
            }
            LogicalMessage::Origin(o) => {
                self.require_transaction("Origin")?;
                // Origin immediately follows Begin, which is still held back.
                match self.pending_begin.as_mut() {
                    Some(meta) => meta.origin = Some(o.name),
                    None => return Err(AssembleError::Unexpected("Origin", "after a change")),
                }
            }
            LogicalMessage::Commit(c) => {
                self.require_transaction("Commit")?;
                self.in_transaction = false;
                out.push(CaptureEvent::Commit { end_lsn: c.end_lsn });
            }
            LogicalMessage::Relation(r) => {
                let meta = Arc::new(relation_meta(r));
                self.relations.insert(meta.oid, meta.clone());
                out.push(CaptureEvent::Relation(meta));
            }
            LogicalMessage::Type(_) => {
                // Type names alone are not enough to render values; the I/O layer resolves
                // every unknown column type from the catalog when it sees the Relation.
            }
            LogicalMessage::Insert(i) => {
                self.require_transaction("Insert")?;
                let relation = self.described(i.relation_oid, &i.new)?;
                emit(out, Op::Create, relation, lsn, None, false, Some(i.new));
            }
            LogicalMessage::Update(u) => {
                self.require_transaction("Update")?;
                let relation = self.described(u.relation_oid, &u.new)?;
                self.update(out, relation, lsn, u.old, u.new)?;
            }
            LogicalMessage::Delete(d) => {
                self.require_transaction("Delete")?;
                let relation = self.described(d.relation_oid, d.old.datums())?;
                let key_only = matches!(d.old, OldTuple::Key(_));
                let before = match d.old {
                    OldTuple::Key(t) | OldTuple::Full(t) => t,
                };
                emit(out, Op::Delete, relation, lsn, Some(before), key_only, None);
            }
            LogicalMessage::Truncate(t) => {
                self.require_transaction("Truncate")?;
                for oid in t.relation_oids {
                    let relation = self
                        .relations
                        .get(&oid)
                        .cloned()
                        .ok_or(AssembleError::UnknownRelation(oid))?;
                    emit(out, Op::Truncate, relation, lsn, None, false, None);
                }
            }
            LogicalMessage::Message(m) => {
                if !m.transactional && m.prefix == HEARTBEAT_PREFIX {
                    out.push(CaptureEvent::Position(m.lsn));
                } else if m.transactional && m.prefix == ACK_PREFIX {
                    self.require_transaction("an ack message")?;
                    out.push(CaptureEvent::Ack(m.content));
                } else if m.transactional && m.prefix == DDL_PREFIX {
                    self.require_transaction("a schema change message")?;
                    out.push(CaptureEvent::Ddl(m.content));
                } else if m.transactional && m.prefix == AFTER_PREFIX {
                    self.require_transaction("an after message")?;
                    out.push(CaptureEvent::After(m.content));
                } else if m.transactional && m.prefix == SNAPSHOT_PREFIX {
                    self.require_transaction("a snapshot watermark")?;
                    out.push(CaptureEvent::Watermark(m.content));
                }
            }
            LogicalMessage::StreamStart { .. }
            | LogicalMessage::StreamStop
            | LogicalMessage::StreamCommit(_)
            | LogicalMessage::StreamAbort(_)
            | LogicalMessage::StreamPrepare(_) => {
                return Err(AssembleError::Unexpected(
                    "streaming",
                    "although streaming was not requested",
                ))
            }
            LogicalMessage::BeginPrepare(_)
            | LogicalMessage::Prepare(_)
            | LogicalMessage::CommitPrepared(_)
            | LogicalMessage::RollbackPrepared(_) => {
                return Err(AssembleError::Unexpected(
                    "two-phase",
                    "although two_phase was not requested",
                ))
            }
        }
        Ok(())
    }

    fn require_transaction(&self, what: &'static str) -> Result<(), AssembleError> {
        if self.in_transaction {
            Ok(())
        } else {
            Err(AssembleError::Unexpected(what, "outside a transaction"))
        }
    }

    /// The relation for a change, checking the tuple width against it.
    fn described(&self, oid: u32, tuple: &Tuple) -> Result<Arc<RelationMeta>, AssembleError> {
        let relation = self
            .relations
            .get(&oid)
            .cloned()
            .ok_or(AssembleError::UnknownRelation(oid))?;
        if tuple.len() != relation.columns.len() {
            return Err(AssembleError::ColumnCount {
                table: relation.qualified_name(),
                expected: relation.columns.len(),
                got: tuple.len(),
            });
        }
        Ok(relation)
    }

    fn update(
        &self,
        out: &mut Vec<CaptureEvent>,
        relation: Arc<RelationMeta>,
        lsn: Lsn,
        old: Option<OldTuple>,
        new: Tuple,
    ) -> Result<(), AssembleError> {
        let Some(old) = old else {
            emit(out, Op::Update, relation, lsn, None, false, Some(new));
            return Ok(());
        };
        if old.datums().len() != relation.columns.len() {
            return Err(AssembleError::ColumnCount {
                table: relation.qualified_name(),
                expected: relation.columns.len(),
                got: old.datums().len(),
            });
        }
        let key_only = matches!(old, OldTuple::Key(_));
        let before = match old {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        };
        // An update to another key that left a TOASTed value out stays one update: that value
        // is in no WAL record of the change, only in the row, which a delete and a create would
        // not carry over (the target's new row got NULL). Capture still publishes it on the
        // table topic as a delete and a create (see `Capture::publish_envelope`).
        let toast_left_out = new.iter().any(|d| matches!(d, Datum::UnchangedToast));
        if key_changed(&relation, &before, &new) && !toast_left_out {
            emit(
                out,
                Op::Delete,
                relation.clone(),
                lsn,
                Some(before),
                key_only,
                None,
            );
            emit(out, Op::Create, relation, lsn, None, false, Some(new));
        } else {
            emit(
                out,
                Op::Update,
                relation,
                lsn,
                Some(before),
                key_only,
                Some(new),
            );
        }
        Ok(())
    }
}

fn emit(
    out: &mut Vec<CaptureEvent>,
    op: Op,
    relation: Arc<RelationMeta>,
    lsn: Lsn,
    before: Option<Tuple>,
    before_is_key_only: bool,
    after: Option<Tuple>,
) {
    // pgferry's own bookkeeping is never published; the version store's changes go on to
    // capture, which pairs each with the row change it versions.
    if relation.schema == INTERNAL_SCHEMA && relation.table != crate::naming::VERSIONS_TABLE {
        return;
    }
    out.push(CaptureEvent::Change(RowChange {
        op,
        relation,
        lsn,
        before,
        before_is_key_only,
        after,
        version: None,
    }));
}

/// Whether an update moves its row to another key (see [`key_changed`]).
pub fn moves_key(change: &RowChange) -> bool {
    change.op == Op::Update
        && match (&change.before, &change.after) {
            (Some(before), Some(after)) => key_changed(&change.relation, before, after),
            _ => false,
        }
}

/// True when any key column differs between the old and new image. An unchanged-TOAST key
/// column in the new image means "same as before".
fn key_changed(relation: &RelationMeta, old: &Tuple, new: &Tuple) -> bool {
    relation.key_indices().any(|i| match (&old[i], &new[i]) {
        (_, Datum::UnchangedToast) => false,
        (a, b) => a != b,
    })
}

fn relation_meta(r: Relation) -> RelationMeta {
    RelationMeta {
        oid: r.oid,
        // The server sends pg_catalog as ""; nothing published lives there, but be faithful.
        schema: if r.namespace.is_empty() {
            "pg_catalog".to_owned()
        } else {
            r.namespace
        },
        table: r.name,
        replica_identity: r.replica_identity,
        columns: r.columns,
    }
}

#[cfg(test)]
mod tests;

//! Why a capture run ended, classified for the supervisor.

use std::time::Duration;

use crate::error::{classify_pg, Classify, ErrorClass};
use crate::lsn::Lsn;
use crate::pg::replication::ReplicationError;
use crate::sink::kafka::producer::SinkError;
use crate::source::assemble::AssembleError;
use crate::source::pgoutput::DecodeError;

/// A capture run failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The replication connection failed.
    #[error("replication connection")]
    Replication(#[from] ReplicationError),
    /// A SQL statement on the source failed.
    #[error("{context}")]
    Sql {
        /// What we were doing.
        context: &'static str,
        /// Why it failed.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A replication message did not decode. Capture stops rather than skip it.
    #[error("cannot decode the replication message at {lsn}")]
    Decode {
        /// WAL position of the message.
        lsn: Lsn,
        /// Why.
        #[source]
        source: DecodeError,
    },
    /// The message stream broke a protocol rule.
    #[error("replication stream at {lsn}")]
    Assemble {
        /// WAL position of the message.
        lsn: Lsn,
        /// Why.
        #[source]
        source: AssembleError,
    },
    /// A change could not be published and `source.on_poison` is `stop`.
    #[error("cannot publish the change to {table} at {lsn}: {error}. Fix the cause, or set source.on_poison: dead_letter to skip such changes into the dead-letter topic")]
    Poison {
        /// WAL position of the change.
        lsn: Lsn,
        /// `schema.table`.
        table: String,
        /// Why, with its causes.
        error: String,
    },
    /// The Kafka sink failed.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The configured slot exists but is not usable by pgferry.
    #[error("replication slot {slot} cannot be used: {detail}")]
    SlotMismatch {
        /// Slot name.
        slot: String,
        /// What is wrong and how to fix it.
        detail: String,
    },
    /// The slot pgferry streamed from no longer exists (`source.on_slot_loss: stop`).
    #[error(
        "replication slot {slot} is missing, but pgferry had completed its snapshot for it and \
         streamed from LSN {reached} on: the slot was dropped, or lost in a failover to a standby \
         that did not have it synchronized. Changes after LSN {reached} that were not yet in Kafka \
         may be lost. To go on, set `source.on_slot_loss: recreate` to re-create the slot with a \
         fresh snapshot (`source.snapshot: initial` re-publishes every row), or restore the slot \
         (fail over to a standby holding a synchronized copy, see `source.failover_slot`)"
    )]
    SlotLost {
        /// Slot name.
        slot: String,
        /// Where its snapshot ended; streaming had reached at least this far.
        reached: Lsn,
    },
    /// The server invalidated the slot (`source.on_slot_loss: stop`).
    #[error(
        "replication slot {slot} was invalidated by the server ({reason}) and cannot be streamed \
         from: changes after LSN {reached} that were not yet in Kafka may be lost. To go on, set \
         `source.on_slot_loss: recreate` to drop and re-create the slot with a fresh snapshot \
         (`source.snapshot: initial` re-publishes every row); to keep it from happening again, \
         raise `max_slot_wal_keep_size` or keep pgferry running"
    )]
    SlotInvalidated {
        /// Slot name.
        slot: String,
        /// The server's reason (`wal_removed`, `rows_removed`, …).
        reason: String,
        /// The slot's last confirmed position (or, if unknown, where its snapshot ended).
        reached: Lsn,
    },
    /// CREATE_REPLICATION_SLOT's answer lacked a column.
    #[error("CREATE_REPLICATION_SLOT returned no {0}")]
    MissingField(&'static str),
    /// Nothing arrived from the server for too long (not even keepalives).
    #[error("no message from the source for {0:?}; reconnecting")]
    SourceSilent(Duration),
    /// A snapshot may not read every row of a table: no `SELECT` on it, or a row-level
    /// security policy that would hide rows from the capture role (snapshot sessions run with
    /// `row_security = off`, so PostgreSQL refuses the read instead of hiding them).
    #[error(
        "the capture role may not read every row of {table}, so its snapshot cannot go on \
             until it may: grant it SELECT on the table, and BYPASSRLS where the table has row-level security \
             (ALTER ROLE … BYPASSRLS; `pgferry roles` prints both); a snapshot never copies only \
             the rows a policy shows, since the stream sends every row's changes"
    )]
    SnapshotUnreadable {
        /// `schema.table`.
        table: String,
        /// The server's refusal.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A table changed under its running snapshot in a way a chunk cannot follow.
    #[error("the snapshot of {table} cannot go on: {detail}")]
    SnapshotTableChanged {
        /// `schema.table`, as planned.
        table: String,
        /// What changed.
        detail: String,
    },
}

impl CaptureError {
    /// Adapter for `map_err` on SQL calls.
    pub fn sql(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> CaptureError {
        move |source| CaptureError::Sql { context, source }
    }

    /// A failed read of `table`'s snapshot rows: [`CaptureError::SnapshotUnreadable`] when
    /// the server refused it for lack of privilege (SQLSTATE 42501), else a SQL error.
    pub fn snapshot_read(table: &str, source: tokio_postgres::Error) -> CaptureError {
        if source.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
            CaptureError::SnapshotUnreadable {
                table: table.to_owned(),
                source,
            }
        } else {
            CaptureError::Sql {
                context: "reading a snapshot chunk",
                source,
            }
        }
    }
}

impl Classify for CaptureError {
    fn class(&self) -> ErrorClass {
        match self {
            CaptureError::Replication(e) => e.class(),
            CaptureError::Sql { source, .. } => classify_pg(source),
            CaptureError::Sink(e) => e.class(),
            CaptureError::SourceSilent(_) | CaptureError::SnapshotTableChanged { .. } => {
                ErrorClass::Transient
            }
            CaptureError::Decode { .. }
            | CaptureError::Assemble { .. }
            | CaptureError::Poison { .. }
            | CaptureError::SlotMismatch { .. }
            | CaptureError::SnapshotUnreadable { .. }
            | CaptureError::SlotLost { .. }
            | CaptureError::SlotInvalidated { .. }
            | CaptureError::MissingField(_) => ErrorClass::Fatal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_loss_is_fatal_and_says_what_to_do() {
        let lost = CaptureError::SlotLost {
            slot: "pgferry_a".into(),
            reached: Lsn(0x1_0000_0010),
        };
        let invalid = CaptureError::SlotInvalidated {
            slot: "pgferry_a".into(),
            reason: "wal_removed".into(),
            reached: Lsn(0x20),
        };
        for (e, lsn) in [(&lost, "1/10"), (&invalid, "0/20")] {
            assert_eq!(e.class(), ErrorClass::Fatal);
            let text = e.to_string();
            assert!(text.contains("pgferry_a"), "{text}");
            assert!(text.contains(&format!("LSN {lsn}")), "{text}");
            assert!(text.contains("on_slot_loss: recreate"), "{text}");
        }
        assert!(invalid.to_string().contains("wal_removed"));
    }
}

//! Why a capture run ended, classified for the supervisor.

use std::time::Duration;

use crate::error::{classify_pg, Classify, ErrorClass};
use crate::lsn::Lsn;
use crate::sink::kafka::producer::SinkError;
use crate::source::assemble::AssembleError;
use crate::source::pgoutput::DecodeError;
use crate::source::replication::ReplicationError;

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
    /// CREATE_REPLICATION_SLOT's answer lacked a column.
    #[error("CREATE_REPLICATION_SLOT returned no {0}")]
    MissingField(&'static str),
    /// Nothing arrived from the server for too long (not even keepalives).
    #[error("no message from the source for {0:?}; reconnecting")]
    SourceSilent(Duration),
}

impl CaptureError {
    /// Adapter for `map_err` on SQL calls.
    pub fn sql(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> CaptureError {
        move |source| CaptureError::Sql { context, source }
    }
}

impl Classify for CaptureError {
    fn class(&self) -> ErrorClass {
        match self {
            CaptureError::Replication(e) => e.class(),
            CaptureError::Sql { source, .. } => classify_pg(source),
            CaptureError::Sink(e) => e.class(),
            CaptureError::SourceSilent(_) => ErrorClass::Transient,
            CaptureError::Decode { .. }
            | CaptureError::Assemble { .. }
            | CaptureError::Poison { .. }
            | CaptureError::SlotMismatch { .. }
            | CaptureError::MissingField(_) => ErrorClass::Fatal,
        }
    }
}

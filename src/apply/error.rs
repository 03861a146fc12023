//! Why an apply worker stopped, classified for the supervisor.

use rdkafka::error::KafkaError;

use crate::error::{classify_kafka, classify_pg, Classify, ErrorClass};

/// An apply run failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A statement on the target failed.
    #[error("{context}")]
    Sql {
        /// What we were doing.
        context: &'static str,
        /// Why.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The consumer or the dead-letter producer failed.
    #[error("Kafka")]
    Kafka(#[source] KafkaError),
    /// A record could not be applied and `apply.on_bad_message` is `stop`.
    #[error("cannot apply the record at {location}: {reason}")]
    BadMessage {
        /// `topic[partition]@offset`.
        location: String,
        /// Why.
        reason: String,
    },
    /// Local writers kept inserting the key a multi-master change was being applied to.
    #[error("local writes to {table} kept racing the apply of one change; retrying")]
    Contention {
        /// `schema.table`.
        table: String,
    },
    /// A change carries a column the target table does not have.
    #[error("column {column} of {table} does not exist on the target: add it there (ALTER TABLE {table} ADD COLUMN ...) and pgferry resumes")]
    ColumnMissing {
        /// `schema.table`.
        table: String,
        /// The missing column.
        column: String,
    },
}

impl ApplyError {
    /// Adapter for `map_err` on SQL calls.
    pub fn sql(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> ApplyError {
        move |source| ApplyError::Sql { context, source }
    }
}

impl Classify for ApplyError {
    fn class(&self) -> ErrorClass {
        match self {
            ApplyError::Sql { source, .. } => classify_pg(source),
            ApplyError::Kafka(e) => classify_kafka(e),
            // The operator adds the column; retrying then succeeds without a restart.
            ApplyError::ColumnMissing { .. } => ErrorClass::Transient,
            ApplyError::BadMessage { .. } => ErrorClass::Fatal,
            ApplyError::Contention { .. } => ErrorClass::Transient,
        }
    }
}

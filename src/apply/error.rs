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
    /// A record could not be applied and `apply.on_poison` is `stop`.
    #[error("cannot apply the record at {location}: {reason}")]
    BadMessage {
        /// `topic[partition]@offset`.
        location: String,
        /// Why.
        reason: String,
    },
    /// The node stream lost records this target has not applied: nothing is skipped; the
    /// worker stays stopped until an operator re-seeds the target.
    #[error("gap in {topic}: {detail}. Changes committed after LSN {commit_lsn} may be missing on this target; \
             pgferry will not skip them. Re-seed the target (copy the tables from the source, then \
             DELETE FROM pgferry.apply_progress WHERE source_node = '{node}' to start over at the stream's \
             oldest record), or restore the topic")]
    Gap {
        /// The source node.
        node: String,
        /// The node-stream topic.
        topic: String,
        /// The stored next offset.
        next_offset: i64,
        /// Commit LSN of the last transaction applied.
        commit_lsn: crate::lsn::Lsn,
        /// What was found.
        detail: String,
    },
    /// The broker holds records past the next offset, but none arrived for a while: the
    /// consumer is stuck (seen after broker crashes); the worker restarts with a new one.
    #[error("no record of {topic} arrived for {idle_secs} s although the broker has offsets up to {high} and the next to read is {next}; restarting the consumer")]
    Stalled {
        /// The node-stream topic.
        topic: String,
        /// The offset the worker waits for.
        next: i64,
        /// The broker's high watermark.
        high: i64,
        /// Seconds without a record.
        idle_secs: u64,
    },
    /// Local writers kept inserting the key a multi-master change was being applied to.
    #[error("local writes to {table} kept racing the apply of one change; retrying")]
    Contention {
        /// `schema.table`.
        table: String,
    },
    /// Multi-master: tombstone collection went past a node's missing acknowledgements (it was
    /// away longer than `apply.conflict.tombstone_retention`). Its stream may hold writes that
    /// would bring deleted rows back, and its own data misses deletes: it must be rebuilt.
    #[error(
        "{detail}. Rebuild node {node}: stop its pgferry, empty its tables, seed it again \
             with `pgferry join` under a new node_id, and replace the old node_id in every \
             peer's apply.nodes (see README, \"Offline nodes and the tombstone horizon\")"
    )]
    HorizonPassed {
        /// The node that was away too long.
        node: String,
        /// Who found it, and where.
        detail: String,
    },
    /// The target answered a statement in a way its text rules out (a table described a
    /// moment ago is gone, a batch probe returned the wrong number of rows): the transaction
    /// is rolled back and replayed.
    #[error("the target answered unexpectedly: {0}")]
    UnexpectedAnswer(String),
    /// Multi-master: changes from node `from` depend on `node`'s changes up to `lsn`, and the
    /// target has not applied that far yet: a schema change `from` made after applying them
    /// (it may act on a column `node` added or renamed), or `from`'s writes after it applied
    /// `node`'s schema change (a value only the new type holds). The transaction is rolled
    /// back and replayed once the target's worker for `node` has applied that far.
    #[error("changes from {from} depend on {node}'s changes up to {lsn} (a schema change), which this target has not applied yet")]
    SchemaChangeWaits {
        /// The node that made the schema change.
        from: String,
        /// The node whose changes come first.
        node: String,
        /// Its commit LSN the target must have applied.
        lsn: crate::lsn::Lsn,
    },
    /// A multi-master node's publication lists columns (PostgreSQL 15 column lists): its rows
    /// would travel without some columns, and the other nodes write each row whole.
    #[error("publication {publication} publishes only some columns of {tables}: multi-master writes each row whole, so the other nodes would reset the columns it leaves out to their DEFAULT; publish whole tables (ALTER PUBLICATION {publication} SET TABLE … without column lists) and restart pgferry")]
    ColumnList {
        /// The node's publication.
        publication: String,
        /// The tables it publishes with column lists, comma-separated.
        tables: String,
    },
    /// The target's seed from the node (`pgferry seed`) did not finish: its tables hold part
    /// of a copy, which the stream must not be applied onto.
    #[error("the seed of this target from {node} did not finish (pgferry.seeds says copying): run `pgferry seed` again, then this worker starts")]
    SeedUnfinished {
        /// The source node.
        node: String,
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

impl ApplyError {
    /// The target refused a change for what it holds, not for a passing condition: bad data
    /// (SQLSTATE class 22), a constraint (23), an unsupported operation such as TRUNCATE of a
    /// table a foreign key references (0A000), a mismatched type or missing operator (42804,
    /// 42883), a generated column the statement may not set (428C9: a target column that is
    /// `GENERATED ALWAYS AS (…) STORED` where the source's is a plain one), a multi-row
    /// statement that met one row twice (21000: two spellings of one key in a batch; the
    /// change-by-change replay writes them one after the other), or a statement sent
    /// after such a failure in the same pipelined
    /// transaction (25P02). Such a change is dead-lettered (`apply.on_poison`); retrying
    /// cannot help. So is one the apply role may not make (42501), which also parks its table
    /// ([`ApplyError::is_access_refused`]).
    pub fn is_rejection(&self) -> bool {
        let ApplyError::Sql { source, .. } = self else {
            return false;
        };
        source.code().is_some_and(|code| {
            let code = code.code();
            code.starts_with("22")
                || code.starts_with("23")
                || matches!(
                    code,
                    "0A000" | "21000" | "42804" | "42883" | "428C9" | "25P02" | "42501"
                )
        })
    }

    /// The target refused the apply role a statement on a table (42501: no privilege, or
    /// row-level security the role does not bypass): every change of the table fails alike
    /// until an operator grants it, so the table parks ([`crate::apply::dead_letters::ACCESS_REFUSED`]).
    pub fn is_access_refused(&self) -> bool {
        matches!(self, ApplyError::Sql { source, .. }
            if source.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE))
    }
}

impl ApplyError {
    /// The target lacks a column or table a statement named (42703, 42P01), has no unique
    /// index for an `ON CONFLICT` key any more (42P10: its primary key was replaced), or a
    /// table gained a column since a multi-master write statement was prepared
    /// ([`crate::apply::multimaster::SHAPE_CHANGED`]): most likely the worker's cached table
    /// shapes predate a schema change made by another session (a user, or the worker applying
    /// another node's stream to the same target). The caller replays
    /// the transaction with shapes described again (for a while from one position: schema
    /// changes may come one after another); past that, the error is a real one.
    pub fn is_stale_shape(&self) -> bool {
        let ApplyError::Sql { source, .. } = self else {
            return false;
        };
        source.code().is_some_and(|code| {
            matches!(code.code(), "42703" | "42P01" | "42P10")
                || code.code() == crate::apply::multimaster::SHAPE_CHANGED
        })
    }
}

impl Classify for ApplyError {
    fn class(&self) -> ErrorClass {
        match self {
            ApplyError::Sql { source, .. } => classify_pg(source),
            ApplyError::Kafka(e) => classify_kafka(e),
            // The operator adds the column; retrying then succeeds without a restart.
            ApplyError::ColumnMissing { .. } => ErrorClass::Transient,
            ApplyError::BadMessage { .. }
            | ApplyError::Gap { .. }
            | ApplyError::HorizonPassed { .. }
            | ApplyError::ColumnList { .. }
            | ApplyError::SeedUnfinished { .. } => ErrorClass::Fatal,
            ApplyError::Contention { .. }
            | ApplyError::SchemaChangeWaits { .. }
            | ApplyError::Stalled { .. }
            | ApplyError::UnexpectedAnswer(_) => ErrorClass::Transient,
        }
    }
}

//! Error classification: every failure is either transient (retry with backoff) or fatal
//! (stop and tell the operator). Classification is by code — SQLSTATE, librdkafka error
//! code, I/O error kind — never by message text.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tokio_postgres::error::SqlState;

/// What the supervisor should do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Reconnect and resume from the last durable position.
    Transient,
    /// Stop: retrying cannot help until an operator changes something.
    Fatal,
}

/// Implemented by every error that can end a pipeline run.
pub trait Classify {
    /// Transient or fatal.
    fn class(&self) -> ErrorClass;
}

/// Formats an error with its `source()` chain, each cause once: `what: why: root cause`.
///
/// The crate's own errors never repeat their source in their message (the convention is
/// `#[source]` without `{source}`), but some library errors do (tokio-postgres prints its
/// `DbError`, librdkafka its error code); a cause whose text the line already holds is not
/// printed again.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut line = self.0.to_string();
        let mut cause = self.0.source();
        while let Some(c) = cause {
            let text = c.to_string();
            if !line.contains(&text) {
                line.push_str(": ");
                line.push_str(&text);
            }
            cause = c.source();
        }
        f.write_str(&line)
    }
}

/// SQLSTATE classes that retrying fixes: connection trouble, resource pressure, shutdown,
/// serialization failures and deadlocks.
pub fn classify_sqlstate(code: &SqlState) -> ErrorClass {
    let c = code.code();
    let transient_class = ["08", "53", "57", "40"].iter().any(|p| c.starts_with(p));
    // 55006 object_in_use: the slot is still held by a previous walsender that has not
    // noticed our restart yet. 55P03 lock_not_available: a lock_timeout expired.
    if transient_class || *code == SqlState::OBJECT_IN_USE || *code == SqlState::LOCK_NOT_AVAILABLE
    {
        ErrorClass::Transient
    } else {
        ErrorClass::Fatal
    }
}

/// tokio-postgres errors: by SQLSTATE when the server sent one, else (I/O, closed) transient.
pub fn classify_pg(err: &tokio_postgres::Error) -> ErrorClass {
    match err.code() {
        Some(code) => classify_sqlstate(code),
        None => ErrorClass::Transient,
    }
}

/// librdkafka errors: configuration and authorization problems are fatal; everything else
/// (timeouts, broker down, queue full) is transient.
pub fn classify_kafka(err: &KafkaError) -> ErrorClass {
    use RDKafkaErrorCode as C;
    match err.rdkafka_error_code() {
        Some(
            C::InvalidConfig
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::SaslAuthenticationFailed
            | C::Authentication
            | C::UnsupportedVersion
            | C::InvalidReplicationFactor
            | C::InvalidPartitions
            | C::MessageSizeTooLarge
            | C::InvalidTopic,
        ) => ErrorClass::Fatal,
        _ => match err {
            KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) => ErrorClass::Fatal,
            _ => ErrorClass::Transient,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates() {
        assert_eq!(
            classify_sqlstate(&SqlState::CONNECTION_FAILURE),
            ErrorClass::Transient
        );
        assert_eq!(
            classify_sqlstate(&SqlState::ADMIN_SHUTDOWN),
            ErrorClass::Transient
        );
        assert_eq!(
            classify_sqlstate(&SqlState::OBJECT_IN_USE),
            ErrorClass::Transient
        );
        assert_eq!(
            classify_sqlstate(&SqlState::T_R_DEADLOCK_DETECTED),
            ErrorClass::Transient
        );
        assert_eq!(
            classify_sqlstate(&SqlState::LOCK_NOT_AVAILABLE),
            ErrorClass::Transient
        );
        assert_eq!(
            classify_sqlstate(&SqlState::INSUFFICIENT_PRIVILEGE),
            ErrorClass::Fatal
        );
        assert_eq!(
            classify_sqlstate(&SqlState::UNDEFINED_OBJECT),
            ErrorClass::Fatal
        );
    }

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Inner);

    /// Like tokio-postgres: prints its cause and also returns it as `source()`.
    #[derive(Debug, thiserror::Error)]
    #[error("db error: {0}")]
    struct Inner(#[source] Root);

    #[derive(Debug, thiserror::Error)]
    #[error("ERROR: relation \"t\" does not exist")]
    struct Root;

    #[test]
    fn chain_prints_each_cause_once() {
        let e = Outer(Inner(Root));
        assert_eq!(
            ErrorChain(&e).to_string(),
            "outer: db error: ERROR: relation \"t\" does not exist"
        );
    }

    #[test]
    fn kafka_codes() {
        let fatal = KafkaError::MessageProduction(RDKafkaErrorCode::TopicAuthorizationFailed);
        assert_eq!(classify_kafka(&fatal), ErrorClass::Fatal);
        let transient = KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull);
        assert_eq!(classify_kafka(&transient), ErrorClass::Transient);
    }
}

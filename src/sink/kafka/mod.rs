//! The Kafka sink: one topic per table, keyed by primary key, Debezium-shaped JSON values.
//!
//! [`encode`] is pure. The producer (runtime only) owns librdkafka, topic creation and the
//! delivery callbacks that feed [`crate::pipeline::progress`].

pub mod dead_letter;
pub mod encode;
pub mod node_stream;
#[cfg(feature = "runtime")]
pub mod producer;

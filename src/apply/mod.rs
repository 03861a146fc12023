//! Kafka → target databases (master → replicas).
//!
//! Each (target, source node) pair has one worker ([`worker`]) reading that node's ordered
//! stream (`<prefix>.__node.<node>`, see [`crate::sink::kafka::node_stream`]). The pure parts
//! are the record parser and exactly-once framer ([`stream`]), statement text ([`sql`]) and
//! value rendering ([`params`]); [`target`] and [`worker`] do the I/O.

pub mod admit;
pub mod conflict;
pub mod contention;
pub mod copy;
pub mod dead_letters;
pub mod error;
pub mod holds;
pub mod join;
pub mod multimaster;
pub mod params;
pub mod plan;
pub mod position;
pub mod seed;
pub mod sql;
pub mod stream;
pub mod target;
pub mod worker;

pub use error::ApplyError;

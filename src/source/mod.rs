//! PostgreSQL → capture events: replication connection, pgoutput decoding, snapshot, capture loop.
//!
//! [`pgoutput`] and [`assemble`] are pure. The rest is the I/O shell around them: the
//! replication transport, slot/publication setup, the initial snapshot, and the loop that ties
//! the stream to the Kafka sink and the delivery watermark.

pub mod assemble;
pub mod pgoutput;
pub mod reconcile;

#[cfg(feature = "runtime")]
pub mod capture;
#[cfg(feature = "runtime")]
pub mod catalog;
#[cfg(feature = "runtime")]
pub mod snapshot;

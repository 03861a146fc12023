//! The streaming replication protocol client: our own small transport, because tokio-postgres
//! has no CopyBoth / START_REPLICATION support. See docs/ARCHITECTURE.md for why we did not
//! adopt an existing crate.

mod conn;
pub mod wire;

pub use conn::{QueryResult, ReplicationConnection, ReplicationError};

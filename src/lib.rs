//! pgferry: a change-data-capture sidecar for PostgreSQL.
//!
//! ```text
//!            ┌──────────── source ─────────────┐   ┌─ pipeline ─┐   ┌── sink::kafka ──┐
//! Postgres ─▶│ replication ─▶ pgoutput ─▶ assemble│──▶│  progress  │◀──│ encode ─▶ produce│──▶ Kafka
//!  (slot)    │  (CopyBoth)    (decode)   (events)│   │ (watermark)│   │  (JSON envelope) │
//!     ▲      └──────────────────────────────────┘   └─────┬──────┘   └─────────────────┘
//!     └────────── standby status: flush = watermark ◀─────┘
//! ```
//!
//! - [`source`] reads the logical replication stream and the initial snapshot.
//! - [`pipeline`] decides which source position is durable downstream and may be confirmed.
//! - [`sink`] renders and delivers changes to Kafka.
//! - [`value`], [`event`], [`lsn`] and [`pgtime`] are the pure domain vocabulary.
//!
//! Everything that does I/O sits behind the `runtime` feature, so the pure core (decoder,
//! value encoding, watermark) builds alone for fuzzing.

pub mod ddl;
pub mod event;
pub mod lsn;
pub mod naming;
pub mod pgtime;
pub mod pipeline;
pub mod sink;
pub mod source;
pub mod sql;
pub mod value;

#[cfg(feature = "runtime")]
pub mod app;
#[cfg(feature = "runtime")]
pub mod apply;
#[cfg(feature = "runtime")]
pub mod check;
#[cfg(feature = "runtime")]
pub mod config;
#[cfg(feature = "runtime")]
pub mod error;
#[cfg(feature = "runtime")]
pub mod kafka;
#[cfg(feature = "runtime")]
pub mod pg;
#[cfg(feature = "runtime")]
pub mod roles;
#[cfg(feature = "runtime")]
pub mod status;
#[cfg(feature = "runtime")]
pub mod tail;
#[cfg(feature = "runtime")]
pub mod telemetry;

//! Typed configuration: YAML file, `PGFERRY_…` environment overrides, validation, secrets.
//!
//! Owns the shape of the config and its invariants. Every error names the key path that is
//! wrong (`source.slot`, `kafka.properties`, …) and what was expected. Passwords live in
//! [`Secret`] and are never printed.

mod de;
mod load;
mod pg_tls;
mod secret;
mod source_url;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

pub use de::parse_duration;
pub use load::{load, load_from_str, ConfigError};
pub use pg_tls::{PgTls, RootCert, SslMode};
pub use secret::{redact, register as register_secret, Secret};
pub use source_url::{PgUrl, PgUrlError};

/// Default replication slot name prefix; the full default is `pgferry_<node_id>`.
pub const DEFAULT_PUBLICATION: &str = "pgferry";
/// Default topic prefix.
pub const DEFAULT_TOPIC_PREFIX: &str = "pgferry";
/// Default metrics listen address.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9187";
/// Default interval between heartbeat messages.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// Default interval between standby status updates (like `wal_receiver_status_interval`).
pub const DEFAULT_STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// Default rows per snapshot chunk (and per fetch of an exported snapshot).
pub const DEFAULT_SNAPSHOT_BATCH_ROWS: u32 = 10_000;
/// Default Kafka delivery timeout (librdkafka `message.timeout.ms`).
pub const DEFAULT_DELIVERY_TIMEOUT: Duration = Duration::from_secs(300);

/// The whole config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Identifies this node; stamped on every change it publishes.
    #[serde(deserialize_with = "de::string")]
    pub node_id: String,
    /// The database to capture. Absent: this node does not capture.
    #[serde(default)]
    pub source: Option<SourceConfig>,
    /// The broker.
    pub kafka: KafkaConfig,
    /// Kafka → target databases. Absent: this node does not apply.
    #[serde(default)]
    pub apply: Option<ApplyConfig>,
    /// After SIGTERM/SIGINT, the longest a graceful stop may take (drain, flush Kafka, commit,
    /// confirm); past it pgferry exits with an error. Keep it below Kubernetes'
    /// terminationGracePeriodSeconds.
    #[serde(default = "default_shutdown_grace", deserialize_with = "de::duration")]
    pub shutdown_grace_period: Duration,
    /// `/metrics`, `/healthz`, `/readyz`.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
}

/// What to do on first start, when the slot does not exist yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotMode {
    /// Publish every existing row as `op: "r"` in primary-key chunks read beside the stream
    /// (short transactions, resumable, parallel; see [`crate::source::reconcile`]).
    Initial,
    /// Publish every existing row as `op: "r"` from the slot's exported snapshot, in one
    /// REPEATABLE READ transaction, before streaming starts. Not resumable; holds back vacuum
    /// for its whole duration. For small databases, or consumers that need every snapshot row
    /// before the first change.
    Exported,
    /// Only stream changes from the slot's creation on.
    Never,
}

/// What to do when the slot pgferry was streaming from is gone (dropped, or lost to failover
/// without slot synchronization) or invalidated by the server (WAL removed, rows removed, …).
/// Either way changes may have been lost between the last confirmed position and now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnSlotLoss {
    /// Stop with an error naming the slot, the LSN it had reached and what to do.
    Stop,
    /// Drop what is left of the slot and its snapshot record, re-create it with the configured
    /// `snapshot` mode, and warn loudly that changes may be missing.
    Recreate,
}

/// `source:`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// libpq-style URL or key=value string. A password in it is accepted but better kept in
    /// `password`, `password_file` or `PGFERRY_SOURCE__PASSWORD`.
    pub url: PgUrl,
    /// Password, overriding the one in the URL.
    #[serde(default)]
    pub password: Option<Secret>,
    /// File whose content (trailing newline trimmed) is the password.
    #[serde(default)]
    pub password_file: Option<std::path::PathBuf>,
    /// Logical replication slot; created if missing. Default `pgferry_<node_id>`.
    #[serde(default, deserialize_with = "optional_string")]
    pub slot: Option<String>,
    /// Publication; created if missing.
    #[serde(default = "default_publication", deserialize_with = "de::string")]
    pub publication: String,
    /// Tables for a newly created publication (`schema.table`); empty means all tables.
    #[serde(default, deserialize_with = "de::lenient")]
    pub tables: Vec<String>,
    /// First-start behaviour.
    #[serde(default = "default_snapshot")]
    pub snapshot: SnapshotMode,
    /// Rows fetched per round trip during the snapshot.
    #[serde(
        default = "default_snapshot_batch_rows",
        deserialize_with = "de::lenient"
    )]
    pub snapshot_batch_rows: u32,
    /// Upper bound on one chunk's size in bytes (as text), over it by one row at most: where
    /// a chunk of a table's rows could pass it, the chunk query ends at it; elsewhere a chunk
    /// over it makes the next ones smaller. Keyless tables (read by heap pages) only adapt.
    #[serde(
        default = "default_snapshot_chunk_bytes",
        deserialize_with = "de::lenient"
    )]
    pub snapshot_chunk_bytes: u64,
    /// Chunks read at once (each on its own connection): several tables, and key ranges of
    /// one big table, in parallel.
    #[serde(default = "default_snapshot_readers", deserialize_with = "de::lenient")]
    pub snapshot_readers: u32,
    /// Snapshot tables added to the publication after the slot was created, by themselves.
    #[serde(default = "default_true", deserialize_with = "de::lenient")]
    pub snapshot_new_tables: bool,
    /// How often to look for snapshot requests (`pgferry snapshot`, `pgferry.snapshot_requests`)
    /// and tables added to the publication.
    #[serde(
        default = "default_snapshot_poll_interval",
        deserialize_with = "de::duration"
    )]
    pub snapshot_poll_interval: Duration,
    /// Capture schema changes (CREATE/ALTER/DROP TABLE) with an event trigger and publish
    /// them in order with the data. Event triggers need a superuser; without one capture warns
    /// and goes on without schema changes.
    #[serde(default = "default_true", deserialize_with = "de::lenient")]
    pub capture_ddl: bool,
    /// How often to write a heartbeat into the WAL.
    #[serde(default = "default_heartbeat", deserialize_with = "de::duration")]
    pub heartbeat_interval: Duration,
    /// How often to send a standby status update.
    #[serde(default = "default_status", deserialize_with = "de::duration")]
    pub status_interval: Duration,
    /// What to do with a change that cannot be published: a value that cannot be encoded,
    /// or a record larger than `kafka.max_message_bytes`.
    #[serde(default = "default_on_poison")]
    pub on_poison: OnPoison,
    /// What to do when the slot is missing after a completed snapshot, or invalidated.
    #[serde(default = "default_on_slot_loss")]
    pub on_slot_loss: OnSlotLoss,
    /// Create the slot as a failover slot (PostgreSQL 17+), so that standbys with
    /// `sync_replication_slots = on` keep a copy that survives promotion. Ignored on older
    /// servers.
    #[serde(default = "default_true", deserialize_with = "de::lenient")]
    pub failover_slot: bool,
}

impl fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceConfig")
            .field("url", &self.url)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("password_file", &self.password_file)
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("tables", &self.tables)
            .field("snapshot", &self.snapshot)
            .field("snapshot_readers", &self.snapshot_readers)
            .field("on_slot_loss", &self.on_slot_loss)
            .field("failover_slot", &self.failover_slot)
            .finish_non_exhaustive()
    }
}

/// `kafka:`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `host:port[,host:port…]`.
    #[serde(deserialize_with = "de::string")]
    pub brokers: String,
    /// Topic names are `<topic_prefix>.<schema>.<table>`.
    #[serde(default = "default_topic_prefix", deserialize_with = "de::string")]
    pub topic_prefix: String,
    /// Follow each delete with a tombstone (null value) for compacted topics.
    #[serde(default = "default_true", deserialize_with = "de::lenient")]
    pub tombstones: bool,
    /// Create missing topics with the settings below.
    #[serde(default = "default_true", deserialize_with = "de::lenient")]
    pub create_topics: bool,
    /// Partitions of created topics.
    #[serde(default = "default_partitions", deserialize_with = "de::lenient")]
    pub topic_partitions: i32,
    /// Replication factor of created topics.
    #[serde(
        default = "default_replication_factor",
        deserialize_with = "de::lenient"
    )]
    pub topic_replication_factor: i32,
    /// How long librdkafka retries a message before reporting failure.
    #[serde(
        default = "default_delivery_timeout",
        deserialize_with = "de::duration"
    )]
    pub delivery_timeout: Duration,
    /// Largest Kafka record pgferry produces or reads, in bytes. Sets the producer's
    /// `message.max.bytes`, the `max.message.bytes` of topics pgferry creates, and the
    /// consumers' fetch limits. A record over it follows the poison policy. The broker's own
    /// limit (`message.max.bytes`, or a topic's `max.message.bytes`) must be at least this.
    #[serde(
        default = "default_max_message_bytes",
        deserialize_with = "de::lenient"
    )]
    pub max_message_bytes: u32,
    /// Topic for records that could not be published or applied. Default
    /// `<topic_prefix>.__dead_letter`.
    #[serde(default, deserialize_with = "optional_string")]
    pub dead_letter_topic: Option<String>,
    /// Passed through to librdkafka (`security.protocol`, `sasl.*`, …).
    #[serde(default, deserialize_with = "de::lenient")]
    pub properties: BTreeMap<String, PropertyValue>,
}

/// Default `kafka.max_message_bytes`: 64 MiB, room for a 16 MB row whose bytea doubles in
/// base64 and whose old image rides along under REPLICA IDENTITY FULL.
pub const DEFAULT_MAX_MESSAGE_BYTES: u32 = 64 << 20;

fn default_max_message_bytes() -> u32 {
    DEFAULT_MAX_MESSAGE_BYTES
}

impl KafkaConfig {
    /// `kafka.dead_letter_topic`, or `<topic_prefix>.__dead_letter`.
    pub fn dead_letter_topic(&self) -> String {
        self.dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{}.__dead_letter", self.topic_prefix))
    }
}

/// How changes are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApplyMode {
    /// Read-only replicas following one or more masters.
    Replica,
    /// Every node writes, captures its own changes and applies everyone else's; conflicts
    /// are resolved by last writer wins (see `apply.conflict`).
    MultiMaster,
}

/// The poison policy: what to do with a change that cannot be published (capture: a value
/// that cannot be encoded, a record over `kafka.max_message_bytes`) or applied (apply: an
/// undecodable record, a missing table, a change the target rejects).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnPoison {
    /// Write it to the dead-letter topic (and, on apply, the target's `pgferry.dead_letters`)
    /// with the reason and its position, count it, mark the table diverged, and go on.
    DeadLetter,
    /// Stop that stage, with an error naming the change.
    Stop,
}

/// One database to apply to.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// libpq URL of the target database.
    pub url: PgUrl,
    /// Password, overriding the one in the URL.
    #[serde(default)]
    pub password: Option<Secret>,
    /// File whose content is the password.
    #[serde(default)]
    pub password_file: Option<std::path::PathBuf>,
}

impl fmt::Debug for TargetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TargetConfig")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// `apply:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyConfig {
    /// `replica` or `multi_master`.
    pub mode: ApplyMode,
    /// Databases to apply to; each gets its own worker per source node.
    #[serde(deserialize_with = "de::lenient")]
    pub targets: Vec<TargetConfig>,
    /// Source `node_id`s whose changes to apply.
    #[serde(deserialize_with = "de::lenient")]
    pub nodes: Vec<String>,
    /// Only these tables (`schema.table`); empty means every table in the stream.
    #[serde(default, deserialize_with = "de::lenient")]
    pub tables: Vec<String>,
    /// Most source changes grouped into one target transaction (whole source transactions
    /// only; a larger source transaction is still applied whole).
    #[serde(
        default = "default_batch_max_changes",
        deserialize_with = "de::lenient"
    )]
    pub batch_max_changes: u32,
    /// Multi-master: connections per (source node, target) that write a batch's keys in
    /// parallel, each key always on the same one. 1: one connection, source transactions
    /// stay atomic on the target. More: a batch's keys are split by hash, so parts of one
    /// source transaction may become visible a moment apart (last-writer-wins decides each
    /// key alone anyway).
    #[serde(default = "default_lanes", deserialize_with = "de::lenient")]
    pub lanes: u8,
    /// What to do with a change that cannot be applied (`on_bad_message` is the old name).
    #[serde(default = "default_on_poison", alias = "on_bad_message")]
    pub on_poison: OnPoison,
    /// Dead-letter topic for apply; overrides `kafka.dead_letter_topic` (kept for older
    /// configurations).
    #[serde(default, deserialize_with = "optional_string")]
    pub dead_letter_topic: Option<String>,
    /// Create missing target tables from the source's announced schema (columns, types,
    /// NOT NULL, primary key; not indexes, defaults, constraints or user-defined types).
    #[serde(default, deserialize_with = "de::lenient")]
    pub create_tables: bool,
    /// Drop a target table when the source drops it (schema changes). Off by default: a
    /// dropped table's data stays on the targets.
    #[serde(default, deserialize_with = "de::lenient")]
    pub drop_tables: bool,
    /// Multi-master conflict handling.
    #[serde(default)]
    pub conflict: ConflictConfig,
}

/// `apply.conflict.on_clock_skew` of older configs: still parsed (so that a typo is still an
/// error), no longer used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClockSkewAction {
    /// Was: keep waiting for the local clock.
    Wait,
    /// Was: apply after `max_clock_skew`.
    Apply,
}

/// `apply.conflict:` (multi-master only).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConflictConfig {
    /// Backstop for tombstone collection (which is by acknowledgement): a tombstone older than
    /// this goes even if some node has not acknowledged it, and that node is then refused
    /// (see docs/ARCHITECTURE.md, "The tombstone rule").
    #[serde(default = "default_retention", deserialize_with = "de::duration")]
    pub tombstone_retention: Duration,
    /// How long rows of `pgferry.conflicts` are kept.
    #[serde(default = "default_retention", deserialize_with = "de::duration")]
    pub log_retention: Duration,
    /// Accepted and ignored (versions replaced clock waits); kept so that older configs load.
    #[serde(default = "default_max_clock_skew", deserialize_with = "de::duration")]
    pub max_clock_skew: Duration,
    /// Accepted and ignored, like `max_clock_skew`.
    #[serde(default = "default_on_clock_skew")]
    pub on_clock_skew: ClockSkewAction,
    /// Per-table resolver functions (`schema.table: schema.function`), called on row-against-row
    /// conflicts as `f(table text, local jsonb, remote jsonb, local_version jsonb,
    /// remote_version jsonb) returns jsonb`.
    #[serde(default, deserialize_with = "de::lenient")]
    pub resolvers: BTreeMap<String, String>,
    /// How often expired tombstones and conflict-log rows are deleted.
    #[serde(
        default = "default_maintenance_interval",
        deserialize_with = "de::duration"
    )]
    pub maintenance_interval: Duration,
}

impl Default for ConflictConfig {
    fn default() -> Self {
        ConflictConfig {
            tombstone_retention: default_retention(),
            log_retention: default_retention(),
            max_clock_skew: default_max_clock_skew(),
            on_clock_skew: default_on_clock_skew(),
            resolvers: BTreeMap::new(),
            maintenance_interval: default_maintenance_interval(),
        }
    }
}

/// Default tombstone and conflict-log retention.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default `apply.conflict.max_clock_skew`.
pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(1);

/// Default `shutdown_grace_period`.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

fn default_shutdown_grace() -> Duration {
    DEFAULT_SHUTDOWN_GRACE
}
fn default_retention() -> Duration {
    DEFAULT_RETENTION
}
fn default_max_clock_skew() -> Duration {
    DEFAULT_MAX_CLOCK_SKEW
}
fn default_on_clock_skew() -> ClockSkewAction {
    ClockSkewAction::Wait
}
fn default_maintenance_interval() -> Duration {
    Duration::from_secs(60)
}

fn default_lanes() -> u8 {
    1
}
fn default_batch_max_changes() -> u32 {
    DEFAULT_BATCH_MAX_CHANGES
}
fn default_on_poison() -> OnPoison {
    OnPoison::DeadLetter
}

/// Default cap on changes per target transaction.
pub const DEFAULT_BATCH_MAX_CHANGES: u32 = 5_000;

/// A librdkafka property value; secrets among them are redacted in `Debug`.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct PropertyValue(#[serde(deserialize_with = "de::string")] pub String);

/// True for librdkafka property names whose values are credentials, or may be: names
/// containing `password`, `secret`, `key`, `token` or `sasl.jaas`, and inline PEM
/// (`*.pem`). `ssl.key.location` is only a path, but it is hidden too rather than guessed at.
pub fn is_secret_property(name: &str) -> bool {
    ["password", "secret", "key", "token", "sasl.jaas"]
        .iter()
        .any(|word| name.contains(word))
        || name.ends_with(".pem")
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let props: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let shown = if is_secret_property(k) {
                    "***"
                } else {
                    v.0.as_str()
                };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topic_prefix", &self.topic_prefix)
            .field("tombstones", &self.tombstones)
            .field("properties", &props)
            .finish_non_exhaustive()
    }
}

/// `metrics:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the HTTP endpoint.
    #[serde(default = "default_metrics_listen")]
    pub listen: SocketAddr,
    /// `/readyz` fails while the apply lag (origin commit to apply commit) exceeds this.
    #[serde(default, deserialize_with = "de::optional_duration")]
    pub ready_max_apply_lag: Option<Duration>,
    /// `/readyz` fails while the source WAL not yet confirmed exceeds this many bytes.
    #[serde(default, deserialize_with = "de::lenient")]
    pub ready_max_source_lag_bytes: Option<u64>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: default_metrics_listen(),
            ready_max_apply_lag: None,
            ready_max_source_lag_bytes: None,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One JSON object per line (containers).
    #[default]
    Json,
    /// Human-readable.
    Text,
}

/// `log:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Line format.
    #[serde(default)]
    pub format: LogFormat,
    /// `tracing` filter directive, e.g. `info` or `pgferry=debug,info`.
    #[serde(default = "default_log_level", deserialize_with = "de::string")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::default(),
            level: default_log_level(),
        }
    }
}

fn optional_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    de::string(d).map(Some)
}
fn default_publication() -> String {
    DEFAULT_PUBLICATION.to_owned()
}
fn default_snapshot() -> SnapshotMode {
    SnapshotMode::Initial
}
fn default_on_slot_loss() -> OnSlotLoss {
    OnSlotLoss::Stop
}
fn default_snapshot_batch_rows() -> u32 {
    DEFAULT_SNAPSHOT_BATCH_ROWS
}
fn default_snapshot_chunk_bytes() -> u64 {
    64 << 20
}
fn default_snapshot_readers() -> u32 {
    2
}
fn default_snapshot_poll_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_heartbeat() -> Duration {
    DEFAULT_HEARTBEAT_INTERVAL
}
fn default_status() -> Duration {
    DEFAULT_STATUS_INTERVAL
}
fn default_topic_prefix() -> String {
    DEFAULT_TOPIC_PREFIX.to_owned()
}
fn default_true() -> bool {
    true
}
fn default_partitions() -> i32 {
    1
}
fn default_replication_factor() -> i32 {
    1
}
fn default_delivery_timeout() -> Duration {
    DEFAULT_DELIVERY_TIMEOUT
}
fn default_metrics_listen() -> SocketAddr {
    // A constant that parses; covered by the defaults test.
    DEFAULT_METRICS_LISTEN
        .parse()
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9187)))
}
fn default_log_level() -> String {
    "info".to_owned()
}

impl SourceConfig {
    /// The slot name, defaulting to `pgferry_<node_id>` (with `-` mapped to `_`).
    pub fn slot_name(&self, node_id: &str) -> String {
        self.slot
            .clone()
            .unwrap_or_else(|| default_slot_name(node_id))
    }
}

/// Capture's slot name when `source.slot` is not set: `pgferry_<node_id>` (with `-` mapped to
/// `_`, lower case).
pub fn default_slot_name(node_id: &str) -> String {
    format!("pgferry_{}", node_id.replace('-', "_").to_lowercase())
}

mod validate;

#[cfg(test)]
mod tests;

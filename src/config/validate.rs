//! Invariants that types alone cannot express, each reported with its key path.

use super::{Config, ConfigError};

fn is_identifier(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

impl Config {
    /// Checks every field that has rules beyond its type.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let ok_node = !self.node_id.is_empty()
            && self.node_id.len() <= 48
            && self
                .node_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok_node {
            return Err(ConfigError::invalid(
                "node_id",
                "expected 1-48 characters of letters, digits, '-' or '_'",
            ));
        }
        if let Some(source) = &self.source {
            let slot = source.slot_name(&self.node_id);
            if !is_identifier(&slot, 63) {
                return Err(ConfigError::invalid(
                    "source.slot",
                    "expected 1-63 characters of lower-case letters, digits or '_' \
                     (PostgreSQL's rule for slot names)",
                ));
            }
            if source.publication.is_empty() {
                return Err(ConfigError::invalid(
                    "source.publication",
                    "must not be empty",
                ));
            }
            for (i, table) in source.tables.iter().enumerate() {
                let parts: Vec<&str> = table.split('.').collect();
                if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
                    return Err(ConfigError::invalid(
                        format!("source.tables[{i}]"),
                        "expected schema.table",
                    ));
                }
            }
            if source.snapshot_batch_rows == 0 {
                return Err(ConfigError::invalid(
                    "source.snapshot_batch_rows",
                    "must be at least 1",
                ));
            }
            if !(1..=64).contains(&source.snapshot_readers) {
                return Err(ConfigError::invalid(
                    "source.snapshot_readers",
                    "must be between 1 and 64 (each reader holds a connection)",
                ));
            }
            if source.snapshot_chunk_bytes < 1 << 16 {
                return Err(ConfigError::invalid(
                    "source.snapshot_chunk_bytes",
                    "must be at least 65536",
                ));
            }
            if source.snapshot_poll_interval.is_zero() {
                return Err(ConfigError::invalid(
                    "source.snapshot_poll_interval",
                    "must be greater than zero",
                ));
            }
            if source.heartbeat_interval.is_zero() {
                return Err(ConfigError::invalid(
                    "source.heartbeat_interval",
                    "must be greater than zero",
                ));
            }
            if source.status_interval.is_zero() {
                return Err(ConfigError::invalid(
                    "source.status_interval",
                    "must be greater than zero",
                ));
            }
            if source.password.is_some() && source.password_file.is_some() {
                return Err(ConfigError::invalid(
                    "source.password_file",
                    "set either source.password or source.password_file, not both",
                ));
            }
        }
        if let Some(apply) = &self.apply {
            if apply.mode == super::ApplyMode::MultiMaster {
                self.validate_multi_master(apply)?;
            }
            if apply.targets.is_empty() {
                return Err(ConfigError::invalid(
                    "apply.targets",
                    "list at least one target",
                ));
            }
            if apply.nodes.is_empty() {
                return Err(ConfigError::invalid(
                    "apply.nodes",
                    "list the node_id of every source to apply",
                ));
            }
            for (i, table) in apply.tables.iter().enumerate() {
                if table.split('.').filter(|p| !p.is_empty()).count() != 2 {
                    return Err(ConfigError::invalid(
                        format!("apply.tables[{i}]"),
                        "expected schema.table",
                    ));
                }
            }
            if !(1..=16).contains(&apply.lanes) {
                return Err(ConfigError::invalid(
                    "apply.lanes",
                    "must be between 1 and 16",
                ));
            }
            if apply.lanes > 1 && apply.mode != super::ApplyMode::MultiMaster {
                return Err(ConfigError::invalid(
                    "apply.lanes",
                    "parallel lanes are for multi_master only: replica mode keeps each source \
                     transaction atomic and in commit order on one connection",
                ));
            }
            if apply.batch_max_changes == 0 {
                return Err(ConfigError::invalid(
                    "apply.batch_max_changes",
                    "must be at least 1",
                ));
            }
            for (i, t) in apply.targets.iter().enumerate() {
                if t.password.is_some() && t.password_file.is_some() {
                    return Err(ConfigError::invalid(
                        format!("apply.targets[{i}].password_file"),
                        "set either password or password_file, not both",
                    ));
                }
            }
        }
        let kafka = &self.kafka;
        if kafka.brokers.trim().is_empty() {
            return Err(ConfigError::invalid(
                "kafka.brokers",
                "expected host:port[,host:port]",
            ));
        }
        let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if kafka.topic_prefix.is_empty() || !kafka.topic_prefix.chars().all(legal) {
            return Err(ConfigError::invalid(
                "kafka.topic_prefix",
                "expected letters, digits, '.', '_' or '-' (Kafka's topic name rule)",
            ));
        }
        if kafka.topic_partitions < 1 {
            return Err(ConfigError::invalid(
                "kafka.topic_partitions",
                "must be at least 1",
            ));
        }
        if kafka.topic_replication_factor < 1 {
            return Err(ConfigError::invalid(
                "kafka.topic_replication_factor",
                "must be at least 1",
            ));
        }
        if kafka.delivery_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "kafka.delivery_timeout",
                "must be greater than zero",
            ));
        }
        // These are how pgferry guarantees no loss and per-key order; a passthrough must not
        // silently weaken them.
        for fixed in [
            "enable.idempotence",
            "acks",
            "bootstrap.servers",
            "message.timeout.ms",
        ] {
            if kafka.properties.contains_key(fixed) {
                return Err(ConfigError::invalid(
                    format!("kafka.properties.{fixed}"),
                    "is set by pgferry (idempotent producer, acks=all, kafka.brokers, \
                     kafka.delivery_timeout) and cannot be overridden",
                ));
            }
        }
        Ok(())
    }

    /// Moves `password` / `password_file` into the connection settings.
    pub(super) fn resolve_secrets(&mut self) -> Result<(), ConfigError> {
        if let Some(source) = &mut self.source {
            resolve_password(
                &mut source.url,
                source.password.as_ref(),
                source.password_file.as_deref(),
                "source.password_file",
            )?;
        }
        if let Some(apply) = &mut self.apply {
            for (i, t) in apply.targets.iter_mut().enumerate() {
                let path = format!("apply.targets[{i}].password_file");
                resolve_password(
                    &mut t.url,
                    t.password.as_ref(),
                    t.password_file.as_deref(),
                    &path,
                )?;
            }
        }
        Ok(())
    }
}

impl Config {
    /// Multi-master needs a local source, one local target, and well-formed conflict settings.
    fn validate_multi_master(&self, apply: &super::ApplyConfig) -> Result<(), ConfigError> {
        if self.source.is_none() {
            return Err(ConfigError::invalid(
                "apply.mode",
                "multi_master needs source: every node captures its own writes",
            ));
        }
        if apply.targets.len() != 1 {
            return Err(ConfigError::invalid(
                "apply.targets",
                "multi_master applies to exactly one target: the node's own database (the source)",
            ));
        }
        if apply.nodes.contains(&self.node_id) {
            return Err(ConfigError::invalid(
                "apply.nodes",
                format!(
                    "lists this node's own node_id {:?}; list only the other nodes",
                    self.node_id
                ),
            ));
        }
        let conflict = &apply.conflict;
        for (key, value) in [
            (
                "apply.conflict.tombstone_retention",
                conflict.tombstone_retention,
            ),
            ("apply.conflict.log_retention", conflict.log_retention),
            (
                "apply.conflict.maintenance_interval",
                conflict.maintenance_interval,
            ),
        ] {
            if value.is_zero() {
                return Err(ConfigError::invalid(key, "must be greater than zero"));
            }
        }
        let qualified = |s: &str| {
            let parts: Vec<&str> = s.split('.').collect();
            parts.len() == 2 && parts.iter().all(|p| is_identifier(p, 63))
        };
        for (table, function) in &conflict.resolvers {
            if !qualified(table) {
                return Err(ConfigError::invalid(
                    format!("apply.conflict.resolvers.{table}"),
                    "the key must be schema.table (lowercase identifiers)",
                ));
            }
            if !qualified(function) {
                return Err(ConfigError::invalid(
                    format!("apply.conflict.resolvers.{table}"),
                    format!("{function:?} must be schema.function (lowercase identifiers)"),
                ));
            }
        }
        Ok(())
    }
}

impl Config {
    /// Registers every secret value for [`super::redact`]; runs before validation, so that
    /// not even an error about the rest of the config can print one.
    pub(super) fn register_secrets(&self) {
        let register = super::register_secret;
        let urls = self
            .source
            .iter()
            .map(|s| (&s.url, s.password.as_ref()))
            .chain(
                self.apply
                    .iter()
                    .flat_map(|a| a.targets.iter().map(|t| (&t.url, t.password.as_ref()))),
            );
        for (url, password) in urls {
            url.register_secrets();
            if let Some(p) = password {
                register(p.expose());
            }
        }
        for (name, value) in &self.kafka.properties {
            if super::is_secret_property(name) {
                register(&value.0);
            }
        }
    }
}

/// Moves a password from the config or a file into the connection settings.
fn resolve_password(
    url: &mut super::PgUrl,
    password: Option<&super::Secret>,
    file: Option<&std::path::Path>,
    file_key: &str,
) -> Result<(), ConfigError> {
    if let Some(password) = password {
        url.set_password(password.expose());
    } else if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::invalid(file_key, format!("cannot read {}: {e}", path.display()))
        })?;
        let password = text.trim_end_matches(['\n', '\r']);
        super::register_secret(password);
        url.set_password(password);
    }
    Ok(())
}

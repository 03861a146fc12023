//! Names pgferry gives to things inside the databases it touches, shared by capture (which
//! must recognise them) and apply (which creates them).

/// Schema of pgferry's own tables in every database it touches; never captured.
pub const BOOKKEEPING_SCHEMA: &str = "pgferry";

/// Multi-master's version store, `pgferry.versions`: the one bookkeeping table whose changes
/// capture reads (to version the row changes they precede), and never publishes.
pub const VERSIONS_TABLE: &str = "versions";

/// Prefix of every replication origin pgferry creates.
pub const ORIGIN_PREFIX: &str = "pgferry_";

/// True for origins that pgferry's appliers use: transactions under them are not captured.
pub fn is_pgferry_origin(name: &str) -> bool {
    name.starts_with(ORIGIN_PREFIX)
}

/// Replication origin name for a source node applied into one target database. Origins are
/// cluster-wide and held exclusively by one session, so two target databases in one cluster
/// need different names. Capture recognises pgferry's applies by the `pgferry_` prefix.
pub fn origin_name(node: &str, target_db: &str) -> String {
    format!("{ORIGIN_PREFIX}{node}_{target_db}")
}

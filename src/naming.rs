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

/// Replication origin of a worker's extra lane `lane` (1-based; `apply.lanes`), beside the
/// worker's own `origin`.
pub fn lane_origin_name(origin: &str, lane: usize) -> String {
    format!("{origin}_l{lane}")
}

/// Every replication origin the apply workers of one target database use: per source node,
/// the worker's own origin and, with `lanes` > 1 (multi-master), one per extra lane.
pub fn target_origins(nodes: &[String], target_db: &str, lanes: usize) -> Vec<String> {
    nodes
        .iter()
        .flat_map(|node| {
            let origin = origin_name(node, target_db);
            let extra: Vec<String> = (1..lanes).map(|i| lane_origin_name(&origin, i)).collect();
            std::iter::once(origin).chain(extra)
        })
        .collect()
}

/// How many replication origin states a cluster needs with `wanted` origins beside the
/// `existing` ones (each origin with progress holds a state until dropped), when that is more
/// than its `limit` (`max_replication_slots`; `max_active_replication_origins` on PostgreSQL
/// 18): workers would fail to start with "could not find free replication state slot".
pub fn origin_states_short(limit: i64, existing: &[String], wanted: &[String]) -> Option<usize> {
    let mut all: Vec<&String> = existing.iter().chain(wanted).collect();
    all.sort_unstable();
    all.dedup();
    (i64::try_from(all.len()).unwrap_or(i64::MAX) > limit).then_some(all.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_of_a_target_and_their_room() {
        let nodes = vec!["a".to_owned(), "b".to_owned()];
        assert_eq!(
            target_origins(&nodes, "db", 1),
            ["pgferry_a_db", "pgferry_b_db"]
        );
        assert_eq!(
            target_origins(&nodes, "db", 3),
            [
                "pgferry_a_db",
                "pgferry_a_db_l1",
                "pgferry_a_db_l2",
                "pgferry_b_db",
                "pgferry_b_db_l1",
                "pgferry_b_db_l2"
            ]
        );
        let wanted = target_origins(&nodes, "db", 3);
        // Origins that exist already count once; other users' origins count too.
        let existing = vec!["pgferry_a_db".to_owned(), "sub_1".to_owned()];
        assert_eq!(origin_states_short(7, &existing, &wanted), None);
        assert_eq!(origin_states_short(6, &existing, &wanted), Some(7));
        assert_eq!(origin_states_short(10, &[], &[]), None);
    }
}

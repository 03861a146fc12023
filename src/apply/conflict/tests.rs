use proptest::prelude::*;

use super::*;

fn v(ts_us: i64, node: &str) -> Version {
    Version {
        ts_us,
        node: node.to_owned(),
    }
}

fn row(version: Version, matches_before: Option<bool>) -> Local {
    Local::Row {
        version: Some(version),
        matches_before,
    }
}

fn tomb(version: Version) -> Local {
    Local::Tombstone {
        version: Some(version),
    }
}

fn conflict(d: Decision) -> Option<(&'static str, &'static str)> {
    d.conflict.map(|(c, r)| (c.as_str(), r.as_str()))
}

#[test]
fn node_id_breaks_timestamp_ties() {
    assert!(v(10, "b") > v(10, "a"));
    assert!(v(11, "a") > v(10, "b"));
    assert!(Version::unknown() < v(i64::MIN + 1, ""));
}

#[test]
fn fresh_insert_is_not_a_conflict() {
    let d = decide(Op::Create, &v(5, "a"), &Local::Nothing, false);
    assert_eq!(d.action, Action::Write);
    assert_eq!(conflict(d), None);
}

#[test]
fn insert_insert_keeps_the_greater_version() {
    let newer = decide(Op::Create, &v(6, "a"), &row(v(5, "b"), None), false);
    assert_eq!(newer.action, Action::Write);
    assert_eq!(conflict(newer), Some(("insert_exists", "apply_remote")));
    let tie_lower_node = decide(Op::Create, &v(5, "a"), &row(v(5, "b"), None), false);
    assert_eq!(tie_lower_node.action, Action::Skip);
    assert_eq!(
        conflict(tie_lower_node),
        Some(("insert_exists", "keep_local"))
    );
}

#[test]
fn sequential_update_is_not_a_conflict() {
    let d = decide(Op::Update, &v(9, "b"), &row(v(5, "a"), Some(true)), false);
    assert_eq!(d.action, Action::Write);
    assert_eq!(conflict(d), None);
}

#[test]
fn concurrent_updates_conflict_and_the_newer_wins() {
    let d = decide(Op::Update, &v(9, "b"), &row(v(7, "a"), Some(false)), false);
    assert_eq!(d.action, Action::Write);
    assert_eq!(conflict(d), Some(("update_update", "apply_remote")));
    let d = decide(Op::Update, &v(6, "b"), &row(v(7, "a"), Some(false)), false);
    assert_eq!(d.action, Action::Skip);
    assert_eq!(conflict(d), Some(("update_update", "keep_local")));
}

#[test]
fn update_on_a_missing_row_inserts_it() {
    let d = decide(Op::Update, &v(9, "b"), &Local::Nothing, false);
    assert_eq!(d.action, Action::Write);
    assert_eq!(conflict(d), Some(("update_missing", "apply_remote")));
}

#[test]
fn older_update_does_not_resurrect_a_deleted_row() {
    let d = decide(Op::Update, &v(5, "b"), &tomb(v(10, "a")), false);
    assert_eq!(d.action, Action::Skip);
    assert_eq!(conflict(d), Some(("update_deleted", "keep_local")));
}

#[test]
fn newer_update_restores_a_deleted_row() {
    let d = decide(Op::Update, &v(15, "b"), &tomb(v(10, "a")), false);
    assert_eq!(d.action, Action::Write);
    assert_eq!(conflict(d), Some(("update_deleted", "apply_remote")));
}

#[test]
fn delete_against_a_newer_concurrent_update_keeps_the_row() {
    let d = decide(
        Op::Delete,
        &v(10, "a"),
        &row(v(15, "b"), Some(false)),
        false,
    );
    assert_eq!(d.action, Action::Skip);
    assert_eq!(conflict(d), Some(("delete_updated", "keep_local")));
    let d = decide(Op::Delete, &v(10, "a"), &row(v(5, "b"), Some(false)), false);
    assert_eq!(d.action, Action::Delete);
    assert_eq!(conflict(d), Some(("delete_updated", "apply_remote")));
}

#[test]
fn sequential_delete_is_not_a_conflict() {
    let d = decide(Op::Delete, &v(10, "a"), &row(v(5, "b"), Some(true)), false);
    assert_eq!(d.action, Action::Delete);
    assert_eq!(conflict(d), None);
}

#[test]
fn delete_delete_keeps_the_newer_tombstone() {
    let d = decide(Op::Delete, &v(12, "a"), &tomb(v(10, "b")), false);
    assert_eq!(d.action, Action::Delete);
    assert_eq!(conflict(d), Some(("delete_delete", "apply_remote")));
    let d = decide(Op::Delete, &v(9, "a"), &tomb(v(10, "b")), false);
    assert_eq!(d.action, Action::Skip);
    assert_eq!(conflict(d), Some(("delete_delete", "keep_local")));
}

#[test]
fn delete_of_an_unknown_row_leaves_a_tombstone() {
    let d = decide(Op::Delete, &v(12, "a"), &Local::Nothing, false);
    assert_eq!(d.action, Action::Delete);
    assert_eq!(conflict(d), Some(("delete_missing", "apply_remote")));
}

#[test]
fn reinsert_after_delete_is_sequential() {
    let d = decide(Op::Create, &v(12, "a"), &tomb(v(10, "b")), false);
    assert_eq!(d.action, Action::Write);
    assert_eq!(conflict(d), None);
    let d = decide(Op::Create, &v(8, "a"), &tomb(v(10, "b")), false);
    assert_eq!(d.action, Action::Skip);
    assert_eq!(conflict(d), Some(("insert_deleted", "keep_local")));
}

#[test]
fn the_same_version_again_is_skipped_quietly() {
    for local in [row(v(5, "a"), Some(false)), tomb(v(5, "a"))] {
        for op in [Op::Create, Op::Update, Op::Delete] {
            let d = decide(op, &v(5, "a"), &local, true);
            assert_eq!(d.action, Action::Skip, "{op:?} on {local:?}");
            assert_eq!(d.conflict, None);
        }
    }
}

#[test]
fn writes_earlier_in_the_same_transaction_are_followed() {
    let d = decide(
        Op::Delete,
        &v(1, "a"),
        &Local::Row {
            version: None,
            matches_before: Some(false),
        },
        false,
    );
    assert_eq!(d.action, Action::Delete);
    assert_eq!(d.conflict, None);
}

#[test]
fn resolver_merges_only_row_against_row_conflicts() {
    let d = decide(Op::Update, &v(3, "b"), &row(v(7, "a"), Some(false)), true);
    assert_eq!(d.action, Action::Merge);
    assert_eq!(conflict(d), Some(("update_update", "merge")));
    // Sequential changes and deletes stay last-writer-wins.
    let d = decide(Op::Update, &v(9, "b"), &row(v(7, "a"), Some(true)), true);
    assert_eq!(d.action, Action::Write);
    let d = decide(Op::Delete, &v(9, "b"), &row(v(7, "a"), Some(false)), true);
    assert_eq!(d.action, Action::Delete);
}

/// One key's state on one node in the model.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Nothing,
    Row(u32, Version),
    Tomb(Version),
}

fn apply(state: &State, op: Op, value: u32, version: &Version) -> State {
    let local = match state {
        State::Nothing => Local::Nothing,
        State::Row(_, v) => row(v.clone(), Some(false)),
        State::Tomb(v) => tomb(v.clone()),
    };
    match decide(op, version, &local, false).action {
        Action::Skip => state.clone(),
        Action::Write => State::Row(value, version.clone()),
        Action::Delete => State::Tomb(version.clone()),
        Action::Merge => unreachable!("no resolver in the model"),
    }
}

fn op_strategy() -> impl Strategy<Value = (Op, u32, i64, u8)> {
    (
        prop_oneof![Just(Op::Create), Just(Op::Update), Just(Op::Delete)],
        any::<u32>(),
        0i64..40,
        0u8..3,
    )
}

proptest! {
    /// Every delivery order of the same versions ends in the state of the greatest version:
    /// the convergence argument of last-writer-wins with tombstones.
    #[test]
    fn every_delivery_order_converges_to_the_greatest_version(
        ops in prop::collection::vec(op_strategy(), 1..12),
        order_seed in any::<u64>(),
    ) {
        let ops: Vec<(Op, u32, Version)> = ops
            .into_iter()
            .map(|(op, value, ts, node)| (op, value, v(ts, ["a", "b", "c"][node as usize])))
            .collect();
        // Distinct versions only: one origin transaction writes a key once at the end.
        let mut seen = std::collections::HashSet::new();
        let ops: Vec<_> = ops.into_iter().filter(|(_, _, v)| seen.insert(v.clone())).collect();
        let (win_op, win_value, win_version) = ops.iter().max_by(|a, b| a.2.cmp(&b.2)).cloned().unwrap();
        let expected = if win_op == Op::Delete {
            State::Tomb(win_version)
        } else {
            State::Row(win_value, win_version)
        };
        let mut order: Vec<usize> = (0..ops.len()).collect();
        let mut seed = order_seed;
        for i in (1..order.len()).rev() {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            order.swap(i, (seed >> 33) as usize % (i + 1));
        }
        let mut state = State::Nothing;
        for &i in &order {
            let (op, value, version) = &ops[i];
            state = apply(&state, *op, *value, version);
        }
        prop_assert_eq!(state, expected);
    }
}

#[test]
fn a_merge_outranks_both_inputs_and_never_equals_a_write() {
    let (a, b) = (v(10, "a"), v(12, "b"));
    let m = merged_version(Some(&a), &b);
    assert!(m > a && m > b, "{m}");
    assert_eq!(m, v(12, "b+"));
    // The next real write of either node after seeing the merge is above it (t + 1).
    assert!(v(13, "a") > m);
    // Idempotent and commutative, also with merged inputs.
    assert_eq!(merged_version(Some(&m), &b), m);
    assert_eq!(merged_version(Some(&b), &a), m);
    assert_eq!(merged_version(Some(&m), &a), m);
    assert_eq!(merged_version(None, &a), v(10, "a+"));
    assert_eq!(merged_version(Some(&Version::unknown()), &a), v(10, "a+"));
}

proptest! {
    /// With a join resolver (here: the larger value), every delivery order of concurrent
    /// updates over one row ends with the same value *and* the same version on every node:
    /// the merge version is a function of the set of versions merged, not of how often or in
    /// which order merges happened.
    #[test]
    fn merges_converge_in_value_and_version(
        updates in prop::collection::vec((any::<u16>(), 1i64..30, 0u8..3), 1..8),
        seeds in prop::collection::vec(any::<u64>(), 2..4),
    ) {
        let updates: Vec<(u16, Version)> = updates
            .into_iter()
            .map(|(value, ts, node)| (value, v(ts, ["a", "b", "c"][node as usize])))
            .collect();
        let mut ends = Vec::new();
        for seed in seeds {
            let mut order: Vec<usize> = (0..updates.len()).collect();
            let mut s = seed;
            for i in (1..order.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                order.swap(i, (s >> 33) as usize % (i + 1));
            }
            let (mut value, mut version) = (0u16, v(0, "seed"));
            for &i in &order {
                let (remote_value, remote) = &updates[i];
                let decision = decide(Op::Update, remote, &row(version.clone(), Some(false)), true);
                match decision.action {
                    Action::Merge => {
                        value = value.max(*remote_value);
                        version = merged_version(Some(&version), remote);
                    }
                    Action::Skip => {}
                    other => panic!("{other:?}"),
                }
            }
            ends.push((value, version));
        }
        let top = updates.iter().map(|u| u.1.clone()).max().unwrap();
        let want = (updates.iter().map(|u| u.0).max().unwrap(), merged_version(None, &top));
        for end in ends {
            prop_assert_eq!(&end, &want);
        }
    }
}

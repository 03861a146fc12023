use serde_json::json;

use super::*;

fn begin(lsn: u64) -> StreamItem {
    StreamItem::Begin(BeginMarker {
        commit_lsn: Lsn(lsn),
        commit_ts_us: lsn as i64 * 1000,
        snapshot: false,
    })
}

fn change(n: i64) -> StreamItem {
    StreamItem::Change(Box::new(ChangeItem {
        schema: "s".into(),
        table: "t".into(),
        op: Op::Create,
        before: None,
        after: serde_json::from_value(json!({"id": n})).ok(),
        json_null_before: vec![],
        json_null_after: vec![],
        version: None,
    }))
}

fn commit(lsn: u64) -> StreamItem {
    StreamItem::Commit(CommitMarker {
        commit_lsn: Lsn(lsn),
        changes: 1,
    })
}

fn kinds(steps: &[Step]) -> String {
    steps
        .iter()
        .map(|s| match s {
            Step::Start(_) => 'B',
            Step::Apply(_) => 'a',
            Step::End(_) => 'C',
            Step::Ignore => '.',
            Step::Ack(_) => 'k',
            Step::Orphaned(_) => 'X',
            Step::Relation(_) => 'R',
            Step::Skipped(_) => 's',
            Step::Stray(_) => '!',
        })
        .collect()
}

#[test]
fn replayed_transactions_are_skipped() {
    let mut f = Framer::new(Lsn(10));
    let items = [
        begin(10),
        change(1),
        commit(10),
        begin(20),
        change(2),
        commit(20),
    ];
    let steps: Vec<Step> = items
        .into_iter()
        .enumerate()
        .map(|(i, it)| f.step(i as i64, it))
        .collect();
    assert_eq!(kinds(&steps), "...BaC");
    assert_eq!(f.applied(), Lsn(20));
}

#[test]
fn orphan_is_detected_and_skipped_on_replay() {
    let mut f = Framer::new(Lsn(0));
    // Offsets: 0 begin(5) 1 change 2 commit | 3 begin(9) 4 change [crash] 5 begin(9) 6 change 7 change 8 commit
    let stream = vec![
        begin(5),
        change(1),
        commit(5),
        begin(9),
        change(2),
        begin(9),
        change(2),
        change(3),
        commit(9),
    ];
    let mut steps = Vec::new();
    for (i, it) in stream.iter().cloned().enumerate().take(6) {
        steps.push(f.step(i as i64, it));
    }
    assert_eq!(kinds(&steps), "BaCBaX");
    assert_eq!(steps[5], Step::Orphaned(3));
    // The applier rolled back to its last commit (offset 2 done, lsn 5) and replays from 3.
    f.orphan(3, Lsn(5));
    let replay: Vec<Step> = stream
        .iter()
        .cloned()
        .enumerate()
        .skip(3)
        .map(|(i, it)| f.step(i as i64, it))
        .collect();
    assert_eq!(kinds(&replay), "..BaaC");
    assert_eq!(f.applied(), Lsn(9));
}

#[test]
fn records_outside_a_transaction_are_reported_not_dropped() {
    let mut f = Framer::new(Lsn(0));
    assert!(matches!(f.step(0, change(1)), Step::Stray(_)));
    assert!(matches!(f.step(1, commit(3)), Step::Stray(_)));
    // A commit of another transaction while one is open leaves the open one intact.
    assert!(matches!(f.step(2, begin(5)), Step::Start(_)));
    assert!(matches!(f.step(3, commit(4)), Step::Stray(_)));
    assert!(matches!(f.step(4, change(2)), Step::Apply(_)));
    assert!(matches!(f.step(5, commit(5)), Step::End(_)));
}

#[test]
fn parse_rejects_with_reasons() {
    assert!(parse(None).unwrap_err().0.contains("empty"));
    assert!(parse(Some(b"garbage")).unwrap_err().0.contains("not JSON"));
    assert!(parse(Some(br#"{"type":"begin"}"#))
        .unwrap_err()
        .0
        .contains("commit_lsn"));
    assert!(parse(Some(br#"{"type":"nope"}"#))
        .unwrap_err()
        .0
        .contains("unknown record type"));
    let ok = parse(Some(
        br#"{"type":"change","topic":"p.s.t","key":{"id":1},"change":{"op":"u","before":null,"after":{"id":1},"source":{"schema":"s","table":"t"}}}"#,
    ))
    .unwrap();
    match ok {
        StreamItem::Change(c) => {
            assert_eq!(
                (c.schema.as_str(), c.table.as_str(), c.op),
                ("s", "t", Op::Update)
            );
            assert_eq!(c.after.unwrap().get("id").map(|v| v.get()), Some("1"));
            assert_eq!(c.version, None);
        }
        other => panic!("{other:?}"),
    }
    let versioned = parse(Some(
        br#"{"type":"change","change":{"op":"d","before":{"id":1},"after":null,"source":{"schema":"s","table":"t","version":{"t_us":-5,"node":"n\u00e9"}}}}"#,
    ))
    .unwrap();
    match versioned {
        StreamItem::Change(c) => assert_eq!(
            c.version,
            Some(crate::event::Version {
                ts_us: -5,
                node: "n\u{e9}".into()
            })
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn skipped_records_parse_and_frame() {
    let item = parse(Some(
        br#"{"type":"skipped","run":1,"schema":"s","table":"t","lsn":"0/10","error":"too large"}"#,
    ))
    .unwrap();
    let mut f = Framer::new(Lsn(0));
    assert!(matches!(f.step(0, item.clone()), Step::Stray(_)));
    f.step(1, begin(5));
    match f.step(2, item) {
        Step::Skipped(s) => assert_eq!((s.table.as_str(), s.error.as_str()), ("t", "too large")),
        other => panic!("{other:?}"),
    }
    assert!(parse(Some(br#"{"type":"skipped","schema":"s","table":"t"}"#)).is_err());
}

#[test]
fn relation_records_parse_and_frame() {
    let item = parse(Some(
        br#"{"type":"relation","schema":"s","table":"t","columns":[{"name":"id","type":"bigint","not_null":true,"key":true},{"name":"n","type":"numeric(12,2)","not_null":false,"key":false}]}"#,
    ))
    .unwrap();
    let mut f = Framer::new(Lsn(0));
    assert!(
        matches!(f.step(0, item.clone()), Step::Stray(_)),
        "outside a transaction"
    );
    f.step(1, begin(5));
    match f.step(2, item) {
        Step::Relation(r) => {
            assert_eq!(r.columns[1].type_name, "numeric(12,2)");
            assert!(r.columns[0].key && r.columns[0].not_null);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn open_transaction_commit_time_is_its_own() {
    let mut f = Framer::new(Lsn(0));
    f.step(0, begin(20));
    f.step(1, commit(20));
    f.step(2, begin(30));
    assert_eq!(f.commit_ts_us(), 20_000, "last ended");
    assert_eq!(
        f.open_commit_ts_us(),
        Some(30_000),
        "the open one, for multi-master versions"
    );
    f.step(3, commit(30));
    assert_eq!(f.open_commit_ts_us(), None);
}

/// Steps `(offset, run, item)` records and returns the step kinds.
fn run_steps(f: &mut Framer, records: Vec<(i64, u64, StreamItem)>) -> String {
    let steps: Vec<Step> = records
        .into_iter()
        .map(|(offset, run, item)| f.step_run(offset, Some(run), item))
        .collect();
    kinds(&steps)
}

#[test]
fn late_records_of_a_dead_capture_run_are_skipped() {
    // Run 1 was killed mid-transaction; the broker appended two of its requests after run 2
    // had started replaying the same transaction. Without run ids, run 1's late commit would
    // end the transaction after one of its changes.
    let mut f = Framer::new(Lsn(0));
    let first = run_steps(
        &mut f,
        vec![(0, 1, begin(10)), (1, 1, change(1)), (2, 2, begin(10))],
    );
    assert_eq!(first, "BaX");
    f.orphan(0, Lsn(0));
    let replay = run_steps(
        &mut f,
        vec![
            (0, 1, begin(10)),
            (1, 1, change(1)),
            (2, 2, begin(10)),
            (3, 1, change(2)),
            (4, 1, commit(10)),
            (5, 2, change(1)),
            (6, 2, change(2)),
            (7, 2, commit(10)),
        ],
    );
    assert_eq!(replay, "..B..aaC");
}

#[test]
fn an_older_runs_transactions_before_the_newer_run_are_history() {
    // After a rewind, complete transactions of run 1 that precede run 2's first record are
    // applied again (the rollback discarded them), not mistaken for late records.
    let mut f = Framer::new(Lsn(0));
    let first = run_steps(
        &mut f,
        vec![
            (0, 1, begin(5)),
            (1, 1, change(1)),
            (2, 1, commit(5)),
            (3, 1, begin(6)),
            (4, 1, change(2)),
            (5, 2, begin(6)),
        ],
    );
    assert_eq!(first, "BaCBaX");
    f.orphan(3, Lsn(0));
    let replay = run_steps(
        &mut f,
        vec![
            (0, 1, begin(5)),
            (1, 1, change(1)),
            (2, 1, commit(5)),
            (3, 1, begin(6)),
            (4, 1, change(2)),
            (5, 2, begin(6)),
            (6, 2, change(2)),
            (7, 2, commit(6)),
        ],
    );
    assert_eq!(replay, "BaC..BaC");
}

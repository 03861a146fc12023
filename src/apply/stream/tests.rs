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
        unchanged_toast: vec![],
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
            Step::Rows(_) => 'r',
            Step::End(_) => 'C',
            Step::Ignore => '.',
            Step::Ack(_) => 'k',
            Step::Orphaned(_) => 'X',
            Step::Relation(_) => 'R',
            Step::Skipped(_) => 's',
            Step::Ddl(_) => 'D',
            Step::After(_) => 'A',
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

mod compact_items {
    //! A change's compact node-stream item and the per-table envelope that earlier captures
    //! wrapped instead read as the same change, whatever the row holds.
    use std::sync::Arc;

    use bytes::Bytes;
    use proptest::prelude::*;

    use super::super::parse;
    use crate::event::{Op, RelationMeta, RowChange, TxnMeta, Version};
    use crate::lsn::Lsn;
    use crate::pgtime::PgTimestamp;
    use crate::sink::kafka::encode::{encode_change_for_stream, EnvelopeSource, TxnStamp};
    use crate::sink::kafka::node_stream::change_record;
    use crate::source::pgoutput::{Column, Datum, ReplicaIdentity};
    use crate::value::TypeRegistry;

    /// int8, numeric, text, jsonb, int4[]: the key is the first.
    const TYPES: [u32; 5] = [20, 1700, 25, 3802, 1007];

    fn relation() -> Arc<RelationMeta> {
        let columns = TYPES
            .iter()
            .enumerate()
            .map(|(i, &type_oid)| Column {
                is_key: i == 0,
                name: format!("c{i} \"ü\""),
                type_oid,
                type_modifier: -1,
            })
            .collect();
        Arc::new(RelationMeta {
            oid: 1,
            schema: "s\"1".into(),
            table: "t\n2".into(),
            replica_identity: ReplicaIdentity::Full,
            columns,
        })
    }

    fn value_of(type_oid: u32) -> BoxedStrategy<Datum> {
        let text = match type_oid {
            20 => any::<i64>().prop_map(|n| n.to_string()).boxed(),
            1700 => (any::<i32>(), 0u32..1000)
                .prop_map(|(a, b)| format!("{a}.{b:03}"))
                .boxed(),
            3802 => prop_oneof![
                Just("null".to_owned()),
                "[a-z\"\\\\\n ]{0,6}".prop_map(|s| serde_json::json!({"k": [s, 1.5]}).to_string()),
            ]
            .boxed(),
            1007 => proptest::collection::vec(any::<i32>(), 0..3)
                .prop_map(|v| {
                    let items: Vec<String> = v.iter().map(i32::to_string).collect();
                    format!("{{{}}}", items.join(","))
                })
                .boxed(),
            _ => "[a-z\"\\\\\n\u{e9}\u{1f600} ]{0,12}".boxed(),
        };
        prop_oneof![
            1 => Just(Datum::Null),
            1 => Just(Datum::UnchangedToast),
            6 => text.prop_map(|t| Datum::Text(Bytes::from(t))),
        ]
        .boxed()
    }

    fn tuple() -> BoxedStrategy<Vec<Datum>> {
        let columns: Vec<_> = TYPES.iter().map(|&t| value_of(t)).collect();
        columns
            .prop_map(|mut t| {
                // A key is never NULL nor withheld.
                t[0] = Datum::Text(Bytes::from_static(b"7"));
                t
            })
            .boxed()
    }

    fn change() -> impl Strategy<Value = RowChange> {
        (
            prop_oneof![
                Just(Op::Create),
                Just(Op::Update),
                Just(Op::Delete),
                Just(Op::Read)
            ],
            proptest::option::of(tuple()),
            tuple(),
            any::<bool>(),
            proptest::option::of((any::<i64>(), "[a-z]{1,4}")),
        )
            .prop_map(|(op, before, after, key_only, version)| RowChange {
                op,
                relation: relation(),
                lsn: Lsn(0x10),
                before: if op == Op::Create || op == Op::Read {
                    None
                } else {
                    before
                },
                before_is_key_only: key_only,
                after: (op != Op::Delete).then_some(after),
                version: version.map(|(ts_us, node)| Version { ts_us, node }),
            })
    }

    proptest! {
        #[test]
        fn compact_and_wrapped_items_read_the_same(change in change()) {
            let source = EnvelopeSource {
                node: "n".into(),
                database: "d".into(),
                topic_prefix: "p".into(),
                tombstones: true,
                run: 3,
            };
            let txn = TxnStamp::new(&TxnMeta {
                xid: Some(9),
                commit_lsn: Lsn(0x20),
                commit_ts: PgTimestamp(5),
                origin: None,
            });
            let encoded = encode_change_for_stream(&source, &txn, &change, &TypeRegistry::default(), 1)
                .expect("every generated value encodes");
            let compact = change_record(&source, &encoded).value.unwrap();
            let envelope = std::str::from_utf8(encoded.records[0].value.as_ref().unwrap()).unwrap();
            let wrapped = format!(r#"{{"type":"change","run":3,"topic":"p.t","key":null,"change":{envelope}}}"#);
            let compact = parse(Some(&compact)).unwrap();
            let wrapped = parse(Some(wrapped.as_bytes())).unwrap();
            prop_assert_eq!(&compact, &wrapped);
            let crate::apply::stream::StreamItem::Change(item) = compact else {
                panic!("not a change: {compact:?}");
            };
            prop_assert_eq!(item.op, change.op);
            prop_assert_eq!(&item.schema, &change.relation.schema);
            prop_assert_eq!(&item.table, &change.relation.table);
            prop_assert_eq!(item.version, change.version);
            // Withheld (unchanged TOAST) columns are absent from the new row and listed, every
            // other column present.
            if let Some(after) = &change.after {
                let sent = after.iter().filter(|d| !matches!(d, Datum::UnchangedToast)).count();
                prop_assert_eq!(item.after.as_ref().map_or(0, |a| a.len()), sent);
                let withheld: Vec<String> = change
                    .relation
                    .columns
                    .iter()
                    .zip(after)
                    .filter(|(_, d)| matches!(d, Datum::UnchangedToast))
                    .map(|(c, _)| c.name.clone())
                    .collect();
                prop_assert_eq!(&item.unchanged_toast, &withheld);
            }
        }
    }
}

#[test]
fn a_ddl_record_parses_and_applies_inside_its_transaction() {
    let (_, item) = parse_framed(Some(
        br#"{"type":"ddl","run":1,"schema":"public","table":"t","ops":[{"op":"rename_column","from":"a","to":"b"},{"op":"add_column","column":{"attnum":3,"name":"c","type":"integer","not_null":false,"default":null}}]}"#,
    ))
    .expect("parses");
    let StreamItem::Ddl(ddl) = item.clone() else {
        panic!("{item:?}")
    };
    assert_eq!(ddl.ops.len(), 2);
    assert_eq!(
        ddl.ops[0],
        crate::ddl::DdlOp::RenameColumn {
            from: "a".into(),
            to: "b".into()
        }
    );
    // Outside a transaction it is stray, never applied.
    let mut framer = Framer::new(Lsn(0));
    assert!(matches!(framer.step(0, item), Step::Stray(_)));
}

mod ddl_order {
    use super::*;
    use crate::sink::kafka::encode::EnvelopeSource;
    use crate::sink::kafka::node_stream::{after_record, ddl_record};
    use proptest::prelude::*;

    fn lsns() -> impl Strategy<Value = BTreeMap<String, Lsn>> {
        prop::collection::btree_map("n[0-4]", (0u64..5).prop_map(|l| Lsn(l << 32 | 0x10)), 0..5)
    }

    proptest! {
        /// What the node had applied, and the settings the change ran under, travel with
        /// its schema change.
        #[test]
        fn applied_round_trips(
            applied in lsns(),
            settings in prop::collection::btree_map("[A-Za-z_]{1,12}", "[ -~]{0,20}", 0..4),
        ) {
            let source = EnvelopeSource {
                node: "n0".into(),
                database: "d".into(),
                topic_prefix: "p".into(),
                tombstones: true,
                run: 2,
            };
            let ops = [crate::ddl::DdlOp::DropColumn { name: "c".into() }];
            let resnapshot = settings.len() % 2 == 1;
            let record = ddl_record(&source, "public", "t", &ops, &applied, &settings, resnapshot);
            let payload = record.value.expect("a value");
            let (_, item) = parse_framed(Some(&payload)).expect("parses");
            let StreamItem::Ddl(ddl) = item else { panic!("{item:?}") };
            prop_assert_eq!(&ddl.applied, &applied);
            prop_assert_eq!(&ddl.settings, &settings);
            prop_assert_eq!(ddl.resnapshot, resnapshot);
            let payload = after_record(&source, &applied).value.expect("a value");
            let (_, item) = parse_framed(Some(&payload)).expect("parses");
            let StreamItem::After(after) = item.clone() else { panic!("{item:?}") };
            prop_assert_eq!(&after.applied, &applied);
            // Only inside a transaction.
            let mut framer = Framer::new(Lsn(0));
            prop_assert!(matches!(framer.step(0, item.clone()), Step::Stray(_)));
            prop_assert!(matches!(framer.step(1, begin(30)), Step::Start(_)));
            prop_assert!(matches!(framer.step(2, item), Step::After(_)));
        }

        /// A schema change waits for exactly the nodes a target applies (not skipped) and
        /// holds less of than the change's node had applied; the one named is such a node.
        #[test]
        fn waits_for_what_the_target_has_not_applied(
            applied in lsns(),
            here in lsns(),
            applies in prop::collection::vec("n[0-4]", 0..5),
            skip in "n[0-4]",
        ) {
            let behind: Vec<&String> = applied
                .iter()
                .filter(|(n, lsn)| {
                    applies.contains(n) && **n != skip && here.get(*n).is_none_or(|h| h < lsn)
                })
                .map(|(n, _)| n)
                .collect();
            match first_unapplied(&applied, &here, &applies, &[skip.as_str()]) {
                None => prop_assert!(behind.is_empty(), "{behind:?}"),
                Some((node, lsn)) => {
                    prop_assert!(behind.contains(&&node));
                    prop_assert_eq!(Some(&lsn), applied.get(&node));
                }
            }
        }
    }
}

mod rows_items {
    use super::*;
    use crate::event::PruneRange;
    use crate::sink::kafka::encode::EnvelopeSource;
    use crate::sink::kafka::node_stream::{rows_head, rows_record, rows_tail};
    use crate::value::copy_text;
    use proptest::prelude::*;

    fn source() -> EnvelopeSource {
        EnvelopeSource {
            node: "n".into(),
            database: "d".into(),
            topic_prefix: "p".into(),
            tombstones: true,
            run: 4,
        }
    }

    fn values() -> impl Strategy<Value = Vec<Vec<Option<String>>>> {
        prop::collection::vec(
            prop::collection::vec(
                prop::option::of("(\\\\|\t|\n|\r|\"|\u{1}|N|\\\\N|[a-zé ]|\u{1F600}){0,8}"),
                3,
            ),
            1..12,
        )
    }

    fn item_of(rows: &[Vec<Option<String>>]) -> RowsItem {
        item_with(rows, None)
    }

    fn item_with(rows: &[Vec<Option<String>>], prune: Option<&PruneRange>) -> RowsItem {
        let mut escaped = Vec::new();
        for row in rows {
            copy_text::push_row_json(
                &mut escaped,
                row.iter().map(|v| v.as_deref().map(str::as_bytes)),
            );
        }
        let head = rows_head(&source(), "public", "t\"x", &["id", "a b", "c"]);
        let tail = prune.map(|p| rows_tail(Some(p)));
        let record = rows_record(&source(), &head, &escaped, tail.as_deref());
        let (run, item) = parse_framed(record.value.as_deref()).expect("a rows record parses");
        assert_eq!(run, Some(4));
        let StreamItem::Rows(item) = item else {
            panic!("not rows: {item:?}")
        };
        *item
    }

    proptest! {
        /// What capture writes, apply reads back value for value, also row by row and through
        /// the dead-letter form.
        #[test]
        fn rows_written_by_capture_read_back_as_they_were(rows in values()) {
            let item = item_of(&rows);
            prop_assert_eq!(&item.table, "t\"x");
            prop_assert_eq!(&item.names, &["id", "a b", "c"]);
            prop_assert_eq!(item.len(), rows.len());
            prop_assert_eq!(copy_text::decode(item.copy.as_bytes()), rows.clone());
            let one_by_one: Vec<_> = item
                .split()
                .flat_map(|one| {
                    assert_eq!(one.len(), 1);
                    let again = parse(Some(one.to_json().as_bytes())).expect("a dead letter parses");
                    assert_eq!(again, StreamItem::Rows(Box::new(one.clone())));
                    copy_text::decode(one.copy.as_bytes())
                })
                .collect();
            prop_assert_eq!(one_by_one, rows);
        }

        /// A re-snapshot's range travels with the rows and back through the dead-letter form;
        /// the rows' keys read back by the range's key columns, and the range alone keeps them.
        #[test]
        fn a_range_reads_back_with_the_rows_keys(
            rows in values(),
            keep in prop::collection::vec(prop::collection::vec("[a-z0-9\\\\\t\"]{0,4}", 2), 0..4),
            after in prop::option::of(prop::collection::vec("[0-9]{1,3}", 2)),
            through in prop::option::of(prop::collection::vec("[0-9]{1,3}", 2)),
        ) {
            // The key is (c, id): not in column order.
            let range = PruneRange {
                key: vec!["c".into(), "id".into()],
                types: vec!["text".into(), "bigint".into()],
                orders: vec!["c:en_US.UTF-8:2.36:true".into(), String::new()],
                after,
                through,
                keep: keep.clone(),
            };
            let item = item_with(&rows, Some(&range));
            prop_assert_eq!(item.prune.as_ref(), Some(&range));
            prop_assert_eq!(copy_text::decode(item.copy.as_bytes()), rows.clone());
            let again = parse(Some(item.to_json().as_bytes())).expect("a dead letter parses");
            prop_assert_eq!(&again, &StreamItem::Rows(Box::new(item.clone())));
            let keys: Option<Vec<Vec<String>>> = rows
                .iter()
                .map(|r| Some(vec![r[2].clone()?, r[0].clone()?]))
                .collect();
            prop_assert_eq!(item.row_keys(), keys.clone());
            match (item.range_only(), keys) {
                (Some(alone), Some(keys)) => {
                    prop_assert!(alone.is_empty());
                    let kept = alone.prune.unwrap().keep;
                    prop_assert_eq!(kept, keep.into_iter().chain(keys).collect::<Vec<_>>());
                }
                (None, None) => {}
                (alone, keys) => prop_assert!(false, "range alone {alone:?} for keys {keys:?}"),
            }
            prop_assert!(item.split().all(|one| one.prune.is_none()));
            // A key of another width is refused: it would match no row.
            let mut short = range.clone();
            short.keep.push(vec!["1".into()]);
            let refused = parse(Some(item_with(&rows, None).to_json().replace(
                "\"type\":\"rows\"",
                &format!("\"type\":\"rows\",\"prune\":{}", serde_json::to_string(&short).unwrap()),
            ).as_bytes()));
            prop_assert!(matches!(refused, Err(ref e) if e.0.contains("field `prune`")), "{refused:?}");
            // Without a range there are no keys to read.
            prop_assert_eq!(item_of(&rows).row_keys(), None);
        }

        /// A column dropped on the target since: its values leave every row, the rest stay.
        #[test]
        fn a_dropped_column_leaves_every_row(rows in values(), at in 0usize..3) {
            let mut item = item_of(&rows);
            let names = item.names.clone();
            item.follow_column(&names[at], None);
            let mut expected_names = names.clone();
            expected_names.remove(at);
            prop_assert_eq!(&item.names, &expected_names);
            let expected: Vec<Vec<Option<String>>> = rows
                .iter()
                .map(|row| row.iter().enumerate().filter(|&(i, _)| i != at).map(|(_, v)| v.clone()).collect())
                .collect();
            prop_assert_eq!(copy_text::decode(item.copy.as_bytes()), expected);
            item.follow_column(&expected_names[0], Some("renamed"));
            prop_assert_eq!(&item.names[0], "renamed");
        }
    }

    #[test]
    fn rows_outside_a_transaction_are_stray_and_inside_apply() {
        let rows = item_of(&[vec![Some("1".into()), None, Some("x".into())]]);
        let mut framer = Framer::new(Lsn(0));
        let item = StreamItem::Rows(Box::new(rows.clone()));
        assert!(matches!(framer.step(1, item.clone()), Step::Stray(_)));
        assert!(matches!(framer.step(2, begin(10)), Step::Start(_)));
        assert_eq!(framer.step(3, item), Step::Rows(Box::new(rows)));
    }
}

/// [`Followed`] traces each column back to its writer's name through renames (a swap through
/// a temporary name included) and leaves out the columns dropped, while the item itself
/// follows them.
#[test]
fn followed_traces_columns_back_to_the_writers_names() {
    let mut item = ChangeItem {
        schema: "s".into(),
        table: "t".into(),
        op: Op::Update,
        before: None,
        after: serde_json::from_value(json!({"a": 1, "b": 2, "c": 3, "d": 4})).ok(),
        json_null_before: vec![],
        json_null_after: vec![],
        unchanged_toast: vec![],
        version: None,
    };
    let mut followed = Followed::new(&mut item);
    followed.follow_column("a", Some("tmp"));
    followed.follow_column("b", Some("a"));
    followed.follow_column("tmp", Some("b"));
    followed.follow_column("c", None);
    followed.follow_column("d", Some("e"));
    let names = followed.writers_names();
    let mut pairs: Vec<(&str, &str)> = names
        .iter()
        .map(|(now, writer)| (now.as_str(), writer.as_str()))
        .collect();
    pairs.sort_unstable();
    assert_eq!(pairs, [("a", "b"), ("b", "a"), ("e", "d")]);
    let now: Vec<&String> = item.column_names().collect();
    assert_eq!(now, ["b", "a", "e"]);
}

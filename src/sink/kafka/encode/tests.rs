use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Value};

use super::*;
use crate::lsn::Lsn;
use crate::pgtime::PgTimestamp;
use crate::source::pgoutput::{Column, ReplicaIdentity};

fn col(name: &str, type_oid: u32, is_key: bool) -> Column {
    Column {
        is_key,
        name: name.into(),
        type_oid,
        type_modifier: -1,
    }
}

fn rel() -> Arc<RelationMeta> {
    Arc::new(RelationMeta {
        oid: 1,
        schema: "public".into(),
        table: "Orders Ü".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            col("id", 20, true),
            col("amount", 1700, false),
            col("doc", 25, false),
        ],
    })
}

fn t(s: &str) -> Datum {
    Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
}

fn src(tombstones: bool) -> EnvelopeSource {
    EnvelopeSource {
        node: "node-a".into(),
        database: "db".into(),
        topic_prefix: "pgferry".into(),
        tombstones,
        run: 1,
    }
}

fn txn() -> TxnMeta {
    TxnMeta {
        xid: Some(42),
        commit_lsn: Lsn(0x1_0000_0010),
        commit_ts: PgTimestamp(1),
        origin: None,
    }
}

fn value(r: &Record) -> Value {
    serde_json::from_slice(r.value.as_ref().unwrap()).unwrap()
}

#[test]
fn insert_envelope_is_exact() {
    let change = RowChange {
        op: Op::Create,
        relation: rel(),
        lsn: Lsn(0x1_0000_0008),
        before: None,
        before_is_key_only: false,
        after: Some(vec![t("7"), t("1.50"), Datum::Null]),
        version: None,
    };
    let recs = encode_change(
        &src(true),
        &TxnStamp::new(&txn()),
        &change,
        &TypeRegistry::default(),
        99,
    )
    .unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].topic, "pgferry.public.Orders__");
    assert_eq!(recs[0].key.as_deref(), Some(&br#"{"id":7}"#[..]));
    assert_eq!(
        value(&recs[0]),
        json!({
            "op": "c", "before": null,
            "after": {"id": 7, "amount": "1.50", "doc": null},
            "source": {"node": "node-a", "db": "db", "schema": "public", "table": "Orders Ü",
                       "lsn": "1/8", "commit_lsn": "1/10",
                       "commit_ts": "2000-01-01T00:00:00.000001Z",
                       "commit_ts_us": 946684800000001i64, "xid": 42, "origin": null,
                       "snapshot": false},
            "ts_ms": 99
        })
    );
}

#[test]
fn a_multi_master_version_travels_in_source() {
    let change = RowChange {
        op: Op::Delete,
        relation: rel(),
        lsn: Lsn(0x1_0000_0008),
        before: Some(vec![t("7"), t("1.50"), Datum::Null]),
        before_is_key_only: false,
        after: None,
        version: Some(crate::event::Version {
            ts_us: 1_795_435_200_123_457,
            node: "node-a".into(),
        }),
    };
    let recs = encode_change(
        &src(false),
        &TxnStamp::new(&txn()),
        &change,
        &TypeRegistry::default(),
        99,
    )
    .unwrap();
    assert_eq!(
        value(&recs[0])["source"]["version"],
        json!({"t_us": 1_795_435_200_123_457i64, "node": "node-a"})
    );
}

#[test]
fn unchanged_toast_is_listed_not_nulled() {
    let change = RowChange {
        op: Op::Update,
        relation: rel(),
        lsn: Lsn(1),
        before: None,
        before_is_key_only: false,
        after: Some(vec![t("7"), t("2"), Datum::UnchangedToast]),
        version: None,
    };
    let recs = encode_change(
        &src(true),
        &TxnStamp::new(&txn()),
        &change,
        &TypeRegistry::default(),
        0,
    )
    .unwrap();
    let v = value(&recs[0]);
    assert_eq!(v["after"], json!({"id": 7, "amount": "2"}));
    assert_eq!(v[UNCHANGED_TOAST_FIELD], json!(["doc"]));
}

#[test]
fn delete_uses_old_key_and_adds_tombstone() {
    let change = RowChange {
        op: Op::Delete,
        relation: rel(),
        lsn: Lsn(1),
        before: Some(vec![t("7"), Datum::Null, Datum::Null]),
        before_is_key_only: true,
        after: None,
        version: None,
    };
    let recs = encode_change(
        &src(true),
        &TxnStamp::new(&txn()),
        &change,
        &TypeRegistry::default(),
        0,
    )
    .unwrap();
    assert_eq!(recs.len(), 2);
    assert_eq!(value(&recs[0])["before"], json!({"id": 7}));
    assert_eq!(recs[1].key.as_deref(), Some(&br#"{"id":7}"#[..]));
    assert_eq!(recs[1].value, None);
    let recs = encode_change(
        &src(false),
        &TxnStamp::new(&txn()),
        &change,
        &TypeRegistry::default(),
        0,
    )
    .unwrap();
    assert_eq!(recs.len(), 1);
}

#[test]
fn bad_value_names_table_and_column() {
    let change = RowChange {
        op: Op::Create,
        relation: rel(),
        lsn: Lsn(1),
        before: None,
        before_is_key_only: false,
        after: Some(vec![t("seven"), t("1"), Datum::Null]),
        version: None,
    };
    let err = encode_change(
        &src(true),
        &TxnStamp::new(&txn()),
        &change,
        &TypeRegistry::default(),
        0,
    )
    .unwrap_err();
    assert_eq!(err.to_string(), "public.Orders Ü.id");
    let cause = std::error::Error::source(&err).map(|c| c.to_string());
    assert!(cause.is_some_and(|c| c.contains("int8")), "{err:?}");
}

#[test]
fn topic_names_are_kafka_legal() {
    let long = "x".repeat(300);
    assert_eq!(topic_name("p", "s", &long).len(), 249);
    assert_eq!(topic_name("p", "my schema", "t/1"), "p.my_schema.t_1");
}

proptest::proptest! {
    /// Any names, clean or not, ASCII or not: the topic is the three parts joined by dots,
    /// each character outside Kafka's alphabet replaced by `_`, cut at Kafka's 249.
    #[test]
    fn topic_names_replace_each_illegal_character(
        prefix in "[a-z.]{0,5}", schema in "\\PC{0,12}", table in "[a-zA-Z0-9_ Üß/-]{0,300}",
    ) {
        let clean = |s: &str| -> String {
            s.chars()
                .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' })
                .collect()
        };
        let mut expected = format!("{}.{}.{}", clean(&prefix), clean(&schema), clean(&table));
        expected.truncate(249);
        proptest::prop_assert_eq!(topic_name(&prefix, &schema, &table), expected);
    }
}

#[test]
fn json_null_literal_is_distinguished_from_sql_null() {
    let relation = Arc::new(RelationMeta {
        oid: 2,
        schema: "public".into(),
        table: "j".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            col("id", 23, true),
            col("doc", 3802, false),
            col("other", 3802, false),
        ],
    });
    let change = RowChange {
        op: Op::Create,
        relation,
        lsn: Lsn(1),
        before: None,
        before_is_key_only: false,
        after: Some(vec![t("1"), t("null"), Datum::Null]),
        version: None,
    };
    let recs = encode_change(
        &src(true),
        &TxnStamp::new(&txn()),
        &change,
        &TypeRegistry::default(),
        0,
    )
    .unwrap();
    let v = value(&recs[0]);
    assert_eq!(v["after"], json!({"id": 1, "doc": null, "other": null}));
    assert_eq!(v[JSON_NULL_FIELD], json!({"after": ["doc"]}));
}

/// Column types the envelope property draws from: (oid, a value's server text by seed).
const TYPES: [(u32, &[&str]); 6] = [
    (23, &["0", "-2147483648", "42"]),
    (20, &["9007199254740993", "-7", "0"]),
    (25, &["", "a\"b\\c\n\t", "Ünï ✓", "\u{1}"]),
    (3802, &["null", "{\"a\": [1, 2.50]}", "\"s\"", "3"]),
    (
        1184,
        &[
            "2024-02-29 23:59:59.12+00",
            "infinity",
            "0044-03-15 12:00:00+00 BC",
        ],
    ),
    (16, &["t", "f"]),
];

proptest::proptest! {
    /// The hand-written envelope and node-stream item are what an independent rendering of the
    /// same change says, for any mix of ops, types, NULLs, unchanged TOAST, JSON nulls,
    /// versions, names that need escaping, and transactions with or without xid and origin.
    #[test]
    fn envelope_and_stream_item_match_an_independent_rendering(
        columns in proptest::collection::vec((0usize..TYPES.len(), proptest::bool::ANY, "[a-z\"\\\\Ü ]{1,4}"), 1..5),
        cells in proptest::collection::vec((0usize..8, 0usize..4), 8),
        op in 0usize..5,
        versioned: bool,
        xid: Option<u32>,
        origin in proptest::option::of("[a-z\"]{0,5}"),
        node in "[a-z\"\\\\-]{1,6}",
        lsn: u64,
    ) {
        let relation = Arc::new(RelationMeta {
            oid: 9,
            schema: "s\"chema".into(),
            table: "t".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: columns
                .iter()
                .enumerate()
                .map(|(i, (ty, key, name))| col(&format!("{i}{name}"), TYPES[*ty].0, *key))
                .collect(),
        });
        let op = [Op::Create, Op::Update, Op::Delete, Op::Read, Op::Update][op];
        // A datum per column from a seed: 0 NULL, 1 unchanged TOAST (new images of updates
        // only, never a key), else a value of the column's type.
        let tuple = |shift: usize, toast_ok: bool| -> Tuple {
            columns
                .iter()
                .enumerate()
                .map(|(i, (ty, key, _))| {
                    let (kind, pick) = cells[(i + shift) % cells.len()];
                    let values = TYPES[*ty].1;
                    match kind {
                        0 if !key => Datum::Null,
                        1 if toast_ok && !key => Datum::UnchangedToast,
                        _ => t(values[pick % values.len()]),
                    }
                })
                .collect()
        };
        let before = matches!(op, Op::Update | Op::Delete).then(|| tuple(3, false));
        let after = (op != Op::Delete).then(|| tuple(0, op == Op::Update));
        let version = versioned.then(|| crate::event::Version { ts_us: 17, node: "n\"1".into() });
        let change = RowChange { op, relation: relation.clone(), lsn: Lsn(lsn), before: before.clone(),
                                 before_is_key_only: false, after: after.clone(), version: version.clone() };
        let txn = TxnMeta { xid, commit_lsn: Lsn(0x2_0000_0001), commit_ts: PgTimestamp(5), origin: origin.clone() };
        let mut source = src(false);
        source.node = node.clone();
        let types = TypeRegistry::default();
        let encoded = encode_change_for_stream(&source, &TxnStamp::new(&txn), &change, &types, 1234).unwrap();

        // The independent rendering: serde_json values of each column's conversion.
        let image = |tuple: &Option<Tuple>, only_keys: bool| -> (Value, Vec<String>, Vec<String>) {
            let Some(tuple) = tuple else { return (Value::Null, vec![], vec![]) };
            let (mut object, mut toast, mut nulls) = (serde_json::Map::new(), vec![], vec![]);
            for (c, d) in relation.columns.iter().zip(tuple) {
                if only_keys && !c.is_key { continue; }
                match d {
                    Datum::Null => { object.insert(c.name.clone(), Value::Null); }
                    Datum::UnchangedToast => toast.push(c.name.clone()),
                    Datum::Text(b) => {
                        let v = serde_json::to_value(crate::value::text_to_json(
                            &types.resolve(c.type_oid), std::str::from_utf8(b).unwrap()).unwrap()).unwrap();
                        if v.is_null() { nulls.push(c.name.clone()); }
                        object.insert(c.name.clone(), v);
                    }
                    Datum::Binary(_) => unreachable!(),
                }
            }
            (Value::Object(object), toast, nulls)
        };
        let (before_json, _, before_nulls) = image(&before, false);
        let (after_json, toast, after_nulls) = image(&after, false);
        let mut envelope = json!({
            "op": op.code(), "before": before_json, "after": after_json,
            "source": {"node": node, "db": "db", "schema": "s\"chema", "table": "t",
                       "lsn": Lsn(lsn).to_string(), "commit_lsn": "2/1",
                       "commit_ts": "2000-01-01T00:00:00.000005Z", "commit_ts_us": 946684800000005i64,
                       "xid": xid, "origin": origin, "snapshot": op == Op::Read},
            "ts_ms": 1234,
        });
        let mut item = json!({"op": op.code(), "schema": "s\"chema", "table": "t",
                              "before": before_json, "after": after_json});
        match &version {
            Some(v) => {
                envelope["source"]["version"] = json!({"t_us": v.ts_us, "node": v.node});
                item["version"] = json!({"t_us": v.ts_us, "node": v.node});
            }
            None => item["commit_ts_us"] = json!(946684800000005i64),
        }
        for out in [&mut envelope, &mut item] {
            if !toast.is_empty() { out[UNCHANGED_TOAST_FIELD] = json!(toast); }
            let mut nulls = serde_json::Map::new();
            if !before_nulls.is_empty() { nulls.insert("before".into(), json!(before_nulls)); }
            if !after_nulls.is_empty() { nulls.insert("after".into(), json!(after_nulls)); }
            if !nulls.is_empty() { out[JSON_NULL_FIELD] = Value::Object(nulls); }
        }
        proptest::prop_assert_eq!(value(&encoded.records[0]), envelope.clone());
        proptest::prop_assert_eq!(serde_json::from_slice::<Value>(&encoded.stream).unwrap(), item);
        // Field order is part of the format (preserve_order keeps it when printed again).
        proptest::prop_assert_eq!(
            serde_json::to_string(&value(&encoded.records[0])).unwrap(),
            serde_json::to_string(&envelope).unwrap()
        );
        // Another change to the same table with the same op in the same transaction, with
        // its own row, position, version and time, through the same frame (as a transaction's
        // run of changes to a table and a snapshot chunk's rows are) comes out as if encoded
        // on its own; so does the first.
        let stamp = TxnStamp::new(&txn);
        let frame = Frame::new(&source, &stamp, &relation, op);
        let other = RowChange {
            after: after.as_ref().map(|_| tuple(5, op == Op::Update)),
            lsn: Lsn(lsn.wrapping_add(40)),
            version: (!versioned).then(|| crate::event::Version { ts_us: 18, node: "n2".into() }),
            ..change.clone()
        };
        proptest::prop_assert_eq!(&frame.encode(&change, &types, 1234).unwrap(), &encoded);
        // Without the item, the same records.
        let alone = frame.encode_envelope(&change, &types, 1234).unwrap();
        proptest::prop_assert_eq!(&alone.records, &encoded.records);
        proptest::prop_assert!(alone.stream.is_empty());
        proptest::prop_assert_eq!(
            frame.encode(&other, &types, 99).unwrap(),
            encode_change_for_stream(&source, &stamp, &other, &types, 99).unwrap()
        );
        let key = if relation.has_key() {
            let usable = |t: &Option<Tuple>| t.as_ref().is_some_and(|t| relation.key_indices().all(|i| !matches!(t[i], Datum::UnchangedToast)));
            let image_of = if usable(&after) { &after } else { &before };
            Some(image(image_of, true).0)
        } else {
            None
        };
        proptest::prop_assert_eq!(
            encoded.records[0].key.as_ref().map(|k| serde_json::from_slice::<Value>(k).unwrap()),
            key
        );
    }
}

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

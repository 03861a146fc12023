//! Capture end to end against real PostgreSQL and a real broker: value encoding of many types,
//! the initial snapshot, unchanged TOAST markers, and tables without a key.

mod common;

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use common::broker::Broker;
use common::ferry::Ferry;
use common::kafka::{node_items, Record, TopicReader};
use common::pg::PgCluster;
use serde_json::{json, Value};

fn broker() -> &'static Broker {
    static BROKER: OnceLock<Broker> = OnceLock::new();
    BROKER.get_or_init(Broker::start)
}

fn topic(db: &str, table: &str) -> String {
    format!("{db}.public.{table}")
}

fn start_ferry(db: &str, extra_source: &str) -> Ferry {
    Ferry::capture(PgCluster::shared(), db, &broker().address(), extra_source)
}

fn ops(records: &[Record]) -> Vec<String> {
    records
        .iter()
        .map(|r| match &r.value {
            Some(v) => v["op"].as_str().unwrap_or("?").to_owned(),
            None => "tombstone".to_owned(),
        })
        .collect()
}

/// Acceptance 1: inserts, updates and deletes across 18 column types arrive in the table's
/// topic with exact keys and before/after values.
#[tokio::test(flavor = "multi_thread")]
async fn types_round_trip_exactly() {
    let pg = PgCluster::shared();
    let (db, c) = pg
        .fresh_db(
            "types",
            "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
         CREATE TABLE typed (
             id bigint PRIMARY KEY, n numeric(30,10), j jsonb, u uuid, b bytea, ts timestamptz,
             tags text[], m mood, i2 smallint, i4 int, f8 float8, flag bool, t text, d date,
             big bigint, ints int[], js json, tsn timestamp, iv interval, moods mood[]);
         ALTER TABLE typed REPLICA IDENTITY FULL;",
        )
        .await;
    let ferry = start_ferry(&db, "");
    ferry.wait_ready().await;
    c.batch_execute(
        r#"INSERT INTO typed VALUES (1, '12345678901234567890.0123456789',
              '{"big": 12345678901234567890123, "a": [1, 2.50, {"b": null}]}',
              'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\xdeadbeef00',
              '2024-02-29 13:14:15.123456+02', ARRAY['a', 'b c', 'NULL', NULL],
              'happy', -32768, 2147483647, 0.1, true, 'héllo "quoted" \ back', '2024-01-31',
              9007199254740993, '{{1,2},{3,4}}', '{"z": 1, "a": 2}', '2020-01-01 00:00:00',
              '1 day 02:03:04', '{sad,happy}');
           INSERT INTO typed (id) VALUES (2);
           UPDATE typed SET t = 'changed', n = '-0.0000000001' WHERE id = 1;
           DELETE FROM typed WHERE id = 2;"#,
    )
    .await
    .unwrap();
    let topics = [topic(&db, "typed")];
    let records =
        TopicReader::new(&broker().address())
            .read_until(&topics, Duration::from_secs(60), |r| r.len() >= 5);
    assert_eq!(ops(&records), ["c", "c", "u", "d", "tombstone"]);

    let row1 = json!({
        "id": 1, "n": "12345678901234567890.0123456789",
        "j": serde_json::from_str::<Value>(r#"{"a": [1, 2.50, {"b": null}], "big": 12345678901234567890123}"#).unwrap(),
        "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "b": "3q2+7wA=",
        "ts": "2024-02-29T11:14:15.123456Z", "tags": ["a", "b c", "NULL", null], "m": "happy",
        "i2": -32768, "i4": 2147483647, "f8": serde_json::from_str::<Value>("0.1").unwrap(),
        "flag": true, "t": "héllo \"quoted\" \\ back", "d": "2024-01-31",
        "big": "9007199254740993", "ints": [[1, 2], [3, 4]],
        "js": "{\"z\": 1, \"a\": 2}", "tsn": "2020-01-01T00:00:00.000000", "iv": "1 day 02:03:04",
        "moods": ["sad", "happy"]
    });
    let nulls: Value = row1
        .as_object()
        .unwrap()
        .keys()
        .map(|k| (k.clone(), if k == "id" { json!(2) } else { Value::Null }))
        .collect::<serde_json::Map<_, _>>()
        .into();
    let mut row1_updated = row1.clone();
    row1_updated["t"] = json!("changed");
    row1_updated["n"] = json!("-0.0000000001");

    let v: Vec<&Value> = records
        .iter()
        .map(|r| r.value.as_ref().unwrap_or(&Value::Null))
        .collect();
    assert_eq!(records[0].key, Some(json!({"id": 1})));
    assert_eq!(v[0]["before"], Value::Null);
    assert_eq!(v[0]["after"], row1);
    assert_eq!(records[1].key, Some(json!({"id": 2})));
    assert_eq!(v[1]["after"], nulls);
    assert_eq!(records[2].key, Some(json!({"id": 1})));
    assert_eq!(v[2]["before"], row1);
    assert_eq!(v[2]["after"], row1_updated);
    assert_eq!(records[3].key, Some(json!({"id": 2})));
    assert_eq!(v[3]["before"], nulls);
    assert_eq!(v[3]["after"], Value::Null);
    assert_eq!(records[4].key, Some(json!({"id": 2})));

    let source = &v[0]["source"];
    assert_eq!(source["node"], "node-a");
    assert_eq!(source["db"], json!(db));
    assert_eq!(source["schema"], "public");
    assert_eq!(source["table"], "typed");
    assert_eq!(source["snapshot"], false);
    // One transaction: both inserts and the update and delete share xid and commit position.
    for x in &v[1..4] {
        assert_eq!(x["source"]["xid"], source["xid"]);
        assert_eq!(x["source"]["commit_lsn"], source["commit_lsn"]);
    }
    let commit_ts = source["commit_ts"].as_str().unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(commit_ts).is_ok(),
        "{commit_ts}"
    );
    assert_eq!(
        commit_ts.len(),
        "2024-01-01T00:00:00.000000Z".len(),
        "{commit_ts}"
    );
    let lsn = source["lsn"].as_str().unwrap();
    assert!(lsn.parse::<pgferry::lsn::Lsn>().is_ok(), "{lsn}");
    // The commit timestamp in the envelope is the one PostgreSQL recorded.
    let recorded: String = c
        .query_one(
            "SELECT to_char(pg_xact_commit_timestamp(xmin) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') FROM typed WHERE id = 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(commit_ts, recorded);
    // The node stream frames the same transaction: begin, the four changes in order, commit,
    // all in one record (a bundle of items, one per line).
    let node_topic = [format!("{db}.__node.node-a")];
    let records = TopicReader::new(&broker().address()).read_until(
        &node_topic,
        Duration::from_secs(60),
        |r| node_items(r).len() >= 7,
    );
    assert_eq!(records.len(), 1, "one record for the transaction");
    let stream = node_items(&records);
    let kinds: Vec<&str> = stream.iter().map(|v| v["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["begin", "relation", "change", "change", "change", "change", "commit"]
    );
    // The table's schema is announced before its first change, as the source defines it.
    let relation = &stream[1];
    assert_eq!(relation["table"], "typed");
    assert_eq!(
        relation["columns"][0],
        json!({"name": "id", "type": "bigint", "not_null": true, "key": true})
    );
    assert_eq!(
        relation["columns"][1],
        json!({"name": "n", "type": "numeric(30,10)", "not_null": false, "key": false})
    );
    // Each change item carries its envelope's row images, without the `source` block that
    // the markers already carry.
    for (item, envelope) in stream[2..6].iter().zip(&v[..4]) {
        for field in ["op", "before", "after"] {
            assert_eq!(item[field], envelope[field], "{field} of {item}");
        }
        assert_eq!(item["schema"], envelope["source"]["schema"]);
        assert_eq!(item["table"], envelope["source"]["table"]);
        assert!(item.get("source").is_none(), "{item}");
    }
    let commit = &stream[6];
    assert_eq!(commit["changes"], 4);
    assert_eq!(commit["commit_lsn"], source["commit_lsn"]);
    assert_eq!(stream[0]["commit_ts"], source["commit_ts"]);
    // Metrics count what was captured.
    assert_eq!(
        ferry.metric("pgferry_changes_captured_total", "table=\"public.typed\""),
        Some(4.0)
    );
}

/// Acceptance 2: rows present at first start arrive as `op: "r"`; rows written while the
/// snapshot runs are neither lost nor stale once the stream catches up.
#[tokio::test(flavor = "multi_thread")]
async fn snapshot_then_stream_has_no_gap() {
    let pg = PgCluster::shared();
    let db = pg.create_db("snap").await;
    let c = pg.client(&db).await;
    const INITIAL: i64 = 20_000;
    c.batch_execute(&format!(
        "CREATE TABLE items (id bigint PRIMARY KEY, v int NOT NULL);
         INSERT INTO items SELECT g, 0 FROM generate_series(1, {INITIAL}) g;"
    ))
    .await
    .unwrap();
    // A writer that keeps changing old rows and adding new ones while pgferry starts up.
    let writer_db = db.clone();
    let writer = tokio::spawn(async move {
        let c = PgCluster::shared().client(&writer_db).await;
        for i in 0..300i64 {
            c.batch_execute(&format!(
                "UPDATE items SET v = v + 1 WHERE id IN ({a}, {b});
                 INSERT INTO items VALUES ({n}, {i});
                 DELETE FROM items WHERE id = {d};",
                a = (i * 37) % INITIAL + 1,
                b = (i * 91) % INITIAL + 1,
                n = INITIAL + 1 + i,
                d = INITIAL - i,
            ))
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ferry = start_ferry(&db, "  snapshot: exported\n  snapshot_batch_rows: 1000\n");
    writer.await.unwrap();

    let expected: BTreeMap<i64, i32> = c
        .query("SELECT id, v FROM items", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let topics = [topic(&db, "items")];
    let mut folded: BTreeMap<i64, i64> = BTreeMap::new();
    let mut reads: BTreeMap<i64, u32> = BTreeMap::new();
    let mut folded_upto = 0;
    let records = TopicReader::new(&broker().address()).read_until(
        &topics,
        Duration::from_secs(120),
        |recs| {
            // Fold the new records: the last record for each key wins; tombstones delete.
            for r in &recs[folded_upto..] {
                let id = r.key.as_ref().unwrap()["id"].as_i64().unwrap();
                match r
                    .value
                    .as_ref()
                    .and_then(|v| v.get("after"))
                    .filter(|a| !a.is_null())
                {
                    Some(after) => {
                        folded.insert(id, after["v"].as_i64().unwrap());
                    }
                    None => {
                        folded.remove(&id);
                    }
                }
            }
            folded_upto = recs.len();
            folded.len() == expected.len()
                && folded
                    .iter()
                    .all(|(k, v)| expected.get(k).map(|e| i64::from(*e)) == Some(*v))
        },
    );
    for r in &records {
        if r.value.as_ref().is_some_and(|v| v["op"] == "r") {
            *reads
                .entry(r.key.as_ref().unwrap()["id"].as_i64().unwrap())
                .or_default() += 1;
        }
    }
    // Every row that existed before the writer started was read by the snapshot exactly once
    // (unless the writer deleted it before the slot was created).
    let deleted_early: Vec<i64> = (1..=INITIAL)
        .filter(|id| !reads.contains_key(id) && !expected.contains_key(id))
        .collect();
    for id in 1..=INITIAL {
        if deleted_early.contains(&id) {
            continue;
        }
        assert_eq!(
            reads.get(&id),
            Some(&1),
            "row {id} read {:?} times by the snapshot",
            reads.get(&id)
        );
    }
    assert!(
        reads.len() as i64 >= INITIAL - 300,
        "snapshot read only {} rows",
        reads.len()
    );
    let snapshot_flags: Vec<bool> = records
        .iter()
        .filter_map(|r| r.value.as_ref())
        .filter(|v| v["op"] == "r")
        .map(|v| v["source"]["snapshot"].as_bool().unwrap())
        .collect();
    assert!(snapshot_flags.iter().all(|s| *s));
}

/// Acceptance 6: an update that leaves a large TOASTed column unchanged carries the explicit
/// marker; the column is absent from `after`, not null.
#[tokio::test(flavor = "multi_thread")]
async fn unchanged_toast_is_marked() {
    let pg = PgCluster::shared();
    let (db, c) = pg
        .fresh_db(
            "toast",
            "CREATE TABLE docs (id int PRIMARY KEY, body text, n int);
         ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;",
        )
        .await;
    let ferry = start_ferry(&db, "");
    ferry.wait_ready().await;
    c.batch_execute(
        "INSERT INTO docs VALUES (1, repeat('0123456789abcdef', 8192), 1);
         UPDATE docs SET n = 2 WHERE id = 1;",
    )
    .await
    .unwrap();
    let topics = [topic(&db, "docs")];
    let records =
        TopicReader::new(&broker().address())
            .read_until(&topics, Duration::from_secs(60), |r| r.len() >= 2);
    let insert = records[0].value.as_ref().unwrap();
    assert_eq!(
        insert["after"]["body"].as_str().map(str::len),
        Some(16 * 8192)
    );
    let update = records[1].value.as_ref().unwrap();
    assert_eq!(update["op"], "u");
    assert_eq!(update["after"], json!({"id": 1, "n": 2}));
    assert_eq!(update["unchanged_toast"], json!(["body"]));
}

/// A table with neither primary key nor replica identity: inserts still flow (without a key)
/// and pgferry warns with the fix.
#[tokio::test(flavor = "multi_thread")]
async fn keyless_table_inserts_flow_with_warning() {
    let pg = PgCluster::shared();
    let (db, c) = pg
        .fresh_db("nokey", "CREATE TABLE events (at int, what text)")
        .await;
    let ferry = start_ferry(&db, "");
    ferry.wait_ready().await;
    c.batch_execute("INSERT INTO events VALUES (1, 'a'), (2, 'b')")
        .await
        .unwrap();
    let topics = [topic(&db, "events")];
    // The table's (empty) snapshot starts with a truncate: a table without a key is
    // snapshotted onto emptied targets.
    let records: Vec<Record> = TopicReader::new(&broker().address())
        .read_until(&topics, Duration::from_secs(60), |r| r.len() >= 3)
        .into_iter()
        .filter(|r| r.value.as_ref().is_some_and(|v| v["op"] != "t"))
        .collect();
    assert_eq!(ops(&records), ["c", "c"]);
    assert_eq!(records[0].key, None);
    assert_eq!(
        records[1].value.as_ref().unwrap()["after"],
        json!({"at": 2, "what": "b"})
    );
    assert!(
        ferry.log().contains("REPLICA IDENTITY FULL"),
        "{}",
        ferry.log()
    );
}

/// `catalog::sees_transaction`, with which capture waits before it looks up a decoded
/// transaction's tables: a transaction still open is not seen, a committed one is.
#[tokio::test(flavor = "multi_thread")]
async fn a_decoded_transaction_is_looked_up_only_once_visible() {
    let pg = PgCluster::shared();
    let (db, observer) = pg.fresh_db("visible", "CREATE TABLE t (id int)").await;
    let writer = pg.client(&db).await;
    writer
        .batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let full: i64 = writer
        .query_one("SELECT pg_current_xact_id()::text::int8", &[])
        .await
        .unwrap()
        .get(0);
    let xid = (full & 0xFFFF_FFFF) as u32;
    let sees = |c| pgferry::source::catalog::sees_transaction(c, xid);
    assert!(
        !sees(&observer).await.unwrap(),
        "an open transaction is not seen"
    );
    writer.batch_execute("COMMIT").await.unwrap();
    assert!(
        sees(&observer).await.unwrap(),
        "a committed transaction is seen"
    );
}

//! Slot loss and failover against real servers: a dropped slot stops capture with an error
//! instead of being silently re-created (and `on_slot_loss: recreate` re-creates it), and on
//! PostgreSQL 17 a failover slot synchronized to a physical standby lets capture resume on the
//! promoted standby without losing a row.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::broker::Broker;
use common::ferry::Ferry;
use common::kafka::TopicReader;
use common::pg::{first_column, pg17_bin_dir, PgCluster};
use tokio_postgres::Client;

fn broker() -> &'static Broker {
    static BROKER: OnceLock<Broker> = OnceLock::new();
    BROKER.get_or_init(Broker::start)
}

const TABLE: &str = "CREATE TABLE t (id bigint PRIMARY KEY, payload text)";

async fn insert_range(c: &Client, from: i64, to: i64) {
    c.execute(
        "INSERT INTO t SELECT g, md5(g::text) FROM generate_series($1::int8, $2::int8) g",
        &[&from, &to],
    )
    .await
    .expect("insert rows");
}

/// Reads the table's topic until `done(ids seen)` holds; returns how often each id arrived.
fn read_ids(
    topic: &str,
    timeout: Duration,
    mut done: impl FnMut(&BTreeMap<i64, u32>) -> bool,
) -> BTreeMap<i64, u32> {
    let mut seen = BTreeMap::new();
    let mut upto = 0;
    TopicReader::new(&broker().address()).read_until(&[topic.to_owned()], timeout, |recs| {
        for r in &recs[upto..] {
            // Tombstones and deletes carry the key too; this table only sees inserts.
            if let Some(id) = r.key.as_ref().and_then(|k| k["id"].as_i64()) {
                *seen.entry(id).or_default() += 1;
            }
        }
        upto = recs.len();
        done(&seen)
    });
    seen
}

/// One column (or expression) of the slot's `pg_replication_slots` row; `None` when the slot
/// does not exist.
async fn slot_field<T>(pg: &PgCluster, db: &str, slot: &str, expr: &str) -> Option<T>
where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
{
    pg.client(db)
        .await
        .query_opt(
            &format!("SELECT {expr} FROM pg_replication_slots WHERE slot_name = $1"),
            &[&slot],
        )
        .await
        .expect("query slots")
        .map(|r| r.get(0))
}

async fn slot_exists(pg: &PgCluster, db: &str, slot: &str) -> bool {
    slot_field::<i32>(pg, db, slot, "1").await.is_some()
}

/// A slot dropped behind pgferry's back is reported, not re-created: with the default
/// `on_slot_loss: stop` capture exits with an error naming the slot and the fix, and creates
/// nothing; with `on_slot_loss: recreate` it re-creates the slot, re-publishes the snapshot and
/// streams on. A replica that missed the changes made while no slot existed (deletes among
/// them) ends exact: the new slot's snapshot prunes what the source no longer has.
#[tokio::test(flavor = "multi_thread")]
async fn dropped_slot_is_reported_not_recreated() {
    let pg = PgCluster::shared();
    let (db, c) = pg.fresh_db("droppedslot", TABLE).await;
    let (replica, r) = pg.fresh_db("droppedslot_r", TABLE).await;
    let slot = format!("slot_{db}");
    let topic = format!("{db}.public.t");
    let port = common::free_port();
    let applier = Ferry::start(
        &common::ferry::apply_config(
            "node-a",
            &db,
            &[pg.url(&replica)],
            &broker().address(),
            port,
            "",
        ),
        port,
    );
    let mut ferry = Ferry::capture(pg, &db, &broker().address(), "");
    ferry.wait_ready().await;
    assert!(
        ferry.log().contains("failover slots need PostgreSQL 17"),
        "on PostgreSQL 15 failover_slot is ignored with a note"
    );
    insert_range(&c, 1, 100).await;
    read_ids(&topic, Duration::from_secs(60), |s| s.len() == 100);

    ferry.terminate();
    assert!(
        ferry.wait_exit(Duration::from_secs(60)).is_some(),
        "pgferry did not stop on SIGTERM"
    );
    // The walsender may hold the slot for a moment after pgferry has gone.
    common::wait_for(
        "the slot to be dropped",
        Duration::from_secs(30),
        || async {
            c.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await
                .ok()
                .map(drop)
        },
    )
    .await;
    // Changes made while no slot exists are the ones a silent re-creation would lose.
    insert_range(&c, 101, 150).await;
    c.batch_execute(
        "DELETE FROM t WHERE id BETWEEN 81 AND 100; UPDATE t SET payload = 'gap' WHERE id <= 10",
    )
    .await
    .unwrap();

    ferry.restart();
    // Capture stops (and retries every minute) without re-creating the slot; the process
    // stays up and says why capture is down.
    let missing = format!("replication slot {slot} is missing");
    common::wait_for(
        "the lost slot to be reported",
        Duration::from_secs(60),
        || async {
            let (status, body) = ferry.http_get("/readyz")?;
            (status == 503 && body.contains("capture (down:") && body.contains(&missing))
                .then_some(())
        },
    )
    .await;
    let log = ferry.log();
    assert!(
        log.contains(&format!("replication slot {slot} is missing")),
        "the error should name the slot: {log}"
    );
    assert!(
        log.contains("on_slot_loss: recreate") && log.contains("may be lost"),
        "the error should say what was lost and what to do: {log}"
    );
    assert!(
        !slot_exists(pg, &db, &slot).await,
        "pgferry must not re-create a lost slot on its own"
    );
    // `pgferry check` reports the same loss with the fix.
    let out = std::process::Command::new(common::ferry::pgferry_bin())
        .args(["check", "--config", ferry.config_path.to_str().unwrap()])
        .output()
        .expect("run pgferry check");
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        report
            .lines()
            .any(|l| l.contains(&format!("slot {slot} is missing"))
                && l.contains("on_slot_loss: recreate")),
        "pgferry check should report the lost slot: {report}"
    );
    drop(ferry);

    let ferry = Ferry::capture(pg, &db, &broker().address(), "  on_slot_loss: recreate\n");
    ferry.wait_ready().await;
    assert!(slot_exists(pg, &db, &slot).await);
    let log = ferry.log();
    assert!(
        log.contains("SLOT LOST") && log.contains(&slot),
        "re-creating must warn loudly, naming the slot: {log}"
    );
    insert_range(&c, 151, 200).await;
    // The fresh snapshot re-publishes 1..=150 (101..=150 only through it), the stream 151..=200.
    let seen = read_ids(&topic, Duration::from_secs(60), |s| s.len() == 200);
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (1..=200).collect::<Vec<_>>()
    );
    assert!(
        seen[&1] >= 2,
        "rows 1..=80 arrive again from the new snapshot"
    );
    // The replica lost the gap's changes with the slot; the new snapshot brings them, and
    // deletes the rows the source deleted meanwhile.
    common::wait_for(
        "the replica to equal the source",
        Duration::from_secs(60),
        || async {
            let want = common::pg::table_checksum(&c, "t").await;
            (common::pg::try_table_checksum(&r, "t").await == Some(want)).then_some(())
        },
    )
    .await;
    assert_eq!(
        applier.metric("pgferry_apply_rows_pruned_total", ""),
        Some(20.0),
        "rows 81..=100, and only they, were pruned"
    );
}

/// A slot the server invalidated (its WAL removed past `max_slot_wal_keep_size`) stops capture
/// with an error naming the slot and the reason; `on_slot_loss: recreate` drops and re-creates
/// it.
#[tokio::test(flavor = "multi_thread")]
async fn invalidated_slot_is_reported_then_recreated() {
    let pg = PgCluster::start(&[("max_slot_wal_keep_size", "'1MB'")]);
    let (db, c) = pg.fresh_db("lostwal", TABLE).await;
    let slot = format!("slot_{db}");
    let topic = format!("{db}.public.t");
    let mut ferry = Ferry::capture(&pg, &db, &broker().address(), "");
    ferry.wait_ready().await;
    insert_range(&c, 1, 10).await;
    read_ids(&topic, Duration::from_secs(60), |s| s.len() == 10);
    ferry.terminate();
    assert!(ferry.wait_exit(Duration::from_secs(60)).is_some());

    // Move the WAL on by several segments while nobody reads the slot, then checkpoint: the
    // slot's WAL is removed and the server marks it lost.
    common::wait_for(
        "the slot to lose its WAL",
        Duration::from_secs(60),
        || async {
            for i in 0..4 {
                insert_range(&c, 1_000 + i * 10, 1_000 + i * 10 + 9).await;
                c.batch_execute("SELECT pg_switch_wal()")
                    .await
                    .expect("switch wal");
            }
            c.batch_execute("CHECKPOINT").await.expect("checkpoint");
            let row = c
                .query_one(
                    "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await
                .expect("read slot");
            (row.get::<_, Option<String>>(0).as_deref() == Some("lost")).then_some(())
        },
    )
    .await;

    ferry.restart();
    let invalidated = format!("replication slot {slot} was invalidated");
    common::wait_for(
        "the invalidated slot to be reported",
        Duration::from_secs(60),
        || async {
            let (status, body) = ferry.http_get("/readyz")?;
            (status == 503 && body.contains("capture (down:") && body.contains(&invalidated))
                .then_some(())
        },
    )
    .await;
    let log = ferry.log();
    assert!(
        log.contains(&format!(
            "replication slot {slot} was invalidated by the server (wal_removed)"
        )),
        "the error should name the slot and the reason: {log}"
    );
    assert!(log.contains("on_slot_loss: recreate"), "{log}");
    drop(ferry);

    let ferry = Ferry::capture(&pg, &db, &broker().address(), "  on_slot_loss: recreate\n");
    ferry.wait_ready().await;
    let status: Option<String> = slot_field(&pg, &db, &slot, "wal_status").await.flatten();
    assert_ne!(status.as_deref(), Some("lost"), "the slot was re-created");
    insert_range(&c, 2_000, 2_009).await;
    read_ids(&topic, Duration::from_secs(60), |s| {
        (2_000..2_010).all(|id| s.contains_key(&id)) && (1_030..1_040).all(|id| s.contains_key(&id))
    });
}

async fn slot_failover_flag(pg: &PgCluster, db: &str, slot: &str) -> bool {
    slot_field(pg, db, slot, "failover")
        .await
        .expect("the slot exists")
}

/// PostgreSQL 17: a slot created without failover (`failover_slot: false`) is switched to a
/// failover slot when pgferry restarts with the default.
#[tokio::test(flavor = "multi_thread")]
async fn existing_slot_is_switched_to_failover() {
    let pg = PgCluster::start_with_bin(&pg17_bin_dir(), &[]);
    let (db, _c) = pg.fresh_db("switch", TABLE).await;
    let slot = format!("slot_{db}");
    let mut ferry = Ferry::capture(&pg, &db, &broker().address(), "  failover_slot: false\n");
    ferry.wait_ready().await;
    assert!(!slot_failover_flag(&pg, &db, &slot).await);
    ferry.terminate();
    assert!(ferry.wait_exit(Duration::from_secs(60)).is_some());
    drop(ferry);

    let ferry = Ferry::capture(&pg, &db, &broker().address(), "");
    ferry.wait_ready().await;
    assert!(slot_failover_flag(&pg, &db, &slot).await);
    assert!(ferry
        .log()
        .contains("made the existing slot a failover slot"));
}

/// Inserts rows with ids from `next` on, a few per transaction, until `stop` is set or the
/// server goes away; returns the next unused id.
async fn write_until(c: Client, mut next: i64, stop: Arc<AtomicBool>) -> i64 {
    while !stop.load(Ordering::Relaxed) {
        let end = next + 4;
        if c.execute(
            "INSERT INTO t SELECT g, md5(g::text) FROM generate_series($1::int8, $2::int8) g",
            &[&next, &end],
        )
        .await
        .is_err()
        {
            break;
        }
        next = end + 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    next
}

/// PostgreSQL 17: capture runs on a primary whose failover slot is synchronized to a physical
/// standby. Under continuous writes capture is killed, the primary crashes, the standby is
/// promoted and written to, and capture restarts against it: every row the new primary has
/// arrives in Kafka (duplicates allowed, counted), and none that it lacks.
#[tokio::test(flavor = "multi_thread")]
async fn promoted_standby_resumes_from_synced_failover_slot() {
    let (primary, standby, db, c) = PgCluster::failover_pair("failover", TABLE).await;
    let slot = format!("slot_{db}");
    let topic = format!("{db}.public.t");
    insert_range(&c, 1, 500).await;

    let mut ferry = Ferry::capture(&primary, &db, &broker().address(), "");
    ferry.wait_ready().await;
    assert!(
        slot_failover_flag(&primary, &db, &slot).await,
        "on PostgreSQL 17 the slot is a failover slot"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_until(primary.client(&db).await, 501, stop.clone()));
    // Wait until the standby holds a persistent synced copy that has moved past the snapshot
    // (capture confirmed streamed changes and the sync worker picked that up).
    let first = common::wait_for(
        "the slot to be synchronized to the standby",
        Duration::from_secs(120),
        || async {
            standby
                .synced_slot(&db, &slot)
                .await
                .filter(|(ready, _)| *ready)
                .map(|(_, lsn)| lsn)
        },
    )
    .await;
    common::wait_for(
        "the synced slot to advance under writes",
        Duration::from_secs(120),
        || async {
            standby
                .synced_slot(&db, &slot)
                .await
                .filter(|(ready, lsn)| *ready && *lsn > first)
                .map(|_| ())
        },
    )
    .await;
    assert!(!writer.is_finished(), "writes must still be going on");

    // Failure: capture dies without a word, then the primary crashes mid-write.
    ferry.kill9();
    tokio::time::sleep(Duration::from_millis(300)).await;
    primary.stop();
    let next = writer.await.expect("writer");
    standby.promote();
    let new_primary = &standby;
    let nc = new_primary.client(&db).await;
    let resumed = nc
        .query_one("SELECT coalesce(max(id), 0) FROM t", &[])
        .await
        .expect("read max id")
        .get::<_, i64>(0);
    eprintln!(
        "failover test: old primary wrote ids up to {}, the standby had up to {resumed}",
        next - 1
    );

    // Keep writing to the new primary while capture comes back against it.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_until(
        new_primary.client(&db).await,
        1_000_000,
        stop.clone(),
    ));
    let ferry = Ferry::capture(new_primary, &db, &broker().address(), "");
    ferry.wait_ready().await;
    let log = ferry.log();
    assert!(
        log.contains("resuming from existing slot"),
        "capture should resume from the synced slot: {log}"
    );
    common::wait_for(
        "some post-promotion rows to be captured",
        Duration::from_secs(60),
        || async {
            ferry
                .metric("pgferry_changes_captured_total", "")
                .filter(|n| *n >= 200.0)
                .map(|_| ())
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer");

    let expected: BTreeSet<i64> = first_column(&nc, "SELECT id FROM t")
        .await
        .into_iter()
        .collect();
    assert!(expected.iter().any(|id| *id >= 1_000_000));
    let seen = read_ids(&topic, Duration::from_secs(120), |s| {
        expected.iter().all(|id| s.contains_key(id))
    });
    let duplicates: u32 = seen.values().map(|n| n - 1).sum();
    let extra: Vec<i64> = seen
        .keys()
        .filter(|id| !expected.contains(id))
        .copied()
        .collect();
    eprintln!(
        "failover test: {} rows on the new primary, all in Kafka; {duplicates} duplicate \
         deliveries; {} ids in Kafka that the new primary lacks",
        expected.len(),
        extra.len()
    );
    // synchronized_standby_slots: nothing reached capture that the standby had not flushed.
    assert!(
        extra.is_empty(),
        "rows published but lost in the failover: {extra:?}"
    );
}

//! Capture under faults: pgferry killed mid-stream, the broker frozen, an idle database next
//! to a busy one. Real servers throughout.

mod common;

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::broker::Broker;
use common::ferry::Ferry;
use common::kafka::TopicReader;
use common::pg::PgCluster;

fn shared_broker() -> &'static Broker {
    static BROKER: OnceLock<Broker> = OnceLock::new();
    BROKER.get_or_init(Broker::start)
}

/// Inserts ids `from..to` into `t` in transactions of `per_txn` rows.
async fn insert_rows(db: String, from: i64, to: i64, per_txn: i64, pause: Duration) {
    let c = PgCluster::shared().client(&db).await;
    let mut id = from;
    while id < to {
        let end = (id + per_txn).min(to);
        c.execute(
            "INSERT INTO t SELECT g, md5(g::text) FROM generate_series($1::int8, $2::int8 - 1) g",
            &[&id, &end],
        )
        .await
        .unwrap();
        id = end;
        tokio::time::sleep(pause).await;
    }
}

/// Reads the topic until every id in `1..=n` is present; returns how often each id arrived.
fn read_all_ids(brokers: &str, topic: &str, n: i64, timeout: Duration) -> BTreeMap<i64, u32> {
    let mut seen: BTreeMap<i64, u32> = BTreeMap::new();
    let mut upto = 0;
    TopicReader::new(brokers).read_until(&[topic.to_owned()], timeout, |recs| {
        for r in &recs[upto..] {
            let id = r.key.as_ref().unwrap()["id"].as_i64().unwrap();
            *seen.entry(id).or_default() += 1;
        }
        upto = recs.len();
        seen.len() as i64 == n
    });
    seen
}

/// Acceptance 3: `kill -9` of pgferry twice while 50k rows are inserted, restart each time:
/// every row reaches Kafka. Duplicates are allowed and reported; gaps are not.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_stream_loses_nothing() {
    let pg = PgCluster::shared();
    let (db, _) = pg
        .fresh_db(
            "kill",
            "CREATE TABLE t (id bigint PRIMARY KEY, payload text)",
        )
        .await;
    let broker = shared_broker();
    let mut ferry = Ferry::capture(pg, &db, &broker.address(), "");
    ferry.wait_ready().await;

    const ROWS: i64 = 50_000;
    let writer = tokio::spawn(insert_rows(
        db.clone(),
        1,
        ROWS + 1,
        25,
        Duration::from_millis(5),
    ));
    for _ in 0..2 {
        // Let this incarnation publish a while, then kill it without warning.
        common::wait_for(
            "some rows to be captured",
            Duration::from_secs(120),
            || async {
                ferry
                    .metric("pgferry_changes_captured_total", "")
                    .filter(|n| *n >= 3_000.0)
                    .map(|_| ())
            },
        )
        .await;
        assert!(
            !writer.is_finished(),
            "the kill must land while rows are still being written"
        );
        ferry.kill9();
        tokio::time::sleep(Duration::from_millis(500)).await;
        ferry.restart();
        ferry.wait_ready().await;
    }
    writer.await.unwrap();
    let seen = read_all_ids(
        &broker.address(),
        &format!("{db}.public.t"),
        ROWS,
        Duration::from_secs(180),
    );
    let duplicates: u32 = seen.values().map(|n| n - 1).sum();
    eprintln!("kill -9 test: {ROWS} rows, {duplicates} duplicate deliveries after 2 crashes");
    assert_eq!(seen.len() as i64, ROWS);
    assert_eq!(seen.keys().next(), Some(&1));
    assert_eq!(seen.keys().last(), Some(&ROWS));
}

/// Acceptance 4: the broker is frozen (SIGSTOP) for 30 s mid-stream. The slot's
/// confirmed_flush_lsn does not move while nothing can be acknowledged, WAL written meanwhile
/// stays unconfirmed, and after SIGCONT every row arrives.
#[tokio::test(flavor = "multi_thread")]
async fn frozen_broker_stalls_confirmation_and_loses_nothing() {
    let pg = PgCluster::shared();
    let (db, _) = pg
        .fresh_db(
            "frozen",
            "CREATE TABLE t (id bigint PRIMARY KEY, payload text)",
        )
        .await;
    let broker = Broker::start();
    let ferry = Ferry::capture(pg, &db, &broker.address(), "");
    ferry.wait_ready().await;
    let slot = format!("slot_{db}");

    const ROWS: i64 = 20_000;
    let writer = tokio::spawn(insert_rows(
        db.clone(),
        1,
        ROWS + 1,
        20,
        Duration::from_millis(20),
    ));
    common::wait_for(
        "confirmation to start moving",
        Duration::from_secs(60),
        || async {
            (ferry
                .metric("pgferry_changes_published_total", "")
                .unwrap_or(0.0)
                > 500.0)
                .then_some(())
        },
    )
    .await;

    broker.pause();
    let paused_at = Instant::now();
    // Acknowledgements already on the wire may still land in the first moments.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let baseline = pg.confirmed_flush(&db, &slot).await;
    let mut samples = 0;
    while paused_at.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = pg.confirmed_flush(&db, &slot).await;
        assert_eq!(
            now, baseline,
            "confirmed_flush_lsn moved while the broker was frozen"
        );
        samples += 1;
    }
    let wal_during_pause = pg.current_wal(&db).await;
    assert!(
        wal_during_pause > baseline,
        "the writer should have produced WAL during the pause"
    );
    assert!(pg.confirmed_flush(&db, &slot).await < wal_during_pause);
    assert!(samples >= 20);
    broker.resume();

    writer.await.unwrap();
    let seen = read_all_ids(
        &broker.address(),
        &format!("{db}.public.t"),
        ROWS,
        Duration::from_secs(180),
    );
    assert_eq!(seen.len() as i64, ROWS);
    // And confirmation resumes past everything written during the pause.
    common::wait_for(
        "confirmation to pass the pause",
        Duration::from_secs(60),
        || async { (pg.confirmed_flush(&db, &slot).await > wal_during_pause).then_some(()) },
    )
    .await;
}

/// Acceptance 5: an idle database's slot advances with the heartbeat while another database
/// in the same cluster is written to, so the idle slot does not pin the cluster's WAL.
#[tokio::test(flavor = "multi_thread")]
async fn idle_database_slot_advances() {
    let pg = PgCluster::shared();
    let idle = pg.create_db("idle").await;
    let busy = pg.create_db("busy").await;
    pg.client(&idle)
        .await
        .batch_execute("CREATE TABLE quiet (id int PRIMARY KEY)")
        .await
        .unwrap();
    let ferry = Ferry::capture(pg, &idle, &shared_broker().address(), "");
    ferry.wait_ready().await;
    let slot = format!("slot_{idle}");

    let before = pg.confirmed_flush(&idle, &slot).await;
    let b = pg.client(&busy).await;
    b.batch_execute(
        "CREATE TABLE noise (id int, pad text);
         INSERT INTO noise SELECT g, repeat('x', 200) FROM generate_series(1, 50000) g;",
    )
    .await
    .unwrap();
    let busy_end = pg.current_wal(&busy).await;
    assert!(
        busy_end > before + 5_000_000,
        "the busy database should have written >5 MB of WAL"
    );
    common::wait_for(
        "the idle slot to pass the busy database's writes",
        Duration::from_secs(60),
        || async { (pg.confirmed_flush(&idle, &slot).await >= busy_end).then_some(()) },
    )
    .await;
    // The lag metric reflects it too.
    common::wait_for("lag metric to shrink", Duration::from_secs(30), || async {
        ferry
            .metric("pgferry_source_lag_bytes", "")
            .filter(|lag| *lag < 1_000_000.0)
            .map(|_| ())
    })
    .await;
    assert!(
        ferry
            .metric("pgferry_heartbeat_timestamp_seconds", "")
            .unwrap_or(0.0)
            > 0.0
    );
}

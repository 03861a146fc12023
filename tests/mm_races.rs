//! Multi-master versions (issue 10): the cases that used to diverge or stall, each against
//! real servers. Two nodes per case (a database each on two shared clusters, one of them
//! 30 s behind where the case needs skew), one broker.

mod common;

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use common::broker::Broker;
use common::mesh::{mesh, wait_all_equal, KV_DDL};
use common::pg::{first_column, PgCluster};
use common::wait_for;
use tokio_postgres::Client;

fn broker() -> &'static Broker {
    static BROKER: OnceLock<Broker> = OnceLock::new();
    BROKER.get_or_init(Broker::start)
}

fn cluster() -> &'static PgCluster {
    PgCluster::shared_of_three(0)
}

/// Two nodes, on the first two shared clusters, with `ddl` and `apply.conflict` lines
/// `conflict`.
async fn pair(label: &str, ddl: &str, conflict: &str) -> Vec<common::mesh::Node> {
    mesh(
        label,
        &[cluster(), PgCluster::shared_of_three(1)],
        ddl,
        conflict,
        &broker().address(),
    )
    .await
}

/// A cluster for the freeze case alone: it freezes every database, which other tests'
/// open transactions and slots would hold back.
fn own_cluster() -> &'static PgCluster {
    static OWN: OnceLock<PgCluster> = OnceLock::new();
    OWN.get_or_init(|| PgCluster::start(&[]))
}

/// A cluster whose clock runs 30 s behind.
fn behind() -> &'static PgCluster {
    static BEHIND: OnceLock<PgCluster> = OnceLock::new();
    BEHIND.get_or_init(|| PgCluster::start_faketime("-30"))
}

async fn one<T: for<'a> tokio_postgres::types::FromSql<'a>>(client: &Client, sql: &str) -> T {
    client.query_one(sql, &[]).await.expect(sql).get(0)
}

async fn wait_value(client: &Client, sql: &str, want: Option<String>) {
    wait_for(
        &format!("{sql} = {want:?}"),
        Duration::from_secs(90),
        || async {
            let got: Option<String> = client
                .query_opt(sql, &[])
                .await
                .ok()?
                .and_then(|r| r.get(0));
            (got == want).then_some(())
        },
    )
    .await
}

/// pgferry on database `db` of the first cluster as node `<label>0`, whose peer `<label>9`
/// never shows up.
fn lone_node(label: &str, db: &str) -> common::ferry::Ferry {
    let port = common::free_port();
    let yaml = common::mesh::node_config(
        label,
        &format!("{label}0"),
        &[format!("{label}9")],
        cluster(),
        db,
        port,
        "",
        &broker().address(),
    );
    common::ferry::Ferry::start(&yaml, port)
}

/// A key's stored version on a node: `(t, node, deleted)`.
async fn version_of(client: &Client, table: &str, key: i32) -> Option<(i64, String, bool)> {
    client
        .query_opt(
            "SELECT t, node, deleted FROM pgferry.versions
              WHERE table_name = $1 AND key = jsonb_build_array($2::int4)::text",
            &[&table, &key],
        )
        .await
        .unwrap()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
}

/// Acceptance 1: a row whose commit timestamp VACUUM FREEZE made unreadable keeps its version.
/// For each key, one node writes first (the older write) and the other later (the newer);
/// then node A freezes its database. Keys where A holds the newer write and keys where A holds
/// the older (the mirror) both end, on both nodes, with the newer write.
#[tokio::test(flavor = "multi_thread")]
async fn versions_outlive_vacuum_freeze() {
    let mut nodes = mesh(
        "mmfreeze",
        &[own_cluster(), PgCluster::shared_of_three(1)],
        KV_DDL,
        "",
        &broker().address(),
    )
    .await;
    let (a, b) = (nodes[0].client().await, nodes[1].client().await);
    a.batch_execute("INSERT INTO kv SELECT g, 0, 'seed' FROM generate_series(1, 8) g")
        .await
        .unwrap();
    wait_value(&b, "SELECT count(*)::text FROM kv", Some("8".into())).await;
    nodes[0].stop();
    nodes[1].stop();
    let mut rng = common::Rng::new(10);
    let mut expected = BTreeMap::new();
    for k in 1..=8i32 {
        // Odd keys: B writes first, A later (A holds the newer). Even keys: the mirror.
        let (first, second, winner) = if k % 2 == 1 {
            (&b, &a, "a")
        } else {
            (&a, &b, "b")
        };
        let v = (rng.next() % 1000) as i32;
        first
            .execute(
                "UPDATE kv SET v = $2, note = 'older' WHERE k = $1",
                &[&k, &v],
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        second
            .execute(
                "UPDATE kv SET v = $2, note = $3 WHERE k = $1",
                &[&k, &(v + 1), &format!("newer on {winner}")],
            )
            .await
            .unwrap();
        expected.insert(k, (v + 1, Some(format!("newer on {winner}"))));
    }
    // A's pgferry runs again (B's stays down): its slot moves on, so that nothing holds the
    // freeze back. Then every database of A's cluster is frozen until the commit-timestamp
    // horizon passes the rows: their commit timestamps are gone.
    nodes[0].ferry.restart();
    nodes[0].ferry.wait_ready().await;
    wait_for(
        "commit timestamps of kv on A truncated",
        Duration::from_secs(120),
        || async {
            freeze_every_database(nodes[0].cluster).await;
            let unknown: i64 = one(
                &a,
                "SELECT count(*) FROM kv WHERE pg_xact_commit_timestamp(xmin) IS NULL",
            )
            .await;
            (unknown == 8).then_some(())
        },
    )
    .await;
    nodes[1].ferry.restart();
    wait_all_equal(&nodes, &expected, Duration::from_secs(120)).await;
    // And the versions survived where the timestamps did not: the stored versions of every
    // key are equal on both nodes.
    for k in 1..=8 {
        assert_eq!(
            version_of(&a, "public.kv", k).await,
            version_of(&b, "public.kv", k).await
        );
    }
}

/// `VACUUM FREEZE` in every database of a cluster, template0 included (so that the
/// cluster-wide frozen horizon, and with it the commit-timestamp horizon, can advance).
async fn freeze_every_database(cluster: &PgCluster) {
    let admin = cluster.client("postgres").await;
    admin
        .batch_execute("ALTER DATABASE template0 WITH ALLOW_CONNECTIONS true")
        .await
        .unwrap();
    let dbs: Vec<String> = first_column(&admin, "SELECT datname::text FROM pg_database").await;
    for db in dbs {
        let client = cluster.client(&db).await;
        client.batch_execute("VACUUM FREEZE").await.unwrap();
    }
    admin
        .batch_execute("ALTER DATABASE template0 WITH ALLOW_CONNECTIONS false")
        .await
        .unwrap();
}

/// A remote delete of a key that has no live row here, while a local INSERT of that key is
/// in flight: the applier waits for the insert's version lock and decides against its
/// version. Node B's clock is 30 s behind, so its insert is older than A's delete, and the
/// key ends deleted on both (before, B kept its row alone).
#[tokio::test(flavor = "multi_thread")]
async fn remote_delete_races_a_local_insert() {
    let mut nodes = mesh(
        "mmdelins",
        &[cluster(), behind()],
        KV_DDL,
        "",
        &broker().address(),
    )
    .await;
    let a = nodes[0].client().await;
    nodes[1].stop();
    for k in 1..=5 {
        a.execute("INSERT INTO kv VALUES ($1, 1, 'a')", &[&k])
            .await
            .unwrap();
        a.execute("DELETE FROM kv WHERE k = $1", &[&k])
            .await
            .unwrap();
    }
    a.execute("INSERT INTO kv VALUES (100, 1, 'marker')", &[])
        .await
        .unwrap();
    let b = nodes[1].client().await;
    b.batch_execute("BEGIN; INSERT INTO kv SELECT g, 2, 'b' FROM generate_series(1, 5) g")
        .await
        .unwrap();
    nodes[1].ferry.restart();
    // Let the applier reach the keys B holds uncommitted, then commit.
    tokio::time::sleep(Duration::from_secs(3)).await;
    b.batch_execute("COMMIT").await.unwrap();
    let expected: BTreeMap<i32, (i32, Option<String>)> = [(100, (1, Some("marker".to_owned())))]
        .into_iter()
        .collect();
    wait_all_equal(&nodes, &expected, Duration::from_secs(90)).await;
    for k in 1..=5 {
        let (on_a, on_b) = (
            version_of(&a, "public.kv", k).await,
            version_of(&b, "public.kv", k).await,
        );
        assert_eq!(on_a, on_b, "key {k}: both nodes hold the same tombstone");
        assert!(on_a.is_some_and(|v| v.2), "key {k} is a tombstone");
    }
}

/// A remote delete of keys that have no live row here but a version (a tombstone of a local
/// delete), while a local transaction re-inserts them: the applier reads the keys before the
/// re-insert commits, and its version stamp waits for the re-insert's version lock. Node B's
/// clock is 30 s behind, so the re-insert is older than A's delete, and the keys end deleted
/// on both. Before, the stamp won after the wait while the delete, blind to rows its snapshot
/// did not hold, left B's rows in place: B alone kept them. Both ways a change is applied:
/// `kv` in batches, `ku` (a secondary unique index) one change at a time. Each node's worker
/// of the other's stream is held back where the case needs it by a `gate` row locked on that
/// node.
#[tokio::test(flavor = "multi_thread")]
async fn remote_delete_meets_a_reinsert_in_flight() {
    let ddl = format!(
        "{KV_DDL}; CREATE TABLE ku (k int PRIMARY KEY, u int UNIQUE);
         CREATE TABLE gate (id int PRIMARY KEY, n int NOT NULL)"
    );
    let nodes = mesh(
        "mmredel",
        &[cluster(), behind()],
        &ddl,
        "",
        &broker().address(),
    )
    .await;
    let (a, b) = (nodes[0].client().await, nodes[1].client().await);
    let (a_gate, b_gate) = (nodes[0].client().await, nodes[1].client().await);
    a.batch_execute(
        "INSERT INTO kv SELECT g, 1, 'a' FROM generate_series(1, 20) g;
         INSERT INTO ku SELECT g, g FROM generate_series(1, 20) g;
         INSERT INTO gate VALUES (1, 0), (2, 0)",
    )
    .await
    .unwrap();
    let all = "SELECT ((SELECT count(*) FROM kv) + (SELECT count(*) FROM ku)
                       + (SELECT count(*) FROM gate))::text";
    wait_value(&b, all, Some("42".to_owned())).await;
    // A's worker of B's stream waits at gate 2: B's delete of the even keys stays away from A,
    // which still has the rows to delete.
    a_gate
        .batch_execute("BEGIN; SELECT n FROM gate WHERE id = 2 FOR UPDATE")
        .await
        .unwrap();
    b.batch_execute(
        "UPDATE gate SET n = n + 1 WHERE id = 2;
         DELETE FROM kv WHERE k % 2 = 0; DELETE FROM ku WHERE k % 2 = 0",
    )
    .await
    .unwrap();
    // B's worker of A's stream waits at gate 1 until B's re-insert is open.
    b_gate
        .batch_execute("BEGIN; SELECT n FROM gate WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    a.batch_execute(
        "UPDATE gate SET n = n + 1 WHERE id = 1;
         DELETE FROM kv WHERE k % 2 = 0; DELETE FROM ku WHERE k % 2 = 0;
         INSERT INTO kv VALUES (100, 1, 'marker')",
    )
    .await
    .unwrap();
    b.batch_execute(
        "BEGIN;
         INSERT INTO kv SELECT g, 2, 'b' FROM generate_series(2, 20, 2) g;
         INSERT INTO ku SELECT g, g FROM generate_series(2, 20, 2) g",
    )
    .await
    .unwrap();
    b_gate.batch_execute("COMMIT").await.unwrap();
    wait_for(
        "B's worker to wait for the open re-insert in its version stamp",
        Duration::from_secs(60),
        || async {
            let waiting: i64 = b_gate
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                      WHERE datname = current_database() AND wait_event_type = 'Lock'
                        AND query LIKE '%INSERT INTO pgferry.versions%'",
                    &[],
                )
                .await
                .ok()?
                .get(0);
            (waiting > 0).then_some(())
        },
    )
    .await;
    b.batch_execute("COMMIT").await.unwrap();
    a_gate.batch_execute("COMMIT").await.unwrap();
    let mut expected: BTreeMap<i32, (i32, Option<String>)> = (1..=20)
        .filter(|k| k % 2 == 1)
        .map(|k| (k, (1, Some("a".to_owned()))))
        .collect();
    expected.insert(100, (1, Some("marker".to_owned())));
    wait_all_equal(&nodes, &expected, Duration::from_secs(90)).await;
    let odd: Vec<i32> = (1..=20).filter(|k| k % 2 == 1).collect();
    for (name, c) in [("A", &a), ("B", &b)] {
        wait_for(
            &format!("{name}'s ku to hold the odd keys only"),
            Duration::from_secs(60),
            || async {
                let keys: Vec<i32> = c
                    .query("SELECT k FROM ku ORDER BY k", &[])
                    .await
                    .ok()?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                (keys == odd).then_some(())
            },
        )
        .await;
    }
}

/// TRUNCATE: refused locally with a clear message (so is a primary-key update); a remote one
/// (from a node whose guard was removed) is dead-lettered and counted, and the stream goes on.
#[tokio::test(flavor = "multi_thread")]
async fn truncate_is_refused_and_counted() {
    let nodes = pair("mmtrunc", KV_DDL, "").await;
    let (a, b) = (nodes[0].client().await, nodes[1].client().await);
    a.batch_execute("INSERT INTO kv VALUES (1, 1, NULL)")
        .await
        .unwrap();
    let err = a.batch_execute("TRUNCATE kv").await.unwrap_err();
    let text = format!("{}", err.as_db_error().unwrap());
    assert!(
        text.contains("TRUNCATE of public.kv is refused"),
        "unclear refusal: {text}"
    );
    // A primary-key update cannot be ordered by one key's version: refused as clearly.
    let err = a
        .batch_execute("UPDATE kv SET k = 5 WHERE k = 1")
        .await
        .unwrap_err();
    let text = format!("{}", err.as_db_error().unwrap());
    assert!(
        text.contains("the primary key of public.kv cannot be updated"),
        "unclear refusal: {text}"
    );
    a.batch_execute(
        "DROP TRIGGER pgferry_no_truncate ON kv; TRUNCATE kv; INSERT INTO kv VALUES (2, 2, NULL)",
    )
    .await
    .unwrap();
    wait_value(
        &b,
        "SELECT string_agg(k::text, ',' ORDER BY k) FROM kv",
        Some("1,2".into()),
    )
    .await;
    wait_for("truncate metric", Duration::from_secs(10), || async {
        (nodes[1].metric("pgferry_truncates_refused_total", "") == 1.0).then_some(())
    })
    .await;
}

/// Tables created after pgferry started are protected at once (event trigger): version
/// trigger, TRUNCATE guard, REPLICA IDENTITY FULL; so is a table that gets its primary key
/// later. A concurrent update/delete on the new table converges.
#[tokio::test(flavor = "multi_thread")]
async fn new_tables_are_protected_as_they_appear() {
    let mut nodes = pair("mmnewtab", "SELECT 1", "").await;
    let (a, b) = (nodes[0].client().await, nodes[1].client().await);
    for c in [&a, &b] {
        c.batch_execute(
            "CREATE TABLE kv (k int PRIMARY KEY, v int NOT NULL, note text);
             CREATE TABLE later (k int NOT NULL, v int);
             ALTER TABLE later ADD PRIMARY KEY (k);",
        )
        .await
        .unwrap();
        for table in ["kv", "later"] {
            let protected: bool = c
                .query_one(
                    "SELECT count(*) = 2 FROM pg_trigger
                      WHERE tgrelid = $1::text::regclass
                        AND tgname IN ('zz_pgferry_version', 'pgferry_no_truncate')",
                    &[&table],
                )
                .await
                .unwrap()
                .get(0);
            assert!(protected, "{table} is not protected");
        }
    }
    a.batch_execute("INSERT INTO kv VALUES (1, 1, NULL), (2, 1, NULL)")
        .await
        .unwrap();
    wait_value(&b, "SELECT count(*)::text FROM kv", Some("2".into())).await;
    nodes[0].stop();
    nodes[1].stop();
    b.batch_execute("UPDATE kv SET v = 5 WHERE k = 1")
        .await
        .unwrap(); // older
    a.batch_execute("DELETE FROM kv WHERE k = 1").await.unwrap(); // newer: gone
    a.batch_execute("DELETE FROM kv WHERE k = 2").await.unwrap(); // older
    b.batch_execute("UPDATE kv SET v = 7 WHERE k = 2")
        .await
        .unwrap(); // newer: 7
    for node in &mut nodes {
        node.ferry.restart();
    }
    let expected: BTreeMap<i32, (i32, Option<String>)> = [(2, (7, None))].into_iter().collect();
    wait_all_equal(&nodes, &expected, Duration::from_secs(90)).await;
}

/// An update that re-creates a row deleted on this node (the update is newer than the
/// delete) writes the whole row: its unchanged TOASTed NOT NULL column comes from the old
/// image instead of being left out.
#[tokio::test(flavor = "multi_thread")]
async fn recreating_update_keeps_unchanged_toast() {
    let ddl = "CREATE TABLE docs (k int PRIMARY KEY, v int NOT NULL, body text NOT NULL);
               ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;";
    let mut nodes = pair("mmtoast", ddl, "").await;
    let (a, b) = (nodes[0].client().await, nodes[1].client().await);
    a.batch_execute(
        "INSERT INTO docs SELECT g, 0, repeat(md5(g::text), 400) FROM generate_series(1, 3) g",
    )
    .await
    .unwrap();
    wait_value(&b, "SELECT count(*)::text FROM docs", Some("3".into())).await;
    nodes[0].stop();
    nodes[1].stop();
    b.batch_execute("DELETE FROM docs").await.unwrap(); // older
    a.batch_execute("UPDATE docs SET v = k * 10").await.unwrap(); // newer, body unchanged
    for node in &mut nodes {
        node.ferry.restart();
    }
    let digest = "SELECT string_agg(k || ':' || v || ':' || md5(body), ',' ORDER BY k) FROM docs";
    let want: Option<String> = a.query_one(digest, &[]).await.unwrap().get(0);
    assert!(want.as_deref().is_some_and(|w| w.contains("3:30:")));
    wait_value(&b, digest, want).await;
}

/// Two nodes insert different keys with the same value of another UNIQUE column: the row
/// with the greater version keeps the value on both nodes, the other is logged as a
/// `unique_key` conflict, and the streams go on (a later row arrives).
#[tokio::test(flavor = "multi_thread")]
async fn unique_key_conflicts_resolve_the_same_everywhere() {
    let ddl = "CREATE TABLE users (k int PRIMARY KEY, email text NOT NULL UNIQUE, v int)";
    for seed in 0..3u64 {
        let label = format!("mmuniq{seed}n");
        let mut nodes = pair(&label, ddl, "").await;
        let (a, b) = (nodes[0].client().await, nodes[1].client().await);
        nodes[0].stop();
        nodes[1].stop();
        // Which node writes last (and so wins) depends on the seed.
        let (first, second) = if seed % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let first_key = 1 + seed as i32 * 10;
        first
            .execute(
                "INSERT INTO users VALUES ($1, 'x@example.com', 1)",
                &[&first_key],
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        second
            .execute(
                "INSERT INTO users VALUES ($1, 'x@example.com', 2)",
                &[&(first_key + 1)],
            )
            .await
            .unwrap();
        for node in &mut nodes {
            node.ferry.restart();
        }
        a.execute(
            "INSERT INTO users VALUES (999, 'later@example.com', 0)",
            &[],
        )
        .await
        .unwrap();
        let state = "SELECT string_agg(k || ':' || email, ',' ORDER BY k) FROM users";
        let want = Some(format!(
            "{}:x@example.com,999:later@example.com",
            first_key + 1
        ));
        wait_value(&a, state, want.clone()).await;
        wait_value(&b, state, want).await;
        // Each node logs the contest once it has applied the other's row.
        for (node, client) in nodes.iter().zip([&a, &b]) {
            wait_value(
                client,
                "SELECT count(*)::text FROM pgferry.conflicts WHERE conflict_type = 'unique_key'",
                Some("1".into()),
            )
            .await;
            assert!(node.metric("pgferry_conflicts_total", "type=\"unique_key\"") <= 1.0);
        }
        // The loser's key is a tombstone with the loser's version on both nodes.
        let (on_a, on_b) = (
            version_of(&a, "public.users", first_key).await,
            version_of(&b, "public.users", first_key).await,
        );
        assert_eq!(on_a, on_b, "the losing key's version differs between nodes");
        assert!(
            on_a.is_some_and(|v| v.2),
            "the losing key is not a tombstone"
        );
    }
}

/// Acceptance 4 (with collection by acknowledgement). Node B has a 10 s tombstone retention
/// backstop like A. (1) Both online: a delete's tombstone is collected on both nodes once both
/// have acknowledged it, not by age. (2) B offline for less than the horizon: A keeps the
/// tombstone while B's acknowledgement is missing, and B's older update does not resurrect
/// the row when B returns. (3) B offline past the horizon: A's backstop collects a tombstone
/// B never acknowledged and records it; on return B refuses to go on ("Rebuild node"), A
/// refuses B's stream, both count it, and B's older update never reaches A.
#[tokio::test(flavor = "multi_thread")]
async fn tombstones_go_by_acknowledgement_and_the_horizon_refuses_stale_nodes() {
    let mut nodes = pair("mmhorizon", KV_DDL, "    tombstone_retention: 10s\n").await;
    let (a, b) = (nodes[0].client().await, nodes[1].client().await);
    a.batch_execute("INSERT INTO kv SELECT g, 0, NULL FROM generate_series(1, 4) g")
        .await
        .unwrap();
    wait_value(&b, "SELECT count(*)::text FROM kv", Some("4".into())).await;

    // (1) Collected by acknowledgement, well before the 10 s backstop could.
    a.batch_execute("DELETE FROM kv WHERE k = 4").await.unwrap();
    for client in [&a, &b] {
        wait_for(
            "tombstone of k=4 collected",
            Duration::from_secs(60),
            || async {
                version_of(client, "public.kv", 4)
                    .await
                    .is_none()
                    .then_some(())
            },
        )
        .await;
    }
    for node in &nodes {
        wait_for("collection counted", Duration::from_secs(10), || async {
            (node.metric("pgferry_tombstones_collected_total", "") >= 1.0).then_some(())
        })
        .await;
    }
    for node in &nodes {
        assert_eq!(node.metric("pgferry_tombstones_expired_total", ""), 0.0);
    }

    // (2) Away for less than the horizon: the tombstone waits for B, and B converges.
    nodes[1].stop();
    b.batch_execute("UPDATE kv SET v = 10 WHERE k = 1")
        .await
        .unwrap(); // older
    a.batch_execute("DELETE FROM kv WHERE k = 1").await.unwrap(); // newer
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        version_of(&a, "public.kv", 1).await.is_some_and(|v| v.2),
        "A collected a tombstone B had not acknowledged"
    );
    nodes[1].ferry.restart();
    let expected: BTreeMap<i32, (i32, Option<String>)> =
        [(2, (0, None)), (3, (0, None))].into_iter().collect();
    wait_all_equal(&nodes, &expected, Duration::from_secs(90)).await;
    for client in [&a, &b] {
        wait_for(
            "tombstone of k=1 collected",
            Duration::from_secs(60),
            || async {
                version_of(client, "public.kv", 1)
                    .await
                    .is_none()
                    .then_some(())
            },
        )
        .await;
    }

    // (3) Away past the horizon.
    nodes[1].stop();
    b.batch_execute("UPDATE kv SET v = 20 WHERE k = 2")
        .await
        .unwrap(); // older
    a.batch_execute("DELETE FROM kv WHERE k = 2").await.unwrap(); // newer
    wait_for(
        "A's backstop went past B",
        Duration::from_secs(60),
        || async {
            let bypassed: i64 = one(
                &a,
                "SELECT count(*) FROM pgferry.horizon_bypassed WHERE node = 'mmhorizon1'",
            )
            .await;
            (bypassed == 1 && version_of(&a, "public.kv", 2).await.is_none()).then_some(())
        },
    )
    .await;
    assert!(nodes[0].metric("pgferry_tombstones_expired_total", "") >= 1.0);
    nodes[1].ferry.restart();
    wait_for("both sides refuse", Duration::from_secs(60), || async {
        let on_b = nodes[1].metric("pgferry_horizon_refusals_total", "node=\"mmhorizon1\"");
        let on_a = nodes[0].metric("pgferry_horizon_refusals_total", "node=\"mmhorizon1\"");
        (on_a > 0.0 && on_b > 0.0).then_some(())
    })
    .await;
    // B's log says to rebuild it.
    nodes[1]
        .ferry
        .wait_log("Rebuild node mmhorizon1", Duration::from_secs(30))
        .await;
    // `pgferry status` on A names the refused node, the peers' acknowledgements, the
    // horizon and the clock skew seen in the acks.
    let out = std::process::Command::new(common::ferry::pgferry_bin())
        .args(["status", "--config"])
        .arg(&nodes[0].ferry.config_path)
        .output()
        .expect("run pgferry status");
    let status = String::from_utf8_lossy(&out.stdout);
    for want in [
        "REFUSED node mmhorizon1",
        "mmhorizon1 had applied mmhorizon0 up to",
        "tombstone horizon for deletes from mmhorizon0",
        "clock skew: mmhorizon1 ran",
    ] {
        assert!(status.contains(want), "status lacks {want:?}:\n{status}");
    }
    // B's older update of k=2 (made while away) never comes back on A.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let k2: i64 = one(&a, "SELECT count(*) FROM kv WHERE k = 2").await;
    assert_eq!(k2, 0, "the stale node resurrected a deleted row");
}

/// The schema of the previous pgferry on a node: tombstones keyed by table and key with the
/// deleting transaction's xid, written by an AFTER DELETE trigger; versions were commit
/// timestamps.
const PREVIOUS_SCHEMA: &str = r#"
CREATE SCHEMA pgferry;
CREATE TABLE pgferry.tombstones (
    table_name text NOT NULL, key jsonb NOT NULL, xid xid8 NOT NULL,
    commit_ts timestamptz, roident oid, PRIMARY KEY (table_name, key));
CREATE FUNCTION pgferry.record_tombstone() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    INSERT INTO pgferry.tombstones AS d (table_name, key, xid)
    VALUES (TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME,
            (SELECT jsonb_object_agg(k, to_jsonb(OLD) -> k) FROM unnest(TG_ARGV) AS k),
            pg_current_xact_id())
    ON CONFLICT (table_name, key) DO UPDATE SET xid = EXCLUDED.xid, commit_ts = NULL, roident = NULL;
    RETURN NULL;
END
$fn$;
ALTER TABLE kv REPLICA IDENTITY FULL;
CREATE TRIGGER pgferry_tombstone AFTER DELETE ON kv
    FOR EACH ROW EXECUTE FUNCTION pgferry.record_tombstone('k');
"#;

/// A node prepared by the previous pgferry upgrades in place on start: its live rows get their
/// commit timestamp (and this node) as version, its tombstones become deleted versions with
/// the deleting transaction's commit time, and the old table and trigger are gone.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_of_the_previous_schema_upgrades_in_place() {
    let (db, c) = cluster().fresh_db("mmupgrade", KV_DDL).await;
    c.batch_execute(PREVIOUS_SCHEMA).await.unwrap();
    for k in 1..=3 {
        c.execute("INSERT INTO kv VALUES ($1, $1, NULL)", &[&k])
            .await
            .unwrap();
    }
    c.batch_execute("DELETE FROM kv WHERE k = 3").await.unwrap();
    let micros = "(extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1000000)::int8";
    let mut want = Vec::new();
    for k in 1..=2 {
        let ts: i64 = c
            .query_one(&format!("SELECT {micros} FROM kv WHERE k = $1"), &[&k])
            .await
            .unwrap()
            .get(0);
        want.push((k, Some((ts, "mmupgrade0".to_owned(), false))));
    }
    let deleted_ts: i64 = one(
        &c,
        "SELECT (extract(epoch FROM pg_xact_commit_timestamp(
                    (xid::text::int8 % 4294967296)::text::xid)) * 1000000)::int8
           FROM pgferry.tombstones",
    )
    .await;
    want.push((3, Some((deleted_ts, "mmupgrade0".to_owned(), true))));

    // pgferry of this schema's successor starts on the node (its peer never shows up).
    let _ferry = lone_node("mmupgrade", &db);
    wait_for("the upgrade", Duration::from_secs(60), || async {
        let gone: bool = c
            .query_one("SELECT to_regclass('pgferry.tombstones') IS NULL", &[])
            .await
            .ok()?
            .get(0);
        gone.then_some(())
    })
    .await;
    for (k, version) in want {
        assert_eq!(version_of(&c, "public.kv", k).await, version, "key {k}");
    }
    let triggers: Vec<String> = first_column(
        &c,
        "SELECT tgname::text FROM pg_trigger WHERE tgrelid = 'kv'::regclass ORDER BY 1",
    )
    .await;
    assert_eq!(triggers, vec!["pgferry_no_truncate", "zz_pgferry_version"]);
    // From now on local writes are versioned above what the upgrade recorded.
    let before = version_of(&c, "public.kv", 1).await.unwrap();
    c.batch_execute("UPDATE kv SET v = 10 WHERE k = 1")
        .await
        .unwrap();
    let after = version_of(&c, "public.kv", 1).await.unwrap();
    assert!(after.0 > before.0, "{after:?} is not above {before:?}");
}

/// A node whose version store keys are jsonb (the first layout of `pgferry.versions`) converts
/// them in place on start, to text and then to arrays of the key's values (the third layout):
/// every version is found again under its key, none is seeded anew, and local writes stamp
/// above them.
#[tokio::test(flavor = "multi_thread")]
async fn a_version_store_with_jsonb_keys_converts_in_place() {
    let (db, c) = cluster().fresh_db("mmjsonkey", KV_DDL).await;
    c.batch_execute(
        "CREATE SCHEMA pgferry;
         CREATE TABLE pgferry.versions (
             table_name text NOT NULL, key jsonb NOT NULL, t int8 NOT NULL,
             node text COLLATE \"C\" NOT NULL, deleted bool NOT NULL,
             PRIMARY KEY (table_name, key));
         INSERT INTO kv VALUES (1, 1, NULL), (2, 2, NULL);
         INSERT INTO pgferry.versions
         SELECT 'public.kv', jsonb_build_object('k', k),
                (extract(epoch FROM now()) * 1000000)::int8 + k, 'mmjsonkey9', k = 3
           FROM generate_series(1, 3) AS k;",
    )
    .await
    .unwrap();
    // Recent versions: the retention backstop leaves the tombstone (key 3) alone.
    let base: i64 = one(&c, "SELECT min(t) - 1 FROM pgferry.versions").await;
    let _ferry = lone_node("mmjsonkey", &db);
    wait_for("the conversion", Duration::from_secs(60), || async {
        let protected: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_trigger
                  WHERE tgrelid = 'kv'::regclass AND tgname = 'zz_pgferry_version'
                    AND NOT EXISTS (SELECT 1 FROM pgferry.versions WHERE key::text LIKE '{%')",
                &[],
            )
            .await
            .ok()?
            .get(0);
        (protected == 1).then_some(())
    })
    .await;
    let ty: String = c
        .query_one(
            "SELECT format_type(atttypid, NULL) || ' ' || coalesce(collname, '')
               FROM pg_attribute LEFT JOIN pg_collation ON pg_collation.oid = attcollation
              WHERE attrelid = 'pgferry.versions'::regclass AND attname = 'key'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ty, "text C");
    for k in 1..=3 {
        let want = Some((base + i64::from(k), "mmjsonkey9".to_owned(), k == 3));
        assert_eq!(version_of(&c, "public.kv", k).await, want, "key {k}");
    }
    let rows: i64 = one(&c, "SELECT count(*) FROM pgferry.versions").await;
    assert_eq!(rows, 3, "a version was seeded again under another key");
    c.batch_execute("UPDATE kv SET v = 10 WHERE k = 1")
        .await
        .unwrap();
    let after = version_of(&c, "public.kv", 1).await.unwrap();
    assert!(after.0 > base + 1 && after.1 == "mmjsonkey0", "{after:?}");
    let rows: i64 = one(&c, "SELECT count(*) FROM pgferry.versions").await;
    assert_eq!(rows, 3, "the local write stamped a second version row");
}

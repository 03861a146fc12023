//! Multi-master end to end: several nodes, each its own PostgreSQL cluster and its own
//! pgferry (capture + apply of every other node), one real broker. Convergence is checked
//! against a last-writer-wins oracle computed from what the writers committed.

mod common;

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use common::broker::Broker;
use common::ferry::Ferry;
use common::pg::PgCluster;
use common::wait_for;
use tokio_postgres::Client;

fn broker() -> &'static Broker {
    static BROKER: OnceLock<Broker> = OnceLock::new();
    BROKER.get_or_init(Broker::start)
}

/// Three clusters shared by the tests of this binary (a database per test on each).
fn cluster(i: usize) -> &'static PgCluster {
    static CLUSTERS: OnceLock<Vec<PgCluster>> = OnceLock::new();
    &CLUSTERS.get_or_init(|| (0..3).map(|_| PgCluster::start(&[])).collect())[i]
}

/// A cluster whose clock runs two seconds behind (libfaketime).
fn skewed_cluster() -> &'static PgCluster {
    static SKEWED: OnceLock<PgCluster> = OnceLock::new();
    SKEWED.get_or_init(|| PgCluster::start_faketime("-2"))
}

const KV_DDL: &str = "CREATE TABLE kv (k int PRIMARY KEY, v int NOT NULL, note text)";

struct Node {
    name: String,
    cluster: &'static PgCluster,
    db: String,
    ferry: Ferry,
}

impl Node {
    async fn client(&self) -> Client {
        self.cluster.client(&self.db).await
    }

    fn metric(&self, name: &str, labels: &str) -> f64 {
        self.ferry.metric(name, labels).unwrap_or(0.0)
    }

    /// Stops pgferry with SIGTERM and waits for it to exit.
    fn stop(&mut self) {
        self.ferry.terminate();
        let status = self.ferry.wait_exit(Duration::from_secs(60));
        assert!(status.is_some(), "{} did not stop", self.name);
    }
}

fn node_config(
    label: &str,
    name: &str,
    others: &[String],
    cluster: &PgCluster,
    db: &str,
    port: u16,
    conflict: &str,
) -> String {
    format!(
        "node_id: {name}\n\
         source:\n  url: {url}\n  slot: slot_{db}\n  publication: pub_{db}\n  snapshot: never\n  \
         heartbeat_interval: 1s\n  status_interval: 1s\n\
         kafka:\n  brokers: {brokers}\n  topic_prefix: {label}\n\
         apply:\n  mode: multi_master\n  nodes: [{others}]\n  targets:\n    - url: {url}\n  \
         conflict:\n    maintenance_interval: 2s\n{conflict}\
         metrics:\n  listen: 127.0.0.1:{port}\n\
         log:\n  format: text\n  level: info,pgferry=debug\n",
        url = cluster.url(db),
        brokers = broker().address(),
        others = others.join(", "),
    )
}

/// One database per cluster with `ddl`, and a multi-master pgferry on each, all ready.
/// `conflict`: extra lines under `apply.conflict` (indented four spaces).
async fn mesh(
    label: &str,
    clusters: &[&'static PgCluster],
    ddl: &str,
    conflict: &str,
) -> Vec<Node> {
    let names: Vec<String> = (0..clusters.len()).map(|i| format!("{label}{i}")).collect();
    let mut nodes = Vec::new();
    for (i, cluster) in clusters.iter().enumerate() {
        let (db, _) = cluster.fresh_db(label, ddl).await;
        let others: Vec<String> = names.iter().filter(|n| **n != names[i]).cloned().collect();
        let port = common::free_port();
        let yaml = node_config(label, &names[i], &others, cluster, &db, port, conflict);
        nodes.push(Node {
            name: names[i].clone(),
            cluster,
            db,
            ferry: Ferry::start(&yaml, port),
        });
    }
    for node in &nodes {
        node.ferry.wait_ready().await;
    }
    nodes
}

/// A committed write as the oracle sees it: version and resulting row (`None`: deleted).
#[derive(Debug, Clone)]
struct Committed {
    ts_us: i64,
    node: String,
    key: i32,
    row: Option<(i32, Option<String>)>,
}

const COMMIT_TS_US: &str = "SELECT (extract(epoch FROM pg_xact_commit_timestamp(($1::int8 % 4294967296)::text::xid)) * 1000000)::int8";

/// Random single-row inserts, updates and deletes over `keys` keys; records each write that
/// changed something, with its commit timestamp.
async fn random_writes(
    client: Client,
    node: String,
    seed: u64,
    ops: usize,
    keys: u64,
) -> Vec<Committed> {
    let mut rng = common::Rng::new(seed);
    let mut done = Vec::new();
    let mut client = client;
    for i in 0..ops {
        let r = rng.next();
        let key = (r % keys) as i32;
        let value = (r >> 20) as i32 & 0xffff;
        let note = (r >> 40) % 4 != 0;
        let note = note.then(|| format!("{node}-{i}"));
        let txn = client.transaction().await.expect("begin");
        let row = match (r >> 10) % 10 {
            0..=3 => txn
                .query_opt(
                    "INSERT INTO kv VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING v, note",
                    &[&key, &value, &note],
                )
                .await
                .map(|r| r.map(|r| Some((r.get(0), r.get(1))))),
            4..=7 => txn
                .query_opt(
                    "UPDATE kv SET v = $2, note = $3 WHERE k = $1 RETURNING v, note",
                    &[&key, &value, &note],
                )
                .await
                .map(|r| r.map(|r| Some((r.get(0), r.get(1))))),
            _ => txn
                .query_opt("DELETE FROM kv WHERE k = $1 RETURNING k", &[&key])
                .await
                .map(|r| r.map(|_| None)),
        };
        match row {
            Ok(Some(row)) => {
                let xid: i64 = txn
                    .query_one("SELECT txid_current()", &[])
                    .await
                    .expect("xid")
                    .get(0);
                txn.commit().await.expect("commit");
                let ts_us: i64 = client
                    .query_one(COMMIT_TS_US, &[&xid])
                    .await
                    .expect("commit timestamp")
                    .get(0);
                done.push(Committed {
                    ts_us,
                    node: node.clone(),
                    key,
                    row,
                });
            }
            Ok(None) => txn.rollback().await.expect("rollback"),
            Err(e) => panic!("writer {node}: {e:?}"),
        }
        if r % 3 == 0 {
            tokio::time::sleep(Duration::from_millis((r >> 50) % 8)).await;
        }
    }
    done
}

/// The last-writer-wins outcome: per key, the write with the greatest (commit ts, node).
fn oracle(writes: &[Committed]) -> BTreeMap<i32, (i32, Option<String>)> {
    let mut last: BTreeMap<i32, &Committed> = BTreeMap::new();
    for w in writes {
        let entry = last.entry(w.key).or_insert(w);
        if (w.ts_us, &w.node) > (entry.ts_us, &entry.node) {
            *entry = w;
        }
    }
    last.into_iter()
        .filter_map(|(k, w)| w.row.clone().map(|row| (k, row)))
        .collect()
}

async fn kv_rows(client: &Client) -> BTreeMap<i32, (i32, Option<String>)> {
    client
        .query("SELECT k, v, note FROM kv ORDER BY k", &[])
        .await
        .expect("read kv")
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

/// Waits until every node's `kv` equals `expected`; fails with the first difference.
async fn wait_all_equal(
    nodes: &[Node],
    expected: &BTreeMap<i32, (i32, Option<String>)>,
    timeout: Duration,
) {
    let mut clients = Vec::new();
    for n in nodes {
        clients.push(n.client().await);
    }
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let mut diff = None;
        for (node, client) in nodes.iter().zip(&clients) {
            let got = kv_rows(client).await;
            if &got != expected {
                let keys: Vec<_> = expected
                    .keys()
                    .chain(got.keys())
                    .filter(|k| got.get(k) != expected.get(k))
                    .take(5)
                    .map(|k| {
                        format!(
                            "k={k}: node has {:?}, oracle {:?}",
                            got.get(k),
                            expected.get(k)
                        )
                    })
                    .collect();
                diff = Some(format!("{}: {}", node.name, keys.join("; ")));
                break;
            }
        }
        match diff {
            None => return,
            Some(d) if std::time::Instant::now() >= deadline => {
                panic!("nodes did not converge to the oracle within {timeout:?}: {d}")
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// What happens to pgferry processes while the writers run.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Disturbance {
    None,
    /// `kill -9` node 1's pgferry twice mid-stream, restarting it each time.
    Kill9,
    /// Node 2's pgferry is down for the whole write phase and a while after.
    Offline,
}

/// Runs the randomized scenario; returns the nodes (still running) and the writes.
async fn randomized(
    label: &str,
    clusters: [&'static PgCluster; 3],
    seed: u64,
    disturbance: Disturbance,
) -> (Vec<Node>, Vec<Committed>) {
    const OPS_PER_NODE: usize = 700;
    const KEYS: u64 = 24;
    let mut nodes = mesh(label, &clusters, KV_DDL, "").await;
    if disturbance == Disturbance::Offline {
        nodes[2].stop();
    }
    let mut writers = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let client = node.client().await;
        let name = node.name.clone();
        writers.push(tokio::spawn(random_writes(
            client,
            name,
            seed * 10 + i as u64,
            OPS_PER_NODE,
            KEYS,
        )));
    }
    if disturbance == Disturbance::Kill9 {
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let still_writing = writers.iter().any(|w| !w.is_finished());
            assert!(
                still_writing,
                "the writers finished before the kill: make them slower"
            );
            nodes[1].ferry.kill9();
            nodes[1].ferry.restart();
        }
    }
    let mut writes = Vec::new();
    for w in writers {
        writes.extend(w.await.expect("writer"));
    }
    if disturbance == Disturbance::Offline {
        // Everyone else keeps going (and converges without it) while it is away.
        tokio::time::sleep(Duration::from_secs(5)).await;
        nodes[2].ferry.restart();
    }
    let expected = oracle(&writes);
    let per_node: Vec<usize> = nodes
        .iter()
        .map(|n| writes.iter().filter(|w| w.node == n.name).count())
        .collect();
    eprintln!(
        "{label}: seed {seed}, {} committed writes {per_node:?}, {} live keys expected",
        writes.len(),
        expected.len()
    );
    assert!(
        writes.len() > 1000,
        "too few writes to mean anything: {}",
        writes.len()
    );
    wait_all_equal(&nodes, &expected, Duration::from_secs(240)).await;
    (nodes, writes)
}

/// Acceptance 1 (and loop prevention): three nodes converge to the oracle, and each node
/// published exactly its own writes: nothing applied was captured again. Two seeds here; the
/// disturbed scenarios below add three more.
#[tokio::test(flavor = "multi_thread")]
async fn three_nodes_converge_to_last_writer_wins() {
    for seed in [1, 5] {
        let label = format!("mmplain{seed}n");
        let clusters = [cluster(0), cluster(1), cluster(2)];
        let (nodes, writes) = randomized(&label, clusters, seed, Disturbance::None).await;
        for node in &nodes {
            let own = writes.iter().filter(|w| w.node == node.name).count() as f64;
            let captured = node.metric("pgferry_changes_captured_total", "table=\"public.kv\"");
            assert_eq!(
                captured, own,
                "{} captured {captured} changes but wrote {own}",
                node.name
            );
            assert!(node.metric("pgferry_capture_echoes_skipped_total", "") > 0.0);
            assert!(
                node.metric("pgferry_conflicts_total", "") > 0.0,
                "{}: a small key space must conflict",
                node.name
            );
        }
    }
}

/// Acceptance 4: `kill -9` of one node's pgferry twice mid-apply; still the oracle's state.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_apply_still_converges() {
    randomized(
        "mmkill",
        [cluster(0), cluster(1), cluster(2)],
        2,
        Disturbance::Kill9,
    )
    .await;
}

/// Acceptance 3: one node's pgferry is down while every node writes; on restart it catches
/// up from its slot and from Kafka, and all converge.
#[tokio::test(flavor = "multi_thread")]
async fn offline_node_catches_up_and_converges() {
    randomized(
        "mmoffline",
        [cluster(0), cluster(1), cluster(2)],
        3,
        Disturbance::Offline,
    )
    .await;
}

/// Acceptance 2: one node's PostgreSQL runs 2 s behind. Still converges; that node waited
/// for its clock before committing applies, and the skew metrics say so.
#[tokio::test(flavor = "multi_thread")]
async fn clock_skew_still_converges() {
    let skewed = skewed_cluster();
    let (nodes, _) = randomized(
        "mmskew",
        [cluster(0), cluster(1), skewed],
        4,
        Disturbance::None,
    )
    .await;
    let waits = nodes[2].metric("pgferry_clock_skew_waits_total", "");
    let exceeded = nodes[2].metric("pgferry_clock_skew_exceeded_total", "");
    assert!(waits > 0.0, "the skewed node never waited for its clock");
    assert!(
        exceeded > 0.0,
        "2 s of skew is beyond the default max_clock_skew of 1 s"
    );
    for node in &nodes[..2] {
        assert_eq!(
            node.metric("pgferry_clock_skew_exceeded_total", ""),
            0.0,
            "{}: its clock is not behind anyone's",
            node.name
        );
    }
}

async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.expect(sql).get(0)
}

async fn wait_row(client: &Client, sql: &str, want: Option<i32>) {
    wait_for(
        &format!("{sql} = {want:?}"),
        Duration::from_secs(60),
        || async {
            let got: Option<i32> = client.query_opt(sql, &[]).await.ok()?.map(|r| r.get(0));
            (got == want).then_some(())
        },
    )
    .await
}

/// Conflicts of one node: (key, type, resolution), in key order.
async fn conflicts(client: &Client) -> Vec<(i32, String, String)> {
    client
        .query(
            "SELECT (key->>'k')::int, conflict_type, resolution FROM pgferry.conflicts ORDER BY 1, id",
            &[],
        )
        .await
        .expect("read pgferry.conflicts")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// Acceptances 5 and 7: sequential updates are not conflicts; update-vs-delete in both
/// timestamp orders and update/update give the last writer's result on both nodes, and
/// every conflict is in `pgferry.conflicts` and the metric.
#[tokio::test(flavor = "multi_thread")]
async fn update_delete_races_and_the_conflict_log() {
    let mut nodes = mesh("mmrace", &[cluster(0), cluster(1)], KV_DDL, "").await;
    let (a, b) = (nodes[0].client().await, nodes[1].client().await);
    a.batch_execute("INSERT INTO kv VALUES (1, 0, NULL), (2, 0, NULL), (3, 0, NULL), (4, 0, NULL)")
        .await
        .unwrap();
    wait_row(&b, "SELECT count(*)::int FROM kv", Some(4)).await;
    // Sequential: B updates a row after it has received A's update, and back.
    a.batch_execute("UPDATE kv SET v = 1 WHERE k = 1")
        .await
        .unwrap();
    wait_row(&b, "SELECT v FROM kv WHERE k = 1", Some(1)).await;
    b.batch_execute("UPDATE kv SET v = 2 WHERE k = 1")
        .await
        .unwrap();
    wait_row(&a, "SELECT v FROM kv WHERE k = 1", Some(2)).await;
    a.batch_execute("DELETE FROM kv WHERE k = 4").await.unwrap();
    wait_row(&b, "SELECT count(*)::int FROM kv WHERE k = 4", Some(0)).await;
    for (node, client) in nodes.iter().zip([&a, &b]) {
        assert_eq!(
            conflicts(client).await,
            vec![],
            "{}: sequential changes are not conflicts",
            node.name
        );
        assert_eq!(node.metric("pgferry_conflicts_total", ""), 0.0);
    }

    // Concurrent: neither node hears the other while these happen.
    nodes[0].stop();
    nodes[1].stop();
    b.batch_execute("UPDATE kv SET v = 5 WHERE k = 1")
        .await
        .unwrap(); // older update...
    a.batch_execute("DELETE FROM kv WHERE k = 1").await.unwrap(); // ...newer delete: gone
    a.batch_execute("DELETE FROM kv WHERE k = 2").await.unwrap(); // older delete...
    b.batch_execute("UPDATE kv SET v = 15 WHERE k = 2")
        .await
        .unwrap(); // ...newer update: 15
    a.batch_execute("UPDATE kv SET v = 30 WHERE k = 3")
        .await
        .unwrap();
    b.batch_execute("UPDATE kv SET v = 31 WHERE k = 3")
        .await
        .unwrap(); // newer: 31
    for node in &mut nodes {
        node.ferry.restart();
    }
    let expected: BTreeMap<i32, (i32, Option<String>)> =
        [(2, (15, None)), (3, (31, None))].into_iter().collect();
    wait_all_equal(&nodes, &expected, Duration::from_secs(120)).await;

    let on_a = conflicts(&a).await;
    let on_b = conflicts(&b).await;
    let s = |v: &[(i32, &str, &str)]| -> Vec<(i32, String, String)> {
        v.iter()
            .map(|(k, t, r)| (*k, t.to_string(), r.to_string()))
            .collect()
    };
    assert_eq!(
        on_a,
        s(&[
            (1, "update_deleted", "keep_local"),
            (2, "update_deleted", "apply_remote"),
            (3, "update_update", "apply_remote"),
        ])
    );
    assert_eq!(
        on_b,
        s(&[
            (1, "delete_updated", "apply_remote"),
            (2, "delete_updated", "keep_local"),
            (3, "update_update", "keep_local"),
        ])
    );
    wait_for("conflict metrics", Duration::from_secs(10), || async {
        let counted = (
            nodes[0].metric("pgferry_conflicts_total", "table=\"public.kv\""),
            nodes[1].metric("pgferry_conflicts_total", "table=\"public.kv\""),
        );
        (counted == (3.0, 3.0)).then_some(())
    })
    .await;
    assert_eq!(
        nodes[0].metric(
            "pgferry_conflicts_total",
            "resolution=\"keep_local\",table=\"public.kv\",type=\"update_deleted\""
        ),
        1.0
    );
    // The conflict rows carry both versions and rows.
    let full = count(
        &a,
        "SELECT count(*) FROM pgferry.conflicts WHERE local_commit_ts IS NOT NULL AND local_node IS NOT NULL \
           AND remote_node = 'mmrace1' AND remote_row IS NOT NULL",
    )
    .await;
    assert_eq!(full, 3);
    // The deleted key's tombstone on B carries A's delete, so an old update cannot revive it.
    assert_eq!(
        count(
            &b,
            "SELECT count(*) FROM pgferry.tombstones WHERE key = '{\"k\": 1}'"
        )
        .await,
        1
    );
}

const COUNTERS_DDL: &str = r#"
CREATE TABLE counters (id int PRIMARY KEY, per_node jsonb NOT NULL DEFAULT '{}', total int NOT NULL DEFAULT 0);
-- A grow-only counter: each node increments its own entry; merging takes the larger count
-- per node, so the merge is commutative, associative and idempotent.
CREATE FUNCTION public.merge_counters(tbl text, l jsonb, r jsonb, lv jsonb, rv jsonb)
RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
  WITH merged AS (
    SELECT COALESCE(jsonb_object_agg(k, GREATEST(COALESCE((l->'per_node'->>k)::int, 0),
                                                  COALESCE((r->'per_node'->>k)::int, 0))), '{}') AS per_node
      FROM (SELECT jsonb_object_keys(l->'per_node') UNION SELECT jsonb_object_keys(r->'per_node')) AS keys(k))
  SELECT jsonb_build_object('id', l->'id', 'per_node', m.per_node,
                            'total', (SELECT COALESCE(sum(value::int), 0) FROM jsonb_each_text(m.per_node)))
    FROM merged m
$$;
"#;

/// Acceptance 6: a counter-merging resolver gives the merged value on every node.
#[tokio::test(flavor = "multi_thread")]
async fn custom_resolver_merges_counters() {
    let mut nodes = mesh(
        "mmmerge",
        &[cluster(1), cluster(2)],
        COUNTERS_DDL,
        "    resolvers:\n      public.counters: public.merge_counters\n",
    )
    .await;
    let (a, b) = (nodes[0].client().await, nodes[1].client().await);
    a.batch_execute("INSERT INTO counters (id) VALUES (1)")
        .await
        .unwrap();
    wait_row(&b, "SELECT count(*)::int FROM counters", Some(1)).await;
    nodes[0].stop();
    nodes[1].stop();
    let increment = |node: &str| {
        format!(
            "UPDATE counters SET per_node = jsonb_set(per_node, '{{{node}}}', \
             to_jsonb(COALESCE((per_node->>'{node}')::int, 0) + 1)), total = total + 1 WHERE id = 1"
        )
    };
    for _ in 0..3 {
        a.batch_execute(&increment(&nodes[0].name)).await.unwrap();
    }
    for _ in 0..5 {
        b.batch_execute(&increment(&nodes[1].name)).await.unwrap();
    }
    for node in &mut nodes {
        node.ferry.restart();
    }
    for client in [&a, &b] {
        wait_row(client, "SELECT total FROM counters WHERE id = 1", Some(8)).await;
    }
    for (client, node) in [(&a, &nodes[0]), (&b, &nodes[1])] {
        let row = client
            .query_one("SELECT per_node::text FROM counters WHERE id = 1", &[])
            .await
            .unwrap();
        let text: String = row.get(0);
        let want = format!("{{\"{}\": 3, \"{}\": 5}}", nodes[0].name, nodes[1].name);
        assert_eq!(text, want, "on {}", node.name);
        assert!(
            count(
                client,
                "SELECT count(*) FROM pgferry.conflicts WHERE resolution = 'merge'"
            )
            .await
                > 0
        );
    }
}

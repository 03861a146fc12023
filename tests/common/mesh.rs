//! Multi-master meshes for tests: a pgferry per node, random writers that record what they
//! committed (surviving server restarts), and the last-writer-wins oracle they are checked
//! against.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::ferry::Ferry;
use super::pg::PgCluster;

pub const KV_DDL: &str = "CREATE TABLE kv (k int PRIMARY KEY, v int NOT NULL, note text)";

pub struct Node {
    pub name: String,
    pub cluster: &'static PgCluster,
    pub db: String,
    pub ferry: Ferry,
}

impl Node {
    pub async fn client(&self) -> Client {
        self.cluster.client(&self.db).await
    }

    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        self.ferry.metric(name, labels).unwrap_or(0.0)
    }

    /// What a failed wait should show: the node's capture metrics beside what its server says
    /// about WAL, the slot, the walsender and open transactions.
    pub async fn diagnose(&self) -> String {
        let metrics = self
            .ferry
            .http_get("/metrics")
            .map(|(_, text)| {
                text.lines()
                    .filter(|l| {
                        !l.starts_with('#')
                            && (l.starts_with("pgferry_source_")
                                || l.starts_with("pgferry_capture")
                                || l.starts_with("pgferry_changes_captured")
                                || l.starts_with("pgferry_apply_lock"))
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_else(|| "(no /metrics answer)".into());
        let client = self.client().await;
        let mut server = String::new();
        for sql in [
            "SELECT pg_current_wal_lsn()::text, pg_current_wal_flush_lsn()::text",
            "SELECT slot_name || ' active=' || active || ' confirmed=' || \
             coalesce(confirmed_flush_lsn::text, '-') FROM pg_replication_slots",
            "SELECT external_id || ' remote=' || remote_lsn || ' local=' || local_lsn \
             FROM pg_replication_origin_status",
            "SELECT slot_name || ' txns=' || total_txns || ' bytes=' || total_bytes \
             FROM pg_stat_replication_slots",
            "SELECT application_name || ' ' || state || ' sent=' || coalesce(sent_lsn::text, '-') \
             || ' flush=' || coalesce(flush_lsn::text, '-') FROM pg_stat_replication",
            "SELECT pid || ' ' || coalesce(application_name, '') || ' ' || \
             coalesce(backend_type, '') || ' ' || coalesce(state, '') || ' ' || \
             coalesce(wait_event_type || ':' || wait_event, '') || ' xact_start=' || \
             coalesce(xact_start::text, '-') || ' ' || left(coalesce(query, ''), 80) \
             FROM pg_stat_activity WHERE datname = current_database() \
             AND pid <> pg_backend_pid()",
        ] {
            match client.simple_query(sql).await {
                Ok(rows) => {
                    for row in rows {
                        if let tokio_postgres::SimpleQueryMessage::Row(row) = row {
                            let cells: Vec<&str> = (0..row.len())
                                .map(|i| row.get(i).unwrap_or("NULL"))
                                .collect();
                            server.push_str(&cells.join(" "));
                            server.push('\n');
                        }
                    }
                }
                Err(e) => server.push_str(&format!("{sql}: {e}\n")),
            }
        }
        format!(
            "{} metrics:\n{metrics}\n{} server:\n{server}",
            self.name, self.name
        )
    }

    /// Stops pgferry with SIGTERM and waits for it to exit.
    pub fn stop(&mut self) {
        self.ferry.terminate();
        let status = self.ferry.wait_exit(Duration::from_secs(60));
        assert!(status.is_some(), "{} did not stop", self.name);
    }
}

/// How many apply lanes a node runs with: 1, 2 or 3 by the last byte of its name, so that
/// every multi-master scenario runs single-connection and parallel apply side by side.
pub fn lanes_of(name: &str) -> u8 {
    1 + name.bytes().last().map_or(0, |b| b % 3)
}

#[allow(clippy::too_many_arguments)]
pub fn node_config(
    label: &str,
    name: &str,
    others: &[String],
    cluster: &PgCluster,
    db: &str,
    port: u16,
    conflict: &str,
    brokers: &str,
) -> String {
    format!(
        "node_id: {name}\n\
         source:\n  url: {url}\n  slot: slot_{db}\n  publication: pub_{db}\n  snapshot: never\n  \
         heartbeat_interval: 1s\n  status_interval: 1s\n\
         kafka:\n  brokers: {brokers}\n  topic_prefix: {label}\n\
         apply:\n  mode: multi_master\n  nodes: [{others}]\n  lanes: {lanes}\n  targets:\n    - url: {url}\n  \
         conflict:\n    maintenance_interval: 2s\n{conflict}\
         metrics:\n  listen: 127.0.0.1:{port}\n\
         log:\n  format: text\n  level: info,pgferry=debug\n",
        url = cluster.url(db),
        others = others.join(", "),
        lanes = lanes_of(name),
    )
}

/// One database per cluster with `ddl`, and a multi-master pgferry on each, all ready.
/// `conflict`: extra lines under `apply.conflict` (indented four spaces).
pub async fn mesh(
    label: &str,
    clusters: &[&'static PgCluster],
    ddl: &str,
    conflict: &str,
    brokers: &str,
) -> Vec<Node> {
    let names: Vec<String> = (0..clusters.len()).map(|i| format!("{label}{i}")).collect();
    let mut nodes = Vec::new();
    for (i, cluster) in clusters.iter().enumerate() {
        let (db, _) = cluster.fresh_db(label, ddl).await;
        let others: Vec<String> = names.iter().filter(|n| **n != names[i]).cloned().collect();
        let port = super::free_port();
        let yaml = node_config(
            label, &names[i], &others, cluster, &db, port, conflict, brokers,
        );
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

/// A row of `kv` apart from its key: `(v, note)`.
pub type KvRow = (i32, Option<String>);

/// A committed write as the oracle sees it: its version `(ts_us, node)` as the node's version
/// store stamped it, and the resulting row (`None`: deleted).
#[derive(Debug, Clone)]
pub struct Committed {
    pub ts_us: i64,
    pub node: String,
    pub key: i32,
    pub row: Option<(i32, Option<String>)>,
}

/// The version the node stamped for `kv` key `$1` (its clock value, µs).
pub const VERSION_OF_KEY: &str = "SELECT t FROM pgferry.versions \
     WHERE table_name = 'public.kv' AND key = jsonb_build_array($1::int4)::text";

/// How long random writers run.
#[derive(Debug, Clone, Copy)]
pub enum Budget {
    /// This many operations.
    Ops(usize),
    /// Until this instant.
    Until(Instant),
}

/// Connects, retrying while the server restarts. Commits are synchronous: the test clusters
/// default to `synchronous_commit = off`, under which an immediate restart may lose a commit
/// the writer was told about, and the oracle would expect a write no node ever had.
async fn connect(cluster: &PgCluster, db: &str) -> Client {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok((client, conn)) =
            tokio_postgres::connect(&cluster.url(db), tokio_postgres::NoTls).await
        {
            tokio::spawn(conn);
            if client
                .batch_execute("SET synchronous_commit = on")
                .await
                .is_ok()
            {
                return client;
            }
        }
        assert!(Instant::now() < deadline, "cannot reconnect to {db}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether a transaction whose commit answer was lost (a server restart) committed.
async fn settle(cluster: &PgCluster, db: &str, xid: i64) -> bool {
    loop {
        let client = connect(cluster, db).await;
        let status = client
            .query_one("SELECT pg_xact_status($1::text::xid8)", &[&xid.to_string()])
            .await;
        let Ok(status) = status else { continue };
        return status.get::<_, Option<String>>(0).as_deref() == Some("committed");
    }
}

/// Random single-row inserts, updates and deletes over `keys` keys; records each write that
/// changed something, with the version the node stamped for it (read in the transaction). A server restart mid-transaction is
/// survived: the writer reconnects, and a commit whose answer was lost is settled by asking
/// the server what became of its transaction id.
pub async fn random_writes(
    cluster: &'static PgCluster,
    db: String,
    node: String,
    seed: u64,
    budget: Budget,
    keys: u64,
) -> Vec<Committed> {
    let mut rng = super::Rng::new(seed);
    let mut done = Vec::new();
    let mut client = connect(cluster, &db).await;
    // A multi-master node stamps versions; a master of replicas has none (its oracle is the
    // master itself).
    let versioned: bool = loop {
        match client
            .query_one("SELECT to_regclass('pgferry.versions') IS NOT NULL", &[])
            .await
        {
            Ok(row) => break row.get(0),
            // The server restarted under us (fault campaign): ask again.
            Err(_) => client = connect(cluster, &db).await,
        }
    };
    let mut i = 0usize;
    loop {
        match budget {
            Budget::Ops(n) if i >= n => break,
            Budget::Until(t) if Instant::now() >= t => break,
            _ => {}
        }
        i += 1;
        let r = rng.next();
        let key = (r % keys) as i32;
        let value = (r >> 20) as i32 & 0xffff;
        let note = (r >> 40) % 4 != 0;
        let note = note.then(|| format!("{node}-{i}"));
        let (sql, deletes) = match (r >> 10) % 10 {
            0..=3 => (
                "INSERT INTO kv VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING v, note",
                false,
            ),
            4..=7 => (
                "UPDATE kv SET v = $2, note = $3 WHERE k = $1 RETURNING v, note",
                false,
            ),
            _ => ("DELETE FROM kv WHERE k = $1 RETURNING k", true),
        };
        if client.is_closed() {
            client = connect(cluster, &db).await;
        }
        let attempt: Result<Option<(Option<KvRow>, i64, i64)>, tokio_postgres::Error> = async {
            client.batch_execute("BEGIN").await?;
            let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = if deletes {
                vec![&key]
            } else {
                vec![&key, &value, &note]
            };
            let row = client.query_opt(sql, &params).await?;
            let Some(row) = row else {
                client.batch_execute("ROLLBACK").await?;
                return Ok(None);
            };
            let image = (!deletes).then(|| (row.get(0), row.get(1)));
            let xid: i64 = client.query_one("SELECT txid_current()", &[]).await?.get(0);
            let version: i64 = if versioned {
                client.query_one(VERSION_OF_KEY, &[&key]).await?.get(0)
            } else {
                0
            };
            Ok(Some((image, xid, version)))
        }
        .await;
        let (row, xid, version) = match attempt {
            Ok(Some(found)) => found,
            Ok(None) => continue,
            Err(_) => {
                // Before COMMIT was sent: the transaction did not commit.
                client = connect(cluster, &db).await;
                continue;
            }
        };
        let committed = match client.batch_execute("COMMIT").await {
            Ok(()) => true,
            Err(_) => settle(cluster, &db, xid).await,
        };
        if committed {
            // The version the node's trigger stamped, read inside the transaction.
            let ts_us = version;
            done.push(Committed {
                ts_us,
                node: node.clone(),
                key,
                row,
            });
        }
        if r % 3 == 0 {
            tokio::time::sleep(Duration::from_millis((r >> 50) % 8)).await;
        }
    }
    done
}

/// A [`random_writes`] writer on each of `nodes`, node `i` seeded `seed + i`.
pub fn spawn_writers(
    nodes: &[Node],
    seed: u64,
    budget: Budget,
    keys: u64,
) -> Vec<tokio::task::JoinHandle<Vec<Committed>>> {
    nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            tokio::spawn(random_writes(
                node.cluster,
                node.db.clone(),
                node.name.clone(),
                seed + i as u64,
                budget,
                keys,
            ))
        })
        .collect()
}

/// Every write the writers committed, once they are all done.
pub async fn join_writers(writers: Vec<tokio::task::JoinHandle<Vec<Committed>>>) -> Vec<Committed> {
    let mut writes = Vec::new();
    for w in writers {
        writes.extend(w.await.expect("writer"));
    }
    writes
}

/// The last-writer-wins outcome: per key, the write with the greatest version `(t, node)`,
/// node ids compared bytewise. Versions are what each node stamped (`max(clock, previous
/// version of the key + 1)`), not commit timestamps.
pub fn oracle(writes: &[Committed]) -> BTreeMap<i32, (i32, Option<String>)> {
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

/// `kv` of `db`, read again after a reconnect when the server restarts under the read (other
/// tests of the binary may restart the shared clusters).
pub async fn read_kv(cluster: &PgCluster, db: &str) -> BTreeMap<i32, (i32, Option<String>)> {
    loop {
        let client = connect(cluster, db).await;
        if let Ok(rows) = client
            .query("SELECT k, v, note FROM kv ORDER BY k", &[])
            .await
        {
            return rows
                .iter()
                .map(|r| (r.get(0), (r.get(1), r.get(2))))
                .collect();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The first node whose `kv` differs from `expected`: its name, and up to five differing
/// keys with both sides.
async fn first_difference(
    nodes: &[Node],
    expected: &BTreeMap<i32, (i32, Option<String>)>,
) -> Option<(String, Vec<i32>, String)> {
    for node in nodes {
        let got = read_kv(node.cluster, &node.db).await;
        if &got != expected {
            let keys: Vec<i32> = expected
                .keys()
                .chain(got.keys())
                .filter(|k| got.get(k) != expected.get(k))
                .take(5)
                .copied()
                .collect();
            let text = keys
                .iter()
                .map(|k| {
                    format!(
                        "k={k}: node has {:?}, oracle {:?}",
                        got.get(k),
                        expected.get(k)
                    )
                })
                .collect::<Vec<_>>()
                .join("; ");
            return Some((node.name.clone(), keys, text));
        }
    }
    None
}

/// Waits until every node's `kv` equals `expected`; fails with the first difference.
pub async fn wait_all_equal(
    nodes: &[Node],
    expected: &BTreeMap<i32, (i32, Option<String>)>,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    while let Some((node, _, diff)) = first_difference(nodes, expected).await {
        if Instant::now() >= deadline {
            panic!("nodes did not converge to the oracle within {timeout:?}: {node}: {diff}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until every node's `kv` equals the last-writer-wins oracle of `writes`. On failure
/// the message also shows, for each differing key, every committed write of it in version
/// order and what each node holds with the row's commit timestamp and origin.
pub async fn wait_converged(nodes: &[Node], writes: &[Committed], timeout: Duration) {
    let expected = oracle(writes);
    let deadline = Instant::now() + timeout;
    while let Some((node, keys, diff)) = first_difference(nodes, &expected).await {
        if Instant::now() >= deadline {
            let mut history = String::new();
            for key in keys {
                history.push_str(&format!("\nkey {key}: writes (ts_us, node, row):"));
                let mut of_key: Vec<&Committed> = writes.iter().filter(|w| w.key == key).collect();
                of_key.sort_by(|a, b| (a.ts_us, &a.node).cmp(&(b.ts_us, &b.node)));
                for w in of_key.iter().rev().take(8).rev() {
                    history.push_str(&format!("\n  {} {} {:?}", w.ts_us, w.node, w.row));
                }
                for n in nodes {
                    history.push_str(&format!("\n  on {}: {}", n.name, row_version(n, key).await));
                }
            }
            panic!(
                "nodes did not converge to the oracle within {timeout:?}: {node}: {diff}{history}"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A node's row of `key` and the key's stored version, as text.
async fn row_version(node: &Node, key: i32) -> String {
    let client = connect(node.cluster, &node.db).await;
    let row = client
        .query_opt(
            "SELECT kv.v, kv.note, v.t, v.node, v.deleted
               FROM (SELECT $1::int4 AS k) AS one
               LEFT JOIN kv ON kv.k = one.k
               LEFT JOIN pgferry.versions v
                 ON v.table_name = 'public.kv' AND v.key = jsonb_build_array(one.k)::text",
            &[&key],
        )
        .await;
    match row {
        Ok(Some(r)) => format!(
            "row {:?} version {:?}@{:?} deleted {:?}",
            r.get::<_, Option<i32>>(0)
                .map(|v| (v, r.get::<_, Option<String>>(1))),
            r.get::<_, Option<i64>>(2),
            r.get::<_, Option<String>>(3),
            r.get::<_, Option<bool>>(4)
        ),
        Ok(None) => "nothing".to_owned(),
        Err(e) => format!("unreadable: {e}"),
    }
}

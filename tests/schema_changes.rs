//! Schema changes end to end, against real PostgreSQL and a real broker: ADD, DROP and RENAME
//! COLUMN, ALTER COLUMN TYPE and CREATE TABLE on a master under write traffic reach its
//! replica at their place in the stream; in multi-master, DDL from each node reaches every
//! other node once, without echo, while all of them write.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::broker::Broker;
use common::ferry::{apply_config, capture_config, Ferry};
use common::kafka::TopicReader;
use common::mesh::{join_writers, mesh, spawn_writers, wait_converged, Budget, KV_DDL};
use common::pg::{table_checksum, try_table_checksum, PgCluster};
use common::Rng;
use tokio_postgres::Client;

fn broker() -> &'static Broker {
    static BROKER: OnceLock<Broker> = OnceLock::new();
    BROKER.get_or_init(Broker::start)
}

fn seed() -> u64 {
    std::env::var("DDL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(3)
        })
}

/// Column names and types of a table, in order.
async fn columns(c: &Client, table: &str) -> Vec<(String, String)> {
    c.query(
        "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute
          WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        &[&table],
    )
    .await
    .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    .unwrap_or_default()
}

/// Waits until `c`'s `kv` has `column` of type `ty`.
async fn has(c: &Client, column: &str, ty: &str) {
    common::wait_for(
        &format!("{column} {ty}"),
        Duration::from_secs(60),
        || async {
            columns(c, "kv")
                .await
                .iter()
                .any(|(n, t)| n == column && t == ty)
                .then_some(())
        },
    )
    .await
}

async fn wait_same(m: &Client, r: &Client, table: &str, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let (mc, rc) = (columns(m, table).await, columns(r, table).await);
        let want = table_checksum(m, table).await;
        let got = try_table_checksum(r, table).await;
        if mc == rc && got.as_ref() == Some(&want) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{table} after {timeout:?}: master columns {mc:?}, replica {rc:?}; rows {want:?} vs {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Acceptance 5 (replica): a writer inserts and updates `items` (only `id` and `v`) while the
/// master adds a column with a default, fills it, renames one, changes one's type (and writes
/// values only the new type holds), drops one, creates a table with rows, and adds a column
/// and uses it in one transaction. The replica ends with the master's columns and rows, nothing
/// is dead-lettered, and the table topic carries the schema-change records.
#[tokio::test(flavor = "multi_thread")]
async fn schema_changes_reach_the_replica_under_writes() {
    let pg = PgCluster::shared();
    let seed = seed();
    eprintln!("seed {seed} (DDL_SEED)");
    let ddl = "CREATE TABLE items (id bigint PRIMARY KEY, v int NOT NULL, note text, drop_me text, n int)";
    let (master, m) = pg.fresh_db("ddl", ddl).await;
    let (replica, r) = pg.fresh_db("ddl_r", ddl).await;
    m.batch_execute(
        "INSERT INTO items SELECT g, 0, 'n' || g, 'x', g FROM generate_series(1, 1000) g",
    )
    .await
    .unwrap();
    let port = common::free_port();
    let capture = Ferry::start(
        &capture_config("node-a", pg.port, &master, &broker().address(), port, ""),
        port,
    );
    let port = common::free_port();
    let applier = Ferry::start(
        &apply_config(
            "node-a",
            &master,
            &[pg.url(&replica)],
            &broker().address(),
            port,
            "",
        ),
        port,
    );
    capture.wait_ready().await;
    wait_same(&m, &r, "items", Duration::from_secs(60)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, master) = (stop.clone(), master.clone());
        tokio::spawn(async move {
            let c = PgCluster::shared().client(&master).await;
            let mut rng = Rng::new(seed);
            let mut next = 100_000i64;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let sql = if rng.chance(0.3) {
                    next += 1;
                    format!("INSERT INTO items (id, v) VALUES ({next}, 1)")
                } else {
                    format!(
                        "UPDATE items SET v = v + 1 WHERE id = {}",
                        rng.range(1, 1000)
                    )
                };
                c.batch_execute(&sql).await.unwrap();
                n += 1;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            n
        })
    };
    let steps = [
        "ALTER TABLE items ADD COLUMN extra text DEFAULT 'd'",
        "UPDATE items SET extra = 'x' || id WHERE id % 10 = 0",
        "ALTER TABLE items RENAME COLUMN note TO remark",
        "ALTER TABLE items ALTER COLUMN n TYPE bigint",
        "UPDATE items SET n = 5000000000 + id WHERE id % 7 = 0",
        "ALTER TABLE items DROP COLUMN drop_me",
        "CREATE TABLE fresh (id int PRIMARY KEY, label text NOT NULL);
         INSERT INTO fresh SELECT g, 'f' || g FROM generate_series(1, 500) g",
        "BEGIN; ALTER TABLE items ADD COLUMN late int; UPDATE items SET late = 1 WHERE id < 50; COMMIT",
        "UPDATE fresh SET label = label || '!' WHERE id % 3 = 0",
    ];
    for step in steps {
        m.batch_execute(step).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writer.await.unwrap();
    assert!(
        writes > 50,
        "the writer must run during the changes ({writes})"
    );
    wait_same(&m, &r, "items", Duration::from_secs(60)).await;
    wait_same(&m, &r, "fresh", Duration::from_secs(60)).await;
    assert_eq!(
        columns(&r, "items")
            .await
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>(),
        ["id", "v", "remark", "n", "extra", "late"]
    );
    assert_eq!(
        applier.metric("pgferry_schema_changes_applied_total", "outcome=\"failed\""),
        None,
        "no schema change may fail on the replica"
    );
    assert!(
        applier
            .metric(
                "pgferry_schema_changes_applied_total",
                "outcome=\"applied\""
            )
            .unwrap_or(0.0)
            >= 6.0
    );

    // The table topic carries the schema changes, in order with the rows.
    let topic = format!("{master}.public.items");
    let records = TopicReader::new(&broker().address()).read_until(
        std::slice::from_ref(&topic),
        Duration::from_secs(60),
        |recs| {
            recs.iter()
                .filter(|r| {
                    r.value
                        .as_ref()
                        .is_some_and(|v| v.get("schema_change").is_some())
                })
                .count()
                >= 5
        },
    );
    let ops: Vec<String> = records
        .iter()
        .filter_map(|r| r.value.as_ref()?.get("schema_change"))
        .flat_map(|s| s["ops"].as_array().cloned().unwrap_or_default())
        .map(|op| op["op"].as_str().unwrap_or("?").to_owned())
        .collect();
    assert_eq!(
        ops,
        [
            "add_column",
            "rename_column",
            "alter_column_type",
            "drop_column",
            "add_column"
        ]
    );
    drop(capture);
}

/// Acceptance 5 (multi-master): three nodes write random rows of `kv` while node 0 adds a
/// column, node 1 changes its type and node 2 renames it (changes written under the old name
/// still arrive from the other nodes), then node 2 fills it with values only the new type
/// holds. Every node ends with the same columns and rows, each node applied exactly the other
/// nodes' changes (two each) and published only its own (no echo).
#[tokio::test(flavor = "multi_thread")]
async fn schema_changes_reach_every_multi_master_node_once() {
    let seed = seed();
    eprintln!("seed {seed} (DDL_SEED)");
    let clusters = [
        PgCluster::shared_of_three(0),
        PgCluster::shared_of_three(1),
        PgCluster::shared_of_three(2),
    ];
    let nodes = mesh("mmddl", &clusters, KV_DDL, "", &broker().address()).await;
    let writers = spawn_writers(
        &nodes,
        seed,
        Budget::Until(std::time::Instant::now() + Duration::from_secs(8)),
        50,
    );
    let clients = [
        nodes[0].client().await,
        nodes[1].client().await,
        nodes[2].client().await,
    ];
    // Each change waits until it has reached the node that makes the next one.
    clients[0]
        .batch_execute("ALTER TABLE kv ADD COLUMN extra int")
        .await
        .unwrap();
    has(&clients[1], "extra", "integer").await;
    clients[1]
        .batch_execute("ALTER TABLE kv ALTER COLUMN extra TYPE bigint")
        .await
        .unwrap();
    has(&clients[2], "extra", "bigint").await;
    // The third change by the table's owner, a role with no rights in schema pgferry: the
    // node's event triggers (schema-change capture, new-table protection) run as their owner,
    // so they neither refuse its DDL nor miss it.
    clients[2]
        .batch_execute(
            "DO $$ BEGIN CREATE ROLE kv_owner; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
             ALTER TABLE kv OWNER TO kv_owner;
             SET ROLE kv_owner; ALTER TABLE kv RENAME COLUMN extra TO extra2; RESET ROLE",
        )
        .await
        .expect("DDL by the table's owner");
    let writes = join_writers(writers).await;
    wait_converged(&nodes, &writes, Duration::from_secs(120)).await;
    // Values only the changed type holds, written under the new name, reach every node.
    clients[2]
        .batch_execute("UPDATE kv SET extra2 = k * 10000000000 WHERE k < 20")
        .await
        .unwrap();
    let mut seen: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for (node, c) in nodes.iter().zip(&clients) {
        has(c, "extra2", "bigint").await;
        seen.insert(node.name.clone(), columns(c, "kv").await);
    }
    let first = seen.values().next().cloned().unwrap();
    assert!(
        seen.values().all(|c| *c == first),
        "columns differ: {seen:?}"
    );
    // The filled values converged too.
    let mut sums = Vec::new();
    for c in &clients {
        let sum = common::wait_for("extra2 filled", Duration::from_secs(60), || async {
            let s: Option<i64> = c
                .query_one("SELECT sum(extra2)::int8 FROM kv", &[])
                .await
                .ok()
                .and_then(|r| r.get(0));
            s.filter(|s| *s > 0)
        })
        .await;
        sums.push(sum);
    }
    assert!(
        sums.iter().all(|s| *s == sums[0]),
        "extra2 differs across nodes: {sums:?}"
    );
    for node in &nodes {
        assert_eq!(
            node.metric("pgferry_schema_changes_total", ""),
            1.0,
            "{} must publish only its own schema change",
            node.name
        );
        common::wait_for(
            &format!("{} to apply the others' changes", node.name),
            Duration::from_secs(30),
            || async {
                (node.metric(
                    "pgferry_schema_changes_applied_total",
                    "outcome=\"applied\"",
                ) == 2.0)
                    .then_some(())
            },
        )
        .await;
        assert_eq!(
            node.metric("pgferry_schema_changes_applied_total", "outcome=\"failed\""),
            0.0
        );
    }
}

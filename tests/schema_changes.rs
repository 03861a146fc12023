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
use common::ferry::Ferry;
use common::kafka::TopicReader;
use common::mesh::{join_writers, mesh, spawn_writers, wait_converged, Budget, Committed, KV_DDL};
use common::pg::{try_table_checksum, PgCluster};
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

/// Column names and their defaults (as `pg_get_expr` prints them) of a table, in order.
async fn defaults(c: &Client, table: &str) -> Vec<(String, Option<String>)> {
    c.query(
        "SELECT a.attname::text, pg_get_expr(d.adbin, d.adrelid)
           FROM pg_attribute a
           LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
          WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
          ORDER BY a.attnum",
        &[&table],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
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

/// A table's primary-key columns, in key order (empty without one).
async fn primary_key(c: &Client, table: &str) -> Vec<String> {
    c.query(
        "SELECT a.attname::text FROM pg_index i,
                unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord), pg_attribute a
          WHERE i.indrelid = $1::text::regclass AND i.indisprimary
            AND a.attrelid = i.indrelid AND a.attnum = k.attnum ORDER BY k.ord",
        &[&table],
    )
    .await
    .map(|rows| rows.iter().map(|r| r.get(0)).collect())
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

/// Polls `read` (what the master and the replica show) until both agree, or fails after
/// `timeout` with both.
async fn wait_agree<T, F, Fut>(what: &str, timeout: Duration, mut read: F)
where
    T: PartialEq + std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = (T, T)>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let (master, replica) = read().await;
        if master == replica {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} after {timeout:?}: master {master:?}, replica {replica:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Waits until the replica's `table` has the master's columns, primary key and rows.
async fn wait_same(m: &Client, r: &Client, table: &str, timeout: Duration) {
    assert!(
        try_table_checksum(m, table).await.is_some(),
        "the master has no {table}"
    );
    wait_agree(
        &format!("{table} columns, key and rows"),
        timeout,
        || async {
            let side = |c| async move {
                (
                    columns(c, table).await,
                    primary_key(c, table).await,
                    try_table_checksum(c, table).await,
                )
            };
            (side(m).await, side(r).await)
        },
    )
    .await
}

/// A master and its replica, both made from `ddl`, the master filled by `rows`, with capture
/// and an applier running and the replica's `table` caught up.
struct Pipeline {
    master: String,
    replica: String,
    m: Client,
    r: Client,
    capture: Ferry,
    applier: Ferry,
}

async fn replica_pipeline(label: &str, ddl: &str, rows: &str, table: &str) -> Pipeline {
    let pg = PgCluster::shared();
    let (master, m) = pg.fresh_db(label, ddl).await;
    let (replica, r) = pg.fresh_db(&format!("{label}_r"), ddl).await;
    m.batch_execute(rows).await.unwrap();
    let capture = Ferry::capture(pg, &master, &broker().address(), "");
    let applier = Ferry::applier(&master, &[pg.url(&replica)], &broker().address(), "");
    capture.wait_ready().await;
    wait_same(&m, &r, table, Duration::from_secs(60)).await;
    Pipeline {
        master,
        replica,
        m,
        r,
        capture,
        applier,
    }
}

/// Waits (up to 60 s) until `table` has the same checksum on every node.
async fn wait_same_everywhere(clients: &[tokio_postgres::Client], table: &str) {
    common::wait_for(
        &format!("every node's {table} to be equal"),
        Duration::from_secs(60),
        || async {
            let mut sums = Vec::new();
            for c in clients {
                sums.push(try_table_checksum(c, table).await?);
            }
            sums.iter().all(|s| *s == sums[0]).then_some(())
        },
    )
    .await;
}

/// DDL capture records, for each column an ALTER TABLE adds, the value the table's existing
/// rows got (`pgferry.added_columns`, what multi-master writes into a column a remote row
/// lacks; multi-master nodes, each a source, record the changes they apply too). The oracle is
/// the rows themselves: wherever a column has a record, every row that predates it holds the
/// recorded value, through a later SET DEFAULT, DROP DEFAULT and RENAME; a volatile DEFAULT
/// (each row its own value) has none; a table created again under the same name starts
/// without. Random types, defaults and order, three seeds.
#[tokio::test(flavor = "multi_thread")]
async fn added_columns_record_what_existing_rows_got() {
    for seed in [1u64, 2, 3] {
        let mut rng = Rng::new(seed);
        let Pipeline {
            m,
            r,
            capture,
            applier,
            ..
        } = replica_pipeline(
            &format!("ddladded{seed}"),
            "CREATE TABLE items (id bigint PRIMARY KEY, v int NOT NULL)",
            "INSERT INTO items SELECT g, g FROM generate_series(1, 20) g",
            "items",
        )
        .await;
        // (type, DEFAULT clause or "", volatile)
        let kinds = [
            ("int", " DEFAULT 7", false),
            ("bigint", "", false),
            ("text", " DEFAULT 'x y, \"z\"'", false),
            ("numeric", " DEFAULT 1.50", false),
            ("boolean", " DEFAULT true", false),
            ("int[]", " DEFAULT '{1,2}'", false),
            ("timestamptz", " DEFAULT now()", false),
            ("double precision", " DEFAULT random()", true),
            ("text", " DEFAULT md5(random()::text)", true),
        ];
        let mut added = Vec::new();
        for i in 0..rng.range(3, 7) {
            let (ty, default, volatile) = kinds[rng.range(0, kinds.len() as i64) as usize];
            let name = format!("a{i}");
            let mut sql = format!("ALTER TABLE items ADD COLUMN {name} {ty}{default}");
            // Rows written after the ADD hold their own values: the record is about those
            // before it.
            sql.push_str(&format!(
                "; INSERT INTO items (id, v) VALUES ({}, 0)",
                1000 + i
            ));
            match rng.range(0, 4) {
                0 => sql.push_str(&format!(
                    "; ALTER TABLE items ALTER COLUMN {name} DROP DEFAULT"
                )),
                1 if ty == "int" => sql.push_str(&format!(
                    "; ALTER TABLE items ALTER COLUMN {name} SET DEFAULT 9"
                )),
                _ => {}
            }
            let name = if rng.chance(0.4) {
                sql.push_str(&format!("; ALTER TABLE items RENAME COLUMN {name} TO r{i}"));
                format!("r{i}")
            } else {
                name
            };
            m.batch_execute(&sql).await.unwrap();
            added.push((name, volatile));
        }
        m.execute("INSERT INTO items (id, v) VALUES (5000, 1)", &[])
            .await
            .unwrap();
        common::wait_for(
            "the last row on the replica",
            Duration::from_secs(60),
            || async {
                let n: i64 = r
                    .query_one("SELECT count(*) FROM items WHERE id = 5000", &[])
                    .await
                    .ok()?
                    .get(0);
                (n == 1).then_some(())
            },
        )
        .await;
        let mut recorded_columns = 0;
        for (name, volatile) in &added {
            let row = m
                .query_opt(
                    "SELECT ac.value FROM pgferry.added_columns ac
                       JOIN pg_attribute a ON a.attrelid = ac.relid AND a.attnum = ac.attnum
                      WHERE ac.relid = 'items'::regclass AND a.attname = $1",
                    &[name],
                )
                .await
                .unwrap();
            let Some(row) = row else {
                assert!(*volatile, "seed {seed}: {name} has no record");
                continue;
            };
            assert!(!volatile, "seed {seed}: volatile {name} has a record");
            let recorded: Option<String> = row.get(0);
            // Every row from before the column (ids 1..20) holds the recorded value.
            let q = format!(
                "SELECT count(*) FROM items
                  WHERE id <= 20 AND {name}::text IS DISTINCT FROM $1::text"
            );
            let differing: i64 = m.query_one(&q, &[&recorded]).await.unwrap().get(0);
            assert_eq!(
                differing, 0,
                "seed {seed}: rows of {name} differ from its record {recorded:?}"
            );
            recorded_columns += 1;
        }
        assert!(
            recorded_columns > 0,
            "seed {seed}: no column with a record to check"
        );
        // A table dropped and created again (a new oid, maybe a reused one) starts without.
        m.batch_execute(
            "DROP TABLE items; CREATE TABLE items (id bigint PRIMARY KEY, v int NOT NULL)",
        )
        .await
        .unwrap();
        let left: i64 = m
            .query_one(
                "SELECT count(*) FROM pgferry.added_columns WHERE relid = 'items'::regclass",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(left, 0, "seed {seed}: a new table has no added columns");
        drop((capture, applier));
    }
}

/// `SET pgferry.capture_ddl = off` keeps a session's schema changes on the source (made on
/// each database by hand instead, as with PGD's `bdr.ddl_replication = off`); the next
/// captured change carries only itself (the trigger's shadow followed the local one). A
/// change made by hand on the replica before the source makes it is recognized as already
/// there and skipped; nothing is refused or dead-lettered, and the rows, values of the local
/// column included, arrive.
#[tokio::test(flavor = "multi_thread")]
async fn local_and_hand_made_schema_changes() {
    let Pipeline {
        m,
        r,
        capture,
        applier,
        ..
    } = replica_pipeline(
        "ddllocal",
        "CREATE TABLE items (id bigint PRIMARY KEY, v int NOT NULL)",
        "INSERT INTO items SELECT g, g FROM generate_series(1, 100) g",
        "items",
    )
    .await;
    // Made on each database, kept local on the source.
    let mine = "ALTER TABLE items ADD COLUMN mine text DEFAULT 'm'";
    m.batch_execute(&format!(
        "SET pgferry.capture_ddl = off; {mine}; RESET pgferry.capture_ddl"
    ))
    .await
    .unwrap();
    r.batch_execute(mine).await.unwrap();
    // Made by hand on the replica first, then on the source (captured).
    r.batch_execute("ALTER TABLE items ADD COLUMN shared int")
        .await
        .unwrap();
    m.batch_execute(
        "ALTER TABLE items ADD COLUMN shared int;
         UPDATE items SET mine = 'x' || id, shared = id WHERE id % 2 = 0",
    )
    .await
    .unwrap();
    // Made on the source only.
    m.batch_execute(
        "ALTER TABLE items ADD COLUMN later bigint; UPDATE items SET later = id * 10000000000",
    )
    .await
    .unwrap();
    wait_same(&m, &r, "items", Duration::from_secs(60)).await;
    assert_eq!(
        capture.metric("pgferry_schema_changes_total", ""),
        Some(2.0),
        "only the captured changes are published"
    );
    let outcome = |o: &str| {
        applier
            .metric(
                "pgferry_schema_changes_applied_total",
                &format!("outcome=\"{o}\""),
            )
            .unwrap_or(0.0)
    };
    assert_eq!(
        (outcome("applied"), outcome("already"), outcome("failed")),
        (1.0, 1.0, 0.0),
        "`later` applied, `shared` found already made, nothing refused"
    );
    assert_eq!(
        applier
            .metric("pgferry_apply_dead_letters_total", "")
            .unwrap_or(0.0),
        0.0
    );
}

/// A random write of one row of `table` (`k int PRIMARY KEY, v int, note text`) with a key
/// below `keys`: a delete, an insert of a missing key, or (mostly) an update.
fn row_write(rng: &mut Rng, table: &str, keys: i64) -> String {
    let k = rng.range(1, keys);
    match rng.range(0, 10) {
        0 => format!("DELETE FROM {table} WHERE k = {k}"),
        1 => format!("INSERT INTO {table} (k, v) VALUES ({k}, 0) ON CONFLICT (k) DO NOTHING"),
        _ => format!("UPDATE {table} SET v = v + 1, note = 'w' WHERE k = {k}"),
    }
}

/// The reasons of a target's dead letters, oldest first.
async fn letters(c: &Client) -> Vec<String> {
    c.query("SELECT error FROM pgferry.dead_letters ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Unresolved dead letters of a target.
async fn unresolved_letters(c: &Client) -> i64 {
    c.query_one(
        "SELECT count(*) FROM pgferry.dead_letters WHERE resolved_at IS NULL",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Runs the statements `next` makes (from a random source seeded with `seed`) against `db`,
/// one every 3 ms, until `stop`; returns how many ran.
fn spawn_writer(
    db: String,
    seed: u64,
    stop: Arc<AtomicBool>,
    mut next: impl FnMut(&mut Rng) -> String + Send + 'static,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let c = PgCluster::shared().client(&db).await;
        let mut rng = Rng::new(seed);
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            c.batch_execute(&next(&mut rng)).await.unwrap();
            n += 1;
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        n
    })
}

/// Acceptance 5 (replica): a writer inserts and updates `items` (only `id` and `v`) while the
/// master adds a column with a default, fills it, renames one, changes one's type (and writes
/// values only the new type holds), drops one, creates a table with rows, adds a column
/// and uses it in one transaction, moves the new table to another schema and writes to it
/// there, and gives a table without a key one, then another. The replica ends with the
/// master's columns, keys and rows, nothing
/// is dead-lettered, and the table topic carries the schema-change records.
#[tokio::test(flavor = "multi_thread")]
async fn schema_changes_reach_the_replica_under_writes() {
    let pg = PgCluster::shared();
    let seed = seed();
    eprintln!("seed {seed} (DDL_SEED)");
    // The target needs a schema a table moves to (schemas are not replicated).
    let ddl = "CREATE TABLE items (id bigint PRIMARY KEY, v int NOT NULL, note text, drop_me text, n int);
               CREATE SCHEMA archive";
    let (master, m) = pg.fresh_db("ddl", ddl).await;
    let (replica, r) = pg.fresh_db("ddl_r", ddl).await;
    m.batch_execute(
        "INSERT INTO items SELECT g, 0, 'n' || g, 'x', g FROM generate_series(1, 1000) g",
    )
    .await
    .unwrap();
    let capture = Ferry::capture(pg, &master, &broker().address(), "");
    let applier = Ferry::applier(&master, &[pg.url(&replica)], &broker().address(), "");
    capture.wait_ready().await;
    wait_same(&m, &r, "items", Duration::from_secs(60)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(master.clone(), seed, stop.clone(), {
        let mut next = 100_000i64;
        move |rng| {
            if rng.chance(0.3) {
                next += 1;
                format!("INSERT INTO items (id, v) VALUES ({next}, 1)")
            } else {
                format!(
                    "UPDATE items SET v = v + 1 WHERE id = {}",
                    rng.range(1, 1000)
                )
            }
        }
    });
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
        "ALTER TABLE fresh SET SCHEMA archive",
        // A table without a key gets one (what pgferry's warning about it asks for), then
        // another one.
        "CREATE TABLE loose (id int NOT NULL, v text NOT NULL);
         INSERT INTO loose SELECT g, 'a' FROM generate_series(1, 100) g",
        "ALTER TABLE loose ADD PRIMARY KEY (id)",
        "UPDATE loose SET v = 'b' WHERE id % 2 = 0; INSERT INTO loose VALUES (101, 'c')",
        "ALTER TABLE loose DROP CONSTRAINT loose_pkey, ADD CONSTRAINT loose_key PRIMARY KEY (id, v)",
        "UPDATE loose SET v = 'z' WHERE id % 3 = 0; DELETE FROM loose WHERE id % 7 = 0",
        "UPDATE archive.fresh SET label = label || '?' WHERE id % 5 = 0",
    ];
    for step in steps {
        run_step(&m, step).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writer.await.unwrap();
    assert!(
        writes > 50,
        "the writer must run during the changes ({writes})"
    );
    wait_same(&m, &r, "items", Duration::from_secs(60)).await;
    wait_same(&m, &r, "archive.fresh", Duration::from_secs(60)).await;
    wait_same(&m, &r, "loose", Duration::from_secs(60)).await;
    assert_eq!(primary_key(&r, "loose").await, ["id", "v"]);
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
    // A renamed table's old topic says where it went, under the old name (before, only the
    // new name's topic had the record, already under the new name).
    run_step(&m, "ALTER TABLE items RENAME TO goods").await;
    let renamed = TopicReader::new(&broker().address()).read_until(
        std::slice::from_ref(&topic),
        Duration::from_secs(60),
        |recs| {
            recs.iter().any(|r| {
                r.value.as_ref().is_some_and(|v| {
                    v["schema_change"]["ops"][0]["op"] == "rename_table"
                        && v["schema_change"]["ops"][0]["to"] == "goods"
                        && v["source"]["table"] == "items"
                })
            })
        },
    );
    assert!(!renamed.is_empty());
    drop(capture);
}

/// Acceptance 5 (multi-master): three nodes write random rows of `kv` while node 0 adds a
/// column, node 1 changes its type and node 2 renames it (changes written under the old name
/// still arrive from the other nodes), then node 2 fills it with values only the new type
/// holds; node 0 then sets a DEFAULT and node 1 adds a generated column, which every node
/// computes itself. Every node ends with the same columns and rows, each node applied exactly
/// the other nodes' changes and published only its own (no echo).
#[tokio::test(flavor = "multi_thread")]
async fn schema_changes_reach_every_multi_master_node_once() {
    let seed = seed();
    eprintln!("seed {seed} (DDL_SEED)");
    let (nodes, clients) = three_nodes("mmddl", KV_DDL).await;
    let writers = spawn_writers(
        &nodes,
        seed,
        Budget::Until(std::time::Instant::now() + Duration::from_secs(8)),
        50,
    );
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
    // The filled values reach every node (as the node that wrote them has them; with apply
    // lanes, parts of one source transaction may become visible a moment apart).
    async fn sum(c: &Client) -> Option<i64> {
        c.query_one("SELECT sum(extra2)::int8 FROM kv", &[])
            .await
            .ok()
            .and_then(|r| r.get(0))
    }
    let written = sum(&clients[2]).await.filter(|s| *s > 0);
    assert!(written.is_some(), "node 2 filled extra2");
    for (node, c) in nodes.iter().zip(&clients) {
        common::wait_for(
            &format!("{}'s extra2 to sum to {written:?}", node.name),
            Duration::from_secs(60),
            || async { (sum(c).await == written).then_some(()) },
        )
        .await;
    }
    // A DEFAULT set on one node is every node's DEFAULT.
    run_step(
        &clients[0],
        "ALTER TABLE kv ALTER COLUMN extra2 SET DEFAULT 7",
    )
    .await;
    let want = defaults(&clients[0], "kv").await;
    assert!(
        want.contains(&("extra2".to_owned(), Some("7".to_owned()))),
        "{want:?}"
    );
    for (node, c) in nodes.iter().zip(&clients) {
        common::wait_for(
            &format!("{}'s defaults to be {want:?}", node.name),
            Duration::from_secs(60),
            || async { (defaults(c, "kv").await == want).then_some(()) },
        )
        .await;
    }
    // A generated column added on one node is a generated column on every node, each
    // computing its values (the stream does not carry them), also for rows written after.
    run_step(
        &clients[1],
        "ALTER TABLE kv ADD COLUMN twice bigint GENERATED ALWAYS AS (v::bigint * 2 + k) STORED",
    )
    .await;
    let want = generation(&clients[1], "kv").await;
    assert!(
        want.iter()
            .any(|(name, kind, _)| name == "twice" && kind == "s"),
        "{want:?}"
    );
    for (node, c) in nodes.iter().zip(&clients) {
        common::wait_for(
            &format!("{}'s generated columns to be {want:?}", node.name),
            Duration::from_secs(60),
            || async { (generation(c, "kv").await == want).then_some(()) },
        )
        .await;
    }
    run_step(&clients[2], "UPDATE kv SET v = v + 3 WHERE k % 5 = 0").await;
    wait_same_everywhere(&clients, "kv").await;
    each_change_applied_once(&nodes, &[2.0, 2.0, 1.0]).await;
}

/// The columns of `kv` with the extra ones of `model` after the test's own.
fn kv_columns(model: &[(String, &'static str)]) -> Vec<(String, String)> {
    [("k", "integer"), ("v", "integer"), ("note", "text")]
        .into_iter()
        .map(|(n, t)| (n.to_owned(), t.to_owned()))
        .chain(model.iter().map(|(n, t)| (n.clone(), (*t).to_owned())))
        .collect()
}

/// One random schema change of `kv`'s extra columns (never the writers' `k`, `v`, `note`),
/// applied to `model`: ADD COLUMN (with a constant default or none), ALTER COLUMN TYPE
/// (integer → bigint → numeric), RENAME COLUMN, DROP COLUMN, SET or DROP DEFAULT (defaults
/// are not in the model: compare them with [`defaults`]; only with `with_defaults`, see
/// [`schema_change_chain`]). With `retired` (names dropped
/// or renamed away so far), a new or renamed column sometimes takes one of those names again.
/// Returns the statement and the column it changed, unless it dropped it.
fn random_schema_change(
    rng: &mut Rng,
    model: &mut Vec<(String, &'static str)>,
    mut retired: Option<&mut Vec<String>>,
    step: usize,
    with_defaults: bool,
) -> (String, Option<usize>) {
    let new_name = match retired.as_deref_mut() {
        Some(names) if !names.is_empty() && rng.chance(0.4) => {
            names.remove(rng.range(0, names.len() as i64) as usize)
        }
        _ => format!("c{step}"),
    };
    let pick = match (model.is_empty(), with_defaults) {
        (true, _) => 0,
        (false, true) => rng.range(0, 5),
        (false, false) => rng.range(0, 4),
    };
    let at = if model.is_empty() {
        0
    } else {
        rng.range(0, model.len() as i64) as usize
    };
    match pick {
        1 if model[at].1 != "numeric" => {
            let wider = if model[at].1 == "integer" {
                "bigint"
            } else {
                "numeric"
            };
            model[at].1 = wider;
            let sql = format!("ALTER TABLE kv ALTER COLUMN {} TYPE {wider}", model[at].0);
            (sql, Some(at))
        }
        2 => {
            let old = std::mem::replace(&mut model[at].0, new_name.clone());
            let sql = format!("ALTER TABLE kv RENAME COLUMN {old} TO {new_name}");
            if let Some(names) = retired {
                names.push(old);
            }
            (sql, Some(at))
        }
        4 => {
            let default = if rng.chance(0.6) {
                format!("SET DEFAULT {step}")
            } else {
                "DROP DEFAULT".to_owned()
            };
            let sql = format!("ALTER TABLE kv ALTER COLUMN {} {default}", model[at].0);
            (sql, Some(at))
        }
        3 if model.len() > 1 => {
            let (old, _) = model.remove(at);
            let sql = format!("ALTER TABLE kv DROP COLUMN {old}");
            if let Some(names) = retired {
                names.push(old);
            }
            (sql, None)
        }
        _ => {
            model.push((new_name.clone(), "integer"));
            let default = if rng.chance(0.5) {
                format!(" DEFAULT {step}")
            } else {
                String::new()
            };
            let sql = format!("ALTER TABLE kv ADD COLUMN {new_name} int{default}");
            (sql, Some(model.len() - 1))
        }
    }
}

/// `UPDATE` of `column` (of type `ty`) with values only that type holds, `step` apart from
/// other fills, in the rows above the writers' keys (`k >= 1000`) whose key is `step` modulo
/// `every`.
fn fill_statement(column: &str, ty: &str, step: usize, every: usize) -> String {
    let factor = if ty == "integer" {
        1000
    } else {
        10_000_000_000i64
    };
    format!(
        "UPDATE kv SET {column} = k * {factor} + {step} WHERE k >= 1000 AND k % {every} = {}",
        step % every
    )
}

/// Three multi-master nodes (the binary's shared clusters) with `ddl`, and a client of each.
async fn three_nodes(label: &str, ddl: &str) -> (Vec<common::mesh::Node>, [Client; 3]) {
    let clusters = [
        PgCluster::shared_of_three(0),
        PgCluster::shared_of_three(1),
        PgCluster::shared_of_three(2),
    ];
    let nodes = mesh(label, &clusters, ddl, "", &broker().address()).await;
    let clients = [
        nodes[0].client().await,
        nodes[1].client().await,
        nodes[2].client().await,
    ];
    (nodes, clients)
}

/// Writes `rows` rows of `kv` on the first node and waits until every node has them.
async fn fill_kv(clients: &[Client], rows: i32) {
    run_step(
        &clients[0],
        &format!("INSERT INTO kv SELECT g, g, 'init' FROM generate_series(1, {rows}) g"),
    )
    .await;
    for c in clients {
        wait_count(
            "the rows on every node",
            c,
            "SELECT count(*) FROM kv",
            rows.into(),
        )
        .await;
    }
}

/// Runs `insert` on `writer` and waits until every node holds `rows` rows of `table`.
async fn write_everywhere(
    clients: &[Client],
    writer: &Client,
    insert: &str,
    table: &str,
    rows: i32,
) {
    run_step(writer, insert).await;
    let count = format!("SELECT count(*) FROM {table}");
    for c in clients {
        wait_count("the rows on every node", c, &count, rows.into()).await;
    }
}

/// One of the two nodes of three other than `of`, at random.
fn another_node(rng: &mut Rng, of: usize) -> usize {
    (of + 1 + rng.range(0, 2) as usize) % 3
}

/// Waits (up to 90 s on each) until `query`'s rows, read by `row`, are `want` on every node.
async fn rows_everywhere<T: PartialEq>(
    nodes: &[common::mesh::Node],
    clients: &[Client],
    what: &str,
    query: &str,
    row: impl Fn(&tokio_postgres::Row) -> T,
    want: &[T],
) {
    for (node, c) in nodes.iter().zip(clients) {
        common::wait_for(
            &format!("{}'s {what}", node.name),
            Duration::from_secs(90),
            || async {
                let rows: Vec<T> = c.query(query, &[]).await.ok()?.iter().map(&row).collect();
                (rows == want).then_some(())
            },
        )
        .await;
    }
}

/// Waits until `query` (a count) gives `want` on `c`.
async fn wait_count(what: &str, c: &Client, query: &str, want: i64) {
    common::wait_for(what, Duration::from_secs(60), || async {
        let n: Option<i64> = c.query_one(query, &[]).await.ok().map(|r| r.get(0));
        (n == Some(want)).then_some(())
    })
    .await;
}

/// Makes the node of `gate` apply the writer's next change late: a row it holds locked (in a
/// transaction on `gate`) is written on `writer` just before, so that node's worker of the
/// writer's stream waits there while other streams, with what depends on the change, go on
/// arriving. [`let_go`] ends it.
async fn hold_back(gate: &Client, writer: &Client) {
    gate.batch_execute("BEGIN; SELECT n FROM gate WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    run_step(writer, "UPDATE gate SET n = n + 1 WHERE id = 1").await;
}

/// Ends [`hold_back`] a second after the change's dependents were written.
async fn let_go(gate: &Client) {
    tokio::time::sleep(Duration::from_secs(1)).await;
    gate.batch_execute("COMMIT").await.unwrap();
}

/// Random chains of schema changes of a table under writes reach a replica exactly: ADD
/// COLUMN (with a constant default or none), ALTER COLUMN TYPE, RENAME and DROP COLUMN, new
/// and renamed columns taking names dropped or renamed away before, each change followed by
/// values only it allows (the new name, the wider type), while a writer inserts, updates and
/// deletes rows. The replica ends with the master's columns and rows, no schema change
/// refused, nothing dead-lettered.
#[tokio::test(flavor = "multi_thread")]
async fn random_schema_changes_reach_the_replica() {
    let seed = seed();
    eprintln!("seed {seed} (DDL_SEED)");
    let mut rng = Rng::new(seed ^ 0x5eed);
    let Pipeline {
        master,
        replica: _,
        m,
        r,
        capture,
        applier,
    } = replica_pipeline(
        "rddl",
        KV_DDL,
        "INSERT INTO kv SELECT g, g, 'n' FROM generate_series(1, 1099) g",
        "kv",
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    // The writer keeps to keys below 1000; the chain's values go to the rows above.
    let writer = spawn_writer(master.clone(), seed, stop.clone(), |rng| {
        row_write(rng, "kv", 1000)
    });
    let mut model: Vec<(String, &'static str)> = Vec::new();
    let mut retired = Vec::new();
    let mut chain = Vec::new();
    for step in 0..12 {
        let (change, changed) =
            random_schema_change(&mut rng, &mut model, Some(&mut retired), step, true);
        run_step(&m, &change).await;
        chain.push(change);
        if let Some((column, ty)) = changed.map(|i| &model[i]).filter(|_| rng.chance(0.7)) {
            let fill = fill_statement(column, ty, step, 3);
            run_step(&m, &fill).await;
            chain.push(fill);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("chain: {chain:#?}");
    stop.store(true, Ordering::Relaxed);
    let writes = writer.await.unwrap();
    assert!(
        writes > 50,
        "the writer must run during the changes ({writes})"
    );
    wait_same(&m, &r, "kv", Duration::from_secs(60)).await;
    assert_eq!(columns(&r, "kv").await, kv_columns(&model));
    assert_eq!(defaults(&r, "kv").await, defaults(&m, "kv").await);
    assert_eq!(
        applier.metric("pgferry_schema_changes_applied_total", "outcome=\"failed\""),
        None,
        "no schema change may fail on the replica"
    );
    assert_eq!(
        applier.metric("pgferry_apply_dead_letters_total", ""),
        Some(0.0),
        "nothing may be dead-lettered"
    );
    drop(capture);
}

/// Random chains of schema changes (ADD, DROP, RENAME, widen, SET and DROP DEFAULT), each made
/// on another node than the one before, as soon as the one before has reached that node (so
/// each may act on it: a column another node added, renamed, widened or defaulted), and then,
/// on the same node, values only the changed column holds, all under writers on every node.
/// The third node learns of each link from two streams in either order. Every node ends with
/// the chain's columns and DEFAULTs and the same rows, nothing dead-lettered, no schema change
/// refused, each change applied once on every other node.
#[tokio::test(flavor = "multi_thread")]
async fn chains_of_schema_changes_across_nodes_converge() {
    schema_change_chain("mmchain", false).await;
}

/// The same while one node is away (its pgferry killed before the first change, its
/// application writing on): the chain runs between the other two, and the returning node
/// catches up on both streams (each waiting for the other where the chain crossed) while its
/// own writes, made under the old columns, reach the others (renamed and dropped columns
/// followed by name; where its write wins, the columns it never had at their DEFAULT on every
/// node).
#[tokio::test(flavor = "multi_thread")]
async fn a_node_away_during_schema_changes_catches_up() {
    schema_change_chain("mmaway", true).await;
}

/// A column one node adds and fills while another node, away, updates some of the same rows
/// knowing nothing of the column: on every node each row ends as its last write made it,
/// whole. Where the away node's write is the later one, the new column holds everywhere the
/// value the ADD gave existing rows (as the away node's own row got it when the column reached
/// it), even where the DEFAULT was changed or dropped after the ADD, and also on nodes whose
/// workers described the table before the column existed; where the fill is later, its row,
/// old note included, wins on the away node too. Random rows, DEFAULT (or none), later
/// DEFAULT change and order of the two writes.
#[tokio::test(flavor = "multi_thread")]
async fn rows_written_without_a_new_column_win_whole() {
    let seed = seed();
    eprintln!("seed {seed} (DDL_SEED)");
    let mut rng = Rng::new(seed);
    let (mut nodes, clients) = three_nodes("mmwhole", KV_DDL).await;
    const ROWS: i32 = 60;
    // (v, note, extra) of each key, as the oracle sees it; `extra` None is its DEFAULT.
    let mut model: BTreeMap<i32, (i32, String, Option<i64>)> = (1..=ROWS)
        .map(|k| (k, (k, "init".to_owned(), None)))
        .collect();
    fill_kv(&clients, ROWS).await;
    // Every node writes a row, so that every worker has described kv before the column exists.
    for (i, c) in clients.iter().enumerate() {
        let k = i as i32 + 1;
        run_step(c, &format!("UPDATE kv SET note = 'n{i}' WHERE k = {k}")).await;
        model.get_mut(&k).unwrap().1 = format!("n{i}");
    }
    for c in &clients {
        let nodes_rows = "SELECT count(*) FROM kv WHERE note LIKE 'n%'";
        wait_count("each node's row everywhere", c, nodes_rows, 3).await;
    }
    let away = rng.range(0, 3) as usize;
    let adder = another_node(&mut rng, away);
    nodes[away].ferry.kill9();
    let default = rng.chance(0.5).then(|| rng.range(1, 100));
    let (fill_mod, away_mod) = (rng.range(0, 3) as i32, rng.range(0, 2) as i32);
    let add = format!(
        "ALTER TABLE kv ADD COLUMN extra bigint{}",
        default.map_or(String::new(), |d| format!(" DEFAULT {d}"))
    );
    let fill = format!("UPDATE kv SET extra = k * 100 WHERE k % 3 = {fill_mod}");
    // The DEFAULT changed after the ADD (before the away node's rows arrive): rows that lack
    // the column still get the value the ADD gave existing rows, as the away node's own did.
    // (Dropping a DEFAULT the column never had changes nothing, and publishes nothing.)
    let later_default = match rng.range(0, 3) {
        0 => String::new(),
        2 if default.is_some() => "; ALTER TABLE kv ALTER COLUMN extra DROP DEFAULT".to_owned(),
        _ => format!(
            "; ALTER TABLE kv ALTER COLUMN extra SET DEFAULT {}",
            rng.range(100, 200)
        ),
    };
    let away_write = format!("UPDATE kv SET note = 'away' WHERE k % 2 = {away_mod}");
    let away_first = rng.chance(0.5);
    eprintln!(
        "{} away, {} adds: {add}; {fill}{later_default}; {} writes first: {away_write}",
        nodes[away].name,
        nodes[adder].name,
        if away_first {
            "the away node"
        } else {
            "the adder"
        }
    );
    // The away node's rows as it wrote them (it knows no `extra`: DEFAULT), and the adder's
    // fill over the rows as the adder had them (it has not seen the away node's write).
    let away_rows: BTreeMap<i32, (i32, String, Option<i64>)> = model
        .iter()
        .filter(|(k, _)| *k % 2 == away_mod)
        .map(|(k, (v, _, _))| (*k, (*v, "away".to_owned(), None)))
        .collect();
    let fill_rows: BTreeMap<i32, (i32, String, Option<i64>)> = model
        .iter()
        .filter(|(k, _)| *k % 3 == fill_mod)
        .map(|(k, (v, note, _))| (*k, (*v, note.clone(), Some(i64::from(*k) * 100))))
        .collect();
    if away_first {
        run_step(&clients[away], &away_write).await;
    }
    run_step(&clients[adder], &format!("{add}; {fill}{later_default}")).await;
    if !away_first {
        run_step(&clients[away], &away_write).await;
    }
    let (first, last) = if away_first {
        (away_rows, fill_rows)
    } else {
        (fill_rows, away_rows)
    };
    model.extend(first);
    model.extend(last);
    nodes[away].ferry.restart();
    nodes[away].ferry.wait_streaming().await;
    let want: Vec<(i32, i32, String, Option<i64>)> = model
        .iter()
        .map(|(k, (v, note, extra))| (*k, *v, note.clone(), extra.or(default)))
        .collect();
    let query = "SELECT k, v, note, extra FROM kv ORDER BY k";
    let row = |r: &tokio_postgres::Row| (r.get(0), r.get(1), r.get(2), r.get(3));
    rows_everywhere(
        &nodes,
        &clients,
        "kv to be each row's last write, whole",
        query,
        row,
        &want,
    )
    .await;
    let mut made = [0.0; 3];
    made[adder] = if later_default.is_empty() { 1.0 } else { 2.0 };
    each_change_applied_once(&nodes, &made).await;
}

/// A key column renamed, the table renamed, the table moved to another schema, or a column
/// renamed and then the table, on one node while another node, away, writes rows under the
/// old names (updates, and inserts of
/// new keys): each row ends, on every node, as its last write made it, under the new names,
/// and nothing is dead-lettered. Before, for a key column: the version store keyed rows by
/// their key columns' names, neither node found the other's version, and an older write won
/// over a newer one on the away node (the nodes stayed apart, with no conflict logged). For
/// a table: the away node's rows were dead letters on the others ("table public.kv does not
/// exist"), and the versions stayed under the old name, so on the away node an older write
/// of the renamer's won over its own newer one. Each rename, random rows, order of the
/// writes, renaming and away node.
#[tokio::test(flavor = "multi_thread")]
async fn renames_while_a_node_is_away_keep_rows_and_versions() {
    let seed = seed();
    eprintln!("seed {seed} (DDL_SEED)");
    let mut rng = Rng::new(seed);
    // (label, the rename, the table, key column and note column after it)
    let renames = [
        (
            "mmkeyname",
            "ALTER TABLE kv RENAME COLUMN k TO kid",
            "kv",
            "kid",
            "note",
        ),
        (
            "mmtabname",
            "ALTER TABLE kv RENAME TO kv_renamed",
            "kv_renamed",
            "k",
            "note",
        ),
        (
            "mmtabmove",
            "ALTER TABLE kv SET SCHEMA elsewhere",
            "elsewhere.kv",
            "k",
            "note",
        ),
        // A column renamed, then its table: the column's history follows the table.
        (
            "mmboth",
            "ALTER TABLE kv RENAME COLUMN note TO memo; ALTER TABLE kv RENAME TO kv_renamed",
            "kv_renamed",
            "k",
            "memo",
        ),
    ];
    for (label, rename, table, key, note) in renames {
        let ddl = format!("CREATE SCHEMA elsewhere; {KV_DDL}");
        let (mut nodes, clients) = three_nodes(label, &ddl).await;
        const ROWS: i32 = 40;
        fill_kv(&clients, ROWS).await;
        let away = rng.range(0, 3) as usize;
        let renamer = another_node(&mut rng, away);
        nodes[away].ferry.kill9();
        let mut model: BTreeMap<i32, String> = (1..=ROWS).map(|k| (k, "init".to_owned())).collect();
        let renamer_rows: Vec<i32> = (1..=ROWS).filter(|_| rng.chance(0.6)).collect();
        let away_rows: Vec<i32> = (1..=ROWS + 5).filter(|_| rng.chance(0.6)).collect();
        let list = |rows: &[i32]| {
            let keys: Vec<String> = rows.iter().map(i32::to_string).collect();
            format!("({})", keys.join(", "))
        };
        let renamer_write = format!(
            "UPDATE {table} SET {note} = 'renamer' WHERE {key} IN {}",
            list(&renamer_rows)
        );
        let away_write = format!(
            "UPDATE kv SET note = 'away' WHERE k IN {rows};
             INSERT INTO kv SELECT g, g, 'away' FROM unnest('{{{keys}}}'::int[]) AS g
              WHERE g > {ROWS}",
            rows = list(&away_rows),
            keys = away_rows
                .iter()
                .map(i32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        );
        let away_first = rng.chance(0.5);
        eprintln!(
            "{rename}: {} away, {} renames; {} writes first",
            nodes[away].name,
            nodes[renamer].name,
            if away_first {
                "the away node"
            } else {
                "the renamer"
            }
        );
        run_step(&clients[renamer], rename).await;
        let (first, last) = if away_first {
            (
                (away, &away_write, &away_rows, "away"),
                (renamer, &renamer_write, &renamer_rows, "renamer"),
            )
        } else {
            (
                (renamer, &renamer_write, &renamer_rows, "renamer"),
                (away, &away_write, &away_rows, "away"),
            )
        };
        for (i, (node, write, rows, note)) in [first, last].into_iter().enumerate() {
            if i == 1 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            run_step(&clients[node], write).await;
            for k in rows {
                model.insert(*k, note.to_owned());
            }
        }
        nodes[away].ferry.restart();
        nodes[away].ferry.wait_streaming().await;
        let want: Vec<(i32, String)> = model.into_iter().collect();
        let query = format!("SELECT {key}, {note} FROM {table} ORDER BY {key}");
        let row = |r: &tokio_postgres::Row| (r.get(0), r.get(1));
        let what = format!("{table} to hold each row's last write");
        rows_everywhere(&nodes, &clients, &what, &query, row, &want).await;
        for c in &clients {
            assert_eq!(unresolved_letters(c).await, 0, "{:?}", letters(c).await);
        }
    }
}

/// Multi-master: columns retyped by a local `ALTER` on one node, after its workers had
/// prepared their statements for the table, and rows another node writes afterwards: every
/// node ends with each value exactly as written. Before, the retyping node's worker of the
/// writer's stream went on casting values to the old types (its statements' check compared
/// only the number of columns): `12.5` became `12.500` there (`numeric(12,3)` now `text`), a
/// 15-character text was cut to 10 (`varchar(10)`), `007` became `7` (`integer`), and that
/// node diverged in silence. Random values, writer and retyping node.
#[tokio::test(flavor = "multi_thread")]
async fn a_local_type_change_reaches_the_nodes_own_statements() {
    let seed = seed();
    eprintln!("seed {seed} (DDL_SEED)");
    let mut rng = Rng::new(seed);
    let ddl = "CREATE TABLE t (k int PRIMARY KEY, a numeric(12,3), b varchar(10), c int)";
    let (nodes, clients) = three_nodes("mmlocalretype", ddl).await;
    const ROWS: i32 = 20;
    let writer = rng.range(0, 3) as usize;
    let retyper = another_node(&mut rng, writer);
    eprintln!(
        "{} writes, {} retypes",
        nodes[writer].name, nodes[retyper].name
    );
    // Every worker of the writer's stream prepares its statements for t.
    let insert = format!("INSERT INTO t SELECT g, g, g::text, g FROM generate_series(1, {ROWS}) g");
    write_everywhere(&clients, &clients[writer], &insert, "t", ROWS).await;
    run_step(
        &clients[retyper],
        "ALTER TABLE t ALTER COLUMN a TYPE text, ALTER COLUMN b TYPE text, ALTER COLUMN c TYPE text",
    )
    .await;
    let retyped = "SELECT count(*) FROM information_schema.columns \
                   WHERE table_name = 't' AND data_type = 'text'";
    for c in &clients {
        wait_count("the ALTER on every node", c, retyped, 3).await;
    }
    // key -> (a, b, c) as text, each a value the old type would have changed.
    let mut model: BTreeMap<i32, (String, String, String)> = (1..=ROWS)
        .map(|g| (g, (format!("{g}.000"), g.to_string(), g.to_string())))
        .collect();
    let mut writes = Vec::new();
    for k in 1..=ROWS + 10 {
        if !rng.chance(0.7) {
            continue;
        }
        let a = format!("{}.{}", rng.range(0, 1000), rng.range(1, 10));
        let b: String = (0..rng.range(11, 20))
            .map(|_| char::from(b'a' + rng.range(0, 26) as u8))
            .collect();
        let c = format!(
            "{:0width$}",
            rng.range(0, 100),
            width = rng.range(3, 6) as usize
        );
        writes.push(format!(
            "INSERT INTO t VALUES ({k}, '{a}', '{b}', '{c}') \
             ON CONFLICT (k) DO UPDATE SET a = EXCLUDED.a, b = EXCLUDED.b, c = EXCLUDED.c"
        ));
        model.insert(k, (a, b, c));
    }
    run_step(&clients[writer], &writes.join("; ")).await;
    let want: Vec<(i32, String, String, String)> = model
        .into_iter()
        .map(|(k, (a, b, c))| (k, a, b, c))
        .collect();
    let query = "SELECT k, a, b, c FROM t ORDER BY k";
    let row = |r: &tokio_postgres::Row| (r.get(0), r.get(1), r.get(2), r.get(3));
    let what = "t to hold each value as written";
    rows_everywhere(&nodes, &clients, what, query, row, &want).await;
    for c in &clients {
        assert_eq!(unresolved_letters(c).await, 0, "{:?}", letters(c).await);
    }
}

/// A column's type narrowed on one node (`numeric` to `bigint`, `double precision` to
/// `integer`: the ALTER rounds the rows it finds) while another node, away, writes rows with
/// fractions under the old types: each row ends, on every node, as its last write made it,
/// the away node's values converted as the ALTER converted rows (`427.77` becomes 428, `2.5`
/// becomes 2), and nothing is dead-lettered. Before, the nodes that had the new type refused
/// the away node's values (`invalid input syntax for type bigint: "427.77"`): dead letters,
/// and the table diverged. Random rows, values, order of the writes, retyping and away node,
/// and whether the retyping node also renames or drops another column (the writer's names
/// then no longer all match, and conversion once gave up on the whole change).
#[tokio::test(flavor = "multi_thread")]
async fn rows_written_under_a_narrowed_type_are_converted() {
    let seed = seed();
    eprintln!("seed {seed} (DDL_SEED)");
    let mut rng = Rng::new(seed);
    let ddl = "CREATE TABLE m (k int PRIMARY KEY, amount numeric, ratio float8, note text)";
    let (mut nodes, clients) = three_nodes("mmnarrow", ddl).await;
    const ROWS: i32 = 40;
    let away = rng.range(0, 3) as usize;
    let retyper = another_node(&mut rng, away);
    // The third node writes the first rows: the away node's stream reaches the others only
    // with its rows under the old type (statements prepared for a stream before the ALTER
    // went on casting to the old type, which hid the fault).
    let insert = format!("INSERT INTO m SELECT g, g, g, 'init' FROM generate_series(1, {ROWS}) g");
    write_everywhere(&clients, &clients[3 - away - retyper], &insert, "m", ROWS).await;
    nodes[away].ferry.kill9();
    // key -> (amount, ratio, note) as last written, the away node's as text under the old types.
    let mut model: BTreeMap<i32, (String, String, &str)> = (1..=ROWS)
        .map(|k| (k, (k.to_string(), k.to_string(), "init")))
        .collect();
    let mut away_writes = Vec::new();
    let mut away_rows = Vec::new();
    for k in 1..=ROWS + 10 {
        if !rng.chance(0.6) {
            continue;
        }
        let amount = format!("{}.{:02}", rng.range(0, 100000), rng.range(0, 100));
        let ratio = format!("{}", rng.range(-4000, 4000) as f64 / 8.0);
        away_writes.push(format!(
            "INSERT INTO m VALUES ({k}, {amount}, {ratio}, 'away') \
             ON CONFLICT (k) DO UPDATE SET amount = EXCLUDED.amount, ratio = EXCLUDED.ratio, note = 'away'"
        ));
        away_rows.push((k, (amount, ratio, "away")));
    }
    // And, at random, another column renamed or dropped by the retyper: the away node's values
    // are still under the names it wrote (before, no value of such a change was converted).
    let (other, set_note) = [
        ("", ", note = 'retyper'"),
        (
            "ALTER TABLE m RENAME COLUMN note TO remark",
            ", remark = 'retyper'",
        ),
        ("ALTER TABLE m DROP COLUMN note", ""),
    ][rng.range(0, 3) as usize];
    let mut retyper_writes = Vec::new();
    let mut retyper_rows = Vec::new();
    for k in 1..=ROWS {
        if !rng.chance(0.6) {
            continue;
        }
        let (amount, ratio) = (rng.range(0, 1000), rng.range(-100, 100));
        retyper_writes.push(format!(
            "UPDATE m SET amount = {amount}, ratio = {ratio}{set_note} WHERE k = {k}"
        ));
        retyper_rows.push((k, (amount.to_string(), ratio.to_string(), "retyper")));
    }
    let away_first = rng.chance(0.5);
    eprintln!(
        "{} away, {} retypes; {} writes first",
        nodes[away].name,
        nodes[retyper].name,
        if away_first {
            "the away node"
        } else {
            "the retyper"
        }
    );
    run_step(
        &clients[retyper],
        "ALTER TABLE m ALTER COLUMN amount TYPE bigint, ALTER COLUMN ratio TYPE integer",
    )
    .await;
    if !other.is_empty() {
        eprintln!("and: {other}");
        run_step(&clients[retyper], other).await;
    }
    let (first, last) = if away_first {
        (
            (away, &away_writes, &away_rows),
            (retyper, &retyper_writes, &retyper_rows),
        )
    } else {
        (
            (retyper, &retyper_writes, &retyper_rows),
            (away, &away_writes, &away_rows),
        )
    };
    for (i, (node, writes, rows)) in [first, last].into_iter().enumerate() {
        if i == 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        run_step(&clients[node], &writes.join("; ")).await;
        for (k, row) in rows.iter() {
            model.insert(*k, row.clone());
        }
    }
    nodes[away].ferry.restart();
    nodes[away].ferry.wait_streaming().await;
    // The values the rows must hold: each as the ALTER converts it.
    let mut want = Vec::new();
    for (k, (amount, ratio, note)) in &model {
        let row = clients[retyper]
            .query_one(
                "SELECT $1::text::numeric::bigint, $2::text::float8::int4",
                &[amount, ratio],
            )
            .await
            .unwrap();
        want.push((
            *k,
            row.get::<_, i64>(0),
            row.get::<_, i32>(1),
            if other.contains("DROP") {
                "dropped".to_owned()
            } else {
                note.to_string()
            },
        ));
    }
    let note = if other.contains("RENAME") {
        "remark"
    } else if other.contains("DROP") {
        "'dropped'::text"
    } else {
        "note"
    };
    let query = format!("SELECT k, amount, ratio, {note} FROM m ORDER BY k");
    let query = query.as_str();
    let row = |r: &tokio_postgres::Row| (r.get(0), r.get(1), r.get(2), r.get(3));
    let what = "m to hold each row's last write, converted";
    rows_everywhere(&nodes, &clients, what, query, row, &want).await;
    for c in &clients {
        assert_eq!(unresolved_letters(c).await, 0, "{:?}", letters(c).await);
    }
}

/// Multi-master: a node's worker restarted between two transactions another node wrote under
/// a column's old type still converts the second. The stream describes a table's column types
/// once per capture session (its `relation` record, before the first change), so the second
/// transaction comes without one; a worker that kept the writer's types only in memory forgot
/// them at its restart, and the second transaction's values (`427.77` for a column now
/// `bigint`) were refused: dead letters, the table diverged. The receivers commit each source
/// transaction alone (it ends with a schema change of another table, `u`), and a row lock
/// held on each (an uncommitted
/// row of `o` that the second transaction also writes) stops them between the two, where
/// they are killed. Also: the writer's pgferry restarts beside an open local transaction on a
/// protected table, and neither its startup nor other local writers wait for it (its startup
/// once queued an `ACCESS EXCLUSIVE` lock on the version store behind the transaction, and
/// every local write behind that). Random values and roles.
#[tokio::test(flavor = "multi_thread")]
async fn retyped_rows_still_convert_after_a_worker_restart() {
    let seed = seed();
    eprintln!("seed {seed} (DDL_SEED)");
    let mut rng = Rng::new(seed);
    let ddl = "CREATE TABLE m (k int PRIMARY KEY, amount numeric, note text); \
               CREATE TABLE o (k int PRIMARY KEY, v int); \
               CREATE TABLE u (k int PRIMARY KEY, v int)";
    let clusters = [
        PgCluster::shared_of_three(0),
        PgCluster::shared_of_three(1),
        PgCluster::shared_of_three(2),
    ];
    let mut nodes = mesh("mmretyperestart", &clusters, ddl, "", &broker().address()).await;
    let mut clients = Vec::new();
    for node in &nodes {
        clients.push(node.client().await);
    }
    const ROWS: i32 = 30;
    let away = rng.range(0, 3) as usize;
    let retyper = another_node(&mut rng, away);
    let third = 3 - away - retyper;
    let insert = format!("INSERT INTO m SELECT g, g, 'init' FROM generate_series(1, {ROWS}) g");
    write_everywhere(&clients, &clients[third], &insert, "m", ROWS).await;
    nodes[away].ferry.kill9();
    run_step(
        &clients[retyper],
        "ALTER TABLE m ALTER COLUMN amount TYPE bigint",
    )
    .await;
    let amount_is_bigint = "SELECT count(*) FROM information_schema.columns \
                            WHERE table_name = 'm' AND column_name = 'amount' AND data_type = 'bigint'";
    wait_count(
        "the ALTER on the third node",
        &clients[third],
        amount_is_bigint,
        1,
    )
    .await;
    // key -> amount as last written, as text under the old type.
    let mut model: BTreeMap<i32, (String, &str)> =
        (1..=ROWS).map(|k| (k, (k.to_string(), "init"))).collect();
    let mut writes = [Vec::new(), Vec::new()];
    for k in 1..=ROWS + 10 {
        let which = rng.range(0, 3) as usize;
        if which == 2 {
            continue;
        }
        let amount = format!("{}.{:02}", rng.range(0, 100000), rng.range(1, 100));
        let note = ["first", "second"][which];
        writes[which].push(format!(
            "INSERT INTO m VALUES ({k}, {amount}, '{note}') \
             ON CONFLICT (k) DO UPDATE SET amount = EXCLUDED.amount, note = EXCLUDED.note"
        ));
        model.insert(k, (amount, note));
    }
    let first = i64::try_from(writes[0].len()).unwrap();
    // A schema change: the receivers commit at the end of its source transaction.
    writes[0].push("ALTER TABLE u ADD COLUMN w int".into());
    writes[1].insert(
        rng.range(0, writes[1].len() as i64 + 1) as usize,
        "INSERT INTO o VALUES (1, 2)".into(),
    );
    eprintln!(
        "{} away, {} retypes; {} + {} writes",
        nodes[away].name,
        nodes[retyper].name,
        writes[0].len(),
        writes[1].len()
    );
    run_step(&clients[away], &writes[0].join("; ")).await;
    run_step(&clients[away], &writes[1].join("; ")).await;
    let mut holds = Vec::new();
    for receiver in [retyper, third] {
        let hold = nodes[receiver].client().await;
        hold.batch_execute("BEGIN; INSERT INTO o VALUES (1, 1)")
            .await
            .unwrap();
        holds.push(hold);
    }
    // The writer's pgferry restarts beside an open local transaction on a protected table.
    let held = nodes[away].client().await;
    held.batch_execute("BEGIN; INSERT INTO o VALUES (2, 2)")
        .await
        .unwrap();
    nodes[away].ferry.restart();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writer = nodes[away].client().await;
    writer
        .batch_execute("SET statement_timeout = '30s'; INSERT INTO o VALUES (3, 3)")
        .await
        .expect("a local write while pgferry restarts beside an open transaction");
    nodes[away].ferry.wait_streaming().await;
    held.batch_execute("ROLLBACK").await.unwrap();
    for receiver in [retyper, third] {
        wait_count(
            "the first transaction on the receivers",
            &clients[receiver],
            "SELECT count(*) FROM m WHERE note = 'first'",
            first,
        )
        .await;
        nodes[receiver].ferry.kill9();
        nodes[receiver].ferry.restart();
    }
    // The killed workers' sessions wait on the held rows, and keep their replication origins
    // until they end: release them first.
    for hold in &holds {
        hold.batch_execute("ROLLBACK").await.unwrap();
    }
    for receiver in [retyper, third] {
        nodes[receiver].ferry.wait_streaming().await;
    }
    let mut want = Vec::new();
    for (k, (amount, note)) in &model {
        let row = clients[retyper]
            .query_one("SELECT $1::text::numeric::bigint", &[amount])
            .await
            .unwrap();
        want.push((*k, row.get::<_, i64>(0), note.to_string()));
    }
    let query = "SELECT k, amount, note FROM m ORDER BY k";
    let row = |r: &tokio_postgres::Row| (r.get(0), r.get(1), r.get(2));
    let what = "m to hold each row's last write, converted";
    rows_everywhere(&nodes, &clients, what, query, row, &want).await;
    let query = "SELECT k, v FROM o ORDER BY k";
    let row = |r: &tokio_postgres::Row| (r.get(0), r.get(1));
    rows_everywhere(&nodes, &clients, "o's rows", query, row, &[(1, 2), (3, 3)]).await;
    for c in &clients {
        assert_eq!(unresolved_letters(c).await, 0, "{:?}", letters(c).await);
    }
}

/// A primary key replaced on one node (by columns of the rows' own, `(k, v)`) while another
/// node goes on writing rows of the table: every node ends with the new key and the same rows,
/// and no apply stage stops. Before, the node that changed its key had its statements for the
/// writer's stream prepared with `ON CONFLICT (k)`, which the target refused (42P10, no
/// constraint matches) and the whole stage for that stream stopped, every table with it.
/// Random rows and writes.
#[tokio::test(flavor = "multi_thread")]
async fn a_primary_key_replaced_under_writes_converges() {
    let seed = seed();
    eprintln!("seed {seed} (DDL_SEED)");
    let mut rng = Rng::new(seed);
    let (nodes, clients) = three_nodes("mmpkey", KV_DDL).await;
    const ROWS: i32 = 30;
    fill_kv(&clients, ROWS).await;
    let changer = rng.range(0, 3) as usize;
    let writer = another_node(&mut rng, changer);
    // The changer's worker of the writer's stream prepares its statements for kv.
    run_step(&clients[writer], "UPDATE kv SET note = 'w0' WHERE k = 1").await;
    wait_count(
        "the first write on the changer",
        &clients[changer],
        "SELECT count(*) FROM kv WHERE note = 'w0'",
        1,
    )
    .await;
    run_step(
        &clients[changer],
        "ALTER TABLE kv DROP CONSTRAINT kv_pkey, ADD PRIMARY KEY (k, v)",
    )
    .await;
    let mut next = 1000;
    for step in 0..rng.range(3, 8) {
        let write = if rng.chance(0.5) {
            next += 1;
            format!("INSERT INTO kv VALUES ({next}, {next}, 'new{step}')")
        } else {
            format!(
                "UPDATE kv SET note = 'w{step}' WHERE k % {} = 0",
                rng.range(2, 6)
            )
        };
        run_step(&clients[writer], &write).await;
    }
    async fn read(c: &Client) -> Option<Vec<(i32, i32, String)>> {
        let rows = c
            .query("SELECT k, v, note FROM kv ORDER BY k, v", &[])
            .await
            .ok()?;
        Some(
            rows.iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect(),
        )
    }
    common::wait_for(
        "every node to hold the writer's rows and key",
        Duration::from_secs(90),
        || async {
            let want = (
                read(&clients[writer]).await?,
                primary_key(&clients[writer], "kv").await,
            );
            for c in &clients {
                let have = (read(c).await?, primary_key(c, "kv").await);
                if have != want {
                    return None;
                }
            }
            (want.1 == ["k", "v"]).then_some(())
        },
    )
    .await;
    for node in &nodes {
        let log = node.ferry.log();
        assert!(
            !log.contains("stage stopped"),
            "{} stopped a stage:\n{log}",
            node.name
        );
    }
}

/// Three multi-master nodes with `apply.drop_tables: true`, each database made from
/// `KV_DDL` and `ddl`, and a client of each.
async fn dropping_nodes(label: &str, ddl: &str) -> (Vec<common::mesh::Node>, Vec<Client>) {
    let clusters = [
        PgCluster::shared_of_three(0),
        PgCluster::shared_of_three(1),
        PgCluster::shared_of_three(2),
    ];
    let ddl = format!("{KV_DDL}; {ddl}");
    let nodes = mesh(
        label,
        &clusters,
        &ddl,
        "  drop_tables: true\n",
        &broker().address(),
    )
    .await;
    let mut clients = Vec::new();
    for node in &nodes {
        clients.push(node.client().await);
    }
    (nodes, clients)
}

/// Once `writer`'s next row of `kv` reached every node (after what it wrote before): every
/// node dropped `table`, and nothing was dead-lettered.
async fn dropped_everywhere(clients: &[Client], writer: usize, table: &str) {
    run_step(&clients[writer], "INSERT INTO kv VALUES (1, 1, 'after')").await;
    for c in clients {
        wait_count("the write after the drop", c, "SELECT count(*) FROM kv", 1).await;
        let gone: bool = c
            .query_one("SELECT to_regclass($1) IS NULL", &[&table])
            .await
            .unwrap()
            .get(0);
        assert!(gone, "every node drops {table}");
        assert!(letters(c).await.is_empty(), "{:?}", letters(c).await);
    }
}

/// DROP TABLE on a multi-master node of a table its stream never carried a row of (made
/// before pgferry started, never written since): with `apply.drop_tables: true` every node
/// drops it, nothing is dead-lettered. Before, the peers refused the change as one of a
/// table "this node stream never announced" and reported the table diverged.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_never_written_is_dropped_everywhere() {
    let (_nodes, clients) =
        dropping_nodes("mmidle", "CREATE TABLE idle (id int PRIMARY KEY)").await;
    run_step(&clients[0], "DROP TABLE idle").await;
    dropped_everywhere(&clients, 0, "public.idle").await;
}

/// A table one multi-master node drops (`apply.drop_tables: true`) while another, away,
/// goes on writing rows of it: every node drops the table, and the away node's rows, which
/// reach the others after their drop, are skipped, not dead-lettered (before, each was a dead
/// letter and the table was reported diverged for good, although no node had it any more).
#[tokio::test(flavor = "multi_thread")]
async fn rows_of_a_table_dropped_meanwhile_are_skipped() {
    let (mut nodes, clients) = dropping_nodes(
        "mmdoomed",
        "CREATE TABLE doomed (id int PRIMARY KEY, v text)",
    )
    .await;
    nodes[1].ferry.kill9();
    run_step(
        &clients[1],
        "INSERT INTO doomed SELECT g, 'away' FROM generate_series(1, 20) g",
    )
    .await;
    run_step(&clients[0], "DROP TABLE doomed").await;
    nodes[1].ferry.restart();
    nodes[1].ferry.wait_streaming().await;
    // The away node's next write reaches every node after its rows of doomed.
    dropped_everywhere(&clients, 1, "public.doomed").await;
}

/// An unlogged table (outside every publication: PostgreSQL writes no WAL for it) filled and
/// then made `LOGGED`, the bulk-load pattern: it reaches the replica as a new table, with the
/// rows written while it was unlogged (by the new table's snapshot) and after. Before, the
/// replica never got the table and every later row was a dead letter.
///
/// Then a replicated table made `UNLOGGED` (capture warns), written to (random inserts,
/// updates and deletes), and made `LOGGED` again, before the publication's next poll: once
/// in one transaction, once in separate ones. The replica ends exact, the deleted rows gone,
/// by the re-snapshot `SET LOGGED` requests. Before, the rows written while the table was
/// unlogged were missing on the replica for good, silently.
#[tokio::test(flavor = "multi_thread")]
async fn an_unlogged_table_made_logged_arrives_with_its_rows() {
    let Pipeline {
        m,
        r,
        capture,
        applier,
        ..
    } = replica_pipeline(
        "unlogged",
        KV_DDL,
        "INSERT INTO kv VALUES (1, 1, 'x')",
        "kv",
    )
    .await;
    run_step(
        &m,
        "CREATE UNLOGGED TABLE bulk (id int PRIMARY KEY, v text);
         INSERT INTO bulk SELECT g, md5(g::text) FROM generate_series(1, 3000) g",
    )
    .await;
    // Capture decodes the CREATE while the table is still unlogged (outside the publication).
    run_step(&m, "UPDATE kv SET note = 'marker' WHERE k = 1").await;
    wait_same(&m, &r, "kv", Duration::from_secs(60)).await;
    run_step(&m, "ALTER TABLE bulk SET LOGGED").await;
    run_step(
        &m,
        "INSERT INTO bulk SELECT g, 'after' FROM generate_series(3001, 3100) g;
         UPDATE bulk SET v = 'changed' WHERE id % 10 = 0",
    )
    .await;
    wait_same(&m, &r, "bulk", Duration::from_secs(90)).await;
    assert!(letters(&r).await.is_empty(), "{:?}", letters(&r).await);

    let seed = seed();
    eprintln!("seed {seed} (DDL_SEED)");
    let mut rng = Rng::new(seed);
    run_step(
        &m,
        "INSERT INTO kv SELECT g, g, 'before' FROM generate_series(2, 300) g",
    )
    .await;
    wait_same(&m, &r, "kv", Duration::from_secs(60)).await;
    for in_one_transaction in [true, false] {
        let writes: Vec<String> = (0..120).map(|_| row_write(&mut rng, "kv", 400)).collect();
        if in_one_transaction {
            run_step(
                &m,
                &format!(
                    "BEGIN; ALTER TABLE kv SET UNLOGGED; {}; ALTER TABLE kv SET LOGGED; COMMIT",
                    writes.join("; ")
                ),
            )
            .await;
        } else {
            run_step(&m, "ALTER TABLE kv SET UNLOGGED").await;
            for w in &writes {
                run_step(&m, w).await;
            }
            run_step(&m, "ALTER TABLE kv SET LOGGED").await;
        }
        run_step(&m, "UPDATE kv SET note = 'after' WHERE k % 7 = 0").await;
        wait_same(&m, &r, "kv", Duration::from_secs(90)).await;
    }
    // A SET LOGGED of a table already logged, in the same query string as another change of
    // it: nothing is made logged, and the ADD COLUMN travels as one. (The trigger once took
    // SET LOGGED from the query's text, and reported the ADD as the table's creation.)
    run_step(
        &m,
        "ALTER TABLE kv SET LOGGED; ALTER TABLE kv ADD COLUMN extra int DEFAULT 7",
    )
    .await;
    run_step(&m, "UPDATE kv SET extra = k WHERE k % 5 = 0").await;
    wait_same(&m, &r, "kv", Duration::from_secs(90)).await;
    capture
        .wait_log("the table was made UNLOGGED", Duration::from_secs(10))
        .await;
    assert!(letters(&r).await.is_empty(), "{:?}", letters(&r).await);
    drop((capture, applier));
}

/// The same schema changes made on several multi-master nodes while they were apart (each
/// device running the app's migration offline): each change is applied once on every node,
/// recognized as already made where it was made too, and nothing is refused or
/// dead-lettered. A random migration: per existing column kept, dropped, renamed, widened, or
/// widened and then renamed, new columns with and without a DEFAULT (some renamed after they
/// were added: a node that made the same two steps recognizes the first as made, its column
/// under the later name), filled by the migration too, in random order, one
/// transaction or one per statement; run on a random two or three of the three nodes, all
/// pgferrys down meanwhile and writers on every node. Every node ends with the migration's
/// columns and the same rows; a node that did not run it applied each change exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn the_same_changes_made_on_nodes_apart_apply_once() {
    let seed = seed();
    eprintln!("seed {seed} (DDL_SEED)");
    let mut rng = Rng::new(seed);
    let ddl = format!(
        "{KV_DDL}; ALTER TABLE kv ADD COLUMN c0 int, ADD COLUMN c1 int, ADD COLUMN c2 int, \
         ADD COLUMN c3 int"
    );
    let (mut nodes, clients) = three_nodes("mmsame", &ddl).await;
    run_step(
        &clients[0],
        "INSERT INTO kv (k, v, note, c0, c1, c2, c3)
         SELECT g, g, 'still', g, g, g, g FROM generate_series(1000, 1049) g",
    )
    .await;
    for c in &clients {
        let still = "SELECT count(*) FROM kv WHERE k >= 1000";
        wait_count("the still rows on every node", c, still, 50).await;
    }
    // The migration, and the columns it leaves.
    let mut model: Vec<(String, &'static str)> = Vec::new();
    let (mut steps, mut fills) = (Vec::new(), Vec::new());
    for i in 0..4 {
        let c = format!("c{i}");
        match rng.range(0, 5) {
            0 => model.push((c, "integer")),
            1 => steps.push(format!("ALTER TABLE kv DROP COLUMN {c}")),
            2 => {
                steps.push(format!("ALTER TABLE kv RENAME COLUMN {c} TO r{i}"));
                fills.push(format!("UPDATE kv SET r{i} = k + {i} WHERE k >= 1000"));
                model.push((format!("r{i}"), "integer"));
            }
            3 => {
                steps.push(format!("ALTER TABLE kv ALTER COLUMN {c} TYPE bigint"));
                fills.push(format!(
                    "UPDATE kv SET {c} = k * 10000000000 + {i} WHERE k >= 1000"
                ));
                model.push((c, "bigint"));
            }
            _ => {
                // Two steps on one column: widened, then renamed.
                steps.push(format!(
                    "ALTER TABLE kv ALTER COLUMN {c} TYPE bigint; \
                     ALTER TABLE kv RENAME COLUMN {c} TO w{i}"
                ));
                fills.push(format!(
                    "UPDATE kv SET w{i} = k * 10000000000 + {i} WHERE k >= 1000"
                ));
                model.push((format!("w{i}"), "bigint"));
            }
        }
    }
    for j in 0..rng.range(1, 3) {
        let default = if rng.chance(0.5) {
            format!(" DEFAULT {}", j + 5)
        } else {
            String::new()
        };
        // Sometimes two steps on one new column: added, then renamed.
        let (step, name) = if rng.chance(0.5) {
            (
                format!(
                    "ALTER TABLE kv ADD COLUMN n{j} int{default}; \
                     ALTER TABLE kv RENAME COLUMN n{j} TO m{j}"
                ),
                format!("m{j}"),
            )
        } else {
            (
                format!("ALTER TABLE kv ADD COLUMN n{j} int{default}"),
                format!("n{j}"),
            )
        };
        steps.push(step);
        if rng.chance(0.5) {
            fills.push(format!(
                "UPDATE kv SET {name} = k * 7 + {j} WHERE k >= 1000"
            ));
        }
    }
    for i in (1..steps.len()).rev() {
        steps.swap(i, rng.range(0, i as i64 + 1) as usize);
    }
    // New columns come last, in the order the migration adds them.
    for step in &steps {
        if let Some(rest) = step.strip_prefix("ALTER TABLE kv ADD COLUMN ") {
            let name = rest.split(' ').next().unwrap_or_default();
            let renamed = format!("RENAME COLUMN {name} TO ");
            let name = match step.split_once(&renamed) {
                Some((_, to)) => to.trim(),
                None => name,
            };
            model.push((name.to_owned(), "integer"));
        }
    }
    // Each statement is a schema change.
    let made_by = steps
        .iter()
        .map(|s| s.matches("ALTER TABLE").count())
        .sum::<usize>() as f64;
    steps.extend(fills);
    let mut runners: Vec<usize> = (0..3).filter(|_| rng.chance(0.5)).collect();
    while runners.len() < 2 {
        let n = rng.range(0, 3) as usize;
        if !runners.contains(&n) {
            runners.push(n);
        }
    }
    let one_transaction = rng.chance(0.5);
    eprintln!("migration on nodes {runners:?} (one transaction: {one_transaction}): {steps:#?}");
    for node in nodes.iter_mut() {
        node.ferry.kill9();
    }
    let writers = spawn_writers(
        &nodes,
        seed,
        Budget::Until(std::time::Instant::now() + Duration::from_secs(6)),
        50,
    );
    for &n in &runners {
        tokio::time::sleep(Duration::from_millis(rng.range(0, 1500) as u64)).await;
        if one_transaction {
            run_step(&clients[n], &format!("BEGIN; {}; COMMIT", steps.join("; "))).await;
        } else {
            for step in &steps {
                run_step(&clients[n], step).await;
            }
        }
    }
    let writes = join_writers(writers).await;
    for node in nodes.iter_mut() {
        node.ferry.restart();
    }
    for node in &nodes {
        node.ferry.wait_streaming().await;
    }
    let mut writes = writes;
    writes.extend((1000..1050).map(|key| Committed {
        ts_us: 0,
        node: String::new(),
        key,
        row: Some((key, Some("still".to_owned()))),
    }));
    wait_converged(&nodes, &writes, Duration::from_secs(120)).await;
    let want = kv_columns(&model);
    for (node, c) in nodes.iter().zip(&clients) {
        common::wait_for(
            &format!("{} to have the migration's columns {want:?}", node.name),
            Duration::from_secs(60),
            || async { (columns(c, "kv").await == want).then_some(()) },
        )
        .await;
    }
    wait_same_everywhere(&clients, "kv").await;
    // Each change applied exactly once everywhere: where it was made too, always already
    // there; elsewhere, applied on its first arrival and already there on every other.
    let runs = runners.len() as f64;
    for (i, node) in nodes.iter().enumerate() {
        let ran = runners.contains(&i);
        let published = node.metric("pgferry_schema_changes_total", "");
        assert_eq!(published, if ran { made_by } else { 0.0 }, "{}", node.name);
        let from_others = made_by * (runs - if ran { 1.0 } else { 0.0 });
        let count = |outcome: &str| {
            node.metric(
                "pgferry_schema_changes_applied_total",
                &format!("outcome=\"{outcome}\""),
            )
        };
        common::wait_for(
            &format!("{} to take the others' changes", node.name),
            Duration::from_secs(30),
            || async { (count("applied") + count("already") == from_others).then_some(()) },
        )
        .await;
        assert_eq!(
            count("applied"),
            if ran { 0.0 } else { made_by },
            "{}: each change applied once",
            node.name
        );
        assert_eq!(count("failed"), 0.0, "{}: nothing refused", node.name);
        assert_eq!(
            node.metric("pgferry_apply_dead_letters_total", ""),
            0.0,
            "{}: nothing dead-lettered",
            node.name
        );
    }
}

/// See [`chains_of_schema_changes_across_nodes_converge`]; `away`: one node's pgferry is down
/// during the chain. The chain also sets and drops DEFAULTs: a row written without a column
/// gets on every node the value the ADD COLUMN gave existing rows, not the DEFAULT of the day.
async fn schema_change_chain(label: &str, away: bool) {
    let seed = seed();
    eprintln!("seed {seed} (DDL_SEED)");
    let mut rng = Rng::new(seed);
    let ddl = format!("{KV_DDL}; CREATE TABLE gate (id int PRIMARY KEY, n int NOT NULL)");
    let (mut nodes, clients) = three_nodes(label, &ddl).await;
    // Rows the writers never touch (their keys are below 50), for the chain's own values,
    // which would otherwise be writes the writers' oracle does not know.
    clients[0]
        .batch_execute(
            "INSERT INTO kv SELECT g, g, 'still' FROM generate_series(1000, 1099) g;
             INSERT INTO gate VALUES (1, 0)",
        )
        .await
        .unwrap();
    let mut still: Vec<Committed> = (1000..1100)
        .map(|key| Committed {
            ts_us: 0,
            node: String::new(),
            key,
            row: Some((key, Some("still".to_owned()))),
        })
        .collect();
    for c in &clients {
        let still_and_gate =
            "SELECT count(*) + (SELECT count(*) FROM gate) FROM kv WHERE k >= 1000";
        wait_count("the still rows on every node", c, still_and_gate, 101).await;
    }
    let writers = spawn_writers(
        &nodes,
        seed,
        Budget::Until(std::time::Instant::now() + Duration::from_secs(20)),
        50,
    );
    let away = away.then(|| rng.range(0, 3) as usize);
    if let Some(z) = away {
        nodes[z].ferry.kill9();
        eprintln!("{} is away during the chain", nodes[z].name);
    }
    // The next node to make a change: the other one while a node is away.
    let pick_next = |rng: &mut Rng, at: usize| match away {
        Some(z) => 3 - at - z,
        None => another_node(rng, at),
    };
    let mut model: Vec<(String, &'static str)> = Vec::new();
    let mut made = [0.0f64; 3];
    let mut at = match away {
        Some(z) => another_node(&mut rng, z),
        None => rng.range(0, 3) as usize,
    };
    let mut chain = Vec::new();
    // A connection per node that holds up its worker of one other node's stream (below).
    let gates = [
        nodes[0].client().await,
        nodes[1].client().await,
        nodes[2].client().await,
    ];
    // First link: a table made and filled on one node, changed and filled further on the
    // next (the third held back as below).
    {
        let next = pick_next(&mut rng, at);
        let third = 3 - at - next;
        hold_back(&gates[third], &clients[at]).await;
        run_step(
            &clients[at],
            "CREATE TABLE side (id int PRIMARY KEY, x int NOT NULL);
             INSERT INTO side SELECT g, g FROM generate_series(1, 50) g",
        )
        .await;
        made[at] += 1.0;
        let side_rows = "SELECT count(*) FROM side";
        wait_count(
            "side and its rows on the next node",
            &clients[next],
            side_rows,
            50,
        )
        .await;
        run_step(
            &clients[next],
            "ALTER TABLE side ADD COLUMN y bigint; UPDATE side SET y = id * 10000000000",
        )
        .await;
        made[next] += 1.0;
        let_go(&gates[third]).await;
        chain.push(format!(
            "{} creates and fills side, {} adds side.y and fills it",
            nodes[at].name, nodes[next].name
        ));
        at = next;
    }
    for step in 0..7 {
        let next = pick_next(&mut rng, at);
        let third = 3 - at - next;
        hold_back(&gates[third], &clients[at]).await;
        let (change, changed) = random_schema_change(&mut rng, &mut model, None, step, true);
        let shape = || async {
            (
                columns(&clients[at], "kv").await,
                defaults(&clients[at], "kv").await,
            )
        };
        let before = shape().await;
        run_step(&clients[at], &change).await;
        // Dropping a DEFAULT the column never had changes nothing, and publishes nothing.
        if shape().await != before {
            made[at] += 1.0;
        }
        chain.push(format!("{}: {change}", nodes[at].name));
        let want = (kv_columns(&model), defaults(&clients[at], "kv").await);
        common::wait_for(
            &format!("{chain:?} to reach {}", nodes[next].name),
            Duration::from_secs(60),
            || async {
                let next = &clients[next];
                ((columns(next, "kv").await, defaults(next, "kv").await) == want).then_some(())
            },
        )
        .await;
        // Values that need the change (the widened type, the new name), written where it
        // just arrived.
        if let Some((column, ty)) = changed.map(|i| &model[i]).filter(|_| rng.chance(0.7)) {
            let fill = fill_statement(column, ty, step, 4);
            run_step(&clients[next], &fill).await;
            chain.push(format!("{}: {fill}", nodes[next].name));
        }
        let_go(&gates[third]).await;
        at = next;
    }
    eprintln!("chain: {chain:#?}");
    if let Some(z) = away {
        // The away node's application updates rows the chain filled, knowing none of the
        // chain's columns: the last write of those rows, so its row wins everywhere, columns
        // it never had at their DEFAULT (as its own rows got them when the columns arrived).
        run_step(
            &clients[z],
            "UPDATE kv SET note = 'away' WHERE k >= 1000 AND k % 2 = 0",
        )
        .await;
        for w in still.iter_mut().filter(|w| w.key % 2 == 0) {
            w.ts_us = 1;
            w.node = nodes[z].name.clone();
            w.row = Some((w.key, Some("away".to_owned())));
        }
        nodes[z].ferry.restart();
        nodes[z].ferry.wait_streaming().await;
    }
    let mut writes = join_writers(writers).await;
    writes.extend(still);
    wait_converged(&nodes, &writes, Duration::from_secs(120)).await;
    let want = kv_columns(&model);
    for (node, c) in nodes.iter().zip(&clients) {
        common::wait_for(
            &format!("{} to have the chain's columns {want:?}", node.name),
            Duration::from_secs(60),
            || async { (columns(c, "kv").await == want).then_some(()) },
        )
        .await;
    }
    common::wait_for(
        "the same DEFAULTs on every node",
        Duration::from_secs(60),
        || async {
            let first = defaults(&clients[0], "kv").await;
            for c in &clients[1..] {
                if defaults(c, "kv").await != first {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    // The same rows everywhere, the extra columns included; side whole, with its column.
    for table in ["kv", "side"] {
        wait_same_everywhere(&clients, table).await;
    }
    // Some worker waited for another stream (the held-back third node of the first link at
    // least), and none waits any more.
    let exported = |node: &common::mesh::Node| {
        node.ferry
            .http_get("/metrics")
            .is_some_and(|(_, text)| text.contains("pgferry_apply_waiting_for_node{"))
    };
    assert!(
        nodes.iter().any(exported),
        "no worker waited for another stream: the chain did not test causal order"
    );
    for node in &nodes {
        assert_eq!(node.metric("pgferry_apply_waiting_for_node", ""), 0.0);
    }
    let side: i64 = clients[0]
        .query_one("SELECT count(*) FROM side WHERE y = id * 10000000000", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(side, 50, "side's rows with their y");
    each_change_applied_once(&nodes, &made).await;
}

/// Each node published the schema changes it made (`made[i]` for node `i`), applied every
/// other node's exactly once, refused none, and dead-lettered nothing.
async fn each_change_applied_once(nodes: &[common::mesh::Node], made: &[f64]) {
    let total: f64 = made.iter().sum();
    for (i, node) in nodes.iter().enumerate() {
        assert_eq!(
            node.metric("pgferry_schema_changes_total", ""),
            made[i],
            "{} publishes its own schema changes only",
            node.name
        );
        common::wait_for(
            &format!("{} to apply the others' changes", node.name),
            Duration::from_secs(30),
            || async {
                (node.metric(
                    "pgferry_schema_changes_applied_total",
                    "outcome=\"applied\"",
                ) == total - made[i])
                    .then_some(())
            },
        )
        .await;
        assert_eq!(
            node.metric("pgferry_schema_changes_applied_total", "outcome=\"failed\""),
            0.0,
            "{}: no schema change may be refused",
            node.name
        );
        assert_eq!(
            node.metric("pgferry_apply_dead_letters_total", ""),
            0.0,
            "{}: nothing may be dead-lettered",
            node.name
        );
    }
}

/// Partitions of `table` with their bounds, and partitions of partitions, as `(partition,
/// parent, bound)`.
async fn partitions(c: &Client, table: &str) -> Vec<(String, String, String)> {
    c.query(
        "SELECT t.relid::regclass::text, t.parentrelid::regclass::text,
                pg_get_expr(k.relpartbound, k.oid)
           FROM pg_partition_tree($1::text::regclass) t JOIN pg_class k ON k.oid = t.relid
          WHERE t.parentrelid IS NOT NULL ORDER BY 1",
        &[&table],
    )
    .await
    .map(|rows| {
        rows.iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    })
    .unwrap_or_default()
}

/// Waits until the replica's partitions of `table` are the master's.
async fn same_partitions(m: &Client, r: &Client, table: &str) {
    wait_agree(
        &format!("{table} partitions"),
        Duration::from_secs(60),
        || async { (partitions(m, table).await, partitions(r, table).await) },
    )
    .await
}

/// Schema changes of partitioned tables, for both ways a publication carries them: FOR ALL
/// TABLES as pgferry creates it (rows travel under each partition's name) and with
/// `publish_via_partition_root` (under the partitioned table's). While a writer inserts into
/// every range, updates rows and moves some to another partition, the master adds, renames,
/// retypes and drops a column of the partitioned table (its partitions follow), creates a
/// range partition and a DEFAULT one and writes into them, detaches a partition and attaches
/// it again, and creates a new partitioned table with list partitions and rows. The replica
/// ends with the same partitions (same bounds), columns and rows, and nothing fails or is
/// dead-lettered. (Before, a partition created on the master became a plain table on the
/// replica, so rows of its range went missing from the partitioned table there.)
#[tokio::test(flavor = "multi_thread")]
async fn partitioned_tables_follow_their_schema_changes() {
    let pg = PgCluster::shared();
    let seed = seed();
    eprintln!("seed {seed} (DDL_SEED)");
    let ddl = "CREATE TABLE ev (id bigint NOT NULL, at int NOT NULL, v int NOT NULL, note text,
                                drop_me text, n int, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
               CREATE TABLE ev_1 PARTITION OF ev FOR VALUES FROM (0) TO (100);
               CREATE TABLE ev_2 PARTITION OF ev FOR VALUES FROM (100) TO (200);";
    for via_root in [false, true] {
        let (master, m) = pg.fresh_db("ddlpart", ddl).await;
        let (replica, r) = pg.fresh_db("ddlpart_r", ddl).await;
        m.batch_execute(
            "INSERT INTO ev SELECT g, g % 200, 0, 'n' || g, 'x', g FROM generate_series(1, 1000) g",
        )
        .await
        .unwrap();
        if via_root {
            m.batch_execute(&format!(
                "CREATE PUBLICATION pub_{master} FOR ALL TABLES WITH (publish_via_partition_root = true)"
            ))
            .await
            .unwrap();
        }
        let capture = Ferry::capture(pg, &master, &broker().address(), "");
        let applier = Ferry::applier(&master, &[pg.url(&replica)], &broker().address(), "");
        capture.wait_ready().await;
        wait_same(&m, &r, "ev", Duration::from_secs(60)).await;

        // The writer's range of `at`: [low, high).
        let (low, high) = (
            Arc::new(std::sync::atomic::AtomicI64::new(0)),
            Arc::new(std::sync::atomic::AtomicI64::new(200)),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let writer = spawn_writer(master.clone(), seed, stop.clone(), {
            let (low, high) = (low.clone(), high.clone());
            let mut next = 100_000i64;
            move |rng| {
                let (lo, hi) = (low.load(Ordering::Relaxed), high.load(Ordering::Relaxed));
                let at = rng.range(lo, hi);
                if rng.chance(0.4) {
                    next += 1;
                    format!("INSERT INTO ev (id, at, v) VALUES ({next}, {at}, 1)")
                } else if rng.chance(0.2) {
                    // To another partition: a delete and an insert, or an update of the root.
                    format!(
                        "UPDATE ev SET at = {at} WHERE id = {} AND at >= {lo}",
                        rng.range(1, 1000)
                    )
                } else {
                    format!("UPDATE ev SET v = v + 1 WHERE id = {}", rng.range(1, 1000))
                }
            }
        });
        let pause = || tokio::time::sleep(Duration::from_millis(300));
        for step in [
            "ALTER TABLE ev ADD COLUMN extra text DEFAULT 'd'",
            "UPDATE ev SET extra = 'x' || id WHERE id % 10 = 0",
            "CREATE TABLE ev_3 PARTITION OF ev FOR VALUES FROM (200) TO (300)",
        ] {
            run_step(&m, step).await;
            pause().await;
        }
        high.store(300, Ordering::Relaxed);
        for step in [
            "ALTER TABLE ev RENAME COLUMN note TO remark",
            "ALTER TABLE ev ALTER COLUMN n TYPE bigint",
            "UPDATE ev SET n = 5000000000 + id WHERE id % 7 = 0",
            "ALTER TABLE ev DROP COLUMN drop_me",
            "CREATE TABLE ev_rest PARTITION OF ev DEFAULT",
        ] {
            run_step(&m, step).await;
            pause().await;
        }
        high.store(1000, Ordering::Relaxed);
        pause().await;
        // ev_1 leaves ev (its rows with it) and comes back.
        low.store(100, Ordering::Relaxed);
        pause().await;
        m.batch_execute("ALTER TABLE ev DETACH PARTITION ev_1")
            .await
            .unwrap();
        pause().await;
        m.batch_execute("UPDATE ev_1 SET v = -1 WHERE id % 3 = 0; ALTER TABLE ev ATTACH PARTITION ev_1 FOR VALUES FROM (0) TO (100)")
            .await
            .unwrap();
        low.store(0, Ordering::Relaxed);
        m.batch_execute(
            "CREATE TABLE logs (id int NOT NULL, k text NOT NULL, PRIMARY KEY (id, k))
                 PARTITION BY LIST (k);
             CREATE TABLE logs_a PARTITION OF logs FOR VALUES IN ('a');
             CREATE TABLE logs_bc PARTITION OF logs FOR VALUES IN ('b', 'c');
             INSERT INTO logs SELECT g, (ARRAY['a', 'b', 'c'])[1 + g % 3] FROM generate_series(1, 300) g",
        )
        .await
        .unwrap();
        pause().await;
        stop.store(true, Ordering::Relaxed);
        let writes = writer.await.unwrap();
        assert!(
            writes > 50,
            "the writer must run during the changes ({writes})"
        );
        let mode = if via_root { "via root" } else { "by partition" };
        eprintln!("{mode}: {writes} writes during the changes");
        same_partitions(&m, &r, "ev").await;
        same_partitions(&m, &r, "logs").await;
        wait_same(&m, &r, "ev", Duration::from_secs(60)).await;
        wait_same(&m, &r, "logs", Duration::from_secs(60)).await;
        // Rows in every partition, the ones added on the way included.
        for part in ["ev_1", "ev_3", "ev_rest", "logs_bc"] {
            let count: i64 = r
                .query_one(&format!("SELECT count(*) FROM {part}"), &[])
                .await
                .unwrap()
                .get(0);
            assert!(count > 0, "{mode}: no rows in the replica's {part}");
        }
        assert_eq!(
            applier.metric("pgferry_schema_changes_applied_total", "outcome=\"failed\""),
            None,
            "{mode}: no schema change may fail on the replica"
        );
        assert_eq!(
            applier.metric("pgferry_apply_dead_letters_total", ""),
            Some(0.0),
            "{mode}: nothing may be dead-lettered"
        );
        drop(capture);
    }
}

/// Runs one of a test's own statements on the master beside its writer: an update that meets
/// a row the writer just moved to another partition, or a deadlock with it, is PostgreSQL
/// asking the client to try again (40001, 40P01), as any application would.
async fn run_step(m: &Client, step: &str) {
    for attempt in 1.. {
        match m.batch_execute(step).await {
            Ok(()) => return,
            Err(e)
                if attempt < 10
                    && [
                        tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE,
                        tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED,
                    ]
                    .iter()
                    .any(|c| e.code() == Some(c)) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("{step}: {e}"),
        }
    }
}

/// DROP TABLE on the source (a `FOR ALL TABLES` publication) reaches targets at its place in
/// the stream: a target with `apply.drop_tables: true` drops the table after the rows written
/// before the drop, one with the default keeps the table and every row; the stream goes on
/// after it on both, and nothing is dead-lettered. A table then created under the same name
/// with other columns reaches the dropping target; the keeping one refuses it with the
/// reason, and only that table waits.
#[tokio::test(flavor = "multi_thread")]
async fn dropped_tables_follow_apply_drop_tables() {
    let pg = PgCluster::shared();
    let ddl = "CREATE TABLE after_drop (id int PRIMARY KEY, v int NOT NULL)";
    let (master, m) = pg.fresh_db("dropt", ddl).await;
    let (dropping, d) = pg.fresh_db("dropt_d", ddl).await;
    let (keeping, k) = pg.fresh_db("dropt_k", ddl).await;
    let capture = Ferry::capture(pg, &master, &broker().address(), "");
    let drops = Ferry::applier(
        &master,
        &[pg.url(&dropping)],
        &broker().address(),
        "  drop_tables: true\n",
    );
    let keeps = Ferry::applier(&master, &[pg.url(&keeping)], &broker().address(), "");
    capture.wait_ready().await;
    run_step(
        &m,
        "CREATE TABLE gone (id int PRIMARY KEY, v text NOT NULL);
         INSERT INTO gone SELECT g, 'v' || g FROM generate_series(1, 100) g",
    )
    .await;
    for r in [&d, &k] {
        wait_same(&m, r, "gone", Duration::from_secs(60)).await;
    }
    run_step(&m, "UPDATE gone SET v = 'last' WHERE id < 10").await;
    run_step(&m, "DROP TABLE gone").await;
    run_step(&m, "INSERT INTO after_drop VALUES (1, 1)").await;
    for r in [&d, &k] {
        wait_same(&m, r, "after_drop", Duration::from_secs(60)).await;
    }
    let exists = "SELECT to_regclass('public.gone') IS NOT NULL";
    let on_dropping: bool = d.query_one(exists, &[]).await.unwrap().get(0);
    assert!(!on_dropping, "apply.drop_tables: true drops the table");
    let on_keeping: bool = k.query_one(exists, &[]).await.unwrap().get(0);
    assert!(on_keeping, "by default the target keeps the table");
    let kept: (i64, i64) = k
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE v = 'last') FROM gone",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(
        kept,
        (100, 9),
        "the kept table has every row, the last writes included"
    );
    for applier in [&drops, &keeps] {
        assert_eq!(
            applier.metric("pgferry_schema_changes_applied_total", "outcome=\"failed\""),
            None,
            "no schema change may fail"
        );
        assert_eq!(
            applier.metric("pgferry_apply_dead_letters_total", ""),
            Some(0.0),
            "nothing may be dead-lettered"
        );
    }
    // The name again, for a table of other columns. The target that kept the old table
    // cannot create it: the change is refused with the reason, and only that table waits
    // (before, the CREATE was taken as made, and the new table's first row stopped every
    // table); the other target creates it; the rest flows on both.
    run_step(
        &m,
        "CREATE TABLE gone (id int PRIMARY KEY, label text NOT NULL, at date);
         INSERT INTO gone VALUES (1, 'new', '2026-12-06')",
    )
    .await;
    run_step(&m, "INSERT INTO after_drop VALUES (2, 2)").await;
    wait_same(&m, &d, "gone", Duration::from_secs(60)).await;
    for r in [&d, &k] {
        wait_same(&m, r, "after_drop", Duration::from_secs(60)).await;
    }
    let letters = letters(&k).await;
    assert!(
        letters
            .first()
            .is_some_and(|l| l.contains("exists here without the new table's columns")),
        "{letters:#?}"
    );
    drop(capture);
}

/// Tables and columns dropped by another command's CASCADE reach the replica as drops:
/// `DROP TYPE … CASCADE` and `DROP DOMAIN … CASCADE` drop the columns of those types (the
/// event trigger fired only at DROP TABLE and ALTER TABLE, and targets kept the columns, with
/// stale values), and `DROP SCHEMA … CASCADE` drops its tables, a partitioned one with its
/// partitions, on a target with `apply.drop_tables: true`. Rows written before and after each
/// drop arrive; nothing is dead-lettered. Random rows and drop order, by seed.
#[tokio::test(flavor = "multi_thread")]
async fn drops_by_cascade_reach_the_replica() {
    let pg = PgCluster::shared();
    let seed = seed();
    eprintln!("seed {seed} (DDL_SEED)");
    let mut rng = Rng::new(seed);
    let ddl = "CREATE TYPE mood AS ENUM ('calm', 'busy');
               CREATE DOMAIN positive AS int CHECK (VALUE > 0);
               CREATE TABLE items (id int PRIMARY KEY, m mood, p positive, v int);
               CREATE SCHEMA side;
               CREATE TABLE side.plain (id int PRIMARY KEY, v int);
               CREATE TABLE side.parts (id int, k int, PRIMARY KEY (id, k)) PARTITION BY LIST (k);
               CREATE TABLE side.parts_1 PARTITION OF side.parts FOR VALUES IN (1);
               CREATE TABLE side.parts_2 PARTITION OF side.parts FOR VALUES IN (2);";
    let (master, m) = pg.fresh_db("cascade", ddl).await;
    let (replica, r) = pg.fresh_db("cascade_r", ddl).await;
    let capture = Ferry::capture(pg, &master, &broker().address(), "");
    let applier = Ferry::applier(
        &master,
        &[pg.url(&replica)],
        &broker().address(),
        "  drop_tables: true\n",
    );
    capture.wait_ready().await;
    let rows = rng.range(50, 300);
    let write = |rng: &mut Rng, with_types: (bool, bool)| {
        let id = rng.range(1, rows);
        let m = if with_types.0 {
            format!(", m = '{}'", if rng.chance(0.5) { "calm" } else { "busy" })
        } else {
            String::new()
        };
        let p = if with_types.1 {
            format!(", p = {}", rng.range(1, 100))
        } else {
            String::new()
        };
        format!(
            "UPDATE items SET v = {}{m}{p} WHERE id = {id};",
            rng.range(0, 1000)
        )
    };
    run_step(
        &m,
        &format!(
            "INSERT INTO items SELECT g, (ARRAY['calm', 'busy'])[g % 2 + 1]::mood, g, g
               FROM generate_series(1, {rows}) g;
             INSERT INTO side.plain SELECT g, g FROM generate_series(1, 50) g;
             INSERT INTO side.parts SELECT g, g % 2 + 1 FROM generate_series(1, 50) g;"
        ),
    )
    .await;
    wait_same(&m, &r, "items", Duration::from_secs(60)).await;
    wait_same(&m, &r, "side.plain", Duration::from_secs(60)).await;
    let mut drops = vec!["DROP TYPE mood CASCADE", "DROP DOMAIN positive CASCADE"];
    if rng.chance(0.5) {
        drops.reverse();
    }
    let mut types = (true, true);
    for drop in drops {
        let mut sql = String::from("BEGIN;");
        for _ in 0..rng.range(1, 20) {
            sql.push_str(&write(&mut rng, types));
        }
        if drop.contains("TYPE") {
            types.0 = false;
        } else {
            types.1 = false;
        }
        // The drop in the middle of a transaction, between writes.
        sql.push_str(&format!("{drop};"));
        for _ in 0..rng.range(1, 20) {
            sql.push_str(&write(&mut rng, types));
        }
        run_step(&m, &format!("{sql} COMMIT;")).await;
    }
    run_step(&m, "DROP SCHEMA side CASCADE").await;
    for _ in 0..rng.range(5, 30) {
        run_step(&m, &write(&mut rng, types)).await;
    }
    wait_same(&m, &r, "items", Duration::from_secs(60)).await;
    assert_eq!(
        columns(&r, "items").await,
        vec![
            ("id".to_owned(), "integer".to_owned()),
            ("v".to_owned(), "integer".to_owned())
        ],
        "the replica's items lost both columns"
    );
    let left: i64 = r
        .query_one(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'side' AND c.relkind IN ('r', 'p')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the replica dropped the schema's tables");
    assert_eq!(
        applier.metric("pgferry_apply_dead_letters_total", ""),
        Some(0.0),
        "nothing may be dead-lettered"
    );
    drop(capture);
}

/// A schema change the replica refuses (an ADD COLUMN of a type the replica lacks) parks its
/// table only: the change and every later change of that table are dead-lettered, in order,
/// while the other tables (one with a schema change of its own) keep replicating under the
/// writer. Once the operator creates the type on the replica, `pgferry dead-letters replay`
/// applies the schema change and the parked rows, and the table is exact. Before, the first
/// row carrying the new column stopped every table's changes until someone added it by hand.
/// Random tables, rows, writes and parked table, by seed.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_schema_change_parks_its_table_only() {
    let pg = PgCluster::shared();
    let seed = seed();
    eprintln!("seed {seed} (DDL_SEED)");
    let mut rng = Rng::new(seed ^ 0xbad);
    let tables = rng.range(3, 6) as usize;
    let parked = rng.range(0, tables as i64) as usize;
    let changed = (parked + rng.range(1, tables as i64) as usize) % tables;
    let ddl: String = (0..tables)
        .map(|t| format!("CREATE TABLE t{t} (k int PRIMARY KEY, v int NOT NULL, note text);"))
        .collect();
    let (master, m) = pg.fresh_db("park", &ddl).await;
    let (replica, r) = pg.fresh_db("park_r", &ddl).await;
    for t in 0..tables {
        let rows = rng.range(50, 300);
        m.batch_execute(&format!(
            "INSERT INTO t{t} SELECT g, g, 'n' FROM generate_series(1, {rows}) g"
        ))
        .await
        .unwrap();
    }
    let capture = Ferry::capture(pg, &master, &broker().address(), "");
    let applier = Ferry::applier(&master, &[pg.url(&replica)], &broker().address(), "");
    capture.wait_ready().await;
    for t in 0..tables {
        wait_same(&m, &r, &format!("t{t}"), Duration::from_secs(60)).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(master.clone(), seed, stop.clone(), move |rng| {
        let t = rng.range(0, tables as i64);
        row_write(rng, &format!("t{t}"), 400)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let label = rng.range(0, 1000);
    run_step(
        &m,
        &format!(
            "CREATE TYPE mood AS ENUM ('calm', 'glad', 'm{label}');
             ALTER TABLE t{parked} ADD COLUMN mood mood DEFAULT 'calm'"
        ),
    )
    .await;
    run_step(
        &m,
        &format!(
            "UPDATE t{parked} SET mood = 'm{label}' WHERE k % 3 = {}",
            label % 3
        ),
    )
    .await;
    run_step(
        &m,
        &format!("ALTER TABLE t{changed} ADD COLUMN extra int DEFAULT {label}"),
    )
    .await;
    // The other tables follow while the writer goes on: a row written to each after the
    // refused change (and after rows of the parked table) reaches the replica.
    let others: Vec<usize> = (0..tables).filter(|&t| t != parked).collect();
    for t in &others {
        run_step(
            &m,
            &format!("INSERT INTO t{t} (k, v) VALUES (100000, {label})"),
        )
        .await;
    }
    common::wait_for(
        "the tables beside the parked one to follow the writer",
        Duration::from_secs(60),
        || async {
            for t in &others {
                let sql = format!("SELECT 1 FROM t{t} WHERE k = 100000");
                r.query_opt(&sql, &[]).await.ok()??;
            }
            Some(())
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let writes = writer.await.unwrap();
    assert!(writes > 20, "the writer must run ({writes})");
    for t in &others {
        wait_same(&m, &r, &format!("t{t}"), Duration::from_secs(60)).await;
    }
    let parked_table = format!("t{parked}");
    assert_ne!(
        try_table_checksum(&m, &parked_table).await,
        try_table_checksum(&r, &parked_table).await,
        "the parked table cannot be exact before the replay"
    );
    let letters: i64 = r
        .query_one(
            "SELECT count(*) FROM pgferry.dead_letters WHERE table_name = $1 AND resolved_at IS NULL",
            &[&format!("public.{parked_table}")],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        letters >= 2,
        "the schema change and the rows after it ({letters})"
    );
    let elsewhere: i64 = r
        .query_one(
            "SELECT count(*) FROM pgferry.dead_letters WHERE table_name <> $1",
            &[&format!("public.{parked_table}")],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        elsewhere, 0,
        "only the parked table's changes are dead-lettered"
    );
    let (_, status) =
        common::ferry::cli(&["status", "--config", applier.config_path.to_str().unwrap()]);
    assert!(
        status.contains(&format!(
            "DIVERGED public.{parked_table}: {letters} unresolved dead letter(s)"
        )) && status.contains(&format!(
            "PARKED behind a schema change the target refused ({letters} waiting)"
        )),
        "{status}"
    );
    // The operator's fix. Then either the next change of the table finds it fixed (the worker
    // tries the parked letters again every few seconds), or the operator replays them.
    r.batch_execute(&format!(
        "CREATE TYPE mood AS ENUM ('calm', 'glad', 'm{label}')"
    ))
    .await
    .unwrap();
    if rng.chance(0.5) {
        eprintln!("the worker unparks the table");
        m.batch_execute(&format!(
            "UPDATE {parked_table} SET mood = 'glad' WHERE k = (SELECT min(k) FROM {parked_table})"
        ))
        .await
        .unwrap();
    } else {
        eprintln!("the operator replays");
        let config = applier.config_path.to_str().unwrap();
        let (code, out) =
            common::ferry::cli(&["dead-letters", "replay", "--config", config, "--all"]);
        assert_eq!(code, 0, "{out}");
        assert_eq!(out.lines().count(), letters as usize, "{out}");
    }
    wait_same(&m, &r, &parked_table, Duration::from_secs(60)).await;
    assert_eq!(
        unresolved_letters(&r).await,
        0,
        "every parked letter is replayed"
    );
    // The table follows again.
    m.batch_execute(&format!("DELETE FROM {parked_table} WHERE k % 2 = 0"))
        .await
        .unwrap();
    wait_same(&m, &r, &parked_table, Duration::from_secs(60)).await;
    drop(capture);
}

/// Columns added with a DEFAULT pgferry does not copy, and type changes with `USING`, under a
/// writer, leave the replica's rows equal to the master's: a non-volatile DEFAULT (`now()`,
/// `CURRENT_DATE`, an expression) gave every existing row one value, which the ADD carries
/// (`ddl::Existing::Value`); a volatile one (`gen_random_uuid()`, `clock_timestamp()`, a
/// sequence, an identity) gave each row its own, and capture re-snapshots the table; a `USING`
/// expression too. A `SET DEFAULT` of an expression is dead-lettered without parking the
/// table. A table made by `CREATE TABLE … AS` or `SELECT … INTO` (whose rows come before
/// its creation's schema change) arrives whole, by a snapshot, with nothing dead-lettered,
/// and a later `USING` on it re-snapshots it, also under a name holding a quote and a space.
/// Before, existing rows of such a column stayed NULL on the replica (an identity one was
/// refused), `USING` values differed (also those of a type change a function made, whose
/// `USING` the client's query text does not show), and the rows of a created-as table were
/// dead-lettered.
/// Random migrations and order.
#[tokio::test(flavor = "multi_thread")]
async fn computed_defaults_and_using_keep_the_replica_exact() {
    let seed = seed();
    eprintln!("seed {seed} (DDL_SEED)");
    let mut rng = Rng::new(seed ^ 0xdef);
    let Pipeline {
        master,
        replica: _,
        m,
        r,
        capture,
        applier,
    } = replica_pipeline(
        "cdef",
        KV_DDL,
        "INSERT INTO kv SELECT g, g, 'n' FROM generate_series(1, 400) g",
        "kv",
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(master.clone(), seed, stop.clone(), |rng| {
        row_write(rng, "kv", 500)
    });
    let pool = [
        "ADD COLUMN {c} timestamptz NOT NULL DEFAULT now()",
        "ADD COLUMN {c} date DEFAULT CURRENT_DATE",
        "ADD COLUMN {c} text DEFAULT 'a' || md5('{c}')",
        "ADD COLUMN {c} text[] DEFAULT ARRAY['{c}', 'x']",
        "ADD COLUMN {c} uuid DEFAULT gen_random_uuid()",
        "ADD COLUMN {c} timestamptz DEFAULT clock_timestamp()",
        "ADD COLUMN {c} bigserial",
        "ADD COLUMN {c} int GENERATED BY DEFAULT AS IDENTITY",
        "ALTER COLUMN v TYPE bigint USING v * 7 + {n}",
        "ALTER COLUMN note TYPE text USING note || '{c}'",
        // A type changed to itself (as the one above): no column changes shape, values do.
        "ALTER COLUMN note TYPE text USING upper(note)",
        "ALTER COLUMN note SET DEFAULT md5('{c}')",
    ];
    let mut chain = Vec::new();
    let mut uncopied = 0;
    for step in 0..rng.range(4, 7) {
        let i = rng.range(0, pool.len() as i64) as usize;
        let change = format!(
            "ALTER TABLE kv {}",
            pool[i]
                .replace("{c}", &format!("c{step}"))
                .replace("{n}", &step.to_string())
        );
        uncopied += usize::from(change.contains("SET DEFAULT"));
        run_step(&m, &change).await;
        chain.push(change);
        tokio::time::sleep(Duration::from_millis(rng.range(50, 400) as u64)).await;
    }
    if rng.chance(0.5) {
        // A type change a function makes: the client's query text does not show its USING.
        run_step(
            &m,
            "CREATE FUNCTION migrate_kv() RETURNS void LANGUAGE plpgsql AS $f$
             BEGIN EXECUTE 'ALTER TABLE kv ALTER COLUMN v TYPE numeric USING v * 2 + 1'; END $f$",
        )
        .await;
        run_step(&m, "SELECT migrate_kv()").await;
        chain.push("SELECT migrate_kv()".to_owned());
    }
    let born = rng.chance(0.7);
    // A name holding a quote and a space: capture's own snapshot request must name it as SQL
    // reads it (it was written unquoted, read as another name, and the rows never came).
    let born_name = if rng.chance(0.5) {
        "born"
    } else {
        "\"Born \"\"x\"\"\""
    };
    if born {
        let created = if rng.chance(0.5) {
            format!("CREATE TABLE {born_name} AS SELECT k, v * 3 AS w FROM kv WHERE k % 2 = 0")
        } else {
            format!("SELECT k, v * 3 AS w INTO {born_name} FROM kv WHERE k % 2 = 0")
        };
        run_step(
            &m,
            &format!("{created}; ALTER TABLE {born_name} ADD PRIMARY KEY (k)"),
        )
        .await;
        run_step(
            &m,
            &format!("UPDATE {born_name} SET w = w + 1 WHERE k % 3 = 0"),
        )
        .await;
        chain.push(created);
        if rng.chance(0.5) {
            // Once the replica has the table: its rows then change by the USING alone.
            wait_same(&m, &r, born_name, Duration::from_secs(60)).await;
            let using = format!("ALTER TABLE {born_name} ALTER COLUMN w TYPE bigint USING w * 2");
            run_step(&m, &using).await;
            chain.push(using);
        }
    }
    eprintln!("chain: {chain:#?}");
    stop.store(true, Ordering::Relaxed);
    let writes = writer.await.unwrap();
    assert!(writes > 20, "the writer must run ({writes})");
    wait_same(&m, &r, "kv", Duration::from_secs(90)).await;
    if born {
        wait_same(&m, &r, born_name, Duration::from_secs(60)).await;
    }
    let letters = letters(&r).await;
    assert_eq!(letters.len(), uncopied, "{letters:#?}");
    assert!(
        letters.iter().all(|l| l.starts_with("default not copied")),
        "{letters:#?}"
    );
    assert_eq!(
        applier.metric("pgferry_schema_changes_applied_total", "outcome=\"failed\""),
        None,
        "no schema change may fail on the replica"
    );
    // The table is not parked: a later change still arrives.
    m.batch_execute("UPDATE kv SET note = 'after' WHERE k = (SELECT min(k) FROM kv)")
        .await
        .unwrap();
    wait_same(&m, &r, "kv", Duration::from_secs(60)).await;
    // A rewrite in place, alone: the type changed to itself (before, nothing was published).
    m.batch_execute("ALTER TABLE kv ALTER COLUMN note TYPE text USING note || '!'")
        .await
        .unwrap();
    wait_same(&m, &r, "kv", Duration::from_secs(60)).await;
    drop(capture);
}

/// A type change whose `USING` computes values the plain cast cannot (`'yes'` to `integer`,
/// `'$12.50'` to `numeric`), between random writes: the replica ends exact and its table goes
/// on. The target makes the change with NULL for the values its cast refuses, and the
/// re-snapshot the source makes after a `USING` brings the source's values. Before, the
/// target ran the plain cast, which refused them: the change was dead-lettered, the table
/// parked, and every later change of it waited behind for an operator.
#[tokio::test(flavor = "multi_thread")]
async fn a_using_the_target_cannot_cast_leaves_the_replica_exact() {
    let seed = seed();
    eprintln!("seed {seed} (DDL_SEED)");
    let mut rng = Rng::new(seed ^ 0x05e);
    let Pipeline {
        m,
        r,
        applier,
        capture,
        ..
    } = replica_pipeline(
        "uncast",
        "CREATE TABLE t (k int PRIMARY KEY, flag text, price text)",
        "INSERT INTO t SELECT g, CASE WHEN g % 3 = 0 THEN 'yes' ELSE 'no' END, \
         '$' || g || '.' || lpad((g % 100)::text, 2, '0') FROM generate_series(1, 200) g",
        "t",
    )
    .await;
    let mut flag_int = false;
    let mut price_num = false;
    let mut changes = [
        "ALTER TABLE t ALTER COLUMN flag TYPE integer \
         USING CASE flag WHEN 'yes' THEN 1 WHEN 'no' THEN 0 END",
        "ALTER TABLE t ALTER COLUMN price TYPE numeric USING replace(price, '$', '')::numeric",
    ];
    if rng.chance(0.5) {
        changes.reverse();
    }
    for round in 0..3 {
        let mut writes = Vec::new();
        for _ in 0..rng.range(5, 20) {
            let k = rng.range(1, 260);
            let flag = match (flag_int, rng.chance(0.5)) {
                (true, yes) => i32::from(yes).to_string(),
                (false, yes) => format!("'{}'", if yes { "yes" } else { "no" }),
            };
            let price = if price_num {
                format!("{}.{}", rng.range(0, 1000), rng.range(0, 100))
            } else {
                format!("'${}.{:02}'", rng.range(0, 1000), rng.range(0, 100))
            };
            writes.push(if rng.chance(0.2) {
                format!("DELETE FROM t WHERE k = {k}")
            } else {
                format!(
                    "INSERT INTO t VALUES ({k}, {flag}, {price}) \
                     ON CONFLICT (k) DO UPDATE SET flag = EXCLUDED.flag, price = EXCLUDED.price"
                )
            });
        }
        run_step(&m, &writes.join("; ")).await;
        if let Some(change) = changes.get(round) {
            run_step(&m, change).await;
            flag_int |= change.contains("flag TYPE");
            price_num |= change.contains("price TYPE");
        }
    }
    wait_same(&m, &r, "t", Duration::from_secs(90)).await;
    assert_eq!(unresolved_letters(&r).await, 0, "{:?}", letters(&r).await);
    assert_eq!(
        applier.metric("pgferry_schema_changes_applied_total", "outcome=\"failed\""),
        None,
        "no schema change may fail on the replica"
    );
    // The table is not parked: a later change still arrives.
    m.batch_execute("UPDATE t SET flag = 7 WHERE k = (SELECT min(k) FROM t)")
        .await
        .unwrap();
    wait_same(&m, &r, "t", Duration::from_secs(60)).await;
    drop(capture);
}

/// A pgferry restart beside transactions left open stalls no one, and pgferry starts: a
/// migration left open on the master (its event trigger wrote pgferry's shadow of the table, or
/// its rename history), and an operator's transaction on the replica that read the dead
/// letters. Rows and DDL of another table go on reaching the replica while both stay open.
/// Before, capture's start altered `pgferry.ddl_tables` and `pgferry.ddl_history`, and the
/// applier's `pgferry.dead_letters` (`ADD COLUMN IF NOT EXISTS` locks a table before it
/// looks): each queued an ACCESS EXCLUSIVE lock behind the open transaction, so pgferry did not
/// start, and every other DDL on the master queued behind that lock. Random migration and
/// restarted processes.
#[tokio::test(flavor = "multi_thread")]
async fn restarts_beside_open_transactions_stall_nothing() {
    let seed = seed();
    eprintln!("seed {seed} (DDL_SEED)");
    let mut rng = Rng::new(seed ^ 0x0be);
    let pg = PgCluster::shared();
    let Pipeline {
        master,
        replica,
        m,
        r,
        mut capture,
        mut applier,
    } = replica_pipeline(
        "open_txn",
        "CREATE TABLE t (k int PRIMARY KEY, v text); CREATE TABLE u (k int PRIMARY KEY, v text)",
        "INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 100) g; \
         INSERT INTO u SELECT g, 'u' || g FROM generate_series(1, 100) g",
        "t",
    )
    .await;
    wait_same(&m, &r, "u", Duration::from_secs(60)).await;
    let migrations = [
        "ALTER TABLE t ADD COLUMN extra int DEFAULT 7",
        "ALTER TABLE t RENAME COLUMN v TO w",
        "ALTER TABLE t ALTER COLUMN v TYPE varchar(20)",
        "CREATE TABLE fresh (k int PRIMARY KEY); INSERT INTO fresh VALUES (1)",
    ];
    let migration = migrations[rng.range(0, migrations.len() as i64) as usize];
    eprintln!("open migration: {migration}");
    let open = pg.client(&master).await;
    open.batch_execute(&format!("BEGIN; {migration}"))
        .await
        .unwrap();
    let reader = pg.client(&replica).await;
    reader
        .batch_execute("BEGIN; SELECT count(*) FROM pgferry.dead_letters")
        .await
        .unwrap();
    let (restart_capture, restart_applier) = match rng.range(0, 3) {
        0 => (true, false),
        1 => (false, true),
        _ => (true, true),
    };
    eprintln!("restart capture {restart_capture}, applier {restart_applier}");
    if restart_capture {
        capture.kill9();
        capture.restart();
    }
    if restart_applier {
        applier.kill9();
        applier.restart();
    }
    // Both started (a stalled start never answers /readyz), and the master's DDL and rows
    // of another table pass.
    capture.wait_streaming().await;
    run_step(
        &m,
        "SET statement_timeout = '20s'; ALTER TABLE u ADD COLUMN note text; \
         RESET statement_timeout",
    )
    .await;
    m.batch_execute("INSERT INTO u SELECT g, 'late', 'n' || g FROM generate_series(101, 150) g")
        .await
        .unwrap();
    wait_same(&m, &r, "u", Duration::from_secs(60)).await;
    open.batch_execute("COMMIT").await.unwrap();
    reader.batch_execute("COMMIT").await.unwrap();
    m.batch_execute("UPDATE t SET k = k + 1000 WHERE k <= 10")
        .await
        .unwrap();
    wait_same(&m, &r, "t", Duration::from_secs(60)).await;
    if migration.contains("fresh") {
        wait_same(&m, &r, "fresh", Duration::from_secs(60)).await;
    }
    assert_eq!(unresolved_letters(&r).await, 0, "{:?}", letters(&r).await);
}

/// A schema change that makes capture re-snapshot its table (a volatile DEFAULT, an identity,
/// a `USING`), followed at once by a rename or a move of the table to another schema, in the
/// same transaction or the next: the re-snapshot follows the table to its new name, and the
/// replica ends with the master's values. Before, the request named the table as the change
/// did; the snapshot driver found no such table and dropped it with a warning, and the
/// replica kept NULL (or the old values) in silence. Random change, rename and grouping.
#[tokio::test(flavor = "multi_thread")]
async fn resnapshots_follow_a_table_renamed_after_the_change() {
    let seed = seed();
    eprintln!("seed {seed} (DDL_SEED)");
    let mut rng = Rng::new(seed ^ 0x4e5);
    let Pipeline {
        m,
        r,
        capture,
        applier,
        ..
    } = replica_pipeline(
        "resnap_moved",
        "CREATE SCHEMA elsewhere; \
         CREATE TABLE items (id int PRIMARY KEY, note text)",
        "INSERT INTO items SELECT g, 'Note' || g FROM generate_series(1, 40) g",
        "items",
    )
    .await;
    let changes = [
        "ALTER TABLE items ADD COLUMN r float8 DEFAULT random()",
        "ALTER TABLE items ADD COLUMN u uuid DEFAULT gen_random_uuid()",
        "ALTER TABLE items ADD COLUMN n int GENERATED BY DEFAULT AS IDENTITY",
        "ALTER TABLE items ALTER COLUMN note TYPE text USING lower(note)",
    ];
    let change = changes[rng.range(0, changes.len() as i64) as usize];
    let (rename, now) = if rng.chance(0.5) {
        ("ALTER TABLE items RENAME TO items_moved", "items_moved")
    } else {
        ("ALTER TABLE items SET SCHEMA elsewhere", "elsewhere.items")
    };
    let together = rng.chance(0.5);
    eprintln!("{change}; then {rename}, in one transaction: {together}");
    if together {
        run_step(&m, &format!("BEGIN; {change}; {rename}; COMMIT")).await;
    } else {
        run_step(&m, change).await;
        run_step(&m, rename).await;
    }
    m.batch_execute(&format!("INSERT INTO {now} (id, note) VALUES (41, 'Late')"))
        .await
        .unwrap();
    wait_same(&m, &r, now, Duration::from_secs(90)).await;
    assert_eq!(unresolved_letters(&r).await, 0, "{:?}", letters(&r).await);
    assert!(
        !capture.log().contains("ignoring a snapshot request"),
        "no request may be lost:\n{}",
        capture.log()
    );
    drop(applier);
}

/// A table moved to a schema the replica lacks (`SET SCHEMA`, or a rename into it) parks:
/// the refused change, and every change written under the new name after it, wait in order;
/// once the schema exists on the replica, the move applies, the waiting changes follow, and
/// the replica ends exact with nothing left unresolved. Before, changes under the new name
/// were plain letters (the table did not exist there), never tried again, and lost. Random
/// writes under the new name.
#[tokio::test(flavor = "multi_thread")]
async fn changes_after_a_refused_move_wait_for_it() {
    let seed = seed();
    eprintln!("seed {seed} (DDL_SEED)");
    let mut rng = Rng::new(seed ^ 0x5e7);
    let Pipeline {
        m,
        r,
        capture,
        applier,
        ..
    } = replica_pipeline(
        "moved_away",
        KV_DDL,
        "INSERT INTO kv SELECT g, g, 'v' || g FROM generate_series(1, 30) g",
        "kv",
    )
    .await;
    run_step(&m, "CREATE SCHEMA away; ALTER TABLE kv SET SCHEMA away").await;
    let mut writes = Vec::new();
    for _ in 0..rng.range(3, 12) {
        let k = rng.range(1, 45);
        writes.push(match rng.range(0, 3) {
            0 => format!("DELETE FROM away.kv WHERE k = {k}"),
            _ => format!(
                "INSERT INTO away.kv VALUES ({k}, {}, 'w') \
                 ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v, note = EXCLUDED.note",
                rng.range(0, 1000)
            ),
        });
    }
    // Each row a write changed is a change that waits, after the move (one letter more).
    let mut changed = 0;
    for write in &writes {
        changed += m.execute(write.as_str(), &[]).await.unwrap() as i64;
    }
    common::wait_for(
        "the move and the changes after it to wait",
        Duration::from_secs(60),
        || async { (unresolved_letters(&r).await > changed).then_some(()) },
    )
    .await;
    r.batch_execute("CREATE SCHEMA away").await.unwrap();
    wait_same(&m, &r, "away.kv", Duration::from_secs(60)).await;
    common::wait_for("every letter resolved", Duration::from_secs(30), || async {
        (unresolved_letters(&r).await == 0).then_some(())
    })
    .await;
    drop((capture, applier));
}

/// Updates of a table without a key (`REPLICA IDENTITY FULL`) that capture decodes only after
/// the table got a primary key (capture was down meanwhile), and updates that change no value:
/// each reaches the replica, which finds the row by its whole old image. Before, capture keyed
/// the first by the later key and the replica, keyless at that point of the stream, refused
/// them ("the target table has no primary key"), as it refused every update that changed no
/// value. Random rows and values.
#[tokio::test(flavor = "multi_thread")]
async fn keyless_updates_decoded_after_a_later_key_apply() {
    let seed = seed();
    eprintln!("seed {seed} (DDL_SEED)");
    let mut rng = Rng::new(seed ^ 0x6b1);
    let Pipeline {
        m,
        r,
        mut capture,
        applier,
        ..
    } = replica_pipeline(
        "later_key",
        "CREATE TABLE t (id int PRIMARY KEY, v text)",
        "INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 40) g",
        "t",
    )
    .await;
    run_step(
        &m,
        "ALTER TABLE t DROP CONSTRAINT t_pkey; ALTER TABLE t REPLICA IDENTITY FULL",
    )
    .await;
    m.batch_execute("UPDATE t SET v = v WHERE id <= 5")
        .await
        .unwrap();
    wait_same(&m, &r, "t", Duration::from_secs(60)).await;
    capture.kill9();
    let mut updates = Vec::new();
    for _ in 0..rng.range(3, 10) {
        let id = rng.range(1, 41);
        updates.push(if rng.chance(0.3) {
            format!("UPDATE t SET v = v WHERE id = {id}")
        } else {
            format!(
                "UPDATE t SET v = v || '{}' WHERE id = {id}",
                rng.range(0, 100)
            )
        });
    }
    run_step(&m, &updates.join("; ")).await;
    run_step(&m, "ALTER TABLE t ADD PRIMARY KEY (id)").await;
    capture.restart();
    wait_same(&m, &r, "t", Duration::from_secs(60)).await;
    assert_eq!(unresolved_letters(&r).await, 0, "{:?}", letters(&r).await);
    drop(applier);
}

/// Schema changes that capture decodes only after later ones were made: capture is killed,
/// then tables are created and renamed, moved to another schema, altered and renamed, a
/// partitioned table is created in a transaction of its own and its partitions in later ones
/// (the usual order of a migration), each statement its own transaction, the stories
/// interleaved at random; then capture starts again and decodes them all, when the names
/// they were made under are gone. Every table reaches the replica under its final name with
/// the master's columns and rows, nothing dead-lettered. Before, capture looked tables up by
/// the name in the change and found none: a table created and then renamed, or altered and
/// then renamed, was taken for one outside the publication (the replica never got it, or
/// stopped at rows with the column it never added), and so was a partitioned table without
/// partitions yet. Random names and order.
#[tokio::test(flavor = "multi_thread")]
async fn changes_decoded_after_later_renames_reach_the_replica() {
    let seed = seed();
    eprintln!("seed {seed} (DDL_SEED)");
    let mut rng = Rng::new(seed ^ 0x1a7e);
    let schema = "CREATE SCHEMA side";
    let Pipeline {
        m,
        r,
        mut capture,
        applier,
        ..
    } = replica_pipeline(
        "late",
        &format!("{KV_DDL}; {schema}"),
        "INSERT INTO kv SELECT g, g, 'n' FROM generate_series(1, 50) g",
        "kv",
    )
    .await;
    capture.kill9();
    // Each story: its statements in order, and the table it leaves.
    let n = rng.range(0, 1000);
    let stories: Vec<(Vec<String>, String)> = vec![
        (
            vec![
                format!("CREATE TABLE a{n} (k int PRIMARY KEY, v int)"),
                format!("INSERT INTO a{n} SELECT g, g FROM generate_series(1, 20) g"),
                format!("ALTER TABLE a{n} RENAME TO b{n}"),
                format!("INSERT INTO b{n} VALUES (21, 21)"),
                format!("ALTER TABLE b{n} ADD COLUMN w int DEFAULT 3"),
                format!("UPDATE b{n} SET w = k WHERE k % 2 = 0"),
                format!("ALTER TABLE b{n} RENAME TO c{n}"),
            ],
            format!("c{n}"),
        ),
        (
            vec![
                format!("CREATE TABLE d{n} (k int PRIMARY KEY, v text)"),
                format!("INSERT INTO d{n} VALUES (1, 'one')"),
                format!("ALTER TABLE d{n} SET SCHEMA side"),
                format!("INSERT INTO side.d{n} VALUES (2, 'two')"),
            ],
            format!("side.d{n}"),
        ),
        (
            vec![
                "ALTER TABLE kv ADD COLUMN x int DEFAULT 5".to_owned(),
                "INSERT INTO kv VALUES (1000, 1, 'late', 6)".to_owned(),
                "ALTER TABLE kv RENAME TO kv_renamed".to_owned(),
                "UPDATE kv_renamed SET x = x + k WHERE k % 3 = 0".to_owned(),
            ],
            "kv_renamed".to_owned(),
        ),
        (
            vec![
                format!(
                    "CREATE TABLE p{n} (k int, at date, PRIMARY KEY (k, at)) PARTITION BY RANGE (at)"
                ),
                format!(
                    "CREATE TABLE p{n}_2025 PARTITION OF p{n} FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')"
                ),
                format!("INSERT INTO p{n} VALUES (1, '2025-05-05'), (2, '2025-06-06')"),
                format!(
                    "CREATE TABLE p{n}_2026 PARTITION OF p{n} FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')"
                ),
                format!("INSERT INTO p{n} VALUES (3, '2026-07-07')"),
            ],
            format!("p{n}"),
        ),
    ];
    // Interleaved at random, each story's statements in their order.
    let mut next = vec![0usize; stories.len()];
    let mut ran = Vec::new();
    while let Some(open) = {
        let open: Vec<usize> = (0..stories.len())
            .filter(|&i| next[i] < stories[i].0.len())
            .collect();
        (!open.is_empty()).then_some(open)
    } {
        let i = open[rng.range(0, open.len() as i64) as usize];
        let statement = &stories[i].0[next[i]];
        run_step(&m, statement).await;
        ran.push(statement.clone());
        next[i] += 1;
    }
    eprintln!("ran while capture was down: {ran:#?}");
    capture.restart();
    for (_, table) in &stories {
        wait_same(&m, &r, table, Duration::from_secs(60)).await;
    }
    assert_eq!(unresolved_letters(&r).await, 0);
    assert_eq!(
        applier.metric("pgferry_schema_changes_applied_total", "outcome=\"failed\""),
        None,
        "no schema change may fail on the replica"
    );
}

/// A schema change computes values under the session settings of the session that ran it:
/// a type change from `timestamptz` to `timestamp`, `date` or `time` by the session's time
/// zone, to text by its `DateStyle` and `IntervalStyle` (and a float's by
/// `extra_float_digits`), text to `date` by its field order, and the value an added column's
/// existing rows got (`existing`, written as text) too, a float's with every digit. The replica runs each change under
/// the source session's settings, so it computes the same values. Random settings (time
/// zones east and west of UTC, day-first and month-first date styles), random changes under
/// a writer. Before, the replica computed them under its own session's settings: a
/// `timestamptz` made `timestamp` in a New York session held UTC wall-clock times there.
#[tokio::test(flavor = "multi_thread")]
async fn schema_changes_compute_under_the_sources_session_settings() {
    let seed = seed();
    eprintln!("seed {seed} (DDL_SEED)");
    let mut rng = Rng::new(seed ^ 0x7153);
    let ddl = "CREATE TABLE tz (k int PRIMARY KEY, v int NOT NULL, note text, at timestamptz,
                                at2 timestamptz, at3 timestamptz, span interval, f float8,
                                day text, stamp timestamp)";
    let Pipeline {
        master,
        replica: _,
        m,
        r,
        capture,
        applier,
    } = replica_pipeline(
        "tzs",
        ddl,
        "INSERT INTO tz SELECT g, g, 'n', timestamptz '2026-03-08 01:30:00+00' + g * interval '37 minutes',
                timestamptz '2026-11-01 23:59:00+00' - g * interval '1 hour',
                timestamptz '2026-06-30 22:00:00+00' + g * interval '3 hours',
                g * interval '1 day 2 hours 3.5 seconds', g / 3.0,
                to_char(date '2026-01-01' + g, 'DD/MM/YYYY'),
                timestamp '2026-03-29 00:30:00' + g * interval '20 minutes'
           FROM generate_series(1, 200) g",
        "tz",
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(master.clone(), seed, stop.clone(), |rng| {
        row_write(rng, "tz", 250)
    });
    let zones = [
        "America/New_York",
        "Asia/Kolkata",
        "Pacific/Chatham",
        "Europe/Berlin",
    ];
    let zone = zones[rng.range(0, zones.len() as i64) as usize];
    let date_style = if rng.chance(0.5) {
        "SQL, DMY"
    } else {
        "German, DMY"
    };
    let interval_style = if rng.chance(0.5) {
        "postgres_verbose"
    } else {
        "sql_standard"
    };
    let digits = rng.range(-3, 1);
    // For the change's transaction only: the checksums read in the client's own settings.
    let session = format!(
        "SET LOCAL TimeZone = '{zone}'; SET LOCAL DateStyle = '{date_style}'; \
         SET LOCAL IntervalStyle = '{interval_style}'; SET LOCAL extra_float_digits = {digits}; "
    );
    let mut pool = vec![
        "ALTER TABLE tz ALTER COLUMN at TYPE timestamp",
        "ALTER TABLE tz ALTER COLUMN at2 TYPE date",
        "ALTER TABLE tz ALTER COLUMN at3 TYPE time",
        "ALTER TABLE tz ALTER COLUMN span TYPE text",
        "ALTER TABLE tz ALTER COLUMN f TYPE text",
        "ALTER TABLE tz ALTER COLUMN stamp TYPE timestamptz",
        "ALTER TABLE tz ADD COLUMN born date DEFAULT to_date('2026-12-06', 'YYYY-MM-DD')",
        "ALTER TABLE tz ADD COLUMN seen timestamp DEFAULT timestamptz '2026-07-04 12:00:00+00'",
        "ALTER TABLE tz ADD COLUMN pie float8 DEFAULT pi() / 7",
    ];
    if date_style.ends_with("DMY") {
        // Day-first text the source reads as such.
        pool.push("ALTER TABLE tz ALTER COLUMN day TYPE date USING day::date");
    }
    let mut chain = Vec::new();
    while chain.len() < 4 {
        let i = rng.range(0, pool.len() as i64) as usize;
        let change = pool.swap_remove(i);
        run_step(&m, &format!("{session}{change}")).await;
        chain.push(change);
        tokio::time::sleep(Duration::from_millis(rng.range(50, 300) as u64)).await;
    }
    eprintln!("under {session:?}: {chain:#?}");
    stop.store(true, Ordering::Relaxed);
    let writes = writer.await.unwrap();
    assert!(writes > 20, "the writer must run ({writes})");
    wait_same(&m, &r, "tz", Duration::from_secs(90)).await;
    assert_eq!(unresolved_letters(&r).await, 0);
    assert_eq!(
        applier.metric("pgferry_schema_changes_applied_total", "outcome=\"failed\""),
        None,
        "no schema change may fail on the replica"
    );
    drop(capture);
}

/// A table that inherits from another (`INHERITS`, not a partition) is a table of its own on
/// targets, and a change of its parent's columns, which PostgreSQL makes to it too, reaches
/// it: ADD, RENAME and ALTER TYPE on the parent under writes to both; each table's own rows
/// and the child's columns end as on the source. Before, the trigger reported the parent
/// only, and the child's first row with the new column stopped every table.
#[tokio::test(flavor = "multi_thread")]
async fn tables_inheriting_columns_follow_their_parent() {
    // (Every member bound: one left out would be dropped here, its process stopped.)
    let Pipeline {
        m,
        r,
        capture,
        applier,
        ..
    } = replica_pipeline("inherit", KV_DDL, "INSERT INTO kv VALUES (1, 1, 'a')", "kv").await;
    for step in [
        "CREATE TABLE par (id int PRIMARY KEY, v text); CREATE TABLE kid (extra int, PRIMARY KEY (id)) INHERITS (par)",
        "INSERT INTO kid VALUES (1, 'k', 5); INSERT INTO par VALUES (100, 'p')",
        "ALTER TABLE par ADD COLUMN added text DEFAULT 'p'",
        "INSERT INTO kid VALUES (2, 'k2', 6, 'kid-added'); INSERT INTO par VALUES (101, 'q', 'x')",
        "ALTER TABLE par RENAME COLUMN v TO w",
        "ALTER TABLE par ALTER COLUMN added TYPE varchar(20)",
        "INSERT INTO kid VALUES (3, 'k3', 7, 'y'); UPDATE kid SET w = 'moved' WHERE id = 1",
        "INSERT INTO kv VALUES (2, 2, 'after')",
    ] {
        run_step(&m, step).await;
    }
    wait_same(&m, &r, "kid", Duration::from_secs(60)).await;
    wait_same(&m, &r, "kv", Duration::from_secs(60)).await;
    wait_agree("par's own rows", Duration::from_secs(60), || async {
        (
            try_table_checksum(&m, "ONLY par").await,
            try_table_checksum(&r, "ONLY par").await,
        )
    })
    .await;
    assert_eq!(columns(&r, "par").await, columns(&m, "par").await);
    assert_eq!(unresolved_letters(&r).await, 0);
    drop((capture, applier));
}

/// With a publication that lists tables and a schema (`FOR TABLE t, TABLES IN SCHEMA s`),
/// only its tables' schema changes travel, by oid whatever their later names: a change of a
/// listed table, also after its rename, and a table created in the listed schema reach the
/// replica; an unlisted table's changes do not (its replica keeps its columns and name).
#[tokio::test(flavor = "multi_thread")]
async fn only_the_publications_tables_changes_travel() {
    let pg = PgCluster::shared();
    let ddl =
        "CREATE TABLE t (k int PRIMARY KEY, v int); CREATE TABLE u (k int PRIMARY KEY, v int);
               CREATE SCHEMA s; CREATE TABLE s.w (k int PRIMARY KEY)";
    let (master, m) = pg.fresh_db("listed", ddl).await;
    let (replica, r) = pg.fresh_db("listed_r", ddl).await;
    m.batch_execute(&format!(
        "CREATE PUBLICATION pub_{master} FOR TABLE t, TABLES IN SCHEMA s"
    ))
    .await
    .unwrap();
    let capture = Ferry::capture(pg, &master, &broker().address(), "");
    let applier = Ferry::applier(&master, &[pg.url(&replica)], &broker().address(), "");
    capture.wait_ready().await;
    for step in [
        "ALTER TABLE u ADD COLUMN b int",
        "ALTER TABLE t ADD COLUMN a int DEFAULT 7",
        "CREATE TABLE s.x (k int PRIMARY KEY, y text)",
        "INSERT INTO s.x VALUES (1, 'one')",
        "ALTER TABLE u RENAME TO u2",
        "INSERT INTO t VALUES (1, 1, 1)",
        "ALTER TABLE t RENAME TO t2",
        "INSERT INTO t2 VALUES (2, 2, 2)",
    ] {
        run_step(&m, step).await;
    }
    wait_same(&m, &r, "t2", Duration::from_secs(60)).await;
    wait_same(&m, &r, "s.x", Duration::from_secs(60)).await;
    assert_eq!(
        columns(&r, "u").await,
        [("k", "integer"), ("v", "integer")].map(|(c, t)| (c.to_owned(), t.to_owned())),
        "the unlisted table keeps its columns and name on the replica"
    );
    assert_eq!(unresolved_letters(&r).await, 0);
    assert_eq!(
        capture.metric("pgferry_schema_changes_total", ""),
        Some(3.0),
        "t's two changes and s.x's creation"
    );
    drop(applier);
}

/// Each column's name, kind (`attgenerated`: '' plain, 's' stored, 'v' virtual) and
/// generation expression, in order.
async fn generation(c: &Client, table: &str) -> Vec<(String, String, Option<String>)> {
    c.query(
        "SELECT a.attname::text, a.attgenerated::text,
                CASE WHEN a.attgenerated <> '' THEN pg_get_expr(d.adbin, d.adrelid) END
           FROM pg_attribute a
           LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
          WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
          ORDER BY a.attnum",
        &[&table],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// Generated columns reach the replica as generated columns with the source's expression,
/// and the replica computes their values (pgoutput does not send them): a table created with
/// two, under a writer, then a random chain of ADD COLUMN … GENERATED (literals with quotes
/// and a semicolon, a function with a regconfig, PostgreSQL 18's VIRTUAL), ALTER TYPE of a
/// generated column (no `USING` allowed), SET EXPRESSION (PostgreSQL 17+), DROP EXPRESSION,
/// and a rename of a column the expressions name (which changes how the source prints them,
/// and must not make the replica rewrite its table). The replica ends with the master's
/// columns, kinds, expressions and rows; nothing is dead-lettered or refused. Before, the
/// columns were left out of CREATE and ADD, and the replica lacked them.
#[tokio::test(flavor = "multi_thread")]
async fn generated_columns_are_computed_on_the_replica() {
    let seed = seed();
    eprintln!("seed {seed} (DDL_SEED)");
    let mut rng = Rng::new(seed ^ 0x6e7);
    let Pipeline {
        master,
        replica: _,
        m,
        r,
        capture,
        applier,
    } = replica_pipeline("gen", KV_DDL, "INSERT INTO kv VALUES (1, 1, 'a')", "kv").await;
    let version: i32 = m
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    run_step(
        &m,
        "CREATE TABLE gen (k int PRIMARY KEY, v int NOT NULL, note text,
                           twice bigint GENERATED ALWAYS AS (v * 2 + k) STORED,
                           label text GENERATED ALWAYS AS (upper(note) || '-' || v::text) STORED);
         INSERT INTO gen (k, v, note) SELECT g, g, 'n' || g FROM generate_series(1, 300) g",
    )
    .await;
    wait_same(&m, &r, "gen", Duration::from_secs(60)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(master.clone(), seed, stop.clone(), |rng| {
        row_write(rng, "gen", 400)
    });
    // Which of the two first columns are still generated, for the changes that need one.
    let (mut twice, mut label) = (true, true);
    let mut chain = Vec::new();
    for step in 0..rng.range(4, 8) {
        let c = format!("c{step}");
        let change = match rng.range(0, 8) {
            1 => format!(
                "ADD COLUMN {c} text GENERATED ALWAYS AS (coalesce(note, 'it''s') || ';' || (v * 3)::text) STORED"
            ),
            2 => format!(
                "ADD COLUMN {c} tsvector GENERATED ALWAYS AS (to_tsvector('simple', coalesce(note, ''))) STORED"
            ),
            3 if version >= 180000 => {
                format!("ADD COLUMN {c} bigint GENERATED ALWAYS AS (v::bigint * 1000 + k) VIRTUAL")
            }
            4 if twice => "ALTER COLUMN twice TYPE numeric".to_owned(),
            5 if twice && version >= 170000 => {
                format!("ALTER COLUMN twice SET EXPRESSION AS (v * 3 + {step})")
            }
            6 if label => {
                label = false;
                "ALTER COLUMN label DROP EXPRESSION".to_owned()
            }
            7 => {
                twice = false;
                "ALTER COLUMN twice DROP EXPRESSION IF EXISTS".to_owned()
            }
            // And where the change drawn needs what the table no longer has.
            _ => format!("ADD COLUMN {c} int GENERATED ALWAYS AS (v % 7 + k) STORED"),
        };
        let change = format!("ALTER TABLE gen {change}");
        run_step(&m, &change).await;
        chain.push(change);
        tokio::time::sleep(Duration::from_millis(rng.range(50, 400) as u64)).await;
    }
    eprintln!("chain: {chain:#?}");
    stop.store(true, Ordering::Relaxed);
    let writes = writer.await.unwrap();
    assert!(writes > 20, "the writer must run ({writes})");
    // A rename of the column the expressions name, then rows written under the new name.
    run_step(&m, "ALTER TABLE gen RENAME COLUMN v TO amount").await;
    run_step(&m, "UPDATE gen SET amount = amount + 5 WHERE k % 3 = 0").await;
    wait_same(&m, &r, "gen", Duration::from_secs(90)).await;
    let want = generation(&m, "gen").await;
    assert!(
        want.iter()
            .any(|(_, _, e)| e.as_deref().is_some_and(|e| e.contains("amount"))),
        "the master's expressions follow the rename: {want:?}"
    );
    assert_eq!(generation(&r, "gen").await, want);
    assert_eq!(unresolved_letters(&r).await, 0);
    assert_eq!(
        applier.metric("pgferry_schema_changes_applied_total", "outcome=\"failed\""),
        None,
        "no schema change may fail on the replica"
    );
    drop(capture);
}

/// Multi-master: an ADD COLUMN of a type the other nodes lack (types are not replicated)
/// parks the table on each of them, while the writers go on on every node; once the type is
/// created there (at different moments), each resumes by itself, the parked changes applied
/// in order, and all nodes converge with every letter replayed.
#[tokio::test(flavor = "multi_thread")]
async fn a_type_missing_on_peers_parks_the_table_until_created() {
    let seed = seed();
    eprintln!("seed {seed} (DDL_SEED)");
    let mut rng = Rng::new(seed ^ 0x9a7c);
    let (nodes, clients) = three_nodes("mmpark", KV_DDL).await;
    let writers = spawn_writers(
        &nodes,
        seed,
        Budget::Until(std::time::Instant::now() + Duration::from_secs(10)),
        50,
    );
    let origin = rng.range(0, 3) as usize;
    let label = rng.range(0, 1000);
    let create_type = format!("CREATE TYPE mood AS ENUM ('calm', 'glad', 'm{label}')");
    run_step(
        &clients[origin],
        &format!("{create_type}; ALTER TABLE kv ADD COLUMN mood mood DEFAULT 'calm'"),
    )
    .await;
    run_step(
        &clients[origin],
        &format!(
            "UPDATE kv SET mood = 'm{label}' WHERE k % 3 = {}",
            label % 3
        ),
    )
    .await;
    let peers: Vec<usize> = (0..3).filter(|&i| i != origin).collect();
    for &p in &peers {
        wait_count(
            &format!("{} to park kv", nodes[p].name),
            &clients[p],
            "SELECT count(*) FROM (SELECT 1 FROM pgferry.dead_letters
              WHERE error LIKE 'schema change of public.kv%' AND resolved_at IS NULL LIMIT 1) s",
            1,
        )
        .await;
    }
    for &p in &peers {
        tokio::time::sleep(Duration::from_millis(rng.range(0, 3000) as u64)).await;
        clients[p].batch_execute(&create_type).await.unwrap();
    }
    let writes = join_writers(writers).await;
    wait_converged(&nodes, &writes, Duration::from_secs(120)).await;
    // kv's mood column included.
    wait_same_everywhere(&clients, "kv").await;
    for (node, c) in nodes.iter().zip(&clients) {
        assert_eq!(
            unresolved_letters(c).await,
            0,
            "{}: every parked letter is replayed",
            node.name
        );
        has(c, "mood", "mood").await;
    }
}

/// Schema changes of one column made on two multi-master nodes while they were apart,
/// `first` on the first node and `second` on the second, that would leave the nodes apart if
/// both ran: every node refuses the one it cannot follow (the third takes the first that
/// reaches it and refuses the other), parking the table with a dead letter that says the
/// schemas differ. Returns each node's letter.
async fn each_node_refuses_one(label: &str, ddl: &str, first: &str, second: &str) -> Vec<String> {
    let (mut nodes, clients) = three_nodes(label, ddl).await;
    fill_kv(&clients, 20).await;
    for node in nodes.iter_mut() {
        node.ferry.kill9();
    }
    run_step(&clients[0], first).await;
    run_step(&clients[1], second).await;
    for node in nodes.iter_mut() {
        node.ferry.restart();
    }
    let mut refused = Vec::new();
    for (node, c) in nodes.iter().zip(&clients) {
        refused.push(
            common::wait_for(
                &format!("{} to refuse a change it cannot follow", node.name),
                Duration::from_secs(90),
                || async {
                    letters(c)
                        .await
                        .into_iter()
                        .find(|l| l.contains("the schemas differ"))
                },
            )
            .await,
        );
    }
    refused
}

/// One column given other types on two multi-master nodes while they were apart (`bigint` on
/// one, `text` on the other): no global DDL lock orders them, so each node would run the
/// other's change on top of its own and the nodes would end with different types, with no
/// error. Each change carries the type it replaced: a node whose column has neither that
/// type nor the new one refuses it, naming both.
#[tokio::test(flavor = "multi_thread")]
async fn a_column_retyped_otherwise_on_two_nodes_apart_is_refused() {
    let letters = each_node_refuses_one(
        "mmretype",
        &format!("{KV_DDL}; ALTER TABLE kv ADD COLUMN c int"),
        "ALTER TABLE kv ALTER COLUMN c TYPE bigint",
        "ALTER TABLE kv ALTER COLUMN c TYPE text",
    )
    .await;
    for (letter, other) in letters.iter().zip([
        "from integer to text",
        "from integer to bigint",
        "from integer to",
    ]) {
        assert!(
            letter.contains("column c is") && letter.contains(other),
            "{letter}"
        );
    }
}

/// One column added on two multi-master nodes while they were apart, with the same type and
/// other DEFAULTs (1 on one, 2 on the other): each node's existing rows got its own value, so
/// taking the other's ADD as made (same name, same type) left the nodes' rows apart for good,
/// with no error. A node whose record of what its rows got (`pgferry.added_columns`) differs
/// from what the change's rows got refuses it, naming both values. (The same ADD made on
/// nodes apart is still taken as made: `the_same_changes_made_on_nodes_apart_apply_once`.)
#[tokio::test(flavor = "multi_thread")]
async fn a_column_added_with_other_defaults_on_two_nodes_apart_is_refused() {
    let letters = each_node_refuses_one(
        "mmadddef",
        KV_DDL,
        "ALTER TABLE kv ADD COLUMN d int NOT NULL DEFAULT 1",
        "ALTER TABLE kv ADD COLUMN d int NOT NULL DEFAULT 2",
    )
    .await;
    for (letter, (mine, theirs)) in letters.iter().zip([("1", "2"), ("2", "1"), ("", "")]) {
        assert!(
            letter.contains("column d exists here")
                && letter.contains(&format!("existing rows got {mine}"))
                && letter.contains(&format!("giving them {theirs}")),
            "{letter}"
        );
    }
}

//! Apply end to end: a master with a capturing pgferry, replicas fed by an applying pgferry,
//! real PostgreSQL and a real broker.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::broker::Broker;
use common::ferry::{apply_config, Ferry};
use common::pg::{first_column, pgbench, table_checksum, try_table_checksum, PgCluster};
use tokio_postgres::Client;

fn broker() -> &'static Broker {
    static BROKER: OnceLock<Broker> = OnceLock::new();
    BROKER.get_or_init(Broker::start)
}

const PGBENCH_TABLES: [&str; 4] = [
    "pgbench_accounts",
    "pgbench_branches",
    "pgbench_tellers",
    "pgbench_history",
];

/// A master database with capture running, and `n` empty replica databases with the schema.
struct Topology {
    master: String,
    replicas: Vec<String>,
    capture: Ferry,
}

async fn topology(label: &str, master_ddl: &str, replica_ddl: &str, n: usize) -> Topology {
    topology_with(label, master_ddl, replica_ddl, n, "").await
}

/// [`topology`] with extra lines under the capture's `source:`.
async fn topology_with(
    label: &str,
    master_ddl: &str,
    replica_ddl: &str,
    n: usize,
    extra_source: &str,
) -> Topology {
    let pg = PgCluster::shared();
    let (master, _) = pg.fresh_db(&format!("{label}_m"), master_ddl).await;
    let mut replicas = Vec::new();
    for i in 0..n {
        let (r, _) = pg.fresh_db(&format!("{label}_r{i}"), replica_ddl).await;
        replicas.push(r);
    }
    let capture = Ferry::capture(pg, &master, &broker().address(), extra_source);
    capture.wait_ready().await;
    Topology {
        master,
        replicas,
        capture,
    }
}

fn start_applier(t: &Topology, extra: &str) -> Ferry {
    let pg = PgCluster::shared();
    let urls: Vec<String> = t.replicas.iter().map(|r| pg.url(r)).collect();
    let port = common::free_port();
    Ferry::start(
        &apply_config("node-a", &t.master, &urls, &broker().address(), port, extra),
        port,
    )
}

/// Waits until every table has the same checksum on every replica as on the master.
async fn wait_converged(t: &Topology, tables: &[&str], timeout: Duration) {
    let pg = PgCluster::shared();
    let master = pg.client(&t.master).await;
    let mut replicas: Vec<Client> = Vec::new();
    for r in &t.replicas {
        replicas.push(pg.client(r).await);
    }
    let deadline = std::time::Instant::now() + timeout;
    'poll: loop {
        let mut mismatch = None;
        'check: for table in tables {
            let want = table_checksum(&master, table).await;
            for (i, r) in replicas.iter().enumerate() {
                let got = try_table_checksum(r, table).await;
                if got.as_ref() != Some(&want) {
                    mismatch = Some(format!(
                        "{table} on replica {i}: {got:?} != master {want:?}"
                    ));
                    break 'check;
                }
            }
        }
        match mismatch {
            None => break 'poll,
            Some(m) if std::time::Instant::now() >= deadline => {
                // Where each side stands, to tell a stalled pipeline from a skipped change.
                let slot = master
                    .query_opt(
                        "SELECT confirmed_flush_lsn::text || ' of ' || pg_current_wal_lsn()::text \
                           FROM pg_replication_slots WHERE database = current_database()",
                        &[],
                    )
                    .await
                    .ok()
                    .flatten()
                    .map(|r| r.get::<_, String>(0));
                let mut progress = Vec::new();
                for r in &replicas {
                    let row = r
                        .query_opt(
                            "SELECT next_offset::text || ' ' || commit_lsn::text FROM pgferry.apply_progress",
                            &[],
                        )
                        .await
                        .ok()
                        .flatten()
                        .map(|r| r.get::<_, String>(0));
                    progress.push(row);
                }
                panic!(
                    "not converged after {timeout:?}: {m}; master slot confirmed {slot:?}; \
                     replica progress (next offset, commit lsn) {progress:?}"
                )
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Acceptance 1: pgbench TPC-B on the master (pgbench_history has no primary key); after
/// draining, every table on both replicas equals the master by ordered checksum.
#[tokio::test(flavor = "multi_thread")]
async fn pgbench_replicas_equal_master() {
    let pg = PgCluster::shared();
    let t = topology("bench", "", "", 2).await;
    // Schema and initial data exist before capture's snapshot? No: capture is already
    // streaming, so the initial load itself travels through the stream.
    pgbench(pg, &t.master, &["-i", "-s", "1", "-q"]);
    for r in &t.replicas {
        pgbench(pg, r, &["-i", "-I", "dtp"]);
    }
    let applier = start_applier(&t, "");
    pgbench(pg, &t.master, &["-n", "-c", "4", "-j", "2", "-t", "300"]);
    wait_converged(&t, &PGBENCH_TABLES, Duration::from_secs(180)).await;
    assert!(
        applier
            .metric("pgferry_apply_transactions_total", "")
            .unwrap_or(0.0)
            >= 1200.0
    );
    drop(t.capture);
}

/// Acceptance 2: `kill -9` of the applying pgferry three times during a pgbench run. The
/// replica ends equal to the master, and pgbench_history (no key, insert-only) has exactly the
/// master's rows: nothing was applied twice.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_applier_applies_each_change_once() {
    let pg = PgCluster::shared();
    let t = topology("akill", "", "", 1).await;
    pgbench(pg, &t.master, &["-i", "-s", "1", "-q"]);
    pgbench(pg, &t.replicas[0], &["-i", "-I", "dtp"]);
    let mut applier = start_applier(&t, "");
    let master = t.master.clone();
    let load = tokio::task::spawn_blocking(move || {
        pgbench(
            PgCluster::shared(),
            &master,
            &["-n", "-c", "2", "-j", "2", "-T", "20"],
        )
    });
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        applier.kill9();
        tokio::time::sleep(Duration::from_millis(300)).await;
        applier.restart();
    }
    assert!(
        !load.is_finished(),
        "the kills must land while pgbench is still running"
    );
    load.await.unwrap();
    wait_converged(&t, &PGBENCH_TABLES, Duration::from_secs(180)).await;
    let m = table_checksum(&pg.client(&t.master).await, "pgbench_history").await;
    let r = table_checksum(&pg.client(&t.replicas[0]).await, "pgbench_history").await;
    assert_eq!(m.0, r.0, "pgbench_history row counts differ");
    assert_eq!(applier.log().matches("--- restart ---").count(), 3);
}

/// Acceptance 3: a writer moves amounts between two tables in one transaction; a reader on the
/// replica checks the invariant total on every poll and never sees it broken.
#[tokio::test(flavor = "multi_thread")]
async fn replica_never_shows_half_a_transaction() {
    let ddl = "CREATE TABLE acct_a (id int PRIMARY KEY, bal int NOT NULL);
               CREATE TABLE acct_b (id int PRIMARY KEY, bal int NOT NULL);";
    let seed = "INSERT INTO acct_a SELECT g, 1000 FROM generate_series(1, 10) g;
                INSERT INTO acct_b SELECT g, 1000 FROM generate_series(1, 10) g;";
    let t = topology("atomic", &format!("{ddl}{seed}"), ddl, 1).await;
    let _applier = start_applier(&t, "");
    let pg = PgCluster::shared();
    let replica = pg.client(&t.replicas[0]).await;
    let master = t.master.clone();
    let writer = tokio::spawn(async move {
        let c = PgCluster::shared().client(&master).await;
        for i in 0..400i32 {
            let (from, to, amount) = (i % 10 + 1, (i * 7) % 10 + 1, i % 50 + 1);
            c.batch_execute(&format!(
                "BEGIN;
                 UPDATE acct_a SET bal = bal - {amount} WHERE id = {from};
                 UPDATE acct_b SET bal = bal + {amount} WHERE id = {to};
                 COMMIT;"
            ))
            .await
            .unwrap();
        }
    });
    let mut checks = 0u32;
    while !writer.is_finished() || checks < 50 {
        let row = replica
            .query_one(
                "SELECT (SELECT count(*) FROM acct_a) + (SELECT count(*) FROM acct_b),
                        (SELECT coalesce(sum(bal), 0) FROM acct_a) + (SELECT coalesce(sum(bal), 0) FROM acct_b)",
                &[],
            )
            .await
            .unwrap();
        let (rows, total): (i64, i64) = (row.get(0), row.get(1));
        if rows == 20 {
            assert_eq!(total, 20_000, "the replica showed half a transaction");
            checks += 1;
        } else {
            assert_eq!(rows, 0, "the snapshot must arrive atomically too");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    writer.await.unwrap();
    wait_converged(&t, &["acct_a", "acct_b"], Duration::from_secs(60)).await;
    assert!(checks >= 50);
}

/// Acceptances 5 and 6: values of many types round-trip exactly (equal under IS NOT DISTINCT
/// FROM), and an update that leaves a TOASTed value unchanged keeps it on the replica.
#[tokio::test(flavor = "multi_thread")]
async fn types_and_unchanged_toast_round_trip() {
    let ddl = "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
         CREATE TABLE typed (
             id bigint PRIMARY KEY, n numeric(30,10), j jsonb, u uuid, b bytea, ts timestamptz,
             tags text[], m mood, i2 smallint, i4 int, f8 float8, f4 real, flag bool, t text,
             d date, big bigint, ints int[], tsn timestamp, iv interval, moods mood[], bs bytea[]);
         CREATE TABLE docs (id int PRIMARY KEY, body text, n int);
         ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;";
    let t = topology("atypes", ddl, ddl, 1).await;
    let pg = PgCluster::shared();
    let master = pg.client(&t.master).await;
    master
        .batch_execute(
            r#"INSERT INTO typed VALUES (1, '12345678901234567890.0123456789',
                  '{"big": 12345678901234567890123, "a": [1, 2.50, {"b": null}], "s": "é\"\\"}',
                  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\xdeadbeef00',
                  '2024-02-29 13:14:15.123456+02', ARRAY['a', 'b c', 'NULL', NULL, '{x}', 'q"uote'],
                  'happy', -32768, 2147483647, 0.1, 3.4028235e38, true, 'héllo "quoted" \ back',
                  '2024-01-31', 9223372036854775807, '{{1,2},{3,NULL}}', '2020-01-01 00:00:00',
                  '1 day 02:03:04.5', '{sad,happy}', ARRAY['\x00ff'::bytea, NULL]);
               INSERT INTO typed (id) VALUES (2);
               INSERT INTO typed VALUES (3, 'NaN', 'null', NULL, '\x', '-infinity', '{}', 'ok',
                  0, 0, 'Infinity', '-0', false, '', '0044-03-15 BC', -9223372036854775808,
                  '{}', 'infinity', '-1 year', '{}', '{}');
               INSERT INTO docs VALUES (1, repeat('0123456789abcdef', 8192), 1);
               UPDATE docs SET n = 2 WHERE id = 1;"#,
        )
        .await
        .unwrap();
    let _applier = start_applier(&t, "");
    wait_converged(&t, &["typed", "docs"], Duration::from_secs(60)).await;
    let replica = pg.client(&t.replicas[0]).await;
    for id in [1i64, 2, 3] {
        let text: String = replica
            .query_one("SELECT x::text FROM typed x WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        let same: bool = master
            .query_one(
                "SELECT whole_row IS NOT DISTINCT FROM $1::text::typed FROM typed whole_row WHERE id = $2",
                &[&text, &id],
            )
            .await
            .unwrap()
            .get(0);
        assert!(same, "row {id} differs: replica has {text}");
    }
    let (len, n): (i32, i32) = {
        let r = replica
            .query_one("SELECT length(body), n FROM docs WHERE id = 1", &[])
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((len, n), (16 * 8192, 2));
}

/// Updates that move rows to other keys while leaving a TOASTed value out (PostgreSQL writes
/// no copy of an unchanged out-of-line value in the WAL, only the row keeps it): the replica's
/// rows keep their values. Random moves (alone, with other columns, with the value itself
/// changed, chains and swaps of keys inside one transaction) over random rows; for each seed
/// (a fixed one and one from the clock, printed) the table ends equal to the master's. Before,
/// capture sent such an update as a delete and a create, and the replica's moved row got NULL
/// for the value left out.
#[tokio::test(flavor = "multi_thread")]
async fn key_changes_keep_unchanged_toast_values() {
    let clock_seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let ddl = "CREATE TABLE docs (id int PRIMARY KEY, body text, n int);
         ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;";
    let t = topology("akeytoast", ddl, ddl, 1).await;
    let pg = PgCluster::shared();
    let master = pg.client(&t.master).await;
    master
        .batch_execute(
            "INSERT INTO docs SELECT g, repeat(md5(g::text), 512), 0 FROM generate_series(1, 40) g",
        )
        .await
        .unwrap();
    let _applier = start_applier(&t, "");
    wait_converged(&t, &["docs"], Duration::from_secs(60)).await;
    for seed in [11u64, clock_seed] {
        println!("key_changes_keep_unchanged_toast_values seed {seed}");
        let mut rng = common::Rng::new(seed);
        let ids: Vec<i32> = master
            .query("SELECT id FROM docs ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut next = ids.iter().max().copied().unwrap_or(0) + 1000;
        // One plain move first: the topic check below looks for it.
        let mut steps = vec![format!("UPDATE docs SET id = {next} WHERE id = {}", ids[0])];
        for _ in 0..rng.range(8, 16) {
            let id = ids[rng.range(0, ids.len() as i64) as usize];
            next += 1;
            steps.push(match rng.range(0, 5) {
                0 => format!("UPDATE docs SET id = {next} WHERE id = {id}"),
                1 => format!("UPDATE docs SET id = {next}, n = n + 1 WHERE id = {id}"),
                2 => format!("UPDATE docs SET id = {next}, body = body || 'x' WHERE id = {id}"),
                // A chain inside one transaction: moved, then moved again.
                3 => format!(
                    "BEGIN; UPDATE docs SET id = {next} WHERE id = {id}; \
                     UPDATE docs SET id = {} WHERE id = {next}; COMMIT",
                    next + 500_000
                ),
                // Two rows swap keys through a third.
                _ => {
                    let other = ids[rng.range(0, ids.len() as i64) as usize];
                    format!(
                        "BEGIN; UPDATE docs SET id = -1 WHERE id = {id}; \
                         UPDATE docs SET id = {id} WHERE id = {other}; \
                         UPDATE docs SET id = {other} WHERE id = -1; COMMIT"
                    )
                }
            });
        }
        for step in &steps {
            // A row a step names may have moved away already: the step changes nothing.
            master.batch_execute(step).await.unwrap();
        }
        wait_converged(&t, &["docs"], Duration::from_secs(60)).await;
        let nulls: i64 = master
            .query_one("SELECT count(*) FROM docs WHERE body IS NULL", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(nulls, 0, "the master's rows all have a body");
    }
    // On the table topic a move is still a delete (and tombstone) and a create, which names
    // the value it left out; no update changes its key.
    let records = common::kafka::TopicReader::new(&broker().address()).read_until(
        &[format!("{}.public.docs", t.master)],
        Duration::from_secs(60),
        |r| {
            r.iter().any(|r| {
                r.value.as_ref().is_some_and(|v| {
                    v["op"] == "c" && v["unchanged_toast"] == serde_json::json!(["body"])
                })
            })
        },
    );
    for r in records.iter().filter_map(|r| r.value.as_ref()) {
        if r["op"] == "u" && r["before"].is_object() {
            assert_eq!(r["before"]["id"], r["after"]["id"], "{r}");
        }
        if r["op"] == "c" && r["unchanged_toast"].is_array() {
            assert!(r["after"].get("body").is_none(), "{r}");
        }
    }
}

/// Identity columns: the targets have the source's DDL, with keys that are `GENERATED ALWAYS
/// AS IDENTITY` (PostgreSQL refuses an INSERT that sets one unless it says OVERRIDING SYSTEM
/// VALUE) and a non-key identity `BY DEFAULT`. Rows that exist before capture starts travel
/// through the snapshot (COPY), later ones through the stream: small transactions (row
/// statements) and bulk ones (COPY), with random updates and deletes, and rows the source
/// inserted with its own key values. For each seed (a fixed one and one from the clock,
/// printed) the table ends equal to the master's. An identity outside the key that is ALWAYS
/// on the target (PostgreSQL lets no UPDATE set it, and refuses an upsert that names it) is
/// written by inserts and left out of updates: that table converges too. A target column
/// that is GENERATED ALWAYS AS (…) STORED where the source's is plain refuses every write of
/// it: each is dead-lettered with PostgreSQL's reason, and everything after it applies.
#[tokio::test(flavor = "multi_thread")]
async fn identity_columns_replicate() {
    let clock_seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        % 1_000_000;
    let seeds = [7u64, clock_seed];
    println!("identity_columns_replicate seeds {seeds:?}");
    let table = |i: usize| format!("ident_{i}");
    let create = |i: usize| {
        format!(
            "CREATE TABLE {} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
                              n int GENERATED BY DEFAULT AS IDENTITY, v text NOT NULL);",
            table(i)
        )
    };
    let mut master_ddl = String::new();
    let mut replica_ddl = String::new();
    for (i, seed) in seeds.iter().enumerate() {
        master_ddl += &create(i);
        replica_ddl += &create(i);
        master_ddl += &format!(
            "INSERT INTO {} (v) SELECT md5(g::text) FROM generate_series(1, {}) g;",
            table(i),
            500 + seed % 500
        );
    }
    master_ddl += "CREATE TABLE numbered (id int PRIMARY KEY, n int GENERATED BY DEFAULT AS IDENTITY, v text);";
    replica_ddl +=
        "CREATE TABLE numbered (id int PRIMARY KEY, n int GENERATED ALWAYS AS IDENTITY, v text);";
    master_ddl += "CREATE TABLE derived (id int PRIMARY KEY, a int, twice int);";
    replica_ddl +=
        "CREATE TABLE derived (id int PRIMARY KEY, a int, twice int GENERATED ALWAYS AS (2 * a) STORED);";
    let t = topology("ident", &master_ddl, &replica_ddl, 1).await;
    let applier = start_applier(&t, "");
    let pg = PgCluster::shared();
    let master = pg.client(&t.master).await;
    master
        .batch_execute(
            "INSERT INTO numbered (id, v) VALUES (1, 'a'), (2, 'b'), (3, 'c');
             UPDATE numbered SET v = v || '!' WHERE id <= 2;
             INSERT INTO derived VALUES (1, 1, 2), (2, 2, 4);",
        )
        .await
        .unwrap();
    for (i, seed) in seeds.iter().enumerate() {
        let mut rng = common::Rng::new(*seed);
        let name = table(i);
        for _ in 0..40 {
            let m = rng.range(3, 17);
            let r = rng.range(0, m);
            let sql = match rng.range(0, 10) {
                0 => format!(
                    "INSERT INTO {name} (v) SELECT md5(random()::text) FROM generate_series(1, {})",
                    rng.range(500, 900)
                ),
                1..=3 => format!(
                    "INSERT INTO {name} (v) SELECT 'few ' || g FROM generate_series(1, {}) g",
                    rng.range(1, 20)
                ),
                4 | 5 => format!("UPDATE {name} SET v = md5(v) WHERE id % {m} = {r}"),
                6 => format!("UPDATE {name} SET n = n + 1, v = v || '!' WHERE id % {m} = {r}"),
                7 => format!("DELETE FROM {name} WHERE id % {m} = {r}"),
                8 => format!(
                    "INSERT INTO {name} (id, v) OVERRIDING SYSTEM VALUE \
                     SELECT 1000000 * {} + g, 'own key' FROM generate_series(1, {}) g \
                     ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v || ' again'",
                    i + 1,
                    rng.range(1, 600)
                ),
                _ => format!(
                    "BEGIN; INSERT INTO {name} (v) VALUES ('in'), ('out'); \
                     DELETE FROM {name} WHERE v = 'out'; UPDATE {name} SET v = 'moved' WHERE v = 'in'; COMMIT"
                ),
            };
            master.batch_execute(&sql).await.unwrap();
        }
    }
    let mut tables: Vec<String> = (0..seeds.len()).map(table).collect();
    tables.push("numbered".into());
    let tables: Vec<&str> = tables.iter().map(String::as_str).collect();
    wait_converged(&t, &tables, Duration::from_secs(120)).await;
    // The two rows of `derived`, and nothing else, were refused.
    assert_eq!(
        applier
            .metric("pgferry_apply_dead_letters_total", "")
            .unwrap_or(0.0),
        2.0,
        "seeds {seeds:?}"
    );
    let replica = pg.client(&t.replicas[0]).await;
    let letters: Vec<String> = replica
        .query(
            "SELECT error FROM pgferry.dead_letters WHERE table_name = 'public.derived'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        letters.len() == 2
            && letters
                .iter()
                .all(|e| e.contains("cannot insert a non-DEFAULT value into column \"twice\"")),
        "{letters:?}"
    );
    drop(t.capture);
}

/// Acceptance 4: a poison record in the change stream goes to the dead-letter topic with the
/// reason, and later changes still apply.
#[tokio::test(flavor = "multi_thread")]
async fn poison_record_is_dead_lettered_and_apply_continues() {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let ddl = "CREATE TABLE items (id int PRIMARY KEY, v text);";
    // `ghost` exists only on the master: its changes cannot be applied.
    let t = topology(
        "poison",
        &format!("{ddl} CREATE TABLE ghost (id int PRIMARY KEY);"),
        ddl,
        1,
    )
    .await;
    let pg = PgCluster::shared();
    let master = pg.client(&t.master).await;
    master
        .batch_execute("INSERT INTO items VALUES (1, 'before')")
        .await
        .unwrap();
    let applier = start_applier(&t, "");
    wait_converged(&t, &["items"], Duration::from_secs(60)).await;

    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker().address())
        .create()
        .unwrap();
    let node_topic = format!("{}.__node.node-a", t.master);
    // One record, three bad items: each is dead-lettered on its own, with its own line.
    let bundle =
        "this is not a change\n{\"type\":\"commit\",\"commit_lsn\":\"0/1\"}\n{\"type\":\"begin\"}";
    producer
        .send(BaseRecord::<(), str>::to(&node_topic).payload(bundle))
        .map_err(|(e, _)| e)
        .unwrap();
    producer.flush(Duration::from_secs(10)).unwrap();
    master
        .batch_execute("INSERT INTO ghost VALUES (1); INSERT INTO items VALUES (2, 'after')")
        .await
        .unwrap();
    wait_converged(&t, &["items"], Duration::from_secs(60)).await;

    let dlq = [format!("{}.__dead_letter", t.master)];
    let records = common::kafka::TopicReader::new(&broker().address()).read_until(
        &dlq,
        Duration::from_secs(30),
        |r| r.len() >= 4,
    );
    let dead = records[0].value.as_ref().unwrap();
    assert!(
        dead["error"].as_str().unwrap().contains("not JSON"),
        "{dead}"
    );
    assert_eq!(dead["payload"], "this is not a change");
    assert_eq!(dead["stage"], "apply");
    assert_eq!(dead["topic"].as_str(), Some(node_topic.as_str()));
    assert!(dead["offset"].as_i64().is_some(), "{dead}");
    let stray = records[1].value.as_ref().unwrap();
    assert!(
        stray["error"]
            .as_str()
            .unwrap()
            .contains("a commit outside any transaction"),
        "{stray}"
    );
    assert_eq!(stray["payload"], r#"{"type":"commit","commit_lsn":"0/1"}"#);
    assert_eq!(stray["offset"], dead["offset"], "the same record");
    let after_commit = records[2].value.as_ref().unwrap();
    assert!(
        after_commit["error"]
            .as_str()
            .unwrap()
            .contains("after the commit"),
        "{after_commit}"
    );
    assert_eq!(after_commit["payload"], r#"{"type":"begin"}"#);
    let missing = records[3].value.as_ref().unwrap();
    assert_eq!(missing["table"], "public.ghost");
    assert!(
        missing["error"]
            .as_str()
            .unwrap()
            .contains("table public.ghost does not exist on the target"),
        "{missing}"
    );
    assert_eq!(
        applier.metric("pgferry_apply_dead_letters_total", ""),
        Some(4.0)
    );
    // A table missing on the target is not remembered as missing: once created there, its
    // changes apply.
    let replica = pg.client(&t.replicas[0]).await;
    replica
        .batch_execute("CREATE TABLE ghost (id int PRIMARY KEY)")
        .await
        .unwrap();
    master
        .batch_execute("INSERT INTO ghost VALUES (2)")
        .await
        .unwrap();
    common::wait_for(
        "ghost row 2 on the replica",
        Duration::from_secs(60),
        || async {
            let n: i64 = replica
                .query_one("SELECT count(*) FROM ghost WHERE id = 2", &[])
                .await
                .ok()?
                .get(0);
            (n == 1).then_some(())
        },
    )
    .await;
}

/// With schema changes not captured (`source.capture_ddl: false`), a column added on the
/// source while streaming: the change naming it is dead-lettered with a clear reason and its
/// table parked (its later changes wait behind it, in order) while another table goes on;
/// once the target has the column the table resumes by itself; no change is lost or
/// half-applied. (Before, apply stopped every table until the column existed.)
#[tokio::test(flavor = "multi_thread")]
async fn added_column_waits_for_the_target_then_applies() {
    let ddl =
        "CREATE TABLE items (id int PRIMARY KEY, v text); CREATE TABLE other (id int PRIMARY KEY);";
    let t = topology_with("ddl", ddl, ddl, 1, "  capture_ddl: false\n").await;
    let pg = PgCluster::shared();
    let master = pg.client(&t.master).await;
    master
        .batch_execute("INSERT INTO items VALUES (1, 'a')")
        .await
        .unwrap();
    let applier = start_applier(&t, "");
    wait_converged(&t, &["items"], Duration::from_secs(60)).await;

    master
        .batch_execute(
            "ALTER TABLE items ADD COLUMN extra int;
             INSERT INTO items VALUES (2, 'b', 5);",
        )
        .await
        .unwrap();
    master
        .batch_execute(
            "UPDATE items SET extra = 6, v = 'c' WHERE id = 2; INSERT INTO other VALUES (1)",
        )
        .await
        .unwrap();
    applier
        .wait_log(
            "column missing on the target: extra of public.items",
            Duration::from_secs(60),
        )
        .await;
    let replica = pg.client(&t.replicas[0]).await;
    common::wait_for(
        "the other table to go on",
        Duration::from_secs(60),
        || async {
            let n: i64 = replica
                .query_one("SELECT count(*) FROM other", &[])
                .await
                .ok()?
                .get(0);
            (n == 1).then_some(())
        },
    )
    .await;
    let rows: i64 = replica
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        rows, 1,
        "nothing of the transaction may be applied without the column"
    );

    replica
        .batch_execute("ALTER TABLE items ADD COLUMN extra int")
        .await
        .unwrap();
    wait_converged(&t, &["items"], Duration::from_secs(90)).await;
    let extra: Option<i32> = replica
        .query_one("SELECT extra FROM items WHERE id = 2", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(extra, Some(6));
}

/// `apply.create_tables`: tables missing on the target are created from the source's
/// announced schema, both for snapshot tables and for a table created while streaming, with
/// the same column types and primary key.
#[tokio::test(flavor = "multi_thread")]
async fn create_tables_builds_missing_tables() {
    let ddl =
        "CREATE TABLE early (id bigint PRIMARY KEY, amount numeric(12,2) NOT NULL, tags text[]);
               INSERT INTO early VALUES (1, 9.99, '{a,b}');";
    let t = topology("ctab", ddl, "", 1).await;
    let _applier = start_applier(&t, "  create_tables: true\n");
    wait_converged(&t, &["early"], Duration::from_secs(60)).await;
    let pg = PgCluster::shared();
    let master = pg.client(&t.master).await;
    master
        .batch_execute(
            "CREATE TABLE late (k text PRIMARY KEY, at timestamptz, doc jsonb);
             INSERT INTO late VALUES ('x', '2024-01-01 00:00:00+00', '{\"n\": 1}');
             UPDATE early SET amount = 10.01 WHERE id = 1;",
        )
        .await
        .unwrap();
    wait_converged(&t, &["early", "late"], Duration::from_secs(60)).await;
    let replica = pg.client(&t.replicas[0]).await;
    let described: Vec<String> = first_column(
        &replica,
        "SELECT a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
           FROM pg_attribute a WHERE a.attrelid = 'public.early'::regclass AND a.attnum > 0 ORDER BY a.attnum",
    )
    .await;
    assert_eq!(
        described,
        [
            "id bigint not null",
            "amount numeric(12,2) not null",
            "tags text[]"
        ]
    );
    let pk: String = replica
        .query_one(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'public.late'::regclass AND contype = 'p'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(pk, "PRIMARY KEY (k)");
}

/// Crash of the *capture* side mid-transaction: `kill -9` while large transactions are being
/// published leaves a cut-off transaction in the node stream, followed by its replay. The
/// replica must still end exactly equal to the master (no half transaction, no duplicate).
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_capture_mid_transaction_replica_stays_exact() {
    let ddl = "CREATE TABLE bulk (id bigint PRIMARY KEY, batch int NOT NULL, pad text);
               CREATE TABLE batches (batch int PRIMARY KEY, rows int NOT NULL);";
    let mut t = topology("ckill", ddl, ddl, 1).await;
    let applier = start_applier(&t, "");
    let master = t.master.clone();
    // Each transaction inserts 5000 rows and records its size: big enough that a kill often
    // lands while one is being published.
    let writer = tokio::spawn(async move {
        let c = PgCluster::shared().client(&master).await;
        for b in 0..40i32 {
            c.batch_execute(&format!(
                "BEGIN;
                 INSERT INTO bulk SELECT {b} * 5000 + g, {b}, repeat('x', 100) FROM generate_series(1, 5000) g;
                 INSERT INTO batches VALUES ({b}, 5000);
                 COMMIT;"
            ))
            .await
            .unwrap();
        }
    });
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        t.capture.kill9();
        tokio::time::sleep(Duration::from_millis(300)).await;
        t.capture.restart();
        t.capture.wait_ready().await;
    }
    writer.await.unwrap();
    wait_converged(&t, &["bulk", "batches"], Duration::from_secs(180)).await;
    let replica = PgCluster::shared().client(&t.replicas[0]).await;
    let partial: i64 = replica
        .query_one(
            "SELECT count(*) FROM batches b WHERE b.rows <> (SELECT count(*) FROM bulk WHERE batch = b.batch)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(partial, 0, "a batch was applied partially");
    assert_eq!(
        applier
            .metric("pgferry_apply_dead_letters_total", "")
            .unwrap_or(0.0),
        0.0,
        "records out of place in the node stream: {}",
        applier.log()
    );
    let orphans = applier
        .log()
        .matches("cut off by a capture restart")
        .count();
    eprintln!("capture kill test: {orphans} cut-off transaction(s) detected and replayed");
}

/// Keys rewritten as equal values spelled otherwise (`numeric` `1` and `1.00`, `float8` `0`
/// and `-0`, also inside a composite key), by random small transactions that the applier,
/// killed meanwhile, applies in one batch when it comes back: the replica ends equal to the
/// master by every row's text. Before, the batch gathered changes by the key's text, so
/// `DELETE … k = 1` and `INSERT … 1.00` were two keys whose changes it reordered (the upsert
/// first, then the delete, which removed the equal row just written): rows went missing on the
/// replica, without a dead letter.
#[tokio::test(flavor = "multi_thread")]
async fn keys_respelled_as_equal_values_keep_their_rows() {
    let ddl = "CREATE TABLE tn (k numeric PRIMARY KEY, v int, s text); \
               CREATE TABLE tf (k float8 PRIMARY KEY, v int); \
               CREATE TABLE tc (a numeric, b text, v int, PRIMARY KEY (a, b))";
    let t = topology("arespell", ddl, ddl, 1).await;
    let pg = PgCluster::shared();
    let master = pg.client(&t.master).await;
    master
        .batch_execute(
            "INSERT INTO tn SELECT g, 0, 'init' FROM generate_series(1, 12) g; \
             INSERT INTO tf VALUES (0, 0), (1, 0); \
             INSERT INTO tc SELECT g, 'x', 0 FROM generate_series(1, 8) g",
        )
        .await
        .unwrap();
    let mut applier = start_applier(&t, "");
    let tables = ["tn", "tf", "tc"];
    wait_converged(&t, &tables, Duration::from_secs(60)).await;
    let clock_seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    for seed in [5u64, clock_seed] {
        println!("keys_respelled_as_equal_values_keep_their_rows seed {seed}");
        let mut rng = common::Rng::new(seed);
        applier.kill9();
        for i in 0..60 {
            let n = rng.range(1, 13);
            let spelled = format!("{n}{}", [".0", ".00", "", ".000"][rng.range(0, 4) as usize]);
            let other = format!("{n}{}", [".0", ".00", "", ".000"][rng.range(0, 4) as usize]);
            let zero = ["0", "-0"][rng.range(0, 2) as usize];
            let a = rng.range(1, 9);
            let step = match rng.range(0, 8) {
                0 => format!("DELETE FROM tn WHERE k = {n}; INSERT INTO tn VALUES ({spelled}, {i}, 'r')"),
                1 => format!("UPDATE tn SET k = {spelled}, v = {i} WHERE k = {n}"),
                2 => format!("DELETE FROM tn WHERE k = {n}"),
                3 => format!("INSERT INTO tn VALUES ({spelled}, {i}, 'i') ON CONFLICT (k) DO NOTHING"),
                4 => format!("UPDATE tn SET v = {i} WHERE k = {other}"),
                5 => format!("DELETE FROM tf WHERE k = 0; INSERT INTO tf VALUES ('{zero}', {i})"),
                6 => format!("UPDATE tf SET k = '{zero}', v = {i} WHERE k = 0"),
                _ => format!(
                    "DELETE FROM tc WHERE a = {a} AND b = 'x'; INSERT INTO tc VALUES ({a}{}, 'x', {i})",
                    [".0", ".00", ""][rng.range(0, 3) as usize]
                ),
            };
            master.batch_execute(&step).await.unwrap();
        }
        applier.restart();
        wait_converged(&t, &tables, Duration::from_secs(120)).await;
    }
}

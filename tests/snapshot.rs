//! Chunked snapshots end to end, against real PostgreSQL and a real broker: a big table's
//! snapshot killed with `kill -9` halfway resumes, while a writer updates, deletes and inserts
//! rows of the same table; no source transaction stays open longer than a chunk; tables are
//! re-snapshotted on request (`pgferry snapshot`, `pgferry.snapshot_requests`) and tables
//! added to the publication are snapshotted by themselves, while streaming goes on.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::broker::Broker;
use common::ferry::{apply_config, capture_config, pgferry_bin, Ferry};
use common::kafka::topic_records;
use common::pg::{table_checksum, try_table_checksum, PgCluster};
use common::{wait_for, Rng};

fn broker() -> &'static Broker {
    static BROKER: OnceLock<Broker> = OnceLock::new();
    BROKER.get_or_init(Broker::start)
}

/// Rows of the big table (`SNAPSHOT_ROWS` overrides).
fn big_rows() -> i64 {
    std::env::var("SNAPSHOT_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000)
}

fn seed() -> u64 {
    std::env::var("SNAPSHOT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(7)
        })
}

fn start_capture(db: &str, extra_source: &str) -> Ferry {
    let port = common::free_port();
    let pg = PgCluster::shared();
    Ferry::start(
        &capture_config(
            "node-a",
            pg.port,
            db,
            &broker().address(),
            port,
            extra_source,
        ),
        port,
    )
}

fn start_applier(master: &str, replica: &str) -> Ferry {
    let pg = PgCluster::shared();
    let port = common::free_port();
    Ferry::start(
        &apply_config(
            "node-a",
            master,
            &[pg.url(replica)],
            &broker().address(),
            port,
            "",
        ),
        port,
    )
}

/// Runs `pgferry snapshot --table` with capture's config.
fn request_snapshot(capture: &Ferry, table: &str) -> std::process::Output {
    std::process::Command::new(pgferry_bin())
        .args(["snapshot", "--config"])
        .arg(&capture.config_path)
        .args(["--table", table])
        .output()
        .unwrap()
}

/// Waits until `table` has the same checksum on the replica as on the master.
async fn wait_equal(master: &str, replica: &str, table: &str, timeout: Duration) {
    eprintln!("waiting for {table} to converge");
    let pg = PgCluster::shared();
    let m = pg.client(master).await;
    let r = pg.client(replica).await;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let want = table_checksum(&m, table).await;
        let got = try_table_checksum(&r, table).await;
        if got.as_ref() == Some(&want) {
            return;
        }
        if std::time::Instant::now() >= deadline {
            let rows = |c: tokio_postgres::Client| async move {
                c.query(&format!("SELECT t::text FROM {table} t ORDER BY 1"), &[])
                    .await
                    .map(|rows| {
                        rows.iter()
                            .map(|r| r.get::<_, String>(0))
                            .collect::<std::collections::BTreeSet<_>>()
                    })
                    .unwrap_or_default()
            };
            let (mr, rr) = (rows(m).await, rows(r).await);
            let missing: Vec<_> = mr.difference(&rr).take(5).collect();
            let extra: Vec<_> = rr.difference(&mr).take(5).collect();
            panic!("{table}: replica {got:?} != master {want:?} after {timeout:?}; missing on the replica {missing:?}, extra {extra:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// (rows published and acknowledged, parts, parts done) of this slot's snapshot of `table`;
/// a part counts as done only when it was planned at or after `since` (the source's clock;
/// `UNIX_EPOCH`: any), so that a re-snapshot is not taken for the one before it.
async fn progress(
    c: &tokio_postgres::Client,
    slot: &str,
    table: &str,
    since: SystemTime,
) -> (i64, i64, i64) {
    // Missing until capture has created pgferry's schema.
    let Ok(row) = c
        .query_one(
            "SELECT COALESCE(sum(rows_done), 0)::int8, count(*),
                    count(*) FILTER (WHERE done AND started_at >= $3)
               FROM pgferry.snapshot_progress WHERE slot_name = $1 AND table_name = $2",
            &[&slot, &table, &since],
        )
        .await
    else {
        return (0, 0, 0);
    };
    (row.get(0), row.get(1), row.get(2))
}

/// Waits until every part of this slot's snapshot of `table` (named without its schema, as
/// `pgferry.snapshot_progress` names it) planned at or after `since` is done (see
/// [`progress`]); fails after `timeout` with how far it got and `log` (capture's, where it
/// helps).
async fn wait_snapshot_done(
    c: &tokio_postgres::Client,
    slot: &str,
    (table, since): (&str, SystemTime),
    timeout: Duration,
    log: impl Fn() -> String,
) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let (done_rows, parts, done) = progress(c, slot, table, since).await;
        if parts > 0 && parts == done {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the snapshot of {table} did not finish in {timeout:?}: {done_rows} rows, {done} of \
             {parts} ranges done\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Fails, with the applier's log, when the target `r` holds any dead letter.
async fn assert_no_dead_letters(r: &tokio_postgres::Client, applier: &Ferry) {
    let letters: i64 = r
        .query_one("SELECT count(*) FROM pgferry.dead_letters", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        letters,
        0,
        "no change may be dead-lettered\n{}",
        applier.log()
    );
}

/// A writer on `table` (`id`, `v`, `note`) until `stop`: updates, deletes and inserts random
/// rows, one statement per transaction. Returns how many changes it committed.
fn spawn_writer(
    db: String,
    table: &'static str,
    rows: i64,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    spawn_statements(db, seed, stop, (rows, rows + 1), move |id, next| match id {
        Some((id, Write::Update)) => {
            format!("UPDATE {table} SET v = v + 1, note = note || 'u' WHERE id = {id}")
        }
        Some((id, Write::Delete)) => format!("DELETE FROM {table} WHERE id = {id}"),
        None => format!("INSERT INTO {table} VALUES ({next}, 1, 'new')"),
    })
}

/// What [`spawn_statements`] asks for: an update or a delete of an existing row.
enum Write {
    Update,
    Delete,
}

/// Random writes until `stop`, one statement per transaction every 2 ms: 6 in 9 an update
/// and 2 in 9 a delete of a random id below `rows` (`statement(Some((id, kind)), _)`), 1 in 9
/// an insert of the next new id after `last` (`statement(None, id)`), for `(rows, last)`.
/// Returns how many rows the statements changed.
fn spawn_statements(
    db: String,
    seed: u64,
    stop: Arc<AtomicBool>,
    (rows, last): (i64, i64),
    mut statement: impl FnMut(Option<(i64, Write)>, i64) -> String + Send + 'static,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let c = PgCluster::shared().client(&db).await;
        let mut rng = Rng::new(seed);
        let mut next = last;
        let mut changes = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let id = rng.range(1, rows);
            let sql = match rng.range(0, 9) {
                0..=5 => statement(Some((id, Write::Update)), next),
                6 | 7 => statement(Some((id, Write::Delete)), next),
                _ => {
                    next += 1;
                    statement(None, next)
                }
            };
            changes += c.execute(&sql, &[]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        changes
    })
}

/// Acceptance 1–3: a multi-million-row table's chunked snapshot (3 readers, so the table is
/// split into 3 key ranges at sampled keys of 1 to 7 digits), killed with `kill -9` at
/// about half, resumes after the last chunk Kafka holds: the table topic ends with at most
/// 1.1 × the rows as snapshot reads, and the replica is exact although a writer updated,
/// deleted and inserted random rows throughout. No pgferry session on the source kept a
/// transaction open for more than a few seconds (sampled from pg_stat_activity).
#[tokio::test(flavor = "multi_thread")]
async fn killed_snapshot_resumes_and_reconciles_concurrent_writes() {
    let pg = PgCluster::shared();
    let rows = big_rows();
    let seed = seed();
    eprintln!("seed {seed} (SNAPSHOT_SEED), {rows} rows");
    let ddl = "CREATE TABLE items (id bigint PRIMARY KEY, v int NOT NULL, note text NOT NULL)";
    let (master, c) = pg.fresh_db("bigsnap", ddl).await;
    let (replica, _) = pg.fresh_db("bigsnap_r", ddl).await;
    c.batch_execute(&format!(
        "INSERT INTO items SELECT g, g % 1000, md5(g::text) FROM generate_series(1, {rows}) g;
         ANALYZE items"
    ))
    .await
    .unwrap();
    let slot = format!("slot_{master}");

    // Sample pgferry's open transactions on the source from now on.
    let stop = Arc::new(AtomicBool::new(false));
    let longest_ms = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, longest_ms, master) = (stop.clone(), longest_ms.clone(), master.clone());
        tokio::spawn(async move {
            let c = PgCluster::shared().client(&master).await;
            while !stop.load(Ordering::Relaxed) {
                let ms: f64 = c
                    .query_one(
                        "SELECT COALESCE(max(extract(epoch FROM clock_timestamp() - xact_start)) * 1000, 0)::float8
                           FROM pg_stat_activity
                          WHERE datname = current_database() AND application_name LIKE 'pgferry%'
                            AND backend_type = 'client backend'",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                longest_ms.fetch_max(ms as u64, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let applier = start_applier(&master, &replica);
    let mut capture = start_capture(
        &master,
        "  snapshot_readers: 3\n  snapshot_batch_rows: 5000\n",
    );
    let writer = spawn_writer(master.clone(), "items", rows, seed, stop.clone());

    // Kill capture once Kafka holds about half the table.
    let at_kill = wait_for("half the snapshot", Duration::from_secs(600), || async {
        let (done, _, _) = progress(&c, &slot, "items", UNIX_EPOCH).await;
        (done >= rows / 2).then_some(done)
    })
    .await;
    capture.kill9();
    assert!(
        at_kill < rows * 9 / 10,
        "the kill must land mid-snapshot (Kafka held {at_kill} of {rows} rows)"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    capture.restart();
    // `pgferry status` shows the running snapshot with a bar, its rate and an ETA.
    let status = std::process::Command::new(common::ferry::pgferry_bin())
        .args(["status", "--config", capture.config_path.to_str().unwrap()])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("snapshots: 0 of 1 tables done")
            && status.contains("public.items")
            && status.contains("% ")
            && status.contains("ETA"),
        "{status}"
    );
    wait_snapshot_done(
        &c,
        &slot,
        ("items", UNIX_EPOCH),
        Duration::from_secs(900),
        String::new,
    )
    .await;
    let log = capture.log();
    assert!(
        log.contains("resuming snapshot"),
        "the restarted capture must resume, not start over"
    );
    // The resumed run counts the rows both runs read (parts finished before the kill too).
    let finished = log
        .lines()
        .rfind(|l| l.contains("snapshot of table finished") && l.contains("public.items"))
        .and_then(|l| l.split("rows=").nth(1))
        .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|v| v.parse::<i64>().ok());
    assert!(
        finished.is_some_and(|n| n as f64 >= rows as f64 * 0.9),
        "the finish line must count the table's rows ({rows}), not only the resumed run's: {finished:?}"
    );
    stop.store(true, Ordering::Relaxed);
    let changes = writer.await.unwrap();
    sampler.await.unwrap();
    assert!(
        changes > 100,
        "the writer must run during the snapshot ({changes} changes)"
    );
    wait_equal(&master, &replica, "items", Duration::from_secs(600)).await;

    // The table topic: snapshot reads (from both runs) and the writer's changes, all counted
    // by the broker.
    let held = topic_records(&broker().address(), &format!("{master}.public.items"));
    let reads = capture
        .metric("pgferry_snapshot_rows_total", "")
        .unwrap_or(0.0);
    eprintln!(
        "table topic {held} records for {rows} rows ({:.3}×); the resumed run published {reads} \
         snapshot rows; {changes} writer changes; Kafka held {at_kill} rows at the kill; \
         longest pgferry transaction {} ms",
        held as f64 / rows as f64,
        longest_ms.load(Ordering::Relaxed)
    );
    assert!(
        held as f64 <= 1.1 * rows as f64,
        "the table topic holds {held} records for {rows} rows: the restart did not resume"
    );
    assert!(
        reads > 0.0 && reads < (rows - at_kill) as f64 * 1.1 + 50_000.0,
        "the resumed run published {reads} snapshot rows, expected about {}",
        rows - at_kill
    );
    let longest = longest_ms.load(Ordering::Relaxed);
    assert!(
        longest < 5_000,
        "a pgferry transaction stayed open {longest} ms on the source"
    );
    drop(applier);
}

/// Acceptance 4: while capture streams and a writer works on `items`, `pgferry snapshot
/// --table` re-snapshots `items` onto a replica that lost rows (a second request at once, from
/// SQL, runs in full after it), an INSERT into pgferry.snapshot_requests does the same for
/// another table, and tables added to the
/// publication (one with a key, one without) are snapshotted by themselves.
#[tokio::test(flavor = "multi_thread")]
async fn snapshots_on_request_and_of_added_tables_while_streaming() {
    let pg = PgCluster::shared();
    let seed = seed();
    eprintln!("seed {seed} (SNAPSHOT_SEED)");
    let ddl = "CREATE TABLE items (id bigint PRIMARY KEY, v int NOT NULL, note text NOT NULL);
               CREATE TABLE added (id int PRIMARY KEY, v text);
               CREATE TABLE added_keyless (n int, v text);
               CREATE TABLE private (id int PRIMARY KEY);";
    let (master, c) = pg.fresh_db("resnap", ddl).await;
    let (replica, r) = pg.fresh_db("resnap_r", ddl).await;
    let rows = 20_000;
    c.batch_execute(&format!(
        "INSERT INTO items SELECT g, 0, E'x\\\\t\\t\\\\N\\n\\r\\\\' || g FROM generate_series(1, {rows}) g;
         INSERT INTO added SELECT g, md5(g::text) FROM generate_series(1, 5000) g;
         INSERT INTO added_keyless SELECT g, md5(g::text) FROM generate_series(1, 3000) g;"
    ))
    .await
    .unwrap();
    let applier = start_applier(&master, &replica);
    let capture = start_capture(
        &master,
        "  tables: [public.items]\n  snapshot_poll_interval: 1s\n  snapshot_batch_rows: 1000\n",
    );
    capture.wait_ready().await;
    wait_equal(&master, &replica, "items", Duration::from_secs(120)).await;
    // The snapshot filled the empty replica with COPY (its notes hold tabs, newlines,
    // backslashes and a literal \N, which arrived as they were); nothing fell back yet.
    let copies = |outcome: &str| {
        applier
            .metric(
                "pgferry_apply_copy_batches_total",
                &format!("outcome=\"{outcome}\""),
            )
            .unwrap_or(0.0)
    };
    assert!(copies("written") >= 1.0, "no batch was written with COPY");
    assert_eq!(copies("conflict") + copies("refused"), 0.0);

    // The replica loses rows (a restored backup, a mistaken delete); re-snapshot the table
    // while a writer keeps changing it.
    r.batch_execute("DELETE FROM items WHERE id % 3 = 0")
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(master.clone(), "items", rows, seed, stop.clone());
    let since: SystemTime = c.query_one("SELECT now()", &[]).await.unwrap().get(0);
    let out = request_snapshot(&capture, "public.items");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("requested a snapshot of public.items"),
        "{stdout}"
    );
    // More requests at once, from SQL (unqualified: public, and qualified), once the first
    // is planned: they run in full after it, which may already have passed rows they should
    // see (before, they were ignored while it ran), and once for all of them (before, once
    // for each).
    wait_for(
        "the requested snapshot's plan",
        Duration::from_secs(60),
        || async {
            let planned: i64 = c
                .query_one(
                    "SELECT count(*) FROM pgferry.snapshot_progress
                  WHERE table_name = 'items' AND started_at >= $1",
                    &[&since],
                )
                .await
                .unwrap()
                .get(0);
            (planned > 0).then_some(())
        },
    )
    .await;
    c.execute(
        "INSERT INTO pgferry.snapshot_requests (table_name)
         SELECT (ARRAY['items', 'public.items'])[g % 2 + 1] FROM generate_series(1, 8) g",
        &[],
    )
    .await
    .unwrap();
    // A table outside the publication is refused by name.
    let refused = request_snapshot(&capture, "public.added");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("public.added is not in publication"),
        "{stderr}"
    );
    // A table that does not exist is named as such (quoted parts read as SQL reads them).
    let missing = request_snapshot(&capture, r#""public"."No Such""#);
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success());
    assert!(
        stderr.contains(r#"table "public"."No Such" does not exist on the source"#),
        "{stderr}"
    );

    wait_for(
        "both re-snapshots to finish",
        Duration::from_secs(120),
        || async {
            let chunks = capture.metric("pgferry_snapshot_chunks_total", "table=\"public.items\"");
            (chunks.unwrap_or(0.0) >= 3.0 * (rows / 1000) as f64).then_some(())
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    wait_equal(&master, &replica, "items", Duration::from_secs(120)).await;
    wait_for(
        "every request to be planned",
        Duration::from_secs(60),
        || async {
            let pending: i64 = c
                .query_one("SELECT count(*) FROM pgferry.snapshot_requests", &[])
                .await
                .unwrap()
                .get(0);
            (pending == 0).then_some(())
        },
    )
    .await;
    wait_snapshot_done(
        &c,
        &format!("slot_{master}"),
        ("items", UNIX_EPOCH),
        Duration::from_secs(120),
        || capture.log(),
    )
    .await;
    let runs = capture
        .log()
        .lines()
        .filter(|l| l.contains("snapshot of table finished") && l.contains("table=public.items "))
        .count();
    assert_eq!(
        runs, 3,
        "the first snapshot, the one requested from the command line, and one for the SQL \
         requests made while it ran"
    );
    // Two thirds of the re-snapshot's rows were still there: COPY met them and those batches
    // went as upserts (the replica is exact all the same).
    assert!(copies("conflict") >= 1.0, "COPY never met an existing row");
    assert_eq!(copies("refused"), 0.0);

    // Tables added to the publication: snapshotted by themselves, with rows written meanwhile.
    c.batch_execute(&format!(
        "ALTER PUBLICATION pub_{master} ADD TABLE added, added_keyless;
         INSERT INTO added_keyless SELECT g, 'late' FROM generate_series(3001, 3100) g;
         UPDATE added SET v = 'changed' WHERE id % 7 = 0;"
    ))
    .await
    .unwrap();
    wait_equal(&master, &replica, "added", Duration::from_secs(120)).await;
    wait_equal(&master, &replica, "added_keyless", Duration::from_secs(120)).await;
    assert!(capture
        .log()
        .contains("table added to the publication; snapshotting it"));

    // A schema change of a table outside the publication stays on the source: a later change
    // of a published table arrives, the private table's new column does not.
    c.batch_execute(
        "ALTER TABLE private ADD COLUMN secret text; UPDATE items SET v = -1 WHERE id = 1",
    )
    .await
    .unwrap();
    wait_equal(&master, &replica, "items", Duration::from_secs(60)).await;
    let private_columns: Vec<String> = r
        .query("SELECT attname::text FROM pg_attribute WHERE attrelid = 'private'::regclass AND attnum > 0 AND NOT attisdropped", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        private_columns,
        ["id"],
        "a table outside the publication was altered on the replica"
    );

    // A request from SQL, for a replica that lost rows of the added table.
    r.batch_execute("DELETE FROM added WHERE id < 100")
        .await
        .unwrap();
    c.batch_execute("INSERT INTO pgferry.snapshot_requests (table_name) VALUES ('public.added')")
        .await
        .unwrap();
    wait_equal(&master, &replica, "added", Duration::from_secs(120)).await;
    assert_eq!(
        r.query_one("SELECT count(*) FROM added_keyless", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        3100,
        "the table without a key holds each row once"
    );

    // A renamed table keeps its snapshot record: it is not snapshotted again as new.
    c.batch_execute("ALTER TABLE added RENAME TO added_renamed")
        .await
        .unwrap();
    capture
        .wait_log(
            "table renamed; its snapshot record follows it",
            Duration::from_secs(60),
        )
        .await;
    // A table taken out of the publication, changed meanwhile (nothing of which is
    // streamed) and published again is snapshotted again: the replica ends exact, the rows
    // deleted meanwhile pruned. Before, its record kept it from being seen as new.
    c.batch_execute(&format!(
        "ALTER PUBLICATION pub_{master} DROP TABLE added_renamed"
    ))
    .await
    .unwrap();
    capture
        .wait_log(
            "table no longer published; its snapshot record is forgotten",
            Duration::from_secs(60),
        )
        .await;
    c.batch_execute(&format!(
        "DELETE FROM added_renamed WHERE id % 10 = 0;
         UPDATE added_renamed SET v = 'while out' WHERE id % 10 = 1;
         INSERT INTO added_renamed SELECT g, 'new' FROM generate_series(20001, 20100) g;
         ALTER PUBLICATION pub_{master} ADD TABLE added_renamed"
    ))
    .await
    .unwrap();
    wait_equal(&master, &replica, "added_renamed", Duration::from_secs(120)).await;
    let log = capture.log();
    assert_eq!(
        log.matches("table added to the publication; snapshotting it")
            .count(),
        3,
        "added and added_keyless once, added_renamed once more when published again:\n{log}"
    );
    drop(applier);
}

/// A replica restored from an old backup holds rows the source deleted since, lacks rows and
/// has old values of others. A re-snapshot (`pgferry snapshot --table`, and requests from
/// SQL) makes it exact while a writer changes the source: each chunk's key range is pruned
/// of the rows the source does not have (before the first key, between keys, past the last),
/// with keys of one column, of two (an int and a timestamptz, compared as a row, declared in
/// another order than the columns on the source and in theirs on the replica), uuids and
/// text under the database's collation (the same on both ends here), over two readers' key
/// ranges and chunks of several items. Exactly the rows the replica had and the source did not
/// are pruned. A table keyed by an enum (ordered by its type, which a target may define
/// otherwise) is re-snapshotted by upserts only: the log says why, and nothing is deleted.
/// A table the source never had a row of is pruned to empty (its range once came without
/// its table's announcement: a dead letter, and nothing pruned).
#[tokio::test(flavor = "multi_thread")]
async fn a_resnapshot_makes_a_restored_replica_exact() {
    let pg = PgCluster::shared();
    let seed = seed();
    let mut rng = Rng::new(seed);
    let rows = rng.range(3_000, 8_000);
    let batch = rng.range(300, 1_500);
    // Notes of up to ~1 KiB: a chunk's rows take several items (256 KiB each).
    let width = rng.range(1, 32);
    let (gone, lost, stale) = (rng.range(2, 9), rng.range(2, 9), rng.range(2, 9));
    eprintln!(
        "seed {seed} (SNAPSHOT_SEED): {rows} rows, chunks of {batch}, notes of {width} × 32, \
         1 in {gone} gone, 1 in {lost} lost, 1 in {stale} stale"
    );
    let ddl = "CREATE TABLE items (id bigint PRIMARY KEY, v int NOT NULL, note text NOT NULL);
               CREATE TABLE pairs (a int, b timestamptz, v text, PRIMARY KEY (b, a));
               CREATE TABLE tokens (id uuid PRIMARY KEY, v int);
               CREATE TABLE named (k text PRIMARY KEY, v int);
               CREATE TYPE mood AS ENUM ('sad', 'ok', 'glad');
               CREATE TABLE moods (m mood, id int, v int, PRIMARY KEY (m, id));
               CREATE TABLE vacant (id int PRIMARY KEY, v int);";
    let (master, c) = pg.fresh_db("prune", ddl).await;
    // The replica declares pairs' key in its columns' order, the source in another.
    let replica_ddl = ddl.replace("PRIMARY KEY (b, a)", "PRIMARY KEY (a, b)");
    let (replica, r) = pg.fresh_db("prune_r", &replica_ddl).await;
    // Each table's rows, as (table, SELECT of row g, the rows gone from the source since the
    // backup, of row g).
    // (table, its key columns, the key of row g, the rest of row g, the rows gone from the
    // source since the backup, of row g).
    let generated = [
        (
            "items",
            "id",
            "g::bigint".to_owned(),
            format!("0, repeat(md5(g::text), {width})"),
            format!("g % {gone} = 1"),
        ),
        (
            "pairs",
            "a, b",
            "g % 50, timestamptz '2026-01-01 00:00+00' + g * interval '1 hour'".to_owned(),
            "md5(g::text)".to_owned(),
            format!("(g % 50) % {gone} = 1 AND md5(g::text) < '8'"),
        ),
        (
            "tokens",
            "id",
            "md5(g::text)::uuid".to_owned(),
            "g::int".to_owned(),
            format!("g % {gone} = 0"),
        ),
        (
            "named",
            "k",
            "(ARRAY['a b', 'Zé', 'q''uote', 'B', '', 'é'])[g % 6 + 1] || md5(g::text)".to_owned(),
            "g::int".to_owned(),
            format!("g % {gone} = 0"),
        ),
    ];
    let rows_of = |key: &str, rest: &str, filter: &str| {
        format!("SELECT {key}, {rest} FROM generate_series(1, {rows}) g WHERE {filter}")
    };
    for (table, _, key, rest, _) in &generated {
        c.batch_execute(&format!(
            "INSERT INTO {table} {}",
            rows_of(key, rest, "true")
        ))
        .await
        .unwrap();
    }
    // A key an enum orders (its order is the type's, which a target may define otherwise).
    c.batch_execute(
        "INSERT INTO moods SELECT (ARRAY['sad', 'ok', 'glad']::mood[])[g % 3 + 1], g, g
           FROM generate_series(1, 600) g",
    )
    .await
    .unwrap();
    let applier = start_applier(&master, &replica);
    let capture = start_capture(
        &master,
        &format!(
            "  snapshot_readers: 2\n  snapshot_batch_rows: {batch}\n  snapshot_poll_interval: 1s\n"
        ),
    );
    capture.wait_ready().await;
    for (table, columns, key, _, gone_rows) in &generated {
        wait_equal(&master, &replica, table, Duration::from_secs(120)).await;
        // Rows deleted on the source since the backup was taken.
        c.batch_execute(&format!(
            "DELETE FROM {table} WHERE ({columns}) IN \
             (SELECT {key} FROM generate_series(1, {rows}) g WHERE {gone_rows})"
        ))
        .await
        .unwrap();
    }
    for (table, ..) in &generated {
        wait_equal(&master, &replica, table, Duration::from_secs(60)).await;
    }
    // The replica restored from the backup: the deleted rows are back, some rows are lost,
    // some hold old values, and rows the source never had sit before its first key and past
    // its last (and anywhere, for uuids).
    r.batch_execute(&format!(
        "DELETE FROM items WHERE id % {lost} = 2;
         DELETE FROM pairs WHERE a % {lost} = 3;
         DELETE FROM tokens WHERE v % {lost} = 4;
         DELETE FROM named WHERE v % {lost} = 1;
         UPDATE items SET v = -5, note = 'stale' WHERE id % {stale} = 3;
         UPDATE pairs SET v = 'stale' WHERE a % {stale} = 4;
         UPDATE tokens SET v = -v WHERE v % {stale} = 5;
         UPDATE named SET v = -v WHERE v % {stale} = 2;"
    ))
    .await
    .unwrap();
    let mut extras = 0u64;
    for (table, _, key, rest, gone_rows) in &generated {
        extras += r
            .execute(
                &format!("INSERT INTO {table} {}", rows_of(key, rest, gone_rows)),
                &[],
            )
            .await
            .unwrap();
    }
    // A table the source never had a row of (so no change of it ever travelled): its
    // re-snapshot is one range without rows, which must still prune the replica's.
    extras += r
        .execute(
            "INSERT INTO vacant SELECT g, g FROM generate_series(1, 15) g",
            &[],
        )
        .await
        .unwrap();
    for outside in [
        "INSERT INTO items SELECT -g, 7, 'never' FROM generate_series(1, 20) g",
        "INSERT INTO items SELECT 1000000000 + g, 7, 'never' FROM generate_series(1, 20) g",
        "INSERT INTO pairs SELECT -1, now() + g * interval '1 s', 'never' FROM generate_series(1, 20) g",
        "INSERT INTO pairs SELECT 49, timestamptz '2026-01-01 00:00+00' + g * interval '1 minute', 'never' FROM generate_series(1, 20) g",
        "INSERT INTO pairs SELECT 1000, now(), 'never'",
        "INSERT INTO tokens SELECT gen_random_uuid(), -g FROM generate_series(1, 30) g",
        "INSERT INTO named SELECT md5(g::text) || ' never', -g FROM generate_series(1, 30) g",
        "INSERT INTO named VALUES ('', -1), ('~~~', -2), (' ', -3)",
    ] {
        extras += r.execute(outside, &[]).await.unwrap();
    }

    // Re-snapshot all three while a writer changes items (inserting past the source's last
    // key only, so that no extra row of the replica is written by the stream).
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(master.clone(), "items", rows, seed, stop.clone());
    let since: SystemTime = c.query_one("SELECT now()", &[]).await.unwrap().get(0);
    let out = request_snapshot(&capture, "public.items");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The enum-keyed table's replica holds rows the source never had.
    wait_equal(&master, &replica, "moods", Duration::from_secs(60)).await;
    let enum_extras = r
        .execute(
            "INSERT INTO moods SELECT 'ok', -g, 0 FROM generate_series(1, 10) g",
            &[],
        )
        .await
        .unwrap();
    r.batch_execute("UPDATE moods SET v = -v WHERE id % 7 = 0")
        .await
        .unwrap();
    c.batch_execute(
        "INSERT INTO pgferry.snapshot_requests (table_name)
           VALUES ('public.pairs'), ('tokens'), ('named'), ('moods'), ('vacant')",
    )
    .await
    .unwrap();
    let slot = format!("slot_{master}");
    for (table, ..) in &generated {
        wait_snapshot_done(
            &c,
            &slot,
            (table, since),
            Duration::from_secs(180),
            String::new,
        )
        .await;
    }
    wait_snapshot_done(
        &c,
        &slot,
        ("vacant", since),
        Duration::from_secs(120),
        String::new,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    wait_equal(&master, &replica, "vacant", Duration::from_secs(60)).await;
    let letters: i64 = r
        .query_one("SELECT count(*) FROM pgferry.dead_letters", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        letters, 0,
        "no dead letter (an empty table's range was one)"
    );
    for (table, ..) in &generated {
        wait_equal(&master, &replica, table, Duration::from_secs(120)).await;
    }
    let pruned = applier
        .metric("pgferry_apply_rows_pruned_total", "")
        .unwrap_or(0.0);
    assert_eq!(
        pruned, extras as f64,
        "the rows pruned are the replica's rows the source does not have"
    );
    assert_eq!(
        capture.metric("pgferry_snapshot_ranges_unpruned_total", ""),
        None,
        "every range was pruned"
    );
    // The enum-keyed table is re-snapshotted by upserts only, and says so: its rows are the
    // source's (stale values fixed) plus the rows the source never had, none of the source's
    // deleted.
    wait_snapshot_done(
        &c,
        &slot,
        ("moods", since),
        Duration::from_secs(120),
        String::new,
    )
    .await;
    assert!(
        capture
            .log()
            .contains("does not delete target rows the source no longer has"),
        "the log says why the enum-keyed table is not pruned"
    );
    let m = PgCluster::shared().client(&master).await;
    let digest = |filter: &'static str| {
        format!(
            "SELECT count(*), coalesce(md5(string_agg(t::text, ',' ORDER BY t::text)), '')
               FROM moods t WHERE {filter}"
        )
    };
    wait_for(
        "moods' source rows on the replica",
        Duration::from_secs(60),
        || async {
            let want = m.query_one(&digest("true"), &[]).await.unwrap();
            let here = r.query_one(&digest("id > 0"), &[]).await.unwrap();
            let pair = |row: &tokio_postgres::Row| (row.get::<_, i64>(0), row.get::<_, String>(1));
            (pair(&want) == pair(&here)).then_some(())
        },
    )
    .await;
    let kept: i64 = r
        .query_one("SELECT count(*) FROM moods WHERE id < 0", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        kept as u64, enum_extras,
        "an upsert-only re-snapshot deletes nothing"
    );
    drop(applier);
}

/// A publication with `publish_via_partition_root` lists partitioned tables instead of their
/// partitions, and their changes stream under the partitioned table's name. Their snapshot
/// reads through the partitioned table (rows are only in the partitions): a keyed one split
/// into key ranges across partitions, with a writer changing rows throughout, and one without
/// a key by page ranges of every partition. Both arrive exact.
#[tokio::test(flavor = "multi_thread")]
async fn partitioned_tables_published_through_their_root() {
    let pg = PgCluster::shared();
    let seed = seed();
    eprintln!("seed {seed} (SNAPSHOT_SEED)");
    let ddl = "CREATE TABLE parts (id bigint PRIMARY KEY, v int NOT NULL, note text NOT NULL)
                 PARTITION BY RANGE (id);
               CREATE TABLE parts_1 PARTITION OF parts FOR VALUES FROM (MINVALUE) TO (10000);
               CREATE TABLE parts_2 PARTITION OF parts FOR VALUES FROM (10000) TO (20000);
               CREATE TABLE parts_3 PARTITION OF parts FOR VALUES FROM (20000) TO (MAXVALUE);
               CREATE TABLE logs (n int NOT NULL, v text) PARTITION BY RANGE (n);
               CREATE TABLE logs_1 PARTITION OF logs FOR VALUES FROM (MINVALUE) TO (1500);
               CREATE TABLE logs_2 PARTITION OF logs FOR VALUES FROM (1500) TO (MAXVALUE);";
    let (master, c) = pg.fresh_db("parts", ddl).await;
    let (replica, r) = pg.fresh_db("parts_r", ddl).await;
    let rows = 30_000;
    c.batch_execute(&format!(
        "INSERT INTO parts SELECT g, g % 97, md5(g::text) FROM generate_series(1, {rows}) g;
         INSERT INTO logs SELECT g, md5(g::text) FROM generate_series(1, 3000) g;
         -- As autovacuum does: the partitions, never the partitioned tables (their own
         -- reltuples stays unknown).
         ANALYZE parts_1, parts_2, parts_3, logs_1, logs_2;
         CREATE PUBLICATION pub_{master} FOR TABLE parts, logs
           WITH (publish_via_partition_root = true);"
    ))
    .await
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(master.clone(), "parts", rows, seed, stop.clone());
    let applier = start_applier(&master, &replica);
    let capture = start_capture(
        &master,
        "  snapshot_batch_rows: 1000\n  snapshot_readers: 3\n",
    );
    capture.wait_ready().await;
    stop.store(true, Ordering::Relaxed);
    let changes = writer.await.unwrap();
    eprintln!("{changes} changes written during the snapshot");
    // Streamed after the snapshot, under the partitioned table's name.
    c.batch_execute("INSERT INTO logs SELECT g, 'late' FROM generate_series(3001, 3100) g")
        .await
        .unwrap();
    wait_equal(&master, &replica, "parts", Duration::from_secs(120)).await;
    wait_equal(&master, &replica, "logs", Duration::from_secs(120)).await;
    // The keyed table went in several key ranges (3 readers), one chunk per 1,000 rows.
    let chunks = capture
        .metric("pgferry_snapshot_chunks_total", "table=\"public.parts\"")
        .unwrap_or(0.0);
    assert!(chunks >= 30.0, "{chunks} chunks for {rows} rows");
    // The row estimate (progress, ETA, the split) sums the partitions' statistics.
    let estimated = capture
        .metric("pgferry_snapshot_rows_estimated", "table=\"public.parts\"")
        .unwrap_or(0.0);
    assert!(
        estimated >= 0.9 * rows as f64,
        "estimated {estimated} rows of {rows}"
    );
    // A replica that holds rows the source does not, in every partition (rows it deleted,
    // as a restored backup still has them, and rows before and past its keys): a
    // re-snapshot through the partitioned table deletes them there.
    c.batch_execute("DELETE FROM parts WHERE id % 1000 = 7")
        .await
        .unwrap();
    wait_equal(&master, &replica, "parts", Duration::from_secs(60)).await;
    let extras = r
        .execute(
            "INSERT INTO parts SELECT g, -1, 'never' FROM generate_series(-5, 0) g
             UNION ALL SELECT 100000 + g, -1, 'never' FROM generate_series(1, 5) g
             UNION ALL SELECT g, -1, 'never' FROM generate_series(1, 30000) g WHERE g % 1000 = 7",
            &[],
        )
        .await
        .unwrap();
    let since: SystemTime = c.query_one("SELECT now()", &[]).await.unwrap().get(0);
    assert!(request_snapshot(&capture, "public.parts").status.success());
    let slot = format!("slot_{master}");
    wait_snapshot_done(
        &c,
        &slot,
        ("parts", since),
        Duration::from_secs(120),
        String::new,
    )
    .await;
    wait_equal(&master, &replica, "parts", Duration::from_secs(120)).await;
    assert_eq!(
        applier.metric("pgferry_apply_rows_pruned_total", ""),
        Some(extras as f64)
    );
    drop(applier);
}

/// The chunked snapshot over keys of every common shape, each table read in many small chunks
/// by two readers (so in two key ranges, split at sampled keys), while a writer updates,
/// deletes and inserts random rows of all of them, and also changes key values (a row moves
/// from a range not yet read to one already read, and back): a composite key under quoted
/// mixed-case schema, table and column names; text keys with spaces, quotes, backslashes,
/// accents and mixed case (ordered by the column's collation); uuid; timestamptz with numeric;
/// bytea; a key declared in another order than its columns (`tenant, day, PRIMARY KEY (day,
/// tenant)`: before, each chunk's last key was taken in the columns' order, and the next chunk
/// skipped rows); tables keyed by `REPLICA IDENTITY USING INDEX`, one without a primary key
/// and one with (before, the applier keyed them by the primary key: every delete, and every
/// update of the one without, was a dead letter, and a change of the primary key left the old
/// row). Every table ends on the replica exactly as on the master. Seeded (SNAPSHOT_SEED,
/// printed).
#[tokio::test(flavor = "multi_thread")]
async fn every_key_shape_snapshots_exactly_under_writes() {
    let pg = PgCluster::shared();
    let seed = seed();
    let rows: i64 = 20_000;
    eprintln!("seed {seed} (SNAPSHOT_SEED), {rows} rows a table");
    // (table, DDL of its key columns, key of row g, key change of a row)
    let tables: [(&str, &str, &str, &str); 8] = [
        (
            r#""Mixed Case"."Order Lines""#,
            r#""Order Id" int, "line No" smallint, PRIMARY KEY ("Order Id", "line No")"#,
            r#"g / 7, (g % 7)::smallint"#,
            r#""line No" = "line No" + 100"#,
        ),
        (
            "by_text",
            "k text PRIMARY KEY",
            r#"(ARRAY['a b', 'Zé', 'q''uote', 'back\slash', 'A', 'z', '', '"'])[g % 8 + 1] || md5(g::text)"#,
            "k = k || '~'",
        ),
        (
            "by_uuid",
            "id uuid PRIMARY KEY",
            "md5(g::text)::uuid",
            "id = gen_random_uuid()",
        ),
        (
            "by_time",
            "at timestamptz, amount numeric(12,3), PRIMARY KEY (at, amount)",
            "timestamptz '2026-01-01 00:00:00+00' + (g / 3) * interval '1 minute', (g % 3) / 8.0",
            "at = at + interval '10 years'",
        ),
        (
            "by_bytes",
            "b bytea PRIMARY KEY",
            "decode(md5(g::text), 'hex') || '\\x00'::bytea",
            "b = b || '\\xff'::bytea",
        ),
        (
            "by_day_then_tenant",
            "tenant int, day date, PRIMARY KEY (day, tenant)",
            "g % 13, date '2026-01-01' + g / 13",
            "tenant = tenant + 1000",
        ),
        // Keyed by REPLICA IDENTITY USING INDEX (below), without a primary key.
        (
            "by_identity",
            "u int NOT NULL, w text NOT NULL, CONSTRAINT by_identity_wu UNIQUE (w, u)",
            "g % 11, 'w' || (g / 11)",
            "w = w || '~'",
        ),
        // A primary key, but keyed by an identity index: a delete carries only `w`, and a
        // change of the primary key none of the old one.
        (
            "pk_and_identity",
            "id int PRIMARY KEY, w text NOT NULL, CONSTRAINT pk_and_identity_w UNIQUE (w)",
            "g, 'w' || g",
            "id = id + 1000000",
        ),
    ];
    let mut ddl = String::from(r#"CREATE SCHEMA "Mixed Case";"#);
    for (table, key, _, _) in &tables {
        ddl += &format!("CREATE TABLE {table} ({key}, n int NOT NULL, v text);");
    }
    ddl += "ALTER TABLE by_identity REPLICA IDENTITY USING INDEX by_identity_wu;
            ALTER TABLE pk_and_identity REPLICA IDENTITY USING INDEX pk_and_identity_w;";
    let (master, c) = pg.fresh_db("keyshapes", &ddl).await;
    let (replica, _) = pg.fresh_db("keyshapes_r", &ddl).await;
    for (table, _, key_of, _) in &tables {
        c.batch_execute(&format!(
            "INSERT INTO {table} SELECT {key_of}, g, 'v' || g FROM generate_series(1, {rows}) g;
             CREATE INDEX ON {table} (n); ANALYZE {table}"
        ))
        .await
        .unwrap();
    }
    let slot = format!("slot_{master}");
    let applier = start_applier(&master, &replica);
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, master, committed) = (stop.clone(), master.clone(), committed.clone());
        let tables = tables.map(|(t, _, _, change)| (t, change));
        tokio::spawn(async move {
            let c = PgCluster::shared().client(&master).await;
            let mut rng = Rng::new(seed);
            let mut next = rows;
            let mut changes = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let (table, key_change) = tables[rng.range(0, tables.len() as i64) as usize];
                let n = rng.range(1, rows);
                let sql = match rng.range(0, 10) {
                    0..=3 => format!("UPDATE {table} SET v = v || 'u' WHERE n = {n}"),
                    4 | 5 => format!("UPDATE {table} SET {key_change}, v = v || 'k' WHERE n = {n}"),
                    6 | 7 => format!("DELETE FROM {table} WHERE n = {n}"),
                    _ => {
                        // A copy of a row under a new key (moved by the key change), unless
                        // that key is taken.
                        next += 1;
                        format!(
                            "INSERT INTO {table} SELECT * FROM {table} WHERE n = {n} LIMIT 1 \
                             ON CONFLICT DO NOTHING; UPDATE {table} SET {key_change}, n = {next} \
                             WHERE n = {n} AND ctid = (SELECT max(ctid) FROM {table} WHERE n = {n})"
                        )
                    }
                };
                // A key change may meet a key that exists (a row moved there before).
                match c.batch_execute(&sql).await {
                    Ok(()) => {
                        changes += 1;
                        committed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e)
                        if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                    }
                    Err(e) => panic!("{sql}: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            changes
        })
    };
    // The writer is at work before the snapshot begins, and goes on after it ends.
    wait_for("the writer", Duration::from_secs(30), || async {
        (committed.load(Ordering::Relaxed) > 20).then_some(())
    })
    .await;
    let capture = start_capture(
        &master,
        "  snapshot_readers: 2\n  snapshot_batch_rows: 100\n",
    );
    let before = committed.load(Ordering::Relaxed);
    for (table, _, _, _) in &tables {
        // pgferry.snapshot_progress names the table without its schema.
        let name = table.rsplit('.').next().unwrap().replace('"', "");
        wait_snapshot_done(
            &c,
            &slot,
            (&name, UNIX_EPOCH),
            Duration::from_secs(300),
            String::new,
        )
        .await;
    }
    let during = committed.load(Ordering::Relaxed) - before;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let changes = writer.await.unwrap();
    assert!(
        during > 50,
        "the writer must run during the snapshot ({during} changes)"
    );
    for (table, _, _, _) in &tables {
        wait_equal(&master, &replica, table, Duration::from_secs(300)).await;
    }
    let letters: Vec<String> = pg
        .client(&replica)
        .await
        .query(
            "SELECT table_name || ': ' || error FROM pgferry.dead_letters",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        letters.is_empty(),
        "nothing may be dead-lettered: {letters:?}"
    );
    // Nothing was refused either: no statement failed and was replayed change by change
    // (snapshot rows and changes of one key, spelt differently, once met in one batch).
    let log = applier.log();
    assert!(
        !log.contains("replaying the batch change by change") && !log.contains("stage stopped"),
        "the applier met an error:\n{log}"
    );
    let ranges = c
        .query_one(
            "SELECT count(*) FROM pgferry.snapshot_progress WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert!(
        ranges > tables.len() as i64,
        "two readers must split some table into key ranges ({ranges} ranges)"
    );
    eprintln!("{changes} writer changes ({during} during the snapshot), {ranges} key ranges");
    drop((capture, applier));
}

/// Schema changes in the middle of a chunked snapshot: while two readers work through a table
/// in small chunks and a writer updates, deletes and inserts rows, the master adds a column
/// with a default and fills some of it, renames a column, widens one's type and writes values
/// only the new type holds, drops a column, and changes the key so that the planned ranges
/// mean nothing any more (one of, at random: a primary key of more columns, one of another
/// column as many, the key column given a type that sorts otherwise). The snapshot finishes,
/// nothing is dead-lettered, and the replica ends with the master's columns and rows. Before,
/// a key of as many columns was not seen as another: the next chunks compared the old last
/// key under the new order (`'15000'` after `'100000'` as text) and the snapshot ended with
/// rows never read. Seeded (SNAPSHOT_SEED, printed).
#[tokio::test(flavor = "multi_thread")]
async fn schema_changes_during_a_chunked_snapshot() {
    let pg = PgCluster::shared();
    let seed = seed();
    let rows: i64 = 60_000;
    eprintln!("seed {seed} (SNAPSHOT_SEED), {rows} rows");
    // `alt` runs against `id` (a key on it orders the rows the other way round).
    let ddl = format!(
        "CREATE TABLE items (id bigint PRIMARY KEY, v int NOT NULL, \
         note text NOT NULL DEFAULT 'new', gone text, \
         alt bigint NOT NULL GENERATED BY DEFAULT AS IDENTITY (START WITH {}))",
        rows * 10
    );
    let (master, c) = pg.fresh_db("ddlsnap", &ddl).await;
    let (replica, r) = pg.fresh_db("ddlsnap_r", &ddl).await;
    c.batch_execute(&format!(
        "INSERT INTO items SELECT g, g % 1000, md5(g::text), 'x' || g, {rows} + 1 - g
           FROM generate_series(1, {rows}) g;
         ANALYZE items"
    ))
    .await
    .unwrap();
    let slot = format!("slot_{master}");
    let applier = start_applier(&master, &replica);
    let stop = Arc::new(AtomicBool::new(false));
    let capture = start_capture(
        &master,
        "  snapshot_readers: 2\n  snapshot_batch_rows: 200\n",
    );
    // The writer names only the columns no step changes but the type of `v` (and of `id`,
    // whose values it quotes, read as either type).
    let writer = spawn_statements(
        master.clone(),
        seed ^ 1,
        stop.clone(),
        (rows, rows),
        |id, next| match id {
            Some((id, Write::Update)) => format!("UPDATE items SET v = v + 1 WHERE id = '{id}'"),
            Some((id, Write::Delete)) => format!("DELETE FROM items WHERE id = '{id}'"),
            None => format!("INSERT INTO items (id, v) VALUES ('{next}', 1)"),
        },
    );
    let mut rng = Rng::new(seed);
    let key_change = [
        "DROP CONSTRAINT items_pkey, ADD PRIMARY KEY (id, extra)",
        "DROP CONSTRAINT items_pkey, ADD PRIMARY KEY (alt)",
        "ALTER COLUMN id TYPE text",
    ][rng.range(0, 3) as usize];
    // Each statement once the snapshot is further along, all before it ends.
    let steps = [
        "ALTER TABLE items ADD COLUMN extra int NOT NULL DEFAULT 7".to_owned(),
        format!(
            "UPDATE items SET extra = id % 13 WHERE id % {} = 0",
            rng.range(5, 20)
        ),
        "ALTER TABLE items RENAME COLUMN note TO remark".to_owned(),
        "ALTER TABLE items ALTER COLUMN v TYPE bigint".to_owned(),
        format!(
            "UPDATE items SET v = v + 5000000000 WHERE id % {} = 1",
            rng.range(5, 20)
        ),
        "ALTER TABLE items DROP COLUMN gone".to_owned(),
        // Another key: the ranges planned by the old one mean nothing any more, and the
        // table is planned again.
        format!("ALTER TABLE items {key_change}"),
    ];
    for (i, step) in steps.iter().enumerate() {
        let at = rows * (i as i64 + 1) / (steps.len() as i64 + 3);
        let done = wait_for(
            "the snapshot to move on",
            Duration::from_secs(300),
            || async {
                let (done, _, _) = progress(&c, &slot, "items", UNIX_EPOCH).await;
                (done >= at).then_some(done)
            },
        )
        .await;
        assert!(
            done < rows * 95 / 100,
            "the snapshot ended before step {i} ({done} rows done)"
        );
        eprintln!("at {done} snapshot rows: {step}");
        c.batch_execute(step).await.unwrap();
    }
    wait_snapshot_done(
        &c,
        &slot,
        ("items", UNIX_EPOCH),
        Duration::from_secs(300),
        || capture.log(),
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let changes = writer.await.unwrap();
    eprintln!("{changes} writer changes");
    wait_equal(&master, &replica, "items", Duration::from_secs(300)).await;
    assert_eq!(item_columns(&r).await, item_columns(&c).await);
    let letters: i64 = r
        .query_one("SELECT count(*) FROM pgferry.dead_letters", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        letters,
        0,
        "nothing may be dead-lettered\n{}",
        applier.log()
    );
}

/// `items`' columns and their types, in order.
async fn item_columns(c: &tokio_postgres::Client) -> String {
    c.query_one(
        "SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod), ', ' ORDER BY attnum)
           FROM pg_attribute WHERE attrelid = 'items'::regclass AND attnum > 0 AND NOT attisdropped",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Unchanged TOAST values during a chunked snapshot: a writer updates only the small columns
/// of rows whose big column is TOASTed, so the stream's new images leave the big value out;
/// by plain updates, upserts (`ON CONFLICT DO UPDATE`) and updates of rows it locked first,
/// whose new versions keep their writer's lock (xmax = xmin: before, such rows were taken
/// for versions hidden from the chunk's `SELECT` and never reached the replica).
/// Such an update cannot create a row the target does not hold yet, so when it drops a row
/// from a chunk the row goes out as the window's newest image completed with the chunk's big
/// value (no change in the window could alter it), or is read again by key. Rows that have not
/// reached the replica yet are updated throughout, from before to after the snapshot; the
/// replica ends exact. Seeded (SNAPSHOT_SEED, printed).
#[tokio::test(flavor = "multi_thread")]
async fn unchanged_toast_during_a_snapshot_is_completed_from_the_chunk() {
    let pg = PgCluster::shared();
    let seed = seed();
    let rows: i64 = 4000;
    eprintln!("seed {seed} (SNAPSHOT_SEED), {rows} rows");
    let ddl = "CREATE TABLE docs (id int PRIMARY KEY, n int NOT NULL, body text NOT NULL);
               ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL";
    let (master, c) = pg.fresh_db("toastsnap", ddl).await;
    let (replica, r) = pg.fresh_db("toastsnap_r", ddl).await;
    // About 4 KB a row, stored out of line uncompressed.
    c.batch_execute(&format!(
        "INSERT INTO docs SELECT g, 0, repeat(md5(g::text), 128) FROM generate_series(1, {rows}) g;
         ANALYZE docs"
    ))
    .await
    .unwrap();
    let slot = format!("slot_{master}");
    let applier = start_applier(&master, &replica);
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, master, committed) = (stop.clone(), master.clone(), committed.clone());
        tokio::spawn(async move {
            let c = PgCluster::shared().client(&master).await;
            let mut rng = Rng::new(seed);
            while !stop.load(Ordering::Relaxed) {
                // Many rows at a time, spread over the table: some are in a chunk's window.
                // A plain update, an upsert, or an update of rows the transaction locked
                // first (the last two leave the new versions locked by their writer).
                let m = rng.range(20, 60);
                let at = rng.range(0, m);
                let rows = format!("id % {m} = {at}");
                let write = match rng.range(0, 3) {
                    0 => format!("UPDATE docs SET n = n + 1 WHERE {rows}"),
                    1 => format!(
                        "INSERT INTO docs SELECT id, 0, 'x' FROM docs WHERE {rows}
                             ON CONFLICT (id) DO UPDATE SET n = docs.n + 1"
                    ),
                    _ => format!(
                        "BEGIN; SELECT id FROM docs WHERE {rows} FOR UPDATE;
                         UPDATE docs SET n = n + 1 WHERE {rows}; COMMIT"
                    ),
                };
                c.batch_execute(&write).await.unwrap();
                committed.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    wait_for("the writer", Duration::from_secs(30), || async {
        (committed.load(Ordering::Relaxed) > 20).then_some(())
    })
    .await;
    let capture = start_capture(
        &master,
        "  snapshot_readers: 2\n  snapshot_batch_rows: 50\n",
    );
    let before = committed.load(Ordering::Relaxed);
    wait_snapshot_done(
        &c,
        &slot,
        ("docs", UNIX_EPOCH),
        Duration::from_secs(300),
        String::new,
    )
    .await;
    let during = committed.load(Ordering::Relaxed) - before;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    assert!(
        during > 50,
        "the writer must run during the snapshot ({during} updates)"
    );
    wait_equal(&master, &replica, "docs", Duration::from_secs(300)).await;
    // The rows dropped for an update without the TOASTed value were read again.
    let reconciled = capture
        .metric("pgferry_snapshot_rows_reconciled_total", "")
        .unwrap_or(0.0);
    let read = capture
        .metric("pgferry_snapshot_rows_total", "")
        .unwrap_or(0.0);
    eprintln!(
        "{during} updates during the snapshot; {read} snapshot rows published, {reconciled} \
         left out for newer changes"
    );
    // Rows met updates in their chunk's window: the updates left the TOASTed value out, so
    // such a row went out completed with the chunk's value, or was read again by key.
    let log = capture.log();
    let completed: usize = log
        .lines()
        .filter(|l| l.contains("completed with the chunk's"))
        .filter_map(|l| {
            l.split("rows=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum();
    let rereads = log
        .lines()
        .filter(|l| l.contains("snapshot chunk read") && l.contains(r#"WHERE ("id") IN ("#))
        .count();
    eprintln!("{completed} rows completed from their chunk, {rereads} re-reads");
    assert!(
        completed > 0,
        "no chunk row was completed with its TOASTed value"
    );
    let letters: i64 = r
        .query_one("SELECT count(*) FROM pgferry.dead_letters", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        letters,
        0,
        "nothing may be dead-lettered\n{}",
        applier.log()
    );
}

/// Rows of random widths (3 KB to about 500 KB of text and bytea each, compressible, so
/// their stored size is far below what they read as) snapshotted with `snapshot_chunk_bytes`
/// at 1 MiB while a writer updates them: every chunk the log shows stays within the bound
/// plus one row (the first chunk of a table is bounded too: before, it read
/// `snapshot_batch_rows` rows whatever their size, the whole table here), and the replica
/// ends exact.
#[tokio::test(flavor = "multi_thread")]
async fn wide_rows_keep_chunks_within_snapshot_chunk_bytes() {
    const BOUND: u64 = 1 << 20;
    let pg = PgCluster::shared();
    let seed = seed();
    eprintln!("seed {seed} (SNAPSHOT_SEED)");
    let mut rng = Rng::new(seed);
    let ddl = "CREATE TABLE wide (id int PRIMARY KEY, n int NOT NULL, body text, blob bytea)";
    let (master, c) = pg.fresh_db("widesnap", ddl).await;
    let (replica, _r) = pg.fresh_db("widesnap_r", ddl).await;
    let rows = 120;
    for id in 1..=rows {
        // md5 text repeated: 32 characters a step, bytea half as many bytes.
        let (text_steps, blob_steps) = (rng.range(100, 10_000), rng.range(0, 4_000));
        c.batch_execute(&format!(
            "INSERT INTO wide VALUES ({id}, 0, repeat(md5('{id}'), {text_steps}),
                                     decode(repeat(md5('b{id}'), {blob_steps}), 'hex'))"
        ))
        .await
        .unwrap();
    }
    c.batch_execute("ANALYZE wide").await.unwrap();
    // The widest row as COPY reads it: the text, and the bytea in hex.
    let widest: i64 = c
        .query_one(
            "SELECT max(octet_length(body) + 2 * coalesce(octet_length(blob), 0) + 64)::int8 FROM wide",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let slot = format!("slot_{master}");
    let applier = start_applier(&master, &replica);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, master) = (stop.clone(), master.clone());
        tokio::spawn(async move {
            let c = PgCluster::shared().client(&master).await;
            let mut rng = Rng::new(seed ^ 1);
            while !stop.load(Ordering::Relaxed) {
                let id = rng.range(1, rows + 1);
                let write = if rng.chance(0.3) {
                    format!("UPDATE wide SET body = md5(body), n = n + 1 WHERE id = {id}")
                } else {
                    format!("UPDATE wide SET n = n + 1 WHERE id = {id}")
                };
                c.batch_execute(&write).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let capture = start_capture(
        &master,
        &format!("  snapshot_readers: 2\n  snapshot_chunk_bytes: {BOUND}\n"),
    );
    wait_snapshot_done(
        &c,
        &slot,
        ("wide", UNIX_EPOCH),
        Duration::from_secs(300),
        || capture.log(),
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    wait_equal(&master, &replica, "wide", Duration::from_secs(300)).await;
    let log = capture.log();
    let chunks: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("snapshot chunk read") && l.contains("table=public.wide"))
        .filter_map(|l| {
            let bytes = l.split(" bytes=").nth(1)?;
            bytes.split(' ').next()?.parse().ok()
        })
        .collect();
    eprintln!(
        "{} chunks, bytes {chunks:?}; widest row {widest}",
        chunks.len()
    );
    assert!(!chunks.is_empty(), "no chunk of public.wide in the log");
    let over: Vec<&u64> = chunks
        .iter()
        .filter(|&&b| b > BOUND + widest as u64)
        .collect();
    assert!(
        over.is_empty(),
        "chunks over {BOUND} bytes plus the widest row ({widest}): {over:?}"
    );
    drop(applier);
}

/// A table without a key is snapshotted by ctid pages. A rewrite while it runs (`VACUUM
/// FULL`, `CLUSTER`, a type change) moves rows between pages, some into pages already read:
/// the snapshot starts over, and the replica ends with exactly the master's rows, although a
/// writer inserted, updated (a third of the updates to the same values) and deleted distinct
/// rows throughout, and nothing is dead-lettered. Before, the rows moved into pages already
/// read never reached the replica, in silence; and an update that changed no value was
/// dead-lettered ("the target table has no primary key"). Random rewrite, rows removed before
/// it, and moment.
#[tokio::test(flavor = "multi_thread")]
async fn keyless_tables_rewritten_during_their_snapshot_stay_exact() {
    let pg = PgCluster::shared();
    let seed = seed();
    eprintln!("seed {seed} (SNAPSHOT_SEED)");
    let mut rng = Rng::new(seed);
    let ddl = "CREATE TABLE kl (a int, b text); ALTER TABLE kl REPLICA IDENTITY FULL; \
               CREATE INDEX kl_a ON kl (a)";
    let (master, c) = pg.fresh_db("klrewrite", ddl).await;
    let (replica, r) = pg.fresh_db("klrewrite_r", ddl).await;
    let rows = 60_000;
    // In random order, so that CLUSTER moves every row.
    c.batch_execute(&format!(
        "INSERT INTO kl SELECT g, md5(g::text) FROM generate_series(1, {rows}) g \
         ORDER BY md5(g::text || '{seed}'); ANALYZE kl"
    ))
    .await
    .unwrap();
    let slot = format!("slot_{master}");
    let applier = start_applier(&master, &replica);
    let capture = start_capture(
        &master,
        "  snapshot_readers: 1\n  snapshot_batch_rows: 100\n",
    );
    let stop = Arc::new(AtomicBool::new(false));
    // Distinct rows: each statement names one `a`, new rows take new ones.
    let writer = spawn_statements(
        master.clone(),
        seed,
        stop.clone(),
        (rows, rows),
        |id, next| match id {
            // Some change no value: the chunk leaves the row to the change.
            Some((a, Write::Update)) if a % 3 == 0 => format!("UPDATE kl SET b = b WHERE a = {a}"),
            Some((a, Write::Update)) => format!("UPDATE kl SET b = b || 'u' WHERE a = {a}"),
            Some((a, Write::Delete)) => format!("DELETE FROM kl WHERE a = {a}"),
            None => format!("INSERT INTO kl VALUES ({next}, 'new')"),
        },
    );
    let at = rows * rng.range(5, 40) / 100;
    let read = wait_for("part of the snapshot", Duration::from_secs(120), || async {
        let (done, _, _) = progress(&c, &slot, "kl", UNIX_EPOCH).await;
        (done >= at).then_some(done)
    })
    .await;
    // Free pages at random, then rewrite the table: rows move down into pages already read.
    let (from, to) = (rng.range(1, rows / 2), rng.range(rows / 2, rows));
    let rewrite = match rng.range(0, 3) {
        0 => "VACUUM FULL kl",
        1 => "CLUSTER kl USING kl_a",
        _ => "ALTER TABLE kl ALTER COLUMN b TYPE varchar(100)",
    };
    eprintln!("{read} rows read; deleting a in [{from}, {to}), then {rewrite}");
    c.batch_execute(&format!("DELETE FROM kl WHERE a >= {from} AND a < {to}"))
        .await
        .unwrap();
    c.batch_execute(rewrite).await.unwrap();
    let (_, parts, done) = progress(&c, &slot, "kl", UNIX_EPOCH).await;
    assert!(
        parts > done,
        "the rewrite must land mid-snapshot ({done} of {parts} parts done)"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let changes = writer.await.unwrap();
    eprintln!("the writer changed {changes} rows");
    wait_snapshot_done(
        &c,
        &slot,
        ("kl", UNIX_EPOCH),
        Duration::from_secs(180),
        || capture.log(),
    )
    .await;
    wait_equal(&master, &replica, "kl", Duration::from_secs(120)).await;
    assert!(
        capture
            .log()
            .contains("its snapshot starts over from the first page"),
        "the snapshot must have started over after the rewrite"
    );
    assert_no_dead_letters(&r, &applier).await;
}

/// A table with generated columns (stored, computed by each target): rows a writer updates
/// while their chunk is in flight reach the replica. The reconciler leaves out a chunk row a
/// newer change went by, and the applier writes that change, which carries the whole row, as
/// an upsert. Before, the applier asked the change for the generated columns too, which no
/// change carries, so it updated a row the replica did not have yet, and the row was lost in
/// silence. Random generated column and writes.
#[tokio::test(flavor = "multi_thread")]
async fn generated_columns_do_not_lose_rows_updated_during_the_snapshot() {
    let pg = PgCluster::shared();
    let seed = seed();
    eprintln!("seed {seed} (SNAPSHOT_SEED)");
    let mut rng = Rng::new(seed);
    let generated = if rng.chance(0.5) {
        "twice int GENERATED ALWAYS AS (n * 2) STORED"
    } else {
        "label text GENERATED ALWAYS AS ('n=' || n::text) STORED"
    };
    let ddl = format!("CREATE TABLE gen (id int PRIMARY KEY, n int, {generated}, note text)");
    let (master, c) = pg.fresh_db("gensnap", &ddl).await;
    let (replica, r) = pg.fresh_db("gensnap_r", &ddl).await;
    let rows = 60_000;
    c.batch_execute(&format!(
        "INSERT INTO gen (id, n, note) SELECT g, g, 'x' FROM generate_series(1, {rows}) g; \
         ANALYZE gen"
    ))
    .await
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_statements(
        master.clone(),
        seed,
        stop.clone(),
        (rows, rows),
        |id, next| match id {
            Some((id, Write::Update)) => {
                format!("UPDATE gen SET n = n + 1, note = note || 'u' WHERE id = {id}")
            }
            Some((id, Write::Delete)) => format!("DELETE FROM gen WHERE id = {id}"),
            None => format!("INSERT INTO gen (id, n, note) VALUES ({next}, {next}, 'new')"),
        },
    );
    let slot = format!("slot_{master}");
    let applier = start_applier(&master, &replica);
    let capture = start_capture(
        &master,
        "  snapshot_readers: 2\n  snapshot_batch_rows: 200\n",
    );
    wait_snapshot_done(
        &c,
        &slot,
        ("gen", UNIX_EPOCH),
        Duration::from_secs(180),
        || capture.log(),
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let changes = writer.await.unwrap();
    eprintln!("the writer changed {changes} rows");
    wait_equal(&master, &replica, "gen", Duration::from_secs(120)).await;
    assert_no_dead_letters(&r, &applier).await;
}

/// A snapshot request stays in `pgferry.snapshot_requests` until its snapshot is planned:
/// capture killed after it read the request and before the plan was recorded (held there by a
/// lock on `pgferry.snapshot_progress`) runs the snapshot after its restart, which prunes the
/// rows only the replica has. Before, the request was deleted as it was read, and lost.
#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_request_survives_a_crash_before_its_plan() {
    let pg = PgCluster::shared();
    let ddl = "CREATE TABLE t (id int PRIMARY KEY, v int)";
    let (master, c) = pg.fresh_db("reqcrash", ddl).await;
    let (replica, r) = pg.fresh_db("reqcrash_r", ddl).await;
    c.batch_execute("INSERT INTO t SELECT g, 0 FROM generate_series(1, 2000) g")
        .await
        .unwrap();
    let slot = format!("slot_{master}");
    let _applier = start_applier(&master, &replica);
    let mut capture = start_capture(&master, "  snapshot_poll_interval: 1s\n");
    capture.wait_ready().await;
    wait_equal(&master, &replica, "t", Duration::from_secs(60)).await;
    // Rows only a re-snapshot removes.
    r.batch_execute("INSERT INTO t SELECT -g, -1 FROM generate_series(1, 50) g")
        .await
        .unwrap();
    let lock = pg.client(&master).await;
    lock.batch_execute("BEGIN; LOCK TABLE pgferry.snapshot_progress IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let asked = request_snapshot(&capture, "public.t");
    assert!(asked.status.success(), "{asked:?}");
    wait_for(
        "capture to wait on the lock",
        Duration::from_secs(30),
        || async {
            let waiting: i64 = c
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                  WHERE application_name LIKE 'pgferry%' AND wait_event_type = 'Lock'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            (waiting > 0).then_some(())
        },
    )
    .await;
    capture.kill9();
    lock.batch_execute("ROLLBACK").await.unwrap();
    capture.restart();
    wait_equal(&master, &replica, "t", Duration::from_secs(90)).await;
    let (_, parts, done) = progress(&c, &slot, "t", UNIX_EPOCH).await;
    assert_eq!(parts, done, "every part of the snapshot is done");
}

/// A table without a key is read by pages, and its rows can be wide (their values TOASTed,
/// so a page of small pointers reads as megabytes): each chunk holds as many pages as
/// `snapshot_chunk_bytes` does, at least one, by the table's average row at first and then by
/// what its chunks read. Every chunk the log shows stays within the bound plus the widest
/// page, and the replica ends exact. Before, a chunk held `snapshot_batch_rows` rows' worth of
/// pages whatever their bytes: the whole table here. Random widths.
#[tokio::test(flavor = "multi_thread")]
async fn wide_keyless_rows_keep_chunks_within_snapshot_chunk_bytes() {
    const BOUND: u64 = 1 << 20;
    let pg = PgCluster::shared();
    let seed = seed();
    eprintln!("seed {seed} (SNAPSHOT_SEED)");
    let mut rng = Rng::new(seed);
    let ddl = "CREATE TABLE kwide (n int, body text)";
    let (master, c) = pg.fresh_db("kwide", ddl).await;
    let (replica, _r) = pg.fresh_db("kwide_r", ddl).await;
    for n in 1..=300 {
        // md5 text repeated: 32 characters a step.
        let steps = rng.range(100, 4_000);
        c.batch_execute(&format!(
            "INSERT INTO kwide VALUES ({n}, repeat(md5('{n}'), {steps}))"
        ))
        .await
        .unwrap();
    }
    c.batch_execute("ANALYZE kwide").await.unwrap();
    let widest_page: i64 = c
        .query_one(
            "SELECT max(s)::int8 FROM (SELECT (ctid::text::point)[0] AS page,
                                              sum(octet_length(body) + 64) AS s
                                         FROM kwide GROUP BY 1) AS pages",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let slot = format!("slot_{master}");
    let _applier = start_applier(&master, &replica);
    let capture = start_capture(&master, &format!("  snapshot_chunk_bytes: {BOUND}\n"));
    wait_snapshot_done(
        &c,
        &slot,
        ("kwide", UNIX_EPOCH),
        Duration::from_secs(300),
        || capture.log(),
    )
    .await;
    wait_equal(&master, &replica, "kwide", Duration::from_secs(300)).await;
    let chunks: Vec<u64> = capture
        .log()
        .lines()
        .filter(|l| l.contains("snapshot chunk read") && l.contains("table=public.kwide"))
        .filter_map(|l| l.split(" bytes=").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    eprintln!("chunks {chunks:?}; widest page {widest_page}");
    assert!(
        chunks.len() > 2,
        "chunks of public.kwide in the log: {chunks:?}"
    );
    let over: Vec<&u64> = chunks
        .iter()
        .filter(|&&b| b > BOUND + widest_page as u64)
        .collect();
    assert!(
        over.is_empty(),
        "chunks over {BOUND} bytes plus the widest page ({widest_page}): {over:?}"
    );
}

/// `count:md5` of the rows of `query` on `db`, in text form and sorted.
async fn rows_signature(c: &tokio_postgres::Client, query: &str) -> String {
    c.query_one(
        &format!(
            "SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, ',' ORDER BY t::text)), '')
               FROM ({query}) t"
        ),
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Waits until `on_master` (what the publication sends) reads on the master as `on_replica`
/// does on the replica.
async fn wait_published_rows(
    (m, on_master): (&tokio_postgres::Client, &str),
    (r, on_replica): (&tokio_postgres::Client, &str),
    timeout: Duration,
    log: impl Fn() -> String,
) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let want = rows_signature(m, on_master).await;
        let got = rows_signature(r, on_replica).await;
        if want == got {
            return;
        }
        if std::time::Instant::now() >= deadline {
            async fn rows(
                c: &tokio_postgres::Client,
                q: &str,
            ) -> std::collections::BTreeSet<String> {
                c.query(&format!("SELECT t::text FROM ({q}) t"), &[])
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| r.get(0))
                    .collect()
            }
            let (mr, rr) = (rows(m, on_master).await, rows(r, on_replica).await);
            let missing: Vec<_> = mr.difference(&rr).take(5).collect();
            let extra: Vec<_> = rr.difference(&mr).take(5).collect();
            panic!(
                "the replica's {on_replica} reads {got}, the master's {on_master} {want}: \
                 missing on the replica {missing:?}, extra {extra:?}\n{}",
                log()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A publication with row filters and column lists (PostgreSQL 15): a snapshot reads only the
/// rows the filter passes and the columns the list holds, in both snapshot modes, so that the
/// replica holds what the publication sends, as PostgreSQL's own initial table
/// synchronization gives. A writer meanwhile updates, deletes and inserts rows, and moves rows
/// into and out of the filter (the stream then sends a move out as a delete). After the
/// filter is narrowed, a re-snapshot makes the replica match it again (the rows it no longer
/// passes are pruned). The replica's tables have a column of their own too, which no change
/// carries. Before, snapshots read whole tables: the replica kept rows outside the filter,
/// never updated again, and the unlisted columns' source values; and a row updated in its
/// chunk's window was lost (the update, not carrying every column of the replica's table,
/// went as an UPDATE of a row not there yet). Random writes.
#[tokio::test(flavor = "multi_thread")]
async fn publication_row_filters_and_column_lists_shape_the_snapshot() {
    let pg = PgCluster::shared();
    let rows = 12_000i64;
    let seed = seed();
    eprintln!("SNAPSHOT_SEED={seed}");
    let regions = "ARRAY['eu', 'us', 'apac', 'latam']";
    for mode in ["initial", "exported"] {
        // The replica's tables also have a column of their own, which no change carries.
        let ddl = |secret: &str, own: &str| {
            format!(
                "CREATE TABLE orders (region text, id int, v int, secret text{secret}{own},
                                      PRIMARY KEY (region, id));
                 CREATE TABLE items (id int PRIMARY KEY, v int, secret text{secret}{own});
                 CREATE TABLE logs (a int, b text);
                 ALTER TABLE logs REPLICA IDENTITY FULL;"
            )
        };
        let (master, c) = pg.fresh_db("pubfilter", &ddl("", "")).await;
        let (replica, r) = pg
            .fresh_db(
                "pubfilter_r",
                &ddl(" DEFAULT 'unlisted'", ", own int NOT NULL DEFAULT 42"),
            )
            .await;
        c.batch_execute(&format!(
            "INSERT INTO orders SELECT ({regions})[g % 4 + 1], g, g, 'secret' FROM generate_series(1, {rows}) g;
             INSERT INTO items SELECT g, g, 'secret' FROM generate_series(1, {rows}) g;
             INSERT INTO logs SELECT g, 'log' FROM generate_series(1, {rows}) g;
             CREATE PUBLICATION pub_{master} FOR TABLE
                 orders (region, id, v) WHERE (region IN ('eu', 'us')),
                 items (id, v),
                 logs WHERE (a % 3 <> 0);"
        ))
        .await
        .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let next_region = "CASE region WHEN 'eu' THEN 'apac' WHEN 'apac' THEN 'us' \
                           WHEN 'us' THEN 'latam' ELSE 'eu' END";
        let writers = [
            spawn_statements(
                master.clone(),
                seed,
                stop.clone(),
                (rows, rows),
                move |w, next| match w {
                    Some((id, Write::Update)) if id % 2 == 0 => format!(
                        "UPDATE orders SET region = {next_region}, v = v + 1 WHERE id = {id}"
                    ),
                    Some((id, Write::Update)) => {
                        format!("UPDATE orders SET v = v + 1, secret = 'changed' WHERE id = {id}")
                    }
                    Some((id, Write::Delete)) => format!("DELETE FROM orders WHERE id = {id}"),
                    None => format!(
                        "INSERT INTO orders VALUES (({regions})[{next} % 4 + 1], {next}, 0, 'new')"
                    ),
                },
            ),
            spawn_statements(
                master.clone(),
                seed + 1,
                stop.clone(),
                (rows, rows),
                |w, next| match w {
                    Some((id, Write::Update)) => {
                        format!("UPDATE items SET v = v + 1, secret = 'changed' WHERE id = {id}")
                    }
                    Some((id, Write::Delete)) => format!("DELETE FROM items WHERE id = {id}"),
                    None => format!("INSERT INTO items VALUES ({next}, 0, 'new')"),
                },
            ),
            spawn_statements(
                master.clone(),
                seed + 2,
                stop.clone(),
                (rows, rows),
                |w, next| match w {
                    Some((id, Write::Update)) => {
                        format!("UPDATE logs SET b = b || 'u' WHERE a = {id}")
                    }
                    Some((id, Write::Delete)) => format!("DELETE FROM logs WHERE a = {id}"),
                    None => format!("INSERT INTO logs VALUES ({next}, 'new')"),
                },
            ),
        ];
        tokio::time::sleep(Duration::from_millis(300)).await;
        let applier = start_applier(&master, &replica);
        let capture = start_capture(
            &master,
            &format!(
                "  snapshot: {mode}\n  snapshot_readers: 2\n  snapshot_batch_rows: 500\n  \
                 snapshot_poll_interval: 1s\n"
            ),
        );
        capture.wait_ready().await;
        if mode == "initial" {
            let slot = format!("slot_{master}");
            for table in ["orders", "items", "logs"] {
                wait_snapshot_done(
                    &c,
                    &slot,
                    (table, UNIX_EPOCH),
                    Duration::from_secs(120),
                    || capture.log(),
                )
                .await;
            }
        } else {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        stop.store(true, Ordering::Relaxed);
        let mut changes = 0;
        for w in writers {
            changes += w.await.unwrap();
        }
        eprintln!("{mode}: the writers changed {changes} rows");
        let log = || format!("{}\n{}", capture.log(), applier.log());
        let all = |columns: &str, table: &str| format!("SELECT {columns} FROM {table}");
        let checks = [
            (
                "SELECT region, id, v FROM orders WHERE region IN ('eu', 'us')".to_owned(),
                all("region, id, v", "orders"),
            ),
            (all("id, v", "items"), all("id, v", "items")),
            (
                "SELECT a, b FROM logs WHERE a % 3 <> 0".to_owned(),
                all("a, b", "logs"),
            ),
        ];
        for (on_master, on_replica) in &checks {
            wait_published_rows(
                (&c, on_master),
                (&r, on_replica),
                Duration::from_secs(120),
                log,
            )
            .await;
        }
        // The unlisted column was never sent, nor the replica's own: every replica row has
        // their DEFAULTs.
        for table in ["orders", "items"] {
            let sent: i64 = r
                .query_one(
                    &format!(
                        "SELECT count(*) FROM {table} WHERE secret <> 'unlisted' OR own <> 42"
                    ),
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(
                sent,
                0,
                "{mode}: {table}.secret is not published\n{}",
                log()
            );
        }
        // A narrower filter, then a re-snapshot: the replica holds what it passes.
        c.batch_execute(&format!(
            "ALTER PUBLICATION pub_{master} SET TABLE
                 orders (region, id, v) WHERE (region = 'eu'), items (id, v),
                 logs WHERE (a % 3 <> 0)"
        ))
        .await
        .unwrap();
        let out = request_snapshot(&capture, "public.orders");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_published_rows(
            (&c, "SELECT region, id, v FROM orders WHERE region = 'eu'"),
            (&r, &all("region, id, v", "orders")),
            Duration::from_secs(120),
            log,
        )
        .await;
        assert_no_dead_letters(&r, &applier).await;
    }
}

/// A table moved out of a `FOR TABLES IN SCHEMA` publication (`SET SCHEMA`), changed there,
/// and moved back: its move out never travelled (the table had left the publication), its move
/// back does, and the target still holds the table where it returns to. The move back is
/// taken as made (before, it was a dead letter, "a table this node stream never announced",
/// and the target reported itself diverged), and the table, published again, is snapshotted
/// again: the replica ends exact, with the changes made while it was away.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_moved_out_of_its_schema_publication_and_back_comes_back_exact() {
    let pg = PgCluster::shared();
    let ddl = "CREATE SCHEMA s1; CREATE SCHEMA s2;
               CREATE TABLE s1.out (id int PRIMARY KEY, v int)";
    let (master, c) = pg.fresh_db("moveback", ddl).await;
    let (replica, r) = pg.fresh_db("moveback_r", ddl).await;
    c.batch_execute(&format!(
        "INSERT INTO s1.out SELECT g, 0 FROM generate_series(1, 3000) g;
         CREATE PUBLICATION pub_{master} FOR TABLES IN SCHEMA s1"
    ))
    .await
    .unwrap();
    let applier = start_applier(&master, &replica);
    let capture = start_capture(&master, "  snapshot_poll_interval: 1s\n");
    capture.wait_ready().await;
    wait_equal(&master, &replica, "s1.out", Duration::from_secs(60)).await;
    c.batch_execute("ALTER TABLE s1.out SET SCHEMA s2")
        .await
        .unwrap();
    // At least a poll apart, so that capture sees the table leave the publication.
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.batch_execute(
        "UPDATE s2.out SET v = 9 WHERE id % 4 = 0; DELETE FROM s2.out WHERE id % 13 = 0",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.batch_execute("ALTER TABLE s2.out SET SCHEMA s1")
        .await
        .unwrap();
    wait_equal(&master, &replica, "s1.out", Duration::from_secs(90)).await;
    assert_no_dead_letters(&r, &applier).await;
    // Nothing diverged: the applier stays ready.
    let ready = applier.http_get("/readyz");
    assert_eq!(ready.as_ref().map(|r| r.0), Some(200), "{ready:?}");
}

/// The config of an applier of `master`'s stream into `replica` (see [`start_applier`]).
fn applier_yaml(master: &str, replica: &str, port: u16) -> String {
    let pg = PgCluster::shared();
    apply_config(
        "node-a",
        master,
        &[pg.url(replica)],
        &broker().address(),
        port,
        "",
    )
}

/// The arguments of `pgferry seed` of the applier config at `config` from `master` (capture's
/// slot and publication as [`start_capture`] names them), `readers` in parallel.
fn seed_args(config: &std::path::Path, master: &str, readers: i64) -> Vec<String> {
    [
        "seed".to_owned(),
        "--config".to_owned(),
        config.to_string_lossy().into_owned(),
        "--source-url".to_owned(),
        PgCluster::shared().url(master),
        "--slot".to_owned(),
        format!("slot_{master}"),
        "--publication".to_owned(),
        format!("pub_{master}"),
        "--readers".to_owned(),
        readers.to_string(),
    ]
    .into()
}

/// Runs `pgferry seed` ([`seed_args`]) to its end: its exit code and output.
fn run_seed(config: &std::path::Path, master: &str, readers: i64) -> (i32, String) {
    let args = seed_args(config, master, readers);
    common::ferry::cli(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

const SEED_DDL: &str =
    "CREATE TABLE items (id bigint PRIMARY KEY, v int, note text, code int UNIQUE);
     CREATE TABLE orders (id int PRIMARY KEY, v int, secret text);
     CREATE TABLE marks (at int GENERATED ALWAYS AS (1) STORED);";
/// The replica's: orders.v is a bigint there, so orders is copied as text, items in binary.
const SEED_REPLICA_DDL: &str =
    "CREATE TABLE items (id bigint PRIMARY KEY, v int, note text, code int UNIQUE);
     CREATE TABLE orders (id int PRIMARY KEY, v bigint, secret text);
     CREATE TABLE marks (at int GENERATED ALWAYS AS (1) STORED);";

/// Loads `rows` items (about 22 pages a thousand, so several page ranges) and orders, and
/// publishes items whole and orders with a column list and a row filter.
async fn load_seed_source(c: &tokio_postgres::Client, master: &str, rows: i64) {
    c.batch_execute(&format!(
        "INSERT INTO items SELECT g, g % 1000, repeat('n', 120), g FROM generate_series(1, {rows}) g;
         INSERT INTO orders SELECT g, g, 'secret' FROM generate_series(1, {}) g;
         INSERT INTO marks SELECT FROM generate_series(1, {rows} % 97 + 1);
         CREATE PUBLICATION pub_{master} FOR TABLE items, orders (id, v) WHERE (id % 3 <> 0), marks;",
        rows / 10
    ))
    .await
    .unwrap();
}

/// Writers for [`load_seed_source`]'s tables until `stop`: updates, deletes, inserts, and
/// (every fifth update of items) a move of a row to a new key. Items' writer works on the
/// first 2,000 rows, and a new row takes the unique `code` of a row it deleted: applying a
/// transaction the seed's copy already holds again would meet a code a later one reused (a
/// dead letter).
fn spawn_seed_writers(
    master: &str,
    rows: i64,
    seed: u64,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<u64>> {
    let mut moves = 0i64;
    let mut freed: Vec<i64> = Vec::new();
    vec![
        spawn_statements(
            master.to_owned(),
            seed,
            stop.clone(),
            (2_000.min(rows), rows),
            move |w, next| match w {
                Some((id, Write::Update)) => {
                    moves += 1;
                    if moves % 5 == 0 {
                        format!(
                            "UPDATE items SET id = {} WHERE id = {id}",
                            100_000_000 + moves
                        )
                    } else {
                        format!("UPDATE items SET v = v + 1, note = note || 'u' WHERE id = {id}")
                    }
                }
                Some((id, Write::Delete)) => {
                    freed.push(id);
                    format!("DELETE FROM items WHERE id = {id}")
                }
                None => format!(
                    "INSERT INTO items VALUES ({next}, 1, 'new', {}) ON CONFLICT DO NOTHING",
                    freed.pop().unwrap_or(-next)
                ),
            },
        ),
        spawn_statements(
            master.to_owned(),
            seed + 1,
            stop.clone(),
            (rows / 10, rows / 10),
            |w, next| match w {
                Some((id, Write::Update)) => {
                    format!("UPDATE orders SET v = v + 1, secret = 'changed' WHERE id = {id}")
                }
                Some((id, Write::Delete)) => format!("DELETE FROM orders WHERE id = {id}"),
                None => format!("INSERT INTO orders VALUES ({next}, {next}, 'new')"),
            },
        ),
    ]
}

/// The replica holds exactly what the publication gives: items whole, and of orders the
/// published columns of the rows the filter lets through (the replica's own `secret` stays
/// NULL).
async fn wait_seeded_equal(master: &str, replica: &str, applier: &Ferry) {
    wait_equal(master, replica, "items", Duration::from_secs(90)).await;
    let pg = PgCluster::shared();
    let (m, r) = (pg.client(master).await, pg.client(replica).await);
    let want = rows_signature(&m, "SELECT id, v FROM orders WHERE id % 3 <> 0 ORDER BY id").await;
    wait_for(
        "orders to match the publication",
        Duration::from_secs(60),
        || async {
            (rows_signature(&r, "SELECT id, v FROM orders ORDER BY id").await == want).then_some(())
        },
    )
    .await;
    let secrets: i64 = r
        .query_one("SELECT count(secret) FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        secrets, 0,
        "a column the publication leaves out reached the replica"
    );
    // A table with no column to copy (only a generated one): its rows, as many.
    let marks = "SELECT count(*)::text FROM marks";
    assert_eq!(
        rows_signature(&m, marks).await,
        rows_signature(&r, marks).await
    );
    assert_no_dead_letters(&r, applier).await;
}

/// `pgferry seed` fills an empty replica straight from the source's exported snapshot, with
/// 1 to 5 readers (4 and 5 also over page ranges of items), while writers update (some rows to new keys), delete and
/// insert throughout and capture lags behind (paused); the applier started afterwards skips
/// exactly the transactions the copy holds: the replica ends exact (orders as its column list
/// and row filter shape it), nothing dead-lettered.
#[tokio::test(flavor = "multi_thread")]
async fn a_seeded_replica_is_exact_under_concurrent_writes() {
    let pg = PgCluster::shared();
    let seed = seed();
    eprintln!("SNAPSHOT_SEED={seed}");
    let mut rng = Rng::new(seed);
    for round in 0..2 {
        let rows = rng.range(100_000, 150_000);
        // Both rounds together cover whole tables and page ranges.
        let readers = if round == 0 {
            rng.range(1, 4)
        } else {
            rng.range(4, 6)
        };
        let (master, m) = pg.fresh_db("seedexact", SEED_DDL).await;
        let (replica, _) = pg.fresh_db("seedexact_r", SEED_REPLICA_DDL).await;
        load_seed_source(&m, &master, rows).await;
        let capture = start_capture(&master, "  snapshot: never\n");
        capture.wait_ready().await;
        let stop = Arc::new(AtomicBool::new(false));
        let writers = spawn_seed_writers(&master, rows, seed + round, &stop);
        // Capture falls behind for a while: the stream's end, where the applier starts, lies
        // well before the seed's snapshot, and the transactions in between are in both.
        capture.pause();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let port = common::free_port();
        let yaml = applier_yaml(&master, &replica, port);
        let config = common::ferry::write_config(&yaml);
        let from = master.clone();
        let (code, out) = tokio::task::spawn_blocking(move || run_seed(&config, &from, readers))
            .await
            .unwrap();
        capture.resume();
        assert_eq!(code, 0, "round {round}, {readers} readers: {out}");
        assert!(out.contains("copied public.items: "), "{out}");
        // Same types on both sides: binary; orders.v differs: text.
        let copied = |table: &str, binary: bool| {
            let ranges: Vec<&str> = out
                .lines()
                .filter(|l| l.contains(&format!("seed range copied table={table} ")))
                .collect();
            !ranges.is_empty()
                && ranges
                    .iter()
                    .all(|l| l.contains(&format!("binary={binary}")))
        };
        assert!(
            copied("public.items", true) && copied("public.orders", false),
            "{out}"
        );
        let ranges = out.matches("seed range copied table=public.items").count();
        // Three tables: a fourth reader and more cut items into page ranges.
        if readers > 3 {
            assert!(
                ranges > 1,
                "{readers} readers copied items in {ranges} range(s): {out}"
            );
        } else {
            assert_eq!(
                ranges, 1,
                "{readers} readers copied items in {ranges} ranges: {out}"
            );
        }
        let applier = Ferry::start(&yaml, port);
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            assert!(w.await.unwrap() > 0);
        }
        wait_seeded_equal(&master, &replica, &applier).await;
        // (The seed took `config` along.)
        let config = common::ferry::write_config(&yaml);
        let (_, report) = common::ferry::cli(&["status", "--config", config.to_str().unwrap()]);
        assert!(report.contains("seeded from node-a at LSN"), "{report}");
        drop(capture);
    }
}

/// A seed refuses a target table that holds rows. A seed killed with `kill -9` mid-copy
/// leaves `pgferry.seeds` saying `copying`: the applier refuses to apply onto the partial
/// copy (it says so and retries), and a second seed empties what the first copied and copies
/// again; the replica then ends exact under writes that never stopped.
#[tokio::test(flavor = "multi_thread")]
async fn a_seed_killed_midway_is_redone_and_the_applier_waits_for_it() {
    let pg = PgCluster::shared();
    let seed = seed();
    eprintln!("SNAPSHOT_SEED={seed}");
    let mut rng = Rng::new(seed);
    let rows = 250_000;
    let (master, m) = pg.fresh_db("seedkill", SEED_DDL).await;
    let (replica, r) = pg.fresh_db("seedkill_r", SEED_REPLICA_DDL).await;
    load_seed_source(&m, &master, rows).await;
    let capture = start_capture(&master, "  snapshot: never\n");
    capture.wait_ready().await;
    let port = common::free_port();
    let yaml = applier_yaml(&master, &replica, port);
    let config = common::ferry::write_config(&yaml);

    r.execute("INSERT INTO orders VALUES (1, 1, 'mine')", &[])
        .await
        .unwrap();
    let (code, out) = run_seed(&config, &master, 2);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("public.orders is not empty on the target"),
        "{out}"
    );
    r.execute("DELETE FROM orders", &[]).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let writers = spawn_seed_writers(&master, rows, seed, &stop);
    let mut child = std::process::Command::new(pgferry_bin())
        .args(seed_args(&config, &master, rng.range(1, 5)))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Killed once the target has taken some rows of items, before it has them all.
    wait_for("the seed to copy rows", Duration::from_secs(60), || async {
        let copied: i64 = r
            .query_one(
                "SELECT coalesce(sum(tuples_processed), 0)::int8 FROM pg_stat_progress_copy
                  WHERE datname = current_database()",
                &[],
            )
            .await
            .ok()?
            .get(0);
        (copied > 1000).then_some(())
    })
    .await;
    // One seed at a time into a target.
    let (code, out) = run_seed(&config, &master, 1);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("another pgferry seed is copying"), "{out}");
    child.kill().unwrap();
    child.wait().unwrap();
    let state: String = r
        .query_one("SELECT state FROM pgferry.seeds", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(state, "copying");
    let (_, report) = common::ferry::cli(&["status", "--config", config.to_str().unwrap()]);
    assert!(
        report.contains("seed from node-a did not finish"),
        "{report}"
    );

    let applier = Ferry::start(&yaml, port);
    applier
        .wait_log("did not finish", Duration::from_secs(30))
        .await;
    drop(applier);
    // The killed applier's session and the seed's sessions end.
    wait_no_pgferry_sessions(&r).await;
    let (code, out) = tokio::task::spawn_blocking({
        let (config, master) = (config.clone(), master.clone());
        let readers = rng.range(1, 5);
        move || run_seed(&config, &master, readers)
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("emptied what an unfinished seed had copied"),
        "{out}"
    );
    let applier = Ferry::start(&yaml, port);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        assert!(w.await.unwrap() > 0);
    }
    wait_seeded_equal(&master, &replica, &applier).await;
    // A seeded replica is never seeded again over its rows: not while its applier runs, nor
    // after (it has a stored position).
    let (code, out) = run_seed(&config, &master, 1);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("an applier of node-a is connected"), "{out}");
    drop(applier);
    wait_no_pgferry_sessions(&r).await;
    let (code, out) = run_seed(&config, &master, 1);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("already applies node-a's stream"), "{out}");
    drop(capture);
}

/// Waits until no pgferry session is connected to `c`'s database.
async fn wait_no_pgferry_sessions(c: &tokio_postgres::Client) {
    wait_for(
        "pgferry's sessions to end",
        Duration::from_secs(30),
        || async {
            let n: i64 = c
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND application_name LIKE 'pgferry-%'",
                    &[],
                )
                .await
                .ok()?
                .get(0);
            (n == 0).then_some(())
        },
    )
    .await;
}

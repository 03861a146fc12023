//! `pgferry check` against real servers, and config errors through the real binary.

mod common;

use std::process::{Command, Output};

use common::broker::Broker;
use common::ferry::{pgferry_bin, write_config};
use common::pg::PgCluster;

fn check(yaml: &str, env: &[(&str, &str)]) -> Output {
    let path = write_config(yaml);
    Command::new(pgferry_bin())
        .args(["check", "--config", path.to_str().unwrap()])
        .envs(env.iter().copied())
        .output()
        .expect("run pgferry check")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Acceptance 7 (servers): wal_level=replica, a table without key, a role without REPLICATION
/// and an unreachable broker are each reported on their own line with a fix; exit code 1.
#[tokio::test(flavor = "multi_thread")]
async fn check_reports_each_problem_with_a_fix() {
    let pg = PgCluster::start(&[("wal_level", "replica")]);
    let c = pg.client("postgres").await;
    c.batch_execute(
        "CREATE TABLE keyed (id int PRIMARY KEY);
         CREATE TABLE loose (a int, b text);
         CREATE TABLE full_ident (a int); ALTER TABLE full_ident REPLICA IDENTITY FULL;
         CREATE ROLE plain LOGIN;",
    )
    .await
    .unwrap();
    let dead_broker = format!("127.0.0.1:{}", common::free_port());
    let yaml = format!(
        "node_id: n1\nsource:\n  url: postgres://plain@127.0.0.1:{}/postgres\nkafka:\n  brokers: {dead_broker}\n",
        pg.port
    );
    let out = check(&yaml, &[]);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    let line = |needle: &str| {
        report
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line mentions {needle:?} in:\n{report}"))
            .to_owned()
    };
    assert!(line("wal_level is 'replica'").contains("fix: ALTER SYSTEM SET wal_level = logical"));
    let loose = line("public.loose");
    assert!(
        loose.contains("no primary key") && loose.contains("REPLICA IDENTITY FULL"),
        "{loose}"
    );
    // Keyed and REPLICA IDENTITY FULL tables are fine: only the role's missing SELECT names
    // them.
    assert!(
        report
            .lines()
            .filter(|l| l.contains("public.keyed") || l.contains("public.full_ident"))
            .all(|l| l.contains("cannot SELECT")),
        "{report}"
    );
    assert!(line("neither REPLICATION").contains("ALTER ROLE"));
    assert!(line("not reachable").contains("kafka.brokers"));
    pg.stop();
}

/// A ready source and broker pass, with exit code 0.
#[tokio::test(flavor = "multi_thread")]
async fn check_passes_when_ready() {
    let pg = PgCluster::shared();
    let db = pg.create_db("ready").await;
    pg.client(&db)
        .await
        .batch_execute("CREATE TABLE ok (id int PRIMARY KEY)")
        .await
        .unwrap();
    let broker = Broker::start();
    let yaml = format!(
        "node_id: n1\nsource:\n  url: postgres://postgres@127.0.0.1:{}/{db}\nkafka:\n  brokers: {}\n",
        pg.port,
        broker.address()
    );
    let out = check(&yaml, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("ready"));
}

/// Acceptance 7 (config): malformed configs fail before touching any server, and each
/// message names the offending key.
#[test]
fn malformed_configs_name_the_bad_key() {
    let base = "node_id: n1\nkafka:\n  brokers: 127.0.0.1:1\n";
    let with_source = |extra: &str| format!("{base}source:\n  url: postgres://u@h/db\n{extra}");
    type Case<'a> = (String, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (format!("{base}sourc: {{}}\n"), vec![], "sourc"),
        (format!("{base}  topic_prefx: x\n"), vec![], "topic_prefx"),
        ("kafka:\n  brokers: b\n".into(), vec![], "node_id"),
        (
            format!("{base}  tombstones: maybe\n"),
            vec![],
            "kafka.tombstones",
        ),
        (with_source("  slot: Bad-Slot\n"), vec![], "source.slot"),
        (
            with_source("  heartbeat_interval: 10\n"),
            vec![],
            "source.heartbeat_interval",
        ),
        (
            with_source("  tables: [nodot]\n"),
            vec![],
            "source.tables[0]",
        ),
        (
            format!("{base}metrics:\n  listen: nowhere\n"),
            vec![],
            "metrics.listen",
        ),
        (
            format!("{base}  properties:\n    acks: '1'\n"),
            vec![],
            "kafka.properties.acks",
        ),
        (
            format!("{base}source:\n  url: 'host=h port=notaport'\n"),
            vec![],
            "source.url",
        ),
        (
            with_source("  snapshot: sometimes\n"),
            vec![],
            "source.snapshot",
        ),
        (
            base.into(),
            vec![("PGFERRY_KAFKA__TOPIC_PARTITIONS", "zero")],
            "kafka.topic_partitions",
        ),
    ];
    for (yaml, env, key) in &cases {
        let out = check(yaml, env);
        let msg = text(&out);
        assert_eq!(
            out.status.code(),
            Some(2),
            "config {yaml:?} should fail: {msg}"
        );
        assert!(
            msg.contains(&format!("`{key}`")),
            "error for {yaml:?} does not name `{key}`: {msg}"
        );
    }
    assert!(cases.len() >= 10);
}

/// The hand-written replication transport authenticates with SCRAM-SHA-256 and MD5 (as does
/// the SQL connection), with the password from the environment; a wrong password is reported.
#[tokio::test(flavor = "multi_thread")]
async fn check_authenticates_with_scram_and_md5() {
    let pg = PgCluster::start_with_hba(
        &[],
        "local all postgres trust\n\
         host all scram_user 127.0.0.1/32 scram-sha-256\n\
         host all md5_user 127.0.0.1/32 md5\n\
         host all postgres 127.0.0.1/32 trust\n",
    );
    let c = pg.client("postgres").await;
    c.batch_execute(
        "SET password_encryption = 'scram-sha-256';
         CREATE ROLE scram_user LOGIN REPLICATION PASSWORD 's3cr3t pass';
         SET password_encryption = 'md5';
         CREATE ROLE md5_user LOGIN REPLICATION PASSWORD 'md5 pass';
         -- What an administrator prepares for roles that are not superusers.
         CREATE PUBLICATION pgferry FOR ALL TABLES;
         GRANT CREATE ON DATABASE postgres TO scram_user, md5_user;",
    )
    .await
    .unwrap();
    let broker = Broker::start();
    let yaml = |user: &str| {
        format!(
            // Schema-change capture needs a superuser's event triggers (see security.rs).
            "node_id: n1\nsource:\n  url: postgres://{user}@127.0.0.1:{}/postgres\n  capture_ddl: false\nkafka:\n  brokers: {}\n",
            pg.port,
            broker.address()
        )
    };
    for (user, password) in [("scram_user", "s3cr3t pass"), ("md5_user", "md5 pass")] {
        let out = check(&yaml(user), &[("PGFERRY_SOURCE__PASSWORD", password)]);
        assert_eq!(out.status.code(), Some(0), "{user}: {}", text(&out));
    }
    let out = check(
        &yaml("scram_user"),
        &[("PGFERRY_SOURCE__PASSWORD", "wrong")],
    );
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(
        report.contains("password authentication failed"),
        "{report}"
    );
    assert!(
        !report.contains("wrong"),
        "the password must not be printed: {report}"
    );
    pg.stop();
}

/// `--version` and `--help` work without a config.
#[test]
fn version_and_help() {
    let out = Command::new(pgferry_bin())
        .arg("--version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    let out = Command::new(pgferry_bin()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("run") && help.contains("check") && help.contains("tail"),
        "{help}"
    );
}

/// `check` on an apply target: a missing table and a table without a primary key from
/// `apply.tables`, a column outside the key that is GENERATED ALWAYS AS IDENTITY (updates
/// cannot set it), and a role without the apply privileges, are each reported with a fix.
/// An identity key is fine (inserts override it).
#[tokio::test(flavor = "multi_thread")]
async fn check_reports_apply_target_problems() {
    let pg = PgCluster::shared();
    let (db, c) = pg
        .fresh_db(
            "target",
            "CREATE TABLE public.keyless (a int); CREATE TABLE public.fine (id int PRIMARY KEY);
             CREATE TABLE public.numbered (id int PRIMARY KEY, n int GENERATED ALWAYS AS IDENTITY);
             CREATE TABLE public.counted (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text);",
        )
        .await;
    c.batch_execute("CREATE ROLE applier_plain LOGIN")
        .await
        .unwrap();
    let broker = Broker::start();
    let yaml = format!(
        "node_id: n1\nkafka:\n  brokers: {}\napply:\n  mode: replica\n  nodes: [a]\n  \
         tables: [public.fine, public.keyless, public.missing, public.numbered, public.counted]\n  targets:\n    - url: postgres://applier_plain@127.0.0.1:{}/{db}\n",
        broker.address(),
        pg.port
    );
    let out = check(&yaml, &[]);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(
        report.contains("public.missing does not exist")
            && report.contains("pg_dump --schema-only"),
        "{report}"
    );
    assert!(
        report.contains("public.keyless on apply target") && report.contains("no primary key"),
        "{report}"
    );
    assert!(
        report.contains("role applier_plain on apply target")
            && report.contains("may not SET session_replication_role")
            && report.contains("GRANT SET ON PARAMETER session_replication_role"),
        "{report}"
    );
    assert!(
        report
            .lines()
            .any(|l| l.contains("public.numbered on apply target")
                && l.contains("n GENERATED ALWAYS AS IDENTITY outside the primary key")
                && l.contains("SET GENERATED BY DEFAULT")),
        "{report}"
    );
    // public.fine and public.counted exist with a key: only the role's missing privileges
    // mention them.
    assert!(
        report
            .lines()
            .filter(|l| l.contains("public.fine") || l.contains("public.counted"))
            .all(|l| l.contains("lacks SELECT, INSERT, UPDATE, DELETE or TRUNCATE")),
        "{report}"
    );
}

/// Issue 4 (offline nodes): for a multi-master config, `check` warns while a slot can still be
/// saved: it retains so much WAL that little is left before `max_slot_wal_keep_size` makes it
/// lose WAL. Commit timestamps are not required any more (versions are stored), so a source
/// without them is not reported.
#[tokio::test(flavor = "multi_thread")]
async fn check_warns_before_an_idle_slot_loses_wal() {
    let pg = PgCluster::start(&[
        ("max_slot_wal_keep_size", "64MB"),
        ("track_commit_timestamp", "off"),
    ]);
    let c = pg.client("postgres").await;
    c.batch_execute("CREATE TABLE big (id int PRIMARY KEY, pad text)")
        .await
        .unwrap();
    c.batch_execute("SELECT pg_create_logical_replication_slot('idle_slot', 'pgoutput')")
        .await
        .unwrap();
    // The node is away: WAL piles up behind its slot until less than a fifth of the allowance
    // is left.
    let mut next = 0;
    loop {
        let (safe, limit): (Option<i64>, i64) = {
            let r = c
                .query_one(
                    "SELECT safe_wal_size, pg_size_bytes('64MB') FROM pg_replication_slots \
                     WHERE slot_name = 'idle_slot'",
                    &[],
                )
                .await
                .unwrap();
            (r.get(0), r.get(1))
        };
        if safe.is_some_and(|s| s < limit / 5) {
            break;
        }
        assert!(
            next < 2_000_000,
            "WAL never piled up: safe_wal_size = {safe:?}"
        );
        c.execute(
            "INSERT INTO big SELECT g, repeat('x', 200) FROM generate_series($1::int, $1::int + 19999) g",
            &[&next],
        )
        .await
        .unwrap();
        next += 20_000;
    }
    let yaml = format!(
        "node_id: n1\n\
         source:\n  url: postgres://postgres@127.0.0.1:{port}/postgres\n  slot: idle_slot\n\
         kafka:\n  brokers: 127.0.0.1:{dead}\n\
         apply:\n  mode: multi_master\n  nodes: [n2]\n  targets:\n    - url: postgres://postgres@127.0.0.1:{port}/postgres\n",
        port = pg.port,
        dead = common::free_port()
    );
    let out = check(&yaml, &[]);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    let slot_line = report
        .lines()
        .find(|l| l.contains("slot idle_slot retains"))
        .unwrap_or_else(|| panic!("no slot retention warning in:\n{report}"));
    assert!(slot_line.contains("max_slot_wal_keep_size"), "{slot_line}");
    assert!(!report.contains("track_commit_timestamp"), "{report}");
    pg.stop();
}

/// Issue 11 (lanes): a multi-master target whose cluster cannot track every replication origin
/// the workers would use (one per source node, plus one per extra lane, beside those that
/// exist) is reported with the number needed; with lanes that fit, it is not. A multi-master
/// node's publication with column lists is reported too.
#[tokio::test(flavor = "multi_thread")]
async fn check_reports_too_few_origin_states_for_lanes() {
    let pg = PgCluster::start(&[("max_replication_slots", "5")]);
    let c = pg.client("postgres").await;
    c.batch_execute(
        "CREATE TABLE kv (k int PRIMARY KEY); SELECT pg_replication_origin_create('someone_else')",
    )
    .await
    .unwrap();
    let broker = Broker::start();
    let yaml = |lanes: u8| {
        format!(
            "node_id: a\nsource:\n  url: postgres://postgres@127.0.0.1:{port}/postgres\nkafka:\n  brokers: {}\n\
             apply:\n  mode: multi_master\n  nodes: [b, c]\n  lanes: {lanes}\n  \
             targets:\n    - url: postgres://postgres@127.0.0.1:{port}/postgres\n",
            broker.address(),
            port = pg.port
        )
    };
    // 2 nodes x 3 lanes = 6 origins, and one exists: 7 > 5.
    let report = text(&check(&yaml(3), &[]));
    assert!(
        report.contains("needs 7 replication origins") && report.contains("at most 5"),
        "{report}"
    );
    assert!(report.contains("lower apply.lanes"), "{report}");
    // 2 nodes x 2 lanes = 4, with the existing one 5: fits.
    let report = text(&check(&yaml(2), &[]));
    assert!(!report.contains("replication origins"), "{report}");
    assert!(!report.contains("column lists"), "{report}");
    // A publication that leaves columns out (the node would refuse it at start).
    c.batch_execute(
        "ALTER TABLE kv ADD COLUMN v int, ADD COLUMN w int;
         CREATE PUBLICATION pgferry FOR TABLE kv (k, v)",
    )
    .await
    .unwrap();
    let report = text(&check(&yaml(2), &[]));
    assert!(
        report.contains("publication pgferry publishes only some columns of public.kv")
            && report.contains(r#"ALTER PUBLICATION "pgferry" SET TABLE"#),
        "{report}"
    );
}

/// A command whose reader went away (`pgferry roles … | head -0`) ends quietly: exit 0, no
/// panic. Before, `println!` panicked with a backtrace ("failed printing to stdout").
#[test]
fn output_to_a_closed_pipe_ends_quietly() {
    let path = write_config(
        "node_id: n1\nkafka:\n  brokers: 127.0.0.1:1\nsource:\n  url: postgres://u@h/db\n",
    );
    let mut child = Command::new(pgferry_bin())
        .args(["roles", "--config", path.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run pgferry roles");
    // The read end closes before pgferry has written anything.
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait for pgferry roles");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !err.contains("panicked"),
        "{:?}: {err}",
        out.status
    );
}

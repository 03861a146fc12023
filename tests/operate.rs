//! Operating pgferry: its metrics as Prometheus's own tools see them, and a graceful stop
//! under traffic. Real PostgreSQL, a real broker, the real binary, and Debian's `promtool`
//! and `prometheus` (installed by `scripts/setup --test`).

mod common;

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::broker::Broker;
use common::ferry::{capture_config, Ferry};
use common::pg::{table_checksum, PgCluster};
use common::process::on_test_exit;
use common::{free_port, wait_for};

fn broker() -> &'static Broker {
    static BROKER: OnceLock<Broker> = OnceLock::new();
    BROKER.get_or_init(Broker::start)
}

/// The body of a 200 answer.
fn http_ok(port: u16, path: &str) -> Option<String> {
    common::http_get(port, path)
        .filter(|(status, _)| *status == 200)
        .map(|(_, body)| body)
}

/// Acceptances 1 and 2: a running pgferry's `/metrics` passes `promtool check metrics` with
/// no findings, and a real Prometheus scraping it reports exactly the changes written.
#[tokio::test(flavor = "multi_thread")]
async fn prometheus_tools_accept_and_scrape_the_metrics() {
    let pg = PgCluster::shared();
    let (db, client) = pg
        .fresh_db("prom", "CREATE TABLE items (id int PRIMARY KEY, v text)")
        .await;
    let ferry = Ferry::capture(pg, &db, &broker().address(), "");
    ferry.wait_ready().await;
    const ROWS: i64 = 137;
    client
        .batch_execute(&format!(
            "INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, {ROWS}) g;
             UPDATE items SET v = 'changed' WHERE id <= 10;"
        ))
        .await
        .unwrap();
    let written = ROWS + 10;
    wait_for(
        "pgferry to capture every change",
        Duration::from_secs(60),
        || async {
            let n = ferry.metric("pgferry_changes_captured_total", "table=\"public.items\"")?;
            (n as i64 == written).then_some(())
        },
    )
    .await;

    let exposition = ferry.http_get("/metrics").expect("/metrics answers").1;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (scripts/setup --test installs Debian's prometheus package)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && findings.trim().is_empty(),
        "promtool check metrics: {findings}"
    );

    // A real Prometheus server scrapes pgferry every second.
    let dir = tempfile::tempdir().unwrap().keep();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: pgferry\n    \
             static_configs:\n      - targets: ['127.0.0.1:{}']\n",
            ferry.metrics_port
        ),
    )
    .unwrap();
    let port = free_port();
    let mut prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");
    on_test_exit(&format!(
        "kill -9 {} 2>/dev/null; rm -rf {}",
        prometheus.id(),
        dir.display()
    ));
    let query =
        "/api/v1/query?query=sum(pgferry_changes_captured_total%7Btable%3D%22public.items%22%7D)";
    let value = wait_for(
        "Prometheus to scrape pgferry",
        Duration::from_secs(90),
        || async {
            let body = http_ok(port, query)?;
            let json: serde_json::Value = serde_json::from_str(&body).ok()?;
            let v = json["data"]["result"][0]["value"][1]
                .as_str()?
                .parse::<f64>()
                .ok()?;
            Some(v)
        },
    )
    .await;
    assert_eq!(
        value as i64, written,
        "Prometheus saw {value}, the test wrote {written}"
    );
    let up = wait_for("the up series", Duration::from_secs(30), || async {
        let body = http_ok(port, "/api/v1/query?query=up%7Bjob%3D%22pgferry%22%7D")?;
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        json["data"]["result"][0]["value"][1]
            .as_str()
            .map(str::to_owned)
    })
    .await;
    assert_eq!(up, "1");
    let _ = prometheus.kill();
    let _ = prometheus.wait();
}

/// Acceptance 7: SIGTERM during steady traffic exits 0 within the grace period; after a
/// restart the replica has every change exactly once (an insert-only table without a key
/// would show a duplicate as an extra row).
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_under_traffic_exits_cleanly_and_loses_nothing() {
    let pg = PgCluster::shared();
    let ddl = "CREATE TABLE events (n bigint NOT NULL, at timestamptz NOT NULL DEFAULT now())";
    let (master, master_client) = pg.fresh_db("term_m", ddl).await;
    let (replica, replica_client) = pg.fresh_db("term_r", ddl).await;
    let port = free_port();
    let mut yaml = capture_config("node-t", pg.port, &master, &broker().address(), port, "");
    yaml.push_str(&format!(
        "shutdown_grace_period: 20s\n\
         apply:\n  mode: replica\n  nodes: [node-t]\n  targets:\n    - url: {}\n",
        pg.url(&replica)
    ));
    let mut ferry = Ferry::start(&yaml, port);
    ferry.wait_ready().await;

    let writing = Arc::new(AtomicBool::new(true));
    let flag = writing.clone();
    let writer = tokio::spawn(async move {
        let mut n = 0i64;
        while flag.load(Ordering::Relaxed) {
            master_client
                .execute(
                    "INSERT INTO events (n) SELECT $1::int8 + g FROM generate_series(0, 9) g",
                    &[&n],
                )
                .await
                .unwrap();
            n += 10;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        n
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    wait_for(
        "changes flowing to the replica",
        Duration::from_secs(30),
        || async {
            let n: i64 = replica_client
                .query_one("SELECT count(*) FROM events", &[])
                .await
                .ok()?
                .get(0);
            (n > 0).then_some(())
        },
    )
    .await;
    let asked = Instant::now();
    ferry.terminate();
    let status = ferry.wait_exit(Duration::from_secs(25));
    let took = asked.elapsed();
    assert!(
        !writer.is_finished(),
        "the writer must still be running at SIGTERM"
    );
    let status = status.unwrap_or_else(|| panic!("still running {took:?} after SIGTERM"));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status:?}"
    );
    assert!(
        took < Duration::from_secs(20),
        "stop took {took:?}, grace period is 20s"
    );
    assert!(ferry.log().contains("stopped cleanly"), "{}", ferry.log());

    ferry.restart();
    tokio::time::sleep(Duration::from_secs(2)).await;
    writing.store(false, Ordering::Relaxed);
    let written = writer.await.unwrap();
    let master_sum = table_checksum(&pg.client(&master).await, "events").await;
    assert_eq!(master_sum.0, written);
    wait_for(
        "the replica to equal the master",
        Duration::from_secs(120),
        || async {
            let got = common::pg::try_table_checksum(&replica_client, "events").await?;
            (got == master_sum).then_some(())
        },
    )
    .await;
    eprintln!("SIGTERM test: stopped in {took:?}; {written} rows, each once on the replica");

    // `pgferry status` shows the slot and the applied position for a human.
    let out = Command::new(common::ferry::pgferry_bin())
        .args(["status", "--config", ferry.config_path.to_str().unwrap()])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}");
    assert!(report.contains(&format!("slot slot_{master}")), "{report}");
    assert!(report.contains("streaming, confirmed"), "{report}");
    assert!(report.contains("from node-t"), "{report}");
    assert!(report.contains("applied up to"), "{report}");
}

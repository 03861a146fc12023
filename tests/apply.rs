//! Apply end to end: a master with a capturing pgferry, replicas fed by an applying pgferry,
//! real PostgreSQL and a real broker.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::broker::Broker;
use common::ferry::{apply_config, capture_config, Ferry};
use common::pg::{pgbench, table_checksum, PgCluster};
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
    let pg = PgCluster::shared();
    let (master, _) = pg.fresh_db(&format!("{label}_m"), master_ddl).await;
    let mut replicas = Vec::new();
    for i in 0..n {
        let (r, _) = pg.fresh_db(&format!("{label}_r{i}"), replica_ddl).await;
        replicas.push(r);
    }
    let port = common::free_port();
    let capture = Ferry::start(
        &capture_config("node-a", pg.port, &master, &broker().address(), port, ""),
        port,
    );
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
                let got = table_checksum(r, table).await;
                if got != want {
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
                panic!("not converged after {timeout:?}: {m}")
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

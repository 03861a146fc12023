//! Real PostgreSQL 15 clusters in temporary directories, one database per test.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use super::process::{as_postgres, on_test_exit, running_as_root};

/// Directory of the PostgreSQL 15 binaries.
pub fn pg_bin(tool: &str) -> String {
    let dir = std::env::var("PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into());
    format!("{dir}/{tool}")
}

/// A running cluster. Stopped (immediately) on drop and by the exit watchdog.
pub struct PgCluster {
    pub port: u16,
    pub dir: PathBuf,
}

static NEXT_DB: AtomicU32 = AtomicU32::new(0);

impl PgCluster {
    /// Starts a cluster with `wal_level=logical`, commit timestamps, and `extra` settings;
    /// every connection from loopback is trusted.
    pub fn start(extra: &[(&str, &str)]) -> PgCluster {
        Self::start_with_hba(
            extra,
            "local all all trust\nhost all all 127.0.0.1/32 trust\n\
             local replication all trust\nhost replication all 127.0.0.1/32 trust\n",
        )
    }

    /// Like [`PgCluster::start`] with a custom `pg_hba.conf`.
    pub fn start_with_hba(extra: &[(&str, &str)], hba: &str) -> PgCluster {
        Self::start_full(extra, hba, &[])
    }

    /// Like [`PgCluster::start`], with the server's clock shifted by `offset` (libfaketime
    /// syntax, e.g. `-2` for two seconds behind).
    #[allow(dead_code)]
    pub fn start_faketime(offset: &str) -> PgCluster {
        let lib = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
        assert!(
            std::path::Path::new(lib).exists(),
            "{lib} missing: scripts/setup installs the faketime package"
        );
        Self::start_full(
            &[],
            "local all all trust\nhost all all 127.0.0.1/32 trust\n\
             local replication all trust\nhost replication all 127.0.0.1/32 trust\n",
            &[
                ("LD_PRELOAD", lib),
                ("FAKETIME", offset),
                ("DONT_FAKE_MONOTONIC", "1"),
            ],
        )
    }

    fn start_full(extra: &[(&str, &str)], hba: &str, env: &[(&str, &str)]) -> PgCluster {
        let dir = tempfile::Builder::new()
            .prefix("pgferry-pg-")
            .tempdir()
            .expect("tempdir")
            .keep();
        if running_as_root() {
            Command::new("chown")
                .args(["-R", "postgres:postgres", dir.to_str().unwrap()])
                .status()
                .expect("chown");
        }
        let data = dir.join("data");
        let out = as_postgres(&pg_bin("initdb"))
            .args([
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
            ])
            .args(["-E", "UTF8", "--locale=C", "--no-sync"])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = super::free_port();
        let mut conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             wal_level = logical\ntrack_commit_timestamp = on\nmax_replication_slots = 32\n\
             max_wal_senders = 32\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
             shared_buffers = 64MB\nmax_connections = 200\n",
            dir.display()
        );
        for (k, v) in extra {
            conf.push_str(&format!("{k} = {v}\n"));
        }
        let conf_path = data.join("postgresql.auto.conf");
        std::fs::write(&conf_path, conf).expect("write postgresql.auto.conf");
        std::fs::write(data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        if running_as_root() {
            Command::new("chown")
                .args(["-R", "postgres:postgres", dir.to_str().unwrap()])
                .status()
                .expect("chown");
        }
        let log = dir.join("server.log");
        let status = as_postgres(&pg_bin("pg_ctl"))
            .envs(env.iter().copied())
            .args([
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "start",
            ])
            .output()
            .expect("run pg_ctl");
        assert!(
            status.status.success(),
            "pg_ctl start failed: {}\n{}",
            String::from_utf8_lossy(&status.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let stop = format!(
            "{} {} -D {} -m immediate stop; rm -rf {}",
            if running_as_root() {
                "runuser -u postgres --"
            } else {
                ""
            },
            pg_bin("pg_ctl"),
            data.display(),
            dir.display()
        );
        on_test_exit(&stop);
        PgCluster { port, dir }
    }

    /// One cluster per test binary, started on first use.
    pub fn shared() -> &'static PgCluster {
        static SHARED: OnceLock<PgCluster> = OnceLock::new();
        SHARED.get_or_init(|| PgCluster::start(&[]))
    }

    /// libpq URL for a database.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A connected client.
    pub async fn client(&self, db: &str) -> Client {
        let (client, conn) = tokio_postgres::connect(&self.url(db), NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to {db}: {e}"));
        tokio::spawn(conn);
        client
    }

    /// Creates a fresh database named after the test.
    pub async fn create_db(&self, label: &str) -> String {
        let n = NEXT_DB.fetch_add(1, Ordering::SeqCst);
        let name = format!("{label}_{}_{n}", std::process::id());
        let admin = self.client("postgres").await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        name
    }

    /// A fresh database with `ddl` applied, and a client connected to it.
    pub async fn fresh_db(&self, label: &str, ddl: &str) -> (String, Client) {
        let db = self.create_db(label).await;
        let client = self.client(&db).await;
        client.batch_execute(ddl).await.expect("apply test DDL");
        (db, client)
    }

    /// `confirmed_flush_lsn` of a slot as a byte offset (0 when missing).
    pub async fn confirmed_flush(&self, db: &str, slot: &str) -> u64 {
        let c = self.client(db).await;
        let row = c
            .query_opt(
                "SELECT (confirmed_flush_lsn - '0/0')::int8 FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .expect("query slot");
        row.and_then(|r| r.get::<_, Option<i64>>(0)).unwrap_or(0) as u64
    }

    /// The server's current WAL insert position as a byte offset.
    pub async fn current_wal(&self, db: &str) -> u64 {
        let c = self.client(db).await;
        let row = c
            .query_one("SELECT (pg_current_wal_lsn() - '0/0')::int8", &[])
            .await
            .expect("query wal");
        row.get::<_, i64>(0) as u64
    }

    /// Restarts the server: `mode` is `fast` (clean shutdown) or `immediate` (crash, then
    /// recovery). Waits until it accepts connections again.
    pub fn restart(&self, mode: &str) {
        let data = self.dir.join("data");
        let log = self.dir.join("server.log");
        let out = as_postgres(&pg_bin("pg_ctl"))
            .args(["-D", data.to_str().unwrap(), "-l", log.to_str().unwrap()])
            .args(["-m", mode, "-w", "-t", "120", "restart"])
            .output()
            .expect("run pg_ctl restart");
        assert!(
            out.status.success(),
            "pg_ctl restart -m {mode} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops immediately.
    pub fn stop(&self) {
        let _ = as_postgres(&pg_bin("pg_ctl"))
            .args([
                "-D",
                self.dir.join("data").to_str().unwrap(),
                "-m",
                "immediate",
                "stop",
            ])
            .output();
    }
}

/// Waits up to `timeout` for the cluster to accept connections (after restarts).
pub async fn wait_ready(cluster: &PgCluster, timeout: Duration) {
    super::wait_for("postgres to accept connections", timeout, || async {
        tokio_postgres::connect(&cluster.url("postgres"), NoTls)
            .await
            .ok()
            .map(|_| ())
    })
    .await;
}

/// Runs pgbench against a database of the cluster; panics with its output on failure.
pub fn pgbench(cluster: &PgCluster, db: &str, args: &[&str]) {
    let out = Command::new(pg_bin("pgbench"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &cluster.port.to_string(),
            "-U",
            "postgres",
        ])
        .args(args)
        .arg(db)
        .output()
        .expect("run pgbench");
    assert!(
        out.status.success(),
        "pgbench {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// [`table_checksum`], or `None` when the table cannot be read (e.g. does not exist yet).
pub async fn try_table_checksum(client: &Client, table: &str) -> Option<(i64, String)> {
    let row = client
        .query_one(
            &format!(
                "SELECT count(*), md5(coalesce(string_agg(whole_row::text, '|' ORDER BY whole_row::text), '')) \
                   FROM {table} whole_row"
            ),
            &[],
        )
        .await
        .ok()?;
    Some((row.get(0), row.get(1)))
}

/// An order-independent fingerprint of a table's rows: md5 of all rows' text, sorted.
pub async fn table_checksum(client: &Client, table: &str) -> (i64, String) {
    try_table_checksum(client, table)
        .await
        .unwrap_or_else(|| panic!("cannot checksum {table}"))
}

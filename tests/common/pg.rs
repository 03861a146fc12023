//! Real PostgreSQL clusters in temporary directories, one database per test: PostgreSQL 15
//! by default or the version `PG_BIN` names, PostgreSQL 17 (from `scripts/setup`) where a test
//! needs it, and physical standbys of either.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use super::process::{as_postgres, on_test_exit, running_as_root};

/// Directory of the server binaries the suite runs: `PG_BIN` (scripts/test points it at
/// PostgreSQL 16, 17 and 18 for the version subset), else Debian's PostgreSQL 15.
pub fn pg_bin_dir() -> String {
    std::env::var("PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into())
}

/// A tool of the suite's server version.
pub fn pg_bin(tool: &str) -> String {
    format!("{}/{tool}", pg_bin_dir())
}

/// Directory of the PostgreSQL 17 binaries: `PG17_BIN`, or where `scripts/setup` puts them.
pub fn pg17_bin_dir() -> String {
    let dir =
        std::env::var("PG17_BIN").unwrap_or_else(|_| format!("{}/pg17/bin", super::tools_dir()));
    assert!(
        std::path::Path::new(&dir).join("postgres").exists(),
        "PostgreSQL 17 not found at {dir}: run scripts/setup (or set PG17_BIN)"
    );
    dir
}

/// A running cluster. Stopped (immediately) on drop and by the exit watchdog.
pub struct PgCluster {
    pub port: u16,
    pub dir: PathBuf,
    /// Directory of the binaries it runs.
    pub bin_dir: String,
}

static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// `pg_hba.conf` trusting every loopback connection, replication included.
const TRUST_LOOPBACK: &str = "local all all trust\nhost all all 127.0.0.1/32 trust\n\
     local replication all trust\nhost replication all 127.0.0.1/32 trust\n";

/// A fresh temporary directory the server user owns.
fn server_dir() -> PathBuf {
    let dir = tempfile::Builder::new()
        .prefix("pgferry-pg-")
        .tempdir()
        .expect("tempdir")
        .keep();
    chown_to_postgres(&dir);
    dir
}

fn chown_to_postgres(dir: &std::path::Path) {
    if running_as_root() {
        Command::new("chown")
            .args(["-R", "postgres:postgres", dir.to_str().unwrap()])
            .status()
            .expect("chown");
    }
}

impl PgCluster {
    /// Starts a cluster with `wal_level=logical`, commit timestamps, and `extra` settings;
    /// every connection from loopback is trusted.
    pub fn start(extra: &[(&str, &str)]) -> PgCluster {
        Self::start_with_hba(extra, TRUST_LOOPBACK)
    }

    /// Like [`PgCluster::start`] with a custom `pg_hba.conf`.
    pub fn start_with_hba(extra: &[(&str, &str)], hba: &str) -> PgCluster {
        Self::start_full(&pg_bin_dir(), extra, hba, &[])
    }

    /// Like [`PgCluster::start_with_hba`], after `prepare` has written files (certificates)
    /// into the server's directory (paths in `extra` may name them relative to it).
    pub fn start_prepared(
        extra: &[(&str, &str)],
        hba: &str,
        prepare: impl FnOnce(&std::path::Path),
    ) -> PgCluster {
        let dir = server_dir();
        prepare(&dir);
        Self::start_in(dir, &pg_bin_dir(), extra, hba, &[])
    }

    /// Like [`PgCluster::start`] with the binaries in `bin_dir` (e.g. [`pg17_bin_dir`]).
    pub fn start_with_bin(bin_dir: &str, extra: &[(&str, &str)]) -> PgCluster {
        Self::start_full(bin_dir, extra, TRUST_LOOPBACK, &[])
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
            &pg_bin_dir(),
            &[],
            TRUST_LOOPBACK,
            &[
                ("LD_PRELOAD", lib),
                ("FAKETIME", offset),
                ("DONT_FAKE_MONOTONIC", "1"),
            ],
        )
    }

    /// Like [`PgCluster::start_faketime`], with the offset read from a file (re-read every
    /// second) that [`PgCluster::set_clock_offset`] rewrites: the server's clock can step.
    #[allow(dead_code)]
    pub fn start_faketime_file(offset: &str) -> PgCluster {
        let lib = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
        assert!(
            std::path::Path::new(lib).exists(),
            "{lib} missing: scripts/setup installs the faketime package"
        );
        let dir = server_dir();
        let file = dir.join("faketime");
        std::fs::write(&file, offset).expect("write the faketime file");
        Self::start_in(
            dir,
            &pg_bin_dir(),
            &[],
            TRUST_LOOPBACK,
            &[
                ("LD_PRELOAD", lib),
                ("FAKETIME_TIMESTAMP_FILE", file.to_str().unwrap()),
                ("FAKETIME_CACHE_DURATION", "1"),
                ("DONT_FAKE_MONOTONIC", "1"),
            ],
        )
    }

    /// Steps the clock of a cluster started by [`PgCluster::start_faketime_file`] to `offset`
    /// (libfaketime syntax); it takes effect within a second.
    #[allow(dead_code)]
    pub fn set_clock_offset(&self, offset: &str) {
        std::fs::write(self.dir.join("faketime"), offset).expect("rewrite the faketime file");
    }

    fn start_full(
        bin_dir: &str,
        extra: &[(&str, &str)],
        hba: &str,
        env: &[(&str, &str)],
    ) -> PgCluster {
        Self::start_in(server_dir(), bin_dir, extra, hba, env)
    }

    fn start_in(
        dir: std::path::PathBuf,
        bin_dir: &str,
        extra: &[(&str, &str)],
        hba: &str,
        env: &[(&str, &str)],
    ) -> PgCluster {
        let data = dir.join("data");
        run_checked(
            as_postgres(&format!("{bin_dir}/initdb"))
                .args(["-D", data.to_str().unwrap(), "-U", "postgres"])
                .args(["--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"]),
            "initdb",
        );
        let port = super::free_port();
        // PostgreSQL 18 counts replication origins against their own limit (default 10);
        // before 18, max_replication_slots is that limit too.
        let origins = if server_major(bin_dir) >= 18 {
            "max_active_replication_origins = 256\n"
        } else {
            ""
        };
        let conf = format!(
            "wal_level = logical\ntrack_commit_timestamp = on\nmax_replication_slots = 256\n\
             {origins}max_wal_senders = 32\nfsync = off\nsynchronous_commit = off\n\
             full_page_writes = off\nshared_buffers = 64MB\nmax_connections = 200\n{}",
            local_settings(port, &dir, extra)
        );
        let conf_path = data.join("postgresql.auto.conf");
        std::fs::write(&conf_path, conf).expect("write postgresql.auto.conf");
        std::fs::write(data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        chown_to_postgres(&dir);
        let cluster = PgCluster {
            port,
            dir,
            bin_dir: bin_dir.to_owned(),
        };
        cluster.pg_ctl_start(env);
        cluster
    }

    /// A physical standby of `primary` (which must be running with the same binaries):
    /// `pg_basebackup -R` through a new physical slot `slot`, then `extra` settings (which
    /// win over the primary's copied `postgresql.auto.conf`), started and streaming.
    pub fn standby_of(primary: &PgCluster, slot: &str, extra: &[(&str, &str)]) -> PgCluster {
        let dir = server_dir();
        let data = dir.join("data");
        run_checked(
            as_postgres(&primary.tool("pg_basebackup"))
                .args(["-D", data.to_str().unwrap()])
                .args(["-h", "127.0.0.1", "-p", &primary.port.to_string()])
                .args(["-U", "postgres", "-X", "stream", "-R", "-C", "-S", slot])
                .args(["--no-sync"]),
            "pg_basebackup",
        );
        let port = super::free_port();
        // Later lines of postgresql.auto.conf win over the primary's copied ones.
        let conf = local_settings(port, &dir, extra);
        let conf_path = data.join("postgresql.auto.conf");
        let mut text = std::fs::read_to_string(&conf_path).expect("read postgresql.auto.conf");
        text.push_str(&conf);
        std::fs::write(&conf_path, text).expect("write postgresql.auto.conf");
        chown_to_postgres(&dir);
        let cluster = PgCluster {
            port,
            dir,
            bin_dir: primary.bin_dir.clone(),
        };
        cluster.pg_ctl_start(&[]);
        cluster
    }

    /// A PostgreSQL 17 primary and a physical standby that synchronizes its failover slots
    /// (`sync_replication_slots`), sharing a fresh database `label_…` made with `ddl`
    /// before the base backup. On the primary, `synchronized_standby_slots` names the
    /// standby's physical slot, so logical walsenders send nothing the standby lacks.
    pub async fn failover_pair(label: &str, ddl: &str) -> (PgCluster, PgCluster, String, Client) {
        const PHYSICAL_SLOT: &str = "standby_1";
        let primary = PgCluster::start_with_bin(
            &pg17_bin_dir(),
            &[("synchronized_standby_slots", &format!("'{PHYSICAL_SLOT}'"))],
        );
        let (db, client) = primary.fresh_db(label, ddl).await;
        let conninfo = format!(
            "'host=127.0.0.1 port={} user=postgres dbname={db} application_name={PHYSICAL_SLOT}'",
            primary.port
        );
        let standby = PgCluster::standby_of(
            &primary,
            PHYSICAL_SLOT,
            &[
                ("sync_replication_slots", "on"),
                ("hot_standby_feedback", "on"),
                ("primary_conninfo", &conninfo),
                // Copied from the primary; once promoted, it has no standby to wait for.
                ("synchronized_standby_slots", "''"),
            ],
        );
        (primary, standby, db, client)
    }

    /// A logical slot as this standby's slot-sync worker keeps it: `(synced and persistent,
    /// confirmed_flush_lsn as bytes)`; `None` when absent or the server does not answer.
    pub async fn synced_slot(&self, db: &str, slot: &str) -> Option<(bool, i64)> {
        let (client, conn) = tokio_postgres::connect(&self.url(db), NoTls).await.ok()?;
        tokio::spawn(conn);
        let row = client
            .query_opt(
                "SELECT synced AND NOT temporary, (confirmed_flush_lsn - '0/0')::int8
                   FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .ok()??;
        Some((row.get(0), row.get::<_, Option<i64>>(1).unwrap_or(0)))
    }

    fn pg_ctl_start(&self, env: &[(&str, &str)]) {
        let data = self.dir.join("data");
        let log = self.dir.join("server.log");
        let status = as_postgres(&self.tool("pg_ctl"))
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
            self.tool("pg_ctl"),
            data.display(),
            self.dir.display()
        );
        on_test_exit(&stop);
    }

    /// One of this cluster's binaries.
    pub fn tool(&self, name: &str) -> String {
        format!("{}/{name}", self.bin_dir)
    }

    /// `pg_ctl promote`: a standby becomes a primary (waits until it accepts writes).
    pub fn promote(&self) {
        run_checked(
            as_postgres(&self.tool("pg_ctl"))
                .args(["-D", self.dir.join("data").to_str().unwrap()])
                .args(["-w", "promote"]),
            "pg_ctl promote",
        );
    }

    /// The server log so far.
    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// One cluster per test binary, started on first use.
    pub fn shared() -> &'static PgCluster {
        static SHARED: OnceLock<PgCluster> = OnceLock::new();
        SHARED.get_or_init(|| PgCluster::start(&[]))
    }

    /// Cluster `i` of three shared by the tests of a binary (a database per test on each),
    /// all started on first use: multi-master meshes put one node on each.
    pub fn shared_of_three(i: usize) -> &'static PgCluster {
        static CLUSTERS: OnceLock<Vec<PgCluster>> = OnceLock::new();
        &CLUSTERS.get_or_init(|| (0..3).map(|_| PgCluster::start(&[])).collect())[i]
    }

    /// libpq URL for a database.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A connected superuser client, through the Unix socket (`local all all trust` in every
    /// harness pg_hba.conf), so it works whatever the TCP rules are.
    pub async fn client(&self, db: &str) -> Client {
        let socket = format!(
            "host={} port={} user=postgres dbname={db}",
            self.dir.display(),
            self.port
        );
        let (client, conn) = tokio_postgres::connect(&socket, NoTls)
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
        let out = as_postgres(&self.tool("pg_ctl"))
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
        let _ = as_postgres(&self.tool("pg_ctl"))
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

/// Settings that make a cluster local to this test (its own port and socket directory),
/// followed by `extra`.
fn local_settings(port: u16, dir: &std::path::Path, extra: &[(&str, &str)]) -> String {
    let mut conf = format!(
        "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n",
        dir.display()
    );
    for (k, v) in extra {
        conf.push_str(&format!("{k} = {v}\n"));
    }
    conf
}

/// The major version of the server in `bin_dir` (`postgres --version`).
pub fn server_major(bin_dir: &str) -> u32 {
    let out = Command::new(format!("{bin_dir}/postgres"))
        .arg("--version")
        .output()
        .expect("postgres --version");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|w| w.split('.').next()?.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the version of {bin_dir}/postgres: {text}"))
}

/// Runs a server tool; panics with its stderr when it fails.
fn run_checked(command: &mut Command, what: &str) {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    let out = Command::new(cluster.tool("pgbench"))
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

/// The first column of every row `sql` returns, in order.
pub async fn first_column<T>(client: &Client, sql: &str) -> Vec<T>
where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
{
    client
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect()
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

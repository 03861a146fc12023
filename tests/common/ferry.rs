//! The real `pgferry` binary as a child process, with its config, log and metrics endpoint.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::process::{on_test_exit, signal};

/// Path of the binary under test.
pub fn pgferry_bin() -> &'static str {
    env!("CARGO_BIN_EXE_pgferry")
}

/// Runs `pgferry <args>` to its end; returns its exit code and output (stdout, then stderr).
pub fn cli(args: &[&str]) -> (i32, String) {
    let out = Command::new(pgferry_bin())
        .args(args)
        .output()
        .expect("run pgferry");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A running pgferry; killed on drop.
pub struct Ferry {
    child: Child,
    pub metrics_port: u16,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
}

/// Writes `yaml` to a temporary file and returns its path.
pub fn write_config(yaml: &str) -> PathBuf {
    let mut f = tempfile::Builder::new()
        .suffix(".yaml")
        .tempfile()
        .expect("config file");
    f.write_all(yaml.as_bytes()).expect("write config");
    f.keep().expect("keep config").1
}

/// A capture config for `db` on `pg_port`, publishing to `brokers`.
pub fn capture_config(
    node: &str,
    pg_port: u16,
    db: &str,
    brokers: &str,
    metrics_port: u16,
    extra_source: &str,
) -> String {
    format!(
        "node_id: {node}\n\
         source:\n  url: postgres://postgres@127.0.0.1:{pg_port}/{db}\n  slot: slot_{db}\n  \
         publication: pub_{db}\n  heartbeat_interval: 1s\n  status_interval: 1s\n{extra_source}\
         kafka:\n  brokers: {brokers}\n  topic_prefix: {db}\n\
         metrics:\n  listen: 127.0.0.1:{metrics_port}\n\
         log:\n  format: text\n  level: info,pgferry=debug\n"
    )
}

fn spawn(config_path: &std::path::Path, log_path: &std::path::Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .expect("log");
    let child = Command::new(pgferry_bin())
        .args(["run", "--config", config_path.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start pgferry");
    on_test_exit(&format!("kill -9 {} 2>/dev/null", child.id()));
    child
}

impl Ferry {
    /// Starts a capturing pgferry (node `node-a`) for `db` on `cluster`, publishing to `brokers`.
    pub fn capture(
        cluster: &super::pg::PgCluster,
        db: &str,
        brokers: &str,
        extra_source: &str,
    ) -> Ferry {
        let port = super::free_port();
        Ferry::start(
            &capture_config("node-a", cluster.port, db, brokers, port, extra_source),
            port,
        )
    }

    /// `pgferry run` applying the stream of `master` (as [`Ferry::capture`] publishes it)
    /// to `replicas` (database URLs).
    pub fn applier(master: &str, replicas: &[String], brokers: &str, extra_apply: &str) -> Ferry {
        let port = super::free_port();
        Ferry::start(
            &apply_config("node-a", master, replicas, brokers, port, extra_apply),
            port,
        )
    }

    /// Starts `pgferry run` with this config text.
    pub fn start(yaml: &str, metrics_port: u16) -> Ferry {
        let config_path = write_config(yaml);
        Self::start_with(config_path, metrics_port)
    }

    /// Starts `pgferry run` with an existing config file.
    pub fn start_with(config_path: PathBuf, metrics_port: u16) -> Ferry {
        let log_path = tempfile::NamedTempFile::new()
            .expect("log")
            .keep()
            .expect("keep")
            .1;
        let child = spawn(&config_path, &log_path);
        Ferry {
            child,
            metrics_port,
            config_path,
            log_path,
        }
    }

    /// Restarts with the same config (after a kill); the log continues in the same file.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log_path)
            .expect("log");
        let _ = writeln!(log, "--- restart ---");
        self.child = spawn(&self.config_path, &self.log_path);
    }

    /// Waits until `/readyz` says capture is streaming and every table's snapshot is in Kafka
    /// (`pgferry_snapshot_tables_remaining` is 0), so that later writes reach the topics as
    /// changes only.
    pub async fn wait_ready(&self) {
        self.wait_streaming().await;
        super::wait_for("snapshots to finish", Duration::from_secs(120), || async {
            (self
                .metric("pgferry_snapshot_tables_remaining", "")
                .unwrap_or(0.0)
                == 0.0)
                .then_some(())
        })
        .await;
    }

    /// Waits until `/readyz` says capture is streaming (snapshot chunks may still be running).
    pub async fn wait_streaming(&self) {
        super::wait_for("capture to be ready", Duration::from_secs(60), || async {
            self.http_get("/readyz")
                .filter(|(s, _)| *s == 200)
                .map(|_| ())
        })
        .await;
    }

    /// SIGKILL, no chance to flush or confirm anything.
    pub fn kill9(&mut self) {
        signal(&self.child, "-KILL");
        let _ = self.child.wait();
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        signal(&self.child, "-TERM");
    }

    /// Freezes the process (SIGSTOP): it holds its connections and does nothing.
    pub fn pause(&self) {
        signal(&self.child, "-STOP");
    }

    /// Lets a paused process go on (SIGCONT).
    pub fn resume(&self) {
        signal(&self.child, "-CONT");
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The log so far (stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits (up to `timeout`) until the log holds `text`.
    pub async fn wait_log(&self, text: &str, timeout: Duration) {
        super::wait_for(&format!("{text:?} in the log"), timeout, || async {
            self.log().contains(text).then_some(())
        })
        .await
    }

    /// GET a path on the metrics endpoint; `None` when not answering.
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        super::http_get(self.metrics_port, path)
    }

    /// A metric's value summed over all label sets matching `labels` (substring match).
    pub fn metric(&self, name: &str, labels: &str) -> Option<f64> {
        let (_, text) = self.http_get("/metrics")?;
        let mut found = None;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ')?;
            let matches_name = series == name || series.starts_with(&format!("{name}{{"));
            if matches_name && series.contains(labels) {
                *found.get_or_insert(0.0) += value.parse::<f64>().ok()?;
            }
        }
        found
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // On failure, or always with FERRY_TEST_LOGS set (to compare with a failing run).
        if std::thread::panicking() || std::env::var_os("FERRY_TEST_LOGS").is_some() {
            eprintln!(
                "---- pgferry log ({}) ----\n{}",
                self.log_path.display(),
                self.log()
            );
        }
    }
}

/// An apply-only config: `targets` (database URLs) follow `node`'s stream under `prefix`.
pub fn apply_config(
    node: &str,
    prefix: &str,
    targets: &[String],
    brokers: &str,
    metrics_port: u16,
    extra_apply: &str,
) -> String {
    let targets: String = targets
        .iter()
        .map(|t| format!("    - url: {t}\n"))
        .collect();
    format!(
        "node_id: applier\n\
         kafka:\n  brokers: {brokers}\n  topic_prefix: {prefix}\n\
         apply:\n  mode: replica\n  nodes: [{node}]\n  targets:\n{targets}{extra_apply}\
         metrics:\n  listen: 127.0.0.1:{metrics_port}\n\
         log:\n  format: text\n  level: info,pgferry=debug\n"
    )
}

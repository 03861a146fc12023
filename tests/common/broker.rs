//! A real tansu broker (Kafka protocol, in-memory storage) on a loopback port.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::process::{on_test_exit, signal};

/// Where `scripts/setup` installs tansu, unless `TANSU_BIN` says otherwise.
pub fn tansu_bin() -> String {
    std::env::var("TANSU_BIN").unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
        let tools =
            std::env::var("PGFERRY_TOOLS").unwrap_or(format!("{home}/.cache/pgferry/tools"));
        format!("{tools}/bin/tansu")
    })
}

/// A running broker; killed on drop.
pub struct Broker {
    pub port: u16,
    child: Child,
}

impl Broker {
    /// Starts tansu and waits until it accepts connections.
    pub fn start() -> Broker {
        let port = super::free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let log = tempfile::NamedTempFile::new()
            .expect("log file")
            .keep()
            .expect("keep")
            .1;
        let child = Command::new(tansu_bin())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .unwrap_or_else(|e| panic!("start tansu at {} (run scripts/setup): {e}", tansu_bin()));
        on_test_exit(&format!("kill -9 {} 2>/dev/null", child.id()));
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Broker { port, child }
    }

    /// `host:port` for clients.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Freezes the broker process (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        signal(&self.child, "-STOP");
    }

    /// Resumes a paused broker.
    pub fn resume(&self) {
        signal(&self.child, "-CONT");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

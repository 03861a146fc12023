//! Shared integration-test harness: real PostgreSQL clusters, a real tansu broker, and the
//! real `pgferry` binary, all on loopback ports, all cleaned up when the test process exits.
//!
//! Every test binary compiles this module but uses only part of it.
#![allow(dead_code)]

pub mod broker;
pub mod certs;
pub mod ferry;
pub mod kafka;
pub mod mesh;
pub mod pg;
pub mod process;

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `condition` until it returns `Some`, or fails the test after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = condition().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A free loopback TCP port (bound and released; good enough for tests on one machine).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// Where `scripts/setup` installs its tools, unless `PGFERRY_TOOLS` says otherwise.
pub fn tools_dir() -> String {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    std::env::var("PGFERRY_TOOLS").unwrap_or(format!("{home}/.cache/pgferry/tools"))
}

/// GET over plain HTTP/1.1 on loopback: (status, body); `None` when nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_request(port, "GET", path)
}

/// An HTTP request without a body on loopback; `None` when nothing answers.
pub fn http_request(port: u16, method: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let status = body.split_whitespace().nth(1)?.parse().ok()?;
    let text = body.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, text))
}

/// Small deterministic generator (xorshift64*), so a failing seed can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % (hi - lo) as u64) as i64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

//! The HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (liveness), `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use super::{Health, Metrics};

/// How stale the pipeline's last beat may be before `/healthz` fails.
pub const LIVENESS_TIMEOUT: Duration = Duration::from_secs(120);

/// Lag limits beyond which `/readyz` reports not ready (`metrics.ready_max_*`).
#[derive(Debug, Clone, Copy, Default)]
pub struct LagLimits {
    /// Apply lag, origin commit to apply commit.
    pub apply: Option<Duration>,
    /// Source WAL not yet confirmed, bytes.
    pub source_bytes: Option<u64>,
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Health,
    limits: LagLimits,
}

impl AppState {
    /// Ready: every component connected and running, and lag within the limits. `Err` says
    /// why not.
    fn readiness(&self) -> Result<(), String> {
        if !self.health.is_ready() {
            return Err(format!("not ready: {}", self.health.not_ready().join(", ")));
        }
        if let Some(max) = self.limits.apply {
            let lag = self.metrics.apply_lag_seconds.get();
            if lag > max.as_secs_f64() {
                return Err(format!(
                    "apply lag {lag:.1}s exceeds {}s",
                    max.as_secs_f64()
                ));
            }
        }
        if let Some(max) = self.limits.source_bytes {
            let lag = self.metrics.source_lag_bytes.get();
            if lag > i64::try_from(max).unwrap_or(i64::MAX) {
                return Err(format!("source lag {lag} bytes exceeds {max}"));
            }
        }
        Ok(())
    }
}

async fn metrics_page(State(s): State<AppState>) -> impl IntoResponse {
    s.metrics.ready.set(i64::from(s.readiness().is_ok()));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn healthz(State(s): State<AppState>) -> impl IntoResponse {
    if s.health.is_live(LIVENESS_TIMEOUT) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "pipeline loop stalled\n")
    }
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    match s.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

/// Binds the listener (so a port clash fails at start-up) and returns the serving future.
pub async fn bind(
    listen: SocketAddr,
    metrics: Arc<Metrics>,
    health: Health,
    limits: LagLimits,
    shutdown: CancellationToken,
) -> std::io::Result<impl std::future::Future<Output = std::io::Result<()>>> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState {
            metrics,
            health,
            limits,
        });
    Ok(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    })
}

/// `pgferry healthcheck`: GETs `path` on a running pgferry at `addr` and returns the HTTP
/// status (for container HEALTHCHECKs in images that have no curl).
pub fn probe(addr: &str, path: &str, timeout: std::time::Duration) -> std::io::Result<u16> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let target = addr.to_socket_addrs()?.next().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("no address for {addr}"),
        )
    })?;
    let mut stream = std::net::TcpStream::connect_timeout(&target, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 64];
    let n = stream.read(&mut head)?;
    let line = String::from_utf8_lossy(&head[..n]);
    line.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response"))
}

//! Wires the stages together and owns their lifecycle: signal handling, the metrics endpoint,
//! and supervision of the capture pipeline (retry transient errors with backoff, stop on
//! fatal ones). It only connects things; the work happens in the stage modules.
//!
//! Shutdown order on SIGTERM/SIGINT: stop reading the replication stream, drain Kafka,
//! confirm the acknowledged position to the source, close connections, stop the HTTP server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::{Classify, ErrorClass};
use crate::source::capture::{self, CaptureError, CaptureSettings};
use crate::telemetry::{http, Health, Metrics};

/// First retry delay after a transient failure; doubles up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// Longest retry delay.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A run that lasted this long resets the backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Why pgferry stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The metrics address could not be bound.
    #[error("cannot listen on metrics.listen")]
    MetricsBind(#[source] std::io::Error),
    /// Capture hit a fatal error.
    #[error("capture stopped")]
    Capture(#[source] CaptureError),
}

/// Formats an error with its whole `source()` chain, for log fields.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

/// Cancels `token` on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
fn spawn_signal_listener(token: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = match signal(SignalKind::terminate()) {
                Ok(s) => s,
                Err(error) => {
                    tracing::error!(%error, "cannot listen for SIGTERM");
                    return;
                }
            };
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; shutting down"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        token.cancel();
    });
}

/// Runs every role the config enables until a signal or a fatal error.
pub async fn run(config: Config) -> Result<(), AppError> {
    let metrics = Arc::new(Metrics::new(&config.node_id));
    let health = Health::default();
    health.beat();
    let shutdown = CancellationToken::new();
    spawn_signal_listener(shutdown.clone());
    let server = http::bind(
        config.metrics.listen,
        metrics.clone(),
        health.clone(),
        shutdown.clone(),
    )
    .await
    .map_err(AppError::MetricsBind)?;
    let server = tokio::spawn(server);
    tracing::info!(node = %config.node_id, metrics = %config.metrics.listen, "pgferry started");
    let result = match config.source {
        Some(source) => {
            let settings = CaptureSettings {
                node_id: config.node_id.clone(),
                source,
                kafka: config.kafka.clone(),
            };
            supervise_capture(settings, metrics, health, shutdown.clone()).await
        }
        None => {
            tracing::warn!("no source configured: nothing to capture");
            shutdown.cancelled().await;
            Ok(())
        }
    };
    shutdown.cancel();
    if let Ok(Err(error)) = server.await {
        tracing::warn!(%error, "metrics server ended with an error");
    }
    result
}

async fn supervise_capture(
    settings: CaptureSettings,
    metrics: Arc<Metrics>,
    health: Health,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    let mut backoff = INITIAL_BACKOFF;
    loop {
        let started = Instant::now();
        let result = capture::run(
            settings.clone(),
            metrics.clone(),
            health.clone(),
            shutdown.clone(),
        )
        .await;
        let error = match result {
            Ok(()) => return Ok(()),
            Err(e) if e.class() == ErrorClass::Fatal => return Err(AppError::Capture(e)),
            Err(e) => e,
        };
        if shutdown.is_cancelled() {
            return Ok(());
        }
        if started.elapsed() >= HEALTHY_RUN {
            backoff = INITIAL_BACKOFF;
        }
        metrics.restarts.inc();
        tracing::warn!(error = %ErrorChain(&error), backoff_ms = backoff.as_millis() as u64,
                       "capture failed; restarting from the last confirmed position");
        let deadline = Instant::now() + backoff;
        while Instant::now() < deadline {
            health.beat();
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_millis(500).min(backoff)) => {}
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

//! Wires the stages together and owns their lifecycle: signal handling, the metrics endpoint,
//! and supervision of the capture pipeline and the apply workers (retry transient errors with backoff, stop on
//! fatal ones). It only connects things; the work happens in the stage modules.
//!
//! Shutdown order on SIGTERM/SIGINT, within `shutdown_grace_period`: stop intake (the
//! replication stream, the Kafka consumers), drain and flush Kafka, commit the whole source
//! transactions applied so far, confirm the acknowledged position to the source, close
//! connections, stop the HTTP server, exit 0.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::apply::multimaster;
use crate::apply::worker::{self, WorkerSettings};
use crate::apply::ApplyError;
use crate::config::{ApplyMode, Config};
use crate::error::{Classify, ErrorChain, ErrorClass};
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
    /// Apply hit a fatal error.
    #[error("apply stopped")]
    Apply(#[source] ApplyError),
    /// A graceful stop took longer than `shutdown_grace_period`.
    #[error("did not stop within shutdown_grace_period ({0:?})")]
    ShutdownTimeout(Duration),
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
    let limits = http::LagLimits {
        apply: config.metrics.ready_max_apply_lag,
        source_bytes: config.metrics.ready_max_source_lag_bytes,
    };
    let server = http::bind(
        config.metrics.listen,
        metrics.clone(),
        health.clone(),
        limits,
        shutdown.clone(),
    )
    .await
    .map_err(AppError::MetricsBind)?;
    let server = tokio::spawn(server);
    tracing::info!(node = %config.node_id, metrics = %config.metrics.listen, "pgferry started");

    let mut stages: tokio::task::JoinSet<Result<(), AppError>> = tokio::task::JoinSet::new();
    if let Some(apply) = config
        .apply
        .as_ref()
        .filter(|a| a.mode == ApplyMode::MultiMaster)
    {
        // Before capture starts: every local delete from now on leaves a tombstone, and
        // every change carries its whole old row.
        let target = &apply.targets[0];
        supervise("multi-master setup", &metrics, &health, &shutdown, || {
            multimaster::setup(target, &apply.tables)
        })
        .await
        .map_err(AppError::Apply)?;
        let (target, conflict) = (target.clone(), apply.conflict.clone());
        let (m, h, s) = (metrics.clone(), health.clone(), shutdown.clone());
        stages.spawn(async move {
            supervise("multi-master maintenance", &m, &h, &s, || {
                multimaster::maintain(target.clone(), conflict.clone(), m.clone(), s.clone())
            })
            .await
            .map_err(AppError::Apply)
        });
    }
    if let Some(source) = config.source.clone() {
        let settings = CaptureSettings {
            node_id: config.node_id.clone(),
            source,
            kafka: config.kafka.clone(),
        };
        health.register("capture");
        let (m, h, s) = (metrics.clone(), health.clone(), shutdown.clone());
        stages.spawn(async move {
            supervise("capture", &m, &h, &s, || {
                capture::run(settings.clone(), m.clone(), h.clone(), s.clone())
            })
            .await
            .map_err(AppError::Capture)
        });
    }
    if let Some(apply) = &config.apply {
        for target in &apply.targets {
            for node in &apply.nodes {
                let settings = WorkerSettings {
                    node: node.clone(),
                    local_node: config.node_id.clone(),
                    target: target.clone(),
                    apply: apply.clone(),
                    kafka: config.kafka.clone(),
                };
                health.register(&format!("apply:{node}:{}", target.url.display_target()));
                let (m, h, s) = (metrics.clone(), health.clone(), shutdown.clone());
                stages.spawn(async move {
                    supervise("apply", &m, &h, &s, || {
                        worker::run(settings.clone(), m.clone(), h.clone(), s.clone())
                    })
                    .await
                    .map_err(AppError::Apply)
                });
            }
        }
    }
    if stages.is_empty() {
        tracing::warn!("neither source nor apply configured: nothing to do");
        shutdown.cancelled().await;
    }
    let mut result = Ok(());
    let grace = config.shutdown_grace_period;
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let joined = tokio::select! {
            joined = stages.join_next() => joined,
            _ = shutdown.cancelled(), if deadline.is_none() => {
                deadline = Some(tokio::time::Instant::now() + grace);
                continue;
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)),
                if deadline.is_some() => {
                tracing::error!(grace_ms = grace.as_millis() as u64,
                                "stages did not stop within shutdown_grace_period; exiting anyway \
                                 (nothing unacknowledged was confirmed, so nothing is lost)");
                stages.abort_all();
                return Err(AppError::ShutdownTimeout(grace));
            }
        };
        match joined {
            None => break,
            Some(Ok(Err(e))) => {
                // One stage failed for good: stop the others in order, report the first error.
                shutdown.cancel();
                if result.is_ok() {
                    result = Err(e);
                }
            }
            Some(_) => {}
        }
    }
    if result.is_ok() {
        tracing::info!("stopped cleanly");
    }
    shutdown.cancel();
    if let Ok(Err(error)) = server.await {
        tracing::warn!(%error, "metrics server ended with an error");
    }
    result
}

/// Runs a stage, restarting it after transient errors with exponential backoff; returns on
/// shutdown (`Ok`) or on a fatal error.
async fn supervise<E, F, Fut>(
    stage: &'static str,
    metrics: &Metrics,
    health: &Health,
    shutdown: &CancellationToken,
    mut run_once: F,
) -> Result<(), E>
where
    E: Classify + std::error::Error + 'static,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
{
    let mut backoff = INITIAL_BACKOFF;
    loop {
        let started = Instant::now();
        let error = match run_once().await {
            Ok(()) => return Ok(()),
            Err(e) if e.class() == ErrorClass::Fatal => {
                tracing::error!(stage, error = %ErrorChain(&e), "stopping: this needs an operator");
                return Err(e);
            }
            Err(e) => e,
        };
        if shutdown.is_cancelled() {
            return Ok(());
        }
        if started.elapsed() >= HEALTHY_RUN {
            backoff = INITIAL_BACKOFF;
        }
        metrics.restarts.inc();
        tracing::warn!(stage, error = %ErrorChain(&error), backoff_ms = backoff.as_millis() as u64,
                       "failed; restarting from the last durable position");
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

//! Wires the stages together and owns their lifecycle: signal handling, the metrics endpoint,
//! and supervision of the stages (capture, each apply worker, multi-master maintenance).
//! It only connects things; the work happens in the stage modules.
//!
//! Stages are isolated: each runs in its own task, and a stage that fails (or panics) is
//! restarted by its supervisor with backoff while the others go on. A transient error is
//! retried after 1 s, doubling to 30 s; a fatal one (it needs an operator: a poison change
//! under `on_poison: stop`, a missing slot, a bad setting on the server) is reported and
//! retried every 60 s, so the stage comes back by itself once the operator fixes the cause.
//! `/readyz` names each stage that is down and why; `pgferry_stage_up{stage}` is 0 for it.
//!
//! Shutdown order on SIGTERM/SIGINT, within `shutdown_grace_period`: stop intake (the
//! replication stream, the Kafka consumers), drain and flush Kafka, commit the whole source
//! transactions applied so far, confirm the acknowledged position to the source, close
//! connections, stop the HTTP server, exit 0.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::apply::contention::Contention;
use crate::apply::multimaster;
use crate::apply::worker::{self, WorkerSettings};
use crate::config::{ApplyMode, Config, TargetConfig};
use crate::error::{Classify, ErrorChain, ErrorClass};
use crate::source::capture::{self, CaptureSettings};
use crate::telemetry::{http, Health, Metrics};

/// First retry delay after a transient failure; doubles up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// Longest retry delay.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A run that lasted this long resets the backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(60);
/// Retry delay after a fatal error (one that needs an operator).
const FATAL_RETRY: Duration = Duration::from_secs(60);

/// Why pgferry stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The metrics address could not be bound.
    #[error("cannot listen on metrics.listen")]
    MetricsBind(#[source] std::io::Error),
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

    // Every stage counts towards readiness from the start: /readyz stays false until each
    // one says it runs (capture streaming from its slot, every worker applying), so nothing
    // written after a successful readiness check can predate the slot.
    let multi_master = config
        .apply
        .as_ref()
        .filter(|a| a.mode == ApplyMode::MultiMaster);
    if multi_master.is_some() {
        health.register(MULTI_MASTER_SETUP);
        health.register(MAINTENANCE);
    }
    if config.source.is_some() {
        health.register(capture::COMPONENT);
    }
    for (node, target) in apply_workers(&config) {
        health.register(&worker::component_name(node, &target.url.display_target()));
    }

    let mut stages: tokio::task::JoinSet<()> = tokio::task::JoinSet::new();
    let supervisor = Supervisor {
        metrics: metrics.clone(),
        health: health.clone(),
        shutdown: shutdown.clone(),
    };
    if let Some(apply) = multi_master {
        // Before capture starts: every local write from now on is versioned (deletes leave a
        // tombstone), the version store is published, and
        // every change carries its whole old row.
        let (target, tables) = (apply.targets[0].clone(), apply.tables.clone());
        // Validation guarantees a source in multi-master.
        let (publication, published) = config
            .source
            .as_ref()
            .map(|s| (s.publication.clone(), s.tables.clone()))
            .unwrap_or_default();
        let node = config.node_id.clone();
        supervisor
            .run(MULTI_MASTER_SETUP, true, || {
                let (target, tables, node) = (target.clone(), tables.clone(), node.clone());
                let (publication, published) = (publication.clone(), published.clone());
                async move {
                    multimaster::setup(&target, &node, &publication, &published, &tables).await
                }
            })
            .await;
        if shutdown.is_cancelled() {
            return finish(server, Ok(())).await;
        }
        health.set_ready(MULTI_MASTER_SETUP, true);
        let (target, conflict) = (target.clone(), apply.conflict.clone());
        let (node, peers) = (config.node_id.clone(), apply.nodes.clone());
        let sup = supervisor.clone();
        stages.spawn(async move {
            sup.run(MAINTENANCE, false, || {
                let (m, _, s) = sup.handles();
                let (target, conflict) = (target.clone(), conflict.clone());
                multimaster::maintain(target, conflict, node.clone(), peers.clone(), m, s)
            })
            .await
        });
    }
    if let Some(source) = config.source.clone() {
        let multi_master = config
            .apply
            .as_ref()
            .is_some_and(|apply| apply.mode == ApplyMode::MultiMaster);
        let settings = CaptureSettings {
            node_id: config.node_id.clone(),
            source,
            kafka: config.kafka.clone(),
            compact_snapshot_rows: !multi_master,
            resnapshot_rewritten: !multi_master,
        };
        let sup = supervisor.clone();
        stages.spawn(async move {
            sup.run(capture::COMPONENT, true, || {
                let (m, h, s) = sup.handles();
                capture::run(settings.clone(), m, h, s)
            })
            .await
        });
    }
    if let Some(apply) = &config.apply {
        for target in &apply.targets {
            // The workers of one target share what they see of lock contention.
            let contention = Arc::new(Contention::default());
            for node in &apply.nodes {
                let settings = WorkerSettings {
                    node: node.clone(),
                    local_node: config.node_id.clone(),
                    target: target.clone(),
                    apply: apply.clone(),
                    kafka: config.kafka.clone(),
                    contention: contention.clone(),
                };
                let component = worker::component_name(node, &target.url.display_target());
                let sup = supervisor.clone();
                stages.spawn(async move {
                    sup.run(&component, true, || {
                        let (m, h, s) = sup.handles();
                        worker::run(settings.clone(), m, h, s)
                    })
                    .await
                });
            }
        }
    }
    if stages.is_empty() {
        tracing::warn!("neither source nor apply configured: nothing to do");
        shutdown.cancelled().await;
    }
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
        if joined.is_none() {
            break;
        }
    }
    tracing::info!("stopped cleanly");
    finish(server, Ok(())).await
}

/// Stage names in `/readyz`, `pgferry_stage_up` and the log (capture and the apply workers
/// name theirs: [`capture::COMPONENT`], [`worker::component_name`]).
const MULTI_MASTER_SETUP: &str = "multi-master setup";
const MAINTENANCE: &str = "maintenance";

/// One apply worker per (source node, target) pair.
fn apply_workers(config: &Config) -> impl Iterator<Item = (&String, &TargetConfig)> {
    config.apply.iter().flat_map(|apply| {
        apply
            .targets
            .iter()
            .flat_map(move |target| apply.nodes.iter().map(move |node| (node, target)))
    })
}

/// Stops the HTTP server and returns `result`.
async fn finish(
    server: tokio::task::JoinHandle<Result<(), std::io::Error>>,
    result: Result<(), AppError>,
) -> Result<(), AppError> {
    if let Ok(Err(error)) = server.await {
        tracing::warn!(%error, "metrics server ended with an error");
    }
    result
}

/// Runs stages and restarts them when they fail.
#[derive(Clone)]
struct Supervisor {
    metrics: Arc<Metrics>,
    health: Health,
    shutdown: CancellationToken,
}

impl Supervisor {
    /// What a stage attempt needs of the process: metrics, health and the shutdown signal.
    fn handles(&self) -> (Arc<Metrics>, Health, CancellationToken) {
        (
            self.metrics.clone(),
            self.health.clone(),
            self.shutdown.clone(),
        )
    }

    /// Runs a stage until it returns `Ok` (shutdown) or shutdown is requested. Each attempt
    /// runs in its own task, so a panic is caught (as a failed attempt) instead of taking the
    /// process down. A failed attempt marks the stage down in `/readyz` (with the reason) and
    /// in `pgferry_stage_up`, then retries: transient errors with exponential backoff, fatal
    /// ones every [`FATAL_RETRY`]. Stages that report their own readiness (`reports_ready`)
    /// set it again when they are running; the others count as ready while an attempt runs.
    async fn run<E, F, Fut>(&self, stage: &str, reports_ready: bool, mut run_once: F)
    where
        E: Classify + std::error::Error + Send + 'static,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
    {
        let up = self.metrics.stage_up.with_label_values(&[stage]);
        let restarts = self.metrics.stage_restarts.with_label_values(&[stage]);
        let mut backoff = INITIAL_BACKOFF;
        loop {
            let started = Instant::now();
            up.set(1);
            if !reports_ready {
                self.health.set_ready(stage, true);
            }
            let (reason, wait) = match tokio::spawn(run_once()).await {
                Ok(Ok(())) => return,
                Ok(Err(e)) if e.class() == ErrorClass::Fatal => {
                    let reason = ErrorChain(&e).to_string();
                    tracing::error!(stage, error = %reason, retry_s = FATAL_RETRY.as_secs(),
                                    "stage stopped: this needs an operator; other stages go on, and this one retries");
                    (reason, FATAL_RETRY)
                }
                Ok(Err(e)) => {
                    let reason = ErrorChain(&e).to_string();
                    tracing::warn!(stage, error = %reason, backoff_ms = backoff.as_millis() as u64,
                                   "stage failed; restarting from the last durable position");
                    (reason, backoff)
                }
                Err(join) => {
                    let reason = format!("the stage panicked: {}", panic_text(join));
                    tracing::error!(stage, error = %reason, backoff_ms = backoff.as_millis() as u64,
                                    "stage panicked (a bug: please report it); restarting from the last durable position");
                    (reason, backoff)
                }
            };
            up.set(0);
            restarts.inc();
            self.metrics.restarts.inc();
            self.health.set_down(stage, &reason);
            if self.shutdown.is_cancelled() {
                return;
            }
            if started.elapsed() >= HEALTHY_RUN {
                backoff = INITIAL_BACKOFF;
            }
            let deadline = Instant::now() + wait;
            while Instant::now() < deadline {
                self.health.beat();
                tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500).min(wait)) => {}
                }
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// The message of a panicked task, if it has one.
fn panic_text(join: tokio::task::JoinError) -> String {
    match join.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_owned()),
        Err(join) => join.to_string(),
    }
}

//! Liveness and readiness state, written by the pipeline and read by `/healthz`, `/readyz`.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::pgtime::PgTimestamp;

/// Shared health flags.
#[derive(Debug, Default, Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    ready: AtomicBool,
    last_beat_ms: AtomicI64,
}

impl Health {
    /// The pipeline loop made progress (or is deliberately waiting, e.g. in backoff).
    pub fn beat(&self) {
        self.inner
            .last_beat_ms
            .store(PgTimestamp::now().unix_millis(), Ordering::Relaxed);
    }

    /// Sets readiness: connected and streaming.
    pub fn set_ready(&self, ready: bool) {
        self.inner.ready.store(ready, Ordering::Relaxed);
    }

    /// Readiness.
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Relaxed)
    }

    /// Liveness: the loop beat within `timeout`.
    pub fn is_live(&self, timeout: Duration) -> bool {
        let age =
            PgTimestamp::now().unix_millis() - self.inner.last_beat_ms.load(Ordering::Relaxed);
        age <= timeout.as_millis() as i64
    }
}

//! Liveness and readiness state, written by the pipeline and read by `/healthz`, `/readyz`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::pgtime::PgTimestamp;

/// Shared health flags.
#[derive(Debug, Default, Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Readiness per pipeline component (capture, each apply worker).
    components: Mutex<BTreeMap<String, bool>>,
    last_beat_ms: AtomicI64,
}

impl Health {
    /// The pipeline loop made progress (or is deliberately waiting, e.g. in backoff).
    pub fn beat(&self) {
        self.inner
            .last_beat_ms
            .store(PgTimestamp::now().unix_millis(), Ordering::Relaxed);
    }

    /// Registers a component as not ready yet; readiness waits for every registered one.
    pub fn register(&self, component: &str) {
        self.components()
            .entry(component.to_owned())
            .or_insert(false);
    }

    /// Sets one component's readiness (connected and streaming or applying).
    pub fn set_ready(&self, component: &str, ready: bool) {
        self.components().insert(component.to_owned(), ready);
    }

    /// Ready when at least one component is registered and all of them are ready.
    pub fn is_ready(&self) -> bool {
        let c = self.components();
        !c.is_empty() && c.values().all(|r| *r)
    }

    /// The components that are not ready, by name (`capture`, `apply:<node>:<target>`).
    pub fn not_ready(&self) -> Vec<String> {
        let c = self.components();
        if c.is_empty() {
            return vec!["nothing running yet".to_owned()];
        }
        c.iter()
            .filter(|(_, r)| !**r)
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn components(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, bool>> {
        self.inner
            .components
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Liveness: the loop beat within `timeout`.
    pub fn is_live(&self, timeout: Duration) -> bool {
        let age =
            PgTimestamp::now().unix_millis() - self.inner.last_beat_ms.load(Ordering::Relaxed);
        age <= timeout.as_millis() as i64
    }
}

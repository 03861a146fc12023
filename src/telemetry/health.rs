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
    /// State per pipeline component (capture, each apply worker, maintenance).
    components: Mutex<BTreeMap<String, Component>>,
    last_beat_ms: AtomicI64,
}

#[derive(Debug, Default, Clone)]
struct Component {
    ready: bool,
    /// Why it is down (the last error), when it is.
    reason: Option<String>,
    /// Target tables with unresolved dead letters (apply workers): the component runs, but
    /// its target is not an exact copy until an operator resolves them.
    diverged: Vec<String>,
}

impl Component {
    fn ok(&self) -> bool {
        self.ready && self.diverged.is_empty()
    }

    fn describe(&self, name: &str) -> String {
        let mut text = name.to_owned();
        if let Some(reason) = &self.reason {
            text.push_str(&format!(" (down: {reason})"));
        }
        if !self.diverged.is_empty() {
            text.push_str(&format!(
                " (diverged tables: {}; see `pgferry dead-letters list`)",
                self.diverged.join(", ")
            ));
        }
        text
    }
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
        self.components().entry(component.to_owned()).or_default();
    }

    /// Sets one component's readiness (connected and streaming or applying); ready clears
    /// the last failure reason.
    pub fn set_ready(&self, component: &str, ready: bool) {
        let mut c = self.components();
        let entry = c.entry(component.to_owned()).or_default();
        entry.ready = ready;
        if ready {
            entry.reason = None;
        }
    }

    /// A component failed and is waiting to retry: not ready, with the reason.
    pub fn set_down(&self, component: &str, reason: &str) {
        let mut c = self.components();
        let entry = c.entry(component.to_owned()).or_default();
        entry.ready = false;
        entry.reason = Some(reason.to_owned());
    }

    /// The target tables of an apply component that have unresolved dead letters.
    pub fn set_diverged(&self, component: &str, tables: Vec<String>) {
        self.components()
            .entry(component.to_owned())
            .or_default()
            .diverged = tables;
    }

    /// Ready when at least one component is registered and all of them are ready, with no
    /// diverged table.
    pub fn is_ready(&self) -> bool {
        let c = self.components();
        !c.is_empty() && c.values().all(Component::ok)
    }

    /// What keeps readiness false: each component that is down (with why) or whose target has
    /// diverged tables, by name (`capture`, `apply:<node>:<target>`, `maintenance`).
    pub fn not_ready(&self) -> Vec<String> {
        let c = self.components();
        if c.is_empty() {
            return vec!["nothing running yet".to_owned()];
        }
        c.iter()
            .filter(|(_, state)| !state.ok())
            .map(|(name, state)| state.describe(name))
            .collect()
    }

    fn components(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Component>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_what_is_down_and_what_diverged() {
        let h = Health::default();
        assert!(!h.is_ready());
        h.register("capture");
        h.register("apply:a:db");
        h.set_ready("capture", true);
        h.set_ready("apply:a:db", true);
        assert!(h.is_ready());
        h.set_down("capture", "connection refused");
        assert_eq!(h.not_ready(), vec!["capture (down: connection refused)"]);
        h.set_ready("capture", true);
        h.set_diverged("apply:a:db", vec!["public.t".into()]);
        assert!(!h.is_ready());
        assert!(h.not_ready()[0].contains("diverged tables: public.t"));
        h.set_diverged("apply:a:db", Vec::new());
        assert!(h.is_ready());
    }
}

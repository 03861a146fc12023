//! Lock contention between the workers of one multi-master target.
//!
//! A node applies each peer's stream with its own worker, so when peers write the same keys,
//! several workers' target transactions write the same rows. Each transaction holds the row
//! locks of a whole batch until it commits, so two of them can wait for each other in a
//! cycle. PostgreSQL breaks such a cycle only after `deadlock_timeout` (1 s by default) by
//! failing one of them, which replays its batch; local writers of those keys queue behind
//! both meanwhile. With a small set of hot keys and a backlog, every batch holds every hot key
//! and the cycles follow one another: the node's own writers barely get a row in.
//!
//! Under contention the workers of the target therefore take turns: before a target
//! transaction writes its first row, it takes the target's apply turn ([`APPLY_TURN`], an
//! advisory lock held until the transaction ends). Only one worker writes at a time, so no
//! two of them wait for each other; a worker's lanes write under their worker's turn. Local
//! writers do not take the turn and are not slowed by it; what remains possible is a cycle
//! between a worker and a local transaction (for example both inserting the same new key
//! while the other holds its version), which PostgreSQL breaks as before.
//!
//! Taking turns gives up applying several peers' streams at once, so it is switched on only
//! by contention: for [`CONTENDED_FOR`] after any worker of the target last met a lock
//! conflict. A first try locked each batch's rows in key order instead (`SELECT … ORDER BY
//! key FOR UPDATE`): it costs a lookup and a WAL record per row (on PostgreSQL 15, 5,000
//! random rows: 26–34 ms on top of the 46–53 ms update), and it cannot lock a row that does
//! not exist when it runs (a deleted key whose tombstone was collected, a key inserted
//! meanwhile): in the hot-key test the cycles went on.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long the workers of a target take turns after the last lock conflict.
pub const CONTENDED_FOR: Duration = Duration::from_secs(300);

/// Takes the apply turn of the target database, held until the transaction ends.
pub const APPLY_TURN: &str = "SELECT pg_advisory_xact_lock(hashtext('pgferry.apply'))";

/// Shared by the workers of one target: when one of them last met a lock conflict.
#[derive(Debug, Default)]
pub struct Contention {
    last_conflict: Mutex<Option<Instant>>,
}

impl Contention {
    /// A worker of the target met a lock conflict (a deadlock, a serialization failure or
    /// a lock timeout) at `now`.
    pub fn record(&self, now: Instant) {
        let mut last = self.last_conflict.lock().unwrap_or_else(|e| e.into_inner());
        *last = Some(last.map_or(now, |l| l.max(now)));
    }

    /// Whether target transactions writing at `now` take turns.
    pub fn contended(&self, now: Instant) -> bool {
        let last = self.last_conflict.lock().unwrap_or_else(|e| e.into_inner());
        last.is_some_and(|l| now.saturating_duration_since(l) < CONTENDED_FOR)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncontended_until_a_conflict() {
        let c = Contention::default();
        let t0 = Instant::now();
        assert!(!c.contended(t0));
        assert!(!c.contended(t0 + CONTENDED_FOR * 2));
    }

    #[test]
    fn contended_for_the_window_after_the_last_conflict() {
        let c = Contention::default();
        let t0 = Instant::now();
        c.record(t0);
        assert!(c.contended(t0));
        assert!(c.contended(t0 + CONTENDED_FOR - Duration::from_millis(1)));
        assert!(!c.contended(t0 + CONTENDED_FOR));
        // A later conflict extends the window; an earlier one reported late does not cut it.
        let t1 = t0 + CONTENDED_FOR / 2;
        c.record(t1);
        c.record(t0);
        assert!(c.contended(t1 + CONTENDED_FOR - Duration::from_millis(1)));
        assert!(!c.contended(t1 + CONTENDED_FOR));
    }
}

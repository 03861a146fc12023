//! What to do with the replication slot at the start of a capture run, decided from what the
//! server and `pgferry.snapshot_state` say. Pure: [`plan`] returns a [`SlotPlan`] and the
//! capture shell carries it out; this module runs no SQL.
//!
//! The rule it owns: a slot that pgferry once streamed from (its snapshot is recorded as
//! completed) and that is now missing or invalidated is a *loss* — the changes after its last
//! confirmed position are gone from the server. A loss is never repaired silently: it stops
//! capture with an error saying what to do, or, with `source.on_slot_loss: recreate`, the slot
//! is created anew with a loud warning. It does not own the replication commands themselves
//! ([`create_slot_command`] only renders one).

use crate::config::{OnSlotLoss, SnapshotMode};
use crate::lsn::Lsn;
use crate::source::catalog::SlotInfo;
use crate::sql::quote_ident;

/// First server version whose `CREATE_REPLICATION_SLOT` accepts `FAILOVER` and that can
/// synchronize logical slots to standbys.
pub const FAILOVER_SLOTS_SINCE: i32 = 170_000;

/// The decision for one capture start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotPlan {
    /// The slot is usable and its snapshot is done: stream from `confirmed`.
    Resume {
        /// The slot's `confirmed_flush_lsn`.
        confirmed: Lsn,
    },
    /// First start: no slot and no record of one. Create it (and snapshot if configured).
    Create,
    /// The slot exists but its initial snapshot never finished: drop it and start over (some
    /// snapshot rows are re-sent).
    RestartSnapshot,
    /// The slot exists but is not a pgoutput slot on this database.
    Mismatch {
        /// Its plugin.
        plugin: Option<String>,
        /// Its database.
        database: Option<String>,
    },
    /// The slot pgferry streamed from is gone or invalidated, and `on_slot_loss` is `stop`.
    Stop(SlotLoss),
    /// The slot pgferry streamed from is gone or invalidated, and `on_slot_loss` is
    /// `recreate`: drop what is left of it, forget its snapshot, create it anew.
    Recreate(SlotLoss),
}

/// How a slot was lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotLoss {
    /// The slot does not exist although its snapshot was recorded as completed.
    Missing {
        /// Where its snapshot ended: streaming had reached at least this far.
        consistent_lsn: Lsn,
    },
    /// The server invalidated the slot; it cannot be streamed from any more.
    Invalidated {
        /// The server's reason (`wal_removed`, `rows_removed`, `wal_level_insufficient`, …).
        reason: String,
        /// The slot's last confirmed position, if the server still reports one.
        confirmed: Option<Lsn>,
    },
}

impl SlotLoss {
    /// Whether something is left of the slot on the server that must be dropped first.
    pub fn slot_exists(&self) -> bool {
        matches!(self, SlotLoss::Invalidated { .. })
    }

    /// The last position known to be in Kafka: changes after it may be missing.
    pub fn reached(&self) -> Option<Lsn> {
        match self {
            SlotLoss::Missing { consistent_lsn } => Some(*consistent_lsn),
            SlotLoss::Invalidated { confirmed, .. } => *confirmed,
        }
    }
}

/// Decides what to do with the slot.
///
/// - `slot`: the slot as the server reports it, `None` when it does not exist.
/// - `snapshot_lsn`: the consistent point recorded in `pgferry.snapshot_state` when the slot's
///   snapshot completed (pgferry records it for `snapshot: never` too), `None` when absent.
pub fn plan(
    slot: Option<&SlotInfo>,
    snapshot_lsn: Option<Lsn>,
    database: &str,
    snapshot: SnapshotMode,
    on_loss: OnSlotLoss,
) -> SlotPlan {
    let on_loss = |loss| match on_loss {
        OnSlotLoss::Stop => SlotPlan::Stop(loss),
        OnSlotLoss::Recreate => SlotPlan::Recreate(loss),
    };
    let Some(info) = slot else {
        return match snapshot_lsn {
            Some(consistent_lsn) => on_loss(SlotLoss::Missing { consistent_lsn }),
            None => SlotPlan::Create,
        };
    };
    if info.plugin.as_deref() != Some("pgoutput") || info.database.as_deref() != Some(database) {
        return SlotPlan::Mismatch {
            plugin: info.plugin.clone(),
            database: info.database.clone(),
        };
    }
    // With `snapshot: never` there is nothing to finish: a slot made by hand (or by a version
    // that did not record snapshots) is streamed from as it is.
    let completed = snapshot_lsn.is_some() || snapshot == SnapshotMode::Never;
    if !completed {
        // An invalidated slot whose snapshot never finished loses nothing a new snapshot does
        // not re-send.
        return SlotPlan::RestartSnapshot;
    }
    if let Some(reason) = &info.invalidation {
        return on_loss(SlotLoss::Invalidated {
            reason: reason.clone(),
            confirmed: info.confirmed_flush,
        });
    }
    SlotPlan::Resume {
        confirmed: info.confirmed_flush.unwrap_or_default(),
    }
}

/// `CREATE_REPLICATION_SLOT` in the option-list syntax (PostgreSQL 15+). `FAILOVER` is only
/// sent when asked for; callers ask only on servers that know it.
pub fn create_slot_command(slot: &str, export_snapshot: bool, failover: bool) -> String {
    let snapshot = if export_snapshot { "export" } else { "nothing" };
    let failover = if failover { ", FAILOVER true" } else { "" };
    format!(
        "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT '{snapshot}'{failover})",
        quote_ident(slot)
    )
}

/// `ALTER_REPLICATION_SLOT … (FAILOVER true)` (PostgreSQL 17+), for a slot created before
/// failover slots were asked for.
pub fn enable_failover_command(slot: &str) -> String {
    format!(
        "ALTER_REPLICATION_SLOT {} (FAILOVER true)",
        quote_ident(slot)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const DB: &str = "shop";

    fn usable(confirmed: u64) -> SlotInfo {
        SlotInfo {
            plugin: Some("pgoutput".into()),
            database: Some(DB.into()),
            active: false,
            confirmed_flush: Some(Lsn(confirmed)),
            invalidation: None,
            failover: None,
        }
    }

    fn plan_stop(slot: Option<&SlotInfo>, snap: Option<Lsn>, mode: SnapshotMode) -> SlotPlan {
        plan(slot, snap, DB, mode, OnSlotLoss::Stop)
    }

    #[test]
    fn first_start_creates() {
        for mode in [SnapshotMode::Initial, SnapshotMode::Never] {
            assert_eq!(plan_stop(None, None, mode), SlotPlan::Create);
        }
    }

    #[test]
    fn completed_slot_resumes_from_confirmed_flush() {
        let slot = usable(0x500);
        assert_eq!(
            plan_stop(Some(&slot), Some(Lsn(0x100)), SnapshotMode::Initial),
            SlotPlan::Resume {
                confirmed: Lsn(0x500)
            }
        );
        // `never` with no record: a hand-made slot is used as it is.
        assert_eq!(
            plan_stop(Some(&slot), None, SnapshotMode::Never),
            SlotPlan::Resume {
                confirmed: Lsn(0x500)
            }
        );
    }

    #[test]
    fn unfinished_snapshot_restarts() {
        let mut slot = usable(0x500);
        assert_eq!(
            plan_stop(Some(&slot), None, SnapshotMode::Initial),
            SlotPlan::RestartSnapshot
        );
        slot.invalidation = Some("wal_removed".into());
        assert_eq!(
            plan_stop(Some(&slot), None, SnapshotMode::Initial),
            SlotPlan::RestartSnapshot
        );
    }

    #[test]
    fn missing_slot_after_completed_snapshot_is_a_loss() {
        for mode in [SnapshotMode::Initial, SnapshotMode::Never] {
            let loss = SlotLoss::Missing {
                consistent_lsn: Lsn(0x100),
            };
            assert_eq!(
                plan(None, Some(Lsn(0x100)), DB, mode, OnSlotLoss::Stop),
                SlotPlan::Stop(loss.clone())
            );
            assert_eq!(
                plan(None, Some(Lsn(0x100)), DB, mode, OnSlotLoss::Recreate),
                SlotPlan::Recreate(loss.clone())
            );
            assert!(!loss.slot_exists());
            assert_eq!(loss.reached(), Some(Lsn(0x100)));
        }
    }

    #[test]
    fn invalidated_slot_is_a_loss() {
        let mut slot = usable(0x500);
        slot.invalidation = Some("rows_removed".into());
        let loss = SlotLoss::Invalidated {
            reason: "rows_removed".into(),
            confirmed: Some(Lsn(0x500)),
        };
        for mode in [SnapshotMode::Initial, SnapshotMode::Never] {
            assert_eq!(
                plan(Some(&slot), Some(Lsn(0x100)), DB, mode, OnSlotLoss::Stop),
                SlotPlan::Stop(loss.clone())
            );
            assert_eq!(
                plan(
                    Some(&slot),
                    Some(Lsn(0x100)),
                    DB,
                    mode,
                    OnSlotLoss::Recreate
                ),
                SlotPlan::Recreate(loss.clone())
            );
        }
        assert!(loss.slot_exists());
        assert_eq!(loss.reached(), Some(Lsn(0x500)));
    }

    #[test]
    fn foreign_slot_is_a_mismatch_whatever_else_holds() {
        let mut slot = usable(0x500);
        slot.plugin = Some("test_decoding".into());
        slot.invalidation = Some("wal_removed".into());
        let want = SlotPlan::Mismatch {
            plugin: Some("test_decoding".into()),
            database: Some(DB.into()),
        };
        assert_eq!(
            plan(
                Some(&slot),
                Some(Lsn(1)),
                DB,
                SnapshotMode::Initial,
                OnSlotLoss::Recreate
            ),
            want
        );
        let mut other_db = usable(0x500);
        other_db.database = Some("other".into());
        assert!(matches!(
            plan_stop(Some(&other_db), None, SnapshotMode::Never),
            SlotPlan::Mismatch { .. }
        ));
    }

    #[test]
    fn create_commands() {
        assert_eq!(
            create_slot_command("s1", true, false),
            "CREATE_REPLICATION_SLOT \"s1\" LOGICAL pgoutput (SNAPSHOT 'export')"
        );
        assert_eq!(
            create_slot_command("s1", false, true),
            "CREATE_REPLICATION_SLOT \"s1\" LOGICAL pgoutput (SNAPSHOT 'nothing', FAILOVER true)"
        );
        assert_eq!(
            enable_failover_command("s1"),
            "ALTER_REPLICATION_SLOT \"s1\" (FAILOVER true)"
        );
    }
}

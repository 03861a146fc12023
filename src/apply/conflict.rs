//! Multi-master conflict resolution: pure decisions, no I/O.
//!
//! A row's version is `(t, node)` ([`Version`]): a clock value stamped by the writing node,
//! never below the key's previous version + 1, then the node id, which breaks ties the same
//! way on every node. Deletes leave a tombstone that carries the delete's version. A
//! resolver's merge gets [`merged_version`]. An incoming change applies only when its
//! version is greater than the local version (the row's, else the tombstone's); every node
//! applies the same rule to the same set of versions, so every node keeps the same greatest
//! one whatever the arrival order (see `docs/ARCHITECTURE.md`, "Conflict resolution").
//!
//! Whether a change *conflicts* is a separate question, answered only for reporting and for
//! custom resolvers: a change is sequential when it was made on top of exactly the row this
//! node holds (the remote old-row image equals the local row), and concurrent otherwise.

use crate::event::Op;

pub use crate::event::Version;

/// Marks a resolver's merge in a version's node id (node ids never contain it).
pub const MERGE_MARK: char = '+';

/// The version a resolver's merge of `local` and `remote` gets: just above the greater of
/// the two, `(t, node + "+")`, where a merged input counts as the version it was merged
/// above. Above both inputs, so a version never moves back; a join (commutative,
/// associative, idempotent), so every node that merges the same versions, in any order and
/// however often, ends on the same version; and never equal to a real write's.
pub fn merged_version(local: Option<&Version>, remote: &Version) -> Version {
    let underlying = |v: &Version| Version {
        ts_us: v.ts_us,
        node: v.node.trim_end_matches(MERGE_MARK).to_owned(),
    };
    let top = match local {
        Some(l) => underlying(l).max(underlying(remote)),
        None => underlying(remote),
    };
    Version {
        ts_us: top.ts_us,
        node: format!("{}{MERGE_MARK}", top.node),
    }
}

/// What this node holds for a key, as read under a row lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Local {
    /// Neither a row nor a tombstone.
    Nothing,
    /// A live row.
    Row {
        /// Its version; `None` when it was written earlier in the transaction being applied.
        version: Option<Version>,
        /// Whether it equals the remote change's old-row image (`None`: the change carries
        /// no old image to compare, as for inserts).
        matches_before: Option<bool>,
    },
    /// No row, but a tombstone.
    Tombstone {
        /// Its version; `None` when written earlier in the transaction being applied.
        version: Option<Version>,
    },
}

/// The kinds of conflict, named after what met what (remote first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConflictType {
    /// A remote insert found a live row.
    InsertExists,
    /// A remote insert found a tombstone newer than itself.
    InsertDeleted,
    /// A remote update found a row that differs from the row it updated.
    UpdateUpdate,
    /// A remote update found a tombstone.
    UpdateDeleted,
    /// A remote update found neither row nor tombstone.
    UpdateMissing,
    /// A remote delete found a row that differs from the row it deleted.
    DeleteUpdated,
    /// A remote delete found a tombstone.
    DeleteDelete,
    /// A remote delete found neither row nor tombstone.
    DeleteMissing,
    /// The remote row and a local row under another key hold the same value of a unique
    /// index other than the primary key: the greater version keeps it, the other row goes.
    UniqueKey,
}

impl ConflictType {
    /// Label and `pgferry.conflicts.conflict_type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            ConflictType::InsertExists => "insert_exists",
            ConflictType::InsertDeleted => "insert_deleted",
            ConflictType::UpdateUpdate => "update_update",
            ConflictType::UpdateDeleted => "update_deleted",
            ConflictType::UpdateMissing => "update_missing",
            ConflictType::DeleteUpdated => "delete_updated",
            ConflictType::DeleteDelete => "delete_delete",
            ConflictType::DeleteMissing => "delete_missing",
            ConflictType::UniqueKey => "unique_key",
        }
    }
}

/// How a conflict was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resolution {
    /// The remote change was newer and was applied.
    ApplyRemote,
    /// The local state was newer and was kept.
    KeepLocal,
    /// A user resolver function merged the two rows.
    Merge,
}

impl Resolution {
    /// Label and `pgferry.conflicts.resolution` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::ApplyRemote => "apply_remote",
            Resolution::KeepLocal => "keep_local",
            Resolution::Merge => "merge",
        }
    }
}

/// What to do with the target row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing: the local state wins, or the change is already there.
    Skip,
    /// Write the remote after-image: update the live row, or insert a new one.
    Write,
    /// Delete the live row (if any) and record a tombstone with the remote version.
    Delete,
    /// Call the table's resolver with both rows and write its result.
    Merge,
}

/// The outcome for one change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// What to do.
    pub action: Action,
    /// The conflict to report, if the change was concurrent with the local state.
    pub conflict: Option<(ConflictType, Resolution)>,
}

/// Decides one remote change (`op`, version `remote`) against the local state.
/// `has_resolver`: the table has a user resolver, used for row-against-row conflicts.
pub fn decide(op: Op, remote: &Version, local: &Local, has_resolver: bool) -> Decision {
    let deleting = op == Op::Delete;
    let write = if deleting {
        Action::Delete
    } else {
        Action::Write
    };
    // Written earlier in this same transaction: later changes of the transaction follow it.
    let (local_version, is_row) = match local {
        Local::Nothing => {
            let conflict = match op {
                Op::Update => Some(ConflictType::UpdateMissing),
                Op::Delete => Some(ConflictType::DeleteMissing),
                _ => None,
            };
            // A delete of an unknown row still leaves its tombstone, so that an older
            // update arriving later cannot create the row.
            return Decision {
                action: write,
                conflict: conflict.map(|c| (c, Resolution::ApplyRemote)),
            };
        }
        Local::Row { version: None, .. } | Local::Tombstone { version: None } => {
            return Decision {
                action: write,
                conflict: None,
            };
        }
        Local::Row {
            version: Some(v), ..
        } => (v, true),
        Local::Tombstone { version: Some(v) } => (v, false),
    };
    if remote == local_version {
        // Already applied (same origin transaction): not a conflict, nothing to do.
        return Decision {
            action: Action::Skip,
            conflict: None,
        };
    }
    let newer = remote > local_version;
    let conflict = match (op, local) {
        (Op::Create | Op::Read, Local::Row { .. }) => Some(ConflictType::InsertExists),
        (Op::Create | Op::Read, _) => (!newer).then_some(ConflictType::InsertDeleted),
        (Op::Update, Local::Row { matches_before, .. }) => {
            (*matches_before != Some(true)).then_some(ConflictType::UpdateUpdate)
        }
        (Op::Update, _) => Some(ConflictType::UpdateDeleted),
        (Op::Delete, Local::Row { matches_before, .. }) => {
            (*matches_before != Some(true)).then_some(ConflictType::DeleteUpdated)
        }
        (Op::Delete, _) => Some(ConflictType::DeleteDelete),
        (Op::Truncate, _) => None,
    };
    let merge = has_resolver
        && is_row
        && matches!(
            conflict,
            Some(ConflictType::InsertExists | ConflictType::UpdateUpdate)
        );
    let (action, resolution) = if merge {
        (Action::Merge, Resolution::Merge)
    } else if newer {
        (write, Resolution::ApplyRemote)
    } else {
        (Action::Skip, Resolution::KeepLocal)
    };
    Decision {
        action,
        conflict: conflict.map(|c| (c, resolution)),
    }
}

#[cfg(test)]
mod tests;

//! Set-based apply plans. Pure: no I/O.
//!
//! A worker does not send one statement per change. It gathers the changes of the open target
//! transaction into a [`Batch`]: rows grouped by what writes them (table, kind of statement,
//! columns: a [`WriteGroup`]), and sends each group as one multi-row statement over arrays
//! (`unnest`). Changes to different keys commute (the target runs with
//! `session_replication_role = replica`, so foreign keys and ordinary triggers do not fire,
//! and tables with secondary unique indexes stay out of batches), so only the order of the
//! changes of one key matters. A batch therefore holds each key at most once: a change whose
//! key it already holds first sends the batch ([`Batch::holds`]), and the order of every key's
//! changes is the stream's.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

/// Every kind of statement a worker prepares: a typed key for its statement cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatementKind {
    /// One row: `INSERT … ON CONFLICT (key) DO UPDATE`.
    Upsert,
    /// One row: `UPDATE … SET … WHERE key`.
    Update,
    /// One row: `DELETE … WHERE key`.
    Delete,
    /// One row of a keyless table: delete one row equal to the old image.
    DeleteMatching,
    /// `TRUNCATE`.
    Truncate,
    /// Many rows of one [`WriteGroup`].
    Rows(RowWrite),
    /// Multi-master: probe one key.
    LwwProbe,
    /// Multi-master: probe many keys.
    LwwProbeRows,
    /// Multi-master: stamp a version and upsert one row.
    LwwWrite,
    /// Multi-master: stamp and upsert many rows.
    LwwWriteRows,
    /// Multi-master: stamp and insert a key that has no version yet.
    LwwInsertFresh,
    /// Multi-master: stamp a tombstone and delete one row.
    LwwDelete,
    /// Multi-master: stamp tombstones and delete many rows.
    LwwDeleteRows,
    /// Multi-master: stamp a version alone.
    LwwStamp,
    /// Multi-master: the rows holding a unique value.
    LwwUniqueHolders,
    /// Multi-master: remove a row that lost a unique-key contest.
    LwwUniqueLoser,
    /// Multi-master: call a table's resolver.
    LwwResolver,
    /// Multi-master: write a resolver's merged row.
    LwwMerged,
}

/// How the rows of a group are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RowWrite {
    /// Insert, or update on a key conflict; the columns include the key.
    Upsert,
    /// Update the non-key columns by key: the group's columns are the `set` columns first,
    /// then the key.
    Update {
        /// How many of the columns are set.
        set: usize,
    },
    /// Delete by key: the columns are the key.
    Delete,
}

/// What one multi-row statement writes: a table, how, and which columns (in parameter order).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WriteGroup {
    /// Target schema.
    pub schema: String,
    /// Target table.
    pub table: String,
    /// How.
    pub write: RowWrite,
    /// Columns, in the order of each row's values.
    pub columns: Vec<String>,
}

/// Rows gathered for multi-row statements, grouped by `G`, each key at most once.
#[derive(Debug)]
pub struct Batch<G, R> {
    groups: Vec<(G, Vec<R>)>,
    index: HashMap<G, usize>,
    keys: HashSet<String>,
    rows: usize,
}

impl<G, R> Default for Batch<G, R> {
    fn default() -> Self {
        Self {
            groups: Vec::new(),
            index: HashMap::new(),
            keys: HashSet::new(),
            rows: 0,
        }
    }
}

impl<G: Clone + Eq + Hash, R> Batch<G, R> {
    /// Whether the batch holds a row of `key` (see [`row_key`]): a change of that key must
    /// wait until the batch is sent.
    pub fn holds(&self, key: &str) -> bool {
        self.keys.contains(key)
    }

    /// Adds a row of `key` to `group`. The caller has checked [`Batch::holds`].
    pub fn push(&mut self, group: G, key: String, row: R) {
        debug_assert!(!self.keys.contains(&key), "a batch holds each key once");
        self.keys.insert(key);
        self.rows += 1;
        match self.index.get(&group) {
            Some(&i) => self.groups[i].1.push(row),
            None => {
                self.index.insert(group.clone(), self.groups.len());
                self.groups.push((group, vec![row]));
            }
        }
    }

    /// Rows held.
    pub fn len(&self) -> usize {
        self.rows
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Empties the batch: its groups in the order they first appeared, rows in push order.
    pub fn take(&mut self) -> Vec<(G, Vec<R>)> {
        self.index.clear();
        self.keys.clear();
        self.rows = 0;
        std::mem::take(&mut self.groups)
    }

    /// Forgets everything (the target transaction was rolled back).
    pub fn clear(&mut self) {
        let _ = self.take();
    }
}

/// The batch key of a row: its table and key values (as text), unambiguous for any values.
pub fn row_key<'a>(qualified: &str, key: impl IntoIterator<Item = Option<&'a str>>) -> String {
    let mut out = String::with_capacity(qualified.len() + 16);
    push_part(&mut out, Some(qualified));
    for part in key {
        push_part(&mut out, part);
    }
    out
}

/// Length-prefixed, so no value can spell another key's boundary.
fn push_part(out: &mut String, part: Option<&str>) {
    match part {
        None => out.push('-'),
        Some(p) => {
            out.push_str(&p.len().to_string());
            out.push(':');
            out.push_str(p);
        }
    }
}

/// The lane (of `lanes`) that writes a row key: the same for a key every time, so that two
/// changes of one key never wait on each other from two connections.
pub fn lane_of(row_key: &str, lanes: usize) -> usize {
    use std::hash::{DefaultHasher, Hasher};
    if lanes <= 1 {
        return 0;
    }
    // DefaultHasher::new() has fixed keys: the same key hashes the same way every time.
    let mut hasher = DefaultHasher::new();
    hasher.write(row_key.as_bytes());
    (hasher.finish() % lanes as u64) as usize
}

/// Turns rows (one value per column) into one array per column, as the multi-row statements
/// take their parameters.
pub fn columns_of(rows: Vec<Vec<Option<String>>>, width: usize) -> Vec<Vec<Option<String>>> {
    let mut columns: Vec<Vec<Option<String>>> =
        (0..width).map(|_| Vec::with_capacity(rows.len())).collect();
    for row in rows {
        debug_assert_eq!(row.len(), width, "every row has a value per column");
        for (column, value) in columns.iter_mut().zip(row) {
            column.push(value);
        }
    }
    columns
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn groups_keep_first_appearance_order_and_rows_keep_push_order() {
        let mut batch: Batch<&str, u32> = Batch::default();
        batch.push("b", "k1".into(), 1);
        batch.push("a", "k2".into(), 2);
        batch.push("b", "k3".into(), 3);
        assert_eq!(batch.len(), 3);
        assert!(batch.holds("k3") && !batch.holds("k4"));
        let groups = batch.take();
        assert_eq!(groups, vec![("b", vec![1, 3]), ("a", vec![2])]);
        assert!(batch.is_empty() && !batch.holds("k1"));
    }

    #[test]
    fn row_keys_do_not_collide_across_boundaries() {
        let a = row_key("t", [Some("a\u{0}b"), Some("c")]);
        let b = row_key("t", [Some("a"), Some("b\u{0}c")]);
        let c = row_key("t", [None, Some("c")]);
        let d = row_key("t", [Some("-"), Some("c")]);
        assert_ne!(a, b);
        assert_ne!(c, d);
        assert_eq!(a, row_key("t", [Some("a\u{0}b"), Some("c")]));
    }

    #[test]
    fn lanes_are_stable_and_all_used() {
        let keys: Vec<String> = (0..1000)
            .map(|i| row_key("s.t", [Some(i.to_string().as_str())]))
            .collect();
        let lanes: Vec<usize> = keys.iter().map(|k| lane_of(k, 4)).collect();
        assert_eq!(
            lanes,
            keys.iter().map(|k| lane_of(k, 4)).collect::<Vec<_>>()
        );
        for lane in 0..4 {
            let share = lanes.iter().filter(|&&l| l == lane).count();
            assert!(
                (150..350).contains(&share),
                "lane {lane} got {share} of 1000 keys"
            );
        }
        assert!(keys.iter().all(|k| lane_of(k, 1) == 0));
    }

    proptest! {
        /// Distinct key tuples always give distinct row keys.
        #[test]
        fn row_key_is_injective(
            a in proptest::collection::vec(proptest::option::of(".{0,4}"), 1..4),
            b in proptest::collection::vec(proptest::option::of(".{0,4}"), 1..4),
        ) {
            let ka = row_key("s.t", a.iter().map(|v| v.as_deref()));
            let kb = row_key("s.t", b.iter().map(|v| v.as_deref()));
            prop_assert_eq!(ka == kb, a == b);
        }

        /// Transposing keeps every value at its row and column.
        #[test]
        fn columns_of_transposes(rows in proptest::collection::vec(
            proptest::collection::vec(proptest::option::of("[a-z]{0,3}"), 3), 0..20)) {
            let columns = columns_of(rows.clone(), 3);
            prop_assert_eq!(columns.len(), 3);
            for (r, row) in rows.iter().enumerate() {
                for (c, value) in row.iter().enumerate() {
                    prop_assert_eq!(&columns[c][r], value);
                }
            }
        }
    }
}

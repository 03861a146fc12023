//! Set-based apply plans. Pure: no I/O.
//!
//! A worker does not send one statement per change. It gathers the changes of the open target
//! transaction, grouped by what writes them (table, kind of statement, columns: a
//! [`WriteGroup`]), and sends each group as one multi-row statement over arrays (`unnest`).
//! Changes to different keys commute (the target runs with `session_replication_role =
//! replica`, so foreign keys and ordinary triggers do not fire, and tables with secondary
//! unique indexes stay out of batches), so only the order of the changes of one key matters:
//! - replica mode's [`Coalescer`] holds one change per key and folds a key's later changes
//!   into it ([`coalesce`]), sending the batch first where no single change has their effect;
//! - multi-master's [`Waves`] holds each key at most once per wave: a key's n-th change
//!   goes to wave n, and the waves are sent one after the other, since each change is
//!   decided on its own.
//!
//! Either way every key's changes take effect in the stream's order.

use std::collections::HashMap;
use std::hash::Hash;

/// Every kind of statement a worker prepares: a typed key for its statement cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatementKind {
    /// One row: `INSERT … ON CONFLICT (key) DO UPDATE`.
    Upsert,
    /// One row: `UPDATE … SET … WHERE key`.
    Update,
    /// An update that moves its row to another key (`WHERE` the old key, the new key among
    /// the `SET` columns): sent alone, never batched by key.
    UpdateKey,
    /// One row: `DELETE … WHERE key`.
    Delete,
    /// One row of a keyless table: delete one row equal to the old image.
    DeleteMatching,
    /// One row of a keyless table: update one row equal to the old image, or insert the new
    /// one where none is.
    UpdateMatching,
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
    /// Multi-master: lock, stamp and update many rows that match their old images, in one
    /// statement.
    LwwCleanUpdateRows,
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
    /// A re-snapshot's range: delete its rows that are not kept (bounded below, above; `ONLY`).
    Prune {
        /// Has a lower bound.
        after: bool,
        /// Has an upper bound.
        through: bool,
        /// Deletes from the table without its inheritance children.
        only: bool,
    },
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

/// Multi-master's batch: rows gathered for multi-row statements, grouped by `G`, in waves
/// that hold each key at most once. A key's n-th change goes to wave n, so sending the waves
/// one after the other applies every key's changes in the stream's order (different keys
/// commute), while each statement still meets each key once: each change is decided on its
/// own, against what the wave before left.
#[derive(Debug)]
pub struct Waves<G, R> {
    waves: Vec<Wave<G, R>>,
    /// How many rows each key has in the batch (the wave its next row goes to).
    held: HashMap<String, usize>,
    rows: usize,
}

#[derive(Debug)]
struct Wave<G, R> {
    groups: Vec<(G, Vec<R>)>,
    index: HashMap<G, usize>,
}

impl<G, R> Default for Waves<G, R> {
    fn default() -> Self {
        Self {
            waves: Vec::new(),
            held: HashMap::new(),
            rows: 0,
        }
    }
}

impl<G: Clone + Eq + Hash, R> Waves<G, R> {
    /// Adds a row of `key` (see [`row_key`]) to `group`, in the wave after the key's last.
    pub fn push(&mut self, group: G, key: String, row: R) {
        let held = self.held.entry(key).or_insert(0);
        let at = *held;
        *held += 1;
        self.rows += 1;
        if self.waves.len() == at {
            self.waves.push(Wave {
                groups: Vec::new(),
                index: HashMap::new(),
            });
        }
        let wave = &mut self.waves[at];
        match wave.index.get(&group) {
            Some(&i) => wave.groups[i].1.push(row),
            None => {
                wave.index.insert(group.clone(), wave.groups.len());
                wave.groups.push((group, vec![row]));
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

    /// Empties the batch: its waves in order, each with its groups in the order they first
    /// appeared in it and their rows in push order.
    pub fn take(&mut self) -> Vec<Vec<(G, Vec<R>)>> {
        self.held.clear();
        self.rows = 0;
        std::mem::take(&mut self.waves)
            .into_iter()
            .map(|wave| wave.groups)
            .collect()
    }

    /// Forgets everything (the target transaction was rolled back).
    pub fn clear(&mut self) {
        let _ = self.take();
    }
}

/// Column values of one row change, by column name, in parameter order.
pub type Values = Vec<(String, Option<String>)>;

/// One replica-mode change of a keyed row, as a [`Coalescer`] holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowChange {
    /// Insert, as an upsert on the key: the inserted columns (key included).
    Upsert(Values),
    /// Update by key: the columns set, and the key.
    Update {
        /// Columns set.
        set: Values,
        /// Key columns.
        key: Values,
    },
    /// Delete by key.
    Delete(Values),
}

impl RowChange {
    /// How this change is written, its columns (in parameter order) and its row of values.
    fn into_parts(self) -> (RowWrite, Vec<String>, Vec<Option<String>>) {
        let (write, values) = match self {
            RowChange::Upsert(values) => (RowWrite::Upsert, values),
            RowChange::Update { set, key } => {
                let n = set.len();
                (
                    RowWrite::Update { set: n },
                    set.into_iter().chain(key).collect(),
                )
            }
            RowChange::Delete(key) => (RowWrite::Delete, key),
        };
        let (columns, row) = values.into_iter().unzip();
        (write, columns, row)
    }
}

/// `base` with every column of `over` set to `over`'s value (added when missing).
fn overlay(mut base: Values, over: Values) -> Values {
    for (column, value) in over {
        match base.iter_mut().find(|(c, _)| *c == column) {
            Some(slot) => slot.1 = value,
            None => base.push((column, value)),
        }
    }
    base
}

fn covers(row: &Values, other: &Values) -> bool {
    other.iter().all(|(c, _)| row.iter().any(|(r, _)| r == c))
}

/// The one change with the effect of `old` then `new` on one key, when there is one: a delete
/// wins, an update folds into what it updates (an update of a deleted row changes nothing),
/// and an insert replaces what it covers column for column. `None` (a row deleted and inserted
/// again, or an insert that leaves out a column set before): the two must go in order.
pub fn coalesce(old: &RowChange, new: RowChange) -> Option<RowChange> {
    match (old, new) {
        (_, RowChange::Delete(key)) => Some(RowChange::Delete(key)),
        (RowChange::Delete(_), RowChange::Update { .. }) => Some(old.clone()),
        (RowChange::Delete(_), RowChange::Upsert(_)) => None,
        (RowChange::Upsert(row), RowChange::Update { set, .. }) => {
            Some(RowChange::Upsert(overlay(row.clone(), set)))
        }
        (RowChange::Update { set: first, key }, RowChange::Update { set, .. }) => {
            Some(RowChange::Update {
                set: overlay(first.clone(), set),
                key: key.clone(),
            })
        }
        (RowChange::Upsert(before), RowChange::Upsert(row)) => {
            covers(&row, before).then_some(RowChange::Upsert(row))
        }
        (RowChange::Update { set, .. }, RowChange::Upsert(row)) => {
            covers(&row, set).then_some(RowChange::Upsert(row))
        }
    }
}

/// Replica mode's batch: one change per key, the changes of a key coalesced into one
/// ([`coalesce`]), so a hot row written by a thousand source transactions is written once.
/// The target transaction is atomic, so only its end state is ever visible, and that is the
/// same. Rows come out grouped for multi-row statements ([`Coalescer::take`]).
#[derive(Debug, Default)]
pub struct Coalescer {
    entries: Vec<Option<(String, String, RowChange)>>,
    index: HashMap<String, usize>,
}

impl Coalescer {
    /// Adds a change of `row_key` ([`row_key`]) of `schema.table`. `Err((row_key, change))`: it cannot
    /// be folded into the change the batch holds for its key; send the batch, then add it.
    pub fn push(
        &mut self,
        schema: &str,
        table: &str,
        row_key: String,
        change: RowChange,
    ) -> Result<(), (String, RowChange)> {
        match self.index.get(&row_key) {
            Some(&i) => {
                let held = self.entries[i].as_mut().expect("indexed entries are held");
                match coalesce(&held.2, change.clone()) {
                    Some(merged) => {
                        held.2 = merged;
                        Ok(())
                    }
                    None => Err((row_key, change)),
                }
            }
            None => {
                self.add(schema, table, row_key, change);
                Ok(())
            }
        }
    }

    /// Adds a change of a key the batch does not hold (it was just sent).
    pub fn add(&mut self, schema: &str, table: &str, row_key: String, change: RowChange) {
        self.index.insert(row_key, self.entries.len());
        self.entries
            .push(Some((schema.to_owned(), table.to_owned(), change)));
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Empties the batch: groups in the order they first appear, rows in the order their
    /// keys first appeared.
    pub fn take(&mut self) -> Vec<(WriteGroup, Vec<Vec<Option<String>>>)> {
        self.index.clear();
        let mut groups: Vec<(WriteGroup, Vec<Vec<Option<String>>>)> = Vec::new();
        let mut at: HashMap<WriteGroup, usize> = HashMap::new();
        // The group of the row before, which most rows share (a snapshot's, a bulk load's):
        // compared in place, without building and hashing a group per row.
        let mut last: Option<usize> = None;
        for (schema, table, change) in std::mem::take(&mut self.entries).into_iter().flatten() {
            let (write, columns, row) = change.into_parts();
            if let Some(i) = last {
                let group = &groups[i].0;
                if group.write == write
                    && group.table == table
                    && group.schema == schema
                    && group.columns == columns
                {
                    groups[i].1.push(row);
                    continue;
                }
            }
            let group = WriteGroup {
                schema,
                table,
                write,
                columns,
            };
            let i = match at.get(&group) {
                Some(&i) => i,
                None => {
                    at.insert(group.clone(), groups.len());
                    groups.push((group, Vec::new()));
                    groups.len() - 1
                }
            };
            groups[i].1.push(row);
            last = Some(i);
        }
        groups
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
    use std::collections::HashSet;

    #[test]
    fn groups_keep_first_appearance_order_and_rows_keep_push_order() {
        let mut batch: Waves<&str, u32> = Waves::default();
        batch.push("b", "k1".into(), 1);
        batch.push("a", "k2".into(), 2);
        batch.push("b", "k3".into(), 3);
        batch.push("a", "k1".into(), 4);
        batch.push("b", "k4".into(), 5);
        assert_eq!(batch.len(), 5);
        let waves = batch.take();
        assert_eq!(
            waves,
            vec![
                vec![("b", vec![1, 3, 5]), ("a", vec![2])],
                vec![("a", vec![4])]
            ]
        );
        assert!(batch.is_empty() && batch.take().is_empty());
    }

    proptest! {
        /// Whatever the keys and groups pushed: each wave holds a key at most once, a key's
        /// rows come out in push order over consecutive waves from the first, and every row
        /// comes out once.
        #[test]
        fn waves_hold_each_key_once_and_keep_each_keys_order(
            pushes in proptest::collection::vec((0u8..12, 0u8..3), 0..200),
        ) {
            let mut batch: Waves<u8, (u8, usize)> = Waves::default();
            for (i, (key, group)) in pushes.iter().enumerate() {
                batch.push(*group, key.to_string(), (*key, i));
            }
            prop_assert_eq!(batch.len(), pushes.len());
            let waves = batch.take();
            let mut seen: HashMap<u8, Vec<(usize, usize)>> = HashMap::new();
            for (w, wave) in waves.iter().enumerate() {
                let mut in_wave = HashSet::new();
                for (group, rows) in wave {
                    for &(key, i) in rows {
                        prop_assert!(in_wave.insert(key), "key {} twice in wave {}", key, w);
                        prop_assert_eq!(pushes[i].1, *group);
                        seen.entry(key).or_default().push((w, i));
                    }
                }
            }
            let mut total = 0;
            for (key, rows) in &seen {
                let want: Vec<usize> = pushes
                    .iter()
                    .enumerate()
                    .filter(|(_, (k, _))| k == key)
                    .map(|(i, _)| i)
                    .collect();
                let got: Vec<usize> = rows.iter().map(|&(_, i)| i).collect();
                prop_assert_eq!(&got, &want, "key {}: push order", key);
                let waves_of: Vec<usize> = rows.iter().map(|&(w, _)| w).collect();
                prop_assert_eq!(waves_of, (0..rows.len()).collect::<Vec<_>>());
                total += rows.len();
            }
            prop_assert_eq!(total, pushes.len());
        }
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

    /// A keyed table as the target holds it: key → columns.
    type Model = HashMap<i32, HashMap<String, Option<String>>>;

    fn apply(model: &mut Model, key: i32, change: &RowChange) {
        match change {
            RowChange::Upsert(row) => {
                let stored = model.entry(key).or_default();
                for (c, v) in row {
                    stored.insert(c.clone(), v.clone());
                }
            }
            RowChange::Update { set, .. } => {
                if let Some(stored) = model.get_mut(&key) {
                    for (c, v) in set {
                        stored.insert(c.clone(), v.clone());
                    }
                }
            }
            RowChange::Delete(_) => {
                model.remove(&key);
            }
        }
    }

    fn change_strategy() -> impl Strategy<Value = (i32, RowChange)> {
        let columns = proptest::sample::subsequence(vec!["a", "b", "c"], 0..=3);
        let values = proptest::option::of("[xyz]");
        (
            0..4i32,
            0..3u8,
            columns,
            proptest::collection::vec(values, 3),
        )
            .prop_map(|(key, op, cols, vals)| {
                let k = vec![("k".to_owned(), Some(key.to_string()))];
                let set: Values = cols
                    .iter()
                    .zip(vals)
                    .map(|(c, v)| ((*c).to_owned(), v))
                    .collect();
                let change = match op {
                    0 => RowChange::Upsert(k.iter().cloned().chain(set).collect()),
                    1 => RowChange::Update { set, key: k },
                    _ => RowChange::Delete(k),
                };
                (key, change)
            })
    }

    proptest! {
        /// Coalesced batches leave the target exactly as the changes applied one by one do:
        /// the model applies each batch's changes (one per key, any order) atomically.
        #[test]
        fn coalescing_keeps_the_end_state(
            start in proptest::collection::vec((0..4i32, proptest::option::of("[xyz]")), 0..4),
            changes in proptest::collection::vec(change_strategy(), 0..40),
        ) {
            let mut initial = Model::new();
            for (key, v) in start {
                initial.insert(key, HashMap::from([("k".to_owned(), Some(key.to_string())),
                                                   ("a".to_owned(), v)]));
            }
            let mut one_by_one = initial.clone();
            for (key, change) in &changes {
                apply(&mut one_by_one, *key, change);
            }
            let mut batched = initial;
            let mut batch = Coalescer::default();
            let mut held: HashMap<String, i32> = HashMap::new();
            let send = |batch: &mut Coalescer, held: &mut HashMap<String, i32>, model: &mut Model| {
                let keys: Vec<(String, i32)> = held.drain().collect();
                let mut entries: Vec<(i32, RowChange)> = Vec::new();
                for (row_key, key) in keys {
                    let i = batch.index[&row_key];
                    entries.push((key, batch.entries[i].as_ref().unwrap().2.clone()));
                }
                batch.clear();
                for (key, change) in entries.iter().rev() {
                    apply(model, *key, change);
                }
            };
            for (key, change) in changes {
                let row_key = row_key("s.t", [Some(key.to_string().as_str())]);
                if let Err((returned, change)) = batch.push("s", "t", row_key.clone(), change) {
                    assert_eq!(returned, row_key);
                    send(&mut batch, &mut held, &mut batched);
                    batch.add("s", "t", returned, change);
                }
                held.insert(row_key, key);
            }
            send(&mut batch, &mut held, &mut batched);
            prop_assert_eq!(batched, one_by_one);
        }

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

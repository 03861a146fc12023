//! Reconciling snapshot chunks with the change stream: the watermark algorithm of Netflix's
//! DBLog (as in Debezium's incremental snapshots), pure.
//!
//! A chunk of a table is read by a short `SELECT` that runs between two watermarks written into
//! the WAL: *low* before the `SELECT`, *high* after it. The capture loop sees both watermarks in
//! stream order. Every change it streams between them is newer than or as new as what the
//! `SELECT` saw, so at the high watermark the chunk's rows whose key changed inside the window
//! are dropped, and the rest are published right there, at the high watermark's place in the
//! stream. A snapshot row therefore never overwrites a newer change, and a row deleted inside
//! the window never comes back. No transaction stays open longer than one chunk's `SELECT`.
//!
//! One gap in the plain algorithm is closed here too: PostgreSQL writes a commit record before
//! the transaction becomes visible, so a transaction can precede the low watermark in the
//! stream and still be invisible to the chunk's `SELECT` (for as long as a synchronous standby
//! makes its commit wait). The row version the `SELECT` read then carries that transaction as
//! its `xmax`. The reconciler remembers which keys the most recent transactions changed
//! ([`RECENT_CHANGES`]), and drops a chunk row whose `xmax` is a transaction that changed the
//! same key before the window. (A row locked, not changed, by a transaction also carries its
//! `xmax`; such a row is kept, because that transaction changed no key of it.) The capture
//! loop feeds it changes only while a snapshot is planned or running, so a transaction that
//! stayed invisible from before its table's snapshot was planned until after a chunk's
//! `SELECT` is not recognized either.
//!
//! Tables without a key cannot be matched row by row. Their snapshot starts with a truncate
//! on the stream (the target starts empty), and from there the reconciler collects the
//! transactions that inserted into the table, or deleted from it, until the table is done. A
//! chunk row created by one of those (its `xmin`) was streamed already, and one whose `xmax` is
//! one of the deleters is gone. Such a table's snapshot restarts from its first chunk after a
//! crash, since the collected transactions are not durable.
//!
//! An update whose new image lacks an unchanged TOASTed value cannot insert the row on a target
//! that does not have it yet. When every change of a dropped row inside the window was such an
//! update, none changed a TOASTed value, so the chunk's row holds the values they left out:
//! the newest image completed with them is the row as the stream left it, and it is published
//! in the chunk's place. Otherwise (a complete change came first, or the row was hidden from
//! the `SELECT`), when the newest change lacked a TOASTed value its key is returned for a
//! re-read (a later chunk of just those keys). Re-reading alone never ended for a row updated
//! more often than a chunk takes: each re-read's window caught another such update.
//!
//! **Pruning.** A re-snapshot also removes target rows the source no longer has: the chunk's
//! key range is published with the keys that may stay in it besides the rows emitted
//! ([`Closed::keep`]), and a target deletes the other rows of the range. The keys that may
//! stay are the rows the chunk read and dropped, every key changed inside the window, and
//! the keys changed by a transaction the chunk's `SELECT` could not see yet (its snapshot's
//! in-progress list, `pg_current_snapshot()`) that the stream already carried: an invisible
//! insert leaves no row version with an `xmax` behind, so only the snapshot names it. A
//! transaction the stream carried whose changes are not all remembered (streamed while no
//! snapshot ran, or pushed out of [`RECENT_CHANGES`]) makes the chunk's range unsafe to prune
//! ([`Closed::unsure`]); the capture loop then publishes it without its range.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use crate::event::{Op, RelationMeta, RowChange};
use crate::source::pgoutput::{Datum, Tuple};

/// How many (transaction, table, key) changes the reconciler remembers from before a window
/// opens. A transaction whose commit record precedes a low watermark by more than this many
/// changes while it is still invisible to the chunk's `SELECT` is not recognized.
pub const RECENT_CHANGES: usize = 1 << 16;

/// How many committed transactions the reconciler remembers (whether each one's changes are
/// all in the recent-change memory), to tell whether a chunk's range may be pruned.
pub const RECENT_COMMITS: usize = 1 << 16;

/// A row's key: its key columns' values in text form, in column order.
pub type Key = Vec<Option<Bytes>>;

/// The key of `tuple` in `relation`, or `None` when the relation has no key or a key value is
/// missing from the image (an unchanged TOASTed key value cannot happen, but is not guessed).
pub fn key_of(relation: &RelationMeta, tuple: &Tuple) -> Option<Key> {
    if !relation.has_key() {
        return None;
    }
    relation
        .key_indices()
        .map(|i| value_of(tuple.get(i)?))
        .collect()
}

/// A value as text (`Some(None)`: NULL), or `None` for an unchanged TOASTed value (not sent).
fn value_of(d: &Datum) -> Option<Option<Bytes>> {
    match d {
        Datum::Null => Some(None),
        Datum::Text(b) | Datum::Binary(b) => Some(Some(Bytes::copy_from_slice(b))),
        Datum::UnchangedToast => None,
    }
}

/// One row a chunk's `SELECT` returned.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkRow {
    /// Column values, as the relation describes them.
    pub tuple: Tuple,
    /// The row version's `xmax` (0: not deleted, updated or locked by anyone).
    pub xmax: u32,
    /// The row version's `xmin` (the transaction that created it).
    pub xmin: u32,
}

impl ChunkRow {
    /// The transaction that may have replaced or deleted this row version unseen by the
    /// `SELECT` (its `xmax`), or 0. Not the transaction that created it: a version its own
    /// creator replaced or deleted is invisible to every later `SELECT`, so an `xmax` equal to
    /// the `xmin` is a lock that transaction kept. `INSERT … ON CONFLICT DO UPDATE`, and an
    /// update of a row the transaction had locked (`SELECT … FOR UPDATE`, then `UPDATE`),
    /// leave exactly that. Taken for a replacement, the row was dropped as hidden from the
    /// `SELECT`, and the stream's image of the change (without its unchanged TOASTed
    /// values) could not stand in for it: the row never reached a target.
    pub fn replacer(&self) -> u32 {
        if self.xmax == self.xmin {
            0
        } else {
            self.xmax
        }
    }
}

/// The outcome of closing a window.
#[derive(Debug, Default, PartialEq)]
pub struct Closed {
    /// Rows to publish at the high watermark, in the order the chunk read them.
    pub emit: Vec<Tuple>,
    /// Rows dropped because the stream carried a newer state of them.
    pub dropped: usize,
    /// Keys to read again: dropped rows whose newest streamed image lacked a TOASTed value.
    pub reread: Vec<Key>,
    /// Rows of `emit` that are the window's newest image completed with the chunk's TOASTed
    /// values.
    pub completed: usize,
    /// When the chunk is to be pruned: keys a target keeps in the chunk's range besides the
    /// emitted rows (rows read and dropped, keys changed inside the window, keys changed by a
    /// committed transaction the `SELECT` could not see). Unordered, possibly repeated.
    pub keep: Vec<Key>,
    /// A committed transaction the `SELECT` could not see whose changes are not all
    /// remembered: the range must not be pruned.
    pub unsure: Option<u32>,
}

#[derive(Debug)]
struct Window {
    oid: u32,
    /// Commits seen when it opened: later ones are inside it.
    opened: u64,
    /// Keys changed inside the window.
    changed: HashSet<Key>,
    /// Keys whose newest change inside the window was an update without its TOASTed values,
    /// with that change's relation and new image.
    incomplete: HashMap<Key, (Arc<RelationMeta>, Tuple)>,
    /// Keys with a complete change inside the window (an insert, a delete, an update with
    /// every value): the chunk's row may hold other TOASTed values than the stream's.
    complete: HashSet<Key>,
    /// The table was truncated inside the window.
    truncated: bool,
    /// Tables without a key: the rows deleted or updated away inside the window (their old
    /// images, `REPLICA IDENTITY FULL`), each with how often. A chunk row equal to one was
    /// read before the change removed it, and the stream carried the removal before the
    /// chunk: it is dropped, or it would come back.
    removed: HashMap<Vec<Option<Bytes>>, usize>,
}

/// The open windows and the recent-change memory of one capture run.
#[derive(Debug, Default)]
pub struct Reconciler {
    windows: HashMap<u64, Window>,
    recent: VecDeque<(u32, u32, Key)>,
    /// How often each (transaction, table, key) is in `recent`, and whether its newest change
    /// lacked a TOASTed value.
    recent_set: HashMap<(u32, u32, Key), (usize, bool)>,
    /// Tables without a key being snapshotted: transactions that created or removed rows.
    keyless: HashMap<u32, Keyless>,
    /// The most recent committed transactions, oldest first, and for each whether all of its
    /// changes are in `recent` and its place in commit order (`commit_state`).
    commits: VecDeque<u32>,
    commit_state: HashMap<u32, (bool, u64)>,
    /// Commits seen so far.
    committed: u64,
    /// Transactions not committed yet that lost remembered changes to the memory's bound.
    evicted_open: HashSet<u32>,
}

#[derive(Debug, Default)]
struct Keyless {
    creators: HashSet<u32>,
    removers: HashSet<u32>,
}

impl Reconciler {
    /// A low watermark of chunk `id` of table `oid` went by in the stream.
    pub fn open(&mut self, id: u64, oid: u32) {
        self.windows.insert(
            id,
            Window {
                oid,
                opened: self.committed,
                changed: HashSet::new(),
                incomplete: HashMap::new(),
                complete: HashSet::new(),
                truncated: false,
                removed: HashMap::new(),
            },
        );
    }

    /// Whether chunk `id`'s window is open (its low watermark was seen by this run).
    pub fn is_open(&self, id: u64) -> bool {
        self.windows.contains_key(&id)
    }

    /// Open windows.
    pub fn open_windows(&self) -> usize {
        self.windows.len()
    }

    /// Whether a window is open or a table without a key is being snapshotted.
    pub fn is_busy(&self) -> bool {
        !self.windows.is_empty() || !self.keyless.is_empty()
    }

    /// The snapshot of table `oid`, which has no key, starts here (after the truncate that
    /// empties its targets).
    pub fn start_keyless(&mut self, oid: u32) {
        self.keyless.insert(oid, Keyless::default());
    }

    /// The snapshot of table `oid`, which has no key, is done.
    pub fn finish_keyless(&mut self, oid: u32) {
        self.keyless.remove(&oid);
    }

    /// Whether the snapshot of table `oid` (without a key) started in this run.
    pub fn is_keyless_started(&self, oid: u32) -> bool {
        self.keyless.contains_key(&oid)
    }

    /// A change streamed by transaction `xid` (0 when unknown).
    pub fn changed(&mut self, xid: u32, change: &RowChange) {
        if let Some(track) = self.keyless.get_mut(&change.relation.oid) {
            if change.after.is_some() {
                track.creators.insert(xid);
            }
            if change.before.is_some() || change.op == Op::Update {
                track.removers.insert(xid);
            }
            if let Some(image) = change.before.as_ref().and_then(whole_image) {
                for w in self.windows.values_mut() {
                    if w.oid == change.relation.oid {
                        *w.removed.entry(image.clone()).or_default() += 1;
                    }
                }
            }
        }
        if change.op == Op::Truncate {
            // A truncate removes every row: each open window of the table drops its whole
            // chunk (the rows the chunk read are older than the truncate).
            for w in self.windows.values_mut() {
                if w.oid == change.relation.oid {
                    w.truncated = true;
                }
            }
            return;
        }
        let relation = &change.relation;
        let before = change.before.as_ref().and_then(|t| key_of(relation, t));
        let after = change.after.as_ref().and_then(|t| key_of(relation, t));
        let incomplete = change.op == Op::Update
            && change
                .after
                .as_ref()
                .is_some_and(|t| t.iter().any(|d| matches!(d, Datum::UnchangedToast)));
        for key in before.into_iter().chain(after) {
            for w in self.windows.values_mut() {
                if w.oid == relation.oid {
                    match change.after.as_ref().filter(|_| incomplete) {
                        Some(image) => {
                            w.incomplete
                                .insert(key.clone(), (relation.clone(), image.clone()));
                        }
                        None => {
                            w.incomplete.remove(&key);
                            w.complete.insert(key.clone());
                        }
                    }
                    w.changed.insert(key.clone());
                }
            }
            if xid != 0 {
                self.remember(xid, relation.oid, key, incomplete);
            }
        }
    }

    fn remember(&mut self, xid: u32, oid: u32, key: Key, incomplete: bool) {
        let entry = (xid, oid, key);
        let seen = self.recent_set.entry(entry.clone()).or_default();
        *seen = (seen.0 + 1, incomplete);
        self.recent.push_back(entry);
        while self.recent.len() > RECENT_CHANGES {
            if let Some(old) = self.recent.pop_front() {
                match self.commit_state.get_mut(&old.0) {
                    Some((complete, _)) => *complete = false,
                    None => {
                        self.evicted_open.insert(old.0);
                    }
                }
                if let Some((n, _)) = self.recent_set.get_mut(&old) {
                    *n -= 1;
                    if *n == 0 {
                        self.recent_set.remove(&old);
                    }
                }
            }
        }
    }

    /// Transaction `xid` committed in the stream; `complete`: every change it streamed was
    /// given to [`Reconciler::changed`] (the capture loop gives them only while a snapshot is
    /// planned or running).
    pub fn committed(&mut self, xid: u32, complete: bool) {
        if xid == 0 {
            return;
        }
        let complete = complete && !self.evicted_open.remove(&xid);
        self.committed += 1;
        if self
            .commit_state
            .insert(xid, (complete, self.committed))
            .is_none()
        {
            self.commits.push_back(xid);
        }
        while self.commits.len() > RECENT_COMMITS {
            if let Some(old) = self.commits.pop_front() {
                self.commit_state.remove(&old);
            }
        }
    }

    /// The high watermark of chunk `id` went by: closes its window and returns the rows to
    /// publish there. `None` when the window is not open (a watermark of an earlier run).
    /// `invisible`: for a chunk to be pruned, the transactions in progress for its `SELECT`
    /// (its snapshot's `xip`); [`Closed::keep`] and [`Closed::unsure`] are filled then.
    pub fn close(
        &mut self,
        id: u64,
        relation: &RelationMeta,
        rows: Vec<ChunkRow>,
        invisible: Option<&[u32]>,
    ) -> Option<Closed> {
        let mut window = self.windows.remove(&id)?;
        let mut closed = Closed::default();
        let pruned = invisible.is_some();
        if let Some(invisible) = invisible {
            closed.keep.extend(window.changed.iter().cloned());
            let hidden: HashSet<u32> = invisible
                .iter()
                .copied()
                .filter(|x| self.commit_state.contains_key(x))
                .collect();
            closed.unsure = hidden.iter().copied().find(|x| {
                self.commit_state
                    .get(x)
                    .is_some_and(|(complete, _)| !complete)
            });
            if !hidden.is_empty() {
                closed.keep.extend(
                    self.recent_set
                        .keys()
                        .filter(|(x, oid, _)| *oid == relation.oid && hidden.contains(x))
                        .map(|(_, _, key)| key.clone()),
                );
            }
        }
        for row in rows {
            let replacer = row.replacer();
            let Some(key) = key_of(relation, &row.tuple) else {
                let streamed = self.keyless.get(&relation.oid).is_some_and(|t| {
                    t.creators.contains(&row.xmin)
                        || (replacer != 0 && t.removers.contains(&replacer))
                });
                let removed = whole_image(&row.tuple).is_some_and(|image| {
                    match window.removed.get_mut(&image) {
                        Some(n) if *n > 0 => {
                            *n -= 1;
                            true
                        }
                        _ => false,
                    }
                });
                if window.truncated || streamed || removed {
                    closed.dropped += 1;
                } else {
                    closed.emit.push(row.tuple);
                }
                continue;
            };
            // Changed before the window by the transaction the SELECT could not see yet.
            let hidden = (replacer != 0)
                .then(|| self.recent_set.get(&(replacer, relation.oid, key.clone())))
                .flatten();
            let emit = if window.changed.contains(&key) {
                // The chunk's row holds the TOASTed values of the stream's newest image when
                // no change of the window, nor a hidden one before it, could have changed them.
                // (The row version's xmax, when set, committed inside the window: one that
                // committed before it, hidden from the `SELECT`, may have changed them.)
                let inside = |x: u32| {
                    self.commit_state
                        .get(&x)
                        .is_some_and(|&(_, at)| at > window.opened)
                };
                let mergeable = !window.complete.contains(&key)
                    && !window.truncated
                    && (replacer == 0 || inside(replacer));
                match window.incomplete.get(&key) {
                    Some((laid_out, newest)) if mergeable => {
                        match completed((laid_out, newest), (relation, &row.tuple)) {
                            Some(tuple) => {
                                closed.emit.push(tuple);
                                closed.completed += 1;
                                continue;
                            }
                            None => closed.reread.push(key.clone()),
                        }
                    }
                    Some(_) => closed.reread.push(key.clone()),
                    None => {}
                }
                false
            } else if let Some(&(_, incomplete)) = hidden {
                if incomplete {
                    closed.reread.push(key.clone());
                }
                false
            } else {
                !window.truncated
            };
            if emit {
                closed.emit.push(row.tuple);
            } else {
                closed.dropped += 1;
                if pruned {
                    closed.keep.push(key);
                }
            }
        }
        Some(closed)
    }

    /// Forgets a window whose chunk was abandoned.
    pub fn abandon(&mut self, id: u64) {
        self.windows.remove(&id);
    }
}

/// Every value of a row image as text (`None`: NULL), or `None` when it lacks one (an unchanged
/// TOASTed value): how a table without a key tells one row from another.
fn whole_image(tuple: &Tuple) -> Option<Vec<Option<Bytes>>> {
    tuple.iter().map(value_of).collect()
}

/// `newest` (an update's new image without some TOASTed values) with the values it left out
/// taken from `row`, the chunk's row of the same key, each with the relation it is laid out
/// by; `None` when the two are not laid out alike (a schema change between them: columns
/// are matched by position) or `row` lacks one of the values.
fn completed(
    (newest_by, newest): (&RelationMeta, &Tuple),
    (row_by, row): (&RelationMeta, &Tuple),
) -> Option<Tuple> {
    let alike = |a: &RelationMeta, b: &RelationMeta| {
        a.columns.len() == b.columns.len()
            && a.columns
                .iter()
                .zip(&b.columns)
                .all(|(x, y)| x.name == y.name && x.type_oid == y.type_oid)
    };
    if newest.len() != row.len() || !alike(newest_by, row_by) {
        return None;
    }
    newest
        .iter()
        .zip(row)
        .map(|(new, old)| match (new, old) {
            (Datum::UnchangedToast, Datum::UnchangedToast) => None,
            (Datum::UnchangedToast, old) => Some(old.clone()),
            (new, _) => Some(new.clone()),
        })
        .collect()
}

#[cfg(test)]
mod tests;

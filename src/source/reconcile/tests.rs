use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::lsn::Lsn;
use crate::source::pgoutput::{Column, ReplicaIdentity};

fn relation(keyed: bool) -> Arc<RelationMeta> {
    let column = |name: &str, is_key: bool| Column {
        is_key,
        name: name.into(),
        type_oid: 23,
        type_modifier: -1,
    };
    Arc::new(RelationMeta {
        oid: 42,
        schema: "public".into(),
        table: "t".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            column("id", keyed),
            column("v", false),
            column("big", false),
        ],
    })
}

fn text(s: impl ToString) -> Datum {
    Datum::Text(Bytes::from(s.to_string()))
}

/// A row of the model table: (v, big).
type Row = (i64, i64);

/// One change of a simulated transaction: key, before, after, TOASTed value left out.
type SimChange = (i64, Option<Row>, Option<Row>, bool);

fn tuple(id: i64, row: Row) -> Tuple {
    vec![text(id), text(row.0), text(row.1)]
}

fn change(op: Op, id: i64, after: Option<Tuple>) -> RowChange {
    RowChange {
        op,
        relation: relation(true),
        lsn: Lsn(0),
        before: (op == Op::Delete).then(|| vec![text(id), Datum::Null, Datum::Null]),
        before_is_key_only: true,
        after,
        version: None,
    }
}

#[test]
fn rows_changed_inside_the_window_are_dropped_and_the_rest_emitted() {
    let rel = relation(true);
    let mut r = Reconciler::default();
    r.open(1, rel.oid);
    r.changed(7, &change(Op::Update, 2, Some(tuple(2, (20, 0)))));
    r.changed(8, &change(Op::Delete, 3, None));
    let rows = (1..=4)
        .map(|id| ChunkRow {
            tuple: tuple(id, (id, 0)),
            xmax: 0,
            xmin: 0,
        })
        .collect();
    let closed = r.close(1, &rel, rows, None).expect("open window");
    assert_eq!(closed.emit, vec![tuple(1, (1, 0)), tuple(4, (4, 0))]);
    assert_eq!(closed.dropped, 2);
    assert!(closed.reread.is_empty());
    assert!(
        r.close(1, &rel, Vec::new(), None).is_none(),
        "a window closes once"
    );
}

#[test]
fn a_watermark_of_another_run_is_ignored() {
    let rel = relation(true);
    let mut r = Reconciler::default();
    assert!(r.close(5, &rel, Vec::new(), None).is_none());
    assert!(!r.is_open(5));
}

#[test]
fn other_tables_do_not_touch_the_window() {
    let rel = relation(true);
    let mut other = RelationMeta::clone(&rel);
    other.oid = 43;
    let mut r = Reconciler::default();
    r.open(1, rel.oid);
    let mut c = change(Op::Delete, 1, None);
    c.relation = Arc::new(other);
    r.changed(9, &c);
    let closed = r
        .close(
            1,
            &rel,
            vec![ChunkRow {
                tuple: tuple(1, (1, 0)),
                xmax: 0,
                xmin: 0,
            }],
            None,
        )
        .unwrap();
    assert_eq!(closed.emit.len(), 1);
}

#[test]
fn an_xmax_that_only_locked_the_row_keeps_it() {
    let rel = relation(true);
    let mut r = Reconciler::default();
    // Transaction 30 changed key 1 before the window, and locked key 2 (no change event).
    r.changed(30, &change(Op::Update, 1, Some(tuple(1, (5, 0)))));
    r.open(1, rel.oid);
    let rows = vec![
        ChunkRow {
            tuple: tuple(1, (1, 0)),
            xmax: 30,
            xmin: 0,
        },
        ChunkRow {
            tuple: tuple(2, (2, 0)),
            xmax: 30,
            xmin: 0,
        },
    ];
    let closed = r.close(1, &rel, rows, None).unwrap();
    assert_eq!(closed.emit, vec![tuple(2, (2, 0))]);
}

/// `INSERT … ON CONFLICT DO UPDATE`, or `SELECT … FOR UPDATE` then `UPDATE`, leaves the new
/// version locked by its own writer: xmax = xmin. The chunk read that version, so it is
/// published, although the writer changed the key before the window (with its TOASTed value
/// left out, which the stream's image cannot insert); a version whose xmax is another
/// transaction that changed the key is still dropped. Before, both were taken for versions
/// hidden from the `SELECT`: the first was read again and again, and never published.
#[test]
fn a_lock_its_own_writer_kept_is_not_a_replacement() {
    let rel = relation(true);
    let mut r = Reconciler::default();
    let mut unchanged = tuple(1, (5, 0));
    unchanged[2] = Datum::UnchangedToast;
    r.changed(30, &change(Op::Update, 1, Some(unchanged)));
    r.committed(30, true);
    r.changed(31, &change(Op::Update, 2, Some(tuple(2, (6, 6)))));
    r.committed(31, true);
    r.open(1, rel.oid);
    let rows = vec![
        ChunkRow {
            tuple: tuple(1, (5, 99)),
            xmax: 30,
            xmin: 30,
        },
        ChunkRow {
            tuple: tuple(2, (2, 2)),
            xmax: 31,
            xmin: 12,
        },
    ];
    let closed = r.close(1, &rel, rows, None).unwrap();
    assert_eq!(closed.emit, vec![tuple(1, (5, 99))]);
    assert_eq!(closed.dropped, 1);
    assert!(closed.reread.is_empty(), "{:?}", closed.reread);
}

/// A table without a key: a row the chunk read and a transaction deleted or updated away
/// after the `SELECT` (its xmax not set then), with the removal streamed before the high
/// watermark, is dropped once per removal; an equal row not removed is published.
#[test]
fn a_keyless_row_removed_after_the_select_inside_the_window_is_dropped() {
    let rel = relation(false);
    let mut r = Reconciler::default();
    r.start_keyless(rel.oid);
    r.open(1, rel.oid);
    let row = |v: i64| vec![text(0), text(v), text(0)];
    let removal = |op: Op, v: i64| RowChange {
        op,
        relation: rel.clone(),
        lsn: Lsn(0),
        before: Some(row(v)),
        before_is_key_only: false,
        after: (op == Op::Update).then(|| row(v + 100)),
        version: None,
    };
    r.changed(40, &removal(Op::Delete, 1));
    r.changed(41, &removal(Op::Update, 2));
    let read = |v: i64| ChunkRow {
        tuple: row(v),
        xmax: 0,
        xmin: 3,
    };
    let closed = r
        .close(1, &rel, vec![read(1), read(2), read(2), read(3)], None)
        .unwrap();
    assert_eq!(closed.emit, vec![row(2), row(3)]);
    assert_eq!(closed.dropped, 2);
}

#[test]
fn a_truncate_inside_the_window_drops_the_chunk() {
    let rel = relation(true);
    let mut r = Reconciler::default();
    r.open(1, rel.oid);
    r.changed(3, &change(Op::Truncate, 0, None));
    let closed = r
        .close(
            1,
            &rel,
            vec![ChunkRow {
                tuple: tuple(1, (1, 0)),
                xmax: 0,
                xmin: 0,
            }],
            None,
        )
        .unwrap();
    assert!(closed.emit.is_empty());
}

/// A simulated source: committed rows, a stream of transactions, and a replica that applies
/// the stream and the emitted chunks the way pgferry's applier does (insert and complete
/// update: upsert; update without its TOASTed value: update only if present; delete).
struct Sim {
    rng: u64,
    source: BTreeMap<i64, Row>,
    replica: BTreeMap<i64, Row>,
    reconciler: Reconciler,
    next_xid: u32,
    keys: i64,
    /// Chunks carry their key range and the replica prunes it (a re-snapshot).
    prune: bool,
    /// The transaction that wrote each source row's current version (its `xmin`).
    writers: BTreeMap<i64, u32>,
}

impl Sim {
    fn rand(&mut self, n: u64) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % n.max(1)
    }

    /// One random committed transaction: its changes (key, before, after, toast-unchanged).
    fn transaction(&mut self) -> (u32, Vec<SimChange>) {
        self.next_xid += 1;
        let xid = self.next_xid;
        let mut changes = Vec::new();
        for _ in 0..=self.rand(3) {
            let id = self.rand(self.keys as u64) as i64;
            let before = self.source.get(&id).copied();
            let v = self.rand(1000) as i64;
            let (after, unchanged) = match (before, self.rand(4)) {
                (None, _) => (Some((v, v)), false),
                (Some(_), 0) => (None, false),
                (Some((_, big)), 1) => (Some((v, big)), true),
                (Some(_), _) => (Some((v, v)), false),
            };
            match after {
                Some(row) => {
                    self.writers.insert(id, xid);
                    self.source.insert(id, row)
                }
                None => {
                    self.writers.remove(&id);
                    self.source.remove(&id)
                }
            };
            changes.push((id, before, after, unchanged));
        }
        (xid, changes)
    }

    /// Streams a committed transaction: the reconciler sees it, the replica applies it.
    fn stream(&mut self, xid: u32, changes: &[SimChange]) {
        for &(id, before, after, unchanged) in changes {
            let (op, image) = match (before, after) {
                (_, None) => (Op::Delete, None),
                (None, Some(row)) => (Op::Create, Some(tuple(id, row))),
                (Some(_), Some(row)) => {
                    let mut t = tuple(id, row);
                    if unchanged {
                        t[2] = Datum::UnchangedToast;
                    }
                    (Op::Update, Some(t))
                }
            };
            self.reconciler.changed(xid, &change(op, id, image));
            match (after, unchanged) {
                (None, _) => {
                    self.replica.remove(&id);
                }
                (Some(row), true) => {
                    if let Some(present) = self.replica.get_mut(&id) {
                        present.0 = row.0;
                    }
                }
                (Some(row), false) => {
                    self.replica.insert(id, row);
                }
            }
        }
        self.reconciler.committed(xid, true);
    }

    fn some_transactions(&mut self) {
        for _ in 0..self.rand(4) {
            let (xid, changes) = self.transaction();
            self.stream(xid, &changes);
        }
    }

    /// Reads one chunk of `ids` with the watermark protocol; returns keys to read again.
    /// `range`: the chunk is the key range `(after, through]` (`None`: unbounded), which the
    /// replica prunes when the simulation prunes.
    fn chunk(
        &mut self,
        id: u64,
        ids: &[i64],
        race: bool,
        range: Option<(Option<i64>, Option<i64>)>,
    ) -> Vec<Key> {
        let rel = relation(true);
        self.some_transactions();
        // A transaction whose commit precedes the low watermark in the stream but is not yet
        // visible to the SELECT (a synchronous standby holds it).
        let invisible = race.then(|| {
            let (xid, changes) = self.transaction();
            self.stream(xid, &changes);
            (xid, changes)
        });
        self.reconciler.open(id, rel.oid);
        self.some_transactions();
        let mut view = self.source.clone();
        let mut xmax: BTreeMap<i64, u32> = BTreeMap::new();
        if let Some((xid, changes)) = &invisible {
            for &(key, before, _, _) in changes.iter().rev() {
                match before {
                    Some(row) => {
                        view.insert(key, row);
                        xmax.insert(key, *xid);
                    }
                    None => {
                        view.remove(&key);
                    }
                }
            }
        }
        // Rows locked (not changed) by a transaction carry it as xmax too; and rows whose
        // writer kept a lock on the version it wrote (an upsert, an update of a row it had
        // locked) carry that writer as both xmin and xmax.
        self.next_xid += 1;
        let locker = self.next_xid;
        let rows: Vec<ChunkRow> = ids
            .iter()
            .filter_map(|k| view.get(k).map(|row| (*k, *row)))
            .map(|(k, row)| {
                // A version the invisible transaction replaced was written before it (by a
                // transaction not tracked here).
                let xmin = match xmax.get(&k) {
                    Some(_) => 1,
                    None => self.writers.get(&k).copied().unwrap_or(1),
                };
                let xmax = match xmax.get(&k) {
                    Some(x) => *x,
                    None if k % 3 == 0 => locker,
                    // (A lock stays on the version: every read of it sees the same.)
                    None if xmin % 3 == 1 => xmin,
                    None => 0,
                };
                ChunkRow {
                    tuple: tuple(k, row),
                    xmax,
                    xmin,
                }
            })
            .collect();
        self.some_transactions();
        // The SELECT's snapshot: the invisible transaction, and one that has not committed.
        let running: Vec<u32> = invisible
            .iter()
            .map(|(xid, _)| *xid)
            .chain([self.next_xid + 1000])
            .collect();
        let range = range.filter(|_| self.prune);
        let closed = self
            .reconciler
            .close(id, &rel, rows, range.map(|_| &running[..]))
            .expect("window is open");
        let parse = |d: &Datum| match d {
            Datum::Text(b) => std::str::from_utf8(b).unwrap().parse::<i64>().unwrap(),
            _ => unreachable!("chunk rows are complete"),
        };
        let mut kept: std::collections::HashSet<i64> = closed
            .keep
            .iter()
            .map(|k| {
                std::str::from_utf8(k[0].as_ref().unwrap())
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        assert_eq!(closed.unsure, None, "every streamed change was remembered");
        for t in closed.emit {
            kept.insert(parse(&t[0]));
            self.replica
                .insert(parse(&t[0]), (parse(&t[1]), parse(&t[2])));
        }
        if let Some((after, through)) = range {
            self.replica.retain(|k, _| {
                let inside = after.is_none_or(|a| *k > a) && through.is_none_or(|t| *k <= t);
                !inside || kept.contains(k)
            });
        }
        closed.reread
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Whatever the interleaving of chunks and transactions (including transactions that are
    /// streamed before a low watermark but invisible to the chunk's SELECT, rows locked by a
    /// transaction, and updates without their TOASTed values), the replica ends equal to the
    /// source once every chunk and every re-read is done.
    ///
    /// A pruning snapshot (a re-snapshot) starts from a replica holding stale rows too: rows
    /// the source deleted (inside its key space and past it) and old values. Pruning each
    /// chunk's range removes exactly the rows the source does not have; in particular a row
    /// inserted by a transaction the chunk's `SELECT` could not see survives.
    #[test]
    fn replica_equals_source_after_every_chunk(seed in 1u64.., chunk in 1i64..8, keys in 1i64..40, race in any::<bool>(), prune in any::<bool>()) {
        let mut sim = Sim {
            rng: seed,
            source: BTreeMap::new(),
            replica: BTreeMap::new(),
            reconciler: Reconciler::default(),
            next_xid: 100,
            keys,
            prune,
            writers: BTreeMap::new(),
        };
        // Rows that existed before the slot: in the source only.
        for id in 0..keys {
            if sim.rand(3) > 0 {
                sim.source.insert(id, (id, id));
            }
        }
        if prune {
            // A restored replica: some rows the source has (some stale), rows it deleted.
            for id in 0..keys + 5 {
                match (sim.source.get(&id).copied(), sim.rand(3)) {
                    (Some(row), 0) => {
                        sim.replica.insert(id, row);
                    }
                    (Some(row), 1) => {
                        sim.replica.insert(id, (row.0 + 1, row.1));
                    }
                    (None, 0) => {
                        sim.replica.insert(id, (-1, -1));
                    }
                    _ => {}
                }
            }
        }
        let mut id = 0;
        let mut start = 0;
        while start < keys {
            let ids: Vec<i64> = (start..(start + chunk).min(keys)).collect();
            id += 1;
            let racing = race && sim.rand(2) == 0;
            let end = start + chunk;
            let range = ((start > 0).then_some(start - 1), (end < keys).then_some(end - 1));
            let mut reread = sim.chunk(id, &ids, racing, Some(range));
            let mut rounds = 0;
            while !reread.is_empty() {
                rounds += 1;
                prop_assert!(rounds < 50, "re-reads do not end: {:?}", reread);
                let ids: Vec<i64> = reread
                    .iter()
                    .map(|k| std::str::from_utf8(k[0].as_ref().unwrap()).unwrap().parse().unwrap())
                    .collect();
                id += 1;
                reread = sim.chunk(id, &ids, false, None);
            }
            start += chunk;
        }
        sim.some_transactions();
        prop_assert_eq!(&sim.replica, &sim.source);
        prop_assert_eq!(sim.reconciler.open_windows(), 0);
    }
}

/// A table without a key, as a list of row slots (its heap: a slot is a ctid, new rows go at the
/// end). Values are distinct, as the documented contract asks.
#[derive(Default)]
struct Heap {
    /// (value, xmin) per slot; None once deleted.
    slots: Vec<Option<(i64, u32)>>,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// A table without a key, snapshotted in slot (ctid) ranges while transactions insert and
    /// delete rows (deletes carry the full old row, REPLICA IDENTITY FULL): after the starting
    /// truncate, the stream and every chunk, the replica holds the source's rows exactly once.
    #[test]
    fn keyless_replica_equals_source(seed in 1u64.., pages in 1usize..6, initial in 0usize..30) {
        let rel = relation(false);
        let mut rng = seed;
        let mut rand = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n.max(1)
        };
        let mut heap = Heap::default();
        let mut next_value = 0i64;
        for _ in 0..initial {
            heap.slots.push(Some((next_value, 1)));
            next_value += 1;
        }
        // The replica had stale rows; the snapshot's truncate empties it.
        let mut replica: Vec<i64> = vec![-1, -2];
        let mut r = Reconciler::default();
        replica.clear();
        r.start_keyless(rel.oid);
        let mut xid = 10u32;
        let mut transactions = |heap: &mut Heap, replica: &mut Vec<i64>, r: &mut Reconciler, rand: &mut dyn FnMut(u64) -> u64, hidden: Option<&mut Vec<(usize, u32)>>| {
            let mut hidden = hidden;
            // Writers stop after a while, so the snapshot reaches the end of the heap.
            let writes = if xid > 60 { 0 } else { rand(3) };
            for _ in 0..writes {
                xid += 1;
                let live: Vec<usize> = (0..heap.slots.len()).filter(|&i| heap.slots[i].is_some()).collect();
                if rand(2) == 0 || live.is_empty() {
                    heap.slots.push(Some((next_value, xid)));
                    let t = vec![text(0), text(next_value), text(0)];
                    r.changed(xid, &RowChange { op: Op::Create, relation: rel.clone(), lsn: Lsn(0), before: None, before_is_key_only: false, after: Some(t), version: None });
                    replica.push(next_value);
                    next_value += 1;
                } else {
                    let slot = live[rand(live.len() as u64) as usize];
                    let (value, _) = heap.slots[slot].take().unwrap();
                    if let Some(h) = hidden.as_deref_mut() {
                        h.push((slot, xid));
                    }
                    let t = vec![text(0), text(value), text(0)];
                    r.changed(xid, &RowChange { op: Op::Delete, relation: rel.clone(), lsn: Lsn(0), before: Some(t), before_is_key_only: false, after: None, version: None });
                    if let Some(at) = replica.iter().position(|v| *v == value) {
                        replica.remove(at);
                    }
                }
            }
        };
        let mut start = 0;
        let mut id = 0;
        loop {
            let end = start + pages;
            id += 1;
            transactions(&mut heap, &mut replica, &mut r, &mut rand, None);
            r.open(id, rel.oid);
            transactions(&mut heap, &mut replica, &mut r, &mut rand, None);
            let read: Vec<(usize, ChunkRow)> = (start..end.min(heap.slots.len()))
                .filter_map(|i| heap.slots[i].map(|(v, xmin)| (i, v, xmin)))
                .map(|(i, v, xmin)| (i, ChunkRow { tuple: vec![text(0), text(v), text(0)], xmax: 0, xmin }))
                .collect();
            // Deletes after the SELECT: the chunk still holds those rows, with the deleter as
            // xmax when it was deleting while the SELECT read (it committed later), without
            // one when it started after.
            let mut later = Vec::new();
            transactions(&mut heap, &mut replica, &mut r, &mut rand, Some(&mut later));
            let rows: Vec<ChunkRow> = read
                .into_iter()
                .map(|(slot, mut row)| {
                    if let Some((_, x)) = later.iter().find(|(s, _)| *s == slot) {
                        if rand(2) == 0 {
                            row.xmax = *x;
                        }
                    }
                    row
                })
                .collect();
            let closed = r.close(id, &rel, rows, None).unwrap();
            for t in closed.emit {
                if let Datum::Text(b) = &t[1] {
                    replica.push(std::str::from_utf8(b).unwrap().parse().unwrap());
                }
            }
            start = end;
            if start >= heap.slots.len() {
                break;
            }
        }
        r.finish_keyless(rel.oid);
        let mut source: Vec<i64> = heap.slots.iter().flatten().map(|(v, _)| *v).collect();
        source.sort_unstable();
        replica.sort_unstable();
        prop_assert_eq!(replica, source);
    }
}

#[test]
fn a_hidden_transaction_with_forgotten_changes_makes_the_range_unsure() {
    let rel = relation(true);
    let mut r = Reconciler::default();
    // Committed while no snapshot ran: its changes were not given to the reconciler.
    r.committed(50, false);
    // Committed with every change remembered.
    r.changed(51, &change(Op::Create, 7, Some(tuple(7, (1, 1)))));
    r.committed(51, true);
    r.open(1, rel.oid);
    let closed = r.close(1, &rel, Vec::new(), Some(&[51])).unwrap();
    assert_eq!(closed.unsure, None);
    assert_eq!(closed.keep, vec![vec![Some(Bytes::from("7"))]]);
    r.open(2, rel.oid);
    let closed = r.close(2, &rel, Vec::new(), Some(&[51, 50])).unwrap();
    assert_eq!(closed.unsure, Some(50));
    // A transaction whose changes outgrew the memory while it streamed.
    for id in 0..=RECENT_CHANGES as i64 {
        r.changed(60, &change(Op::Create, id, Some(tuple(id, (1, 1)))));
    }
    r.committed(60, true);
    r.open(3, rel.oid);
    let closed = r.close(3, &rel, Vec::new(), Some(&[60])).unwrap();
    assert_eq!(closed.unsure, Some(60));
    // Without a range to prune nothing is collected.
    r.open(4, rel.oid);
    let closed = r.close(4, &rel, Vec::new(), None).unwrap();
    assert!(closed.keep.is_empty() && closed.unsure.is_none());
}

#[test]
fn a_row_whose_window_left_out_its_toasted_value_is_completed_from_the_chunk() {
    let rel = relation(true);
    let without_big = |id: i64, v: i64| vec![text(id), text(v), Datum::UnchangedToast];
    let row = |id: i64, xmax: u32| ChunkRow {
        tuple: tuple(id, (1, 99)),
        xmax,
        xmin: 0,
    };
    let mut r = Reconciler::default();
    // Before the window: transaction 5 changed key 3 (committed, hidden from the SELECT).
    r.changed(5, &change(Op::Update, 3, Some(tuple(3, (2, 50)))));
    r.committed(5, true);
    r.open(1, rel.oid);
    // Inside it: keys 1, 2 and 3 are updated without their TOASTed value; key 2 had a
    // complete update first.
    r.changed(7, &change(Op::Update, 1, Some(without_big(1, 5))));
    r.changed(7, &change(Op::Update, 2, Some(tuple(2, (4, 40)))));
    r.changed(7, &change(Op::Update, 2, Some(without_big(2, 6))));
    r.changed(7, &change(Op::Update, 3, Some(without_big(3, 8))));
    // Key 4's update came after a schema change that moved the columns (a column dropped
    // before the TOASTed one, another added): positions do not match the chunk's row.
    let mut moved = change(Op::Update, 4, Some(without_big(4, 9)));
    let mut relation = (*moved.relation).clone();
    relation.columns.swap(1, 2);
    moved.relation = Arc::new(relation);
    r.changed(7, &moved);
    r.committed(7, true);
    let closed = r
        .close(
            1,
            &rel,
            vec![row(1, 7), row(2, 7), row(3, 5), row(4, 7)],
            None,
        )
        .unwrap();
    // Key 1: the window's image with the chunk's big value, in the chunk's place.
    assert_eq!(closed.emit, vec![tuple(1, (5, 99))]);
    assert_eq!(closed.completed, 1);
    // Key 2: the complete update may have changed the big value; key 3: so may the hidden
    // transaction; key 4: laid out otherwise. All are read again.
    let reread: Vec<Key> = closed.reread;
    assert_eq!(
        reread,
        ["2", "3", "4"].map(|k| vec![Some(Bytes::from(k))]).to_vec()
    );
    assert_eq!(closed.dropped, 3);
}

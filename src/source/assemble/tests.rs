use bytes::Bytes;

use super::*;
use crate::pgtime::PgTimestamp;
use crate::source::pgoutput::*;

fn text(s: &str) -> Datum {
    Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
}

fn relation(schema: &str) -> LogicalMessage {
    LogicalMessage::Relation(Relation {
        stream_xid: None,
        oid: 10,
        namespace: schema.into(),
        name: "t".into(),
        replica_identity: ReplicaIdentity::Full,
        columns: vec![
            Column {
                is_key: true,
                name: "id".into(),
                type_oid: 23,
                type_modifier: -1,
            },
            Column {
                is_key: false,
                name: "v".into(),
                type_oid: 25,
                type_modifier: -1,
            },
        ],
    })
}

fn begin() -> LogicalMessage {
    LogicalMessage::Begin(Begin {
        final_lsn: Lsn(100),
        commit_ts: PgTimestamp(5),
        xid: 9,
    })
}

fn changes(events: &[CaptureEvent]) -> Vec<(Op, Option<Tuple>, Option<Tuple>)> {
    events
        .iter()
        .filter_map(|e| match e {
            CaptureEvent::Change(c) => Some((c.op, c.before.clone(), c.after.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn key_change_becomes_delete_and_create() {
    let mut a = Assembler::default();
    let mut out = Vec::new();
    a.push(relation("public"), Lsn(1), &mut out).unwrap();
    a.push(begin(), Lsn(2), &mut out).unwrap();
    let old = vec![text("1"), text("a")];
    let new = vec![text("2"), text("a")];
    let upd = LogicalMessage::Update(Update {
        stream_xid: None,
        relation_oid: 10,
        old: Some(OldTuple::Full(old.clone())),
        new: new.clone(),
    });
    a.push(upd, Lsn(3), &mut out).unwrap();
    assert_eq!(
        changes(&out),
        vec![(Op::Delete, Some(old), None), (Op::Create, None, Some(new))]
    );
}

#[test]
fn key_change_that_left_toast_out_stays_an_update() {
    // The value left out is only in the row: a delete and a create would lose it.
    let mut a = Assembler::default();
    let mut out = Vec::new();
    a.push(relation("public"), Lsn(1), &mut out).unwrap();
    a.push(begin(), Lsn(2), &mut out).unwrap();
    let old = vec![text("1"), Datum::Null];
    let new = vec![text("2"), Datum::UnchangedToast];
    let upd = LogicalMessage::Update(Update {
        stream_xid: None,
        relation_oid: 10,
        old: Some(OldTuple::Key(old.clone())),
        new: new.clone(),
    });
    a.push(upd, Lsn(3), &mut out).unwrap();
    assert_eq!(changes(&out), vec![(Op::Update, Some(old), Some(new))]);
    let CaptureEvent::Change(change) = &out[out.len() - 1] else {
        panic!("{out:?}")
    };
    assert!(moves_key(change));
}

#[test]
fn same_key_update_stays_an_update() {
    let mut a = Assembler::default();
    let mut out = Vec::new();
    a.push(relation("public"), Lsn(1), &mut out).unwrap();
    a.push(begin(), Lsn(2), &mut out).unwrap();
    let old = vec![text("1"), text("a")];
    let new = vec![text("1"), Datum::UnchangedToast];
    let upd = LogicalMessage::Update(Update {
        stream_xid: None,
        relation_oid: 10,
        old: Some(OldTuple::Full(old.clone())),
        new: new.clone(),
    });
    a.push(upd, Lsn(3), &mut out).unwrap();
    assert_eq!(changes(&out), vec![(Op::Update, Some(old), Some(new))]);
}

#[test]
fn origin_in_a_later_push_still_reaches_its_begin() {
    // The replication stream delivers Begin and Origin as separate messages: the Begin is
    // held back until the next message so the Origin can join it.
    let mut a = Assembler::default();
    let mut out = Vec::new();
    a.push(begin(), Lsn(2), &mut out).unwrap();
    assert!(out.is_empty(), "{out:?}");
    let origin = LogicalMessage::Origin(Origin {
        origin_lsn: Lsn(7),
        name: "pgferry_c".into(),
    });
    a.push(origin, Lsn(2), &mut out).unwrap();
    assert!(out.is_empty(), "{out:?}");
    let commit = LogicalMessage::Commit(Commit {
        flags: 0,
        commit_lsn: Lsn(5),
        end_lsn: Lsn(6),
        commit_ts: PgTimestamp(0),
    });
    a.push(commit, Lsn(5), &mut out).unwrap();
    match &out[..] {
        [CaptureEvent::Begin(m), CaptureEvent::Commit { end_lsn }] => {
            assert_eq!(m.origin.as_deref(), Some("pgferry_c"));
            assert_eq!(*end_lsn, Lsn(6));
        }
        other => panic!("expected Begin + Commit, got {other:?}"),
    }
    let late = LogicalMessage::Origin(Origin {
        origin_lsn: Lsn(8),
        name: "x".into(),
    });
    assert!(
        a.push(late, Lsn(7), &mut out).is_err(),
        "Origin outside a transaction"
    );
}

#[test]
fn internal_schema_is_not_published() {
    let mut a = Assembler::default();
    let mut out = Vec::new();
    a.push(relation(INTERNAL_SCHEMA), Lsn(1), &mut out).unwrap();
    a.push(begin(), Lsn(2), &mut out).unwrap();
    let ins = LogicalMessage::Insert(Insert {
        stream_xid: None,
        relation_oid: 10,
        new: vec![text("1"), text("x")],
    });
    a.push(ins, Lsn(3), &mut out).unwrap();
    assert!(changes(&out).is_empty());
}

#[test]
fn protocol_violations_are_errors() {
    let mut a = Assembler::default();
    let mut out = Vec::new();
    let ins = LogicalMessage::Insert(Insert {
        stream_xid: None,
        relation_oid: 10,
        new: vec![],
    });
    assert!(matches!(
        a.push(ins.clone(), Lsn(1), &mut out),
        Err(AssembleError::Unexpected("Insert", _))
    ));
    a.push(begin(), Lsn(2), &mut out).unwrap();
    assert_eq!(
        a.push(ins, Lsn(3), &mut out),
        Err(AssembleError::UnknownRelation(10))
    );
    a.push(relation("public"), Lsn(4), &mut out).unwrap();
    let short = LogicalMessage::Insert(Insert {
        stream_xid: None,
        relation_oid: 10,
        new: vec![text("1")],
    });
    assert!(matches!(
        a.push(short, Lsn(5), &mut out),
        Err(AssembleError::ColumnCount {
            expected: 2,
            got: 1,
            ..
        })
    ));
}

#[test]
fn heartbeat_message_is_a_position() {
    let mut a = Assembler::default();
    let mut out = Vec::new();
    let hb = LogicalMessage::Message(EmittedMessage {
        stream_xid: None,
        transactional: false,
        lsn: Lsn(77),
        prefix: HEARTBEAT_PREFIX.into(),
        content: Bytes::new(),
    });
    a.push(hb, Lsn(77), &mut out).unwrap();
    assert_eq!(out, vec![CaptureEvent::Position(Lsn(77))]);
}

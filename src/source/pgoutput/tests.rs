//! Property tests: an encoder written from the protocol docs, and the decoder must invert it;
//! arbitrary bytes must decode to `Ok` or `Err`, never a panic.

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;

use super::*;
use crate::lsn::Lsn;
use crate::pgtime::PgTimestamp;

fn put_str(b: &mut BytesMut, s: &str) {
    b.put_slice(s.as_bytes());
    b.put_u8(0);
}

fn put_tuple(b: &mut BytesMut, t: &Tuple) {
    b.put_i16(t.len() as i16);
    for d in t {
        match d {
            Datum::Null => b.put_u8(b'n'),
            Datum::UnchangedToast => b.put_u8(b'u'),
            Datum::Text(v) | Datum::Binary(v) => {
                b.put_u8(if matches!(d, Datum::Text(_)) {
                    b't'
                } else {
                    b'b'
                });
                b.put_i32(v.len() as i32);
                b.put_slice(v);
            }
        }
    }
}

fn put_old(b: &mut BytesMut, o: &OldTuple) {
    b.put_u8(if matches!(o, OldTuple::Key(_)) {
        b'K'
    } else {
        b'O'
    });
    put_tuple(b, o.datums());
}

fn put_xid(b: &mut BytesMut, x: Option<Xid>) {
    if let Some(x) = x {
        b.put_u32(x);
    }
}

fn put_prepare(b: &mut BytesMut, p: &PrepareInfo, with_flags: bool) {
    if with_flags {
        b.put_u8(p.flags);
    }
    b.put_u64(p.prepare_lsn.0);
    b.put_u64(p.end_lsn.0);
    b.put_i64(p.prepare_ts.0);
    b.put_u32(p.xid);
    put_str(b, &p.gid);
}

/// Encodes like the server does (src/backend/replication/logical/proto.c).
fn encode(m: &LogicalMessage) -> Bytes {
    let mut b = BytesMut::new();
    match m {
        LogicalMessage::Begin(x) => {
            b.put_u8(b'B');
            b.put_u64(x.final_lsn.0);
            b.put_i64(x.commit_ts.0);
            b.put_u32(x.xid);
        }
        LogicalMessage::Commit(x) => {
            b.put_u8(b'C');
            b.put_u8(x.flags);
            b.put_u64(x.commit_lsn.0);
            b.put_u64(x.end_lsn.0);
            b.put_i64(x.commit_ts.0);
        }
        LogicalMessage::Origin(x) => {
            b.put_u8(b'O');
            b.put_u64(x.origin_lsn.0);
            put_str(&mut b, &x.name);
        }
        LogicalMessage::Relation(x) => {
            b.put_u8(b'R');
            put_xid(&mut b, x.stream_xid);
            b.put_u32(x.oid);
            put_str(&mut b, &x.namespace);
            put_str(&mut b, &x.name);
            b.put_u8(match x.replica_identity {
                ReplicaIdentity::Default => b'd',
                ReplicaIdentity::Nothing => b'n',
                ReplicaIdentity::Full => b'f',
                ReplicaIdentity::Index => b'i',
            });
            b.put_i16(x.columns.len() as i16);
            for c in &x.columns {
                b.put_u8(u8::from(c.is_key));
                put_str(&mut b, &c.name);
                b.put_u32(c.type_oid);
                b.put_i32(c.type_modifier);
            }
        }
        LogicalMessage::Type(x) => {
            b.put_u8(b'Y');
            put_xid(&mut b, x.stream_xid);
            b.put_u32(x.oid);
            put_str(&mut b, &x.namespace);
            put_str(&mut b, &x.name);
        }
        LogicalMessage::Insert(x) => {
            b.put_u8(b'I');
            put_xid(&mut b, x.stream_xid);
            b.put_u32(x.relation_oid);
            b.put_u8(b'N');
            put_tuple(&mut b, &x.new);
        }
        LogicalMessage::Update(x) => {
            b.put_u8(b'U');
            put_xid(&mut b, x.stream_xid);
            b.put_u32(x.relation_oid);
            if let Some(o) = &x.old {
                put_old(&mut b, o);
            }
            b.put_u8(b'N');
            put_tuple(&mut b, &x.new);
        }
        LogicalMessage::Delete(x) => {
            b.put_u8(b'D');
            put_xid(&mut b, x.stream_xid);
            b.put_u32(x.relation_oid);
            put_old(&mut b, &x.old);
        }
        LogicalMessage::Truncate(x) => {
            b.put_u8(b'T');
            put_xid(&mut b, x.stream_xid);
            b.put_u32(x.relation_oids.len() as u32);
            b.put_u8(u8::from(x.cascade) | (u8::from(x.restart_identity) << 1));
            for o in &x.relation_oids {
                b.put_u32(*o);
            }
        }
        LogicalMessage::Message(x) => {
            b.put_u8(b'M');
            put_xid(&mut b, x.stream_xid);
            b.put_u8(u8::from(x.transactional));
            b.put_u64(x.lsn.0);
            put_str(&mut b, &x.prefix);
            b.put_i32(x.content.len() as i32);
            b.put_slice(&x.content);
        }
        LogicalMessage::StreamStart { xid, first_segment } => {
            b.put_u8(b'S');
            b.put_u32(*xid);
            b.put_u8(u8::from(*first_segment));
        }
        LogicalMessage::StreamStop => b.put_u8(b'E'),
        LogicalMessage::StreamCommit(x) => {
            b.put_u8(b'c');
            b.put_u32(x.xid);
            b.put_u8(x.flags);
            b.put_u64(x.commit_lsn.0);
            b.put_u64(x.end_lsn.0);
            b.put_i64(x.commit_ts.0);
        }
        LogicalMessage::StreamAbort(x) => {
            b.put_u8(b'A');
            b.put_u32(x.xid);
            b.put_u32(x.subxid);
            if let Some((lsn, ts)) = x.abort {
                b.put_u64(lsn.0);
                b.put_i64(ts.0);
            }
        }
        LogicalMessage::BeginPrepare(x) => {
            b.put_u8(b'b');
            put_prepare(&mut b, x, false);
        }
        LogicalMessage::Prepare(x) => {
            b.put_u8(b'P');
            put_prepare(&mut b, x, true);
        }
        LogicalMessage::StreamPrepare(x) => {
            b.put_u8(b'p');
            put_prepare(&mut b, x, true);
        }
        LogicalMessage::CommitPrepared(x) => {
            b.put_u8(b'K');
            b.put_u8(x.flags);
            b.put_u64(x.commit_lsn.0);
            b.put_u64(x.end_lsn.0);
            b.put_i64(x.commit_ts.0);
            b.put_u32(x.xid);
            put_str(&mut b, &x.gid);
        }
        LogicalMessage::RollbackPrepared(x) => {
            b.put_u8(b'r');
            b.put_u8(x.flags);
            b.put_u64(x.prepare_end_lsn.0);
            b.put_u64(x.rollback_end_lsn.0);
            b.put_i64(x.prepare_ts.0);
            b.put_i64(x.rollback_ts.0);
            b.put_u32(x.xid);
            put_str(&mut b, &x.gid);
        }
    }
    b.freeze()
}

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z_ é\"]{0,12}"
}

fn datum() -> impl Strategy<Value = Datum> {
    prop_oneof![
        Just(Datum::Null),
        Just(Datum::UnchangedToast),
        proptest::collection::vec(any::<u8>(), 0..24).prop_map(|v| Datum::Text(v.into())),
        proptest::collection::vec(any::<u8>(), 0..24).prop_map(|v| Datum::Binary(v.into())),
    ]
}

fn tuple() -> impl Strategy<Value = Tuple> {
    proptest::collection::vec(datum(), 0..8)
}

fn old_tuple() -> impl Strategy<Value = OldTuple> {
    prop_oneof![
        tuple().prop_map(OldTuple::Key),
        tuple().prop_map(OldTuple::Full)
    ]
}

fn prepare() -> impl Strategy<Value = PrepareInfo> {
    (
        any::<u8>(),
        any::<u64>(),
        any::<u64>(),
        any::<i64>(),
        any::<u32>(),
        name(),
    )
        .prop_map(|(flags, a, e, ts, xid, gid)| PrepareInfo {
            flags,
            prepare_lsn: Lsn(a),
            end_lsn: Lsn(e),
            prepare_ts: PgTimestamp(ts),
            xid,
            gid,
        })
}

/// Messages valid outside a streamed block (stream_xid = None where it applies).
fn message() -> impl Strategy<Value = LogicalMessage> {
    let column =
        (any::<bool>(), name(), any::<u32>(), any::<i32>()).prop_map(|(k, n, t, m)| Column {
            is_key: k,
            name: n,
            type_oid: t,
            type_modifier: m,
        });
    let ident = prop_oneof![
        Just(ReplicaIdentity::Default),
        Just(ReplicaIdentity::Nothing),
        Just(ReplicaIdentity::Full),
        Just(ReplicaIdentity::Index)
    ];
    prop_oneof![
        (any::<u64>(), any::<i64>(), any::<u32>()).prop_map(|(l, t, x)| {
            LogicalMessage::Begin(Begin {
                final_lsn: Lsn(l),
                commit_ts: PgTimestamp(t),
                xid: x,
            })
        }),
        (any::<u8>(), any::<u64>(), any::<u64>(), any::<i64>()).prop_map(|(f, c, e, t)| {
            LogicalMessage::Commit(Commit {
                flags: f,
                commit_lsn: Lsn(c),
                end_lsn: Lsn(e),
                commit_ts: PgTimestamp(t),
            })
        }),
        (any::<u64>(), name()).prop_map(|(l, n)| LogicalMessage::Origin(Origin {
            origin_lsn: Lsn(l),
            name: n
        })),
        (
            any::<u32>(),
            name(),
            name(),
            ident,
            proptest::collection::vec(column, 0..6)
        )
            .prop_map(|(oid, ns, n, ri, cols)| LogicalMessage::Relation(Relation {
                stream_xid: None,
                oid,
                namespace: ns,
                name: n,
                replica_identity: ri,
                columns: cols,
            })),
        (any::<u32>(), tuple()).prop_map(|(oid, t)| LogicalMessage::Insert(Insert {
            stream_xid: None,
            relation_oid: oid,
            new: t
        })),
        (any::<u32>(), proptest::option::of(old_tuple()), tuple()).prop_map(|(oid, o, t)| {
            LogicalMessage::Update(Update {
                stream_xid: None,
                relation_oid: oid,
                old: o,
                new: t,
            })
        }),
        (any::<u32>(), old_tuple()).prop_map(|(oid, o)| LogicalMessage::Delete(Delete {
            stream_xid: None,
            relation_oid: oid,
            old: o
        })),
        (
            any::<bool>(),
            any::<bool>(),
            proptest::collection::vec(any::<u32>(), 0..5)
        )
            .prop_map(|(c, r, oids)| LogicalMessage::Truncate(Truncate {
                stream_xid: None,
                cascade: c,
                restart_identity: r,
                relation_oids: oids,
            })),
        (
            any::<bool>(),
            any::<u64>(),
            name(),
            proptest::collection::vec(any::<u8>(), 0..16)
        )
            .prop_map(|(t, l, p, c)| LogicalMessage::Message(EmittedMessage {
                stream_xid: None,
                transactional: t,
                lsn: Lsn(l),
                prefix: p,
                content: c.into(),
            })),
        (
            any::<u32>(),
            any::<u32>(),
            proptest::option::of((any::<u64>(), any::<i64>()))
        )
            .prop_map(|(x, s, a)| LogicalMessage::StreamAbort(StreamAbort {
                xid: x,
                subxid: s,
                abort: a.map(|(l, t)| (Lsn(l), PgTimestamp(t))),
            })),
        prepare().prop_map(|mut p| {
            p.flags = 0;
            LogicalMessage::BeginPrepare(p)
        }),
        prepare().prop_map(LogicalMessage::Prepare),
        prepare().prop_map(LogicalMessage::StreamPrepare),
        Just(LogicalMessage::StreamStop),
    ]
}

proptest! {
    #[test]
    fn decode_inverts_encode(m in message()) {
        prop_assert_eq!(decode(encode(&m), false).unwrap(), m);
    }

    #[test]
    fn streamed_data_messages_carry_their_xid(xid: u32, oid: u32, t in tuple()) {
        let m = LogicalMessage::Insert(Insert { stream_xid: Some(xid), relation_oid: oid, new: t });
        prop_assert_eq!(decode(encode(&m), true).unwrap(), m);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256), s: bool) {
        let _ = decode(Bytes::from(bytes), s);
    }

    #[test]
    fn every_truncation_is_an_error(m in message()) {
        // A v4 Stream Abort cut right after the subxid is a valid v2 Stream Abort.
        prop_assume!(!matches!(&m, LogicalMessage::StreamAbort(a) if a.abort.is_some()));
        let full = encode(&m);
        for cut in 0..full.len() {
            prop_assert!(decode(full.slice(..cut), false).is_err(), "cut at {cut} of {m:?}");
        }
    }
}

#[test]
fn stream_decoder_tracks_blocks() {
    let mut d = StreamDecoder::default();
    let start = encode(&LogicalMessage::StreamStart {
        xid: 7,
        first_segment: true,
    });
    d.decode(start).unwrap();
    let ins = LogicalMessage::Insert(Insert {
        stream_xid: Some(7),
        relation_oid: 1,
        new: vec![Datum::Null],
    });
    assert_eq!(d.decode(encode(&ins)).unwrap(), ins);
    d.decode(encode(&LogicalMessage::StreamStop)).unwrap();
    let plain = LogicalMessage::Insert(Insert {
        stream_xid: None,
        relation_oid: 1,
        new: vec![Datum::Null],
    });
    assert_eq!(d.decode(encode(&plain)).unwrap(), plain);
}

#[test]
fn errors_name_message_and_field() {
    let err = decode(Bytes::from_static(b"B\0\0"), false).unwrap_err();
    assert_eq!(
        err.to_string(),
        "pgoutput Begin message truncated while reading final lsn"
    );
    let err = decode(Bytes::from_static(b"Z"), false).unwrap_err();
    assert_eq!(err, DecodeError::UnknownTag(b'Z'));
}

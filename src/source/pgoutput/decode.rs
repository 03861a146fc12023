//! Bytes → [`LogicalMessage`]. A pure function: no I/O, no allocation beyond the message, and
//! every malformed input is a [`DecodeError`], never a panic (the fuzz target checks this).
//!
//! The only context a message needs is whether it sits inside a streamed block (protocol v2+),
//! because the data messages of streamed transactions carry their xid as an extra first field.
//! [`StreamDecoder`] tracks that from the `S`/`E` markers.

use bytes::{Buf, Bytes};

use super::message::*;
use crate::lsn::Lsn;
use crate::pgtime::PgTimestamp;

/// Why a pgoutput message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message was empty.
    #[error("empty pgoutput message")]
    Empty,
    /// The first byte is not a known message type.
    #[error("unknown pgoutput message type {0:#04x}")]
    UnknownTag(u8),
    /// The message ended before a field.
    #[error("pgoutput {message} message truncated while reading {field}")]
    Truncated {
        /// Message type name.
        message: &'static str,
        /// Field being read.
        field: &'static str,
    },
    /// A string field had no terminator or was not UTF-8.
    #[error("pgoutput {message} message has an invalid string in {field}")]
    InvalidString {
        /// Message type name.
        message: &'static str,
        /// Field being read.
        field: &'static str,
    },
    /// A tuple column started with an unknown kind byte.
    #[error("pgoutput {message} message has unknown tuple column kind {kind:#04x}")]
    InvalidColumnKind {
        /// Message type name.
        message: &'static str,
        /// The offending byte.
        kind: u8,
    },
    /// A byte that must be one of a few values was something else.
    #[error("pgoutput {message} message has unexpected {field} byte {value:#04x}")]
    UnexpectedByte {
        /// Message type name.
        message: &'static str,
        /// Field being read.
        field: &'static str,
        /// The offending byte.
        value: u8,
    },
    /// A length or count was negative.
    #[error("pgoutput {message} message has a negative {field}")]
    NegativeLength {
        /// Message type name.
        message: &'static str,
        /// Field being read.
        field: &'static str,
    },
    /// Bytes were left over after the last field.
    #[error("pgoutput {message} message has {extra} trailing bytes")]
    TrailingBytes {
        /// Message type name.
        message: &'static str,
        /// How many bytes were left.
        extra: usize,
    },
}

/// A bounds-checked cursor that names the message and field in every error.
struct Reader {
    buf: Bytes,
    message: &'static str,
}

impl Reader {
    fn need(&self, n: usize, field: &'static str) -> Result<(), DecodeError> {
        if self.buf.remaining() < n {
            return Err(DecodeError::Truncated {
                message: self.message,
                field,
            });
        }
        Ok(())
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        self.need(1, field)?;
        Ok(self.buf.get_u8())
    }

    fn i16(&mut self, field: &'static str) -> Result<i16, DecodeError> {
        self.need(2, field)?;
        Ok(self.buf.get_i16())
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.need(4, field)?;
        Ok(self.buf.get_u32())
    }

    fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        self.need(4, field)?;
        Ok(self.buf.get_i32())
    }

    fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        self.need(8, field)?;
        Ok(self.buf.get_i64())
    }

    fn lsn(&mut self, field: &'static str) -> Result<Lsn, DecodeError> {
        self.need(8, field)?;
        Ok(Lsn(self.buf.get_u64()))
    }

    fn ts(&mut self, field: &'static str) -> Result<PgTimestamp, DecodeError> {
        self.i64(field).map(PgTimestamp)
    }

    fn len(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let n = self.i32(field)?;
        usize::try_from(n).map_err(|_| DecodeError::NegativeLength {
            message: self.message,
            field,
        })
    }

    fn bytes(&mut self, n: usize, field: &'static str) -> Result<Bytes, DecodeError> {
        self.need(n, field)?;
        Ok(self.buf.split_to(n))
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let invalid = DecodeError::InvalidString {
            message: self.message,
            field,
        };
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| invalid.clone())?;
        let raw = self.buf.split_to(end);
        self.buf.advance(1);
        String::from_utf8(raw.to_vec()).map_err(|_| invalid)
    }

    fn stream_xid(&mut self, in_stream: bool) -> Result<Option<Xid>, DecodeError> {
        if in_stream {
            self.u32("stream xid").map(Some)
        } else {
            Ok(None)
        }
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let n = self.i16("column count")?;
        let n = usize::try_from(n).map_err(|_| DecodeError::NegativeLength {
            message: self.message,
            field: "column count",
        })?;
        // Each column takes at least one byte; refuse counts the buffer cannot hold before
        // allocating, so a hostile count cannot make us reserve memory.
        self.need(n, "tuple columns")?;
        let mut datums = Vec::with_capacity(n);
        for _ in 0..n {
            let datum = match self.u8("column kind")? {
                b'n' => Datum::Null,
                b'u' => Datum::UnchangedToast,
                b't' => {
                    let len = self.len("text length")?;
                    Datum::Text(self.bytes(len, "text value")?)
                }
                b'b' => {
                    let len = self.len("binary length")?;
                    Datum::Binary(self.bytes(len, "binary value")?)
                }
                kind => {
                    return Err(DecodeError::InvalidColumnKind {
                        message: self.message,
                        kind,
                    })
                }
            };
            datums.push(datum);
        }
        Ok(datums)
    }

    fn old_tuple(&mut self, kind: u8) -> Result<OldTuple, DecodeError> {
        match kind {
            b'K' => Ok(OldTuple::Key(self.tuple()?)),
            b'O' => Ok(OldTuple::Full(self.tuple()?)),
            value => Err(DecodeError::UnexpectedByte {
                message: self.message,
                field: "old tuple kind",
                value,
            }),
        }
    }

    fn expect(&mut self, want: u8, field: &'static str) -> Result<(), DecodeError> {
        match self.u8(field)? {
            v if v == want => Ok(()),
            value => Err(DecodeError::UnexpectedByte {
                message: self.message,
                field,
                value,
            }),
        }
    }

    fn finish<T>(self, value: T) -> Result<T, DecodeError> {
        match self.buf.remaining() {
            0 => Ok(value),
            extra => Err(DecodeError::TrailingBytes {
                message: self.message,
                extra,
            }),
        }
    }
}

fn message_name(tag: u8) -> Option<&'static str> {
    Some(match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        b'S' => "Stream Start",
        b'E' => "Stream Stop",
        b'c' => "Stream Commit",
        b'A' => "Stream Abort",
        b'b' => "Begin Prepare",
        b'P' => "Prepare",
        b'K' => "Commit Prepared",
        b'r' => "Rollback Prepared",
        b'p' => "Stream Prepare",
        _ => return None,
    })
}

/// Decodes one pgoutput message. `in_stream` is true between Stream Start and Stream Stop.
pub fn decode(mut buf: Bytes, in_stream: bool) -> Result<LogicalMessage, DecodeError> {
    if buf.is_empty() {
        return Err(DecodeError::Empty);
    }
    let tag = buf.get_u8();
    let message = message_name(tag).ok_or(DecodeError::UnknownTag(tag))?;
    let mut r = Reader { buf, message };
    let msg = match tag {
        b'B' => LogicalMessage::Begin(Begin {
            final_lsn: r.lsn("final lsn")?,
            commit_ts: r.ts("commit timestamp")?,
            xid: r.u32("xid")?,
        }),
        b'C' => LogicalMessage::Commit(Commit {
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit lsn")?,
            end_lsn: r.lsn("end lsn")?,
            commit_ts: r.ts("commit timestamp")?,
        }),
        b'O' => LogicalMessage::Origin(Origin {
            origin_lsn: r.lsn("origin lsn")?,
            name: r.string("origin name")?,
        }),
        b'R' => LogicalMessage::Relation(decode_relation(&mut r, in_stream)?),
        b'Y' => LogicalMessage::Type(TypeInfo {
            stream_xid: r.stream_xid(in_stream)?,
            oid: r.u32("type oid")?,
            namespace: r.string("namespace")?,
            name: r.string("type name")?,
        }),
        b'I' => {
            let stream_xid = r.stream_xid(in_stream)?;
            let relation_oid = r.u32("relation oid")?;
            r.expect(b'N', "new tuple marker")?;
            LogicalMessage::Insert(Insert {
                stream_xid,
                relation_oid,
                new: r.tuple()?,
            })
        }
        b'U' => {
            let stream_xid = r.stream_xid(in_stream)?;
            let relation_oid = r.u32("relation oid")?;
            let (old, marker) = match r.u8("tuple marker")? {
                b'N' => (None, b'N'),
                kind => (Some(r.old_tuple(kind)?), r.u8("new tuple marker")?),
            };
            if marker != b'N' {
                return Err(DecodeError::UnexpectedByte {
                    message,
                    field: "new tuple marker",
                    value: marker,
                });
            }
            LogicalMessage::Update(Update {
                stream_xid,
                relation_oid,
                old,
                new: r.tuple()?,
            })
        }
        b'D' => {
            let stream_xid = r.stream_xid(in_stream)?;
            let relation_oid = r.u32("relation oid")?;
            let kind = r.u8("old tuple kind")?;
            LogicalMessage::Delete(Delete {
                stream_xid,
                relation_oid,
                old: r.old_tuple(kind)?,
            })
        }
        b'T' => {
            let stream_xid = r.stream_xid(in_stream)?;
            let n = r.len("relation count")?;
            let options = r.u8("options")?;
            r.need(n.saturating_mul(4), "relation oids")?;
            let relation_oids = (0..n)
                .map(|_| r.u32("relation oid"))
                .collect::<Result<_, _>>()?;
            LogicalMessage::Truncate(Truncate {
                stream_xid,
                cascade: options & 1 != 0,
                restart_identity: options & 2 != 0,
                relation_oids,
            })
        }
        b'M' => {
            let stream_xid = r.stream_xid(in_stream)?;
            let flags = r.u8("flags")?;
            let lsn = r.lsn("lsn")?;
            let prefix = r.string("prefix")?;
            let len = r.len("content length")?;
            LogicalMessage::Message(EmittedMessage {
                stream_xid,
                transactional: flags & 1 != 0,
                lsn,
                prefix,
                content: r.bytes(len, "content")?,
            })
        }
        b'S' => LogicalMessage::StreamStart {
            xid: r.u32("xid")?,
            first_segment: r.u8("first segment")? == 1,
        },
        b'E' => LogicalMessage::StreamStop,
        b'c' => LogicalMessage::StreamCommit(StreamCommit {
            xid: r.u32("xid")?,
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit lsn")?,
            end_lsn: r.lsn("end lsn")?,
            commit_ts: r.ts("commit timestamp")?,
        }),
        b'A' => {
            let xid = r.u32("xid")?;
            let subxid = r.u32("subxid")?;
            // v4 adds abort LSN and timestamp, but only when streaming = parallel; the
            // presence of the bytes is the only signal on the wire.
            let abort = if r.buf.has_remaining() {
                Some((r.lsn("abort lsn")?, r.ts("abort timestamp")?))
            } else {
                None
            };
            LogicalMessage::StreamAbort(StreamAbort { xid, subxid, abort })
        }
        b'b' => LogicalMessage::BeginPrepare(PrepareInfo {
            flags: 0,
            prepare_lsn: r.lsn("prepare lsn")?,
            end_lsn: r.lsn("end lsn")?,
            prepare_ts: r.ts("prepare timestamp")?,
            xid: r.u32("xid")?,
            gid: r.string("gid")?,
        }),
        b'P' | b'p' => {
            let info = decode_prepare(&mut r)?;
            if tag == b'P' {
                LogicalMessage::Prepare(info)
            } else {
                LogicalMessage::StreamPrepare(info)
            }
        }
        b'K' => LogicalMessage::CommitPrepared(CommitPrepared {
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit lsn")?,
            end_lsn: r.lsn("end lsn")?,
            commit_ts: r.ts("commit timestamp")?,
            xid: r.u32("xid")?,
            gid: r.string("gid")?,
        }),
        b'r' => LogicalMessage::RollbackPrepared(RollbackPrepared {
            flags: r.u8("flags")?,
            prepare_end_lsn: r.lsn("prepare end lsn")?,
            rollback_end_lsn: r.lsn("rollback end lsn")?,
            prepare_ts: r.ts("prepare timestamp")?,
            rollback_ts: r.ts("rollback timestamp")?,
            xid: r.u32("xid")?,
            gid: r.string("gid")?,
        }),
        other => return Err(DecodeError::UnknownTag(other)),
    };
    r.finish(msg)
}

fn decode_relation(r: &mut Reader, in_stream: bool) -> Result<Relation, DecodeError> {
    let stream_xid = r.stream_xid(in_stream)?;
    let oid = r.u32("relation oid")?;
    let namespace = r.string("namespace")?;
    let name = r.string("relation name")?;
    let replica_identity = match r.u8("replica identity")? {
        b'd' => ReplicaIdentity::Default,
        b'n' => ReplicaIdentity::Nothing,
        b'f' => ReplicaIdentity::Full,
        b'i' => ReplicaIdentity::Index,
        value => {
            return Err(DecodeError::UnexpectedByte {
                message: r.message,
                field: "replica identity",
                value,
            })
        }
    };
    let n = r.i16("column count")?;
    let n = usize::try_from(n).map_err(|_| DecodeError::NegativeLength {
        message: r.message,
        field: "column count",
    })?;
    // flags + NUL + oid + typmod: at least 10 bytes per column.
    r.need(n.saturating_mul(10), "columns")?;
    let mut columns = Vec::with_capacity(n);
    for _ in 0..n {
        columns.push(Column {
            is_key: r.u8("column flags")? & 1 != 0,
            name: r.string("column name")?,
            type_oid: r.u32("column type oid")?,
            type_modifier: r.i32("column type modifier")?,
        });
    }
    Ok(Relation {
        stream_xid,
        oid,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

fn decode_prepare(r: &mut Reader) -> Result<PrepareInfo, DecodeError> {
    Ok(PrepareInfo {
        flags: r.u8("flags")?,
        prepare_lsn: r.lsn("prepare lsn")?,
        end_lsn: r.lsn("end lsn")?,
        prepare_ts: r.ts("prepare timestamp")?,
        xid: r.u32("xid")?,
        gid: r.string("gid")?,
    })
}

/// Decodes a sequence of messages, tracking whether each one is inside a streamed block.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    in_stream: bool,
}

impl StreamDecoder {
    /// Decodes the next message of the replication stream.
    pub fn decode(&mut self, buf: Bytes) -> Result<LogicalMessage, DecodeError> {
        let msg = decode(buf, self.in_stream)?;
        match msg {
            LogicalMessage::StreamStart { .. } => self.in_stream = true,
            LogicalMessage::StreamStop => self.in_stream = false,
            _ => {}
        }
        Ok(msg)
    }
}

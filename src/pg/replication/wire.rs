//! Backend message framing for the replication connection, and the replication sub-protocol
//! carried in CopyData (XLogData `w`, keepalive `k`, standby status `r`).
//!
//! Pure. `postgres-protocol` parses most backend messages but not CopyBothResponse (`W`), which
//! START_REPLICATION answers with; this module frames everything itself and parses only what
//! the replication connection needs.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::lsn::Lsn;
use crate::pgtime::PgTimestamp;

/// Frames larger than this are refused: the server never sends one (a WAL record's pgoutput
/// message is bounded by 1 GB column values, and we refuse to buffer more than that).
const MAX_FRAME: usize = 1 << 30;

/// The byte stream broke the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A frame announced a length outside the valid range.
    #[error("backend message {tag:?} has invalid length {len}")]
    BadLength {
        /// Message tag.
        tag: char,
        /// Announced length.
        len: i64,
    },
    /// A message body was shorter than its fields.
    #[error("backend message {0:?} is truncated")]
    Truncated(char),
    /// A replication CopyData message had an unknown type.
    #[error("unknown replication message type {0:?}")]
    UnknownReplicationMessage(char),
}

/// An error or notice sent by the server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerNotice {
    /// `S`: ERROR, FATAL, WARNING, …
    pub severity: String,
    /// `C`: SQLSTATE.
    pub code: String,
    /// `M`: primary message.
    pub message: String,
    /// `D`: detail.
    pub detail: Option<String>,
    /// `H`: hint.
    pub hint: Option<String>,
}

/// Authentication request (`R`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthRequest {
    /// Authenticated.
    Ok,
    /// Send the password in clear text.
    Cleartext,
    /// Send an MD5 hash with this salt.
    Md5([u8; 4]),
    /// Start SASL with one of these mechanisms.
    Sasl(Vec<String>),
    /// SASL challenge.
    SaslContinue(Bytes),
    /// SASL outcome.
    SaslFinal(Bytes),
    /// Anything else (Kerberos, SSPI, …).
    Unsupported(i32),
}

/// The backend messages the replication connection handles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// `R`.
    Auth(AuthRequest),
    /// `S`, `K`, `N` and anything else we skip.
    Ignored(char),
    /// `Z`.
    ReadyForQuery,
    /// `E`.
    Error(ServerNotice),
    /// `N`, surfaced for logging.
    Notice(ServerNotice),
    /// `T`: column names.
    RowDescription(Vec<String>),
    /// `D`: column values (text format).
    DataRow(Vec<Option<String>>),
    /// `C`.
    CommandComplete,
    /// `W`: START_REPLICATION succeeded.
    CopyBothResponse,
    /// `d`.
    CopyData(Bytes),
    /// `c`.
    CopyDone,
}

fn cstring(buf: &mut Bytes, tag: char) -> Result<String, WireError> {
    let end = buf
        .iter()
        .position(|&b| b == 0)
        .ok_or(WireError::Truncated(tag))?;
    let s = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.advance(end + 1);
    Ok(s)
}

fn notice(mut body: Bytes, tag: char) -> Result<ServerNotice, WireError> {
    let mut n = ServerNotice::default();
    while body.has_remaining() {
        let field = body.get_u8();
        if field == 0 {
            break;
        }
        let value = cstring(&mut body, tag)?;
        match field {
            b'V' => n.severity = value,
            b'S' if n.severity.is_empty() => n.severity = value,
            b'C' => n.code = value,
            b'M' => n.message = value,
            b'D' => n.detail = Some(value),
            b'H' => n.hint = Some(value),
            _ => {}
        }
    }
    Ok(n)
}

fn need(body: &Bytes, n: usize, tag: char) -> Result<(), WireError> {
    if body.remaining() < n {
        Err(WireError::Truncated(tag))
    } else {
        Ok(())
    }
}

fn auth(mut body: Bytes) -> Result<AuthRequest, WireError> {
    need(&body, 4, 'R')?;
    Ok(match body.get_i32() {
        0 => AuthRequest::Ok,
        3 => AuthRequest::Cleartext,
        5 => {
            need(&body, 4, 'R')?;
            let mut salt = [0; 4];
            body.copy_to_slice(&mut salt);
            AuthRequest::Md5(salt)
        }
        10 => {
            let mut mechanisms = Vec::new();
            while body.first().is_some_and(|&b| b != 0) {
                mechanisms.push(cstring(&mut body, 'R')?);
            }
            AuthRequest::Sasl(mechanisms)
        }
        11 => AuthRequest::SaslContinue(body),
        12 => AuthRequest::SaslFinal(body),
        other => AuthRequest::Unsupported(other),
    })
}

fn data_row(mut body: Bytes) -> Result<Vec<Option<String>>, WireError> {
    need(&body, 2, 'D')?;
    let n = body.get_i16().max(0) as usize;
    let mut values = Vec::with_capacity(n.min(body.remaining()));
    for _ in 0..n {
        need(&body, 4, 'D')?;
        let len = body.get_i32();
        if len < 0 {
            values.push(None);
            continue;
        }
        need(&body, len as usize, 'D')?;
        let v = body.split_to(len as usize);
        values.push(Some(String::from_utf8_lossy(&v).into_owned()));
    }
    Ok(values)
}

fn row_description(mut body: Bytes) -> Result<Vec<String>, WireError> {
    need(&body, 2, 'T')?;
    let n = body.get_i16().max(0) as usize;
    let mut names = Vec::with_capacity(n.min(body.remaining()));
    for _ in 0..n {
        names.push(cstring(&mut body, 'T')?);
        need(&body, 18, 'T')?;
        body.advance(18);
    }
    Ok(names)
}

/// Takes one complete backend message off the front of `buf`, if there is one.
pub fn parse_backend(buf: &mut BytesMut) -> Result<Option<Backend>, WireError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0] as char;
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 || len as usize > MAX_FRAME {
        return Err(WireError::BadLength {
            tag,
            len: len.into(),
        });
    }
    let total = 1 + len as usize;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(total).freeze();
    frame.advance(5);
    let body = frame;
    Ok(Some(match tag {
        'R' => Backend::Auth(auth(body)?),
        'Z' => Backend::ReadyForQuery,
        'E' => Backend::Error(notice(body, tag)?),
        'N' => Backend::Notice(notice(body, tag)?),
        'T' => Backend::RowDescription(row_description(body)?),
        'D' => Backend::DataRow(data_row(body)?),
        'C' => Backend::CommandComplete,
        'W' => Backend::CopyBothResponse,
        'd' => Backend::CopyData(body),
        'c' => Backend::CopyDone,
        other => Backend::Ignored(other),
    }))
}

/// A message of the streaming replication sub-protocol (inside CopyData).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// `w`: a pgoutput message.
    XLogData {
        /// WAL position of the record the message came from.
        wal_start: Lsn,
        /// Current end of WAL on the server.
        wal_end: Lsn,
        /// Server clock.
        send_time: PgTimestamp,
        /// The pgoutput message.
        data: Bytes,
    },
    /// `k`: server keepalive.
    Keepalive {
        /// Position up to which the server has sent everything.
        wal_end: Lsn,
        /// Server clock.
        send_time: PgTimestamp,
        /// The server wants a status update now (it is nearing `wal_sender_timeout`).
        reply_requested: bool,
    },
}

/// Parses a CopyData payload from the server.
pub fn parse_replication(mut body: Bytes) -> Result<ReplicationMessage, WireError> {
    need(&body, 1, 'd')?;
    match body.get_u8() {
        b'w' => {
            need(&body, 24, 'w')?;
            Ok(ReplicationMessage::XLogData {
                wal_start: Lsn(body.get_u64()),
                wal_end: Lsn(body.get_u64()),
                send_time: PgTimestamp(body.get_i64()),
                data: body,
            })
        }
        b'k' => {
            need(&body, 17, 'k')?;
            Ok(ReplicationMessage::Keepalive {
                wal_end: Lsn(body.get_u64()),
                send_time: PgTimestamp(body.get_i64()),
                reply_requested: body.get_u8() == 1,
            })
        }
        other => Err(WireError::UnknownReplicationMessage(other as char)),
    }
}

/// A standby status update (`r`): `written` is what we received, `flushed` and `applied` are
/// what is durable downstream. The server advances `confirmed_flush_lsn` to `flushed`.
pub fn standby_status(written: Lsn, flushed: Lsn, now: PgTimestamp, reply: bool) -> Bytes {
    let mut b = BytesMut::with_capacity(34);
    b.put_u8(b'r');
    b.put_u64(written.0);
    b.put_u64(flushed.0);
    b.put_u64(flushed.0);
    b.put_i64(now.0);
    b.put_u8(u8::from(reply));
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(tag: u8, body: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_u8(tag);
        b.put_i32(body.len() as i32 + 4);
        b.put_slice(body);
        b
    }

    #[test]
    fn waits_for_whole_frames() {
        let mut full = frame(b'W', &[0, 0, 0]);
        let mut part = full.split_to(3);
        assert_eq!(parse_backend(&mut part).unwrap(), None);
        part.unsplit(full);
        assert_eq!(
            parse_backend(&mut part).unwrap(),
            Some(Backend::CopyBothResponse)
        );
        assert!(part.is_empty());
    }

    #[test]
    fn error_fields() {
        let mut buf = frame(
            b'E',
            b"SERROR\0VERROR\0C42704\0Mslot missing\0Hcreate it\0\0",
        );
        match parse_backend(&mut buf).unwrap() {
            Some(Backend::Error(n)) => {
                assert_eq!(n.code, "42704");
                assert_eq!(n.message, "slot missing");
                assert_eq!(n.hint.as_deref(), Some("create it"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn keepalive_and_xlogdata() {
        let mut k = BytesMut::new();
        k.put_u8(b'k');
        k.put_u64(42);
        k.put_i64(7);
        k.put_u8(1);
        assert_eq!(
            parse_replication(k.freeze()).unwrap(),
            ReplicationMessage::Keepalive {
                wal_end: Lsn(42),
                send_time: PgTimestamp(7),
                reply_requested: true
            }
        );
        let mut w = BytesMut::new();
        w.put_u8(b'w');
        w.put_u64(1);
        w.put_u64(2);
        w.put_i64(3);
        w.put_slice(b"B...");
        match parse_replication(w.freeze()).unwrap() {
            ReplicationMessage::XLogData {
                wal_start, data, ..
            } => {
                assert_eq!(wal_start, Lsn(1));
                assert_eq!(&data[..], b"B...");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn status_update_layout() {
        let s = standby_status(Lsn(5), Lsn(4), PgTimestamp(9), false);
        assert_eq!(s.len(), 34);
        assert_eq!(s[0], b'r');
        assert_eq!(&s[9..17], &4u64.to_be_bytes());
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut b = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = parse_backend(&mut b) {}
            let _ = parse_replication(Bytes::from(bytes));
        }
    }
}

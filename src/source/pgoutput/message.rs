//! Typed pgoutput messages, as listed in the PostgreSQL docs ("Logical Replication Message
//! Formats"), for protocol versions 1 through 4.
//!
//! These are wire-level facts only. Turning them into domain changes (with relation metadata,
//! keys and transaction context) is done by [`crate::source::assemble`].

use bytes::Bytes;

use crate::lsn::Lsn;
use crate::pgtime::PgTimestamp;

/// Transaction id as sent by the server (32 bits, wraps).
pub type Xid = u32;

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq)]
pub enum LogicalMessage {
    /// `B`: start of a committed transaction (non-streamed).
    Begin(Begin),
    /// `C`: end of a transaction.
    Commit(Commit),
    /// `O`: the transaction was originally committed on another node (replication origin).
    Origin(Origin),
    /// `R`: relation (table) metadata; precedes the first change to that relation.
    Relation(Relation),
    /// `Y`: a non-builtin type used by a relation.
    Type(TypeInfo),
    /// `I`: a new row.
    Insert(Insert),
    /// `U`: a changed row.
    Update(Update),
    /// `D`: a removed row.
    Delete(Delete),
    /// `T`: one TRUNCATE statement over one or more relations.
    Truncate(Truncate),
    /// `M`: a `pg_logical_emit_message` payload.
    Message(EmittedMessage),
    /// `S` (v2+): a block of changes of an in-progress transaction follows.
    StreamStart {
        /// Top-level transaction being streamed.
        xid: Xid,
        /// True for the first block of this transaction.
        first_segment: bool,
    },
    /// `E` (v2+): end of the current streamed block.
    StreamStop,
    /// `c` (v2+): a streamed transaction committed.
    StreamCommit(StreamCommit),
    /// `A` (v2+): a streamed (sub)transaction aborted.
    StreamAbort(StreamAbort),
    /// `b` (v3+): start of a prepared (two-phase) transaction.
    BeginPrepare(PrepareInfo),
    /// `P` (v3+): the transaction was prepared.
    Prepare(PrepareInfo),
    /// `K` (v3+): a prepared transaction committed.
    CommitPrepared(CommitPrepared),
    /// `r` (v3+): a prepared transaction was rolled back.
    RollbackPrepared(RollbackPrepared),
    /// `p` (v3+): a streamed transaction was prepared.
    StreamPrepare(PrepareInfo),
}

/// Fields of `B`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the commit record, i.e. where the transaction ends in the WAL.
    pub final_lsn: Lsn,
    /// Commit timestamp on the node that wrote this WAL.
    pub commit_ts: PgTimestamp,
    /// Transaction id.
    pub xid: Xid,
}

/// Fields of `C`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// Currently unused flags byte.
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// LSN just past the commit record: the position to confirm once this transaction is durable.
    pub end_lsn: Lsn,
    /// Commit timestamp.
    pub commit_ts: PgTimestamp,
}

/// Fields of `O`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Commit LSN on the origin server.
    pub origin_lsn: Lsn,
    /// Replication origin name.
    pub name: String,
}

/// Replica identity setting of a relation (`pg_class.relreplident`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// `d`: primary key, if any.
    Default,
    /// `n`: nothing.
    Nothing,
    /// `f`: all columns.
    Full,
    /// `i`: a chosen unique index.
    Index,
}

/// One column of a `R` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// True when the column is part of the replica identity (the key).
    pub is_key: bool,
    /// Column name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// Type modifier (`atttypmod`), -1 when none.
    pub type_modifier: i32,
}

/// Fields of `R`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Set inside a streamed block (v2+).
    pub stream_xid: Option<Xid>,
    /// Relation OID; the key of the relation cache.
    pub oid: u32,
    /// Schema name (`pg_catalog` is sent as an empty string by the server).
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// Replica identity setting.
    pub replica_identity: ReplicaIdentity,
    /// Published columns, in tuple order.
    pub columns: Vec<Column>,
}

/// Fields of `Y`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeInfo {
    /// Set inside a streamed block (v2+).
    pub stream_xid: Option<Xid>,
    /// Type OID.
    pub oid: u32,
    /// Schema of the type.
    pub namespace: String,
    /// Type name.
    pub name: String,
}

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datum {
    /// `n`: SQL NULL.
    Null,
    /// `u`: an unchanged TOASTed value that the server did not send.
    UnchangedToast,
    /// `t`: the value in the type's text output format.
    Text(Bytes),
    /// `b`: the value in the type's binary format (only with the `binary` option).
    Binary(Bytes),
}

/// A row image: one datum per published column.
pub type Tuple = Vec<Datum>;

/// Fields of `I`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    /// Set inside a streamed block (v2+).
    pub stream_xid: Option<Xid>,
    /// Relation OID.
    pub relation_oid: u32,
    /// The new row.
    pub new: Tuple,
}

/// Which old-row image an `U`/`D` carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// `K`: key columns only (others are sent as NULL).
    Key(Tuple),
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full(Tuple),
}

impl OldTuple {
    /// The datums, whichever kind of image this is.
    pub fn datums(&self) -> &Tuple {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

/// Fields of `U`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// Set inside a streamed block (v2+).
    pub stream_xid: Option<Xid>,
    /// Relation OID.
    pub relation_oid: u32,
    /// Present when the key changed (`K`) or the identity is FULL (`O`).
    pub old: Option<OldTuple>,
    /// The new row; unchanged TOAST columns are [`Datum::UnchangedToast`].
    pub new: Tuple,
}

/// Fields of `D`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    /// Set inside a streamed block (v2+).
    pub stream_xid: Option<Xid>,
    /// Relation OID.
    pub relation_oid: u32,
    /// The old key or old row.
    pub old: OldTuple,
}

/// Fields of `T`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// Set inside a streamed block (v2+).
    pub stream_xid: Option<Xid>,
    /// `TRUNCATE ... CASCADE`.
    pub cascade: bool,
    /// `TRUNCATE ... RESTART IDENTITY`.
    pub restart_identity: bool,
    /// Truncated relations.
    pub relation_oids: Vec<u32>,
}

/// Fields of `M`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmittedMessage {
    /// Set inside a streamed block (v2+).
    pub stream_xid: Option<Xid>,
    /// True when emitted with `transactional => true`.
    pub transactional: bool,
    /// LSN of the message.
    pub lsn: Lsn,
    /// Prefix given to `pg_logical_emit_message`.
    pub prefix: String,
    /// Payload.
    pub content: Bytes,
}

/// Fields of `c`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamCommit {
    /// Transaction id.
    pub xid: Xid,
    /// Currently unused flags byte.
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// LSN just past the commit record.
    pub end_lsn: Lsn,
    /// Commit timestamp.
    pub commit_ts: PgTimestamp,
}

/// Fields of `A`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamAbort {
    /// Top-level transaction id.
    pub xid: Xid,
    /// Aborted subtransaction (equal to `xid` when the whole transaction aborted).
    pub subxid: Xid,
    /// v4 with parallel streaming only: abort LSN and timestamp.
    pub abort: Option<(Lsn, PgTimestamp)>,
}

/// Fields shared by `b`, `P` and `p`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrepareInfo {
    /// Flags byte (`P`/`p` only; 0 for `b`).
    pub flags: u8,
    /// LSN of the prepare record.
    pub prepare_lsn: Lsn,
    /// LSN just past the prepare record.
    pub end_lsn: Lsn,
    /// Prepare timestamp.
    pub prepare_ts: PgTimestamp,
    /// Transaction id.
    pub xid: Xid,
    /// Global transaction identifier.
    pub gid: String,
}

/// Fields of `K`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitPrepared {
    /// Currently unused flags byte.
    pub flags: u8,
    /// LSN of the commit prepared record.
    pub commit_lsn: Lsn,
    /// LSN just past it.
    pub end_lsn: Lsn,
    /// Commit timestamp.
    pub commit_ts: PgTimestamp,
    /// Transaction id.
    pub xid: Xid,
    /// Global transaction identifier.
    pub gid: String,
}

/// Fields of `r`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackPrepared {
    /// Currently unused flags byte.
    pub flags: u8,
    /// End LSN of the prepared transaction.
    pub prepare_end_lsn: Lsn,
    /// End LSN of the rollback record.
    pub rollback_end_lsn: Lsn,
    /// Prepare timestamp.
    pub prepare_ts: PgTimestamp,
    /// Rollback timestamp.
    pub rollback_ts: PgTimestamp,
    /// Transaction id.
    pub xid: Xid,
    /// Global transaction identifier.
    pub gid: String,
}

//! `pgferry join`: seeds an empty node from a running multi-master peer, so that it can join
//! the cluster without losing or repeating a change.
//!
//! 1. Find the last commit record `(o, L)` before the end of the peer's node stream: everything
//!    the peer publishes from now on lies after it.
//! 2. Create a temporary logical slot on the peer with an exported snapshot; its consistent
//!    point `C` splits the peer's history exactly: commits before `C` are in the snapshot,
//!    commits after it are streamed (and published after `o`, since they commit after step 1).
//! 3. In that snapshot, copy every table the peer protects, its version store (tombstones
//!    included) and version floor, and its applied positions. The peer's data holds, from each
//!    other node `Q`, exactly what it had applied up to its recorded position for `Q`.
//! 4. In one transaction on the new node (triggers off, as an applier): the rows, the
//!    versions, and the new node's starting positions: `(peer, o + 1, L)`, and for every other
//!    node the peer's own `(next_offset, commit_lsn)`. Each worker then applies from there:
//!    transactions the copy already holds (between `L` and `C`) carry the versions the copy
//!    has, so they are skipped as already applied; the rest is new.
//!
//! The new node's own slot is created when its pgferry first starts, after the copy, so the
//! copy is never captured and republished.

use bytes::Bytes;
use tokio_postgres::Client;

use crate::apply::multimaster;
use crate::apply::target;
use crate::config::{ApplyMode, Config, SnapshotMode};
use crate::lsn::Lsn;
use crate::pg::replication::ReplicationConnection;
use crate::sink::kafka::node_stream::node_stream_topic;
use crate::sql::qualified;

/// Why a join could not be done.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The config or the databases are not in a state to join.
    #[error("{0}")]
    Refused(String),
    /// A statement failed.
    #[error("{context}")]
    Sql {
        /// What we were doing.
        context: &'static str,
        /// Why.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The replication connection to the peer failed.
    #[error("replication connection to the peer")]
    Replication(#[source] crate::pg::replication::ReplicationError),
    /// Kafka could not say where the peer's stream ends.
    #[error("reading the end of {topic}")]
    Kafka {
        /// The peer's node-stream topic.
        topic: String,
        /// Why.
        #[source]
        source: rdkafka::error::KafkaError,
    },
}

fn sql(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> JoinError {
    move |source| JoinError::Sql { context, source }
}

/// What a join copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    /// Tables copied, with their row counts.
    pub tables: Vec<(String, u64)>,
    /// Version rows copied (tombstones included).
    pub versions: u64,
    /// The peer's consistent point.
    pub consistent: Lsn,
    /// Where the new node starts reading the peer's stream.
    pub peer_offset: i64,
}

/// Seeds this node (`config`: its multi-master config) from `peer` (a node id in
/// `apply.nodes`) whose database is at `peer_url`.
pub async fn join(config: &Config, peer: &str, peer_url: &str) -> Result<Joined, JoinError> {
    let Some(apply) = config
        .apply
        .as_ref()
        .filter(|a| a.mode == ApplyMode::MultiMaster)
    else {
        return Err(JoinError::Refused(
            "join needs a multi_master config (apply.mode: multi_master)".into(),
        ));
    };
    if !apply.nodes.iter().any(|n| n == peer) {
        return Err(JoinError::Refused(format!(
            "{peer} is not in apply.nodes {:?}: list every other node there",
            apply.nodes
        )));
    }
    if config
        .source
        .as_ref()
        .is_some_and(|s| s.snapshot != SnapshotMode::Never)
    {
        return Err(JoinError::Refused(
            "set source.snapshot: never on a joining node: its data comes from the peer, and an \
             initial snapshot would publish it all again"
                .into(),
        ));
    }
    let peer_url: crate::config::PgUrl = peer_url
        .parse()
        .map_err(|e: crate::config::PgUrlError| JoinError::Refused(format!("--peer-url: {e}")))?;
    // Like the config's passwords: never printed, whatever an error or log line carries.
    peer_url.register_secrets();
    let local = crate::pg::connect(&apply.targets[0].url, "pgferry-join")
        .await
        .map_err(sql("connecting to this node's database"))?;
    let source = crate::pg::connect(&peer_url, "pgferry-join-read")
        .await
        .map_err(sql("connecting to the peer's database"))?;

    // This node: bookkeeping and protection first (empty tables), then the emptiness check.
    multimaster::prepare_node(&local, &config.node_id, &apply.tables)
        .await
        .map_err(sql("preparing this node (version store, triggers)"))?;
    let origin = target::origin_name(peer, apply.targets[0].url.dbname());
    target::prepare_session(&local, peer, &origin)
        .await
        .map_err(sql("preparing the apply bookkeeping on this node"))?;
    let tables = protected_tables(&source).await?;
    for table in &tables {
        let (schema, name) = split(table);
        let rows: bool = local
            .query_one(
                &format!("SELECT EXISTS (SELECT 1 FROM {})", qualified(schema, name)),
                &[],
            )
            .await
            .map_err(|e| {
                JoinError::Refused(format!(
                    "{table} exists on the peer but cannot be read here ({e}): create the \
                     schema on this node first"
                ))
            })?
            .get(0);
        if rows {
            return Err(JoinError::Refused(format!(
                "{table} is not empty on this node: join seeds an empty node"
            )));
        }
    }

    // 1. The end of the peer's stream, before the snapshot.
    let topic = node_stream_topic(&config.kafka.topic_prefix, peer);
    let kafka = config.kafka.clone();
    let t = topic.clone();
    // Everything before the end is committed before the slot below, so below its consistent
    // point. The new node starts right after the last commit record there: a position the
    // worker can verify, and whatever it replays up to the consistent point is in the copy
    // already, with the same versions, so it is skipped.
    let (peer_offset, peer_lsn) =
        tokio::task::spawn_blocking(move || crate::apply::position::stream_start(&kafka, &t))
            .await
            .map_err(|e| JoinError::Refused(format!("reading the stream end: {e}")))?
            .map_err(|source| JoinError::Kafka {
                topic: topic.clone(),
                source,
            })?;

    // 2. A temporary slot with an exported snapshot.
    let mut repl = ReplicationConnection::connect(&peer_url, "pgferry-join")
        .await
        .map_err(JoinError::Replication)?;
    let (consistent, snapshot) = repl
        .export_snapshot(&format!("pgferry_join_{}", std::process::id()))
        .await
        .map_err(JoinError::Replication)?;
    source
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            crate::sql::quote_literal(&snapshot)
        ))
        .await
        .map_err(sql("importing the peer's snapshot"))?;

    // 3 and 4.
    local
        .batch_execute(&format!(
            "BEGIN; SET LOCAL session_replication_role = replica; {}",
            multimaster::SESSION_SETTINGS
        ))
        .await
        .map_err(sql("opening the seeding transaction"))?;
    let mut copied = Vec::new();
    for table in &tables {
        let (schema, name) = split(table);
        let rows = copy(&source, &local, &qualified(schema, name)).await?;
        copied.push((table.clone(), rows));
    }
    local
        .batch_execute("DELETE FROM pgferry.versions")
        .await
        .map_err(sql("clearing this node's version store"))?;
    let versions = copy(&source, &local, "pgferry.versions").await?;
    let floor: i64 = source
        .query_one("SELECT t FROM pgferry.version_floor", &[])
        .await
        .map_err(sql("reading the peer's version floor"))?
        .get(0);
    local
        .execute("UPDATE pgferry.version_floor SET t = $1", &[&floor])
        .await
        .map_err(sql("setting the version floor"))?;
    let positions = source
        .query(
            "SELECT source_node, next_offset::text, commit_lsn::text FROM pgferry.apply_progress",
            &[],
        )
        .await
        .map_err(sql("reading the peer's applied positions"))?;
    for row in positions {
        let node: String = row.get(0);
        if node == config.node_id || node == peer {
            continue;
        }
        let (next, lsn): (String, String) = (row.get(1), row.get(2));
        local
            .execute(target::RECORD_PROGRESS, &[&node, &next, &lsn])
            .await
            .map_err(sql("recording a starting position"))?;
    }
    local
        .execute(
            target::RECORD_PROGRESS,
            &[&peer, &peer_offset.to_string(), &peer_lsn.to_string()],
        )
        .await
        .map_err(sql("recording the peer's starting position"))?;
    local
        .batch_execute("COMMIT")
        .await
        .map_err(sql("committing the seed"))?;
    let _ = source.batch_execute("COMMIT").await;
    repl.terminate().await;
    Ok(Joined {
        tables: copied,
        versions,
        consistent,
        peer_offset,
    })
}

/// Tables the peer protects (those with the version trigger), as `schema.table`.
async fn protected_tables(peer: &Client) -> Result<Vec<String>, JoinError> {
    let rows = peer
        .query(
            "SELECT n.nspname || '.' || c.relname
               FROM pg_trigger t
               JOIN pg_class c ON c.oid = t.tgrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE t.tgname = 'zz_pgferry_version'
              ORDER BY 1",
            &[],
        )
        .await
        .map_err(sql("listing the peer's multi-master tables"))?;
    if rows.is_empty() {
        return Err(JoinError::Refused(
            "the peer has no multi-master tables (is pgferry running there in multi_master mode?)"
                .into(),
        ));
    }
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

fn split(table: &str) -> (&str, &str) {
    table.split_once('.').unwrap_or(("public", table))
}

/// Streams one table from the peer's snapshot into this node's open transaction (COPY, text
/// format, the column list of the peer). Returns the rows copied.
async fn copy(from: &Client, to: &Client, table: &str) -> Result<u64, JoinError> {
    let columns: Vec<String> = from
        .query(
            "SELECT quote_ident(attname) FROM pg_attribute
              WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped
                AND attgenerated = ''
              ORDER BY attnum",
            &[&table],
        )
        .await
        .map_err(sql("listing a table's columns on the peer"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let list = columns.join(", ");
    let reader = from
        .copy_out(&format!("COPY (SELECT {list} FROM ONLY {table}) TO STDOUT"))
        .await
        .map_err(sql("copying a table out of the peer"))?;
    let writer = to
        .copy_in::<_, Bytes>(&format!("COPY {table} ({list}) FROM STDIN"))
        .await
        .map_err(sql("copying a table into this node"))?;
    crate::pg::pipe_copy(reader, writer)
        .await
        .map_err(|(side, e)| match side {
            crate::pg::CopySide::Out => sql("reading from the peer")(e),
            crate::pg::CopySide::In => sql("writing into this node")(e),
        })
}

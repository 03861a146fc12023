//! One target database: session setup, progress bookkeeping, table descriptions, and the
//! text-format parameter type. I/O only; statement text comes from [`super::sql`].
//!
//! Progress is stored twice, atomically with the data, in every apply transaction:
//! - the replication origin `pgferry_<node>_<target db>` (via `pg_replication_origin_xact_setup`), which
//!   stamps the applied rows with the source commit timestamp and keeps `remote_lsn`;
//! - `pgferry.apply_progress`, which also records the Kafka offset to resume from.

use std::collections::HashMap;
use std::error::Error;

use bytes::BytesMut;
use tokio_postgres::types::{to_sql_checked, Format, IsNull, Kind, ToSql, Type};
use tokio_postgres::Client;

use crate::lsn::Lsn;
pub use crate::naming::{is_pgferry_origin, origin_name, BOOKKEEPING_SCHEMA};
use crate::value::{builtin, PgType};

/// Where a target stands for one source node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Kafka offset of the next node-stream record to read.
    pub next_offset: i64,
    /// Last source commit LSN applied.
    pub commit_lsn: Lsn,
}

/// Prepares an apply session: replica role (no user triggers, no FK checks, like native
/// logical replication), asynchronous commit (safe: progress is in the same transaction as
/// the data), bookkeeping table, and the node's replication origin.
pub async fn prepare_session(
    client: &Client,
    node: &str,
    origin: &str,
) -> Result<(), tokio_postgres::Error> {
    // One letter per node-stream item: a record holds a bundle of items (`item`, its place
    // in the record), so the first layout's key of one per record is replaced; and one per
    // row of a `rows` item (snapshot rows, many to an item): `item_row`, the row's place in
    // the item (1 for the first), 0 for other items.
    let dead_letter_columns = crate::sql::add_missing_columns(
        "pgferry.dead_letters",
        &[
            ("item", "int NOT NULL DEFAULT 0"),
            ("item_row", "int NOT NULL DEFAULT 0"),
        ],
    );
    client
        .batch_execute(&format!(
            "SET session_replication_role = replica;
             -- Like native subscriptions: the progress row commits with the data, so a target
             -- crash that loses the last commits loses their progress too, and they replay.
             SET synchronous_commit = off;
             -- Apply statements are prepared once and run many times with new values; their
             -- best plan does not depend on the values (key lookups), so plan them once.
             SET plan_cache_mode = force_generic_plan;
             -- Row-level security on a target table the role does not bypass fails a statement
             -- instead of hiding rows from it: an update or delete of a hidden row would
             -- change nothing, silently (native subscriptions refuse such tables too).
             SET row_security = off;
             -- A session whose pgferry was killed while it waited (on a row lock a target
             -- session holds, say) ends within seconds instead of when the wait does: until
             -- it ends it holds the worker's replication origin, and the restarted worker
             -- cannot set it up ('replication origin … is already active for PID …'). A
             -- server that cannot check (not Linux) keeps its default.
             DO $$ BEGIN PERFORM set_config('client_connection_check_interval', '5s', false);
             EXCEPTION WHEN OTHERS THEN NULL; END $$;
             BEGIN;
             -- Workers start together; CREATE ... IF NOT EXISTS is not safe concurrently.
             SELECT pg_advisory_xact_lock(hashtext('pgferry.bookkeeping'));
             -- Only when missing: CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when
             -- the schema exists (an administrator creates it for a least-privilege role).
             DO $$ BEGIN IF to_regnamespace('pgferry') IS NULL THEN CREATE SCHEMA pgferry; END IF; END $$;
             CREATE TABLE IF NOT EXISTS pgferry.apply_progress (
                 source_node text PRIMARY KEY,
                 next_offset bigint NOT NULL,
                 commit_lsn pg_lsn NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now());
             CREATE TABLE IF NOT EXISTS pgferry.origins (
                 roname text PRIMARY KEY,
                 node text NOT NULL);
             CREATE TABLE IF NOT EXISTS pgferry.dead_letters (
                 id bigserial PRIMARY KEY,
                 source_node text NOT NULL,
                 stage text NOT NULL,
                 table_name text,
                 topic text NOT NULL,
                 kafka_offset bigint NOT NULL,
                 lsn text,
                 error text NOT NULL,
                 payload text,
                 created_at timestamptz NOT NULL DEFAULT now(),
                 resolved_at timestamptz,
                 resolution text);
             {dead_letter_columns}
             -- Each only when the catalog has it, or lacks it: ALTER TABLE and CREATE INDEX
             -- lock the table before they look (see add_missing_columns).
             DO $dl$ BEGIN
                 IF EXISTS (SELECT FROM pg_constraint
                             WHERE conrelid = 'pgferry.dead_letters'::regclass
                               AND conname = 'dead_letters_source_node_topic_kafka_offset_key') THEN
                     ALTER TABLE pgferry.dead_letters
                         DROP CONSTRAINT dead_letters_source_node_topic_kafka_offset_key;
                 END IF;
                 IF to_regclass('pgferry.dead_letters_item') IS NOT NULL THEN
                     DROP INDEX pgferry.dead_letters_item;
                 END IF;
                 IF to_regclass('pgferry.dead_letters_item_row') IS NULL THEN
                     CREATE UNIQUE INDEX dead_letters_item_row ON pgferry.dead_letters
                         (source_node, topic, kafka_offset, item, item_row);
                 END IF;
             END $dl$;
             -- A value cast to a type given by name, or NULL where the cast refuses it: an
             -- ALTER COLUMN ... TYPE whose source computed values by USING, before the
             -- re-snapshot that brings them (apply::worker, ddl::to_sql_lenient).
             CREATE OR REPLACE FUNCTION pgferry.cast_or_null(v text, typ text) RETURNS text
             LANGUAGE plpgsql AS $fn$
             DECLARE r text;
             BEGIN
                 EXECUTE format('SELECT $1::%s::text', typ) INTO r USING v;
                 RETURN r;
             EXCEPTION WHEN data_exception THEN RETURN NULL;
             END
             $fn$;
             -- The tables each node's stream announced (apply::admit): its changes may write
             -- only these.
             CREATE TABLE IF NOT EXISTS pgferry.stream_tables (
                 source_node text NOT NULL,
                 table_name text NOT NULL,
                 announced_at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (source_node, table_name));
             -- `pgferry seed` (apply::seed): a replica copied straight from the source; the
             -- worker skips the node's transactions committed before consistent_lsn.
             CREATE TABLE IF NOT EXISTS pgferry.seeds (
                 source_node text PRIMARY KEY,
                 state text NOT NULL CHECK (state IN ('copying', 'done')),
                 tables text[] NOT NULL,
                 consistent_lsn pg_lsn,
                 started_at timestamptz NOT NULL DEFAULT now(),
                 finished_at timestamptz);
             -- Multi-master: each table's column types as the node's stream last described
             -- them (its `relation` record, at stream_offset), kept with the data so a
             -- restarted worker still converts values written under a column's old type
             -- (apply::worker::retype).
             CREATE TABLE IF NOT EXISTS pgferry.stream_relations (
                 source_node text NOT NULL,
                 table_name text NOT NULL,
                 stream_offset bigint NOT NULL,
                 column_types jsonb NOT NULL,
                 PRIMARY KEY (source_node, table_name));
             COMMIT",
        ))
        .await?;
    client
        .execute(
            "SELECT pg_replication_origin_create($1)
              WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = $1)",
            &[&origin],
        )
        .await?;
    super::multimaster::register_origin(client, origin, node).await?;
    client
        .execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
        .await
        .map(drop)
}

/// Records an announced table (`$1` node, `$2` `schema.table`); run in the target
/// transaction of the data that follows the announcement.
pub const RECORD_STREAM_TABLE: &str =
    "INSERT INTO pgferry.stream_tables (source_node, table_name) \
     VALUES ($1, $2) ON CONFLICT DO NOTHING";

/// Records the column types of a table's `relation` record (`$1` node, `$2` `schema.table`,
/// `$3` its offset, `$4` a JSON object of column name → type); run in the target transaction
/// of the changes that follow it, so the record and the changes it describes commit (or roll
/// back) together.
pub const RECORD_STREAM_RELATION: &str = "INSERT INTO pgferry.stream_relations \
     (source_node, table_name, stream_offset, column_types) VALUES ($1, $2, $3, $4::text::jsonb) \
     ON CONFLICT (source_node, table_name) DO UPDATE \
     SET stream_offset = EXCLUDED.stream_offset, column_types = EXCLUDED.column_types";

/// The column types each table's last committed `relation` record of `node`'s stream gave
/// (see [`RECORD_STREAM_RELATION`]): `(schema.table, offset, column → type)`.
pub async fn stream_relations(
    client: &Client,
    node: &str,
) -> Result<Vec<(String, i64, HashMap<String, String>)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT table_name, stream_offset, column_types::text FROM pgferry.stream_relations \
              WHERE source_node = $1",
            &[&node],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| {
            let table: String = row.get(0);
            let types: String = row.get(2);
            // Only pgferry writes it; edited by hand into another shape, the table's values
            // are not converted until its stream describes it again.
            let types = serde_json::from_str(&types).unwrap_or_else(|e| {
                tracing::warn!(table = %table, node, error = %e,
                    "pgferry.stream_relations holds no object of column types for this table; \
                     ignored until the stream describes the table again");
                HashMap::new()
            });
            (table, row.get(1), types)
        })
        .collect())
}

/// The tables `node`'s stream has announced. A worker that resumes (`resuming`) with none
/// recorded was applying before pgferry kept the list, and the announcements it would need
/// lie behind its position: the list is then seeded once from the target's own tables
/// outside the protected schemas, which that worker has been applying to.
pub async fn stream_tables(
    client: &Client,
    node: &str,
    resuming: bool,
) -> Result<std::collections::HashSet<String>, tokio_postgres::Error> {
    let read = || async {
        client
            .query(
                "SELECT table_name FROM pgferry.stream_tables WHERE source_node = $1",
                &[&node],
            )
            .await
            .map(|rows| rows.iter().map(|r| r.get::<_, String>(0)).collect())
    };
    let tables: std::collections::HashSet<String> = read().await?;
    if !tables.is_empty() || !resuming {
        return Ok(tables);
    }
    let seeded = client
        .execute(
            &format!(
                "INSERT INTO pgferry.stream_tables (source_node, table_name)
                 SELECT $1, n.nspname || '.' || c.relname
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.relkind IN ('r', 'p') AND {}
                 ON CONFLICT DO NOTHING",
                super::admit::USER_SCHEMA_SQL
            ),
            &[&node],
        )
        .await?;
    tracing::info!(
        node,
        tables = seeded,
        "no announced tables recorded for a resuming stream: seeded from the target's tables"
    );
    read().await
}

/// The stored progress for a source node, if any.
pub async fn read_progress(
    client: &Client,
    node: &str,
) -> Result<Option<Progress>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT next_offset, commit_lsn::text FROM pgferry.apply_progress WHERE source_node = $1",
            &[&node],
        )
        .await?;
    Ok(row.map(|r| Progress {
        next_offset: r.get(0),
        commit_lsn: r.get::<_, String>(1).parse().unwrap_or_default(),
    }))
}

/// A seed of the target from a source node (`pgferry seed`, [`crate::apply::seed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    /// The tables it copies.
    pub tables: Vec<String>,
    /// `None` while copying (or after a seed that died); the snapshot's consistent point once
    /// done: the node's transactions committed before it are in the copy.
    pub consistent: Option<Lsn>,
}

/// The target's seed from `node`, if one was made or started.
pub async fn read_seed(client: &Client, node: &str) -> Result<Option<Seed>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT tables, CASE WHEN state = 'done' THEN consistent_lsn::text END
               FROM pgferry.seeds WHERE source_node = $1",
            &[&node],
        )
        .await?;
    Ok(row.map(|r| Seed {
        tables: r.get(0),
        consistent: r.get::<_, Option<String>>(1).and_then(|l| l.parse().ok()),
    }))
}

/// Records a seed as started (committed before its first row); parameters: node, tables.
pub const START_SEED: &str = "INSERT INTO pgferry.seeds (source_node, state, tables)
     VALUES ($1::text, 'copying', $2::text[])
     ON CONFLICT (source_node) DO UPDATE
        SET state = 'copying', tables = EXCLUDED.tables, consistent_lsn = NULL,
            started_at = now(), finished_at = NULL";

/// Records a seed as done, in the transaction of the worker's starting position; parameters:
/// node, consistent point.
pub const FINISH_SEED: &str = "UPDATE pgferry.seeds
        SET state = 'done', consistent_lsn = $2::text::pg_lsn, finished_at = now()
      WHERE source_node = $1::text";

/// The commit LSN applied from each source node, as committed in the target.
pub async fn applied_lsns(
    client: &Client,
) -> Result<std::collections::BTreeMap<String, Lsn>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT source_node, commit_lsn::text FROM pgferry.apply_progress",
            &[],
        )
        .await?;
    // pg_lsn's text form always parses.
    Ok(rows
        .iter()
        .filter_map(|r| Some((r.get(0), r.get::<_, String>(1).parse().ok()?)))
        .collect())
}

/// Records a dead letter in the target (in the open transaction, so it commits with the
/// progress that skips the change). Parameters: node, stage, table, topic, offset, lsn, error,
/// payload, item, item_row. A replay of the same item (after a crash before commit) records
/// nothing new.
pub const RECORD_DEAD_LETTER: &str = "INSERT INTO pgferry.dead_letters
        (source_node, stage, table_name, topic, kafka_offset, lsn, error, payload, item, item_row)
     VALUES ($1::text, $2::text, $3::text, $4::text, $5::text::bigint, $6::text, $7::text, $8::text,
             $9::text::int, $10::text::int)
     ON CONFLICT (source_node, topic, kafka_offset, item, item_row) DO NOTHING
     RETURNING id";

/// Tables with unresolved dead letters from `node`: the target misses changes to them.
pub async fn diverged_tables(
    client: &Client,
    node: &str,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT DISTINCT coalesce(table_name, '(unknown table)') FROM pgferry.dead_letters
              WHERE source_node = $1 AND resolved_at IS NULL ORDER BY 1",
            &[&node],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Statement that stamps the transaction with the source commit (origin LSN and timestamp).
pub const ORIGIN_XACT_SETUP: &str =
    "SELECT pg_replication_origin_xact_setup($1::text::pg_lsn, $2::text::timestamptz)";

/// Statement that records progress; parameters: node, next offset, commit LSN.
pub const RECORD_PROGRESS: &str = "INSERT INTO pgferry.apply_progress (source_node, next_offset, commit_lsn)
     VALUES ($1::text, $2::text::bigint, $3::text::pg_lsn)
     ON CONFLICT (source_node) DO UPDATE
        SET next_offset = EXCLUDED.next_offset, commit_lsn = EXCLUDED.commit_lsn, applied_at = now()";

/// A target table's columns and primary key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetTable {
    /// Column names.
    pub columns: Vec<String>,
    /// The key the table's changes are applied by: its replica identity index's columns
    /// where it has one (`REPLICA IDENTITY USING INDEX`), else its primary key's (empty when
    /// it has neither).
    pub key: Vec<String>,
    /// Primary-key columns (empty when the table has none): what schema changes compare.
    pub primary_key: Vec<String>,
    /// Column types as `format_type` prints them, by column.
    pub types: Vec<String>,
    /// How the target orders each column's values ([`crate::sql::COLUMN_ORDER`]), by column.
    pub orders: Vec<Option<String>>,
    /// A partitioned table (its rows are in its partitions).
    pub partitioned: bool,
    /// Unique indexes other than the key's (plain columns, no predicate): their columns.
    pub uniques: Vec<Vec<String>>,
    /// Columns outside the key that are `GENERATED ALWAYS AS IDENTITY`. Inserts write them
    /// (`OVERRIDING SYSTEM VALUE`), but PostgreSQL lets an UPDATE set them only to DEFAULT, so
    /// updates leave them out ([`crate::apply::sql::Typed::fixed`]) and they keep the value
    /// their row was inserted with; `pgferry check` and the applier's log name them.
    pub always_identity: Vec<String>,
    /// Generated columns (stored, or PostgreSQL 18's virtual): computed by the target, never
    /// written.
    pub generated: Vec<String>,
    /// Each column's generation expression as `pg_get_expr` prints it (`None`: a plain
    /// column), by column: a schema change that sets the one it has is not run again.
    pub expressions: Vec<Option<String>>,
    /// Columns added by ALTER TABLE with the value the table's existing rows got
    /// (`pgferry.added_columns`, kept by DDL capture; `None` is NULL): multi-master writes it
    /// into such a column a remote row does not carry, rather than the column's DEFAULT of the
    /// day (see `apply::worker::lww_rows::not_carried`).
    pub added: Vec<(String, Option<String>)>,
    /// Whether every key column's values have one spelling each ([`ONE_SPELLING`]): two
    /// keys of different text are then different keys, so their changes commute and may be
    /// gathered into set batches. Otherwise (`numeric`, where `1.0 = 1.00`; `float8`, where
    /// `-0 = 0`; text under a nondeterministic collation; types not known to be so) two
    /// equal keys could look like two, and a batch that reordered their changes (an upsert
    /// of `1.00` before the delete of `1`) lost the row: such tables' changes are written one
    /// by one, in stream order.
    pub key_spelled_once: bool,
    /// The table's shape when described ([`crate::apply::multimaster::TABLE_SHAPE`]): every
    /// column added, dropped, renamed or retyped since changes it, which multi-master write
    /// statements check (`pgferry.same_shape`).
    pub shape: String,
}

impl TargetTable {
    /// The type of a column.
    pub fn type_of(&self, column: &str) -> Option<&str> {
        let i = self.columns.iter().position(|c| c == column)?;
        self.types.get(i).map(String::as_str)
    }

    /// How the target orders a column's values (`None`: unknown, or a type that may order
    /// otherwise elsewhere).
    pub fn order_of(&self, column: &str) -> Option<&str> {
        let i = self.columns.iter().position(|c| c == column)?;
        self.orders.get(i)?.as_deref()
    }
}

/// Sets session settings (name, value) for the rest of the open transaction
/// (`set_config(…, true)`); returns each one's value before, to set back.
pub async fn set_settings(
    client: &Client,
    settings: &[(&str, &str)],
) -> Result<Vec<(String, String)>, tokio_postgres::Error> {
    if settings.is_empty() {
        return Ok(Vec::new());
    }
    let (names, values): (Vec<&str>, Vec<&str>) = settings.iter().copied().unzip();
    let before = client
        .query(
            "SELECT name, current_setting(name) FROM unnest($1::text[]) AS s(name)",
            &[&names],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    client
        .execute(
            "SELECT set_config(name, value, true) FROM unnest($1::text[], $2::text[]) AS s(name, value)",
            &[&names, &values],
        )
        .await?;
    Ok(before)
}

/// Whether index `i` of table `c` is the one a target applies the table's changes by: its
/// replica identity index where it has one, else its primary key.
const KEY_INDEX: &str = "CASE WHEN c.relreplident = 'i'
                     AND EXISTS (SELECT 1 FROM pg_index x
                                  WHERE x.indrelid = c.oid AND x.indisreplident)
                THEN i.indisreplident ELSE i.indisprimary END";

/// Whether a column's values have one text spelling each (equal values print alike), as a
/// SQL expression over `pg_attribute a` and `pg_type t`: integers, `uuid`, dates and times,
/// `bool`, `bytea`, network addresses, enums, and character types under a deterministic
/// collation. Not `numeric` (`1.0 = 1.00`), floats (`-0 = 0`), `interval` (`1 day = 24
/// hours`), `citext` or other types not known to be so.
const ONE_SPELLING: &str = "CASE
        WHEN t.typtype = 'e' THEN true
        WHEN a.atttypid = ANY ('{int2,int4,int8,oid,uuid,date,time,timetz,timestamp,timestamptz,\
                                  bool,bytea,name,inet,cidr,macaddr,macaddr8,money}'::regtype[])
            THEN true
        WHEN a.atttypid = ANY ('{text,varchar,bpchar}'::regtype[])
            THEN coalesce((SELECT o.collisdeterministic FROM pg_collation o
                            WHERE o.oid = a.attcollation), true)
        ELSE false END";

/// Describes a target table; `None` when it does not exist.
pub async fn describe(
    client: &Client,
    schema: &str,
    table: &str,
) -> Result<Option<TargetTable>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "SELECT a.attname::text,
                    COALESCE(a.attnum = ANY(i.indkey::int2[]), false),
                    format_type(a.atttypid, a.atttypmod),
                    a.attidentity = 'a',
                    a.attgenerated <> '',
                    {},
                    c.oid,
                    -- DDL capture's record, where there is one and this role may read it.
                    coalesce(has_table_privilege(to_regclass('pgferry.added_columns'), 'SELECT'),
                             false),
                    {},
                    c.relkind = 'p',
                    CASE WHEN a.attgenerated <> '' THEN pg_get_expr(d.adbin, d.adrelid) END,
                    COALESCE(a.attnum = ANY(p.indkey::int2[]), false),
                    {ONE_SPELLING}
               FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
               JOIN pg_type t ON t.oid = a.atttypid
               LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
               -- The key: the replica identity index where the table has one (as the
               -- source keys such a table's changes: a delete carries only its columns),
               -- else the primary key.
               LEFT JOIN pg_index i ON i.indrelid = c.oid AND {KEY_INDEX}
               LEFT JOIN pg_index p ON p.indrelid = c.oid AND p.indisprimary
              WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')
              ORDER BY a.attnum",
                crate::apply::multimaster::TABLE_SHAPE.replace("@REL@", "c.oid"),
                crate::sql::COLUMN_ORDER
            ),
            &[&schema, &table],
        )
        .await?;
    if rows.is_empty() {
        return Ok(None);
    }
    let uniques = client
        .query(
            &format!(
                "SELECT array_agg(a.attname::text ORDER BY k.ord)
               FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_index i ON i.indrelid = c.oid
               CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
               JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
              WHERE n.nspname = $1 AND c.relname = $2 AND i.indisunique
                AND i.indpred IS NULL AND i.indexprs IS NULL
                -- Not the key's index (the replica identity index, else the primary key).
                AND NOT {KEY_INDEX}
              GROUP BY i.indexrelid
              ORDER BY i.indexrelid"
            ),
            &[&schema, &table],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let added = if rows[0].get::<_, bool>(7) {
        let relid: u32 = rows[0].get(6);
        client
            .query(
                "SELECT a.attname::text, ac.value
                   FROM pgferry.added_columns ac
                   JOIN pg_attribute a ON a.attrelid = ac.relid AND a.attnum = ac.attnum
                  WHERE ac.relid = $1 AND NOT a.attisdropped
                  ORDER BY a.attnum",
                &[&relid],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    } else {
        Vec::new()
    };
    Ok(Some(TargetTable {
        uniques,
        added,
        columns: rows.iter().map(|r| r.get(0)).collect(),
        key: rows
            .iter()
            .filter(|r| r.get::<_, bool>(1))
            .map(|r| r.get(0))
            .collect(),
        primary_key: rows
            .iter()
            .filter(|r| r.get::<_, bool>(11))
            .map(|r| r.get(0))
            .collect(),
        types: rows.iter().map(|r| r.get(2)).collect(),
        orders: rows.iter().map(|r| r.get(8)).collect(),
        partitioned: rows[0].get(9),
        always_identity: rows
            .iter()
            .filter(|r| r.get::<_, bool>(3) && !r.get::<_, bool>(1))
            .map(|r| r.get(0))
            .collect(),
        generated: rows
            .iter()
            .filter(|r| r.get::<_, bool>(4))
            .map(|r| r.get(0))
            .collect(),
        expressions: rows.iter().map(|r| r.get(10)).collect(),
        shape: rows[0].get(5),
        key_spelled_once: rows
            .iter()
            .filter(|r| r.get::<_, bool>(1))
            .all(|r| r.get::<_, bool>(12)),
    }))
}

/// How to render JSON for a parameter of this (server-inferred) type.
pub fn param_kind(ty: &Type) -> PgType {
    if let Some(t) = builtin(ty.oid()) {
        return t;
    }
    match ty.kind() {
        Kind::Array(element) => PgType::Array(Box::new(param_kind(element))),
        Kind::Domain(base) => param_kind(base),
        Kind::Enum(_) => PgType::Enum,
        _ => PgType::Unknown,
    }
}

/// A parameter sent in text format, parsed by the server's input function for the column's
/// type: exact for every type, with no casts in the SQL.
#[derive(Debug, Clone)]
pub struct TextParam(pub Option<String>);

impl ToSql for TextParam {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        match &self.0 {
            None => Ok(IsNull::Yes),
            Some(text) => {
                out.extend_from_slice(text.as_bytes());
                Ok(IsNull::No)
            }
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    fn encode_format(&self, _: &Type) -> Format {
        Format::Text
    }

    to_sql_checked!();
}

/// A rename or drop recorded in `pgferry.ddl_history`, with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnMove {
    /// The new name; `None`: dropped.
    pub to: Option<String>,
    /// The node whose change it was; `None`: made on this database.
    pub origin: Option<String>,
    /// Its commit LSN on that node (for a change made here, the WAL position when it was
    /// made); `None` when an earlier pgferry recorded it.
    pub lsn: Option<Lsn>,
}

/// What became of a table missing here, by `pgferry.ddl_history` (the DDL capture trigger
/// records a user's `DROP TABLE`, `RENAME TO` and `SET SCHEMA`, and those applied from other
/// nodes, under the old name `''`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableFate {
    /// Dropped here (maybe after renames).
    Dropped,
    /// Renamed or moved (maybe more than once): its name now, `(schema, table)`.
    Renamed(String, String),
}

/// The fate of `schema.table`, missing here: followed through its renames (at most 16, so a
/// table renamed back and forth ends), `None` when nothing is recorded or the last name
/// is missing too without a record.
pub async fn table_fate(
    client: &Client,
    qualified: &str,
) -> Result<Option<TableFate>, tokio_postgres::Error> {
    let history: bool = client
        .query_one("SELECT to_regclass('pgferry.ddl_history') IS NOT NULL", &[])
        .await?
        .get(0);
    if !history {
        return Ok(None);
    }
    let mut name = qualified.to_owned();
    let mut fate = None;
    for _ in 0..16 {
        let row = client
            .query_opt(
                "SELECT h.new_name,
                        CASE WHEN n ->> 1 IS NOT NULL
                             THEN to_regclass(format('%I.%I', n ->> 0, n ->> 1)) IS NOT NULL END
                   FROM pgferry.ddl_history h
                   LEFT JOIN LATERAL (SELECT h.new_name::jsonb AS n
                                       WHERE h.new_name LIKE '[%') j ON true
                  WHERE h.table_name = $1 AND h.old_name = ''",
                &[&name],
            )
            .await?;
        let Some(row) = row else {
            return Ok(fate);
        };
        let new_name: Option<String> = row.get(0);
        let Some(new_name) = new_name else {
            return Ok(Some(TableFate::Dropped));
        };
        let Ok((schema, table)) = serde_json::from_str::<(String, String)>(&new_name) else {
            return Ok(fate);
        };
        name = format!("{schema}.{table}");
        let exists: Option<bool> = row.get(1);
        fate = Some(TableFate::Renamed(schema, table));
        if exists == Some(true) {
            return Ok(fate);
        }
    }
    Ok(fate)
}

/// For an `ADD COLUMN` the target already has, with the same type: whether this target's
/// existing rows got another value when it added the column than the change's node's rows
/// did (its DDL capture's record, [`TargetTable::added`], against the change's `existing`
/// value, its constant DEFAULT, or NULL without one). `Some(why)`: they did, so the column
/// was added on two nodes at once with other DEFAULTs, and taking the change as made would
/// leave the nodes' rows apart. `None` when they agree or nothing tells (no record here, a
/// DEFAULT not copied, a type without equality). Values are compared as values of the type,
/// not as text, inside a savepoint of their own.
pub async fn added_otherwise(
    client: &Client,
    table: &TargetTable,
    column: &crate::ddl::DdlColumn,
    existing: Option<&crate::ddl::Existing>,
) -> Result<Option<String>, tokio_postgres::Error> {
    let Some((_, here)) = table.added.iter().find(|(c, _)| *c == column.name) else {
        return Ok(None);
    };
    let ty = &column.type_name;
    let (theirs, value, shown) = match (existing, &column.default) {
        (Some(crate::ddl::Existing::PerRow), _) => return Ok(None),
        (Some(crate::ddl::Existing::Value(v)), _) => (
            format!("($2::text)::{ty}"),
            v.clone(),
            v.clone().unwrap_or_else(|| "NULL".into()),
        ),
        (None, None) => (format!("NULL::{ty}"), None, "NULL".into()),
        (None, Some(expr)) if crate::ddl::is_constant_default(expr) => {
            (format!("({expr})::{ty}"), None, expr.clone())
        }
        (None, Some(_)) => return Ok(None),
    };
    let sql = format!("SELECT ($1::text)::{ty} IS NOT DISTINCT FROM {theirs}");
    client.batch_execute("SAVEPOINT pgferry_added").await?;
    let same = if existing.is_some() {
        client.query_one(&sql, &[here, &value]).await
    } else {
        client.query_one(&sql, &[here]).await
    };
    let same = match same {
        Ok(row) => {
            client
                .batch_execute("RELEASE SAVEPOINT pgferry_added")
                .await?;
            row.get::<_, bool>(0)
        }
        Err(_) => {
            client
                .batch_execute(
                    "ROLLBACK TO SAVEPOINT pgferry_added; RELEASE SAVEPOINT pgferry_added",
                )
                .await?;
            true
        }
    };
    Ok((!same).then(|| {
        format!(
            "column {} exists here, and its existing rows got {} when it was added; this change \
             added it giving them {shown}: the schemas differ (the column added on two nodes at \
             once with other DEFAULTs, or by hand on the target); make them agree by hand",
            column.name,
            here.as_deref().unwrap_or("NULL")
        )
    }))
}

/// Renames and drops of `schema.table`'s columns recorded here, by old name, with their
/// origins (empty when none were recorded).
pub async fn column_moves(
    client: &Client,
    qualified: &str,
) -> Result<HashMap<String, ColumnMove>, tokio_postgres::Error> {
    let with_origin: Option<bool> = client
        .query_one(
            // to_regclass, not a ::regclass literal: a literal is resolved when the query is
            // planned, and fails where the table does not exist (a replica without renames).
            "SELECT CASE WHEN to_regclass('pgferry.ddl_history') IS NOT NULL THEN
                    EXISTS (SELECT 1 FROM pg_attribute
                             WHERE attrelid = to_regclass('pgferry.ddl_history')
                               AND attname = 'origin_lsn' AND NOT attisdropped) END",
            &[],
        )
        .await?
        .get(0);
    let sql = match with_origin {
        None => return Ok(HashMap::new()),
        Some(true) => {
            "SELECT old_name, new_name, origin, origin_lsn::text FROM pgferry.ddl_history
              WHERE table_name = $1"
        }
        Some(false) => {
            "SELECT old_name, new_name, NULL::text, NULL::text FROM pgferry.ddl_history
              WHERE table_name = $1"
        }
    };
    let rows = client.query(sql, &[&qualified]).await?;
    Ok(rows
        .iter()
        .map(|r| {
            let lsn: Option<String> = r.get(3);
            (
                r.get(0),
                ColumnMove {
                    to: r.get(1),
                    origin: r.get(2),
                    lsn: lsn.and_then(|l| l.parse().ok()),
                },
            )
        })
        .collect())
}

/// The column history of `schema.table`: old name → new name (`None`: dropped), empty when
/// none was recorded ([`column_moves`] without the origins).
pub async fn column_history(
    client: &Client,
    qualified: &str,
) -> Result<HashMap<String, Option<String>>, tokio_postgres::Error> {
    Ok(renames(&column_moves(client, qualified).await?))
}

/// The old name → new name map of `moves`, as [`follow`] walks it.
pub fn renames(moves: &HashMap<String, ColumnMove>) -> HashMap<String, Option<String>> {
    moves
        .iter()
        .map(|(old, m)| (old.clone(), m.to.clone()))
        .collect()
}

/// Where `column` went: `Some(Some(name))` renamed (following chains), `Some(None)` dropped,
/// `None` unknown.
pub fn follow(history: &HashMap<String, Option<String>>, column: &str) -> Option<Option<String>> {
    let mut at = history.get(column)?.clone();
    for _ in 0..history.len() {
        match at.as_deref().and_then(|name| history.get(name)) {
            Some(next) => at = next.clone(),
            None => break,
        }
    }
    Some(at)
}

/// Records a rename or drop applied to `schema.table` on this target: the change of node
/// `origin` committed at `origin_lsn` there.
pub async fn record_column_history(
    client: &Client,
    qualified: &str,
    (old_name, new_name): (&str, Option<&str>),
    (origin, origin_lsn): (&str, Lsn),
) -> Result<(), tokio_postgres::Error> {
    client.batch_execute(&crate::ddl::ddl_history_sql()).await?;
    client
        .execute(
            "INSERT INTO pgferry.ddl_history (table_name, old_name, new_name, origin, origin_lsn)
             VALUES ($1, $2, $3, $4, $5::text::pg_lsn)
             ON CONFLICT (table_name, old_name) DO UPDATE SET new_name = EXCLUDED.new_name,
                at = now(), origin = EXCLUDED.origin, origin_lsn = EXCLUDED.origin_lsn",
            &[
                &qualified,
                &old_name,
                &new_name,
                &origin,
                &origin_lsn.to_string(),
            ],
        )
        .await
        .map(drop)
}

#[cfg(test)]
mod history_tests {
    use super::*;

    #[test]
    fn renames_are_followed_to_the_end_and_drops_end_them() {
        let h: HashMap<String, Option<String>> = [
            ("a".to_owned(), Some("b".to_owned())),
            ("b".to_owned(), Some("c".to_owned())),
            ("x".to_owned(), None),
            ("p".to_owned(), Some("q".to_owned())),
            ("q".to_owned(), None),
        ]
        .into();
        assert_eq!(follow(&h, "a"), Some(Some("c".to_owned())));
        assert_eq!(follow(&h, "x"), Some(None));
        assert_eq!(follow(&h, "p"), Some(None));
        assert_eq!(follow(&h, "zz"), None);
        // A cycle (renamed back and forth) ends.
        let cycle: HashMap<String, Option<String>> = [
            ("a".to_owned(), Some("b".to_owned())),
            ("b".to_owned(), Some("a".to_owned())),
        ]
        .into();
        assert!(follow(&cycle, "a").is_some());
    }
}

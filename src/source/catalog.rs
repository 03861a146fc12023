//! Regular SQL against the source: publication and slot bookkeeping, snapshot state, type
//! resolution, heartbeats and lag. Every statement binds values as parameters.
//!
//! pgferry keeps one small table of its own, `pgferry.snapshot_state`, recording which slot has
//! a completed initial snapshot. It is not a second record of streaming progress (the slot's
//! `confirmed_flush_lsn` is the only one); it only answers "did the snapshot for this slot
//! finish?" after a crash.

use std::collections::HashMap;

use tokio_postgres::Client;

use crate::lsn::Lsn;
use crate::sql::{qualified, quote_ident};
use crate::value::{builtin, PgType, TypeRegistry};

/// Slot facts from `pg_replication_slots`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotInfo {
    /// Output plugin.
    pub plugin: Option<String>,
    /// Database the slot decodes.
    pub database: Option<String>,
    /// Whether a walsender holds it.
    pub active: bool,
    /// What the server will resume from.
    pub confirmed_flush: Option<Lsn>,
    /// Why the server invalidated the slot (`wal_removed`, `rows_removed`, …); `None` while it
    /// is usable.
    pub invalidation: Option<String>,
    /// Whether it is a failover slot (`None` before PostgreSQL 17).
    pub failover: Option<bool>,
}

/// Creates the publication when missing: FOR ALL TABLES, or FOR TABLE the configured list.
pub async fn ensure_publication(
    client: &Client,
    name: &str,
    tables: &[String],
) -> Result<bool, tokio_postgres::Error> {
    let exists = client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
        .await?
        .is_some();
    if exists {
        return Ok(false);
    }
    let target = if tables.is_empty() {
        "ALL TABLES".to_owned()
    } else {
        let list: Vec<String> = tables
            .iter()
            .filter_map(|t| t.split_once('.'))
            .map(|(s, t)| qualified(s, t))
            .collect();
        format!("TABLE {}", list.join(", "))
    };
    client
        .batch_execute(&format!(
            "CREATE PUBLICATION {} FOR {target}",
            quote_ident(name)
        ))
        .await?;
    Ok(true)
}

/// Creates pgferry's bookkeeping schema and table when missing.
pub async fn ensure_internal_schema(client: &Client) -> Result<(), tokio_postgres::Error> {
    // Columns added by later versions (only when missing, as ALTER needs ownership): chunks of
    // a re-snapshot carry their key range, which targets prune; what the part's key bounds
    // were planned by (see chunk::Target::key_signature); the table's oid, so that a record
    // follows its table's renames (chunk::follow_publication).
    let progress_columns = crate::sql::add_missing_columns(
        "pgferry.snapshot_progress",
        &[
            ("prune", "boolean NOT NULL DEFAULT false"),
            ("key_signature", "text"),
            ("table_oid", "oid"),
        ],
    );
    // A request made by capture names its table's oid too, so that a rename between the
    // request and the snapshot does not lose it.
    let request_columns =
        crate::sql::add_missing_columns("pgferry.snapshot_requests", &[("table_oid", "oid")]);
    client
        .batch_execute(&format!(
            "BEGIN;
             -- Apply workers may create the schema at the same moment.
             SELECT pg_advisory_xact_lock(hashtext('pgferry.bookkeeping'));
             -- Only when missing: CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when
             -- the schema exists (an administrator creates it for a least-privilege role).
             DO $$ BEGIN IF to_regnamespace('pgferry') IS NULL THEN CREATE SCHEMA pgferry; END IF; END $$;
             CREATE TABLE IF NOT EXISTS pgferry.snapshot_state (
                 slot_name text PRIMARY KEY,
                 consistent_lsn pg_lsn NOT NULL,
                 completed_at timestamptz NOT NULL DEFAULT now());
             CREATE SEQUENCE IF NOT EXISTS pgferry.capture_run;
             -- Snapshot progress: one row per key range (part) of a table, updated after Kafka
             -- acknowledged each chunk; a restart resumes after last_key.
             CREATE TABLE IF NOT EXISTS pgferry.snapshot_progress (
                 slot_name text NOT NULL,
                 table_schema text NOT NULL,
                 table_name text NOT NULL,
                 part int NOT NULL,
                 lower_key text[],
                 upper_key text[],
                 last_key text[],
                 keyed boolean NOT NULL,
                 rows_done bigint NOT NULL DEFAULT 0,
                 rows_estimated bigint NOT NULL DEFAULT 0,
                 chunks bigint NOT NULL DEFAULT 0,
                 done boolean NOT NULL DEFAULT false,
                 started_at timestamptz NOT NULL DEFAULT now(),
                 updated_at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (slot_name, table_schema, table_name, part));
             {progress_columns}
             -- Snapshot requests: `pgferry snapshot --table`, or an INSERT from SQL.
             CREATE TABLE IF NOT EXISTS pgferry.snapshot_requests (
                 id bigserial PRIMARY KEY,
                 table_name text NOT NULL,
                 requested_at timestamptz NOT NULL DEFAULT now());
             {request_columns}
             COMMIT",
        ))
        .await
}

/// A new capture run id, strictly greater than every earlier one for this database (a
/// sequence: durable, and immune to clock changes). Node-stream records carry it, so that an
/// applier can tell a dead run's late records from the current run's.
pub async fn next_capture_run(client: &Client) -> Result<u64, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT nextval('pgferry.capture_run')", &[])
        .await?;
    Ok(row.get::<_, i64>(0).unsigned_abs())
}

/// `server_version_num` (e.g. 170002), to choose version-specific catalog columns and
/// replication options.
pub async fn server_version_num(client: &Client) -> Result<i32, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await?;
    Ok(row.get(0))
}

/// `pg_replication_slots` columns for [`slot`] on a server of this version: plugin, database,
/// active, confirmed_flush_lsn, the invalidation reason and (17+) failover.
fn slot_query(server_version_num: i32) -> &'static str {
    // 15 reports lost WAL only as wal_status; 16 adds `conflicting` (invalidated by a recovery
    // conflict on a standby); 17 names every cause in `invalidation_reason`.
    if server_version_num >= 170_000 {
        "SELECT plugin::text, database::text, active, confirmed_flush_lsn::text,
                COALESCE(invalidation_reason, CASE WHEN wal_status = 'lost' THEN 'wal_removed' END),
                failover
           FROM pg_replication_slots WHERE slot_name = $1"
    } else if server_version_num >= 160_000 {
        "SELECT plugin::text, database::text, active, confirmed_flush_lsn::text,
                CASE WHEN conflicting THEN 'conflict with recovery'
                     WHEN wal_status = 'lost' THEN 'wal_removed' END,
                NULL::bool
           FROM pg_replication_slots WHERE slot_name = $1"
    } else {
        "SELECT plugin::text, database::text, active, confirmed_flush_lsn::text,
                CASE WHEN wal_status = 'lost' THEN 'wal_removed' END,
                NULL::bool
           FROM pg_replication_slots WHERE slot_name = $1"
    }
}

/// The slot, if it exists.
pub async fn slot(
    client: &Client,
    server_version_num: i32,
    slot: &str,
) -> Result<Option<SlotInfo>, tokio_postgres::Error> {
    let row = client
        .query_opt(slot_query(server_version_num), &[&slot])
        .await?;
    Ok(row.map(|r| SlotInfo {
        plugin: r.get(0),
        database: r.get(1),
        active: r.get(2),
        confirmed_flush: r.get::<_, Option<String>>(3).and_then(|s| s.parse().ok()),
        invalidation: r.get(4),
        failover: r.get(5),
    }))
}

/// The consistent point recorded when the initial snapshot for this slot finished and was
/// durable in Kafka; `None` when it never finished (or the slot is new).
pub async fn snapshot_completed(
    client: &Client,
    slot: &str,
) -> Result<Option<Lsn>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT consistent_lsn::text FROM pgferry.snapshot_state WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    // The column is pg_lsn, whose text always parses; a record is never read as absent.
    Ok(row.map(|r| r.get::<_, String>(0).parse().unwrap_or_default()))
}

/// Records a finished snapshot.
pub async fn mark_snapshot_completed(
    client: &Client,
    slot: &str,
    consistent_point: Lsn,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO pgferry.snapshot_state (slot_name, consistent_lsn) VALUES ($1, $2::text::pg_lsn)
             ON CONFLICT (slot_name) DO UPDATE SET consistent_lsn = EXCLUDED.consistent_lsn,
                                                   completed_at = now()",
            &[&slot, &consistent_point.to_string()],
        )
        .await
        .map(drop)
}

/// Forgets any snapshot record and chunk progress for this slot (before creating the slot
/// anew). Returns whether there was any: the slot existed before (it was lost, or its
/// exported snapshot never finished), so its targets may hold rows.
pub async fn clear_snapshot_state(
    client: &Client,
    slot: &str,
) -> Result<bool, tokio_postgres::Error> {
    let state = client
        .execute(
            "DELETE FROM pgferry.snapshot_state WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    let progress = client
        .execute(
            "DELETE FROM pgferry.snapshot_progress WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(state + progress > 0)
}

/// Drops a slot (whose snapshot never completed, or that was invalidated).
pub async fn drop_slot(client: &Client, slot: &str) -> Result<(), tokio_postgres::Error> {
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .map(drop)
}

/// Primary-key column names of a table, in key order (empty when it has none).
pub async fn primary_key_columns(
    client: &Client,
    relation_oid: u32,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT a.attname::text
               FROM pg_index i
               CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
              WHERE i.indrelid = $1 AND i.indisprimary
              ORDER BY k.ord",
            &[&relation_oid],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Column types as SQL (`format_type`) and NOT NULL flags, by column name, for the columns
/// of a relation message: each type as the message gives it (the WAL's, which the rows were
/// written under: the table may have another type by now, changed by a later command or
/// by a multi-master node's apply), else today's catalog's, else `text`; NOT NULL as the
/// catalog says now.
pub async fn column_types(
    client: &Client,
    relation_oid: u32,
    columns: &[crate::source::pgoutput::Column],
) -> Result<HashMap<String, (String, bool)>, tokio_postgres::Error> {
    let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
    let oids: Vec<u32> = columns.iter().map(|c| c.type_oid).collect();
    let mods: Vec<i32> = columns.iter().map(|c| c.type_modifier).collect();
    let rows = client
        .query(
            "SELECT c.name,
                    coalesce(CASE WHEN EXISTS (SELECT 1 FROM pg_type t WHERE t.oid = c.typ)
                                  THEN format_type(c.typ, c.mod) END,
                             format_type(a.atttypid, a.atttypmod), 'text'),
                    coalesce(a.attnotnull, false)
               FROM unnest($2::text[], $3::oid[], $4::int4[]) AS c(name, typ, mod)
               LEFT JOIN pg_attribute a ON a.attrelid = $1 AND a.attname = c.name
                                       AND a.attnum > 0 AND NOT a.attisdropped",
            &[&relation_oid, &names, &oids, &mods],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect())
}

/// Whether the publication is `FOR ALL TABLES`.
pub async fn publishes_all_tables(
    client: &Client,
    publication: &str,
) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT puballtables FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await?;
    Ok(row.is_some_and(|r| r.get(0)))
}

/// Whether the publication covers a table a schema change is about, or a table of its
/// partition tree (its partitions, its ancestors), or `also` or its partitions (`also`: the
/// parent a partition was detached from): a `FOR ALL TABLES` publication every permanent
/// table, a `FOR TABLE` one the tables it lists, a `FOR TABLES IN SCHEMA` one the tables of
/// its schemas. A schema change of any of these matters to the publication's targets.
///
/// Each table is found by its oid when the trigger's message has one (`relid`), else by its
/// name: capture decodes a change after its commit, maybe long after, when the table may
/// have a new name, a new schema, or be gone. By name, a table created or altered and then
/// renamed before capture decoded the change was taken for a table outside the publication.
/// Membership is read from the publication's own catalogs, not `pg_publication_tables`,
/// which lists a partitioned table's leaves only (none for a partitioned table without
/// partitions yet, whose creation was then not published). A table gone since is covered by
/// a `FOR ALL TABLES` publication (its drop follows). Ask only once the change's transaction
/// is visible here ([`sees_transaction`]). With `unlogged_too`, a `FOR ALL TABLES` publication
/// covers unlogged tables too (whether it would publish the table were it logged).
pub async fn publishes_table_tree(
    client: &Client,
    publication: &str,
    table: (Option<u32>, &str, &str),
    also: Option<(Option<u32>, &str, &str)>,
    unlogged_too: bool,
) -> Result<bool, tokio_postgres::Error> {
    let oid = |relid: Option<u32>| relid.map(i64::from);
    let (relid, name) = (oid(table.0), qualified(table.1, table.2));
    let also_relid = also.and_then(|a| oid(a.0));
    let also_name = also.map(|(_, s, t)| qualified(s, t));
    let row = client
        .query_one(
            "WITH rel AS (SELECT coalesce($2::int8::oid, to_regclass($3)::oid) AS oid),
                  also AS (SELECT coalesce($4::int8::oid, to_regclass($5)::oid) AS oid),
                  tree AS (SELECT oid FROM rel
                           UNION SELECT t.relid FROM rel, pg_partition_tree(rel.oid::regclass) t
                           UNION SELECT a.relid FROM rel, pg_partition_ancestors(rel.oid::regclass) a
                           UNION SELECT oid FROM also
                           UNION SELECT t.relid FROM also, pg_partition_tree(also.oid::regclass) t)
             SELECT EXISTS (
                 SELECT 1 FROM pg_publication p
                  WHERE p.pubname = $1
                    AND ((p.puballtables
                          AND NOT EXISTS (SELECT 1 FROM rel JOIN pg_class c ON c.oid = rel.oid
                                           WHERE c.relpersistence = 't'
                                              OR (c.relpersistence = 'u' AND NOT $6)))
                         OR EXISTS (SELECT 1 FROM tree
                                      JOIN pg_publication_rel r ON r.prrelid = tree.oid
                                     WHERE r.prpubid = p.oid)
                         OR EXISTS (SELECT 1 FROM tree
                                      JOIN pg_class c ON c.oid = tree.oid
                                      JOIN pg_publication_namespace n ON n.pnnspid = c.relnamespace
                                     WHERE n.pnpubid = p.oid)))",
            &[&publication, &relid, &name, &also_relid, &also_name, &unlogged_too],
        )
        .await?;
    Ok(row.get(0))
}

/// Whether this session sees transaction `xid` (as pgoutput reports it, 32 bits) as finished.
/// The walsender may decode a commit a moment before the committing backend has made it
/// visible to other sessions; catalog lookups about that transaction wait for this. The
/// 64-bit id takes the epoch of the current snapshot's xmax (the previous one for an xid
/// above xmax's low half, which must have come before the wrap).
pub async fn sees_transaction(client: &Client, xid: u32) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT pg_visible_in_snapshot(
                        ((GREATEST(0, (m.x >> 32)
                                      - CASE WHEN $1::int8 > (m.x & 4294967295) THEN 1 ELSE 0 END)
                          << 32) | $1::int8)::text::xid8,
                        s.snap)
               FROM (SELECT pg_current_snapshot() AS snap) s,
                    LATERAL (SELECT pg_snapshot_xmax(s.snap)::text::int8 AS x) m",
            &[&i64::from(xid)],
        )
        .await?;
    Ok(row.get(0))
}

/// Whether transaction `xid` created table `oid`: the xmin of the table's `ctid` attribute
/// row, which no later command rewrites (an ALTER TABLE rewrites the table's `pg_class` row
/// and the rows of the columns it changes, not those of system columns). Call once the
/// transaction is visible ([`sees_transaction`]).
pub async fn created_by(
    client: &Client,
    oid: u32,
    xid: u32,
) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT xmin::text::int8 FROM pg_attribute WHERE attrelid = $1 AND attnum = -1",
            &[&oid],
        )
        .await?;
    Ok(row.is_some_and(|r| r.get::<_, i64>(0) == i64::from(xid)))
}

/// Tables in the publication, excluding pgferry's own schema.
pub async fn published_tables(
    client: &Client,
    publication: &str,
) -> Result<Vec<(String, String)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables
              WHERE pubname = $1 AND schemaname <> 'pgferry' ORDER BY 1, 2",
            &[&publication],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Writes a non-transactional logical message. It produces WAL in *this* database, so the
/// slot has something to confirm even when the database is idle while others are busy.
pub async fn emit_heartbeat(client: &Client) -> Result<Lsn, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT pg_logical_emit_message(false, $1, '')::text",
            &[&crate::source::assemble::HEARTBEAT_PREFIX],
        )
        .await?;
    Ok(row.get::<_, String>(0).parse().unwrap_or_default())
}

/// Where a slot stands against the server's WAL, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotLag {
    /// Insert position minus confirmed_flush_lsn.
    pub lag: i64,
    /// Insert position minus restart_lsn: WAL the slot keeps.
    pub retained: i64,
    /// WAL that can still be written before the slot loses WAL it needs
    /// (`max_slot_wal_keep_size`); `None` when unlimited.
    pub safe: Option<i64>,
}

/// The slot's [`SlotLag`], if the slot exists.
pub async fn slot_lag(
    client: &Client,
    slot: &str,
) -> Result<Option<SlotLag>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::int8,
                    (pg_current_wal_lsn() - restart_lsn)::int8,
                    safe_wal_size
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.and_then(|r| {
        Some(SlotLag {
            lag: r.get::<_, Option<i64>>(0)?,
            retained: r.get::<_, Option<i64>>(1)?,
            safe: r.get(2),
        })
    }))
}

struct CatalogType {
    typtype: i8,
    category: i8,
    element: u32,
    base: u32,
}

fn classify(oid: u32, rows: &HashMap<u32, CatalogType>, depth: u8) -> PgType {
    if let Some(t) = builtin(oid) {
        return t;
    }
    let Some(row) = rows.get(&oid) else {
        return PgType::Unknown;
    };
    if depth > 8 {
        return PgType::Unknown;
    }
    match (row.typtype as u8, row.category as u8) {
        (b'e', _) => PgType::Enum,
        (b'd', _) => classify(row.base, rows, depth + 1),
        (_, b'A') if row.element != 0 => {
            PgType::Array(Box::new(classify(row.element, rows, depth + 1)))
        }
        _ => PgType::Unknown,
    }
}

/// Looks up every type OID the registry does not know yet (enums, domains, arrays of them),
/// following element and base types.
pub async fn resolve_types(
    client: &Client,
    registry: &mut TypeRegistry,
    oids: impl IntoIterator<Item = u32>,
) -> Result<(), tokio_postgres::Error> {
    let mut wanted: Vec<u32> = oids.into_iter().filter(|o| !registry.knows(*o)).collect();
    let top: Vec<u32> = wanted.clone();
    let mut rows: HashMap<u32, CatalogType> = HashMap::new();
    for _ in 0..8 {
        wanted.retain(|o| builtin(*o).is_none() && !rows.contains_key(o));
        if wanted.is_empty() {
            break;
        }
        let found = client
            .query(
                "SELECT oid, typtype, typcategory, typelem, typbasetype FROM pg_type WHERE oid = ANY($1)",
                &[&wanted],
            )
            .await?;
        wanted.clear();
        for r in found {
            let t = CatalogType {
                typtype: r.get(1),
                category: r.get(2),
                element: r.get(3),
                base: r.get(4),
            };
            wanted.extend([t.element, t.base].into_iter().filter(|o| *o != 0));
            rows.insert(r.get(0), t);
        }
    }
    for oid in top {
        registry.register(oid, classify(oid, &rows, 0));
    }
    Ok(())
}

/// Prefix of the transactional messages pgferry's event trigger writes for schema changes.
pub use crate::source::assemble::DDL_PREFIX;

/// Installs DDL capture (see [`crate::ddl::capture_sql`]). Event triggers need a superuser:
/// without one this returns the server's refusal, and capture goes on without replicating DDL
/// unless an administrator installed it (see [`ddl_capture_installed`]).
pub async fn ensure_ddl_capture(client: &Client) -> Result<(), tokio_postgres::Error> {
    let result = client.batch_execute(&crate::ddl::capture_sql()).await;
    if result.is_err() {
        let _ = client.batch_execute("ROLLBACK").await;
    }
    result
}

/// Whether pgferry's DDL capture triggers are installed and enabled (by this pgferry or, for a
/// role that may not create event triggers, by an administrator running `pgferry roles`).
pub async fn ddl_capture_installed(client: &Client) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT count(*) = 2 FROM pg_event_trigger
              WHERE evtname IN ('pgferry_ddl', 'pgferry_drop') AND evtenabled = 'A'",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

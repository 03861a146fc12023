//! Multi-master bookkeeping in a node's own database: the tombstone and conflict tables, the
//! delete trigger that records local tombstones, the origin → node map, the database clock
//! for the skew rule, and the expiry of old tombstones and conflict rows. I/O only; the
//! decisions are in [`super::conflict`], the statement text in [`super::sql`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::ApplyError;
use crate::config::{ConflictConfig, TargetConfig};
use crate::telemetry::Metrics;

use crate::sql::{qualified, quote_literal};

/// Tables shared by every multi-master node. Idempotent.
const BOOKKEEPING_DDL: &str = r#"
CREATE SCHEMA IF NOT EXISTS pgferry;
CREATE TABLE IF NOT EXISTS pgferry.tombstones (
    table_name text NOT NULL,
    key jsonb NOT NULL,
    xid xid8 NOT NULL,
    commit_ts timestamptz,
    roident oid,
    PRIMARY KEY (table_name, key));
CREATE INDEX IF NOT EXISTS tombstones_commit_ts ON pgferry.tombstones (commit_ts);
CREATE TABLE IF NOT EXISTS pgferry.conflicts (
    id bigserial PRIMARY KEY,
    detected_at timestamptz NOT NULL DEFAULT now(),
    table_name text NOT NULL,
    key jsonb NOT NULL,
    conflict_type text NOT NULL,
    resolution text NOT NULL,
    local_commit_ts timestamptz,
    local_node text,
    local_row jsonb,
    remote_commit_ts timestamptz NOT NULL,
    remote_node text NOT NULL,
    remote_row jsonb);
CREATE INDEX IF NOT EXISTS conflicts_detected_at ON pgferry.conflicts (detected_at);
"#;

/// The delete trigger function; replacing it takes no lock on user tables.
const TRIGGER_FUNCTION: &str = r#"
CREATE OR REPLACE FUNCTION pgferry.record_tombstone() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET timezone = 'UTC' SET datestyle = 'ISO, YMD' SET intervalstyle = 'postgres'
SET extra_float_digits = '1'
AS $fn$
BEGIN
    INSERT INTO pgferry.tombstones AS d (table_name, key, xid)
    VALUES (TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME,
            (SELECT jsonb_object_agg(k, to_jsonb(OLD) -> k) FROM unnest(TG_ARGV) AS k),
            pg_current_xact_id())
    ON CONFLICT (table_name, key) DO UPDATE
       SET xid = EXCLUDED.xid, commit_ts = NULL, roident = NULL;
    RETURN NULL;
END
$fn$;
"#;

/// Session settings that make `to_jsonb` of key values identical in the apply session and
/// in the delete trigger (which sets the same ones).
pub const SESSION_SETTINGS: &str = "SET timezone = 'UTC'; SET datestyle = 'ISO, YMD'; \
     SET intervalstyle = 'postgres'; SET extra_float_digits = 1";

/// Creates the bookkeeping objects, and for every table with a primary key (all user tables,
/// or `only`): sets `REPLICA IDENTITY FULL` (the old-row image tells sequential changes from
/// concurrent ones) and installs the delete trigger. Each step is its own short transaction
/// and is skipped when already done, so that a restart never holds a lock on the tombstone
/// table while waiting for one on a busy user table (which would deadlock with a local
/// delete). Returns the tables prepared, and the tables skipped for lack of a primary key.
pub async fn prepare_node(
    client: &Client,
    only: &[String],
) -> Result<(Vec<String>, Vec<String>), tokio_postgres::Error> {
    let created = client
        .query_one(
            "SELECT to_regclass('pgferry.conflicts_detected_at') IS NOT NULL",
            &[],
        )
        .await?
        .get::<_, bool>(0);
    if !created {
        client
            .batch_execute(&format!(
                "BEGIN; SELECT pg_advisory_xact_lock(hashtext('pgferry.bookkeeping')); \
                 {BOOKKEEPING_DDL}; COMMIT"
            ))
            .await?;
    }
    client
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock(hashtext('pgferry.bookkeeping')); \
             {TRIGGER_FUNCTION}; COMMIT"
        ))
        .await?;
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, c.relreplident::text,
                    (SELECT array_agg(a.attname::text ORDER BY k.ord)
                       FROM pg_index i
                       CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
                       JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
                      WHERE i.indrelid = c.oid AND i.indisprimary),
                    EXISTS (SELECT 1 FROM pg_trigger t
                             WHERE t.tgrelid = c.oid AND t.tgname = 'pgferry_tombstone')
               FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind IN ('r', 'p')
                AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgferry')
                AND n.nspname NOT LIKE 'pg\\_%'
              ORDER BY 1, 2",
            &[],
        )
        .await?;
    let (mut prepared, mut keyless) = (Vec::new(), Vec::new());
    for row in rows {
        let (schema, table): (String, String) = (row.get(0), row.get(1));
        let name = format!("{schema}.{table}");
        if !only.is_empty() && !only.contains(&name) {
            continue;
        }
        let Some(key) = row.get::<_, Option<Vec<String>>>(3) else {
            keyless.push(name);
            continue;
        };
        let t = qualified(&schema, &table);
        if row.get::<_, String>(2) != "f" {
            client
                .batch_execute(&format!("ALTER TABLE {t} REPLICA IDENTITY FULL"))
                .await?;
        }
        if !row.get::<_, bool>(4) {
            let args: Vec<String> = key.iter().map(|k| quote_literal(k)).collect();
            client
                .batch_execute(&format!(
                    "CREATE OR REPLACE TRIGGER pgferry_tombstone AFTER DELETE ON {t} \
                     FOR EACH ROW EXECUTE FUNCTION pgferry.record_tombstone({})",
                    args.join(", ")
                ))
                .await?;
        }
        prepared.push(name);
    }
    Ok((prepared, keyless))
}

/// Registers which node an apply origin stands for, so that row versions can name it.
pub async fn register_origin(
    client: &Client,
    origin: &str,
    node: &str,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO pgferry.origins (roname, node) VALUES ($1, $2)
             ON CONFLICT (roname) DO UPDATE SET node = EXCLUDED.node",
            &[&origin, &node],
        )
        .await
        .map(drop)
}

/// Replication origin id → node id, for every origin pgferry registered in this cluster.
pub async fn origin_nodes(client: &Client) -> Result<HashMap<i64, String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT r.roident::int8, o.node
               FROM pg_replication_origin r JOIN pgferry.origins o ON o.roname = r.roname",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The database's clock (`clock_timestamp()`), µs since the Unix epoch: the clock that will
/// stamp the next local commit.
pub async fn database_clock_us(client: &Client) -> Result<i64, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::int8",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// Fills in the commit time and origin of tombstones whose transactions have ended (so they
/// survive the commit-timestamp data being truncated), then deletes tombstones and conflict
/// rows past retention. Returns (tombstones expired, conflict rows expired).
pub async fn expire(
    client: &Client,
    tombstone_retention: Duration,
    log_retention: Duration,
) -> Result<(u64, u64), tokio_postgres::Error> {
    client
        .batch_execute(
            "SET lock_timeout = '5s';
             UPDATE pgferry.tombstones AS d
                SET (commit_ts, roident) = (
                    SELECT v.timestamp, v.roident
                      FROM pg_xact_commit_timestamp_origin((d.xid::text::int8 % 4294967296)::text::xid) AS v)
              WHERE d.commit_ts IS NULL
                AND d.xid < pg_snapshot_xmin(pg_current_snapshot())",
        )
        .await?;
    let tombstones = delete_older_than(
        client,
        "pgferry.tombstones",
        "commit_ts",
        tombstone_retention,
    )
    .await?;
    let conflicts =
        delete_older_than(client, "pgferry.conflicts", "detected_at", log_retention).await?;
    Ok((tombstones, conflicts))
}

/// Deletes the rows of a bookkeeping table whose `column` is older than `age`.
async fn delete_older_than(
    client: &Client,
    table: &str,
    column: &str,
    age: Duration,
) -> Result<u64, tokio_postgres::Error> {
    let micros = i64::try_from(age.as_micros()).unwrap_or(i64::MAX);
    client
        .execute(
            &format!(
                "DELETE FROM {table} WHERE {column} < now() - $1::int8 * interval '1 microsecond'"
            ),
            &[&micros],
        )
        .await
}

/// Connects to a multi-master node's database and prepares it ([`prepare_node`]).
pub async fn setup(target: &TargetConfig, only: &[String]) -> Result<(), ApplyError> {
    let client = crate::source::catalog::connect(target.url.config(), "pgferry-setup")
        .await
        .map_err(ApplyError::sql("connecting to the multi-master database"))?;
    let (prepared, keyless) = prepare_node(&client, only).await.map_err(ApplyError::sql(
        "preparing multi-master bookkeeping (tombstone trigger, REPLICA IDENTITY FULL)",
    ))?;
    tracing::info!(tables = ?prepared, "multi-master tables prepared");
    if !keyless.is_empty() {
        tracing::warn!(tables = ?keyless,
                       "tables without a primary key cannot be resolved by last-writer-wins; \
                        their changes are dead-lettered. Fix: add a primary key");
    }
    Ok(())
}

/// Expires old tombstones and conflict rows every `maintenance_interval` until shutdown.
pub async fn maintain(
    target: TargetConfig,
    conflict: ConflictConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), ApplyError> {
    let client = crate::source::catalog::connect(target.url.config(), "pgferry-maintenance")
        .await
        .map_err(ApplyError::sql("connecting for multi-master maintenance"))?;
    loop {
        let (tombstones, conflicts) = expire(
            &client,
            conflict.tombstone_retention,
            conflict.log_retention,
        )
        .await
        .map_err(ApplyError::sql("expiring tombstones and conflict rows"))?;
        metrics.tombstones_expired.inc_by(tombstones);
        if tombstones + conflicts > 0 {
            tracing::info!(
                tombstones,
                conflicts,
                "expired multi-master bookkeeping past retention"
            );
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(conflict.maintenance_interval) => {}
        }
    }
}

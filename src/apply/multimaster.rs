//! Multi-master bookkeeping in a node's own database: the version store (`pgferry.versions`,
//! tombstones included) and the trigger that stamps local writes, the protection of tables
//! (also as they are created), the upgrade from commit-timestamp versions, the origin → node
//! map, and maintenance: acknowledgements, collection of acknowledged tombstones, the
//! retention backstop and the conflict log. I/O only; the decisions are in
//! [`super::conflict`], the apply statements in [`super::sql`].

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
-- Only when missing: CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when
-- the schema exists (an administrator creates it for a least-privilege role).
DO $$ BEGIN IF to_regnamespace('pgferry') IS NULL THEN CREATE SCHEMA pgferry; END IF; END $$;
CREATE TABLE IF NOT EXISTS pgferry.origins (
    roname text PRIMARY KEY,
    node text NOT NULL);
CREATE TABLE IF NOT EXISTS pgferry.versions (
    table_name text NOT NULL,
    key text COLLATE "C" NOT NULL,
    t int8 NOT NULL,
    node text COLLATE "C" NOT NULL,
    deleted bool NOT NULL,
    PRIMARY KEY (table_name, key));
-- The key is the text of a jsonb object of the key columns (one canonical text per value),
-- compared bytewise: the first layout stored the jsonb itself, whose comparisons made every
-- version stamp about twice as costly. Converted in place.
DO $$
BEGIN
    IF (SELECT atttypid FROM pg_attribute
         WHERE attrelid = 'pgferry.versions'::regclass AND attname = 'key') = 'jsonb'::regtype THEN
        ALTER TABLE pgferry.versions ALTER COLUMN key TYPE text COLLATE "C" USING key::text;
    END IF;
END
$$;
-- What each other node had applied from each node, by the latest `ack` of its stream that
-- this node applied.
CREATE TABLE IF NOT EXISTS pgferry.peer_acks (
    reporter text NOT NULL,
    source text NOT NULL,
    applied_lsn pg_lsn NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (reporter, source));
-- Above every collected tombstone's version: a key whose tombstone is gone is stamped above
-- it all the same (invariant 2 survives collection).
CREATE TABLE IF NOT EXISTS pgferry.version_floor (
    one bool PRIMARY KEY DEFAULT true CHECK (one),
    t int8 NOT NULL);
INSERT INTO pgferry.version_floor (t) VALUES (-9223372036854775808) ON CONFLICT DO NOTHING;
-- The name each protected table's versions are kept under (`schema.table`, as apply names
-- it): a table renamed or moved to another schema takes its versions along.
CREATE TABLE IF NOT EXISTS pgferry.versioned_tables (
    relid oid PRIMARY KEY,
    table_name text NOT NULL);
-- Nodes whose missing acknowledgements the retention backstop went past: refused.
CREATE TABLE IF NOT EXISTS pgferry.horizon_bypassed (
    node text PRIMARY KEY,
    since timestamptz NOT NULL DEFAULT now(),
    tombstones bigint NOT NULL);
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
DO $$
BEGIN
    IF to_regclass('pgferry.conflicts_detected_at') IS NULL THEN
        CREATE INDEX IF NOT EXISTS conflicts_detected_at ON pgferry.conflicts (detected_at);
    END IF;
END
$$;
"#;

/// The version store's layout, once [`bookkeeping_columns`] are there. Each change only when
/// the catalog says it is missing (see [`crate::sql::add_missing_columns`]): every local write
/// stamps `pgferry.versions`, so a lock request queued behind a long local transaction would
/// hold up every writer of every protected table.
const VERSIONS_LAYOUT: &str = r#"
DO $$
BEGIN
    -- Tombstones only, indexed by a column that live versions leave NULL: a write that moves
    -- a live version (new t, node) changes no indexed column, so it is a HOT update (no index
    -- entries), with room kept on each page for it. (The first layout indexed t, which made
    -- every version move a full update; that index is dropped.)
    DROP INDEX IF EXISTS pgferry.versions_tombstones;
    IF to_regclass('pgferry.versions_tombstones_lsn') IS NULL THEN
        CREATE INDEX IF NOT EXISTS versions_tombstones_lsn ON pgferry.versions (seen_lsn)
            WHERE deleted;
    END IF;
    IF NOT coalesce((SELECT 'fillfactor=80' = ANY (reloptions) FROM pg_class
                      WHERE oid = 'pgferry.versions'::regclass), false) THEN
        ALTER TABLE pgferry.versions SET (fillfactor = 80);
    END IF;
END
$$;
"#;

/// Columns of the bookkeeping tables added by later versions: for tombstones only, the node
/// in whose stream the delete sits and the LSN at or before which (collection by
/// acknowledgement; NULL for live versions and not yet sealed local deletes); how far a
/// reporter's clock was ahead of this node's when its latest ack was applied (µs; less the
/// delivery delay, so a lower bound when positive).
fn bookkeeping_columns() -> String {
    crate::sql::add_missing_columns(
        "pgferry.versions",
        &[("seen_node", "text"), ("seen_lsn", "pg_lsn")],
    ) + &crate::sql::add_missing_columns("pgferry.peer_acks", &[("clock_ahead_us", "int8")])
}

/// Session settings that make `to_jsonb` of key values identical in the apply session, in
/// the version trigger and in [`PROTECT_FUNCTION`] (which set the same ones).
pub const SESSION_SETTINGS: &str = "SET timezone = 'UTC'; SET datestyle = 'ISO, YMD'; \
     SET intervalstyle = 'postgres'; SET extra_float_digits = 1";

/// The same settings as function attributes.
const FUNCTION_SETTINGS: &str = "SET search_path = pg_catalog, pg_temp \
     SET timezone = 'UTC' SET datestyle = 'ISO, YMD' SET intervalstyle = 'postgres' \
     SET extra_float_digits = '1'";

/// The TRUNCATE guard, shared by every table. (Each table's version trigger function is its
/// own, generated by [`PROTECT_FUNCTION`].)
const TRUNCATE_GUARD_FUNCTION: &str = r#"
CREATE OR REPLACE FUNCTION pgferry.refuse_truncate() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    RAISE EXCEPTION 'pgferry multi-master: TRUNCATE of %.% is refused: it would not be replicated with row versions', TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'feature_not_supported',
              HINT = 'Use DELETE; every node then converges on the deletes.';
END
$fn$;
"#;

/// SQLSTATE of [`same_shape_function`]'s error: the statement is prepared again from a new description
/// of the table, like one that names a column renamed or dropped since.
pub const SHAPE_CHANGED: &str = "PF001";

/// A table's shape as a SQL expression of its oid (`@REL@`): a digest of every attribute's
/// number, name, type, modifier and whether it was dropped, so that any column added,
/// dropped, renamed or retyped changes it. Read when a target table is described
/// ([`crate::apply::target::TargetTable::shape`]) and checked by [`same_shape_function`].
pub const TABLE_SHAPE: &str = "(SELECT md5(string_agg(concat_ws(':', s.attnum, s.attname, \
     s.atttypid, s.atttypmod, s.attisdropped), ',' ORDER BY s.attnum)) \
     FROM pg_catalog.pg_attribute s WHERE s.attrelid = @REL@ AND s.attnum > 0)";

/// `pgferry.same_shape(table, shape)`: true when the table still has the [`TABLE_SHAPE`] it
/// was described with, else raises [`SHAPE_CHANGED`]. Run by each multi-master write
/// statement ([`crate::apply::sql::WholeRow`]) after it locked the table (so no schema change
/// commits between the check and the write). It once compared `relnatts` alone, which only
/// an added column changes: after a local `ALTER COLUMN … TYPE`, statements prepared before
/// it went on casting values to the old type (`123` written as `123.000` into a column now
/// `text`), and the node diverged in silence.
pub fn same_shape_function() -> String {
    format!(
        r#"
CREATE OR REPLACE FUNCTION pgferry.same_shape(rel regclass, shape text) RETURNS bool
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF {} IS DISTINCT FROM shape THEN
        RAISE EXCEPTION 'pgferry: % changed (a column added, dropped, renamed or retyped) since its apply statements were prepared', rel
            USING ERRCODE = '{SHAPE_CHANGED}';
    END IF;
    RETURN true;
END
$fn$;
"#,
        TABLE_SHAPE.replace("@REL@", "rel")
    )
}

/// `pgferry.protect(table, node)`: makes one table safe for multi-master, in the caller's
/// transaction. Tables without a primary key are left alone (false). Otherwise: `REPLICA
/// IDENTITY FULL` (changes carry their whole old row), a version row for every existing row
/// that has none (its commit timestamp and origin when still known, else the oldest version),
/// the version trigger and the TRUNCATE refusal. The table is locked against writes while
/// the seeding and the trigger are put in place, so that no row escapes both.
///
/// The version trigger, `zz_pgferry_version` (BEFORE INSERT OR UPDATE OR DELETE, FOR EACH ROW,
/// calling the table's own `pgferry.stamp_<oid>()` with this node's id built in), runs with
/// the row locked (UPDATE, DELETE) or before the key's index entry exists (INSERT), takes the
/// key's version-row lock, and stamps `t = max(clock, t_current + 1, version_floor + 1)`:
/// strictly above whatever the key held, whatever the clock says (invariants 2 and 4 of the
/// design). An INSERT stamps only a key with no live version, so an `INSERT … ON CONFLICT DO
/// NOTHING` that changes nothing moves no version. Its `pgferry.versions` change precedes the
/// row change in the WAL, which is how capture pairs them. Named `zz_…` so that it fires after
/// the table's other BEFORE triggers (which may still cancel the row).
const PROTECT_FUNCTION: &str = r#"
CREATE OR REPLACE FUNCTION pgferry.protect(rel regclass, local_node text) RETURNS bool
LANGUAGE plpgsql @SETTINGS@
AS $fn$
DECLARE
    keys text[];
    q text;
    tbl text;
    key_expr text;
    fname text;
    old_key text;
    new_key text;
    key_moved text;
    was text;
    ts_known bool := current_setting('track_commit_timestamp')::bool;
BEGIN
    IF current_setting('pgferry.protecting', true) = 'on' THEN
        RETURN false;
    END IF;
    -- In the columns' table order: the version key is an array of their values in that
    -- order, as apply builds it from the table's description.
    SELECT array_agg(a.attname::text ORDER BY a.attnum) INTO keys
      FROM pg_index i
      CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = rel AND i.indisprimary;
    SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname), n.nspname || '.' || c.relname
      INTO q, tbl
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = rel AND c.relkind IN ('r', 'p') AND n.nspname <> 'pgferry';
    -- Not yet: nodes would version a partitioned table's rows under one name and publish them
    -- under another, and a partition's own replica identity is not the root's. Refused rather
    -- than left to diverge.
    IF q IS NOT NULL AND EXISTS (SELECT 1 FROM pg_class
                                  WHERE oid = rel AND (relkind = 'p' OR relispartition)) THEN
        RAISE EXCEPTION 'pgferry multi-master: % is a partitioned table or a partition, which multi-master does not support yet (their rows would not converge); leave it out with apply.tables (the tables to keep in step), or replicate it master -> replica', tbl
            USING ERRCODE = 'feature_not_supported';
    END IF;
    IF keys IS NULL OR q IS NULL THEN
        RETURN false;
    END IF;
    PERFORM set_config('pgferry.protecting', 'on', true);
    -- A table renamed or moved to another schema since it was protected (its version trigger
    -- is there: not a new table under a reused oid) takes its versions to its new name, in
    -- the renaming transaction: apply and the version trigger name the table as it is now,
    -- and under the old name every key looked unversioned, so an older remote write won.
    SELECT v.table_name INTO was FROM pgferry.versioned_tables v WHERE v.relid = rel;
    IF was IS DISTINCT FROM tbl THEN
        IF was IS NOT NULL AND EXISTS (SELECT 1 FROM pg_trigger
                                        WHERE tgrelid = rel AND tgname = 'zz_pgferry_version') THEN
            DELETE FROM pgferry.versions AS n
             WHERE n.table_name = tbl
               AND EXISTS (SELECT 1 FROM pgferry.versions AS o
                            WHERE o.table_name = was AND o.key = n.key);
            UPDATE pgferry.versions SET table_name = tbl WHERE table_name = was;
        END IF;
        INSERT INTO pgferry.versioned_tables AS v (relid, table_name) VALUES (rel, tbl)
            ON CONFLICT (relid) DO UPDATE SET table_name = EXCLUDED.table_name;
    END IF;
    IF (SELECT relreplident FROM pg_class WHERE oid = rel) <> 'f' THEN
        EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', q);
    END IF;
    -- The table's own version function: its key columns by name, so that stamping builds the
    -- key from them alone (no whole-row jsonb). Replaced on every pass (the node id may change).
    fname := format('pgferry.%I', 'stamp_' || rel::oid);
    SELECT string_agg(format('OLD.%I', k), ', '),
           string_agg(format('NEW.%I', k), ', '),
           string_agg(format('NEW.%I IS DISTINCT FROM OLD.%I', k, k), ' OR ')
      INTO old_key, new_key, key_moved FROM unnest(keys) AS k;
    EXECUTE format($tpl$
CREATE OR REPLACE FUNCTION %1$s() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER @SETTINGS@
AS $stamp$
DECLARE
    k text;
    now_us int8 := greatest((extract(epoch FROM clock_timestamp()) * 1000000)::int8,
                            (SELECT f.t + 1 FROM pgferry.version_floor AS f));
BEGIN
    IF TG_OP = 'DELETE' THEN
        k := jsonb_build_array(%2$s)::text;
    ELSE
        k := jsonb_build_array(%3$s)::text;
    END IF;
    IF TG_OP = 'UPDATE' AND (%4$s) THEN
        RAISE EXCEPTION USING ERRCODE = 'feature_not_supported', MESSAGE = %5$L,
              HINT = 'Delete the row and insert it with the new key.';
    END IF;
    IF TG_OP = 'INSERT' THEN
        INSERT INTO pgferry.versions AS v (table_name, key, t, node, deleted)
        VALUES (%6$L, k, now_us, %7$L, false)
        ON CONFLICT (table_name, key) DO UPDATE
           SET t = greatest(EXCLUDED.t, v.t + 1), node = EXCLUDED.node, deleted = false,
               seen_node = NULL, seen_lsn = NULL
         WHERE v.deleted;
        RETURN NEW;
    END IF;
    INSERT INTO pgferry.versions AS v (table_name, key, t, node, deleted)
    VALUES (%6$L, k, now_us, %7$L, TG_OP = 'DELETE')
    ON CONFLICT (table_name, key) DO UPDATE
       SET t = greatest(EXCLUDED.t, v.t + 1), node = EXCLUDED.node, deleted = EXCLUDED.deleted,
           seen_node = NULL, seen_lsn = NULL;
    IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;
    RETURN NEW;
END
$stamp$
$tpl$, fname, old_key, new_key, key_moved,
       format('pgferry multi-master: the primary key of %s cannot be updated', tbl),
       tbl, local_node);
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = rel AND tgname = 'zz_pgferry_version') THEN
        EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', q);
        SELECT string_agg(format('r.%I', k), ', ') INTO key_expr FROM unnest(keys) AS k;
        IF ts_known THEN
            EXECUTE format(
                'INSERT INTO pgferry.versions (table_name, key, t, node, deleted)
                 SELECT %L, jsonb_build_array(%s)::text,
                        coalesce((extract(epoch FROM c.timestamp) * 1000000)::int8, %s),
                        coalesce(CASE WHEN c.roident = 0 THEN %L
                                      ELSE (SELECT o.node FROM pgferry.origins o
                                              JOIN pg_replication_origin ro ON ro.roname = o.roname
                                             WHERE ro.roident = c.roident) END, %L),
                        false
                   FROM ONLY %s AS r
                   LEFT JOIN LATERAL pg_xact_commit_timestamp_origin(r.xmin) AS c ON true
                 ON CONFLICT (table_name, key) DO NOTHING',
                tbl, key_expr, -9223372036854775808, local_node, '', q);
        ELSE
            EXECUTE format(
                'INSERT INTO pgferry.versions (table_name, key, t, node, deleted)
                 SELECT %L, jsonb_build_array(%s)::text, %s, %L, false FROM ONLY %s AS r
                 ON CONFLICT (table_name, key) DO NOTHING',
                tbl, key_expr, -9223372036854775808, '', q);
        END IF;
        EXECUTE format('CREATE TRIGGER zz_pgferry_version BEFORE INSERT OR UPDATE OR DELETE ON %s '
                       'FOR EACH ROW EXECUTE FUNCTION %s()', q, fname);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = rel AND tgname = 'pgferry_no_truncate') THEN
        EXECUTE format('CREATE TRIGGER pgferry_no_truncate BEFORE TRUNCATE ON %s '
                       'FOR EACH STATEMENT EXECUTE FUNCTION pgferry.refuse_truncate()', q);
    END IF;
    PERFORM set_config('pgferry.protecting', 'off', true);
    RETURN true;
END
$fn$;
"#;

/// The event trigger that protects tables as they are created or altered (a primary key
/// added later), including tables pgferry's appliers create (`ENABLE ALWAYS`). It runs as its
/// owner (`SECURITY DEFINER`): it fires for every role's DDL, and run as the invoking role it
/// failed every CREATE or ALTER TABLE of a role without rights in schema pgferry (an
/// application role owning its tables).
const NEW_TABLES_TRIGGER: &str = r#"
CREATE OR REPLACE FUNCTION pgferry.protect_new_tables() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER @SETTINGS@ AS $fn$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT DISTINCT objid FROM pg_event_trigger_ddl_commands()
              WHERE object_type IN ('table', 'table column', 'table constraint', 'index')
                AND schema_name IS DISTINCT FROM 'pgferry' LOOP
        IF EXISTS (SELECT 1 FROM pg_class WHERE oid = r.objid AND relkind IN ('r', 'p')) THEN
            PERFORM pgferry.protect(r.objid::regclass, @NODE@);
        ELSIF EXISTS (SELECT 1 FROM pg_index WHERE indexrelid = r.objid AND indisprimary) THEN
            PERFORM pgferry.protect((SELECT indrelid FROM pg_index WHERE indexrelid = r.objid)::regclass, @NODE@);
        END IF;
    END LOOP;
END
$fn$;
DROP EVENT TRIGGER IF EXISTS pgferry_protect_new_tables;
CREATE EVENT TRIGGER pgferry_protect_new_tables ON ddl_command_end
    WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE')
    EXECUTE FUNCTION pgferry.protect_new_tables();
ALTER EVENT TRIGGER pgferry_protect_new_tables ENABLE ALWAYS;
"#;

/// Upgrades a node prepared by an earlier pgferry (tombstone table, delete trigger, versions
/// read from commit timestamps): every tombstone becomes a deleted version with its commit
/// time and origin; live rows are versioned by [`PROTECT_FUNCTION`]. Runs once, in the same
/// transaction as the first protection pass.
const MIGRATE_TOMBSTONES: &str = r#"
INSERT INTO pgferry.versions (table_name, key, t, node, deleted)
SELECT d.table_name, d.key::text,
       coalesce((extract(epoch FROM coalesce(d.commit_ts, c.timestamp)) * 1000000)::int8,
                -9223372036854775808),
       coalesce(CASE WHEN coalesce(d.roident, c.roident) = 0 THEN $1
                     ELSE (SELECT o.node FROM pgferry.origins o
                             JOIN pg_replication_origin ro ON ro.roname = o.roname
                            WHERE ro.roident = coalesce(d.roident, c.roident)) END, ''),
       true
  FROM pgferry.tombstones d
  LEFT JOIN LATERAL pg_xact_commit_timestamp_origin((d.xid::text::int8 % 4294967296)::text::xid) AS c
    ON d.commit_ts IS NULL
ON CONFLICT (table_name, key) DO NOTHING
"#;

/// Converts version keys of the second layout (a jsonb object of the key columns by name,
/// `{"id": 1}`) to the third (an array of their values in the columns' table order, `[1]`; see
/// `apply::sql::version_key_of`), for tables whose key still has those columns; `@ONLY@` is
/// replaced by a condition on `v.table_name`. A key that already has a version of the new
/// layout keeps the greater version. [`prepare_node`] converts each table's keys under a lock
/// that keeps its writers out, before the table's trigger is replaced (and before its rows
/// without a version are stamped, which would otherwise make a guessed version the greater);
/// then those of tables it did not protect.
const KEYS_TO_ARRAYS: &str = r#"
WITH old AS (
    DELETE FROM pgferry.versions AS v
     USING (SELECT n.nspname || '.' || c.relname AS table_name,
                   array_agg(a.attname::text ORDER BY a.attnum) AS keys
              FROM pg_class c
              JOIN pg_namespace n ON n.oid = c.relnamespace
              JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
              JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY (i.indkey::int2[])
             GROUP BY 1) AS k
     WHERE v.table_name = k.table_name AND v.key LIKE '{%' AND v.key::jsonb ?& k.keys @ONLY@
 RETURNING v.table_name,
           (SELECT jsonb_agg(v.key::jsonb -> x.name ORDER BY x.ord)
              FROM unnest(k.keys) WITH ORDINALITY AS x(name, ord))::text AS key,
           v.t, v.node, v.deleted, v.seen_node, v.seen_lsn)
INSERT INTO pgferry.versions AS v (table_name, key, t, node, deleted, seen_node, seen_lsn)
SELECT table_name, key, t, node, deleted, seen_node, seen_lsn FROM old
ON CONFLICT (table_name, key) DO UPDATE
   SET t = EXCLUDED.t, node = EXCLUDED.node, deleted = EXCLUDED.deleted,
       seen_node = EXCLUDED.seen_node, seen_lsn = EXCLUDED.seen_lsn
 WHERE (EXCLUDED.t, EXCLUDED.node) > (v.t, v.node)
"#;

fn with_node(sql: &str, node: &str) -> String {
    sql.replace("@SETTINGS@", FUNCTION_SETTINGS)
        .replace("@NODE@", &quote_literal(node))
}

/// Creates the bookkeeping objects and protects every table with a primary key (all user
/// tables, or `only`) with [`PROTECT_FUNCTION`]; with no `only` list, tables created later
/// are protected by an event trigger. Upgrades a node prepared by an earlier pgferry in place.
/// Each table is its own short transaction, so that a restart never holds a lock on the
/// version store while waiting for one on a busy user table. Returns the tables protected,
/// and the tables skipped for lack of a primary key.
pub async fn prepare_node(
    client: &Client,
    node: &str,
    only: &[String],
) -> Result<(Vec<String>, Vec<String>), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock(hashtext('pgferry.bookkeeping')); \
             {BOOKKEEPING_DDL}; {} {VERSIONS_LAYOUT} {} {} {}; COMMIT",
            bookkeeping_columns(),
            with_node(TRUNCATE_GUARD_FUNCTION, node),
            with_node(PROTECT_FUNCTION, node),
            same_shape_function(),
        ))
        .await?;
    if only.is_empty() {
        client
            .batch_execute(&format!(
                "BEGIN; SELECT pg_advisory_xact_lock(hashtext('pgferry.bookkeeping')); {}; COMMIT",
                with_node(NEW_TABLES_TRIGGER, node)
            ))
            .await?;
    }
    let rows = client
        .query(
            &format!(
                "SELECT c.oid::int8, n.nspname::text, c.relname::text,
                        EXISTS (SELECT 1 FROM pg_index i
                                 WHERE i.indrelid = c.oid AND i.indisprimary)
                   FROM pg_class c
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND {}
                  ORDER BY 2, 3",
                super::admit::USER_SCHEMA_SQL
            ),
            &[],
        )
        .await?;
    let legacy = client
        .query_one("SELECT to_regclass('pgferry.tombstones') IS NOT NULL", &[])
        .await?
        .get::<_, bool>(0);
    let (mut prepared, mut keyless) = (Vec::new(), Vec::new());
    for row in rows {
        let (oid, schema, table): (i64, String, String) = (row.get(0), row.get(1), row.get(2));
        let name = format!("{schema}.{table}");
        if !only.is_empty() && !only.contains(&name) {
            continue;
        }
        if !row.get::<_, bool>(3) {
            keyless.push(name);
            continue;
        }
        let t = qualified(&schema, &table);
        client.batch_execute("BEGIN").await?;
        let old_keys: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pgferry.versions
                                 WHERE table_name = $1 AND key LIKE '{%')",
                &[&name],
            )
            .await?
            .get(0);
        if old_keys {
            // Writers wait: none stamps a key of the old layout once it is converted.
            client
                .batch_execute(&format!("LOCK TABLE {t} IN SHARE ROW EXCLUSIVE MODE"))
                .await?;
            client
                .execute(
                    &KEYS_TO_ARRAYS.replace("@ONLY@", "AND v.table_name = $1"),
                    &[&name],
                )
                .await?;
        }
        if legacy {
            client
                .batch_execute(&format!("DROP TRIGGER IF EXISTS pgferry_tombstone ON {t}"))
                .await?;
        }
        client
            .execute(
                "SELECT pgferry.protect($1::int8::oid::regclass, $2)",
                &[&oid, &node],
            )
            .await?;
        client.batch_execute("COMMIT").await?;
        prepared.push(name);
    }
    if legacy {
        client.batch_execute("BEGIN").await?;
        client.execute(MIGRATE_TOMBSTONES, &[&node]).await?;
        client
            .batch_execute(
                "DROP TABLE pgferry.tombstones; \
                 DROP FUNCTION IF EXISTS pgferry.record_tombstone() CASCADE; COMMIT",
            )
            .await?;
        tracing::info!("upgraded the node's tombstones to the version store");
    }
    client
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock(hashtext('pgferry.bookkeeping')); \
             {}; COMMIT",
            KEYS_TO_ARRAYS.replace("@ONLY@", "")
        ))
        .await?;
    Ok((prepared, keyless))
}

/// Adds the version store to the node's publication, when the publication lists tables
/// (`FOR ALL TABLES` covers it already), creating the publication first if capture has not.
async fn publish_versions(
    client: &Client,
    publication: &str,
    tables: &[String],
) -> Result<(), tokio_postgres::Error> {
    crate::source::catalog::ensure_publication(client, publication, tables).await?;
    let covered = client
        .query_one(
            "SELECT p.puballtables OR EXISTS (
                        SELECT 1 FROM pg_publication_tables t
                         WHERE t.pubname = p.pubname AND t.schemaname = 'pgferry'
                           AND t.tablename = 'versions')
               FROM pg_publication p WHERE p.pubname = $1",
            &[&publication],
        )
        .await?
        .get::<_, bool>(0);
    if !covered {
        client
            .batch_execute(&format!(
                "ALTER PUBLICATION {} ADD TABLE pgferry.versions",
                crate::sql::quote_ident(publication)
            ))
            .await?;
    }
    Ok(())
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

/// Emits this node's acknowledgement into its own WAL (and so, through capture, into its
/// node stream): the commit LSN applied from every peer, and the nodes whose missing
/// acknowledgements collection went past. A transactional message, so it sits in the stream
/// after every write this node committed before it.
const EMIT_ACK: &str = r#"
SELECT pg_logical_emit_message(true, 'pgferry.ack', jsonb_build_object(
    'node', $1::text,
    'at_us', (extract(epoch FROM clock_timestamp()) * 1000000)::int8,
    'applied', (SELECT coalesce(jsonb_object_agg(p.source_node, p.commit_lsn::text), '{}'::jsonb)
                  FROM pgferry.apply_progress p WHERE p.source_node = ANY($2::text[])),
    'bypassed', (SELECT coalesce(jsonb_agg(b.node ORDER BY b.node), '[]'::jsonb)
                   FROM pgferry.horizon_bypassed b))::text)
"#;

/// Seals local tombstones: a committed local delete sits in this node's stream before the
/// current WAL insert position, which becomes its `seen_lsn`.
const SEAL_LOCAL_TOMBSTONES: &str = r#"
UPDATE pgferry.versions AS v
   SET seen_node = $1::text, seen_lsn = pg_current_wal_insert_lsn()
  FROM (SELECT table_name, key FROM pgferry.versions
         WHERE deleted AND seen_lsn IS NULL
         LIMIT 50000 FOR UPDATE SKIP LOCKED) AS s
 WHERE v.table_name = s.table_name AND v.key = s.key
"#;

/// A tombstone whose delete sits at `seen_lsn` in `seen_node`'s stream is safe to collect
/// once every other node `m` has, by the latest ack of `m`'s stream this node applied,
/// applied `seen_node` past it: every write of `m` made before `m` knew of the delete is
/// then already applied here, and every later one has a greater version. (`seen_node`
/// itself wrote nothing older after its delete, and this node holds the tombstone, so it
/// applied `seen_node` past it.) `$1`: every node but this one.
const UNACKNOWLEDGED: &str = r#"
(v.seen_lsn IS NULL
 OR EXISTS (SELECT 1 FROM unnest($1::text[]) AS m(node)
             WHERE m.node IS DISTINCT FROM v.seen_node
               AND coalesce((SELECT a.applied_lsn FROM pgferry.peer_acks AS a
                              WHERE a.reporter = m.node AND a.source = v.seen_node),
                            '0/0'::pg_lsn) < v.seen_lsn))
"#;

/// Tombstones of a table with unresolved dead letters here stay, acknowledged or not: a letter
/// replayed later (a table parked behind a refused schema change, `pgferry dead-letters
/// replay`) may be an older change of a key deleted since, which the tombstone makes lose;
/// without it, the replay brought the row back on this node only (seen in
/// `schema_changes::a_type_missing_on_peers_parks_the_table_until_created`). Acknowledgements
/// cannot tell: the worker's position moves past the letters.
const HELD: &str = "AND v.table_name NOT IN (SELECT d.table_name FROM pgferry.dead_letters AS d
                                  WHERE d.resolved_at IS NULL AND d.table_name IS NOT NULL)";

/// The retention backstop: removes tombstones older than `$2` µs, acknowledged or not;
/// returns, per node whose acknowledgement was missing, how many went (and a total row with
/// a NULL node). `$1`: every node but this one. `{held}`: [`HELD`], where letters are kept.
const BACKSTOP: &str = r#"
WITH old AS (
     SELECT v.table_name, v.key, v.t,
            ARRAY(SELECT m.node FROM unnest($1::text[]) AS m(node)
                   WHERE m.node IS DISTINCT FROM v.seen_node
                     AND (v.seen_lsn IS NULL
                          OR coalesce((SELECT a.applied_lsn FROM pgferry.peer_acks AS a
                                        WHERE a.reporter = m.node AND a.source = v.seen_node),
                                      '0/0'::pg_lsn) < v.seen_lsn)) AS missing
       FROM pgferry.versions AS v
      WHERE v.deleted
        AND v.t < (extract(epoch FROM clock_timestamp()) * 1000000)::int8 - $2::int8
        {held}
      LIMIT 50000 FOR UPDATE SKIP LOCKED),
 gone AS (
     DELETE FROM pgferry.versions AS v USING old
      WHERE v.table_name = old.table_name AND v.key = old.key
     RETURNING old.t, old.missing),
 floor AS (
     UPDATE pgferry.version_floor
        SET t = greatest(t, (SELECT max(t) FROM gone))
      WHERE EXISTS (SELECT 1 FROM gone))
 SELECT m.node, count(*)::int8
   FROM gone CROSS JOIN LATERAL unnest(gone.missing) AS m(node)
  GROUP BY m.node
 UNION ALL
 SELECT NULL, count(*)::int8 FROM gone
"#;

/// What one maintenance pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Collected {
    /// Tombstones collected because every node had acknowledged them.
    pub acknowledged: u64,
    /// Tombstones removed by the retention backstop while some node had not.
    pub backstop: u64,
    /// Conflict-log rows past retention.
    pub conflicts: u64,
}

/// One maintenance pass: acknowledge, seal local tombstones, collect acknowledged ones, then
/// the retention backstop (recording the nodes it went past, which are refused from then on)
/// and the conflict log. `peers`: every other node of the cluster.
pub async fn collect(
    client: &Client,
    node: &str,
    peers: &[String],
    tombstone_retention: Duration,
    log_retention: Duration,
) -> Result<Collected, tokio_postgres::Error> {
    client.batch_execute("SET lock_timeout = '5s'").await?;
    let tables = client
        .query_one(
            "SELECT to_regclass('pgferry.apply_progress') IS NOT NULL,
                    to_regclass('pgferry.dead_letters') IS NOT NULL",
            &[],
        )
        .await?;
    let (progress, letters): (bool, bool) = (tables.get(0), tables.get(1));
    if progress {
        client.execute(EMIT_ACK, &[&node, &peers]).await?;
    }
    client.execute(SEAL_LOCAL_TOMBSTONES, &[&node]).await?;
    let held = if letters { HELD } else { "" };
    let micros = |age: Duration| i64::try_from(age.as_micros()).unwrap_or(i64::MAX);
    let acknowledged = client
        .query_one(
            &format!(
                "WITH safe AS (
                     SELECT v.table_name, v.key, v.t FROM pgferry.versions AS v
                      WHERE v.deleted AND NOT {UNACKNOWLEDGED} {held}
                      LIMIT 50000 FOR UPDATE SKIP LOCKED),
                 gone AS (
                     DELETE FROM pgferry.versions AS v USING safe
                      WHERE v.table_name = safe.table_name AND v.key = safe.key
                     RETURNING safe.t),
                 floor AS (
                     UPDATE pgferry.version_floor
                        SET t = greatest(t, (SELECT max(t) FROM gone))
                      WHERE EXISTS (SELECT 1 FROM gone))
                 SELECT count(*) FROM gone"
            ),
            &[&peers],
        )
        .await?
        .get::<_, i64>(0);
    let bypassed = client
        .query(
            &BACKSTOP.replace("{held}", held),
            &[&peers, &micros(tombstone_retention)],
        )
        .await?;
    let mut backstop = 0;
    for row in &bypassed {
        let count: i64 = row.get(1);
        match row.get::<_, Option<String>>(0) {
            None => backstop = count,
            Some(node) => {
                client
                    .execute(
                        "INSERT INTO pgferry.horizon_bypassed (node, tombstones) VALUES ($1, $2)
                         ON CONFLICT (node) DO UPDATE
                            SET tombstones = pgferry.horizon_bypassed.tombstones + EXCLUDED.tombstones",
                        &[&node, &count],
                    )
                    .await?;
                tracing::error!(%node, tombstones = count,
                                "collected tombstones past apply.conflict.tombstone_retention that node \
                                 had not acknowledged: its stream is refused from now on; rebuild it");
            }
        }
    }
    let conflicts = client
        .execute(
            "DELETE FROM pgferry.conflicts
              WHERE detected_at < now() - $1::int8 * interval '1 microsecond'",
            &[&micros(log_retention)],
        )
        .await?;
    Ok(Collected {
        acknowledged: u64::try_from(acknowledged).unwrap_or(0),
        backstop: u64::try_from(backstop).unwrap_or(0),
        conflicts,
    })
}

/// The tables `publication` publishes with a column list (`schema.table`), which a
/// multi-master node refuses ([`ApplyError::ColumnList`]; `pgferry check` reports them).
pub async fn partial_tables(
    client: &Client,
    publication: &str,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT n.nspname || '.' || c.relname
               FROM pg_publication p
               JOIN pg_publication_rel r ON r.prpubid = p.oid
               JOIN pg_class c ON c.oid = r.prrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE p.pubname = $1 AND r.prattrs IS NOT NULL
              ORDER BY 1",
            &[&publication],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Connects to a multi-master node's database, prepares it ([`prepare_node`]) and adds the
/// version store to the node's publication. Refuses a publication with column lists
/// ([`ApplyError::ColumnList`]): the other nodes write each row whole.
pub async fn setup(
    target: &TargetConfig,
    node: &str,
    publication: &str,
    published: &[String],
    only: &[String],
) -> Result<(), ApplyError> {
    let client = crate::pg::connect(&target.url, "pgferry-setup")
        .await
        .map_err(ApplyError::sql("connecting to the multi-master database"))?;
    let (prepared, keyless) = prepare_node(&client, node, only).await.map_err(ApplyError::sql(
        "preparing multi-master bookkeeping (version store, version triggers, REPLICA IDENTITY FULL)",
    ))?;
    publish_versions(&client, publication, published)
        .await
        .map_err(ApplyError::sql(
            "adding pgferry.versions to the node's publication",
        ))?;
    let partial = partial_tables(&client, publication)
        .await
        .map_err(ApplyError::sql("reading the publication's column lists"))?;
    if !partial.is_empty() {
        return Err(ApplyError::ColumnList {
            publication: publication.to_owned(),
            tables: partial.join(", "),
        });
    }
    tracing::info!(tables = ?prepared, "multi-master tables prepared");
    if !keyless.is_empty() {
        tracing::warn!(tables = ?keyless,
                       "tables without a primary key cannot be resolved by last-writer-wins; \
                        their changes are dead-lettered. Fix: add a primary key");
    }
    Ok(())
}

/// Runs [`collect`] every `maintenance_interval` until shutdown.
pub async fn maintain(
    target: TargetConfig,
    conflict: ConflictConfig,
    node: String,
    peers: Vec<String>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), ApplyError> {
    let client = crate::pg::connect(&target.url, "pgferry-maintenance")
        .await
        .map_err(ApplyError::sql("connecting for multi-master maintenance"))?;
    loop {
        let done = collect(
            &client,
            &node,
            &peers,
            conflict.tombstone_retention,
            conflict.log_retention,
        )
        .await
        .map_err(ApplyError::sql(
            "acknowledging, and collecting tombstones and conflict rows",
        ))?;
        metrics.tombstones_collected.inc_by(done.acknowledged);
        metrics.tombstones_expired.inc_by(done.backstop);
        if done != Collected::default() {
            tracing::debug!(?done, "multi-master maintenance");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(conflict.maintenance_interval) => {}
        }
    }
}

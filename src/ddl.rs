//! Schema changes (DDL) as they travel from a source to its targets, pure.
//!
//! On the source, pgferry's event trigger (`pgferry.capture_ddl`, see [`capture_sql`]) runs at
//! the end of every `CREATE TABLE` / `ALTER TABLE` and at every drop (tables and columns dropped
//! by `CASCADE` too: `DROP SCHEMA`, `DROP TYPE`, `DROP DOMAIN`), inside the DDL's transaction. It writes a transactional
//! `pgferry.ddl` message with the table's columns before (from its shadow table
//! `pgferry.ddl_tables`) and after the command, so the message is decoded in the stream at
//! the DDL's commit, in order with the data. Capture turns it into [`DdlOp`]s with [`diff`]:
//! columns are matched by attribute number, so a rename is told apart from a drop and an add.
//! The ops travel on the node stream (`{"type":"ddl",...}`) and as a schema-change record on
//! the table's topic; apply renders them with [`to_sql`] and runs them in the target
//! transaction at the same place in the source's transaction order.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::lsn::Lsn;
use crate::sql::{qualified, quote_ident, quote_literal, quote_value};

/// pgferry's DDL capture on the source: a shadow of every user table's columns
/// (`pgferry.ddl_tables`, so that the trigger knows each table's columns *before* a command),
/// and the event triggers that write a `pgferry.ddl` message in the DDL's own transaction (see
/// this module). `ENABLE ALWAYS`: they also fire for DDL pgferry applies on a multi-master
/// node, which keeps that node's shadow current (capture skips those messages as echoes).
///
/// The trigger functions run with their owner's rights (`SECURITY DEFINER`, with a fixed
/// `search_path`): event triggers fire for every role's DDL, and an application role that
/// owns its tables has no business in the `pgferry` schema. Run as the invoking role, they
/// failed every CREATE/ALTER TABLE of such a role with "permission denied for schema pgferry".
/// They read only the catalog and write only pgferry's own tables.
pub fn capture_sql() -> String {
    let history = ddl_history_sql();
    // Where a partition hangs (its parent's oid and name, and its bound; NULL for other
    // tables); the primary key's constraint name and columns (NULL without one);
    // `relpersistence` (a table made logged or unlogged changes no column, and this tells it).
    let tables = crate::sql::add_missing_columns(
        "pgferry.ddl_tables",
        &[
            ("partition_of", "jsonb"),
            ("primary_key", "jsonb"),
            ("persistence", "\"char\""),
        ],
    );
    format!("{CAPTURE_LOCK}{history}{CAPTURE_TABLES}{tables}{CAPTURE_FUNCTIONS}")
}

/// `pgferry.ddl_history`: columns renamed or dropped, and tables dropped or renamed, by
/// table and old name, written by the event trigger for changes made here and by apply for
/// those it applies from other nodes: changes written before such a change reach a target
/// later (another node's stream), and the applier follows the history instead of stopping on
/// a missing column. Created when missing, with the columns an earlier
/// pgferry's table lacks: where the rename or drop came from, the node whose change pgferry
/// applied and its commit LSN, or NULL and the WAL position here for a change made here
/// (tells apart a node that had seen the change from one that made the same change while
/// apart).
pub fn ddl_history_sql() -> String {
    let columns = crate::sql::add_missing_columns(
        "pgferry.ddl_history",
        &[("origin", "text"), ("origin_lsn", "pg_lsn")],
    );
    format!(
        "CREATE TABLE IF NOT EXISTS pgferry.ddl_history (
    table_name text NOT NULL,
    old_name text NOT NULL,
    new_name text,
    at timestamptz NOT NULL DEFAULT now(),
    origin text,
    origin_lsn pg_lsn,
    PRIMARY KEY (table_name, old_name));
{columns}"
    )
}

/// [`capture_sql`] is one transaction, one capture at a time.
const CAPTURE_LOCK: &str = "
BEGIN;
SELECT pg_advisory_xact_lock(hashtext('pgferry.ddl'));
";

/// The shadow tables of [`capture_sql`], as the first version made them.
const CAPTURE_TABLES: &str = r#"
CREATE TABLE IF NOT EXISTS pgferry.ddl_tables (
    relid oid PRIMARY KEY,
    schema_name text NOT NULL,
    table_name text NOT NULL,
    columns jsonb NOT NULL);
-- Columns added by ALTER TABLE (by relid and attnum, which renames keep), with the value the
-- table's existing rows got: a constant DEFAULT's value, or NULL without a DEFAULT (none is
-- kept for a volatile DEFAULT, whose rows each got their own). Multi-master writes it into a
-- column a remote row lacks, written by a node that did not have the column yet: that is
-- what the node's own row got when the column reached it, whatever the DEFAULT is by then.
CREATE TABLE IF NOT EXISTS pgferry.added_columns (
    relid oid NOT NULL,
    attnum int2 NOT NULL,
    value text,
    PRIMARY KEY (relid, attnum));
"#;

/// The functions and event triggers of [`capture_sql`], and the shadow of the tables that
/// exist.
const CAPTURE_FUNCTIONS: &str = r#"
-- Expressions and values are printed in ISO form, whatever the session's DateStyle: a
-- timestamp printed in another style carries a zone abbreviation (`IST`), which a target may
-- read as another zone (PostgreSQL's default abbreviations take IST for Israel).
CREATE OR REPLACE FUNCTION pgferry.ddl_columns(rel oid) RETURNS jsonb LANGUAGE sql STABLE
SET DateStyle = 'ISO, YMD' SET IntervalStyle = 'postgres' AS $f$
    SELECT COALESCE(jsonb_agg(jsonb_build_object(
               'attnum', a.attnum, 'name', a.attname, 'type', format_type(a.atttypid, a.atttypmod),
               'not_null', a.attnotnull,
               'default', CASE WHEN a.attgenerated = '' THEN pg_get_expr(d.adbin, d.adrelid) END)
               || CASE WHEN a.attidentity <> '' THEN '{"identity": true}'::jsonb ELSE '{}' END
               -- A generated column: its expression (pg_attrdef holds it, not a default), and
               -- whether it is computed on read (PostgreSQL 18's VIRTUAL).
               || CASE WHEN a.attgenerated <> '' THEN jsonb_build_object('generated',
                      jsonb_build_object('expression', pg_get_expr(d.adbin, d.adrelid),
                                         'virtual', a.attgenerated = 'v'))
                  ELSE '{}' END
               ORDER BY a.attnum), '[]')
      FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
     WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
$f$;
CREATE OR REPLACE FUNCTION pgferry.ddl_key(rel oid) RETURNS jsonb LANGUAGE sql STABLE AS $f$
    SELECT COALESCE(jsonb_agg(a.attname ORDER BY k.ord), '[]')
      FROM pg_index i, unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord), pg_attribute a
     WHERE i.indrelid = rel AND i.indisprimary AND a.attrelid = rel AND a.attnum = k.attnum
$f$;
CREATE OR REPLACE FUNCTION pgferry.ddl_primary_key(rel oid) RETURNS jsonb LANGUAGE sql STABLE AS $f$
    SELECT jsonb_build_object('name', c.conname::text, 'columns', pgferry.ddl_key(rel))
      FROM pg_constraint c WHERE c.conrelid = rel AND c.contype = 'p'
$f$;
CREATE OR REPLACE FUNCTION pgferry.ddl_partition(rel oid) RETURNS jsonb LANGUAGE sql STABLE
SET DateStyle = 'ISO, YMD' SET IntervalStyle = 'postgres' AS $f$
    SELECT jsonb_build_object('relid', p.oid::int8, 'schema', pn.nspname::text, 'table', p.relname::text,
                              'bound', pg_get_expr(c.relpartbound, c.oid))
      FROM pg_class c JOIN pg_inherits i ON i.inhrelid = c.oid
      JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace pn ON pn.oid = p.relnamespace
     WHERE c.oid = rel AND c.relispartition
$f$;
-- Records the columns of `new` that `old` lacks (pgferry.added_columns); never fails the DDL.
CREATE OR REPLACE FUNCTION pgferry.record_added_columns(rel oid, old jsonb, new jsonb)
RETURNS void LANGUAGE plpgsql SET DateStyle = 'ISO, YMD' SET IntervalStyle = 'postgres' AS $f$
DECLARE
    c record;
    val text;
    digits text := current_setting('extra_float_digits');
BEGIN
    FOR c IN SELECT a.attnum, a.atthasmissing, pg_get_expr(d.adbin, d.adrelid) AS expr,
                    format_type(a.atttypid, a.atttypmod) AS ty, a.attidentity <> '' AS identity
               FROM jsonb_array_elements(new) AS n
               JOIN pg_attribute a ON a.attrelid = rel AND a.attnum = (n->>'attnum')::int2
               LEFT JOIN pg_attrdef d ON d.adrelid = rel AND d.adnum = a.attnum
              WHERE NOT EXISTS (SELECT 1 FROM jsonb_array_elements(old) AS o
                                 WHERE (o->>'attnum') = (n->>'attnum'))
    LOOP
        IF (c.expr IS NOT NULL AND NOT c.atthasmissing) OR c.identity THEN
            -- A volatile DEFAULT, or an identity: each row got its own value.
            CONTINUE;
        END IF;
        BEGIN
            val := NULL;
            IF c.expr IS NOT NULL THEN
                -- Non-volatile, evaluated once by the ADD in this transaction: the same value,
                -- under this session's time zone, written in ISO form (this function's
                -- DateStyle, which targets read under any). A float is written with every
                -- digit, whatever the session shows.
                IF c.ty IN ('double precision', 'real', 'double precision[]', 'real[]') THEN
                    PERFORM set_config('extra_float_digits', '3', true);
                END IF;
                EXECUTE format('SELECT (%s)::%s::text', c.expr, c.ty) INTO val;
                PERFORM set_config('extra_float_digits', digits, true);
            END IF;
            INSERT INTO pgferry.added_columns VALUES (rel, c.attnum, val)
                ON CONFLICT (relid, attnum) DO UPDATE SET value = EXCLUDED.value;
        EXCEPTION WHEN OTHERS THEN
            NULL;
        END;
    END LOOP;
END
$f$;
-- What this database has applied from every other node (multi-master: the commit LSN of each
-- peer's last transaction applied here; empty where pgferry applies nothing): a schema change
-- carries it, so that a node receiving it first applies the changes this one had applied
-- before it (see apply's `Worker::apply_ddl`). Dynamic SQL: a source only (no apply) has no
-- such table. Never fails the user's DDL: without the right to read it, nothing is ordered.
CREATE OR REPLACE FUNCTION pgferry.ddl_applied() RETURNS jsonb LANGUAGE plpgsql STABLE AS $f$
DECLARE
    applied jsonb;
BEGIN
    IF to_regclass('pgferry.apply_progress') IS NULL THEN
        RETURN '{}';
    END IF;
    EXECUTE 'SELECT coalesce(jsonb_object_agg(source_node, commit_lsn::text), ''{}'')
               FROM pgferry.apply_progress' INTO applied;
    RETURN applied;
EXCEPTION WHEN insufficient_privilege OR undefined_table OR undefined_column THEN
    RETURN '{}';
END
$f$;
-- `SET pgferry.capture_ddl = off` in a session: its schema changes stay on this database
-- (the shadow still follows them, so later messages describe the table as it is).
CREATE OR REPLACE FUNCTION pgferry.ddl_stays_local() RETURNS bool LANGUAGE sql STABLE AS $f$
    SELECT lower(coalesce(current_setting('pgferry.capture_ddl', true), 'on')) IN ('off', 'false', '0', 'no')
$f$;
-- Every table that inherits from rel, at any depth (a partitioned table's partitions too).
CREATE OR REPLACE FUNCTION pgferry.ddl_inheritors(rel oid) RETURNS SETOF oid LANGUAGE sql STABLE AS $f$
    WITH RECURSIVE d(relid) AS (
        SELECT inhrelid FROM pg_inherits WHERE inhparent = rel
        UNION SELECT i.inhrelid FROM pg_inherits i JOIN d ON i.inhparent = d.relid)
    SELECT relid FROM d
$f$;
-- Records a table's shadow: what the trigger compares the table's next command with.
CREATE OR REPLACE FUNCTION pgferry.ddl_remember(oid, text, text, jsonb, jsonb, jsonb, "char")
RETURNS void LANGUAGE sql AS $f$
    INSERT INTO pgferry.ddl_tables VALUES ($1, $2, $3, $4, $5, $6, $7)
        ON CONFLICT (relid) DO UPDATE SET schema_name = EXCLUDED.schema_name,
            table_name = EXCLUDED.table_name, columns = EXCLUDED.columns,
            partition_of = EXCLUDED.partition_of, primary_key = EXCLUDED.primary_key,
            persistence = EXCLUDED.persistence
$f$;
-- The event trigger at the end of CREATE and ALTER TABLE: the tables the command reports.
CREATE OR REPLACE FUNCTION pgferry.capture_ddl() RETURNS event_trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
BEGIN
    PERFORM pgferry.ddl_examine(array_agg(c.objid), array_agg(c.command_tag))
       FROM pg_event_trigger_ddl_commands() c
      WHERE c.object_type IN ('table', 'table column');
END
$f$;
-- Compares each reported table (objids, with the command tags that reported them) and the
-- tables the command changed with it against their shadows, and writes a message for each
-- that changed. Run by the event triggers, as their owner.
CREATE OR REPLACE FUNCTION pgferry.ddl_examine(objids oid[], tags text[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $f$
DECLARE
    r record;
    shadow pgferry.ddl_tables;
    cols jsonb;
    part jsonb;
    pkey jsonb;
    moved bool;
    added jsonb;
    made text;
    persistence_now "char";
    applied jsonb := pgferry.ddl_applied();
BEGIN
    -- The tables the command reports, then (not reported: an ALTER TABLE of a partitioned
    -- table reports only that table) its partitions, whose columns changed with it or which
    -- it attached, the tables its partitions were, which it may have detached, and the
    -- tables that inherit from it (INHERITS), whose inherited columns changed with it.
    FOR r IN WITH reported AS (
                 SELECT c.objid, max(c.command_tag) AS command_tag
                   FROM unnest(objids, tags) AS c(objid, command_tag)
                  GROUP BY c.objid),
             examined AS (
                 SELECT objid, command_tag, true AS reported FROM reported
                 UNION ALL
                 SELECT t.relid, 'ALTER TABLE', false
                   FROM reported, pg_partition_tree(reported.objid) t
                  WHERE t.relid <> reported.objid
                 UNION ALL
                 SELECT s.relid, 'ALTER TABLE', false
                   FROM reported JOIN pgferry.ddl_tables s
                     ON (s.partition_of->>'relid')::oid = reported.objid
                 UNION ALL
                 SELECT d, 'ALTER TABLE', false
                   FROM reported, pgferry.ddl_inheritors(reported.objid) d)
             SELECT e.objid, n.nspname::text AS nsp, k.relname::text AS rel, k.relkind,
                    k.relispartition, max(e.command_tag) AS command_tag,
                    bool_or(e.reported) AS reported
               FROM examined e
               JOIN pg_class k ON k.oid = e.objid AND k.relkind IN ('r', 'p')
               JOIN pg_namespace n ON n.oid = k.relnamespace
              WHERE n.nspname NOT IN ('pgferry', 'pg_catalog', 'information_schema')
                AND n.nspname NOT LIKE 'pg\_%' AND NOT k.relpersistence = 't'
              GROUP BY e.objid, n.nspname, k.relname, k.relkind, k.relispartition
              ORDER BY bool_or(e.reported) DESC, e.objid
    LOOP
        SELECT * INTO shadow FROM pgferry.ddl_tables WHERE relid = r.objid;
        -- An unlogged table made logged (a bulk-load pattern) enters publications only now:
        -- for targets it is a new table (its rows come by the snapshot of a new table). A
        -- table made unlogged leaves them: PostgreSQL writes none of its changes to the WAL,
        -- which capture warns about.
        persistence_now := (SELECT relpersistence FROM pg_class WHERE oid = r.objid);
        made := CASE WHEN shadow.persistence = 'u' AND persistence_now = 'p' THEN 'logged'
                     WHEN shadow.persistence = 'p' AND persistence_now = 'u' THEN 'unlogged' END;
        IF made = 'logged' THEN
            shadow := NULL;
        END IF;
        cols := pgferry.ddl_columns(r.objid);
        part := pgferry.ddl_partition(r.objid);
        pkey := pgferry.ddl_primary_key(r.objid);
        -- Attached to another parent, detached, or given another bound; not a rename.
        moved := (shadow.partition_of->>'relid') IS DISTINCT FROM (part->>'relid')
              OR (shadow.partition_of->>'bound') IS DISTINCT FROM (part->>'bound');
        -- Nothing changed shape: nothing to say, unless the command rewrote values in place
        -- (`ALTER COLUMN c TYPE <its own type> USING expr`), which capture re-snapshots.
        IF shadow.relid IS NOT NULL AND shadow.columns = cols
           AND shadow.schema_name = r.nsp AND shadow.table_name = r.rel
           AND shadow.partition_of IS NOT DISTINCT FROM part
           AND shadow.primary_key IS NOT DISTINCT FROM pkey AND made IS NULL
           AND NOT (r.command_tag = 'ALTER TABLE'
                    AND current_query() ~* E'\\mTYPE\\M.*\\mUSING\\M') THEN
            CONTINUE;
        END IF;
        IF NOT r.reported AND r.relispartition AND (shadow.relid IS NULL OR NOT moved) THEN
            -- Columns a partition follows from its parent (or the parent's new name): they
            -- travel with the parent's own message, which targets apply to their parent. (A
            -- table that inherits without being a partition is a table of its own on targets:
            -- its message carries what it inherited.)
            PERFORM pgferry.ddl_remember(r.objid, r.nsp, r.rel, cols, part, pkey, persistence_now);
            CONTINUE;
        END IF;
        IF NOT r.reported AND (r.relispartition OR shadow.partition_of IS NOT NULL) THEN
            -- Attached or detached by its parent's command: no column or key of its own
            -- changed.
            shadow.columns := cols;
            shadow.primary_key := pkey;
        END IF;
        -- Added columns and their rows' value (a table new here, maybe under a reused oid,
        -- has none).
        added := NULL;
        IF shadow.relid IS NULL THEN
            DELETE FROM pgferry.added_columns WHERE relid = r.objid;
        ELSE
            PERFORM pgferry.record_added_columns(r.objid, shadow.columns, cols);
            -- What the existing rows got in each column this command added (attnum -> text,
            -- null for NULL); a column without an entry got a value of its own in each row.
            SELECT coalesce(jsonb_object_agg(a.attnum::text, a.value), '{}') INTO added
              FROM pgferry.added_columns a
             WHERE a.relid = r.objid
               AND NOT EXISTS (SELECT 1 FROM jsonb_array_elements(shadow.columns) o
                                WHERE (o->>'attnum')::int2 = a.attnum);
        END IF;
        -- Renamed and dropped columns, for changes written before this command that arrive
        -- later from other nodes (see apply's target::column_history).
        IF shadow.relid IS NOT NULL THEN
            INSERT INTO pgferry.ddl_history (table_name, old_name, new_name, origin, origin_lsn)
            SELECT r.nsp || '.' || r.rel, o->>'name', n->>'name', NULL, pg_current_wal_insert_lsn()
              FROM jsonb_array_elements(shadow.columns) o
              LEFT JOIN jsonb_array_elements(cols) n ON (n->>'attnum') = (o->>'attnum')
             WHERE n IS NULL OR (n->>'name') <> (o->>'name')
            ON CONFLICT (table_name, old_name) DO UPDATE SET new_name = EXCLUDED.new_name, at = now(),
                origin = EXCLUDED.origin, origin_lsn = EXCLUDED.origin_lsn;
        END IF;
        -- A table renamed or moved to another schema, for changes written under its old name
        -- that arrive later from other nodes (see apply's target::table_fate): the old name's
        -- record `''` holds the new name as a JSON array [schema, table].
        IF shadow.relid IS NOT NULL
           AND (shadow.schema_name, shadow.table_name) IS DISTINCT FROM (r.nsp, r.rel) THEN
            INSERT INTO pgferry.ddl_history (table_name, old_name, new_name, origin, origin_lsn)
            VALUES (shadow.schema_name || '.' || shadow.table_name, '',
                    jsonb_build_array(r.nsp, r.rel)::text, NULL, pg_current_wal_insert_lsn())
            ON CONFLICT (table_name, old_name) DO UPDATE SET new_name = EXCLUDED.new_name, at = now(),
                origin = EXCLUDED.origin, origin_lsn = EXCLUDED.origin_lsn;
            -- Its columns' renames and drops go with it (a record under the new name left by
            -- another table that had it gives way).
            DELETE FROM pgferry.ddl_history h
             WHERE h.table_name = r.nsp || '.' || r.rel AND h.old_name <> ''
               AND EXISTS (SELECT 1 FROM pgferry.ddl_history o
                            WHERE o.table_name = shadow.schema_name || '.' || shadow.table_name
                              AND o.old_name = h.old_name);
            UPDATE pgferry.ddl_history SET table_name = r.nsp || '.' || r.rel
             WHERE table_name = shadow.schema_name || '.' || shadow.table_name AND old_name <> '';
        END IF;
        IF NOT pgferry.ddl_stays_local() THEN
        PERFORM pg_logical_emit_message(true, 'pgferry.ddl', jsonb_build_object(
            'tag', r.command_tag, 'relid', r.objid::int8, 'schema', r.nsp, 'table', r.rel,
            'old_schema', shadow.schema_name, 'old_table', shadow.table_name,
            'old', shadow.columns, 'new', cols, 'key', COALESCE(pkey->'columns', '[]'),
            'old_partition', shadow.partition_of, 'partition', part,
            'old_primary_key', shadow.primary_key, 'primary_key', pkey,
            'partition_by', CASE WHEN r.relkind = 'p' THEN pg_get_partkeydef(r.objid) END,
            'added', added, 'applied', applied,
            -- The session's settings that decide what a type change computes (see
            -- SESSION_SETTINGS in ddl.rs).
            'settings', jsonb_build_object('TimeZone', current_setting('TimeZone'),
                'DateStyle', current_setting('DateStyle'),
                'IntervalStyle', current_setting('IntervalStyle'),
                'extra_float_digits', current_setting('extra_float_digits')),
            'persistence', made,
            -- An ALTER TABLE … USING may give rows values targets cannot compute. The
            -- command's text is the client's: one run by a function (`SELECT migrate()`) is
            -- not in it, and is taken to have a USING.
            'using', r.command_tag = 'ALTER TABLE'
                     AND (current_query() ~* E'\\mUSING\\M' OR current_query() !~* E'\\mALTER\\M'))::text);
        END IF;
        PERFORM pgferry.ddl_remember(r.objid, r.nsp, r.rel, cols, part, pkey, persistence_now);
    END LOOP;
END
$f$;
CREATE OR REPLACE FUNCTION pgferry.capture_drop() RETURNS event_trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$
DECLARE
    r record;
    applied jsonb := pgferry.ddl_applied();
    altered oid[];
BEGIN
    -- Every table the command dropped: by name, by CASCADE (a DROP SCHEMA, a DROP TYPE of a
    -- table's row type, a DROP TABLE of a parent its inheritors go with), or by DROP OWNED;
    -- but not a partition whose parent went too (a target drops it with the parent).
    FOR r IN SELECT d.objid, d.schema_name, d.object_name FROM pg_event_trigger_dropped_objects() d
              WHERE d.object_type = 'table'
                AND d.schema_name NOT IN ('pgferry', 'pg_catalog', 'information_schema')
                AND d.schema_name NOT LIKE 'pg\_%'
                AND NOT EXISTS (
                    SELECT 1 FROM pgferry.ddl_tables s, pg_event_trigger_dropped_objects() p
                     WHERE s.relid = d.objid AND p.object_type = 'table'
                       AND p.objid = (s.partition_of->>'relid')::oid)
    LOOP
        DELETE FROM pgferry.ddl_tables WHERE relid = r.objid;
        -- The table dropped here (by a user, or by apply from another node): rows of it other
        -- nodes wrote before they saw the drop still arrive, and apply skips them (an old
        -- name of '' stands for the table; no column has that name; a new name of NULL says
        -- dropped, where a renamed table's says where it went).
        INSERT INTO pgferry.ddl_history (table_name, old_name, new_name, origin, origin_lsn)
        VALUES (r.schema_name || '.' || r.object_name, '', NULL, NULL, pg_current_wal_insert_lsn())
        ON CONFLICT (table_name, old_name) DO UPDATE SET new_name = NULL, at = now(),
            origin_lsn = EXCLUDED.origin_lsn;
        IF NOT pgferry.ddl_stays_local() THEN
            PERFORM pg_logical_emit_message(true, 'pgferry.ddl', jsonb_build_object(
                'tag', 'DROP TABLE', 'schema', r.schema_name, 'table', r.object_name,
                'applied', applied)::text);
        END IF;
    END LOOP;
    -- Columns another command dropped by CASCADE (DROP TYPE, DROP DOMAIN, DROP FUNCTION of a
    -- generated column's function, …) from tables that stay: their tables compared with their
    -- shadows, as at the end of an ALTER TABLE (which reports its own drops there).
    IF TG_TAG NOT IN ('ALTER TABLE', 'CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO') THEN
        SELECT array_agg(DISTINCT d.objid) INTO altered
          FROM pg_event_trigger_dropped_objects() d
         WHERE d.object_type = 'table column'
           AND NOT EXISTS (SELECT 1 FROM pg_event_trigger_dropped_objects() t
                            WHERE t.object_type = 'table' AND t.objid = d.objid);
        IF altered IS NOT NULL THEN
            PERFORM pgferry.ddl_examine(altered, array_fill(TG_TAG, ARRAY[cardinality(altered)]));
        END IF;
    END IF;
END
$f$;
DO $d$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'pgferry_ddl') THEN
        CREATE EVENT TRIGGER pgferry_ddl ON ddl_command_end
            WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE', 'CREATE TABLE AS', 'SELECT INTO')
            EXECUTE FUNCTION pgferry.capture_ddl();
        ALTER EVENT TRIGGER pgferry_ddl ENABLE ALWAYS;
    END IF;
    -- Earlier versions fired at DROP TABLE only: tables and columns dropped by CASCADE were
    -- missed.
    IF EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'pgferry_drop' AND evttags IS NOT NULL) THEN
        DROP EVENT TRIGGER pgferry_drop;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'pgferry_drop') THEN
        CREATE EVENT TRIGGER pgferry_drop ON sql_drop
            EXECUTE FUNCTION pgferry.capture_drop();
        ALTER EVENT TRIGGER pgferry_drop ENABLE ALWAYS;
    END IF;
END $d$;
INSERT INTO pgferry.ddl_tables
SELECT c.oid, n.nspname, c.relname, pgferry.ddl_columns(c.oid), pgferry.ddl_partition(c.oid),
       pgferry.ddl_primary_key(c.oid), c.relpersistence
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p') AND c.relpersistence <> 't'
   AND n.nspname NOT IN ('pgferry', 'pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\_%'
   -- Not for a shadow that exists: ON CONFLICT would wait for an open migration that
   -- rewrote it, and capture would not start until that migration ended.
   AND NOT EXISTS (SELECT FROM pgferry.ddl_tables s WHERE s.relid = c.oid)
ON CONFLICT (relid) DO NOTHING;
-- Shadows written before partitions and keys were tracked.
UPDATE pgferry.ddl_tables SET partition_of = pgferry.ddl_partition(relid)
 WHERE partition_of IS NULL AND pgferry.ddl_partition(relid) IS NOT NULL;
UPDATE pgferry.ddl_tables SET primary_key = pgferry.ddl_primary_key(relid)
 WHERE primary_key IS NULL AND pgferry.ddl_primary_key(relid) IS NOT NULL;
UPDATE pgferry.ddl_tables s SET persistence = c.relpersistence
  FROM pg_class c WHERE c.oid = s.relid AND s.persistence IS NULL;
COMMIT;
"#;

/// A column as the trigger reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DdlColumn {
    /// `pg_attribute.attnum`: stable across renames and type changes.
    #[serde(default)]
    pub attnum: i32,
    /// Column name.
    pub name: String,
    /// `format_type(atttypid, atttypmod)`.
    #[serde(rename = "type")]
    pub type_name: String,
    /// `attnotnull`.
    #[serde(default)]
    pub not_null: bool,
    /// The default expression (`pg_get_expr`), if any.
    #[serde(default)]
    pub default: Option<String>,
    /// An identity column (`GENERATED … AS IDENTITY`): its values come from a sequence, which
    /// pgferry does not copy; targets get a plain column.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub identity: bool,
    /// A generated column (`GENERATED ALWAYS AS (…) STORED`, or `VIRTUAL`): targets get the
    /// same definition and compute its values themselves (the stream does not carry them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generated: Option<Generated>,
}

/// How a generated column computes its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generated {
    /// The expression, as `pg_get_expr` prints it. Immutable (PostgreSQL requires it), so a
    /// target computes what the source did; checked with [`is_safe_expression`] before it
    /// runs there.
    pub expression: String,
    /// Computed on read (PostgreSQL 18's `VIRTUAL`) rather than stored.
    #[serde(
        default,
        rename = "virtual",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub is_virtual: bool,
}

impl DdlColumn {
    /// Whether a target gets the column's DEFAULT as the source has it (none, or a constant,
    /// see [`is_constant_default`]); otherwise its rows' values must come from the source.
    pub fn default_copied(&self) -> bool {
        !self.identity && self.default.as_deref().is_none_or(is_constant_default)
    }
}

/// What the event trigger wrote.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TriggerMessage {
    /// `CREATE TABLE`, `ALTER TABLE`, `DROP TABLE`, …
    pub tag: String,
    /// The table's oid on the source: capture finds the table by it, whatever its name is by
    /// the time the change is decoded (`None` from a trigger that did not say). Not sent on.
    #[serde(default)]
    pub relid: Option<u32>,
    /// Schema after the command.
    pub schema: String,
    /// Table after the command.
    pub table: String,
    /// Schema and table before the command (`None` for a new table).
    #[serde(default)]
    pub old_schema: Option<String>,
    /// Table name before the command.
    #[serde(default)]
    pub old_table: Option<String>,
    /// Columns before (`None` for a new table, or a table the shadow did not know).
    #[serde(default)]
    pub old: Option<Vec<DdlColumn>>,
    /// Columns after (empty for a dropped table).
    #[serde(default)]
    pub new: Vec<DdlColumn>,
    /// Primary-key columns after.
    #[serde(default)]
    pub key: Vec<String>,
    /// The parent and bound before, if the table was a partition.
    #[serde(default)]
    pub old_partition: Option<PartitionOf>,
    /// The parent and bound after, if the table is a partition.
    #[serde(default)]
    pub partition: Option<PartitionOf>,
    /// `pg_get_partkeydef` of a partitioned table (`RANGE (at)`, `LIST (region)`, …).
    #[serde(default)]
    pub partition_by: Option<String>,
    /// The primary key before (`None`: none, or a trigger that did not track keys).
    #[serde(default)]
    pub old_primary_key: Option<PrimaryKey>,
    /// The primary key after.
    #[serde(default)]
    pub primary_key: Option<PrimaryKey>,
    /// What the database had applied from each other node when the command ran (node → the
    /// commit LSN of its last transaction applied there); empty where nothing is applied.
    #[serde(default)]
    pub applied: BTreeMap<String, Lsn>,
    /// For each column the command added (by attnum), the value the table's existing rows got,
    /// as text (`None`: NULL); a column missing here got a value of its own in each row (a
    /// volatile DEFAULT). `None` from a trigger that did not say.
    #[serde(default)]
    pub added: Option<BTreeMap<i32, Option<String>>>,
    /// The command's text has a `USING` (an `ALTER COLUMN … TYPE … USING expr` may compute
    /// values a plain cast on the target would not), or is not in the client's query text (a
    /// function ran it), so it may have one.
    #[serde(default)]
    pub using: bool,
    /// What the command made the table: `unlogged` (`SET UNLOGGED`: PostgreSQL writes none of
    /// its changes to the WAL from now on) or `logged` (`SET LOGGED`, reported as the
    /// table's creation); `None` when it did neither.
    #[serde(default)]
    pub persistence: Option<Persistence>,
    /// The session settings the command ran under, of [`SESSION_SETTINGS`]: name → value.
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
}

/// Session settings that decide the values a schema change computes, which targets run the
/// change under as the source's session had them: a type change's cast from `timestamptz` to
/// `timestamp`, `date` or `time` (`TimeZone`), from a date or time type or an interval to text
/// (`DateStyle`, `IntervalStyle`, `TimeZone`), from text to a date type (`DateStyle`'s field
/// order), from a float to text (`extra_float_digits`); and the value an added column's
/// existing rows got, written as text under them. Run under the target session's own, a
/// timestamptz column made `timestamp` in a New York session held UTC wall-clock times on
/// the target and New York ones on the source.
pub const SESSION_SETTINGS: [&str; 4] = [
    "TimeZone",
    "DateStyle",
    "IntervalStyle",
    "extra_float_digits",
];

/// The settings of [`SESSION_SETTINGS`] in `settings` (others are ignored: a stream names no
/// other setting a target would take), as (name, value).
pub fn session_settings(settings: &BTreeMap<String, String>) -> Vec<(&str, &str)> {
    settings
        .iter()
        .filter(|(name, _)| SESSION_SETTINGS.contains(&name.as_str()))
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect()
}

/// A table's persistence as an `ALTER TABLE … SET LOGGED | UNLOGGED` left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Persistence {
    /// `SET LOGGED`: its changes are in the WAL again, from the command on.
    Logged,
    /// `SET UNLOGGED`: PostgreSQL writes none of its changes to the WAL, so logical
    /// decoding, and so capture, sees none of them.
    Unlogged,
}

/// What the source table's existing rows got in a column an `ALTER TABLE` added, where the
/// target cannot get the same from the column definition it is sent (the DEFAULT is an
/// expression pgferry does not copy, see [`is_constant_default`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Existing {
    /// Every row got this value (its text form; `None`: NULL): a non-volatile DEFAULT such as
    /// `now()` or `CURRENT_DATE`, evaluated once by the ADD.
    Value(Option<String>),
    /// Each row got its own (a volatile DEFAULT: `gen_random_uuid()`, a sequence): the target
    /// leaves the column empty, and capture re-snapshots the table on replicas.
    PerRow,
}

/// A primary key: its constraint's name and its columns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrimaryKey {
    /// The constraint's name (`items_pkey`).
    pub name: String,
    /// Its columns, in key order.
    pub columns: Vec<String>,
}

/// Where a partition hangs: its parent and its bound.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionOf {
    /// The parent's oid on the source: tells a move to another parent from a parent's rename.
    /// Not sent on.
    #[serde(default, skip_serializing)]
    pub relid: Option<u32>,
    /// The parent's schema.
    pub schema: String,
    /// The parent's name.
    pub table: String,
    /// `pg_get_expr(relpartbound)`: `FOR VALUES …` or `DEFAULT`.
    pub bound: String,
}

impl PartitionOf {
    /// Whether `other` hangs the table somewhere else (another parent or another bound), as
    /// opposed to under the same parent by a new name.
    fn moved(old: Option<&Self>, new: Option<&Self>) -> bool {
        match (old, new) {
            (None, None) => false,
            (Some(a), Some(b)) => a.bound != b.bound || a.relid != b.relid,
            _ => true,
        }
    }
}

/// One schema change of one table, as targets apply it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum DdlOp {
    /// A new table.
    CreateTable {
        /// Its columns.
        columns: Vec<DdlColumn>,
        /// Its primary key.
        key: Vec<String>,
        /// The primary key constraint's name, so that a later key change finds it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key_name: Option<String>,
        /// A partition: created `PARTITION OF` its parent (its columns and key are the
        /// parent's).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        partition_of: Option<PartitionOf>,
        /// A partitioned table: its partition key (`RANGE (at)`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        partition_by: Option<String>,
    },
    /// A new column.
    AddColumn {
        /// The column.
        column: DdlColumn,
        /// What the source's existing rows got in it, when its DEFAULT is not copied.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        existing: Option<Existing>,
    },
    /// A column removed.
    DropColumn {
        /// Its name.
        name: String,
    },
    /// A column renamed.
    RenameColumn {
        /// Old name.
        from: String,
        /// New name.
        to: String,
    },
    /// A column's type changed.
    AlterColumnType {
        /// The column (its new name).
        name: String,
        /// The new type.
        #[serde(rename = "type")]
        type_name: String,
        /// A generated column: its values are computed again in the new type (PostgreSQL
        /// allows no `USING` for it).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        generated: bool,
        /// The type before, on the node that made the change (`None` from versions before
        /// it was recorded): a target whose column has neither type had it changed otherwise
        /// meanwhile (two nodes retyping one column at once), and the schemas differ.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<String>,
    },
    /// A generated column's expression changed (`ALTER COLUMN … SET EXPRESSION`, PostgreSQL
    /// 17), or was dropped (`DROP EXPRESSION`: a plain column now, keeping its values).
    SetExpression {
        /// The column.
        name: String,
        /// The new expression; none: dropped.
        #[serde(default)]
        expression: Option<String>,
    },
    /// NOT NULL set or dropped.
    SetNotNull {
        /// The column.
        name: String,
        /// Whether it is NOT NULL now.
        not_null: bool,
    },
    /// A column's default set or dropped. Targets copy a constant one only (see
    /// [`is_constant_default`]).
    SetDefault {
        /// The column.
        name: String,
        /// The default expression (`pg_get_expr`); none: dropped.
        #[serde(default)]
        default: Option<String>,
    },
    /// The primary key was added, dropped or changed: targets drop the constraint named
    /// `drop` (if they have it) and add `add`.
    SetPrimaryKey {
        /// The key before, if there was one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        drop: Option<PrimaryKey>,
        /// The key after, if there is one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        add: Option<PrimaryKey>,
    },
    /// The table was attached as a partition of `parent`.
    AttachPartition {
        /// The parent and the bound.
        parent: PartitionOf,
    },
    /// The table was detached from its parent (`parent.bound` is the bound it had).
    DetachPartition {
        /// The parent it was a partition of.
        parent: PartitionOf,
    },
    /// The table was renamed (within its schema).
    RenameTable {
        /// New name.
        to: String,
    },
    /// The table was moved to another schema (`ALTER TABLE … SET SCHEMA`).
    SetSchema {
        /// The schema it is in now (targets need it).
        to: String,
    },
    /// The table was dropped.
    DropTable,
}

/// The ops that turn the table as it was into the table as it is. Drops come first, then
/// renames, type and NOT NULL changes, then additions (so a name dropped and added again in one
/// command works), then generation expressions (which may name renamed or added columns), then the primary key (a new one may use an added column), a detach from
/// the old parent and an attach to the new one, the table's rename and its move to another
/// schema last. A new table is one `CreateTable`.
pub fn diff(message: &TriggerMessage) -> Vec<DdlOp> {
    if message.tag == "DROP TABLE" {
        return vec![DdlOp::DropTable];
    }
    let Some(old) = &message.old else {
        return vec![DdlOp::CreateTable {
            columns: message.new.clone(),
            key: message.key.clone(),
            key_name: message.primary_key.as_ref().map(|k| k.name.clone()),
            partition_of: message.partition.clone(),
            partition_by: message.partition_by.clone(),
        }];
    };
    let before: BTreeMap<i32, &DdlColumn> = old.iter().map(|c| (c.attnum, c)).collect();
    let after: BTreeMap<i32, &DdlColumn> = message.new.iter().map(|c| (c.attnum, c)).collect();
    let mut ops = Vec::new();
    // Generated columns first: one computed from a column dropped with it (`DROP COLUMN a
    // CASCADE`) would make the target refuse to drop that column first.
    let dropped = before
        .iter()
        .filter(|(attnum, _)| !after.contains_key(attnum));
    let (generated, plain): (Vec<_>, Vec<_>) = dropped.partition(|(_, c)| c.generated.is_some());
    for (_, c) in generated.into_iter().chain(plain) {
        ops.push(DdlOp::DropColumn {
            name: c.name.clone(),
        });
    }
    for (attnum, new) in &after {
        let Some(old) = before.get(attnum) else {
            continue;
        };
        if old.name != new.name {
            ops.push(DdlOp::RenameColumn {
                from: old.name.clone(),
                to: new.name.clone(),
            });
        }
        if old.type_name != new.type_name {
            ops.push(DdlOp::AlterColumnType {
                name: new.name.clone(),
                type_name: new.type_name.clone(),
                generated: new.generated.is_some(),
                from: Some(old.type_name.clone()),
            });
        }
        if old.not_null != new.not_null {
            ops.push(DdlOp::SetNotNull {
                name: new.name.clone(),
                not_null: new.not_null,
            });
        }
        if old.default != new.default {
            ops.push(DdlOp::SetDefault {
                name: new.name.clone(),
                default: new.default.clone(),
            });
        }
    }
    for (attnum, new) in &after {
        if !before.contains_key(attnum) {
            let existing = match &message.added {
                _ if new.default_copied() => None,
                _ if new.identity => Some(Existing::PerRow),
                Some(added) => Some(match added.get(attnum) {
                    Some(value) => Existing::Value(value.clone()),
                    None => Existing::PerRow,
                }),
                None => None,
            };
            ops.push(DdlOp::AddColumn {
                column: (*new).clone(),
                existing,
            });
        }
    }
    // After the renames and additions: an expression may name the new names. (A rename alone
    // changes how the source prints every expression that names the column; targets see
    // their own already changed alike, see `on_target`.)
    let expression = |c: &DdlColumn| c.generated.as_ref().map(|g| g.expression.clone());
    for (attnum, new) in &after {
        if let Some(old) = before.get(attnum) {
            if expression(old) != expression(new) {
                ops.push(DdlOp::SetExpression {
                    name: new.name.clone(),
                    expression: expression(new),
                });
            }
        }
    }
    let key_columns = |k: &Option<PrimaryKey>| k.as_ref().map(|k| k.columns.clone());
    if key_columns(&message.old_primary_key) != key_columns(&message.primary_key) {
        ops.push(DdlOp::SetPrimaryKey {
            drop: message.old_primary_key.clone(),
            add: message.primary_key.clone(),
        });
    }
    let (was, is) = (message.old_partition.as_ref(), message.partition.as_ref());
    if PartitionOf::moved(was, is) {
        if let Some(parent) = was {
            ops.push(DdlOp::DetachPartition {
                parent: parent.clone(),
            });
        }
        if let Some(parent) = is {
            ops.push(DdlOp::AttachPartition {
                parent: parent.clone(),
            });
        }
    }
    if message
        .old_table
        .as_deref()
        .is_some_and(|t| t != message.table)
    {
        ops.push(DdlOp::RenameTable {
            to: message.table.clone(),
        });
    }
    if message
        .old_schema
        .as_deref()
        .is_some_and(|s| s != message.schema)
    {
        ops.push(DdlOp::SetSchema {
            to: message.schema.clone(),
        });
    }
    ops
}

/// Whether a default expression is a constant pgferry may copy to targets: a quoted literal
/// (optionally cast to a type name), a number, or a boolean / NULL. Anything else (function
/// calls, volatile defaults) is not copied: the column is added without it.
pub fn is_constant_default(expr: &str) -> bool {
    let e = expr.trim();
    if e.eq_ignore_ascii_case("true")
        || e.eq_ignore_ascii_case("false")
        || e.eq_ignore_ascii_case("null")
    {
        return true;
    }
    let number = e.strip_prefix('-').unwrap_or(e);
    if !number.is_empty() && number.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return true;
    }
    // 'text' [::type]
    let Some(rest) = e.strip_prefix('\'') else {
        return false;
    };
    let mut chars = rest.char_indices().peekable();
    let mut end = None;
    while let Some((i, c)) = chars.next() {
        if c == '\'' {
            if chars.peek().map(|&(_, n)| n) == Some('\'') {
                chars.next();
            } else {
                end = Some(i + 1);
                break;
            }
        }
    }
    let Some(end) = end else { return false };
    let cast = &rest[end..];
    cast.is_empty()
        || cast.strip_prefix("::").is_some_and(|t| {
            !t.is_empty()
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || " _.\"[](),".contains(c))
                && !t.contains("--")
        })
}

/// A column definition: name, type, constant default or generation expression, NOT NULL. A
/// column whose default is not copied is added to an existing table without NOT NULL (the
/// target's existing rows would have no value); a new table (`new_table`) has no rows but
/// those the stream writes, each with its value, so it keeps NOT NULL (a `serial` key stays
/// NOT NULL).
fn column_sql(c: &DdlColumn, new_table: bool) -> String {
    let mut sql = format!("{} {}", quote_ident(&c.name), c.type_name);
    if let Some(g) = &c.generated {
        let kind = if g.is_virtual { "VIRTUAL" } else { "STORED" };
        sql.push_str(&format!(" GENERATED ALWAYS AS ({}) {kind}", g.expression));
    } else if let Some(d) = c.default.as_deref().filter(|d| is_constant_default(d)) {
        sql.push_str(&format!(" DEFAULT {d}"));
    }
    if c.not_null && (new_table || c.default_copied()) {
        sql.push_str(" NOT NULL");
    }
    sql
}

/// Whether a schema change gave the table's existing rows values a target cannot compute
/// from the ops: a column added with a volatile DEFAULT or as an identity
/// ([`Existing::PerRow`]), or a type changed by a command with a `USING` expression. Capture
/// then re-snapshots the table for replicas, so that theirs get the source's values.
pub fn rewrites_rows(message: &TriggerMessage, ops: &[DdlOp]) -> bool {
    ops.iter().any(|op| match op {
        DdlOp::AddColumn { existing, .. } => existing == &Some(Existing::PerRow),
        DdlOp::AlterColumnType { .. } => message.using,
        _ => false,
    })
}

/// A target table as [`on_target`] sees it: its columns with their types (as `format_type`
/// prints them, like the source's in a [`DdlColumn`]) and its primary key.
#[derive(Debug, Clone, Copy)]
pub struct TableShape<'a> {
    /// Column names.
    pub columns: &'a [String],
    /// Their types, by column.
    pub types: &'a [String],
    /// Primary-key columns, in key order.
    pub key: &'a [String],
    /// Generation expressions (`None`: a plain column), by column.
    pub expressions: &'a [Option<String>],
}

impl TableShape<'_> {
    fn type_of(&self, column: &str) -> Option<&str> {
        let i = self.columns.iter().position(|c| c == column)?;
        self.types.get(i).map(String::as_str)
    }

    /// The column's generation expression: `Some(None)` for a plain column, `None` for a
    /// column the table lacks.
    fn expression_of(&self, column: &str) -> Option<Option<&str>> {
        let i = self.columns.iter().position(|c| c == column)?;
        Some(self.expressions.get(i).and_then(Option::as_deref))
    }
}

/// What a target holds of one op, before it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnTarget {
    /// Run it.
    Apply,
    /// The target already is as the op makes it (the same change made there too: by hand on a
    /// replica, or on two multi-master nodes while they were apart): skipped.
    Already,
    /// The target holds something the op cannot turn into what the source has: refused with
    /// this reason, nothing changed.
    Differs(String),
}

/// Whether the target table (`None`: it does not exist) already is as `op` makes it. Only
/// what the table's shape shows for certain counts: a column already added with the same
/// type, already dropped, already renamed (the old name gone, the new one there), already of
/// the new type; a primary key already on the new columns; a table already there, or already
/// gone. A column the op adds that exists with another type is a difference, reported rather
/// than skipped (`ADD COLUMN IF NOT EXISTS` would leave the two schemas apart in silence).
/// Everything else runs as before, and fails as before where it cannot.
///
/// `moved`: where the column the op names, missing here, went in a rename or drop made here
/// that the op's node had not seen (`Some(None)` dropped, `Some(Some(name))` renamed), if so:
/// the op is then the first step of a migration both nodes ran while apart (add a column,
/// then rename or drop it; widen it, then rename it), already made here with the later steps.
/// A change the op's node had seen is a new column that reuses the name, and runs.
pub fn on_target(
    op: &DdlOp,
    table: Option<TableShape<'_>>,
    moved: Option<Option<&str>>,
) -> OnTarget {
    let Some(t) = table else {
        return match op {
            DdlOp::DropTable => OnTarget::Already,
            _ => OnTarget::Apply,
        };
    };
    let has = |c: &str| t.columns.iter().any(|x| x == c);
    // The op's column, missing here, is already here under its later name (or gone) with
    // this type.
    let moved_with = |name: &str, ty: &str| {
        !has(name)
            && match moved {
                Some(None) => true,
                Some(Some(to)) => t.type_of(to) == Some(ty),
                None => false,
            }
    };
    match op {
        // A table of the name is here: already made if it has the new table's columns (made
        // by hand, or on two nodes apart); otherwise it is another table (kept after the
        // source dropped its own, with apply.drop_tables off), and the new one cannot be made.
        DdlOp::CreateTable { columns, .. } => {
            let missing: Vec<String> = columns
                .iter()
                .filter(|c| t.type_of(&c.name) != Some(c.type_name.as_str()))
                .map(|c| format!("{} {}", c.name, c.type_name))
                .collect();
            if missing.is_empty() {
                OnTarget::Already
            } else {
                OnTarget::Differs(format!(
                    "a table of this name exists here without the new table's columns {} (kept \
                     after the source dropped its table, with apply.drop_tables off; created \
                     here too with other columns, on another multi-master node apart; or made \
                     by hand): make the two tables' columns agree, or drop or rename one, and \
                     the table resumes",
                    missing.join(", ")
                ))
            }
        }
        DdlOp::AddColumn { column, .. } if moved_with(&column.name, &column.type_name) => {
            OnTarget::Already
        }
        DdlOp::AlterColumnType {
            name, type_name, ..
        } if moved_with(name, type_name) => OnTarget::Already,
        DdlOp::AddColumn { column, .. } => match t.type_of(&column.name) {
            None => OnTarget::Apply,
            Some(ty) if ty == column.type_name => OnTarget::Already,
            Some(ty) => OnTarget::Differs(format!(
                "column {} exists here as {ty}, and this change adds it as {}: the schemas \
                 differ (the column added on two nodes at once, or by hand on the target); \
                 make them agree by hand",
                column.name, column.type_name
            )),
        },
        DdlOp::DropColumn { name } if !has(name) => OnTarget::Already,
        DdlOp::RenameColumn { from, to } if !has(from) && has(to) => OnTarget::Already,
        DdlOp::AlterColumnType {
            name, type_name, ..
        } if t.type_of(name) == Some(type_name) => OnTarget::Already,
        // Neither the type it had where the change was made nor the new one: the column was
        // given another type here meanwhile (on this node, or on a third whose change came
        // first). Running it would leave the nodes with different types, with no error.
        DdlOp::AlterColumnType {
            name,
            type_name,
            from: Some(from),
            ..
        } if t.type_of(name).is_some_and(|ty| ty != from) => OnTarget::Differs(format!(
            "column {name} is {} here, and this change retypes it from {from} to {type_name}: \
             the schemas differ (the column given other types on two nodes at once, or by hand \
             on the target); make them agree by hand",
            t.type_of(name).unwrap_or_default()
        )),
        DdlOp::SetPrimaryKey { add: Some(k), .. } if k.columns.as_slice() == t.key => {
            OnTarget::Already
        }
        DdlOp::SetPrimaryKey { add: None, .. } if t.key.is_empty() => OnTarget::Already,
        // A rename of a column the expression names changes how the source prints it, and
        // the target's own rename changed its expression alike: nothing to set (PostgreSQL
        // would rewrite the table).
        DdlOp::SetExpression { name, expression }
            if t.expression_of(name) == Some(expression.as_deref()) =>
        {
            OnTarget::Already
        }
        _ => OnTarget::Apply,
    }
}

/// For an `ALTER COLUMN … TYPE` whose cast the target refused (a value the plain cast cannot
/// take, where the source's `USING` computed one), when the source re-snapshots the table
/// after it: the same change with each value the cast refuses set to NULL
/// (`pgferry.cast_or_null`), for the re-snapshot to replace. `None` for other ops.
pub fn to_sql_lenient(schema: &str, table: &str, op: &DdlOp) -> Option<String> {
    let DdlOp::AlterColumnType {
        name,
        type_name,
        generated: false,
        ..
    } = op
    else {
        return None;
    };
    Some(format!(
        "ALTER TABLE {t} ALTER COLUMN {c} TYPE {type_name} \
         USING pgferry.cast_or_null({c}::text, {})::{type_name}",
        quote_literal(type_name),
        t = qualified(schema, table),
        c = quote_ident(name)
    ))
}

/// The SQL that applies `op` to `schema.table` on a target. Type names must have been checked
/// by the caller (see `apply::sql::is_safe_type_name`).
pub fn to_sql(schema: &str, table: &str, op: &DdlOp) -> String {
    let t = qualified(schema, table);
    match op {
        DdlOp::CreateTable {
            columns,
            key,
            key_name,
            partition_of,
            partition_by,
        } => {
            let mut sql = match partition_of {
                Some(p) => format!(
                    "CREATE TABLE IF NOT EXISTS {t} PARTITION OF {} {}",
                    qualified(&p.schema, &p.table),
                    p.bound
                ),
                None => {
                    let mut defs: Vec<String> =
                        columns.iter().map(|c| column_sql(c, true)).collect();
                    if !key.is_empty() {
                        let key: Vec<String> = key.iter().map(|k| quote_ident(k)).collect();
                        let name = key_name
                            .as_deref()
                            .map(|n| format!("CONSTRAINT {} ", quote_ident(n)))
                            .unwrap_or_default();
                        defs.push(format!("{name}PRIMARY KEY ({})", key.join(", ")));
                    }
                    format!("CREATE TABLE IF NOT EXISTS {t} ({})", defs.join(", "))
                }
            };
            if let Some(by) = partition_by {
                sql.push_str(&format!(" PARTITION BY {by}"));
            }
            sql
        }
        DdlOp::AddColumn {
            column,
            existing: Some(Existing::Value(value)),
        } => {
            // The value the source's rows got, as the column's DEFAULT for the ADD (so the
            // target's rows get it too), then dropped: the source's expression is not copied.
            let value = value.as_deref().map_or("NULL".to_owned(), quote_value);
            let mut sql = format!(
                "ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {} {} DEFAULT {value}::{}",
                quote_ident(&column.name),
                column.type_name,
                column.type_name
            );
            if column.not_null {
                sql.push_str(" NOT NULL");
            }
            sql.push_str(&format!(
                "; ALTER TABLE {t} ALTER COLUMN {} DROP DEFAULT",
                quote_ident(&column.name)
            ));
            sql
        }
        DdlOp::AddColumn { column, .. } => {
            format!(
                "ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {}",
                column_sql(column, false)
            )
        }
        DdlOp::DropColumn { name } => {
            format!(
                "ALTER TABLE {t} DROP COLUMN IF EXISTS {}",
                quote_ident(name)
            )
        }
        DdlOp::RenameColumn { from, to } => format!(
            "ALTER TABLE {t} RENAME COLUMN {} TO {}",
            quote_ident(from),
            quote_ident(to)
        ),
        DdlOp::AlterColumnType {
            name,
            type_name,
            generated: true,
            ..
        } => format!(
            "ALTER TABLE {t} ALTER COLUMN {} TYPE {type_name}",
            quote_ident(name)
        ),
        DdlOp::AlterColumnType {
            name, type_name, ..
        } => format!(
            "ALTER TABLE {t} ALTER COLUMN {c} TYPE {type_name} USING {c}::{type_name}",
            c = quote_ident(name)
        ),
        DdlOp::SetExpression { name, expression } => match expression {
            Some(e) => format!(
                "ALTER TABLE {t} ALTER COLUMN {} SET EXPRESSION AS ({e})",
                quote_ident(name)
            ),
            None => format!(
                "ALTER TABLE {t} ALTER COLUMN {} DROP EXPRESSION IF EXISTS",
                quote_ident(name)
            ),
        },
        DdlOp::SetDefault { name, default } => match default {
            Some(d) => format!(
                "ALTER TABLE {t} ALTER COLUMN {} SET DEFAULT {d}",
                quote_ident(name)
            ),
            None => format!(
                "ALTER TABLE {t} ALTER COLUMN {} DROP DEFAULT",
                quote_ident(name)
            ),
        },
        DdlOp::SetNotNull { name, not_null } => format!(
            "ALTER TABLE {t} ALTER COLUMN {} {} NOT NULL",
            quote_ident(name),
            if *not_null { "SET" } else { "DROP" }
        ),
        DdlOp::SetPrimaryKey { drop, add } => {
            let mut actions = Vec::new();
            if let Some(k) = drop {
                actions.push(format!(
                    "DROP CONSTRAINT IF EXISTS {}",
                    quote_ident(&k.name)
                ));
            }
            if let Some(k) = add {
                let columns: Vec<String> = k.columns.iter().map(|c| quote_ident(c)).collect();
                actions.push(format!(
                    "ADD CONSTRAINT {} PRIMARY KEY ({})",
                    quote_ident(&k.name),
                    columns.join(", ")
                ));
            }
            format!("ALTER TABLE {t} {}", actions.join(", "))
        }
        DdlOp::AttachPartition { parent } => format!(
            "ALTER TABLE {} ATTACH PARTITION {t} {}",
            qualified(&parent.schema, &parent.table),
            parent.bound
        ),
        DdlOp::DetachPartition { parent } => format!(
            "ALTER TABLE {} DETACH PARTITION {t}",
            qualified(&parent.schema, &parent.table)
        ),
        DdlOp::RenameTable { to } => format!("ALTER TABLE {t} RENAME TO {}", quote_ident(to)),
        DdlOp::SetSchema { to } => format!("ALTER TABLE {t} SET SCHEMA {}", quote_ident(to)),
        DdlOp::DropTable => format!("DROP TABLE IF EXISTS {t}"),
    }
}

/// Partition clauses an op copies into its statement (bounds, partition keys): the caller
/// checks them with [`is_safe_partition_clause`], as it checks type names.
pub fn partition_clauses(op: &DdlOp) -> Vec<&str> {
    match op {
        DdlOp::CreateTable {
            partition_of,
            partition_by,
            ..
        } => partition_of
            .iter()
            .map(|p| p.bound.as_str())
            .chain(partition_by.as_deref())
            .collect(),
        DdlOp::AttachPartition { parent } => vec![parent.bound.as_str()],
        _ => Vec::new(),
    }
}

/// The other table an op names: the parent of a partition it creates, attaches or detaches.
pub fn parent_table(op: &DdlOp) -> Option<&PartitionOf> {
    match op {
        DdlOp::CreateTable { partition_of, .. } => partition_of.as_ref(),
        DdlOp::AttachPartition { parent } | DdlOp::DetachPartition { parent } => Some(parent),
        _ => None,
    }
}

/// Whether a partition bound or key, as the source's server printed it, is one pgferry copies
/// into a target's statement: words, numbers, quoted literals (with a `::type` cast), quoted
/// identifiers, parentheses, commas and dots, and nothing else. No statement separator,
/// comment or operator can get through; a clause that needs one (a key expression such as
/// `(a + b)`) is refused, and the schema change dead-lettered with the reason.
pub fn is_safe_partition_clause(clause: &str) -> bool {
    let mut chars = clause.chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        any = true;
        match c {
            ' ' | '(' | ')' | ',' | '.' => {}
            '\'' => {
                if !quoted_literal(&mut chars, true) {
                    return false;
                }
                if chars.peek() == Some(&':') {
                    chars.next();
                    if chars.next() != Some(':') {
                        return false;
                    }
                    // A type name: words, spaces, dots, brackets, quoted parts (each closed).
                    while let Some(&t) = chars.peek() {
                        if t == '"' {
                            chars.next();
                            if !quoted_identifier(&mut chars) {
                                return false;
                            }
                        } else if t.is_ascii_alphanumeric() || " _.[]".contains(t) {
                            chars.next();
                        } else {
                            break;
                        }
                    }
                }
            }
            '"' => {
                if !quoted_identifier(&mut chars) {
                    return false;
                }
            }
            '-' if chars.peek().is_some_and(char::is_ascii_digit) => {}
            c if c.is_ascii_alphanumeric() || c == '_' => {}
            _ => return false,
        }
    }
    any
}

/// Reads a literal's rest, after its opening `'` (`''` is a quote inside it); `false` when it
/// is not closed, or holds a backslash and `backslash` does not allow one.
fn quoted_literal(chars: &mut std::iter::Peekable<std::str::Chars<'_>>, backslash: bool) -> bool {
    loop {
        match chars.next() {
            Some('\'') if chars.peek() == Some(&'\'') => {
                chars.next();
            }
            Some('\'') => return true,
            Some('\\') if !backslash => return false,
            Some(_) => {}
            None => return false,
        }
    }
}

/// Reads a quoted identifier's rest, after its opening `"` (`""` is a quote inside it);
/// `false` when it is not closed.
fn quoted_identifier(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> bool {
    loop {
        match chars.next() {
            Some('"') if chars.peek() == Some(&'"') => {
                chars.next();
            }
            Some('"') => return true,
            Some(_) => {}
            None => return false,
        }
    }
}

/// Generation expressions an op copies into its statement: the caller checks them with
/// [`is_safe_expression`], as it checks type names.
pub fn expressions(op: &DdlOp) -> Vec<&str> {
    fn of(c: &DdlColumn) -> Option<&str> {
        c.generated.as_ref().map(|g| g.expression.as_str())
    }
    match op {
        DdlOp::CreateTable { columns, .. } => columns.iter().filter_map(of).collect(),
        DdlOp::AddColumn { column, .. } => of(column).into_iter().collect(),
        DdlOp::SetExpression {
            expression: Some(e),
            ..
        } => vec![e.as_str()],
        _ => Vec::new(),
    }
}

/// Whether a generation expression from the stream stays one expression where [`to_sql`]
/// puts it, between `AS (` and `)`: its parentheses balance and never close more than they
/// opened, its literals and quoted identifiers are closed, and it has no statement separator,
/// comment, backslash (whose meaning in a literal depends on `standard_conforming_strings`)
/// or dollar sign (dollar quoting). `pg_get_expr` prints none of these outside literals and
/// quoted identifiers, where only the backslash matters; an expression that has one is
/// refused and the schema change dead-lettered with the reason.
pub fn is_safe_expression(expr: &str) -> bool {
    let mut chars = expr.chars().peekable();
    let mut depth = 0usize;
    let mut any = false;
    while let Some(c) = chars.next() {
        match c {
            '(' => depth += 1,
            ')' => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return false,
            },
            // Each reads its literal or identifier to the closing quote; an unclosed one (or a
            // backslash in a literal) refuses.
            '\'' if !quoted_literal(&mut chars, false) => return false,
            '"' if !quoted_identifier(&mut chars) => return false,
            ';' | '\\' | '$' => return false,
            '-' if chars.peek() == Some(&'-') => return false,
            '/' if chars.peek() == Some(&'*') => return false,
            c if c.is_control() && !c.is_whitespace() => return false,
            _ => {}
        }
        any |= !c.is_whitespace();
    }
    any && depth == 0
}

/// A default an op would set that targets do not copy: anything but a constant (see
/// [`is_constant_default`]), so that no expression from the stream runs on a target.
pub fn uncopied_default(op: &DdlOp) -> Option<&str> {
    match op {
        DdlOp::SetDefault {
            default: Some(d), ..
        } if !is_constant_default(d) => Some(d),
        _ => None,
    }
}

/// Type names an op asks the target to resolve.
pub fn type_names(op: &DdlOp) -> Vec<&str> {
    match op {
        DdlOp::CreateTable { columns, .. } => {
            columns.iter().map(|c| c.type_name.as_str()).collect()
        }
        DdlOp::AddColumn { column, .. } => vec![column.type_name.as_str()],
        DdlOp::AlterColumnType { type_name, .. } => vec![type_name.as_str()],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table of the model in [`ops_are_recognized_once_made`]: columns with types and
    /// generation expressions, key.
    #[derive(Debug, Clone)]
    struct Model {
        columns: Vec<String>,
        types: Vec<String>,
        key: Vec<String>,
        expressions: Vec<Option<String>>,
    }

    impl Model {
        fn new(columns: Vec<String>, types: Vec<String>, key: Vec<String>) -> Self {
            let expressions = vec![None; columns.len()];
            Model {
                columns,
                types,
                key,
                expressions,
            }
        }

        fn shape(&self) -> TableShape<'_> {
            TableShape {
                columns: &self.columns,
                types: &self.types,
                key: &self.key,
                expressions: &self.expressions,
            }
        }

        /// What the op does to the table, as PostgreSQL would.
        fn apply(&mut self, op: &DdlOp) {
            match op {
                DdlOp::AddColumn { column, .. } => {
                    self.columns.push(column.name.clone());
                    self.types.push(column.type_name.clone());
                    self.expressions
                        .push(column.generated.as_ref().map(|g| g.expression.clone()));
                }
                DdlOp::DropColumn { name } => {
                    let i = self.columns.iter().position(|c| c == name).unwrap();
                    self.columns.remove(i);
                    self.types.remove(i);
                    self.expressions.remove(i);
                    self.key.retain(|k| k != name);
                }
                DdlOp::SetExpression { name, expression } => {
                    let i = self.columns.iter().position(|c| c == name).unwrap();
                    self.expressions[i] = expression.clone();
                }
                DdlOp::RenameColumn { from, to } => {
                    for c in self.columns.iter_mut().chain(self.key.iter_mut()) {
                        if c == from {
                            *c = to.clone();
                        }
                    }
                }
                DdlOp::AlterColumnType {
                    name, type_name, ..
                } => {
                    let i = self.columns.iter().position(|c| c == name).unwrap();
                    self.types[i] = type_name.clone();
                }
                DdlOp::SetPrimaryKey { add, .. } => {
                    self.key = add.as_ref().map(|k| k.columns.clone()).unwrap_or_default();
                }
                _ => unreachable!("the model makes column and key changes only"),
            }
        }
    }

    const TYPES: [&str; 4] = ["integer", "bigint", "numeric(9,2)", "text"];

    /// A random table and a random column or key change that changes it.
    fn model_and_op() -> impl proptest::strategy::Strategy<Value = (Model, DdlOp)> {
        use proptest::prelude::*;
        (
            proptest::collection::btree_map("[a-e]", 0..TYPES.len(), 1..5),
            any::<u8>(),
            any::<u8>(),
            0..6u8,
            any::<u8>(),
        )
            .prop_map(|(columns, pick, ty, kind, generated)| {
                let (columns, types): (Vec<String>, Vec<String>) = columns
                    .into_iter()
                    .map(|(c, t)| (c, TYPES[t].to_owned()))
                    .unzip();
                let key = vec![columns[0].clone()];
                let mut model = Model::new(columns, types, key);
                // Some columns generated (bit i of `generated`), never the key.
                for (i, e) in model.expressions.iter_mut().enumerate().skip(1) {
                    if generated & (1 << i) != 0 {
                        *e = Some(format!("(a * {i})"));
                    }
                }
                let i = usize::from(pick) % model.columns.len();
                let name = model.columns[i].clone();
                let other_type = TYPES
                    .iter()
                    .find(|t| **t != model.types[i] && usize::from(ty) % 2 == 0)
                    .or_else(|| TYPES.iter().rev().find(|t| **t != model.types[i]))
                    .unwrap()
                    .to_string();
                let op = match kind {
                    0 => DdlOp::AddColumn {
                        column: DdlColumn {
                            attnum: 9,
                            name: format!("{name}_new"),
                            type_name: TYPES[usize::from(ty) % TYPES.len()].to_owned(),
                            not_null: false,
                            default: None,
                            identity: false,
                            generated: (ty % 3 == 0).then(|| Generated {
                                expression: "(a + 1)".into(),
                                is_virtual: false,
                            }),
                        },
                        existing: None,
                    },
                    1 => DdlOp::DropColumn { name },
                    5 => DdlOp::SetExpression {
                        expression: match &model.expressions[i] {
                            // Another expression, or none (DROP EXPRESSION).
                            Some(e) if ty % 2 == 0 => Some(format!("({e} + 1)")),
                            Some(_) => None,
                            None => Some("(a - 1)".into()),
                        },
                        name,
                    },
                    2 => DdlOp::RenameColumn {
                        to: format!("{name}_renamed"),
                        from: name,
                    },
                    3 => DdlOp::AlterColumnType {
                        from: Some(model.types[i].clone()),
                        name,
                        type_name: other_type,
                        generated: false,
                    },
                    _ => DdlOp::SetPrimaryKey {
                        drop: Some(PrimaryKey {
                            name: "t_pkey".into(),
                            columns: model.key.clone(),
                        }),
                        // Another key: on the column, on all of them, or none at all.
                        add: if model.key != [name.clone()] {
                            Some(PrimaryKey {
                                name: "t_pkey".into(),
                                columns: vec![name],
                            })
                        } else if model.columns.len() > 1 {
                            Some(PrimaryKey {
                                name: "t_pkey".into(),
                                columns: model.columns.clone(),
                            })
                        } else {
                            None
                        },
                    },
                };
                (model, op)
            })
    }

    proptest::proptest! {
        /// A column or key change is applied where the target is as the source was before it,
        /// and recognized as already made where the target is as the source is after it (the
        /// same change made there too), so making it twice changes nothing.
        #[test]
        fn ops_are_recognized_once_made((before, op) in model_and_op()) {
            proptest::prop_assert_eq!(on_target(&op, Some(before.shape()), None), OnTarget::Apply);
            let mut after = before.clone();
            after.apply(&op);
            proptest::prop_assert_eq!(on_target(&op, Some(after.shape()), None), OnTarget::Already);
        }
    }

    #[test]
    fn a_default_set_or_dropped_travels_and_only_a_constant_is_copied() {
        let with = |default: Option<&str>| DdlColumn {
            default: default.map(str::to_owned),
            ..col(2, "n", "integer")
        };
        let set = diff(&alter(vec![with(None)], vec![with(Some("5"))]));
        assert_eq!(
            set,
            [DdlOp::SetDefault {
                name: "n".into(),
                default: Some("5".into())
            }]
        );
        assert_eq!(
            to_sql("s", "t", &set[0]),
            r#"ALTER TABLE "s"."t" ALTER COLUMN "n" SET DEFAULT 5"#
        );
        assert_eq!(uncopied_default(&set[0]), None);
        let dropped = diff(&alter(vec![with(Some("5"))], vec![with(None)]));
        assert_eq!(
            to_sql("s", "t", &dropped[0]),
            r#"ALTER TABLE "s"."t" ALTER COLUMN "n" DROP DEFAULT"#
        );
        let clock = diff(&alter(vec![with(None)], vec![with(Some("now()"))]));
        assert_eq!(uncopied_default(&clock[0]), Some("now()"));
        // On the stream as `{"op":"set_default","name","default"}`.
        let json = serde_json::to_value(&set[0]).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"op": "set_default", "name": "n", "default": "5"})
        );
        // A rename keeps its default: no op for it.
        let renamed = DdlColumn {
            name: "m".into(),
            ..with(Some("5"))
        };
        assert_eq!(
            diff(&alter(vec![with(Some("5"))], vec![renamed])),
            [DdlOp::RenameColumn {
                from: "n".into(),
                to: "m".into()
            }]
        );
    }

    #[test]
    fn the_first_steps_of_a_migration_made_here_too_are_already_made() {
        let model = Model::new(
            vec!["id".into(), "m".into(), "w".into()],
            vec!["integer".into(), "integer".into(), "bigint".into()],
            vec!["id".into()],
        );
        let add = DdlOp::AddColumn {
            column: col(4, "n", "integer"),
            existing: None,
        };
        let on = |op: &DdlOp, moved| on_target(op, Some(model.shape()), moved);
        // Added, then renamed (or dropped) here, unseen by the op's node: already made.
        assert_eq!(on(&add, Some(Some("m"))), OnTarget::Already);
        assert_eq!(on(&add, Some(None)), OnTarget::Already);
        // Renamed to a column of another type (the op's is not that column), or not moved:
        // a column to add.
        assert_eq!(on(&add, Some(Some("w"))), OnTarget::Apply);
        assert_eq!(on(&add, None), OnTarget::Apply);
        // Widened, then renamed here.
        let widen = DdlOp::AlterColumnType {
            name: "c".into(),
            type_name: "bigint".into(),
            generated: false,
            from: Some("integer".into()),
        };
        assert_eq!(on(&widen, Some(Some("w"))), OnTarget::Already);
        assert_eq!(on(&widen, Some(Some("m"))), OnTarget::Apply);
        assert_eq!(on(&widen, None), OnTarget::Apply);
        // A column that is here is judged by what it is, wherever a name went.
        let add_m = DdlOp::AddColumn {
            column: col(4, "m", "integer"),
            existing: None,
        };
        assert_eq!(on(&add_m, Some(Some("w"))), OnTarget::Already);
    }

    /// A type change carries the type it replaced: a column that has neither (given another
    /// type here meanwhile) makes the schemas differ; one that has the old type takes it, one
    /// that has the new type has it already; a change without the old type (from an older
    /// version) runs as before.
    #[test]
    fn a_column_retyped_otherwise_here_makes_the_schemas_differ() {
        let model = Model::new(
            vec!["id".into(), "c".into()],
            vec!["integer".into(), "bigint".into()],
            vec!["id".into()],
        );
        let on = |op: &DdlOp| on_target(op, Some(model.shape()), None);
        let retype = |from: Option<&str>, to: &str| DdlOp::AlterColumnType {
            name: "c".into(),
            type_name: to.into(),
            generated: false,
            from: from.map(Into::into),
        };
        match on(&retype(Some("integer"), "text")) {
            OnTarget::Differs(why) => assert!(
                why.contains("column c is bigint here") && why.contains("from integer to text"),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(on(&retype(Some("bigint"), "text")), OnTarget::Apply);
        assert_eq!(on(&retype(Some("integer"), "bigint")), OnTarget::Already);
        assert_eq!(on(&retype(None, "text")), OnTarget::Apply);
    }

    /// A new table whose name a target already uses: already made when the target's table
    /// has its columns (with more of its own, or in another order), another table otherwise;
    /// and a new table keeps the NOT NULL of a column whose DEFAULT is not copied (`serial`),
    /// which an added column cannot.
    #[test]
    fn a_new_table_over_another_of_its_name_is_a_difference() {
        let model = Model::new(
            vec!["extra".into(), "id".into(), "v".into()],
            vec!["text".into(), "integer".into(), "text".into()],
            vec!["id".into()],
        );
        let create = |columns: Vec<DdlColumn>| DdlOp::CreateTable {
            columns,
            key: vec!["id".into()],
            key_name: None,
            partition_of: None,
            partition_by: None,
        };
        let same = create(vec![col(1, "id", "integer"), col(2, "v", "text")]);
        assert_eq!(
            on_target(&same, Some(model.shape()), None),
            OnTarget::Already
        );
        let other = create(vec![col(1, "id", "integer"), col(2, "v", "bigint")]);
        match on_target(&other, Some(model.shape()), None) {
            OnTarget::Differs(why) => assert!(why.contains("v bigint"), "{why}"),
            x => panic!("{x:?}"),
        }
        let serial = DdlColumn {
            not_null: true,
            default: Some("nextval('t_n_seq'::regclass)".into()),
            ..col(1, "n", "integer")
        };
        assert_eq!(
            to_sql("s", "t", &create(vec![serial.clone()])),
            r#"CREATE TABLE IF NOT EXISTS "s"."t" ("n" integer NOT NULL, PRIMARY KEY ("id"))"#
        );
        assert_eq!(
            to_sql(
                "s",
                "t",
                &DdlOp::AddColumn {
                    column: serial,
                    existing: Some(Existing::PerRow)
                }
            ),
            r#"ALTER TABLE "s"."t" ADD COLUMN IF NOT EXISTS "n" integer"#
        );
    }

    #[test]
    fn a_column_added_with_another_type_is_a_difference() {
        let model = Model::new(
            vec!["id".into(), "x".into()],
            vec!["integer".into(), "text".into()],
            vec!["id".into()],
        );
        let add = DdlOp::AddColumn {
            column: col(3, "x", "integer"),
            existing: None,
        };
        match on_target(&add, Some(model.shape()), None) {
            OnTarget::Differs(why) => assert!(
                why.contains("column x exists here as text") && why.contains("adds it as integer"),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
        // Missing tables: only a drop is already made; the rest runs (and fails as before).
        assert_eq!(on_target(&DdlOp::DropTable, None, None), OnTarget::Already);
        assert_eq!(on_target(&add, None, None), OnTarget::Apply);
        let create = DdlOp::CreateTable {
            columns: vec![col(1, "id", "integer")],
            key: vec!["id".into()],
            key_name: None,
            partition_of: None,
            partition_by: None,
        };
        assert_eq!(
            on_target(&create, Some(model.shape()), None),
            OnTarget::Already
        );
        assert_eq!(on_target(&create, None, None), OnTarget::Apply);
    }

    fn col(attnum: i32, name: &str, ty: &str) -> DdlColumn {
        DdlColumn {
            attnum,
            name: name.into(),
            type_name: ty.into(),
            not_null: false,
            default: None,
            identity: false,
            generated: None,
        }
    }

    fn alter(old: Vec<DdlColumn>, new: Vec<DdlColumn>) -> TriggerMessage {
        TriggerMessage {
            tag: "ALTER TABLE".into(),
            relid: Some(16384),
            schema: "public".into(),
            table: "t".into(),
            old_schema: Some("public".into()),
            old_table: Some("t".into()),
            old: Some(old),
            new,
            key: vec!["id".into()],
            old_partition: None,
            partition: None,
            partition_by: None,
            old_primary_key: None,
            primary_key: None,
            applied: BTreeMap::new(),
            added: None,
            using: false,
            persistence: None,
            settings: BTreeMap::new(),
        }
    }

    #[test]
    fn added_columns_say_what_existing_rows_got_when_the_default_is_not_copied() {
        let with_default = |attnum, name, default: &str| {
            let mut c = col(attnum, name, "timestamp with time zone");
            c.default = Some(default.into());
            c
        };
        let mut m = alter(
            vec![col(1, "id", "integer")],
            vec![
                col(1, "id", "integer"),
                with_default(2, "at", "now()"),
                with_default(3, "u", "gen_random_uuid()"),
                with_default(4, "k", "'2020-01-01'::timestamp with time zone"),
                col(5, "n", "integer"),
            ],
        );
        let existing = |m: &TriggerMessage| -> Vec<Option<Existing>> {
            diff(m)
                .into_iter()
                .map(|op| match op {
                    DdlOp::AddColumn { existing, .. } => existing,
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        // A trigger that does not say: nothing is claimed.
        assert_eq!(existing(&m), vec![None, None, None, None]);
        let at = "2026-12-06 03:50:00+00";
        m.added = Some(BTreeMap::from([
            (2, Some(at.to_owned())),
            (4, Some("2020-01-01 00:00:00+00".to_owned())),
            (5, None),
        ]));
        // Copied defaults (a constant, none) need nothing; now() got one value, the volatile
        // default one per row.
        assert_eq!(
            existing(&m),
            vec![
                Some(Existing::Value(Some(at.to_owned()))),
                Some(Existing::PerRow),
                None,
                None
            ]
        );
        // Written as the ADD's default, then dropped; quotes and backslashes stay values.
        let mut c = with_default(2, "at", "now()");
        c.not_null = true;
        let add = |c: &DdlColumn, value: Option<&str>| {
            to_sql(
                "s",
                "t",
                &DdlOp::AddColumn {
                    column: c.clone(),
                    existing: Some(Existing::Value(value.map(str::to_owned))),
                },
            )
        };
        assert_eq!(
            add(&c, Some(at)),
            format!(
                r#"ALTER TABLE "s"."t" ADD COLUMN IF NOT EXISTS "at" timestamp with time zone DEFAULT E'{at}'::timestamp with time zone NOT NULL; ALTER TABLE "s"."t" ALTER COLUMN "at" DROP DEFAULT"#
            )
        );
        c.not_null = false;
        c.type_name = "text".into();
        assert_eq!(
            add(&c, Some(r"it's \x'; DROP TABLE t; --")),
            r#"ALTER TABLE "s"."t" ADD COLUMN IF NOT EXISTS "at" text DEFAULT E'it''s \\x''; DROP TABLE t; --'::text; ALTER TABLE "s"."t" ALTER COLUMN "at" DROP DEFAULT"#
        );
        assert!(add(&c, None).contains("DEFAULT NULL::text;"));
    }

    #[test]
    fn rows_a_target_cannot_compute_ask_for_a_snapshot() {
        let mut identity = col(2, "i", "integer");
        identity.identity = true;
        identity.not_null = true;
        let mut m = alter(
            vec![col(1, "id", "integer")],
            vec![col(1, "id", "integer"), identity],
        );
        m.added = Some(BTreeMap::new());
        let ops = diff(&m);
        // An identity is added as a plain column: the target's rows are filled by the snapshot.
        assert_eq!(
            to_sql("s", "t", &ops[0]),
            r#"ALTER TABLE "s"."t" ADD COLUMN IF NOT EXISTS "i" integer"#
        );
        assert!(rewrites_rows(&m, &ops));
        // A constant default: the target computes the same.
        let mut constant = col(2, "c", "integer");
        constant.default = Some("7".into());
        let m = alter(
            vec![col(1, "id", "integer")],
            vec![col(1, "id", "integer"), constant],
        );
        assert!(!rewrites_rows(&m, &diff(&m)));
        // A type change: only with USING.
        let mut m = alter(vec![col(1, "id", "integer")], vec![col(1, "id", "bigint")]);
        assert!(!rewrites_rows(&m, &diff(&m)));
        m.using = true;
        assert!(rewrites_rows(&m, &diff(&m)));
    }

    #[test]
    fn the_trigger_message_says_what_its_node_had_applied() {
        let with: TriggerMessage = serde_json::from_str(
            r#"{"tag":"ALTER TABLE","schema":"public","table":"t","applied":{"b":"0/1A2B4F0","c":"1/0"}}"#,
        )
        .expect("parses");
        assert_eq!(
            with.applied.into_iter().collect::<Vec<_>>(),
            vec![
                ("b".to_owned(), Lsn(0x1A2B4F0)),
                ("c".to_owned(), Lsn(1 << 32))
            ]
        );
        // A trigger installed before this version writes none: nothing to wait for.
        let without: TriggerMessage =
            serde_json::from_str(r#"{"tag":"DROP TABLE","schema":"public","table":"t"}"#)
                .expect("parses");
        assert!(without.applied.is_empty());
        // A malformed position is not taken for no position.
        assert!(serde_json::from_str::<TriggerMessage>(
            r#"{"tag":"ALTER TABLE","schema":"public","table":"t","applied":{"b":"zz"}}"#
        )
        .is_err());
    }

    #[test]
    fn columns_are_matched_by_attnum() {
        let old = vec![
            col(1, "id", "bigint"),
            col(2, "a", "integer"),
            col(3, "b", "text"),
            col(4, "c", "text"),
        ];
        let mut c = col(4, "c", "text");
        c.not_null = true;
        let new = vec![
            col(1, "id", "bigint"),
            col(2, "a2", "bigint"),
            c,
            col(5, "b", "text"),
        ];
        assert_eq!(
            diff(&alter(old, new)),
            vec![
                DdlOp::DropColumn { name: "b".into() },
                DdlOp::RenameColumn {
                    from: "a".into(),
                    to: "a2".into()
                },
                DdlOp::AlterColumnType {
                    name: "a2".into(),
                    type_name: "bigint".into(),
                    generated: false,
                    from: Some("integer".into()),
                },
                DdlOp::SetNotNull {
                    name: "c".into(),
                    not_null: true
                },
                DdlOp::AddColumn {
                    column: col(5, "b", "text"),
                    existing: None,
                },
            ]
        );
    }

    #[test]
    fn new_dropped_and_renamed_tables() {
        let mut m = alter(vec![], vec![col(1, "id", "int")]);
        m.old = None;
        m.tag = "CREATE TABLE".into();
        assert!(matches!(diff(&m)[..], [DdlOp::CreateTable { .. }]));
        m.tag = "DROP TABLE".into();
        assert_eq!(diff(&m), vec![DdlOp::DropTable]);
        let mut r = alter(vec![col(1, "id", "int")], vec![col(1, "id", "int")]);
        r.table = "t2".into();
        assert_eq!(diff(&r), vec![DdlOp::RenameTable { to: "t2".into() }]);
        assert!(diff(&alter(vec![col(1, "id", "int")], vec![col(1, "id", "int")])).is_empty());
    }

    #[test]
    fn only_constant_defaults_are_copied() {
        for ok in [
            "0",
            "-1.5",
            "true",
            "NULL",
            "'x'::text",
            "'it''s'::character varying",
            "'{}'::jsonb",
            "'2026-01-01'::date",
        ] {
            assert!(is_constant_default(ok), "{ok}");
        }
        for no in [
            "now()",
            "nextval('s'::regclass)",
            "'x'::text || current_user",
            "random()",
            "'x'; DROP TABLE t; --",
            "'x'::text; select 1",
            "1 + 1",
        ] {
            assert!(!is_constant_default(no), "{no}");
        }
        let mut c = col(3, "n", "integer");
        c.default = Some("now()".into());
        c.not_null = true;
        assert_eq!(
            to_sql(
                "s",
                "t",
                &DdlOp::AddColumn {
                    column: c.clone(),
                    existing: None,
                }
            ),
            r#"ALTER TABLE "s"."t" ADD COLUMN IF NOT EXISTS "n" integer"#
        );
        c.default = Some("7".into());
        assert_eq!(
            to_sql(
                "s",
                "t",
                &DdlOp::AddColumn {
                    column: c,
                    existing: None,
                }
            ),
            r#"ALTER TABLE "s"."t" ADD COLUMN IF NOT EXISTS "n" integer DEFAULT 7 NOT NULL"#
        );
    }

    #[test]
    fn statements_quote_names() {
        assert_eq!(
            to_sql(
                "s",
                "t",
                &DdlOp::AlterColumnType {
                    name: "we\"ird".into(),
                    type_name: "bigint".into(),
                    generated: false,
                    from: None,
                }
            ),
            r#"ALTER TABLE "s"."t" ALTER COLUMN "we""ird" TYPE bigint USING "we""ird"::bigint"#
        );
        assert_eq!(
            to_sql(
                "s",
                "t",
                &DdlOp::CreateTable {
                    columns: vec![col(1, "id", "int"), col(2, "v", "text")],
                    key: vec!["id".into()],
                    key_name: None,
                    partition_of: None,
                    partition_by: None,
                }
            ),
            r#"CREATE TABLE IF NOT EXISTS "s"."t" ("id" int, "v" text, PRIMARY KEY ("id"))"#
        );
        let mut created = alter(vec![], vec![col(1, "id", "int")]);
        created.old = None;
        created.primary_key = Some(PrimaryKey {
            name: "my \"pk\"".into(),
            columns: vec!["id".into()],
        });
        assert_eq!(
            to_sql("s", "t", &diff(&created)[0]),
            r#"CREATE TABLE IF NOT EXISTS "s"."t" ("id" int, CONSTRAINT "my ""pk""" PRIMARY KEY ("id"))"#
        );
    }

    fn part(relid: u32, table: &str, bound: &str) -> PartitionOf {
        PartitionOf {
            relid: Some(relid),
            schema: "public".into(),
            table: table.into(),
            bound: bound.into(),
        }
    }

    #[test]
    fn partitions_are_created_attached_and_detached() {
        let range = "FOR VALUES FROM (200) TO (300)";
        // CREATE TABLE ev_3 PARTITION OF ev …: the parent's columns, created under it.
        let mut m = alter(vec![], vec![col(1, "id", "int")]);
        m.old = None;
        m.tag = "CREATE TABLE".into();
        m.partition = Some(part(7, "ev", range));
        let ops = diff(&m);
        assert_eq!(
            to_sql("public", "ev_3", &ops[0]),
            r#"CREATE TABLE IF NOT EXISTS "public"."ev_3" PARTITION OF "public"."ev" FOR VALUES FROM (200) TO (300)"#
        );
        assert_eq!(partition_clauses(&ops[0]), vec![range]);
        assert_eq!(parent_table(&ops[0]).map(|p| p.table.as_str()), Some("ev"));
        // A partitioned table: its columns and key, then its partition key.
        m.partition = None;
        m.partition_by = Some("RANGE (at)".into());
        assert_eq!(
            to_sql("public", "ev", &diff(&m)[0]),
            r#"CREATE TABLE IF NOT EXISTS "public"."ev" ("id" int, PRIMARY KEY ("id")) PARTITION BY RANGE (at)"#
        );
        // A partition of a partitioned table that is itself partitioned.
        m.partition = Some(part(7, "ev", range));
        assert!(
            to_sql("public", "ev_3", &diff(&m)[0]).ends_with(" TO (300) PARTITION BY RANGE (at)")
        );
        // ATTACH, DETACH, and a move to another bound: detach first, then attach.
        let same = vec![col(1, "id", "int")];
        let mut a = alter(same.clone(), same.clone());
        a.partition = Some(part(7, "ev", range));
        let attach = diff(&a);
        assert_eq!(
            attach,
            vec![DdlOp::AttachPartition {
                parent: part(7, "ev", range)
            }]
        );
        assert_eq!(
            to_sql("public", "t", &attach[0]),
            r#"ALTER TABLE "public"."ev" ATTACH PARTITION "public"."t" FOR VALUES FROM (200) TO (300)"#
        );
        let mut d = alter(same.clone(), same.clone());
        d.old_partition = Some(part(7, "ev", range));
        assert_eq!(
            to_sql("public", "t", &diff(&d)[0]),
            r#"ALTER TABLE "public"."ev" DETACH PARTITION "public"."t""#
        );
        let mut moved = d.clone();
        moved.partition = Some(part(7, "ev", "DEFAULT"));
        assert!(matches!(
            diff(&moved)[..],
            [DdlOp::DetachPartition { .. }, DdlOp::AttachPartition { .. }]
        ));
        // The parent renamed: the same parent (by oid) under a new name moves nothing.
        // Moved to another schema.
        let mut moved_schema = alter(same.clone(), same.clone());
        moved_schema.schema = "archive".into();
        let ops = diff(&moved_schema);
        assert_eq!(
            ops,
            vec![DdlOp::SetSchema {
                to: "archive".into()
            }]
        );
        assert_eq!(
            to_sql("public", "t", &ops[0]),
            r#"ALTER TABLE "public"."t" SET SCHEMA "archive""#
        );
        // A primary key added, then changed: drop the old constraint, add the new one.
        let pk = |name: &str, columns: &[&str]| PrimaryKey {
            name: name.into(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
        };
        let mut keyed = alter(same.clone(), same.clone());
        keyed.primary_key = Some(pk("t_pkey", &["id"]));
        assert_eq!(
            to_sql("public", "t", &diff(&keyed)[0]),
            r#"ALTER TABLE "public"."t" ADD CONSTRAINT "t_pkey" PRIMARY KEY ("id")"#
        );
        keyed.old_primary_key = Some(pk("t_pkey", &["id"]));
        keyed.primary_key = Some(pk("t_key2", &["id", "v"]));
        assert_eq!(
            to_sql("public", "t", &diff(&keyed)[0]),
            r#"ALTER TABLE "public"."t" DROP CONSTRAINT IF EXISTS "t_pkey", ADD CONSTRAINT "t_key2" PRIMARY KEY ("id", "v")"#
        );
        keyed.primary_key = None;
        assert_eq!(
            to_sql("public", "t", &diff(&keyed)[0]),
            r#"ALTER TABLE "public"."t" DROP CONSTRAINT IF EXISTS "t_pkey""#
        );
        // Only the constraint's name changed: nothing to do.
        keyed.primary_key = Some(pk("renamed", &["id"]));
        assert!(diff(&keyed).is_empty());
        let mut renamed_parent = d;
        renamed_parent.partition = Some(part(7, "events", range));
        assert!(diff(&renamed_parent).is_empty());
    }

    /// Generated columns travel with their expression as the trigger reports them (the
    /// expression, not a default): created, added, retyped (without `USING`, which
    /// PostgreSQL refuses for them), given another expression, made plain.
    #[test]
    fn generated_columns_travel_with_their_expression() {
        let created: TriggerMessage = serde_json::from_str(
            r#"{"tag":"CREATE TABLE","schema":"s","table":"t","key":["id"],"new":[
                {"attnum":1,"name":"id","type":"integer","not_null":true,"default":null},
                {"attnum":2,"name":"twice","type":"bigint","not_null":false,"default":null,
                 "generated":{"expression":"(id * 2)","virtual":false}},
                {"attnum":3,"name":"v","type":"text","not_null":true,"default":null,
                 "generated":{"expression":"('it''s '::text || (id)::text)","virtual":true}}]}"#,
        )
        .unwrap();
        let ops = diff(&created);
        assert_eq!(
            to_sql("s", "t", &ops[0]),
            r#"CREATE TABLE IF NOT EXISTS "s"."t" ("id" integer NOT NULL, "twice" bigint GENERATED ALWAYS AS ((id * 2)) STORED, "v" text GENERATED ALWAYS AS (('it''s '::text || (id)::text)) VIRTUAL NOT NULL, PRIMARY KEY ("id"))"#
        );
        assert_eq!(
            expressions(&ops[0]),
            vec!["(id * 2)", "('it''s '::text || (id)::text)"]
        );
        let generated = |attnum, name: &str, ty: &str, expr: &str| {
            let mut c = col(attnum, name, ty);
            c.generated = Some(Generated {
                expression: expr.into(),
                is_virtual: false,
            });
            c
        };
        let id = col(1, "id", "integer");
        // Added: computed by the target, so no value of existing rows is claimed.
        let mut m = alter(
            vec![id.clone()],
            vec![id.clone(), generated(2, "g", "integer", "(id + 1)")],
        );
        m.added = Some(BTreeMap::new());
        let ops = diff(&m);
        assert_eq!(
            ops,
            vec![DdlOp::AddColumn {
                column: generated(2, "g", "integer", "(id + 1)"),
                existing: None
            }]
        );
        assert!(!rewrites_rows(&m, &ops));
        assert_eq!(
            to_sql("s", "t", &ops[0]),
            r#"ALTER TABLE "s"."t" ADD COLUMN IF NOT EXISTS "g" integer GENERATED ALWAYS AS ((id + 1)) STORED"#
        );
        // `DROP COLUMN a CASCADE` drops a column computed from `a` too: that one goes first,
        // or the target refuses to drop `a`.
        let (a, z) = (col(2, "a", "integer"), col(4, "z", "text"));
        let m = alter(
            vec![
                id.clone(),
                a,
                generated(3, "g", "integer", "(a * 2)"),
                z.clone(),
            ],
            vec![id.clone(), z],
        );
        assert_eq!(
            diff(&m),
            vec![
                DdlOp::DropColumn { name: "g".into() },
                DdlOp::DropColumn { name: "a".into() }
            ]
        );
        // Retyped, with a new expression.
        let m = alter(
            vec![id.clone(), generated(2, "g", "integer", "(id + 1)")],
            vec![id.clone(), generated(2, "g", "bigint", "(id + 2)")],
        );
        let ops = diff(&m);
        let sql: Vec<String> = ops.iter().map(|op| to_sql("s", "t", op)).collect();
        assert_eq!(
            sql,
            vec![
                r#"ALTER TABLE "s"."t" ALTER COLUMN "g" TYPE bigint"#,
                r#"ALTER TABLE "s"."t" ALTER COLUMN "g" SET EXPRESSION AS ((id + 2))"#,
            ]
        );
        assert_eq!(expressions(&ops[1]), vec!["(id + 2)"]);
        // DROP EXPRESSION: a plain column keeping its values; nothing to compute.
        let m = alter(
            vec![id.clone(), generated(2, "g", "bigint", "(id + 2)")],
            vec![id.clone(), col(2, "g", "bigint")],
        );
        let ops = diff(&m);
        assert_eq!(
            ops.iter()
                .map(|op| to_sql("s", "t", op))
                .collect::<Vec<_>>(),
            vec![r#"ALTER TABLE "s"."t" ALTER COLUMN "g" DROP EXPRESSION IF EXISTS"#]
        );
        assert!(expressions(&ops[0]).is_empty());
        // A rename of a column the expression names: the source prints the expression anew,
        // after the rename; a target whose own rename changed it alike has nothing to set.
        let m = alter(
            vec![
                col(1, "id", "integer"),
                generated(2, "g", "bigint", "(x * 2)"),
                col(3, "x", "integer"),
            ],
            vec![
                col(1, "id", "integer"),
                generated(2, "g", "bigint", "(y * 2)"),
                col(3, "y", "integer"),
            ],
        );
        let ops = diff(&m);
        assert_eq!(
            ops,
            vec![
                DdlOp::RenameColumn {
                    from: "x".into(),
                    to: "y".into()
                },
                DdlOp::SetExpression {
                    name: "g".into(),
                    expression: Some("(y * 2)".into())
                }
            ]
        );
        let columns = ["id".to_owned(), "g".to_owned(), "y".to_owned()];
        let types = [
            "integer".to_owned(),
            "bigint".to_owned(),
            "integer".to_owned(),
        ];
        let shape = |expr: &str| {
            on_target(
                &ops[1],
                Some(TableShape {
                    columns: &columns,
                    types: &types,
                    key: &columns[..1],
                    expressions: &[None, Some(expr.to_owned()), None],
                }),
                None,
            )
        };
        assert_eq!(shape("(y * 2)"), OnTarget::Already);
        assert_eq!(shape("(y * 3)"), OnTarget::Apply);
        // A plain column's type change keeps its USING.
        let m = alter(
            vec![id.clone(), col(2, "n", "integer")],
            vec![id, col(2, "n", "bigint")],
        );
        assert_eq!(
            to_sql("s", "t", &diff(&m)[0]),
            r#"ALTER TABLE "s"."t" ALTER COLUMN "n" TYPE bigint USING "n"::bigint"#
        );
    }

    #[test]
    fn generation_expressions_pgferry_copies() {
        for ok in [
            "(id * 2)",
            "((('x'::text || (a)::text) || '\n'::text) || 'it''s'::text)",
            "to_tsvector('english'::regconfig, (title || ' '::text) || body)",
            "CASE WHEN (n > 0) THEN 'a;b'::text ELSE \"Odd)Name\" END",
            "(a -> 'k'::text) ->> 'x'::text",
            "lower(\"naïve\")",
            "(a / b)",
        ] {
            assert!(is_safe_expression(ok), "{ok}");
        }
        for no in [
            "",
            "   ",
            "(1)) STORED, ADD COLUMN x int GENERATED ALWAYS AS ((1)",
            "1); DROP TABLE t; --",
            "1 -- hidden",
            "1 /* hidden */",
            "'unterminated",
            "\"unterminated",
            "E'\\''",
            "$$x$$",
            "(1",
            "a\u{0}b",
        ] {
            assert!(!is_safe_expression(no), "{no:?}");
        }
    }

    #[test]
    fn partition_clauses_pgferry_copies() {
        for ok in [
            "FOR VALUES FROM (200) TO (300)",
            "FOR VALUES FROM (MINVALUE) TO ('2026-01-01')",
            "FOR VALUES FROM ('2026-01-01 00:00:00+00'::timestamp with time zone) TO (MAXVALUE)",
            "FOR VALUES IN ('a', 'it''s', NULL)",
            "FOR VALUES IN (-1, 2.5)",
            "FOR VALUES WITH (modulus 4, remainder 0)",
            "DEFAULT",
            "RANGE (at)",
            "LIST (\"Region\", lower(name))",
            "HASH (id)",
        ] {
            assert!(is_safe_partition_clause(ok), "{ok}");
        }
        for no in [
            "",
            "FOR VALUES IN (1); DROP TABLE t",
            "FOR VALUES IN (1) -- x",
            "FOR VALUES IN (1) /* x */",
            "FOR VALUES IN ('unterminated)",
            "RANGE ((a + b))",
            "FOR VALUES IN ('x'::text; DROP TABLE t)",
            "FOR VALUES IN ($1)",
            "FOR VALUES IN ('a'::\")",
        ] {
            assert!(!is_safe_partition_clause(no), "{no}");
        }
    }

    /// `text` with each quoted literal and identifier replaced by `q` (`''` and `""` inside
    /// them are quotes), whether every quote closed, and whether a literal held a backslash.
    fn outside_quotes(text: &str) -> (String, bool, bool) {
        let mut bare = String::new();
        let mut quote: Option<char> = None;
        let mut backslash = false;
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match quote {
                Some(q) if c == q && chars.peek() == Some(&q) => {
                    chars.next();
                }
                Some(q) if c == q => quote = None,
                Some(q) => backslash |= q == '\'' && c == '\\',
                None if c == '\'' || c == '"' => {
                    quote = Some(c);
                    bare.push('q');
                }
                None => bare.push(c),
            }
        }
        (bare, quote.is_none(), backslash)
    }

    proptest::proptest! {
        /// Whatever the stream sends, an accepted generation expression stays one expression
        /// between the parentheses it is put in: outside its quoted literals and
        /// identifiers, no `;`, comment, `$` or backslash, parentheses balanced and never
        /// closing more than they opened; no backslash inside its literals either (inside a
        /// quoted identifier, one is only a character).
        #[test]
        fn accepted_expressions_stay_inside_their_parentheses(
            tokens in proptest::collection::vec(
                proptest::sample::select(vec![
                    "(", ")", "'", "''", "'a'", "\"", "\"x)y\"", "a", " ", "+", "-", "*", "/",
                    ";", "--", "/*", "*/", "$", "\\", "::text", ",", "E", "\n",
                ]),
                1..12,
            )
        ) {
            let expr = tokens.concat();
            if is_safe_expression(&expr) {
                // An independent reading: blank out quoted parts, then follow the
                // parentheses of the rest.
                let (bare, closed, backslash) = outside_quotes(&expr);
                proptest::prop_assert!(closed, "unclosed quote in {expr:?}");
                proptest::prop_assert!(!backslash, "a backslash in a literal of {expr:?}");
                for bad in [";", "--", "/*", "$", "\\"] {
                    proptest::prop_assert!(!bare.contains(bad), "{expr:?}");
                }
                let mut depth = 0i64;
                for c in bare.chars() {
                    depth += match c { '(' => 1, ')' => -1, _ => 0 };
                    proptest::prop_assert!(depth >= 0, "closes more than it opens: {expr:?}");
                }
                proptest::prop_assert_eq!(depth, 0, "{:?}", expr);
            }
        }

        /// Whatever the stream sends, an accepted partition clause holds nothing that could
        /// end the statement or hide the rest of it: outside its quoted literals and
        /// identifiers, no `;`, no comment, no operator, and every quote is closed.
        #[test]
        fn accepted_partition_clauses_cannot_carry_sql(
            tokens in proptest::collection::vec(
                proptest::sample::select(vec![
                    "FOR", "VALUES", "FROM", "TO", "IN", "(", ")", ",", " ", "'a'", "'", "''",
                    "\"", "\"x;y\"", "::", "::text", ";", "--", "/*", "-", "1", "+", "$1", ".",
                    "MINVALUE", "DROP", "TABLE",
                ]),
                1..10,
            )
        ) {
            let clause = tokens.concat();
            if is_safe_partition_clause(&clause) {
                // An independent reading: blank out quoted parts ('' and "" inside them).
                let (bare, closed, _) = outside_quotes(&clause);
                proptest::prop_assert!(closed, "unclosed quote in {clause:?}");
                for bad in [";", "--", "/*", "+", "$"] {
                    proptest::prop_assert!(!bare.contains(bad), "{clause:?}");
                }
            }
        }
    }
}

//! `pgferry roles`: the SQL that gives the roles named in a config exactly what pgferry needs,
//! and no superuser. Pure: it reads the config and returns text for an administrator to run
//! (`pgferry roles --config f.yaml | psql -U postgres`); `pgferry check` verifies the result.
//!
//! What each role needs, on PostgreSQL 15 and later:
//! - capture (the `source.url` user): `LOGIN REPLICATION` (the slot and the walsender),
//!   `BYPASSRLS` (a snapshot reads every row, as the stream sends every row's changes),
//!   `SELECT` on the published tables (the initial snapshot; `pg_read_all_data` for a `FOR ALL
//!   TABLES` publication, whose tables created later are snapshotted too), and the `pgferry` schema, owned
//!   by it. The publication is created here by the administrator: `FOR ALL TABLES` needs a
//!   superuser and `FOR TABLE` the tables' owner, so pgferry never creates it with less.
//! - apply (each `apply.targets[].url` user): `SET` on `session_replication_role` (granted
//!   per parameter since PostgreSQL 15: user triggers and foreign keys do not fire for applied
//!   rows, as in native subscriptions), `EXECUTE` on the `pg_replication_origin_*` functions
//!   (every overload the server has), `SELECT, INSERT, UPDATE, DELETE, TRUNCATE` on the applied
//!   tables, and the `pgferry` schema, owned by it.
//! - schema changes (`source.capture_ddl`): the event triggers, which only a superuser may
//!   create; the script installs them (their functions run as their owner, so any role's DDL
//!   is captured), and capture finds them in place.
//! - multi-master nodes install triggers on their replicated tables, which PostgreSQL allows
//!   only to the tables' owner: the node's role must own them (`ALTER TABLE … OWNER TO`).
//!
//! No password is printed: set one with `\password <role>` or use client certificates.

use std::fmt::Write;

use crate::config::{ApplyMode, Config, PgUrl};
use crate::sql::{quote_ident, quote_literal};

/// The tables a section grants on: a list, or every table in the user schemas.
enum Tables<'a> {
    Listed(&'a [String]),
    All,
}

fn user(url: &PgUrl) -> &str {
    url.config().get_user().unwrap_or("postgres")
}

fn header(out: &mut String, url: &PgUrl, what: &str) {
    let _ = writeln!(
        out,
        "\n-- {what}: {} as role {}\n\\connect {}",
        url.display_target(),
        quote_ident(user(url)),
        quote_ident(url.dbname())
    );
}

fn create_role(out: &mut String, role: &str, attributes: &str) {
    let _ = writeln!(
        out,
        "DO $$ BEGIN CREATE ROLE {r} {attributes}; \
         EXCEPTION WHEN duplicate_object THEN ALTER ROLE {r} {attributes}; END $$;",
        r = quote_ident(role)
    );
}

fn own_schema(out: &mut String, url: &PgUrl, role: &str) {
    let r = quote_ident(role);
    let _ = writeln!(
        out,
        "GRANT CONNECT ON DATABASE {} TO {r};\n\
         CREATE SCHEMA IF NOT EXISTS pgferry AUTHORIZATION {r};\n\
         ALTER SCHEMA pgferry OWNER TO {r};",
        quote_ident(url.dbname())
    );
}

/// `GRANT <privileges>` on the tables, with `USAGE` on their schemas.
fn grant_tables(out: &mut String, tables: &Tables<'_>, privileges: &str, role: &str) {
    let r = quote_ident(role);
    match tables {
        Tables::Listed(list) => {
            for table in list.iter() {
                let Some((schema, name)) = table.split_once('.') else {
                    continue;
                };
                let _ = writeln!(
                    out,
                    "GRANT USAGE ON SCHEMA {s} TO {r};\nGRANT {privileges} ON {s}.{t} TO {r};",
                    s = quote_ident(schema),
                    t = quote_ident(name)
                );
            }
        }
        Tables::All => {
            let _ = writeln!(
                out,
                "DO $$ DECLARE s name; BEGIN\n  \
                 FOR s IN SELECT nspname FROM pg_namespace WHERE {schemas} LOOP\n    \
                 EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', s, {l});\n    \
                 EXECUTE format('GRANT {privileges} ON ALL TABLES IN SCHEMA %I TO %I', s, {l});\n  \
                 END LOOP;\nEND $$;\n\
                 -- Tables created later need the same grant (or ALTER DEFAULT PRIVILEGES).",
                l = quote_literal(role),
                schemas = crate::apply::admit::USER_SCHEMA_SQL
            );
        }
    }
}

fn capture_section(out: &mut String, config: &Config) {
    let Some(source) = &config.source else {
        return;
    };
    let role = user(&source.url);
    header(out, &source.url, "capture on the source");
    create_role(out, role, "LOGIN REPLICATION BYPASSRLS");
    own_schema(out, &source.url, role);
    let publication = quote_ident(&source.publication);
    let target = if source.tables.is_empty() {
        "ALL TABLES".to_owned()
    } else {
        let list: Vec<String> = source
            .tables
            .iter()
            .filter_map(|t| t.split_once('.'))
            .map(|(s, t)| format!("{}.{}", quote_ident(s), quote_ident(t)))
            .collect();
        format!("TABLE {}", list.join(", "))
    };
    let _ = writeln!(
        out,
        "DO $$ BEGIN\n  IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = {}) THEN\n    \
         CREATE PUBLICATION {publication} FOR {target};\n  END IF;\nEND $$;",
        quote_literal(&source.publication)
    );
    let tables = if source.tables.is_empty() {
        Tables::All
    } else {
        Tables::Listed(&source.tables)
    };
    grant_tables(out, &tables, "SELECT", role);
    if matches!(tables, Tables::All) {
        // FOR ALL TABLES publishes a table the moment it is created, and capture snapshots
        // it: the role reads every table, now and later (not every row: that is BYPASSRLS).
        let _ = writeln!(out, "GRANT pg_read_all_data TO {};", quote_ident(role));
    }
    if source.capture_ddl {
        let _ = writeln!(
            out,
            "-- source.capture_ddl: pgferry's event triggers, which need a superuser. Their\n\
             -- functions run as their owner (this superuser), so any role's DDL is captured.{}\n\
             GRANT SELECT ON pgferry.ddl_tables, pgferry.added_columns TO {r};\n\
             GRANT SELECT, INSERT, UPDATE ON pgferry.ddl_history TO {r};",
            crate::ddl::capture_sql().trim_end(),
            r = quote_ident(role)
        );
    }
}

fn apply_section(out: &mut String, config: &Config, target: &PgUrl, with_capture: bool) {
    let Some(apply) = &config.apply else {
        return;
    };
    let role = user(target);
    if !with_capture {
        header(out, target, "apply on the target");
        create_role(out, role, "LOGIN BYPASSRLS");
        own_schema(out, target, role);
    } else {
        let _ = writeln!(out, "-- apply on the same database, as the same role");
    }
    let r = quote_ident(role);
    let _ = writeln!(
        out,
        "GRANT SET ON PARAMETER session_replication_role TO {r};\n\
         DO $$ DECLARE f regprocedure; BEGIN\n  \
         FOR f IN SELECT oid::regprocedure FROM pg_proc WHERE proname IN \
         ('pg_replication_origin_create', 'pg_replication_origin_session_setup', \
         'pg_replication_origin_session_reset', 'pg_replication_origin_xact_setup', \
         'pg_replication_origin_xact_reset', 'pg_replication_origin_oid', \
         'pg_replication_origin_progress', 'pg_replication_origin_session_progress') LOOP\n    \
         EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', f, {l});\n  \
         END LOOP;\nEND $$;",
        l = quote_literal(role)
    );
    let tables = if apply.tables.is_empty() {
        Tables::All
    } else {
        Tables::Listed(&apply.tables)
    };
    grant_tables(
        out,
        &tables,
        "SELECT, INSERT, UPDATE, DELETE, TRUNCATE",
        role,
    );
    if apply.create_tables {
        let _ = writeln!(
            out,
            "-- apply.create_tables: the role also needs CREATE on the schemas it creates tables in."
        );
    }
    if apply.mode == ApplyMode::MultiMaster {
        let _ = writeln!(
            out,
            "-- multi-master: pgferry installs triggers on the replicated tables, which only\n\
             -- their owner may do: ALTER TABLE <each table> OWNER TO {r};"
        );
    }
}

/// The whole script for `config`.
pub fn script(config: &Config) -> String {
    let mut out = format!(
        "-- pgferry roles for node {}: run as a superuser (psql runs the \\connect lines).\n\
         -- No password is set here: \\password <role>, or use client certificates.\n",
        config.node_id
    );
    let targets: Vec<&PgUrl> = config
        .apply
        .iter()
        .flat_map(|a| a.targets.iter().map(|t| &t.url))
        .collect();
    let same = |t: &&PgUrl| {
        config.source.as_ref().is_some_and(|s| {
            s.url.display_target() == t.display_target() && user(&s.url) == user(t)
        })
    };
    capture_section(&mut out, config);
    for target in &targets {
        apply_section(&mut out, config, target, same(target));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_quote_every_name_and_print_no_password() {
        let config = crate::config::load_from_str(
            "node_id: n\nsource:\n  url: postgres://cap:sekrit-pw@h:5432/app\n  \
             publication: my pub\n  tables: [public.a, sales.b]\n\
             kafka:\n  brokers: k:9092\n\
             apply:\n  mode: replica\n  nodes: [m]\n  targets:\n    - url: postgres://app@r:5432/rep\n",
            std::iter::empty(),
        )
        .unwrap();
        let sql = script(&config);
        assert!(!sql.contains("sekrit-pw"));
        assert!(
            sql.contains("CREATE ROLE \"cap\" LOGIN REPLICATION"),
            "{sql}"
        );
        assert!(
            sql.contains(
                "CREATE PUBLICATION \"my pub\" FOR TABLE \"public\".\"a\", \"sales\".\"b\""
            ),
            "{sql}"
        );
        assert!(
            sql.contains("GRANT SELECT ON \"public\".\"a\" TO \"cap\""),
            "{sql}"
        );
        assert!(sql.contains("\\connect \"rep\""), "{sql}");
        assert!(
            sql.contains("GRANT SET ON PARAMETER session_replication_role TO \"app\""),
            "{sql}"
        );
        assert!(sql.contains("ALL TABLES IN SCHEMA"), "{sql}");
    }
}

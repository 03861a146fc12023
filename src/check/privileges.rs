//! The privileges `check` verifies for least-privilege roles (see [`crate::roles`] for what
//! each role needs and the SQL that grants it). Each missing privilege is one problem naming
//! the role, the object and the GRANT that fixes it.

use tokio_postgres::Client;

use super::{problem, Problem};
use crate::config::{ApplyConfig, SourceConfig};
use crate::sql::quote_ident;

/// The `schema.table` names of the existing tables in `tables` (or, when it is empty, of every
/// user table) for which `condition` holds; `condition` is SQL over `c` (their `pg_class` row).
async fn tables_where(
    client: &Client,
    condition: &str,
    tables: &[String],
) -> Result<Vec<String>, tokio_postgres::Error> {
    let sql = format!(
        "SELECT n.nspname || '.' || c.relname
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.relkind IN ('r', 'p') AND {}
            AND (cardinality($1::text[]) = 0 OR n.nspname || '.' || c.relname = ANY($1))
            AND {condition}",
        crate::apply::admit::USER_SCHEMA_SQL
    );
    Ok(client
        .query(&sql, &[&tables])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Capture: the publication (or the right to create it), `SELECT` for the snapshot, the
/// `pgferry` schema, and the DDL capture triggers (installed, since creating them needs a
/// superuser). Superusers have all of it.
pub async fn capture(
    client: &Client,
    source: &SourceConfig,
    problems: &mut Vec<Problem>,
) -> Result<(), tokio_postgres::Error> {
    let me = client
        .query_one(
            "SELECT current_user::text, rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?;
    let (role, superuser): (String, bool) = (me.get(0), me.get(1));
    if superuser {
        return Ok(());
    }
    let role_sql = quote_ident(&role);
    let publication_exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&source.publication],
        )
        .await?
        .is_some();
    if !publication_exists {
        if source.tables.is_empty() {
            problems.push(problem(
                format!(
                    "publication {} does not exist, and role {role} may not create it FOR ALL \
                     TABLES (that needs a superuser)",
                    source.publication
                ),
                format!(
                    "as a superuser: CREATE PUBLICATION {} FOR ALL TABLES (pgferry roles prints it)",
                    quote_ident(&source.publication)
                ),
            ));
        } else {
            let not_owned: Vec<String> = tables_where(
                client,
                "NOT pg_has_role(c.relowner, 'USAGE')",
                &source.tables,
            )
            .await?;
            if !not_owned.is_empty() {
                problems.push(problem(
                    format!(
                        "publication {} does not exist, and role {role} may not create it: it \
                         does not own {}",
                        source.publication,
                        not_owned.join(", ")
                    ),
                    "create the publication as a superuser or the tables' owner (pgferry roles prints it)",
                ));
            }
        }
    }
    // What the snapshot reads: the publication's tables, or the configured ones.
    let published: Vec<String> = if publication_exists {
        client
            .query(
                "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1",
                &[&source.publication],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect()
    } else {
        source.tables.clone()
    };
    let unreadable: Vec<String> = tables_where(
        client,
        "NOT has_table_privilege(c.oid, 'SELECT')",
        &published,
    )
    .await?;
    if !unreadable.is_empty() {
        problems.push(problem(
            format!(
                "role {role} cannot SELECT {} (the initial snapshot reads them)",
                unreadable.join(", ")
            ),
            format!("GRANT SELECT ON {} TO {role_sql}", unreadable.join(", ")),
        ));
    }
    if source.capture_ddl && !crate::source::catalog::ddl_capture_installed(client).await? {
        problems.push(problem(
            format!(
                "schema changes would not be replicated: pgferry's event triggers are not \
                 installed, and role {role} may not install them (that needs a superuser)"
            ),
            "run the output of pgferry roles as a superuser (it installs them), or set \
             source.capture_ddl: false",
        ));
    }
    schema(client, &role, problems).await
}

/// The `pgferry` schema: creatable, or usable with its tables owned by the role (pgferry
/// creates and alters its bookkeeping tables).
async fn schema(
    client: &Client,
    role: &str,
    problems: &mut Vec<Problem>,
) -> Result<(), tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT to_regnamespace('pgferry') IS NOT NULL,
                    has_database_privilege(current_database(), 'CREATE'),
                    -- By OID: a missing schema gives NULL rather than an error.
                    coalesce(has_schema_privilege(to_regnamespace('pgferry'), 'USAGE')
                             AND has_schema_privilege(to_regnamespace('pgferry'), 'CREATE'),
                             false),
                    (SELECT string_agg(c.relname, ', ' ORDER BY c.relname)
                       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE n.nspname = 'pgferry' AND c.relkind = 'r'
                        AND NOT pg_has_role(c.relowner, 'USAGE')
                        -- DDL capture's, owned by the administrator who installed it.
                        AND c.relname NOT IN ('ddl_tables', 'ddl_history', 'added_columns'))",
            &[],
        )
        .await?;
    let (exists, may_create, usable, foreign): (bool, bool, bool, Option<String>) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let fix = format!(
        "as a superuser: CREATE SCHEMA IF NOT EXISTS pgferry AUTHORIZATION {}",
        quote_ident(role)
    );
    if !exists && !may_create {
        problems.push(problem(
            format!("schema pgferry does not exist and role {role} may not create it"),
            fix,
        ));
    } else if exists && !usable {
        problems.push(problem(
            format!("role {role} lacks USAGE and CREATE on schema pgferry"),
            fix,
        ));
    } else if let Some(tables) = foreign {
        problems.push(problem(
            format!(
                "role {role} does not own pgferry.{tables} (pgferry alters its bookkeeping tables)"
            ),
            format!("ALTER TABLE pgferry.<table> OWNER TO {}", quote_ident(role)),
        ));
    }
    Ok(())
}

/// Apply: `session_replication_role`, the replication origin functions, the tables' DML
/// privileges, and the `pgferry` schema. Superusers have all of it.
pub async fn apply(
    client: &Client,
    apply: &ApplyConfig,
    target: &str,
    problems: &mut Vec<Problem>,
) -> Result<(), tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT current_user::text, rolsuper,
                    has_parameter_privilege('session_replication_role', 'SET'),
                    (SELECT string_agg(DISTINCT proname, ', ') FROM pg_proc
                      WHERE proname IN ('pg_replication_origin_create',
                                        'pg_replication_origin_session_setup',
                                        'pg_replication_origin_xact_setup')
                        AND NOT has_function_privilege(oid, 'EXECUTE'))
               FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?;
    let (role, superuser): (String, bool) = (row.get(0), row.get(1));
    if superuser {
        return Ok(());
    }
    let role_sql = quote_ident(&role);
    if !row.get::<_, bool>(2) {
        problems.push(problem(
            format!("role {role} on apply target {target} may not SET session_replication_role"),
            format!("GRANT SET ON PARAMETER session_replication_role TO {role_sql}"),
        ));
    }
    if let Some(functions) = row.get::<_, Option<String>>(3) {
        problems.push(problem(
            format!("role {role} on apply target {target} may not EXECUTE {functions}"),
            format!(
                "GRANT EXECUTE ON FUNCTION <each> TO {role_sql} (pgferry roles prints the grants)"
            ),
        ));
    }
    let missing = tables_where(
        client,
        "NOT (has_table_privilege(c.oid, 'SELECT') AND has_table_privilege(c.oid, 'INSERT') \
         AND has_table_privilege(c.oid, 'UPDATE') AND has_table_privilege(c.oid, 'DELETE') \
         AND has_table_privilege(c.oid, 'TRUNCATE'))",
        &apply.tables,
    )
    .await?;
    if !missing.is_empty() {
        problems.push(problem(
            format!(
                "role {role} on apply target {target} lacks SELECT, INSERT, UPDATE, DELETE or \
                 TRUNCATE on {}",
                missing.join(", ")
            ),
            format!(
                "GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON {} TO {role_sql}",
                missing.join(", ")
            ),
        ));
    }
    schema(client, &role, problems).await
}

//! Which tables a node stream may write: the applier's allow-list, as a pure decision.
//!
//! A change or relation record names its table in the record itself, so whoever can write the
//! node-stream topic chooses the table. Three rules bound that:
//! - never a system schema (`pg_catalog`, `information_schema`, `pg_toast`, any `pg_*`) or
//!   pgferry's own (`pgferry`), whatever the config says;
//! - only tables the stream has announced with a relation record (capture announces every
//!   table of its publication before that table's first change in each run; the target keeps
//!   the list in `pgferry.stream_tables`, in the transaction of the data);
//! - and, when `apply.tables` is set, only those.
//!
//! A refused record is dead-lettered with the reason, never applied. A record for an
//! announced table outside `apply.tables` is filtered: the source publishes it, this target
//! does not want it.

use std::collections::HashSet;

/// pgferry's own schema on every database it touches.
pub const PGFERRY_SCHEMA: &str = "pgferry";

/// Whether `schema` belongs to PostgreSQL or to pgferry.
pub fn is_protected_schema(schema: &str) -> bool {
    schema == PGFERRY_SCHEMA || schema == "information_schema" || schema.starts_with("pg_")
}

/// The same rule in SQL, as a condition on `pg_namespace.nspname`: true for the schemas
/// [`is_protected_schema`] leaves to the user (the queries that list user tables share it).
pub const USER_SCHEMA_SQL: &str =
    "nspname NOT LIKE 'pg\\_%' AND nspname NOT IN ('information_schema', 'pgferry')";

/// What to do with a change to a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Apply it.
    Apply,
    /// An announced table that `apply.tables` leaves out: skip it.
    Filtered,
    /// Dead-letter it with this reason.
    Refused(String),
}

/// Decides a change to `qualified` (`schema.table`, as the applier already names it; `schema`
/// is its first part). `wanted` is `apply.tables` (empty: every announced table); `announced`
/// holds `schema.table` names.
pub fn admit(
    schema: &str,
    qualified: &str,
    wanted: &[String],
    announced: &HashSet<String>,
) -> Admission {
    if is_protected_schema(schema) {
        return Admission::Refused(format!(
            "{qualified} is in {schema}, a system schema or pgferry's own: never applied"
        ));
    }
    if !announced.contains(qualified) {
        return Admission::Refused(format!(
            "{qualified} was never announced on this node stream (no relation record): it is \
             not in the source's published set"
        ));
    }
    if !wanted.is_empty() && !wanted.iter().any(|t| t == qualified) {
        return Admission::Filtered;
    }
    Admission::Apply
}

/// Decides a relation record (an announcement): `None` to record it, or the reason to refuse.
pub fn admit_relation(schema: &str, table: &str) -> Option<String> {
    is_protected_schema(schema).then(|| {
        format!(
            "{schema}.{table} is in {schema}, a system schema or pgferry's own: never announced"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(names: &[&str]) -> HashSet<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn the_rules_in_order() {
        let announced = set(&["public.a", "public.b", "pg_catalog.pg_authid", "pgferry.x"]);
        let wanted = vec!["public.a".to_owned()];
        assert_eq!(
            admit("public", "public.a", &wanted, &announced),
            Admission::Apply
        );
        assert_eq!(
            admit("public", "public.b", &wanted, &announced),
            Admission::Filtered
        );
        assert_eq!(
            admit("public", "public.b", &[], &announced),
            Admission::Apply
        );
        assert!(matches!(
            admit("public", "public.c", &[], &announced),
            Admission::Refused(_)
        ));
        // Announced or wanted does not open a protected schema.
        let protected = vec!["pg_catalog.pg_authid".to_owned(), "pgferry.x".to_owned()];
        assert!(matches!(
            admit("pg_catalog", "pg_catalog.pg_authid", &protected, &announced),
            Admission::Refused(r) if r.contains("system schema")
        ));
        assert!(matches!(
            admit("pgferry", "pgferry.x", &protected, &announced),
            Admission::Refused(_)
        ));
        assert!(admit_relation("pg_toast", "t").is_some());
        assert!(admit_relation("public", "t").is_none());
        // Schema names are compared exactly (identifiers are case-sensitive once quoted).
        assert!(!is_protected_schema("PG_catalog"));
        assert!(!is_protected_schema("pgferry_data"));
    }

    proptest! {
        /// Nothing is applied outside the announced set, in a protected schema, or outside a
        /// non-empty apply.tables.
        #[test]
        fn applies_only_inside_every_bound(
            schema in "(public|app|pg_[a-z]{1,6}|pgferry|information_schema)",
            table in "[a-c]",
            announced in proptest::collection::hash_set("(public|app|pg_catalog|pgferry)\\.[a-c]", 0..8),
            wanted in proptest::collection::vec("(public|app)\\.[a-c]", 0..3),
        ) {
            let qualified = format!("{schema}.{table}");
            if admit(&schema, &qualified, &wanted, &announced) == Admission::Apply {
                prop_assert!(!is_protected_schema(&schema));
                prop_assert!(announced.contains(&qualified));
                prop_assert!(wanted.is_empty() || wanted.contains(&qualified));
            }
        }
    }
}

//! Statement text for applying changes to one target table. Pure.
//!
//! Only identifiers (quoted) appear in the text; every value is a `$n` parameter. Statements
//! are idempotent where the table has a key: inserts are upserts, so a replayed change is
//! harmless.

use crate::sql::{qualified, quote_ident};

fn placeholders(from: usize, n: usize) -> Vec<String> {
    (from..from + n).map(|i| format!("${i}")).collect()
}

fn key_predicate(key: &[&str], first_param: usize) -> String {
    key.iter()
        .enumerate()
        .map(|(i, k)| format!("{} = ${}", quote_ident(k), first_param + i))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// `INSERT … ON CONFLICT (key) DO UPDATE` (or a plain INSERT for keyless tables).
/// Parameters: `columns` in order.
pub fn upsert(schema: &str, table: &str, columns: &[&str], key: &[&str]) -> String {
    let cols: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
    let mut sql = format!(
        "INSERT INTO {} ({}) VALUES ({})",
        qualified(schema, table),
        cols.join(", "),
        placeholders(1, columns.len()).join(", ")
    );
    if !key.is_empty() {
        let keys: Vec<String> = key.iter().map(|k| quote_ident(k)).collect();
        let updates: Vec<String> = columns
            .iter()
            .filter(|c| !key.contains(c))
            .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(c)))
            .collect();
        if updates.is_empty() {
            sql.push_str(&format!(" ON CONFLICT ({}) DO NOTHING", keys.join(", ")));
        } else {
            sql.push_str(&format!(
                " ON CONFLICT ({}) DO UPDATE SET {}",
                keys.join(", "),
                updates.join(", ")
            ));
        }
    }
    sql
}

/// `UPDATE … SET columns WHERE key`. Parameters: `columns`, then `key`.
pub fn update(schema: &str, table: &str, columns: &[&str], key: &[&str]) -> String {
    let sets: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{} = ${}", quote_ident(c), i + 1))
        .collect();
    format!(
        "UPDATE {} SET {} WHERE {}",
        qualified(schema, table),
        sets.join(", "),
        key_predicate(key, columns.len() + 1)
    )
}

/// `DELETE … WHERE key`. Parameters: `key`.
pub fn delete(schema: &str, table: &str, key: &[&str]) -> String {
    format!(
        "DELETE FROM {} WHERE {}",
        qualified(schema, table),
        key_predicate(key, 1)
    )
}

/// Deletes one row equal to the old image, for keyless tables with REPLICA IDENTITY FULL.
/// Parameters: `columns`.
pub fn delete_one_matching(schema: &str, table: &str, columns: &[&str]) -> String {
    let matches: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{} IS NOT DISTINCT FROM ${}", quote_ident(c), i + 1))
        .collect();
    let t = qualified(schema, table);
    format!(
        "DELETE FROM {t} WHERE ctid = (SELECT ctid FROM {t} WHERE {} LIMIT 1)",
        matches.join(" AND ")
    )
}

/// True for type names as `format_type` prints them (`numeric(12,2)`, `timestamp with time
/// zone`, `"MyType"[]`, `public.mood`): such text is the only part of DDL taken from the stream,
/// so anything else (`;`, quotes in odd places, comments) is refused.
pub fn is_safe_type_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.contains("--")
        && !name.contains("/*")
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || " _(),.[]\"".contains(c))
        && name.matches('"').count() % 2 == 0
}

/// `CREATE TABLE IF NOT EXISTS` with the source's columns and key. `None` when a type name is
/// not acceptable.
pub fn create_table(
    schema: &str,
    table: &str,
    columns: &[(&str, &str, bool)],
    key: &[&str],
) -> Option<String> {
    let mut defs = Vec::with_capacity(columns.len() + 1);
    for (name, type_name, not_null) in columns {
        if !is_safe_type_name(type_name) {
            return None;
        }
        let null = if *not_null || key.contains(name) {
            " NOT NULL"
        } else {
            ""
        };
        defs.push(format!("{} {type_name}{null}", quote_ident(name)));
    }
    if !key.is_empty() {
        let keys: Vec<String> = key.iter().map(|k| quote_ident(k)).collect();
        defs.push(format!("PRIMARY KEY ({})", keys.join(", ")));
    }
    Some(format!(
        "CREATE SCHEMA IF NOT EXISTS {}; CREATE TABLE IF NOT EXISTS {} ({})",
        quote_ident(schema),
        qualified(schema, table),
        defs.join(", ")
    ))
}

/// `TRUNCATE`.
pub fn truncate(schema: &str, table: &str) -> String {
    format!("TRUNCATE {}", qualified(schema, table))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements() {
        assert_eq!(
            upsert("s", "t", &["id", "v"], &["id"]),
            r#"INSERT INTO "s"."t" ("id", "v") VALUES ($1, $2) ON CONFLICT ("id") DO UPDATE SET "v" = EXCLUDED."v""#
        );
        assert_eq!(
            upsert("s", "t", &["id"], &["id"]),
            r#"INSERT INTO "s"."t" ("id") VALUES ($1) ON CONFLICT ("id") DO NOTHING"#
        );
        assert_eq!(
            upsert("s", "h", &["a"], &[]),
            r#"INSERT INTO "s"."h" ("a") VALUES ($1)"#
        );
        assert_eq!(
            update("s", "t", &["v"], &["id", "k"]),
            r#"UPDATE "s"."t" SET "v" = $1 WHERE "id" = $2 AND "k" = $3"#
        );
        assert_eq!(
            delete("s", "t", &["id"]),
            r#"DELETE FROM "s"."t" WHERE "id" = $1"#
        );
        assert!(delete_one_matching("s", "t", &["a", "b"])
            .contains(r#""b" IS NOT DISTINCT FROM $2 LIMIT 1)"#));
    }

    #[test]
    fn create_table_and_type_name_safety() {
        let ddl = create_table(
            "s",
            "t",
            &[("id", "bigint", false), ("n", "numeric(12,2)", false)],
            &["id"],
        )
        .unwrap();
        assert_eq!(
            ddl,
            r#"CREATE SCHEMA IF NOT EXISTS "s"; CREATE TABLE IF NOT EXISTS "s"."t" ("id" bigint NOT NULL, "n" numeric(12,2), PRIMARY KEY ("id"))"#
        );
        for ok in [
            "timestamp with time zone",
            "text[]",
            "public.mood",
            "\"My Type\"[]",
            "character varying(20)",
        ] {
            assert!(is_safe_type_name(ok), "{ok}");
        }
        for bad in [
            "int; DROP TABLE x",
            "int -- x",
            "text /* */",
            "\"unbalanced",
            "",
        ] {
            assert!(!is_safe_type_name(bad), "{bad}");
        }
        assert_eq!(
            create_table("s", "t", &[("a", "int); DROP TABLE y; --", false)], &[]),
            None
        );
    }
}

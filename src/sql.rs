//! Quoting for the few places where names must appear in SQL text (identifiers from the
//! catalog, replication commands that take no parameters). Values are always bound as
//! parameters instead. Also the catalog expression both ends use to tell whether they order a
//! key column's values alike ([`COLUMN_ORDER`]).

/// `"name"` with embedded quotes doubled; safe for any identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'` with embedded quotes doubled, for replication-command options, which cannot take
/// bind parameters. Backslashes are literal under `standard_conforming_strings` (always on
/// since PostgreSQL 9.1).
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// `E'text'` with backslashes and quotes escaped: a value in SQL text, read the same whatever
/// the server's `standard_conforming_strings`.
pub fn quote_value(text: &str) -> String {
    format!("E'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
}

/// `"schema"."table"`.
pub fn qualified(schema: &str, table: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

/// One `DO` statement adding to pgferry's own `table` (already qualified, as
/// `pgferry.dead_letters`) each `(column, definition)` its catalog does not list: for a
/// column a later version of pgferry added. `ALTER TABLE … ADD COLUMN IF NOT EXISTS` takes the
/// table's ACCESS EXCLUSIVE lock before it looks, so at every start it queued behind any open
/// transaction that had touched the table (a migration whose event trigger wrote pgferry's
/// shadow of it, an operator reading the dead letters), and every later user of the table
/// queued behind that request.
pub fn add_missing_columns(table: &str, columns: &[(&str, &str)]) -> String {
    let mut sql = String::from("DO $add$ BEGIN\n");
    for (column, definition) in columns {
        sql.push_str(&format!(
            "IF NOT EXISTS (SELECT FROM pg_catalog.pg_attribute WHERE attrelid = {}::regclass \
             AND attname = {} AND NOT attisdropped) THEN\n    \
             ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {} {definition};\nEND IF;\n",
            quote_literal(table),
            quote_literal(column),
            quote_ident(column),
        ));
    }
    sql.push_str("END $add$;\n");
    sql
}

/// The (schema, table) pairs a table name given by a user may mean: parts split at dots
/// outside double quotes, a quoted part unquoted (`""` is a quote) and an unquoted one taken
/// as written (not folded to lower case); one part means a table in `public`, several may
/// split between any two of them (`a.b.c`: `a` and `b.c`, or `a.b` and `c`; quotes say which,
/// `"a.b".c`). `None` for an empty part or an unclosed quote.
pub fn table_name_readings(name: &str) -> Option<Vec<(String, String)>> {
    let mut parts = vec![String::new()];
    let mut quoted = false;
    let mut chars = name.trim().chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                parts.last_mut()?.push('"');
            }
            '"' => quoted = !quoted,
            '.' if !quoted => parts.push(String::new()),
            c => parts.last_mut()?.push(c),
        }
    }
    if quoted || parts.iter().any(String::is_empty) {
        return None;
    }
    if parts.len() == 1 {
        return Some(vec![("public".to_owned(), parts.remove(0))]);
    }
    Some(
        (1..parts.len())
            .map(|at| (parts[..at].join("."), parts[at..].join(".")))
            .collect(),
    )
}

/// A catalog expression over `pg_attribute a` and `pg_type t` (the column's type): how the
/// server orders the column's values, as text two servers compare. `''` for a built-in base
/// type without a collation (ordered the same everywhere); for a collatable one its
/// collation's provider, locale, library version and determinism (the database's for the
/// default collation), or `C` for the C and POSIX locales; NULL for what may order otherwise
/// elsewhere (an enum, domain, array, range or extension type). The same provider, locale and
/// version order text alike: PostgreSQL's collation versions exist to say so. Catalog columns
/// that not every version has are read through `to_jsonb` (`datlocale` and `colllocale` since
/// PostgreSQL 17, `daticulocale` and `colliculocale` in 15 and 16).
pub const COLUMN_ORDER: &str = "CASE
  WHEN t.oid >= 16384 OR t.typtype <> 'b' OR t.typcategory = 'A' THEN NULL
  WHEN a.attcollation = 0 THEN ''
  ELSE (SELECT CASE WHEN o->>'provider' = 'c' AND o->>'locale' IN ('C', 'POSIX') THEN 'C'
                    ELSE concat_ws(':', o->>'provider', o->>'locale', o->>'version',
                                   o->>'deterministic') END
          FROM (SELECT CASE WHEN c.oid = 100 THEN
                         (SELECT jsonb_build_object(
                                   'provider', coalesce(d->>'datlocprovider', 'c'),
                                   'locale', CASE coalesce(d->>'datlocprovider', 'c')
                                               WHEN 'c' THEN d->>'datcollate'
                                               ELSE coalesce(d->>'datlocale', d->>'daticulocale') END,
                                   'version', d->>'datcollversion', 'deterministic', 'true')
                            FROM (SELECT to_jsonb(db) AS d FROM pg_database db
                                   WHERE db.datname = current_database()) AS dd)
                       ELSE jsonb_build_object(
                              'provider', c.collprovider,
                              'locale', CASE c.collprovider WHEN 'c' THEN c.collcollate
                                          ELSE coalesce(to_jsonb(c)->>'colllocale',
                                                        to_jsonb(c)->>'colliculocale') END,
                              'version', c.collversion,
                              'deterministic', c.collisdeterministic::text)
                       END AS o
                  FROM pg_collation c WHERE c.oid = a.attcollation) AS co)
END";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(qualified("s", "T x"), "\"s\".\"T x\"");
    }

    #[test]
    fn missing_columns_are_added_after_a_look_at_the_catalog() {
        let sql = add_missing_columns(
            "pgferry.t",
            &[("a", "int NOT NULL DEFAULT 0"), ("it's", "\"char\"")],
        );
        assert!(sql.starts_with("DO $add$ BEGIN\n") && sql.ends_with("END $add$;\n"));
        assert_eq!(
            sql.matches("IF NOT EXISTS (SELECT FROM pg_catalog.pg_attribute")
                .count(),
            2
        );
        assert!(sql.contains(
            "attrelid = 'pgferry.t'::regclass AND attname = 'a' AND NOT attisdropped) THEN\n    \
             ALTER TABLE pgferry.t ADD COLUMN IF NOT EXISTS \"a\" int NOT NULL DEFAULT 0;\nEND IF;"
        ));
        assert!(sql.contains(
            "attname = 'it''s' AND NOT attisdropped) THEN\n    \
             ALTER TABLE pgferry.t ADD COLUMN IF NOT EXISTS \"it's\" \"char\";"
        ));
    }

    #[test]
    fn table_names_users_give() {
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(s, t)| (s.to_string(), t.to_string()))
                .collect()
        };
        let read = table_name_readings;
        assert_eq!(read("items"), Some(pairs(&[("public", "items")])));
        assert_eq!(read("s.Items"), Some(pairs(&[("s", "Items")])));
        assert_eq!(
            read(r#""My Schema"."Weird ""Name""""#),
            Some(pairs(&[("My Schema", r#"Weird "Name""#)]))
        );
        assert_eq!(read(r#""a.b".c"#), Some(pairs(&[("a.b", "c")])));
        assert_eq!(read(r#"a."b.c""#), Some(pairs(&[("a", "b.c")])));
        assert_eq!(read("a.b.c"), Some(pairs(&[("a", "b.c"), ("a.b", "c")])));
        for bad in ["", " ", ".t", "s.", r#""open"#, "a..b"] {
            assert_eq!(read(bad), None, "{bad:?}");
        }
        // What `qualified` writes reads back as itself.
        proptest::proptest!(|(schema in "[ -~]{1,12}", table in "[ -~]{1,12}")| {
            proptest::prop_assert_eq!(
                read(&qualified(&schema, &table)),
                Some(vec![(schema.clone(), table.clone())])
            );
        });
    }
}

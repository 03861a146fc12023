//! Quoting for the few places where names must appear in SQL text (identifiers from the
//! catalog, replication commands that take no parameters). Values are always bound as
//! parameters instead.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(qualified("s", "T x"), "\"s\".\"T x\"");
    }
}

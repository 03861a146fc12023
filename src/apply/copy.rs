//! Writing a big batch of inserted rows with `COPY` instead of a multi-row upsert. Pure: the
//! statement, the rows in COPY's text format, and when to try.
//!
//! A replica's batch of upserts ([`super::plan::RowWrite::Upsert`]) mostly inserts rows the
//! target does not have yet: a snapshot filling an empty table, a bulk load on the source.
//! PostgreSQL writes those several times cheaper with `COPY` (heap pages filled in bulk, no
//! speculative insertion per row) than with `INSERT … ON CONFLICT`. But a COPY fails on the first
//! key the target already holds, where the upsert updates it. So the worker tries COPY inside a
//! savepoint; when it fails, it rolls back to the savepoint and sends the same rows as the
//! upsert, so the outcome is the same either way. [`CopyChoice`] remembers the tables where COPY
//! failed so as not to try it for every batch of a table whose rows mostly exist (a
//! re-snapshot), and never again for a table it cannot write (row-level security, a value the
//! upsert would also refuse: that one reports the error).

use std::collections::HashMap;

use crate::sql::{qualified, quote_ident};

/// The fewest rows worth a COPY: it costs the pipeline (the worker waits for the statements
/// before it) and two more round trips (the savepoint), which a big batch pays back.
pub const MIN_ROWS: usize = 500;

/// After a COPY of a table hit existing keys, the number of its batches that go as upserts
/// before COPY is tried again doubles, up to this many.
const MAX_SKIP: u32 = 256;

/// `COPY schema.table (columns) FROM STDIN`: text format, the columns of each row in order.
pub fn statement(schema: &str, table: &str, columns: &[String]) -> String {
    let cols: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
    format!(
        "COPY {} ({}) FROM STDIN",
        qualified(schema, table),
        cols.join(", ")
    )
}

/// How many bytes of COPY data go in one message to the target: big enough that a batch is a
/// few messages, small enough that no buffer of a batch's size is ever allocated.
pub const PIECE_BYTES: usize = 64 * 1024;

/// Rows in COPY's text format: a tab between values, a newline after each row, `\N` for NULL,
/// and backslash, tab, newline and carriage return escaped, so any text arrives as it was. In
/// pieces of about [`PIECE_BYTES`] (whole rows; a row larger than that is a piece of its own),
/// to be sent one after the other.
pub fn encode(rows: &[Vec<Option<String>>]) -> Vec<Vec<u8>> {
    let mut pieces = Vec::new();
    let mut out = Vec::with_capacity(PIECE_BYTES + PIECE_BYTES / 8);
    for row in rows {
        for (i, value) in row.iter().enumerate() {
            if i > 0 {
                out.push(b'\t');
            }
            match value {
                None => out.extend_from_slice(b"\\N"),
                Some(text) => escape_into(&mut out, text),
            }
        }
        out.push(b'\n');
        if out.len() >= PIECE_BYTES {
            pieces.push(std::mem::replace(
                &mut out,
                Vec::with_capacity(PIECE_BYTES + PIECE_BYTES / 8),
            ));
        }
    }
    if !out.is_empty() {
        pieces.push(out);
    }
    pieces
}

fn escape_into(out: &mut Vec<u8>, text: &str) {
    let bytes = text.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(escaped);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

/// How a COPY of a batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The rows are written.
    Written,
    /// A key was already there: the batch goes as an upsert.
    Conflict,
    /// Refused for another reason: the batch goes as an upsert, which writes it or reports
    /// the error.
    Refused,
}

impl Outcome {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Written => "written",
            Outcome::Conflict => "conflict",
            Outcome::Refused => "refused",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// The next `skip` batches go as upserts; a conflict after them skips `next`.
    Conflicted { skip: u32, next: u32 },
    /// COPY is not tried again.
    Refused,
}

/// Per target table, whether the next batch of upserts should try COPY.
#[derive(Debug, Default)]
pub struct CopyChoice {
    tables: HashMap<String, Standing>,
}

impl CopyChoice {
    /// Whether to try COPY for a batch of `rows` upserts of `table` (counts the batch when
    /// it is one to skip).
    pub fn try_copy(&mut self, table: &str, rows: usize) -> bool {
        if rows < MIN_ROWS {
            return false;
        }
        match self.tables.get_mut(table) {
            None => true,
            Some(Standing::Refused) => false,
            Some(Standing::Conflicted { skip, .. }) if *skip > 0 => {
                *skip -= 1;
                false
            }
            Some(Standing::Conflicted { .. }) => true,
        }
    }

    /// Records how a COPY of `table` ended.
    pub fn record(&mut self, table: &str, outcome: Outcome) {
        match outcome {
            Outcome::Written => {
                self.tables.remove(table);
            }
            Outcome::Refused => {
                self.tables.insert(table.to_owned(), Standing::Refused);
            }
            Outcome::Conflict => {
                let next = match self.tables.get(table) {
                    Some(Standing::Conflicted { next, .. }) => *next,
                    _ => 1,
                };
                self.tables.insert(
                    table.to_owned(),
                    Standing::Conflicted {
                        skip: next,
                        next: (next * 2).min(MAX_SKIP),
                    },
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// COPY's text format read back as PostgreSQL reads it (the escapes `encode` writes).
    fn decode(data: &[u8]) -> Vec<Vec<Option<String>>> {
        let text = std::str::from_utf8(data).unwrap();
        assert!(text.is_empty() || text.ends_with('\n'));
        text.split_terminator('\n')
            .map(|line| {
                line.split('\t')
                    .map(|field| {
                        if field == "\\N" {
                            return None;
                        }
                        let mut out = String::new();
                        let mut chars = field.chars();
                        while let Some(c) = chars.next() {
                            if c != '\\' {
                                out.push(c);
                                continue;
                            }
                            out.push(match chars.next().unwrap() {
                                't' => '\t',
                                'n' => '\n',
                                'r' => '\r',
                                '\\' => '\\',
                                other => panic!("unexpected escape \\{other}"),
                            });
                        }
                        Some(out)
                    })
                    .collect()
            })
            .collect()
    }

    proptest! {
        #[test]
        fn rows_read_back_as_they_were(
            rows in prop::collection::vec(
                prop::collection::vec(
                    prop::option::of("(\\\\|\t|\n|\r|N|\\\\N|[a-zé ]){0,12}"),
                    3,
                ),
                0..20,
            )
        ) {
            let pieces = encode(&rows);
            prop_assert!(pieces.iter().all(|p| !p.is_empty() && p.ends_with(b"\n")));
            prop_assert_eq!(decode(&pieces.concat()), rows);
        }
    }

    #[test]
    fn statement_quotes_names() {
        assert_eq!(
            statement("public", "Items", &["id".into(), "a b".into()]),
            r#"COPY "public"."Items" ("id", "a b") FROM STDIN"#
        );
    }

    #[test]
    fn conflicts_back_off_and_refusals_stop_copy() {
        let mut choice = CopyChoice::default();
        assert!(!choice.try_copy("t", MIN_ROWS - 1));
        assert!(choice.try_copy("t", MIN_ROWS));
        // Each conflict in a row doubles the batches skipped after it: 1, 2, 4, ...
        let mut skipped = Vec::new();
        for _ in 0..5 {
            choice.record("t", Outcome::Conflict);
            let mut n = 0;
            while !choice.try_copy("t", MIN_ROWS) {
                n += 1;
            }
            skipped.push(n);
        }
        assert_eq!(skipped, [1, 2, 4, 8, 16]);
        // A COPY that wrote its rows starts over.
        choice.record("t", Outcome::Written);
        choice.record("t", Outcome::Conflict);
        assert!(!choice.try_copy("t", MIN_ROWS));
        assert!(choice.try_copy("t", MIN_ROWS));
        // Other tables are not affected; a refusal is final.
        choice.record("u", Outcome::Refused);
        assert!((0..1000).all(|_| !choice.try_copy("u", MIN_ROWS)));
        assert!(choice.try_copy("v", MIN_ROWS));
    }
}

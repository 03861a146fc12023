//! Writing a big batch of inserted rows with `COPY` instead of a multi-row upsert. Pure: the
//! statement, the rows in COPY's text format, and when to try.
//!
//! A replica's batch of upserts ([`super::plan::RowWrite::Upsert`]) mostly inserts rows the
//! target does not have yet: a snapshot filling an empty table, a bulk load on the source.
//! PostgreSQL writes those with `COPY` (heap pages filled in bulk, no speculative insertion per
//! row) for about half the CPU of `INSERT … ON CONFLICT`. But a COPY fails on the first
//! key the target already holds, where the upsert updates it. So the worker tries COPY inside a
//! savepoint; when it fails, it rolls back to the savepoint and sends the same rows as the
//! upsert, so the outcome is the same either way. [`CopyChoice`] remembers the tables where COPY
//! failed so as not to try it for every batch of a table whose rows mostly exist (a
//! re-snapshot), and never again for a table it cannot write (row-level security, a value the
//! upsert would also refuse: that one reports the error).

use std::collections::HashMap;

use bytes::Bytes;

use crate::sql::{qualified, quote_ident};
use crate::value::copy_text;

/// The fewest rows worth a COPY: it costs the pipeline (the worker waits for the statements
/// before it) and two more round trips (the savepoint), which a big batch pays back.
pub const MIN_ROWS: usize = 500;

/// Fewer rows are worth a COPY when they are this many bytes (wide rows: a snapshot's `rows`
/// item of a table with many columns holds fewer than [`MIN_ROWS`]).
pub const MIN_BYTES: usize = 64 * 1024;

/// Whether `rows` rows of `bytes` bytes in all are worth a COPY.
pub fn worth_copying(rows: usize, bytes: usize) -> bool {
    rows >= MIN_ROWS || bytes >= MIN_BYTES
}

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

/// Rows in COPY's text format ([`copy_text`]), in pieces of about [`PIECE_BYTES`] (whole
/// rows; a row larger than that is a piece of its own), to be sent one after the other. Each
/// row is dropped once written: its values are freed in the order they were made, before the
/// worker waits for the target (held across that wait, tens of thousands of small strings
/// fragmented glibc's heap for everything else), and [`decode`] gives the rows back if the
/// batch must go as an upsert.
pub fn encode(rows: Vec<Vec<Option<String>>>) -> Vec<Bytes> {
    let mut pieces = Vec::new();
    let mut out = Vec::with_capacity(PIECE_BYTES + PIECE_BYTES / 8);
    for row in rows {
        copy_text::push_row(
            &mut out,
            row.iter().map(|v| v.as_deref().map(str::as_bytes)),
        );
        if out.len() >= PIECE_BYTES {
            let full =
                std::mem::replace(&mut out, Vec::with_capacity(PIECE_BYTES + PIECE_BYTES / 8));
            pieces.push(Bytes::from(full));
        }
    }
    if !out.is_empty() {
        pieces.push(Bytes::from(out));
    }
    pieces
}

/// The rows [`encode`] wrote, read back as PostgreSQL reads COPY's text format.
pub fn decode(pieces: &[Bytes]) -> Vec<Vec<Option<String>>> {
    pieces.iter().flat_map(|p| copy_text::decode(p)).collect()
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
    /// Whether to try COPY for a batch of upserts of `table` that is `worth` it (see
    /// [`worth_copying`]; counts the batch when it is one to skip).
    pub fn try_copy(&mut self, table: &str, worth: bool) -> bool {
        if !worth {
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

    proptest! {
        #[test]
        fn rows_read_back_as_they_were(
            // One to three columns: a row of one empty string is an empty line.
            rows in (1usize..4).prop_flat_map(|width| prop::collection::vec(
                prop::collection::vec(
                    prop::option::of("(\\\\|\t|\n|\r|N|\\\\N|[a-zé ]){0,12}"),
                    width,
                ),
                0..20,
            ))
        ) {
            let pieces = encode(rows.clone());
            prop_assert!(pieces.iter().all(|p| !p.is_empty() && p.ends_with(b"\n")));
            // What PostgreSQL reads: the pieces one after the other.
            prop_assert_eq!(decode(&[Bytes::from(pieces.concat())]), rows.clone());
            prop_assert_eq!(decode(&pieces), rows);
        }
    }

    #[test]
    fn big_batches_go_in_pieces_of_whole_rows() {
        let rows: Vec<Vec<Option<String>>> = (0..10_000)
            .map(|i| vec![Some(i.to_string()), Some(format!("{i:\t>40}")), None])
            .collect();
        let pieces = encode(rows.clone());
        assert!(pieces.len() > 4, "{} pieces", pieces.len());
        let longest = pieces.iter().map(Bytes::len).max().unwrap_or(0);
        assert!(longest < PIECE_BYTES + 200, "a piece of {longest} bytes");
        assert_eq!(decode(&pieces), rows);
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
        assert!(!worth_copying(MIN_ROWS - 1, MIN_BYTES - 1));
        assert!(worth_copying(MIN_ROWS, 0) && worth_copying(1, MIN_BYTES));
        assert!(!choice.try_copy("t", false));
        assert!(choice.try_copy("t", true));
        // Each conflict in a row doubles the batches skipped after it: 1, 2, 4, ...
        let mut skipped = Vec::new();
        for _ in 0..5 {
            choice.record("t", Outcome::Conflict);
            let mut n = 0;
            while !choice.try_copy("t", true) {
                n += 1;
            }
            skipped.push(n);
        }
        assert_eq!(skipped, [1, 2, 4, 8, 16]);
        // A COPY that wrote its rows starts over.
        choice.record("t", Outcome::Written);
        choice.record("t", Outcome::Conflict);
        assert!(!choice.try_copy("t", true));
        assert!(choice.try_copy("t", true));
        // Other tables are not affected; a refusal is final.
        choice.record("u", Outcome::Refused);
        assert!((0..1000).all(|_| !choice.try_copy("u", true)));
        assert!(choice.try_copy("v", true));
    }
}

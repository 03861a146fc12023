//! Rows behind their dead letters (replica mode): the pure part.
//!
//! A change the target rejected leaves its row as it was before the change, with a dead letter
//! that `pgferry dead-letters replay` applies once the cause is fixed. The row's later changes
//! must not be applied past the letter in a way a replay could undo:
//! - a later change that sets the row whole (an insert, an update carrying every value, a
//!   snapshot row) or deletes it **supersedes** the letters of its key: it is applied, and they
//!   are resolved in the same target transaction (replaying them would put an older row back,
//!   or bring a deleted one back);
//! - a later update that leaves a TOASTed value unsent depends on the row before it, so it is
//!   **held**: dead-lettered behind the letter, to be replayed after it, in order;
//! - a `TRUNCATE` supersedes every letter of its table (a refused `TRUNCATE` parks its table
//!   instead: every later change depends on it);
//! - a letter of an update that moved its row to another key (two keys: it deletes one and
//!   sets the other) is superseded by nothing: a later change of either key is held behind
//!   it, and so is a snapshot row of either key.
//!
//! Keys are compared as text: a change's JSON value as apply writes it
//! ([`crate::apply::params::json_to_text`]: `bytea` from base64, arrays as literals), snapshot
//! rows' values as they came; for types whose text has more than one spelling per value
//! ([`one_spelling`]), both as the target prints the value (the worker asks it). Multi-master
//! needs none of this: a replayed change carries its version and loses to any later one.

use std::collections::{BTreeSet, HashMap};

use serde_json::value::RawValue;

use super::stream::{ChangeItem, RowsItem};
use crate::event::Op;
use crate::value::PgType;

/// A row's key values as text (`None`: NULL), in the target key's column order.
pub type Key = Vec<Option<String>>;

/// A JSON key value as text: a string's contents, a number's digits, `t` or `f` for a boolean,
/// `None` for null; anything else (a `json` key) as written.
pub fn json_text(raw: &RawValue) -> Option<String> {
    let text = raw.get().trim();
    match text {
        "null" => None,
        "true" => Some("t".to_owned()),
        "false" => Some("f".to_owned()),
        _ if text.starts_with('"') => {
            Some(serde_json::from_str::<String>(text).unwrap_or_else(|_| text.to_owned()))
        }
        _ => Some(text.to_owned()),
    }
}

/// A key value of a change as apply writes it for a column of `kind` (`bytea` from base64,
/// an array as its literal), or as [`json_text`] reads it where that fails.
fn value_text(kind: &PgType, raw: &RawValue) -> Option<String> {
    crate::apply::params::json_to_text(kind, raw).unwrap_or_else(|_| json_text(raw))
}

/// The keys a change writes, by the `key` columns (of `kinds`, by column): the new row's, and
/// the old row's when the change carries it (an update that moved its row to another key
/// writes both). Empty for a keyless table, a `TRUNCATE`, or an image without a key column.
pub fn change_keys(change: &ChangeItem, key: &[&str], kinds: &[PgType]) -> Vec<Key> {
    if key.is_empty() {
        return Vec::new();
    }
    let kind = |i: usize| kinds.get(i).unwrap_or(&PgType::Unknown);
    let of = |image: Option<&super::stream::RowImage>| -> Option<Key> {
        let image = image?;
        key.iter()
            .enumerate()
            .map(|(i, k)| image.get(k).map(|v| value_text(kind(i), v)))
            .collect::<Option<Key>>()
    };
    let mut keys = Vec::with_capacity(2);
    let new = match change.op {
        Op::Create | Op::Read => of(change.after.as_ref()),
        // An update's new key falls back to its old image for the columns it does not carry.
        Op::Update => key
            .iter()
            .enumerate()
            .map(|(i, k)| {
                change
                    .after
                    .as_ref()
                    .and_then(|a| a.get(k))
                    .or_else(|| change.before.as_ref().and_then(|b| b.get(k)))
                    .map(|v| value_text(kind(i), v))
            })
            .collect::<Option<Key>>(),
        Op::Delete | Op::Truncate => None,
    };
    keys.extend(new);
    if matches!(change.op, Op::Update | Op::Delete) {
        if let Some(old) = of(change.before.as_ref()) {
            if !keys.contains(&old) {
                keys.push(old);
            }
        }
    }
    keys
}

/// The keys of snapshot rows, by the `key` columns; `None` when a key column is not among the
/// rows' columns.
pub fn rows_keys(rows: &RowsItem, key: &[&str]) -> Option<Vec<Key>> {
    if key.is_empty() {
        return None;
    }
    let at: Vec<usize> = key
        .iter()
        .map(|k| rows.names.iter().position(|n| n == k))
        .collect::<Option<_>>()?;
    Some(
        crate::value::copy_text::decode(rows.copy.as_bytes())
            .into_iter()
            .map(|row| at.iter().map(|&i| row.get(i).cloned().flatten()).collect())
            .collect(),
    )
}

/// Whether a change sets its row whole or deletes it, so that nothing earlier of the row
/// matters after it: every change but an update leaving a TOASTed value unsent (or carrying
/// no new image).
pub fn sets_whole_row(change: &ChangeItem) -> bool {
    match change.op {
        Op::Create | Op::Read | Op::Delete => true,
        Op::Update => change.after.is_some() && change.unchanged_toast.is_empty(),
        Op::Truncate => false,
    }
}

/// Whether every value of the type (as `format_type` prints it) has one text spelling, the
/// same in a change's JSON and in PostgreSQL's output: integers, text, `uuid`. Keys of other
/// types (timestamps, `numeric`, …) are compared by the target's output of the value.
pub fn one_spelling(type_name: &str) -> bool {
    matches!(
        type_name,
        "smallint" | "integer" | "bigint" | "text" | "uuid" | "oid" | "character varying"
    ) || type_name.starts_with("character varying(")
}

/// The unresolved apply dead letters of a node's stream on one target, by table and key: which
/// rows are behind a letter. Tables are named as the letters name them (the source's
/// `schema.table`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Held {
    tables: HashMap<String, HashMap<Key, BTreeSet<i64>>>,
    /// Letters of more than one row (an update that moved its row to another key).
    moves: BTreeSet<i64>,
}

impl Held {
    /// Records letter `id`, of the rows `keys` (table, key).
    pub fn add_letter(&mut self, id: i64, keys: Vec<(String, Key)>) {
        if keys.len() > 1 {
            self.moves.insert(id);
        }
        for (table, key) in keys {
            self.add(&table, key, id);
        }
    }

    /// Records letter `id` of `key` in `table`.
    pub fn add(&mut self, table: &str, key: Key, id: i64) {
        self.tables
            .entry(table.to_owned())
            .or_default()
            .entry(key)
            .or_default()
            .insert(id);
    }

    /// Whether a letter of `key` in `table` below `below` (any, when `None`) moved its row to
    /// another key: nothing of `key` supersedes it.
    pub fn behind_move(&self, table: &str, key: &Key, below: Option<i64>) -> bool {
        self.tables
            .get(table)
            .and_then(|keys| keys.get(key))
            .is_some_and(|ids| {
                ids.iter()
                    .any(|id| below.is_none_or(|b| *id < b) && self.moves.contains(id))
            })
    }

    /// Whether `table` has a row behind a letter.
    pub fn has_table(&self, table: &str) -> bool {
        self.tables.get(table).is_some_and(|keys| !keys.is_empty())
    }

    /// The lowest letter of `key` in `table` below `below` (any, when `None`).
    pub fn first(&self, table: &str, key: &Key, below: Option<i64>) -> Option<i64> {
        let ids = self.tables.get(table)?.get(key)?;
        ids.iter().copied().find(|&id| below.is_none_or(|b| id < b))
    }

    /// Removes and returns the letters of `key` in `table` below `below` (all, when `None`).
    pub fn take(&mut self, table: &str, key: &Key, below: Option<i64>) -> Vec<i64> {
        let Some(keys) = self.tables.get_mut(table) else {
            return Vec::new();
        };
        let Some(ids) = keys.get_mut(key) else {
            return Vec::new();
        };
        let taken: Vec<i64> = match below {
            None => std::mem::take(ids).into_iter().collect(),
            Some(b) => {
                let kept = ids.split_off(&b);
                std::mem::replace(ids, kept).into_iter().collect()
            }
        };
        if ids.is_empty() {
            keys.remove(key);
        }
        taken
    }

    /// Removes and returns every letter of `table` below `below` (all, when `None`).
    pub fn take_table(&mut self, table: &str, below: Option<i64>) -> Vec<i64> {
        let keys: Vec<Key> = self
            .tables
            .get(table)
            .map(|k| k.keys().cloned().collect())
            .unwrap_or_default();
        keys.iter()
            .flat_map(|key| self.take(table, key, below))
            .collect()
    }

    /// Forgets letter `id` (resolved by a replay).
    pub fn remove(&mut self, id: i64) {
        self.moves.remove(&id);
        for keys in self.tables.values_mut() {
            keys.retain(|_, ids| {
                ids.remove(&id);
                !ids.is_empty()
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::stream::RowImage;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    fn image(pairs: &[(&str, &str)]) -> RowImage {
        RowImage::new(
            pairs
                .iter()
                .map(|(c, v)| ((*c).to_owned(), raw(v)))
                .collect(),
        )
    }

    fn change(op: Op, before: Option<RowImage>, after: Option<RowImage>) -> ChangeItem {
        ChangeItem {
            schema: "public".into(),
            table: "t".into(),
            op,
            before,
            after,
            json_null_before: Vec::new(),
            json_null_after: Vec::new(),
            unchanged_toast: Vec::new(),
            version: None,
        }
    }

    fn key(values: &[Option<&str>]) -> Key {
        values.iter().map(|v| v.map(str::to_owned)).collect()
    }

    #[test]
    fn json_values_read_as_their_text() {
        assert_eq!(json_text(&raw("12")), Some("12".into()));
        assert_eq!(json_text(&raw(r#""a\"b\tc""#)), Some("a\"b\tc".into()));
        assert_eq!(json_text(&raw("true")), Some("t".into()));
        assert_eq!(json_text(&raw("false")), Some("f".into()));
        assert_eq!(json_text(&raw("null")), None);
        assert_eq!(json_text(&raw(r#"{"a":1}"#)), Some(r#"{"a":1}"#.into()));
    }

    #[test]
    fn a_change_writes_its_new_and_old_keys() {
        let k = ["id", "part"];
        let insert = change(
            Op::Create,
            None,
            Some(image(&[("id", "1"), ("part", "\"x\""), ("v", "2")])),
        );
        assert_eq!(
            change_keys(&insert, &k, &[]),
            vec![key(&[Some("1"), Some("x")])]
        );
        // An update whose new image lacks a key column takes it from the old one.
        let update = change(
            Op::Update,
            Some(image(&[("id", "1"), ("part", "\"x\"")])),
            Some(image(&[("id", "2"), ("v", "3")])),
        );
        assert_eq!(
            change_keys(&update, &k, &[]),
            vec![key(&[Some("2"), Some("x")]), key(&[Some("1"), Some("x")])]
        );
        let delete = change(
            Op::Delete,
            Some(image(&[("id", "1"), ("part", "null")])),
            None,
        );
        assert_eq!(change_keys(&delete, &k, &[]), vec![key(&[Some("1"), None])]);
        assert!(change_keys(&insert, &[], &[]).is_empty());
        let no_key = change(Op::Create, None, Some(image(&[("v", "2")])));
        assert!(change_keys(&no_key, &k, &[]).is_empty());
    }

    /// A change's key reads as apply writes it, so that it matches a snapshot row's text.
    #[test]
    fn change_keys_read_as_apply_writes_them() {
        let bytes = change(
            Op::Create,
            None,
            Some(image(&[("id", r#""3q2+7w==""#), ("tags", "[1,2]")])),
        );
        assert_eq!(
            change_keys(
                &bytes,
                &["id", "tags"],
                &[PgType::Bytea, PgType::Array(Box::new(PgType::Int))]
            ),
            vec![key(&[Some("\\xdeadbeef"), Some(r#"{"1","2"}"#)])]
        );
    }

    #[test]
    fn a_moved_rows_letter_is_behind_both_keys() {
        let mut held = Held::default();
        let (a, b) = (key(&[Some("1")]), key(&[Some("2")]));
        held.add_letter(1, vec![("t".into(), a.clone())]);
        held.add_letter(2, vec![("t".into(), b.clone()), ("t".into(), a.clone())]);
        assert!(held.behind_move("t", &a, None));
        assert!(held.behind_move("t", &b, None));
        assert!(!held.behind_move("t", &a, Some(2)));
        held.remove(2);
        assert!(!held.behind_move("t", &a, None));
        assert_eq!(held.first("t", &a, None), Some(1));
    }

    #[test]
    fn only_updates_leaving_values_unsent_depend_on_the_row_before() {
        let after = Some(image(&[("id", "1")]));
        assert!(sets_whole_row(&change(Op::Create, None, after.clone())));
        assert!(sets_whole_row(&change(Op::Delete, after.clone(), None)));
        assert!(sets_whole_row(&change(Op::Update, None, after.clone())));
        let mut partial = change(Op::Update, None, after);
        partial.unchanged_toast = vec!["doc".into()];
        assert!(!sets_whole_row(&partial));
        assert!(!sets_whole_row(&change(Op::Truncate, None, None)));
    }

    #[test]
    fn snapshot_rows_give_their_keys() {
        let rows = RowsItem {
            schema: "public".into(),
            table: "t".into(),
            names: vec!["v".into(), "id".into()],
            copy: "a\t1\n\\N\t2\n".into(),
            prune: None,
        };
        assert_eq!(
            rows_keys(&rows, &["id"]),
            Some(vec![key(&[Some("1")]), key(&[Some("2")])])
        );
        assert_eq!(rows_keys(&rows, &["missing"]), None);
    }

    /// Random letters and takes against a plain list of (table, key, id).
    #[test]
    fn held_letters_are_taken_by_key_and_bound() {
        let mut seed = 7u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..50 {
            let mut held = Held::default();
            let mut oracle: Vec<(String, Key, i64)> = Vec::new();
            for id in 0..40i64 {
                let (t, k) = (format!("t{}", next(2)), key(&[Some(&next(5).to_string())]));
                held.add(&t, k.clone(), id);
                oracle.push((t, k, id));
            }
            for _ in 0..20 {
                let (t, k) = (format!("t{}", next(2)), key(&[Some(&next(5).to_string())]));
                let below = (next(2) == 0).then(|| next(45) as i64);
                let want: Vec<i64> = oracle
                    .iter()
                    .filter(|(ot, ok, id)| *ot == t && *ok == k && below.is_none_or(|b| *id < b))
                    .map(|o| o.2)
                    .collect();
                assert_eq!(held.first(&t, &k, below), want.first().copied());
                match next(3) {
                    0 => {
                        let id = next(40) as i64;
                        held.remove(id);
                        oracle.retain(|o| o.2 != id);
                    }
                    1 => {
                        let mut got = held.take_table(&t, below);
                        got.sort_unstable();
                        let mut want: Vec<i64> = oracle
                            .iter()
                            .filter(|(ot, _, id)| *ot == t && below.is_none_or(|b| *id < b))
                            .map(|o| o.2)
                            .collect();
                        want.sort_unstable();
                        assert_eq!(got, want);
                        oracle.retain(|(ot, _, id)| !(*ot == t && below.is_none_or(|b| *id < b)));
                    }
                    _ => {
                        assert_eq!(held.take(&t, &k, below), want);
                        oracle.retain(|(ot, ok, id)| {
                            !(*ot == t && *ok == k && below.is_none_or(|b| *id < b))
                        });
                    }
                }
                for t in ["t0", "t1"] {
                    assert_eq!(held.has_table(t), oracle.iter().any(|o| o.0 == t));
                }
            }
        }
    }
}

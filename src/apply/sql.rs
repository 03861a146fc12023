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
///
/// Every insert into a target table says `OVERRIDING SYSTEM VALUE`: the source's value of a
/// `GENERATED ALWAYS AS IDENTITY` column is the row's value (PostgreSQL refuses it otherwise),
/// and the clause changes nothing for other columns. Such a column outside the key (`fixed`)
/// is left out of the `DO UPDATE SET` list: PostgreSQL lets no UPDATE set it (the statement
/// would be refused even for inserts), so it keeps the value the row was inserted with.
pub fn upsert(schema: &str, table: &str, columns: &[&str], key: &[&str], fixed: &[&str]) -> String {
    upsert_with(schema, table, columns, key, fixed, &[])
}

/// [`upsert`] whose `DO UPDATE` also sets `defaults` (columns it does not insert, so an
/// inserted row gets their DEFAULT as well) to their DEFAULT.
fn upsert_with(
    schema: &str,
    table: &str,
    columns: &[&str],
    key: &[&str],
    fixed: &[&str],
    defaults: &[String],
) -> String {
    let cols: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
    let mut sql = format!(
        "INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE VALUES ({})",
        qualified(schema, table),
        cols.join(", "),
        placeholders(1, columns.len()).join(", ")
    );
    if !key.is_empty() {
        let keys: Vec<String> = key.iter().map(|k| quote_ident(k)).collect();
        let updates: Vec<String> = columns
            .iter()
            .filter(|c| !key.contains(c) && !fixed.contains(c))
            .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(c)))
            .chain(
                defaults
                    .iter()
                    .map(|c| format!("{} = DEFAULT", quote_ident(c))),
            )
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

/// `ctid = (…)` of one row of `t` whose `columns` equal parameters `$1`… in order (NULL
/// equal to NULL): a keyless table's row by its old image.
fn one_row_matching(t: &str, columns: &[&str]) -> String {
    let matches: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{} IS NOT DISTINCT FROM ${}", quote_ident(c), i + 1))
        .collect();
    format!(
        "ctid = (SELECT ctid FROM {t} WHERE {} LIMIT 1)",
        matches.join(" AND ")
    )
}

/// Deletes one row equal to the old image, for keyless tables with REPLICA IDENTITY FULL.
/// Parameters: `columns`.
pub fn delete_one_matching(schema: &str, table: &str, columns: &[&str]) -> String {
    let t = qualified(schema, table);
    format!("DELETE FROM {t} WHERE {}", one_row_matching(&t, columns))
}

/// Updates one row equal to the old image to the new one, for keyless tables with REPLICA
/// IDENTITY FULL; where no row equals the old image, inserts the new one (a snapshot of the
/// table left the row to this change, or the target lacked it). Parameters: `columns` of the
/// old image, then the same `columns` of the new one.
pub fn update_one_matching(schema: &str, table: &str, columns: &[&str]) -> String {
    let n = columns.len();
    let sets: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{} = ${}", quote_ident(c), n + i + 1))
        .collect();
    let names: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
    let new: Vec<String> = (0..n).map(|i| format!("${}", n + i + 1)).collect();
    let t = qualified(schema, table);
    format!(
        "WITH changed AS (UPDATE {t} SET {} WHERE {} RETURNING 1) \
         INSERT INTO {t} ({}) SELECT {} WHERE NOT EXISTS (SELECT FROM changed)",
        sets.join(", "),
        one_row_matching(&t, columns),
        names.join(", "),
        new.join(", ")
    )
}

/// Words that may stand beside the one type name in `format_type`'s output
/// (`double precision`, `timestamp(3) with time zone`, `interval day to second`, …).
const TYPE_KEYWORDS: &[&str] = &[
    "double",
    "precision",
    "character",
    "varying",
    "bit",
    "timestamp",
    "time",
    "with",
    "without",
    "zone",
    "interval",
    "year",
    "month",
    "day",
    "hour",
    "minute",
    "second",
    "to",
    "national",
    "char",
];

/// True for type names as `format_type` prints them, and nothing else: an optionally
/// schema-qualified name (plain or double-quoted, no embedded quotes) or one of SQL's
/// multi-word names, with an optional modifier `(n[,m])` and array brackets `[]`/`[n]`. This
/// text is the only part of `apply.create_tables` DDL taken from the stream, so anything
/// beyond a type name (`DEFAULT …`, `COLLATE`, `;`, comments, a second identifier) is refused;
/// the applier then also checks that the name resolves in the target's `pg_type`.
pub fn is_safe_type_name(name: &str) -> bool {
    if name.is_empty() || name.len() > 200 {
        return false;
    }
    let mut chars = name.chars().peekable();
    let mut free_names = 0;
    let mut keywords = 0;
    let mut qualified = false;
    let mut last_was_name = false;
    let mut after_modifier = false;
    let mut in_brackets = false;
    while let Some(c) = chars.next() {
        match c {
            ' ' => last_was_name = false,
            '"' => {
                let mut quoted = String::new();
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some(c) => quoted.push(c),
                        None => return false,
                    }
                }
                if quoted.is_empty() || last_was_name || in_brackets || after_modifier {
                    return false;
                }
                free_names += 1;
                last_was_name = true;
            }
            c if c.is_alphabetic() || c == '_' => {
                let mut word = String::from(c);
                while let Some(c) = chars.next_if(|c| c.is_alphanumeric() || *c == '_' || *c == '$')
                {
                    word.push(c);
                }
                if last_was_name || in_brackets {
                    return false;
                }
                if TYPE_KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) && !qualified {
                    keywords += 1;
                } else if after_modifier {
                    return false;
                } else {
                    free_names += 1;
                }
                last_was_name = true;
            }
            '.' => {
                if !last_was_name || qualified || free_names != 1 || keywords > 0 {
                    return false;
                }
                qualified = true;
                free_names = 0;
                last_was_name = false;
                // The name after the dot must follow at once.
                if !chars
                    .peek()
                    .is_some_and(|c| c.is_alphabetic() || *c == '_' || *c == '"')
                {
                    return false;
                }
            }
            '(' => {
                if after_modifier || in_brackets || (free_names + keywords) == 0 {
                    return false;
                }
                let mut numbers = 0;
                let mut digits = 0;
                loop {
                    match chars.next() {
                        Some(d) if d.is_ascii_digit() => digits += 1,
                        Some(',') if digits > 0 && numbers == 0 => {
                            numbers += 1;
                            digits = 0;
                            while chars.next_if_eq(&' ').is_some() {}
                        }
                        Some(')') if digits > 0 => break,
                        _ => return false,
                    }
                }
                after_modifier = true;
                last_was_name = false;
            }
            '[' => {
                if (free_names + keywords) == 0 || in_brackets {
                    return false;
                }
                in_brackets = true;
            }
            d if d.is_ascii_digit() && in_brackets => {}
            ']' if in_brackets => in_brackets = false,
            _ => return false,
        }
        if free_names > 1 {
            return false;
        }
    }
    // One name, or SQL's multi-word keywords alone: never a name beside keywords ("default
    // character" is neither).
    !in_brackets
        && ((free_names == 1 && keywords == 0) || (free_names == 0 && keywords > 0 && !qualified))
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

/// A column with its target type as `format_type` prints it (trusted: read from the target's
/// own catalog), for statements that cast their parameters explicitly.
#[derive(Debug, Clone, Copy)]
pub struct Typed<'a> {
    /// Column name.
    pub name: &'a str,
    /// Type name.
    pub ty: &'a str,
    /// Written by inserts only: `GENERATED ALWAYS AS IDENTITY` outside the key on the target,
    /// which PostgreSQL lets no UPDATE set (see [`upsert`]); left out of every SET list.
    pub fixed: bool,
}

/// The names of `columns` that are [`Typed::fixed`].
fn fixed_names<'a>(columns: &[Typed<'a>]) -> Vec<&'a str> {
    columns.iter().filter(|c| c.fixed).map(|c| c.name).collect()
}

/// What a multi-master write of a remote row sets besides the columns the row carries: a
/// remote row is the whole row, so every target column it does not carry (`defaults`: its
/// node did not have the column when it wrote) is set to its DEFAULT, as that node's own row
/// got it when the column reached it. The statement first checks that the table has not
/// changed since it was described (`shape`, see [`same_shape`]), so that no column escapes
/// `defaults` and no value is cast to a column's old type.
#[derive(Debug, Clone, Copy)]
pub struct WholeRow<'a> {
    /// Target columns set to their DEFAULT.
    pub defaults: &'a [String],
    /// The table's shape as described ([`crate::apply::target::TargetTable::shape`]).
    pub shape: &'a str,
}

/// The check of [`crate::apply::multimaster::same_shape_function`] as a condition, evaluated
/// once per statement.
fn same_shape(schema: &str, table: &str, shape: &str) -> String {
    format!(
        "(SELECT pgferry.same_shape({}::regclass, {}::text))",
        crate::sql::quote_literal(&qualified(schema, table)),
        crate::sql::quote_literal(shape)
    )
}

/// `"k1" = $n::type AND …` over a table alias.
fn typed_key_predicate(alias: &str, key: &[Typed<'_>], first_param: usize) -> String {
    key.iter()
        .enumerate()
        .map(|(i, k)| {
            format!(
                "{alias}.{} = ${}::{}",
                quote_ident(k.name),
                first_param + i,
                k.ty
            )
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// The version-store key of the key columns' `values` (typed SQL expressions, in the
/// columns' table order): the text of a jsonb array of them, built from typed values so that
/// it equals what the version trigger builds. jsonb prints one canonical text per value, and
/// `pgferry.versions.key` is `text COLLATE "C"`: its index compares bytes, about twice as fast
/// per stamped row as comparing jsonb values was. Values only, not the columns' names: a key
/// column renamed on one node keeps its rows' versions (an object keyed by names orphaned
/// them, and an older write from a node that had not seen the rename won over a newer one).
fn version_key_of(values: &[String]) -> String {
    format!("jsonb_build_array({})::text", values.join(", "))
}

/// The version-store key of a change's key, from parameters `$first_param…`.
fn version_key(key: &[Typed<'_>], first_param: usize) -> String {
    let values: Vec<String> = key
        .iter()
        .enumerate()
        .map(|(i, k)| format!("${}::{}", first_param + i, k.ty))
        .collect();
    version_key_of(&values)
}

/// Whether the live row `t` equals the old image, column by column as text (`NULL::bool`
/// when there is no old image); `value(i, column)` spells the old image's value.
fn matches_before(before: &[Typed<'_>], value: impl Fn(usize, &Typed<'_>) -> String) -> String {
    if before.is_empty() {
        return "NULL::bool".to_owned();
    }
    before
        .iter()
        .enumerate()
        .map(|(i, c)| {
            format!(
                "t.{}::text IS NOT DISTINCT FROM {}::text",
                quote_ident(c.name),
                value(i, c)
            )
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// What this node holds for a key, locking the live row (if any) so that no local writer
/// changes it until the apply commits. One row of: whether a live row exists, the row as jsonb,
/// whether it equals the remote old image (`before`; NULL when empty); then the key's
/// version (`t`, `node`, `deleted`; NULL when it has none). Parameters: `key`, then `before`;
/// `$n+1` is the table name.
pub fn probe(schema: &str, table: &str, key: &[Typed<'_>], before: &[Typed<'_>]) -> String {
    let first_before = key.len() + 1;
    let matches = matches_before(before, |i, c| format!("${}::{}", first_before + i, c.ty));
    let table_param = first_before + before.len();
    format!(
        "SELECT r.local_row IS NOT NULL, r.local_row::text, r.matches, v.t, v.node::text, v.deleted \
           FROM (SELECT 1) AS one \
           LEFT JOIN LATERAL (\
             SELECT to_jsonb(t) AS local_row, ({matches}) AS matches \
               FROM ONLY {t} AS t WHERE {key_pred} FOR UPDATE) AS r ON true \
           LEFT JOIN LATERAL (\
             SELECT v.t, v.node, v.deleted FROM pgferry.versions AS v \
              WHERE v.table_name = ${table_param}::text AND v.key = {vkey}) AS v ON true",
        t = qualified(schema, table),
        key_pred = typed_key_predicate("t", key, 1),
        vkey = version_key(key, 1),
    )
}

/// Sets a key's version if the new one is greater than the stored one (or equal, when `$5`
/// allows it), taking the key's version lock; returns a row only when it did. This is the
/// decision's guard: a writer that stamped the key between the probe and here makes it
/// return nothing, and the change is decided again. A tombstone also records where its
/// delete sits (`$6` the stream's node, `$7` its commit LSN). Parameters: table name, `t`,
/// node, deleted, allow-equal, seen node, seen LSN, then `key`.
pub fn stamp_version(key: &[Typed<'_>]) -> String {
    format!(
        "{} RETURNING 1",
        stamp(&version_key(key, 8), 1, "$4::bool", 5, false, false)
    )
}

/// The extra guard of a tombstone stamp (after `WHERE` of the version upsert, `v` the stored
/// version): the stored version must be the one the statement's snapshot holds. A delete
/// statement deletes the rows its snapshot sees, but a version stamp waits for a writer that
/// holds the key and then sees its commit: had that writer inserted the row (a local INSERT,
/// another node's worker), the stamp would win over its version while the DELETE, blind to
/// the row, left it in place, and this node alone would keep it. With the guard such a stamp
/// does not happen, and the change is decided again with a new snapshot.
const UNCHANGED_SINCE_SNAPSHOT: &str = " AND EXISTS (SELECT 1 FROM pgferry.versions AS seen \
     WHERE seen.table_name = v.table_name AND seen.key = v.key \
       AND (seen.t, seen.node) = (v.t, v.node))";

/// The guarded upsert of a key's version: `key` the version-store key expression, `$p..$p+2` table
/// name, `t`, node; `deleted` an expression; `$a` allow-equal, `$a+1`/`$a+2` seen node and
/// LSN. `only_new`: stamp only a key without any version (allow-equal then plays no part).
/// `deleting`: a tombstone stamp whose statement also deletes the row
/// ([`UNCHANGED_SINCE_SNAPSHOT`]).
fn stamp(key: &str, p: usize, deleted: &str, a: usize, only_new: bool, deleting: bool) -> String {
    if only_new {
        return format!(
            "INSERT INTO pgferry.versions AS v (table_name, key, t, node, deleted, seen_node, seen_lsn) \
             VALUES (${p}::text, {key}, ${t}::int8, ${n}::text, {deleted} AND ${a}::bool, \
                     CASE WHEN {deleted} THEN ${sn}::text END, CASE WHEN {deleted} THEN ${sl}::pg_lsn END) \
             ON CONFLICT (table_name, key) DO NOTHING",
            t = p + 1,
            n = p + 2,
            sn = a + 1,
            sl = a + 2,
        );
    }
    format!(
        "INSERT INTO pgferry.versions AS v (table_name, key, t, node, deleted, seen_node, seen_lsn) \
         VALUES (${p}::text, {key}, ${t}::int8, ${n}::text, {deleted}, \
                 CASE WHEN {deleted} THEN ${sn}::text END, CASE WHEN {deleted} THEN ${sl}::pg_lsn END) \
         ON CONFLICT (table_name, key) DO UPDATE \
            SET t = EXCLUDED.t, node = EXCLUDED.node, deleted = EXCLUDED.deleted, \
                seen_node = EXCLUDED.seen_node, seen_lsn = EXCLUDED.seen_lsn \
          WHERE ((v.t, v.node) < (EXCLUDED.t, EXCLUDED.node) \
             OR (${a}::bool AND (v.t, v.node) = (EXCLUDED.t, EXCLUDED.node))){}",
        if deleting { UNCHANGED_SINCE_SNAPSHOT } else { "" },
        t = p + 1,
        n = p + 2,
        sn = a + 1,
        sl = a + 2,
    )
}

/// Stamps the remote version and, only if it won, upserts the row, in one statement; returns
/// one row: 1 if the version won (and the row was written), 0 if a newer version was stamped
/// since the probe. Parameters: `columns` (typed), then table name, `t`, node, allow-equal,
/// seen node, seen LSN (the last two unused: a live version has none).
pub fn stamp_and_upsert(
    schema: &str,
    table: &str,
    columns: &[Typed<'_>],
    key: &[&str],
    whole: WholeRow<'_>,
) -> String {
    versioned_upsert(schema, table, columns, key, whole, false)
}

fn versioned_upsert(
    schema: &str,
    table: &str,
    columns: &[Typed<'_>],
    key: &[&str],
    whole: WholeRow<'_>,
    only_new: bool,
) -> String {
    let n = columns.len();
    let key_expr = version_key_of(
        &key.iter()
            .filter_map(|k| {
                let i = columns.iter().position(|c| c.name == *k)?;
                Some(format!("${}::{}", i + 1, columns[i].ty))
            })
            .collect::<Vec<_>>(),
    );
    let names: Vec<&str> = columns.iter().map(|c| c.name).collect();
    let cols: Vec<String> = names.iter().map(|c| quote_ident(c)).collect();
    let values: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("${}::{}", i + 1, c.ty))
        .collect();
    let conflict = upsert_with(
        schema,
        table,
        &names,
        key,
        &fixed_names(columns),
        whole.defaults,
    );
    let on_conflict = conflict
        .find(" ON CONFLICT")
        .map(|i| &conflict[i..])
        .unwrap_or_default();
    format!(
        "WITH s AS ({} RETURNING 1), \
              w AS (INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} WHERE EXISTS (SELECT 1 FROM s) AND {}{on_conflict} RETURNING 1) \
         SELECT (SELECT count(*) FROM s)::int8, (SELECT count(*) FROM w)::int8",
        stamp(&key_expr, n + 1, "false", n + 4, only_new, false),
        qualified(schema, table),
        cols.join(", "),
        values.join(", "),
        same_shape(schema, table, whole.shape),
    )
}

/// The fast path of an insert: stamps the version only if the key has none at all, and then
/// writes the row, in one statement; returns 1 when it did, 0 when the key has a version (the
/// change then goes the full way: probe, decide, stamp). Same parameters as
/// [`stamp_and_upsert`].
pub fn insert_fresh(
    schema: &str,
    table: &str,
    columns: &[Typed<'_>],
    key: &[&str],
    whole: WholeRow<'_>,
) -> String {
    versioned_upsert(schema, table, columns, key, whole, true)
}

/// Stamps the remote tombstone and, only if it won, deletes the row, in one statement;
/// returns one row: 1 if the version won, 0 if a newer one was stamped since the probe.
/// Parameters: `key` (typed), then table name, `t`, node, allow-equal, seen node, seen LSN.
pub fn stamp_and_delete(schema: &str, table: &str, key: &[Typed<'_>]) -> String {
    let n = key.len();
    format!(
        "WITH s AS ({} RETURNING 1), \
              d AS (DELETE FROM ONLY {} AS t WHERE {} AND EXISTS (SELECT 1 FROM s) RETURNING 1) \
         SELECT (SELECT count(*) FROM s)::int8, (SELECT count(*) FROM d)::int8",
        stamp(&version_key(key, 1), n + 1, "true", n + 4, false, true),
        qualified(schema, table),
        typed_key_predicate("t", key, 1),
    )
}

/// The local rows that hold, in one of the unique indexes `uniques` (column lists), the values
/// of the remote row `$1` (jsonb) under another key: each row's key (as the version store
/// spells it), version, and key as a jsonb object of its columns (what
/// [`drop_unique_loser`] deletes by, and the conflict log shows). Parameters: the remote row,
/// the table name.
pub fn unique_holders(schema: &str, table: &str, key: &[&str], uniques: &[Vec<String>]) -> String {
    let t = qualified(schema, table);
    let same = |cols: &[&str]| -> String {
        cols.iter()
            .map(|c| format!("t.{0} = m.{0}", quote_ident(c)))
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    let any_unique: Vec<String> = uniques
        .iter()
        .map(|u| {
            let cols: Vec<&str> = u.iter().map(String::as_str).collect();
            format!("({})", same(&cols))
        })
        .collect();
    let values: Vec<String> = key
        .iter()
        .map(|k| format!("t.{}", quote_ident(k)))
        .collect();
    let pairs: Vec<String> = key
        .iter()
        .map(|k| format!("{}, t.{}", crate::sql::quote_literal(k), quote_ident(k)))
        .collect();
    format!(
        "SELECT k.key::text, v.t, v.node::text, jsonb_build_object({pairs})::text \
           FROM ONLY {t} AS t \
           CROSS JOIN jsonb_populate_record(NULL::{t}, $1::text::jsonb) AS m \
           CROSS JOIN LATERAL (SELECT {key} AS key) AS k \
           LEFT JOIN pgferry.versions AS v ON v.table_name = $2::text AND v.key = k.key \
          WHERE ({any}) AND NOT ({same_key})",
        key = version_key_of(&values),
        pairs = pairs.join(", "),
        any = any_unique.join(" OR "),
        same_key = same(key),
    )
}

/// Deletes the row whose key columns are those of `$5` (a jsonb object) and marks its
/// version (version-store key `$1`) deleted, keeping the version (the row lost a unique-key
/// contest; it is not a new write), seen in stream `$3` at `$4`. Parameters: version key,
/// table name, seen node, seen LSN, key object (see [`unique_holders`]).
pub fn drop_unique_loser(schema: &str, table: &str, key: &[&str]) -> String {
    let t = qualified(schema, table);
    let cols: Vec<String> = key.iter().map(|k| quote_ident(k)).collect();
    let picked: Vec<String> = key
        .iter()
        .map(|k| format!("m.{}", quote_ident(k)))
        .collect();
    format!(
        "WITH gone AS (DELETE FROM ONLY {t} AS t WHERE ({cols}) = \
             (SELECT {picked} FROM jsonb_populate_record(NULL::{t}, $5::text::jsonb) AS m) RETURNING 1) \
         INSERT INTO pgferry.versions AS v (table_name, key, t, node, deleted, seen_node, seen_lsn) \
         VALUES ($2::text, $1::text, -9223372036854775808, '', true, $3::text, $4::text::pg_lsn) \
         ON CONFLICT (table_name, key) DO UPDATE \
            SET deleted = true, seen_node = EXCLUDED.seen_node, seen_lsn = EXCLUDED.seen_lsn",
        cols = cols.join(", "),
        picked = picked.join(", "),
    )
}

/// Calls a resolver: `f(table, local, remote, local_version, remote_version)`. The remote
/// row is passed through `jsonb_populate_record`, so both rows have the same JSON shapes.
/// Parameters: table name, local row, remote row, local version, remote version.
pub fn call_resolver(function: &str, schema: &str, table: &str) -> String {
    let f: Vec<String> = function.split('.').map(quote_ident).collect();
    format!(
        "SELECT ({}($1::text, $2::jsonb, to_jsonb(jsonb_populate_record(NULL::{}, $3::jsonb)), $4::jsonb, $5::jsonb))::text",
        f.join("."),
        qualified(schema, table)
    )
}

/// Writes a resolver's merged row over the live row: `columns`, every column an update may
/// set, from the table's description as of `shape` (checked, see [`same_shape`]). Parameters:
/// the merged jsonb, then `key`.
pub fn write_merged(
    schema: &str,
    table: &str,
    columns: &[&str],
    key: &[Typed<'_>],
    shape: &str,
) -> String {
    let cols: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
    let picked: Vec<String> = columns
        .iter()
        .map(|c| format!("m.{}", quote_ident(c)))
        .collect();
    let t = qualified(schema, table);
    format!(
        "UPDATE ONLY {t} AS t SET ({}) = (SELECT {} FROM jsonb_populate_record(NULL::{t}, $1::jsonb) AS m) WHERE {} AND {}",
        cols.join(", "),
        picked.join(", "),
        typed_key_predicate("t", key, 2),
        same_shape(schema, table, shape),
    )
}

/// `unnest` over one text array per column from `$first`, named `u(c1, …)`, followed by
/// `extra` (already-typed arrays with their alias names), `WITH ORDINALITY` as `ord`.
fn unnest_rows(columns: usize, first: usize, extra: &[(&str, &str)]) -> String {
    let mut arrays: Vec<String> = (0..columns)
        .map(|i| format!("${}::text[]", first + i))
        .collect();
    let mut names: Vec<String> = (1..=columns).map(|i| format!("c{i}")).collect();
    for (i, (ty, name)) in extra.iter().enumerate() {
        arrays.push(format!("${}::{ty}[]", first + columns + i));
        names.push((*name).to_owned());
    }
    names.push("ord".to_owned());
    format!(
        "unnest({}) WITH ORDINALITY AS u({})",
        arrays.join(", "),
        names.join(", ")
    )
}

/// The typed value of column `i` (0-based) of `u`.
fn row_value(i: usize, ty: &str) -> String {
    format!("u.c{}::{ty}", i + 1)
}

/// `alias."k" = u.cN::type AND …`, key columns at positions `at` of `u`.
fn row_key_predicate(alias: &str, key: &[(usize, Typed<'_>)]) -> String {
    key.iter()
        .map(|(i, k)| format!("{alias}.{} = {}", quote_ident(k.name), row_value(*i, k.ty)))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// The version-store key of each row of `u` (see [`version_key`]).
fn row_version_key(key: &[(usize, Typed<'_>)]) -> String {
    let values: Vec<String> = key.iter().map(|(i, k)| row_value(*i, k.ty)).collect();
    version_key_of(&values)
}

/// Where each key column sits among `columns`.
fn key_positions<'a>(columns: &[Typed<'a>], key: &[&str]) -> Vec<(usize, Typed<'a>)> {
    key.iter()
        .filter_map(|k| {
            let i = columns.iter().position(|c| c.name == *k)?;
            Some((i, columns[i]))
        })
        .collect()
}

/// The parts of a multi-row upsert of `columns` from `u`: the quoted column list, the
/// typed values, and the `ON CONFLICT` clause of [`upsert`].
fn row_upsert_parts(
    columns: &[Typed<'_>],
    key: &[&str],
    defaults: &[String],
) -> (String, String, String) {
    let names: Vec<&str> = columns.iter().map(|c| c.name).collect();
    let single = upsert_with("s", "t", &names, key, &fixed_names(columns), defaults);
    let on_conflict = single
        .find(" ON CONFLICT")
        .map(|i| single[i..].to_owned())
        .unwrap_or_default();
    let cols: Vec<String> = names.iter().map(|c| quote_ident(c)).collect();
    let values: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| row_value(i, c.ty))
        .collect();
    (cols.join(", "), values.join(", "), on_conflict)
}

/// Many rows of [`upsert`] in one statement. Parameters: one text array per column.
pub fn upsert_rows(schema: &str, table: &str, columns: &[Typed<'_>], key: &[&str]) -> String {
    let (cols, values, on_conflict) = row_upsert_parts(columns, key, &[]);
    format!(
        "INSERT INTO {} ({cols}) OVERRIDING SYSTEM VALUE SELECT {values} FROM {}{on_conflict}",
        qualified(schema, table),
        unnest_rows(columns.len(), 1, &[]),
    )
}

/// Many rows of [`update`] in one statement. Parameters: one text array per `set` column,
/// then per `key` column.
pub fn update_rows(schema: &str, table: &str, set: &[Typed<'_>], key: &[Typed<'_>]) -> String {
    let sets: Vec<String> = set
        .iter()
        .enumerate()
        .filter(|(_, c)| !c.fixed)
        .map(|(i, c)| format!("{} = {}", quote_ident(c.name), row_value(i, c.ty)))
        .collect();
    let rows = unnest_rows(set.len() + key.len(), 1, &[]);
    if sets.is_empty() {
        // Only columns no UPDATE may set: nothing to write (the arrays are still read, so
        // that every parameter has a type).
        return format!("SELECT count(*) FROM {rows}");
    }
    let key: Vec<(usize, Typed<'_>)> = key
        .iter()
        .enumerate()
        .map(|(i, k)| (set.len() + i, *k))
        .collect();
    format!(
        "UPDATE {} AS t SET {} FROM {rows} WHERE {}",
        qualified(schema, table),
        sets.join(", "),
        row_key_predicate("t", &key),
    )
}

/// Many rows of [`delete`] in one statement. Parameters: one text array per key column.
pub fn delete_rows(schema: &str, table: &str, key: &[Typed<'_>]) -> String {
    let key: Vec<(usize, Typed<'_>)> = key.iter().copied().enumerate().collect();
    format!(
        "DELETE FROM {} AS t USING {} WHERE {}",
        qualified(schema, table),
        unnest_rows(key.len(), 1, &[]),
        row_key_predicate("t", &key),
    )
}

/// Deletes the rows of a key range that are not among given keys: a re-snapshot's pruning
/// (see [`crate::event::PruneRange`]). Parameters: the exclusive lower bound's values when
/// `after`, the inclusive upper bound's when `through` (one text per key column each), then
/// one text array per key column of the keys that stay. The bounds compare the key as a row,
/// as the source's chunk query did; `only`: the table is read without its inheritance
/// children (a partitioned table is not, its rows are in its partitions).
pub fn prune_range(
    schema: &str,
    table: &str,
    key: &[Typed<'_>],
    after: bool,
    through: bool,
    only: bool,
) -> String {
    let columns: Vec<String> = key
        .iter()
        .map(|k| format!("t.{}", quote_ident(k.name)))
        .collect();
    let columns = format!("({})", columns.join(", "));
    let mut next = 1;
    let mut bound = || {
        let values: Vec<String> = key
            .iter()
            .map(|k| {
                let value = format!("${next}::text::{}", k.ty);
                next += 1;
                value
            })
            .collect();
        format!("({})", values.join(", "))
    };
    let mut conditions = Vec::new();
    if after {
        conditions.push(format!("{columns} > {}", bound()));
    }
    if through {
        conditions.push(format!("{columns} <= {}", bound()));
    }
    let keyed: Vec<(usize, Typed<'_>)> = key.iter().copied().enumerate().collect();
    conditions.push(format!(
        "NOT EXISTS (SELECT 1 FROM {} WHERE {})",
        unnest_rows(key.len(), next, &[]),
        row_key_predicate("t", &keyed)
    ));
    format!(
        "DELETE FROM {}{} AS t WHERE {}",
        if only { "ONLY " } else { "" },
        qualified(schema, table),
        conditions.join(" AND ")
    )
}

/// [`probe`] for many keys in one statement: one row per key, in input order, of its
/// ordinal (1-based), whether a live row exists, the row as jsonb text (only when it does not
/// equal the old image: a conflict may need it), whether it equals the old image (NULL when
/// `before` is empty), and the key's version `t`, `node`. Locks every live row. Parameters:
/// one text array per key column, then per `before` column; then the table name.
pub fn probe_rows(schema: &str, table: &str, key: &[Typed<'_>], before: &[Typed<'_>]) -> String {
    let keyed: Vec<(usize, Typed<'_>)> = key.iter().copied().enumerate().collect();
    let matches = matches_before(before, |i, c| row_value(key.len() + i, c.ty));
    let table_param = key.len() + before.len() + 1;
    format!(
        "SELECT u.ord, r.found IS NOT NULL, r.local_row, r.matches, v.t, v.node::text \
           FROM {rows} \
           LEFT JOIN LATERAL (\
             SELECT true AS found, \
                    CASE WHEN ({matches}) IS DISTINCT FROM true THEN to_jsonb(t)::text END AS local_row, \
                    ({matches}) AS matches \
               FROM ONLY {t} AS t WHERE {key_pred} FOR UPDATE) AS r ON true \
           LEFT JOIN LATERAL (\
             SELECT v.t, v.node FROM pgferry.versions AS v \
              WHERE v.table_name = ${table_param}::text AND v.key = {vkey} LIMIT 1) AS v ON true \
          ORDER BY u.ord",
        rows = unnest_rows(key.len() + before.len(), 1, &[]),
        t = qualified(schema, table),
        key_pred = row_key_predicate("t", &keyed),
        vkey = row_version_key(&keyed),
    )
}

/// The guarded version upsert of [`stamp`] for every row of `from` (a relation of `u`'s
/// columns, named `u`): `deleted` and the seen node and LSN are expressions over `u` and
/// parameters. `deleting`: tombstones of a statement that also deletes the rows
/// ([`UNCHANGED_SINCE_SNAPSHOT`]).
fn stamp_rows(
    from: &str,
    vkey: &str,
    table_param: usize,
    (deleted, deleting): (&str, bool),
    seen: (&str, &str),
) -> String {
    format!(
        "INSERT INTO pgferry.versions AS v (table_name, key, t, node, deleted, seen_node, seen_lsn) \
         SELECT ${table_param}::text, {vkey}, u.t, u.node, {deleted}, {}, {} FROM {from} \
         ON CONFLICT (table_name, key) DO UPDATE \
            SET t = EXCLUDED.t, node = EXCLUDED.node, deleted = EXCLUDED.deleted, \
                seen_node = EXCLUDED.seen_node, seen_lsn = EXCLUDED.seen_lsn \
          WHERE (v.t, v.node) < (EXCLUDED.t, EXCLUDED.node){} \
         RETURNING v.key",
        seen.0,
        seen.1,
        if deleting { UNCHANGED_SINCE_SNAPSHOT } else { "" }
    )
}

/// [`stamp_and_upsert`] for many rows in one statement: stamps each row's version where it is
/// still greater than the stored one and upserts exactly those rows; returns the ordinals
/// (1-based) of the rows written. Rows not returned lost to a version stamped since the
/// probe. Parameters: one text array per column, an `int8` array of `t`, a text array of
/// nodes, then the table name.
pub fn stamp_and_upsert_rows(
    schema: &str,
    table: &str,
    columns: &[Typed<'_>],
    key: &[&str],
    whole: WholeRow<'_>,
) -> String {
    let n = columns.len();
    let keyed = key_positions(columns, key);
    let vkey = row_version_key(&keyed);
    let (cols, values, on_conflict) = row_upsert_parts(columns, key, whole.defaults);
    format!(
        "WITH u AS (SELECT * FROM {rows}), \
              s AS ({stamp}), \
              w AS (INSERT INTO {t} ({cols}) OVERRIDING SYSTEM VALUE SELECT {values} FROM u \
                     WHERE {vkey} IN (SELECT key FROM s) AND {guard}{on_conflict}) \
         SELECT u.ord FROM u WHERE {vkey} IN (SELECT key FROM s)",
        rows = unnest_rows(n, 1, &[("int8", "t"), ("text", "node")]),
        stamp = stamp_rows(
            "u",
            &vkey,
            n + 3,
            ("false", false),
            ("NULL::text", "NULL::pg_lsn")
        ),
        t = qualified(schema, table),
        guard = same_shape(schema, table, whole.shape),
    )
}

/// The clean update of many rows, decided and written by one statement: each row of `u`
/// whose live row equals its old image (`before`, compared as [`probe_rows`] does) is locked,
/// its version stamped where it is still greater than the stored one, and exactly those rows
/// updated; returns the ordinals (1-based) of the rows written. That is what
/// [`crate::apply::conflict::decide`] settles without a conflict for an update whose local
/// row matches and is older, so a written row needs nothing else; every other row (no live
/// row, a different one, a version not older) is left untouched, locked at most, for the
/// probe. Rows are locked before their versions are stamped, in the order local writers take
/// them. Parameters: one text array per column, per `before` column, an `int8` array of `t`,
/// a text array of nodes, then the table name. `columns` must hold a column besides the key.
pub fn clean_update_rows(
    schema: &str,
    table: &str,
    columns: &[Typed<'_>],
    key: &[&str],
    before: &[Typed<'_>],
    whole: WholeRow<'_>,
) -> String {
    let n = columns.len();
    let keyed = key_positions(columns, key);
    let vkey = row_version_key(&keyed);
    let matches = matches_before(before, |i, c| row_value(n + i, c.ty));
    let sets: Vec<String> = columns
        .iter()
        .enumerate()
        .filter(|(_, c)| !key.contains(&c.name) && !c.fixed)
        .map(|(i, c)| format!("{} = {}", quote_ident(c.name), row_value(i, c.ty)))
        .chain(
            whole
                .defaults
                .iter()
                .map(|c| format!("{} = DEFAULT", quote_ident(c))),
        )
        .collect();
    let t = qualified(schema, table);
    let key_pred = row_key_predicate("t", &keyed);
    // Only columns no UPDATE may set: the versions are stamped, the rows stay as they are.
    let write = if sets.is_empty() {
        String::new()
    } else {
        format!(
            ", w AS (UPDATE ONLY {t} AS t SET {} FROM u \
                      WHERE {key_pred} AND {vkey} IN (SELECT key FROM s))",
            sets.join(", "),
        )
    };
    format!(
        "WITH u AS (SELECT * FROM {rows}), \
              r AS (SELECT u.* FROM u CROSS JOIN LATERAL (\
                      SELECT 1 FROM ONLY {t} AS t WHERE {key_pred} AND {matches} FOR UPDATE) AS l), \
              s AS ({stamp}){write} \
         SELECT u.ord FROM u WHERE {vkey} IN (SELECT key FROM s) AND {guard}",
        rows = unnest_rows(n + before.len(), 1, &[("int8", "t"), ("text", "node")]),
        stamp = stamp_rows(
            "r AS u",
            &vkey,
            n + before.len() + 3,
            ("false", false),
            ("NULL::text", "NULL::pg_lsn")
        ),
        guard = same_shape(schema, table, whole.shape),
    )
}

/// [`stamp_and_delete`] for many keys in one statement; returns the ordinals of the keys
/// whose tombstone won (and whose row, if any, is deleted). Parameters: one text array per
/// key column, an `int8` array of `t`, a text array of nodes, a text array of commit LSNs
/// (where each delete sits in the stream), then the table name and the stream's node.
pub fn stamp_and_delete_rows(schema: &str, table: &str, key: &[Typed<'_>]) -> String {
    let n = key.len();
    let keyed: Vec<(usize, Typed<'_>)> = key.iter().copied().enumerate().collect();
    let vkey = row_version_key(&keyed);
    format!(
        "WITH u AS (SELECT * FROM {rows}), \
              s AS ({stamp}), \
              d AS (DELETE FROM ONLY {t} AS t USING u \
                     WHERE {key_pred} AND {vkey} IN (SELECT key FROM s)) \
         SELECT u.ord FROM u WHERE {vkey} IN (SELECT key FROM s)",
        rows = unnest_rows(n, 1, &[("int8", "t"), ("text", "node"), ("text", "lsn")]),
        stamp = stamp_rows(
            "u",
            &vkey,
            n + 4,
            ("true", true),
            (&format!("${}::text", n + 5), "u.lsn::pg_lsn")
        ),
        t = qualified(schema, table),
        key_pred = row_key_predicate("t", &keyed),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keyless_update_takes_one_equal_row_or_inserts() {
        assert_eq!(
            update_one_matching("s", "t", &["a", "b"]),
            r#"WITH changed AS (UPDATE "s"."t" SET "a" = $3, "b" = $4 WHERE ctid = (SELECT ctid FROM "s"."t" WHERE "a" IS NOT DISTINCT FROM $1 AND "b" IS NOT DISTINCT FROM $2 LIMIT 1) RETURNING 1) INSERT INTO "s"."t" ("a", "b") SELECT $3, $4 WHERE NOT EXISTS (SELECT FROM changed)"#
        );
    }

    /// No column to default, a table of three attributes.
    const NONE: WholeRow<'static> = WholeRow {
        defaults: &[],
        shape: "ab12",
    };

    /// A multi-master write sets every column the remote row does not carry to its DEFAULT
    /// (and never inserts it, so a new row gets it too), and checks the table's shape.
    #[test]
    fn a_pruned_range_compares_the_key_as_a_row_and_keeps_the_given_keys() {
        let key = [
            Typed {
                name: "id",
                ty: "bigint",
                fixed: false,
            },
            Typed {
                name: "At",
                ty: "timestamp with time zone",
                fixed: false,
            },
        ];
        assert_eq!(
            prune_range("s", "t", &key, true, true, true),
            r#"DELETE FROM ONLY "s"."t" AS t WHERE (t."id", t."At") > ($1::text::bigint, $2::text::timestamp with time zone) AND (t."id", t."At") <= ($3::text::bigint, $4::text::timestamp with time zone) AND NOT EXISTS (SELECT 1 FROM unnest($5::text[], $6::text[]) WITH ORDINALITY AS u(c1, c2, ord) WHERE t."id" = u.c1::bigint AND t."At" = u.c2::timestamp with time zone)"#
        );
        // Unbounded below (the first chunk) and above (the last), through a partitioned table.
        assert_eq!(
            prune_range("s", "t", &key[..1], false, false, false),
            r#"DELETE FROM "s"."t" AS t WHERE NOT EXISTS (SELECT 1 FROM unnest($1::text[]) WITH ORDINALITY AS u(c1, ord) WHERE t."id" = u.c1::bigint)"#
        );
    }

    #[test]
    fn remote_rows_are_written_whole() {
        let typed = |name| Typed {
            name,
            ty: "integer",
            fixed: false,
        };
        let cols = [typed("id"), typed("v")];
        let defaults = ["extra".to_owned(), "Odd \"one\"".to_owned()];
        let whole = WholeRow {
            defaults: &defaults,
            shape: "cd34",
        };
        let guard = r#"(SELECT pgferry.same_shape('"s"."t"'::regclass, 'cd34'::text))"#;
        for text in [
            stamp_and_upsert("s", "t", &cols, &["id"], whole),
            insert_fresh("s", "t", &cols, &["id"], whole),
            stamp_and_upsert_rows("s", "t", &cols, &["id"], whole),
        ] {
            assert!(
                text.contains(r#"INSERT INTO "s"."t" ("id", "v") OVERRIDING SYSTEM VALUE SELECT"#)
                    && text.contains(
                        r#"DO UPDATE SET "v" = EXCLUDED."v", "extra" = DEFAULT, "Odd ""one""" = DEFAULT"#
                    )
                    && text.contains(guard),
                "{text}"
            );
        }
        // A row of only its key still resets the others: DO UPDATE, not DO NOTHING.
        let key_only = stamp_and_upsert("s", "t", &cols[..1], &["id"], whole);
        assert!(
            key_only.contains(
                r#"ON CONFLICT ("id") DO UPDATE SET "extra" = DEFAULT, "Odd ""one""" = DEFAULT"#
            ),
            "{key_only}"
        );
        let clean = clean_update_rows("s", "t", &cols, &["id"], &cols, whole);
        assert!(
            clean.contains(
                r#"SET "v" = u.c2::integer, "extra" = DEFAULT, "Odd ""one""" = DEFAULT FROM u"#
            ) && clean.ends_with(&format!("IN (SELECT key FROM s) AND {guard}")),
            "{clean}"
        );
        // Without a column to default, the statements are as before, the guard included.
        let plain = stamp_and_upsert("s", "t", &cols, &["id"], NONE);
        assert!(
            !plain.contains("DEFAULT") && plain.contains("same_shape"),
            "{plain}"
        );
    }

    #[test]
    fn statements() {
        assert_eq!(
            upsert("s", "t", &["id", "v"], &["id"], &[]),
            r#"INSERT INTO "s"."t" ("id", "v") OVERRIDING SYSTEM VALUE VALUES ($1, $2) ON CONFLICT ("id") DO UPDATE SET "v" = EXCLUDED."v""#
        );
        assert_eq!(
            upsert("s", "t", &["id"], &["id"], &[]),
            r#"INSERT INTO "s"."t" ("id") OVERRIDING SYSTEM VALUE VALUES ($1) ON CONFLICT ("id") DO NOTHING"#
        );
        assert_eq!(
            upsert("s", "h", &["a"], &[], &[]),
            r#"INSERT INTO "s"."h" ("a") OVERRIDING SYSTEM VALUE VALUES ($1)"#
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
    fn multi_row_statements() {
        let cols = [
            Typed {
                name: "id",
                ty: "integer",
                fixed: false,
            },
            Typed {
                name: "v",
                ty: "text",
                fixed: false,
            },
        ];
        assert_eq!(
            upsert_rows("s", "t", &cols, &["id"]),
            r#"INSERT INTO "s"."t" ("id", "v") OVERRIDING SYSTEM VALUE SELECT u.c1::integer, u.c2::text FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(c1, c2, ord) ON CONFLICT ("id") DO UPDATE SET "v" = EXCLUDED."v""#
        );
        assert_eq!(
            update_rows("s", "t", &cols[1..], &cols[..1]),
            r#"UPDATE "s"."t" AS t SET "v" = u.c1::text FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(c1, c2, ord) WHERE t."id" = u.c2::integer"#
        );
        assert_eq!(
            delete_rows("s", "t", &cols[..1]),
            r#"DELETE FROM "s"."t" AS t USING unnest($1::text[]) WITH ORDINALITY AS u(c1, ord) WHERE t."id" = u.c1::integer"#
        );
        // Versions and rows: two column arrays, then t, node, and the table name ($5).
        let write = stamp_and_upsert_rows("s", "t", &cols, &["id"], NONE);
        assert!(write.contains("unnest($1::text[], $2::text[], $3::int8[], $4::text[])"));
        assert!(write.contains(
            "SELECT $5::text, jsonb_build_array(u.c1::integer)::text, u.t, u.node, false"
        ));
        assert!(write.contains("WHERE (v.t, v.node) < (EXCLUDED.t, EXCLUDED.node)"));
        assert!(write.ends_with("SELECT u.ord FROM u WHERE jsonb_build_array(u.c1::integer)::text IN (SELECT key FROM s)"));
        assert!(write.contains(r#"IN (SELECT key FROM s) AND (SELECT pgferry.same_shape('"s"."t"'::regclass, 'ab12'::text)) ON CONFLICT"#), "{write}");
        // Tombstones: the key array, t, node, LSN, then the table name ($5) and stream node ($6).
        let delete = stamp_and_delete_rows("s", "t", &cols[..1]);
        assert!(delete.contains("unnest($1::text[], $2::int8[], $3::text[], $4::text[])"));
        assert!(delete.contains("SELECT $5::text, jsonb_build_array(u.c1::integer)::text, u.t, u.node, true, $6::text, u.lsn::pg_lsn"));
        // Only a tombstone stamp also requires the stored version its snapshot holds.
        assert!(delete.contains(UNCHANGED_SINCE_SNAPSHOT), "{delete}");
        assert!(!write.contains(UNCHANGED_SINCE_SNAPSHOT), "{write}");
        // Clean updates: the after arrays, the old-image arrays, t, node, the table name ($7);
        // rows are locked (matching their old image) before their versions are stamped, and
        // only stamped rows are updated, key columns left out of SET.
        let clean = clean_update_rows("s", "t", &cols, &["id"], &cols, NONE);
        assert!(clean.contains(
            "unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::text[]) WITH ORDINALITY AS u(c1, c2, c3, c4, t, node, ord)"
        ), "{clean}");
        assert!(clean.contains(
            r#"r AS (SELECT u.* FROM u CROSS JOIN LATERAL (SELECT 1 FROM ONLY "s"."t" AS t WHERE t."id" = u.c1::integer AND t."id"::text IS NOT DISTINCT FROM u.c3::integer::text AND t."v"::text IS NOT DISTINCT FROM u.c4::text::text FOR UPDATE) AS l)"#
        ), "{clean}");
        assert!(clean.contains(
            "SELECT $7::text, jsonb_build_array(u.c1::integer)::text, u.t, u.node, false, NULL::text, NULL::pg_lsn FROM r AS u ON CONFLICT"
        ), "{clean}");
        assert!(clean.contains(
            r#"w AS (UPDATE ONLY "s"."t" AS t SET "v" = u.c2::text FROM u WHERE t."id" = u.c1::integer AND jsonb_build_array(u.c1::integer)::text IN (SELECT key FROM s))"#
        ), "{clean}");
        let probe = probe_rows("s", "t", &cols[..1], &cols[1..]);
        assert!(probe.contains("t.\"v\"::text IS NOT DISTINCT FROM u.c2::text::text"));
        assert!(probe.contains("v.table_name = $3::text"));
    }

    /// A GENERATED ALWAYS identity outside the key (`fixed`) is inserted but never set by an
    /// update: PostgreSQL refuses any statement that would, even an upsert that only inserts.
    #[test]
    fn fixed_columns_are_inserted_and_never_set() {
        assert_eq!(
            upsert("s", "t", &["id", "n", "v"], &["id"], &["n"]),
            r#"INSERT INTO "s"."t" ("id", "n", "v") OVERRIDING SYSTEM VALUE VALUES ($1, $2, $3) ON CONFLICT ("id") DO UPDATE SET "v" = EXCLUDED."v""#
        );
        assert!(upsert("s", "t", &["id", "n"], &["id"], &["n"])
            .ends_with(r#"ON CONFLICT ("id") DO NOTHING"#));
        let typed = |name, fixed| Typed {
            name,
            ty: "integer",
            fixed,
        };
        let cols = [typed("id", false), typed("n", true), typed("v", false)];
        for text in [
            upsert_rows("s", "t", &cols, &["id"]),
            stamp_and_upsert_rows("s", "t", &cols, &["id"], NONE),
            stamp_and_upsert("s", "t", &cols, &["id"], NONE),
            insert_fresh("s", "t", &cols, &["id"], NONE),
        ] {
            assert!(
                text.contains(
                    r#"INSERT INTO "s"."t" ("id", "n", "v") OVERRIDING SYSTEM VALUE SELECT"#
                ) && text.contains(r#"DO UPDATE SET "v" = EXCLUDED."v""#)
                    && !text.contains(r#""n" = "#),
                "{text}"
            );
        }
        let update = update_rows("s", "t", &cols[1..], &cols[..1]);
        assert!(
            update.contains(r#"SET "v" = u.c2::integer FROM"#) && !update.contains(r#""n" ="#),
            "{update}"
        );
        // Nothing left to set: the rows are read, nothing is written.
        assert_eq!(
            update_rows("s", "t", &cols[1..2], &cols[..1]),
            "SELECT count(*) FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(c1, c2, ord)"
        );
        let clean = clean_update_rows("s", "t", &cols, &["id"], &cols, NONE);
        assert!(
            clean.contains(r#"SET "v" = u.c3::integer FROM u"#) && !clean.contains(r#""n" = u"#),
            "{clean}"
        );
        let stamp_only = clean_update_rows("s", "t", &cols[..2], &["id"], &cols[..2], NONE);
        assert!(
            !stamp_only.contains("UPDATE ONLY")
                && stamp_only.contains("s AS (INSERT INTO pgferry.versions"),
            "{stamp_only}"
        );
    }

    #[test]
    fn multi_master_statements() {
        let key = [Typed {
            name: "id",
            ty: "integer",
            fixed: false,
        }];
        let stamp = stamp_version(&key);
        assert!(
            stamp.contains(
                "VALUES ($1::text, jsonb_build_array($8::integer)::text, $2::int8, $3::text, $4::bool,"
            ) && stamp.contains("WHERE ((v.t, v.node) < (EXCLUDED.t, EXCLUDED.node)")
                && !stamp.contains("seen.t"),
            "{stamp}"
        );
        let row = [
            Typed {
                name: "v",
                ty: "text",
                fixed: false,
            },
            Typed {
                name: "id",
                ty: "integer",
                fixed: false,
            },
        ];
        let write = stamp_and_upsert("s", "t", &row, &["id"], NONE);
        assert!(
            write.contains("jsonb_build_array($2::integer)::text, $4::int8, $5::text, false")
                && write.contains(r#"INSERT INTO "s"."t" ("v", "id") OVERRIDING SYSTEM VALUE SELECT $1::text, $2::integer WHERE EXISTS (SELECT 1 FROM s) AND (SELECT pgferry.same_shape('"s"."t"'::regclass, 'ab12'::text)) ON CONFLICT ("id") DO UPDATE SET "v" = EXCLUDED."v" RETURNING 1"#)
                && write.contains("OR ($6::bool AND"),
            "{write}"
        );
        let fresh = insert_fresh("s", "t", &row, &["id"], NONE);
        assert!(
            fresh.contains("END) ON CONFLICT (table_name, key) DO NOTHING RETURNING 1), w AS")
                && fresh.contains("false AND $6::bool")
                && !fresh.contains("DO UPDATE SET t = EXCLUDED.t"),
            "{fresh}"
        );
        let delete = stamp_and_delete("s", "t", &key);
        assert!(
            delete.contains(r#"DELETE FROM ONLY "s"."t" AS t WHERE t."id" = $1::integer AND EXISTS (SELECT 1 FROM s)"#)
                && delete.contains("CASE WHEN true THEN $6::text END, CASE WHEN true THEN $7::pg_lsn END")
                && delete.contains(UNCHANGED_SINCE_SNAPSHOT),
            "{delete}"
        );
        assert!(
            probe("s", "t", &key, &[]).contains(r#"WHERE t."id" = $1::integer FOR UPDATE) AS r"#)
        );
        let holders = unique_holders(
            "s",
            "t",
            &["id"],
            &[vec!["email".into()], vec!["a".into(), "b".into()]],
        );
        assert!(
            holders.contains(r#"WHERE ((t."email" = m."email") OR (t."a" = m."a" AND t."b" = m."b")) AND NOT (t."id" = m."id")"#),
            "{holders}"
        );
        assert!(drop_unique_loser("s", "t", &["id"])
            .contains(r#"DELETE FROM ONLY "s"."t" AS t WHERE ("id") ="#));
        let before = [Typed {
            name: "v",
            ty: "numeric(9,2)",
            fixed: false,
        }];
        let probe = probe("s", "t", &key, &before);
        assert!(
            probe.contains(r#"t."v"::text IS NOT DISTINCT FROM $2::numeric(9,2)::text"#),
            "{probe}"
        );
        assert!(
            probe.contains(
                "v.table_name = $3::text AND v.key = jsonb_build_array($1::integer)::text"
            ),
            "{probe}"
        );
        assert!(super::probe("s", "t", &key, &[]).contains("(NULL::bool) AS matches"));
        assert_eq!(
            call_resolver("app.merge", "s", "t"),
            r#"SELECT ("app"."merge"($1::text, $2::jsonb, to_jsonb(jsonb_populate_record(NULL::"s"."t", $3::jsonb)), $4::jsonb, $5::jsonb))::text"#
        );
        assert_eq!(
            write_merged("s", "t", &["v"], &key, "ef56"),
            r#"UPDATE ONLY "s"."t" AS t SET ("v") = (SELECT m."v" FROM jsonb_populate_record(NULL::"s"."t", $1::jsonb) AS m) WHERE t."id" = $2::integer AND (SELECT pgferry.same_shape('"s"."t"'::regclass, 'ef56'::text))"#
        );
    }

    use proptest::strategy::Strategy;

    proptest::proptest! {
        /// Whatever the stream sends, an accepted type name is one name (plus SQL's type
        /// keywords, a numeric modifier and array brackets): nothing that could end the column
        /// definition or add a clause to it.
        #[test]
        fn accepted_type_names_cannot_carry_sql(
            name in proptest::collection::vec(
                proptest::sample::select(vec![
                    "int", "numeric", "character", "varying", "timestamp", "with", "time",
                    "zone", "double", "precision", "public", ".", "(", ")", "12", ",", " ", "[",
                    "]", "\"My Type\"", "\"a;b\"", "default", "collate", "not", "null", ";",
                    "--", "'", "/*", "check", "x",
                ]),
                1..7,
            ).prop_map(|tokens: Vec<&str>| tokens.concat())
        ) {
            if is_safe_type_name(&name) {
                // A double-quoted identifier is one name whatever it holds: look outside them.
                let mut bare = String::new();
                for (i, part) in name.split('"').enumerate() {
                    bare.push_str(if i % 2 == 0 { part } else { "q" });
                }
                for bad in [";", "--", "'", "/*"] {
                    proptest::prop_assert!(!bare.contains(bad), "{name:?}");
                }
                let words: Vec<String> = bare
                    .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .filter(|w| !w.is_empty() && !w.chars().all(|c| c.is_ascii_digit()))
                    .map(str::to_ascii_lowercase)
                    .collect();
                let free = words
                    .iter()
                    .filter(|w| !TYPE_KEYWORDS.contains(&w.as_str()))
                    .count();
                let qualified = bare.contains('.');
                // One name (two with a schema), or keywords alone: a clause word such as
                // DEFAULT or COLLATE beside a type would be a second name or a name beside
                // keywords.
                proptest::prop_assert!(free <= 1 + usize::from(qualified), "{name:?}");
                proptest::prop_assert!(
                    free == 0 || free == words.len() || qualified,
                    "{name:?}"
                );
            }
        }
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
        for ok in [
            "double precision",
            "timestamp(3) with time zone",
            "time without time zone",
            "interval day to second(3)",
            "bit varying(5)[]",
            "integer[3][]",
            "\"Schema\".\"Type\"",
            "numeric(12, 2)",
        ] {
            assert!(is_safe_type_name(ok), "{ok}");
        }
        for bad in [
            "int; DROP TABLE x",
            "int -- x",
            "text /* */",
            "\"unbalanced",
            "",
            "int default 1",
            "text collate \"C\"",
            "int check (true)",
            "int generated always as (1) stored",
            "int not null",
            "int references t",
            "numeric(1,2,3)",
            "text[x]",
            "a.b.c",
            "int)",
            "(int)",
            "\"\"",
            "default character",
            "int varying",
        ] {
            assert!(!is_safe_type_name(bad), "{bad}");
        }
        assert_eq!(
            create_table("s", "t", &[("a", "int); DROP TABLE y; --", false)], &[]),
            None
        );
    }
}

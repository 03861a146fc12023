//! Node-stream records → apply steps. Pure.
//!
//! [`parse`] turns one record of `<prefix>.__node.<node>` into a typed item, or says precisely
//! why it cannot. [`Framer`] decides, record by record, what the applier does: start a source
//! transaction, apply a change, end it, or ignore the record. It owns the two rules that make
//! apply exactly-once on top of an at-least-once stream:
//! - a transaction whose commit LSN is not above the last one applied is a replay: skipped;
//! - a begin that arrives while another transaction is still open means the open one was cut
//!   off by a capture crash and will be replayed whole later: it is an *orphan*, and the
//!   applier rolls back, remembers the orphan's offset, and replays from its last commit.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::error::Category;
use serde_json::value::RawValue;

use crate::event::Op;
use crate::lsn::Lsn;

/// A record that is not a well-formed node-stream message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed node-stream message: {0}")]
pub struct MalformedMessage(pub String);

/// Opens a source transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct BeginMarker {
    /// Source commit LSN.
    pub commit_lsn: Lsn,
    /// Source commit time, microseconds since the Unix epoch.
    pub commit_ts_us: i64,
    /// The initial snapshot (rows are `op: "r"`).
    pub snapshot: bool,
}

/// A row image from the envelope: columns in order, each value as its raw JSON text. Values
/// are not parsed here: a `jsonb` nested deeper than any parser's recursion limit passes
/// through untouched, and [`super::params`] parses each value by its column's type.
#[derive(Debug, Clone, Default)]
pub struct RowImage(Vec<(String, Box<RawValue>)>);

impl RowImage {
    /// Builds an image from (column, raw JSON) pairs.
    pub fn new(columns: Vec<(String, Box<RawValue>)>) -> Self {
        RowImage(columns)
    }

    /// The value of a column.
    pub fn get(&self, column: &str) -> Option<&RawValue> {
        self.0.iter().find(|(c, _)| c == column).map(|(_, v)| &**v)
    }

    /// Column names in order.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(c, _)| c)
    }

    /// (column, value) pairs in order.
    pub fn iter(&self) -> impl Iterator<Item = &(String, Box<RawValue>)> {
        self.0.iter()
    }

    /// Number of columns.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when the image has no column.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// (column, value) pairs in order, values to change (a value written under a column's
    /// old type, converted to its new one).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut (String, Box<RawValue>)> {
        self.0.iter_mut()
    }

    /// Renames a column (a change written before the column was renamed on this target).
    pub fn rename_column(&mut self, from: &str, to: &str) {
        for (c, _) in &mut self.0 {
            if c == from {
                *c = to.to_owned();
            }
        }
    }

    /// Removes a column (a change written before the column was dropped on this target).
    pub fn remove_column(&mut self, name: &str) {
        self.0.retain(|(c, _)| c != name);
    }

    /// The image as a JSON object text.
    pub fn to_json_text(&self) -> String {
        object_text(self.0.iter().map(|(c, v)| (c.as_str(), v.get())))
    }
}

/// `{"name": <raw>, ...}` from raw JSON values.
pub fn object_text<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::from("{");
    for (i, (name, raw)) in pairs.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&serde_json::Value::String(name.to_owned()).to_string());
        out.push(':');
        out.push_str(raw);
    }
    out.push('}');
    out
}

impl IntoIterator for RowImage {
    type Item = (String, Box<RawValue>);
    type IntoIter = std::vec::IntoIter<(String, Box<RawValue>)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl PartialEq for RowImage {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len()
            && self
                .0
                .iter()
                .zip(&other.0)
                .all(|((a, x), (b, y))| a == b && x.get() == y.get())
    }
}

impl<'de> Deserialize<'de> for RowImage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Columns;
        impl<'de> Visitor<'de> for Columns {
            type Value = RowImage;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a row object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RowImage, A::Error> {
                let mut columns = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some((name, value)) = map.next_entry::<String, Box<RawValue>>()? {
                    columns.push((name, value));
                }
                Ok(RowImage(columns))
            }
        }
        d.deserialize_map(Columns)
    }
}

/// One row change (or truncate).
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeItem {
    /// Source schema.
    pub schema: String,
    /// Source table.
    pub table: String,
    /// What happened.
    pub op: Op,
    /// Old row (key columns or full).
    pub before: Option<RowImage>,
    /// New row, without unchanged-TOAST columns.
    pub after: Option<RowImage>,
    /// Columns of `before` holding the JSON literal `null` (not SQL NULL).
    pub json_null_before: Vec<String>,
    /// Columns of `after` holding the JSON literal `null` (not SQL NULL).
    pub json_null_after: Vec<String>,
    /// Columns the new row keeps from the old one, unsent (unchanged TOASTed values): absent
    /// from `after` without being absent from the row.
    pub unchanged_toast: Vec<String>,
    /// `source.version`: the multi-master row version the change was made with.
    pub version: Option<crate::event::Version>,
}

/// An item that writes named columns of one table: a change (its images), snapshot rows.
pub trait WritesColumns {
    /// Source schema.
    fn schema(&self) -> &str;
    /// Source table.
    fn table(&self) -> &str;
    /// The columns it writes (a column may appear more than once).
    fn column_names(&self) -> impl Iterator<Item = &String>;
    /// Follows a column's rename (`to: Some`) or drop (`to: None`) made on the target after the
    /// item was written (multi-master nodes change schemas while changes are in flight).
    fn follow_column(&mut self, from: &str, to: Option<&str>);
    /// Follows the table's rename (or move to another schema) made on the target after the
    /// item was written.
    fn follow_table(&mut self, schema: &str, table: &str) {
        *self.names_mut().0 = schema.to_owned();
        *self.names_mut().1 = table.to_owned();
    }
    /// The item's schema and table, to change.
    fn names_mut(&mut self) -> (&mut String, &mut String);
}

/// An item that writes named columns, which remembers the renames and drops it followed
/// ([`WritesColumns::follow_column`]), so that each renamed column can be traced back to the
/// name its writer gave it ([`Followed::writers_names`]).
pub struct Followed<'a, T> {
    item: &'a mut T,
    followed: Vec<(String, Option<String>)>,
}

impl<'a, T: WritesColumns> Followed<'a, T> {
    /// Wraps `item`.
    pub fn new(item: &'a mut T) -> Self {
        Followed {
            item,
            followed: Vec::new(),
        }
    }

    /// Column name now → the name the writer gave it, for the columns renamed since (a column
    /// not in it has its writer's name; a column dropped is gone from the item). Empty, and
    /// without allocating, when nothing was followed.
    pub fn writers_names(&self) -> std::collections::HashMap<String, String> {
        let mut names = std::collections::HashMap::new();
        for (from, to) in &self.followed {
            let writers = names.remove(from).unwrap_or_else(|| from.clone());
            if let Some(to) = to {
                names.insert(to.clone(), writers);
            }
        }
        names
    }
}

impl<T: WritesColumns> WritesColumns for Followed<'_, T> {
    fn schema(&self) -> &str {
        self.item.schema()
    }

    fn table(&self) -> &str {
        self.item.table()
    }

    fn column_names(&self) -> impl Iterator<Item = &String> {
        self.item.column_names()
    }

    fn follow_column(&mut self, from: &str, to: Option<&str>) {
        self.followed.push((from.to_owned(), to.map(str::to_owned)));
        self.item.follow_column(from, to);
    }

    fn follow_table(&mut self, schema: &str, table: &str) {
        self.item.follow_table(schema, table);
    }

    fn names_mut(&mut self) -> (&mut String, &mut String) {
        self.item.names_mut()
    }
}

impl WritesColumns for ChangeItem {
    fn names_mut(&mut self) -> (&mut String, &mut String) {
        (&mut self.schema, &mut self.table)
    }

    fn schema(&self) -> &str {
        &self.schema
    }

    fn table(&self) -> &str {
        &self.table
    }

    fn column_names(&self) -> impl Iterator<Item = &String> {
        [&self.after, &self.before]
            .into_iter()
            .flatten()
            .flat_map(RowImage::keys)
    }

    fn follow_column(&mut self, from: &str, to: Option<&str>) {
        for image in [&mut self.before, &mut self.after].into_iter().flatten() {
            match to {
                Some(to) => image.rename_column(from, to),
                None => image.remove_column(from),
            }
        }
        for list in [
            &mut self.json_null_before,
            &mut self.json_null_after,
            &mut self.unchanged_toast,
        ] {
            match to {
                Some(to) => list
                    .iter_mut()
                    .filter(|c| *c == from)
                    .for_each(|c| *c = to.to_owned()),
                None => list.retain(|c| c != from),
            }
        }
    }
}

/// Closes a source transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct CommitMarker {
    /// Source commit LSN (same as the begin's).
    pub commit_lsn: Lsn,
    /// Changes the transaction carried.
    pub changes: u64,
}

/// A table's schema as the source describes it (`relation` record).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RelationColumn {
    /// Column name.
    pub name: String,
    /// SQL type, as `format_type` printed it on the source.
    #[serde(rename = "type")]
    pub type_name: String,
    /// `NOT NULL` on the source.
    #[serde(default)]
    pub not_null: bool,
    /// Part of the key.
    #[serde(default)]
    pub key: bool,
}

/// The `relation` record: announces a table's columns before its first change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationItem {
    /// Schema.
    pub schema: String,
    /// Table.
    pub table: String,
    /// Columns in source order.
    pub columns: Vec<RelationColumn>,
}

/// One parsed record.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamItem {
    /// `type: begin`.
    Begin(BeginMarker),
    /// `type: change`.
    Change(Box<ChangeItem>),
    /// `type: commit`.
    Commit(CommitMarker),
    /// `type: relation`.
    Relation(Box<RelationItem>),
    /// `type: skipped`: a change capture dead-lettered instead of publishing.
    Skipped(Box<SkippedItem>),
    /// `type: ack`: a multi-master node's acknowledgement of what it has applied.
    Ack(Box<AckItem>),
    /// `type: ddl`: a schema change of one table (see [`crate::ddl`]).
    Ddl(Box<DdlItem>),
    /// `type: after`: the node applied other nodes' schema changes here.
    After(Box<AfterItem>),
    /// `type: rows`: snapshot rows of one table in COPY's text format.
    Rows(Box<RowsItem>),
}

/// The `rows` record: snapshot rows (`op: "r"`) of one table, many to an item, in COPY's
/// text format (see `sink::kafka::node_stream`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowsItem {
    /// Source schema.
    pub schema: String,
    /// Source table.
    pub table: String,
    /// The columns of each row, in order.
    pub names: Vec<String>,
    /// The rows: values as the source's text output, tab-separated, `\N` for NULL, each row
    /// ended by a newline (see [`crate::value::copy_text`]).
    pub copy: String,
    /// A re-snapshot's key range these rows cover: the target deletes its other rows there.
    pub prune: Option<crate::event::PruneRange>,
}

impl RowsItem {
    /// The number of rows.
    pub fn len(&self) -> usize {
        crate::value::copy_text::rows_in(self.copy.as_bytes())
    }

    /// Whether it holds no row.
    pub fn is_empty(&self) -> bool {
        self.copy.is_empty()
    }

    /// Each row as an item of its own (to apply, and dead-letter, one by one), without the
    /// range: the caller prunes it once all rows are written.
    pub fn split(&self) -> impl Iterator<Item = RowsItem> + '_ {
        self.copy.split_inclusive('\n').map(|row| RowsItem {
            schema: self.schema.clone(),
            table: self.table.clone(),
            names: self.names.clone(),
            copy: row.to_owned(),
            prune: None,
        })
    }

    /// The item as the node stream carries it (a dead letter's payload, replayable).
    pub fn to_json(&self) -> String {
        let mut item = serde_json::json!({
            "type": "rows",
            "schema": self.schema,
            "table": self.table,
            "names": self.names,
            "copy": self.copy,
        });
        if let Some(prune) = &self.prune {
            item["prune"] = serde_json::to_value(prune).unwrap_or_default();
        }
        item.to_string()
    }

    /// The keys of the rows, by the range's key columns; `None` without a range, or when a key
    /// column is not among the item's columns or a row has no value for it.
    pub fn row_keys(&self) -> Option<Vec<Vec<String>>> {
        let prune = self.prune.as_ref()?;
        let at: Vec<usize> = prune
            .key
            .iter()
            .map(|k| self.names.iter().position(|n| n == k))
            .collect::<Option<_>>()?;
        crate::value::copy_text::decode(self.copy.as_bytes())
            .into_iter()
            .map(|row| at.iter().map(|&i| row.get(i).cloned().flatten()).collect())
            .collect()
    }

    /// The range alone, as an item without rows whose kept keys include the rows' (applied
    /// after the rows were written one by one); `None` without a range.
    pub fn range_only(&self) -> Option<RowsItem> {
        let mut prune = self.prune.clone()?;
        prune.keep.extend(self.row_keys()?);
        Some(RowsItem {
            schema: self.schema.clone(),
            table: self.table.clone(),
            names: self.names.clone(),
            copy: String::new(),
            prune: Some(prune),
        })
    }
}

impl WritesColumns for RowsItem {
    fn names_mut(&mut self) -> (&mut String, &mut String) {
        (&mut self.schema, &mut self.table)
    }

    fn schema(&self) -> &str {
        &self.schema
    }

    fn table(&self) -> &str {
        &self.table
    }

    fn column_names(&self) -> impl Iterator<Item = &String> {
        self.names.iter()
    }

    fn follow_column(&mut self, from: &str, to: Option<&str>) {
        let Some(at) = self.names.iter().position(|c| c == from) else {
            return;
        };
        match to {
            Some(to) => self.names[at] = to.to_owned(),
            None => {
                self.names.remove(at);
                // A raw tab is always a separator (COPY escapes the ones inside values).
                let mut copy = String::with_capacity(self.copy.len());
                for row in self.copy.split_inclusive('\n') {
                    let row = row.strip_suffix('\n').unwrap_or(row);
                    let kept: Vec<&str> = row
                        .split('\t')
                        .enumerate()
                        .filter(|&(i, _)| i != at)
                        .map(|(_, field)| field)
                        .collect();
                    copy.push_str(&kept.join("\t"));
                    copy.push('\n');
                }
                self.copy = copy;
            }
        }
    }
}

/// The `ddl` record: schema changes of one table, at their place in the transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DdlItem {
    /// Schema (before the change).
    pub schema: String,
    /// Table (before the change).
    pub table: String,
    /// The changes, in order.
    pub ops: Vec<crate::ddl::DdlOp>,
    /// Multi-master: what the node that made the change had applied from each other node then
    /// (node → commit LSN); a target applies the change only after it has applied as much.
    pub applied: BTreeMap<String, Lsn>,
    /// The source session's settings the change ran under (see
    /// [`crate::ddl::SESSION_SETTINGS`]); empty from a capture that did not send them.
    pub settings: BTreeMap<String, String>,
    /// The source re-snapshots the table after the change (it gave existing rows values a
    /// target cannot compute, such as a `USING`): a column whose values the target cannot
    /// cast to its new type may take NULL for them until then.
    pub resnapshot: bool,
}

/// The `after` record (multi-master): the node that wrote the stream applied other nodes'
/// schema changes here (node → commit LSN of the change's source transaction), so what it
/// writes from here on may depend on them (a value only the widened type holds, a column
/// only the new name finds). Its own worker writes it as a transactional `pgferry.after`
/// message in the target transaction that applied the change.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct AfterItem {
    /// Node → the commit LSN a target must have applied from it first.
    pub applied: BTreeMap<String, Lsn>,
}

/// The first node of `applied` (node → commit LSN) whose changes a target has not applied as
/// far yet (`here`: node → commit LSN applied there), with the LSN to reach. Only nodes in
/// `applies` count (a target that does not apply a node cannot wait for it), and not `skip`
/// (the stream's own node, whose order the stream keeps, and the target's node, whose
/// changes it holds).
pub fn first_unapplied(
    applied: &BTreeMap<String, Lsn>,
    here: &BTreeMap<String, Lsn>,
    applies: &[String],
    skip: &[&str],
) -> Option<(String, Lsn)> {
    applied
        .iter()
        .filter(|(node, _)| applies.contains(node) && !skip.contains(&node.as_str()))
        .find(|(node, lsn)| !has_applied(here, node, **lsn))
        .map(|(node, lsn)| (node.clone(), *lsn))
}

/// Whether `here` (node → commit LSN applied) holds `node`'s changes up to `lsn`.
pub fn has_applied(here: &BTreeMap<String, Lsn>, node: &str, lsn: Lsn) -> bool {
    here.get(node).is_some_and(|have| *have >= lsn)
}

/// The `ack` record: what the node that wrote the stream had applied from every other node
/// when it emitted it (its commit in the stream orders it after every earlier write of that
/// node), and which nodes it has stopped waiting for (their acknowledgements were missing when
/// tombstones reached `apply.conflict.tombstone_retention`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct AckItem {
    /// Source node → the commit LSN applied from it.
    #[serde(default)]
    pub applied: BTreeMap<String, Lsn>,
    /// Nodes whose missing acknowledgements tombstone collection went past.
    #[serde(default)]
    pub bypassed: Vec<String>,
    /// The writing node's database clock when it emitted the ack (µs since the Unix epoch).
    #[serde(default)]
    pub at_us: Option<i64>,
}

/// The `skipped` record: capture could not publish a change of this table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedItem {
    /// Schema.
    pub schema: String,
    /// Table.
    pub table: String,
    /// WAL position of the change.
    pub lsn: String,
    /// Why capture could not publish it.
    pub error: String,
}

// The wire shape, deserialized directly (borrowing strings where the JSON has no escapes):
// no intermediate `Value` tree except for the row images themselves.
#[derive(Deserialize)]
struct RawRecord<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default)]
    run: Option<u64>,
    #[serde(default, borrow)]
    commit_lsn: Option<Cow<'a, str>>,
    #[serde(default)]
    commit_ts_us: Option<i64>,
    #[serde(default)]
    snapshot: Option<bool>,
    #[serde(default)]
    changes: Option<u64>,
    #[serde(default, borrow)]
    change: Option<RawChange<'a>>,
    #[serde(default, borrow)]
    schema: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    table: Option<Cow<'a, str>>,
    #[serde(default)]
    columns: Option<Vec<RelationColumn>>,
    #[serde(default, borrow)]
    lsn: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    error: Option<Cow<'a, str>>,
    #[serde(default)]
    ack: Option<AckItem>,
    #[serde(default)]
    ops: Option<Vec<crate::ddl::DdlOp>>,
    #[serde(default)]
    applied: Option<BTreeMap<String, Lsn>>,
    #[serde(default)]
    settings: Option<BTreeMap<String, String>>,
    #[serde(default)]
    resnapshot: bool,
    #[serde(default)]
    names: Option<Vec<String>>,
    #[serde(default, borrow)]
    copy: Option<Cow<'a, str>>,
    #[serde(default)]
    prune: Option<crate::event::PruneRange>,
    // A change item's own members (records before compact items wrap the envelope instead,
    // in `change`).
    #[serde(default, borrow)]
    op: Option<Cow<'a, str>>,
    #[serde(default)]
    before: Option<RowImage>,
    #[serde(default)]
    after: Option<RowImage>,
    #[serde(default)]
    version: Option<RawVersion>,
    #[serde(default)]
    json_null: Option<RawJsonNull>,
    #[serde(default)]
    unchanged_toast: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct RawChange<'a> {
    #[serde(borrow)]
    op: Cow<'a, str>,
    #[serde(default)]
    before: Option<RowImage>,
    #[serde(default)]
    after: Option<RowImage>,
    #[serde(borrow)]
    source: RawSource<'a>,
    #[serde(default)]
    json_null: Option<RawJsonNull>,
    #[serde(default)]
    unchanged_toast: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct RawSource<'a> {
    #[serde(borrow)]
    schema: Cow<'a, str>,
    #[serde(borrow)]
    table: Cow<'a, str>,
    #[serde(default)]
    version: Option<RawVersion>,
}

#[derive(Deserialize)]
struct RawVersion {
    t_us: i64,
    node: String,
}

#[derive(Deserialize, Default)]
struct RawJsonNull {
    #[serde(default)]
    before: Vec<String>,
    #[serde(default)]
    after: Vec<String>,
}

fn missing(field: &str) -> MalformedMessage {
    MalformedMessage(format!("missing field `{field}`"))
}

/// Parses one node-stream record.
pub fn parse(bytes: Option<&[u8]>) -> Result<StreamItem, MalformedMessage> {
    parse_framed(bytes).map(|(_, item)| item)
}

/// Parses one node-stream record with its capture run id (absent in records from before run
/// ids existed).
pub fn parse_framed(bytes: Option<&[u8]>) -> Result<(Option<u64>, StreamItem), MalformedMessage> {
    let bytes = bytes.ok_or_else(|| MalformedMessage("empty value".into()))?;
    let raw: RawRecord<'_> = serde_json::from_slice(bytes).map_err(|e| match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            MalformedMessage(format!("not JSON: {e}"))
        }
        Category::Data => MalformedMessage(format!("unexpected shape: {e}")),
    })?;
    let commit_lsn = || -> Result<Lsn, MalformedMessage> {
        raw.commit_lsn
            .as_deref()
            .ok_or_else(|| missing("commit_lsn"))?
            .parse()
            .map_err(|e| MalformedMessage(format!("field `commit_lsn`: {e}")))
    };
    let run = raw.run;
    let item = match raw.kind.as_ref() {
        "begin" => Ok(StreamItem::Begin(BeginMarker {
            commit_lsn: commit_lsn()?,
            commit_ts_us: raw.commit_ts_us.ok_or_else(|| missing("commit_ts_us"))?,
            snapshot: raw.snapshot.unwrap_or(false),
        })),
        "commit" => Ok(StreamItem::Commit(CommitMarker {
            commit_lsn: commit_lsn()?,
            changes: raw.changes.unwrap_or(0),
        })),
        "change" => {
            // The compact item, or (written before it) the per-table envelope wrapped.
            let change = match raw.change {
                Some(wrapped) => wrapped,
                None => RawChange {
                    op: raw.op.ok_or_else(|| missing("op"))?,
                    before: raw.before,
                    after: raw.after,
                    source: RawSource {
                        schema: raw.schema.ok_or_else(|| missing("schema"))?,
                        table: raw.table.ok_or_else(|| missing("table"))?,
                        version: raw.version,
                    },
                    json_null: raw.json_null,
                    unchanged_toast: raw.unchanged_toast,
                },
            };
            let op = match change.op.as_ref() {
                "c" => Op::Create,
                "u" => Op::Update,
                "d" => Op::Delete,
                "r" => Op::Read,
                "t" => Op::Truncate,
                other => return Err(MalformedMessage(format!("unknown op {other:?}"))),
            };
            let json_null = change.json_null.unwrap_or_default();
            Ok(StreamItem::Change(Box::new(ChangeItem {
                schema: change.source.schema.into_owned(),
                table: change.source.table.into_owned(),
                op,
                before: change.before,
                after: change.after,
                json_null_before: json_null.before,
                json_null_after: json_null.after,
                unchanged_toast: change.unchanged_toast.unwrap_or_default(),
                version: change.source.version.map(|v| crate::event::Version {
                    ts_us: v.t_us,
                    node: v.node,
                }),
            })))
        }
        "relation" => Ok(StreamItem::Relation(Box::new(RelationItem {
            schema: raw.schema.ok_or_else(|| missing("schema"))?.into_owned(),
            table: raw.table.ok_or_else(|| missing("table"))?.into_owned(),
            columns: raw.columns.ok_or_else(|| missing("columns"))?,
        }))),
        "skipped" => Ok(StreamItem::Skipped(Box::new(SkippedItem {
            schema: raw.schema.ok_or_else(|| missing("schema"))?.into_owned(),
            table: raw.table.ok_or_else(|| missing("table"))?.into_owned(),
            lsn: raw.lsn.ok_or_else(|| missing("lsn"))?.into_owned(),
            error: raw.error.ok_or_else(|| missing("error"))?.into_owned(),
        }))),
        "ack" => Ok(StreamItem::Ack(Box::new(
            raw.ack.ok_or_else(|| missing("ack"))?,
        ))),
        "rows" => Ok(StreamItem::Rows(Box::new(RowsItem {
            schema: raw.schema.ok_or_else(|| missing("schema"))?.into_owned(),
            table: raw.table.ok_or_else(|| missing("table"))?.into_owned(),
            names: raw.names.ok_or_else(|| missing("names"))?,
            copy: raw.copy.ok_or_else(|| missing("copy"))?.into_owned(),
            prune: raw.prune.map(checked_range).transpose()?,
        }))),
        "after" => Ok(StreamItem::After(Box::new(AfterItem {
            applied: raw.applied.ok_or_else(|| missing("applied"))?,
        }))),
        "ddl" => Ok(StreamItem::Ddl(Box::new(DdlItem {
            schema: raw.schema.ok_or_else(|| missing("schema"))?.into_owned(),
            table: raw.table.ok_or_else(|| missing("table"))?.into_owned(),
            ops: raw.ops.ok_or_else(|| missing("ops"))?,
            applied: raw.applied.unwrap_or_default(),
            settings: raw.settings.unwrap_or_default(),
            resnapshot: raw.resnapshot,
        }))),
        other => Err(MalformedMessage(format!("unknown record type {other:?}"))),
    }?;
    Ok((run, item))
}

/// A `rows` item's range, refused unless every key in it has one value per key column (a
/// shorter key would match no row, and its rows would be deleted).
fn checked_range(
    range: crate::event::PruneRange,
) -> Result<crate::event::PruneRange, MalformedMessage> {
    let width = range.key.len();
    let bounds = [&range.after, &range.through].into_iter().flatten();
    if width == 0
        || range.types.len() != width
        || range.orders.len() != width
        || bounds.chain(&range.keep).any(|key| key.len() != width)
    {
        return Err(MalformedMessage(format!(
            "field `prune`: every key needs one value for each of its {width} key columns \
             (and a type and an order each)"
        )));
    }
    Ok(range)
}

/// What the applier does with a record.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Open (or continue) a target transaction for this source transaction.
    Start(BeginMarker),
    /// Apply this change.
    Apply(Box<ChangeItem>),
    /// Snapshot rows, applied like `op: "r"` changes.
    Rows(Box<RowsItem>),
    /// A table's schema (to create it on the target when configured).
    Relation(Box<RelationItem>),
    /// Record that capture dead-lettered a change of this table.
    Skipped(Box<SkippedItem>),
    /// A multi-master acknowledgement, inside its source transaction.
    Ack(Box<AckItem>),
    /// Schema changes to apply at this place in the transaction.
    Ddl(Box<DdlItem>),
    /// What follows depends on other nodes' changes the target must have applied first.
    After(Box<AfterItem>),
    /// The source transaction is complete; its records up to `offset` may be committed.
    End(CommitMarker),
    /// Nothing to do (a replayed or orphaned transaction).
    Ignore,
    /// A record outside any transaction the stream opened (its begin marker is missing), or
    /// a commit that does not match the open transaction. A correct stream never has one;
    /// the applier reports it instead of dropping it silently.
    Stray(&'static str),
    /// The open transaction starting at this offset was cut off: roll back, call
    /// [`Framer::orphan`], and replay from the last committed offset.
    Orphaned(i64),
}

/// The exactly-once state machine over one node stream.
#[derive(Debug)]
pub struct Framer {
    applied: Lsn,
    /// Begin offset, commit LSN and commit time of the open source transaction.
    open: Option<(i64, Lsn, i64)>,
    last_commit_ts_us: i64,
    skipping: bool,
    orphans: HashSet<i64>,
    /// Capture run id → offset of its first record seen.
    runs: BTreeMap<u64, i64>,
}

impl Framer {
    /// Starts after the last source commit applied to the target.
    pub fn new(applied: Lsn) -> Self {
        Framer {
            applied,
            open: None,
            last_commit_ts_us: 0,
            skipping: false,
            orphans: HashSet::new(),
            runs: BTreeMap::new(),
        }
    }

    /// True while a source transaction is open (begun, not yet committed).
    pub fn is_open(&self) -> bool {
        self.open.is_some()
    }

    /// Commit time (µs since the Unix epoch) of the last transaction that ended.
    pub fn commit_ts_us(&self) -> i64 {
        self.last_commit_ts_us
    }

    /// Commit time (µs since the Unix epoch) of the open transaction, if one is open.
    pub fn open_commit_ts_us(&self) -> Option<i64> {
        self.open.map(|(_, _, ts)| ts)
    }

    /// Commit LSN of the open transaction, if one is open.
    pub fn open_commit_lsn(&self) -> Option<Lsn> {
        self.open.map(|(_, lsn, _)| lsn)
    }

    /// Offset of the open transaction's begin record, if one is open.
    pub fn open_begin_offset(&self) -> Option<i64> {
        self.open.map(|(offset, _, _)| offset)
    }

    /// The last source commit LSN this framer let through.
    pub fn applied(&self) -> Lsn {
        self.applied
    }

    /// Marks the begin at `offset` as an orphan and forgets any open transaction; the caller
    /// rewinds to its last committed offset. `applied` is what the target really holds.
    pub fn orphan(&mut self, offset: i64, applied: Lsn) {
        self.orphans.insert(offset);
        self.open = None;
        self.skipping = false;
        self.applied = applied;
    }

    /// Decides what to do with the record at `offset`, written by capture run `run`.
    ///
    /// A record of an older run that comes after the first record of a newer run was sent by
    /// a capture that had already died (the broker appended its last requests late): the
    /// newer run replays everything after its start position, so such records are skipped.
    /// Records of an older run *before* the newer run began are ordinary history.
    pub fn step_run(&mut self, offset: i64, run: Option<u64>, item: StreamItem) -> Step {
        if let Some(run) = run {
            let first = self.runs.entry(run).or_insert(offset);
            *first = (*first).min(offset);
            let superseded = self
                .runs
                .range(run + 1..)
                .any(|(_, &newer_first)| newer_first < offset);
            if superseded {
                return Step::Ignore;
            }
        }
        self.step(offset, item)
    }

    /// Decides what to do with the record at `offset` (records without a run id).
    pub fn step(&mut self, offset: i64, item: StreamItem) -> Step {
        match item {
            StreamItem::Begin(begin) => {
                if let Some((begin_offset, _, _)) = self.open {
                    return Step::Orphaned(begin_offset);
                }
                if self.orphans.contains(&offset) || begin.commit_lsn <= self.applied {
                    self.skipping = true;
                    return Step::Ignore;
                }
                self.skipping = false;
                self.open = Some((offset, begin.commit_lsn, begin.commit_ts_us));
                Step::Start(begin)
            }
            StreamItem::Change(change) => {
                if self.skipping {
                    Step::Ignore
                } else if self.open.is_none() {
                    Step::Stray("a change outside any transaction (its begin record is missing)")
                } else {
                    Step::Apply(change)
                }
            }
            StreamItem::Rows(rows) => {
                if self.skipping {
                    Step::Ignore
                } else if self.open.is_none() {
                    Step::Stray(
                        "snapshot rows outside any transaction (their begin record is missing)",
                    )
                } else {
                    Step::Rows(rows)
                }
            }
            StreamItem::Relation(relation) => {
                if self.skipping {
                    Step::Ignore
                } else if self.open.is_none() {
                    Step::Stray("a relation record outside any transaction")
                } else {
                    Step::Relation(relation)
                }
            }
            StreamItem::Skipped(skipped) => {
                if self.skipping {
                    Step::Ignore
                } else if self.open.is_none() {
                    Step::Stray("a skipped record outside any transaction")
                } else {
                    Step::Skipped(skipped)
                }
            }
            StreamItem::Ack(ack) => {
                if self.skipping {
                    Step::Ignore
                } else if self.open.is_none() {
                    Step::Stray("an ack record outside any transaction")
                } else {
                    Step::Ack(ack)
                }
            }
            StreamItem::Ddl(ddl) => {
                if self.skipping {
                    Step::Ignore
                } else if self.open.is_none() {
                    Step::Stray("a ddl record outside any transaction")
                } else {
                    Step::Ddl(ddl)
                }
            }
            StreamItem::After(after) => {
                if self.skipping {
                    Step::Ignore
                } else if self.open.is_none() {
                    Step::Stray("an after record outside any transaction")
                } else {
                    Step::After(after)
                }
            }
            StreamItem::Commit(commit) => {
                let was_skipping = std::mem::replace(&mut self.skipping, false);
                match self.open.take() {
                    Some((_, lsn, ts)) if lsn == commit.commit_lsn => {
                        self.applied = commit.commit_lsn;
                        self.last_commit_ts_us = ts;
                        Step::End(commit)
                    }
                    None if was_skipping => Step::Ignore,
                    None => Step::Stray(
                        "a commit outside any transaction (its begin record is missing)",
                    ),
                    Some(open) => {
                        // Put the open transaction back: its own commit may still come.
                        self.open = Some(open);
                        Step::Stray("a commit whose LSN does not match the open transaction")
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;

//! Multi-master: pairs each row change with the version the node's version trigger stamped
//! for it. The trigger (`zz_pgferry_version`, a BEFORE ROW trigger) writes the key's row of
//! `pgferry.versions` just before the row change itself, in the same transaction, so in the
//! stream a table's version change immediately precedes its row change. Pure: no I/O.

use std::collections::HashMap;

use crate::event::{RelationMeta, Version};
use crate::source::pgoutput::{Datum, Tuple};

/// Versions stamped in the open transaction and not yet paired, by `schema.table`.
#[derive(Debug, Default)]
pub(super) struct Pending(HashMap<String, Version>);

impl Pending {
    /// Takes in a change of `pgferry.versions` (its new image); ignores images it cannot
    /// read (the change's row then travels without a version, as for unversioned tables).
    pub(super) fn stamped(&mut self, relation: &RelationMeta, image: Option<&Tuple>) {
        if let Some((table, version)) = image.and_then(|t| read(relation, t)) {
            self.0.insert(table, version);
        }
    }

    /// The version stamped for the next change of `relation`, if any (a transaction that
    /// stamped none, as every transaction outside multi-master, pays no lookup).
    pub(super) fn take(&mut self, relation: &RelationMeta) -> Option<Version> {
        if self.0.is_empty() {
            return None;
        }
        self.0.remove(&relation.qualified_name())
    }
}

fn text<'t>(relation: &RelationMeta, tuple: &'t Tuple, column: &str) -> Option<&'t str> {
    let i = relation.columns.iter().position(|c| c.name == column)?;
    match tuple.get(i)? {
        Datum::Text(bytes) => std::str::from_utf8(bytes).ok(),
        _ => None,
    }
}

/// `(table_name, version)` of a `pgferry.versions` row image.
fn read(relation: &RelationMeta, tuple: &Tuple) -> Option<(String, Version)> {
    let table = text(relation, tuple, "table_name")?.to_owned();
    let ts_us = text(relation, tuple, "t")?.parse().ok()?;
    let node = text(relation, tuple, "node")?.to_owned();
    Some((table, Version { ts_us, node }))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::source::pgoutput::{Column, ReplicaIdentity};

    fn versions_relation() -> RelationMeta {
        let col = |name: &str| Column {
            is_key: false,
            name: name.into(),
            type_oid: 25,
            type_modifier: -1,
        };
        RelationMeta {
            oid: 1,
            schema: "pgferry".into(),
            table: "versions".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: ["table_name", "key", "t", "node", "deleted"]
                .into_iter()
                .map(col)
                .collect(),
        }
    }

    fn table(schema: &str, table: &str) -> RelationMeta {
        RelationMeta {
            schema: schema.into(),
            table: table.into(),
            columns: Vec::new(),
            ..versions_relation()
        }
    }

    fn image(table: &str, t: &str, node: &str) -> Tuple {
        [table, "{\"id\": 1}", t, node, "f"]
            .into_iter()
            .map(|v| Datum::Text(Bytes::copy_from_slice(v.as_bytes())))
            .collect()
    }

    #[test]
    fn a_version_pairs_with_the_next_change_of_its_table_once() {
        let rel = versions_relation();
        let mut pending = Pending::default();
        pending.stamped(&rel, Some(&image("public.a", "17", "n1")));
        pending.stamped(&rel, Some(&image("public.b", "5", "n1")));
        // A later stamp of the same table (INSERT … ON CONFLICT DO UPDATE) replaces the first.
        pending.stamped(&rel, Some(&image("public.a", "18", "n1")));
        let (a, b) = (table("public", "a"), table("public", "b"));
        assert_eq!(
            pending.take(&a),
            Some(Version {
                ts_us: 18,
                node: "n1".into()
            })
        );
        assert_eq!(pending.take(&a), None);
        assert_eq!(pending.take(&b).map(|v| v.ts_us), Some(5));
        assert_eq!(pending.take(&b), None);
    }

    #[test]
    fn unreadable_images_are_ignored() {
        let rel = versions_relation();
        let mut pending = Pending::default();
        pending.stamped(&rel, None);
        pending.stamped(&rel, Some(&image("public.a", "not a number", "n1")));
        let mut short = image("public.a", "1", "n1");
        short.truncate(2);
        pending.stamped(&rel, Some(&short));
        let mut binary = image("public.a", "1", "n1");
        binary[2] = Datum::Binary(Bytes::from_static(&[0, 1]));
        pending.stamped(&rel, Some(&binary));
        assert_eq!(pending.take(&table("public", "a")), None);
    }
}

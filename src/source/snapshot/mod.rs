//! Snapshots: publishing rows that existed before the stream saw them.
//!
//! - Chunked (`source.snapshot: initial`, and every on-demand or added-table snapshot): tables
//!   read in key-ordered chunks beside the stream, reconciled at watermarks ([`chunk`],
//!   [`driver`], [`crate::source::reconcile`]).
//! - Exported (`source.snapshot: exported`): this module's [`begin`] / [`TableReader`] read
//!   every table inside the slot's exported snapshot, so that snapshot plus stream has neither
//!   gap nor overlap, in one long transaction. Rows are fetched through a cursor in batches,
//!   so memory stays bounded for any table size.

use std::sync::Arc;

use bytes::Bytes;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::event::RelationMeta;
use crate::source::pgoutput::{Column, Datum, ReplicaIdentity, Tuple};
use crate::sql::{qualified, quote_ident, quote_literal};

pub mod chunk;
pub mod driver;

/// Why a snapshot request was refused.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The source could not be reached or written.
    #[error("{context}")]
    Sql {
        /// What we were doing.
        context: &'static str,
        /// Why it failed.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The table is not one capture publishes.
    #[error("{table} is not in publication {publication} (published: {published}); add it with ALTER PUBLICATION, and capture snapshots it by itself")]
    NotPublished {
        /// What was asked for.
        table: String,
        /// The publication.
        publication: String,
        /// What it holds.
        published: String,
    },
    /// No table has that name.
    #[error("table {table} does not exist on the source (a name is schema.table, quoted like SQL where a part has dots, capitals or spaces: \"My Schema\".\"Orders\"; without a schema, public)")]
    NoSuchTable {
        /// What was asked for.
        table: String,
    },
    /// The name reads as more than one published table.
    #[error("{table} names more than one published table ({candidates}); quote its parts")]
    Ambiguous {
        /// What was asked for.
        table: String,
        /// The tables it may mean.
        candidates: String,
    },
}

/// Queues snapshot requests for published tables (`pgferry snapshot --table`); returns the
/// tables as `schema.table` (the requests name them quoted, `"schema"."table"`). Names are read by [`crate::sql::table_name_readings`]: a
/// name without a schema means `public`, quoted parts may hold dots.
pub async fn request(
    source: &crate::config::SourceConfig,
    tables: &[String],
) -> Result<Vec<String>, RequestError> {
    let sql = |context| move |source| RequestError::Sql { context, source };
    let client = crate::pg::connect(&source.url, "pgferry-snapshot-request")
        .await
        .map_err(sql("connecting to the source"))?;
    super::catalog::ensure_internal_schema(&client)
        .await
        .map_err(sql("creating the pgferry schema"))?;
    let published = super::catalog::published_tables(&client, &source.publication)
        .await
        .map_err(sql("listing published tables"))?;
    let names: Vec<String> = published.iter().map(|(s, t)| qualified(s, t)).collect();
    let mut requested = Vec::new();
    for table in tables {
        let no_such = || RequestError::NoSuchTable {
            table: table.clone(),
        };
        let readings = crate::sql::table_name_readings(table).ok_or_else(no_such)?;
        let found: Vec<&(String, String)> =
            published.iter().filter(|p| readings.contains(p)).collect();
        match found.as_slice() {
            [one] => requested.push((*one).clone()),
            [] => {
                let mut exists = false;
                for (s, t) in &readings {
                    exists |= client
                        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&qualified(s, t)])
                        .await
                        .map_err(sql("looking the table up"))?
                        .get::<_, bool>(0);
                }
                if !exists {
                    return Err(no_such());
                }
                return Err(RequestError::NotPublished {
                    table: table.clone(),
                    publication: source.publication.clone(),
                    published: if names.is_empty() {
                        "nothing".into()
                    } else {
                        names.join(", ")
                    },
                });
            }
            many => {
                let candidates: Vec<String> = many.iter().map(|(s, t)| qualified(s, t)).collect();
                return Err(RequestError::Ambiguous {
                    table: table.clone(),
                    candidates: candidates.join(", "),
                });
            }
        }
    }
    for (schema, table) in &requested {
        chunk::request(&client, &qualified(schema, table), None)
            .await
            .map_err(sql("inserting into pgferry.snapshot_requests"))?;
    }
    Ok(requested.iter().map(|(s, t)| format!("{s}.{t}")).collect())
}

/// Starts the read-only transaction that sees exactly the slot's consistent point.
pub async fn begin(client: &Client, snapshot_name: &str) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;
             SET TRANSACTION SNAPSHOT {}",
            quote_literal(snapshot_name)
        ))
        .await
}

/// Ends the snapshot transaction.
pub async fn finish(client: &Client) -> Result<(), tokio_postgres::Error> {
    client.batch_execute("COMMIT").await
}

/// Describes a table the way pgoutput's Relation message would: live, non-generated columns
/// in attribute order, with the replica identity columns marked as key.
pub async fn describe_table(
    client: &Client,
    schema: &str,
    table: &str,
) -> Result<Option<RelationMeta>, tokio_postgres::Error> {
    describe_where(
        client,
        "n.nspname = $1 AND c.relname = $2",
        &[&schema, &table],
        (schema, table),
    )
    .await
}

/// Sent on every connection that reads snapshot rows. With `row_security` on (the default),
/// a table's row-level security policy silently hides from a role without `BYPASSRLS` the
/// rows it does not pass, while the stream sends every row's changes: a snapshot would copy
/// part of the table, and a re-snapshot would prune the rest from replicas. Off, PostgreSQL
/// refuses the read instead (as PostgreSQL's documentation advises for replication roles)
/// with [`crate::source::capture::CaptureError::SnapshotUnreadable`]: a chunked snapshot of
/// the table waits and is tried again (the stream and other tables go on), an exported
/// snapshot stops capture, until the role may read every row.
pub const ROW_SECURITY_OFF: &str = "SET row_security = off";

/// What a publication sends of one table: PostgreSQL 15's column list and row filter, as
/// `pg_publication_tables` shows them (with no column list, every column).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Published {
    /// The columns it sends; `None`: all of them.
    pub columns: Option<Vec<String>>,
    /// Its row filter (`WHERE`), as SQL over the table's columns; `None`: every row.
    pub row_filter: Option<String>,
}

impl Published {
    /// Keeps of `relation` the columns the publication sends, as pgoutput's Relation message
    /// would describe the table.
    fn columns_of(&self, relation: &mut RelationMeta) {
        if let Some(listed) = &self.columns {
            relation.columns.retain(|c| listed.contains(&c.name));
        }
    }

    /// The row filter as a condition of a snapshot query, parenthesized.
    pub fn condition(&self) -> Option<String> {
        self.row_filter.as_ref().map(|f| format!("({f})"))
    }
}

/// What `publication` sends of `schema.table` (see [`Published`]); every row and column when
/// the table is not in it. A snapshot reads only that, so that snapshot rows are the ones the
/// stream would send: a row outside the filter is neither published nor copied, as in
/// PostgreSQL's own initial table synchronization, and its later changes never travel.
async fn published_part(
    client: &Client,
    publication: &str,
    schema: &str,
    table: &str,
) -> Result<Published, tokio_postgres::Error> {
    // A FOR ALL TABLES publication has neither (PostgreSQL refuses them there), and the view
    // would list every table of the database to find this one: one chunk's query is not
    // worth that.
    let row = client
        .query_opt(
            "SELECT attnames::text[], rowfilter FROM pg_publication_tables
              WHERE pubname = $1 AND schemaname = $2 AND tablename = $3
                AND NOT EXISTS (SELECT FROM pg_publication WHERE pubname = $1 AND puballtables)",
            &[&publication, &schema, &table],
        )
        .await?;
    Ok(row
        .map(|r| Published {
            columns: r.get(0),
            row_filter: r.get(1),
        })
        .unwrap_or_default())
}

/// [`describe_table`] with only the columns `publication` sends, and its row filter (see
/// [`Published`]; every row and column of a table the publication does not hold). A snapshot
/// reads only that, so that snapshot rows are the ones the stream would send.
pub async fn describe_published(
    client: &Client,
    publication: &str,
    schema: &str,
    table: &str,
) -> Result<Option<(RelationMeta, Published)>, tokio_postgres::Error> {
    let Some(mut relation) = describe_table(client, schema, table).await? else {
        return Ok(None);
    };
    let published = published_part(client, publication, schema, table).await?;
    published.columns_of(&mut relation);
    Ok(Some((relation, published)))
}

/// [`describe_table`] of the table with this oid, whatever its name is now, named
/// `schema.table` in what it returns (the name a change decoded late knew it by).
pub async fn describe_table_by_oid(
    client: &Client,
    oid: u32,
    schema: &str,
    table: &str,
) -> Result<Option<RelationMeta>, tokio_postgres::Error> {
    describe_where(client, "c.oid = $1", &[&oid], (schema, table)).await
}

async fn describe_where(
    client: &Client,
    which: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    (schema, table): (&str, &str),
) -> Result<Option<RelationMeta>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "SELECT c.oid, c.relreplident, a.attname::text, a.atttypid, a.atttypmod,
                        COALESCE(a.attnum = ANY(i.indkey::int2[]), false)
                   FROM pg_class c
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                   JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0
                                      AND NOT a.attisdropped AND a.attgenerated = ''
                   LEFT JOIN pg_index i ON i.indrelid = c.oid
                        AND ((c.relreplident IN ('d', 'f') AND i.indisprimary)
                          OR (c.relreplident = 'i' AND i.indisreplident))
                  WHERE {which}
                  ORDER BY a.attnum"
            ),
            params,
        )
        .await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let replica_identity = match first.get::<_, i8>(1) as u8 {
        b'f' => ReplicaIdentity::Full,
        b'n' => ReplicaIdentity::Nothing,
        b'i' => ReplicaIdentity::Index,
        _ => ReplicaIdentity::Default,
    };
    // FULL without a primary key: the whole row is the identity, as pgoutput reports it.
    let all_columns_are_key =
        replica_identity == ReplicaIdentity::Full && !rows.iter().any(|r| r.get::<_, bool>(5));
    let columns = rows
        .iter()
        .map(|r| Column {
            is_key: all_columns_are_key || r.get::<_, bool>(5),
            name: r.get(2),
            type_oid: r.get(3),
            type_modifier: r.get(4),
        })
        .collect();
    Ok(Some(RelationMeta {
        oid: first.get(0),
        schema: schema.to_owned(),
        table: table.to_owned(),
        replica_identity,
        columns,
    }))
}

/// Whether a table is partitioned (its rows are all in its partitions).
pub async fn is_partitioned(client: &Client, oid: u32) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_opt("SELECT relkind = 'p' FROM pg_class WHERE oid = $1", &[&oid])
        .await?;
    Ok(row.is_some_and(|r| r.get(0)))
}

/// What a snapshot reads a table from: `ONLY schema.table` for a plain table (an inheritance
/// child is a table of its own, published and read by itself), the bare name for a partitioned
/// table, which holds no rows itself: a publication with `publish_via_partition_root` lists
/// the partitioned table instead of its partitions, and its changes come under its name.
pub fn scan_source(relation: &RelationMeta, partitioned: bool) -> String {
    let name = qualified(&relation.schema, &relation.table);
    if partitioned {
        name
    } else {
        format!("ONLY {name}")
    }
}

/// Reads one table in batches through a server-side cursor.
pub struct TableReader<'a> {
    client: &'a Client,
    relation: Arc<RelationMeta>,
    row_filter: Option<String>,
    batch_rows: u32,
    opened: bool,
    done: bool,
}

const CURSOR: &str = "pgferry_snapshot";

impl<'a> TableReader<'a> {
    /// Prepares to read `relation` inside the snapshot transaction, only its rows that
    /// `published`'s row filter passes.
    pub fn new(
        client: &'a Client,
        relation: Arc<RelationMeta>,
        published: &Published,
        batch_rows: u32,
    ) -> Self {
        TableReader {
            client,
            relation,
            row_filter: published.condition(),
            batch_rows,
            opened: false,
            done: false,
        }
    }

    /// The next batch of rows in text form; `None` when the table is exhausted.
    pub async fn next_batch(&mut self) -> Result<Option<Vec<Tuple>>, tokio_postgres::Error> {
        if self.done {
            return Ok(None);
        }
        if !self.opened {
            let columns: Vec<String> = self
                .relation
                .columns
                .iter()
                .map(|c| quote_ident(&c.name))
                .collect();
            let partitioned = is_partitioned(self.client, self.relation.oid).await?;
            self.client
                .batch_execute(&format!(
                    "DECLARE {CURSOR} NO SCROLL CURSOR FOR SELECT {} FROM {}{}",
                    columns.join(", "),
                    scan_source(&self.relation, partitioned),
                    self.row_filter
                        .as_deref()
                        .map(|f| format!(" WHERE {f}"))
                        .unwrap_or_default()
                ))
                .await?;
            self.opened = true;
        }
        let messages = self
            .client
            .simple_query(&format!("FETCH {} FROM {CURSOR}", self.batch_rows))
            .await?;
        let mut batch = Vec::with_capacity(self.batch_rows as usize);
        for m in messages {
            if let SimpleQueryMessage::Row(row) = m {
                let tuple = (0..row.len())
                    .map(|i| match row.get(i) {
                        Some(text) => Datum::Text(Bytes::copy_from_slice(text.as_bytes())),
                        None => Datum::Null,
                    })
                    .collect();
                batch.push(tuple);
            }
        }
        if batch.len() < self.batch_rows as usize {
            self.done = true;
            self.client
                .batch_execute(&format!("CLOSE {CURSOR}"))
                .await?;
        }
        Ok(Some(batch).filter(|b| !b.is_empty()))
    }
}

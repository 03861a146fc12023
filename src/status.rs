//! `pgferry status`: where this node stands, for a human at a terminal. Reads the source's
//! slot, each target's apply progress per source node, and in multi-master the peers'
//! acknowledgements (their applied positions and clocks), the tombstone horizon, refused
//! nodes and the recent conflicts.
//! Read-only.

use std::fmt::Write as _;

use tokio_postgres::Client;

use crate::config::{Config, TargetConfig};

/// Renders the status report. Unreachable databases are reported in the text, not as errors.
pub async fn report(config: &Config) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "node {}", config.node_id);
    if let Some(source) = &config.source {
        let slot = source.slot_name(&config.node_id);
        let _ = writeln!(
            out,
            "\nsource {} (slot {slot})",
            source.url.display_target()
        );
        match crate::pg::connect(&source.url, "pgferry-status").await {
            Ok(client) => {
                out.push_str(&connection(&client, &source.url).await);
                match slot_status(&client, &slot).await {
                    Ok(text) => out.push_str(&text),
                    Err(e) => {
                        let _ = writeln!(
                            out,
                            "  cannot read the slot: {}",
                            crate::error::ErrorChain(&e)
                        );
                    }
                }
                match snapshot_status(&client, &slot).await {
                    Ok(text) => out.push_str(&text),
                    Err(e) => {
                        let _ = writeln!(
                            out,
                            "  cannot read snapshot progress: {}",
                            crate::error::ErrorChain(&e)
                        );
                    }
                }
            }
            Err(e) => {
                let _ = writeln!(out, "  unreachable: {}", crate::error::ErrorChain(&e));
            }
        }
    }
    if let Some(apply) = &config.apply {
        for target in &apply.targets {
            out.push_str(&target_status(target).await);
        }
    }
    out
}

/// How this session is connected: TLS (protocol, cipher, whether the server certificate was
/// checked) or plain text, as the server's `pg_stat_ssl` sees it.
async fn connection(client: &Client, url: &crate::config::PgUrl) -> String {
    let row = client
        .query_opt(
            "SELECT ssl, version, cipher FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await;
    let tls = url.tls();
    let checked = if tls.verifies_host() {
        "certificate and host name verified"
    } else if tls.verifies_chain() {
        "certificate verified, host name not checked"
    } else {
        "server certificate not verified"
    };
    match row {
        Ok(Some(r)) if r.get::<_, bool>(0) => format!(
            "  connection: TLS {} {} (sslmode {}: {checked})\n",
            r.get::<_, Option<String>>(1).unwrap_or_default(),
            r.get::<_, Option<String>>(2).unwrap_or_default(),
            tls.mode.as_str()
        ),
        Ok(_) => format!(
            "  connection: plain text, no TLS (sslmode {})\n",
            tls.mode.as_str()
        ),
        Err(e) => format!("  connection: unknown ({})\n", crate::error::ErrorChain(&e)),
    }
}

async fn slot_status(client: &Client, slot: &str) -> Result<String, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT active, confirmed_flush_lsn::text, wal_status,
                    pg_size_pretty((pg_current_wal_lsn() - confirmed_flush_lsn)::int8),
                    pg_size_pretty((pg_current_wal_lsn() - restart_lsn)::int8),
                    pg_size_pretty(safe_wal_size)
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    let Some(r) = row else {
        return Ok("  slot does not exist yet (created on first run)\n".to_owned());
    };
    let active: bool = r.get(0);
    let text = format!(
        "  {}, confirmed {}, lag {}, retained WAL {}, WAL status {}{}\n",
        if active { "streaming" } else { "inactive" },
        r.get::<_, Option<String>>(1).unwrap_or_default(),
        r.get::<_, Option<String>>(3).unwrap_or_default(),
        r.get::<_, Option<String>>(4).unwrap_or_default(),
        r.get::<_, Option<String>>(2).unwrap_or_default(),
        r.get::<_, Option<String>>(5)
            .map(|s| format!(", {s} left before max_slot_wal_keep_size"))
            .unwrap_or_default(),
    );
    Ok(text)
}

/// Snapshots of this slot: a progress bar with rate and ETA per running table (from
/// `pgferry.snapshot_progress`, which records what Kafka holds), and how many are done.
async fn snapshot_status(client: &Client, slot: &str) -> Result<String, tokio_postgres::Error> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('pgferry.snapshot_progress') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !exists {
        return Ok(String::new());
    }
    let rows = client
        .query(
            "SELECT table_schema || '.' || table_name, sum(rows_done)::int8, max(rows_estimated),
                    bool_and(done), count(*)::int8, count(*) FILTER (WHERE done)::int8,
                    extract(epoch FROM max(updated_at) - min(started_at))::float8
               FROM pgferry.snapshot_progress WHERE slot_name = $1
              GROUP BY 1 ORDER BY 1",
            &[&slot],
        )
        .await?;
    let mut out = String::new();
    let done = rows.iter().filter(|r| r.get::<_, bool>(3)).count();
    let _ = writeln!(out, "  snapshots: {done} of {} tables done", rows.len());
    for r in rows.iter().filter(|r| !r.get::<_, bool>(3)) {
        let progress = crate::pipeline::snapshot_progress::SnapshotProgress {
            rows: r.get(1),
            estimated: r.get(2),
            elapsed: std::time::Duration::from_secs_f64(r.get::<_, f64>(6).max(0.0)),
        };
        let _ = writeln!(
            out,
            "    {:<40} {progress}  (parts {}/{})",
            r.get::<_, String>(0),
            r.get::<_, i64>(5),
            r.get::<_, i64>(4)
        );
    }
    Ok(out)
}

async fn target_status(target: &TargetConfig) -> String {
    let mut out = format!("\ntarget {}\n", target.url.display_target());
    let client = match crate::pg::connect(&target.url, "pgferry-status").await {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(out, "  unreachable: {}", crate::error::ErrorChain(&e));
            return out;
        }
    };
    out.push_str(&connection(&client, &target.url).await);
    match applied(&client).await {
        Ok(text) => out.push_str(&text),
        Err(e) => {
            let _ = writeln!(
                out,
                "  cannot read progress: {}",
                crate::error::ErrorChain(&e)
            );
        }
    }
    match diverged(&client).await {
        Ok(text) => out.push_str(&text),
        Err(e) => {
            let _ = writeln!(
                out,
                "  cannot read dead letters: {}",
                crate::error::ErrorChain(&e)
            );
        }
    }
    match versions(&client).await {
        Ok(text) => out.push_str(&text),
        Err(e) => {
            let _ = writeln!(
                out,
                "  cannot read the version store: {}",
                crate::error::ErrorChain(&e)
            );
        }
    }
    match conflicts(&client).await {
        Ok(text) => out.push_str(&text),
        Err(e) => {
            let _ = writeln!(
                out,
                "  cannot read conflicts: {}",
                crate::error::ErrorChain(&e)
            );
        }
    }
    out
}

async fn applied(client: &Client) -> Result<String, tokio_postgres::Error> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('pgferry.apply_progress') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !exists {
        return Ok("  nothing applied yet\n".to_owned());
    }
    let rows = client
        .query(
            "SELECT source_node, next_offset, commit_lsn::text,
                    applied_at::text, extract(epoch FROM now() - applied_at)::int8
               FROM pgferry.apply_progress ORDER BY source_node",
            &[],
        )
        .await?;
    let mut out = String::new();
    for r in rows {
        let _ = writeln!(
            out,
            "  from {:<16} applied up to {} (next offset {}), last commit {} ({}s ago)",
            r.get::<_, String>(0),
            r.get::<_, String>(2),
            r.get::<_, i64>(1),
            r.get::<_, String>(3),
            r.get::<_, i64>(4),
        );
    }
    let seeds: bool = client
        .query_one("SELECT to_regclass('pgferry.seeds') IS NOT NULL", &[])
        .await?
        .get(0);
    if seeds {
        for r in client
            .query(
                "SELECT source_node, state, consistent_lsn::text, array_length(tables, 1),
                        coalesce(finished_at, started_at)::text
                   FROM pgferry.seeds ORDER BY source_node",
                &[],
            )
            .await?
        {
            let (node, state, lsn, tables, at): (
                String,
                String,
                Option<String>,
                Option<i32>,
                String,
            ) = (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
            let tables = tables.unwrap_or(0);
            let _ = match lsn {
                Some(lsn) if state == "done" => writeln!(
                    out,
                    "  seeded from {node} at LSN {lsn} ({tables} tables, {at})"
                ),
                _ => writeln!(
                    out,
                    "  seed from {node} did not finish ({state} since {at}, {tables} tables): \
                     run `pgferry seed` again; the applier waits for it"
                ),
            };
        }
    }
    if out.is_empty() {
        out.push_str("  nothing applied yet\n");
    }
    Ok(out)
}

/// Tables with unresolved dead letters: the target misses changes to them.
async fn diverged(client: &Client) -> Result<String, tokio_postgres::Error> {
    let letters =
        crate::apply::dead_letters::read(client, &crate::apply::dead_letters::Selection::default())
            .await?;
    // Per table: unresolved letters, and how many of them park it.
    let mut by_table: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    for letter in &letters {
        let entry = by_table
            .entry(
                letter
                    .table
                    .clone()
                    .unwrap_or_else(|| "(unknown table)".into()),
            )
            .or_default();
        entry.0 += 1;
        entry.1 += usize::from(crate::apply::dead_letters::parks(letter));
    }
    let mut out = String::new();
    for (table, (n, parked)) in by_table {
        let _ = write!(
            out,
            "  DIVERGED {table}: {n} unresolved dead letter(s); see `pgferry dead-letters list`"
        );
        if parked > 0 {
            let _ = write!(
                out,
                "; PARKED behind a schema change the target refused ({parked} waiting): fix \
                 its cause here, and the table resumes by itself"
            );
        }
        out.push('\n');
    }
    Ok(out)
}

/// Multi-master: what each peer acknowledged (its applied positions and clock), the
/// tombstone horizon per stream, tombstones waiting, and refused nodes.
async fn versions(client: &Client) -> Result<String, tokio_postgres::Error> {
    let exists: bool = client
        .query_one("SELECT to_regclass('pgferry.peer_acks') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(String::new());
    }
    let mut out = String::from("  peers' acknowledgements:\n");
    let rows = client
        .query(
            "SELECT reporter, source, applied_lsn::text,
                    extract(epoch FROM now() - received_at)::int8, clock_ahead_us
               FROM pgferry.peer_acks ORDER BY reporter, source",
            &[],
        )
        .await?;
    let mut clocks = std::collections::BTreeMap::new();
    for r in &rows {
        let reporter: String = r.get(0);
        let _ = writeln!(
            out,
            "    {reporter} had applied {} up to {} (ack received {}s ago)",
            r.get::<_, String>(1),
            r.get::<_, String>(2),
            r.get::<_, i64>(3),
        );
        if let Some(ahead) = r.get::<_, Option<i64>>(4) {
            clocks.insert(reporter, ahead);
        }
    }
    for (reporter, ahead_us) in clocks {
        let _ = writeln!(
            out,
            "  clock skew: {reporter} ran {:+} ms against this node at its last ack",
            ahead_us / 1000
        );
    }
    let horizon = client
        .query(
            "SELECT source, min(applied_lsn)::text, count(*) FROM pgferry.peer_acks
              GROUP BY source ORDER BY source",
            &[],
        )
        .await?;
    for r in horizon {
        let _ = writeln!(
            out,
            "  tombstone horizon for deletes from {}: {} (acknowledged by {} peer(s))",
            r.get::<_, String>(0),
            r.get::<_, String>(1),
            r.get::<_, i64>(2),
        );
    }
    let tombstones = client
        .query_one(
            "SELECT count(*), coalesce(min(t), 0),
                    (extract(epoch FROM clock_timestamp()) * 1000000)::int8
               FROM pgferry.versions WHERE deleted",
            &[],
        )
        .await?;
    let (count, oldest, now): (i64, i64, i64) =
        (tombstones.get(0), tombstones.get(1), tombstones.get(2));
    let _ = write!(out, "  tombstones kept: {count}");
    if count > 0 {
        let _ = write!(out, " (oldest {}s)", (now - oldest).max(0) / 1_000_000);
    }
    out.push('\n');
    let refused = client
        .query(
            "SELECT node, since::text, tombstones FROM pgferry.horizon_bypassed ORDER BY node",
            &[],
        )
        .await?;
    for r in refused {
        let _ = writeln!(
            out,
            "  REFUSED node {}: away past the tombstone horizon since {} ({} tombstones it never \
             acknowledged were collected); rebuild it with `pgferry join` under a new node_id",
            r.get::<_, String>(0),
            r.get::<_, String>(1),
            r.get::<_, i64>(2),
        );
    }
    Ok(out)
}

async fn conflicts(client: &Client) -> Result<String, tokio_postgres::Error> {
    let exists: bool = client
        .query_one("SELECT to_regclass('pgferry.conflicts') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(String::new());
    }
    let total: i64 = client
        .query_one(
            "SELECT count(*) FROM pgferry.conflicts WHERE detected_at > now() - interval '1 day'",
            &[],
        )
        .await?
        .get(0);
    let mut out = format!("  conflicts in the last 24h: {total}\n");
    let rows = client
        .query(
            "SELECT detected_at::text, table_name, key::text, conflict_type, resolution,
                    COALESCE(local_node, '?'), remote_node
               FROM pgferry.conflicts ORDER BY id DESC LIMIT 10",
            &[],
        )
        .await?;
    for r in rows {
        let _ = writeln!(
            out,
            "    {} {} {} {} -> {} (local {}, remote {})",
            r.get::<_, String>(0),
            r.get::<_, String>(1),
            r.get::<_, String>(2),
            r.get::<_, String>(3),
            r.get::<_, String>(4),
            r.get::<_, String>(5),
            r.get::<_, String>(6),
        );
    }
    Ok(out)
}

//! `pgferry status`: where this node stands, for a human at a terminal. Reads the source's
//! slot, each target's apply progress per source node, and the recent multi-master conflicts.
//! Read-only.

use std::fmt::Write as _;

use tokio_postgres::Client;

use crate::config::{Config, TargetConfig};
use crate::source::catalog;

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
        match catalog::connect(source.url.config(), "pgferry-status").await {
            Ok(client) => match slot_status(&client, &slot).await {
                Ok(text) => out.push_str(&text),
                Err(e) => {
                    let _ = writeln!(
                        out,
                        "  cannot read the slot: {}",
                        crate::error::ErrorChain(&e)
                    );
                }
            },
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

async fn target_status(target: &TargetConfig) -> String {
    let mut out = format!("\ntarget {}\n", target.url.display_target());
    let client = match catalog::connect(target.url.config(), "pgferry-status").await {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(out, "  unreachable: {}", crate::error::ErrorChain(&e));
            return out;
        }
    };
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
    let mut by_table: std::collections::BTreeMap<String, usize> = Default::default();
    for letter in &letters {
        *by_table
            .entry(
                letter
                    .table
                    .clone()
                    .unwrap_or_else(|| "(unknown table)".into()),
            )
            .or_default() += 1;
    }
    let mut out = String::new();
    for (table, n) in by_table {
        let _ = writeln!(
            out,
            "  DIVERGED {table}: {n} unresolved dead letter(s); see `pgferry dead-letters list`"
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

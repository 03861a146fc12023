//! `pgferry check`: preflight of a config against the real servers. Each problem is one line
//! saying what is wrong and how to fix it; the command exits 0 only when there are none.

mod privileges;

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio_postgres::Client;

use crate::config::{ApplyConfig, ApplyMode, Config, KafkaConfig, SourceConfig, TargetConfig};
use crate::kafka::{client_config, LastError};
use crate::pg::replication::ReplicationConnection;
use crate::source::catalog;

/// One thing that would stop pgferry from working.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// What is wrong.
    pub what: String,
    /// How to fix it.
    pub fix: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PROBLEM: {} -- fix: {}", self.what, self.fix)
    }
}

fn problem(what: impl Into<String>, fix: impl Into<String>) -> Problem {
    Problem {
        what: what.into(),
        fix: fix.into(),
    }
}

/// Runs every check the config calls for.
pub async fn run(config: &Config) -> Vec<Problem> {
    let mut problems = Vec::new();
    if let Some(source) = &config.source {
        check_source(config, source, &mut problems).await;
    }
    if let Some(apply) = &config.apply {
        for target in &apply.targets {
            check_target(&config.kafka, apply, target, &mut problems).await;
        }
    }
    check_broker(config, &mut problems).await;
    problems
}

async fn check_source(config: &Config, source: &SourceConfig, problems: &mut Vec<Problem>) {
    let target = source.url.display_target();
    let client = match crate::pg::connect(&source.url, "pgferry-check").await {
        Ok(c) => c,
        Err(e) => {
            problems.push(problem(
                format!(
                    "cannot connect to source {target}: {}",
                    crate::error::ErrorChain(&e)
                ),
                "check source.url (host, sslmode, sslrootcert, sslcert), the password and pg_hba.conf",
            ));
            return;
        }
    };
    if let Err(e) = check_server_settings(&client, config, source, problems).await {
        problems.push(problem(
            format!(
                "cannot read settings from source {target}: {}",
                crate::error::ErrorChain(&e)
            ),
            "grant the pgferry role read access to pg_catalog (the default)",
        ));
    }
    if let Err(e) = check_tables(&client, config, source, problems).await {
        problems.push(problem(
            format!(
                "cannot list tables on source {target}: {}",
                crate::error::ErrorChain(&e)
            ),
            "grant the pgferry role read access to pg_catalog (the default)",
        ));
    }
    if let Err(e) = privileges::capture(&client, source, problems).await {
        problems.push(problem(
            format!(
                "cannot read privileges on source {target}: {}",
                crate::error::ErrorChain(&e)
            ),
            "grant the pgferry role read access to pg_catalog (the default)",
        ));
    }
    match ReplicationConnection::connect(&source.url, "pgferry-check").await {
        Ok(mut repl) => {
            if let Err(e) = repl.simple_query("IDENTIFY_SYSTEM").await {
                problems.push(problem(
                    format!(
                        "replication connection to {target} refused IDENTIFY_SYSTEM: {}",
                        crate::error::ErrorChain(&e)
                    ),
                    "give the role REPLICATION and allow it in pg_hba.conf",
                ));
            }
            repl.terminate().await;
        }
        Err(e) => problems.push(problem(
            format!(
                "cannot open a replication connection to {target}: {}",
                crate::error::ErrorChain(&e)
            ),
            "allow `host <db> <user> <addr> scram-sha-256` for the pgferry role in pg_hba.conf \
             (replication=database connections match the database name), and grant REPLICATION",
        )),
    }
}

async fn check_server_settings(
    client: &Client,
    config: &Config,
    source: &SourceConfig,
    problems: &mut Vec<Problem>,
) -> Result<(), tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'),
                    current_setting('max_replication_slots')::int,
                    current_setting('max_wal_senders')::int,
                    (SELECT count(*)::int FROM pg_replication_slots),
                    (SELECT count(*)::int FROM pg_stat_replication),
                    (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user)",
            &[],
        )
        .await?;
    let wal_level: String = row.get(0);
    if wal_level != "logical" {
        problems.push(problem(
            format!("source wal_level is '{wal_level}', logical decoding needs 'logical'"),
            "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL",
        ));
    }
    let slot_name = source.slot_name(&config.node_id);
    let version = catalog::server_version_num(client).await?;
    let slot = catalog::slot(client, version, &slot_name).await?;
    let (max_slots, max_senders, used_slots, senders): (i32, i32, i32, i32) =
        (row.get(1), row.get(2), row.get(3), row.get(4));
    if slot.is_none() && used_slots >= max_slots {
        problems.push(problem(
            format!("all {max_slots} replication slots are in use; pgferry needs one more for {slot_name}"),
            "raise max_replication_slots (restart required) or drop an unused slot",
        ));
    }
    if senders >= max_senders {
        problems.push(problem(
            format!("all {max_senders} WAL senders are busy"),
            "raise max_wal_senders (restart required)",
        ));
    }
    check_slot_loss(client, &slot_name, slot.as_ref(), problems).await?;
    if let Some(info) = slot {
        if info.plugin.as_deref() != Some("pgoutput") {
            problems.push(problem(
                format!(
                    "slot {slot_name} exists with plugin {:?}, pgferry needs pgoutput",
                    info.plugin
                ),
                "drop the slot or set source.slot to another name",
            ));
        }
    }
    if !row.get::<_, Option<bool>>(5).unwrap_or(false) {
        let role = source.url.config().get_user().unwrap_or("postgres");
        problems.push(problem(
            format!("the source role {role} has neither REPLICATION nor SUPERUSER"),
            format!("ALTER ROLE {} REPLICATION", crate::sql::quote_ident(role)),
        ));
    }
    check_slot_retention(client, &slot_name, problems).await
}

/// Reports a slot that pgferry streamed from and that is now missing (its snapshot is recorded
/// in `pgferry.snapshot_state`), or invalidated for a reason other than removed WAL (which
/// [`check_slot_retention`] reports). Capture would stop on either.
async fn check_slot_loss(
    client: &Client,
    slot_name: &str,
    slot: Option<&catalog::SlotInfo>,
    problems: &mut Vec<Problem>,
) -> Result<(), tokio_postgres::Error> {
    const FIX: &str = "restore the slot (e.g. fail over to a standby holding a synchronized \
                       copy), or set source.on_slot_loss: recreate to re-create it with a fresh \
                       snapshot";
    match slot {
        None => {
            // Before the first capture run the bookkeeping table does not exist yet.
            let row = client
                .query_one(
                    "SELECT to_regclass('pgferry.snapshot_state') IS NOT NULL",
                    &[],
                )
                .await?;
            if !row.get::<_, bool>(0) {
                return Ok(());
            }
            if let Some(reached) = catalog::snapshot_completed(client, slot_name).await? {
                problems.push(problem(
                    format!(
                        "slot {slot_name} is missing, but pgferry had completed its snapshot for \
                         it: changes after LSN {reached} that were not yet in Kafka may be lost"
                    ),
                    FIX,
                ));
            }
        }
        Some(info) => {
            if let Some(reason) = info.invalidation.as_deref().filter(|r| *r != "wal_removed") {
                problems.push(problem(
                    format!("slot {slot_name} was invalidated by the server ({reason})"),
                    FIX,
                ));
            }
        }
    }
    Ok(())
}

/// Warns before the slot loses WAL it still needs (`max_slot_wal_keep_size`): after that the
/// node cannot catch up from the slot and must be rebuilt.
async fn check_slot_retention(
    client: &Client,
    slot: &str,
    problems: &mut Vec<Problem>,
) -> Result<(), tokio_postgres::Error> {
    let Some(row) = client
        .query_opt(
            "SELECT wal_status, safe_wal_size, (pg_current_wal_lsn() - restart_lsn)::int8,
                    (SELECT setting::int8 * 1048576 FROM pg_settings WHERE name = 'max_slot_wal_keep_size')
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
    else {
        return Ok(());
    };
    let status: Option<String> = row.get(0);
    let (safe, retained, limit): (Option<i64>, Option<i64>, Option<i64>) =
        (row.get(1), row.get(2), row.get(3));
    match status.as_deref() {
        Some("lost") => problems.push(problem(
            format!("slot {slot} has lost WAL it needed (wal_status = lost): changes are gone"),
            "set source.on_slot_loss: recreate to re-create the slot with a fresh snapshot (in \
             multi-master, rebuild this node from a copy of a peer first)",
        )),
        Some("unreserved") => problems.push(problem(
            format!("slot {slot} is past max_slot_wal_keep_size (wal_status = unreserved): its WAL is removed at the next checkpoint"),
            "start pgferry now so it catches up, or raise max_slot_wal_keep_size",
        )),
        _ => {
            if let (Some(safe), Some(retained), Some(limit)) = (safe, retained, limit) {
                if limit > 0 && safe < limit / 5 {
                    problems.push(problem(
                        format!(
                            "slot {slot} retains {retained} bytes of WAL and can keep only {safe} more \
                             before it exceeds max_slot_wal_keep_size"
                        ),
                        "start pgferry so it catches up, or raise max_slot_wal_keep_size",
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Tables that will be published: the publication's, if it exists; else the configured list;
/// else every user table (FOR ALL TABLES). In multi-master, also a publication that lists
/// columns (the node refuses it at start).
async fn check_tables(
    client: &Client,
    config: &Config,
    source: &SourceConfig,
    problems: &mut Vec<Problem>,
) -> Result<(), tokio_postgres::Error> {
    let rows = client
        .query(
            "WITH candidates AS (
                 SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.relkind IN ('r', 'p')
                    AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgferry')
                    AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'
                    AND CASE
                        WHEN EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)
                          THEN (n.nspname, c.relname) IN
                               (SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = $1)
                        WHEN cardinality($2::text[]) > 0
                          THEN n.nspname || '.' || c.relname = ANY($2::text[])
                        ELSE true END)
             SELECT n.nspname::text, c.relname::text, c.relreplident::text,
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident)
               FROM candidates k JOIN pg_class c ON c.oid = k.oid
               JOIN pg_namespace n ON n.oid = c.relnamespace ORDER BY 1, 2",
            &[&source.publication, &source.tables],
        )
        .await?;
    let multi_master = config
        .apply
        .as_ref()
        .is_some_and(|a| a.mode == ApplyMode::MultiMaster);
    if multi_master {
        let partial =
            crate::apply::multimaster::partial_tables(client, &source.publication).await?;
        if !partial.is_empty() {
            let publication = crate::sql::quote_ident(&source.publication);
            problems.push(problem(
                format!(
                    "publication {} publishes only some columns of {} (column lists): \
                     multi-master writes each row whole, so the other nodes would reset the \
                     columns left out, and the node refuses to start",
                    source.publication,
                    partial.join(", ")
                ),
                format!("publish whole tables: ALTER PUBLICATION {publication} SET TABLE … without column lists"),
            ));
        }
    }
    for r in rows {
        let (schema, table, ident): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        let (has_pk, has_index): (bool, bool) = (r.get(3), r.get(4));
        let keyed = match ident.as_str() {
            "f" => true,
            "i" => has_index,
            "d" => has_pk,
            _ => false,
        };
        if !keyed {
            let name = crate::sql::qualified(&schema, &table);
            problems.push(problem(
                format!(
                    "table {schema}.{table} has no primary key or replica identity: once published, \
                     UPDATE and DELETE on it fail and its changes have no Kafka key"
                ),
                format!("ALTER TABLE {name} ADD PRIMARY KEY (...), or ALTER TABLE {name} REPLICA IDENTITY FULL"),
            ));
        }
    }
    Ok(())
}

/// The target cluster must have a replication origin state for every origin its workers use
/// (one per source node, plus one per extra lane in multi-master) beside the origins that exist.
async fn check_origin_room(
    apply: &ApplyConfig,
    target: &TargetConfig,
    client: &Client,
    name: &str,
    problems: &mut Vec<Problem>,
) {
    let lanes = match apply.mode {
        ApplyMode::MultiMaster => usize::from(apply.lanes),
        ApplyMode::Replica => 1,
    };
    let wanted = crate::naming::target_origins(&apply.nodes, target.url.dbname(), lanes);
    let room = client
        .query_one(
            "SELECT coalesce(current_setting('max_active_replication_origins', true),
                             current_setting('max_replication_slots'))::int8,
                    (SELECT coalesce(array_agg(roname::text), '{}') FROM pg_replication_origin)",
            &[],
        )
        .await;
    let Ok(row) = room else {
        // Unreadable settings or catalog: the superuser check above reports the role.
        return;
    };
    let (limit, existing): (i64, Vec<String>) = (row.get(0), row.get(1));
    if let Some(needed) = crate::naming::origin_states_short(limit, &existing, &wanted) {
        problems.push(problem(
            format!(
                "apply target {name} needs {needed} replication origins ({} for this config's \
                 {} node(s) x {lanes} lane(s), with those that exist), but its cluster tracks \
                 at most {limit} (max_replication_slots; max_active_replication_origins on \
                 PostgreSQL 18): workers would fail with \"could not find free replication \
                 state slot\"",
                wanted.len(),
                apply.nodes.len(),
            ),
            format!(
                "raise max_replication_slots (max_active_replication_origins on PostgreSQL 18) \
                 to at least {needed} on the target and restart it, or lower apply.lanes"
            ),
        ));
    }
}

/// A target must accept the apply session (a superuser, or the privileges of
/// [`crate::roles`]) and hold every listed table, with a primary key.
async fn check_target(
    kafka: &KafkaConfig,
    apply: &ApplyConfig,
    target: &TargetConfig,
    problems: &mut Vec<Problem>,
) {
    let name = target.url.display_target();
    let client = match crate::pg::connect(&target.url, "pgferry-check").await {
        Ok(c) => c,
        Err(e) => {
            problems.push(problem(
                format!(
                    "cannot connect to apply target {name}: {}",
                    crate::error::ErrorChain(&e)
                ),
                "check apply.targets[].url (host, sslmode, sslrootcert, sslcert), the password and pg_hba.conf",
            ));
            return;
        }
    };
    if let Err(e) = privileges::apply(&client, apply, &name, problems).await {
        problems.push(problem(
            format!(
                "cannot read privileges on apply target {name}: {}",
                crate::error::ErrorChain(&e)
            ),
            "grant read access to pg_catalog",
        ));
    }
    check_origin_room(apply, target, &client, &name, problems).await;
    for node in &apply.nodes {
        check_backlog(kafka, &client, node, &name, problems).await;
    }
    for table in &apply.tables {
        let Some((schema, rel)) = table.split_once('.') else {
            continue;
        };
        match crate::apply::target::describe(&client, schema, rel).await {
            Ok(None) if apply.create_tables => {}
            Ok(None) => problems.push(problem(
                format!("table {table} does not exist on apply target {name}"),
                "create it with the source's definition (e.g. pg_dump --schema-only -t on the source)",
            )),
            Ok(Some(t)) if t.key.is_empty() => problems.push(problem(
                format!("table {table} on apply target {name} has no primary key"),
                "add the source's primary key; without one, updates cannot be applied",
            )),
            Ok(Some(t)) if !t.always_identity.is_empty() => problems.push(problem(
                format!(
                    "table {table} on apply target {name}: {} GENERATED ALWAYS AS IDENTITY outside \
                     the primary key; PostgreSQL lets no UPDATE set such a column, so a row keeps \
                     the value it was inserted with even where the source changes it",
                    t.always_identity.join(", ")
                ),
                "ALTER TABLE … ALTER COLUMN … SET GENERATED BY DEFAULT on the target (inserts write the source's values either way)",
            )),
            Ok(Some(_)) => {}
            Err(e) => problems.push(problem(
                format!("cannot describe {table} on apply target {name}: {}", crate::error::ErrorChain(&e)),
                "grant read access to pg_catalog",
            )),
        }
    }
}

/// Reports a gap in a node stream a target follows ([`crate::apply::position`]: retention
/// deleted unapplied records, or the topic was recreated), and warns when the oldest
/// unapplied record nears the topic's retention: past it, the target can no longer catch up.
async fn check_backlog(
    kafka: &KafkaConfig,
    client: &Client,
    node: &str,
    target: &str,
    problems: &mut Vec<Problem>,
) {
    let Ok(Some(progress)) = crate::apply::target::read_progress(client, node).await else {
        return;
    };
    let topic = crate::sink::kafka::node_stream::node_stream_topic(&kafka.topic_prefix, node);
    let kafka = kafka.clone();
    let next = progress.next_offset;
    let probe_topic = topic.clone();
    let applied = progress.commit_lsn;
    let position = {
        let (kafka, topic) = (kafka.clone(), topic.clone());
        tokio::task::spawn_blocking(move || {
            crate::apply::position::check(&kafka, &topic, next, applied)
        })
        .await
    };
    if let Ok(Ok(crate::apply::position::Verdict { gap: Some(gap), .. })) = position {
        problems.push(problem(
            format!("gap in {topic} for target {target}: {gap}; changes may be missing"),
            "re-seed the target from the source, then reset pgferry.apply_progress for this node",
        ));
        return;
    }
    let found = tokio::task::spawn_blocking(move || backlog(&kafka, &probe_topic, next)).await;
    let Ok(Ok(backlog)) = found else {
        return;
    };
    if let (Some(age), Some(retention)) = (backlog.oldest_unapplied_age, backlog.retention) {
        if age * 5 > retention * 4 {
            problems.push(problem(
                format!(
                    "the oldest record target {target} has not applied from {topic} is {}s old, \
                     over 80% of the topic's retention ({}s)",
                    age.as_secs(),
                    retention.as_secs()
                ),
                "start pgferry on this node now, or raise the topic's retention.ms",
            ));
        }
    }
}

/// What a node stream holds past a target's position.
struct Backlog {
    oldest_unapplied_age: Option<Duration>,
    retention: Option<Duration>,
}

fn backlog(
    kafka: &KafkaConfig,
    topic: &str,
    next: i64,
) -> Result<Backlog, rdkafka::error::KafkaError> {
    use rdkafka::message::Message;
    // A group id is needed to assign partitions; nothing joins the group or commits to it.
    let consumer: BaseConsumer = crate::kafka::create(
        client_config(kafka)
            .set("group.id", "pgferry-check")
            .set("enable.auto.commit", "false"),
    )?;
    let (low, high) = consumer.fetch_watermarks(topic, 0, Duration::from_secs(10))?;
    let mut oldest_unapplied_age = None;
    if next < high && next >= low {
        let mut list = rdkafka::TopicPartitionList::new();
        list.add_partition_offset(topic, 0, rdkafka::Offset::Offset(next))?;
        consumer.assign(&list)?;
        if let Some(Ok(m)) = consumer.poll(Duration::from_secs(10)) {
            if let Some(ms) = m.timestamp().to_millis() {
                let now = crate::pgtime::PgTimestamp::now().unix_millis();
                oldest_unapplied_age = Some(Duration::from_millis((now - ms).max(0) as u64));
            }
        }
    }
    let retention = topic_retention(kafka, topic);
    Ok(Backlog {
        oldest_unapplied_age,
        retention,
    })
}

/// The topic's `retention.ms`, if the broker reports one (and it is not unlimited).
fn topic_retention(kafka: &KafkaConfig, topic: &str) -> Option<Duration> {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> =
        crate::kafka::create(&client_config(kafka)).ok()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    let results = runtime
        .block_on(admin.describe_configs(
            &[ResourceSpecifier::Topic(topic)],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        ))
        .ok()?;
    let resource = results.into_iter().next()?.ok()?;
    let ms: i64 = resource
        .get("retention.ms")?
        .value
        .as_deref()?
        .parse()
        .ok()?;
    (ms > 0).then(|| Duration::from_millis(ms as u64))
}

async fn check_broker(config: &Config, problems: &mut Vec<Problem>) {
    let kafka = config.kafka.clone();
    let result = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer<LastError> =
            crate::kafka::create_with_context(&client_config(&kafka), LastError::default())?;
        let fetched = consumer.fetch_metadata(None, Duration::from_secs(10));
        // librdkafka reports why (TLS, SASL) through the error callback, served by poll.
        let reason = fetched.is_err().then(|| {
            let _ = consumer.poll(Duration::from_millis(200));
            consumer.context().reason()
        });
        Ok::<_, rdkafka::error::KafkaError>((fetched.map(|m| m.brokers().len()), reason.flatten()))
    })
    .await;
    match result {
        Ok(Ok((Ok(_), _))) => {}
        Ok(Ok((Err(e), reason))) => problems.push(problem(
            format!(
                "Kafka brokers {} are not reachable: {e}{}",
                config.kafka.brokers,
                reason.map(|r| format!(" ({r})")).unwrap_or_default()
            ),
            "check kafka.brokers and kafka.properties (security.protocol, ssl.*, sasl.*)",
        )),
        Ok(Err(e)) => problems.push(problem(
            format!("cannot create a Kafka client: {e}"),
            "check kafka.properties",
        )),
        Err(e) => problems.push(problem(
            format!("broker check did not finish: {e}"),
            "retry",
        )),
    }
}

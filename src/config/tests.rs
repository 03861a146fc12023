use super::*;

const MINIMAL: &str = "
node_id: node-a
source:
  url: postgres://app:s3cret@db.internal:5433/shop
kafka:
  brokers: 127.0.0.1:9092
";

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn defaults_apply() {
    let c = load_from_str(MINIMAL, env(&[])).unwrap();
    let s = c.source.as_ref().unwrap();
    assert_eq!(s.slot_name(&c.node_id), "pgferry_node_a");
    assert_eq!(s.publication, DEFAULT_PUBLICATION);
    assert_eq!(s.heartbeat_interval, DEFAULT_HEARTBEAT_INTERVAL);
    assert_eq!(s.on_slot_loss, OnSlotLoss::Stop);
    assert!(s.failover_slot);
    assert_eq!(c.kafka.topic_prefix, DEFAULT_TOPIC_PREFIX);
    assert_eq!(c.metrics.listen.to_string(), DEFAULT_METRICS_LISTEN);
    assert!(c.kafka.tombstones);
}

#[test]
fn env_overrides_nested_keys() {
    let c = load_from_str(
        MINIMAL,
        env(&[
            ("PGFERRY_SOURCE__SLOT", "custom_slot"),
            ("PGFERRY_KAFKA__TOMBSTONES", "false"),
            ("PGFERRY_SOURCE__TABLES", "[public.a, public.b]"),
            ("PGFERRY_NODE_ID", "7"),
            ("PGFERRY_SOURCE__ON_SLOT_LOSS", "recreate"),
            ("PGFERRY_SOURCE__FAILOVER_SLOT", "false"),
            ("OTHER", "ignored"),
        ]),
    )
    .unwrap();
    let s = c.source.as_ref().unwrap();
    assert_eq!(s.on_slot_loss, OnSlotLoss::Recreate);
    assert!(!s.failover_slot);
    assert_eq!(s.slot.as_deref(), Some("custom_slot"));
    assert_eq!(s.tables, vec!["public.a", "public.b"]);
    assert!(!c.kafka.tombstones);
    assert_eq!(c.node_id, "7");
}

#[test]
fn password_override_wins_and_is_never_printed() {
    let c = load_from_str(MINIMAL, env(&[("PGFERRY_SOURCE__PASSWORD", "from-env")])).unwrap();
    let s = c.source.as_ref().unwrap();
    assert_eq!(s.url.config().get_password(), Some(&b"from-env"[..]));
    let shown = format!("{c:?}");
    assert!(
        !shown.contains("from-env") && !shown.contains("s3cret"),
        "{shown}"
    );
    assert!(shown.contains("db.internal:5433/shop"), "{shown}");
}

#[test]
fn kafka_secret_properties_are_redacted() {
    let text = format!("{MINIMAL}  properties:\n    sasl.password: topsecret\n    linger.ms: 5\n");
    let c = load_from_str(&text, env(&[])).unwrap();
    let shown = format!("{:?}", c.kafka);
    assert!(
        !shown.contains("topsecret") && shown.contains("linger.ms"),
        "{shown}"
    );
}

#[test]
fn password_file_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pw");
    std::fs::write(&file, "filepass\n").unwrap();
    let text = format!(
        "node_id: a\nkafka: {{brokers: b}}\nsource:\n  url: postgres://app@h/db\n  password_file: {}\n",
        file.display()
    );
    let c = load_from_str(&text, env(&[])).unwrap();
    let s = c.source.unwrap();
    assert_eq!(s.url.config().get_password(), Some(&b"filepass"[..]));
}

/// Each malformed config fails, and the message names the offending key.
#[test]
fn malformed_configs_name_the_key() {
    let cases: &[(&str, &str)] = &[
        ("node_id: a\nkafka: {brokers: b}\nsourc: {}\n", "sourc"),
        ("node_id: a\nkafka: {brokers: b, topic_prefx: x}\n", "topic_prefx"),
        ("kafka: {brokers: b}\n", "node_id"),
        ("node_id: a\nkafka: {brokers: b, tombstones: maybe}\n", "kafka.tombstones"),
        ("node_id: a\nkafka: {brokers: b}\nsource: {url: 'postgres://x', slot: Bad-Slot}\n", "source.slot"),
        ("node_id: a\nkafka: {brokers: b}\nsource: {url: 'postgres://x', heartbeat_interval: 10}\n", "source.heartbeat_interval"),
        ("node_id: a\nkafka: {brokers: b}\nsource: {url: 'postgres://x', tables: [nodot]}\n", "source.tables[0]"),
        ("node_id: a\nkafka: {brokers: b}\nmetrics: {listen: nowhere}\n", "metrics.listen"),
        ("node_id: a\nkafka: {brokers: b, properties: {acks: '1'}}\n", "kafka.properties.acks"),
        ("node_id: 'a b'\nkafka: {brokers: b}\n", "node_id"),
        ("node_id: a\nkafka: {brokers: b}\nsource: {url: 'postgres://x', snapshot: sometimes}\n", "source.snapshot"),
        ("node_id: a\nkafka: {brokers: b, topic_partitions: 0}\n", "kafka.topic_partitions"),
        ("node_id: a\nkafka: {brokers: b}\nsource: {url: 'postgres://x', on_slot_loss: ignore}\n", "source.on_slot_loss"),
        ("node_id: a\nkafka: {brokers: b}\nsource: {url: 'postgres://x', failover_slot: sometimes}\n", "source.failover_slot"),
    ];
    for (text, key) in cases {
        let err = load_from_str(text, env(&[])).unwrap_err().to_string();
        assert!(
            err.contains(key),
            "config {text:?}: error {err:?} does not name {key}"
        );
    }
}

#[test]
fn example_config_is_valid() {
    let text = include_str!("../../config.example.yaml");
    let c = load_from_str(text, env(&[])).unwrap();
    assert_eq!(c.node_id, "node-a");
    assert_eq!(c.source.unwrap().slot.as_deref(), Some("pgferry_node_a"));
    let apply = c.apply.unwrap();
    assert_eq!(apply.nodes, vec!["node-a"]);
    assert_eq!(apply.batch_max_changes, DEFAULT_BATCH_MAX_CHANGES);
}

const MULTI_MASTER: &str = "
node_id: a
source:
  url: postgres://app@db/shop
kafka:
  brokers: 127.0.0.1:9092
apply:
  mode: multi_master
  nodes: [b, c]
  targets:
    - url: postgres://app@db/shop
";

#[test]
fn multi_master_defaults() {
    let c = load_from_str(MULTI_MASTER, env(&[])).unwrap();
    let conflict = &c.apply.as_ref().unwrap().conflict;
    assert_eq!(conflict.tombstone_retention, DEFAULT_RETENTION);
    assert_eq!(conflict.max_clock_skew, DEFAULT_MAX_CLOCK_SKEW);
    assert_eq!(conflict.on_clock_skew, ClockSkewAction::Wait);
    assert!(conflict.resolvers.is_empty());
}

#[test]
fn multi_master_rules_name_the_key() {
    let cases = [
        (
            MULTI_MASTER.replace("nodes: [b, c]", "nodes: [a, b]"),
            "`apply.nodes`",
        ),
        (
            MULTI_MASTER.replace("source:\n  url: postgres://app@db/shop\n", ""),
            "`apply.mode`",
        ),
        (
            MULTI_MASTER.replace("  targets:\n", "  targets:\n    - url: postgres://x@y/z\n"),
            "`apply.targets`",
        ),
        (
            format!("{MULTI_MASTER}  conflict:\n    tombstone_retention: 0s\n"),
            "`apply.conflict.tombstone_retention`",
        ),
        (
            format!("{MULTI_MASTER}  conflict:\n    on_clock_skew: ignore\n"),
            "apply.conflict.on_clock_skew",
        ),
        (
            format!("{MULTI_MASTER}  conflict:\n    resolvers:\n      public.t: \"x; drop\"\n"),
            "`apply.conflict.resolvers.public.t`",
        ),
        (
            format!("{MULTI_MASTER}  conflict:\n    resolvers:\n      t: public.f\n"),
            "`apply.conflict.resolvers.t`",
        ),
        (format!("{MULTI_MASTER}  lanes: 0\n"), "`apply.lanes`"),
        (format!("{MULTI_MASTER}  lanes: 17\n"), "`apply.lanes`"),
        (
            format!("{MULTI_MASTER}  lanes: 2\n").replace("mode: multi_master", "mode: replica"),
            "`apply.lanes`",
        ),
    ];
    for (text, key) in cases {
        let err = load_from_str(&text, env(&[])).unwrap_err().to_string();
        assert!(err.contains(key), "expected {key} in: {err}");
    }
    let ok = format!(
        "{MULTI_MASTER}  conflict:\n    max_clock_skew: 250ms\n    on_clock_skew: apply\n    \
         resolvers:\n      public.counters: public.merge_counters\n"
    );
    let c = load_from_str(&ok, env(&[])).unwrap();
    assert_eq!(c.apply.as_ref().unwrap().lanes, 1, "one lane by default");
    let lanes = load_from_str(&format!("{MULTI_MASTER}  lanes: 4\n"), env(&[])).unwrap();
    assert_eq!(lanes.apply.unwrap().lanes, 4);
    let conflict = &c.apply.unwrap().conflict;
    assert_eq!(
        conflict.max_clock_skew,
        std::time::Duration::from_millis(250)
    );
    assert_eq!(
        conflict.resolvers["public.counters"],
        "public.merge_counters"
    );
}

#[test]
fn env_overrides_of_strings_are_verbatim() {
    // YAML would read these as null, a number, a boolean, a float, a list and a map.
    for raw in [
        "~", "0x1F", "null", "true", "1e3", "[a]", "{a: b}", " spaced ", "'q'",
    ] {
        let c = load_from_str(
            MINIMAL,
            env(&[
                ("PGFERRY_SOURCE__PASSWORD", raw),
                ("PGFERRY_SOURCE__PUBLICATION", raw),
                ("PGFERRY_NODE_ID", "0x1F"),
            ]),
        )
        .unwrap_or_else(|e| panic!("{raw:?}: {e}"));
        let s = c.source.as_ref().unwrap();
        assert_eq!(
            s.url.config().get_password(),
            Some(raw.as_bytes()),
            "{raw:?}"
        );
        assert_eq!(s.publication, raw, "{raw:?}");
        assert_eq!(c.node_id, "0x1F");
    }
}

#[test]
fn env_overrides_of_other_types_are_read_as_yaml() {
    let c = load_from_str(
        MINIMAL,
        env(&[
            ("PGFERRY_KAFKA__TOPIC_PARTITIONS", "6"),
            ("PGFERRY_KAFKA__CREATE_TOPICS", "false"),
            ("PGFERRY_KAFKA__PROPERTIES", "{compression.type: zstd}"),
            ("PGFERRY_METRICS__READY_MAX_SOURCE_LAG_BYTES", "1024"),
        ]),
    )
    .unwrap();
    assert_eq!(c.kafka.topic_partitions, 6);
    assert!(!c.kafka.create_topics);
    assert_eq!(c.kafka.properties["compression.type"].0, "zstd");
    assert_eq!(c.metrics.ready_max_source_lag_bytes, Some(1024));
    let err = load_from_str(MINIMAL, env(&[("PGFERRY_KAFKA__TOPIC_PARTITIONS", "six")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("kafka.topic_partitions"), "{err}");
}

proptest::proptest! {
    #[test]
    fn any_env_password_is_taken_verbatim(raw in "\\PC{0,24}") {
        let c = load_from_str(MINIMAL, env(&[("PGFERRY_SOURCE__PASSWORD", &raw)])).unwrap();
        let s = c.source.as_ref().unwrap();
        proptest::prop_assert_eq!(s.url.config().get_password(), Some(raw.as_bytes()));
    }
}

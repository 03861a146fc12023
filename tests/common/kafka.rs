//! Reads change topics with a real rdkafka consumer (explicit assignment, no group).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::Value;

/// One consumed record, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub topic: String,
    pub key: Option<Value>,
    /// `None` for a tombstone.
    pub value: Option<Value>,
}

/// The items of node-stream records in order: a record holds a bundle of JSON items, one per
/// line (a record that is one JSON value is one item).
pub fn node_items(records: &[Record]) -> Vec<Value> {
    records
        .iter()
        .filter_map(|r| r.value.as_ref())
        .flat_map(|v| match v {
            Value::String(bundle) => bundle
                .lines()
                .map(|line| serde_json::from_str(line).expect("a node-stream item is JSON"))
                .collect(),
            one => vec![one.clone()],
        })
        .collect()
}

/// A consumer over every partition of some topics, from the beginning.
pub struct TopicReader {
    consumer: BaseConsumer,
    assigned: HashSet<(String, i32)>,
    list: TopicPartitionList,
}

impl TopicReader {
    pub fn new(brokers: &str) -> TopicReader {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "pgferry-tests")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "20")
            .create()
            .expect("create consumer");
        TopicReader {
            consumer,
            assigned: HashSet::new(),
            list: TopicPartitionList::new(),
        }
    }

    /// Assigns any not-yet-assigned partitions of topics that exist now.
    fn refresh(&mut self, topics: &[String]) {
        let Ok(md) = self.consumer.fetch_metadata(None, Duration::from_secs(5)) else {
            return;
        };
        let mut grew = false;
        for t in md
            .topics()
            .iter()
            .filter(|t| topics.iter().any(|w| w == t.name()))
        {
            for p in t.partitions() {
                if self.assigned.insert((t.name().to_owned(), p.id())) {
                    self.list
                        .add_partition_offset(t.name(), p.id(), Offset::Beginning)
                        .expect("add partition");
                    grew = true;
                }
            }
        }
        if grew {
            self.consumer.assign(&self.list).expect("assign");
        }
    }

    /// Reads from `topics` until `done(records)` holds or `timeout` passes; returns all read.
    pub fn read_until(
        &mut self,
        topics: &[String],
        timeout: Duration,
        mut done: impl FnMut(&[Record]) -> bool,
    ) -> Vec<Record> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        let mut last_refresh = Instant::now() - Duration::from_secs(10);
        while !done(&out) {
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} reading {topics:?}; got {} records, last: {:?}",
                out.len(),
                out.last()
            );
            if last_refresh.elapsed() > Duration::from_millis(500) {
                self.refresh(topics);
                last_refresh = Instant::now();
            }
            if self.assigned.is_empty() {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    // Keys are JSON on table topics and the plain node id on node streams.
                    let parse = |b: Option<&[u8]>| {
                        b.map(|b| {
                            serde_json::from_slice(b).unwrap_or_else(|_| {
                                Value::String(String::from_utf8_lossy(b).into_owned())
                            })
                        })
                    };
                    let _ = self.list.set_partition_offset(
                        m.topic(),
                        m.partition(),
                        Offset::Offset(m.offset() + 1),
                    );
                    out.push(Record {
                        topic: m.topic().to_owned(),
                        key: parse(m.key()),
                        value: parse(m.payload()),
                    });
                }
                Some(Err(e)) => panic!("consume error: {e}"),
                None => {}
            }
        }
        out
    }
}

/// Records in a topic: the sum of its partitions' high watermarks (the broker's count,
/// without reading them).
pub fn topic_records(brokers: &str, topic: &str) -> i64 {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("create consumer");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("topic metadata");
    md.topics()
        .iter()
        .flat_map(|t| t.partitions())
        .map(|p| {
            let (low, high) = consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .expect("watermarks");
            high - low
        })
        .sum()
}

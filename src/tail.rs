//! `pgferry tail`: print the change topics as they fill, for demos and debugging.
//!
//! Partitions are assigned explicitly (no consumer group), so it starts immediately and
//! commits nothing; newly created topics are picked up every few seconds.

use std::collections::HashSet;
use std::io::Write;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::config::KafkaConfig;
use crate::kafka::client_config;

/// What to print.
#[derive(Debug, Clone)]
pub struct TailOptions {
    /// Only topics containing this text.
    pub filter: Option<String>,
    /// Stop after this many messages.
    pub max_messages: Option<u64>,
    /// Stop after this long without a message.
    pub idle_exit: Option<Duration>,
}

/// Prints `topic <TAB> key <TAB> value` lines until stopped by the options or Ctrl-C.
pub fn run(kafka: &KafkaConfig, options: &TailOptions) -> Result<(), KafkaError> {
    let consumer: BaseConsumer = crate::kafka::create(
        client_config(kafka)
            .set("group.id", "pgferry-tail")
            .set("enable.auto.commit", "false"),
    )?;
    let prefix = format!("{}.", kafka.topic_prefix);
    let mut assigned: HashSet<(String, i32)> = HashSet::new();
    let mut list = TopicPartitionList::new();
    let mut last_refresh: Option<Instant> = None;
    let mut last_message = Instant::now();
    let mut printed = 0u64;
    let stdout = std::io::stdout();
    loop {
        if last_refresh.is_none_or(|t| t.elapsed() > Duration::from_secs(2)) {
            let metadata = consumer.fetch_metadata(None, Duration::from_secs(10))?;
            let mut grew = false;
            for topic in metadata.topics() {
                let name = topic.name();
                let wanted = name.starts_with(&prefix)
                    && options.filter.as_deref().is_none_or(|f| name.contains(f));
                for p in topic.partitions() {
                    if wanted && assigned.insert((name.to_owned(), p.id())) {
                        list.add_partition_offset(name, p.id(), Offset::Beginning)?;
                        grew = true;
                    }
                }
            }
            if grew {
                consumer.assign(&list)?;
            }
            last_refresh = Some(Instant::now());
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let key = m.key().map(String::from_utf8_lossy).unwrap_or_default();
                let value = m
                    .payload()
                    .map(String::from_utf8_lossy)
                    .unwrap_or("null".into());
                if writeln!(stdout.lock(), "{}\t{key}\t{value}", m.topic()).is_err() {
                    // The reader went away (`| head`): nothing more to show.
                    return Ok(());
                }
                // Keep the assignment's resume points current so a re-assign does not rewind.
                let _ = list.set_partition_offset(
                    m.topic(),
                    m.partition(),
                    Offset::Offset(m.offset() + 1),
                );
                printed += 1;
                last_message = Instant::now();
                if options.max_messages.is_some_and(|max| printed >= max) {
                    return Ok(());
                }
            }
            Some(Err(e)) => return Err(e),
            None => {
                if options
                    .idle_exit
                    .is_some_and(|d| last_message.elapsed() >= d)
                {
                    return Ok(());
                }
            }
        }
    }
}

//! Is a target's stored position still in its node stream as the target left it?
//!
//! The record just before the stored offset must be the `commit` marker of the last source
//! transaction the target applied (same commit LSN), and the offset must not be older than the
//! oldest record the topic keeps. Otherwise records were lost between the two: retention
//! deleted them, or the topic was deleted and recreated (and possibly refilled, so that the
//! offset exists but means something else). The check reads that record instead of trusting
//! the high watermark alone: some Kafka-protocol brokers report a high watermark that lags the
//! last batch. Used by apply workers at start and by `pgferry check`. Blocking (librdkafka).

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::stream::{parse_framed, StreamItem};
use crate::config::KafkaConfig;
use crate::kafka::{client_config, dispose};
use crate::lsn::Lsn;
use crate::sink::kafka::node_stream::items_of;

/// How long to wait for the broker.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(10);

/// What the node stream holds around a stored position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Oldest offset the topic keeps.
    pub low: i64,
    /// Why the position is not where the target left it, if it is not.
    pub gap: Option<String>,
}

/// Runs `f` with a consumer of its own, which is let go without waiting (see [`dispose`]). A
/// group id (`group`) is needed to assign partitions; nothing joins the group or commits to
/// it, and an offset no longer in the topic is an error, never a jump.
fn with_consumer<T>(
    kafka: &KafkaConfig,
    group: &str,
    f: impl FnOnce(&BaseConsumer) -> Result<T, KafkaError>,
) -> Result<T, KafkaError> {
    let consumer: BaseConsumer = crate::kafka::create(
        client_config(kafka)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "error"),
    )?;
    let result = f(&consumer);
    dispose(consumer);
    result
}

/// The low and high watermarks of `topic`'s only partition.
pub fn watermarks(kafka: &KafkaConfig, topic: &str) -> Result<(i64, i64), KafkaError> {
    with_consumer(kafka, "pgferry-watermarks", |c| {
        c.fetch_watermarks(topic, 0, TIMEOUT)
    })
}

/// Where a worker that copied a source's data at a snapshot taken *after* this call starts
/// reading `topic` (`pgferry join`, `pgferry seed`): right after the last commit record now
/// in the stream, `(its offset + 1, its commit LSN)`; `(0, 0/0)` for a stream with none, or
/// none yet (a capture that has not published). Everything published later commits later.
pub fn stream_start(kafka: &KafkaConfig, topic: &str) -> Result<(i64, Lsn), KafkaError> {
    let high = match watermarks(kafka, topic) {
        Ok((_, high)) => high,
        Err(KafkaError::MetadataFetch(
            RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownPartition,
        )) => return Ok((0, Lsn::ZERO)),
        Err(e) => return Err(e),
    };
    Ok(last_commit_before(kafka, topic, high)?.map_or((0, Lsn::ZERO), |(o, lsn)| (o + 1, lsn)))
}

/// The last commit record of `topic` before offset `end`: its offset and commit LSN. Reads
/// back from `end` in windows until one is found; `None` when the partition holds none there.
pub fn last_commit_before(
    kafka: &KafkaConfig,
    topic: &str,
    end: i64,
) -> Result<Option<(i64, Lsn)>, KafkaError> {
    with_consumer(kafka, "pgferry-last-commit", |c| {
        last_commit_with(c, topic, end)
    })
}

fn last_commit_with(
    consumer: &BaseConsumer,
    topic: &str,
    end: i64,
) -> Result<Option<(i64, Lsn)>, KafkaError> {
    let (low, _) = consumer.fetch_watermarks(topic, 0, TIMEOUT)?;
    let mut window = 1024;
    let mut to = end;
    while to > low {
        let from = (to - window).max(low);
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(topic, 0, Offset::Offset(from))?;
        consumer.assign(&list)?;
        let mut found = None;
        let deadline = std::time::Instant::now() + TIMEOUT;
        let mut next = from;
        while next < to {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    next = m.offset() + 1;
                    if m.offset() < to {
                        if let Ok((_, StreamItem::Commit(c))) = parse_framed(last_item(&m)) {
                            found = Some((m.offset(), c.commit_lsn));
                        }
                    }
                }
                Some(Err(e)) => return Err(e),
                None if std::time::Instant::now() < deadline => {}
                None => {
                    return Err(KafkaError::MessageConsumption(
                        RDKafkaErrorCode::RequestTimedOut,
                    ))
                }
            }
        }
        if found.is_some() {
            return Ok(found);
        }
        to = from;
        window *= 4;
    }
    Ok(None)
}

/// Checks `next` (the next offset to apply) and `applied` (the commit LSN of the last applied
/// transaction) against `topic`'s only partition.
pub fn check(
    kafka: &KafkaConfig,
    topic: &str,
    next: i64,
    applied: Lsn,
) -> Result<Verdict, KafkaError> {
    with_consumer(kafka, "pgferry-position-check", |c| {
        check_with(c, topic, next, applied)
    })
}

fn check_with(
    consumer: &BaseConsumer,
    topic: &str,
    next: i64,
    applied: Lsn,
) -> Result<Verdict, KafkaError> {
    let (low, high) = consumer.fetch_watermarks(topic, 0, TIMEOUT)?;
    tracing::debug!(topic, low, high, next, %applied, "checking the stored position");
    let verdict = |gap: Option<String>| Ok(Verdict { low, gap });
    if next < low {
        return verdict(Some(format!(
            "records {next}..{low} were deleted (retention) before this target applied them"
        )));
    }
    if next == 0 {
        return verdict(None);
    }
    let last = next - 1;
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, 0, Offset::Offset(last))?;
    consumer.assign(&list)?;
    let recreated = || {
        format!(
            "offset {last} is not in the topic any more (it ends at about {high}), yet this target \
             applied up to it: the topic was deleted and recreated (or truncated)"
        )
    };
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let commit = match parse_framed(last_item(&m)) {
                    Ok((_, StreamItem::Commit(commit))) => Some(commit.commit_lsn),
                    _ => None,
                };
                if m.offset() == last && commit == Some(applied) {
                    return verdict(None);
                }
                return verdict(Some(format!(
                    "offset {last} is not the commit of the last transaction this target applied \
                     (commit LSN {applied}): the topic was deleted and recreated"
                )));
            }
            Some(Err(KafkaError::MessageConsumption(
                RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange,
            ))) => return verdict(Some(recreated())),
            Some(Err(e)) => return Err(e),
            None if std::time::Instant::now() < deadline => {}
            None if last >= high => return verdict(Some(recreated())),
            None => {
                return Err(KafkaError::MessageConsumption(
                    RDKafkaErrorCode::RequestTimedOut,
                ))
            }
        }
    }
}

/// The last item of a node-stream record: a commit ends its record (see
/// [`crate::sink::kafka::node_stream`]).
fn last_item<'m>(message: &'m BorrowedMessage<'_>) -> Option<&'m [u8]> {
    message.payload().and_then(|p| items_of(p).last())
}

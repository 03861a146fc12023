//! The Kafka producer: idempotent, `acks=all`, per-key ordering, explicit backpressure, and
//! delivery callbacks that move the [`Progress`] watermark.
//!
//! librdkafka calls [`DeliveryTracker::delivery`] on its own polling thread; it is the only
//! place a message counts as durable. A failed delivery is recorded and surfaces on the next
//! call into the sink, which ends the pipeline run; the watermark never moves past the failed
//! message, so the restart re-reads it from the slot.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

use super::encode::Record;
use crate::config::KafkaConfig;
use crate::error::{classify_kafka, Classify, ErrorClass};
use crate::kafka::{client_config, new_topic, set_default};
use crate::pipeline::progress::{Progress, Ticket};
use crate::telemetry::Metrics;

/// Whether a record was accepted into librdkafka's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    /// Accepted; its acknowledgement will arrive through the delivery callback.
    Yes,
    /// The local queue is full; offer it again shortly.
    No,
}

/// Failures of the Kafka sink.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Building the client failed (bad property, …).
    #[error("cannot create Kafka client")]
    Client(#[source] KafkaError),
    /// Creating a topic failed.
    #[error("cannot create topic {topic}: {code}")]
    CreateTopic {
        /// The topic.
        topic: String,
        /// Broker error code.
        code: RDKafkaErrorCode,
    },
    /// The admin request itself failed.
    #[error("topic administration failed")]
    Admin(#[source] KafkaError),
    /// Handing a message to librdkafka failed.
    #[error("cannot produce to {topic}")]
    Produce {
        /// The topic.
        topic: String,
        /// Why.
        #[source]
        source: KafkaError,
    },
    /// The broker did not acknowledge a message within `kafka.delivery_timeout`.
    #[error("Kafka delivery failed")]
    Delivery(#[source] KafkaError),
    /// Draining did not finish in time.
    #[error("{0} Kafka messages still unacknowledged after {1:?}")]
    DrainTimeout(u64, Duration),
}

impl Classify for SinkError {
    fn class(&self) -> ErrorClass {
        match self {
            SinkError::Client(_) => ErrorClass::Fatal,
            SinkError::CreateTopic { code, .. } => classify_kafka(&KafkaError::AdminOp(*code)),
            SinkError::Admin(e) | SinkError::Delivery(e) => classify_kafka(e),
            SinkError::Produce { source, .. } => classify_kafka(source),
            SinkError::DrainTimeout(..) => ErrorClass::Transient,
        }
    }
}

/// Carried with each message through librdkafka.
pub struct Delivery {
    ticket: Ticket,
    /// When the message was handed to the producer.
    sent: std::time::Instant,
    /// Incremented when Kafka acknowledges (the per-table, per-op published counter).
    published: Option<IntCounter>,
}

/// librdkafka context: routes acknowledgements into the watermark and metrics.
pub struct DeliveryTracker {
    progress: Arc<Mutex<Progress>>,
    failure: Arc<Mutex<Option<KafkaError>>>,
    metrics: Arc<Metrics>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding this lock would already have aborted the pipeline; the data is
    // plain counters, so continuing with it is sound.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ClientContext for DeliveryTracker {}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = Box<Delivery>;

    fn delivery(&self, result: &DeliveryResult<'_>, delivery: Box<Delivery>) {
        match result {
            Ok(_) => {
                lock(&self.progress).acknowledged(delivery.ticket);
                self.metrics.kafka_messages_delivered.inc();
                self.metrics.kafka_in_flight.dec();
                self.metrics
                    .kafka_delivery_latency
                    .observe(delivery.sent.elapsed().as_secs_f64());
                if let Some(c) = delivery.published {
                    c.inc();
                }
            }
            Err((error, _)) => {
                self.metrics.kafka_delivery_errors.inc();
                // The first failure is the cause; the rest (every message still queued is
                // purged when the producer goes) are only counted.
                let mut failure = lock(&self.failure);
                if failure.is_none() {
                    tracing::error!(%error, "Kafka delivery failed; capture will restart from the last confirmed position");
                    *failure = Some(error.clone());
                }
            }
        }
    }
}

/// Produces records and tracks their acknowledgement.
pub struct KafkaSink {
    producer: Arc<ThreadedProducer<DeliveryTracker>>,
    admin: Option<AdminClient<DefaultClientContext>>,
    config: KafkaConfig,
    known_topics: HashSet<String>,
    progress: Arc<Mutex<Progress>>,
    failure: Arc<Mutex<Option<KafkaError>>>,
    metrics: Arc<Metrics>,
}

/// The producer's default `linger.ms` (see [`KafkaSink::new`]); `kafka.properties` overrides it.
pub const LINGER_MS: &str = "50";

/// The producer's default queue bound in KiB (`queue.buffering.max.kbytes`, see
/// [`KafkaSink::new`]); `kafka.properties` overrides it.
const QUEUE_KBYTES: u64 = 16 * 1024;

/// The producer's default `compression.type` (see [`KafkaSink::new`]); `kafka.properties`
/// overrides it (`none` turns it off).
pub const COMPRESSION: &str = "lz4";

impl KafkaSink {
    /// Builds the producer. `progress` is shared with the capture loop.
    pub fn new(
        config: &KafkaConfig,
        progress: Arc<Mutex<Progress>>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, SinkError> {
        let failure = Arc::new(Mutex::new(None));
        let tracker = DeliveryTracker {
            progress: progress.clone(),
            failure: failure.clone(),
            metrics: metrics.clone(),
        };
        let mut producer_config = client_config(config);
        producer_config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set(
                "message.timeout.ms",
                config.delivery_timeout.as_millis().to_string(),
            );
        // An idempotent librdkafka producer keeps one produce request in flight per partition;
        // once the next batch is due (linger.ms after its first message) while that request
        // is still unanswered, its broker thread polls without waiting until the answer
        // comes. With 5 ms and a broker that answers in tens of milliseconds (tansu; a remote
        // broker with acks=all), that spin took ~100,000 poll calls and a tenth of pgferry's
        // CPU in a 20k-transaction catch-up; with 50 ms, under 200 calls, and the catch-up's
        // maximum rate rose by about a third, for ~8 ms more latency at a tenth of it.
        set_default(&mut producer_config, config, "linger.ms", LINGER_MS);
        // Envelopes repeat their field names and `source` block in every record, so batches
        // compress several times over. lz4 costs the producer little; without it the broker
        // did three times the CPU in the snapshot benchmark (3.2 against 0.95 s per 1M rows,
        // tansu), and every record crosses the network and sits on disk uncompressed.
        set_default(
            &mut producer_config,
            config,
            "compression.type",
            COMPRESSION,
        );
        // librdkafka queues up to 1 GB (and 100,000 records) not yet acknowledged, and a
        // capture that outruns the broker (a snapshot) fills what it may: with 4 snapshot
        // readers on a 10M-row table, capture's peak RSS was 232–261 MB with a 32 MB bound,
        // 197 MB with 16 MB, 179 MB with 8 MB, at about the same rate. At least two of the
        // largest records, so that one always fits.
        let queue_kbytes = QUEUE_KBYTES.max(2 * u64::from(config.max_message_bytes) / 1024 + 1);
        set_default(
            &mut producer_config,
            config,
            "queue.buffering.max.kbytes",
            &queue_kbytes.to_string(),
        );
        metrics.kafka_in_flight.set(0);
        let producer: Arc<ThreadedProducer<DeliveryTracker>> = Arc::new(
            crate::kafka::create_with_context(&producer_config, tracker)
                .map_err(SinkError::Client)?,
        );
        let asking = producer.clone();
        crate::kafka::request_producer_id(move |t| asking.client().fetch_metadata(None, t));
        let admin = if config.create_topics {
            Some(crate::kafka::create(&client_config(config)).map_err(SinkError::Client)?)
        } else {
            None
        };
        Ok(KafkaSink {
            producer,
            admin,
            config: config.clone(),
            known_topics: HashSet::new(),
            progress,
            failure,
            metrics,
        })
    }

    /// Returns the first delivery failure, if any happened.
    pub fn check_failed(&self) -> Result<(), SinkError> {
        match lock(&self.failure).clone() {
            Some(e) => Err(SinkError::Delivery(e)),
            None => Ok(()),
        }
    }

    async fn ensure_topic(&mut self, topic: &str, single_partition: bool) -> Result<(), SinkError> {
        if self.known_topics.contains(topic) {
            return Ok(());
        }
        if let Some(admin) = &self.admin {
            let started = std::time::Instant::now();
            let partitions = if single_partition {
                1
            } else {
                self.config.topic_partitions
            };
            let max_bytes = self.config.max_message_bytes.to_string();
            let new = new_topic(&self.config, topic, partitions, &max_bytes);
            let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
            let results = admin
                .create_topics([&new], &opts)
                .await
                .map_err(SinkError::Admin)?;
            for r in results {
                match r {
                    Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((topic, code)) => return Err(SinkError::CreateTopic { topic, code }),
                }
            }
            tracing::debug!(topic, elapsed = ?started.elapsed(), "topic ensured");
        }
        self.known_topics.insert(topic.to_owned());
        Ok(())
    }

    /// Hands one record to librdkafka, counted against `ticket`. Returns
    /// [`Queued::No`] when librdkafka's local queue is full: the caller waits (keeping the
    /// source connection alive) and offers the same record again. Nothing is ever dropped.
    pub async fn try_send(
        &mut self,
        ticket: Ticket,
        record: &Record,
        published: Option<IntCounter>,
    ) -> Result<Queued, SinkError> {
        self.check_failed()?;
        self.ensure_topic(&record.topic, record.single_partition)
            .await?;
        // Count before producing: the delivery callback may run before `send` returns.
        lock(&self.progress).sent(ticket);
        let mut base = BaseRecord::with_opaque_to(
            &record.topic,
            Box::new(Delivery {
                ticket,
                sent: std::time::Instant::now(),
                published,
            }),
        );
        if let Some(key) = &record.key {
            base = base.key(key.as_slice());
        }
        if let Some(value) = &record.value {
            base = base.payload(value.as_slice());
        }
        match self.producer.send(base) {
            Ok(()) => {
                self.metrics.kafka_in_flight.inc();
                Ok(Queued::Yes)
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                lock(&self.progress).unsent(ticket);
                Ok(Queued::No)
            }
            Err((source, _)) => Err(SinkError::Produce {
                topic: record.topic.clone(),
                source,
            }),
        }
    }

    /// Waits until every message handed over so far is acknowledged, or `timeout` passes.
    pub async fn drain(&self, timeout: Duration) -> Result<(), SinkError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_failed()?;
            let in_flight = lock(&self.progress).in_flight();
            if in_flight == 0 && self.producer.in_flight_count() == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(SinkError::DrainTimeout(in_flight, timeout));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

//! Kafka clients, for every stage: the librdkafka settings every producer, consumer and admin
//! client shares (brokers, size limits, security), topic creation, and client errors with
//! secrets taken out.
//!
//! Owns how pgferry reaches the broker. It does not own what is produced (`sink::kafka`) or
//! consumed (`apply`, `check`, `tail`).
//!
//! Security is librdkafka's own: `security.protocol` PLAINTEXT, SSL, SASL_PLAINTEXT or
//! SASL_SSL, with `sasl.mechanism` PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER, all
//! passed through `kafka.properties`. librdkafka is built with OpenSSL (statically) and zstd;
//! not with Cyrus SASL, so GSSAPI (Kerberos) is not available.

use std::sync::Mutex;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::{ClientConfig, FromClientConfig, FromClientConfigAndContext};
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::ClientContext;

use crate::config::{is_secret_property, redact, KafkaConfig};

/// librdkafka settings shared by the producer, consumers, the admin client and `check`:
/// brokers, `message.max.bytes` (librdkafka raises a consumer's fetch limits to it, so a
/// record that could be written can always be read), and `kafka.properties`.
///
/// Over SSL and SASL_SSL, `ssl.ca.location` defaults to `probe` (librdkafka looks in the
/// usual system trust-store paths): the statically linked OpenSSL knows no distribution's
/// default path.
pub fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers);
    c.set("message.max.bytes", config.max_message_bytes.to_string());
    for (k, v) in &config.properties {
        c.set(k, &v.0);
    }
    let tls = config
        .properties
        .get("security.protocol")
        .is_some_and(|p| p.0.to_ascii_uppercase().ends_with("SSL"));
    if tls {
        set_default(&mut c, config, "ssl.ca.location", "probe");
    }
    c
}

/// Sets a librdkafka property to pgferry's default unless `kafka.properties` gives it.
pub fn set_default(c: &mut ClientConfig, config: &KafkaConfig, key: &str, value: &str) {
    if !config.properties.contains_key(key) {
        c.set(key, value);
    }
}

/// Creates a client; on failure the error carries no secret (librdkafka's configuration
/// errors quote the offending property's value).
pub fn create<T: FromClientConfig>(c: &ClientConfig) -> Result<T, KafkaError> {
    c.create().map_err(without_secrets)
}

/// [`create`] with a client context.
pub fn create_with_context<C, T>(c: &ClientConfig, context: C) -> Result<T, KafkaError>
where
    C: ClientContext,
    T: FromClientConfigAndContext<C>,
{
    c.create_with_context(context).map_err(without_secrets)
}

/// The error with every secret value taken out: a secret property's value is replaced, and
/// every registered secret ([`crate::config::redact`]) is removed from the texts.
pub fn without_secrets(error: KafkaError) -> KafkaError {
    match error {
        KafkaError::ClientConfig(result, description, key, value) => {
            let value = if is_secret_property(&key) {
                "***".to_owned()
            } else {
                redact(&value).into_owned()
            };
            KafkaError::ClientConfig(result, redact(&description).into_owned(), key, value)
        }
        KafkaError::ClientCreation(text) => KafkaError::ClientCreation(redact(&text).into_owned()),
        other => other,
    }
}

/// Lets go of a short-lived librdkafka client without waiting for it: destroying one takes
/// about 100 ms (its threads wind down), which would otherwise be waited out once per client
/// on a worker's start (topic creation, then the position check: 200 ms before the first
/// record). The client is dropped on a thread of its own (inline if none can be started).
pub fn dispose<T: Send + 'static>(client: T) {
    let _ = std::thread::Builder::new()
        .name("kafka-dispose".into())
        .spawn(move || drop(client));
}

/// A topic as pgferry creates it: `max.message.bytes` from `kafka.max_message_bytes`.
pub fn new_topic<'a>(
    config: &KafkaConfig,
    topic: &'a str,
    partitions: i32,
    max_bytes: &'a str,
) -> NewTopic<'a> {
    NewTopic::new(
        topic,
        partitions,
        TopicReplication::Fixed(config.topic_replication_factor),
    )
    .set("max.message.bytes", max_bytes)
}

/// Creates the topics that do not exist yet, in one request (for topics the apply side reads
/// or writes).
pub async fn create_topics(
    config: &KafkaConfig,
    topics: &[&str],
    partitions: i32,
) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = create(&client_config(config))?;
    let max_bytes = config.max_message_bytes.to_string();
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| new_topic(config, t, partitions, &max_bytes))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin.create_topics(&new, &opts).await;
    dispose(admin);
    for r in results? {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(KafkaError::AdminOp(code)),
        }
    }
    Ok(())
}

/// A client context that keeps librdkafka's last error reason ("SASL authentication error:
/// …", "SSL handshake failed: … certificate verify failed"), which the error code alone
/// (`BrokerTransportFailure`) does not tell. Served when the client is polled.
#[derive(Default)]
pub struct LastError(Mutex<Option<String>>);

impl LastError {
    /// The last reason, with secrets taken out.
    pub fn reason(&self) -> Option<String> {
        let reason = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        reason.map(|r| redact(&r).into_owned())
    }
}

impl ClientContext for LastError {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(%error, reason = %redact(reason), "librdkafka error");
        // "All brokers are down" follows the real cause; keep the cause.
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::AllBrokersDown) {
            *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.to_owned());
        }
    }
}

impl ConsumerContext for LastError {}

/// Has an idempotent producer ask for its producer id now rather than after its retry timer.
///
/// librdkafka asks when a metadata response arrives or its 500 ms timer fires. The first
/// response comes over the bootstrap connection, which librdkafka drops as soon as it learns
/// the brokers' advertised addresses, so that ask finds no broker up; the timer then only
/// starts a connection, and the id came with the next tick. Up to a second passed before the
/// first record could be sent: capture filled librdkafka's queue meanwhile (in the catch-up
/// benchmark 100,000 records, ~90 MB of RSS and most of the run), and apply's first dead
/// letter waited. Two metadata requests (`fetch_metadata`, given a timeout), one after the
/// other, end on an advertised broker's connection, whose answer lets the producer ask. They
/// run on a thread of their own; a broker that does not answer is reported by the producer
/// itself.
pub fn request_producer_id<F>(fetch_metadata: F)
where
    F: Fn(Duration) -> rdkafka::error::KafkaResult<rdkafka::metadata::Metadata> + Send + 'static,
{
    let _ = std::thread::Builder::new()
        .name("kafka-producer-id".into())
        .spawn(move || {
            for _ in 0..2 {
                if let Err(error) = fetch_metadata(Duration::from_secs(5)) {
                    tracing::debug!(%error, "metadata request at producer start");
                }
            }
        });
}

//! What the apply worker's rewind relies on: after re-assigning a partition at an earlier
//! offset, a StreamConsumer delivers that offset next, never a message prefetched from the
//! old position. Real rdkafka against the real broker.

mod common;

use std::time::Duration;

use common::broker::Broker;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

#[tokio::test(flavor = "multi_thread")]
async fn reassigning_an_earlier_offset_drops_prefetched_messages() {
    let broker = Broker::start();
    let topic = "rewind_test";
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.address())
        .create()
        .unwrap();
    for i in 0..3000 {
        let payload = format!("m{i}");
        producer
            .send(
                FutureRecord::<(), str>::to(topic)
                    .partition(0)
                    .payload(&payload),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.address())
        .set("group.id", "rewind-test")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "50")
        .create()
        .unwrap();
    let assign = |offset: i64| {
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(topic, 0, Offset::Offset(offset))
            .unwrap();
        consumer.assign(&list).unwrap();
    };
    for round in 0..8 {
        assign(100);
        // Read a little, let the fetcher prefetch far ahead, then rewind.
        let mut last = 0;
        for _ in 0..(50 + round * 40) {
            let m = consumer.recv().await.unwrap();
            last = m.offset();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assign(100);
        let next = consumer.recv().await.unwrap().offset();
        assert_eq!(
            next, 100,
            "round {round}: after rewinding from {last}, got offset {next}"
        );
    }
}

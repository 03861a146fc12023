//! Destinations for captured changes. Kafka is the only one.

pub mod kafka;

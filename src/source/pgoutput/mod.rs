//! The pgoutput logical decoding protocol, versions 1–4: message types and a pure decoder.
//!
//! Owns the byte format only. It knows nothing about sockets (see
//! [`crate::source::replication`]) or about what a change means for Kafka (see
//! [`crate::source::assemble`]).

mod decode;
mod message;
#[cfg(test)]
mod tests;

pub use decode::{decode, DecodeError, StreamDecoder};
pub use message::*;

/// The highest pgoutput protocol version this decoder understands.
pub const MAX_PROTOCOL_VERSION: u32 = 4;

//! Fuzzes the whole pure capture path: arbitrary bytes are cut into a sequence of pgoutput
//! messages, decoded, assembled into changes, and rendered as Kafka records. Nothing may panic;
//! malformed input must come back as an error.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use pgferry::lsn::Lsn;
use pgferry::sink::kafka::encode::{encode_change, EnvelopeSource, TxnStamp};
use pgferry::source::assemble::{Assembler, CaptureEvent};
use pgferry::source::pgoutput::StreamDecoder;
use pgferry::value::{PgType, TypeRegistry};

fuzz_target!(|data: &[u8]| {
    let mut types = TypeRegistry::default();
    // Give user-type OIDs a mix of renderings so the value paths are reached too.
    types.register(16384, PgType::Enum);
    types.register(16385, PgType::Array(Box::new(PgType::Json)));
    let source = EnvelopeSource {
        node: "fuzz".into(),
        database: "db".into(),
        topic_prefix: "p".into(),
        tombstones: true,
        run: 1,
    };
    let mut decoder = StreamDecoder::default();
    let mut assembler = Assembler::default();
    let mut events = Vec::new();
    let mut txn = None;
    // Framing: [u16 length][message bytes] repeated.
    let mut rest = data;
    let mut lsn = 0u64;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let msg = Bytes::copy_from_slice(&rest[2..2 + len]);
        rest = &rest[2 + len..];
        lsn += 1;
        let Ok(message) = decoder.decode(msg) else { continue };
        events.clear();
        if assembler.push(message, Lsn(lsn), &mut events).is_err() {
            continue;
        }
        for event in events.drain(..) {
            match event {
                CaptureEvent::Begin(meta) => txn = Some(TxnStamp::new(&meta)),
                CaptureEvent::Change(change) => {
                    if let Some(meta) = &txn {
                        let _ = encode_change(&source, meta, &change, &types, 0);
                    }
                }
                _ => {}
            }
        }
    }
});

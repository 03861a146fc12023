//! The delivery watermark: which source position may be confirmed upstream.
//!
//! Every transaction (and every heartbeat position) gets a ticket in source order. The sink
//! counts messages against the ticket and reports each Kafka acknowledgement. The watermark is
//! the end LSN of the longest prefix of tickets that are sealed (their commit was seen) and fully
//! acknowledged. That is the only LSN ever sent as `flush` in a standby status update, so the
//! slot's `confirmed_flush_lsn` can never pass a change that Kafka has not acknowledged.
//!
//! Pure and synchronous; the sink wraps it in a mutex shared with librdkafka's delivery
//! callback thread.

use std::collections::VecDeque;

use crate::lsn::Lsn;

/// Identifies one transaction's worth of messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ticket(u64);

#[derive(Debug)]
struct Entry {
    /// `None` until the commit (or the position) is known.
    end_lsn: Option<Lsn>,
    /// Messages sent but not yet acknowledged.
    outstanding: u64,
}

/// Tracks outstanding deliveries per transaction, in source order.
#[derive(Debug, Default)]
pub struct Progress {
    entries: VecDeque<Entry>,
    /// Ticket number of `entries[0]`.
    head: u64,
    watermark: Lsn,
}

impl Progress {
    /// Starts tracking from a position that is already durable (the slot's confirmed LSN).
    pub fn starting_at(confirmed: Lsn) -> Self {
        Progress {
            watermark: confirmed,
            ..Default::default()
        }
    }

    /// Opens a ticket for a new transaction.
    pub fn open(&mut self) -> Ticket {
        self.entries.push_back(Entry {
            end_lsn: None,
            outstanding: 0,
        });
        Ticket(self.head + self.entries.len() as u64 - 1)
    }

    fn entry(&mut self, t: Ticket) -> Option<&mut Entry> {
        let idx = t.0.checked_sub(self.head)?;
        self.entries.get_mut(usize::try_from(idx).ok()?)
    }

    /// One more message of this transaction is in flight.
    pub fn sent(&mut self, t: Ticket) {
        if let Some(e) = self.entry(t) {
            e.outstanding += 1;
        }
    }

    /// Takes back a [`Progress::sent`] whose message the producer refused (queue full).
    pub fn unsent(&mut self, t: Ticket) {
        if let Some(e) = self.entry(t) {
            e.outstanding = e.outstanding.saturating_sub(1);
        }
    }

    /// Kafka acknowledged one message of this transaction.
    pub fn acknowledged(&mut self, t: Ticket) {
        if let Some(e) = self.entry(t) {
            e.outstanding = e.outstanding.saturating_sub(1);
        }
        self.advance();
    }

    /// The transaction's commit was seen: once its messages are acknowledged, `end_lsn` may
    /// be confirmed.
    pub fn seal(&mut self, t: Ticket, end_lsn: Lsn) {
        if let Some(e) = self.entry(t) {
            e.end_lsn = Some(end_lsn);
        }
        self.advance();
    }

    /// A position with nothing to deliver (heartbeat, keepalive while idle): confirmable as
    /// soon as everything before it is.
    pub fn position(&mut self, lsn: Lsn) {
        let t = self.open();
        self.seal(t, lsn);
    }

    fn advance(&mut self) {
        while let Some(front) = self.entries.front() {
            match front.end_lsn {
                Some(lsn) if front.outstanding == 0 => {
                    self.watermark = self.watermark.max(lsn);
                    self.entries.pop_front();
                    self.head += 1;
                }
                _ => break,
            }
        }
    }

    /// The highest LSN whose changes, and all earlier ones, Kafka has acknowledged.
    pub fn watermark(&self) -> Lsn {
        self.watermark
    }

    /// True when nothing is waiting for Kafka.
    pub fn is_idle(&self) -> bool {
        self.entries.is_empty()
    }

    /// Messages sent and not yet acknowledged, over all transactions.
    pub fn in_flight(&self) -> u64 {
        self.entries.iter().map(|e| e.outstanding).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn waits_for_every_message_of_a_transaction() {
        let mut p = Progress::starting_at(Lsn(10));
        let t = p.open();
        p.sent(t);
        p.sent(t);
        p.seal(t, Lsn(20));
        p.acknowledged(t);
        assert_eq!(p.watermark(), Lsn(10));
        p.acknowledged(t);
        assert_eq!(p.watermark(), Lsn(20));
        assert!(p.is_idle());
    }

    #[test]
    fn later_transactions_wait_for_earlier_ones() {
        let mut p = Progress::starting_at(Lsn(0));
        let a = p.open();
        p.sent(a);
        p.seal(a, Lsn(5));
        let b = p.open();
        p.sent(b);
        p.seal(b, Lsn(9));
        p.position(Lsn(12));
        p.acknowledged(b);
        assert_eq!(p.watermark(), Lsn(0));
        p.acknowledged(a);
        assert_eq!(p.watermark(), Lsn(12));
    }

    #[test]
    fn unsealed_transaction_holds_the_watermark() {
        let mut p = Progress::starting_at(Lsn(1));
        let a = p.open();
        p.sent(a);
        p.acknowledged(a);
        assert_eq!(p.watermark(), Lsn(1));
        p.seal(a, Lsn(3));
        assert_eq!(p.watermark(), Lsn(3));
    }

    proptest! {
        /// Whatever order acknowledgements arrive in, the watermark never passes a
        /// transaction with an unacknowledged message, and reaches the end once all are in.
        #[test]
        fn watermark_never_passes_unacknowledged(
            sizes in proptest::collection::vec(0u64..4, 1..12),
            seed: u64,
        ) {
            let mut p = Progress::starting_at(Lsn(0));
            let mut pending = Vec::new();
            for (i, n) in sizes.iter().enumerate() {
                let t = p.open();
                for _ in 0..*n { p.sent(t); pending.push((t, i)); }
                p.seal(t, Lsn(i as u64 + 1));
            }
            let mut rng = seed;
            while !pending.is_empty() {
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let (t, _) = pending.swap_remove((rng >> 33) as usize % pending.len());
                p.acknowledged(t);
                let oldest_unacked = pending.iter().map(|(_, i)| *i).min();
                if let Some(i) = oldest_unacked {
                    prop_assert!(p.watermark() < Lsn(i as u64 + 1));
                }
            }
            prop_assert_eq!(p.watermark(), Lsn(sizes.len() as u64));
        }
    }
}

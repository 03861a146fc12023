//! PostgreSQL wire timestamps: microseconds since 2000-01-01 00:00:00 UTC.
//!
//! Owns conversion to Unix time and to RFC 3339 with microsecond precision, which is what the
//! Kafka envelope carries. Parsing the *text* output of `timestamptz` columns lives in
//! [`crate::value`], because that is a column-value concern.

use chrono::{DateTime, SecondsFormat, Utc};

/// Microseconds between the Unix epoch and the PostgreSQL epoch (2000-01-01).
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// A timestamp as PostgreSQL sends it in replication messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PgTimestamp(pub i64);

impl PgTimestamp {
    /// Builds one from microseconds since the Unix epoch.
    pub fn from_unix_micros(micros: i64) -> Self {
        PgTimestamp(micros.saturating_sub(PG_EPOCH_UNIX_MICROS))
    }

    /// The current wall-clock time.
    pub fn now() -> Self {
        Self::from_unix_micros(Utc::now().timestamp_micros())
    }

    /// Microseconds since the Unix epoch.
    pub fn unix_micros(self) -> i64 {
        self.0.saturating_add(PG_EPOCH_UNIX_MICROS)
    }

    /// Milliseconds since the Unix epoch.
    pub fn unix_millis(self) -> i64 {
        self.unix_micros().div_euclid(1000)
    }

    /// RFC 3339 in UTC with exactly six fractional digits, e.g. `2024-05-01T12:00:00.000001Z`.
    /// Values outside chrono's range (PostgreSQL's ±infinity sentinels) render as
    /// `infinity` / `-infinity`, the way PostgreSQL prints them.
    pub fn to_rfc3339(self) -> String {
        match DateTime::<Utc>::from_timestamp_micros(self.unix_micros()) {
            Some(t) if self.0 != i64::MAX && self.0 != i64::MIN => {
                t.to_rfc3339_opts(SecondsFormat::Micros, true)
            }
            _ if self.0 < 0 => "-infinity".to_owned(),
            _ => "infinity".to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pg_epoch_is_2000() {
        assert_eq!(PgTimestamp(0).to_rfc3339(), "2000-01-01T00:00:00.000000Z");
        assert_eq!(PgTimestamp(1).to_rfc3339(), "2000-01-01T00:00:00.000001Z");
        assert_eq!(PgTimestamp(-1).to_rfc3339(), "1999-12-31T23:59:59.999999Z");
        assert_eq!(PgTimestamp(i64::MAX).to_rfc3339(), "infinity");
        assert_eq!(PgTimestamp(i64::MIN).to_rfc3339(), "-infinity");
    }

    proptest! {
        #[test]
        fn unix_round_trip(us in -4_000_000_000_000_000i64..4_000_000_000_000_000i64) {
            prop_assert_eq!(PgTimestamp::from_unix_micros(us).unix_micros(), us);
        }

        #[test]
        fn rfc3339_parses_back(us in -60_000_000_000_000_000i64..60_000_000_000_000_000i64) {
            let text = PgTimestamp(us).to_rfc3339();
            let back = DateTime::parse_from_rfc3339(&text).unwrap();
            prop_assert_eq!(PgTimestamp::from_unix_micros(back.timestamp_micros()), PgTimestamp(us));
        }
    }
}

//! How far a table's snapshot is, for `pgferry status` and the log: rows done of the planner's
//! estimate, a bar, the rate and an ETA. Pure.

use std::fmt;
use std::time::Duration;

/// One table's snapshot progress.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SnapshotProgress {
    /// Rows published so far.
    pub rows: i64,
    /// Rows expected (the planner's estimate when the snapshot started; 0 when unknown).
    pub estimated: i64,
    /// Time since the snapshot started.
    pub elapsed: Duration,
}

/// Width of the bar in characters.
const BAR: usize = 24;

impl SnapshotProgress {
    /// Done fraction in `[0, 1]`, `None` without an estimate. The estimate can be low; the
    /// fraction then stays just under 1 until the snapshot is done.
    pub fn fraction(&self) -> Option<f64> {
        (self.estimated > 0).then(|| (self.rows.max(0) as f64 / self.estimated as f64).min(0.99))
    }

    /// Rows per second so far.
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.rows.max(0) as f64 / secs
        } else {
            0.0
        }
    }

    /// Time left at the rate so far, `None` without an estimate or a rate.
    pub fn eta(&self) -> Option<Duration> {
        let rate = self.rate();
        if self.estimated <= 0 || rate <= 0.0 {
            return None;
        }
        let left = (self.estimated - self.rows).max(0) as f64;
        Some(Duration::from_secs_f64(left / rate))
    }
}

/// `h:mm:ss`.
fn clock(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

impl fmt::Display for SnapshotProgress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.fraction() {
            Some(done) => {
                let filled = (done * BAR as f64).round() as usize;
                write!(
                    f,
                    "[{}{}] {:>5.1}%  {} of ~{} rows  {:.0} rows/s",
                    "#".repeat(filled),
                    ".".repeat(BAR - filled),
                    done * 100.0,
                    self.rows,
                    self.estimated,
                    self.rate()
                )?;
                if let Some(eta) = self.eta() {
                    write!(f, "  ETA {}", clock(eta))?;
                }
                Ok(())
            }
            None => write!(f, "{} rows  {:.0} rows/s", self.rows, self.rate()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_percent_rate_and_eta() {
        let p = SnapshotProgress {
            rows: 250,
            estimated: 1000,
            elapsed: Duration::from_secs(10),
        };
        assert_eq!(p.fraction(), Some(0.25));
        assert_eq!(p.eta(), Some(Duration::from_secs(30)));
        assert_eq!(
            p.to_string(),
            "[######..................]  25.0%  250 of ~1000 rows  25 rows/s  ETA 0:00:30"
        );
    }

    #[test]
    fn an_estimate_that_was_too_low_never_shows_done_or_a_negative_eta() {
        let p = SnapshotProgress {
            rows: 5000,
            estimated: 1000,
            elapsed: Duration::from_secs(2),
        };
        assert_eq!(p.fraction(), Some(0.99));
        assert_eq!(p.eta(), Some(Duration::ZERO));
        let unknown = SnapshotProgress {
            rows: 7,
            estimated: 0,
            elapsed: Duration::ZERO,
        };
        assert_eq!(unknown.to_string(), "7 rows  0 rows/s");
        assert_eq!(unknown.eta(), None);
    }
}

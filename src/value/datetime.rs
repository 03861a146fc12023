//! Date and time text output → the envelope's ISO 8601 forms, as pure string work.
//!
//! PostgreSQL's range (4713 BC to 5874897 AD for dates, 294276 AD for timestamps) is wider
//! than what date libraries accept, so nothing here converts to a calendar type: the sessions
//! pin `DateStyle=ISO` and `TimeZone=UTC`, and the server's text is rearranged, never
//! recomputed. Every form below is accepted back by PostgreSQL's input functions.
//!
//! | type | PostgreSQL prints | envelope |
//! |---|---|---|
//! | `date` | `2024-01-31`, `12345-06-07`, `0044-03-15 BC` | the same |
//! | `timestamp` | `2024-01-31 10:00:00.5` | `2024-01-31T10:00:00.500000` |
//! | `timestamptz` | `2024-01-31 10:00:00+00` | `2024-01-31T10:00:00.000000Z` |
//!
//! Years have four digits or more, BC values keep PostgreSQL's ` BC` suffix, and `infinity` /
//! `-infinity` pass through.

use super::json::{invalid, ValueError};

const BC: &str = " BC";

fn is_special(text: &str) -> bool {
    text == "infinity" || text == "-infinity"
}

/// `YYYY-MM-DD` with a year of four or more digits.
fn valid_date(date: &str) -> bool {
    let mut parts = date.split('-');
    let (Some(y), Some(m), Some(d), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let digits = |s: &str, min: usize, max: usize| {
        (min..=max).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit())
    };
    digits(y, 4, 7) && digits(m, 2, 2) && digits(d, 2, 2)
}

/// An envelope form as pieces borrowed from the server's text: concatenated, they are the
/// form. Converting builds nothing, so the envelope writer copies the pieces straight into
/// its output.
pub type Pieces<'a> = [&'a str; 8];

/// Zeros that pad a fraction to six digits.
const ZEROS: &str = "000000";

/// `text` alone.
fn whole(text: &str) -> Pieces<'_> {
    [text, "", "", "", "", "", "", ""]
}

/// `HH:MM:SS[.f{1,6}]` → (`HH:MM:SS`, the fraction's digits).
fn time_parts(time: &str) -> Option<(&str, &str)> {
    let (whole, fraction) = time.split_once('.').unwrap_or((time, ""));
    let b = whole.as_bytes();
    let shaped = b.len() == 8
        && b[2] == b':'
        && b[5] == b':'
        && [0, 1, 3, 4, 6, 7].iter().all(|&i| b[i].is_ascii_digit());
    if !shaped || fraction.len() > 6 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((whole, fraction))
}

/// `date` output → envelope form (validated, unchanged).
pub fn date(text: &str) -> Result<String, ValueError> {
    date_pieces(text).map(|p| p.concat())
}

/// [`date`] as [`Pieces`].
pub fn date_pieces(text: &str) -> Result<Pieces<'_>, ValueError> {
    let core = text.strip_suffix(BC).unwrap_or(text);
    if is_special(text) || valid_date(core) {
        Ok(whole(text))
    } else {
        Err(invalid("date", "expected ISO output YYYY-MM-DD [BC]"))
    }
}

/// `timestamp` output → `YYYY-MM-DDTHH:MM:SS.ffffff[ BC]`.
pub fn timestamp(text: &str) -> Result<String, ValueError> {
    timestamp_pieces(text).map(|p| p.concat())
}

/// [`timestamp`] as [`Pieces`].
pub fn timestamp_pieces(text: &str) -> Result<Pieces<'_>, ValueError> {
    stamp_pieces(text, "", "", || {
        invalid(
            "timestamp",
            "expected ISO output YYYY-MM-DD HH:MM:SS[.ffffff] [BC]",
        )
    })
}

/// `timestamptz` output in UTC → `YYYY-MM-DDTHH:MM:SS.ffffffZ[ BC]`.
pub fn timestamptz(text: &str) -> Result<String, ValueError> {
    timestamptz_pieces(text).map(|p| p.concat())
}

/// [`timestamptz`] as [`Pieces`].
pub fn timestamptz_pieces(text: &str) -> Result<Pieces<'_>, ValueError> {
    stamp_pieces(text, "+00", "Z", || {
        invalid(
            "timestamptz",
            "expected ISO output in UTC, YYYY-MM-DD HH:MM:SS[.ffffff]+00 [BC] (pgferry pins TimeZone=UTC on its sessions)",
        )
    })
}

/// `YYYY-MM-DD HH:MM:SS[.f]<zone_in>[ BC]` → `YYYY-MM-DDTHH:MM:SS.ffffff<zone_out>[ BC]`.
fn stamp_pieces<'a>(
    text: &'a str,
    zone_in: &str,
    zone_out: &'static str,
    shape: impl Fn() -> ValueError,
) -> Result<Pieces<'a>, ValueError> {
    if is_special(text) {
        return Ok(whole(text));
    }
    let (core, era) = split_era(text);
    let local = core.strip_suffix(zone_in).ok_or_else(&shape)?;
    let (date, time) = local.split_once(' ').ok_or_else(&shape)?;
    if !valid_date(date) {
        return Err(shape());
    }
    let (hms, fraction) = time_parts(time).ok_or_else(&shape)?;
    Ok([
        date,
        "T",
        hms,
        ".",
        fraction,
        &ZEROS[fraction.len()..],
        zone_out,
        era,
    ])
}

fn split_era(text: &str) -> (&str, &'static str) {
    match text.strip_suffix(BC) {
        Some(core) => (core, BC),
        None => (text, ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn examples() {
        assert_eq!(date("12345-06-07").unwrap(), "12345-06-07");
        assert_eq!(date("4713-01-01 BC").unwrap(), "4713-01-01 BC");
        assert!(date("2024-1-31").is_err());
        assert_eq!(
            timestamp("294276-12-31 23:59:59.999999").unwrap(),
            "294276-12-31T23:59:59.999999"
        );
        assert_eq!(
            timestamp("1999-01-08 04:05:06.5").unwrap(),
            "1999-01-08T04:05:06.500000"
        );
        assert_eq!(
            timestamptz("0044-03-15 12:00:00+00 BC").unwrap(),
            "0044-03-15T12:00:00.000000Z BC"
        );
        assert_eq!(
            timestamptz("2024-02-29 23:59:59.123456+00").unwrap(),
            "2024-02-29T23:59:59.123456Z"
        );
        assert_eq!(timestamptz("-infinity").unwrap(), "-infinity");
        assert!(timestamptz("2024-02-29 23:59:59+05:30").is_err());
        assert!(timestamp("2024-02-29T23:59:59").is_err());
    }

    /// PostgreSQL's ISO text of ((y, mo, d), (h, mi, s, us), bc).
    fn pg_text(
        (y, mo, d): (u32, u32, u32),
        (h, mi, s, us): (u32, u32, u32, u32),
        bc: bool,
    ) -> String {
        let mut t = format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}");
        if us > 0 {
            // PostgreSQL drops trailing zeros of the fraction.
            let f = format!("{us:06}");
            t.push('.');
            t.push_str(f.trim_end_matches('0'));
        }
        if bc {
            t.push_str(" BC");
        }
        t
    }

    proptest! {
        /// Every timestamp PostgreSQL can print maps to a form whose parts are the same
        /// numbers, so nothing is recomputed or lost, whatever the year.
        #[test]
        fn timestamps_keep_every_field(y in 1u32..=294_276, mo in 1u32..=12, d in 1u32..=28,
                                       h in 0u32..24, mi in 0u32..60, s in 0u32..60,
                                       us in 0u32..1_000_000, bc: bool) {
            let text = pg_text((y, mo, d), (h, mi, s, us), bc);
            let out = timestamp(&text).unwrap();
            let expected = format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{us:06}{}",
                                   if bc { " BC" } else { "" });
            prop_assert_eq!(&out, &expected);
            let tz_text = pg_text((y, mo, d), (h, mi, s, us), false) + "+00" + if bc { " BC" } else { "" };
            let tz = timestamptz(&tz_text);
            let tz_expected = format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{us:06}Z{}",
                                      if bc { " BC" } else { "" });
            prop_assert_eq!(tz.unwrap(), tz_expected);
        }

        /// In years 1..=9999 the form is RFC 3339, as chrono renders it.
        #[test]
        fn common_years_are_rfc3339(secs in -62_135_596_800i64..253_402_300_799, us in 0u32..1_000_000) {
            use chrono::{DateTime, SecondsFormat};
            let t = DateTime::from_timestamp(secs, us * 1000).unwrap();
            let mut pg = t.format("%Y-%m-%d %H:%M:%S").to_string();
            if us > 0 {
                pg.push('.');
                pg.push_str(format!("{us:06}").trim_end_matches('0'));
            }
            pg.push_str("+00");
            prop_assert_eq!(timestamptz(&pg).unwrap(), t.to_rfc3339_opts(SecondsFormat::Micros, true));
        }

        #[test]
        fn never_panics(s in ".{0,40}") {
            let _ = (date(&s), timestamp(&s), timestamptz(&s));
        }
    }
}

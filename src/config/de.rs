//! Small deserializers shared by the config structs.
//!
//! Environment overrides always arrive as strings, taken verbatim, so string fields never
//! reinterpret them (`~` is not null, `0x1F` is not 31). Fields of other types read such a
//! string as YAML ([`lenient`]); in the file, string fields accept any scalar. Durations are
//! written `500ms`, `10s`, `5m`, `2h`, `7d`.

use std::fmt;
use std::time::Duration;

use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use serde::Deserialize;

struct StringLike;

impl Visitor<'_> for StringLike {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_owned())
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<String, E> {
        Ok(v.to_string())
    }
}

/// A string field that also accepts numbers and booleans.
pub fn string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    d.deserialize_any(StringLike)
}

/// A field that is not a string (number, boolean, list, map): its native YAML form, or a
/// string holding that form, as environment overrides deliver it (`"false"`, `"[a, b]"`).
pub fn lenient<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<T, D::Error> {
    let value = serde_yaml_ng::Value::deserialize(d)?;
    let value = match value {
        serde_yaml_ng::Value::String(text) => serde_yaml_ng::from_str(&text)
            .map_err(|e| de::Error::custom(format_args!("{text:?} is not valid YAML: {e}")))?,
        other => other,
    };
    T::deserialize(value).map_err(de::Error::custom)
}

/// Parses `<number><unit>` with unit `ms`, `s`, `m`, `h` or `d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit; write e.g. 500ms, 10s, 5m, 2h or 7d"))?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a whole number"))?;
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "{text:?} has unknown unit {unit:?}; use ms, s, m, h or d"
            ))
        }
    };
    n.checked_mul(unit_ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// A duration field (`10s`).
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = string(d)?;
    parse_duration(&text).map_err(de::Error::custom)
}

/// An optional duration field.
pub fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("ten s").is_err());
        assert!(parse_duration("5 weeks").is_err());
    }
}

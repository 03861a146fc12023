//! Text output of a PostgreSQL value → `serde_json::Value`, exactly.
//!
//! The replication and snapshot sessions pin `DateStyle=ISO`, `TimeZone=UTC`,
//! `bytea_output=hex` and `extra_float_digits=3`, so each type has one text shape to parse.
//! Error messages never include the value itself: logs must not carry row data.

use base64::Engine as _;
use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, Utc};
use serde_json::{Number, Value};

use super::{parse_array, ArrayNode, PgType};

/// 2^53: the largest integer every JSON reader holds exactly in a double.
const JSON_SAFE_INTEGER: i64 = 1 << 53;

/// The server's text output did not have the shape its type promises.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot convert {ty} text output to JSON: {reason}")]
pub struct ValueError {
    /// The type being converted.
    pub ty: &'static str,
    /// What was wrong (never the value itself).
    pub reason: String,
}

fn invalid(ty: &'static str, reason: impl ToString) -> ValueError {
    ValueError {
        ty,
        reason: reason.to_string(),
    }
}

/// True for PostgreSQL's special timestamp texts and BC dates, which RFC 3339 cannot express;
/// those pass through as the server printed them.
fn is_special_datetime(text: &str) -> bool {
    text.ends_with(" BC") || text == "infinity" || text == "-infinity"
}

/// Converts one non-NULL value from its text form.
pub fn text_to_json(ty: &PgType, text: &str) -> Result<Value, ValueError> {
    Ok(match ty {
        PgType::Bool => match text {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => return Err(invalid("bool", "expected t or f")),
        },
        PgType::Int => Value::Number(
            text.parse::<i64>()
                .map_err(|e| invalid("integer", e))?
                .into(),
        ),
        PgType::Int8 => {
            let v: i64 = text.parse().map_err(|e| invalid("int8", e))?;
            if (-JSON_SAFE_INTEGER..=JSON_SAFE_INTEGER).contains(&v) {
                Value::Number(v.into())
            } else {
                Value::String(text.to_owned())
            }
        }
        PgType::Float => match text {
            "NaN" | "Infinity" | "-Infinity" => Value::String(text.to_owned()),
            // arbitrary_precision keeps the server's digits verbatim: no re-rounding.
            _ => Value::Number(text.parse::<Number>().map_err(|e| invalid("float", e))?),
        },
        PgType::Numeric | PgType::Text | PgType::Uuid | PgType::Enum | PgType::Unknown => {
            Value::String(text.to_owned())
        }
        PgType::Json => serde_json::from_str(text).map_err(|e| invalid("json", e))?,
        PgType::Bytea => {
            let hex = text
                .strip_prefix("\\x")
                .ok_or_else(|| invalid("bytea", "expected hex output (\\x...)"))?;
            let raw = decode_hex(hex).ok_or_else(|| invalid("bytea", "invalid hex digit"))?;
            Value::String(base64::engine::general_purpose::STANDARD.encode(raw))
        }
        PgType::Timestamptz if is_special_datetime(text) => Value::String(text.to_owned()),
        PgType::Timestamptz => {
            let t = DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z")
                .map_err(|e| invalid("timestamptz", e))?;
            Value::String(
                t.with_timezone(&Utc)
                    .to_rfc3339_opts(SecondsFormat::Micros, true),
            )
        }
        PgType::Timestamp if is_special_datetime(text) => Value::String(text.to_owned()),
        PgType::Timestamp => {
            let t = NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f")
                .map_err(|e| invalid("timestamp", e))?;
            Value::String(t.format("%Y-%m-%dT%H:%M:%S%.6f").to_string())
        }
        PgType::Date if is_special_datetime(text) => Value::String(text.to_owned()),
        PgType::Date => {
            NaiveDate::parse_from_str(text, "%Y-%m-%d").map_err(|e| invalid("date", e))?;
            Value::String(text.to_owned())
        }
        PgType::Array(element) => {
            let node = parse_array(text, b',').map_err(|e| invalid("array", e))?;
            array_to_json(element, &node)?
        }
    })
}

fn array_to_json(element: &PgType, node: &ArrayNode) -> Result<Value, ValueError> {
    match node {
        ArrayNode::Elem(None) => Ok(Value::Null),
        ArrayNode::Elem(Some(text)) => text_to_json(element, text),
        ArrayNode::List(items) => items
            .iter()
            .map(|n| array_to_json(element, n))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
    }
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    let bytes = hex.as_bytes();
    if bytes.len() % 2 != 0 {
        return None;
    }
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    bytes
        .chunks_exact(2)
        .map(|pair| Some(nibble(pair[0])? << 4 | nibble(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn conv(ty: PgType, text: &str) -> Value {
        text_to_json(&ty, text).unwrap()
    }

    #[test]
    fn scalars() {
        assert_eq!(conv(PgType::Bool, "t"), json!(true));
        assert_eq!(conv(PgType::Int, "-32768"), json!(-32768));
        assert_eq!(
            conv(PgType::Int8, "9007199254740992"),
            json!(9007199254740992i64)
        );
        assert_eq!(
            conv(PgType::Int8, "9007199254740993"),
            json!("9007199254740993")
        );
        assert_eq!(
            conv(PgType::Int8, "-9223372036854775808"),
            json!("-9223372036854775808")
        );
        assert_eq!(
            conv(PgType::Numeric, "12345678901234567890.0123456789"),
            json!("12345678901234567890.0123456789")
        );
        assert_eq!(conv(PgType::Float, "NaN"), json!("NaN"));
        assert_eq!(
            serde_json::to_string(&conv(PgType::Float, "0.30000000000000004")).unwrap(),
            "0.30000000000000004"
        );
        assert_eq!(conv(PgType::Bytea, "\\xdeadbeef"), json!("3q2+7w=="));
        assert_eq!(conv(PgType::Bytea, "\\x"), json!(""));
        assert!(text_to_json(&PgType::Bytea, "\\xabc").is_err());
        assert!(text_to_json(&PgType::Bool, "yes").is_err());
    }

    #[test]
    fn datetimes() {
        assert_eq!(
            conv(PgType::Timestamptz, "2024-02-29 23:59:59.123456+00"),
            json!("2024-02-29T23:59:59.123456Z")
        );
        assert_eq!(
            conv(PgType::Timestamptz, "2024-02-29 23:59:59+05:30"),
            json!("2024-02-29T18:29:59.000000Z")
        );
        assert_eq!(conv(PgType::Timestamptz, "infinity"), json!("infinity"));
        assert_eq!(
            conv(PgType::Timestamp, "1999-01-08 04:05:06.5"),
            json!("1999-01-08T04:05:06.500000")
        );
        assert_eq!(conv(PgType::Date, "0044-03-15 BC"), json!("0044-03-15 BC"));
        assert_eq!(conv(PgType::Date, "2024-01-31"), json!("2024-01-31"));
    }

    #[test]
    fn json_keeps_big_numbers_exact() {
        let v = conv(
            PgType::Json,
            r#"{"a": 1.000000000000000000001, "b": [1, "x"]}"#,
        );
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            r#"{"a":1.000000000000000000001,"b":[1,"x"]}"#
        );
    }

    #[test]
    fn arrays_use_element_type() {
        let int_arr = PgType::Array(Box::new(PgType::Int));
        assert_eq!(
            conv(int_arr, "{{1,2},{3,NULL}}"),
            json!([[1, 2], [3, null]])
        );
        let text_arr = PgType::Array(Box::new(PgType::Text));
        assert_eq!(
            conv(text_arr, r#"{a,"b c","NULL",NULL}"#),
            json!(["a", "b c", "NULL", null])
        );
    }

    proptest! {
        #[test]
        fn bytea_round_trips(raw: Vec<u8>) {
            let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
            let v = conv(PgType::Bytea, &format!("\\x{hex}"));
            let back = base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap()).unwrap();
            prop_assert_eq!(back, raw);
        }

        #[test]
        fn numeric_text_is_preserved(digits in "-?[0-9]{1,40}(\\.[0-9]{1,20})?") {
            prop_assert_eq!(conv(PgType::Numeric, &digits), Value::String(digits.clone()));
        }

        #[test]
        fn int8_is_exact(v: i64) {
            let j = conv(PgType::Int8, &v.to_string());
            let back: i64 = match &j {
                Value::Number(n) => n.as_i64().unwrap(),
                Value::String(s) => s.parse().unwrap(),
                _ => unreachable!(),
            };
            prop_assert_eq!(back, v);
        }

        #[test]
        fn any_text_never_panics(s in ".{0,30}") {
            for ty in [PgType::Bool, PgType::Int, PgType::Int8, PgType::Float, PgType::Json,
                       PgType::Bytea, PgType::Timestamptz, PgType::Timestamp, PgType::Date,
                       PgType::Array(Box::new(PgType::Int8))] {
                let _ = text_to_json(&ty, &s);
            }
        }
    }
}

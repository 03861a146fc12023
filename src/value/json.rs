//! Text output of a PostgreSQL value → its JSON form in the envelope, exactly.
//!
//! The replication and snapshot sessions pin `DateStyle=ISO`, `TimeZone=UTC`,
//! `IntervalStyle=postgres`, `bytea_output=hex`, `extra_float_digits=3` and `lc_monetary=C`,
//! so each type has one text shape to parse. Every form is one that PostgreSQL's input
//! function reads back to the same value; README.md lists them. Error messages never include
//! the value itself: logs must not carry row data.

use base64::Engine as _;
use serde::{Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{Number, Value};

use super::{datetime, parse_array, ArrayNode, PgType};

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

pub(super) fn invalid(ty: &'static str, reason: impl ToString) -> ValueError {
    ValueError {
        ty,
        reason: reason.to_string(),
    }
}

/// One column value as it goes into the envelope.
#[derive(Debug, Clone)]
pub enum ColumnJson {
    /// A value built here (number, string, boolean, array).
    Value(Value),
    /// JSON text passed through unparsed (`jsonb`), so no nesting depth is too deep.
    Raw(Box<RawValue>),
}

impl ColumnJson {
    /// True for the JSON literal `null` (which a json/jsonb column can hold).
    pub fn is_null(&self) -> bool {
        match self {
            ColumnJson::Value(v) => v.is_null(),
            ColumnJson::Raw(r) => r.get() == "null",
        }
    }
}

impl Serialize for ColumnJson {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            ColumnJson::Value(v) => v.serialize(serializer),
            ColumnJson::Raw(r) => r.serialize(serializer),
        }
    }
}

impl From<Value> for ColumnJson {
    fn from(v: Value) -> Self {
        ColumnJson::Value(v)
    }
}

fn raw(ty: &'static str, text: String) -> Result<ColumnJson, ValueError> {
    RawValue::from_string(text)
        .map(ColumnJson::Raw)
        .map_err(|e| invalid(ty, e))
}

/// `money` in the C locale (`-$1,234.56`) → `-1234.56`.
fn money(text: &str) -> Result<Value, ValueError> {
    let shape = || {
        invalid(
            "money",
            "expected C-locale output like -$1,234.56 (pgferry pins lc_monetary=C)",
        )
    };
    let (sign, rest) = match text.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", text),
    };
    let amount = rest.strip_prefix('$').ok_or_else(shape)?;
    let (whole, cents) = amount.split_once('.').ok_or_else(shape)?;
    let groups: Vec<&str> = whole.split(',').collect();
    let grouped = groups.iter().enumerate().all(|(i, g)| {
        let len_ok = if i == 0 {
            (1..=3).contains(&g.len())
        } else {
            g.len() == 3
        };
        len_ok && g.bytes().all(|b| b.is_ascii_digit())
    });
    if !grouped || cents.is_empty() || !cents.bytes().all(|b| b.is_ascii_digit()) {
        return Err(shape());
    }
    Ok(Value::String(format!("{sign}{}.{cents}", groups.concat())))
}

/// Converts one non-NULL value from its text form.
pub fn text_to_json(ty: &PgType, text: &str) -> Result<ColumnJson, ValueError> {
    Ok(ColumnJson::Value(match ty {
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
        PgType::Money => money(text)?,
        PgType::Numeric
        | PgType::Text
        | PgType::Uuid
        | PgType::Enum
        | PgType::Unknown
        | PgType::GeoBox
        | PgType::Json => Value::String(text.to_owned()),
        PgType::Jsonb => return raw("jsonb", text.to_owned()),
        PgType::Bytea => {
            let hex = text
                .strip_prefix("\\x")
                .ok_or_else(|| invalid("bytea", "expected hex output (\\x...)"))?;
            let raw = decode_hex(hex).ok_or_else(|| invalid("bytea", "invalid hex digit"))?;
            Value::String(base64::engine::general_purpose::STANDARD.encode(raw))
        }
        PgType::Timestamptz => Value::String(datetime::timestamptz(text)?),
        PgType::Timestamp => Value::String(datetime::timestamp(text)?),
        PgType::Date => Value::String(datetime::date(text)?),
        PgType::Array(element) => return array(element, text),
    }))
}

/// Appends a string's JSON form (quoted and escaped) to `out`.
pub fn push_json_str(out: &mut Vec<u8>, text: &str) {
    // Writing into a Vec cannot fail, and a str always serializes.
    let _ = serde_json::to_writer(&mut *out, text);
}

/// Appends `"` + the pieces + `"`: for date/time forms, whose characters never need escaping.
fn push_quoted(out: &mut Vec<u8>, pieces: &datetime::Pieces<'_>) {
    out.push(b'"');
    for piece in pieces {
        out.extend_from_slice(piece.as_bytes());
    }
    out.push(b'"');
}

/// Appends one non-NULL value's JSON form to `out`: exactly the text that serializing
/// [`text_to_json`]'s result gives, written straight into the envelope for the common types
/// (no intermediate value, no allocation). Returns whether it wrote the JSON literal `null`.
pub fn write_json(ty: &PgType, text: &str, out: &mut Vec<u8>) -> Result<bool, ValueError> {
    let mut digits = itoa::Buffer::new();
    match ty {
        PgType::Bool => out.extend_from_slice(match text {
            "t" => b"true",
            "f" => b"false",
            _ => return Err(invalid("bool", "expected t or f")),
        }),
        PgType::Int => {
            let v: i64 = text.parse().map_err(|e| invalid("integer", e))?;
            out.extend_from_slice(digits.format(v).as_bytes());
        }
        PgType::Int8 => {
            let v: i64 = text.parse().map_err(|e| invalid("int8", e))?;
            if (-JSON_SAFE_INTEGER..=JSON_SAFE_INTEGER).contains(&v) {
                out.extend_from_slice(digits.format(v).as_bytes());
            } else {
                push_json_str(out, text);
            }
        }
        PgType::Numeric
        | PgType::Text
        | PgType::Uuid
        | PgType::Enum
        | PgType::Unknown
        | PgType::GeoBox
        | PgType::Json => push_json_str(out, text),
        PgType::Timestamptz => push_quoted(out, &datetime::timestamptz_pieces(text)?),
        PgType::Timestamp => push_quoted(out, &datetime::timestamp_pieces(text)?),
        PgType::Date => push_quoted(out, &datetime::date_pieces(text)?),
        PgType::Float | PgType::Money | PgType::Jsonb | PgType::Bytea | PgType::Array(_) => {
            let value = text_to_json(ty, text)?;
            // A ColumnJson always serializes, into a Vec without fail.
            let _ = serde_json::to_writer(&mut *out, &value);
            return Ok(value.is_null());
        }
    }
    Ok(false)
}

/// Arrays become nested JSON arrays of their elements' forms. Some keep PostgreSQL's literal
/// text as a string instead, because a JSON array cannot say what they are: arrays whose lower
/// bounds are not 1 (`[0:1]={7,8}`; PostgreSQL prints bounds only then), and `jsonb[]` that is
/// multi-dimensional (a jsonb element may itself be an array) or holds a JSON `null` element
/// (which SQL NULL elements would be confused with).
fn array(element: &PgType, text: &str) -> Result<ColumnJson, ValueError> {
    if text.starts_with('[') {
        return Ok(ColumnJson::Value(Value::String(text.to_owned())));
    }
    let delimiter = if *element == PgType::GeoBox {
        b';'
    } else {
        b','
    };
    let node = parse_array(text, delimiter).map_err(|e| invalid("array", e))?;
    if *element == PgType::Jsonb {
        let ArrayNode::List(items) = &node else {
            return Err(invalid("array", "expected a list"));
        };
        let ambiguous = |i: &ArrayNode| match i {
            ArrayNode::List(_) => true,
            ArrayNode::Elem(Some(t)) => t == "null",
            ArrayNode::Elem(None) => false,
        };
        if items.iter().any(ambiguous) {
            return Ok(ColumnJson::Value(Value::String(text.to_owned())));
        }
        let parts: Vec<&str> = items
            .iter()
            .map(|i| match i {
                ArrayNode::Elem(Some(t)) => t.as_str(),
                _ => "null",
            })
            .collect();
        return raw("jsonb[]", format!("[{}]", parts.join(",")));
    }
    array_to_json(element, &node).map(ColumnJson::Value)
}

fn array_to_json(element: &PgType, node: &ArrayNode) -> Result<Value, ValueError> {
    match node {
        ArrayNode::Elem(None) => Ok(Value::Null),
        ArrayNode::Elem(Some(text)) => match text_to_json(element, text)? {
            ColumnJson::Value(v) => Ok(v),
            ColumnJson::Raw(_) => Err(invalid("array", "nested raw element")),
        },
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
        serde_json::to_value(text_to_json(&ty, text).unwrap()).unwrap()
    }

    fn rendered(ty: PgType, text: &str) -> String {
        serde_json::to_string(&text_to_json(&ty, text).unwrap()).unwrap()
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
        assert_eq!(conv(PgType::Timestamptz, "infinity"), json!("infinity"));
        assert_eq!(
            conv(PgType::Timestamptz, "12345-06-07 00:00:00+00"),
            json!("12345-06-07T00:00:00.000000Z")
        );
        assert_eq!(conv(PgType::Date, "12345-06-07"), json!("12345-06-07"));
        assert_eq!(
            conv(PgType::Timestamp, "1999-01-08 04:05:06.5"),
            json!("1999-01-08T04:05:06.500000")
        );
        assert_eq!(conv(PgType::Date, "0044-03-15 BC"), json!("0044-03-15 BC"));
        assert_eq!(conv(PgType::Date, "2024-01-31"), json!("2024-01-31"));
    }

    #[test]
    fn jsonb_passes_through_exactly_at_any_depth() {
        let text = r#"{"a": 1.000000000000000000001, "b": [1, "x"]}"#;
        assert_eq!(rendered(PgType::Jsonb, text), text);
        let deep = format!("{}1{}", "[".repeat(5000), "]".repeat(5000));
        assert_eq!(rendered(PgType::Jsonb, &deep), deep);
        assert!(text_to_json(&PgType::Jsonb, "{").is_err());
    }

    #[test]
    fn json_text_is_kept_verbatim_as_a_string() {
        for text in [r#" {"a":1, "a":2} "#, r#""\ud800""#, "null", "[1,\n2]"] {
            assert_eq!(conv(PgType::Json, text), Value::String(text.to_owned()));
        }
    }

    #[test]
    fn money_is_a_numeric_string() {
        assert_eq!(conv(PgType::Money, "$1,234.50"), json!("1234.50"));
        assert_eq!(
            conv(PgType::Money, "-$92,233,720,368,547,758.08"),
            json!("-92233720368547758.08")
        );
        assert_eq!(conv(PgType::Money, "$0.00"), json!("0.00"));
        for bad in ["1234.50", "$1,23.00", "€1,00", "$1.2x"] {
            assert!(text_to_json(&PgType::Money, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn arrays_that_json_cannot_describe_keep_their_literal() {
        let ints = PgType::Array(Box::new(PgType::Int));
        assert_eq!(conv(ints, "[0:1]={7,8}"), json!("[0:1]={7,8}"));
        let jsonb = PgType::Array(Box::new(PgType::Jsonb));
        assert_eq!(
            rendered(jsonb.clone(), r#"{"[1, 2]",NULL,"{\"a\": 1}"}"#),
            r#"[[1, 2],null,{"a": 1}]"#
        );
        assert_eq!(conv(jsonb, "{{1,2},{3,4}}"), json!("{{1,2},{3,4}}"));
        let boxes = PgType::Array(Box::new(PgType::GeoBox));
        assert_eq!(
            conv(boxes, "{(1,1),(0,0);(3,3),(2,2)}"),
            json!(["(1,1),(0,0)", "(3,3),(2,2)"])
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
            for ty in [PgType::Bool, PgType::Int, PgType::Int8, PgType::Float, PgType::Jsonb, PgType::Money,
                       PgType::Bytea, PgType::Timestamptz, PgType::Timestamp, PgType::Date,
                       PgType::Array(Box::new(PgType::Int8)), PgType::Array(Box::new(PgType::Jsonb))] {
                let _ = text_to_json(&ty, &s);
            }
        }

        /// The direct writer is the serialized conversion, byte for byte, and fails exactly
        /// where it fails: for every type, on server-shaped text and on anything else.
        #[test]
        fn write_json_is_the_serialized_conversion(
            arbitrary in ".{0,30}",
            int in any::<i64>(),
            stamp in (1u32..=294_276, 1u32..=12, 1u32..=28, 0u32..24, 0u32..60, 0u32..60, 0u32..1_000_000, any::<bool>()),
            pick in 0usize..6,
        ) {
            let (y, mo, d, h, mi, sec, us, bc) = stamp;
            let fraction = if us > 0 { format!(".{}", format!("{us:06}").trim_end_matches('0')) } else { String::new() };
            let era = if bc { " BC" } else { "" };
            let date = format!("{y:04}-{mo:02}-{d:02}");
            let time = format!("{date} {h:02}:{mi:02}:{sec:02}{fraction}");
            let text = match pick {
                0 => arbitrary,
                1 => int.to_string(),
                2 => (int % 100_000).to_string(),
                3 => format!("{time}+00{era}"),
                4 => format!("{time}{era}"),
                _ => format!("{date}{era}"),
            };
            for ty in [PgType::Bool, PgType::Int, PgType::Int8, PgType::Float, PgType::Numeric, PgType::Money,
                       PgType::Text, PgType::Json, PgType::Jsonb, PgType::GeoBox, PgType::Bytea,
                       PgType::Timestamptz, PgType::Timestamp, PgType::Date, PgType::Uuid, PgType::Enum,
                       PgType::Unknown, PgType::Array(Box::new(PgType::Int8))] {
                let mut out = Vec::new();
                let written = write_json(&ty, &text, &mut out);
                match text_to_json(&ty, &text) {
                    Ok(value) => {
                        prop_assert_eq!(written, Ok(value.is_null()), "{:?} {:?}", ty, text);
                        prop_assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(&value).unwrap());
                    }
                    Err(e) => prop_assert_eq!(written, Err(e)),
                }
            }
        }
    }
}

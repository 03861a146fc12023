//! Envelope JSON values → the text input form of the target column's type. Pure.
//!
//! The inverse of [`crate::value::text_to_json`]: values are bound as *text-format parameters
//! of the target column's type*, so PostgreSQL's own input functions parse them, exactly as if
//! the source's output had been copied. Nothing is rendered into SQL text.

use base64::Engine as _;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::value::PgType;

/// PostgreSQL's limit on array dimensions (`MAXDIM`); deeper JSON is not an array value.
const MAX_ARRAY_DIMENSIONS: usize = 6;

/// A JSON value that cannot be the input of its column's type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("value for a {ty} column: {reason}")]
pub struct ParamError {
    /// Target type.
    pub ty: &'static str,
    /// What was wrong (never the value itself).
    pub reason: &'static str,
}

fn type_name(ty: &PgType) -> &'static str {
    match ty {
        PgType::Bytea => "bytea",
        PgType::Array(_) => "array",
        PgType::Json => "json",
        PgType::Jsonb => "jsonb",
        _ => "scalar",
    }
}

fn error(ty: &PgType, reason: &'static str) -> ParamError {
    ParamError {
        ty: type_name(ty),
        reason,
    }
}

/// Text input for one envelope value (raw JSON); `None` is SQL NULL. `jsonb` passes through
/// unparsed, so its nesting depth does not matter.
pub fn json_to_text(ty: &PgType, raw: &RawValue) -> Result<Option<String>, ParamError> {
    to_text(ty, raw, 0)
}

fn to_text(ty: &PgType, raw: &RawValue, depth: usize) -> Result<Option<String>, ParamError> {
    let text = raw.get();
    if text == "null" {
        return Ok(None);
    }
    match ty {
        PgType::Jsonb => return Ok(Some(text.to_owned())),
        PgType::Array(element) if text.starts_with('[') => {
            return array_literal(element, text, depth).map(Some)
        }
        _ => {}
    }
    let value: Value = serde_json::from_str(text).map_err(|_| error(ty, "not a JSON scalar"))?;
    Ok(Some(match (ty, value) {
        (_, Value::Null) => return Ok(None),
        (PgType::Bytea, Value::String(b64)) => {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|_| error(ty, "not base64"))?;
            let mut hex = String::with_capacity(2 + raw.len() * 2);
            hex.push_str("\\x");
            for b in raw {
                hex.push_str(&format!("{b:02x}"));
            }
            hex
        }
        (_, Value::String(s)) => s,
        (_, Value::Number(n)) => n.to_string(),
        (_, Value::Bool(b)) => if b { "true" } else { "false" }.to_owned(),
        // Records written before json was carried as its text held the value itself.
        (PgType::Json, v) => v.to_string(),
        (_, Value::Array(_) | Value::Object(_)) => {
            return Err(error(
                ty,
                "structured JSON for a column that is not json or an array",
            ))
        }
    }))
}

/// `{...}` with every element quoted (so no element text needs analysis) and NULL bare.
fn array_literal(element: &PgType, text: &str, depth: usize) -> Result<String, ParamError> {
    if depth >= MAX_ARRAY_DIMENSIONS {
        return Err(error(element, "array nested deeper than PostgreSQL allows"));
    }
    let items: Vec<Box<RawValue>> =
        serde_json::from_str(text).map_err(|_| error(element, "not a JSON array"))?;
    // PostgreSQL's array delimiter is `,` for every built-in type but `box` (`;`).
    let delimiter = if *element == PgType::GeoBox { ';' } else { ',' };
    let mut out = String::from("{");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(delimiter);
        }
        if item.get().starts_with('[') && *element != PgType::Jsonb {
            out.push_str(&array_literal(element, item.get(), depth + 1)?);
            continue;
        }
        match to_text(element, item, depth + 1)? {
            None => out.push_str("NULL"),
            Some(text) => {
                out.push('"');
                for c in text.chars() {
                    if c == '"' || c == '\\' {
                        out.push('\\');
                    }
                    out.push(c);
                }
                out.push('"');
            }
        }
    }
    out.push('}');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::{parse_array, text_to_json, ArrayNode};
    use proptest::prelude::*;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_owned()).unwrap()
    }

    fn text(ty: &PgType, json: &str) -> Option<String> {
        json_to_text(ty, &raw(json)).unwrap()
    }

    #[test]
    fn scalars_and_special_types() {
        assert_eq!(text(&PgType::Int, "5").as_deref(), Some("5"));
        assert_eq!(text(&PgType::Bool, "false").as_deref(), Some("false"));
        assert_eq!(
            text(&PgType::Bytea, r#""3q2+7w==""#).as_deref(),
            Some("\\xdeadbeef")
        );
        assert_eq!(
            text(&PgType::Jsonb, r#"{"a": [1]}"#).as_deref(),
            Some(r#"{"a": [1]}"#)
        );
        assert_eq!(
            text(&PgType::Json, r#"" {\"a\":1} ""#).as_deref(),
            Some(r#" {"a":1} "#)
        );
        assert_eq!(text(&PgType::Text, "null"), None);
        assert!(json_to_text(&PgType::Int, &raw(r#"{"x": 1}"#)).is_err());
        let deep = format!("{}1{}", "[".repeat(5000), "]".repeat(5000));
        assert_eq!(text(&PgType::Jsonb, &deep), Some(deep.clone()));
        let ints = PgType::Array(Box::new(PgType::Int));
        assert!(json_to_text(&ints, &raw(&deep)).is_err());
    }

    #[test]
    fn arrays_quote_every_element() {
        let ty = PgType::Array(Box::new(PgType::Text));
        assert_eq!(
            text(&ty, r#"["a", "b \"c\"", null, "NULL"]"#).unwrap(),
            r#"{"a","b \"c\"",NULL,"NULL"}"#
        );
        let nested = PgType::Array(Box::new(PgType::Int));
        assert_eq!(
            text(&nested, "[[1, 2], [3, null]]").unwrap(),
            r#"{{"1","2"},{"3",NULL}}"#
        );
        assert_eq!(text(&nested, r#""[0:1]={7,8}""#).unwrap(), "[0:1]={7,8}");
        let jsonb = PgType::Array(Box::new(PgType::Jsonb));
        assert_eq!(
            text(&jsonb, r#"[[1,2],{"a":"b"},null]"#).unwrap(),
            r#"{"[1,2]","{\"a\":\"b\"}",NULL}"#
        );
        let boxes = PgType::Array(Box::new(PgType::GeoBox));
        assert_eq!(
            text(&boxes, r#"["(1,1),(0,0)", null]"#).unwrap(),
            r#"{"(1,1),(0,0)";NULL}"#
        );
    }

    proptest! {
        /// Capture encoding followed by apply decoding gives back PostgreSQL's array text
        /// (as parsed elements), for arbitrary text arrays.
        #[test]
        fn text_arrays_round_trip(items in proptest::collection::vec(proptest::option::of(".{0,8}"), 0..6)) {
            let ty = PgType::Array(Box::new(PgType::Text));
            let json = Value::Array(items.iter().map(|i| i.clone().map_or(Value::Null, Value::String)).collect());
            let literal = json_to_text(&ty, &raw(&json.to_string())).unwrap().unwrap();
            let parsed = parse_array(&literal, b',').unwrap();
            let expected = ArrayNode::List(items.into_iter().map(ArrayNode::Elem).collect());
            prop_assert_eq!(&parsed, &expected);
            let back = serde_json::to_value(text_to_json(&ty, &literal).unwrap()).unwrap();
            prop_assert_eq!(back, json);
        }

        #[test]
        fn bytea_round_trips(bytes: Vec<u8>) {
            let b64 = Value::String(base64::engine::general_purpose::STANDARD.encode(&bytes));
            let text = json_to_text(&PgType::Bytea, &raw(&b64.to_string())).unwrap().unwrap();
            let back = serde_json::to_value(text_to_json(&PgType::Bytea, &text).unwrap()).unwrap();
            prop_assert_eq!(back, b64);
        }

        #[test]
        fn any_json_never_panics(s in ".{0,40}") {
            if let Ok(r) = RawValue::from_string(s) {
                for ty in [PgType::Int, PgType::Bytea, PgType::Json, PgType::Jsonb,
                           PgType::Array(Box::new(PgType::Int)), PgType::Array(Box::new(PgType::Jsonb))] {
                    let _ = json_to_text(&ty, &r);
                }
            }
        }
    }
}

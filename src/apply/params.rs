//! Envelope JSON values → the text input form of the target column's type. Pure.
//!
//! The inverse of [`crate::value::text_to_json`]: values are bound as *text-format parameters
//! of the target column's type*, so PostgreSQL's own input functions parse them, exactly as if
//! the source's output had been copied. Nothing is rendered into SQL text.

use base64::Engine as _;
use serde_json::Value;

use crate::value::PgType;

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
        _ => "scalar",
    }
}

/// Text input for one value; `None` is SQL NULL.
pub fn json_to_text(ty: &PgType, value: &Value) -> Result<Option<String>, ParamError> {
    Ok(match (ty, value) {
        (_, Value::Null) => None,
        (PgType::Json, v) => Some(v.to_string()),
        (PgType::Bytea, Value::String(b64)) => {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|_| ParamError {
                    ty: "bytea",
                    reason: "not base64",
                })?;
            let mut hex = String::with_capacity(2 + raw.len() * 2);
            hex.push_str("\\x");
            for b in raw {
                hex.push_str(&format!("{b:02x}"));
            }
            Some(hex)
        }
        (PgType::Array(element), Value::Array(items)) => Some(array_literal(element, items)?),
        (_, Value::String(s)) => Some(s.clone()),
        (_, Value::Number(n)) => Some(n.to_string()),
        (_, Value::Bool(b)) => Some(if *b { "true" } else { "false" }.to_owned()),
        (ty, Value::Array(_) | Value::Object(_)) => {
            return Err(ParamError {
                ty: type_name(ty),
                reason: "structured JSON for a column that is not json or an array",
            })
        }
    })
}

/// `{...}` with every element quoted (so no element text needs analysis) and NULL bare.
fn array_literal(element: &PgType, items: &[Value]) -> Result<String, ParamError> {
    let mut out = String::from("{");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match item {
            Value::Array(inner) if !matches!(element, PgType::Json) => {
                out.push_str(&array_literal(element, inner)?)
            }
            other => match json_to_text(element, other)? {
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
            },
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
    use serde_json::json;

    #[test]
    fn scalars_and_special_types() {
        assert_eq!(
            json_to_text(&PgType::Int, &json!(5)).unwrap().as_deref(),
            Some("5")
        );
        assert_eq!(
            json_to_text(&PgType::Bool, &json!(false))
                .unwrap()
                .as_deref(),
            Some("false")
        );
        assert_eq!(
            json_to_text(&PgType::Bytea, &json!("3q2+7w=="))
                .unwrap()
                .as_deref(),
            Some("\\xdeadbeef")
        );
        assert_eq!(
            json_to_text(&PgType::Json, &json!({"a": [1]}))
                .unwrap()
                .as_deref(),
            Some(r#"{"a":[1]}"#)
        );
        assert_eq!(json_to_text(&PgType::Text, &Value::Null).unwrap(), None);
        assert!(json_to_text(&PgType::Int, &json!({"x": 1})).is_err());
    }

    #[test]
    fn arrays_quote_every_element() {
        let ty = PgType::Array(Box::new(PgType::Text));
        let lit = json_to_text(&ty, &json!(["a", "b \"c\"", null, "NULL"]))
            .unwrap()
            .unwrap();
        assert_eq!(lit, r#"{"a","b \"c\"",NULL,"NULL"}"#);
        let nested = PgType::Array(Box::new(PgType::Int));
        assert_eq!(
            json_to_text(&nested, &json!([[1, 2], [3, null]]))
                .unwrap()
                .unwrap(),
            r#"{{"1","2"},{"3",NULL}}"#
        );
    }

    proptest! {
        /// Capture encoding followed by apply decoding gives back PostgreSQL's array text
        /// (as parsed elements), for arbitrary text arrays.
        #[test]
        fn text_arrays_round_trip(items in proptest::collection::vec(proptest::option::of(".{0,8}"), 0..6)) {
            let ty = PgType::Array(Box::new(PgType::Text));
            let json = Value::Array(items.iter().map(|i| i.clone().map_or(Value::Null, Value::String)).collect());
            let literal = json_to_text(&ty, &json).unwrap().unwrap();
            let parsed = parse_array(&literal, b',').unwrap();
            let expected = ArrayNode::List(items.into_iter().map(ArrayNode::Elem).collect());
            prop_assert_eq!(&parsed, &expected);
            prop_assert_eq!(text_to_json(&ty, &literal).unwrap(), json);
        }

        #[test]
        fn bytea_round_trips(raw: Vec<u8>) {
            let b64 = Value::String(base64::engine::general_purpose::STANDARD.encode(&raw));
            let text = json_to_text(&PgType::Bytea, &b64).unwrap().unwrap();
            prop_assert_eq!(text_to_json(&PgType::Bytea, &text).unwrap(), b64);
        }
    }
}

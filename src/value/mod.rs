//! Column values: which PostgreSQL type a column has, and how its text form maps to JSON.
//!
//! Pure. The capture layer feeds it the type OIDs from Relation messages and resolves
//! user-defined types (enums, domains, their arrays) from the catalog; this module only keeps
//! the mapping and does the conversion.

mod array;
pub mod copy_text;
mod datetime;
mod json;

use std::collections::HashMap;

pub use array::{parse_array, ArrayNode, ArrayParseError};
pub use json::{push_json_str, text_to_json, write_json, ColumnJson, ValueError};

/// How a column's text form is rendered in JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgType {
    /// `bool` → true/false.
    Bool,
    /// `int2`, `int4`, `oid` → number.
    Int,
    /// `int8` → number, or a string beyond ±2^53 where JSON readers lose precision.
    Int8,
    /// `float4`, `float8` → number with the server's exact digits; NaN/±Infinity as strings.
    Float,
    /// `numeric` → string, so no reader rounds it.
    Numeric,
    /// `money` → its amount as a numeric string (`"-1234.56"`); sessions pin `lc_monetary=C`.
    Money,
    /// Text-like types and anything rendered verbatim as a string (`time`, `interval`, …).
    Text,
    /// `json` → its text verbatim, as a JSON string (whitespace, key order, duplicate keys
    /// and any escape kept; a JSON value could not carry them).
    Json,
    /// `jsonb` → the JSON value itself, passed through unparsed (no nesting limit).
    Jsonb,
    /// `box` → its text; the one built-in type whose arrays use `;` between elements.
    GeoBox,
    /// `bytea` → base64 string.
    Bytea,
    /// `timestamptz` → RFC 3339 UTC with microseconds.
    Timestamptz,
    /// `timestamp` → RFC 3339 without offset.
    Timestamp,
    /// `date` → `YYYY-MM-DD`.
    Date,
    /// `uuid` → string.
    Uuid,
    /// A user-defined enum → its label.
    Enum,
    /// An array of the element type (delimiter `,`, or `;` for `box`).
    Array(Box<PgType>),
    /// Anything else: its text form as a string.
    Unknown,
}

/// Built-in type OIDs (from `pg_type.dat`); stable across PostgreSQL versions.
pub fn builtin(oid: u32) -> Option<PgType> {
    use PgType::*;
    let scalar = |oid| -> Option<PgType> {
        Some(match oid {
            16 => Bool,
            21 | 23 | 26 => Int,
            20 => Int8,
            700 | 701 => Float,
            1700 => Numeric,
            790 => Money,
            18 | 19 | 25 | 1042 | 1043 | 142 | 1083 | 1266 | 1186 | 869 | 650 | 829 => Text,
            114 => Json,
            3802 => Jsonb,
            603 => GeoBox,
            17 => Bytea,
            1184 => Timestamptz,
            1114 => Timestamp,
            1082 => Date,
            2950 => Uuid,
            _ => return None,
        })
    };
    let element = match oid {
        1000 => 16,
        1001 => 17,
        1002 => 18,
        1003 => 19,
        1005 => 21,
        1007 => 23,
        1009 => 25,
        1014 => 1042,
        1015 => 1043,
        1016 => 20,
        1021 => 700,
        1022 => 701,
        1028 => 26,
        1115 => 1114,
        1182 => 1082,
        1183 => 1083,
        1185 => 1184,
        1187 => 1186,
        1231 => 1700,
        1270 => 1266,
        2951 => 2950,
        3807 => 3802,
        199 => 114,
        143 => 142,
        791 => 790,
        1041 => 869,
        651 => 650,
        1020 => 603,
        _ => return scalar(oid),
    };
    scalar(element).map(|e| Array(Box::new(e)))
}

/// Type OIDs → [`PgType`], built-ins plus whatever the catalog told us about user types.
#[derive(Debug, Default, Clone)]
pub struct TypeRegistry {
    user: HashMap<u32, PgType>,
}

impl TypeRegistry {
    /// True when the OID is built in or already resolved.
    pub fn knows(&self, oid: u32) -> bool {
        builtin(oid).is_some() || self.user.contains_key(&oid)
    }

    /// Records what the catalog says about a non-built-in type.
    pub fn register(&mut self, oid: u32, ty: PgType) {
        self.user.insert(oid, ty);
    }

    /// The rendering for a type OID; unknown OIDs render as text.
    pub fn resolve(&self, oid: u32) -> PgType {
        builtin(oid)
            .or_else(|| self.user.get(&oid).cloned())
            .unwrap_or(PgType::Unknown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_resolve_to_their_elements() {
        let r = TypeRegistry::default();
        assert_eq!(r.resolve(1009), PgType::Array(Box::new(PgType::Text)));
        assert_eq!(r.resolve(1231), PgType::Array(Box::new(PgType::Numeric)));
        assert_eq!(r.resolve(99999), PgType::Unknown);
    }

    #[test]
    fn user_types_are_remembered() {
        let mut r = TypeRegistry::default();
        assert!(!r.knows(70000));
        r.register(70000, PgType::Enum);
        assert!(r.knows(70000));
        assert_eq!(r.resolve(70000), PgType::Enum);
    }
}

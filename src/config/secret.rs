//! Secrets: values that must never reach a log line or a serialized config.
//!
//! Two layers. [`Secret`] keeps a value out of `Debug` and `Display`. And every secret value
//! the config holds is [`register`]ed when the config loads, so that text produced elsewhere
//! (a librdkafka error that echoes a property value, a server message) is passed through
//! [`redact`] on its way out: the log writer, `check`, `status` and the final error line all
//! do. Values shorter than [`MIN_REDACTED_LEN`] characters are not searched for: replacing
//! every `ab` in the output would garble it and hide nothing worth hiding.

use std::borrow::Cow;
use std::fmt;
use std::sync::RwLock;

use serde::{Deserialize, Deserializer};

/// A secret string. `Debug` and `Display` print `***`; it has no `Serialize` impl.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for handing to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        super::de::string(d).map(Secret)
    }
}

/// Shortest value [`redact`] looks for.
pub const MIN_REDACTED_LEN: usize = 4;

/// The replacement text.
pub const REDACTED: &str = "***";

static KNOWN: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Remembers a secret value so that [`redact`] hides it from any text.
pub fn register(value: &str) {
    if value.chars().count() < MIN_REDACTED_LEN {
        return;
    }
    let mut known = KNOWN.write().unwrap_or_else(|e| e.into_inner());
    if !known.iter().any(|k| k == value) {
        known.push(value.to_owned());
        // Longest first, so a secret containing another is replaced whole.
        known.sort_by_key(|k| std::cmp::Reverse(k.len()));
    }
}

/// `text` with every registered secret replaced by `***`.
pub fn redact(text: &str) -> Cow<'_, str> {
    let known = KNOWN.read().unwrap_or_else(|e| e.into_inner());
    let mut out = Cow::Borrowed(text);
    for secret in known.iter() {
        if out.contains(secret.as_str()) {
            out = Cow::Owned(out.replace(secret.as_str(), REDACTED));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_printed() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "*** ***");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn registered_values_are_redacted_from_any_text() {
        register("pw-marker-123");
        register("pw-marker-123-longer");
        register("abc");
        let text = "bad value \"pw-marker-123-longer\" and pw-marker-123 for abc";
        assert_eq!(redact(text), "bad value \"***\" and *** for abc");
        assert!(matches!(redact("nothing here"), Cow::Borrowed(_)));
    }
}

//! Reading the config: YAML text, then `PGFERRY_…` environment overrides, then typed
//! deserialization that records the key path of any error, then validation and secrets.

use std::path::{Path, PathBuf};

use serde_yaml_ng::{Mapping, Value};

use super::Config;

/// Prefix of environment overrides; `__` separates nesting levels.
pub const ENV_PREFIX: &str = "PGFERRY_";

/// The config could not be used. Every variant names where the problem is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The YAML did not parse.
    #[error("config is not valid YAML")]
    Syntax(#[source] serde_yaml_ng::Error),
    /// A key is unknown, missing, of the wrong type, or fails validation.
    #[error("config error at `{path}`: {message}")]
    Invalid {
        /// Key path such as `source.slot` or `kafka.properties`.
        path: String,
        /// What was expected.
        message: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Loads and validates a config file, with overrides from the process environment.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_owned(),
        source,
    })?;
    load_from_str(&text, std::env::vars())
}

/// Loads and validates config text, with overrides from the given environment.
pub fn load_from_str(
    text: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let mut root: Value = serde_yaml_ng::from_str(text).map_err(ConfigError::Syntax)?;
    if root.is_null() {
        root = Value::Mapping(Mapping::new());
    }
    let mut overrides: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    overrides.sort();
    for (var, value) in overrides {
        apply_override(&mut root, &var, &value)?;
    }
    let mut config: Config = serde_path_to_error::deserialize(root).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        ConfigError::invalid(
            if path == "." {
                "(top level)".into()
            } else {
                path
            },
            message,
        )
    })?;
    config.register_secrets();
    config.validate()?;
    config.resolve_secrets()?;
    Ok(config)
}

/// `PGFERRY_SOURCE__SLOT=x` sets `source.slot` to `x`. The value is inserted as a string,
/// verbatim: a password `~` or `0x1F` stays exactly that. Fields that are not strings
/// (numbers, booleans, lists) read a string as YAML themselves ([`super::de::lenient`]).
fn apply_override(root: &mut Value, var: &str, raw: &str) -> Result<(), ConfigError> {
    let path: Vec<String> = var[ENV_PREFIX.len()..]
        .split("__")
        .map(str::to_lowercase)
        .collect();
    if path.iter().any(String::is_empty) {
        return Err(ConfigError::invalid(
            var,
            "environment override has an empty key segment; use PGFERRY_SECTION__KEY",
        ));
    }
    let value = Value::String(raw.to_owned());
    let mut node = root;
    for (i, segment) in path.iter().enumerate() {
        let map = match node {
            Value::Mapping(m) => m,
            _ => {
                return Err(ConfigError::invalid(
                    path[..i].join("."),
                    format!("{var} overrides a key inside a value that is not a mapping"),
                ))
            }
        };
        let key = Value::String(segment.clone());
        if i + 1 == path.len() {
            map.insert(key, value);
            return Ok(());
        }
        node = map
            .entry(key)
            .or_insert_with(|| Value::Mapping(Mapping::new()));
        if node.is_null() {
            *node = Value::Mapping(Mapping::new());
        }
    }
    Ok(())
}

//! The source connection URL, parsed once by tokio-postgres and never printed with its password.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};
use tokio_postgres::config::Host;

/// A parsed libpq-style connection string (URL or `key=value` form).
#[derive(Clone)]
pub struct PgUrl {
    config: tokio_postgres::Config,
}

impl PgUrl {
    /// The parsed connection settings, including any password.
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// Replaces the password (from `password`, `password_file` or the environment).
    pub fn set_password(&mut self, password: &str) {
        self.config.password(password);
    }

    /// The database name, defaulting to the user name as libpq does.
    pub fn dbname(&self) -> &str {
        self.config
            .get_dbname()
            .or(self.config.get_user())
            .unwrap_or("postgres")
    }

    /// `host:port/db` for logs and messages; no credentials.
    pub fn display_target(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "localhost".to_owned(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        format!("{host}:{port}/{}", self.dbname())
    }
}

impl fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PgUrl({})", self.display_target())
    }
}

impl FromStr for PgUrl {
    type Err = tokio_postgres::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(PgUrl {
            config: tokio_postgres::Config::from_str(s)?,
        })
    }
}

impl<'de> Deserialize<'de> for PgUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = super::de::string(d)?;
        // The parser's message does not echo the input, so no password can leak through it.
        text.parse().map_err(|e| {
            serde::de::Error::custom(format_args!(
                "not a PostgreSQL connection URL (postgres://user@host:port/db): {e}"
            ))
        })
    }
}

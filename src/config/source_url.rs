//! A PostgreSQL connection string (source or target), parsed once (TLS parameters by
//! [`super::pg_tls`], the rest by tokio-postgres) and never printed with its password.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};
use tokio_postgres::config::Host;

use super::pg_tls::{self, PgTls, SslMode};

/// A parsed libpq-style connection string (URL or `key=value` form).
#[derive(Clone)]
pub struct PgUrl {
    config: tokio_postgres::Config,
    tls: PgTls,
}

impl PgUrl {
    /// The parsed connection settings, including any password.
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// `sslmode` and the certificate files.
    pub fn tls(&self) -> &PgTls {
        &self.tls
    }

    /// Registers the secrets this string holds (its password, `sslpassword`) for
    /// [`super::redact`].
    pub fn register_secrets(&self) {
        if let Some(password) = self.config.get_password() {
            super::register_secret(&String::from_utf8_lossy(password));
        }
        if let Some(password) = &self.tls.key_password {
            super::register_secret(password.expose());
        }
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

/// Why a connection string was refused; neither variant's message echoes the string.
#[derive(Debug, thiserror::Error)]
pub enum PgUrlError {
    /// A TLS parameter is wrong.
    #[error(transparent)]
    Tls(#[from] pg_tls::TlsParamError),
    /// tokio-postgres refused the rest.
    #[error(transparent)]
    Parse(#[from] tokio_postgres::Error),
}

impl FromStr for PgUrl {
    type Err = PgUrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (rest, tls) = pg_tls::split(s)?;
        let mut config = tokio_postgres::Config::from_str(&rest)?;
        // tokio-postgres's own mode only decides whether to ask for TLS; what to check is
        // crate::pg::tls's business. `allow` starts plain (crate::pg retries with TLS).
        config.ssl_mode(match tls.mode {
            SslMode::Disable | SslMode::Allow => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        });
        Ok(PgUrl { config, tls })
    }
}

impl<'de> Deserialize<'de> for PgUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = super::de::string(d)?;
        // Neither parser's message echoes the input, so no password can leak through it.
        text.parse().map_err(|e| {
            serde::de::Error::custom(format_args!(
                "not a PostgreSQL connection URL (postgres://user@host:port/db): {e}"
            ))
        })
    }
}

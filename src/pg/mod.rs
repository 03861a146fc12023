//! PostgreSQL connections, for every stage: SQL sessions ([`connect`]), the replication
//! transport ([`replication`]) and TLS for both ([`tls`]).
//!
//! Owns how pgferry reaches a database: the pinned session settings, `application_name`,
//! TLS with libpq's `sslmode` semantics, and authentication (tokio-postgres's for SQL, ours
//! for replication, both with SCRAM-SHA-256-PLUS channel binding over TLS). It does not own
//! what is said on the connection: catalog queries live in `source::catalog`, apply's in
//! `apply`.

pub mod replication;
pub mod tls;

use tokio_postgres::Client;

use crate::config::{PgUrl, SslMode};

/// Session settings that make every type's text output unambiguous for [`crate::value`].
/// SQL sessions and the replication session pin the same ones, so snapshot rows and streamed
/// rows render alike.
pub const PINNED_SESSION_SETTINGS: &[(&str, &str)] = &[
    ("DateStyle", "ISO"),
    ("TimeZone", "UTC"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
    // money's text depends on the locale; C gives one shape, `-$1,234.56`.
    ("lc_monetary", "C"),
];

/// The `options` startup parameter: the pinned settings, then any the user configured (later
/// `-c` settings win, so a user can still override one deliberately).
pub fn session_options(user_options: Option<&str>) -> String {
    let mut options: Vec<String> = PINNED_SESSION_SETTINGS
        .iter()
        .map(|(k, v)| format!("-c {k}={v}"))
        .collect();
    options.extend(user_options.map(str::to_owned));
    options.join(" ")
}

/// Opens a SQL session with the pinned settings, over TLS as `url`'s `sslmode` says.
/// `allow` tries without TLS first and, if that fails, once more with it (libpq's order).
pub async fn connect(url: &PgUrl, application_name: &str) -> Result<Client, tokio_postgres::Error> {
    let mut config = url.config().clone();
    let options = session_options(config.get_options());
    config.options(&options);
    config.application_name(application_name);
    let tls = tls::MakeConnector::new(url.tls());
    let (client, connection) = match config.connect(tls.clone()).await {
        Err(_) if url.tls().mode == SslMode::Allow => {
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
            config.connect(tls).await?
        }
        other => other?,
    };
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "PostgreSQL connection closed");
        }
    });
    Ok(client)
}

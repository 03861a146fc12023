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

/// Which end of a [`pipe_copy`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopySide {
    /// Reading the `COPY … TO STDOUT`.
    Out,
    /// Writing the `COPY … FROM STDIN` (or finishing it).
    In,
}

/// How much of a [`pipe_copy`] is gathered before it is passed on: the sending server sends a
/// message a row, and passing each on alone cost more CPU than the copy itself.
const PIPE_CHUNK: usize = 256 * 1024;

/// Streams a `COPY … TO STDOUT` of one session into a `COPY … FROM STDIN` of another, in
/// pieces of about [`PIPE_CHUNK`] bytes (all that is held). Returns the rows the receiving
/// side took.
pub async fn pipe_copy(
    reader: tokio_postgres::CopyOutStream,
    writer: tokio_postgres::CopyInSink<bytes::Bytes>,
) -> Result<u64, (CopySide, tokio_postgres::Error)> {
    use futures_util::{SinkExt, StreamExt};
    futures_util::pin_mut!(reader);
    futures_util::pin_mut!(writer);
    let mut piece = bytes::BytesMut::with_capacity(PIPE_CHUNK);
    while let Some(row) = reader.next().await {
        piece.extend_from_slice(&row.map_err(|e| (CopySide::Out, e))?);
        if piece.len() >= PIPE_CHUNK {
            let full = std::mem::replace(&mut piece, bytes::BytesMut::with_capacity(PIPE_CHUNK));
            writer
                .send(full.freeze())
                .await
                .map_err(|e| (CopySide::In, e))?;
        }
    }
    if !piece.is_empty() {
        writer
            .send(piece.freeze())
            .await
            .map_err(|e| (CopySide::In, e))?;
    }
    writer.finish().await.map_err(|e| (CopySide::In, e))
}

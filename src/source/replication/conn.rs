//! The replication connection: startup with `replication=database`, password / MD5 /
//! SCRAM-SHA-256 authentication, simple queries, and the CopyBoth stream.
//!
//! Built on `postgres-protocol` for frontend framing and SCRAM, with our own backend framing
//! ([`super::wire`]). TLS is not implemented here yet: `sslmode=require` is refused with a
//! clear error instead of silently connecting in plain text.

use std::io;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::error::SqlState;

use super::wire::{self, AuthRequest, Backend, ReplicationMessage, ServerNotice, WireError};
use crate::error::{classify_sqlstate, Classify, ErrorClass};
use crate::lsn::Lsn;
use crate::pgtime::PgTimestamp;

/// Session settings that make every type's text output unambiguous for [`crate::value`].
/// The snapshot session pins the same ones, so snapshot rows and streamed rows render alike.
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

/// Connection-level failures of the replication protocol.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// No configured host accepted the connection.
    #[error("cannot connect to {target}")]
    Connect {
        /// `host:port`.
        target: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("replication connection I/O failed")]
    Io(#[from] io::Error),
    /// The server closed the connection or ended the stream.
    #[error("server closed the replication connection")]
    Closed,
    /// The server reported an error.
    #[error("server error {}: {}{}", .notice.code, .notice.message,
            .notice.hint.as_ref().map(|h| format!(" (hint: {h})")).unwrap_or_default())]
    Server {
        /// The error fields.
        notice: ServerNotice,
    },
    /// The byte stream broke the protocol.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A message arrived that does not fit the current exchange.
    #[error("unexpected {got} from server during {during}")]
    Unexpected {
        /// What came.
        got: String,
        /// What we were doing.
        during: &'static str,
    },
    /// The server asked for an authentication method we do not implement.
    #[error("server requested unsupported authentication ({0}); use scram-sha-256, md5 or password in pg_hba.conf")]
    UnsupportedAuth(String),
    /// The server asked for a password and none is configured.
    #[error("server requires a password; set source.password, source.password_file or PGFERRY_SOURCE__PASSWORD")]
    PasswordRequired,
    /// SCRAM exchange failed.
    #[error("SCRAM authentication failed")]
    Scram(#[source] io::Error),
    /// TLS was required.
    #[error("sslmode=require is not supported on the replication connection yet; use sslmode=disable or prefer")]
    TlsUnsupported,
}

impl Classify for ReplicationError {
    fn class(&self) -> ErrorClass {
        match self {
            ReplicationError::Connect { .. }
            | ReplicationError::Io(_)
            | ReplicationError::Closed => ErrorClass::Transient,
            ReplicationError::Server { notice } => {
                classify_sqlstate(&SqlState::from_code(&notice.code))
            }
            _ => ErrorClass::Fatal,
        }
    }
}

trait Socket: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Socket for T {}

/// Rows of a simple query, every value in text form.
#[derive(Debug, Default)]
pub struct QueryResult {
    /// Column names.
    pub columns: Vec<String>,
    /// Rows.
    pub rows: Vec<Vec<Option<String>>>,
}

impl QueryResult {
    /// The value of `column` in the first row.
    pub fn first(&self, column: &str) -> Option<&str> {
        let idx = self.columns.iter().position(|c| c == column)?;
        self.rows.first()?.get(idx)?.as_deref()
    }
}

/// A walsender connection in database mode.
pub struct ReplicationConnection {
    socket: Box<dyn Socket>,
    inbound: BytesMut,
    outbound: BytesMut,
}

async fn open_socket(config: &tokio_postgres::Config) -> Result<Box<dyn Socket>, ReplicationError> {
    let timeout = config
        .get_connect_timeout()
        .copied()
        .unwrap_or(Duration::from_secs(30));
    let ports = config.get_ports();
    let mut last = None;
    for (i, host) in config.get_hosts().iter().enumerate() {
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        let (target, attempt) = match host {
            Host::Tcp(h) => {
                let target = format!("{h}:{port}");
                let connect = TcpStream::connect(target.clone());
                let r = tokio::time::timeout(timeout, connect).await.map(|r| {
                    r.map(|s| {
                        let _ = s.set_nodelay(true);
                        Box::new(s) as Box<dyn Socket>
                    })
                });
                (target, r)
            }
            #[cfg(unix)]
            Host::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                let connect = tokio::net::UnixStream::connect(path.clone());
                let r = tokio::time::timeout(timeout, connect)
                    .await
                    .map(|r| r.map(|s| Box::new(s) as Box<dyn Socket>));
                (path.display().to_string(), r)
            }
        };
        match attempt {
            Ok(Ok(socket)) => return Ok(socket),
            Ok(Err(source)) => last = Some(ReplicationError::Connect { target, source }),
            Err(_) => {
                last = Some(ReplicationError::Connect {
                    target,
                    source: io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
                })
            }
        }
    }
    Err(last.unwrap_or(ReplicationError::Connect {
        target: "(no host configured)".into(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "no host in source.url"),
    }))
}

impl ReplicationConnection {
    /// Connects and authenticates as a logical replication client.
    pub async fn connect(
        config: &tokio_postgres::Config,
        application_name: &str,
    ) -> Result<Self, ReplicationError> {
        if config.get_ssl_mode() == SslMode::Require {
            return Err(ReplicationError::TlsUnsupported);
        }
        let mut conn = ReplicationConnection {
            socket: open_socket(config).await?,
            inbound: BytesMut::with_capacity(64 * 1024),
            outbound: BytesMut::with_capacity(1024),
        };
        let user = config.get_user().unwrap_or("postgres").to_owned();
        let dbname = config.get_dbname().unwrap_or(&user).to_owned();
        let options = session_options(config.get_options());
        let params = [
            ("user", user.as_str()),
            ("database", dbname.as_str()),
            ("replication", "database"),
            ("application_name", application_name),
            ("client_encoding", "UTF8"),
            ("options", options.as_str()),
        ];
        frontend::startup_message(params.iter().copied(), &mut conn.outbound)?;
        conn.flush().await?;
        conn.authenticate(&user, config.get_password()).await?;
        Ok(conn)
    }

    async fn flush(&mut self) -> Result<(), ReplicationError> {
        self.socket.write_all(&self.outbound).await?;
        self.socket.flush().await?;
        self.outbound.clear();
        Ok(())
    }

    /// Reads the next backend message. Cancel-safe: partial frames stay buffered.
    async fn next(&mut self) -> Result<Backend, ReplicationError> {
        loop {
            if let Some(msg) = wire::parse_backend(&mut self.inbound)? {
                return Ok(msg);
            }
            if self.socket.read_buf(&mut self.inbound).await? == 0 {
                return Err(ReplicationError::Closed);
            }
        }
    }

    async fn authenticate(
        &mut self,
        user: &str,
        password: Option<&[u8]>,
    ) -> Result<(), ReplicationError> {
        let mut scram: Option<ScramSha256> = None;
        loop {
            match self.next().await? {
                Backend::Auth(AuthRequest::Ok) => {}
                Backend::Auth(AuthRequest::Cleartext) => {
                    let pw = password.ok_or(ReplicationError::PasswordRequired)?;
                    frontend::password_message(pw, &mut self.outbound)?;
                    self.flush().await?;
                }
                Backend::Auth(AuthRequest::Md5(salt)) => {
                    let pw = password.ok_or(ReplicationError::PasswordRequired)?;
                    let hash =
                        postgres_protocol::authentication::md5_hash(user.as_bytes(), pw, salt);
                    frontend::password_message(hash.as_bytes(), &mut self.outbound)?;
                    self.flush().await?;
                }
                Backend::Auth(AuthRequest::Sasl(mechanisms)) => {
                    let pw = password.ok_or(ReplicationError::PasswordRequired)?;
                    if !mechanisms.iter().any(|m| m == "SCRAM-SHA-256") {
                        return Err(ReplicationError::UnsupportedAuth(mechanisms.join(",")));
                    }
                    let s = ScramSha256::new(pw, ChannelBinding::unsupported());
                    frontend::sasl_initial_response(
                        "SCRAM-SHA-256",
                        s.message(),
                        &mut self.outbound,
                    )?;
                    self.flush().await?;
                    scram = Some(s);
                }
                Backend::Auth(AuthRequest::SaslContinue(data)) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| unexpected("SASL continue", "authentication"))?;
                    s.update(&data).map_err(ReplicationError::Scram)?;
                    frontend::sasl_response(s.message(), &mut self.outbound)?;
                    self.flush().await?;
                }
                Backend::Auth(AuthRequest::SaslFinal(data)) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| unexpected("SASL final", "authentication"))?;
                    s.finish(&data).map_err(ReplicationError::Scram)?;
                }
                Backend::Auth(AuthRequest::Unsupported(code)) => {
                    return Err(ReplicationError::UnsupportedAuth(format!("method {code}")))
                }
                Backend::Error(notice) => return Err(ReplicationError::Server { notice }),
                Backend::ReadyForQuery => return Ok(()),
                Backend::Notice(_) | Backend::Ignored(_) => {}
                other => return Err(unexpected(&format!("{other:?}"), "authentication")),
            }
        }
    }

    /// Runs a replication command or query and collects its rows.
    pub async fn simple_query(&mut self, sql: &str) -> Result<QueryResult, ReplicationError> {
        frontend::query(sql, &mut self.outbound)?;
        self.flush().await?;
        let mut result = QueryResult::default();
        let mut error = None;
        loop {
            match self.next().await? {
                Backend::RowDescription(cols) => result.columns = cols,
                Backend::DataRow(row) => result.rows.push(row),
                Backend::Error(notice) => error = Some(ReplicationError::Server { notice }),
                Backend::ReadyForQuery => return error.map_or(Ok(result), Err),
                Backend::CommandComplete | Backend::Notice(_) | Backend::Ignored(_) => {}
                other => return Err(unexpected(&format!("{other:?}"), "a simple query")),
            }
        }
    }

    /// Enters CopyBoth mode with `START_REPLICATION`; the command text is built by the caller
    /// from validated names.
    pub async fn start_replication(&mut self, command: &str) -> Result<(), ReplicationError> {
        frontend::query(command, &mut self.outbound)?;
        self.flush().await?;
        loop {
            match self.next().await? {
                Backend::CopyBothResponse => return Ok(()),
                Backend::Error(notice) => return Err(ReplicationError::Server { notice }),
                Backend::Notice(_) | Backend::Ignored(_) => {}
                other => return Err(unexpected(&format!("{other:?}"), "START_REPLICATION")),
            }
        }
    }

    /// The next replication message. Cancel-safe, so it can sit in a `select!` beside timers.
    pub async fn recv(&mut self) -> Result<ReplicationMessage, ReplicationError> {
        loop {
            match self.next().await? {
                Backend::CopyData(body) => return Ok(wire::parse_replication(body)?),
                Backend::Error(notice) => return Err(ReplicationError::Server { notice }),
                Backend::CopyDone => return Err(ReplicationError::Closed),
                Backend::Notice(n) => {
                    tracing::info!(code = %n.code, message = %n.message, "server notice")
                }
                _ => {}
            }
        }
    }

    /// Sends a standby status update; `flushed` becomes the slot's confirmed_flush_lsn.
    pub async fn send_status(
        &mut self,
        received: Lsn,
        flushed: Lsn,
        reply_requested: bool,
    ) -> Result<(), ReplicationError> {
        let payload: Bytes =
            wire::standby_status(received, flushed, PgTimestamp::now(), reply_requested);
        self.outbound.put_u8(b'd');
        self.outbound.put_i32(payload.len() as i32 + 4);
        self.outbound.put_slice(&payload);
        self.flush().await
    }

    /// Says goodbye politely; errors are irrelevant at this point.
    pub async fn terminate(mut self) {
        frontend::terminate(&mut self.outbound);
        let _ = self.flush().await;
    }
}

fn unexpected(got: &str, during: &'static str) -> ReplicationError {
    ReplicationError::Unexpected {
        got: got.to_owned(),
        during,
    }
}

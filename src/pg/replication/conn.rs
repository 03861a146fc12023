//! The replication connection: startup with `replication=database`, password / MD5 /
//! SCRAM-SHA-256 authentication, simple queries, and the CopyBoth stream.
//!
//! Built on `postgres-protocol` for frontend framing and SCRAM, with our own backend framing
//! ([`super::wire`]). TLS follows the connection string's `sslmode` exactly as SQL sessions
//! do ([`crate::pg::tls`]): `SSLRequest` (or, with `sslnegotiation=direct`, a handshake
//! straight away), and SCRAM-SHA-256-PLUS channel binding whenever TLS is on and the server
//! offers it. In the modes that require TLS, a server that refuses it gets no password.

use std::io;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::config::{ChannelBinding as BindingMode, Host, SslNegotiation};
use tokio_postgres::error::SqlState;

use super::wire::{self, AuthRequest, Backend, ReplicationMessage, ServerNotice, WireError};
use crate::config::{PgUrl, SslMode};
use crate::error::{classify_sqlstate, Classify, ErrorClass};
use crate::lsn::Lsn;
use crate::pg::session_options;
use crate::pg::tls::{self, TlsSetupError};
use crate::pgtime::PgTimestamp;

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
    /// The server does not do TLS and the mode requires it.
    #[error("the server does not accept TLS connections, and sslmode={0} requires TLS")]
    TlsRefused(&'static str),
    /// The TLS settings could not be used.
    #[error(transparent)]
    TlsSetup(#[from] TlsSetupError),
    /// The TLS handshake failed (certificate not trusted, wrong host name, …).
    #[error("TLS handshake with {host} failed")]
    TlsHandshake {
        /// The host name checked.
        host: String,
        /// OpenSSL's reason, naming the certificate problem.
        #[source]
        source: openssl::ssl::Error,
    },
    /// `sslnegotiation=direct` needs a mode that requires TLS.
    #[error("sslnegotiation=direct needs sslmode=require, verify-ca or verify-full")]
    DirectNeedsTls,
    /// `channel_binding=require` and the exchange could not bind to TLS.
    #[error("channel_binding=require, but the server offered no SCRAM-SHA-256-PLUS over TLS")]
    ChannelBindingRequired,
}

impl Classify for ReplicationError {
    fn class(&self) -> ErrorClass {
        match self {
            ReplicationError::Connect { .. }
            | ReplicationError::Io(_)
            | ReplicationError::Closed
            | ReplicationError::TlsHandshake { .. } => ErrorClass::Transient,
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
    /// `tls-server-end-point` of the TLS session, if there is one.
    channel_binding: Option<Vec<u8>>,
}

/// Whether one connection attempt asks for TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    Plain,
    /// TLS if the server accepts it.
    TlsIfOffered,
    /// TLS or fail.
    TlsOnly,
}

const SSL_REQUEST_CODE: i32 = 80_877_103;

/// Asks for TLS (`SSLRequest`, or directly) and does the handshake; `None` when the server
/// declines and `attempt` lets the connection go on in plain text.
async fn start_tls(
    mut socket: Box<dyn Socket>,
    host: &str,
    url: &PgUrl,
    attempt: Attempt,
) -> Result<(Box<dyn Socket>, Option<Vec<u8>>), ReplicationError> {
    if attempt == Attempt::Plain {
        return Ok((socket, None));
    }
    let direct = url.config().get_ssl_negotiation() == SslNegotiation::Direct;
    if direct && attempt != Attempt::TlsOnly {
        return Err(ReplicationError::DirectNeedsTls);
    }
    if !direct {
        let mut request = BytesMut::with_capacity(8);
        request.put_i32(8);
        request.put_i32(SSL_REQUEST_CODE);
        socket.write_all(&request).await?;
        socket.flush().await?;
        match socket.read_u8().await? {
            b'S' => {}
            b'N' if attempt == Attempt::TlsIfOffered => return Ok((socket, None)),
            b'N' => return Err(ReplicationError::TlsRefused(url.tls().mode.as_str())),
            // An 'E' here is a pre-7.4 server's error; anything else breaks the protocol.
            other => {
                return Err(unexpected(
                    &format!("byte {other:#04x}"),
                    "the SSLRequest answer",
                ))
            }
        }
    }
    let connector = tls::connector(url.tls())?;
    let ssl = tls::configure(&connector, url.tls())
        .and_then(|c| c.into_ssl(host))
        .map_err(TlsSetupError::from)?;
    let mut stream = tokio_openssl::SslStream::new(ssl, socket).map_err(TlsSetupError::from)?;
    std::pin::Pin::new(&mut stream)
        .connect()
        .await
        .map_err(|source| ReplicationError::TlsHandshake {
            host: host.to_owned(),
            source,
        })?;
    let binding = tls::server_end_point(stream.ssl());
    Ok((Box::new(stream), binding))
}

/// Connects to the first host that answers; returns the socket and the host name (what
/// `verify-full` checks the certificate against).
async fn open_socket(
    config: &tokio_postgres::Config,
) -> Result<(Box<dyn Socket>, String), ReplicationError> {
    let timeout = config
        .get_connect_timeout()
        .copied()
        .unwrap_or(Duration::from_secs(30));
    let ports = config.get_ports();
    let mut last = None;
    for (i, host) in config.get_hosts().iter().enumerate() {
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        let (target, name, attempt) = match host {
            Host::Tcp(h) => {
                let target = format!("{h}:{port}");
                let connect = TcpStream::connect(target.clone());
                let r = tokio::time::timeout(timeout, connect).await.map(|r| {
                    r.map(|s| {
                        let _ = s.set_nodelay(true);
                        Box::new(s) as Box<dyn Socket>
                    })
                });
                (target, h.clone(), r)
            }
            #[cfg(unix)]
            Host::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                let connect = tokio::net::UnixStream::connect(path.clone());
                let r = tokio::time::timeout(timeout, connect)
                    .await
                    .map(|r| r.map(|s| Box::new(s) as Box<dyn Socket>));
                (path.display().to_string(), "localhost".to_owned(), r)
            }
        };
        match attempt {
            Ok(Ok(socket)) => return Ok((socket, name)),
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
    /// Connects and authenticates as a logical replication client, over TLS as `url`'s
    /// `sslmode` says (`allow`: plain first, then TLS if the plain attempt fails).
    pub async fn connect(url: &PgUrl, application_name: &str) -> Result<Self, ReplicationError> {
        match url.tls().mode {
            SslMode::Disable => Self::connect_once(url, application_name, Attempt::Plain).await,
            SslMode::Allow => {
                match Self::connect_once(url, application_name, Attempt::Plain).await {
                    Ok(conn) => Ok(conn),
                    Err(_) => Self::connect_once(url, application_name, Attempt::TlsOnly).await,
                }
            }
            SslMode::Prefer => {
                Self::connect_once(url, application_name, Attempt::TlsIfOffered).await
            }
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                Self::connect_once(url, application_name, Attempt::TlsOnly).await
            }
        }
    }

    async fn connect_once(
        url: &PgUrl,
        application_name: &str,
        attempt: Attempt,
    ) -> Result<Self, ReplicationError> {
        let config = url.config();
        let (socket, host) = open_socket(config).await?;
        let (socket, channel_binding) = start_tls(socket, &host, url, attempt).await?;
        let mut conn = ReplicationConnection {
            socket,
            inbound: BytesMut::with_capacity(64 * 1024),
            outbound: BytesMut::with_capacity(1024),
            channel_binding,
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
        conn.authenticate(&user, config.get_password(), config.get_channel_binding())
            .await?;
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
        binding_mode: BindingMode,
    ) -> Result<(), ReplicationError> {
        let mut scram: Option<ScramSha256> = None;
        loop {
            let message = self.next().await?;
            // libpq's rule: with channel_binding=require, only a bound SCRAM exchange may
            // authenticate; a server asking for a plain password, or none, is refused.
            if binding_mode == BindingMode::Require
                && matches!(
                    message,
                    Backend::Auth(AuthRequest::Cleartext | AuthRequest::Md5(_) | AuthRequest::Ok)
                )
                && scram.is_none()
            {
                return Err(ReplicationError::ChannelBindingRequired);
            }
            match message {
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
                    let offered = |name: &str| mechanisms.iter().any(|m| m == name);
                    let (mechanism, binding) = match &self.channel_binding {
                        Some(data)
                            if binding_mode != BindingMode::Disable
                                && offered("SCRAM-SHA-256-PLUS") =>
                        {
                            (
                                "SCRAM-SHA-256-PLUS",
                                ChannelBinding::tls_server_end_point(data.clone()),
                            )
                        }
                        _ if binding_mode == BindingMode::Require => {
                            return Err(ReplicationError::ChannelBindingRequired)
                        }
                        // Over TLS without PLUS the client says it could have bound
                        // ("y"), so a server that strips PLUS from the list is detected.
                        Some(_)
                            if binding_mode != BindingMode::Disable && offered("SCRAM-SHA-256") =>
                        {
                            ("SCRAM-SHA-256", ChannelBinding::unrequested())
                        }
                        _ if offered("SCRAM-SHA-256") => {
                            ("SCRAM-SHA-256", ChannelBinding::unsupported())
                        }
                        _ => return Err(ReplicationError::UnsupportedAuth(mechanisms.join(","))),
                    };
                    let s = ScramSha256::new(pw, binding);
                    frontend::sasl_initial_response(mechanism, s.message(), &mut self.outbound)?;
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

    /// Creates temporary logical slot `slot` (pgoutput) exporting its snapshot; returns its
    /// consistent point and the snapshot's name. The snapshot can be imported (`SET
    /// TRANSACTION SNAPSHOT`) while this connection stays open and runs nothing else; the slot
    /// goes when it closes. A transaction whose commit record lies before the consistent point
    /// is in the snapshot, one at or after it is not (`pgferry join`, `pgferry seed`).
    pub async fn export_snapshot(&mut self, slot: &str) -> Result<(Lsn, String), ReplicationError> {
        let created = self
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput (SNAPSHOT 'export')",
                crate::sql::quote_ident(slot)
            ))
            .await?;
        let missing = |what: &str| ReplicationError::Unexpected {
            got: format!("an answer without {what}"),
            during: "CREATE_REPLICATION_SLOT",
        };
        let consistent = created
            .first("consistent_point")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| missing("a consistent point"))?;
        let snapshot = created
            .first("snapshot_name")
            .ok_or_else(|| missing("a snapshot name"))?
            .to_owned();
        Ok((consistent, snapshot))
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

//! TLS for every PostgreSQL connection, SQL and replication alike, with libpq's `sslmode`
//! semantics (see [`crate::config::PgTls`]).
//!
//! OpenSSL (built from source and linked statically, see Cargo.toml) because librdkafka needs
//! it anyway: one TLS library in the binary, so certificates, keys and trust stores behave
//! alike for Kafka and PostgreSQL, and the same PEM files libpq reads work here unchanged
//! (PKCS#1 and PKCS#8 keys, encrypted ones with `sslpassword`).
//!
//! Files are read on every connection, not once at start: a certificate rotated in a mounted
//! Kubernetes Secret is picked up by the next reconnect.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use openssl::error::ErrorStack;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::PKey;
use openssl::ssl::{
    ConnectConfiguration, SslConnector, SslFiletype, SslMethod, SslRef, SslVerifyMode,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::tls::MakeTlsConnect;

use crate::config::{PgTls, RootCert};

/// Where a TLS setting could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A certificate or key file could not be loaded.
    #[error("cannot load {what} {}", .path.display())]
    File {
        /// `sslrootcert`, `sslcert` or `sslkey`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// OpenSSL's reason.
        #[source]
        source: ErrorStack,
    },
    /// The key file could not be read.
    #[error("cannot read sslkey {}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The key file is readable by more than its owner (libpq's rule).
    #[error("sslkey {} has group or world access (mode {mode:o}): it must be u=rw (0600) or less, or u=rw,g=r (0640) or less when owned by root", .path.display())]
    KeyPermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file's metadata could not be read.
    #[error("cannot read sslkey {}", .path.display())]
    KeyMetadata {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `sslrootcert=system` and no trust store was found.
    #[error("sslrootcert=system: no system trust store found (set SSL_CERT_FILE, or give sslrootcert a CA file)")]
    NoSystemStore,
    /// OpenSSL refused the configuration.
    #[error("TLS setup failed")]
    OpenSsl(#[from] ErrorStack),
}

/// The system trust stores of the common distributions, tried in order after `SSL_CERT_FILE`
/// (the statically linked OpenSSL has no distribution's default path compiled in).
const SYSTEM_STORES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
];

fn system_store() -> Option<PathBuf> {
    std::env::var_os("SSL_CERT_FILE")
        .map(PathBuf::from)
        .into_iter()
        .chain(SYSTEM_STORES.iter().map(PathBuf::from))
        .find(|p| p.is_file())
}

fn file_error(what: &'static str, path: &Path) -> impl FnOnce(ErrorStack) -> TlsSetupError {
    let path = path.to_owned();
    move |source| TlsSetupError::File { what, path, source }
}

/// The connector for one connection attempt, from the files named in `tls` (read again for
/// each attempt, as libpq does, so rotated certificates are picked up). Without files and
/// without chain verification (`prefer`, `require`) every attempt's connector is the same;
/// that one is built once per process, since building one loads the system's CA bundle
/// (~15 ms of CPU, in `SslConnector::builder`), and SQL sessions build theirs before the
/// server says whether it speaks TLS at all.
pub fn connector(tls: &PgTls) -> Result<SslConnector, TlsSetupError> {
    static WITHOUT_FILES: OnceLock<SslConnector> = OnceLock::new();
    let without_files =
        tls.root_cert.is_none() && tls.client_cert.is_none() && !tls.verifies_chain();
    if !without_files {
        return build(tls);
    }
    if let Some(connector) = WITHOUT_FILES.get() {
        return Ok(connector.clone());
    }
    let connector = build(tls)?;
    Ok(WITHOUT_FILES.get_or_init(|| connector).clone())
}

fn build(tls: &PgTls) -> Result<SslConnector, TlsSetupError> {
    let mut builder = SslConnector::builder(SslMethod::tls_client())?;
    // libpq 17 always offers ALPN `postgresql`; PostgreSQL 17+ requires it for
    // sslnegotiation=direct and older servers ignore it.
    postgres_openssl::set_postgresql_alpn(&mut builder)?;
    match &tls.root_cert {
        Some(RootCert::File(path)) => builder
            .set_ca_file(path)
            .map_err(file_error("sslrootcert", path))?,
        Some(RootCert::System) => {
            let path = system_store().ok_or(TlsSetupError::NoSystemStore)?;
            builder
                .set_ca_file(&path)
                .map_err(file_error("sslrootcert=system", &path))?
        }
        None => {}
    }
    builder.set_verify(if tls.verifies_chain() {
        SslVerifyMode::PEER
    } else {
        SslVerifyMode::NONE
    });
    if let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) {
        check_key_permissions(key)?;
        builder
            .set_certificate_chain_file(cert)
            .map_err(file_error("sslcert", cert))?;
        match &tls.key_password {
            Some(password) => {
                let pem = std::fs::read(key).map_err(|source| TlsSetupError::Read {
                    path: key.clone(),
                    source,
                })?;
                let pkey =
                    PKey::private_key_from_pem_passphrase(&pem, password.expose().as_bytes())
                        .map_err(file_error("sslkey", key))?;
                builder.set_private_key(&pkey)?;
            }
            None => builder
                .set_private_key_file(key, SslFiletype::PEM)
                .map_err(file_error("sslkey", key))?,
        }
        builder
            .check_private_key()
            .map_err(file_error("sslkey (does it match sslcert?)", key))?;
    }
    Ok(builder.build())
}

/// libpq's rule for private key files: no group or world access, except group read when root
/// owns the file (as Kubernetes mounts a Secret with `defaultMode: 0440`). Symlinks are
/// followed, as Secret mounts use them.
fn check_key_permissions(path: &Path) -> Result<(), TlsSetupError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|source| TlsSetupError::KeyMetadata {
        path: path.to_owned(),
        source,
    })?;
    if key_mode_allowed(meta.mode(), meta.uid()) {
        Ok(())
    } else {
        Err(TlsSetupError::KeyPermissions {
            path: path.to_owned(),
            mode: meta.mode() & 0o777,
        })
    }
}

/// Whether a key file with these mode bits and owner passes libpq's check.
fn key_mode_allowed(mode: u32, owner_uid: u32) -> bool {
    let forbidden = if owner_uid == 0 { 0o037 } else { 0o077 };
    mode & forbidden == 0
}

/// The per-connection settings: host name checking only in `verify-full`.
pub fn configure(
    connector: &SslConnector,
    tls: &PgTls,
) -> Result<ConnectConfiguration, ErrorStack> {
    let mut config = connector.configure()?;
    config.set_verify_hostname(tls.verifies_host());
    Ok(config)
}

/// The `tls-server-end-point` channel binding (RFC 5929) of a finished handshake: the server
/// certificate's hash, with SHA-256 standing in for MD5 and SHA-1. SCRAM-SHA-256-PLUS binds
/// the authentication to it, so a man in the middle holding another certificate cannot relay
/// the exchange.
pub fn server_end_point(ssl: &SslRef) -> Option<Vec<u8>> {
    let cert = ssl.peer_certificate()?;
    let algorithms = cert
        .signature_algorithm()
        .object()
        .nid()
        .signature_algorithms()?;
    let digest = match algorithms.digest {
        Nid::MD5 | Nid::SHA1 => MessageDigest::sha256(),
        nid => MessageDigest::from_nid(nid)?,
    };
    cert.digest(digest).ok().map(|d| d.to_vec())
}

/// tokio-postgres's hook for SQL connections: builds the connector when tokio-postgres asks
/// for TLS (never in `disable`), so a file problem surfaces as that connection's TLS error.
#[derive(Clone)]
pub struct MakeConnector {
    tls: PgTls,
}

impl MakeConnector {
    /// For the settings of one connection string.
    pub fn new(tls: &PgTls) -> Self {
        MakeConnector { tls: tls.clone() }
    }
}

impl fmt::Debug for MakeConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MakeConnector")
            .field("tls", &self.tls)
            .finish()
    }
}

impl<S> MakeTlsConnect<S> for MakeConnector
where
    S: AsyncRead + AsyncWrite + Unpin + fmt::Debug + 'static + Sync + Send,
{
    type Stream = postgres_openssl::TlsStream<S>;
    type TlsConnect = postgres_openssl::TlsConnector;
    type Error = TlsSetupError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Self::TlsConnect, TlsSetupError> {
        let connector = connector(&self.tls)?;
        let config = configure(&connector, &self.tls)?;
        Ok(postgres_openssl::TlsConnector::new(config, domain))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_permissions_follow_libpq() {
        assert!(key_mode_allowed(0o100600, 1000));
        assert!(key_mode_allowed(0o100400, 1000));
        assert!(!key_mode_allowed(0o100640, 1000));
        assert!(!key_mode_allowed(0o100604, 1000));
        // Owned by root: group read is fine (Kubernetes Secret mounts), more is not.
        assert!(key_mode_allowed(0o100640, 0));
        assert!(key_mode_allowed(0o100440, 0));
        assert!(!key_mode_allowed(0o100660, 0));
        assert!(!key_mode_allowed(0o100644, 0));
    }

    #[test]
    fn a_world_readable_key_is_refused_by_name() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("client.key");
        std::fs::write(&key, "not a key").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = check_key_permissions(&key).unwrap_err();
        assert!(
            err.to_string().contains("group or world access (mode 644)"),
            "{err}"
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(check_key_permissions(&key).is_ok());
    }
}

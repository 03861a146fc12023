//! libpq's TLS parameters in a connection string: `sslmode`, `sslrootcert`, `sslcert`,
//! `sslkey` and `sslpassword`, parsed here because tokio-postgres knows only three of the six
//! modes and none of the file parameters. Pure: [`split`] takes them out of the string (the
//! rest goes to tokio-postgres unchanged, `sslnegotiation` and `channel_binding` included) and
//! [`PgTls`] holds them; `crate::pg::tls` turns them into an OpenSSL connector.

use std::fmt;
use std::path::PathBuf;

/// libpq's `sslmode`, with libpq's meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// Plain first; TLS only if the server refuses the plain connection.
    Allow,
    /// TLS if the server offers it, plain otherwise (libpq's default).
    #[default]
    Prefer,
    /// TLS or nothing. Like libpq, the server certificate is checked against `sslrootcert`
    /// when one is given (then this is `VerifyCa`), and not checked otherwise.
    Require,
    /// TLS, and the server certificate must chain to `sslrootcert`.
    VerifyCa,
    /// `VerifyCa`, and the certificate must name the host connected to.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Option<SslMode> {
        Some(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// Whether the connection fails rather than go without TLS: no password is ever sent in
    /// clear in these modes.
    pub fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }

    /// libpq's name.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Where trusted CA certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// A PEM file of CA certificates.
    File(PathBuf),
    /// `sslrootcert=system`: the operating system's trust store (PostgreSQL 16's libpq
    /// meaning; it implies `verify-full`).
    System,
}

/// The TLS half of a PostgreSQL connection string.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PgTls {
    /// `sslmode`.
    pub mode: SslMode,
    /// `sslrootcert`.
    pub root_cert: Option<RootCert>,
    /// `sslcert`: the client certificate (PEM).
    pub client_cert: Option<PathBuf>,
    /// `sslkey`: its private key (PEM).
    pub client_key: Option<PathBuf>,
    /// `sslpassword`: the passphrase of an encrypted `sslkey`.
    pub key_password: Option<super::Secret>,
}

impl fmt::Debug for PgTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTls")
            .field("mode", &self.mode)
            .field("root_cert", &self.root_cert)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key)
            .field("key_password", &self.key_password.as_ref().map(|_| "***"))
            .finish()
    }
}

impl PgTls {
    /// Whether the server's certificate chain is checked (`verify-ca`, `verify-full`, or
    /// `require`/`prefer`/`allow` with a root certificate, as libpq does).
    pub fn verifies_chain(&self) -> bool {
        matches!(self.mode, SslMode::VerifyCa | SslMode::VerifyFull) || self.root_cert.is_some()
    }

    /// Whether the certificate must name the host.
    pub fn verifies_host(&self) -> bool {
        self.mode == SslMode::VerifyFull
    }
}

/// A TLS parameter that cannot be used; the message names it and never echoes other parts
/// of the connection string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsParamError {
    /// `sslmode` has a value libpq does not know.
    #[error("sslmode={0} is not one of disable, allow, prefer, require, verify-ca, verify-full")]
    Mode(String),
    /// `sslcert` without `sslkey` or the other way round.
    #[error("sslcert and sslkey go together: give both or neither")]
    HalfClientCert,
    /// A verifying mode without anything to verify against.
    #[error("sslmode={0} needs sslrootcert (a CA file, or `system` for the system trust store)")]
    NoRootCert(&'static str),
    /// `sslrootcert=system` with a mode that would not check the host name.
    #[error("sslrootcert=system needs sslmode=verify-full (libpq refuses weaker modes with the public trust store)")]
    SystemNeedsVerifyFull,
    /// A TLS parameter libpq has that pgferry does not implement.
    #[error("{0} is not supported; supported TLS parameters: sslmode, sslrootcert, sslcert, sslkey, sslpassword, sslnegotiation, channel_binding")]
    Unsupported(String),
}

/// Splits a connection string (URL or `key=value` form) into the text tokio-postgres parses
/// and the TLS settings. An empty value counts as absent, as in libpq.
pub fn split(text: &str) -> Result<(String, PgTls), TlsParamError> {
    let mut tls = PgTls::default();
    let mut mode_given = false;
    let mut take = |key: &str, value: String| -> Result<bool, TlsParamError> {
        let value_path = || (!value.is_empty()).then(|| PathBuf::from(&value));
        match key {
            "sslmode" => {
                tls.mode =
                    SslMode::parse(&value).ok_or_else(|| TlsParamError::Mode(value.clone()))?;
                mode_given = true;
            }
            "sslrootcert" => {
                tls.root_cert = match value.as_str() {
                    "" => None,
                    "system" => Some(RootCert::System),
                    _ => value_path().map(RootCert::File),
                }
            }
            "sslcert" => tls.client_cert = value_path(),
            "sslkey" => tls.client_key = value_path(),
            "sslpassword" => {
                tls.key_password = (!value.is_empty()).then(|| super::Secret::new(value.clone()))
            }
            "sslcrl"
            | "sslcrldir"
            | "sslsni"
            | "sslcompression"
            | "ssl_min_protocol_version"
            | "ssl_max_protocol_version"
            | "sslcertmode"
            | "requirepeer"
            | "gssencmode" => return Err(TlsParamError::Unsupported(key.to_owned())),
            _ => return Ok(false),
        }
        Ok(true)
    };
    let rest = if let Some(query_at) = url_query_start(text) {
        let (base, query) = text.split_at(query_at);
        let mut kept = Vec::new();
        for pair in query[1..].split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if !take(&percent_decode(k), percent_decode(v))? {
                kept.push(pair);
            }
        }
        if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        }
    } else if is_url(text) {
        text.to_owned()
    } else {
        let mut kept = Vec::new();
        for (k, v, raw) in key_values(text) {
            if !take(&k, v)? {
                kept.push(raw);
            }
        }
        kept.join(" ")
    };
    if tls.root_cert == Some(RootCert::System) {
        if !mode_given {
            tls.mode = SslMode::VerifyFull;
        } else if tls.mode != SslMode::VerifyFull {
            return Err(TlsParamError::SystemNeedsVerifyFull);
        }
    }
    if matches!(tls.mode, SslMode::VerifyCa | SslMode::VerifyFull) && tls.root_cert.is_none() {
        return Err(TlsParamError::NoRootCert(tls.mode.as_str()));
    }
    if tls.client_cert.is_some() != tls.client_key.is_some() {
        return Err(TlsParamError::HalfClientCert);
    }
    Ok((rest, tls))
}

fn is_url(text: &str) -> bool {
    text.starts_with("postgres://") || text.starts_with("postgresql://")
}

fn url_query_start(text: &str) -> Option<usize> {
    is_url(text).then(|| text.find('?')).flatten()
}

/// `%XX` decoding as libpq does for URL parameters; a malformed escape is kept as it is
/// (tokio-postgres reports the string if that makes it invalid).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// libpq's `key = value` syntax: values may be single-quoted with `\'` and `\\` escapes.
/// Yields (key, unquoted value, the original text of the pair).
fn key_values(text: &str) -> Vec<(String, String, &str)> {
    let mut out = Vec::new();
    let mut chars = text.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else {
            break;
        };
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        if chars.next_if(|(_, c)| *c == '=').is_none() {
            // Not a pair: leave it to tokio-postgres to report.
            let end = chars.peek().map_or(text.len(), |(i, _)| *i);
            out.push((String::new(), String::new(), &text[start..end.max(start)]));
            if end == start {
                chars.next();
            }
            continue;
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if(|(_, c)| *c == '\'').is_some() {
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next().map(|(_, c)| c)),
                    '\'' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some((_, c)) = chars.next_if(|(_, c)| !c.is_whitespace()) {
                match c {
                    '\\' => value.extend(chars.next().map(|(_, c)| c)),
                    c => value.push(c),
                }
            }
        }
        let end = chars.peek().map_or(text.len(), |(i, _)| *i);
        out.push((key, value, &text[start..end]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parameters_are_taken_out_and_the_rest_kept() {
        let (rest, tls) = split(
            "postgres://u:p@db.example.com:5432/app?sslmode=verify-full&sslrootcert=/ca%20dir/ca.crt&application_name=x&channel_binding=require",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgres://u:p@db.example.com:5432/app?application_name=x&channel_binding=require"
        );
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(tls.root_cert, Some(RootCert::File("/ca dir/ca.crt".into())));
        assert!(tls.verifies_chain() && tls.verifies_host());
    }

    #[test]
    fn key_value_form_with_quotes() {
        let (rest, tls) = split(
            "host=h port=5 sslmode = require sslcert='/a b/c.crt' sslkey=/k\\ ey sslpassword='it\\'s' dbname=d",
        )
        .unwrap();
        assert_eq!(rest, "host=h port=5 dbname=d");
        assert_eq!(tls.mode, SslMode::Require);
        assert_eq!(tls.client_cert, Some("/a b/c.crt".into()));
        assert_eq!(tls.client_key, Some("/k ey".into()));
        assert_eq!(tls.key_password.as_ref().unwrap().expose(), "it's");
        assert!(!tls.verifies_chain());
    }

    #[test]
    fn defaults_and_libpq_rules() {
        let (rest, tls) = split("postgres://h/d").unwrap();
        assert_eq!(
            (rest.as_str(), tls.mode),
            ("postgres://h/d", SslMode::Prefer)
        );
        let (_, tls) = split("postgres://h/d?sslrootcert=system").unwrap();
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(
            split("postgres://h/d?sslrootcert=system&sslmode=require").unwrap_err(),
            TlsParamError::SystemNeedsVerifyFull
        );
        assert_eq!(
            split("postgres://h/d?sslmode=verify-ca").unwrap_err(),
            TlsParamError::NoRootCert("verify-ca")
        );
        assert_eq!(
            split("host=h sslcert=/c").unwrap_err(),
            TlsParamError::HalfClientCert
        );
        assert!(matches!(
            split("postgres://h/d?sslmode=verify_full"),
            Err(TlsParamError::Mode(m)) if m == "verify_full"
        ));
        assert!(matches!(
            split("postgres://h/d?sslcrl=/x"),
            Err(TlsParamError::Unsupported(k)) if k == "sslcrl"
        ));
        // require with a root certificate verifies the chain, as libpq does.
        let (_, tls) = split("postgres://h/d?sslmode=require&sslrootcert=/ca").unwrap();
        assert!(tls.verifies_chain() && !tls.verifies_host());
    }

    proptest::proptest! {
        /// Whatever order and spelling the parameters come in, the TLS ones are taken out with
        /// their values, and every other parameter reaches tokio-postgres unchanged.
        #[test]
        fn tls_parameters_are_taken_out_and_the_rest_kept_verbatim(
            mode in proptest::sample::select(vec!["disable", "allow", "prefer", "require"]),
            cert in "[a-z/]{1,12}",
            others in proptest::collection::vec(("(application_name|connect_timeout|options)", "[a-z0-9]{1,8}"), 0..4),
            key_value_form in proptest::bool::ANY,
            order in proptest::collection::vec(0usize..100, 0..8),
        ) {
            let mut params: Vec<(String, String)> = vec![
                ("sslmode".into(), mode.to_owned()),
                ("sslcert".into(), format!("/c/{cert}")),
                ("sslkey".into(), format!("/k/{cert}")),
            ];
            params.extend(others.iter().map(|(k, v)| (k.clone(), v.clone())));
            for (i, j) in order.iter().enumerate() {
                let n = params.len();
                params.swap(i % n, j % n);
            }
            let text = if key_value_form {
                let pairs: Vec<String> = params.iter().map(|(k, v)| format!("{k}='{v}'")).collect();
                format!("host=h dbname=d {}", pairs.join(" "))
            } else {
                let pairs: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("postgres://u@h:5432/d?{}", pairs.join("&"))
            };
            let (rest, tls) = split(&text).unwrap();
            proptest::prop_assert_eq!(tls.mode.as_str(), mode);
            proptest::prop_assert_eq!(tls.client_cert, Some(PathBuf::from(format!("/c/{cert}"))));
            proptest::prop_assert_eq!(tls.client_key, Some(PathBuf::from(format!("/k/{cert}"))));
            proptest::prop_assert!(!rest.contains("sslmode") && !rest.contains("sslcert") && !rest.contains("sslkey"));
            for (k, v) in &others {
                proptest::prop_assert!(rest.contains(k.as_str()) && rest.contains(v.as_str()), "{} lost {}={}", rest, k, v);
            }
        }
    }

    #[test]
    fn debug_never_shows_the_key_password() {
        let (_, tls) = split("postgres://h/d?sslpassword=s3cr3tkey").unwrap();
        assert!(!format!("{tls:?}").contains("s3cr3tkey"));
    }
}

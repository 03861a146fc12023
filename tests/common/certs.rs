//! Test certificates, made with OpenSSL in-process: a CA, server certificates naming the
//! hosts they are for, client certificates whose CN is a role name, and a second, unrelated
//! CA for "wrong CA" cases. Written as PEM files into a directory every process can read.

use std::path::{Path, PathBuf};

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use openssl::symm::Cipher;
use openssl::x509::extension::{BasicConstraints, SubjectAlternativeName};
use openssl::x509::{X509NameBuilder, X509};

/// A certificate authority that signs test certificates.
pub struct Ca {
    cert: X509,
    key: PKey<Private>,
    /// The CA certificate (PEM).
    pub cert_path: PathBuf,
}

fn key() -> PKey<Private> {
    PKey::from_rsa(Rsa::generate(2048).expect("rsa")).expect("pkey")
}

fn build(
    cn: &str,
    key: &PKey<Private>,
    issuer: Option<(&X509, &PKey<Private>)>,
    dns: &[&str],
    ip: &[&str],
) -> X509 {
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", cn).unwrap();
    let name = name.build();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    let mut serial = BigNum::new().unwrap();
    serial.rand(64, MsbOption::MAYBE_ZERO, false).unwrap();
    b.set_serial_number(&serial.to_asn1_integer().unwrap())
        .unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_pubkey(key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(30).unwrap())
        .unwrap();
    match issuer {
        None => {
            b.set_issuer_name(&name).unwrap();
            b.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
                .unwrap();
            b.sign(key, MessageDigest::sha256()).unwrap();
        }
        Some((ca, ca_key)) => {
            b.set_issuer_name(ca.subject_name()).unwrap();
            if !dns.is_empty() || !ip.is_empty() {
                let mut san = SubjectAlternativeName::new();
                for d in dns {
                    san.dns(d);
                }
                for i in ip {
                    san.ip(i);
                }
                let ext = san.build(&b.x509v3_context(Some(ca), None)).unwrap();
                b.append_extension(ext).unwrap();
            }
            b.sign(ca_key, MessageDigest::sha256()).unwrap();
        }
    }
    b.build()
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

impl Ca {
    /// A new CA, its certificate written to `dir/<name>.crt`.
    pub fn new(dir: &Path, name: &str) -> Ca {
        let key = key();
        let cert = build(&format!("pgferry test CA {name}"), &key, None, &[], &[]);
        let cert_path = dir.join(format!("{name}.crt"));
        write(&cert_path, &cert.to_pem().unwrap());
        Ca {
            cert,
            key,
            cert_path,
        }
    }

    /// A certificate for `cn` with these DNS and IP subject alternative names, written to
    /// `dir/<file>.crt` and `dir/<file>.key` (mode 0600, unencrypted unless `passphrase`).
    pub fn issue(
        &self,
        dir: &Path,
        file: &str,
        cn: &str,
        dns: &[&str],
        ip: &[&str],
        passphrase: Option<&str>,
    ) -> (PathBuf, PathBuf) {
        let key = key();
        let cert = build(cn, &key, Some((&self.cert, &self.key)), dns, ip);
        let cert_path = dir.join(format!("{file}.crt"));
        let key_path = dir.join(format!("{file}.key"));
        write(&cert_path, &cert.to_pem().unwrap());
        let pem = match passphrase {
            Some(p) => key
                .private_key_to_pem_pkcs8_passphrase(Cipher::aes_256_cbc(), p.as_bytes())
                .unwrap(),
            None => key.private_key_to_pem_pkcs8().unwrap(),
        };
        write(&key_path, &pem);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        (cert_path, key_path)
    }
}

//! TLS for client listeners: a rustls server configuration from PEM files, optional client
//! certificate verification (mTLS), the client certificate's identity, and reloading the files
//! without dropping connections.
//!
//! A [`TlsReloader`] holds the current [`ServerConfig`]; every new handshake takes the config
//! current at that moment, so swapping it (on SIGHUP, or when a file's modification time
//! changes; see [`crate::reload`]) affects only connections that arrive afterwards. A reload
//! that fails (a missing file, a key that does not match the certificate) keeps the previous
//! config and logs why.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tiermq_common::config::CertIdentity;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig, ServerConnection};
use tokio_rustls::TlsAcceptor;
use tracing::info;

use crate::reload::{Attempted, FileStamp, Reload};

/// The PEM files of a TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates that client certificates must chain to; `None`: no client certificates.
    pub ca: Option<PathBuf>,
    /// With `ca`: refuse clients without a certificate (otherwise a certificate is verified
    /// when presented, and optional).
    pub require_client_cert: bool,
}

/// Why a TLS configuration could not be built; names the file at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError(pub String);

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsError {}

/// The crypto provider of every TLS listener (ring; the only one compiled in).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(tokio_rustls::rustls::crypto::ring::default_provider())
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path)
        .map_err(|e| TlsError(format!("cannot read {what} file {}: {e}", path.display())))
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            TlsError(format!(
                "invalid PEM in {what} file {}: {e}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "no certificate (-----BEGIN CERTIFICATE-----) in {what} file {}",
            path.display()
        )));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file(path, "private key")?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        TlsError(format!(
            "no usable private key in {} ({e}); PKCS#8, PKCS#1 and SEC1 PEM keys are accepted",
            path.display()
        ))
    })
}

/// Builds a server configuration from the files (read now).
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let certs = read_certs(&files.cert, "certificate")?;
    let key = read_key(&files.key)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(format!("TLS protocol versions: {e}")))?;
    let builder = match &files.ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca, "CA certificate")? {
                roots.add(cert).map_err(|e| {
                    TlsError(format!("unusable CA certificate in {}: {e}", ca.display()))
                })?;
            }
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            if !files.require_client_cert {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier
                .build()
                .map_err(|e| TlsError(format!("client verifier from {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(certs, key).map_err(|e| {
        TlsError(format!(
            "certificate {} and key {} do not make a usable pair: {e}",
            files.cert.display(),
            files.key.display()
        ))
    })?;
    Ok(Arc::new(config))
}

fn stamp(files: &TlsFiles) -> FileStamp {
    FileStamp::of(
        [&files.cert, &files.key]
            .into_iter()
            .chain(&files.ca)
            .map(PathBuf::as_path),
    )
}

/// A listener's TLS configuration that can be replaced while the listener runs.
pub struct TlsReloader {
    name: Arc<str>,
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
    /// The files as they were at the last load attempt.
    attempted: Attempted,
}

impl fmt::Debug for TlsReloader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsReloader")
            .field("name", &self.name)
            .field("files", &self.files)
            .finish()
    }
}

impl TlsReloader {
    /// Loads the files; fails (naming the file) when they do not make a configuration.
    pub fn load(name: Arc<str>, files: TlsFiles) -> Result<Arc<TlsReloader>, TlsError> {
        let attempted = Attempted::new(stamp(&files));
        let config = server_config(&files)?;
        Ok(Arc::new(TlsReloader {
            name,
            files,
            current: RwLock::new(config),
            attempted,
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// An acceptor with the configuration current now (for one handshake).
    pub fn acceptor(&self) -> TlsAcceptor {
        let config = match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        TlsAcceptor::from(config)
    }

    /// Reads the files again and, when they make a configuration, uses it for new handshakes.
    /// Existing connections keep theirs. On error the previous configuration stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        self.attempted.set(stamp(&self.files));
        let config = server_config(&self.files)?;
        match self.current.write() {
            Ok(mut c) => *c = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
        info!(listener = %self.name, cert = %self.files.cert.display(), "TLS certificate reloaded");
        Ok(())
    }
}

impl Reload for TlsReloader {
    fn what(&self) -> String {
        format!("TLS certificate of listener {}", self.name)
    }

    fn reload(&self) -> Result<(), String> {
        TlsReloader::reload(self).map_err(|e| e.0)
    }

    fn changed(&self) -> bool {
        self.attempted.differs(&stamp(&self.files))
    }
}

/// The identity of a verified client certificate: its subject Common Name, or else its first
/// Subject Alternative Name (DNS name, e-mail, URI or IP address). `None` without a client
/// certificate.
pub fn peer_identity(conn: &ServerConnection) -> Option<String> {
    let leaf = conn.peer_certificates()?.first()?;
    cert_identity(leaf.as_ref())
}

/// [`peer_identity`] of one DER certificate.
pub fn cert_identity(der: &[u8]) -> Option<String> {
    let (cn, extensions) = subject_cn_and_extensions(der)?;
    cn.or_else(|| der::first_san(extensions?, der::ANY_SAN))
}

/// The user name `use_identity_as_username` takes from a verified client certificate: the
/// subject CN, or the first SAN that is a DNS name or an e-mail address.
pub fn cert_username(der: &[u8], which: CertIdentity) -> Option<String> {
    let (cn, extensions) = subject_cn_and_extensions(der)?;
    match which {
        CertIdentity::Cn => cn,
        CertIdentity::San => der::first_san(extensions?, der::DNS_OR_EMAIL),
    }
}

/// [`cert_username`] of the connection's verified client certificate.
pub fn peer_username(conn: &ServerConnection, which: CertIdentity) -> Option<String> {
    let leaf = conn.peer_certificates()?.first()?;
    cert_username(leaf.as_ref(), which)
}

/// The subject's first CN and the `[3]` extensions block of a DER certificate.
fn subject_cn_and_extensions(der: &[u8]) -> Option<(Option<String>, Option<&[u8]>)> {
    let (cert, _) = der::expect(der, der::SEQUENCE)?;
    let (tbs, _) = der::expect(cert, der::SEQUENCE)?;
    let mut fields = der::Iter(tbs);
    let (first, _) = fields.next()?;
    if first == der::VERSION {
        let _serial = fields.next()?;
    }
    // (serial,) signature algorithm, issuer, validity, subject
    let _sig = fields.next()?;
    let _issuer = fields.next()?;
    let _validity = fields.next()?;
    let (tag, subject) = fields.next()?;
    if tag != der::SEQUENCE {
        return None;
    }
    // spki, then the optional [1], [2] unique ids and [3] extensions
    let extensions = fields
        .find(|(tag, _)| *tag == der::EXTENSIONS)
        .map(|(_, ext)| ext);
    Some((der::common_name(subject), extensions))
}

/// Just enough DER to find a certificate's subject CN and SAN. Bounds-checked throughout:
/// a malformed certificate yields `None`, never a panic.
mod der {
    pub const SEQUENCE: u8 = 0x30;
    pub const SET: u8 = 0x31;
    pub const OID: u8 = 0x06;
    pub const OCTET_STRING: u8 = 0x04;
    pub const BOOLEAN: u8 = 0x01;
    pub const VERSION: u8 = 0xA0;
    pub const EXTENSIONS: u8 = 0xA3;
    const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
    const OID_SAN: &[u8] = &[0x55, 0x1D, 0x11];

    /// One TLV: (tag, content, rest).
    pub fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let tag = *input.first()?;
        if tag & 0x1F == 0x1F {
            return None; // high tag numbers do not occur in what we read
        }
        let first = *input.get(1)?;
        let (len, header) = if first < 0x80 {
            (first as usize, 2)
        } else {
            let n = (first & 0x7F) as usize;
            if n == 0 || n > 4 {
                return None;
            }
            let mut len = 0usize;
            for i in 0..n {
                len = (len << 8) | *input.get(2 + i)? as usize;
            }
            (len, 2 + n)
        };
        let end = header.checked_add(len)?;
        let content = input.get(header..end)?;
        Some((tag, content, input.get(end..)?))
    }

    pub fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
        let (t, content, rest) = tlv(input)?;
        (t == tag).then_some((content, rest))
    }

    /// The TLVs of a constructed value's content.
    pub struct Iter<'a>(pub &'a [u8]);

    impl<'a> Iterator for Iter<'a> {
        type Item = (u8, &'a [u8]);
        fn next(&mut self) -> Option<Self::Item> {
            let (tag, content, rest) = tlv(self.0)?;
            self.0 = rest;
            Some((tag, content))
        }
    }

    fn string(tag: u8, content: &[u8]) -> Option<String> {
        match tag {
            // UTF8String, PrintableString, IA5String, TeletexString (read as UTF-8)
            0x0C | 0x13 | 0x16 | 0x14 => Some(String::from_utf8_lossy(content).into_owned()),
            // BMPString: UCS-2 big endian
            0x1E => {
                let units: Vec<u16> = content
                    .chunks_exact(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect();
                Some(String::from_utf16_lossy(&units))
            }
            _ => None,
        }
    }

    /// Name ::= SEQUENCE OF SET OF AttributeTypeAndValue; the first CN.
    pub fn common_name(name: &[u8]) -> Option<String> {
        for (tag, rdn) in Iter(name) {
            if tag != SET {
                continue;
            }
            for (tag, atv) in Iter(rdn) {
                if tag != SEQUENCE {
                    continue;
                }
                let mut parts = Iter(atv);
                let (t, oid) = parts.next()?;
                if t == OID && oid == OID_CN {
                    let (t, value) = parts.next()?;
                    if let Some(s) = string(t, value).filter(|s| !s.is_empty()) {
                        return Some(s);
                    }
                }
            }
        }
        None
    }

    /// SAN kinds: rfc822Name [1], dNSName [2], uniformResourceIdentifier [6], iPAddress [7].
    pub const ANY_SAN: &[u8] = &[0x81, 0x82, 0x86, 0x87];
    pub const DNS_OR_EMAIL: &[u8] = &[0x81, 0x82];

    /// `[3] { SEQUENCE OF Extension }`; the first name of subjectAltName of one of `kinds`.
    pub fn first_san(explicit: &[u8], kinds: &[u8]) -> Option<String> {
        let (exts, _) = expect(explicit, SEQUENCE)?;
        for (tag, ext) in Iter(exts) {
            if tag != SEQUENCE {
                continue;
            }
            let mut parts = Iter(ext);
            let (t, oid) = parts.next()?;
            if t != OID || oid != OID_SAN {
                continue;
            }
            let (mut t, mut value) = parts.next()?;
            if t == BOOLEAN {
                (t, value) = parts.next()?;
            }
            if t != OCTET_STRING {
                return None;
            }
            let (names, _) = expect(value, SEQUENCE)?;
            for (tag, name) in Iter(names) {
                if !kinds.contains(&tag) {
                    continue;
                }
                match tag {
                    // rfc822Name [1], dNSName [2], uniformResourceIdentifier [6]
                    0x81 | 0x82 | 0x86 => {
                        if let Ok(s) = std::str::from_utf8(name) {
                            return Some(s.to_string());
                        }
                    }
                    // iPAddress [7]
                    0x87 => {
                        if let Ok(v4) = <[u8; 4]>::try_from(name) {
                            return Some(std::net::Ipv4Addr::from(v4).to_string());
                        }
                        if let Ok(v6) = <[u8; 16]>::try_from(name) {
                            return Some(std::net::Ipv6Addr::from(v6).to_string());
                        }
                    }
                    _ => {}
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_der_is_no_identity() {
        assert_eq!(cert_identity(&[]), None);
        assert_eq!(cert_identity(&[0x30]), None);
        assert_eq!(cert_identity(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(cert_identity(&[0x30, 0x03, 0x30, 0x01]), None);
        let mut junk = vec![0x30, 0x82, 0x01, 0x00];
        junk.extend(std::iter::repeat_n(0x30, 256));
        assert_eq!(cert_identity(&junk), None);
    }

    fn cert(cn: Option<&str>, sans: &[&str]) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut p = rcgen::CertificateParams::new(sans).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "tiermq tests");
        if let Some(cn) = cn {
            p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        }
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn identity_is_the_common_name_else_the_first_san() {
        let der = cert(Some("device-42"), &["d42.example", "10.0.0.1"]);
        assert_eq!(cert_identity(&der).as_deref(), Some("device-42"));
        let der = cert(None, &["d43.example", "10.0.0.1"]);
        assert_eq!(cert_identity(&der).as_deref(), Some("d43.example"));
        let der = cert(None, &["10.0.0.7"]);
        assert_eq!(cert_identity(&der).as_deref(), Some("10.0.0.7"));
        assert_eq!(cert_identity(&cert(None, &[])), None);
        // use_identity_as_username: cn only, or the first DNS/e-mail SAN only.
        let der = cert(Some("device-44"), &["10.0.0.1", "d44.example"]);
        assert_eq!(
            cert_username(&der, CertIdentity::Cn).as_deref(),
            Some("device-44")
        );
        assert_eq!(
            cert_username(&der, CertIdentity::San).as_deref(),
            Some("d44.example")
        );
        let der = cert(None, &["10.0.0.1"]);
        assert_eq!(cert_username(&der, CertIdentity::Cn), None);
        assert_eq!(cert_username(&der, CertIdentity::San), None);
        // Truncations of a real certificate never panic.
        let der = cert(Some("x"), &["y"]);
        for n in 0..der.len() {
            let _ = cert_identity(&der[..n]);
        }
    }

    #[test]
    fn missing_files_are_named() {
        let files = TlsFiles {
            cert: "/nonexistent/tiermq-cert.pem".into(),
            key: "/nonexistent/tiermq-key.pem".into(),
            ca: None,
            require_client_cert: false,
        };
        let e = server_config(&files).unwrap_err();
        assert!(e.0.contains("/nonexistent/tiermq-cert.pem"), "{e}");
    }
}

//! TLS for the cluster's internal gRPC (frontend ↔ backend, backend ↔ backend).
//!
//! One cluster CA signs a certificate per node. With [`GrpcTls`] set, a backend's gRPC server
//! accepts only clients that present a certificate signed by that CA (mutual TLS), and every
//! client — frontends, peers, the CLI tools — presents its own and verifies the server's
//! against the same CA. So a host that can reach a gRPC port but holds no certificate of the
//! cluster can neither read the traffic nor issue a single call (a `Cluster` call would reveal
//! the members; an `Ops` stream could publish or take sessions over).
//!
//! The server's name is checked as browsers do: the host part of the address a client dials
//! (`backend1`, `127.0.0.1`) must be among the server certificate's subjectAltNames.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// How long a TLS handshake may take before the connection is dropped (server side) or the
/// attempt fails (client side). A port scanner that opens a connection and stays silent must
/// not hold a handshake slot for long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The cluster CA and this process's certificate and key, as PEM, loaded once.
#[derive(Clone)]
pub struct GrpcTls {
    inner: Arc<Loaded>,
}

struct Loaded {
    ca: Certificate,
    identity: Identity,
}

impl std::fmt::Debug for GrpcTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GrpcTls")
    }
}

/// A file of the TLS setting that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("cluster TLS: cannot use {what} {path}: {reason}")]
pub struct TlsFileError {
    pub what: &'static str,
    pub path: PathBuf,
    pub reason: String,
}

impl GrpcTls {
    /// Reads the CA certificate(s), this node's certificate chain (leaf first) and its key.
    /// The files are checked to hold PEM blocks of the right kind here, so a wrong path or
    /// file stops the start with its name instead of failing every later handshake.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<GrpcTls, TlsFileError> {
        let ca_pem = read_pem(ca, "CA file", "CERTIFICATE")?;
        let cert_pem = read_pem(cert, "certificate", "CERTIFICATE")?;
        let key_pem = read_pem(key, "key", "PRIVATE KEY")?;
        Ok(GrpcTls {
            inner: Arc::new(Loaded {
                ca: Certificate::from_pem(ca_pem),
                identity: Identity::from_pem(cert_pem, key_pem),
            }),
        })
    }

    /// The server side: this node's certificate, client certificates required and verified
    /// against the CA.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.inner.identity.clone())
            .client_ca_root(self.inner.ca.clone())
            .client_auth_optional(false)
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// The client side: trust only the CA, present this node's certificate.
    pub fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.inner.ca.clone())
            .identity(self.inner.identity.clone())
            .timeout(HANDSHAKE_TIMEOUT)
    }
}

/// Reads a PEM file and checks that it holds at least one block whose label ends in `label`
/// (`CERTIFICATE`; `PRIVATE KEY` also matches `RSA PRIVATE KEY` and `EC PRIVATE KEY`).
fn read_pem(path: &Path, what: &'static str, label: &str) -> Result<Vec<u8>, TlsFileError> {
    let error = |reason: String| TlsFileError {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| error(e.to_string()))?;
    let text = String::from_utf8_lossy(&bytes);
    let found = text.lines().any(|l| {
        l.strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
            .is_some_and(|l| l.ends_with(label))
    });
    if !found {
        return Err(error(format!("no PEM `{label}` block in it")));
    }
    Ok(bytes)
}

/// An endpoint for `host:port`: plain `http://` without `tls`, else `https://` with the
/// cluster CA and this node's certificate. Connect timeout 1 s, no Nagle.
pub fn endpoint(addr: &str, tls: Option<&GrpcTls>) -> Result<Endpoint, tonic::transport::Error> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.client_config())?;
    }
    Ok(endpoint)
}

//! `[[listeners]]`: the client listeners (TCP, TLS, WebSocket, secure WebSocket), and the flags
//! that add the common ones (`--tls-listen`, `--ws-listen`, `--wss-listen`).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;

/// What a client listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerKind {
    /// MQTT over TCP.
    Tcp,
    /// MQTT over TLS.
    Tls,
    /// MQTT over WebSocket (binary messages, subprotocol `mqtt`).
    Ws,
    /// MQTT over WebSocket over TLS.
    Wss,
}

impl ListenerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ListenerKind::Tcp => "tcp",
            ListenerKind::Tls => "tls",
            ListenerKind::Ws => "ws",
            ListenerKind::Wss => "wss",
        }
    }

    pub fn is_tls(self) -> bool {
        matches!(self, ListenerKind::Tls | ListenerKind::Wss)
    }

    pub fn is_websocket(self) -> bool {
        matches!(self, ListenerKind::Ws | ListenerKind::Wss)
    }
}

impl std::fmt::Display for ListenerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The WebSocket path unless configured.
pub const DEFAULT_WS_PATH: &str = "/mqtt";

/// Which name of a verified client certificate becomes the connection's user name
/// (`use_identity_as_username`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertIdentity {
    /// The subject's Common Name.
    Cn,
    /// The first Subject Alternative Name that is a DNS name or an e-mail address.
    San,
}

/// One client listener, as `[[listeners]]` spells it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSettings {
    /// Carried into every connection (logs; per-listener settings such as authentication
    /// will key on it). Default: `kind:address`, e.g. `tls:0.0.0.0:8883`.
    #[serde(default)]
    pub name: Option<String>,
    pub kind: ListenerKind,
    /// `host:port` to listen on.
    pub listen: SocketAddr,
    /// (tls, wss) PEM certificate chain, leaf first.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// (tls, wss) PEM private key.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// (tls, wss) PEM CA certificates that client certificates must chain to (mTLS).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// (tls, wss) Refuse clients without a valid certificate; needs `ca`. Default: true when
    /// `ca` is set.
    #[serde(default)]
    pub require_client_cert: Option<bool>,
    /// (ws, wss) The HTTP path of the upgrade request [default: /mqtt].
    #[serde(default)]
    pub path: Option<String>,
    /// ACL file for this listener's connections instead of `mqtt.acl_file`.
    #[serde(default)]
    pub acl_file: Option<PathBuf>,
    /// Open sockets on this listener; beyond it CONNACK 0x97 (3.1.1: 3). Unset: only
    /// `limits.max_connections` applies.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// (tls, wss with `ca`) The verified client certificate's `cn` or `san` is the user name;
    /// such clients need no password.
    #[serde(default)]
    pub use_identity_as_username: Option<CertIdentity>,
}

impl ListenerSettings {
    /// A listener of `kind` on `listen` with nothing else set.
    pub fn new(kind: ListenerKind, listen: SocketAddr) -> ListenerSettings {
        ListenerSettings {
            name: None,
            kind,
            listen,
            cert: None,
            key: None,
            ca: None,
            require_client_cert: None,
            path: None,
            acl_file: None,
            max_connections: None,
            use_identity_as_username: None,
        }
    }

    /// The configured name, or `kind:address`.
    pub fn name(&self) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None => format!("{}:{}", self.kind, self.listen),
        }
    }

    pub fn ws_path(&self) -> &str {
        self.path.as_deref().unwrap_or(DEFAULT_WS_PATH)
    }

    pub fn requires_client_cert(&self) -> bool {
        self.require_client_cert.unwrap_or(self.ca.is_some())
    }

    pub(super) fn check(&self, index: usize) -> Result<(), ConfigError> {
        let bad = |message: String| ConfigError::Invalid {
            name: "listeners",
            message: format!("listener {} ({}): {message}", index + 1, self.name()),
        };
        if self.kind.is_tls() {
            if self.cert.is_none() {
                return Err(bad(
                    "a TLS listener needs `cert` (PEM certificate chain)".into()
                ));
            }
            if self.key.is_none() {
                return Err(bad("a TLS listener needs `key` (PEM private key)".into()));
            }
            if self.require_client_cert == Some(true) && self.ca.is_none() {
                return Err(bad("`require_client_cert` needs `ca`".into()));
            }
        } else if self.cert.is_some()
            || self.key.is_some()
            || self.ca.is_some()
            || self.require_client_cert.is_some()
        {
            return Err(bad(format!(
                "`cert`, `key`, `ca` and `require_client_cert` are for kind tls or wss, not {}",
                self.kind
            )));
        }
        if let Some(path) = &self.path {
            if !self.kind.is_websocket() {
                return Err(bad(format!(
                    "`path` is for kind ws or wss, not {}",
                    self.kind
                )));
            }
            if !path.starts_with('/') || path.contains(char::is_whitespace) {
                return Err(bad(format!("`path` must start with `/`, got `{path}`")));
            }
        }
        if matches!(&self.name, Some(n) if n.trim().is_empty()) {
            return Err(bad("`name` must not be empty".into()));
        }
        if self.use_identity_as_username.is_some() && (!self.kind.is_tls() || self.ca.is_none()) {
            return Err(bad(
                "`use_identity_as_username` needs a tls or wss listener with `ca` (client certificates)".into(),
            ));
        }
        Ok(())
    }
}

/// Listeners by flag, added to the configured ones (the default TCP listener included); the
/// full form is `[[listeners]]` in the file. The TLS files go to the tls and wss listeners.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ListenerFlags {
    /// Also listen for MQTT over TLS on this `host:port` (needs --tls-cert, --tls-key).
    /// `[[listeners]]` in the config file gives the full form.
    #[arg(long, env = "TIERMQ_TLS_LISTEN")]
    pub tls_listen: Option<SocketAddr>,
    /// PEM certificate chain (leaf first) of --tls-listen / --wss-listen.
    #[arg(long = "tls-cert", env = "TIERMQ_TLS_CERT")]
    pub cert: Option<PathBuf>,
    /// PEM private key of --tls-listen / --wss-listen.
    #[arg(long = "tls-key", env = "TIERMQ_TLS_KEY")]
    pub key: Option<PathBuf>,
    /// PEM CA certificates: --tls-listen / --wss-listen then require client certificates
    /// signed by them (mTLS).
    #[arg(long = "tls-ca", env = "TIERMQ_TLS_CA")]
    pub ca: Option<PathBuf>,
    /// Also listen for MQTT over WebSocket on this `host:port` (path /mqtt).
    #[arg(long, env = "TIERMQ_WS_LISTEN")]
    pub ws_listen: Option<SocketAddr>,
    /// Also listen for MQTT over secure WebSocket on this `host:port` (path /mqtt, the
    /// --tls-cert/--tls-key files).
    #[arg(long, env = "TIERMQ_WSS_LISTEN")]
    pub wss_listen: Option<SocketAddr>,
}

impl ListenerFlags {
    /// The listeners the flags ask for.
    pub fn listeners(&self) -> Result<Vec<ListenerSettings>, ConfigError> {
        let tls = |kind, listen| ListenerSettings {
            cert: self.cert.clone(),
            key: self.key.clone(),
            ca: self.ca.clone(),
            ..ListenerSettings::new(kind, listen)
        };
        let mut out = Vec::new();
        if let Some(listen) = self.tls_listen {
            out.push(tls(ListenerKind::Tls, listen));
        }
        if let Some(listen) = self.ws_listen {
            out.push(ListenerSettings::new(ListenerKind::Ws, listen));
        }
        if let Some(listen) = self.wss_listen {
            out.push(tls(ListenerKind::Wss, listen));
        }
        let files_given = self.cert.is_some() || self.key.is_some() || self.ca.is_some();
        if files_given && self.tls_listen.is_none() && self.wss_listen.is_none() {
            return Err(ConfigError::Invalid {
                name: "tls",
                message: "--tls-cert/--tls-key/--tls-ca need --tls-listen or --wss-listen".into(),
            });
        }
        Ok(out)
    }
}

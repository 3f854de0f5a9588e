//! Configuration: defaults, a TOML file, environment variables and flags, in rising order of
//! precedence (a flag wins). Every setting has a default that works, so `tiermq standalone`
//! needs no file at all.
//!
//! This module holds the file format and the merge; the binary maps flags and `TIERMQ_*`
//! environment variables (through clap) onto [`Overrides`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Everything configurable, as the TOML file spells it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub mqtt: MqttSettings,
    pub storage: StorageSettings,
    pub session: SessionSettings,
    pub cluster: ClusterSettings,
    pub log: LogSettings,
    pub metrics: MetricsSettings,
    /// Connection, rate and size limits against greedy or hostile clients (`[limits]`).
    pub limits: LimitsSettings,
    /// Client listeners (`[[listeners]]`). Empty: one plain TCP listener on `mqtt.listen`.
    pub listeners: Vec<ListenerSettings>,
}

/// Limits that keep one client (or a flood of them) from taking the node down. Every limit
/// hit is counted in `tiermq_limit_hits_total{limit=...}`; `docs/security.md` ("Limits")
/// says what each one protects and which reason code the client gets. The rate limits are
/// off by default (0) because the right values depend on the fleet; the size limits are on.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSettings {
    /// Open client sockets on this node (counted from accept, so sockets that never send
    /// CONNECT count too); beyond it CONNACK 0x97 Quota exceeded (3.1.1: 3). 0 = unlimited.
    pub max_connections: usize,
    /// New sockets per second on this node (token bucket of `connection_burst`); beyond it
    /// CONNACK 0x9F Connection rate exceeded (3.1.1: 3). 0 = unlimited.
    pub connection_rate: u32,
    /// Sockets accepted at once before `connection_rate` applies; 0 = one second's worth.
    pub connection_burst: u32,
    /// New sockets per second from one source IP address (burst: one second's worth);
    /// beyond it CONNACK 0x9F. 0 = unlimited.
    pub connection_rate_per_ip: u32,
    /// PUBLISH packets per second per connection (burst `publish_burst`); beyond it the
    /// connection's reads pause until the rate allows the next one (back-pressure, no loss).
    /// 0 = unlimited.
    pub publish_rate: u32,
    /// Publishes accepted at once before `publish_rate` applies; 0 = one second's worth.
    pub publish_burst: u32,
    /// Instead of pausing reads, close a connection that publishes faster than
    /// `publish_rate`: v5 clients get DISCONNECT 0x96 Message rate too high. The publish over
    /// the rate is not processed (not acknowledged: a QoS1/2 client sends it again after
    /// reconnecting), so nothing acknowledged is lost. Off by default: pausing is gentler.
    pub publish_rate_disconnect: bool,
    /// Inbound bytes per second per connection (all packets; burst: one second's worth);
    /// beyond it reads pause. 0 = unlimited.
    pub publish_bandwidth: u64,
    /// Longest topic name or filter, bytes; beyond it PUBACK/PUBREC 0x90 (v5 QoS1/2),
    /// a dropped QoS0, a closed 3.1.1 connection, or SUBACK 0x8F.
    pub max_topic_length: usize,
    /// Most levels (`/`-separated parts) in a topic name or filter; same answers.
    pub max_topic_levels: usize,
}

impl Default for LimitsSettings {
    fn default() -> Self {
        LimitsSettings {
            max_connections: 0,
            connection_rate: 0,
            connection_burst: 0,
            connection_rate_per_ip: 0,
            publish_rate: 0,
            publish_burst: 0,
            publish_rate_disconnect: false,
            publish_bandwidth: 0,
            max_topic_length: 4096,
            max_topic_levels: 128,
        }
    }
}

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

    fn check(&self, index: usize) -> Result<(), ConfigError> {
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

/// The per-node HTTP endpoint for Prometheus (`/metrics`) and probes (`/healthz`, `/readyz`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// (standalone, frontend) Seconds between two rounds of the self-check probe, an internal
    /// client that publishes a QoS1 message to itself through the partitions and exports the
    /// round trip (`tiermq_probe_*`); 0 (the default) turns it off.
    pub probe_interval_secs: u64,
    /// A probe message not delivered back within this many seconds counts as lost.
    pub probe_timeout_secs: u64,
    /// `host:port` to serve on; an empty string disables the endpoint. Unset means
    /// [`DEFAULT_METRICS_LISTEN`], which is *best effort*: several nodes on one host (a local
    /// cluster, parallel tests) would all want it, so when it is taken the node logs a warning
    /// and runs without metrics. An address set explicitly that cannot be bound is an error.
    pub listen: Option<String>,
}

/// Where the metrics endpoint listens unless configured: loopback, so nothing is exposed by
/// default (containers set `TIERMQ_METRICS_LISTEN=0.0.0.0:9464`).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

/// The metrics endpoint as configured: where, and whether failing to bind it is fatal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsListen {
    pub addr: SocketAddr,
    /// The address was set by the operator (not the default): failing to bind it is an error.
    pub explicit: bool,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings {
            probe_interval_secs: 0,
            probe_timeout_secs: 5,
            listen: None,
        }
    }
}

impl MetricsSettings {
    /// The address to serve metrics on, `None` when disabled.
    pub fn listen(&self) -> Result<Option<MetricsListen>, ConfigError> {
        let (text, explicit) = match &self.listen {
            None => (DEFAULT_METRICS_LISTEN, false),
            Some(s) if s.trim().is_empty() => return Ok(None),
            Some(s) => (s.trim(), true),
        };
        let addr = text.parse().map_err(|_| ConfigError::Invalid {
            name: "metrics.listen",
            message: format!("`{text}` is not `host:port` (an empty value disables metrics)"),
        })?;
        Ok(Some(MetricsListen { addr, explicit }))
    }
}

/// Cluster mode (`tiermq backend` / `tiermq frontend`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSettings {
    /// This backend's id (1, 2, ...); must appear in `peers`.
    pub node_id: u64,
    /// gRPC address of this backend (Raft between backends, and the frontend API).
    pub grpc_listen: SocketAddr,
    /// Every backend of the cluster as `id=host:port`, this one included (the static
    /// bootstrap; once the membership record has changed, the record stored in the data
    /// folder wins).
    pub peers: Vec<String>,
    /// (backend) Join a running cluster through any of these members' gRPC addresses instead
    /// of bootstrapping one (`tiermq backend --join`). Needs `advertise` (or this node in
    /// `peers`).
    pub join: Vec<String>,
    /// (backend) This node's gRPC address as the other members reach it, `host:port`
    /// [default: this node's entry in `peers`].
    pub advertise: Option<String>,
    /// (backend) Replica moves (learner → snapshot → promotion) a node runs at once among the
    /// groups it leads, after a membership change: the pace of a rebalance. Lower keeps
    /// client latency steadier on a loaded cluster; higher finishes sooner.
    pub max_moves: usize,
    /// Partitions of the cluster; fixed at bootstrap.
    pub partitions: u32,
    /// Replicas per partition (Raft group size).
    pub replication: usize,
    /// (backend) On a graceful stop (SIGTERM, Ctrl-C), first hand the leadership of every
    /// partition led here to another replica, waiting at most this many seconds, so clients
    /// do not wait for an election timeout. 0: stop at once.
    pub leader_transfer_secs: u64,
    /// (frontend) Backend gRPC addresses to learn the cluster from, `host:port`.
    pub backends: Vec<String>,
    /// (frontend) This frontend's id; 0 draws a random one at start, so a restarted frontend
    /// is a new one and the sessions of the old one are released (their wills fire).
    pub frontend_id: u64,
    /// (frontend) Where clients go when this frontend drains: `host:port` of other
    /// frontends (or a load balancer), sent to MQTT 5 clients as the Server Reference of
    /// DISCONNECT 0x9C Use another server. Empty: 0x9C without a reference.
    pub server_references: Vec<String>,
    /// (frontend) MQTT 3.1.1 connections closed per second while draining (they cannot be
    /// told where to go, so their reconnects are spread out); 0 closes them all at once.
    pub drain_rate: u32,
    /// (frontend) A drain gives up waiting for connections to leave after this many seconds;
    /// those left get DISCONNECT 0x8B and the process exits.
    pub drain_timeout_secs: u64,
    /// Mutual TLS on the internal gRPC (all three or none): the cluster CA (PEM) that signs
    /// every node's certificate; the gRPC server then requires client certificates.
    pub tls_ca: Option<PathBuf>,
    /// This node's certificate chain (PEM, leaf first), shown as server and as client.
    pub tls_cert: Option<PathBuf>,
    /// This node's private key (PEM).
    pub tls_key: Option<PathBuf>,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            node_id: 0,
            grpc_listen: "0.0.0.0:7000".parse().expect("valid default address"),
            peers: Vec::new(),
            join: Vec::new(),
            advertise: None,
            max_moves: 2,
            partitions: 16,
            replication: 3,
            leader_transfer_secs: 5,
            backends: Vec::new(),
            frontend_id: 0,
            server_references: Vec::new(),
            drain_rate: 500,
            drain_timeout_secs: 30,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
        }
    }
}

impl ClusterSettings {
    /// Parses `peers` into id → address.
    pub fn peer_map(&self) -> Result<std::collections::BTreeMap<u64, String>, ConfigError> {
        let mut map = std::collections::BTreeMap::new();
        for p in &self.peers {
            let bad = || ConfigError::Invalid {
                name: "cluster.peers",
                message: format!("`{p}` is not `id=host:port`"),
            };
            let (id, addr) = p.split_once('=').ok_or_else(bad)?;
            let id: u64 = id.trim().parse().map_err(|_| bad())?;
            if id == 0 || addr.trim().is_empty() || !addr.contains(':') {
                return Err(bad());
            }
            if map.insert(id, addr.trim().to_string()).is_some() {
                return Err(ConfigError::Invalid {
                    name: "cluster.peers",
                    message: format!("node id {id} appears twice"),
                });
            }
        }
        Ok(map)
    }

    /// The internal TLS files `(ca, cert, key)` when set; an error when only some are.
    pub fn tls_files(&self) -> Result<Option<(&Path, &Path, &Path)>, ConfigError> {
        match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (Some(ca), Some(cert), Some(key)) => Ok(Some((ca, cert, key))),
            (None, None, None) => Ok(None),
            _ => Err(ConfigError::Invalid {
                name: "cluster.tls_ca",
                message: "internal TLS needs all of cluster.tls_ca, cluster.tls_cert and \
                          cluster.tls_key (--cluster-tls-ca/-cert/-key)"
                    .into(),
            }),
        }
    }

    /// Checks what a frontend node needs.
    pub fn validate_frontend(&self) -> Result<(), ConfigError> {
        if self.backends.is_empty() {
            return Err(ConfigError::Invalid {
                name: "cluster.backends",
                message: "a frontend needs --backends host:port[,host:port...]".into(),
            });
        }
        Ok(())
    }

    /// This backend's address for the other members: `advertise`, else its `peers` entry.
    pub fn advertised_addr(&self) -> Result<Option<String>, ConfigError> {
        if let Some(a) = &self.advertise {
            return Ok(Some(a.clone()));
        }
        Ok(self.peer_map()?.get(&self.node_id).cloned())
    }

    /// Checks what a backend node needs.
    pub fn validate_backend(&self) -> Result<(), ConfigError> {
        let peers = self.peer_map()?;
        if self.node_id == 0 {
            return Err(ConfigError::Invalid {
                name: "cluster.node_id",
                message: "a backend needs --node-id (1, 2, ...)".into(),
            });
        }
        if let Some(a) = &self.advertise {
            if a.trim().is_empty() || !a.contains(':') {
                return Err(ConfigError::Invalid {
                    name: "cluster.advertise",
                    message: format!("`{a}` is not `host:port`"),
                });
            }
        }
        if self.max_moves == 0 {
            return Err(ConfigError::Invalid {
                name: "cluster.max_moves",
                message: "must be at least 1".into(),
            });
        }
        if !self.join.is_empty() {
            if self.advertised_addr()?.is_none() {
                return Err(ConfigError::Invalid {
                    name: "cluster.advertise",
                    message: "a joining backend needs --advertise host:port (its gRPC address \
                              as the other members reach it)"
                        .into(),
                });
            }
        } else if !peers.contains_key(&self.node_id) {
            return Err(ConfigError::Invalid {
                name: "cluster.peers",
                message: format!("must list this node ({}) as `id=host:port`", self.node_id),
            });
        }
        if self.partitions == 0 || self.partitions > 4096 {
            return Err(ConfigError::Invalid {
                name: "cluster.partitions",
                message: "must be between 1 and 4096".into(),
            });
        }
        if self.replication == 0 {
            return Err(ConfigError::Invalid {
                name: "cluster.replication",
                message: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttSettings {
    /// Address of the MQTT TCP listener.
    pub listen: SocketAddr,
    /// Largest packet accepted from a client, in bytes (announced in CONNACK).
    pub max_packet_size: u32,
    /// QoS1/QoS2 publishes a client may have unacknowledged towards the broker.
    pub receive_maximum: u16,
    /// In-flight window towards MQTT 3.1.1 clients.
    pub v311_inflight: u16,
    /// Cap on client keep alive in seconds; 0 accepts any value.
    pub max_keep_alive: u16,
    /// Seconds a new socket may take to send CONNECT.
    pub connect_timeout_secs: u64,
    /// Topic aliases a client may use towards the broker.
    pub topic_alias_maximum: u16,
    /// Topic aliases the broker uses towards a v5 client that accepts them (capped by the
    /// client's Topic Alias Maximum); 0 disables outbound aliases.
    pub topic_alias_out: u16,
    pub max_client_id_len: usize,
    pub retain_available: bool,
    /// Highest QoS accepted (0, 1 or 2).
    pub maximum_qos: u8,
    /// Response Information prefix offered to clients that request it; empty disables it.
    pub response_information: String,
    /// Bytes buffered for a slow client beyond which QoS0 deliveries to it are dropped.
    pub max_write_buffer: usize,
    /// Seconds between two rounds of `$SYS/broker/...` statistics; 0 disables them.
    pub sys_interval_secs: u64,
    /// Users and argon2id password hashes (`tiermq passwd`); unset: no password check.
    pub password_file: Option<PathBuf>,
    /// Let clients in without a user name. Default: yes without a password file, no with one.
    pub allow_anonymous: Option<bool>,
    /// Authorization rules (docs/security.md); unset: every client may do everything.
    pub acl_file: Option<PathBuf>,
    /// Milliseconds to wait before refusing wrong credentials (slows down guessing).
    pub auth_failure_delay_ms: u64,
    /// Seconds between two checks of the TLS listeners' certificate files (a changed file
    /// reloads the certificate for new connections); 0 reloads only on SIGHUP.
    pub tls_reload_interval_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSettings {
    /// Folder of the standalone broker's data (created if missing).
    pub data_dir: PathBuf,
    /// Number of partitions. Fixed when the data folder is created.
    pub partitions: u32,
    /// Checkpoint after this many log entries.
    pub checkpoint_entries: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionSettings {
    /// Messages queued per session beyond the in-flight window (the oldest is dropped).
    pub max_queued_messages: usize,
    /// Queue QoS0 messages for offline persistent sessions.
    pub queue_qos0_offline: bool,
    /// Subscriptions per client; 0 = unlimited.
    pub max_subscriptions: usize,
    /// How a shared subscription group picks a member: `round-robin`, `random` or
    /// `sticky-by-publisher`.
    pub shared_strategy: crate::partition_api::SharedStrategy,
    /// A full queue (`max_queued_messages`): `drop-oldest` keeps the newest messages,
    /// `refuse-new` keeps the queue and answers a v5 publisher 0x97 Quota exceeded.
    pub queue_full_policy: crate::partition_api::QueueFullPolicy,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// A tracing filter such as `info` or `tiermq=debug,info`; `RUST_LOG` wins when set.
    pub level: String,
    /// `text` (human-readable) or `json` (one JSON object per line, for log shippers).
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "unknown log format {other:?} (expected text or json)"
            )),
        }
    }
}

impl Default for MqttSettings {
    fn default() -> Self {
        MqttSettings {
            listen: "0.0.0.0:1883".parse().expect("valid default address"),
            max_packet_size: 1024 * 1024,
            receive_maximum: 1024,
            v311_inflight: 100,
            max_keep_alive: 0,
            connect_timeout_secs: 10,
            topic_alias_maximum: 64,
            topic_alias_out: 16,
            max_client_id_len: 256,
            retain_available: true,
            maximum_qos: 2,
            response_information: String::new(),
            max_write_buffer: 4 * 1024 * 1024,
            sys_interval_secs: 10,
            password_file: None,
            allow_anonymous: None,
            acl_file: None,
            auth_failure_delay_ms: 1000,
            tls_reload_interval_secs: 5,
        }
    }
}

impl Default for StorageSettings {
    fn default() -> Self {
        StorageSettings {
            data_dir: PathBuf::from("./data"),
            partitions: 1,
            checkpoint_entries: 20_000,
        }
    }
}

impl Default for SessionSettings {
    fn default() -> Self {
        SessionSettings {
            max_queued_messages: 100_000,
            queue_qos0_offline: false,
            shared_strategy: Default::default(),
            queue_full_policy: Default::default(),
            max_subscriptions: 0,
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            // raft-rs logs every election step at INFO; keep those at WARN unless asked.
            level: "info,slog=warn".to_string(),
            format: LogFormat::Text,
        }
    }
}

/// Values given by flag or environment variable; `None` keeps the file's (or default) value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub partitions: Option<u32>,
    pub max_packet_size: Option<u32>,
    pub receive_maximum: Option<u16>,
    pub max_keep_alive: Option<u16>,
    pub max_queued_messages: Option<usize>,
    pub max_subscriptions: Option<usize>,
    pub queue_qos0_offline: Option<bool>,
    pub shared_strategy: Option<crate::partition_api::SharedStrategy>,
    pub queue_full_policy: Option<crate::partition_api::QueueFullPolicy>,
    pub log_level: Option<String>,
    pub log_format: Option<LogFormat>,
    pub node_id: Option<u64>,
    pub grpc_listen: Option<SocketAddr>,
    pub peers: Option<Vec<String>>,
    pub join: Option<Vec<String>>,
    pub advertise: Option<String>,
    pub max_moves: Option<usize>,
    pub cluster_partitions: Option<u32>,
    pub replication: Option<usize>,
    pub leader_transfer_secs: Option<u64>,
    pub backends: Option<Vec<String>>,
    pub frontend_id: Option<u64>,
    pub server_references: Option<Vec<String>>,
    pub drain_rate: Option<u32>,
    pub drain_timeout_secs: Option<u64>,
    pub cluster_tls_ca: Option<PathBuf>,
    pub cluster_tls_cert: Option<PathBuf>,
    pub cluster_tls_key: Option<PathBuf>,
    /// `Some("")` disables the metrics endpoint.
    pub metrics_listen: Option<String>,
    pub sys_interval_secs: Option<u64>,
    pub probe_interval_secs: Option<u64>,
    pub probe_timeout_secs: Option<u64>,
    pub password_file: Option<PathBuf>,
    pub allow_anonymous: Option<bool>,
    pub acl_file: Option<PathBuf>,
    /// A TLS listener on this address (with `tls_cert`, `tls_key`, optional `tls_ca`), in
    /// addition to the configured listeners.
    pub tls_listen: Option<SocketAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// CA for client certificates: with it, the flag listeners require client certificates.
    pub tls_ca: Option<PathBuf>,
    /// A WebSocket listener (path /mqtt) on this address.
    pub ws_listen: Option<SocketAddr>,
    /// A secure WebSocket listener (path /mqtt, the `tls_*` files) on this address.
    pub wss_listen: Option<SocketAddr>,
    pub max_connections: Option<usize>,
    pub connection_rate: Option<u32>,
    pub connection_rate_per_ip: Option<u32>,
    pub publish_rate: Option<u32>,
    pub publish_bandwidth: Option<u64>,
}

impl Overrides {
    /// The listeners the flags ask for (TLS files go to tls and wss listeners).
    fn listeners(&self) -> Result<Vec<ListenerSettings>, ConfigError> {
        let mut out = Vec::new();
        let tls = |kind, listen| ListenerSettings {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            ca: self.tls_ca.clone(),
            ..ListenerSettings::new(kind, listen)
        };
        if let Some(listen) = self.tls_listen {
            out.push(tls(ListenerKind::Tls, listen));
        }
        if let Some(listen) = self.ws_listen {
            out.push(ListenerSettings::new(ListenerKind::Ws, listen));
        }
        if let Some(listen) = self.wss_listen {
            out.push(tls(ListenerKind::Wss, listen));
        }
        let files_given =
            self.tls_cert.is_some() || self.tls_key.is_some() || self.tls_ca.is_some();
        if files_given && self.tls_listen.is_none() && self.wss_listen.is_none() {
            return Err(ConfigError::Invalid {
                name: "tls",
                message: "--tls-cert/--tls-key/--tls-ca need --tls-listen or --wss-listen".into(),
            });
        }
        Ok(out)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid setting {name}: {message}")]
    Invalid { name: &'static str, message: String },
}

impl Settings {
    /// Defaults, then the file (if any), then the overrides; validated.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Settings, ConfigError> {
        let mut s = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                Settings::from_toml(&text).map_err(|message| ConfigError::Parse {
                    path: path.to_path_buf(),
                    message,
                })?
            }
            None => Settings::default(),
        };
        s.apply(overrides);
        let extra = overrides.listeners()?;
        if !extra.is_empty() {
            // Listeners given by flag come on top of what is configured, the default TCP
            // listener included.
            s.listeners = s.effective_listeners();
            s.listeners.extend(extra);
        }
        s.validate()?;
        Ok(s)
    }

    /// The client listeners to open: `listeners`, or else one TCP listener on `mqtt.listen`.
    pub fn effective_listeners(&self) -> Vec<ListenerSettings> {
        if self.listeners.is_empty() {
            vec![ListenerSettings::new(ListenerKind::Tcp, self.mqtt.listen)]
        } else {
            self.listeners.clone()
        }
    }

    pub fn from_toml(text: &str) -> Result<Settings, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    fn apply(&mut self, o: &Overrides) {
        macro_rules! set {
            ($field:expr, $value:expr) => {
                if let Some(v) = $value.clone() {
                    $field = v;
                }
            };
        }
        set!(self.mqtt.listen, o.listen);
        set!(self.storage.data_dir, o.data_dir);
        set!(self.storage.partitions, o.partitions);
        set!(self.mqtt.max_packet_size, o.max_packet_size);
        set!(self.mqtt.receive_maximum, o.receive_maximum);
        set!(self.mqtt.max_keep_alive, o.max_keep_alive);
        set!(self.session.max_queued_messages, o.max_queued_messages);
        set!(self.session.max_subscriptions, o.max_subscriptions);
        set!(self.session.queue_qos0_offline, o.queue_qos0_offline);
        set!(self.session.shared_strategy, o.shared_strategy);
        set!(self.session.queue_full_policy, o.queue_full_policy);
        set!(self.log.level, o.log_level);
        set!(self.log.format, o.log_format);
        set!(self.cluster.node_id, o.node_id);
        set!(self.cluster.grpc_listen, o.grpc_listen);
        set!(self.cluster.peers, o.peers);
        set!(self.cluster.join, o.join);
        set!(self.cluster.max_moves, o.max_moves);
        if o.advertise.is_some() {
            self.cluster.advertise = o.advertise.clone();
        }
        set!(self.cluster.partitions, o.cluster_partitions);
        set!(self.cluster.replication, o.replication);
        set!(self.cluster.leader_transfer_secs, o.leader_transfer_secs);
        set!(self.cluster.backends, o.backends);
        set!(self.cluster.frontend_id, o.frontend_id);
        set!(self.cluster.server_references, o.server_references);
        set!(self.cluster.drain_rate, o.drain_rate);
        set!(self.cluster.drain_timeout_secs, o.drain_timeout_secs);
        for (field, value) in [
            (&mut self.cluster.tls_ca, &o.cluster_tls_ca),
            (&mut self.cluster.tls_cert, &o.cluster_tls_cert),
            (&mut self.cluster.tls_key, &o.cluster_tls_key),
        ] {
            if value.is_some() {
                field.clone_from(value);
            }
        }
        if let Some(listen) = &o.metrics_listen {
            self.metrics.listen = Some(listen.clone());
        }
        set!(self.mqtt.sys_interval_secs, o.sys_interval_secs);
        set!(self.metrics.probe_interval_secs, o.probe_interval_secs);
        set!(self.metrics.probe_timeout_secs, o.probe_timeout_secs);
        if let Some(f) = &o.password_file {
            self.mqtt.password_file = Some(f.clone());
        }
        if let Some(a) = o.allow_anonymous {
            self.mqtt.allow_anonymous = Some(a);
        }
        if let Some(f) = &o.acl_file {
            self.mqtt.acl_file = Some(f.clone());
        }
        set!(self.limits.max_connections, o.max_connections);
        set!(self.limits.connection_rate, o.connection_rate);
        set!(self.limits.connection_rate_per_ip, o.connection_rate_per_ip);
        set!(self.limits.publish_rate, o.publish_rate);
        set!(self.limits.publish_bandwidth, o.publish_bandwidth);
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |name, message: &str| {
            Err(ConfigError::Invalid {
                name,
                message: message.to_string(),
            })
        };
        if self.storage.partitions == 0 || self.storage.partitions > 4096 {
            return invalid("storage.partitions", "must be between 1 and 4096");
        }
        if self.mqtt.max_packet_size < 64 {
            return invalid("mqtt.max_packet_size", "must be at least 64 bytes");
        }
        if self.mqtt.receive_maximum == 0 {
            return invalid("mqtt.receive_maximum", "must be at least 1");
        }
        if self.mqtt.v311_inflight == 0 {
            return invalid("mqtt.v311_inflight", "must be at least 1");
        }
        if self.mqtt.maximum_qos > 2 {
            return invalid("mqtt.maximum_qos", "must be 0, 1 or 2");
        }
        if self.session.max_queued_messages == 0 {
            return invalid("session.max_queued_messages", "must be at least 1");
        }
        if self.limits.max_topic_length == 0 || self.limits.max_topic_levels == 0 {
            return invalid(
                "limits.max_topic_length",
                "max_topic_length and max_topic_levels must be at least 1",
            );
        }
        self.metrics.listen()?;
        if self.metrics.probe_interval_secs > 0 && self.metrics.probe_timeout_secs == 0 {
            return invalid("metrics.probe_timeout_secs", "must be at least 1");
        }
        self.cluster.tls_files()?;
        self.validate_listeners()?;
        Ok(())
    }

    fn validate_listeners(&self) -> Result<(), ConfigError> {
        let listeners = self.effective_listeners();
        let mut names = std::collections::BTreeSet::new();
        let mut addrs = std::collections::BTreeSet::new();
        for (i, l) in listeners.iter().enumerate() {
            l.check(i)?;
            if !names.insert(l.name()) {
                return Err(ConfigError::Invalid {
                    name: "listeners",
                    message: format!("two listeners are named `{}`", l.name()),
                });
            }
            if l.listen.port() != 0 && !addrs.insert(l.listen) {
                return Err(ConfigError::Invalid {
                    name: "listeners",
                    message: format!("two listeners on {}", l.listen),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Settings::default().validate().unwrap();
        assert_eq!(Settings::from_toml("").unwrap(), Settings::default());
    }

    /// `deploy/hardened.toml`, which `docs/security.md` points operators to, stays a valid
    /// settings file that means what its comments say.
    #[test]
    fn hardened_example_config_loads() {
        let text = include_str!("../../deploy/hardened.toml");
        let s = Settings::from_toml(text).unwrap();
        s.validate().unwrap();
        assert_eq!(s.listeners.len(), 3);
        assert!(s.listeners.iter().all(|l| l.kind != ListenerKind::Tcp));
        assert_eq!(s.mqtt.allow_anonymous, Some(false));
        assert!(s.mqtt.password_file.is_some() && s.mqtt.acl_file.is_some());
        assert_eq!(s.limits.max_topic_levels, 16);
        assert_eq!(s.session.max_subscriptions, 100);
        assert!(s.cluster.tls_ca.is_some());
    }

    #[test]
    fn file_then_overrides() {
        let s = Settings::from_toml(
            "[mqtt]\nlisten = \"127.0.0.1:2883\"\nmax_packet_size = 2048\n[storage]\npartitions = 4\n",
        )
        .unwrap();
        assert_eq!(s.mqtt.listen.port(), 2883);
        assert_eq!(s.storage.partitions, 4);
        let mut s2 = s.clone();
        s2.apply(&Overrides {
            listen: Some("127.0.0.1:3883".parse().unwrap()),
            ..Overrides::default()
        });
        assert_eq!(s2.mqtt.listen.port(), 3883);
        assert_eq!(s2.mqtt.max_packet_size, 2048);
    }

    #[test]
    fn cluster_peers_parse_and_validate() {
        let mut c = ClusterSettings {
            node_id: 2,
            peers: vec!["1=a:7000".into(), "2=b:7000".into(), "3=c:7000".into()],
            ..ClusterSettings::default()
        };
        assert_eq!(c.peer_map().unwrap()[&2], "b:7000");
        c.validate_backend().unwrap();
        c.node_id = 4;
        assert!(c.validate_backend().is_err());
        c.peers.push("x=d:1".into());
        assert!(c.peer_map().is_err());
    }

    #[test]
    fn a_joining_backend_needs_an_address_for_the_others() {
        let mut c = ClusterSettings {
            node_id: 4,
            join: vec!["b1:7000".into()],
            ..ClusterSettings::default()
        };
        let e = c.validate_backend().unwrap_err().to_string();
        assert!(e.contains("--advertise"), "{e}");
        c.advertise = Some("b4:7000".into());
        c.validate_backend().unwrap();
        assert_eq!(c.advertised_addr().unwrap().as_deref(), Some("b4:7000"));
        c.advertise = Some("no-port".into());
        assert!(c.validate_backend().is_err());
        c.advertise = Some("b4:7000".into());
        c.max_moves = 0;
        assert!(c.validate_backend().is_err());
        // Without --advertise, this node's --peers entry is its address.
        let c = ClusterSettings {
            node_id: 4,
            join: vec!["b1:7000".into()],
            peers: vec!["4=b4:7001".into()],
            ..ClusterSettings::default()
        };
        c.validate_backend().unwrap();
        assert_eq!(c.advertised_addr().unwrap().as_deref(), Some("b4:7001"));
    }

    #[test]
    fn cluster_tls_all_or_none_file_then_flags() {
        let mut s = Settings::from_toml(
            "[cluster]\ntls_ca = \"ca.pem\"\ntls_cert = \"n.pem\"\ntls_key = \"n.key\"",
        )
        .unwrap();
        let files = s.cluster.tls_files().unwrap().unwrap();
        assert_eq!(files.1, Path::new("n.pem"));
        s.apply(&Overrides {
            cluster_tls_cert: Some("other.pem".into()),
            ..Overrides::default()
        });
        assert_eq!(s.cluster.tls_cert, Some(PathBuf::from("other.pem")));
        assert_eq!(s.cluster.tls_ca, Some(PathBuf::from("ca.pem")));
        s.validate().unwrap();
        s.cluster.tls_key = None;
        assert!(s.validate().is_err(), "two of three files is an error");
        assert_eq!(Settings::default().cluster.tls_files().unwrap(), None);
    }

    #[test]
    fn metrics_listen_default_explicit_disabled_invalid() {
        let default = Settings::default().metrics.listen().unwrap().unwrap();
        assert_eq!(default.addr, DEFAULT_METRICS_LISTEN.parse().unwrap());
        assert!(!default.explicit);
        let s = Settings::from_toml("[metrics]\nlisten = \"127.0.0.1:0\"").unwrap();
        assert!(s.metrics.listen().unwrap().unwrap().explicit);
        let s = Settings::from_toml("[metrics]\nlisten = \"\"").unwrap();
        assert_eq!(s.metrics.listen().unwrap(), None);
        let mut s = Settings::default();
        s.apply(&Overrides {
            metrics_listen: Some("localhost".into()),
            ..Overrides::default()
        });
        assert!(matches!(
            s.validate(),
            Err(ConfigError::Invalid {
                name: "metrics.listen",
                ..
            })
        ));
        assert_eq!(Settings::default().mqtt.sys_interval_secs, 10);
        // The probe is off unless asked for.
        let m = &Settings::default().metrics;
        assert_eq!((m.probe_interval_secs, m.probe_timeout_secs), (0, 5));
        let s = Settings::from_toml("[metrics]\nprobe_interval_secs = 2\nprobe_timeout_secs = 1")
            .unwrap();
        assert_eq!(
            (s.metrics.probe_interval_secs, s.metrics.probe_timeout_secs),
            (2, 1)
        );
    }

    #[test]
    fn listeners_default_toml_and_flags() {
        // No listeners: one TCP listener on mqtt.listen.
        let s = Settings::default();
        assert_eq!(
            s.effective_listeners(),
            vec![ListenerSettings::new(ListenerKind::Tcp, s.mqtt.listen)]
        );
        let s = Settings::from_toml(
            "[[listeners]]\nkind = \"tcp\"\nlisten = \"0.0.0.0:1883\"\n\
             [[listeners]]\nname = \"devices\"\nkind = \"tls\"\nlisten = \"0.0.0.0:8883\"\n\
             cert = \"c.pem\"\nkey = \"k.pem\"\nca = \"ca.pem\"\n\
             [[listeners]]\nkind = \"ws\"\nlisten = \"0.0.0.0:8080\"\npath = \"/ws\"\n",
        )
        .unwrap();
        s.validate().unwrap();
        assert_eq!(s.listeners.len(), 3);
        assert_eq!(s.listeners[1].name(), "devices");
        assert!(s.listeners[1].requires_client_cert());
        assert_eq!(s.listeners[2].ws_path(), "/ws");
        assert_eq!(s.listeners[0].name(), "tcp:0.0.0.0:1883");
        // Flags add to the default TCP listener (moved by --listen).
        let mut s = Settings::default();
        let o = Overrides {
            listen: Some("127.0.0.1:2883".parse().unwrap()),
            tls_listen: Some("127.0.0.1:8883".parse().unwrap()),
            tls_cert: Some("c.pem".into()),
            tls_key: Some("k.pem".into()),
            ws_listen: Some("127.0.0.1:8080".parse().unwrap()),
            ..Overrides::default()
        };
        s.apply(&o);
        s.listeners = s.effective_listeners();
        s.listeners.extend(o.listeners().unwrap());
        s.validate().unwrap();
        let kinds: Vec<_> = s
            .listeners
            .iter()
            .map(|l| (l.kind, l.listen.port()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (ListenerKind::Tcp, 2883),
                (ListenerKind::Tls, 8883),
                (ListenerKind::Ws, 8080)
            ]
        );
        assert!(!s.listeners[1].requires_client_cert());
        // TLS files without a TLS listener.
        let o = Overrides {
            tls_cert: Some("c.pem".into()),
            ..Overrides::default()
        };
        assert!(Settings::load(None, &o).is_err());
    }

    #[test]
    fn bad_listeners_are_refused() {
        let bad = [
            "kind = \"tls\"\nlisten = \"0.0.0.0:8883\"\nkey = \"k.pem\"",
            "kind = \"tls\"\nlisten = \"0.0.0.0:8883\"\ncert = \"c.pem\"",
            "kind = \"tls\"\nlisten = \"0.0.0.0:8883\"\ncert = \"c\"\nkey = \"k\"\nrequire_client_cert = true",
            "kind = \"tcp\"\nlisten = \"0.0.0.0:1883\"\ncert = \"c.pem\"",
            "kind = \"tcp\"\nlisten = \"0.0.0.0:1883\"\npath = \"/mqtt\"",
            "kind = \"ws\"\nlisten = \"0.0.0.0:8080\"\npath = \"mqtt\"",
        ];
        for b in bad {
            let s = Settings::from_toml(&format!("[[listeners]]\n{b}\n")).unwrap();
            assert!(
                matches!(
                    s.validate(),
                    Err(ConfigError::Invalid {
                        name: "listeners",
                        ..
                    })
                ),
                "{b}"
            );
        }
        assert!(
            Settings::from_toml("[[listeners]]\nkind = \"quic\"\nlisten = \"0.0.0.0:1\"").is_err()
        );
        let twice = "[[listeners]]\nkind = \"tcp\"\nlisten = \"0.0.0.0:1883\"\n\
                     [[listeners]]\nkind = \"ws\"\nlisten = \"0.0.0.0:1883\"\n";
        assert!(Settings::from_toml(twice).unwrap().validate().is_err());
    }

    #[test]
    fn limits_from_file_env_and_listeners() {
        let d = LimitsSettings::default();
        assert_eq!((d.max_connections, d.publish_rate), (0, 0));
        let mut s = Settings::from_toml(
            "[limits]\nmax_connections = 100\nconnection_rate = 50\nmax_topic_levels = 8\n\
             [[listeners]]\nkind = \"tcp\"\nlisten = \"0.0.0.0:1883\"\nmax_connections = 10\n",
        )
        .unwrap();
        s.validate().unwrap();
        assert_eq!(s.limits.max_connections, 100);
        assert_eq!(s.limits.max_topic_levels, 8);
        assert_eq!(s.listeners[0].max_connections, Some(10));
        s.apply(&Overrides {
            max_connections: Some(7),
            publish_rate: Some(20),
            ..Overrides::default()
        });
        assert_eq!((s.limits.max_connections, s.limits.publish_rate), (7, 20));
        assert_eq!(s.limits.connection_rate, 50);
        s.limits.max_topic_length = 0;
        assert!(s.validate().is_err());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(Settings::from_toml("[mqtt]\nlisen = \"x\"").is_err());
        assert!(Settings::from_toml("[mqtt]\nreceive_maximum = -1").is_err());
        let mut s = Settings::default();
        s.storage.partitions = 0;
        assert!(matches!(
            s.validate(),
            Err(ConfigError::Invalid {
                name: "storage.partitions",
                ..
            })
        ));
    }
}

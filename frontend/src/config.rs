//! Per-frontend protocol settings: what CONNACK announces and what the handler enforces.

use std::sync::Arc;
use std::time::Duration;

use tiermq_common::QoS;

use crate::auth::Authenticators;
use crate::drain::Drain;
use crate::metrics::FrontendMetrics;

#[derive(Debug, Clone)]
pub struct FrontendConfig {
    /// This frontend's node id; sessions record which frontend holds their connection.
    pub frontend_id: u64,
    /// Largest packet accepted from a client (CONNACK Maximum Packet Size).
    pub max_packet_size: u32,
    /// How many QoS1/QoS2 publishes a client may have unacknowledged towards us.
    pub receive_maximum: u16,
    /// In-flight window towards MQTT 3.1.1 clients, which cannot announce one.
    pub v311_inflight: u16,
    /// Cap on the client's keep alive in seconds (Server Keep Alive); 0 = accept any.
    pub max_keep_alive: u16,
    /// A socket that does not send CONNECT within this time is closed.
    pub connect_timeout: Duration,
    /// Topic aliases a client may use towards us (0 disables inbound aliases).
    pub topic_alias_maximum: u16,
    /// Topic aliases we use towards a client, at most (the client's own maximum also caps
    /// them); 0 disables outbound aliases.
    pub topic_alias_out: u16,
    pub max_client_id_len: usize,
    pub retain_available: bool,
    pub maximum_qos: QoS,
    /// Response Information sent when a client asks for it (prefix; the client id is
    /// appended). None: not offered.
    pub response_information: Option<String>,
    /// Username/password check at CONNECT (`mqtt.password_file`); None lets everyone in.
    pub password_auth: Option<crate::passwd::PasswordAuth>,
    /// Bytes waiting to be written to a client beyond which QoS0 deliveries are dropped.
    pub max_write_buffer: usize,
    /// Enhanced authentication methods offered (none by default: CONNECT naming a method is
    /// refused with 0x8C).
    pub authenticators: Authenticators,
    /// The node's counters, shared by every connection (and the metrics endpoint).
    pub metrics: Arc<FrontendMetrics>,
    /// Who may publish, subscribe and receive what (`mqtt.acl_file`, per-listener
    /// `acl_file`); empty: everything is allowed.
    pub acl: crate::acl::AclSet,
    /// The node's drain signal, Server Reference and close pacing (shared by every
    /// connection and the listener).
    pub drain: Drain,
    /// Connection counts and rates, publish throttling, topic size (`[limits]`), shared by
    /// every listener and connection of the node.
    pub limits: crate::limits::Limits,
    /// The node's connections by client id: a takeover lets the connection it replaces read
    /// what its client already sent first ([`crate::takeover`]).
    pub takeovers: crate::takeover::LiveConnections,
}

impl Default for FrontendConfig {
    fn default() -> Self {
        FrontendConfig {
            frontend_id: 0,
            max_packet_size: 1024 * 1024,
            receive_maximum: 1024,
            v311_inflight: 100,
            max_keep_alive: 0,
            connect_timeout: Duration::from_secs(10),
            topic_alias_maximum: 64,
            topic_alias_out: 16,
            max_client_id_len: 256,
            retain_available: true,
            maximum_qos: QoS::ExactlyOnce,
            response_information: None,
            password_auth: None,
            max_write_buffer: 4 * 1024 * 1024,
            authenticators: Authenticators::default(),
            metrics: Arc::default(),
            acl: Default::default(),
            drain: Drain::default(),
            limits: Default::default(),
            takeovers: Default::default(),
        }
    }
}

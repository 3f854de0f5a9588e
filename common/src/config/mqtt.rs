//! `[mqtt]`: the protocol limits a node announces and enforces, and client authentication.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct MqttSettings {
    /// Address of the MQTT TCP listener.
    #[arg(long, env = "TIERMQ_LISTEN", default_value = "0.0.0.0:1883")]
    pub listen: SocketAddr,
    /// Largest packet accepted from a client, in bytes (announced in CONNACK).
    #[arg(long, env = "TIERMQ_MAX_PACKET_SIZE", default_value_t = 1024 * 1024)]
    pub max_packet_size: u32,
    /// QoS1/QoS2 publishes a client may have unacknowledged towards the broker.
    #[arg(long, env = "TIERMQ_RECEIVE_MAXIMUM", default_value_t = 1024)]
    pub receive_maximum: u16,
    /// In-flight window towards MQTT 3.1.1 clients.
    #[arg(skip = 100_u16)]
    pub v311_inflight: u16,
    /// Cap on client keep alive in seconds; 0 accepts any value.
    #[arg(long, env = "TIERMQ_MAX_KEEP_ALIVE", default_value_t = 0)]
    pub max_keep_alive: u16,
    /// Seconds a new socket may take to send CONNECT.
    #[arg(skip = 10_u64)]
    pub connect_timeout_secs: u64,
    /// Topic aliases a client may use towards the broker.
    #[arg(skip = 64_u16)]
    pub topic_alias_maximum: u16,
    /// Topic aliases the broker uses towards a v5 client that accepts them (capped by the
    /// client's Topic Alias Maximum); 0 disables outbound aliases.
    #[arg(skip = 16_u16)]
    pub topic_alias_out: u16,
    #[arg(skip = 256_usize)]
    pub max_client_id_len: usize,
    #[arg(skip = true)]
    pub retain_available: bool,
    /// Highest QoS accepted (0, 1 or 2).
    #[arg(skip = 2_u8)]
    pub maximum_qos: u8,
    /// Response Information prefix offered to clients that request it; empty disables it.
    #[arg(skip)]
    pub response_information: String,
    /// Bytes buffered for a slow client beyond which QoS0 deliveries to it are dropped.
    #[arg(skip = 4_usize * 1024 * 1024)]
    pub max_write_buffer: usize,
    /// Seconds between two rounds of `$SYS/broker/...` statistics; 0 disables them.
    #[arg(long, env = "TIERMQ_SYS_INTERVAL_SECS", default_value_t = 10)]
    pub sys_interval_secs: u64,
    /// Password file for CONNECT user names and passwords (argon2id hashes, `tiermq passwd`);
    /// unset: no password check.
    #[arg(long, env = "TIERMQ_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    /// Let clients in without a user name. Unset: yes without a password file, no with one.
    #[arg(long, env = "TIERMQ_ALLOW_ANONYMOUS")]
    pub allow_anonymous: Option<bool>,
    /// ACL file: who may publish, subscribe and receive which topics (docs/security.md),
    /// reloaded on SIGHUP and when it changes; unset: every client may do everything.
    #[arg(long, env = "TIERMQ_ACL_FILE")]
    pub acl_file: Option<PathBuf>,
    /// Milliseconds to wait before refusing wrong credentials (slows down guessing).
    #[arg(skip = 1000_u64)]
    pub auth_failure_delay_ms: u64,
    /// Seconds between two checks of the TLS listeners' certificate files (a changed file
    /// reloads the certificate for new connections); 0 reloads only on SIGHUP.
    #[arg(skip = 5_u64)]
    pub tls_reload_interval_secs: u64,
}

impl Default for MqttSettings {
    fn default() -> Self {
        super::flags::defaults()
    }
}

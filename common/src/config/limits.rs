//! `[limits]`: limits that keep one client (or a flood of them) from taking the node down.
//!
//! Every limit hit is counted in `tiermq_limit_hits_total{limit=...}`; `docs/security.md`
//! ("Limits") says what each one protects and which reason code the client gets. The rate
//! limits are off by default (0) because the right values depend on the fleet; the size limits
//! are on.

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSettings {
    /// Open client sockets on this node (counted from accept, so sockets that never send
    /// CONNECT count too); beyond it CONNACK 0x97 Quota exceeded (3.1.1: 3). 0 = unlimited.
    #[arg(long, env = "TIERMQ_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,
    /// New client sockets per second on this node (token bucket of `connection_burst`);
    /// beyond it CONNACK 0x9F Connection rate exceeded (3.1.1: 3). 0 = unlimited.
    #[arg(long, env = "TIERMQ_CONNECTION_RATE", default_value_t = 0)]
    pub connection_rate: u32,
    /// Sockets accepted at once before `connection_rate` applies; 0 = one second's worth.
    #[arg(skip = 0_u32)]
    pub connection_burst: u32,
    /// New client sockets per second from one source IP address (burst: one second's worth);
    /// beyond it CONNACK 0x9F. 0 = unlimited.
    #[arg(long, env = "TIERMQ_CONNECTION_RATE_PER_IP", default_value_t = 0)]
    pub connection_rate_per_ip: u32,
    /// PUBLISH packets per second per connection (burst `publish_burst`); beyond it the
    /// connection's reads pause until the rate allows the next one (back-pressure, no loss).
    /// 0 = unlimited.
    #[arg(long, env = "TIERMQ_PUBLISH_RATE", default_value_t = 0)]
    pub publish_rate: u32,
    /// Publishes accepted at once before `publish_rate` applies; 0 = one second's worth.
    #[arg(skip = 0_u32)]
    pub publish_burst: u32,
    /// Instead of pausing reads, close a connection that publishes faster than
    /// `publish_rate`: v5 clients get DISCONNECT 0x96 Message rate too high. The publish over
    /// the rate is not processed (not acknowledged: a QoS1/2 client sends it again after
    /// reconnecting), so nothing acknowledged is lost. Off by default: pausing is gentler.
    #[arg(skip = false)]
    pub publish_rate_disconnect: bool,
    /// Inbound bytes per second per connection (all packets; burst: one second's worth);
    /// beyond it reads pause. 0 = unlimited.
    #[arg(long, env = "TIERMQ_PUBLISH_BANDWIDTH", default_value_t = 0)]
    pub publish_bandwidth: u64,
    /// Longest topic name or filter, bytes; beyond it PUBACK/PUBREC 0x90 (v5 QoS1/2),
    /// a dropped QoS0, a closed 3.1.1 connection, or SUBACK 0x8F.
    #[arg(skip = 4096_usize)]
    pub max_topic_length: usize,
    /// Most levels (`/`-separated parts) in a topic name or filter; same answers.
    #[arg(skip = 128_usize)]
    pub max_topic_levels: usize,
}

impl Default for LimitsSettings {
    fn default() -> Self {
        super::flags::defaults()
    }
}

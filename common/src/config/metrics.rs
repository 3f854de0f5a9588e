//! `[metrics]`: the per-node HTTP endpoint for Prometheus (`/metrics`) and probes (`/healthz`,
//! `/readyz`), and the self-check probe it exports.

use std::net::SocketAddr;

use serde::Deserialize;

use super::ConfigError;

#[derive(Debug, Clone, PartialEq, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// (standalone, frontend) Seconds between two rounds of the self-check probe, an internal
    /// client that publishes a QoS1 message to itself through the partitions and exports the
    /// round trip (`tiermq_probe_*`); 0 turns it off.
    #[arg(long, env = "TIERMQ_PROBE_INTERVAL_SECS", default_value_t = 0)]
    pub probe_interval_secs: u64,
    /// A probe message not delivered back within this many seconds counts as lost.
    #[arg(long, env = "TIERMQ_PROBE_TIMEOUT_SECS", default_value_t = 5)]
    pub probe_timeout_secs: u64,
    /// Prometheus metrics and health endpoint, `host:port`; an empty value disables it. Unset
    /// means 127.0.0.1:9464 (`DEFAULT_METRICS_LISTEN`), which is *best effort*: several nodes
    /// on one host (a local cluster, parallel tests) would all want it, so when it is taken
    /// the node logs a warning and runs without metrics. An address set explicitly that
    /// cannot be bound is an error.
    #[arg(
        id = "metrics_listen",
        long = "metrics-listen",
        env = "TIERMQ_METRICS_LISTEN",
        value_name = "METRICS_LISTEN"
    )]
    pub listen: Option<String>,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        super::flags::defaults()
    }
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

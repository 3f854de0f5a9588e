//! The `tiermq` binary's wiring: it builds the tiers from settings and connects them.
//! Tests use it to start brokers in-process.

pub mod backend;
pub mod backend_drain;
pub mod cluster_cli;
pub mod cluster_tls;
pub mod drain_cli;
pub mod frontend;
pub mod health;
pub mod logging;
pub mod membership_cli;
pub mod metrics_http;
pub mod node_metrics;
pub mod passwd_cli;
pub mod probe_task;
pub mod standalone;

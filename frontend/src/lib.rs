//! The frontend tier: it terminates MQTT and keeps only per-connection state.
//!
//! - [`config`]: what a frontend announces and enforces (packet size, receive maximum, ...).
//! - [`acl`]: authorization rules (who may publish, subscribe, receive what) and their reload.
//! - [`auth`]: enhanced authentication (AUTH packet exchanges) and its method registry;
//!   [`scram`]: the `SCRAM-SHA-256` method; [`passwd`]: the password file.
//! - [`reload`]: reloading certificates and the password file on SIGHUP or a file change.
//! - [`alias`]: the topic aliases a connection uses towards its client.
//! - [`listener`]: accepts sockets (TCP, [`tls`], [`ws`]) and runs one [`handler`] task per
//!   connection.
//! - [`handler`]: the MQTT protocol for one connection, from CONNECT to close.
//! - [`limits`]: connection counts and rates, publish throttling, topic size (`[limits]`).
//! - [`drain`]: the drain signal (stop accepting, move clients to another frontend).
//! - [`takeover`]: the connections by client id, so a takeover keeps the order the client
//!   sent in (a DISCONNECT on the old connection before the new CONNECT).
//! - [`convert`]: PUBLISH packets to application messages and back.
//! - [`metrics`]: the node's counters (Prometheus and `$SYS`), [`metered_io`]: bytes on the wire.
//! - [`sys_topics`]: the task that publishes `$SYS/broker/...`.
//! - [`probe`]: the self-check probe (a QoS1 round trip through the partitions, as metrics).
//!
//! Everything durable is reached through [`tiermq_common::session_api::SessionService`], so the
//! same handler serves the standalone broker and a cluster frontend.

pub mod acl;
pub mod alias;
pub mod auth;
pub mod config;
pub mod convert;
pub mod drain;
pub mod handler;
pub mod limits;
pub mod listener;
pub mod metered_io;
pub mod metrics;
pub mod passwd;
pub mod probe;
pub mod reload;
pub mod scram;
pub mod sys_topics;
pub mod takeover;
pub mod tls;
pub mod ws;

pub use config::FrontendConfig;
pub use listener::{
    bind_all, serve, serve_listeners, ConnectionInfo, Listener, ListenerInfo, ListenerSet,
};

//! The gRPC APIs of tiermq, generated at build time from `proto/*.proto` (no `protoc` needed).
//!
//! - [`raft`]: backend ↔ backend transport of Raft messages, batched per peer.
//! - [`broker`]: frontend ↔ backend session operations, deliveries and routes.

/// Current version of the APIs; a receiver refuses other versions with a clear error.
pub const API_VERSION: u32 = 1;

pub mod raft {
    tonic::include_proto!("tiermq.raft.v1");
}

/// Frontend ↔ backend: ordered operation streams, session events, route table, cluster info.
pub mod broker {
    tonic::include_proto!("tiermq.broker.v1");
}

pub mod client;
pub mod tls;

//! The gRPC APIs of tiermq, generated at build time from `proto/*.proto` (no `protoc` needed).
//!
//! - [`raft`]: backend ↔ backend transport of Raft messages, batched per peer.

/// Current version of the APIs; a receiver refuses other versions with a clear error.
pub const API_VERSION: u32 = 1;

pub mod raft {
    tonic::include_proto!("tiermq.raft.v1");
}

//! Multi-raft: one Raft group per partition this node replicates.
//!
//! - [`storage`]: `raft::Storage` over sled (log, hard state, snapshots).
//! - [`node`]: the driver loop of a node (propose, ready, persist, send, apply, advance).
//! - [`timings`]: commit and fsync latency, proposals per partition (metrics).
//! - [`transport`]: Raft messages between nodes over gRPC, batched per peer.

pub mod clock;
pub mod node;
pub mod storage;
pub mod timings;
pub mod transport;

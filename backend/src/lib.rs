//! The backend tier: partitions that own sessions, subscriptions, queues and retained
//! messages.
//!
//! - [`partition`]: the deterministic partition state machine (MQTT session semantics).
//! - [`storage`]: the partition's write-ahead log and checkpoints in sled.
//! - [`local`]: the in-process runtime used by `tiermq standalone` — partitions as tasks,
//!   group commit, and the [`tiermq_common::session_api::SessionService`] implementation.

pub mod cluster;
pub mod effects;
pub mod local;
pub mod members;
pub mod partition;
pub mod placement;
pub mod raft;
pub mod storage;

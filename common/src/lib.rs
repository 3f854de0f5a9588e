//! The bottom layer of tiermq, shared by both tiers: the MQTT codec, topic names and filters,
//! the subscription trie, the application message, configuration and the narrow session
//! interface through which a frontend reaches partitions (in-process or over gRPC).

pub mod codec;
pub mod config;
pub mod hashing;
pub mod latency;
pub mod log_limit;
pub mod message;
pub mod partition_api;
pub mod released_ids;
pub mod retained_index;
pub mod route_lease;
pub mod router;
pub mod session_api;
pub mod shared_dispatch;
pub mod topic;
pub mod trie;
pub mod types;

pub use message::{Message, MessageProperties};
pub use types::{ProtocolVersion, QoS, ReasonCode};

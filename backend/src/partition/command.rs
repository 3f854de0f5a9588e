//! The inputs and outputs of the partition state machine. Commands and replies are defined in
//! `tiermq_common::partition_api` (both tiers speak them); effects stay here: only the
//! runtime that applies commands carries them out.

use std::sync::Arc;

use tiermq_common::Message;

pub use tiermq_common::partition_api::*;

/// What the runtime must do once a command is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Push an event to the connection `epoch` of `client_id` (if it is still that one).
    Send {
        client_id: Arc<str>,
        epoch: u64,
        event: tiermq_common::session_api::SessionEvent,
    },
    /// A will fired (inside `Partition::apply` only: `apply` turns it into a recorded
    /// `SharedWork::Will` before it leaves the partition).
    PublishWill {
        client_id: Arc<str>,
        message: Message,
    },
    /// This partition now has at least one subscription on `filter` (route table).
    RouteAdded { filter: String },
    /// This partition has no subscription left on `filter`.
    RouteRemoved { filter: String },
    /// A cross-partition step of a shared subscription (`tiermq_common::shared_dispatch`).
    Shared(SharedWork),
}

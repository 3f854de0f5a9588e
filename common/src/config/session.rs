//! `[session]`: what a session may hold and how shared subscriptions and full queues behave.

use clap::ArgAction::Set;
use serde::Deserialize;

use crate::partition_api::{QueueFullPolicy, SharedStrategy};

#[derive(Debug, Clone, PartialEq, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct SessionSettings {
    /// Messages queued per session beyond the in-flight window (what happens beyond it:
    /// `queue_full_policy`).
    #[arg(long, env = "TIERMQ_MAX_QUEUED_MESSAGES", default_value_t = 100_000)]
    pub max_queued_messages: usize,
    /// Queue QoS0 messages for offline persistent sessions.
    #[arg(long, env = "TIERMQ_QUEUE_QOS0_OFFLINE", action = Set, default_value_t = false)]
    pub queue_qos0_offline: bool,
    /// Subscriptions per client; 0 = unlimited.
    #[arg(long, env = "TIERMQ_MAX_SUBSCRIPTIONS", default_value_t = 0)]
    pub max_subscriptions: usize,
    /// How a shared subscription group picks a member: `round-robin`, `random` or
    /// `sticky-by-publisher`.
    #[arg(long, env = "TIERMQ_SHARED_STRATEGY", default_value = "round-robin")]
    pub shared_strategy: SharedStrategy,
    /// A full queue (`max_queued_messages`): `drop-oldest` keeps the newest messages,
    /// `refuse-new` keeps the queue and answers a v5 publisher 0x97 Quota exceeded.
    #[arg(long, env = "TIERMQ_QUEUE_FULL_POLICY", default_value = "drop-oldest")]
    pub queue_full_policy: QueueFullPolicy,
}

impl Default for SessionSettings {
    fn default() -> Self {
        super::flags::defaults()
    }
}

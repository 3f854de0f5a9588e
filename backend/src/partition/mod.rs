//! The partition state machine: MQTT session semantics as a pure function of commands.
//!
//! `apply(index, entry)` mutates the state and returns a reply plus effects. It reads no clock,
//! does no I/O and draws no random numbers: the time is in the entry, the connection epoch is
//! the log index. Every replica that applies the same log therefore holds the same sessions,
//! subscriptions, queues and retained messages — which is what lets one implementation serve
//! the standalone broker (a single replica with a local log) and the Raft-replicated cluster.
//!
//! One `impl Partition` is spread over files by job:
//!
//! - `apply.rs`: `apply`, the dispatch of each command, and the small transitions (acks,
//!   inbound QoS2 receipt and release, a lost frontend).
//! - `connection.rs`: CONNECT, takeover, the end of a connection and of a session.
//! - `subscribe.rs`: SUBSCRIBE / UNSUBSCRIBE; `retained.rs`: the retained messages.
//! - `publish.rs`: `Command::Publish` and inbound QoS2 idempotency; `delivery.rs`: matching
//!   subscribers, QoS0 delivery, the replay to a frontend.
//! - `tick.rs`: expiry of keys, retained messages, delayed wills and sessions; `wills.rs`: the
//!   outbox that publishes each fired will once.
//! - `image.rs`: the snapshot image, restore, and the load totals.
//! - `session.rs`, `shared.rs`, `qos2_keys.rs`: the state's parts (one session, shared
//!   subscription groups, other publishers' QoS2 keys); `command.rs`: inputs and outputs.

mod apply;
pub mod command;
mod connection;
mod delivery;
mod image;
mod publish;
pub mod qos2_keys;
mod retained;
pub mod session;
pub mod shared;
mod subscribe;
#[cfg(test)]
mod tests;
mod tick;
mod wills;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use tiermq_common::retained_index::TopicTree;
use tiermq_common::session_api::SubscriptionOptions;
use tiermq_common::trie::TopicTrie;
use tiermq_common::Message;

use command::{Effect, Reply};
use session::{Session, SessionLimits, StoredSubscription};

pub use image::{PartitionImage, PartitionLoad};
pub use session::SessionLimits as Limits;
pub use wills::TAKEOVER_WILL_GRACE_MS;

/// What changed since the last checkpoint, so a checkpoint writes only that.
#[derive(Debug, Default)]
pub struct Dirty {
    pub sessions: HashSet<Arc<str>>,
    pub retained: HashSet<String>,
    /// The shared-subscription state (groups, handoffs, returns), written whole.
    pub shared: bool,
    /// Publishers whose inbound QoS2 keys changed.
    pub qos2_keys: HashSet<Arc<str>>,
}

/// The state of one partition.
pub struct Partition {
    limits: SessionLimits,
    sessions: HashMap<Arc<str>, Session>,
    /// Non-shared subscriptions of this partition's sessions: filter -> client id -> options.
    subscriptions: TopicTrie<Arc<str>, StoredSubscription>,
    retained: TopicTree<Arc<Message>>,
    /// Shared subscription groups whose key hashes here, with their handoffs in progress.
    shared: shared::SharedState,
    /// The groups' filters: filter -> group key (`$share/<group>/<filter>`).
    shared_filters: TopicTrie<String, ()>,
    /// Sessions with a pending delayed will, by due time.
    will_timers: BTreeSet<(u64, Arc<str>)>,
    /// Offline sessions by expiry time.
    expiry_timers: BTreeSet<(u64, Arc<str>)>,
    /// Retained messages with a Message Expiry Interval, by expiry time (removed on Tick).
    retained_expiry: BTreeSet<(u64, String)>,
    /// Inbound QoS2 idempotency keys of publishers whose sessions live elsewhere.
    qos2_keys: qos2_keys::Qos2Keys,
    applied_index: u64,
    dirty: Dirty,
}

impl Partition {
    pub fn new(limits: SessionLimits) -> Self {
        Partition {
            limits,
            sessions: HashMap::new(),
            subscriptions: TopicTrie::new(),
            retained: TopicTree::new(),
            shared: shared::SharedState::default(),
            shared_filters: TopicTrie::new(),
            will_timers: BTreeSet::new(),
            expiry_timers: BTreeSet::new(),
            retained_expiry: BTreeSet::new(),
            qos2_keys: qos2_keys::Qos2Keys::default(),
            applied_index: 0,
            dirty: Dirty::default(),
        }
    }

    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    pub fn session(&self, client_id: &str) -> Option<&Session> {
        self.sessions.get(client_id)
    }

    /// Frontends holding at least one connection of this partition's sessions.
    pub fn attached_frontends(&self) -> std::collections::BTreeSet<u64> {
        self.sessions
            .values()
            .filter_map(|s| s.attachment.map(|a| a.frontend_id))
            .collect()
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    pub fn retained_count(&self) -> usize {
        self.retained.len()
    }

    pub fn subscription_count(&self) -> usize {
        self.subscriptions.len()
    }

    /// Distinct filters with at least one subscription (to seed a route table).
    pub fn filters(&self) -> Vec<String> {
        let mut set = BTreeSet::new();
        for (filter, _, _) in self.subscriptions.iter() {
            set.insert(filter.to_string());
        }
        for group in self.shared.groups.values() {
            set.insert(group.filter.clone());
        }
        set.into_iter().collect()
    }

    pub fn take_dirty(&mut self) -> Dirty {
        std::mem::take(&mut self.dirty)
    }

    /// Puts back what [`Partition::take_dirty`] returned when writing it failed, so the next
    /// checkpoint writes it again.
    pub fn restore_dirty(&mut self, dirty: Dirty) {
        self.dirty.sessions.extend(dirty.sessions);
        self.dirty.retained.extend(dirty.retained);
        self.dirty.shared |= dirty.shared;
        self.dirty.qos2_keys.extend(dirty.qos2_keys);
    }

    /// One publisher's inbound QoS2 keys held here (for a checkpoint).
    pub fn qos2_keys_of(&self, publisher: &str) -> Option<&qos2_keys::PublisherKeys> {
        self.qos2_keys.publisher(publisher)
    }

    fn attached_mut(&mut self, client_id: &str, epoch: u64) -> Result<&mut Session, Reply> {
        match self.sessions.get_mut(client_id) {
            None => Err(Reply::NoSession),
            Some(s) if s.epoch() == Some(epoch) => Ok(s),
            Some(_) => Err(Reply::Fenced),
        }
    }
}

#[allow(dead_code)]
fn _assert_send() {
    fn is_send<T: Send>() {}
    is_send::<Partition>();
    let _ = SubscriptionOptions::default;
}

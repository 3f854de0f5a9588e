//! Retained messages: storing and removing them with their expiry index, the compare-and-swap
//! of `ReplaceRetained`, and what a new subscription is sent.
//!
//! The retained index and its expiry timers must change together; this file is the only
//! place that touches both.

use std::sync::Arc;

use tiermq_common::retained_index::TopicTree;
use tiermq_common::Message;

use super::command::{Reply, RetainedForSubscription};
use super::session::{QueuedMessage, Session, SessionLimits};
use super::{Effect, Partition};

impl Partition {
    pub(super) fn store_retained(&mut self, m: Arc<Message>) {
        let topic = m.topic.clone();
        if let Some(at) = m.expires_at_ms {
            self.retained_expiry.insert((at, topic.clone()));
        }
        if let Some(old) = self.retained.insert(&topic, m) {
            self.forget_retained_expiry(&old);
        }
    }

    pub(super) fn remove_retained(&mut self, topic: &str) {
        if let Some(old) = self.retained.remove(topic) {
            self.forget_retained_expiry(&old);
        }
    }

    fn forget_retained_expiry(&mut self, old: &Message) {
        if let Some(at) = old.expires_at_ms {
            // A replacement with the same deadline re-inserted the same key just before.
            let still = self
                .retained
                .get(&old.topic)
                .is_some_and(|m| m.expires_at_ms == Some(at));
            if !still {
                self.retained_expiry.remove(&(at, old.topic.clone()));
            }
        }
    }

    pub fn retained_message(&self, topic: &str) -> Option<&Arc<Message>> {
        self.retained.get(topic)
    }

    /// [`Command::ReplaceRetained`](super::command::Command::ReplaceRetained): a compare-and-swap
    /// of `message`'s topic on its payload.
    pub(super) fn replace_retained(
        &mut self,
        message: Arc<Message>,
        expected: Option<bytes::Bytes>,
    ) -> Reply {
        let current = self.retained.get(&message.topic).map(|m| &m.payload);
        if current != expected.as_ref() {
            return Reply::Replaced { done: false };
        }
        let topic = message.topic.clone();
        self.store_retained(message);
        self.dirty.retained.insert(topic);
        Reply::Replaced { done: true }
    }

    /// Retained messages matching `filter` (read-only; used to answer a subscribe made on
    /// another partition).
    pub fn retained_matching(&self, filter: &str, now_ms: u64) -> Vec<Arc<Message>> {
        retained_for_filter(&self.retained, filter, now_ms)
    }
}

pub(super) fn enqueue_retained(
    session: &mut Session,
    r: &RetainedForSubscription,
    now: u64,
    limits: &SessionLimits,
    effects: &mut Vec<Effect>,
) {
    for m in &r.messages {
        // Retained messages on subscribe: the subscriber asked for them; a full queue simply
        // does not take them (nobody to answer 0x97 to).
        let _ = session.enqueue(
            QueuedMessage {
                message: m.clone(),
                qos: m.qos.min(r.options.qos),
                // Retained messages sent because of a subscribe keep RETAIN=1 (§3.3.1.3).
                retain: true,
                subscription_ids: r.subscription_id.into_iter().collect(),
                shared: None,
            },
            now,
            limits,
            effects,
        );
    }
}

/// Retained messages matching `filter` and not expired at `now_ms`, sorted by topic (the
/// index walks hash maps, whose order differs between replicas).
pub(super) fn retained_for_filter(
    tree: &TopicTree<Arc<Message>>,
    filter: &str,
    now_ms: u64,
) -> Vec<Arc<Message>> {
    let mut out = Vec::new();
    tree.for_each_matching(filter, |_, m| {
        if !m.is_expired(now_ms) {
            out.push(m.clone());
        }
    });
    out.sort_by(|a, b| a.topic.cmp(&b.topic));
    out
}

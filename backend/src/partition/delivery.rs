//! Who a message goes to: matching subscriptions per session, QoS0 delivery without a log
//! entry, and the replay of in-flight messages to a frontend that reopened its event stream.
//!
//! Every path here must produce the same deliveries on every replica, hence the sorting of
//! what the tries and hash maps return.

use std::collections::BTreeMap;
use std::sync::Arc;

use tiermq_common::session_api::SessionEvent;
use tiermq_common::{Message, QoS};

use super::{Effect, Partition};

impl Partition {
    /// Sessions attached to connections on `frontend_id` and their in-flight messages, for a
    /// frontend that (re)opened its event stream to a new leader. Read-only.
    pub fn replay_for_frontend(&self, frontend_id: u64, now_ms: u64) -> Vec<Effect> {
        let mut ids: Vec<&Arc<str>> = self
            .sessions
            .values()
            .filter(|s| s.attachment.is_some_and(|a| a.frontend_id == frontend_id))
            .map(|s| &s.client_id)
            .collect();
        ids.sort();
        let mut effects: Vec<Effect> = ids
            .into_iter()
            .flat_map(|id| self.sessions[id].replay_inflight(now_ms))
            .collect();
        // Computed from the state as of the last applied entry: a connection recognises a
        // replay older than a PUBREC's answer by it (`tiermq_common::released_ids`).
        stamp_deliveries(&mut effects, self.applied_index);
        effects
    }

    /// Delivers a QoS0 message to online subscribers without logging it: nothing about the
    /// state changes (unless QoS0 is queued for offline sessions, which then goes through
    /// [`Command::Publish`](super::command::Command::Publish)).
    pub fn deliver_qos0(
        &self,
        message: &Arc<Message>,
        publisher: Option<&str>,
        now_ms: u64,
    ) -> (bool, Vec<Effect>) {
        let mut effects = Vec::new();
        let targets = self.match_subscribers(message, publisher);
        let mut matched = !targets.is_empty();
        let before = effects.len();
        self.deliver_qos0_shared(message, &mut effects);
        matched |= effects.len() > before;
        for (client_id, t) in targets {
            let Some(s) = self.sessions.get(&client_id) else {
                continue;
            };
            let Some(epoch) = s.epoch() else { continue };
            effects.push(Effect::Send {
                client_id: client_id.clone(),
                epoch,
                event: SessionEvent::Deliver(tiermq_common::session_api::Delivery {
                    packet_id: None,
                    qos: QoS::AtMostOnce,
                    retain: t.retain,
                    dup: false,
                    subscription_ids: t.subscription_ids,
                    expiry_secs: message.remaining_expiry_secs(now_ms),
                    message: message.clone(),
                    index: Some(self.applied_index),
                }),
            });
        }
        (matched, effects)
    }

    /// Finds, per session, what a message means for it: the highest granted QoS among its
    /// matching subscriptions, all their subscription identifiers, and the retain flag.
    pub(super) fn match_subscribers(
        &self,
        message: &Message,
        publisher: Option<&str>,
    ) -> BTreeMap<Arc<str>, Target> {
        let mut targets: BTreeMap<Arc<str>, Target> = BTreeMap::new();
        self.subscriptions
            .for_each_match(&message.topic, |_filter, client_id, sub| {
                if sub.options.no_local && publisher == Some(&**client_id) {
                    return;
                }
                let qos = message.qos.min(sub.options.qos);
                let retain = message.retain && sub.options.retain_as_published;
                let t = targets.entry(client_id.clone()).or_insert(Target {
                    qos,
                    retain,
                    subscription_ids: Vec::new(),
                });
                t.qos = t.qos.max(qos);
                t.retain |= retain;
                if let Some(id) = sub.subscription_id {
                    t.subscription_ids.push(id);
                }
            });
        // The trie reports matches in hash-map order: sort the identifiers so every replica
        // sends the same delivery.
        for t in targets.values_mut() {
            t.subscription_ids.sort_unstable();
            t.subscription_ids.dedup();
        }
        targets
    }
}

pub(super) struct Target {
    pub(super) qos: QoS,
    pub(super) retain: bool,
    pub(super) subscription_ids: Vec<u32>,
}

/// Sets the index at which deliveries were computed (`Delivery::index`).
pub(super) fn stamp_deliveries(effects: &mut [Effect], index: u64) {
    for effect in effects {
        if let Effect::Send {
            event: SessionEvent::Deliver(d),
            ..
        } = effect
        {
            d.index = Some(index);
        }
    }
}

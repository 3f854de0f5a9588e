//! `Command::Publish`: storing a retained message, queueing the message for matching sessions,
//! and the inbound QoS2 bookkeeping that keeps a re-sent QoS2 message from being delivered twice.

use std::sync::Arc;

use tiermq_common::{Message, QoS};

use super::command::{InboundQos2, Reply};
use super::session::QueuedMessage;
use super::{qos2_keys, Effect, Partition};

impl Partition {
    /// Queues `message` for the matching sessions (and stores it if retained here).
    /// Returns whether any subscription matched and whether any queue refused it.
    pub(super) fn publish(
        &mut self,
        message: Arc<Message>,
        publisher: Option<&str>,
        store_retained: bool,
        index: u64,
        now: u64,
        effects: &mut Vec<Effect>,
    ) -> (bool, bool) {
        if store_retained && message.retain {
            let topic = message.topic.clone();
            if message.payload.is_empty() {
                self.remove_retained(&topic);
            } else {
                self.store_retained(message.clone());
            }
            self.dirty.retained.insert(topic);
        }
        let targets = self.match_subscribers(&message, publisher);
        let mut matched = !targets.is_empty();
        matched |= self.publish_shared(&message, publisher, index, effects);
        let mut refused = false;
        for (client_id, t) in targets {
            let Some(s) = self.sessions.get_mut(&client_id) else {
                continue;
            };
            refused |= !s.enqueue(
                QueuedMessage {
                    message: message.clone(),
                    qos: t.qos,
                    retain: t.retain,
                    subscription_ids: t.subscription_ids,
                    shared: None,
                },
                now,
                &self.limits,
                effects,
            );
            if t.qos != QoS::AtMostOnce || self.limits.queue_qos0_offline {
                self.dirty.sessions.insert(client_id);
            }
        }
        (matched, refused)
    }

    /// A v5 publisher is answered PUBREC 0x97 for a refused QoS2 message, which ends that
    /// exchange (§4.3.3): no PUBREL follows and the client may reuse the packet id at once, so
    /// the id must not stay recorded (its next message would be taken for a duplicate). A
    /// v3.1.1 publisher cannot be told: its connection is closed and it re-sends, which the
    /// recorded id then answers without delivering twice to the subscribers that took it.
    pub(super) fn forget_refused_qos2(&mut self, q: &InboundQos2) {
        if q.token.is_some() {
            // Not the publisher's partition: the key stays, so the v3.1.1 re-send is not
            // delivered twice here; a v5 client's reused id comes with a new token.
            return;
        }
        if let Some(s) = self.sessions.get_mut(&q.client_id) {
            if s.protocol.is_v5() {
                s.inbound_qos2.remove(&q.packet_id);
            }
        }
    }

    /// Records an inbound QoS2 message before it is delivered here: in the publisher's session
    /// (its own partition: `q.token` is `None`, the token becomes `index`) or in the keys of
    /// publishers from elsewhere. Returns the message's token and whether to deliver it.
    pub(super) fn admit_qos2(
        &mut self,
        q: &InboundQos2,
        index: u64,
        now: u64,
    ) -> Result<(u64, bool), Reply> {
        match q.token {
            None => {
                let s = self.attached_mut(&q.client_id, q.epoch)?;
                let (token, admitted) = match s.inbound_qos2.get(&q.packet_id) {
                    Some(token) => (*token, false),
                    None => {
                        s.inbound_qos2.insert(q.packet_id, index);
                        (index, true)
                    }
                };
                self.dirty.sessions.insert(q.client_id.clone());
                Ok((token, admitted))
            }
            Some(token) => {
                let verdict = self
                    .qos2_keys
                    .admit(&q.client_id, q.packet_id, token, q.epoch, now);
                if verdict == qos2_keys::Verdict::Deliver {
                    self.dirty.qos2_keys.insert(q.client_id.clone());
                }
                Ok((token, verdict == qos2_keys::Verdict::Deliver))
            }
        }
    }
}

//! One MQTT session as its partition keeps it: who holds the connection, subscriptions, the
//! will, and the outbound QoS1/QoS2 queue with its in-flight window.
//!
//! Packet ids of outbound messages are assigned here, not by the frontend, because they are
//! part of the session (§4.4: after a reconnect, unacknowledged PUBLISH and PUBREL packets are
//! re-sent with their original packet identifiers) and must survive a failover.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tiermq_common::session_api::{Delivery, SessionEvent, SubscriptionOptions, Will};
use tiermq_common::{Message, ProtocolVersion, QoS};

use super::command::Effect;

/// The connection currently attached to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub epoch: u64,
    pub frontend_id: u64,
    /// The frontend's number for the CONNECT that attached it (`Command::Connect`): a
    /// re-sent copy of that CONNECT is answered with this attachment (0: none).
    pub connection: u64,
    /// What that CONNECT was answered, to answer a re-sent copy the same.
    pub session_present: bool,
}

/// A subscription as stored with its session (the filter is the key of the map holding it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSubscription {
    pub options: SubscriptionOptions,
    pub subscription_id: Option<u32>,
}

/// A message waiting for, or in, the in-flight window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedMessage {
    pub message: Arc<Message>,
    pub qos: QoS,
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
    /// The shared subscription (`$share/<group>/<filter>`) that handed this message over:
    /// if the member leaves without acknowledging it, it goes back to the group.
    pub shared: Option<Arc<str>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InflightState {
    /// PUBLISH sent, waiting for PUBACK (QoS1) or PUBREC (QoS2).
    Published,
    /// QoS2: PUBREC received, PUBREL sent, waiting for PUBCOMP.
    Released,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inflight {
    pub packet_id: u16,
    pub state: InflightState,
    pub item: QueuedMessage,
    /// Sent on the current connection. After a reconnect with a smaller Receive Maximum only
    /// the first entries are re-sent; the others wait, with their packet ids, for a free slot.
    pub sent: bool,
}

/// Limits the session engine enforces; part of the deterministic configuration of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Messages queued per session beyond the in-flight window; the oldest is dropped beyond it.
    pub max_queued_messages: usize,
    /// Queue QoS0 messages for offline persistent sessions (off by default, as the seed).
    pub queue_qos0_offline: bool,
    /// Subscriptions per client; 0 means unlimited.
    pub max_subscriptions: usize,
    /// How shared subscription groups pick a member.
    pub shared_strategy: tiermq_common::partition_api::SharedStrategy,
    /// What a full queue does with a new message.
    pub queue_full: tiermq_common::partition_api::QueueFullPolicy,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            max_queued_messages: 100_000,
            queue_qos0_offline: false,
            max_subscriptions: 0,
            shared_strategy: Default::default(),
            queue_full: Default::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub client_id: Arc<str>,
    pub protocol: ProtocolVersion,
    pub attachment: Option<Attachment>,
    /// Session Expiry Interval in seconds; `u32::MAX` never expires.
    pub expiry_secs: u32,
    /// When the session expires, set while it has no connection.
    pub expires_at_ms: Option<u64>,
    pub will: Option<Will>,
    /// When a delayed will fires, set while it is pending.
    pub will_at_ms: Option<u64>,
    pub subscriptions: BTreeMap<String, StoredSubscription>,
    pub receive_maximum: u16,
    pub next_packet_id: u16,
    pub inflight: VecDeque<Inflight>,
    pub queue: VecDeque<QueuedMessage>,
    /// Inbound QoS2 packet ids received and not yet released by PUBREL, each with its
    /// message's idempotency token (the log index of the entry that recorded it; see
    /// `InboundQos2`), which the other target partitions deduplicate on.
    pub inbound_qos2: BTreeMap<u16, u64>,
    /// Messages dropped because the queue was full (reported in metrics).
    pub dropped: u64,
    /// The will of a connection taken over from another frontend, held until that
    /// connection's end is reported or `at_ms` passes (see `HeldWill`).
    pub held_will: Option<HeldWill>,
}

/// A will held at a takeover across frontends. The client may have sent DISCONNECT 0x00 on
/// its old connection (which discards the will) and reconnected at once through another
/// frontend, whose CONNECT can reach the partition before the old frontend's report of the
/// DISCONNECT: firing the will at the takeover would publish a will the client cancelled. So
/// it waits for that report (a late `Disconnect` of `epoch`) for a short grace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldWill {
    pub epoch: u64,
    pub at_ms: u64,
    pub will: Will,
}

impl Session {
    pub fn new(client_id: Arc<str>, protocol: ProtocolVersion) -> Self {
        Session {
            client_id,
            protocol,
            attachment: None,
            expiry_secs: 0,
            expires_at_ms: None,
            will: None,
            will_at_ms: None,
            subscriptions: BTreeMap::new(),
            receive_maximum: u16::MAX,
            next_packet_id: 1,
            inflight: VecDeque::new(),
            queue: VecDeque::new(),
            inbound_qos2: BTreeMap::new(),
            dropped: 0,
            held_will: None,
        }
    }

    pub fn is_online(&self) -> bool {
        self.attachment.is_some()
    }

    pub fn epoch(&self) -> Option<u64> {
        self.attachment.map(|a| a.epoch)
    }

    /// Adds a matched message for this session and sends what the window allows. Returns
    /// false when the queue was full and the policy refused the message.
    pub fn enqueue(
        &mut self,
        item: QueuedMessage,
        now_ms: u64,
        limits: &SessionLimits,
        effects: &mut Vec<Effect>,
    ) -> bool {
        if item.qos == QoS::AtMostOnce {
            if let Some(epoch) = self.epoch() {
                // QoS0 to an online session goes straight out; it is never queued in order
                // with QoS1/2 because it carries no packet id and no ack.
                effects.push(self.delivery(epoch, None, false, &item, now_ms));
                return true;
            }
            if !limits.queue_qos0_offline || self.expiry_secs == 0 {
                return true;
            }
        }
        if limits.queue_full == tiermq_common::partition_api::QueueFullPolicy::RefuseNew
            && self.queue.len() >= limits.max_queued_messages
        {
            self.dropped += 1;
            return false;
        }
        self.queue.push_back(item);
        self.pump(now_ms, effects);
        // The limit applies to what waits behind the in-flight window: drop the oldest.
        while self.queue.len() > limits.max_queued_messages {
            self.queue.pop_front();
            self.dropped += 1;
        }
        true
    }

    /// Moves queued messages into the in-flight window while the client's Receive Maximum
    /// allows and a connection is attached. In-flight entries not yet re-sent on this
    /// connection go first, so the order is kept.
    pub fn pump(&mut self, now_ms: u64, effects: &mut Vec<Effect>) {
        let Some(epoch) = self.epoch() else { return };
        let window = usize::from(self.receive_maximum.max(1));
        let mut sent = self.inflight.iter().filter(|i| i.sent).count();
        let mut i = 0;
        while sent < window && i < self.inflight.len() {
            if self.inflight[i].sent {
                i += 1;
                continue;
            }
            let inflight = &self.inflight[i];
            if inflight.state == InflightState::Published
                && inflight.item.message.is_expired(now_ms)
            {
                self.inflight.remove(i);
                continue;
            }
            effects.push(self.resend(epoch, inflight, now_ms));
            self.inflight[i].sent = true;
            sent += 1;
            i += 1;
        }
        if sent < self.inflight.len() {
            return;
        }
        while self.inflight.len() < window {
            let Some(item) = self.queue.pop_front() else {
                break;
            };
            if item.message.is_expired(now_ms) {
                continue;
            }
            if item.qos == QoS::AtMostOnce {
                effects.push(self.delivery(epoch, None, false, &item, now_ms));
                continue;
            }
            let Some(packet_id) = self.allocate_packet_id() else {
                self.queue.push_front(item);
                break;
            };
            effects.push(self.delivery(epoch, Some(packet_id), false, &item, now_ms));
            self.inflight.push_back(Inflight {
                packet_id,
                state: InflightState::Published,
                item,
                sent: true,
            });
        }
    }

    /// After a reconnect: nothing in flight has been sent on the new connection yet. The
    /// following [`Session::pump`] re-sends, in the original order and as far as the client's
    /// Receive Maximum allows, PUBLISH with DUP for messages not yet acknowledged and PUBREL
    /// for QoS2 messages already PUBREC'd. Expired messages not yet PUBREC'd are dropped.
    pub fn resend_inflight(&mut self, now_ms: u64, effects: &mut Vec<Effect>) {
        for inflight in &mut self.inflight {
            inflight.sent = false;
        }
        self.pump(now_ms, effects);
    }

    /// The in-flight window as it was sent, again: PUBLISH with DUP or PUBREL. Read-only; used
    /// by a new leader, which cannot know what reached the client before the failover.
    pub fn replay_inflight(&self, now_ms: u64) -> Vec<Effect> {
        let Some(epoch) = self.epoch() else {
            return Vec::new();
        };
        self.inflight
            .iter()
            .filter(|i| i.sent)
            .map(|i| self.resend(epoch, i, now_ms))
            .collect()
    }

    fn resend(&self, epoch: u64, inflight: &Inflight, now_ms: u64) -> Effect {
        match inflight.state {
            InflightState::Published => self.delivery(
                epoch,
                Some(inflight.packet_id),
                true,
                &inflight.item,
                now_ms,
            ),
            InflightState::Released => Effect::Send {
                client_id: self.client_id.clone(),
                epoch,
                event: SessionEvent::Release {
                    packet_id: inflight.packet_id,
                },
            },
        }
    }

    /// Handles PUBACK/PUBREC/PUBCOMP. Returns false when the packet id is not in flight in the
    /// expected state (a late or duplicate ack, which is harmless).
    pub fn ack(&mut self, kind: super::command::AckCmd, packet_id: u16) -> bool {
        use super::command::AckCmd;
        let Some(pos) = self.inflight.iter().position(|i| i.packet_id == packet_id) else {
            return false;
        };
        let entry = &mut self.inflight[pos];
        match (kind, entry.item.qos, entry.state) {
            (AckCmd::PubAck, QoS::AtLeastOnce, InflightState::Published) => {
                self.inflight.remove(pos);
                true
            }
            (AckCmd::PubRec, QoS::ExactlyOnce, InflightState::Published) => {
                entry.state = InflightState::Released;
                true
            }
            (AckCmd::PubComp, QoS::ExactlyOnce, InflightState::Released) => {
                self.inflight.remove(pos);
                true
            }
            _ => false,
        }
    }

    /// Removes the shared-subscription messages not yet acknowledged, grouped by their group in
    /// delivery order. QoS2 messages in flight stay: once sent, a QoS2 message must be
    /// completed with this member when it reconnects and never go to another (§4.8.2,
    /// [MQTT-4.8.2-4], [MQTT-4.8.2-5]) — the client may hold it already, and giving it to
    /// another member too would deliver it twice. Queued ones were never sent and may go.
    pub fn take_shared_unacked(&mut self) -> BTreeMap<String, Vec<Arc<Message>>> {
        let mut out: BTreeMap<String, Vec<Arc<Message>>> = BTreeMap::new();
        let mut take = |item: &QueuedMessage| match &item.shared {
            Some(group) if item.qos != QoS::AtMostOnce => {
                out.entry(group.to_string())
                    .or_default()
                    .push(item.message.clone());
                false
            }
            _ => true,
        };
        self.inflight
            .retain(|i| i.item.qos == QoS::ExactlyOnce || take(&i.item));
        self.queue.retain(|q| take(q));
        out
    }

    /// The next packet id not in flight, wrapping from 65535 to 1 (0 is not a packet id).
    pub fn allocate_packet_id(&mut self) -> Option<u16> {
        if self.inflight.len() >= usize::from(u16::MAX) {
            return None;
        }
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = if id == u16::MAX { 1 } else { id + 1 };
            if !self.inflight.iter().any(|i| i.packet_id == id) {
                return Some(id);
            }
        }
    }

    fn delivery(
        &self,
        epoch: u64,
        packet_id: Option<u16>,
        dup: bool,
        item: &QueuedMessage,
        now_ms: u64,
    ) -> Effect {
        Effect::Send {
            client_id: self.client_id.clone(),
            epoch,
            event: SessionEvent::Deliver(Delivery {
                packet_id,
                qos: item.qos,
                retain: item.retain,
                dup,
                subscription_ids: item.subscription_ids.clone(),
                expiry_secs: item.message.remaining_expiry_secs(now_ms),
                message: item.message.clone(),
                // Set by the partition (`Partition::apply`, `replay_for_frontend`).
                index: None,
            }),
        }
    }
}

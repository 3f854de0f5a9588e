//! The partition state machine: MQTT session semantics as a pure function of commands.
//!
//! `apply(index, entry)` mutates the state and returns a reply plus effects. It reads no clock,
//! does no I/O and draws no random numbers: the time is in the entry, the connection epoch is
//! the log index. Every replica that applies the same log therefore holds the same sessions,
//! subscriptions, queues and retained messages — which is what lets one implementation serve
//! the standalone broker (a single replica with a local log) and the Raft-replicated cluster.

pub mod command;
pub mod qos2_keys;
pub mod session;
pub mod shared;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tiermq_common::retained_index::TopicTree;
use tiermq_common::session_api::{SessionEvent, SubscribeRequest, SubscriptionOptions, Will};
use tiermq_common::topic;
use tiermq_common::trie::TopicTrie;
use tiermq_common::{Message, ProtocolVersion, QoS, ReasonCode};

use command::{Command, Effect, Entry, InboundQos2, Reply, RetainedForSubscription, SharedWork};
use session::{Attachment, QueuedMessage, Session, SessionLimits, StoredSubscription};

pub use session::SessionLimits as Limits;

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

/// A whole partition's durable state, as a checkpoint or snapshot stores it.
#[derive(Debug, Serialize, Deserialize)]
pub struct PartitionImage {
    pub applied_index: u64,
    pub sessions: Vec<Session>,
    pub retained: Vec<Arc<Message>>,
    pub shared: shared::SharedState,
    pub qos2_keys: Vec<(Arc<str>, qos2_keys::PublisherKeys)>,
}

/// Totals over a partition's sessions ([`Partition::load`]); they add up across partitions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartitionLoad {
    /// Sessions stored, connected or not.
    pub sessions: u64,
    /// Sessions attached to a connection.
    pub connected: u64,
    /// Subscriptions of all sessions (offline ones included).
    pub subscriptions: u64,
    /// QoS1/2 deliveries sent and not yet acknowledged (or waiting for a window slot after
    /// a reconnect with a smaller Receive Maximum).
    pub inflight: u64,
    /// Messages queued behind the in-flight window or for offline sessions.
    pub queued: u64,
    /// Payload bytes of the queued messages.
    pub queued_bytes: u64,
}

impl std::ops::AddAssign for PartitionLoad {
    fn add_assign(&mut self, o: PartitionLoad) {
        self.sessions += o.sessions;
        self.connected += o.connected;
        self.subscriptions += o.subscriptions;
        self.inflight += o.inflight;
        self.queued += o.queued;
        self.queued_bytes += o.queued_bytes;
    }
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

    /// Rebuilds a partition from stored sessions and retained messages.
    pub fn restore(limits: SessionLimits, image: PartitionImage) -> Self {
        let mut p = Partition::new(limits);
        p.applied_index = image.applied_index;
        for m in image.retained {
            p.store_retained(m);
        }
        for s in image.sessions {
            p.install_session(s);
        }
        for (key, group) in &image.shared.groups {
            p.shared_filters.insert(&group.filter, key.clone(), ());
        }
        p.shared = image.shared;
        for (publisher, keys) in image.qos2_keys {
            p.qos2_keys.install(publisher, keys);
        }
        p
    }

    fn install_session(&mut self, s: Session) {
        for (filter, sub) in &s.subscriptions {
            // A shared subscription is membership of a group, indexed by the group's own
            // partition (`shared_filters`), never a plain filter of this session: as
            // `subscribe` keeps it.
            if !topic::is_shared(filter) {
                self.subscriptions.insert(filter, s.client_id.clone(), *sub);
            }
        }
        if let Some(at) = s.will_at_ms {
            self.will_timers.insert((at, s.client_id.clone()));
        }
        if let Some(h) = &s.held_will {
            self.will_timers.insert((h.at_ms, s.client_id.clone()));
        }
        if let Some(at) = s.expires_at_ms {
            self.expiry_timers.insert((at, s.client_id.clone()));
        }
        self.sessions.insert(s.client_id.clone(), s);
    }

    /// The whole state, for a snapshot. Sessions are sorted by client id and retained
    /// messages by topic, so replicas with the same state produce the same bytes.
    pub fn image(&self) -> PartitionImage {
        let mut sessions: Vec<Session> = self.sessions.values().cloned().collect();
        sessions.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        let mut retained: Vec<Arc<Message>> =
            self.retained.iter().map(|(_, m)| m.clone()).collect();
        retained.sort_by(|a, b| a.topic.cmp(&b.topic));
        PartitionImage {
            applied_index: self.applied_index,
            sessions,
            retained,
            shared: self.shared.clone(),
            qos2_keys: self.qos2_keys.image(),
        }
    }

    fn store_retained(&mut self, m: Arc<Message>) {
        let topic = m.topic.clone();
        if let Some(at) = m.expires_at_ms {
            self.retained_expiry.insert((at, topic.clone()));
        }
        if let Some(old) = self.retained.insert(&topic, m) {
            self.forget_retained_expiry(&old);
        }
    }

    fn remove_retained(&mut self, topic: &str) {
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

    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    pub fn session(&self, client_id: &str) -> Option<&Session> {
        self.sessions.get(client_id)
    }

    /// What this partition's sessions hold right now, for metrics (read-only; walks every
    /// session, so call it every few seconds, not per message).
    pub fn load(&self) -> PartitionLoad {
        let mut load = PartitionLoad::default();
        for s in self.sessions.values() {
            load.sessions += 1;
            load.connected += u64::from(s.attachment.is_some());
            load.subscriptions += s.subscriptions.len() as u64;
            load.inflight += s.inflight.len() as u64;
            load.queued += s.queue.len() as u64;
            load.queued_bytes += s
                .queue
                .iter()
                .map(|q| q.message.payload.len() as u64)
                .sum::<u64>();
        }
        load
    }

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

    /// The indexes a partition derives from its sessions, groups and retained messages (the
    /// subscription tries and the timers), sorted. They are not in the image: a restore rebuilds
    /// them, and this lets a test check that it rebuilds exactly what applying the log built.
    #[cfg(test)]
    pub(crate) fn derived_indexes(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .subscriptions
            .iter()
            .map(|(f, c, s)| format!("sub {f} {c} {s:?}"))
            .chain(
                self.shared_filters
                    .iter()
                    .map(|(f, g, _)| format!("shared {f} {g}")),
            )
            .chain(self.will_timers.iter().map(|t| format!("will {t:?}")))
            .chain(self.expiry_timers.iter().map(|t| format!("expiry {t:?}")))
            .chain(
                self.retained_expiry
                    .iter()
                    .map(|t| format!("retained {t:?}")),
            )
            .chain(self.qos2_keys.expiry_index())
            .collect();
        out.sort();
        out
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

    pub fn retained_message(&self, topic: &str) -> Option<&Arc<Message>> {
        self.retained.get(topic)
    }

    /// [`Command::ReplaceRetained`]: a compare-and-swap of `message`'s topic on its payload.
    fn replace_retained(&mut self, message: Arc<Message>, expected: Option<bytes::Bytes>) -> Reply {
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

    /// Delivers a QoS0 message to online subscribers without logging it: nothing about the
    /// state changes (unless QoS0 is queued for offline sessions, which then goes through
    /// [`Command::Publish`]).
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

    /// Applies one log entry. `index` must grow by one per call. The deliveries among the
    /// effects carry `index` ([`Delivery::index`](tiermq_common::session_api::Delivery)).
    pub fn apply(&mut self, index: u64, entry: Entry) -> (Reply, Vec<Effect>) {
        let (reply, mut effects) = self.apply_entry(index, entry);
        stamp_deliveries(&mut effects, index);
        self.record_wills(&mut effects);
        (reply, effects)
    }

    /// Wills exactly once: a will that fires is recorded in the entry that fires it (an outbox
    /// in the shared state, with a sequence number) and handed to the runtime as
    /// [`SharedWork::Will`], which publishes it to every partition under its own idempotency
    /// key and confirms with `WillPublished`. A crash or a leader change before the
    /// confirmation carries it out again ([`Partition::shared_work`]); the key makes the
    /// second time a no-op where the first one arrived.
    fn record_wills(&mut self, effects: &mut [Effect]) {
        for effect in effects.iter_mut() {
            if let Effect::PublishWill { client_id, message } = effect {
                let seq = self.shared.next_seq();
                let message = Arc::new(std::mem::replace(
                    message,
                    Message::new("", "", QoS::AtMostOnce, false),
                ));
                self.shared.wills.insert(
                    seq,
                    shared::PendingWill {
                        client_id: client_id.clone(),
                        message: message.clone(),
                    },
                );
                self.dirty.shared = true;
                *effect = Effect::Shared(SharedWork::Will {
                    seq,
                    client_id: client_id.clone(),
                    message,
                });
            }
        }
    }

    fn apply_entry(&mut self, index: u64, entry: Entry) -> (Reply, Vec<Effect>) {
        debug_assert!(index > self.applied_index, "log index must grow");
        self.applied_index = index;
        let now = entry.now_ms;
        let mut effects = Vec::new();
        let reply = match entry.command {
            Command::Connect {
                client_id,
                protocol,
                clean_start,
                session_expiry_secs,
                receive_maximum,
                will,
                frontend_id,
                connection,
            } => self.connect(
                index,
                now,
                ConnectArgs {
                    client_id,
                    protocol,
                    clean_start,
                    session_expiry_secs,
                    receive_maximum,
                    will,
                    frontend_id,
                    connection,
                },
                &mut effects,
            ),
            Command::Disconnect {
                client_id,
                epoch,
                normal,
                with_will,
                session_expiry_secs,
            } => self.disconnect(
                &client_id,
                epoch,
                now,
                normal,
                with_will,
                session_expiry_secs,
                &mut effects,
            ),
            Command::Subscribe {
                client_id,
                epoch,
                subscriptions,
            } => self.subscribe(&client_id, epoch, subscriptions, now, &mut effects),
            Command::Unsubscribe {
                client_id,
                epoch,
                filters,
            } => self.unsubscribe(&client_id, epoch, filters, &mut effects),
            Command::Publish {
                message,
                publisher,
                store_retained,
                inbound_qos2,
            } => {
                let mut duplicate = false;
                let mut qos2_token = None;
                if let Some(q) = &inbound_qos2 {
                    match self.admit_qos2(q, index, now) {
                        Ok((token, admitted)) => {
                            qos2_token = Some(token);
                            duplicate = !admitted;
                        }
                        Err(r) => return (r, effects),
                    }
                }
                if duplicate {
                    Reply::Published {
                        matched: true,
                        duplicate: true,
                        refused: false,
                        qos2_token,
                    }
                } else {
                    let (matched, refused) = self.publish(
                        message,
                        publisher.as_deref(),
                        store_retained,
                        index,
                        now,
                        &mut effects,
                    );
                    if let (Some(q), true) = (&inbound_qos2, refused) {
                        self.forget_refused_qos2(q);
                    }
                    Reply::Published {
                        matched,
                        duplicate: false,
                        refused,
                        qos2_token,
                    }
                }
            }
            Command::Qos2Received {
                client_id,
                epoch,
                packet_id,
            } => match self.attached_mut(&client_id, epoch) {
                Ok(s) => {
                    let duplicate = s.inbound_qos2.contains_key(&packet_id);
                    s.inbound_qos2.entry(packet_id).or_insert(index);
                    self.dirty.sessions.insert(client_id);
                    Reply::Qos2Received { duplicate }
                }
                Err(r) => r,
            },
            Command::Qos2Release {
                client_id,
                epoch,
                packet_id,
            } => match self.attached_mut(&client_id, epoch) {
                Ok(s) => {
                    let found = s.inbound_qos2.remove(&packet_id).is_some();
                    self.dirty.sessions.insert(client_id);
                    Reply::Released { found }
                }
                Err(r) => r,
            },
            Command::Ack {
                client_id,
                epoch,
                kind,
                packet_id,
            } => match self.attached_mut(&client_id, epoch) {
                Ok(s) => {
                    if s.ack(kind, packet_id) {
                        s.pump(now, &mut effects);
                        self.dirty.sessions.insert(client_id);
                    }
                    Reply::Acked { index }
                }
                Err(r) => r,
            },
            Command::DeliverRetained {
                client_id,
                epoch,
                retained,
            } => {
                let limits = self.limits;
                match self.attached_mut(&client_id, epoch) {
                    Ok(s) => {
                        for r in retained {
                            enqueue_retained(s, &r, now, &limits, &mut effects);
                        }
                        self.dirty.sessions.insert(client_id);
                        Reply::Done
                    }
                    Err(r) => r,
                }
            }
            Command::Tick => {
                self.tick(now, &mut effects);
                Reply::Done
            }
            Command::FrontendLost { frontend_id } => {
                let mut lost: Vec<(Arc<str>, u64)> = self
                    .sessions
                    .values()
                    .filter_map(|s| match s.attachment {
                        Some(a) if a.frontend_id == frontend_id => {
                            Some((s.client_id.clone(), a.epoch))
                        }
                        _ => None,
                    })
                    .collect();
                // Sessions live in a hash map: sort so every replica emits the same effects.
                lost.sort();
                for (client_id, epoch) in lost {
                    self.disconnect(&client_id, epoch, now, false, false, None, &mut effects);
                }
                Reply::Done
            }
            Command::SharedJoin { group, client_id } => {
                self.shared_join(group, client_id, &mut effects)
            }
            Command::SharedLeave { group, client_id } => {
                self.shared_leave(&group, &client_id, &mut effects)
            }
            Command::SharedDeliver {
                client_id,
                group,
                message,
                require_online,
            } => self.shared_deliver(
                &client_id,
                &group,
                message,
                require_online,
                now,
                &mut effects,
            ),
            Command::SharedHandoffDone {
                group: _,
                seq,
                member,
                outcome,
            } => self.shared_handoff_done(seq, &member, outcome, &mut effects),
            Command::SharedEnqueue {
                group,
                from,
                messages,
            } => self.shared_enqueue(group, &from, messages, index, &mut effects),
            Command::SharedReturnDone { seq } => self.shared_return_done(seq),
            Command::ReplaceRetained { message, expected } => {
                self.replace_retained(message, expected)
            }
            Command::WillPublished { seq } => {
                if self.shared.wills.remove(&seq).is_some() {
                    self.dirty.shared = true;
                }
                Reply::Done
            }
        };
        (reply, effects)
    }

    /// A v5 publisher is answered PUBREC 0x97 for a refused QoS2 message, which ends that
    /// exchange (§4.3.3): no PUBREL follows and the client may reuse the packet id at once, so
    /// the id must not stay recorded (its next message would be taken for a duplicate). A
    /// v3.1.1 publisher cannot be told: its connection is closed and it re-sends, which the
    /// recorded id then answers without delivering twice to the subscribers that took it.
    fn forget_refused_qos2(&mut self, q: &InboundQos2) {
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
    fn admit_qos2(&mut self, q: &InboundQos2, index: u64, now: u64) -> Result<(u64, bool), Reply> {
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

    /// A connection taken over from another frontend reports its end late: a normal
    /// DISCONNECT discards its held will, any other end publishes it now (`HeldWill`).
    fn report_taken_over(
        &mut self,
        client_id: &Arc<str>,
        epoch: u64,
        discard: bool,
        now: u64,
        effects: &mut Vec<Effect>,
    ) {
        let Some(s) = self.sessions.get_mut(client_id) else {
            return;
        };
        if s.held_will.as_ref().is_none_or(|h| h.epoch != epoch) {
            return;
        }
        let Some(h) = s.held_will.take() else { return };
        self.will_timers.remove(&(h.at_ms, client_id.clone()));
        self.dirty.sessions.insert(client_id.clone());
        if !discard {
            effects.push(Effect::PublishWill {
                client_id: client_id.clone(),
                message: will_message(&h.will, now),
            });
        }
    }

    fn attached_mut(&mut self, client_id: &str, epoch: u64) -> Result<&mut Session, Reply> {
        match self.sessions.get_mut(client_id) {
            None => Err(Reply::NoSession),
            Some(s) if s.epoch() == Some(epoch) => Ok(s),
            Some(_) => Err(Reply::Fenced),
        }
    }

    fn connect(
        &mut self,
        epoch: u64,
        now: u64,
        args: ConnectArgs,
        effects: &mut Vec<Effect>,
    ) -> Reply {
        let client_id = args.client_id;
        if let Some(att) = self
            .sessions
            .get(&client_id)
            .and_then(|s| s.attachment.as_ref())
        {
            if args.connection != 0
                && att.connection == args.connection
                && att.frontend_id == args.frontend_id
            {
                // A re-sent copy of the CONNECT that attached this connection (its answer was
                // lost): the same answer, nothing else.
                return Reply::Connected {
                    epoch: att.epoch,
                    session_present: att.session_present,
                };
            }
        }
        let mut session_present = false;
        let mut held = None;
        if let Some(old) = self.sessions.get_mut(&client_id) {
            // Whether the existing session ends here instead of being resumed.
            let mut session_ends = args.clean_start;
            if let Some(att) = old.attachment.take() {
                // Takeover of a live connection: close it (§3.1.4-3, v5 reason 0x8E).
                effects.push(Effect::Send {
                    client_id: client_id.clone(),
                    epoch: att.epoch,
                    event: SessionEvent::Disconnect {
                        reason: ReasonCode::SESSION_TAKEN_OVER,
                    },
                });
                // A session with expiry 0 ends when its network connection closes
                // (§3.1.2.11.2), which the takeover just did: there is nothing to resume.
                if old.expiry_secs == 0 {
                    session_ends = true;
                }
                // The old connection's will is published unless the session continues and
                // the will has a delay, which the reconnect then cancels (§3.1.3.2.2). From
                // another frontend, it waits a moment for the old connection's report first
                // (`HeldWill`).
                if let Some(will) = old.will.take() {
                    if session_ends || will.delay_secs == 0 {
                        if att.frontend_id != args.frontend_id {
                            held = Some(session::HeldWill {
                                epoch: att.epoch,
                                at_ms: now + TAKEOVER_WILL_GRACE_MS,
                                will,
                            });
                        } else {
                            effects.push(Effect::PublishWill {
                                client_id: client_id.clone(),
                                message: will_message(&will, now),
                            });
                        }
                    }
                }
            } else if old.expires_at_ms.is_some_and(|at| at <= now) {
                // Expired, though no Tick has removed it yet.
                session_ends = true;
            }
            // A reconnect cancels a pending delayed will (§3.1.3.2.2) — unless the session
            // ends here, or the delay has already run out, in which case the will fires now.
            if let Some(at) = old.will_at_ms.take() {
                self.will_timers.remove(&(at, client_id.clone()));
                if let Some(will) = old.will.take() {
                    if session_ends || at <= now {
                        effects.push(Effect::PublishWill {
                            client_id: client_id.clone(),
                            message: will_message(&will, now),
                        });
                    }
                }
            }
            if let Some(at) = old.expires_at_ms.take() {
                self.expiry_timers.remove(&(at, client_id.clone()));
            }
            // A will still held from an earlier takeover is fired now: one is held at a time.
            if let Some(h) = old.held_will.take() {
                self.will_timers.remove(&(h.at_ms, client_id.clone()));
                effects.push(Effect::PublishWill {
                    client_id: client_id.clone(),
                    message: will_message(&h.will, now),
                });
            }
            if session_ends {
                self.remove_session(&client_id, effects);
            } else {
                session_present = true;
            }
        }
        let session = self
            .sessions
            .entry(client_id.clone())
            .or_insert_with(|| Session::new(client_id.clone(), args.protocol));
        session.protocol = args.protocol;
        session.attachment = Some(Attachment {
            epoch,
            frontend_id: args.frontend_id,
            connection: args.connection,
            session_present,
        });
        session.expiry_secs = args.session_expiry_secs;
        session.receive_maximum = args.receive_maximum.max(1);
        session.will = args.will;
        if let Some(h) = held {
            self.will_timers.insert((h.at_ms, client_id.clone()));
            session.held_will = Some(h);
        }
        session.resend_inflight(now, effects);
        session.pump(now, effects);
        self.dirty.sessions.insert(client_id);
        Reply::Connected {
            epoch,
            session_present,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn disconnect(
        &mut self,
        client_id: &Arc<str>,
        epoch: u64,
        now: u64,
        normal: bool,
        with_will: bool,
        expiry_override: Option<u32>,
        effects: &mut Vec<Effect>,
    ) -> Reply {
        let session = match self.attached_mut(client_id, epoch) {
            Ok(s) => s,
            Err(r) => {
                self.report_taken_over(client_id, epoch, normal && !with_will, now, effects);
                return r;
            }
        };
        session.attachment = None;
        if let Some(e) = expiry_override {
            session.expiry_secs = e;
        }
        if normal && !with_will {
            session.will = None;
        }
        let expiry = session.expiry_secs;
        let mut fire_now = None;
        if let Some(will) = &session.will {
            if will.delay_secs == 0 || expiry == 0 {
                fire_now = session.will.take();
            } else {
                let delay = will.delay_secs.min(expiry);
                let at = now + u64::from(delay) * 1000;
                session.will_at_ms = Some(at);
                self.will_timers.insert((at, client_id.clone()));
            }
        }
        if let Some(will) = fire_now {
            effects.push(Effect::PublishWill {
                client_id: client_id.clone(),
                message: will_message(&will, now),
            });
        }
        self.dirty.sessions.insert(client_id.clone());
        // Shared-subscription messages this member did not acknowledge go to another member
        // now, rather than wait for it to come back (§4.8.2 allows both for QoS1; QoS2 ones
        // already sent stay, see `Session::take_shared_unacked`).
        self.return_shared(client_id, effects);
        if expiry == 0 {
            self.remove_session(client_id, effects);
        } else if expiry != u32::MAX {
            let at = now + u64::from(expiry) * 1000;
            if let Some(s) = self.sessions.get_mut(client_id) {
                s.expires_at_ms = Some(at);
            }
            self.expiry_timers.insert((at, client_id.clone()));
        }
        Reply::Done
    }

    fn remove_session(&mut self, client_id: &Arc<str>, effects: &mut Vec<Effect>) {
        self.return_shared(client_id, effects);
        let Some(s) = self.sessions.remove(client_id) else {
            return;
        };
        for filter in s.subscriptions.keys() {
            if topic::is_shared(filter) {
                effects.push(Effect::Shared(SharedWork::Leave {
                    group: filter.clone(),
                    client_id: client_id.clone(),
                }));
                continue;
            }
            self.subscriptions.remove(filter, client_id);
            if !self.has_route(filter) {
                effects.push(Effect::RouteRemoved {
                    filter: filter.clone(),
                });
            }
        }
        if let Some(at) = s.will_at_ms {
            self.will_timers.remove(&(at, client_id.clone()));
        }
        if let Some(h) = s.held_will {
            self.will_timers.remove(&(h.at_ms, client_id.clone()));
            effects.push(Effect::PublishWill {
                client_id: client_id.clone(),
                message: will_message(&h.will, now_of(&h)),
            });
        }
        if let Some(at) = s.expires_at_ms {
            self.expiry_timers.remove(&(at, client_id.clone()));
        }
        self.dirty.sessions.insert(client_id.clone());
    }

    fn subscribe(
        &mut self,
        client_id: &Arc<str>,
        epoch: u64,
        requests: Vec<SubscribeRequest>,
        now: u64,
        effects: &mut Vec<Effect>,
    ) -> Reply {
        let limits = self.limits;
        let session = match self.sessions.get_mut(client_id) {
            None => return Reply::NoSession,
            Some(s) if s.epoch() != Some(epoch) => return Reply::Fenced,
            Some(s) => s,
        };
        let mut reason_codes = Vec::with_capacity(requests.len());
        let mut want_retained = Vec::new();
        for req in requests {
            let filter = match topic::parse_subscription(&req.filter) {
                Err(e) => {
                    reason_codes.push(e.reason_code());
                    continue;
                }
                Ok((Some(group), f)) => {
                    // The membership is kept here, with the session (so it ends with it);
                    // the group itself lives in the partition of its key, which the caller
                    // joins next. Retained messages are not sent on a shared subscribe
                    // (§4.8.2).
                    let key = format!("{}{group}/{f}", topic::SHARE_PREFIX);
                    let is_new = !session.subscriptions.contains_key(&key);
                    if is_new
                        && limits.max_subscriptions > 0
                        && session.subscriptions.len() >= limits.max_subscriptions
                    {
                        reason_codes.push(ReasonCode::QUOTA_EXCEEDED);
                        continue;
                    }
                    session.subscriptions.insert(
                        key,
                        StoredSubscription {
                            options: req.options,
                            subscription_id: req.subscription_id,
                        },
                    );
                    reason_codes.push(ReasonCode(req.options.qos.as_u8()));
                    continue;
                }
                Ok((None, f)) => f.to_string(),
            };
            let is_new = !session.subscriptions.contains_key(&filter);
            if is_new
                && limits.max_subscriptions > 0
                && session.subscriptions.len() >= limits.max_subscriptions
            {
                reason_codes.push(ReasonCode::QUOTA_EXCEEDED);
                continue;
            }
            let stored = StoredSubscription {
                options: req.options,
                subscription_id: req.subscription_id,
            };
            session.subscriptions.insert(filter.clone(), stored);
            let had_route = self.subscriptions.contains_filter(&filter)
                || self.shared_filters.contains_filter(&filter);
            self.subscriptions
                .insert(&filter, client_id.clone(), stored);
            if !had_route {
                effects.push(Effect::RouteAdded {
                    filter: filter.clone(),
                });
            }
            reason_codes.push(ReasonCode(req.options.qos.as_u8()));
            let send_retained = match req.options.retain_handling {
                0 => true,
                1 => is_new,
                _ => false,
            };
            if send_retained {
                let messages = retained_for_filter(&self.retained, &filter, now);
                enqueue_retained(
                    session,
                    &RetainedForSubscription {
                        filter: filter.clone(),
                        options: req.options,
                        subscription_id: req.subscription_id,
                        messages,
                    },
                    now,
                    &limits,
                    effects,
                );
                want_retained.push((filter, req.options, req.subscription_id));
            }
        }
        self.dirty.sessions.insert(client_id.clone());
        Reply::Subscribed {
            reason_codes,
            want_retained,
        }
    }

    fn unsubscribe(
        &mut self,
        client_id: &Arc<str>,
        epoch: u64,
        filters: Vec<String>,
        effects: &mut Vec<Effect>,
    ) -> Reply {
        let session = match self.sessions.get_mut(client_id) {
            None => return Reply::NoSession,
            Some(s) if s.epoch() != Some(epoch) => return Reply::Fenced,
            Some(s) => s,
        };
        let mut codes = Vec::with_capacity(filters.len());
        for f in filters {
            let filter = match topic::parse_subscription(&f) {
                Ok((None, f)) => f.to_string(),
                Ok((Some(group), f)) => {
                    let key = format!("{}{group}/{f}", topic::SHARE_PREFIX);
                    codes.push(match session.subscriptions.remove(&key) {
                        Some(_) => ReasonCode::SUCCESS,
                        None => ReasonCode::NO_SUBSCRIPTION_EXISTED,
                    });
                    continue;
                }
                Err(e) => {
                    codes.push(e.reason_code());
                    continue;
                }
            };
            if session.subscriptions.remove(&filter).is_some() {
                self.subscriptions.remove(&filter, client_id);
                if !self.subscriptions.contains_filter(&filter)
                    && !self.shared_filters.contains_filter(&filter)
                {
                    effects.push(Effect::RouteRemoved {
                        filter: filter.clone(),
                    });
                }
                codes.push(ReasonCode::SUCCESS);
            } else {
                codes.push(ReasonCode::NO_SUBSCRIPTION_EXISTED);
            }
        }
        self.dirty.sessions.insert(client_id.clone());
        Reply::Unsubscribed(codes)
    }

    /// Finds, per session, what a message means for it: the highest granted QoS among its
    /// matching subscriptions, all their subscription identifiers, and the retain flag.
    fn match_subscribers(
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

    /// Queues `message` for the matching sessions (and stores it if retained here).
    /// Returns whether any subscription matched and whether any queue refused it.
    fn publish(
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

    fn tick(&mut self, now: u64, effects: &mut Vec<Effect>) {
        for publisher in self.qos2_keys.expire(now) {
            self.dirty.qos2_keys.insert(publisher);
        }
        while let Some((at, topic)) = self.retained_expiry.first().cloned() {
            if at > now {
                break;
            }
            self.retained_expiry.pop_first();
            if self
                .retained
                .get(&topic)
                .is_some_and(|m| m.expires_at_ms == Some(at))
            {
                self.retained.remove(&topic);
                self.dirty.retained.insert(topic);
            }
        }
        while let Some((at, client_id)) = self.will_timers.first().cloned() {
            if at > now {
                break;
            }
            self.will_timers.pop_first();
            if let Some(s) = self.sessions.get_mut(&client_id) {
                if s.held_will.as_ref().is_some_and(|h| h.at_ms == at) {
                    if let Some(h) = s.held_will.take() {
                        effects.push(Effect::PublishWill {
                            client_id: client_id.clone(),
                            message: will_message(&h.will, now),
                        });
                    }
                }
                if s.will_at_ms == Some(at) {
                    s.will_at_ms = None;
                    if let Some(will) = s.will.take() {
                        effects.push(Effect::PublishWill {
                            client_id: client_id.clone(),
                            message: will_message(&will, now),
                        });
                    }
                }
                self.dirty.sessions.insert(client_id);
            }
        }
        while let Some((at, client_id)) = self.expiry_timers.first().cloned() {
            if at > now {
                break;
            }
            self.expiry_timers.pop_first();
            // Session end fires a will still pending (§3.1.3.2.2: delay or session end,
            // whichever comes first).
            if let Some(s) = self.sessions.get_mut(&client_id) {
                if s.is_online() {
                    continue;
                }
                if let Some(will) = s.will.take() {
                    effects.push(Effect::PublishWill {
                        client_id: client_id.clone(),
                        message: will_message(&will, now),
                    });
                }
            }
            self.remove_session(&client_id, effects);
        }
    }
}

struct ConnectArgs {
    client_id: Arc<str>,
    protocol: ProtocolVersion,
    clean_start: bool,
    session_expiry_secs: u32,
    receive_maximum: u16,
    will: Option<Will>,
    frontend_id: u64,
    connection: u64,
}

struct Target {
    qos: QoS,
    retain: bool,
    subscription_ids: Vec<u32>,
}

fn enqueue_retained(
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

/// Sets the index at which deliveries were computed (`Delivery::index`).
fn stamp_deliveries(effects: &mut [Effect], index: u64) {
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

/// Retained messages matching `filter` and not expired at `now_ms`, sorted by topic (the
/// index walks hash maps, whose order differs between replicas).
fn retained_for_filter(
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

/// The message a will publishes, with its expiry stamped at firing time.
/// How long a will taken over from another frontend waits for the old connection's report
/// (`session::HeldWill`): the old frontend reports a DISCONNECT it read within milliseconds.
pub const TAKEOVER_WILL_GRACE_MS: u64 = 2_000;

/// When a held will was taken over (its grace counted back), for one fired early.
fn now_of(h: &session::HeldWill) -> u64 {
    h.at_ms.saturating_sub(TAKEOVER_WILL_GRACE_MS)
}

fn will_message(will: &Will, now: u64) -> Message {
    let mut m = will.message.clone();
    m.stamp_expiry(now);
    m
}

#[allow(dead_code)]
fn _assert_send() {
    fn is_send<T: Send>() {}
    is_send::<Partition>();
    let _ = SubscriptionOptions::default;
}

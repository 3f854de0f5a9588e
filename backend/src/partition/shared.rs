//! Shared subscriptions (`$share/<group>/<filter>`, §4.8.2) as partition state.
//!
//! A group lives in the partition of its key (the whole `$share/<group>/<filter>` string); its
//! members' sessions live in their own partitions (by client id). A message for a group thus
//! crosses partitions, and it does so in durable steps, so a PUBACKed message is never lost
//! on the way:
//!
//! 1. The group's partition applies the `Publish`: it picks the member order by the strategy
//!    and records a **handoff** (the message plus the candidates) in the same entry. The
//!    publisher's PUBACK follows that entry, so from here on the message is in the log.
//! 2. The runtime carries the handoff out ([`SharedWork::Handoff`]): `SharedDeliver` on the
//!    member's partition, which queues it in the session like any delivery (packet ids,
//!    in-flight window, redelivery with DUP) — first to connected members only, then, when
//!    none is connected, to any member's session.
//! 3. `SharedHandoffDone` tells the group's partition the outcome: accepted ends the handoff;
//!    refused moves on to the next candidate; "gone" drops the member from the group, unless
//!    it joined again after the attempt was issued (its re-SUBSCRIBE may postdate the answer),
//!    in which case it is asked again.
//!
//! When a member disconnects (or its session ends), the messages it did not acknowledge go
//! back (except QoS2 ones already sent, which stay with it, §4.8.2): its partition moves them
//! into a **return batch** in the same entry that records the disconnect, the runtime hands
//! the batch to the group (`SharedEnqueue`, which starts new handoffs, the departed member
//! last), and `SharedReturnDone` drops the batch.
//!
//! Pending handoffs and return batches are state: a runtime that starts, or a replica that
//! becomes leader, carries out all of them again ([`Partition::shared_work`]). A crash between
//! a step and its "done" can therefore deliver a message twice, never lose it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tiermq_common::hashing::fnv1a64;
use tiermq_common::partition_api::{HandoffOutcome, SharedStrategy, SharedWork};
use tiermq_common::{topic, Message, QoS};

use super::command::{Effect, Reply};
use super::session::QueuedMessage;
use super::Partition;

/// One shared subscription group: `$share/<group>/<filter>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedGroup {
    pub filter: String,
    /// Members, each with the stamp (`SharedState::next_seq`) of its latest `SharedJoin`: a
    /// `Gone` for a handoff issued before that stamp may have been seen before the member
    /// subscribed again, so it does not remove the member (see `shared_handoff_done`).
    pub members: BTreeMap<Arc<str>, u64>,
    /// Round-robin position.
    pub cursor: u64,
}

/// A message on its way from a group to one of its members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handoff {
    pub group: String,
    pub message: Arc<Message>,
    /// Members in the order they are asked. Attempts `0..n` ask for a connected member,
    /// attempts `n..2n` accept any session; after that the message is dropped (no member).
    pub candidates: Vec<Arc<str>>,
    pub attempt: usize,
}

impl Handoff {
    fn member(&self) -> Option<&Arc<str>> {
        let n = self.candidates.len();
        (n > 0 && self.attempt < 2 * n).then(|| &self.candidates[self.attempt % n])
    }

    fn require_online(&self) -> bool {
        self.attempt < self.candidates.len()
    }

    fn work(&self, seq: u64) -> Option<SharedWork> {
        Some(SharedWork::Handoff {
            group: self.group.clone(),
            seq: Some(seq),
            member: self.member()?.clone(),
            message: self.message.clone(),
            require_online: self.require_online(),
        })
    }
}

/// Messages a departed member had not acknowledged, on their way back to the group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReturnBatch {
    pub group: String,
    pub from: Arc<str>,
    pub messages: Vec<Arc<Message>>,
}

/// The shared-subscription state of a partition, stored whole in checkpoints and snapshots.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SharedState {
    pub groups: BTreeMap<String, SharedGroup>,
    pub handoffs: BTreeMap<u64, Handoff>,
    pub returns: BTreeMap<u64, ReturnBatch>,
    /// Fired wills not yet confirmed published (`SharedWork::Will`), by sequence number.
    pub wills: BTreeMap<u64, PendingWill>,
    pub next_seq: u64,
    /// Messages no member could take (every candidate gone).
    pub dropped: u64,
    /// Round-robin position for QoS0 messages, which are delivered without a log entry and
    /// so cannot move replicated state. Not part of the state: replicas may differ here.
    #[serde(skip)]
    pub qos0_cursor: AtomicU64,
}

impl PartialEq for SharedState {
    fn eq(&self, other: &Self) -> bool {
        self.groups == other.groups
            && self.handoffs == other.handoffs
            && self.returns == other.returns
            && self.wills == other.wills
            && self.next_seq == other.next_seq
            && self.dropped == other.dropped
    }
}

impl Clone for SharedState {
    fn clone(&self) -> Self {
        SharedState {
            groups: self.groups.clone(),
            handoffs: self.handoffs.clone(),
            returns: self.returns.clone(),
            wills: self.wills.clone(),
            next_seq: self.next_seq,
            dropped: self.dropped,
            qos0_cursor: AtomicU64::new(self.qos0_cursor.load(Ordering::Relaxed)),
        }
    }
}

/// A fired will waiting to be confirmed published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingWill {
    pub client_id: Arc<str>,
    pub message: Arc<Message>,
}

impl SharedState {
    pub(super) fn next_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }
}

/// The member order for one message: `members` rotated to start at `start`.
fn rotation(members: &BTreeMap<Arc<str>, u64>, start: u64) -> Vec<Arc<str>> {
    let n = members.len();
    if n == 0 {
        return Vec::new();
    }
    let start = (start % n as u64) as usize;
    members
        .keys()
        .skip(start)
        .chain(members.keys().take(start))
        .cloned()
        .collect()
}

impl Partition {
    /// Every cross-partition step not yet confirmed: for a runtime that starts, or a replica
    /// that becomes leader, to carry out (again).
    pub fn shared_work(&self) -> Vec<SharedWork> {
        let mut out: Vec<SharedWork> = self
            .shared
            .handoffs
            .iter()
            .filter_map(|(seq, h)| h.work(*seq))
            .collect();
        out.extend(
            self.shared
                .returns
                .iter()
                .map(|(seq, r)| SharedWork::Return {
                    seq: *seq,
                    group: r.group.clone(),
                    from: r.from.clone(),
                    messages: r.messages.clone(),
                }),
        );
        out.extend(self.shared.wills.iter().map(|(seq, w)| SharedWork::Will {
            seq: *seq,
            client_id: w.client_id.clone(),
            message: w.message.clone(),
        }));
        out
    }

    /// The whole shared-subscription state, for a checkpoint.
    pub fn shared_state(&self) -> &SharedState {
        &self.shared
    }

    /// Groups in this partition and their members (read-only, for status and tests).
    pub fn shared_groups(&self) -> &BTreeMap<String, SharedGroup> {
        &self.shared.groups
    }

    pub(super) fn has_route(&self, filter: &str) -> bool {
        self.subscriptions.contains_filter(filter) || self.shared_filters.contains_filter(filter)
    }

    pub(super) fn shared_join(
        &mut self,
        group: String,
        client_id: Arc<str>,
        effects: &mut Vec<Effect>,
    ) -> Reply {
        let Ok((Some(_), filter)) = topic::parse_subscription(&group) else {
            return Reply::Done;
        };
        let filter = filter.to_string();
        if !self.has_route(&filter) {
            effects.push(Effect::RouteAdded {
                filter: filter.clone(),
            });
        }
        self.shared_filters.insert(&filter, group.clone(), ());
        let stamp = self.shared.next_seq();
        self.shared
            .groups
            .entry(group)
            .or_insert_with(|| SharedGroup {
                filter,
                members: BTreeMap::new(),
                cursor: 0,
            })
            .members
            .insert(client_id, stamp);
        self.dirty.shared = true;
        Reply::Done
    }

    pub(super) fn shared_leave(
        &mut self,
        group: &str,
        client_id: &Arc<str>,
        effects: &mut Vec<Effect>,
    ) -> Reply {
        let Some(g) = self.shared.groups.get_mut(group) else {
            return Reply::Done;
        };
        g.members.remove(client_id);
        if g.members.is_empty() {
            let filter = g.filter.clone();
            self.shared.groups.remove(group);
            self.shared_filters.remove(&filter, &group.to_string());
            if !self.has_route(&filter) {
                effects.push(Effect::RouteRemoved { filter });
            }
        }
        self.dirty.shared = true;
        Reply::Done
    }

    /// Groups whose filter matches `topic`, sorted (the trie walks hash maps).
    fn matching_groups(&self, topic: &str) -> Vec<String> {
        let mut groups = Vec::new();
        self.shared_filters.for_each_match(topic, |_, group, _| {
            groups.push(group.clone());
        });
        groups.sort_unstable();
        groups.dedup();
        groups
    }

    fn start_position(&mut self, group: &str, publisher: Option<&str>, index: u64) -> u64 {
        let strategy = self.limits.shared_strategy;
        let Some(g) = self.shared.groups.get_mut(group) else {
            return 0;
        };
        match strategy {
            SharedStrategy::RoundRobin => {
                g.cursor = g.cursor.wrapping_add(1);
                g.cursor - 1
            }
            SharedStrategy::Random => fnv1a64(&index.to_be_bytes()) ^ fnv1a64(group.as_bytes()),
            SharedStrategy::StickyByPublisher => fnv1a64(publisher.unwrap_or("").as_bytes()),
        }
    }

    /// Applying a logged publish: one handoff per matching group. Returns whether any group
    /// had a member.
    pub(super) fn publish_shared(
        &mut self,
        message: &Arc<Message>,
        publisher: Option<&str>,
        index: u64,
        effects: &mut Vec<Effect>,
    ) -> bool {
        if self.shared.groups.is_empty() {
            return false;
        }
        let mut matched = false;
        for group in self.matching_groups(&message.topic) {
            let start = self.start_position(&group, publisher, index);
            let candidates = rotation(&self.shared.groups[&group].members, start);
            if candidates.is_empty() {
                continue;
            }
            matched = true;
            self.start_handoff(group, message.clone(), candidates, effects);
        }
        matched
    }

    fn start_handoff(
        &mut self,
        group: String,
        message: Arc<Message>,
        candidates: Vec<Arc<str>>,
        effects: &mut Vec<Effect>,
    ) {
        if message.qos == QoS::AtMostOnce {
            // At most once: one attempt, to a connected member, nothing to remember.
            effects.push(Effect::Shared(SharedWork::Handoff {
                group,
                seq: None,
                member: candidates[0].clone(),
                message,
                require_online: true,
            }));
            return;
        }
        let seq = self.shared.next_seq();
        let handoff = Handoff {
            group,
            message,
            candidates,
            attempt: 0,
        };
        effects.extend(handoff.work(seq).map(Effect::Shared));
        self.shared.handoffs.insert(seq, handoff);
        self.dirty.shared = true;
    }

    /// A QoS0 publish that is not logged: a connected member in turn, best effort.
    pub(super) fn deliver_qos0_shared(&self, message: &Arc<Message>, effects: &mut Vec<Effect>) {
        if self.shared.groups.is_empty() {
            return;
        }
        for group in self.matching_groups(&message.topic) {
            let start = self.shared.qos0_cursor.fetch_add(1, Ordering::Relaxed);
            let candidates = rotation(&self.shared.groups[&group].members, start);
            if let Some(member) = candidates.into_iter().next() {
                effects.push(Effect::Shared(SharedWork::Handoff {
                    group,
                    seq: None,
                    member,
                    message: message.clone(),
                    require_online: true,
                }));
            }
        }
    }

    pub(super) fn shared_handoff_done(
        &mut self,
        seq: u64,
        member: &Arc<str>,
        outcome: HandoffOutcome,
        effects: &mut Vec<Effect>,
    ) -> Reply {
        let Some(h) = self.shared.handoffs.get_mut(&seq) else {
            return Reply::Done;
        };
        if h.member() != Some(member) {
            // An answer to an earlier attempt, carried out again after a restart.
            return Reply::Done;
        }
        self.dirty.shared = true;
        match outcome {
            HandoffOutcome::Accepted => {
                self.shared.handoffs.remove(&seq);
                return Reply::Done;
            }
            HandoffOutcome::Offline => h.attempt += 1,
            HandoffOutcome::Gone
                if self
                    .shared
                    .groups
                    .get(&h.group)
                    .and_then(|g| g.members.get(member))
                    .is_some_and(|joined| *joined > seq) =>
            {
                // The member joined (again) after this attempt was issued: its partition may
                // have answered before the re-SUBSCRIBE. Ask it again, under a new seq (so
                // late answers to this one are ignored) issued after the join, whose answer is
                // then current.
                let h = self.shared.handoffs.remove(&seq).expect("looked up above");
                let seq = self.shared.next_seq();
                effects.extend(h.work(seq).map(Effect::Shared));
                self.shared.handoffs.insert(seq, h);
                return Reply::Done;
            }
            HandoffOutcome::Gone => {
                // Not a member any more: skip it from now on (the next candidate moves into
                // its place), and leave the group so later messages do not ask it either.
                let n = h.candidates.len();
                let i = h.attempt % n;
                h.candidates.remove(i);
                if h.attempt >= n {
                    h.attempt -= 1;
                }
                let group = h.group.clone();
                self.shared_leave(&group, member, effects);
            }
        }
        let Some(h) = self.shared.handoffs.get(&seq) else {
            return Reply::Done;
        };
        match h.work(seq) {
            Some(work) => effects.push(Effect::Shared(work)),
            None => {
                self.shared.handoffs.remove(&seq);
                self.shared.dropped += 1;
            }
        }
        Reply::Done
    }

    pub(super) fn shared_enqueue(
        &mut self,
        group: String,
        from: &Arc<str>,
        messages: Vec<Arc<Message>>,
        index: u64,
        effects: &mut Vec<Effect>,
    ) -> Reply {
        for message in messages {
            let Some(g) = self.shared.groups.get(&group) else {
                // The group has no members left: nobody to deliver to.
                self.shared.dropped += 1;
                continue;
            };
            let members = g.members.clone();
            let start = self.start_position(&group, None, index);
            let mut candidates = rotation(&members, start);
            // The member that gave the message back is asked last.
            if let Some(pos) = candidates.iter().position(|c| c == from) {
                let c = candidates.remove(pos);
                candidates.push(c);
            }
            self.start_handoff(group.clone(), message, candidates, effects);
        }
        self.dirty.shared = true;
        Reply::Done
    }

    pub(super) fn shared_return_done(&mut self, seq: u64) -> Reply {
        if self.shared.returns.remove(&seq).is_some() {
            self.dirty.shared = true;
        }
        Reply::Done
    }

    /// On the member's side: queue a message handed over by a group.
    pub(super) fn shared_deliver(
        &mut self,
        client_id: &Arc<str>,
        group: &str,
        message: Arc<Message>,
        require_online: bool,
        now: u64,
        effects: &mut Vec<Effect>,
    ) -> Reply {
        let limits = self.limits;
        let Some(session) = self.sessions.get_mut(client_id) else {
            return Reply::SharedDelivered(HandoffOutcome::Gone);
        };
        let Some(sub) = session.subscriptions.get(group).copied() else {
            return Reply::SharedDelivered(HandoffOutcome::Gone);
        };
        if require_online && !session.is_online() {
            return Reply::SharedDelivered(HandoffOutcome::Offline);
        }
        let qos = message.qos.min(sub.options.qos);
        let retain = message.retain && sub.options.retain_as_published;
        let queued = session.enqueue(
            QueuedMessage {
                message,
                qos,
                retain,
                subscription_ids: sub.subscription_id.into_iter().collect(),
                shared: Some(Arc::from(group)),
            },
            now,
            &limits,
            effects,
        );
        if !queued {
            // Its queue is full (refuse-new policy): another member may have room.
            return Reply::SharedDelivered(HandoffOutcome::Offline);
        }
        if qos != QoS::AtMostOnce {
            self.dirty.sessions.insert(client_id.clone());
        }
        Reply::SharedDelivered(HandoffOutcome::Accepted)
    }

    /// A member's connection ended: what it did not acknowledge goes back to its groups.
    pub(super) fn return_shared(&mut self, client_id: &Arc<str>, effects: &mut Vec<Effect>) {
        let Some(session) = self.sessions.get_mut(client_id) else {
            return;
        };
        let unacked = session.take_shared_unacked();
        if unacked.is_empty() {
            return;
        }
        self.dirty.sessions.insert(client_id.clone());
        for (group, messages) in unacked {
            let seq = self.shared.next_seq();
            effects.push(Effect::Shared(SharedWork::Return {
                seq,
                group: group.clone(),
                from: client_id.clone(),
                messages: messages.clone(),
            }));
            self.shared.returns.insert(
                seq,
                ReturnBatch {
                    group,
                    from: client_id.clone(),
                    messages,
                },
            );
        }
        self.dirty.shared = true;
    }
}

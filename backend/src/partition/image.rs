//! A partition's state as a whole: the image a checkpoint or snapshot stores, the restore
//! that rebuilds a partition (and the indexes it derives) from one, and the totals metrics read.
//!
//! Kept apart from the commands so what goes into a snapshot, and what a restore must rebuild,
//! can be read in one place.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tiermq_common::topic;
use tiermq_common::Message;

use super::session::{Session, SessionLimits};
use super::{qos2_keys, shared, Partition};

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
}

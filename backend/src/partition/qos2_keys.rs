//! Idempotency keys of inbound QoS2 messages whose publisher's session lives in another
//! partition.
//!
//! The publisher's own partition records each inbound QoS2 packet id in its session, with a
//! token (see `InboundQos2`). Every other partition a message goes to keeps here, per publisher
//! and packet id, the token of the last message it delivered under that id. A publish carrying
//! the same token again — retried by a frontend after a lost answer, or re-sent by the client
//! after a reconnect — is not delivered twice. These keys are partition state: logged,
//! checkpointed and in snapshots, so a new leader or a restarted replica holds them too.
//!
//! Nothing tells these partitions when the publisher releases the packet id (PUBREL reaches
//! only its own partition), and the key is not needed for that: a new message under the same
//! id has a new token. A key is therefore replaced by the id's next message, and dropped
//! [`RETENTION_MS`] after its last use so that publishers that went away leave nothing behind.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// How long a key outlives its last use. A retry after that (a client that re-sends an
/// unanswered QoS2 PUBLISH a day later) could be delivered a second time by the partitions
/// that are not the publisher's; within it, never.
pub const RETENTION_MS: u64 = 24 * 60 * 60 * 1000;

/// The last message a partition delivered under one publisher's packet id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Key {
    /// The message's token (the log index at which its publisher's partition recorded it).
    pub token: u64,
    /// The publisher's connection that sent it.
    pub epoch: u64,
    /// When it was recorded (entry time), for [`RETENTION_MS`].
    pub at_ms: u64,
}

/// What to do with a QoS2 publish that carries a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A message this partition has not delivered: deliver it (its key is now recorded).
    Deliver,
    /// The same message again: already delivered here.
    Duplicate,
    /// An attempt from an older connection of the publisher than the one that last used this
    /// packet id: a retry still in flight from a frontend the client has left. The message it
    /// carries was re-sent and delivered through the newer connection, or is being.
    Stale,
}

/// The keys of one partition.
#[derive(Debug, Default)]
pub struct Qos2Keys {
    by_publisher: HashMap<Arc<str>, BTreeMap<u16, Key>>,
    /// `(expires at, publisher, packet id)`: derived, rebuilt on restore.
    expiry: BTreeSet<(u64, Arc<str>, u16)>,
}

/// One publisher's keys, as checkpoints and snapshots store them.
pub type PublisherKeys = BTreeMap<u16, Key>;

impl Qos2Keys {
    /// Decides on a publish of `token` under `packet_id` from `publisher`'s connection `epoch`
    /// and records it when it is to be delivered.
    pub fn admit(
        &mut self,
        publisher: &Arc<str>,
        packet_id: u16,
        token: u64,
        epoch: u64,
        now_ms: u64,
    ) -> Verdict {
        let keys = self.by_publisher.entry(publisher.clone()).or_default();
        if let Some(old) = keys.get(&packet_id).copied() {
            if old.token == token {
                return Verdict::Duplicate;
            }
            if epoch < old.epoch {
                return Verdict::Stale;
            }
            self.expiry
                .remove(&(old.at_ms + RETENTION_MS, publisher.clone(), packet_id));
        }
        keys.insert(
            packet_id,
            Key {
                token,
                epoch,
                at_ms: now_ms,
            },
        );
        self.expiry
            .insert((now_ms + RETENTION_MS, publisher.clone(), packet_id));
        Verdict::Deliver
    }

    /// Drops the keys unused for [`RETENTION_MS`]; returns the publishers whose keys changed.
    pub fn expire(&mut self, now_ms: u64) -> Vec<Arc<str>> {
        let mut changed = Vec::new();
        while let Some((at, publisher, packet_id)) = self.expiry.first().cloned() {
            if at > now_ms {
                break;
            }
            self.expiry.pop_first();
            if let Some(keys) = self.by_publisher.get_mut(&publisher) {
                keys.remove(&packet_id);
                if keys.is_empty() {
                    self.by_publisher.remove(&publisher);
                }
            }
            if changed.last() != Some(&publisher) {
                changed.push(publisher);
            }
        }
        changed
    }

    /// One publisher's keys (for a checkpoint).
    pub fn publisher(&self, publisher: &str) -> Option<&PublisherKeys> {
        self.by_publisher.get(publisher)
    }

    /// Every publisher's keys, sorted, so replicas with the same state write the same bytes.
    pub fn image(&self) -> Vec<(Arc<str>, PublisherKeys)> {
        let mut out: Vec<_> = self
            .by_publisher
            .iter()
            .map(|(p, k)| (p.clone(), k.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Installs one publisher's stored keys (restore from a checkpoint or snapshot).
    pub fn install(&mut self, publisher: Arc<str>, keys: PublisherKeys) {
        for (packet_id, key) in &keys {
            self.expiry
                .insert((key.at_ms + RETENTION_MS, publisher.clone(), *packet_id));
        }
        if !keys.is_empty() {
            self.by_publisher.insert(publisher, keys);
        }
    }

    /// The derived expiry index, for the restore-equals-replay test.
    #[cfg(test)]
    pub(crate) fn expiry_index(&self) -> impl Iterator<Item = String> + '_ {
        self.expiry.iter().map(|t| format!("qos2key {t:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_token_is_a_duplicate_and_a_new_token_is_delivered() {
        let mut k = Qos2Keys::default();
        let p: Arc<str> = Arc::from("pub");
        assert_eq!(k.admit(&p, 7, 100, 5, 0), Verdict::Deliver);
        assert_eq!(k.admit(&p, 7, 100, 5, 10), Verdict::Duplicate);
        // A re-send through a newer connection carries the same token: still a duplicate.
        assert_eq!(k.admit(&p, 7, 100, 9, 20), Verdict::Duplicate);
        // The id reused for a new message (new token) from the same connection.
        assert_eq!(k.admit(&p, 7, 120, 5, 30), Verdict::Deliver);
        // Another publisher's id 7 is its own.
        assert_eq!(
            k.admit(&Arc::from("other"), 7, 100, 1, 30),
            Verdict::Deliver
        );
    }

    #[test]
    fn an_older_connections_attempt_under_a_reused_id_is_stale() {
        let mut k = Qos2Keys::default();
        let p: Arc<str> = Arc::from("pub");
        assert_eq!(k.admit(&p, 1, 200, 9, 0), Verdict::Deliver);
        assert_eq!(k.admit(&p, 1, 150, 5, 1), Verdict::Stale);
        assert_eq!(k.admit(&p, 1, 200, 9, 2), Verdict::Duplicate);
    }

    #[test]
    fn keys_expire_after_their_last_use_and_restore_rebuilds_the_index() {
        let mut k = Qos2Keys::default();
        let p: Arc<str> = Arc::from("pub");
        k.admit(&p, 1, 10, 1, 0);
        k.admit(&p, 2, 11, 1, 1_000);
        k.admit(&p, 1, 12, 1, 2_000); // replaces id 1's key: its first expiry goes
        assert!(k.expire(RETENTION_MS).is_empty());
        assert_eq!(k.expire(RETENTION_MS + 1_000), vec![p.clone()]);
        assert_eq!(k.publisher("pub").map(|m| m.len()), Some(1));
        let mut restored = Qos2Keys::default();
        for (publisher, keys) in k.image() {
            restored.install(publisher, keys);
        }
        assert_eq!(
            restored.expiry_index().collect::<Vec<_>>(),
            k.expiry_index().collect::<Vec<_>>()
        );
        assert_eq!(k.expire(RETENTION_MS + 2_000), vec![p.clone()]);
        assert!(k.publisher("pub").is_none());
        assert!(k.image().is_empty());
    }
}

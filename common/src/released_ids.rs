//! Which outbound QoS2 re-sends a connection must not pass on to its client.
//!
//! A session re-sends its in-flight window (PUBLISH with DUP, same packet ids) when a new
//! leader takes over its partition or a frontend's event stream is re-attached: the leader
//! cannot know what reached the client. Such a *replay* travels on the event stream, apart
//! from the answers to the connection's own commands, and the two are not ordered. A replay
//! computed before the subscriber's PUBREC was applied can therefore arrive after that
//! PUBREC's answer — after PUBREL went out, even after the client's PUBCOMP. The client has
//! completed that packet id and forgotten it, so it would take the PUBLISH for a new message:
//! a QoS2 message delivered twice (found by the simulation, issue 19).
//!
//! Every delivery carries the log index of the session's partition at which it was computed
//! ([`crate::session_api::Delivery::index`]), and the answer to a PUBREC carries the index at
//! which it was applied. Indexes of a partition grow with every applied entry, across leaders
//! and terms, and are the same on every replica. So a PUBLISH of packet id `p` computed at an
//! index lower than the one at which `p`'s PUBREC was applied is stale: its state predates the
//! PUBREC. A later, legitimate use of `p` is computed at a higher index, because the session
//! reuses a packet id only after the PUBCOMP was applied, which follows the PUBREC.
//!
//! [`ReleasedIds`] applies that rule for one connection. It is used by the frontend's
//! connection handler and by the simulation's model of it, so both apply the same rule.

use std::collections::{HashMap, VecDeque};

/// The outbound QoS2 packet ids of one connection whose PUBREC is durable (PUBREL went out),
/// with the log index at which the PUBREC was applied, kept after the client's PUBCOMP so a
/// stale replay arriving later is recognised.
///
/// Memory is bounded: an entry is forgotten when a newer delivery of its packet id arrives,
/// and of the completed exchanges only the [`ReleasedIds::KEEP_COMPLETED`] most recent are
/// kept (a stale replay is one computed before the PUBREC applied, so it is in flight while
/// the exchange completes; the window of packet ids a client completes meanwhile is small).
/// Ids whose PUBCOMP has not come back are never forgotten (at most the in-flight window).
#[derive(Debug, Default)]
pub struct ReleasedIds {
    ids: HashMap<u16, Released>,
    /// Completed exchanges with a known index, oldest first: `(packet id, PUBREC index)`. An
    /// item whose id has since been forgotten or completed again is skipped when it comes
    /// out.
    completed: VecDeque<(u16, u64)>,
}

#[derive(Debug, Clone, Copy)]
struct Released {
    /// Where the PUBREC was applied; `None` when the session service did not say (a backend
    /// of an older version).
    index: Option<u64>,
    /// The client's PUBCOMP came.
    completed: bool,
}

impl ReleasedIds {
    /// How many completed exchanges are remembered.
    pub const KEEP_COMPLETED: usize = 256;

    pub fn new() -> ReleasedIds {
        ReleasedIds::default()
    }

    /// The PUBREC of `packet_id` is durable — applied at `index` — and PUBREL goes out.
    pub fn pubrec_applied(&mut self, packet_id: u16, index: Option<u64>) {
        self.ids.insert(
            packet_id,
            Released {
                index,
                completed: false,
            },
        );
    }

    /// The client's PUBCOMP for `packet_id`: the exchange is over on the client's side, which
    /// forgets the id.
    pub fn pubcomp(&mut self, packet_id: u16) {
        let Some(r) = self.ids.get_mut(&packet_id) else {
            return;
        };
        match r.index {
            Some(index) if !r.completed => {
                r.completed = true;
                self.completed.push_back((packet_id, index));
                while self.completed.len() > Self::KEEP_COMPLETED {
                    let Some((old, at)) = self.completed.pop_front() else {
                        break;
                    };
                    if self
                        .ids
                        .get(&old)
                        .is_some_and(|r| r.completed && r.index == Some(at))
                    {
                        self.ids.remove(&old);
                    }
                }
            }
            Some(_) => {}
            // Without an index nothing tells a stale replay from a new message any more.
            None => {
                self.ids.remove(&packet_id);
            }
        }
    }

    /// Whether a QoS2 PUBLISH of `packet_id` computed at `index` is stale and must not reach
    /// the client. One that is not stale and newer than the PUBREC is a new use of the id: the
    /// id's entry is forgotten.
    pub fn is_stale(&mut self, packet_id: u16, index: Option<u64>) -> bool {
        let Some(r) = self.ids.get(&packet_id) else {
            return false;
        };
        if !r.completed {
            // PUBREL went out and PUBCOMP has not come back: the session cannot have given the
            // id to another message yet (it reuses an id only once the PUBCOMP is applied), so
            // any PUBLISH for it is a re-send of the message the client already has.
            return true;
        }
        match (index, r.index) {
            (Some(at), Some(pubrec)) if at < pubrec => true,
            _ => {
                self.ids.remove(&packet_id);
                false
            }
        }
    }

    /// Packet ids remembered (tests, metrics).
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_older_than_the_pubrec_is_stale_even_after_pubcomp() {
        let mut r = ReleasedIds::new();
        r.pubrec_applied(7, Some(100));
        assert!(r.is_stale(7, Some(90)), "before PUBCOMP");
        r.pubcomp(7);
        assert!(r.is_stale(7, Some(90)), "after PUBCOMP");
        assert!(r.is_stale(7, Some(99)));
        // Other ids are not concerned.
        assert!(!r.is_stale(8, Some(90)));
    }

    #[test]
    fn a_newer_use_of_the_id_passes_and_is_forgotten() {
        let mut r = ReleasedIds::new();
        r.pubrec_applied(7, Some(100));
        r.pubcomp(7);
        assert!(!r.is_stale(7, Some(130)));
        assert!(r.is_empty());
        // The new message's own exchange is remembered again from its PUBREC.
        r.pubrec_applied(7, Some(140));
        r.pubcomp(7);
        assert!(r.is_stale(7, Some(130)));
    }

    #[test]
    fn before_pubcomp_every_resend_is_stale() {
        let mut r = ReleasedIds::new();
        r.pubrec_applied(7, Some(100));
        assert!(r.is_stale(7, Some(200)));
        assert!(r.is_stale(7, None));
        r.pubrec_applied(9, None);
        assert!(r.is_stale(9, Some(1)));
    }

    #[test]
    fn without_indexes_the_id_is_forgotten_at_pubcomp() {
        let mut r = ReleasedIds::new();
        r.pubrec_applied(7, None);
        r.pubcomp(7);
        assert!(r.is_empty());
        assert!(!r.is_stale(7, Some(1)));
        // A delivery without an index after a PUBCOMP is passed on (nothing to compare).
        r.pubrec_applied(8, Some(100));
        r.pubcomp(8);
        assert!(!r.is_stale(8, None));
    }

    #[test]
    fn completed_exchanges_are_bounded_and_the_oldest_go_first() {
        let mut r = ReleasedIds::new();
        let n = ReleasedIds::KEEP_COMPLETED as u16 + 10;
        for id in 1..=n {
            r.pubrec_applied(id, Some(u64::from(id) * 10));
            r.pubcomp(id);
        }
        assert_eq!(r.len(), ReleasedIds::KEEP_COMPLETED);
        assert!(!r.is_stale(1, Some(5)), "forgotten");
        assert!(r.is_stale(n, Some(5)));
        // An id not yet completed is never forgotten, however many complete after it.
        r.pubrec_applied(60_000, Some(1));
        for id in 1..=n {
            r.pubrec_applied(id, Some(100_000 + u64::from(id)));
            r.pubcomp(id);
        }
        assert!(r.is_stale(60_000, Some(500_000)));
        assert!(r.len() <= ReleasedIds::KEEP_COMPLETED + 1);
    }

    #[test]
    fn a_repeated_pubcomp_does_not_grow_the_memory() {
        let mut r = ReleasedIds::new();
        r.pubrec_applied(7, Some(100));
        for _ in 0..1000 {
            r.pubcomp(7);
        }
        assert_eq!(r.completed.len(), 1);
    }
}

//! Wills once fired: the outbox that makes each fired will published exactly once, and the
//! message a will publishes.
//!
//! When a will fires is decided by `connection.rs` and `tick.rs`; this file holds what happens
//! after, so the exactly-once rule lives in one place.

use std::sync::Arc;

use tiermq_common::session_api::Will;
use tiermq_common::{Message, QoS};

use super::command::SharedWork;
use super::{session, shared, Effect, Partition};

impl Partition {
    /// Wills exactly once: a will that fires is recorded in the entry that fires it (an outbox
    /// in the shared state, with a sequence number) and handed to the runtime as
    /// [`SharedWork::Will`], which publishes it to every partition under its own idempotency
    /// key and confirms with `WillPublished`. A crash or a leader change before the
    /// confirmation carries it out again ([`Partition::shared_work`]); the key makes the
    /// second time a no-op where the first one arrived.
    pub(super) fn record_wills(&mut self, effects: &mut [Effect]) {
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
}

/// How long a will taken over from another frontend waits for the old connection's report
/// (`session::HeldWill`): the old frontend reports a DISCONNECT it read within milliseconds.
pub const TAKEOVER_WILL_GRACE_MS: u64 = 2_000;

/// When a held will was taken over (its grace counted back), for one fired early.
pub(super) fn now_of(h: &session::HeldWill) -> u64 {
    h.at_ms.saturating_sub(TAKEOVER_WILL_GRACE_MS)
}

/// The message a will publishes, with its expiry stamped at firing time.
pub(super) fn will_message(will: &Will, now: u64) -> Message {
    let mut m = will.message.clone();
    m.stamp_expiry(now);
    m
}

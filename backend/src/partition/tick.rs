//! `Command::Tick`: everything that happens because time passed — inbound QoS2 keys and
//! retained messages expiring, delayed wills firing, offline sessions expiring.
//!
//! The time comes from the log entry, never a clock, so every replica expires the same things
//! at the same index.

use super::wills::will_message;
use super::{Effect, Partition};

impl Partition {
    pub(super) fn tick(&mut self, now: u64, effects: &mut Vec<Effect>) {
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

//! A session's connections: CONNECT (new session, resumption, takeover of a live connection),
//! the end of a connection, and the end of a session.
//!
//! These are the transitions that decide which will fires and when (§3.1.3.2.2), so they are
//! kept together with the takeover's late report.

use std::sync::Arc;

use tiermq_common::session_api::{SessionEvent, Will};
use tiermq_common::{topic, ProtocolVersion, ReasonCode};

use super::command::{Reply, SharedWork};
use super::session::{self, Attachment, Session};
use super::wills::{now_of, will_message, TAKEOVER_WILL_GRACE_MS};
use super::{Effect, Partition};

impl Partition {
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

    pub(super) fn connect(
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
    pub(super) fn disconnect(
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

    pub(super) fn remove_session(&mut self, client_id: &Arc<str>, effects: &mut Vec<Effect>) {
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
}

pub(super) struct ConnectArgs {
    pub(super) client_id: Arc<str>,
    pub(super) protocol: ProtocolVersion,
    pub(super) clean_start: bool,
    pub(super) session_expiry_secs: u32,
    pub(super) receive_maximum: u16,
    pub(super) will: Option<Will>,
    pub(super) frontend_id: u64,
    pub(super) connection: u64,
}

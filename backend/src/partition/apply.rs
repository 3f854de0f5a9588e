//! Applying one log entry: the dispatch from a command to the transition that handles it, and
//! the small transitions (acks, QoS2 receipt and release, lost frontends) that need no file of
//! their own.
//!
//! `apply` is the partition's only mutating entry point; every effect it returns has its
//! deliveries stamped with the entry's index and its fired wills recorded in the outbox.

use std::sync::Arc;

use super::command::{Command, Entry, Reply};
use super::connection::ConnectArgs;
use super::delivery::stamp_deliveries;
use super::retained::enqueue_retained;
use super::{Effect, Partition};

impl Partition {
    /// Applies one log entry. `index` must grow by one per call. The deliveries among the
    /// effects carry `index` ([`Delivery::index`](tiermq_common::session_api::Delivery)).
    pub fn apply(&mut self, index: u64, entry: Entry) -> (Reply, Vec<Effect>) {
        let (reply, mut effects) = self.apply_entry(index, entry);
        stamp_deliveries(&mut effects, index);
        self.record_wills(&mut effects);
        (reply, effects)
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
}

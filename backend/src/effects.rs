//! Carrying out a partition's effects: one sink for both runtimes, the standalone partition
//! task (`local`) and the Raft apply loop of a partition's leader (`raft::node`).
//!
//! A partition's `apply` returns effects; this module does what they say. Events go to the
//! connection they name if it is served in this process ([`Connections`]); everything else
//! — an event for a connection on another frontend, a route change, a cross-partition step —
//! goes to the runtime's [`EffectHost`], which knows where it must go.

use std::collections::HashMap;
use std::sync::Arc;

use tiermq_common::session_api::SessionEvent;
use tokio::sync::mpsc;

use crate::partition::command::{Command, Effect, SharedWork};
use crate::partition::Partition;

/// Where a connection served in this process wants its events.
pub type EventSender = mpsc::UnboundedSender<SessionEvent>;

/// A new connection's epoch and event sender, known before the map holds it (the effects
/// of the CONNECT that made it are dispatched first).
pub type NewConnection = (u64, EventSender);

/// What a runtime does with the effects that do not stay in this process.
pub trait EffectHost {
    /// An event for connection `epoch` of `client_id`, which is not served here.
    fn send_elsewhere(&mut self, client_id: Arc<str>, epoch: u64, event: SessionEvent);
    /// The partition gained its first subscription on `filter` (`added`) or lost its last.
    fn route_changed(&mut self, filter: String, added: bool);
    /// A cross-partition step to carry out ([`tiermq_common::shared_dispatch`]).
    fn shared(&mut self, work: SharedWork);
}

/// The live connections of one partition's sessions served in this process: client id →
/// (epoch, sender). Standalone, every connection; in the cluster, the in-process ones
/// (tests, embedded use) — remote ones are reached through the frontend streams.
#[derive(Default)]
pub struct Connections {
    live: HashMap<Arc<str>, NewConnection>,
}

impl Connections {
    /// Carries out `effects`: events to their connection here if it is the one they name,
    /// the rest to `host`. `new_conn` is the connection the applied command just made.
    pub fn dispatch(
        &self,
        effects: Vec<Effect>,
        new_conn: Option<&NewConnection>,
        host: &mut impl EffectHost,
    ) {
        for effect in effects {
            match effect {
                Effect::Send {
                    client_id,
                    epoch,
                    event,
                } => {
                    let here = match new_conn {
                        Some((e, tx)) if *e == epoch => Some(tx),
                        _ => match self.live.get(&client_id) {
                            Some((e, tx)) if *e == epoch => Some(tx),
                            _ => None,
                        },
                    };
                    match here {
                        Some(tx) => {
                            let _ = tx.send(event);
                        }
                        None => host.send_elsewhere(client_id, epoch, event),
                    }
                }
                // Recorded as shared work by `Partition::apply`; never leaves the partition.
                Effect::PublishWill { .. } => {}
                Effect::RouteAdded { filter } => host.route_changed(filter, true),
                Effect::RouteRemoved { filter } => host.route_changed(filter, false),
                Effect::Shared(work) => host.shared(work),
            }
        }
    }

    /// Keeps the map in step with the state machine after a command was applied: a new
    /// connection replaces the old one's sender (dropping it ends the old stream), a
    /// disconnect removes it, a lost frontend drops the connections whose session moved on.
    pub fn track(
        &mut self,
        applied: Tracked,
        new_conn: Option<NewConnection>,
        partition: &Partition,
    ) {
        match applied {
            Tracked::Connect(client_id) => {
                if let Some(conn) = new_conn {
                    self.live.insert(client_id, conn);
                }
            }
            Tracked::Disconnect(client_id, epoch) => {
                if self.live.get(&client_id).is_some_and(|(e, _)| *e == epoch) {
                    self.live.remove(&client_id);
                }
            }
            Tracked::FrontendLost => {
                self.live
                    .retain(|client_id, (epoch, _)| match partition.session(client_id) {
                        Some(s) => s.epoch() == Some(*epoch),
                        None => false,
                    });
            }
            Tracked::Other => {}
        }
    }

    /// Forgets every connection (a leader that lost its lead: they are served elsewhere now).
    pub fn clear(&mut self) {
        self.live.clear();
    }
}

/// What [`Connections::track`] needs to know of an applied command (taken before `apply`
/// consumes it).
pub enum Tracked {
    Connect(Arc<str>),
    Disconnect(Arc<str>, u64),
    FrontendLost,
    Other,
}

impl Tracked {
    pub fn of(command: &Command) -> Tracked {
        match command {
            Command::Connect { client_id, .. } => Tracked::Connect(client_id.clone()),
            Command::Disconnect {
                client_id, epoch, ..
            } => Tracked::Disconnect(client_id.clone(), *epoch),
            Command::FrontendLost { .. } => Tracked::FrontendLost,
            _ => Tracked::Other,
        }
    }

    /// The client a CONNECT is for.
    pub fn connecting(&self) -> Option<&Arc<str>> {
        match self {
            Tracked::Connect(c) => Some(c),
            _ => None,
        }
    }
}

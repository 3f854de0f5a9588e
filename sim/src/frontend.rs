//! A simulated frontend: what `ClusterClient` does for a cluster frontend, over the simulated
//! network instead of gRPC — operations to the partition leaders (following `NotLeader`
//! hints, trying other replicas when a node does not answer), one event stream per backend
//! (re-opened after a cut, which replays in-flight messages), events handed to the
//! connection that owns `(client id, epoch)` (buffered when they arrive before the CONNECT
//! answer).
//!
//! It models the real client's rules, not its code: until the router is written once over a
//! transport trait (issue 21), the simulation drives the real backends (driver, Raft,
//! partition state machine, sled) and this model of the frontend. The retry rules live in
//! `path.rs`, shared with the backends' leader-work runners.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tiermq_backend::placement::NodeId;
use tiermq_common::hashing::partition_of;
use tiermq_common::partition_api::{Command, Query, Reply};
use tiermq_common::session_api::SessionEvent;
use tiermq_common::ReasonCode;
use tokio::sync::mpsc;
use tokio::time::sleep;

pub use crate::path::CallError;
use crate::path::PartitionPath;
use crate::world::{Endpoint, World};

type EventTx = mpsc::UnboundedSender<SessionEvent>;

#[derive(Default)]
struct Sessions {
    live: BTreeMap<Arc<str>, (u64, EventTx)>,
    early: BTreeMap<(Arc<str>, u64), Vec<SessionEvent>>,
}

pub struct Frontend {
    pub slot: u64,
    world: Arc<World>,
    /// The frontend id of the running process (changes at every restart).
    id: AtomicU64,
    /// Numbers the CONNECTs it sends, as the real cluster client does (`Command::Connect`).
    connections: AtomicU64,
    up: Arc<AtomicBool>,
    sessions: Mutex<Sessions>,
    path: PartitionPath,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Frontend {
    pub fn new(world: Arc<World>, slot: u64) -> Arc<Frontend> {
        let up = Arc::new(AtomicBool::new(false));
        let alive = up.clone();
        let path = PartitionPath::new(
            world.clone(),
            Endpoint::Frontend(slot),
            Box::new(move || alive.load(Ordering::Relaxed)),
        );
        let f = Arc::new(Frontend {
            slot,
            world,
            id: AtomicU64::new(0),
            connections: AtomicU64::new(1),
            up,
            sessions: Mutex::new(Sessions::default()),
            path,
        });
        f.start();
        f
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn id(&self) -> u64 {
        self.id.load(Ordering::Relaxed)
    }

    /// A fresh number for a CONNECT (a re-sent copy carries the same one).
    pub fn next_connection(&self) -> u64 {
        self.connections.fetch_add(1, Ordering::Relaxed)
    }

    /// Starts the frontend process with a fresh id and its event streams.
    pub fn start(self: &Arc<Self>) {
        let generation = self.id() % 1000 + 1;
        let id = self.slot * 1000 + generation;
        self.id.store(id, Ordering::Relaxed);
        self.up.store(true, Ordering::Relaxed);
        self.world
            .trace(format!("frontend {} started as id {id}", self.slot));
        tokio::spawn(supervise_event_streams(self.clone(), id));
    }

    /// The process dies: every connection ends without DISCONNECT.
    pub fn crash(&self) {
        self.up.store(false, Ordering::Relaxed);
        *lock(&self.sessions) = Sessions::default();
        self.world.trace(format!("frontend {} crashed", self.slot));
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::Frontend(self.slot)
    }

    /// Registers a connection; events that came before its CONNECT answer go to it now.
    pub fn register(
        &self,
        client_id: &Arc<str>,
        epoch: u64,
    ) -> mpsc::UnboundedReceiver<SessionEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut s = lock(&self.sessions);
        if let Some(early) = s.early.remove(&(client_id.clone(), epoch)) {
            for e in early {
                let _ = tx.send(e);
            }
        }
        s.early.retain(|(c, _), _| c != client_id);
        s.live.insert(client_id.clone(), (epoch, tx));
        rx
    }

    /// The connection of `client_id` with `epoch` ended on this frontend.
    pub fn forget(&self, client_id: &Arc<str>, epoch: u64) {
        let mut s = lock(&self.sessions);
        if s.live.get(client_id).is_some_and(|(e, _)| *e == epoch) {
            s.live.remove(client_id);
        }
    }

    fn deliver(&self, client_id: Arc<str>, epoch: u64, event: SessionEvent) {
        let mut s = lock(&self.sessions);
        match s.live.get(&client_id) {
            Some((e, tx)) if *e == epoch => {
                let _ = tx.send(event);
            }
            Some((e, _)) if *e > epoch => {} // stale
            _ => s.early.entry((client_id, epoch)).or_default().push(event),
        }
    }

    /// A partition command, retried on other replicas until one leader applies it.
    pub async fn call(&self, partition: u32, command: Command) -> Result<Reply, CallError> {
        self.path.call(partition, command).await
    }

    /// [`Self::call`], and how many times the command reached a node (`PartitionPath`).
    pub async fn call_counting(
        &self,
        partition: u32,
        command: Command,
    ) -> (Result<Reply, CallError>, u32) {
        self.path.call_counting(partition, command).await
    }

    /// A leader read (QoS2 duplicate check), retried like a command.
    pub async fn query(&self, partition: u32, query: Query) -> Result<Reply, CallError> {
        self.path.query(partition, query).await
    }
}

/// Keeps one event stream open to every running backend this frontend can reach, as the
/// real client's reconnect loop does. A stream ends when its link is cut, its node
/// incarnation dies, or this frontend process dies.
async fn supervise_event_streams(frontend: Arc<Frontend>, id: u64) {
    let world = frontend.world.clone();
    let mut open: BTreeMap<NodeId, (u64, tokio::task::JoinHandle<()>)> = BTreeMap::new();
    while frontend.id() == id && frontend.is_up() {
        for node in world.node_ids() {
            let alive = open
                .get(&node)
                .is_some_and(|(inc, task)| !task.is_finished() && *inc == world.incarnation(node));
            if alive || !world.link_ok(frontend.endpoint(), Endpoint::Node(node)) {
                continue;
            }
            let Some((handle, incarnation)) = world.handle_with_incarnation(node) else {
                continue;
            };
            let events = handle.attach_frontend(id);
            let task = tokio::spawn(pump_events(frontend.clone(), id, node, incarnation, events));
            if open.insert(node, (incarnation, task)).is_some() {
                tokio::spawn(audit_sessions(frontend.clone()));
            }
        }
        sleep(Duration::from_millis(100)).await;
    }
    for (_, (_, task)) in open {
        task.abort();
    }
}

/// `ClusterClient::audit_sessions`: after an event stream comes back, close the connections
/// whose session was detached meanwhile (a leader declared this frontend lost).
async fn audit_sessions(frontend: Arc<Frontend>) {
    let live: Vec<(Arc<str>, u64)> = lock(&frontend.sessions)
        .live
        .iter()
        .map(|(c, (e, _))| (c.clone(), *e))
        .collect();
    for (client_id, epoch) in live {
        let home = partition_of(&client_id, frontend.world.plan.partitions);
        let check = Query::Qos2Check {
            client_id: client_id.clone(),
            epoch,
            packet_id: 0,
        };
        if let Ok(Reply::Fenced | Reply::NoSession) = frontend.query(home, check).await {
            frontend.world.trace(format!(
                "frontend {}: {client_id} (epoch {epoch}) was detached: closing its connection",
                frontend.slot
            ));
            frontend.deliver(
                client_id,
                epoch,
                SessionEvent::Disconnect {
                    reason: ReasonCode::UNSPECIFIED_ERROR,
                },
            );
        }
    }
}

async fn pump_events(
    frontend: Arc<Frontend>,
    id: u64,
    node: NodeId,
    incarnation: u64,
    mut events: mpsc::UnboundedReceiver<tiermq_backend::raft::node::FrontendEvent>,
) {
    let world = frontend.world.clone();
    let link = (frontend.endpoint(), Endpoint::Node(node));
    let healthy = |w: &World| {
        frontend.id() == id
            && frontend.is_up()
            && w.incarnation(node) == incarnation
            && w.is_up(node)
            && w.link_ok(link.0, link.1)
    };
    loop {
        let event = tokio::select! {
            biased;
            e = events.recv() => match e {
                Some(e) => e,
                None => return,
            },
            _ = sleep(Duration::from_millis(200)) => {
                if healthy(&world) { continue } else { return }
            }
        };
        // One ordered stream: each event waits for the one before it.
        sleep(world.delay()).await;
        if !healthy(&world) {
            return; // the stream breaks; what was in it is lost (replayed on re-attach)
        }
        let what = match &event.event {
            SessionEvent::Deliver(d) => format!(
                "PUBLISH id {:?} dup {} at index {:?}",
                d.packet_id, d.dup, d.index
            ),
            SessionEvent::Release { packet_id } => format!("PUBREL id {packet_id}"),
            SessionEvent::Disconnect { reason } => format!("DISCONNECT {reason:?}"),
        };
        world.trace(format!(
            "node {node} -> frontend {}: {} (epoch {}) {what}",
            frontend.slot, event.client_id, event.epoch
        ));
        frontend.deliver(event.client_id, event.epoch, event.event);
    }
}

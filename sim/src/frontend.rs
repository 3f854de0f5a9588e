//! A simulated frontend: what `ClusterClient` does for a cluster frontend, over the simulated
//! network instead of gRPC — operations to the partition leaders (following `NotLeader`
//! hints, trying other replicas when a node does not answer), one event stream per backend
//! (re-opened after a cut, which replays in-flight messages), events handed to the
//! connection that owns `(client id, epoch)` (buffered when they arrive before the CONNECT
//! answer).
//!
//! It models the real client's rules, not its code: until the router is written once over a
//! transport trait (issue 21), the simulation drives the real backends (driver, Raft,
//! partition state machine, sled) and this model of the frontend.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tiermq_backend::placement::NodeId;
use tiermq_backend::raft::node::{LeaderWork, ProposeError};
use tiermq_common::hashing::partition_of;
use tiermq_common::partition_api::{Command, Query, Reply};
use tiermq_common::session_api::SessionEvent;
use tiermq_common::ReasonCode;
use tokio::sync::mpsc;
use tokio::time::{sleep, timeout, Instant};

use crate::world::{Endpoint, World};

/// How long one attempt waits for its answer (as `ClusterClient`'s `ATTEMPT_TIMEOUT`).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an operation keeps trying before it fails (`OP_DEADLINE`).
const OP_DEADLINE: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// This frontend process is down (its connections are gone).
    FrontendDown,
    /// No replica answered within the deadline.
    Deadline,
}

enum Attempt {
    Reply(Reply),
    NotLeader(Option<NodeId>),
    Unavailable,
}

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
    up: AtomicBool,
    sessions: Mutex<Sessions>,
    /// Per partition: the node operations go to first.
    leader_guess: Mutex<Vec<NodeId>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Frontend {
    pub fn new(world: Arc<World>, slot: u64) -> Arc<Frontend> {
        let map = world.map();
        let guesses = (0..world.plan.partitions)
            .map(|p| map.replicas_of(p)[0])
            .collect();
        let f = Arc::new(Frontend {
            slot,
            world,
            id: AtomicU64::new(0),
            up: AtomicBool::new(false),
            sessions: Mutex::new(Sessions::default()),
            leader_guess: Mutex::new(guesses),
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
        self.with_retries(partition, |h| {
            let fut = h.submit(partition, command.clone());
            Box::pin(async move { fut.await.map(Some) })
        })
        .await
    }

    /// A leader read (QoS2 duplicate check), retried like a command.
    pub async fn query(&self, partition: u32, query: Query) -> Result<Reply, CallError> {
        self.with_retries(partition, |h| {
            let fut = h.query(partition, query.clone());
            Box::pin(async move {
                fut.await
                    .map(|bytes| postcard::from_bytes::<Reply>(&bytes).ok())
            })
        })
        .await
    }

    async fn with_retries(
        &self,
        partition: u32,
        send: impl Fn(
            &tiermq_backend::raft::node::RaftHandle,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Option<Reply>, ProposeError>> + Send>,
        >,
    ) -> Result<Reply, CallError> {
        let deadline = Instant::now() + OP_DEADLINE;
        loop {
            let replicas = self.world.map().replicas_of(partition).to_vec();
            if !self.is_up() {
                return Err(CallError::FrontendDown);
            }
            if Instant::now() >= deadline {
                return Err(CallError::Deadline);
            }
            let node = lock(&self.leader_guess)[partition as usize];
            match self.attempt(node, &send).await {
                Attempt::Reply(r) => return Ok(r),
                Attempt::NotLeader(Some(hint)) if hint != node => {
                    lock(&self.leader_guess)[partition as usize] = hint;
                }
                Attempt::NotLeader(_) | Attempt::Unavailable => {
                    let pos = replicas.iter().position(|r| *r == node).unwrap_or(0);
                    lock(&self.leader_guess)[partition as usize] =
                        replicas[(pos + 1) % replicas.len()];
                    sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// One try at one node: request and answer each cross the network.
    async fn attempt(
        &self,
        node: NodeId,
        send: &impl Fn(
            &tiermq_backend::raft::node::RaftHandle,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Option<Reply>, ProposeError>> + Send>,
        >,
    ) -> Attempt {
        let world = &self.world;
        let link = (self.endpoint(), Endpoint::Node(node));
        let started = Instant::now();
        let unreachable = || async move {
            // A cut-off or dead node never answers: the attempt times out.
            tokio::time::sleep_until(started + ATTEMPT_TIMEOUT).await;
            Attempt::Unavailable
        };
        if !world.link_ok(link.0, link.1) || world.lost() {
            return unreachable().await;
        }
        sleep(world.delay()).await;
        let Some(handle) = world.handle(node).filter(|_| world.link_ok(link.0, link.1)) else {
            return unreachable().await;
        };
        let answer = match timeout(ATTEMPT_TIMEOUT, send(&handle)).await {
            Err(_) => return Attempt::Unavailable,
            Ok(a) => a,
        };
        sleep(world.delay()).await;
        if !world.link_ok(link.0, link.1) || !self.is_up() {
            return unreachable().await; // the answer is lost on the way back
        }
        match answer {
            Ok(Some(reply)) => Attempt::Reply(reply),
            Ok(None) => Attempt::Unavailable,
            Err(ProposeError::NotLeader { leader }) => Attempt::NotLeader(leader),
            Err(ProposeError::UnknownPartition(_)) => Attempt::NotLeader(None),
            Err(ProposeError::Dropped | ProposeError::Stopped) => Attempt::Unavailable,
        }
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

/// Fired wills and shared-subscription steps of one node incarnation (the plans use neither
/// yet; a will that fires is recorded).
pub async fn run_leader_work(
    world: Arc<World>,
    node: NodeId,
    incarnation: u64,
    mut work: mpsc::UnboundedReceiver<LeaderWork>,
) {
    while let Some(w) = work.recv().await {
        if world.incarnation(node) != incarnation {
            return;
        }
        if let Some(m) = crate::world::is_will(&w) {
            world.trace(format!("node {node}: will fired on {}", m.topic));
        }
    }
}

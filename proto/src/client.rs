//! The cluster client: [`SessionService`] over gRPC to the backend nodes.
//!
//! A cluster frontend uses it exactly as the standalone broker uses its in-process partitions.
//! It keeps, per backend node, one ordered operation stream (`Ops`), one event stream
//! (`Events`) and one route watch (`Routes`), and:
//! - sends each operation to the partition's leader, following `NotLeader` hints and trying
//!   the other replicas when a node is unreachable;
//! - keeps a route table (filter → partitions with a subscriber) fed by the watches, and sends
//!   a publish to the partitions it matches — plus every partition whose routes it does not
//!   know right now (no leader seen), so a stale table costs traffic, never a delivery;
//! - hands events to the connection that owns `(client id, epoch)`;
//! - follows membership changes (backends joining, leaving, moving address): see
//!   [`membership`].
//!
//! Backend nodes use the same client to publish wills.

mod membership;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Unit;
use tiermq_common::hashing::partition_of;
use tiermq_common::latency::latency_histogram;
use tiermq_common::log_limit::LogLimiter;
use tiermq_common::partition_api::{
    AckCmd, Command, InboundQos2, Query, Reply, RetainedForSubscription,
};
use tiermq_common::pending_routes::PendingRoutes;
use tiermq_common::route_lease;
use tiermq_common::session_api::{
    AckKind, ConnectRequest, Connected, DisconnectRequest, Published, ServiceError, ServiceResult,
    SessionEvent, SessionRef, SessionService, SubscribeRequest,
};
use tiermq_common::shared_dispatch::{update_memberships, PartitionCaller};
use tiermq_common::trie::TopicTrie;
use tiermq_common::{Message, QoS, ReasonCode};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::transport::Channel;
use tracing::{debug, info};

use crate::broker::broker_client::BrokerClient;
use crate::broker::{
    op, op_reply, ClusterInfo, ClusterRequest, EventsRequest, Op, OpReply, Qos0, RoutesAck,
    RoutesRequest,
};
use crate::tls::{self, GrpcTls};
use crate::API_VERSION;

/// How long an operation keeps trying (leader changes, a node restarting) before it fails.
const OP_DEADLINE: Duration = Duration::from_secs(15);

/// What one attempt of an operation came back with.
enum Outcome {
    Reply(Vec<u8>),
    NotLeader(u64),
    Unavailable(String),
    /// Not sent: the client has no link to the node (a hint named a node that joined after
    /// the client's last read of the membership record).
    UnknownNode,
}

type OpSender = mpsc::UnboundedSender<(Op, Option<oneshot::Sender<Outcome>>)>;

/// How long one attempt waits for its answer before trying elsewhere (a paused or cut-off
/// node never answers; the gRPC stream would take its keep-alive timeout to notice).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// An operation not yet answered.
struct Held {
    kind: op::Kind,
    /// None: nobody waits for the answer (QoS0).
    done: Option<oneshot::Sender<ServiceResult<Vec<u8>>>>,
    deadline: Instant,
}

/// A QoS2 publish's place in its publisher's line: wait for `*_go` (the previous message's
/// phase was dispatched, or given up), dispatch, then drop `*_sent` to let the next one go.
struct Turn {
    /// Resolves once this publisher's previous QoS2 message went to its other partitions.
    others_go: Option<oneshot::Receiver<()>>,
    /// Dropped once this message went to its other partitions (or gave up).
    others_sent: oneshot::Sender<()>,
}

type Qos2Chain = oneshot::Receiver<()>;

/// The ordered path of one partition's operations.
///
/// All operations of a partition go to one node at a time, in call order on its ordered
/// stream. When one fails (not the leader, unreachable, no answer in time), the pipe stops
/// sending, waits until every operation in flight to that node has its answer, then picks the
/// next node (the hint, the leader the route watch reported, or the next replica) and re-sends
/// everything that failed or queued meanwhile, in call order. So a publisher's messages enter
/// the partition log in the order it sent them, across leader changes (duplicates possible,
/// as MQTT allows; reordering not).
#[derive(Default)]
struct Pipe {
    /// Where operations go now; 0 = not chosen yet.
    node: u64,
    inflight: usize,
    held: BTreeMap<u64, Held>,
    switching: bool,
    switch_scheduled: bool,
    failed_node: u64,
    hint: u64,
    attempts: usize,
    /// Nodes tried in a row that neither answered nor named a leader (unreachable, or "not
    /// the leader, no idea who is"). Reaching the replica count means every replica this
    /// client knows failed: the map it holds may be stale, so it asks for a fresh one.
    dead_ends: usize,
    /// Sent with every operation; grows at each switch. A node that refused one operation
    /// refuses the later ones of the same generation (they were sent before the refusal was
    /// known here), so a node that becomes leader meanwhile cannot commit them ahead of it.
    generation: u64,
}

/// Routes as learned from the partitions' leaders.
struct Routes {
    trie: TopicTrie<u32, ()>,
    filters: Vec<HashSet<String>>,
    /// Which node's stream the partition's routes come from; `None`: unknown.
    known_from: Vec<Option<u64>>,
    /// The latest leader term heard of per partition: updates of an earlier term (a deposed
    /// leader that does not know it yet) are ignored.
    terms: Vec<u64>,
    /// Per node: until when its route table may be trusted (the route lease,
    /// `tiermq_common::route_lease`). A partition whose node has no running lease is treated
    /// as unknown: publishes go to it whatever their topic.
    leases: HashMap<u64, Instant>,
    /// The earliest lease end among the nodes routes come from (`None`: one of them has no
    /// lease): before it every known partition is trusted, the publish path's quick check.
    all_trusted_until: Option<Instant>,
}

impl Routes {
    fn new(partitions: u32) -> Routes {
        Routes {
            trie: TopicTrie::new(),
            filters: vec![HashSet::new(); partitions as usize],
            known_from: vec![None; partitions as usize],
            terms: vec![0; partitions as usize],
            leases: HashMap::new(),
            all_trusted_until: None,
        }
    }

    /// Whether publishes may be sent to partition `p` by its route table alone.
    fn trusted(&self, p: usize, now: Instant) -> bool {
        let Some(node) = self.known_from[p] else {
            return false;
        };
        self.all_trusted_until.is_some_and(|t| now < t)
            || self.leases.get(&node).is_some_and(|&end| now < end)
    }

    /// Extends `node`'s lease to `until` (a renewal the node granted).
    fn renew(&mut self, node: u64, until: Instant) {
        let end = self.leases.entry(node).or_insert(until);
        *end = (*end).max(until);
        self.recompute_trust();
    }

    /// Drops what `node` said: its stream broke, so its table and its lease are gone.
    fn forget(&mut self, node: u64) {
        for k in self.known_from.iter_mut() {
            if *k == Some(node) {
                *k = None;
            }
        }
        self.leases.remove(&node);
    }

    /// Called whenever a partition gains a source or a lease changes. (Losing a source needs
    /// no call: the earlier minimum stays a safe underestimate.)
    fn recompute_trust(&mut self) {
        let mut until: Option<Instant> = None;
        for node in self.known_from.iter().flatten() {
            let Some(&end) = self.leases.get(node) else {
                self.all_trusted_until = None;
                return;
            };
            until = Some(until.map_or(end, |u| u.min(end)));
        }
        self.all_trusted_until = until;
    }
}

/// Lock order, where more than one is taken: a pipe → `nodes` → `routes` → `leaders` →
/// `replicas`. None is held across an await; the hot path takes one pipe's mutex and the
/// `nodes` read lock (to find the node's queue).
struct Inner {
    frontend_id: u64,
    /// Fixed for the cluster's life (membership changes move replicas, not keys).
    partitions: u32,
    /// The target replicas of each partition in the map of `membership`'s epoch: the
    /// candidates a pipe tries when it has no leader hint.
    replicas: RwLock<Vec<Vec<u64>>>,
    leaders: RwLock<Vec<u64>>,
    pipes: Vec<Mutex<Pipe>>,
    /// The backends this client has streams to: the members of the record it holds, plus
    /// removed ones still leading a partition (see [`membership`]).
    nodes: RwLock<BTreeMap<u64, membership::NodeLink>>,
    membership: membership::MapState,
    routes: RwLock<Routes>,
    /// Subscriptions submitted through this client and not yet answered: publishes go there
    /// too, so a subscription counts from when this frontend read it (issue 20, item 9).
    pending_routes: PendingRoutes,
    sessions: Mutex<Sessions>,
    /// Per publisher: the phases of its latest multi-partition QoS2 publish.
    qos2_chains: Mutex<HashMap<Arc<str>, Qos2Chain>>,
    next_id: AtomicU64,
    metrics: ClientMetrics,
    /// Mutual TLS towards the backends (`cluster.tls_*`); `None`: plain gRPC.
    tls: Option<GrpcTls>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// How long this client's calls to the backends take, by method
/// (`tiermq_grpc_client_call_duration_seconds`): from the call to its answer, retries on
/// other replicas included — what a connection handler waits, not one network round trip.
/// Also the membership record the client follows: its epoch
/// (`tiermq_cluster_map_epoch`), its backends (`tiermq_cluster_map_members`) and the
/// re-reads of it (`tiermq_cluster_map_refreshes_total{outcome}`), so an operator sees that
/// every frontend took up a join or a removal. Clones share the values.
#[derive(Clone, Debug)]
pub struct ClientMetrics {
    calls: Family<MethodLabel, Histogram>,
    map_epoch: Gauge,
    map_members: Gauge,
    map_refreshes: Family<OutcomeLabel, Counter>,
    route_renewals: Family<OutcomeLabel, Counter>,
}

impl Default for ClientMetrics {
    fn default() -> Self {
        ClientMetrics {
            calls: Family::new_with_constructor(latency_histogram),
            map_epoch: Gauge::default(),
            map_members: Gauge::default(),
            map_refreshes: Family::default(),
            route_renewals: Family::default(),
        }
    }
}

impl ClientMetrics {
    /// Writes the series (for a metrics collector: the client exists only once the backends
    /// answered, after the node's endpoint is up).
    pub fn encode(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let metric = encoder.encode_descriptor(
            "grpc_client_call_duration",
            "Calls of this node's cluster client to the partitions' leaders, from the call to \
             the answer (retries on other replicas included), by method (partition command or \
             leader read)",
            Some(&Unit::Seconds),
            self.calls.metric_type(),
        )?;
        self.calls.encode(metric)?;
        let metric = encoder.encode_descriptor(
            "cluster_map_epoch",
            "Epoch of the membership record (member set and partition map) this node's \
             cluster client routes by; grows with every join, removal or eviction",
            None,
            self.map_epoch.metric_type(),
        )?;
        self.map_epoch.encode(metric)?;
        let metric = encoder.encode_descriptor(
            "cluster_map_members",
            "Backends in the membership record this node's cluster client holds",
            None,
            self.map_members.metric_type(),
        )?;
        self.map_members.encode(metric)?;
        let metric = encoder.encode_descriptor(
            "cluster_map_refreshes",
            "Re-reads of the membership record by this node's cluster client (every second, \
             and at once when a node names an unknown leader or every replica fails), by \
             outcome: newer (taken up), unchanged, failed (no backend answered) or refused \
             (another partition count)",
            None,
            self.map_refreshes.metric_type(),
        )?;
        self.map_refreshes.encode(metric)?;
        let metric = encoder.encode_descriptor(
            "cluster_route_renewals",
            "Renewals of the route lease this node's cluster client asked of backends (route \
             acknowledgements), by outcome: granted, refused (behind, or the backend closed the \
             stream) or failed (no answer within the lease). Past a lease the backend's \
             partitions get every publish",
            None,
            self.route_renewals.metric_type(),
        )?;
        self.route_renewals.encode(metric)
    }

    fn method(&self, method: &'static str) -> Histogram {
        self.calls.get_or_create_owned(&MethodLabel { method })
    }

    /// The record epoch this client holds (0 before it holds one).
    pub fn map_epoch(&self) -> u64 {
        self.map_epoch.get().max(0) as u64
    }

    /// Re-reads of the record with `outcome` (`newer`, `unchanged`, `failed`, `refused`).
    pub fn map_refreshes(&self, outcome: &'static str) -> u64 {
        self.map_refreshes
            .get_or_create(&OutcomeLabel { outcome })
            .get()
    }
}

/// The label of a command in [`ClientMetrics`].
fn command_method(c: &Command) -> &'static str {
    match c {
        Command::Connect { .. } => "connect",
        Command::Disconnect { .. } => "disconnect",
        Command::Subscribe { .. } => "subscribe",
        Command::Unsubscribe { .. } => "unsubscribe",
        Command::Publish { .. } => "publish",
        Command::Qos2Received { .. } => "qos2_received",
        Command::Qos2Release { .. } => "qos2_release",
        Command::Ack { .. } => "ack",
        Command::DeliverRetained { .. } => "deliver_retained",
        Command::Tick => "tick",
        Command::FrontendLost { .. } => "frontend_lost",
        _ => "shared",
    }
}

/// Warnings about a lost backend stream: at most one per node per half minute.
static STREAM_WARNINGS: LogLimiter = LogLimiter::new(Duration::from_secs(30));

#[derive(Default)]
struct Sessions {
    live: HashMap<Arc<str>, (u64, mpsc::UnboundedSender<SessionEvent>)>,
    /// Events that arrived before their CONNECT's reply (the leader dispatches at apply).
    early: HashMap<(Arc<str>, u64), Vec<SessionEvent>>,
}

/// The gRPC [`SessionService`].
#[derive(Clone)]
pub struct ClusterClient {
    inner: Arc<Inner>,
}

impl ClusterClient {
    /// Connects to the cluster through any of `seeds` (`host:port` of backend nodes), learns
    /// the members and the partition map, and opens the per-node streams. With `tls`, every
    /// stream runs over mutual TLS (see [`crate::tls`]). From then on the client follows the
    /// membership record (see [`membership`]); `seeds` stay a last resort to read it from.
    pub async fn connect(
        seeds: &[String],
        frontend_id: u64,
        wait: Duration,
        tls: Option<GrpcTls>,
    ) -> Result<Self, String> {
        Self::connect_with(seeds, frontend_id, wait, tls, membership::REFRESH_EVERY).await
    }

    /// [`Self::connect`] with the period of the membership re-read (tests shorten or stretch
    /// it to tell the periodic re-read from the triggered one).
    async fn connect_with(
        seeds: &[String],
        frontend_id: u64,
        wait: Duration,
        tls: Option<GrpcTls>,
        refresh_every: Duration,
    ) -> Result<Self, String> {
        let deadline = Instant::now() + wait;
        loop {
            let mut last = String::from("no seed given");
            for seed in seeds {
                match fetch_info(seed, tls.as_ref()).await {
                    Ok(info) => {
                        last.clear();
                        if info.partition_info.len() == info.partitions as usize {
                            let state = membership::MapState::new(seeds.to_vec(), refresh_every);
                            return Ok(Self::from_info(info, frontend_id, tls, state));
                        }
                    }
                    Err(e) => last = format!("{seed}: {e}"),
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("no backend answered: {last}"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn from_info(
        info: ClusterInfo,
        frontend_id: u64,
        tls: Option<GrpcTls>,
        membership: membership::MapState,
    ) -> Self {
        let partitions = info.partitions;
        let mut leaders = vec![0; partitions as usize];
        for p in &info.partition_info {
            if let Some(slot) = leaders.get_mut(p.partition as usize) {
                *slot = p.leader;
            }
        }
        let inner = Arc::new(Inner {
            frontend_id,
            partitions,
            replicas: RwLock::new(vec![Vec::new(); partitions as usize]),
            pipes: leaders
                .iter()
                .map(|l| {
                    Mutex::new(Pipe {
                        node: *l,
                        ..Pipe::default()
                    })
                })
                .collect(),
            leaders: RwLock::new(leaders),
            nodes: RwLock::new(BTreeMap::new()),
            membership,
            routes: RwLock::new(Routes::new(partitions)),
            pending_routes: PendingRoutes::default(),
            sessions: Mutex::new(Sessions::default()),
            qos2_chains: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            metrics: ClientMetrics::default(),
            tls,
        });
        // The first record goes through the same path as every later one: its members are
        // "new", so they get their streams exactly like a backend that joins later.
        inner.apply_info(&info);
        tokio::spawn(membership::refresher(Arc::downgrade(&inner)));
        info!(
            partitions,
            epoch = info.epoch,
            nodes = inner.nodes.read().unwrap_or_else(|e| e.into_inner()).len(),
            "connected to the cluster"
        );
        ClusterClient { inner }
    }

    pub fn partitions(&self) -> u32 {
        self.inner.partitions
    }

    /// The latency of this client's calls (see [`ClientMetrics`]).
    pub fn metrics(&self) -> &ClientMetrics {
        &self.inner.metrics
    }

    /// Partitions whose leader this client does not currently know: no open route stream from
    /// a node that says it leads them (never heard of one, or its stream broke, or it said it
    /// no longer leads). Empty when every partition has a known, reachable leader — what a
    /// frontend's readiness check asks.
    pub fn partitions_without_leader(&self) -> Vec<u32> {
        let routes = self.inner.routes.read().unwrap_or_else(|e| e.into_inner());
        (0..self.inner.partitions)
            .filter(|&p| routes.known_from[p as usize].is_none())
            .collect()
    }

    /// Publishes a will (or any message without a publishing session).
    pub fn publish_message(
        &self,
        message: Message,
    ) -> impl Future<Output = ServiceResult<Published>> + Send + 'static {
        self.submit_publish(message, None, None)
    }

    fn partition_of(&self, key: &str) -> u32 {
        partition_of(key, self.inner.partitions)
    }

    /// Queues `kind` on the stream to `node` now; the receiver yields the outcome.
    fn send_op(
        &self,
        node: u64,
        partition: u32,
        generation: u64,
        kind: op::Kind,
        reply: bool,
    ) -> Option<oneshot::Receiver<Outcome>> {
        let id = if reply {
            self.inner.next_id.fetch_add(1, Ordering::Relaxed)
        } else {
            0
        };
        let (tx, rx) = if reply {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let op = Op {
            version: API_VERSION,
            id,
            partition,
            kind: Some(kind),
            generation,
        };
        let nodes = self.inner.nodes.read().unwrap_or_else(|e| e.into_inner());
        match nodes.get(&node) {
            Some(link) => {
                // A closed stream drops `tx`: the waiter sees "stream closed" and retries.
                let _ = link.ops.send((op, tx));
            }
            None => {
                drop(nodes);
                if let Some(tx) = tx {
                    let _ = tx.send(Outcome::UnknownNode);
                }
            }
        }
        rx
    }

    /// Sends `kind` to the leader of `partition` now and returns the wait for its answer,
    /// retrying elsewhere on NotLeader / unavailable until [`OP_DEADLINE`]. See [`Pipe`]:
    /// operations of a partition reach the log in the order of their calls, across retries.
    fn call(
        &self,
        partition: u32,
        kind: op::Kind,
    ) -> impl Future<Output = ServiceResult<Vec<u8>>> + Send + 'static {
        let (done, rx) = oneshot::channel();
        self.dispatch(
            partition,
            Held {
                kind,
                done: Some(done),
                deadline: Instant::now() + OP_DEADLINE,
            },
        );
        async move {
            rx.await
                .unwrap_or_else(|_| Err(ServiceError::Unavailable("client stopped".into())))
        }
    }

    /// Sends an operation that wants no answer (QoS0), in order with the others.
    fn cast(&self, partition: u32, kind: op::Kind) {
        self.dispatch(
            partition,
            Held {
                kind,
                done: None,
                deadline: Instant::now() + OP_DEADLINE,
            },
        );
    }

    fn dispatch(&self, partition: u32, held: Held) {
        let seq = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut pipe = self.inner.pipes[partition as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if pipe.switching || pipe.node == 0 {
            pipe.held.insert(seq, held);
            if !pipe.switching {
                pipe.switching = true;
                drop(pipe);
                self.schedule_switch(partition, Duration::ZERO);
            }
            return;
        }
        let node = pipe.node;
        self.send_tracked(&mut pipe, partition, node, seq, held);
    }

    /// Sends one operation to `node` and watches its outcome (in a task, so the pipe stays
    /// consistent even when the caller stops waiting).
    fn send_tracked(&self, pipe: &mut Pipe, partition: u32, node: u64, seq: u64, held: Held) {
        let Held {
            kind,
            done,
            deadline,
        } = held;
        if done.is_none() {
            self.send_op(node, partition, pipe.generation, kind, false);
            return;
        }
        let rx = self.send_op(node, partition, pipe.generation, kind.clone(), true);
        pipe.inflight += 1;
        let client = self.clone();
        tokio::spawn(async move {
            let outcome = match rx {
                Some(rx) => match tokio::time::timeout(ATTEMPT_TIMEOUT, rx).await {
                    Ok(Ok(o)) => o,
                    Ok(Err(_)) => Outcome::Unavailable("stream closed".into()),
                    Err(_) => Outcome::Unavailable("no answer in time".into()),
                },
                None => Outcome::Unavailable("not sent".into()),
            };
            client.on_outcome(
                partition,
                node,
                seq,
                Held {
                    kind,
                    done,
                    deadline,
                },
                outcome,
            );
        });
    }

    fn on_outcome(&self, partition: u32, node: u64, seq: u64, held: Held, outcome: Outcome) {
        let mut pipe = self.inner.pipes[partition as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        pipe.inflight = pipe.inflight.saturating_sub(1);
        let mut held = held;
        // Never sent: the node is not to be avoided next time (it was never tried), and it
        // says nothing about the replicas.
        let never_sent = matches!(outcome, Outcome::UnknownNode);
        let hint = match outcome {
            Outcome::Reply(bytes) => {
                if let Some(done) = held.done.take() {
                    let _ = done.send(Ok(bytes));
                }
                pipe.dead_ends = 0;
                None
            }
            Outcome::NotLeader(hint) => {
                debug!(partition, node, hint, "not the leader");
                if hint != 0 && !self.inner.knows(hint) {
                    // A leader this client has no address for: it joined after our last
                    // read of the record.
                    self.inner.wake_refresh();
                }
                Some(hint)
            }
            Outcome::Unavailable(why) => {
                debug!(partition, node, %why, "node unavailable");
                Some(0)
            }
            Outcome::UnknownNode => {
                debug!(partition, node, "no link to the node yet");
                self.inner.wake_refresh();
                Some(0)
            }
        };
        if let Some(hint) = hint {
            if Instant::now() >= held.deadline {
                if let Some(done) = held.done {
                    let _ = done.send(Err(ServiceError::Unavailable(format!(
                        "no leader for partition {partition}"
                    ))));
                }
            } else {
                pipe.held.insert(seq, held);
            }
            if !pipe.switching && pipe.node == node {
                pipe.switching = true;
                pipe.failed_node = if never_sent { 0 } else { node };
                pipe.hint = hint;
                if hint == 0 && !never_sent {
                    pipe.dead_ends += 1;
                    let known = self
                        .inner
                        .replicas
                        .read()
                        .unwrap_or_else(|e| e.into_inner())[partition as usize]
                        .len();
                    if pipe.dead_ends >= known.max(1) {
                        pipe.dead_ends = 0;
                        self.inner.wake_refresh();
                    }
                }
            }
        }
        // Switch only once nothing is in flight to the old node: an answer still to come from
        // it could otherwise land after a later operation sent elsewhere.
        if pipe.switching && pipe.inflight == 0 && !pipe.switch_scheduled {
            pipe.switch_scheduled = true;
            pipe.attempts += 1;
            let delay = Duration::from_millis(20 * pipe.attempts.min(10) as u64);
            drop(pipe);
            self.schedule_switch(partition, delay);
        }
    }

    fn schedule_switch(&self, partition: u32, delay: Duration) {
        let client = self.clone();
        tokio::spawn(async move {
            if !delay.is_zero() {
                // A newer membership record ends the back-off: the node the pipe was waiting
                // for may just have become reachable.
                let taken_up = client.inner.membership.taken_up.clone();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = taken_up.notified() => {}
                }
            }
            client.switch(partition);
        });
    }

    /// Picks the node to use next and re-sends every held operation to it, in call order.
    fn switch(&self, partition: u32) {
        let mut pipe = self.inner.pipes[partition as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        pipe.switch_scheduled = false;
        if pipe.inflight > 0 {
            return; // on_outcome schedules again when the last answer is in
        }
        let cached =
            self.inner.leaders.read().unwrap_or_else(|e| e.into_inner())[partition as usize];
        let replicas = self
            .inner
            .replicas
            .read()
            .unwrap_or_else(|e| e.into_inner())[partition as usize]
            .clone();
        // A hint naming the node that failed is a leader that refused an operation sent before
        // it led (or before an earlier refusal): back to it, under a new generation.
        let node = if pipe.hint != 0 {
            pipe.hint
        } else if cached != 0 && cached != pipe.failed_node {
            cached
        } else {
            // No better idea: the next replica after the one that failed (or, when that one
            // is not a replica, one further along with every attempt).
            let pos = replicas.iter().position(|r| *r == pipe.failed_node);
            let next = pos.map_or(pipe.attempts, |i| i + 1);
            replicas
                .get(next % replicas.len().max(1))
                .copied()
                .unwrap_or(cached)
        };
        pipe.node = node;
        pipe.hint = 0;
        pipe.switching = false;
        pipe.generation += 1;
        let held = std::mem::take(&mut pipe.held);
        for (seq, h) in held {
            self.send_tracked(&mut pipe, partition, node, seq, h);
        }
        if pipe.inflight == 0 {
            pipe.attempts = 0;
        }
    }

    fn command(
        &self,
        partition: u32,
        command: &Command,
    ) -> impl Future<Output = ServiceResult<Reply>> + Send + 'static {
        let bytes = postcard::to_stdvec(command).unwrap_or_default();
        let latency = self.inner.metrics.method(command_method(command));
        let started = Instant::now();
        let wait = self.call(partition, op::Kind::Command(bytes));
        async move {
            let answer = wait.await;
            latency.observe(started.elapsed().as_secs_f64());
            let bytes = answer?;
            postcard::from_bytes(&bytes)
                .map_err(|e| ServiceError::Unavailable(format!("undecodable reply: {e}")))
        }
    }

    fn query<T: serde::de::DeserializeOwned>(
        &self,
        partition: u32,
        query: &Query,
    ) -> impl Future<Output = ServiceResult<T>> + Send + 'static {
        let bytes = postcard::to_stdvec(query).unwrap_or_default();
        let latency = self.inner.metrics.method(match query {
            Query::Retained { .. } => "read_retained",
            Query::Qos2Check { .. } => "read_qos2_check",
        });
        let started = Instant::now();
        let wait = self.call(partition, op::Kind::Query(bytes));
        async move {
            let answer = wait.await;
            latency.observe(started.elapsed().as_secs_f64());
            let bytes = answer?;
            postcard::from_bytes(&bytes)
                .map_err(|e| ServiceError::Unavailable(format!("undecodable answer: {e}")))
        }
    }

    /// Partitions a message for `topic` must go to.
    fn targets(&self, topic: &str) -> Vec<u32> {
        let routes = self.inner.routes.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<u32> = Vec::new();
        routes.trie.for_each_match(topic, |_, p, _| {
            if !out.contains(p) {
                out.push(*p);
            }
        });
        let now = Instant::now();
        for p in 0..routes.known_from.len() {
            if !routes.trusted(p, now) && !out.contains(&(p as u32)) {
                out.push(p as u32);
            }
        }
        drop(routes);
        self.inner.pending_routes.for_each_match(topic, |p| {
            if !out.contains(&p) {
                out.push(p);
            }
        });
        out
    }

    fn submit_publish(
        &self,
        message: Message,
        publisher: Option<Arc<str>>,
        inbound: Option<(&SessionRef, u16)>,
    ) -> impl Future<Output = ServiceResult<Published>> + Send + 'static {
        let message = Arc::new(message);
        let retained_home = message.retain.then(|| self.partition_of(&message.topic));
        let mut targets = self.targets(&message.topic);
        if let Some(home) = retained_home {
            if !targets.contains(&home) {
                targets.push(home);
            }
        }
        if message.qos == QoS::AtMostOnce && retained_home.is_none() {
            let bytes = postcard::to_stdvec(&*message).unwrap_or_default();
            let publisher = publisher.as_deref().unwrap_or("").to_string();
            for p in &targets {
                self.cast(
                    *p,
                    op::Kind::Qos0(Qos0 {
                        message: bytes.clone(),
                        publisher: publisher.clone(),
                    }),
                );
            }
            let matched = !targets.is_empty();
            return futures::future::Either::Left(std::future::ready(Ok(Published {
                matched,
                duplicate: false,
                refused: false,
            })));
        }
        let publish = move |p: u32, mark: Option<InboundQos2>| Command::Publish {
            message: message.clone(),
            publisher: publisher.clone(),
            store_retained: Some(p) == retained_home,
            inbound_qos2: mark,
        };
        let mark = inbound.map(|(s, packet_id)| {
            (
                self.partition_of(&s.client_id),
                InboundQos2 {
                    client_id: s.client_id.clone(),
                    epoch: s.epoch,
                    packet_id,
                    token: None,
                },
            )
        });
        let client = self.clone();
        type Wait = std::pin::Pin<Box<dyn Future<Output = ServiceResult<Reply>> + Send>>;
        enum Plan {
            All(Vec<Wait>),
            /// Inbound QoS2 for several partitions (`InboundQos2`): the publisher's partition
            /// first, which records the packet id and answers the message's token; then the
            /// others with that token, which they deduplicate on, so a retry or a re-send is
            /// delivered once everywhere.
            Qos2 {
                at_home: Wait,
                others: Vec<u32>,
                mark: InboundQos2,
                turn: Turn,
            },
        }
        let plan = match mark {
            None => Plan::All(
                targets
                    .iter()
                    .map(|p| Box::pin(self.command(*p, &publish(*p, None))) as _)
                    .collect(),
            ),
            Some((home, mark)) if targets.iter().all(|p| *p == home) => Plan::All(vec![Box::pin(
                self.command(home, &publish(home, Some(mark))),
            )]),
            Some((home, mark)) => Plan::Qos2 {
                at_home: Box::pin(self.command(home, &publish(home, Some(mark.clone())))),
                others: targets.iter().copied().filter(|p| *p != home).collect(),
                turn: self.take_turn(&mark.client_id),
                mark,
            },
        };
        futures::future::Either::Right(async move {
            let mut out = Published {
                matched: false,
                duplicate: false,
                refused: false,
            };
            match plan {
                Plan::All(waits) => {
                    for w in waits {
                        merge_published(&mut out, w.await?)?;
                    }
                }
                Plan::Qos2 {
                    at_home,
                    others,
                    mark,
                    turn:
                        Turn {
                            others_go,
                            others_sent,
                        },
                } => {
                    let token = merge_published(&mut out, at_home.await?)?;
                    // The previous QoS2 message of this publisher goes to its other partitions
                    // first, so their logs keep the client's order.
                    if let Some(go) = others_go {
                        let _ = go.await;
                    }
                    let Some(token) = token else {
                        return Err(ServiceError::Unavailable(
                            "the publisher's partition answered no QoS2 token".into(),
                        ));
                    };
                    let keyed = InboundQos2 {
                        token: Some(token),
                        ..mark
                    };
                    let waits: Vec<_> = others
                        .iter()
                        .map(|p| client.command(*p, &publish(*p, Some(keyed.clone()))))
                        .collect();
                    drop(others_sent);
                    // The others' `duplicate` (they had the message already) is not the
                    // answer's: that is the publisher's own record.
                    let mut elsewhere = out;
                    for w in waits {
                        merge_published(&mut elsewhere, w.await?)?;
                    }
                    out.matched = elsewhere.matched;
                    out.refused = elsewhere.refused;
                }
            }
            Ok(out)
        })
    }

    /// This publisher's place in line for the second phase of a multi-partition QoS2
    /// publish (the first, to its own partition, is submitted in call order).
    fn take_turn(&self, client_id: &Arc<str>) -> Turn {
        let (others_sent, others_rx) = oneshot::channel();
        let mut chains = self
            .inner
            .qos2_chains
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        Turn {
            others_go: chains.insert(client_id.clone(), others_rx),
            others_sent,
        }
    }

    /// Routes the events of connection `epoch` of `client_id` to `tx`. Two CONNECTs of one
    /// client id on this frontend can have their replies arrive in the other order: a newer
    /// epoch registered first has taken the session over, so the older connection is told so
    /// (DISCONNECT 0x8E) instead of replacing it, which would leave the live connection deaf.
    fn register(&self, client_id: &Arc<str>, epoch: u64, tx: mpsc::UnboundedSender<SessionEvent>) {
        let mut s = self
            .inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if s.live.get(client_id).is_some_and(|(e, _)| *e > epoch) {
            s.early.remove(&(client_id.clone(), epoch));
            let _ = tx.send(SessionEvent::Disconnect {
                reason: ReasonCode::SESSION_TAKEN_OVER,
            });
            return;
        }
        if let Some(early) = s.early.remove(&(client_id.clone(), epoch)) {
            for e in early {
                let _ = tx.send(e);
            }
        }
        // Early events of newer epochs stay for their own CONNECT's reply.
        s.early.retain(|(c, e), _| c != client_id || *e > epoch);
        s.live.insert(client_id.clone(), (epoch, tx));
    }

    /// Closes every connection of this frontend whose session no longer belongs to it.
    ///
    /// Run when an event stream to a backend comes back. While it was down, a leader that
    /// had no stream from this frontend for its lease declared the frontend lost
    /// (`FrontendLost`) and detached its sessions there: their connections would stay open
    /// and deaf — nothing is delivered to a detached session's old epoch and nothing tells
    /// the connection (found by the deterministic simulation). A `Qos2Check` of packet id 0
    /// is a leader read that answers `Fenced`/`NoSession` for exactly those; they get
    /// DISCONNECT 0x80, and the client reconnects to its session.
    fn audit_sessions(&self) {
        let live: Vec<(Arc<str>, u64)> = {
            let s = self
                .inner
                .sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            s.live.iter().map(|(c, (e, _))| (c.clone(), *e)).collect()
        };
        for (client_id, epoch) in live {
            let check = self.query::<Reply>(
                self.partition_of(&client_id),
                &Query::Qos2Check {
                    client_id: client_id.clone(),
                    epoch,
                    packet_id: 0,
                },
            );
            let inner = Arc::downgrade(&self.inner);
            tokio::spawn(async move {
                if !matches!(check.await, Ok(Reply::Fenced | Reply::NoSession)) {
                    return;
                }
                let Some(inner) = inner.upgrade() else { return };
                let s = inner.sessions.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((e, tx)) = s.live.get(&client_id) {
                    if *e == epoch {
                        info!(client_id = %client_id, epoch, "session detached while this frontend was cut off: closing its connection");
                        let _ = tx.send(SessionEvent::Disconnect {
                            reason: ReasonCode::UNSPECIFIED_ERROR,
                        });
                    }
                }
            });
        }
    }

    fn forget(&self, session: &SessionRef) {
        let mut s = self
            .inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if s.live
            .get(&session.client_id)
            .is_some_and(|(e, _)| *e == session.epoch)
        {
            s.live.remove(&session.client_id);
        }
        drop(s);
        self.inner
            .qos2_chains
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&session.client_id);
    }
}

impl PartitionCaller for ClusterClient {
    fn partition_count(&self) -> u32 {
        self.inner.partitions
    }

    fn call_partition(
        &self,
        partition: u32,
        command: Command,
    ) -> impl Future<Output = ServiceResult<Reply>> + Send + 'static {
        self.command(partition, &command)
    }
}

/// [`tiermq_common::partition_api::merge_published`], its odd answers made errors.
fn merge_published(out: &mut Published, reply: Reply) -> ServiceResult<Option<u64>> {
    tiermq_common::partition_api::merge_published(out, reply).map_err(reply_error)
}

fn reply_error(reply: Reply) -> ServiceError {
    match reply {
        Reply::Fenced => ServiceError::SessionTakenOver,
        Reply::NoSession => ServiceError::NoSession,
        other => ServiceError::Unavailable(format!("unexpected reply {other:?}")),
    }
}

impl SessionService for ClusterClient {
    async fn connect(&self, req: ConnectRequest) -> ServiceResult<Connected> {
        let p = self.partition_of(&req.client_id);
        let client_id = req.client_id.clone();
        let reply = self
            .command(
                p,
                &Command::Connect {
                    client_id: req.client_id,
                    protocol: req.protocol,
                    clean_start: req.clean_start,
                    session_expiry_secs: req.session_expiry_secs,
                    receive_maximum: req.receive_maximum,
                    will: req.will,
                    frontend_id: self.inner.frontend_id,
                    // Unique in this client; the pipe re-sends the same bytes on a retry.
                    connection: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
                },
            )
            .await?;
        match reply {
            Reply::Connected {
                epoch,
                session_present,
            } => {
                let (tx, events) = mpsc::unbounded_channel();
                self.register(&client_id, epoch, tx);
                Ok(Connected {
                    session: SessionRef { client_id, epoch },
                    session_present,
                    events,
                })
            }
            other => Err(reply_error(other)),
        }
    }

    async fn subscribe(
        &self,
        session: &SessionRef,
        subs: Vec<SubscribeRequest>,
    ) -> ServiceResult<Vec<ReasonCode>> {
        let home = self.partition_of(&session.client_id);
        let filters: Vec<String> = subs.iter().map(|s| s.filter.clone()).collect();
        let wait = self.command(
            home,
            &Command::Subscribe {
                client_id: session.client_id.clone(),
                epoch: session.epoch,
                subscriptions: subs,
            },
        );
        // From here a publish through this frontend matching these filters goes to `home`
        // too, behind the SUBSCRIBE in its pipe (and log), until the route below is in place.
        let _pending = self
            .inner
            .pending_routes
            .add(filters.iter().map(String::as_str), home);
        let reply = wait.await?;
        let Reply::Subscribed {
            reason_codes,
            want_retained,
        } = reply
        else {
            return Err(reply_error(reply));
        };
        // A shared subscription's group lives in the partition of its key: join it there.
        update_memberships(self, &session.client_id, &filters, &reason_codes, true).await?;
        {
            // Read your own subscription: publishes through this frontend see it at once,
            // before the route watch reports it.
            let mut routes = self.inner.routes.write().unwrap_or_else(|e| e.into_inner());
            for (filter, code) in filters.iter().zip(&reason_codes) {
                if !code.is_error() {
                    let (p, f) = match tiermq_common::topic::parse_subscription(filter) {
                        Ok((None, f)) => (home, f),
                        Ok((Some(_), f)) => (self.partition_of(filter), f),
                        Err(_) => continue,
                    };
                    routes.trie.insert(f, p, ());
                    routes.filters[p as usize].insert(f.to_string());
                }
            }
        }
        if self.inner.partitions > 1 && !want_retained.is_empty() {
            let mut retained = Vec::new();
            for (filter, options, subscription_id) in want_retained {
                let mut messages: Vec<Arc<Message>> = Vec::new();
                for p in (0..self.inner.partitions).filter(|p| *p != home) {
                    let found: Vec<Arc<Message>> = self
                        .query(
                            p,
                            &Query::Retained {
                                filter: filter.clone(),
                            },
                        )
                        .await?;
                    messages.extend(found);
                }
                if !messages.is_empty() {
                    messages.sort_by(|a, b| a.topic.cmp(&b.topic));
                    retained.push(RetainedForSubscription {
                        filter,
                        options,
                        subscription_id,
                        messages,
                    });
                }
            }
            if !retained.is_empty() {
                self.command(
                    home,
                    &Command::DeliverRetained {
                        client_id: session.client_id.clone(),
                        epoch: session.epoch,
                        retained,
                    },
                )
                .await?;
            }
        }
        Ok(reason_codes)
    }

    async fn unsubscribe(
        &self,
        session: &SessionRef,
        filters: Vec<String>,
    ) -> ServiceResult<Vec<ReasonCode>> {
        let home = self.partition_of(&session.client_id);
        let reply = self
            .command(
                home,
                &Command::Unsubscribe {
                    client_id: session.client_id.clone(),
                    epoch: session.epoch,
                    filters: filters.clone(),
                },
            )
            .await?;
        let Reply::Unsubscribed(codes) = reply else {
            return Err(reply_error(reply));
        };
        update_memberships(self, &session.client_id, &filters, &codes, false).await?;
        Ok(codes)
    }

    fn publish(
        &self,
        session: &SessionRef,
        message: Message,
        inbound_packet_id: Option<u16>,
    ) -> impl Future<Output = ServiceResult<Published>> + Send + 'static {
        let inbound = inbound_packet_id.map(|pid| (session, pid));
        self.submit_publish(message, Some(session.client_id.clone()), inbound)
    }

    fn release(
        &self,
        session: &SessionRef,
        packet_id: u16,
    ) -> impl Future<Output = ServiceResult<bool>> + Send + 'static {
        let home = self.partition_of(&session.client_id);
        let wait = self.command(
            home,
            &Command::Qos2Release {
                client_id: session.client_id.clone(),
                epoch: session.epoch,
                packet_id,
            },
        );
        async move {
            match wait.await? {
                Reply::Released { found } => Ok(found),
                other => Err(reply_error(other)),
            }
        }
    }

    fn ack(
        &self,
        session: &SessionRef,
        kind: AckKind,
        packet_id: u16,
    ) -> impl Future<Output = ServiceResult<Option<u64>>> + Send + 'static {
        let home = self.partition_of(&session.client_id);
        let command = Command::Ack {
            client_id: session.client_id.clone(),
            epoch: session.epoch,
            kind: AckCmd::from(kind),
            packet_id,
        };
        // An ack must reach the session's *current* leader (a lost one stalls the in-flight
        // window), so it goes through the retrying pipe. Nobody waits for PUBACK and PUBCOMP;
        // a PUBREC is answered once committed, and PUBREL waits for that (`SessionService::ack`).
        if kind != AckKind::PubRec {
            drop(self.call(
                home,
                op::Kind::Command(postcard::to_stdvec(&command).unwrap_or_default()),
            ));
            return futures::future::Either::Left(std::future::ready(Ok(None)));
        }
        let wait = self.command(home, &command);
        futures::future::Either::Right(async move {
            match wait.await? {
                Reply::Acked { index } => Ok(Some(index)),
                // A backend of the version before indexes: committed, index unknown.
                Reply::Done => Ok(None),
                other => Err(reply_error(other)),
            }
        })
    }

    async fn disconnect(&self, session: &SessionRef, req: DisconnectRequest) -> ServiceResult<()> {
        let home = self.partition_of(&session.client_id);
        let result = self
            .command(
                home,
                &Command::Disconnect {
                    client_id: session.client_id.clone(),
                    epoch: session.epoch,
                    normal: req.normal,
                    with_will: req.with_will,
                    session_expiry_secs: req.session_expiry_secs,
                },
            )
            .await;
        self.forget(session);
        match result? {
            Reply::Done | Reply::Fenced | Reply::NoSession => Ok(()),
            other => Err(reply_error(other)),
        }
    }
}

async fn channel_to(addr: &str, tls: Option<&GrpcTls>) -> Result<Channel, tonic::transport::Error> {
    tls::endpoint(addr, tls)?
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect()
        .await
}

async fn fetch_info(addr: &str, tls: Option<&GrpcTls>) -> Result<ClusterInfo, String> {
    let channel = channel_to(addr, tls).await.map_err(|e| e.to_string())?;
    let mut client = BrokerClient::new(channel);
    client
        .cluster(ClusterRequest {
            version: API_VERSION,
            members_only: false,
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|e| e.message().to_string())
}

/// Keeps the ordered operation stream to one node and matches replies to waiters. Ends when
/// the node's link is closed (its queue's sender dropped: the node left, moved address, or
/// the client was dropped); operations still waiting then fail over like on a lost stream.
async fn op_stream(
    node: u64,
    addr: String,
    mut queue: mpsc::UnboundedReceiver<(Op, Option<oneshot::Sender<Outcome>>)>,
    tls: Option<GrpcTls>,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        if queue.is_closed() && queue.is_empty() {
            return;
        }
        let channel = match channel_to(&addr, tls.as_ref()).await {
            Ok(c) => c,
            Err(e) => {
                // Fail what is queued: the callers retry on another replica.
                loop {
                    match queue.try_recv() {
                        Ok((_, Some(tx))) => {
                            let _ = tx.send(Outcome::Unavailable(e.to_string()));
                        }
                        Ok((_, None)) => {}
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => return,
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        let (tx, rx) = mpsc::unbounded_channel::<Op>();
        let outbound =
            futures::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|op| (op, rx)) },
            );
        let mut client = BrokerClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
        let mut waiting: HashMap<u64, oneshot::Sender<Outcome>> = HashMap::new();
        let mut replies = match client.ops(outbound).await {
            Ok(r) => r.into_inner(),
            Err(e) => {
                debug!(node, error = %e, "ops stream refused");
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        loop {
            tokio::select! {
                item = queue.recv() => match item {
                    Some((op, reply)) => {
                        if let Some(r) = reply {
                            waiting.insert(op.id, r);
                        }
                        if tx.send(op).is_err() {
                            break;
                        }
                    }
                    None => return,
                },
                reply = replies.message() => match reply {
                    Ok(Some(OpReply { id, result })) => {
                        if let Some(w) = waiting.remove(&id) {
                            let _ = w.send(match result {
                                Some(op_reply::Result::Reply(b)) => Outcome::Reply(b),
                                Some(op_reply::Result::NotLeader(n)) => Outcome::NotLeader(n.leader),
                                Some(op_reply::Result::Error(e)) => Outcome::Unavailable(e),
                                None => Outcome::Unavailable("empty reply".into()),
                            });
                        }
                    }
                    Ok(None) | Err(_) => break,
                },
            }
        }
        tiermq_common::warn_limited!(
            STREAM_WARNINGS,
            &format!("ops-stream-{node}"),
            node,
            pending = waiting.len(),
            "ops stream to backend lost; reconnecting"
        );
        for (_, w) in waiting.drain() {
            let _ = w.send(Outcome::Unavailable("stream lost".into()));
        }
    }
}

/// Applies one node's route update to the shared table.
fn apply_route_update(inner: &Inner, node: u64, u: crate::broker::RouteUpdate) {
    let p = u.partition as usize;
    if p >= inner.partitions as usize {
        return;
    }
    let mut routes = inner.routes.write().unwrap_or_else(|e| e.into_inner());
    let routes = &mut *routes;
    if !u.leader {
        if routes.known_from[p] == Some(node) {
            routes.known_from[p] = None;
        }
        return;
    }
    if u.term < routes.terms[p] {
        tracing::debug!(
            node,
            partition = p,
            term = u.term,
            "routes of a deposed leader ignored"
        );
        return;
    }
    routes.terms[p] = u.term;
    inner.leaders.write().unwrap_or_else(|e| e.into_inner())[p] = node;
    if u.reset {
        for f in routes.filters[p].drain() {
            routes.trie.remove(&f, &(p as u32));
        }
    }
    for f in u.added {
        routes.trie.insert(&f, p as u32, ());
        routes.filters[p].insert(f);
    }
    for f in u.removed {
        routes.trie.remove(&f, &(p as u32));
        routes.filters[p].remove(&f);
    }
    if routes.known_from[p] != Some(node) {
        routes.known_from[p] = Some(node);
        routes.recompute_trust();
    }
}

/// Follows one node's route changes into the shared table, acknowledging each.
///
/// `generation` names the link this task belongs to: an update is applied only while that
/// link is the node's current one (checked under the `nodes` lock), so the watch of an old
/// address cannot write into the table after the node's entries were reset for the new one.
/// Once the node is retired (left the record) a broken stream is not reopened.
async fn route_watch(
    inner: Weak<Inner>,
    node: u64,
    addr: String,
    generation: u64,
    mut control: watch::Receiver<bool>,
) {
    loop {
        let Some(alive) = inner.upgrade() else {
            return;
        };
        // Unique per (client, node): the node waits for this watcher's acknowledgements.
        let watcher_id = alive
            .frontend_id
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(node);
        let tls = alive.tls.clone();
        drop(alive);
        let open = async {
            match channel_to(&addr, tls.as_ref()).await {
                Ok(ch) => (
                    BrokerClient::new(ch.clone())
                        .routes(RoutesRequest {
                            version: API_VERSION,
                            watcher_id,
                        })
                        .await
                        .map(|r| r.into_inner()),
                    Some(BrokerClient::new(ch)),
                ),
                Err(e) => (Err(tonic::Status::unavailable(e.to_string())), None),
            }
        };
        let (stream, mut acker) = tokio::select! {
            opened = open => opened,
            _ = membership::closed(&mut control) => return,
        };
        if let Ok(mut stream) = stream {
            // Renewals of the route lease (`route_lease`): with every acknowledgement of new
            // updates, and every `RENEW_EVERY` without one.
            let mut renew = tokio::time::interval(route_lease::RENEW_EVERY);
            renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut applied = 0;
            loop {
                let mut next = tokio::select! {
                    m = stream.message() => match m {
                        Ok(Some(u)) => Some(u),
                        _ => break,
                    },
                    _ = renew.tick() => None,
                    _ = membership::closed(&mut control) => return,
                };
                // Apply every update that is already here, then acknowledge the last one.
                while let Some(u) = next.take() {
                    applied = u.seq;
                    tracing::trace!(node, seq = u.seq, partition = u.partition, "route update");
                    let Some(alive) = inner.upgrade() else { return };
                    {
                        let nodes = alive.nodes.read().unwrap_or_else(|e| e.into_inner());
                        if nodes.get(&node).map(|l| l.generation) != Some(generation) {
                            return;
                        }
                        apply_route_update(&alive, node, u);
                    }
                    if let Some(Ok(Some(u))) = stream.message().now_or_never() {
                        next = Some(u);
                    }
                }
                let Some(acker) = acker.as_mut() else {
                    continue;
                };
                let sent_at = Instant::now();
                // An answer later than the lease is worth nothing: do not stall the stream.
                let r = tokio::time::timeout(
                    route_lease::LEASE,
                    acker.ack_routes(RoutesAck {
                        version: API_VERSION,
                        watcher_id,
                        seq: applied,
                    }),
                )
                .await;
                let granted = matches!(&r, Ok(Ok(reply)) if reply.get_ref().granted);
                let outcome = match &r {
                    Ok(Ok(_)) if granted => "granted",
                    Ok(Ok(_)) => "refused",
                    _ => "failed",
                };
                if let Some(alive) = inner.upgrade() {
                    alive
                        .metrics
                        .route_renewals
                        .get_or_create(&OutcomeLabel { outcome })
                        .inc();
                }
                tracing::trace!(node, seq = applied, granted, "route updates acknowledged");
                if granted {
                    let Some(alive) = inner.upgrade() else { return };
                    let nodes = alive.nodes.read().unwrap_or_else(|e| e.into_inner());
                    if nodes.get(&node).map(|l| l.generation) != Some(generation) {
                        return;
                    }
                    alive
                        .routes
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .renew(node, sent_at + route_lease::LEASE);
                }
                renew.reset();
            }
        }
        // The stream broke: whatever this node told us is no longer known.
        if let Some(inner) = inner.upgrade() {
            let nodes = inner.nodes.read().unwrap_or_else(|e| e.into_inner());
            if nodes.get(&node).map(|l| l.generation) != Some(generation) {
                return;
            }
            let mut routes = inner.routes.write().unwrap_or_else(|e| e.into_inner());
            routes.forget(node);
        }
        if *control.borrow() {
            // Retired: it led nothing we can still hear about; the refresher closes the link.
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = membership::closed(&mut control) => return,
        }
    }
}

/// Receives one node's events for this frontend's sessions. Ends with the node's link; a
/// retired node's broken stream is not reopened (see [`route_watch`]).
async fn event_stream(
    inner: Weak<Inner>,
    node: u64,
    addr: String,
    mut control: watch::Receiver<bool>,
) {
    let mut opened_before = false;
    loop {
        let Some(alive) = inner.upgrade() else { return };
        let frontend_id = alive.frontend_id;
        let tls = alive.tls.clone();
        drop(alive);
        let open = async {
            match channel_to(&addr, tls.as_ref()).await {
                Ok(ch) => BrokerClient::new(ch)
                    .max_decoding_message_size(64 * 1024 * 1024)
                    .events(EventsRequest {
                        version: API_VERSION,
                        frontend_id,
                    })
                    .await
                    .map(|r| r.into_inner()),
                Err(e) => Err(tonic::Status::unavailable(e.to_string())),
            }
        };
        let stream = tokio::select! {
            opened = open => opened,
            _ = membership::closed(&mut control) => return,
        };
        match stream {
            Ok(mut stream) => {
                debug!(node, "event stream open");
                if opened_before {
                    if let Some(inner) = inner.upgrade() {
                        ClusterClient { inner }.audit_sessions();
                    }
                }
                opened_before = true;
                loop {
                    let batch = tokio::select! {
                        m = stream.message() => match m {
                            Ok(Some(batch)) => batch,
                            _ => break,
                        },
                        _ = membership::closed(&mut control) => return,
                    };
                    let Some(inner) = inner.upgrade() else { return };
                    deliver_events(&inner, batch);
                }
            }
            Err(e) => debug!(node, error = %e, "event stream unavailable"),
        }
        if *control.borrow() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = membership::closed(&mut control) => return,
        }
    }
}

/// Hands a batch of events to the connections owning them (or keeps them until the
/// CONNECT's reply registers the session).
fn deliver_events(inner: &Inner, batch: crate::broker::EventBatch) {
    let mut s = inner.sessions.lock().unwrap_or_else(|e| e.into_inner());
    for e in batch.events {
        let Some(event) = e.decode() else {
            continue;
        };
        let client_id: Arc<str> = Arc::from(e.client_id.as_str());
        match s.live.get(&client_id) {
            Some((epoch, tx)) if *epoch == e.epoch => {
                let _ = tx.send(event);
            }
            Some((epoch, _)) if *epoch > e.epoch => {} // stale
            _ => {
                let early = s.early.entry((client_id, e.epoch)).or_default();
                if early.len() < 65_536 {
                    early.push(event);
                }
            }
        }
    }
    if s.early.len() > 10_000 {
        s.early.clear();
    }
}

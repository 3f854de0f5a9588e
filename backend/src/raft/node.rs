//! The multi-raft driver of one backend node: every partition group this node replicates,
//! driven by one task.
//!
//! The loop, kept in one readable place as in raft-rs's `five_mem_node` example:
//! 1. **collect**: take every message waiting in the mailbox — proposals, Raft messages from
//!    peers, queries — and tick every group when the tick interval has passed;
//! 2. **propose**: per group, all commands collected this round become **one** log entry
//!    (a batch), stamped with the leader's clock; all queries collected this round are covered
//!    by **one** ReadIndex request (`reads.rs`);
//! 3. **ready**, for every group that has one: send the messages a leader may send before
//!    persisting, install a snapshot, apply committed entries, append new entries and the hard
//!    state to sled (not yet flushed);
//! 4. **persist**: one `flush` of the shared sled database for all groups — many proposals of
//!    many partitions per fsync;
//! 5. **send** the messages that had to wait for persistence, **advance** every group, apply
//!    what the light ready commits, answer the queries whose read index is applied.
//!
//! A proposer's reply is sent when its command is *applied*, i.e. committed by a quorum — the
//! promise a PUBACK stands on. Commands keep their position in the batch: the state machine's
//! index of command `i` of Raft entry `n` is `n << 20 | i`, unique and increasing, and serves
//! as the connection epoch for `Connect`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use protobuf::Message as _;
use raft::prelude::{
    ConfState, Entry as RaftEntry, EntryType, Message as RaftMessage, MessageType, Snapshot,
};
use raft::{RawNode, StateRole};
use tiermq_common::session_api::SessionEvent;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::clock::WallClock;
use super::storage::{DiskFaults, SledRaftStorage};
use crate::partition::command::{Command, Effect, Entry, Query, Reply};
use crate::partition::session::Attachment;
use crate::partition::session::SessionLimits;
use crate::partition::{Partition, PartitionImage, PartitionLoad};
use crate::placement::{NodeId, PartitionMap};
use crate::storage::PartitionStore;

mod hub;
mod membership;
mod reads;

pub use hub::{ClusterHub, FrontendEvent, LeaderWork, RouteChange};
pub use membership::{MembershipConfig, MoveProgress};

/// Storage failures (a full or broken disk) repeat every round of the loop while they last:
/// one line per kind of failure per 10 s, with the count of the swallowed ones.
static STORAGE_WARNINGS: tiermq_common::log_limit::LogLimiter =
    tiermq_common::log_limit::LogLimiter::new(Duration::from_secs(10));

/// Commands per Raft entry are numbered with this many low bits of the state machine index.
const BATCH_BITS: u32 = 20;
const MAX_BATCH: usize = 1 << 12;

/// Delivers messages to other nodes' drivers. Implementations: gRPC (`transport.rs`), an
/// in-memory network for tests and the simulation's network. Sending is fire-and-forget: Raft
/// tolerates lost messages, and so does the removal query (it is asked again).
pub trait Transport: Send + Sync + 'static {
    fn send(&self, to: NodeId, messages: Vec<(u32, PeerMessage)>);
}

/// What one node's driver sends another about one partition: raft-rs's messages, and ours
/// about removed replicas (`membership.rs`), which travel the same way so that the network's
/// faults (and the simulation's) hit both alike.
#[derive(Debug, Clone)]
pub enum PeerMessage {
    /// A message of the partition's Raft group.
    Raft(RaftMessage),
    /// From a replica that the target map no longer places on node `from` and that has heard
    /// from no leader for long: "is `from` still in the partition's configuration?"
    RemovalQuery { from: NodeId },
    /// A leader's answer to a [`PeerMessage::RemovalQuery`], sent only when its configuration
    /// — committed as of its applied index `applied` — names `from`'s asker in no role.
    /// Nobody answers "still in": silence never deletes a replica.
    Removed { from: NodeId, applied: u64 },
}

/// Settings of a node's Raft driver.
#[derive(Debug, Clone)]
pub struct RaftConfig {
    pub node_id: NodeId,
    pub tick_interval: Duration,
    /// Ticks without a heartbeat before a follower stands for election.
    pub election_tick: usize,
    pub heartbeat_tick: usize,
    pub limits: SessionLimits,
    /// Checkpoint the applied state (and allow log compaction) after this many entries.
    pub checkpoint_entries: u64,
    /// Entries kept in the log behind the checkpoint, for followers that lag a little.
    pub log_keep_entries: u64,
    /// How often time advances in the state machines (wills, expiry): the leader proposes a
    /// `Tick` command this often.
    pub sm_tick_interval: Duration,
    /// A frontend holding sessions here without an event stream for this long is lost.
    pub frontend_lease: Duration,
    /// Pacing of replica moves (`membership.rs`).
    pub membership: MembershipConfig,
    /// Whether a group placed here with empty storage starts with the map's replicas as its
    /// voters (the static bootstrap of a new cluster, map epoch 1). False for a node that
    /// joins a running cluster or restarts under a later map: its new replicas start empty
    /// and learn the configuration from the leader's snapshot.
    pub bootstrap: bool,
    /// The clock entries are stamped with (the simulation's virtual clock there).
    pub clock: WallClock,
    /// Flush on the driver's own thread instead of a blocking-pool thread. The deterministic
    /// simulation needs it (a second thread would make its schedule depend on the OS); a
    /// server must not (a slow disk would stall the runtime thread).
    pub sync_flush: bool,
    /// Upper bound (exclusive) of raft's randomized election timeout, in ticks; 0 = raft's
    /// default (2 × `election_tick`). The simulation sets `election_tick + 1` with a per-node
    /// `election_tick` drawn from its seed: raft-rs draws the timeout from the thread's
    /// random generator, which no seed reaches.
    pub max_election_tick: usize,
    /// Makes every Raft storage write of this node fail while on ([`RaftHandle::disk_faults`]).
    pub disk_faults: Arc<DiskFaults>,
}

impl RaftConfig {
    pub fn new(node_id: NodeId) -> Self {
        RaftConfig {
            node_id,
            tick_interval: Duration::from_millis(100),
            election_tick: 10,
            heartbeat_tick: 2,
            limits: SessionLimits::default(),
            checkpoint_entries: 5_000,
            log_keep_entries: 2_000,
            sm_tick_interval: Duration::from_millis(500),
            frontend_lease: Duration::from_secs(3),
            membership: MembershipConfig::default(),
            bootstrap: true,
            clock: WallClock::system(),
            sync_flush: false,
            max_election_tick: 0,
            disk_faults: Arc::default(),
        }
    }
}

/// Why a proposal was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    #[error("not the leader of this partition (leader hint: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    #[error("this node holds no replica of partition {0}")]
    UnknownPartition(u32),
    /// Leadership changed before the entry committed; it may or may not have been applied.
    #[error("proposal dropped by a leadership change")]
    Dropped,
    #[error("node stopped")]
    Stopped,
}

/// What a node reports about one of its groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStatus {
    pub partition: u32,
    pub leader: Option<NodeId>,
    pub is_leader: bool,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    pub last_index: u64,
    /// Index of the latest snapshot stored or installed (0: none).
    pub snapshot_index: u64,
    pub voters: Vec<NodeId>,
    /// Replicas being caught up before they become voters (a move in progress).
    pub learners: Vec<NodeId>,
    /// Session totals of this replica's state machine (every replica applies the same log, so
    /// followers report the leader's numbers, up to their lag: sum over leaders only).
    pub load: PartitionLoad,
    /// Retained messages stored in the partition.
    pub retained: u64,
}

type EventSender = mpsc::UnboundedSender<SessionEvent>;

enum NodeMsg {
    Propose {
        partition: u32,
        command: Command,
        reply: oneshot::Sender<Result<Reply, ProposeError>>,
        events: Option<EventSender>,
        origin: Option<Origin>,
    },
    /// A frontend's ordered stream ended: its fences go.
    StreamClosed { stream: u64 },
    Peer {
        partition: u32,
        message: PeerMessage,
    },
    Status {
        partition: u32,
        reply: oneshot::Sender<Option<GroupStatus>>,
    },
    /// Serialized image of a partition's state (tests compare replicas with it).
    Image {
        partition: u32,
        reply: oneshot::Sender<Option<(u64, Vec<u8>)>>,
    },
    Stop {
        done: oneshot::Sender<()>,
        /// False: stop as a crash would (no last checkpoint, no flush).
        checkpoint: bool,
    },
    /// Hand the leadership of every group this node leads to its most caught-up follower.
    /// Answers with the partitions still led here (transfers take a round trip or two).
    TransferLeadership { reply: oneshot::Sender<Vec<u32>> },
    Qos0 {
        partition: u32,
        message: Arc<tiermq_common::Message>,
        publisher: Option<Arc<str>>,
    },
    /// A leader read, answered once a ReadIndex round confirmed the leadership (`reads.rs`).
    Query {
        partition: u32,
        query: Query,
        reply: reads::QueryReply,
    },
    /// A frontend opened its event stream to this node: replay in-flight messages.
    FrontendAttached { frontend_id: u64 },
    /// A route watcher joined: send it a snapshot of every partition this node leads.
    WatchRoutes {
        watcher_id: u64,
        tx: mpsc::UnboundedSender<RouteChange>,
    },
    /// Membership changes (`membership.rs`): a new target map.
    Membership(membership::Request),
}

/// Counters of a node's driver (for metrics and benchmarks).
#[derive(Debug, Default)]
pub struct RaftStats {
    /// Commands proposed by this node while leading.
    pub commands: AtomicU64,
    /// Raft entries (command batches) proposed by this node.
    pub entries: AtomicU64,
    /// Flushes (fsyncs) of the node's database.
    pub flushes: AtomicU64,
    /// Commit and flush latency, proposals per partition.
    pub timings: super::timings::RaftTimings,
}

/// The handle through which everything talks to a node's driver.
#[derive(Clone)]
pub struct RaftHandle {
    node_id: NodeId,
    disk_faults: Arc<DiskFaults>,
    tx: mpsc::UnboundedSender<NodeMsg>,
    stats: Arc<RaftStats>,
    hub: Arc<ClusterHub>,
    driver: tokio::task::AbortHandle,
}

impl RaftHandle {
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    pub fn stats(&self) -> &RaftStats {
        &self.stats
    }

    /// Proposes `command` to `partition` and waits until it is applied on this node (which
    /// must lead the partition).
    pub async fn propose(&self, partition: u32, command: Command) -> Result<Reply, ProposeError> {
        self.propose_with_events(partition, command, None).await
    }

    /// Like [`RaftHandle::propose`]; for `Connect`, `events` receives the session's events
    /// while this node leads the partition.
    pub async fn propose_with_events(
        &self,
        partition: u32,
        command: Command,
        events: Option<EventSender>,
    ) -> Result<Reply, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(NodeMsg::Propose {
                partition,
                command,
                reply,
                events,
                origin: None,
            })
            .map_err(|_| ProposeError::Stopped)?;
        rx.await.map_err(|_| ProposeError::Stopped)?
    }

    /// Sends a proposal to the driver now; the returned future waits for it to be applied.
    /// Calls made one after another reach the log in that order, however their futures are
    /// polled.
    pub fn submit(
        &self,
        partition: u32,
        command: Command,
    ) -> impl std::future::Future<Output = Result<Reply, ProposeError>> + Send + 'static {
        self.submit_from(partition, command, None)
    }

    /// [`RaftHandle::submit`] for an operation of a frontend's ordered stream: once this node
    /// refuses one of `origin`'s operations, it refuses the later ones of the same stream and
    /// generation too ([`Origin`]).
    pub fn submit_from(
        &self,
        partition: u32,
        command: Command,
        origin: Option<Origin>,
    ) -> impl std::future::Future<Output = Result<Reply, ProposeError>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let sent = self
            .tx
            .send(NodeMsg::Propose {
                partition,
                command,
                reply,
                events: None,
                origin,
            })
            .is_ok();
        async move {
            if !sent {
                return Err(ProposeError::Stopped);
            }
            rx.await.map_err(|_| ProposeError::Stopped)?
        }
    }

    /// Forgets the fences of a frontend stream that ended ([`Origin`]).
    pub fn stream_closed(&self, stream: u64) {
        let _ = self.tx.send(NodeMsg::StreamClosed { stream });
    }

    /// Delivers a QoS0 message to the partition's online subscribers, if this node leads it.
    pub fn qos0(
        &self,
        partition: u32,
        message: Arc<tiermq_common::Message>,
        publisher: Option<Arc<str>>,
    ) {
        let _ = self.tx.send(NodeMsg::Qos0 {
            partition,
            message,
            publisher,
        });
    }

    /// A linearizable leader read (ReadIndex: answered once this node has confirmed with a
    /// quorum that it still leads, `NotLeader` if it does not); the answer is postcard-encoded
    /// (see [`Query`]).
    pub fn query(
        &self,
        partition: u32,
        query: Query,
    ) -> impl std::future::Future<Output = Result<Vec<u8>, ProposeError>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let sent = self
            .tx
            .send(NodeMsg::Query {
                partition,
                query,
                reply,
            })
            .is_ok();
        async move {
            if !sent {
                return Err(ProposeError::Stopped);
            }
            rx.await.map_err(|_| ProposeError::Stopped)?
        }
    }

    /// Opens the event stream of `frontend_id` (replacing an older one) and replays the
    /// in-flight messages of its sessions in partitions this node leads.
    pub fn attach_frontend(&self, frontend_id: u64) -> mpsc::UnboundedReceiver<FrontendEvent> {
        let rx = self.hub.register_frontend(frontend_id);
        let _ = self.tx.send(NodeMsg::FrontendAttached { frontend_id });
        rx
    }

    /// Route changes of the partitions this node leads, starting with a snapshot of each.
    pub fn watch_routes(&self, watcher_id: u64) -> mpsc::UnboundedReceiver<RouteChange> {
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = self.tx.send(NodeMsg::WatchRoutes { watcher_id, tx });
        rx
    }

    pub fn hub(&self) -> &Arc<ClusterHub> {
        &self.hub
    }

    /// The switch that makes this node's disk fail (tests of what it may acknowledge then).
    pub fn disk_faults(&self) -> &Arc<DiskFaults> {
        &self.disk_faults
    }

    /// Resolves once the driver has stopped (asked to, or because it could not persist).
    pub async fn stopped(&self) {
        self.tx.closed().await;
    }

    /// Hands a Raft message from a peer to its group. False once the driver has stopped.
    pub fn step(&self, partition: u32, message: RaftMessage) -> bool {
        self.deliver(partition, PeerMessage::Raft(message))
    }

    /// Hands a message from a peer's driver to this one. False once the driver has stopped.
    pub fn deliver(&self, partition: u32, message: PeerMessage) -> bool {
        self.tx.send(NodeMsg::Peer { partition, message }).is_ok()
    }

    pub async fn status(&self, partition: u32) -> Option<GroupStatus> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(NodeMsg::Status { partition, reply }).ok()?;
        rx.await.ok().flatten()
    }

    /// Moves the leadership of every partition led here to other replicas, so that this node
    /// can stop without clients waiting for an election timeout. Re-asks every 200 ms (a
    /// transfer can fail, or an election can hand a partition back) until no partition is
    /// led here or `timeout` passes. Returns the partitions still led here.
    pub async fn transfer_leadership(&self, timeout: std::time::Duration) -> Vec<u32> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (reply, rx) = oneshot::channel();
            if self.tx.send(NodeMsg::TransferLeadership { reply }).is_err() {
                return Vec::new();
            }
            let led = rx.await.unwrap_or_default();
            if led.is_empty() || tokio::time::Instant::now() >= deadline {
                return led;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// The partition's state, serialized deterministically (for comparing replicas).
    pub async fn image(&self, partition: u32) -> Option<Vec<u8>> {
        self.applied_image(partition).await.map(|(_, image)| image)
    }

    /// Like [`RaftHandle::image`], with the Raft index the image is as of: replicas that
    /// applied the same index must have equal images.
    pub async fn applied_image(&self, partition: u32) -> Option<(u64, Vec<u8>)> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(NodeMsg::Image { partition, reply }).ok()?;
        rx.await.ok().flatten()
    }

    /// Ends the driver task at once, between two rounds, without waiting (unlike
    /// [`RaftHandle::crash`], which waits for the mailbox): pending proposals are never
    /// answered, what each round flushed stays in sled. For the deterministic simulation,
    /// which kills a node at an instant its seed chose.
    pub fn abort(&self) {
        self.driver.abort();
    }

    /// Stops the driver after a last checkpoint; the sled database is released when this
    /// returns.
    pub async fn stop(&self) {
        self.stop_driver(true).await;
    }

    /// Stops the driver as `kill -9` would stop the process: no last checkpoint and no flush,
    /// so a restart finds only what earlier rounds made durable (tests of crash recovery).
    pub async fn crash(&self) {
        self.stop_driver(false).await;
    }

    async fn stop_driver(&self, checkpoint: bool) {
        let (done, rx) = oneshot::channel();
        if self.tx.send(NodeMsg::Stop { done, checkpoint }).is_ok() {
            let _ = rx.await;
        }
    }
}

type ReplySender = oneshot::Sender<Result<Reply, ProposeError>>;

/// A command waiting to be proposed in this round's batch.
type Proposal = (Command, ReplySender, Option<EventSender>, Option<Origin>);

/// Where a proposal came from: a frontend's ordered operation stream (a number this node gives
/// each stream) and the generation of the frontend's pipe for the partition, which grows each
/// time the pipe re-sends after a failure.
///
/// Why (issue 19, bug 4): the pipe sends operations A and B of a partition to a node that is
/// not the leader yet; the node refuses A, becomes leader, and would accept B — then A, retried,
/// lands after B, and a publisher's order is broken. So once a node refuses an operation, it
/// refuses every later operation of that stream, partition and generation: the pipe re-sends
/// them all, in order, under a new generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub stream: u64,
    pub generation: u64,
}

/// A proposal waiting for its entry to be applied.
struct Pending {
    index: u64,
    term: u64,
    replies: Vec<Option<oneshot::Sender<Result<Reply, ProposeError>>>>,
    events: Vec<Option<EventSender>>,
    origins: Vec<Option<Origin>>,
    timer: super::timings::CommitTimer,
}

/// One partition's Raft group and state machine on this node.
struct Group {
    partition: u32,
    raw: RawNode<SledRaftStorage>,
    storage: SledRaftStorage,
    checkpoints: PartitionStore,
    sm: Partition,
    pending: VecDeque<Pending>,
    proposals: Vec<Proposal>,
    /// Live connections of sessions in this partition (used while this node leads it).
    connections: HashMap<Arc<str>, (u64, EventSender)>,
    applied_since_checkpoint: u64,
    was_leader: bool,
    /// The term whose leader work ([`Group::take_over`]) has run here (0: none yet).
    taken_over: u64,
    /// A conf change removed this node from the group: the driver destroys it after the round.
    removed: bool,
    /// A leader's append, heartbeat or snapshot of the current term (or a later one) arrived
    /// since the last tick (`membership.rs` counts the ticks without one). Not `leader_id`: a
    /// learner never campaigns, so it keeps the id of a leader that stopped talking to it.
    heard_leader: bool,
    /// Stream → the highest pipe generation of which this group refused an operation: later
    /// operations of that stream and generation are refused too ([`Origin`]).
    fences: HashMap<u64, u64>,
    /// Queries waiting for a ReadIndex round (`reads.rs`).
    reads: reads::Reads,
    /// Ticks each peer has spent in raft's snapshot state while this node leads
    /// (`membership.rs`, `Driver::unstall_snapshots`).
    snapshot_ticks: HashMap<u64, usize>,
}

impl Group {
    /// The Raft index of the last command applied to the state machine.
    fn applied(&self) -> u64 {
        self.sm.applied_index() >> BATCH_BITS
    }
}

impl Group {
    fn leader(&self) -> Option<NodeId> {
        let id = self.raw.raft.leader_id;
        (id != raft::INVALID_ID).then_some(id)
    }

    fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// The voter (not this node) whose log matches the leader's furthest: the one that can
    /// take over soonest. None when this node is not the leader or has no other voter.
    fn transfer_target(&self) -> Option<NodeId> {
        let raft = &self.raw.raft;
        let me = raft.id;
        raft.prs()
            .iter()
            .filter(|(id, _)| **id != me && raft.prs().conf().voters().contains(**id))
            .max_by_key(|(id, p)| (p.matched, std::cmp::Reverse(**id)))
            .map(|(id, _)| *id)
    }

    fn status(&self) -> GroupStatus {
        let raft = &self.raw.raft;
        GroupStatus {
            partition: self.partition,
            leader: self.leader(),
            is_leader: self.is_leader(),
            term: raft.term,
            commit: raft.raft_log.committed,
            applied: raft.raft_log.applied,
            last_index: raft.raft_log.last_index(),
            snapshot_index: self.storage.snapshot_metadata().index,
            voters: raft.prs().conf().voters().ids().iter().collect(),
            learners: raft.prs().conf().learners().iter().copied().collect(),
            load: self.sm.load(),
            retained: self.sm.retained_count() as u64,
        }
    }

    fn fail_pending(&mut self, err: ProposeError) {
        for p in std::mem::take(&mut self.pending) {
            for (r, origin) in p.replies.into_iter().zip(p.origins) {
                if let Some(r) = r {
                    self.refuse(origin, r, err.clone());
                }
            }
        }
    }

    /// Answers a proposal with `err` and fences its stream's later operations ([`Origin`]).
    fn refuse(&mut self, origin: Option<Origin>, reply: ReplySender, err: ProposeError) {
        if let Some(o) = origin {
            let fence = self.fences.entry(o.stream).or_default();
            *fence = (*fence).max(o.generation);
        }
        let _ = reply.send(Err(err));
    }

    /// Whether an earlier operation of `origin`'s stream and generation was refused here.
    fn fenced(&self, origin: Option<Origin>) -> bool {
        origin.is_some_and(|o| {
            self.fences
                .get(&o.stream)
                .is_some_and(|g| *g >= o.generation)
        })
    }

    /// Applies committed Raft entries to the state machine and answers their proposers.
    ///
    /// Effects are carried out only for entries of the leader's own term. An entry of an
    /// earlier term was proposed by an earlier leader, which carried out its effects when it
    /// applied it (a new leader often applies such entries only now, having learned of their
    /// commit with its first own entry): doing it again would deliver the same packet id as a
    /// new message, fire a will twice and repeat shared-subscription steps. What the earlier
    /// leader may not have finished is taken over once, from the state as of its last entry,
    /// just before the first entry of the new term ([`Group::take_over`]).
    fn apply_committed(&mut self, entries: Vec<RaftEntry>, hub: &ClusterHub, now: u64) {
        let leading = self.is_leader();
        let term = self.raw.raft.term;
        for entry in entries {
            let index = entry.index;
            let own = leading && entry.term == term;
            if own && self.taken_over != term {
                self.taken_over = term;
                self.take_over(hub, now);
            }
            let mut waiter = None;
            while let Some(front) = self.pending.front() {
                if front.index < index {
                    let p = self.pending.pop_front().expect("front exists");
                    for r in p.replies.into_iter().flatten() {
                        let _ = r.send(Err(ProposeError::Dropped));
                    }
                } else {
                    if front.index == index {
                        let p = self.pending.pop_front().expect("front exists");
                        if p.term == entry.term {
                            p.timer.applied();
                            waiter = Some(p);
                        } else {
                            for r in p.replies.into_iter().flatten() {
                                let _ = r.send(Err(ProposeError::Dropped));
                            }
                        }
                    }
                    break;
                }
            }
            match entry.get_entry_type() {
                EntryType::EntryNormal if !entry.data.is_empty() => {
                    let commands: Vec<Entry> = match postcard::from_bytes(&entry.data) {
                        Ok(c) => c,
                        Err(e) => {
                            // Only our own proposals are in the log; a decode failure means a
                            // version mismatch. Skipping keeps replicas identical.
                            warn!(partition = self.partition, index, error = %e, "undecodable entry skipped");
                            Vec::new()
                        }
                    };
                    let (mut replies, mut event_txs) = match waiter {
                        Some(p) => (p.replies, p.events),
                        None => (Vec::new(), Vec::new()),
                    };
                    for (i, command) in commands.into_iter().enumerate() {
                        let sm_index = (index << BATCH_BITS) | i as u64;
                        let client = connect_client(&command.command);
                        // A takeover's DISCONNECT goes to the connection being replaced,
                        // possibly on another frontend: remember where it was.
                        let previous = client
                            .as_ref()
                            .and_then(|c| self.sm.session(c))
                            .and_then(|s| s.attachment);
                        let (reply, fx) = self.sm.apply(sm_index, command);
                        let new_conn = match (&reply, event_txs.get_mut(i).and_then(Option::take)) {
                            (Reply::Connected { epoch, .. }, Some(tx)) => Some((*epoch, tx)),
                            _ => None,
                        };
                        if own {
                            self.dispatch(fx, new_conn.as_ref(), previous, hub);
                            if let (Some(client), Some(conn)) = (client, new_conn) {
                                self.connections.insert(client, conn);
                            }
                        }
                        if let Some(Some(r)) = replies.get_mut(i).map(Option::take) {
                            let _ = r.send(Ok(reply));
                        }
                    }
                }
                EntryType::EntryNormal => {} // the empty entry a new leader appends
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    self.apply_conf_entry(&entry);
                }
            }
            self.applied_since_checkpoint += 1;
        }
    }

    /// A new leader, once it has applied every entry of earlier terms: announces its routes and
    /// carries on what the old leader may not have finished — the in-flight windows of the
    /// frontends attached here are sent again (DUP: they may not have reached the clients),
    /// and pending shared-subscription steps are handed over again.
    fn take_over(&mut self, hub: &ClusterHub, now: u64) {
        info!(
            partition = self.partition,
            term = self.raw.raft.term,
            "leading: taking over the old leader's work"
        );
        hub.took_over(self.partition);
        hub.broadcast_route(self.route_snapshot());
        for f in self.sm.attached_frontends() {
            let fx = self.sm.replay_for_frontend(f, now);
            self.dispatch(fx, None, None, hub);
        }
        for work in self.sm.shared_work() {
            hub.hand_over(LeaderWork::Shared {
                origin: self.partition,
                work,
            });
        }
    }

    /// Carries out effects on the leader: events to connections; everything else is handed
    /// to the node's owner.
    fn dispatch(
        &mut self,
        fx: Vec<Effect>,
        new_conn: Option<&(u64, EventSender)>,
        previous: Option<Attachment>,
        hub: &ClusterHub,
    ) {
        for effect in fx {
            match effect {
                Effect::Send {
                    client_id,
                    epoch,
                    event,
                } => {
                    // In-process connections (tests, embedded use) first ...
                    let tx = match new_conn {
                        Some((e, tx)) if *e == epoch => Some(tx),
                        _ => match self.connections.get(&client_id) {
                            Some((e, tx)) if *e == epoch => Some(tx),
                            _ => None,
                        },
                    };
                    if let Some(tx) = tx {
                        let _ = tx.send(event);
                        continue;
                    }
                    // ... then the frontend that holds the connection with this epoch.
                    let frontend = match self.sm.session(&client_id).and_then(|s| s.attachment) {
                        Some(a) if a.epoch == epoch => Some(a.frontend_id),
                        _ => previous.filter(|a| a.epoch == epoch).map(|a| a.frontend_id),
                    };
                    if let Some(frontend_id) = frontend {
                        hub.send_to_frontend(
                            frontend_id,
                            FrontendEvent {
                                client_id,
                                epoch,
                                event,
                            },
                        );
                    }
                }
                // Recorded as shared work by `Partition::apply`; never leaves the partition.
                Effect::PublishWill { .. } => {}
                Effect::Shared(work) => hub.hand_over(LeaderWork::Shared {
                    origin: self.partition,
                    work,
                }),
                Effect::RouteAdded { filter } => hub.broadcast_route(RouteChange {
                    partition: self.partition,
                    leader: true,
                    reset: false,
                    added: vec![filter],
                    removed: Vec::new(),
                    term: self.raw.raft.term,
                    seq: 0,
                }),
                Effect::RouteRemoved { filter } => hub.broadcast_route(RouteChange {
                    partition: self.partition,
                    leader: true,
                    reset: false,
                    added: Vec::new(),
                    removed: vec![filter],
                    term: self.raw.raft.term,
                    seq: 0,
                }),
            }
        }
    }

    fn route_snapshot(&self) -> RouteChange {
        RouteChange {
            partition: self.partition,
            leader: true,
            reset: true,
            added: self.sm.filters(),
            removed: Vec::new(),
            term: self.raw.raft.term,
            seq: 0,
        }
    }

    fn maybe_checkpoint(&mut self, config: &RaftConfig, force: bool) {
        if !force && self.applied_since_checkpoint < config.checkpoint_entries {
            return;
        }
        if self.applied_since_checkpoint == 0 {
            return;
        }
        if let Err(e) = self.checkpoints.checkpoint(&mut self.sm) {
            tiermq_common::warn_limited!(STORAGE_WARNINGS, "checkpoint", partition = self.partition, error = %e, "checkpoint failed");
            return;
        }
        self.applied_since_checkpoint = 0;
        let applied = self.sm.applied_index() >> BATCH_BITS;
        let keep_from = applied.saturating_sub(config.log_keep_entries);
        if keep_from > self.storage.snapshot_metadata().index + 1 {
            // Lagging followers beyond this point get a snapshot.
            if let Err(e) = self.build_snapshot() {
                tiermq_common::warn_limited!(STORAGE_WARNINGS, "snapshot", partition = self.partition, error = %e, "snapshot failed");
                return;
            }
            if let Err(e) = self.storage.compact(keep_from) {
                tiermq_common::warn_limited!(STORAGE_WARNINGS, "compaction", partition = self.partition, error = %e, "log compaction failed");
            }
        }
    }

    /// Stores a snapshot of the applied state so lagging replicas can catch up.
    fn build_snapshot(&mut self) -> Result<(), raft::Error> {
        // Raft's applied index, not the state machine's: conf changes (and empty entries) after
        // the last command move it, and the snapshot's conf state is the one as of this index.
        let applied = (self.sm.applied_index() >> BATCH_BITS).max(self.raw.raft.raft_log.applied);
        if applied == 0 {
            return Ok(());
        }
        let term = self.raw.raft.raft_log.term(applied)?;
        let conf: ConfState = self.raw.raft.prs().conf().to_conf_state();
        let data = postcard::to_stdvec(&self.sm.image())
            .map_err(|e| raft::Error::ConfChangeError(e.to_string()))?;
        self.storage.store_snapshot(applied, term, conf, data)
    }

    /// Installs a snapshot received from the leader: decodes its image first (an undecodable
    /// one is stored nowhere), then the Raft storage takes it, then the state machine and its
    /// checkpoint. A crash between the last two is repaired on restart by
    /// [`catch_up_with_snapshot`]. An error is fatal: raft already counts the snapshot as
    /// applied, so this replica can go on only from a restart.
    fn install_snapshot(&mut self, snap: Snapshot, limits: SessionLimits) -> Result<(), String> {
        let partition = self.partition;
        let index = snap.get_metadata().index;
        let image = postcard::from_bytes::<PartitionImage>(snap.get_data())
            .map_err(|e| format!("partition {partition}: undecodable snapshot at {index}: {e}"))?;
        self.storage.apply_snapshot(snap).map_err(|e| {
            format!("partition {partition}: cannot store the snapshot at {index}: {e}")
        })?;
        self.sm = Partition::restore(limits, image);
        self.connections.clear();
        self.applied_since_checkpoint = 0;
        self.checkpoints.replace_all(&mut self.sm).map_err(|e| {
            format!("partition {partition}: cannot checkpoint the snapshot at {index}: {e}")
        })?;
        info!(partition, index, "snapshot installed");
        Ok(())
    }
}

fn connect_client(c: &Command) -> Option<Arc<str>> {
    match c {
        Command::Connect { client_id, .. } => Some(client_id.clone()),
        _ => None,
    }
}

/// Starts the driver of node `config.node_id` for the groups `map` assigns to it.
///
/// `hub` connects the driver to the frontend-facing services: session events, route changes
/// and fired wills of the partitions this node leads go there.
pub fn start(
    config: RaftConfig,
    db: sled::Db,
    map: &PartitionMap,
    transport: Arc<dyn Transport>,
    hub: Arc<ClusterHub>,
) -> Result<RaftHandle, raft::Error> {
    let logger = slog::Logger::root(tracing_slog::TracingSlogDrain, slog::o!());
    let mut groups = BTreeMap::new();
    for partition in map.partitions_of(config.node_id) {
        let group = open_group(
            &config,
            &db,
            &logger,
            partition,
            config.bootstrap.then(|| map.replicas_of(partition)),
        )?;
        groups.insert(partition, group);
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let stats = Arc::new(RaftStats::default());
    let node_id = config.node_id;
    let disk_faults = config.disk_faults.clone();
    hub.set_takeover_hold(config.tick_interval * config.election_tick as u32);
    let driver = Driver {
        stats: stats.clone(),
        missing_frontends: HashMap::new(),
        config,
        db,
        groups,
        rx,
        transport,
        hub: hub.clone(),
        last_now: 0,
        membership: membership::Membership::new(map, logger),
    };
    let task = tokio::spawn(driver.run());
    Ok(RaftHandle {
        node_id,
        disk_faults,
        tx,
        stats,
        hub,
        driver: task.abort_handle(),
    })
}

/// Opens (or creates) the replica of `partition` on this node. `bootstrap`: the voters a group
/// with empty storage starts with (static bootstrap); `None` for a replica added by a
/// membership change, which starts empty and learns everything (configuration included) from
/// the leader's snapshot.
fn open_group(
    config: &RaftConfig,
    db: &sled::Db,
    logger: &slog::Logger,
    partition: u32,
    bootstrap: Option<&[NodeId]>,
) -> Result<Group, raft::Error> {
    let storage = SledRaftStorage::open_with_faults(db, partition, config.disk_faults.clone())?;
    if storage.is_empty() {
        if let Some(voters) = bootstrap {
            storage.initialize(voters)?;
        }
    }
    let checkpoints = PartitionStore::open(db, partition)
        .map_err(|e| raft::Error::ConfChangeError(e.to_string()))?;
    let recovered = checkpoints
        .recover(config.limits)
        .map_err(|e| raft::Error::ConfChangeError(e.to_string()))?;
    let sm = catch_up_with_snapshot(&storage, &checkpoints, recovered.partition, config.limits)?;
    let applied = (sm.applied_index() >> BATCH_BITS).max(storage.snapshot_metadata().index);
    let raft_config = raft::Config {
        id: config.node_id,
        election_tick: config.election_tick,
        max_election_tick: config.max_election_tick,
        heartbeat_tick: config.heartbeat_tick,
        applied,
        max_size_per_msg: 1024 * 1024,
        max_inflight_msgs: 256,
        check_quorum: true,
        pre_vote: true,
        ..Default::default()
    };
    let log = logger.new(slog::o!("partition" => partition));
    let raw = RawNode::new(&raft_config, storage.clone(), &log)?;
    debug!(partition, applied, "group started");
    Ok(Group {
        partition,
        raw,
        storage,
        checkpoints,
        sm,
        pending: VecDeque::new(),
        proposals: Vec::new(),
        connections: HashMap::new(),
        applied_since_checkpoint: 0,
        was_leader: false,
        taken_over: 0,
        removed: false,
        heard_leader: false,
        snapshot_ticks: HashMap::new(),
        fences: HashMap::new(),
        reads: reads::Reads::default(),
    })
}

/// The state machine a replica restarts with: its checkpoint, or the stored Raft snapshot
/// when that is newer.
///
/// Raft restarts at `applied = max(checkpoint, snapshot index)` and never replays what lies
/// below, so the state machine must hold everything up to the snapshot. A checkpoint can lag
/// the snapshot: one built on demand for a new replica (`Driver::run`), or an install that
/// stored the leader's snapshot and crashed before checkpointing its image. The snapshot's
/// image is the state at its index, so it replaces such a checkpoint (and becomes the
/// checkpoint). An image that cannot be decoded stops the replica from opening: running on
/// would apply later entries to a state that lacks earlier ones.
fn catch_up_with_snapshot(
    storage: &SledRaftStorage,
    checkpoints: &PartitionStore,
    sm: Partition,
    limits: SessionLimits,
) -> Result<Partition, raft::Error> {
    let snapshot_index = storage.snapshot_metadata().index;
    if snapshot_index <= sm.applied_index() >> BATCH_BITS {
        return Ok(sm);
    }
    let partition = storage.partition();
    let fail = |what: String| {
        raft::Error::ConfChangeError(format!(
            "partition {partition}: snapshot at {snapshot_index} is newer than the checkpoint \
             and {what}"
        ))
    };
    let data = storage
        .snapshot_data()?
        .ok_or_else(|| fail("has no data".into()))?;
    let image: PartitionImage =
        postcard::from_bytes(&data).map_err(|e| fail(format!("cannot be decoded: {e}")))?;
    if image.applied_index <= sm.applied_index() {
        // Only entries without commands (conf changes, a new leader's empty entry) lie between.
        return Ok(sm);
    }
    let mut restored = Partition::restore(limits, image);
    checkpoints
        .replace_all(&mut restored)
        .map_err(|e| fail(format!("cannot be checkpointed: {e}")))?;
    info!(
        partition,
        snapshot_index, "state restored from the snapshot (newer than the checkpoint)"
    );
    Ok(restored)
}

struct Driver {
    stats: Arc<RaftStats>,
    config: RaftConfig,
    db: sled::Db,
    groups: BTreeMap<u32, Group>,
    rx: mpsc::UnboundedReceiver<NodeMsg>,
    transport: Arc<dyn Transport>,
    hub: Arc<ClusterHub>,
    last_now: u64,
    /// Frontends holding sessions of a led partition but with no event stream here, since when.
    missing_frontends: HashMap<u64, Instant>,
    /// Target replica sets and moves in progress (`membership.rs`).
    membership: membership::Membership,
}

/// Messages gathered during one round, per destination node.
#[derive(Default)]
struct Outbox(BTreeMap<NodeId, Vec<(u32, PeerMessage)>>);

impl Outbox {
    fn add(&mut self, partition: u32, messages: Vec<RaftMessage>) {
        for m in messages {
            self.0
                .entry(m.to)
                .or_default()
                .push((partition, PeerMessage::Raft(m)));
        }
    }

    fn push(&mut self, to: NodeId, partition: u32, message: PeerMessage) {
        self.0.entry(to).or_default().push((partition, message));
    }

    fn send(&mut self, transport: &dyn Transport) {
        for (to, batch) in std::mem::take(&mut self.0) {
            transport.send(to, batch);
        }
    }
}

impl Driver {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(self.config.tick_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_sm_tick = Instant::now();
        loop {
            // 1. collect
            let mut stop = None;
            let mut ticked = false;
            tokio::select! {
                // Biased: the same inputs give the same rounds (the simulation's seeds replay).
                biased;
                msg = self.rx.recv() => match msg {
                    Some(m) => stop = self.handle(m),
                    None => break,
                },
                _ = tick.tick() => ticked = true,
            }
            while stop.is_none() {
                match self.rx.try_recv() {
                    Ok(m) => stop = self.handle(m),
                    Err(_) => break,
                }
            }
            if let Some((done, checkpoint)) = stop {
                for g in self.groups.values_mut() {
                    if checkpoint {
                        g.maybe_checkpoint(&self.config, true);
                    }
                    g.fail_pending(ProposeError::Stopped);
                }
                if checkpoint {
                    let _ = self.db.flush();
                }
                drop(self);
                let _ = done.send(());
                return;
            }
            if ticked {
                for g in self.groups.values_mut() {
                    g.raw.tick();
                }
                self.unstall_snapshots();
                if last_sm_tick.elapsed() >= self.config.sm_tick_interval {
                    last_sm_tick = Instant::now();
                    self.check_frontend_leases();
                    for g in self.groups.values_mut() {
                        if g.is_leader() {
                            let (reply, _) = oneshot::channel();
                            g.proposals.push((Command::Tick, reply, None, None));
                        }
                    }
                }
            }
            // 2. propose, and ask for one read index per group
            self.propose_batches();
            for g in self.groups.values_mut() {
                g.reads.ask(&mut g.raw);
            }
            // 3-5. ready, persist, send, advance
            if let Err(reason) = self.process_ready().await {
                self.fail_stop(&reason);
                return;
            }
            self.reconcile_membership(ticked);
            for g in self.groups.values_mut() {
                g.maybe_checkpoint(&self.config, false);
                if let Some(index) = g.storage.snapshot_wanted() {
                    if g.applied().max(g.raw.raft.raft_log.applied) >= index {
                        if let Err(e) = g.build_snapshot() {
                            tiermq_common::warn_limited!(STORAGE_WARNINGS, "snapshot", partition = g.partition, error = %e, "snapshot failed");
                        }
                    }
                }
            }
        }
    }

    /// Handles one mailbox message; returns the stop waiter (and whether to checkpoint) when
    /// asked to stop.
    fn handle(&mut self, msg: NodeMsg) -> Option<(oneshot::Sender<()>, bool)> {
        match msg {
            NodeMsg::Propose {
                partition,
                command,
                reply,
                events,
                origin,
            } => match self.groups.get_mut(&partition) {
                None => {
                    let _ = reply.send(Err(ProposeError::UnknownPartition(partition)));
                }
                Some(g) if !g.is_leader() || g.fenced(origin) => {
                    let leader = g.leader();
                    g.refuse(origin, reply, ProposeError::NotLeader { leader });
                }
                Some(g) => g.proposals.push((command, reply, events, origin)),
            },
            NodeMsg::StreamClosed { stream } => {
                for g in self.groups.values_mut() {
                    g.fences.remove(&stream);
                }
            }
            NodeMsg::Peer {
                partition,
                message: PeerMessage::Raft(message),
            } => {
                if let Some(g) = self
                    .groups
                    .get_mut(&partition)
                    .filter(|g| g.accepts(&message))
                {
                    if matches!(
                        message.get_msg_type(),
                        MessageType::MsgAppend
                            | MessageType::MsgHeartbeat
                            | MessageType::MsgSnapshot
                    ) && message.term >= g.raw.raft.term
                    {
                        g.heard_leader = true;
                    }
                    if let Err(e) = g.raw.step(message) {
                        debug!(partition, error = %e, "raft message refused");
                    }
                }
            }
            NodeMsg::Peer {
                partition,
                message: PeerMessage::RemovalQuery { from },
            } => self.answer_removal_query(partition, from),
            NodeMsg::Peer {
                partition,
                message: PeerMessage::Removed { from, applied },
            } => self.removal_confirmed(partition, from, applied),
            NodeMsg::Status { partition, reply } => {
                let _ = reply.send(self.groups.get(&partition).map(Group::status));
            }
            NodeMsg::Image { partition, reply } => {
                let image = self.groups.get(&partition).map(|g| {
                    let mut image = g.sm.image();
                    image.applied_index = 0; // replicas may have applied different tails
                    let applied = g.raw.raft.raft_log.applied;
                    (applied, postcard::to_stdvec(&image).unwrap_or_default())
                });
                let _ = reply.send(image);
            }
            NodeMsg::Stop { done, checkpoint } => return Some((done, checkpoint)),
            NodeMsg::TransferLeadership { reply } => {
                let mut led = Vec::new();
                for g in self.groups.values_mut() {
                    if !g.is_leader() {
                        continue;
                    }
                    led.push(g.partition);
                    if let Some(to) = g.transfer_target() {
                        debug!(partition = g.partition, to, "transferring leadership");
                        g.raw.transfer_leader(to);
                    }
                }
                let _ = reply.send(led);
            }
            NodeMsg::Qos0 {
                partition,
                message,
                publisher,
            } => {
                let now = self.now();
                if let Some(g) = self.groups.get_mut(&partition) {
                    if g.is_leader() {
                        let (_, fx) = g.sm.deliver_qos0(&message, publisher.as_deref(), now);
                        g.dispatch(fx, None, None, &self.hub);
                    }
                }
            }
            NodeMsg::Query {
                partition,
                query,
                reply,
            } => match self.groups.get_mut(&partition) {
                None => {
                    let _ = reply.send(Err(ProposeError::UnknownPartition(partition)));
                }
                Some(g) if !g.is_leader() => {
                    let _ = reply.send(Err(ProposeError::NotLeader { leader: g.leader() }));
                }
                Some(g) => g.reads.push(query, reply),
            },
            NodeMsg::FrontendAttached { frontend_id } => {
                let now = self.now();
                self.missing_frontends.remove(&frontend_id);
                for g in self.groups.values_mut() {
                    // Only a leader that has taken over (applied every entry of earlier
                    // terms): one that has not would replay from a state that lacks acks the
                    // old leader committed — a PUBLISH re-sent after its PUBREL (found by the
                    // simulation, seed 34). Its take-over replays to this frontend anyway.
                    if g.is_leader() && g.taken_over == g.raw.raft.term {
                        let fx = g.sm.replay_for_frontend(frontend_id, now);
                        g.dispatch(fx, None, None, &self.hub);
                    }
                }
            }
            NodeMsg::Membership(request) => self.handle_membership(request),
            NodeMsg::WatchRoutes { watcher_id, tx } => {
                let snapshot = self
                    .groups
                    .values()
                    .filter(|g| g.is_leader())
                    .map(Group::route_snapshot)
                    .collect();
                self.hub.add_watcher(watcher_id, tx, snapshot);
            }
        }
        None
    }

    /// Frontends that hold sessions in partitions this node leads but have had no event
    /// stream here for longer than the lease are declared lost: their sessions are
    /// disconnected (wills fire) through the log.
    fn check_frontend_leases(&mut self) {
        let now = Instant::now();
        let mut attached = std::collections::BTreeSet::new();
        for g in self.groups.values() {
            if g.is_leader() {
                attached.extend(g.sm.attached_frontends());
            }
        }
        attached.remove(&0); // in-process connections have no stream
        self.missing_frontends.retain(|f, _| attached.contains(f));
        for f in attached {
            if self.hub.has_frontend(f) {
                self.missing_frontends.remove(&f);
                continue;
            }
            let since = *self.missing_frontends.entry(f).or_insert(now);
            if now.duration_since(since) < self.config.frontend_lease {
                continue;
            }
            info!(frontend = f, "frontend lost: disconnecting its sessions");
            self.missing_frontends.remove(&f);
            for g in self.groups.values_mut() {
                if g.is_leader() && g.sm.attached_frontends().contains(&f) {
                    let (reply, _) = oneshot::channel();
                    g.proposals
                        .push((Command::FrontendLost { frontend_id: f }, reply, None, None));
                }
            }
        }
    }

    fn now(&mut self) -> u64 {
        self.last_now = self.last_now.max(self.config.clock.now_ms());
        self.last_now
    }

    fn propose_batches(&mut self) {
        let now = self.now();
        let stats = self.stats.clone();
        for g in self.groups.values_mut() {
            if g.proposals.is_empty() {
                continue;
            }
            if !g.is_leader() {
                let leader = g.leader();
                for (_, reply, _, origin) in std::mem::take(&mut g.proposals) {
                    g.refuse(origin, reply, ProposeError::NotLeader { leader });
                }
                continue;
            }
            while !g.proposals.is_empty() {
                let n = g.proposals.len().min(MAX_BATCH);
                let batch: Vec<_> = g.proposals.drain(..n).collect();
                let mut entries = Vec::with_capacity(batch.len());
                let mut replies = Vec::with_capacity(batch.len());
                let mut events = Vec::with_capacity(batch.len());
                let mut origins = Vec::with_capacity(batch.len());
                for (command, reply, ev, origin) in batch {
                    entries.push(Entry {
                        now_ms: now,
                        command,
                    });
                    replies.push(Some(reply));
                    events.push(ev);
                    origins.push(origin);
                }
                let data = match postcard::to_stdvec(&entries) {
                    Ok(d) => d,
                    Err(e) => {
                        warn!(error = %e, "cannot encode proposal");
                        continue;
                    }
                };
                if let Err(e) = g.raw.propose(vec![], data) {
                    let leader = g.leader();
                    debug!(partition = g.partition, error = %e, "proposal refused");
                    for (r, origin) in replies.into_iter().zip(origins) {
                        if let Some(r) = r {
                            g.refuse(origin, r, ProposeError::NotLeader { leader });
                        }
                    }
                    continue;
                }
                stats.entries.fetch_add(1, Ordering::Relaxed);
                stats
                    .commands
                    .fetch_add(replies.len() as u64, Ordering::Relaxed);
                g.pending.push_back(Pending {
                    index: g.raw.raft.raft_log.last_index(),
                    term: g.raw.raft.term,
                    replies,
                    events,
                    origins,
                    timer: stats.timings.proposed(g.partition),
                });
            }
        }
    }

    /// A node that cannot keep its state consistent must stop acknowledging: it stops, as a
    /// crash would, and its proposers are told `Stopped`. A restart recovers from what is
    /// durable; the other replicas carry on meanwhile.
    fn fail_stop(mut self, reason: &str) {
        tracing::error!(node = self.config.node_id, reason, "raft node stopped");
        for g in self.groups.values_mut() {
            g.fail_pending(ProposeError::Stopped);
            g.reads.fail(ProposeError::Stopped);
            for (_, reply, _, _) in g.proposals.drain(..) {
                let _ = reply.send(Err(ProposeError::Stopped));
            }
            if g.was_leader {
                self.hub
                    .broadcast_route(RouteChange::not_leader(g.partition));
            }
        }
    }

    /// One round of steps 3-5 of the loop. An error is fatal (see [`Driver::fail_stop`]):
    /// nothing that waits for persistence has been sent.
    async fn process_ready(&mut self) -> Result<(), String> {
        let mut outbox = Outbox::default();
        let mut readies = Vec::new();
        let mut wrote = false;
        let now = self.now();
        for (&p, g) in self.groups.iter_mut() {
            if !g.raw.has_ready() {
                continue;
            }
            let mut rd = g.raw.ready();
            outbox.add(p, rd.take_messages());
            g.reads.confirm(rd.take_read_states());
            if !rd.snapshot().is_empty() {
                g.install_snapshot(rd.snapshot().clone(), self.config.limits)?;
                wrote = true;
            }
            g.apply_committed(rd.take_committed_entries(), &self.hub, now);
            // Entries and hard state not stored must not be acknowledged (an append ack for
            // entries a follower lacks, a vote forgotten by a restart): stop instead.
            if !rd.entries().is_empty() {
                g.storage
                    .append(rd.entries())
                    .map_err(|e| format!("partition {p}: cannot append entries: {e}"))?;
                wrote = true;
            }
            if let Some(hs) = rd.hs() {
                g.storage
                    .set_hard_state(hs.clone())
                    .map_err(|e| format!("partition {p}: cannot store the hard state: {e}"))?;
                wrote = true;
            }
            readies.push((p, rd));
        }
        outbox.send(&*self.transport);
        if wrote {
            // One fsync for every group's entries: the group commit that makes QoS1 fast.
            let flushing = Instant::now();
            // Not `flush_async`: see `flush_db` (a process-wide deadlock in sled).
            self.config
                .disk_faults
                .check()
                .map_err(|e| format!("flush failed: {e}"))?;
            let flushed = if self.config.sync_flush {
                self.db.flush()
            } else {
                crate::storage::flush_db(&self.db).await
            };
            flushed.map_err(|e| format!("flush failed: {e}"))?;
            self.stats
                .timings
                .flush
                .observe_duration(flushing.elapsed());
            self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        }
        for (p, mut rd) in readies {
            let g = self.groups.get_mut(&p).expect("group exists");
            outbox.add(p, rd.take_persisted_messages());
            let mut light = g.raw.advance(rd);
            if let Some(commit) = light.commit_index() {
                g.storage
                    .set_commit(commit)
                    .map_err(|e| format!("partition {p}: cannot store the commit index: {e}"))?;
            }
            outbox.add(p, light.take_messages());
            g.apply_committed(light.take_committed_entries(), &self.hub, now);
            g.raw.advance_apply();
        }
        outbox.send(&*self.transport);
        for g in self.groups.values_mut() {
            let leading = g.is_leader();
            if leading {
                let (applied, term) = (g.raw.raft.raft_log.applied, g.raw.raft.term);
                g.reads.settle(&g.sm, applied, term, now);
            } else {
                g.reads.fail(ProposeError::NotLeader { leader: g.leader() });
            }
            if g.was_leader && !leading {
                // Entries of ours may still commit under the new leader, but we cannot tell
                // our proposers; they retry (a duplicate at worst, never a false ack).
                g.fail_pending(ProposeError::NotLeader { leader: g.leader() });
                g.connections.clear();
                self.hub
                    .broadcast_route(RouteChange::not_leader(g.partition));
            }
            if !g.was_leader && leading {
                info!(
                    partition = g.partition,
                    term = g.raw.raft.term,
                    "became leader"
                );
                // Routes, replays and shared steps follow once the entries of earlier terms
                // are applied (`Group::take_over`).
            }
            g.was_leader = leading;
        }
        Ok(())
    }
}

/// Encodes a Raft message with the raft crate's own protobuf codec.
pub fn encode_message(m: &RaftMessage) -> Vec<u8> {
    m.write_to_bytes().unwrap_or_default()
}

/// Decodes a Raft message; `None` for bytes that are not one.
pub fn decode_message(bytes: &[u8]) -> Option<RaftMessage> {
    RaftMessage::parse_from_bytes(bytes).ok()
}

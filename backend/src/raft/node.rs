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
use crate::effects::{Connections, EffectHost, Tracked};
use crate::partition::command::{Command, Entry, Query, Reply, SharedWork};
use crate::partition::session::Attachment;
use crate::partition::session::SessionLimits;
use crate::partition::{Partition, PartitionImage, PartitionLoad};
use crate::placement::{NodeId, PartitionMap};
use crate::storage::PartitionStore;

mod group;
mod handle;
mod hub;
mod membership;
mod reads;

pub use group::Origin;
use group::{open_group, Group, Pending};
use handle::{EventSender, NodeMsg};
pub use handle::{RaftHandle, RaftStats};
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
                        g.dispatch(fx, &self.hub);
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
                        g.dispatch(fx, &self.hub);
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

//! Membership changes of the partition groups: moving replicas from node to node.
//!
//! The node's owner hands the driver a **target map** ([`RaftHandle::set_map`]; maps are
//! epoch-numbered and an older one is ignored). On every tick the driver reconciles its groups
//! with it:
//!
//! - **New replicas.** For each partition the target places here and this node does not hold,
//!   it opens an *empty* replica: no configuration, no log. It cannot campaign (it is nobody's
//!   voter) and it refuses appends from the log's beginning, so the only way in is the leader's
//!   snapshot, which carries the partition image *and* the configuration (a replay from index 1
//!   would rebuild the configuration on top of nothing, since the bootstrap voters of a static
//!   group are not in the log).
//! - **Steps on a led group** whose configuration differs from the target, one per tick, each
//!   derived from (configuration, target) alone, so a new leader carries on where the old one
//!   stopped:
//!   1. a learner the target does not want is removed;
//!   2. a missing replica is added as a **learner** (the leader first makes sure its own log no
//!      longer starts at index 1, so the learner gets a snapshot);
//!   3. once every learner is within `catch_up_lag` entries of the commit index, one conf change
//!      promotes the learners and removes the voters the target drops — **joint consensus**
//!      whenever it changes more than one voter (raft-rs leaves the joint configuration by
//!      itself once it is committed);
//!   4. a leader the target drops first hands leadership to a voter that stays.
//!
//!   Movement is paced: a node starts a new move only while fewer than `max_moves` of the
//!   groups it leads are moving.
//! - **Leaders are rebalanced** once a group has settled under a map received at run time (never
//!   for the start-up map, so a static cluster keeps Raft's choice): its leader hands over to
//!   the partition's entry of [`PartitionMap::balanced_leaders`], for at most
//!   `rebalance_window` after the group settled (a later drain is not undone).
//! - **Removed replicas** are deleted only when a *committed* configuration excludes them:
//!   1. a replica that applies a configuration without itself stops and deletes its data;
//!   2. a replica opened empty that never got its snapshot (no configuration, no data) is
//!      deleted as soon as the target no longer places it here;
//!   3. a removal can commit without the removed node seeing the commit (the leader stops
//!      replicating to it at once). A replica that the target does not place here and that
//!      has heard from no leader for `orphan_ticks` ticks (no append, heartbeat or snapshot;
//!      not raft's leader id, which a removed *learner* keeps forever: learners never
//!      campaign) therefore *asks*, every tenth of that, the nodes its configuration names
//!      and those the target places the partition on ([`PeerMessage::RemovalQuery`], over
//!      the Raft transport, so the network's faults and the simulation's hit it like any
//!      Raft message). Only a **leader** whose configuration names the asker in no role
//!      answers ([`PeerMessage::Removed`]): a leader's configuration is the one it applied,
//!      hence committed. Everyone else stays silent, and silence deletes nothing — a cut, a
//!      group without quorum or a removal not yet committed look alike from the replica, and
//!      in the last two it is still counted.
//!
//!   The answer carries the leader's applied index, and the asker deletes only if it is still
//!   an orphan (silent, not placed here) and has applied nothing past that index. This makes
//!   a stale answer harmless: a leader deposed without knowing it (for at most an election
//!   timeout: check quorum) still holds a configuration that was committed, but a later one
//!   may have added this node back — and a replica added back entered by the leader's
//!   snapshot (the leader compacts its log before adding a learner), past the configuration
//!   that had removed it, so its position is past the answer's. Its own configuration may be
//!   stale in either direction; it only chooses whom to ask, never decides.

use std::collections::BTreeSet;

use raft::prelude::{
    ConfChange, ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, MessageType,
};

use super::*;

/// Pacing and thresholds of replica moves.
#[derive(Debug, Clone)]
pub struct MembershipConfig {
    /// Moves (learner → catch-up → promotion) a node runs at once among the groups it leads.
    pub max_moves: usize,
    /// A learner is promoted once its log is within this many entries of the commit index.
    pub catch_up_lag: u64,
    /// Ticks without a message from a leader after which a replica the target does not place
    /// here asks whether it was removed (again every tenth of this).
    pub orphan_ticks: usize,
    /// The rule the removal query replaced, for the simulation's `--plant orphan-by-silence`
    /// only: such a replica is deleted after `orphan_ticks` ticks of silence, unasked (the
    /// silence counted as now, from leader messages).
    pub delete_on_silence: bool,
    /// Ticks a peer may stay in raft's snapshot state (a snapshot sent, no answer yet) before
    /// the snapshot is reported failed and sent again.
    pub snapshot_stall_ticks: usize,
    /// How long after a group settled under a new map its leader may still be moved to the
    /// balanced leader.
    pub rebalance_window: Duration,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        MembershipConfig {
            max_moves: 2,
            catch_up_lag: 64,
            orphan_ticks: 300,
            delete_on_silence: false,
            snapshot_stall_ticks: 300,
            rebalance_window: Duration::from_secs(10),
        }
    }
}

/// Requests to the driver about membership.
pub(super) enum Request {
    SetMap(PartitionMap),
    Progress(oneshot::Sender<MoveProgress>),
}

/// What a node reports about replica moves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MoveProgress {
    /// Epoch of the target map the node works towards.
    pub epoch: u64,
    /// Partitions with a replica on this node.
    pub held: Vec<u32>,
    /// Partitions led here whose configuration is not the target's yet.
    pub moving: Vec<u32>,
}

/// The driver's membership state.
pub(super) struct Membership {
    target: PartitionMap,
    logger: slog::Logger,
    /// Ticks without a message from a leader, per held partition the target does not place
    /// here.
    leaderless: HashMap<u32, usize>,
    /// The target's balanced leaders; empty until a map arrives at run time.
    leaders: Vec<Option<NodeId>>,
    /// Per led partition settled under the current target: since when, transfers asked.
    rebalance: HashMap<u32, (Instant, u32)>,
}

impl Membership {
    pub(super) fn new(map: &PartitionMap, logger: slog::Logger) -> Membership {
        Membership {
            target: map.clone(),
            logger,
            leaderless: HashMap::new(),
            leaders: Vec::new(),
            rebalance: HashMap::new(),
        }
    }
}

/// The outcome of one reconciliation step on a led group.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Configuration = target.
    Settled,
    /// A move is under way.
    Moving,
    /// A move should start, but the pace does not allow it now.
    Held,
}

impl RaftHandle {
    /// Sets the map this node's groups move towards (ignored unless its epoch is newer than
    /// the current one).
    pub fn set_map(&self, map: PartitionMap) {
        let _ = self.tx.send(NodeMsg::Membership(Request::SetMap(map)));
    }

    /// Where this node stands in moving replicas towards the target map.
    pub async fn move_progress(&self) -> Option<MoveProgress> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(NodeMsg::Membership(Request::Progress(reply)))
            .ok()?;
        rx.await.ok()
    }
}

impl Driver {
    pub(super) fn handle_membership(&mut self, request: Request) {
        match request {
            Request::SetMap(map) => {
                if map.epoch <= self.membership.target.epoch {
                    debug!(epoch = map.epoch, "older target map ignored");
                    return;
                }
                info!(epoch = map.epoch, "new target map");
                self.membership.leaders = map.balanced_leaders();
                self.membership.rebalance.clear();
                self.membership.target = map;
                self.open_target_replicas();
            }
            Request::Progress(reply) => {
                let target = &self.membership.target;
                let moving = self
                    .groups
                    .values()
                    .filter(|g| g.is_leader() && !g.settled(target.replicas_of(g.partition)))
                    .map(|g| g.partition)
                    .collect();
                let _ = reply.send(MoveProgress {
                    epoch: target.epoch,
                    held: self.groups.keys().copied().collect(),
                    moving,
                });
            }
        }
    }

    /// Called after every round: deletes removed replicas; on ticks also opens new ones and
    /// takes one step on each led group that is not where the target wants it.
    pub(super) fn reconcile_membership(&mut self, ticked: bool) {
        let removed: Vec<u32> = self
            .groups
            .values()
            .filter(|g| g.removed)
            .map(|g| g.partition)
            .collect();
        for p in removed {
            self.destroy_group(p);
        }
        if !ticked {
            return;
        }
        self.open_target_replicas();
        self.handle_orphans();
        let cfg = self.config.membership.clone();
        let target = &self.membership.target;
        let mut moving = self
            .groups
            .values()
            .filter(|g| g.is_leader() && g.move_started())
            .count();
        for g in self.groups.values_mut() {
            if !g.is_leader() {
                continue;
            }
            let replicas = target.replicas_of(g.partition);
            let started = g.move_started();
            match g.membership_step(replicas, &cfg, moving < cfg.max_moves) {
                Step::Moving if !started => moving += 1,
                Step::Settled => {
                    let want = self.membership.leaders.get(g.partition as usize).copied();
                    let since = self
                        .membership
                        .rebalance
                        .entry(g.partition)
                        .or_insert((Instant::now(), 0));
                    if let Some(Some(to)) = want {
                        // A transfer in progress is not asked again (raft ends a failed one
                        // after an election timeout); at most 5 tries within the window.
                        if to != g.raw.raft.id
                            && g.raw.raft.lead_transferee.is_none()
                            && since.0.elapsed() < cfg.rebalance_window
                            && since.1 < 5
                        {
                            since.1 += 1;
                            debug!(partition = g.partition, to, "rebalancing the leader");
                            g.raw.transfer_leader(to);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Opens an empty replica of every partition the target places here and this node lacks.
    fn open_target_replicas(&mut self) {
        let me = self.config.node_id;
        for p in self.membership.target.partitions_of(me) {
            if self.groups.contains_key(&p) {
                continue;
            }
            match open_group(&self.config, &self.db, &self.membership.logger, p, None) {
                Ok(g) => {
                    info!(
                        partition = p,
                        "new replica, waiting for the leader's snapshot"
                    );
                    self.groups.insert(p, g);
                }
                Err(e) => warn!(partition = p, error = %e, "cannot open a new replica"),
            }
        }
    }

    /// Replicas the target does not place here. One opened empty and never filled is deleted
    /// at once; one that has heard from no leader for `orphan_ticks` ticks asks, every
    /// `orphan_ticks / 10` ticks, whether it is still in the partition's configuration (see
    /// the module docs): only a leader's "removed" deletes it ([`Driver::removal_confirmed`]).
    fn handle_orphans(&mut self) {
        let me = self.config.node_id;
        let limit = self.config.membership.orphan_ticks;
        let every = (limit / 10).max(1);
        let target = &self.membership.target;
        let mut asking = Vec::new();
        let mut unfilled = Vec::new();
        for (&p, g) in self.groups.iter_mut() {
            let heard = std::mem::take(&mut g.heard_leader) || g.is_leader();
            let placed = target.replicas_of(p);
            let conf = g.raw.raft.prs().conf();
            if !placed.is_empty()
                && !placed.contains(&me)
                && conf.voters().ids().is_empty()
                && conf.learners().is_empty()
            {
                // Opened empty for an earlier target and never given a snapshot: it holds
                // nothing and is in no configuration, so nothing can depend on it (a leader
                // still adding it as a learner drops it once it has the newer map too).
                unfilled.push(p);
                continue;
            }
            if placed.is_empty() || placed.contains(&me) || heard {
                self.membership.leaderless.remove(&p);
                continue;
            }
            let ticks = self.membership.leaderless.entry(p).or_insert(0);
            *ticks += 1;
            if *ticks > limit && (*ticks - limit - 1).is_multiple_of(every) {
                asking.push(p);
            }
        }
        for p in unfilled {
            self.membership.leaderless.remove(&p);
            info!(
                partition = p,
                "empty replica no longer in the map: deleting"
            );
            self.destroy_group(p);
        }
        let mut outbox = Outbox::default();
        for p in asking {
            if self.config.membership.delete_on_silence {
                warn!(partition = p, "planted bug: deleting a replica on silence");
                self.destroy_group(p);
                continue;
            }
            let g = &self.groups[&p];
            let asked = g.removal_witnesses(self.membership.target.replicas_of(p));
            debug!(
                partition = p,
                ?asked,
                "no leader and not in the map: asking whether a committed configuration excludes this replica"
            );
            for to in asked {
                outbox.push(to, p, PeerMessage::RemovalQuery { from: me });
            }
        }
        outbox.send(&*self.transport);
    }

    /// raft-rs keeps a peer that was sent a snapshot paused until it answers or the driver
    /// reports the snapshot's fate; a snapshot (or its answer) lost on the way would leave that
    /// peer paused — a learner never promoted, a move that never ends — until the leader
    /// changes. So a peer in snapshot state for `snapshot_stall_ticks` ticks is reported
    /// failed: raft probes it again and sends a fresh snapshot. (Generous: a large snapshot
    /// still in transfer is sent again at worst, never lost.)
    pub(super) fn unstall_snapshots(&mut self) {
        let limit = self.config.membership.snapshot_stall_ticks;
        for g in self.groups.values_mut() {
            if !g.is_leader() {
                g.snapshot_ticks.clear();
                continue;
            }
            let mut stalled = Vec::new();
            let ticks = &mut g.snapshot_ticks;
            for (&id, pr) in g.raw.raft.prs().iter() {
                if pr.state == raft::ProgressState::Snapshot {
                    let t = ticks.entry(id).or_insert(0);
                    *t += 1;
                    if *t > limit {
                        stalled.push(id);
                    }
                } else {
                    ticks.remove(&id);
                }
            }
            for id in stalled {
                warn!(
                    partition = g.partition,
                    peer = id,
                    "no answer to a snapshot: sending it again"
                );
                g.snapshot_ticks.remove(&id);
                g.raw.report_snapshot(id, raft::SnapshotStatus::Failure);
            }
        }
    }

    /// A removal query from node `from` about partition `p`: answered "removed" only by a
    /// leader whose configuration — the one it applied, hence committed — names `from` in no
    /// role. Everyone else stays silent: a silence is no evidence either way.
    pub(super) fn answer_removal_query(&mut self, p: u32, from: NodeId) {
        let Some(g) = self.groups.get(&p) else {
            return;
        };
        if !g.is_leader() || names(&g.raw.raft.prs().conf().to_conf_state(), from) {
            return;
        }
        let applied = g.raw.raft.raft_log.applied;
        debug!(
            partition = p,
            to = from,
            applied,
            "removal query: the asker is in no role of this configuration"
        );
        let me = self.config.node_id;
        self.transport
            .send(from, vec![(p, PeerMessage::Removed { from: me, applied })]);
    }

    /// Leader `from` answered this node's removal query about `p`: its configuration,
    /// committed as of its applied index `applied`, excludes this replica. Deleted if it is
    /// still an orphan that asked (no leader, not placed here) and has applied nothing past
    /// `applied`: a replica added back after that configuration got a snapshot beyond it, and
    /// the answer is not about it (an old leader, deposed without knowing, can answer late).
    pub(super) fn removal_confirmed(&mut self, p: u32, from: NodeId, applied: u64) {
        let me = self.config.node_id;
        let Some(g) = self.groups.get(&p) else {
            return;
        };
        let placed = self.membership.target.replicas_of(p);
        let asked = self
            .membership
            .leaderless
            .get(&p)
            .is_some_and(|t| *t > self.config.membership.orphan_ticks);
        let position = g.raw.raft.raft_log.applied.max(g.storage.conf_index());
        if !asked || placed.is_empty() || placed.contains(&me) {
            debug!(
                partition = p,
                leader = from,
                "removal answer for a replica no longer orphaned"
            );
            return;
        }
        if applied < position {
            debug!(
                partition = p,
                leader = from,
                applied,
                position,
                "removal answer older than this replica's configuration: ignored"
            );
            return;
        }
        info!(
            partition = p,
            leader = from,
            applied,
            "a leader's committed configuration excludes this replica: deleting"
        );
        self.destroy_group(p);
    }

    /// Stops the replica of `p` on this node and deletes its data.
    fn destroy_group(&mut self, p: u32) {
        let Some(mut g) = self.groups.remove(&p) else {
            return;
        };
        self.membership.leaderless.remove(&p);
        g.fail_pending(ProposeError::NotLeader { leader: None });
        for (_, reply, _, _) in g.proposals.drain(..) {
            let _ = reply.send(Err(ProposeError::NotLeader { leader: None }));
        }
        if g.was_leader {
            self.hub.broadcast_route(RouteChange::not_leader(p));
        }
        drop(g);
        if let Err(e) = SledRaftStorage::destroy(&self.db, p) {
            warn!(partition = p, error = %e, "cannot delete the raft log of a removed replica");
        }
        if let Err(e) = PartitionStore::destroy(&self.db, p) {
            warn!(partition = p, error = %e, "cannot delete the state of a removed replica");
        }
        info!(partition = p, "replica removed from this node");
    }
}

/// Whether `cs` names `id` in any role.
fn names(cs: &ConfState, id: NodeId) -> bool {
    cs.voters.contains(&id)
        || cs.learners.contains(&id)
        || cs.voters_outgoing.contains(&id)
        || cs.learners_next.contains(&id)
}

impl Group {
    /// The nodes an orphaned replica asks whether it was removed: every node its own
    /// configuration names (it may be stale) and every node the target places the partition
    /// on (where a later leader likely is), not this one. Asking more nodes than needed costs
    /// nothing: only a leader whose configuration excludes the asker answers.
    fn removal_witnesses(&self, placed: &[NodeId]) -> BTreeSet<NodeId> {
        let me = self.raw.raft.id;
        let cs = self.raw.raft.prs().conf().to_conf_state();
        cs.voters
            .iter()
            .chain(&cs.voters_outgoing)
            .chain(&cs.learners)
            .chain(&cs.learners_next)
            .chain(placed)
            .copied()
            .filter(|&n| n != me)
            .collect()
    }

    /// Whether a Raft message may be stepped. An empty replica (opened by a move) refuses an
    /// append that starts at the log's beginning: it must start from a snapshot.
    pub(super) fn accepts(&self, m: &RaftMessage) -> bool {
        if m.get_msg_type() != MessageType::MsgAppend || m.index != 0 {
            return true;
        }
        let cs = self.raw.raft.prs().conf().to_conf_state();
        !(cs.voters.is_empty() && cs.learners.is_empty())
    }

    /// Applies a committed conf change entry (once: entries replayed after a restart that the
    /// stored configuration already includes are skipped).
    pub(super) fn apply_conf_entry(&mut self, entry: &RaftEntry) {
        let index = entry.index;
        if index <= self.storage.conf_index() {
            debug!(
                partition = self.partition,
                index, "conf change already in the stored configuration"
            );
            return;
        }
        let cc = match entry.get_entry_type() {
            EntryType::EntryConfChange => match ConfChange::parse_from_bytes(&entry.data) {
                Ok(c) => {
                    let mut single = ConfChangeSingle::default();
                    single.set_change_type(c.get_change_type());
                    single.node_id = c.node_id;
                    let mut v2 = ConfChangeV2::default();
                    v2.set_changes(vec![single].into());
                    v2
                }
                Err(e) => {
                    warn!(partition = self.partition, index, error = %e, "undecodable conf change");
                    return;
                }
            },
            _ => match ConfChangeV2::parse_from_bytes(&entry.data) {
                Ok(c) => c,
                Err(e) => {
                    warn!(partition = self.partition, index, error = %e, "undecodable conf change");
                    return;
                }
            },
        };
        match self.raw.apply_conf_change(&cc) {
            Ok(cs) => {
                info!(
                    partition = self.partition,
                    index,
                    voters = ?cs.voters,
                    outgoing = ?cs.voters_outgoing,
                    learners = ?cs.learners,
                    "configuration changed"
                );
                let me = self.raw.raft.id;
                self.removed = !names(&cs, me);
                if let Err(e) = self.storage.set_conf_state_at(cs, index) {
                    warn!(partition = self.partition, error = %e, "cannot store the configuration");
                }
            }
            Err(e) => warn!(partition = self.partition, index, error = %e, "conf change refused"),
        }
    }

    /// Whether the configuration is exactly the target (or there is no target).
    fn settled(&self, target: &[NodeId]) -> bool {
        if target.is_empty() {
            return true;
        }
        let cs = self.raw.raft.prs().conf().to_conf_state();
        let voters: BTreeSet<NodeId> = cs.voters.iter().copied().collect();
        let want: BTreeSet<NodeId> = target.iter().copied().collect();
        cs.voters_outgoing.is_empty()
            && cs.learners.is_empty()
            && cs.learners_next.is_empty()
            && voters == want
    }

    /// A move is under way: learners, a joint configuration or a conf change in flight.
    fn move_started(&self) -> bool {
        let cs = self.raw.raft.prs().conf().to_conf_state();
        !cs.learners.is_empty()
            || !cs.learners_next.is_empty()
            || !cs.voters_outgoing.is_empty()
            || self.raw.raft.has_pending_conf()
    }

    /// One step towards `target` on a group this node leads (see the module docs).
    fn membership_step(
        &mut self,
        target: &[NodeId],
        cfg: &MembershipConfig,
        may_start: bool,
    ) -> Step {
        if self.settled(target) {
            return Step::Settled;
        }
        let cs = self.raw.raft.prs().conf().to_conf_state();
        if !cs.voters_outgoing.is_empty() || self.raw.raft.has_pending_conf() {
            return Step::Moving; // raft-rs leaves the joint configuration by itself
        }
        let me = self.raw.raft.id;
        let want: BTreeSet<NodeId> = target.iter().copied().collect();
        let voters: BTreeSet<NodeId> = cs.voters.iter().copied().collect();
        let learners: BTreeSet<NodeId> = cs.learners.iter().copied().collect();
        if !voters.contains(&me) {
            // Only possible if a change removed the leader: hand over, do nothing else.
            if let Some(to) = self.best_voter(&voters) {
                self.raw.transfer_leader(to);
            }
            return Step::Moving;
        }
        if let Some(&x) = learners.difference(&want).next() {
            self.propose_changes(&[(ConfChangeType::RemoveNode, x)]);
            return Step::Moving;
        }
        if let Some(&x) = want
            .iter()
            .find(|n| !voters.contains(n) && !learners.contains(n))
        {
            if learners.is_empty() && !may_start {
                return Step::Held;
            }
            if self.log_starts_after_snapshot() {
                self.propose_changes(&[(ConfChangeType::AddLearnerNode, x)]);
            }
            return Step::Moving;
        }
        let committed = self.raw.raft.raft_log.committed;
        let behind = learners.iter().any(|l| {
            self.raw
                .raft
                .prs()
                .get(*l)
                .is_none_or(|pr| pr.matched == 0 || pr.matched + cfg.catch_up_lag < committed)
        });
        if behind {
            // A fresh learner needs a snapshot: a log that starts at index 1 would be replayed.
            self.log_starts_after_snapshot();
            return Step::Moving;
        }
        let mut remove: BTreeSet<NodeId> = voters.difference(&want).copied().collect();
        if remove.contains(&me) {
            let staying: BTreeSet<NodeId> = voters
                .intersection(&want)
                .copied()
                .filter(|n| *n != me)
                .collect();
            if let Some(to) = self.best_voter(&staying) {
                info!(
                    partition = self.partition,
                    to, "leader leaves the group: transferring"
                );
                self.raw.transfer_leader(to);
                return Step::Moving;
            }
            // No voter stays: promote the learners first, leave later.
            remove.remove(&me);
        }
        let changes: Vec<(ConfChangeType, NodeId)> = learners
            .iter()
            .map(|&l| (ConfChangeType::AddNode, l))
            .chain(remove.iter().map(|&r| (ConfChangeType::RemoveNode, r)))
            .collect();
        if !changes.is_empty() {
            self.propose_changes(&changes);
        }
        Step::Moving
    }

    /// The voter among `candidates` (not this node) whose log matches the leader's furthest.
    fn best_voter(&self, candidates: &BTreeSet<NodeId>) -> Option<NodeId> {
        let me = self.raw.raft.id;
        candidates
            .iter()
            .filter(|&&n| n != me)
            .filter_map(|&n| self.raw.raft.prs().get(n).map(|pr| (pr.matched, n)))
            .max()
            .map(|(_, n)| n)
    }

    /// Makes sure this leader's log no longer starts at index 1, so that a new replica is
    /// sent a snapshot (configuration included) instead of a replay. Checkpoints, stores a
    /// snapshot of the applied state and compacts the log up to it. False when it cannot yet.
    fn log_starts_after_snapshot(&mut self) -> bool {
        if raft::Storage::first_index(&self.storage).unwrap_or(1) > 1 {
            return true;
        }
        let applied = self.applied().max(self.raw.raft.raft_log.applied);
        if applied < 2 {
            return false;
        }
        if let Err(e) = self.checkpoints.checkpoint(&mut self.sm) {
            warn!(partition = self.partition, error = %e, "checkpoint failed");
            return false;
        }
        self.applied_since_checkpoint = 0;
        if let Err(e) = self.build_snapshot() {
            warn!(partition = self.partition, error = %e, "snapshot failed");
            return false;
        }
        if let Err(e) = self.storage.compact(applied) {
            warn!(partition = self.partition, error = %e, "log compaction failed");
            return false;
        }
        debug!(
            partition = self.partition,
            applied, "log compacted for a new replica"
        );
        true
    }

    fn propose_changes(&mut self, changes: &[(ConfChangeType, NodeId)]) {
        let mut cc = ConfChangeV2::default();
        cc.set_transition(ConfChangeTransition::Auto);
        cc.set_changes(
            changes
                .iter()
                .map(|&(ty, id)| {
                    let mut s = ConfChangeSingle::default();
                    s.set_change_type(ty);
                    s.node_id = id;
                    s
                })
                .collect::<Vec<_>>()
                .into(),
        );
        match self.raw.propose_conf_change(Vec::new(), cc) {
            Ok(()) => info!(
                partition = self.partition,
                ?changes,
                "membership change proposed"
            ),
            Err(e) => debug!(partition = self.partition, error = %e, "membership change refused"),
        }
    }
}

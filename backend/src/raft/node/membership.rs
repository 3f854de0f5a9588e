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
//! - **Removed replicas.** A replica that applies a configuration without itself stops and
//!   deletes its data. A removal can commit without the removed node seeing the commit (the
//!   leader stops replicating to it at once); such a replica, which the target does not place
//!   here and which hears from no leader for `orphan_ticks` ticks, is deleted too.

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
    /// Ticks without a leader after which a replica the target does not place here is
    /// considered removed and deleted.
    pub orphan_ticks: usize,
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
    /// Ticks without a known leader, per held partition the target does not place here.
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
        self.delete_orphans();
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

    /// Replicas the target does not place here that have heard from no leader for long: the
    /// removal committed without them.
    fn delete_orphans(&mut self) {
        let me = self.config.node_id;
        let limit = self.config.membership.orphan_ticks;
        let target = &self.membership.target;
        let mut orphans = Vec::new();
        let mut unfilled = Vec::new();
        for (&p, g) in &self.groups {
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
            if placed.is_empty() || placed.contains(&me) || g.leader().is_some() {
                self.membership.leaderless.remove(&p);
                continue;
            }
            let ticks = self.membership.leaderless.entry(p).or_insert(0);
            *ticks += 1;
            if *ticks > limit {
                orphans.push(p);
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
        for p in orphans {
            info!(
                partition = p,
                "replica without a leader and not in the map: deleting"
            );
            self.destroy_group(p);
        }
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

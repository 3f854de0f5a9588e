//! One partition's Raft group on this node: its raft-rs `RawNode`, its state machine and the
//! proposals waiting for their entries. `apply_committed` is the *apply* step of the driver's
//! Ready loop; effects go out through the shared sink ([`crate::effects`]).

use super::*;

pub(super) type ReplySender = oneshot::Sender<Result<Reply, ProposeError>>;

/// A command waiting to be proposed in this round's batch.
pub(super) type Proposal = (Command, ReplySender, Option<EventSender>, Option<Origin>);

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
pub(super) struct Pending {
    pub(super) index: u64,
    pub(super) term: u64,
    pub(super) replies: Vec<Option<oneshot::Sender<Result<Reply, ProposeError>>>>,
    pub(super) events: Vec<Option<EventSender>>,
    pub(super) origins: Vec<Option<Origin>>,
    pub(super) timer: crate::raft::timings::CommitTimer,
}

/// One partition's Raft group and state machine on this node.
pub(super) struct Group {
    pub(super) partition: u32,
    pub(super) raw: RawNode<SledRaftStorage>,
    pub(super) storage: SledRaftStorage,
    pub(super) checkpoints: PartitionStore,
    pub(super) sm: Partition,
    pub(super) pending: VecDeque<Pending>,
    pub(super) proposals: Vec<Proposal>,
    /// In-process connections of sessions in this partition (used while this node leads it).
    pub(super) connections: Connections,
    pub(super) applied_since_checkpoint: u64,
    pub(super) was_leader: bool,
    /// The term whose leader work ([`Group::take_over`]) has run here (0: none yet).
    pub(super) taken_over: u64,
    /// A conf change removed this node from the group: the driver destroys it after the round.
    pub(super) removed: bool,
    /// A leader's append, heartbeat or snapshot of the current term (or a later one) arrived
    /// since the last tick (`membership.rs` counts the ticks without one). Not `leader_id`: a
    /// learner never campaigns, so it keeps the id of a leader that stopped talking to it.
    pub(super) heard_leader: bool,
    /// Stream → the highest pipe generation of which this group refused an operation: later
    /// operations of that stream and generation are refused too ([`Origin`]).
    pub(super) fences: HashMap<u64, u64>,
    /// Queries waiting for a ReadIndex round (`reads.rs`).
    pub(super) reads: reads::Reads,
    /// Ticks each peer has spent in raft's snapshot state while this node leads
    /// (`membership.rs`, `Driver::unstall_snapshots`).
    pub(super) snapshot_ticks: HashMap<u64, usize>,
}

impl Group {
    /// The Raft index of the last command applied to the state machine.
    pub(super) fn applied(&self) -> u64 {
        self.sm.applied_index() >> BATCH_BITS
    }
}

impl Group {
    pub(super) fn leader(&self) -> Option<NodeId> {
        let id = self.raw.raft.leader_id;
        (id != raft::INVALID_ID).then_some(id)
    }

    pub(super) fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// The voter (not this node) whose log matches the leader's furthest: the one that can
    /// take over soonest. None when this node is not the leader or has no other voter.
    pub(super) fn transfer_target(&self) -> Option<NodeId> {
        let raft = &self.raw.raft;
        let me = raft.id;
        raft.prs()
            .iter()
            .filter(|(id, _)| **id != me && raft.prs().conf().voters().contains(**id))
            .max_by_key(|(id, p)| (p.matched, std::cmp::Reverse(**id)))
            .map(|(id, _)| *id)
    }

    pub(super) fn status(&self) -> GroupStatus {
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

    pub(super) fn fail_pending(&mut self, err: ProposeError) {
        for p in std::mem::take(&mut self.pending) {
            for (r, origin) in p.replies.into_iter().zip(p.origins) {
                if let Some(r) = r {
                    self.refuse(origin, r, err.clone());
                }
            }
        }
    }

    /// Answers a proposal with `err` and fences its stream's later operations ([`Origin`]).
    pub(super) fn refuse(&mut self, origin: Option<Origin>, reply: ReplySender, err: ProposeError) {
        if let Some(o) = origin {
            let fence = self.fences.entry(o.stream).or_default();
            *fence = (*fence).max(o.generation);
        }
        let _ = reply.send(Err(err));
    }

    /// Whether an earlier operation of `origin`'s stream and generation was refused here.
    pub(super) fn fenced(&self, origin: Option<Origin>) -> bool {
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
    pub(super) fn apply_committed(&mut self, entries: Vec<RaftEntry>, hub: &ClusterHub, now: u64) {
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
                        let tracked = Tracked::of(&command.command);
                        // A takeover's DISCONNECT goes to the connection being replaced,
                        // possibly on another frontend: remember where it was.
                        let previous = tracked
                            .connecting()
                            .and_then(|c| self.sm.session(c))
                            .and_then(|s| s.attachment);
                        let (reply, fx) = self.sm.apply(sm_index, command);
                        let new_conn = match (&reply, event_txs.get_mut(i).and_then(Option::take)) {
                            (Reply::Connected { epoch, .. }, Some(tx)) => Some((*epoch, tx)),
                            _ => None,
                        };
                        if own {
                            let mut host = LeaderHost {
                                hub,
                                partition: self.partition,
                                term: self.raw.raft.term,
                                sm: &self.sm,
                                previous,
                            };
                            self.connections.dispatch(fx, new_conn.as_ref(), &mut host);
                            self.connections.track(tracked, new_conn, &self.sm);
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
    pub(super) fn take_over(&mut self, hub: &ClusterHub, now: u64) {
        info!(
            partition = self.partition,
            term = self.raw.raft.term,
            "leading: taking over the old leader's work"
        );
        hub.took_over(self.partition);
        hub.broadcast_route(self.route_snapshot());
        for f in self.sm.attached_frontends() {
            let fx = self.sm.replay_for_frontend(f, now);
            self.dispatch(fx, hub);
        }
        for work in self.sm.shared_work() {
            hub.hand_over(LeaderWork::Shared {
                origin: self.partition,
                work,
            });
        }
    }

    /// Carries out effects that no applied command produced (a replay, a QoS0 delivery).
    pub(super) fn dispatch(&self, fx: Vec<crate::partition::command::Effect>, hub: &ClusterHub) {
        let mut host = LeaderHost {
            hub,
            partition: self.partition,
            term: self.raw.raft.term,
            sm: &self.sm,
            previous: None,
        };
        self.connections.dispatch(fx, None, &mut host);
    }

    pub(super) fn route_snapshot(&self) -> RouteChange {
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

    pub(super) fn maybe_checkpoint(&mut self, config: &RaftConfig, force: bool) {
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
    pub(super) fn build_snapshot(&mut self) -> Result<(), raft::Error> {
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
    pub(super) fn install_snapshot(
        &mut self,
        snap: Snapshot,
        limits: SessionLimits,
    ) -> Result<(), String> {
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

/// A leader's effects that leave the group: events for connections on other frontends go
/// through the hub's frontend streams, route changes to the route watchers, cross-partition
/// steps to the node's leader work.
pub(super) struct LeaderHost<'a> {
    pub(super) hub: &'a ClusterHub,
    pub(super) partition: u32,
    pub(super) term: u64,
    pub(super) sm: &'a Partition,
    /// Where the session's connection was before the applied command (a takeover's
    /// DISCONNECT goes to the connection being replaced, possibly on another frontend).
    pub(super) previous: Option<Attachment>,
}

impl EffectHost for LeaderHost<'_> {
    fn send_elsewhere(&mut self, client_id: Arc<str>, epoch: u64, event: SessionEvent) {
        let frontend = match self.sm.session(&client_id).and_then(|s| s.attachment) {
            Some(a) if a.epoch == epoch => Some(a.frontend_id),
            _ => self
                .previous
                .filter(|a| a.epoch == epoch)
                .map(|a| a.frontend_id),
        };
        if let Some(frontend_id) = frontend {
            self.hub.send_to_frontend(
                frontend_id,
                FrontendEvent {
                    client_id,
                    epoch,
                    event,
                },
            );
        }
    }

    fn route_changed(&mut self, filter: String, added: bool) {
        let (added, removed) = if added {
            (vec![filter], Vec::new())
        } else {
            (Vec::new(), vec![filter])
        };
        self.hub.broadcast_route(RouteChange {
            partition: self.partition,
            leader: true,
            reset: false,
            added,
            removed,
            term: self.term,
            seq: 0,
        });
    }

    fn shared(&mut self, work: SharedWork) {
        self.hub.hand_over(LeaderWork::Shared {
            origin: self.partition,
            work,
        });
    }
}

/// Opens (or creates) the replica of `partition` on this node. `bootstrap`: the voters a group
/// with empty storage starts with (static bootstrap); `None` for a replica added by a
/// membership change, which starts empty and learns everything (configuration included) from
/// the leader's snapshot.
pub(super) fn open_group(
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
        connections: Connections::default(),
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
pub(super) fn catch_up_with_snapshot(
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

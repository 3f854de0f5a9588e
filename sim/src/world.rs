//! The simulated world: virtual clock, seeded randomness, the network between endpoints, and
//! the backend nodes (the real Raft driver and partition state machine on sled), which can
//! crash and restart.
//!
//! Everything runs on one tokio current-thread runtime with paused time: tasks run in a
//! fixed order and time jumps to the next timer when nothing is ready, so a seed replays the
//! same history (the driver's hooks for this are `RaftConfig::{clock, sync_flush,
//! max_election_tick}`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tiermq_backend::placement::{NodeId, PartitionMap, DEFAULT_VNODES};
use tiermq_backend::raft::clock::WallClock;
use tiermq_backend::raft::node::{
    start, ClusterHub, PeerMessage, RaftConfig, RaftHandle, Transport,
};
use tokio::time::Instant;

use crate::history::History;
use crate::plan::{Plan, Planted};

/// Wall-clock milliseconds at virtual time zero (any fixed value: entries carry it).
const EPOCH_MS: u64 = 1_800_000_000_000;

/// A place messages travel between.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Endpoint {
    Node(NodeId),
    /// A frontend slot (its id changes at every restart; its network place does not).
    Frontend(u64),
}

/// Which links are cut, how often a message is lost, how long one travels.
struct Net {
    /// Unordered pairs, smaller first.
    cuts: BTreeSet<(Endpoint, Endpoint)>,
    loss: f64,
    max_delay_ms: u64,
}

/// One backend node: its disk outlives its crashes.
struct Node {
    db: sled::Db,
    /// The running driver; `None` while crashed.
    handle: Option<RaftHandle>,
    /// Counts starts: a message or stream of an older incarnation is not delivered to a newer.
    incarnation: u64,
    election_tick: usize,
}

pub struct World {
    pub plan: Plan,
    /// The target partition map (membership changes replace it).
    map: Mutex<PartitionMap>,
    pub history: Mutex<History>,
    rng: Mutex<StdRng>,
    net: Mutex<Net>,
    nodes: Mutex<BTreeMap<NodeId, Node>>,
    start: Instant,
    /// Set when the run's traffic phase is over: clients stop starting new work.
    finished: std::sync::atomic::AtomicBool,
    /// Each client's open connection: (frontend slot, epoch).
    connections: Mutex<BTreeMap<String, (u64, u64)>>,
    _dir: tempfile::TempDir,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl World {
    pub fn new(plan: Plan) -> Arc<World> {
        let mut rng = StdRng::seed_from_u64(plan.seed ^ 0x9e37_79b9_7f4a_7c15);
        let ids: Vec<NodeId> = (1..=plan.nodes).collect();
        let map = PartitionMap::compute(1, &ids, plan.partitions, 3, DEFAULT_VNODES);
        // Disks for the nodes that may join later too.
        let all: Vec<NodeId> = (1..=plan.nodes + plan.joins.len() as u64).collect();
        // tmpfs when there is one: the disk here is only a place for sled's files.
        let base = std::path::Path::new("/dev/shm");
        let dir = if base.is_dir() {
            tempfile::tempdir_in(base)
        } else {
            tempfile::tempdir()
        }
        .expect("temporary folder");
        let mut nodes = BTreeMap::new();
        for &id in &all {
            let db = sled::Config::new()
                .path(dir.path().join(format!("node{id}")))
                .flush_every_ms(None)
                .open()
                .expect("open sled");
            nodes.insert(
                id,
                Node {
                    db,
                    handle: None,
                    incarnation: 0,
                    election_tick: rng.random_range(8..16),
                },
            );
        }
        let net = Net {
            cuts: BTreeSet::new(),
            loss: plan.loss,
            max_delay_ms: plan.max_delay_ms,
        };
        Arc::new(World {
            plan,
            map: Mutex::new(map),
            history: Mutex::new(History::default()),
            rng: Mutex::new(rng),
            net: Mutex::new(net),
            nodes: Mutex::new(nodes),
            start: Instant::now(),
            finished: Default::default(),
            connections: Default::default(),
            _dir: dir,
        })
    }

    /// Virtual milliseconds since the start of the run.
    pub fn elapsed_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    pub fn trace(&self, line: impl Into<String>) {
        let t = self.elapsed_ms();
        let line = line.into();
        if std::env::var_os("TIERMQ_SIM_LIVE").is_some() {
            eprintln!("{:>6}.{:03} {line}", t / 1000, t % 1000);
        }
        lock(&self.history).trace(t, line);
    }

    pub fn history(&self) -> MutexGuard<'_, History> {
        lock(&self.history)
    }

    /// Records that `client` is connected through frontend `slot` with `epoch`, or (None)
    /// that it has no connection.
    pub fn set_connection(&self, client: &str, connection: Option<(u64, u64)>) {
        let mut c = lock(&self.connections);
        match connection {
            Some(conn) => c.insert(client.to_string(), conn),
            None => c.remove(client),
        };
    }

    pub fn connection(&self, client: &str) -> Option<(u64, u64)> {
        lock(&self.connections).get(client).copied()
    }

    pub fn finish(&self) {
        self.finished
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn finished(&self) -> bool {
        self.finished.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn range(&self, range: std::ops::Range<u64>) -> u64 {
        lock(&self.rng).random_range(range)
    }

    pub fn chance(&self, p: f64) -> bool {
        p > 0.0 && lock(&self.rng).random_bool(p.min(1.0))
    }

    // ---- the network ----

    fn pair(a: Endpoint, b: Endpoint) -> (Endpoint, Endpoint) {
        if a <= b {
            (a, b)
        } else {
            (b, a)
        }
    }

    pub fn cut(&self, a: Endpoint, b: Endpoint) {
        lock(&self.net).cuts.insert(Self::pair(a, b));
    }

    pub fn heal(&self, a: Endpoint, b: Endpoint) {
        lock(&self.net).cuts.remove(&Self::pair(a, b));
    }

    pub fn heal_all(&self) {
        let mut net = lock(&self.net);
        net.cuts.clear();
        net.loss = 0.0;
    }

    pub fn link_ok(&self, a: Endpoint, b: Endpoint) -> bool {
        !lock(&self.net).cuts.contains(&Self::pair(a, b))
    }

    /// Whether one message on a working link is lost.
    pub fn lost(&self) -> bool {
        let loss = lock(&self.net).loss;
        self.chance(loss)
    }

    /// How long one message travels (each message draws its own: messages overtake).
    pub fn delay(&self) -> Duration {
        let max = lock(&self.net).max_delay_ms;
        Duration::from_micros(self.range(100..max * 1000 + 101))
    }

    // ---- backend nodes ----

    pub fn map(&self) -> PartitionMap {
        lock(&self.map).clone()
    }

    /// A membership change: every running node gets the new target map (a node down now gets
    /// it when it starts, as a backend reads the stored record).
    pub fn set_map(&self, members: &[NodeId]) {
        let map = {
            let mut m = lock(&self.map);
            *m = PartitionMap::compute(
                m.epoch + 1,
                members,
                self.plan.partitions,
                3,
                DEFAULT_VNODES,
            );
            m.clone()
        };
        self.trace(format!(
            "members are now {members:?} (map epoch {})",
            map.epoch
        ));
        for id in self.node_ids() {
            if let Some(h) = self.handle(id) {
                h.set_map(map.clone());
            }
        }
    }

    pub fn node_ids(&self) -> Vec<NodeId> {
        lock(&self.nodes).keys().copied().collect()
    }

    pub fn handle(&self, id: NodeId) -> Option<RaftHandle> {
        lock(&self.nodes).get(&id).and_then(|n| n.handle.clone())
    }

    /// The running driver of `id` and its incarnation.
    pub fn handle_with_incarnation(&self, id: NodeId) -> Option<(RaftHandle, u64)> {
        lock(&self.nodes)
            .get(&id)
            .and_then(|n| n.handle.clone().map(|h| (h, n.incarnation)))
    }

    pub fn incarnation(&self, id: NodeId) -> u64 {
        lock(&self.nodes).get(&id).map_or(0, |n| n.incarnation)
    }

    pub fn is_up(&self, id: NodeId) -> bool {
        lock(&self.nodes)
            .get(&id)
            .is_some_and(|n| n.handle.is_some())
    }

    /// Starts (or restarts, from what its disk holds) node `id`.
    pub fn start_node(self: &Arc<Self>, id: NodeId) {
        let (db, election_tick, incarnation) = {
            let mut nodes = lock(&self.nodes);
            let n = nodes.get_mut(&id).expect("known node");
            if n.handle.is_some() {
                return;
            }
            n.incarnation += 1;
            (n.db.clone(), n.election_tick, n.incarnation)
        };
        let map = self.map();
        let member = map.replicas.iter().any(|r| r.contains(&id));
        let mut config = RaftConfig::new(id);
        // Only the first static cluster bootstraps its groups; a node that joins, or restarts
        // under a later map, starts its new replicas empty and learns them from the leaders.
        config.bootstrap = map.epoch == 1;
        config.tick_interval = Duration::from_millis(20);
        config.election_tick = election_tick;
        config.max_election_tick = election_tick + 1;
        config.heartbeat_tick = 2;
        config.checkpoint_entries = self.plan.checkpoint_entries;
        config.log_keep_entries = self.plan.log_keep_entries;
        config.sm_tick_interval = Duration::from_millis(500);
        config.frontend_lease = Duration::from_secs(3);
        config.sync_flush = true;
        config.membership.delete_on_silence = self.plan.planted == Some(Planted::OrphanBySilence);
        let start_instant = self.start;
        config.clock =
            WallClock::from_fn(move || EPOCH_MS + start_instant.elapsed().as_millis() as u64);
        let hub = ClusterHub::new();
        let (will_tx, will_rx) = tokio::sync::mpsc::unbounded_channel();
        hub.set_will_sink(will_tx);
        let transport = Arc::new(SimTransport {
            from: id,
            incarnation,
            world: self.clone(),
        });
        let start_map = if member {
            map.clone()
        } else {
            PartitionMap::compute(0, &[], self.plan.partitions, 3, DEFAULT_VNODES)
        };
        let handle = match start(config, db, &start_map, transport, hub) {
            Ok(h) => h,
            Err(e) => {
                self.history()
                    .violation(format!("node {id} failed to start: {e}"));
                return;
            }
        };
        if map.epoch > 1 {
            handle.set_map(map);
        }
        lock(&self.nodes).get_mut(&id).expect("known node").handle = Some(handle);
        self.trace(format!("node {id} started (incarnation {incarnation})"));
        tokio::spawn(crate::leader_work::run_leader_work(
            self.clone(),
            id,
            incarnation,
            will_rx,
        ));
    }

    /// Makes every Raft storage write of node `id` fail (a broken disk).
    pub fn fail_disk(&self, id: NodeId) {
        if let Some(h) = self.handle(id) {
            h.disk_faults().set_failing(true);
            self.trace(format!("node {id}: disk failing"));
        }
    }

    /// Kills node `id` at once (kill -9): what each Raft round flushed stays on its disk.
    pub fn crash_node(&self, id: NodeId) {
        let handle = lock(&self.nodes).get_mut(&id).and_then(|n| n.handle.take());
        if let Some(h) = handle {
            h.abort();
            self.trace(format!("node {id} crashed"));
        }
    }
}

/// The Raft transport of one node incarnation over the simulated network.
struct SimTransport {
    from: NodeId,
    incarnation: u64,
    world: Arc<World>,
}

impl Transport for SimTransport {
    fn send(&self, to: NodeId, messages: Vec<(u32, PeerMessage)>) {
        let world = &self.world;
        if world.incarnation(self.from) != self.incarnation {
            return; // a crashed incarnation's last words
        }
        let (a, b) = (Endpoint::Node(self.from), Endpoint::Node(to));
        for (partition, message) in messages {
            if !world.link_ok(a, b) || world.lost() {
                continue;
            }
            let delay = world.delay();
            let world = world.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if world.link_ok(a, b) {
                    if let Some(h) = world.handle(to) {
                        h.deliver(partition, message);
                    }
                }
            });
        }
    }
}

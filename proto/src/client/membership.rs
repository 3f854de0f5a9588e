//! Following the cluster's membership record: which backends exist, at which address, and
//! which replicas each partition has.
//!
//! Backends join and leave while frontends keep running (issue 11). A client that kept the
//! member set it saw at connect time would never reach a joined node — its operations would
//! bounce between `NotLeader` hints naming a node it has no address for — and would keep
//! trying replicas that moved away. So a refresher task re-reads `ClusterInfo` (the full
//! answer: members *and* per-partition replicas and leaders):
//!
//! - every [`REFRESH_EVERY`], from the next member in turn (a dead one just fails and the next
//!   is asked; the connect seeds are the last resort when no member answers);
//! - at once when an operation gets a `NotLeader` hint naming a node this client has no link
//!   to, or when as many nodes in a row as the partition has replicas failed without naming
//!   a leader (every replica it knows is gone or disowns the partition: the map it holds is
//!   probably stale). Wake-ups are coalesced and at least [`REFRESH_GAP`] apart, so a burst
//!   of failing operations costs one read.
//!
//! The record's epoch only grows, so an answer is taken up only when its epoch is newer than
//! the one held: a member that has not seen the latest change yet cannot take the client
//! back. Taking up a newer record:
//!
//! - **a new member** gets a link — ordered op stream, route watch, event stream — opened by
//!   the same code as at connect time ([`Inner::apply_info`] builds the first record too);
//! - **a known id at a new address** (a backend restarted elsewhere) gets a new link: the old
//!   one is closed (its tasks end; operations in flight on it fail over like on a lost
//!   stream) and the routes it reported are forgotten in the same step, under the `nodes`
//!   lock, so its watch cannot write stale routes afterwards (route updates are applied only
//!   for the link's own generation);
//! - **a removed member** is *retired*: it is no longer a candidate replica (the new map does
//!   not list it), but its link stays open while its route watch says it still leads a
//!   partition. Removal moves the replicas first and hands leadership over last, so until
//!   then it is the only node that can commit those partitions' operations and the one whose
//!   event stream carries their deliveries — closing it early would stall the operations
//!   (hints would name it) and, after the backends' 3 s frontend lease, disconnect this
//!   frontend's sessions there. A retired node's broken streams are not reopened, and once
//!   it leads nothing the refresher closes the link ([`Inner::prune_retired`]);
//! - replica lists are replaced, and the leader of a partition whose route watch is silent
//!   is taken from the answer as a hint (a watch, when there is one, is authoritative).
//!
//! The hot path is unchanged in shape: an operation takes the `nodes` read lock to find its
//! node's queue; only the refresher takes it for writing, and only on a newer epoch.

use super::*;

/// Period of the membership re-read.
pub(super) const REFRESH_EVERY: Duration = Duration::from_secs(1);
/// Least time between two re-reads, however often they are asked for.
pub(super) const REFRESH_GAP: Duration = Duration::from_millis(100);
/// One `Cluster` call's limit (connect timeout 1 s included).
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// The client's streams to one backend.
pub(super) struct NodeLink {
    pub(super) addr: String,
    /// Tells this link's tasks from an earlier link's to the same id.
    pub(super) generation: u64,
    pub(super) ops: OpSender,
    /// `true` once the node left the record. Dropping it (closing the link) ends the route
    /// watch and the event stream; the op stream ends when `ops` is dropped.
    control: watch::Sender<bool>,
}

impl NodeLink {
    fn retired(&self) -> bool {
        *self.control.borrow()
    }
}

/// The record epoch held and what the refresher needs.
pub(super) struct MapState {
    epoch: AtomicU64,
    wake: Arc<tokio::sync::Notify>,
    /// Notified (all waiters) when a newer record was taken up: pipes backing off retry now.
    pub(super) taken_up: Arc<tokio::sync::Notify>,
    seeds: Vec<String>,
    every: Duration,
    generations: AtomicU64,
}

impl MapState {
    pub(super) fn new(seeds: Vec<String>, every: Duration) -> Self {
        MapState {
            epoch: AtomicU64::new(0),
            wake: Arc::new(tokio::sync::Notify::new()),
            taken_up: Arc::new(tokio::sync::Notify::new()),
            seeds,
            every,
            generations: AtomicU64::new(0),
        }
    }
}

/// Completes when the link's control sender is dropped (the link was closed); a value change
/// (retired) does not complete it.
pub(super) async fn closed(control: &mut watch::Receiver<bool>) {
    while control.changed().await.is_ok() {}
}

/// What a read of the record did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Taken {
    Newer,
    Unchanged,
    /// Another partition count (not this cluster, or a broken node), or not every
    /// partition's replicas: ignored.
    Refused,
}

impl Taken {
    fn label(self) -> &'static str {
        match self {
            Taken::Newer => "newer",
            Taken::Unchanged => "unchanged",
            Taken::Refused => "refused",
        }
    }
}

impl Inner {
    /// The record epoch this client routes by.
    pub(super) fn map_epoch(&self) -> u64 {
        self.membership.epoch.load(Ordering::Acquire)
    }

    /// Whether this client has a link to `node`.
    pub(super) fn knows(&self, node: u64) -> bool {
        self.nodes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&node)
    }

    /// Asks the refresher for a re-read now (coalesced; see the module docs).
    pub(super) fn wake_refresh(&self) {
        self.membership.wake.notify_one();
    }

    /// Opens a link to `id` at `addr` (its three tasks) and puts it in `nodes`; a link it
    /// replaces is returned, for the caller to drop once the table is consistent.
    fn open_link(
        self: &Arc<Self>,
        nodes: &mut BTreeMap<u64, NodeLink>,
        id: u64,
        addr: &str,
    ) -> Option<NodeLink> {
        let generation = self.membership.generations.fetch_add(1, Ordering::Relaxed) + 1;
        let (ops, queue) = mpsc::unbounded_channel();
        let (control, watched) = watch::channel(false);
        tokio::spawn(op_stream(id, addr.to_string(), queue, self.tls.clone()));
        tokio::spawn(route_watch(
            Arc::downgrade(self),
            id,
            addr.to_string(),
            generation,
            watched.clone(),
        ));
        tokio::spawn(event_stream(
            Arc::downgrade(self),
            id,
            addr.to_string(),
            watched,
        ));
        nodes.insert(
            id,
            NodeLink {
                addr: addr.to_string(),
                generation,
                ops,
                control,
            },
        )
    }

    /// Takes up `info` if its epoch is newer than the one held (see the module docs).
    pub(super) fn apply_info(self: &Arc<Self>, info: &ClusterInfo) -> Taken {
        // A record without every partition's replicas would be taken up once and then never
        // again (same epoch): wait for a complete answer.
        if info.partitions != self.partitions
            || info.partition_info.len() != self.partitions as usize
        {
            tiermq_common::warn_limited!(
                STREAM_WARNINGS,
                "cluster-info-partitions",
                node = info.node_id,
                partitions = info.partitions,
                listed = info.partition_info.len(),
                expected = self.partitions,
                "a backend's membership record does not cover this cluster's partitions; ignored"
            );
            return Taken::Refused;
        }
        // Fast path of the common answer (nothing changed); 0 is "no record yet".
        let held = self.map_epoch();
        if held != 0 && info.epoch <= held {
            return Taken::Unchanged;
        }
        let wanted: BTreeMap<u64, &str> = info
            .members
            .iter()
            .map(|m| (m.id, m.addr.as_str()))
            .collect();
        let (mut added, mut moved, mut retired) = (Vec::new(), Vec::new(), Vec::new());
        let mut closed = Vec::new();
        let known: HashSet<u64>;
        {
            let mut nodes = self.nodes.write().unwrap_or_else(|e| e.into_inner());
            // Re-checked under the lock: only the refresher applies after connect, but the
            // rule must not depend on that. The first record is taken whatever its epoch.
            if !nodes.is_empty() && info.epoch <= self.map_epoch() {
                return Taken::Unchanged;
            }
            for (&id, &addr) in &wanted {
                match nodes.get(&id) {
                    Some(link) if link.addr == addr && !link.retired() => {}
                    Some(link) => {
                        // A new address, or a retired node back in the record (its streams
                        // may have ended on their own): a fresh link either way.
                        if link.addr != addr {
                            moved.push(id);
                        } else {
                            added.push(id);
                        }
                        closed.extend(self.open_link(&mut nodes, id, addr));
                    }
                    None => {
                        added.push(id);
                        self.open_link(&mut nodes, id, addr);
                    }
                }
            }
            for (id, link) in nodes.iter() {
                if !wanted.contains_key(id) && !link.retired() {
                    link.control.send_replace(true);
                    retired.push(*id);
                }
            }
            if !closed.is_empty() {
                let renewed: HashSet<u64> = moved.iter().chain(&added).copied().collect();
                let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
                // Its table and its route lease were the old address's: the new one's
                // table is trusted once the new process grants a renewal.
                for n in renewed {
                    routes.forget(n);
                }
            }
            known = nodes.keys().copied().collect();
            self.membership.epoch.store(info.epoch, Ordering::Release);
        }
        // Outside the lock: dropping a link wakes its tasks, which take it to check.
        drop(closed);
        {
            let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
            let mut leaders = self.leaders.write().unwrap_or_else(|e| e.into_inner());
            let mut replicas = self.replicas.write().unwrap_or_else(|e| e.into_inner());
            for p in &info.partition_info {
                let i = p.partition as usize;
                if i >= replicas.len() {
                    continue;
                }
                replicas[i] = p.replicas.clone();
                if p.leader != 0 && routes.source(i as u32).is_none() && known.contains(&p.leader) {
                    leaders[i] = p.leader;
                }
            }
        }
        self.membership.taken_up.notify_waiters();
        self.metrics.map_epoch.set(info.epoch as i64);
        self.metrics.map_members.set(wanted.len() as i64);
        info!(
            epoch = info.epoch,
            members = wanted.len(),
            ?added,
            ?moved,
            ?retired,
            from = info.node_id,
            "cluster membership record taken up"
        );
        Taken::Newer
    }

    /// Closes the links of retired nodes that lead no partition any more (as far as their
    /// route watches say), and forgets them as cached leaders.
    pub(super) fn prune_retired(&self) {
        let mut nodes = self.nodes.write().unwrap_or_else(|e| e.into_inner());
        if !nodes.values().any(NodeLink::retired) {
            return;
        }
        let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
        let leading: HashSet<u64> = routes.sources().collect();
        let gone: Vec<u64> = nodes
            .iter()
            .filter(|(id, link)| link.retired() && !leading.contains(id))
            .map(|(id, _)| *id)
            .collect();
        if gone.is_empty() {
            return;
        }
        let closed: Vec<NodeLink> = gone.iter().filter_map(|id| nodes.remove(id)).collect();
        let mut leaders = self.leaders.write().unwrap_or_else(|e| e.into_inner());
        for l in leaders.iter_mut() {
            if gone.contains(l) {
                *l = 0;
            }
        }
        drop((leaders, routes, nodes));
        drop(closed);
        info!(nodes = ?gone, "closed the links to removed backends (they lead nothing now)");
    }

    /// Where to read the record from, in turn: the members, then the seeds not among them.
    fn refresh_sources(&self) -> Vec<String> {
        let nodes = self.nodes.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<String> = nodes
            .values()
            .filter(|l| !l.retired())
            .map(|l| l.addr.clone())
            .collect();
        for s in &self.membership.seeds {
            if !out.contains(s) {
                out.push(s.clone());
            }
        }
        out
    }
}

/// Re-reads the record (see the module docs) until the client is dropped. Holds only a weak
/// reference to it between reads.
pub(super) async fn refresher(inner: Weak<Inner>) {
    // One lazily connected channel per address asked, reused across reads.
    let mut clients: HashMap<String, BrokerClient<Channel>> = HashMap::new();
    let mut turn = 0usize;
    let mut last: Option<Instant> = None;
    loop {
        let Some(alive) = inner.upgrade() else { return };
        let (every, wake) = (alive.membership.every, alive.membership.wake.clone());
        drop(alive);
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = wake.notified() => {}
        }
        if let Some(wait) = last.and_then(|l| REFRESH_GAP.checked_sub(l.elapsed())) {
            tokio::time::sleep(wait).await;
        }
        let Some(alive) = inner.upgrade() else { return };
        let sources = alive.refresh_sources();
        let tls = alive.tls.clone();
        drop(alive);
        let mut fetched = None;
        for i in 0..sources.len() {
            let addr = &sources[(turn + i) % sources.len()];
            match fetch_with(&mut clients, addr, tls.as_ref()).await {
                Ok(info) => {
                    fetched = Some(info);
                    break;
                }
                Err(e) => {
                    debug!(%addr, error = %e, "cluster record re-read failed; asking the next");
                    clients.remove(addr);
                }
            }
        }
        turn = turn.wrapping_add(1);
        last = Some(Instant::now());
        clients.retain(|a, _| sources.contains(a));
        let Some(alive) = inner.upgrade() else { return };
        let outcome = match fetched {
            Some(info) => alive.apply_info(&info).label(),
            None => "failed",
        };
        alive
            .metrics
            .map_refreshes
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
        alive.prune_retired();
    }
}

async fn fetch_with(
    clients: &mut HashMap<String, BrokerClient<Channel>>,
    addr: &str,
    tls: Option<&GrpcTls>,
) -> Result<ClusterInfo, String> {
    let client = match clients.get(addr) {
        Some(c) => c.clone(),
        None => {
            let channel = tls::endpoint(addr, tls)
                .map_err(|e| e.to_string())?
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(5))
                .connect_lazy();
            let c = BrokerClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
            clients.insert(addr.to_string(), c.clone());
            c
        }
    };
    let mut client = client;
    let call = client.cluster(ClusterRequest {
        version: API_VERSION,
        members_only: false,
    });
    match tokio::time::timeout(FETCH_TIMEOUT, call).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(e)) => Err(e.message().to_string()),
        Err(_) => Err("no answer in time".into()),
    }
}

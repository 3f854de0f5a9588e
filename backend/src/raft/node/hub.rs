//! What a node's driver shares with the gRPC services that serve frontends: the event stream
//! of each attached frontend, the route watchers (and their route leases:
//! `tiermq_common::route_lease`), and the sink for work that involves other partitions.
//!
//! The driver writes (events, route changes, leader work); the services read and wait
//! (`wait_routes_acked` before a SUBACK). Kept apart from the Ready loop so that loop reads as
//! persist, send, apply, advance.

use std::collections::HashMap;
use std::sync::Arc;

use tiermq_common::route_lease;
use tiermq_common::session_api::SessionEvent;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::trace;

/// An event for a session attached to a frontend.
#[derive(Debug, Clone)]
pub struct FrontendEvent {
    pub client_id: Arc<str>,
    pub epoch: u64,
    pub event: SessionEvent,
}

/// A change of one partition's route set (filters with at least one subscription).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteChange {
    pub partition: u32,
    /// False: this node stopped leading the partition.
    pub leader: bool,
    /// `added` is the whole set.
    pub reset: bool,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// The leader's Raft term: a frontend that heard of a newer leader of the partition
    /// ignores an older one's tables (a deposed leader that does not know it yet).
    pub term: u64,
    /// Order of this update among everything the node broadcast (set by the hub).
    pub seq: u64,
}

impl RouteChange {
    /// This node stopped leading `partition`: its routes are no longer announced from here.
    pub(super) fn not_leader(partition: u32) -> RouteChange {
        RouteChange {
            partition,
            leader: false,
            reset: true,
            added: Vec::new(),
            removed: Vec::new(),
            term: 0,
            seq: 0,
        }
    }
}

/// A route watcher: where its updates go and what it has acknowledged.
struct Watcher {
    id: u64,
    tx: mpsc::UnboundedSender<RouteChange>,
    acked: u64,
    /// The last update sent to this watcher. Sequence numbers are global, but a snapshot
    /// goes only to the watcher that joined: the others never see (nor ack) its numbers.
    sent: u64,
    /// When this node last granted the watcher a route lease (`route_lease`): until
    /// `WAIT_AFTER_GRANT` after it, the frontend may still route by what it acknowledged then.
    granted: Option<Instant>,
}

impl Watcher {
    /// Whether it has applied every update up to `seq` that was sent to it.
    fn has_acked(&self, seq: u64) -> bool {
        self.acked >= seq.min(self.sent)
    }

    /// Until when its frontend may still trust a table without the updates it has not
    /// acknowledged; `None`: it trusts none of this node's tables.
    fn lease_end(&self) -> Option<Instant> {
        self.granted.map(|g| g + route_lease::WAIT_AFTER_GRANT)
    }

    /// Whether the frontend has `seq` (if it was sent to it) or can no longer route without it.
    fn settled(&self, seq: u64, now: Instant) -> bool {
        self.has_acked(seq) || self.lease_end().is_none_or(|end| end <= now)
    }
}

/// Work a leader hands to the node's cluster client: it involves other partitions.
#[derive(Debug)]
pub enum LeaderWork {
    /// A cross-partition step emitted by partition `origin`: a shared-subscription step or a
    /// fired will.
    Shared {
        origin: u32,
        work: tiermq_common::partition_api::SharedWork,
    },
}

/// What a node's driver shares with the services that serve frontends: event streams per
/// frontend, route watchers, and where fired wills go.
#[derive(Default)]
pub struct ClusterHub {
    frontends: std::sync::Mutex<HashMap<u64, mpsc::UnboundedSender<FrontendEvent>>>,
    routes: std::sync::Mutex<RouteWatchers>,
    route_acks: tokio::sync::Notify,
    wills: std::sync::Mutex<Option<mpsc::UnboundedSender<LeaderWork>>>,
    /// When this node took over each partition it leads, and how long after that it holds
    /// back SUBACKs (see [`ClusterHub::wait_takeover_settled`]).
    takeovers: std::sync::Mutex<Takeovers>,
}

#[derive(Default)]
struct Takeovers {
    since: HashMap<u32, Instant>,
    hold: std::time::Duration,
}

#[derive(Default)]
struct RouteWatchers {
    seq: u64,
    watchers: Vec<Watcher>,
}

impl ClusterHub {
    pub fn new() -> Arc<ClusterHub> {
        Arc::new(ClusterHub::default())
    }

    /// Where work for other partitions goes — wills fired and shared-subscription steps of the
    /// partitions this node leads — to be carried out through a cluster client.
    pub fn set_will_sink(&self, tx: mpsc::UnboundedSender<LeaderWork>) {
        *self.wills.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
    }

    pub(super) fn register_frontend(
        &self,
        frontend_id: u64,
    ) -> mpsc::UnboundedReceiver<FrontendEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.frontends
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(frontend_id, tx);
        rx
    }

    /// Frontends with an open event stream to this node.
    pub fn connected_frontends(&self) -> Vec<u64> {
        let map = self.frontends.lock().unwrap_or_else(|e| e.into_inner());
        let mut ids: Vec<u64> = map
            .iter()
            .filter(|(_, tx)| !tx.is_closed())
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    pub(super) fn has_frontend(&self, frontend_id: u64) -> bool {
        self.frontends
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&frontend_id)
            .is_some_and(|tx| !tx.is_closed())
    }

    pub(super) fn send_to_frontend(&self, frontend_id: u64, event: FrontendEvent) {
        let map = self.frontends.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = map.get(&frontend_id) {
            let _ = tx.send(event);
        }
    }

    pub(super) fn broadcast_route(&self, mut change: RouteChange) {
        let mut r = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        r.seq += 1;
        change.seq = r.seq;
        let seq = r.seq;
        let now = Instant::now();
        r.watchers.retain_mut(|w| {
            // Counted as sent even when the stream is gone: a frontend that has not noticed
            // may route by its table until its lease ends, so it is waited for until then.
            w.sent = seq;
            w.tx.send(change.clone()).is_ok() || w.lease_end().is_some_and(|end| end > now)
        });
        drop(r);
        self.route_acks.notify_waiters();
    }

    pub(super) fn add_watcher(
        &self,
        id: u64,
        tx: mpsc::UnboundedSender<RouteChange>,
        snapshot: Vec<RouteChange>,
    ) {
        let mut r = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        for mut c in snapshot {
            r.seq += 1;
            c.seq = r.seq;
            let _ = tx.send(c);
        }
        // Its snapshot covers everything so far; nothing to wait for from it yet: its
        // frontend dropped what it had from this node when its previous stream broke, and
        // trusts the new table only once a renewal of it is granted.
        let acked = r.seq;
        r.watchers.retain(|w| w.id != id);
        r.watchers.push(Watcher {
            id,
            tx,
            acked,
            sent: acked,
            granted: None,
        });
    }

    /// How long a new leader holds back SUBACKs: set by the driver from its election timeout.
    pub(super) fn set_takeover_hold(&self, election_timeout: std::time::Duration) {
        let mut t = self.takeovers.lock().unwrap_or_else(|e| e.into_inner());
        // The old leader steps down within two election timeouts of its last contact with a
        // quorum (`check_quorum`), and this node was elected at least one election timeout
        // after that contact; its last route lease ends `WAIT_AFTER_GRANT` later.
        t.hold = election_timeout * 2 + route_lease::WAIT_AFTER_GRANT;
    }

    /// This node has just taken over `partition` as its leader.
    pub(super) fn took_over(&self, partition: u32) {
        let mut t = self.takeovers.lock().unwrap_or_else(|e| e.into_inner());
        t.since.insert(partition, Instant::now());
    }

    /// Waits until leases granted by an earlier leader of `partition` have surely ended.
    ///
    /// A leader cut off from its group does not know it was deposed: until it steps down
    /// (`check_quorum`) it keeps renewing the route leases of frontends that still reach it,
    /// and such a frontend — if it cannot reach this node, it never hears of the new term —
    /// routes by the old leader's table, which lacks subscriptions committed here. So a
    /// SUBSCRIBE answered in the first moments of a leadership waits until the old leader
    /// has stepped down and every lease it granted has ended. Later SUBSCRIBEs do not wait.
    pub async fn wait_takeover_settled(&self, partition: u32) {
        let until = {
            let t = self.takeovers.lock().unwrap_or_else(|e| e.into_inner());
            t.since.get(&partition).map(|since| *since + t.hold)
        };
        if let Some(until) = until {
            if until > Instant::now() {
                trace!(partition, "SUBACK held back after a change of leader");
                tokio::time::sleep_until(until).await;
            }
        }
    }

    /// A watcher applied every update up to `seq`. Returns whether its route lease is
    /// renewed: only when `seq` covers every update sent to it over a stream still open
    /// (`route_lease`).
    pub fn ack_routes(&self, watcher_id: u64, seq: u64) -> bool {
        let mut r = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let mut granted = false;
        if let Some(w) = r.watchers.iter_mut().find(|w| w.id == watcher_id) {
            w.acked = w.acked.max(seq);
            if w.acked >= w.sent && !w.tx.is_closed() {
                w.granted = Some(Instant::now());
                granted = true;
            }
        }
        drop(r);
        self.route_acks.notify_waiters();
        granted
    }

    /// The number of the latest route update broadcast.
    pub fn route_seq(&self) -> u64 {
        self.routes.lock().unwrap_or_else(|e| e.into_inner()).seq
    }

    /// Waits until every watcher has acknowledged `seq`, or no longer trusts a route table
    /// without it (its lease ran out: `route_lease`). Bounded: a watcher that does not answer
    /// is waited for at most `WAIT_AFTER_GRANT` after the last renewal granted to it.
    pub async fn wait_routes_acked(&self, seq: u64) {
        loop {
            let notified = self.route_acks.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let next = {
                let now = Instant::now();
                let mut r = self.routes.lock().unwrap_or_else(|e| e.into_inner());
                r.watchers
                    .retain(|w| !w.tx.is_closed() || w.lease_end().is_some_and(|end| end > now));
                let behind: Vec<&Watcher> =
                    r.watchers.iter().filter(|w| !w.settled(seq, now)).collect();
                if behind.is_empty() {
                    return;
                }
                trace!(
                    seq,
                    behind = behind.len(),
                    "waiting for route acknowledgements"
                );
                behind.iter().filter_map(|w| w.lease_end()).min()
            };
            match next {
                Some(end) => {
                    let _ = tokio::time::timeout_at(end, notified).await;
                }
                None => notified.await,
            }
        }
    }

    pub(super) fn hand_over(&self, work: LeaderWork) {
        if let Some(tx) = &*self.wills.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = tx.send(work);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn watch(hub: &ClusterHub, id: u64) -> mpsc::UnboundedReceiver<RouteChange> {
        let (tx, rx) = mpsc::unbounded_channel();
        hub.add_watcher(id, tx, Vec::new());
        rx
    }

    fn added(partition: u32, filter: &str) -> RouteChange {
        RouteChange {
            partition,
            leader: true,
            reset: false,
            added: vec![filter.to_string()],
            removed: Vec::new(),
            term: 0,
            seq: 0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_is_granted_only_for_an_acknowledgement_of_everything_sent() {
        let hub = ClusterHub::new();
        let _w = watch(&hub, 1);
        assert!(hub.ack_routes(1, hub.route_seq()));
        hub.broadcast_route(added(0, "t/#"));
        let seq = hub.route_seq();
        assert!(!hub.ack_routes(1, seq - 1), "behind: no lease");
        assert!(hub.ack_routes(1, seq));
        assert!(!hub.ack_routes(7, seq), "an unknown watcher gets nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn a_subscribe_waits_for_each_watcher_until_it_acknowledges_or_its_lease_ends() {
        let hub = ClusterHub::new();
        let _fast = watch(&hub, 1);
        let _silent = watch(&hub, 2);
        assert!(hub.ack_routes(1, hub.route_seq()));
        assert!(hub.ack_routes(2, hub.route_seq()));
        tokio::time::advance(Duration::from_millis(300)).await;
        hub.broadcast_route(added(0, "t/#"));
        let seq = hub.route_seq();
        let started = Instant::now();
        assert!(hub.ack_routes(1, seq));
        hub.wait_routes_acked(seq).await;
        // Watcher 2 may route by its old table until its lease, granted 300 ms before, ends.
        assert_eq!(
            started.elapsed(),
            route_lease::WAIT_AFTER_GRANT - Duration::from_millis(300)
        );
        // Both acknowledged: no wait.
        hub.broadcast_route(added(1, "u/#"));
        let seq = hub.route_seq();
        assert!(hub.ack_routes(1, seq));
        assert!(hub.ack_routes(2, seq));
        let started = Instant::now();
        hub.wait_routes_acked(seq).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    /// A backend may see a watcher's stream end before its frontend does (a half-open
    /// connection): that frontend still routes by its table until its lease ends, so the
    /// SUBACK waits until then. (Before route leases the closed watcher was dropped at once.)
    #[tokio::test(start_paused = true)]
    async fn a_watcher_whose_stream_closed_is_waited_for_until_its_lease_ends() {
        let hub = ClusterHub::new();
        let w = watch(&hub, 1);
        assert!(hub.ack_routes(1, hub.route_seq()));
        tokio::time::advance(Duration::from_millis(500)).await;
        drop(w);
        hub.broadcast_route(added(0, "t/#"));
        let seq = hub.route_seq();
        assert!(
            !hub.ack_routes(1, seq - 1),
            "no renewal over a closed stream"
        );
        let started = Instant::now();
        hub.wait_routes_acked(seq).await;
        assert_eq!(
            started.elapsed(),
            route_lease::WAIT_AFTER_GRANT - Duration::from_millis(500)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_watcher_that_never_held_a_lease_is_not_waited_for() {
        let hub = ClusterHub::new();
        let _w = watch(&hub, 1);
        hub.broadcast_route(added(0, "t/#"));
        let started = Instant::now();
        hub.wait_routes_acked(hub.route_seq()).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_leader_holds_back_subacks_until_the_old_leaders_leases_ended() {
        let hub = ClusterHub::new();
        hub.set_takeover_hold(Duration::from_secs(1));
        let hold = Duration::from_secs(2) + route_lease::WAIT_AFTER_GRANT;
        // A partition never taken over here (a static leader from before) does not wait.
        let started = Instant::now();
        hub.wait_takeover_settled(3).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        hub.took_over(3);
        tokio::time::advance(Duration::from_millis(700)).await;
        let started = Instant::now();
        hub.wait_takeover_settled(3).await;
        assert_eq!(started.elapsed(), hold - Duration::from_millis(700));
        // Later SUBACKs go at once; other partitions are not affected.
        let started = Instant::now();
        hub.wait_takeover_settled(3).await;
        hub.wait_takeover_settled(4).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}

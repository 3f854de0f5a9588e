//! Crash recovery and storage failures of the Raft driver (issue 19): what a replica holds
//! after kill -9 at awkward moments, and what a node whose disk fails may acknowledge. Reuses
//! the in-memory cluster of `raft_cluster`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raft::prelude::Snapshot;
use tiermq_backend::members::{MemberRecord, Members};
use tiermq_backend::partition::command::{Command, Entry, Reply};
use tiermq_backend::partition::session::SessionLimits;
use tiermq_backend::partition::Partition;
use tiermq_backend::placement::{NodeId, PartitionMap, DEFAULT_VNODES};
use tiermq_backend::raft::node::{
    start, ClusterHub, FrontendEvent, PeerMessage, ProposeError, RaftConfig, Transport,
};
use tiermq_backend::raft::storage::SledRaftStorage;
use tiermq_backend::raft::transport::GrpcTransport;
use tiermq_backend::storage::PartitionStore;
use tiermq_common::session_api::{Delivery, SessionEvent, SubscribeRequest, SubscriptionOptions};
use tiermq_common::{Message, ProtocolVersion, QoS};
use tokio::sync::mpsc::UnboundedReceiver;

use super::raft_cluster::{open_db, retained, retained_in, Cluster, PARTITIONS, T};

/// Waits until node `id`'s replica of `p` holds every topic of `topics` as a retained message.
async fn wait_retained(c: &Cluster, id: NodeId, p: u32, topics: &[String], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let kept = match c.handle(id).unwrap().image(p).await {
            Some(image) => retained_in(&image),
            None => HashMap::new(),
        };
        let missing: Vec<&String> = topics.iter().filter(|t| !kept.contains_key(*t)).collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {id}, partition {p}: {} of {} committed writes missing, e.g. {:?}",
            missing.len(),
            topics.len(),
            &missing[..missing.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Issue 19, bug 1: a leader builds a snapshot on demand for a new replica (the one it stored
/// before adding the learner does not name it) at its applied index, ahead of its checkpoint.
/// After kill -9 of every node, each replica must still hold every committed write: raft
/// restarts at the snapshot index, so the state machine must not restart from the older
/// checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_built_for_a_new_replica_is_not_lost_in_a_crash() {
    // No periodic checkpoint: the only ones are those a move takes before adding a learner.
    let mut c = Cluster::with_config(&[1, 2, 3], PARTITIONS, |c| {
        c.checkpoint_entries = u64::MAX;
    });
    c.wait_leaders(T).await;
    // Four replicas of every partition: node 4 is added and nobody is removed, so every
    // replica stays where the test can look at it.
    let next = PartitionMap::compute(2, &[1, 2, 3, 4], PARTITIONS, 4, DEFAULT_VNODES);
    let p = 0;
    let topics: Vec<String> = (0..30).map(|i| format!("b/{i}")).collect();
    for t in &topics[..10] {
        c.propose(p, retained(t, "v"), T).await.unwrap();
    }
    // Node 4 joins behind a cut: the leader checkpoints, snapshots and adds it as a learner,
    // but the learner cannot ask for the snapshot yet.
    c.isolate(4, &[1, 2, 3, 4]);
    c.set_map(next);
    c.join(4);
    let deadline = Instant::now() + T;
    loop {
        let leader = c.leader(p).await;
        if let Some(s) = match leader {
            Some(l) => c.status(l, p).await,
            None => None,
        } {
            if s.learners.contains(&4) || s.voters.contains(&4) {
                break;
            }
        }
        assert!(Instant::now() < deadline, "node 4 never became a learner");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Writes after that checkpoint, then the learner is reached: its snapshot is built now.
    for t in &topics[10..] {
        c.propose(p, retained(t, "v"), T).await.unwrap();
    }
    c.heal();
    let deadline = Instant::now() + T;
    while c.status(4, p).await.is_none_or(|s| s.snapshot_index == 0) {
        assert!(Instant::now() < deadline, "node 4 got no snapshot");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for id in c.live() {
        c.crash(id).await;
    }
    for id in [1, 2, 3, 4] {
        c.start(id);
    }
    for id in [1, 2, 3, 4] {
        wait_retained(&c, id, p, &topics, T).await;
    }
}

/// What an install interrupted by a crash leaves behind on node 1 (single replica of
/// partition 0): the Raft storage took a snapshot at `last index + extra` whose image is
/// `data`, and the state machine's checkpoint is the older one. Returns the snapshot index.
fn store_snapshot_without_checkpoint(c: &Cluster, data: impl FnOnce(Partition) -> Vec<u8>) -> u64 {
    let db = open_db(&c.dirs[&1]);
    let storage = SledRaftStorage::open(&db, 0).unwrap();
    let store = PartitionStore::open(&db, 0).unwrap();
    let sm = store.recover(SessionLimits::default()).unwrap().partition;
    let last = raft::Storage::last_index(&storage).unwrap();
    let index = last + 3;
    let mut snap = Snapshot::default();
    let meta = snap.mut_metadata();
    meta.index = index;
    meta.term = storage.hard_state().term;
    meta.mut_conf_state().voters = vec![1];
    snap.data = data(sm).into();
    storage.apply_snapshot(snap).unwrap();
    storage.flush().unwrap();
    index
}

/// Issue 19, bug 1: the install of a leader's snapshot stores it in the Raft storage, then
/// checkpoints its image; a crash in between must not leave a replica whose Raft storage
/// claims a state its state machine lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_snapshot_install_is_completed_on_restart() {
    let mut c = Cluster::with_partitions(&[1], 1);
    c.wait_leaders(T).await;
    let topics: Vec<String> = (0..8).map(|i| format!("i/{i}")).collect();
    for t in &topics[..5] {
        c.propose(0, retained(t, "v"), T).await.unwrap();
    }
    c.stop(1).await;
    store_snapshot_without_checkpoint(&c, |mut sm| {
        // The leader's state: three writes more than this replica's checkpoint.
        let first = (sm.applied_index() >> 20) + 1;
        for (i, t) in topics[5..].iter().enumerate() {
            sm.apply(
                (first + i as u64) << 20,
                Entry {
                    now_ms: 0,
                    command: retained(t, "v"),
                },
            );
        }
        postcard::to_stdvec(&sm.image()).unwrap()
    });
    c.start(1);
    c.wait_leaders(T).await;
    wait_retained(&c, 1, 0, &topics, T).await;
    // And the repaired state is checkpointed: a second restart finds it as well.
    c.crash(1).await;
    c.start(1);
    wait_retained(&c, 1, 0, &topics, T).await;
}

/// Issue 19, bug 1: a stored snapshot newer than the checkpoint whose image cannot be decoded
/// leaves no state to run on: the node refuses to start rather than run without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_snapshot_newer_than_the_checkpoint_stops_the_start() {
    let mut c = Cluster::with_partitions(&[1], 1);
    c.wait_leaders(T).await;
    c.propose(0, retained("u/0", "v"), T).await.unwrap();
    c.stop(1).await;
    store_snapshot_without_checkpoint(&c, |_| b"not an image".to_vec());
    let db = open_db(&c.dirs[&1]);
    let started = start(
        RaftConfig::new(1),
        db,
        &c.map,
        Arc::new(Nowhere),
        ClusterHub::new(),
    );
    let Err(e) = started else {
        panic!("a replica without the state its raft storage claims was started");
    };
    assert!(e.to_string().contains("cannot be decoded"), "{e}");
}

/// A transport that delivers nothing.
struct Nowhere;

impl Transport for Nowhere {
    fn send(&self, _: NodeId, _: Vec<(u32, PeerMessage)>) {}
}

/// Issue 19, bug 2: a follower whose disk fails must not acknowledge entries it could not
/// store. With the leader's other follower cut off, the failing one is the only way to a
/// quorum: nothing may commit, and the failing node stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_cannot_persist_acknowledges_nothing() {
    let c = Cluster::new(&[1, 2, 3]);
    let leaders = c.wait_leaders(T).await;
    let p = 0;
    let leader = leaders[&p];
    c.propose(p, retained("d/0", "v"), T).await.unwrap();
    let followers: Vec<NodeId> = c.live().into_iter().filter(|&n| n != leader).collect();
    let (failing, cut) = (followers[0], followers[1]);
    c.net
        .cut
        .lock()
        .unwrap()
        .extend([(leader, cut), (cut, leader)]);
    let failing_node = c.handle(failing).unwrap();
    failing_node.disk_faults().set_failing(true);
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        c.handle(leader).unwrap().propose(p, retained("d/1", "v")),
    )
    .await;
    assert!(
        !matches!(r, Ok(Ok(_))),
        "committed on a quorum whose second copy could not be stored: {r:?}"
    );
    tokio::time::timeout(T, failing_node.stopped())
        .await
        .expect("the node that cannot persist is still running");
}

/// Issue 19, bug 2: a leader whose disk fails stops, and its proposers are told so rather
/// than acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_cannot_persist_fails_its_proposals() {
    let c = Cluster::new(&[1, 2, 3]);
    let leaders = c.wait_leaders(T).await;
    let p = 0;
    let leader = c.handle(leaders[&p]).unwrap();
    c.propose(p, retained("d/0", "v"), T).await.unwrap();
    leader.disk_faults().set_failing(true);
    let r = tokio::time::timeout(T, leader.propose(p, retained("d/1", "v")))
        .await
        .expect("a proposal to a leader that cannot persist hangs");
    assert_eq!(r, Err(ProposeError::Stopped));
    tokio::time::timeout(T, leader.stopped())
        .await
        .expect("the node that cannot persist is still running");
}

/// Issue 19, bug 5: the old leader committed a publish and delivered it, then died before the
/// follower that takes over learned the entry was committed. The new leader applies it in its
/// own term: it must not deliver it again as a new message (same packet id, no DUP flag) but,
/// once it has applied the entry, re-send the in-flight window as DUP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_does_not_repeat_the_old_leaders_deliveries() {
    // No Tick entries: the message filter below keys on the commit index.
    let mut c = Cluster::with_config(&[1, 2, 3], PARTITIONS, |c| {
        c.sm_tick_interval = Duration::from_secs(3600);
    });
    let leaders = c.wait_leaders(T).await;
    let p = 0;
    let old = leaders[&p];
    const FRONTEND: u64 = 77;
    let mut streams: HashMap<NodeId, _> = c
        .live()
        .into_iter()
        .map(|id| (id, c.handle(id).unwrap().attach_frontend(FRONTEND)))
        .collect();
    let client: Arc<str> = "sub".into();
    let Ok(Reply::Connected { epoch, .. }) = c
        .propose(
            p,
            Command::Connect {
                client_id: client.clone(),
                protocol: ProtocolVersion::V5,
                clean_start: true,
                session_expiry_secs: 600,
                receive_maximum: 10,
                will: None,
                frontend_id: FRONTEND,
                connection: 0,
            },
            T,
        )
        .await
    else {
        panic!("connect failed");
    };
    let sub = SubscribeRequest {
        filter: "t/#".into(),
        options: SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            ..Default::default()
        },
        subscription_id: None,
    };
    c.propose(
        p,
        Command::Subscribe {
            client_id: client.clone(),
            epoch,
            subscriptions: vec![sub],
        },
        T,
    )
    .await
    .unwrap();
    assert_eq!(c.leader(p).await, Some(old), "leadership moved early");
    // `heir` will hold the publish without learning that it committed; `other` not at all.
    let followers: Vec<NodeId> = c.live().into_iter().filter(|&n| n != old).collect();
    let (heir, other) = (followers[0], followers[1]);
    let k = c.status(old, p).await.unwrap().commit;
    c.net
        .cut
        .lock()
        .unwrap()
        .extend([(old, other), (other, old)]);
    *c.net.filter.lock().unwrap() = Some(Box::new(move |from, to, m| {
        from == old && to == heir && m.commit > k
    }));
    let message = Arc::new(Message::new("t/x", "m", QoS::AtLeastOnce, false));
    c.handle(old)
        .unwrap()
        .propose(
            p,
            Command::Publish {
                message,
                publisher: None,
                store_retained: false,
                inbound_qos2: None,
            },
        )
        .await
        .unwrap();
    let first = next_delivery(streams.get_mut(&old).unwrap()).await;
    assert!(!first.dup, "{first:?}");
    c.crash(old).await;
    *c.net.filter.lock().unwrap() = None;
    c.heal();
    let deadline = Instant::now() + T;
    while c.leader(p).await != Some(heir) {
        assert!(Instant::now() < deadline, "{heir} did not take over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = next_delivery(streams.get_mut(&heir).unwrap()).await;
    assert_eq!(again.packet_id, first.packet_id);
    assert!(
        again.dup,
        "the new leader delivered the old leader's message again as new: {again:?}"
    );
}

/// The next delivery on a frontend's event stream.
async fn next_delivery(rx: &mut UnboundedReceiver<FrontendEvent>) -> Delivery {
    loop {
        let event = tokio::time::timeout(T, rx.recv())
            .await
            .expect("no delivery in time")
            .expect("stream open");
        if let SessionEvent::Deliver(d) = event.event {
            return d;
        }
    }
}

/// Issue 19, bug 7: two changes of the membership record that read the same base (two nodes
/// that each believe they lead the metadata group; here two `Members` over one leader, which
/// interleaves their read and their proposal the same way) must not both commit a record with
/// the same epoch: the replicated entry is a compare-and-swap on the base.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_membership_changes_from_one_base_do_not_share_an_epoch() {
    // Partitions 0..2 and the metadata group, 2.
    let c = Cluster::with_partitions(&[1, 2, 3], 3);
    let leaders = c.wait_leaders(T).await;
    let meta = 2;
    let leader = c.handle(leaders[&meta]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let record = MemberRecord {
        epoch: 1,
        partitions: meta,
        replication: 3,
        members: (1..=3)
            .map(|id| (id, format!("127.0.0.1:{}", id)))
            .collect(),
    };
    let view = |name: &str| {
        let db = sled::open(tmp.path().join(name)).unwrap();
        let transport = GrpcTransport::start(leader.node_id(), &BTreeMap::new(), None);
        Members::new(
            leader.node_id(),
            db,
            leader.clone(),
            transport,
            None,
            record.clone(),
        )
        .unwrap()
    };
    let (a, b) = (view("a"), view("b"));
    let (ra, rb) = tokio::join!(
        a.change(vec![(4, "127.0.0.1:4".into())], Vec::new()),
        b.change(vec![(5, "127.0.0.1:5".into())], Vec::new()),
    );
    if let (Ok(ra), Ok(rb)) = (&ra, &rb) {
        assert_ne!(
            ra.epoch, rb.epoch,
            "two different records committed with one epoch: {ra:?} and {rb:?}"
        );
    }
    // Whatever was refused is retried from the record that won, and both changes land.
    let retried = match (ra, rb) {
        (Ok(_), Ok(r)) => r,
        (Ok(_), Err(_)) => b
            .change(vec![(5, "127.0.0.1:5".into())], Vec::new())
            .await
            .unwrap(),
        (Err(_), Ok(_)) => a
            .change(vec![(4, "127.0.0.1:4".into())], Vec::new())
            .await
            .unwrap(),
        (Err(ea), Err(eb)) => panic!("both changes failed: {ea:?}, {eb:?}"),
    };
    assert_eq!(retried.epoch, 3, "{retried:?}");
    assert!(retried.members.contains_key(&4) && retried.members.contains_key(&5));
}

//! The client following membership changes, against in-process fake backends: gRPC servers
//! on 127.0.0.1 that serve a membership record the test changes at will, answer operations
//! on the partitions the record says they lead (else `NotLeader` with the record's leader),
//! and count the streams the client keeps open to them.
//!
//! They stand in for the backends of issue 11 (join / remove / evict), so the client's side
//! is proven without them: a joined node learned from a hint at once, periodic re-reads, an
//! address change, a removed leader kept until it hands over, a refresh when every replica
//! fails, the metrics, and the tasks ending with the client.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64};

use futures::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::*;
use crate::broker::broker_server::{Broker, BrokerServer};
use crate::broker::{
    ChangeMembersReply, ChangeMembersRequest, EventBatch, Member, NotLeader, PartitionInfo,
    RouteUpdate, RoutesAckReply, TransferLeadershipReply, TransferLeadershipRequest,
};
use prometheus_client::encoding::DescriptorEncoder;
use tiermq_common::session_api::{ConnectRequest, SessionService, SubscribeRequest};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The membership record and leaders every fake node serves.
struct Record {
    epoch: u64,
    partitions: u32,
    members: BTreeMap<u64, String>,
    replicas: Vec<Vec<u64>>,
    leaders: Vec<u64>,
}

/// Shared by the fake nodes of one test; `changed` wakes their route streams.
struct FakeCluster {
    record: Mutex<Record>,
    changed: watch::Sender<u64>,
    /// Session semantics for the deaf-session test: a `Connect` is answered `Connected`
    /// (epoch 9), a `Qos2Check` `Fenced` once this is set (the session was detached).
    detached: AtomicBool,
    /// Bumped to end every open event stream (the frontend cut off for a while).
    cut_events: watch::Sender<u64>,
}

impl FakeCluster {
    fn new(partitions: u32) -> Arc<FakeCluster> {
        Arc::new(FakeCluster {
            record: Mutex::new(Record {
                epoch: 1,
                partitions,
                members: BTreeMap::new(),
                replicas: vec![Vec::new(); partitions as usize],
                leaders: vec![0; partitions as usize],
            }),
            changed: watch::channel(0).0,
            detached: AtomicBool::new(false),
            cut_events: watch::channel(0).0,
        })
    }

    /// The leader's answer to `kind`: the serving node's name, except for the session
    /// operations the deaf-session test makes.
    fn answer(&self, me: u64, kind: &Option<op::Kind>) -> Vec<u8> {
        let reply = match kind {
            Some(op::Kind::Command(b)) => match postcard::from_bytes::<Command>(b) {
                Ok(Command::Connect { .. }) => Reply::Connected {
                    epoch: 9,
                    session_present: false,
                },
                _ => return served_by(me),
            },
            Some(op::Kind::Query(b)) => match postcard::from_bytes::<Query>(b) {
                Ok(Query::Qos2Check { .. }) if self.detached.load(Ordering::Relaxed) => {
                    Reply::Fenced
                }
                Ok(Query::Qos2Check { .. }) => Reply::Qos2Received { duplicate: false },
                _ => return served_by(me),
            },
            _ => return served_by(me),
        };
        postcard::to_stdvec(&reply).unwrap()
    }

    fn change(&self, f: impl FnOnce(&mut Record)) {
        f(&mut self.record.lock().unwrap());
        self.changed.send_modify(|v| *v += 1);
    }

    fn info(&self, node_id: u64) -> ClusterInfo {
        let r = self.record.lock().unwrap();
        ClusterInfo {
            epoch: r.epoch,
            partitions: r.partitions,
            replication: 2,
            members: r
                .members
                .iter()
                .map(|(id, addr)| Member {
                    id: *id,
                    addr: addr.clone(),
                })
                .collect(),
            partition_info: (0..r.partitions)
                .map(|p| PartitionInfo {
                    partition: p,
                    replicas: r.replicas[p as usize].clone(),
                    leader: r.leaders[p as usize],
                    ..PartitionInfo::default()
                })
                .collect(),
            node_id,
            ..ClusterInfo::default()
        }
    }
}

/// What one fake node saw.
#[derive(Default)]
struct Seen {
    ops: AtomicU64,
    cluster_calls: AtomicU64,
    routes_open: AtomicI64,
    events_open: AtomicI64,
    events_opened: AtomicU64,
    /// true: route acknowledgements are answered without a lease (as a backend answers a
    /// watcher that is behind, or whose stream it has closed).
    refuse_leases: AtomicBool,
}

#[derive(Clone)]
struct FakeService {
    id: u64,
    cluster: Arc<FakeCluster>,
    seen: Arc<Seen>,
    /// true: the node is down (its streams end, calls fail).
    dead: watch::Receiver<bool>,
}

/// One fake backend: a gRPC server on 127.0.0.1.
struct FakeNode {
    addr: String,
    seen: Arc<Seen>,
    kill: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
}

impl FakeNode {
    /// Starts node `id` and makes it a member at its address (the epoch is the caller's).
    async fn start(cluster: &Arc<FakeCluster>, id: u64) -> FakeNode {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (kill, dead) = watch::channel(false);
        let seen = Arc::new(Seen::default());
        let service = FakeService {
            id,
            cluster: cluster.clone(),
            seen: seen.clone(),
            dead,
        };
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(BrokerServer::new(service))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await;
        });
        cluster
            .record
            .lock()
            .unwrap()
            .members
            .insert(id, addr.clone());
        FakeNode {
            addr,
            seen,
            kill,
            server,
        }
    }

    /// The node goes down: streams end, the port refuses connections.
    fn kill(&self) {
        self.kill.send_replace(true);
        self.server.abort();
    }

    fn ops(&self) -> u64 {
        self.seen.ops.load(Ordering::Relaxed)
    }

    fn streams(&self) -> (i64, i64) {
        (
            self.seen.routes_open.load(Ordering::Relaxed),
            self.seen.events_open.load(Ordering::Relaxed),
        )
    }
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Ends when the node dies.
async fn died(mut dead: watch::Receiver<bool>) {
    let _ = dead.wait_for(|d| *d).await;
}

fn stream_of<T: Send + 'static>(rx: mpsc::UnboundedReceiver<Result<T, Status>>) -> BoxStream<T> {
    Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

/// The answer a fake leader gives: its id, so a test sees who served.
fn served_by(id: u64) -> Vec<u8> {
    format!("node {id}").into_bytes()
}

#[tonic::async_trait]
impl Broker for FakeService {
    type OpsStream = BoxStream<OpReply>;
    type EventsStream = BoxStream<EventBatch>;
    type RoutesStream = BoxStream<RouteUpdate>;

    async fn ops(
        &self,
        request: Request<Streaming<Op>>,
    ) -> Result<Response<Self::OpsStream>, Status> {
        if *self.dead.borrow() {
            return Err(Status::unavailable("down"));
        }
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let op = tokio::select! {
                    m = inbound.message() => match m {
                        Ok(Some(op)) => op,
                        _ => return,
                    },
                    _ = died(me.dead.clone()) => {
                        let _ = tx.send(Err(Status::unavailable("down")));
                        return;
                    }
                };
                me.seen.ops.fetch_add(1, Ordering::Relaxed);
                let leader = me.cluster.record.lock().unwrap().leaders[op.partition as usize];
                let result = if leader == me.id {
                    op_reply::Result::Reply(me.cluster.answer(me.id, &op.kind))
                } else {
                    op_reply::Result::NotLeader(NotLeader { leader })
                };
                if op.id != 0 {
                    let _ = tx.send(Ok(OpReply {
                        id: op.id,
                        result: Some(result),
                    }));
                }
            }
        });
        Ok(Response::new(stream_of(rx)))
    }

    async fn events(
        &self,
        _request: Request<EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        if *self.dead.borrow() {
            return Err(Status::unavailable("down"));
        }
        let (tx, rx) = mpsc::unbounded_channel::<Result<EventBatch, Status>>();
        let me = self.clone();
        me.seen.events_open.fetch_add(1, Ordering::Relaxed);
        me.seen.events_opened.fetch_add(1, Ordering::Relaxed);
        let mut cut = me.cluster.cut_events.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                _ = tx.closed() => {}
                _ = cut.changed() => {
                    let _ = tx.send(Err(Status::unavailable("cut off")));
                }
                _ = died(me.dead.clone()) => {
                    let _ = tx.send(Err(Status::unavailable("down")));
                }
            }
            me.seen.events_open.fetch_sub(1, Ordering::Relaxed);
        });
        Ok(Response::new(stream_of(rx)))
    }

    async fn routes(
        &self,
        _request: Request<RoutesRequest>,
    ) -> Result<Response<Self::RoutesStream>, Status> {
        if *self.dead.borrow() {
            return Err(Status::unavailable("down"));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let me = self.clone();
        me.seen.routes_open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let mut changed = me.cluster.changed.subscribe();
            let mut leading: HashSet<u32> = HashSet::new();
            let mut seq = 0;
            loop {
                // Tell the watcher about every partition this node started or stopped leading.
                let now: HashSet<u32> = {
                    let r = me.cluster.record.lock().unwrap();
                    (0..r.partitions)
                        .filter(|p| r.leaders[*p as usize] == me.id)
                        .collect()
                };
                for p in now.symmetric_difference(&leading) {
                    seq += 1;
                    let _ = tx.send(Ok(RouteUpdate {
                        partition: *p,
                        leader: now.contains(p),
                        reset: true,
                        added: Vec::new(),
                        removed: Vec::new(),
                        seq,
                        term: 1,
                    }));
                }
                leading = now;
                tokio::select! {
                    _ = tx.closed() => break,
                    _ = died(me.dead.clone()) => {
                        let _ = tx.send(Err(Status::unavailable("down")));
                        break;
                    }
                    r = changed.changed() => if r.is_err() { break },
                }
            }
            me.seen.routes_open.fetch_sub(1, Ordering::Relaxed);
        });
        Ok(Response::new(stream_of(rx)))
    }

    async fn ack_routes(
        &self,
        _request: Request<RoutesAck>,
    ) -> Result<Response<RoutesAckReply>, Status> {
        let granted = !self.seen.refuse_leases.load(Ordering::Relaxed);
        Ok(Response::new(RoutesAckReply { granted }))
    }

    async fn cluster(
        &self,
        request: Request<ClusterRequest>,
    ) -> Result<Response<ClusterInfo>, Status> {
        if *self.dead.borrow() {
            return Err(Status::unavailable("down"));
        }
        assert!(
            !request.into_inner().members_only,
            "the client asks for the full record"
        );
        self.seen.cluster_calls.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(self.cluster.info(self.id)))
    }

    async fn transfer_leadership(
        &self,
        _request: Request<TransferLeadershipRequest>,
    ) -> Result<Response<TransferLeadershipReply>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn change_members(
        &self,
        _request: Request<ChangeMembersRequest>,
    ) -> Result<Response<ChangeMembersReply>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

async fn connect(nodes: &[&FakeNode], every: Duration) -> ClusterClient {
    let seeds: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    ClusterClient::connect_with(&seeds, 7, Duration::from_secs(5), None, every)
        .await
        .expect("client connects to the fake cluster")
}

/// One operation on `partition`; the answer names the node that served it.
async fn served(client: &ClusterClient, partition: u32) -> String {
    let bytes = client
        .transport()
        .call_op(partition, op::Kind::Command(Vec::new()))
        .await
        .expect("operation answered");
    String::from_utf8(bytes).unwrap()
}

/// Waits (at most `limit`) until `f` holds.
async fn until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn linked(client: &ClusterClient) -> BTreeMap<u64, String> {
    client
        .transport()
        .inner
        .nodes
        .read()
        .unwrap()
        .iter()
        .map(|(id, l)| (*id, l.addr.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_leader_named_in_a_hint_is_learned_at_once() {
    let cluster = FakeCluster::new(2);
    let n1 = FakeNode::start(&cluster, 1).await;
    let n2 = FakeNode::start(&cluster, 2).await;
    cluster.change(|r| {
        r.replicas = vec![vec![1, 2], vec![2, 1]];
        r.leaders = vec![1, 2];
    });
    // No periodic re-read during the test: only the hint can teach the client.
    let client = connect(&[&n1, &n2], Duration::from_secs(600)).await;
    assert_eq!(client.metrics().map_epoch(), 1);
    assert_eq!(served(&client, 1).await, "node 2");

    // Node 3 joins and takes partition 1 over.
    let n3 = FakeNode::start(&cluster, 3).await;
    cluster.change(|r| {
        r.epoch = 2;
        r.replicas[1] = vec![3, 2];
        r.leaders[1] = 3;
    });
    let started = Instant::now();
    assert_eq!(served(&client, 1).await, "node 3");
    let took = started.elapsed();
    eprintln!("operation after the join answered by the new node in {took:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(client.metrics().map_epoch(), 2);
    assert_eq!(client.metrics().map_refreshes("newer"), 1);
    assert_eq!(linked(&client).get(&3), Some(&n3.addr));
    // The new node got the same streams as the first ones.
    until(Duration::from_secs(5), "streams to node 3", || {
        n3.streams() == (1, 1)
    })
    .await;
    assert_eq!(
        client.transport().inner.replicas.read().unwrap()[1],
        vec![3, 2]
    );
    // Partition 0 never moved.
    assert_eq!(served(&client, 0).await, "node 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_reads_learn_joins_and_address_changes_and_end_with_the_client() {
    let cluster = FakeCluster::new(4);
    let n1 = FakeNode::start(&cluster, 1).await;
    let n2 = FakeNode::start(&cluster, 2).await;
    let n3 = FakeNode::start(&cluster, 3).await;
    cluster.change(|r| {
        r.replicas = vec![vec![1, 2], vec![2, 3], vec![3, 1], vec![1, 3]];
        r.leaders = vec![1, 2, 3, 1];
    });
    let client = connect(&[&n1], Duration::from_millis(200)).await;
    assert_eq!(linked(&client).len(), 3);
    for n in [&n1, &n2, &n3] {
        until(Duration::from_secs(5), "first streams", || {
            n.streams() == (1, 1)
        })
        .await;
    }
    until(Duration::from_secs(5), "every leader known", || {
        client.partitions_without_leader().is_empty()
    })
    .await;

    // Node 4 joins; node 2 comes back at another address (same id) and leads partition 1.
    let n4 = FakeNode::start(&cluster, 4).await;
    n2.kill();
    let n2b = FakeNode::start(&cluster, 2).await;
    assert_ne!(n2.addr, n2b.addr);
    cluster.change(|r| {
        r.epoch = 2;
        r.replicas[0] = vec![4, 1];
        r.leaders[0] = 4;
    });
    // No operation: the periodic read alone must find it.
    let started = Instant::now();
    until(Duration::from_secs(5), "epoch 2", || {
        client.metrics().map_epoch() == 2
    })
    .await;
    eprintln!("periodic read took up epoch 2 in {:?}", started.elapsed());
    let links = linked(&client);
    assert_eq!(links.get(&2), Some(&n2b.addr));
    assert_eq!(links.get(&4), Some(&n4.addr));
    for n in [&n2b, &n4] {
        until(Duration::from_secs(5), "streams to the new links", || {
            n.streams() == (1, 1)
        })
        .await;
    }
    until(Duration::from_secs(5), "routes known again", || {
        client.partitions_without_leader().is_empty()
    })
    .await;
    assert_eq!(served(&client, 0).await, "node 4");
    assert_eq!(served(&client, 1).await, "node 2");
    assert!(n2b.ops() >= 1);
    assert_eq!(client.metrics().map_refreshes("newer"), 1);

    // Reads rotate over the members.
    let calls = |n: &FakeNode| n.seen.cluster_calls.load(Ordering::Relaxed);
    let before: Vec<u64> = [&n1, &n3, &n4].iter().map(|n| calls(n)).collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let asked = [&n1, &n3, &n4]
        .iter()
        .zip(&before)
        .filter(|(n, b)| calls(n) > **b)
        .count();
    assert!(asked >= 2, "re-reads rotate over the members");
    assert!(client.metrics().map_refreshes("unchanged") >= 5);
    assert_eq!(client.metrics().map_refreshes("newer"), 1);

    // Dropping the client ends every task: streams close, the re-reads stop.
    drop(client);
    for n in [&n1, &n2b, &n3, &n4] {
        until(Duration::from_secs(5), "streams closed", || {
            n.streams() == (0, 0)
        })
        .await;
    }
    let total = || [&n1, &n2b, &n3, &n4].iter().map(|n| calls(n)).sum::<u64>();
    let after = total();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(total(), after, "no re-read after the client is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_leader_keeps_its_link_until_it_hands_over() {
    let cluster = FakeCluster::new(2);
    let n1 = FakeNode::start(&cluster, 1).await;
    let n2 = FakeNode::start(&cluster, 2).await;
    let n3 = FakeNode::start(&cluster, 3).await;
    cluster.change(|r| {
        r.replicas = vec![vec![1, 2], vec![2, 3]];
        r.leaders = vec![1, 2];
    });
    let client = connect(&[&n1, &n2, &n3], Duration::from_millis(200)).await;
    until(Duration::from_secs(5), "every leader known", || {
        client.partitions_without_leader().is_empty()
    })
    .await;

    // Node 1 is removed from the record while it still leads partition 0 (the move is
    // under way, its hand-off comes last).
    cluster.change(|r| {
        r.epoch = 2;
        r.members.remove(&1);
        r.replicas[0] = vec![2, 3];
    });
    until(Duration::from_secs(5), "epoch 2", || {
        client.metrics().map_epoch() == 2
    })
    .await;
    assert_eq!(client.metrics().map_members.get(), 2);
    // Still linked, still serving: it is the only node that can commit partition 0.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(linked(&client).contains_key(&1));
    assert_eq!(n1.streams(), (1, 1));
    assert_eq!(served(&client, 0).await, "node 1");

    // It hands partition 0 over: the client closes its link, operations follow the new leader.
    cluster.change(|r| r.leaders[0] = 2);
    until(Duration::from_secs(5), "link to node 1 closed", || {
        !linked(&client).contains_key(&1) && n1.streams() == (0, 0)
    })
    .await;
    assert_eq!(served(&client, 0).await, "node 2");
    assert!(client.partitions_without_leader().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_failing_triggers_a_read() {
    let cluster = FakeCluster::new(1);
    let n1 = FakeNode::start(&cluster, 1).await;
    let n2 = FakeNode::start(&cluster, 2).await;
    let n3 = FakeNode::start(&cluster, 3).await;
    cluster.change(|r| {
        r.replicas = vec![vec![1, 2]];
        r.leaders = vec![1];
    });
    let client = connect(&[&n1], Duration::from_secs(600)).await;
    assert_eq!(served(&client, 0).await, "node 1");

    // The partition moved to nodes 3 and 4 and both old replicas are gone; nothing names
    // the new leader to the client.
    let n4 = FakeNode::start(&cluster, 4).await;
    cluster.change(|r| {
        r.epoch = 2;
        r.members.remove(&1);
        r.members.remove(&2);
        r.replicas = vec![vec![4, 3]];
        r.leaders = vec![4];
    });
    n1.kill();
    n2.kill();
    let started = Instant::now();
    assert_eq!(served(&client, 0).await, "node 4");
    let took = started.elapsed();
    eprintln!("operation after losing every known replica answered in {took:?}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert_eq!(client.metrics().map_epoch(), 2);
    assert!(n3.seen.cluster_calls.load(Ordering::Relaxed) >= 1);
    assert_eq!(linked(&client).get(&4), Some(&n4.addr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_or_foreign_record_is_not_taken() {
    let cluster = FakeCluster::new(2);
    let n1 = FakeNode::start(&cluster, 1).await;
    cluster.change(|r| {
        r.epoch = 5;
        r.replicas = vec![vec![1], vec![1]];
        r.leaders = vec![1, 1];
    });
    let client = connect(&[&n1], Duration::from_secs(600)).await;
    let mut older = cluster.info(1);
    older.epoch = 4;
    older.members.push(Member {
        id: 9,
        addr: "127.0.0.1:1".into(),
    });
    assert_eq!(
        client.transport().inner.apply_info(&older),
        membership::Taken::Unchanged
    );
    let mut foreign = cluster.info(1);
    foreign.epoch = 6;
    foreign.partitions = 3;
    assert_eq!(
        client.transport().inner.apply_info(&foreign),
        membership::Taken::Refused
    );
    let mut partial = cluster.info(1);
    partial.epoch = 6;
    partial.partition_info.pop();
    assert_eq!(
        client.transport().inner.apply_info(&partial),
        membership::Taken::Refused
    );
    assert_eq!(client.metrics().map_epoch(), 5);
    assert_eq!(linked(&client).len(), 1);
}

#[test]
fn metrics_are_encoded_with_their_names() {
    use prometheus_client::collector::Collector;
    use prometheus_client::registry::Registry;

    #[derive(Debug)]
    struct Series(ClientMetrics);
    impl Collector for Series {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            self.0.encode(&mut encoder)
        }
    }
    let metrics = ClientMetrics::default();
    metrics.map_epoch.set(3);
    metrics.map_members.set(4);
    metrics
        .map_refreshes
        .get_or_create(&OutcomeLabel { outcome: "newer" })
        .inc();
    let mut registry = Registry::with_prefix("tiermq");
    registry.register_collector(Box::new(Series(metrics)));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for line in [
        "tiermq_cluster_map_epoch 3",
        "tiermq_cluster_map_members 4",
        "tiermq_cluster_map_refreshes_total{outcome=\"newer\"} 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing in:\n{text}"
        );
    }
}

/// A leader that lost this frontend's event stream for its lease detaches the frontend's
/// sessions (`FrontendLost`). When the stream comes back, the client must find those
/// sessions and close their connections — before this, they stayed open and deaf (found by
/// the deterministic simulation, `scripts/simulate`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_detached_while_cut_off_gets_its_connection_closed() {
    let cluster = FakeCluster::new(1);
    let n1 = FakeNode::start(&cluster, 1).await;
    cluster.change(|r| {
        r.replicas = vec![vec![1]];
        r.leaders = vec![1];
    });
    let client = connect(&[&n1], Duration::from_secs(600)).await;
    let mut connected = client
        .router()
        .connect(ConnectRequest {
            client_id: Arc::from("deaf"),
            protocol: tiermq_common::ProtocolVersion::V5,
            clean_start: false,
            session_expiry_secs: 3600,
            receive_maximum: 10,
            will: None,
            frontend_id: 0,
        })
        .await
        .expect("connected");
    until(Duration::from_secs(5), "the event stream", || {
        n1.seen.events_opened.load(Ordering::Relaxed) == 1
    })
    .await;

    // A cut that the session survives: the stream comes back, the connection stays.
    cluster.cut_events.send_modify(|v| *v += 1);
    until(Duration::from_secs(5), "the stream back", || {
        n1.seen.events_opened.load(Ordering::Relaxed) == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        connected.events.try_recv().is_err(),
        "an attached session keeps its connection"
    );

    // A cut during which the leader detached the session.
    cluster.detached.store(true, Ordering::Relaxed);
    cluster.cut_events.send_modify(|v| *v += 1);
    let event = tokio::time::timeout(Duration::from_secs(5), connected.events.recv())
        .await
        .expect("the connection is told within 5 s");
    assert_eq!(
        event,
        Some(SessionEvent::Disconnect {
            reason: ReasonCode::UNSPECIFIED_ERROR
        })
    );
}

/// Issue 19, bug 6: two CONNECTs of one client id on this frontend whose replies arrive in
/// the other order: the older epoch registering last must not replace the newer one (the
/// session would stay attached to a connection that no longer exists, and the new connection
/// would be deaf). The older connection is told it was taken over.
#[tokio::test]
async fn an_older_epoch_does_not_replace_a_newer_registration() {
    let cluster = FakeCluster::new(1);
    let n1 = FakeNode::start(&cluster, 1).await;
    let client = connect(&[&n1], Duration::from_secs(600)).await;
    let id: Arc<str> = "c".into();
    let (new_tx, mut new_rx) = mpsc::unbounded_channel();
    let (old_tx, mut old_rx) = mpsc::unbounded_channel();
    client.transport().register(&id, 9, new_tx);
    client.transport().register(&id, 4, old_tx);
    let live = client
        .transport()
        .inner
        .sessions
        .lock()
        .unwrap()
        .live
        .get(&id)
        .map(|(e, _)| *e);
    assert_eq!(live, Some(9), "the older connection replaced the newer one");
    assert_eq!(
        old_rx.try_recv().ok(),
        Some(SessionEvent::Disconnect {
            reason: ReasonCode::SESSION_TAKEN_OVER
        })
    );
    assert!(new_rx.try_recv().is_err());
}

/// A client of one node that leads each of 4 partitions, once it knows and trusts their
/// (empty) route tables: a publish on a new topic goes nowhere.
async fn one_node_leading_four_partitions() -> (Arc<FakeCluster>, FakeNode, ClusterClient) {
    let cluster = FakeCluster::new(4);
    let n1 = FakeNode::start(&cluster, 1).await;
    cluster.change(|r| {
        r.replicas = vec![vec![1]; 4];
        r.leaders = vec![1; 4];
    });
    let client = connect(&[&n1], Duration::from_secs(600)).await;
    until(
        Duration::from_secs(5),
        "routes of every partition trusted",
        || client.targets("t/x").is_empty(),
    )
    .await;
    (cluster, n1, client)
}

/// Issue 20, item 9: while a SUBSCRIBE is in flight its filters are routes of the subscriber's
/// partition, so a publish this frontend reads after the SUBSCRIBE goes there too (behind it
/// in the pipe) instead of missing it until the SUBACK; a SUBSCRIBE that fails leaves no route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_in_flight_routes_publishes_to_its_partition() {
    let (_cluster, _n1, client) = one_node_leading_four_partitions().await;
    let session = SessionRef {
        client_id: Arc::from("subscriber"),
        epoch: 9,
    };
    let home = partition_of("subscriber", client.partitions());
    let request = SubscribeRequest {
        filter: "t/+".into(),
        options: Default::default(),
        subscription_id: None,
    };
    let mut subscribing = Box::pin(client.subscribe(&session, vec![request]));
    // The first poll submits the SUBSCRIBE; its answer has not come back yet.
    assert!(futures::poll!(&mut subscribing).is_pending());
    assert_eq!(client.targets("t/x"), vec![home]);
    assert!(client.targets("u/x").is_empty());
    // The fake answers with something that is not a `Subscribed`: the SUBSCRIBE failed.
    assert!(subscribing.await.is_err());
    assert!(client.targets("t/x").is_empty());
}

/// Read your subscription without a window: a backend answers a SUBSCRIBE once every frontend
/// has acknowledged the new route or its route lease has run out. So a frontend whose renewals
/// are no longer granted (cut off from the acknowledgements, behind, or its stream closed on
/// the backend's side) must stop trusting that backend's table within the lease and send
/// publishes to its partitions whatever their topic — and trust it again once renewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_of_a_backend_that_grants_no_lease_are_not_trusted() {
    let (_cluster, n1, client) = one_node_leading_four_partitions().await;
    n1.seen.refuse_leases.store(true, Ordering::Relaxed);
    // The stream stays open and says nothing new; the lease alone runs out.
    until(
        route_lease::LEASE + Duration::from_secs(2),
        "routes no longer trusted",
        || client.targets("t/x").len() == 4,
    )
    .await;
    {
        let routes = client.transport().inner.routes.read().unwrap();
        assert!(
            (0..4).all(|p| routes.source(p).is_some()),
            "the stream is still open"
        );
    }
    n1.seen.refuse_leases.store(false, Ordering::Relaxed);
    until(Duration::from_secs(5), "routes trusted again", || {
        client.targets("t/x").is_empty()
    })
    .await;
}

/// A leader cut off from its group does not know it was deposed and may still send its
/// (stale) route table — e.g. a snapshot when a frontend's stream to it is re-opened. A
/// frontend that has taken routes from a leader of a later term ignores it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_of_a_deposed_leader_are_ignored() {
    let cluster = FakeCluster::new(2);
    let n1 = FakeNode::start(&cluster, 1).await;
    cluster.change(|r| {
        r.replicas = vec![vec![1, 2, 3]; 2];
        r.leaders = vec![0, 1];
    });
    let client = connect(&[&n1], Duration::from_secs(600)).await;
    let snapshot = |term: u64, filters: &[&str]| RouteUpdate {
        partition: 0,
        leader: true,
        reset: true,
        added: filters.iter().map(|f| f.to_string()).collect(),
        removed: Vec::new(),
        seq: 1,
        term,
    };
    let known = |client: &ClusterClient| {
        let routes = client.transport().inner.routes.read().unwrap();
        (routes.source(0), routes.filters_of(0))
    };
    apply_route_update(&client.transport().inner, 2, snapshot(5, &["t/#"]));
    assert_eq!(known(&client), (Some(2), vec!["t/#".to_string()]));
    // Node 3 led the partition in term 4 and still thinks so.
    apply_route_update(&client.transport().inner, 3, snapshot(4, &[]));
    assert_eq!(known(&client), (Some(2), vec!["t/#".to_string()]));
    // Node 2's stream breaks: the partition is unknown, and node 3's old table stays ignored.
    client.transport().inner.routes.write().unwrap().forget(2);
    apply_route_update(&client.transport().inner, 3, snapshot(4, &[]));
    assert_eq!(known(&client), (None, vec!["t/#".to_string()]));
    // Node 3 wins a later election: its table is taken.
    apply_route_update(&client.transport().inner, 3, snapshot(6, &["u/#"]));
    assert_eq!(known(&client), (Some(3), vec!["u/#".to_string()]));
}

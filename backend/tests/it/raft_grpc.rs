//! Three backend nodes in one process, talking Raft over real gRPC on loopback: leaders are
//! elected, commands replicate, a stopped node's partitions fail over, and the node catches
//! up when it comes back on a new server.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tiermq_backend::partition::command::{Command, Reply};
use tiermq_backend::placement::{NodeId, PartitionMap, DEFAULT_VNODES};
use tiermq_backend::raft::node::{self, RaftConfig, RaftHandle};
use tiermq_backend::raft::transport::{GrpcTransport, RaftService};
use tiermq_common::{Message, QoS};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const PARTITIONS: u32 = 3;

struct Node {
    handle: RaftHandle,
    stop_server: Option<oneshot::Sender<()>>,
}

fn open_db(path: &Path) -> sled::Db {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match sled::Config::new().path(path).flush_every_ms(None).open() {
            Ok(db) => return db,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("{e}"),
        }
    }
}

async fn start_node(
    id: NodeId,
    listener: TcpListener,
    peers: &BTreeMap<NodeId, String>,
    map: &PartitionMap,
    dir: &Path,
) -> Node {
    let mut config = RaftConfig::new(id);
    config.tick_interval = Duration::from_millis(30);
    let transport = GrpcTransport::start(id, peers, None);
    let handle = node::start(
        config,
        open_db(dir),
        map,
        transport,
        node::ClusterHub::new(),
    )
    .unwrap();
    let service = RaftService::new(id, handle.clone());
    let (tx, rx) = oneshot::channel::<()>();
    let incoming = futures::stream::unfold(listener, |l| async move {
        Some((l.accept().await.map(|(s, _)| s), l))
    });
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            })
            .await;
    });
    Node {
        handle,
        stop_server: Some(tx),
    }
}

async fn leader_of(nodes: &BTreeMap<NodeId, Node>, p: u32) -> Option<RaftHandle> {
    for n in nodes.values() {
        if n.handle.status(p).await.is_some_and(|s| s.is_leader) {
            return Some(n.handle.clone());
        }
    }
    None
}

async fn propose(nodes: &BTreeMap<NodeId, Node>, p: u32, topic: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(h) = leader_of(nodes, p).await {
            let cmd = Command::Publish {
                message: Arc::new(Message::new(topic, "v", QoS::AtLeastOnce, true)),
                publisher: None,
                store_retained: true,
                inbound_qos2: None,
            };
            if let Ok(Ok(Reply::Published { .. })) =
                tokio::time::timeout(Duration::from_secs(2), h.propose(p, cmd)).await
            {
                return;
            }
        }
        assert!(Instant::now() < deadline, "could not commit {topic}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn images_agree(nodes: &BTreeMap<NodeId, Node>, p: u32) -> bool {
    let mut images = Vec::new();
    for n in nodes.values() {
        images.push(n.handle.image(p).await);
    }
    images.windows(2).all(|w| w[0] == w[1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_over_grpc_replicate_fail_over_and_catch_up() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = [1u64, 2, 3];
    let mut listeners = BTreeMap::new();
    let mut peers = BTreeMap::new();
    for id in ids {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        peers.insert(id, l.local_addr().unwrap().to_string());
        listeners.insert(id, l);
    }
    let map = PartitionMap::compute(1, &ids, PARTITIONS, 3, DEFAULT_VNODES);
    let mut nodes = BTreeMap::new();
    for (id, l) in listeners {
        let dir = tmp.path().join(format!("n{id}"));
        nodes.insert(id, start_node(id, l, &peers, &map, &dir).await);
    }
    for p in 0..PARTITIONS {
        for i in 0..10 {
            propose(&nodes, p, &format!("p{p}/{i}")).await;
        }
    }
    // Stop the leader of partition 0: its server and its driver.
    let victim = leader_of(&nodes, 0).await.unwrap().node_id();
    let mut n = nodes.remove(&victim).unwrap();
    n.stop_server.take();
    n.handle.stop().await;
    for p in 0..PARTITIONS {
        propose(&nodes, p, &format!("p{p}/after")).await;
    }
    // Bring it back on the same address and data folder; it catches up.
    let addr = peers[&victim].clone();
    let listener = loop {
        match TcpListener::bind(&addr).await {
            Ok(l) => break l,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let dir = tmp.path().join(format!("n{victim}"));
    nodes.insert(
        victim,
        start_node(victim, listener, &peers, &map, &dir).await,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    for p in 0..PARTITIONS {
        while !images_agree(&nodes, p).await {
            if Instant::now() >= deadline {
                let mut st = Vec::new();
                for n in nodes.values() {
                    st.push(n.handle.status(p).await);
                }
                panic!("partition {p} did not converge: {st:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let image: tiermq_backend::partition::PartitionImage =
        postcard::from_bytes(&nodes[&victim].handle.image(0).await.unwrap()).unwrap();
    assert_eq!(
        image.retained.len(),
        11,
        "the restarted node has every committed command"
    );
    for n in nodes.values_mut() {
        n.stop_server.take();
        n.handle.stop().await;
    }
}

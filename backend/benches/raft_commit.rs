//! Raft commit throughput and latency: 3 backend nodes in one process, real gRPC over
//! loopback, real sled databases with fsync, 1 and 16 partitions.
//!
//! `cargo bench -p tiermq-backend --bench raft_commit` (env: `RAFT_BENCH_SECS`, default 5;
//! `RAFT_BENCH_CONCURRENCY`, default 512 proposals in flight).
//!
//! It prints, per scenario: committed commands/s, p50/p99/max commit latency, commands per
//! Raft entry and per fsync — and the raw fsync rate of the disk, measured first, so the
//! batching gain is visible.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tiermq_backend::partition::command::Command;
use tiermq_backend::placement::{PartitionMap, DEFAULT_VNODES};
use tiermq_backend::raft::node::{self, ProposeError, RaftConfig, RaftHandle};
use tiermq_backend::raft::transport::{GrpcTransport, RaftService};
use tiermq_common::{Message, QoS};

fn fsync_rate(dir: &std::path::Path) -> f64 {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = vec![7u8; 4096];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(1) {
        f.write_all(&block).unwrap();
        f.sync_data().unwrap();
        n += 1;
    }
    let _ = std::fs::remove_file(path);
    n as f64 / start.elapsed().as_secs_f64()
}

struct Node {
    handle: RaftHandle,
    stop: tokio_util_stop::Stop,
}

/// A tiny stop signal (no extra dependency): dropping the sender ends the server.
mod tokio_util_stop {
    pub struct Stop(pub Option<tokio::sync::oneshot::Sender<()>>);
}

async fn start_cluster(dir: &std::path::Path, partitions: u32) -> (Vec<Node>, PartitionMap) {
    let ids = [1u64, 2, 3];
    let mut listeners = Vec::new();
    let mut peers = BTreeMap::new();
    for id in ids {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        peers.insert(id, l.local_addr().unwrap().to_string());
        listeners.push((id, l));
    }
    let map = PartitionMap::compute(1, &ids, partitions, 3, DEFAULT_VNODES);
    let mut nodes = Vec::new();
    for (id, listener) in listeners {
        let db = sled::Config::new()
            .path(dir.join(format!("n{id}-{partitions}")))
            .flush_every_ms(None)
            .mode(sled::Mode::HighThroughput)
            .open()
            .unwrap();
        let transport = GrpcTransport::start(id, &peers, None);
        let handle = node::start(
            RaftConfig::new(id),
            db,
            &map,
            transport,
            node::ClusterHub::new(),
        )
        .unwrap();
        let service = RaftService::new(id, handle.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let incoming = futures::stream::unfold(listener, |l| async move {
            let r = l.accept().await.map(|(s, _)| {
                let _ = s.set_nodelay(true);
                s
            });
            Some((r, l))
        });
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await;
        });
        nodes.push(Node {
            handle,
            stop: tokio_util_stop::Stop(Some(tx)),
        });
    }
    (nodes, map)
}

async fn leaders(nodes: &[Node], partitions: u32) -> Vec<RaftHandle> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut out = Vec::new();
        for p in 0..partitions {
            for n in nodes {
                if n.handle.status(p).await.is_some_and(|s| s.is_leader) {
                    out.push(n.handle.clone());
                    break;
                }
            }
        }
        if out.len() == partitions as usize {
            return out;
        }
        assert!(Instant::now() < deadline, "no leaders");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn command(i: u64) -> Command {
    Command::Publish {
        message: Arc::new(Message::new(
            format!("bench/{}", i % 1000),
            vec![0u8; 64],
            QoS::AtLeastOnce,
            false,
        )),
        publisher: None,
        store_retained: false,
        inbound_qos2: None,
    }
}

async fn scenario(dir: &std::path::Path, partitions: u32, secs: u64, concurrency: usize) {
    let (mut nodes, _map) = start_cluster(dir, partitions).await;
    let leaders = Arc::new(leaders(&nodes, partitions).await);
    let before: Vec<(u64, u64, u64)> = nodes
        .iter()
        .map(|n| {
            let s = n.handle.stats();
            (
                s.commands.load(Ordering::Relaxed),
                s.entries.load(Ordering::Relaxed),
                s.flushes.load(Ordering::Relaxed),
            )
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let leaders = leaders.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = w as u64;
            while Instant::now() < deadline {
                let p = (i % partitions as u64) as usize;
                let t = Instant::now();
                match leaders[p].propose(p as u32, command(i)).await {
                    Ok(_) => lat.push(t.elapsed().as_micros() as u64),
                    Err(ProposeError::NotLeader { .. }) | Err(ProposeError::Dropped) => {}
                    Err(e) => panic!("{e}"),
                }
                i += concurrency as u64;
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)] as f64 / 1000.0;
    let (mut cmds, mut entries, mut flushes) = (0, 0, 0);
    for (n, b) in nodes.iter().zip(&before) {
        let s = n.handle.stats();
        cmds += s.commands.load(Ordering::Relaxed) - b.0;
        entries += s.entries.load(Ordering::Relaxed) - b.1;
        flushes += s.flushes.load(Ordering::Relaxed) - b.2;
    }
    println!(
        "| {partitions:>2} | {:>9.0} | {:>6.2} | {:>6.2} | {:>7.2} | {:>6.1} | {:>6.1} |",
        lat.len() as f64 / elapsed,
        pct(0.50),
        pct(0.99),
        *lat.last().unwrap() as f64 / 1000.0,
        cmds as f64 / entries.max(1) as f64,
        // Every node fsyncs its own log: commands committed per fsync of one node.
        lat.len() as f64 / (flushes.max(1) as f64 / 3.0),
    );
    for n in &mut nodes {
        n.handle.stop().await;
        n.stop.0.take();
    }
}

fn main() {
    let secs: u64 = std::env::var("RAFT_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let concurrency: usize = std::env::var("RAFT_BENCH_CONCURRENCY")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(512);
    let dir = tempfile::tempdir().unwrap();
    println!(
        "raw fsync rate of this disk: {:.0}/s (4 KiB write + fdatasync)",
        fsync_rate(dir.path())
    );
    println!("3 nodes, R=3, gRPC on loopback, sled + fsync, {concurrency} proposals in flight, {secs}s each");
    println!("| P | commits/s | p50 ms | p99 ms | max ms | cmds/entry | cmds/fsync |");
    println!("|---|---|---|---|---|---|---|");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for partitions in [1, 16] {
            scenario(dir.path(), partitions, secs, concurrency).await;
        }
    });
}

//! Horizontal scaling of the backend tier, multi-process (issue 11): a 3-backend cluster
//! grows to 5 (`tiermq backend --join`) and shrinks to 4 (`tiermq cluster remove-node`) while
//! the durability checker (`tiermq check`) runs QoS1/QoS2 traffic through both frontends.
//! Every acknowledged message must arrive, in order, nothing unexpected; retained messages
//! and an offline persistent session made before the moves must still be there after them.
//!
//! The test also measures what docs/scaling.md records: time for each rebalance to settle,
//! replicas moved vs the ideal, leaders per node after, and the publish latency (QoS1 PUBACK
//! round trip through a frontend) in steady state vs during the moves. It prints them as
//! `scaling:` lines (`cargo test --test it scaling:: -- --nocapture`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::cluster::{ClusterOpts, ProcCluster};
use crate::support::*;
use tiermq_backend::placement::{PartitionMap, DEFAULT_VNODES};
use tiermq_common::codec::{Connect, Packet, Subscribe};
use tiermq_common::{ProtocolVersion, QoS, ReasonCode};
use tokio::process::{Child, Command};
use tokio::time::Instant;

const V5: ProtocolVersion = ProtocolVersion::V5;
const PARTITIONS: u32 = 8;

/// A backend started with `--join`, killed when dropped.
struct Joined {
    id: u64,
    addr: SocketAddr,
    child: Child,
}

async fn join_backend(c: &ProcCluster, id: u64) -> Joined {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let seeds: Vec<String> = c.backends.iter().map(|b| b.addr.to_string()).collect();
    let log = std::fs::File::create(c.dir().join(format!("backend-{id}.log"))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_tiermq"))
        .args(["backend", "--node-id", &id.to_string()])
        .args(["--grpc-listen", &addr.to_string()])
        .args(["--advertise", &addr.to_string()])
        .args(["--join", &seeds.join(",")])
        .arg("--data-dir")
        .arg(c.dir().join(format!("data-{id}")))
        .args(["--metrics-listen", ""])
        .env("TIERMQ_LOG", "info,slog=warn")
        .env_remove("RUST_LOG")
        .env_remove("TIERMQ_CONFIG")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn joining backend");
    Joined { id, addr, child }
}

/// Every member's gRPC address as the cluster lists it now.
async fn member_addrs(c: &ProcCluster) -> Vec<String> {
    let status = c.status().await.expect("cluster answers");
    status.members.iter().map(|m| m.addr.clone()).collect()
}

/// Waits until the cluster is on membership `epoch` (or later) with `members` members and
/// every partition's voters are that map's replicas; returns how long it took.
async fn wait_settled(c: &ProcCluster, epoch: u64, members: usize, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if let Some(s) = c.status().await {
            if s.epoch >= epoch && s.members.len() == members {
                let addrs: Vec<String> = s.members.iter().map(|m| m.addr.clone()).collect();
                let pending =
                    tiermq::membership_cli::unsettled_partitions(&addrs, epoch, None).await;
                if pending.is_empty() {
                    return started.elapsed();
                }
            }
        }
        assert!(
            started.elapsed() < within,
            "not settled on epoch {epoch} with {members} members within {within:?}:\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Groups (partitions and the metadata group) each member leads.
async fn leaders_per_node(c: &ProcCluster) -> BTreeMap<u64, usize> {
    tiermq::membership_cli::leaders_per_node(&member_addrs(c).await, None).await
}

/// Replicas (partitions and the metadata group) each member holds, as it says itself.
async fn replicas_per_node(c: &ProcCluster) -> BTreeMap<u64, usize> {
    let mut out = BTreeMap::new();
    for addr in member_addrs(c).await {
        if let Ok(i) = tiermq::cluster_cli::cluster_info(&addr, Duration::from_secs(3), None).await
        {
            let held = i
                .partition_info
                .iter()
                .chain(i.metadata_group.iter())
                .filter(|pi| pi.local_replica)
                .count();
            out.insert(i.node_id, held);
        }
    }
    out
}

/// QoS1 PUBACK round trips through `fe`, tagged with the phase they were sent in.
#[derive(Default)]
struct Latencies {
    phase: &'static str,
    samples: Vec<(&'static str, Duration)>,
    stop: bool,
}

async fn latency_probe(fe: SocketAddr, shared: Arc<Mutex<Latencies>>) {
    let mut raw = Raw::v5(fe, "scaling-latency").await;
    let mut id: u16 = 0;
    loop {
        let phase = {
            let l = shared.lock().unwrap();
            if l.stop {
                return;
            }
            l.phase
        };
        id = id.wrapping_add(1).max(1);
        let sent = Instant::now();
        raw.send(&Packet::Publish(publish_packet(
            "scaling/latency",
            QoS::AtLeastOnce,
            Some(id),
            b"x",
        )))
        .await;
        match raw.recv_within(Duration::from_secs(30)).await {
            Recv::Packet(Packet::PubAck(_)) => {
                shared.lock().unwrap().samples.push((phase, sent.elapsed()));
            }
            other => panic!("latency probe: expected PUBACK, got {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn percentile(mut v: Vec<Duration>, q: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

fn persistent(c: &mut Connect) {
    c.clean_start = false;
    c.properties.session_expiry_interval = Some(600);
}

fn ideal_moves(from: &[u64], to: &[u64]) -> (usize, f64) {
    let a = PartitionMap::compute_with_metadata(1, from, PARTITIONS, 3, DEFAULT_VNODES);
    let b = PartitionMap::compute_with_metadata(2, to, PARTITIONS, 3, DEFAULT_VNODES);
    let groups = f64::from(a.groups());
    // A join moves R·G/B' replicas onto the new nodes; a removal moves the R·G/B it held.
    let (small, big) = (from.len().min(to.len()), from.len().max(to.len()));
    let changed = (big - small) as f64;
    let ideal = 3.0 * groups * changed
        / if to.len() > from.len() {
            big
        } else {
            small + 1
        } as f64;
    (a.moved_replicas(&b), ideal)
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// 3 → 5 → 4 backends under the checker's traffic: zero lost, zero out of order, zero
/// unexpected; sessions and retained messages survive; the numbers for docs/scaling.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_scale_3_5_4_under_traffic_losing_nothing() {
    let mut c = ProcCluster::start_with(ClusterOpts {
        partitions: PARTITIONS,
        ..ClusterOpts::default()
    })
    .await;

    // Before: retained messages on every partition, an offline persistent session.
    let mut publisher = Raw::v5(c.fe(0), "scaling-setup").await;
    for i in 0..16u16 {
        let mut p = publish_packet(&format!("keep/{i}"), QoS::AtLeastOnce, Some(i + 1), b"kept");
        p.retain = true;
        publisher.send(&Packet::Publish(p)).await;
        assert!(matches!(publisher.recv().await, Packet::PubAck(_)));
    }
    let (mut session, ack) = Raw::connect(c.fe(1), V5, "scaling-session", persistent).await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    session
        .send(&Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![("sess/#".into(), sub_opts(QoS::AtLeastOnce))],
            properties: Default::default(),
        }))
        .await;
    assert!(matches!(session.recv().await, Packet::SubAck(_)));
    drop(session);

    // The checker: QoS1 and QoS2 publishers through frontend 1, persistent subscribers
    // through frontend 2, for the whole scaling run.
    let check_out = c.dir().join("check.out");
    let mut checker = Command::new(env!("CARGO_BIN_EXE_tiermq"))
        .args(["check", "--frontends"])
        .arg(format!("{},{}", c.fe(0), c.fe(1)))
        .args(["--publishers", "4", "--subscribers", "2", "--rate", "25"])
        .args(["--duration", "55s", "--drain", "60s"])
        .stdout(std::fs::File::create(&check_out).unwrap())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn tiermq check");

    let lat = Arc::new(Mutex::new(Latencies {
        phase: "steady",
        ..Latencies::default()
    }));
    let probe = tokio::spawn(latency_probe(c.fe(0), lat.clone()));
    tokio::time::sleep(Duration::from_secs(8)).await;

    // 3 → 5: two nodes join.
    lat.lock().unwrap().phase = "join";
    let epoch0 = c.status().await.unwrap().epoch;
    let joined_at = Instant::now();
    let mut n4 = join_backend(&c, 4).await;
    let n5 = join_backend(&c, 5).await;
    let join_time = wait_settled(&c, epoch0 + 2, 5, Duration::from_secs(90)).await;
    let join_total = joined_at.elapsed();
    lat.lock().unwrap().phase = "after-join";
    // Leaders are rebalanced within a few seconds of settling.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let leaders_5 = leaders_per_node(&c).await;
    let replicas_5 = replicas_per_node(&c).await;

    // Messages for the offline session while the map changes.
    for i in 0..5u16 {
        publisher
            .send(&Packet::Publish(publish_packet(
                &format!("sess/{i}"),
                QoS::AtLeastOnce,
                Some(100 + i),
                format!("queued {i}").as_bytes(),
            )))
            .await;
        assert!(matches!(publisher.recv().await, Packet::PubAck(_)));
    }

    // 5 → 4: node 4 is removed (its replicas move first), then stopped.
    lat.lock().unwrap().phase = "remove";
    let addrs = member_addrs(&c).await;
    let removed_at = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_tiermq"))
        .args(["cluster", "remove-node", "4", "--backend"])
        .arg(&addrs[0])
        .args(["--timeout", "120s"])
        .output()
        .await
        .expect("run tiermq cluster remove-node");
    let remove_time = removed_at.elapsed();
    assert!(
        out.status.success(),
        "remove-node failed: {}\n{}\nnode 4 log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        tail(&c.dir().join("backend-4.log"))
    );
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(said.contains("node 4 removed"), "{said}");
    let _ = n4.child.kill().await;
    lat.lock().unwrap().phase = "after-remove";
    tokio::time::sleep(Duration::from_secs(4)).await;
    let leaders_4 = leaders_per_node(&c).await;
    let replicas_4 = replicas_per_node(&c).await;
    let status = c.status().await.unwrap();
    assert_eq!(
        status.members.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![1, 2, 3, 5]
    );

    // The checker's verdict.
    let exit = tokio::time::timeout(Duration::from_secs(180), checker.wait())
        .await
        .expect("checker ends")
        .expect("checker status");
    lat.lock().unwrap().stop = true;
    let _ = probe.await;
    let report = std::fs::read_to_string(&check_out).unwrap_or_default();
    assert!(exit.success(), "checker failed:\n{report}\n{}", c.logs());

    // After: retained messages and the persistent session are all reachable.
    let mut reader = Raw::v5(c.fe(1), "scaling-reader").await;
    reader
        .send(&Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![("keep/#".into(), sub_opts(QoS::AtLeastOnce))],
            properties: Default::default(),
        }))
        .await;
    let mut kept = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while kept.len() < 16 && Instant::now() < deadline {
        if let Recv::Packet(Packet::Publish(p)) = reader.recv_within(Duration::from_secs(5)).await {
            if p.topic.starts_with("keep/") {
                kept.insert(p.topic.clone());
            }
        }
    }
    assert_eq!(kept.len(), 16, "retained messages after scaling: {kept:?}");
    let (mut session, ack) = Raw::connect(c.fe(0), V5, "scaling-session", persistent).await;
    assert!(
        ack.session_present,
        "the persistent session survived the moves"
    );
    let mut queued = Vec::new();
    while queued.len() < 5 {
        match session.recv_within(Duration::from_secs(10)).await {
            Recv::Packet(Packet::Publish(p)) => {
                if let Some(id) = p.packet_id {
                    session
                        .send(&Packet::PubAck(tiermq_common::codec::PubAck::new(id)))
                        .await;
                }
                queued.push(String::from_utf8_lossy(&p.payload).to_string());
            }
            other => panic!("queued messages: got {other:?} after {queued:?}"),
        }
    }
    assert_eq!(
        queued,
        (0..5).map(|i| format!("queued {i}")).collect::<Vec<_>>()
    );

    // The numbers.
    let samples = std::mem::take(&mut lat.lock().unwrap().samples);
    let phase = |names: &[&str]| -> Vec<Duration> {
        samples
            .iter()
            .filter(|(p, _)| names.contains(p))
            .map(|(_, d)| *d)
            .collect()
    };
    let steady = phase(&["steady", "after-join", "after-remove"]);
    let moving = phase(&["join", "remove"]);
    let (moved_join, ideal_join) = ideal_moves(&[1, 2, 3], &[1, 2, 3, 4, 5]);
    let (moved_remove, ideal_remove) = ideal_moves(&[1, 2, 3, 4, 5], &[1, 2, 3, 5]);
    let summary = report
        .lines()
        .filter(|l| l.contains("lost") || l.contains("acked") || l.contains("duplicate"))
        .collect::<Vec<_>>()
        .join(" | ");
    println!(
        "scaling: 3→5 settled in {:.1} s after the joins started ({:.1} s incl. start); replicas moved {moved_join} (ideal R·G·k/B' = {ideal_join:.1}); replicas per node {replicas_5:?}; leaders per node {leaders_5:?}",
        join_time.as_secs_f64(),
        join_total.as_secs_f64()
    );
    println!(
        "scaling: 5→4 remove-node 4 done in {:.1} s; replicas moved {moved_remove} (ideal R·G/B = {ideal_remove:.1}); replicas per node {replicas_4:?}; leaders per node {leaders_4:?}",
        remove_time.as_secs_f64()
    );
    println!(
        "scaling: QoS1 publish latency p50/p99/max: steady {:?}/{:?}/{:?} ({} samples), during moves {:?}/{:?}/{:?} ({} samples)",
        percentile(steady.clone(), 0.5),
        percentile(steady.clone(), 0.99),
        percentile(steady.clone(), 1.0),
        steady.len(),
        percentile(moving.clone(), 0.5),
        percentile(moving.clone(), 0.99),
        percentile(moving.clone(), 1.0),
        moving.len()
    );
    println!("scaling: checker: {summary}");
    for (id, leaders) in &leaders_4 {
        assert!(*leaders > 0, "node {id} leads nothing after the rebalance");
    }
    let max = leaders_4.values().max().unwrap();
    let min = leaders_4.values().min().unwrap();
    assert!(
        max - min <= 1,
        "leaders not balanced within one: {leaders_4:?}"
    );

    // Evict: refused while node 5 answers; refused when a partition would lose its quorum
    // (node 3 down too); done once node 3 is back, and every group has 3 voters again.
    let first_backend = c.backends[0].addr.to_string();
    let evict = |extra: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tiermq"));
        cmd.args(["cluster", "evict", "5", "--backend"])
            .arg(&first_backend)
            .args(["--timeout", "90s"])
            .args(extra);
        cmd
    };
    let alive = evict(&[]).output().await.unwrap();
    assert_eq!(alive.status.code(), Some(3), "{alive:?}");
    assert!(String::from_utf8_lossy(&alive.stderr).contains("still answers"));
    let mut n5 = n5;
    let _ = n5.child.kill().await;
    c.kill9_backend(2);
    let groups_with_3_and_5 = {
        let map =
            PartitionMap::compute_with_metadata(9, &[1, 2, 3, 5], PARTITIONS, 3, DEFAULT_VNODES);
        (0..map.groups())
            .filter(|&p| map.replicas_of(p).contains(&3) && map.replicas_of(p).contains(&5))
            .count()
    };
    let no_quorum = evict(&[]).output().await.unwrap();
    if groups_with_3_and_5 > 0 {
        assert_eq!(no_quorum.status.code(), Some(3), "{no_quorum:?}");
        assert!(String::from_utf8_lossy(&no_quorum.stderr).contains("without a live majority"));
    }
    c.restart_backend(2);
    let node3 = c.backends[2].addr.to_string();
    let back_by = Instant::now() + Duration::from_secs(30);
    while tiermq::cluster_cli::cluster_info(&node3, Duration::from_secs(1), None)
        .await
        .is_err()
    {
        assert!(Instant::now() < back_by, "node 3 did not come back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let evicted_at = Instant::now();
    let out = evict(&[]).output().await.unwrap();
    let evict_time = evicted_at.elapsed();
    assert!(
        out.status.success(),
        "evict failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let addrs = member_addrs(&c).await;
    assert_eq!(addrs.len(), 3);
    for addr in &addrs {
        let info = tiermq::cluster_cli::cluster_info(addr, Duration::from_secs(3), None)
            .await
            .unwrap();
        for pi in info.partition_info.iter().chain(info.metadata_group.iter()) {
            if pi.local_replica && pi.leader == info.node_id {
                let mut voters = pi.voters.clone();
                voters.sort_unstable();
                assert_eq!(
                    voters,
                    vec![1, 2, 3],
                    "partition {} after evict",
                    pi.partition
                );
            }
        }
    }
    println!(
        "scaling: evict 5 (dead) done in {:.1} s; every group back to 3 voters; refused while alive and while a quorum was down ({groups_with_3_and_5} groups held 3 and 5)",
        evict_time.as_secs_f64()
    );
    let _ = (n4.id, n4.addr, n5.id, n5.addr);
}

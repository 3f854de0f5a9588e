//! The frontend's cluster client follows membership changes (issue 11) in a process cluster:
//! a fourth backend joins (`tiermq backend --join`) and one of the first three is removed
//! (`tiermq cluster remove-node`) while QoS1 traffic flows through the frontend. The
//! frontend's `/metrics` shows each new record epoch, the joined node ends up leading
//! partitions the frontend sends to, and every acknowledged message reaches every subscriber.
//! (The client's side alone, against fake backends: `proto/src/client/tests.rs`.)

use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::cluster::{ClusterOpts, ProcCluster};
use crate::support::*;
use tiermq_common::codec::Packet;
use tiermq_common::QoS;
use tokio::time::Instant;

/// A backend process this test starts itself (the harness starts the bootstrap members);
/// killed when dropped, and with the test process (`PR_SET_PDEATHSIG`).
struct Joined(Child);

impl Drop for Joined {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_joining_backend(c: &ProcCluster, id: u64, grpc: SocketAddr) -> Joined {
    let log = std::fs::File::create(c.dir().join(format!("backend-{id}.log"))).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tiermq"));
    cmd.args(["backend", "--node-id", &id.to_string()])
        .args(["--grpc-listen", &grpc.to_string()])
        .args(["--advertise", &grpc.to_string()])
        .args(["--join", &c.backends[0].addr.to_string()])
        .arg("--data-dir")
        .arg(c.dir().join(format!("data-{id}")))
        .args(["--cluster-partitions", &c.opts.partitions.to_string()])
        .args(["--replication", &c.opts.replication.to_string()])
        .args(["--metrics-listen", &format!("127.0.0.1:{}", free_port())])
        .env("TIERMQ_LOG", "info,slog=warn")
        .env_remove("RUST_LOG")
        .env_remove("TIERMQ_CONFIG")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe; nothing else runs in the child.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
    }
    Joined(cmd.spawn().expect("spawn the joining backend"))
}

/// A series of the frontend's `/metrics` (0 when absent).
async fn frontend_series(c: &ProcCluster, series: &str) -> f64 {
    let (_, text) = http_get(c.fe_admin(0), "/metrics").await;
    sample(&text, series).unwrap_or(0.0)
}

async fn wait_frontend_epoch(c: &ProcCluster, epoch: f64, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if frontend_series(c, "tiermq_cluster_map_epoch").await >= epoch {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "the frontend did not take up epoch {epoch}; logs:\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn led_by(c: &ProcCluster, node: u64) -> usize {
    match c.status().await {
        Some(s) => s
            .partition_status
            .iter()
            .filter(|p| p.leader == node)
            .count(),
        None => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frontend_follows_a_join_and_a_removal_under_qos1_traffic() {
    let _heavy = heavy().await;
    let mut c = ProcCluster::start_with(ClusterOpts {
        frontends: 1,
        partitions: 16,
        ..ClusterOpts::default()
    })
    .await;
    assert_eq!(frontend_series(&c, "tiermq_cluster_map_epoch").await, 1.0);
    assert_eq!(frontend_series(&c, "tiermq_cluster_map_members").await, 3.0);

    // Subscribers with different client ids live in different partitions: the publishes
    // fan out over several partitions, so several leaders (and their moves) are on the path.
    let fe = c.fe(0);
    let published = Arc::new(AtomicU64::new(0));
    let done_publishing = Arc::new(AtomicBool::new(false));
    let mut subscribers = Vec::new();
    for s in 0..6 {
        let mut sub = Raw::v5(fe, &format!("membership-sub-{s}")).await;
        sub.subscribe("membership/#", sub_opts(QoS::AtLeastOnce))
            .await;
        let (published, done) = (published.clone(), done_publishing.clone());
        subscribers.push(tokio::spawn(async move {
            let mut got: HashSet<u64> = HashSet::new();
            let mut quiet_since = Instant::now();
            loop {
                if done.load(Ordering::SeqCst)
                    && got.len() as u64 >= published.load(Ordering::SeqCst)
                {
                    return got;
                }
                if quiet_since.elapsed() > Duration::from_secs(20) {
                    return got;
                }
                match sub.recv_within(Duration::from_millis(200)).await {
                    Recv::Packet(Packet::Publish(p)) => {
                        quiet_since = Instant::now();
                        let seq: u64 = std::str::from_utf8(&p.payload).unwrap().parse().unwrap();
                        got.insert(seq);
                        if let Some(pid) = p.packet_id {
                            sub.puback(pid).await;
                        }
                    }
                    Recv::Packet(_) | Recv::Timeout => {}
                    Recv::Closed => panic!("subscriber {s} disconnected"),
                }
            }
        }));
    }
    // One QoS1 publisher, a message every 10 ms, each acknowledged before the next.
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (stop, published) = (stop.clone(), published.clone());
        let mut raw = Raw::v5(fe, "membership-pub").await;
        tokio::spawn(async move {
            let mut seq = 0u64;
            let mut slowest = Duration::ZERO;
            while !stop.load(Ordering::SeqCst) {
                seq += 1;
                let pid = (seq % 60_000) as u16 + 1;
                let started = Instant::now();
                let topic = format!("membership/{}", seq % 8);
                raw.publish_qos1(publish_packet(
                    &topic,
                    QoS::AtLeastOnce,
                    Some(pid),
                    seq.to_string().as_bytes(),
                ))
                .await;
                slowest = slowest.max(started.elapsed());
                published.store(seq, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (seq, slowest)
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Backend 4 joins.
    let grpc4: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _b4 = start_joining_backend(&c, 4, grpc4);
    let took = wait_frontend_epoch(&c, 2.0, Duration::from_secs(60)).await;
    eprintln!("frontend took up the join's epoch {took:?} after the backend started");
    assert_eq!(frontend_series(&c, "tiermq_cluster_map_members").await, 4.0);
    // The joined node gets replicas and, after the rebalancing, leaderships: the frontend
    // must be sending to it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while led_by(&c, 4).await == 0 {
        assert!(
            Instant::now() < deadline,
            "node 4 leads nothing; logs:\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Backend 2 is removed, then stopped.
    let started = Instant::now();
    let out = tokio::task::spawn_blocking({
        let b1 = c.backends[0].addr.to_string();
        move || {
            Command::new(env!("CARGO_BIN_EXE_tiermq"))
                .args(["cluster", "remove-node", "2", "--backend", &b1])
                .args(["--timeout", "60s"])
                .output()
                .expect("run tiermq cluster remove-node")
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "remove-node failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("remove-node 2 took {:?}", started.elapsed());
    wait_frontend_epoch(&c, 3.0, Duration::from_secs(30)).await;
    assert_eq!(frontend_series(&c, "tiermq_cluster_map_members").await, 3.0);
    c.backends[1].kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;

    stop.store(true, Ordering::SeqCst);
    let (sent, slowest) = publisher.await.unwrap();
    done_publishing.store(true, Ordering::SeqCst);
    eprintln!("{sent} QoS1 messages acknowledged, slowest PUBACK {slowest:?}");
    assert!(sent > 100, "only {sent} messages went out");
    for (s, sub) in subscribers.into_iter().enumerate() {
        let got = sub.await.unwrap();
        let missing: Vec<u64> = (1..=sent).filter(|q| !got.contains(q)).collect();
        assert!(
            missing.is_empty(),
            "subscriber {s} misses {} of {sent} acknowledged messages (first {:?})",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
    }
    assert!(
        frontend_series(&c, "tiermq_cluster_map_refreshes_total{outcome=\"newer\"}").await >= 2.0
    );
}

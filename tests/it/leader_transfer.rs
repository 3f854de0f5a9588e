//! Leadership transfer (`tiermq backend drain`, and the first step of a backend's graceful
//! stop), against a process cluster (3 backends, 2 frontends on loopback).
//!
//! `rolling_restart_publish_pause` also measures what the transfer buys: the longest gap
//! between two PUBACKs of a steady QoS1 publisher while the leader of its subscriber's
//! partition restarts, with the transfer switched off and on (`docs/operations.md`).

use std::time::Duration;

use crate::support::cluster::{ClusterOpts, ProcCluster};
use crate::support::*;
use tiermq_common::codec::Packet;
use tiermq_common::QoS;
use tokio::time::Instant;

/// Partitions led by backend node `node` according to the cluster status.
async fn led_by(c: &ProcCluster, node: u64) -> Vec<u32> {
    let s = c.status().await.expect("a backend answers");
    s.partition_status
        .iter()
        .filter(|p| p.leader == node)
        .map(|p| p.partition)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_drain_moves_every_leadership_away() {
    let mut c = ProcCluster::start().await;
    c.wait_healthy().await;
    // The node that leads most partitions.
    let mut busiest = (0, 0u64);
    for node in 1..=3u64 {
        let n = led_by(&c, node).await.len();
        if n > busiest.0 {
            busiest = (n, node);
        }
    }
    let (before, node) = busiest;
    assert!(before > 0);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tiermq"))
        .args(["backend", "drain", "--backend"])
        .arg(c.backends[node as usize - 1].addr.to_string())
        .args(["--timeout", "10s"])
        .output()
        .expect("run tiermq backend drain");
    assert!(
        out.status.success(),
        "drain failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Status is gathered from several nodes: give the last heartbeats a moment to arrive.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = led_by(&c, node).await;
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node {node} still leads {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The drained node still runs (as a follower) and the cluster serves.
    assert!(c.backends[node as usize - 1].running());
    c.wait_serves().await;
    // Unknown address: a clear error and a failing exit status.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tiermq"))
        .args([
            "backend",
            "drain",
            "--backend",
            "127.0.0.1:1",
            "--timeout",
            "1s",
        ])
        .output()
        .expect("run tiermq backend drain");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
}

/// Publishes QoS1 messages one at a time through frontend 1 while backend `victim` is
/// stopped with SIGTERM and started again; returns (longest gap between PUBACKs, messages
/// acknowledged). The subscriber on frontend 2 must receive every acknowledged message.
async fn publish_through_restart(c: &mut ProcCluster, victim: usize, tag: &str) -> (Duration, u32) {
    let sub_id = format!("{tag}-sub");
    let topic = format!("{tag}/t");
    let mut sub = Raw::v5(c.fe(1), &sub_id).await;
    sub.subscribe(&topic, sub_opts(QoS::AtLeastOnce)).await;
    let mut publ = Raw::v5(c.fe(0), &format!("{tag}-pub")).await;
    let mut acked = 0u32;
    let mut longest = Duration::ZERO;
    let mut last = Instant::now();
    let mut pid: u16 = 0;
    let started = Instant::now();
    let mut restarted = false;
    let mut stopped_at = None;
    while started.elapsed() < Duration::from_secs(30) {
        pid = pid.wrapping_add(1).max(1);
        let id = pid;
        publ.send(&Packet::Publish(publish_packet(
            &topic,
            QoS::AtLeastOnce,
            Some(id),
            format!("{}", acked + 1).as_bytes(),
        )))
        .await;
        match publ.recv_within(Duration::from_secs(20)).await {
            Recv::Packet(Packet::PubAck(a)) if a.packet_id == id => {
                acked += 1;
                longest = longest.max(last.elapsed());
                last = Instant::now();
            }
            other => panic!("expected PUBACK {id}, got {other:?}"),
        }
        if acked == 50 && stopped_at.is_none() {
            c.backends[victim].signal(libc::SIGTERM);
            stopped_at = Some(Instant::now());
        }
        if let Some(at) = stopped_at {
            if !restarted && !c.backends[victim].running() {
                // Exited: start it again, as a rolling restart would.
                c.backends[victim].wait_exit(Duration::from_secs(1)).await;
                c.restart_backend(victim);
                restarted = true;
            }
            if restarted && at.elapsed() > Duration::from_secs(6) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(restarted, "the backend did not stop");
    // Every acknowledged message arrives (at least once, in order of first arrival).
    let mut next = 1u32;
    let deadline = Instant::now() + Duration::from_secs(20);
    while next <= acked && Instant::now() < deadline {
        if let Recv::Packet(Packet::Publish(p)) = sub.recv_within(Duration::from_secs(2)).await {
            if let Some(id) = p.packet_id {
                sub.puback(id).await;
            }
            let n: u32 = String::from_utf8_lossy(&p.payload).parse().unwrap();
            if n == next {
                next += 1;
            }
        }
    }
    assert_eq!(
        next,
        acked + 1,
        "acknowledged messages missing at the subscriber"
    );
    (longest, acked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_publish_pause() {
    let _heavy = heavy().await;
    let mut results = Vec::new();
    for (transfer_secs, label) in [("0", "no-transfer"), ("5", "transfer")] {
        // A flag of the backends (kept for their restarts), not the environment: the other
        // tests of this binary start processes at the same time.
        let mut c = ProcCluster::start_with(ClusterOpts {
            backend_args: vec!["--leader-transfer-secs".into(), transfer_secs.into()],
            ..ClusterOpts::default()
        })
        .await;
        c.wait_healthy().await;
        let tag = format!("lt-{label}");
        let victim = c.leader_index_of(&format!("{tag}-sub")).await;
        let (pause, acked) = publish_through_restart(&mut c, victim, &tag).await;
        eprintln!(
            "rolling restart of the leader ({label}): longest PUBACK gap {} ms over {acked} messages",
            pause.as_millis()
        );
        results.push((label, pause));
    }
    eprintln!("publish pause during a leader restart: {results:?}");
}

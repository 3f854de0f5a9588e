//! Draining a frontend (3 backends + 2 frontends as processes): its MQTT 5 clients get
//! DISCONNECT 0x9C Use another server with the other frontend as Server Reference, its 3.1.1
//! clients are closed, all of them resume their sessions on the other frontend (Session
//! Present, subscriptions intact, no will fired), no PUBACKed message is lost, and the drained
//! process exits 0.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::cluster::ProcCluster;
use crate::support::*;
use tiermq_common::codec::{Connect, LastWill, Packet, WillProperties};
use tiermq_common::{ProtocolVersion, QoS, ReasonCode};
use tokio::sync::watch;
use tokio::time::Instant;

const V5: ProtocolVersion = ProtocolVersion::V5;
const V3: ProtocolVersion = ProtocolVersion::V311;

/// Clean Start 0 and a session that outlives the connection (v3: clean session 0).
fn persistent(c: &mut Connect) {
    c.clean_start = false;
    if c.protocol.is_v5() {
        c.properties.session_expiry_interval = Some(600);
    }
}

/// What one subscriber saw.
#[derive(Debug, Default)]
struct Seen {
    got: BTreeSet<u32>,
    /// Reason code and Server Reference of the DISCONNECT the drained frontend sent.
    disconnect: Option<(ReasonCode, Option<String>)>,
    closed: bool,
    /// Session Present of the CONNACK after the move.
    resumed: Option<bool>,
    moved_to: Option<SocketAddr>,
}

/// A persistent subscriber of `topic` on `from`: acks every delivery; when the connection
/// closes it reconnects (v5: to the Server Reference it was given, v3: to `fallback`) and
/// carries on without subscribing again. Ends once it has every message up to the number
/// `last` announces.
/// One subscriber: who, where, and whether it has a will.
struct Spec {
    id: String,
    version: ProtocolVersion,
    from: SocketAddr,
    fallback: SocketAddr,
    topic: &'static str,
    with_will: bool,
}

/// What the subscribers share with the test: counters and the last message number.
#[derive(Clone)]
struct Shared {
    ready: Arc<AtomicUsize>,
    moved: Arc<AtomicUsize>,
    last: watch::Receiver<Option<u32>>,
}

async fn subscriber(spec: Spec, shared: Shared) -> (String, Seen) {
    let Spec {
        id,
        version,
        from,
        fallback,
        topic,
        with_will,
    } = spec;
    let Shared {
        ready,
        moved,
        mut last,
    } = shared;
    let (mut conn, ack) = Raw::connect(from, version, &id, |c| {
        persistent(c);
        if with_will {
            c.will = Some(LastWill {
                topic: format!("drain/will/{id}"),
                payload: bytes::Bytes::from_static(b"gone"),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: WillProperties::default(),
            });
        }
    })
    .await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS, "{id}: {ack:?}");
    conn.subscribe(topic, sub_opts(QoS::AtLeastOnce)).await;
    ready.fetch_add(1, Ordering::SeqCst);
    let mut seen = Seen::default();
    loop {
        if let Some(n) = *last.borrow() {
            if (1..=n).all(|s| seen.got.contains(&s)) {
                return (id, seen);
            }
        }
        let r = tokio::select! {
            r = conn.recv_within(Duration::from_millis(500)) => r,
            _ = last.changed() => continue,
        };
        match r {
            Recv::Packet(Packet::Publish(p)) => {
                if let Some(pid) = p.packet_id {
                    conn.puback(pid).await;
                }
                if let Ok(n) = String::from_utf8_lossy(&p.payload).parse() {
                    seen.got.insert(n);
                }
            }
            Recv::Packet(Packet::Disconnect(d)) => {
                seen.disconnect = Some((d.reason_code, d.properties.server_reference.clone()));
            }
            Recv::Packet(_) | Recv::Timeout => {}
            Recv::Closed => {
                assert!(!seen.closed, "{id}: closed twice");
                seen.closed = true;
                let to = match &seen.disconnect {
                    Some((_, Some(reference))) => reference
                        .parse()
                        .unwrap_or_else(|_| panic!("{id}: server reference {reference:?}")),
                    _ => fallback,
                };
                let (c, ack) = Raw::connect(to, version, &id, persistent).await;
                assert_eq!(
                    ack.reason_code,
                    ReasonCode::SUCCESS,
                    "{id} on {to}: {ack:?}"
                );
                seen.resumed = Some(ack.session_present);
                seen.moved_to = Some(to);
                conn = c;
                moved.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

async fn wait_ready(ready: &AtomicUsize, n: usize, c: &ProcCluster) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while ready.load(Ordering::SeqCst) < n {
        assert!(
            Instant::now() < deadline,
            "subscribers not ready: {} of {n}; logs:\n{}",
            ready.load(Ordering::SeqCst),
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `tiermq frontend drain --admin ADDR` as a process; returns its exit status and output.
async fn drain_cli(admin: SocketAddr) -> (std::process::ExitStatus, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tiermq"))
        .args(["frontend", "drain", "--admin", &admin.to_string()])
        .output()
        .await
        .expect("run tiermq frontend drain");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, text)
}

/// 100 MQTT 5 and 10 MQTT 3.1.1 persistent subscribers on frontend 1, a QoS1 publisher on
/// frontend 2 publishing all along; `tiermq frontend drain` on frontend 1 in the middle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_moves_every_client_to_the_other_frontend_and_loses_nothing() {
    const N5: usize = 100;
    const N3: usize = 10;
    const TOPIC: &str = "drain/all";
    let mut c = ProcCluster::start().await;
    let (from, to) = (c.fe(0), c.fe(1));
    let ready = Arc::new(AtomicUsize::new(0));
    let moved = Arc::new(AtomicUsize::new(0));
    let (last_tx, last_rx) = watch::channel(None::<u32>);
    let shared = Shared {
        ready: ready.clone(),
        moved: moved.clone(),
        last: last_rx,
    };
    let mut subs = Vec::new();
    let started = Instant::now();
    for i in 0..N5 + N3 {
        let (id, version) = if i < N5 {
            (format!("drain5-{i}"), V5)
        } else {
            (format!("drain3-{}", i - N5), V3)
        };
        // Every tenth client has a will (delay 0): a drain must not fire it.
        subs.push(tokio::spawn(subscriber(
            Spec {
                id,
                version,
                from,
                fallback: to,
                topic: TOPIC,
                with_will: i % 10 == 0,
            },
            shared.clone(),
        )));
        // Ten connecting at a time: a CONNECT and a SUBSCRIBE each go through Raft.
        if subs.len() % 10 == 0 {
            wait_ready(&ready, subs.len(), &c).await;
        }
    }
    wait_ready(&ready, N5 + N3, &c).await;
    eprintln!(
        "{} subscribers connected on frontend 1 in {:?}",
        N5 + N3,
        started.elapsed()
    );
    let mut wills = Raw::v5(to, "drain-will-watch").await;
    wills
        .subscribe("drain/will/#", sub_opts(QoS::AtLeastOnce))
        .await;

    // The publisher on frontend 2: one QoS1 message at a time, numbered.
    let mut publ = Raw::v5(to, "drain-pub").await;
    let drain_at = 30u32;
    let mut acked = Vec::new();
    let mut after_moved = 0;
    let mut drain_started = None;
    let mut seq = 0u32;
    loop {
        seq += 1;
        if seq == drain_at {
            let (status, text) = drain_cli(c.fe_admin(0)).await;
            assert!(status.success(), "tiermq frontend drain: {text}");
            assert!(text.contains("draining"), "{text}");
            drain_started = Some(Instant::now());
        }
        let pid = (seq % 60_000) as u16 + 1;
        let ack = publ
            .publish_qos1(publish_packet(
                TOPIC,
                QoS::AtLeastOnce,
                Some(pid),
                seq.to_string().as_bytes(),
            ))
            .await;
        assert!(!ack.reason_code.is_error(), "PUBACK {:?}", ack.reason_code);
        acked.push(seq);
        if moved.load(Ordering::SeqCst) == N5 + N3 {
            // Every client resumed elsewhere: a few more messages reach them there only
            // through the subscriptions their sessions kept.
            after_moved += 1;
            if after_moved == 20 {
                break;
            }
        }
        assert!(
            seq < 5_000,
            "clients did not all move: {} of {}; logs:\n{}",
            moved.load(Ordering::SeqCst),
            N5 + N3,
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let moved_in = drain_started.map(|t| t.elapsed());
    last_tx.send(Some(seq)).unwrap();
    let mut all = Vec::new();
    for s in subs {
        let r = tokio::time::timeout(Duration::from_secs(60), s)
            .await
            .unwrap_or_else(|_| panic!("a subscriber misses messages; logs:\n{}", c.logs()))
            .expect("subscriber task");
        all.push(r);
    }
    for (id, seen) in &all {
        let missing: Vec<u32> = acked
            .iter()
            .copied()
            .filter(|s| !seen.got.contains(s))
            .collect();
        assert!(
            missing.is_empty(),
            "{id} lost PUBACKed messages {missing:?}"
        );
        assert!(seen.closed, "{id} was not moved");
        assert_eq!(
            seen.resumed,
            Some(true),
            "{id}: Session Present after the move"
        );
        assert_eq!(seen.moved_to, Some(to), "{id} moved to the other frontend");
        if id.starts_with("drain5-") {
            assert_eq!(
                seen.disconnect,
                Some((ReasonCode::USE_ANOTHER_SERVER, Some(to.to_string()))),
                "{id}: DISCONNECT 0x9C with the other frontend as Server Reference"
            );
        } else {
            assert_eq!(seen.disconnect, None, "{id}: a 3.1.1 client is just closed");
        }
    }
    // No will fired (they would have been published right away: delay 0).
    wills.expect_silence().await;
    let status = c.frontends[0].wait_exit(Duration::from_secs(30)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "drained frontend exits 0: {status:?}; logs:\n{}",
        c.logs()
    );
    let log = c.frontends[0].log_text();
    assert!(log.contains("drained: no connection left"), "{log}");
    eprintln!(
        "{} messages PUBACKed, every one received by all {} subscribers; all moved within {:?} of the drain",
        acked.len(),
        N5 + N3,
        moved_in
    );
}

/// SIGTERM drains too (what `docker stop` sends): v5 gets 0x9C, the frontend stops
/// accepting and exits 0; the other frontend serves the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_frontend() {
    let mut c = ProcCluster::start().await;
    let (from, to) = (c.fe(0), c.fe(1));
    let (mut v5, _) = Raw::connect(from, V5, "term5", persistent).await;
    v5.subscribe("term/t", sub_opts(QoS::AtLeastOnce)).await;
    let (mut v3, _) = Raw::connect(from, V3, "term3", persistent).await;
    v3.subscribe("term/t", sub_opts(QoS::AtLeastOnce)).await;
    c.frontends[0].signal(libc::SIGTERM);
    let seen = v5.expect_closed().await;
    match seen.last() {
        Some(Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, ReasonCode::USE_ANOTHER_SERVER);
            assert_eq!(d.properties.server_reference, Some(to.to_string()));
        }
        other => panic!("expected DISCONNECT 0x9C, got {other:?}"),
    }
    v3.expect_closed().await;
    let status = c.frontends[0].wait_exit(Duration::from_secs(30)).await;
    assert!(status.is_some_and(|s| s.success()), "exit 0: {status:?}");
    assert!(
        tokio::net::TcpStream::connect(from).await.is_err(),
        "the drained frontend no longer accepts"
    );
    let (mut v5, ack) = Raw::connect(to, V5, "term5", persistent).await;
    assert!(ack.session_present);
    let mut publ = Raw::v5(to, "term-pub").await;
    publ.publish_qos1(publish_packet(
        "term/t",
        QoS::AtLeastOnce,
        Some(1),
        b"after",
    ))
    .await;
    assert_eq!(v5.recv_publish().await.payload, &b"after"[..]);
}

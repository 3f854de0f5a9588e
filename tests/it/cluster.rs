//! Multi-process cluster tests: 3 backends + 2 frontends as processes on loopback, one cluster
//! (own ports, own temp folder) per test. Clients publish through one frontend and subscribe
//! through the other; nodes are killed with SIGKILL.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use crate::support::cluster::ProcCluster;
use crate::support::*;
use bytes::Bytes;
use tiermq_common::codec::{Connect, LastWill, Packet, PubComp, PubRec, PubRel, WillProperties};
use tiermq_common::{ProtocolVersion, QoS, ReasonCode};
use tokio::time::Instant;

const V5: ProtocolVersion = ProtocolVersion::V5;
const V3: ProtocolVersion = ProtocolVersion::V311;

fn persistent(expiry: u32) -> impl Fn(&mut Connect) {
    move |c: &mut Connect| {
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(expiry);
    }
}

/// QoS 0, 1 and 2 with rumqttc v5 and 3.1.1: published through frontend 1, received through
/// frontend 2 — subscribed just before (a SUBACK on one frontend routes publishes of the other).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_all_qos_across_frontends() {
    let c = ProcCluster::start().await;
    let levels5 = [Q5::AtMostOnce, Q5::AtLeastOnce, Q5::ExactlyOnce];
    let (mut sub, _) = V5::connect(c.fe(1), "x5-sub", |_| {}).await;
    let (publ, _) = V5::connect(c.fe(0), "x5-pub", |_| {}).await;
    for (i, q) in levels5.iter().enumerate() {
        sub.subscribe(&format!("x5/{i}"), *q).await;
        publ.client
            .publish(format!("x5/{i}"), *q, false, format!("v5 qos{i}"))
            .await
            .unwrap();
        let p = sub.next_publish().await;
        assert_eq!(p.topic, format!("x5/{i}").as_bytes());
        assert_eq!(p.qos, *q);
        assert_eq!(p.payload, format!("v5 qos{i}").as_bytes());
    }
    let levels3 = [Q3::AtMostOnce, Q3::AtLeastOnce, Q3::ExactlyOnce];
    let (mut sub, _) = V3::connect(c.fe(1), "x3-sub", |_| {}).await;
    let (publ, _) = V3::connect(c.fe(0), "x3-pub", |_| {}).await;
    for (i, q) in levels3.iter().enumerate() {
        sub.subscribe(&format!("x3/{i}"), *q).await;
        publ.client
            .publish(format!("x3/{i}"), *q, false, format!("v3 qos{i}"))
            .await
            .unwrap();
        let p = sub.next_publish().await;
        assert_eq!(p.topic, format!("x3/{i}"));
        assert_eq!(p.qos, *q);
        assert_eq!(&p.payload[..], format!("v3 qos{i}").as_bytes());
    }
    // A raw QoS2 exchange through frontend 1: PUBREC, PUBREL, PUBCOMP, and a re-sent PUBLISH
    // with the same id (DUP) is not delivered twice.
    let mut s = Raw::v5(c.fe(1), "x2-sub").await;
    s.subscribe("x2/t", sub_opts(QoS::ExactlyOnce)).await;
    let mut p = Raw::v5(c.fe(0), "x2-pub").await;
    let mut publish = publish_packet("x2/t", QoS::ExactlyOnce, Some(7), b"once");
    p.send(&Packet::Publish(publish.clone())).await;
    match p.recv().await {
        Packet::PubRec(r) => assert_eq!(r.packet_id, 7),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    publish.dup = true;
    p.send(&Packet::Publish(publish)).await;
    match p.recv().await {
        Packet::PubRec(r) => assert_eq!(r.packet_id, 7),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    p.send(&Packet::PubRel(PubRel::new(7))).await;
    match p.recv().await {
        Packet::PubComp(r) => assert_eq!(r.packet_id, 7),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
    let got = s.recv_publish().await;
    assert_eq!(&got.payload[..], b"once");
    let pid = got.packet_id.unwrap();
    s.send(&Packet::PubRec(PubRec::new(pid))).await;
    match s.recv().await {
        Packet::PubRel(r) => assert_eq!(r.packet_id, pid),
        other => panic!("expected PUBREL, got {other:?}"),
    }
    s.send(&Packet::PubComp(PubComp::new(pid))).await;
    s.expect_silence().await;
}

/// Retained messages of topics in every partition, set through frontend 1, are found by a
/// wildcard subscriber on frontend 2; one deleted through frontend 2 stays deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_across_frontends() {
    let c = ProcCluster::start().await;
    let mut publ = Raw::v5(c.fe(0), "ret-pub").await;
    let topics: Vec<String> = (0..12).map(|i| format!("ret/{i}")).collect();
    let parts: HashSet<u32> = topics.iter().map(|t| c.partition_of(t)).collect();
    assert!(parts.len() > 3, "the topics spread over partitions");
    for (i, t) in topics.iter().enumerate() {
        let mut p = publish_packet(t, QoS::AtLeastOnce, Some(i as u16 + 1), t.as_bytes());
        p.retain = true;
        publ.publish_qos1(p).await;
    }
    let mut sub = Raw::v5(c.fe(1), "ret-sub").await;
    sub.subscribe("ret/#", sub_opts(QoS::AtLeastOnce)).await;
    let mut seen = HashSet::new();
    for _ in 0..topics.len() {
        let p = sub.recv_publish().await;
        assert!(p.retain, "a retained message carries RETAIN on subscribe");
        assert_eq!(p.payload, p.topic.as_bytes());
        sub.puback(p.packet_id.unwrap()).await;
        seen.insert(p.topic);
    }
    assert_eq!(seen.len(), topics.len());
    sub.expect_silence().await;

    // Delete ret/3 through frontend 2 (empty retained payload).
    let mut p2 = Raw::v5(c.fe(1), "ret-del").await;
    let mut del = publish_packet("ret/3", QoS::AtLeastOnce, Some(1), b"");
    del.retain = true;
    p2.publish_qos1(del).await;
    // The live subscriber gets the (empty) publish, not as retained.
    let p = sub.recv_publish().await;
    assert_eq!(p.topic, "ret/3");
    assert!(p.payload.is_empty());
    sub.puback(p.packet_id.unwrap()).await;

    let mut late = Raw::v5(c.fe(0), "ret-late").await;
    late.subscribe("ret/#", sub_opts(QoS::AtMostOnce)).await;
    let mut again = HashSet::new();
    for _ in 0..topics.len() - 1 {
        again.insert(late.recv_publish().await.topic);
    }
    assert!(
        !again.contains("ret/3"),
        "a deleted retained message came back"
    );
    late.expect_silence().await;
}

/// A persistent session leaves frontend 1, messages queue while it is offline, and it
/// resumes on frontend 2 with Session Present and the queue in order (v5 and 3.1.1); unacked
/// deliveries come again with DUP and the same packet ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_moves_between_frontends() {
    let c = ProcCluster::start().await;
    let mut publ = Raw::v5(c.fe(0), "mv-pub").await;
    for (version, id) in [(V5, "mover5"), (V3, "mover3")] {
        let topic = format!("mv/{id}");
        let (mut s, ack) = Raw::connect(c.fe(0), version, id, persistent(300)).await;
        assert!(!ack.session_present);
        s.subscribe(&topic, sub_opts(QoS::AtLeastOnce)).await;
        s.disconnect(ReasonCode::NORMAL_DISCONNECTION).await;
        for i in 1..=10u16 {
            let ack = publ
                .publish_qos1(publish_packet(
                    &topic,
                    QoS::AtLeastOnce,
                    Some(i),
                    format!("m-{i}").as_bytes(),
                ))
                .await;
            assert_eq!(ack.reason_code, ReasonCode::SUCCESS, "queued for {id}");
        }
        let (mut s, ack) = Raw::connect(c.fe(1), version, id, persistent(300)).await;
        assert!(
            ack.session_present,
            "{id}: Session Present on the other frontend"
        );
        let mut first = Vec::new();
        for i in 1..=10 {
            let p = s.recv_publish().await;
            assert_eq!(p.payload, format!("m-{i}").into_bytes(), "{id}: order");
            first.push(p);
        }
        // Ack half, drop the connection, come back on frontend 1: the rest again, DUP.
        for p in &first[..5] {
            s.puback(p.packet_id.unwrap()).await;
        }
        s.ping().await;
        drop(s);
        let (mut s, ack) = Raw::connect(c.fe(0), version, id, persistent(300)).await;
        assert!(ack.session_present);
        // An ack proposed while the partition's leader changes may be lost (a duplicate
        // MQTT allows): acked messages may come again, but only with DUP and their own ids.
        let acked: Vec<Option<u16>> = first[..5].iter().map(|p| p.packet_id).collect();
        for orig in &first[5..] {
            let mut p = s.recv_publish().await;
            while acked.contains(&p.packet_id) {
                assert!(p.dup, "{id}: a repeated message carries DUP");
                s.puback(p.packet_id.unwrap()).await;
                p = s.recv_publish().await;
            }
            assert!(p.dup, "{id}: redelivery carries DUP");
            assert_eq!(p.packet_id, orig.packet_id, "{id}: same packet id");
            assert_eq!(p.payload, orig.payload);
            s.puback(p.packet_id.unwrap()).await;
        }
        s.expect_silence().await;
    }
}

/// The same client id connecting through the other frontend takes the session over: the old
/// connection gets DISCONNECT 0x8E (v5) or is closed (3.1.1), and only the new one receives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_across_frontends() {
    let c = ProcCluster::start().await;
    let mut publ = Raw::v5(c.fe(0), "tk-pub").await;
    let (mut old, _) = Raw::connect(c.fe(0), V5, "tk5", persistent(300)).await;
    old.subscribe("tk/5", sub_opts(QoS::AtLeastOnce)).await;
    let (mut new, ack) = Raw::connect(c.fe(1), V5, "tk5", persistent(300)).await;
    assert!(ack.session_present);
    old.expect_disconnect(ReasonCode::SESSION_TAKEN_OVER).await;
    publ.publish_qos1(publish_packet("tk/5", QoS::AtLeastOnce, Some(1), b"to-new"))
        .await;
    let p = new.recv_publish().await;
    assert_eq!(&p.payload[..], b"to-new");
    new.puback(p.packet_id.unwrap()).await;
    // And back again, with clean start: a fresh session, the old subscription gone.
    let (mut third, ack) = Raw::connect(c.fe(0), V5, "tk5", |_| {}).await;
    assert!(!ack.session_present);
    new.expect_disconnect(ReasonCode::SESSION_TAKEN_OVER).await;
    third.ping().await;

    let (mut old3, _) = Raw::connect(c.fe(1), V3, "tk3", |c| c.clean_start = false).await;
    old3.subscribe("tk/3", sub_opts(QoS::AtLeastOnce)).await;
    let (mut new3, ack) = Raw::connect(c.fe(0), V3, "tk3", |c| c.clean_start = false).await;
    assert!(ack.session_present);
    let seen = old3.expect_closed().await;
    assert!(
        seen.is_empty(),
        "3.1.1: closed without DISCONNECT: {seen:?}"
    );
    publ.publish_qos1(publish_packet("tk/3", QoS::AtLeastOnce, Some(2), b"v3"))
        .await;
    assert_eq!(&new3.recv_publish().await.payload[..], b"v3");
}

fn will(topic: &str, payload: &str) -> LastWill {
    LastWill {
        topic: topic.into(),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: WillProperties::default(),
    }
}

/// kill -9 of frontend 1: the backends notice through the event-stream lease and fire the
/// wills of its clients exactly once; clients on frontend 2 are untouched, and a persistent
/// client of frontend 1 resumes on frontend 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frontend_kill9_fires_wills_once() {
    let mut c = ProcCluster::start().await;
    let mut w = Raw::v5(c.fe(1), "will-watch").await;
    w.subscribe("will/#", sub_opts(QoS::AtLeastOnce)).await;
    let mut victims = Vec::new();
    for i in 0..6 {
        let version = if i % 2 == 0 { V5 } else { V3 };
        let id = format!("victim{i}");
        let (conn, _) = Raw::connect(c.fe(0), version, &id, |c| {
            c.will = Some(will(&format!("will/{id}"), &id));
            if i == 0 {
                c.clean_start = false;
                c.properties.session_expiry_interval = Some(300);
            }
        })
        .await;
        victims.push(conn);
    }
    let (bystander, _) = Raw::connect(c.fe(1), V5, "bystander", |c| {
        c.will = Some(will("will/bystander", "must not fire"));
    })
    .await;
    let killed_at = Instant::now();
    c.kill9_frontend(0);
    let mut fired = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while fired.len() < victims.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match w.recv_within(left).await {
            Recv::Packet(Packet::Publish(p)) => {
                assert_ne!(p.topic, "will/bystander", "a live client's will fired");
                assert!(
                    fired.insert(p.topic.clone()),
                    "will {} fired twice",
                    p.topic
                );
                assert_eq!(
                    p.topic,
                    format!("will/{}", String::from_utf8_lossy(&p.payload))
                );
                w.puback(p.packet_id.unwrap()).await;
            }
            other => panic!(
                "wills missing after {:?}: got {fired:?}, then {other:?}; logs:\n{}",
                killed_at.elapsed(),
                c.logs()
            ),
        }
    }
    // No second copy, not even after another lease period.
    match w.recv_within(Duration::from_secs(4)).await {
        Recv::Timeout => {}
        other => panic!("after all wills: {other:?}"),
    }
    drop(victims);
    // The persistent victim resumes on frontend 2.
    let (mut back, ack) = Raw::connect(c.fe(1), V5, "victim0", persistent(300)).await;
    assert!(ack.session_present, "the session outlived its frontend");
    back.ping().await;
    drop(bystander);
}

/// Publishes `seq` as QoS1 on `conn` with packet id `pid`; `Some(())` once PUBACKed, `None`
/// when the connection breaks or no PUBACK comes in time.
async fn publish_once(conn: &mut Raw, topic: &str, seq: u32, pid: u16, dup: bool) -> Option<()> {
    let mut p = publish_packet(
        topic,
        QoS::AtLeastOnce,
        Some(pid),
        format!("{seq}").as_bytes(),
    );
    p.dup = dup;
    conn.send(&Packet::Publish(p)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match conn.recv_within(left).await {
            Recv::Packet(Packet::PubAck(a)) if a.packet_id == pid => {
                assert!(!a.reason_code.is_error(), "PUBACK {:?}", a.reason_code);
                return Some(());
            }
            Recv::Packet(_) => continue,
            _ => return None,
        }
    }
}

/// kill -9 of the backend leading the subscriber's partition (where the messages are
/// queued) in the middle of a QoS1 stream: the persistent subscriber receives every message
/// that was PUBACKed, in publish order (redelivered duplicates allowed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill9_during_qos1_stream_loses_nothing() {
    let _heavy = heavy().await;
    let mut c = ProcCluster::start().await;
    let sub_id = "stream-sub";
    let pub_id = "stream-pub";
    let topic = "stream/t";
    let victim = c.leader_index_of(sub_id).await;
    let (mut sub, _) = Raw::connect(c.fe(1), V5, sub_id, persistent(300)).await;
    sub.subscribe(topic, sub_opts(QoS::AtLeastOnce)).await;

    // The subscriber runs in its own task: acks everything, reconnects (to either frontend,
    // Clean Start 0) when its connection breaks or goes quiet while messages are due.
    let (done_tx, mut done_rx) = tokio::sync::watch::channel(None::<u32>);
    let fes = c.fe_addrs();
    let reader = tokio::spawn(async move {
        let mut got: Vec<u32> = Vec::new();
        let mut reconnects = 0;
        let mut last_progress = Instant::now();
        loop {
            let want = *done_rx.borrow();
            if let Some(last) = want {
                if got.contains(&last) && (1..=last).all(|s| got.contains(&s)) {
                    return (got, reconnects);
                }
            }
            let r = tokio::select! {
                r = sub.recv_within(Duration::from_millis(500)) => r,
                _ = done_rx.changed() => continue,
            };
            let broken = match r {
                Recv::Packet(Packet::Publish(p)) => {
                    sub.puback(p.packet_id.unwrap()).await;
                    got.push(String::from_utf8_lossy(&p.payload).parse().unwrap());
                    last_progress = Instant::now();
                    false
                }
                Recv::Packet(_) => false,
                Recv::Closed => true,
                // Quiet for 5 s although the publisher is done: the delivery stalled.
                Recv::Timeout => want.is_some() && last_progress.elapsed() > Duration::from_secs(5),
            };
            if broken {
                reconnects += 1;
                assert!(
                    reconnects < 20,
                    "subscriber cannot get its messages; got {got:?}"
                );
                let addr: SocketAddr = fes[reconnects % fes.len()];
                let (s, ack) = Raw::connect(addr, V5, sub_id, persistent(300)).await;
                assert!(ack.session_present, "session present after failover");
                sub = s;
                last_progress = Instant::now();
            }
        }
    });

    // The publisher, on frontend 1: one message at a time; a message is "acked" once its
    // PUBACK arrived. A broken connection is reopened and the unacked message re-sent (DUP).
    let mut publ = Raw::v5(c.fe(0), pub_id).await;
    let total = 300u32;
    let kill_at = 100u32;
    let mut acked = Vec::new();
    let mut pub_reconnects = 0;
    for seq in 1..=total {
        if seq == kill_at {
            c.kill9_backend(victim);
        }
        let pid = (seq % 60_000) as u16 + 1;
        let mut dup = false;
        loop {
            if publish_once(&mut publ, topic, seq, pid, dup)
                .await
                .is_some()
            {
                acked.push(seq);
                break;
            }
            pub_reconnects += 1;
            assert!(
                pub_reconnects < 10,
                "publisher cannot get PUBACKs; logs:\n{}",
                c.logs()
            );
            publ = Raw::v5(c.fe(pub_reconnects % 2), pub_id).await;
            dup = true;
        }
    }
    let _ = done_tx.send(Some(total));
    let (got, reconnects) = match tokio::time::timeout(Duration::from_secs(30), reader).await {
        Ok(r) => r.unwrap(),
        Err(_) => panic!(
            "subscriber did not receive every acked message; logs:\n{}",
            c.logs()
        ),
    };
    // Every acked message arrived; first arrivals are in publish order.
    let mut firsts = Vec::new();
    let mut seen = HashSet::new();
    for s in &got {
        if seen.insert(*s) {
            firsts.push(*s);
        }
    }
    for s in &acked {
        assert!(seen.contains(s), "acked message {s} lost");
    }
    assert!(
        firsts.windows(2).all(|w| w[0] < w[1]),
        "out of order: {firsts:?}"
    );
    eprintln!(
        "leader kill: {} acked, {} received ({} duplicates), subscriber reconnects {reconnects}, publisher reconnects {pub_reconnects}",
        acked.len(),
        got.len(),
        got.len() - firsts.len()
    );
    let now = c.status().await.expect("status").leader_of_key(sub_id);
    assert!(
        now != 0 && now != victim as u64 + 1,
        "leadership of the subscriber's partition moved (now {now})"
    );
    // The cluster serves on with two backends.
    c.wait_serves().await;
}

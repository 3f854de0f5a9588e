//! Durability across kill -9 and graceful shutdown, with the real binary.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::support::*;
use bytes::BytesMut;
use tiermq_common::codec::{encode, Connect, Packet};
use tiermq_common::{ProtocolVersion, QoS, ReasonCode};

const V5: ProtocolVersion = ProtocolVersion::V5;
const V3: ProtocolVersion = ProtocolVersion::V311;

fn persistent(c: &mut Connect) {
    c.clean_start = false;
    c.properties.session_expiry_interval = Some(3600);
}

/// Sends `n` QoS1 publishes back to back (pipelined) and waits for every PUBACK.
async fn publish_pipelined(publ: &mut Raw, topic: &str, n: u16) {
    let mut buf = BytesMut::new();
    for i in 1..=n {
        let p = publish_packet(topic, QoS::AtLeastOnce, Some(i), i.to_string().as_bytes());
        encode(&Packet::Publish(p), publ.version, &mut buf).unwrap();
    }
    publ.send_bytes(&buf).await;
    for i in 1..=n {
        match publ.recv().await {
            Packet::PubAck(a) => {
                assert_eq!(a.packet_id, i, "PUBACKs in order");
                assert_eq!(a.reason_code, ReasonCode::SUCCESS);
            }
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
}

fn number(p: &tiermq_common::codec::Publish) -> u16 {
    std::str::from_utf8(&p.payload).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_survive_kill_9() {
    let mut dir = ProcDir::new();
    let mut broker = dir.start().await;
    let (mut sub, ack) = Raw::connect(broker.addr, V5, "durable", |c| {
        persistent(c);
        c.properties.receive_maximum = Some(10);
    })
    .await;
    assert!(!ack.session_present);
    sub.subscribe("d/t", sub_opts(QoS::AtLeastOnce)).await;

    let mut publ = Raw::v5(broker.addr, "pub").await;
    publish_pipelined(&mut publ, "d/t", 300).await;
    // The subscriber holds 10 in flight, unacknowledged.
    let mut inflight = Vec::new();
    for _ in 0..10 {
        inflight.push(sub.recv_publish().await);
    }
    broker.kill9();

    let broker = dir.start().await;
    let (mut sub, ack) = Raw::connect(broker.addr, V5, "durable", persistent).await;
    assert!(ack.session_present, "session recovered");
    // First the in-flight ones again, DUP and same packet ids, then the rest in order.
    for (i, orig) in inflight.iter().enumerate() {
        let p = sub.recv_publish().await;
        assert!(p.dup, "redelivery {i} without DUP");
        assert_eq!(p.packet_id, orig.packet_id);
        assert_eq!(p.payload, orig.payload);
        sub.puback(p.packet_id.unwrap()).await;
    }
    for want in 11..=300u16 {
        let p = sub.recv_publish().await;
        assert_eq!(number(&p), want, "lost or out of order");
        sub.puback(p.packet_id.unwrap()).await;
    }
    sub.expect_silence().await;
    // The subscription itself survived too.
    let mut publ = Raw::v5(broker.addr, "pub").await;
    publish_pipelined(&mut publ, "d/t", 1).await;
    assert_eq!(number(&sub.recv_publish().await), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v3_session_and_queue_survive_kill_9() {
    let mut dir = ProcDir::new();
    let mut broker = dir.start().await;
    let (mut sub, _) = Raw::connect(broker.addr, V3, "durable3", |c| c.clean_start = false).await;
    sub.subscribe("d3/#", sub_opts(QoS::AtLeastOnce)).await;
    sub.disconnect(ReasonCode::NORMAL_DISCONNECTION).await;
    let mut publ = Raw::v3(broker.addr, "pub3").await;
    publish_pipelined(&mut publ, "d3/x", 50).await;
    broker.kill9();

    let broker = dir.start().await;
    let (mut sub, ack) = Raw::connect(broker.addr, V3, "durable3", |c| c.clean_start = false).await;
    assert!(ack.session_present);
    for want in 1..=50u16 {
        let p = sub.recv_publish().await;
        assert_eq!(number(&p), want);
        sub.puback(p.packet_id.unwrap()).await;
    }
    sub.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_survive_kill_9_under_load() {
    // The publisher streams without waiting; the broker is killed mid-stream. Every message
    // whose PUBACK arrived must be delivered after the restart, in order.
    let mut dir = ProcDir::new();
    let mut broker = dir.start().await;
    let (sub, _) = Raw::connect(broker.addr, V5, "loadsub", persistent).await;
    let mut sub = sub;
    sub.subscribe("load", sub_opts(QoS::AtLeastOnce)).await;
    sub.disconnect(ReasonCode::NORMAL_DISCONNECTION).await;

    let mut publ = Raw::v5(broker.addr, "loadpub").await;
    // Below the broker's Receive Maximum (1024), so all may be in flight at once.
    let total = 1000u16;
    let mut buf = BytesMut::new();
    for i in 1..=total {
        let p = publish_packet("load", QoS::AtLeastOnce, Some(i), i.to_string().as_bytes());
        encode(&Packet::Publish(p), V5, &mut buf).unwrap();
    }
    publ.send_bytes(&buf).await;
    let mut acked = BTreeSet::new();
    while acked.len() < 300 {
        match publ.recv().await {
            Packet::PubAck(a) => {
                assert_eq!(a.reason_code, ReasonCode::SUCCESS);
                acked.insert(a.packet_id);
            }
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    broker.kill9();
    // Whatever else was acknowledged before the kill counts too.
    loop {
        match publ.recv_within(Duration::from_secs(2)).await {
            Recv::Packet(Packet::PubAck(a)) => {
                acked.insert(a.packet_id);
            }
            Recv::Packet(other) => panic!("unexpected {other:?}"),
            Recv::Closed | Recv::Timeout => break,
        }
    }

    let broker = dir.start().await;
    let (mut sub, ack) = Raw::connect(broker.addr, V5, "loadsub", persistent).await;
    assert!(ack.session_present);
    let mut delivered = Vec::new();
    loop {
        match sub.recv_within(Duration::from_millis(500)).await {
            Recv::Packet(Packet::Publish(p)) => {
                sub.puback(p.packet_id.unwrap()).await;
                delivered.push(number(&p));
            }
            Recv::Timeout => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    let got: BTreeSet<u16> = delivered.iter().copied().collect();
    let lost: Vec<_> = acked.difference(&got).collect();
    assert!(
        lost.is_empty(),
        "{} acked messages lost: {lost:?}",
        lost.len()
    );
    assert!(
        delivered.windows(2).all(|w| w[0] < w[1]),
        "order or duplicates broken"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_state_survives_kill_9() {
    let mut dir = ProcDir::new();
    let mut broker = dir.start().await;
    let mut publ = Raw::v5(broker.addr, "pub").await;
    let mut p = publish_packet("ret/kept", QoS::AtLeastOnce, Some(1), b"kept");
    p.retain = true;
    publ.publish_qos1(p).await;
    // Set then deleted: must stay deleted (promise 5).
    let mut p = publish_packet("ret/deleted", QoS::AtLeastOnce, Some(2), b"old");
    p.retain = true;
    publ.publish_qos1(p).await;
    let mut p = publish_packet("ret/deleted", QoS::AtLeastOnce, Some(3), b"");
    p.retain = true;
    publ.publish_qos1(p).await;
    // Replaced: the newest wins.
    for (pid, v) in [(4, "v1"), (5, "v2")] {
        let mut p = publish_packet("ret/replaced", QoS::AtLeastOnce, Some(pid), v.as_bytes());
        p.retain = true;
        publ.publish_qos1(p).await;
    }
    broker.kill9();

    let broker = dir.start().await;
    let mut sub = Raw::v5(broker.addr, "sub").await;
    sub.subscribe("ret/#", sub_opts(QoS::AtLeastOnce)).await;
    let mut got = Vec::new();
    loop {
        match sub.recv_within(QUIET).await {
            Recv::Packet(Packet::Publish(p)) => {
                assert!(p.retain);
                sub.puback(p.packet_id.unwrap()).await;
                got.push((p.topic, String::from_utf8(p.payload.to_vec()).unwrap()));
            }
            Recv::Timeout => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            ("ret/kept".to_string(), "kept".to_string()),
            ("ret/replaced".to_string(), "v2".to_string()),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_disconnects_v5_clients_with_0x8b_and_keeps_state() {
    let mut dir = ProcDir::new();
    let mut broker = dir.start().await;
    let (mut sub, _) = Raw::connect(broker.addr, V5, "term", persistent).await;
    sub.subscribe("term/t", sub_opts(QoS::AtLeastOnce)).await;
    let mut v3 = Raw::v3(broker.addr, "term3").await;
    let mut publ = Raw::v5(broker.addr, "pub").await;
    publish_pipelined(&mut publ, "term/t", 5).await;
    for want in 1..=5 {
        let p = sub.recv_publish().await;
        assert_eq!(number(&p), want);
        if want <= 2 {
            sub.puback(p.packet_id.unwrap()).await;
        }
    }
    sub.ping().await;

    let status = broker.terminate().await;
    assert!(status.success(), "exit status {status}");
    sub.expect_disconnect(ReasonCode::SERVER_SHUTTING_DOWN)
        .await;
    publ.expect_disconnect(ReasonCode::SERVER_SHUTTING_DOWN)
        .await;
    assert!(v3.expect_closed().await.is_empty());

    let broker = dir.start().await;
    let (mut sub, ack) = Raw::connect(broker.addr, V5, "term", persistent).await;
    assert!(ack.session_present);
    for want in 3..=5 {
        let p = sub.recv_publish().await;
        assert_eq!(number(&p), want);
        assert!(p.dup);
        sub.puback(p.packet_id.unwrap()).await;
    }
    sub.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_shutdown_sends_0x8b() {
    let mut b = start_broker().await;
    let mut c5 = Raw::v5(b.addr, "c5").await;
    let (mut r5, _) = V5::connect(b.addr, "r5", |_| {}).await;
    b.shutdown().await;
    c5.expect_disconnect(ReasonCode::SERVER_SHUTTING_DOWN).await;
    r5.wait_closed().await;
    // The listener is gone.
    assert!(tokio::net::TcpStream::connect(b.addr).await.is_err());
}

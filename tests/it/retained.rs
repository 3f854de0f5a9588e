//! Retained messages and the subscription options around them (Retain Handling, Retain As
//! Published, No Local).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::support::*;
use tiermq_common::codec::{Packet, Publish};
use tiermq_common::session_api::SubscriptionOptions;
use tiermq_common::{QoS, ReasonCode};

fn retained(topic: &str, qos: QoS, pid: Option<u16>, payload: &[u8]) -> Publish {
    let mut p = publish_packet(topic, qos, pid, payload);
    p.retain = true;
    p
}

/// Publishes a retained QoS1 message and waits for its PUBACK.
async fn retain(publ: &mut Raw, topic: &str, payload: &[u8]) {
    publ.publish_qos1(retained(topic, QoS::AtLeastOnce, Some(1), payload))
        .await;
}

fn opts(qos: QoS, retain_handling: u8) -> SubscriptionOptions {
    SubscriptionOptions {
        qos,
        retain_handling,
        ..SubscriptionOptions::default()
    }
}

/// Collects PUBLISHes until [`QUIET`] passes without one; acks QoS1 ones.
async fn drain(c: &mut Raw) -> Vec<Publish> {
    let mut out = Vec::new();
    loop {
        match c.recv_within(QUIET).await {
            Recv::Packet(Packet::Publish(p)) => {
                if let Some(pid) = p.packet_id {
                    c.puback(pid).await;
                }
                out.push(p);
            }
            Recv::Timeout => return out,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_is_stored_replaced_and_deleted() {
    let b = start_broker().await;
    let mut live = Raw::v5(b.addr, "live").await;
    live.subscribe("r/a", sub_opts(QoS::AtLeastOnce)).await;
    let mut publ = Raw::v5(b.addr, "pub").await;

    retain(&mut publ, "r/a", b"v1").await;
    // Live delivery of a retained publish: RETAIN cleared (Retain As Published off).
    let p = live.recv_publish().await;
    assert_eq!((&p.payload[..], p.retain), (&b"v1"[..], false));
    live.puback(p.packet_id.unwrap()).await;

    let mut late = Raw::v5(b.addr, "late1").await;
    late.subscribe("r/a", sub_opts(QoS::AtLeastOnce)).await;
    let got = drain(&mut late).await;
    assert_eq!(got.len(), 1);
    assert!(got[0].retain, "sent because of the subscribe: RETAIN=1");
    assert_eq!(&got[0].payload[..], b"v1");
    assert_eq!(got[0].qos, QoS::AtLeastOnce);

    // Replaced.
    retain(&mut publ, "r/a", b"v2").await;
    let mut late = Raw::v5(b.addr, "late2").await;
    late.subscribe("r/a", sub_opts(QoS::AtLeastOnce)).await;
    let got = drain(&mut late).await;
    assert_eq!(got.len(), 1, "only the newest retained message: {got:?}");
    assert_eq!(&got[0].payload[..], b"v2");

    // Deleted by an empty retained payload, which is still delivered to current subscribers.
    drain(&mut live).await;
    retain(&mut publ, "r/a", b"").await;
    let p = live.recv_publish().await;
    assert!(p.payload.is_empty());
    live.puback(p.packet_id.unwrap()).await;
    let mut late = Raw::v5(b.addr, "late3").await;
    late.subscribe("r/a", sub_opts(QoS::AtLeastOnce)).await;
    assert!(
        drain(&mut late).await.is_empty(),
        "deleted retained message came back"
    );

    // A QoS0 retained publish is retained too.
    publ.send(&Packet::Publish(retained(
        "r/q0",
        QoS::AtMostOnce,
        None,
        b"zero",
    )))
    .await;
    publ.ping().await;
    let mut late = Raw::v5(b.addr, "late4").await;
    late.subscribe("r/q0", sub_opts(QoS::AtLeastOnce)).await;
    let got = drain(&mut late).await;
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].qos, got[0].retain), (QoS::AtMostOnce, true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_qos_is_capped_by_the_subscription() {
    let b = start_broker().await;
    let mut publ = Raw::v5(b.addr, "pub").await;
    retain(&mut publ, "rq", b"x").await;
    let mut s0 = Raw::v5(b.addr, "s0").await;
    s0.subscribe("rq", sub_opts(QoS::AtMostOnce)).await;
    assert_eq!(s0.recv_publish().await.qos, QoS::AtMostOnce);
    let mut s1 = Raw::v5(b.addr, "s1").await;
    s1.subscribe("rq", sub_opts(QoS::ExactlyOnce)).await;
    assert_eq!(s1.recv_publish().await.qos, QoS::AtLeastOnce);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_handling_0_1_2() {
    let b = start_broker().await;
    let mut publ = Raw::v5(b.addr, "pub").await;
    retain(&mut publ, "rh/t", b"kept").await;
    let mut c = Raw::v5(b.addr, "rh").await;

    // 0: on every subscribe.
    c.subscribe("rh/t", opts(QoS::AtLeastOnce, 0)).await;
    assert_eq!(drain(&mut c).await.len(), 1);
    c.subscribe("rh/t", opts(QoS::AtLeastOnce, 0)).await;
    assert_eq!(drain(&mut c).await.len(), 1, "RH 0 resends on re-subscribe");

    // 1: only if the subscription did not exist.
    c.subscribe("rh/+", opts(QoS::AtLeastOnce, 1)).await;
    let got = drain(&mut c).await;
    assert_eq!(got.len(), 1, "RH 1 on a new subscription: {got:?}");
    c.subscribe("rh/+", opts(QoS::AtLeastOnce, 1)).await;
    assert!(
        drain(&mut c).await.is_empty(),
        "RH 1 on an existing subscription"
    );

    // 2: never.
    c.subscribe("rh/#", opts(QoS::AtLeastOnce, 2)).await;
    assert!(drain(&mut c).await.is_empty(), "RH 2 sends nothing");

    // Retain handling does not affect live messages.
    publ.publish_qos1(publish_packet("rh/t", QoS::AtLeastOnce, Some(2), b"live"))
        .await;
    let got = drain(&mut c).await;
    assert_eq!(got.len(), 1, "one delivery for overlapping subscriptions");
    assert_eq!(&got[0].payload[..], b"live");
}

async fn wildcard_case(partitions: u32) {
    let b = start_broker_with(|s| s.storage.partitions = partitions).await;
    let mut publ = Raw::v5(b.addr, "pub").await;
    for t in ["w/1", "w/2", "w/x/3", "v/1", "w"] {
        retain(&mut publ, t, t.as_bytes()).await;
    }
    let cases: [(&str, &[&str]); 5] = [
        ("w/#", &["w", "w/1", "w/2", "w/x/3"]),
        ("w/+", &["w/1", "w/2"]),
        ("+/1", &["v/1", "w/1"]),
        ("#", &["v/1", "w", "w/1", "w/2", "w/x/3"]),
        ("w/x/3", &["w/x/3"]),
    ];
    for (i, (filter, want)) in cases.iter().enumerate() {
        let mut c = Raw::v5(b.addr, &format!("wc{i}")).await;
        c.subscribe(filter, sub_opts(QoS::AtLeastOnce)).await;
        let got: BTreeMap<String, Vec<u8>> = drain(&mut c)
            .await
            .into_iter()
            .map(|p| {
                assert!(p.retain);
                (p.topic, p.payload.to_vec())
            })
            .collect();
        let topics: Vec<&str> = got.keys().map(|s| s.as_str()).collect();
        assert_eq!(
            &topics, want,
            "filter {filter} with {partitions} partitions"
        );
        for (t, payload) in &got {
            assert_eq!(t.as_bytes(), &payload[..]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_subscribe_gets_every_matching_retained_message() {
    wildcard_case(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_retained_across_partitions() {
    wildcard_case(4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_as_published() {
    let b = start_broker().await;
    let mut rap = Raw::v5(b.addr, "rap").await;
    rap.subscribe(
        "rap/t",
        SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            retain_as_published: true,
            ..Default::default()
        },
    )
    .await;
    let mut plain = Raw::v5(b.addr, "plain").await;
    plain.subscribe("rap/t", sub_opts(QoS::AtLeastOnce)).await;
    let mut v3 = Raw::v3(b.addr, "v3").await;
    v3.subscribe("rap/t", sub_opts(QoS::AtLeastOnce)).await;

    let mut publ = Raw::v5(b.addr, "pub").await;
    retain(&mut publ, "rap/t", b"r").await;
    assert!(rap.recv_publish().await.retain, "RAP=1 keeps RETAIN");
    assert!(!plain.recv_publish().await.retain, "RAP=0 clears RETAIN");
    assert!(
        !v3.recv_publish().await.retain,
        "3.1.1 live delivery clears RETAIN"
    );

    publ.publish_qos1(publish_packet("rap/t", QoS::AtLeastOnce, Some(2), b"n"))
        .await;
    assert!(
        !rap.recv_publish().await.retain,
        "non-retained stays non-retained"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_local() {
    let b = start_broker().await;
    let mut me = Raw::v5(b.addr, "me").await;
    me.subscribe(
        "nl/t",
        SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            no_local: true,
            ..Default::default()
        },
    )
    .await;
    me.subscribe("nl/other", sub_opts(QoS::AtLeastOnce)).await;

    // Own message on the No Local subscription: not delivered back.
    let ack = me
        .publish_qos1(publish_packet("nl/t", QoS::AtLeastOnce, Some(1), b"mine"))
        .await;
    assert!(!ack.reason_code.is_error());
    me.send(&Packet::Publish(publish_packet(
        "nl/t",
        QoS::AtMostOnce,
        None,
        b"mine0",
    )))
    .await;
    me.expect_silence().await;

    // Without No Local the client gets its own message (PUBACK and delivery in any order).
    me.send(&Packet::Publish(publish_packet(
        "nl/other",
        QoS::AtLeastOnce,
        Some(2),
        b"own",
    )))
    .await;
    let (mut acked, mut delivered) = (false, false);
    for _ in 0..2 {
        match me.recv().await {
            Packet::PubAck(a) => {
                assert_eq!((a.packet_id, a.reason_code), (2, ReasonCode::SUCCESS));
                acked = true;
            }
            Packet::Publish(p) => {
                assert_eq!(&p.payload[..], b"own");
                me.puback(p.packet_id.unwrap()).await;
                delivered = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(acked && delivered);

    // Someone else's message arrives.
    let mut other = Raw::v5(b.addr, "other").await;
    other
        .publish_qos1(publish_packet("nl/t", QoS::AtLeastOnce, Some(1), b"theirs"))
        .await;
    assert_eq!(&me.recv_publish().await.payload[..], b"theirs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_with_real_v3_client() {
    let b = start_broker().await;
    let (mut publ, _) = V3::connect(b.addr, "p", |_| {}).await;
    publ.client
        .publish("rr/t", Q3::AtLeastOnce, true, "hello")
        .await
        .unwrap();
    // Stored once acknowledged.
    publ.next_matching(|p| matches!(p, rumqttc::Incoming::PubAck(_)))
        .await;
    let (mut s, _) = V3::connect(b.addr, "s", |_| {}).await;
    s.subscribe("rr/#", Q3::AtLeastOnce).await;
    let p = s.next_publish().await;
    assert_eq!(p.topic, "rr/t");
    assert!(p.retain);
    assert_eq!(&p.payload[..], b"hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_retained_message_is_not_delivered() {
    let b = start_broker().await;
    let mut publ = Raw::v5(b.addr, "pub").await;
    let mut p = retained("re/short", QoS::AtLeastOnce, Some(1), b"short");
    p.properties.message_expiry_interval = Some(1);
    publ.publish_qos1(p).await;
    let mut p = retained("re/long", QoS::AtLeastOnce, Some(2), b"long");
    p.properties.message_expiry_interval = Some(100);
    publ.publish_qos1(p).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut c = Raw::v5(b.addr, "c").await;
    c.subscribe("re/+", sub_opts(QoS::AtLeastOnce)).await;
    let got = drain(&mut c).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].topic, "re/long");
    let left = got[0].properties.message_expiry_interval.unwrap();
    assert!((95..100).contains(&left), "expiry {left} not decremented");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_not_available() {
    let b = start_broker_with(|s| s.mqtt.retain_available = false).await;
    let mut publ = Raw::v5(b.addr, "pub").await;
    publ.send(&Packet::Publish(retained(
        "na",
        QoS::AtLeastOnce,
        Some(1),
        b"x",
    )))
    .await;
    publ.expect_disconnect(ReasonCode::RETAIN_NOT_SUPPORTED)
        .await;
    assert_broker_healthy(b.addr).await;
}

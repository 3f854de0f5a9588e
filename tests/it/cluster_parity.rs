//! The standalone integration tests' most valuable checks, as bodies that run against both
//! targets: the in-process standalone broker and a process cluster (3 backends, 2 frontends,
//! one cluster shared by this file's tests). Each body uses "frontends" `t.addr(0)` and
//! `t.addr(1)` — the same listener standalone, two different frontends in the cluster — and
//! client ids / topics prefixed with its own name.
//!
//! `both!(name, body)` makes `name::standalone` and `name::cluster`.

use std::collections::HashSet;
use std::time::Duration;

use crate::both;
use crate::support::cluster::Target;
use crate::support::*;
use bytes::Bytes;
use tiermq_common::codec::{
    Connect, LastWill, Packet, PubComp, PubRel, Publish, Unsubscribe, WillProperties,
};
use tiermq_common::session_api::SubscriptionOptions;
use tiermq_common::{ProtocolVersion, QoS, ReasonCode};

const V5: ProtocolVersion = ProtocolVersion::V5;
const V3: ProtocolVersion = ProtocolVersion::V311;

fn persistent(expiry: u32) -> impl Fn(&mut Connect) {
    move |c: &mut Connect| {
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(expiry);
    }
}

async fn publish_n(publ: &mut Raw, topic: &str, tag: &str, n: u16, expect: ReasonCode) {
    for i in 1..=n {
        let ack = publ
            .publish_qos1(publish_packet(
                topic,
                QoS::AtLeastOnce,
                Some(i),
                format!("{tag}-{i}").as_bytes(),
            ))
            .await;
        assert_eq!(ack.reason_code, expect, "message {i}");
    }
}

/// Every PUBLISH that arrives within a short quiet period, acked.
async fn drain(c: &mut Raw) -> Vec<Publish> {
    let mut out = Vec::new();
    loop {
        match c.recv_within(Duration::from_millis(500)).await {
            Recv::Packet(Packet::Publish(p)) => {
                if let Some(pid) = p.packet_id {
                    c.puback(pid).await;
                }
                out.push(p);
            }
            Recv::Packet(other) => panic!("unexpected {other:?}"),
            Recv::Timeout => return out,
            Recv::Closed => panic!("closed"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Publish / subscribe (publish.rs)
// ---------------------------------------------------------------------------------------------

/// v5 QoS0 and QoS1 through rumqttc; QoS downgraded to the granted QoS.
async fn v5_qos0_qos1(t: Target, x: &str) {
    let (mut sub, _) = V5::connect(t.addr(1), &format!("{x}-sub"), |_| {}).await;
    sub.subscribe(&format!("{x}/0"), Q5::AtMostOnce).await;
    sub.subscribe(&format!("{x}/1"), Q5::AtLeastOnce).await;
    let (mut publ, _) = V5::connect(t.addr(0), &format!("{x}-pub"), |_| {}).await;
    publ.client
        .publish(format!("{x}/0"), Q5::AtLeastOnce, false, "zero")
        .await
        .unwrap();
    let p = sub.next_publish().await;
    assert_eq!(p.qos, Q5::AtMostOnce, "downgraded to the granted QoS");
    assert_eq!(&p.payload[..], b"zero");
    assert_eq!(
        publ.publish_qos1(&format!("{x}/1"), b"one").await,
        rumqttc::v5::mqttbytes::v5::PubAckReason::Success
    );
    let p = sub.next_publish().await;
    assert_eq!(p.qos, Q5::AtLeastOnce);
    assert_eq!(&p.payload[..], b"one");
}
both!(v5_qos0_qos1_pubsub, v5_qos0_qos1);

/// 3.1.1 QoS0 and QoS1 through rumqttc, and cross-version delivery.
async fn v3_qos0_qos1(t: Target, x: &str) {
    let (mut sub, _) = V3::connect(t.addr(1), &format!("{x}-sub"), |_| {}).await;
    sub.subscribe(&format!("{x}/#"), Q3::AtLeastOnce).await;
    let (mut publ, _) = V3::connect(t.addr(0), &format!("{x}-pub"), |_| {}).await;
    publ.client
        .publish(format!("{x}/a"), Q3::AtMostOnce, false, "zero")
        .await
        .unwrap();
    publ.publish_qos1(&format!("{x}/b"), b"one").await;
    let mut got: Vec<(String, Q3)> = Vec::new();
    for _ in 0..2 {
        let p = sub.next_publish().await;
        got.push((String::from_utf8_lossy(&p.payload).into(), p.qos));
    }
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got,
        vec![
            ("one".to_string(), Q3::AtLeastOnce),
            ("zero".to_string(), Q3::AtMostOnce)
        ]
    );
    // A v5 publisher reaches the 3.1.1 subscriber.
    let mut p5 = Raw::v5(t.addr(0), &format!("{x}-p5")).await;
    publish_n(&mut p5, &format!("{x}/c"), "v5", 1, ReasonCode::SUCCESS).await;
    assert_eq!(&sub.next_publish().await.payload[..], b"v5-1");
}
both!(v3_qos0_qos1_pubsub, v3_qos0_qos1);

/// 200 QoS1 messages, pipelined, arrive complete and in order.
async fn many_in_order(t: Target, x: &str) {
    let topic = format!("{x}/seq");
    let mut sub = Raw::v5(t.addr(1), &format!("{x}-sub")).await;
    sub.subscribe(&topic, sub_opts(QoS::AtLeastOnce)).await;
    let mut publ = Raw::v5(t.addr(0), &format!("{x}-pub")).await;
    let n = 200u16;
    for i in 1..=n {
        publ.send(&Packet::Publish(publish_packet(
            &topic,
            QoS::AtLeastOnce,
            Some(i),
            format!("{i}").as_bytes(),
        )))
        .await;
    }
    let mut acks = 0;
    let mut next = 1u16;
    while acks < n || next <= n {
        tokio::select! {
            r = publ.recv_within(WAIT), if acks < n => match r {
                Recv::Packet(Packet::PubAck(a)) => {
                    acks += 1;
                    assert_eq!(a.packet_id, acks, "PUBACKs in order");
                }
                other => panic!("publisher: {other:?}"),
            },
            r = sub.recv_within(WAIT), if next <= n => match r {
                Recv::Packet(Packet::Publish(p)) => {
                    assert_eq!(p.payload, format!("{next}").into_bytes(), "order");
                    sub.puback(p.packet_id.unwrap()).await;
                    next += 1;
                }
                other => panic!("subscriber after {}: {other:?}", next - 1),
            },
        }
    }
    sub.expect_silence().await;
}
both!(many_qos1_in_order, many_in_order);

/// Inbound QoS2 exactly once: a DUP re-send before PUBREL is not forwarded again; outbound
/// QoS2 handshake completes.
async fn qos2_exactly_once(t: Target, x: &str) {
    let topic = format!("{x}/q2");
    let mut sub = Raw::v5(t.addr(1), &format!("{x}-sub")).await;
    sub.subscribe(&topic, sub_opts(QoS::ExactlyOnce)).await;
    let mut publ = Raw::v5(t.addr(0), &format!("{x}-pub")).await;
    let mut p = publish_packet(&topic, QoS::ExactlyOnce, Some(11), b"exactly");
    for dup in [false, true] {
        p.dup = dup;
        publ.send(&Packet::Publish(p.clone())).await;
        match publ.recv().await {
            Packet::PubRec(r) => assert_eq!(r.packet_id, 11),
            other => panic!("expected PUBREC, got {other:?}"),
        }
    }
    publ.send(&Packet::PubRel(PubRel::new(11))).await;
    match publ.recv().await {
        Packet::PubComp(c) => assert_eq!(c.packet_id, 11),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
    let d = sub.recv_publish().await;
    assert_eq!(d.qos, QoS::ExactlyOnce);
    assert_eq!(&d.payload[..], b"exactly");
    let pid = d.packet_id.unwrap();
    sub.send(&Packet::PubRec(tiermq_common::codec::PubRec::new(pid)))
        .await;
    match sub.recv().await {
        Packet::PubRel(r) => assert_eq!(r.packet_id, pid),
        other => panic!("expected PUBREL, got {other:?}"),
    }
    sub.send(&Packet::PubComp(PubComp::new(pid))).await;
    sub.expect_silence().await;
}
both!(qos2_inbound_exactly_once, qos2_exactly_once);

/// QoS2 exactly once across a reconnect between PUBREC and PUBREL, both directions:
/// - inbound: the publisher gets PUBREC, loses its connection, reconnects (to the *other*
///   frontend in the cluster), re-sends the PUBLISH with DUP (it may not know PUBREC arrived):
///   PUBREC again, not forwarded again; then PUBREL → PUBCOMP;
/// - outbound: the subscriber sends PUBREC, loses its connection before PUBREL, reconnects:
///   the broker re-sends PUBREL (not the PUBLISH), PUBCOMP ends it, nothing arrives twice.
async fn qos2_across_reconnect(t: Target, x: &str) {
    let topic = format!("{x}/q2r");
    let sub_id = format!("{x}-sub");
    let pub_id = format!("{x}-pub");
    let (mut sub, _) = Raw::connect(t.addr(1), V5, &sub_id, persistent(300)).await;
    sub.subscribe(&topic, sub_opts(QoS::ExactlyOnce)).await;

    let (mut publ, _) = Raw::connect(t.addr(0), V5, &pub_id, persistent(300)).await;
    let p = publish_packet(&topic, QoS::ExactlyOnce, Some(21), b"once");
    publ.send(&Packet::Publish(p.clone())).await;
    match publ.recv().await {
        Packet::PubRec(r) => assert_eq!(r.packet_id, 21),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    drop(publ); // connection lost before PUBREL
    let (mut publ, ack) = Raw::connect(t.addr(1), V5, &pub_id, persistent(300)).await;
    assert!(ack.session_present);
    let mut again = p.clone();
    again.dup = true;
    publ.send(&Packet::Publish(again)).await;
    match publ.recv().await {
        Packet::PubRec(r) => assert_eq!(r.packet_id, 21),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    publ.send(&Packet::PubRel(PubRel::new(21))).await;
    match publ.recv().await {
        Packet::PubComp(c) => {
            assert_eq!(c.packet_id, 21);
            assert_eq!(c.reason_code, ReasonCode::SUCCESS, "the id was known");
        }
        other => panic!("expected PUBCOMP, got {other:?}"),
    }

    // The subscriber gets it once, PUBRECs, and loses its connection before PUBREL arrives.
    let d = sub.recv_publish().await;
    assert_eq!(&d.payload[..], b"once");
    let pid = d.packet_id.unwrap();
    sub.send(&Packet::PubRec(tiermq_common::codec::PubRec::new(pid)))
        .await;
    drop(sub);
    let (mut sub, ack) = Raw::connect(t.addr(0), V5, &sub_id, persistent(300)).await;
    assert!(ack.session_present);
    // Depending on timing the PUBREC may or may not have been recorded before the
    // connection dropped: either PUBREL (recorded) or the PUBLISH again with DUP and the
    // same packet id (not recorded) — never a new message.
    match sub.recv().await {
        Packet::PubRel(r) => assert_eq!(r.packet_id, pid),
        Packet::Publish(again) => {
            assert!(again.dup);
            assert_eq!(again.packet_id, Some(pid));
            sub.send(&Packet::PubRec(tiermq_common::codec::PubRec::new(pid)))
                .await;
            match sub.recv().await {
                Packet::PubRel(r) => assert_eq!(r.packet_id, pid),
                other => panic!("expected PUBREL, got {other:?}"),
            }
        }
        other => panic!("expected PUBREL, got {other:?}"),
    }
    sub.send(&Packet::PubComp(PubComp::new(pid))).await;
    sub.expect_silence().await;
    // Nothing comes back on yet another reconnect: the exchange is over.
    drop(sub);
    let (mut sub, _) = Raw::connect(t.addr(1), V5, &sub_id, persistent(300)).await;
    sub.expect_silence().await;
}
both!(qos2_exactly_once_across_reconnect, qos2_across_reconnect);

/// PUBACK 0x10 when nobody subscribes; 0x00 once somebody (on the other frontend) does.
async fn no_matching(t: Target, x: &str) {
    let topic = format!("{x}/lonely");
    let mut publ = Raw::v5(t.addr(0), &format!("{x}-pub")).await;
    publish_n(
        &mut publ,
        &topic,
        "a",
        1,
        ReasonCode::NO_MATCHING_SUBSCRIBERS,
    )
    .await;
    let mut sub = Raw::v5(t.addr(1), &format!("{x}-sub")).await;
    sub.subscribe(&topic, sub_opts(QoS::AtMostOnce)).await;
    publish_n(&mut publ, &topic, "b", 1, ReasonCode::SUCCESS).await;
    assert_eq!(&sub.recv_publish().await.payload[..], b"b-1");
}
both!(puback_0x10_when_nobody_subscribes, no_matching);

/// After UNSUBACK nothing more is delivered for the filter.
async fn unsubscribe(t: Target, x: &str) {
    let topic = format!("{x}/u");
    let mut sub = Raw::v5(t.addr(1), &format!("{x}-sub")).await;
    sub.subscribe(&topic, sub_opts(QoS::AtLeastOnce)).await;
    let mut publ = Raw::v5(t.addr(0), &format!("{x}-pub")).await;
    publish_n(&mut publ, &topic, "before", 1, ReasonCode::SUCCESS).await;
    let p = sub.recv_publish().await;
    sub.puback(p.packet_id.unwrap()).await;
    sub.send(&Packet::Unsubscribe(Unsubscribe {
        packet_id: 3,
        filters: vec![topic.clone()],
        properties: Default::default(),
    }))
    .await;
    match sub.recv().await {
        Packet::UnsubAck(u) => assert_eq!(u.packet_id, 3),
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    publish_n(
        &mut publ,
        &topic,
        "after",
        1,
        ReasonCode::NO_MATCHING_SUBSCRIBERS,
    )
    .await;
    sub.expect_silence().await;
}
both!(unsubscribe_stops_delivery, unsubscribe);

// ---------------------------------------------------------------------------------------------
// Retained (retained.rs)
// ---------------------------------------------------------------------------------------------

async fn retain(publ: &mut Raw, topic: &str, payload: &[u8], pid: u16) {
    let mut p = publish_packet(topic, QoS::AtLeastOnce, Some(pid), payload);
    p.retain = true;
    publ.publish_qos1(p).await;
}

fn rh(qos: QoS, retain_handling: u8) -> SubscriptionOptions {
    SubscriptionOptions {
        qos,
        retain_handling,
        ..SubscriptionOptions::default()
    }
}

/// Stored, replaced, deleted; a wildcard subscriber gets every matching one.
async fn retained_lifecycle(t: Target, x: &str) {
    let mut publ = Raw::v5(t.addr(0), &format!("{x}-pub")).await;
    for i in 0..8u16 {
        retain(&mut publ, &format!("{x}/r/{i}"), b"v1", i + 1).await;
    }
    retain(&mut publ, &format!("{x}/r/0"), b"v2", 20).await;
    retain(&mut publ, &format!("{x}/r/1"), b"", 21).await;
    let mut c = Raw::v5(t.addr(1), &format!("{x}-sub")).await;
    c.subscribe(&format!("{x}/r/#"), sub_opts(QoS::AtLeastOnce))
        .await;
    let got = drain(&mut c).await;
    let topics: HashSet<String> = got.iter().map(|p| p.topic.clone()).collect();
    assert_eq!(got.len(), 7, "{got:?}");
    assert_eq!(topics.len(), 7);
    assert!(!topics.contains(&format!("{x}/r/1")), "deleted came back");
    assert!(got.iter().all(|p| p.retain));
    let zero = got.iter().find(|p| p.topic == format!("{x}/r/0")).unwrap();
    assert_eq!(&zero.payload[..], b"v2", "replaced");
}
both!(retained_stored_replaced_deleted, retained_lifecycle);

/// Retain Handling 0, 1 and 2.
async fn retain_handling(t: Target, x: &str) {
    let topic = format!("{x}/rh/t");
    let mut publ = Raw::v5(t.addr(0), &format!("{x}-pub")).await;
    retain(&mut publ, &topic, b"kept", 1).await;
    let mut c = Raw::v5(t.addr(1), &format!("{x}-sub")).await;
    c.subscribe(&topic, rh(QoS::AtLeastOnce, 0)).await;
    assert_eq!(drain(&mut c).await.len(), 1);
    c.subscribe(&topic, rh(QoS::AtLeastOnce, 0)).await;
    assert_eq!(drain(&mut c).await.len(), 1, "RH 0 resends on re-subscribe");
    let plus = format!("{x}/rh/+");
    c.subscribe(&plus, rh(QoS::AtLeastOnce, 1)).await;
    assert_eq!(drain(&mut c).await.len(), 1, "RH 1 on a new subscription");
    c.subscribe(&plus, rh(QoS::AtLeastOnce, 1)).await;
    assert!(drain(&mut c).await.is_empty(), "RH 1 on an existing one");
    c.subscribe(&format!("{x}/rh/#"), rh(QoS::AtLeastOnce, 2))
        .await;
    assert!(drain(&mut c).await.is_empty(), "RH 2 sends nothing");
    publ.publish_qos1(publish_packet(&topic, QoS::AtLeastOnce, Some(2), b"live"))
        .await;
    let got = drain(&mut c).await;
    assert_eq!(got.len(), 1, "one delivery for overlapping subscriptions");
    assert_eq!(&got[0].payload[..], b"live");
}
both!(retain_handling_0_1_2, retain_handling);

// ---------------------------------------------------------------------------------------------
// Sessions (sessions.rs, connect.rs)
// ---------------------------------------------------------------------------------------------

/// Offline queue in order, Session Present, QoS0 not queued; v5 and 3.1.1.
async fn offline_queue(t: Target, x: &str) {
    for (version, n) in [(V5, 0usize), (V3, 1)] {
        let id = format!("{x}-s{n}");
        let topic = format!("{x}/q{n}");
        let (mut s, ack) = Raw::connect(t.addr(0), version, &id, persistent(300)).await;
        assert!(!ack.session_present);
        s.subscribe(&topic, sub_opts(QoS::AtLeastOnce)).await;
        s.disconnect(ReasonCode::NORMAL_DISCONNECTION).await;
        let mut publ = Raw::v5(t.addr(1), &format!("{x}-pub{n}")).await;
        publish_n(&mut publ, &topic, "m", 20, ReasonCode::SUCCESS).await;
        publ.send(&Packet::Publish(publish_packet(
            &topic,
            QoS::AtMostOnce,
            None,
            b"q0",
        )))
        .await;
        publ.ping().await;
        let (mut s, ack) = Raw::connect(t.addr(1), version, &id, persistent(300)).await;
        assert!(ack.session_present, "{id}");
        for i in 1..=20 {
            let p = s.recv_publish().await;
            assert_eq!(p.payload, format!("m-{i}").into_bytes(), "{id}: order");
            assert!(!p.dup);
            s.puback(p.packet_id.unwrap()).await;
        }
        s.expect_silence().await;
        s.disconnect(ReasonCode::NORMAL_DISCONNECTION).await;
        // Clean start ends the session.
        let (s, ack) = Raw::connect(t.addr(0), version, &id, |_| {}).await;
        assert!(!ack.session_present);
        s.disconnect(ReasonCode::NORMAL_DISCONNECTION).await;
        let (_s, ack) = Raw::connect(t.addr(1), version, &id, persistent(300)).await;
        assert!(!ack.session_present, "{id}: gone after clean start");
    }
}
both!(offline_queue_and_session_present, offline_queue);

/// Unacked deliveries come again after reconnect: DUP, same packet ids.
async fn redelivery(t: Target, x: &str) {
    let id = format!("{x}-re");
    let topic = format!("{x}/re");
    let (mut s, _) = Raw::connect(t.addr(0), V5, &id, persistent(300)).await;
    s.subscribe(&topic, sub_opts(QoS::AtLeastOnce)).await;
    let mut publ = Raw::v5(t.addr(1), &format!("{x}-pub")).await;
    publish_n(&mut publ, &topic, "m", 3, ReasonCode::SUCCESS).await;
    let first = [
        s.recv_publish().await,
        s.recv_publish().await,
        s.recv_publish().await,
    ];
    s.puback(first[0].packet_id.unwrap()).await;
    s.ping().await;
    drop(s);
    let (mut s, ack) = Raw::connect(t.addr(1), V5, &id, persistent(300)).await;
    assert!(ack.session_present);
    for orig in &first[1..] {
        let mut p = s.recv_publish().await;
        if t.is_cluster() && p.packet_id == first[0].packet_id {
            // The ack went to a partition leader that was just replaced: a duplicate MQTT
            // allows (the cluster's acks are not retried).
            assert!(p.dup);
            s.puback(p.packet_id.unwrap()).await;
            p = s.recv_publish().await;
        }
        assert!(p.dup, "redelivery carries DUP");
        assert_eq!(p.packet_id, orig.packet_id, "same packet id");
        assert_eq!(p.payload, orig.payload);
        s.puback(p.packet_id.unwrap()).await;
    }
    s.expect_silence().await;
}
both!(unacked_redelivered_with_dup_and_same_ids, redelivery);

/// Takeover: v5 old connection gets DISCONNECT 0x8E, 3.1.1 old connection is closed; the
/// new connection owns the session.
async fn takeover(t: Target, x: &str) {
    let id = format!("{x}-twin");
    let topic = format!("{x}/tw");
    let (mut old, _) = Raw::connect(t.addr(0), V5, &id, persistent(300)).await;
    old.subscribe(&topic, sub_opts(QoS::AtLeastOnce)).await;
    let (mut new, ack) = Raw::connect(t.addr(1), V5, &id, persistent(300)).await;
    assert!(ack.session_present);
    old.expect_disconnect(ReasonCode::SESSION_TAKEN_OVER).await;
    let mut publ = Raw::v5(t.addr(0), &format!("{x}-pub")).await;
    publish_n(&mut publ, &topic, "m", 1, ReasonCode::SUCCESS).await;
    let p = new.recv_publish().await;
    assert_eq!(&p.payload[..], b"m-1");
    new.puback(p.packet_id.unwrap()).await;

    let id3 = format!("{x}-twin3");
    let (mut old3, _) = Raw::connect(t.addr(1), V3, &id3, |c| c.clean_start = false).await;
    old3.ping().await;
    let (mut new3, ack) = Raw::connect(t.addr(0), V3, &id3, |c| c.clean_start = false).await;
    assert!(ack.session_present);
    let seen = old3.expect_closed().await;
    assert!(seen.is_empty(), "{seen:?}");
    new3.ping().await;
}
both!(takeover_closes_the_old_connection, takeover);

// ---------------------------------------------------------------------------------------------
// Wills (wills.rs)
// ---------------------------------------------------------------------------------------------

fn will(topic: &str, payload: &str) -> LastWill {
    LastWill {
        topic: topic.into(),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: WillProperties::default(),
    }
}

/// A will fires once on abnormal close (v5 with properties, 3.1.1), not on DISCONNECT; a
/// takeover fires the old connection's will.
async fn wills(t: Target, x: &str) {
    let mut w = Raw::v5(t.addr(1), &format!("{x}-watch")).await;
    w.subscribe(&format!("{x}/will/#"), sub_opts(QoS::AtLeastOnce))
        .await;
    for (version, n) in [(V5, 5), (V3, 3)] {
        let (c, _) = Raw::connect(t.addr(0), version, &format!("{x}-dies{n}"), |c| {
            let mut lw = will(&format!("{x}/will/dies{n}"), "gone");
            lw.properties.content_type = Some("text/plain".into());
            c.will = Some(lw);
        })
        .await;
        drop(c); // TCP close without DISCONNECT
        let p = w.recv_publish().await;
        assert_eq!(p.topic, format!("{x}/will/dies{n}"));
        assert_eq!(&p.payload[..], b"gone");
        if version == V5 {
            assert_eq!(p.properties.content_type.as_deref(), Some("text/plain"));
        }
        w.puback(p.packet_id.unwrap()).await;
        let (c, _) = Raw::connect(t.addr(0), version, &format!("{x}-polite{n}"), |c| {
            c.will = Some(will(&format!("{x}/will/polite{n}"), "no"));
        })
        .await;
        c.disconnect(ReasonCode::NORMAL_DISCONNECTION).await;
    }
    // Takeover publishes the old connection's will.
    let id = format!("{x}-tw");
    let (_old, _) = Raw::connect(t.addr(0), V5, &id, |c| {
        c.will = Some(will(&format!("{x}/will/tw"), "old"));
    })
    .await;
    let (_new, _) = Raw::connect(t.addr(1), V5, &id, |_| {}).await;
    let p = w.recv_publish().await;
    assert_eq!(p.topic, format!("{x}/will/tw"));
    w.puback(p.packet_id.unwrap()).await;
    match w.recv_within(Duration::from_secs(1)).await {
        Recv::Timeout => {}
        other => panic!("a will fired twice or on DISCONNECT: {other:?}"),
    }
}
both!(will_on_abnormal_close_once, wills);

// ---------------------------------------------------------------------------------------------
// Shared subscriptions (§4.8.2): members on different frontends, v5 and v3.1.1 together
// ---------------------------------------------------------------------------------------------

/// Every PUBLISH on `c` until `want` distinct payloads were seen in all or `within` passed;
/// QoS1 ones are acked.
async fn collect_until(c: &mut Raw, seen: &mut Vec<String>, want: usize, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while seen.len() < want && tokio::time::Instant::now() < deadline {
        match c.recv_within(Duration::from_millis(200)).await {
            Recv::Packet(Packet::Publish(p)) => {
                if let Some(pid) = p.packet_id {
                    c.puback(pid).await;
                }
                seen.push(String::from_utf8_lossy(&p.payload).into_owned());
            }
            Recv::Packet(other) => panic!("unexpected {other:?}"),
            Recv::Timeout => {}
            Recv::Closed => panic!("closed"),
        }
    }
}

/// Three members (v5 and v3, on both frontends) of one group: each message exactly once to
/// one member, spread round robin; a plain subscriber still gets everything.
async fn shared_group(t: Target, x: &str) {
    let group = format!("$share/{x}/{x}/work/+");
    let mut m1 = Raw::v5(t.addr(0), &format!("{x}-m1")).await;
    let mut m2 = Raw::v3(t.addr(1), &format!("{x}-m2")).await;
    let mut m3 = Raw::v5(t.addr(1), &format!("{x}-m3")).await;
    for m in [&mut m1, &mut m2, &mut m3] {
        let ack = m.subscribe(&group, sub_opts(QoS::AtLeastOnce)).await;
        assert_eq!(ack.reason_codes, vec![ReasonCode::GRANTED_QOS_1]);
    }
    let mut plain = Raw::v5(t.addr(0), &format!("{x}-plain")).await;
    plain
        .subscribe(&format!("{x}/work/#"), sub_opts(QoS::AtLeastOnce))
        .await;
    let mut publ = Raw::v5(t.addr(0), &format!("{x}-pub")).await;
    publish_n(
        &mut publ,
        &format!("{x}/work/1"),
        "m",
        30,
        ReasonCode::SUCCESS,
    )
    .await;
    let got = [
        drain(&mut m1).await,
        drain(&mut m2).await,
        drain(&mut m3).await,
    ];
    let mut all: Vec<String> = got
        .iter()
        .flatten()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect();
    let total = all.len();
    all.sort();
    all.dedup();
    assert_eq!(total, 30, "each message exactly once to the group");
    assert_eq!(all.len(), 30);
    for (i, g) in got.iter().enumerate() {
        assert!(g.len() >= 5, "member {i} got {} of 30: not spread", g.len());
    }
    assert_eq!(drain(&mut plain).await.len(), 30);
}
both!(shared_group_each_message_once, shared_group);

/// A member that took messages without acknowledging them and then vanished: its messages
/// go to the other member, none is lost.
async fn shared_member_lost(t: Target, x: &str) {
    let group = format!("$share/{x}/{x}/job");
    let (mut a, _) = Raw::connect(t.addr(0), V5, &format!("{x}-a"), persistent(300)).await;
    let mut b = Raw::v5(t.addr(1), &format!("{x}-b")).await;
    a.subscribe(&group, sub_opts(QoS::AtLeastOnce)).await;
    b.subscribe(&group, sub_opts(QoS::AtLeastOnce)).await;
    let mut publ = Raw::v5(t.addr(0), &format!("{x}-pub")).await;
    publish_n(&mut publ, &format!("{x}/job"), "m", 10, ReasonCode::SUCCESS).await;
    let mut held = Vec::new();
    while let Recv::Packet(Packet::Publish(p)) = a.recv_within(Duration::from_millis(500)).await {
        held.push(String::from_utf8_lossy(&p.payload).into_owned());
    }
    assert!(!held.is_empty(), "round robin gave a its share");
    drop(a); // no DISCONNECT, nothing acknowledged
    let mut seen = Vec::new();
    collect_until(&mut b, &mut seen, 10, Duration::from_secs(10)).await;
    let mut distinct = seen.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 10, "b got {seen:?}; a had held {held:?}");
    for m in &held {
        assert!(seen.contains(m), "{m} held by a never reached b");
    }
}
both!(
    shared_member_lost_messages_go_to_another,
    shared_member_lost
);

/// A shared subscribe does not send retained messages (§4.8.2); later publishes arrive.
async fn shared_no_retained(t: Target, x: &str) {
    let topic = format!("{x}/r");
    let mut publ = Raw::v5(t.addr(0), &format!("{x}-pub")).await;
    retain(&mut publ, &topic, b"old", 1).await;
    let mut m = Raw::v5(t.addr(1), &format!("{x}-m")).await;
    m.subscribe(&format!("$share/g/{topic}"), sub_opts(QoS::AtLeastOnce))
        .await;
    m.expect_silence().await;
    publish_n(&mut publ, &topic, "new", 1, ReasonCode::SUCCESS).await;
    let p = m.recv_publish().await;
    assert_eq!(&p.payload[..], b"new-1");
}
both!(shared_subscribe_sends_no_retained, shared_no_retained);

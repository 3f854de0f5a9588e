//! Outbound topic aliases (MQTT 5 §3.3.2.3.4): the broker teaches a v5 client an alias with
//! the first delivery of a topic and then sends the alias alone; when the client's maximum is
//! reached the least recently used alias is re-mapped.

use crate::support::*;
use tiermq_common::codec::{Connect, Publish};
use tiermq_common::{ProtocolVersion, QoS};

const V5: ProtocolVersion = ProtocolVersion::V5;

/// A v5 subscriber to `ta/#` announcing `alias_max` (None: no Topic Alias Maximum property).
async fn subscriber(
    b: &Broker,
    id: &str,
    alias_max: Option<u16>,
    tweak: impl FnOnce(&mut Connect),
) -> Raw {
    let (mut raw, ack) = Raw::connect(b.addr, V5, id, |c| {
        c.properties.topic_alias_maximum = alias_max;
        tweak(c);
    })
    .await;
    assert!(!ack.reason_code.is_error(), "{ack:?}");
    raw.subscribe("ta/#", sub_opts(QoS::AtMostOnce)).await;
    raw
}

/// Publishes QoS1 messages on `topics` in order, each with its index as payload.
async fn publish_all(b: &Broker, topics: &[&str]) {
    let mut publ = Raw::v5(b.addr, "ta-pub").await;
    for (i, t) in topics.iter().enumerate() {
        let payload = i.to_string();
        let pid = u16::try_from(i + 1).unwrap();
        publ.publish_qos1(publish_packet(
            t,
            QoS::AtLeastOnce,
            Some(pid),
            payload.as_bytes(),
        ))
        .await;
    }
}

/// (topic as sent, alias as sent) of the next delivery, checking the payload order.
async fn next(raw: &mut Raw, index: usize) -> (String, Option<u16>) {
    let p: Publish = raw.recv_publish().await;
    assert_eq!(p.payload, index.to_string().as_bytes(), "{p:?}");
    (p.topic, p.properties.topic_alias)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alias_first_delivery_carries_topic_then_alias_only() {
    let b = start_broker().await;
    let mut sub = subscriber(&b, "ta-first", Some(10), |_| {}).await;
    publish_all(&b, &["ta/a", "ta/a", "ta/b", "ta/a", "ta/b"]).await;
    assert_eq!(next(&mut sub, 0).await, ("ta/a".into(), Some(1)));
    assert_eq!(next(&mut sub, 1).await, ("".into(), Some(1)));
    assert_eq!(next(&mut sub, 2).await, ("ta/b".into(), Some(2)));
    assert_eq!(next(&mut sub, 3).await, ("".into(), Some(1)));
    assert_eq!(next(&mut sub, 4).await, ("".into(), Some(2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alias_lru_is_remapped_when_client_maximum_reached() {
    let b = start_broker().await;
    let mut sub = subscriber(&b, "ta-lru", Some(2), |_| {}).await;
    publish_all(
        &b,
        &["ta/a", "ta/b", "ta/a", "ta/c", "ta/c", "ta/b", "ta/a"],
    )
    .await;
    assert_eq!(next(&mut sub, 0).await, ("ta/a".into(), Some(1)));
    assert_eq!(next(&mut sub, 1).await, ("ta/b".into(), Some(2)));
    assert_eq!(next(&mut sub, 2).await, ("".into(), Some(1)));
    // Both aliases taken: "ta/b" (alias 2) is the least recently used and is re-mapped.
    assert_eq!(next(&mut sub, 3).await, ("ta/c".into(), Some(2)));
    assert_eq!(next(&mut sub, 4).await, ("".into(), Some(2)));
    // "ta/b" lost its alias; now "ta/a" (alias 1) is the least recently used.
    assert_eq!(next(&mut sub, 5).await, ("ta/b".into(), Some(1)));
    assert_eq!(next(&mut sub, 6).await, ("ta/a".into(), Some(2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alias_not_used_when_client_maximum_is_zero_or_absent() {
    let b = start_broker().await;
    let mut zero = subscriber(&b, "ta-zero", Some(0), |_| {}).await;
    let mut absent = subscriber(&b, "ta-absent", None, |_| {}).await;
    publish_all(&b, &["ta/a", "ta/a"]).await;
    for sub in [&mut zero, &mut absent] {
        assert_eq!(next(sub, 0).await, ("ta/a".into(), None));
        assert_eq!(next(sub, 1).await, ("ta/a".into(), None));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alias_never_sent_to_v311_clients() {
    let b = start_broker().await;
    let mut sub = Raw::v3(b.addr, "ta-v3").await;
    sub.subscribe("ta/#", sub_opts(QoS::AtMostOnce)).await;
    publish_all(&b, &["ta/a", "ta/a"]).await;
    assert_eq!(next(&mut sub, 0).await, ("ta/a".into(), None));
    assert_eq!(next(&mut sub, 1).await, ("ta/a".into(), None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alias_count_capped_by_server_setting() {
    let b = start_broker_with(|s| s.mqtt.topic_alias_out = 1).await;
    let mut sub = subscriber(&b, "ta-cap", Some(10), |_| {}).await;
    publish_all(&b, &["ta/a", "ta/b", "ta/b"]).await;
    assert_eq!(next(&mut sub, 0).await, ("ta/a".into(), Some(1)));
    assert_eq!(next(&mut sub, 1).await, ("ta/b".into(), Some(1)));
    assert_eq!(next(&mut sub, 2).await, ("".into(), Some(1)));

    let b = start_broker_with(|s| s.mqtt.topic_alias_out = 0).await;
    let mut sub = subscriber(&b, "ta-off", Some(10), |_| {}).await;
    publish_all(&b, &["ta/a", "ta/a"]).await;
    assert_eq!(next(&mut sub, 0).await, ("ta/a".into(), None));
    assert_eq!(next(&mut sub, 1).await, ("ta/a".into(), None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alias_not_learned_from_a_delivery_dropped_as_too_large() {
    let b = start_broker().await;
    let mut sub = subscriber(&b, "ta-size", Some(10), |c| {
        c.properties.maximum_packet_size = Some(100);
    })
    .await;
    let mut publ = Raw::v5(b.addr, "ta-size-pub").await;
    let big = vec![b'x'; 200];
    publ.publish_qos1(publish_packet("ta/big", QoS::AtLeastOnce, Some(1), &big))
        .await;
    publ.publish_qos1(publish_packet(
        "ta/big",
        QoS::AtLeastOnce,
        Some(2),
        b"small",
    ))
    .await;
    // The first delivery never reached the client, so the second must teach the alias.
    let p = sub.recv_publish().await;
    assert_eq!(&p.payload[..], b"small");
    assert_eq!(
        (p.topic.as_str(), p.properties.topic_alias),
        ("ta/big", Some(1))
    );
    publ.publish_qos1(publish_packet(
        "ta/big",
        QoS::AtLeastOnce,
        Some(3),
        b"again",
    ))
    .await;
    let p = sub.recv_publish().await;
    assert_eq!((p.topic.as_str(), p.properties.topic_alias), ("", Some(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alias_stream_accepted_by_rumqttc() {
    let b = start_broker().await;
    let (mut sub, _) = V5::connect(b.addr, "ta-rumqttc", |o| {
        o.set_topic_alias_max(Some(2));
    })
    .await;
    sub.subscribe("ta/#", Q5::AtMostOnce).await;
    let topics = ["ta/a", "ta/b", "ta/a", "ta/c", "ta/a", "ta/b", "ta/c"];
    publish_all(&b, &topics).await;
    // rumqttc 0.25 checks the aliases (an unknown one is a protocol error that ends the
    // connection) but reports the PUBLISH as received, empty topic included; resolve the same
    // way it does.
    let mut known = std::collections::HashMap::new();
    for (i, t) in topics.iter().enumerate() {
        let p = sub.next_publish().await;
        let alias = p.properties.as_ref().and_then(|p| p.topic_alias);
        let topic = match (p.topic.is_empty(), alias) {
            (false, Some(a)) => {
                known.insert(a, p.topic.clone());
                p.topic.clone()
            }
            (true, Some(a)) => known[&a].clone(),
            (_, None) => p.topic.clone(),
        };
        assert_eq!(topic, t.as_bytes(), "delivery {i}");
        assert!(alias.is_some_and(|a| a <= 2), "delivery {i}: {p:?}");
        assert_eq!(p.payload, i.to_string().as_bytes());
    }
    // Still connected: a round trip of its own works.
    sub.publish_qos1("elsewhere", b"x").await;
    assert!(sub.closed.is_none(), "{:?}", sub.closed);
}

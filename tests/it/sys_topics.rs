//! `$SYS` topics of a standalone broker: a real client subscribed to `$SYS/broker/#` gets the
//! statistics, `#` does not match them (§4.7.2), and clients cannot publish into `$SYS`.

use std::time::Duration;

use crate::support::*;
use rumqttc::v5::mqttbytes::v5::PubAckReason;
use tiermq_common::codec::{Packet, PubAck};
use tiermq_common::{QoS, ReasonCode};

async fn sys_broker() -> Broker {
    start_broker_with(|s| s.mqtt.sys_interval_secs = 1).await
}

/// Reads `$SYS` publishes until every topic in `want` was seen; returns (topic, payload)s.
async fn collect_sys(sub: &mut V5, want: &[&str]) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !want.iter().all(|t| seen.iter().any(|(s, _)| s == t)) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let p = sub
            .try_next_publish(left)
            .await
            .unwrap_or_else(|| panic!("missing some of {want:?}; got {seen:?}"));
        seen.push((
            String::from_utf8_lossy(&p.topic).into_owned(),
            String::from_utf8_lossy(&p.payload).into_owned(),
        ));
    }
    seen
}

/// A value of `topic` that satisfies `ok`: the latest one seen, or one still to come (a
/// subscriber first gets the retained value of the round before it connected, then every
/// change).
async fn wait_value(
    sub: &mut V5,
    seen: &[(String, String)],
    topic: &str,
    ok: impl Fn(u64) -> bool,
) -> u64 {
    let parse = |v: &str| {
        v.parse::<u64>()
            .unwrap_or_else(|_| panic!("{topic}: {v:?}"))
    };
    let mut latest = seen
        .iter()
        .rev()
        .find(|(t, _)| t == topic)
        .map(|(_, v)| parse(v));
    loop {
        if let Some(v) = latest.filter(|v| ok(*v)) {
            return v;
        }
        let p = sub
            .try_next_publish(Duration::from_secs(3))
            .await
            .unwrap_or_else(|| panic!("no acceptable value of {topic}, last {latest:?}"));
        if p.topic == topic.as_bytes() {
            latest = Some(parse(&String::from_utf8_lossy(&p.payload)));
        }
    }
}

fn value<'a>(seen: &'a [(String, String)], topic: &str) -> &'a str {
    // The latest value: rounds repeat every second.
    &seen.iter().rev().find(|(t, _)| t == topic).unwrap().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sys_topics_reach_a_sys_subscriber_with_sane_values() {
    let b = sys_broker().await;
    let (_other, _) = V3::connect(b.addr, "sys-other", |_| {}).await;
    let (mut sub, _) = V5::connect(b.addr, "sys-sub", |_| {}).await;
    sub.subscribe("$SYS/broker/#", Q5::AtMostOnce).await;
    // Rounds publish only what changed, so wait for one after our subscribe (uptime moves).
    let seen = collect_sys(
        &mut sub,
        &[
            "$SYS/broker/version",
            "$SYS/broker/clients/connected",
            "$SYS/broker/clients/total",
            "$SYS/broker/uptime",
            "$SYS/broker/subscriptions/count",
            "$SYS/broker/retained messages/count",
            "$SYS/broker/messages/received",
            "$SYS/broker/bytes/sent",
        ],
    )
    .await;
    let version = value(&seen, "$SYS/broker/version");
    assert!(version.starts_with("tiermq "), "{version}");
    // Both clients are connected (a value may predate the second: at least one).
    let connected = wait_value(&mut sub, &seen, "$SYS/broker/clients/connected", |n| n >= 1).await;
    assert!(connected <= 2, "{connected}");
    wait_value(&mut sub, &seen, "$SYS/broker/clients/total", |n| {
        n >= connected
    })
    .await;
    let uptime = value(&seen, "$SYS/broker/uptime");
    assert!(uptime.ends_with(" seconds"), "{uptime}");
    // The $SYS topics themselves are retained messages: once a round has stored them, a
    // later round counts them.
    wait_value(
        &mut sub,
        &seen,
        "$SYS/broker/retained messages/count",
        |n| n >= 9,
    )
    .await;

    // A later subscriber gets the retained values at once, flagged retained.
    let (mut late, _) = V5::connect(b.addr, "sys-late", |_| {}).await;
    late.subscribe("$SYS/broker/version", Q5::AtMostOnce).await;
    let p = late.next_publish().await;
    assert!(p.retain);
    assert!(p.payload.starts_with(b"tiermq "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sys_topics_do_not_match_wildcards_at_the_first_level() {
    let b = sys_broker().await;
    let (mut sys, _) = V5::connect(b.addr, "sys-dollar", |_| {}).await;
    sys.subscribe("$SYS/#", Q5::AtMostOnce).await;
    // A round went out, so `$SYS` retained messages exist before the wildcard subscribes:
    // neither the retained lookup nor the live rounds may match them.
    assert!(sys.try_next_publish(Duration::from_secs(3)).await.is_some());
    let (mut all, _) = V5::connect(b.addr, "sys-hash", |_| {}).await;
    all.subscribe("#", Q5::AtMostOnce).await;
    all.subscribe("+/broker/#", Q5::AtMostOnce).await;
    if let Some(p) = all.try_next_publish(Duration::from_millis(2500)).await {
        panic!("`#` / `+` matched {:?}", String::from_utf8_lossy(&p.topic));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sys_topics_refuse_client_publishes() {
    let b = start_broker_with(|s| s.mqtt.sys_interval_secs = 0).await;
    let (mut watcher, _) = V5::connect(b.addr, "sys-watch", |_| {}).await;
    watcher.subscribe("$SYS/#", Q5::AtLeastOnce).await;

    // v5 QoS1: PUBACK 0x90 Topic Name invalid, and nothing is delivered.
    let (mut v5, _) = V5::connect(b.addr, "sys-spoof5", |_| {}).await;
    assert_eq!(
        v5.publish_qos1("$SYS/broker/clients/connected", b"9999")
            .await,
        PubAckReason::TopicNameInvalid
    );
    // v5 QoS0 and a retained one: dropped silently.
    v5.client
        .publish("$SYS/broker/version", Q5::AtMostOnce, true, "fake")
        .await
        .unwrap();
    // 3.1.1 cannot carry a reason: a plain PUBACK, and the message is dropped.
    let mut v3 = Raw::v3(b.addr, "sys-spoof3").await;
    v3.send(&Packet::Publish(publish_packet(
        "$SYS/broker/uptime",
        QoS::AtLeastOnce,
        Some(1),
        b"0",
    )))
    .await;
    match v3.recv().await {
        Packet::PubAck(PubAck { packet_id: 1, .. }) => {}
        other => panic!("expected PUBACK, got {other:?}"),
    }
    watcher.expect_no_publish().await;

    // Nothing was retained either.
    let (mut late, _) = V5::connect(b.addr, "sys-late", |_| {}).await;
    late.subscribe("$SYS/#", Q5::AtMostOnce).await;
    late.expect_no_publish().await;

    // A will on `$SYS` is refused at CONNECT.
    let (_raw, ack) = Raw::connect(
        b.addr,
        tiermq_common::ProtocolVersion::V5,
        "sys-will",
        |c| {
            c.will = Some(tiermq_common::codec::LastWill {
                topic: "$SYS/broker/clients/connected".into(),
                payload: bytes::Bytes::from_static(b"0"),
                qos: QoS::AtMostOnce,
                retain: true,
                properties: Default::default(),
            });
        },
    )
    .await;
    assert_eq!(ack.reason_code, ReasonCode::TOPIC_NAME_INVALID);
}

//! Shared subscriptions (`$share/<group>/<filter>`, MQTT 5 §4.8.2, also offered to 3.1.1
//! clients) with real clients (rumqttc v5 and 3.1.1) against a standalone broker with several
//! partitions, so groups and their members live in different partitions as in the cluster.
//! The cluster runs the same checks in `cluster_parity.rs` (`shared_*`).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::support::*;
use tiermq_common::codec::{Packet, Subscribe};
use tiermq_common::partition_api::SharedStrategy;
use tiermq_common::session_api::SubscriptionOptions;
use tiermq_common::{ProtocolVersion, QoS, ReasonCode};

async fn partitioned_broker(strategy: SharedStrategy) -> Broker {
    start_broker_with(|s| {
        s.storage.partitions = 4;
        s.session.shared_strategy = strategy;
    })
    .await
}

/// Collects publishes from a v5 member for a short quiet period.
async fn drain_v5(c: &mut V5) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(p) = c.try_next_publish(Duration::from_millis(400)).await {
        out.push(String::from_utf8_lossy(&p.payload).into_owned());
    }
    out
}

async fn drain_v3(c: &mut V3) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(p) = c.try_next_publish(Duration::from_millis(400)).await {
        out.push(String::from_utf8_lossy(&p.payload).into_owned());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_v5_and_v3_members_share_round_robin() {
    let b = partitioned_broker(SharedStrategy::RoundRobin).await;
    let (mut a, ack) = V5::connect(b.addr, "shr-a", |_| {}).await;
    assert_eq!(
        ack.properties.and_then(|p| p.shared_subscription_available),
        Some(1),
        "CONNACK announces shared subscriptions"
    );
    let (mut c, _) = V5::connect(b.addr, "shr-c", |_| {}).await;
    let (mut v3, _) = V3::connect(b.addr, "shr-v3", |_| {}).await;
    a.subscribe("$share/workers/jobs/+", Q5::AtLeastOnce).await;
    c.subscribe("$share/workers/jobs/+", Q5::AtLeastOnce).await;
    v3.subscribe("$share/workers/jobs/+", Q3::AtLeastOnce).await;
    // Another group on the same filter gets its own copy of every message.
    let (mut other, _) = V5::connect(b.addr, "shr-other", |_| {}).await;
    other
        .subscribe("$share/audit/jobs/#", Q5::AtLeastOnce)
        .await;

    let (mut publ, _) = V5::connect(b.addr, "shr-pub", |_| {}).await;
    for i in 0..30 {
        publ.publish_qos1("jobs/x", format!("j{i}").as_bytes())
            .await;
    }
    let got: BTreeMap<&str, Vec<String>> = [
        ("a", drain_v5(&mut a).await),
        ("c", drain_v5(&mut c).await),
        ("v3", drain_v3(&mut v3).await),
    ]
    .into_iter()
    .collect();
    let mut all: Vec<&String> = got.values().flatten().collect();
    assert_eq!(all.len(), 30, "each message once to the group: {got:?}");
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 30);
    for (who, msgs) in &got {
        assert_eq!(msgs.len(), 10, "round robin gives {who} a third: {got:?}");
    }
    assert_eq!(drain_v5(&mut other).await.len(), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_strategy_sends_one_publishers_messages_to_one_member() {
    let b = partitioned_broker(SharedStrategy::StickyByPublisher).await;
    let (mut a, _) = V5::connect(b.addr, "st-a", |_| {}).await;
    let (mut c, _) = V5::connect(b.addr, "st-c", |_| {}).await;
    a.subscribe("$share/g/s/#", Q5::AtLeastOnce).await;
    c.subscribe("$share/g/s/#", Q5::AtLeastOnce).await;
    let (mut publ, _) = V5::connect(b.addr, "st-pub", |_| {}).await;
    for i in 0..10 {
        publ.publish_qos1("s/1", format!("m{i}").as_bytes()).await;
    }
    let (ga, gc) = (drain_v5(&mut a).await, drain_v5(&mut c).await);
    assert_eq!(ga.len() + gc.len(), 10);
    assert!(ga.is_empty() || gc.is_empty(), "split: {ga:?} / {gc:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_killed_mid_stream_its_inflight_messages_reach_another_member() {
    let b = partitioned_broker(SharedStrategy::RoundRobin).await;
    // The victim never acknowledges (manual acks that are never sent), then its TCP
    // connection is cut without DISCONNECT.
    let (mut victim, _) = V5::connect(b.addr, "kill-victim", |o| {
        o.set_manual_acks(true);
    })
    .await;
    let (mut survivor, _) = V5::connect(b.addr, "kill-survivor", |_| {}).await;
    victim.subscribe("$share/g/k/#", Q5::AtLeastOnce).await;
    survivor.subscribe("$share/g/k/#", Q5::AtLeastOnce).await;
    let (mut publ, _) = V5::connect(b.addr, "kill-pub", |_| {}).await;
    for i in 0..20 {
        publ.publish_qos1("k/1", format!("m{i:02}").as_bytes())
            .await;
    }
    let held = drain_v5(&mut victim).await;
    assert_eq!(held.len(), 10, "round robin gave the victim half");
    victim.kill();
    let mut seen = drain_v5(&mut survivor).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while seen.len() < 20 && tokio::time::Instant::now() < deadline {
        seen.extend(drain_v5(&mut survivor).await);
    }
    seen.sort();
    let expected: Vec<String> = (0..20).map(|i| format!("m{i:02}")).collect();
    assert_eq!(
        seen, expected,
        "every message reached the survivor exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_persistent_member_is_skipped_while_another_is_connected() {
    let b = partitioned_broker(SharedStrategy::RoundRobin).await;
    let (mut away, _) = Raw::connect(b.addr, ProtocolVersion::V5, "off-away", |c| {
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(300);
    })
    .await;
    away.subscribe("$share/g/o", sub_opts(QoS::AtLeastOnce))
        .await;
    away.disconnect(ReasonCode::SUCCESS).await;
    let (mut here, _) = V5::connect(b.addr, "off-here", |_| {}).await;
    here.subscribe("$share/g/o", Q5::AtLeastOnce).await;
    let (mut publ, _) = V5::connect(b.addr, "off-pub", |_| {}).await;
    for i in 0..6 {
        publ.publish_qos1("o", format!("m{i}").as_bytes()).await;
    }
    assert_eq!(drain_v5(&mut here).await.len(), 6);
    // The member that was away finds nothing queued for it.
    let (mut back, ack) = Raw::connect(b.addr, ProtocolVersion::V5, "off-away", |c| {
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(300);
    })
    .await;
    assert!(ack.session_present);
    back.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_local_on_a_shared_subscription_is_a_protocol_error() {
    let b = start_broker().await;
    let mut c = Raw::v5(b.addr, "nl-shared").await;
    c.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![(
            "$share/g/t".into(),
            SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                no_local: true,
                ..Default::default()
            },
        )],
        properties: Default::default(),
    }))
    .await;
    c.expect_disconnect(ReasonCode::PROTOCOL_ERROR).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_share_names_are_refused_with_0x8f() {
    let b = start_broker().await;
    let mut c = Raw::v5(b.addr, "bad-share").await;
    for (i, filter) in ["$share//t", "$share/g", "$share/g+/t"].iter().enumerate() {
        c.send(&Packet::Subscribe(Subscribe {
            packet_id: i as u16 + 1,
            filters: vec![(filter.to_string(), sub_opts(QoS::AtLeastOnce))],
            properties: Default::default(),
        }))
        .await;
        match c.recv().await {
            Packet::SubAck(ack) => assert_eq!(
                ack.reason_codes,
                vec![ReasonCode::TOPIC_FILTER_INVALID],
                "{filter}"
            ),
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }
}

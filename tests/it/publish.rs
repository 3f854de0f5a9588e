//! PUBLISH with real clients (v5 and 3.1.1), property pass-through, PUBACK reason codes,
//! outbound flow control (Receive Maximum), topic aliases, subscription identifiers, QoS2.

use crate::support::*;
use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{PubAckReason, PublishProperties as RPublishProperties};
use tiermq_common::codec::{Packet, PubComp, PubRec, PubRel, SubscribeProperties};
use tiermq_common::{ProtocolVersion, QoS, ReasonCode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_qos0_and_qos1_pub_sub() {
    let b = start_broker().await;
    let (mut sub, _) = V5::connect(b.addr, "sub5", |_| {}).await;
    sub.subscribe("sensors/+/temp", Q5::AtLeastOnce).await;
    let (mut publ, _) = V5::connect(b.addr, "pub5", |_| {}).await;

    publ.client
        .publish("sensors/a/temp", Q5::AtMostOnce, false, "q0")
        .await
        .unwrap();
    let p = sub.next_publish().await;
    assert_eq!(&p.topic[..], b"sensors/a/temp");
    assert_eq!(&p.payload[..], b"q0");
    assert_eq!(p.qos, Q5::AtMostOnce);
    assert!(!p.retain);

    assert_eq!(
        publ.publish_qos1("sensors/b/temp", b"q1").await,
        PubAckReason::Success
    );
    let p = sub.next_publish().await;
    assert_eq!(&p.topic[..], b"sensors/b/temp");
    assert_eq!(&p.payload[..], b"q1");
    assert_eq!(p.qos, Q5::AtLeastOnce);

    // Not matching the filter.
    publ.client
        .publish("sensors/a/humidity", Q5::AtMostOnce, false, "no")
        .await
        .unwrap();
    sub.expect_no_publish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v3_qos0_and_qos1_pub_sub() {
    let b = start_broker().await;
    let (mut sub, _) = V3::connect(b.addr, "sub3", |_| {}).await;
    sub.subscribe("home/#", Q3::AtLeastOnce).await;
    let (mut publ, _) = V3::connect(b.addr, "pub3", |_| {}).await;

    publ.client
        .publish("home/kitchen", Q3::AtMostOnce, false, "q0")
        .await
        .unwrap();
    let p = sub.next_publish().await;
    assert_eq!(p.topic, "home/kitchen");
    assert_eq!(&p.payload[..], b"q0");
    assert_eq!(p.qos, Q3::AtMostOnce);

    publ.publish_qos1("home/garden/light", b"q1").await;
    let p = sub.next_publish().await;
    assert_eq!(p.topic, "home/garden/light");
    assert_eq!(&p.payload[..], b"q1");
    assert_eq!(p.qos, Q3::AtLeastOnce);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_qos1_messages_arrive_in_order() {
    let b = start_broker().await;
    let (mut sub, _) = V5::connect(b.addr, "sub", |_| {}).await;
    sub.subscribe("seq", Q5::AtLeastOnce).await;
    let (mut publ, _) = V3::connect(b.addr, "pub", |_| {}).await;
    for i in 0..200u32 {
        publ.client
            .publish("seq", Q3::AtLeastOnce, false, i.to_string())
            .await
            .unwrap();
    }
    for i in 0..200u32 {
        let p = sub.next_publish().await;
        assert_eq!(
            p.payload,
            Bytes::from(i.to_string()),
            "message {i} out of order"
        );
    }
    // Every publish was acknowledged.
    for _ in 0..200 {
        publ.next_matching(|p| matches!(p, rumqttc::Incoming::PubAck(_)))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_version_delivery_and_qos_downgrade() {
    let b = start_broker().await;
    let (mut sub3, _) = V3::connect(b.addr, "s3", |_| {}).await;
    sub3.subscribe("x/q0", Q3::AtMostOnce).await;
    sub3.subscribe("x/q1", Q3::AtLeastOnce).await;
    let (mut sub5, _) = V5::connect(b.addr, "s5", |_| {}).await;
    sub5.subscribe("x/#", Q5::AtLeastOnce).await;
    let (mut pub5, _) = V5::connect(b.addr, "p5", |_| {}).await;

    pub5.publish_qos1("x/q0", b"a").await;
    let p = sub3.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), p.qos),
        ("x/q0", Q3::AtMostOnce),
        "granted QoS 0 wins"
    );
    assert_eq!(sub5.next_publish().await.qos, Q5::AtLeastOnce);

    pub5.client
        .publish("x/q1", Q5::AtMostOnce, false, "b")
        .await
        .unwrap();
    let p = sub3.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), p.qos),
        ("x/q1", Q3::AtMostOnce),
        "message QoS 0 wins"
    );
    assert_eq!(sub5.next_publish().await.qos, Q5::AtMostOnce);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_properties_pass_through() {
    let b = start_broker().await;
    let (mut sub, _) = V5::connect(b.addr, "sub", |_| {}).await;
    sub.subscribe("req/+", Q5::AtLeastOnce).await;
    let (publ, _) = V5::connect(b.addr, "pub", |_| {}).await;
    let props = RPublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        response_topic: Some("resp/pub".into()),
        correlation_data: Some(Bytes::from_static(b"\x00\x01corr")),
        user_properties: vec![
            ("k".into(), "v1".into()),
            ("k".into(), "v2".into()),
            ("other".into(), "x".into()),
        ],
        ..Default::default()
    };
    for qos in [Q5::AtMostOnce, Q5::AtLeastOnce] {
        publ.client
            .publish_with_properties("req/1", qos, false, "{\"a\":1}", props.clone())
            .await
            .unwrap();
        let p = sub.next_publish().await;
        assert_eq!(p.qos, qos);
        let got = p.properties.expect("properties delivered");
        assert_eq!(got.payload_format_indicator, Some(1));
        assert_eq!(got.content_type.as_deref(), Some("application/json"));
        assert_eq!(got.response_topic.as_deref(), Some("resp/pub"));
        assert_eq!(got.correlation_data.as_deref(), Some(&b"\x00\x01corr"[..]));
        // User properties keep their order and duplicates (§3.3.2.3.7).
        assert_eq!(got.user_properties, props.user_properties);
        assert_eq!(got.topic_alias, None);
    }

    // A 3.1.1 subscriber gets the same message, without properties of course.
    let (mut sub3, _) = V3::connect(b.addr, "sub3", |_| {}).await;
    sub3.subscribe("req/+", Q3::AtLeastOnce).await;
    publ.client
        .publish_with_properties("req/2", Q5::AtLeastOnce, false, "plain", props.clone())
        .await
        .unwrap();
    assert_eq!(&sub3.next_publish().await.payload[..], b"plain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_with_payload_format_indicator_gets_0x99() {
    let b = start_broker().await;
    let mut sub = Raw::v5(b.addr, "sub").await;
    sub.subscribe("pfi", sub_opts(QoS::AtLeastOnce)).await;
    let mut publ = Raw::v5(b.addr, "pub").await;

    let mut bad = publish_packet("pfi", QoS::AtLeastOnce, Some(1), b"\xff\xfe not utf-8");
    bad.properties.payload_format_indicator = Some(1);
    let ack = publ.publish_qos1(bad).await;
    assert_eq!(ack.reason_code, ReasonCode::PAYLOAD_FORMAT_INVALID);
    sub.expect_silence().await;

    // Same bytes without the indicator are fine, and the connection is still usable.
    let ok = publish_packet("pfi", QoS::AtLeastOnce, Some(2), b"\xff\xfe binary");
    let ack = publ.publish_qos1(ok).await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    assert_eq!(&sub.recv_publish().await.payload[..], b"\xff\xfe binary");

    // Valid UTF-8 with the indicator passes, indicator included.
    let mut good = publish_packet("pfi", QoS::AtLeastOnce, Some(3), "héllo".as_bytes());
    good.properties.payload_format_indicator = Some(1);
    assert_eq!(
        publ.publish_qos1(good).await.reason_code,
        ReasonCode::SUCCESS
    );
    let p = sub.recv_publish().await;
    assert_eq!(p.properties.payload_format_indicator, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puback_0x10_when_nobody_subscribes() {
    let b = start_broker().await;
    let mut publ = Raw::v5(b.addr, "pub").await;
    let ack = publ
        .publish_qos1(publish_packet("lonely", QoS::AtLeastOnce, Some(1), b"x"))
        .await;
    assert_eq!(ack.reason_code, ReasonCode::NO_MATCHING_SUBSCRIBERS);

    // rumqttc accepts 0x10 as a successful ack.
    let (mut c, _) = V5::connect(b.addr, "rpub", |_| {}).await;
    assert_eq!(
        c.publish_qos1("lonely", b"y").await,
        PubAckReason::NoMatchingSubscribers
    );

    let mut sub = Raw::v5(b.addr, "sub").await;
    sub.subscribe("lonely", sub_opts(QoS::AtMostOnce)).await;
    let ack = publ
        .publish_qos1(publish_packet("lonely", QoS::AtLeastOnce, Some(2), b"z"))
        .await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);

    // A 3.1.1 publisher gets a plain PUBACK either way.
    let mut p3 = Raw::v3(b.addr, "pub3").await;
    let ack = p3
        .publish_qos1(publish_packet(
            "nobody/here",
            QoS::AtLeastOnce,
            Some(9),
            b"z",
        ))
        .await;
    assert_eq!(ack.packet_id, 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_maximum_limits_unacked_deliveries() {
    let b = start_broker().await;
    let (mut sub, ack) = Raw::connect(b.addr, ProtocolVersion::V5, "slow", |c| {
        c.properties.receive_maximum = Some(2);
    })
    .await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    sub.subscribe("flow", sub_opts(QoS::AtLeastOnce)).await;

    let mut publ = Raw::v5(b.addr, "pub").await;
    for i in 1..=6u16 {
        let ack = publ
            .publish_qos1(publish_packet(
                "flow",
                QoS::AtLeastOnce,
                Some(i),
                &[i as u8],
            ))
            .await;
        assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    }

    // Only two unacknowledged deliveries at once.
    let first = sub.recv_publish().await;
    let second = sub.recv_publish().await;
    assert_eq!(
        (&first.payload[..], &second.payload[..]),
        (&[1u8][..], &[2u8][..])
    );
    sub.expect_silence().await;

    // Each ack opens one slot.
    sub.puback(first.packet_id.unwrap()).await;
    let third = sub.recv_publish().await;
    assert_eq!(&third.payload[..], &[3u8]);
    sub.expect_silence().await;

    sub.puback(second.packet_id.unwrap()).await;
    sub.puback(third.packet_id.unwrap()).await;
    let mut rest = Vec::new();
    for _ in 0..2 {
        rest.push(sub.recv_publish().await);
    }
    sub.expect_silence().await;
    assert_eq!(&rest[0].payload[..], &[4u8]);
    assert_eq!(&rest[1].payload[..], &[5u8]);
    for p in &rest {
        sub.puback(p.packet_id.unwrap()).await;
    }
    let last = sub.recv_publish().await;
    assert_eq!(&last.payload[..], &[6u8]);
    assert!(!last.dup);
    // In-flight packet ids are distinct.
    let ids = [first.packet_id, second.packet_id, third.packet_id];
    assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_topic_alias_is_resolved() {
    let b = start_broker().await;
    let mut sub = Raw::v5(b.addr, "sub").await;
    sub.subscribe("alias/#", sub_opts(QoS::AtLeastOnce)).await;
    let mut publ = Raw::v5(b.addr, "pub").await;

    let mut p = publish_packet("alias/long/topic", QoS::AtLeastOnce, Some(1), b"one");
    p.properties.topic_alias = Some(5);
    assert_eq!(publ.publish_qos1(p).await.reason_code, ReasonCode::SUCCESS);
    let mut p = publish_packet("", QoS::AtLeastOnce, Some(2), b"two");
    p.properties.topic_alias = Some(5);
    assert_eq!(publ.publish_qos1(p).await.reason_code, ReasonCode::SUCCESS);
    // Re-mapping the alias to another topic.
    let mut p = publish_packet("alias/other", QoS::AtMostOnce, None, b"three");
    p.properties.topic_alias = Some(5);
    publ.send(&Packet::Publish(p)).await;
    let mut p = publish_packet("", QoS::AtMostOnce, None, b"four");
    p.properties.topic_alias = Some(5);
    publ.send(&Packet::Publish(p)).await;

    let got: Vec<(String, Bytes)> = [
        sub.recv_publish().await,
        sub.recv_publish().await,
        sub.recv_publish().await,
        sub.recv_publish().await,
    ]
    .into_iter()
    .map(|p| {
        // The broker sends no alias of its own (the subscriber allowed none).
        assert_eq!(p.properties.topic_alias, None);
        (p.topic, p.payload)
    })
    .collect();
    assert_eq!(
        got,
        vec![
            ("alias/long/topic".to_string(), Bytes::from_static(b"one")),
            ("alias/long/topic".to_string(), Bytes::from_static(b"two")),
            ("alias/other".to_string(), Bytes::from_static(b"three")),
            ("alias/other".to_string(), Bytes::from_static(b"four")),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_identifiers_are_delivered() {
    let b = start_broker().await;
    let mut sub = Raw::v5(b.addr, "sub").await;
    sub.subscribe_with(
        "ids/+",
        sub_opts(QoS::AtLeastOnce),
        SubscribeProperties {
            subscription_identifier: Some(7),
            ..Default::default()
        },
    )
    .await;
    sub.subscribe_with(
        "ids/#",
        sub_opts(QoS::AtMostOnce),
        SubscribeProperties {
            subscription_identifier: Some(300),
            ..Default::default()
        },
    )
    .await;
    let mut publ = Raw::v5(b.addr, "pub").await;
    publ.publish_qos1(publish_packet("ids/a", QoS::AtLeastOnce, Some(1), b"x"))
        .await;
    // One message for both overlapping subscriptions, carrying both identifiers, at the
    // higher QoS.
    let p = sub.recv_publish().await;
    let mut ids = p.properties.subscription_identifiers.clone();
    ids.sort();
    assert_eq!(ids, vec![7, 300]);
    assert_eq!(p.qos, QoS::AtLeastOnce);
    sub.puback(p.packet_id.unwrap()).await;
    sub.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_inbound_is_exactly_once() {
    let b = start_broker().await;
    let mut sub = Raw::v5(b.addr, "sub").await;
    sub.subscribe("q2", sub_opts(QoS::ExactlyOnce)).await;
    let mut publ = Raw::v5(b.addr, "pub").await;

    let p = publish_packet("q2", QoS::ExactlyOnce, Some(11), b"once");
    publ.send(&Packet::Publish(p.clone())).await;
    match publ.recv().await {
        Packet::PubRec(r) => {
            assert_eq!(r.packet_id, 11);
            assert_eq!(r.reason_code, ReasonCode::SUCCESS);
        }
        other => panic!("expected PUBREC, got {other:?}"),
    }
    // The publisher re-sends (DUP) before PUBREL: no second delivery.
    let mut dup = p.clone();
    dup.dup = true;
    publ.send(&Packet::Publish(dup)).await;
    assert!(matches!(publ.recv().await, Packet::PubRec(r) if r.packet_id == 11));
    publ.send(&Packet::PubRel(PubRel::new(11))).await;
    match publ.recv().await {
        Packet::PubComp(c) => assert_eq!(c, PubComp::new(11)),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }

    let got = sub.recv_publish().await;
    assert_eq!(got.qos, QoS::ExactlyOnce);
    assert_eq!(&got.payload[..], b"once");
    let pid = got.packet_id.unwrap();
    sub.send(&Packet::PubRec(PubRec::new(pid))).await;
    match sub.recv().await {
        Packet::PubRel(r) => assert_eq!(r.packet_id, pid),
        other => panic!("expected PUBREL, got {other:?}"),
    }
    sub.send(&Packet::PubComp(PubComp::new(pid))).await;
    sub.expect_silence().await;

    // PUBREL for an unknown id: PUBCOMP 0x00, as for a flow already complete (see
    // docs/features.md, "Conformance choices").
    publ.send(&Packet::PubRel(PubRel::new(99))).await;
    match publ.recv().await {
        Packet::PubComp(c) => assert_eq!(c, PubComp::new(99)),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_above_the_clients_maximum_packet_size_are_skipped() {
    let b = start_broker().await;
    let (mut sub, _) = Raw::connect(b.addr, ProtocolVersion::V5, "small", |c| {
        c.properties.maximum_packet_size = Some(128);
        c.properties.receive_maximum = Some(1);
    })
    .await;
    sub.subscribe("mps", sub_opts(QoS::AtLeastOnce)).await;
    let mut publ = Raw::v5(b.addr, "pub").await;
    for (pid, size) in [(1u16, 500usize), (2, 10), (3, 500), (4, 20)] {
        publ.publish_qos1(publish_packet(
            "mps",
            QoS::AtLeastOnce,
            Some(pid),
            &vec![b'x'; size],
        ))
        .await;
    }
    // §3.1.2.11.4: too large for the client, so discarded; the window (Receive Maximum 1)
    // must not stay blocked by the skipped messages.
    for want in [10usize, 20] {
        let p = sub.recv_publish().await;
        assert_eq!(p.payload.len(), want);
        sub.puback(p.packet_id.unwrap()).await;
    }
    sub.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_do_not_match_dollar_topics() {
    let b = start_broker().await;
    let mut all = Raw::v5(b.addr, "all").await;
    all.subscribe("#", sub_opts(QoS::AtMostOnce)).await;
    let mut plus = Raw::v5(b.addr, "plus").await;
    plus.subscribe("+/x", sub_opts(QoS::AtMostOnce)).await;
    let mut dollar = Raw::v5(b.addr, "dollar").await;
    dollar.subscribe("$app/#", sub_opts(QoS::AtMostOnce)).await;
    let mut publ = Raw::v5(b.addr, "pub").await;
    publ.send(&Packet::Publish(publish_packet(
        "$app/x",
        QoS::AtMostOnce,
        None,
        b"d",
    )))
    .await;
    publ.ping().await;
    // §4.7.2: filters starting with a wildcard do not match topics starting with '$'.
    assert_eq!(dollar.recv_publish().await.topic, "$app/x");
    all.expect_silence().await;
    plus.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maximum_qos_is_enforced() {
    let b = start_broker_with(|s| s.mqtt.maximum_qos = 1).await;
    let mut sub = Raw::v5(b.addr, "sub").await;
    // Granted QoS is capped at the server maximum.
    sub.send(&Packet::Subscribe(tiermq_common::codec::Subscribe {
        packet_id: 1,
        filters: vec![("mq".into(), sub_opts(QoS::ExactlyOnce))],
        properties: Default::default(),
    }))
    .await;
    match sub.recv().await {
        Packet::SubAck(s) => assert_eq!(s.reason_codes, vec![ReasonCode::GRANTED_QOS_1]),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    // A QoS2 PUBLISH above Maximum QoS: DISCONNECT 0x9B (§3.2.2.3.4).
    let mut publ = Raw::v5(b.addr, "pub").await;
    publ.send(&Packet::Publish(publish_packet(
        "mq",
        QoS::ExactlyOnce,
        Some(1),
        b"x",
    )))
    .await;
    publ.expect_disconnect(ReasonCode(0x9B)).await;
    sub.expect_silence().await;
}

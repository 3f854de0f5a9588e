//! Persistent sessions: offline queues, redelivery, session and message expiry, takeover.

use std::time::Duration;

use crate::support::*;
use tiermq_common::codec::{Connect, Disconnect, Packet, Unsubscribe};
use tiermq_common::{ProtocolVersion, QoS, ReasonCode};

const V5: ProtocolVersion = ProtocolVersion::V5;
const V3: ProtocolVersion = ProtocolVersion::V311;

fn persistent(expiry: u32) -> impl Fn(&mut Connect) {
    move |c: &mut Connect| {
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(expiry);
    }
}

/// Publishes `n` QoS1 messages `prefix-i` to `topic`, each PUBACKed with `expect`.
async fn publish_n(publ: &mut Raw, topic: &str, prefix: &str, n: u16, expect: ReasonCode) {
    for i in 1..=n {
        let payload = format!("{prefix}-{i}");
        let ack = publ
            .publish_qos1(publish_packet(
                topic,
                QoS::AtLeastOnce,
                Some(i),
                payload.as_bytes(),
            ))
            .await;
        assert_eq!(ack.reason_code, expect, "message {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_offline_queue_is_delivered_in_order() {
    let b = start_broker().await;
    let (mut sub, _) = Raw::connect(b.addr, V5, "offline5", persistent(300)).await;
    sub.subscribe("queue/t", sub_opts(QoS::AtLeastOnce)).await;
    sub.disconnect(ReasonCode::NORMAL_DISCONNECTION).await;

    let mut publ = Raw::v5(b.addr, "pub").await;
    // An offline persistent subscription is a matching subscriber: 0x00, not 0x10.
    publish_n(&mut publ, "queue/t", "m", 20, ReasonCode::SUCCESS).await;
    // QoS0 is not queued for offline sessions (the default).
    publ.send(&Packet::Publish(publish_packet(
        "queue/t",
        QoS::AtMostOnce,
        None,
        b"q0",
    )))
    .await;
    publ.ping().await;

    let (mut sub, ack) = Raw::connect(b.addr, V5, "offline5", persistent(300)).await;
    assert!(ack.session_present);
    for i in 1..=20 {
        let p = sub.recv_publish().await;
        assert_eq!(p.payload, format!("m-{i}").into_bytes(), "order");
        assert_eq!(p.qos, QoS::AtLeastOnce);
        assert!(!p.dup, "first delivery is not a duplicate");
        sub.puback(p.packet_id.unwrap()).await;
    }
    sub.expect_silence().await;
    sub.disconnect(ReasonCode::NORMAL_DISCONNECTION).await;

    // Everything was acknowledged: nothing comes back.
    let (mut sub, ack) = Raw::connect(b.addr, V5, "offline5", persistent(300)).await;
    assert!(ack.session_present);
    sub.expect_silence().await;
    // And the subscription is still there.
    publish_n(&mut publ, "queue/t", "n", 1, ReasonCode::SUCCESS).await;
    assert_eq!(&sub.recv_publish().await.payload[..], b"n-1");
}

/// `max_queued_messages` with each policy: drop-oldest keeps the newest (publisher sees
/// success), refuse-new keeps the oldest and a v5 publisher sees 0x97 Quota exceeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_offline_queue_follows_the_configured_policy() {
    use tiermq_common::partition_api::QueueFullPolicy;
    for policy in [QueueFullPolicy::DropOldest, QueueFullPolicy::RefuseNew] {
        let b = start_broker_with(|s| {
            s.session.max_queued_messages = 3;
            s.session.queue_full_policy = policy;
        })
        .await;
        let (mut sub, _) = Raw::connect(b.addr, V5, "full", persistent(300)).await;
        sub.subscribe("full/t", sub_opts(QoS::AtLeastOnce)).await;
        sub.disconnect(ReasonCode::NORMAL_DISCONNECTION).await;
        let mut publ = Raw::v5(b.addr, "full-pub").await;
        publish_n(&mut publ, "full/t", "m", 3, ReasonCode::SUCCESS).await;
        let over = match policy {
            QueueFullPolicy::DropOldest => ReasonCode::SUCCESS,
            QueueFullPolicy::RefuseNew => ReasonCode::QUOTA_EXCEEDED,
        };
        for i in 4..=5u16 {
            let ack = publ
                .publish_qos1(publish_packet(
                    "full/t",
                    QoS::AtLeastOnce,
                    Some(i),
                    format!("m-{i}").as_bytes(),
                ))
                .await;
            assert_eq!(ack.reason_code, over, "{policy:?}");
        }
        let (mut sub, _) = Raw::connect(b.addr, V5, "full", persistent(300)).await;
        let mut got = Vec::new();
        for _ in 0..3 {
            let p = sub.recv_publish().await;
            sub.puback(p.packet_id.unwrap()).await;
            got.push(String::from_utf8_lossy(&p.payload).into_owned());
        }
        sub.expect_silence().await;
        let expected = match policy {
            QueueFullPolicy::DropOldest => ["m-3", "m-4", "m-5"],
            QueueFullPolicy::RefuseNew => ["m-1", "m-2", "m-3"],
        };
        assert_eq!(got, expected, "{policy:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v3_offline_queue_is_delivered_in_order() {
    let b = start_broker().await;
    let (mut sub, ack) = V3::connect(b.addr, "offline3", |o| {
        o.set_clean_session(false);
    })
    .await;
    assert!(!ack.session_present);
    sub.subscribe("queue3/#", Q3::AtLeastOnce).await;
    sub.disconnect().await;

    let mut publ = Raw::v3(b.addr, "pub3").await;
    publish_n(&mut publ, "queue3/a", "m", 15, ReasonCode::SUCCESS).await;

    let (mut sub, ack) = V3::connect(b.addr, "offline3", |o| {
        o.set_clean_session(false);
    })
    .await;
    assert!(ack.session_present);
    for i in 1..=15 {
        let p = sub.next_publish().await;
        assert_eq!(p.payload, format!("m-{i}").into_bytes(), "order");
        assert_eq!(p.qos, Q3::AtLeastOnce);
    }
    assert!(sub.try_next_publish(QUIET).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_messages_are_redelivered_with_dup_and_same_ids() {
    let b = start_broker().await;
    let (mut sub, _) = Raw::connect(b.addr, V5, "redeliver", persistent(300)).await;
    sub.subscribe("re", sub_opts(QoS::AtLeastOnce)).await;
    let mut publ = Raw::v5(b.addr, "pub").await;
    publish_n(&mut publ, "re", "m", 3, ReasonCode::SUCCESS).await;
    let first: Vec<_> = [
        sub.recv_publish().await,
        sub.recv_publish().await,
        sub.recv_publish().await,
    ]
    .into();
    // Ack only the first, then drop the connection.
    sub.puback(first[0].packet_id.unwrap()).await;
    sub.ping().await;
    drop(sub);

    let (mut sub, ack) = Raw::connect(b.addr, V5, "redeliver", persistent(300)).await;
    assert!(ack.session_present);
    for orig in &first[1..] {
        let p = sub.recv_publish().await;
        assert!(p.dup, "redelivery carries DUP");
        assert_eq!(p.packet_id, orig.packet_id, "same packet id (§4.4)");
        assert_eq!(p.payload, orig.payload);
        sub.puback(p.packet_id.unwrap()).await;
    }
    sub.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_drops_the_session_and_its_queue() {
    let b = start_broker().await;
    let (mut sub, _) = Raw::connect(b.addr, V5, "short", persistent(1)).await;
    sub.subscribe("exp/t", sub_opts(QoS::AtLeastOnce)).await;
    sub.disconnect(ReasonCode::NORMAL_DISCONNECTION).await;
    let mut publ = Raw::v5(b.addr, "pub").await;
    publish_n(&mut publ, "exp/t", "m", 3, ReasonCode::SUCCESS).await;

    tokio::time::sleep(Duration::from_millis(2000)).await;
    // The subscription went with the session.
    publish_n(
        &mut publ,
        "exp/t",
        "late",
        1,
        ReasonCode::NO_MATCHING_SUBSCRIBERS,
    )
    .await;
    let (mut sub, ack) = Raw::connect(b.addr, V5, "short", persistent(1)).await;
    assert!(!ack.session_present, "session expired");
    sub.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_can_shorten_session_expiry() {
    let b = start_broker().await;
    let (mut sub, _) = Raw::connect(b.addr, V5, "shorten", persistent(300)).await;
    sub.subscribe("s/t", sub_opts(QoS::AtLeastOnce)).await;
    let mut d = Disconnect::normal();
    d.properties.session_expiry_interval = Some(0);
    sub.send(&Packet::Disconnect(d)).await;
    sub.expect_closed().await;
    let (_sub, ack) = Raw::connect(b.addr, V5, "shorten", persistent(300)).await;
    assert!(!ack.session_present, "DISCONNECT set the expiry to 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_may_not_raise_expiry_from_zero() {
    let b = start_broker().await;
    let mut c = Raw::v5(b.addr, "raise").await;
    let mut d = Disconnect::normal();
    d.properties.session_expiry_interval = Some(30);
    c.send(&Packet::Disconnect(d)).await;
    // §3.14.2.2.2: Protocol Error.
    c.expect_disconnect(ReasonCode::PROTOCOL_ERROR).await;
    let (_c, ack) = Raw::connect(b.addr, V5, "raise", persistent(30)).await;
    assert!(!ack.session_present);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_expiry_in_the_offline_queue() {
    let b = start_broker().await;
    let (mut sub, _) = Raw::connect(b.addr, V5, "mexp", persistent(300)).await;
    sub.subscribe("mexp/t", sub_opts(QoS::AtLeastOnce)).await;
    sub.disconnect(ReasonCode::NORMAL_DISCONNECTION).await;

    let mut publ = Raw::v5(b.addr, "pub").await;
    let mut short = publish_packet("mexp/t", QoS::AtLeastOnce, Some(1), b"short");
    short.properties.message_expiry_interval = Some(1);
    publ.publish_qos1(short).await;
    let mut long = publish_packet("mexp/t", QoS::AtLeastOnce, Some(2), b"long");
    long.properties.message_expiry_interval = Some(60);
    publ.publish_qos1(long).await;
    let plain = publish_packet("mexp/t", QoS::AtLeastOnce, Some(3), b"plain");
    publ.publish_qos1(plain).await;

    tokio::time::sleep(Duration::from_millis(2000)).await;
    let (mut sub, ack) = Raw::connect(b.addr, V5, "mexp", persistent(300)).await;
    assert!(ack.session_present);
    let p = sub.recv_publish().await;
    assert_eq!(&p.payload[..], b"long", "the 1 s message expired");
    let left = p
        .properties
        .message_expiry_interval
        .expect("Message Expiry Interval forwarded");
    // §3.3.2.3.3: the interval is reduced by the time spent waiting (2 s here).
    assert!(
        (50..=58).contains(&left),
        "expiry interval {left} not decremented"
    );
    sub.puback(p.packet_id.unwrap()).await;
    let p = sub.recv_publish().await;
    assert_eq!(&p.payload[..], b"plain");
    assert_eq!(p.properties.message_expiry_interval, None);
    sub.puback(p.packet_id.unwrap()).await;
    sub.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_stops_delivery() {
    let b = start_broker().await;
    let mut sub = Raw::v5(b.addr, "unsub").await;
    sub.subscribe("u/+", sub_opts(QoS::AtLeastOnce)).await;
    sub.send(&Packet::Unsubscribe(Unsubscribe {
        packet_id: 3,
        filters: vec!["u/+".into(), "never/subscribed".into()],
        properties: Default::default(),
    }))
    .await;
    match sub.recv().await {
        Packet::UnsubAck(u) => {
            assert_eq!(u.packet_id, 3);
            assert_eq!(
                u.reason_codes,
                vec![ReasonCode::SUCCESS, ReasonCode::NO_SUBSCRIPTION_EXISTED]
            );
        }
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    let mut publ = Raw::v5(b.addr, "pub").await;
    publish_n(
        &mut publ,
        "u/x",
        "m",
        1,
        ReasonCode::NO_MATCHING_SUBSCRIBERS,
    )
    .await;
    sub.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_takeover_disconnects_the_old_connection_with_0x8e() {
    let b = start_broker().await;
    let (mut old, _) = Raw::connect(b.addr, V5, "twin", persistent(300)).await;
    old.subscribe("tw/t", sub_opts(QoS::AtLeastOnce)).await;

    let (mut new, ack) = Raw::connect(b.addr, V5, "twin", persistent(300)).await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    assert!(
        ack.session_present,
        "the session continues on the new connection"
    );
    old.expect_disconnect(ReasonCode::SESSION_TAKEN_OVER).await;

    // The new connection owns the session, subscription included.
    let mut publ = Raw::v5(b.addr, "pub").await;
    publish_n(&mut publ, "tw/t", "m", 1, ReasonCode::SUCCESS).await;
    let p = new.recv_publish().await;
    assert_eq!(&p.payload[..], b"m-1");
    new.puback(p.packet_id.unwrap()).await;
    new.ping().await;

    // A clean-start takeover also works and starts a fresh session.
    let (mut third, ack) = Raw::connect(b.addr, V5, "twin", |_| {}).await;
    assert!(!ack.session_present);
    new.expect_disconnect(ReasonCode::SESSION_TAKEN_OVER).await;
    third.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v3_takeover_closes_the_old_connection() {
    let b = start_broker().await;
    let (mut old, _) = Raw::connect(b.addr, V3, "twin3", |c| c.clean_start = false).await;
    old.subscribe("tw3", sub_opts(QoS::AtLeastOnce)).await;
    let (mut new, ack) = Raw::connect(b.addr, V3, "twin3", |c| c.clean_start = false).await;
    assert!(ack.session_present);
    let seen = old.expect_closed().await;
    assert!(
        seen.is_empty(),
        "3.1.1 has no DISCONNECT from the server: {seen:?}"
    );
    let mut publ = Raw::v3(b.addr, "pub3").await;
    publish_n(&mut publ, "tw3", "m", 1, ReasonCode::SUCCESS).await;
    assert_eq!(&new.recv_publish().await.payload[..], b"m-1");

    // rumqttc sees the same.
    let (mut a, _) = V3::connect(b.addr, "twin3-r", |_| {}).await;
    let (mut c, _) = V3::connect(b.addr, "twin3-r", |_| {}).await;
    a.wait_closed().await;
    c.subscribe("after", Q3::AtMostOnce).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_v5_sees_takeover() {
    let b = start_broker().await;
    let (mut a, _) = V5::connect(b.addr, "twin5-r", |_| {}).await;
    let (mut c, _) = V5::connect(b.addr, "twin5-r", |_| {}).await;
    // rumqttc 0.25 cannot decode a DISCONNECT that carries a reason code but omits the
    // property length (allowed by §3.14.2.2.1, and what we send), so it only reports the
    // close; the raw-client test above checks the 0x8E on the wire.
    let why = a.wait_closed().await;
    assert!(
        why.contains("abruptly") || why.contains("SessionTakenOver"),
        "unexpected end: {why}"
    );
    c.subscribe("after", Q5::AtMostOnce).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_just_after_expiry_finds_no_session() {
    let b = start_broker().await;
    let (mut c, _) = Raw::connect(b.addr, V5, "justexpired", persistent(1)).await;
    c.subscribe("je", sub_opts(QoS::AtLeastOnce)).await;
    c.disconnect(ReasonCode::NORMAL_DISCONNECTION).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_c, ack) = Raw::connect(b.addr, V5, "justexpired", persistent(1)).await;
    assert!(!ack.session_present, "expired session resumed");
}

/// Issue 19, bug 8 with several partitions: a v5 QoS2 PUBLISH refused with PUBREC 0x97 by a
/// full queue in a partition other than the publisher's ends its exchange, so its packet id
/// must be free again: the client reuses it for its next message, which must be delivered
/// (the home partition, which had no full queue, used to keep the id recorded: PUBREC 0x00 as
/// for a duplicate, and the message never arrived).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_refused_in_another_partition_frees_its_packet_id() {
    use tiermq_common::codec::{PubRel, Publish};
    use tiermq_common::partition_api::QueueFullPolicy;
    let partitions = 4;
    let b = start_broker_with(|s| {
        s.storage.partitions = partitions;
        s.session.max_queued_messages = 1;
        s.session.queue_full_policy = QueueFullPolicy::RefuseNew;
    })
    .await;
    let publisher = "refused-pub";
    let home = tiermq_common::hashing::partition_of(publisher, partitions);
    let subscriber = (0..)
        .map(|i| format!("refused-sub-{i}"))
        .find(|s| tiermq_common::hashing::partition_of(s, partitions) != home)
        .unwrap();
    let (mut sub, _) = Raw::connect(b.addr, V5, &subscriber, persistent(300)).await;
    sub.subscribe("refused/t", sub_opts(QoS::ExactlyOnce)).await;
    sub.disconnect(ReasonCode::NORMAL_DISCONNECTION).await;
    let mut publ = Raw::v5(b.addr, publisher).await;
    let qos2 = |pid: u16, payload: &'static str| {
        Packet::Publish(publish_packet(
            "refused/t",
            QoS::ExactlyOnce,
            Some(pid),
            payload.as_bytes(),
        ))
    };
    let pubrec = |p: Packet| match p {
        Packet::PubRec(r) => r,
        other => panic!("expected PUBREC, got {other:?}"),
    };
    // m1 fills the offline queue; m2 (id 7) is refused: 0x97 ends its exchange.
    publ.send(&qos2(6, "m1")).await;
    assert_eq!(pubrec(publ.recv().await).reason_code, ReasonCode::SUCCESS);
    publ.send(&Packet::PubRel(PubRel::new(6))).await;
    assert!(matches!(publ.recv().await, Packet::PubComp(_)));
    publ.send(&qos2(7, "m2")).await;
    assert_eq!(
        pubrec(publ.recv().await).reason_code,
        ReasonCode::QUOTA_EXCEEDED
    );
    // The subscriber comes back and takes m1; the queue has room again.
    let (mut sub, _) = Raw::connect(b.addr, V5, &subscriber, persistent(300)).await;
    let m1: Publish = sub.recv_publish().await;
    assert_eq!(&m1.payload[..], b"m1");
    // The publisher reuses id 7 for a new message: it is delivered.
    publ.send(&qos2(7, "m3")).await;
    assert_eq!(pubrec(publ.recv().await).reason_code, ReasonCode::SUCCESS);
    let m3 = sub.recv_publish().await;
    assert_eq!(
        &m3.payload[..],
        b"m3",
        "the reused packet id was taken for a duplicate"
    );
}

//! Bad input gets the spec's reason code or a clean close, and never disturbs other clients.

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::*;
use bytes::BytesMut;
use tiermq_common::codec::{encode, Packet, Subscribe};
use tiermq_common::{ProtocolVersion, QoS, ReasonCode};

const V5: ProtocolVersion = ProtocolVersion::V5;
const V3: ProtocolVersion = ProtocolVersion::V311;

/// A subscriber and a publisher connected before the bad input and checked after it.
struct Bystanders {
    sub: Raw,
    publ: Raw,
    next: u16,
}

impl Bystanders {
    async fn new(addr: SocketAddr) -> Bystanders {
        let mut sub = Raw::v5(addr, "bystander-sub").await;
        sub.subscribe("by/t", sub_opts(QoS::AtLeastOnce)).await;
        let publ = Raw::v3(addr, "bystander-pub").await;
        let mut b = Bystanders { sub, publ, next: 1 };
        b.check().await;
        b
    }

    /// A QoS0 and a QoS1 message flow from the publisher to the subscriber.
    async fn check(&mut self) {
        let n = self.next;
        self.next += 1;
        self.publ
            .send(&Packet::Publish(publish_packet(
                "by/t",
                QoS::AtMostOnce,
                None,
                b"q0",
            )))
            .await;
        self.publ
            .publish_qos1(publish_packet("by/t", QoS::AtLeastOnce, Some(n), b"q1"))
            .await;
        assert_eq!(&self.sub.recv_publish().await.payload[..], b"q0");
        let p = self.sub.recv_publish().await;
        assert_eq!(&p.payload[..], b"q1");
        self.sub.puback(p.packet_id.unwrap()).await;
    }
}

/// Sends `bytes` on a fresh socket and asserts the server closes it without answering.
async fn closed_without_reply(addr: SocketAddr, bytes: &[u8]) {
    let mut raw = Raw::open(addr, V5).await;
    raw.send_bytes(bytes).await;
    let seen = raw.expect_closed().await;
    assert!(
        seen.is_empty(),
        "no reply expected to {bytes:02x?}, got {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_before_connect_is_closed() {
    let b = start_broker().await;
    let mut by = Bystanders::new(b.addr).await;
    closed_without_reply(b.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    closed_without_reply(b.addr, &[0x00, 0x00]).await;
    closed_without_reply(b.addr, &[0xff; 64]).await;
    // A CONNECT header with a body that is no CONNECT.
    closed_without_reply(b.addr, &[0x10, 0x05, 0x01, 0x02, 0x03, 0x04, 0x05]).await;
    // Unknown protocol name.
    closed_without_reply(b.addr, b"\x10\x0c\x00\x04HTTP\x05\x02\x00\x00\x00\x00").await;
    by.check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_before_connect_is_closed() {
    let b = start_broker().await;
    let mut by = Bystanders::new(b.addr).await;
    let mut buf = BytesMut::new();
    encode(
        &Packet::Publish(publish_packet("by/t", QoS::AtMostOnce, None, b"sneaky")),
        V5,
        &mut buf,
    )
    .unwrap();
    closed_without_reply(b.addr, &buf).await;
    // The sneaky publish was not delivered.
    by.sub.expect_silence().await;
    by.check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_socket_is_closed_after_the_connect_timeout() {
    let b = start_broker_with(|s| s.mqtt.connect_timeout_secs = 1).await;
    let mut raw = Raw::open(b.addr, V5).await;
    let seen = raw.expect_closed_within(Duration::from_secs(3)).await;
    assert!(seen.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_connect_is_a_protocol_error() {
    let b = start_broker().await;
    let mut by = Bystanders::new(b.addr).await;
    let mut c = Raw::v5(b.addr, "twice").await;
    c.send(&Packet::Connect(connect_packet(V5, "twice"))).await;
    c.expect_disconnect(ReasonCode::PROTOCOL_ERROR).await;

    let mut c = Raw::v3(b.addr, "twice3").await;
    c.send(&Packet::Connect(connect_packet(V3, "twice3"))).await;
    assert!(c.expect_closed().await.is_empty());
    by.check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_in_publish_topic_is_0x90() {
    let b = start_broker().await;
    let mut by = Bystanders::new(b.addr).await;
    for topic in ["by/+", "by/#", "#"] {
        let mut c = Raw::v5(b.addr, "wild").await;
        c.send(&Packet::Publish(publish_packet(
            topic,
            QoS::AtLeastOnce,
            Some(1),
            b"x",
        )))
        .await;
        c.expect_disconnect(ReasonCode::TOPIC_NAME_INVALID).await;
    }
    // An empty topic without an alias is invalid too.
    let mut c = Raw::v5(b.addr, "empty").await;
    c.send(&Packet::Publish(publish_packet(
        "",
        QoS::AtMostOnce,
        None,
        b"x",
    )))
    .await;
    let seen = c.expect_closed().await;
    assert!(
        matches!(seen.last(), Some(Packet::Disconnect(d)) if d.reason_code.is_error()),
        "{seen:?}"
    );
    // 3.1.1: closed.
    let mut c = Raw::v3(b.addr, "wild3").await;
    c.send(&Packet::Publish(publish_packet(
        "by/#",
        QoS::AtMostOnce,
        None,
        b"x",
    )))
    .await;
    assert!(c.expect_closed().await.is_empty());
    by.sub.expect_silence().await;
    by.check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_packet_is_0x95() {
    let b = start_broker_with(|s| s.mqtt.max_packet_size = 256).await;
    let mut by = Bystanders::new(b.addr).await;
    let mut c = Raw::v5(b.addr, "big").await;
    // Just fits: 3 bytes fixed header, 6 topic, 2 packet id, 1 property length, payload.
    let fits = publish_packet("by/t", QoS::AtLeastOnce, Some(1), &[b'a'; 244]);
    let mut buf = BytesMut::new();
    encode(&Packet::Publish(fits.clone()), V5, &mut buf).unwrap();
    assert_eq!(buf.len(), 256);
    assert_eq!(c.publish_qos1(fits).await.reason_code, ReasonCode::SUCCESS);
    let p = by.sub.recv_publish().await;
    by.sub.puback(p.packet_id.unwrap()).await;
    // ... one byte more does not.
    c.send(&Packet::Publish(publish_packet(
        "by/t",
        QoS::AtLeastOnce,
        Some(2),
        &[b'a'; 245],
    )))
    .await;
    c.expect_disconnect(ReasonCode::PACKET_TOO_LARGE).await;

    // A huge announced size is refused from the fixed header alone.
    let mut c = Raw::v5(b.addr, "huge").await;
    c.send_bytes(&[0x30, 0xff, 0xff, 0xff, 0x7f]).await;
    c.expect_disconnect(ReasonCode::PACKET_TOO_LARGE).await;
    by.sub.expect_silence().await;
    by.check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_alias_above_maximum_is_0x94() {
    let b = start_broker().await; // Topic Alias Maximum 64
    let mut by = Bystanders::new(b.addr).await;
    for alias in [65u16, 0, u16::MAX] {
        let mut c = Raw::v5(b.addr, "alias").await;
        let mut p = publish_packet("by/t", QoS::AtMostOnce, None, b"x");
        p.properties.topic_alias = Some(alias);
        c.send(&Packet::Publish(p)).await;
        c.expect_disconnect(ReasonCode::TOPIC_ALIAS_INVALID).await;
    }
    // The highest allowed alias works.
    let mut c = Raw::v5(b.addr, "alias-ok").await;
    let mut p = publish_packet("by/t", QoS::AtLeastOnce, Some(1), b"x");
    p.properties.topic_alias = Some(64);
    assert_eq!(c.publish_qos1(p).await.reason_code, ReasonCode::SUCCESS);
    let got = by.sub.recv_publish().await;
    by.sub.puback(got.packet_id.unwrap()).await;
    // An alias never set is a Protocol Error.
    let mut p = publish_packet("", QoS::AtMostOnce, None, b"x");
    p.properties.topic_alias = Some(3);
    c.send(&Packet::Publish(p)).await;
    c.expect_disconnect(ReasonCode::PROTOCOL_ERROR).await;
    by.check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_remaining_length_is_0x81() {
    let b = start_broker().await;
    let mut by = Bystanders::new(b.addr).await;
    // Five length bytes: more than a variable byte integer may have.
    let mut c = Raw::v5(b.addr, "badlen").await;
    c.send_bytes(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]).await;
    c.expect_disconnect(ReasonCode::MALFORMED_PACKET).await;
    // A 3.1.1 client is just closed.
    let mut c = Raw::v3(b.addr, "badlen3").await;
    c.send_bytes(&[0xc0, 0x80, 0x80, 0x80, 0x80, 0x01]).await;
    assert!(c.expect_closed().await.is_empty());
    by.check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_malformed_packets_are_0x81_or_0x82() {
    let b = start_broker().await;
    let mut by = Bystanders::new(b.addr).await;
    let cases: Vec<(&str, Vec<u8>, ReasonCode)> = vec![
        // PUBLISH with QoS 3.
        (
            "qos3",
            vec![0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01],
            ReasonCode::MALFORMED_PACKET,
        ),
        // PUBLISH QoS0 with DUP.
        (
            "dup0",
            vec![0x38, 0x04, 0x00, 0x01, b'a', 0x00],
            ReasonCode::MALFORMED_PACKET,
        ),
        // SUBSCRIBE with wrong fixed header flags.
        (
            "subflags",
            vec![0x80, 0x06, 0x00, 0x01, 0x00, 0x00, 0x01, b'a'],
            ReasonCode::MALFORMED_PACKET,
        ),
        // Topic string longer than the packet.
        (
            "strlen",
            vec![0x30, 0x03, 0x00, 0x09, b'a'],
            ReasonCode::MALFORMED_PACKET,
        ),
        // A server-to-client packet (CONNACK).
        (
            "connack",
            vec![0x20, 0x03, 0x00, 0x00, 0x00],
            ReasonCode::PROTOCOL_ERROR,
        ),
        // PINGREQ with a body.
        ("ping", vec![0xc0, 0x01, 0x00], ReasonCode::MALFORMED_PACKET),
    ];
    for (name, bytes, want) in cases {
        let mut c = Raw::v5(b.addr, name).await;
        c.send_bytes(&bytes).await;
        let seen = c.expect_closed().await;
        match seen.last() {
            Some(Packet::Disconnect(d)) => {
                assert_eq!(d.reason_code, want, "case {name}")
            }
            other => panic!("case {name}: expected DISCONNECT {want}, got {other:?}"),
        }
    }
    by.check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ill_formed_subscription_filter_is_0x81() {
    let b = start_broker().await;
    let mut by = Bystanders::new(b.addr).await;
    // An ill-formed filter closes the connection, even beside a valid one (§4.7.1, §4.13);
    // tests/it/conformance.rs covers the other forms, UNSUBSCRIBE and 3.1.1.
    let mut c = Raw::v5(b.addr, "filters").await;
    c.send(&Packet::Subscribe(Subscribe {
        packet_id: 5,
        filters: vec![
            ("ok/+".into(), sub_opts(QoS::AtLeastOnce)),
            ("a/#/b".into(), sub_opts(QoS::AtLeastOnce)),
        ],
        properties: Default::default(),
    }))
    .await;
    c.expect_disconnect(ReasonCode::MALFORMED_PACKET).await;
    by.check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_does_not_stall_others() {
    let b = start_broker_with(|s| s.mqtt.max_write_buffer = 64 * 1024).await;
    let mut by = Bystanders::new(b.addr).await;
    // Subscribes to a busy topic and then never reads its socket.
    let mut lazy = Raw::v5(b.addr, "lazy").await;
    lazy.subscribe("flood/#", sub_opts(QoS::AtMostOnce)).await;
    let mut flood = Raw::v5(b.addr, "flooder").await;
    let payload = vec![b'f'; 16 * 1024];
    let mut buf = BytesMut::new();
    for _ in 0..1000 {
        // 16 MB in total, far more than the socket buffers hold.
        encode(
            &Packet::Publish(publish_packet("flood/x", QoS::AtMostOnce, None, &payload)),
            V5,
            &mut buf,
        )
        .unwrap();
    }
    let started = tokio::time::Instant::now();
    flood.send_bytes(&buf).await;
    flood.ping().await;
    by.check().await;
    assert!(started.elapsed() < WAIT, "others stalled by a slow reader");
    let _ = lazy;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_with_bad_will_topic_is_refused() {
    let b = start_broker().await;
    let (mut c, ack) = Raw::connect(b.addr, V5, "badwill", |c| {
        c.will = Some(tiermq_common::codec::LastWill {
            topic: "will/#".into(),
            payload: bytes::Bytes::from_static(b"x"),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Default::default(),
        });
    })
    .await;
    assert_eq!(ack.reason_code, ReasonCode::TOPIC_NAME_INVALID);
    c.expect_closed().await;
    assert_broker_healthy(b.addr).await;
}

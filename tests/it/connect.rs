//! CONNECT / CONNACK: session present, client identifiers, CONNACK properties, refusals.

use crate::support::*;
use bytes::BytesMut;
use tiermq_common::codec::{encode, Packet};
use tiermq_common::{ProtocolVersion, QoS, ReasonCode};

const V5: ProtocolVersion = ProtocolVersion::V5;
const V3: ProtocolVersion = ProtocolVersion::V311;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_session_present_follows_clean_start_and_expiry() {
    let b = start_broker().await;
    let persistent = |c: &mut tiermq_common::codec::Connect| {
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(60);
    };
    let (raw, ack) = Raw::connect(b.addr, V5, "sp5", persistent).await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    assert!(!ack.session_present, "no session existed yet");
    raw.disconnect(ReasonCode::NORMAL_DISCONNECTION).await;

    let (raw, ack) = Raw::connect(b.addr, V5, "sp5", persistent).await;
    assert!(ack.session_present, "session kept with expiry 60");
    raw.disconnect(ReasonCode::NORMAL_DISCONNECTION).await;

    // Clean start discards the session; the CONNACK says so.
    let (raw, ack) = Raw::connect(b.addr, V5, "sp5", |c| {
        c.properties.session_expiry_interval = Some(60);
    })
    .await;
    assert!(!ack.session_present);
    raw.disconnect(ReasonCode::NORMAL_DISCONNECTION).await;

    // Expiry 0 (the default): the session ends with the connection.
    let (raw, ack) = Raw::connect(b.addr, V5, "sp5-zero", |c| c.clean_start = false).await;
    assert!(!ack.session_present);
    raw.disconnect(ReasonCode::NORMAL_DISCONNECTION).await;
    let (_raw, ack) = Raw::connect(b.addr, V5, "sp5-zero", |c| c.clean_start = false).await;
    assert!(!ack.session_present, "expiry 0 must not keep the session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v3_session_present_follows_clean_session() {
    let b = start_broker().await;
    let (raw, ack) = Raw::connect(b.addr, V3, "sp3", |c| c.clean_start = false).await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    assert!(!ack.session_present);
    raw.disconnect(ReasonCode::NORMAL_DISCONNECTION).await;

    let (raw, ack) = Raw::connect(b.addr, V3, "sp3", |c| c.clean_start = false).await;
    assert!(ack.session_present);
    raw.disconnect(ReasonCode::NORMAL_DISCONNECTION).await;

    let (raw, ack) = Raw::connect(b.addr, V3, "sp3", |c| c.clean_start = true).await;
    assert!(!ack.session_present);
    raw.disconnect(ReasonCode::NORMAL_DISCONNECTION).await;
    // A clean session is not kept either.
    let (_raw, ack) = Raw::connect(b.addr, V3, "sp3", |c| c.clean_start = false).await;
    assert!(!ack.session_present);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_present_with_real_clients() {
    let b = start_broker().await;
    let (c, ack) = V5::connect(b.addr, "rq5", |o| {
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(60));
    })
    .await;
    assert!(!ack.session_present);
    c.disconnect().await;
    let (c, ack) = V5::connect(b.addr, "rq5", |o| {
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(60));
    })
    .await;
    assert!(ack.session_present);
    c.disconnect().await;

    let (c, ack) = V3::connect(b.addr, "rq3", |o| {
        o.set_clean_session(false);
    })
    .await;
    assert!(!ack.session_present);
    c.disconnect().await;
    let (_c, ack) = V3::connect(b.addr, "rq3", |o| {
        o.set_clean_session(false);
    })
    .await;
    assert!(ack.session_present);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_empty_client_id_gets_an_assigned_identifier() {
    let b = start_broker().await;
    let (mut raw, ack) = Raw::connect(b.addr, V5, "", |_| {}).await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    let id = ack
        .properties
        .assigned_client_identifier
        .clone()
        .expect("Assigned Client Identifier in CONNACK");
    assert!(!id.is_empty());
    // The connection works.
    raw.subscribe("assigned/t", sub_opts(QoS::AtMostOnce)).await;
    raw.send(&Packet::Publish(publish_packet(
        "assigned/t",
        QoS::AtMostOnce,
        None,
        b"x",
    )))
    .await;
    assert_eq!(&raw.recv_publish().await.payload[..], b"x");

    // A second anonymous client gets a different identifier (no takeover of the first).
    let (_raw2, ack2) = Raw::connect(b.addr, V5, "", |_| {}).await;
    let id2 = ack2.properties.assigned_client_identifier.unwrap();
    assert_ne!(id, id2);
    raw.ping().await;

    // A client given a name gets no Assigned Client Identifier.
    let (_raw3, ack3) = Raw::connect(b.addr, V5, "named", |_| {}).await;
    assert_eq!(ack3.properties.assigned_client_identifier, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v3_empty_client_id_needs_clean_session() {
    let b = start_broker().await;
    let (mut raw, ack) = Raw::connect(b.addr, V3, "", |c| c.clean_start = false).await;
    // 3.1.1 return code 2, "identifier rejected".
    assert_eq!(ack.reason_code, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID);
    assert_eq!(ack.reason_code.to_v311_connack(), 2);
    assert!(!ack.session_present);
    raw.expect_closed().await;

    let (mut raw, ack) = Raw::connect(b.addr, V3, "", |c| c.clean_start = true).await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    raw.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_connack_announces_limits_and_features() {
    let b = start_broker().await;
    let (_raw, ack) = Raw::connect(b.addr, V5, "props", |_| {}).await;
    let p = &ack.properties;
    assert_eq!(p.receive_maximum, Some(1024));
    assert_eq!(p.maximum_packet_size, Some(1024 * 1024));
    assert_eq!(p.topic_alias_maximum, Some(64));
    // Retain Available may be absent (= available) or 1.
    assert_ne!(p.retain_available, Some(false));
    assert_ne!(p.wildcard_subscription_available, Some(false));
    assert_ne!(p.subscription_identifiers_available, Some(false));
    // QoS 2 is supported: Maximum QoS is absent.
    assert_eq!(p.maximum_qos, None);
    // Not capped: no Server Keep Alive.
    assert_eq!(p.server_keep_alive, None);

    // A real client parses the same CONNACK.
    let (_c, ack) = V5::connect(b.addr, "props-rumqttc", |_| {}).await;
    let p = ack.properties.expect("CONNACK properties");
    assert_eq!(p.receive_max, Some(1024));
    assert_eq!(p.max_packet_size, Some(1024 * 1024));
    assert_eq!(p.topic_alias_max, Some(64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_connack_reflects_configured_limits() {
    let b = start_broker_with(|s| {
        s.mqtt.receive_maximum = 7;
        s.mqtt.max_packet_size = 2048;
        s.mqtt.topic_alias_maximum = 3;
        s.mqtt.retain_available = false;
        s.mqtt.maximum_qos = 1;
    })
    .await;
    let (_raw, ack) = Raw::connect(b.addr, V5, "props", |_| {}).await;
    let p = &ack.properties;
    assert_eq!(p.receive_maximum, Some(7));
    assert_eq!(p.maximum_packet_size, Some(2048));
    assert_eq!(p.topic_alias_maximum, Some(3));
    assert_eq!(p.retain_available, Some(false));
    assert_eq!(p.maximum_qos, Some(QoS::AtLeastOnce));
}

/// Request Response Information (§3.1.2.11.6): the configured prefix + client id in CONNACK
/// only when asked; CONNECT User Properties are accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_information_only_when_requested() {
    let b = start_broker_with(|s| s.mqtt.response_information = "replies/".into()).await;
    let (_r, ack) = Raw::connect(b.addr, V5, "rri-yes", |c| {
        c.properties.request_response_information = Some(true);
        c.properties
            .user_properties
            .push(("region".into(), "eu".into()));
    })
    .await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    let info = ack
        .properties
        .response_information
        .expect("response information");
    assert!(info.starts_with("replies/"), "{info}");
    let (_r, ack) = Raw::connect(b.addr, V5, "rri-no", |_| {}).await;
    assert_eq!(ack.properties.response_information, None);
    // Not offered when unconfigured, even if asked.
    let plain = start_broker().await;
    let (_r, ack) = Raw::connect(plain.addr, V5, "rri-off", |c| {
        c.properties.request_response_information = Some(true);
    })
    .await;
    assert_eq!(ack.properties.response_information, None);
}

/// `session.max_subscriptions`: SUBACK 0x97 (v5) / 0x80 (3.1.1) beyond it; replacing an
/// existing subscription does not count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_subscriptions_per_client() {
    let b = start_broker_with(|s| s.session.max_subscriptions = 2).await;
    for (version, over) in [(V5, ReasonCode::QUOTA_EXCEEDED), (V3, ReasonCode(0x80))] {
        let id = format!("maxsub-{version:?}");
        let (mut c, _) = Raw::connect(b.addr, version, &id, |_| {}).await;
        let opts = sub_opts(QoS::AtLeastOnce);
        assert_eq!(
            c.subscribe("a", opts).await.reason_codes,
            vec![ReasonCode(1)]
        );
        assert_eq!(
            c.subscribe("b", opts).await.reason_codes,
            vec![ReasonCode(1)]
        );
        assert_eq!(
            c.subscribe("a", opts).await.reason_codes,
            vec![ReasonCode(1)]
        );
        c.send(&Packet::Subscribe(tiermq_common::codec::Subscribe {
            packet_id: 9,
            filters: vec![("c".into(), opts)],
            properties: Default::default(),
        }))
        .await;
        match c.recv().await {
            Packet::SubAck(a) => assert_eq!(a.reason_codes, vec![over], "{version:?}"),
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_keep_alive_when_capped() {
    let b = start_broker_with(|s| s.mqtt.max_keep_alive = 10).await;
    let (_r, ack) = Raw::connect(b.addr, V5, "ka-high", |c| c.keep_alive = 60).await;
    assert_eq!(ack.properties.server_keep_alive, Some(10));
    // Keep alive 0 (disabled) is capped too.
    let (_r, ack) = Raw::connect(b.addr, V5, "ka-zero", |c| c.keep_alive = 0).await;
    assert_eq!(ack.properties.server_keep_alive, Some(10));
    // Within the cap: the client's value stands and no Server Keep Alive is sent.
    let (_r, ack) = Raw::connect(b.addr, V5, "ka-low", |c| c.keep_alive = 5).await;
    assert_eq!(ack.properties.server_keep_alive, None);
}

/// A CONNECT whose protocol level byte is replaced by `level`.
fn connect_bytes_with_level(level: u8) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode(&Packet::Connect(connect_packet(V5, "lvl")), V5, &mut buf).unwrap();
    // Fixed header (2 bytes: short packet), protocol name (2 + 4), then the level.
    assert_eq!(&buf[2..8], b"\x00\x04MQTT");
    assert_eq!(buf[8], 5);
    buf[8] = level;
    buf.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_protocol_level_is_refused() {
    let b = start_broker().await;
    for level in [2u8, 6, 0x7f] {
        let mut raw = Raw::open(b.addr, V3).await;
        raw.send_bytes(&connect_bytes_with_level(level)).await;
        let seen = raw.expect_closed().await;
        // The refusal uses the 3.1.1 layout every client can read: return code 1, which is
        // the v5 reason 0x84 (Unsupported Protocol Version).
        match &seen[..] {
            [Packet::ConnAck(ack)] => {
                assert_eq!(ack.reason_code, ReasonCode::UNSUPPORTED_PROTOCOL_VERSION);
                assert!(!ack.session_present);
            }
            other => panic!("level {level}: expected one CONNACK, got {other:?}"),
        }
    }
    assert_broker_healthy(b.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_protocol_level_wire_bytes() {
    let b = start_broker().await;
    let mut s = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(&connect_bytes_with_level(6)).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut got))
        .await
        .expect("closed in time")
        .unwrap();
    assert_eq!(
        got,
        vec![0x20, 0x02, 0x00, 0x01],
        "3.1.1 CONNACK, return code 1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_method_is_refused_with_0x8c() {
    let b = start_broker().await;
    let (mut raw, ack) = Raw::connect(b.addr, V5, "auth", |c| {
        c.properties.authentication_method = Some("SCRAM-SHA-1".into());
        c.properties.authentication_data = Some(bytes::Bytes::from_static(b"client-first"));
    })
    .await;
    assert_eq!(ack.reason_code, ReasonCode::BAD_AUTHENTICATION_METHOD);
    assert!(!ack.session_present);
    raw.expect_closed().await;
    assert_broker_healthy(b.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connect_keeps_existing_session() {
    // A refused CONNECT for a client id must not disturb that client's live connection.
    let b = start_broker().await;
    let mut live = Raw::v5(b.addr, "victim").await;
    let (mut raw, ack) = Raw::connect(b.addr, V5, "victim", |c| {
        c.properties.authentication_method = Some("nope".into());
    })
    .await;
    assert_eq!(ack.reason_code, ReasonCode::BAD_AUTHENTICATION_METHOD);
    raw.expect_closed().await;
    live.ping().await;
}

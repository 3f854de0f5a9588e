//! CONNECT → CONNACK: what the session service is asked, and how its answer (or failure)
//! reaches the client.

use tiermq_common::codec::{LastWill, Packet, WillProperties};
use tiermq_common::session_api::{DisconnectRequest, ServiceError};
use tiermq_common::{ProtocolVersion, QoS, ReasonCode};

use super::{
    brief, connect_packet, connected, eventually, unavailable, will, Client, FakeSessions,
};
use crate::config::FrontendConfig;

#[tokio::test(start_paused = true)]
async fn connack_says_session_present_as_the_service_answers() {
    let service = FakeSessions::new();
    for present in [true, false] {
        service.connect.queue(Ok(present));
        let mut client = Client::open(&service, FrontendConfig::default());
        let mut connect = connect_packet(ProtocolVersion::V5, "c1");
        connect.clean_start = false;
        connect.properties.session_expiry_interval = Some(60);
        connect.properties.receive_maximum = Some(10);
        assert_eq!(client.handshake(connect).await, present);
    }
    let req = &service.connects()[0];
    assert_eq!(&*req.client_id, "c1");
    assert!(!req.clean_start);
    assert_eq!(req.protocol, ProtocolVersion::V5);
    assert_eq!(req.session_expiry_secs, 60);
    assert_eq!(req.receive_maximum, 10);
    assert!(req.will.is_none());
}

/// The partitions refusing a CONNECT: 0x97 for a quota, 0x88 Server unavailable for anything
/// else (a takeover race, shutdown, unreachable). The session is not told of a disconnect:
/// it never had this connection.
#[tokio::test(start_paused = true)]
async fn a_connect_the_service_refuses_gets_the_matching_connack_code() {
    let cases = [
        (
            ServiceError::QuotaExceeded("sessions"),
            ReasonCode::QUOTA_EXCEEDED,
        ),
        (unavailable(), ReasonCode::SERVER_UNAVAILABLE),
        (ServiceError::ShuttingDown, ReasonCode::SERVER_UNAVAILABLE),
        (
            ServiceError::SessionTakenOver,
            ReasonCode::SERVER_UNAVAILABLE,
        ),
    ];
    for (error, code) in cases {
        let service = FakeSessions::new();
        service.connect.queue(Err(error.clone()));
        let mut client = Client::open(&service, FrontendConfig::default());
        client
            .send(Packet::Connect(connect_packet(ProtocolVersion::V5, "c1")))
            .await;
        let last = client.closed().await;
        assert_eq!(last.len(), 1, "{error}: {last:?}");
        assert_eq!(brief(&last[0]), format!("CONNACK {code}"), "{error}");
        assert!(service.disconnects().is_empty(), "{error}");
    }
}

/// 3.1.1 has no Session Expiry: Clean Session 0 keeps the session for ever, 1 ends it with
/// the connection; the in-flight window is the configured one (no Receive Maximum).
#[tokio::test(start_paused = true)]
async fn a_311_connect_asks_for_the_session_clean_session_says() {
    let service = FakeSessions::new();
    for clean in [false, true] {
        let mut client = Client::open(&service, FrontendConfig::default());
        let mut connect = connect_packet(ProtocolVersion::V311, "c1");
        connect.clean_start = clean;
        client.handshake(connect).await;
    }
    let reqs = service.connects();
    assert_eq!(reqs[0].session_expiry_secs, u32::MAX);
    assert_eq!(reqs[1].session_expiry_secs, 0);
    let v311_inflight = FrontendConfig::default().v311_inflight;
    assert!(reqs.iter().all(|r| r.receive_maximum == v311_inflight));
    assert!(reqs.iter().all(|r| r.protocol == ProtocolVersion::V311));
}

#[tokio::test(start_paused = true)]
async fn the_will_reaches_the_service_with_its_delay() {
    let service = FakeSessions::new();
    let mut client = Client::open(&service, FrontendConfig::default());
    let mut connect = connect_packet(ProtocolVersion::V5, "c1");
    connect.will = Some(LastWill {
        properties: WillProperties {
            will_delay_interval: Some(30),
            ..WillProperties::default()
        },
        ..will("gone/c1", "bye")
    });
    client.handshake(connect).await;
    let will = service.connects()[0].will.clone().expect("a will");
    assert_eq!(will.message.topic, "gone/c1");
    assert_eq!(&will.message.payload[..], b"bye");
    assert_eq!(will.message.qos, QoS::AtLeastOnce);
    assert_eq!(will.delay_secs, 30);
}

/// A will the server cannot take refuses the CONNECT before the session is asked.
#[tokio::test(start_paused = true)]
async fn a_will_on_a_sys_topic_is_refused_before_the_session_is_opened() {
    let service = FakeSessions::new();
    let mut client = Client::open(&service, FrontendConfig::default());
    let mut connect = connect_packet(ProtocolVersion::V5, "c1");
    connect.will = Some(will("$SYS/fake", "x"));
    client.send(Packet::Connect(connect)).await;
    assert_eq!(
        client.closed_brief().await,
        [format!("CONNACK {}", ReasonCode::TOPIC_NAME_INVALID)]
    );
    assert!(service.calls().is_empty(), "{:?}", service.calls());
}

/// The client went away while the partitions opened its session: CONNACK cannot be written,
/// and the session is told its connection ended (the will fires, expiry starts) instead of
/// staying attached to nothing.
#[tokio::test(start_paused = true)]
async fn a_connack_that_cannot_be_written_detaches_the_session() {
    let service = FakeSessions::new();
    service.connect.hold();
    let mut client = Client::open(&service, FrontendConfig::default());
    client
        .send(Packet::Connect(connect_packet(ProtocolVersion::V5, "c1")))
        .await;
    eventually(|| service.connect.held() == 1).await;
    let task = client.hang_up();
    service.connect.release(Ok(false));
    task.await.expect("the connection task does not panic");
    assert_eq!(service.disconnects(), [DisconnectRequest::ABNORMAL]);
}

#[tokio::test(start_paused = true)]
async fn a_second_connect_is_a_protocol_error() {
    let service = FakeSessions::new();
    let mut client = connected(&service, ProtocolVersion::V5).await;
    client
        .send(Packet::Connect(connect_packet(ProtocolVersion::V5, "c1")))
        .await;
    assert_eq!(
        client.closed_brief().await,
        [format!("DISCONNECT {}", ReasonCode::PROTOCOL_ERROR)]
    );
    assert_eq!(service.disconnects(), [DisconnectRequest::ABNORMAL]);
}

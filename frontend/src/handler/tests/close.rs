//! How a connection ends and what the session is told: DISCONNECT and its reason code,
//! keep alive, the client going away, shutdown, drain, protocol errors.

use std::time::Duration;

use tiermq_common::codec::{Auth, Disconnect, Packet};
use tiermq_common::session_api::{DisconnectRequest, Published};
use tiermq_common::{ProtocolVersion, QoS, ReasonCode};

use super::{brief, connect_packet, connected, connected_with, publish, Client, FakeSessions};
use crate::config::FrontendConfig;
use crate::drain::Drain;

/// DISCONNECT 0x00 discards the will; 0x04 and any error code publish it (§3.1.2.5,
/// §3.14.4).
#[tokio::test(start_paused = true)]
async fn the_disconnect_reason_code_decides_the_will() {
    let cases = [
        (ReasonCode::NORMAL_DISCONNECTION, true, false),
        (ReasonCode::DISCONNECT_WITH_WILL, false, true),
        (ReasonCode::UNSPECIFIED_ERROR, false, true),
    ];
    for (reason, normal, with_will) in cases {
        let service = FakeSessions::new();
        let mut client = connected(&service, ProtocolVersion::V5).await;
        client
            .send(Packet::Disconnect(Disconnect::with_reason(reason)))
            .await;
        assert!(client.closed().await.is_empty());
        let expected = DisconnectRequest {
            normal,
            with_will,
            session_expiry_secs: None,
        };
        assert_eq!(service.disconnects(), [expected], "{reason}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_311_disconnect_is_normal() {
    let service = FakeSessions::new();
    let mut client = connected(&service, ProtocolVersion::V311).await;
    client.send(Packet::Disconnect(Disconnect::normal())).await;
    assert!(client.closed().await.is_empty());
    let expected = DisconnectRequest {
        normal: true,
        with_will: false,
        session_expiry_secs: None,
    };
    assert_eq!(service.disconnects(), [expected]);
}

/// DISCONNECT may change the Session Expiry Interval (§3.14.2.2.2)...
#[tokio::test(start_paused = true)]
async fn the_disconnect_session_expiry_reaches_the_service() {
    let service = FakeSessions::new();
    let mut client = Client::open(&service, FrontendConfig::default());
    let mut connect = connect_packet(ProtocolVersion::V5, "c1");
    connect.properties.session_expiry_interval = Some(10);
    client.handshake(connect).await;
    let mut disconnect = Disconnect::normal();
    disconnect.properties.session_expiry_interval = Some(30);
    client.send(Packet::Disconnect(disconnect)).await;
    assert!(client.closed().await.is_empty());
    assert_eq!(service.disconnects()[0].session_expiry_secs, Some(30));
}

/// ... but not raise it from 0: a protocol error, and the will fires.
#[tokio::test(start_paused = true)]
async fn raising_the_session_expiry_from_zero_is_a_protocol_error() {
    let service = FakeSessions::new();
    let mut client = connected(&service, ProtocolVersion::V5).await;
    let mut disconnect = Disconnect::normal();
    disconnect.properties.session_expiry_interval = Some(30);
    client.send(Packet::Disconnect(disconnect)).await;
    let last = client.closed_brief().await;
    assert_eq!(last, ["DISCONNECT 0x82"]);
    assert_eq!(service.disconnects(), [DisconnectRequest::ABNORMAL]);
}

#[tokio::test(start_paused = true)]
async fn a_client_that_goes_away_without_disconnect_ends_abnormally() {
    let service = FakeSessions::new();
    let client = connected(&service, ProtocolVersion::V5).await;
    client.hang_up().await.unwrap();
    assert_eq!(service.disconnects(), [DisconnectRequest::ABNORMAL]);
}

/// Keep alive: 1.5 × the value without a packet closes with 0x8D and the will fires; a
/// client that pings in time stays.
#[tokio::test(start_paused = true)]
async fn keep_alive_expires_after_one_and_a_half_times_the_value() {
    let service = FakeSessions::new();
    let mut client = Client::open(&service, FrontendConfig::default());
    let mut connect = connect_packet(ProtocolVersion::V5, "c1");
    connect.keep_alive = 2;
    client.handshake(connect).await;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        client.ping().await;
    }
    let silent_since = tokio::time::Instant::now();
    let last = client.closed_brief().await;
    assert_eq!(last, ["DISCONNECT 0x8D"]);
    let waited = silent_since.elapsed();
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_millis(3_100),
        "closed after {waited:?}"
    );
    assert_eq!(service.disconnects(), [DisconnectRequest::ABNORMAL]);
}

#[tokio::test(start_paused = true)]
async fn shutdown_closes_with_0x8b() {
    let service = FakeSessions::new();
    let client = connected(&service, ProtocolVersion::V5).await;
    client.shutdown.cancel();
    let last = client.closed_brief().await;
    assert_eq!(last, ["DISCONNECT 0x8B"]);
    assert_eq!(service.disconnects(), [DisconnectRequest::ABNORMAL]);
}

/// Drain: the publishes the partitions already have are answered, the session is detached
/// keeping it and discarding the will (a planned move), and only then the v5 client hears
/// 0x9C with the Server Reference.
#[tokio::test(start_paused = true)]
async fn drain_answers_pending_publishes_then_sends_0x9c() {
    let service = FakeSessions::new();
    let drain = Drain::new(&["elsewhere:1883".to_string()], 0);
    let config = FrontendConfig {
        drain: drain.clone(),
        ..FrontendConfig::default()
    };
    let mut client = connected_with(&service, ProtocolVersion::V5, config).await;
    service.publish.hold();
    client
        .send(publish("t", QoS::AtLeastOnce, Some(1), "x"))
        .await;
    client.ping().await;
    drain.start();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        service.disconnects().is_empty(),
        "the publish is answered first"
    );
    service.publish.release(Ok(Published {
        matched: true,
        duplicate: false,
        refused: false,
    }));
    let last = client.closed().await;
    assert_eq!(
        last.iter().map(brief).collect::<Vec<_>>(),
        ["PUBACK 1 0x00", "DISCONNECT 0x9C"]
    );
    match &last[1] {
        Packet::Disconnect(d) => assert_eq!(
            d.properties.server_reference.as_deref(),
            Some("elsewhere:1883")
        ),
        p => panic!("expected DISCONNECT, got {p:?}"),
    }
    let keep_session = DisconnectRequest {
        normal: true,
        with_will: false,
        session_expiry_secs: None,
    };
    assert_eq!(service.disconnects(), [keep_session]);
}

/// Packets the client may not send after CONNACK: DISCONNECT 0x82, the will fires.
#[tokio::test(start_paused = true)]
async fn packets_a_client_may_not_send_are_protocol_errors() {
    let auth = Auth {
        reason_code: ReasonCode::REAUTHENTICATE,
        properties: Default::default(),
    };
    for packet in [Packet::PingResp, Packet::Auth(auth)] {
        let service = FakeSessions::new();
        let mut client = connected(&service, ProtocolVersion::V5).await;
        client.send(packet.clone()).await;
        let last = client.closed_brief().await;
        assert_eq!(last, ["DISCONNECT 0x82"], "{}", packet.name());
        assert_eq!(service.disconnects(), [DisconnectRequest::ABNORMAL]);
    }
}

/// A client that sends DISCONNECT 0x00 and closes at once: our next write meets its reset,
/// yet what it sent before is still read, so its DISCONNECT counts (no will, §3.14.4).
#[tokio::test(start_paused = true)]
async fn a_disconnect_read_after_a_failed_write_still_discards_the_will() {
    let service = FakeSessions::new();
    let mut client = connected(&service, ProtocolVersion::V5).await;
    // More than the pipe holds: the connection has bytes waiting to be written.
    let payload: &'static str = "x".repeat(10_000).leak();
    for _ in 0..10 {
        service.send(super::delivery(QoS::AtMostOnce, None, payload));
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    client.send(Packet::Disconnect(Disconnect::normal())).await;
    client.hang_up().await.unwrap();
    let normal = DisconnectRequest {
        normal: true,
        with_will: false,
        session_expiry_secs: None,
    };
    assert_eq!(service.disconnects(), [normal]);
}

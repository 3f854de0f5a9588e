//! Session events → packets to the client, and the client's acks for them → the service.
//! The test decides which events reach the connection, in which order relative to the
//! client's packets, and what the answers say — orders a real cluster produces only by
//! chance (events and answers to commands travel apart).

use std::sync::Arc;

use tiermq_common::codec::{Packet, PubAck, PubComp, PubRec};
use tiermq_common::session_api::{AckKind, Delivery, DisconnectRequest, SessionEvent};
use tiermq_common::{Message, ProtocolVersion, QoS, ReasonCode};

use super::{connect_packet, connected, delivery, unavailable, Client, FakeSessions};
use crate::config::FrontendConfig;

/// A QoS2 delivery of packet id `packet_id` computed at log index `index`.
fn qos2(packet_id: u16, dup: bool, index: u64, payload: &'static str) -> SessionEvent {
    SessionEvent::Deliver(Delivery {
        packet_id: Some(packet_id),
        qos: QoS::ExactlyOnce,
        retain: false,
        dup,
        subscription_ids: Vec::new(),
        expiry_secs: None,
        message: Arc::new(Message::new("t", payload, QoS::ExactlyOnce, false)),
        index: Some(index),
    })
}

/// The packet id, DUP flag and payload of a PUBLISH.
fn published(p: Packet) -> (Option<u16>, bool, String) {
    match p {
        Packet::Publish(p) => (
            p.packet_id,
            p.dup,
            String::from_utf8_lossy(&p.payload).into_owned(),
        ),
        p => panic!("expected PUBLISH, got {p:?}"),
    }
}

/// A v5 client that received a QoS2 delivery with packet id 2.
async fn qos2_delivered() -> (Arc<FakeSessions>, Client) {
    let service = FakeSessions::new();
    let mut client = connected(&service, ProtocolVersion::V5).await;
    service.send(qos2(2, false, 10, "m"));
    assert_eq!(client.recv_brief().await, "PUBLISH 2");
    (service, client)
}

#[tokio::test(start_paused = true)]
async fn a_qos1_delivery_goes_out_and_its_puback_reaches_the_service() {
    let service = FakeSessions::new();
    let mut client = connected(&service, ProtocolVersion::V5).await;
    service.send(delivery(QoS::AtLeastOnce, Some(3), "m"));
    match client.recv().await {
        Packet::Publish(p) => {
            assert_eq!(
                (p.packet_id, p.qos, p.topic.as_str(), &p.payload[..]),
                (Some(3), QoS::AtLeastOnce, "t", &b"m"[..])
            );
        }
        p => panic!("expected PUBLISH, got {p:?}"),
    }
    client.send(Packet::PubAck(PubAck::new(3))).await;
    client.ping().await;
    assert_eq!(service.acks(), [(AckKind::PubAck, 3)]);
}

#[tokio::test(start_paused = true)]
async fn a_qos0_delivery_has_no_packet_id() {
    let service = FakeSessions::new();
    let mut client = connected(&service, ProtocolVersion::V311).await;
    service.send(delivery(QoS::AtMostOnce, None, "m"));
    assert_eq!(
        published(client.recv().await),
        (None, false, "m".to_string())
    );
}

/// PUBREL waits until the PUBREC is durable (`SessionService::ack`): after PUBCOMP the
/// client forgets the id, and a PUBREC lost in a crash would make the session send the
/// message again as new.
#[tokio::test(start_paused = true)]
async fn pubrel_waits_until_the_pubrec_is_durable() {
    let (service, mut client) = qos2_delivered().await;
    service.pubrec.hold();
    client.send(Packet::PubRec(PubRec::new(2))).await;
    client.ping().await;
    assert_eq!(service.acks(), [(AckKind::PubRec, 2)]);
    client.quiet().await;
    service.pubrec.release(Ok(Some(20)));
    assert_eq!(client.recv_brief().await, "PUBREL 2 0x00");
    client.send(Packet::PubComp(PubComp::new(2))).await;
    client.ping().await;
    assert_eq!(
        service.acks(),
        [(AckKind::PubRec, 2), (AckKind::PubComp, 2)]
    );
}

/// A PUBREC with an error code ends the exchange (§4.3.3): the session hears PUBREC and
/// PUBCOMP at once, and no PUBREL goes out.
#[tokio::test(start_paused = true)]
async fn a_pubrec_with_an_error_code_ends_the_exchange() {
    let (service, mut client) = qos2_delivered().await;
    let refused = PubRec {
        reason_code: ReasonCode::QUOTA_EXCEEDED,
        ..PubRec::new(2)
    };
    client.send(Packet::PubRec(refused)).await;
    client.ping().await;
    assert_eq!(
        service.acks(),
        [(AckKind::PubRec, 2), (AckKind::PubComp, 2)]
    );
    client.quiet().await;
}

/// A PUBREC that could not be made durable: no PUBREL, the connection closes; the session
/// sends the PUBLISH again (DUP) to the next connection.
#[tokio::test(start_paused = true)]
async fn a_pubrec_not_made_durable_closes_without_pubrel() {
    let (service, mut client) = qos2_delivered().await;
    service.pubrec.queue(Err(unavailable()));
    client.send(Packet::PubRec(PubRec::new(2))).await;
    assert!(client.closed().await.is_empty());
    assert_eq!(service.disconnects(), [DisconnectRequest::ABNORMAL]);
}

#[tokio::test(start_paused = true)]
async fn a_release_event_resends_pubrel() {
    let service = FakeSessions::new();
    let mut client = connected(&service, ProtocolVersion::V5).await;
    service.send(SessionEvent::Release { packet_id: 8 });
    assert_eq!(client.recv_brief().await, "PUBREL 8 0x00");
}

/// The server closes the connection (a takeover elsewhere): v5 hears the reason, 3.1.1 is
/// closed; the session, which sent the event, is not told again.
#[tokio::test(start_paused = true)]
async fn a_disconnect_event_closes_with_its_reason() {
    for (version, expected) in [
        (ProtocolVersion::V5, vec!["DISCONNECT 0x8E".to_string()]),
        (ProtocolVersion::V311, vec![]),
    ] {
        let service = FakeSessions::new();
        let client = connected(&service, version).await;
        service.send(SessionEvent::Disconnect {
            reason: ReasonCode::SESSION_TAKEN_OVER,
        });
        let last = client.closed_brief().await;
        assert_eq!(last, expected);
        assert!(service.disconnects().is_empty());
    }
}

/// The session's event channel closed (the partitions dropped this connection): close.
#[tokio::test(start_paused = true)]
async fn a_closed_event_channel_closes_the_connection() {
    let service = FakeSessions::new();
    let client = connected(&service, ProtocolVersion::V5).await;
    service.close_events();
    assert!(client.closed().await.is_empty());
    assert!(service.disconnects().is_empty());
}

/// A delivery larger than the client's Maximum Packet Size is dropped as if delivered
/// (§3.1.2.11.4) and acknowledged to the session, so its in-flight window moves on.
#[tokio::test(start_paused = true)]
async fn a_delivery_over_the_clients_maximum_packet_size_is_dropped_and_acked() {
    let service = FakeSessions::new();
    let mut client = Client::open(&service, FrontendConfig::default());
    let mut connect = connect_packet(ProtocolVersion::V5, "c1");
    connect.properties.maximum_packet_size = Some(64);
    client.handshake(connect).await;
    let big = "x".repeat(100).leak();
    service.send(qos2(1, false, 10, big));
    service.send(delivery(QoS::AtLeastOnce, Some(2), big));
    service.send(delivery(QoS::AtLeastOnce, Some(3), "small"));
    assert_eq!(client.recv_brief().await, "PUBLISH 3");
    assert_eq!(
        service.acks(),
        [
            (AckKind::PubRec, 1),
            (AckKind::PubComp, 1),
            (AckKind::PubAck, 2)
        ]
    );
}

/// Issue 19, found by the simulation (seeds 5041, 5092, ...): a leader's replay computed
/// before the subscriber's PUBREC was applied reaches the connection after the client's
/// PUBCOMP. The client has completed and forgotten the packet id, so a PUBLISH DUP with it
/// would be taken for a new message: QoS2 delivered twice. A later, legitimate use of the id
/// (computed after the PUBREC) still goes out.
#[tokio::test(start_paused = true)]
async fn a_replay_older_than_the_pubrec_is_not_sent_after_pubcomp() {
    let service = FakeSessions::new();
    let mut client = connected(&service, ProtocolVersion::V5).await;

    service.send(qos2(1, false, 10, "a"));
    assert_eq!(published(client.recv().await), (Some(1), false, "a".into()));
    // The PUBREC is applied at index 20; PUBREL goes out once it is durable.
    service.pubrec.queue(Ok(Some(20)));
    client.send(Packet::PubRec(PubRec::new(1))).await;
    assert_eq!(client.recv_brief().await, "PUBREL 1 0x00");
    client.send(Packet::PubComp(PubComp::new(1))).await;
    // PINGRESP: the handler has read the PUBCOMP (packets are handled in order).
    client.ping().await;

    // The stale replay (computed at 15, before the PUBREC at 20), then a new message.
    service.send(qos2(1, true, 15, "a"));
    service.send(qos2(2, false, 30, "b"));
    assert_eq!(
        published(client.recv().await),
        (Some(2), false, "b".into()),
        "the stale replay of packet id 1 reached the client"
    );
    // The id used again for a new message, computed after the PUBREC: sent.
    service.send(qos2(1, false, 40, "c"));
    assert_eq!(published(client.recv().await), (Some(1), false, "c".into()));
}

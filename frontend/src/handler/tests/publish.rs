//! PUBLISH from the client: acks only once the partitions made the message durable, in the
//! order the publishes came (§4.6), with the v5 reason codes the answers call for; PUBREL
//! from the client → release → PUBCOMP.

use std::sync::Arc;
use tiermq_common::codec::{Packet, PubRel};

use tiermq_common::session_api::{DisconnectRequest, Published, ServiceError, ServiceResult};
use tiermq_common::{ProtocolVersion, QoS, ReasonCode};

use super::{connected, connected_with, eventually, publish, unavailable, Client, FakeSessions};
use crate::config::FrontendConfig;

fn published(matched: bool, refused: bool) -> Published {
    Published {
        matched,
        duplicate: false,
        refused,
    }
}

/// A connected client of `version` whose PUBLISH (`qos`, packet id 1) the service answers
/// with `answer`.
async fn publish_answered(
    version: ProtocolVersion,
    qos: QoS,
    answer: ServiceResult<Published>,
) -> (Arc<FakeSessions>, Client) {
    let service = FakeSessions::new();
    let mut client = connected(&service, version).await;
    service.publish.queue(answer);
    client.send(publish("t", qos, Some(1), "x")).await;
    (service, client)
}

/// A connected v5 client that sent `packets` while the service holds its publish answers;
/// all of them handled.
async fn sent_while_held(packets: Vec<Packet>) -> (Arc<FakeSessions>, Client) {
    let service = FakeSessions::new();
    let mut client = connected(&service, ProtocolVersion::V5).await;
    service.publish.hold();
    for p in packets {
        client.send(p).await;
    }
    client.ping().await;
    (service, client)
}

/// The promise a PUBACK makes: it goes out only when the service's publish resolved.
#[tokio::test(start_paused = true)]
async fn qos1_puback_waits_until_the_publish_is_durable() {
    let packets = vec![publish("a/b", QoS::AtLeastOnce, Some(1), "x")];
    let (service, mut client) = sent_while_held(packets).await;
    assert_eq!(service.publishes().len(), 1, "submitted at once");
    let (message, inbound) = &service.publishes()[0];
    assert_eq!(
        (
            message.topic.as_str(),
            &message.payload[..],
            message.qos,
            *inbound
        ),
        ("a/b", &b"x"[..], QoS::AtLeastOnce, None)
    );
    client.quiet().await;
    service.publish.release(Ok(published(true, false)));
    assert_eq!(client.recv_brief().await, "PUBACK 1 0x00");
}

/// Pipelined publishes: the partitions may answer the second first, the client still gets
/// its PUBACKs in the order it published.
#[tokio::test(start_paused = true)]
async fn pipelined_acks_leave_in_the_order_the_publishes_came() {
    let packets = vec![
        publish("t", QoS::AtLeastOnce, Some(1), "1"),
        publish("t", QoS::ExactlyOnce, Some(2), "2"),
    ];
    let (service, mut client) = sent_while_held(packets).await;
    assert_eq!(service.publish.held(), 2);
    service.publish.release_newest(Ok(published(true, false)));
    client.quiet().await;
    service.publish.release(Ok(published(true, false)));
    assert_eq!(client.recv_brief().await, "PUBACK 1 0x00");
    assert_eq!(client.recv_brief().await, "PUBREC 2 0x00");
}

/// QoS2: the packet id goes to the service (it dedups a re-send), PUBREC once durable;
/// PUBREL releases the id, and PUBCOMP waits for that release.
#[tokio::test(start_paused = true)]
async fn qos2_pubrec_then_pubrel_is_released_before_pubcomp() {
    let service = FakeSessions::new();
    let mut client = connected(&service, ProtocolVersion::V5).await;
    client
        .send(publish("t", QoS::ExactlyOnce, Some(5), "x"))
        .await;
    assert_eq!(client.recv_brief().await, "PUBREC 5 0x00");
    assert_eq!(service.publishes()[0].1, Some(5));
    service.release.hold();
    client.send(Packet::PubRel(PubRel::new(5))).await;
    client.ping().await;
    assert_eq!(service.releases(), [5]);
    client.quiet().await;
    service.release.release(Ok(true));
    assert_eq!(client.recv_brief().await, "PUBCOMP 5 0x00");
}

/// A PUBREL for a flow already complete (the client's re-send after a lost PUBCOMP) gets
/// PUBCOMP 0x00, as Mosquitto and EMQX answer.
#[tokio::test(start_paused = true)]
async fn pubrel_for_an_unknown_id_gets_pubcomp_0() {
    let service = FakeSessions::new();
    let mut client = connected(&service, ProtocolVersion::V5).await;
    service.release.queue(Ok(false));
    client.send(Packet::PubRel(PubRel::new(9))).await;
    assert_eq!(client.recv_brief().await, "PUBCOMP 9 0x00");
}

#[tokio::test(start_paused = true)]
async fn a_release_that_fails_closes_without_pubcomp() {
    let service = FakeSessions::new();
    let mut client = connected(&service, ProtocolVersion::V5).await;
    service.release.queue(Err(unavailable()));
    client.send(Packet::PubRel(PubRel::new(9))).await;
    assert!(client.closed().await.is_empty());
    assert_eq!(service.disconnects(), [DisconnectRequest::ABNORMAL]);
}

/// v5 says 0x10 No matching subscribers; 3.1.1 has no code and gets a plain PUBACK.
#[tokio::test(start_paused = true)]
async fn no_matching_subscribers_is_0x10_in_v5_only() {
    for (version, code) in [
        (ProtocolVersion::V5, ReasonCode::NO_MATCHING_SUBSCRIBERS),
        (ProtocolVersion::V311, ReasonCode::SUCCESS),
    ] {
        let answer = Ok(published(false, false));
        let (_, mut client) = publish_answered(version, QoS::AtLeastOnce, answer).await;
        assert_eq!(client.recv_brief().await, format!("PUBACK 1 {code}"));
    }
}

/// A publish the partitions could not make durable is never acknowledged: the connection
/// closes (the client re-sends after reconnecting) and the session hears of an abnormal
/// end (the will fires).
#[tokio::test(start_paused = true)]
async fn a_publish_that_is_not_durable_closes_the_connection_unacknowledged() {
    for (qos, version) in [
        (QoS::AtLeastOnce, ProtocolVersion::V5),
        (QoS::ExactlyOnce, ProtocolVersion::V5),
        (QoS::AtLeastOnce, ProtocolVersion::V311),
    ] {
        let (service, client) = publish_answered(version, qos, Err(unavailable())).await;
        let last = client.closed().await;
        assert!(last.is_empty(), "{qos:?} {version:?}: {last:?}");
        assert_eq!(service.disconnects(), [DisconnectRequest::ABNORMAL]);
    }
}

/// A newer connection took the session over while the publish was in flight: close and say
/// nothing more (the newer connection owns the session).
#[tokio::test(start_paused = true)]
async fn a_publish_fenced_by_a_takeover_closes_silently() {
    let answer = Err(ServiceError::SessionTakenOver);
    let (service, client) = publish_answered(ProtocolVersion::V5, QoS::AtLeastOnce, answer).await;
    assert!(client.closed().await.is_empty());
    assert!(service.disconnects().is_empty());
}

/// Quota exceeded: v5 learns it in its PUBACK (0x97) and stays; 3.1.1 cannot be told and is
/// closed.
#[tokio::test(start_paused = true)]
async fn quota_exceeded_is_0x97_in_v5_and_closes_311() {
    let service = FakeSessions::new();
    let mut client = connected(&service, ProtocolVersion::V5).await;
    service
        .publish
        .queue(Err(ServiceError::QuotaExceeded("queue")));
    service.publish.queue(Ok(published(true, true)));
    client
        .send(publish("t", QoS::AtLeastOnce, Some(1), "x"))
        .await;
    client
        .send(publish("t", QoS::AtLeastOnce, Some(2), "x"))
        .await;
    assert_eq!(client.recv_brief().await, "PUBACK 1 0x97");
    assert_eq!(client.recv_brief().await, "PUBACK 2 0x97");
    client.ping().await;

    let answer = Ok(published(true, true));
    let (service, client) = publish_answered(ProtocolVersion::V311, QoS::AtLeastOnce, answer).await;
    assert!(client.closed().await.is_empty());
    assert_eq!(service.disconnects(), [DisconnectRequest::ABNORMAL]);
}

/// v5 PUBREC 0x97 ends the QoS2 exchange (§4.3.3) and the client may reuse the id at once,
/// so the id is released before the client hears 0x97. 3.1.1 is closed instead, and its
/// re-send must stay a duplicate: no release.
#[tokio::test(start_paused = true)]
async fn a_refused_qos2_publish_is_released_before_pubrec_0x97() {
    let service = FakeSessions::new();
    let mut client = connected(&service, ProtocolVersion::V5).await;
    service.publish.queue(Ok(published(true, true)));
    service.release.hold();
    client
        .send(publish("t", QoS::ExactlyOnce, Some(4), "x"))
        .await;
    eventually(|| service.release.held() == 1).await;
    assert_eq!(service.releases(), [4]);
    client.quiet().await;
    service.release.release(Ok(true));
    assert_eq!(client.recv_brief().await, "PUBREC 4 0x97");

    let answer = Ok(published(true, true));
    let (service, client) = publish_answered(ProtocolVersion::V311, QoS::ExactlyOnce, answer).await;
    assert!(client.closed().await.is_empty());
    assert!(service.releases().is_empty());
}

/// `$SYS` is the broker's: the message goes nowhere, a v5 client learns why (0x90), and the
/// answer still waits behind the acks owed for earlier publishes.
#[tokio::test(start_paused = true)]
async fn a_publish_to_sys_is_refused_in_order_with_the_other_acks() {
    let packets = vec![
        publish("t", QoS::AtLeastOnce, Some(1), "x"),
        publish("$SYS/broker/x", QoS::AtLeastOnce, Some(2), "x"),
    ];
    let (service, mut client) = sent_while_held(packets).await;
    assert_eq!(
        service.publishes().len(),
        1,
        "$SYS never reaches the service"
    );
    client.quiet().await;
    service.publish.release(Ok(published(true, false)));
    assert_eq!(client.recv_brief().await, "PUBACK 1 0x00");
    assert_eq!(client.recv_brief().await, "PUBACK 2 0x90");
}

/// QoS0: submitted, nothing owed.
#[tokio::test(start_paused = true)]
async fn qos0_is_submitted_and_not_answered() {
    let packets = vec![publish("t", QoS::AtMostOnce, None, "x")];
    let (service, mut client) = sent_while_held(packets).await;
    assert_eq!(service.publishes().len(), 1);
    client.quiet().await;
}

/// More unacknowledged QoS>0 publishes than the Receive Maximum the server announced:
/// DISCONNECT 0x93 (§3.3.4).
#[tokio::test(start_paused = true)]
async fn more_publishes_than_receive_maximum_is_0x93() {
    let service = FakeSessions::new();
    let config = FrontendConfig {
        receive_maximum: 2,
        ..FrontendConfig::default()
    };
    let mut client = connected_with(&service, ProtocolVersion::V5, config).await;
    service.publish.hold();
    for pid in 1..=3 {
        client
            .send(publish("t", QoS::AtLeastOnce, Some(pid), "x"))
            .await;
    }
    assert_eq!(client.closed_brief().await, ["DISCONNECT 0x93"]);
    assert_eq!(service.publishes().len(), 2);
    assert_eq!(service.disconnects(), [DisconnectRequest::ABNORMAL]);
}

/// Inbound topic aliases: a mapping taught once resolves later publishes with an empty
/// topic; an alias never taught is a protocol error (§3.3.2.3.4).
#[tokio::test(start_paused = true)]
async fn topic_aliases_resolve_and_an_unknown_one_is_a_protocol_error() {
    let service = FakeSessions::new();
    let mut client = connected(&service, ProtocolVersion::V5).await;
    let with_alias = |topic: &str, alias: u16| {
        let mut p = publish(topic, QoS::AtMostOnce, None, "x");
        if let Packet::Publish(p) = &mut p {
            p.properties.topic_alias = Some(alias);
        }
        p
    };
    client.send(with_alias("long/topic", 1)).await;
    client.send(with_alias("", 1)).await;
    client.send(with_alias("", 2)).await;
    assert_eq!(client.closed_brief().await, ["DISCONNECT 0x82"]);
    let topics: Vec<String> = service
        .publishes()
        .into_iter()
        .map(|(m, _)| m.topic)
        .collect();
    assert_eq!(topics, ["long/topic", "long/topic"]);
}

/// A held publish does not keep the connection alive once its client closed; the end is
/// abnormal (no DISCONNECT: the will fires).
#[tokio::test(start_paused = true)]
async fn a_client_closing_with_a_publish_in_flight_ends_the_connection() {
    let packets = vec![publish("t", QoS::AtLeastOnce, Some(1), "x")];
    let (service, client) = sent_while_held(packets).await;
    client.hang_up().await.unwrap();
    assert_eq!(service.disconnects(), [DisconnectRequest::ABNORMAL]);
}

//! SUBSCRIBE → SUBACK with the service's codes (and the connection's own refusals in place),
//! UNSUBSCRIBE → UNSUBACK; the protocol errors that close the connection before the service
//! is asked; failed calls.

use tiermq_common::codec::{Packet, Subscribe, SubscribeProperties, Unsubscribe};
use tiermq_common::config::LimitsSettings;
use tiermq_common::session_api::{DisconnectRequest, ServiceError, SubscriptionOptions};
use tiermq_common::{ProtocolVersion, QoS, ReasonCode};

use super::{connected, connected_with, delivery, unavailable, FakeSessions};
use crate::config::FrontendConfig;
use crate::limits::Limits;

fn subscribe(packet_id: u16, filters: &[(&str, QoS)]) -> Subscribe {
    Subscribe {
        packet_id,
        filters: filters
            .iter()
            .map(|(f, qos)| {
                let options = SubscriptionOptions {
                    qos: *qos,
                    ..SubscriptionOptions::default()
                };
                (f.to_string(), options)
            })
            .collect(),
        properties: SubscribeProperties::default(),
    }
}

async fn suback(client: &mut super::Client) -> Vec<ReasonCode> {
    match client.recv().await {
        Packet::SubAck(a) => a.reason_codes,
        p => panic!("expected SUBACK, got {p:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn suback_carries_the_services_codes() {
    let service = FakeSessions::new();
    let mut client = connected(&service, ProtocolVersion::V5).await;
    service.subscribe.queue(Ok(vec![
        ReasonCode::GRANTED_QOS_1,
        ReasonCode::NOT_AUTHORIZED,
    ]));
    let mut s = subscribe(
        3,
        &[("a/+", QoS::ExactlyOnce), ("$share/g/b", QoS::AtMostOnce)],
    );
    s.properties.subscription_identifier = Some(42);
    s.filters[0].1.retain_handling = 2;
    client.send(Packet::Subscribe(s)).await;
    assert_eq!(
        suback(&mut client).await,
        [ReasonCode::GRANTED_QOS_1, ReasonCode::NOT_AUTHORIZED]
    );
    let reqs = &service.subscribes()[0];
    let asked: Vec<_> = reqs
        .iter()
        .map(|r| {
            (
                r.filter.as_str(),
                r.options.qos,
                r.options.retain_handling,
                r.subscription_id,
            )
        })
        .collect();
    assert_eq!(
        asked,
        [
            ("a/+", QoS::ExactlyOnce, 2, Some(42)),
            ("$share/g/b", QoS::AtMostOnce, 0, Some(42))
        ]
    );
}

/// The service is asked for at most the server's Maximum QoS.
#[tokio::test(start_paused = true)]
async fn the_requested_qos_is_capped_at_the_maximum_qos() {
    let service = FakeSessions::new();
    let config = FrontendConfig {
        maximum_qos: QoS::AtLeastOnce,
        ..FrontendConfig::default()
    };
    let mut client = connected_with(&service, ProtocolVersion::V5, config).await;
    client
        .send(Packet::Subscribe(subscribe(1, &[("t", QoS::ExactlyOnce)])))
        .await;
    assert_eq!(suback(&mut client).await, [ReasonCode::GRANTED_QOS_1]);
    assert_eq!(service.subscribes()[0][0].options.qos, QoS::AtLeastOnce);
}

/// A filter over `[limits]` gets 0x8F in its place and never reaches the service; the others
/// keep their order.
#[tokio::test(start_paused = true)]
async fn a_filter_over_the_limits_is_refused_in_place() {
    let service = FakeSessions::new();
    let config = FrontendConfig {
        limits: Limits::new(LimitsSettings {
            max_topic_levels: 2,
            ..LimitsSettings::default()
        }),
        ..FrontendConfig::default()
    };
    let mut client = connected_with(&service, ProtocolVersion::V5, config).await;
    let filters = [
        ("a", QoS::AtLeastOnce),
        ("a/b/c", QoS::AtLeastOnce),
        ("b", QoS::AtMostOnce),
    ];
    client.send(Packet::Subscribe(subscribe(1, &filters))).await;
    assert_eq!(
        suback(&mut client).await,
        [
            ReasonCode::GRANTED_QOS_1,
            ReasonCode::TOPIC_FILTER_INVALID,
            ReasonCode::GRANTED_QOS_0
        ]
    );
    let asked: Vec<_> = service.subscribes()[0]
        .iter()
        .map(|r| r.filter.clone())
        .collect();
    assert_eq!(asked, ["a", "b"]);
}

/// The SUBACK is on the wire before the retained messages the subscription triggers, even
/// when the session pushes them before its answer arrives.
#[tokio::test(start_paused = true)]
async fn the_suback_goes_out_before_the_retained_messages() {
    let service = FakeSessions::new();
    let mut client = connected(&service, ProtocolVersion::V5).await;
    service
        .on_subscribe
        .lock()
        .unwrap()
        .push(delivery(QoS::AtLeastOnce, Some(1), "retained"));
    client
        .send(Packet::Subscribe(subscribe(7, &[("t", QoS::AtLeastOnce)])))
        .await;
    assert_eq!(client.recv_brief().await, "SUBACK 7");
    assert_eq!(client.recv_brief().await, "PUBLISH 1");
}

/// A SUBSCRIBE the partitions failed: DISCONNECT with the reason the failure calls for; a
/// takeover says nothing more to the session, any other failure ends it abnormally.
#[tokio::test(start_paused = true)]
async fn a_failed_subscribe_closes_with_the_matching_reason() {
    let cases = [
        (unavailable(), ReasonCode::UNSPECIFIED_ERROR, true),
        (
            ServiceError::QuotaExceeded("subscriptions"),
            ReasonCode::UNSPECIFIED_ERROR,
            true,
        ),
        (
            ServiceError::ShuttingDown,
            ReasonCode::SERVER_SHUTTING_DOWN,
            true,
        ),
        (
            ServiceError::SessionTakenOver,
            ReasonCode::SESSION_TAKEN_OVER,
            false,
        ),
    ];
    for (error, code, told) in cases {
        let service = FakeSessions::new();
        let mut client = connected(&service, ProtocolVersion::V5).await;
        service.subscribe.queue(Err(error.clone()));
        client
            .send(Packet::Subscribe(subscribe(1, &[("t", QoS::AtMostOnce)])))
            .await;
        let last = client.closed_brief().await;
        assert_eq!(last, [format!("DISCONNECT {code}")], "{error}");
        let expected: &[DisconnectRequest] = if told {
            &[DisconnectRequest::ABNORMAL]
        } else {
            &[]
        };
        assert_eq!(service.disconnects(), expected, "{error}");
    }
}

/// Protocol errors in a SUBSCRIBE close the connection before the service hears of it.
#[tokio::test(start_paused = true)]
async fn subscribe_protocol_errors_close_before_the_service_is_asked() {
    let mut shared_no_local = subscribe(1, &[("$share/g/t", QoS::AtMostOnce)]);
    shared_no_local.filters[0].1.no_local = true;
    let ill_formed = subscribe(1, &[("ok", QoS::AtMostOnce), ("a/#/b", QoS::AtMostOnce)]);
    // Subscription Identifier 0 (our encoder refuses it): SUBSCRIBE, packet id 1,
    // properties { 0x0B: 0 }, filter "t" QoS 0.
    let id_zero = [0x82, 9, 0, 1, 2, 0x0B, 0, 0, 1, b't', 0];
    let cases = [
        (None, ReasonCode::PROTOCOL_ERROR),
        (Some(shared_no_local), ReasonCode::PROTOCOL_ERROR),
        (Some(ill_formed), ReasonCode::MALFORMED_PACKET),
    ];
    for (s, code) in cases {
        let service = FakeSessions::new();
        let mut client = connected(&service, ProtocolVersion::V5).await;
        match s {
            Some(s) => client.send(Packet::Subscribe(s)).await,
            None => client.send_raw(&id_zero).await,
        }
        let last = client.closed_brief().await;
        assert_eq!(last, [format!("DISCONNECT {code}")]);
        assert!(service.subscribes().is_empty());
        assert_eq!(service.disconnects(), [DisconnectRequest::ABNORMAL]);
    }
}

#[tokio::test(start_paused = true)]
async fn unsuback_carries_the_services_codes() {
    let service = FakeSessions::new();
    let mut client = connected(&service, ProtocolVersion::V5).await;
    service.unsubscribe.queue(Ok(vec![
        ReasonCode::SUCCESS,
        ReasonCode::NO_SUBSCRIPTION_EXISTED,
    ]));
    client
        .send(Packet::Unsubscribe(Unsubscribe {
            packet_id: 4,
            filters: vec!["a/+".into(), "b".into()],
            properties: Default::default(),
        }))
        .await;
    match client.recv().await {
        Packet::UnsubAck(a) => {
            assert_eq!(a.packet_id, 4);
            assert_eq!(
                a.reason_codes,
                [ReasonCode::SUCCESS, ReasonCode::NO_SUBSCRIPTION_EXISTED]
            );
        }
        p => panic!("expected UNSUBACK, got {p:?}"),
    }
    let asked: Vec<_> = service
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            super::Call::Unsubscribe(f) => Some(f),
            _ => None,
        })
        .collect();
    assert_eq!(asked, [vec!["a/+".to_string(), "b".to_string()]]);
}

#[tokio::test(start_paused = true)]
async fn a_failed_unsubscribe_closes_the_connection() {
    let service = FakeSessions::new();
    let mut client = connected(&service, ProtocolVersion::V5).await;
    service.unsubscribe.queue(Err(unavailable()));
    client
        .send(Packet::Unsubscribe(Unsubscribe {
            packet_id: 4,
            filters: vec!["a".into()],
            properties: Default::default(),
        }))
        .await;
    let last = client.closed_brief().await;
    assert_eq!(last, ["DISCONNECT 0x80"]);
    assert_eq!(service.disconnects(), [DisconnectRequest::ABNORMAL]);
}

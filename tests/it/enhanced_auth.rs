//! Enhanced authentication (MQTT 5 §4.12, AUTH §3.15) with real packets, against the toy
//! challenge/response method `tiermq-test-challenge` (two rounds: the server sends a nonce,
//! the client answers with the nonce reversed followed by the shared secret).

use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use bytes::Bytes;
use tiermq_common::codec::{Auth, AuthProperties, Connect, Packet};
use tiermq_common::{ProtocolVersion, QoS, ReasonCode};
use tiermq_frontend::auth::ChallengeAuthenticator;

const V5: ProtocolVersion = ProtocolVersion::V5;
const METHOD: &str = ChallengeAuthenticator::METHOD;
const SECRET: &[u8] = b"s3cret";

/// A broker offering the challenge method with two rounds.
async fn auth_broker_with(tweak: impl FnOnce(&mut tiermq_common::config::Settings)) -> Broker {
    start_broker_with_frontend(tweak, |f| {
        f.authenticators
            .register(Arc::new(ChallengeAuthenticator::new(SECRET, 2)))
    })
    .await
}

async fn auth_broker() -> Broker {
    auth_broker_with(|_| {}).await
}

fn auth(method: &str, reason_code: ReasonCode, data: Option<Vec<u8>>) -> Packet {
    Packet::Auth(Auth {
        reason_code,
        properties: AuthProperties {
            authentication_method: Some(method.to_string()),
            authentication_data: data.map(Bytes::from),
            ..AuthProperties::default()
        },
    })
}

/// Sends a CONNECT naming `method`; the caller reads what comes back.
async fn connect_with(b: &Broker, id: &str, method: &str, tweak: impl FnOnce(&mut Connect)) -> Raw {
    let mut c = connect_packet(V5, id);
    c.properties.authentication_method = Some(method.to_string());
    c.properties.authentication_data = Some(Bytes::from_static(b"hello"));
    tweak(&mut c);
    let mut raw = Raw::open(b.addr, V5).await;
    raw.send(&Packet::Connect(c)).await;
    raw
}

/// The next packet must be AUTH 0x18 with our method; returns its data (the nonce).
async fn expect_challenge(raw: &mut Raw) -> Vec<u8> {
    match raw.recv().await {
        Packet::Auth(a) => {
            assert_eq!(a.reason_code, ReasonCode::CONTINUE_AUTHENTICATION, "{a:?}");
            assert_eq!(a.properties.authentication_method.as_deref(), Some(METHOD));
            a.properties.authentication_data.expect("a nonce").to_vec()
        }
        other => panic!("expected AUTH continue, got {other:?}"),
    }
}

/// Sends `data` as the client's next step (AUTH 0x18 with our method).
async fn send_answer(raw: &mut Raw, data: Vec<u8>) {
    raw.send(&auth(
        METHOD,
        ReasonCode::CONTINUE_AUTHENTICATION,
        Some(data),
    ))
    .await;
}

/// Reads a challenge and answers it correctly.
async fn answer_challenge(raw: &mut Raw) {
    let nonce = expect_challenge(raw).await;
    let answer = ChallengeAuthenticator::answer(&nonce, SECRET);
    send_answer(raw, answer).await;
}

/// A client authenticated through the full exchange.
async fn authenticated(b: &Broker, id: &str) -> Raw {
    let mut raw = connect_with(b, id, METHOD, |_| {}).await;
    answer_challenge(&mut raw).await;
    answer_challenge(&mut raw).await;
    match raw.recv().await {
        Packet::ConnAck(a) => assert_eq!(a.reason_code, ReasonCode::SUCCESS, "{a:?}"),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    raw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_challenge_succeeds_after_two_round_trips() {
    let b = auth_broker().await;
    let mut raw = connect_with(&b, "auth-ok", METHOD, |_| {}).await;
    let n1 = expect_challenge(&mut raw).await;
    send_answer(&mut raw, ChallengeAuthenticator::answer(&n1, SECRET)).await;
    let n2 = expect_challenge(&mut raw).await;
    assert_ne!(n1, n2, "every round has a fresh nonce");
    send_answer(&mut raw, ChallengeAuthenticator::answer(&n2, SECRET)).await;
    let ack = match raw.recv().await {
        Packet::ConnAck(a) => a,
        other => panic!("expected CONNACK, got {other:?}"),
    };
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    assert_eq!(
        ack.properties.authentication_method.as_deref(),
        Some(METHOD)
    );
    assert_eq!(
        ack.properties.authentication_data.as_deref(),
        Some(ChallengeAuthenticator::WELCOME)
    );
    // A normal connection from here on.
    raw.subscribe("auth/t", sub_opts(QoS::AtMostOnce)).await;
    raw.send(&Packet::Publish(publish_packet(
        "auth/t",
        QoS::AtMostOnce,
        None,
        b"hi",
    )))
    .await;
    assert_eq!(&raw.recv_publish().await.payload[..], b"hi");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_wrong_answer_refused_with_0x87() {
    let b = auth_broker().await;
    let mut raw = connect_with(&b, "auth-wrong", METHOD, |_| {}).await;
    answer_challenge(&mut raw).await;
    expect_challenge(&mut raw).await;
    send_answer(&mut raw, b"not the answer".to_vec()).await;
    let seen = raw.expect_closed().await;
    match seen.as_slice() {
        [Packet::ConnAck(a)] => {
            assert_eq!(a.reason_code, ReasonCode::NOT_AUTHORIZED);
            assert!(!a.session_present);
        }
        other => panic!("expected CONNACK 0x87 then close, got {other:?}"),
    }
    assert_broker_healthy(b.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_unknown_method_refused_with_0x8c() {
    let b = auth_broker().await;
    let mut raw = connect_with(&b, "auth-unknown", "SCRAM-SHA-256", |_| {}).await;
    let seen = raw.expect_closed().await;
    match seen.as_slice() {
        [Packet::ConnAck(a)] => assert_eq!(a.reason_code, ReasonCode::BAD_AUTHENTICATION_METHOD),
        other => panic!("expected CONNACK 0x8C then close, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_method_mismatch_before_connack_is_protocol_error() {
    let b = auth_broker().await;
    let mut raw = connect_with(&b, "auth-mismatch", METHOD, |_| {}).await;
    let nonce = expect_challenge(&mut raw).await;
    raw.send(&auth(
        "other-method",
        ReasonCode::CONTINUE_AUTHENTICATION,
        Some(ChallengeAuthenticator::answer(&nonce, SECRET)),
    ))
    .await;
    raw.expect_disconnect(ReasonCode::PROTOCOL_ERROR).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_non_auth_packet_before_connack_is_protocol_error() {
    let b = auth_broker().await;
    let mut raw = connect_with(&b, "auth-early", METHOD, |_| {}).await;
    expect_challenge(&mut raw).await;
    raw.send(&Packet::PingReq).await;
    raw.expect_disconnect(ReasonCode::PROTOCOL_ERROR).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_exchange_bounded_by_connect_timeout() {
    let b = auth_broker_with(|s| s.mqtt.connect_timeout_secs = 1).await;
    let mut raw = connect_with(&b, "auth-slow", METHOD, |_| {}).await;
    expect_challenge(&mut raw).await;
    // No answer: the socket is closed without a CONNACK once the connect timeout passes.
    let seen = raw.expect_closed_within(Duration::from_secs(4)).await;
    assert!(seen.is_empty(), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reauth_succeeds_while_publishes_flow() {
    let b = auth_broker().await;
    let mut raw = authenticated(&b, "reauth-ok").await;
    raw.subscribe("reauth/t", sub_opts(QoS::AtMostOnce)).await;
    raw.send(&auth(METHOD, ReasonCode::REAUTHENTICATE, None))
        .await;
    let nonce = expect_challenge(&mut raw).await;
    // Mid-exchange, the connection keeps serving: a QoS1 publish is acknowledged and
    // delivered back.
    raw.send(&Packet::Publish(publish_packet(
        "reauth/t",
        QoS::AtLeastOnce,
        Some(7),
        b"during",
    )))
    .await;
    let (mut acked, mut delivered) = (false, false);
    while !(acked && delivered) {
        match raw.recv().await {
            Packet::PubAck(a) => {
                assert_eq!((a.packet_id, a.reason_code), (7, ReasonCode::SUCCESS));
                acked = true;
            }
            Packet::Publish(p) => {
                assert_eq!(&p.payload[..], b"during");
                delivered = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    send_answer(&mut raw, ChallengeAuthenticator::answer(&nonce, SECRET)).await;
    answer_challenge(&mut raw).await;
    match raw.recv().await {
        Packet::Auth(a) => {
            assert_eq!(a.reason_code, ReasonCode::SUCCESS);
            assert_eq!(a.properties.authentication_method.as_deref(), Some(METHOD));
            assert_eq!(
                a.properties.authentication_data.as_deref(),
                Some(ChallengeAuthenticator::WELCOME)
            );
        }
        other => panic!("expected AUTH success, got {other:?}"),
    }
    raw.ping().await;
    // And it may re-authenticate again later.
    raw.send(&auth(METHOD, ReasonCode::REAUTHENTICATE, None))
        .await;
    answer_challenge(&mut raw).await;
    answer_challenge(&mut raw).await;
    assert!(matches!(raw.recv().await, Packet::Auth(a) if a.reason_code == ReasonCode::SUCCESS));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reauth_wrong_answer_disconnects_with_0x87() {
    let b = auth_broker().await;
    let mut raw = authenticated(&b, "reauth-wrong").await;
    raw.send(&auth(METHOD, ReasonCode::REAUTHENTICATE, None))
        .await;
    expect_challenge(&mut raw).await;
    send_answer(&mut raw, b"wrong".to_vec()).await;
    raw.expect_disconnect(ReasonCode::NOT_AUTHORIZED).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reauth_method_mismatch_is_protocol_error() {
    let b = auth_broker().await;
    let mut raw = authenticated(&b, "reauth-mismatch").await;
    raw.send(&auth("other-method", ReasonCode::REAUTHENTICATE, None))
        .await;
    raw.expect_disconnect(ReasonCode::PROTOCOL_ERROR).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_without_method_at_connect_is_protocol_error() {
    let b = auth_broker().await;
    let mut raw = Raw::v5(b.addr, "reauth-none").await;
    raw.send(&auth(METHOD, ReasonCode::REAUTHENTICATE, None))
        .await;
    raw.expect_disconnect(ReasonCode::PROTOCOL_ERROR).await;
}

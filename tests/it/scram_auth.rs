//! SCRAM-SHA-256 enhanced authentication (RFC 5802/7677 over MQTT 5 AUTH) against a
//! standalone broker with a password file: raw MQTT 5 packets, the client side computed by
//! `tiermq_frontend::scram::client` (pinned to RFC 7677's test vector by the unit tests).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::*;
use bytes::Bytes;
use tiermq_common::codec::{Auth, AuthProperties, Packet};
use tiermq_common::{ProtocolVersion, ReasonCode};
use tiermq_frontend::passwd::PasswordFile;
use tiermq_frontend::scram::{self, client};

const V5: ProtocolVersion = ProtocolVersion::V5;
const METHOD: &str = scram::METHOD;
/// Long enough to measure as a lower bound, short enough for the suite.
const FAILURE_DELAY: Duration = Duration::from_millis(200);

/// alice and bob with SCRAM credentials; carol as a line written before SCRAM existed.
fn password_file(dir: &Path) -> std::path::PathBuf {
    let mut f = PasswordFile::default();
    f.set("alice", b"wonderland").unwrap();
    f.set("bob", b"builder").unwrap();
    f.set("carol", b"christmas").unwrap();
    let path = dir.join("passwd");
    let text: String = f
        .render()
        .lines()
        .map(|line| match line.strip_prefix("carol:") {
            // Drop carol's SCRAM credential: `user:hash` only.
            Some(rest) => format!("carol:{}\n", rest.split(':').next().unwrap()),
            None => format!("{line}\n"),
        })
        .collect();
    std::fs::write(&path, text).unwrap();
    path
}

async fn broker(dir: &Path) -> Broker {
    let file = password_file(dir);
    start_broker_with(move |s| {
        s.metrics.listen = Some("127.0.0.1:0".into());
        s.mqtt.password_file = Some(file);
        s.mqtt.auth_failure_delay_ms = FAILURE_DELAY.as_millis() as u64;
    })
    .await
}

fn auth(reason_code: ReasonCode, data: &str) -> Packet {
    Packet::Auth(Auth {
        reason_code,
        properties: AuthProperties {
            authentication_method: Some(METHOD.to_string()),
            authentication_data: Some(Bytes::from(data.to_string())),
            ..AuthProperties::default()
        },
    })
}

fn text(data: Option<Bytes>) -> String {
    String::from_utf8(data.expect("authentication data").to_vec()).expect("UTF-8")
}

/// Sends CONNECT with SCRAM-SHA-256 and `client_first`.
async fn connect_scram(b: &Broker, id: &str, client_first: &str) -> Raw {
    let mut c = connect_packet(V5, id);
    c.properties.authentication_method = Some(METHOD.to_string());
    c.properties.authentication_data = Some(Bytes::from(client_first.to_string()));
    let mut raw = Raw::open(b.addr, V5).await;
    raw.send(&Packet::Connect(c)).await;
    raw
}

/// The server-first message of an AUTH 0x18.
async fn server_first(raw: &mut Raw) -> String {
    match raw.recv().await {
        Packet::Auth(a) => {
            assert_eq!(a.reason_code, ReasonCode::CONTINUE_AUTHENTICATION, "{a:?}");
            assert_eq!(a.properties.authentication_method.as_deref(), Some(METHOD));
            text(a.properties.authentication_data)
        }
        other => panic!("expected AUTH 0x18, got {other:?}"),
    }
}

/// Answers server-first with `password`; returns the server signature to expect.
async fn answer(raw: &mut Raw, password: &str, first: &str, server_first: &str) -> String {
    let (last, v) = client::last(password.as_bytes(), first, server_first).expect("server-first");
    raw.send(&auth(ReasonCode::CONTINUE_AUTHENTICATION, &last))
        .await;
    v
}

/// The whole exchange at CONNECT; the CONNACK.
async fn scram_connect(
    b: &Broker,
    id: &str,
    user: &str,
    password: &str,
) -> (Raw, tiermq_common::codec::ConnAck, String) {
    let first = client::first(user, &format!("nonce-{id}"));
    let mut raw = connect_scram(b, id, &first).await;
    let sf = server_first(&mut raw).await;
    assert!(sf.starts_with(&format!("r=nonce-{id}")), "{sf}");
    let v = answer(&mut raw, password, &first, &sf).await;
    match raw.recv().await {
        Packet::ConnAck(a) => (raw, a, v),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_connect_succeeds_and_the_server_proves_it_knows_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path()).await;
    let (mut raw, ack, v) = scram_connect(&b, "scram-ok", "alice", "wonderland").await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS, "{ack:?}");
    assert_eq!(
        ack.properties.authentication_method.as_deref(),
        Some(METHOD)
    );
    assert_eq!(
        text(ack.properties.authentication_data),
        v,
        "server signature"
    );
    // A normal connection from here on.
    raw.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_wrong_password_unknown_user_and_old_lines_get_0x86_after_the_delay() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path()).await;
    for (user, password) in [
        ("alice", "builder"),
        // Unknown: challenged like a real user (no enumeration), refused at the proof.
        ("mallory", "wonderland"),
        // A line without a SCRAM credential: SCRAM cannot work for carol...
        ("carol", "christmas"),
    ] {
        let started = Instant::now();
        let (mut raw, ack, _) = scram_connect(&b, "scram-bad", user, password).await;
        assert_eq!(
            ack.reason_code,
            ReasonCode::BAD_USER_NAME_OR_PASSWORD,
            "{user}"
        );
        assert!(
            started.elapsed() >= FAILURE_DELAY,
            "{user}: refused too soon"
        );
        raw.expect_closed().await;
    }
    // Counted with the other refused CONNECTs.
    let (_, text) = http_get(b.metrics_addr().unwrap(), "/metrics").await;
    let refused = sample(&text, "tiermq_connections_refused_total{reason=\"0x86\"}");
    assert_eq!(refused, Some(3.0), "{text}");
    // ...while her password in CONNECT still does.
    let (_, ack) = Raw::connect(b.addr, V5, "carol-pw", |c| {
        c.username = Some("carol".into());
        c.password = Some("christmas".into());
    })
    .await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    // The unknown user's salt is the same every time (a fresh random one would tell).
    let first = client::first("mallory", "n1");
    let mut one = connect_scram(&b, "m1", &first).await;
    let mut two = connect_scram(&b, "m2", &first).await;
    let salt = |sf: String| sf.split(",s=").nth(1).unwrap().to_string();
    assert_eq!(
        salt(server_first(&mut one).await),
        salt(server_first(&mut two).await)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_malformed_or_unsupported_client_first_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path()).await;
    for (first, code) in [
        ("garbage", ReasonCode::BAD_USER_NAME_OR_PASSWORD),
        ("n,,r=abc", ReasonCode::BAD_USER_NAME_OR_PASSWORD),
        ("n,,n=alice", ReasonCode::BAD_USER_NAME_OR_PASSWORD),
        ("\u{0}\u{1}", ReasonCode::BAD_USER_NAME_OR_PASSWORD),
        // Channel binding (SCRAM-SHA-256-PLUS) is not offered.
        ("p=tls-exporter,,n=alice,r=abc", ReasonCode::NOT_AUTHORIZED),
    ] {
        let mut raw = connect_scram(&b, "scram-malformed", first).await;
        match raw.expect_closed().await.as_slice() {
            [Packet::ConnAck(a)] => assert_eq!(a.reason_code, code, "{first:?}"),
            other => panic!("{first:?}: expected CONNACK then close, got {other:?}"),
        }
    }
    // A client-final that is not one.
    let first = client::first("alice", "n2");
    let mut raw = connect_scram(&b, "scram-bad-final", &first).await;
    server_first(&mut raw).await;
    raw.send(&auth(ReasonCode::CONTINUE_AUTHENTICATION, "c=biws,p=%%%"))
        .await;
    match raw.expect_closed().await.as_slice() {
        [Packet::ConnAck(a)] => assert_eq!(a.reason_code, ReasonCode::BAD_USER_NAME_OR_PASSWORD),
        other => panic!("expected CONNACK 0x86, got {other:?}"),
    }
    // Still serving.
    let (_, ack, _) = scram_connect(&b, "scram-after", "alice", "wonderland").await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_reauthentication_succeeds_and_a_wrong_one_disconnects() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker(dir.path()).await;
    let (mut raw, ack, _) = scram_connect(&b, "scram-reauth", "bob", "builder").await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    // AUTH 0x19 with a new client-first → AUTH 0x18 → client-final → AUTH 0x00 with v=.
    for round in 0..2 {
        let first = client::first("bob", &format!("re{round}"));
        raw.send(&auth(ReasonCode::REAUTHENTICATE, &first)).await;
        let sf = server_first(&mut raw).await;
        let v = answer(&mut raw, "builder", &first, &sf).await;
        match raw.recv().await {
            Packet::Auth(a) => {
                assert_eq!(a.reason_code, ReasonCode::SUCCESS);
                assert_eq!(text(a.properties.authentication_data), v);
            }
            other => panic!("expected AUTH 0x00, got {other:?}"),
        }
        raw.ping().await;
    }
    // Wrong password on re-authentication: DISCONNECT 0x87 (DISCONNECT cannot carry 0x86).
    let first = client::first("bob", "re-wrong");
    raw.send(&auth(ReasonCode::REAUTHENTICATE, &first)).await;
    let sf = server_first(&mut raw).await;
    answer(&mut raw, "wonderland", &first, &sf).await;
    raw.expect_disconnect(ReasonCode::NOT_AUTHORIZED).await;

    // Re-authenticating as somebody else (valid credentials) is not a way to switch users.
    let (mut raw, ack, _) = scram_connect(&b, "scram-switch", "bob", "builder").await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    let first = client::first("alice", "switch");
    raw.send(&auth(ReasonCode::REAUTHENTICATE, &first)).await;
    let sf = server_first(&mut raw).await;
    answer(&mut raw, "wonderland", &first, &sf).await;
    raw.expect_disconnect(ReasonCode::NOT_AUTHORIZED).await;
}

//! Authorization by ACL rules (`mqtt.acl_file`, docs/security.md): real clients (rumqttc v5
//! and 3.1.1), raw CONNECTs for wills, a reload that shrinks a subscriber's permissions, and a
//! cluster frontend reloading on SIGHUP.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::cluster::{ClusterOpts, ProcCluster};
use crate::support::*;
use rumqttc::v5::mqttbytes::v5::{PubAckReason, SubscribeReasonCode as Sub5};
use rumqttc::v5::Incoming as In5;
use tiermq_common::codec::{LastWill, WillProperties};
use tiermq_common::{ProtocolVersion, QoS, ReasonCode};
use tokio::time::Instant;

/// Users own `users/<name>/#`, devices publish to `devices/<client id>/up`, `public/#` is
/// open except `public/secret`, and `admin` may do everything. Nothing else.
const RULES: &str = "\
# who may do what; first match wins
allow all       #              user admin
allow all       users/%u/#
allow publish   devices/%c/up
deny  all       public/secret
allow all       public/#
";

/// Writes the ACL file atomically (a new inode each time, so a reload poll sees it).
fn write_acl(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn acl_broker(dir: &Path, text: &str) -> (Broker, PathBuf) {
    let file = dir.join("acl");
    write_acl(&file, text);
    let acl = file.clone();
    let b = start_broker_with(move |s| {
        s.mqtt.acl_file = Some(acl);
        s.mqtt.sys_interval_secs = 0;
        s.mqtt.tls_reload_interval_secs = 1;
        s.metrics.listen = Some("127.0.0.1:0".into());
    })
    .await;
    (b, file)
}

async fn v5_as(b: &Broker, id: &str, user: Option<&str>) -> V5 {
    let (c, ack) = V5::connect(b.addr, id, |o| {
        if let Some(u) = user {
            o.set_credentials(u, "");
        }
    })
    .await;
    assert_eq!(
        ack.code,
        rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success
    );
    c
}

/// SUBSCRIBE at QoS1; the SUBACK's code.
async fn sub5(c: &mut V5, filter: &str) -> Sub5 {
    c.client.subscribe(filter, Q5::AtLeastOnce).await.unwrap();
    match c.next_matching(|p| matches!(p, In5::SubAck(_))).await {
        In5::SubAck(s) => s.return_codes[0],
        _ => unreachable!(),
    }
}

/// `tiermq_acl_denials_total{action}` from the metrics endpoint.
async fn denials(b: &Broker, action: &str) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(b.metrics_addr().unwrap())
        .await
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    let series = format!("tiermq_acl_denials_total{{action=\"{action}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&series)?.parse().ok())
        .unwrap_or_else(|| panic!("{series} missing"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_rules_decide_publish_subscribe_and_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let (b, _) = acl_broker(dir.path(), RULES).await;
    let mut alice = v5_as(&b, "alice-1", Some("alice")).await;
    let mut admin = v5_as(&b, "admin-1", Some("admin")).await;
    let mut dev = v5_as(&b, "dev-7", None).await;

    // %u: alice's own tree, nobody else's; wildcards beyond it are not covered.
    assert_eq!(
        sub5(&mut alice, "users/alice/#").await,
        Sub5::Success(Q5::AtLeastOnce)
    );
    assert_eq!(sub5(&mut alice, "users/bob/#").await, Sub5::NotAuthorized);
    assert_eq!(sub5(&mut alice, "users/+/inbox").await, Sub5::NotAuthorized);
    assert_eq!(sub5(&mut alice, "devices/+/up").await, Sub5::NotAuthorized);
    assert_eq!(
        sub5(&mut admin, "devices/+/up").await,
        Sub5::Success(Q5::AtLeastOnce)
    );
    // %c: a device publishes only as itself; default deny for everything else.
    expect_puback(&mut dev, "devices/dev-7/up", b"t=21", PubAckReason::Success).await;
    assert_eq!(&admin.next_publish().await.payload[..], b"t=21");
    expect_puback(
        &mut dev,
        "devices/dev-8/up",
        b"forged",
        PubAckReason::NotAuthorized,
    )
    .await;
    expect_puback(&mut dev, "elsewhere", b"x", PubAckReason::NotAuthorized).await;
    admin.expect_no_publish().await;
    // Anonymous: %u never matches, so `users/...` is closed to it.
    expect_puback(
        &mut dev,
        "users/alice/inbox",
        b"x",
        PubAckReason::NotAuthorized,
    )
    .await;
    // Alice receives what admin writes to her tree.
    admin.publish_qos1("users/alice/inbox", b"hello").await;
    assert_eq!(&alice.next_publish().await.payload[..], b"hello");

    // Order: `deny public/secret` comes before `allow public/#`. A wildcard subscription is
    // granted, and the denied topic is held back per message — retained ones included.
    let retained = |c: &V5, topic: &str, payload: &'static [u8]| {
        let client = c.client.clone();
        let topic = topic.to_string();
        async move {
            client
                .publish(topic, Q5::AtLeastOnce, true, payload.to_vec())
                .await
                .unwrap()
        }
    };
    retained(&admin, "public/secret", b"s3cret").await;
    retained(&admin, "public/news", b"news").await;
    admin.wait_puback().await;
    admin.wait_puback().await;
    assert_eq!(sub5(&mut alice, "public/secret").await, Sub5::NotAuthorized);
    assert_eq!(
        sub5(&mut alice, "public/#").await,
        Sub5::Success(Q5::AtLeastOnce)
    );
    let got = alice.next_publish().await;
    assert_eq!(
        (&got.topic[..], &got.payload[..]),
        (&b"public/news"[..], &b"news"[..])
    );
    admin.publish_qos1("public/secret", b"live").await;
    admin.publish_qos1("public/news", b"more").await;
    assert_eq!(&alice.next_publish().await.payload[..], b"more");
    alice.expect_no_publish().await;

    assert!(denials(&b, "publish").await >= 3);
    assert!(denials(&b, "subscribe").await >= 4);
    assert!(denials(&b, "deliver").await >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_denied_publish_is_acked_and_dropped_denied_subscribe_gets_0x80() {
    let dir = tempfile::tempdir().unwrap();
    let (b, _) = acl_broker(dir.path(), RULES).await;
    let mut admin = v5_as(&b, "admin-3", Some("admin")).await;
    assert_eq!(sub5(&mut admin, "#").await, Sub5::Success(Q5::AtLeastOnce));
    let (mut c, _) = V3::connect(b.addr, "dev-3", |o| {
        o.set_credentials("carol", "");
    })
    .await;
    c.client
        .subscribe("users/bob/#", Q3::AtLeastOnce)
        .await
        .unwrap();
    match c
        .next_matching(|p| matches!(p, rumqttc::Incoming::SubAck(_)))
        .await
    {
        rumqttc::Incoming::SubAck(s) => {
            assert_eq!(s.return_codes, vec![rumqttc::SubscribeReasonCode::Failure])
        }
        _ => unreachable!(),
    }
    // The PUBACK comes (3.1.1 cannot say no), the message goes nowhere.
    c.publish_qos1("devices/dev-4/up", b"forged").await;
    admin.expect_no_publish().await;
    c.publish_qos1("devices/dev-3/up", b"ok").await;
    assert_eq!(&admin.next_publish().await.topic[..], b"devices/dev-3/up");
    // The connection stays usable.
    c.subscribe("users/carol/#", Q3::AtLeastOnce).await;
    c.publish_qos1("users/carol/x", b"mine").await;
    assert_eq!(&c.next_publish().await.payload[..], b"mine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_the_client_may_not_publish_refuses_the_connect() {
    let dir = tempfile::tempdir().unwrap();
    let (b, _) = acl_broker(dir.path(), RULES).await;
    for version in [ProtocolVersion::V5, ProtocolVersion::V311] {
        let will = |topic: &str| LastWill {
            topic: topic.into(),
            payload: bytes::Bytes::from_static(b"gone"),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: WillProperties::default(),
        };
        let (_, ack) = Raw::connect(b.addr, version, "dev-9", |c| {
            c.will = Some(will("devices/dev-1/up"));
        })
        .await;
        // 3.1.1 return code 5 decodes to 0x87.
        assert_eq!(ack.reason_code, ReasonCode::NOT_AUTHORIZED, "{version:?}");
        let (_, ack) = Raw::connect(b.addr, version, "dev-9", |c| {
            c.will = Some(will("devices/dev-9/up"));
        })
        .await;
        assert_eq!(ack.reason_code, ReasonCode::SUCCESS, "{version:?}");
    }
}

/// A QoS1 PUBLISH whose PUBACK must carry `want`.
async fn expect_puback(c: &mut V5, topic: &str, payload: &[u8], want: PubAckReason) {
    assert_eq!(c.publish_qos1(topic, payload).await, want, "{topic}");
}

/// Publishes QoS1 to `topic` until its PUBACK says `want` (the reload poll has run).
async fn until_puback(c: &mut V5, topic: &str, want: PubAckReason) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if c.publish_qos1(topic, b"probe").await == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "reload not seen: {topic} never {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_revokes_subscriptions_and_a_bad_file_keeps_the_rules() {
    let dir = tempfile::tempdir().unwrap();
    let base = "allow all feed/#\nallow publish probe\n";
    let (b, file) = acl_broker(dir.path(), base).await;
    // A persistent session, to show the revoked subscription does not come back.
    let persistent = |o: &mut rumqttc::v5::MqttOptions| {
        o.set_clean_start(false);
        o.set_connect_properties(rumqttc::v5::mqttbytes::v5::ConnectProperties {
            session_expiry_interval: Some(600),
            ..Default::default()
        });
    };
    let (mut sub, _) = V5::connect(b.addr, "reload-sub", persistent).await;
    assert_eq!(
        sub5(&mut sub, "feed/#").await,
        Sub5::Success(Q5::AtLeastOnce)
    );
    let mut publ = v5_as(&b, "reload-pub", None).await;
    expect_puback(&mut publ, "feed/a", b"1", PubAckReason::Success).await;
    assert_eq!(&sub.next_publish().await.payload[..], b"1");

    // Read access to feed/# goes away (the publisher keeps write access).
    write_acl(&file, "allow publish feed/#\n");
    until_puback(&mut publ, "probe", PubAckReason::NotAuthorized).await;
    publ.publish_qos1("feed/a", b"2").await;
    sub.expect_no_publish().await;

    // A broken file: logged, the previous rules stay.
    write_acl(&file, "allow publish feed/#\nallow everything\n");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    expect_puback(
        &mut publ,
        "feed/a",
        b"3",
        PubAckReason::NoMatchingSubscribers,
    )
    .await;
    expect_puback(&mut publ, "probe", b"x", PubAckReason::NotAuthorized).await;

    // Read access comes back, but the subscription was removed from the session: nothing
    // arrives, not on this connection and not after a reconnect to the same session.
    write_acl(&file, base);
    until_puback(&mut publ, "probe", PubAckReason::NoMatchingSubscribers).await;
    expect_puback(
        &mut publ,
        "feed/a",
        b"4",
        PubAckReason::NoMatchingSubscribers,
    )
    .await;
    sub.expect_no_publish().await;
    sub.disconnect().await;
    let (mut sub, ack) = V5::connect(b.addr, "reload-sub", persistent).await;
    assert!(ack.session_present);
    publ.publish_qos1("feed/a", b"5").await;
    sub.expect_no_publish().await;
}

/// The same frontend code in a cluster, reloading on SIGHUP (file polling off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_frontend_enforces_the_acl_and_reloads_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("acl");
    // `tiermq/probe/#`: the harness (and `tiermq cluster probe`) checks the cluster serves.
    let rules = "allow all open/#\nallow all tiermq/probe/#\n";
    write_acl(&acl, rules);
    let config = dir.path().join("tiermq.toml");
    let toml = format!(
        "[mqtt]\nacl_file = {:?}\ntls_reload_interval_secs = 0\n",
        acl.display().to_string()
    );
    std::fs::write(&config, toml).unwrap();
    let mut cluster = ProcCluster::start_with(ClusterOpts {
        backends: 1,
        frontends: 1,
        partitions: 2,
        replication: 1,
        frontend_args: vec!["--config".into(), config.display().to_string()],
        ..ClusterOpts::default()
    })
    .await;
    cluster.wait_serves().await;
    let (mut c, _) = V5::connect(cluster.fe(0), "cl-acl", |_| {}).await;
    assert_eq!(sub5(&mut c, "open/#").await, Sub5::Success(Q5::AtLeastOnce));
    assert_eq!(sub5(&mut c, "closed/#").await, Sub5::NotAuthorized);
    expect_puback(&mut c, "closed/x", b"x", PubAckReason::NotAuthorized).await;
    c.publish_qos1("open/x", b"hi").await;
    assert_eq!(&c.next_publish().await.payload[..], b"hi");

    write_acl(&acl, &format!("{rules}allow all closed/#\n"));
    cluster.frontends[0].signal(libc::SIGHUP);
    until_puback(&mut c, "closed/x", PubAckReason::NoMatchingSubscribers).await;
    assert_eq!(
        sub5(&mut c, "closed/#").await,
        Sub5::Success(Q5::AtLeastOnce)
    );
}

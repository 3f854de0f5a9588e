//! Will messages: when they fire, when they do not, delays and keep alive.

use std::time::Duration;

use crate::support::*;
use bytes::Bytes;
use tiermq_common::codec::{Connect, LastWill, Packet, WillProperties};
use tiermq_common::{ProtocolVersion, QoS, ReasonCode};
use tokio::time::Instant;

const V5: ProtocolVersion = ProtocolVersion::V5;
const V3: ProtocolVersion = ProtocolVersion::V311;

fn will(topic: &str, payload: &str) -> LastWill {
    LastWill {
        topic: topic.into(),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: WillProperties::default(),
    }
}

async fn watcher(addr: std::net::SocketAddr) -> Raw {
    let mut w = Raw::v5(addr, "watcher").await;
    w.subscribe("will/#", sub_opts(QoS::AtLeastOnce)).await;
    w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abnormal_close_publishes_the_will_once() {
    let b = start_broker().await;
    let mut w = watcher(b.addr).await;
    let (c, _) = Raw::connect(b.addr, V5, "dies", |c: &mut Connect| {
        let mut lw = will("will/dies", "gone");
        lw.properties.content_type = Some("text/plain".into());
        lw.properties.user_properties = vec![("why".into(), "crash".into())];
        lw.properties.correlation_data = Some(Bytes::from_static(b"c1"));
        c.will = Some(lw);
    })
    .await;
    drop(c); // TCP close without DISCONNECT
    let p = w.recv_publish().await;
    assert_eq!(p.topic, "will/dies");
    assert_eq!(&p.payload[..], b"gone");
    assert_eq!(p.qos, QoS::AtLeastOnce);
    assert_eq!(p.properties.content_type.as_deref(), Some("text/plain"));
    assert_eq!(
        p.properties.user_properties,
        vec![("why".to_string(), "crash".to_string())]
    );
    assert_eq!(p.properties.correlation_data.as_deref(), Some(&b"c1"[..]));
    w.puback(p.packet_id.unwrap()).await;
    w.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn normal_disconnect_discards_the_will() {
    let b = start_broker().await;
    let mut w = watcher(b.addr).await;
    for version in [V5, V3] {
        let (c, _) = Raw::connect(b.addr, version, "polite", |c| {
            c.will = Some(will("will/polite", "no"));
        })
        .await;
        c.disconnect(ReasonCode::NORMAL_DISCONNECTION).await;
    }
    w.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_with_will_message_publishes_it() {
    let b = start_broker().await;
    let mut w = watcher(b.addr).await;
    let (c, _) = Raw::connect(b.addr, V5, "withwill", |c| {
        c.will = Some(will("will/0x04", "bye"));
    })
    .await;
    c.disconnect(ReasonCode::DISCONNECT_WITH_WILL).await;
    let p = w.recv_publish().await;
    assert_eq!(&p.payload[..], b"bye");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v3_will_with_real_client() {
    let b = start_broker().await;
    let (mut w, _) = V3::connect(b.addr, "w3", |_| {}).await;
    w.subscribe("will/#", Q3::AtLeastOnce).await;
    let (c, _) = V3::connect(b.addr, "dies3", |o| {
        o.set_last_will(rumqttc::LastWill::new(
            "will/dies3",
            "gone3",
            Q3::AtLeastOnce,
            true,
        ));
    })
    .await;
    c.kill();
    let p = w.next_publish().await;
    assert_eq!(p.topic, "will/dies3");
    assert_eq!(&p.payload[..], b"gone3");
    // A retained will is retained.
    let (mut late, _) = V3::connect(b.addr, "late3", |_| {}).await;
    late.subscribe("will/dies3", Q3::AtMostOnce).await;
    let p = late.next_publish().await;
    assert!(p.retain);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_will_fires_after_the_delay() {
    let b = start_broker().await;
    let mut w = watcher(b.addr).await;
    let (c, _) = Raw::connect(b.addr, V5, "delayed", |c| {
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(60);
        let mut lw = will("will/delayed", "late");
        lw.properties.will_delay_interval = Some(2);
        c.will = Some(lw);
    })
    .await;
    let closed = Instant::now();
    drop(c);
    let p = w.recv_publish().await;
    let waited = closed.elapsed();
    assert_eq!(&p.payload[..], b"late");
    assert!(
        waited >= Duration::from_millis(1900),
        "will came after {waited:?}, before its 2 s delay"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_within_the_will_delay_cancels_the_will() {
    let b = start_broker().await;
    let mut w = watcher(b.addr).await;
    let connect = |c: &mut Connect| {
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(60);
        let mut lw = will("will/cancelled", "should not fire");
        lw.properties.will_delay_interval = Some(2);
        c.will = Some(lw);
    };
    let (c, _) = Raw::connect(b.addr, V5, "flaky", connect).await;
    let closed = Instant::now();
    drop(c);
    // Back within 1 s, this time without a will.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut c, ack) = Raw::connect(b.addr, V5, "flaky", |c| {
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(60);
    })
    .await;
    assert!(ack.session_present);
    assert!(closed.elapsed() < Duration::from_secs(1));
    // Past the original delay (plus a tick): still no will.
    match w.recv_within(Duration::from_millis(2800)).await {
        Recv::Timeout => {}
        other => panic!("cancelled will fired: {other:?}"),
    }
    c.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_will_with_session_expiry_zero_fires_at_session_end() {
    // §3.1.3.2.2: the will is published when the delay passes or the session ends,
    // whichever is first; expiry 0 ends the session at the close.
    let b = start_broker().await;
    let mut w = watcher(b.addr).await;
    let (c, _) = Raw::connect(b.addr, V5, "shortlived", |c| {
        let mut lw = will("will/short", "now");
        lw.properties.will_delay_interval = Some(30);
        c.will = Some(lw);
    })
    .await;
    drop(c);
    let p = w.recv_publish().await;
    assert_eq!(&p.payload[..], b"now");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_timeout_closes_and_fires_the_will() {
    let b = start_broker().await;
    let mut w = watcher(b.addr).await;
    let (mut c, _) = Raw::connect(b.addr, V5, "silent", |c| {
        c.keep_alive = 1;
        c.will = Some(will("will/silent", "timed out"));
    })
    .await;
    let start = Instant::now();
    // The client sends nothing: the server gives up after 1.5 × keep alive.
    let seen = c.expect_closed_within(Duration::from_secs(3)).await;
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(1000),
        "closed after {waited:?}, before the keep alive"
    );
    match seen.last() {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason_code, ReasonCode::KEEP_ALIVE_TIMEOUT),
        other => panic!("expected DISCONNECT 0x8D, got {other:?}"),
    }
    let p = w.recv_publish().await;
    assert_eq!(&p.payload[..], b"timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_is_kept_by_pings() {
    let b = start_broker().await;
    let (mut c, _) = Raw::connect(b.addr, V3, "pinger", |c| c.keep_alive = 1).await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        c.ping().await;
    }
    // 3.1.1 timeout: closed without a DISCONNECT.
    let seen = c.expect_closed_within(Duration::from_secs(3)).await;
    assert!(seen.is_empty(), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_publishes_the_old_connections_will() {
    let b = start_broker().await;
    let mut w = watcher(b.addr).await;
    let (mut old, _) = Raw::connect(b.addr, V5, "taken", |c| {
        c.will = Some(will("will/taken", "replaced"));
    })
    .await;
    let (mut new, _) = Raw::connect(b.addr, V5, "taken", |_| {}).await;
    old.expect_disconnect(ReasonCode::SESSION_TAKEN_OVER).await;
    let p = w.recv_publish().await;
    assert_eq!(&p.payload[..], b"replaced");
    w.puback(p.packet_id.unwrap()).await;
    // The new connection has no will: closing it publishes nothing.
    new.ping().await;
    drop(new);
    w.expect_silence().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_after_the_will_delay_does_not_cancel_the_will() {
    let b = start_broker().await;
    let mut w = watcher(b.addr).await;
    let connect = |c: &mut Connect| {
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(60);
        let mut lw = will("will/overdue", "fired");
        lw.properties.will_delay_interval = Some(1);
        c.will = Some(lw);
    };
    let (c, _) = Raw::connect(b.addr, V5, "overdue", connect).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The delay is over: the will is due even if the reconnect beats the broker's timer.
    let (_c, ack) = Raw::connect(b.addr, V5, "overdue", |c| {
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(60);
    })
    .await;
    assert!(ack.session_present);
    assert_eq!(&w.recv_publish().await.payload[..], b"fired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v3_keep_alive_zero_is_not_capped_silently() {
    // MQTT 3.1.1 has no Server Keep Alive: a server cap cannot be told to the client, so a
    // client that disabled keep alive (0) and sends nothing must not be cut off by it.
    let b = start_broker_with(|s| s.mqtt.max_keep_alive = 1).await;
    let (mut c, ack) = Raw::connect(b.addr, V3, "v3-quiet", |c| c.keep_alive = 0).await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    match c.recv_within(Duration::from_millis(2500)).await {
        Recv::Timeout => {}
        other => panic!("3.1.1 client cut off by an unannounced keep alive: {other:?}"),
    }
    c.ping().await;
}

/// Issue 19, bug 13: a publish whose log append (or flush) fails is not acknowledged and its
/// connection is closed; the session must still hear that the connection ended, so the will
/// fires (before the fix the connection closed silently and the session stayed attached to
/// nothing: no will, no expiry, a growing queue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_log_append_closes_the_connection_and_fires_the_will() {
    let b = start_broker().await;
    let mut w = watcher(b.addr).await;
    let (mut c, _) = Raw::connect(b.addr, V5, "unlucky", |c: &mut Connect| {
        c.will = Some(will("will/unlucky", "disk"));
    })
    .await;
    // The publish's batch (in the watcher's partition) fails; the disconnect that follows
    // finds the disk working again.
    b.standalone().broker().fail_next_durable_batches(1);
    c.send(&Packet::Publish(publish_packet(
        "will/lost",
        QoS::AtLeastOnce,
        Some(1),
        b"lost",
    )))
    .await;
    let seen = c.expect_closed().await;
    assert!(
        !seen.iter().any(|p| matches!(p, Packet::PubAck(_))),
        "a publish that was not logged was acknowledged: {seen:?}"
    );
    // The lost publish never arrives; the will does.
    let p = w.recv_publish().await;
    assert_eq!(p.topic, "will/unlucky");
}

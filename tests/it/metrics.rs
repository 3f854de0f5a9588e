//! The metrics endpoint of a standalone broker: `/metrics` counters move with traffic (not
//! just "the endpoint answers"), `/healthz` and `/readyz` answer, refusals and drops are
//! counted by reason.

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::*;
use tiermq_common::codec::Packet;
use tiermq_common::{ProtocolVersion, QoS, ReasonCode};
use tokio::time::Instant;

async fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn metrics_broker() -> (Broker, SocketAddr) {
    let b = start_broker_with(|s| {
        s.metrics.listen = Some("127.0.0.1:0".into());
        // $SYS rounds would add their own messages; this test counts only its own.
        s.mqtt.sys_interval_secs = 0;
    })
    .await;
    let addr = b.metrics_addr().expect("metrics endpoint enabled");
    (b, addr)
}

/// Scrapes until `done` holds (the handler updates counters after the wire, so a client may
/// see its answer a moment before the counter moves); returns that scrape.
async fn scrape_until(addr: SocketAddr, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = scrape(addr).await;
        if done(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "never saw {what}:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Scrapes until `series` reaches `at_least`.
async fn wait_for_at_least(addr: SocketAddr, series: &str, at_least: f64) -> String {
    scrape_until(addr, &format!("{series} >= {at_least}"), |text| {
        sample(text, series).is_some_and(|v| v >= at_least)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_counters_move_with_traffic() {
    let (b, addr) = metrics_broker().await;
    let before = scrape(addr).await;
    assert_eq!(
        sample(&before, "tiermq_messages_received_total{qos=\"1\"}"),
        Some(0.0)
    );
    assert_eq!(
        sample(&before, "tiermq_connections_current{protocol=\"5.0\"}"),
        Some(0.0)
    );

    let (mut sub, _) = V5::connect(b.addr, "m-sub", |_| {}).await;
    sub.subscribe("m/#", Q5::AtLeastOnce).await;
    let (mut publ, _) = V3::connect(b.addr, "m-pub", |_| {}).await;
    const N: usize = 25;
    for i in 0..N {
        publ.publish_qos1("m/x", i.to_string().as_bytes()).await;
    }
    for _ in 0..N {
        sub.next_publish().await;
    }

    let text = wait_for_at_least(addr, "tiermq_messages_sent_total{qos=\"1\"}", N as f64).await;
    let get = |series: &str| sample(&text, series).unwrap_or_else(|| panic!("{series}:\n{text}"));
    assert!(get("tiermq_messages_received_total{qos=\"1\"}") >= N as f64);
    assert_eq!(get("tiermq_connections_current{protocol=\"5.0\"}"), 1.0);
    assert_eq!(get("tiermq_connections_current{protocol=\"3.1.1\"}"), 1.0);
    assert_eq!(
        get("tiermq_connections_opened_total{protocol=\"5.0\"}"),
        1.0
    );
    assert_eq!(
        get("tiermq_connections_opened_total{protocol=\"3.1.1\"}"),
        1.0
    );
    assert_eq!(get("tiermq_subscriptions_current"), 1.0);
    // N publishes of at least 5 bytes each went in, N deliveries went out.
    assert!(get("tiermq_received_bytes_total") >= (N * 5) as f64);
    assert!(get("tiermq_sent_bytes_total") >= (N * 5) as f64);
    assert!(get("tiermq_log_entries_total") >= N as f64);
    assert!(get("tiermq_log_flushes_total") >= 1.0);
    assert!(get("tiermq_start_time_seconds") > 1.6e9);

    // A connection that ends is no longer current, and its subscription goes with it.
    sub.disconnect().await;
    let current = "tiermq_connections_current{protocol=\"5.0\"}";
    let text = scrape_until(addr, "the v5 connection gone", |text| {
        sample(text, current) == Some(0.0)
    })
    .await;
    assert_eq!(sample(&text, "tiermq_subscriptions_current"), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_readiness_answer() {
    let (_b, addr) = metrics_broker().await;
    assert_eq!(http_get(addr, "/healthz").await, (200, "ok\n".to_string()));
    assert_eq!(http_get(addr, "/readyz").await, (200, "ok\n".to_string()));
    assert_eq!(http_get(addr, "/nope").await.0, 404);
    let text = scrape(addr).await;
    assert!(
        text.ends_with("# EOF\n"),
        "OpenMetrics text ends with # EOF"
    );
    assert!(text.contains("# TYPE tiermq_messages_received counter"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_refusals_and_drops_by_reason() {
    let (b, addr) = metrics_broker().await;
    // A client id longer than max_client_id_len (256): CONNACK 0x85.
    let long_id = "x".repeat(300);
    let (_raw, ack) = Raw::connect(b.addr, ProtocolVersion::V5, &long_id, |_| {}).await;
    assert_eq!(ack.reason_code, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID);

    // A subscriber that accepts packets of at most 64 bytes misses a larger delivery.
    let (mut small, ack) = Raw::connect(b.addr, ProtocolVersion::V5, "m-small", |c| {
        c.properties.maximum_packet_size = Some(64);
    })
    .await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    small.subscribe("big", sub_opts(QoS::AtMostOnce)).await;
    let mut publ = Raw::v5(b.addr, "m-big-pub").await;
    publ.send(&Packet::Publish(publish_packet(
        "big",
        QoS::AtMostOnce,
        None,
        &[7u8; 200],
    )))
    .await;
    small.expect_silence().await;

    let text = wait_for_at_least(
        addr,
        "tiermq_publishes_dropped_total{reason=\"packet_too_large\"}",
        1.0,
    )
    .await;
    assert_eq!(
        sample(&text, "tiermq_connections_refused_total{reason=\"0x85\"}"),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_can_be_disabled() {
    // The harness's default: an empty `metrics.listen`.
    let b = start_broker().await;
    assert_eq!(b.metrics_addr(), None);
}

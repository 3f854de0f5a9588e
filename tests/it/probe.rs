//! The self-check probe, the latency histograms and the session gauges, read from the
//! metrics endpoint: a standalone broker's probe round-trips, its fsync histogram moves with
//! client traffic and its queue gauges follow an offline session's queue;
//! in a process cluster the frontend's probe, gRPC call, Raft commit and fsync histograms
//! move, a lost backend quorum shows up as lost probe rounds, and rounds succeed again once
//! the quorum is back.

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::cluster::{ClusterOpts, ProcCluster};
use crate::support::*;
use tiermq::metrics_http::call;
use tokio::time::Instant;

/// The value of `series` (name with its labels, as exposed) in a scrape, if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?.strip_prefix(' ')?;
        rest.split(' ').next()?.parse().ok()
    })
}

fn get(text: &str, series: &str) -> f64 {
    value(text, series).unwrap_or_else(|| panic!("{series} missing:\n{text}"))
}

async fn scrape(addr: SocketAddr) -> String {
    match call(&addr.to_string(), "GET", "/metrics", Duration::from_secs(3)).await {
        Ok((200, body)) => body,
        other => panic!("scrape of {addr}: {other:?}"),
    }
}

/// Scrapes `addr` until `done` holds (within `within`); returns that scrape.
async fn scrape_until(
    addr: SocketAddr,
    what: &str,
    within: Duration,
    done: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + within;
    loop {
        let text = scrape(addr).await;
        if done(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "never saw {what}:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const RECEIVED: &str = "tiermq_probe_received_total";
const SENT: &str = "tiermq_probe_sent_total";
const LOST: &str = "tiermq_probe_lost_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_probe_round_trips_and_fsync_latency_moves() {
    let b = start_broker_with(|s| {
        s.metrics.listen = Some("127.0.0.1:0".into());
        s.mqtt.sys_interval_secs = 0;
        s.metrics.probe_interval_secs = 1;
    })
    .await;
    let addr = b.metrics_addr().expect("metrics endpoint");
    let text = scrape_until(addr, "2 probe round trips", WAIT * 2, |t| {
        value(t, RECEIVED).is_some_and(|v| v >= 2.0)
    })
    .await;
    assert_eq!(get(&text, LOST), 0.0);
    assert!(get(&text, SENT) >= get(&text, RECEIVED));
    assert!(get(&text, "tiermq_probe_rtt_seconds_count") >= 2.0);
    assert!(get(&text, "tiermq_probe_rtt_seconds_sum") > 0.0);
    assert!(get(&text, "tiermq_probe_last_success_timestamp_seconds") > 1.6e9);
    // The probe is not a client: client counters stay at zero.
    assert_eq!(get(&text, "tiermq_messages_received_total{qos=\"1\"}"), 0.0);
    assert_eq!(
        get(&text, "tiermq_connections_opened_total{protocol=\"5.0\"}"),
        0.0
    );

    // Client traffic: a QoS1 publish is acknowledged once flushed, and the flush is timed
    // (several publishes may share one flush).
    let fsyncs = get(&text, "tiermq_fsync_duration_seconds_count");
    let (mut publ, _) = V5::connect(b.addr, "probe-pub", |_| {}).await;
    for i in 0..5 {
        publ.publish_qos1("probe/test", i.to_string().as_bytes())
            .await;
    }
    let text = scrape(addr).await;
    assert!(
        get(&text, "tiermq_fsync_duration_seconds_count") > fsyncs,
        "{text}"
    );
    assert!(text.contains("tiermq_fsync_duration_seconds_bucket{le=\"0.0001\"}"));
}

/// A standalone broker's session gauges follow what the partitions hold: an offline
/// persistent session's queue grows with each message for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_session_gauges_follow_the_queues() {
    let b = start_broker_with(|s| {
        s.metrics.listen = Some("127.0.0.1:0".into());
        s.mqtt.sys_interval_secs = 0;
    })
    .await;
    let addr = b.metrics_addr().expect("metrics endpoint");
    let (mut sub, _) = V3::connect(b.addr, "gauge-sub", |o| {
        o.set_clean_session(false);
    })
    .await;
    sub.subscribe("gauge/t", Q3::AtLeastOnce).await;
    sub.disconnect().await;
    scrape_until(addr, "the subscriber offline", WAIT, |t| {
        value(t, "tiermq_sessions_connected") == Some(0.0)
    })
    .await;
    let (mut publ, _) = V3::connect(b.addr, "gauge-pub", |_| {}).await;
    for _ in 0..3 {
        publ.publish_qos1("gauge/t", b"0123456789").await;
    }
    let text = scrape_until(addr, "3 queued messages", WAIT, |t| {
        value(t, "tiermq_queued_messages") == Some(3.0)
    })
    .await;
    assert_eq!(get(&text, "tiermq_queued_bytes"), 30.0);
    assert_eq!(get(&text, "tiermq_sessions"), 2.0);
    assert_eq!(get(&text, "tiermq_sessions_connected"), 1.0);
    assert_eq!(get(&text, "tiermq_session_subscriptions"), 1.0);
    assert_eq!(get(&text, "tiermq_inflight_messages"), 0.0);
}

/// A probe that is off exports nothing (an alert on its series cannot fire for nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_is_off_by_default() {
    let b = start_broker_with(|s| s.metrics.listen = Some("127.0.0.1:0".into())).await;
    let text = scrape(b.metrics_addr().expect("metrics endpoint")).await;
    assert!(!text.contains("tiermq_probe_"), "{text}");
}

/// A cluster frontend's probe round-trips through the backends; the frontend's gRPC call
/// histogram and the backends' commit and fsync histograms move; killing 2 of 3 backends
/// makes probe rounds get lost, and with the two back rounds succeed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_probe_counts_loss_without_a_quorum_and_recovers() {
    let mut c = ProcCluster::start_with(ClusterOpts {
        frontend_args: ["--probe-interval-secs", "1", "--probe-timeout-secs", "2"]
            .map(String::from)
            .to_vec(),
        ..ClusterOpts::default()
    })
    .await;
    let fe = c.fe_admin(0);
    let text = scrape_until(fe, "2 probe round trips", Duration::from_secs(20), |t| {
        value(t, RECEIVED).is_some_and(|v| v >= 2.0)
    })
    .await;
    assert!(get(&text, "tiermq_probe_rtt_seconds_count") >= 2.0);
    for method in ["connect", "subscribe", "publish"] {
        let series =
            format!("tiermq_grpc_client_call_duration_seconds_count{{method=\"{method}\"}}");
        assert!(get(&text, &series) >= 1.0, "{series}");
    }
    let mut commits = 0.0;
    let mut proposers = 0;
    for i in 0..3 {
        let text = scrape(c.be_admin(i)).await;
        commits += value(&text, "tiermq_raft_commit_duration_seconds_count").unwrap_or(0.0);
        assert!(
            get(&text, "tiermq_fsync_duration_seconds_count") >= 1.0,
            "every replica persists"
        );
        // Only a leader proposes: a backend that leads no partition has no such series.
        if text.contains("tiermq_raft_proposals_total{partition=") {
            proposers += 1;
        }
    }
    assert!(commits >= 2.0, "the leaders timed their entries: {commits}");
    assert!(proposers >= 1, "the leaders count their proposals");

    // No quorum: rounds time out and are counted lost.
    let lost_before = get(&text, LOST);
    let cut = Instant::now();
    c.kill9_backend(1);
    c.kill9_backend(2);
    let text = scrape_until(fe, "a lost probe round", Duration::from_secs(20), |t| {
        value(t, LOST).is_some_and(|v| v > lost_before)
    })
    .await;
    let first_loss = cut.elapsed();
    let received = get(&text, RECEIVED);
    let stale = get(&text, "tiermq_probe_last_success_timestamp_seconds");

    // Quorum back: the probe starts a fresh session and gets through again.
    let back = Instant::now();
    c.restart_backend(1);
    c.restart_backend(2);
    let text = scrape_until(
        fe,
        "a probe round after recovery",
        Duration::from_secs(40),
        |t| value(t, RECEIVED).is_some_and(|v| v > received),
    )
    .await;
    assert!(get(&text, "tiermq_probe_last_success_timestamp_seconds") > stale);
    let sent = get(&text, SENT);
    let done = get(&text, RECEIVED) + get(&text, LOST);
    assert!(
        sent - done <= 1.0,
        "every round but the current one ended: {sent} sent, {done} ended"
    );
    eprintln!(
        "probe: first loss {first_loss:?} after the quorum went, first success {:?} after \
         it returned; lost {} rounds",
        back.elapsed(),
        get(&text, LOST) - lost_before
    );
}

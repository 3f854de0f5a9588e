//! The checker's classification, and a short end-to-end run against an in-process broker.

use std::time::Duration;

use tiermq_common::config::Settings;

use super::analysis::analyse;
use super::{CheckArgs, Delivery, PublisherLog, Record, Sent, SubscriberLog};
use crate::standalone::Standalone;

fn sent(topic: u32, acked: bool) -> Sent {
    Sent {
        topic,
        first_sent_ms: if acked { 1_000 } else { 6_000 },
        sends: 1,
        acked_ms: acked.then_some(1_010),
        ..Default::default()
    }
}

fn msg(publisher: u32, seq: u64, topics: u32) -> Delivery {
    Delivery::Message {
        publisher,
        seq,
        topic: (seq % u64::from(topics)) as u32,
        topic_ok: true,
        qos: 1,
        dup: false,
    }
}

#[test]
fn sorts_lost_duplicated_out_of_order_unexpected() {
    // One publisher, two topics: seq 0,2,4 on t0 and 1,3,5 on t1.
    let publisher = PublisherLog {
        qos: 1,
        sent: (0..6).map(|s| sent((s % 2) as u32, s != 5)).collect(),
        connects: 2,
        ..Default::default()
    };
    let sub = SubscriberLog {
        deliveries: vec![
            msg(0, 0, 2),
            msg(0, 1, 2),
            msg(0, 4, 2),
            msg(0, 2, 2), // out of order on t0 (after 4)
            msg(0, 1, 2), // duplicate
            msg(0, 5, 2), // unacked but delivered: fine
            msg(0, 9, 2), // never sent
            Delivery::Unexpected("x".into()),
        ],
        connects: 1,
        ..Default::default()
    };
    let record = Record {
        publishers: vec![publisher],
        subscribers: vec![sub],
    };
    let s = analyse(
        &record,
        &[(1_000, "kill".into()), (5_000, "late".into())],
        900,
    );
    assert_eq!((s.sent, s.acked, s.unacked), (6, 5, 1));
    assert_eq!(s.lost, 1, "seq 3 acked, never delivered");
    assert_eq!(s.delivered, 4);
    assert_eq!(s.duplicated, 1);
    assert_eq!(s.out_of_order, 1);
    assert_eq!(s.unexpected, 2);
    assert_eq!(s.unacked_delivered, 1);
    assert_eq!(s.reconnects, 1);
    // All acks at 1010: no pause around the first fault; nothing acked after the second.
    assert_eq!(s.failovers[0], ("kill".to_string(), Some(0)));
    assert_eq!(s.failovers[1], ("late".to_string(), None));
    assert!(!s.passed());
}

#[test]
fn failover_is_the_end_of_the_pause_around_the_fault() {
    let acked = |at: u64| Sent {
        first_sent_ms: at - 5,
        sends: 1,
        acked_ms: Some(at),
        ..Default::default()
    };
    // Acks every 20 ms, a 2 s pause from 10_000 (fault at 10_050), then again.
    let mut sent: Vec<Sent> = (0..100).map(|i| acked(8_020 + 20 * i)).collect();
    sent.extend((0..50).map(|i| acked(12_000 + 20 * i)));
    let record = Record {
        publishers: vec![PublisherLog {
            qos: 1,
            sent,
            ..Default::default()
        }],
        subscribers: vec![],
    };
    let s = analyse(
        &record,
        &[(10_050, "kill".into()), (12_500, "calm".into())],
        8_000,
    );
    assert_eq!(s.failovers[0].1, Some(1_950));
    assert_eq!(s.failovers[1].1, Some(0));
    assert_eq!(s.max_ack_gap_ms, 2_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_run_against_in_process_standalone() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::default();
    settings.storage.data_dir = dir.path().to_path_buf();
    settings.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    let broker = Standalone::start(&settings).await.unwrap();
    let addr = broker.local_addr().to_string();
    let args = CheckArgs {
        frontends: vec![addr.clone(), addr],
        publishers: 2,
        subscribers: 2,
        topics: 3,
        rate: 100,
        inflight: 8,
        duration: Duration::from_secs(1),
        drain: Duration::from_secs(10),
        settle: Duration::from_millis(100),
        run: Some("t1".into()),
        fault_file: None,
        session_expiry: 60,
        show: 5,
    };
    let s = super::run(args).await.unwrap();
    assert!(s.passed(), "{s:?}");
    assert!(s.acked > 100, "{s:?}");
    assert_eq!(s.delivered, s.acked * 2);
    assert_eq!(s.duplicated_qos2, 0);
    broker.shutdown().await;
}

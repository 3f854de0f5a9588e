//! End to end: a short `pairs` run against an in-process standalone broker.

use std::time::Duration;

use tiermq_common::ProtocolVersion;

use super::{scenarios, LoadArgs, Scenario};
use crate::test_broker::TestBroker;

fn load_args(port: u16, mqtt: ProtocolVersion, qos: u8) -> LoadArgs {
    LoadArgs {
        host: "127.0.0.1".parse().unwrap(),
        port: vec![port],
        qos,
        payload: 64,
        rate: 200,
        duration: Duration::from_secs(1),
        publishers: Some(3),
        subscribers: None,
        shared: false,
        connections: 10,
        topics: 100,
        mqtt,
        json: None,
        source_ips: vec!["127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap()],
        broker_pid: vec![std::process::id()],
        rss_pid: vec![],
        broker_name: "tiermq".into(),
        case: None,
        window: 100,
        connect_concurrency: 8,
        threads: None,
        drain: Duration::from_secs(5),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairs_against_in_process_standalone() {
    let broker = TestBroker::start().await;
    let port = broker.local_addr().port();

    for (mqtt, qos) in [(ProtocolVersion::V5, 0), (ProtocolVersion::V311, 1)] {
        let r = scenarios::run(Scenario::Pairs, &load_args(port, mqtt, qos), false)
            .await
            .unwrap();
        eprintln!("{}", super::report::summary_table(&r));
        assert_eq!(r.publishers, 3);
        assert_eq!(r.subscribers, 3);
        // 3 publishers × 200/s × 1 s.
        assert!(r.sent >= 590 && r.sent <= 603, "sent {}", r.sent);
        assert_eq!(r.tally.expected, r.sent);
        assert_eq!(r.tally.received, r.sent, "{r:?}");
        assert_eq!(r.tally.lost, 0);
        assert_eq!(r.tally.duplicated, 0);
        assert_eq!(r.tally.unexpected, 0);
        assert_eq!(r.unsent, 0);
        if qos == 1 {
            assert_eq!(r.acked, r.sent);
        }
        let lat = r.latency.expect("latency recorded");
        assert_eq!(lat.count, r.sent);
        assert!(r.cpu_s_per_million.is_some());
        assert!(r.notes.is_empty(), "{:?}", r.notes);
    }
    broker.shutdown().await;
}

//! The checker's classification, and a short end-to-end run against an in-process broker.

use std::time::Duration;

use super::analysis::analyse;
use bytes::Bytes;
use tiermq_common::codec::{Packet, Publish};
use tiermq_common::QoS;

use super::{
    wills, CheckArgs, Delivery, PublisherLog, PublisherQos, Record, Sent, SubscriberLog, WillEnd,
    WillLog,
};
use crate::bench::client::Conn;
use crate::test_broker::TestBroker;

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
        packet_id: None,
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
        ..Default::default()
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
        ..Default::default()
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
    let broker = TestBroker::start().await;
    let addr = broker.local_addr().to_string();
    let args = CheckArgs {
        frontends: vec![addr.clone(), addr],
        publishers: 2,
        qos: PublisherQos::Mixed,
        wills: 4,
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
    // The will clients disconnected cleanly at the end: no will owed, none arrived.
    assert_eq!((s.wills.clients, s.wills.expected), (4, 0), "{s:?}");
    assert_eq!(s.wills.unexpected, 0, "{s:?}");
    broker.shutdown().await;
}

#[test]
fn qos2_duplicates_are_counted_apart_from_qos1_ones() {
    let publisher = |qos: u8| PublisherLog {
        qos,
        sent: (0..2).map(|_| sent(0, true)).collect(),
        connects: 1,
        ..Default::default()
    };
    let at = |publisher: u32, seq: u64, qos: u8| Delivery::Message {
        publisher,
        seq,
        topic: 0,
        topic_ok: true,
        qos,
        dup: false,
        packet_id: None,
    };
    let sub = SubscriberLog {
        deliveries: vec![
            at(0, 0, 1),
            at(0, 0, 1), // QoS1 redelivery: allowed
            at(0, 1, 1),
            at(1, 0, 2),
            at(1, 1, 2),
            at(1, 1, 2), // QoS2 twice: exactly once broken
        ],
        connects: 1,
        ..Default::default()
    };
    let record = Record {
        publishers: vec![publisher(1), publisher(2)],
        subscribers: vec![sub],
        ..Default::default()
    };
    let s = analyse(&record, &[], 900);
    assert_eq!((s.duplicated, s.duplicated_qos2), (2, 1));
    assert_eq!((s.lost, s.delivered), (0, 4));
    assert!(s.passed(), "duplicates are reported, not judged: {s:?}");
    let found: Vec<&str> = s.findings.iter().map(|f| f.what.as_str()).collect();
    assert_eq!(
        found,
        vec!["QoS2 duplicate: publisher 1 seq 1 (sent 1 time(s); packet id - then -, DUP=0)"]
    );
}

fn will_log(i: u32, end: WillEnd) -> WillLog {
    let mut w = WillLog::new(wills::variant(i));
    w.end = end;
    w
}

fn broken() -> WillEnd {
    WillEnd::Broken {
        at_ms: 5_000,
        why: "closed by the broker".into(),
    }
}

#[test]
fn wills_owed_exactly_once_by_broken_connections_only() {
    let will = |client: u32| Delivery::Will { client };
    let record = Record {
        publishers: vec![PublisherLog {
            qos: 1,
            sent: vec![sent(0, true)],
            ..Default::default()
        }],
        subscribers: vec![SubscriberLog {
            deliveries: vec![msg(0, 0, 1)],
            ..Default::default()
        }],
        wills: vec![
            will_log(0, broken()),                       // arrives once: right
            will_log(1, broken()),                       // never arrives: lost
            will_log(2, broken()),                       // arrives twice: duplicated
            will_log(3, WillEnd::Closed),                // arrives: unexpected
            will_log(4, WillEnd::Closed),                // does not arrive: right
            will_log(5, WillEnd::Unsure("0x8E".into())), // arrives: either is right
        ],
        will_subscribers: vec![SubscriberLog {
            deliveries: vec![
                will(0),
                will(2),
                will(3),
                will(2),
                will(5),
                will(9), // no such client
                Delivery::Unexpected("checkwill/x/w0 \"junk\"".into()),
            ],
            ..Default::default()
        }],
    };
    let s = analyse(&record, &[], 900);
    let w = &s.wills;
    assert_eq!((w.clients, w.expected, w.unsure), (6, 3, 1));
    assert_eq!((w.delivered, w.lost, w.duplicated), (2, 1, 1));
    assert_eq!(w.unexpected, 3, "client 3's will, client 9, the junk");
    assert_eq!((s.lost, s.unexpected), (0, 0), "messages are counted apart");
    assert!(!s.passed(), "a lost or unexpected will fails the check");
    let lost: Vec<&str> = s
        .findings
        .iter()
        .map(|f| f.what.as_str())
        .filter(|w| w.starts_with("will lost: will client 1 "))
        .collect();
    assert_eq!(lost.len(), 1, "{:?}", s.findings);
}

#[test]
fn will_deliveries_decode_only_their_own_topic_and_payload() {
    let plan = super::Plan {
        run: "r1".into(),
        frontends: vec!["127.0.0.1:1".parse().unwrap()],
        topics: 4,
        qos: PublisherQos::Mixed,
        rate: 1,
        inflight: 1,
        session_expiry: 0,
        publish_until: tokio::time::Instant::now(),
        hard_deadline: tokio::time::Instant::now(),
    };
    let publish = |topic: &str, payload: &'static str| Publish {
        dup: false,
        qos: QoS::ExactlyOnce,
        retain: false,
        topic: topic.into(),
        packet_id: Some(1),
        properties: Default::default(),
        payload: Bytes::from_static(payload.as_bytes()),
    };
    let decode = |p: Publish| wills::decode(&plan, &p);
    assert!(matches!(
        decode(publish("checkwill/r1/w3", "r1|will|3")),
        Delivery::Will { client: 3 }
    ));
    for (topic, payload) in [
        ("checkwill/r1/w4", "r1|will|3"), // another client's topic
        ("checkwill/r1/w3", "r0|will|3"), // another run
        ("checkwill/r1/w3", "r1|will|x"),
        ("check/r1/t3", "r1|will|3"),
    ] {
        assert!(
            matches!(decode(publish(topic, payload)), Delivery::Unexpected(_)),
            "{topic} {payload}"
        );
    }
}

#[test]
fn publisher_qos_option() {
    use super::parse_publisher_qos as parse;
    let mixed = parse("mixed").unwrap();
    assert_eq!(
        (mixed.of(0), mixed.of(1)),
        (QoS::AtLeastOnce, QoS::ExactlyOnce)
    );
    let two = parse("2").unwrap();
    assert_eq!((two.of(0), two.of(1)), (QoS::ExactlyOnce, QoS::ExactlyOnce));
    assert_eq!(parse("1").unwrap().of(1), QoS::AtLeastOnce);
    assert!(parse("0").is_err());
}

/// A TCP relay to `to`; sending on (or dropping) the returned channel drops every relayed
/// connection and stops accepting: a frontend that dies.
async fn relay(to: std::net::SocketAddr) -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (cut, mut cut_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                // Returning drops `conns`: every relayed connection is aborted.
                _ = &mut cut_rx => return,
                accepted = listener.accept() => {
                    let Ok((mut client, _)) = accepted else { continue };
                    conns.spawn(async move {
                        if let Ok(mut broker) = tokio::net::TcpStream::connect(to).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
                        }
                    });
                }
            }
        }
    });
    (addr, cut)
}

/// The will clients sit behind a relay that dies mid-run: every will is owed and must arrive
/// once; the publishers move to the broker's own address and lose nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wills_of_a_dead_frontend_arrive_once() {
    let broker = TestBroker::start().await;
    let (front, cut) = relay(broker.local_addr()).await;
    let args = CheckArgs {
        frontends: vec![front, broker.local_addr().to_string()],
        publishers: 2,
        qos: PublisherQos::Only(QoS::ExactlyOnce),
        wills: 4,
        subscribers: 1,
        topics: 2,
        rate: 50,
        inflight: 8,
        duration: Duration::from_secs(3),
        drain: Duration::from_secs(20),
        settle: Duration::from_millis(100),
        run: Some("w1".into()),
        fault_file: None,
        session_expiry: 60,
        show: 5,
    };
    let run = tokio::spawn(super::run(args));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let _ = cut.send(());
    let s = run.await.unwrap().unwrap();
    let w = &s.wills;
    assert_eq!((w.clients, w.expected, w.unsure), (4, 4, 0), "{s:?}");
    assert_eq!(
        (w.delivered, w.lost, w.duplicated, w.unexpected),
        (4, 0, 0, 0),
        "{s:?}"
    );
    assert!(s.passed(), "{s:?}");
    assert!(s.reconnects >= 2, "the publishers moved: {s:?}");
    broker.shutdown().await;
}

/// A scripted broker for one subscriber connection: CONNACK (no session), SUBACK, then one
/// QoS2 PUBLISH with packet id 1 and payload `r2|0|seq`, answered by a PUBREC.
async fn scripted_session(listener: &tokio::net::TcpListener, seq: u64) -> Conn {
    use tiermq_common::codec::{ConnAck, SubAck};
    use tiermq_common::{ProtocolVersion, ReasonCode};
    let (stream, _) = listener.accept().await.unwrap();
    let mut conn = Conn {
        stream,
        version: ProtocolVersion::V5,
        rbuf: Default::default(),
        wbuf: Default::default(),
        connack: ConnAck {
            session_present: false,
            reason_code: ReasonCode::SUCCESS,
            properties: Default::default(),
        },
    };
    // Before CONNECT the codec knows no version (`Conn::next` decodes as a client would).
    let connect = loop {
        if let Some(p) = tiermq_common::codec::decode(&mut conn.rbuf, None, 1 << 20).unwrap() {
            break p;
        }
        assert!(conn.fill().await.unwrap() > 0, "closed before CONNECT");
    };
    assert!(matches!(connect, Packet::Connect(_)));
    conn.push(&Packet::ConnAck(conn.connack.clone())).unwrap();
    conn.flush().await.unwrap();
    let Some(Packet::Subscribe(sub)) = conn.next().await.unwrap() else {
        panic!("no SUBSCRIBE")
    };
    conn.push(&Packet::SubAck(SubAck {
        packet_id: sub.packet_id,
        reason_codes: vec![ReasonCode::GRANTED_QOS_2],
        properties: Default::default(),
    }))
    .unwrap();
    conn.flush().await.unwrap();
    // The subscriber reads the socket again only once it has the SUBACK (it does not look at
    // bytes that came with it until more arrive).
    tokio::time::sleep(Duration::from_millis(300)).await;
    conn.push(&Packet::Publish(Publish {
        dup: false,
        qos: QoS::ExactlyOnce,
        retain: false,
        topic: "check/r2/t0".into(),
        packet_id: Some(1),
        properties: Default::default(),
        payload: Bytes::from(format!("r2|0|{seq}")),
    }))
    .unwrap();
    conn.flush().await.unwrap();
    assert!(matches!(
        conn.next().await.unwrap(),
        Some(Packet::PubRec(_))
    ));
    conn
}

/// A subscriber whose session is gone (Session Present 0) forgets the QoS2 exchanges of the
/// old one: a new message reusing a packet id that was never released is a new message.
#[tokio::test]
async fn subscriber_forgets_unreleased_qos2_ids_with_its_session() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let now = tokio::time::Instant::now();
    let plan = super::Plan {
        run: "r2".into(),
        frontends: vec![listener.local_addr().unwrap()],
        topics: 1,
        qos: PublisherQos::Mixed,
        rate: 1,
        inflight: 1,
        session_expiry: 60,
        publish_until: now + Duration::from_secs(20),
        hard_deadline: now + Duration::from_secs(20),
    };
    let record: super::Shared = Default::default();
    super::lock(&record)
        .subscribers
        .push(SubscriberLog::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (ready_tx, _ready_rx) = tokio::sync::mpsc::channel(4);
    let subscriber = tokio::spawn(super::clients::subscriber(
        super::clients::Feed::Checks,
        0,
        plan,
        0,
        record.clone(),
        stop_rx,
        ready_tx,
    ));
    // Seq 0 with packet id 1, PUBREC'd, never released: the connection (and session) ends.
    drop(scripted_session(&listener, 0).await);
    // A new session sends seq 1 with packet id 1.
    let _second = scripted_session(&listener, 1).await;
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), subscriber).await;
    let r = super::lock(&record);
    let seqs: Vec<u64> = r.subscribers[0]
        .deliveries
        .iter()
        .filter_map(|d| d.key().map(|(_, seq)| seq))
        .collect();
    assert_eq!(seqs, vec![0, 1]);
}

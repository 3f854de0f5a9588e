//! The in-process broker through the `SessionService` trait, with 1 and 4 partitions.

use std::path::Path;
use std::time::Duration;

use tiermq_backend::local::{LocalBroker, LocalConfig};
use tiermq_common::hashing::partition_of;
use tiermq_common::session_api::{
    AckKind, ConnectRequest, Connected, Delivery, DisconnectRequest, ServiceError, SessionEvent,
    SessionService, SubscribeRequest, SubscriptionOptions, Will,
};
use tiermq_common::{Message, ProtocolVersion, QoS, ReasonCode};
use tokio::sync::mpsc::UnboundedReceiver;

const WAIT: Duration = Duration::from_secs(10);

fn config(partitions: u32) -> LocalConfig {
    LocalConfig {
        partitions,
        tick_interval: Duration::from_millis(50),
        ..Default::default()
    }
}

/// Opens the broker, retrying while a previous instance's sled handle still holds the lock.
async fn open(dir: &Path, partitions: u32) -> LocalBroker {
    let mut tries = 0;
    loop {
        match LocalBroker::open(dir, config(partitions)) {
            Ok(b) => return b,
            Err(e) if tries < 100 => {
                tries += 1;
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("open: {e}"),
        }
    }
}

fn req(id: &str, clean_start: bool, receive_maximum: u16) -> ConnectRequest {
    ConnectRequest {
        client_id: id.into(),
        protocol: ProtocolVersion::V5,
        clean_start,
        session_expiry_secs: 3600,
        receive_maximum,
        will: None,
        frontend_id: 0,
    }
}

fn sub(filter: &str, qos: QoS) -> SubscribeRequest {
    SubscribeRequest {
        filter: filter.into(),
        options: SubscriptionOptions {
            qos,
            ..Default::default()
        },
        subscription_id: None,
    }
}

async fn next_event(rx: &mut UnboundedReceiver<SessionEvent>) -> SessionEvent {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("timed out waiting for an event")
        .expect("event stream closed")
}

async fn next_delivery(rx: &mut UnboundedReceiver<SessionEvent>) -> Delivery {
    match next_event(rx).await {
        SessionEvent::Deliver(d) => d,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

async fn nothing_more(rx: &mut UnboundedReceiver<SessionEvent>) {
    if let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
        panic!("unexpected event {e:?}");
    }
}

fn payload(d: &Delivery) -> String {
    String::from_utf8(d.message.payload.to_vec()).unwrap()
}

async fn publish_and_subscribe(partitions: u32) {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path(), partitions).await;
    let mut s = broker.connect(req("sub", true, 10)).await.unwrap();
    assert!(!s.session_present);
    let codes = broker
        .subscribe(&s.session, vec![sub("a/+", QoS::AtLeastOnce)])
        .await
        .unwrap();
    assert_eq!(codes, vec![ReasonCode::GRANTED_QOS_1]);
    let p = broker.connect(req("pub", true, 10)).await.unwrap();
    let r = broker
        .publish(
            &p.session,
            Message::new("a/1", "hello", QoS::AtLeastOnce, false),
            None,
        )
        .await
        .unwrap();
    assert!(r.matched && !r.duplicate);
    let d = next_delivery(&mut s.events).await;
    assert_eq!(payload(&d), "hello");
    assert_eq!(d.qos, QoS::AtLeastOnce);
    assert!(d.packet_id.is_some() && !d.dup);
    broker
        .ack(&s.session, AckKind::PubAck, d.packet_id.unwrap())
        .await
        .unwrap();
    // QoS0 takes the unlogged path and still arrives, after the subscribe.
    broker
        .publish(
            &p.session,
            Message::new("a/2", "q0", QoS::AtMostOnce, false),
            None,
        )
        .await
        .unwrap();
    let d = next_delivery(&mut s.events).await;
    assert_eq!((payload(&d), d.packet_id), ("q0".to_string(), None));
    // Not matching: no delivery, matched=false.
    let r = broker
        .publish(
            &p.session,
            Message::new("b/1", "x", QoS::AtLeastOnce, false),
            None,
        )
        .await
        .unwrap();
    assert!(!r.matched);
    nothing_more(&mut s.events).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn publish_subscribe_qos1_one_partition() {
    publish_and_subscribe(1).await;
}

#[tokio::test]
async fn publish_subscribe_qos1_four_partitions() {
    publish_and_subscribe(4).await;
}

async fn inbound_qos2_dedup(partitions: u32) {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path(), partitions).await;
    let mut s = broker.connect(req("sub", true, 10)).await.unwrap();
    broker
        .subscribe(&s.session, vec![sub("q/#", QoS::ExactlyOnce)])
        .await
        .unwrap();
    let p = broker.connect(req("pub", true, 10)).await.unwrap();
    let m = Message::new("q/2", "once", QoS::ExactlyOnce, false);
    let r = broker
        .publish(&p.session, m.clone(), Some(5))
        .await
        .unwrap();
    assert!(!r.duplicate);
    let r = broker
        .publish(&p.session, m.clone(), Some(5))
        .await
        .unwrap();
    assert!(r.duplicate);
    assert!(broker.release(&p.session, 5).await.unwrap());
    assert!(!broker.release(&p.session, 5).await.unwrap());
    let d = next_delivery(&mut s.events).await;
    assert_eq!(d.qos, QoS::ExactlyOnce);
    nothing_more(&mut s.events).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn inbound_qos2_dedup_one_partition() {
    inbound_qos2_dedup(1).await;
}

#[tokio::test]
async fn inbound_qos2_dedup_four_partitions() {
    inbound_qos2_dedup(4).await;
}

#[tokio::test]
async fn retained_across_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path(), 4).await;
    let p = broker.connect(req("pub", true, 10)).await.unwrap();
    let topics: Vec<String> = (0..16).map(|i| format!("r/{i}")).collect();
    let homes: std::collections::BTreeSet<u32> =
        topics.iter().map(|t| partition_of(t, 4)).collect();
    assert!(homes.len() > 1, "topics must live in several partitions");
    for t in &topics {
        broker
            .publish(
                &p.session,
                Message::new(t.as_str(), t.clone(), QoS::AtLeastOnce, true),
                None,
            )
            .await
            .unwrap();
    }
    // Delete one: it must not come back.
    broker
        .publish(
            &p.session,
            Message::new("r/3", "", QoS::AtLeastOnce, true),
            None,
        )
        .await
        .unwrap();
    let mut s = broker.connect(req("sub", true, 100)).await.unwrap();
    broker
        .subscribe(&s.session, vec![sub("r/#", QoS::AtLeastOnce)])
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..15 {
        let d = next_delivery(&mut s.events).await;
        assert!(d.retain, "retained on subscribe carries RETAIN=1");
        got.push(payload(&d));
    }
    got.sort();
    let mut want: Vec<String> = topics.iter().filter(|t| *t != "r/3").cloned().collect();
    want.sort();
    assert_eq!(got, want);
    nothing_more(&mut s.events).await;
    broker.shutdown().await;
}

async fn persistence_across_restart(partitions: u32) {
    let dir = tempfile::tempdir().unwrap();
    let (sub_epoch, first_pid) = {
        let broker = open(dir.path(), partitions).await;
        let mut s = broker.connect(req("sub", false, 1)).await.unwrap();
        broker
            .subscribe(&s.session, vec![sub("d/#", QoS::AtLeastOnce)])
            .await
            .unwrap();
        let p = broker.connect(req("pub", true, 10)).await.unwrap();
        for i in 0..3 {
            broker
                .publish(
                    &p.session,
                    Message::new(format!("d/{i}"), format!("m{i}"), QoS::AtLeastOnce, false),
                    None,
                )
                .await
                .unwrap();
        }
        broker
            .publish(
                &p.session,
                Message::new("keep/x", "kept", QoS::AtLeastOnce, true),
                None,
            )
            .await
            .unwrap();
        // Receive Maximum 1: only the first is in flight, and it stays unacknowledged.
        let d = next_delivery(&mut s.events).await;
        assert_eq!(payload(&d), "m0");
        nothing_more(&mut s.events).await;
        broker.shutdown().await;
        (s.session.epoch, d.packet_id.unwrap())
    };
    let broker = open(dir.path(), partitions).await;
    let Connected {
        session,
        session_present,
        mut events,
    } = broker.connect(req("sub", false, 1)).await.unwrap();
    assert!(session_present);
    assert!(session.epoch > sub_epoch);
    // The unacknowledged one again, with DUP and its packet id.
    let d = next_delivery(&mut events).await;
    assert_eq!(payload(&d), "m0");
    assert!(d.dup);
    assert_eq!(d.packet_id, Some(first_pid));
    nothing_more(&mut events).await;
    broker
        .ack(&session, AckKind::PubAck, first_pid)
        .await
        .unwrap();
    // The queued ones follow in order, never sent before: DUP=0.
    for i in 1..3 {
        let d = next_delivery(&mut events).await;
        assert_eq!(payload(&d), format!("m{i}"));
        assert!(!d.dup);
        broker
            .ack(&session, AckKind::PubAck, d.packet_id.unwrap())
            .await
            .unwrap();
    }
    // The subscription survived too: a new publish is routed to it.
    let p = broker.connect(req("pub", true, 10)).await.unwrap();
    let r = broker
        .publish(
            &p.session,
            Message::new("d/9", "after", QoS::AtLeastOnce, false),
            None,
        )
        .await
        .unwrap();
    assert!(r.matched);
    assert_eq!(payload(&next_delivery(&mut events).await), "after");
    // Retained messages survived.
    let mut r = broker.connect(req("late", true, 10)).await.unwrap();
    broker
        .subscribe(&r.session, vec![sub("keep/#", QoS::AtLeastOnce)])
        .await
        .unwrap();
    let d = next_delivery(&mut r.events).await;
    assert_eq!(payload(&d), "kept");
    assert!(d.retain);
    broker.shutdown().await;
}

#[tokio::test]
async fn persistence_across_restart_one_partition() {
    persistence_across_restart(1).await;
}

#[tokio::test]
async fn persistence_across_restart_four_partitions() {
    persistence_across_restart(4).await;
}

async fn takeover(partitions: u32) {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path(), partitions).await;
    let mut first = broker.connect(req("c", false, 10)).await.unwrap();
    let second = broker.connect(req("c", false, 10)).await.unwrap();
    assert!(second.session_present);
    assert_eq!(
        next_event(&mut first.events).await,
        SessionEvent::Disconnect {
            reason: ReasonCode::SESSION_TAKEN_OVER
        }
    );
    let err = broker
        .subscribe(&first.session, vec![sub("x", QoS::AtMostOnce)])
        .await
        .unwrap_err();
    assert_eq!(err, ServiceError::SessionTakenOver);
    // The old connection's late disconnect is harmless.
    broker
        .disconnect(&first.session, DisconnectRequest::ABNORMAL)
        .await
        .unwrap();
    broker
        .subscribe(&second.session, vec![sub("x", QoS::AtMostOnce)])
        .await
        .unwrap();
    broker.shutdown().await;
}

#[tokio::test]
async fn takeover_one_partition() {
    takeover(1).await;
}

#[tokio::test]
async fn takeover_four_partitions() {
    takeover(4).await;
}

async fn will_on_abnormal_disconnect(partitions: u32) {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path(), partitions).await;
    let mut watcher = broker.connect(req("watcher", true, 10)).await.unwrap();
    broker
        .subscribe(&watcher.session, vec![sub("wills/#", QoS::AtLeastOnce)])
        .await
        .unwrap();
    for (id, delay) in [("quick", 0u32), ("slow", 1)] {
        let mut r = req(id, true, 10);
        r.will = Some(Will {
            message: Message::new(format!("wills/{id}"), id, QoS::AtLeastOnce, false),
            delay_secs: delay,
        });
        let c = broker.connect(r).await.unwrap();
        broker
            .disconnect(&c.session, DisconnectRequest::ABNORMAL)
            .await
            .unwrap();
    }
    // A normal disconnect discards the will.
    let mut r = req("polite", true, 10);
    r.will = Some(Will {
        message: Message::new("wills/polite", "polite", QoS::AtLeastOnce, false),
        delay_secs: 0,
    });
    let c = broker.connect(r).await.unwrap();
    broker
        .disconnect(
            &c.session,
            DisconnectRequest {
                normal: true,
                with_will: false,
                session_expiry_secs: None,
            },
        )
        .await
        .unwrap();
    let d = next_delivery(&mut watcher.events).await;
    assert_eq!(payload(&d), "quick");
    // The delayed one fires after about a second (ticks every 50 ms).
    let d = next_delivery(&mut watcher.events).await;
    assert_eq!(payload(&d), "slow");
    broker
        .ack(&watcher.session, AckKind::PubAck, 1)
        .await
        .unwrap();
    broker
        .ack(&watcher.session, AckKind::PubAck, 2)
        .await
        .unwrap();
    nothing_more(&mut watcher.events).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn will_on_abnormal_disconnect_one_partition() {
    will_on_abnormal_disconnect(1).await;
}

#[tokio::test]
async fn will_on_abnormal_disconnect_four_partitions() {
    will_on_abnormal_disconnect(4).await;
}

#[tokio::test]
async fn sessions_attached_at_shutdown_are_disconnected_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let broker = open(dir.path(), 1).await;
        let mut r = req("crashy", false, 10);
        r.will = Some(Will {
            message: Message::new("wills/crashy", "w", QoS::AtLeastOnce, true),
            delay_secs: 0,
        });
        let _c = broker.connect(r).await.unwrap();
        broker.shutdown().await;
    }
    let broker = open(dir.path(), 1).await;
    // The will is published (retained here, so a late subscriber can see it).
    let mut w = broker.connect(req("w", true, 10)).await.unwrap();
    let mut found = false;
    for _ in 0..50 {
        broker
            .subscribe(&w.session, vec![sub("wills/#", QoS::AtLeastOnce)])
            .await
            .unwrap();
        if let Ok(Some(SessionEvent::Deliver(d))) =
            tokio::time::timeout(Duration::from_millis(100), w.events.recv()).await
        {
            assert_eq!(d.message.topic, "wills/crashy");
            found = true;
            break;
        }
    }
    assert!(
        found,
        "the will of the connection lost at shutdown never fired"
    );
    let c = broker.connect(req("crashy", false, 10)).await.unwrap();
    assert!(c.session_present);
    broker.shutdown().await;
}

/// `SessionLimits::queue_qos0_offline` must queue QoS0 messages for offline persistent
/// sessions: with the option on, `LocalBroker` logs QoS0 publishes instead of only handing
/// them to online subscribers.
#[tokio::test]
async fn qos0_queued_for_offline_session_when_enabled() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(1);
    cfg.limits.queue_qos0_offline = true;
    let broker = LocalBroker::open(dir.path(), cfg).unwrap();
    let s = broker.connect(req("sub", false, 10)).await.unwrap();
    broker
        .subscribe(&s.session, vec![sub("z", QoS::AtMostOnce)])
        .await
        .unwrap();
    broker
        .disconnect(&s.session, DisconnectRequest::ABNORMAL)
        .await
        .unwrap();
    let p = broker.connect(req("pub", true, 10)).await.unwrap();
    broker
        .publish(
            &p.session,
            Message::new("z", "q0", QoS::AtMostOnce, false),
            None,
        )
        .await
        .unwrap();
    let mut s = broker.connect(req("sub", false, 10)).await.unwrap();
    assert!(s.session_present);
    assert_eq!(payload(&next_delivery(&mut s.events).await), "q0");
    broker.shutdown().await;
}

/// Bug 3 (issue 19): the subscriber's PUBREC must be durable before PUBREL goes out. If it
/// were lost in a crash, the session would re-send PUBLISH (DUP) with the same id after the
/// client completed PUBREL/PUBCOMP and forgot it: a second delivery. So the future of a
/// PUBREC ack resolves only once it is applied and flushed, and a reconnect then gets PUBREL.
#[tokio::test]
async fn pubrec_ack_resolves_only_when_durable() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path(), 1).await;
    let mut s = broker.connect(req("sub", false, 10)).await.unwrap();
    broker
        .subscribe(&s.session, vec![sub("q", QoS::ExactlyOnce)])
        .await
        .unwrap();
    let p = broker.connect(req("pub", true, 10)).await.unwrap();
    let m = Message::new("q", "once", QoS::ExactlyOnce, false);
    broker.publish(&p.session, m, None).await.unwrap();
    let d = next_delivery(&mut s.events).await;
    let pid = d.packet_id.unwrap();
    let flushes = || {
        broker
            .stats()
            .flushes
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = flushes();
    broker.ack(&s.session, AckKind::PubRec, pid).await.unwrap();
    assert!(
        flushes() > before,
        "the PUBREC ack resolved before it was flushed"
    );
    // Applied too: the next connection gets PUBREL for it, not the PUBLISH again.
    let mut again = broker.connect(req("sub", false, 10)).await.unwrap();
    assert_eq!(
        next_event(&mut again.events).await,
        SessionEvent::Release { packet_id: pid }
    );
    // A PUBREC for a session taken over fails (so no PUBREL is sent on the old connection).
    assert_eq!(
        broker.ack(&s.session, AckKind::PubRec, pid).await,
        Err(ServiceError::SessionTakenOver)
    );
    broker.shutdown().await;
}

/// Client ids whose sessions live in different partitions of `partitions`.
fn ids_in_different_partitions(partitions: u32) -> (String, String) {
    let a = "pub-0".to_string();
    let b = (0..)
        .map(|i| format!("sub-{i}"))
        .find(|b| partition_of(b, partitions) != partition_of(&a, partitions))
        .unwrap();
    (a, b)
}

/// Bug 11 (issue 19): with several partitions, the second stage of an inbound QoS2 publish
/// (after the home partition's duplicate check) ran in the connection's future. A connection
/// lost in between left the message undelivered and its id unrecorded (a re-send that had
/// reached some partitions was delivered twice there), and the client's later publishes
/// overtook it.
#[tokio::test]
async fn inbound_qos2_second_stage_survives_the_connection_and_keeps_order() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open(dir.path(), 4).await;
    let (publisher, subscriber) = ids_in_different_partitions(4);
    let mut s = broker.connect(req(&subscriber, true, 100)).await.unwrap();
    broker
        .subscribe(&s.session, vec![sub("o/#", QoS::ExactlyOnce)])
        .await
        .unwrap();
    let p = broker.connect(req(&publisher, true, 100)).await.unwrap();
    // Order: a QoS2 message, then QoS1 and QoS0 ones, pipelined as a connection sends them.
    let first = broker.publish(
        &p.session,
        Message::new("o/1", "qos2", QoS::ExactlyOnce, false),
        Some(1),
    );
    let second = broker.publish(
        &p.session,
        Message::new("o/2", "qos1", QoS::AtLeastOnce, false),
        None,
    );
    let third = broker.publish(
        &p.session,
        Message::new("o/3", "qos0", QoS::AtMostOnce, false),
        None,
    );
    let (a, b, c) = tokio::join!(first, second, third);
    assert!(!a.unwrap().duplicate && b.is_ok() && c.is_ok());
    let got: Vec<String> = [
        next_delivery(&mut s.events).await,
        next_delivery(&mut s.events).await,
        next_delivery(&mut s.events).await,
    ]
    .iter()
    .map(payload)
    .collect();
    assert_eq!(
        got,
        vec!["qos2", "qos1", "qos0"],
        "a later publish overtook QoS2"
    );
    // The connection goes away right after sending (its future is dropped unpolled): the
    // message is still delivered and its id recorded.
    drop(broker.publish(
        &p.session,
        Message::new("o/4", "dropped", QoS::ExactlyOnce, false),
        Some(2),
    ));
    let d = next_delivery(&mut s.events).await;
    assert_eq!(payload(&d), "dropped");
    let again = broker
        .publish(
            &p.session,
            Message::new("o/4", "dropped", QoS::ExactlyOnce, false),
            Some(2),
        )
        .await
        .unwrap();
    assert!(
        again.duplicate,
        "the id of the first attempt was not recorded"
    );
    nothing_more(&mut s.events).await;
    broker.shutdown().await;
}

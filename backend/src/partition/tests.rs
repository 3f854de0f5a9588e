//! Unit tests of the partition state machine: one test per rule, driven through a small
//! harness that applies commands with a growing log index and a controllable clock.

use std::sync::Arc;

use proptest::prelude::*;
use tiermq_common::session_api::{
    Delivery, SessionEvent, SubscribeRequest, SubscriptionOptions, Will,
};
use tiermq_common::{Message, ProtocolVersion, QoS, ReasonCode};

use super::command::{AckCmd, Command, Effect, Entry, Reply, RetainedForSubscription, SharedWork};
use super::session::{InflightState, SessionLimits};
use super::{Partition, PartitionImage};

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

const T0: u64 = 1_000_000;

struct H {
    p: Partition,
    index: u64,
    now: u64,
}

#[derive(Clone)]
struct Conn {
    clean_start: bool,
    expiry: u32,
    receive_maximum: u16,
    will: Option<Will>,
    frontend_id: u64,
    protocol: ProtocolVersion,
    connection: u64,
}

impl Default for Conn {
    fn default() -> Self {
        Conn {
            clean_start: false,
            expiry: 3600,
            receive_maximum: 10,
            will: None,
            frontend_id: 0,
            protocol: ProtocolVersion::V5,
            connection: 0,
        }
    }
}

fn conn() -> Conn {
    Conn::default()
}

impl Conn {
    fn clean(mut self, c: bool) -> Self {
        self.clean_start = c;
        self
    }
    fn expiry(mut self, e: u32) -> Self {
        self.expiry = e;
        self
    }
    fn recv_max(mut self, r: u16) -> Self {
        self.receive_maximum = r;
        self
    }
    fn will(mut self, topic: &str, delay_secs: u32) -> Self {
        self.will = Some(Will {
            message: Message::new(topic, "gone", QoS::AtLeastOnce, false),
            delay_secs,
        });
        self
    }
    fn frontend(mut self, f: u64) -> Self {
        self.frontend_id = f;
        self
    }
    fn connection(mut self, n: u64) -> Self {
        self.connection = n;
        self
    }
    fn v311(mut self) -> Self {
        self.protocol = ProtocolVersion::V311;
        self
    }
}

impl H {
    fn new() -> Self {
        H::with_limits(SessionLimits::default())
    }

    fn with_limits(limits: SessionLimits) -> Self {
        H {
            p: Partition::new(limits),
            index: 0,
            now: T0,
        }
    }

    fn apply(&mut self, command: Command) -> (Reply, Vec<Effect>) {
        self.index += 1;
        self.p.apply(
            self.index,
            Entry {
                now_ms: self.now,
                command,
            },
        )
    }

    fn advance_secs(&mut self, s: u64) {
        self.now += s * 1000;
    }

    fn connect(&mut self, id: &str, c: Conn) -> (u64, bool, Vec<Effect>) {
        let (r, e) = self.apply(Command::Connect {
            client_id: id.into(),
            protocol: c.protocol,
            clean_start: c.clean_start,
            session_expiry_secs: c.expiry,
            receive_maximum: c.receive_maximum,
            will: c.will,
            frontend_id: c.frontend_id,
            connection: c.connection,
        });
        match r {
            Reply::Connected {
                epoch,
                session_present,
            } => (epoch, session_present, e),
            other => panic!("connect: {other:?}"),
        }
    }

    /// Connects and returns the epoch only.
    fn online(&mut self, id: &str) -> u64 {
        self.connect(id, conn()).0
    }

    fn disconnect(
        &mut self,
        id: &str,
        epoch: u64,
        normal: bool,
        with_will: bool,
        expiry: Option<u32>,
    ) -> (Reply, Vec<Effect>) {
        self.apply(Command::Disconnect {
            client_id: id.into(),
            epoch,
            normal,
            with_will,
            session_expiry_secs: expiry,
        })
    }

    fn drop_conn(&mut self, id: &str, epoch: u64) -> Vec<Effect> {
        let (r, e) = self.disconnect(id, epoch, false, false, None);
        assert_eq!(r, Reply::Done);
        e
    }

    fn subscribe_reqs(
        &mut self,
        id: &str,
        epoch: u64,
        subs: Vec<SubscribeRequest>,
    ) -> (Vec<ReasonCode>, Vec<Effect>) {
        let (r, e) = self.apply(Command::Subscribe {
            client_id: id.into(),
            epoch,
            subscriptions: subs,
        });
        match r {
            Reply::Subscribed { reason_codes, .. } => (reason_codes, e),
            other => panic!("subscribe: {other:?}"),
        }
    }

    fn subscribe(&mut self, id: &str, epoch: u64, filter: &str, qos: QoS) -> Vec<Effect> {
        let (codes, e) = self.subscribe_reqs(id, epoch, vec![sub(filter, qos)]);
        assert_eq!(codes, vec![ReasonCode(qos.as_u8())]);
        e
    }

    fn unsubscribe(
        &mut self,
        id: &str,
        epoch: u64,
        filters: &[&str],
    ) -> (Vec<ReasonCode>, Vec<Effect>) {
        let (r, e) = self.apply(Command::Unsubscribe {
            client_id: id.into(),
            epoch,
            filters: filters.iter().map(|f| f.to_string()).collect(),
        });
        match r {
            Reply::Unsubscribed(codes) => (codes, e),
            other => panic!("unsubscribe: {other:?}"),
        }
    }

    fn publish_msg(&mut self, m: Message, publisher: Option<&str>) -> (bool, Vec<Effect>) {
        let store_retained = m.retain;
        let (r, e) = self.apply(Command::Publish {
            message: Arc::new(m),
            publisher: publisher.map(Arc::from),
            store_retained,
            inbound_qos2: None,
        });
        match r {
            Reply::Published { matched, .. } => (matched, e),
            other => panic!("publish: {other:?}"),
        }
    }

    fn publish(&mut self, topic: &str, payload: &str, qos: QoS) -> Vec<Effect> {
        self.publish_msg(Message::new(topic, payload.to_string(), qos, false), None)
            .1
    }

    fn retain(&mut self, topic: &str, payload: &str, qos: QoS) -> Vec<Effect> {
        self.publish_msg(Message::new(topic, payload.to_string(), qos, true), None)
            .1
    }

    fn ack(&mut self, id: &str, epoch: u64, kind: AckCmd, packet_id: u16) -> Vec<Effect> {
        let (r, e) = self.apply(Command::Ack {
            client_id: id.into(),
            epoch,
            kind,
            packet_id,
        });
        assert!(matches!(r, Reply::Acked { .. }), "{r:?}");
        e
    }

    fn tick(&mut self) -> Vec<Effect> {
        let (r, e) = self.apply(Command::Tick);
        assert_eq!(r, Reply::Done);
        e
    }

    fn inflight_ids(&self, id: &str) -> Vec<u16> {
        self.p
            .session(id)
            .unwrap()
            .inflight
            .iter()
            .map(|i| i.packet_id)
            .collect()
    }

    fn queued(&self, id: &str) -> usize {
        self.p.session(id).unwrap().queue.len()
    }
}

fn sub(filter: &str, qos: QoS) -> SubscribeRequest {
    SubscribeRequest {
        filter: filter.to_string(),
        options: SubscriptionOptions {
            qos,
            ..Default::default()
        },
        subscription_id: None,
    }
}

fn sub_with(filter: &str, options: SubscriptionOptions, id: Option<u32>) -> SubscribeRequest {
    SubscribeRequest {
        filter: filter.to_string(),
        options,
        subscription_id: id,
    }
}

fn opts(qos: QoS) -> SubscriptionOptions {
    SubscriptionOptions {
        qos,
        ..Default::default()
    }
}

/// Deliveries sent to `id` (any epoch).
fn deliveries(effects: &[Effect], id: &str) -> Vec<Delivery> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send {
                client_id,
                event: SessionEvent::Deliver(d),
                ..
            } if &**client_id == id => Some(d.clone()),
            _ => None,
        })
        .collect()
}

fn payloads(ds: &[Delivery]) -> Vec<String> {
    ds.iter()
        .map(|d| String::from_utf8(d.message.payload.to_vec()).unwrap())
        .collect()
}

fn wills(effects: &[Effect]) -> Vec<Message> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Shared(SharedWork::Will { message, .. }) => Some((**message).clone()),
            _ => None,
        })
        .collect()
}

fn routes_added(effects: &[Effect]) -> Vec<String> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::RouteAdded { filter } => Some(filter.clone()),
            _ => None,
        })
        .collect()
}

fn routes_removed(effects: &[Effect]) -> Vec<String> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::RouteRemoved { filter } => Some(filter.clone()),
            _ => None,
        })
        .collect()
}

fn expiring(topic: &str, payload: &str, qos: QoS, retain: bool, secs: u32, now: u64) -> Message {
    let mut m = Message::new(topic, payload.to_string(), qos, retain);
    m.properties.message_expiry_interval = Some(secs);
    m.stamp_expiry(now);
    m
}

// ---------------------------------------------------------------------------------------------
// Connect, session present, clean start
// ---------------------------------------------------------------------------------------------

#[test]
fn connect_new_session_is_not_present() {
    let mut h = H::new();
    let (epoch, present, effects) = h.connect("a", conn());
    assert_eq!(epoch, 1, "the epoch is the log index");
    assert!(!present);
    assert!(effects.is_empty());
    assert_eq!(h.p.session_count(), 1);
}

#[test]
fn reconnect_without_clean_start_resumes_session() {
    let mut h = H::new();
    let e1 = h.online("a");
    h.subscribe("a", e1, "t", QoS::AtLeastOnce);
    h.drop_conn("a", e1);
    let (e2, present, _) = h.connect("a", conn());
    assert!(present);
    assert!(e2 > e1);
    assert!(h.p.session("a").unwrap().subscriptions.contains_key("t"));
}

#[test]
fn clean_start_discards_subscriptions_and_queue() {
    let mut h = H::new();
    let e1 = h.online("a");
    h.subscribe("a", e1, "t", QoS::AtLeastOnce);
    h.drop_conn("a", e1);
    h.publish("t", "m1", QoS::AtLeastOnce);
    assert_eq!(h.queued("a"), 1);
    let (_, present, effects) = h.connect("a", conn().clean(true));
    assert!(!present);
    assert!(deliveries(&effects, "a").is_empty());
    assert_eq!(routes_removed(&effects), vec!["t".to_string()]);
    let s = h.p.session("a").unwrap();
    assert!(s.subscriptions.is_empty());
    assert!(s.queue.is_empty() && s.inflight.is_empty());
    assert_eq!(h.p.subscription_count(), 0);
    // Nothing matches any more.
    let (matched, _) = h.publish_msg(Message::new("t", "x", QoS::AtLeastOnce, false), None);
    assert!(!matched);
}

#[test]
fn reconnect_after_expiry_but_before_tick_is_a_new_session() {
    let mut h = H::new();
    let e1 = h.connect("a", conn().expiry(10)).0;
    h.subscribe("a", e1, "t", QoS::AtLeastOnce);
    h.drop_conn("a", e1);
    h.advance_secs(11);
    // No Tick in between: the session has expired all the same.
    let (_, present, effects) = h.connect("a", conn());
    assert!(!present);
    assert_eq!(routes_removed(&effects), vec!["t".to_string()]);
    assert!(h.p.session("a").unwrap().subscriptions.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Takeover
// ---------------------------------------------------------------------------------------------

#[test]
fn takeover_disconnects_old_epoch_and_fences_it() {
    let mut h = H::new();
    let e1 = h.online("a");
    let (e2, present, effects) = h.connect("a", conn());
    assert!(present);
    assert!(effects.contains(&Effect::Send {
        client_id: "a".into(),
        epoch: e1,
        event: SessionEvent::Disconnect {
            reason: ReasonCode::SESSION_TAKEN_OVER
        },
    }));
    // Every later command of the old epoch is fenced.
    let r = h.apply(Command::Subscribe {
        client_id: "a".into(),
        epoch: e1,
        subscriptions: vec![sub("t", QoS::AtMostOnce)],
    });
    assert_eq!(r.0, Reply::Fenced);
    assert_eq!(h.disconnect("a", e1, true, false, None).0, Reply::Fenced);
    assert_eq!(h.ack("a", e2, AckCmd::PubAck, 1), vec![]);
    let r = h.apply(Command::Ack {
        client_id: "a".into(),
        epoch: e1,
        kind: AckCmd::PubAck,
        packet_id: 1,
    });
    assert_eq!(r.0, Reply::Fenced);
    let r = h.apply(Command::Qos2Received {
        client_id: "a".into(),
        epoch: e1,
        packet_id: 1,
    });
    assert_eq!(r.0, Reply::Fenced);
    let r = h.apply(Command::Unsubscribe {
        client_id: "a".into(),
        epoch: e1,
        filters: vec!["t".into()],
    });
    assert_eq!(r.0, Reply::Fenced);
    // The new epoch is still attached.
    assert_eq!(h.p.session("a").unwrap().epoch(), Some(e2));
    // Unknown client.
    let r = h.apply(Command::Qos2Release {
        client_id: "zz".into(),
        epoch: 1,
        packet_id: 1,
    });
    assert_eq!(r.0, Reply::NoSession);
}

#[test]
fn takeover_publishes_will_without_delay() {
    let mut h = H::new();
    h.connect("a", conn().will("w/a", 0));
    let (_, _, effects) = h.connect("a", conn());
    assert_eq!(wills(&effects).len(), 1);
    assert_eq!(wills(&effects)[0].topic, "w/a");
}

/// Found by the simulation (seeds 2, 60, 76, 132): the cluster client re-sends a CONNECT whose
/// answer was lost, and the partition applied both copies. It took the second for a new
/// connection taking over the first and published the will of a client that never lost its
/// connection (and again when that connection really ended). A re-sent copy — same frontend,
/// same connection number — is answered as the first, with no effect.
#[test]
fn a_resent_connect_is_answered_as_the_first_and_fires_no_will() {
    let mut h = H::new();
    h.online("b");
    let first = conn().will("w/a", 0).frontend(4).connection(17);
    let (epoch, present, _) = h.connect("a", first.clone());
    assert!(!present);
    let (again, present, effects) = h.connect("a", first);
    assert_eq!((again, present), (epoch, false));
    assert!(effects.is_empty(), "{effects:?}");
    // The connection is still the attached one: its PUBACKs and DISCONNECT are taken.
    let effects = h.drop_conn("a", epoch);
    assert_eq!(
        wills(&effects).len(),
        1,
        "the will fires once, at the real end"
    );
    // Another connection number of the same frontend is a new connection: a takeover.
    let (e1, _, _) = h.connect("c", conn().will("w/c", 0).frontend(4).connection(18));
    let (e2, present, effects) = h.connect("c", conn().frontend(4).connection(19));
    assert!(e2 > e1 && present);
    assert_eq!(wills(&effects).len(), 1);
}

/// Issue 20 item 1 across frontends: the client sends DISCONNECT 0x00 through frontend 1 and
/// reconnects at once through frontend 2, whose CONNECT reaches the partition first. The will
/// is held; frontend 1's late report of the normal DISCONNECT discards it.
#[test]
fn takeover_from_another_frontend_holds_the_will_for_the_old_connections_report() {
    let mut h = H::new();
    let e1 = h.connect("a", conn().will("w/a", 0).frontend(1)).0;
    let (_, _, fx) = h.connect("a", conn().frontend(2));
    assert!(wills(&fx).is_empty(), "will fired at the takeover");
    let (r, fx) = h.disconnect("a", e1, true, false, None);
    assert_eq!(r, Reply::Fenced);
    assert!(wills(&fx).is_empty());
    h.advance_secs(10);
    assert!(wills(&h.tick()).is_empty(), "a discarded will fired later");
}

/// Without the old connection's report (its frontend died, or the connection broke), the held
/// will fires after the grace; an abnormal late report fires it at once.
#[test]
fn a_held_will_fires_after_the_grace_or_on_an_abnormal_report() {
    let mut h = H::new();
    h.connect("a", conn().will("w/a", 0).frontend(1));
    h.connect("a", conn().frontend(2));
    assert!(wills(&h.tick()).is_empty());
    // Restored from an image, the timer is still there.
    let image = h.p.image();
    h.p = Partition::restore(SessionLimits::default(), roundtrip(image));
    h.now += super::TAKEOVER_WILL_GRACE_MS;
    assert_eq!(wills(&h.tick()).len(), 1);
    assert!(wills(&h.tick()).is_empty());

    let e1 = h.connect("b", conn().will("w/b", 0).frontend(1)).0;
    h.connect("b", conn().frontend(2));
    let (_, fx) = h.disconnect("b", e1, false, false, None);
    assert_eq!(wills(&fx).len(), 1);
    h.now += super::TAKEOVER_WILL_GRACE_MS;
    assert!(wills(&h.tick()).is_empty(), "fired twice");

    // On the same frontend the handler orders the two already: the will goes at once.
    h.connect("c", conn().will("w/c", 0).frontend(1));
    let (_, _, fx) = h.connect("c", conn().frontend(1));
    assert_eq!(wills(&fx).len(), 1);
}

/// Issue 19 §2, wills exactly once: a will that fires is recorded in the entry that fires it
/// (an outbox), stays in the state — snapshots and checkpoints included — until the runtime
/// confirms it published it, and is handed out again to a runtime that starts or a new leader.
/// Its publication carries one idempotency key, so doing it twice delivers it once.
#[test]
fn a_fired_will_stays_recorded_until_confirmed_and_is_delivered_once() {
    let mut h = H::new();
    let w = h.online("w");
    h.subscribe("w", w, "w/a", QoS::AtLeastOnce);
    h.connect("a", conn().will("w/a", 0));
    let a = h.p.session("a").unwrap().epoch().unwrap();
    let (_, fx) = h.disconnect("a", a, false, false, None);
    let Some(Effect::Shared(SharedWork::Will {
        seq,
        client_id,
        message,
    })) = fx
        .iter()
        .find(|e| matches!(e, Effect::Shared(SharedWork::Will { .. })))
        .cloned()
    else {
        panic!("no will work: {fx:?}");
    };
    assert_eq!(&*client_id, "a");
    // Still owed after a restore (a crash before the confirmation).
    h.p = Partition::restore(SessionLimits::default(), roundtrip(h.p.image()));
    assert!(h
        .p
        .shared_work()
        .iter()
        .any(|w| matches!(w, SharedWork::Will { seq: s, .. } if *s == seq)));
    // Published twice (before and after the crash): delivered once.
    let publish = || Command::Publish {
        message: message.clone(),
        publisher: None,
        store_retained: false,
        inbound_qos2: Some(tiermq_common::partition_api::will_key("a", seq)),
    };
    h.apply(publish());
    let (r, _) = h.apply(publish());
    assert!(
        matches!(
            r,
            Reply::Published {
                duplicate: true,
                ..
            }
        ),
        "{r:?}"
    );
    assert_eq!(h.queued("w") + h.p.session("w").unwrap().inflight.len(), 1);
    h.apply(Command::WillPublished { seq });
    assert!(h.p.shared_work().is_empty());
}

#[test]
fn takeover_with_clean_start_publishes_delayed_will() {
    let mut h = H::new();
    h.connect("a", conn().will("w/a", 30));
    let (_, present, effects) = h.connect("a", conn().clean(true));
    assert!(!present);
    assert_eq!(wills(&effects).len(), 1);
}

#[test]
fn takeover_resuming_session_suppresses_delayed_will() {
    let mut h = H::new();
    h.connect("a", conn().will("w/a", 30));
    let (_, present, effects) = h.connect("a", conn());
    assert!(present);
    assert!(wills(&effects).is_empty());
    // And it does not fire later either.
    h.advance_secs(60);
    assert!(wills(&h.tick()).is_empty());
}

#[test]
fn takeover_of_session_with_expiry_zero_is_not_resumed() {
    // §3.1.2.11.2: expiry 0 ends the session when the network connection closes; the
    // takeover closes it, so the new connection finds no session.
    let mut h = H::new();
    let e1 = h.connect("a", conn().expiry(0).will("w/a", 30)).0;
    h.subscribe("a", e1, "t", QoS::AtLeastOnce);
    let (_, present, effects) = h.connect("a", conn());
    assert!(!present);
    assert_eq!(
        wills(&effects).len(),
        1,
        "the session ended, so its will fires"
    );
    assert!(h.p.session("a").unwrap().subscriptions.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Subscribe / unsubscribe
// ---------------------------------------------------------------------------------------------

#[test]
fn subscribe_reason_codes() {
    let mut h = H::new();
    let e = h.online("a");
    let (codes, _) = h.subscribe_reqs(
        "a",
        e,
        vec![
            sub("a/0", QoS::AtMostOnce),
            sub("a/1", QoS::AtLeastOnce),
            sub("a/2", QoS::ExactlyOnce),
            sub("a/#/b", QoS::AtLeastOnce),
            sub("a+", QoS::AtLeastOnce),
            sub("", QoS::AtLeastOnce),
            sub("$share/g/a/b", QoS::AtLeastOnce),
            sub("$share//a", QoS::AtLeastOnce),
        ],
    );
    assert_eq!(
        codes,
        vec![
            ReasonCode::GRANTED_QOS_0,
            ReasonCode::GRANTED_QOS_1,
            ReasonCode::GRANTED_QOS_2,
            ReasonCode::TOPIC_FILTER_INVALID,
            ReasonCode::TOPIC_FILTER_INVALID,
            ReasonCode::TOPIC_FILTER_INVALID,
            ReasonCode::GRANTED_QOS_1,
            ReasonCode::TOPIC_FILTER_INVALID,
        ]
    );
    assert_eq!(h.p.session("a").unwrap().subscriptions.len(), 4);
}

#[test]
fn subscribe_quota() {
    let mut h = H::with_limits(SessionLimits {
        max_subscriptions: 2,
        ..Default::default()
    });
    let e = h.online("a");
    let (codes, _) = h.subscribe_reqs(
        "a",
        e,
        vec![
            sub("x", QoS::AtLeastOnce),
            sub("y", QoS::AtLeastOnce),
            sub("z", QoS::AtLeastOnce),
            // Replacing an existing subscription does not count against the limit.
            sub("x", QoS::ExactlyOnce),
        ],
    );
    assert_eq!(
        codes,
        vec![
            ReasonCode::GRANTED_QOS_1,
            ReasonCode::GRANTED_QOS_1,
            ReasonCode::QUOTA_EXCEEDED,
            ReasonCode::GRANTED_QOS_2,
        ]
    );
    assert_eq!(
        h.p.session("a").unwrap().subscriptions["x"].options.qos,
        QoS::ExactlyOnce
    );
}

#[test]
fn unsubscribe_reason_codes() {
    let mut h = H::new();
    let e = h.online("a");
    h.subscribe("a", e, "t/+", QoS::AtLeastOnce);
    let (codes, _) = h.unsubscribe("a", e, &["t/+", "t/+", "nope", "$share/g/t/+", "a/#/b"]);
    assert_eq!(
        codes,
        vec![
            ReasonCode::SUCCESS,
            ReasonCode::NO_SUBSCRIPTION_EXISTED,
            ReasonCode::NO_SUBSCRIPTION_EXISTED,
            ReasonCode::NO_SUBSCRIPTION_EXISTED,
            ReasonCode::TOPIC_FILTER_INVALID,
        ]
    );
    assert!(h.publish("t/1", "x", QoS::AtLeastOnce).is_empty());
}

#[test]
fn routes_change_only_on_first_and_last_subscriber() {
    let mut h = H::new();
    let a = h.online("a");
    let b = h.online("b");
    assert_eq!(
        routes_added(&h.subscribe("a", a, "t/#", QoS::AtMostOnce)),
        vec!["t/#"]
    );
    assert!(routes_added(&h.subscribe("b", b, "t/#", QoS::AtMostOnce)).is_empty());
    // Re-subscribing the same filter adds no route either.
    assert!(routes_added(&h.subscribe("a", a, "t/#", QoS::AtLeastOnce)).is_empty());
    assert_eq!(h.p.filters(), vec!["t/#".to_string()]);
    let (_, e) = h.unsubscribe("a", a, &["t/#"]);
    assert!(routes_removed(&e).is_empty());
    let (_, e) = h.unsubscribe("b", b, &["t/#"]);
    assert_eq!(routes_removed(&e), vec!["t/#"]);
    assert!(h.p.filters().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Publish and delivery
// ---------------------------------------------------------------------------------------------

#[test]
fn qos0_goes_to_online_subscribers_only_without_state_change() {
    let mut h = H::new();
    let a = h.online("a");
    h.subscribe("a", a, "t", QoS::AtLeastOnce);
    let b = h.online("b");
    h.subscribe("b", b, "t", QoS::AtLeastOnce);
    h.drop_conn("b", b);
    let before = image_bytes(&h.p);
    let m = Arc::new(Message::new("t", "q0", QoS::AtMostOnce, false));
    let (matched, effects) = h.p.deliver_qos0(&m, None, h.now);
    assert!(matched);
    let da = deliveries(&effects, "a");
    assert_eq!(da.len(), 1);
    assert_eq!(da[0].packet_id, None);
    assert_eq!(da[0].qos, QoS::AtMostOnce);
    assert!(deliveries(&effects, "b").is_empty());
    assert_eq!(image_bytes(&h.p), before);
    // Through the log, an offline session does not queue QoS0 by default either.
    let effects = h.publish("t", "q0", QoS::AtMostOnce);
    assert_eq!(deliveries(&effects, "a").len(), 1);
    assert_eq!(h.queued("b"), 0);
}

#[test]
fn qos1_queued_offline_and_delivered_in_order_after_reconnect() {
    let mut h = H::new();
    let a = h.online("a");
    h.subscribe("a", a, "t", QoS::AtLeastOnce);
    h.drop_conn("a", a);
    for i in 0..5 {
        assert!(h
            .publish("t", &format!("m{i}"), QoS::AtLeastOnce)
            .is_empty());
    }
    assert_eq!(h.queued("a"), 5);
    let (a2, present, effects) = h.connect("a", conn());
    assert!(present);
    let ds = deliveries(&effects, "a");
    assert_eq!(payloads(&ds), vec!["m0", "m1", "m2", "m3", "m4"]);
    assert!(ds.iter().all(|d| !d.dup && d.qos == QoS::AtLeastOnce));
    assert_eq!(
        ds.iter().map(|d| d.packet_id.unwrap()).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert!(effects
        .iter()
        .all(|e| matches!(e, Effect::Send { epoch, .. } if *epoch == a2)));
}

#[test]
fn inflight_window_honours_receive_maximum() {
    let mut h = H::new();
    let a = h.connect("a", conn().recv_max(2)).0;
    h.subscribe("a", a, "t", QoS::AtLeastOnce);
    let mut sent = Vec::new();
    for i in 0..4 {
        sent.extend(deliveries(
            &h.publish("t", &format!("m{i}"), QoS::AtLeastOnce),
            "a",
        ));
    }
    assert_eq!(payloads(&sent), vec!["m0", "m1"]);
    assert_eq!(h.queued("a"), 2);
    // PUBACK frees a slot: the next one goes out.
    let ds = deliveries(
        &h.ack("a", a, AckCmd::PubAck, sent[0].packet_id.unwrap()),
        "a",
    );
    assert_eq!(payloads(&ds), vec!["m2"]);
    assert_eq!(h.inflight_ids("a").len(), 2);
    // A duplicate PUBACK does nothing.
    assert!(h
        .ack("a", a, AckCmd::PubAck, sent[0].packet_id.unwrap())
        .is_empty());
    let ds = deliveries(
        &h.ack("a", a, AckCmd::PubAck, sent[1].packet_id.unwrap()),
        "a",
    );
    assert_eq!(payloads(&ds), vec!["m3"]);
    assert_eq!(h.queued("a"), 0);
}

#[test]
fn packet_ids_wrap_and_skip_ids_in_flight() {
    let mut h = H::new();
    let a = h.connect("a", conn().recv_max(3)).0;
    h.subscribe("a", a, "t", QoS::AtLeastOnce);
    // Message with id 1 stays in flight; then jump the counter close to the end.
    let d1 = deliveries(&h.publish("t", "first", QoS::AtLeastOnce), "a");
    assert_eq!(d1[0].packet_id, Some(1));
    h.p.sessions.get_mut("a").unwrap().next_packet_id = 65535;
    let d = deliveries(&h.publish("t", "x", QoS::AtLeastOnce), "a");
    assert_eq!(d[0].packet_id, Some(65535));
    let d = deliveries(&h.publish("t", "y", QoS::AtLeastOnce), "a");
    assert_eq!(
        d[0].packet_id,
        Some(2),
        "wraps to 1, which is in flight, so 2"
    );
    assert_eq!(h.inflight_ids("a"), vec![1, 65535, 2]);
    // Ids stay unique.
    h.ack("a", a, AckCmd::PubAck, 65535);
    let d = deliveries(&h.publish("t", "z", QoS::AtLeastOnce), "a");
    assert_eq!(d[0].packet_id, Some(3));
}

#[test]
fn packet_ids_never_zero_and_unique() {
    let mut h = H::new();
    let a = h.connect("a", conn().recv_max(100)).0;
    h.subscribe("a", a, "t", QoS::AtLeastOnce);
    h.p.sessions.get_mut("a").unwrap().next_packet_id = 65500;
    for i in 0..100 {
        h.publish("t", &format!("{i}"), QoS::AtLeastOnce);
    }
    let mut ids = h.inflight_ids("a");
    assert!(!ids.contains(&0));
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 100);
}

#[test]
fn granted_qos_is_minimum_of_message_and_subscription() {
    let mut h = H::new();
    let a = h.online("a");
    h.subscribe("a", a, "q1", QoS::AtLeastOnce);
    h.subscribe("a", a, "q0", QoS::AtMostOnce);
    let d = deliveries(&h.publish("q1", "x", QoS::ExactlyOnce), "a");
    assert_eq!(d[0].qos, QoS::AtLeastOnce);
    let d = deliveries(&h.publish("q0", "x", QoS::ExactlyOnce), "a");
    assert_eq!(d[0].qos, QoS::AtMostOnce);
    assert_eq!(d[0].packet_id, None);
    let d = deliveries(&h.publish("q1", "x", QoS::AtMostOnce), "a");
    assert_eq!(d[0].qos, QoS::AtMostOnce);
}

#[test]
fn overlapping_subscriptions_deliver_once_with_max_qos_and_all_ids() {
    let mut h = H::new();
    let a = h.online("a");
    h.subscribe_reqs(
        "a",
        a,
        vec![
            sub_with("t/+", opts(QoS::AtMostOnce), Some(7)),
            sub_with("t/#", opts(QoS::ExactlyOnce), Some(3)),
            sub_with("t/x", opts(QoS::AtLeastOnce), None),
            sub_with("#", opts(QoS::AtMostOnce), Some(5)),
        ],
    );
    let d = deliveries(&h.publish("t/x", "x", QoS::ExactlyOnce), "a");
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].qos, QoS::ExactlyOnce);
    assert_eq!(
        d[0].subscription_ids,
        vec![3, 5, 7],
        "sorted, deterministic"
    );
}

#[test]
fn no_local_skips_the_publisher() {
    let mut h = H::new();
    let a = h.online("a");
    let b = h.online("b");
    let nl = SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        no_local: true,
        ..Default::default()
    };
    h.subscribe_reqs("a", a, vec![sub_with("t", nl, None)]);
    h.subscribe("b", b, "t", QoS::AtLeastOnce);
    let (_, e) = h.publish_msg(Message::new("t", "x", QoS::AtLeastOnce, false), Some("a"));
    assert!(deliveries(&e, "a").is_empty());
    assert_eq!(deliveries(&e, "b").len(), 1);
    let (_, e) = h.publish_msg(Message::new("t", "x", QoS::AtLeastOnce, false), Some("b"));
    assert_eq!(deliveries(&e, "a").len(), 1);
    // Also on the unlogged QoS0 path.
    let m = Arc::new(Message::new("t", "x", QoS::AtMostOnce, false));
    let (_, e) = h.p.deliver_qos0(&m, Some("a"), h.now);
    assert!(deliveries(&e, "a").is_empty());
}

#[test]
fn retain_as_published() {
    let mut h = H::new();
    let a = h.online("a");
    let rap = SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        retain_as_published: true,
        ..Default::default()
    };
    h.subscribe_reqs("a", a, vec![sub_with("rap", rap, None)]);
    h.subscribe("a", a, "plain", QoS::AtLeastOnce);
    let d = deliveries(&h.retain("rap", "x", QoS::AtLeastOnce), "a");
    assert!(d[0].retain);
    let d = deliveries(&h.retain("plain", "x", QoS::AtLeastOnce), "a");
    assert!(!d[0].retain);
    let d = deliveries(&h.publish("rap", "x", QoS::AtLeastOnce), "a");
    assert!(!d[0].retain);
}

#[test]
fn unacked_messages_resent_with_dup_and_same_ids_after_reconnect() {
    let mut h = H::new();
    let a = h.connect("a", conn().recv_max(2)).0;
    h.subscribe("a", a, "t", QoS::AtLeastOnce);
    for i in 0..3 {
        h.publish("t", &format!("m{i}"), QoS::AtLeastOnce);
    }
    assert_eq!(h.inflight_ids("a"), vec![1, 2]);
    h.drop_conn("a", a);
    let (a2, present, effects) = h.connect("a", conn().recv_max(2));
    assert!(present);
    let ds = deliveries(&effects, "a");
    assert_eq!(payloads(&ds), vec!["m0", "m1"]);
    assert!(ds.iter().all(|d| d.dup));
    assert_eq!(
        ds.iter().map(|d| d.packet_id).collect::<Vec<_>>(),
        vec![Some(1), Some(2)]
    );
    let ds = deliveries(&h.ack("a", a2, AckCmd::PubAck, 1), "a");
    assert_eq!(payloads(&ds), vec!["m2"]);
    assert!(!ds[0].dup);
    assert_eq!(ds[0].packet_id, Some(3));
}

#[test]
fn resend_after_reconnect_honours_smaller_receive_maximum() {
    let mut h = H::new();
    let a = h.connect("a", conn().recv_max(3)).0;
    h.subscribe("a", a, "t", QoS::AtLeastOnce);
    for i in 0..4 {
        h.publish("t", &format!("m{i}"), QoS::AtLeastOnce);
    }
    assert_eq!(h.inflight_ids("a"), vec![1, 2, 3]);
    h.drop_conn("a", a);
    let (a2, _, effects) = h.connect("a", conn().recv_max(1));
    let ds = deliveries(&effects, "a");
    assert_eq!(
        payloads(&ds),
        vec!["m0"],
        "only Receive Maximum PUBLISHes unacknowledged"
    );
    assert!(ds[0].dup);
    // Each PUBACK lets the next in-flight message out again, with DUP and its own id.
    let ds = deliveries(&h.ack("a", a2, AckCmd::PubAck, 1), "a");
    assert_eq!(payloads(&ds), vec!["m1"]);
    assert_eq!((ds[0].packet_id, ds[0].dup), (Some(2), true));
    h.ack("a", a2, AckCmd::PubAck, 2);
    let ds = deliveries(&h.ack("a", a2, AckCmd::PubAck, 3), "a");
    assert_eq!(payloads(&ds), vec!["m3"]);
    assert!(!ds[0].dup, "never sent before");
    // An ack for an id in flight but not re-sent yet on this connection is still accepted.
    let mut h = H::new();
    let a = h.connect("a", conn().recv_max(2)).0;
    h.subscribe("a", a, "t", QoS::AtLeastOnce);
    h.publish("t", "x", QoS::AtLeastOnce);
    h.publish("t", "y", QoS::AtLeastOnce);
    h.drop_conn("a", a);
    let a2 = h.connect("a", conn().recv_max(1)).0;
    assert!(h.ack("a", a2, AckCmd::PubAck, 2).is_empty());
    assert_eq!(h.inflight_ids("a"), vec![1]);
}

#[test]
fn qos2_outbound_flow() {
    let mut h = H::new();
    let a = h.online("a");
    h.subscribe("a", a, "t", QoS::ExactlyOnce);
    let d = deliveries(&h.publish("t", "x", QoS::ExactlyOnce), "a");
    let pid = d[0].packet_id.unwrap();
    // PUBCOMP before PUBREC and PUBACK for a QoS2 message: wrong state, ignored.
    assert!(h.ack("a", a, AckCmd::PubComp, pid).is_empty());
    assert!(h.ack("a", a, AckCmd::PubAck, pid).is_empty());
    assert_eq!(
        h.p.session("a").unwrap().inflight[0].state,
        InflightState::Published
    );
    h.ack("a", a, AckCmd::PubRec, pid);
    assert_eq!(
        h.p.session("a").unwrap().inflight[0].state,
        InflightState::Released
    );
    // Duplicate PUBREC: ignored.
    h.ack("a", a, AckCmd::PubRec, pid);
    assert_eq!(
        h.p.session("a").unwrap().inflight[0].state,
        InflightState::Released
    );
    // Reconnect: PUBREL is re-sent, not the PUBLISH.
    h.drop_conn("a", a);
    let (a2, _, effects) = h.connect("a", conn());
    assert!(deliveries(&effects, "a").is_empty());
    assert_eq!(
        effects,
        vec![Effect::Send {
            client_id: "a".into(),
            epoch: a2,
            event: SessionEvent::Release { packet_id: pid },
        }]
    );
    h.ack("a", a2, AckCmd::PubComp, pid);
    assert!(h.inflight_ids("a").is_empty());
}

/// Deliveries carry the index at which they were computed and an ack's answer the index at
/// which it was applied: a connection drops a replay of a packet id computed before that id's
/// PUBREC was applied (`tiermq_common::released_ids`; issue 19, simulation seed 5041).
#[test]
fn deliveries_and_acks_carry_their_log_index() {
    let mut h = H::new();
    let a = h.connect("a", conn().frontend(3)).0;
    h.subscribe("a", a, "t", QoS::ExactlyOnce);
    let d = deliveries(&h.publish("t", "x", QoS::ExactlyOnce), "a");
    assert_eq!(d[0].index, Some(h.index), "the entry that computed it");
    let pid = d[0].packet_id.unwrap();
    // A new leader's replay, computed before the PUBREC, from the state as of its index.
    let replay = h.p.replay_for_frontend(3, h.now);
    let before = h.index;
    assert_eq!(deliveries(&replay, "a")[0].index, Some(before));
    let (r, _) = h.apply(Command::Ack {
        client_id: "a".into(),
        epoch: a,
        kind: AckCmd::PubRec,
        packet_id: pid,
    });
    assert_eq!(r, Reply::Acked { index: h.index });
    assert!(
        before < h.index,
        "the stale replay is older than the PUBREC"
    );
    // Applied every index after it, a replay no longer holds the PUBLISH, only its PUBREL.
    assert!(deliveries(&h.p.replay_for_frontend(3, h.now), "a").is_empty());
    // The id used again after PUBCOMP: computed at a higher index than the PUBREC.
    let rec = h.index;
    h.ack("a", a, AckCmd::PubComp, pid);
    let d = deliveries(&h.publish("t", "y", QoS::ExactlyOnce), "a");
    assert!(d[0].index.unwrap() > rec);
}

#[test]
fn qos2_pubcomp_frees_slot() {
    let mut h = H::new();
    let a = h.connect("a", conn().recv_max(1)).0;
    h.subscribe("a", a, "t", QoS::ExactlyOnce);
    h.publish("t", "m0", QoS::ExactlyOnce);
    h.publish("t", "m1", QoS::ExactlyOnce);
    assert_eq!(h.queued("a"), 1);
    assert!(deliveries(&h.ack("a", a, AckCmd::PubRec, 1), "a").is_empty());
    let d = deliveries(&h.ack("a", a, AckCmd::PubComp, 1), "a");
    assert_eq!(payloads(&d), vec!["m1"]);
    // PUBREC for a QoS1 delivery is the wrong kind.
    let mut h = H::new();
    let a = h.online("a");
    h.subscribe("a", a, "t", QoS::AtLeastOnce);
    h.publish("t", "m0", QoS::AtLeastOnce);
    h.ack("a", a, AckCmd::PubRec, 1);
    h.ack("a", a, AckCmd::PubComp, 1);
    assert_eq!(h.inflight_ids("a"), vec![1]);
}

// ---------------------------------------------------------------------------------------------
// Retained messages
// ---------------------------------------------------------------------------------------------

#[test]
fn retained_stored_replaced_and_deleted() {
    let mut h = H::new();
    h.retain("r/1", "v1", QoS::AtLeastOnce);
    assert_eq!(h.p.retained_message("r/1").unwrap().payload, "v1");
    h.retain("r/1", "v2", QoS::AtLeastOnce);
    assert_eq!(h.p.retained_message("r/1").unwrap().payload, "v2");
    assert_eq!(h.p.retained_count(), 1);
    // Retain flag without store_retained (another partition owns the topic): not stored.
    h.apply(Command::Publish {
        message: Arc::new(Message::new("r/2", "x", QoS::AtLeastOnce, true)),
        publisher: None,
        store_retained: false,
        inbound_qos2: None,
    });
    assert!(h.p.retained_message("r/2").is_none());
    // Non-retained publish leaves it alone.
    h.publish("r/1", "other", QoS::AtLeastOnce);
    assert_eq!(h.p.retained_message("r/1").unwrap().payload, "v2");
    h.retain("r/1", "", QoS::AtLeastOnce);
    assert!(h.p.retained_message("r/1").is_none());
    assert_eq!(h.p.retained_count(), 0);
}

fn subscribe_rh(h: &mut H, id: &str, epoch: u64, filter: &str, rh: u8) -> Vec<Effect> {
    let o = SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        retain_handling: rh,
        ..Default::default()
    };
    h.subscribe_reqs(id, epoch, vec![sub_with(filter, o, Some(9))])
        .1
}

#[test]
fn replace_retained_is_a_compare_and_swap_on_the_payload() {
    let mut h = H::new();
    let record = |v: &str| {
        Arc::new(Message::new(
            "$cluster/r",
            v.to_string(),
            QoS::AtLeastOnce,
            true,
        ))
    };
    let swap = |m, expected: Option<&str>| Command::ReplaceRetained {
        message: m,
        expected: expected.map(|e| bytes::Bytes::from(e.to_string())),
    };
    // Nothing stored: only `None` matches.
    assert_eq!(
        h.apply(swap(record("1"), Some("0"))).0,
        Reply::Replaced { done: false }
    );
    assert!(h.p.retained_message("$cluster/r").is_none());
    let (reply, fx) = h.apply(swap(record("1"), None));
    assert_eq!(reply, Reply::Replaced { done: true });
    assert!(fx.is_empty(), "a swap delivers nothing: {fx:?}");
    // Two swaps from the same base: the second is refused.
    assert_eq!(
        h.apply(swap(record("2a"), Some("1"))).0,
        Reply::Replaced { done: true }
    );
    assert_eq!(
        h.apply(swap(record("2b"), Some("1"))).0,
        Reply::Replaced { done: false }
    );
    assert_eq!(h.p.retained_message("$cluster/r").unwrap().payload, "2a");
}

#[test]
fn retained_on_subscribe_by_retain_handling() {
    let mut h = H::new();
    h.retain("r", "v", QoS::ExactlyOnce);
    let a = h.online("a");
    // 0: always, with retain=1 and granted QoS min(2, 1).
    let d = deliveries(&subscribe_rh(&mut h, "a", a, "r", 0), "a");
    assert_eq!(d.len(), 1);
    assert!(d[0].retain);
    assert_eq!(d[0].qos, QoS::AtLeastOnce);
    assert_eq!(d[0].subscription_ids, vec![9]);
    let d = deliveries(&subscribe_rh(&mut h, "a", a, "r", 0), "a");
    assert_eq!(d.len(), 1, "0 sends again on a repeated subscribe");
    // 1: only for a new subscription.
    let d = deliveries(&subscribe_rh(&mut h, "a", a, "r", 1), "a");
    assert!(d.is_empty());
    let d = deliveries(&subscribe_rh(&mut h, "a", a, "r/#", 1), "a");
    assert_eq!(d.len(), 1);
    // 2: never.
    let b = h.online("b");
    let d = deliveries(&subscribe_rh(&mut h, "b", b, "r", 2), "b");
    assert!(d.is_empty());
}

#[test]
fn subscribe_reply_lists_wanted_retained() {
    let mut h = H::new();
    let a = h.online("a");
    let o = |rh| SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        retain_handling: rh,
        ..Default::default()
    };
    let (r, _) = h.apply(Command::Subscribe {
        client_id: "a".into(),
        epoch: a,
        subscriptions: vec![sub_with("x", o(0), Some(1)), sub_with("y", o(2), None)],
    });
    match r {
        Reply::Subscribed { want_retained, .. } => {
            assert_eq!(want_retained, vec![("x".to_string(), o(0), Some(1))]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn wildcard_subscribe_gets_all_matching_retained_sorted() {
    let mut h = H::new();
    for t in ["s/c", "s/a", "s/b/deep", "other", "$SYS/x"] {
        h.retain(t, t, QoS::AtLeastOnce);
    }
    let a = h.online("a");
    let d = deliveries(&h.subscribe("a", a, "s/#", QoS::AtLeastOnce), "a");
    assert_eq!(payloads(&d), vec!["s/a", "s/b/deep", "s/c"]);
    let d = deliveries(&h.subscribe("a", a, "#", QoS::AtLeastOnce), "a");
    assert_eq!(d.len(), 4, "# does not match $SYS topics");
    assert_eq!(h.p.retained_matching("+/+", h.now).len(), 2);
}

#[test]
fn deliver_retained_from_other_partitions() {
    let mut h = H::new();
    let a = h.online("a");
    h.subscribe("a", a, "x/#", QoS::AtMostOnce);
    let m = Arc::new(Message::new("x/1", "r", QoS::AtLeastOnce, true));
    let (r, e) = h.apply(Command::DeliverRetained {
        client_id: "a".into(),
        epoch: a,
        retained: vec![RetainedForSubscription {
            filter: "x/#".into(),
            options: opts(QoS::AtLeastOnce),
            subscription_id: Some(4),
            messages: vec![m],
        }],
    });
    assert_eq!(r, Reply::Done);
    let d = deliveries(&e, "a");
    assert_eq!(d.len(), 1);
    assert!(d[0].retain);
    assert_eq!(d[0].qos, QoS::AtLeastOnce);
    assert_eq!(d[0].subscription_ids, vec![4]);
}

#[test]
fn message_expiry_drops_expired_retained() {
    let mut h = H::new();
    let m = expiring("r", "v", QoS::AtLeastOnce, true, 10, h.now);
    h.publish_msg(m, None);
    h.advance_secs(4);
    let a = h.online("a");
    let d = deliveries(&h.subscribe("a", a, "r", QoS::AtLeastOnce), "a");
    assert_eq!(
        d[0].expiry_secs,
        Some(6),
        "remaining interval, not the original"
    );
    h.advance_secs(6);
    assert!(h.p.retained_matching("r", h.now).is_empty());
    let b = h.online("b");
    assert!(deliveries(&h.subscribe("b", b, "r", QoS::AtLeastOnce), "b").is_empty());
    // A Tick removes it from the store for good.
    assert_eq!(h.p.retained_count(), 1);
    h.tick();
    assert_eq!(h.p.retained_count(), 0);
    assert!(h.p.take_dirty().retained.contains("r"));
}

#[test]
fn replaced_retained_message_keeps_its_own_expiry() {
    let mut h = H::new();
    h.publish_msg(expiring("r", "old", QoS::AtLeastOnce, true, 5, h.now), None);
    // Replaced by one without expiry: the old deadline must not delete it.
    h.retain("r", "new", QoS::AtLeastOnce);
    h.advance_secs(10);
    h.tick();
    assert_eq!(h.p.retained_message("r").unwrap().payload, "new");
    // Replaced by one with the same deadline as the previous one.
    let now = h.now;
    h.publish_msg(expiring("q", "1", QoS::AtLeastOnce, true, 5, now), None);
    h.publish_msg(expiring("q", "2", QoS::AtLeastOnce, true, 5, now), None);
    h.advance_secs(5);
    h.tick();
    assert!(h.p.retained_message("q").is_none());
}

#[test]
fn message_expiry_drops_expired_queued_messages_and_decrements_interval() {
    let mut h = H::new();
    let a = h.online("a");
    h.subscribe("a", a, "t", QoS::AtLeastOnce);
    h.drop_conn("a", a);
    h.publish_msg(
        expiring("t", "short", QoS::AtLeastOnce, false, 5, h.now),
        None,
    );
    h.publish_msg(
        expiring("t", "long", QoS::AtLeastOnce, false, 100, h.now),
        None,
    );
    h.publish("t", "forever", QoS::AtLeastOnce);
    h.advance_secs(10);
    let (_, _, effects) = h.connect("a", conn());
    let d = deliveries(&effects, "a");
    assert_eq!(payloads(&d), vec!["long", "forever"]);
    assert_eq!(d[0].expiry_secs, Some(90));
    assert_eq!(d[1].expiry_secs, None);
}

#[test]
fn expired_inflight_message_not_resent() {
    let mut h = H::new();
    let a = h.online("a");
    h.subscribe("a", a, "t", QoS::AtLeastOnce);
    h.publish_msg(
        expiring("t", "short", QoS::AtLeastOnce, false, 5, h.now),
        None,
    );
    h.drop_conn("a", a);
    h.advance_secs(6);
    let (_, _, effects) = h.connect("a", conn());
    assert!(deliveries(&effects, "a").is_empty());
    assert!(h.inflight_ids("a").is_empty());
}

// ---------------------------------------------------------------------------------------------
// Inbound QoS2
// ---------------------------------------------------------------------------------------------

#[test]
fn inbound_qos2_duplicate_until_released() {
    let mut h = H::new();
    let a = h.online("a");
    let recv = |h: &mut H| {
        h.apply(Command::Qos2Received {
            client_id: "a".into(),
            epoch: a,
            packet_id: 7,
        })
        .0
    };
    let rel = |h: &mut H| {
        h.apply(Command::Qos2Release {
            client_id: "a".into(),
            epoch: a,
            packet_id: 7,
        })
        .0
    };
    assert_eq!(recv(&mut h), Reply::Qos2Received { duplicate: false });
    assert_eq!(recv(&mut h), Reply::Qos2Received { duplicate: true });
    assert_eq!(rel(&mut h), Reply::Released { found: true });
    assert_eq!(rel(&mut h), Reply::Released { found: false });
    assert_eq!(recv(&mut h), Reply::Qos2Received { duplicate: false });
}

#[test]
fn inbound_qos2_survives_reconnect() {
    let mut h = H::new();
    let a = h.online("a");
    h.apply(Command::Qos2Received {
        client_id: "a".into(),
        epoch: a,
        packet_id: 3,
    });
    h.drop_conn("a", a);
    let a2 = h.online("a");
    let r = h.apply(Command::Qos2Received {
        client_id: "a".into(),
        epoch: a2,
        packet_id: 3,
    });
    assert_eq!(r.0, Reply::Qos2Received { duplicate: true });
}

/// A QoS2 PUBLISH from `publisher` with packet id `packet_id`, recorded in the same entry.
fn inbound_qos2_publish(
    h: &mut H,
    publisher: &str,
    epoch: u64,
    packet_id: u16,
    payload: &str,
) -> Reply {
    qos2_publish(h, publisher, epoch, packet_id, None, payload)
}

/// The same QoS2 PUBLISH arriving at a partition that is not its publisher's, keyed by the
/// token the publisher's partition gave it.
fn keyed_qos2_publish(
    h: &mut H,
    publisher: &str,
    epoch: u64,
    packet_id: u16,
    token: u64,
    payload: &str,
) -> Reply {
    qos2_publish(h, publisher, epoch, packet_id, Some(token), payload)
}

fn qos2_publish(
    h: &mut H,
    publisher: &str,
    epoch: u64,
    packet_id: u16,
    token: Option<u64>,
    payload: &str,
) -> Reply {
    h.apply(qos2_publish_command(
        publisher, epoch, packet_id, token, payload,
    ))
    .0
}

fn qos2_publish_command(
    publisher: &str,
    epoch: u64,
    packet_id: u16,
    token: Option<u64>,
    payload: &str,
) -> Command {
    Command::Publish {
        message: Arc::new(Message::new(
            "t",
            payload.to_string(),
            QoS::ExactlyOnce,
            false,
        )),
        publisher: Some(publisher.into()),
        store_retained: false,
        inbound_qos2: Some(super::command::InboundQos2 {
            client_id: publisher.into(),
            epoch,
            packet_id,
            token,
        }),
    }
}

/// A partition whose `refuse-new` subscriber "s" (QoS2 on "t") has room for one message in
/// flight and one queued.
fn one_slot_subscriber() -> (H, u64) {
    let mut h = H::with_limits(SessionLimits {
        max_queued_messages: 1,
        queue_full: super::command::QueueFullPolicy::RefuseNew,
        ..Default::default()
    });
    let s = h.connect("s", conn().recv_max(1)).0;
    h.subscribe("s", s, "t", QoS::ExactlyOnce);
    (h, s)
}

/// Bug 8 (issue 19): a v5 PUBLISH answered PUBREC 0x97 (a full queue with `refuse-new`) ends
/// its exchange there, so its packet id must not stay recorded: the client may reuse it at
/// once, and that next message is new, not a duplicate.
#[test]
fn refused_inbound_qos2_does_not_record_its_packet_id() {
    let (mut h, s) = one_slot_subscriber();
    let p = h.online("p");
    for (pid, m) in [(8, "m0"), (9, "m1")] {
        let r = inbound_qos2_publish(&mut h, "p", p, pid, m);
        assert!(matches!(
            r,
            Reply::Published {
                refused: false,
                duplicate: false,
                ..
            }
        ));
    }
    // One in flight, one queued: the queue is full and refuses.
    let refused = inbound_qos2_publish(&mut h, "p", p, 10, "m2");
    assert!(matches!(
        refused,
        Reply::Published {
            refused: true,
            duplicate: false,
            ..
        }
    ));
    assert!(!h.p.session("p").unwrap().inbound_qos2.contains_key(&10));
    // Room again; the client reuses id 10 for a new message, which is queued.
    h.ack("s", s, AckCmd::PubRec, 1);
    h.ack("s", s, AckCmd::PubComp, 1);
    let again = inbound_qos2_publish(&mut h, "p", p, 10, "m3");
    assert!(
        matches!(
            again,
            Reply::Published {
                duplicate: false,
                refused: false,
                ..
            }
        ),
        "a new message taken for a duplicate: {again:?}"
    );
    assert_eq!(h.queued("s"), 1);
}

/// A v3.1.1 publisher cannot be told 0x97: its connection is closed and it re-sends, which must
/// then be recognised as the same message (the subscribers with room already have it).
#[test]
fn refused_inbound_qos2_from_v311_stays_recorded() {
    let (mut h, _) = one_slot_subscriber();
    let p = h.connect("p", conn().v311()).0;
    inbound_qos2_publish(&mut h, "p", p, 8, "m0");
    inbound_qos2_publish(&mut h, "p", p, 9, "m1");
    let refused = inbound_qos2_publish(&mut h, "p", p, 10, "m2");
    assert!(matches!(refused, Reply::Published { refused: true, .. }));
    let resent = inbound_qos2_publish(&mut h, "p", p, 10, "m2");
    assert!(matches!(
        resent,
        Reply::Published {
            duplicate: true,
            ..
        }
    ));
}

/// The publisher's partition answers each inbound QoS2 message's token: the log index that
/// recorded it, and the same token for a re-send (which it does not deliver again).
#[test]
fn inbound_qos2_token_is_the_recording_index_and_stays_for_a_resend() {
    let mut h = H::new();
    let s = h.online("s");
    h.subscribe("s", s, "t", QoS::ExactlyOnce);
    let p = h.online("p");
    let first = inbound_qos2_publish(&mut h, "p", p, 4, "m");
    let token = h.index;
    assert_eq!(
        first,
        Reply::Published {
            matched: true,
            duplicate: false,
            refused: false,
            qos2_token: Some(token),
        }
    );
    h.drop_conn("p", p);
    let p2 = h.online("p");
    let resent = inbound_qos2_publish(&mut h, "p", p2, 4, "m");
    assert_eq!(
        resent,
        Reply::Published {
            matched: true,
            duplicate: true,
            refused: false,
            qos2_token: Some(token),
        }
    );
    assert_eq!(h.queued("s") + h.p.session("s").unwrap().inflight.len(), 1);
}

/// Issue 19 §2, inbound QoS2 across partitions: a partition that is not the publisher's
/// delivers a message once however often it arrives with its token (a frontend's retry after
/// a lost answer, the client's re-send after a reconnect), delivers the next message under the
/// same packet id (a new token), and ignores a retry from an older connection that arrives
/// after the id was reused.
#[test]
fn a_keyed_qos2_publish_is_delivered_once_per_token() {
    let mut h = H::new();
    let s = h.online("s");
    h.subscribe("s", s, "t", QoS::ExactlyOnce);
    let delivered = |h: &H| h.queued("s") + h.p.session("s").unwrap().inflight.len();
    let duplicate = |r: Reply| match r {
        Reply::Published { duplicate, .. } => duplicate,
        other => panic!("{other:?}"),
    };
    let first = keyed_qos2_publish(&mut h, "p", 10, 4, 100, "m1");
    assert!(matches!(
        first,
        Reply::Published {
            qos2_token: Some(100),
            ..
        }
    ));
    assert!(!duplicate(first));
    assert!(duplicate(keyed_qos2_publish(&mut h, "p", 10, 4, 100, "m1")));
    assert!(duplicate(keyed_qos2_publish(&mut h, "p", 12, 4, 100, "m1")));
    assert_eq!(delivered(&h), 1);
    // The id reused for a new message.
    assert!(!duplicate(keyed_qos2_publish(
        &mut h, "p", 12, 4, 130, "m2"
    )));
    assert_eq!(delivered(&h), 2);
    // A late attempt of connection 10 with an older message under id 4.
    assert!(duplicate(keyed_qos2_publish(&mut h, "p", 10, 4, 90, "m0")));
    assert_eq!(delivered(&h), 2);
    // Another publisher's id 4 is its own; and the keys hold no session.
    keyed_qos2_publish(&mut h, "q", 3, 4, 100, "n1");
    assert_eq!(delivered(&h), 3);
    assert!(h.p.session("p").is_none());
}

/// The keys are partition state: a replica restored from an image (checkpoint, snapshot)
/// still recognises the message; they are dropped a day after their last use.
#[test]
fn qos2_keys_survive_restore_and_expire() {
    let mut h = H::new();
    let s = h.online("s");
    h.subscribe("s", s, "t", QoS::ExactlyOnce);
    keyed_qos2_publish(&mut h, "p", 10, 4, 100, "m1");
    let mut p = Partition::restore(SessionLimits::default(), roundtrip(h.p.image()));
    assert_eq!(p.derived_indexes(), h.p.derived_indexes());
    let mut index = h.index;
    let mut step = |p: &mut Partition, now: u64, command: Command| {
        index += 1;
        p.apply(
            index,
            Entry {
                now_ms: now,
                command,
            },
        )
    };
    let keyed = |token| qos2_publish_command("p", 10, 4, Some(token), "m1");
    let (r, _) = step(&mut p, h.now, keyed(100));
    assert!(matches!(
        r,
        Reply::Published {
            duplicate: true,
            ..
        }
    ));
    assert!(p.qos2_keys_of("p").is_some());
    let day = super::qos2_keys::RETENTION_MS;
    step(&mut p, h.now + day, Command::Tick);
    assert!(p.qos2_keys_of("p").is_none());
    assert!(p.take_dirty().qos2_keys.contains("p"));
}

// ---------------------------------------------------------------------------------------------
// Wills and session expiry
// ---------------------------------------------------------------------------------------------

#[test]
fn abnormal_disconnect_fires_will_at_once() {
    let mut h = H::new();
    let a = h.connect("a", conn().will("w", 0)).0;
    let e = h.drop_conn("a", a);
    assert_eq!(wills(&e).len(), 1);
    assert_eq!(wills(&e)[0].topic, "w");
    // Exactly once.
    h.advance_secs(100);
    assert!(wills(&h.tick()).is_empty());
}

#[test]
fn normal_disconnect_discards_will() {
    let mut h = H::new();
    let a = h.connect("a", conn().will("w", 0)).0;
    let (_, e) = h.disconnect("a", a, true, false, None);
    assert!(wills(&e).is_empty());
    let a2 = h.connect("a", conn().will("w", 5)).0;
    let (_, e) = h.disconnect("a", a2, true, false, None);
    assert!(wills(&e).is_empty());
    h.advance_secs(10);
    assert!(wills(&h.tick()).is_empty());
}

#[test]
fn disconnect_with_will_publishes_will() {
    let mut h = H::new();
    let a = h.connect("a", conn().will("w", 0)).0;
    let (_, e) = h.disconnect("a", a, true, true, None);
    assert_eq!(wills(&e).len(), 1);
}

#[test]
fn delayed_will_fires_on_tick_after_delay() {
    let mut h = H::new();
    let a = h.connect("a", conn().will("w", 10)).0;
    assert!(wills(&h.drop_conn("a", a)).is_empty());
    h.advance_secs(9);
    assert!(wills(&h.tick()).is_empty());
    h.advance_secs(1);
    assert_eq!(wills(&h.tick()).len(), 1);
    h.advance_secs(10);
    assert!(wills(&h.tick()).is_empty());
    // The session itself lives on.
    assert!(h.p.session("a").is_some());
}

#[test]
fn delayed_will_cancelled_by_reconnect() {
    let mut h = H::new();
    let a = h.connect("a", conn().will("w", 10)).0;
    h.drop_conn("a", a);
    h.advance_secs(5);
    let (_, present, e) = h.connect("a", conn());
    assert!(present);
    assert!(wills(&e).is_empty());
    h.advance_secs(10);
    assert!(wills(&h.tick()).is_empty());
}

#[test]
fn delayed_will_due_but_not_ticked_fires_at_reconnect() {
    let mut h = H::new();
    let a = h.connect("a", conn().will("w", 10)).0;
    h.drop_conn("a", a);
    h.advance_secs(11);
    let (_, present, e) = h.connect("a", conn());
    assert!(present);
    assert_eq!(wills(&e).len(), 1);
}

#[test]
fn will_message_expiry_stamped_at_firing() {
    let mut h = H::new();
    let mut c = conn().will("w", 10);
    c.will
        .as_mut()
        .unwrap()
        .message
        .properties
        .message_expiry_interval = Some(30);
    let a = h.connect("a", c).0;
    h.drop_conn("a", a);
    h.advance_secs(10);
    let w = wills(&h.tick());
    assert_eq!(w[0].expires_at_ms, Some(h.now + 30_000));
}

#[test]
fn session_expiry_shorter_than_will_delay_fires_will_at_session_end() {
    let mut h = H::new();
    let a = h.connect("a", conn().expiry(5).will("w", 60)).0;
    h.subscribe("a", a, "t", QoS::AtLeastOnce);
    assert!(wills(&h.drop_conn("a", a)).is_empty());
    h.advance_secs(4);
    assert!(wills(&h.tick()).is_empty());
    h.advance_secs(1);
    let e = h.tick();
    assert_eq!(wills(&e).len(), 1);
    assert_eq!(routes_removed(&e), vec!["t"]);
    assert!(h.p.session("a").is_none());
    h.advance_secs(100);
    assert!(wills(&h.tick()).is_empty());
}

#[test]
fn session_expiry_zero_removes_session_at_disconnect() {
    let mut h = H::new();
    let a = h.connect("a", conn().expiry(0).will("w", 30)).0;
    h.subscribe("a", a, "t", QoS::AtLeastOnce);
    let e = h.drop_conn("a", a);
    assert_eq!(
        wills(&e).len(),
        1,
        "the session ends now, so the will is due"
    );
    assert_eq!(routes_removed(&e), vec!["t"]);
    assert!(h.p.session("a").is_none());
    assert!(h.p.take_dirty().sessions.contains("a"));
}

#[test]
fn session_expiry_removes_on_first_tick_after_interval() {
    let mut h = H::new();
    let a = h.connect("a", conn().expiry(10)).0;
    h.subscribe("a", a, "t/+", QoS::AtLeastOnce);
    h.drop_conn("a", a);
    h.advance_secs(9);
    assert!(h.tick().is_empty());
    assert!(h.p.session("a").is_some());
    h.advance_secs(2);
    let e = h.tick();
    assert_eq!(routes_removed(&e), vec!["t/+"]);
    assert!(h.p.session("a").is_none());
    assert_eq!(h.p.subscription_count(), 0);
}

#[test]
fn reconnect_cancels_session_expiry() {
    let mut h = H::new();
    let a = h.connect("a", conn().expiry(10)).0;
    h.drop_conn("a", a);
    h.advance_secs(5);
    let a2 = h.online("a");
    h.advance_secs(10);
    h.tick();
    assert_eq!(h.p.session("a").unwrap().epoch(), Some(a2));
}

#[test]
fn disconnect_overrides_session_expiry() {
    let mut h = H::new();
    let a = h.connect("a", conn().expiry(10)).0;
    h.disconnect("a", a, true, false, Some(0));
    assert!(h.p.session("a").is_none());
    let a = h.connect("b", conn().expiry(10)).0;
    h.disconnect("b", a, true, false, Some(100));
    h.advance_secs(50);
    h.tick();
    assert!(h.p.session("b").is_some());
    h.advance_secs(50);
    h.tick();
    assert!(h.p.session("b").is_none());
}

#[test]
fn v311_persistent_session_never_expires() {
    let mut h = H::new();
    let a = h.connect("a", conn().v311().expiry(u32::MAX)).0;
    h.subscribe("a", a, "t", QoS::AtLeastOnce);
    h.drop_conn("a", a);
    h.advance_secs(10 * 365 * 24 * 3600);
    h.tick();
    assert!(h.p.session("a").is_some());
    h.publish("t", "x", QoS::AtLeastOnce);
    let (_, present, e) = h.connect("a", conn().v311().expiry(u32::MAX));
    assert!(present);
    assert_eq!(deliveries(&e, "a").len(), 1);
}

#[test]
fn frontend_lost_disconnects_exactly_its_sessions() {
    let mut h = H::new();
    let a = h.connect("a", conn().frontend(1).will("w/a", 0)).0;
    let b = h.connect("b", conn().frontend(2).will("w/b", 0)).0;
    let c = h.connect("c", conn().frontend(1).expiry(0)).0;
    let (r, e) = h.apply(Command::FrontendLost { frontend_id: 1 });
    assert_eq!(r, Reply::Done);
    assert_eq!(
        wills(&e)
            .iter()
            .map(|m| m.topic.as_str())
            .collect::<Vec<_>>(),
        vec!["w/a"]
    );
    assert!(!h.p.session("a").unwrap().is_online());
    assert_eq!(h.p.session("b").unwrap().epoch(), Some(b));
    assert!(h.p.session("c").is_none());
    // The lost connections are fenced.
    assert_eq!(h.disconnect("a", a, true, false, None).0, Reply::Fenced);
    let _ = c;
}

// ---------------------------------------------------------------------------------------------
// Queue limits
// ---------------------------------------------------------------------------------------------

#[test]
fn max_queued_messages_drops_oldest() {
    let mut h = H::with_limits(SessionLimits {
        max_queued_messages: 3,
        ..Default::default()
    });
    let a = h.online("a");
    h.subscribe("a", a, "t", QoS::AtLeastOnce);
    h.drop_conn("a", a);
    for i in 0..5 {
        h.publish("t", &format!("m{i}"), QoS::AtLeastOnce);
    }
    assert_eq!(h.queued("a"), 3);
    assert_eq!(h.p.session("a").unwrap().dropped, 2);
    let (_, _, e) = h.connect("a", conn());
    assert_eq!(payloads(&deliveries(&e, "a")), vec!["m2", "m3", "m4"]);
}

#[test]
fn max_queued_messages_refuse_new_keeps_the_queue_and_tells_the_publisher() {
    let mut h = H::with_limits(SessionLimits {
        max_queued_messages: 3,
        queue_full: super::command::QueueFullPolicy::RefuseNew,
        ..Default::default()
    });
    let a = h.online("a");
    let b = h.online("b");
    h.subscribe("a", a, "t", QoS::AtLeastOnce);
    h.subscribe("b", b, "t", QoS::AtLeastOnce);
    h.drop_conn("a", a);
    let mut refused = Vec::new();
    for i in 0..5 {
        let (r, _) = h.apply(Command::Publish {
            message: Arc::new(Message::new("t", format!("m{i}"), QoS::AtLeastOnce, false)),
            publisher: None,
            store_retained: false,
            inbound_qos2: None,
        });
        match r {
            Reply::Published { refused: r, .. } => refused.push(r),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(refused, vec![false, false, false, true, true]);
    assert_eq!(h.queued("a"), 3);
    assert_eq!(h.p.session("a").unwrap().dropped, 2);
    // The other subscriber, with room, got all five.
    assert_eq!(h.inflight_ids("b").len(), 5);
    let (_, _, e) = h.connect("a", conn());
    assert_eq!(payloads(&deliveries(&e, "a")), vec!["m0", "m1", "m2"]);
}

#[test]
fn max_queued_messages_counts_only_beyond_the_window() {
    let mut h = H::with_limits(SessionLimits {
        max_queued_messages: 0,
        ..Default::default()
    });
    let a = h.connect("a", conn().recv_max(2)).0;
    h.subscribe("a", a, "t", QoS::AtLeastOnce);
    for i in 0..3 {
        h.publish("t", &format!("m{i}"), QoS::AtLeastOnce);
    }
    assert_eq!(h.inflight_ids("a").len(), 2);
    assert_eq!(h.queued("a"), 0);
    assert_eq!(h.p.session("a").unwrap().dropped, 1);
}

#[test]
fn qos0_queued_offline_only_when_enabled() {
    for enabled in [false, true] {
        let mut h = H::with_limits(SessionLimits {
            queue_qos0_offline: enabled,
            ..Default::default()
        });
        let a = h.online("a");
        h.subscribe("a", a, "t", QoS::AtMostOnce);
        h.drop_conn("a", a);
        h.publish("t", "q0", QoS::AtLeastOnce);
        assert_eq!(h.queued("a"), usize::from(enabled));
        let (_, _, e) = h.connect("a", conn());
        let d = deliveries(&e, "a");
        assert_eq!(d.len(), usize::from(enabled));
        if enabled {
            assert_eq!(d[0].qos, QoS::AtMostOnce);
            assert_eq!(d[0].packet_id, None);
            assert!(h.inflight_ids("a").is_empty());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Snapshots
// ---------------------------------------------------------------------------------------------

fn image_bytes(p: &Partition) -> Vec<u8> {
    let mut image = p.image();
    image.sessions.sort_by(|a, b| a.client_id.cmp(&b.client_id));
    image.retained.sort_by(|a, b| a.topic.cmp(&b.topic));
    postcard::to_stdvec(&image).unwrap()
}

fn roundtrip(image: PartitionImage) -> PartitionImage {
    let bytes = postcard::to_stdvec(&image).unwrap();
    postcard::from_bytes(&bytes).unwrap()
}

#[test]
fn restore_keeps_timers_subscriptions_and_retained() {
    let mut h = H::new();
    let a = h.connect("a", conn().expiry(20).will("w", 10)).0;
    h.subscribe("a", a, "t/#", QoS::AtLeastOnce);
    h.publish_msg(expiring("r", "v", QoS::AtLeastOnce, true, 15, h.now), None);
    h.drop_conn("a", a);
    let mut p = Partition::restore(SessionLimits::default(), roundtrip(h.p.image()));
    assert_eq!(p.applied_index(), h.index);
    assert_eq!(p.filters(), vec!["t/#".to_string()]);
    let mut index = h.index;
    let mut step = |p: &mut Partition, now: u64, command: Command| {
        index += 1;
        p.apply(
            index,
            Entry {
                now_ms: now,
                command,
            },
        )
    };
    let (_, e) = step(
        &mut p,
        h.now,
        Command::Publish {
            message: Arc::new(Message::new("t/1", "q", QoS::AtLeastOnce, false)),
            publisher: None,
            store_retained: false,
            inbound_qos2: None,
        },
    );
    assert!(e.is_empty());
    assert_eq!(p.session("a").unwrap().queue.len(), 1);
    let (_, e) = step(&mut p, h.now + 10_000, Command::Tick);
    assert_eq!(wills(&e).len(), 1, "will timer restored");
    let (_, _) = step(&mut p, h.now + 15_000, Command::Tick);
    assert_eq!(p.retained_count(), 0, "retained expiry restored");
    let (_, e) = step(&mut p, h.now + 20_000, Command::Tick);
    assert_eq!(routes_removed(&e), vec!["t/#"], "expiry timer restored");
    assert_eq!(p.session_count(), 0);
}

// ---------------------------------------------------------------------------------------------
// Determinism (property test)
// ---------------------------------------------------------------------------------------------

const CLIENTS: [&str; 3] = ["a", "b", "c"];
const TOPICS: [&str; 4] = ["t/1", "t/2", "u/1", "$s/1"];
const FILTERS: [&str; 7] = ["t/1", "t/+", "#", "u/1", "t/#", "+/1", "$share/g/t/+"];
const GROUP: &str = "$share/g/t/+";

#[derive(Debug, Clone)]
enum Op {
    Connect {
        c: usize,
        clean: bool,
        expiry: u32,
        recv_max: u16,
        will: Option<u32>,
        frontend: u64,
    },
    Disconnect {
        c: usize,
        stale: bool,
        normal: bool,
        with_will: bool,
        expiry: Option<u32>,
    },
    Subscribe {
        c: usize,
        stale: bool,
        subs: Vec<(usize, u8, bool, bool, u8, Option<u32>)>,
    },
    Unsubscribe {
        c: usize,
        filters: Vec<usize>,
    },
    Publish {
        topic: usize,
        qos: u8,
        retain: bool,
        empty: bool,
        publisher: Option<usize>,
        expiry: Option<u32>,
    },
    Ack {
        c: usize,
        stale: bool,
        kind: u8,
        packet_id: u16,
    },
    Qos2 {
        c: usize,
        release: bool,
        packet_id: u16,
    },
    DeliverRetained {
        c: usize,
        topic: usize,
        qos: u8,
    },
    Advance(u64),
    Tick,
    FrontendLost(u64),
    SharedJoin {
        c: usize,
        leave: bool,
    },
    SharedDeliver {
        c: usize,
        qos: u8,
        require_online: bool,
    },
    SharedDone {
        c: usize,
        seq: u64,
        outcome: u8,
    },
    SharedEnqueue {
        c: usize,
    },
    SharedReturnDone {
        seq: u64,
    },
}

fn qos(q: u8) -> QoS {
    QoS::from_u8(q % 3).unwrap()
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let c = 0..CLIENTS.len();
    prop_oneof![
        3 => (c.clone(), any::<bool>(), prop::sample::select(vec![0u32, 3, 60, u32::MAX]), 1u16..4,
              prop::option::of(prop::sample::select(vec![0u32, 2, 30])), 0u64..2)
            .prop_map(|(c, clean, expiry, recv_max, will, frontend)| Op::Connect {
                c, clean, expiry, recv_max, will, frontend }),
        2 => (c.clone(), prop::bool::weighted(0.1), any::<bool>(), any::<bool>(),
              prop::option::of(prop::sample::select(vec![0u32, 5, u32::MAX])))
            .prop_map(|(c, stale, normal, with_will, expiry)| Op::Disconnect {
                c, stale, normal, with_will, expiry }),
        3 => (c.clone(), prop::bool::weighted(0.1),
              prop::collection::vec((0..FILTERS.len(), 0u8..3, any::<bool>(), any::<bool>(), 0u8..3,
                                     prop::option::of(1u32..4)), 1..3))
            .prop_map(|(c, stale, subs)| Op::Subscribe { c, stale, subs }),
        1 => (c.clone(), prop::collection::vec(0..FILTERS.len(), 1..3))
            .prop_map(|(c, filters)| Op::Unsubscribe { c, filters }),
        6 => (0..TOPICS.len(), 0u8..3, prop::bool::weighted(0.3), prop::bool::weighted(0.1),
              prop::option::of(c.clone()), prop::option::of(1u32..5))
            .prop_map(|(topic, qos, retain, empty, publisher, expiry)| Op::Publish {
                topic, qos, retain, empty, publisher, expiry }),
        4 => (c.clone(), prop::bool::weighted(0.1), 0u8..3, 1u16..6)
            .prop_map(|(c, stale, kind, packet_id)| Op::Ack { c, stale, kind, packet_id }),
        1 => (c.clone(), any::<bool>(), 1u16..3)
            .prop_map(|(c, release, packet_id)| Op::Qos2 { c, release, packet_id }),
        1 => (c.clone(), 0..TOPICS.len(), 0u8..3)
            .prop_map(|(c, topic, qos)| Op::DeliverRetained { c, topic, qos }),
        2 => (0u64..4000).prop_map(Op::Advance),
        2 => Just(Op::Tick),
        1 => (0u64..2).prop_map(Op::FrontendLost),
        2 => (c.clone(), prop::bool::weighted(0.2))
            .prop_map(|(c, leave)| Op::SharedJoin { c, leave }),
        2 => (c.clone(), 0u8..3, any::<bool>())
            .prop_map(|(c, qos, require_online)| Op::SharedDeliver { c, qos, require_online }),
        2 => (c.clone(), 1u64..6, 0u8..3)
            .prop_map(|(c, seq, outcome)| Op::SharedDone { c, seq, outcome }),
        1 => c.clone().prop_map(|c| Op::SharedEnqueue { c }),
        1 => (1u64..6).prop_map(|seq| Op::SharedReturnDone { seq }),
    ]
}

/// Turns abstract ops into concrete log entries, tracking the epochs the partition hands out.
struct Driver {
    now: u64,
    epochs: Vec<u64>,
}

impl Driver {
    fn epoch(&self, c: usize, stale: bool) -> u64 {
        if stale {
            self.epochs[c].saturating_sub(1)
        } else {
            self.epochs[c]
        }
    }

    /// The entry for `op`, or None for a pure clock advance.
    fn entry(&mut self, op: &Op) -> Option<Entry> {
        let command = match op.clone() {
            Op::Connect {
                c,
                clean,
                expiry,
                recv_max,
                will,
                frontend,
            } => Command::Connect {
                client_id: CLIENTS[c].into(),
                protocol: ProtocolVersion::V5,
                clean_start: clean,
                session_expiry_secs: expiry,
                receive_maximum: recv_max,
                will: will.map(|delay_secs| Will {
                    message: Message::new(
                        format!("t/{}", CLIENTS[c]),
                        "w",
                        QoS::AtLeastOnce,
                        false,
                    ),
                    delay_secs,
                }),
                frontend_id: frontend,
                connection: 0,
            },
            Op::Disconnect {
                c,
                stale,
                normal,
                with_will,
                expiry,
            } => Command::Disconnect {
                client_id: CLIENTS[c].into(),
                epoch: self.epoch(c, stale),
                normal,
                with_will,
                session_expiry_secs: expiry,
            },
            Op::Subscribe { c, stale, subs } => Command::Subscribe {
                client_id: CLIENTS[c].into(),
                epoch: self.epoch(c, stale),
                subscriptions: subs
                    .into_iter()
                    .map(|(f, q, nl, rap, rh, id)| SubscribeRequest {
                        filter: FILTERS[f].to_string(),
                        options: SubscriptionOptions {
                            qos: qos(q),
                            no_local: nl,
                            retain_as_published: rap,
                            retain_handling: rh,
                        },
                        subscription_id: id,
                    })
                    .collect(),
            },
            Op::Unsubscribe { c, filters } => Command::Unsubscribe {
                client_id: CLIENTS[c].into(),
                epoch: self.epoch(c, false),
                filters: filters
                    .into_iter()
                    .map(|f| FILTERS[f].to_string())
                    .collect(),
            },
            Op::Publish {
                topic,
                qos: q,
                retain,
                empty,
                publisher,
                expiry,
            } => {
                let mut m =
                    Message::new(TOPICS[topic], if empty { "" } else { "p" }, qos(q), retain);
                m.properties.message_expiry_interval = expiry;
                m.stamp_expiry(self.now);
                Command::Publish {
                    message: Arc::new(m),
                    publisher: publisher.map(|c| Arc::from(CLIENTS[c])),
                    store_retained: retain,
                    inbound_qos2: None,
                }
            }
            Op::Ack {
                c,
                stale,
                kind,
                packet_id,
            } => Command::Ack {
                client_id: CLIENTS[c].into(),
                epoch: self.epoch(c, stale),
                kind: [AckCmd::PubAck, AckCmd::PubRec, AckCmd::PubComp][usize::from(kind % 3)],
                packet_id,
            },
            Op::Qos2 {
                c,
                release,
                packet_id,
            } => {
                let client_id: Arc<str> = CLIENTS[c].into();
                let epoch = self.epoch(c, false);
                if release {
                    Command::Qos2Release {
                        client_id,
                        epoch,
                        packet_id,
                    }
                } else {
                    Command::Qos2Received {
                        client_id,
                        epoch,
                        packet_id,
                    }
                }
            }
            Op::DeliverRetained { c, topic, qos: q } => Command::DeliverRetained {
                client_id: CLIENTS[c].into(),
                epoch: self.epoch(c, false),
                retained: vec![RetainedForSubscription {
                    filter: TOPICS[topic].to_string(),
                    options: opts(qos(q)),
                    subscription_id: Some(1),
                    messages: vec![Arc::new(Message::new(
                        TOPICS[topic],
                        "r",
                        QoS::ExactlyOnce,
                        true,
                    ))],
                }],
            },
            Op::Advance(ms) => {
                self.now += ms;
                return None;
            }
            Op::Tick => Command::Tick,
            Op::FrontendLost(f) => Command::FrontendLost { frontend_id: f },
            Op::SharedJoin { c, leave: false } => Command::SharedJoin {
                group: GROUP.into(),
                client_id: CLIENTS[c].into(),
            },
            Op::SharedJoin { c, leave: true } => Command::SharedLeave {
                group: GROUP.into(),
                client_id: CLIENTS[c].into(),
            },
            Op::SharedDeliver {
                c,
                qos: q,
                require_online,
            } => Command::SharedDeliver {
                client_id: CLIENTS[c].into(),
                group: GROUP.into(),
                message: Arc::new(Message::new("t/1", "s", qos(q), false)),
                require_online,
            },
            Op::SharedDone { c, seq, outcome } => Command::SharedHandoffDone {
                group: GROUP.into(),
                seq,
                member: CLIENTS[c].into(),
                outcome: [
                    super::command::HandoffOutcome::Accepted,
                    super::command::HandoffOutcome::Offline,
                    super::command::HandoffOutcome::Gone,
                ][usize::from(outcome % 3)],
            },
            Op::SharedEnqueue { c } => Command::SharedEnqueue {
                group: GROUP.into(),
                from: CLIENTS[c].into(),
                messages: vec![Arc::new(Message::new("t/2", "r", QoS::AtLeastOnce, false))],
            },
            Op::SharedReturnDone { seq } => Command::SharedReturnDone { seq },
        };
        Some(Entry {
            now_ms: self.now,
            command,
        })
    }
}

/// Invariants that must hold after every step.
fn check_invariants(p: &Partition) {
    for s in p.image().sessions {
        let mut ids: Vec<u16> = s.inflight.iter().map(|i| i.packet_id).collect();
        assert!(!ids.contains(&0), "packet id 0 in flight");
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n, "duplicate packet id in flight");
        assert!(s.inflight.iter().all(|i| i.item.qos != QoS::AtMostOnce));
        if s.attachment.is_some() {
            let sent = s.inflight.iter().filter(|i| i.sent).count();
            assert!(sent <= usize::from(s.receive_maximum), "window exceeded");
            assert!(s.queue.is_empty() || s.inflight.len() >= usize::from(s.receive_maximum));
        }
        if s.attachment.is_some() {
            assert!(s.will_at_ms.is_none() && s.expires_at_ms.is_none());
        }
        if s.attachment.is_none() && s.will.is_some() {
            assert!(s.will_at_ms.is_some(), "offline will without timer");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn determinism_and_snapshot_equivalence(
        ops in prop::collection::vec(op_strategy(), 1..150),
        split in 0usize..150,
    ) {
        let limits = SessionLimits {
            max_queued_messages: 4,
            queue_qos0_offline: true,
            max_subscriptions: 4,
            shared_strategy: super::command::SharedStrategy::Random,
            queue_full: super::command::QueueFullPolicy::RefuseNew,
        };
        let mut a = Partition::new(limits);
        let mut b = Partition::new(limits);
        let mut driver = Driver { now: T0, epochs: vec![0; CLIENTS.len()] };
        let mut log: Vec<(u64, Entry)> = Vec::new();
        let mut outputs = Vec::new();
        let mut snapshot = None;
        let mut index = 0;
        for (i, op) in ops.iter().enumerate() {
            if i == split {
                snapshot = Some((log.len(), roundtrip(a.image())));
            }
            let Some(entry) = driver.entry(op) else { continue };
            index += 1;
            let ra = a.apply(index, entry.clone());
            let rb = b.apply(index, entry.clone());
            prop_assert_eq!(&ra, &rb);
            if let (Reply::Connected { epoch, .. }, Command::Connect { client_id, .. }) = (&ra.0, &entry.command) {
                let c = CLIENTS.iter().position(|x| *x == &**client_id).unwrap();
                driver.epochs[c] = *epoch;
            }
            check_invariants(&a);
            log.push((index, entry));
            outputs.push(ra);
        }
        prop_assert_eq!(image_bytes(&a), image_bytes(&b));
        // Restoring a snapshot taken mid-way and applying the rest gives the same outputs.
        let (from, image) = snapshot.unwrap_or_else(|| (log.len(), roundtrip(a.image())));
        let mut c = Partition::restore(limits, image);
        for ((index, entry), expected) in log[from..].iter().zip(&outputs[from..]) {
            let got = c.apply(*index, entry.clone());
            prop_assert_eq!(&got, expected);
        }
        prop_assert_eq!(image_bytes(&c), image_bytes(&a));
        // The image holds the sessions, not the indexes built from them: compare those too
        // (bug 12: a restore put shared subscriptions in the plain trie, which no output of
        // the ops above showed).
        prop_assert_eq!(c.derived_indexes(), a.derived_indexes());
    }
}

// ---------------------------------------------------------------------------------------------
// Shared subscriptions (one partition holds both the group and the members, as standalone
// with one partition does; the steps between them are run by `run_shared`)
// ---------------------------------------------------------------------------------------------

mod shared {
    use super::*;
    use crate::partition::command::{HandoffOutcome, SharedStrategy, SharedWork};

    const G: &str = "$share/g/t/+";

    impl H {
        /// Carries out shared-subscription work like a runtime would, to completion, and
        /// returns every other effect (deliveries, routes) in order.
        fn run_shared(&mut self, effects: Vec<Effect>) -> Vec<Effect> {
            let mut out = Vec::new();
            let mut work: std::collections::VecDeque<Effect> = effects.into();
            while let Some(e) = work.pop_front() {
                let Effect::Shared(w) = e else {
                    out.push(e);
                    continue;
                };
                match w {
                    SharedWork::Handoff {
                        group,
                        seq,
                        member,
                        message,
                        require_online,
                    } => {
                        let (r, fx) = self.apply(Command::SharedDeliver {
                            client_id: member.clone(),
                            group: group.clone(),
                            message,
                            require_online,
                        });
                        work.extend(fx);
                        let outcome = match r {
                            Reply::SharedDelivered(o) => o,
                            other => panic!("shared deliver: {other:?}"),
                        };
                        if let Some(seq) = seq {
                            let (_, fx) = self.apply(Command::SharedHandoffDone {
                                group,
                                seq,
                                member,
                                outcome,
                            });
                            work.extend(fx);
                        }
                    }
                    SharedWork::Return {
                        seq,
                        group,
                        from,
                        messages,
                    } => {
                        let (_, fx) = self.apply(Command::SharedEnqueue {
                            group,
                            from,
                            messages,
                        });
                        work.extend(fx);
                        let (_, fx) = self.apply(Command::SharedReturnDone { seq });
                        work.extend(fx);
                    }
                    SharedWork::Leave { group, client_id } => {
                        let (_, fx) = self.apply(Command::SharedLeave { group, client_id });
                        work.extend(fx);
                    }
                    // Wills go to the caller, as other effects do.
                    w @ SharedWork::Will { .. } => out.push(Effect::Shared(w)),
                }
            }
            out
        }

        /// SUBSCRIBE to the group from `id`'s session, then join it (what the router does).
        fn join(&mut self, id: &str, epoch: u64, qos: QoS) -> Vec<Effect> {
            let mut fx = self.subscribe(id, epoch, G, qos);
            let (r, more) = self.apply(Command::SharedJoin {
                group: G.into(),
                client_id: id.into(),
            });
            assert_eq!(r, Reply::Done);
            fx.extend(more);
            fx
        }

        fn publish_shared(&mut self, payload: &str, qos: QoS) -> Vec<Effect> {
            let fx = self.publish("t/1", payload, qos);
            self.run_shared(fx)
        }
    }

    #[test]
    fn a_group_gets_each_message_once_in_turn() {
        let mut h = H::new();
        let a = h.online("a");
        let b = h.online("b");
        let c = h.online("c");
        assert_eq!(routes_added(&h.join("a", a, QoS::AtLeastOnce)), vec!["t/+"]);
        assert!(routes_added(&h.join("b", b, QoS::AtLeastOnce)).is_empty());
        h.join("c", c, QoS::AtLeastOnce);
        let mut got = std::collections::BTreeMap::<String, Vec<String>>::new();
        for i in 0..6 {
            let fx = h.publish_shared(&i.to_string(), QoS::AtLeastOnce);
            let mut receivers = 0;
            for id in ["a", "b", "c"] {
                let ds = deliveries(&fx, id);
                receivers += ds.len();
                got.entry(id.into()).or_default().extend(payloads(&ds));
            }
            assert_eq!(receivers, 1, "message {i} goes to exactly one member");
        }
        for id in ["a", "b", "c"] {
            assert_eq!(got[id].len(), 2, "round robin: {got:?}");
        }
        assert!(h.p.shared_work().is_empty(), "every handoff finished");
    }

    #[test]
    fn plain_subscribers_and_groups_both_get_the_message() {
        let mut h = H::new();
        let a = h.online("a");
        let p = h.online("p");
        h.join("a", a, QoS::AtLeastOnce);
        h.subscribe("p", p, "t/#", QoS::AtLeastOnce);
        let fx = h.publish_shared("x", QoS::AtLeastOnce);
        assert_eq!(payloads(&deliveries(&fx, "a")), vec!["x"]);
        assert_eq!(payloads(&deliveries(&fx, "p")), vec!["x"]);
    }

    #[test]
    fn granted_qos_and_subscription_id_come_from_the_members_subscription() {
        let mut h = H::new();
        let a = h.online("a");
        h.subscribe_reqs("a", a, vec![sub_with(G, opts(QoS::AtMostOnce), Some(7))]);
        h.apply(Command::SharedJoin {
            group: G.into(),
            client_id: "a".into(),
        });
        let fx = h.publish_shared("x", QoS::ExactlyOnce);
        let ds = deliveries(&fx, "a");
        assert_eq!(ds.len(), 1);
        assert_eq!(ds[0].qos, QoS::AtMostOnce);
        assert_eq!(ds[0].subscription_ids, vec![7]);
    }

    #[test]
    fn connected_members_are_preferred_and_offline_ones_still_queue() {
        let mut h = H::new();
        let a = h.online("a");
        let b = h.online("b");
        h.join("a", a, QoS::AtLeastOnce);
        h.join("b", b, QoS::AtLeastOnce);
        h.drop_conn("b", b); // persistent: stays a member, offline
        for i in 0..4 {
            let fx = h.publish_shared(&i.to_string(), QoS::AtLeastOnce);
            assert_eq!(
                deliveries(&fx, "a").len(),
                1,
                "a is the only connected member"
            );
        }
        assert_eq!(h.queued("b"), 0);
        h.drop_conn("a", a);
        // Nobody connected: the message waits in a member's session.
        h.publish_shared("later", QoS::AtLeastOnce);
        let queued = h.queued("a") + h.queued("b");
        assert_eq!(queued, 1);
    }

    #[test]
    fn unacked_messages_of_a_departed_member_go_to_another_member() {
        let mut h = H::new();
        let a = h.online("a");
        let b = h.online("b");
        h.join("a", a, QoS::AtLeastOnce);
        h.join("b", b, QoS::AtLeastOnce);
        let mut to_a = Vec::new();
        for i in 0..4 {
            let fx = h.publish_shared(&i.to_string(), QoS::AtLeastOnce);
            to_a.extend(payloads(&deliveries(&fx, "a")));
        }
        assert_eq!(to_a.len(), 2);
        // a acknowledges nothing and its connection drops.
        let fx = h.drop_conn("a", a);
        let fx = h.run_shared(fx);
        assert_eq!(payloads(&deliveries(&fx, "b")), to_a, "in order, to b");
        assert!(h.p.session("a").unwrap().inflight.is_empty());
        assert!(h.p.shared_work().is_empty());
    }

    /// Bug 9 (issue 19), [MQTT-4.8.2-4]/[-5]: a QoS2 message sent to the chosen member stays
    /// with it when its connection drops before the PUBREC is applied: the member completes it
    /// when it reconnects, and no other member ever gets it (even if the session then ends).
    /// QoS1 still goes to another member.
    #[test]
    fn a_qos2_message_sent_to_a_member_stays_with_it() {
        let mut h = H::new();
        let a = h.online("a");
        let b = h.online("b");
        h.join("a", a, QoS::ExactlyOnce);
        h.join("b", b, QoS::ExactlyOnce);
        let mut to_a = Vec::new();
        for (i, q) in [
            QoS::ExactlyOnce,
            QoS::ExactlyOnce,
            QoS::AtLeastOnce,
            QoS::AtLeastOnce,
        ]
        .into_iter()
        .enumerate()
        {
            let fx = h.publish_shared(&format!("{i}"), q);
            to_a.extend(deliveries(&fx, "a"));
        }
        assert_eq!(payloads(&to_a), vec!["0", "2"]);
        assert_eq!(to_a[0].qos, QoS::ExactlyOnce);
        let fx = h.drop_conn("a", a);
        let fx = h.run_shared(fx);
        assert_eq!(
            payloads(&deliveries(&fx, "b")),
            vec!["2"],
            "only the QoS1 one moves"
        );
        let (a2, _, fx) = h.connect("a", conn());
        let again = deliveries(&fx, "a");
        assert_eq!(payloads(&again), vec!["0"]);
        assert!(again[0].dup);
        // Its session ends before it completes: the message goes to nobody else.
        let fx = h.drop_conn("a", a2);
        let fx = h.run_shared(fx);
        assert!(deliveries(&fx, "b").is_empty());
        let (_, _, fx) = h.connect("a", conn().clean(true));
        let fx = h.run_shared(fx);
        assert!(deliveries(&fx, "b").is_empty() && deliveries(&fx, "a").is_empty());
    }

    #[test]
    fn acknowledged_messages_are_not_returned() {
        let mut h = H::new();
        let a = h.online("a");
        let b = h.online("b");
        h.join("a", a, QoS::AtLeastOnce);
        h.join("b", b, QoS::AtLeastOnce);
        let fx = h.publish_shared("x", QoS::AtLeastOnce);
        let (id, epoch) = if deliveries(&fx, "a").is_empty() {
            ("b", b)
        } else {
            ("a", a)
        };
        let d = &deliveries(&fx, id)[0];
        h.ack(id, epoch, AckCmd::PubAck, d.packet_id.unwrap());
        let fx = h.drop_conn(id, epoch);
        let fx = h.run_shared(fx);
        assert!(deliveries(&fx, "a").is_empty() && deliveries(&fx, "b").is_empty());
    }

    #[test]
    fn a_session_that_ends_leaves_the_group() {
        let mut h = H::new();
        let (a, _, _) = h.connect("a", conn().expiry(0));
        h.join("a", a, QoS::AtLeastOnce);
        let fx = h.drop_conn("a", a);
        let fx = h.run_shared(fx);
        assert_eq!(routes_removed(&fx), vec!["t/+"]);
        assert!(h.p.shared_groups().is_empty());
        let (matched, _) = h.publish_msg(Message::new("t/1", "x", QoS::AtLeastOnce, false), None);
        assert!(!matched);
    }

    #[test]
    fn a_member_without_a_session_is_skipped_and_dropped_from_the_group() {
        let mut h = H::new();
        let b = h.online("b");
        h.join("b", b, QoS::AtLeastOnce);
        // "ghost" joined, but its session is gone (its leave was lost).
        h.apply(Command::SharedJoin {
            group: G.into(),
            client_id: "ghost".into(),
        });
        for i in 0..3 {
            let fx = h.publish_shared(&i.to_string(), QoS::AtLeastOnce);
            assert_eq!(deliveries(&fx, "b").len(), 1);
        }
        let members: Vec<String> = h.p.shared_groups()[G]
            .members
            .keys()
            .map(|m| m.to_string())
            .collect();
        assert_eq!(members, vec!["b"]);
    }

    #[test]
    fn retained_messages_are_not_sent_on_a_shared_subscribe() {
        let mut h = H::new();
        h.retain("t/1", "old", QoS::AtLeastOnce);
        let a = h.online("a");
        let fx = h.join("a", a, QoS::AtLeastOnce);
        assert!(deliveries(&fx, "a").is_empty());
    }

    #[test]
    fn sticky_strategy_keeps_a_publisher_on_one_member() {
        let mut h = H::with_limits(SessionLimits {
            shared_strategy: SharedStrategy::StickyByPublisher,
            ..Default::default()
        });
        for id in ["a", "b", "c"] {
            let e = h.online(id);
            h.join(id, e, QoS::AtMostOnce);
        }
        let mut receivers = std::collections::BTreeSet::new();
        for i in 0..6 {
            let m = Message::new("t/1", i.to_string(), QoS::AtLeastOnce, false);
            let (_, fx) = h.publish_msg(m, Some("pub-1"));
            let fx = h.run_shared(fx);
            for id in ["a", "b", "c"] {
                if !deliveries(&fx, id).is_empty() {
                    receivers.insert(id);
                }
            }
        }
        assert_eq!(receivers.len(), 1);
    }

    #[test]
    fn random_strategy_spreads_over_every_member() {
        let mut h = H::with_limits(SessionLimits {
            shared_strategy: SharedStrategy::Random,
            ..Default::default()
        });
        let ids = ["a", "b", "c"];
        for id in ids {
            let e = h.online(id);
            h.join(id, e, QoS::AtMostOnce);
        }
        let mut counts = std::collections::BTreeMap::<&str, usize>::new();
        for i in 0..300 {
            let fx = h.publish_shared(&i.to_string(), QoS::AtLeastOnce);
            for id in ids {
                *counts.entry(id).or_default() += deliveries(&fx, id).len();
            }
        }
        assert_eq!(counts.values().sum::<usize>(), 300, "each message once");
        for id in ids {
            // Expected 100 each; a fair hash stays well inside 50..150.
            assert!((50..150).contains(&counts[id]), "{counts:?}");
        }
    }

    #[test]
    fn pending_handoffs_survive_a_snapshot_and_are_carried_out_again() {
        let mut h = H::new();
        let a = h.online("a");
        h.join("a", a, QoS::AtLeastOnce);
        // Published, but the handoff is not carried out (the runtime crashed).
        let fx = h.publish("t/1", "x", QoS::AtLeastOnce);
        assert!(matches!(
            fx.as_slice(),
            [Effect::Shared(SharedWork::Handoff { .. })]
        ));
        let image = roundtrip(h.p.image());
        let restored = Partition::restore(SessionLimits::default(), image);
        let work = restored.shared_work();
        assert_eq!(work.len(), 1);
        h.p = restored;
        let fx = h.run_shared(work.into_iter().map(Effect::Shared).collect());
        assert_eq!(payloads(&deliveries(&fx, "a")), vec!["x"]);
        assert!(h.p.shared_work().is_empty());
        // A late answer to the same handoff changes nothing.
        let (r, fx) = h.apply(Command::SharedHandoffDone {
            group: G.into(),
            seq: 1,
            member: "a".into(),
            outcome: HandoffOutcome::Offline,
        });
        assert_eq!(r, Reply::Done);
        assert!(fx.is_empty());
    }

    /// Bug 12 (issue 19): a restore must index a shared subscription only as group
    /// membership, never as a plain filter of the member's session (a `$share/...` topic then
    /// reached the member directly, and the entry never left).
    #[test]
    fn restore_keeps_shared_subscriptions_out_of_the_plain_trie() {
        let mut h = H::new();
        let a = h.online("a");
        h.join("a", a, QoS::AtLeastOnce);
        let restored = Partition::restore(SessionLimits::default(), roundtrip(h.p.image()));
        assert_eq!(restored.subscription_count(), h.p.subscription_count());
        assert_eq!(restored.derived_indexes(), h.p.derived_indexes());
        assert_eq!(restored.filters(), vec!["t/+".to_string()]);
    }

    /// Bug 10 (issue 19): a `Gone` observed before a member's re-SUBSCRIBE, applied after its
    /// `SharedJoin`, must not remove the member (it holds a SUBACK and would never get a group
    /// message again); the handoff asks it again instead.
    #[test]
    fn a_stale_gone_does_not_remove_a_member_that_rejoined() {
        let mut h = H::new();
        let a = h.online("a");
        h.join("a", a, QoS::AtLeastOnce);
        let fx = h.publish("t/1", "x", QoS::AtLeastOnce);
        let [Effect::Shared(SharedWork::Handoff {
            seq: Some(seq),
            message,
            ..
        })] = fx.as_slice()
        else {
            panic!("{fx:?}")
        };
        // The member unsubscribes; the handoff reaches its partition now: Gone.
        h.unsubscribe("a", a, &[G]);
        let (r, _) = h.apply(Command::SharedDeliver {
            client_id: "a".into(),
            group: G.into(),
            message: message.clone(),
            require_online: true,
        });
        assert_eq!(r, Reply::SharedDelivered(HandoffOutcome::Gone));
        // It subscribes again (and rejoins) before the group learns of that Gone.
        h.join("a", a, QoS::AtLeastOnce);
        let (_, fx) = h.apply(Command::SharedHandoffDone {
            group: G.into(),
            seq: *seq,
            member: "a".into(),
            outcome: HandoffOutcome::Gone,
        });
        assert!(
            h.p.shared_groups().contains_key(G),
            "member removed: {fx:?}"
        );
        let fx = h.run_shared(fx);
        assert_eq!(payloads(&deliveries(&fx, "a")), vec!["x"]);
        let fx = h.publish_shared("y", QoS::AtLeastOnce);
        assert_eq!(payloads(&deliveries(&fx, "a")), vec!["y"]);
        // A Gone observed after the join still removes the member.
        h.unsubscribe("a", a, &[G]);
        let fx = h.publish_shared("z", QoS::AtLeastOnce);
        assert!(deliveries(&fx, "a").is_empty());
        assert!(h.p.shared_groups().is_empty());
    }

    #[test]
    fn unsubscribing_from_the_group_is_reported() {
        let mut h = H::new();
        let a = h.online("a");
        h.join("a", a, QoS::AtLeastOnce);
        let (codes, _) = h.unsubscribe("a", a, &[G, G]);
        assert_eq!(
            codes,
            vec![ReasonCode::SUCCESS, ReasonCode::NO_SUBSCRIPTION_EXISTED]
        );
    }
}

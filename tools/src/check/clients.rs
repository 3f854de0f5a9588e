//! The checker's publishers and subscribers, on the bench's lean client ([`Conn`]).
//! Each is one task with one connection at a time; every wait is bounded.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use tiermq_common::codec::{
    Connect, ConnectProperties, Disconnect, LastWill, Packet, PubAck, PubComp, PubRec, PubRel,
    Publish,
};
use tiermq_common::{ProtocolVersion, QoS, ReasonCode};
use tokio::time::{Instant, MissedTickBehavior};

use super::{
    lock, now_ms, subscriber_version, wills, Delivery, Plan, Record, Sent, Shared, SubscriberLog,
};
use crate::bench::client::{tcp_connect, Conn};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const KEEP_ALIVE: u16 = 10;
const PING_EVERY: Duration = Duration::from_secs(3);
/// Nothing heard from the broker for this long while waiting for it: reconnect.
pub const SILENCE: Duration = Duration::from_secs(12);
/// Between failed connection attempts.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// Connects with the persistent-session options the checker needs (and a will, for the will
/// clients).
pub async fn connect(
    broker: SocketAddr,
    version: ProtocolVersion,
    client_id: &str,
    clean_start: bool,
    session_expiry: u32,
    will: Option<LastWill>,
) -> anyhow::Result<Conn> {
    tokio::time::timeout(CONNECT_TIMEOUT, async {
        let stream = tcp_connect(broker, None)
            .await
            .with_context(|| format!("cannot connect to {broker}"))?;
        let conn = Conn::new(stream, version, 8192, 8192);
        let properties = if version.is_v5() {
            ConnectProperties {
                session_expiry_interval: Some(session_expiry),
                receive_maximum: Some(256),
                ..Default::default()
            }
        } else {
            ConnectProperties::default()
        };
        conn.handshake(Connect {
            protocol: version,
            clean_start,
            keep_alive: KEEP_ALIVE,
            client_id: client_id.to_string(),
            will,
            username: None,
            password: None,
            properties,
        })
        .await
    })
    .await
    .map_err(|_| anyhow::anyhow!("no CONNACK from {broker} within {CONNECT_TIMEOUT:?}"))?
}

/// Ticks every [`PING_EVERY`], the first tick one period from now: when a client pings.
pub async fn ping_interval() -> tokio::time::Interval {
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ping.tick().await;
    ping
}

/// Waits for more bytes from the broker; `Err(why)` when the connection ended.
pub async fn read_more(conn: &mut Conn) -> Result<(), String> {
    match conn.fill().await {
        Ok(0) => Err("closed by the broker".into()),
        Err(e) => Err(format!("read: {e}")),
        Ok(_) => Ok(()),
    }
}

fn packet_id(seq: u64) -> u16 {
    (seq % 65_535) as u16 + 1
}

/// Why a connection ended.
enum End {
    /// Broken, refused, silent: reconnect.
    Lost(String),
    /// The run is over.
    Done,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// PUBLISH sent, no PUBACK / PUBREC yet.
    Published,
    /// QoS2: PUBREC received, PUBREL sent, no PUBCOMP yet.
    Released,
}

/// One publisher: sends `run|id|seq` to topic `seq % topics` at the plan's rate.
pub async fn publisher(id: u32, plan: Plan, start_at: usize, record: Shared) {
    let qos = plan.qos.of(id);
    let client_id = format!("{}-pub-{id}", plan.run);
    let mut front = start_at % plan.frontends.len();
    let mut inflight: BTreeMap<u64, Stage> = BTreeMap::new();
    let mut next_seq: u64 = 0;
    let mut first = true;
    let interval = Duration::from_secs_f64(1.0 / f64::from(plan.rate.max(1)));
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    while Instant::now() < plan.hard_deadline {
        let publishing = Instant::now() < plan.publish_until;
        if !publishing && inflight.is_empty() {
            break;
        }
        let addr = plan.frontends[front];
        let mut conn = match tokio::time::timeout_at(
            plan.hard_deadline,
            connect(
                addr,
                ProtocolVersion::V5,
                &client_id,
                first,
                plan.session_expiry,
                None,
            ),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                {
                    let mut r = lock(&record);
                    let log = &mut r.publishers[id as usize];
                    log.connect_failures += 1;
                    if log.errors.len() < 50 {
                        log.errors.push(format!("{}: {e:#}", addr));
                    }
                }
                front = (front + 1) % plan.frontends.len();
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
            Err(_) => break,
        };
        {
            let mut r = lock(&record);
            let log = &mut r.publishers[id as usize];
            log.connects += 1;
            if !first && !conn.connack.session_present {
                log.sessions_lost += 1;
            }
        }
        first = false;
        let end = publish_on(
            &mut conn,
            id,
            qos,
            &plan,
            &record,
            &mut inflight,
            &mut next_seq,
            &mut tick,
        )
        .await;
        match end {
            End::Done => {
                if inflight.is_empty() {
                    // Leave nothing behind: end the session.
                    let _ = conn.push(&Packet::Disconnect(Disconnect {
                        reason_code: ReasonCode::SUCCESS,
                        properties: tiermq_common::codec::DisconnectProperties {
                            session_expiry_interval: Some(0),
                            ..Default::default()
                        },
                    }));
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn.flush()).await;
                }
                break;
            }
            End::Lost(why) => {
                let mut r = lock(&record);
                let log = &mut r.publishers[id as usize];
                if log.errors.len() < 50 {
                    log.errors.push(format!("{}: {why}", addr));
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn publish_on(
    conn: &mut Conn,
    id: u32,
    qos: QoS,
    plan: &Plan,
    record: &Shared,
    inflight: &mut BTreeMap<u64, Stage>,
    next_seq: &mut u64,
    tick: &mut tokio::time::Interval,
) -> End {
    // Resend what is unacknowledged, in order (§4.4).
    for (seq, stage) in inflight.iter() {
        let pid = packet_id(*seq);
        let packet = match stage {
            Stage::Published => {
                let mut r = lock(record);
                let sent = &mut r.publishers[id as usize].sent[*seq as usize];
                sent.sends += 1;
                let topic = sent.topic;
                drop(r);
                Packet::Publish(message(plan, id, *seq, topic, qos, Some(pid), true))
            }
            Stage::Released => Packet::PubRel(PubRel::new(pid)),
        };
        if let Err(e) = conn.push(&packet) {
            return End::Lost(format!("encode: {e}"));
        }
    }
    if let Err(e) = conn.flush().await {
        return End::Lost(format!("write: {e}"));
    }
    let mut ping = ping_interval().await;
    let mut last_heard = Instant::now();
    loop {
        let publishing = Instant::now() < plan.publish_until;
        if !publishing && inflight.is_empty() {
            return End::Done;
        }
        tokio::select! {
            _ = tick.tick(), if publishing && inflight.len() < plan.inflight => {
                let seq = *next_seq;
                *next_seq += 1;
                let topic = (seq % u64::from(plan.topics)) as u32;
                {
                    let mut r = lock(record);
                    r.publishers[id as usize].sent.push(Sent {
                        topic,
                        first_sent_ms: now_ms(),
                        sends: 1,
                        ..Default::default()
                    });
                }
                inflight.insert(seq, Stage::Published);
                let m = message(plan, id, seq, topic, qos, Some(packet_id(seq)), false);
                if let Err(e) = conn.push(&Packet::Publish(m)) {
                    return End::Lost(format!("encode: {e}"));
                }
            }
            read = read_more(conn) => {
                if let Err(why) = read {
                    return End::Lost(why);
                }
                last_heard = Instant::now();
                loop {
                    let packet = match conn.decode_buffered() {
                        Ok(Some(p)) => p,
                        Ok(None) => break,
                        Err(e) => return End::Lost(format!("{e:#}")),
                    };
                    if let Err(why) = on_publisher_packet(conn, id, packet, record, inflight) {
                        return End::Lost(why);
                    }
                }
            }
            _ = ping.tick() => {
                if !inflight.is_empty() && last_heard.elapsed() > SILENCE {
                    return End::Lost(format!("silent for {SILENCE:?}"));
                }
                if conn.push(&Packet::PingReq).is_err() {
                    return End::Lost("encode PINGREQ".into());
                }
            }
            _ = tokio::time::sleep_until(plan.hard_deadline) => return End::Done,
        }
        if let Err(e) = conn.flush().await {
            return End::Lost(format!("write: {e}"));
        }
    }
}

fn on_publisher_packet(
    conn: &mut Conn,
    id: u32,
    packet: Packet,
    record: &Shared,
    inflight: &mut BTreeMap<u64, Stage>,
) -> Result<(), String> {
    // Packet ids map back to the in-flight sequence number (unique within the window).
    let seq_of = |inflight: &BTreeMap<u64, Stage>, pid: u16| {
        inflight.keys().copied().find(|s| packet_id(*s) == pid)
    };
    match packet {
        Packet::PubAck(PubAck {
            packet_id: pid,
            reason_code,
            ..
        }) => {
            let Some(seq) = seq_of(inflight, pid) else {
                return Ok(()); // an ack for a resend already acknowledged
            };
            if inflight.get(&seq) != Some(&Stage::Published) {
                return Ok(());
            }
            inflight.remove(&seq);
            note_ack(record, id, seq, reason_code);
        }
        Packet::PubRec(PubRec {
            packet_id: pid,
            reason_code,
            ..
        }) => {
            let Some(seq) = seq_of(inflight, pid) else {
                return Ok(());
            };
            note_ack(record, id, seq, reason_code);
            if reason_code.is_error() {
                inflight.remove(&seq);
            } else {
                inflight.insert(seq, Stage::Released);
                conn.push(&Packet::PubRel(PubRel::new(pid)))
                    .map_err(|e| format!("encode: {e}"))?;
            }
        }
        Packet::PubComp(PubComp { packet_id: pid, .. }) => {
            if let Some(seq) = seq_of(inflight, pid) {
                if inflight.get(&seq) == Some(&Stage::Released) {
                    inflight.remove(&seq);
                }
            }
        }
        Packet::Disconnect(d) => return Err(format!("DISCONNECT {:?}", d.reason_code)),
        Packet::PingResp => {}
        other => return Err(format!("unexpected {} to a publisher", other.name())),
    }
    Ok(())
}

fn note_ack(record: &Shared, id: u32, seq: u64, reason: ReasonCode) {
    let mut r = lock(record);
    let Some(sent) = r.publishers[id as usize].sent.get_mut(seq as usize) else {
        return;
    };
    if reason.is_error() {
        if sent.acked_ms.is_none() {
            sent.refused = true;
        }
    } else if sent.acked_ms.is_none() {
        sent.acked_ms = Some(now_ms());
        sent.no_match = reason == ReasonCode::NO_MATCHING_SUBSCRIBERS;
    }
}

fn message(
    plan: &Plan,
    id: u32,
    seq: u64,
    topic: u32,
    qos: QoS,
    packet_id: Option<u16>,
    dup: bool,
) -> Publish {
    Publish {
        dup,
        qos,
        retain: false,
        topic: plan.topic(topic),
        packet_id,
        properties: Default::default(),
        payload: Bytes::from(format!("{}|{id}|{seq}", plan.run)),
    }
}

/// Decodes a delivery: `check/RUN/tK` with payload `RUN|publisher|seq`.
pub fn decode_delivery(plan: &Plan, p: &Publish) -> Delivery {
    let text = String::from_utf8_lossy(&p.payload).to_string();
    let mut parts = text.split('|');
    let (Some(run), Some(publisher), Some(seq), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Delivery::Unexpected(format!("{} {text:?}", p.topic));
    };
    let (Ok(publisher), Ok(seq)) = (publisher.parse::<u32>(), seq.parse::<u64>()) else {
        return Delivery::Unexpected(format!("{} {text:?}", p.topic));
    };
    if run != plan.run {
        return Delivery::Unexpected(format!("{} {text:?}", p.topic));
    }
    let topic = (seq % u64::from(plan.topics.max(1))) as u32;
    Delivery::Message {
        publisher,
        seq,
        topic,
        topic_ok: p.topic == plan.topic(topic),
        qos: p.qos as u8,
        dup: p.dup,
        packet_id: p.packet_id,
    }
}

/// What a subscriber listens to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// The publishers' messages, `check/RUN/#`.
    Checks,
    /// The will clients' wills, `checkwill/RUN/#` (outside the checks' filter).
    Wills,
}

impl Feed {
    fn client_id(self, plan: &Plan, id: u32) -> String {
        match self {
            Feed::Checks => format!("{}-sub-{id}", plan.run),
            Feed::Wills => format!("{}-willsub-{id}", plan.run),
        }
    }

    fn filter(self, plan: &Plan) -> String {
        match self {
            Feed::Checks => plan.filter(),
            Feed::Wills => wills::filter(plan),
        }
    }

    fn decode(self, plan: &Plan, p: &Publish) -> Delivery {
        match self {
            Feed::Checks => decode_delivery(plan, p),
            Feed::Wills => wills::decode(plan, p),
        }
    }

    fn log(self, record: &mut Record, id: u32) -> &mut SubscriberLog {
        match self {
            Feed::Checks => &mut record.subscribers[id as usize],
            Feed::Wills => &mut record.will_subscribers[id as usize],
        }
    }
}

/// One persistent subscriber on its feed's filter (QoS2), acknowledging everything it
/// receives.
pub async fn subscriber(
    feed: Feed,
    id: u32,
    plan: Plan,
    start_at: usize,
    record: Shared,
    stop: tokio::sync::watch::Receiver<bool>,
    ready: tokio::sync::mpsc::Sender<Result<(), String>>,
) {
    let version = subscriber_version(id);
    let client_id = feed.client_id(&plan, id);
    let mut front = start_at % plan.frontends.len();
    let mut subscribed = false;
    // QoS2 packet ids received and not yet released: a PUBLISH with one of them is the same
    // message again (§4.3.3), whatever connection it arrives on.
    let mut awaiting_release: HashSet<u16> = HashSet::new();
    let mut stop = stop;
    while Instant::now() < plan.hard_deadline && !*stop.borrow() {
        let addr = plan.frontends[front];
        let mut conn = match connect(
            addr,
            version,
            &client_id,
            // Never clean: a 3.1.1 clean session would end at the first disconnect. Run names
            // are unique, so there is no old session to clear.
            false,
            plan.session_expiry,
            None,
        )
        .await
        {
            Ok(c) => c,
            Err(e) => {
                {
                    let mut r = lock(&record);
                    let log = feed.log(&mut r, id);
                    log.connect_failures += 1;
                    if log.errors.len() < 50 {
                        log.errors.push(format!("{addr}: {e:#}"));
                    }
                }
                front = (front + 1) % plan.frontends.len();
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
        };
        {
            let mut r = lock(&record);
            let log = feed.log(&mut r, id);
            log.connects += 1;
            if subscribed && !conn.connack.session_present {
                log.sessions_lost += 1;
                if log.errors.len() < 50 {
                    log.errors
                        .push(format!("{addr}: session not present after reconnect"));
                }
            }
        }
        if !conn.connack.session_present {
            // A new session knows none of the old one's QoS2 exchanges (§4.1: the client
            // discards its session state too); keeping them would drop new messages that
            // reuse those packet ids.
            awaiting_release.clear();
        }
        if !subscribed || !conn.connack.session_present {
            let filter = vec![feed.filter(&plan)];
            match tokio::time::timeout(
                Duration::from_secs(20),
                conn.subscribe(&filter, QoS::ExactlyOnce),
            )
            .await
            {
                Ok(Ok(())) => {
                    if !subscribed {
                        subscribed = true;
                        let _ = ready.send(Ok(())).await;
                    }
                }
                Ok(Err(e)) => {
                    feed.log(&mut lock(&record), id)
                        .errors
                        .push(format!("{addr}: subscribe: {e:#}"));
                    tokio::time::sleep(RETRY_PAUSE).await;
                    continue;
                }
                Err(_) => {
                    feed.log(&mut lock(&record), id)
                        .errors
                        .push(format!("{addr}: no SUBACK within 20s"));
                    continue;
                }
            }
        }
        let end = receive_on(
            &mut conn,
            feed,
            id,
            &plan,
            &record,
            &mut awaiting_release,
            &mut stop,
        )
        .await;
        match end {
            End::Done => {
                conn.disconnect().await;
                break;
            }
            End::Lost(why) => {
                let mut r = lock(&record);
                let log = feed.log(&mut r, id);
                if log.errors.len() < 50 {
                    log.errors.push(format!("{addr}: {why}"));
                }
            }
        }
    }
    if !subscribed {
        let _ = ready.send(Err("never subscribed".into())).await;
    }
}

async fn receive_on(
    conn: &mut Conn,
    feed: Feed,
    id: u32,
    plan: &Plan,
    record: &Shared,
    awaiting_release: &mut HashSet<u16>,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> End {
    let mut ping = ping_interval().await;
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            read = read_more(conn) => {
                if let Err(why) = read {
                    return End::Lost(why);
                }
                last_heard = Instant::now();
                loop {
                    let packet = match conn.decode_buffered() {
                        Ok(Some(p)) => p,
                        Ok(None) => break,
                        Err(e) => return End::Lost(format!("{e:#}")),
                    };
                    match packet {
                        Packet::Publish(p) => {
                            let fresh = match (p.qos, p.packet_id) {
                                (QoS::ExactlyOnce, Some(pid)) => awaiting_release.insert(pid),
                                _ => true,
                            };
                            if fresh {
                                let d = feed.decode(plan, &p);
                                let mut r = lock(record);
                                let log = feed.log(&mut r, id);
                                if let Some(key) = d.key() {
                                    log.seen.insert(key);
                                }
                                log.deliveries.push(d);
                            }
                            let ack = match (p.qos, p.packet_id) {
                                (QoS::AtLeastOnce, Some(pid)) => Some(Packet::PubAck(PubAck::new(pid))),
                                (QoS::ExactlyOnce, Some(pid)) => Some(Packet::PubRec(PubRec::new(pid))),
                                _ => None,
                            };
                            if let Some(ack) = ack {
                                if conn.push(&ack).is_err() {
                                    return End::Lost("encode ack".into());
                                }
                            }
                        }
                        Packet::PubRel(r) => {
                            awaiting_release.remove(&r.packet_id);
                            if conn.push(&Packet::PubComp(PubComp::new(r.packet_id))).is_err() {
                                return End::Lost("encode PUBCOMP".into());
                            }
                        }
                        Packet::PingResp | Packet::SubAck(_) => {}
                        Packet::Disconnect(d) => return End::Lost(format!("DISCONNECT {:?}", d.reason_code)),
                        other => return End::Lost(format!("unexpected {} to a subscriber", other.name())),
                    }
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > SILENCE {
                    return End::Lost(format!("silent for {SILENCE:?}"));
                }
                if conn.push(&Packet::PingReq).is_err() {
                    return End::Lost("encode PINGREQ".into());
                }
            }
            _ = stop.changed() => return End::Done,
            _ = tokio::time::sleep_until(plan.hard_deadline) => return End::Done,
        }
        if let Err(e) = conn.flush().await {
            return End::Lost(format!("write: {e}"));
        }
    }
}

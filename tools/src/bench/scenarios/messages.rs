//! pairs, fan-in and fan-out: open-loop publishers, subscribers that check every delivery
//! and record its latency from the message's intended send time.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::BytesMut;
use hdrhistogram::Histogram;
use tiermq_common::codec::{self, Packet, PubAck, PubComp, PubRec, PubRel};
use tiermq_common::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{new_histogram, BrokerProbe, Ctx};
use crate::bench::client::{Conn, PublishTemplate};
use crate::bench::payload::{instant_of, now_ns, Stamp};
use crate::bench::report::{BenchResult, Latency};
use crate::bench::schedule::Schedule;
use crate::bench::tracker::{tally, Receiver};
use crate::bench::{LoadArgs, Scenario};

/// Messages encoded per socket write at most.
const BATCH: u64 = 256;

/// Who publishes where, who subscribes to what, and who must receive whose messages.
struct Plan {
    pub_topics: Vec<String>,
    sub_filters: Vec<String>,
    /// Per publisher: the receiver sets that must each get all its messages.
    sets: Vec<Vec<Vec<usize>>>,
}

fn plan(ctx: &Ctx) -> Plan {
    let a = &ctx.a;
    match ctx.scenario {
        Scenario::Pairs => {
            let n = a.publishers.or(a.subscribers).unwrap_or(10).max(1);
            let topics: Vec<String> = (0..n).map(|i| ctx.topic(&format!("pairs/{i}"))).collect();
            Plan {
                sub_filters: topics.clone(),
                pub_topics: topics,
                sets: (0..n).map(|i| vec![vec![i]]).collect(),
            }
        }
        Scenario::FanIn => {
            let p = a.publishers.unwrap_or(10).max(1);
            let s = a.subscribers.unwrap_or(if a.shared { 4 } else { 1 }).max(1);
            let filter = ctx.topic("fanin/+");
            let (filter, sets) = if a.shared {
                (
                    format!("$share/bench/{filter}"),
                    vec![vec![(0..s).collect::<Vec<_>>()]; p],
                )
            } else {
                (filter, vec![(0..s).map(|i| vec![i]).collect::<Vec<_>>(); p])
            };
            Plan {
                pub_topics: (0..p).map(|i| ctx.topic(&format!("fanin/{i}"))).collect(),
                sub_filters: vec![filter; s],
                sets,
            }
        }
        _ => {
            let p = a.publishers.unwrap_or(1).max(1);
            let s = a.subscribers.unwrap_or(10).max(1);
            let topic = ctx.topic("fanout");
            Plan {
                pub_topics: vec![topic.clone(); p],
                sub_filters: vec![topic; s],
                sets: vec![(0..s).map(|i| vec![i]).collect::<Vec<_>>(); p],
            }
        }
    }
}

/// What a subscriber task hands back.
pub(super) struct SubOut {
    pub(super) receiver: Receiver,
    pub(super) hist: Histogram<u64>,
    /// When the last bench message arrived (0 = none).
    pub(super) last_ns: u64,
    /// Distinct messages when it stopped (retained scenario).
    pub(super) error: Option<String>,
}

/// Reads deliveries until `stop`, acknowledging QoS1/2. With `target`, also stops once that
/// many messages arrived. Latency is recorded in microseconds from the payload's send time.
pub(super) async fn subscriber(
    mut conn: Conn,
    stop: CancellationToken,
    received: Arc<AtomicU64>,
    target: Option<u64>,
) -> SubOut {
    let mut out = SubOut {
        receiver: Receiver::default(),
        hist: new_histogram(),
        last_ns: 0,
        error: None,
    };
    let mut count = 0u64;
    'outer: loop {
        let n = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = conn.fill() => r,
        };
        match n {
            Ok(0) => {
                out.error = Some("broker closed the connection".into());
                break;
            }
            Err(e) => {
                out.error = Some(format!("read: {e}"));
                break;
            }
            Ok(_) => {}
        }
        let now = now_ns();
        let mut got = 0u64;
        loop {
            let p = match conn.decode_buffered() {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    out.error = Some(e.to_string());
                    break 'outer;
                }
            };
            let ack = match p {
                Packet::Publish(p) => {
                    if let Some(s) = Stamp::read(&p.payload) {
                        let us = now.saturating_sub(s.sent_ns) / 1000;
                        out.hist.saturating_record(us.max(1));
                        out.receiver.record(s.publisher, s.seq);
                        got += 1;
                    }
                    match (p.qos, p.packet_id) {
                        (QoS::AtLeastOnce, Some(id)) => Some(Packet::PubAck(PubAck::new(id))),
                        (QoS::ExactlyOnce, Some(id)) => Some(Packet::PubRec(PubRec::new(id))),
                        _ => None,
                    }
                }
                Packet::PubRel(r) => Some(Packet::PubComp(PubComp::new(r.packet_id))),
                Packet::Disconnect(d) => {
                    out.error = Some(format!("DISCONNECT {:?}", d.reason_code));
                    break 'outer;
                }
                _ => None,
            };
            if let Some(ack) = ack {
                let _ = conn.push(&ack);
            }
        }
        if got > 0 {
            received.fetch_add(got, Ordering::Relaxed);
            out.last_ns = now;
            count += got;
        }
        if let Err(e) = conn.flush().await {
            out.error = Some(format!("write: {e}"));
            break;
        }
        if target.is_some_and(|t| count >= t) {
            break;
        }
    }
    if out.error.is_none() {
        conn.disconnect().await;
    }
    out
}

/// What a publisher task hands back.
#[derive(Default)]
struct PubOut {
    sent: u64,
    acked: u64,
    /// Scheduled messages that could not be sent before the hard deadline.
    unsent: u64,
    error: Option<String>,
}

/// In-flight bookkeeping shared by a publisher's writer and its ack reader.
struct Inflight {
    count: AtomicUsize,
    acked: AtomicU64,
    notify: Notify,
}

/// Publishes on `sched` (open loop) or as fast as possible (`sched.rate == 0`, until
/// `sched.end_ns`). QoS1/2 keep at most `window` messages unacknowledged. Gives up at
/// `hard_end_ns` whatever is left.
#[allow(clippy::too_many_arguments)]
async fn publisher(
    conn: Conn,
    id: u32,
    tmpl: PublishTemplate,
    qos: QoS,
    sched: Schedule,
    window: usize,
    hard_end_ns: u64,
    sent_counter: Arc<AtomicU64>,
) -> PubOut {
    let mut out = PubOut::default();
    let version = conn.version;
    let (mut rd, mut wr) = conn.stream.into_split();
    let inflight = Arc::new(Inflight {
        count: AtomicUsize::new(0),
        acked: AtomicU64::new(0),
        notify: Notify::new(),
    });
    let (rel_tx, mut rel_rx) = mpsc::unbounded_channel::<u16>();
    let stop_reader = CancellationToken::new();
    // Ack reader: PUBACK/PUBCOMP free a slot, PUBREC asks the writer for a PUBREL.
    let reader = {
        let inflight = inflight.clone();
        let stop = stop_reader.clone();
        let mut rbuf = conn.rbuf;
        tokio::spawn(async move {
            loop {
                loop {
                    match codec::decode(&mut rbuf, Some(version), 1 << 20) {
                        Ok(Some(Packet::PubAck(_))) | Ok(Some(Packet::PubComp(_))) => {
                            inflight.count.fetch_sub(1, Ordering::AcqRel);
                            inflight.acked.fetch_add(1, Ordering::Relaxed);
                            inflight.notify.notify_one();
                        }
                        Ok(Some(Packet::PubRec(r))) => {
                            let _ = rel_tx.send(r.packet_id);
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(_) => return,
                    }
                }
                if rbuf.capacity() - rbuf.len() < 1024 {
                    rbuf.reserve(16 * 1024);
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = rd.read_buf(&mut rbuf) => if !matches!(r, Ok(n) if n > 0) {
                        inflight.notify.notify_one();
                        return;
                    }
                }
            }
        })
    };
    let max_rate = sched.rate == 0;
    let total = sched.total();
    let mut wbuf = BytesMut::with_capacity(tmpl.len() * BATCH as usize + 64);
    let mut k = 0u64;
    let mut pid: u16 = 0;
    let hard_end = instant_of(hard_end_ns);
    loop {
        while let Ok(r) = rel_rx.try_recv() {
            let _ = codec::encode(&Packet::PubRel(PubRel::new(r)), version, &mut wbuf);
        }
        let now = now_ns();
        let finished = if max_rate {
            now >= sched.end_ns
        } else {
            k >= total
        };
        if !finished {
            let due = if max_rate { k + BATCH } else { sched.due(now) };
            let mut n = 0;
            while k < due && n < BATCH {
                if qos != QoS::AtMostOnce {
                    if inflight.count.load(Ordering::Acquire) >= window {
                        break;
                    }
                    inflight.count.fetch_add(1, Ordering::AcqRel);
                    pid = if pid == u16::MAX { 1 } else { pid + 1 };
                }
                let sent_ns = if max_rate { now } else { sched.intended_ns(k) };
                tmpl.write(
                    &mut wbuf,
                    pid,
                    &Stamp {
                        sent_ns,
                        publisher: id,
                        seq: k,
                    },
                );
                k += 1;
                n += 1;
            }
            if n > 0 {
                sent_counter.fetch_add(n, Ordering::Relaxed);
            }
        }
        if !wbuf.is_empty() {
            match tokio::time::timeout_at(hard_end.into(), wr.write_all(&wbuf)).await {
                Ok(Ok(())) => wbuf.clear(),
                Ok(Err(e)) => {
                    out.error = Some(format!("write: {e}"));
                    break;
                }
                Err(_) => {
                    out.error = Some("write blocked past the deadline".into());
                    break;
                }
            }
            if max_rate {
                tokio::task::yield_now().await;
            }
            continue;
        }
        let now = now_ns();
        let waiting_acks = qos != QoS::AtMostOnce && inflight.count.load(Ordering::Acquire) > 0;
        if finished && !waiting_acks {
            break;
        }
        if now >= hard_end_ns {
            if !finished && !max_rate {
                out.unsent = total - k;
            }
            break;
        }
        let blocked = qos != QoS::AtMostOnce && inflight.count.load(Ordering::Acquire) >= window;
        let wake = if finished || blocked || max_rate {
            hard_end_ns
        } else {
            sched.intended_ns(k)
        };
        if wake <= now {
            continue;
        }
        tokio::select! {
            Some(r) = rel_rx.recv() => {
                let _ = codec::encode(&Packet::PubRel(PubRel::new(r)), version, &mut wbuf);
            }
            _ = inflight.notify.notified(), if qos != QoS::AtMostOnce => {}
            _ = tokio::time::sleep_until(instant_of(wake).into()) => {}
        }
    }
    out.sent = k;
    out.acked = inflight.acked.load(Ordering::Relaxed);
    stop_reader.cancel();
    let _ = reader.await;
    let _ = codec::encode(
        &Packet::Disconnect(codec::Disconnect {
            reason_code: tiermq_common::ReasonCode::SUCCESS,
            properties: Default::default(),
        }),
        version,
        &mut wbuf,
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.write_all(&wbuf)).await;
    out
}

pub(super) fn window_of(a: &LoadArgs, conn: &Conn) -> usize {
    let broker_max = conn.connack.properties.receive_maximum.unwrap_or(u16::MAX);
    usize::from(a.window.clamp(1, broker_max.max(1)))
}

/// pairs, fan-in, fan-out.
pub(super) async fn run(ctx: &Ctx) -> anyhow::Result<BenchResult> {
    let a = &ctx.a;
    let qos = a.qos();
    let plan = plan(ctx);
    let (np, ns) = (plan.pub_topics.len(), plan.sub_filters.len());

    // Subscribers first, each subscribed before anything is published.
    let sub_ids = (0..ns).map(|i| format!("{}-s{i}", ctx.prefix)).collect();
    let mut subs = ctx
        .connect_many(sub_ids, 0)
        .await
        .context("connecting subscribers")?;
    let mut set = JoinSet::new();
    for (i, (mut c, f)) in subs
        .drain(..)
        .zip(plan.sub_filters.iter().cloned())
        .enumerate()
    {
        set.spawn(async move { c.subscribe(&[f], qos).await.map(|_| (i, c)) });
    }
    let mut subs: Vec<Option<Conn>> = (0..ns).map(|_| None).collect();
    while let Some(r) = set.join_next().await {
        let (i, c) = r.context("subscribe task")?.context("subscribing")?;
        subs[i] = Some(c);
    }
    let pub_ids = (0..np).map(|i| format!("{}-p{i}", ctx.prefix)).collect();
    let pubs = ctx
        .connect_many(pub_ids, 1)
        .await
        .context("connecting publishers")?;
    // Let the broker settle subscriptions (a cluster propagates routes asynchronously).
    tokio::time::sleep(Duration::from_millis(200)).await;

    let received = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let probe = BrokerProbe::start(a);
    let sub_tasks: Vec<_> = subs
        .into_iter()
        .map(|c| {
            tokio::spawn(subscriber(
                c.expect("subscribed"),
                stop.clone(),
                received.clone(),
                None,
            ))
        })
        .collect();

    let start_ns = now_ns() + 50_000_000;
    let end_ns = start_ns + a.duration.as_nanos() as u64;
    let hard_end_ns = end_ns + a.drain.as_nanos() as u64;
    let mut pub_tasks = Vec::with_capacity(np);
    for (i, (c, topic)) in pubs.into_iter().zip(plan.pub_topics.iter()).enumerate() {
        let tmpl = PublishTemplate::new(a.mqtt, topic, qos, false, a.payload)?;
        let sched = Schedule::staggered(start_ns, end_ns, a.rate, i as u64, np as u64);
        let window = window_of(a, &c);
        pub_tasks.push(tokio::spawn(publisher(
            c,
            i as u32,
            tmpl,
            qos,
            sched,
            window,
            hard_end_ns,
            sent.clone(),
        )));
    }

    let bar = ctx.bar(a.duration.as_millis() as u64, "publishing");
    while now_ns() < end_ns {
        tokio::time::sleep(Duration::from_millis(100)).await;
        bar.set_position(now_ns().saturating_sub(start_ns) / 1_000_000);
        bar.set_message(format!(
            "sent {} recv {}",
            sent.load(Ordering::Relaxed),
            received.load(Ordering::Relaxed)
        ));
    }
    let mut pub_outs = Vec::with_capacity(np);
    for t in pub_tasks {
        pub_outs.push(t.await.context("publisher task")?);
    }
    let sent_per: Vec<u64> = pub_outs.iter().map(|p| p.sent).collect();
    let expected: u64 = sent_per
        .iter()
        .zip(&plan.sets)
        .map(|(s, sets)| s * sets.len() as u64)
        .sum();
    // Drain: until everything expected arrived, nothing arrived for a second, or the limit.
    let drain_end = Instant::now() + a.drain;
    let (mut last, mut last_change) = (received.load(Ordering::Relaxed), Instant::now());
    while Instant::now() < drain_end {
        let r = received.load(Ordering::Relaxed);
        if r >= expected {
            break;
        }
        if r != last {
            (last, last_change) = (r, Instant::now());
        } else if last_change.elapsed() > Duration::from_secs(1) {
            break;
        }
        bar.set_message(format!("draining, recv {r}/{expected}"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bar.finish_and_clear();
    stop.cancel();
    let mut receivers = Vec::with_capacity(ns);
    let mut hist = new_histogram();
    let mut last_ns = 0;
    let mut errors = Vec::new();
    for t in sub_tasks {
        let o = t.await.context("subscriber task")?;
        hist.add(&o.hist).ok();
        last_ns = last_ns.max(o.last_ns);
        if let Some(e) = o.error {
            errors.push(format!("subscriber: {e}"));
        }
        receivers.push(o.receiver);
    }
    let t = tally(&sent_per, &plan.sets, &receivers);

    let mut r = ctx.base_result();
    r.publishers = np;
    r.subscribers = ns;
    r.sent = sent_per.iter().sum();
    r.acked = pub_outs.iter().map(|p| p.acked).sum();
    r.unsent = pub_outs.iter().map(|p| p.unsent).sum();
    r.tally = t;
    r.send_rate = r.sent as f64 / a.duration.as_secs_f64();
    let span = last_ns
        .saturating_sub(start_ns)
        .max(a.duration.as_nanos() as u64 / 2);
    r.delivered_rate = t.received as f64 / (span as f64 / 1e9);
    r.latency = Latency::of(&hist);
    probe.finish(&mut r, t.received);
    errors.extend(
        pub_outs
            .iter()
            .filter_map(|p| p.error.clone().map(|e| format!("publisher: {e}"))),
    );
    errors.sort();
    errors.dedup();
    r.notes = errors;
    Ok(r)
}

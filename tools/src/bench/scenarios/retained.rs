//! retained: publish `--topics` retained messages, then time wildcard subscribers until the
//! last of them arrives.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tiermq_common::codec::{Packet, PubRel, Subscribe};
use tiermq_common::session_api::SubscriptionOptions;
use tiermq_common::QoS;
use tokio_util::sync::CancellationToken;

use super::messages::{subscriber, window_of};
use super::{new_histogram, BrokerProbe, Ctx};
use crate::bench::client::PublishTemplate;
use crate::bench::payload::{now_ns, Stamp};
use crate::bench::report::{BenchResult, Latency};
use crate::bench::tracker::tally;

/// retained: publish `topics` retained messages, then subscribe with a wildcard.
pub(super) async fn run(ctx: &Ctx) -> anyhow::Result<BenchResult> {
    let a = &ctx.a;
    let qos = a.qos();
    let k_total = a.topics.max(1) as u64;
    let np = a.publishers.unwrap_or(1).max(1);
    let ns = a.subscribers.unwrap_or(10).max(1);
    let deadline = Instant::now() + a.duration + a.drain;

    // Phase 1: publish, QoS1/2 pipelined within the window, until all are acknowledged.
    let pubs = ctx
        .connect_many(
            (0..np).map(|i| format!("{}-rp{i}", ctx.prefix)).collect(),
            1,
        )
        .await?;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (p, mut c) in pubs.into_iter().enumerate() {
        let window = window_of(a, &c);
        let prefix = ctx.topic("retained");
        let (version, payload) = (a.mqtt, a.payload);
        tasks.push(tokio::spawn(async move {
            let mut inflight = 0usize;
            let mut pid = 0u16;
            let mut acked = 0u64;
            let mut i = p as u64;
            let mut sent = 0u64;
            while (i < k_total || inflight > 0) && Instant::now() < deadline {
                while i < k_total && inflight < window && c.wbuf.len() < 64 * 1024 {
                    let t = PublishTemplate::new(
                        version,
                        &format!("{prefix}/{i}"),
                        qos,
                        true,
                        payload,
                    )?;
                    if qos != QoS::AtMostOnce {
                        pid = if pid == u16::MAX { 1 } else { pid + 1 };
                        inflight += 1;
                    }
                    t.write(
                        &mut c.wbuf,
                        pid,
                        &Stamp {
                            sent_ns: now_ns(),
                            publisher: 0,
                            seq: i,
                        },
                    );
                    i += np as u64;
                    sent += 1;
                }
                c.flush().await?;
                if qos == QoS::AtMostOnce {
                    continue;
                }
                if inflight == 0 {
                    continue;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, c.next()).await {
                    Ok(Ok(Some(Packet::PubAck(_)))) | Ok(Ok(Some(Packet::PubComp(_)))) => {
                        inflight -= 1;
                        acked += 1;
                    }
                    Ok(Ok(Some(Packet::PubRec(r)))) => {
                        c.push(&Packet::PubRel(PubRel::new(r.packet_id)))?;
                    }
                    Ok(Ok(Some(_))) => {}
                    Ok(Ok(None)) => bail!("broker closed the publisher"),
                    Ok(Err(e)) => return Err(e),
                    Err(_) => break,
                }
            }
            c.disconnect().await;
            anyhow::Ok((sent, acked))
        }));
    }
    let (mut sent, mut acked) = (0, 0);
    for t in tasks {
        let (s, k) = t.await.context("retained publisher")??;
        sent += s;
        acked += k;
    }
    let publish_secs = t0.elapsed().as_secs_f64();
    if qos == QoS::AtMostOnce {
        // No acknowledgement to wait for: give the broker a moment to store the last ones.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Phase 2: subscribers connect, then all subscribe at once.
    let mut subs = ctx
        .connect_many(
            (0..ns).map(|i| format!("{}-rs{i}", ctx.prefix)).collect(),
            0,
        )
        .await?;
    let filter = ctx.topic("retained/#");
    let probe = BrokerProbe::start(a);
    let received = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let sub_start = now_ns();
    let mut tasks = Vec::new();
    for c in subs.drain(..) {
        let (filter, stop, received) = (filter.clone(), stop.clone(), received.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = c;
            c.push(&Packet::Subscribe(Subscribe {
                packet_id: 1,
                filters: vec![(
                    filter,
                    SubscriptionOptions {
                        qos,
                        ..Default::default()
                    },
                )],
                properties: Default::default(),
            }))
            .ok();
            let _ = c.flush().await;
            subscriber(c, stop, received, Some(k_total)).await
        }));
    }
    let expected = k_total * ns as u64;
    let bar = ctx.bar(expected, "receiving retained");
    while Instant::now() < deadline && received.load(Ordering::Relaxed) < expected {
        tokio::time::sleep(Duration::from_millis(50)).await;
        bar.set_position(received.load(Ordering::Relaxed));
    }
    bar.finish_and_clear();
    stop.cancel();
    let mut receivers = Vec::new();
    let mut to_last = new_histogram();
    let mut notes = Vec::new();
    let mut last_ns = sub_start;
    for t in tasks {
        let o = t.await.context("retained subscriber")?;
        if o.last_ns > 0 {
            to_last.saturating_record(((o.last_ns - sub_start) / 1000).max(1));
            last_ns = last_ns.max(o.last_ns);
        }
        notes.extend(o.error);
        receivers.push(o.receiver);
    }
    let sets = vec![(0..ns).map(|i| vec![i]).collect::<Vec<_>>()];
    let mut t = tally(&[k_total], &sets, &receivers);
    // Retained messages of different topics have no defined order.
    t.out_of_order = 0;
    let mut r = ctx.base_result();
    r.publishers = np;
    r.subscribers = ns;
    r.sent = sent;
    r.acked = acked;
    r.tally = t;
    r.send_rate = sent as f64 / publish_secs.max(1e-9);
    let span = (last_ns - sub_start) as f64 / 1e9;
    r.delivered_rate = if span > 0.0 {
        t.received as f64 / span
    } else {
        0.0
    };
    r.time_to_last_retained_ms = Some(span * 1000.0);
    // "Latency" here: per subscriber, time from SUBSCRIBE to its last retained message.
    r.latency = Latency::of(&to_last);
    r.topics = Some(k_total);
    probe.finish(&mut r, t.received);
    notes.sort();
    notes.dedup();
    r.notes = notes;
    Ok(r)
}

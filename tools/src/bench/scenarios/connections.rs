//! conn-storm (connects per second, with takeovers) and idle (broker memory per connection).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::task::JoinSet;

use super::{new_histogram, BrokerProbe, Ctx};
use crate::bench::client::Conn;
use crate::bench::payload::{instant_of, now_ns};
use crate::bench::report::{BenchResult, Latency};
use crate::bench::schedule::Schedule;

/// conn-storm: `publishers` workers, each reconnecting with its own fixed client id.
pub(super) async fn conn_storm(ctx: &Ctx) -> anyhow::Result<BenchResult> {
    let a = &ctx.a;
    let workers = a.publishers.unwrap_or(50).max(1);
    let probe = BrokerProbe::start(a);
    let connected = Arc::new(AtomicU64::new(0));
    let start_ns = now_ns() + 20_000_000;
    let end_ns = start_ns + a.duration.as_nanos() as u64;
    let hard_end_ns = end_ns + a.drain.as_nanos() as u64;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let mut opts = ctx.options(format!("{}-storm{w}", ctx.prefix), w);
        opts.timeout = Duration::from_secs(5);
        let sources = a.source_ips.clone();
        let connected = connected.clone();
        let sched = Schedule::staggered(start_ns, end_ns, a.rate, w as u64, workers as u64);
        tasks.push(tokio::spawn(async move {
            let mut hist = new_histogram();
            let (mut ok, mut failed) = (0u64, 0u64);
            let mut prev: Option<Conn> = None;
            let mut k = 0u64;
            let mut error = None;
            loop {
                let now = now_ns();
                if now >= end_ns || now >= hard_end_ns || (sched.rate > 0 && k >= sched.total()) {
                    break;
                }
                let intended = if sched.rate == 0 {
                    now
                } else {
                    let t = sched.intended_ns(k);
                    if t > now {
                        tokio::time::sleep_until(instant_of(t).into()).await;
                    }
                    t
                };
                if !sources.is_empty() {
                    opts.source = Some(sources[(k as usize + w) % sources.len()]);
                }
                k += 1;
                match Conn::connect(&opts).await {
                    Ok(c) => {
                        ok += 1;
                        connected.fetch_add(1, Ordering::Relaxed);
                        let us = now_ns().saturating_sub(intended) / 1000;
                        hist.saturating_record(us.max(1));
                        // The new connection took the session over; drop the old socket.
                        prev = Some(c);
                    }
                    Err(e) => {
                        failed += 1;
                        error.get_or_insert(format!("{e:#}"));
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            if let Some(c) = prev {
                c.disconnect().await;
            }
            (hist, ok, failed, error)
        }));
    }
    let bar = ctx.bar(a.duration.as_millis() as u64, "connecting");
    while now_ns() < end_ns {
        tokio::time::sleep(Duration::from_millis(100)).await;
        bar.set_position(now_ns().saturating_sub(start_ns) / 1_000_000);
        bar.set_message(format!("connects {}", connected.load(Ordering::Relaxed)));
    }
    bar.finish_and_clear();
    let mut hist = new_histogram();
    let (mut ok, mut failed) = (0, 0);
    let mut notes = Vec::new();
    for t in tasks {
        let (h, o, f, e) = t.await.context("storm worker")?;
        hist.add(&h).ok();
        ok += o;
        failed += f;
        notes.extend(e);
    }
    let elapsed = (now_ns().saturating_sub(start_ns)) as f64 / 1e9;
    let mut r = ctx.base_result();
    r.publishers = workers;
    r.connections = ok;
    r.connect_errors = failed;
    r.connect_rate = Some(ok as f64 / elapsed.max(a.duration.as_secs_f64()));
    r.delivered_rate = r.connect_rate.unwrap_or(0.0);
    r.latency = Latency::of(&hist);
    probe.finish(&mut r, ok);
    notes.sort();
    notes.dedup();
    notes.truncate(5);
    r.notes = notes;
    Ok(r)
}

/// idle: open connections, keep them idle, read the broker's RSS.
pub(super) async fn idle(ctx: &Ctx) -> anyhow::Result<BenchResult> {
    let a = &ctx.a;
    let n = a.connections.max(1);
    let probe = BrokerProbe::start(a);
    let t0 = Instant::now();
    let conns = ctx
        .connect_many((0..n).map(|i| format!("{}-i{i}", ctx.prefix)).collect(), 0)
        .await?;
    let connect_secs = t0.elapsed().as_secs_f64();
    let bar = ctx.bar(a.duration.as_millis() as u64, "holding idle connections");
    let hold_end = Instant::now() + a.duration;
    while Instant::now() < hold_end {
        tokio::time::sleep(Duration::from_millis(100)).await;
        bar.set_position((a.duration.saturating_sub(hold_end - Instant::now())).as_millis() as u64);
    }
    bar.finish_and_clear();
    let mut r = ctx.base_result();
    r.case = a.case.clone().unwrap_or_else(|| format!("idle-{n}"));
    r.connections = n as u64;
    r.connect_rate = Some(n as f64 / connect_secs.max(1e-9));
    probe.finish(&mut r, n as u64);
    if let (Some(b), Some(f)) = (r.rss_before_kib, r.rss_after_kib) {
        r.rss_per_connection_bytes = Some((f as f64 - b as f64) * 1024.0 / n as f64);
    }
    // Close in parallel so the next scenario starts from a quiet broker.
    let mut set = JoinSet::new();
    for c in conns {
        set.spawn(c.disconnect());
    }
    while set.join_next().await.is_some() {}
    Ok(r)
}

//! The load scenarios. Every loop here is bounded by the run's deadline plus a drain period.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::BytesMut;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tiermq_common::codec::{self, Packet, PubAck, PubComp, PubRec, PubRel, Subscribe};
use tiermq_common::session_api::SubscriptionOptions;
use tiermq_common::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::client::{Conn, ConnectOptions, PublishTemplate};
use super::payload::{instant_of, now_ns, Stamp};
use super::procfs;
use super::report::{BenchResult, CpuPart, Latency};
use super::schedule::Schedule;
use super::tracker::{tally, Receiver};
use super::{LoadArgs, Scenario};

/// Messages encoded per socket write at most.
const BATCH: u64 = 256;

/// Runs one scenario. `progress` shows a bar on a terminal.
pub async fn run(scenario: Scenario, a: &LoadArgs, progress: bool) -> anyhow::Result<BenchResult> {
    let ctx = Ctx::new(scenario, a, progress);
    for &pid in a.broker_pid.iter().chain(&a.rss_pid) {
        if !procfs::exists(pid) {
            bail!("--broker-pid/--rss-pid {pid}: no such process");
        }
    }
    if a.port.is_empty() {
        bail!("--port: at least one port");
    }
    match scenario {
        Scenario::Pairs | Scenario::FanIn | Scenario::FanOut => messages(&ctx).await,
        Scenario::ConnStorm => conn_storm(&ctx).await,
        Scenario::Retained => retained(&ctx).await,
        Scenario::Idle => idle(&ctx).await,
    }
}

/// What every scenario needs.
struct Ctx {
    scenario: Scenario,
    a: LoadArgs,
    /// One address per `--port`.
    brokers: Vec<SocketAddr>,
    /// Unique per run, so topics and client ids never meet those of another run.
    prefix: String,
    keep_alive: u16,
    progress: bool,
    next_source: AtomicUsize,
}

impl Ctx {
    fn new(scenario: Scenario, a: &LoadArgs, progress: bool) -> Ctx {
        let run = format!(
            "{:x}{:04x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64 & 0xFF_FFFF)
                .unwrap_or(0),
            std::process::id() & 0xFFFF
        );
        // Long enough that no keep-alive ping is ever needed during the run.
        let keep_alive = (a.duration.as_secs() + a.drain.as_secs() + 120).min(65_535) as u16;
        Ctx {
            scenario,
            a: a.clone(),
            brokers: a.port.iter().map(|&p| SocketAddr::new(a.host, p)).collect(),
            prefix: format!("tmqb{run}"),
            keep_alive,
            progress,
            next_source: AtomicUsize::new(0),
        }
    }

    /// Connect options for a client; `slot` picks the broker port (round robin).
    fn options(&self, client_id: String, slot: usize) -> ConnectOptions {
        let source = if self.a.source_ips.is_empty() {
            None
        } else {
            let i = self.next_source.fetch_add(1, Ordering::Relaxed);
            Some(self.a.source_ips[i % self.a.source_ips.len()])
        };
        ConnectOptions {
            broker: self.brokers[slot % self.brokers.len().max(1)],
            source,
            version: self.a.mqtt,
            client_id,
            clean_start: true,
            keep_alive: self.keep_alive,
            receive_maximum: 65_535,
            timeout: Duration::from_secs(15),
        }
    }

    fn topic(&self, rest: &str) -> String {
        format!("bench/{}/{}", self.prefix, rest)
    }

    /// Connects `ids.len()` clients, at most `connect_concurrency` at a time, in order. Client
    /// `i` uses broker port `i + port_offset` (round robin), so with several ports a publisher
    /// (offset 1) and the subscriber of its pair (offset 0) meet on different ones.
    async fn connect_many(
        &self,
        ids: Vec<String>,
        port_offset: usize,
    ) -> anyhow::Result<Vec<Conn>> {
        let n = ids.len();
        let sem = Arc::new(Semaphore::new(self.a.connect_concurrency.max(1)));
        let mut set = JoinSet::new();
        for (i, id) in ids.into_iter().enumerate() {
            let opts = self.options(id, i + port_offset);
            let sem = sem.clone();
            set.spawn(async move {
                let _permit = sem.acquire_owned().await;
                (i, Conn::connect(&opts).await)
            });
        }
        let mut out: Vec<Option<Conn>> = (0..n).map(|_| None).collect();
        while let Some(r) = set.join_next().await {
            let (i, c) = r.context("connect task failed")?;
            out[i] = Some(c.with_context(|| format!("client {i} of {n}"))?);
        }
        Ok(out.into_iter().map(|c| c.expect("all joined")).collect())
    }

    fn bar(&self, len: u64, what: &str) -> ProgressBar {
        use std::io::IsTerminal;
        if !self.progress || !std::io::stderr().is_terminal() {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(len);
        bar.set_style(
            ProgressStyle::with_template(&format!(
                "{{spinner}} {} {what} [{{bar:30}}] {{elapsed}}/{{duration}} {{msg}}",
                self.scenario.name()
            ))
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    }

    fn base_result(&self) -> BenchResult {
        let a = &self.a;
        BenchResult {
            case: a.case.clone().unwrap_or_else(|| {
                format!(
                    "{}{}-qos{}",
                    self.scenario.name(),
                    if a.shared { "-shared" } else { "" },
                    a.qos
                )
            }),
            broker: a.broker_name.clone(),
            scenario: self.scenario.name().to_string(),
            mqtt: if a.mqtt.is_v5() { "5" } else { "3.1.1" }.to_string(),
            qos: a.qos,
            payload: a.payload.max(super::payload::HEADER_LEN),
            rate_per_publisher: a.rate,
            duration_s: a.duration.as_secs_f64(),
            ..Default::default()
        }
    }
}

/// Broker CPU and memory around a measurement. A broker may be several processes (a
/// cluster): CPU is summed over all of them, memory over the `--rss-pid` ones (default: the
/// first broker pid).
struct BrokerProbe {
    pids: Vec<u32>,
    rss_pids: Vec<u32>,
    cpu0: Vec<Option<f64>>,
    rss0: Option<u64>,
}

/// Sum of `f` over `pids`; None if any is unreadable (a process died) or there are none.
fn sum_over(pids: &[u32], f: fn(u32) -> Option<u64>) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| f(p)).sum()
}

impl BrokerProbe {
    fn start(a: &LoadArgs) -> BrokerProbe {
        let pids = a.broker_pid.clone();
        let rss_pids = if a.rss_pid.is_empty() {
            pids.iter().take(1).copied().collect()
        } else {
            a.rss_pid.clone()
        };
        BrokerProbe {
            cpu0: pids.iter().map(|&p| procfs::cpu_seconds(p)).collect(),
            rss0: sum_over(&rss_pids, procfs::rss_kib),
            pids,
            rss_pids,
        }
    }

    /// Fills CPU and RSS fields; `units` is what CPU time is divided by (messages delivered,
    /// connections made), per million.
    fn finish(&self, r: &mut BenchResult, units: u64) {
        if self.pids.is_empty() {
            return;
        }
        let parts: Option<Vec<CpuPart>> = self
            .pids
            .iter()
            .zip(&self.cpu0)
            .map(|(&pid, c0)| {
                let c1 = procfs::cpu_seconds(pid)?;
                Some(CpuPart {
                    pid,
                    process: procfs::role(pid),
                    cpu_s: c1 - (*c0)?,
                })
            })
            .collect();
        match parts {
            Some(parts) => {
                let cpu: f64 = parts.iter().map(|p| p.cpu_s).sum();
                r.broker_cpu_s = Some(cpu);
                if units > 0 {
                    r.cpu_s_per_million = Some(cpu * 1e6 / units as f64);
                }
                if parts.len() > 1 {
                    r.broker_cpu_parts = parts;
                }
            }
            None => r
                .notes
                .push("a broker process exited during the run: no CPU figure".into()),
        }
        r.rss_before_kib = self.rss0;
        r.rss_after_kib = sum_over(&self.rss_pids, procfs::rss_kib);
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

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
struct SubOut {
    receiver: Receiver,
    hist: Histogram<u64>,
    /// When the last bench message arrived (0 = none).
    last_ns: u64,
    /// Distinct messages when it stopped (retained scenario).
    error: Option<String>,
}

/// Reads deliveries until `stop`, acknowledging QoS1/2. With `target`, also stops once that
/// many messages arrived. Latency is recorded in microseconds from the payload's send time.
async fn subscriber(
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

fn window_of(a: &LoadArgs, conn: &Conn) -> usize {
    let broker_max = conn.connack.properties.receive_maximum.unwrap_or(u16::MAX);
    usize::from(a.window.clamp(1, broker_max.max(1)))
}

/// pairs, fan-in, fan-out.
async fn messages(ctx: &Ctx) -> anyhow::Result<BenchResult> {
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

/// conn-storm: `publishers` workers, each reconnecting with its own fixed client id.
async fn conn_storm(ctx: &Ctx) -> anyhow::Result<BenchResult> {
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

/// retained: publish `topics` retained messages, then subscribe with a wildcard.
async fn retained(ctx: &Ctx) -> anyhow::Result<BenchResult> {
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

/// idle: open connections, keep them idle, read the broker's RSS.
async fn idle(ctx: &Ctx) -> anyhow::Result<BenchResult> {
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

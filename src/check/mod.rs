//! `tiermq check`: a Jepsen-style durability checker for a running broker or cluster.
//!
//! Publishers send uniquely numbered QoS1 and QoS2 messages (`run|publisher|seq`) to several
//! topics through one frontend; persistent subscribers (clean start off, session expiry) on
//! another frontend receive them. Every send, acknowledgement and delivery is recorded. Clients
//! reconnect on failure, to the next frontend of the list when one refuses, and resend what is
//! unacknowledged (DUP) as MQTT requires. At the end every message is sorted into
//!
//! * **delivered**: acknowledged (PUBACK/PUBREC) and received by every subscriber,
//! * **lost**: acknowledged but never received by a subscriber (counted per subscriber),
//! * **duplicated**: received more than once by a subscriber (QoS1 redelivery is allowed; a
//!   QoS2 duplicate means exactly-once broke),
//! * **out of order**: received (first time) after a later message of the same publisher and
//!   topic,
//! * **unexpected**: a payload nobody sent, on a wrong topic, or undecodable.
//!
//! The run is bounded: publishing lasts `--duration`, then at most `--drain` more for
//! acknowledgements and deliveries. Exit status 1 on any lost, out-of-order or unexpected
//! message (or if nothing at all was acknowledged).
//!
//! Failover times: with `--fault-file`, each line `EPOCH_MS label` (written by the fault
//! script when it injects a fault) gets a recovery time: the moment, after the fault, when
//! every publisher has again had a message acknowledged that it first sent after the fault.

mod analysis;
mod clients;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;
use tiermq_common::{ProtocolVersion, QoS};

use crate::bench::parse_duration;

pub use analysis::Summary;

/// `tiermq check [options]`.
#[derive(Args, Debug, Clone)]
pub struct CheckArgs {
    /// MQTT frontends `host:port`, comma separated. Publishers start on the first, subscribers
    /// on the second (or the first if only one); both move to the next one when theirs fails.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:1883")]
    pub frontends: Vec<String>,
    /// Publishers (even ones publish QoS1, odd ones QoS2).
    #[arg(long, default_value_t = 4)]
    pub publishers: u32,
    /// Persistent subscribers on `check/RUN/#` (odd ones speak MQTT 3.1.1, even ones 5.0).
    #[arg(long, default_value_t = 2)]
    pub subscribers: u32,
    /// Topics each publisher cycles through.
    #[arg(long, default_value_t = 4)]
    pub topics: u32,
    /// Messages per second per publisher.
    #[arg(long, default_value_t = 50)]
    pub rate: u32,
    /// Unacknowledged messages a publisher may have in flight.
    #[arg(long, default_value_t = 16)]
    pub inflight: usize,
    /// How long publishers publish.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Longest wait after publishing for acknowledgements and deliveries.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub drain: Duration,
    /// Pause between the subscriptions and the first publish.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub settle: Duration,
    /// Run name: client ids and topics are prefixed with it [default: from the clock].
    #[arg(long)]
    pub run: Option<String>,
    /// Fault times, one `EPOCH_MS label` per line (read at the end), for failover times.
    #[arg(long)]
    pub fault_file: Option<PathBuf>,
    /// Session expiry of the persistent sessions, seconds.
    #[arg(long, default_value_t = 600)]
    pub session_expiry: u32,
    /// Print every lost / out-of-order / unexpected message (up to this many each).
    #[arg(long, default_value_t = 20)]
    pub show: usize,
}

/// Wall clock in milliseconds since the epoch (comparable with `date +%s%3N`).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One message as its publisher saw it.
#[derive(Debug, Clone, Default)]
pub struct Sent {
    pub topic: u32,
    pub first_sent_ms: u64,
    pub sends: u32,
    /// PUBACK / PUBREC with a success code.
    pub acked_ms: Option<u64>,
    /// The ack carried "no matching subscribers".
    pub no_match: bool,
    /// PUBACK / PUBREC with an error code: not accepted.
    pub refused: bool,
}

#[derive(Debug, Default)]
pub struct PublisherLog {
    pub qos: u8,
    pub sent: Vec<Sent>,
    pub connects: u32,
    pub connect_failures: u32,
    pub errors: Vec<String>,
}

#[derive(Debug, Default)]
pub struct SubscriberLog {
    /// Deliveries in arrival order: (topic, payload) decoded, or the raw text if undecodable.
    pub deliveries: Vec<Delivery>,
    /// (publisher, seq) received at least once: for the drain wait.
    pub seen: HashSet<(u32, u64)>,
    pub connects: u32,
    pub connect_failures: u32,
    /// Reconnects where the broker said Session Present = 0.
    pub sessions_lost: u32,
    pub errors: Vec<String>,
}

#[derive(Debug, Clone)]
pub enum Delivery {
    Message {
        publisher: u32,
        seq: u64,
        topic: u32,
        topic_ok: bool,
        qos: u8,
        dup: bool,
    },
    Unexpected(String),
}

/// Everything recorded during a run.
#[derive(Debug, Default)]
pub struct Record {
    pub publishers: Vec<PublisherLog>,
    pub subscribers: Vec<SubscriberLog>,
}

pub type Shared = Arc<Mutex<Record>>;

pub fn lock(r: &Shared) -> std::sync::MutexGuard<'_, Record> {
    r.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the clients need to know.
#[derive(Debug, Clone)]
pub struct Plan {
    pub run: String,
    pub frontends: Vec<SocketAddr>,
    pub topics: u32,
    pub rate: u32,
    pub inflight: usize,
    pub session_expiry: u32,
    pub publish_until: tokio::time::Instant,
    pub hard_deadline: tokio::time::Instant,
}

impl Plan {
    pub fn topic(&self, t: u32) -> String {
        format!("check/{}/t{}", self.run, t)
    }
    pub fn filter(&self) -> String {
        format!("check/{}/#", self.run)
    }
}

pub fn publisher_qos(i: u32) -> QoS {
    if i.is_multiple_of(2) {
        QoS::AtLeastOnce
    } else {
        QoS::ExactlyOnce
    }
}

pub fn subscriber_version(i: u32) -> ProtocolVersion {
    if i.is_multiple_of(2) {
        ProtocolVersion::V5
    } else {
        ProtocolVersion::V311
    }
}

pub fn main(args: CheckArgs) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("check: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(summary) if summary.passed() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("check: {e:#}");
            println!("check: error {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn resolve(addrs: &[String]) -> anyhow::Result<Vec<SocketAddr>> {
    let mut out = Vec::new();
    for a in addrs {
        let found = tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host(a))
            .await
            .map_err(|_| anyhow::anyhow!("resolving {a} timed out"))?
            .map_err(|e| anyhow::anyhow!("cannot resolve {a}: {e}"))?
            .next()
            .ok_or_else(|| anyhow::anyhow!("{a} has no address"))?;
        out.push(found);
    }
    if out.is_empty() {
        anyhow::bail!("no frontend given");
    }
    Ok(out)
}

/// Runs the whole check and prints the report.
pub async fn run(args: CheckArgs) -> anyhow::Result<Summary> {
    anyhow::ensure!(args.publishers > 0, "--publishers must be at least 1");
    anyhow::ensure!(args.subscribers > 0, "--subscribers must be at least 1");
    anyhow::ensure!(args.topics > 0, "--topics must be at least 1");
    anyhow::ensure!(args.rate > 0, "--rate must be at least 1");
    anyhow::ensure!(
        (1..=30_000).contains(&args.inflight),
        "--inflight must be 1..=30000"
    );
    let frontends = resolve(&args.frontends).await?;
    let run = args
        .run
        .clone()
        .unwrap_or_else(|| format!("r{}", now_ms() % 100_000_000));
    let record: Shared = Arc::new(Mutex::new(Record {
        publishers: (0..args.publishers)
            .map(|i| PublisherLog {
                qos: publisher_qos(i) as u8,
                ..Default::default()
            })
            .collect(),
        subscribers: (0..args.subscribers)
            .map(|_| SubscriberLog::default())
            .collect(),
    }));
    let started = tokio::time::Instant::now();
    // Subscribers first: they must be subscribed before anything is published.
    let sub_deadline = started + args.settle + args.duration + args.drain + Duration::from_secs(30);
    let mut plan = Plan {
        run: run.clone(),
        frontends: frontends.clone(),
        topics: args.topics,
        rate: args.rate,
        inflight: args.inflight,
        session_expiry: args.session_expiry,
        publish_until: sub_deadline,
        hard_deadline: sub_deadline,
    };
    println!(
        "check: run {run}: {} publishers (QoS1/QoS2) → {} topics → {} persistent subscribers, {} msg/s each for {:?}, frontends {:?}",
        args.publishers, args.topics, args.subscribers, args.rate, args.duration, frontends
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<Result<(), String>>(64);
    let mut subscribers = Vec::new();
    for i in 0..args.subscribers {
        let start_at = if frontends.len() > 1 { 1 } else { 0 };
        subscribers.push(tokio::spawn(clients::subscriber(
            i,
            plan.clone(),
            start_at,
            record.clone(),
            stop_rx.clone(),
            ready_tx.clone(),
        )));
    }
    drop(ready_tx);
    let subscribe_by = tokio::time::Instant::now() + Duration::from_secs(60);
    for _ in 0..args.subscribers {
        match tokio::time::timeout_at(subscribe_by, ready_rx.recv()).await {
            Ok(Some(Ok(()))) => {}
            Ok(Some(Err(e))) => anyhow::bail!("a subscriber could not subscribe: {e}"),
            Ok(None) => anyhow::bail!("subscribers ended before subscribing"),
            Err(_) => anyhow::bail!("subscribers not subscribed within 60s"),
        }
    }
    tokio::time::sleep(args.settle).await;
    let begin = tokio::time::Instant::now();
    plan.publish_until = begin + args.duration;
    plan.hard_deadline = begin + args.duration + args.drain;
    let publish_started_ms = now_ms();
    let mut publishers = Vec::new();
    for i in 0..args.publishers {
        publishers.push(tokio::spawn(clients::publisher(
            i,
            plan.clone(),
            0,
            record.clone(),
        )));
    }
    for p in publishers {
        let _ = p.await;
    }
    // Wait until every acknowledged message reached every subscriber, or the drain ends.
    loop {
        let complete = {
            let r = lock(&record);
            let acked: Vec<(u32, u64)> = r
                .publishers
                .iter()
                .enumerate()
                .flat_map(|(p, log)| {
                    log.sent
                        .iter()
                        .enumerate()
                        .filter(|(_, s)| s.acked_ms.is_some())
                        .map(move |(seq, _)| (p as u32, seq as u64))
                })
                .collect();
            r.subscribers
                .iter()
                .all(|s| acked.iter().all(|k| s.seen.contains(k)))
        };
        if complete || tokio::time::Instant::now() >= plan.hard_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A little longer, for duplicates and stragglers to show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop_tx.send(true);
    for s in subscribers {
        let _ = tokio::time::timeout(Duration::from_secs(5), s).await;
    }
    let faults = match &args.fault_file {
        Some(path) => read_faults(path),
        None => Vec::new(),
    };
    let r = lock(&record);
    let summary = analysis::analyse(&r, &faults, publish_started_ms);
    summary.print(&r, args.show);
    Ok(summary)
}

/// `EPOCH_MS label` lines; anything else is skipped.
fn read_faults(path: &std::path::Path) -> Vec<(u64, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(2, char::is_whitespace);
            let t = it.next()?.trim().parse::<u64>().ok()?;
            Some((t, it.next().unwrap_or("fault").trim().to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests;

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
//! With `--wills N`, N more clients connect (to the first frontend, once, no reconnect) with a
//! QoS2 will each, and will subscribers (on the second frontend) count the wills that arrive:
//! a client whose connection broke must have its will delivered exactly once, one that sent
//! DISCONNECT never ([`wills`]).
//!
//! The run is bounded: publishing lasts `--duration`, then at most `--drain` more for
//! acknowledgements and deliveries. Exit status 1 on any lost, out-of-order or unexpected
//! message or will (or if nothing at all was acknowledged). QoS2 and will duplicates are
//! counted (`RESULT ... qos2-duplicated=N wills-duplicated=N`) but left to the caller to judge:
//! the fault suite fails on them with `FAULTS_STRICT_QOS2=1`.
//!
//! Failover times: with `--fault-file`, each line `EPOCH_MS label` (written by the fault
//! script when it injects a fault) gets a recovery time: the moment, after the fault, when
//! every publisher has again had a message acknowledged that it first sent after the fault.

mod analysis;
mod clients;
mod wills;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;
use tiermq_common::{ProtocolVersion, QoS};

use crate::parse_duration;

pub use analysis::Summary;
pub use wills::{WillEnd, WillLog};

/// `tiermq check [options]`.
#[derive(Args, Debug, Clone)]
pub struct CheckArgs {
    /// MQTT frontends `host:port`, comma separated. Publishers start on the first, subscribers
    /// on the second (or the first if only one); both move to the next one when theirs fails.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:1883")]
    pub frontends: Vec<String>,
    /// Publishers (QoS per `--qos`).
    #[arg(long, default_value_t = 4)]
    pub publishers: u32,
    /// QoS of the publishers: `mixed` (even ones QoS1, odd ones QoS2), `1` or `2` (all).
    #[arg(long, default_value = "mixed", value_parser = parse_publisher_qos)]
    pub qos: PublisherQos,
    /// Clients with a QoS2 will, connected once to the first frontend for the whole run (a
    /// fault that breaks their connections must fire each will exactly once), plus one will
    /// subscriber on the second frontend. 0: none.
    #[arg(long, default_value_t = 0)]
    pub wills: u32,
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
    /// Reconnects where the broker said Session Present = 0 (its QoS2 state is gone, so a
    /// re-sent QoS2 message may be taken for a new one).
    pub sessions_lost: u32,
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
        /// The broker's packet id for this copy: two copies of a QoS2 message under different
        /// ids were queued twice; under the same id, one was sent again as new.
        packet_id: Option<u16>,
    },
    /// The will of will client `client`.
    Will {
        client: u32,
    },
    Unexpected(String),
}

impl Delivery {
    /// What the drain wait looks for in [`SubscriberLog::seen`]: (publisher, seq) of a
    /// message, (client, 0) of a will.
    pub fn key(&self) -> Option<(u32, u64)> {
        match self {
            Delivery::Message { publisher, seq, .. } => Some((*publisher, *seq)),
            Delivery::Will { client, .. } => Some((*client, 0)),
            Delivery::Unexpected(_) => None,
        }
    }
}

/// Everything recorded during a run.
#[derive(Debug, Default)]
pub struct Record {
    pub publishers: Vec<PublisherLog>,
    pub subscribers: Vec<SubscriberLog>,
    /// `--wills`: the will clients and the subscribers of their will topics.
    pub wills: Vec<WillLog>,
    pub will_subscribers: Vec<SubscriberLog>,
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
    pub qos: PublisherQos,
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

/// `--qos`: which QoS each publisher uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublisherQos {
    /// Even publishers QoS1, odd ones QoS2.
    Mixed,
    Only(QoS),
}

impl PublisherQos {
    pub fn of(self, publisher: u32) -> QoS {
        match self {
            PublisherQos::Only(q) => q,
            PublisherQos::Mixed if publisher.is_multiple_of(2) => QoS::AtLeastOnce,
            PublisherQos::Mixed => QoS::ExactlyOnce,
        }
    }
}

fn parse_publisher_qos(s: &str) -> Result<PublisherQos, String> {
    match s {
        "mixed" => Ok(PublisherQos::Mixed),
        "1" => Ok(PublisherQos::Only(QoS::AtLeastOnce)),
        "2" => Ok(PublisherQos::Only(QoS::ExactlyOnce)),
        _ => Err(format!("{s:?}: expected mixed, 1 or 2")),
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
                qos: args.qos.of(i) as u8,
                ..Default::default()
            })
            .collect(),
        subscribers: (0..args.subscribers)
            .map(|_| SubscriberLog::default())
            .collect(),
        wills: (0..args.wills)
            .map(|i| WillLog::new(wills::variant(i)))
            .collect(),
        will_subscribers: (0..wills::subscribers(args.wills))
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
        qos: args.qos,
        rate: args.rate,
        inflight: args.inflight,
        session_expiry: args.session_expiry,
        publish_until: sub_deadline,
        hard_deadline: sub_deadline,
    };
    let qos = match args.qos {
        PublisherQos::Mixed => "QoS1/QoS2".to_string(),
        PublisherQos::Only(q) => format!("QoS{}", q as u8),
    };
    println!(
        "check: run {run}: {} publishers ({qos}) → {} topics → {} persistent subscribers, {} msg/s each for {:?}, frontends {:?}",
        args.publishers, args.topics, args.subscribers, args.rate, args.duration, frontends
    );
    if args.wills > 0 {
        println!(
            "check: {} clients with QoS2 wills on the first frontend → {} will subscriber(s)",
            args.wills,
            wills::subscribers(args.wills)
        );
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<Result<(), String>>(64);
    let mut subscribers = Vec::new();
    let start_at = if frontends.len() > 1 { 1 } else { 0 };
    let feeds = (0..args.subscribers)
        .map(|i| (clients::Feed::Checks, i))
        .chain((0..wills::subscribers(args.wills)).map(|i| (clients::Feed::Wills, i)));
    for (feed, i) in feeds {
        subscribers.push(tokio::spawn(clients::subscriber(
            feed,
            i,
            plan.clone(),
            start_at,
            record.clone(),
            stop_rx.clone(),
            ready_tx.clone(),
        )));
    }
    let subscribe_by = tokio::time::Instant::now() + Duration::from_secs(60);
    await_ready(&mut ready_rx, subscribers.len(), subscribe_by, "subscriber").await?;
    // Will clients once their wills have subscribers; they stay until publishing ends.
    let mut will_clients = Vec::new();
    for i in 0..args.wills {
        will_clients.push(tokio::spawn(wills::will_client(
            i,
            plan.clone(),
            record.clone(),
            ready_tx.clone(),
        )));
    }
    drop(ready_tx);
    await_ready(
        &mut ready_rx,
        will_clients.len(),
        subscribe_by,
        "will client",
    )
    .await?;
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
    for w in will_clients {
        let _ = w.await;
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
            let wills_due = wills::due(&r);
            r.subscribers
                .iter()
                .all(|s| acked.iter().all(|k| s.seen.contains(k)))
                && r.will_subscribers
                    .iter()
                    .all(|s| wills_due.iter().all(|k| s.seen.contains(k)))
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

/// Waits (until `by`) for `n` clients to report that they are connected and subscribed.
async fn await_ready(
    ready: &mut tokio::sync::mpsc::Receiver<Result<(), String>>,
    n: usize,
    by: tokio::time::Instant,
    what: &str,
) -> anyhow::Result<()> {
    for _ in 0..n {
        match tokio::time::timeout_at(by, ready.recv()).await {
            Ok(Some(Ok(()))) => {}
            Ok(Some(Err(e))) => anyhow::bail!("a {what} could not start: {e}"),
            Ok(None) => anyhow::bail!("{what}s ended before they were ready"),
            Err(_) => anyhow::bail!("{what}s not ready within 60s"),
        }
    }
    Ok(())
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

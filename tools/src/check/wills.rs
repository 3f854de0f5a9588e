//! `--wills N`: clients that hold a QoS2 will on the first frontend for the whole run, and the
//! count of the wills that arrive.
//!
//! A will client connects once and never reconnects (a reconnect would take its session over
//! and change what is owed). How its connection ends decides what the broker owes:
//!
//! * **broken** (closed, reset or silent, or ended by the checker without DISCONNECT): its will
//!   must arrive exactly once — missing is a lost will, twice a duplicated one;
//! * **closed** after a DISCONNECT (0x00) that the broker answered by closing the connection:
//!   its will must never arrive (an unexpected will);
//! * **unsure** (the broker sent DISCONNECT, or did not close after ours): either is right, but
//!   a second arrival is still a duplicate.
//!
//! At the end of publishing each client that still has a live connection (PINGRESP within
//! 5 s) disconnects cleanly; one without is left broken. So with no fault no will is owed, and a
//! fault that kills the first frontend owes every will.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use tiermq_common::codec::{Disconnect, LastWill, Packet, Publish, WillProperties};
use tiermq_common::{ProtocolVersion, QoS, ReasonCode};
use tokio::time::Instant;

use super::analysis::Finding;
use super::clients::{connect, ping_interval, read_more, SILENCE};
use super::{lock, now_ms, Delivery, Plan, Record, Shared};
use crate::bench::client::Conn;

/// How long the end-of-run handshake (PINGRESP, then the close after DISCONNECT) may take.
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// Until a will client has connected once.
const CONNECT_FOR: Duration = Duration::from_secs(60);
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// How a will client connects: the combinations the broker treats differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    pub version: ProtocolVersion,
    pub clean_start: bool,
    /// v5 Session Expiry Interval, seconds.
    pub session_expiry: u32,
    /// v5 Will Delay Interval, seconds (0: none).
    pub will_delay: u32,
}

/// Client `i`'s variant: v5 without a session, 3.1.1 clean, v5 with a 60 s session and a 2 s
/// will delay, 3.1.1 with a persistent session, in turn.
pub fn variant(i: u32) -> Variant {
    let (version, clean_start, session_expiry, will_delay) = match i % 4 {
        0 => (ProtocolVersion::V5, true, 0, 0),
        1 => (ProtocolVersion::V311, true, 0, 0),
        2 => (ProtocolVersion::V5, true, 60, 2),
        _ => (ProtocolVersion::V311, false, 0, 0),
    };
    Variant {
        version,
        clean_start,
        session_expiry,
        will_delay,
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.version.is_v5() {
            write!(
                f,
                "5.0, session expiry {} s, will delay {} s",
                self.session_expiry, self.will_delay
            )
        } else {
            let session = if self.clean_start {
                "clean"
            } else {
                "persistent"
            };
            write!(f, "3.1.1, {session} session")
        }
    }
}

/// How a will client's connection ended (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WillEnd {
    NeverConnected,
    Connected,
    Broken { at_ms: u64, why: String },
    Closed,
    Unsure(String),
}

#[derive(Debug)]
pub struct WillLog {
    pub variant: Variant,
    pub end: WillEnd,
    pub connect_failures: u32,
    pub errors: Vec<String>,
}

impl WillLog {
    pub fn new(variant: Variant) -> WillLog {
        WillLog {
            variant,
            end: WillEnd::NeverConnected,
            connect_failures: 0,
            errors: Vec::new(),
        }
    }
}

/// Will subscribers for `wills` will clients: one when there are any.
pub fn subscribers(wills: u32) -> u32 {
    u32::from(wills > 0)
}

/// The will subscribers' filter: outside `check/RUN/#`, so the message subscribers never see a
/// will.
pub fn filter(plan: &Plan) -> String {
    format!("checkwill/{}/#", plan.run)
}

fn topic(plan: &Plan, client: u32) -> String {
    format!("checkwill/{}/w{client}", plan.run)
}

/// Decodes a will delivery: `checkwill/RUN/wI` with payload `RUN|will|I`.
pub fn decode(plan: &Plan, p: &Publish) -> Delivery {
    let text = String::from_utf8_lossy(&p.payload).to_string();
    let client = text
        .strip_prefix(&format!("{}|will|", plan.run))
        .and_then(|i| i.parse::<u32>().ok());
    match client {
        Some(client) if p.topic == topic(plan, client) => Delivery::Will { client },
        _ => Delivery::Unexpected(format!("{} {text:?}", p.topic)),
    }
}

/// (client, 0) of every will owed: the drain waits for these.
pub fn due(record: &Record) -> Vec<(u32, u64)> {
    record
        .wills
        .iter()
        .enumerate()
        .filter(|(_, w)| matches!(w.end, WillEnd::Broken { .. }))
        .map(|(i, _)| (i as u32, 0))
        .collect()
}

/// One will client: connects to the first frontend (retrying for up to 60 s), reports ready,
/// holds the connection until publishing ends and records how it ended.
pub async fn will_client(
    i: u32,
    plan: Plan,
    record: Shared,
    ready: tokio::sync::mpsc::Sender<Result<(), String>>,
) {
    let v = variant(i);
    let client_id = format!("{}-will-{i}", plan.run);
    let will = LastWill {
        topic: topic(&plan, i),
        payload: Bytes::from(format!("{}|will|{i}", plan.run)),
        qos: QoS::ExactlyOnce,
        retain: false,
        properties: WillProperties {
            will_delay_interval: (v.will_delay > 0).then_some(v.will_delay),
            ..Default::default()
        },
    };
    let addr = plan.frontends[0];
    let give_up = Instant::now() + CONNECT_FOR;
    let mut conn = loop {
        let attempt = connect(
            addr,
            v.version,
            &client_id,
            v.clean_start,
            v.session_expiry,
            Some(will.clone()),
        )
        .await;
        match attempt {
            Ok(c) => break c,
            Err(e) => {
                {
                    let mut r = lock(&record);
                    let log = &mut r.wills[i as usize];
                    log.connect_failures += 1;
                    if log.errors.len() < 20 {
                        log.errors.push(format!("{addr}: {e:#}"));
                    }
                }
                if Instant::now() >= give_up {
                    let _ = ready.send(Err(format!("will client {i}: {e:#}"))).await;
                    return;
                }
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    };
    lock(&record).wills[i as usize].end = WillEnd::Connected;
    let _ = ready.send(Ok(())).await;
    let end = hold(&mut conn, plan.publish_until).await;
    // Dropping the connection now: without a DISCONNECT unless `hold` closed it cleanly.
    drop(conn);
    lock(&record).wills[i as usize].end = end;
}

fn broken(why: impl Into<String>) -> WillEnd {
    WillEnd::Broken {
        at_ms: now_ms(),
        why: why.into(),
    }
}

/// Keeps the connection alive (PINGREQ every 3 s) until `until`, then ends it cleanly.
async fn hold(conn: &mut Conn, until: Instant) -> WillEnd {
    let mut ping = ping_interval().await;
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            read = read_more(conn) => {
                if let Err(why) = read {
                    return broken(why);
                }
                last_heard = Instant::now();
                loop {
                    match conn.decode_buffered() {
                        Ok(None) => break,
                        Ok(Some(Packet::PingResp)) => {}
                        Ok(Some(Packet::Disconnect(d))) => {
                            return WillEnd::Unsure(format!("DISCONNECT {:?} from the broker", d.reason_code));
                        }
                        Ok(Some(p)) => return broken(format!("unexpected {} to a will client", p.name())),
                        Err(e) => return broken(format!("{e:#}")),
                    }
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > SILENCE {
                    return broken(format!("silent for {SILENCE:?}"));
                }
                if conn.push(&Packet::PingReq).is_err() {
                    return broken("encode PINGREQ");
                }
            }
            _ = tokio::time::sleep_until(until) => return close(conn).await,
        }
        if let Err(e) = conn.flush().await {
            return broken(format!("write: {e}"));
        }
    }
}

/// The end of the run: a connection that still answers a PINGREQ gets DISCONNECT 0x00 (no
/// will); one that does not is given up without one (its will is owed).
async fn close(conn: &mut Conn) -> WillEnd {
    let alive = tokio::time::timeout(CLOSE_WAIT, async {
        conn.push(&Packet::PingReq)?;
        conn.flush().await?;
        loop {
            match conn.next().await? {
                Some(Packet::PingResp) => return Ok(None),
                Some(Packet::Disconnect(d)) => {
                    return Ok(Some(WillEnd::Unsure(format!(
                        "DISCONNECT {:?} from the broker",
                        d.reason_code
                    ))))
                }
                Some(_) => {}
                None => anyhow::bail!("closed by the broker"),
            }
        }
    })
    .await;
    match alive {
        Ok(Ok(None)) => {}
        Ok(Ok(Some(end))) => return end,
        Ok(Err(e)) => return broken(format!("at the end: {e:#}")),
        Err(_) => return broken("no PINGRESP at the end"),
    }
    let disconnect = Packet::Disconnect(Disconnect {
        reason_code: ReasonCode::SUCCESS,
        properties: Default::default(),
    });
    if conn.push(&disconnect).is_err() {
        return broken("encode DISCONNECT");
    }
    if let Err(e) = conn.flush().await {
        return broken(format!("write DISCONNECT: {e}"));
    }
    // The broker closes the connection once it has the DISCONNECT (and has dropped the will).
    match tokio::time::timeout(CLOSE_WAIT, conn.next()).await {
        Ok(Ok(None)) | Ok(Err(_)) => WillEnd::Closed,
        Ok(Ok(Some(p))) => WillEnd::Unsure(format!("{} after DISCONNECT", p.name())),
        Err(_) => WillEnd::Unsure("still open 5 s after DISCONNECT".into()),
    }
}

/// The wills' part of a run's summary.
#[derive(Debug, Default, Clone)]
pub struct WillSummary {
    pub clients: u64,
    /// Clients whose connection broke: their wills are owed.
    pub expected: u64,
    /// (will subscriber, owed will) pairs that arrived.
    pub delivered: u64,
    /// (will subscriber, owed will) pairs that never arrived.
    pub lost: u64,
    /// Arrivals of a will beyond its first, per will subscriber.
    pub duplicated: u64,
    /// Wills of clients that disconnected cleanly, and undecodable deliveries.
    pub unexpected: u64,
    /// Clients that ended unsure or never connected: no will owed, none forbidden.
    pub unsure: u64,
}

/// Sorts the will subscribers' deliveries against how each will client ended.
pub fn analyse(record: &Record, findings: &mut Vec<Finding>) -> WillSummary {
    let mut s = WillSummary {
        clients: record.wills.len() as u64,
        ..Default::default()
    };
    for w in &record.wills {
        match w.end {
            WillEnd::Broken { .. } => s.expected += 1,
            WillEnd::Closed => {}
            _ => s.unsure += 1,
        }
    }
    for (si, sub) in record.will_subscribers.iter().enumerate() {
        let subscriber = si as u32;
        let mut count: HashMap<u32, u64> = HashMap::new();
        for d in &sub.deliveries {
            match d {
                Delivery::Will { client } if (*client as usize) < record.wills.len() => {
                    *count.entry(*client).or_default() += 1;
                }
                other => {
                    s.unexpected += 1;
                    findings.push(Finding {
                        subscriber,
                        what: format!("unexpected will: {other:?}"),
                    });
                }
            }
        }
        for (i, w) in record.wills.iter().enumerate() {
            let n = count.get(&(i as u32)).copied().unwrap_or(0);
            let mut note = |kind: &str| {
                findings.push(Finding {
                    subscriber,
                    what: format!(
                        "{kind}: will client {i} ({}; {:?}) arrived {n} time(s)",
                        w.variant, w.end
                    ),
                })
            };
            match (&w.end, n) {
                (WillEnd::Closed, 0) => {}
                (WillEnd::Closed, _) => {
                    s.unexpected += n;
                    note("unexpected will");
                    continue;
                }
                (WillEnd::Broken { .. }, 0) => {
                    s.lost += 1;
                    note("will lost");
                }
                (WillEnd::Broken { .. }, _) => s.delivered += 1,
                _ => {}
            }
            if n > 1 {
                s.duplicated += n - 1;
                note("will duplicated");
            }
        }
    }
    s
}

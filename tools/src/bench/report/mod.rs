//! Results: the JSON record of one run, the summary table printed after it, and the
//! "Broker benchmarks" section of `docs/benchmarks.md` with its SVG plots.
//!
//! This module holds the record and the table of one run; [`markdown`] turns many records
//! into the benchmark page (`tiermq bench report`), [`plots`] draws its SVG charts.

mod markdown;
mod plots;
#[cfg(test)]
mod tests;

pub use markdown::{
    markdown, splice, sustained, write_report, ReportArgs, BEGIN, CLUSTER_TARGET_P99_MS,
    CLUSTER_TARGET_RATE, END,
};

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::tracker::Tally;

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Option<Latency> {
        if h.is_empty() {
            return None;
        }
        Some(Latency {
            count: h.len(),
            mean_us: h.mean(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        })
    }
}

/// CPU time of one process of a multi-process broker.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CpuPart {
    pub pid: u32,
    /// e.g. "frontend", "backend".
    pub process: String,
    pub cpu_s: f64,
}

/// "frontend 40%, backend 20% + 20% + 20%": each process's share of the broker CPU, grouped
/// by role in first-seen order.
pub fn cpu_split(parts: &[CpuPart]) -> Option<String> {
    let total: f64 = parts.iter().map(|p| p.cpu_s).sum();
    if parts.len() < 2 || total <= 0.0 {
        return None;
    }
    let mut roles: Vec<(&str, Vec<f64>)> = Vec::new();
    for p in parts {
        let share = 100.0 * p.cpu_s / total;
        match roles.iter_mut().find(|(r, _)| *r == p.process) {
            Some((_, v)) => v.push(share),
            None => roles.push((&p.process, vec![share])),
        }
    }
    Some(
        roles
            .iter()
            .map(|(r, v)| {
                let v: Vec<String> = v.iter().map(|x| format!("{x:.0}%")).collect();
                format!("{r} {}", v.join(" + "))
            })
            .collect::<Vec<_>>()
            .join(", "),
    )
}

/// The outcome of one scenario run, as written by `--json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BenchResult {
    /// Name of the case in reports (scenario + QoS + mode), e.g. `pairs-qos0`.
    pub case: String,
    /// Name of the broker under test, e.g. `tiermq`.
    pub broker: String,
    pub scenario: String,
    pub mqtt: String,
    pub qos: u8,
    pub payload: usize,
    /// Messages (or connects) per second per publisher; 0 = as fast as possible.
    pub rate_per_publisher: u64,
    pub duration_s: f64,
    pub publishers: usize,
    pub subscribers: usize,
    /// Messages written by the publishers.
    pub sent: u64,
    /// QoS1/2 messages acknowledged to the publishers.
    pub acked: u64,
    /// Scheduled messages the publishers could not send in time (the broker held them back).
    pub unsent: u64,
    #[serde(flatten)]
    pub tally: Tally,
    /// Messages sent per second of the publishing window.
    pub send_rate: f64,
    /// Messages delivered per second (connects/s in conn-storm).
    pub delivered_rate: f64,
    /// End-to-end latency (connect latency in conn-storm; SUBSCRIBE to last retained message
    /// per subscriber in retained).
    pub latency: Option<Latency>,
    /// Broker CPU seconds (user + system) during the measurement.
    pub broker_cpu_s: Option<f64>,
    /// Broker CPU seconds per million messages delivered (per million connects in conn-storm,
    /// per million connections in idle).
    pub cpu_s_per_million: Option<f64>,
    pub rss_before_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
    pub rss_per_connection_bytes: Option<f64>,
    /// With several broker processes (a cluster): each one's CPU seconds.
    pub broker_cpu_parts: Vec<CpuPart>,
    /// Successful connections (idle, conn-storm).
    pub connections: u64,
    pub connect_errors: u64,
    pub connect_rate: Option<f64>,
    pub topics: Option<u64>,
    pub time_to_last_retained_ms: Option<f64>,
    /// Errors and remarks.
    pub notes: Vec<String>,
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

fn num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// The table printed after a run.
pub fn summary_table(r: &BenchResult) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} ({}), broker {}, MQTT {}, QoS {}, payload {} B, {} pub / {} sub, rate {}/s per publisher, {:.1} s",
        r.case,
        r.scenario,
        r.broker,
        r.mqtt,
        r.qos,
        r.payload,
        r.publishers,
        r.subscribers,
        if r.rate_per_publisher == 0 { "max".to_string() } else { r.rate_per_publisher.to_string() },
        r.duration_s
    );
    let mut row = |k: &str, v: String| {
        let _ = writeln!(s, "  {k:<28} {v}");
    };
    match r.scenario.as_str() {
        "idle" => {
            row("connections", r.connections.to_string());
            if let Some(c) = r.connect_rate {
                row("connects/s", num(c));
            }
        }
        "conn-storm" => {
            row(
                "connects",
                format!("{} ({} failed)", r.connections, r.connect_errors),
            );
            row("connects/s", num(r.delivered_rate));
        }
        _ => {
            row(
                "sent",
                format!(
                    "{} ({:.0} msgs/s, {} acked, {} unsent)",
                    r.sent, r.send_rate, r.acked, r.unsent
                ),
            );
            row(
                "delivered",
                format!(
                    "{} of {} expected ({:.0} msgs/s)",
                    r.tally.received, r.tally.expected, r.delivered_rate
                ),
            );
            row(
                "lost / dup / out-of-order",
                format!(
                    "{} / {} / {} (unexpected {})",
                    r.tally.lost, r.tally.duplicated, r.tally.out_of_order, r.tally.unexpected
                ),
            );
        }
    }
    if let Some(t) = r.time_to_last_retained_ms {
        row(
            "time to last retained",
            format!("{t:.1} ms ({} topics)", r.topics.unwrap_or(0)),
        );
    }
    if let Some(l) = &r.latency {
        let what = match r.scenario.as_str() {
            "conn-storm" => "connect latency ms",
            "retained" => "time to last per sub ms",
            _ => "latency ms",
        };
        row(
            what,
            format!(
                "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (mean {:.2}, n={})",
                ms(l.p50_us),
                ms(l.p90_us),
                ms(l.p99_us),
                ms(l.p999_us),
                ms(l.max_us),
                l.mean_us / 1000.0,
                l.count
            ),
        );
    }
    if let Some(c) = r.broker_cpu_s {
        row("broker CPU", format!("{c:.2} s"));
    }
    if let Some(split) = cpu_split(&r.broker_cpu_parts) {
        row("broker CPU by process", split);
    }
    if let Some(c) = r.cpu_s_per_million {
        let per = match r.scenario.as_str() {
            "conn-storm" => "M connects",
            "idle" => "M connections",
            _ => "M msgs",
        };
        row(&format!("broker CPU-s per {per}"), num(c));
    }
    if let (Some(b), Some(a)) = (r.rss_before_kib, r.rss_after_kib) {
        row("broker RSS", format!("{b} KiB -> {a} KiB"));
    }
    if let Some(p) = r.rss_per_connection_bytes {
        row("broker RSS per connection", format!("{p:.0} B"));
    }
    for n in &r.notes {
        row("note", n.clone());
    }
    s
}

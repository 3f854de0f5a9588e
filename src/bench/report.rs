//! Results: the JSON record of one run, the summary table printed after it, and the
//! "Broker benchmarks" section of `docs/benchmarks.md` with its SVG plots.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
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

/// `tiermq bench report`.
#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    /// JSON results written by `--json`.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Markdown file whose generated block (under "## Broker benchmarks") is replaced.
    #[arg(long, default_value = "docs/benchmarks.md")]
    pub out: PathBuf,
    /// Folder for the SVG plots [default: the markdown file's folder].
    #[arg(long)]
    pub svg_dir: Option<PathBuf>,
    /// Broker whose ratios are reported.
    #[arg(long, default_value = "tiermq")]
    pub ours: String,
    /// Brokers to compare against, in order; the first is the reference of the plots.
    #[arg(long, value_delimiter = ',', default_value = "mosquitto,rumqttd")]
    pub baselines: Vec<String>,
    /// Markdown put at the top of the generated block (setup, versions, skipped brokers).
    #[arg(long)]
    pub preamble: Option<PathBuf>,
    /// Our cluster (frontends + backends): ratios against --ours and the first baseline,
    /// and the cluster QoS1 target.
    #[arg(long, default_value = "tiermq-cluster")]
    pub cluster: String,
}

/// Issue 8's cluster target: QoS1, R=3, fsync, ≥ 50,000 msgs/s sustained with p99 ≤ 50 ms.
pub const CLUSTER_TARGET_RATE: f64 = 50_000.0;
pub const CLUSTER_TARGET_P99_MS: f64 = 50.0;

/// Whether a fixed-rate QoS≥1 run kept up with its offered load: every scheduled message
/// sent, at least 98% of the offered rate, nothing lost, everything expected delivered.
pub fn sustained(r: &BenchResult) -> bool {
    let offered = (r.publishers as u64 * r.rate_per_publisher) as f64;
    r.rate_per_publisher > 0
        && r.unsent == 0
        && r.tally.lost == 0
        && r.tally.expected > 0
        && r.tally.received >= r.tally.expected
        && r.send_rate >= 0.98 * offered
}

/// The target row(s) for the cluster QoS1 case(s) among `results`.
fn cluster_target_rows(cluster: &str, results: &[BenchResult]) -> Vec<String> {
    let what = "cluster QoS1, R=3, fsync: ≥ 50,000 msgs/s sustained, p99 ≤ 50 ms";
    let runs: Vec<&BenchResult> = results
        .iter()
        .filter(|r| {
            r.broker == cluster
                && r.qos == 1
                && matches!(r.scenario.as_str(), "pairs" | "fan-in" | "fan-out")
        })
        .collect();
    if runs.is_empty() {
        return vec![format!("| {what} | not measured in this run | – |")];
    }
    let p99 = |r: &BenchResult| lat(r, |l| l.p99_us).unwrap_or(f64::INFINITY);
    let best = runs
        .iter()
        .filter(|r| sustained(r) && p99(r) <= CLUSTER_TARGET_P99_MS)
        .max_by(|a, b| a.delivered_rate.total_cmp(&b.delivered_rate));
    let max = runs
        .iter()
        .filter(|r| r.rate_per_publisher == 0)
        .max_by(|a, b| a.delivered_rate.total_cmp(&b.delivered_rate));
    let mut measured = match best {
        Some(r) => format!(
            "highest sustained rate with p99 ≤ 50 ms: **{:.0} msgs/s** (`{}`, p99 {:.1} ms)",
            r.delivered_rate,
            r.case,
            p99(r)
        ),
        None => "no fixed rate sustained with p99 ≤ 50 ms".into(),
    };
    if let Some(m) = max {
        let _ = write!(
            measured,
            "; at max rate {:.0} msgs/s with p99 {:.0} ms (`{}`)",
            m.delivered_rate,
            p99(m),
            m.case
        );
    }
    let met = best.is_some_and(|r| r.delivered_rate >= 0.98 * CLUSTER_TARGET_RATE);
    vec![format!(
        "| {what} | {measured} | {} |",
        if met { "yes" } else { "**no**" }
    )]
}

pub const BEGIN: &str = "<!-- BEGIN broker benchmarks: generated by scripts/bench-compare (tiermq bench report); edits inside are overwritten -->";
pub const END: &str = "<!-- END broker benchmarks -->";
const SECTION: &str = "## Broker benchmarks";

/// Higher is better, or lower.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Better {
    Higher,
    Lower,
    None,
}

struct Column {
    head: &'static str,
    get: fn(&BenchResult) -> Option<f64>,
    better: Better,
    /// Show a ratio row for this column.
    ratio: bool,
}

fn lat(r: &BenchResult, f: fn(&Latency) -> u64) -> Option<f64> {
    r.latency.as_ref().map(|l| f(l) as f64 / 1000.0)
}

fn columns(scenario: &str) -> Vec<Column> {
    let c = |head, get, better, ratio| Column {
        head,
        get,
        better,
        ratio,
    };
    match scenario {
        "idle" => vec![
            c(
                "connections",
                |r| Some(r.connections as f64),
                Better::None,
                false,
            ),
            c(
                "RSS before (MiB)",
                |r| r.rss_before_kib.map(|k| k as f64 / 1024.0),
                Better::Lower,
                false,
            ),
            c(
                "RSS after (MiB)",
                |r| r.rss_after_kib.map(|k| k as f64 / 1024.0),
                Better::Lower,
                false,
            ),
            c(
                "bytes / connection",
                |r| r.rss_per_connection_bytes,
                Better::Lower,
                true,
            ),
            c("connects/s", |r| r.connect_rate, Better::Higher, true),
        ],
        "conn-storm" => vec![
            c(
                "connects/s",
                |r| Some(r.delivered_rate),
                Better::Higher,
                true,
            ),
            c("p50 ms", |r| lat(r, |l| l.p50_us), Better::Lower, true),
            c("p99 ms", |r| lat(r, |l| l.p99_us), Better::Lower, true),
            c("p99.9 ms", |r| lat(r, |l| l.p999_us), Better::Lower, true),
            c("max ms", |r| lat(r, |l| l.max_us), Better::Lower, false),
            c(
                "CPU-s / M connects",
                |r| r.cpu_s_per_million,
                Better::Lower,
                true,
            ),
            c(
                "failed",
                |r| Some(r.connect_errors as f64),
                Better::Lower,
                false,
            ),
        ],
        "retained" => vec![
            c(
                "publish msgs/s",
                |r| Some(r.send_rate),
                Better::Higher,
                true,
            ),
            c(
                "retained delivered/s",
                |r| Some(r.delivered_rate),
                Better::Higher,
                true,
            ),
            c(
                "time to last (ms)",
                |r| r.time_to_last_retained_ms,
                Better::Lower,
                true,
            ),
            c(
                "CPU-s / M msgs",
                |r| r.cpu_s_per_million,
                Better::Lower,
                true,
            ),
            c("lost", |r| Some(r.tally.lost as f64), Better::Lower, false),
            c(
                "dup",
                |r| Some(r.tally.duplicated as f64),
                Better::Lower,
                false,
            ),
        ],
        _ => vec![
            c("msgs/s", |r| Some(r.delivered_rate), Better::Higher, true),
            c("p50 ms", |r| lat(r, |l| l.p50_us), Better::Lower, true),
            c("p99 ms", |r| lat(r, |l| l.p99_us), Better::Lower, true),
            c("p99.9 ms", |r| lat(r, |l| l.p999_us), Better::Lower, true),
            c("max ms", |r| lat(r, |l| l.max_us), Better::Lower, false),
            c(
                "CPU-s / M msgs",
                |r| r.cpu_s_per_million,
                Better::Lower,
                true,
            ),
            c("lost", |r| Some(r.tally.lost as f64), Better::Lower, false),
            c(
                "dup",
                |r| Some(r.tally.duplicated as f64),
                Better::Lower,
                false,
            ),
            c(
                "out of order",
                |r| Some(r.tally.out_of_order as f64),
                Better::Lower,
                false,
            ),
            c("unsent", |r| Some(r.unsent as f64), Better::Lower, false),
        ],
    }
}

fn describe(r: &BenchResult) -> String {
    let rate = if r.rate_per_publisher == 0 {
        "max rate".to_string()
    } else {
        format!("{} msgs/s per publisher", r.rate_per_publisher)
    };
    match r.scenario.as_str() {
        "idle" => format!("{} idle MQTT {} connections, held {:.0} s", r.connections, r.mqtt, r.duration_s),
        "conn-storm" => format!(
            "{} client ids reconnecting for {:.0} s (each connect takes over the previous one), {}",
            r.publishers,
            r.duration_s,
            if r.rate_per_publisher == 0 { "as fast as possible".into() } else { format!("{} connects/s per id", r.rate_per_publisher) }
        ),
        "retained" => format!(
            "{} retained topics published at QoS {} by {} publisher(s), then {} subscribers on a `#` wildcard; payload {} B",
            r.topics.unwrap_or(0), r.qos, r.publishers, r.subscribers, r.payload
        ),
        s => format!(
            "{s}: {} publisher(s) → {} subscriber(s), QoS {}, MQTT {}, payload {} B, {rate}, {:.0} s",
            r.publishers, r.subscribers, r.qos, r.mqtt, r.payload, r.duration_s
        ),
    }
}

fn cell(v: Option<f64>) -> String {
    match v {
        Some(v) if v.fract() == 0.0 && v.abs() < 1e15 => format!("{v:.0}"),
        Some(v) => num(v),
        None => "–".into(),
    }
}

fn ratio(ours: Option<f64>, base: Option<f64>) -> Option<f64> {
    match (ours, base) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() => Some(a / b),
        _ => None,
    }
}

/// Results grouped by case (in first-seen order), then by broker.
fn group(results: &[BenchResult]) -> Vec<(String, Vec<&BenchResult>)> {
    let mut out: Vec<(String, Vec<&BenchResult>)> = Vec::new();
    for r in results {
        match out.iter_mut().find(|(c, _)| *c == r.case) {
            Some((_, v)) => v.push(r),
            None => out.push((r.case.clone(), vec![r])),
        }
    }
    out
}

/// The generated markdown block (without the markers).
pub fn markdown(
    a: &ReportArgs,
    results: &[BenchResult],
    preamble: &str,
    plots: &[String],
) -> String {
    let mut s = String::new();
    if !preamble.trim().is_empty() {
        s.push_str(preamble.trim_end());
        s.push_str("\n\n");
    }
    let groups = group(results);
    let find = |case: &str, broker: &str| -> Option<&BenchResult> {
        results
            .iter()
            .find(|r| r.case == case && r.broker == broker)
    };
    let base0 = a.baselines.first().cloned().unwrap_or_default();

    // Targets of issue 8 that these runs can check.
    let _ = writeln!(s, "### Targets\n");
    let _ = writeln!(s, "| target | measured | met? |\n| --- | --- | --- |");
    for (case, _) in &groups {
        let Some(ours) = find(case, &a.ours) else {
            continue;
        };
        if ours.qos != 0 || !matches!(ours.scenario.as_str(), "pairs" | "fan-out") {
            continue;
        }
        let Some(base) = find(case, &base0) else {
            continue;
        };
        // At a fixed offered rate every broker delivers the same msgs/s: throughput is judged
        // on the max-rate cases, CPU per message and p99 on the fixed-rate ones (at max rate
        // p99 only measures how deep the broker lets its queues grow).
        let cpu = (
            "broker CPU per message ≤ 0.5×",
            ratio(ours.cpu_s_per_million, base.cpu_s_per_million),
            0.5,
            true,
        );
        let checks = if ours.rate_per_publisher == 0 {
            vec![
                (
                    "throughput ≥ 1×",
                    ratio(Some(ours.delivered_rate), Some(base.delivered_rate)),
                    1.0,
                    false,
                ),
                cpu,
            ]
        } else {
            vec![
                cpu,
                (
                    "p99 ≤ 1×",
                    ratio(lat(ours, |l| l.p99_us), lat(base, |l| l.p99_us)),
                    1.0,
                    true,
                ),
            ]
        };
        for (what, v, limit, lower) in checks {
            let met = v.map(|v| if lower { v <= limit } else { v >= limit });
            let _ = writeln!(
                s,
                "| `{case}`: {what} {base0} | {} | {} |",
                v.map(|v| format!("{v:.2}×")).unwrap_or_else(|| "–".into()),
                match met {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "–",
                }
            );
        }
    }
    for (case, rs) in &groups {
        for (who, name) in [("", &a.ours), (" (cluster: frontend RSS)", &a.cluster)] {
            let Some(ours) = rs
                .iter()
                .find(|r| &r.broker == name && r.scenario == "idle")
            else {
                continue;
            };
            if let Some(b) = ours.rss_per_connection_bytes {
                let _ = writeln!(
                    s,
                    "| `{case}`: ≤ 2 KB broker memory per idle connection (target at 10k){who} | {b:.0} B | {} |",
                    if b <= 2048.0 { "yes" } else { "**no**" }
                );
            }
        }
    }
    for row in cluster_target_rows(&a.cluster, results) {
        let _ = writeln!(s, "{row}");
    }
    s.push('\n');

    for p in plots {
        let _ = writeln!(s, "![{p}]({p})\n");
    }

    for (case, rs) in &groups {
        let cols = columns(&rs[0].scenario);
        let _ = writeln!(s, "### `{case}`\n\n{}\n", describe(rs[0]));
        let _ = write!(s, "| broker |");
        for c in &cols {
            let _ = write!(s, " {} |", c.head);
        }
        let _ = write!(s, "\n| --- |");
        for _ in &cols {
            let _ = write!(s, " ---: |");
        }
        s.push('\n');
        let mut order: Vec<&str> = vec![a.ours.as_str(), a.cluster.as_str()];
        order.extend(a.baselines.iter().map(String::as_str));
        for r in rs {
            if !order.contains(&r.broker.as_str()) {
                order.push(&r.broker);
            }
        }
        for b in &order {
            let Some(r) = rs.iter().find(|r| r.broker == *b) else {
                continue;
            };
            let _ = write!(s, "| {b} |");
            for c in &cols {
                let _ = write!(s, " {} |", cell((c.get)(r)));
            }
            s.push('\n');
        }
        // Ratio rows: ours against every baseline, the cluster against ours (standalone) and
        // the first baseline.
        let mut pairs: Vec<(&str, &str)> = a
            .baselines
            .iter()
            .map(|b| (a.ours.as_str(), b.as_str()))
            .collect();
        pairs.push((a.cluster.as_str(), a.ours.as_str()));
        if let Some(b) = a.baselines.first() {
            pairs.push((a.cluster.as_str(), b.as_str()));
        }
        for (num_name, base) in pairs {
            let (Some(ours), Some(br)) = (
                rs.iter().find(|r| r.broker == num_name),
                rs.iter().find(|r| r.broker == base),
            ) else {
                continue;
            };
            let _ = write!(s, "| *{num_name} / {base}* |");
            for c in &cols {
                let v = if c.ratio {
                    ratio((c.get)(ours), (c.get)(br))
                } else {
                    None
                };
                let mark = match (v, c.better) {
                    (Some(v), Better::Higher) if v >= 1.0 => " ✓",
                    (Some(v), Better::Lower) if v <= 1.0 => " ✓",
                    _ => "",
                };
                let _ = write!(
                    s,
                    " {} |",
                    v.map(|v| format!("*{v:.2}×*{mark}")).unwrap_or_default()
                );
            }
            s.push('\n');
        }
        let mut notes: Vec<String> = rs
            .iter()
            .flat_map(|r| r.notes.iter().map(move |n| format!("{}: {n}", r.broker)))
            .collect();
        for r in rs {
            if let Some(split) = cpu_split(&r.broker_cpu_parts) {
                notes.push(format!("{} CPU by process: {split}", r.broker));
            }
        }
        if !notes.is_empty() {
            s.push_str("\nNotes: ");
            s.push_str(&notes.join("; "));
            s.push('\n');
        }
        s.push('\n');
    }
    s
}

/// Replaces the generated block in `doc` (or adds the section).
pub fn splice(doc: &str, block: &str) -> String {
    let generated = format!("{BEGIN}\n{}\n{END}", block.trim_end());
    if let (Some(b), Some(e)) = (doc.find(BEGIN), doc.find(END)) {
        if b < e {
            return format!("{}{}{}", &doc[..b], generated, &doc[e + END.len()..]);
        }
    }
    if let Some(h) = doc.find(SECTION) {
        let line_end = doc[h..].find('\n').map(|i| h + i + 1).unwrap_or(doc.len());
        return format!("{}\n{}\n{}", &doc[..line_end], generated, &doc[line_end..]);
    }
    let mut out = if doc.trim().is_empty() {
        "# Benchmarks\n".to_string()
    } else {
        doc.trim_end().to_string() + "\n"
    };
    let _ = write!(out, "\n{SECTION}\n\n{generated}\n");
    out
}

/// `tiermq bench report`.
pub fn write_report(a: &ReportArgs) -> anyhow::Result<()> {
    let mut results = Vec::new();
    for p in &a.inputs {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        let r: BenchResult =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
        results.push(r);
    }
    let preamble = match &a.preamble {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        None => String::new(),
    };
    let svg_dir = a
        .svg_dir
        .clone()
        .or_else(|| a.out.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&svg_dir).ok();
    let mut plots = Vec::new();
    let rel = |name: &str| -> String {
        // The markdown links relative to its own folder.
        let full = svg_dir.join(name);
        match a.out.parent() {
            Some(d) if !d.as_os_str().is_empty() => full
                .strip_prefix(d)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| full.display().to_string()),
            _ => full.display().to_string(),
        }
    };
    if plot_throughput(a, &results, &svg_dir.join("bench-throughput.svg"))? {
        plots.push(rel("bench-throughput.svg"));
    }
    if plot_p99(a, &results, &svg_dir.join("bench-p99.svg"))? {
        plots.push(rel("bench-p99.svg"));
    }
    let block = markdown(a, &results, &preamble, &plots);
    let doc = std::fs::read_to_string(&a.out).unwrap_or_default();
    std::fs::write(&a.out, splice(&doc, &block))
        .with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!(
        "wrote {} and {} plot(s) in {}",
        a.out.display(),
        plots.len(),
        svg_dir.display()
    );
    Ok(())
}

fn broker_order(a: &ReportArgs, results: &[BenchResult]) -> Vec<String> {
    let mut order = vec![a.ours.clone(), a.cluster.clone()];
    order.extend(a.baselines.iter().cloned());
    for r in results {
        if !order.contains(&r.broker) {
            order.push(r.broker.clone());
        }
    }
    order.retain(|b| results.iter().any(|r| &r.broker == b));
    order
}

fn color(i: usize) -> plotters::style::RGBColor {
    use plotters::style::RGBColor;
    const C: [RGBColor; 5] = [
        RGBColor(0x1f, 0x77, 0xb4),
        RGBColor(0xff, 0x7f, 0x0e),
        RGBColor(0x2c, 0xa0, 0x2c),
        RGBColor(0x94, 0x67, 0xbd),
        RGBColor(0x7f, 0x7f, 0x7f),
    ];
    C[i % C.len()]
}

/// Grouped bars: one group per case, one bar per broker. Returns false if nothing to plot.
fn bar_chart(
    path: &Path,
    title: &str,
    y_desc: &str,
    cases: &[String],
    brokers: &[String],
    values: &BTreeMap<(usize, usize), f64>,
    log: bool,
) -> anyhow::Result<bool> {
    use plotters::prelude::*;
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    if values.is_empty() {
        return Ok(false);
    }
    let max = values.values().cloned().fold(0.0f64, f64::max);
    let min = values.values().cloned().fold(f64::INFINITY, f64::min);
    let n = cases.len() as f64;
    let width = (160 * cases.len() as u32 + 160).max(640);
    let root = SVGBackend::new(path, (width, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let nb = brokers.len().max(1) as f64;
    let draw = |x: usize, b: usize| {
        (
            x as f64 + 0.1 + 0.8 * b as f64 / nb,
            x as f64 + 0.1 + 0.8 * (b + 1) as f64 / nb,
        )
    };
    let err = |e: &dyn std::fmt::Debug| anyhow::anyhow!("plot: {e:?}");
    macro_rules! body {
        ($chart:ident, $floor:expr) => {{
            $chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(0)
                .y_desc(y_desc)
                .draw()
                .map_err(|e| err(&e))?;
            for (bi, b) in brokers.iter().enumerate() {
                let c = color(bi);
                let bars: Vec<_> = values
                    .iter()
                    .filter(|((_, bj), _)| *bj == bi)
                    .map(|((x, _), v)| {
                        let (x0, x1) = draw(*x, bi);
                        Rectangle::new([(x0, $floor), (x1, *v)], c.filled())
                    })
                    .collect();
                $chart
                    .draw_series(bars)
                    .map_err(|e| err(&e))?
                    .label(b.as_str())
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled())
                    });
                let labels: Vec<_> = values
                    .iter()
                    .filter(|((_, bj), _)| *bj == bi)
                    .map(|((x, _), v)| {
                        let (x0, x1) = draw(*x, bi);
                        Text::new(
                            num(*v),
                            ((x0 + x1) / 2.0, *v),
                            ("sans-serif", 11)
                                .into_font()
                                .color(&BLACK)
                                .pos(Pos::new(HPos::Center, VPos::Bottom)),
                        )
                    })
                    .collect();
                $chart.draw_series(labels).map_err(|e| err(&e))?;
            }
            for (i, case) in cases.iter().enumerate() {
                let (px, py) = $chart.backend_coord(&(i as f64 + 0.5, $floor));
                root.draw(&Text::new(
                    case.clone(),
                    (px, py + 8),
                    ("sans-serif", 13)
                        .into_font()
                        .color(&BLACK)
                        .pos(Pos::new(HPos::Center, VPos::Top)),
                ))
                .map_err(|e| err(&e))?;
            }
            $chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .border_style(BLACK)
                .background_style(WHITE.mix(0.9))
                .draw()
                .map_err(|e| err(&e))?;
        }};
    }
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70);
    if log {
        let floor = (min / 2.0).max(1e-3);
        let mut chart = builder
            .build_cartesian_2d(0f64..n, (floor..max * 3.0).log_scale())
            .map_err(|e| err(&e))?;
        body!(chart, floor);
    } else {
        let mut chart = builder
            .build_cartesian_2d(0f64..n, 0f64..max * 1.2)
            .map_err(|e| err(&e))?;
        body!(chart, 0.0);
    }
    root.present().map_err(|e| err(&e))?;
    Ok(true)
}

/// Throughput relative to the first baseline, per message case.
fn plot_throughput(a: &ReportArgs, results: &[BenchResult], path: &Path) -> anyhow::Result<bool> {
    let brokers = broker_order(a, results);
    let base = a.baselines.first().cloned().unwrap_or_default();
    let mut cases = Vec::new();
    let mut values = BTreeMap::new();
    for (case, rs) in group(results) {
        if rs[0].scenario == "idle" {
            continue;
        }
        let Some(b) = rs
            .iter()
            .find(|r| r.broker == base)
            .map(|r| r.delivered_rate)
        else {
            continue;
        };
        if b <= 0.0 {
            continue;
        }
        let x = cases.len();
        cases.push(case.clone());
        for (bi, name) in brokers.iter().enumerate() {
            if let Some(r) = rs.iter().find(|r| &r.broker == name) {
                values.insert((x, bi), r.delivered_rate / b);
            }
        }
    }
    bar_chart(
        path,
        &format!(
            "Throughput relative to {base} (higher is better; msgs/s, connects/s for conn-storm)"
        ),
        &format!("× {base}"),
        &cases,
        &brokers,
        &values,
        false,
    )
}

/// p99 end-to-end latency in ms per message case (log scale).
fn plot_p99(a: &ReportArgs, results: &[BenchResult], path: &Path) -> anyhow::Result<bool> {
    let brokers = broker_order(a, results);
    let mut cases = Vec::new();
    let mut values = BTreeMap::new();
    for (case, rs) in group(results) {
        if !matches!(rs[0].scenario.as_str(), "pairs" | "fan-in" | "fan-out") {
            continue;
        }
        let x = cases.len();
        cases.push(case.clone());
        for (bi, name) in brokers.iter().enumerate() {
            if let Some(v) = rs
                .iter()
                .find(|r| &r.broker == name)
                .and_then(|r| lat(r, |l| l.p99_us))
            {
                values.insert((x, bi), v);
            }
        }
    }
    bar_chart(
        path,
        "p99 end-to-end latency, ms (lower is better; log scale)",
        "ms",
        &cases,
        &brokers,
        &values,
        true,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(case: &str, broker: &str, rate: f64, p99: u64, cpu: f64) -> BenchResult {
        BenchResult {
            case: case.into(),
            broker: broker.into(),
            scenario: "pairs".into(),
            delivered_rate: rate,
            latency: Some(Latency {
                count: 10,
                p50_us: p99 / 2,
                p99_us: p99,
                p999_us: p99,
                max_us: p99,
                ..Default::default()
            }),
            cpu_s_per_million: Some(cpu),
            ..Default::default()
        }
    }

    #[test]
    fn cpu_split_groups_by_role() {
        let part = |process: &str, cpu_s| CpuPart {
            pid: 1,
            process: process.into(),
            cpu_s,
        };
        let parts = [
            part("frontend", 2.0),
            part("backend", 1.0),
            part("backend", 1.0),
        ];
        assert_eq!(
            cpu_split(&parts).as_deref(),
            Some("frontend 50%, backend 25% + 25%")
        );
        assert_eq!(cpu_split(&parts[..1]), None);
    }

    #[test]
    fn cluster_target_takes_the_best_sustained_step() {
        let step = |case: &str, rate: u64, delivered: f64, p99_us: u64, unsent: u64| {
            let mut r = result(case, "tiermq-cluster", delivered, p99_us, 50.0);
            r.qos = 1;
            r.publishers = 100;
            r.rate_per_publisher = rate;
            r.send_rate = (100 * rate) as f64;
            r.unsent = unsent;
            r.tally.expected = 1000;
            r.tally.received = 1000;
            r
        };
        let rs = vec![
            step("s20k", 200, 19_990.0, 20_000, 0),
            step("s30k", 300, 29_990.0, 45_000, 0),
            step("s40k", 400, 39_000.0, 900_000, 0),
            step("s50k", 500, 30_000.0, 40_000, 5_000),
        ];
        let rows = cluster_target_rows("tiermq-cluster", &rs).join("\n");
        assert!(rows.contains("**29990 msgs/s** (`s30k`"), "{rows}");
        assert!(rows.ends_with("| **no** |"), "{rows}");
        let rs = vec![step("s50k", 500, 49_995.0, 30_000, 0)];
        let rows = cluster_target_rows("tiermq-cluster", &rs).join("\n");
        assert!(rows.ends_with("| yes |"), "{rows}");
        assert!(cluster_target_rows("tiermq-cluster", &[])[0].contains("not measured"));
    }

    #[test]
    fn splice_keeps_other_sections() {
        let doc = "# Benchmarks\n\n## Codec and trie micro-benchmarks\n\ntext A\n\n## Broker benchmarks\n\nintro\n";
        let once = splice(doc, "block 1");
        assert!(once.contains("text A") && once.contains("intro") && once.contains("block 1"));
        let twice = splice(&once, "block 2");
        assert!(
            !twice.contains("block 1") && twice.contains("block 2") && twice.contains("text A")
        );
        assert_eq!(twice.matches(BEGIN).count(), 1);
        let fresh = splice("", "b");
        assert!(fresh.starts_with("# Benchmarks") && fresh.contains(SECTION));
    }

    #[test]
    fn markdown_has_ratios_and_targets_and_svg_renders() {
        let rs = vec![
            result("pairs-qos0", "tiermq", 200.0, 2000, 1.0),
            result("pairs-qos0", "mosquitto", 100.0, 4000, 4.0),
        ];
        let dir = tempfile::tempdir().unwrap();
        let a = ReportArgs {
            inputs: vec![],
            out: dir.path().join("b.md"),
            svg_dir: None,
            ours: "tiermq".into(),
            baselines: vec!["mosquitto".into(), "rumqttd".into()],
            preamble: None,
            cluster: "tiermq-cluster".into(),
        };
        let md = markdown(&a, &rs, "", &[]);
        assert!(md.contains("*2.00×* ✓"), "{md}");
        assert!(
            md.contains("| `pairs-qos0`: broker CPU per message ≤ 0.5× mosquitto | 0.25× | yes |"),
            "{md}"
        );
        assert!(plot_throughput(&a, &rs, &dir.path().join("t.svg")).unwrap());
        assert!(plot_p99(&a, &rs, &dir.path().join("p.svg")).unwrap());
        let svg = std::fs::read_to_string(dir.path().join("p.svg")).unwrap();
        assert!(svg.contains("<svg") && svg.contains("pairs-qos0"));
        let table = summary_table(&rs[0]);
        assert!(
            table.contains("p99 4.00") || table.contains("p99 2.00"),
            "{table}"
        );
    }
}

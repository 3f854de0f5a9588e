//! The load scenarios. Every loop here is bounded by the run's deadline plus a drain period.
//!
//! This module holds what every scenario shares (the run's context, connecting, the broker's
//! CPU and memory probe); each scenario family has its own module:
//! [`messages`] (pairs, fan-in, fan-out), [`connections`] (conn-storm, idle) and
//! [`retained`].

mod connections;
mod messages;
mod retained;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::client::{Conn, ConnectOptions};
use super::procfs;
use super::report::{BenchResult, CpuPart};
use super::{LoadArgs, Scenario};

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
        Scenario::Pairs | Scenario::FanIn | Scenario::FanOut => messages::run(&ctx).await,
        Scenario::ConnStorm => connections::conn_storm(&ctx).await,
        Scenario::Retained => retained::run(&ctx).await,
        Scenario::Idle => connections::idle(&ctx).await,
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

//! `tiermq bench`: an MQTT load generator and the side-by-side broker benchmark (issue 8).
//!
//! * [`client`]: a lean async MQTT client built on the tiermq codec (one socket, two buffers).
//! * [`scenarios`]: `pairs`, `fan-in` (optionally `--shared`), `fan-out`, `conn-storm`,
//!   `retained`, `idle`. Publishers are open-loop: message `k` is due at `start + k/rate` and
//!   its latency is measured from that *intended* time (coordinated-omission correction);
//!   `--rate 0` sends as fast as the socket takes.
//! * [`payload`]: send timestamp + publisher id + sequence number in every payload, so
//!   [`tracker`] can count lost / duplicated / out-of-order / unexpected deliveries.
//! * [`report`]: the summary table, JSON output and the `docs/benchmarks.md` section with
//!   SVG plots (`tiermq bench report`, used by `scripts/bench-compare`).

pub mod client;
pub mod payload;
pub mod procfs;
pub mod report;
pub mod scenarios;
pub mod schedule;
pub mod tracker;

#[cfg(test)]
mod tests;

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use tiermq_common::{ProtocolVersion, QoS};

use crate::parse_duration;

pub use report::BenchResult;

/// `tiermq bench <scenario> [options]`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(Subcommand, Debug, Clone)]
pub enum BenchCommand {
    /// N publishers → N subscribers, one topic per pair [default 10 pairs].
    Pairs(LoadArgs),
    /// N publishers → 1 subscriber on a wildcard, or with --shared a `$share` group of
    /// subscribers [default 10 publishers].
    FanIn(LoadArgs),
    /// 1 publisher → N subscribers on one topic [default 10 subscribers].
    FanOut(LoadArgs),
    /// N workers reconnect with the same client ids as fast as allowed (each connect takes
    /// over the previous connection) [default 50 client ids; --rate is connects/s per id].
    ConnStorm(LoadArgs),
    /// Publish --topics retained topics, then --subscribers wildcard subscribers: time until
    /// the last retained message arrives.
    Retained(LoadArgs),
    /// Open --connections idle connections: broker memory per connection (needs --broker-pid).
    Idle(LoadArgs),
    /// Write the "Broker benchmarks" section of a markdown file, and SVG plots, from the JSON
    /// results of several runs.
    Report(report::ReportArgs),
}

/// Options shared by the load scenarios.
#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    /// Broker host (IP address).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Broker port; several, comma separated (e.g. a cluster's frontends), spread the
    /// connections over them (pairs: a publisher and its subscriber on different ports).
    #[arg(long, default_value = "1883", value_delimiter = ',')]
    pub port: Vec<u16>,
    /// QoS of publishes and subscriptions.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// Payload size in bytes (at least 20: timestamp, publisher id, sequence number).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Messages per second per publisher (connects/s per worker in conn-storm); 0 = max.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// How long publishers publish (e.g. 10s, 500ms, 2m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    #[arg(long)]
    pub publishers: Option<usize>,
    #[arg(long)]
    pub subscribers: Option<usize>,
    /// fan-in: subscribers form one shared group `$share/bench/...`.
    #[arg(long)]
    pub shared: bool,
    /// idle: connections to open.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// retained: retained topics to publish.
    #[arg(long, default_value_t = 10_000)]
    pub topics: usize,
    /// MQTT version: 3 (3.1.1) or 5.
    #[arg(long, default_value = "5", value_parser = parse_mqtt_version)]
    pub mqtt: ProtocolVersion,
    /// Write the result as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Source addresses to spread connections over, e.g. 127.0.0.1,127.0.0.2.
    #[arg(long, value_delimiter = ',')]
    pub source_ips: Vec<IpAddr>,
    /// Broker process id(s), comma separated: the CPU time reported is the sum over all of
    /// them (a cluster: frontends and backends), per process in the JSON.
    #[arg(long, value_delimiter = ',')]
    pub broker_pid: Vec<u32>,
    /// Process id(s) whose resident memory is reported (summed) [default: the first
    /// --broker-pid]; for a cluster, its frontends.
    #[arg(long, value_delimiter = ',')]
    pub rss_pid: Vec<u32>,
    /// Broker name recorded in the result (for reports).
    #[arg(long, default_value = "broker")]
    pub broker_name: String,
    /// Case name recorded in the result (for reports) [default: the scenario and QoS].
    #[arg(long)]
    pub case: Option<String>,
    /// QoS1/2 messages a publisher keeps in flight (capped by the broker's Receive Maximum).
    #[arg(long, default_value_t = 1000)]
    pub window: u16,
    /// Connections opened at the same time while setting up.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Worker threads of the load generator [default: number of CPUs].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Longest wait for in-flight deliveries after publishing stops.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub drain: Duration,
}

/// The scenario a [`BenchCommand`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Pairs,
    FanIn,
    FanOut,
    ConnStorm,
    Retained,
    Idle,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Pairs => "pairs",
            Scenario::FanIn => "fan-in",
            Scenario::FanOut => "fan-out",
            Scenario::ConnStorm => "conn-storm",
            Scenario::Retained => "retained",
            Scenario::Idle => "idle",
        }
    }
}

impl LoadArgs {
    pub fn qos(&self) -> QoS {
        QoS::from_u8(self.qos).unwrap_or(QoS::AtMostOnce)
    }
}

fn parse_mqtt_version(s: &str) -> Result<ProtocolVersion, String> {
    match s {
        "3" | "4" | "311" | "3.1.1" => Ok(ProtocolVersion::V311),
        "5" | "5.0" => Ok(ProtocolVersion::V5),
        _ => Err(format!("unknown MQTT version {s:?} (3 or 5)")),
    }
}

/// Entry point of `tiermq bench`.
pub fn main(args: BenchArgs) -> ExitCode {
    let (scenario, load) = match args.command {
        BenchCommand::Report(r) => {
            return match report::write_report(&r) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tiermq bench report: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        BenchCommand::Pairs(a) => (Scenario::Pairs, a),
        BenchCommand::FanIn(a) => (Scenario::FanIn, a),
        BenchCommand::FanOut(a) => (Scenario::FanOut, a),
        BenchCommand::ConnStorm(a) => (Scenario::ConnStorm, a),
        BenchCommand::Retained(a) => (Scenario::Retained, a),
        BenchCommand::Idle(a) => (Scenario::Idle, a),
    };
    procfs::raise_nofile_limit();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(t) = load.threads {
        rt.worker_threads(t.max(1));
    }
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tiermq bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(scenarios::run(scenario, &load, true));
    match result {
        Ok(r) => {
            println!("{}", report::summary_table(&r));
            if let Some(path) = &load.json {
                let text = serde_json::to_string_pretty(&r).expect("serializable");
                if let Err(e) = std::fs::write(path, text + "\n") {
                    eprintln!("tiermq bench: cannot write {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tiermq bench {}: {e:#}", scenario.name());
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod arg_tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(parse_mqtt_version("3"), Ok(ProtocolVersion::V311));
        assert_eq!(parse_mqtt_version("5"), Ok(ProtocolVersion::V5));
        assert!(parse_mqtt_version("6").is_err());
    }
}

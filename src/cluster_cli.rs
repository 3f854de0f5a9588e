//! `tiermq cluster`: operator tools for a running cluster.
//!
//! * `tiermq cluster status --backend HOST:PORT [--frontends ADMIN,...] [--json] [--healthy]`:
//!   asks that backend for the members and the partition map (the `Cluster` RPC), then asks
//!   **every member** the same, and each given frontend's admin endpoint for `/status`; prints
//!   members (reachable or not), frontends (connections, ready, draining, event streams),
//!   partitions (leader, term, replicas with their commit / applied index and lag behind the
//!   leader) and the map epoch. `--json` prints [`ClusterStatus`] (shape `format` 1, see
//!   docs/operations.md). Exit 1 when the given backend cannot be reached; with `--healthy`,
//!   exit 3 unless every member answers, every partition has a leader and every given
//!   frontend answers and is ready (or draining).
//! * `tiermq cluster probe --frontends A,B,...`: a real MQTT round trip through the cluster:
//!   one subscriber per frontend, one QoS1 publish through each frontend, and every subscriber
//!   must receive every message. Exit 0 when it does, 1 otherwise. Scripts use it to wait
//!   until a cluster serves.
//!
//! * `tiermq cluster remove-node <ID>` / `evict <ID>`: scaling in (`membership_cli.rs`).
//!
//! [`collect`] and [`probe`] are public so tests and other tools reuse them.
//!
//! This file holds the subcommands and their exit codes; `cluster_cli/status.rs` the `--json`
//! shape, `collect.rs` asking the members and frontends, `render.rs` the tables, `probe.rs`
//! the MQTT round trip.

mod collect;
mod probe;
mod render;
mod status;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};

use tiermq_tools::parse_duration;

pub use collect::{cluster_info, collect, collect_with_frontends};
pub use probe::probe;
pub use status::{
    ClusterStatus, FrontendStatus, MemberStatus, PartitionStatus, ReplicaStatus, STATUS_FORMAT,
};

#[derive(Args, Debug)]
pub struct ClusterArgs {
    #[command(subcommand)]
    pub command: ClusterCommand,
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Members, partitions (leader, replicas, term, commit/applied, lag) and the map epoch.
    Status(StatusArgs),
    /// MQTT round trip through every given frontend (subscribe on each, QoS1 publish on each).
    Probe(ProbeArgs),
    /// Take a live backend out of the cluster: its replicas move to the other members first
    /// (the replication factor never drops), then it holds nothing and can be stopped.
    RemoveNode(crate::membership_cli::RemoveArgs),
    /// Take a backend that is dead for good out of the cluster and restore the replication
    /// factor of its partitions; refused while it would leave a partition without a quorum.
    Evict(crate::membership_cli::RemoveArgs),
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// A backend's gRPC address; the other members are found through it.
    #[arg(long, env = "TIERMQ_BACKEND", default_value = "127.0.0.1:7000")]
    pub backend: String,
    /// Frontends' metrics/admin endpoints (their `--metrics-listen`), comma separated, e.g.
    /// 127.0.0.1:9465,127.0.0.1:9466: adds their connection counts, readiness and drain state.
    #[arg(long, env = "TIERMQ_FRONTEND_ADMINS", value_delimiter = ',')]
    pub frontends: Vec<String>,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Exit 3 unless every member answers and every partition has a leader.
    #[arg(long)]
    pub healthy: bool,
    /// How long each backend may take to answer.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub tls: crate::cluster_tls::ClusterTlsArgs,
}

#[derive(Args, Debug)]
pub struct ProbeArgs {
    /// MQTT addresses of the frontends, comma separated, e.g. 127.0.0.1:1883,127.0.0.1:1884.
    #[arg(long, value_delimiter = ',', required = true)]
    pub frontends: Vec<SocketAddr>,
    /// Give up after this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
}

pub fn main(args: ClusterArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tiermq cluster: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match args.command {
        ClusterCommand::Status(a) => runtime.block_on(status_main(a)),
        ClusterCommand::RemoveNode(a) => {
            drop(runtime);
            crate::membership_cli::main(crate::membership_cli::Removal::Remove, a)
        }
        ClusterCommand::Evict(a) => {
            drop(runtime);
            crate::membership_cli::main(crate::membership_cli::Removal::Evict, a)
        }
        ClusterCommand::Probe(a) => {
            match runtime.block_on(async { probe(&a.frontends, a.timeout).await }) {
                Ok(()) => {
                    println!(
                        "ok: a QoS1 message published through each of {} frontend(s) reached a subscriber on each",
                        a.frontends.len()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tiermq cluster probe: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
async fn status_main(a: StatusArgs) -> ExitCode {
    let tls = match a.tls.load() {
        Ok(tls) => tls,
        Err(e) => {
            eprintln!("tiermq cluster status: {e:#}");
            return ExitCode::from(2);
        }
    };
    let status =
        match collect_with_frontends(&a.backend, &a.frontends, a.timeout, tls.as_ref()).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!(
                    "tiermq cluster status: cannot reach backend {}: {e:#}",
                    a.backend
                );
                return ExitCode::FAILURE;
            }
        };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).expect("serializable")
        );
    } else {
        print!("{}", status.render());
    }
    if a.healthy && !status.healthy {
        if !a.json {
            eprintln!(
                "tiermq cluster status: not healthy: {}",
                status.problems.join("; ")
            );
        }
        return ExitCode::from(3);
    }
    ExitCode::SUCCESS
}

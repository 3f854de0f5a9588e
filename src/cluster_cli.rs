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

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde::Serialize;
use tiermq_common::codec::{Packet, PubAck, Publish, PublishProperties};
use tiermq_common::{ProtocolVersion, QoS};
use tiermq_proto::broker::broker_client::BrokerClient;
use tiermq_proto::broker::{ClusterInfo, ClusterRequest};
use tiermq_proto::tls::GrpcTls;
use tiermq_proto::API_VERSION;
use tiermq_tools::bench::client::{Conn, ConnectOptions};
use tiermq_tools::parse_duration;

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

// ---------------------------------------------------------------------------------------------
// Status
// ---------------------------------------------------------------------------------------------

/// Version of the `--json` shape. Fields are only ever added; a change to existing ones
/// raises it.
pub const STATUS_FORMAT: u32 = 1;

/// The cluster as its members report it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ClusterStatus {
    /// [`STATUS_FORMAT`].
    pub format: u32,
    /// The address that was asked first.
    pub asked: String,
    /// The node id behind it.
    pub asked_node: u64,
    /// Epoch of the partition map.
    pub epoch: u64,
    pub partitions: u32,
    pub replication: u32,
    pub members: Vec<MemberStatus>,
    /// Frontends: every one given with `--frontends` and every one a member has an event
    /// stream from.
    pub frontends: Vec<FrontendStatus>,
    pub partition_status: Vec<PartitionStatus>,
    /// Every member answered and every partition has a leader.
    pub healthy: bool,
    /// Why not healthy, in words.
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct MemberStatus {
    pub id: u64,
    pub addr: String,
    pub reachable: bool,
    /// Why it is not reachable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Partitions this member leads (as it says itself).
    pub leads: u32,
    /// The map epoch this member reports (0 when unreachable).
    pub epoch: u64,
    /// Frontends with an open event stream to this member.
    pub frontends: Vec<u64>,
}

/// A frontend as its admin endpoint (`/status`) and the members' event streams show it.
/// Every key is always present; `null` where the source was not asked or did not answer.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct FrontendStatus {
    /// Frontend id (0 when its admin endpoint did not answer and no member knows it).
    pub id: u64,
    /// The admin endpoint asked (`--frontends`), if any.
    pub admin: Option<String>,
    /// Whether the admin endpoint answered; `null` when none was given for this frontend.
    pub reachable: Option<bool>,
    /// MQTT connections open on it now.
    pub connections: Option<u64>,
    pub ready: Option<bool>,
    /// Why not ready, in words.
    pub not_ready: Option<String>,
    pub draining: Option<bool>,
    /// Members this frontend has an open event stream to.
    pub event_streams: Vec<u64>,
    /// Why the admin endpoint did not answer.
    pub error: Option<String>,
}

impl FrontendStatus {
    /// A frontend known only by id (and the members it streams from).
    fn unknown(id: u64, event_streams: Vec<u64>) -> FrontendStatus {
        FrontendStatus {
            id,
            admin: None,
            reachable: None,
            connections: None,
            ready: None,
            not_ready: None,
            draining: None,
            event_streams,
            error: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PartitionStatus {
    pub partition: u32,
    /// The replica that says it leads, with the highest term; 0: none.
    pub leader: u64,
    pub term: u64,
    pub replicas: Vec<ReplicaStatus>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ReplicaStatus {
    pub node: u64,
    pub reachable: bool,
    /// The leader this replica believes in (0: none / unknown).
    pub sees_leader: u64,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    /// Entries this replica has applied fewer than the leader has committed.
    pub lag: u64,
}

pub async fn cluster_info(
    addr: &str,
    timeout: Duration,
    tls: Option<&GrpcTls>,
) -> anyhow::Result<ClusterInfo> {
    let call = async {
        let endpoint = tiermq_proto::tls::endpoint(addr, tls)
            .with_context(|| format!("bad address {addr}"))?
            .connect_timeout(timeout);
        let channel = endpoint.connect().await.context("connect")?;
        let info = BrokerClient::new(channel)
            .cluster(ClusterRequest {
                version: API_VERSION,
                members_only: false,
            })
            .await
            .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
            .into_inner();
        Ok::<_, anyhow::Error>(info)
    };
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or_else(|_| bail!("no answer within {timeout:?}"))
}

/// Asks `backend`, then every member it lists (concurrently), and merges what they say.
/// Fails only when `backend` itself does not answer. With `tls`, over the cluster's mutual TLS.
pub async fn collect(
    backend: &str,
    timeout: Duration,
    tls: Option<&GrpcTls>,
) -> anyhow::Result<ClusterStatus> {
    collect_with_frontends(backend, &[], timeout, tls).await
}

/// [`collect`], plus `/status` from each frontend admin endpoint in `frontends`.
pub async fn collect_with_frontends(
    backend: &str,
    frontends: &[String],
    timeout: Duration,
    tls: Option<&GrpcTls>,
) -> anyhow::Result<ClusterStatus> {
    let (status, admins) = futures::join!(
        collect_members(backend, timeout, tls),
        futures::future::join_all(frontends.iter().map(|a| frontend_admin(a, timeout)))
    );
    let mut status = status?;
    add_frontends(&mut status, admins);
    Ok(status)
}

/// One frontend's `/status`, or why not.
async fn frontend_admin(
    admin: &str,
    timeout: Duration,
) -> (String, Result<serde_json::Value, String>) {
    let answer = match crate::metrics_http::call(admin, "GET", "/status", timeout).await {
        Ok((200, body)) => serde_json::from_str(&body).map_err(|e| format!("bad /status: {e}")),
        Ok((code, body)) => Err(format!("/status answered {code}: {}", body.trim())),
        Err(e) => Err(format!("{e:#}")),
    };
    (admin.to_string(), answer)
}

/// Merges the frontends the admin endpoints describe with those the members see.
fn add_frontends(
    status: &mut ClusterStatus,
    admins: Vec<(String, Result<serde_json::Value, String>)>,
) {
    let streams = |id: u64| -> Vec<u64> {
        status
            .members
            .iter()
            .filter(|m| m.frontends.contains(&id))
            .map(|m| m.id)
            .collect()
    };
    let mut out: Vec<FrontendStatus> = Vec::new();
    for (admin, answer) in admins {
        let f = match answer {
            Ok(v) => {
                let id = v.get("frontend_id").and_then(|x| x.as_u64()).unwrap_or(0);
                FrontendStatus {
                    id,
                    admin: Some(admin),
                    reachable: Some(true),
                    connections: v.get("connections").and_then(|x| x.as_u64()),
                    ready: v.get("ready").and_then(|x| x.as_bool()),
                    not_ready: v
                        .get("not_ready")
                        .and_then(|x| x.as_str())
                        .map(str::to_string),
                    draining: v.get("draining").and_then(|x| x.as_bool()),
                    event_streams: streams(id),
                    error: None,
                }
            }
            Err(e) => FrontendStatus {
                admin: Some(admin),
                reachable: Some(false),
                error: Some(e),
                ..FrontendStatus::unknown(0, Vec::new())
            },
        };
        out.push(f);
    }
    let mut seen: Vec<u64> = status
        .members
        .iter()
        .flat_map(|m| m.frontends.iter().copied())
        .collect();
    seen.sort_unstable();
    seen.dedup();
    for id in seen {
        if !out.iter().any(|f| f.id == id) {
            out.push(FrontendStatus::unknown(id, streams(id)));
        }
    }
    for f in &out {
        let name = f.admin.clone().unwrap_or_else(|| format!("{:016x}", f.id));
        if f.reachable == Some(false) {
            status.problems.push(format!(
                "frontend admin {name} unreachable: {}",
                f.error.as_deref().unwrap_or("")
            ));
        } else if f.ready == Some(false) && f.draining != Some(true) {
            status.problems.push(format!(
                "frontend {name} not ready: {}",
                f.not_ready.as_deref().unwrap_or("")
            ));
        }
    }
    status.healthy = status.problems.is_empty();
    status.frontends = out;
}

async fn collect_members(
    backend: &str,
    timeout: Duration,
    tls: Option<&GrpcTls>,
) -> anyhow::Result<ClusterStatus> {
    let first = cluster_info(backend, timeout, tls).await?;
    let answers = futures::future::join_all(first.members.iter().map(|m| {
        let addr = m.addr.clone();
        let id = m.id;
        let own = (id == first.node_id).then(|| first.clone());
        async move {
            // Ask the member itself even when it is the one we asked: its address in the
            // member list may differ from the one we were given.
            match cluster_info(&addr, timeout, tls).await {
                Ok(i) => (id, Ok(i)),
                Err(e) => match own {
                    Some(i) => (id, Ok(i)),
                    None => (id, Err(format!("{e:#}"))),
                },
            }
        }
    }))
    .await;
    let answers: BTreeMap<u64, Result<ClusterInfo, String>> = answers.into_iter().collect();
    Ok(merge(backend, &first, &answers))
}

fn merge(
    asked: &str,
    first: &ClusterInfo,
    answers: &BTreeMap<u64, Result<ClusterInfo, String>>,
) -> ClusterStatus {
    let mut problems = Vec::new();
    let members: Vec<MemberStatus> = first
        .members
        .iter()
        .map(|m| {
            let answer = answers.get(&m.id);
            let (reachable, error, leads, epoch, frontends) = match answer {
                Some(Ok(i)) => (
                    true,
                    None,
                    i.partition_info
                        .iter()
                        .filter(|p| p.local_replica && p.leader == m.id)
                        .count() as u32,
                    i.epoch,
                    i.frontends.clone(),
                ),
                Some(Err(e)) => (false, Some(e.clone()), 0, 0, Vec::new()),
                None => (false, Some("not asked".into()), 0, 0, Vec::new()),
            };
            if !reachable {
                problems.push(format!(
                    "member {} ({}) unreachable: {}",
                    m.id,
                    m.addr,
                    error.as_deref().unwrap_or("")
                ));
            } else if epoch != first.epoch {
                problems.push(format!(
                    "member {} reports map epoch {epoch}, node {} reports {}",
                    m.id, first.node_id, first.epoch
                ));
            }
            MemberStatus {
                id: m.id,
                addr: m.addr.clone(),
                reachable,
                error,
                leads,
                epoch,
                frontends,
            }
        })
        .collect();
    let mut partition_status = Vec::new();
    let mut leaderless = Vec::new();
    for p in &first.partition_info {
        let mut replicas = Vec::new();
        for &node in &p.replicas {
            let own = answers
                .get(&node)
                .and_then(|a| a.as_ref().ok())
                .and_then(|i| {
                    i.partition_info
                        .iter()
                        .find(|q| q.partition == p.partition && q.local_replica)
                });
            replicas.push(match own {
                Some(q) => ReplicaStatus {
                    node,
                    reachable: true,
                    sees_leader: q.leader,
                    term: q.term,
                    commit: q.commit,
                    applied: q.applied,
                    lag: 0,
                },
                None => ReplicaStatus {
                    node,
                    reachable: false,
                    sees_leader: 0,
                    term: 0,
                    commit: 0,
                    applied: 0,
                    lag: 0,
                },
            });
        }
        // The leader is the replica that says so itself; with two claimants (a deposed
        // leader that has not heard yet), the higher term wins.
        let leader = replicas
            .iter()
            .filter(|r| r.reachable && r.sees_leader == r.node)
            .max_by_key(|r| r.term)
            .map(|r| (r.node, r.term, r.commit));
        let (leader_id, term) = match leader {
            Some((id, term, commit)) => {
                for r in replicas.iter_mut().filter(|r| r.reachable) {
                    r.lag = commit.saturating_sub(r.applied);
                }
                (id, term)
            }
            None => {
                leaderless.push(p.partition);
                (0, replicas.iter().map(|r| r.term).max().unwrap_or(0))
            }
        };
        partition_status.push(PartitionStatus {
            partition: p.partition,
            leader: leader_id,
            term,
            replicas,
        });
    }
    if !leaderless.is_empty() {
        problems.push(format!("partitions without a leader: {leaderless:?}"));
    }
    if first.partition_info.len() != first.partitions as usize {
        problems.push(format!(
            "node {} lists {} of {} partitions",
            first.node_id,
            first.partition_info.len(),
            first.partitions
        ));
    }
    ClusterStatus {
        format: STATUS_FORMAT,
        frontends: Vec::new(),
        asked: asked.to_string(),
        asked_node: first.node_id,
        epoch: first.epoch,
        partitions: first.partitions,
        replication: first.replication,
        members,
        partition_status,
        healthy: problems.is_empty(),
        problems,
    }
}

impl ClusterStatus {
    /// The leader of the partition `key` (a client id or topic) maps to; 0 when none.
    pub fn leader_of_key(&self, key: &str) -> u64 {
        let p = tiermq_common::hashing::partition_of(key, self.partitions.max(1));
        self.partition_status
            .iter()
            .find(|s| s.partition == p)
            .map_or(0, |s| s.leader)
    }

    /// Human-readable tables.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let reachable = self.members.iter().filter(|m| m.reachable).count();
        let led = self
            .partition_status
            .iter()
            .filter(|p| p.leader != 0)
            .count();
        let _ = writeln!(
            out,
            "cluster: map epoch {}, {} partitions × {} replicas, {}/{} members reachable, {}/{} partitions led — {}",
            self.epoch,
            self.partitions,
            self.replication,
            reachable,
            self.members.len(),
            led,
            self.partition_status.len(),
            if self.healthy { "healthy" } else { "DEGRADED" }
        );
        let _ = writeln!(out, "(asked node {} at {})", self.asked_node, self.asked);
        let _ = writeln!(out);
        let _ = writeln!(out, "MEMBERS");
        let addr_w = column_width(self.members.iter().map(|m| m.addr.len()), 7);
        let _ = writeln!(
            out,
            "  {:>4}  {:<addr_w$}  {:<9}  {:>5}  {:>5}",
            "ID", "ADDRESS", "REACHABLE", "LEADS", "EPOCH"
        );
        for m in &self.members {
            let _ = write!(
                out,
                "  {:>4}  {:<addr_w$}  {:<9}  {:>5}  {:>5}",
                m.id,
                m.addr,
                if m.reachable { "yes" } else { "NO" },
                if m.reachable {
                    m.leads.to_string()
                } else {
                    "-".into()
                },
                if m.reachable {
                    m.epoch.to_string()
                } else {
                    "-".into()
                },
            );
            if let Some(e) = &m.error {
                let _ = write!(out, "  ({e})");
            }
            let _ = writeln!(out);
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "FRONTENDS ({} known; CONNS = MQTT connections open, STREAMS = members with its event stream)",
            self.frontends.len()
        );
        let admin_w = column_width(
            self.frontends
                .iter()
                .filter_map(|f| f.admin.as_ref().map(String::len)),
            5,
        );
        let _ = writeln!(
            out,
            "  {:<16}  {:<admin_w$}  {:>6}  {:<5}  {:<8}  STREAMS",
            "ID", "ADMIN", "CONNS", "READY", "DRAINING"
        );
        let yes_no = |b: Option<bool>| match b {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        for f in &self.frontends {
            let id = if f.id == 0 {
                "?".to_string()
            } else {
                format!("{:016x}", f.id)
            };
            let streams: Vec<String> = f.event_streams.iter().map(u64::to_string).collect();
            let _ = write!(
                out,
                "  {:<16}  {:<admin_w$}  {:>6}  {:<5}  {:<8}  {}",
                id,
                f.admin.as_deref().unwrap_or("-"),
                f.connections.map_or("-".to_string(), |c| c.to_string()),
                yes_no(f.ready),
                match f.draining {
                    Some(true) => "DRAINING",
                    Some(false) => "no",
                    None => "-",
                },
                if streams.is_empty() {
                    "-".to_string()
                } else {
                    streams.join(",")
                }
            );
            if let Some(e) = f.error.as_ref().or(f.not_ready.as_ref()) {
                let _ = write!(out, "  ({e})");
            }
            let _ = writeln!(out);
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "PARTITIONS  (replica: commit/applied, lag = leader commit − applied; * = leader)"
        );
        let _ = writeln!(
            out,
            "  {:>4}  {:>6}  {:>5}  REPLICAS",
            "PART", "LEADER", "TERM"
        );
        for p in &self.partition_status {
            let _ = write!(
                out,
                "  {:>4}  {:>6}  {:>5} ",
                p.partition,
                if p.leader == 0 {
                    "NONE".to_string()
                } else {
                    p.leader.to_string()
                },
                p.term
            );
            for r in &p.replicas {
                let mark = if r.node == p.leader { "*" } else { " " };
                if r.reachable {
                    let _ = write!(
                        out,
                        "  {}{}: {}/{} lag {}",
                        r.node, mark, r.commit, r.applied, r.lag
                    );
                } else {
                    let _ = write!(out, "  {}{}: unreachable", r.node, mark);
                }
            }
            let _ = writeln!(out);
        }
        if !self.problems.is_empty() {
            let _ = writeln!(out);
            let _ = writeln!(out, "PROBLEMS");
            for p in &self.problems {
                let _ = writeln!(out, "  - {p}");
            }
        }
        out
    }
}

/// The widest of `widths`, at least `min` (the heading).
fn column_width(widths: impl Iterator<Item = usize>, min: usize) -> usize {
    widths.max().unwrap_or(0).max(min)
}

// ---------------------------------------------------------------------------------------------
// Probe
// ---------------------------------------------------------------------------------------------

/// A QoS1 round trip through every frontend: a subscriber on each, one publish through each,
/// and every subscriber receives every message. Clean sessions, unique client ids and topic.
pub async fn probe(frontends: &[SocketAddr], timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    // Every step shares the deadline, and a timeout says which step it was.
    async fn step<T>(
        deadline: tokio::time::Instant,
        what: String,
        f: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        match tokio::time::timeout_at(deadline, f).await {
            Ok(r) => r.with_context(|| what),
            Err(_) => bail!("timed out: {what}"),
        }
    }
    if frontends.is_empty() {
        bail!("no frontend given");
    }
    let tag = format!(
        "{:x}{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    );
    let topic = format!("tiermq/probe/{tag}");
    let options = |addr: SocketAddr, role: &str, i: usize| ConnectOptions {
        broker: addr,
        source: None,
        version: ProtocolVersion::V5,
        client_id: format!("tiermq-probe-{role}{i}-{tag}"),
        clean_start: true,
        keep_alive: 30,
        receive_maximum: 16,
        timeout: Duration::from_secs(15),
    };
    let mut subs = Vec::new();
    for (i, addr) in frontends.iter().enumerate() {
        let mut c = step(
            deadline,
            format!("connect subscriber to {addr}"),
            Conn::connect(&options(*addr, "sub", i)),
        )
        .await?;
        step(
            deadline,
            format!("SUBSCRIBE through {addr}"),
            c.subscribe(std::slice::from_ref(&topic), QoS::AtLeastOnce),
        )
        .await?;
        subs.push((addr, c));
    }
    for (i, addr) in frontends.iter().enumerate() {
        let mut c = step(
            deadline,
            format!("connect publisher to {addr}"),
            Conn::connect(&options(*addr, "pub", i)),
        )
        .await?;
        c.push(&Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: topic.clone(),
            packet_id: Some(1),
            properties: PublishProperties::default(),
            payload: bytes::Bytes::from(format!("probe {i}")),
        }))?;
        c.flush().await?;
        step(
            deadline,
            format!("PUBACK of the publish through {addr}"),
            async {
                loop {
                    match c.next().await? {
                        Some(Packet::PubAck(a)) if a.packet_id == 1 => {
                            if a.reason_code.is_error() {
                                bail!("refused: {:?}", a.reason_code);
                            }
                            return Ok(());
                        }
                        Some(_) => continue,
                        None => bail!("connection closed"),
                    }
                }
            },
        )
        .await?;
        c.disconnect().await;
    }
    for (addr, mut c) in subs {
        let mut got = vec![false; frontends.len()];
        let what = format!("deliveries to the subscriber on {addr}");
        step(deadline, what, async {
            while got.iter().any(|g| !g) {
                match c
                    .next()
                    .await
                    .with_context(|| format!("missing from {:?}", missing(&got, frontends)))?
                {
                    Some(Packet::Publish(p)) if p.topic == topic => {
                        if let Some(pid) = p.packet_id {
                            c.push(&Packet::PubAck(PubAck::new(pid)))?;
                            c.flush().await?;
                        }
                        let text = String::from_utf8_lossy(&p.payload);
                        if let Some(i) = text
                            .strip_prefix("probe ")
                            .and_then(|n| n.parse::<usize>().ok())
                        {
                            if let Some(g) = got.get_mut(i) {
                                *g = true;
                            }
                        }
                    }
                    Some(_) => continue,
                    None => bail!(
                        "connection closed; missing the messages published through {:?}",
                        missing(&got, frontends)
                    ),
                }
            }
            Ok(())
        })
        .await
        .with_context(|| format!("received: {:?}", got))?;
        c.disconnect().await;
    }
    Ok(())
}

fn missing(got: &[bool], frontends: &[SocketAddr]) -> Vec<SocketAddr> {
    got.iter()
        .zip(frontends)
        .filter(|(g, _)| !**g)
        .map(|(_, a)| *a)
        .collect()
}

//! `tiermq health`: a tiny probe for container health checks and scripts.
//!
//! * `--mqtt ADDR` (a frontend or standalone broker): an MQTT 5 CONNECT / CONNACK round trip
//!   with a throw-away clean session, then DISCONNECT. A frontend answers CONNACK only after
//!   the session's partition leader committed the connect, so this checks the whole path.
//! * `--grpc ADDR` (a backend): the `Cluster` gRPC call; healthy when every partition this node
//!   replicates has a known leader (so a quorum of its replicas is up).
//!   `--leader-of KEY` prints the node id leading the partition of KEY (a client id), as this
//!   node sees it; `--leaders` prints `partition leader` for every partition.
//! * `--http ADDR` (any node's metrics endpoint, `--metrics-listen`): `GET /healthz`, or
//!   `GET /readyz` with `--ready`; healthy on `200`. For images without curl.
//!
//! Exit status 0 when healthy, 1 otherwise (with the reason on stderr).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use tiermq_common::codec::{Disconnect, Packet};
use tiermq_common::{ProtocolVersion, ReasonCode};
use tiermq_proto::broker::broker_client::BrokerClient;
use tiermq_proto::broker::{ClusterInfo, ClusterRequest};
use tiermq_tools::bench::client::{Conn, ConnectOptions};
use tiermq_tools::parse_duration;

#[derive(Args, Debug, Clone)]
pub struct HealthArgs {
    /// Probe an MQTT listener (frontend / standalone), e.g. 127.0.0.1:1883.
    #[arg(long, conflicts_with_all = ["grpc", "http"])]
    pub mqtt: Option<String>,
    /// Probe a backend's gRPC listener, e.g. 127.0.0.1:7000.
    #[arg(long, conflicts_with = "http")]
    pub grpc: Option<String>,
    /// Probe a node's metrics endpoint (`--metrics-listen`), e.g. 127.0.0.1:9464: GET
    /// /healthz (liveness), or /readyz with --ready.
    #[arg(long)]
    pub http: Option<String>,
    /// With --http: ask /readyz (ready to serve) instead of /healthz (alive).
    #[arg(long, requires = "http")]
    pub ready: bool,
    /// With --grpc: print the node id leading the partition of this key (a client id).
    #[arg(long, requires = "grpc")]
    pub leader_of: Option<String>,
    /// With --grpc: print `partition leader` for every partition.
    #[arg(long, requires = "grpc")]
    pub leaders: bool,
    /// Give up after this long.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Print nothing when healthy.
    #[arg(long, short)]
    pub quiet: bool,
    /// With --grpc: the cluster's internal TLS (flags, `TIERMQ_CLUSTER_TLS_*`, or a node's
    /// config file).
    #[command(flatten)]
    pub tls: crate::cluster_tls::ClusterTlsArgs,
}

pub fn main(args: HealthArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("health: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        tokio::time::timeout(args.timeout, probe(&args))
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {:?}", args.timeout)))
    });
    match result {
        Ok(msg) => {
            if !args.quiet && !msg.is_empty() {
                println!("{msg}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("unhealthy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn probe(args: &HealthArgs) -> anyhow::Result<String> {
    if let Some(addr) = &args.http {
        return probe_http(addr, args.ready, args.timeout).await;
    }
    match (&args.mqtt, &args.grpc) {
        (Some(addr), _) => probe_mqtt(addr, args.timeout).await,
        (None, Some(addr)) => {
            let info = cluster_info(addr, args.tls.load()?.as_ref()).await?;
            if let Some(key) = &args.leader_of {
                let p = tiermq_common::hashing::partition_of(key, info.partitions.max(1));
                let leader = info
                    .partition_info
                    .iter()
                    .find(|i| i.partition == p)
                    .map(|i| i.leader)
                    .unwrap_or(0);
                if leader == 0 {
                    bail!("partition {p} has no known leader");
                }
                return Ok(leader.to_string());
            }
            if args.leaders {
                let lines: Vec<String> = info
                    .partition_info
                    .iter()
                    .map(|i| format!("{} {}", i.partition, i.leader))
                    .collect();
                return Ok(lines.join("\n"));
            }
            backend_verdict(&info)
        }
        (None, None) => bail!("give --mqtt ADDR, --grpc ADDR or --http ADDR"),
    }
}

fn backend_verdict(info: &ClusterInfo) -> anyhow::Result<String> {
    let local: Vec<_> = info
        .partition_info
        .iter()
        .filter(|p| p.local_replica)
        .collect();
    let leaderless: Vec<u32> = local
        .iter()
        .filter(|p| p.leader == 0)
        .map(|p| p.partition)
        .collect();
    if !leaderless.is_empty() {
        bail!(
            "node {}: {} of {} local partitions without a leader: {:?}",
            info.node_id,
            leaderless.len(),
            local.len(),
            leaderless
        );
    }
    let leading = local.iter().filter(|p| p.leader == info.node_id).count();
    Ok(format!(
        "ok: node {}, {} members, {} local partitions, leads {}",
        info.node_id,
        info.members.len(),
        local.len(),
        leading
    ))
}

async fn cluster_info(
    addr: &str,
    tls: Option<&tiermq_proto::tls::GrpcTls>,
) -> anyhow::Result<ClusterInfo> {
    let channel = tiermq_proto::tls::endpoint(addr, tls)
        .context("bad address")?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    let info = BrokerClient::new(channel)
        .cluster(ClusterRequest {
            version: tiermq_proto::API_VERSION,
            members_only: false,
        })
        .await
        .map_err(|e| anyhow::anyhow!("Cluster call failed: {}", e.message()))?
        .into_inner();
    Ok(info)
}

async fn probe_http(addr: &str, ready: bool, timeout: Duration) -> anyhow::Result<String> {
    let path = if ready { "/readyz" } else { "/healthz" };
    let (code, body) = crate::metrics_http::call(addr, "GET", path, timeout).await?;
    let body = body.trim();
    if code == 200 {
        Ok(format!("{body}: {path} on {addr}"))
    } else {
        bail!("{path} on {addr} answered {code}: {body}")
    }
}

async fn probe_mqtt(addr: &str, timeout: Duration) -> anyhow::Result<String> {
    let broker = tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("cannot resolve {addr}"))?
        .next()
        .with_context(|| format!("{addr} has no address"))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let client_id = format!("tiermq-health-{}-{nanos}", std::process::id());
    let mut conn = Conn::connect(&ConnectOptions {
        broker,
        source: None,
        version: ProtocolVersion::V5,
        client_id,
        clean_start: true,
        keep_alive: 10,
        receive_maximum: 1,
        timeout,
    })
    .await?;
    // Session expiry 0 (the default): nothing stays behind.
    let _ = conn.push(&Packet::Disconnect(Disconnect {
        reason_code: ReasonCode::SUCCESS,
        properties: Default::default(),
    }));
    let _ = conn.flush().await;
    Ok(format!("ok: CONNACK from {broker}"))
}

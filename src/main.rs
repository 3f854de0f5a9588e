//! `tiermq`: one binary, one subcommand per role.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tiermq::standalone::Standalone;
use tiermq_common::config::{Overrides, Settings};

#[derive(Parser)]
#[command(
    name = "tiermq",
    version,
    about = "A clustered MQTT 3.1.1 + 5.0 broker"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run frontend and partitions in one process, data in a local folder (the default setup).
    Standalone(BrokerArgs),
    /// Run a stateless frontend node of a cluster (see --backends); `frontend drain` drains a
    /// running one. SIGTERM / SIGUSR1 drain it too, Ctrl-C stops it at once.
    Frontend(FrontendArgs),
    /// Run a backend node of a cluster: Raft-replicated partitions (see --node-id, --peers).
    /// `backend drain` moves a running one's partition leadership elsewhere (before a restart).
    Backend(BackendArgs),
    /// Load generator and broker benchmarks (pairs, fan-in, fan-out, conn-storm, retained, idle).
    Bench(tiermq::bench::BenchArgs),
    /// Cluster tools: `status` (members, partitions, leaders, lag), `probe` (MQTT round trip).
    Cluster(tiermq::cluster_cli::ClusterArgs),
    /// Durability checker: numbered QoS1/2 messages in, every loss / duplicate / reorder out.
    Check(tiermq::check::CheckArgs),
    /// Health probe for containers: MQTT CONNECT round trip (--mqtt), backend Cluster call
    /// (--grpc), or a node's /healthz or /readyz (--http [--ready]).
    Health(tiermq::health::HealthArgs),
    /// Manage the password file (`--password-file`): add, remove, list, check users; the
    /// password is read from standard input and stored as an argon2id hash.
    Passwd(tiermq::passwd_cli::PasswdArgs),
}

/// `tiermq frontend [FLAGS]` runs a frontend; `tiermq frontend drain --admin ADDR` drains one.
#[derive(Args, Debug)]
#[command(subcommand_negates_reqs = true)]
struct FrontendArgs {
    #[command(subcommand)]
    action: Option<FrontendAction>,
    #[command(flatten)]
    broker: BrokerArgs,
}

#[derive(Subcommand, Debug)]
enum FrontendAction {
    /// Ask a running frontend to drain (POST /drain on its metrics endpoint): it stops
    /// accepting, sends MQTT 5 clients DISCONNECT 0x9C with the Server Reference, closes
    /// MQTT 3.1.1 clients at --drain-rate per second, and exits once they are gone.
    Drain(tiermq::drain_cli::DrainArgs),
}

/// Settings come from defaults, then `--config FILE`, then `TIERMQ_*` variables, then flags.
#[derive(Args, Debug)]
struct BrokerArgs {
    /// TOML configuration file.
    #[arg(long, short = 'c', env = "TIERMQ_CONFIG")]
    config: Option<PathBuf>,
    /// MQTT listen address [default: 0.0.0.0:1883].
    #[arg(long, env = "TIERMQ_LISTEN")]
    listen: Option<SocketAddr>,
    /// Data folder [default: ./data].
    #[arg(long, env = "TIERMQ_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Number of partitions, fixed when the data folder is created [default: 1].
    #[arg(long, env = "TIERMQ_PARTITIONS")]
    partitions: Option<u32>,
    /// Largest packet accepted from clients, bytes [default: 1048576].
    #[arg(long, env = "TIERMQ_MAX_PACKET_SIZE")]
    max_packet_size: Option<u32>,
    /// QoS1/2 publishes a client may have unacknowledged [default: 1024].
    #[arg(long, env = "TIERMQ_RECEIVE_MAXIMUM")]
    receive_maximum: Option<u16>,
    /// Cap on client keep alive, seconds; 0 accepts any [default: 0].
    #[arg(long, env = "TIERMQ_MAX_KEEP_ALIVE")]
    max_keep_alive: Option<u16>,
    /// Messages queued per session; the oldest is dropped beyond it [default: 100000].
    #[arg(long, env = "TIERMQ_MAX_QUEUED_MESSAGES")]
    max_queued_messages: Option<usize>,
    /// Subscriptions per client; 0 = unlimited [default: 0].
    #[arg(long, env = "TIERMQ_MAX_SUBSCRIPTIONS")]
    max_subscriptions: Option<usize>,
    /// Queue QoS0 messages for offline persistent sessions [default: false].
    #[arg(long, env = "TIERMQ_QUEUE_QOS0_OFFLINE")]
    queue_qos0_offline: Option<bool>,
    /// How a shared subscription group picks a member: round-robin, random or
    /// sticky-by-publisher [default: round-robin].
    #[arg(long, env = "TIERMQ_SHARED_STRATEGY")]
    shared_strategy: Option<tiermq_common::partition_api::SharedStrategy>,
    /// A full session queue: drop-oldest, or refuse-new (v5 publishers get 0x97)
    /// [default: drop-oldest].
    #[arg(long, env = "TIERMQ_QUEUE_FULL_POLICY")]
    queue_full_policy: Option<tiermq_common::partition_api::QueueFullPolicy>,
    /// Log filter, e.g. `info` or `debug`; RUST_LOG wins when set [default: info].
    #[arg(long, env = "TIERMQ_LOG")]
    log_level: Option<String>,
    /// Log lines as `text` or `json` (one object per line) [default: text].
    #[arg(long, env = "TIERMQ_LOG_FORMAT")]
    log_format: Option<tiermq_common::config::LogFormat>,
    /// (cluster) This backend's node id, 1, 2, ...
    #[arg(long, env = "TIERMQ_NODE_ID")]
    node_id: Option<u64>,
    /// (cluster) gRPC listen address of a backend [default: 0.0.0.0:7000].
    #[arg(long, env = "TIERMQ_GRPC_LISTEN")]
    grpc_listen: Option<SocketAddr>,
    /// (cluster) Every backend as `id=host:port`, comma separated, e.g. `1=b1:7000,2=b2:7000`.
    #[arg(long, env = "TIERMQ_PEERS", value_delimiter = ',')]
    peers: Option<Vec<String>>,
    /// (backend) Join a running cluster through any of these members' gRPC addresses,
    /// comma separated, instead of bootstrapping (needs --advertise). See docs/scaling.md.
    #[arg(long, env = "TIERMQ_JOIN", value_delimiter = ',')]
    join: Option<Vec<String>>,
    /// (backend) This node's gRPC address as the other members reach it, `host:port`
    /// [default: this node's entry in --peers].
    #[arg(long, env = "TIERMQ_ADVERTISE")]
    advertise: Option<String>,
    /// (backend) Replica moves a node runs at once after a membership change (the pace of a
    /// rebalance) [default: 2].
    #[arg(long, env = "TIERMQ_MAX_MOVES")]
    max_moves: Option<usize>,
    /// (cluster) Partitions of the cluster, fixed at bootstrap [default: 16].
    #[arg(long, env = "TIERMQ_CLUSTER_PARTITIONS")]
    cluster_partitions: Option<u32>,
    /// (cluster) Replicas per partition [default: 3].
    #[arg(long, env = "TIERMQ_REPLICATION")]
    replication: Option<usize>,
    /// (frontend) Backend gRPC addresses, comma separated, e.g. `b1:7000,b2:7000`.
    #[arg(long, env = "TIERMQ_BACKENDS", value_delimiter = ',')]
    backends: Option<Vec<String>>,
    /// (frontend) Frontend id; 0 draws a random one [default: 0].
    #[arg(long, env = "TIERMQ_FRONTEND_ID")]
    frontend_id: Option<u64>,
    /// (frontend) Where clients go when this frontend drains, `host:port` comma separated:
    /// the Server Reference of DISCONNECT 0x9C [default: none].
    #[arg(long, env = "TIERMQ_SERVER_REFERENCES", value_delimiter = ',')]
    server_references: Option<Vec<String>>,
    /// (frontend) MQTT 3.1.1 connections closed per second while draining; 0 = all at once
    /// [default: 500].
    #[arg(long, env = "TIERMQ_DRAIN_RATE")]
    drain_rate: Option<u32>,
    /// (frontend) Seconds a drain waits for the connections to leave before closing the
    /// rest [default: 30].
    #[arg(long, env = "TIERMQ_DRAIN_TIMEOUT_SECS")]
    drain_timeout_secs: Option<u64>,
    /// Prometheus metrics and health endpoint `host:port`; empty disables it
    /// [default: 127.0.0.1:9464, skipped with a warning when taken].
    #[arg(long, env = "TIERMQ_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Password file for CONNECT user names/passwords (`tiermq passwd`) [default: none].
    #[arg(long, env = "TIERMQ_PASSWORD_FILE")]
    password_file: Option<PathBuf>,
    /// Let clients in without a user name [default: true without a password file, false
    /// with one].
    #[arg(long, env = "TIERMQ_ALLOW_ANONYMOUS")]
    allow_anonymous: Option<bool>,
    /// ACL file: who may publish, subscribe and receive which topics (docs/security.md);
    /// reloaded on SIGHUP and when it changes [default: none, everything allowed].
    #[arg(long, env = "TIERMQ_ACL_FILE")]
    acl_file: Option<PathBuf>,
    /// (cluster, backend) On SIGTERM / Ctrl-C, move partition leadership to other replicas
    /// first, waiting at most this many seconds; 0 stops at once [default: 5].
    #[arg(long, env = "TIERMQ_LEADER_TRANSFER_SECS")]
    leader_transfer_secs: Option<u64>,
    /// Seconds between `$SYS` statistics messages; 0 disables them [default: 10].
    #[arg(long, env = "TIERMQ_SYS_INTERVAL_SECS")]
    sys_interval_secs: Option<u64>,
    /// (standalone, frontend) Seconds between self-check probe rounds (`tiermq_probe_*`
    /// metrics); 0 turns the probe off [default: 0].
    #[arg(long, env = "TIERMQ_PROBE_INTERVAL_SECS")]
    probe_interval_secs: Option<u64>,
    /// Seconds after which a probe message not delivered back counts as lost [default: 5].
    #[arg(long, env = "TIERMQ_PROBE_TIMEOUT_SECS")]
    probe_timeout_secs: Option<u64>,
    #[command(flatten)]
    cluster_tls: tiermq::cluster_tls::ClusterTlsFlags,
    /// Also listen for MQTT over TLS on this `host:port` (needs --tls-cert, --tls-key).
    /// `[[listeners]]` in the config file gives the full form.
    #[arg(long, env = "TIERMQ_TLS_LISTEN")]
    tls_listen: Option<SocketAddr>,
    /// PEM certificate chain (leaf first) of --tls-listen / --wss-listen.
    #[arg(long, env = "TIERMQ_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-listen / --wss-listen.
    #[arg(long, env = "TIERMQ_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificates: --tls-listen / --wss-listen then require client certificates
    /// signed by them (mTLS).
    #[arg(long, env = "TIERMQ_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Also listen for MQTT over WebSocket on this `host:port` (path /mqtt).
    #[arg(long, env = "TIERMQ_WS_LISTEN")]
    ws_listen: Option<SocketAddr>,
    /// Also listen for MQTT over secure WebSocket on this `host:port` (path /mqtt, the
    /// --tls-cert/--tls-key files).
    #[arg(long, env = "TIERMQ_WSS_LISTEN")]
    wss_listen: Option<SocketAddr>,
    /// Open client sockets on this node; beyond it CONNACK 0x97; 0 = unlimited [default: 0].
    #[arg(long, env = "TIERMQ_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// New client sockets per second on this node; beyond it CONNACK 0x9F; 0 = unlimited
    /// [default: 0].
    #[arg(long, env = "TIERMQ_CONNECTION_RATE")]
    connection_rate: Option<u32>,
    /// New client sockets per second from one IP address (CONNACK 0x9F); 0 = unlimited
    /// [default: 0].
    #[arg(long, env = "TIERMQ_CONNECTION_RATE_PER_IP")]
    connection_rate_per_ip: Option<u32>,
    /// PUBLISH packets per second per connection; beyond it reads pause; 0 = unlimited
    /// [default: 0].
    #[arg(long, env = "TIERMQ_PUBLISH_RATE")]
    publish_rate: Option<u32>,
    /// Inbound bytes per second per connection; beyond it reads pause; 0 = unlimited
    /// [default: 0].
    #[arg(long, env = "TIERMQ_PUBLISH_BANDWIDTH")]
    publish_bandwidth: Option<u64>,
}

impl BrokerArgs {
    fn settings(&self) -> Result<Settings, tiermq_common::config::ConfigError> {
        let overrides = Overrides {
            listen: self.listen,
            data_dir: self.data_dir.clone(),
            partitions: self.partitions,
            max_packet_size: self.max_packet_size,
            receive_maximum: self.receive_maximum,
            max_keep_alive: self.max_keep_alive,
            max_queued_messages: self.max_queued_messages,
            max_subscriptions: self.max_subscriptions,
            queue_qos0_offline: self.queue_qos0_offline,
            shared_strategy: self.shared_strategy,
            queue_full_policy: self.queue_full_policy,
            log_level: self.log_level.clone(),
            log_format: self.log_format,
            node_id: self.node_id,
            grpc_listen: self.grpc_listen,
            peers: self.peers.clone(),
            join: self.join.clone(),
            advertise: self.advertise.clone(),
            max_moves: self.max_moves,
            cluster_partitions: self.cluster_partitions,
            replication: self.replication,
            backends: self.backends.clone(),
            frontend_id: self.frontend_id,
            server_references: self.server_references.clone(),
            drain_rate: self.drain_rate,
            drain_timeout_secs: self.drain_timeout_secs,
            metrics_listen: self.metrics_listen.clone(),
            password_file: self.password_file.clone(),
            allow_anonymous: self.allow_anonymous,
            acl_file: self.acl_file.clone(),
            leader_transfer_secs: self.leader_transfer_secs,
            sys_interval_secs: self.sys_interval_secs,
            cluster_tls_ca: self.cluster_tls.ca.clone(),
            cluster_tls_cert: self.cluster_tls.cert.clone(),
            cluster_tls_key: self.cluster_tls.key.clone(),
            probe_interval_secs: self.probe_interval_secs,
            probe_timeout_secs: self.probe_timeout_secs,
            tls_listen: self.tls_listen,
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            tls_ca: self.tls_ca.clone(),
            ws_listen: self.ws_listen,
            wss_listen: self.wss_listen,
            max_connections: self.max_connections,
            connection_rate: self.connection_rate,
            connection_rate_per_ip: self.connection_rate_per_ip,
            publish_rate: self.publish_rate,
            publish_bandwidth: self.publish_bandwidth,
        };
        Settings::load(self.config.as_deref(), &overrides)
    }
}

/// `tiermq backend [FLAGS]` runs a backend; `tiermq backend drain --backend ADDR` hands its
/// leaderships to other replicas.
#[derive(Args, Debug)]
#[command(subcommand_negates_reqs = true)]
struct BackendArgs {
    #[command(subcommand)]
    action: Option<BackendAction>,
    #[command(flatten)]
    broker: BrokerArgs,
}

#[derive(Subcommand, Debug)]
enum BackendAction {
    /// Move the leadership of every partition a running backend leads to its other replicas
    /// (it keeps running as a follower), so it can restart without an election pause.
    Drain(tiermq::backend_drain::BackendDrainArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Standalone(args) => run_server(
            &args,
            |_| Ok(()),
            |settings| async move {
                let broker = Standalone::start(&settings).await?;
                wait_for_signal().await;
                broker.shutdown().await;
                Ok(())
            },
        ),
        Command::Backend(BackendArgs {
            action: Some(BackendAction::Drain(drain)),
            ..
        }) => tiermq::backend_drain::main(drain),
        Command::Backend(BackendArgs { broker: args, .. }) => run_server(
            &args,
            |s| s.cluster.validate_backend(),
            |settings| async move {
                let node = tiermq::backend::BackendNode::start(&settings).await?;
                let failed = tokio::select! {
                    _ = wait_for_signal() => false,
                    _ = node.raft_stopped() => true,
                };
                node.shutdown().await;
                if failed {
                    // Exit non-zero so a supervisor restarts the node from what is durable.
                    anyhow::bail!("the raft node stopped because its storage failed (see the log)");
                }
                Ok(())
            },
        ),
        Command::Bench(args) => tiermq::bench::main(args),
        Command::Cluster(args) => tiermq::cluster_cli::main(args),
        Command::Check(args) => tiermq::check::main(args),
        Command::Health(args) => tiermq::health::main(args),
        Command::Passwd(args) => tiermq::passwd_cli::main(args),
        Command::Frontend(FrontendArgs {
            action: Some(FrontendAction::Drain(drain)),
            ..
        }) => tiermq::drain_cli::main(drain),
        Command::Frontend(FrontendArgs { broker: args, .. }) => run_server(
            &args,
            |s| s.cluster.validate_frontend(),
            |settings| async move {
                let node = tiermq::frontend::FrontendNode::start(&settings).await?;
                match wait_for_frontend_stop(&node.drain_signal()).await {
                    FrontendStop::Now => node.shutdown().await,
                    FrontendStop::Drain => {
                        // A Ctrl-C during the drain stops at once (the rest is dropped).
                        tokio::select! {
                            _ = node.drain() => {}
                            _ = tokio::signal::ctrl_c() => {
                                tracing::warn!("interrupted: stopping without finishing the drain");
                            }
                        }
                    }
                }
                Ok(())
            },
        ),
    }
}

/// Loads settings (exit 2 with a message when invalid), sets up logging and the runtime, and
/// runs a server until it returns.
fn run_server<V, F, Fut>(args: &BrokerArgs, validate: V, serve: F) -> ExitCode
where
    V: FnOnce(&Settings) -> Result<(), tiermq_common::config::ConfigError>,
    F: FnOnce(Settings) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let settings = match args.settings().and_then(|s| validate(&s).map(|()| s)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tiermq: {e}");
            return ExitCode::from(2);
        }
    };
    tiermq::logging::init(&settings.log.level, settings.log.format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tiermq: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tiermq: {e:#}");
            ExitCode::FAILURE
        }
    }
}

enum FrontendStop {
    /// Ctrl-C: stop now (DISCONNECT 0x8B).
    Now,
    /// SIGTERM, SIGUSR1 or `POST /drain`: move the clients away first.
    Drain,
}

/// Waits for what ends a frontend: Ctrl-C stops it; SIGTERM (what `docker stop` and
/// orchestrators send), SIGUSR1 and a drain started through the endpoint drain it.
async fn wait_for_frontend_stop(drain: &tiermq_frontend::drain::Drain) -> FrontendStop {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let usr1 = signal(SignalKind::user_defined1());
        if let (Ok(mut term), Ok(mut usr1)) = (term, usr1) {
            return tokio::select! {
                _ = tokio::signal::ctrl_c() => FrontendStop::Now,
                _ = term.recv() => FrontendStop::Drain,
                _ = usr1.recv() => FrontendStop::Drain,
                _ = drain.started() => FrontendStop::Drain,
            };
        }
    }
    tokio::select! {
        _ = tokio::signal::ctrl_c() => FrontendStop::Now,
        _ = drain.started() => FrontendStop::Drain,
    }
}

/// Waits for SIGINT (Ctrl-C) or SIGTERM.
async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

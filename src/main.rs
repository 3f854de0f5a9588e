//! `tiermq`: one binary, one subcommand per role.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tiermq::standalone::Standalone;
use tiermq_common::config::{NodeFlags, Settings};

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
    Standalone(NodeFlags),
    /// Run a stateless frontend node of a cluster (see --backends); `frontend drain` drains a
    /// running one. SIGTERM / SIGUSR1 drain it too, Ctrl-C stops it at once.
    Frontend(FrontendArgs),
    /// Run a backend node of a cluster: Raft-replicated partitions (see --node-id, --peers).
    /// `backend drain` moves a running one's partition leadership elsewhere (before a restart).
    Backend(BackendArgs),
    /// Load generator and broker benchmarks (pairs, fan-in, fan-out, conn-storm, retained, idle).
    Bench(tiermq_tools::bench::BenchArgs),
    /// Cluster tools: `status` (members, partitions, leaders, lag), `probe` (MQTT round trip).
    Cluster(tiermq::cluster_cli::ClusterArgs),
    /// Durability checker: numbered QoS1/2 messages in, every loss / duplicate / reorder out.
    Check(tiermq_tools::check::CheckArgs),
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
    broker: NodeFlags,
}

#[derive(Subcommand, Debug)]
enum FrontendAction {
    /// Ask a running frontend to drain (POST /drain on its metrics endpoint): it stops
    /// accepting, sends MQTT 5 clients DISCONNECT 0x9C with the Server Reference, closes
    /// MQTT 3.1.1 clients at --drain-rate per second, and exits once they are gone.
    Drain(tiermq::drain_cli::DrainArgs),
}

/// `tiermq backend [FLAGS]` runs a backend; `tiermq backend drain --backend ADDR` hands its
/// leaderships to other replicas.
#[derive(Args, Debug)]
#[command(subcommand_negates_reqs = true)]
struct BackendArgs {
    #[command(subcommand)]
    action: Option<BackendAction>,
    #[command(flatten)]
    broker: NodeFlags,
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
        Command::Bench(args) => tiermq_tools::bench::main(args),
        Command::Cluster(args) => tiermq::cluster_cli::main(args),
        Command::Check(args) => tiermq_tools::check::main(args),
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
fn run_server<V, F, Fut>(args: &NodeFlags, validate: V, serve: F) -> ExitCode
where
    V: FnOnce(&Settings) -> Result<(), tiermq_common::config::ConfigError>,
    F: FnOnce(Settings) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let settings = match args.load().and_then(|s| validate(&s).map(|()| s)) {
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

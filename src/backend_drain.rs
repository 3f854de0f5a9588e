//! `tiermq backend drain --backend HOST:PORT`: asks a running backend to hand the leadership
//! of every partition it leads to other replicas, so it can then be restarted without clients
//! waiting for an election timeout. The node keeps running as a follower.
//!
//! Exit status 0 when no partition is led there any more, 1 otherwise.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use tiermq_proto::broker::broker_client::BrokerClient;
use tiermq_proto::broker::TransferLeadershipRequest;
use tiermq_proto::API_VERSION;
use tiermq_tools::parse_duration;

#[derive(Args, Debug, Clone)]
pub struct BackendDrainArgs {
    /// The backend's gRPC address, e.g. 127.0.0.1:7000.
    #[arg(long)]
    pub backend: String,
    /// Give up after this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub tls: crate::cluster_tls::ClusterTlsArgs,
}

pub fn main(args: BackendDrainArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("backend drain: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(drain(&args)) {
        Ok((still, elapsed_ms)) if still.is_empty() => {
            println!(
                "leadership moved away from {} in {elapsed_ms} ms",
                args.backend
            );
            ExitCode::SUCCESS
        }
        Ok((still, elapsed_ms)) => {
            eprintln!(
                "backend drain: {} still leads partitions {still:?} after {elapsed_ms} ms",
                args.backend
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("backend drain: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn drain(args: &BackendDrainArgs) -> Result<(Vec<u32>, u64), String> {
    let tls = args.tls.load().map_err(|e| format!("{e:#}"))?;
    let endpoint = tiermq_proto::tls::endpoint(&args.backend, tls.as_ref())
        .map_err(|e| format!("bad address {}: {e}", args.backend))?
        .connect_timeout(Duration::from_secs(3));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot reach {}: {e}", args.backend))?;
    let reply = tokio::time::timeout(
        args.timeout + Duration::from_secs(5),
        BrokerClient::new(channel).transfer_leadership(TransferLeadershipRequest {
            version: API_VERSION,
            timeout_ms: args.timeout.as_millis().min(u128::from(u32::MAX)) as u32,
        }),
    )
    .await
    .map_err(|_| "no answer in time".to_string())?
    .map_err(|e| e.message().to_string())?
    .into_inner();
    Ok((reply.still_leading, reply.elapsed_ms))
}

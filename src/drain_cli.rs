//! `tiermq frontend drain --admin HOST:PORT [--wait]`: asks a running frontend to drain, over
//! its metrics/admin endpoint (`POST /drain`, see [`crate::metrics_http`]).
//!
//! Exit status: 0 when the frontend accepted (or, with `--wait`, finished: its endpoint stops
//! answering because the process exited); 1 when it cannot be reached, refuses, or does not
//! finish within `--timeout`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use clap::Args;
use tiermq_tools::parse_duration;

use crate::metrics_http::call;

#[derive(Args, Debug, Clone)]
pub struct DrainArgs {
    /// The frontend's metrics/admin endpoint (`--metrics-listen` of that frontend).
    #[arg(long, env = "TIERMQ_ADMIN", default_value = "127.0.0.1:9464")]
    pub admin: String,
    /// Wait until the frontend has moved its clients away and exited.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this long (the frontend's own drain timeout still applies).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
}

pub fn main(args: DrainArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tiermq frontend drain: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tiermq frontend drain: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &DrainArgs) -> anyhow::Result<()> {
    let ask = Duration::from_secs(5);
    let (code, body) = call(&args.admin, "POST", "/drain", ask).await?;
    match code {
        200 | 202 => println!("{}: {}", args.admin, body.trim()),
        404 => bail!("{} has no drain endpoint (not a frontend?)", args.admin),
        _ => bail!("{} answered {code}: {}", args.admin, body.trim()),
    }
    if !args.wait {
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + args.timeout;
    let mut last = None;
    loop {
        match call(&args.admin, "GET", "/status", ask).await {
            // The endpoint goes away with the process: the drain is over.
            Err(_) => {
                println!("{}: frontend exited", args.admin);
                return Ok(());
            }
            Ok((200, body)) => {
                let left = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v.get("connection_tasks").and_then(|n| n.as_u64()));
                if left.is_some() && left != last {
                    println!(
                        "{}: {} connection(s) left",
                        args.admin,
                        left.unwrap_or_default()
                    );
                    last = left;
                }
            }
            Ok((code, body)) => bail!("{} answered {code}: {}", args.admin, body.trim()),
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "{} still running after {:?} ({} connection(s) left)",
                args.admin,
                args.timeout,
                last.map_or("?".to_string(), |n| n.to_string())
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

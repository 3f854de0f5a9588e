//! Accepting client sockets.

use std::sync::Arc;

use tiermq_common::session_api::SessionService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::FrontendConfig;
use crate::handler::serve_connection;
use crate::metered_io::MeteredIo;
use crate::metrics;

/// Accepts MQTT connections on `listener` until `shutdown` is cancelled, then waits for every
/// connection task to finish (each sends DISCONNECT 0x8B to v5 clients and closes).
pub async fn serve<S: SessionService>(
    listener: TcpListener,
    service: Arc<S>,
    config: Arc<FrontendConfig>,
    shutdown: CancellationToken,
) {
    let tasks = TaskTracker::new();
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "MQTT listener ready");
    }
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.cancelled() => break,
        };
        match accepted {
            Ok((socket, peer)) => {
                let _ = socket.set_nodelay(true);
                let socket = MeteredIo::new(socket, &config.metrics);
                tasks.spawn(metrics::scope(
                    config.metrics.clone(),
                    serve_connection(
                        socket,
                        peer,
                        service.clone(),
                        config.clone(),
                        shutdown.clone(),
                    ),
                ));
            }
            Err(e) => {
                // Typically EMFILE: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    tasks.close();
    tasks.wait().await;
}

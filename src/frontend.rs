//! `tiermq frontend`: a stateless MQTT frontend of a cluster. It terminates MQTT with the same
//! connection handler as the standalone broker and reaches the partitions through the gRPC
//! [`ClusterClient`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tiermq_common::config::Settings;
use tiermq_proto::client::ClusterClient;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::standalone::frontend_config;

pub struct FrontendNode {
    local_addr: SocketAddr,
    shutdown: CancellationToken,
    listener: JoinHandle<()>,
    pub frontend_id: u64,
}

impl FrontendNode {
    pub async fn start(settings: &Settings) -> anyhow::Result<FrontendNode> {
        let cluster = &settings.cluster;
        cluster.validate_frontend()?;
        let frontend_id = match cluster.frontend_id {
            0 => loop {
                // Ids are only compared for equality; avoid the values with a meaning.
                let id = rand_id();
                if id != 0 && id != u64::MAX {
                    break id;
                }
            },
            id => id,
        };
        let client =
            ClusterClient::connect(&cluster.backends, frontend_id, Duration::from_secs(60))
                .await
                .map_err(|e| anyhow::anyhow!(e))
                .context("cannot reach the backends")?;
        let listener = TcpListener::bind(settings.mqtt.listen)
            .await
            .with_context(|| format!("cannot listen on {}", settings.mqtt.listen))?;
        let local_addr = listener.local_addr()?;
        let mut config = frontend_config(settings);
        config.frontend_id = frontend_id;
        let shutdown = CancellationToken::new();
        let listener = tokio::spawn(tiermq_frontend::serve(
            listener,
            Arc::new(client),
            Arc::new(config),
            shutdown.clone(),
        ));
        info!(mqtt = %local_addr, frontend_id, "tiermq frontend running");
        Ok(FrontendNode {
            local_addr,
            shutdown,
            listener,
            frontend_id,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let _ = self.listener.await;
        info!("tiermq frontend stopped");
    }
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS; mixing in the time and pid keeps ids distinct even
    // for frontends started in the same instant.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

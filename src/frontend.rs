//! `tiermq frontend`: a stateless MQTT frontend of a cluster. It terminates MQTT with the same
//! connection handler as the standalone broker and reaches the partitions through the gRPC
//! [`ClusterClient`].

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use tiermq_common::config::Settings;
use tiermq_frontend::drain::Drain;
use tiermq_frontend::metrics::FrontendMetrics;
use tiermq_frontend::sys_topics::SysTopics;
use tiermq_frontend::ListenerSet;
use tiermq_proto::client::ClusterClient;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics_http::{self, MetricsServer};
use crate::node_metrics;
use crate::standalone::{bind_listeners, frontend_config, tls_poll};

pub struct FrontendNode {
    local_addr: SocketAddr,
    listeners: ListenerSet,
    shutdown: CancellationToken,
    listener: JoinHandle<()>,
    pub frontend_id: u64,
    metrics: Option<MetricsServer>,
    sys_topics: Option<JoinHandle<()>>,
    /// The self-check probe, when `metrics.probe_interval_secs` asks for it.
    probe: Option<JoinHandle<()>>,
    drain: Drain,
    drain_timeout: Duration,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every connection left.
    Drained,
    /// The drain timeout passed with `left` connections still open (they got 0x8B).
    TimedOut { left: usize },
}

impl FrontendNode {
    pub async fn start(settings: &Settings) -> anyhow::Result<FrontendNode> {
        let cluster = &settings.cluster;
        cluster.validate_frontend()?;
        let frontend_id = match cluster.frontend_id {
            0 => loop {
                // Ids are only compared for equality; avoid the values with a meaning.
                let id = rand_id();
                if id != 0 && !tiermq_common::session_api::is_internal_frontend(id) {
                    break id;
                }
            },
            id => id,
        };
        // Up before the backends are reached, so /healthz answers while the frontend waits.
        let node_metrics = Arc::new(FrontendMetrics::new());
        let drain = Drain::new(&cluster.server_references, cluster.drain_rate);
        let known_client = Arc::new(OnceLock::new());
        let admin = node_metrics::FrontendState {
            frontend_id,
            metrics: node_metrics.clone(),
            drain: drain.clone(),
            client: known_client.clone(),
        };
        let mut endpoint = node_metrics::frontend(admin);
        let probe_metrics = crate::probe_task::register(settings, &mut endpoint.registry);
        let metrics = metrics_http::start(&settings.metrics, endpoint).await?;
        let tls = crate::cluster_tls::load(cluster)?;
        let client =
            ClusterClient::connect(&cluster.backends, frontend_id, Duration::from_secs(60), tls)
                .await
                .map_err(|e| anyhow::anyhow!(e))
                .context("cannot reach the backends")?
                .configured(tiermq_common::router::RouterConfig {
                    queue_qos0_offline: settings.session.queue_qos0_offline,
                });
        let _ = known_client.set(client.clone());
        let (bound, listeners, local_addr) = bind_listeners(settings).await?;
        let mut config = frontend_config(settings);
        crate::standalone::apply_password_file(settings, &mut config)?;
        config.acl = crate::standalone::acl_set(settings)?;
        config.frontend_id = frontend_id;
        config.metrics = node_metrics.clone();
        config.drain = drain.clone();
        let shutdown = CancellationToken::new();
        let client = Arc::new(client.router().clone());
        let probe = crate::probe_task::spawn(
            settings,
            probe_metrics,
            client.clone(),
            frontend_id,
            shutdown.clone(),
        );
        let listener = tokio::spawn(tiermq_frontend::serve_listeners(
            bound,
            client.clone(),
            Arc::new(config),
            tls_poll(settings),
            shutdown.clone(),
        ));
        let sys_topics = (settings.mqtt.sys_interval_secs > 0).then(|| {
            let interval = Duration::from_secs(settings.mqtt.sys_interval_secs);
            let sys = SysTopics {
                interval,
                prefix: SysTopics::frontend_prefix(frontend_id),
                expiry_secs: Some(SysTopics::expiry_for(interval)),
                metrics: node_metrics,
                publish: Arc::new(move |m| Box::pin(client.publish_message(m))),
                // Retained messages live in the backends' partitions; a frontend cannot count
                // them without asking every partition.
                retained_count: None,
            };
            tokio::spawn(sys.run(shutdown.clone()))
        });
        info!(mqtt = %local_addr, frontend_id, "tiermq frontend running");
        Ok(FrontendNode {
            local_addr,
            listeners,
            shutdown,
            listener,
            frontend_id,
            metrics,
            sys_topics,
            probe,
            drain,
            drain_timeout: Duration::from_secs(cluster.drain_timeout_secs),
        })
    }

    /// The node's drain signal (`POST /drain` and the signals start it).
    pub fn drain_signal(&self) -> Drain {
        self.drain.clone()
    }

    /// Drains (see [`tiermq_frontend::drain`]): stops accepting, moves every client away,
    /// waits for the last connection (at most the drain timeout), then stops the node.
    pub async fn drain(self) -> DrainOutcome {
        if self.drain.start() {
            info!(
                connections = self.drain.connections(),
                server_reference = self.drain.server_reference().unwrap_or(""),
                "draining"
            );
        }
        let outcome = match tokio::time::timeout(self.drain_timeout, self.drain.idle()).await {
            Ok(()) => DrainOutcome::Drained,
            Err(_) => DrainOutcome::TimedOut {
                left: self.drain.connections(),
            },
        };
        match outcome {
            DrainOutcome::Drained => info!("drained: no connection left"),
            DrainOutcome::TimedOut { left } => warn!(
                left,
                timeout = ?self.drain_timeout,
                "drain timeout: closing the connections left (DISCONNECT 0x8B)"
            ),
        }
        self.shutdown().await;
        outcome
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Every client listener with its bound address; reloads TLS certificates.
    pub fn listeners(&self) -> &ListenerSet {
        &self.listeners
    }

    /// Where `/metrics` and `/healthz` are served, if anywhere.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(MetricsServer::local_addr)
    }

    pub async fn shutdown(self) {
        self.shutdown.cancel();
        if let Some(sys) = self.sys_topics {
            let _ = sys.await;
        }
        if let Some(probe) = self.probe {
            let _ = probe.await;
        }
        let _ = self.listener.await;
        if let Some(metrics) = self.metrics {
            metrics.shutdown().await;
        }
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

//! `tiermq backend`: one node of the partitioned, Raft-replicated tier.
//!
//! Bootstrap is static: every node is started with the same `--peers` list, computes the same
//! partition map from it (consistent hashing, `placement.rs`), and opens a Raft group for
//! each partition it replicates. A node restarted on its data folder rejoins with its log.

use std::net::SocketAddr;

use anyhow::Context;
use tiermq_backend::cluster::BrokerService;
use tiermq_backend::placement::{PartitionMap, DEFAULT_VNODES};
use tiermq_backend::raft::node::{self, ClusterHub, LeaderWork, RaftConfig, RaftHandle};
use tiermq_backend::raft::transport::{GrpcTransport, RaftService};
use tiermq_common::config::Settings;
use tiermq_common::shared_dispatch::carry_out;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::metrics_http::{self, MetricsServer};
use crate::node_metrics;
use crate::standalone::local_config;

/// A running backend node.
pub struct BackendNode {
    pub handle: RaftHandle,
    pub map: PartitionMap,
    grpc_addr: SocketAddr,
    shutdown: CancellationToken,
    server: JoinHandle<()>,
    metrics: Option<MetricsServer>,
    /// How long a graceful stop waits for leadership to move away (0: no transfer).
    leader_transfer: std::time::Duration,
}

impl BackendNode {
    pub async fn start(settings: &Settings) -> anyhow::Result<BackendNode> {
        let cluster = &settings.cluster;
        cluster.validate_backend()?;
        let peers = cluster.peer_map()?;
        let tls = crate::cluster_tls::load(cluster)?;
        let ids: Vec<u64> = peers.keys().copied().collect();
        let map = PartitionMap::compute(
            1,
            &ids,
            cluster.partitions,
            cluster.replication,
            DEFAULT_VNODES,
        );
        let dir = &settings.storage.data_dir;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create data folder {}", dir.display()))?;
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(None)
            .mode(sled::Mode::HighThroughput)
            .open()
            .with_context(|| format!("cannot open data folder {}", dir.display()))?;
        let listener = tokio::net::TcpListener::bind(cluster.grpc_listen)
            .await
            .with_context(|| format!("cannot listen on {}", cluster.grpc_listen))?;
        let grpc_addr = listener.local_addr()?;
        let transport = GrpcTransport::start(cluster.node_id, &peers, tls.clone());
        let mut config = RaftConfig::new(cluster.node_id);
        config.limits = local_config(settings).limits;
        let hub = ClusterHub::new();
        let (will_tx, will_rx) = tokio::sync::mpsc::unbounded_channel();
        hub.set_will_sink(will_tx);
        let handle = node::start(config, db, &map, transport, hub)
            .context("cannot start the raft groups")?;
        let metrics = metrics_http::start(
            &settings.metrics,
            node_metrics::backend(handle.clone(), &map),
        )
        .await?;
        let shutdown = CancellationToken::new();
        let service = RaftService::new(cluster.node_id, handle.clone());
        let broker = BrokerService::new(handle.clone(), map.clone(), peers.clone());
        let seeds: Vec<String> = peers.values().cloned().collect();
        tokio::spawn(carry_out_leader_work(
            cluster.node_id,
            seeds,
            tls.clone(),
            will_rx,
            shutdown.clone(),
        ));
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &tls {
            // Client certificates signed by the cluster CA are required from here on.
            builder = builder
                .tls_config(tls.server_config())
                .context("cannot set up TLS on the gRPC server")?;
        }
        let stop = shutdown.clone();
        let server = tokio::spawn(async move {
            let incoming = tokio_stream_from(listener);
            let result = builder
                .tcp_nodelay(true)
                // A frontend behind a network cut sends no FIN: pings find it, so its event
                // stream ends and the frontend lease (wills) starts running.
                .http2_keepalive_interval(Some(std::time::Duration::from_secs(2)))
                .http2_keepalive_timeout(Some(std::time::Duration::from_secs(3)))
                .add_service(service)
                .add_service(broker)
                .serve_with_incoming_shutdown(incoming, stop.cancelled())
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "gRPC server failed");
            }
        });
        info!(
            node = cluster.node_id,
            grpc = %grpc_addr,
            tls = tls.is_some(),
            partitions = map.partitions_of(cluster.node_id).len(),
            "tiermq backend running"
        );
        Ok(BackendNode {
            handle,
            map,
            grpc_addr,
            shutdown,
            server,
            metrics,
            leader_transfer: std::time::Duration::from_secs(cluster.leader_transfer_secs),
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served, if anywhere.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(MetricsServer::local_addr)
    }

    /// Stops serving, checkpoints every group and releases the data folder.
    pub async fn shutdown(self) {
        if !self.leader_transfer.is_zero() {
            // Still serving: followers take over now, instead of after an election timeout
            // once this node is gone.
            let started = std::time::Instant::now();
            let left = self.handle.transfer_leadership(self.leader_transfer).await;
            info!(
                still_leading = left.len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "leadership handed over before stopping"
            );
        }
        self.shutdown.cancel();
        // Long-lived streams (peers' Raft streams, frontends' event and route streams) do not
        // end on their own, so a graceful stop of the server would wait forever: give calls in
        // flight a moment, then cut the rest.
        let mut server = self.server;
        if tokio::time::timeout(std::time::Duration::from_secs(2), &mut server)
            .await
            .is_err()
        {
            server.abort();
            let _ = server.await;
        }
        if let Some(metrics) = self.metrics {
            metrics.shutdown().await;
        }
        self.handle.stop().await;
        info!("tiermq backend stopped");
    }
}

/// Publishes the wills that partitions led by this node fire, through the cluster's normal
/// publish path (the will's subscribers may live in any partition).
/// Carries out what the partitions this node leads hand over: fired wills (published like
/// any message) and shared-subscription steps (commands to other partitions), through a
/// cluster client of our own. Each item's first request is submitted in the order the items
/// arrive, so a partition's steps keep their order.
/// The connect warning of [`carry_out_leader_work`]: at most one a minute.
static CONNECT_WARNINGS: tiermq_common::log_limit::LogLimiter =
    tiermq_common::log_limit::LogLimiter::new(std::time::Duration::from_secs(60));

async fn carry_out_leader_work(
    node_id: u64,
    seeds: Vec<String>,
    tls: Option<tiermq_proto::tls::GrpcTls>,
    mut work: tokio::sync::mpsc::UnboundedReceiver<LeaderWork>,
    shutdown: CancellationToken,
) {
    let first = tokio::select! {
        w = work.recv() => w,
        _ = shutdown.cancelled() => None,
    };
    let Some(first) = first else {
        return;
    };
    // Connect lazily: many nodes never have such work, and at start-up the peers may be down.
    let client = loop {
        // A client id of its own per node (counted down from the top, away from frontends'
        // ids): event streams and route watchers are keyed by it, and two nodes sharing one
        // would keep replacing each other's streams.
        match tiermq_proto::client::ClusterClient::connect(
            &seeds,
            tiermq_common::session_api::INTERNAL_FRONTEND_IDS.saturating_add(node_id),
            std::time::Duration::from_secs(5),
            tls.clone(),
        )
        .await
        {
            Ok(c) => break c,
            Err(e) => {
                // Retried every few seconds for as long as the peers are down.
                tiermq_common::warn_limited!(
                    CONNECT_WARNINGS,
                    "leader-work-connect",
                    error = %e,
                    "leader work cannot reach the cluster yet"
                );
                if shutdown.is_cancelled() {
                    return;
                }
            }
        }
    };
    let mut next = Some(first);
    while let Some(item) = next {
        match item {
            LeaderWork::Will(will) => {
                let topic = will.topic.clone();
                let publish = client.publish_message(will);
                tokio::spawn(async move {
                    if let Err(e) = publish.await {
                        tracing::warn!(%topic, error = %e, "will not published");
                    }
                });
            }
            LeaderWork::Shared { origin, work } => {
                tokio::spawn(carry_out(work, origin, &client));
            }
        }
        next = tokio::select! {
            w = work.recv() => w,
            _ = shutdown.cancelled() => None,
        };
    }
}

/// Accepted sockets as the stream tonic's server takes.
fn tokio_stream_from(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| {
            let _ = s.set_nodelay(true);
            s
        });
        Some((r, l))
    })
}

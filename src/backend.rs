//! `tiermq backend`: one node of the partitioned, Raft-replicated tier.
//!
//! A new cluster bootstraps statically: every node is started with the same `--peers` list,
//! computes the same partition map from it (consistent hashing, `placement.rs`) as membership
//! epoch 1, and opens a Raft group for each partition it replicates. Later changes go through
//! the replicated membership record (`tiermq_backend::members`): `--join` adds a node to a
//! running cluster, `tiermq cluster remove-node` / `evict` take one out. A node restarted on
//! its data folder uses the newest record it stored (or a newer one a peer reports), not
//! `--peers`, and rejoins with its log.

use std::net::SocketAddr;

use anyhow::Context;
use std::sync::Arc;
use std::time::Duration;
use tiermq_backend::cluster::BrokerService;

use tiermq_backend::members::{self, MemberRecord, Members};
use tiermq_backend::placement::PartitionMap;
use tiermq_backend::raft::node::{self, ClusterHub, LeaderWork, RaftConfig, RaftHandle};
use tiermq_backend::raft::transport::{GrpcTransport, RaftService};
use tiermq_common::config::Settings;
use tiermq_common::shared_dispatch::carry_out;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics_http::{self, MetricsServer};
use crate::node_metrics;
use crate::standalone::local_config;

/// A running backend node.
pub struct BackendNode {
    pub handle: RaftHandle,
    pub members: Arc<Members>,
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
        let node_id = cluster.node_id;
        let tls = crate::cluster_tls::load(cluster)?;
        let dir = &settings.storage.data_dir;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create data folder {}", dir.display()))?;
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(None)
            .mode(sled::Mode::HighThroughput)
            .open()
            .with_context(|| format!("cannot open data folder {}", dir.display()))?;
        let start = starting_record(settings, &db, tls.as_ref()).await?;
        let record = start.record;
        let map = record.map();
        let listener = tokio::net::TcpListener::bind(cluster.grpc_listen)
            .await
            .with_context(|| format!("cannot listen on {}", cluster.grpc_listen))?;
        let grpc_addr = listener.local_addr()?;
        let transport = GrpcTransport::start(node_id, &record.members, tls.clone());
        let mut config = RaftConfig::new(node_id);
        config.limits = local_config(settings).limits;
        config.membership.max_moves = cluster.max_moves;
        // Only a brand-new static cluster bootstraps its groups; everything else learns the
        // configuration of a replica new to it from the leader's snapshot.
        config.bootstrap = start.bootstrap;
        let hub = ClusterHub::new();
        let (will_tx, will_rx) = tokio::sync::mpsc::unbounded_channel();
        hub.set_will_sink(will_tx);
        let handle = node::start(config, db.clone(), &map, transport.clone(), hub)
            .context("cannot start the raft groups")?;
        let members = Members::new(
            node_id,
            db,
            handle.clone(),
            transport,
            tls.clone(),
            record.clone(),
        )
        .map_err(|e| anyhow::anyhow!(e))?;
        let metrics = metrics_http::start(
            &settings.metrics,
            node_metrics::backend(handle.clone(), members.clone()),
        )
        .await?;
        let shutdown = CancellationToken::new();
        let service = RaftService::new(node_id, handle.clone());
        let broker = BrokerService::new(handle.clone(), members.clone());
        let seeds: Vec<String> = record.members.values().cloned().collect();
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
        if let Some(advertise) = start.join {
            // Serving already: the members start replicating to this node the moment the
            // change commits.
            let added = members::request_change(
                &cluster.join,
                tls.as_ref(),
                vec![(node_id, advertise.clone())],
                Vec::new(),
                Duration::from_secs(120),
            )
            .await
            .map_err(|e| anyhow::anyhow!("cannot join the cluster: {e}"))?;
            members.adopt(MemberRecord {
                epoch: added.epoch,
                partitions: added.partitions,
                replication: added.replication as usize,
                members: added.members.into_iter().map(|m| (m.id, m.addr)).collect(),
            });
            info!(node = node_id, %advertise, epoch = added.epoch, "joined the cluster");
        }
        tokio::spawn(members.clone().run_poller(shutdown.clone()));
        info!(
            node = node_id,
            grpc = %grpc_addr,
            tls = tls.is_some(),
            epoch = members.epoch(),
            partitions = members.map().partitions_of(node_id).len(),
            "tiermq backend running"
        );
        Ok(BackendNode {
            handle,
            members,
            grpc_addr,
            shutdown,
            server,
            metrics,
            leader_transfer: std::time::Duration::from_secs(cluster.leader_transfer_secs),
        })
    }

    /// Resolves when the Raft driver stopped by itself: it could not persist (a failing
    /// disk) and stopped acknowledging rather than acknowledge what it does not hold.
    pub async fn raft_stopped(&self) {
        self.handle.stopped().await;
    }

    /// The partition map of the newest membership record this node has seen.
    pub fn map(&self) -> PartitionMap {
        self.members.map()
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

/// What a backend starts from: the membership record, whether its groups bootstrap, and
/// (when joining) the address to join with.
struct Start {
    record: MemberRecord,
    bootstrap: bool,
    join: Option<String>,
}

/// Picks the membership record to start with (see the module docs): the stored one, else the
/// running cluster's (joining), else the static `--peers` list as epoch 1 — then any newer
/// record a member reports, so a node that was down during a change does not move replicas
/// back towards an old map.
async fn starting_record(
    settings: &Settings,
    db: &sled::Db,
    tls: Option<&tiermq_proto::tls::GrpcTls>,
) -> anyhow::Result<Start> {
    let cluster = &settings.cluster;
    let node_id = cluster.node_id;
    let stored = MemberRecord::load(db).map_err(|e| anyhow::anyhow!(e))?;
    let joining = !cluster.join.is_empty()
        && !stored
            .as_ref()
            .is_some_and(|r| r.members.contains_key(&node_id));
    let mut start = if joining {
        let advertise = cluster
            .advertised_addr()?
            .context("a joining backend needs --advertise")?;
        info!(seeds = ?cluster.join, "asking the cluster for its membership");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let record = loop {
            if let Some(r) = members::fetch_newest(&cluster.join, tls, Duration::from_secs(2)).await
            {
                break r;
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!("no member of {:?} answered within 60 s", cluster.join);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        Start {
            record,
            bootstrap: false,
            join: Some(advertise),
        }
    } else if let Some(record) = stored {
        let peers = cluster.peer_map()?;
        if record.epoch == 1 && !peers.is_empty() && peers != record.members {
            warn!(
                "--peers differs from the membership stored in the data folder; the stored \
                 one is used (change members with --join / `tiermq cluster remove-node`)"
            );
        }
        let bootstrap = record.epoch == 1;
        Start {
            record,
            bootstrap,
            join: None,
        }
    } else {
        Start {
            record: MemberRecord {
                epoch: 1,
                partitions: cluster.partitions,
                replication: cluster.replication,
                members: cluster.peer_map()?,
            },
            bootstrap: true,
            join: None,
        }
    };
    if start.join.is_none() {
        let others: Vec<String> = start
            .record
            .members
            .iter()
            .filter(|(id, _)| **id != node_id)
            .map(|(_, a)| a.clone())
            .collect();
        if let Some(newer) = members::fetch_newest(&others, tls, Duration::from_secs(1)).await {
            if newer.epoch > start.record.epoch && newer.partitions == start.record.partitions {
                info!(
                    epoch = newer.epoch,
                    "a member reports a newer membership record; starting from it"
                );
                start.record = newer;
                start.bootstrap = false;
            }
        }
    }
    Ok(start)
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
            LeaderWork::Shared { origin, work } => {
                tokio::spawn(carry_out(work, origin, client.transport()));
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

//! The cluster client: the router ([`tiermq_common::router`]) over gRPC to the backend
//! nodes.
//!
//! A cluster frontend uses it exactly as the standalone broker uses its in-process
//! partitions: the MQTT routing is the router's, written once. What this module adds is the
//! transport, [`GrpcPartitions`]. It keeps, per backend node, one ordered operation stream
//! (`Ops`), one event stream (`Events`) and one route watch (`Routes`), and:
//! - sends each operation to the partition's leader, following `NotLeader` hints and trying
//!   the other replicas when a node is unreachable ([`pipe`]);
//! - feeds the router's route table from the leaders' route watches, under route leases
//!   ([`route_watch`]): a partition whose routes it does not trust right now gets every
//!   publish, so a stale table costs traffic, never a delivery;
//! - hands events to the connection that owns `(client id, epoch)` ([`events`]);
//! - follows membership changes (backends joining, leaving, moving address): see
//!   [`membership`].
//!
//! Backend nodes use the same client to carry out leader work (wills, shared subscriptions).

mod events;
mod membership;
mod metrics;
mod pipe;
mod route_watch;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use tiermq_common::hashing::partition_of;
use tiermq_common::log_limit::LogLimiter;
use tiermq_common::partition_api::{Command, Query, Reply};
use tiermq_common::route_lease;
use tiermq_common::router::routes::{RouteTable, RouteUpdate};
use tiermq_common::router::{EventReceiver, PartitionCaller, Router, RouterConfig, Transport};
use tiermq_common::session_api::{ServiceError, ServiceResult, SessionEvent, SessionRef};
use tiermq_common::{Message, ReasonCode};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::transport::Channel;
use tracing::{debug, info};

use crate::broker::broker_client::BrokerClient;
use crate::broker::{
    op, op_reply, ClusterInfo, ClusterRequest, EventsRequest, Op, OpReply, Qos0, RoutesAck,
    RoutesRequest,
};
use crate::tls::{self, GrpcTls};
use crate::API_VERSION;
use events::{event_stream, Sessions};
pub use metrics::ClientMetrics;
use metrics::{command_method, OutcomeLabel};
use pipe::{op_stream, OpSender, Pipe};
#[cfg(test)]
use route_watch::apply_route_update;
use route_watch::route_watch;

/// Lock order, where more than one is taken: a pipe → `nodes` → `routes` → `leaders` →
/// `replicas`. None is held across an await; the hot path takes one pipe's mutex and the
/// `nodes` read lock (to find the node's queue).
struct Inner {
    frontend_id: u64,
    /// Fixed for the cluster's life (membership changes move replicas, not keys).
    partitions: u32,
    /// The target replicas of each partition in the map of `membership`'s epoch: the
    /// candidates a pipe tries when it has no leader hint.
    replicas: RwLock<Vec<Vec<u64>>>,
    leaders: RwLock<Vec<u64>>,
    pipes: Vec<Mutex<Pipe>>,
    /// The backends this client has streams to: the members of the record it holds, plus
    /// removed ones still leading a partition (see [`membership`]).
    nodes: RwLock<BTreeMap<u64, membership::NodeLink>>,
    membership: membership::MapState,
    /// The router's route table, fed by the route watches.
    routes: RwLock<RouteTable>,
    sessions: Mutex<Sessions>,
    next_id: AtomicU64,
    metrics: ClientMetrics,
    /// Mutual TLS towards the backends (`cluster.tls_*`); `None`: plain gRPC.
    tls: Option<GrpcTls>,
}

/// Warnings about a lost backend stream: at most one per node per half minute.
static STREAM_WARNINGS: LogLimiter = LogLimiter::new(Duration::from_secs(30));

/// The gRPC [`Transport`] of the router: see the module doc. Clones share everything.
#[derive(Clone)]
pub struct GrpcPartitions {
    inner: Arc<Inner>,
}

/// A cluster frontend's session service: the router over [`GrpcPartitions`]. It is the
/// [`tiermq_common::session_api::SessionService`] through [`std::ops::Deref`] to its router
/// (pass [`ClusterClient::router`] where a service is wanted by value).
#[derive(Clone)]
pub struct ClusterClient {
    router: Router<GrpcPartitions>,
}

impl std::ops::Deref for ClusterClient {
    type Target = Router<GrpcPartitions>;
    fn deref(&self) -> &Self::Target {
        &self.router
    }
}

impl ClusterClient {
    /// Connects to the cluster through any of `seeds` (`host:port` of backend nodes), learns
    /// the members and the partition map, and opens the per-node streams. With `tls`, every
    /// stream runs over mutual TLS (see [`crate::tls`]). From then on the client follows the
    /// membership record (see [`membership`]); `seeds` stay a last resort to read it from.
    pub async fn connect(
        seeds: &[String],
        frontend_id: u64,
        wait: Duration,
        tls: Option<GrpcTls>,
    ) -> Result<Self, String> {
        Self::connect_with(seeds, frontend_id, wait, tls, membership::REFRESH_EVERY).await
    }

    /// [`Self::connect`] with the period of the membership re-read (tests shorten or stretch
    /// it to tell the periodic re-read from the triggered one).
    async fn connect_with(
        seeds: &[String],
        frontend_id: u64,
        wait: Duration,
        tls: Option<GrpcTls>,
        refresh_every: Duration,
    ) -> Result<Self, String> {
        let deadline = Instant::now() + wait;
        loop {
            let mut last = String::from("no seed given");
            for seed in seeds {
                match fetch_info(seed, tls.as_ref()).await {
                    Ok(info) => {
                        last.clear();
                        if info.partition_info.len() == info.partitions as usize {
                            let state = membership::MapState::new(seeds.to_vec(), refresh_every);
                            let grpc = GrpcPartitions::from_info(info, frontend_id, tls, state);
                            return Ok(ClusterClient {
                                router: Router::new(grpc, RouterConfig::default()),
                            });
                        }
                    }
                    Err(e) => last = format!("{seed}: {e}"),
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("no backend answered: {last}"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The same client with the router's settings of this node (`queue_qos0_offline`).
    pub fn configured(self, config: RouterConfig) -> ClusterClient {
        ClusterClient {
            router: Router::new(self.router.transport().clone(), config),
        }
    }

    /// The session service, by value.
    pub fn router(&self) -> &Router<GrpcPartitions> {
        &self.router
    }

    pub fn partitions(&self) -> u32 {
        self.router.partition_count()
    }

    /// The latency of this client's calls (see [`ClientMetrics`]).
    pub fn metrics(&self) -> &ClientMetrics {
        &self.router.transport().inner.metrics
    }

    /// Partitions whose leader this client does not currently know: no open route stream from
    /// a node that says it leads them (never heard of one, or its stream broke, or it said it
    /// no longer leads). Empty when every partition has a known, reachable leader — what a
    /// frontend's readiness check asks.
    pub fn partitions_without_leader(&self) -> Vec<u32> {
        let inner = &self.router.transport().inner;
        let routes = inner.routes.read().unwrap_or_else(|e| e.into_inner());
        routes.unknown_partitions()
    }
}

impl GrpcPartitions {
    fn from_info(
        info: ClusterInfo,
        frontend_id: u64,
        tls: Option<GrpcTls>,
        membership: membership::MapState,
    ) -> Self {
        let partitions = info.partitions;
        let mut leaders = vec![0; partitions as usize];
        for p in &info.partition_info {
            if let Some(slot) = leaders.get_mut(p.partition as usize) {
                *slot = p.leader;
            }
        }
        let inner = Arc::new(Inner {
            frontend_id,
            partitions,
            replicas: RwLock::new(vec![Vec::new(); partitions as usize]),
            pipes: leaders
                .iter()
                .map(|l| Mutex::new(Pipe::starting_at(*l)))
                .collect(),
            leaders: RwLock::new(leaders),
            nodes: RwLock::new(BTreeMap::new()),
            membership,
            routes: RwLock::new(RouteTable::leased(partitions)),
            sessions: Mutex::new(Sessions::default()),
            next_id: AtomicU64::new(1),
            metrics: ClientMetrics::default(),
            tls,
        });
        // The first record goes through the same path as every later one: its members are
        // "new", so they get their streams exactly like a backend that joins later.
        inner.apply_info(&info);
        tokio::spawn(membership::refresher(Arc::downgrade(&inner)));
        info!(
            partitions,
            epoch = info.epoch,
            nodes = inner.nodes.read().unwrap_or_else(|e| e.into_inner()).len(),
            "connected to the cluster"
        );
        GrpcPartitions { inner }
    }

    fn partition_of(&self, key: &str) -> u32 {
        partition_of(key, self.inner.partitions)
    }

    fn command(
        &self,
        partition: u32,
        command: &Command,
    ) -> impl Future<Output = ServiceResult<Reply>> + Send + 'static {
        let bytes = postcard::to_stdvec(command).unwrap_or_default();
        let latency = self.inner.metrics.method(command_method(command));
        let started = Instant::now();
        let wait = self.call_op(partition, op::Kind::Command(bytes));
        async move {
            let answer = wait.await;
            latency.observe(started.elapsed().as_secs_f64());
            let bytes = answer?;
            postcard::from_bytes(&bytes)
                .map_err(|e| ServiceError::Unavailable(format!("undecodable reply: {e}")))
        }
    }

    fn query<T: serde::de::DeserializeOwned>(
        &self,
        partition: u32,
        query: &Query,
    ) -> impl Future<Output = ServiceResult<T>> + Send + 'static {
        let bytes = postcard::to_stdvec(query).unwrap_or_default();
        let latency = self.inner.metrics.method(match query {
            Query::Retained { .. } => "read_retained",
            Query::Qos2Check { .. } => "read_qos2_check",
        });
        let started = Instant::now();
        let wait = self.call_op(partition, op::Kind::Query(bytes));
        async move {
            let answer = wait.await;
            latency.observe(started.elapsed().as_secs_f64());
            let bytes = answer?;
            postcard::from_bytes(&bytes)
                .map_err(|e| ServiceError::Unavailable(format!("undecodable answer: {e}")))
        }
    }
}

impl PartitionCaller for GrpcPartitions {
    fn partition_count(&self) -> u32 {
        self.inner.partitions
    }

    fn call_partition(
        &self,
        partition: u32,
        command: Command,
    ) -> impl Future<Output = ServiceResult<Reply>> + Send + 'static {
        self.command(partition, &command)
    }
}

impl GrpcPartitions {
    fn send_qos0(&self, partition: u32, message: &Message, publisher: &str) {
        let bytes = postcard::to_stdvec(message).unwrap_or_default();
        self.cast_op(
            partition,
            op::Kind::Qos0(Qos0 {
                message: bytes,
                publisher: publisher.to_string(),
            }),
        );
    }
}

impl Transport for GrpcPartitions {
    fn routes(&self) -> &RwLock<RouteTable> {
        &self.inner.routes
    }

    fn cast(&self, partition: u32, command: Command) {
        // Through the retrying pipe: an ack must reach the session's *current* leader (a lost
        // one stalls the in-flight window). Nobody waits for the answer.
        drop(self.call_op(
            partition,
            op::Kind::Command(postcard::to_stdvec(&command).unwrap_or_default()),
        ));
    }

    fn publish_qos0(&self, partition: u32, message: &Arc<Message>, publisher: &Arc<str>) {
        self.send_qos0(partition, message, publisher);
    }

    fn retained(
        &self,
        partition: u32,
        filter: String,
    ) -> impl Future<Output = ServiceResult<Vec<Arc<Message>>>> + Send + 'static {
        self.query(partition, &Query::Retained { filter })
    }

    fn connect(
        &self,
        partition: u32,
        mut command: Command,
    ) -> impl Future<Output = ServiceResult<(Reply, EventReceiver)>> + Send + 'static {
        if let Command::Connect {
            frontend_id,
            connection,
            ..
        } = &mut command
        {
            *frontend_id = self.inner.frontend_id;
            // Unique in this client; the pipe re-sends the same bytes on a retry.
            *connection = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        }
        let client_id = match &command {
            Command::Connect { client_id, .. } => client_id.clone(),
            _ => Arc::from(""),
        };
        let wait = self.command(partition, &command);
        let this = self.clone();
        async move {
            let reply = wait.await?;
            let (tx, events) = mpsc::unbounded_channel();
            if let Reply::Connected { epoch, .. } = &reply {
                this.register(&client_id, *epoch, tx);
            }
            Ok((reply, events))
        }
    }

    fn disconnected(&self, session: &SessionRef) {
        self.forget(session);
    }
}

async fn channel_to(addr: &str, tls: Option<&GrpcTls>) -> Result<Channel, tonic::transport::Error> {
    tls::endpoint(addr, tls)?
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect()
        .await
}

async fn fetch_info(addr: &str, tls: Option<&GrpcTls>) -> Result<ClusterInfo, String> {
    let channel = channel_to(addr, tls).await.map_err(|e| e.to_string())?;
    let mut client = BrokerClient::new(channel);
    client
        .cluster(ClusterRequest {
            version: API_VERSION,
            members_only: false,
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|e| e.message().to_string())
}

//! The frontend-facing gRPC service of a backend node (`tiermq.broker.v1.Broker`).
//!
//! - `Ops`: a frontend's ordered stream of partition operations. Each is handed to the Raft
//!   driver the moment it arrives (so the log keeps the frontend's order); replies go back as
//!   each command is applied — committed by a quorum — in whatever order that happens.
//! - `Events`: deliveries and disconnects for the sessions a frontend holds, from partitions
//!   this node leads. Opening it replays what is in flight (after a failover the new leader
//!   cannot know what reached the client; MQTT allows the DUP re-send).
//! - `Routes`: which filters have subscribers, per partition this node leads.
//! - `Cluster`: members, the partition map and this node's view of every partition.
//! - `ChangeMembers`: join / remove / evict, served by the metadata group's leader
//!   (`crate::members`).

use std::pin::Pin;
use std::sync::Arc;

use futures::stream::FuturesUnordered;
use futures::{Stream, StreamExt};
use tiermq_common::partition_api::{Command, Query};
use tiermq_common::Message;
use tiermq_proto::broker::broker_server::{Broker, BrokerServer};
use tiermq_proto::broker::{
    op, op_reply, ChangeMembersReply, ChangeMembersRequest, ClusterInfo, ClusterRequest,
    EventBatch, EventsRequest, Member, NotLeader, Op, OpReply, PartitionInfo, RouteUpdate,
    RoutesAck, RoutesAckReply, RoutesRequest, SessionEventMsg, TransferLeadershipReply,
    TransferLeadershipRequest,
};
use tiermq_proto::API_VERSION;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use crate::members::{ChangeError, MemberRecord, Members};
use crate::raft::node::{Origin, ProposeError, RaftHandle};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The `Broker` service of one backend node.
pub struct BrokerService {
    handle: RaftHandle,
    members: Arc<Members>,
}

impl BrokerService {
    pub fn new(handle: RaftHandle, members: Arc<Members>) -> BrokerServer<BrokerService> {
        BrokerServer::new(BrokerService { handle, members })
            .max_decoding_message_size(64 * 1024 * 1024)
    }
}

fn member_list(record: &MemberRecord) -> Vec<Member> {
    record
        .members
        .iter()
        .map(|(id, addr)| Member {
            id: *id,
            addr: addr.clone(),
        })
        .collect()
}

fn check_version(v: u32) -> Result<(), Status> {
    if v == API_VERSION {
        Ok(())
    } else {
        Err(Status::failed_precondition(format!(
            "broker API version {v} not supported (this node speaks {API_VERSION})"
        )))
    }
}

fn error_reply(id: u64, e: ProposeError) -> OpReply {
    let result = match e {
        ProposeError::NotLeader { leader } => op_reply::Result::NotLeader(NotLeader {
            leader: leader.unwrap_or(0),
        }),
        ProposeError::UnknownPartition(_) => op_reply::Result::NotLeader(NotLeader { leader: 0 }),
        other => op_reply::Result::Error(other.to_string()),
    };
    OpReply {
        id,
        result: Some(result),
    }
}

fn receiver_stream<T: Send + 'static>(
    rx: mpsc::UnboundedReceiver<Result<T, Status>>,
) -> BoxStream<T> {
    Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

#[tonic::async_trait]
impl Broker for BrokerService {
    type OpsStream = BoxStream<OpReply>;
    type EventsStream = BoxStream<EventBatch>;
    type RoutesStream = BoxStream<RouteUpdate>;

    async fn ops(
        &self,
        request: Request<Streaming<Op>>,
    ) -> Result<Response<Self::OpsStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = self.handle.clone();
        // The metadata group (number P) is not a partition: no frontend op may reach it.
        let partitions = self.members.record().partitions;
        // A number for this stream, for the driver's fences (`raft::node::Origin`).
        static STREAMS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let stream = STREAMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::spawn(async move {
            /// Forgets the stream's fences however the task ends.
            struct Closed(RaftHandle, u64);
            impl Drop for Closed {
                fn drop(&mut self) {
                    self.0.stream_closed(self.1);
                }
            }
            let _closed = Closed(handle.clone(), stream);
            let mut waits = FuturesUnordered::new();
            let mut open = true;
            while open || !waits.is_empty() {
                tokio::select! {
                    op = inbound.message(), if open => match op {
                        Ok(Some(op)) => {
                            if let Err(status) = check_version(op.version) {
                                let _ = tx.send(Err(status));
                                return;
                            }
                            if op.partition >= partitions {
                                let _ = tx.send(Ok(OpReply {
                                    id: op.id,
                                    result: Some(op_reply::Result::Error(format!(
                                        "no partition {}",
                                        op.partition
                                    ))),
                                }));
                                continue;
                            }
                            if let Some(wait) = submit(&handle, op, stream) {
                                waits.push(wait);
                            }
                        }
                        Ok(None) | Err(_) => open = false,
                    },
                    Some(reply) = waits.next(), if !waits.is_empty() => {
                        if let Some(reply) = reply {
                            if tx.send(Ok(reply)).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        Ok(Response::new(receiver_stream(rx)))
    }

    async fn events(
        &self,
        request: Request<EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let req = request.into_inner();
        check_version(req.version)?;
        debug!(frontend = req.frontend_id, "event stream opened");
        let mut events = self.handle.attach_frontend(req.frontend_id);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                // Watch the frontend's side too: a frontend that went away while no event was
                // due must still end its registration, or its lease never expires.
                let first = tokio::select! {
                    e = events.recv() => match e {
                        Some(e) => e,
                        None => return,
                    },
                    _ = tx.closed() => return,
                };
                let mut batch = vec![first];
                while batch.len() < 512 {
                    match events.try_recv() {
                        Ok(e) => batch.push(e),
                        Err(_) => break,
                    }
                }
                let msg = EventBatch {
                    events: batch
                        .into_iter()
                        .map(|e| SessionEventMsg::new(&e.client_id, e.epoch, &e.event))
                        .collect(),
                };
                if tx.send(Ok(msg)).is_err() {
                    return; // the frontend went away; dropping `events` ends its registration
                }
            }
        });
        Ok(Response::new(receiver_stream(rx)))
    }

    async fn routes(
        &self,
        request: Request<RoutesRequest>,
    ) -> Result<Response<Self::RoutesStream>, Status> {
        let req = request.into_inner();
        check_version(req.version)?;
        let mut changes = self.handle.watch_routes(req.watcher_id);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(c) = changes.recv().await {
                let update = RouteUpdate {
                    partition: c.partition,
                    leader: c.leader,
                    reset: c.reset,
                    added: c.added,
                    removed: c.removed,
                    seq: c.seq,
                    term: c.term,
                };
                if tx.send(Ok(update)).is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(receiver_stream(rx)))
    }

    async fn ack_routes(
        &self,
        request: Request<RoutesAck>,
    ) -> Result<Response<RoutesAckReply>, Status> {
        let ack = request.into_inner();
        check_version(ack.version)?;
        let granted = self.handle.hub().ack_routes(ack.watcher_id, ack.seq);
        Ok(Response::new(RoutesAckReply { granted }))
    }

    async fn transfer_leadership(
        &self,
        request: Request<TransferLeadershipRequest>,
    ) -> Result<Response<TransferLeadershipReply>, Status> {
        let req = request.into_inner();
        check_version(req.version)?;
        let timeout = match req.timeout_ms {
            0 => std::time::Duration::from_secs(10),
            ms => std::time::Duration::from_millis(u64::from(ms)),
        };
        let started = std::time::Instant::now();
        let still_leading = self.handle.transfer_leadership(timeout).await;
        tracing::info!(
            still_leading = still_leading.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "leadership transferred away"
        );
        Ok(Response::new(TransferLeadershipReply {
            still_leading,
            elapsed_ms: started.elapsed().as_millis() as u64,
        }))
    }

    async fn cluster(
        &self,
        request: Request<ClusterRequest>,
    ) -> Result<Response<ClusterInfo>, Status> {
        let request = request.into_inner();
        check_version(request.version)?;
        let (record, map) = (self.members.record(), self.members.map());
        let mut partition_info = Vec::new();
        let mut metadata_group = None;
        if !request.members_only {
            for p in 0..map.groups() {
                let status = self.handle.status(p).await;
                let info = PartitionInfo {
                    partition: p,
                    local_replica: status.is_some(),
                    leader: status.as_ref().and_then(|s| s.leader).unwrap_or(0),
                    term: status.as_ref().map_or(0, |s| s.term),
                    commit: status.as_ref().map_or(0, |s| s.commit),
                    applied: status.as_ref().map_or(0, |s| s.applied),
                    voters: status.as_ref().map_or(Vec::new(), |s| s.voters.clone()),
                    learners: status.as_ref().map_or(Vec::new(), |s| s.learners.clone()),
                    replicas: map.replicas_of(p).to_vec(),
                };
                if p < map.partitions {
                    partition_info.push(info);
                } else {
                    metadata_group = Some(info);
                }
            }
        }
        Ok(Response::new(ClusterInfo {
            epoch: record.epoch,
            partitions: record.partitions,
            replication: record.replication as u32,
            node_id: self.handle.node_id(),
            frontends: self
                .handle
                .hub()
                .connected_frontends()
                .into_iter()
                // Not the backends' own clients (wills, shared subscription steps).
                .filter(|f| !tiermq_common::session_api::is_internal_frontend(*f))
                .collect(),
            members: member_list(&record),
            partition_info,
            metadata_group,
        }))
    }

    async fn change_members(
        &self,
        request: Request<ChangeMembersRequest>,
    ) -> Result<Response<ChangeMembersReply>, Status> {
        let req = request.into_inner();
        check_version(req.version)?;
        let add = req.add.into_iter().map(|m| (m.id, m.addr)).collect();
        let outcome = self.members.change(add, req.remove).await;
        let record = self.members.record();
        let mut reply = ChangeMembersReply {
            applied: false,
            epoch: record.epoch,
            members: member_list(&record),
            leader: 0,
            leader_addr: String::new(),
            error: String::new(),
            partitions: record.partitions,
            replication: record.replication as u32,
        };
        match outcome {
            Ok(done) => {
                reply.applied = true;
                reply.epoch = done.epoch;
                reply.members = member_list(&done);
            }
            Err(ChangeError::NotLeader(leader)) => {
                let leader = leader.unwrap_or(0);
                reply.leader = leader;
                reply.leader_addr = record.members.get(&leader).cloned().unwrap_or_default();
            }
            Err(ChangeError::Invalid(e)) => reply.error = e,
            Err(ChangeError::Failed(e)) => return Err(Status::unavailable(e)),
        }
        Ok(Response::new(reply))
    }
}

type ReplyFuture = Pin<Box<dyn std::future::Future<Output = Option<OpReply>> + Send>>;

/// Hands one operation to the driver now; returns the wait for its reply, if one is wanted.
fn submit(handle: &RaftHandle, op: Op, stream: u64) -> Option<ReplyFuture> {
    let id = op.id;
    let partition = op.partition;
    let origin = (op.generation != 0).then_some(Origin {
        stream,
        generation: op.generation,
    });
    let bad = |what: &str| -> Option<ReplyFuture> {
        let reply = OpReply {
            id,
            result: Some(op_reply::Result::Error(format!("undecodable {what}"))),
        };
        (id != 0).then(|| Box::pin(async move { Some(reply) }) as ReplyFuture)
    };
    match op.kind? {
        op::Kind::Command(bytes) => {
            let Ok(command) = postcard::from_bytes::<Command>(&bytes) else {
                return bad("command");
            };
            // A shared group's join adds its filter to the group partition's routes.
            let is_subscribe = matches!(
                command,
                Command::Subscribe { .. } | Command::SharedJoin { .. }
            );
            let wait = handle.submit_from(partition, command, origin);
            let hub = handle.hub().clone();
            Some(Box::pin(async move {
                let r = wait.await;
                if is_subscribe && r.is_ok() {
                    // Read your subscription across frontends: answer only once every
                    // route watcher has the new filter or no longer trusts its table without
                    // it (bounded by the route lease: common/src/route_lease.rs).
                    hub.wait_routes_acked(hub.route_seq()).await;
                    hub.wait_takeover_settled(partition).await;
                }
                (id != 0).then(|| match r {
                    Ok(reply) => OpReply {
                        id,
                        result: Some(op_reply::Result::Reply(
                            postcard::to_stdvec(&reply).unwrap_or_default(),
                        )),
                    },
                    Err(e) => error_reply(id, e),
                })
            }))
        }
        op::Kind::Qos0(q) => {
            let Ok(message) = postcard::from_bytes::<Message>(&q.message) else {
                return bad("message");
            };
            let publisher = (!q.publisher.is_empty()).then(|| Arc::from(q.publisher.as_str()));
            handle.qos0(partition, Arc::new(message), publisher);
            None
        }
        op::Kind::Query(bytes) => {
            let Ok(query) = postcard::from_bytes::<Query>(&bytes) else {
                return bad("query");
            };
            let wait = handle.query(partition, query);
            Some(Box::pin(async move {
                Some(match wait.await {
                    Ok(answer) => OpReply {
                        id,
                        result: Some(op_reply::Result::Reply(answer)),
                    },
                    Err(e) => error_reply(id, e),
                })
            }))
        }
    }
}

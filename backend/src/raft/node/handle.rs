//! The handle through which everything talks to a node's driver: messages into its mailbox
//! ([`NodeMsg`]), answers through oneshot channels.

use super::*;

pub(super) type EventSender = mpsc::UnboundedSender<SessionEvent>;

pub(super) enum NodeMsg {
    Propose {
        partition: u32,
        command: Command,
        reply: oneshot::Sender<Result<Reply, ProposeError>>,
        events: Option<EventSender>,
        origin: Option<Origin>,
    },
    /// A frontend's ordered stream ended: its fences go.
    StreamClosed { stream: u64 },
    Peer {
        partition: u32,
        message: PeerMessage,
    },
    Status {
        partition: u32,
        reply: oneshot::Sender<Option<GroupStatus>>,
    },
    /// Serialized image of a partition's state (tests compare replicas with it).
    Image {
        partition: u32,
        reply: oneshot::Sender<Option<(u64, Vec<u8>)>>,
    },
    Stop {
        done: oneshot::Sender<()>,
        /// False: stop as a crash would (no last checkpoint, no flush).
        checkpoint: bool,
    },
    /// Hand the leadership of every group this node leads to its most caught-up follower.
    /// Answers with the partitions still led here (transfers take a round trip or two).
    TransferLeadership { reply: oneshot::Sender<Vec<u32>> },
    Qos0 {
        partition: u32,
        message: Arc<tiermq_common::Message>,
        publisher: Option<Arc<str>>,
    },
    /// A leader read, answered once a ReadIndex round confirmed the leadership (`reads.rs`).
    Query {
        partition: u32,
        query: Query,
        reply: reads::QueryReply,
    },
    /// A frontend opened its event stream to this node: replay in-flight messages.
    FrontendAttached { frontend_id: u64 },
    /// A route watcher joined: send it a snapshot of every partition this node leads.
    WatchRoutes {
        watcher_id: u64,
        tx: mpsc::UnboundedSender<RouteChange>,
    },
    /// Membership changes (`membership.rs`): a new target map.
    Membership(membership::Request),
}

/// Counters of a node's driver (for metrics and benchmarks).
#[derive(Debug, Default)]
pub struct RaftStats {
    /// Commands proposed by this node while leading.
    pub commands: AtomicU64,
    /// Raft entries (command batches) proposed by this node.
    pub entries: AtomicU64,
    /// Flushes (fsyncs) of the node's database.
    pub flushes: AtomicU64,
    /// Commit and flush latency, proposals per partition.
    pub timings: crate::raft::timings::RaftTimings,
}

/// The handle through which everything talks to a node's driver.
#[derive(Clone)]
pub struct RaftHandle {
    pub(super) node_id: NodeId,
    pub(super) disk_faults: Arc<DiskFaults>,
    pub(super) tx: mpsc::UnboundedSender<NodeMsg>,
    pub(super) stats: Arc<RaftStats>,
    pub(super) hub: Arc<ClusterHub>,
    pub(super) driver: tokio::task::AbortHandle,
}

impl RaftHandle {
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    pub fn stats(&self) -> &RaftStats {
        &self.stats
    }

    /// Proposes `command` to `partition` and waits until it is applied on this node (which
    /// must lead the partition).
    pub async fn propose(&self, partition: u32, command: Command) -> Result<Reply, ProposeError> {
        self.propose_with_events(partition, command, None).await
    }

    /// Like [`RaftHandle::propose`]; for `Connect`, `events` receives the session's events
    /// while this node leads the partition.
    pub async fn propose_with_events(
        &self,
        partition: u32,
        command: Command,
        events: Option<EventSender>,
    ) -> Result<Reply, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(NodeMsg::Propose {
                partition,
                command,
                reply,
                events,
                origin: None,
            })
            .map_err(|_| ProposeError::Stopped)?;
        rx.await.map_err(|_| ProposeError::Stopped)?
    }

    /// Sends a proposal to the driver now; the returned future waits for it to be applied.
    /// Calls made one after another reach the log in that order, however their futures are
    /// polled.
    pub fn submit(
        &self,
        partition: u32,
        command: Command,
    ) -> impl std::future::Future<Output = Result<Reply, ProposeError>> + Send + 'static {
        self.submit_from(partition, command, None)
    }

    /// [`RaftHandle::submit`] for an operation of a frontend's ordered stream: once this node
    /// refuses one of `origin`'s operations, it refuses the later ones of the same stream and
    /// generation too ([`Origin`]).
    pub fn submit_from(
        &self,
        partition: u32,
        command: Command,
        origin: Option<Origin>,
    ) -> impl std::future::Future<Output = Result<Reply, ProposeError>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let sent = self
            .tx
            .send(NodeMsg::Propose {
                partition,
                command,
                reply,
                events: None,
                origin,
            })
            .is_ok();
        async move {
            if !sent {
                return Err(ProposeError::Stopped);
            }
            rx.await.map_err(|_| ProposeError::Stopped)?
        }
    }

    /// Forgets the fences of a frontend stream that ended ([`Origin`]).
    pub fn stream_closed(&self, stream: u64) {
        let _ = self.tx.send(NodeMsg::StreamClosed { stream });
    }

    /// Delivers a QoS0 message to the partition's online subscribers, if this node leads it.
    pub fn qos0(
        &self,
        partition: u32,
        message: Arc<tiermq_common::Message>,
        publisher: Option<Arc<str>>,
    ) {
        let _ = self.tx.send(NodeMsg::Qos0 {
            partition,
            message,
            publisher,
        });
    }

    /// A linearizable leader read (ReadIndex: answered once this node has confirmed with a
    /// quorum that it still leads, `NotLeader` if it does not); the answer is postcard-encoded
    /// (see [`Query`]).
    pub fn query(
        &self,
        partition: u32,
        query: Query,
    ) -> impl std::future::Future<Output = Result<Vec<u8>, ProposeError>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let sent = self
            .tx
            .send(NodeMsg::Query {
                partition,
                query,
                reply,
            })
            .is_ok();
        async move {
            if !sent {
                return Err(ProposeError::Stopped);
            }
            rx.await.map_err(|_| ProposeError::Stopped)?
        }
    }

    /// Opens the event stream of `frontend_id` (replacing an older one) and replays the
    /// in-flight messages of its sessions in partitions this node leads.
    pub fn attach_frontend(&self, frontend_id: u64) -> mpsc::UnboundedReceiver<FrontendEvent> {
        let rx = self.hub.register_frontend(frontend_id);
        let _ = self.tx.send(NodeMsg::FrontendAttached { frontend_id });
        rx
    }

    /// Route changes of the partitions this node leads, starting with a snapshot of each.
    pub fn watch_routes(&self, watcher_id: u64) -> mpsc::UnboundedReceiver<RouteChange> {
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = self.tx.send(NodeMsg::WatchRoutes { watcher_id, tx });
        rx
    }

    pub fn hub(&self) -> &Arc<ClusterHub> {
        &self.hub
    }

    /// The switch that makes this node's disk fail (tests of what it may acknowledge then).
    pub fn disk_faults(&self) -> &Arc<DiskFaults> {
        &self.disk_faults
    }

    /// Resolves once the driver has stopped (asked to, or because it could not persist).
    pub async fn stopped(&self) {
        self.tx.closed().await;
    }

    /// Hands a Raft message from a peer to its group. False once the driver has stopped.
    pub fn step(&self, partition: u32, message: RaftMessage) -> bool {
        self.deliver(partition, PeerMessage::Raft(message))
    }

    /// Hands a message from a peer's driver to this one. False once the driver has stopped.
    pub fn deliver(&self, partition: u32, message: PeerMessage) -> bool {
        self.tx.send(NodeMsg::Peer { partition, message }).is_ok()
    }

    pub async fn status(&self, partition: u32) -> Option<GroupStatus> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(NodeMsg::Status { partition, reply }).ok()?;
        rx.await.ok().flatten()
    }

    /// Moves the leadership of every partition led here to other replicas, so that this node
    /// can stop without clients waiting for an election timeout. Re-asks every 200 ms (a
    /// transfer can fail, or an election can hand a partition back) until no partition is
    /// led here or `timeout` passes. Returns the partitions still led here.
    pub async fn transfer_leadership(&self, timeout: std::time::Duration) -> Vec<u32> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (reply, rx) = oneshot::channel();
            if self.tx.send(NodeMsg::TransferLeadership { reply }).is_err() {
                return Vec::new();
            }
            let led = rx.await.unwrap_or_default();
            if led.is_empty() || tokio::time::Instant::now() >= deadline {
                return led;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// The partition's state, serialized deterministically (for comparing replicas).
    pub async fn image(&self, partition: u32) -> Option<Vec<u8>> {
        self.applied_image(partition).await.map(|(_, image)| image)
    }

    /// Like [`RaftHandle::image`], with the Raft index the image is as of: replicas that
    /// applied the same index must have equal images.
    pub async fn applied_image(&self, partition: u32) -> Option<(u64, Vec<u8>)> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(NodeMsg::Image { partition, reply }).ok()?;
        rx.await.ok().flatten()
    }

    /// Ends the driver task at once, between two rounds, without waiting (unlike
    /// [`RaftHandle::crash`], which waits for the mailbox): pending proposals are never
    /// answered, what each round flushed stays in sled. For the deterministic simulation,
    /// which kills a node at an instant its seed chose.
    pub fn abort(&self) {
        self.driver.abort();
    }

    /// Stops the driver after a last checkpoint; the sled database is released when this
    /// returns.
    pub async fn stop(&self) {
        self.stop_driver(true).await;
    }

    /// Stops the driver as `kill -9` would stop the process: no last checkpoint and no flush,
    /// so a restart finds only what earlier rounds made durable (tests of crash recovery).
    pub async fn crash(&self) {
        self.stop_driver(false).await;
    }

    async fn stop_driver(&self, checkpoint: bool) {
        let (done, rx) = oneshot::channel();
        if self.tx.send(NodeMsg::Stop { done, checkpoint }).is_ok() {
            let _ = rx.await;
        }
    }
}

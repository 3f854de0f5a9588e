//! The standalone broker's [`Transport`]: the ordered channels to the in-process partition
//! tasks ([`super::task`]).

use std::future::Future;
use std::sync::{Arc, RwLock};

use tiermq_common::router::routes::RouteTable;
use tiermq_common::router::{EventReceiver, PartitionCaller, Transport};
use tiermq_common::session_api::{ServiceError, ServiceResult, SessionEvent, SessionRef};
use tiermq_common::Message;
use tokio::sync::{mpsc, oneshot};

use crate::partition::command::{Command, Reply};
use crate::partition::PartitionLoad;

pub(super) type EventSender = mpsc::UnboundedSender<SessionEvent>;

// Requests are moved through the channel once; boxing the large `Command` variant would cost
// an allocation per request for nothing.
#[allow(clippy::large_enum_variant)]
pub(super) enum Request {
    Command {
        command: Command,
        reply: Option<oneshot::Sender<Reply>>,
        /// For `Connect`: where the new connection wants its events.
        events: Option<EventSender>,
    },
    Qos0 {
        message: Arc<Message>,
        publisher: Arc<str>,
    },
    Retained {
        filter: String,
        reply: oneshot::Sender<Vec<Arc<Message>>>,
    },
    /// Read-only: the partition's session totals (metrics).
    Load {
        reply: oneshot::Sender<PartitionLoad>,
    },
    Shutdown {
        done: oneshot::Sender<()>,
    },
}

/// Counters a partition task keeps for operators and benchmarks.
#[derive(Debug, Default)]
pub struct Stats {
    pub flushes: std::sync::atomic::AtomicU64,
    pub entries: std::sync::atomic::AtomicU64,
    /// Time to append a durable batch to the log and flush it (write + fsync).
    pub flush_seconds: tiermq_common::latency::LatencyHistogram,
}

/// What the partition tasks and the router share.
pub(super) struct Shared {
    pub(super) routes: RwLock<RouteTable>,
    pub(super) stats: Stats,
    /// Test hook: how many of the next durable batches fail as a failing disk would.
    pub(super) fail_durable_batches: std::sync::atomic::AtomicU32,
}

/// The channels to the partition tasks; clones share them.
#[derive(Clone)]
pub struct LocalPartitions {
    pub(super) senders: Arc<Vec<mpsc::UnboundedSender<Request>>>,
    pub(super) shared: Arc<Shared>,
}

impl LocalPartitions {
    pub(super) fn send(&self, partition: u32, request: Request) -> bool {
        self.senders
            .get(partition as usize)
            .is_some_and(|tx| tx.send(request).is_ok())
    }

    /// Asks every partition the same read-only question and gathers the answers.
    pub(super) async fn ask_all<A: Default>(
        &self,
        request: impl Fn(oneshot::Sender<A>) -> Request,
    ) -> Vec<A> {
        let mut answers = Vec::new();
        for p in 0..self.senders.len() as u32 {
            let (tx, rx) = oneshot::channel();
            if self.send(p, request(tx)) {
                answers.push(rx.await.unwrap_or_default());
            }
        }
        answers
    }
}

impl PartitionCaller for LocalPartitions {
    fn partition_count(&self) -> u32 {
        self.senders.len() as u32
    }

    fn call_partition(
        &self,
        partition: u32,
        command: Command,
    ) -> impl Future<Output = ServiceResult<Reply>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let sent = self.send(
            partition,
            Request::Command {
                command,
                reply: Some(tx),
                events: None,
            },
        );
        async move {
            if !sent {
                return Err(ServiceError::ShuttingDown);
            }
            rx.await.map_err(|_| ServiceError::ShuttingDown)
        }
    }
}

impl Transport for LocalPartitions {
    fn routes(&self) -> &RwLock<RouteTable> {
        &self.shared.routes
    }

    fn cast(&self, partition: u32, command: Command) {
        self.send(
            partition,
            Request::Command {
                command,
                reply: None,
                events: None,
            },
        );
    }

    fn publish_qos0(&self, partition: u32, message: &Arc<Message>, publisher: &Arc<str>) {
        self.send(
            partition,
            Request::Qos0 {
                message: message.clone(),
                publisher: publisher.clone(),
            },
        );
    }

    fn retained(
        &self,
        partition: u32,
        filter: String,
    ) -> impl Future<Output = ServiceResult<Vec<Arc<Message>>>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let sent = self.send(partition, Request::Retained { filter, reply });
        async move {
            if !sent {
                return Err(ServiceError::ShuttingDown);
            }
            rx.await.map_err(|_| ServiceError::ShuttingDown)
        }
    }

    fn connect(
        &self,
        partition: u32,
        command: Command,
    ) -> impl Future<Output = ServiceResult<(Reply, EventReceiver)>> + Send + 'static {
        // In process the events go with the request: the partition dispatches the CONNECT's
        // own effects (a session's queued messages) to them before it answers. A CONNECT is
        // never re-sent here, so `connection` stays 0.
        let (events_tx, events) = mpsc::unbounded_channel();
        let (tx, rx) = oneshot::channel();
        let sent = self.send(
            partition,
            Request::Command {
                command,
                reply: Some(tx),
                events: Some(events_tx),
            },
        );
        async move {
            if !sent {
                return Err(ServiceError::ShuttingDown);
            }
            let reply = rx.await.map_err(|_| ServiceError::ShuttingDown)?;
            Ok((reply, events))
        }
    }

    fn disconnected(&self, _session: &SessionRef) {
        // The partition's own `Connections` drop the sender when it applies the DISCONNECT.
    }
}

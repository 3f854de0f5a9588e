//! What the router needs from the partitions: a way to reach them. Two implementations
//! exist — the in-process partition tasks of `tiermq standalone`
//! (`tiermq_backend::local`) and the gRPC pipes to the partitions' leaders of a cluster
//! frontend (`tiermq_proto::client`) — and everything above this trait is written once.
//!
//! Every method *submits at call time*: operations on one partition reach it in the order
//! of the calls (the ordered channel of a partition task; the ordered pipe of a cluster
//! partition, across leader changes). The router's ordering arguments rest on that.

use std::future::Future;
use std::sync::{Arc, RwLock};

use tokio::sync::mpsc;

use super::routes::RouteTable;
use crate::partition_api::{Command, Reply};
use crate::session_api::{ServiceResult, SessionEvent, SessionRef};
use crate::Message;

/// Something that can submit a command to a partition and wait for its reply: all that the
/// cross-partition steps of shared subscriptions and wills need
/// ([`crate::shared_dispatch`]).
pub trait PartitionCaller: Clone + Send + Sync + 'static {
    fn partition_count(&self) -> u32;

    /// Submits `command` to `partition` now (in call order per partition) and returns the
    /// wait for its reply.
    fn call_partition(
        &self,
        partition: u32,
        command: Command,
    ) -> impl Future<Output = ServiceResult<Reply>> + Send + 'static;
}

/// The events of one connection, as the partition of its session emits them.
pub type EventReceiver = mpsc::UnboundedReceiver<SessionEvent>;

/// A way to the partitions for [`super::Router`]; see the module doc.
pub trait Transport: PartitionCaller {
    /// The route table this transport keeps up to date.
    fn routes(&self) -> &RwLock<RouteTable>;

    /// Submits a command nobody waits for (PUBACK, PUBCOMP), in order with the others. It
    /// still reaches the partition's current leader: a lost ack stalls an in-flight window.
    fn cast(&self, partition: u32, command: Command);

    /// Hands a QoS0 message to `partition` for its subscribers, unlogged and unanswered, in
    /// order with the partition's other operations (`publisher` empty: no publisher).
    fn publish_qos0(&self, partition: u32, message: &Arc<Message>, publisher: &Arc<str>);

    /// Reads the retained messages of `partition` that match `filter`.
    fn retained(
        &self,
        partition: u32,
        filter: String,
    ) -> impl Future<Output = ServiceResult<Vec<Arc<Message>>>> + Send + 'static;

    /// Submits a `Command::Connect` and hands back the reply and the new connection's events.
    /// The transport stamps the fields it owns (`frontend_id`, `connection`).
    fn connect(
        &self,
        partition: u32,
        command: Command,
    ) -> impl Future<Output = ServiceResult<(Reply, EventReceiver)>> + Send + 'static;

    /// The connection `session` is gone from this tier: stop handing it events.
    fn disconnected(&self, session: &SessionRef);
}

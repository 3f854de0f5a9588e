//! What a backend incarnation's partitions hand over when they lead (`LeaderWork`): fired
//! wills and shared-subscription steps. The simulation carries them out with the production
//! code, `common::shared_dispatch::carry_out`, over a [`PartitionCaller`] that reaches the
//! partitions through the simulated network from the node itself — as a production backend
//! does through a cluster client of its own (`src/backend.rs::carry_out_leader_work`). So a
//! will is published to every partition under its idempotency key, confirmed to its origin
//! with `WillPublished`, and re-done by the next leader or restart while unconfirmed, all by
//! the code that runs in production; the simulation only records what fired.

use std::future::Future;
use std::sync::Arc;

use tiermq_backend::placement::NodeId;
use tiermq_backend::raft::node::LeaderWork;
use tiermq_common::hashing::partition_of;
use tiermq_common::partition_api::{Command, Reply, SharedWork};
use tiermq_common::session_api::{ServiceError, ServiceResult};
use tiermq_common::shared_dispatch::{carry_out, PartitionCaller};
use tokio::sync::mpsc;

use crate::history::WillId;
use crate::path::{CallError, PartitionPath};
use crate::plan::Planted;
use crate::world::{Endpoint, World};

/// One node incarnation's way to the partitions (dies with the incarnation).
#[derive(Clone)]
struct NodeCaller {
    path: Arc<PartitionPath>,
    partitions: u32,
    planted: Option<Planted>,
}

impl NodeCaller {
    /// `--plant will-twice`: the dispatch publishes a will without its idempotency key and
    /// never confirms it, so every leader change publishes every will again, and a publish
    /// retried after a lost answer is queued again. `--plant will-home-only`: a will goes to
    /// its session's partition only. `None`: the command is not sent (answered as done).
    fn planted(&self, partition: u32, command: Command) -> Option<Command> {
        if self.planted == Some(Planted::WillHomeOnly) {
            if let Command::Publish {
                inbound_qos2: Some(key),
                publisher: None,
                ..
            } = &command
            {
                let client = key.client_id.split('\u{0}').next().unwrap_or_default();
                if partition_of(client, self.partitions) != partition {
                    return None;
                }
            }
        }
        if self.planted != Some(Planted::WillTwice) {
            return Some(command);
        }
        match command {
            Command::WillPublished { .. } => None,
            Command::Publish {
                message,
                publisher: None,
                store_retained,
                inbound_qos2: Some(_),
            } => Some(Command::Publish {
                message,
                publisher: None,
                store_retained,
                inbound_qos2: None,
            }),
            other => Some(other),
        }
    }
}

impl PartitionCaller for NodeCaller {
    fn partition_count(&self) -> u32 {
        self.partitions
    }

    /// Submitted now: the call is a task of its own from this moment (tasks start in spawn
    /// order on the simulation's single thread), so a partition's steps keep their order.
    fn call_partition(
        &self,
        partition: u32,
        command: Command,
    ) -> impl Future<Output = ServiceResult<Reply>> + Send + 'static {
        let task = self.planted(partition, command).map(|command| {
            let path = self.path.clone();
            tokio::spawn(async move { path.call(partition, command).await })
        });
        async move {
            let Some(task) = task else {
                // The planted bug swallowed it: answered as if it had been done.
                return Ok(Reply::Published {
                    matched: false,
                    duplicate: false,
                    refused: false,
                    qos2_token: None,
                });
            };
            match task.await {
                Ok(Ok(reply)) => Ok(reply),
                // The incarnation died: its work ends with it (the next leader re-does it).
                Ok(Err(CallError::FrontendDown)) => Err(ServiceError::ShuttingDown),
                Ok(Err(e)) => Err(ServiceError::Unavailable(format!("{e:?}"))),
                Err(e) => Err(ServiceError::Unavailable(e.to_string())),
            }
        }
    }
}

/// Carries out the leader work of node `node`'s incarnation `incarnation` until it dies.
pub async fn run_leader_work(
    world: Arc<World>,
    node: NodeId,
    incarnation: u64,
    mut work: mpsc::UnboundedReceiver<LeaderWork>,
) {
    let alive = {
        let world = world.clone();
        Box::new(move || world.incarnation(node) == incarnation && world.is_up(node))
    };
    let caller = NodeCaller {
        path: Arc::new(PartitionPath::new(
            world.clone(),
            Endpoint::Node(node),
            alive,
        )),
        partitions: world.plan.partitions,
        planted: world.plan.planted,
    };
    while let Some(LeaderWork::Shared { origin, work }) = work.recv().await {
        if world.incarnation(node) != incarnation {
            return;
        }
        if let SharedWork::Will { seq, message, .. } = &work {
            let payload = String::from_utf8_lossy(&message.payload).to_string();
            world.trace(format!(
                "node {node}: partition {origin} hands over will {seq} ({payload} on {})",
                message.topic
            ));
            // The entry that fired it was applied by a leader: the firing is committed.
            if let Some(will) = WillId::parse(&payload) {
                world.history().will_fired(will, origin, *seq);
            }
        }
        tokio::spawn(carry_out(work, origin, &caller));
    }
}

//! The way one process reaches partition leaders over the simulated network, with the rules
//! of `ClusterClient`: operations to the partition's leader guess, following `NotLeader`
//! hints, trying the next replica after a timeout, 2 s attempts, a 15 s deadline.
//!
//! A frontend has one (`frontend.rs`); so has every backend incarnation's leader-work runner
//! (`leader_work.rs`), as a production backend carries out fired wills through a cluster
//! client of its own: one set of rules for both, so they cannot drift apart.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::Future;
use tiermq_backend::placement::NodeId;
use tiermq_backend::raft::node::{ProposeError, RaftHandle};
use tiermq_common::partition_api::{Command, Query, Reply};
use tokio::time::{sleep, timeout, Instant};

use crate::world::{Endpoint, World};

/// How long one attempt waits for its answer (as `ClusterClient`'s `ATTEMPT_TIMEOUT`).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an operation keeps trying before it fails (`OP_DEADLINE`).
const OP_DEADLINE: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// The calling process is down (its connections are gone).
    FrontendDown,
    /// No replica answered within the deadline.
    Deadline,
}

enum Attempt {
    Reply(Reply),
    NotLeader(Option<NodeId>),
    Unavailable,
}

type Pending = Pin<Box<dyn Future<Output = Result<Option<Reply>, ProposeError>> + Send>>;

/// Whether the calling process still runs (a crashed one sends nothing, hears nothing).
pub type Alive = Box<dyn Fn() -> bool + Send + Sync>;

pub struct PartitionPath {
    world: Arc<World>,
    endpoint: Endpoint,
    alive: Alive,
    /// Per partition: the node operations go to first.
    leader_guess: Mutex<Vec<NodeId>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PartitionPath {
    pub fn new(world: Arc<World>, endpoint: Endpoint, alive: Alive) -> PartitionPath {
        let map = world.map();
        let guesses = (0..world.plan.partitions)
            .map(|p| map.replicas_of(p)[0])
            .collect();
        PartitionPath {
            world,
            endpoint,
            alive,
            leader_guess: Mutex::new(guesses),
        }
    }

    /// A partition command, retried on other replicas until one leader applies it.
    pub async fn call(&self, partition: u32, command: Command) -> Result<Reply, CallError> {
        self.call_counting(partition, command).await.0
    }

    /// [`Self::call`], and how many times the command reached a node: more than once, it may
    /// have been applied more than once (an attempt whose answer was lost is re-sent, as the
    /// real client's pipe re-sends what failed).
    pub async fn call_counting(
        &self,
        partition: u32,
        command: Command,
    ) -> (Result<Reply, CallError>, u32) {
        self.with_retries(partition, |h| {
            let fut = h.submit(partition, command.clone());
            Box::pin(async move { fut.await.map(Some) })
        })
        .await
    }

    /// A leader read, retried like a command.
    pub async fn query(&self, partition: u32, query: Query) -> Result<Reply, CallError> {
        self.with_retries(partition, |h| {
            let fut = h.query(partition, query.clone());
            Box::pin(async move {
                fut.await
                    .map(|bytes| postcard::from_bytes::<Reply>(&bytes).ok())
            })
        })
        .await
        .0
    }

    async fn with_retries(
        &self,
        partition: u32,
        send: impl Fn(&RaftHandle) -> Pending,
    ) -> (Result<Reply, CallError>, u32) {
        let deadline = Instant::now() + OP_DEADLINE;
        let mut submitted = 0;
        loop {
            let replicas = self.world.map().replicas_of(partition).to_vec();
            if !(self.alive)() {
                return (Err(CallError::FrontendDown), submitted);
            }
            if Instant::now() >= deadline {
                return (Err(CallError::Deadline), submitted);
            }
            let node = lock(&self.leader_guess)[partition as usize];
            match self.attempt(node, &send, &mut submitted).await {
                Attempt::Reply(r) => return (Ok(r), submitted),
                Attempt::NotLeader(Some(hint)) if hint != node => {
                    lock(&self.leader_guess)[partition as usize] = hint;
                }
                Attempt::NotLeader(_) | Attempt::Unavailable => {
                    let pos = replicas.iter().position(|r| *r == node).unwrap_or(0);
                    lock(&self.leader_guess)[partition as usize] =
                        replicas[(pos + 1) % replicas.len()];
                    sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// One try at one node: request and answer each cross the network.
    async fn attempt(
        &self,
        node: NodeId,
        send: &impl Fn(&RaftHandle) -> Pending,
        submitted: &mut u32,
    ) -> Attempt {
        let world = &self.world;
        let link = (self.endpoint, Endpoint::Node(node));
        let started = Instant::now();
        let unreachable = || async move {
            // A cut-off or dead node never answers: the attempt times out.
            tokio::time::sleep_until(started + ATTEMPT_TIMEOUT).await;
            Attempt::Unavailable
        };
        if !world.link_ok(link.0, link.1) || world.lost() {
            return unreachable().await;
        }
        sleep(world.delay()).await;
        let Some(handle) = world.handle(node).filter(|_| world.link_ok(link.0, link.1)) else {
            return unreachable().await;
        };
        *submitted += 1;
        let answer = match timeout(ATTEMPT_TIMEOUT, send(&handle)).await {
            Err(_) => return Attempt::Unavailable,
            Ok(a) => a,
        };
        sleep(world.delay()).await;
        if !world.link_ok(link.0, link.1) || !(self.alive)() {
            return unreachable().await; // the answer is lost on the way back
        }
        match answer {
            Ok(Some(reply)) => Attempt::Reply(reply),
            Ok(None) => Attempt::Unavailable,
            Err(ProposeError::NotLeader { leader }) => Attempt::NotLeader(leader),
            Err(ProposeError::UnknownPartition(_)) => Attempt::NotLeader(None),
            Err(ProposeError::Dropped | ProposeError::Stopped) => Attempt::Unavailable,
        }
    }
}

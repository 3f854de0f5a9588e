//! The in-process runtime of `tiermq standalone`: each partition is one tokio task that owns
//! its state machine and its storage ([`task`]), reached through ordered channels
//! ([`LocalPartitions`], the router's transport). [`LocalBroker`] is the router over them
//! plus the partitions' life cycle (open, recover, shut down) and their read-only totals.

mod partitions;
mod task;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tiermq_common::router::routes::RouteTable;
use tiermq_common::router::{Router, RouterConfig};
use tokio::sync::mpsc;
use tracing::info;

use crate::effects::Connections;
use crate::partition::session::SessionLimits;
use crate::partition::PartitionLoad;
use crate::storage::{PartitionStore, StorageError};
pub use partitions::{LocalPartitions, Stats};
use partitions::{Request, Shared};

/// Settings of the in-process broker.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    pub partitions: u32,
    pub limits: SessionLimits,
    /// Checkpoint after this many applied entries...
    pub checkpoint_entries: u64,
    /// ...or after this much time with changes.
    pub checkpoint_interval: Duration,
    /// How often time advances in the state machines (wills, session expiry).
    pub tick_interval: Duration,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            partitions: 1,
            limits: SessionLimits::default(),
            checkpoint_entries: 20_000,
            checkpoint_interval: Duration::from_secs(30),
            tick_interval: Duration::from_millis(500),
        }
    }
}

/// The standalone broker: the router over the in-process partitions. It is the
/// [`tiermq_common::session_api::SessionService`] through [`std::ops::Deref`] to its router
/// (pass [`LocalBroker::router`] where a service is wanted by value).
#[derive(Clone)]
pub struct LocalBroker {
    router: Router<LocalPartitions>,
}

impl std::ops::Deref for LocalBroker {
    type Target = Router<LocalPartitions>;
    fn deref(&self) -> &Self::Target {
        &self.router
    }
}

impl LocalBroker {
    /// Opens (or creates) the data folder, recovers every partition and starts their tasks.
    pub fn open(dir: &Path, config: LocalConfig) -> Result<LocalBroker, StorageError> {
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(None)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        let mut recovered = Vec::new();
        let mut routes = RouteTable::in_process(config.partitions);
        for p in 0..config.partitions {
            let store = PartitionStore::open(&db, p)?;
            let r = store.recover(config.limits)?;
            let mut partition = r.partition;
            let replayed = r.tail.len();
            for (index, entry) in r.tail {
                // Effects of replayed entries were carried out before the crash (or are
                // superseded: connections are gone); only the state matters here.
                let _ = partition.apply(index, entry);
            }
            for filter in partition.filters() {
                routes.add(p, &filter);
            }
            info!(
                partition = p,
                sessions = partition.session_count(),
                retained = partition.retained_count(),
                replayed,
                "partition recovered"
            );
            recovered.push((partition, store));
        }
        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..config.partitions {
            let (tx, rx) = mpsc::unbounded_channel();
            senders.push(tx);
            receivers.push(rx);
        }
        let partitions = LocalPartitions {
            senders: Arc::new(senders),
            shared: Arc::new(Shared {
                routes: std::sync::RwLock::new(routes),
                stats: Stats::default(),
                fail_durable_batches: Default::default(),
            }),
        };
        for (p, ((partition, store), rx)) in recovered.into_iter().zip(receivers).enumerate() {
            let task = task::PartitionTask {
                id: p as u32,
                partition,
                store,
                rx,
                senders: Arc::downgrade(&partitions.senders),
                shared: Arc::downgrade(&partitions.shared),
                connections: Connections::default(),
                config: config.clone(),
                last_now: 0,
                since_checkpoint: 0,
                last_checkpoint: Instant::now(),
            };
            // Every log line of the partition's task names it.
            let span = tracing::info_span!("partition", partition = p);
            tokio::spawn(tracing::Instrument::instrument(task.run(), span));
        }
        let router = Router::new(
            partitions,
            RouterConfig {
                queue_qos0_offline: config.limits.queue_qos0_offline,
            },
        );
        Ok(LocalBroker { router })
    }

    /// The session service, by value.
    pub fn router(&self) -> &Router<LocalPartitions> {
        &self.router
    }

    pub fn stats(&self) -> &Stats {
        &self.router.transport().shared.stats
    }

    /// Makes the next `n` batches that need durability fail (in whichever partition), as an
    /// append or flush on a failing disk does: for tests of what a storage error does to the
    /// connections waiting on it.
    pub fn fail_next_durable_batches(&self, n: u32) {
        use std::sync::atomic::Ordering;
        let shared = &self.router.transport().shared;
        shared.fail_durable_batches.store(n, Ordering::Relaxed);
    }

    /// Flushes and checkpoints every partition, then stops their tasks.
    pub async fn shutdown(&self) {
        self.router
            .transport()
            .ask_all::<()>(|done| Request::Shutdown { done })
            .await;
    }

    /// Session totals of every partition, for metrics (read-only; each partition walks its
    /// sessions, so call it every few seconds).
    pub async fn load(&self) -> PartitionLoad {
        let mut total = PartitionLoad::default();
        for load in self
            .router
            .transport()
            .ask_all(|reply| Request::Load { reply })
            .await
        {
            total += load;
        }
        total
    }

    /// Retained messages stored, for metrics and `$SYS` (read-only). It collects every
    /// retained message under `#` and `$SYS/#` from each partition, so it costs time in
    /// proportion to the retained store: call it every few seconds, not per message.
    pub async fn retained_count(&self) -> usize {
        let mut count = 0;
        for filter in ["#", "$SYS/#"] {
            let found = self
                .router
                .transport()
                .ask_all(|reply| Request::Retained {
                    filter: filter.to_string(),
                    reply,
                })
                .await;
            count += found.iter().map(Vec::len).sum::<usize>();
        }
        count
    }
}

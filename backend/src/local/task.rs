//! One standalone partition's task: a loop in the spirit of raft-rs's Ready loop, kept in one
//! place:
//! 1. take every request waiting in the channel (a batch),
//! 2. stamp the commands with the time and append them to the log as one record,
//! 3. flush once if any command needs durability (group commit: many PUBACKs per fsync),
//! 4. apply in order, carry out the effects ([`crate::effects`]), answer,
//! 5. now and then, checkpoint the changed state and drop the covered log.
//!
//! QoS0 publishes travel in the same batches but are not logged: they read the subscriptions
//! in order with the logged commands, so a subscriber whose SUBACK went out sees every QoS0
//! message published after it.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tiermq_common::session_api::SessionEvent;
use tiermq_common::shared_dispatch::carry_out;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use super::partitions::{LocalPartitions, Request, Shared};
use super::LocalConfig;
use crate::effects::{Connections, EffectHost, Tracked};
use crate::partition::command::{Command, Entry, Reply, SharedWork};
use crate::partition::Partition;
use crate::storage::{PartitionStore, StorageError};

const MAX_BATCH: usize = 4096;

/// Storage failures repeat for every batch while the disk is bad: one warning a minute.
static STORAGE_WARNINGS: tiermq_common::log_limit::LogLimiter =
    tiermq_common::log_limit::LogLimiter::new(Duration::from_secs(60));

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(super) struct PartitionTask {
    pub(super) id: u32,
    pub(super) partition: Partition,
    pub(super) store: PartitionStore,
    pub(super) rx: mpsc::UnboundedReceiver<Request>,
    /// Weak: the task must not keep its own channel open (it ends when the broker is gone).
    pub(super) senders: Weak<Vec<mpsc::UnboundedSender<Request>>>,
    pub(super) shared: Weak<Shared>,
    pub(super) connections: Connections,
    pub(super) config: LocalConfig,
    pub(super) last_now: u64,
    pub(super) since_checkpoint: u64,
    pub(super) last_checkpoint: Instant,
}

/// Standalone, effects that leave the partition go to the shared route table and to
/// spawned cross-partition steps; every connection is in process, so an event whose
/// connection is gone is dropped.
struct LocalHost {
    id: u32,
    partitions: Option<LocalPartitions>,
}

impl EffectHost for LocalHost {
    fn send_elsewhere(&mut self, _client_id: Arc<str>, _epoch: u64, _event: SessionEvent) {}

    fn route_changed(&mut self, filter: String, added: bool) {
        if let Some(p) = &self.partitions {
            let mut routes = p.shared.routes.write().unwrap_or_else(|e| e.into_inner());
            if added {
                routes.add(self.id, &filter);
            } else {
                routes.remove(self.id, &filter);
            }
        }
    }

    fn shared(&mut self, work: SharedWork) {
        // Started now: its first command is queued before this returns, keeping the order
        // in which the partition emitted the steps.
        if let Some(p) = &self.partitions {
            tokio::spawn(carry_out(work, self.id, p));
        }
    }
}

impl PartitionTask {
    fn partitions(&self) -> Option<LocalPartitions> {
        Some(LocalPartitions {
            senders: self.senders.upgrade()?,
            shared: self.shared.upgrade()?,
        })
    }

    fn host(&self) -> LocalHost {
        LocalHost {
            id: self.id,
            partitions: self.partitions(),
        }
    }

    /// Whether this durable batch is one that `LocalBroker::fail_next_durable_batches`
    /// asked to fail.
    fn injected_failure(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.shared.upgrade().is_some_and(|s| {
            s.fail_durable_batches
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
        })
    }

    fn now(&mut self) -> u64 {
        // Time in the log never runs backwards, whatever the wall clock does.
        self.last_now = self.last_now.max(now_ms());
        self.last_now
    }

    pub(super) async fn run(mut self) {
        // Connections that were attached when the broker stopped are gone: their sessions
        // are disconnected (wills fire, persistent sessions start to expire).
        let mut batch = vec![Request::Command {
            command: Command::FrontendLost { frontend_id: 0 },
            reply: None,
            events: None,
        }];
        // Shared-subscription steps the previous run did not finish.
        let mut host = self.host();
        for work in self.partition.shared_work() {
            host.shared(work);
        }
        let mut tick = tokio::time::interval(self.config.tick_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if batch.is_empty() {
                tokio::select! {
                    req = self.rx.recv() => match req {
                        Some(r) => batch.push(r),
                        None => break,
                    },
                    _ = tick.tick() => batch.push(Request::Command {
                        command: Command::Tick,
                        reply: None,
                        events: None,
                    }),
                }
            }
            while batch.len() < MAX_BATCH {
                match self.rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            let shutdown = self.process(std::mem::take(&mut batch)).await;
            if let Some(done) = shutdown {
                if let Err(e) = self.store.checkpoint(&mut self.partition) {
                    warn!(partition = self.id, error = %e, "final checkpoint failed");
                }
                // Release this task's handle on the database before saying "done", so the
                // folder can be reopened as soon as every partition has answered.
                drop(self);
                let _ = done.send(());
                return;
            }
            if self.since_checkpoint >= self.config.checkpoint_entries
                || (self.since_checkpoint > 0
                    && self.last_checkpoint.elapsed() >= self.config.checkpoint_interval)
            {
                if let Err(e) = self.store.checkpoint(&mut self.partition) {
                    warn!(partition = self.id, error = %e, "checkpoint failed");
                }
                self.since_checkpoint = 0;
                self.last_checkpoint = Instant::now();
            }
        }
    }

    /// Appends the batch's commands to the log as one record, flushed if any needs it.
    /// `Err`: nothing in the batch may be applied or answered.
    async fn persist(&mut self, first_index: u64, entries: &[Entry], durable: bool) -> bool {
        if entries.is_empty() {
            return true;
        }
        let flushing = Instant::now();
        let result = match self.store.append(first_index, entries) {
            Ok(()) if durable && self.injected_failure() => Err(StorageError::Sled(
                sled::Error::Io(std::io::Error::other("injected disk failure")),
            )),
            Ok(()) if durable => self.store.flush().await,
            other => other,
        };
        if let Err(e) = result {
            // Nothing in this batch is acknowledged: the proposers see the service fail.
            // A full or failing disk fails every batch: say so once a minute.
            tiermq_common::warn_limited!(
                STORAGE_WARNINGS,
                &format!("append-{}", self.id),
                partition = self.id,
                error = %e,
                "log append failed"
            );
            return false;
        }
        if let Some(s) = self.shared.upgrade() {
            use std::sync::atomic::Ordering;
            s.stats
                .entries
                .fetch_add(entries.len() as u64, Ordering::Relaxed);
            if durable {
                s.stats.flushes.fetch_add(1, Ordering::Relaxed);
                s.stats.flush_seconds.observe_duration(flushing.elapsed());
            }
        }
        true
    }

    /// Logs, flushes and applies one batch. Returns the shutdown waiter if asked to stop.
    async fn process(&mut self, batch: Vec<Request>) -> Option<oneshot::Sender<()>> {
        let now = self.now();
        let first_index = self.partition.applied_index() + 1;
        let mut entries = Vec::new();
        let mut durable = false;
        for req in &batch {
            if let Request::Command { command, .. } = req {
                durable |= command.needs_durability();
                entries.push(Entry {
                    now_ms: now,
                    command: command.clone(),
                });
            }
        }
        if !self.persist(first_index, &entries, durable).await {
            return None;
        }
        let mut host = self.host();
        let mut entries = entries.into_iter();
        let mut index = first_index;
        let mut shutdown = None;
        for req in batch {
            match req {
                Request::Command {
                    command,
                    reply,
                    events,
                } => {
                    let entry = entries.next().expect("one entry per command");
                    let tracked = Tracked::of(&command);
                    let (r, effects) = self.partition.apply(index, entry);
                    index += 1;
                    self.since_checkpoint += 1;
                    let new_conn = match (&r, events) {
                        (Reply::Connected { epoch, .. }, Some(tx)) => Some((*epoch, tx)),
                        _ => None,
                    };
                    self.connections
                        .dispatch(effects, new_conn.as_ref(), &mut host);
                    self.connections.track(tracked, new_conn, &self.partition);
                    if let Some(reply) = reply {
                        let _ = reply.send(r);
                    }
                }
                Request::Qos0 { message, publisher } => {
                    let publisher = (!publisher.is_empty()).then_some(&*publisher);
                    let (_, effects) = self.partition.deliver_qos0(&message, publisher, now);
                    self.connections.dispatch(effects, None, &mut host);
                }
                Request::Retained { filter, reply } => {
                    let _ = reply.send(self.partition.retained_matching(&filter, now));
                }
                Request::Load { reply } => {
                    let _ = reply.send(self.partition.load());
                }
                Request::Shutdown { done } => shutdown = Some(done),
            }
        }
        shutdown
    }
}

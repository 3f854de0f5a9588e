//! The in-process runtime of `tiermq standalone`: each partition is one tokio task that owns
//! its state machine and its storage, and [`LocalBroker`] routes session operations to them.
//!
//! A partition task runs a loop in the spirit of raft-rs's Ready loop, kept in one place:
//! 1. take every request waiting in the channel (a batch),
//! 2. stamp the commands with the time and append them to the log as one record,
//! 3. flush once if any command needs durability (group commit: many PUBACKs per fsync),
//! 4. apply in order, dispatch the effects (deliveries, wills, route changes), answer,
//! 5. now and then, checkpoint the changed state and drop the covered log.
//!
//! QoS0 publishes travel in the same batches but are not logged: they read the subscriptions
//! in order with the logged commands, so a subscriber whose SUBACK went out sees every QoS0
//! message published after it.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tiermq_common::hashing::partition_of;
use tiermq_common::pending_routes::PendingRoutes;
use tiermq_common::session_api::{
    AckKind, ConnectRequest, Connected, DisconnectRequest, Published, ServiceError, ServiceResult,
    SessionEvent, SessionRef, SessionService, SubscribeRequest,
};
use tiermq_common::trie::TopicTrie;
use tiermq_common::{Message, QoS, ReasonCode};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::partition::command::{
    AckCmd, Command, Effect, Entry, InboundQos2, Reply, RetainedForSubscription, SharedWork,
};
use crate::partition::session::SessionLimits;
use crate::partition::Partition;
use crate::storage::{PartitionStore, StorageError};
use tiermq_common::shared_dispatch::{carry_out, update_memberships, PartitionCaller};

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

type EventSender = mpsc::UnboundedSender<SessionEvent>;

// Requests are moved through the channel once; boxing the large `Command` variant would cost
// an allocation per request for nothing.
#[allow(clippy::large_enum_variant)]
enum Request {
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
        reply: oneshot::Sender<crate::partition::PartitionLoad>,
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

struct Inner {
    partitions: Vec<mpsc::UnboundedSender<Request>>,
    /// Route table: filter → partitions with at least one subscription on it.
    routes: RwLock<TopicTrie<u32, ()>>,
    /// Subscriptions submitted and not yet applied: publishes go there too (issue 20, item 9).
    pending_routes: PendingRoutes,
    stats: Stats,
    /// QoS0 must be logged (to be queued for offline sessions) rather than only delivered.
    queue_qos0_offline: bool,
    /// Test hook: how many of the next durable batches fail as a failing disk would.
    fail_durable_batches: std::sync::atomic::AtomicU32,
    /// Publishers with an inbound QoS2 second stage in progress (see [`Lane`]).
    lanes: std::sync::Mutex<HashMap<Arc<str>, mpsc::UnboundedSender<LaneJob>>>,
}

/// The standalone broker's partitions behind [`SessionService`].
#[derive(Clone)]
pub struct LocalBroker {
    inner: Arc<Inner>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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
        let mut routes = TopicTrie::new();
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
                routes.insert(&filter, p, ());
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
        let inner = Arc::new(Inner {
            partitions: senders,
            routes: RwLock::new(routes),
            pending_routes: PendingRoutes::default(),
            stats: Stats::default(),
            queue_qos0_offline: config.limits.queue_qos0_offline,
            fail_durable_batches: Default::default(),
            lanes: Default::default(),
        });
        for (p, ((partition, store), rx)) in recovered.into_iter().zip(receivers).enumerate() {
            let task = PartitionTask {
                id: p as u32,
                partition,
                store,
                rx,
                broker: Arc::downgrade(&inner),
                connections: HashMap::new(),
                config: config.clone(),
                last_now: 0,
                since_checkpoint: 0,
                last_checkpoint: Instant::now(),
            };
            // Every log line of the partition's task names it.
            let span = tracing::info_span!("partition", partition = p);
            tokio::spawn(tracing::Instrument::instrument(task.run(), span));
        }
        Ok(LocalBroker { inner })
    }

    pub fn partition_count(&self) -> u32 {
        self.inner.partitions.len() as u32
    }

    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// Makes the next `n` batches that need durability fail (in whichever partition), as an
    /// append or flush on a failing disk does: for tests of what a storage error does to the
    /// connections waiting on it.
    pub fn fail_next_durable_batches(&self, n: u32) {
        use std::sync::atomic::Ordering;
        self.inner.fail_durable_batches.store(n, Ordering::Relaxed);
    }

    /// Flushes and checkpoints every partition, then stops their tasks.
    pub async fn shutdown(&self) {
        for tx in &self.inner.partitions {
            let (done, wait) = oneshot::channel();
            if tx.send(Request::Shutdown { done }).is_ok() {
                let _ = wait.await;
            }
        }
    }

    fn partition_of(&self, key: &str) -> u32 {
        partition_of(key, self.partition_count())
    }

    async fn call(&self, partition: u32, command: Command) -> ServiceResult<Reply> {
        self.submit(partition, command).await
    }

    fn cast(&self, partition: u32, command: Command) {
        let _ = self.inner.partitions[partition as usize].send(Request::Command {
            command,
            reply: None,
            events: None,
        });
    }

    /// Partitions that hold, or were sent, a subscription matching `topic`.
    fn route(&self, topic: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let routes = self.inner.routes.read().unwrap_or_else(|e| e.into_inner());
        routes.for_each_match(topic, |_, p, _| {
            if !out.contains(p) {
                out.push(*p);
            }
        });
        drop(routes);
        self.inner.pending_routes.for_each_match(topic, |p| {
            if !out.contains(&p) {
                out.push(p);
            }
        });
        out
    }

    /// Sends `command` to `partition` now and returns the wait for its reply.
    fn submit(
        &self,
        partition: u32,
        command: Command,
    ) -> impl Future<Output = ServiceResult<Reply>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let sent = self.inner.partitions[partition as usize]
            .send(Request::Command {
                command,
                reply: Some(tx),
                events: None,
            })
            .is_ok();
        async move {
            if !sent {
                return Err(ServiceError::ShuttingDown);
            }
            rx.await.map_err(|_| ServiceError::ShuttingDown)
        }
    }

    /// The publish path of wills and `$SYS` messages (no inbound QoS2): everything is sent to
    /// the partitions before this returns; the future only waits for the replies.
    fn submit_publish(
        &self,
        message: Message,
        publisher: Option<Arc<str>>,
        inbound: Option<(&SessionRef, u16)>,
    ) -> ReplyWait {
        match self.stage_publish(message, publisher, inbound) {
            Stage::Submitted(wait) => wait,
            Stage::Checking(check) => Box::pin(async move { check.await.await }),
        }
    }

    /// Submits a publish now, as far as it can be: all of it, or — an inbound QoS2 message
    /// for several partitions — the publish to the publisher's own partition, after whose
    /// answer (the message's token) [`Stage::Checking`] submits the rest.
    // `Stage::Checking` yields the wait for the replies once the second stage is submitted:
    // its caller (a lane) must know when that is, before the replies come.
    #[allow(clippy::async_yields_async)]
    fn stage_publish(
        &self,
        message: Message,
        publisher: Option<Arc<str>>,
        inbound: Option<(&SessionRef, u16)>,
    ) -> Stage {
        let message = Arc::new(message);
        let retained_home = message.retain.then(|| self.partition_of(&message.topic));
        let mut targets = self.route(&message.topic);
        if let Some(home) = retained_home {
            if !targets.contains(&home) {
                targets.push(home);
            }
        }
        let logged = message.qos != QoS::AtMostOnce
            || retained_home.is_some()
            || self.inner.queue_qos0_offline;
        if !logged {
            // QoS0 is neither logged nor acknowledged: hand it to each partition in order.
            let publisher = publisher.unwrap_or_else(|| Arc::from(""));
            for p in &targets {
                let _ = self.inner.partitions[*p as usize].send(Request::Qos0 {
                    message: message.clone(),
                    publisher: publisher.clone(),
                });
            }
            let matched = !targets.is_empty();
            return Stage::Submitted(Box::pin(std::future::ready(Ok(Published {
                matched,
                duplicate: false,
                refused: false,
            }))));
        }
        let inbound = inbound.map(|(session, packet_id)| {
            let home = self.partition_of(&session.client_id);
            (
                home,
                InboundQos2 {
                    client_id: session.client_id.clone(),
                    epoch: session.epoch,
                    packet_id,
                    token: None,
                },
            )
        });
        // Inbound QoS2 is exactly once because the publisher's partition records the packet
        // id in the same log entry that delivers the message there, and the other target
        // partitions deduplicate on the token that entry assigns (`InboundQos2`). So the home
        // partition goes first; once its entry is durable, the others get the message with the
        // token. A crash or lost connection in between leaves the id recorded: the client's
        // re-send is answered `duplicate` with the same token and goes to the others again,
        // which deliver it only where they had not.
        let Some((home, mark)) = inbound else {
            let waits = self.send_publish(&message, &publisher, &targets, retained_home, None);
            return Stage::Submitted(Box::pin(collect_published(waits)));
        };
        let at_home = self.send_publish(
            &message,
            &publisher,
            &[home],
            retained_home,
            Some(mark.clone()),
        );
        if targets.iter().all(|p| *p == home) {
            return Stage::Submitted(Box::pin(collect_published(at_home)));
        }
        let broker = self.clone();
        Stage::Checking(Box::pin(async move {
            let (mut published, token) = match collect_replies(at_home).await {
                Ok(answer) => answer,
                Err(e) => return Box::pin(std::future::ready(Err(e))) as ReplyWait,
            };
            let others: Vec<u32> = targets.iter().copied().filter(|p| *p != home).collect();
            let Some(token) = token else {
                let e = ServiceError::Unavailable("the publisher's partition gave no token".into());
                return Box::pin(std::future::ready(Err(e))) as ReplyWait;
            };
            let keyed = InboundQos2 {
                token: Some(token),
                ..mark
            };
            let others =
                broker.send_publish(&message, &publisher, &others, retained_home, Some(keyed));
            Box::pin(async move {
                let (elsewhere, _) = collect_replies(others).await?;
                published.matched |= elsewhere.matched;
                published.refused |= elsewhere.refused;
                Ok(published)
            }) as ReplyWait
        }))
    }

    fn send_publish(
        &self,
        message: &Arc<Message>,
        publisher: &Option<Arc<str>>,
        targets: &[u32],
        retained_home: Option<u32>,
        inbound_qos2: Option<InboundQos2>,
    ) -> Vec<oneshot::Receiver<Reply>> {
        let mut waits = Vec::with_capacity(targets.len());
        for p in targets {
            let (tx, rx) = oneshot::channel();
            let _ = self.inner.partitions[*p as usize].send(Request::Command {
                command: Command::Publish {
                    message: message.clone(),
                    publisher: publisher.clone(),
                    store_retained: Some(*p) == retained_home,
                    inbound_qos2: inbound_qos2.clone(),
                },
                reply: Some(tx),
                events: None,
            });
            waits.push(rx);
        }
        waits
    }

    /// Publishes `message` as the broker itself (no client session, no publisher for No
    /// Local): the `$SYS` topics. The same path as a client's publish, submitted at call time.
    pub fn publish_message(
        &self,
        message: Message,
    ) -> impl Future<Output = ServiceResult<Published>> + Send + 'static {
        self.submit_publish(message, None, None)
    }

    /// Session totals of every partition, for metrics (read-only; each partition walks its
    /// sessions, so call it every few seconds).
    pub async fn load(&self) -> crate::partition::PartitionLoad {
        let mut total = crate::partition::PartitionLoad::default();
        for tx in &self.inner.partitions {
            let (reply, rx) = oneshot::channel();
            if tx.send(Request::Load { reply }).is_ok() {
                total += rx.await.unwrap_or_default();
            }
        }
        total
    }

    /// Retained messages stored, for metrics and `$SYS` (read-only). It collects every
    /// retained message under `#` and `$SYS/#` from each partition, so it costs time in
    /// proportion to the retained store: call it every few seconds, not per message.
    pub async fn retained_count(&self) -> usize {
        let mut count = 0;
        for filter in ["#", "$SYS/#"] {
            for tx in &self.inner.partitions {
                let (reply, rx) = oneshot::channel();
                let filter = filter.to_string();
                if tx.send(Request::Retained { filter, reply }).is_ok() {
                    count += rx.await.map(|m| m.len()).unwrap_or(0);
                }
            }
        }
        count
    }
}

impl PartitionCaller for LocalBroker {
    fn partition_count(&self) -> u32 {
        LocalBroker::partition_count(self)
    }

    fn call_partition(
        &self,
        partition: u32,
        command: Command,
    ) -> impl Future<Output = ServiceResult<Reply>> + Send + 'static {
        self.submit(partition, command)
    }
}

/// A publish waiting in a [`Lane`].
struct LaneJob {
    message: Message,
    inbound: Option<(SessionRef, u16)>,
    reply: oneshot::Sender<ServiceResult<Published>>,
}

/// One publisher's publishes while the second stage of one of its inbound QoS2 messages is
/// not yet submitted (several partitions only). The second stage runs here, not in the
/// connection's future, so a connection that goes away cannot stop it half-way (the message
/// in some partitions, the id not recorded at home: a re-send would be delivered twice); and
/// the publisher's later publishes wait here, so none overtakes it. The lane closes when it
/// has nothing left to submit: later publishes are then submitted at call time again.
struct Lane {
    broker: LocalBroker,
    client_id: Arc<str>,
    jobs: mpsc::UnboundedReceiver<LaneJob>,
}

impl Lane {
    async fn run(
        mut self,
        first: std::pin::Pin<Box<dyn Future<Output = ReplyWait> + Send>>,
        reply: oneshot::Sender<ServiceResult<Published>>,
    ) {
        Self::answer(first.await, reply);
        loop {
            let job = match self.jobs.try_recv() {
                Ok(job) => job,
                Err(_) => {
                    let mut lanes = self
                        .broker
                        .inner
                        .lanes
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    match self.jobs.try_recv() {
                        Ok(job) => job,
                        Err(_) => {
                            lanes.remove(&self.client_id);
                            return;
                        }
                    }
                }
            };
            let publisher = Some(self.client_id.clone());
            let inbound = job.inbound.as_ref().map(|(s, pid)| (s, *pid));
            let wait = match self.broker.stage_publish(job.message, publisher, inbound) {
                Stage::Submitted(wait) => wait,
                Stage::Checking(check) => check.await,
            };
            Self::answer(wait, job.reply);
        }
    }

    /// Passes the replies on without holding up the lane.
    fn answer(wait: ReplyWait, reply: oneshot::Sender<ServiceResult<Published>>) {
        tokio::spawn(async move {
            let _ = reply.send(wait.await);
        });
    }
}

/// The wait for a publish's replies.
type ReplyWait = std::pin::Pin<Box<dyn Future<Output = ServiceResult<Published>> + Send>>;

/// How far [`LocalBroker::stage_publish`] got at call time.
enum Stage {
    /// Everything is submitted; the replies are on their way.
    Submitted(ReplyWait),
    /// An inbound QoS2 message for several partitions: the publish to the publisher's own
    /// partition is submitted; this future submits the rest once it answers (durable, with
    /// the token the others deduplicate on), then yields the wait.
    Checking(std::pin::Pin<Box<dyn Future<Output = ReplyWait> + Send>>),
}

/// Waits for the partitions' answers to one publish and merges them.
async fn collect_published(waits: Vec<oneshot::Receiver<Reply>>) -> ServiceResult<Published> {
    Ok(collect_replies(waits).await?.0)
}

/// [`collect_published`], with the inbound QoS2 token the answers carry (if any).
async fn collect_replies(
    waits: Vec<oneshot::Receiver<Reply>>,
) -> ServiceResult<(Published, Option<u64>)> {
    let mut out = Published {
        matched: false,
        duplicate: false,
        refused: false,
    };
    let mut token = None;
    for rx in waits {
        let reply = rx.await.map_err(|_| ServiceError::ShuttingDown)?;
        let carried =
            tiermq_common::partition_api::merge_published(&mut out, reply).map_err(reply_error)?;
        token = token.or(carried);
    }
    Ok((out, token))
}

fn reply_error(reply: Reply) -> ServiceError {
    match reply {
        Reply::Fenced => ServiceError::SessionTakenOver,
        Reply::NoSession => ServiceError::NoSession,
        other => ServiceError::Unavailable(format!("unexpected reply {other:?}")),
    }
}

impl SessionService for LocalBroker {
    async fn connect(&self, req: ConnectRequest) -> ServiceResult<Connected> {
        let p = self.partition_of(&req.client_id);
        let (events_tx, events) = mpsc::unbounded_channel();
        let (tx, rx) = oneshot::channel();
        let client_id = req.client_id.clone();
        self.inner.partitions[p as usize]
            .send(Request::Command {
                command: Command::Connect {
                    client_id: req.client_id,
                    protocol: req.protocol,
                    clean_start: req.clean_start,
                    session_expiry_secs: req.session_expiry_secs,
                    receive_maximum: req.receive_maximum,
                    will: req.will,
                    frontend_id: req.frontend_id,
                    // In process: a CONNECT is never re-sent.
                    connection: 0,
                },
                reply: Some(tx),
                events: Some(events_tx),
            })
            .map_err(|_| ServiceError::ShuttingDown)?;
        match rx.await.map_err(|_| ServiceError::ShuttingDown)? {
            Reply::Connected {
                epoch,
                session_present,
            } => Ok(Connected {
                session: SessionRef { client_id, epoch },
                session_present,
                events,
            }),
            other => Err(reply_error(other)),
        }
    }

    async fn subscribe(
        &self,
        session: &SessionRef,
        subs: Vec<SubscribeRequest>,
    ) -> ServiceResult<Vec<ReasonCode>> {
        let home = self.partition_of(&session.client_id);
        let filters: Vec<String> = subs.iter().map(|s| s.filter.clone()).collect();
        let wait = self.submit(
            home,
            Command::Subscribe {
                client_id: session.client_id.clone(),
                epoch: session.epoch,
                subscriptions: subs,
            },
        );
        // From here a publish matching these filters goes to `home` too, behind the SUBSCRIBE
        // in its log; the partition's own route (`RouteAdded`) is in place when it answers.
        let pending = self
            .inner
            .pending_routes
            .add(filters.iter().map(String::as_str), home);
        let reply = wait.await;
        drop(pending);
        let reply = reply?;
        let Reply::Subscribed {
            reason_codes,
            want_retained,
        } = reply
        else {
            return Err(reply_error(reply));
        };
        update_memberships(self, &session.client_id, &filters, &reason_codes, true).await?;
        if self.partition_count() > 1 && !want_retained.is_empty() {
            // Retained messages live in their topic's partition: gather the matching ones
            // from the other partitions and queue them in the session.
            let mut retained = Vec::new();
            for (filter, options, subscription_id) in want_retained {
                let mut messages = Vec::new();
                for p in 0..self.partition_count() {
                    if p == home {
                        continue;
                    }
                    let (tx, rx) = oneshot::channel();
                    let _ = self.inner.partitions[p as usize].send(Request::Retained {
                        filter: filter.clone(),
                        reply: tx,
                    });
                    messages.extend(rx.await.unwrap_or_default());
                }
                if !messages.is_empty() {
                    retained.push(RetainedForSubscription {
                        filter,
                        options,
                        subscription_id,
                        messages,
                    });
                }
            }
            if !retained.is_empty() {
                self.call(
                    home,
                    Command::DeliverRetained {
                        client_id: session.client_id.clone(),
                        epoch: session.epoch,
                        retained,
                    },
                )
                .await?;
            }
        }
        Ok(reason_codes)
    }

    async fn unsubscribe(
        &self,
        session: &SessionRef,
        filters: Vec<String>,
    ) -> ServiceResult<Vec<ReasonCode>> {
        let home = self.partition_of(&session.client_id);
        let reply = self
            .call(
                home,
                Command::Unsubscribe {
                    client_id: session.client_id.clone(),
                    epoch: session.epoch,
                    filters: filters.clone(),
                },
            )
            .await?;
        let Reply::Unsubscribed(codes) = reply else {
            return Err(reply_error(reply));
        };
        update_memberships(self, &session.client_id, &filters, &codes, false).await?;
        Ok(codes)
    }

    fn publish(
        &self,
        session: &SessionRef,
        message: Message,
        inbound_packet_id: Option<u16>,
    ) -> impl Future<Output = ServiceResult<Published>> + Send + 'static {
        if self.partition_count() == 1 {
            // One partition: everything is submitted at call time, no second stage.
            let inbound = inbound_packet_id.map(|pid| (session, pid));
            return self.submit_publish(message, Some(session.client_id.clone()), inbound);
        }
        let client_id = session.client_id.clone();
        let (reply, wait) = oneshot::channel();
        let answer: ReplyWait =
            Box::pin(async move { wait.await.unwrap_or(Err(ServiceError::ShuttingDown)) });
        let job = LaneJob {
            message,
            inbound: inbound_packet_id.map(|pid| (session.clone(), pid)),
            reply,
        };
        // Under the lock, so a lane opened by another publish of this client is either seen
        // here or opened after this one is submitted.
        let mut lanes = self.inner.lanes.lock().unwrap_or_else(|e| e.into_inner());
        let job = match lanes.get(&client_id) {
            Some(lane) => match lane.send(job) {
                Ok(()) => return answer,
                // The lane's task ended without closing it (it panicked): submit directly.
                Err(mpsc::error::SendError(job)) => job,
            },
            None => job,
        };
        let inbound = job.inbound.as_ref().map(|(s, pid)| (s, *pid));
        match self.stage_publish(job.message, Some(client_id.clone()), inbound) {
            Stage::Submitted(wait) => wait,
            Stage::Checking(check) => {
                let (tx, jobs) = mpsc::unbounded_channel();
                lanes.insert(client_id.clone(), tx);
                let lane = Lane {
                    broker: self.clone(),
                    client_id,
                    jobs,
                };
                tokio::spawn(lane.run(check, job.reply));
                answer
            }
        }
    }

    fn release(
        &self,
        session: &SessionRef,
        packet_id: u16,
    ) -> impl Future<Output = ServiceResult<bool>> + Send + 'static {
        let home = self.partition_of(&session.client_id);
        let wait = self.submit(
            home,
            Command::Qos2Release {
                client_id: session.client_id.clone(),
                epoch: session.epoch,
                packet_id,
            },
        );
        async move {
            match wait.await? {
                Reply::Released { found } => Ok(found),
                other => Err(reply_error(other)),
            }
        }
    }

    fn ack(
        &self,
        session: &SessionRef,
        kind: AckKind,
        packet_id: u16,
    ) -> impl Future<Output = ServiceResult<Option<u64>>> + Send + 'static {
        let home = self.partition_of(&session.client_id);
        let command = Command::Ack {
            client_id: session.client_id.clone(),
            epoch: session.epoch,
            kind: AckCmd::from(kind),
            packet_id,
        };
        if kind != AckKind::PubRec {
            self.cast(home, command);
            return futures::future::Either::Left(std::future::ready(Ok(None)));
        }
        // PUBREC is flushed before it is applied and answered (`needs_durability`).
        let wait = self.submit(home, command);
        futures::future::Either::Right(async move {
            match wait.await? {
                Reply::Acked { index } => Ok(Some(index)),
                other => Err(reply_error(other)),
            }
        })
    }

    async fn disconnect(&self, session: &SessionRef, req: DisconnectRequest) -> ServiceResult<()> {
        let home = self.partition_of(&session.client_id);
        match self
            .call(
                home,
                Command::Disconnect {
                    client_id: session.client_id.clone(),
                    epoch: session.epoch,
                    normal: req.normal,
                    with_will: req.with_will,
                    session_expiry_secs: req.session_expiry_secs,
                },
            )
            .await?
        {
            Reply::Done | Reply::Fenced | Reply::NoSession => Ok(()),
            other => Err(reply_error(other)),
        }
    }
}

/// One partition's task: the batch / log / flush / apply loop.
struct PartitionTask {
    id: u32,
    partition: Partition,
    store: PartitionStore,
    rx: mpsc::UnboundedReceiver<Request>,
    broker: Weak<Inner>,
    /// Live connections of this partition's sessions: client id → (epoch, event sender).
    connections: HashMap<Arc<str>, (u64, EventSender)>,
    config: LocalConfig,
    last_now: u64,
    since_checkpoint: u64,
    last_checkpoint: Instant,
}

const MAX_BATCH: usize = 4096;

/// Storage failures repeat for every batch while the disk is bad: one warning a minute.
static STORAGE_WARNINGS: tiermq_common::log_limit::LogLimiter =
    tiermq_common::log_limit::LogLimiter::new(Duration::from_secs(60));

impl PartitionTask {
    /// Whether this durable batch is one that [`LocalBroker::fail_next_durable_batches`]
    /// asked to fail.
    fn injected_failure(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.broker.upgrade().is_some_and(|b| {
            b.fail_durable_batches
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
        })
    }

    fn now(&mut self) -> u64 {
        // Time in the log never runs backwards, whatever the wall clock does.
        self.last_now = self.last_now.max(now_ms());
        self.last_now
    }

    async fn run(mut self) {
        // Connections that were attached when the broker stopped are gone: their sessions
        // are disconnected (wills fire, persistent sessions start to expire).
        let mut batch = vec![Request::Command {
            command: Command::FrontendLost { frontend_id: 0 },
            reply: None,
            events: None,
        }];
        // Shared-subscription steps the previous run did not finish.
        for work in self.partition.shared_work() {
            self.carry_out_shared(work);
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
        if !entries.is_empty() {
            let flushing = std::time::Instant::now();
            let result = match self.store.append(first_index, &entries) {
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
                return None;
            }
            if let Some(b) = self.broker.upgrade() {
                b.stats
                    .entries
                    .fetch_add(entries.len() as u64, std::sync::atomic::Ordering::Relaxed);
                if durable {
                    b.stats
                        .flushes
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    b.stats.flush_seconds.observe_duration(flushing.elapsed());
                }
            }
        }
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
                    let (r, effects) = self.partition.apply(index, entry);
                    index += 1;
                    self.since_checkpoint += 1;
                    let new_conn = match (&r, events) {
                        (Reply::Connected { epoch, .. }, Some(tx)) => Some((*epoch, tx)),
                        _ => None,
                    };
                    self.dispatch(effects, new_conn.as_ref());
                    self.track_connection(&command, new_conn);
                    if let Some(reply) = reply {
                        let _ = reply.send(r);
                    }
                }
                Request::Qos0 { message, publisher } => {
                    let publisher = (!publisher.is_empty()).then_some(&*publisher);
                    let (_, effects) = self.partition.deliver_qos0(&message, publisher, now);
                    self.dispatch(effects, None);
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

    fn dispatch(&mut self, effects: Vec<Effect>, new_conn: Option<&(u64, EventSender)>) {
        for effect in effects {
            match effect {
                Effect::Send {
                    client_id,
                    epoch,
                    event,
                } => {
                    let tx = match new_conn {
                        Some((e, tx)) if *e == epoch => Some(tx),
                        _ => match self.connections.get(&client_id) {
                            Some((e, tx)) if *e == epoch => Some(tx),
                            _ => None,
                        },
                    };
                    if let Some(tx) = tx {
                        let _ = tx.send(event);
                    }
                }
                // Recorded as shared work by `Partition::apply`; never leaves the partition.
                Effect::PublishWill { .. } => {}
                Effect::RouteAdded { filter } => {
                    if let Some(inner) = self.broker.upgrade() {
                        let mut routes = inner.routes.write().unwrap_or_else(|e| e.into_inner());
                        routes.insert(&filter, self.id, ());
                    }
                }
                Effect::RouteRemoved { filter } => {
                    if let Some(inner) = self.broker.upgrade() {
                        let mut routes = inner.routes.write().unwrap_or_else(|e| e.into_inner());
                        routes.remove(&filter, &self.id);
                    }
                }
                Effect::Shared(work) => self.carry_out_shared(work),
            }
        }
    }

    /// Starts a shared-subscription step now (its first command is queued before this
    /// returns, keeping the order in which the partition emitted them).
    fn carry_out_shared(&self, work: SharedWork) {
        if let Some(inner) = self.broker.upgrade() {
            tokio::spawn(carry_out(work, self.id, &LocalBroker { inner }));
        }
    }

    /// Keeps the map of live connections in step with the state machine: a new connection
    /// replaces the old one's sender (dropping it ends the old stream), a disconnect removes it.
    fn track_connection(&mut self, command: &Command, new_conn: Option<(u64, EventSender)>) {
        match command {
            Command::Connect { client_id, .. } => {
                if let Some(conn) = new_conn {
                    self.connections.insert(client_id.clone(), conn);
                }
            }
            Command::Disconnect {
                client_id, epoch, ..
            } if self
                .connections
                .get(client_id)
                .is_some_and(|(e, _)| e == epoch) =>
            {
                self.connections.remove(client_id);
            }
            Command::FrontendLost { .. } => {
                let partition = &self.partition;
                self.connections.retain(|client_id, (epoch, _)| {
                    match partition.session(client_id) {
                        Some(s) => s.epoch() == Some(*epoch),
                        None => false,
                    }
                });
            }
            _ => {}
        }
    }
}

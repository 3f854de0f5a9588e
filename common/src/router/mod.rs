//! The router: MQTT session operations turned into partition commands, written once for both
//! tiers. A standalone broker runs it over its in-process partitions, a cluster frontend over
//! gRPC pipes to the partitions' leaders; both are a [`Transport`].
//!
//! What the router decides:
//! - which partition holds a session (its client id's hash) and sends it the session's
//!   operations (connect, subscribe, acks, disconnect);
//! - where a publish goes ([`publish`]): the partitions the route table ([`routes`]) and the
//!   subscriptions in flight ([`pending`]) name, in the client's order, exactly once for
//!   inbound QoS2 across partitions;
//! - the cross-partition parts of a SUBSCRIBE: shared-subscription groups in their own
//!   partitions, retained messages gathered from every partition.
//!
//! What it leaves to the transport: reaching a partition, the route table's feed, and the
//! delivery of a connection's events.

pub mod pending;
mod publish;
pub mod routes;
pub mod transport;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::hashing::partition_of;
use crate::partition_api::{AckCmd, Command, Reply, RetainedForSubscription};
use crate::session_api::{
    AckKind, ConnectRequest, Connected, DisconnectRequest, Published, ServiceError, ServiceResult,
    SessionRef, SessionService, SubscribeRequest,
};
use crate::shared_dispatch::update_memberships;
use crate::{Message, ReasonCode};
use pending::PendingRoutes;
pub use publish::PublishWait;
use publish::{Lane, LaneJob, Lanes, Plan};
pub use transport::{EventReceiver, PartitionCaller, Transport};

/// Settings of the router.
#[derive(Debug, Clone, Copy, Default)]
pub struct RouterConfig {
    /// QoS0 messages are logged like QoS1 ones, so that partitions can queue them for
    /// offline persistent sessions (`session.queue_qos0_offline`).
    pub queue_qos0_offline: bool,
}

/// [`SessionService`] over a [`Transport`]; see the module doc. Clones share everything.
pub struct Router<T> {
    transport: T,
    state: Arc<State>,
}

impl<T: Clone> Clone for Router<T> {
    fn clone(&self) -> Self {
        Router {
            transport: self.transport.clone(),
            state: self.state.clone(),
        }
    }
}

struct State {
    /// Subscriptions submitted and not yet answered: publishes go there too.
    pending: PendingRoutes,
    /// Publishers with a two-stage QoS2 publish in progress ([`publish`]).
    lanes: Arc<Lanes>,
    /// How many lanes are open: the publish path takes the lanes' lock only when some are.
    open_lanes: Arc<AtomicUsize>,
    config: RouterConfig,
}

impl<T: Transport> Router<T> {
    pub fn new(transport: T, config: RouterConfig) -> Router<T> {
        Router {
            transport,
            state: Arc::new(State {
                pending: PendingRoutes::default(),
                lanes: Arc::default(),
                open_lanes: Arc::default(),
                config,
            }),
        }
    }

    pub fn transport(&self) -> &T {
        &self.transport
    }

    pub fn partition_count(&self) -> u32 {
        self.transport.partition_count()
    }

    fn home(&self, client_id: &str) -> u32 {
        partition_of(client_id, self.transport.partition_count())
    }

    /// The partitions a message on `topic` would go to now (routes, subscriptions in flight
    /// and untrusted partitions; not the retained message's home), sorted.
    pub fn targets(&self, topic: &str) -> Vec<u32> {
        let mut out = Plan::new(
            &self.transport,
            &self.state.pending,
            Message::new(topic, "", crate::QoS::AtMostOnce, false),
            None,
            None,
        )
        .targets()
        .to_vec();
        out.sort_unstable();
        out
    }

    /// Publishes `message` as the broker itself (no client session, no publisher for No
    /// Local): `$SYS` topics and wills. Submitted at call time, like a client's publish.
    pub fn publish_message(
        &self,
        message: Message,
    ) -> impl Future<Output = ServiceResult<Published>> + Send + 'static {
        let plan = Plan::new(&self.transport, &self.state.pending, message, None, None);
        plan.submit(&self.transport, self.state.config.queue_qos0_offline)
    }

    /// Submits a client's publish now, through its lane if one is open or needed.
    fn submit_publish(
        &self,
        session: &SessionRef,
        message: Message,
        inbound_packet_id: Option<u16>,
    ) -> PublishWait {
        let client_id = session.client_id.clone();
        let inbound = inbound_packet_id.map(|pid| (session, pid));
        let plan = Plan::new(
            &self.transport,
            &self.state.pending,
            message,
            Some(client_id.clone()),
            inbound,
        );
        let logged_qos0 = self.state.config.queue_qos0_offline;
        if !plan.is_two_stage() && self.state.open_lanes.load(Ordering::Acquire) == 0 {
            return plan.submit(&self.transport, logged_qos0);
        }
        let (reply, wait) = oneshot::channel();
        let answer: PublishWait =
            Box::pin(async move { wait.await.unwrap_or(Err(ServiceError::ShuttingDown)) });
        let job = LaneJob { plan, reply };
        // Under the lock, so a lane that closes meanwhile has either taken this job or is
        // gone (and everything it held submitted) before this one is.
        let mut lanes = self.state.lanes.lock().unwrap_or_else(|e| e.into_inner());
        let job = match lanes.get(&client_id) {
            Some(lane) => match lane.send(job) {
                Ok(()) => return answer,
                // The lane's task ended without closing it (it panicked): go on without it.
                Err(mpsc::error::SendError(job)) => {
                    lanes.remove(&client_id);
                    self.state.open_lanes.fetch_sub(1, Ordering::AcqRel);
                    job
                }
            },
            None => job,
        };
        if !job.plan.is_two_stage() {
            // No lane (it closed after the quick check): submitted at call time, and
            // `answer` is not needed.
            return job.plan.submit(&self.transport, logged_qos0);
        }
        let (tx, jobs) = mpsc::unbounded_channel();
        lanes.insert(client_id.clone(), tx);
        self.state.open_lanes.fetch_add(1, Ordering::AcqRel);
        let lane = Lane {
            transport: self.transport.clone(),
            lanes: self.state.lanes.clone(),
            open_lanes: self.state.open_lanes.clone(),
            client_id,
            jobs,
            logged_qos0,
        };
        tokio::spawn(lane.run(job));
        answer
    }

    /// Retained messages for the accepted subscriptions that want them, gathered from every
    /// partition but `home` (which queued its own already), in topic order per filter.
    async fn gather_retained(
        &self,
        home: u32,
        want: Vec<(String, crate::session_api::SubscriptionOptions, Option<u32>)>,
    ) -> ServiceResult<Vec<RetainedForSubscription>> {
        let mut retained = Vec::new();
        for (filter, options, subscription_id) in want {
            let mut messages: Vec<Arc<Message>> = Vec::new();
            for p in (0..self.partition_count()).filter(|p| *p != home) {
                messages.extend(self.transport.retained(p, filter.clone()).await?);
            }
            if !messages.is_empty() {
                messages.sort_by(|a, b| a.topic.cmp(&b.topic));
                retained.push(RetainedForSubscription {
                    filter,
                    options,
                    subscription_id,
                    messages,
                });
            }
        }
        Ok(retained)
    }

    /// Read your own subscription: where the route table learns routes only after the
    /// partition answered (a cluster's route streams), publishes through this router see
    /// the accepted filters at once.
    fn note_own_routes(&self, home: u32, filters: &[String], codes: &[ReasonCode]) {
        let mut routes = self
            .transport
            .routes()
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if routes.is_complete() {
            return;
        }
        for (filter, code) in filters.iter().zip(codes) {
            if code.is_error() {
                continue;
            }
            match crate::topic::parse_subscription(filter) {
                Ok((None, f)) => routes.add(home, f),
                // A shared subscription routes to its group's partition.
                Ok((Some(_), f)) => routes.add(self.home(filter), f),
                Err(_) => {}
            }
        }
    }
}

/// A partition's answer that the operation did not expect, as the service's error.
fn reply_error(reply: Reply) -> ServiceError {
    match reply {
        Reply::Fenced => ServiceError::SessionTakenOver,
        Reply::NoSession => ServiceError::NoSession,
        other => ServiceError::Unavailable(format!("unexpected reply {other:?}")),
    }
}

impl<T: Transport> SessionService for Router<T> {
    async fn connect(&self, req: ConnectRequest) -> ServiceResult<Connected> {
        let client_id = req.client_id.clone();
        let command = Command::Connect {
            client_id: req.client_id,
            protocol: req.protocol,
            clean_start: req.clean_start,
            session_expiry_secs: req.session_expiry_secs,
            receive_maximum: req.receive_maximum,
            will: req.will,
            frontend_id: req.frontend_id,
            connection: 0,
        };
        match self
            .transport
            .connect(self.home(&client_id), command)
            .await?
        {
            (
                Reply::Connected {
                    epoch,
                    session_present,
                },
                events,
            ) => Ok(Connected {
                session: SessionRef { client_id, epoch },
                session_present,
                events,
            }),
            (other, _) => Err(reply_error(other)),
        }
    }

    async fn subscribe(
        &self,
        session: &SessionRef,
        subs: Vec<SubscribeRequest>,
    ) -> ServiceResult<Vec<ReasonCode>> {
        let home = self.home(&session.client_id);
        let filters: Vec<String> = subs.iter().map(|s| s.filter.clone()).collect();
        let wait = self.transport.call_partition(
            home,
            Command::Subscribe {
                client_id: session.client_id.clone(),
                epoch: session.epoch,
                subscriptions: subs,
            },
        );
        // From here a publish matching these filters goes to `home` too, behind the SUBSCRIBE
        // in its log, until the partition's own route is in place.
        let pending = self
            .state
            .pending
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
        // A shared subscription's group lives in the partition of its key: join it there.
        update_memberships(
            &self.transport,
            &session.client_id,
            &filters,
            &reason_codes,
            true,
        )
        .await?;
        self.note_own_routes(home, &filters, &reason_codes);
        if self.partition_count() > 1 && !want_retained.is_empty() {
            // Retained messages live in their topic's partition: gather the matching ones
            // from the other partitions and queue them in the session.
            let retained = self.gather_retained(home, want_retained).await?;
            if !retained.is_empty() {
                self.transport
                    .call_partition(
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
        let home = self.home(&session.client_id);
        let reply = self
            .transport
            .call_partition(
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
        update_memberships(&self.transport, &session.client_id, &filters, &codes, false).await?;
        Ok(codes)
    }

    fn publish(
        &self,
        session: &SessionRef,
        message: Message,
        inbound_packet_id: Option<u16>,
    ) -> impl Future<Output = ServiceResult<Published>> + Send + 'static {
        self.submit_publish(session, message, inbound_packet_id)
    }

    fn release(
        &self,
        session: &SessionRef,
        packet_id: u16,
    ) -> impl Future<Output = ServiceResult<bool>> + Send + 'static {
        let wait = self.transport.call_partition(
            self.home(&session.client_id),
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
        let home = self.home(&session.client_id);
        let command = Command::Ack {
            client_id: session.client_id.clone(),
            epoch: session.epoch,
            kind: AckCmd::from(kind),
            packet_id,
        };
        // Nobody waits for PUBACK and PUBCOMP; a PUBREC is answered once durable, and PUBREL
        // waits for that (`SessionService::ack`).
        if kind != AckKind::PubRec {
            self.transport.cast(home, command);
            return futures::future::Either::Left(std::future::ready(Ok(None)));
        }
        let wait = self.transport.call_partition(home, command);
        futures::future::Either::Right(async move {
            match wait.await? {
                Reply::Acked { index } => Ok(Some(index)),
                // A backend of the version before indexes: committed, index unknown.
                Reply::Done => Ok(None),
                other => Err(reply_error(other)),
            }
        })
    }

    async fn disconnect(&self, session: &SessionRef, req: DisconnectRequest) -> ServiceResult<()> {
        let result = self
            .transport
            .call_partition(
                self.home(&session.client_id),
                Command::Disconnect {
                    client_id: session.client_id.clone(),
                    epoch: session.epoch,
                    normal: req.normal,
                    with_will: req.with_will,
                    session_expiry_secs: req.session_expiry_secs,
                },
            )
            .await;
        self.transport.disconnected(session);
        match result? {
            Reply::Done | Reply::Fenced | Reply::NoSession => Ok(()),
            other => Err(reply_error(other)),
        }
    }
}

#[cfg(test)]
mod tests;

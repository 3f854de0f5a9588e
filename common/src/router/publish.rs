//! The publish path: where a message goes, and in which order.
//!
//! A message goes to every partition its topic's routes name (plus the partition of its topic
//! when it is retained). QoS0 is handed over unlogged; QoS1/2 are submitted as `Publish`
//! commands and answered once every target has made them durable.
//!
//! **Inbound QoS2 across partitions** is exactly once because the publisher's own partition
//! (its *home*) records the packet id in the same log entry that delivers the message there,
//! and the other target partitions deduplicate on the token that entry assigns
//! ([`InboundQos2`]). So the home goes first; once its entry is durable, the others get the
//! message with the token. A crash or lost connection in between leaves the id recorded: the
//! client's re-send is answered `duplicate` with the same token and goes to the others again,
//! which deliver it only where they had not.
//!
//! That second stage runs in a **lane**, a task of the publisher's own, not in the
//! connection's future: a connection that goes away cannot stop it half-way (the message in
//! some partitions, not in others). While a lane is open the publisher's later publishes go
//! through it too, so none overtakes the message on any partition (MQTT's ordered topics);
//! the lane still submits the home stage of consecutive QoS2 messages without waiting, and
//! only holds back what must follow a second stage. It closes when it has nothing left, and
//! publishes are submitted at call time again.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::transport::Transport;
use crate::hashing::partition_of;
use crate::partition_api::{merge_published, Command, InboundQos2, Reply};
use crate::session_api::{Published, ServiceError, ServiceResult, SessionRef};
use crate::{Message, QoS};

/// The wait for a publish's answer.
pub type PublishWait = Pin<Box<dyn Future<Output = ServiceResult<Published>> + Send>>;

/// A reply on its way from one partition.
type ReplyWait = Pin<Box<dyn Future<Output = ServiceResult<Reply>> + Send>>;

/// The open lanes: publisher → its lane's queue.
pub(super) type Lanes = Mutex<HashMap<Arc<str>, mpsc::UnboundedSender<LaneJob>>>;

/// One publish, as the router plans it.
pub(super) struct Plan {
    message: Arc<Message>,
    publisher: Option<Arc<str>>,
    retained_home: Option<u32>,
    targets: Vec<u32>,
    inbound: Option<(u32, InboundQos2)>,
}

impl Plan {
    /// Where `message` goes, as the routes say now.
    pub(super) fn new<T: Transport>(
        transport: &T,
        pending: &super::pending::PendingRoutes,
        message: Message,
        publisher: Option<Arc<str>>,
        inbound: Option<(&SessionRef, u16)>,
    ) -> Plan {
        let partitions = transport.partition_count();
        let message = Arc::new(message);
        let retained_home = message
            .retain
            .then(|| partition_of(&message.topic, partitions));
        let mut targets = Vec::new();
        transport
            .routes()
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .targets(&message.topic, Instant::now(), &mut targets);
        pending.for_each_match(&message.topic, |p| {
            if !targets.contains(&p) {
                targets.push(p);
            }
        });
        if let Some(home) = retained_home {
            if !targets.contains(&home) {
                targets.push(home);
            }
        }
        let inbound = inbound.map(|(session, packet_id)| {
            (
                partition_of(&session.client_id, partitions),
                InboundQos2 {
                    client_id: session.client_id.clone(),
                    epoch: session.epoch,
                    packet_id,
                    token: None,
                },
            )
        });
        Plan {
            message,
            publisher,
            retained_home,
            targets,
            inbound,
        }
    }

    pub(super) fn targets(&self) -> &[u32] {
        &self.targets
    }

    /// Whether this publish needs a second stage (inbound QoS2 for partitions besides home).
    pub(super) fn is_two_stage(&self) -> bool {
        self.inbound
            .as_ref()
            .is_some_and(|(home, _)| self.targets.iter().any(|p| p != home))
    }

    fn command(&self, partition: u32, mark: Option<InboundQos2>) -> Command {
        Command::Publish {
            message: self.message.clone(),
            publisher: self.publisher.clone(),
            store_retained: Some(partition) == self.retained_home,
            inbound_qos2: mark,
        }
    }

    /// Submits a one-stage publish now and returns the wait for its answer.
    pub(super) fn submit<T: Transport>(self, transport: &T, logged_qos0: bool) -> PublishWait {
        debug_assert!(!self.is_two_stage());
        let logged =
            self.message.qos != QoS::AtMostOnce || self.retained_home.is_some() || logged_qos0;
        if !logged {
            // QoS0 is neither logged nor acknowledged: handed to each partition in order.
            let publisher = self.publisher.clone().unwrap_or_else(|| Arc::from(""));
            for p in &self.targets {
                transport.publish_qos0(*p, &self.message, &publisher);
            }
            let matched = !self.targets.is_empty();
            return Box::pin(std::future::ready(Ok(Published {
                matched,
                duplicate: false,
                refused: false,
            })));
        }
        let mark = self.inbound.as_ref().map(|(_, m)| m.clone());
        let waits: Vec<ReplyWait> = self
            .targets
            .iter()
            .map(|p| Box::pin(transport.call_partition(*p, self.command(*p, mark.clone()))) as _)
            .collect();
        Box::pin(async move { Ok(collect(waits).await?.0) })
    }

    /// Submits the home stage of a two-stage publish now.
    fn submit_home<T: Transport>(self, transport: &T) -> SecondStage {
        let (home, mark) = self
            .inbound
            .clone()
            .expect("two-stage publishes are inbound");
        let at_home = Box::pin(transport.call_partition(home, self.command(home, Some(mark))));
        SecondStage {
            at_home,
            home,
            plan: self,
        }
    }
}

/// A two-stage publish whose home stage is submitted.
struct SecondStage {
    at_home: ReplyWait,
    home: u32,
    plan: Plan,
}

impl SecondStage {
    /// Given the home's answer, submits the others with its token and returns the wait for
    /// their answers.
    fn finish<T: Transport>(
        home: u32,
        plan: Plan,
        at_home: ServiceResult<Reply>,
        transport: &T,
    ) -> PublishWait {
        let mut answer = Published {
            matched: false,
            duplicate: false,
            refused: false,
        };
        let token = match at_home.and_then(|r| merge(&mut answer, r)) {
            Ok(token) => token,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        let Some(token) = token else {
            let e =
                ServiceError::Unavailable("the publisher's partition gave no QoS2 token".into());
            return Box::pin(std::future::ready(Err(e)));
        };
        let (_, mark) = plan
            .inbound
            .clone()
            .expect("two-stage publishes are inbound");
        let keyed = InboundQos2 {
            token: Some(token),
            ..mark
        };
        let waits: Vec<ReplyWait> = plan
            .targets
            .iter()
            .filter(|p| **p != home)
            .map(|p| {
                let command = plan.command(*p, Some(keyed.clone()));
                Box::pin(transport.call_partition(*p, command)) as _
            })
            .collect();
        Box::pin(async move {
            // The others' `duplicate` (they had the message already) is not the answer's:
            // that is the publisher's own record, from home.
            let (elsewhere, _) = collect(waits).await?;
            answer.matched |= elsewhere.matched;
            answer.refused |= elsewhere.refused;
            Ok(answer)
        })
    }
}

/// Waits for the partitions' answers to one publish and merges them, with the inbound QoS2
/// token they carry (if any).
async fn collect(waits: Vec<ReplyWait>) -> ServiceResult<(Published, Option<u64>)> {
    let mut out = Published {
        matched: false,
        duplicate: false,
        refused: false,
    };
    let mut token = None;
    for wait in waits {
        let carried = merge(&mut out, wait.await?)?;
        token = token.or(carried);
    }
    Ok((out, token))
}

fn merge(out: &mut Published, reply: Reply) -> ServiceResult<Option<u64>> {
    merge_published(out, reply).map_err(super::reply_error)
}

/// A publish waiting in a lane.
pub(super) struct LaneJob {
    pub(super) plan: Plan,
    pub(super) reply: oneshot::Sender<ServiceResult<Published>>,
}

/// One publisher's lane; see the module doc.
pub(super) struct Lane<T> {
    pub(super) transport: T,
    pub(super) lanes: Arc<Lanes>,
    pub(super) open_lanes: Arc<std::sync::atomic::AtomicUsize>,
    pub(super) client_id: Arc<str>,
    pub(super) jobs: mpsc::UnboundedReceiver<LaneJob>,
    pub(super) logged_qos0: bool,
}

impl<T: Transport> Lane<T> {
    /// Runs the lane from its first job (a two-stage publish) until it has nothing left.
    pub(super) async fn run(mut self, first: LaneJob) {
        // Second stages whose home stage is submitted, in the client's order.
        let mut staged: VecDeque<(SecondStage, oneshot::Sender<ServiceResult<Published>>)> =
            VecDeque::new();
        let mut next = Some(first);
        loop {
            let job = match next.take() {
                Some(job) => job,
                None if staged.is_empty() => match self.jobs.try_recv() {
                    Ok(job) => job,
                    Err(_) => {
                        // Closing: under the lock, so a publish either found this lane and
                        // queued here (seen by this `try_recv`), or finds none and is
                        // submitted at call time, after everything here.
                        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
                        match self.jobs.try_recv() {
                            Ok(job) => job,
                            Err(_) => {
                                lanes.remove(&self.client_id);
                                self.open_lanes
                                    .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                                return;
                            }
                        }
                    }
                },
                None => {
                    let woke = {
                        let at_home = &mut staged.front_mut().expect("not empty").0.at_home;
                        tokio::select! {
                            biased;
                            Some(job) = self.jobs.recv() => Woke::Job(job),
                            reply = at_home => Woke::Home(reply),
                        }
                    };
                    match woke {
                        Woke::Job(job) => job,
                        Woke::Home(reply) => {
                            let (stage, tx) = staged.pop_front().expect("not empty");
                            let wait =
                                SecondStage::finish(stage.home, stage.plan, reply, &self.transport);
                            answer(wait, tx);
                            continue;
                        }
                    }
                }
            };
            if job.plan.is_two_stage() {
                // Its home stage goes after the earlier home stages (same partition, call
                // order); its second stage after theirs (the queue's order).
                staged.push_back((job.plan.submit_home(&self.transport), job.reply));
                continue;
            }
            // Anything else may share partitions with the staged second stages: those go
            // first.
            while let Some((stage, tx)) = staged.pop_front() {
                let reply = stage.at_home.await;
                let wait = SecondStage::finish(stage.home, stage.plan, reply, &self.transport);
                answer(wait, tx);
            }
            answer(
                job.plan.submit(&self.transport, self.logged_qos0),
                job.reply,
            );
        }
    }
}

/// What woke a lane that has second stages waiting.
enum Woke {
    Job(LaneJob),
    Home(ServiceResult<Reply>),
}

/// Passes a publish's answer on without holding up the lane.
fn answer(wait: PublishWait, reply: oneshot::Sender<ServiceResult<Published>>) {
    tokio::spawn(async move {
        let _ = reply.send(wait.await);
    });
}

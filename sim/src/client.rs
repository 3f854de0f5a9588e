//! Simulated MQTT clients with persistent sessions, and the frontend's per-connection rules
//! (as `frontend/src/handler/` applies them): publishers that re-send an unacknowledged
//! message with the same packet id after a reconnect, and subscribers that hand a message to
//! their application the way an MQTT client library does (QoS2: once per packet id until
//! PUBREL).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use tiermq_common::hashing::partition_of;
use tiermq_common::partition_api::{AckCmd, Command, InboundQos2, Reply};
use tiermq_common::released_ids::ReleasedIds;
use tiermq_common::session_api::{SessionEvent, SubscribeRequest, SubscriptionOptions, Will};
use tiermq_common::{Message, ProtocolVersion, QoS};
use tokio::sync::{mpsc, Notify};
use tokio::time::sleep;

use crate::frontend::{CallError, Frontend};
use crate::history::{MessageId, WillId};
use crate::plan::{Planted, Publisher, Subscriber, TRAFFIC_START_MS};
use crate::world::World;

/// What every client shares: the world, the frontends, and a way to drop its connection.
#[derive(Clone)]
pub struct Ctx {
    pub world: Arc<World>,
    pub frontends: Vec<Arc<Frontend>>,
}

/// A live connection of a client.
pub(crate) struct Conn {
    pub frontend: Arc<Frontend>,
    pub epoch: u64,
    pub events: mpsc::UnboundedReceiver<SessionEvent>,
    /// Virtual time at which the CONNECT that made it was first sent: the session was
    /// attached to it at some moment after this.
    pub sent_ms: u64,
    /// The CONNECT reached a node more than once: it may have been applied twice, the second
    /// taking over the first as another connection.
    pub resent: bool,
}

/// What a CONNECT asks for besides the client id (all sessions are persistent).
#[derive(Clone)]
pub(crate) struct ConnectArgs {
    pub session_expiry_secs: u32,
    pub will: Option<Will>,
}

impl Default for ConnectArgs {
    fn default() -> Self {
        ConnectArgs {
            session_expiry_secs: u32::MAX,
            will: None,
        }
    }
}

/// What one CONNECT attempt came to ([`Ctx::try_connect`]).
pub(crate) enum Tried {
    Connected(Conn),
    /// No frontend was up: nothing was sent.
    NoFrontend,
    /// Sent, not answered `Connected`: it may still have attached a connection.
    Failed,
}

impl Ctx {
    pub(crate) fn partitions(&self) -> u32 {
        self.world.plan.partitions
    }

    /// Connects `client_id` (persistent session) through its preferred frontend, or any
    /// other that is up. `had_session`: a session must be present (promise 9).
    async fn connect(&self, client_id: &Arc<str>, preferred: usize, had_session: bool) -> Conn {
        self.connect_with(client_id, preferred, had_session, ConnectArgs::default())
            .await
    }

    pub(crate) async fn connect_with(
        &self,
        client_id: &Arc<str>,
        preferred: usize,
        had_session: bool,
        args: ConnectArgs,
    ) -> Conn {
        let mut turn = 0;
        loop {
            if let Tried::Connected(conn) = self
                .try_connect(client_id, preferred, turn, had_session, &args)
                .await
            {
                return conn;
            }
            turn += 1;
        }
    }

    /// One CONNECT attempt, through the first frontend that is up counting from `preferred +
    /// turn` (so each retry tries another one first). After a failure it pauses, as a client
    /// does before it retries.
    pub(crate) async fn try_connect(
        &self,
        client_id: &Arc<str>,
        preferred: usize,
        turn: usize,
        had_session: bool,
        args: &ConnectArgs,
    ) -> Tried {
        let n = self.frontends.len();
        let frontend = (0..n)
            .map(|i| &self.frontends[(preferred + turn + i) % n])
            .find(|f| f.is_up())
            .cloned();
        let Some(frontend) = frontend else {
            sleep(Duration::from_millis(200)).await;
            return Tried::NoFrontend;
        };
        let home = partition_of(client_id, self.partitions());
        let sent_ms = self.world.elapsed_ms();
        let (reply, submitted) = frontend
            .call_counting(
                home,
                Command::Connect {
                    client_id: client_id.clone(),
                    protocol: ProtocolVersion::V5,
                    clean_start: false,
                    session_expiry_secs: args.session_expiry_secs,
                    receive_maximum: 16,
                    will: args.will.clone(),
                    frontend_id: frontend.id(),
                    connection: frontend.next_connection(),
                },
            )
            .await;
        match reply {
            Ok(Reply::Connected {
                epoch,
                session_present,
            }) => {
                if had_session && !session_present {
                    self.world.history().violation(format!(
                        "session lost: {client_id} reconnected (epoch {epoch}) without its session"
                    ));
                }
                let events = frontend.register(client_id, epoch);
                self.world
                    .set_connection(client_id, Some((frontend.slot, epoch)));
                self.world.trace(format!(
                    "{client_id} connected via frontend {} (epoch {epoch}, present {session_present})",
                    frontend.slot
                ));
                Tried::Connected(Conn {
                    frontend,
                    epoch,
                    events,
                    sent_ms,
                    resent: submitted > 1,
                })
            }
            other => {
                self.world
                    .trace(format!("{client_id} connect failed: {other:?}"));
                sleep(Duration::from_millis(100 + self.world.range(0..400))).await;
                Tried::Failed
            }
        }
    }

    /// The connection ended without DISCONNECT (the frontend tells the session, if it lives).
    pub(crate) fn drop_conn(&self, client_id: &Arc<str>, conn: Conn) {
        self.world.set_connection(client_id, None);
        conn.frontend.forget(client_id, conn.epoch);
        if !conn.frontend.is_up() {
            return;
        }
        let home = partition_of(client_id, self.partitions());
        let command = Command::Disconnect {
            client_id: client_id.clone(),
            epoch: conn.epoch,
            normal: false,
            with_will: false,
            session_expiry_secs: None,
        };
        tokio::spawn(async move {
            let _ = conn.frontend.call(home, command).await;
        });
        self.world.trace(format!("{client_id} connection dropped"));
    }
}

/// Publishes `spec.count` messages, one at a time (PUBACK/PUBREC before the next), each
/// re-sent with its packet id across reconnects until acknowledged.
pub async fn run_publisher(ctx: Ctx, spec: Publisher, preferred: usize, kill: Arc<Notify>) {
    let client_id: Arc<str> = Arc::from(spec.client_id.as_str());
    let home = partition_of(&client_id, ctx.partitions());
    sleep(Duration::from_millis(TRAFFIC_START_MS)).await;
    let mut conn = ctx.connect(&client_id, preferred, false).await;
    let mut seq = 1u32;
    // A QoS2 message whose PUBREC arrived: only PUBREL remains.
    let mut released_pending = false;
    // The current message already went out on an earlier connection.
    let mut resend = false;
    while seq <= spec.count {
        if ctx.world.finished() && !released_pending {
            // Stop starting new messages once faults are over and the run is settling:
            // the one in progress (if any) was acknowledged or not, both are checked.
            break;
        }
        let packet_id = (seq % 65_535) as u16 + 1;
        let id = (spec.client_id.clone(), seq);
        let outcome = tokio::select! {
            biased;
            _ = kill.notified() => Err(CallError::FrontendDown),
            r = async {
                if !released_pending {
                    {
                        let mut history = ctx.world.history();
                        if resend {
                            history.resending(&id);
                        }
                        history.sending(ctx.world.elapsed_ms(), &id, &spec.topic, spec.qos);
                    }
                    publish(&ctx, &conn, &client_id, home, &spec, seq, packet_id).await?;
                    ctx.world.history().acked(&id);
                    ctx.world.trace(format!("{}:{seq} acknowledged", spec.client_id));
                }
                if spec.qos == QoS::ExactlyOnce {
                    released_pending = true;
                    // PUBREL → PUBCOMP: forget the packet id on the publisher's partition.
                    match conn
                        .frontend
                        .call(
                            home,
                            Command::Qos2Release {
                                client_id: client_id.clone(),
                                epoch: conn.epoch,
                                packet_id,
                            },
                        )
                        .await?
                    {
                        Reply::Released { .. } => {}
                        _ => return Err(CallError::Deadline),
                    }
                    released_pending = false;
                }
                Ok(())
            } => r,
        };
        match outcome {
            Ok(()) => {
                seq += 1;
                resend = false;
                sleep(Duration::from_millis(spec.gap_ms)).await;
            }
            Err(e) => {
                resend = true;
                ctx.world
                    .trace(format!("{}:{seq} not acknowledged: {e:?}", spec.client_id));
                ctx.drop_conn(&client_id, conn);
                sleep(Duration::from_millis(100 + ctx.world.range(0..300))).await;
                conn = ctx.connect(&client_id, preferred, true).await;
            }
        }
    }
    ctx.world
        .trace(format!("{} done at seq {}", spec.client_id, seq - 1));
}

/// One PUBLISH as the cluster client submits it: QoS1 to every partition at once; QoS2 to the
/// publisher's partition first, then to the others with the token it answered.
async fn publish(
    ctx: &Ctx,
    conn: &Conn,
    client_id: &Arc<str>,
    home: u32,
    spec: &Publisher,
    seq: u32,
    packet_id: u16,
) -> Result<(), CallError> {
    let message = Arc::new(Message::new(
        spec.topic.clone(),
        Bytes::from(format!("{}:{seq}", spec.client_id)),
        spec.qos,
        false,
    ));
    let publish = |mark: Option<InboundQos2>| Command::Publish {
        message: message.clone(),
        publisher: Some(client_id.clone()),
        store_retained: false,
        inbound_qos2: mark,
    };
    // Routing to every partition is what a frontend does for partitions whose routes it does
    // not know: harmless where nobody matches.
    let all: Vec<u32> = (0..ctx.partitions()).collect();
    let others: Vec<u32> = all.iter().copied().filter(|p| *p != home).collect();
    let sends = |targets: &[u32], mark: Option<InboundQos2>| {
        join_all(
            targets
                .iter()
                .map(|p| conn.frontend.call(*p, publish(mark.clone())))
                .collect::<Vec<_>>(),
        )
    };
    let check_all = |replies: Vec<Result<Reply, CallError>>| -> Result<(), CallError> {
        for r in replies {
            match r? {
                Reply::Published { .. } => {}
                _ => return Err(CallError::Deadline),
            }
        }
        Ok(())
    };
    if spec.qos != QoS::ExactlyOnce {
        if ctx.world.plan.planted == Some(Planted::AckBeforeCommit) {
            let frontend = conn.frontend.clone();
            let commands: Vec<_> = all.iter().map(|p| (*p, publish(None))).collect();
            tokio::spawn(async move {
                for (p, command) in commands {
                    let _ = frontend.call(p, command).await;
                }
            });
            sleep(Duration::from_millis(1)).await;
            return Ok(());
        }
        return check_all(sends(&all, None).await);
    }
    // QoS2: the publisher's partition first (it records the packet id and answers the
    // message's token), then the others with that token, which they deduplicate on.
    let mark = InboundQos2 {
        client_id: client_id.clone(),
        epoch: conn.epoch,
        packet_id,
        token: None,
    };
    let token = match conn
        .frontend
        .call(home, publish(Some(mark.clone())))
        .await?
    {
        Reply::Published {
            qos2_token: Some(token),
            ..
        } => token,
        _ => return Err(CallError::Deadline),
    };
    let keyed = InboundQos2 {
        token: Some(token),
        ..mark
    };
    if ctx.world.plan.planted == Some(Planted::NoQos2Key) {
        return check_all(sends(&others, None).await);
    }
    check_all(sends(&others, Some(keyed)).await)
}

/// Subscribes once to `spec.filter` at QoS2 at `spec.at_ms`, then receives until the run ends.
pub async fn run_subscriber(ctx: Ctx, spec: Subscriber, preferred: usize, kill: Arc<Notify>) {
    let client_id: Arc<str> = Arc::from(spec.client_id.as_str());
    let home = partition_of(&client_id, ctx.partitions());
    sleep(Duration::from_millis(spec.at_ms)).await;
    let mut had_session = false;
    let mut subscribed = false;
    // QoS2 packet ids handed to the application and not yet released (PUBREL).
    let mut awaiting_rel: BTreeSet<u16> = BTreeSet::new();
    loop {
        let mut conn = ctx.connect(&client_id, preferred, had_session).await;
        had_session = true;
        if !subscribed {
            subscribed = subscribe(&ctx, &conn, &client_id, home, &spec.filter).await;
            if !subscribed {
                ctx.drop_conn(&client_id, conn);
                continue;
            }
        }
        // Acks go out in order on the connection, as on the real ordered pipe.
        let (acks, ack_rx) = mpsc::unbounded_channel();
        let (released, mut released_rx) = mpsc::unbounded_channel();
        // Per connection, as the handler keeps it (`Handler::released`): the same rule.
        let mut released_ids = ReleasedIds::new();
        let (pubcomp_tx, mut pubcomp_rx) = mpsc::unbounded_channel();
        let acker = tokio::spawn(send_acks(
            ctx.world.clone(),
            conn.frontend.clone(),
            client_id.clone(),
            conn.epoch,
            home,
            ack_rx,
            released,
        ));
        let ended = loop {
            let event = tokio::select! {
                biased;
                _ = kill.notified() => break true,
                Some((packet_id, index)) = released_rx.recv() => {
                    // The PUBREC is durable, applied at `index`: PUBREL goes out
                    // (`Handler::on_pubrec_durable`).
                    released_ids.pubrec_applied(packet_id, index);
                    Some(SessionEvent::Release { packet_id })
                }
                Some(packet_id) = pubcomp_rx.recv() => {
                    // PUBCOMP: the handler notes the exchange done and acks it to the session.
                    released_ids.pubcomp(packet_id);
                    let _ = acks.send(AckJob::Plain(AckCmd::PubComp, packet_id));
                    continue;
                }
                e = conn.events.recv() => e,
            };
            let Some(event) = event else { break true };
            match event {
                SessionEvent::Deliver(d) => {
                    let text = String::from_utf8_lossy(&d.message.payload).to_string();
                    let Some(payload) = Payload::parse(&text) else {
                        ctx.world
                            .history()
                            .violation(format!("{client_id} got a foreign payload {text:?}"));
                        continue;
                    };
                    ctx.world.trace(format!(
                        "{client_id} <- {text} {:?} id {:?}{}",
                        d.qos,
                        d.packet_id,
                        if d.dup { " dup" } else { "" }
                    ));
                    let Some(packet_id) = d.packet_id else {
                        payload.record(&ctx.world, &client_id, d.qos, d.packet_id);
                        continue;
                    };
                    // The handler drops a QoS2 re-send for an id whose PUBREC was applied after
                    // the delivery was computed (`Handler::released`): a stale replay.
                    if d.qos == QoS::ExactlyOnce && released_ids.is_stale(packet_id, d.index) {
                        ctx.world.trace(format!(
                            "{client_id}: stale re-send of id {packet_id} (index {:?}) dropped",
                            d.index
                        ));
                        continue;
                    }
                    match d.qos {
                        QoS::ExactlyOnce => {
                            if awaiting_rel.insert(packet_id) {
                                payload.record(&ctx.world, &client_id, d.qos, d.packet_id);
                            }
                            // PUBREC: the frontend sends PUBREL once the PUBREC is durable
                            // (issue 19, bug 3), and the client answers PUBCOMP.
                            let _ = acks.send(AckJob::PubRec(packet_id));
                            if ctx.world.plan.planted == Some(Planted::EarlyPubrel) {
                                awaiting_rel.remove(&packet_id);
                                let _ = acks.send(AckJob::Plain(AckCmd::PubComp, packet_id));
                            }
                        }
                        _ => {
                            payload.record(&ctx.world, &client_id, d.qos, d.packet_id);
                            let _ = acks.send(AckJob::Plain(AckCmd::PubAck, packet_id));
                        }
                    }
                }
                SessionEvent::Release { packet_id } => {
                    ctx.world
                        .trace(format!("{client_id} <- PUBREL id {packet_id}"));
                    awaiting_rel.remove(&packet_id);
                    // The client's PUBCOMP reaches the frontend a network hop later.
                    let pubcomp = pubcomp_tx.clone();
                    let delay = ctx.world.delay();
                    tokio::spawn(async move {
                        sleep(delay).await;
                        let _ = pubcomp.send(packet_id);
                    });
                }
                SessionEvent::Disconnect { reason } => {
                    ctx.world.trace(format!(
                        "{client_id} disconnected by the server: {reason:?}"
                    ));
                    break false;
                }
            }
        };
        drop(acks);
        acker.abort();
        if ended {
            ctx.drop_conn(&client_id, conn);
        } else {
            ctx.world.set_connection(&client_id, None);
            conn.frontend.forget(&client_id, conn.epoch);
        }
        sleep(Duration::from_millis(50 + ctx.world.range(0..300))).await;
    }
}

/// SUBSCRIBE `filter` at QoS2; whether the SUBACK came (recorded in the history).
async fn subscribe(ctx: &Ctx, conn: &Conn, client_id: &Arc<str>, home: u32, filter: &str) -> bool {
    let command = Command::Subscribe {
        client_id: client_id.clone(),
        epoch: conn.epoch,
        subscriptions: vec![SubscribeRequest {
            filter: filter.into(),
            options: SubscriptionOptions {
                qos: QoS::ExactlyOnce,
                ..Default::default()
            },
            subscription_id: None,
        }],
    };
    if ctx.world.plan.planted == Some(Planted::LateSubscribeRoute) {
        // The planted bug: SUBACK before the partition applied the subscription.
        let frontend = conn.frontend.clone();
        tokio::spawn(async move {
            let _ = frontend.call(home, command).await;
        });
    } else {
        match conn.frontend.call(home, command).await {
            Ok(Reply::Subscribed { .. }) => {}
            _ => return false,
        }
    }
    ctx.world
        .history()
        .subscribed(ctx.world.elapsed_ms(), client_id, filter);
    ctx.world.trace(format!("{client_id} subscribed {filter}"));
    true
}

/// What a delivered payload names: a publisher's message or a will client's will.
enum Payload {
    Message(MessageId),
    Will(WillId),
}

impl Payload {
    fn parse(text: &str) -> Option<Payload> {
        if let Some(will) = WillId::parse(text) {
            return Some(Payload::Will(will));
        }
        let (publisher, seq) = text.rsplit_once(':')?;
        Some(Payload::Message((publisher.to_string(), seq.parse().ok()?)))
    }

    /// Handed to the subscriber's application.
    fn record(&self, world: &World, subscriber: &str, qos: QoS, packet_id: Option<u16>) {
        let mut history = world.history();
        match self {
            Payload::Message(id) => history.delivered(subscriber, id.clone(), qos, packet_id),
            Payload::Will(id) => history.will_delivered(subscriber, id.clone(), qos, packet_id),
        }
    }
}

/// An acknowledgement from the client, as the frontend forwards it to the session.
#[derive(Debug, Clone, Copy)]
enum AckJob {
    Plain(AckCmd, u16),
    /// PUBREC: once it is durable, PUBREL goes to the client.
    PubRec(u16),
}

async fn send_acks(
    world: Arc<World>,
    frontend: Arc<Frontend>,
    client_id: Arc<str>,
    epoch: u64,
    home: u32,
    mut acks: mpsc::UnboundedReceiver<AckJob>,
    released: mpsc::UnboundedSender<(u16, Option<u64>)>,
) {
    while let Some(job) = acks.recv().await {
        let (kind, packet_id) = match job {
            AckJob::Plain(kind, packet_id) => (kind, packet_id),
            AckJob::PubRec(packet_id) => (AckCmd::PubRec, packet_id),
        };
        let reply = frontend
            .call(
                home,
                Command::Ack {
                    client_id: client_id.clone(),
                    epoch,
                    kind,
                    packet_id,
                },
            )
            .await;
        let durable = match reply {
            Ok(Reply::Acked { index }) => Some(index),
            _ => None,
        };
        if let (Some(index), AckJob::PubRec(_)) = (durable, job) {
            let _ = released.send((packet_id, Some(index)));
        }
        if durable.is_none() {
            world.trace(format!(
                "{client_id} ack {kind:?} id {packet_id} (epoch {epoch}): {reply:?}"
            ));
        }
    }
}

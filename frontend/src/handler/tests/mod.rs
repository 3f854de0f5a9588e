//! The connection handler against [`FakeSessions`], a session service the test scripts: it
//! records every call, answers what the test queued (or a default), can hold an answer until
//! the test releases it, and pushes the events the test chooses into the connection. The
//! client is a `Framed` codec over an in-memory duplex; no sockets, and time is paused
//! (`start_paused`), so waiting for "nothing happens" costs no wall time.
//!
//! One file per packet family, as the handler's own files are.

mod close;
mod connect;
mod delivery;
mod publish;
mod subscribe;

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tiermq_common::codec::{
    Connect, ConnectProperties, LastWill, MqttCodec, Packet, Publish, PublishProperties,
};
use tiermq_common::session_api::{
    AckKind, ConnectRequest, Connected, Delivery, DisconnectRequest, Published, ServiceError,
    ServiceResult, SessionEvent, SessionRef, SessionService, SubscribeRequest,
};
use tiermq_common::{Message, ProtocolVersion, QoS, ReasonCode};
use tokio::io::DuplexStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use super::serve_connection;
use crate::config::FrontendConfig;
use crate::listener::ConnectionInfo;

/// How long a test waits for a packet that must come.
const PATIENCE: Duration = Duration::from_secs(5);
/// How long "nothing arrives" is watched (virtual time).
const QUIET: Duration = Duration::from_millis(200);

/// One call the handler made to the session service.
#[derive(Debug, Clone)]
pub(super) enum Call {
    Connect(ConnectRequest),
    Subscribe(Vec<SubscribeRequest>),
    Unsubscribe(Vec<String>),
    Publish {
        message: Message,
        inbound_packet_id: Option<u16>,
    },
    Release(u16),
    Ack(AckKind, u16),
    Disconnect(DisconnectRequest),
}

/// The answers to one kind of call: the queued ones in order, then a default. While held,
/// each call waits for an answer the test gives with [`Replies::release`], oldest first; an
/// answer never given leaves the call pending (as a partition that never answers).
pub(super) struct Replies<T>(Mutex<RepliesState<T>>);

struct RepliesState<T> {
    queued: VecDeque<T>,
    hold: bool,
    held: VecDeque<oneshot::Sender<T>>,
}

impl<T> Default for Replies<T> {
    fn default() -> Self {
        Replies(Mutex::new(RepliesState {
            queued: VecDeque::new(),
            hold: false,
            held: VecDeque::new(),
        }))
    }
}

impl<T: Send + 'static> Replies<T> {
    /// The next call gets `answer` (calls answered at once; see [`Self::hold`]).
    pub(super) fn queue(&self, answer: T) {
        self.0.lock().unwrap().queued.push_back(answer);
    }

    /// From now on calls wait for [`Self::release`].
    pub(super) fn hold(&self) {
        self.0.lock().unwrap().hold = true;
    }

    /// Answers the oldest held call.
    pub(super) fn release(&self, answer: T) {
        let tx = self.0.lock().unwrap().held.pop_front();
        let _ = tx.expect("no call is held").send(answer);
    }

    /// Answers the newest held call (out of order).
    pub(super) fn release_newest(&self, answer: T) {
        let tx = self.0.lock().unwrap().held.pop_back();
        let _ = tx.expect("no call is held").send(answer);
    }

    /// How many calls wait for an answer.
    pub(super) fn held(&self) -> usize {
        self.0.lock().unwrap().held.len()
    }

    /// The answer to one call, given now (queued or `default`) or later (held).
    fn reply(&self, default: impl FnOnce() -> T) -> impl Future<Output = T> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let mut state = self.0.lock().unwrap();
        if state.hold {
            state.held.push_back(tx);
        } else {
            let answer = state.queued.pop_front().unwrap_or_else(default);
            let _ = tx.send(answer);
        }
        async move {
            match rx.await {
                Ok(answer) => answer,
                Err(_) => std::future::pending().await,
            }
        }
    }
}

/// A session service whose answers and events the test scripts; it records every call.
#[derive(Default)]
pub(super) struct FakeSessions {
    calls: Mutex<Vec<Call>>,
    events: Mutex<Option<mpsc::UnboundedSender<SessionEvent>>>,
    /// `Ok(session_present)`; default `Ok(false)`.
    pub(super) connect: Replies<ServiceResult<bool>>,
    /// Default: each filter granted the QoS it asked for.
    pub(super) subscribe: Replies<ServiceResult<Vec<ReasonCode>>>,
    /// Default: 0x00 for each filter.
    pub(super) unsubscribe: Replies<ServiceResult<Vec<ReasonCode>>>,
    /// Default: matched, not a duplicate, not refused.
    pub(super) publish: Replies<ServiceResult<Published>>,
    /// Default: `Ok(true)` (the packet id was known).
    pub(super) release: Replies<ServiceResult<bool>>,
    /// The answer to a PUBREC ack (its log index); default `Ok(None)`. PUBACK and PUBCOMP
    /// acks are answered `Ok(None)` at once.
    pub(super) pubrec: Replies<ServiceResult<Option<u64>>>,
    /// Events pushed into the connection while a SUBSCRIBE is being answered (before its
    /// answer): what a retained message on subscribe does.
    pub(super) on_subscribe: Mutex<Vec<SessionEvent>>,
}

impl FakeSessions {
    pub(super) fn new() -> Arc<FakeSessions> {
        Arc::new(FakeSessions::default())
    }

    /// Pushes an event into the connection, as a partition does.
    pub(super) fn send(&self, event: SessionEvent) {
        let events = self.events.lock().unwrap();
        events.as_ref().expect("connected").send(event).unwrap();
    }

    /// Drops the event channel, as a service that lost the session does.
    pub(super) fn close_events(&self) {
        self.events.lock().unwrap().take();
    }

    pub(super) fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    pub(super) fn connects(&self) -> Vec<ConnectRequest> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Connect(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    pub(super) fn subscribes(&self) -> Vec<Vec<SubscribeRequest>> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Subscribe(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    /// The messages published, with their inbound QoS2 packet ids.
    pub(super) fn publishes(&self) -> Vec<(Message, Option<u16>)> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Publish {
                    message,
                    inbound_packet_id,
                } => Some((message, inbound_packet_id)),
                _ => None,
            })
            .collect()
    }

    pub(super) fn releases(&self) -> Vec<u16> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Release(pid) => Some(pid),
                _ => None,
            })
            .collect()
    }

    pub(super) fn acks(&self) -> Vec<(AckKind, u16)> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Ack(kind, pid) => Some((kind, pid)),
                _ => None,
            })
            .collect()
    }

    pub(super) fn disconnects(&self) -> Vec<DisconnectRequest> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Disconnect(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    fn record(&self, call: Call) {
        self.calls.lock().unwrap().push(call);
    }
}

/// The session of every connection to a [`FakeSessions`].
fn session(client_id: Arc<str>) -> SessionRef {
    SessionRef {
        client_id,
        epoch: 7,
    }
}

impl SessionService for FakeSessions {
    async fn connect(&self, req: ConnectRequest) -> ServiceResult<Connected> {
        let client_id = req.client_id.clone();
        self.record(Call::Connect(req));
        let session_present = self.connect.reply(|| Ok(false)).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        *self.events.lock().unwrap() = Some(tx);
        Ok(Connected {
            session: session(client_id),
            session_present,
            events: rx,
        })
    }

    async fn subscribe(
        &self,
        _session: &SessionRef,
        subs: Vec<SubscribeRequest>,
    ) -> ServiceResult<Vec<ReasonCode>> {
        let granted = subs
            .iter()
            .map(|s| ReasonCode(s.options.qos.as_u8()))
            .collect();
        self.record(Call::Subscribe(subs));
        let answer = self.subscribe.reply(|| Ok(granted));
        for event in self.on_subscribe.lock().unwrap().drain(..) {
            self.send(event);
        }
        answer.await
    }

    async fn unsubscribe(
        &self,
        _session: &SessionRef,
        filters: Vec<String>,
    ) -> ServiceResult<Vec<ReasonCode>> {
        let done = vec![ReasonCode::SUCCESS; filters.len()];
        self.record(Call::Unsubscribe(filters));
        self.unsubscribe.reply(|| Ok(done)).await
    }

    fn publish(
        &self,
        _session: &SessionRef,
        message: Message,
        inbound_packet_id: Option<u16>,
    ) -> impl Future<Output = ServiceResult<Published>> + Send + 'static {
        self.record(Call::Publish {
            message,
            inbound_packet_id,
        });
        self.publish.reply(|| {
            Ok(Published {
                matched: true,
                duplicate: false,
                refused: false,
            })
        })
    }

    fn release(
        &self,
        _session: &SessionRef,
        packet_id: u16,
    ) -> impl Future<Output = ServiceResult<bool>> + Send + 'static {
        self.record(Call::Release(packet_id));
        self.release.reply(|| Ok(true))
    }

    fn ack(
        &self,
        _session: &SessionRef,
        kind: AckKind,
        packet_id: u16,
    ) -> impl Future<Output = ServiceResult<Option<u64>>> + Send + 'static {
        self.record(Call::Ack(kind, packet_id));
        let pubrec = (kind == AckKind::PubRec).then(|| self.pubrec.reply(|| Ok(None)));
        async move {
            match pubrec {
                Some(answer) => answer.await,
                None => Ok(None),
            }
        }
    }

    async fn disconnect(&self, _session: &SessionRef, req: DisconnectRequest) -> ServiceResult<()> {
        self.record(Call::Disconnect(req));
        Ok(())
    }
}

/// The client end of one connection served by [`serve_connection`] in its own task.
pub(super) struct Client {
    framed: Framed<DuplexStream, MqttCodec>,
    task: JoinHandle<()>,
    pub(super) shutdown: CancellationToken,
}

impl Client {
    /// Opens a connection (nothing sent yet).
    pub(super) fn open(service: &Arc<FakeSessions>, config: FrontendConfig) -> Client {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve_connection(
            server,
            ConnectionInfo::tcp("127.0.0.1:1883".parse().unwrap()),
            service.clone(),
            Arc::new(config),
            shutdown.clone(),
        ));
        Client {
            framed: Framed::new(client, MqttCodec::default()),
            task,
            shutdown,
        }
    }

    /// Sends CONNECT and expects CONNACK 0x00; returns whether it said Session Present.
    pub(super) async fn handshake(&mut self, connect: Connect) -> bool {
        self.send(Packet::Connect(connect)).await;
        match self.recv().await {
            Packet::ConnAck(a) => {
                assert_eq!(a.reason_code, ReasonCode::SUCCESS, "CONNACK");
                a.session_present
            }
            p => panic!("expected CONNACK, got {p:?}"),
        }
    }

    pub(super) async fn send(&mut self, packet: Packet) {
        self.framed
            .send(&packet)
            .await
            .expect("the connection takes the packet");
    }

    /// Sends bytes our encoder refuses to produce (a packet the server must refuse).
    pub(super) async fn send_raw(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        let io = self.framed.get_mut();
        io.write_all(bytes)
            .await
            .expect("the connection takes the bytes");
    }

    /// The next packet from the server, [`brief`]ly.
    pub(super) async fn recv_brief(&mut self) -> String {
        brief(&self.recv().await)
    }

    /// The next packet from the server (within [`PATIENCE`]).
    pub(super) async fn recv(&mut self) -> Packet {
        tokio::time::timeout(PATIENCE, self.framed.next())
            .await
            .expect("a packet in time")
            .expect("connection open")
            .expect("a well-formed packet")
    }

    /// Nothing arrives for a while.
    pub(super) async fn quiet(&mut self) {
        if let Ok(p) = tokio::time::timeout(QUIET, self.framed.next()).await {
            panic!("expected nothing, got {p:?}");
        }
    }

    /// PINGREQ → PINGRESP: every packet sent before has been handled (in order), and every
    /// call it makes to the service was made.
    pub(super) async fn ping(&mut self) {
        self.send(Packet::PingReq).await;
        match self.recv().await {
            Packet::PingResp => {}
            p => panic!("expected PINGRESP, got {p:?}"),
        }
    }

    /// The server closes the connection (after the packets it still had for us, returned);
    /// its task ends.
    pub(super) async fn closed(mut self) -> Vec<Packet> {
        let mut last = Vec::new();
        loop {
            match tokio::time::timeout(PATIENCE, self.framed.next()).await {
                Ok(Some(Ok(p))) => last.push(p),
                Ok(None) | Ok(Some(Err(_))) => break,
                Err(_) => panic!("the connection stayed open; received {last:?}"),
            }
        }
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("the connection task ends")
            .expect("the connection task does not panic");
        last
    }

    /// [`Self::closed`], the packets [`brief`]ly.
    pub(super) async fn closed_brief(self) -> Vec<String> {
        self.closed().await.iter().map(brief).collect()
    }

    /// Closes the client's end without DISCONNECT; returns the connection's task.
    pub(super) fn hang_up(self) -> JoinHandle<()> {
        drop(self.framed);
        self.task
    }
}

/// Waits (virtual time) until `done` holds: for calls the handler makes from a future it
/// polls, which a PINGREQ does not order.
pub(super) async fn eventually(done: impl Fn() -> bool) {
    for _ in 0..1000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("not within a second");
}

/// A CONNECT of `version` with Clean Start and no keep alive.
pub(super) fn connect_packet(version: ProtocolVersion, client_id: &str) -> Connect {
    Connect {
        protocol: version,
        clean_start: true,
        keep_alive: 0,
        client_id: client_id.into(),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties::default(),
    }
}

/// A will on `topic`.
pub(super) fn will(topic: &str, payload: &'static str) -> LastWill {
    LastWill {
        topic: topic.into(),
        payload: payload.into(),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Default::default(),
    }
}

/// A connected client of `version` (default config).
pub(super) async fn connected(service: &Arc<FakeSessions>, version: ProtocolVersion) -> Client {
    connected_with(service, version, FrontendConfig::default()).await
}

pub(super) async fn connected_with(
    service: &Arc<FakeSessions>,
    version: ProtocolVersion,
    config: FrontendConfig,
) -> Client {
    let mut client = Client::open(service, config);
    client.handshake(connect_packet(version, "c1")).await;
    client
}

/// A PUBLISH from the client.
pub(super) fn publish(
    topic: &str,
    qos: QoS,
    packet_id: Option<u16>,
    payload: &'static str,
) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id,
        properties: PublishProperties::default(),
        payload: payload.into(),
    })
}

/// A delivery of `payload` on topic `t` at `qos` with `packet_id`.
pub(super) fn delivery(qos: QoS, packet_id: Option<u16>, payload: &'static str) -> SessionEvent {
    SessionEvent::Deliver(Delivery {
        packet_id,
        qos,
        retain: false,
        dup: false,
        subscription_ids: Vec::new(),
        expiry_secs: None,
        message: Arc::new(Message::new("t", payload, qos, false)),
        index: None,
    })
}

/// What the tests compare of a packet: its name, packet id and reason code, as in
/// "PUBACK 1 0x00", "PUBLISH 3", "DISCONNECT 0x8E", "PINGRESP".
pub(super) fn brief(p: &Packet) -> String {
    let (id, code) = match p {
        Packet::PubAck(a) => (Some(a.packet_id), Some(a.reason_code)),
        Packet::PubRec(a) => (Some(a.packet_id), Some(a.reason_code)),
        Packet::PubRel(a) => (Some(a.packet_id), Some(a.reason_code)),
        Packet::PubComp(a) => (Some(a.packet_id), Some(a.reason_code)),
        Packet::Disconnect(d) => (None, Some(d.reason_code)),
        Packet::ConnAck(a) => (None, Some(a.reason_code)),
        Packet::Publish(p) => (p.packet_id, None),
        Packet::SubAck(a) => (Some(a.packet_id), None),
        Packet::UnsubAck(a) => (Some(a.packet_id), None),
        _ => (None, None),
    };
    let mut out = p.name().to_string();
    if let Some(id) = id {
        out += &format!(" {id}");
    }
    if let Some(code) = code {
        out += &format!(" {code}");
    }
    out
}

/// The service error every "the partitions failed" test uses.
pub(super) fn unavailable() -> ServiceError {
    ServiceError::Unavailable("scripted".into())
}

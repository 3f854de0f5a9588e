//! The narrow interface between the two tiers.
//!
//! A frontend terminates MQTT connections and owns only per-connection state (the socket, topic
//! aliases, keep alive). Everything that must outlive a connection — sessions, subscriptions,
//! queues, retained messages, wills — belongs to the partitions. The frontend reaches them only
//! through [`SessionService`]: the standalone broker implements it with in-process partitions,
//! the cluster with a gRPC client. The MQTT connection handler is therefore written once.
//!
//! Every session-scoped call carries a [`SessionRef`] (client id + epoch). The epoch fences
//! takeover: once a newer connection for the same client id has connected, calls made with the
//! old epoch are refused with [`ServiceError::SessionTakenOver`].

use std::future::Future;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::message::Message;
use crate::types::{ProtocolVersion, QoS, ReasonCode};

/// Frontend ids from here up belong to the backends' own cluster clients (wills, shared
/// subscription steps): `INTERNAL_FRONTEND_IDS + node id`. They hold no MQTT connections.
pub const INTERNAL_FRONTEND_IDS: u64 = u64::MAX - 0xFFFF;

/// Whether `frontend_id` is a backend's own cluster client rather than a frontend.
pub fn is_internal_frontend(frontend_id: u64) -> bool {
    frontend_id >= INTERNAL_FRONTEND_IDS
}

/// A connected session as the partitions know it: client id plus the epoch of the connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionRef {
    pub client_id: Arc<str>,
    pub epoch: u64,
}

/// A will message registered at CONNECT (§3.1.3.2).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Will {
    pub message: Message,
    /// Will Delay Interval in seconds (v5); 0 fires at once.
    pub delay_secs: u32,
}

/// What a frontend asks for when a client CONNECTs.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    pub client_id: Arc<str>,
    pub protocol: ProtocolVersion,
    pub clean_start: bool,
    /// Session Expiry Interval in seconds. `u32::MAX` never expires (v3.1.1 clean session = 0).
    pub session_expiry_secs: u32,
    /// The client's Receive Maximum: how many QoS1/QoS2 deliveries may be unacknowledged.
    pub receive_maximum: u16,
    pub will: Option<Will>,
    /// The frontend node that holds the connection (0 for standalone).
    pub frontend_id: u64,
}

/// The answer to [`ConnectRequest`].
#[derive(Debug)]
pub struct Connected {
    pub session: SessionRef,
    pub session_present: bool,
    /// Events for this connection: deliveries, PUBREL resends and server-side disconnects.
    pub events: mpsc::UnboundedReceiver<SessionEvent>,
}

/// A subscription request for one filter (§3.8.3.1).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SubscribeRequest {
    /// The filter as the client sent it, `$share/<group>/` prefix included.
    pub filter: String,
    pub options: SubscriptionOptions,
    pub subscription_id: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct SubscriptionOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0: send retained on subscribe, 1: only if the subscription is new, 2: never.
    pub retain_handling: u8,
}

/// A message handed to a connection for delivery.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Delivery {
    /// Present for QoS1/QoS2: assigned by the session's partition and stable across reconnects.
    pub packet_id: Option<u16>,
    /// Granted QoS: the minimum of the message's and the subscription's.
    pub qos: QoS,
    /// Retain flag as it must go on the wire (Retain As Published, or set for retained
    /// messages sent because of a subscribe).
    pub retain: bool,
    pub dup: bool,
    pub subscription_ids: Vec<u32>,
    /// Message Expiry Interval left, in seconds, if the message has one.
    pub expiry_secs: Option<u32>,
    pub message: Arc<Message>,
    /// The log index of the session's partition at which this delivery was computed: the
    /// index of the applied entry whose effect it is, or the applied index a new leader's
    /// replay was computed from. The connection compares it with the index at which a PUBREC
    /// was applied to drop a stale replay ([`crate::released_ids`]). `None` when unknown.
    /// Not in the event's encoding: the cluster carries it beside the event
    /// (`SessionEventMsg.index`), so the encoding stays the one older nodes speak.
    #[serde(skip)]
    pub index: Option<u64>,
}

/// What the partitions push to a connection.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SessionEvent {
    Deliver(Delivery),
    /// Re-send PUBREL for an outbound QoS2 message whose PUBREC arrived before a reconnect.
    Release {
        packet_id: u16,
    },
    /// The server closes this connection, e.g. 0x8E Session taken over.
    Disconnect {
        reason: ReasonCode,
    },
}

/// How a connection ended, as the session engine needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DisconnectRequest {
    /// A DISCONNECT packet with reason 0x00 was received: the will is discarded.
    pub normal: bool,
    /// DISCONNECT 0x04: close normally but publish the will.
    pub with_will: bool,
    /// The Session Expiry Interval sent in DISCONNECT, if any (§3.14.2.2.2).
    pub session_expiry_secs: Option<u32>,
}

impl DisconnectRequest {
    /// The network connection closed without DISCONNECT (or keep alive expired).
    pub const ABNORMAL: DisconnectRequest = DisconnectRequest {
        normal: false,
        with_will: false,
        session_expiry_secs: None,
    };
}

/// Which acknowledgement a client sent for a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    /// PUBACK for a QoS1 delivery.
    PubAck,
    /// PUBREC for a QoS2 delivery: the message is now "released" and PUBREL follows.
    PubRec,
    /// PUBCOMP for a QoS2 delivery: done.
    PubComp,
}

/// The outcome of a publish, once it is durable where it must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// At least one subscription matched (v5 may answer 0x10 No matching subscribers).
    pub matched: bool,
    /// For inbound QoS2: this packet id was already received and not yet released; the
    /// message was not forwarded again.
    pub duplicate: bool,
    /// A subscriber's queue was full and refused the message (v5: 0x97 Quota exceeded).
    pub refused: bool,
}

/// Why a call to the partitions failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("session taken over by a newer connection")]
    SessionTakenOver,
    #[error("no session for this client")]
    NoSession,
    #[error("quota exceeded: {0}")]
    QuotaExceeded(&'static str),
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    #[error("server shutting down")]
    ShuttingDown,
}

impl ServiceError {
    /// The v5 reason code a frontend sends when a call fails this way.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            ServiceError::SessionTakenOver => ReasonCode::SESSION_TAKEN_OVER,
            ServiceError::NoSession => ReasonCode::UNSPECIFIED_ERROR,
            ServiceError::QuotaExceeded(_) => ReasonCode::QUOTA_EXCEEDED,
            ServiceError::Unavailable(_) => ReasonCode::SERVER_UNAVAILABLE,
            ServiceError::ShuttingDown => ReasonCode::SERVER_SHUTTING_DOWN,
        }
    }
}

pub type ServiceResult<T> = Result<T, ServiceError>;

/// Everything a frontend may ask of the partitions. Implementations: the standalone in-process
/// broker (`tiermq-backend`) and the cluster's gRPC client.
///
/// Futures resolve when the operation is durable where MQTT requires it: `publish` of a QoS1/2
/// message only after every target partition committed it (flushed in standalone, quorum in the
/// cluster), so the PUBACK/PUBREC the frontend sends afterwards is a promise.
pub trait SessionService: Send + Sync + 'static {
    fn connect(&self, req: ConnectRequest)
        -> impl Future<Output = ServiceResult<Connected>> + Send;

    fn subscribe(
        &self,
        session: &SessionRef,
        subs: Vec<SubscribeRequest>,
    ) -> impl Future<Output = ServiceResult<Vec<ReasonCode>>> + Send;

    fn unsubscribe(
        &self,
        session: &SessionRef,
        filters: Vec<String>,
    ) -> impl Future<Output = ServiceResult<Vec<ReasonCode>>> + Send;

    /// Publishes `message`. For an inbound QoS2 message pass its packet id: the session
    /// remembers it until [`SessionService::release`], so a re-sent PUBLISH is not forwarded twice.
    ///
    /// The request is *submitted when `publish` is called*, not when the future is first polled,
    /// and the future owns what it needs (`'static`): a connection keeps many publishes in
    /// flight (pipelining, one PUBACK per fsync batch) and they still reach the partitions in
    /// the order the client sent them.
    fn publish(
        &self,
        session: &SessionRef,
        message: Message,
        inbound_packet_id: Option<u16>,
    ) -> impl Future<Output = ServiceResult<Published>> + Send + 'static;

    /// PUBREL from the client for an inbound QoS2 packet id. Returns whether it was known.
    /// Submitted at call time, like [`SessionService::publish`].
    fn release(
        &self,
        session: &SessionRef,
        packet_id: u16,
    ) -> impl Future<Output = ServiceResult<bool>> + Send + 'static;

    /// PUBACK / PUBREC / PUBCOMP from the client for a delivery. Submitted at call time.
    ///
    /// PUBACK and PUBCOMP need no durability (a lost one means a redelivery MQTT allows, or a
    /// PUBREL the client answers again): their futures may be dropped. A PUBREC's future
    /// resolves only when the ack is durable (flushed standalone, committed in the cluster),
    /// and PUBREL must wait for it: after PUBCOMP the client forgets the packet id, so a
    /// PUBREC lost in a crash would make the session re-send the PUBLISH, which the client
    /// would take for a new message — a QoS2 message delivered twice.
    ///
    /// A PUBREC's answer is the log index of the session's partition at which it was applied
    /// (`None` when unknown; always `None` for PUBACK and PUBCOMP): a delivery of that packet
    /// id computed at a lower index is a stale replay ([`crate::released_ids`]).
    fn ack(
        &self,
        session: &SessionRef,
        kind: AckKind,
        packet_id: u16,
    ) -> impl Future<Output = ServiceResult<Option<u64>>> + Send + 'static;

    fn disconnect(
        &self,
        session: &SessionRef,
        req: DisconnectRequest,
    ) -> impl Future<Output = ServiceResult<()>> + Send;
}

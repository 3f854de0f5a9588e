//! The MQTT protocol for one connection, from CONNECT to close.
//!
//! The handler owns the socket and the state that dies with the connection: the negotiated
//! protocol version, inbound topic aliases, keep alive, and the publishes waiting for the
//! partitions to make them durable. Session state lives behind [`SessionService`].
//!
//! One task per connection runs [`Handler::run`], a `select!` over four sources: packets from
//! the client, events from the session (deliveries, takeover), acknowledgements of our own
//! publishes becoming durable (in the order the client sent them, §4.6), and timers (keep
//! alive, shutdown). Writes are fed into the codec's buffer and flushed once per wake-up, so a
//! burst of deliveries costs one syscall.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use futures::stream::FuturesOrdered;
use futures::{Future, SinkExt, StreamExt};
use tiermq_common::codec::{
    Auth, ConnAck, ConnAckProperties, Connect, DecodeError, Disconnect, EncodeError, MqttCodec,
    Packet, PubAck, PubComp, PubRec, PubRel, Publish, ReasonSet, SubAck, Subscribe, UnsubAck,
    Unsubscribe,
};
use tiermq_common::released_ids::ReleasedIds;
use tiermq_common::session_api::{
    AckKind, ConnectRequest, Delivery, DisconnectRequest, Published, ServiceError, ServiceResult,
    SessionEvent, SessionRef, SessionService, SubscribeRequest, SubscriptionOptions,
};
use tiermq_common::{topic, ProtocolVersion, QoS, ReasonCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tokio_util::codec::{Encoder, Framed};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, trace};

use crate::acl::{Access, AclView};
use crate::alias::{AliasUse, OutboundAliases};
use crate::auth::{failure_code, AuthSession, AuthStep};
use crate::config::FrontendConfig;
use crate::convert::{message_from_publish, publish_from_delivery, will_from_connect};
use crate::limits::{Limit, PublishThrottle, SLOW_READER_FACTOR};
use crate::listener::ConnectionInfo;
use crate::metrics::{ConnectionMetrics, DropReason};
use crate::sys_topics::is_sys_topic;
use crate::takeover::LiveEntry;

type PendingAck = Pin<Box<dyn Future<Output = Outgoing> + Send>>;
/// A subscriber's PUBREC on its way to being durable; PUBREL (the packet id) follows it.
type PendingRelease = Pin<Box<dyn Future<Output = (u16, ServiceResult<Option<u64>>)> + Send>>;

/// Initial read buffer of a connection (it grows while a client sends faster).
const READ_BUFFER_START: usize = 1024;
/// An empty write buffer larger than this is released after a flush.
const WRITE_BUFFER_KEEP: usize = 64 * 1024;

/// An acknowledgement owed to the client once the partitions answered.
#[allow(clippy::enum_variant_names)] // named after the packets they become
enum Outgoing {
    PubAck(u16, ServiceResult<Published>),
    PubRec(u16, ServiceResult<Published>),
    PubComp(u16, ServiceResult<bool>),
    /// An answer decided at once (a refused publish): it still waits for the acks of the
    /// publishes before it, so acks leave in the order the publishes arrived (§4.6).
    Decided(Box<Packet>),
}

/// Why the connection ends, which decides what the session is told.
enum Close {
    /// The client sent DISCONNECT.
    Client(DisconnectRequest),
    /// Network error, keep alive expired or a protocol violation: the will fires.
    Abnormal,
    /// The session moved to a newer connection, or the partitions went away: say nothing.
    Fenced,
    /// The server is shutting down.
    Shutdown,
    /// The frontend drains: the client should use another server; its session stays.
    Drain,
}

/// The longest a connection waits to write its last packets (DISCONNECT) to a client that
/// does not read them before closing anyway.
const CLOSE_FLUSH_WAIT: Duration = Duration::from_secs(5);

/// How [`next_packet`] reads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// Waits for the next packet.
    Wait,
    /// Does not read: the publish limits paused the connection.
    Paused,
    /// Takes only what the client already sent, without waiting: after a write error (a
    /// client that sent DISCONNECT and closed makes our next write fail, and that DISCONNECT
    /// still counts), or when a newer connection of the same client takes over
    /// ([`crate::takeover`]).
    Available,
}

/// What [`next_packet`] found.
// Moved once per packet, as `Option<Result<Packet, _>>` was; boxing the packet would cost an
// allocation per packet for nothing.
#[allow(clippy::large_enum_variant)]
enum Next {
    Packet(Packet),
    /// Bytes that do not decode, or a read error.
    Failed(DecodeError),
    /// The client closed the connection.
    Closed,
    /// Writing failed; what the client sent before may still be read.
    WriteFailed(std::io::Error),
    /// [`Reading::Available`]: nothing more has arrived.
    Drained,
}

/// The next packet from the client, while writing out what is buffered as fast as the socket
/// takes it (unless `write` is false: writing failed before). One future does both because
/// both need the socket: a client that does not read its deliveries must not stop us reading
/// its packets, nor the other way round.
fn next_packet<IO>(
    framed: &mut Framed<IO, MqttCodec>,
    reading: Reading,
    write: bool,
) -> impl Future<Output = Next> + '_
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    std::future::poll_fn(move |cx| {
        if write && !framed.write_buffer().is_empty() {
            if let Poll::Ready(Err(e)) =
                futures::Sink::<&Packet>::poll_flush(Pin::new(&mut *framed), cx)
            {
                return Poll::Ready(Next::WriteFailed(match e {
                    EncodeError::Io(io) => io,
                    other => std::io::Error::other(other.to_string()),
                }));
            }
        }
        if reading == Reading::Paused {
            return Poll::Pending;
        }
        match futures::Stream::poll_next(Pin::new(&mut *framed), cx) {
            Poll::Ready(Some(Ok(p))) => Poll::Ready(Next::Packet(p)),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Next::Failed(e)),
            Poll::Ready(None) => Poll::Ready(Next::Closed),
            Poll::Pending if reading == Reading::Available => Poll::Ready(Next::Drained),
            Poll::Pending => Poll::Pending,
        }
    })
}

/// How long a draining connection waits for the partitions to answer the publishes it
/// already passed on, so their PUBACKs still go out before the close.
const DRAIN_ACK_WAIT: Duration = Duration::from_secs(2);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Serves one client connection until it closes. `info` tells which listener accepted it,
/// over which transport and, on TLS with client certificates, whom the certificate names.
pub async fn serve_connection<S, IO>(
    io: IO,
    info: ConnectionInfo,
    service: Arc<S>,
    config: Arc<FrontendConfig>,
    shutdown: CancellationToken,
) where
    S: SessionService,
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    let peer = info.peer;
    // A drain waits for this to drop, whatever listener the connection came from.
    let _tracked = config.drain.track();
    let mut framed = Framed::new(io, MqttCodec::new(config.max_packet_size));
    // Framed starts with two 8 KiB buffers; most connections are idle most of the time, so
    // start small and let them grow with traffic (the write buffer grows per encoded packet).
    *framed.read_buffer_mut() = BytesMut::with_capacity(READ_BUFFER_START);
    *framed.write_buffer_mut() = BytesMut::new();
    // CONNECT and any enhanced authentication exchange must both finish by this deadline.
    let connect_deadline = Instant::now() + config.connect_timeout;
    let first = tokio::select! {
        r = tokio::time::timeout_at(connect_deadline, framed.next()) => r,
        _ = shutdown.cancelled() => return,
    };
    let connect = match first {
        Ok(Some(Ok(Packet::Connect(c)))) => {
            if let Some(limit) = info.refused {
                // Over a connection limit (counted when the socket was accepted).
                debug!(%peer, limit = limit.label(), "CONNECT refused: limit");
                refuse(&mut framed, limit.connack_code()).await;
                return;
            }
            c
        }
        Ok(Some(Err(DecodeError::UnsupportedProtocolVersion(level)))) => {
            debug!(%peer, level, "unsupported protocol version");
            config
                .metrics
                .connection_refused(ReasonCode::UNSUPPORTED_PROTOCOL_VERSION);
            // The reply uses the 3.1.1 layout, which every version can read (§3.1.2.2).
            framed.codec_mut().version = Some(ProtocolVersion::V311);
            let _ = framed
                .send(&Packet::ConnAck(ConnAck {
                    session_present: false,
                    reason_code: ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
                    properties: ConnAckProperties::default(),
                }))
                .await;
            return;
        }
        Ok(Some(Err(e))) => {
            debug!(%peer, error = %e, "bad first packet");
            // A v5 CONNECT that fails to parse (ill-formed UTF-8 in the client id, ...) may be
            // answered with CONNACK 0x81 (§4.13.1); the codec knows the version it announced.
            if framed.codec().version == Some(ProtocolVersion::V5)
                && matches!(
                    e,
                    DecodeError::MalformedPacket(_) | DecodeError::ProtocolError(_)
                )
            {
                refuse(&mut framed, e.reason_code()).await;
            }
            return;
        }
        Ok(Some(Ok(other))) => {
            debug!(%peer, packet = other.name(), "first packet is not CONNECT");
            return;
        }
        Ok(None) => return,
        Err(_) => {
            debug!(%peer, "no CONNECT before the timeout");
            return;
        }
    };
    // Boxed: the connected part (handler state, its loop) is most of this future's size, and
    // a socket that has not sent CONNECT yet should not pay for it (10,000 such sockets cost
    // ~26 KiB each unboxed).
    let connected = async move {
        let accepted = Handler::accept(
            framed,
            info,
            connect,
            service,
            config,
            connect_deadline,
            &shutdown,
        )
        .await;
        let Some(mut handler) = accepted else {
            return;
        };
        let close = handler.run(&shutdown).await;
        handler.finish(close).await;
    };
    Box::pin(connected).await
}

/// A connected client.
pub struct Handler<S: SessionService, IO> {
    framed: Framed<IO, MqttCodec>,
    peer: SocketAddr,
    /// The listener, transport and TLS identity of this connection.
    conn: ConnectionInfo,
    version: ProtocolVersion,
    service: Arc<S>,
    config: Arc<FrontendConfig>,
    session: SessionRef,
    events: mpsc::UnboundedReceiver<SessionEvent>,
    /// Keep alive as enforced (1.5 × the negotiated value), if any.
    keep_alive: Option<Duration>,
    last_packet: Instant,
    /// Session Expiry Interval from CONNECT (DISCONNECT may not raise it from 0, §3.14.2.2.2).
    connect_expiry: u32,
    inbound_aliases: HashMap<u16, String>,
    /// Topic aliases we use in deliveries (disabled for v3 and clients that accept none).
    outbound_aliases: OutboundAliases,
    /// Enhanced authentication chosen at CONNECT, kept for re-authentication.
    auth: Option<AuthSession>,
    /// The user this connection acts as: the one authoritative user name of the connection
    /// (ACL `%u`, logs). Set at CONNECT from, in this order: the user a successful enhanced
    /// authentication exchange names (SCRAM-SHA-256), the client certificate's identity on a
    /// listener with `use_identity_as_username`, CONNECT's User Name (checked against the
    /// password file when one is configured, taken as given when none is). Never changes: a
    /// re-authentication naming another user ends the connection (0x87).
    username: Option<Arc<str>>,
    /// The client's Maximum Packet Size: larger deliveries are dropped (§3.1.2.11.4).
    client_max_packet: u32,
    /// Authorization ([`crate::acl`]) for this client; `None`: everything allowed.
    acl: Option<AclView>,
    pending: FuturesOrdered<PendingAck>,
    /// PUBRECs of deliveries not yet durable: each PUBREL waits for its own (see
    /// `SessionService::ack`). Apart from `pending`, which the client's Receive Maximum bounds.
    releases: FuturesOrdered<PendingRelease>,
    /// Outbound QoS2 packet ids whose PUBREL went out, with the log index at which their PUBREC
    /// was applied, kept past the PUBCOMP. A PUBLISH for one of them computed before that
    /// index is stale: a leader's replay computed before the PUBREC was applied can arrive
    /// after the PUBREC's answer, even after the client's PUBCOMP (events and answers travel
    /// apart); the client, done with the id, would take it for a new message.
    released: ReleasedIds,
    metrics: ConnectionMetrics,
    /// `limits.publish_rate` / `publish_bandwidth` of this connection.
    throttle: PublishThrottle,
    /// Writing to the socket failed: nothing more is written, and the connection ends once it
    /// has read what the client had sent ([`Reading::Available`]).
    write_failed: bool,
    /// This connection's place among the frontend's connections by client id, through which
    /// a newer connection of the same client asks it to read what it has first.
    live: LiveEntry,
}

impl<S, IO> Handler<S, IO>
where
    S: SessionService,
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    /// Validates CONNECT, opens the session and answers CONNACK.
    async fn accept(
        mut framed: Framed<IO, MqttCodec>,
        conn: ConnectionInfo,
        connect: Connect,
        service: Arc<S>,
        config: Arc<FrontendConfig>,
        deadline: Instant,
        shutdown: &CancellationToken,
    ) -> Option<Self> {
        let peer = conn.peer;
        let version = connect.protocol;
        let v5 = version.is_v5();
        let props = &connect.properties;
        let mut assigned = None;
        let client_id = if connect.client_id.is_empty() {
            if !v5 && !connect.clean_start {
                // 3.1.1: a zero-length id needs Clean Session = 1 (§3.1.3-8).
                refuse(&mut framed, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID).await;
                return None;
            }
            let id = format!("tiermq-{:016x}", rand::random::<u64>());
            assigned = Some(id.clone());
            id
        } else {
            connect.client_id.clone()
        };
        if client_id.len() > config.max_client_id_len {
            config.metrics.limit_hit(Limit::ClientIdLength);
            refuse(&mut framed, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID).await;
            return None;
        }
        // User name and password (mqtt.password_file): before the session exists. A verified
        // client certificate on a `use_identity_as_username` listener stands in for them.
        if let Some(auth) = &config.password_auth {
            if props.authentication_method.is_none() && conn.cert_username.is_none() {
                if let Err(code) = auth
                    .check(connect.username.as_deref(), connect.password.as_deref())
                    .await
                {
                    debug!(%peer, user = ?connect.username, "refused: credentials");
                    refuse(&mut framed, code).await;
                    return None;
                }
            }
        }
        let authenticator = match &props.authentication_method {
            None => None,
            Some(method) => match config.authenticators.get(method) {
                Some(a) => Some(a.clone()),
                None => {
                    // Nobody offers this method (§4.12: 0x8C).
                    debug!(%peer, method, "unknown authentication method");
                    refuse(&mut framed, ReasonCode::BAD_AUTHENTICATION_METHOD).await;
                    return None;
                }
            },
        };
        if let Some(will) = &connect.will {
            if !v5 && topic::validate_topic_name(&will.topic).is_err() {
                // 3.1.1 has no CONNACK code for an ill-formed will topic (a zero-length one,
                // wildcards): a protocol violation, closed without CONNACK ([MQTT-3.2.2-6],
                // [MQTT-4.8.0-1]). Return code 5 would tell the client it is not authorized.
                debug!(%peer, topic = %will.topic, "ill-formed will topic: closing");
                return None;
            }
            let over_limit = config.limits.check_topic(&will.topic);
            if let Err(limit) = over_limit {
                config.metrics.limit_hit(limit);
            }
            let code = if topic::validate_topic_name(&will.topic).is_err()
                || is_sys_topic(&will.topic)
                || over_limit.is_err()
            {
                Some(ReasonCode::TOPIC_NAME_INVALID)
            } else if will.qos > config.maximum_qos {
                Some(ReasonCode::QOS_NOT_SUPPORTED)
            } else if will.retain && !config.retain_available {
                Some(ReasonCode::RETAIN_NOT_SUPPORTED)
            } else if will.properties.payload_format_indicator == Some(1)
                && std::str::from_utf8(&will.payload).is_err()
            {
                Some(ReasonCode::PAYLOAD_FORMAT_INVALID)
            } else {
                None
            };
            if let Some(code) = code {
                refuse(&mut framed, code).await;
                return None;
            }
        }
        let session_expiry_secs = if v5 {
            props.session_expiry_interval.unwrap_or(0)
        } else if connect.clean_start {
            0
        } else {
            u32::MAX
        };
        let receive_maximum = if v5 {
            props.receive_maximum.unwrap_or(u16::MAX)
        } else {
            config.v311_inflight
        };
        let client_max_packet = props.maximum_packet_size.unwrap_or(u32::MAX);
        // Never more aliases than the client can hold (absent = 0, §3.1.2.11.5); none in v3.
        let outbound_alias_max = if v5 {
            props
                .topic_alias_maximum
                .unwrap_or(0)
                .min(config.topic_alias_out)
        } else {
            0
        };
        let mut keep_alive = connect.keep_alive;
        let mut server_keep_alive = None;
        // Only v5 can be told (Server Keep Alive); a 3.1.1 client keeps its own value.
        if v5
            && config.max_keep_alive > 0
            && (keep_alive == 0 || keep_alive > config.max_keep_alive)
        {
            keep_alive = config.max_keep_alive;
            server_keep_alive = Some(keep_alive);
        }
        let request_response = props.request_response_information == Some(true);
        let client_id: Arc<str> = Arc::from(client_id);
        // Authenticate before the session exists: a refused client never touches it.
        let (auth, auth_data) = match authenticator {
            None => (None, None),
            Some(a) => {
                let (session, step) =
                    AuthSession::begin(a, client_id.clone(), props.authentication_data.clone());
                let ctx = ConnectAuth {
                    peer,
                    deadline,
                    shutdown,
                };
                let (session, data) = authenticate(&mut framed, ctx, session, step).await?;
                (Some(session), data)
            }
        };
        // See `Handler::username`: exchange user > certificate identity > CONNECT User Name.
        let username: Option<Arc<str>> = auth
            .as_ref()
            .and_then(|a| a.user().cloned())
            .or_else(|| conn.cert_username.clone())
            .or_else(|| connect.username.as_deref().map(Arc::from));
        // Authorization keys on that same user name. The will is a publish: a will the client
        // may not publish refuses the CONNECT (0x87, 3.1.1 return code 5) rather than being
        // dropped unseen.
        let mut acl = config
            .acl
            .for_listener(&conn.listener)
            .map(|a| a.view(username.clone(), client_id.clone()));
        if let (Some(view), Some(will)) = (acl.as_mut(), &connect.will) {
            if !view.may_publish(&will.topic) {
                debug!(%peer, client_id = %client_id, topic = %will.topic, "refused: will denied by the ACL");
                config.metrics.acl_denied(Access::Publish);
                refuse(&mut framed, ReasonCode::NOT_AUTHORIZED).await;
                return None;
            }
        }
        if config.drain.is_draining() {
            // The listener no longer accepts, but this CONNECT was already on its way.
            debug!(%peer, "CONNECT while draining: use another server");
            crate::metrics::connection_refused(ReasonCode::USE_ANOTHER_SERVER);
            let _ = framed
                .send(&Packet::ConnAck(ConnAck {
                    session_present: false,
                    reason_code: ReasonCode::USE_ANOTHER_SERVER,
                    properties: ConnAckProperties {
                        server_reference: v5
                            .then(|| config.drain.server_reference().map(str::to_string))
                            .flatten(),
                        ..ConnAckProperties::default()
                    },
                }))
                .await;
            return None;
        }
        // A connection of this client still open here reads what its client sent before this
        // CONNECT (a DISCONNECT, say) and records it first (see `crate::takeover`).
        let live = config.takeovers.enter(&client_id).await;
        let req = ConnectRequest {
            client_id: client_id.clone(),
            protocol: version,
            clean_start: connect.clean_start,
            session_expiry_secs,
            receive_maximum,
            will: connect.will.map(will_from_connect),
            frontend_id: config.frontend_id,
        };
        let connected = match service.connect(req).await {
            Ok(c) => {
                // The connection's span (listener.rs) names the session from now on.
                let span = tracing::Span::current();
                span.record("client_id", &*client_id);
                span.record("epoch", c.session.epoch);
                c
            }
            Err(e) => {
                debug!(%peer, error = %e, "connect refused by the partitions");
                let code = match e {
                    ServiceError::QuotaExceeded(_) => ReasonCode::QUOTA_EXCEEDED,
                    _ => ReasonCode::SERVER_UNAVAILABLE,
                };
                refuse(&mut framed, code).await;
                return None;
            }
        };
        let properties = if v5 {
            ConnAckProperties {
                receive_maximum: Some(config.receive_maximum),
                maximum_packet_size: Some(config.max_packet_size),
                topic_alias_maximum: (config.topic_alias_maximum > 0)
                    .then_some(config.topic_alias_maximum),
                maximum_qos: (config.maximum_qos < QoS::ExactlyOnce).then_some(config.maximum_qos),
                retain_available: Some(config.retain_available),
                wildcard_subscription_available: Some(true),
                subscription_identifiers_available: Some(true),
                shared_subscription_available: Some(true),
                assigned_client_identifier: assigned,
                server_keep_alive,
                response_information: match (&config.response_information, request_response) {
                    (Some(prefix), true) => Some(format!("{prefix}{client_id}")),
                    _ => None,
                },
                authentication_method: auth.as_ref().map(|a| a.method().to_string()),
                authentication_data: auth_data,
                ..ConnAckProperties::default()
            }
        } else {
            ConnAckProperties::default()
        };
        let connack = Packet::ConnAck(ConnAck {
            session_present: connected.session_present,
            reason_code: ReasonCode::SUCCESS,
            properties,
        });
        if framed.send(&connack).await.is_err() {
            let _ = service
                .disconnect(&connected.session, DisconnectRequest::ABNORMAL)
                .await;
            return None;
        }
        debug!(%peer, client_id = %client_id, ?version, session_present = connected.session_present, listener = %conn.listener, tls_identity = ?conn.peer_identity, user = ?username, "connected");
        let metrics = ConnectionMetrics::opened(&config.metrics, version);
        let throttle = config.limits.throttle(std::time::Instant::now());
        Some(Handler {
            metrics,
            framed,
            peer,
            conn,
            version,
            service,
            config,
            session: connected.session,
            events: connected.events,
            keep_alive: (keep_alive > 0)
                .then(|| Duration::from_millis(u64::from(keep_alive) * 1500)),
            last_packet: Instant::now(),
            connect_expiry: session_expiry_secs,
            inbound_aliases: HashMap::new(),
            outbound_aliases: OutboundAliases::new(outbound_alias_max),
            auth,
            username,
            client_max_packet,
            acl,
            pending: FuturesOrdered::new(),
            releases: FuturesOrdered::new(),
            released: ReleasedIds::new(),
            throttle,
            write_failed: false,
            live,
        })
    }

    /// The connection's main loop. Returns how it ended.
    async fn run(&mut self, shutdown: &CancellationToken) -> Close {
        let far = Duration::from_secs(86_400 * 365);
        let keep_alive_timer = sleep_until(self.last_packet + self.keep_alive.unwrap_or(far));
        tokio::pin!(keep_alive_timer);
        // Drain: v5 leaves at once (told where to go); v3.1.1 is served until its paced turn.
        let drain = self.config.drain.clone();
        let mut drain_turn = false;
        let drain_timer = sleep_until(Instant::now() + far);
        tokio::pin!(drain_timer);
        // Publish rate / bandwidth: while paused, the socket is not read (back-pressure).
        let throttle_timer = sleep_until(Instant::now() + far);
        tokio::pin!(throttle_timer);
        let mut throttled = false;
        // A newer connection of this client asked us to read what we have (`crate::takeover`).
        let mut wrapping_up = false;
        loop {
            // A takeover's request waits for a throttle pause to end (a flooding client does
            // not get its reads unpaused by opening a second connection); the newer connection
            // waits at most `TAKEOVER_WAIT` for it.
            let reading = if self.write_failed {
                Reading::Available
            } else if throttled {
                Reading::Paused
            } else if wrapping_up {
                Reading::Available
            } else {
                Reading::Wait
            };
            let step = tokio::select! {
                packet = next_packet(&mut self.framed, reading, !self.write_failed) => match packet {
                    Next::Packet(p) => {
                        self.last_packet = Instant::now();
                        match self.throttle_pause(&p) {
                            Some((_, Limit::PublishRate)) if self.config.limits.settings().publish_rate_disconnect => {
                                debug!(peer = %self.peer, "publish rate exceeded: disconnecting");
                                self.send_disconnect(ReasonCode::MESSAGE_RATE_TOO_HIGH).await;
                                Err(Close::Abnormal)
                            }
                            Some((pause, _)) => {
                                throttle_timer.as_mut().reset(self.last_packet + pause);
                                throttled = true;
                                self.on_packet(p).await
                            }
                            None => self.on_packet(p).await,
                        }
                    }
                    Next::Failed(e) => {
                        debug!(peer = %self.peer, error = %e, "closing on decode error");
                        if !matches!(e, DecodeError::Io(_)) {
                            self.send_disconnect(e.reason_code()).await;
                        }
                        Err(Close::Abnormal)
                    }
                    Next::Closed => Err(Close::Abnormal),
                    Next::WriteFailed(e) => {
                        self.on_write_failed(&e);
                        Ok(())
                    }
                    // Everything the client sent before the write failed is handled.
                    Next::Drained if self.write_failed => Err(Close::Abnormal),
                    Next::Drained => {
                        wrapping_up = false;
                        self.live.settled();
                        Ok(())
                    }
                },
                _ = self.live.wrap_up_requested(), if !wrapping_up => {
                    wrapping_up = true;
                    Ok(())
                }
                event = self.events.recv() => match event {
                    Some(e) => self.on_event(e),
                    None => Err(Close::Fenced),
                },
                Some(done) = self.pending.next(), if !self.pending.is_empty() => {
                    self.on_durable(done)
                }
                Some((pid, done)) = self.releases.next(), if !self.releases.is_empty() => {
                    self.on_pubrec_durable(pid, done)
                }
                _ = &mut throttle_timer, if throttled => {
                    throttled = false;
                    // The pause was ours: it does not count against the client's keep alive.
                    self.last_packet = Instant::now();
                    Ok(())
                }
                _ = AclView::reloaded(&mut self.acl) => self.recheck_acl().await,
                _ = &mut keep_alive_timer => {
                    let deadline = self.last_packet + self.keep_alive.unwrap_or(far);
                    if throttled {
                        keep_alive_timer.as_mut().reset(throttle_timer.deadline() + self.keep_alive.unwrap_or(far));
                        Ok(())
                    } else if deadline > Instant::now() {
                        keep_alive_timer.as_mut().reset(deadline);
                        Ok(())
                    } else {
                        debug!(peer = %self.peer, "keep alive expired");
                        self.send_disconnect(ReasonCode::KEEP_ALIVE_TIMEOUT).await;
                        Err(Close::Abnormal)
                    }
                }
                _ = shutdown.cancelled() => {
                    self.send_disconnect(ReasonCode::SERVER_SHUTTING_DOWN).await;
                    Err(Close::Shutdown)
                }
                _ = drain.started(), if !drain_turn => {
                    if self.version.is_v5() {
                        Err(Close::Drain)
                    } else {
                        drain_turn = true;
                        drain_timer.as_mut().reset(drain.reserve_slot());
                        Ok(())
                    }
                }
                _ = &mut drain_timer, if drain_turn => Err(Close::Drain),
            };
            // The last packets are written by `finish`, once the end is recorded.
            if let Err(close) = step {
                return close;
            }
            // Batch whatever else is ready before paying for a flush.
            for _ in 0..256 {
                match self.events.try_recv() {
                    Ok(e) => {
                        if let Err(close) = self.on_event(e) {
                            return close;
                        }
                    }
                    Err(_) => break,
                }
            }
            self.flush_now().await;
        }
    }

    /// Writing to the client failed (most likely it closed the connection after its last
    /// packets: our write meets its reset). The connection does not end yet: what the client
    /// sent before is still read, so a DISCONNECT among it is honoured (no will, §3.14.4).
    fn on_write_failed(&mut self, e: &std::io::Error) {
        debug!(peer = %self.peer, error = %e, "write failed; reading what the client sent");
        self.write_failed = true;
        self.framed.write_buffer_mut().clear();
    }

    /// Tells the partitions how the connection ended, then writes the last packets.
    async fn finish(&mut self, close: Close) {
        let req = match close {
            Close::Client(req) => Some(req),
            Close::Abnormal | Close::Shutdown => Some(DisconnectRequest::ABNORMAL),
            Close::Fenced => None,
            Close::Drain => return self.drained().await,
        };
        // Publishes already submitted stay durable; their acks are simply not sent.
        if let Some(req) = req {
            if let Err(e) = self.service.disconnect(&self.session, req).await {
                debug!(peer = %self.peer, error = %e, "disconnect not recorded");
            }
        }
        // Recorded before the last flush, which may wait for a socket that does not drain
        // (up to `CLOSE_FLUSH_WAIT`): a client that reconnects at once must find its session
        // detached as its DISCONNECT said, and a newer connection waiting for this one's end
        // (`crate::takeover`) may go on now.
        self.live.settled();
        let _ = self.flush().await;
        debug!(peer = %self.peer, client_id = %self.session.client_id, listener = %self.conn.listener, "closed");
    }

    /// Moves the client to another server: answers the publishes the partitions already
    /// have (bounded by [`DRAIN_ACK_WAIT`]), records a disconnect that keeps the session and
    /// discards the will, and only then sends DISCONNECT 0x9C Use another server with the
    /// Server Reference (v5) and closes. The session is detached before the client hears
    /// anything, so its reconnect elsewhere is a plain resume, not a takeover.
    ///
    /// Why the will does not fire: §3.1.2.5 lists "the Server closes the Network Connection
    /// without first receiving a DISCONNECT 0x00" among the cases that publish it, but a
    /// drain is a planned move the server announces, and the client is expected back within
    /// seconds on another frontend; firing every client's will at each rolling upgrade would
    /// tell will subscribers that devices died when they did not. 3.1.1 (§3.1.2.5) lists only
    /// network errors, keep alive, a client close without DISCONNECT and protocol errors.
    async fn drained(&mut self) {
        self.flush_now().await;
        let deadline = Instant::now() + DRAIN_ACK_WAIT;
        while !self.pending.is_empty() {
            match tokio::time::timeout_at(deadline, self.pending.next()).await {
                Ok(Some(done)) => {
                    if self.on_durable(done).is_err() {
                        break;
                    }
                }
                _ => break,
            }
        }
        let keep_session = DisconnectRequest {
            normal: true,
            with_will: false,
            session_expiry_secs: None,
        };
        if let Err(e) = self.service.disconnect(&self.session, keep_session).await {
            debug!(peer = %self.peer, error = %e, "drain disconnect not recorded");
        }
        if self.version.is_v5() {
            let mut packet = Disconnect::with_reason(ReasonCode::USE_ANOTHER_SERVER);
            packet.properties.server_reference =
                self.config.drain.server_reference().map(str::to_string);
            let _ = self.feed(Packet::Disconnect(packet));
        }
        let _ = self.flush().await;
        let _ = tokio::io::AsyncWriteExt::shutdown(self.framed.get_mut()).await;
        debug!(peer = %self.peer, client_id = %self.session.client_id, "drained");
    }

    /// Writes the buffered packets to the socket (waiting at most [`CLOSE_FLUSH_WAIT`]: this
    /// is for the last words before a close), then gives back a large write buffer a burst
    /// left behind.
    async fn flush(&mut self) -> Result<(), EncodeError> {
        if self.write_failed {
            return Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe).into());
        }
        let flush = SinkExt::<&Packet>::flush(&mut self.framed);
        match tokio::time::timeout(CLOSE_FLUSH_WAIT, flush).await {
            Ok(r) => r?,
            Err(_) => return Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()),
        }
        self.release_write_buffer();
        Ok(())
    }

    /// Writes what the socket takes *now* and returns; the rest goes out as the socket drains
    /// (see [`next_packet`]). Never waiting here is what keeps a client that does not read
    /// from stalling its own connection: its deliveries keep being taken off the session
    /// channel (QoS0 dropped once the buffer passes `max_write_buffer`), its keep alive and
    /// its packets are still handled. A write error is not the end: see
    /// [`Self::on_write_failed`].
    async fn flush_now(&mut self) {
        if self.write_failed {
            self.framed.write_buffer_mut().clear();
            return;
        }
        let framed = &mut self.framed;
        let written = std::future::poll_fn(|cx| {
            match futures::Sink::<&Packet>::poll_flush(Pin::new(&mut *framed), cx) {
                Poll::Ready(r) => Poll::Ready(r),
                Poll::Pending => Poll::Ready(Ok(())),
            }
        })
        .await;
        match written {
            Ok(()) => self.release_write_buffer(),
            Err(EncodeError::Io(e)) => self.on_write_failed(&e),
            Err(e) => self.on_write_failed(&std::io::Error::other(e.to_string())),
        }
    }

    fn release_write_buffer(&mut self) {
        let buf = self.framed.write_buffer_mut();
        if buf.is_empty() && buf.capacity() > WRITE_BUFFER_KEEP {
            *buf = BytesMut::new();
        }
    }

    /// Encodes a packet into the write buffer; the main loop flushes once per wake-up.
    fn feed(&mut self, packet: Packet) -> Result<(), Close> {
        // The codec is `Copy`; a copy encodes into the buffer the framed transport owns.
        let mut codec = *self.framed.codec();
        match codec.encode(&packet, self.framed.write_buffer_mut()) {
            Ok(()) => Ok(()),
            Err(e) => {
                debug!(peer = %self.peer, error = %e, packet = packet.name(), "cannot encode");
                Err(Close::Abnormal)
            }
        }
    }

    async fn send_disconnect(&mut self, reason: ReasonCode) {
        let disconnect = Packet::Disconnect(Disconnect::with_reason(reason));
        if self.version.is_v5() && self.feed(disconnect).is_ok() {
            let _ = self.flush().await;
        }
    }

    async fn protocol_error(&mut self, reason: ReasonCode, why: &str) -> Result<(), Close> {
        debug!(peer = %self.peer, %reason, why, "protocol violation");
        self.send_disconnect(reason).await;
        Err(Close::Abnormal)
    }

    /// Charges `packet` to the publish rate and bandwidth limits; returns how long to stop
    /// reading the socket, if at all (counted as a limit hit).
    fn throttle_pause(&mut self, packet: &Packet) -> Option<(Duration, Limit)> {
        let size = if self.throttle.counts_bytes() {
            tiermq_common::codec::encoded_len(packet, self.version)
        } else {
            0
        };
        let publish = matches!(packet, Packet::Publish(_));
        let (pause, limit) = self
            .throttle
            .on_packet(publish, size, std::time::Instant::now())?;
        trace!(peer = %self.peer, ?pause, limit = limit.label(), "reads paused");
        self.config.metrics.limit_hit(limit);
        Some((pause, limit))
    }

    async fn on_packet(&mut self, packet: Packet) -> Result<(), Close> {
        trace!(peer = %self.peer, packet = packet.name(), "received");
        match packet {
            Packet::Publish(p) => {
                self.metrics.received(p.qos);
                self.on_publish(p).await
            }
            Packet::PubAck(a) => {
                self.ack(AckKind::PubAck, a.packet_id).await;
                Ok(())
            }
            Packet::PubRec(a) => {
                if a.reason_code.is_error() {
                    // The receiver refused the message: the exchange ends here (§4.3.3), and
                    // nothing is sent that a lost ack could make it see twice.
                    self.ack(AckKind::PubRec, a.packet_id).await;
                    self.ack(AckKind::PubComp, a.packet_id).await;
                    return Ok(());
                }
                // PUBREL only once the PUBREC is durable (`SessionService::ack`).
                let wait = self
                    .service
                    .ack(&self.session, AckKind::PubRec, a.packet_id);
                let pid = a.packet_id;
                self.releases
                    .push_back(Box::pin(async move { (pid, wait.await) }));
                Ok(())
            }
            Packet::PubComp(a) => {
                self.released.pubcomp(a.packet_id);
                self.ack(AckKind::PubComp, a.packet_id).await;
                Ok(())
            }
            Packet::PubRel(r) => {
                let wait = self.service.release(&self.session, r.packet_id);
                let pid = r.packet_id;
                self.pending
                    .push_back(Box::pin(async move { Outgoing::PubComp(pid, wait.await) }));
                Ok(())
            }
            Packet::Subscribe(s) => self.on_subscribe(s).await,
            Packet::Unsubscribe(u) => self.on_unsubscribe(u).await,
            Packet::PingReq => self.feed(Packet::PingResp),
            Packet::Disconnect(d) => {
                let expiry = d.properties.session_expiry_interval;
                if self.connect_expiry == 0 && expiry.is_some_and(|e| e > 0) {
                    return self
                        .protocol_error(ReasonCode::PROTOCOL_ERROR, "session expiry raised from 0")
                        .await;
                }
                let rc = d.reason_code;
                Err(Close::Client(DisconnectRequest {
                    normal: rc == ReasonCode::NORMAL_DISCONNECTION,
                    with_will: rc == ReasonCode::DISCONNECT_WITH_WILL || rc.is_error(),
                    session_expiry_secs: expiry,
                }))
            }
            Packet::Connect(_) => {
                self.protocol_error(ReasonCode::PROTOCOL_ERROR, "second CONNECT")
                    .await
            }
            Packet::Auth(a) => self.on_auth(a).await,
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                self.protocol_error(ReasonCode::PROTOCOL_ERROR, "server-to-client packet")
                    .await
            }
        }
    }

    /// AUTH after CONNACK: re-authentication (§4.12.1). The exchange runs between other
    /// packets, so publishes and deliveries keep flowing while it is in progress.
    async fn on_auth(&mut self, a: Auth) -> Result<(), Close> {
        let Some(session) = self.auth.as_mut() else {
            // No enhanced authentication was negotiated at CONNECT (§4.12).
            return self
                .protocol_error(ReasonCode::PROTOCOL_ERROR, "AUTH without a method")
                .await;
        };
        let reply = match session.on_auth(a, true) {
            Ok(AuthStep::Continue(data)) => {
                session.packet(ReasonCode::CONTINUE_AUTHENTICATION, Some(data))
            }
            Ok(AuthStep::Success(_))
                if session.user().is_some() && session.user() != self.username.as_ref() =>
            {
                debug!(peer = %self.peer, user = ?session.user(), "re-authenticated as another user");
                self.send_disconnect(ReasonCode::NOT_AUTHORIZED).await;
                return Err(Close::Abnormal);
            }
            Ok(AuthStep::Success(data)) => session.packet(ReasonCode::SUCCESS, data),
            Ok(AuthStep::Fail(code)) => {
                let reason = failure_code(code, ReasonSet::Disconnect);
                debug!(peer = %self.peer, %reason, "re-authentication failed");
                tokio::time::sleep(session.failure_delay()).await;
                self.send_disconnect(reason).await;
                return Err(Close::Abnormal);
            }
            Err(why) => return self.protocol_error(ReasonCode::PROTOCOL_ERROR, why).await,
        };
        self.feed(reply)
    }

    async fn ack(&mut self, kind: AckKind, packet_id: u16) {
        // PUBACK / PUBCOMP need no durability (a lost one means a redelivery): submit and
        // move on. (A PUBREC followed by PUBREL waits: `on_pubrec_durable`.)
        drop(self.service.ack(&self.session, kind, packet_id));
    }

    /// The PUBREC of delivery `pid` is durable: PUBREL may go out. If it could not be made
    /// durable, no PUBREL: the session re-sends the PUBLISH (DUP) to the next connection,
    /// which the client, still holding the packet id, answers with PUBREC again.
    fn on_pubrec_durable(
        &mut self,
        pid: u16,
        done: ServiceResult<Option<u64>>,
    ) -> Result<(), Close> {
        match done {
            Ok(index) => {
                self.released.pubrec_applied(pid, index);
                self.feed(Packet::PubRel(PubRel::new(pid)))
            }
            Err(e) => {
                debug!(peer = %self.peer, error = %e, "PUBREC not recorded; closing");
                Err(close_after(&e))
            }
        }
    }

    async fn on_publish(&mut self, mut p: Publish) -> Result<(), Close> {
        if p.qos > QoS::AtMostOnce && self.pending.len() >= usize::from(self.config.receive_maximum)
        {
            return self
                .protocol_error(ReasonCode::RECEIVE_MAXIMUM_EXCEEDED, "receive maximum")
                .await;
        }
        // Resolve the topic alias (§3.3.2.3.4).
        let topic = match p.properties.topic_alias.take() {
            Some(alias) if alias == 0 || alias > self.config.topic_alias_maximum => {
                return self
                    .protocol_error(ReasonCode::TOPIC_ALIAS_INVALID, "topic alias out of range")
                    .await
            }
            Some(alias) if p.topic.is_empty() => match self.inbound_aliases.get(&alias) {
                Some(t) => t.clone(),
                None => {
                    return self
                        .protocol_error(ReasonCode::PROTOCOL_ERROR, "unknown topic alias")
                        .await
                }
            },
            Some(alias) => {
                self.inbound_aliases.insert(alias, p.topic.clone());
                std::mem::take(&mut p.topic)
            }
            None => std::mem::take(&mut p.topic),
        };
        if let Err(e) = topic::validate_topic_name(&topic) {
            return self
                .protocol_error(ReasonCode::TOPIC_NAME_INVALID, &e.to_string())
                .await;
        }
        if let Err(limit) = self.config.limits.check_topic(&topic) {
            // Too long or too deep: a v5 client learns it in its ack (QoS0 is dropped), a
            // 3.1.1 client cannot be told and is closed.
            self.config.metrics.limit_hit(limit);
            if !self.version.is_v5() {
                debug!(peer = %self.peer, limit = limit.label(), "topic over a limit");
                return Err(Close::Abnormal);
            }
            return self.refuse_publish(p.qos, p.packet_id, ReasonCode::TOPIC_NAME_INVALID);
        }
        if is_sys_topic(&topic) {
            // Only the broker writes `$SYS`: a v5 client learns why in its ack (0x90), a
            // v3.1.1 client gets a plain ack; either way the message goes nowhere.
            self.metrics.dropped(DropReason::SysTopic);
            return self.refuse_publish(p.qos, p.packet_id, ReasonCode::TOPIC_NAME_INVALID);
        }
        if p.qos > self.config.maximum_qos {
            return self
                .protocol_error(ReasonCode::QOS_NOT_SUPPORTED, "QoS above maximum")
                .await;
        }
        if p.retain && !self.config.retain_available {
            return self
                .protocol_error(ReasonCode::RETAIN_NOT_SUPPORTED, "retain not available")
                .await;
        }
        if p.properties.payload_format_indicator == Some(1)
            && std::str::from_utf8(&p.payload).is_err()
        {
            // §3.3.2.3.2: the receiver may answer 0x99 in its ack (or DISCONNECT); QoS0 is
            // dropped.
            return self.refuse_publish(p.qos, p.packet_id, ReasonCode::PAYLOAD_FORMAT_INVALID);
        }
        if self.acl.as_mut().is_some_and(|a| !a.may_publish(&topic)) {
            // v5 learns it in its ack (0x87); a 3.1.1 ack cannot say, the message is dropped.
            debug!(peer = %self.peer, %topic, "publish denied by the ACL");
            self.config.metrics.acl_denied(Access::Publish);
            return self.refuse_publish(p.qos, p.packet_id, ReasonCode::NOT_AUTHORIZED);
        }
        let qos = p.qos;
        let packet_id = p.packet_id;
        let message = message_from_publish(p, topic, now_ms());
        match (qos, packet_id) {
            (QoS::AtMostOnce, _) => {
                // Submitted now; nothing to answer.
                drop(self.service.publish(&self.session, message, None));
            }
            (QoS::AtLeastOnce, Some(pid)) => {
                let wait = self.service.publish(&self.session, message, None);
                self.pending
                    .push_back(Box::pin(async move { Outgoing::PubAck(pid, wait.await) }));
            }
            (QoS::ExactlyOnce, Some(pid)) => {
                let wait = self.service.publish(&self.session, message, Some(pid));
                // v5: PUBREC 0x97 (a full queue refused it) ends the exchange (§4.3.3) and the
                // client may reuse the id at once, so the id is released before the client
                // hears 0x97. The publisher's partition forgets it itself when its own queue
                // refused; a refusal in another partition it cannot see. (3.1.1 cannot be
                // told: its connection closes and its re-send must stay a duplicate.)
                let release = self
                    .version
                    .is_v5()
                    .then(|| (self.service.clone(), self.session.clone()));
                self.pending.push_back(Box::pin(async move {
                    let r = wait.await;
                    if let (Some((service, session)), Ok(p)) = (release, &r) {
                        if p.refused {
                            if let Err(e) = service.release(&session, pid).await {
                                return Outgoing::PubRec(pid, Err(e));
                            }
                        }
                    }
                    Outgoing::PubRec(pid, r)
                }));
            }
            _ => {
                return self
                    .protocol_error(ReasonCode::MALFORMED_PACKET, "QoS>0 without packet id")
                    .await
            }
        }
        Ok(())
    }

    /// Answers a publish that is not passed on with `code` in its PUBACK / PUBREC (a v3.1.1
    /// client sees a plain ack), behind the acks still owed for earlier publishes; a QoS0
    /// publish is dropped silently.
    fn refuse_publish(
        &mut self,
        qos: QoS,
        packet_id: Option<u16>,
        code: ReasonCode,
    ) -> Result<(), Close> {
        let answer = match (qos, packet_id) {
            (QoS::AtLeastOnce, Some(pid)) => Packet::PubAck(PubAck {
                reason_code: code,
                ..PubAck::new(pid)
            }),
            (QoS::ExactlyOnce, Some(pid)) => Packet::PubRec(PubRec {
                reason_code: code,
                ..PubRec::new(pid)
            }),
            _ => return Ok(()),
        };
        self.pending
            .push_back(Box::pin(std::future::ready(Outgoing::Decided(Box::new(
                answer,
            )))));
        Ok(())
    }

    /// A publish (or release) became durable: acknowledge it to the client.
    fn on_durable(&mut self, done: Outgoing) -> Result<(), Close> {
        let publish_code = |r: &ServiceResult<Published>| match r {
            Ok(p) if p.refused => Ok(ReasonCode::QUOTA_EXCEEDED),
            Ok(p) if !p.matched => Ok(ReasonCode::NO_MATCHING_SUBSCRIBERS),
            Ok(_) => Ok(ReasonCode::SUCCESS),
            Err(ServiceError::QuotaExceeded(_)) => Ok(ReasonCode::QUOTA_EXCEEDED),
            // Not durable: never acknowledge. The client re-sends after reconnecting.
            Err(e) => Err(close_after(e)),
        };
        let v5 = self.version.is_v5();
        match done {
            Outgoing::PubAck(pid, r) => {
                let code = publish_code(&r)?;
                if !v5 && code.is_error() {
                    return Err(Close::Abnormal);
                }
                self.feed(Packet::PubAck(PubAck {
                    reason_code: code,
                    ..PubAck::new(pid)
                }))
            }
            Outgoing::PubRec(pid, r) => {
                let code = publish_code(&r)?;
                if !v5 && code.is_error() {
                    return Err(Close::Abnormal);
                }
                self.feed(Packet::PubRec(PubRec {
                    reason_code: code,
                    ..PubRec::new(pid)
                }))
            }
            Outgoing::PubComp(pid, r) => {
                // A PUBREL for a flow already complete is most likely re-sent after a
                // reconnect that lost our PUBCOMP: 0x00, as Mosquitto and EMQX answer. 0x92 is
                // allowed, but many client libraries take any code >= 0x80 as a failed delivery.
                match r {
                    Ok(_) => self.feed(Packet::PubComp(PubComp::new(pid))),
                    Err(e) => Err(close_after(&e)),
                }
            }
            Outgoing::Decided(answer) => self.feed(*answer),
        }
    }

    async fn on_subscribe(&mut self, mut s: Subscribe) -> Result<(), Close> {
        if let Some(e) = ill_formed_filter(s.filters.iter().map(|(f, _)| f)) {
            return self
                .protocol_error(ReasonCode::MALFORMED_PACKET, &e.to_string())
                .await;
        }
        let subscription_id = s.properties.subscription_identifier;
        if subscription_id == Some(0) {
            return self
                .protocol_error(ReasonCode::PROTOCOL_ERROR, "subscription identifier 0")
                .await;
        }
        // §3.8.3.1: No Local on a shared subscription is a Protocol Error.
        if s.filters
            .iter()
            .any(|(f, o)| o.no_local && topic::is_shared(f))
        {
            return self
                .protocol_error(
                    ReasonCode::PROTOCOL_ERROR,
                    "no local on a shared subscription",
                )
                .await;
        }
        // Filters the ACL denies are taken out here and get 0x87 back in place below.
        let denied = self.acl_take_denied(&mut s.filters);
        // Filters over `[limits]` get 0x8F here and never reach the partitions.
        let mut over_limit = Vec::with_capacity(s.filters.len());
        let mut filters = Vec::with_capacity(s.filters.len());
        let mut requests = Vec::with_capacity(s.filters.len());
        for (filter, mut options) in s.filters {
            let check = self.config.limits.check_topic(&filter);
            if let Err(limit) = check {
                self.config.metrics.limit_hit(limit);
            }
            over_limit.push(check.is_err());
            filters.push(filter.clone());
            if check.is_ok() {
                options.qos = options.qos.min(self.config.maximum_qos);
                requests.push(SubscribeRequest {
                    filter,
                    options,
                    subscription_id,
                });
            }
        }
        // Awaited inline: the SUBACK must be on the wire before any retained message the
        // subscription triggers, and the subscription must be in place before later publishes.
        let granted = if requests.is_empty() {
            Vec::new()
        } else {
            match self.service.subscribe(&self.session, requests).await {
                Ok(codes) => codes,
                Err(e) => return self.service_failed(e).await,
            }
        };
        let mut granted = granted.into_iter();
        let reason_codes: Vec<ReasonCode> = over_limit
            .into_iter()
            .map(|over| match over {
                true => ReasonCode::TOPIC_FILTER_INVALID,
                false => granted.next().unwrap_or(ReasonCode::UNSPECIFIED_ERROR),
            })
            .collect();
        let (filters, reason_codes) = self.acl_restore(denied, filters, reason_codes);
        self.metrics.subscribed(&filters, &reason_codes);
        self.feed(Packet::SubAck(SubAck {
            packet_id: s.packet_id,
            reason_codes,
            properties: Default::default(),
        }))?;
        // Deliveries the subscription triggers (retained) are queued behind it in the buffer.
        self.flush_now().await;
        Ok(())
    }

    async fn on_unsubscribe(&mut self, u: Unsubscribe) -> Result<(), Close> {
        if let Some(e) = ill_formed_filter(&u.filters) {
            return self
                .protocol_error(ReasonCode::MALFORMED_PACKET, &e.to_string())
                .await;
        }
        let reason_codes = match self
            .service
            .unsubscribe(&self.session, u.filters.clone())
            .await
        {
            Ok(codes) => codes,
            Err(e) => return self.service_failed(e).await,
        };
        self.metrics.unsubscribed(&u.filters, &reason_codes);
        if let Some(acl) = self.acl.as_mut() {
            u.filters.iter().for_each(|f| acl.removed(f));
        }
        self.feed(Packet::UnsubAck(UnsubAck {
            packet_id: u.packet_id,
            reason_codes,
            properties: Default::default(),
        }))
    }

    async fn service_failed(&mut self, e: ServiceError) -> Result<(), Close> {
        debug!(peer = %self.peer, error = %e, "partition call failed");
        match e {
            ServiceError::SessionTakenOver => {
                self.send_disconnect(ReasonCode::SESSION_TAKEN_OVER).await;
                Err(Close::Fenced)
            }
            ServiceError::ShuttingDown => {
                self.send_disconnect(ReasonCode::SERVER_SHUTTING_DOWN).await;
                Err(close_after(&e))
            }
            _ => {
                self.send_disconnect(ReasonCode::UNSPECIFIED_ERROR).await;
                Err(Close::Abnormal)
            }
        }
    }

    /// A delivery not sent to the client counts as delivered: acknowledged to the session so
    /// the in-flight window moves on.
    fn discard_delivery(&mut self, d: &Delivery) {
        if let Some(pid) = d.packet_id {
            let kinds: &[AckKind] = if d.qos == QoS::ExactlyOnce {
                &[AckKind::PubRec, AckKind::PubComp]
            } else {
                &[AckKind::PubAck]
            };
            for kind in kinds {
                drop(self.service.ack(&self.session, *kind, pid));
            }
        }
    }

    /// Removes the filters the ACL denies from a SUBSCRIBE; returns them with their positions.
    fn acl_take_denied(
        &mut self,
        filters: &mut Vec<(String, SubscriptionOptions)>,
    ) -> Vec<(usize, String)> {
        let Some(acl) = self.acl.as_mut() else {
            return Vec::new();
        };
        let mut denied = Vec::new();
        let mut i = 0;
        filters.retain(|(f, _)| {
            i += 1;
            let allowed = acl.may_subscribe(f);
            if !allowed {
                denied.push((i - 1, f.clone()));
            }
            allowed
        });
        for (_, f) in &denied {
            debug!(peer = %self.peer, filter = %f, "subscribe denied by the ACL");
            self.config.metrics.acl_denied(Access::Subscribe);
        }
        denied
    }

    /// Puts the denied filters back in place with 0x87 (3.1.1: 0x80) and remembers the granted
    /// ones, which a reload re-checks.
    fn acl_restore(
        &mut self,
        denied: Vec<(usize, String)>,
        mut filters: Vec<String>,
        mut codes: Vec<ReasonCode>,
    ) -> (Vec<String>, Vec<ReasonCode>) {
        let Some(acl) = self.acl.as_mut() else {
            return (filters, codes);
        };
        for (i, f) in denied {
            filters.insert(i, f);
            codes.insert(i, ReasonCode::NOT_AUTHORIZED);
        }
        for (f, code) in filters.iter().zip(&codes) {
            if !code.is_error() {
                acl.granted(f);
            }
        }
        (filters, codes)
    }

    /// The ACL was reloaded: the subscriptions this connection was granted that the rules no
    /// longer allow leave the session (so they do not come back on reconnect). Deliveries
    /// already stopped: each one is checked against the new rules.
    async fn recheck_acl(&mut self) -> Result<(), Close> {
        let Some(acl) = self.acl.as_mut() else {
            return Ok(());
        };
        let revoked = acl.revoked();
        if revoked.is_empty() {
            return Ok(());
        }
        for filter in &revoked {
            info!(client_id = %self.session.client_id, %filter, "subscription removed: the reloaded ACL denies it");
        }
        let codes = match self
            .service
            .unsubscribe(&self.session, revoked.clone())
            .await
        {
            Ok(codes) => codes,
            Err(e) => return self.service_failed(e).await,
        };
        self.metrics.unsubscribed(&revoked, &codes);
        Ok(())
    }

    fn on_event(&mut self, event: SessionEvent) -> Result<(), Close> {
        match event {
            SessionEvent::Deliver(d) => {
                if d.qos == QoS::ExactlyOnce
                    && d.packet_id
                        .is_some_and(|pid| self.released.is_stale(pid, d.index))
                {
                    trace!(peer = %self.peer, packet_id = ?d.packet_id, index = ?d.index, "stale QoS2 re-send after PUBREC dropped");
                    return Ok(());
                }
                if self
                    .acl
                    .as_mut()
                    .is_some_and(|a| !a.may_deliver(&d.message.topic))
                {
                    // Read access is checked per message: a wildcard subscription meets deny
                    // rules here, and a reload takes effect on existing subscriptions.
                    trace!(peer = %self.peer, topic = %d.message.topic, "delivery denied by the ACL");
                    self.config.metrics.acl_denied(Access::Deliver);
                    self.discard_delivery(&d);
                    return Ok(());
                }
                let unwritten = self.framed.write_buffer().len();
                if d.qos != QoS::AtMostOnce
                    && unwritten
                        > self
                            .config
                            .max_write_buffer
                            .saturating_mul(SLOW_READER_FACTOR)
                {
                    // It does not read: close rather than buffer its in-flight window (up to
                    // 65,535 packets); the session keeps the messages for its next connection.
                    debug!(peer = %self.peer, unwritten, "client does not read: closing");
                    self.config.metrics.limit_hit(Limit::SlowReader);
                    return Err(Close::Abnormal);
                }
                if d.qos == QoS::AtMostOnce
                    && self.framed.write_buffer().len() > self.config.max_write_buffer
                {
                    // A slow reader: QoS0 may be dropped rather than buffered without bound.
                    trace!(peer = %self.peer, "QoS0 delivery dropped, write buffer full");
                    self.metrics.dropped(DropReason::SlowReader);
                    return Ok(());
                }
                let alias = self.outbound_aliases.assign(&d.message.topic);
                let mut publish = Packet::Publish(publish_from_delivery(&d, self.version, alias));
                let mut size = tiermq_common::codec::encoded_len(&publish, self.version);
                if let (Some(AliasUse::New(a)), Packet::Publish(p)) = (alias, &mut publish) {
                    if size as u64 > u64::from(self.client_max_packet) {
                        // The client will not see this mapping: forget it, and try without
                        // the alias property (3 bytes smaller).
                        self.outbound_aliases.forget(a);
                        p.properties.topic_alias = None;
                        size = tiermq_common::codec::encoded_len(&publish, self.version);
                    }
                }
                if size as u64 > u64::from(self.client_max_packet) {
                    // Too large for this client: dropped as if delivered (§3.1.2.11.4), and
                    // acknowledged so the in-flight window moves on.
                    debug!(peer = %self.peer, size, "delivery larger than the client's maximum packet size dropped");
                    self.metrics.dropped(DropReason::PacketTooLarge);
                    self.discard_delivery(&d);
                    return Ok(());
                }
                self.metrics.sent(d.qos);
                self.feed(publish)
            }
            SessionEvent::Release { packet_id } => {
                self.feed(Packet::PubRel(PubRel::new(packet_id)))
            }
            SessionEvent::Disconnect { reason } => {
                debug!(peer = %self.peer, %reason, "disconnected by the server");
                if self.version.is_v5() {
                    self.feed(Packet::Disconnect(Disconnect::with_reason(reason)))?;
                }
                Err(Close::Fenced)
            }
        }
    }
}

/// How a connection closes after a partition call failed. A takeover says nothing more (the
/// newer connection owns the session). Any other failure (a partition unavailable past the
/// deadline, a standalone log append or flush that failed) still tells the session that its
/// connection ended ([`Close::Abnormal`]: the will fires, expiry starts, the queue stops
/// growing for a connection that is gone); closing silently left it attached to nothing.
fn close_after(e: &ServiceError) -> Close {
    match e {
        ServiceError::SessionTakenOver => Close::Fenced,
        _ => Close::Abnormal,
    }
}

/// The first filter of a SUBSCRIBE / UNSUBSCRIBE that breaks the topic filter syntax, if any:
/// a protocol violation that closes the connection ([MQTT-4.7.1-1], [MQTT-4.7.3-1], §4.13),
/// 0x81 in v5. A well-formed filter the server does not take (limits, ACL, an invalid share
/// name) is refused in the SUBACK instead and the connection stays.
fn ill_formed_filter<'a>(
    filters: impl IntoIterator<Item = &'a String>,
) -> Option<topic::TopicError> {
    filters
        .into_iter()
        .filter_map(|f| topic::parse_subscription(f).err())
        .find(topic::TopicError::is_ill_formed_filter)
}

/// Answers a CONNECT with a refusal (§3.2.2.2) and lets the connection close.
async fn refuse<IO>(framed: &mut Framed<IO, MqttCodec>, reason: ReasonCode)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    crate::metrics::connection_refused(reason);
    let _ = framed
        .send(&Packet::ConnAck(ConnAck {
            session_present: false,
            reason_code: reason,
            properties: ConnAckProperties::default(),
        }))
        .await;
}

/// What the exchange before CONNACK needs besides the socket.
struct ConnectAuth<'a> {
    peer: SocketAddr,
    /// The connect timeout covers the whole exchange.
    deadline: Instant,
    shutdown: &'a CancellationToken,
}

/// Runs the enhanced authentication exchange CONNECT started (§4.12) until it succeeds
/// (returns the data for the CONNACK) or ends the connection (`None`, after CONNACK with the
/// failure or DISCONNECT for a protocol error). Before CONNACK the client may only send AUTH
/// or DISCONNECT.
async fn authenticate<IO>(
    framed: &mut Framed<IO, MqttCodec>,
    ctx: ConnectAuth<'_>,
    mut session: AuthSession,
    mut step: AuthStep,
) -> Option<(AuthSession, Option<bytes::Bytes>)>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let peer = ctx.peer;
    loop {
        let challenge = match step {
            AuthStep::Success(data) => return Some((session, data)),
            AuthStep::Fail(code) => {
                let reason = failure_code(code, ReasonSet::ConnAck);
                debug!(%peer, %reason, "authentication failed");
                tokio::time::sleep(session.failure_delay()).await;
                refuse(framed, reason).await;
                return None;
            }
            AuthStep::Continue(data) => data,
        };
        let packet = session.packet(ReasonCode::CONTINUE_AUTHENTICATION, Some(challenge));
        framed.send(&packet).await.ok()?;
        let next = tokio::select! {
            r = tokio::time::timeout_at(ctx.deadline, framed.next()) => r,
            _ = ctx.shutdown.cancelled() => return None,
        };
        let violation = match next {
            Ok(Some(Ok(Packet::Auth(a)))) => match session.on_auth(a, false) {
                Ok(s) => {
                    step = s;
                    continue;
                }
                Err(why) => why,
            },
            Ok(Some(Ok(Packet::Disconnect(_)))) | Ok(None) => return None,
            Ok(Some(Ok(_))) => "packet other than AUTH before CONNACK",
            Ok(Some(Err(e))) => {
                debug!(%peer, error = %e, "decode error during authentication");
                if !matches!(e, DecodeError::Io(_)) {
                    let _ = framed
                        .send(&Packet::Disconnect(Disconnect::with_reason(
                            e.reason_code(),
                        )))
                        .await;
                }
                return None;
            }
            Err(_) => {
                debug!(%peer, "authentication not finished before the connect timeout");
                return None;
            }
        };
        debug!(%peer, why = violation, "protocol violation during authentication");
        let _ = framed
            .send(&Packet::Disconnect(Disconnect::with_reason(
                ReasonCode::PROTOCOL_ERROR,
            )))
            .await;
        return None;
    }
}

#[cfg(test)]
mod tests;

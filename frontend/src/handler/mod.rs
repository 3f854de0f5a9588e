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
//!
//! This file holds the connection's life (wait for CONNECT, the loop, packet dispatch); each
//! packet family has its own file:
//!
//! - `connect.rs`: CONNECT checks, the session's opening, CONNACK;
//!   `authenticate.rs`: AUTH exchanges, before CONNACK and re-authentication after it.
//! - `publish.rs`: PUBLISH from the client (QoS1/QoS2 acks in order once durable) and PUBREL.
//! - `subscribe.rs`: SUBSCRIBE / UNSUBSCRIBE and the ACL's say on subscriptions.
//! - `delivery.rs`: session events to the client (PUBLISH, PUBREL, DISCONNECT) and the
//!   client's PUBACK / PUBREC / PUBCOMP for them.
//! - `close.rs`: how the connection ends: DISCONNECT, protocol errors, failed partition calls,
//!   what the session is told, drain.
//! - `socket.rs`: reading packets and writing the buffer without waiting on a slow reader.

mod authenticate;
mod close;
mod connect;
mod delivery;
mod publish;
mod socket;
mod subscribe;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures::stream::FuturesOrdered;
use futures::{SinkExt, StreamExt};
use tiermq_common::codec::{ConnAck, ConnAckProperties, DecodeError, MqttCodec, Packet};
use tiermq_common::released_ids::ReleasedIds;
use tiermq_common::session_api::{SessionEvent, SessionRef, SessionService};
use tiermq_common::{ProtocolVersion, ReasonCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::{debug, trace};

use crate::acl::AclView;
use crate::alias::OutboundAliases;
use crate::auth::AuthSession;
use crate::config::FrontendConfig;
use crate::limits::{Limit, PublishThrottle};
use crate::listener::ConnectionInfo;
use crate::metrics::ConnectionMetrics;
use crate::takeover::LiveEntry;

use close::Close;
use connect::refuse;
use delivery::PendingRelease;
use publish::PendingAck;
use socket::{next_packet, Next, Reading};

/// Initial read buffer of a connection (it grows while a client sends faster).
const READ_BUFFER_START: usize = 1024;

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
            Packet::PubRel(r) => {
                self.on_pubrel(r);
                Ok(())
            }
            Packet::PubAck(a) => {
                self.on_puback(a);
                Ok(())
            }
            Packet::PubRec(a) => {
                self.on_pubrec(a);
                Ok(())
            }
            Packet::PubComp(a) => {
                self.on_pubcomp(a);
                Ok(())
            }
            Packet::Subscribe(s) => self.on_subscribe(s).await,
            Packet::Unsubscribe(u) => self.on_unsubscribe(u).await,
            Packet::PingReq => self.feed(Packet::PingResp),
            Packet::Disconnect(d) => self.on_disconnect(d).await,
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
}

#[cfg(test)]
mod tests;

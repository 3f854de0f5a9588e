//! How a connection ends: the client's DISCONNECT, a protocol violation, a partition call
//! that failed, shutdown or drain — and what the session is told about it.

use std::time::Duration;

use futures::StreamExt;
use tiermq_common::codec::{Disconnect, Packet};
use tiermq_common::session_api::{DisconnectRequest, ServiceError, SessionService};
use tiermq_common::ReasonCode;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tracing::debug;

use super::Handler;

/// Why the connection ends, which decides what the session is told.
pub(super) enum Close {
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

/// How long a draining connection waits for the partitions to answer the publishes it
/// already passed on, so their PUBACKs still go out before the close.
const DRAIN_ACK_WAIT: Duration = Duration::from_secs(2);

impl<S, IO> Handler<S, IO>
where
    S: SessionService,
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    /// DISCONNECT from the client: the connection ends as its reason code says.
    pub(super) async fn on_disconnect(&mut self, d: Disconnect) -> Result<(), Close> {
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

    /// Tells the partitions how the connection ended, then writes the last packets.
    pub(super) async fn finish(&mut self, close: Close) {
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

    pub(super) async fn send_disconnect(&mut self, reason: ReasonCode) {
        let disconnect = Packet::Disconnect(Disconnect::with_reason(reason));
        if self.version.is_v5() && self.feed(disconnect).is_ok() {
            let _ = self.flush().await;
        }
    }

    pub(super) async fn protocol_error(
        &mut self,
        reason: ReasonCode,
        why: &str,
    ) -> Result<(), Close> {
        debug!(peer = %self.peer, %reason, why, "protocol violation");
        self.send_disconnect(reason).await;
        Err(Close::Abnormal)
    }

    pub(super) async fn service_failed(&mut self, e: ServiceError) -> Result<(), Close> {
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
}

/// How a connection closes after a partition call failed. A takeover says nothing more (the
/// newer connection owns the session). Any other failure (a partition unavailable past the
/// deadline, a standalone log append or flush that failed) still tells the session that its
/// connection ended ([`Close::Abnormal`]: the will fires, expiry starts, the queue stops
/// growing for a connection that is gone); closing silently left it attached to nothing.
pub(super) fn close_after(e: &ServiceError) -> Close {
    match e {
        ServiceError::SessionTakenOver => Close::Fenced,
        _ => Close::Abnormal,
    }
}

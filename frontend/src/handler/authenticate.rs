//! Enhanced authentication (§4.12): the AUTH exchange a CONNECT starts, before CONNACK, and
//! re-authentication after it.

use std::net::SocketAddr;

use futures::{SinkExt, StreamExt};
use tiermq_common::codec::{Auth, DecodeError, Disconnect, MqttCodec, Packet, ReasonSet};
use tiermq_common::session_api::SessionService;
use tiermq_common::ReasonCode;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{refuse, Close, Handler};
use crate::auth::{failure_code, AuthSession, AuthStep};

impl<S, IO> Handler<S, IO>
where
    S: SessionService,
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    /// AUTH after CONNACK: re-authentication (§4.12.1). The exchange runs between other
    /// packets, so publishes and deliveries keep flowing while it is in progress.
    pub(super) async fn on_auth(&mut self, a: Auth) -> Result<(), Close> {
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
}

/// What the exchange before CONNACK needs besides the socket.
pub(super) struct ConnectAuth<'a> {
    pub(super) peer: SocketAddr,
    /// The connect timeout covers the whole exchange.
    pub(super) deadline: Instant,
    pub(super) shutdown: &'a CancellationToken,
}

/// Runs the enhanced authentication exchange CONNECT started (§4.12) until it succeeds
/// (returns the data for the CONNACK) or ends the connection (`None`, after CONNACK with the
/// failure or DISCONNECT for a protocol error). Before CONNACK the client may only send AUTH
/// or DISCONNECT.
pub(super) async fn authenticate<IO>(
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

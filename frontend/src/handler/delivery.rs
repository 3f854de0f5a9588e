//! Deliveries: session events to the client (PUBLISH, PUBREL re-sends, a server-side
//! DISCONNECT), and the client's PUBACK / PUBREC / PUBCOMP for them. The partitions assign
//! the packet ids and keep the in-flight window; the connection checks each delivery (stale
//! QoS2 replay, ACL, slow reader, the client's Maximum Packet Size) and holds PUBREL until
//! the PUBREC is durable.

use std::pin::Pin;

use futures::Future;
use tiermq_common::codec::{Disconnect, Packet, PubAck, PubComp, PubRec, PubRel};
use tiermq_common::session_api::{AckKind, Delivery, ServiceResult, SessionEvent, SessionService};
use tiermq_common::QoS;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, trace};

use super::close::close_after;
use super::{Close, Handler};
use crate::acl::Access;
use crate::alias::AliasUse;
use crate::convert::publish_from_delivery;
use crate::limits::{Limit, SLOW_READER_FACTOR};
use crate::metrics::DropReason;

/// A subscriber's PUBREC on its way to being durable; PUBREL (the packet id) follows it.
pub(super) type PendingRelease =
    Pin<Box<dyn Future<Output = (u16, ServiceResult<Option<u64>>)> + Send>>;

impl<S, IO> Handler<S, IO>
where
    S: SessionService,
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    pub(super) fn on_event(&mut self, event: SessionEvent) -> Result<(), Close> {
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

    pub(super) fn on_puback(&mut self, a: PubAck) {
        self.ack(AckKind::PubAck, a.packet_id);
    }

    pub(super) fn on_pubrec(&mut self, a: PubRec) {
        if a.reason_code.is_error() {
            // The receiver refused the message: the exchange ends here (§4.3.3), and
            // nothing is sent that a lost ack could make it see twice.
            self.ack(AckKind::PubRec, a.packet_id);
            self.ack(AckKind::PubComp, a.packet_id);
            return;
        }
        // PUBREL only once the PUBREC is durable (`SessionService::ack`).
        let wait = self
            .service
            .ack(&self.session, AckKind::PubRec, a.packet_id);
        let pid = a.packet_id;
        self.releases
            .push_back(Box::pin(async move { (pid, wait.await) }));
    }

    pub(super) fn on_pubcomp(&mut self, a: PubComp) {
        self.released.pubcomp(a.packet_id);
        self.ack(AckKind::PubComp, a.packet_id);
    }

    fn ack(&mut self, kind: AckKind, packet_id: u16) {
        // PUBACK / PUBCOMP need no durability (a lost one means a redelivery): submit and
        // move on. (A PUBREC followed by PUBREL waits: `on_pubrec_durable`.)
        drop(self.service.ack(&self.session, kind, packet_id));
    }

    /// The PUBREC of delivery `pid` is durable: PUBREL may go out. If it could not be made
    /// durable, no PUBREL: the session re-sends the PUBLISH (DUP) to the next connection,
    /// which the client, still holding the packet id, answers with PUBREC again.
    pub(super) fn on_pubrec_durable(
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
}

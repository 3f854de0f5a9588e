//! PUBLISH from the client, and PUBREL for its QoS2 publishes.
//!
//! A publish is submitted to the partitions at once; its acknowledgement (PUBACK, PUBREC,
//! PUBCOMP for a PUBREL) waits in `Handler::pending`, a `FuturesOrdered`, so a client may
//! pipeline publishes and still gets its acks in the order it sent them (§4.6), each only
//! once the partitions made the message durable.

use std::pin::Pin;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::Future;
use tiermq_common::codec::{Packet, PubAck, PubComp, PubRec, PubRel, Publish};
use tiermq_common::session_api::{Published, ServiceError, ServiceResult, SessionService};
use tiermq_common::{topic, QoS, ReasonCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::close::close_after;
use super::{Close, Handler};
use crate::acl::Access;
use crate::convert::message_from_publish;
use crate::metrics::DropReason;
use crate::sys_topics::is_sys_topic;

/// The wait for one acknowledgement the client is owed, in `Handler::pending`.
pub(super) type PendingAck = Pin<Box<dyn Future<Output = Outgoing> + Send>>;

/// An acknowledgement owed to the client once the partitions answered.
#[allow(clippy::enum_variant_names)] // named after the packets they become
pub(super) enum Outgoing {
    PubAck(u16, ServiceResult<Published>),
    PubRec(u16, ServiceResult<Published>),
    PubComp(u16, ServiceResult<bool>),
    /// An answer decided at once (a refused publish): it still waits for the acks of the
    /// publishes before it, so acks leave in the order the publishes arrived (§4.6).
    Decided(Box<Packet>),
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl<S, IO> Handler<S, IO>
where
    S: SessionService,
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    pub(super) async fn on_publish(&mut self, mut p: Publish) -> Result<(), Close> {
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
    pub(super) fn on_durable(&mut self, done: Outgoing) -> Result<(), Close> {
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

    /// PUBREL from the client for one of its QoS2 publishes: PUBCOMP once the partitions
    /// released the packet id, in order with the other acks.
    pub(super) fn on_pubrel(&mut self, r: PubRel) {
        let wait = self.service.release(&self.session, r.packet_id);
        let pid = r.packet_id;
        self.pending
            .push_back(Box::pin(async move { Outgoing::PubComp(pid, wait.await) }));
    }
}

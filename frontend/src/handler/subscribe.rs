//! SUBSCRIBE and UNSUBSCRIBE, with what the ACL and `[limits]` say about each filter, and the
//! subscriptions a reloaded ACL takes back.

use tiermq_common::codec::{Packet, SubAck, Subscribe, UnsubAck, Unsubscribe};
use tiermq_common::session_api::{SessionService, SubscribeRequest, SubscriptionOptions};
use tiermq_common::{topic, ReasonCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info};

use super::{Close, Handler};
use crate::acl::Access;

impl<S, IO> Handler<S, IO>
where
    S: SessionService,
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    pub(super) async fn on_subscribe(&mut self, mut s: Subscribe) -> Result<(), Close> {
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

    pub(super) async fn on_unsubscribe(&mut self, u: Unsubscribe) -> Result<(), Close> {
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
    pub(super) async fn recheck_acl(&mut self) -> Result<(), Close> {
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

//! SUBSCRIBE and UNSUBSCRIBE on a session: the stored subscriptions, the partition's filter
//! index, the route changes they cause, and the retained messages a subscribe is sent.
//!
//! A shared subscription is only recorded here as the session's membership; the group itself
//! is in `shared.rs`, on the partition of its key.

use std::sync::Arc;

use tiermq_common::session_api::SubscribeRequest;
use tiermq_common::{topic, ReasonCode};

use super::command::{Reply, RetainedForSubscription};
use super::retained::{enqueue_retained, retained_for_filter};
use super::session::StoredSubscription;
use super::{Effect, Partition};

impl Partition {
    pub(super) fn subscribe(
        &mut self,
        client_id: &Arc<str>,
        epoch: u64,
        requests: Vec<SubscribeRequest>,
        now: u64,
        effects: &mut Vec<Effect>,
    ) -> Reply {
        let limits = self.limits;
        let session = match self.sessions.get_mut(client_id) {
            None => return Reply::NoSession,
            Some(s) if s.epoch() != Some(epoch) => return Reply::Fenced,
            Some(s) => s,
        };
        let mut reason_codes = Vec::with_capacity(requests.len());
        let mut want_retained = Vec::new();
        for req in requests {
            let filter = match topic::parse_subscription(&req.filter) {
                Err(e) => {
                    reason_codes.push(e.reason_code());
                    continue;
                }
                Ok((Some(group), f)) => {
                    // The membership is kept here, with the session (so it ends with it);
                    // the group itself lives in the partition of its key, which the caller
                    // joins next. Retained messages are not sent on a shared subscribe
                    // (§4.8.2).
                    let key = format!("{}{group}/{f}", topic::SHARE_PREFIX);
                    let is_new = !session.subscriptions.contains_key(&key);
                    if is_new
                        && limits.max_subscriptions > 0
                        && session.subscriptions.len() >= limits.max_subscriptions
                    {
                        reason_codes.push(ReasonCode::QUOTA_EXCEEDED);
                        continue;
                    }
                    session.subscriptions.insert(
                        key,
                        StoredSubscription {
                            options: req.options,
                            subscription_id: req.subscription_id,
                        },
                    );
                    reason_codes.push(ReasonCode(req.options.qos.as_u8()));
                    continue;
                }
                Ok((None, f)) => f.to_string(),
            };
            let is_new = !session.subscriptions.contains_key(&filter);
            if is_new
                && limits.max_subscriptions > 0
                && session.subscriptions.len() >= limits.max_subscriptions
            {
                reason_codes.push(ReasonCode::QUOTA_EXCEEDED);
                continue;
            }
            let stored = StoredSubscription {
                options: req.options,
                subscription_id: req.subscription_id,
            };
            session.subscriptions.insert(filter.clone(), stored);
            let had_route = self.subscriptions.contains_filter(&filter)
                || self.shared_filters.contains_filter(&filter);
            self.subscriptions
                .insert(&filter, client_id.clone(), stored);
            if !had_route {
                effects.push(Effect::RouteAdded {
                    filter: filter.clone(),
                });
            }
            reason_codes.push(ReasonCode(req.options.qos.as_u8()));
            let send_retained = match req.options.retain_handling {
                0 => true,
                1 => is_new,
                _ => false,
            };
            if send_retained {
                let messages = retained_for_filter(&self.retained, &filter, now);
                enqueue_retained(
                    session,
                    &RetainedForSubscription {
                        filter: filter.clone(),
                        options: req.options,
                        subscription_id: req.subscription_id,
                        messages,
                    },
                    now,
                    &limits,
                    effects,
                );
                want_retained.push((filter, req.options, req.subscription_id));
            }
        }
        self.dirty.sessions.insert(client_id.clone());
        Reply::Subscribed {
            reason_codes,
            want_retained,
        }
    }

    pub(super) fn unsubscribe(
        &mut self,
        client_id: &Arc<str>,
        epoch: u64,
        filters: Vec<String>,
        effects: &mut Vec<Effect>,
    ) -> Reply {
        let session = match self.sessions.get_mut(client_id) {
            None => return Reply::NoSession,
            Some(s) if s.epoch() != Some(epoch) => return Reply::Fenced,
            Some(s) => s,
        };
        let mut codes = Vec::with_capacity(filters.len());
        for f in filters {
            let filter = match topic::parse_subscription(&f) {
                Ok((None, f)) => f.to_string(),
                Ok((Some(group), f)) => {
                    let key = format!("{}{group}/{f}", topic::SHARE_PREFIX);
                    codes.push(match session.subscriptions.remove(&key) {
                        Some(_) => ReasonCode::SUCCESS,
                        None => ReasonCode::NO_SUBSCRIPTION_EXISTED,
                    });
                    continue;
                }
                Err(e) => {
                    codes.push(e.reason_code());
                    continue;
                }
            };
            if session.subscriptions.remove(&filter).is_some() {
                self.subscriptions.remove(&filter, client_id);
                if !self.subscriptions.contains_filter(&filter)
                    && !self.shared_filters.contains_filter(&filter)
                {
                    effects.push(Effect::RouteRemoved {
                        filter: filter.clone(),
                    });
                }
                codes.push(ReasonCode::SUCCESS);
            } else {
                codes.push(ReasonCode::NO_SUBSCRIPTION_EXISTED);
            }
        }
        self.dirty.sessions.insert(client_id.clone());
        Reply::Unsubscribed(codes)
    }
}

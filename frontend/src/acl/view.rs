//! One connection's access to the current rules: its identity, a cache of delivery decisions,
//! and the filters it was granted, re-checked when the rules are reloaded.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tiermq_common::topic;
use tokio::sync::watch as channel;

use super::{Access, AclRules, Who};

/// Deliveries' decisions kept per connection, by topic; cleared on reload and when full.
const CACHE_MAX: usize = 1024;

/// One connection's access to the current rules: its identity, a cache of delivery decisions
/// and the filters it was granted (re-checked on reload).
#[derive(Debug)]
pub struct AclView {
    rx: channel::Receiver<Arc<AclRules>>,
    rules: Arc<AclRules>,
    username: Option<Arc<str>>,
    client_id: Arc<str>,
    cache: HashMap<String, bool>,
    /// Filters (as subscribed, `$share/...` included) granted on this connection.
    granted: HashSet<String>,
    /// The rules changed and the granted filters have not been re-checked yet.
    recheck_due: bool,
}

impl AclView {
    /// A view on the rules `rx` carries, for the client `username`/`client_id`.
    pub(super) fn new(
        mut rx: channel::Receiver<Arc<AclRules>>,
        username: Option<Arc<str>>,
        client_id: Arc<str>,
    ) -> AclView {
        let rules = rx.borrow_and_update().clone();
        AclView {
            rx,
            rules,
            username,
            client_id,
            cache: HashMap::new(),
            granted: HashSet::new(),
            recheck_due: false,
        }
    }

    fn who(&self) -> Who<'_> {
        Who {
            username: self.username.as_deref(),
            client_id: &self.client_id,
        }
    }

    /// Takes the newest rules if there are (cheap: one atomic load when nothing changed).
    fn refresh(&mut self) {
        if self.rx.has_changed().unwrap_or(false) {
            self.rules = self.rx.borrow_and_update().clone();
            self.cache.clear();
            self.recheck_due = true;
        }
    }

    pub fn may_publish(&mut self, topic: &str) -> bool {
        self.refresh();
        self.rules.check(&self.who(), Access::Publish, topic)
    }

    /// `filter` as the client sent it: a shared subscription is checked on its filter part.
    pub fn may_subscribe(&mut self, filter: &str) -> bool {
        self.refresh();
        let plain = match topic::parse_subscription(filter) {
            Ok((_, f)) => f,
            // Invalid filters are refused by the partitions with their own reason code.
            Err(_) => return true,
        };
        self.rules.check(&self.who(), Access::Subscribe, plain)
    }

    pub fn may_deliver(&mut self, topic: &str) -> bool {
        self.refresh();
        if let Some(&ok) = self.cache.get(topic) {
            return ok;
        }
        let ok = self.rules.check(&self.who(), Access::Deliver, topic);
        if self.cache.len() >= CACHE_MAX {
            self.cache.clear();
        }
        self.cache.insert(topic.to_string(), ok);
        ok
    }

    /// The session now holds `filter` (a SUBACK granted it).
    pub fn granted(&mut self, filter: &str) {
        self.granted.insert(filter.to_string());
    }

    /// The session no longer holds `filter`.
    pub fn removed(&mut self, filter: &str) {
        self.granted.remove(filter);
    }

    /// Resolves when the rules were reloaded since the last call (never without an ACL).
    pub async fn reloaded(view: &mut Option<AclView>) {
        let Some(v) = view.as_mut() else {
            return std::future::pending().await;
        };
        if !v.recheck_due {
            if v.rx.changed().await.is_err() {
                return std::future::pending().await;
            }
            v.rules = v.rx.borrow_and_update().clone();
            v.cache.clear();
        }
        v.recheck_due = false;
    }

    /// The granted filters the current rules no longer allow; they are forgotten here (the
    /// caller unsubscribes them).
    pub fn revoked(&mut self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let filters: Vec<String> = self.granted.iter().cloned().collect();
        for f in filters {
            if !self.may_subscribe(&f) {
                self.granted.remove(&f);
                out.push(f);
            }
        }
        out.sort();
        out
    }
}

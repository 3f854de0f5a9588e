//! Routes of subscriptions handed to their partition and not yet answered.
//!
//! A router (the standalone `LocalBroker`, the cluster's `ClusterClient`) learns a partition's
//! routes from the partition itself, once it has applied the SUBSCRIBE — after the log flush
//! (standalone) or the Raft commit (cluster). A publish read in between would find no route and
//! miss a subscription the broker had already read. So a SUBSCRIBE adds its filters here as
//! soon as its command is submitted, and a publish is routed to the partitions it matches here
//! too: the partition's log then holds the SUBSCRIBE before the publish (both go through the
//! same ordered channel, the publish submitted after it saw this route), so the subscription
//! counts from when the broker read it. Routing a publish to a partition where the subscription
//! then was refused is harmless: the partition finds no match.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::RwLock;

use crate::topic;
use crate::trie::TopicTrie;

/// Filter → partitions with a subscription on it in flight (and how many).
#[derive(Default)]
pub struct PendingRoutes {
    trie: RwLock<TopicTrie<u32, usize>>,
    /// Entries in `trie`: lets the publish path skip the lock when nothing is in flight.
    count: AtomicUsize,
}

impl PendingRoutes {
    /// Adds the plain filters of a SUBSCRIBE submitted to `partition`, until the guard drops
    /// (when the partition has answered and its own routes are in place). Call it *after*
    /// submitting the command: a publish that sees the route is then submitted after it.
    /// Shared subscriptions (`$share/...`) are not added: their group lives in another
    /// partition, joined only after this one answers.
    pub fn add<'a>(
        &'a self,
        filters: impl IntoIterator<Item = &'a str>,
        partition: u32,
    ) -> PendingGuard<'a> {
        let filters: Vec<&'a str> = filters
            .into_iter()
            .filter(|f| matches!(topic::parse_subscription(f), Ok((None, _))))
            .collect();
        if !filters.is_empty() {
            let mut trie = self.trie.write().unwrap_or_else(|e| e.into_inner());
            for f in &filters {
                match trie.get_mut(f, &partition) {
                    Some(n) => *n += 1,
                    None => {
                        trie.insert(f, partition, 1);
                        self.count.fetch_add(1, Ordering::Release);
                    }
                }
            }
        }
        PendingGuard {
            routes: self,
            filters,
            partition,
        }
    }

    /// Calls `f` with every partition that has a pending subscription matching `topic`.
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(u32)) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        let trie = self.trie.read().unwrap_or_else(|e| e.into_inner());
        trie.for_each_match(topic, |_, p, _| f(*p));
    }
}

/// Keeps a SUBSCRIBE's filters in [`PendingRoutes`] while it lives.
pub struct PendingGuard<'a> {
    routes: &'a PendingRoutes,
    filters: Vec<&'a str>,
    partition: u32,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if self.filters.is_empty() {
            return;
        }
        let mut trie = self.routes.trie.write().unwrap_or_else(|e| e.into_inner());
        for f in &self.filters {
            let last = match trie.get_mut(f, &self.partition) {
                Some(n) => {
                    *n -= 1;
                    *n == 0
                }
                None => false,
            };
            if last {
                trie.remove(f, &self.partition);
                self.routes.count.fetch_sub(1, Ordering::Release);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(r: &PendingRoutes, topic: &str) -> Vec<u32> {
        let mut out = Vec::new();
        r.for_each_match(topic, |p| out.push(p));
        out.sort_unstable();
        out
    }

    #[test]
    fn a_route_lives_as_long_as_its_guards() {
        let r = PendingRoutes::default();
        let a = r.add(["a/+", "$share/g/a/b"], 1);
        let b = r.add(["a/+"], 1);
        let c = r.add(["#"], 2);
        assert_eq!(matches(&r, "a/b"), vec![1, 2]);
        drop(a);
        assert_eq!(
            matches(&r, "a/b"),
            vec![1, 2],
            "still pending for the second SUBSCRIBE"
        );
        drop(b);
        drop(c);
        assert!(matches(&r, "a/b").is_empty());
        assert_eq!(r.count.load(Ordering::Relaxed), 0);
    }
}

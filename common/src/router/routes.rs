//! The route table: which partitions hold a subscription on which filter, so a publish goes
//! only where it can match.
//!
//! One table serves both tiers; what differs is where its entries come from and how far it
//! may be trusted:
//! - **in process** (standalone): the partitions write it themselves when they apply a
//!   SUBSCRIBE or UNSUBSCRIBE (`RouteAdded`/`RouteRemoved` effects), before they answer.
//!   It is always complete.
//! - **leased** (cluster): each partition's leader streams its changes to every frontend
//!   ([`RouteTable::apply_update`]) and grants route leases on acknowledged updates
//!   ([`crate::route_lease`]). A partition whose source is unknown, or whose source's lease
//!   ran out, is *untrusted*: every publish goes to it whatever its topic, so a stale table
//!   costs traffic, never a delivery.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use crate::trie::TopicTrie;

/// One leader's change of its partition's routes, as its route stream carries it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteUpdate {
    pub partition: u32,
    /// False: the node no longer leads the partition (its routes are unknown from now).
    pub leader: bool,
    /// The leader's term: updates of an earlier term than one already heard are stale.
    pub term: u64,
    /// The update replaces the partition's whole table (a new leader's snapshot).
    pub reset: bool,
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

/// Filter → partitions with at least one subscription on it; see the module doc.
pub struct RouteTable {
    trie: TopicTrie<u32, ()>,
    filters: Vec<HashSet<String>>,
    /// In process: every partition is always trusted.
    complete: bool,
    /// Which node's stream the partition's routes come from; `None`: unknown.
    known_from: Vec<Option<u64>>,
    /// The latest leader term heard of per partition: updates of an earlier term (a deposed
    /// leader that does not know it yet) are ignored.
    terms: Vec<u64>,
    /// Per node: until when its routes may be trusted (its route lease).
    leases: HashMap<u64, Instant>,
    /// The earliest lease end among the nodes routes come from (`None`: one of them has no
    /// lease): before it every known partition is trusted, the publish path's quick check.
    all_trusted_until: Option<Instant>,
}

impl RouteTable {
    fn new(partitions: u32, complete: bool) -> RouteTable {
        RouteTable {
            trie: TopicTrie::new(),
            filters: vec![HashSet::new(); partitions as usize],
            complete,
            known_from: vec![None; partitions as usize],
            terms: vec![0; partitions as usize],
            leases: HashMap::new(),
            all_trusted_until: None,
        }
    }

    /// A table that in-process partitions keep up to date themselves (standalone).
    pub fn in_process(partitions: u32) -> RouteTable {
        Self::new(partitions, true)
    }

    /// A table fed by leaders' route streams under leases (cluster).
    pub fn leased(partitions: u32) -> RouteTable {
        Self::new(partitions, false)
    }

    /// Whether the partitions write this table at apply, before they answer: then a
    /// subscriber's own route is in place when its SUBACK goes out.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    pub fn add(&mut self, partition: u32, filter: &str) {
        let Some(set) = self.filters.get_mut(partition as usize) else {
            return;
        };
        if set.insert(filter.to_string()) {
            self.trie.insert(filter, partition, ());
        }
    }

    pub fn remove(&mut self, partition: u32, filter: &str) {
        let Some(set) = self.filters.get_mut(partition as usize) else {
            return;
        };
        if set.remove(filter) {
            self.trie.remove(filter, &partition);
        }
    }

    /// Adds to `out` every partition a message on `topic` must go to: those with a matching
    /// route, and those whose routes are not trusted at `now`.
    pub fn targets(&self, topic: &str, now: Instant, out: &mut Vec<u32>) {
        self.trie.for_each_match(topic, |_, p, _| {
            if !out.contains(p) {
                out.push(*p);
            }
        });
        if self.complete || self.all_trusted_until.is_some_and(|t| now < t) {
            return;
        }
        for p in 0..self.known_from.len() {
            if !self.trusted(p, now) && !out.contains(&(p as u32)) {
                out.push(p as u32);
            }
        }
    }

    /// Whether publishes may be sent to partition `p` by its routes alone.
    fn trusted(&self, p: usize, now: Instant) -> bool {
        if self.complete {
            return true;
        }
        let Some(node) = self.known_from[p] else {
            return false;
        };
        self.all_trusted_until.is_some_and(|t| now < t)
            || self.leases.get(&node).is_some_and(|&end| now < end)
    }

    /// Partitions whose source is unknown: no open route stream from a node that says it
    /// leads them.
    pub fn unknown_partitions(&self) -> Vec<u32> {
        if self.complete {
            return Vec::new();
        }
        (0..self.known_from.len() as u32)
            .filter(|&p| self.known_from[p as usize].is_none())
            .collect()
    }

    /// The node partition `p`'s routes come from (`None`: unknown, or in process).
    pub fn source(&self, p: u32) -> Option<u64> {
        self.known_from.get(p as usize).copied().flatten()
    }

    /// The nodes some partition's routes come from.
    pub fn sources(&self) -> impl Iterator<Item = u64> + '_ {
        self.known_from.iter().flatten().copied()
    }

    /// The filters partition `p` has routes for, sorted.
    pub fn filters_of(&self, p: u32) -> Vec<String> {
        let mut out: Vec<String> = self
            .filters
            .get(p as usize)
            .map(|f| f.iter().cloned().collect())
            .unwrap_or_default();
        out.sort();
        out
    }

    /// Takes one update from `node`'s route stream. Returns true if `node` is (still) the
    /// partition's leader by it: the caller may route operations there.
    pub fn apply_update(&mut self, node: u64, u: RouteUpdate) -> bool {
        let p = u.partition as usize;
        if p >= self.filters.len() {
            return false;
        }
        if !u.leader {
            if self.known_from[p] == Some(node) {
                self.known_from[p] = None;
            }
            return false;
        }
        if u.term < self.terms[p] {
            tracing::debug!(
                node,
                partition = p,
                term = u.term,
                "routes of a deposed leader ignored"
            );
            return false;
        }
        self.terms[p] = u.term;
        if u.reset {
            for f in self.filters[p].drain() {
                self.trie.remove(&f, &(p as u32));
            }
        }
        for f in &u.added {
            self.add(p as u32, f);
        }
        for f in &u.removed {
            self.remove(p as u32, f);
        }
        if self.known_from[p] != Some(node) {
            self.known_from[p] = Some(node);
            self.recompute_trust();
        }
        true
    }

    /// Extends `node`'s lease to `until` (a renewal the node granted).
    pub fn renew(&mut self, node: u64, until: Instant) {
        let end = self.leases.entry(node).or_insert(until);
        *end = (*end).max(until);
        self.recompute_trust();
    }

    /// Drops what `node` said: its stream broke, so its table and its lease are gone.
    pub fn forget(&mut self, node: u64) {
        for k in self.known_from.iter_mut() {
            if *k == Some(node) {
                *k = None;
            }
        }
        self.leases.remove(&node);
    }

    /// Called whenever a partition gains a source or a lease changes. (Losing a source needs
    /// no call: the earlier minimum stays a safe underestimate.)
    fn recompute_trust(&mut self) {
        let mut until: Option<Instant> = None;
        for node in self.known_from.iter().flatten() {
            let Some(&end) = self.leases.get(node) else {
                self.all_trusted_until = None;
                return;
            };
            until = Some(until.map_or(end, |u| u.min(end)));
        }
        self.all_trusted_until = until;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn targets(t: &RouteTable, topic: &str, now: Instant) -> Vec<u32> {
        let mut out = Vec::new();
        t.targets(topic, now, &mut out);
        out.sort_unstable();
        out
    }

    fn update(partition: u32, term: u64, added: &[&str]) -> RouteUpdate {
        RouteUpdate {
            partition,
            leader: true,
            term,
            reset: true,
            added: added.iter().map(|s| s.to_string()).collect(),
            removed: Vec::new(),
        }
    }

    #[test]
    fn an_in_process_table_routes_by_its_entries_only() {
        let mut t = RouteTable::in_process(3);
        t.add(1, "a/+");
        t.add(1, "a/+");
        t.add(2, "#");
        let now = Instant::now();
        assert_eq!(targets(&t, "a/b", now), vec![1, 2]);
        t.remove(1, "a/+");
        assert_eq!(targets(&t, "a/b", now), vec![2]);
        assert!(t.unknown_partitions().is_empty());
    }

    #[test]
    fn a_leased_table_sends_everywhere_until_sources_and_leases_are_known() {
        let mut t = RouteTable::leased(2);
        let now = Instant::now();
        assert_eq!(targets(&t, "x", now), vec![0, 1], "nothing known yet");
        assert!(t.apply_update(7, update(0, 1, &["a"])));
        assert!(t.apply_update(7, update(1, 1, &[])));
        assert_eq!(targets(&t, "x", now), vec![0, 1], "known but no lease");
        t.renew(7, now + Duration::from_secs(1));
        assert!(targets(&t, "x", now).is_empty());
        assert_eq!(targets(&t, "a", now), vec![0]);
        let later = now + Duration::from_secs(2);
        assert_eq!(targets(&t, "x", later), vec![0, 1], "the lease ran out");
        t.forget(7);
        assert_eq!(t.unknown_partitions(), vec![0, 1]);
    }

    #[test]
    fn updates_of_a_deposed_leader_are_ignored() {
        let mut t = RouteTable::leased(1);
        assert!(t.apply_update(1, update(0, 5, &["new"])));
        assert!(!t.apply_update(2, update(0, 4, &["old"])));
        t.renew(1, Instant::now() + Duration::from_secs(5));
        assert_eq!(targets(&t, "old", Instant::now()), Vec::<u32>::new());
        assert_eq!(targets(&t, "new", Instant::now()), vec![0]);
    }
}

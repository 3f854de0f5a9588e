//! Outbound topic aliases (MQTT 5 §3.3.2.3.4): the broker replaces a topic it already sent to
//! a client by a two-byte number.
//!
//! A client announces in CONNECT how many aliases it can remember (Topic Alias Maximum); the
//! broker may use aliases `1..=max` and decides alone which topic each one stands for. The
//! first PUBLISH of a topic carries the topic *and* a fresh alias, which teaches the client the
//! mapping; later ones carry an empty topic and the alias, saving the topic's bytes on every
//! delivery of a busy topic.
//!
//! When every alias is taken, the least recently used one is re-mapped to the new topic (the
//! PUBLISH carries topic + alias again, which the client treats as a new mapping). The LRU
//! order is an intrusive doubly linked list over the slot vector, so a hit, a miss and an
//! eviction are all O(1) and a hit allocates nothing.

use std::collections::HashMap;
use std::sync::Arc;

/// No neighbour in the LRU list.
const NIL: usize = usize::MAX;

/// What to put in an outgoing PUBLISH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AliasUse {
    /// The client knows this alias: send an empty topic and the alias.
    Known(u16),
    /// A new (or re-mapped) alias: send the topic and the alias.
    New(u16),
}

impl AliasUse {
    pub fn alias(self) -> u16 {
        match self {
            AliasUse::Known(a) | AliasUse::New(a) => a,
        }
    }
}

/// One alias: the topic it stands for (None while free) and its place in the LRU list.
struct Slot {
    topic: Option<Arc<str>>,
    prev: usize,
    next: usize,
}

/// The aliases of one connection. Slot `i` is alias `i + 1`; slots are created on first use,
/// so a connection that never receives a message pays for nothing.
pub struct OutboundAliases {
    max: u16,
    /// Topic → alias. The key shares its allocation with the slot's copy.
    by_topic: HashMap<Arc<str>, u16>,
    slots: Vec<Slot>,
    /// Most recently used slot.
    head: usize,
    /// Least recently used slot (free slots are kept here, so they are reused first).
    tail: usize,
}

impl OutboundAliases {
    /// Aliases `1..=max`; `max == 0` disables aliasing.
    pub fn new(max: u16) -> OutboundAliases {
        OutboundAliases {
            max,
            by_topic: HashMap::new(),
            slots: Vec::new(),
            head: NIL,
            tail: NIL,
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.max > 0
    }

    /// The alias to use for `topic`, assigning (or re-mapping the least recently used) one on a
    /// miss. `None` when aliasing is disabled or the topic is empty.
    pub fn assign(&mut self, topic: &str) -> Option<AliasUse> {
        if self.max == 0 || topic.is_empty() {
            return None;
        }
        if let Some(&alias) = self.by_topic.get(topic) {
            self.touch(usize::from(alias - 1));
            return Some(AliasUse::Known(alias));
        }
        let tail_free = self.tail != NIL && self.slots[self.tail].topic.is_none();
        let index = if !tail_free && self.slots.len() < usize::from(self.max) {
            self.slots.push(Slot {
                topic: None,
                prev: NIL,
                next: NIL,
            });
            self.slots.len() - 1
        } else {
            let lru = self.tail;
            if let Some(old) = self.slots[lru].topic.take() {
                self.by_topic.remove(&old);
            }
            self.unlink(lru);
            lru
        };
        let alias = u16::try_from(index + 1).expect("at most u16::MAX slots");
        let topic: Arc<str> = Arc::from(topic);
        self.by_topic.insert(topic.clone(), alias);
        self.slots[index].topic = Some(topic);
        self.push_front(index);
        Some(AliasUse::New(alias))
    }

    /// Forgets a mapping the client never learned (its PUBLISH was not sent), so the next
    /// delivery of that topic teaches it again.
    pub fn forget(&mut self, alias: u16) {
        let Some(index) = usize::from(alias).checked_sub(1) else {
            return;
        };
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        if let Some(topic) = slot.topic.take() {
            self.by_topic.remove(&topic);
        }
        self.unlink(index);
        self.push_back(index);
    }

    /// Marks `index` as the most recently used.
    fn touch(&mut self, index: usize) {
        if self.head != index {
            self.unlink(index);
            self.push_front(index);
        }
    }

    fn unlink(&mut self, index: usize) {
        let (prev, next) = (self.slots[index].prev, self.slots[index].next);
        match prev {
            NIL => self.head = next,
            p => self.slots[p].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.slots[n].prev = prev,
        }
        self.slots[index].prev = NIL;
        self.slots[index].next = NIL;
    }

    fn push_front(&mut self, index: usize) {
        self.slots[index].next = self.head;
        match self.head {
            NIL => self.tail = index,
            h => self.slots[h].prev = index,
        }
        self.head = index;
    }

    fn push_back(&mut self, index: usize) {
        self.slots[index].prev = self.tail;
        match self.tail {
            NIL => self.head = index,
            t => self.slots[t].next = index,
        }
        self.tail = index;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_use_is_new_then_known() {
        let mut a = OutboundAliases::new(4);
        assert_eq!(a.assign("a"), Some(AliasUse::New(1)));
        assert_eq!(a.assign("b"), Some(AliasUse::New(2)));
        assert_eq!(a.assign("a"), Some(AliasUse::Known(1)));
        assert_eq!(a.assign("b"), Some(AliasUse::Known(2)));
    }

    #[test]
    fn disabled_or_empty_topic_gets_no_alias() {
        assert_eq!(OutboundAliases::new(0).assign("a"), None);
        assert_eq!(OutboundAliases::new(3).assign(""), None);
    }

    #[test]
    fn least_recently_used_alias_is_remapped() {
        let mut a = OutboundAliases::new(2);
        assert_eq!(a.assign("a"), Some(AliasUse::New(1)));
        assert_eq!(a.assign("b"), Some(AliasUse::New(2)));
        // "a" used again: "b" becomes the least recently used.
        assert_eq!(a.assign("a"), Some(AliasUse::Known(1)));
        assert_eq!(a.assign("c"), Some(AliasUse::New(2)));
        assert_eq!(a.assign("a"), Some(AliasUse::Known(1)));
        // "c" is now the LRU; "b" comes back on its alias.
        assert_eq!(a.assign("b"), Some(AliasUse::New(2)));
        assert_eq!(a.assign("c"), Some(AliasUse::New(1)));
        assert_eq!(a.by_topic.len(), 2);
    }

    #[test]
    fn forgotten_alias_is_reused_first_and_taught_again() {
        let mut a = OutboundAliases::new(3);
        a.assign("a");
        a.assign("b");
        a.assign("c");
        a.forget(2);
        assert_eq!(a.assign("d"), Some(AliasUse::New(2)));
        assert_eq!(a.assign("b"), Some(AliasUse::New(1)));
        a.forget(0);
        a.forget(99);
        assert_eq!(a.assign("c"), Some(AliasUse::Known(3)));
    }

    #[test]
    fn forgotten_alias_is_reused_before_a_new_one() {
        let mut a = OutboundAliases::new(10);
        assert_eq!(a.assign("a"), Some(AliasUse::New(1)));
        a.forget(1);
        assert_eq!(a.assign("a"), Some(AliasUse::New(1)));
        assert_eq!(a.assign("b"), Some(AliasUse::New(2)));
    }

    #[test]
    fn single_alias_cycles() {
        let mut a = OutboundAliases::new(1);
        for round in 0..3 {
            assert_eq!(a.assign("x"), Some(AliasUse::New(1)), "round {round}");
            assert_eq!(a.assign("x"), Some(AliasUse::Known(1)));
            assert_eq!(a.assign("y"), Some(AliasUse::New(1)));
        }
    }
}

//! The subscription trie: many topic filters, each with a small map of subscribers.
//!
//! One node per filter level. Literal children sit in a `HashMap` keyed by the level string;
//! `+` and `#` have dedicated children, so matching a topic costs O(levels × wildcard
//! branching) hash lookups, independent of how many filters are stored. A node that carries
//! subscribers also stores its full filter string, so matches and iteration hand out `&str`
//! without allocating.
//!
//! Filters are expected to be valid ([`crate::topic::validate_topic_filter`]) and stored
//! without a `$share/<group>/` prefix — the trie itself treats every level except `+` and `#`
//! as an opaque literal, so a `$share/...` string would simply be stored literally. For
//! invalid filters (e.g. `a/#/b`) insert/remove/get stay consistent; what they match is
//! unspecified.
//!
//! Matching follows [`crate::topic::filter_matches`], including §4.7.2: a filter whose first
//! level is `+` or `#` does not match a topic starting with `$`.

use std::collections::{hash_map, HashMap};
use std::hash::Hash;

/// Subscribers of one filter, plus the filter string itself.
struct Entry<K, V> {
    filter: Box<str>,
    subs: HashMap<K, V>,
}

struct Node<K, V> {
    children: HashMap<Box<str>, Node<K, V>>,
    plus: Option<Box<Node<K, V>>>,
    hash: Option<Box<Node<K, V>>>,
    /// Present iff at least one subscriber is on exactly this filter.
    entry: Option<Box<Entry<K, V>>>,
}

impl<K, V> Default for Node<K, V> {
    fn default() -> Self {
        Node {
            children: HashMap::new(),
            plus: None,
            hash: None,
            entry: None,
        }
    }
}

impl<K, V> Node<K, V> {
    /// Nothing stored here or below: the node can be pruned.
    fn is_empty(&self) -> bool {
        self.entry.is_none()
            && self.children.is_empty()
            && self.plus.is_none()
            && self.hash.is_none()
    }

    fn child(&self, level: &str) -> Option<&Node<K, V>> {
        match level {
            "+" => self.plus.as_deref(),
            "#" => self.hash.as_deref(),
            _ => self.children.get(level),
        }
    }

    fn child_mut(&mut self, level: &str) -> Option<&mut Node<K, V>> {
        match level {
            "+" => self.plus.as_deref_mut(),
            "#" => self.hash.as_deref_mut(),
            _ => self.children.get_mut(level),
        }
    }

    fn child_or_insert(&mut self, level: &str) -> &mut Node<K, V> {
        match level {
            "+" => self.plus.get_or_insert_with(Default::default),
            "#" => self.hash.get_or_insert_with(Default::default),
            _ => {
                // Avoid allocating the key when the child exists (the common case).
                if !self.children.contains_key(level) {
                    self.children.insert(level.into(), Node::default());
                }
                self.children.get_mut(level).expect("just inserted")
            }
        }
    }

    fn child_count(&self) -> usize {
        self.children.len() + usize::from(self.plus.is_some()) + usize::from(self.hash.is_some())
    }

    fn remove_child(&mut self, level: &str) -> Option<Node<K, V>> {
        match level {
            "+" => self.plus.take().map(|b| *b),
            "#" => self.hash.take().map(|b| *b),
            _ => self.children.remove(level),
        }
    }

    /// Moves all children onto `out` (for iterative teardown).
    fn take_children(&mut self, out: &mut Vec<Node<K, V>>) {
        out.extend(self.children.drain().map(|(_, c)| c));
        out.extend(self.plus.take().map(|b| *b));
        out.extend(self.hash.take().map(|b| *b));
    }
}

/// Splits the first level off a topic or filter: `"a/b/c"` → `("a", Some("b/c"))`,
/// `"a"` → `("a", None)`, `"a/"` → `("a", Some(""))`.
#[inline]
fn split_level(s: &str) -> (&str, Option<&str>) {
    match s.find('/') {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    }
}

/// Subscription trie: filter → (key → value). See the module docs.
///
/// Every operation is iterative (no recursion per level), so a filter or topic with tens of
/// thousands of levels cannot overflow the stack — including `Drop`, `Clone` and `Debug`.
pub struct TopicTrie<K, V> {
    root: Node<K, V>,
    len: usize,
    filters: usize,
}

impl<K, V> Default for TopicTrie<K, V> {
    fn default() -> Self {
        TopicTrie {
            root: Node::default(),
            len: 0,
            filters: 0,
        }
    }
}

impl<K: Eq + Hash + Clone, V> TopicTrie<K, V> {
    pub fn new() -> Self {
        Self::default()
    }

    fn find(&self, filter: &str) -> Option<&Node<K, V>> {
        let mut node = &self.root;
        for level in filter.split('/') {
            node = node.child(level)?;
        }
        Some(node)
    }

    fn find_mut(&mut self, filter: &str) -> Option<&mut Node<K, V>> {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.child_mut(level)?;
        }
        Some(node)
    }

    /// Adds or replaces `key`'s subscription on `filter`; returns the replaced value.
    pub fn insert(&mut self, filter: &str, key: K, value: V) -> Option<V> {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.child_or_insert(level);
        }
        let entry = node.entry.get_or_insert_with(|| {
            self.filters += 1;
            Box::new(Entry {
                filter: filter.into(),
                subs: HashMap::new(),
            })
        });
        let old = entry.subs.insert(key, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Removes `key`'s subscription on `filter`; prunes nodes left empty.
    pub fn remove(&mut self, filter: &str, key: &K) -> Option<V> {
        let (v, filter_gone, leaf_empty) = {
            let node = self.find_mut(filter)?;
            let entry = node.entry.as_mut()?;
            let v = entry.subs.remove(key)?;
            let filter_gone = entry.subs.is_empty();
            if filter_gone {
                node.entry = None;
            }
            (v, filter_gone, node.is_empty())
        };
        self.len -= 1;
        if filter_gone {
            self.filters -= 1;
        }
        if leaf_empty {
            self.prune(filter);
        }
        Some(v)
    }

    /// The node for `filter` exists and is empty: cut the chain of nodes that only lead to it,
    /// just below the deepest ancestor that holds something else (or the root).
    fn prune(&mut self, filter: &str) {
        let mut cut = 0;
        let mut node = &self.root;
        for (depth, level) in filter.split('/').enumerate() {
            if depth == 0 || node.entry.is_some() || node.child_count() > 1 {
                cut = depth;
            }
            node = node.child(level).expect("path exists");
        }
        let mut levels = filter.split('/');
        let mut node = &mut self.root;
        for level in levels.by_ref().take(cut) {
            node = node.child_mut(level).expect("path exists");
        }
        if let Some(chain) = node.remove_child(levels.next().expect("cut is above the leaf")) {
            teardown(chain);
        }
    }

    pub fn get(&self, filter: &str, key: &K) -> Option<&V> {
        self.find(filter)?.entry.as_ref()?.subs.get(key)
    }

    pub fn get_mut(&mut self, filter: &str, key: &K) -> Option<&mut V> {
        self.find_mut(filter)?.entry.as_mut()?.subs.get_mut(key)
    }

    /// Whether any subscriber is on exactly `filter`.
    pub fn contains_filter(&self, filter: &str) -> bool {
        self.find(filter).is_some_and(|n| n.entry.is_some())
    }

    /// All subscribers on exactly `filter`, if any.
    pub fn subscribers(&self, filter: &str) -> Option<&HashMap<K, V>> {
        self.find(filter)?.entry.as_ref().map(|e| &e.subs)
    }

    /// Calls `f(filter, key, value)` for every subscription whose filter matches `topic`.
    /// Each (filter, key) is reported once; order is unspecified.
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(&str, &K, &V)) {
        // Each pending item: a node that consumed the topic levels before `rest`
        // (`None` = the whole topic is consumed).
        let mut stack: Vec<(&Node<K, V>, Option<&str>)> = Vec::new();
        let dollar = topic.starts_with('$');
        // Root: wildcards at the first level do not match `$` topics (§4.7.2).
        if !dollar {
            if let Some(h) = &self.root.hash {
                emit(h, &mut f);
            }
        }
        let (level, rest) = split_level(topic);
        if let Some(c) = self.root.children.get(level) {
            stack.push((c, rest));
        }
        if !dollar {
            if let Some(p) = &self.root.plus {
                stack.push((p, rest));
            }
        }
        while let Some((node, rest)) = stack.pop() {
            // `x/#` matches `x` itself and everything below it.
            if let Some(h) = &node.hash {
                emit(h, &mut f);
            }
            match rest {
                None => emit(node, &mut f),
                Some(r) => {
                    let (level, rest) = split_level(r);
                    if let Some(c) = node.children.get(level) {
                        stack.push((c, rest));
                    }
                    if let Some(p) = &node.plus {
                        stack.push((p, rest));
                    }
                }
            }
        }
    }

    /// Whether at least one subscription matches `topic` (stops at the first).
    pub fn has_match(&self, topic: &str) -> bool {
        let has_subs = |n: &Option<Box<Node<K, V>>>| n.as_ref().is_some_and(|h| h.entry.is_some());
        let mut stack: Vec<(&Node<K, V>, Option<&str>)> = Vec::new();
        let dollar = topic.starts_with('$');
        if !dollar && has_subs(&self.root.hash) {
            return true;
        }
        let (level, rest) = split_level(topic);
        if let Some(c) = self.root.children.get(level) {
            stack.push((c, rest));
        }
        if !dollar {
            if let Some(p) = &self.root.plus {
                stack.push((p, rest));
            }
        }
        while let Some((node, rest)) = stack.pop() {
            if has_subs(&node.hash) {
                return true;
            }
            match rest {
                None => {
                    if node.entry.is_some() {
                        return true;
                    }
                }
                Some(r) => {
                    let (level, rest) = split_level(r);
                    if let Some(c) = node.children.get(level) {
                        stack.push((c, rest));
                    }
                    if let Some(p) = &node.plus {
                        stack.push((p, rest));
                    }
                }
            }
        }
        false
    }

    /// Number of (filter, key) subscriptions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of distinct filters with at least one subscriber.
    pub fn filter_count(&self) -> usize {
        self.filters
    }

    /// Every (filter, key, value), in unspecified order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &K, &V)> {
        Iter {
            stack: vec![&self.root],
            cur: None,
        }
    }

    /// Removes every subscription.
    pub fn clear(&mut self) {
        *self = Self::default();
    }
}

#[inline]
fn emit<K, V>(node: &Node<K, V>, f: &mut impl FnMut(&str, &K, &V)) {
    if let Some(e) = &node.entry {
        for (k, v) in &e.subs {
            f(&e.filter, k, v);
        }
    }
}

/// Drops a subtree iteratively: the derived drop would recurse once per level.
fn teardown<K, V>(node: Node<K, V>) {
    let mut stack = vec![node];
    while let Some(mut node) = stack.pop() {
        node.take_children(&mut stack);
    }
}

impl<K, V> Drop for TopicTrie<K, V> {
    fn drop(&mut self) {
        teardown(std::mem::take(&mut self.root));
    }
}

impl<K: Eq + Hash + Clone, V: Clone> Clone for TopicTrie<K, V> {
    fn clone(&self) -> Self {
        let mut t = TopicTrie::new();
        for (filter, k, v) in self.iter() {
            t.insert(filter, k.clone(), v.clone());
        }
        t
    }
}

impl<K: Eq + Hash + Clone + std::fmt::Debug, V: std::fmt::Debug> std::fmt::Debug
    for TopicTrie<K, V>
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.iter().map(|(filter, k, v)| ((filter, k), v)))
            .finish()
    }
}

struct Iter<'a, K, V> {
    stack: Vec<&'a Node<K, V>>,
    cur: Option<(&'a str, hash_map::Iter<'a, K, V>)>,
}

impl<'a, K, V> Iterator for Iter<'a, K, V> {
    type Item = (&'a str, &'a K, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((filter, it)) = &mut self.cur {
                if let Some((k, v)) = it.next() {
                    return Some((filter, k, v));
                }
                self.cur = None;
            }
            let node = self.stack.pop()?;
            self.stack.extend(node.children.values());
            self.stack.extend(node.plus.as_deref());
            self.stack.extend(node.hash.as_deref());
            if let Some(e) = &node.entry {
                self.cur = Some((&e.filter, e.subs.iter()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::filter_matches;

    fn matches(t: &TopicTrie<u32, ()>, topic: &str) -> Vec<(String, u32)> {
        let mut v = Vec::new();
        t.for_each_match(topic, |f, k, _| v.push((f.to_string(), *k)));
        v.sort();
        v
    }

    fn filters_matching(t: &TopicTrie<u32, ()>, topic: &str) -> Vec<String> {
        let mut v: Vec<String> = matches(t, topic).into_iter().map(|(f, _)| f).collect();
        v.dedup();
        v
    }

    const FILTERS: &[&str] = &[
        "sport/tennis/player1/#",
        "sport/#",
        "sport/tennis/#",
        "#",
        "+",
        "sport/+",
        "sport/tennis/+",
        "+/+",
        "/+",
        "+/monitor/Clients",
        "$SYS/#",
        "$SYS/monitor/+",
        "a//b",
        "a/+/b",
        "/",
        "/#",
        "+/tennis/#",
        "sport/+/player1",
    ];

    fn spec_trie() -> TopicTrie<u32, ()> {
        let mut t = TopicTrie::new();
        for (i, f) in FILTERS.iter().enumerate() {
            assert!(t.insert(f, i as u32, ()).is_none());
        }
        t
    }

    #[test]
    fn agrees_with_reference_on_spec_examples() {
        let t = spec_trie();
        let topics = [
            "sport/tennis/player1",
            "sport/tennis/player1/ranking",
            "sport/tennis/player1/score/wimbledon",
            "sport",
            "sport/",
            "/finance",
            "$SYS/monitor/Clients",
            "$SYS",
            "$SYS/broker/load",
            "a//b",
            "a/x/b",
            "/",
            "x/monitor/Clients",
            "",
            "//",
        ];
        for topic in topics {
            let mut expected: Vec<String> = FILTERS
                .iter()
                .filter(|f| filter_matches(f, topic))
                .map(|f| f.to_string())
                .collect();
            expected.sort();
            assert_eq!(filters_matching(&t, topic), expected, "topic {topic:?}");
            assert_eq!(t.has_match(topic), !expected.is_empty(), "topic {topic:?}");
        }
    }

    #[test]
    fn spec_examples_explicit() {
        let t = spec_trie();
        let m = filters_matching(&t, "sport");
        assert!(m.contains(&"sport/#".to_string()));
        assert!(!m.contains(&"sport/+".to_string()));
        assert!(filters_matching(&t, "sport/").contains(&"sport/+".to_string()));
        let m = filters_matching(&t, "/finance");
        assert!(m.contains(&"+/+".to_string()));
        assert!(m.contains(&"/+".to_string()));
        assert!(!m.contains(&"+".to_string()));
        let m = filters_matching(&t, "$SYS/monitor/Clients");
        assert_eq!(m, vec!["$SYS/#".to_string(), "$SYS/monitor/+".to_string()]);
        let m = filters_matching(&t, "sport/tennis/player1");
        assert!(m.contains(&"sport/tennis/player1/#".to_string()));
    }

    #[test]
    fn insert_replace_get_remove_prune() {
        let mut t: TopicTrie<&str, u8> = TopicTrie::new();
        assert!(t.is_empty());
        assert_eq!(t.insert("a/+/c", "k1", 1), None);
        assert_eq!(t.insert("a/+/c", "k1", 2), Some(1));
        assert_eq!(t.insert("a/+/c", "k2", 3), None);
        assert_eq!(t.insert("a/#", "k1", 4), None);
        assert_eq!(t.len(), 3);
        assert_eq!(t.filter_count(), 2);
        assert_eq!(t.get("a/+/c", &"k1"), Some(&2));
        *t.get_mut("a/+/c", &"k1").unwrap() = 9;
        assert_eq!(t.get("a/+/c", &"k1"), Some(&9));
        assert_eq!(t.get("a/+", &"k1"), None);
        assert!(t.contains_filter("a/+/c"));
        assert!(!t.contains_filter("a/+"));
        assert!(!t.contains_filter("a"));
        assert_eq!(t.remove("a/+/c", &"nope"), None);
        assert_eq!(t.remove("a/x/c", &"k1"), None);
        assert_eq!(t.remove("a/+/c", &"k1"), Some(9));
        assert!(t.contains_filter("a/+/c"));
        assert_eq!(t.remove("a/+/c", &"k2"), Some(3));
        assert!(!t.contains_filter("a/+/c"));
        assert_eq!(t.filter_count(), 1);
        assert_eq!(t.remove("a/#", &"k1"), Some(4));
        assert!(t.is_empty());
        assert_eq!(t.filter_count(), 0);
        assert!(t.root.is_empty(), "all nodes pruned");
        assert!(!t.has_match("a/b/c"));
    }

    #[test]
    fn prune_keeps_shared_prefixes() {
        let mut t: TopicTrie<u8, ()> = TopicTrie::new();
        t.insert("a/b", 1, ());
        t.insert("a/b/c/d", 1, ());
        t.remove("a/b/c/d", &1);
        assert!(t.contains_filter("a/b"));
        let a = t.root.children.get("a").unwrap();
        let b = a.children.get("b").unwrap();
        assert!(b.children.is_empty());
        t.insert("a/b/c/d", 1, ());
        t.remove("a/b", &1);
        assert!(t.contains_filter("a/b/c/d"));
        assert_eq!(filters_matching_u8(&t, "a/b/c/d"), vec!["a/b/c/d"]);
        assert!(!t.has_match("a/b"));
    }

    fn filters_matching_u8(t: &TopicTrie<u8, ()>, topic: &str) -> Vec<String> {
        let mut v = Vec::new();
        t.for_each_match(topic, |f, _, _| v.push(f.to_string()));
        v
    }

    #[test]
    fn iter_yields_everything() {
        let t = spec_trie();
        let mut got: Vec<(String, u32)> = t.iter().map(|(f, k, _)| (f.to_string(), *k)).collect();
        got.sort();
        let mut want: Vec<(String, u32)> = FILTERS
            .iter()
            .enumerate()
            .map(|(i, f)| (f.to_string(), i as u32))
            .collect();
        want.sort();
        assert_eq!(got, want);
        assert_eq!(t.len(), FILTERS.len());
        assert_eq!(t.filter_count(), FILTERS.len());
    }

    /// Filters and topics of ~65k levels must not recurse: run on a small stack.
    #[test]
    fn deep_filters_do_not_overflow_the_stack() {
        std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(|| {
                let deep = "/".repeat(crate::topic::MAX_TOPIC_LEN); // 65536 empty levels
                let deep_hash = "/".repeat(40_000) + "#";
                let deep_plus = "+/".repeat(30_000) + "+";
                let mut t: TopicTrie<u8, u8> = TopicTrie::new();
                t.insert(&deep, 1, 1);
                t.insert(&deep_hash, 2, 2);
                t.insert(&deep_plus, 3, 3);
                let mut got = Vec::new();
                t.for_each_match(&deep, |f, k, _| {
                    assert!(filter_matches(f, &deep));
                    got.push(*k)
                });
                got.sort();
                assert_eq!(got, vec![1, 2]);
                assert!(t.has_match(&deep));
                let topic = "/".repeat(30_000);
                let mut got = Vec::new();
                t.for_each_match(&topic, |_, k, _| got.push(*k));
                assert_eq!(got, vec![3]);
                let c = t.clone();
                assert_eq!(c.len(), 3);
                assert!(format!("{c:?}").len() > deep.len());
                drop(c);
                assert_eq!(t.iter().count(), 3);
                assert_eq!(t.remove(&deep, &1), Some(1));
                assert!(!t.contains_filter(&deep));
                assert!(t.contains_filter(&deep_hash));
                drop(t);
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn share_prefix_is_just_literal() {
        let mut t: TopicTrie<u8, ()> = TopicTrie::new();
        t.insert("$share/g/a", 1, ());
        assert!(t.contains_filter("$share/g/a"));
        assert!(t.has_match("$share/g/a"));
        assert!(!t.has_match("a"));
    }

    #[test]
    fn multiple_keys_per_filter_reported_once_each() {
        let mut t: TopicTrie<u32, ()> = TopicTrie::new();
        for k in 0..10 {
            t.insert("x/#", k, ());
            t.insert("x/+", k, ());
        }
        let m = matches(&t, "x/y");
        assert_eq!(m.len(), 20);
        let m = matches(&t, "x");
        assert_eq!(m.len(), 10);
    }
}

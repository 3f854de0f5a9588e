//! Retained messages indexed by topic name, so that a (wildcard) SUBSCRIBE walks only the
//! branches its filter can match instead of scanning every retained message.
//!
//! One node per topic level, children in a `HashMap` keyed by the level string. Topic names
//! carry no wildcards, so every child is literal; the *filter* drives the walk: a literal
//! level is one lookup, `+` visits every child, `#` visits the whole subtree. Matching
//! follows [`crate::topic::filter_matches`], including §4.7.2 (a filter starting with `+` or
//! `#` does not match topics starting with `$`).
//!
//! Topic strings are not stored; they are rebuilt while walking, so the callback of
//! [`TopicTree::for_each_matching`] receives a `&str` into a reused buffer.

use std::collections::HashMap;

struct Node<V> {
    children: HashMap<Box<str>, Node<V>>,
    value: Option<V>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Node {
            children: HashMap::new(),
            value: None,
        }
    }
}

impl<V> Node<V> {
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.value.is_none() && self.children.is_empty()
    }
}

#[inline]
fn split_level(s: &str) -> (&str, Option<&str>) {
    match s.find('/') {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    }
}

/// Appends `level` to the topic path being built; `depth` is the level's index (0 = first).
#[inline]
fn push_level(path: &mut String, depth: usize, level: &str) {
    if depth > 0 {
        path.push('/');
    }
    path.push_str(level);
}

/// Topic name → value (the retained message of that topic).
///
/// Every operation is iterative (no recursion per level), so a topic with tens of thousands
/// of levels cannot overflow the stack — including `Drop`, `Clone` and `Debug`.
pub struct TopicTree<V> {
    root: Node<V>,
    len: usize,
}

impl<V> Default for TopicTree<V> {
    fn default() -> Self {
        TopicTree {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<V> TopicTree<V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores `value` under `topic` (a topic name, no wildcards); returns the replaced value.
    pub fn insert(&mut self, topic: &str, value: V) -> Option<V> {
        let mut node = &mut self.root;
        for level in topic.split('/') {
            if !node.children.contains_key(level) {
                node.children.insert(level.into(), Node::default());
            }
            node = node.children.get_mut(level).expect("just inserted");
        }
        let old = node.value.replace(value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Removes the value under `topic`; prunes nodes left empty.
    pub fn remove(&mut self, topic: &str) -> Option<V> {
        let (v, leaf_empty) = {
            let node = self.find_mut(topic)?;
            let v = node.value.take()?;
            (v, node.children.is_empty())
        };
        self.len -= 1;
        if leaf_empty {
            self.prune(topic);
        }
        Some(v)
    }

    fn find_mut(&mut self, topic: &str) -> Option<&mut Node<V>> {
        let mut node = &mut self.root;
        for level in topic.split('/') {
            node = node.children.get_mut(level)?;
        }
        Some(node)
    }

    /// The node for `topic` exists and is empty: cut the chain of nodes that only lead to it,
    /// just below the deepest ancestor that holds something else (or the root).
    fn prune(&mut self, topic: &str) {
        let mut cut = 0;
        let mut node = &self.root;
        for (depth, level) in topic.split('/').enumerate() {
            if depth == 0 || node.value.is_some() || node.children.len() > 1 {
                cut = depth;
            }
            node = node.children.get(level).expect("path exists");
        }
        let mut levels = topic.split('/');
        let mut node = &mut self.root;
        for level in levels.by_ref().take(cut) {
            node = node.children.get_mut(level).expect("path exists");
        }
        if let Some(chain) = node
            .children
            .remove(levels.next().expect("cut is above the leaf"))
        {
            teardown(chain);
        }
    }

    pub fn get(&self, topic: &str) -> Option<&V> {
        let mut node = &self.root;
        for level in topic.split('/') {
            node = node.children.get(level)?;
        }
        node.value.as_ref()
    }

    pub fn get_mut(&mut self, topic: &str) -> Option<&mut V> {
        self.find_mut(topic)?.value.as_mut()
    }

    /// Calls `f(topic, value)` for every stored topic that `filter` matches (a valid topic
    /// filter without `$share/` prefix). Walks only the branches the filter can match.
    pub fn for_each_matching(&self, filter: &str, mut f: impl FnMut(&str, &V)) {
        let mut path = String::new();
        let mut stack: Vec<Item<'_, V>> = Vec::new();
        expand(&self.root, 0, 0, filter, &path, &mut stack, &mut f);
        while let Some(item) = stack.pop() {
            // Everything processed since this item was pushed lies below its parent, so the
            // parent's path is still the prefix of `path`.
            path.truncate(item.parent_len);
            push_level(&mut path, item.depth, item.name);
            match item.rest {
                Rest::Subtree => {
                    if let Some(v) = &item.node.value {
                        f(&path, v);
                    }
                    for (name, child) in &item.node.children {
                        stack.push(Item {
                            node: child,
                            name,
                            depth: item.depth + 1,
                            parent_len: path.len(),
                            rest: Rest::Subtree,
                        });
                    }
                }
                Rest::Filter(None) => {
                    if let Some(v) = &item.node.value {
                        f(&path, v);
                    }
                }
                Rest::Filter(Some(r)) => expand(
                    item.node,
                    item.depth + 1,
                    path.len(),
                    r,
                    &path,
                    &mut stack,
                    &mut f,
                ),
            }
        }
    }

    /// Number of stored topics.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every (topic, value), in unspecified order.
    pub fn iter(&self) -> impl Iterator<Item = (String, &V)> {
        let mut stack: Vec<(&Node<V>, usize, String)> = Vec::new();
        for (level, child) in &self.root.children {
            stack.push((child, 0, level.to_string()));
        }
        std::iter::from_fn(move || loop {
            let (node, depth, path) = stack.pop()?;
            for (level, child) in &node.children {
                let mut p = String::with_capacity(path.len() + 1 + level.len());
                p.push_str(&path);
                push_level(&mut p, depth + 1, level);
                stack.push((child, depth + 1, p));
            }
            if let Some(v) = &node.value {
                return Some((path, v));
            }
        })
    }

    /// Keeps only the entries for which `keep(topic, value)` returns true (e.g. to drop
    /// expired retained messages); prunes nodes left empty.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &mut V) -> bool) {
        let mut doomed = Vec::new();
        let mut path = String::new();
        // (node, its level, its depth, length of the parent's path)
        let mut stack: Vec<(&mut Node<V>, &str, usize, usize)> = self
            .root
            .children
            .iter_mut()
            .map(|(name, child)| (child, &**name, 0, 0))
            .collect();
        while let Some((node, name, depth, parent_len)) = stack.pop() {
            path.truncate(parent_len);
            push_level(&mut path, depth, name);
            if let Some(v) = &mut node.value {
                if !keep(&path, v) {
                    doomed.push(path.clone());
                }
            }
            let len = path.len();
            stack.extend(
                node.children
                    .iter_mut()
                    .map(|(name, child)| (child, &**name, depth + 1, len)),
            );
        }
        for topic in doomed {
            self.remove(&topic);
        }
    }

    /// Removes everything.
    pub fn clear(&mut self) {
        *self = Self::default();
    }
}

/// What is left to match below a pending node.
enum Rest<'a> {
    /// The rest of the filter after this node's level (`None`: the filter ends here).
    Filter(Option<&'a str>),
    /// Below a `#`: this node and everything under it match.
    Subtree,
}

/// A node waiting to be visited by [`TopicTree::for_each_matching`].
struct Item<'a, V> {
    node: &'a Node<V>,
    /// The node's level, its index and the length of its parent's path.
    name: &'a str,
    depth: usize,
    parent_len: usize,
    rest: Rest<'a>,
}

/// Matches the next level of `filter` against the children of `node`, whose path (of
/// `child_depth` levels) is `path[..path_len]`. Pushes the children to visit.
fn expand<'a, V>(
    node: &'a Node<V>,
    child_depth: usize,
    path_len: usize,
    filter: &'a str,
    path: &str,
    stack: &mut Vec<Item<'a, V>>,
    f: &mut impl FnMut(&str, &V),
) {
    let (level, rest) = split_level(filter);
    // §4.7.2: a wildcard first level does not match topics starting with `$`.
    let visible = |name: &str| child_depth > 0 || !name.starts_with('$');
    match level {
        "#" => {
            // `x/#` matches `x` itself; the root is no topic.
            if child_depth > 0 {
                if let Some(v) = &node.value {
                    f(path, v);
                }
            }
            for (name, child) in node.children.iter().filter(|(n, _)| visible(n)) {
                stack.push(Item {
                    node: child,
                    name,
                    depth: child_depth,
                    parent_len: path_len,
                    rest: Rest::Subtree,
                });
            }
        }
        "+" => {
            for (name, child) in node.children.iter().filter(|(n, _)| visible(n)) {
                stack.push(Item {
                    node: child,
                    name,
                    depth: child_depth,
                    parent_len: path_len,
                    rest: Rest::Filter(rest),
                });
            }
        }
        _ => {
            if let Some((name, child)) = node.children.get_key_value(level) {
                stack.push(Item {
                    node: child,
                    name,
                    depth: child_depth,
                    parent_len: path_len,
                    rest: Rest::Filter(rest),
                });
            }
        }
    }
}

/// Drops a subtree iteratively: the derived drop would recurse once per level.
fn teardown<V>(node: Node<V>) {
    let mut stack = vec![node];
    while let Some(mut node) = stack.pop() {
        stack.extend(node.children.drain().map(|(_, c)| c));
    }
}

impl<V> Drop for TopicTree<V> {
    fn drop(&mut self) {
        teardown(std::mem::take(&mut self.root));
    }
}

impl<V: Clone> Clone for TopicTree<V> {
    fn clone(&self) -> Self {
        let mut t = TopicTree::new();
        for (topic, v) in self.iter() {
            t.insert(&topic, v.clone());
        }
        t
    }
}

impl<V: std::fmt::Debug> std::fmt::Debug for TopicTree<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::filter_matches;

    const TOPICS: &[&str] = &[
        "sport",
        "sport/",
        "sport/tennis/player1",
        "sport/tennis/player1/ranking",
        "sport/tennis/player1/score/wimbledon",
        "sport/tennis/player2",
        "/finance",
        "/",
        "a//b",
        "$SYS/monitor/Clients",
        "$SYS",
        "x/monitor/Clients",
        "a/$b",
    ];

    fn tree() -> TopicTree<usize> {
        let mut t = TopicTree::new();
        for (i, topic) in TOPICS.iter().enumerate() {
            assert_eq!(t.insert(topic, i), None);
        }
        t
    }

    fn matching(t: &TopicTree<usize>, filter: &str) -> Vec<String> {
        let mut v = Vec::new();
        t.for_each_matching(filter, |topic, &i| {
            assert_eq!(TOPICS[i], topic);
            v.push(topic.to_string());
        });
        v.sort();
        v
    }

    #[test]
    fn agrees_with_reference() {
        let t = tree();
        let filters = [
            "#",
            "+",
            "+/+",
            "/+",
            "/#",
            "sport/#",
            "sport/+",
            "sport/tennis/player1/#",
            "sport/tennis/+",
            "+/monitor/Clients",
            "$SYS/#",
            "$SYS/+/Clients",
            "$SYS",
            "a/+/b",
            "a//b",
            "a/+",
            "a/#",
            "nope/#",
            "+/tennis/#",
        ];
        for filter in filters {
            let mut want: Vec<String> = TOPICS
                .iter()
                .filter(|topic| filter_matches(filter, topic))
                .map(|s| s.to_string())
                .collect();
            want.sort();
            assert_eq!(matching(&t, filter), want, "filter {filter:?}");
        }
    }

    #[test]
    fn dollar_rule() {
        let t = tree();
        assert!(!matching(&t, "#").iter().any(|s| s.starts_with('$')));
        assert_eq!(matching(&t, "$SYS/#"), vec!["$SYS", "$SYS/monitor/Clients"]);
        assert_eq!(matching(&t, "+/monitor/Clients"), vec!["x/monitor/Clients"]);
    }

    #[test]
    fn insert_get_remove_prune_iter() {
        let mut t = tree();
        assert_eq!(t.len(), TOPICS.len());
        assert_eq!(t.get("sport"), Some(&0));
        assert_eq!(t.get("sport/tennis"), None);
        assert_eq!(t.insert("sport", 100), Some(0));
        *t.get_mut("sport").unwrap() = 0;
        let mut all: Vec<(String, usize)> = t.iter().map(|(s, &v)| (s, v)).collect();
        all.sort_by_key(|(_, v)| *v);
        let want: Vec<(String, usize)> = TOPICS
            .iter()
            .enumerate()
            .map(|(i, s)| (s.to_string(), i))
            .collect();
        assert_eq!(all, want);
        assert_eq!(t.remove("sport/tennis"), None);
        assert_eq!(t.remove("nope/x"), None);
        for (i, topic) in TOPICS.iter().enumerate() {
            assert_eq!(t.remove(topic), Some(i), "{topic}");
            assert_eq!(t.get(topic), None);
        }
        assert!(t.is_empty());
        assert!(t.root.is_empty(), "all nodes pruned");
    }

    /// Topics of ~65k levels must not recurse: run on a small stack.
    #[test]
    fn deep_topics_do_not_overflow_the_stack() {
        std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(|| {
                let deep = "/".repeat(crate::topic::MAX_TOPIC_LEN); // 65536 empty levels
                let deep_a = "a/".repeat(30_000) + "a";
                let mut t = TopicTree::new();
                t.insert(&deep, 1);
                t.insert(&deep_a, 2);
                t.insert("a", 3);
                assert_eq!(t.get(&deep), Some(&1));
                let mut n = 0;
                t.for_each_matching("#", |_, _| n += 1);
                assert_eq!(n, 3);
                let mut got = Vec::new();
                t.for_each_matching(&deep, |topic, v| got.push((topic.len(), *v)));
                assert_eq!(got, vec![(deep.len(), 1)]);
                let plus_deep = "+/".repeat(30_000) + "+";
                let mut got = Vec::new();
                t.for_each_matching(&plus_deep, |topic, v| got.push((topic.to_string(), *v)));
                assert_eq!(got, vec![(deep_a.clone(), 2)]);
                let c = t.clone();
                assert_eq!(c.len(), 3);
                assert!(format!("{c:?}").len() > deep.len());
                drop(c);
                t.retain(|_, v| *v != 2);
                assert_eq!(t.get(&deep_a), None);
                assert_eq!(t.remove(&deep), Some(1));
                assert_eq!(t.len(), 1);
                t.insert(&deep_a, 2);
                drop(t);
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn retain_prunes() {
        let mut t = tree();
        t.retain(|topic, v| {
            assert_eq!(TOPICS[*v], topic);
            !topic.starts_with("sport")
        });
        assert_eq!(t.len(), TOPICS.len() - 6);
        assert!(!t.root.children.contains_key("sport"));
        assert!(matching(&t, "sport/#").is_empty());
        assert_eq!(t.iter().count(), t.len());
    }
}

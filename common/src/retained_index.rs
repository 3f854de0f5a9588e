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

#[derive(Debug, Clone)]
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
#[derive(Debug, Clone)]
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
        let v = Self::remove_rec(&mut self.root, topic)?;
        self.len -= 1;
        Some(v)
    }

    fn remove_rec(node: &mut Node<V>, rest: &str) -> Option<V> {
        let (level, rest) = split_level(rest);
        let child = node.children.get_mut(level)?;
        let v = match rest {
            None => child.value.take()?,
            Some(r) => Self::remove_rec(child, r)?,
        };
        if child.is_empty() {
            node.children.remove(level);
        }
        Some(v)
    }

    pub fn get(&self, topic: &str) -> Option<&V> {
        let mut node = &self.root;
        for level in topic.split('/') {
            node = node.children.get(level)?;
        }
        node.value.as_ref()
    }

    pub fn get_mut(&mut self, topic: &str) -> Option<&mut V> {
        let mut node = &mut self.root;
        for level in topic.split('/') {
            node = node.children.get_mut(level)?;
        }
        node.value.as_mut()
    }

    /// Calls `f(topic, value)` for every stored topic that `filter` matches (a valid topic
    /// filter without `$share/` prefix). Walks only the branches the filter can match.
    pub fn for_each_matching(&self, filter: &str, mut f: impl FnMut(&str, &V)) {
        let mut path = String::new();
        match_rec(&self.root, filter, 0, &mut path, &mut f);
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
        let mut path = String::new();
        let mut removed = 0;
        retain_rec(&mut self.root, 0, &mut path, &mut keep, &mut removed);
        self.len -= removed;
    }

    /// Removes everything.
    pub fn clear(&mut self) {
        *self = Self::default();
    }
}

/// `node` stands for the topic levels already in `path` (`depth` of them); `filter` is what is
/// left of the filter to match below it.
fn match_rec<V>(
    node: &Node<V>,
    filter: &str,
    depth: usize,
    path: &mut String,
    f: &mut impl FnMut(&str, &V),
) {
    let (level, rest) = split_level(filter);
    match level {
        "#" => {
            // `x/#` matches `x` itself; at the root there is no topic to match.
            if depth > 0 {
                if let Some(v) = &node.value {
                    f(path, v);
                }
            }
            for (name, child) in &node.children {
                if depth == 0 && name.starts_with('$') {
                    continue;
                }
                let mark = path.len();
                push_level(path, depth, name);
                subtree(child, depth + 1, path, f);
                path.truncate(mark);
            }
        }
        "+" => {
            for (name, child) in &node.children {
                if depth == 0 && name.starts_with('$') {
                    continue;
                }
                let mark = path.len();
                push_level(path, depth, name);
                descend(child, rest, depth + 1, path, f);
                path.truncate(mark);
            }
        }
        _ => {
            if let Some(child) = node.children.get(level) {
                let mark = path.len();
                push_level(path, depth, level);
                descend(child, rest, depth + 1, path, f);
                path.truncate(mark);
            }
        }
    }
}

#[inline]
fn descend<V>(
    child: &Node<V>,
    rest: Option<&str>,
    depth: usize,
    path: &mut String,
    f: &mut impl FnMut(&str, &V),
) {
    match rest {
        None => {
            if let Some(v) = &child.value {
                f(path, v);
            }
        }
        Some(r) => match_rec(child, r, depth, path, f),
    }
}

/// Every value at or below `node`.
fn subtree<V>(node: &Node<V>, depth: usize, path: &mut String, f: &mut impl FnMut(&str, &V)) {
    if let Some(v) = &node.value {
        f(path, v);
    }
    for (name, child) in &node.children {
        let mark = path.len();
        push_level(path, depth, name);
        subtree(child, depth + 1, path, f);
        path.truncate(mark);
    }
}

fn retain_rec<V>(
    node: &mut Node<V>,
    depth: usize,
    path: &mut String,
    keep: &mut impl FnMut(&str, &mut V) -> bool,
    removed: &mut usize,
) {
    if depth > 0 {
        if let Some(v) = &mut node.value {
            if !keep(path, v) {
                node.value = None;
                *removed += 1;
            }
        }
    }
    node.children.retain(|name, child| {
        let mark = path.len();
        push_level(path, depth, name);
        retain_rec(child, depth + 1, path, keep, removed);
        path.truncate(mark);
        !child.is_empty()
    });
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

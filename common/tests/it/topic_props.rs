//! Property tests: the subscription trie and the retained index agree with the reference
//! matcher `filter_matches`, and behave like a plain map under insert/remove.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use proptest::prelude::*;
use tiermq_common::retained_index::TopicTree;
use tiermq_common::topic::{
    filter_matches, parse_subscription, validate_topic_filter, validate_topic_name,
};
use tiermq_common::trie::TopicTrie;

/// Topic levels: a tiny alphabet so that matches are frequent; includes empty levels and `$`.
fn topic_level() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["a", "b", "", "$s", "ab"])
}

fn topic() -> impl Strategy<Value = String> {
    prop::collection::vec(topic_level(), 1..5)
        .prop_map(|v| v.join("/"))
        .prop_filter("topic names are non-empty", |s| !s.is_empty())
}

fn filter_level() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["a", "b", "", "$s", "+", "+", "ab"])
}

/// Valid topic filters: levels from the alphabet plus `+`, optionally ending in `#`.
fn filter() -> impl Strategy<Value = String> {
    (prop::collection::vec(filter_level(), 0..5), any::<bool>())
        .prop_map(|(mut v, hash)| {
            if hash || v.is_empty() {
                v.push("#");
            }
            v.join("/")
        })
        .prop_filter("topic filters are non-empty", |s| !s.is_empty())
}

fn trie_matches(trie: &TopicTrie<usize, u32>, topic: &str) -> Vec<(String, usize)> {
    let mut got = Vec::new();
    trie.for_each_match(topic, |f, k, v| {
        assert_eq!(*v, *k as u32 * 7, "value belongs to its key");
        got.push((f.to_string(), *k));
    });
    got.sort();
    got
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn generated_inputs_are_valid(f in filter(), t in topic()) {
        prop_assert!(validate_topic_filter(&f).is_ok(), "{f:?}");
        prop_assert!(validate_topic_name(&t).is_ok(), "{t:?}");
        prop_assert_eq!(parse_subscription(&f), Ok((None, f.as_str())));
        let shared = format!("$share/grp/{f}");
        prop_assert_eq!(parse_subscription(&shared), Ok((Some("grp"), f.as_str())));
    }

    #[test]
    fn validation_never_panics(s in "[a-b/+#$\u{0}]{0,8}") {
        let _ = validate_topic_name(&s);
        let _ = validate_topic_filter(&s);
        let _ = parse_subscription(&s);
        let _ = filter_matches(&s, &s);
        // A valid filter without wildcards is also a valid topic name and matches itself.
        if validate_topic_filter(&s).is_ok() && !s.contains(['+', '#']) {
            prop_assert!(validate_topic_name(&s).is_ok());
            prop_assert!(filter_matches(&s, &s));
        }
    }

    #[test]
    fn trie_matches_reference(
        filters in prop::collection::vec(filter(), 0..40),
        topics in prop::collection::vec(topic(), 1..20),
    ) {
        let mut trie = TopicTrie::new();
        for (i, f) in filters.iter().enumerate() {
            prop_assert!(trie.insert(f, i, i as u32 * 7).is_none());
        }
        prop_assert_eq!(trie.len(), filters.len());
        let distinct: BTreeSet<&String> = filters.iter().collect();
        prop_assert_eq!(trie.filter_count(), distinct.len());
        for t in &topics {
            let got = trie_matches(&trie, t);
            let mut want: Vec<(String, usize)> = filters
                .iter()
                .enumerate()
                .filter(|(_, f)| filter_matches(f, t))
                .map(|(i, f)| (f.clone(), i))
                .collect();
            want.sort();
            prop_assert_eq!(&got, &want, "topic {:?}", t);
            prop_assert_eq!(trie.has_match(t), !want.is_empty(), "topic {:?}", t);
        }
    }

    #[test]
    fn trie_behaves_like_a_map(
        pool in prop::collection::vec(filter(), 1..8),
        ops in prop::collection::vec((any::<bool>(), 0usize..8, 0u8..4, any::<u16>()), 0..120),
        topics in prop::collection::vec(topic(), 1..8),
    ) {
        let mut trie: TopicTrie<u8, u16> = TopicTrie::new();
        let mut model: HashMap<(String, u8), u16> = HashMap::new();
        for (insert, fi, key, val) in ops {
            let f = &pool[fi % pool.len()];
            if insert {
                prop_assert_eq!(trie.insert(f, key, val), model.insert((f.clone(), key), val));
            } else {
                prop_assert_eq!(trie.remove(f, &key), model.remove(&(f.clone(), key)));
            }
            prop_assert_eq!(trie.len(), model.len());
        }
        let model_filters: BTreeSet<&String> = model.keys().map(|(f, _)| f).collect();
        prop_assert_eq!(trie.filter_count(), model_filters.len());
        prop_assert_eq!(trie.is_empty(), model.is_empty());
        let got: BTreeMap<(String, u8), u16> =
            trie.iter().map(|(f, k, v)| ((f.to_string(), *k), *v)).collect();
        let want: BTreeMap<(String, u8), u16> = model.clone().into_iter().collect();
        prop_assert_eq!(got.len(), trie.len(), "iter yields each entry once");
        prop_assert_eq!(&got, &want);
        for f in &pool {
            prop_assert_eq!(trie.contains_filter(f), model_filters.contains(f));
            for key in 0..4u8 {
                prop_assert_eq!(trie.get(f, &key), model.get(&(f.clone(), key)));
            }
        }
        for t in &topics {
            let mut got = Vec::new();
            trie.for_each_match(t, |f, k, v| got.push((f.to_string(), *k, *v)));
            got.sort();
            let mut want: Vec<(String, u8, u16)> = model
                .iter()
                .filter(|((f, _), _)| filter_matches(f, t))
                .map(|((f, k), v)| (f.clone(), *k, *v))
                .collect();
            want.sort();
            prop_assert_eq!(&got, &want);
            prop_assert_eq!(trie.has_match(t), !want.is_empty());
        }
        // Removing everything leaves an empty trie that matches nothing.
        for (f, k) in model.keys() {
            prop_assert!(trie.remove(f, k).is_some());
        }
        prop_assert!(trie.is_empty());
        prop_assert_eq!(trie.filter_count(), 0);
        prop_assert_eq!(trie.iter().count(), 0);
        for t in &topics {
            prop_assert!(!trie.has_match(t));
        }
    }

    #[test]
    fn tree_matches_reference(
        stored in prop::collection::btree_set(topic(), 0..50),
        filters in prop::collection::vec(filter(), 1..20),
    ) {
        let mut tree = TopicTree::new();
        for (i, t) in stored.iter().enumerate() {
            prop_assert!(tree.insert(t, i).is_none());
        }
        prop_assert_eq!(tree.len(), stored.len());
        let index: HashMap<&String, usize> = stored.iter().enumerate().map(|(i, t)| (t, i)).collect();
        for f in &filters {
            let mut got = Vec::new();
            tree.for_each_matching(f, |t, v| got.push((t.to_string(), *v)));
            got.sort();
            let mut want: Vec<(String, usize)> = stored
                .iter()
                .filter(|t| filter_matches(f, t))
                .map(|t| (t.clone(), index[t]))
                .collect();
            want.sort();
            prop_assert_eq!(&got, &want, "filter {:?}", f);
        }
    }

    #[test]
    fn tree_behaves_like_a_map(
        ops in prop::collection::vec((any::<bool>(), topic(), any::<u16>()), 0..100),
        filters in prop::collection::vec(filter(), 1..6),
    ) {
        let mut tree: TopicTree<u16> = TopicTree::new();
        let mut model: HashMap<String, u16> = HashMap::new();
        for (insert, t, val) in ops {
            if insert {
                prop_assert_eq!(tree.insert(&t, val), model.insert(t.clone(), val));
            } else {
                prop_assert_eq!(tree.remove(&t), model.remove(&t));
            }
            prop_assert_eq!(tree.len(), model.len());
            prop_assert_eq!(tree.get(&t), model.get(&t));
        }
        let got: BTreeMap<String, u16> = tree.iter().map(|(t, v)| (t, *v)).collect();
        prop_assert_eq!(got.len(), tree.len());
        let want: BTreeMap<String, u16> = model.clone().into_iter().collect();
        prop_assert_eq!(&got, &want);
        for f in &filters {
            let mut got = Vec::new();
            tree.for_each_matching(f, |t, v| got.push((t.to_string(), *v)));
            got.sort();
            let mut want: Vec<(String, u16)> = model
                .iter()
                .filter(|(t, _)| filter_matches(f, t))
                .map(|(t, v)| (t.clone(), *v))
                .collect();
            want.sort();
            prop_assert_eq!(&got, &want, "filter {:?}", f);
        }
        // retain keeps exactly what the predicate keeps.
        tree.retain(|_, v| *v % 2 == 0);
        model.retain(|_, v| *v % 2 == 0);
        let got: BTreeMap<String, u16> = tree.iter().map(|(t, v)| (t, *v)).collect();
        let want: BTreeMap<String, u16> = model.clone().into_iter().collect();
        prop_assert_eq!(&got, &want);
        prop_assert_eq!(tree.len(), model.len());
        for t in model.keys() {
            prop_assert!(tree.remove(t).is_some());
        }
        prop_assert!(tree.is_empty());
        prop_assert_eq!(tree.iter().count(), 0);
    }
}

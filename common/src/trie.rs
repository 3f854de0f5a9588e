//! Subscription trie (being written).

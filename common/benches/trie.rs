//! Subscription trie and retained index at scale: 100k filters / 100k retained topics.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use tiermq_common::retained_index::TopicTree;
use tiermq_common::trie::TopicTrie;

/// ~100k filters: per-device wildcards plus some leading-`+` and a few broad ones.
fn build_trie() -> TopicTrie<u32, u8> {
    let mut t = TopicTrie::new();
    let mut key = 0u32;
    let mut add = |t: &mut TopicTrie<u32, u8>, f: &str| {
        t.insert(f, key, 1);
        key += 1;
    };
    for i in 0..40_000 {
        add(&mut t, &format!("devices/d{i}/+/telemetry"));
        add(&mut t, &format!("devices/d{i}/#"));
    }
    for i in 0..10_000 {
        add(&mut t, &format!("+/d{i}/status"));
    }
    for i in 0..9_990 {
        add(&mut t, &format!("sites/s{}/floor{}/+", i % 1000, i / 1000));
    }
    for f in [
        "#",
        "devices/+/+/telemetry",
        "devices/+/#",
        "$SYS/#",
        "+/+/+/+",
        "sites/#",
        "alerts/+",
        "alerts/#",
        "+/+/status",
        "devices/d1/sensor/telemetry",
    ] {
        add(&mut t, f);
    }
    t
}

fn bench_trie(c: &mut Criterion) {
    let t = build_trie();
    assert_eq!(t.len(), 100_000);
    let mut g = c.benchmark_group("trie_100k_filters");
    let topic = "devices/d12345/sensor/telemetry";
    let mut n = 0;
    t.for_each_match(topic, |_, _, _| n += 1);
    eprintln!("{topic}: {n} matching subscriptions");
    g.bench_function("for_each_match devices/d12345/sensor/telemetry", |b| {
        b.iter(|| {
            let mut n = 0u32;
            t.for_each_match(black_box(topic), |_, _, v| n += *v as u32);
            n
        })
    });
    g.bench_function("for_each_match devices/d777/status (+/..)", |b| {
        b.iter(|| {
            let mut n = 0u32;
            t.for_each_match(black_box("x/d777/status"), |_, _, v| n += *v as u32);
            n
        })
    });
    g.bench_function("has_match $SYS/broker/load", |b| {
        b.iter(|| t.has_match(black_box("$SYS/broker/load")))
    });
    g.bench_function("has_match miss $other/a/b", |b| {
        b.iter(|| t.has_match(black_box("$other/a/b")))
    });
    let mut t2 = build_trie();
    g.bench_function("insert+remove devices/dX/+/telemetry", |b| {
        let mut i = 0u32;
        b.iter(|| {
            let f = format!("devices/d{}/+/cmd", i % 50_000);
            t2.insert(&f, 1_000_000 + i, 0);
            t2.remove(&f, &(1_000_000 + i));
            i += 1;
        })
    });
    g.finish();
}

/// 100k retained topics: 10k devices × 10 sensors.
fn build_tree() -> TopicTree<u32> {
    let mut t = TopicTree::new();
    for i in 0..10_000u32 {
        for j in 0..10u32 {
            t.insert(&format!("devices/d{i}/sensor{j}/telemetry"), i * 10 + j);
        }
    }
    t
}

fn bench_retained(c: &mut Criterion) {
    let t = build_tree();
    assert_eq!(t.len(), 100_000);
    let mut g = c.benchmark_group("retained_100k_topics");
    for filter in [
        "devices/d1234/+/telemetry",
        "devices/d1234/#",
        "devices/+/sensor3/telemetry",
        "devices/d1234/sensor3/telemetry",
        "nothing/+/here/#",
    ] {
        let mut n = 0;
        t.for_each_matching(filter, |_, _| n += 1);
        eprintln!("{filter}: {n} retained topics");
        g.bench_function(format!("for_each_matching {filter}"), |b| {
            b.iter(|| {
                let mut n = 0u64;
                t.for_each_matching(black_box(filter), |topic, v| {
                    n += topic.len() as u64 + *v as u64
                });
                n
            })
        });
    }
    g.bench_function("get devices/d1234/sensor3/telemetry", |b| {
        b.iter(|| t.get(black_box("devices/d1234/sensor3/telemetry")).copied())
    });
    g.finish();
}

criterion_group!(benches, bench_trie, bench_retained);
criterion_main!(benches);

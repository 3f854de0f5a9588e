//! The table, the CPU split, the cluster target rows, the page and its plots.

use super::markdown::{cluster_target_rows, SECTION};
use super::plots::{plot_p99, plot_throughput};
use super::*;

fn result(case: &str, broker: &str, rate: f64, p99: u64, cpu: f64) -> BenchResult {
    BenchResult {
        case: case.into(),
        broker: broker.into(),
        scenario: "pairs".into(),
        delivered_rate: rate,
        latency: Some(Latency {
            count: 10,
            p50_us: p99 / 2,
            p99_us: p99,
            p999_us: p99,
            max_us: p99,
            ..Default::default()
        }),
        cpu_s_per_million: Some(cpu),
        ..Default::default()
    }
}

#[test]
fn cpu_split_groups_by_role() {
    let part = |process: &str, cpu_s| CpuPart {
        pid: 1,
        process: process.into(),
        cpu_s,
    };
    let parts = [
        part("frontend", 2.0),
        part("backend", 1.0),
        part("backend", 1.0),
    ];
    assert_eq!(
        cpu_split(&parts).as_deref(),
        Some("frontend 50%, backend 25% + 25%")
    );
    assert_eq!(cpu_split(&parts[..1]), None);
}

#[test]
fn cluster_target_takes_the_best_sustained_step() {
    let step = |case: &str, rate: u64, delivered: f64, p99_us: u64, unsent: u64| {
        let mut r = result(case, "tiermq-cluster", delivered, p99_us, 50.0);
        r.qos = 1;
        r.publishers = 100;
        r.rate_per_publisher = rate;
        r.send_rate = (100 * rate) as f64;
        r.unsent = unsent;
        r.tally.expected = 1000;
        r.tally.received = 1000;
        r
    };
    let rs = vec![
        step("s20k", 200, 19_990.0, 20_000, 0),
        step("s30k", 300, 29_990.0, 45_000, 0),
        step("s40k", 400, 39_000.0, 900_000, 0),
        step("s50k", 500, 30_000.0, 40_000, 5_000),
    ];
    let rows = cluster_target_rows("tiermq-cluster", &rs).join("\n");
    assert!(rows.contains("**29990 msgs/s** (`s30k`"), "{rows}");
    assert!(rows.ends_with("| **no** |"), "{rows}");
    let rs = vec![step("s50k", 500, 49_995.0, 30_000, 0)];
    let rows = cluster_target_rows("tiermq-cluster", &rs).join("\n");
    assert!(rows.ends_with("| yes |"), "{rows}");
    assert!(cluster_target_rows("tiermq-cluster", &[])[0].contains("not measured"));
}

#[test]
fn splice_keeps_other_sections() {
    let doc = "# Benchmarks\n\n## Codec and trie micro-benchmarks\n\ntext A\n\n## Broker benchmarks\n\nintro\n";
    let once = splice(doc, "block 1");
    assert!(once.contains("text A") && once.contains("intro") && once.contains("block 1"));
    let twice = splice(&once, "block 2");
    assert!(!twice.contains("block 1") && twice.contains("block 2") && twice.contains("text A"));
    assert_eq!(twice.matches(BEGIN).count(), 1);
    let fresh = splice("", "b");
    assert!(fresh.starts_with("# Benchmarks") && fresh.contains(SECTION));
}

#[test]
fn markdown_has_ratios_and_targets_and_svg_renders() {
    let rs = vec![
        result("pairs-qos0", "tiermq", 200.0, 2000, 1.0),
        result("pairs-qos0", "mosquitto", 100.0, 4000, 4.0),
    ];
    let dir = tempfile::tempdir().unwrap();
    let a = ReportArgs {
        inputs: vec![],
        out: dir.path().join("b.md"),
        svg_dir: None,
        ours: "tiermq".into(),
        baselines: vec!["mosquitto".into(), "rumqttd".into()],
        preamble: None,
        cluster: "tiermq-cluster".into(),
    };
    let md = markdown(&a, &rs, "", &[]);
    assert!(md.contains("*2.00×* ✓"), "{md}");
    assert!(
        md.contains("| `pairs-qos0`: broker CPU per message ≤ 0.5× mosquitto | 0.25× | yes |"),
        "{md}"
    );
    assert!(plot_throughput(&a, &rs, &dir.path().join("t.svg")).unwrap());
    assert!(plot_p99(&a, &rs, &dir.path().join("p.svg")).unwrap());
    let svg = std::fs::read_to_string(dir.path().join("p.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("pairs-qos0"));
    let table = summary_table(&rs[0]);
    assert!(
        table.contains("p99 4.00") || table.contains("p99 2.00"),
        "{table}"
    );
}

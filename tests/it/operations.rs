//! Operator surfaces of a process cluster (3 backends + 2 frontends): `/readyz` of frontends
//! and backends, readiness under a lost quorum, `tiermq health --http` and
//! `tiermq cluster status --json`.

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::cluster::ProcCluster;
use crate::support::*;
use tiermq::metrics_http::call;
use tokio::time::Instant;

const ASK: Duration = Duration::from_secs(3);

async fn readyz(addr: SocketAddr) -> (u16, String) {
    call(&addr.to_string(), "GET", "/readyz", ASK)
        .await
        .unwrap_or_else(|e| (0, format!("{e:#}")))
}

/// Polls `/readyz` of `addr` until it answers `code` (within `within`); returns the body.
async fn wait_readyz(c: &ProcCluster, addr: SocketAddr, code: u16, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let (got, body) = readyz(addr).await;
        if got == code {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz of {addr}: still {got} {body:?}, want {code}; logs:\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the `tiermq` binary; returns exit code and stdout + stderr.
async fn tiermq(args: &[String]) -> (Option<i32>, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tiermq"))
        .args(args)
        .output()
        .await
        .expect("run tiermq");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every node of a running cluster is ready (frontends: a known leader for every partition);
/// `tiermq health --http` agrees; `tiermq cluster status --json` has the documented shape,
/// with the frontends' connection counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_cluster_and_status_json() {
    let c = ProcCluster::start().await;
    for i in 0..3 {
        wait_readyz(&c, c.be_admin(i), 200, Duration::from_secs(10)).await;
    }
    for i in 0..2 {
        wait_readyz(&c, c.fe_admin(i), 200, Duration::from_secs(10)).await;
    }
    let (code, out, err) = tiermq(&[
        "health".into(),
        "--http".into(),
        c.fe_admin(0).to_string(),
        "--ready".into(),
    ])
    .await;
    assert_eq!(code, Some(0), "health --http --ready: {out}{err}");
    let (code, _, _) = tiermq(&["health".into(), "--http".into(), "127.0.0.1:1".into()]).await;
    assert_eq!(code, Some(1), "health --http of nothing fails");

    // 3 clients on frontend 1, 2 on frontend 2.
    let mut clients = Vec::new();
    for (i, fe) in [0, 0, 0, 1, 1].into_iter().enumerate() {
        clients.push(Raw::v5(c.fe(fe), &format!("ops-status-{i}")).await);
    }
    // The backends' session gauges: each partition is counted by its leader only, so the sum
    // over backends is the number of connected sessions.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut connected = 0.0;
        for i in 0..3 {
            let (_, text) = call(&c.be_admin(i).to_string(), "GET", "/metrics", ASK)
                .await
                .expect("backend /metrics");
            connected += sample(&text, "tiermq_sessions_connected").expect("sessions gauge");
        }
        if connected == 5.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "backends report {connected} connected sessions, want 5"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let admins = format!("{},{}", c.fe_admin(0), c.fe_admin(1));
    let args = |json: bool| {
        let mut a: Vec<String> = vec![
            "cluster".into(),
            "status".into(),
            "--backend".into(),
            c.backends[0].addr.to_string(),
            "--frontends".into(),
            admins.clone(),
            "--healthy".into(),
        ];
        if json {
            a.push("--json".into());
        }
        a
    };
    let (code, out, err) = tiermq(&args(true)).await;
    assert_eq!(code, Some(0), "cluster status --json --healthy: {out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
    assert_eq!(v["format"], 1);
    assert_eq!(v["healthy"], true, "{out}");
    assert_eq!(v["partitions"], 8);
    assert_eq!(v["replication"], 3);
    assert!(v["epoch"].as_u64().is_some());
    let members = v["members"].as_array().expect("members");
    assert_eq!(members.len(), 3);
    for m in members {
        assert_eq!(m["reachable"], true, "{m}");
        for key in ["id", "addr", "leads", "epoch", "frontends"] {
            assert!(m.get(key).is_some(), "member key {key}: {m}");
        }
    }
    let parts = v["partition_status"].as_array().expect("partition_status");
    assert_eq!(parts.len(), 8);
    for p in parts {
        assert_ne!(p["leader"], 0, "{p}");
        let replicas = p["replicas"].as_array().expect("replicas");
        assert_eq!(replicas.len(), 3);
        for r in replicas {
            for key in [
                "node",
                "reachable",
                "sees_leader",
                "term",
                "commit",
                "applied",
                "lag",
            ] {
                assert!(r.get(key).is_some(), "replica key {key}: {r}");
            }
        }
    }
    let frontends = v["frontends"].as_array().expect("frontends");
    assert_eq!(frontends.len(), 2, "{out}");
    for (i, want) in [(0, 3u64), (1, 2u64)] {
        let admin = c.fe_admin(i).to_string();
        let f = frontends
            .iter()
            .find(|f| f["admin"] == admin.as_str())
            .unwrap_or_else(|| panic!("frontend {admin} in {out}"));
        assert_eq!(f["reachable"], true, "{f}");
        assert_eq!(f["connections"].as_u64(), Some(want), "{f}");
        assert_eq!(f["ready"], true, "{f}");
        assert_eq!(f["draining"], false, "{f}");
        assert_ne!(f["id"], 0, "{f}");
        assert_eq!(
            f["event_streams"].as_array().map(Vec::len),
            Some(3),
            "an event stream to every member: {f}"
        );
    }
    // The same, typed: the library's struct reads the JSON back.
    let typed: tiermq::cluster_cli::ClusterStatus =
        serde_json::from_str(&out).expect("ClusterStatus from JSON");
    assert_eq!(typed.format, tiermq::cluster_cli::STATUS_FORMAT);

    let (code, table, err) = tiermq(&args(false)).await;
    assert_eq!(code, Some(0), "{table}{err}");
    for heading in [
        "MEMBERS",
        "FRONTENDS (2 known",
        "PARTITIONS",
        "CONNS",
        "lag",
    ] {
        assert!(table.contains(heading), "{heading} in:\n{table}");
    }
    eprintln!("{table}");
    drop(clients);
}

/// Killing 2 of 3 backends loses every partition's quorum: the survivor's `/readyz` turns
/// 503 (no known leader), so do the frontends'; with the two back, all return to 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_quorum() {
    let mut c = ProcCluster::start().await;
    let survivor = c.be_admin(0);
    wait_readyz(&c, survivor, 200, Duration::from_secs(10)).await;
    wait_readyz(&c, c.fe_admin(0), 200, Duration::from_secs(10)).await;
    let lost = Instant::now();
    c.kill9_backend(1);
    c.kill9_backend(2);
    let why = wait_readyz(&c, survivor, 503, Duration::from_secs(30)).await;
    assert!(why.contains("no known leader"), "{why}");
    let backend_flip = lost.elapsed();
    let why = wait_readyz(&c, c.fe_admin(0), 503, Duration::from_secs(30)).await;
    assert!(why.contains("no known leader"), "{why}");
    let frontend_flip = lost.elapsed();
    let (code, _, err) = tiermq(&[
        "health".into(),
        "--http".into(),
        survivor.to_string(),
        "--ready".into(),
    ])
    .await;
    assert_eq!(code, Some(1), "health --ready fails without a quorum");
    assert!(err.contains("503"), "{err}");
    // Liveness is not readiness: the process is alive.
    let (code, _) = call(&survivor.to_string(), "GET", "/healthz", ASK)
        .await
        .expect("healthz answers");
    assert_eq!(code, 200);

    let back = Instant::now();
    c.restart_backend(1);
    c.restart_backend(2);
    for i in 0..3 {
        wait_readyz(&c, c.be_admin(i), 200, Duration::from_secs(40)).await;
    }
    for i in 0..2 {
        wait_readyz(&c, c.fe_admin(i), 200, Duration::from_secs(40)).await;
    }
    eprintln!(
        "quorum lost: backend 503 after {backend_flip:?}, frontend 503 after {frontend_flip:?}; \
         restored: all 200 after {:?}",
        back.elapsed()
    );
}

/// deploy/grafana-dashboard.json is valid JSON and every `tiermq_*` series it queries is one
/// docs/operations.md documents (counters by their `_total` name, histograms by theirs).
#[test]
fn grafana_dashboard_uses_documented_metrics() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("deploy/grafana-dashboard.json"))
        .expect("deploy/grafana-dashboard.json");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let docs = std::fs::read_to_string(root.join("docs/operations.md")).expect("docs");
    let mut exprs = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        for t in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().expect("expr").to_string());
        }
    }
    assert!(exprs.len() >= 15, "{} queries", exprs.len());
    let mut names = std::collections::BTreeSet::new();
    for e in &exprs {
        let mut rest = e.as_str();
        while let Some(i) = rest.find("tiermq_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    for n in &names {
        // A histogram is documented by its name; queries read its `_bucket` series.
        let n = n.strip_suffix("_bucket").unwrap_or(n);
        assert!(
            docs.contains(&format!("`{n}`")),
            "{n} is not documented in docs/operations.md"
        );
    }
}

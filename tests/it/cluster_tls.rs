//! Internal traffic over mutual TLS (issue 9): a process cluster whose gRPC (frontend ↔
//! backend, Raft between backends) runs over TLS with certificates from
//! `scripts/gen-cluster-certs`, and a backend's gRPC server refusing every client that does
//! not present a certificate of the cluster CA.

use std::path::Path;
use std::time::Duration;

use crate::support::cluster::{gen_cluster_certs, ClusterOpts, ProcCluster};
use crate::support::*;
use tiermq::cluster_cli;
use tiermq_common::config::Settings;
use tiermq_proto::tls::GrpcTls;

/// A QoS1 message published through frontend 1 reaches a subscriber on frontend 2 while every
/// internal hop is TLS; the harness itself waits for leaders over TLS (`cluster status` with
/// the admin certificate), and the same call without TLS gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_across_frontends_over_mutual_tls() {
    let c = ProcCluster::start_with(ClusterOpts {
        tls: true,
        ..ClusterOpts::default()
    })
    .await;
    let (mut sub, _) = V5::connect(c.fe(1), "tls-sub", |_| {}).await;
    let (publ, _) = V5::connect(c.fe(0), "tls-pub", |_| {}).await;
    sub.subscribe("tls/t", Q5::AtLeastOnce).await;
    publ.client
        .publish("tls/t", Q5::AtLeastOnce, false, "over mTLS")
        .await
        .unwrap();
    let p = sub.next_publish().await;
    assert_eq!(p.topic, "tls/t".as_bytes());
    assert_eq!(p.payload, "over mTLS".as_bytes());

    let backend = c.backends[0].addr.to_string();
    let status = cluster_cli::collect(&backend, Duration::from_secs(3), c.tls.as_ref())
        .await
        .expect("status over TLS");
    assert!(status.healthy, "{:?}", status.problems);
    assert!(
        cluster_cli::collect(&backend, Duration::from_secs(3), None)
            .await
            .is_err(),
        "a plain gRPC call to a TLS backend must fail"
    );
    for b in &c.backends {
        assert!(b.log_text().contains("tls=true"), "{}", c.logs());
    }
}

/// One in-process backend (1 partition, 1 replica) with internal TLS on; only a client with a
/// certificate signed by the cluster CA gets an answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_server_refuses_clients_without_a_cluster_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours");
    let theirs = dir.path().join("theirs");
    gen_cluster_certs(&ours, &["b1".into(), "admin".into()]);
    gen_cluster_certs(&theirs, &["admin".into()]);
    let grpc = format!("127.0.0.1:{}", free_port());
    let mut s = Settings::default();
    s.cluster.node_id = 1;
    s.cluster.grpc_listen = grpc.parse().unwrap();
    s.cluster.peers = vec![format!("1={grpc}")];
    s.cluster.partitions = 1;
    s.cluster.replication = 1;
    s.cluster.leader_transfer_secs = 0;
    s.cluster.tls_ca = Some(ours.join("ca.pem"));
    s.cluster.tls_cert = Some(ours.join("b1.pem"));
    s.cluster.tls_key = Some(ours.join("b1.key"));
    s.storage.data_dir = dir.path().join("data");
    s.metrics.listen = Some(String::new());
    let node = tiermq::backend::BackendNode::start(&s).await.unwrap();

    let load = |d: &Path, name: &str| {
        GrpcTls::load(
            &d.join("ca.pem"),
            &d.join(format!("{name}.pem")),
            &d.join(format!("{name}.key")),
        )
        .unwrap()
    };
    let ask = |tls: Option<GrpcTls>| {
        let grpc = grpc.clone();
        async move { cluster_cli::collect(&grpc, Duration::from_secs(3), tls.as_ref()).await }
    };
    // The cluster's own certificate: answered.
    let status = ask(Some(load(&ours, "admin")))
        .await
        .expect("admin answered");
    assert_eq!(status.members.len(), 1);
    // No TLS at all.
    assert!(ask(None).await.is_err(), "plain gRPC answered");
    // A certificate of another CA, trusting the cluster CA (so only the server refuses).
    let other = GrpcTls::load(
        &ours.join("ca.pem"),
        &theirs.join("admin.pem"),
        &theirs.join("admin.key"),
    )
    .unwrap();
    let e = ask(Some(other))
        .await
        .expect_err("foreign certificate answered");
    eprintln!("foreign certificate: {e:#}");
    // TLS that verifies the server but presents no certificate.
    let anonymous = tonic::transport::Endpoint::from_shared(format!("https://{grpc}"))
        .unwrap()
        .tls_config(tonic::transport::ClientTlsConfig::new().ca_certificate(
            tonic::transport::Certificate::from_pem(std::fs::read(ours.join("ca.pem")).unwrap()),
        ))
        .unwrap()
        .connect_timeout(Duration::from_secs(3));
    let refused = match anonymous.connect().await {
        Err(_) => true,
        Ok(ch) => tiermq_proto::broker::broker_client::BrokerClient::new(ch)
            .cluster(tiermq_proto::broker::ClusterRequest {
                version: tiermq_proto::API_VERSION,
                members_only: false,
            })
            .await
            .is_err(),
    };
    assert!(refused, "a client without a certificate was answered");
    // And a client of the other cluster does not trust this server either.
    assert!(ask(Some(load(&theirs, "admin"))).await.is_err());
    node.shutdown().await;
}

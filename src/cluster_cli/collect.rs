//! Building a [`ClusterStatus`]: the `Cluster` RPC to one backend and then to every member it
//! lists, the frontends' admin `/status`, and the merge of what they say (leaders, lag,
//! problems).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use tiermq_proto::broker::broker_client::BrokerClient;
use tiermq_proto::broker::{ClusterInfo, ClusterRequest};
use tiermq_proto::tls::GrpcTls;
use tiermq_proto::API_VERSION;

use super::status::{
    ClusterStatus, FrontendStatus, MemberStatus, PartitionStatus, ReplicaStatus, STATUS_FORMAT,
};

pub async fn cluster_info(
    addr: &str,
    timeout: Duration,
    tls: Option<&GrpcTls>,
) -> anyhow::Result<ClusterInfo> {
    let call = async {
        let endpoint = tiermq_proto::tls::endpoint(addr, tls)
            .with_context(|| format!("bad address {addr}"))?
            .connect_timeout(timeout);
        let channel = endpoint.connect().await.context("connect")?;
        let info = BrokerClient::new(channel)
            .cluster(ClusterRequest {
                version: API_VERSION,
                members_only: false,
            })
            .await
            .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
            .into_inner();
        Ok::<_, anyhow::Error>(info)
    };
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or_else(|_| bail!("no answer within {timeout:?}"))
}

/// Asks `backend`, then every member it lists (concurrently), and merges what they say.
/// Fails only when `backend` itself does not answer. With `tls`, over the cluster's mutual TLS.
pub async fn collect(
    backend: &str,
    timeout: Duration,
    tls: Option<&GrpcTls>,
) -> anyhow::Result<ClusterStatus> {
    collect_with_frontends(backend, &[], timeout, tls).await
}

/// [`collect`], plus `/status` from each frontend admin endpoint in `frontends`.
pub async fn collect_with_frontends(
    backend: &str,
    frontends: &[String],
    timeout: Duration,
    tls: Option<&GrpcTls>,
) -> anyhow::Result<ClusterStatus> {
    let (status, admins) = futures::join!(
        collect_members(backend, timeout, tls),
        futures::future::join_all(frontends.iter().map(|a| frontend_admin(a, timeout)))
    );
    let mut status = status?;
    add_frontends(&mut status, admins);
    Ok(status)
}

/// One frontend's `/status`, or why not.
async fn frontend_admin(
    admin: &str,
    timeout: Duration,
) -> (String, Result<serde_json::Value, String>) {
    let answer = match crate::metrics_http::call(admin, "GET", "/status", timeout).await {
        Ok((200, body)) => serde_json::from_str(&body).map_err(|e| format!("bad /status: {e}")),
        Ok((code, body)) => Err(format!("/status answered {code}: {}", body.trim())),
        Err(e) => Err(format!("{e:#}")),
    };
    (admin.to_string(), answer)
}

/// Merges the frontends the admin endpoints describe with those the members see.
fn add_frontends(
    status: &mut ClusterStatus,
    admins: Vec<(String, Result<serde_json::Value, String>)>,
) {
    let streams = |id: u64| -> Vec<u64> {
        status
            .members
            .iter()
            .filter(|m| m.frontends.contains(&id))
            .map(|m| m.id)
            .collect()
    };
    let mut out: Vec<FrontendStatus> = Vec::new();
    for (admin, answer) in admins {
        let f = match answer {
            Ok(v) => {
                let id = v.get("frontend_id").and_then(|x| x.as_u64()).unwrap_or(0);
                FrontendStatus {
                    id,
                    admin: Some(admin),
                    reachable: Some(true),
                    connections: v.get("connections").and_then(|x| x.as_u64()),
                    ready: v.get("ready").and_then(|x| x.as_bool()),
                    not_ready: v
                        .get("not_ready")
                        .and_then(|x| x.as_str())
                        .map(str::to_string),
                    draining: v.get("draining").and_then(|x| x.as_bool()),
                    event_streams: streams(id),
                    error: None,
                }
            }
            Err(e) => FrontendStatus {
                admin: Some(admin),
                reachable: Some(false),
                error: Some(e),
                ..FrontendStatus::unknown(0, Vec::new())
            },
        };
        out.push(f);
    }
    let mut seen: Vec<u64> = status
        .members
        .iter()
        .flat_map(|m| m.frontends.iter().copied())
        .collect();
    seen.sort_unstable();
    seen.dedup();
    for id in seen {
        if !out.iter().any(|f| f.id == id) {
            out.push(FrontendStatus::unknown(id, streams(id)));
        }
    }
    for f in &out {
        let name = f.admin.clone().unwrap_or_else(|| format!("{:016x}", f.id));
        if f.reachable == Some(false) {
            status.problems.push(format!(
                "frontend admin {name} unreachable: {}",
                f.error.as_deref().unwrap_or("")
            ));
        } else if f.ready == Some(false) && f.draining != Some(true) {
            status.problems.push(format!(
                "frontend {name} not ready: {}",
                f.not_ready.as_deref().unwrap_or("")
            ));
        }
    }
    status.healthy = status.problems.is_empty();
    status.frontends = out;
}

async fn collect_members(
    backend: &str,
    timeout: Duration,
    tls: Option<&GrpcTls>,
) -> anyhow::Result<ClusterStatus> {
    let first = cluster_info(backend, timeout, tls).await?;
    let answers = futures::future::join_all(first.members.iter().map(|m| {
        let addr = m.addr.clone();
        let id = m.id;
        let own = (id == first.node_id).then(|| first.clone());
        async move {
            // Ask the member itself even when it is the one we asked: its address in the
            // member list may differ from the one we were given.
            match cluster_info(&addr, timeout, tls).await {
                Ok(i) => (id, Ok(i)),
                Err(e) => match own {
                    Some(i) => (id, Ok(i)),
                    None => (id, Err(format!("{e:#}"))),
                },
            }
        }
    }))
    .await;
    let answers: BTreeMap<u64, Result<ClusterInfo, String>> = answers.into_iter().collect();
    Ok(merge(backend, &first, &answers))
}

fn merge(
    asked: &str,
    first: &ClusterInfo,
    answers: &BTreeMap<u64, Result<ClusterInfo, String>>,
) -> ClusterStatus {
    let mut problems = Vec::new();
    let members: Vec<MemberStatus> = first
        .members
        .iter()
        .map(|m| {
            let answer = answers.get(&m.id);
            let (reachable, error, leads, epoch, frontends) = match answer {
                Some(Ok(i)) => (
                    true,
                    None,
                    i.partition_info
                        .iter()
                        .filter(|p| p.local_replica && p.leader == m.id)
                        .count() as u32,
                    i.epoch,
                    i.frontends.clone(),
                ),
                Some(Err(e)) => (false, Some(e.clone()), 0, 0, Vec::new()),
                None => (false, Some("not asked".into()), 0, 0, Vec::new()),
            };
            if !reachable {
                problems.push(format!(
                    "member {} ({}) unreachable: {}",
                    m.id,
                    m.addr,
                    error.as_deref().unwrap_or("")
                ));
            } else if epoch != first.epoch {
                problems.push(format!(
                    "member {} reports map epoch {epoch}, node {} reports {}",
                    m.id, first.node_id, first.epoch
                ));
            }
            MemberStatus {
                id: m.id,
                addr: m.addr.clone(),
                reachable,
                error,
                leads,
                epoch,
                frontends,
            }
        })
        .collect();
    let mut partition_status = Vec::new();
    let mut leaderless = Vec::new();
    for p in &first.partition_info {
        let mut replicas = Vec::new();
        for &node in &p.replicas {
            let own = answers
                .get(&node)
                .and_then(|a| a.as_ref().ok())
                .and_then(|i| {
                    i.partition_info
                        .iter()
                        .find(|q| q.partition == p.partition && q.local_replica)
                });
            replicas.push(match own {
                Some(q) => ReplicaStatus {
                    node,
                    reachable: true,
                    sees_leader: q.leader,
                    term: q.term,
                    commit: q.commit,
                    applied: q.applied,
                    lag: 0,
                },
                None => ReplicaStatus {
                    node,
                    reachable: false,
                    sees_leader: 0,
                    term: 0,
                    commit: 0,
                    applied: 0,
                    lag: 0,
                },
            });
        }
        // The leader is the replica that says so itself; with two claimants (a deposed
        // leader that has not heard yet), the higher term wins.
        let leader = replicas
            .iter()
            .filter(|r| r.reachable && r.sees_leader == r.node)
            .max_by_key(|r| r.term)
            .map(|r| (r.node, r.term, r.commit));
        let (leader_id, term) = match leader {
            Some((id, term, commit)) => {
                for r in replicas.iter_mut().filter(|r| r.reachable) {
                    r.lag = commit.saturating_sub(r.applied);
                }
                (id, term)
            }
            None => {
                leaderless.push(p.partition);
                (0, replicas.iter().map(|r| r.term).max().unwrap_or(0))
            }
        };
        partition_status.push(PartitionStatus {
            partition: p.partition,
            leader: leader_id,
            term,
            replicas,
        });
    }
    if !leaderless.is_empty() {
        problems.push(format!("partitions without a leader: {leaderless:?}"));
    }
    if first.partition_info.len() != first.partitions as usize {
        problems.push(format!(
            "node {} lists {} of {} partitions",
            first.node_id,
            first.partition_info.len(),
            first.partitions
        ));
    }
    ClusterStatus {
        format: STATUS_FORMAT,
        frontends: Vec::new(),
        asked: asked.to_string(),
        asked_node: first.node_id,
        epoch: first.epoch,
        partitions: first.partitions,
        replication: first.replication,
        members,
        partition_status,
        healthy: problems.is_empty(),
        problems,
    }
}

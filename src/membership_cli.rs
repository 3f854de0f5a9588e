//! `tiermq cluster remove-node <ID>` and `tiermq cluster evict <ID>`: take a backend out of
//! the membership record and wait until its replicas have moved away.
//!
//! * `remove-node` is for a live node: the other replicas of each of its groups gain a new
//!   replica (learner, snapshot, promotion) before its own is removed, so the replication
//!   factor never drops. Done when every partition's voters (as its leader sees them) are the
//!   new map's replicas and the node itself holds no partition any more.
//! * `evict` is for a node that is dead for good. It first checks that every partition the
//!   node was a voter of keeps a live majority of its voters — the joint configuration that
//!   replaces the dead replica needs one — and refuses (exit 3) otherwise, or when the node
//!   still answers (use `remove-node`). Done when every partition is back to its full set of
//!   voters without the node.
//!
//! Exit codes: 0 done, 1 the cluster cannot be reached or the wait timed out, 2 bad
//! arguments (not a member), 3 refused (evict safety check).

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use tiermq_proto::broker::{ClusterInfo, PartitionInfo};
use tiermq_proto::tls::GrpcTls;
use tiermq_tools::parse_duration;

use crate::cluster_cli::cluster_info;

#[derive(Args, Debug)]
pub struct RemoveArgs {
    /// The node id to take out.
    pub node_id: u64,
    /// A backend's gRPC address; the other members are found through it.
    #[arg(long, env = "TIERMQ_BACKEND", default_value = "127.0.0.1:7000")]
    pub backend: String,
    /// Give up waiting for the replicas to move after this long.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// (evict) Skip the check that the node no longer answers.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub tls: crate::cluster_tls::ClusterTlsArgs,
}

/// Which command runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    Remove,
    Evict,
}

impl Removal {
    fn name(self) -> &'static str {
        match self {
            Removal::Remove => "remove-node",
            Removal::Evict => "evict",
        }
    }
}

pub fn main(kind: Removal, args: RemoveArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "tiermq cluster {}: cannot start the runtime: {e}",
                kind.name()
            );
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(kind, &args)) {
        Ok(message) => {
            println!("{message}");
            ExitCode::SUCCESS
        }
        Err((code, message)) => {
            eprintln!("tiermq cluster {}: {message}", kind.name());
            ExitCode::from(code)
        }
    }
}

const ASK: Duration = Duration::from_secs(2);

async fn run(kind: Removal, a: &RemoveArgs) -> Result<String, (u8, String)> {
    let tls = a.tls.load().map_err(|e| (2, format!("{e:#}")))?;
    let tls = tls.as_ref();
    let started = Instant::now();
    let info = cluster_info(&a.backend, ASK, tls)
        .await
        .map_err(|e| (1, format!("cannot reach backend {}: {e:#}", a.backend)))?;
    let id = a.node_id;
    let Some(addr) = info
        .members
        .iter()
        .find(|m| m.id == id)
        .map(|m| m.addr.clone())
    else {
        return Err((
            2,
            format!(
                "node {id} is not a member (members: {:?}, epoch {})",
                info.members.iter().map(|m| m.id).collect::<Vec<_>>(),
                info.epoch
            ),
        ));
    };
    if info.members.len() == 1 {
        return Err((2, format!("node {id} is the only member")));
    }
    let others: Vec<String> = info
        .members
        .iter()
        .filter(|m| m.id != id)
        .map(|m| m.addr.clone())
        .collect();
    if kind == Removal::Evict {
        if !a.force && cluster_info(&addr, ASK, tls).await.is_ok() {
            return Err((
                3,
                format!(
                    "node {id} at {addr} still answers: use `tiermq cluster remove-node {id}` \
                     (moves its replicas first), or --force"
                ),
            ));
        }
        check_quorums(id, &info, &others, tls).await?;
    }
    let reply = tiermq_backend::members::request_change(
        &others,
        tls,
        Vec::new(),
        vec![id],
        Duration::from_secs(30),
    )
    .await
    .map_err(|e| (1, e))?;
    eprintln!(
        "membership epoch {}: members {:?}; waiting for the replicas to move",
        reply.epoch,
        reply.members.iter().map(|m| m.id).collect::<Vec<_>>()
    );
    let deadline = Instant::now() + a.timeout;
    let mut last_report = Instant::now();
    loop {
        // Groups not yet moved off the node, as members on the new record see them. The
        // node may still hold a replica it was removed from without seeing that commit (the
        // leader stops sending to a removed replica at once): that replica is in no
        // configuration, and the node deletes it once no leader has spoken to it for a
        // while and a leader confirmed the removal (`raft/node/membership.rs`).
        let pending = unsettled_partitions(&others, reply.epoch, tls).await;
        if pending.is_empty() {
            return Ok(format!(
                "node {id} {}: done in {:.1} s (membership epoch {}); no partition lists it",
                match kind {
                    Removal::Remove => "removed",
                    Removal::Evict => "evicted",
                },
                started.elapsed().as_secs_f64(),
                reply.epoch
            ));
        }
        if Instant::now() >= deadline {
            return Err((
                1,
                format!(
                    "timed out after {:?}: partitions still moving: {pending:?}",
                    a.timeout
                ),
            ));
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            eprintln!("still moving: partitions {pending:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Refuses an eviction that would leave a partition without a live majority of its voters.
async fn check_quorums(
    id: u64,
    info: &ClusterInfo,
    others: &[String],
    tls: Option<&GrpcTls>,
) -> Result<(), (u8, String)> {
    let answers =
        futures::future::join_all(others.iter().map(|addr| cluster_info(addr, ASK, tls))).await;
    let live: BTreeSet<u64> = answers
        .iter()
        .flatten()
        .map(|i| i.node_id)
        .collect::<BTreeSet<_>>();
    let mut lost = Vec::new();
    for p in 0..info.partitions {
        // The leader's view of the voters when some live node leads the partition; the map's
        // replicas otherwise.
        let voters: Vec<u64> = answers
            .iter()
            .flatten()
            .filter_map(|i| i.partition_info.get(p as usize))
            .find(|pi| pi.local_replica && !pi.voters.is_empty() && pi.leader != 0)
            .map(|pi| pi.voters.clone())
            .or_else(|| {
                info.partition_info
                    .get(p as usize)
                    .map(|pi| pi.replicas.clone())
            })
            .unwrap_or_default();
        if !voters.contains(&id) {
            continue;
        }
        let alive = voters.iter().filter(|v| live.contains(v)).count();
        if alive * 2 <= voters.len() {
            lost.push(format!("{p} (voters {voters:?}, live {alive})"));
        }
    }
    if lost.is_empty() {
        Ok(())
    } else {
        Err((
            3,
            format!(
                "refused: evicting node {id} would leave these partitions without a live \
                 majority of their voters: {}. Bring nodes back first.",
                lost.join(", ")
            ),
        ))
    }
}

/// Partition `p` of `info`, or its metadata group when `p` is P.
fn group_info(info: &ClusterInfo, p: u32) -> Option<&PartitionInfo> {
    if p == info.partitions {
        info.metadata_group.as_ref()
    } else {
        info.partition_info.get(p as usize)
    }
}

/// Groups (partitions and the metadata group) each member leads, as the members say
/// themselves: how leadership is spread.
pub async fn leaders_per_node(
    members: &[String],
    tls: Option<&GrpcTls>,
) -> std::collections::BTreeMap<u64, usize> {
    let answers =
        futures::future::join_all(members.iter().map(|a| cluster_info(a, ASK, tls))).await;
    answers
        .iter()
        .flatten()
        .map(|i| {
            let led = i
                .partition_info
                .iter()
                .chain(i.metadata_group.iter())
                .filter(|pi| pi.local_replica && pi.leader == i.node_id)
                .count();
            (i.node_id, led)
        })
        .collect()
}

/// Groups (partitions, and the metadata group as number P) whose replicas have not settled on the map of membership `epoch` (or later):
/// no leader among `members` that follows that record, or the leader's voters are not the
/// map's replicas yet, or learners are still catching up. `[u32::MAX]` when no member on
/// that epoch answers. Tests use it to time a rebalance.
pub async fn unsettled_partitions(
    members: &[String],
    epoch: u64,
    tls: Option<&GrpcTls>,
) -> Vec<u32> {
    let answers =
        futures::future::join_all(members.iter().map(|a| cluster_info(a, ASK, tls))).await;
    // Only nodes that already follow the new record know the new targets.
    let infos: Vec<&ClusterInfo> = answers
        .iter()
        .flatten()
        .filter(|i| i.epoch >= epoch)
        .collect();
    let Some(any) = infos.first() else {
        return vec![u32::MAX];
    };
    let mut pending = Vec::new();
    // The partitions and the metadata group (number P).
    for p in 0..=any.partitions {
        let leader_view = infos
            .iter()
            .filter_map(|i| group_info(i, p).map(|pi| (i.node_id, pi)))
            .find(|(node, pi)| pi.local_replica && pi.leader == *node);
        let settled = leader_view.is_some_and(|(_, pi)| {
            let voters: BTreeSet<u64> = pi.voters.iter().copied().collect();
            let target: BTreeSet<u64> = pi.replicas.iter().copied().collect();
            pi.learners.is_empty() && voters == target
        });
        if !settled {
            pending.push(p);
        }
    }
    pending
}

//! Issue 19 (docs/architecture.md §6): a replica the target map no longer places on its node
//! is deleted only when a **committed** configuration excludes it — never because it heard
//! from no leader for a while (a cut, a group without quorum, a removal not yet committed).

use std::time::{Duration, Instant};

use raft::prelude::MessageType;
use tiermq_backend::placement::{NodeId, PartitionMap, DEFAULT_VNODES};

use super::raft_cluster::{retained, retained_in, Cluster, PARTITIONS, T};

/// Three times the tests' `orphan_ticks` (100 ticks of 20 ms), after which the old rule had
/// deleted a silent replica.
const SILENCE: Duration = Duration::from_secs(6);

/// The map that moves every partition off node 3 (onto node 4).
fn map_without_3() -> PartitionMap {
    PartitionMap::compute(2, &[1, 2, 4], PARTITIONS, 3, DEFAULT_VNODES)
}

/// Nodes 1-3, every partition on each, one retained message written to every partition.
async fn three_nodes_with_a_write() -> Cluster {
    let c = Cluster::new(&[1, 2, 3]);
    c.wait_leaders(T).await;
    for p in 0..PARTITIONS {
        c.propose(p, retained(&format!("p{p}/k0"), "before"), T)
            .await
            .unwrap();
    }
    c
}

/// Asserts that node 3 still holds a replica of every partition.
async fn assert_node_3_holds_everything(c: &Cluster, when: &str) {
    for p in 0..PARTITIONS {
        assert!(
            c.status(3, p).await.is_some(),
            "{when}: node 3 deleted its replica of partition {p}, which the committed \
             configuration still counts"
        );
    }
}

/// Waits until the leader of every partition (not node 3) has the voters `want`.
async fn wait_voters(c: &Cluster, want: &[NodeId]) {
    let started = Instant::now();
    loop {
        let mut pending = Vec::new();
        for p in 0..PARTITIONS {
            let mut voters = None;
            for id in c.live().into_iter().filter(|&id| id != 3) {
                if let Some(s) = c.status(id, p).await.filter(|s| s.is_leader) {
                    let mut v = s.voters;
                    v.sort();
                    voters = Some(v);
                }
            }
            if voters.as_deref() != Some(want) {
                pending.push(format!("p{p}: {voters:?}"));
            }
        }
        if pending.is_empty() {
            return;
        }
        assert!(started.elapsed() < T, "voters not {want:?}: {pending:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Node 3 is cut off and learns a map without it that the other nodes do not have yet: no
/// conf change is even proposed. However long it hears no leader, its replicas stay. Once the
/// others commit configurations without it (node 3 still cut off, so it cannot apply them),
/// node 3, healed, asks, hears "removed" from the leaders and deletes its replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_is_deleted_only_once_a_committed_configuration_excludes_it() {
    let mut c = three_nodes_with_a_write().await;
    c.isolate(3, &[1, 2, 3, 4]);
    // Leaders on node 3 step down (check quorum) before it learns the map, so that it proposes
    // nothing itself.
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.handle(3).unwrap().set_map(map_without_3());
    tokio::time::sleep(SILENCE).await;
    assert_node_3_holds_everything(&c, "silence, no removal proposed").await;

    // The others move the replicas to node 4 without node 3 (joint consensus: nodes 1 and 2
    // are a majority of both the old and the new voters).
    for id in [1, 2] {
        c.handle(id).unwrap().set_map(map_without_3());
    }
    c.map = map_without_3();
    c.join(4);
    wait_voters(&c, &[1, 2, 4]).await;
    for p in 0..PARTITIONS {
        c.propose(p, retained(&format!("p{p}/k1"), "after"), T)
            .await
            .unwrap();
    }
    c.heal();
    // Leaders no longer send node 3 anything: only the answer to its query removes it.
    c.wait_moved(T).await;
    for p in 0..PARTITIONS {
        assert!(c.status(3, p).await.is_none(), "node 3 still holds {p}");
        let kept = retained_in(&c.converged(p, T).await);
        assert_eq!(kept.len(), 2, "partition {p} after the move");
    }
}

/// Nodes 1 and 2 are down: the groups have no quorum, and node 3 — which a newer map no
/// longer wants — hears no leader for long. Its replicas must stay: with node 2 down again
/// later, node 3 is the quorum that lets node 1 commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_without_quorum_keeps_the_replica_the_target_dropped() {
    let mut c = three_nodes_with_a_write().await;
    c.stop(1).await;
    c.stop(2).await;
    c.handle(3).unwrap().set_map(map_without_3());
    tokio::time::sleep(SILENCE).await;
    assert_node_3_holds_everything(&c, "group without quorum").await;

    c.start(1);
    c.start(2);
    c.wait_leaders(T).await;
    c.stop(2).await;
    for p in 0..PARTITIONS {
        c.propose(p, retained(&format!("p{p}/k1"), "with node 3's vote"), T)
            .await
            .unwrap_or_else(|e| panic!("partition {p}: no quorum of nodes 1 and 3: {e:?}"));
    }
}

/// A learner removed without seeing the commit: node 4 joins, gets its snapshots, but its
/// acknowledgements are lost (so it stays a learner and never learns a commit), then the map
/// drops it again and the leaders remove the learner. A learner never campaigns, so it keeps
/// the id of its last leader forever: the silence that makes it ask is counted from the
/// leader messages it receives, not from that id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_learner_that_missed_the_commit_asks_and_is_deleted() {
    let mut c = three_nodes_with_a_write().await;
    *c.net.filter.lock().unwrap() = Some(Box::new(|from, _, m| {
        from == 4 && m.get_msg_type() == MessageType::MsgAppendResponse && !m.reject
    }));
    c.set_map(PartitionMap::compute(
        2,
        &[1, 2, 3, 4],
        PARTITIONS,
        3,
        DEFAULT_VNODES,
    ));
    c.join(4);
    let on_4 = c.map.partitions_of(4);
    assert!(!on_4.is_empty(), "the map moved nothing to node 4");
    let started = Instant::now();
    for &p in &on_4 {
        while !c
            .status(4, p)
            .await
            .is_some_and(|s| s.learners.contains(&4))
        {
            assert!(started.elapsed() < T, "node 4 got no snapshot of {p}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    c.set_map(PartitionMap::compute(
        3,
        &[1, 2, 3],
        PARTITIONS,
        3,
        DEFAULT_VNODES,
    ));
    c.wait_moved(T).await;
    for &p in &on_4 {
        assert!(c.status(4, p).await.is_none(), "node 4 still holds {p}");
    }
}

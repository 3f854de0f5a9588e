//! Partition placement: which backend nodes hold the replicas of each partition.
//!
//! The [`PartitionMap`] is **computed, never stored or edited by hand**: every backend derives
//! the same map from the same membership (the sorted set of node ids), the partition count P,
//! the replication factor R and the number of virtual nodes per node. It is epoch-numbered so
//! that peers and frontends can tell which of two maps is newer.
//!
//! # Algorithm
//!
//! Consistent hashing with virtual nodes, via the `hashring` crate:
//!
//! 1. Each physical node `n` contributes `vnodes` ring entries `VNode { node: n, index: i }`
//!    for `i in 0..vnodes`. Its ring position is the hash of the 16 bytes
//!    `n.to_le_bytes() ++ (i as u64).to_le_bytes()`, written with one `Hasher::write` call.
//! 2. Partition `p` is looked up at the hash of the ASCII bytes of `format!("partition-{p}")`
//!    (again a single `Hasher::write`, so no `str` terminator byte is involved).
//! 3. From that position we walk the ring clockwise and take the first R **distinct** physical
//!    nodes (ring neighbours often belong to a node already chosen; those are skipped). The
//!    first of them is the partition's preferred leader.
//!
//! Inserting a node therefore only inserts it into some partitions' walk order; the relative
//! order of the other nodes never changes. Adding a node moves exactly the replicas that land on
//! the new node (each such partition drops its R-th node), and removing one moves exactly the
//! replicas it held (each such partition takes the next distinct node) — ~R·P/B replicas, not a
//! reshuffle. The tests in `backend/tests/it/placement.rs` check this and measure the balance.
//!
//! # Determinism (read before changing anything here)
//!
//! The map must be identical on every node that computes it, so the hashing must be stable:
//!
//! - Ring positions come from `hashring::DefaultHashBuilder` (hashring 0.3.6), which is
//!   **SipHash-2-4 with the fixed keys (0, 0)** from the `siphasher` crate — *not* std's
//!   `DefaultHasher`/`RandomState` (randomly keyed per process). SipHash-2-4 is a specified
//!   function, and we feed it explicit little-endian bytes (no `usize`, no std `Hash` impls of
//!   `str`/integers whose byte encoding is an implementation detail), so the result does not
//!   depend on the platform, pointer width, endianness or Rust version.
//! - The assumption that remains is that all backends run a build with the same placement code
//!   and the same `hashring` default hasher. Because the map is recomputed rather than stored,
//!   a change here (or a `hashring` upgrade that changes its hasher or lookup) would make nodes
//!   of different versions disagree during a rolling upgrade and would move replicas. The unit
//!   tests pin raw ring positions and a complete small map so such a change is noticed; treat a
//!   failure there as a placement migration, not as a test to update.
//!
//! Key → partition (client id, topic, share group → p) is a different, separate hash:
//! [`tiermq_common::hashing::partition_of`] (FNV-1a), which is persisted implicitly in where data
//! lives.
//!
//! # `hashring` quirks worth knowing
//!
//! - `get_with_replicas(key, r)` returns `r + 1` entries (the owner plus `r` "replicas") when
//!   `r < len`, `len + 1` entries (the first one repeated) when `r == len`, and `len` entries when
//!   `r > len`. `ring_walk` below hides this.
//! - Each `get_with_replicas` call clones and rotates the whole ring (O(ring) per call), so we
//!   ask for a generous prefix once and only ask again (doubling) when it held too few nodes.
//! - Entries with equal hashes keep insertion order (stable sort), so nodes are always inserted
//!   in sorted order; `remove` of a colliding entry could remove the wrong one, so we never
//!   mutate a ring — every map is built from scratch.

use hashring::{DefaultHashBuilder, HashRing};
use serde::{Deserialize, Serialize};
use std::hash::{Hash, Hasher};

/// A backend node's id (`tiermq backend --node-id N`).
pub type NodeId = u64;

/// Virtual nodes per physical node unless configured otherwise.
pub const DEFAULT_VNODES: usize = 64;

/// Which nodes hold each partition's replicas. Computed, never edited by hand: every node
/// computes the same map from the same membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionMap {
    /// Increases with every membership change; the newer map wins.
    pub epoch: u64,
    /// P, the number of partitions (`replicas.len()`).
    pub partitions: u32,
    /// R as configured. Each partition has `min(R, number of nodes)` replicas.
    pub replication: usize,
    /// `replicas[p]` = the R distinct nodes of partition p, in ring order (the first is the preferred leader).
    pub replicas: Vec<Vec<NodeId>>,
}

/// One ring entry: the `index`-th virtual node of physical node `node`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct VNode {
    node: NodeId,
    index: u64,
}

impl Hash for VNode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // One explicit little-endian write: independent of std's integer `Hash` impls.
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&self.node.to_le_bytes());
        bytes[8..].copy_from_slice(&self.index.to_le_bytes());
        state.write(&bytes);
    }
}

/// The ring lookup key of partition `p`: the bytes of `"partition-{p}"`.
#[derive(Debug, Clone, Copy)]
struct PartitionKey(u32);

impl Hash for PartitionKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // `write` of the raw bytes, not `str::hash` (which appends a terminator byte and whose
        // encoding std does not promise to keep).
        state.write(format!("partition-{}", self.0).as_bytes());
    }
}

type Ring = HashRing<VNode, DefaultHashBuilder>;

/// The first `count` ring entries (clamped to the ring's size) clockwise from `key`'s position.
/// Works around `get_with_replicas` returning one entry more than the replica count asked for.
fn ring_walk(ring: &Ring, key: &PartitionKey, count: usize) -> Vec<VNode> {
    let count = count.min(ring.len());
    if count == 0 {
        return Vec::new();
    }
    // count - 1 < len, so hashring returns exactly (count - 1) + 1 entries.
    ring.get_with_replicas(key, count - 1)
        .expect("ring is not empty")
}

/// The first `want` distinct physical nodes clockwise from partition `p`'s ring position.
/// `want` must not exceed the number of physical nodes on the ring.
fn place(ring: &Ring, p: u32, want: usize) -> Vec<NodeId> {
    let key = PartitionKey(p);
    // 4·R ring entries usually contain R distinct nodes; if not, ask for twice as many.
    let mut count = want.saturating_mul(4).max(1);
    loop {
        let walk = ring_walk(ring, &key, count);
        let mut chosen: Vec<NodeId> = Vec::with_capacity(want);
        for vnode in &walk {
            if !chosen.contains(&vnode.node) {
                chosen.push(vnode.node);
                if chosen.len() == want {
                    return chosen;
                }
            }
        }
        assert!(
            walk.len() < ring.len(),
            "ring holds fewer than {want} distinct nodes"
        );
        count = count.saturating_mul(2);
    }
}

impl PartitionMap {
    /// Computes the map for `nodes` (order and duplicates do not matter).
    ///
    /// vnodes = virtual nodes per physical node (default [`DEFAULT_VNODES`]). If there are fewer
    /// nodes than `replication`, every node holds every partition (still in ring order, so the
    /// preferred leaders are spread). With no nodes at all every replica list is empty.
    ///
    /// # Panics
    /// If `replication` or `vnodes` is 0.
    pub fn compute(
        epoch: u64,
        nodes: &[NodeId],
        partitions: u32,
        replication: usize,
        vnodes: usize,
    ) -> PartitionMap {
        assert!(replication > 0, "replication factor must be positive");
        assert!(vnodes > 0, "at least one virtual node per node");

        let mut members = nodes.to_vec();
        members.sort_unstable();
        members.dedup();

        let replicas = if members.is_empty() {
            vec![Vec::new(); partitions as usize]
        } else {
            let mut ring: Ring = HashRing::with_hasher(DefaultHashBuilder);
            ring.batch_add(
                members
                    .iter()
                    .flat_map(|&node| (0..vnodes as u64).map(move |index| VNode { node, index }))
                    .collect(),
            );
            let want = replication.min(members.len());
            (0..partitions).map(|p| place(&ring, p, want)).collect()
        };

        PartitionMap {
            epoch,
            partitions,
            replication,
            replicas,
        }
    }

    /// Like [`PartitionMap::compute`], plus one more Raft group after the last partition: the
    /// **metadata group** (number `partitions`), which holds the membership record
    /// (`crate::members`). It is placed like a partition (ring position of
    /// `partition-<P>`), so it moves with the members like any other group; frontends never
    /// route to it because `partitions` (what keys hash over) stays P.
    pub fn compute_with_metadata(
        epoch: u64,
        nodes: &[NodeId],
        partitions: u32,
        replication: usize,
        vnodes: usize,
    ) -> PartitionMap {
        let mut map = Self::compute(epoch, nodes, partitions + 1, replication, vnodes);
        map.partitions = partitions;
        map
    }

    /// The metadata group's number, if this map places one.
    pub fn metadata_group(&self) -> Option<u32> {
        (self.replicas.len() > self.partitions as usize).then_some(self.partitions)
    }

    /// Every Raft group the map places: the partitions and, if present, the metadata group.
    pub fn groups(&self) -> u32 {
        self.replicas.len() as u32
    }

    /// The replicas of `partition`, preferred leader first; empty if there is no such
    /// partition (or no nodes), so a bogus partition number from the wire cannot panic.
    pub fn replicas_of(&self, partition: u32) -> &[NodeId] {
        self.replicas
            .get(partition as usize)
            .map_or(&[], Vec::as_slice)
    }

    /// The groups (partitions and the metadata group, if placed) where `node` is a replica,
    /// ascending.
    pub fn partitions_of(&self, node: NodeId) -> Vec<u32> {
        (0..self.groups())
            .filter(|&p| self.replicas_of(p).contains(&node))
            .collect()
    }

    /// The first replica of `partition`: where its Raft leadership should settle when all its
    /// replicas are healthy. The *actual* leader is whoever Raft elected.
    ///
    /// # Panics
    /// If `partition >= self.partitions` or the map has no nodes; use
    /// `replicas_of(p).first()` for a non-panicking lookup.
    pub fn preferred_leader(&self, partition: u32) -> NodeId {
        match self.replicas_of(partition).first() {
            Some(&node) => node,
            None => panic!(
                "partition {partition} has no replicas (map has {} partitions)",
                self.partitions
            ),
        }
    }

    /// Count of (partition, node) replica assignments that differ between two maps (for tests
    /// and for planning moves).
    ///
    /// Per partition this is `max(|self − other|, |other − self|)` over the replica *sets*: a
    /// replica that moves from one node to another counts once, a replica added or dropped
    /// (replica count changed) counts once, a mere reordering (leader preference) counts zero.
    /// A partition present in only one of the maps counts all its replicas.
    pub fn moved_replicas(&self, other: &PartitionMap) -> usize {
        let n = self.replicas.len().max(other.replicas.len());
        (0..n)
            .map(|p| {
                let a = self.replicas.get(p).map_or(&[][..], Vec::as_slice);
                let b = other.replicas.get(p).map_or(&[][..], Vec::as_slice);
                let only_a = a.iter().filter(|x| !b.contains(x)).count();
                let only_b = b.iter().filter(|x| !a.contains(x)).count();
                only_a.max(only_b)
            })
            .sum()
    }

    /// A leader per partition, spread evenly over the nodes (where leaders are moved after a
    /// membership change). A local search, not an optimum: the unit test checks that the
    /// counts differ by at most one for 3-7 nodes and 16 partitions. Deterministic:
    /// start from the preferred leaders, then repeatedly hand a partition of the node with the
    /// most leaders to one of its other replicas that has at least two fewer (lowest node id
    /// first), until no such move exists. Each move lowers the sum of squared counts, so this
    /// ends. Empty entries (no replicas) are `None`.
    pub fn balanced_leaders(&self) -> Vec<Option<NodeId>> {
        let mut leaders: Vec<Option<NodeId>> =
            self.replicas.iter().map(|r| r.first().copied()).collect();
        let mut count: std::collections::BTreeMap<NodeId, usize> =
            self.replicas.iter().flatten().map(|&n| (n, 0)).collect();
        for l in leaders.iter().flatten() {
            *count.entry(*l).or_default() += 1;
        }
        'improve: loop {
            let mut by_load: Vec<(usize, NodeId)> = count.iter().map(|(&n, &c)| (c, n)).collect();
            by_load.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            for &(most, from) in &by_load {
                for (p, leader) in leaders.iter_mut().enumerate() {
                    if *leader != Some(from) {
                        continue;
                    }
                    let better = self.replicas[p]
                        .iter()
                        .filter(|&&n| n != from && count[&n] + 2 <= most)
                        .min_by_key(|&&n| (count[&n], n));
                    if let Some(&to) = better {
                        *leader = Some(to);
                        *count.get_mut(&from).expect("counted") -= 1;
                        *count.get_mut(&to).expect("counted") += 1;
                        continue 'improve;
                    }
                }
            }
            return leaders;
        }
    }

    /// Number of partitions whose preferred leader differs between the two maps (a partition
    /// present in only one map counts).
    pub fn changed_leaders(&self, other: &PartitionMap) -> usize {
        let n = self.replicas.len().max(other.replicas.len());
        (0..n)
            .filter(|&p| {
                let a = self.replicas.get(p).and_then(|r| r.first());
                let b = other.replicas.get(p).and_then(|r| r.first());
                a != b
            })
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    fn pos<T: Hash>(t: T) -> u64 {
        DefaultHashBuilder.hash_one(t)
    }

    /// Pinned ring positions. If this fails, the hasher (or our byte encoding) changed: every
    /// node of a different build would compute a different map. That is a placement migration.
    #[test]
    fn ring_positions_are_pinned() {
        let got = [
            pos(VNode { node: 1, index: 0 }),
            pos(VNode { node: 1, index: 1 }),
            pos(VNode { node: 2, index: 0 }),
            pos(PartitionKey(0)),
            pos(PartitionKey(15)),
        ];
        println!("{got:#018x?}");
        assert_eq!(got, PINNED_POSITIONS);
    }

    /// SipHash-2-4, keys (0, 0), of the documented byte encodings. Cross-checked against an
    /// independent SipHash-2-4 implementation (which reproduces the reference vectors of the
    /// SipHash paper), so these are the specified function, not an artefact of one crate.
    const PINNED_POSITIONS: [u64; 5] = [
        0xc043_a198_a8f0_5a5a, // VNode { node: 1, index: 0 }: le(1) ++ le(0)
        0xeb81_f2e5_0ae3_be79, // VNode { node: 1, index: 1 }
        0x0c3e_b226_8943_c1dd, // VNode { node: 2, index: 0 }
        0xf648_65f8_88ab_06c3, // b"partition-0"
        0xf7b3_b951_ff30_7882, // b"partition-15"
    ];

    #[test]
    fn balanced_leaders_are_within_one_where_the_replicas_allow() {
        for nodes in 3..=7u64 {
            let ids: Vec<NodeId> = (1..=nodes).collect();
            let map = PartitionMap::compute(1, &ids, 16, 3, DEFAULT_VNODES);
            let leaders = map.balanced_leaders();
            let mut count = std::collections::BTreeMap::new();
            for (p, l) in leaders.iter().enumerate() {
                let l = l.expect("a leader");
                assert!(
                    map.replicas_of(p as u32).contains(&l),
                    "leader is a replica"
                );
                *count.entry(l).or_insert(0usize) += 1;
            }
            let max = count.values().max().copied().unwrap_or(0);
            let min = ids
                .iter()
                .map(|n| count.get(n).copied().unwrap_or(0))
                .min()
                .unwrap();
            assert!(max - min <= 1, "{nodes} nodes: leaders per node {count:?}");
            assert_eq!(leaders, map.balanced_leaders(), "deterministic");
        }
    }

    /// A complete small map, pinned for the same reason.
    #[test]
    fn small_map_is_pinned() {
        let map = PartitionMap::compute(7, &[1, 2, 3, 4, 5], 8, 3, DEFAULT_VNODES);
        println!("{:?}", map.replicas);
        let expected: Vec<Vec<NodeId>> = PINNED_MAP.iter().map(|r| r.to_vec()).collect();
        assert_eq!(map.replicas, expected);
        assert_eq!(map.epoch, 7);
        assert_eq!(map.partitions, 8);
        assert_eq!(map.replication, 3);
    }

    const PINNED_MAP: [[NodeId; 3]; 8] = [
        [1, 2, 3],
        [3, 1, 5],
        [3, 4, 1],
        [2, 5, 1],
        [5, 4, 2],
        [5, 2, 4],
        [4, 2, 3],
        [2, 5, 3],
    ];

    #[test]
    fn ring_walk_returns_exactly_count_entries() {
        let mut ring: Ring = HashRing::with_hasher(DefaultHashBuilder);
        ring.batch_add((0..5).map(|index| VNode { node: 9, index }).collect());
        let key = PartitionKey(3);
        for count in 0..=7 {
            assert_eq!(
                ring_walk(&ring, &key, count).len(),
                count.min(5),
                "count {count}"
            );
        }
        // The walk is the ring in order starting from the key: no entry repeats.
        let all = ring_walk(&ring, &key, 5);
        let mut idx: Vec<u64> = all.iter().map(|v| v.index).collect();
        idx.sort_unstable();
        assert_eq!(idx, vec![0, 1, 2, 3, 4]);
        // And it starts where `get` says the key lives.
        assert_eq!(ring.get(&key), all.first());
    }

    #[test]
    fn place_walks_past_repeated_nodes() {
        // One vnode for node 1 and many for node 2: most short walks see only node 2, so
        // finding R = 2 distinct nodes needs the doubling.
        let mut ring: Ring = HashRing::with_hasher(DefaultHashBuilder);
        let mut entries = vec![VNode { node: 1, index: 0 }];
        entries.extend((0..200).map(|index| VNode { node: 2, index }));
        ring.batch_add(entries);
        for p in 0..64 {
            let r = place(&ring, p, 2);
            assert_eq!(r.len(), 2);
            assert_ne!(r[0], r[1]);
        }
    }

    #[test]
    fn edge_cases() {
        let empty = PartitionMap::compute(1, &[], 4, 3, 8);
        assert_eq!(empty.replicas, vec![Vec::<NodeId>::new(); 4]);
        assert!(empty.partitions_of(1).is_empty());
        assert!(empty.replicas_of(0).is_empty());

        let one = PartitionMap::compute(1, &[42, 42, 42], 4, 3, 8);
        assert!(one.replicas.iter().all(|r| r == &vec![42]));
        assert_eq!(one.partitions_of(42), vec![0, 1, 2, 3]);
        assert_eq!(one.preferred_leader(2), 42);
        assert!(one.replicas_of(4).is_empty());

        let none = PartitionMap::compute(1, &[1, 2], 0, 3, 8);
        assert!(none.replicas.is_empty());

        assert_eq!(one.moved_replicas(&one), 0);
        assert_eq!(one.moved_replicas(&empty), 4);
        assert_eq!(empty.moved_replicas(&none), 0);
        assert_eq!(one.changed_leaders(&empty), 4);
    }

    #[test]
    #[should_panic(expected = "has no replicas")]
    fn preferred_leader_of_unknown_partition_panics() {
        PartitionMap::compute(1, &[1, 2, 3], 4, 3, 8).preferred_leader(4);
    }

    #[test]
    fn moved_replicas_counts_sets_not_order() {
        let mut a = PartitionMap::compute(1, &[1, 2, 3, 4], 2, 3, 8);
        a.replicas = vec![vec![1, 2, 3], vec![1, 2]];
        let mut b = a.clone();
        b.replicas = vec![vec![3, 2, 1], vec![1, 2, 4]];
        assert_eq!(a.moved_replicas(&b), 1); // partition 1 gained a replica
        assert_eq!(b.moved_replicas(&a), 1);
        assert_eq!(a.changed_leaders(&b), 1);
        b.replicas[0] = vec![4, 2, 1];
        assert_eq!(a.moved_replicas(&b), 2); // 3 → 4 in partition 0
    }

    #[test]
    fn serde_round_trip() {
        let map = PartitionMap::compute(3, &[1, 2, 3, 4], 16, 3, DEFAULT_VNODES);
        let bytes = postcard::to_allocvec(&map).unwrap();
        let back: PartitionMap = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, map);
    }
}

//! The membership record: which backends form the cluster, under which epoch.
//!
//! **Where the truth lives.** The record is one retained message, [`MEMBERS_TOPIC`], in the
//! *metadata group* — a Raft group placed like a partition, one past the last one
//! ([`PartitionMap::compute_with_metadata`]). Reusing the partition state machine gives the
//! record replication, snapshots and checkpoints for free, and because the group is placed by
//! the same consistent hashing it moves with the members like any other group. Frontends only
//! route to partitions `0..P`, so no client can write there.
//!
//! **The map is derived, never stored.** Every node computes the same [`PartitionMap`] from
//! the same record (members, P, R): placement is deterministic (`placement.rs`).
//!
//! **How a change happens** ([`Members::change`]): on the metadata group's leader, under a
//! lock: commit a barrier entry (so everything committed before is applied here and the read
//! below is not stale), read the record, change it, epoch + 1, propose it as a
//! compare-and-swap on the record read (`Command::ReplaceRetained`). The read and the proposal
//! are not one step: leadership can move away and back in between, and two nodes can each
//! believe they lead. The swap is decided where the entry is applied, in log order, so of two
//! changes computed from one record only the first commits; the other is refused and retried
//! from the new record. A retry of a change that was committed but whose answer was lost finds
//! nothing to change and answers with the current record: changes are idempotent.
//!
//! **How it spreads** ([`Members::run_poller`]): every node keeps the newest record it has
//! seen, in memory and in its data folder, and twice a second (a) reads the record from the
//! metadata group when it leads it and (b) asks one other member for theirs (`Cluster` with
//! `members_only`). Any newer record is *adopted*: stored, new peers added to the Raft
//! transport, and the derived map handed to the driver (`RaftHandle::set_map`), whose
//! reconciler moves replicas (`raft/node/membership.rs`). Epochs only grow, so the order in
//! which records arrive does not matter.
//!
//! Before the first change there is no record in the group: every node starts from the
//! static `--peers` list as epoch 1, which every node computes alike.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tiermq_common::partition_api::{Command, Query, Reply};
use tiermq_common::{Message, QoS};
use tiermq_proto::broker::broker_client::BrokerClient;
use tiermq_proto::broker::ClusterRequest;
use tiermq_proto::tls::{self, GrpcTls};
use tiermq_proto::API_VERSION;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::placement::{NodeId, PartitionMap, DEFAULT_VNODES};
use crate::raft::node::{ProposeError, RaftHandle};
use crate::raft::transport::GrpcTransport;

/// The retained topic of the metadata group that holds the record.
pub const MEMBERS_TOPIC: &str = "$cluster/members";
/// A topic nobody subscribes to: the barrier entry of a change.
const BARRIER_TOPIC: &str = "$cluster/barrier";
/// Where a node keeps the newest record it has seen (sled default tree).
const RECORD_KEY: &[u8] = b"tiermq/cluster/members";
/// How often the poller looks for a newer record.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// The set of backends and what the map is computed from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub epoch: u64,
    pub partitions: u32,
    pub replication: usize,
    /// Node id → gRPC address.
    pub members: BTreeMap<NodeId, String>,
}

impl MemberRecord {
    /// The partition map (with the metadata group) this record places.
    pub fn map(&self) -> PartitionMap {
        let ids: Vec<NodeId> = self.members.keys().copied().collect();
        PartitionMap::compute_with_metadata(
            self.epoch,
            &ids,
            self.partitions,
            self.replication,
            DEFAULT_VNODES,
        )
    }

    /// The record a node last stored in its data folder, if any.
    pub fn load(db: &sled::Db) -> Result<Option<MemberRecord>, String> {
        match db.get(RECORD_KEY).map_err(|e| e.to_string())? {
            None => Ok(None),
            Some(bytes) => postcard::from_bytes(&bytes)
                .map(Some)
                .map_err(|e| format!("stored membership record is unreadable: {e}")),
        }
    }

    /// Stores the record durably (a restart must not fall back to an older one).
    pub fn store(&self, db: &sled::Db) -> Result<(), String> {
        let bytes = postcard::to_stdvec(self).map_err(|e| e.to_string())?;
        db.insert(RECORD_KEY, bytes).map_err(|e| e.to_string())?;
        db.flush().map_err(|e| e.to_string())?;
        Ok(())
    }

    fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("a record always serializes")
    }

    fn decode(bytes: &[u8]) -> Option<MemberRecord> {
        postcard::from_bytes(bytes).ok()
    }
}

/// Why [`Members::change`] did not apply a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeError {
    /// This node does not lead the metadata group; ask the leader (if known).
    NotLeader(Option<NodeId>),
    /// The change itself is wrong (e.g. it would leave no member).
    Invalid(String),
    /// The proposal did not commit (leadership changed): retry.
    Failed(String),
}

/// This node's view of the membership: the newest record it has seen and the map derived
/// from it.
pub struct Members {
    node_id: NodeId,
    db: sled::Db,
    handle: RaftHandle,
    transport: Arc<GrpcTransport>,
    tls: Option<GrpcTls>,
    current: RwLock<Arc<(MemberRecord, PartitionMap)>>,
    /// One change at a time on this node (the metadata leader's read-modify-write).
    change_lock: tokio::sync::Mutex<()>,
    /// Warned once that this node left the record.
    warned_removed: Mutex<bool>,
}

impl Members {
    /// `record` is what the node starts with (stored, joined, or the static `--peers`); it
    /// is stored and its members added to the transport, but not handed to the driver,
    /// which was started with its map.
    pub fn new(
        node_id: NodeId,
        db: sled::Db,
        handle: RaftHandle,
        transport: Arc<GrpcTransport>,
        tls: Option<GrpcTls>,
        record: MemberRecord,
    ) -> Result<Arc<Members>, String> {
        record.store(&db)?;
        for (&id, addr) in &record.members {
            transport.add_peer(id, addr);
        }
        let map = record.map();
        Ok(Arc::new(Members {
            node_id,
            db,
            handle,
            transport,
            tls,
            current: RwLock::new(Arc::new((record, map))),
            change_lock: tokio::sync::Mutex::new(()),
            warned_removed: Mutex::new(false),
        }))
    }

    fn current(&self) -> Arc<(MemberRecord, PartitionMap)> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn record(&self) -> MemberRecord {
        self.current().0.clone()
    }

    pub fn map(&self) -> PartitionMap {
        self.current().1.clone()
    }

    pub fn epoch(&self) -> u64 {
        self.current().0.epoch
    }

    /// Takes `record` if it is newer than the current one: stores it, reaches its new
    /// members, and hands the map to the driver. Returns whether it was newer.
    pub fn adopt(&self, record: MemberRecord) -> bool {
        let map = record.map();
        {
            let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
            if record.epoch <= current.0.epoch {
                return false;
            }
            if record.partitions != current.0.partitions {
                // P is fixed for the life of a cluster: a record with another P is from
                // another cluster (a misconfigured --join), never ours.
                warn!(
                    epoch = record.epoch,
                    partitions = record.partitions,
                    ours = current.0.partitions,
                    "membership record with another partition count ignored"
                );
                return false;
            }
            if let Err(e) = record.store(&self.db) {
                warn!(error = %e, "cannot store the membership record; not adopted");
                return false;
            }
            *current = Arc::new((record.clone(), map.clone()));
        }
        for (&id, addr) in &record.members {
            self.transport.add_peer(id, addr);
        }
        info!(
            epoch = record.epoch,
            members = ?record.members.keys().collect::<Vec<_>>(),
            here = map.partitions_of(self.node_id).len(),
            "membership changed: moving replicas to the new map"
        );
        if !record.members.contains_key(&self.node_id) {
            let mut warned = self
                .warned_removed
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if !*warned {
                *warned = true;
                warn!(
                    epoch = record.epoch,
                    "this node is no longer a member: its replicas move away; stop it once \
                     `tiermq cluster status` shows it holds none"
                );
            }
        }
        self.handle.set_map(map);
        true
    }

    /// Adds and removes members (join, remove-node, evict). Must run on the metadata group's
    /// leader; see the module docs for why it is safe.
    pub async fn change(
        &self,
        add: Vec<(NodeId, String)>,
        remove: Vec<NodeId>,
    ) -> Result<MemberRecord, ChangeError> {
        let current = self.record();
        let meta = current.partitions;
        let not_leader = |e: ProposeError| match e {
            ProposeError::NotLeader { leader } => ChangeError::NotLeader(leader),
            ProposeError::UnknownPartition(_) => ChangeError::NotLeader(None),
            other => ChangeError::Failed(other.to_string()),
        };
        if add.iter().any(|(id, addr)| *id == 0 || !addr.contains(':')) {
            return Err(ChangeError::Invalid(
                "a member needs a node id above 0 and a host:port address".into(),
            ));
        }
        let _one_at_a_time = self.change_lock.lock().await;
        // The barrier: once it is applied here, so is every record committed before it.
        let barrier = Command::Publish {
            message: Arc::new(Message::new(
                BARRIER_TOPIC,
                Vec::new(),
                QoS::AtLeastOnce,
                false,
            )),
            publisher: None,
            store_retained: false,
            inbound_qos2: None,
        };
        self.handle
            .propose(meta, barrier)
            .await
            .map_err(not_leader)?;
        let stored = self.read_stored(meta).await.map_err(not_leader)?;
        // The swap compares with what the group holds, whatever this node believes.
        let expected = stored.as_ref().map(|(_, raw)| raw.clone());
        let base = match stored {
            Some((r, _)) if r.epoch >= current.epoch => r,
            _ => current,
        };
        let mut next = base.clone();
        for (id, addr) in add {
            next.members.insert(id, addr);
        }
        for id in &remove {
            next.members.remove(id);
        }
        if next.members.is_empty() {
            return Err(ChangeError::Invalid(
                "the change would leave the cluster without members".into(),
            ));
        }
        if next.members == base.members {
            // Nothing to do: already applied (perhaps by an earlier try of this change).
            self.adopt(base.clone());
            return Ok(base);
        }
        next.epoch = base.epoch + 1;
        let swap = Command::ReplaceRetained {
            message: Arc::new(Message::new(
                MEMBERS_TOPIC,
                next.encode(),
                QoS::AtLeastOnce,
                true,
            )),
            expected,
        };
        match self.handle.propose(meta, swap).await {
            Ok(Reply::Replaced { done: false }) => Err(ChangeError::Failed(
                "the membership record changed during the change: retry".into(),
            )),
            Ok(Reply::Replaced { done: true }) => {
                info!(
                    epoch = next.epoch,
                    members = ?next.members.keys().collect::<Vec<_>>(),
                    "membership record committed"
                );
                self.adopt(next.clone());
                Ok(next)
            }
            Ok(other) => Err(ChangeError::Failed(format!("unexpected reply {other:?}"))),
            Err(e) => Err(match not_leader(e) {
                ChangeError::NotLeader(_) => {
                    ChangeError::Failed("leadership moved during the change".into())
                }
                other => other,
            }),
        }
    }

    /// The record stored in the metadata group (a leader read on this node), with its encoding
    /// as stored.
    async fn read_stored(
        &self,
        meta: u32,
    ) -> Result<Option<(MemberRecord, bytes::Bytes)>, ProposeError> {
        let bytes = self
            .handle
            .query(
                meta,
                Query::Retained {
                    filter: MEMBERS_TOPIC.to_string(),
                },
            )
            .await?;
        let messages: Vec<Message> = postcard::from_bytes(&bytes).unwrap_or_default();
        Ok(messages
            .iter()
            .filter(|m| m.topic == MEMBERS_TOPIC)
            .filter_map(|m| Some((MemberRecord::decode(&m.payload)?, m.payload.clone())))
            .max_by_key(|(r, _)| r.epoch))
    }

    /// Spreads newer records until `shutdown` (see the module docs).
    pub async fn run_poller(self: Arc<Self>, shutdown: CancellationToken) {
        let mut clients: HashMap<String, BrokerClient<tonic::transport::Channel>> = HashMap::new();
        let mut turn = 0usize;
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let record = self.record();
            // (a) The truth, when this node leads the metadata group (a NotLeader answer is
            // the common case and costs one message to the driver).
            if let Ok(Some((stored, _))) = self.read_stored(record.partitions).await {
                self.adopt(stored);
            }
            // (b) One other member per round.
            let others: Vec<(&NodeId, &String)> = record
                .members
                .iter()
                .filter(|(id, _)| **id != self.node_id)
                .collect();
            if others.is_empty() {
                continue;
            }
            turn = turn.wrapping_add(1);
            let (_, addr) = others[turn % others.len()];
            let client = match clients.get(addr) {
                Some(c) => c.clone(),
                None => match tls::endpoint(addr, self.tls.as_ref()) {
                    Ok(e) => {
                        let c = BrokerClient::new(
                            e.connect_timeout(Duration::from_secs(1))
                                .timeout(Duration::from_secs(2))
                                .connect_lazy(),
                        );
                        clients.insert(addr.clone(), c.clone());
                        c
                    }
                    Err(_) => continue,
                },
            };
            let mut client = client;
            let answer = client
                .cluster(ClusterRequest {
                    version: API_VERSION,
                    members_only: true,
                })
                .await;
            if let Ok(info) = answer {
                let info = info.into_inner();
                if info.epoch > record.epoch {
                    self.adopt(MemberRecord {
                        epoch: info.epoch,
                        partitions: info.partitions,
                        replication: info.replication as usize,
                        members: info.members.into_iter().map(|m| (m.id, m.addr)).collect(),
                    });
                }
            }
        }
    }
}

/// Client side of a change (`tiermq backend --join`, `tiermq cluster remove-node` / `evict`):
/// asks `seeds` in turn, follows the leader hint of a node that does not lead the metadata
/// group, and retries until the change is applied, refused as invalid (`Err` with the reason),
/// or `timeout` passes.
pub async fn request_change(
    seeds: &[String],
    tls: Option<&GrpcTls>,
    add: Vec<(NodeId, String)>,
    remove: Vec<NodeId>,
    timeout: Duration,
) -> Result<tiermq_proto::broker::ChangeMembersReply, String> {
    use tiermq_proto::broker::{ChangeMembersRequest, Member};
    let deadline = tokio::time::Instant::now() + timeout;
    let request = ChangeMembersRequest {
        version: API_VERSION,
        add: add
            .into_iter()
            .map(|(id, addr)| Member { id, addr })
            .collect(),
        remove,
    };
    let mut last = String::from("no member address given");
    let mut hint: Option<String> = None;
    loop {
        let targets: Vec<String> = match hint.take() {
            Some(h) => std::iter::once(h).chain(seeds.iter().cloned()).collect(),
            None => seeds.to_vec(),
        };
        for addr in targets {
            let endpoint = match tls::endpoint(&addr, tls) {
                Ok(e) => e
                    .connect_timeout(Duration::from_secs(2))
                    .timeout(Duration::from_secs(10)),
                Err(e) => {
                    last = format!("{addr}: {e}");
                    continue;
                }
            };
            let channel = match endpoint.connect().await {
                Ok(c) => c,
                Err(e) => {
                    last = format!("{addr}: {e}");
                    continue;
                }
            };
            match BrokerClient::new(channel)
                .change_members(request.clone())
                .await
            {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    if reply.applied {
                        return Ok(reply);
                    }
                    if !reply.error.is_empty() {
                        return Err(reply.error);
                    }
                    last = format!("{addr}: not the metadata leader");
                    if !reply.leader_addr.is_empty() {
                        hint = Some(reply.leader_addr);
                        break;
                    }
                }
                Err(status) => last = format!("{addr}: {}", status.message()),
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("membership change not applied in time: {last}"));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The newest record any of `addrs` reports (`Cluster` with `members_only`), if one answers
/// within `timeout`.
pub async fn fetch_newest(
    addrs: &[String],
    tls: Option<&GrpcTls>,
    timeout: Duration,
) -> Option<MemberRecord> {
    let ask = |addr: String| async move {
        let endpoint = tls::endpoint(&addr, tls)
            .ok()?
            .connect_timeout(timeout)
            .timeout(timeout);
        let channel = endpoint.connect().await.ok()?;
        let info = BrokerClient::new(channel)
            .cluster(ClusterRequest {
                version: API_VERSION,
                members_only: true,
            })
            .await
            .ok()?
            .into_inner();
        Some(MemberRecord {
            epoch: info.epoch,
            partitions: info.partitions,
            replication: info.replication as usize,
            members: info.members.into_iter().map(|m| (m.id, m.addr)).collect(),
        })
    };
    let answers = futures::future::join_all(addrs.iter().cloned().map(ask)).await;
    answers.into_iter().flatten().max_by_key(|r| r.epoch)
}

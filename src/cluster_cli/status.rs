//! What `tiermq cluster status` reports, as data: the `--json` shape (versioned by
//! [`STATUS_FORMAT`]) that scripts and tests read, and lookups on it.

use serde::Serialize;

/// Version of the `--json` shape. Fields are only ever added; a change to existing ones
/// raises it.
pub const STATUS_FORMAT: u32 = 1;

/// The cluster as its members report it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ClusterStatus {
    /// [`STATUS_FORMAT`].
    pub format: u32,
    /// The address that was asked first.
    pub asked: String,
    /// The node id behind it.
    pub asked_node: u64,
    /// Epoch of the partition map.
    pub epoch: u64,
    pub partitions: u32,
    pub replication: u32,
    pub members: Vec<MemberStatus>,
    /// Frontends: every one given with `--frontends` and every one a member has an event
    /// stream from.
    pub frontends: Vec<FrontendStatus>,
    pub partition_status: Vec<PartitionStatus>,
    /// Every member answered and every partition has a leader.
    pub healthy: bool,
    /// Why not healthy, in words.
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct MemberStatus {
    pub id: u64,
    pub addr: String,
    pub reachable: bool,
    /// Why it is not reachable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Partitions this member leads (as it says itself).
    pub leads: u32,
    /// The map epoch this member reports (0 when unreachable).
    pub epoch: u64,
    /// Frontends with an open event stream to this member.
    pub frontends: Vec<u64>,
}

/// A frontend as its admin endpoint (`/status`) and the members' event streams show it.
/// Every key is always present; `null` where the source was not asked or did not answer.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct FrontendStatus {
    /// Frontend id (0 when its admin endpoint did not answer and no member knows it).
    pub id: u64,
    /// The admin endpoint asked (`--frontends`), if any.
    pub admin: Option<String>,
    /// Whether the admin endpoint answered; `null` when none was given for this frontend.
    pub reachable: Option<bool>,
    /// MQTT connections open on it now.
    pub connections: Option<u64>,
    pub ready: Option<bool>,
    /// Why not ready, in words.
    pub not_ready: Option<String>,
    pub draining: Option<bool>,
    /// Members this frontend has an open event stream to.
    pub event_streams: Vec<u64>,
    /// Why the admin endpoint did not answer.
    pub error: Option<String>,
}

impl FrontendStatus {
    /// A frontend known only by id (and the members it streams from).
    pub(super) fn unknown(id: u64, event_streams: Vec<u64>) -> FrontendStatus {
        FrontendStatus {
            id,
            admin: None,
            reachable: None,
            connections: None,
            ready: None,
            not_ready: None,
            draining: None,
            event_streams,
            error: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PartitionStatus {
    pub partition: u32,
    /// The replica that says it leads, with the highest term; 0: none.
    pub leader: u64,
    pub term: u64,
    pub replicas: Vec<ReplicaStatus>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ReplicaStatus {
    pub node: u64,
    pub reachable: bool,
    /// The leader this replica believes in (0: none / unknown).
    pub sees_leader: u64,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    /// Entries this replica has applied fewer than the leader has committed.
    pub lag: u64,
}

impl ClusterStatus {
    /// The leader of the partition `key` (a client id or topic) maps to; 0 when none.
    pub fn leader_of_key(&self, key: &str) -> u64 {
        let p = tiermq_common::hashing::partition_of(key, self.partitions.max(1));
        self.partition_status
            .iter()
            .find(|s| s.partition == p)
            .map_or(0, |s| s.leader)
    }
}

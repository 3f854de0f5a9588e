//! What one seed runs: the cluster's shape, the clients, and the faults with their times.
//! Drawn from the seed alone, before the run starts, so a plan can be printed and replayed.

use std::fmt;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tiermq_backend::placement::NodeId;
use tiermq_common::QoS;

/// Virtual time at which publishers start (subscribers subscribe before).
pub const TRAFFIC_START_MS: u64 = 2_000;

#[derive(Debug, Clone)]
pub struct Publisher {
    pub client_id: String,
    pub topic: String,
    pub qos: QoS,
    pub count: u32,
    /// Pause between two publishes, in milliseconds.
    pub gap_ms: u64,
}

/// A client that connects with a will on `t/w/<client id>` (which the `t/#` subscribers
/// match) and does nothing else: each connection lives a while, then ends by a normal
/// DISCONNECT (no will) or by dropping (the will fires, at once or after its delay unless the
/// reconnect comes first), and the client reconnects after a pause. Faults end its
/// connections too.
#[derive(Debug, Clone)]
pub struct WillClient {
    pub client_id: String,
    pub qos: QoS,
    /// Will Delay Interval: 0 fires when the connection ends.
    pub delay_secs: u32,
    /// Greater than the delay, so a reconnect within the delay cancels the will.
    pub session_expiry_secs: u32,
    /// Whether its connections sometimes end with a normal DISCONNECT.
    pub normal_disconnects: bool,
}

/// A subscriber that connects and subscribes `filter` (QoS2) only at `at_ms`, during the
/// traffic and the faults: every message its publisher sends after the SUBACK must reach it.
#[derive(Debug, Clone)]
pub struct Subscriber {
    pub client_id: String,
    pub filter: String,
    pub at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// kill -9 of a backend, restarted after `down_ms`.
    CrashNode { node: NodeId, down_ms: u64 },
    /// Both directions of a backend-backend link cut for `ms`.
    CutNodes { a: NodeId, b: NodeId, ms: u64 },
    /// A backend cut off from every other node and every frontend for `ms`.
    IsolateNode { node: NodeId, ms: u64 },
    /// A frontend cut off from one backend for `ms`.
    CutFrontend {
        frontend: u64,
        node: NodeId,
        ms: u64,
    },
    /// A frontend process dies (its clients lose their connections); back after `down_ms`.
    CrashFrontend { frontend: u64, down_ms: u64 },
    /// One client's connection drops without DISCONNECT.
    DropClient { client: usize },
    /// Every Raft storage write of a backend fails (its driver must stop, not acknowledge);
    /// after `ms` the disk works again and the node restarts from what it had flushed.
    DiskError { node: NodeId, ms: u64 },
    /// A membership change: the members become `members` (a new node joins, or one is
    /// removed); replicas move by learner, snapshot and promotion.
    Members { members: [NodeId; 4], count: usize },
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::CrashNode { node, down_ms } => write!(f, "crash node {node} for {down_ms} ms"),
            Fault::CutNodes { a, b, ms } => write!(f, "cut nodes {a}-{b} for {ms} ms"),
            Fault::IsolateNode { node, ms } => write!(f, "isolate node {node} for {ms} ms"),
            Fault::CutFrontend { frontend, node, ms } => {
                write!(f, "cut frontend {frontend} from node {node} for {ms} ms")
            }
            Fault::CrashFrontend { frontend, down_ms } => {
                write!(f, "crash frontend {frontend} for {down_ms} ms")
            }
            Fault::DropClient { client } => write!(f, "drop the connection of client #{client}"),
            Fault::DiskError { node, ms } => write!(f, "disk of node {node} fails for {ms} ms"),
            Fault::Members { members, count } => {
                write!(f, "members become {:?}", &members[..*count])
            }
        }
    }
}

/// A bug put in on purpose, to show that the simulation finds it (`--plant NAME`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Planted {
    /// The frontend sends PUBREL before the subscriber's PUBREC is durable (issue 19, bug 3):
    /// a lost PUBREC makes the session re-send the message as new.
    EarlyPubrel,
    /// The publisher is acknowledged once its message reached the leader, before the
    /// partitions committed it: a leader that dies takes acknowledged messages with it.
    AckBeforeCommit,
    /// Inbound QoS2 without the idempotency token outside the publisher's partition (the
    /// gap issue 19 §2 closed): a retried or re-sent publish is queued twice there.
    NoQos2Key,
    /// The will dispatch publishes without the will's idempotency key and never confirms
    /// `WillPublished`: every leader change of the will's partition publishes it again.
    WillTwice,
    /// The will dispatch publishes a will only to its own session's partition and confirms
    /// it: subscribers whose sessions live elsewhere never get it.
    WillHomeOnly,
    /// A SUBSCRIBE is answered (SUBACK) as soon as it is sent, before its partition applied
    /// it: messages published right after the SUBACK can miss the subscription.
    LateSubscribeRoute,
    /// A replica the target map no longer places on its node is deleted after `orphan_ticks`
    /// without a leader, unasked (the rule issue 19 §6 replaced): a replica that a committed
    /// configuration still counts can go, leaving fewer copies than the quorum assumes. The
    /// simulation does not find it (its crashes keep what was flushed, so the copies left
    /// suffice): `backend/tests/it/orphans.rs` tests it.
    OrphanBySilence,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub seed: u64,
    pub planted: Option<Planted>,
    pub nodes: u64,
    pub partitions: u32,
    pub frontends: u64,
    pub checkpoint_entries: u64,
    pub log_keep_entries: u64,
    pub loss: f64,
    pub max_delay_ms: u64,
    /// Nodes that join during the run (ids after `nodes`).
    pub joins: Vec<NodeId>,
    pub publishers: Vec<Publisher>,
    pub subscribers: Vec<String>,
    /// Subscribers that subscribe during the traffic (client numbers after the publishers').
    pub late_subscribers: Vec<Subscriber>,
    /// Clients with wills (client numbers after the late subscribers').
    pub will_clients: Vec<WillClient>,
    /// (virtual time in ms, fault), in time order.
    pub faults: Vec<(u64, Fault)>,
    /// Faults stop and everything heals at this time; the run ends `settle_ms` later.
    pub heal_ms: u64,
    pub settle_ms: u64,
}

impl Plan {
    pub fn from_seed(seed: u64) -> Plan {
        let mut rng = StdRng::seed_from_u64(seed);
        let nodes = 3;
        let frontends = 2;
        let publishers = (0..rng.random_range(2..5))
            .map(|k| Publisher {
                client_id: format!("pub-{k}"),
                topic: format!("t/{k}"),
                qos: if rng.random_bool(0.5) {
                    QoS::AtLeastOnce
                } else {
                    QoS::ExactlyOnce
                },
                count: rng.random_range(20..80),
                gap_ms: rng.random_range(20..250),
            })
            .collect();
        let subscribers: Vec<String> = (0..rng.random_range(1..4))
            .map(|k| format!("sub-{k}"))
            .collect();
        let clients = 5 + subscribers.len();
        let heal_ms = 24_000;
        let mut faults = Vec::new();
        let mut t = TRAFFIC_START_MS + rng.random_range(0..1_500);
        while t < heal_ms - 1_000 {
            let node = rng.random_range(1..=nodes);
            let other = (node + rng.random_range(1..nodes) - 1) % nodes + 1;
            let fault = match rng.random_range(0..100) {
                0..=24 => Fault::CrashNode {
                    node,
                    down_ms: rng.random_range(300..6_000),
                },
                25..=44 => Fault::CutNodes {
                    a: node,
                    b: other,
                    ms: rng.random_range(300..5_000),
                },
                45..=59 => Fault::IsolateNode {
                    node,
                    ms: rng.random_range(300..5_000),
                },
                60..=69 => Fault::CutFrontend {
                    frontend: rng.random_range(1..=frontends),
                    node,
                    ms: rng.random_range(300..5_000),
                },
                70..=74 => Fault::DiskError {
                    node,
                    ms: rng.random_range(300..4_000),
                },
                75..=79 => Fault::CrashFrontend {
                    frontend: rng.random_range(1..=frontends),
                    down_ms: rng.random_range(300..4_000),
                },
                _ => Fault::DropClient {
                    client: rng.random_range(0..clients),
                },
            };
            faults.push((t, fault));
            t += rng.random_range(200..3_000);
        }
        // Half the seeds change the membership: node 4 joins, later one of 1..3 is removed.
        let mut joins = Vec::new();
        if rng.random_bool(0.5) {
            joins.push(nodes + 1);
            let join_at = rng.random_range(TRAFFIC_START_MS..12_000);
            let removed = rng.random_range(1..=nodes);
            let remove_at = join_at + rng.random_range(2_000..8_000);
            let mut all = [0; 4];
            all[..4].copy_from_slice(&[1, 2, 3, 4]);
            faults.push((
                join_at,
                Fault::Members {
                    members: all,
                    count: 4,
                },
            ));
            let mut rest = [0; 4];
            let kept: Vec<NodeId> = (1..=4).filter(|n| *n != removed).collect();
            rest[..3].copy_from_slice(&kept);
            faults.push((
                remove_at,
                Fault::Members {
                    members: rest,
                    count: 3,
                },
            ));
            faults.sort_by_key(|(t, _)| *t);
        }
        let mut plan = Plan {
            seed,
            planted: None,
            nodes,
            joins,
            partitions: rng.random_range(2..5),
            frontends,
            checkpoint_entries: rng.random_range(8..60),
            log_keep_entries: rng.random_range(0..10),
            loss: if rng.random_bool(0.5) {
                0.0
            } else {
                rng.random_range(0.0..0.05)
            },
            max_delay_ms: rng.random_range(1..15),
            publishers,
            subscribers,
            faults,
            heal_ms,
            settle_ms: 30_000,
            late_subscribers: Vec::new(),
            will_clients: Vec::new(),
        };
        plan.draw_late_clients();
        plan
    }

    /// Late subscribers, will clients and faults aimed at them, from a stream of their own:
    /// the rest of a seed's plan stays what it was before they existed.
    fn draw_late_clients(&mut self) {
        let mut rng = StdRng::seed_from_u64(self.seed ^ 0x5157_11a5_0019_0019);
        let (traffic, heal) = (TRAFFIC_START_MS, self.heal_ms);
        self.late_subscribers = (0..rng.random_range(1..3))
            .map(|k| Subscriber {
                client_id: format!("late-{k}"),
                filter: if rng.random_bool(0.5) {
                    "t/#".to_string()
                } else {
                    format!("t/{}", rng.random_range(0..self.publishers.len()))
                },
                at_ms: rng.random_range(traffic + 300..heal - 3_000),
            })
            .collect();
        self.will_clients = (0..rng.random_range(1..4))
            .map(|k| WillClient {
                client_id: format!("will-{k}"),
                qos: if rng.random_bool(0.5) {
                    QoS::AtLeastOnce
                } else {
                    QoS::ExactlyOnce
                },
                delay_secs: if rng.random_bool(0.5) {
                    0
                } else {
                    rng.random_range(1..5)
                },
                session_expiry_secs: if rng.random_bool(0.5) { 600 } else { u32::MAX },
                normal_disconnects: rng.random_bool(0.5),
            })
            .collect();
        // Their own dropped connections (the main draw's DropClient may name them too).
        let first = self.subscribers.len() + self.publishers.len();
        let late = self.late_subscribers.len() + self.will_clients.len();
        for _ in 0..rng.random_range(0..4) {
            let t = rng.random_range(traffic..heal - 1_000);
            let client = first + rng.random_range(0..late);
            self.faults.push((t, Fault::DropClient { client }));
        }
        self.faults.sort_by_key(|(t, _)| *t);
    }

    /// The names of the clients in their numbering (`Fault::DropClient`).
    pub fn client_names(&self) -> Vec<&str> {
        self.subscribers
            .iter()
            .map(String::as_str)
            .chain(self.publishers.iter().map(|p| p.client_id.as_str()))
            .chain(self.late_subscribers.iter().map(|s| s.client_id.as_str()))
            .chain(self.will_clients.iter().map(|w| w.client_id.as_str()))
            .collect()
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "plan of seed {}: {} backends, {} partitions (R=3), {} frontends, checkpoint every {} entries keeping {}, loss {:.3}, delay ≤ {} ms",
            self.seed,
            self.nodes,
            self.partitions,
            self.frontends,
            self.checkpoint_entries,
            self.log_keep_entries,
            self.loss,
            self.max_delay_ms
        )?;
        for p in &self.publishers {
            writeln!(
                f,
                "  {} publishes {} × {:?} on {} every {} ms",
                p.client_id, p.count, p.qos, p.topic, p.gap_ms
            )?;
        }
        writeln!(
            f,
            "  subscribers (t/#, QoS2): {}",
            self.subscribers.join(", ")
        )?;
        for s in &self.late_subscribers {
            writeln!(
                f,
                "  {} subscribes {} (QoS2) at {} ms",
                s.client_id, s.filter, s.at_ms
            )?;
        }
        for w in &self.will_clients {
            writeln!(
                f,
                "  {} connects with a {:?} will on t/w/{}, delay {} s, session expiry {} s{}",
                w.client_id,
                w.qos,
                w.client_id,
                w.delay_secs,
                w.session_expiry_secs,
                if w.normal_disconnects {
                    ", sometimes disconnects normally"
                } else {
                    ""
                }
            )?;
        }
        writeln!(f, "  clients by number: {:?}", self.client_names())?;
        for (t, fault) in &self.faults {
            writeln!(f, "  at {t} ms: {fault}")?;
        }
        write!(
            f,
            "  heal at {} ms, check at {} ms",
            self.heal_ms,
            self.heal_ms + self.settle_ms
        )
    }
}

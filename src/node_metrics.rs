//! What each role puts behind its metrics endpoint ([`crate::metrics_http`]): the frontend's
//! connection counters, and what the partitions can tell without being changed for it.
//!
//! - standalone: the frontend counters, the log's entries and flushes (atomics the partition
//!   tasks already keep), and the retained message count (asked from the partition tasks, at
//!   most every few seconds — see [`RetainedCount`]); ready once the MQTT listener serves;
//! - frontend: the frontend counters and `tiermq_draining`; ready when its cluster client has
//!   an open route stream from the leader of every partition and it is not draining; `/status`
//!   (id, connections, draining, ready) and `POST /drain`;
//! - backend: per Raft group this node replicates — leader, term, commit/applied/last index,
//!   snapshot index — the driver's counters, the map epoch and the attached frontends; ready
//!   when every group it replicates knows a leader.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tiermq_backend::local::LocalBroker;
use tiermq_backend::members::Members;
use tiermq_backend::raft::node::RaftHandle;
use tiermq_frontend::drain::Drain;
use tiermq_frontend::metrics::FrontendMetrics;
use tiermq_proto::client::ClusterClient;

use crate::metrics_http::{Endpoint, Hook};

const PREFIX: &str = "tiermq";

/// One counter of [`AtomicCounters`]: name (without prefix), help, current value.
type CounterRead = (&'static str, &'static str, u64);

/// Counters that live elsewhere as plain atomics (the partition tasks' and the Raft driver's
/// statistics), read at scrape time: nothing is copied on their hot path.
struct AtomicCounters(Box<dyn Fn() -> Vec<CounterRead> + Send + Sync>);

impl std::fmt::Debug for AtomicCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AtomicCounters")
    }
}

impl Collector for AtomicCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, value) in (self.0)() {
            let counter = ConstCounter::new(value);
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        Ok(())
    }
}

/// Series whose source exists only later (the partitions once recovered, the cluster client
/// once the backends answered) while the endpoint serves from the start: written at scrape
/// time by the closure, absent until then.
struct LateSeries(Box<EncodeFn>);

type EncodeFn = dyn Fn(&mut DescriptorEncoder) -> Result<(), std::fmt::Error> + Send + Sync;

impl std::fmt::Debug for LateSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LateSeries")
    }
}

impl Collector for LateSeries {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        (self.0)(&mut encoder)
    }
}

/// Writes one latency histogram (`<name>_seconds`).
fn encode_seconds(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    histogram: &Histogram,
) -> Result<(), std::fmt::Error> {
    let metric =
        encoder.encode_descriptor(name, help, Some(&Unit::Seconds), histogram.metric_type())?;
    histogram.encode(metric)
}

const FSYNC_HELP: &str = "One flush (write + fsync) of this node's log database";

/// The retained message count of a standalone broker. Reading it walks the retained store
/// of every partition, so readers (scrapes, `$SYS`) share one answer for a second.
#[derive(Clone)]
pub struct RetainedCount {
    broker: LocalBroker,
    last: Arc<Mutex<Option<(Instant, u64)>>>,
}

impl RetainedCount {
    const FRESH: Duration = Duration::from_secs(1);

    pub fn new(broker: LocalBroker) -> RetainedCount {
        RetainedCount {
            broker,
            last: Arc::default(),
        }
    }

    pub async fn get(&self) -> u64 {
        if let Some((at, n)) = *self.last.lock().unwrap_or_else(|e| e.into_inner()) {
            if at.elapsed() < Self::FRESH {
                return n;
            }
        }
        let n = self.broker.retained_count().await as u64;
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), n));
        n
    }
}

/// The standalone broker once it serves (see [`standalone`]).
pub type StandaloneState = Arc<OnceLock<(LocalBroker, RetainedCount)>>;

/// The standalone broker's endpoint. `broker` is filled in once the partitions are open and
/// the MQTT listener runs; until then `/readyz` answers 503 (recovery can take a while).
pub fn standalone(frontend: &FrontendMetrics, broker: StandaloneState) -> Endpoint {
    let mut registry = Registry::with_prefix(PREFIX);
    frontend.register(&mut registry);
    let retained = Gauge::<i64>::default();
    registry.register(
        "retained_messages",
        "Retained messages stored (all partitions, $SYS included)",
        retained.clone(),
    );
    let load = LoadGauges::default();
    load.register(&mut registry);
    let state = broker.clone();
    registry.register_collector(Box::new(AtomicCounters(Box::new(move || {
        let Some((broker, _)) = state.get() else {
            return Vec::new();
        };
        let stats = broker.stats();
        vec![
            (
                "log_entries",
                "Commands appended to the partitions' logs",
                stats.entries.load(Ordering::Relaxed),
            ),
            (
                "log_flushes",
                "Log flushes (write + fsync) of the partitions",
                stats.flushes.load(Ordering::Relaxed),
            ),
        ]
    }))));
    let for_fsync = broker.clone();
    registry.register_collector(Box::new(LateSeries(Box::new(
        move |encoder| match for_fsync.get() {
            Some((broker, _)) => encode_seconds(
                encoder,
                "fsync_duration",
                FSYNC_HELP,
                &broker.stats().flush_seconds,
            ),
            None => Ok(()),
        },
    ))));
    let for_refresh = broker.clone();
    let refresh: Hook<()> = Arc::new(move || {
        let ready = for_refresh.get().cloned();
        let (retained, load) = (retained.clone(), load.clone());
        Box::pin(async move {
            if let Some((broker, count)) = ready {
                retained.set(count.get().await as i64);
                load.set(broker.load().await);
            }
        })
    });
    let readiness: Hook<Result<(), String>> = Arc::new(move || {
        let ready = broker.get().is_some();
        Box::pin(async move {
            if ready {
                Ok(())
            } else {
                Err("recovering the data folder".to_string())
            }
        })
    });
    Endpoint {
        readiness: Some(readiness),
        refresh: Some(refresh),
        ..Endpoint::new(registry)
    }
}

/// Session totals ([`LocalBroker::load`] on a standalone broker, the led partitions on a
/// backend), set before each scrape.
#[derive(Default, Clone)]
struct LoadGauges {
    sessions: Gauge,
    connected: Gauge,
    subscriptions: Gauge,
    inflight: Gauge,
    queued: Gauge,
    queued_bytes: Gauge,
}

impl LoadGauges {
    fn register(&self, registry: &mut Registry) {
        for (name, help, gauge) in [
            (
                "sessions",
                "Sessions stored in the partitions, connected or not",
                &self.sessions,
            ),
            (
                "sessions_connected",
                "Sessions attached to a connection",
                &self.connected,
            ),
            (
                "session_subscriptions",
                "Subscriptions of all sessions, offline ones included",
                &self.subscriptions,
            ),
            (
                "inflight_messages",
                "QoS1/2 deliveries sent to clients and not yet acknowledged",
                &self.inflight,
            ),
            (
                "queued_messages",
                "Messages queued in sessions (behind the in-flight window, or offline)",
                &self.queued,
            ),
        ] {
            registry.register(name, help, gauge.clone());
        }
        registry.register_with_unit(
            "queued",
            "Payload bytes of the messages queued in sessions",
            Unit::Bytes,
            self.queued_bytes.clone(),
        );
    }

    fn set(&self, l: tiermq_backend::partition::PartitionLoad) {
        let set = |g: &Gauge, v: u64| {
            g.set(v as i64);
        };
        set(&self.sessions, l.sessions);
        set(&self.connected, l.connected);
        set(&self.subscriptions, l.subscriptions);
        set(&self.inflight, l.inflight);
        set(&self.queued, l.queued);
        set(&self.queued_bytes, l.queued_bytes);
    }
}

/// What a cluster frontend's endpoint reads besides its counters.
#[derive(Clone)]
pub struct FrontendState {
    pub frontend_id: u64,
    pub metrics: Arc<FrontendMetrics>,
    pub drain: Drain,
    /// Set once the backends answered (the endpoint is up before that).
    pub client: Arc<OnceLock<ClusterClient>>,
}

impl FrontendState {
    /// `Ok` when the frontend can serve every client: it knows a live leader for every
    /// partition (an open route stream from it) and is not draining.
    pub fn readiness(&self) -> Result<(), String> {
        if self.drain.is_draining() {
            return Err("draining".into());
        }
        let Some(client) = self.client.get() else {
            return Err("connecting to the backends".into());
        };
        let unknown = client.partitions_without_leader();
        if unknown.is_empty() {
            Ok(())
        } else {
            let list: Vec<String> = unknown.iter().map(u32::to_string).collect();
            Err(format!(
                "no known leader for partition(s) {}",
                list.join(",")
            ))
        }
    }

    /// The `/status` document (its shape is documented in docs/operations.md).
    pub fn status_json(&self) -> String {
        let ready = self.readiness();
        serde_json::json!({
            "role": "frontend",
            "frontend_id": self.frontend_id,
            "connections": self.metrics.connected(),
            "connection_tasks": self.drain.connections(),
            "draining": self.drain.is_draining(),
            "ready": ready.is_ok(),
            "not_ready": ready.err(),
        })
        .to_string()
    }
}

/// A cluster frontend's endpoint.
pub fn frontend(state: FrontendState) -> Endpoint {
    let mut registry = Registry::with_prefix(PREFIX);
    state.metrics.register(&mut registry);
    let client = state.client.clone();
    registry.register_collector(Box::new(LateSeries(Box::new(
        move |encoder| match client.get() {
            Some(client) => client.metrics().encode(encoder),
            None => Ok(()),
        },
    ))));
    let draining = Gauge::<i64>::default();
    registry.register(
        "draining",
        "1 while this frontend drains (stops accepting, moves its clients away)",
        draining.clone(),
    );
    let for_refresh = state.drain.clone();
    let refresh: Hook<()> = Arc::new(move || {
        draining.set(i64::from(for_refresh.is_draining()));
        Box::pin(async {})
    });
    let for_ready = state.clone();
    let readiness: Hook<Result<(), String>> = Arc::new(move || {
        let r = for_ready.readiness();
        Box::pin(async move { r })
    });
    let for_status = state.clone();
    let status: Hook<String> = Arc::new(move || {
        let s = for_status.status_json();
        Box::pin(async move { s })
    });
    let drain: Hook<Result<String, String>> = Arc::new(move || {
        let started = state.drain.start();
        let left = state.drain.connections();
        Box::pin(async move {
            if started {
                Ok(format!("draining: {left} connection(s) to move"))
            } else {
                Err(format!("already draining: {left} connection(s) left"))
            }
        })
    });
    Endpoint {
        refresh: Some(refresh),
        readiness: Some(readiness),
        status: Some(status),
        drain: Some(drain),
        ..Endpoint::new(registry)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabel {
    partition: String,
}

/// Per-group gauges of a backend, set before each scrape.
#[derive(Default, Clone)]
struct GroupGauges {
    leader: Family<PartitionLabel, Gauge>,
    is_leader: Family<PartitionLabel, Gauge>,
    term: Family<PartitionLabel, Gauge>,
    commit: Family<PartitionLabel, Gauge>,
    applied: Family<PartitionLabel, Gauge>,
    last: Family<PartitionLabel, Gauge>,
    snapshot: Family<PartitionLabel, Gauge>,
}

impl GroupGauges {
    fn register(&self, registry: &mut Registry) {
        for (name, help, family) in [
            (
                "raft_leader",
                "Node id of the group's leader as this replica knows it (0: none known)",
                &self.leader,
            ),
            (
                "raft_is_leader",
                "1 when this node leads the partition's group",
                &self.is_leader,
            ),
            ("raft_term", "Raft term of the group", &self.term),
            (
                "raft_commit_index",
                "Highest log index known committed",
                &self.commit,
            ),
            (
                "raft_applied_index",
                "Highest log index applied to the partition state machine",
                &self.applied,
            ),
            (
                "raft_last_index",
                "Last index in this replica's log",
                &self.last,
            ),
            (
                "raft_snapshot_index",
                "Index of the latest snapshot stored or installed (0: none)",
                &self.snapshot,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
    }
}

/// A backend node's endpoint.
pub fn backend(handle: RaftHandle, members: Arc<Members>) -> Endpoint {
    let mut registry = Registry::with_prefix(PREFIX);
    let groups = GroupGauges::default();
    groups.register(&mut registry);
    let epoch = Gauge::<i64>::default();
    epoch.set(members.epoch() as i64);
    registry.register(
        "partition_map_epoch",
        "Epoch of the partition map (membership record) this node uses",
        epoch.clone(),
    );
    let member_count = Gauge::<i64>::default();
    registry.register(
        "cluster_members",
        "Backends in the membership record this node uses",
        member_count.clone(),
    );
    let moving = Gauge::<i64>::default();
    registry.register(
        "replica_moves_in_progress",
        "Groups this node leads whose replicas are still moving to the current map",
        moving.clone(),
    );
    let frontends = Gauge::<i64>::default();
    registry.register(
        "frontends_attached",
        "Frontends with an open event stream to this node",
        frontends.clone(),
    );
    let timings = handle.stats().timings.clone();
    registry.register_with_unit(
        "raft_commit_duration",
        "From proposing a Raft entry (as leader) to applying it: replication to a quorum, \
         fsyncs and apply",
        Unit::Seconds,
        timings.commit.0.clone(),
    );
    registry.register_with_unit(
        "fsync_duration",
        FSYNC_HELP,
        Unit::Seconds,
        timings.flush.0.clone(),
    );
    registry.register(
        "raft_proposals",
        "Raft entries (command batches) this node proposed as leader, by partition",
        timings.proposals.clone(),
    );
    let driver = handle.clone();
    registry.register_collector(Box::new(AtomicCounters(Box::new(move || {
        let stats = driver.stats();
        vec![
            (
                "raft_commands",
                "Commands this node proposed while leading",
                stats.commands.load(Ordering::Relaxed),
            ),
            (
                "raft_entries",
                "Raft entries (command batches) this node proposed",
                stats.entries.load(Ordering::Relaxed),
            ),
            (
                "raft_flushes",
                "Flushes (fsyncs) of this node's database",
                stats.flushes.load(Ordering::Relaxed),
            ),
        ]
    }))));
    // Session totals and retained messages of the partitions this node leads: every replica
    // holds the same state, so summing leaders only counts each partition once cluster-wide.
    let load = LoadGauges::default();
    load.register(&mut registry);
    let retained = Gauge::<i64>::default();
    registry.register(
        "retained_messages",
        "Retained messages stored in the partitions this node leads",
        retained.clone(),
    );
    // Every group number (partitions and the metadata group): the set this node holds
    // changes as replicas move, and `status` answers only for the ones held here.
    let groups_total = members.map().groups();
    let for_refresh = (handle.clone(), members.clone());
    let refresh: Hook<()> = Arc::new(move || {
        let (handle, members) = for_refresh.clone();
        let partitions = 0..groups_total;
        let (groups, frontends) = (groups.clone(), frontends.clone());
        let (load, retained) = (load.clone(), retained.clone());
        let (epoch, member_count, moving) = (epoch.clone(), member_count.clone(), moving.clone());
        Box::pin(async move {
            let record = members.record();
            epoch.set(record.epoch as i64);
            member_count.set(record.members.len() as i64);
            if let Some(progress) = handle.move_progress().await {
                moving.set(progress.moving.len() as i64);
            }
            frontends.set(handle.hub().connected_frontends().len() as i64);
            let mut led = tiermq_backend::partition::PartitionLoad::default();
            let mut led_retained = 0;
            for p in partitions {
                let Some(s) = handle.status(p).await else {
                    continue;
                };
                if s.is_leader {
                    led += s.load;
                    led_retained += s.retained;
                }
                let label = PartitionLabel {
                    partition: p.to_string(),
                };
                let set = |f: &Family<PartitionLabel, Gauge>, v: u64| {
                    f.get_or_create(&label).set(v as i64);
                };
                set(&groups.leader, s.leader.unwrap_or(0));
                set(&groups.is_leader, u64::from(s.is_leader));
                set(&groups.term, s.term);
                set(&groups.commit, s.commit);
                set(&groups.applied, s.applied);
                set(&groups.last, s.last_index);
                set(&groups.snapshot, s.snapshot_index);
            }
            load.set(led);
            retained.set(led_retained as i64);
        })
    });
    let readiness: Hook<Result<(), String>> = Arc::new(move || {
        let (handle, members) = (handle.clone(), members.clone());
        Box::pin(async move {
            let mut leaderless = Vec::new();
            // Only the groups the current map places here: a replica on its way out (or one
            // opened for an older map, waiting to be deleted) does not make a node unready.
            for p in members.map().partitions_of(handle.node_id()) {
                match handle.status(p).await {
                    None => {} // not held here
                    Some(s) if s.leader.is_some() => {}
                    Some(_) => leaderless.push(p.to_string()),
                }
            }
            if leaderless.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "no known leader for partition(s) {}",
                    leaderless.join(",")
                ))
            }
        })
    });
    Endpoint {
        refresh: Some(refresh),
        readiness: Some(readiness),
        ..Endpoint::new(registry)
    }
}

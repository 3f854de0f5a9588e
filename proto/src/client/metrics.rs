//! The cluster client's metrics: call latency by method, the membership record it follows,
//! and its route-lease renewals.

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Unit;
use tiermq_common::latency::latency_histogram;
use tiermq_common::partition_api::Command;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct MethodLabel {
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct OutcomeLabel {
    pub(super) outcome: &'static str,
}

/// How long this client's calls to the backends take, by method
/// (`tiermq_grpc_client_call_duration_seconds`): from the call to its answer, retries on
/// other replicas included — what a connection handler waits, not one network round trip.
/// Also the membership record the client follows: its epoch
/// (`tiermq_cluster_map_epoch`), its backends (`tiermq_cluster_map_members`) and the
/// re-reads of it (`tiermq_cluster_map_refreshes_total{outcome}`), so an operator sees that
/// every frontend took up a join or a removal. Clones share the values.
#[derive(Clone, Debug)]
pub struct ClientMetrics {
    pub(super) calls: Family<MethodLabel, Histogram>,
    pub(super) map_epoch: Gauge,
    pub(super) map_members: Gauge,
    pub(super) map_refreshes: Family<OutcomeLabel, Counter>,
    pub(super) route_renewals: Family<OutcomeLabel, Counter>,
}

impl Default for ClientMetrics {
    fn default() -> Self {
        ClientMetrics {
            calls: Family::new_with_constructor(latency_histogram),
            map_epoch: Gauge::default(),
            map_members: Gauge::default(),
            map_refreshes: Family::default(),
            route_renewals: Family::default(),
        }
    }
}

impl ClientMetrics {
    /// Writes the series (for a metrics collector: the client exists only once the backends
    /// answered, after the node's endpoint is up).
    pub fn encode(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let metric = encoder.encode_descriptor(
            "grpc_client_call_duration",
            "Calls of this node's cluster client to the partitions' leaders, from the call to \
             the answer (retries on other replicas included), by method (partition command or \
             leader read)",
            Some(&Unit::Seconds),
            self.calls.metric_type(),
        )?;
        self.calls.encode(metric)?;
        let metric = encoder.encode_descriptor(
            "cluster_map_epoch",
            "Epoch of the membership record (member set and partition map) this node's \
             cluster client routes by; grows with every join, removal or eviction",
            None,
            self.map_epoch.metric_type(),
        )?;
        self.map_epoch.encode(metric)?;
        let metric = encoder.encode_descriptor(
            "cluster_map_members",
            "Backends in the membership record this node's cluster client holds",
            None,
            self.map_members.metric_type(),
        )?;
        self.map_members.encode(metric)?;
        let metric = encoder.encode_descriptor(
            "cluster_map_refreshes",
            "Re-reads of the membership record by this node's cluster client (every second, \
             and at once when a node names an unknown leader or every replica fails), by \
             outcome: newer (taken up), unchanged, failed (no backend answered) or refused \
             (another partition count)",
            None,
            self.map_refreshes.metric_type(),
        )?;
        self.map_refreshes.encode(metric)?;
        let metric = encoder.encode_descriptor(
            "cluster_route_renewals",
            "Renewals of the route lease this node's cluster client asked of backends (route \
             acknowledgements), by outcome: granted, refused (behind, or the backend closed the \
             stream) or failed (no answer within the lease). Past a lease the backend's \
             partitions get every publish",
            None,
            self.route_renewals.metric_type(),
        )?;
        self.route_renewals.encode(metric)
    }

    pub(super) fn method(&self, method: &'static str) -> Histogram {
        self.calls.get_or_create_owned(&MethodLabel { method })
    }

    /// The record epoch this client holds (0 before it holds one).
    pub fn map_epoch(&self) -> u64 {
        self.map_epoch.get().max(0) as u64
    }

    /// Re-reads of the record with `outcome` (`newer`, `unchanged`, `failed`, `refused`).
    pub fn map_refreshes(&self, outcome: &'static str) -> u64 {
        self.map_refreshes
            .get_or_create(&OutcomeLabel { outcome })
            .get()
    }
}

/// The label of a command in [`ClientMetrics`].
pub(super) fn command_method(c: &Command) -> &'static str {
    match c {
        Command::Connect { .. } => "connect",
        Command::Disconnect { .. } => "disconnect",
        Command::Subscribe { .. } => "subscribe",
        Command::Unsubscribe { .. } => "unsubscribe",
        Command::Publish { .. } => "publish",
        Command::Qos2Received { .. } => "qos2_received",
        Command::Qos2Release { .. } => "qos2_release",
        Command::Ack { .. } => "ack",
        Command::DeliverRetained { .. } => "deliver_retained",
        Command::Tick => "tick",
        Command::FrontendLost { .. } => "frontend_lost",
        _ => "shared",
    }
}

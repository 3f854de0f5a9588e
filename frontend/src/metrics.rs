//! The frontend's counters: connections, messages, bytes, drops and subscriptions of one node.
//!
//! They feed two readers — the Prometheus endpoint (`tiermq_*`, registered by
//! [`FrontendMetrics::register`]) and the `$SYS` topics ([`crate::sys_topics`]) — so both always
//! tell the same story.
//!
//! The hot path (every PUBLISH in and out) must not pay for labels: a `Family` lookup takes a
//! lock and hashes the label set. So every labelled series the handler touches per message is
//! looked up **once**, here, and kept as a plain [`Counter`] handle (an `Arc<AtomicU64>`); the
//! handler only does a relaxed `fetch_add`. Only rare events (a refused CONNECT) go through the
//! family.
//!
//! Per connection, [`ConnectionMetrics`] is a guard: it counts the connection when the CONNACK
//! went out and un-counts it (and its subscriptions) when the handler is dropped, whatever way
//! the connection ended.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use tiermq_common::{ProtocolVersion, QoS, ReasonCode};
// Tokio's clock, so uptime follows paused time in tests.
use tokio::time::Instant;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabel {
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QosLabel {
    qos: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabel {
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AclLabel {
    action: &'static str,
}

/// Why a publish was not passed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// A delivery larger than the client's Maximum Packet Size (§3.1.2.11.4).
    PacketTooLarge,
    /// A QoS0 delivery to a client whose write buffer is full.
    SlowReader,
    /// A client published to `$SYS/...`, which only the broker writes.
    SysTopic,
}

impl DropReason {
    const ALL: [DropReason; 3] = [
        DropReason::PacketTooLarge,
        DropReason::SlowReader,
        DropReason::SysTopic,
    ];

    fn label(self) -> &'static str {
        match self {
            DropReason::PacketTooLarge => "packet_too_large",
            DropReason::SlowReader => "slow_reader",
            DropReason::SysTopic => "sys_topic",
        }
    }
}

const PROTOCOLS: [(ProtocolVersion, &str); 2] = [
    (ProtocolVersion::V311, "3.1.1"),
    (ProtocolVersion::V5, "5.0"),
];
const QOS_LABELS: [&str; 3] = ["0", "1", "2"];

fn protocol_index(v: ProtocolVersion) -> usize {
    match v {
        ProtocolVersion::V311 => 0,
        ProtocolVersion::V5 => 1,
    }
}

fn qos_index(q: QoS) -> usize {
    match q {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce => 1,
        QoS::ExactlyOnce => 2,
    }
}

/// One node's counters. Cloning a handle shares the value (they are `Arc`s inside).
#[derive(Debug)]
pub struct FrontendMetrics {
    connections: Family<ProtocolLabel, Gauge>,
    opened: Family<ProtocolLabel, Counter>,
    refused: Family<ReasonLabel, Counter>,
    received: Family<QosLabel, Counter>,
    sent: Family<QosLabel, Counter>,
    dropped: Family<DropLabel, Counter>,
    /// `[limits]` hits (crate::limits); rare, so looked up per hit.
    limit_hits: Family<LimitLabel, Counter>,
    /// Requests the ACL denied (crate::acl), by action.
    acl_denials: Family<AclLabel, Counter>,
    bytes_received: Counter,
    bytes_sent: Counter,
    subscriptions: Gauge,
    // Handles into the families above, looked up once (see the module doc).
    connections_by: [Gauge; 2],
    opened_by: [Counter; 2],
    received_by: [Counter; 3],
    sent_by: [Counter; 3],
    dropped_by: [Counter; 3],
    started: Instant,
    started_unix_secs: i64,
}

impl Default for FrontendMetrics {
    fn default() -> Self {
        FrontendMetrics::new()
    }
}

impl FrontendMetrics {
    pub fn new() -> FrontendMetrics {
        let connections = Family::<ProtocolLabel, Gauge>::default();
        let opened = Family::<ProtocolLabel, Counter>::default();
        let received = Family::<QosLabel, Counter>::default();
        let sent = Family::<QosLabel, Counter>::default();
        let dropped = Family::<DropLabel, Counter>::default();
        // Creating every series up front also makes them visible at 0 before any traffic,
        // so `rate()` and alerts work from the first scrape.
        let protocol = |i: usize| ProtocolLabel {
            protocol: PROTOCOLS[i].1,
        };
        let qos = |i: usize| QosLabel { qos: QOS_LABELS[i] };
        let connections_by = [0, 1].map(|i| connections.get_or_create_owned(&protocol(i)));
        let opened_by = [0, 1].map(|i| opened.get_or_create_owned(&protocol(i)));
        let received_by = [0, 1, 2].map(|i| received.get_or_create_owned(&qos(i)));
        let sent_by = [0, 1, 2].map(|i| sent.get_or_create_owned(&qos(i)));
        let dropped_by =
            DropReason::ALL.map(|r| dropped.get_or_create_owned(&DropLabel { reason: r.label() }));
        let limit_hits = Family::<LimitLabel, Counter>::default();
        for l in crate::limits::Limit::ALL {
            limit_hits.get_or_create_owned(&LimitLabel { limit: l.label() });
        }
        let acl_denials = Family::<AclLabel, Counter>::default();
        for a in crate::acl::Access::ALL {
            let _ = acl_denials.get_or_create(&AclLabel { action: a.label() });
        }
        FrontendMetrics {
            connections,
            opened,
            refused: Family::default(),
            received,
            sent,
            dropped,
            limit_hits,
            acl_denials,
            bytes_received: Counter::default(),
            bytes_sent: Counter::default(),
            subscriptions: Gauge::default(),
            connections_by,
            opened_by,
            received_by,
            sent_by,
            dropped_by,
            started: Instant::now(),
            started_unix_secs: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
        }
    }

    /// Adds every series to `registry` (expected to carry the `tiermq` prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "connections_current",
            "MQTT connections open now (CONNACK sent, not yet closed), by protocol version",
            self.connections.clone(),
        );
        registry.register(
            "connections_opened",
            "MQTT connections accepted (CONNACK 0x00 sent) since the node started",
            self.opened.clone(),
        );
        registry.register(
            "connections_refused",
            "CONNECTs answered with an error CONNACK, by v5 reason code (e.g. 0x87, 0x8C)",
            self.refused.clone(),
        );
        registry.register(
            "messages_received",
            "PUBLISH packets received from clients, by QoS",
            self.received.clone(),
        );
        registry.register(
            "messages_sent",
            "PUBLISH packets written to clients (deliveries, re-sends included), by granted QoS",
            self.sent.clone(),
        );
        registry.register(
            "publishes_dropped",
            "Publishes not passed on, by reason: packet_too_large (delivery above the client's \
             Maximum Packet Size), slow_reader (QoS0 to a full write buffer), sys_topic \
             (a client published to $SYS)",
            self.dropped.clone(),
        );
        registry.register(
            "limit_hits",
            "Limits ([limits], mqtt.max_client_id_len) hit: sockets refused (max_connections, \
             listener_max_connections, connection_rate, connection_rate_per_ip), reads paused \
             (publish_rate, publish_bandwidth), topics refused (max_topic_length, \
             max_topic_levels), client ids refused (max_client_id_len), clients closed for not \
             reading (slow_reader)",
            self.limit_hits.clone(),
        );
        registry.register(
            "acl_denials",
            "Requests the ACL (mqtt.acl_file) denied, by action: publish (PUBLISH or a will), \
             subscribe (a SUBACK 0x87/0x80), deliver (a message not sent to a subscriber)",
            self.acl_denials.clone(),
        );
        registry.register_with_unit(
            "received",
            "Bytes read from MQTT client sockets",
            Unit::Bytes,
            self.bytes_received.clone(),
        );
        registry.register_with_unit(
            "sent",
            "Bytes written to MQTT client sockets",
            Unit::Bytes,
            self.bytes_sent.clone(),
        );
        registry.register(
            "subscriptions_current",
            "Distinct filters subscribed on connections open on this node (subscriptions a \
             persistent session brought back without a new SUBSCRIBE are not counted)",
            self.subscriptions.clone(),
        );
        let start = Gauge::<i64>::default();
        start.set(self.started_unix_secs);
        registry.register_with_unit(
            "start_time",
            "When this node started, Unix time",
            Unit::Seconds,
            start,
        );
    }

    /// A CONNECT answered with an error CONNACK.
    pub fn connection_refused(&self, reason: ReasonCode) {
        self.refused
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// A limit was hit (see [`crate::limits`]).
    pub fn limit_hit(&self, limit: crate::limits::Limit) {
        self.limit_hits
            .get_or_create(&LimitLabel {
                limit: limit.label(),
            })
            .inc();
    }

    /// How often `limit` was hit since start.
    pub fn limit_hits(&self, limit: crate::limits::Limit) -> u64 {
        self.limit_hits
            .get_or_create(&LimitLabel {
                limit: limit.label(),
            })
            .get()
    }

    /// The ACL denied `access`.
    pub fn acl_denied(&self, access: crate::acl::Access) {
        self.acl_denials
            .get_or_create(&AclLabel {
                action: access.label(),
            })
            .inc();
    }

    /// How many `access` requests the ACL denied since start.
    pub fn acl_denials(&self, access: crate::acl::Access) -> u64 {
        self.acl_denials
            .get_or_create(&AclLabel {
                action: access.label(),
            })
            .get()
    }

    /// The handles the per-connection byte counter adds to.
    pub fn byte_counters(&self) -> (Counter, Counter) {
        (self.bytes_received.clone(), self.bytes_sent.clone())
    }

    /// Connections open now.
    pub fn connected(&self) -> u64 {
        self.connections_by
            .iter()
            .map(|g| g.get().max(0) as u64)
            .sum()
    }

    /// Connections accepted since start.
    pub fn connections_total(&self) -> u64 {
        self.opened_by.iter().map(Counter::get).sum()
    }

    pub fn messages_received(&self) -> u64 {
        self.received_by.iter().map(Counter::get).sum()
    }

    pub fn messages_sent(&self) -> u64 {
        self.sent_by.iter().map(Counter::get).sum()
    }

    pub fn bytes_received(&self) -> u64 {
        self.bytes_received.get()
    }

    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.get()
    }

    pub fn subscriptions(&self) -> u64 {
        self.subscriptions.get().max(0) as u64
    }

    pub fn uptime_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }
}

tokio::task_local! {
    /// The node's metrics, for code of a connection task that has no handle on the config
    /// (the handler's `refuse` helper). Set by the listener around each connection task.
    static NODE: Arc<FrontendMetrics>;
}

/// Runs a connection task with `metrics` as its node's metrics (see [`connection_refused`]).
pub fn scope<F: std::future::Future>(
    metrics: Arc<FrontendMetrics>,
    task: F,
) -> impl std::future::Future<Output = F::Output> {
    NODE.scope(metrics, task)
}

/// Counts a refused CONNECT on the metrics of the current connection task; a no-op outside
/// one (e.g. a handler driven directly by a unit test).
pub fn connection_refused(reason: ReasonCode) {
    let _ = NODE.try_with(|m| m.connection_refused(reason));
}

/// One connection's view of the node's counters; un-counts the connection when dropped.
#[derive(Debug)]
pub struct ConnectionMetrics {
    node: Arc<FrontendMetrics>,
    protocol: usize,
    /// Hashes of the filters subscribed on this connection: 8 bytes per filter, so that a
    /// re-SUBSCRIBE to the same filter is not counted twice. Empty sets do not allocate.
    filters: HashSet<u64>,
}

fn filter_hash(filter: &str) -> u64 {
    let mut h = DefaultHasher::new();
    filter.hash(&mut h);
    h.finish()
}

impl ConnectionMetrics {
    /// Counts a connection whose CONNACK 0x00 was sent.
    pub fn opened(node: &Arc<FrontendMetrics>, version: ProtocolVersion) -> ConnectionMetrics {
        let protocol = protocol_index(version);
        node.connections_by[protocol].inc();
        node.opened_by[protocol].inc();
        ConnectionMetrics {
            node: node.clone(),
            protocol,
            filters: HashSet::new(),
        }
    }

    #[inline]
    pub fn received(&self, qos: QoS) {
        self.node.received_by[qos_index(qos)].inc();
    }

    #[inline]
    pub fn sent(&self, qos: QoS) {
        self.node.sent_by[qos_index(qos)].inc();
    }

    #[inline]
    pub fn dropped(&self, reason: DropReason) {
        let i = DropReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.node.dropped_by[i].inc();
    }

    /// A SUBACK: every filter granted (a reason code below 0x80) is now active.
    pub fn subscribed(&mut self, filters: &[String], codes: &[ReasonCode]) {
        for (filter, code) in filters.iter().zip(codes) {
            if !code.is_error() && self.filters.insert(filter_hash(filter)) {
                self.node.subscriptions.inc();
            }
        }
    }

    /// An UNSUBACK: every filter not refused is gone.
    pub fn unsubscribed(&mut self, filters: &[String], codes: &[ReasonCode]) {
        for (filter, code) in filters.iter().zip(codes) {
            if !code.is_error() && self.filters.remove(&filter_hash(filter)) {
                self.node.subscriptions.dec();
            }
        }
    }
}

impl Drop for ConnectionMetrics {
    fn drop(&mut self) {
        self.node.connections_by[self.protocol].dec();
        self.node.subscriptions.dec_by(self.filters.len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_counts_while_it_lives() {
        let node = Arc::new(FrontendMetrics::new());
        let mut c = ConnectionMetrics::opened(&node, ProtocolVersion::V5);
        c.received(QoS::AtLeastOnce);
        c.sent(QoS::AtMostOnce);
        let filters = vec!["a/#".to_string(), "b".to_string(), "c".to_string()];
        let ok = ReasonCode::SUCCESS;
        c.subscribed(&filters, &[ok, ok, ReasonCode::NOT_AUTHORIZED]);
        c.subscribed(&filters[..1], &[ok]); // re-subscribe: still one
        assert_eq!(node.subscriptions(), 2);
        c.unsubscribed(&filters[1..2], &[ok]);
        assert_eq!(node.subscriptions(), 1);
        assert_eq!((node.connected(), node.connections_total()), (1, 1));
        assert_eq!((node.messages_received(), node.messages_sent()), (1, 1));
        drop(c);
        assert_eq!((node.connected(), node.connections_total()), (0, 1));
        assert_eq!(node.subscriptions(), 0);
    }

    #[test]
    fn series_are_named_and_exist_before_traffic() {
        let node = FrontendMetrics::new();
        node.connection_refused(ReasonCode::NOT_AUTHORIZED);
        let mut registry = Registry::with_prefix("tiermq");
        node.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "tiermq_connections_current{protocol=\"5.0\"} 0",
            "tiermq_connections_opened_total{protocol=\"3.1.1\"} 0",
            "tiermq_connections_refused_total{reason=\"0x87\"} 1",
            "tiermq_messages_received_total{qos=\"2\"} 0",
            "tiermq_messages_sent_total{qos=\"0\"} 0",
            "tiermq_publishes_dropped_total{reason=\"slow_reader\"} 0",
            "tiermq_received_bytes_total 0",
            "tiermq_sent_bytes_total 0",
            "tiermq_acl_denials_total{action=\"deliver\"} 0",
            "tiermq_subscriptions_current 0",
            "tiermq_limit_hits_total{limit=\"publish_rate\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}

//! Latencies of a node's Raft driver, for the metrics endpoint: how long a proposal takes to
//! be applied (commit latency), how long the round's fsync takes, and how many entries each
//! partition proposes.
//!
//! Kept apart from the driver (`node.rs`) so that the driver only starts and stops timers:
//! one `Instant` per proposed entry, one per flush, a relaxed atomic add per entry.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tiermq_common::latency::LatencyHistogram;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabel {
    pub partition: String,
}

/// The driver's timings (clones share the values).
#[derive(Debug, Default, Clone)]
pub struct RaftTimings {
    /// From proposing an entry (leader) to applying it: replication to a quorum, both fsyncs
    /// and the apply — what a QoS1 publisher waits for its PUBACK inside the backend.
    pub commit: LatencyHistogram,
    /// One `flush` of the node's sled database (write + fsync), all groups of a round.
    pub flush: LatencyHistogram,
    /// Raft entries (command batches) proposed, per partition.
    pub proposals: Family<PartitionLabel, Counter>,
}

impl RaftTimings {
    /// Starts timing a proposed entry of `partition` (and counts it).
    pub fn proposed(&self, partition: u32) -> CommitTimer {
        self.proposals
            .get_or_create(&PartitionLabel {
                partition: partition.to_string(),
            })
            .inc();
        CommitTimer {
            started: Instant::now(),
            histogram: self.commit.clone(),
        }
    }
}

/// A proposed entry's clock, stopped when the entry is applied.
#[derive(Debug)]
pub struct CommitTimer {
    started: Instant,
    histogram: LatencyHistogram,
}

impl CommitTimer {
    /// The entry was applied: records the time since it was proposed.
    pub fn applied(&self) {
        self.histogram.observe_duration(self.started.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proposal_is_counted_and_timed_when_applied() {
        let t = RaftTimings::default();
        let timer = t.proposed(3);
        t.proposed(3);
        timer.applied();
        let label = PartitionLabel {
            partition: "3".into(),
        };
        assert_eq!(t.proposals.get_or_create(&label).get(), 2);
        let mut r = prometheus_client::registry::Registry::default();
        r.register("c", "", t.commit.0.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        assert!(text.contains("c_count 1"), "{text}");
    }
}

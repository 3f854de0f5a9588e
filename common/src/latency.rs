//! The one histogram shape for tiermq's latencies (Prometheus `_seconds` histograms).
//!
//! Every latency series — gRPC calls, Raft commit, fsync, the self-check probe's round trip —
//! uses the same buckets, so panels and alerts can compare them and an operator learns one
//! scale: powers of two from 100 µs to ~6.5 s (17 buckets, plus `+Inf`). That covers an fsync
//! on NVMe (~100 µs) up to a Raft election (~1-2 s) and a failover retry loop.

use std::ops::Deref;
use std::time::Duration;

use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

/// Smallest bucket bound, in seconds.
const FIRST: f64 = 0.0001;
const FACTOR: f64 = 2.0;
const BUCKETS: u16 = 17;

/// A new histogram with the shared latency buckets.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(FIRST, FACTOR, BUCKETS))
}

/// A latency histogram that can be `Default` (so structs of counters can derive it); clones
/// share the values.
#[derive(Debug, Clone)]
pub struct LatencyHistogram(pub Histogram);

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram(latency_histogram())
    }
}

impl LatencyHistogram {
    /// Records one duration.
    pub fn observe_duration(&self, d: Duration) {
        self.0.observe(d.as_secs_f64());
    }
}

impl Deref for LatencyHistogram {
    type Target = Histogram;
    fn deref(&self) -> &Histogram {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::{Registry, Unit};

    #[test]
    fn buckets_span_100us_to_seconds() {
        let h = LatencyHistogram::default();
        h.observe_duration(Duration::from_micros(50));
        h.observe_duration(Duration::from_millis(3));
        h.observe_duration(Duration::from_secs(30));
        let mut r = Registry::with_prefix("t");
        r.register_with_unit("x", "test", Unit::Seconds, h.0.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        assert!(text.contains("t_x_seconds_count 3"), "{text}");
        assert!(
            text.contains("t_x_seconds_bucket{le=\"0.0001\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("t_x_seconds_bucket{le=\"0.0032\"} 2"),
            "{text}"
        );
        assert!(text.contains("t_x_seconds_bucket{le=\"+Inf\"} 3"), "{text}");
    }
}

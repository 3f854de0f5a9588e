//! Starting the self-check probe ([`tiermq_frontend::probe`]) of a standalone broker or a
//! cluster frontend, when `metrics.probe_interval_secs` asks for it.
//!
//! Two steps, because the metrics endpoint comes up before the partitions are reachable:
//! [`register`] adds the `tiermq_probe_*` series to the endpoint's registry, [`spawn`] starts
//! the probe once there is a session service to probe.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tiermq_common::config::Settings;
use tiermq_common::session_api::SessionService;
use tiermq_frontend::probe::{Probe, ProbeMetrics};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The probe's series, registered in `registry`; `None` when the probe is off (then no
/// `tiermq_probe_*` series exists, so an alert on them cannot fire for nothing).
pub fn register(settings: &Settings, registry: &mut Registry) -> Option<ProbeMetrics> {
    (settings.metrics.probe_interval_secs > 0).then(|| {
        let metrics = ProbeMetrics::default();
        metrics.register(registry);
        metrics
    })
}

/// Starts the probe on `service` (when [`register`] returned its metrics).
pub fn spawn<S: SessionService>(
    settings: &Settings,
    metrics: Option<ProbeMetrics>,
    service: Arc<S>,
    frontend_id: u64,
    shutdown: CancellationToken,
) -> Option<JoinHandle<()>> {
    let metrics = metrics?;
    let probe = Probe {
        service,
        interval: Duration::from_secs(settings.metrics.probe_interval_secs),
        timeout: Duration::from_secs(settings.metrics.probe_timeout_secs),
        frontend_id,
        metrics,
    };
    tracing::info!(
        topic = %probe.topic(),
        interval = ?probe.interval,
        "self-check probe running"
    );
    Some(tokio::spawn(probe.run(shutdown)))
}

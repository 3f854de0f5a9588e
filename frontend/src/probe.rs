//! The self-check probe: an internal client that checks the whole message path every few
//! seconds and exports what it saw as metrics.
//!
//! Counters tell an operator what clients did; they stay silent when nothing flows because
//! the path is broken. The probe *makes* traffic: every `interval` it publishes one QoS1
//! message to itself on its reserved topic `$SYS/tiermq/probe/<id>` (`id`: the frontend id,
//! `standalone` on a standalone broker) and waits for the delivery, through the same
//! [`SessionService`] calls a connection handler makes — CONNECT of a session, SUBSCRIBE,
//! PUBLISH (durable in the topic's partitions: fsync, or a Raft quorum), delivery from the
//! session's partition, PUBACK. Only the MQTT socket is skipped. Clients may not publish to
//! `$SYS` (the handler refuses it, [`crate::sys_topics::is_sys_topic`]); the probe is not a
//! client, it calls the service directly, as the `$SYS` statistics task does.
//!
//! One message is in flight at a time. A round succeeds when the publish is acknowledged
//! *and* the message came back; its round trip (publish submitted → delivery received) goes
//! into `tiermq_probe_rtt_seconds`. A round that does not complete within `timeout` — a lost
//! quorum, an unreachable leader, a session that vanished — counts as lost, and the probe
//! starts a fresh session for the next round (clean start, expiry 0: nothing is left behind).
//! So `sent = received + lost` once a round is over, and `rate(lost) / rate(sent)` is the
//! share of the path that is broken.
//!
//! The probe's session id is `$tiermq-probe-<id>`. An MQTT client could connect with that
//! id and take the session over; the probe then loses a round and reconnects.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use tiermq_common::latency::LatencyHistogram;
use tiermq_common::log_limit::LogLimiter;
use tiermq_common::session_api::{
    AckKind, ConnectRequest, DisconnectRequest, SessionEvent, SessionRef, SessionService,
    SubscribeRequest, SubscriptionOptions,
};
use tiermq_common::{Message, ProtocolVersion, QoS};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// Lost rounds are logged at most once a minute (a long outage would log every round).
static LOST_WARNINGS: LogLimiter = LogLimiter::new(Duration::from_secs(60));

/// What the probe exports; clones share the values.
#[derive(Debug, Clone, Default)]
pub struct ProbeMetrics {
    rtt: LatencyHistogram,
    sent: Counter,
    received: Counter,
    lost: Counter,
    last_success: Gauge<f64, AtomicU64>,
}

impl ProbeMetrics {
    /// Adds the `tiermq_probe_*` series to `registry` (expected to carry the `tiermq` prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register_with_unit(
            "probe_rtt",
            "Round trip of the self-check probe's QoS1 message: publish submitted to delivery \
             received, through the partitions",
            Unit::Seconds,
            self.rtt.0.clone(),
        );
        registry.register(
            "probe_sent",
            "Self-check probe rounds started (one QoS1 message each)",
            self.sent.clone(),
        );
        registry.register(
            "probe_received",
            "Self-check probe messages acknowledged and delivered back in time",
            self.received.clone(),
        );
        registry.register(
            "probe_lost",
            "Self-check probe rounds that did not complete within the probe timeout",
            self.lost.clone(),
        );
        registry.register_with_unit(
            "probe_last_success_timestamp",
            "Unix time of the last successful probe round (0: none yet)",
            Unit::Seconds,
            self.last_success.clone(),
        );
    }

    pub fn sent(&self) -> u64 {
        self.sent.get()
    }

    pub fn received(&self) -> u64 {
        self.received.get()
    }

    pub fn lost(&self) -> u64 {
        self.lost.get()
    }
}

/// The probe of one node (see the module doc).
pub struct Probe<S> {
    pub service: Arc<S>,
    /// Time between two rounds (the first one starts at once).
    pub interval: Duration,
    /// A round not complete after this long is lost.
    pub timeout: Duration,
    /// The frontend the probe's session is attached to (0: standalone).
    pub frontend_id: u64,
    pub metrics: ProbeMetrics,
}

/// The probe's session while it works.
struct Live {
    session: SessionRef,
    events: mpsc::UnboundedReceiver<SessionEvent>,
}

impl<S: SessionService> Probe<S> {
    /// The name in the probe's topic and client id.
    fn name(&self) -> String {
        match self.frontend_id {
            0 => "standalone".to_string(),
            id => id.to_string(),
        }
    }

    /// The reserved topic the probe publishes and subscribes to.
    pub fn topic(&self) -> String {
        format!("$SYS/tiermq/probe/{}", self.name())
    }

    fn client_id(&self) -> String {
        format!("$tiermq-probe-{}", self.name())
    }

    /// Runs a round every `interval` until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut live: Option<Live> = None;
        let mut seq = 0u64;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.cancelled() => break,
            }
            seq += 1;
            self.metrics.sent.inc();
            let round = tokio::time::timeout(self.timeout, self.round(&mut live, seq));
            let outcome = tokio::select! {
                r = round => r.unwrap_or_else(|_| Err(format!("not back within {:?}", self.timeout))),
                _ = shutdown.cancelled() => break,
            };
            match outcome {
                Ok(rtt) => {
                    self.metrics.received.inc();
                    self.metrics.rtt.observe_duration(rtt);
                    self.metrics.last_success.set(unix_now());
                }
                Err(why) => {
                    self.metrics.lost.inc();
                    tiermq_common::warn_limited!(
                        LOST_WARNINGS,
                        "probe-lost",
                        seq,
                        why = %why,
                        "self-check probe message lost"
                    );
                    // Start over with a fresh session: this one may be gone or stuck.
                    if let Some(old) = live.take() {
                        self.close_in_background(old.session);
                    }
                }
            }
        }
        if let Some(l) = live {
            let bye = self.service.disconnect(&l.session, normal_disconnect());
            let _ = tokio::time::timeout(Duration::from_secs(1), bye).await;
        }
    }

    /// One round: a session if there is none, then publish `seq` and wait until it is both
    /// acknowledged and delivered back. Returns the round trip of the message.
    async fn round(&self, live: &mut Option<Live>, seq: u64) -> Result<Duration, String> {
        if live.is_none() {
            *live = Some(self.open().await?);
        }
        let Some(l) = live.as_mut() else {
            return Err("no session".into());
        };
        let payload = seq.to_be_bytes().to_vec();
        let message = Message::new(self.topic(), payload.clone(), QoS::AtLeastOnce, false);
        let started = Instant::now();
        let published = self.service.publish(&l.session, message, None);
        tokio::pin!(published);
        let (mut acked, mut delivered) = (false, None);
        while !acked || delivered.is_none() {
            tokio::select! {
                r = &mut published, if !acked => {
                    let p = r.map_err(|e| format!("publish failed: {e}"))?;
                    if !p.matched {
                        return Err("publish matched no subscriber".into());
                    }
                    acked = true;
                }
                event = l.events.recv(), if delivered.is_none() => match event {
                    None => return Err("session events ended".into()),
                    Some(SessionEvent::Deliver(d)) => {
                        if let Some(packet_id) = d.packet_id {
                            // Submitted at call time; nobody needs to wait for it.
                            drop(self.service.ack(&l.session, AckKind::PubAck, packet_id));
                        }
                        if d.message.payload[..] == payload[..] {
                            delivered = Some(started.elapsed());
                        }
                    }
                    Some(SessionEvent::Release { packet_id }) => {
                        drop(self.service.ack(&l.session, AckKind::PubComp, packet_id));
                    }
                    Some(SessionEvent::Disconnect { reason }) => {
                        return Err(format!("session closed by the broker ({reason})"));
                    }
                },
            }
        }
        debug!(seq, rtt = ?delivered, "probe round trip");
        delivered.ok_or_else(|| "not delivered".into())
    }

    /// A fresh session subscribed to the probe topic.
    async fn open(&self) -> Result<Live, String> {
        let connected = self
            .service
            .connect(ConnectRequest {
                client_id: self.client_id().into(),
                protocol: ProtocolVersion::V5,
                clean_start: true,
                session_expiry_secs: 0,
                receive_maximum: 16,
                will: None,
                frontend_id: self.frontend_id,
            })
            .await
            .map_err(|e| format!("connect failed: {e}"))?;
        let codes = self
            .service
            .subscribe(
                &connected.session,
                vec![SubscribeRequest {
                    filter: self.topic(),
                    options: SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        ..SubscriptionOptions::default()
                    },
                    subscription_id: None,
                }],
            )
            .await
            .map_err(|e| format!("subscribe failed: {e}"))?;
        match codes.first() {
            Some(code) if !code.is_error() => Ok(Live {
                session: connected.session,
                events: connected.events,
            }),
            other => Err(format!("subscribe refused: {other:?}")),
        }
    }

    /// Ends `session` without waiting (the broker may be unreachable right now; a new
    /// clean-start session with the same id replaces it anyway).
    fn close_in_background(&self, session: SessionRef) {
        let service = self.service.clone();
        tokio::spawn(async move {
            let bye = service.disconnect(&session, normal_disconnect());
            let _ = tokio::time::timeout(Duration::from_secs(5), bye).await;
        });
    }
}

fn normal_disconnect() -> DisconnectRequest {
    DisconnectRequest {
        normal: true,
        with_will: false,
        session_expiry_secs: None,
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

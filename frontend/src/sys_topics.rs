//! `$SYS` topics: the node's statistics as retained QoS0 messages, the MQTT convention
//! Mosquitto popularised, for operators who have an MQTT client at hand but no Prometheus.
//!
//! A task publishes every `interval` through the normal publish path of the partitions (so
//! retained storage, routing and `$SYS/#` subscriptions work as for any message), *as the
//! broker*: no client session, no publisher for No Local to compare with. The values come
//! from the same counters as the Prometheus endpoint ([`FrontendMetrics`]).
//!
//! Topics are `<prefix>/version`, `<prefix>/uptime`, `<prefix>/clients/connected`, ... where the
//! prefix is `$SYS/broker` on a standalone broker. In a cluster every frontend counts only its
//! own connections, and two frontends writing the same retained topic would overwrite each
//! other's numbers, so each publishes under `$SYS/broker/frontend/<id>` and gives its messages
//! a Message Expiry Interval: the topics of a frontend that stopped vanish instead of showing
//! stale numbers forever. Summing across frontends is left to the reader (`+` in
//! `$SYS/broker/frontend/+/clients/connected`), as Prometheus does with labels.
//!
//! Clients may read `$SYS` but not write it: the handler refuses a client's PUBLISH to
//! `$SYS/...` ([`is_sys_topic`]), and `#` / `+` never match it (§4.7.2, in the topic matcher).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use tiermq_common::session_api::{Published, ServiceResult};
use tiermq_common::{Message, QoS};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::metrics::FrontendMetrics;

/// Whether `topic` is in the broker's `$SYS` tree, which only the broker may publish to.
pub fn is_sys_topic(topic: &str) -> bool {
    topic == "$SYS" || topic.starts_with("$SYS/")
}

/// Publishes a message as the broker itself (no client session).
pub type PublishFn =
    Arc<dyn Fn(Message) -> BoxFuture<'static, ServiceResult<Published>> + Send + Sync>;

/// Reads a count the frontend cannot know by itself (retained messages, standalone only).
pub type CountFn = Arc<dyn Fn() -> BoxFuture<'static, Option<u64>> + Send + Sync>;

/// What the `$SYS` task publishes, where, and how often.
pub struct SysTopics {
    /// Time between two rounds; the first round goes out at once.
    pub interval: Duration,
    /// `$SYS/broker` (standalone) or `$SYS/broker/frontend/<id>` (cluster frontend).
    pub prefix: String,
    /// Message Expiry Interval of each message, in seconds. With it, every topic is
    /// re-published each round (so none expires while the node runs); without it, only the
    /// topics whose value changed are.
    pub expiry_secs: Option<u32>,
    pub metrics: Arc<FrontendMetrics>,
    pub publish: PublishFn,
    /// `None` where the node cannot know the count; the topic is then not published.
    pub retained_count: Option<CountFn>,
}

impl SysTopics {
    /// The standalone broker's layout.
    pub const STANDALONE_PREFIX: &'static str = "$SYS/broker";

    /// A cluster frontend's layout (see the module doc).
    pub fn frontend_prefix(frontend_id: u64) -> String {
        format!("$SYS/broker/frontend/{frontend_id}")
    }

    /// How long a cluster frontend's messages live: three rounds, at least a minute, so a
    /// slow round never makes a topic blink.
    pub fn expiry_for(interval: Duration) -> u32 {
        interval
            .as_secs()
            .saturating_mul(3)
            .clamp(60, u64::from(u32::MAX)) as u32
    }

    /// The topics (relative to the prefix) and payloads of one round.
    pub fn values(&self, retained: Option<u64>) -> Vec<(&'static str, String)> {
        let m = &self.metrics;
        let mut v = vec![
            ("version", format!("tiermq {}", env!("CARGO_PKG_VERSION"))),
            ("uptime", format!("{} seconds", m.uptime_secs())),
            ("clients/connected", m.connected().to_string()),
            ("clients/total", m.connections_total().to_string()),
            ("messages/received", m.messages_received().to_string()),
            ("messages/sent", m.messages_sent().to_string()),
            ("bytes/received", m.bytes_received().to_string()),
            ("bytes/sent", m.bytes_sent().to_string()),
            ("subscriptions/count", m.subscriptions().to_string()),
        ];
        if let Some(n) = retained {
            v.push(("retained messages/count", n.to_string()));
        }
        v
    }

    /// Publishes a round every `interval` until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: HashMap<&'static str, String> = HashMap::new();
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let retained = match &self.retained_count {
                Some(count) => count().await,
                None => None,
            };
            let mut waits = Vec::new();
            for (name, payload) in self.values(retained) {
                if self.expiry_secs.is_none() && last.get(name) == Some(&payload) {
                    continue;
                }
                let mut message = Message::new(
                    format!("{}/{name}", self.prefix),
                    payload.clone().into_bytes(),
                    QoS::AtMostOnce,
                    true,
                );
                message.properties.message_expiry_interval = self.expiry_secs;
                message.stamp_expiry(now_ms());
                // Submitted now, in topic order; the answers are awaited together.
                let wait = (self.publish)(message);
                waits.push(async move { (name, payload, wait.await) });
            }
            for (name, payload, result) in futures::future::join_all(waits).await {
                match result {
                    Ok(_) => {
                        last.insert(name, payload);
                    }
                    Err(e) => {
                        // Retried next round: `last` keeps the old value.
                        debug!(topic = name, error = %e, "$SYS publish failed");
                    }
                }
            }
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn only_the_sys_tree_is_reserved() {
        assert!(is_sys_topic("$SYS"));
        assert!(is_sys_topic("$SYS/broker/uptime"));
        assert!(!is_sys_topic("$SYSTEM/x"));
        assert!(!is_sys_topic("$share/g/x"));
        assert!(!is_sys_topic("a/$SYS/b"));
        assert!(!is_sys_topic("sys/x"));
    }

    #[tokio::test]
    async fn publishes_retained_qos0_and_skips_unchanged_values() {
        let seen = Arc::new(Mutex::new(Vec::<Message>::new()));
        let sink = seen.clone();
        let publish: PublishFn = Arc::new(move |m: Message| {
            sink.lock().unwrap().push(m);
            Box::pin(async {
                Ok(Published {
                    matched: false,
                    duplicate: false,
                    refused: false,
                })
            })
        });
        let metrics = Arc::new(FrontendMetrics::new());
        let sys = SysTopics {
            interval: Duration::from_millis(30),
            prefix: SysTopics::STANDALONE_PREFIX.into(),
            expiry_secs: None,
            metrics: metrics.clone(),
            publish,
            retained_count: Some(Arc::new(|| Box::pin(async { Some(7) }))),
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(sys.run(stop.clone()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        // A client connects between two rounds: only what changed goes out again.
        let _conn =
            crate::metrics::ConnectionMetrics::opened(&metrics, tiermq_common::ProtocolVersion::V5);
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.cancel();
        task.await.unwrap();
        let seen = seen.lock().unwrap();
        let count = |topic: &str| seen.iter().filter(|m| m.topic == topic).count();
        assert_eq!(count("$SYS/broker/version"), 1);
        assert_eq!(count("$SYS/broker/clients/connected"), 2);
        assert!(seen.iter().all(|m| m.retain && m.qos == QoS::AtMostOnce));
        let last_connected = seen
            .iter()
            .rev()
            .find(|m| m.topic == "$SYS/broker/clients/connected")
            .unwrap();
        assert_eq!(&last_connected.payload[..], b"1");
        let retained = seen
            .iter()
            .find(|m| m.topic == "$SYS/broker/retained messages/count")
            .unwrap();
        assert_eq!(&retained.payload[..], b"7");
    }

    #[test]
    fn cluster_frontends_publish_under_their_id_with_an_expiry() {
        assert_eq!(
            SysTopics::frontend_prefix(42),
            "$SYS/broker/frontend/42".to_string()
        );
        assert_eq!(SysTopics::expiry_for(Duration::from_secs(10)), 60);
        assert_eq!(SysTopics::expiry_for(Duration::from_secs(100)), 300);
    }
}

//! The application message as the session engine sees it: what was published, independent of
//! the packet that carried it (topic aliases resolved, packet id stripped).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::types::QoS;

/// The v5 properties that travel with an application message from publisher to subscriber
/// (spec §3.3.2.3). For a v3.1.1 publisher they are all absent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageProperties {
    pub payload_format_indicator: Option<u8>,
    /// Message Expiry Interval in seconds as the publisher sent it; the engine keeps the absolute
    /// deadline in [`Message::expires_at_ms`] and rewrites the interval on each delivery.
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
}

impl MessageProperties {
    pub fn is_empty(&self) -> bool {
        *self == MessageProperties::default()
    }
}

/// An application message. Shared by `Arc` on fan-out: one allocation, many subscribers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: MessageProperties,
    /// Absolute expiry in milliseconds since the Unix epoch, stamped when the message entered
    /// the broker (time enters the engine only inside commands).
    pub expires_at_ms: Option<u64>,
}

impl Message {
    pub fn new(
        topic: impl Into<String>,
        payload: impl Into<Bytes>,
        qos: QoS,
        retain: bool,
    ) -> Self {
        Message {
            topic: topic.into(),
            payload: payload.into(),
            qos,
            retain,
            properties: MessageProperties::default(),
            expires_at_ms: None,
        }
    }

    /// Stamps the absolute expiry from the publisher's Message Expiry Interval.
    pub fn stamp_expiry(&mut self, now_ms: u64) {
        self.expires_at_ms = self
            .properties
            .message_expiry_interval
            .map(|s| now_ms.saturating_add(u64::from(s) * 1000));
    }

    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|at| at <= now_ms)
    }

    /// Seconds of life left at `now_ms`, rounded up, as a delivery must carry it (§3.3.2.3.3).
    pub fn remaining_expiry_secs(&self, now_ms: u64) -> Option<u32> {
        self.expires_at_ms
            .map(|at| (at.saturating_sub(now_ms).div_ceil(1000)).min(u64::from(u32::MAX)) as u32)
    }
}

//! Conversions between PUBLISH packets and application messages.

use tiermq_common::codec::{LastWill, Publish, PublishProperties};
use tiermq_common::session_api::{Delivery, Will};
use tiermq_common::{Message, MessageProperties, ProtocolVersion};

use crate::alias::AliasUse;

/// The application message a client's PUBLISH carries (topic alias already resolved).
pub fn message_from_publish(p: Publish, topic: String, now_ms: u64) -> Message {
    let props = p.properties;
    let mut m = Message {
        topic,
        payload: p.payload,
        qos: p.qos,
        retain: p.retain,
        properties: MessageProperties {
            payload_format_indicator: props.payload_format_indicator,
            message_expiry_interval: props.message_expiry_interval,
            content_type: props.content_type,
            response_topic: props.response_topic,
            correlation_data: props.correlation_data,
            user_properties: props.user_properties,
        },
        expires_at_ms: None,
    };
    m.stamp_expiry(now_ms);
    m
}

/// The will a CONNECT registers.
pub fn will_from_connect(w: LastWill) -> Will {
    let props = w.properties;
    Will {
        message: Message {
            topic: w.topic,
            payload: w.payload,
            qos: w.qos,
            retain: w.retain,
            properties: MessageProperties {
                payload_format_indicator: props.payload_format_indicator,
                message_expiry_interval: props.message_expiry_interval,
                content_type: props.content_type,
                response_topic: props.response_topic,
                correlation_data: props.correlation_data,
                user_properties: props.user_properties,
            },
            expires_at_ms: None,
        },
        delay_secs: props.will_delay_interval.unwrap_or(0),
    }
}

/// The PUBLISH packet that delivers `d` to a client speaking `version`, with the outbound
/// topic alias the connection chose, if any (only ever `Some` for v5). A known alias sends an
/// empty topic, which also spares copying the topic string.
pub fn publish_from_delivery(
    d: &Delivery,
    version: ProtocolVersion,
    alias: Option<AliasUse>,
) -> Publish {
    let m = &d.message;
    let properties = if version.is_v5() {
        let p = &m.properties;
        PublishProperties {
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: d.expiry_secs,
            topic_alias: alias.map(AliasUse::alias),
            response_topic: p.response_topic.clone(),
            correlation_data: p.correlation_data.clone(),
            user_properties: p.user_properties.clone(),
            subscription_identifiers: d.subscription_ids.clone(),
            content_type: p.content_type.clone(),
        }
    } else {
        PublishProperties::default()
    };
    Publish {
        dup: d.dup,
        qos: d.qos,
        retain: d.retain,
        topic: match alias {
            Some(AliasUse::Known(_)) => String::new(),
            _ => m.topic.clone(),
        },
        packet_id: d.packet_id,
        properties,
        payload: m.payload.clone(),
    }
}

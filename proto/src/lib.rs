//! The gRPC APIs of tiermq, generated at build time from `proto/*.proto` (no `protoc` needed).
//!
//! - [`raft`]: backend ↔ backend transport of Raft messages, batched per peer.
//! - [`broker`]: frontend ↔ backend session operations, deliveries and routes.

/// Current version of the APIs; a receiver refuses other versions with a clear error.
pub const API_VERSION: u32 = 1;

pub mod raft {
    tonic::include_proto!("tiermq.raft.v1");
}

/// Frontend ↔ backend: ordered operation streams, session events, route table, cluster info.
pub mod broker {
    tonic::include_proto!("tiermq.broker.v1");

    use tiermq_common::session_api::SessionEvent;

    impl SessionEventMsg {
        /// An event for connection `epoch` of `client_id`, as a backend sends it. A delivery's
        /// log index goes beside the postcard event (which leaves it out, so older nodes
        /// still read it).
        pub fn new(client_id: &str, epoch: u64, event: &SessionEvent) -> SessionEventMsg {
            SessionEventMsg {
                client_id: client_id.to_string(),
                epoch,
                event: postcard::to_stdvec(event).unwrap_or_default(),
                index: match event {
                    SessionEvent::Deliver(d) => d.index.unwrap_or(0),
                    _ => 0,
                },
            }
        }

        /// The event, with a delivery's log index put back; `None` when it does not decode.
        pub fn decode(&self) -> Option<SessionEvent> {
            let mut event = postcard::from_bytes::<SessionEvent>(&self.event).ok()?;
            if let SessionEvent::Deliver(d) = &mut event {
                d.index = (self.index != 0).then_some(self.index);
            }
            Some(event)
        }
    }

    #[cfg(test)]
    mod tests {
        use std::sync::Arc;

        use tiermq_common::session_api::Delivery;
        use tiermq_common::{Message, QoS};

        use super::*;

        /// The index a frontend compares with a PUBREC's must survive the wire
        /// (`tiermq_common::released_ids`).
        #[test]
        fn a_delivery_keeps_its_log_index_across_the_wire() {
            let delivery = |index| {
                SessionEvent::Deliver(Delivery {
                    packet_id: Some(4),
                    qos: QoS::ExactlyOnce,
                    retain: false,
                    dup: true,
                    subscription_ids: vec![2],
                    expiry_secs: None,
                    message: Arc::new(Message::new("t", "x", QoS::ExactlyOnce, false)),
                    index,
                })
            };
            for event in [
                delivery(Some(5 << 20 | 3)),
                delivery(None),
                SessionEvent::Release { packet_id: 4 },
            ] {
                let msg = SessionEventMsg::new("c", 9, &event);
                assert_eq!((msg.client_id.as_str(), msg.epoch), ("c", 9));
                assert_eq!(msg.decode(), Some(event));
            }
        }
    }
}

pub mod client;
pub mod tls;

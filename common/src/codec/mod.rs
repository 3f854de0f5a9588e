//! The MQTT 3.1.1 and 5.0 codec: bytes to [`Packet`]s and back.
//!
//! * [`decode`] parses one packet from a `BytesMut`, enforcing the grammar and the rules that
//!   can be checked on a single packet (reserved flags, property placement, packet ids, ...).
//!   It refuses an oversized packet as soon as its fixed header arrives, and hands out the
//!   PUBLISH payload and binary fields as zero-copy slices of the read buffer.
//! * [`encode`] writes a packet, measuring it first so the output is reserved once and invalid
//!   packets are refused before anything is written; [`encoded_len`] is the same measurement.
//! * [`MqttCodec`] wraps both for `tokio_util::codec::Framed` and tracks the protocol version.
//!
//! Packets are plain structs with public fields; in 3.1.1 their v5-only fields (properties,
//! most reason codes) are left default when decoding and are not sent when encoding.
//!
//! Layout: `primitives` (§1.5 data types), `properties` (§2.2.2), `reason` (allowed reason
//! codes), one file per packet family, `packet` (fixed header and dispatch), `framed`.

mod ack;
mod connack;
mod connect;
mod disconnect;
mod error;
mod framed;
mod packet;
mod primitives;
mod properties;
mod publish;
mod reason;
mod subscribe;
mod unsubscribe;

#[cfg(test)]
mod tests;

pub use ack::{PubAck, PubComp, PubRec, PubRel};
pub use connack::ConnAck;
pub use connect::{Connect, LastWill};
pub use disconnect::{Auth, Disconnect};
pub use error::{DecodeError, EncodeError};
pub use framed::MqttCodec;
pub use packet::{decode, encode, encoded_len, Packet, MAX_PACKET_SIZE};
pub use primitives::MAX_VAR_INT;
pub use properties::{
    AckProperties, AuthProperties, ConnAckProperties, ConnectProperties, DisconnectProperties,
    PublishProperties, SubscribeProperties, UnsubscribeProperties, WillProperties,
};
pub use publish::Publish;
pub use reason::ReasonSet;
pub use subscribe::{SubAck, Subscribe};
pub use unsubscribe::{UnsubAck, Unsubscribe};

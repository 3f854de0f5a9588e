//! [`MqttCodec`]: the codec as a `tokio_util` `Decoder`/`Encoder`, for `Framed` sockets.

use bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder};

use super::error::{DecodeError, EncodeError};
use super::packet::{decode, encode, Packet, MAX_PACKET_SIZE};
use crate::types::ProtocolVersion;

/// Stateful MQTT framing for one connection.
///
/// The protocol version starts unknown (`None`: only CONNECT may arrive) and is set by the codec
/// itself when it decodes or encodes a CONNECT, so a server and a client both end up speaking
/// the negotiated version without further bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MqttCodec {
    pub version: Option<ProtocolVersion>,
    /// Largest incoming packet accepted (whole packet, fixed header included). This is the
    /// Maximum Packet Size the server announces in CONNACK.
    pub max_incoming_packet_size: u32,
    /// The client announced MQTT 3.1 (protocol level 3, "MQIsdp"): it is served as 3.1.1
    /// except that its CONNACK has no Session Present flag (the byte is reserved in 3.1).
    pub mqtt31: bool,
}

impl MqttCodec {
    /// A codec for a fresh connection.
    pub fn new(max_incoming_packet_size: u32) -> MqttCodec {
        MqttCodec {
            version: None,
            max_incoming_packet_size,
            mqtt31: false,
        }
    }
}

impl Default for MqttCodec {
    fn default() -> MqttCodec {
        MqttCodec::new(MAX_PACKET_SIZE)
    }
}

impl Decoder for MqttCodec {
    type Item = Packet;
    type Error = DecodeError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Packet>, DecodeError> {
        // A CONNECT that fails to parse after announcing its version still sets it, so the
        // server can answer CONNACK 0x81 in the layout the client reads (§4.13.1).
        let announced = self.version.is_none().then(|| announced(src)).flatten();
        let (announced, mqtt31) = (
            announced.and_then(announced_version),
            announced == Some((b"MQIsdp", 3)),
        );
        let packet = match decode(src, self.version, self.max_incoming_packet_size) {
            Ok(p) => p,
            Err(e) => {
                self.version = self.version.or(announced);
                return Err(e);
            }
        };
        if let Some(Packet::Connect(c)) = &packet {
            self.version = Some(c.protocol);
            self.mqtt31 = mqtt31;
        }
        Ok(packet)
    }
}

/// The protocol name and level a CONNECT at the front of `buf` announces, once its first
/// bytes are in.
fn announced(buf: &[u8]) -> Option<(&[u8], u8)> {
    if buf.first()? >> 4 != 1 {
        return None;
    }
    let len_bytes = buf.get(1..)?.iter().take(4).position(|b| b & 0x80 == 0)? + 1;
    let rest = buf.get(1 + len_bytes..)?;
    let name_len = usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
    let name = rest.get(2..2 + name_len)?;
    Some((name, *rest.get(2 + name_len)?))
}

/// The version of an announced protocol name and level whose CONNECT may be answered.
fn announced_version((name, level): (&[u8], u8)) -> Option<ProtocolVersion> {
    match (name, level) {
        (b"MQTT", 5) => Some(ProtocolVersion::V5),
        (b"MQTT", 4) => Some(ProtocolVersion::V311),
        _ => None,
    }
}

impl Encoder<&Packet> for MqttCodec {
    type Error = EncodeError;

    fn encode(&mut self, packet: &Packet, dst: &mut BytesMut) -> Result<(), EncodeError> {
        let version = match packet {
            Packet::Connect(c) => {
                self.version = Some(c.protocol);
                c.protocol
            }
            _ => self.version.ok_or(EncodeError::NoProtocolVersion)?,
        };
        if let Packet::ConnAck(ack) = packet {
            if self.mqtt31 && ack.session_present {
                let ack = super::ConnAck {
                    session_present: false,
                    ..ack.clone()
                };
                return encode(&Packet::ConnAck(ack), version, dst);
            }
        }
        encode(packet, version, dst)
    }
}

impl Encoder<Packet> for MqttCodec {
    type Error = EncodeError;

    fn encode(&mut self, packet: Packet, dst: &mut BytesMut) -> Result<(), EncodeError> {
        Encoder::<&Packet>::encode(self, &packet, dst)
    }
}

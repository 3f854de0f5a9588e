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
}

impl MqttCodec {
    /// A codec for a fresh connection.
    pub fn new(max_incoming_packet_size: u32) -> MqttCodec {
        MqttCodec {
            version: None,
            max_incoming_packet_size,
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
        let announced = self
            .version
            .is_none()
            .then(|| announced_version(src))
            .flatten();
        let packet = match decode(src, self.version, self.max_incoming_packet_size) {
            Ok(p) => p,
            Err(e) => {
                self.version = self.version.or(announced);
                return Err(e);
            }
        };
        if let Some(Packet::Connect(c)) = &packet {
            self.version = Some(c.protocol);
        }
        Ok(packet)
    }
}

/// The protocol version a CONNECT at the front of `buf` announces, once its first bytes are in.
fn announced_version(buf: &[u8]) -> Option<ProtocolVersion> {
    if buf.first()? >> 4 != 1 {
        return None;
    }
    let len_bytes = buf.get(1..)?.iter().take(4).position(|b| b & 0x80 == 0)? + 1;
    match buf.get(1 + len_bytes..)?.get(..7)? {
        [0, 4, b'M', b'Q', b'T', b'T', 5] => Some(ProtocolVersion::V5),
        [0, 4, b'M', b'Q', b'T', b'T', 4] => Some(ProtocolVersion::V311),
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
        encode(packet, version, dst)
    }
}

impl Encoder<Packet> for MqttCodec {
    type Error = EncodeError;

    fn encode(&mut self, packet: Packet, dst: &mut BytesMut) -> Result<(), EncodeError> {
        Encoder::<&Packet>::encode(self, &packet, dst)
    }
}

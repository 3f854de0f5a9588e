//! PUBLISH (§3.3), the hot path: the payload is a slice of the frame that was split off the
//! read buffer, never a copy.

use bytes::Bytes;

use super::error::{DecodeError, EncodeError};
use super::primitives::{Reader, Sink};
use super::properties::{self, PublishProperties};
use crate::types::{ProtocolVersion, QoS};

/// PUBLISH. `packet_id` is `Some` exactly when `qos` is 1 or 2.
///
/// The topic is only checked to be a valid UTF-8 string; wildcards, an empty topic without a
/// Topic Alias and alias bookkeeping are the connection's business (they have their own reason
/// codes, 0x90 and 0x94).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    pub topic: String,
    pub packet_id: Option<u16>,
    /// Always empty in 3.1.1.
    pub properties: PublishProperties,
    pub payload: Bytes,
}

impl Publish {
    /// Fixed header flags: DUP, QoS and RETAIN (§3.3.1).
    pub(crate) fn flags(&self) -> u8 {
        (u8::from(self.dup) << 3) | (self.qos.as_u8() << 1) | u8::from(self.retain)
    }

    /// Validates the fixed header flags; done before the body is buffered.
    pub(crate) fn check_flags(flags: u8) -> Result<(QoS, bool, bool), DecodeError> {
        let qos = QoS::from_u8((flags >> 1) & 0x03)
            .ok_or(DecodeError::MalformedPacket("PUBLISH with QoS 3"))?;
        let dup = flags & 0x08 != 0;
        if dup && qos == QoS::AtMostOnce {
            return Err(DecodeError::MalformedPacket("PUBLISH QoS 0 with DUP set"));
        }
        Ok((qos, dup, flags & 0x01 != 0))
    }

    pub(crate) fn decode(
        r: &mut Reader,
        flags: u8,
        v: ProtocolVersion,
    ) -> Result<Publish, DecodeError> {
        let (qos, dup, retain) = Publish::check_flags(flags)?;
        let topic = r.string()?;
        let packet_id = if qos == QoS::AtMostOnce {
            None
        } else {
            Some(r.packet_id()?)
        };
        let properties = if v.is_v5() {
            properties::read(r)?
        } else {
            PublishProperties::default()
        };
        Ok(Publish {
            dup,
            qos,
            retain,
            topic,
            packet_id,
            properties,
            payload: r.rest(),
        })
    }

    pub(crate) fn write<S: Sink>(&self, v: ProtocolVersion, s: &mut S) {
        if self.dup && self.qos == QoS::AtMostOnce {
            s.fail(EncodeError::InvalidPacket("PUBLISH QoS 0 with DUP set"));
        }
        s.put_str(&self.topic);
        match (self.qos, self.packet_id) {
            (QoS::AtMostOnce, None) => {}
            (QoS::AtMostOnce, Some(_)) => s.fail(EncodeError::InvalidPacket(
                "PUBLISH QoS 0 with a packet identifier",
            )),
            (_, None | Some(0)) => s.fail(EncodeError::InvalidPacket(
                "PUBLISH QoS > 0 needs a non-zero packet id",
            )),
            (_, Some(id)) => s.put_u16(id),
        }
        if v.is_v5() {
            properties::write(s, &self.properties);
        }
        s.put_slice(&self.payload);
    }
}

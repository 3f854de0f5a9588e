//! UNSUBSCRIBE and UNSUBACK (§3.10, §3.11).

use super::error::{DecodeError, EncodeError};
use super::primitives::{Reader, Sink};
use super::properties::{self, AckProperties, UnsubscribeProperties};
use super::reason::ReasonSet;
use crate::types::{ProtocolVersion, ReasonCode};

/// UNSUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub packet_id: u16,
    /// At least one.
    pub filters: Vec<String>,
    /// Always empty in 3.1.1.
    pub properties: UnsubscribeProperties,
}

/// UNSUBACK. The 3.1.1 UNSUBACK has no payload: `reason_codes` is not sent and decodes empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubAck {
    pub packet_id: u16,
    pub reason_codes: Vec<ReasonCode>,
    pub properties: AckProperties,
}

impl Unsubscribe {
    pub(crate) fn decode(r: &mut Reader, v: ProtocolVersion) -> Result<Unsubscribe, DecodeError> {
        let packet_id = r.packet_id()?;
        let properties = if v.is_v5() {
            properties::read(r)?
        } else {
            UnsubscribeProperties::default()
        };
        let mut filters = Vec::new();
        while !r.is_empty() {
            filters.push(r.string()?);
        }
        if filters.is_empty() {
            // [MQTT-3.10.3-2]
            return Err(DecodeError::ProtocolError(
                "UNSUBSCRIBE without topic filters",
            ));
        }
        Ok(Unsubscribe {
            packet_id,
            filters,
            properties,
        })
    }

    pub(crate) fn write<S: Sink>(&self, v: ProtocolVersion, s: &mut S) {
        if self.packet_id == 0 {
            s.fail(EncodeError::InvalidPacket("packet identifier 0"));
        }
        if self.filters.is_empty() {
            s.fail(EncodeError::InvalidPacket(
                "UNSUBSCRIBE without topic filters",
            ));
        }
        s.put_u16(self.packet_id);
        if v.is_v5() {
            properties::write(s, &self.properties);
        }
        for f in &self.filters {
            s.put_str(f);
        }
    }
}

impl UnsubAck {
    pub(crate) fn decode(r: &mut Reader, v: ProtocolVersion) -> Result<UnsubAck, DecodeError> {
        let packet_id = r.packet_id()?;
        if !v.is_v5() {
            return Ok(UnsubAck {
                packet_id,
                reason_codes: Vec::new(),
                properties: AckProperties::default(),
            });
        }
        let properties = properties::read(r)?;
        let mut reason_codes = Vec::with_capacity(r.remaining());
        while !r.is_empty() {
            let rc = ReasonCode(r.u8()?);
            if !ReasonSet::UnsubAck.allows(rc) {
                return Err(DecodeError::ProtocolError(
                    "reason code not allowed in UNSUBACK",
                ));
            }
            reason_codes.push(rc);
        }
        if reason_codes.is_empty() {
            return Err(DecodeError::ProtocolError("UNSUBACK without reason codes"));
        }
        Ok(UnsubAck {
            packet_id,
            reason_codes,
            properties,
        })
    }

    pub(crate) fn write<S: Sink>(&self, v: ProtocolVersion, s: &mut S) {
        if self.packet_id == 0 {
            s.fail(EncodeError::InvalidPacket("packet identifier 0"));
        }
        s.put_u16(self.packet_id);
        if !v.is_v5() {
            return;
        }
        if self.reason_codes.is_empty() {
            s.fail(EncodeError::InvalidPacket("UNSUBACK without reason codes"));
        }
        properties::write(s, &self.properties);
        for &rc in &self.reason_codes {
            if !ReasonSet::UnsubAck.allows(rc) {
                s.fail(EncodeError::InvalidPacket(
                    "reason code not allowed in UNSUBACK",
                ));
            }
            s.put_u8(rc.0);
        }
    }
}

//! SUBSCRIBE and SUBACK (§3.8, §3.9).

use super::error::{DecodeError, EncodeError};
use super::primitives::{Reader, Sink};
use super::properties::{self, AckProperties, SubscribeProperties};
use super::reason::ReasonSet;
use crate::session_api::SubscriptionOptions;
use crate::types::{ProtocolVersion, QoS, ReasonCode};

/// SUBSCRIBE. Filters are only checked to be valid strings; filter syntax belongs to
/// `crate::topic`. In 3.1.1 only the QoS of each option is sent; the v5-only options decode as
/// `false`/`0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub packet_id: u16,
    /// At least one.
    pub filters: Vec<(String, SubscriptionOptions)>,
    /// Always empty in 3.1.1.
    pub properties: SubscribeProperties,
}

/// SUBACK: one reason code per filter, in order. In 3.1.1 they are encoded with
/// [`ReasonCode::to_v311_suback`] and 0x80 decodes as [`ReasonCode::UNSPECIFIED_ERROR`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    pub packet_id: u16,
    pub reason_codes: Vec<ReasonCode>,
    pub properties: AckProperties,
}

fn decode_options(b: u8, v: ProtocolVersion) -> Result<SubscriptionOptions, DecodeError> {
    // QoS 3 is malformed in 3.1.1 (§3.8.3.1 there) but a Protocol Error in v5 (§3.8.3.1).
    let qos = QoS::from_u8(b & 0x03).ok_or(if v.is_v5() {
        DecodeError::ProtocolError("subscription QoS 3")
    } else {
        DecodeError::MalformedPacket("subscription QoS 3")
    })?;
    if !v.is_v5() {
        if b & 0xFC != 0 {
            return Err(DecodeError::MalformedPacket(
                "subscription options reserved bits set",
            ));
        }
        return Ok(SubscriptionOptions {
            qos,
            ..SubscriptionOptions::default()
        });
    }
    if b & 0xC0 != 0 {
        return Err(DecodeError::MalformedPacket(
            "subscription options reserved bits set",
        ));
    }
    let retain_handling = (b >> 4) & 0x03;
    if retain_handling == 3 {
        return Err(DecodeError::ProtocolError("retain handling 3"));
    }
    Ok(SubscriptionOptions {
        qos,
        no_local: b & 0x04 != 0,
        retain_as_published: b & 0x08 != 0,
        retain_handling,
    })
}

fn encode_options<S: Sink>(o: &SubscriptionOptions, v: ProtocolVersion, s: &mut S) -> u8 {
    if !v.is_v5() {
        return o.qos.as_u8();
    }
    if o.retain_handling > 2 {
        s.fail(EncodeError::InvalidPacket("retain handling above 2"));
    }
    o.qos.as_u8()
        | (u8::from(o.no_local) << 2)
        | (u8::from(o.retain_as_published) << 3)
        | ((o.retain_handling & 0x03) << 4)
}

impl Subscribe {
    pub(crate) fn decode(r: &mut Reader, v: ProtocolVersion) -> Result<Subscribe, DecodeError> {
        let packet_id = r.packet_id()?;
        let properties = if v.is_v5() {
            properties::read(r)?
        } else {
            SubscribeProperties::default()
        };
        let mut filters = Vec::new();
        while !r.is_empty() {
            let filter = r.string()?;
            let options = decode_options(r.u8()?, v)?;
            filters.push((filter, options));
        }
        if filters.is_empty() {
            // [MQTT-3.8.3-2]
            return Err(DecodeError::ProtocolError(
                "SUBSCRIBE without topic filters",
            ));
        }
        Ok(Subscribe {
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
                "SUBSCRIBE without topic filters",
            ));
        }
        s.put_u16(self.packet_id);
        if v.is_v5() {
            properties::write(s, &self.properties);
        }
        for (filter, options) in &self.filters {
            s.put_str(filter);
            let b = encode_options(options, v, s);
            s.put_u8(b);
        }
    }
}

impl SubAck {
    pub(crate) fn decode(r: &mut Reader, v: ProtocolVersion) -> Result<SubAck, DecodeError> {
        let packet_id = r.packet_id()?;
        let properties = if v.is_v5() {
            properties::read(r)?
        } else {
            AckProperties::default()
        };
        let mut reason_codes = Vec::with_capacity(r.remaining());
        while !r.is_empty() {
            let rc = ReasonCode(r.u8()?);
            let ok = if v.is_v5() {
                ReasonSet::SubAck.allows(rc)
            } else {
                matches!(rc.0, 0x00 | 0x01 | 0x02 | 0x80)
            };
            if !ok {
                return Err(DecodeError::ProtocolError(
                    "reason code not allowed in SUBACK",
                ));
            }
            reason_codes.push(rc);
        }
        if reason_codes.is_empty() {
            return Err(DecodeError::ProtocolError("SUBACK without reason codes"));
        }
        Ok(SubAck {
            packet_id,
            reason_codes,
            properties,
        })
    }

    pub(crate) fn write<S: Sink>(&self, v: ProtocolVersion, s: &mut S) {
        if self.packet_id == 0 {
            s.fail(EncodeError::InvalidPacket("packet identifier 0"));
        }
        if self.reason_codes.is_empty() {
            s.fail(EncodeError::InvalidPacket("SUBACK without reason codes"));
        }
        s.put_u16(self.packet_id);
        if v.is_v5() {
            properties::write(s, &self.properties);
            for &rc in &self.reason_codes {
                if !ReasonSet::SubAck.allows(rc) {
                    s.fail(EncodeError::InvalidPacket(
                        "reason code not allowed in SUBACK",
                    ));
                }
                s.put_u8(rc.0);
            }
        } else {
            for &rc in &self.reason_codes {
                s.put_u8(rc.to_v311_suback());
            }
        }
    }
}

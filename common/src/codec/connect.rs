//! CONNECT (§3.1): the one packet whose own bytes decide the protocol version of the rest of
//! the connection.

use bytes::Bytes;

use super::error::{DecodeError, EncodeError};
use super::primitives::{Reader, Sink};
use super::properties::{self, ConnectProperties, WillProperties};
use crate::types::{ProtocolVersion, QoS};

/// CONNECT. `protocol` is read from the packet and, when encoding, decides the layout (the
/// version passed to `encode` is ignored for CONNECT).
///
/// Protocol level 3 (MQTT 3.1, protocol name "MQIsdp") is accepted and decoded as
/// [`ProtocolVersion::V311`]: its CONNECT differs only in the name, and old devices still speak
/// it. Re-encoding such a packet produces the 3.1.1 form ("MQTT", level 4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub protocol: ProtocolVersion,
    /// "Clean Session" in 3.1.1.
    pub clean_start: bool,
    pub keep_alive: u16,
    /// May be empty; whether the server then assigns one is not the codec's decision.
    pub client_id: String,
    pub will: Option<LastWill>,
    pub username: Option<String>,
    pub password: Option<Bytes>,
    /// Always empty in 3.1.1.
    pub properties: ConnectProperties,
}

/// The will message of a CONNECT (§3.1.2.5, §3.1.3.2–4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastWill {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// Always empty in 3.1.1.
    pub properties: WillProperties,
}

const FLAG_RESERVED: u8 = 0x01;
const FLAG_CLEAN_START: u8 = 0x02;
const FLAG_WILL: u8 = 0x04;
const FLAG_WILL_QOS_SHIFT: u8 = 3;
const FLAG_WILL_RETAIN: u8 = 0x20;
const FLAG_PASSWORD: u8 = 0x40;
const FLAG_USERNAME: u8 = 0x80;

impl Connect {
    pub(crate) fn decode(r: &mut Reader) -> Result<Connect, DecodeError> {
        let name = r.binary()?;
        let level = r.u8()?;
        let protocol = match (&name[..], level) {
            (b"MQTT", 4) | (b"MQIsdp", 3) => ProtocolVersion::V311,
            (b"MQTT", 5) => ProtocolVersion::V5,
            (b"MQTT" | b"MQIsdp", level) => {
                return Err(DecodeError::UnsupportedProtocolVersion(level))
            }
            _ => return Err(DecodeError::MalformedPacket("unknown protocol name")),
        };
        let v5 = protocol.is_v5();
        let flags = r.u8()?;
        if flags & FLAG_RESERVED != 0 {
            return Err(DecodeError::MalformedPacket("CONNECT reserved flag set"));
        }
        let has_will = flags & FLAG_WILL != 0;
        let will_qos = QoS::from_u8((flags >> FLAG_WILL_QOS_SHIFT) & 0x03)
            .ok_or(DecodeError::MalformedPacket("will QoS 3"))?;
        let will_retain = flags & FLAG_WILL_RETAIN != 0;
        if !has_will && (will_qos != QoS::AtMostOnce || will_retain) {
            return Err(DecodeError::MalformedPacket(
                "will QoS or retain set without will",
            ));
        }
        let has_username = flags & FLAG_USERNAME != 0;
        let has_password = flags & FLAG_PASSWORD != 0;
        if !v5 && has_password && !has_username {
            // [MQTT-3.1.2-22]; MQTT 5 lifted this restriction.
            return Err(DecodeError::MalformedPacket("password without user name"));
        }
        let keep_alive = r.u16()?;
        let properties = if v5 {
            properties::read(r)?
        } else {
            ConnectProperties::default()
        };
        let client_id = r.string()?;
        let will = if has_will {
            let properties = if v5 {
                properties::read(r)?
            } else {
                WillProperties::default()
            };
            let topic = r.string()?;
            let payload = r.binary()?;
            Some(LastWill {
                topic,
                payload,
                qos: will_qos,
                retain: will_retain,
                properties,
            })
        } else {
            None
        };
        let username = if has_username {
            Some(r.string()?)
        } else {
            None
        };
        let password = if has_password {
            Some(r.binary()?)
        } else {
            None
        };
        Ok(Connect {
            protocol,
            clean_start: flags & FLAG_CLEAN_START != 0,
            keep_alive,
            client_id,
            will,
            username,
            password,
            properties,
        })
    }

    pub(crate) fn write<S: Sink>(&self, s: &mut S) {
        let v5 = self.protocol.is_v5();
        if !v5 && self.password.is_some() && self.username.is_none() {
            s.fail(EncodeError::InvalidPacket(
                "MQTT 3.1.1 password without user name",
            ));
        }
        s.put_str("MQTT");
        s.put_u8(if v5 { 5 } else { 4 });
        let mut flags = 0;
        if self.clean_start {
            flags |= FLAG_CLEAN_START;
        }
        if let Some(will) = &self.will {
            flags |= FLAG_WILL | (will.qos.as_u8() << FLAG_WILL_QOS_SHIFT);
            if will.retain {
                flags |= FLAG_WILL_RETAIN;
            }
        }
        if self.username.is_some() {
            flags |= FLAG_USERNAME;
        }
        if self.password.is_some() {
            flags |= FLAG_PASSWORD;
        }
        s.put_u8(flags);
        s.put_u16(self.keep_alive);
        if v5 {
            properties::write(s, &self.properties);
        }
        s.put_str(&self.client_id);
        if let Some(will) = &self.will {
            if v5 {
                properties::write(s, &will.properties);
            }
            s.put_str(&will.topic);
            s.put_binary(&will.payload);
        }
        if let Some(u) = &self.username {
            s.put_str(u);
        }
        if let Some(p) = &self.password {
            s.put_binary(p);
        }
    }
}

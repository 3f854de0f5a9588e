//! CONNACK (§3.2). In 3.1.1 the one-byte return code is mapped to and from the v5 reason code,
//! so the connection handler deals with reason codes only.

use super::error::{DecodeError, EncodeError};
use super::primitives::{Reader, Sink};
use super::properties::{self, ConnAckProperties};
use super::reason::{from_v311_connack, ReasonSet};
use crate::types::{ProtocolVersion, ReasonCode};

/// CONNACK. In 3.1.1 `reason_code` is encoded with [`ReasonCode::to_v311_connack`] (a lossy
/// mapping) and the return codes 1..=5 decode to 0x84, 0x85, 0x88, 0x86, 0x87.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    pub reason_code: ReasonCode,
    /// Always empty in 3.1.1.
    pub properties: ConnAckProperties,
}

impl ConnAck {
    pub(crate) fn decode(r: &mut Reader, v: ProtocolVersion) -> Result<ConnAck, DecodeError> {
        let flags = r.u8()?;
        if flags & 0xFE != 0 {
            return Err(DecodeError::MalformedPacket("CONNACK reserved flags set"));
        }
        let code = r.u8()?;
        let (reason_code, properties) = if v.is_v5() {
            let rc = ReasonCode(code);
            if !ReasonSet::ConnAck.allows(rc) {
                return Err(DecodeError::ProtocolError(
                    "reason code not allowed in CONNACK",
                ));
            }
            (rc, properties::read(r)?)
        } else {
            let rc = from_v311_connack(code)
                .ok_or(DecodeError::MalformedPacket("unknown CONNACK return code"))?;
            (rc, ConnAckProperties::default())
        };
        Ok(ConnAck {
            session_present: flags & 1 == 1,
            reason_code,
            properties,
        })
    }

    pub(crate) fn write<S: Sink>(&self, v: ProtocolVersion, s: &mut S) {
        s.put_u8(u8::from(self.session_present));
        if v.is_v5() {
            if !ReasonSet::ConnAck.allows(self.reason_code) {
                s.fail(EncodeError::InvalidPacket(
                    "reason code not allowed in CONNACK",
                ));
            }
            s.put_u8(self.reason_code.0);
            properties::write(s, &self.properties);
        } else {
            s.put_u8(self.reason_code.to_v311_connack());
        }
    }
}

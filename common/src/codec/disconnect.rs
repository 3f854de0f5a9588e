//! DISCONNECT (§3.14) and AUTH (§3.15): both have an optional reason code and optional
//! properties that are left out entirely in the common case.

use super::error::{DecodeError, EncodeError};
use super::primitives::{Reader, Sink};
use super::properties::{self, AuthProperties, DisconnectProperties, Properties};
use super::reason::ReasonSet;
use crate::types::{ProtocolVersion, ReasonCode};

/// DISCONNECT. The 3.1.1 DISCONNECT is empty: it decodes as Normal disconnection and the
/// reason code and properties are not sent. In v5 the encoder sends nothing for a normal
/// disconnection without properties, otherwise the reason code and the properties (an empty
/// property length included: the 1-byte form is legal but not every client reads it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    pub reason_code: ReasonCode,
    pub properties: DisconnectProperties,
}

/// AUTH (v5 only; packet type 15 is reserved in 3.1.1). Encoded with remaining length 0 when
/// the reason is Success and there are no properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    pub reason_code: ReasonCode,
    pub properties: AuthProperties,
}

impl Disconnect {
    /// A normal disconnection without properties.
    pub fn normal() -> Disconnect {
        Disconnect::with_reason(ReasonCode::NORMAL_DISCONNECTION)
    }

    /// A disconnection for `reason_code`, without properties.
    pub fn with_reason(reason_code: ReasonCode) -> Disconnect {
        Disconnect {
            reason_code,
            properties: DisconnectProperties::default(),
        }
    }

    pub(crate) fn decode(r: &mut Reader, v: ProtocolVersion) -> Result<Disconnect, DecodeError> {
        let (reason_code, properties) = if v.is_v5() {
            decode_reason_props(r, ReasonSet::Disconnect)?
        } else {
            (
                ReasonCode::NORMAL_DISCONNECTION,
                DisconnectProperties::default(),
            )
        };
        Ok(Disconnect {
            reason_code,
            properties,
        })
    }

    pub(crate) fn write<S: Sink>(&self, v: ProtocolVersion, s: &mut S) {
        if v.is_v5() {
            write_reason_props(s, ReasonSet::Disconnect, self.reason_code, &self.properties);
        }
    }
}

impl Auth {
    pub(crate) fn decode(r: &mut Reader) -> Result<Auth, DecodeError> {
        let (reason_code, properties) = decode_reason_props(r, ReasonSet::Auth)?;
        Ok(Auth {
            reason_code,
            properties,
        })
    }

    pub(crate) fn write<S: Sink>(&self, s: &mut S) {
        write_reason_props(s, ReasonSet::Auth, self.reason_code, &self.properties);
    }
}

/// Remaining length 0: Success without properties; 1: reason code only (§3.14.2.2.1 — also
/// accepted for AUTH, where the spec is silent); more: reason code and properties.
fn decode_reason_props<P: Properties>(
    r: &mut Reader,
    set: ReasonSet,
) -> Result<(ReasonCode, P), DecodeError> {
    if r.is_empty() {
        return Ok((ReasonCode::SUCCESS, P::default()));
    }
    let rc = ReasonCode(r.u8()?);
    if !set.allows(rc) {
        return Err(DecodeError::ProtocolError(
            "reason code not allowed in this packet",
        ));
    }
    let props = if r.is_empty() {
        P::default()
    } else {
        properties::read(r)?
    };
    Ok((rc, props))
}

fn write_reason_props<S: Sink, P: Properties>(s: &mut S, set: ReasonSet, rc: ReasonCode, p: &P) {
    if !set.allows(rc) {
        s.fail(EncodeError::InvalidPacket(
            "reason code not allowed in this packet",
        ));
    }
    let empty = p.is_empty();
    if rc == ReasonCode::SUCCESS && empty {
        return;
    }
    // Reason code and a property length (0 when there are none). The spec also allows the
    // reason code alone, but some clients (rumqttc 0.25) cannot parse that form.
    s.put_u8(rc.0);
    properties::write(s, p);
}

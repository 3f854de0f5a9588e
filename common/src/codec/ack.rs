//! PUBACK, PUBREC, PUBREL and PUBCOMP (§3.4–3.7): four packets with one layout, so one decoder
//! and one encoder serve them all; distinct types keep a PUBREC from being sent as a PUBCOMP.

use super::error::{DecodeError, EncodeError};
use super::primitives::{Reader, Sink};
use super::properties::{self, AckProperties, Properties};
use super::reason::ReasonSet;
use crate::types::{ProtocolVersion, ReasonCode};

macro_rules! ack_packet {
    ($(#[$doc:meta])* $name:ident, $set:expr) => {
        $(#[$doc])*
        ///
        /// In 3.1.1 only `packet_id` travels; `reason_code` decodes as Success and is not sent,
        /// nor are the properties. In v5 the short form (remaining length 2) is used when the
        /// reason is Success and there are no properties, and the reason-only form (remaining
        /// length 3) when there are no properties.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name {
            pub packet_id: u16,
            pub reason_code: ReasonCode,
            pub properties: AckProperties,
        }

        impl $name {
            /// A successful acknowledgement without properties.
            pub fn new(packet_id: u16) -> $name {
                $name { packet_id, reason_code: ReasonCode::SUCCESS, properties: AckProperties::default() }
            }

            pub(crate) fn decode(r: &mut Reader, v: ProtocolVersion) -> Result<$name, DecodeError> {
                let (packet_id, reason_code, properties) = decode_ack(r, v, $set)?;
                Ok($name { packet_id, reason_code, properties })
            }

            pub(crate) fn write<S: Sink>(&self, v: ProtocolVersion, s: &mut S) {
                write_ack(s, v, $set, self.packet_id, self.reason_code, &self.properties)
            }
        }
    };
}

ack_packet!(
    /// PUBACK: the answer to a QoS 1 PUBLISH.
    PubAck,
    ReasonSet::PubAckRec
);
ack_packet!(
    /// PUBREC: first answer to a QoS 2 PUBLISH.
    PubRec,
    ReasonSet::PubAckRec
);
ack_packet!(
    /// PUBREL: the publisher releases a QoS 2 packet id.
    PubRel,
    ReasonSet::PubRelComp
);
ack_packet!(
    /// PUBCOMP: last step of the QoS 2 exchange.
    PubComp,
    ReasonSet::PubRelComp
);

fn decode_ack(
    r: &mut Reader,
    v: ProtocolVersion,
    set: ReasonSet,
) -> Result<(u16, ReasonCode, AckProperties), DecodeError> {
    let packet_id = r.packet_id()?;
    if !v.is_v5() || r.is_empty() {
        return Ok((packet_id, ReasonCode::SUCCESS, AckProperties::default()));
    }
    let rc = ReasonCode(r.u8()?);
    if !set.allows(rc) {
        return Err(DecodeError::ProtocolError(
            "reason code not allowed in this acknowledgement",
        ));
    }
    let props = if r.is_empty() {
        AckProperties::default()
    } else {
        properties::read(r)?
    };
    Ok((packet_id, rc, props))
}

fn write_ack<S: Sink>(
    s: &mut S,
    v: ProtocolVersion,
    set: ReasonSet,
    packet_id: u16,
    rc: ReasonCode,
    props: &AckProperties,
) {
    if packet_id == 0 {
        s.fail(EncodeError::InvalidPacket("packet identifier 0"));
    }
    s.put_u16(packet_id);
    if !v.is_v5() {
        return;
    }
    if !set.allows(rc) {
        s.fail(EncodeError::InvalidPacket(
            "reason code not allowed in this acknowledgement",
        ));
    }
    let no_props = props.is_empty();
    if rc == ReasonCode::SUCCESS && no_props {
        return;
    }
    s.put_u8(rc.0);
    if !no_props {
        properties::write(s, props);
    }
}

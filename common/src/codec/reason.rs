//! Which reason codes each v5 packet may carry (§2.4 and the per-packet tables in chapter 3).
//!
//! Checked in both directions: a peer sending a code that makes no sense for the packet is
//! breaking the protocol, and us sending one is a bug we would rather catch before the wire.

use crate::types::ReasonCode;

/// The packets that carry reason codes, each with its own allowed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasonSet {
    ConnAck,
    /// PUBACK and PUBREC.
    PubAckRec,
    /// PUBREL and PUBCOMP.
    PubRelComp,
    SubAck,
    UnsubAck,
    Disconnect,
    Auth,
}

impl ReasonSet {
    /// Whether `rc` is defined for this packet in MQTT 5.
    pub fn allows(self, rc: ReasonCode) -> bool {
        let allowed: &[u8] = match self {
            ReasonSet::ConnAck => &[
                0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90,
                0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
            ],
            ReasonSet::PubAckRec => &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99],
            ReasonSet::PubRelComp => &[0x00, 0x92],
            ReasonSet::SubAck => &[
                0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
            ],
            ReasonSet::UnsubAck => &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91],
            ReasonSet::Disconnect => &[
                0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93,
                0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1,
                0xA2,
            ],
            ReasonSet::Auth => &[0x00, 0x18, 0x19],
        };
        allowed.contains(&rc.0)
    }
}

/// MQTT 3.1.1 CONNACK return codes (§3.2.2.3 of 3.1.1) as the v5 reason codes they mean; the
/// inverse of [`ReasonCode::to_v311_connack`] for the codes it produces.
pub fn from_v311_connack(code: u8) -> Option<ReasonCode> {
    Some(match code {
        0 => ReasonCode::SUCCESS,
        1 => ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
        2 => ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
        3 => ReasonCode::SERVER_UNAVAILABLE,
        4 => ReasonCode::BAD_USER_NAME_OR_PASSWORD,
        5 => ReasonCode::NOT_AUTHORIZED,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v311_connack_codes_round_trip() {
        for code in 0..=5 {
            assert_eq!(from_v311_connack(code).unwrap().to_v311_connack(), code);
        }
        assert_eq!(from_v311_connack(6), None);
    }

    #[test]
    fn sets() {
        assert!(ReasonSet::PubRelComp.allows(ReasonCode::PACKET_IDENTIFIER_NOT_FOUND));
        assert!(!ReasonSet::PubRelComp.allows(ReasonCode::UNSPECIFIED_ERROR));
        assert!(ReasonSet::Disconnect.allows(ReasonCode::DISCONNECT_WITH_WILL));
        assert!(!ReasonSet::ConnAck.allows(ReasonCode::DISCONNECT_WITH_WILL));
    }
}

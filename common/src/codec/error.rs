//! Errors of the codec.
//!
//! Decoding errors carry the MQTT 5 reason code the server must send before closing the
//! connection (§4.13), so the connection handler never has to guess which one applies.

use crate::types::ReasonCode;

/// Why bytes from the network could not be turned into a [`Packet`](super::Packet).
///
/// Every variant is fatal for the connection: after an error the read buffer is in an
/// unspecified position and must not be decoded further.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The bytes do not follow the packet grammar (§4.13.1 "Malformed Packet").
    #[error("malformed packet: {0}")]
    MalformedPacket(&'static str),
    /// The bytes are well formed but break a protocol rule (§4.13.1 "Protocol Error").
    #[error("protocol error: {0}")]
    ProtocolError(&'static str),
    /// The fixed header announces a packet larger than we accept. Returned as soon as the fixed
    /// header is read, before the body is buffered.
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    PacketTooLarge { size: u32, max: u32 },
    /// CONNECT with a protocol level other than 3, 4 or 5.
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocolVersion(u8),
    /// The transport failed (only produced through the tokio `Decoder`).
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl DecodeError {
    /// The reason code to put in the CONNACK or DISCONNECT sent because of this error.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            DecodeError::MalformedPacket(_) => ReasonCode::MALFORMED_PACKET,
            DecodeError::ProtocolError(_) => ReasonCode::PROTOCOL_ERROR,
            DecodeError::PacketTooLarge { .. } => ReasonCode::PACKET_TOO_LARGE,
            DecodeError::UnsupportedProtocolVersion(_) => ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
            DecodeError::Io(_) => ReasonCode::UNSPECIFIED_ERROR,
        }
    }
}

/// Why a [`Packet`](super::Packet) cannot be put on the wire. These are bugs or limits on
/// our side; nothing has been written to the output buffer when one is returned.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// A UTF-8 string field is longer than the 65,535 bytes its length prefix can express.
    #[error("string of {len} bytes is longer than 65535")]
    StringTooLong { len: usize },
    /// A binary field is longer than 65,535 bytes.
    #[error("binary data of {len} bytes is longer than 65535")]
    BinaryTooLong { len: usize },
    /// A string contains U+0000, which §1.5.4 forbids.
    #[error("string contains U+0000")]
    NulInString,
    /// A variable byte integer (e.g. a Subscription Identifier) is above 268,435,455.
    #[error("variable byte integer {0} is above 268435455")]
    VarIntTooLarge(u64),
    /// The remaining length would exceed 268,435,455 bytes.
    #[error("packet body of {size} bytes exceeds the MQTT maximum of 268435455")]
    PacketTooLarge { size: usize },
    /// The packet violates a rule the receiver would reject it for (packet id 0, QoS 0 with a
    /// packet id, no topic filters, a reason code not allowed in this packet, ...).
    #[error("invalid packet: {0}")]
    InvalidPacket(&'static str),
    /// The packet type does not exist in the negotiated protocol version (AUTH in 3.1.1).
    #[error("{0} cannot be sent in MQTT 3.1.1")]
    NotInV311(&'static str),
    /// The tokio encoder was asked to encode before a CONNECT fixed the protocol version.
    #[error("protocol version not known yet (no CONNECT seen)")]
    NoProtocolVersion,
    /// The transport failed (only produced through the tokio `Encoder`).
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

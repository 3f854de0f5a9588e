//! The [`Packet`] enum, the fixed header (§2.1) and the three entry points [`decode`],
//! [`encode`] and [`encoded_len`].

use bytes::{Buf, BufMut, BytesMut};

use super::ack::{PubAck, PubComp, PubRec, PubRel};
use super::connack::ConnAck;
use super::connect::Connect;
use super::disconnect::{Auth, Disconnect};
use super::error::{DecodeError, EncodeError};
use super::primitives::{measure, parse_var_int, var_int_len, Reader, Sink, VarInt, MAX_VAR_INT};
use super::publish::Publish;
use super::subscribe::{SubAck, Subscribe};
use super::unsubscribe::{UnsubAck, Unsubscribe};
use crate::types::ProtocolVersion;

/// Largest packet MQTT can express: a 5-byte fixed header plus 268,435,455 bytes.
pub const MAX_PACKET_SIZE: u32 = 1 + 4 + MAX_VAR_INT;

/// Any MQTT control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect(Connect),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(PubAck),
    PubRec(PubRec),
    PubRel(PubRel),
    PubComp(PubComp),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    Auth(Auth),
}

// Control packet types (§2.1.2).
const CONNECT: u8 = 1;
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const PUBREC: u8 = 5;
const PUBREL: u8 = 6;
const PUBCOMP: u8 = 7;
const SUBSCRIBE: u8 = 8;
const SUBACK: u8 = 9;
const UNSUBSCRIBE: u8 = 10;
const UNSUBACK: u8 = 11;
const PINGREQ: u8 = 12;
const PINGRESP: u8 = 13;
const DISCONNECT: u8 = 14;
const AUTH: u8 = 15;

impl Packet {
    /// The packet's name as the spec writes it, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Packet::Connect(_) => "CONNECT",
            Packet::ConnAck(_) => "CONNACK",
            Packet::Publish(_) => "PUBLISH",
            Packet::PubAck(_) => "PUBACK",
            Packet::PubRec(_) => "PUBREC",
            Packet::PubRel(_) => "PUBREL",
            Packet::PubComp(_) => "PUBCOMP",
            Packet::Subscribe(_) => "SUBSCRIBE",
            Packet::SubAck(_) => "SUBACK",
            Packet::Unsubscribe(_) => "UNSUBSCRIBE",
            Packet::UnsubAck(_) => "UNSUBACK",
            Packet::PingReq => "PINGREQ",
            Packet::PingResp => "PINGRESP",
            Packet::Disconnect(_) => "DISCONNECT",
            Packet::Auth(_) => "AUTH",
        }
    }

    /// First byte of the fixed header: type and flags.
    fn first_byte(&self) -> u8 {
        let (ty, flags) = match self {
            Packet::Connect(_) => (CONNECT, 0),
            Packet::ConnAck(_) => (CONNACK, 0),
            Packet::Publish(p) => (PUBLISH, p.flags()),
            Packet::PubAck(_) => (PUBACK, 0),
            Packet::PubRec(_) => (PUBREC, 0),
            Packet::PubRel(_) => (PUBREL, 0b0010),
            Packet::PubComp(_) => (PUBCOMP, 0),
            Packet::Subscribe(_) => (SUBSCRIBE, 0b0010),
            Packet::SubAck(_) => (SUBACK, 0),
            Packet::Unsubscribe(_) => (UNSUBSCRIBE, 0b0010),
            Packet::UnsubAck(_) => (UNSUBACK, 0),
            Packet::PingReq => (PINGREQ, 0),
            Packet::PingResp => (PINGRESP, 0),
            Packet::Disconnect(_) => (DISCONNECT, 0),
            Packet::Auth(_) => (AUTH, 0),
        };
        (ty << 4) | flags
    }

    /// Writes the variable header and payload. CONNECT uses its own protocol version.
    fn write_body<S: Sink>(&self, v: ProtocolVersion, s: &mut S) {
        match self {
            Packet::Connect(p) => p.write(s),
            Packet::ConnAck(p) => p.write(v, s),
            Packet::Publish(p) => p.write(v, s),
            Packet::PubAck(p) => p.write(v, s),
            Packet::PubRec(p) => p.write(v, s),
            Packet::PubRel(p) => p.write(v, s),
            Packet::PubComp(p) => p.write(v, s),
            Packet::Subscribe(p) => p.write(v, s),
            Packet::SubAck(p) => p.write(v, s),
            Packet::Unsubscribe(p) => p.write(v, s),
            Packet::UnsubAck(p) => p.write(v, s),
            Packet::PingReq | Packet::PingResp => {}
            Packet::Disconnect(p) => p.write(v, s),
            Packet::Auth(p) => {
                if !v.is_v5() {
                    s.fail(EncodeError::NotInV311("AUTH"));
                }
                p.write(s)
            }
        }
    }
}

/// Checks the first byte of a fixed header against the packet type's reserved flags (§2.1.3)
/// and against what may arrive at this point of the connection.
fn check_first_byte(first: u8, version: Option<ProtocolVersion>) -> Result<(), DecodeError> {
    let (ty, flags) = (first >> 4, first & 0x0F);
    match (ty, version) {
        (0, _) => return Err(DecodeError::MalformedPacket("reserved packet type 0")),
        (CONNECT, Some(_)) => return Err(DecodeError::ProtocolError("second CONNECT")),
        (CONNECT, None) => {}
        (_, None) => return Err(DecodeError::ProtocolError("first packet must be CONNECT")),
        (AUTH, Some(ProtocolVersion::V311)) => {
            return Err(DecodeError::MalformedPacket(
                "reserved packet type 15 in MQTT 3.1.1",
            ))
        }
        _ => {}
    }
    match ty {
        PUBLISH => Publish::check_flags(flags).map(|_| ()),
        PUBREL | SUBSCRIBE | UNSUBSCRIBE if flags == 0b0010 => Ok(()),
        PUBREL | SUBSCRIBE | UNSUBSCRIBE => Err(DecodeError::MalformedPacket(
            "fixed header flags must be 0010",
        )),
        _ if flags == 0 => Ok(()),
        _ => Err(DecodeError::MalformedPacket(
            "fixed header flags must be 0000",
        )),
    }
}

/// Decodes one packet from the front of `buf`.
///
/// * `Ok(None)`: more bytes are needed; nothing was consumed. Once the fixed header is complete,
///   room for the whole packet is reserved so the rest arrives without reallocations.
/// * `Ok(Some(p))`: the packet's bytes were removed from `buf`.
/// * `Err(_)`: the connection must be closed. [`DecodeError::PacketTooLarge`] is returned as
///   soon as the fixed header is known, before the body is buffered.
///
/// `version` is `None` before CONNECT: then only CONNECT is accepted, and CONNECT's own protocol
/// level decides how it is parsed. Afterwards a second CONNECT is a Protocol Error
/// [MQTT-3.1.0-2]. Packets that only a server sends (CONNACK, SUBACK, ...) decode too, so the
/// codec serves both ends; refusing them on a server is the connection's job.
pub fn decode(
    buf: &mut BytesMut,
    version: Option<ProtocolVersion>,
    max_packet_size: u32,
) -> Result<Option<Packet>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    check_first_byte(first, version)?;
    let (remaining, len_bytes) = match parse_var_int(&buf[1..])? {
        VarInt::Done(v, n) => (v as usize, n),
        VarInt::Incomplete => return Ok(None),
    };
    let header = 1 + len_bytes;
    let total = header + remaining;
    if total > max_packet_size as usize {
        return Err(DecodeError::PacketTooLarge {
            size: total as u32,
            max: max_packet_size,
        });
    }
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    frame.advance(header);
    let mut r = Reader::new(frame.freeze());
    let v = version.unwrap_or_default();
    let packet = match first >> 4 {
        CONNECT => Packet::Connect(Connect::decode(&mut r)?),
        CONNACK => Packet::ConnAck(ConnAck::decode(&mut r, v)?),
        PUBLISH => Packet::Publish(Publish::decode(&mut r, first & 0x0F, v)?),
        PUBACK => Packet::PubAck(PubAck::decode(&mut r, v)?),
        PUBREC => Packet::PubRec(PubRec::decode(&mut r, v)?),
        PUBREL => Packet::PubRel(PubRel::decode(&mut r, v)?),
        PUBCOMP => Packet::PubComp(PubComp::decode(&mut r, v)?),
        SUBSCRIBE => Packet::Subscribe(Subscribe::decode(&mut r, v)?),
        SUBACK => Packet::SubAck(SubAck::decode(&mut r, v)?),
        UNSUBSCRIBE => Packet::Unsubscribe(Unsubscribe::decode(&mut r, v)?),
        UNSUBACK => Packet::UnsubAck(UnsubAck::decode(&mut r, v)?),
        PINGREQ => Packet::PingReq,
        PINGRESP => Packet::PingResp,
        DISCONNECT => Packet::Disconnect(Disconnect::decode(&mut r, v)?),
        _ => Packet::Auth(Auth::decode(&mut r)?),
    };
    r.finish("bytes left over after the packet's contents")?;
    Ok(Some(packet))
}

/// Appends `packet` to `out` in the wire format of `version` (CONNECT uses its own
/// `protocol`). Fields that `version` cannot carry (v5 properties and reason codes in 3.1.1)
/// are left out. On error nothing is written.
pub fn encode(
    packet: &Packet,
    version: ProtocolVersion,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let mut counter = super::primitives::Counter::default();
    packet.write_body(version, &mut counter);
    if let Some(e) = counter.error {
        return Err(e);
    }
    let body = counter.len;
    if body > MAX_VAR_INT as usize {
        return Err(EncodeError::PacketTooLarge { size: body });
    }
    out.reserve(1 + var_int_len(body) + body);
    BufMut::put_u8(out, packet.first_byte());
    Sink::put_var_int(out, body);
    let start = out.len();
    packet.write_body(version, out);
    debug_assert_eq!(out.len() - start, body, "measured and written sizes differ");
    Ok(())
}

/// The exact number of bytes [`encode`] writes for `packet`, without encoding it: compare it
/// with the client's Maximum Packet Size before sending. Meaningless if `encode` would fail.
pub fn encoded_len(packet: &Packet, version: ProtocolVersion) -> usize {
    let body = measure(|c| packet.write_body(version, c));
    1 + var_int_len(body) + body
}

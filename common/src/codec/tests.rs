//! Unit tests of packet-level rules: reserved flags, ordering, per-packet validation, short
//! forms and the 3.1.1 mappings. Round trips and robustness are in `tests/it/codec_props.rs`,
//! real-client bytes in `tests/it/codec_fixtures.rs`.

use bytes::{Bytes, BytesMut};

use super::*;
use crate::session_api::SubscriptionOptions;
use crate::types::{ProtocolVersion, QoS, ReasonCode};

const V3: Option<ProtocolVersion> = Some(ProtocolVersion::V311);
const V5: Option<ProtocolVersion> = Some(ProtocolVersion::V5);

fn dec(raw: &[u8], v: Option<ProtocolVersion>) -> Result<Option<Packet>, DecodeError> {
    decode(&mut BytesMut::from(raw), v, MAX_PACKET_SIZE)
}

fn packet(raw: &[u8], v: Option<ProtocolVersion>) -> Packet {
    dec(raw, v).unwrap().unwrap()
}

fn malformed(raw: &[u8], v: Option<ProtocolVersion>) {
    match dec(raw, v) {
        Err(DecodeError::MalformedPacket(_)) => {}
        other => panic!("{raw:02x?}: expected malformed, got {other:?}"),
    }
}

fn protocol_error(raw: &[u8], v: Option<ProtocolVersion>) {
    match dec(raw, v) {
        Err(DecodeError::ProtocolError(_)) => {}
        other => panic!("{raw:02x?}: expected protocol error, got {other:?}"),
    }
}

fn enc(p: &Packet, v: ProtocolVersion) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode(p, v, &mut out).unwrap();
    assert_eq!(out.len(), encoded_len(p, v));
    out.to_vec()
}

fn enc_err(p: &Packet, v: ProtocolVersion) -> EncodeError {
    let mut out = BytesMut::new();
    let e = encode(p, v, &mut out).unwrap_err();
    assert!(out.is_empty(), "nothing may be written on error");
    e
}

/// A v3.1.1 CONNECT with client id "c" and the given flags.
fn connect_v3(flags: u8, payload_tail: &[u8]) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, flags, 0, 60, 0, 1, b'c'];
    body.extend_from_slice(payload_tail);
    let mut raw = vec![0x10, body.len() as u8];
    raw.extend(body);
    raw
}

#[test]
fn reserved_fixed_header_flags() {
    malformed(&[0x60, 0x02, 0x00, 0x01], V5); // PUBREL needs 0010
    protocol_error(&[0x62, 0x02, 0x00, 0x00], V5); // ...and a non-zero packet id
    assert_eq!(
        packet(&[0x62, 0x02, 0x00, 0x01], V5),
        Packet::PubRel(PubRel::new(1))
    );
    malformed(&[0x80, 0x06, 0, 1, 0, 1, b'a', 0], V5); // SUBSCRIBE needs 0010
    malformed(&[0xA0, 0x05, 0, 1, 0, 1, b'a'], V5); // UNSUBSCRIBE needs 0010
    malformed(&[0x41, 0x02, 0x00, 0x01], V5); // PUBACK needs 0000
    malformed(&[0xC1, 0x00], V5); // PINGREQ needs 0000
    malformed(&[0x36, 0x05, 0, 1, b'a', 0, 1], V5); // PUBLISH QoS 3
    malformed(&[0x38, 0x04, 0, 1, b'a', 0], V5); // QoS 0 with DUP
    malformed(&[0x38, 0x03, 0, 1, b'a'], V3);
    malformed(&[0x00, 0x00], V5); // type 0
}

#[test]
fn header_errors_need_no_body() {
    // The first byte alone is enough to reject these.
    malformed(&[0x36], V5);
    protocol_error(&[0xC0], None);
}

#[test]
fn connect_must_come_first_and_only_once() {
    protocol_error(&[0xC0, 0x00], None);
    protocol_error(&[0x30, 0x03, 0, 1, b'a'], None);
    let c = connect_v3(0x02, &[]);
    assert!(matches!(packet(&c, None), Packet::Connect(_)));
    protocol_error(&c, V3);
    protocol_error(&c, V5);
}

#[test]
fn auth_does_not_exist_in_v311() {
    malformed(&[0xF0, 0x00], V3);
    assert_eq!(
        packet(&[0xF0, 0x00], V5),
        Packet::Auth(Auth {
            reason_code: ReasonCode::SUCCESS,
            properties: Default::default()
        })
    );
    assert!(matches!(
        enc_err(&packet(&[0xF0, 0x00], V5), ProtocolVersion::V311),
        EncodeError::NotInV311(_)
    ));
}

#[test]
fn connect_flags() {
    malformed(&connect_v3(0x03, &[]), None); // reserved bit
    malformed(&connect_v3(0x08, &[]), None); // will QoS without will
    malformed(&connect_v3(0x20, &[]), None); // will retain without will
    malformed(&connect_v3(0x1C, &[0, 1, b't', 0, 0]), None); // will QoS 3
    malformed(&connect_v3(0x40, &[0, 1, b'p']), None); // 3.1.1 password without user name
    let c = connect_v3(
        0x2C | 0xC0,
        &[0, 1, b't', 0, 1, b'x', 0, 1, b'u', 0, 2, 1, 2],
    );
    let Packet::Connect(c) = packet(&c, None) else {
        panic!()
    };
    let will = c.will.unwrap();
    assert_eq!(
        (will.qos, will.retain, &will.payload[..]),
        (QoS::AtLeastOnce, true, &b"x"[..])
    );
    assert_eq!(
        (c.username.as_deref(), c.password.as_deref()),
        (Some("u"), Some(&[1u8, 2][..]))
    );
    // Truncated payload and trailing garbage.
    malformed(&connect_v3(0x80, &[0, 5, b'u']), None);
    malformed(&connect_v3(0x02, &[0xFF]), None);
}

#[test]
fn v5_password_without_user_name_is_fine() {
    let c = Packet::Connect(Connect {
        protocol: ProtocolVersion::V5,
        clean_start: true,
        keep_alive: 10,
        client_id: String::new(),
        will: None,
        username: None,
        password: Some(Bytes::from_static(b"token")),
        properties: Default::default(),
    });
    let raw = enc(&c, ProtocolVersion::V5);
    assert_eq!(packet(&raw, None), c);
    let Packet::Connect(mut c3) = c else {
        unreachable!()
    };
    c3.protocol = ProtocolVersion::V311;
    assert!(matches!(
        enc_err(&Packet::Connect(c3), ProtocolVersion::V311),
        EncodeError::InvalidPacket(_)
    ));
}

#[test]
fn protocol_name_and_level() {
    let mut raw = connect_v3(0x02, &[]);
    raw[8] = 5; // level 5 with a 3.1.1 body: no property length, so the client id is misread
    assert!(dec(&raw, None).is_err());
    raw[8] = 6;
    assert!(matches!(
        dec(&raw, None),
        Err(DecodeError::UnsupportedProtocolVersion(6))
    ));
    raw[8] = 3; // "MQTT" with level 3 is not a thing
    assert!(matches!(
        dec(&raw, None),
        Err(DecodeError::UnsupportedProtocolVersion(3))
    ));
    raw[4] = b'X';
    raw[8] = 4;
    malformed(&raw, None);
    let e = DecodeError::UnsupportedProtocolVersion(6);
    assert_eq!(e.reason_code(), ReasonCode::UNSUPPORTED_PROTOCOL_VERSION);
}

#[test]
fn error_reason_codes() {
    assert_eq!(
        DecodeError::MalformedPacket("x").reason_code(),
        ReasonCode(0x81)
    );
    assert_eq!(
        DecodeError::ProtocolError("x").reason_code(),
        ReasonCode(0x82)
    );
    assert_eq!(
        DecodeError::PacketTooLarge { size: 2, max: 1 }.reason_code(),
        ReasonCode(0x95)
    );
}

#[test]
fn publish_rules() {
    protocol_error(&[0x32, 0x05, 0, 1, b'a', 0, 0], V3); // packet id 0
                                                         // A property not allowed in PUBLISH (Session Expiry Interval) is malformed (§2.2.2.2),
                                                         // and so is a truncated property list.
    malformed(&[0x30, 0x09, 0, 1, b'a', 5, 0x11, 0, 0, 0, 1], V5);
    malformed(&[0x30, 0x05, 0, 1, b'a', 5, 0x11], V5);
    // A v5 PUBLISH without property length is malformed.
    malformed(&[0x30, 0x03, 0, 1, b'a'], V5);
    let Packet::Publish(p) = packet(&[0x3B, 0x07, 0, 1, b'a', 0, 9, b'h', b'i'], V3) else {
        panic!()
    };
    assert_eq!(
        (p.dup, p.qos, p.retain, p.packet_id),
        (true, QoS::AtLeastOnce, true, Some(9))
    );
    assert_eq!(&p.payload[..], b"hi");
}

#[test]
fn publish_payload_is_zero_copy() {
    let raw = [
        0x30, 0x0A, 0, 1, b'a', 0, b'p', b'a', b'y', b'l', b'o', b'd',
    ];
    let mut buf = BytesMut::from(&raw[..]);
    let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
    let Some(Packet::Publish(p)) = decode(&mut buf, V5, 1024).unwrap() else {
        panic!()
    };
    assert_eq!(&p.payload[..], b"paylod");
    assert!(
        range.contains(&(p.payload.as_ptr() as usize)),
        "payload was copied"
    );
}

#[test]
fn publish_encode_rules() {
    let mut p = Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "t".into(),
        packet_id: None,
        properties: Default::default(),
        payload: Bytes::new(),
    };
    let e = enc_err(&Packet::Publish(p.clone()), ProtocolVersion::V5);
    assert!(matches!(e, EncodeError::InvalidPacket(_)));
    p.packet_id = Some(0);
    assert!(matches!(
        enc_err(&Packet::Publish(p.clone()), ProtocolVersion::V5),
        EncodeError::InvalidPacket(_)
    ));
    p.qos = QoS::AtMostOnce;
    p.packet_id = None;
    p.dup = true;
    assert!(matches!(
        enc_err(&Packet::Publish(p.clone()), ProtocolVersion::V5),
        EncodeError::InvalidPacket(_)
    ));
    p.dup = false;
    p.topic = "x".repeat(70_000);
    assert!(matches!(
        enc_err(&Packet::Publish(p.clone()), ProtocolVersion::V5),
        EncodeError::StringTooLong { len: 70_000 }
    ));
    p.topic = "a\0".into();
    assert!(matches!(
        enc_err(&Packet::Publish(p.clone()), ProtocolVersion::V5),
        EncodeError::NulInString
    ));
    p.topic = "t".into();
    p.properties.subscription_identifiers = vec![MAX_VAR_INT + 1];
    assert!(matches!(
        enc_err(&Packet::Publish(p.clone()), ProtocolVersion::V5),
        EncodeError::VarIntTooLarge(_)
    ));
    // v5 properties are silently left out in 3.1.1.
    assert_eq!(
        enc(&Packet::Publish(p), ProtocolVersion::V311),
        vec![0x30, 0x03, 0, 1, b't']
    );
}

#[test]
fn ack_forms() {
    let v5 = ProtocolVersion::V5;
    assert_eq!(
        enc(&Packet::PubAck(PubAck::new(1)), v5),
        vec![0x40, 2, 0, 1]
    );
    let mut a = PubAck::new(1);
    a.reason_code = ReasonCode::NO_MATCHING_SUBSCRIBERS;
    assert_eq!(
        enc(&Packet::PubAck(a.clone()), v5),
        vec![0x40, 3, 0, 1, 0x10]
    );
    a.properties.reason_string = Some("r".into());
    let raw = enc(&Packet::PubAck(a.clone()), v5);
    assert_eq!(raw, vec![0x40, 8, 0, 1, 0x10, 4, 0x1F, 0, 1, b'r']);
    assert_eq!(packet(&raw, V5), Packet::PubAck(a.clone()));
    // Success with properties still carries the reason byte.
    a.reason_code = ReasonCode::SUCCESS;
    assert_eq!(enc(&Packet::PubAck(a.clone()), v5)[..5], [0x40, 8, 0, 1, 0]);
    // 3.1.1 drops reason and properties.
    assert_eq!(
        enc(&Packet::PubAck(a), ProtocolVersion::V311),
        vec![0x40, 2, 0, 1]
    );
    // Decoding: short forms, invalid reason codes, trailing bytes in 3.1.1.
    assert_eq!(packet(&[0x50, 2, 0, 7], V5), Packet::PubRec(PubRec::new(7)));
    let Packet::PubComp(c) = packet(&[0x70, 3, 0, 7, 0x92], V5) else {
        panic!()
    };
    assert_eq!(c.reason_code, ReasonCode::PACKET_IDENTIFIER_NOT_FOUND);
    protocol_error(&[0x70, 3, 0, 7, 0x10], V5);
    protocol_error(&[0x40, 3, 0, 7, 0x92], V5);
    malformed(&[0x40, 3, 0, 7, 0x00], V3);
    malformed(&[0x40, 1, 0], V5);
    let mut bad = PubRel::new(1);
    bad.reason_code = ReasonCode::UNSPECIFIED_ERROR;
    assert!(matches!(
        enc_err(&Packet::PubRel(bad), v5),
        EncodeError::InvalidPacket(_)
    ));
}

#[test]
fn subscribe_rules() {
    protocol_error(&[0x82, 0x02, 0, 1], V3); // no filters
    protocol_error(&[0x82, 0x03, 0, 1, 0], V5);
    malformed(&[0x82, 0x06, 0, 1, 0, 1, b'a', 0x04], V3); // v5 option bits in 3.1.1
    malformed(&[0x82, 0x07, 0, 1, 0, 0, 1, b'a', 0x40], V5); // reserved bits
                                                             // Maximum QoS 3: a Protocol Error in v5 (§3.8.3.1), malformed in 3.1.1 (§3.8.3.1 of 3.1.1).
    protocol_error(&[0x82, 0x07, 0, 1, 0, 0, 1, b'a', 0x03], V5);
    malformed(&[0x82, 0x06, 0, 1, 0, 1, b'a', 0x03], V3);
    // Session Expiry Interval is not a SUBSCRIBE or UNSUBSCRIBE property: malformed (§2.2.2.2).
    malformed(
        &[0x82, 0x0C, 0, 1, 5, 0x11, 0, 0, 0, 9, 0, 1, b'a', 0x01],
        V5,
    );
    malformed(&[0xA2, 0x0B, 0, 1, 5, 0x11, 0, 0, 0, 9, 0, 1, b'a'], V5);
    protocol_error(&[0x82, 0x07, 0, 1, 0, 0, 1, b'a', 0x30], V5); // retain handling 3
    malformed(&[0x82, 0x06, 0, 1, 0, 0, 1, b'a'], V5); // options byte missing
    let Packet::Subscribe(s) = packet(&[0x82, 0x07, 0, 1, 0, 0, 1, b'a', 0x2E], V5) else {
        panic!()
    };
    assert_eq!(
        s.filters[0].1,
        SubscriptionOptions {
            qos: QoS::ExactlyOnce,
            no_local: true,
            retain_as_published: true,
            retain_handling: 2
        }
    );
    // Subscription identifier 0 and twice.
    protocol_error(&[0x82, 0x09, 0, 1, 2, 0x0B, 0, 0, 1, b'a', 0], V5);
    protocol_error(&[0x82, 0x0B, 0, 1, 4, 0x0B, 1, 0x0B, 2, 0, 1, b'a', 0], V5);
    let empty = Subscribe {
        packet_id: 1,
        filters: vec![],
        properties: Default::default(),
    };
    assert!(matches!(
        enc_err(&Packet::Subscribe(empty), ProtocolVersion::V5),
        EncodeError::InvalidPacket(_)
    ));
}

#[test]
fn suback_and_unsuback_in_both_versions() {
    let ack = SubAck {
        packet_id: 3,
        reason_codes: vec![ReasonCode::GRANTED_QOS_1, ReasonCode::QUOTA_EXCEEDED],
        properties: Default::default(),
    };
    assert_eq!(
        enc(&Packet::SubAck(ack.clone()), ProtocolVersion::V311),
        vec![0x90, 4, 0, 3, 1, 0x80]
    );
    assert_eq!(
        enc(&Packet::SubAck(ack), ProtocolVersion::V5),
        vec![0x90, 5, 0, 3, 0, 1, 0x97]
    );
    protocol_error(&[0x90, 3, 0, 3, 0x97], V3);
    protocol_error(&[0x90, 2, 0, 3], V3);
    protocol_error(&[0xA2, 0x02, 0, 1], V3);
    let un = UnsubAck {
        packet_id: 3,
        reason_codes: vec![ReasonCode::SUCCESS],
        properties: Default::default(),
    };
    assert_eq!(
        enc(&Packet::UnsubAck(un.clone()), ProtocolVersion::V311),
        vec![0xB0, 2, 0, 3]
    );
    assert_eq!(
        enc(&Packet::UnsubAck(un.clone()), ProtocolVersion::V5),
        vec![0xB0, 4, 0, 3, 0, 0]
    );
    assert_eq!(packet(&[0xB0, 4, 0, 3, 0, 0], V5), Packet::UnsubAck(un));
    malformed(&[0xB0, 3, 0, 3, 0], V3);
    protocol_error(&[0xB0, 3, 0, 3, 0], V5);
}

#[test]
fn connack_v311_mapping() {
    let mk = |rc| {
        Packet::ConnAck(ConnAck {
            session_present: false,
            reason_code: rc,
            properties: Default::default(),
        })
    };
    let v3 = ProtocolVersion::V311;
    assert_eq!(enc(&mk(ReasonCode::BANNED), v3), vec![0x20, 2, 0, 5]);
    assert_eq!(enc(&mk(ReasonCode::SERVER_BUSY), v3), vec![0x20, 2, 0, 3]);
    assert_eq!(
        enc(&mk(ReasonCode::BAD_AUTHENTICATION_METHOD), v3),
        vec![0x20, 2, 0, 4]
    );
    assert_eq!(
        packet(&[0x20, 2, 0, 2], V3),
        mk(ReasonCode::CLIENT_IDENTIFIER_NOT_VALID)
    );
    assert_eq!(
        packet(&[0x20, 2, 1, 0], V3),
        Packet::ConnAck(ConnAck {
            session_present: true,
            reason_code: ReasonCode::SUCCESS,
            properties: Default::default(),
        })
    );
    malformed(&[0x20, 2, 0, 6], V3);
    malformed(&[0x20, 2, 2, 0], V3); // reserved acknowledge flags
    malformed(&[0x20, 2, 0, 0], V5); // v5 needs the property length
    protocol_error(&[0x20, 3, 0, 0x04, 0], V5); // 0x04 is not a CONNACK reason
}

#[test]
fn disconnect_and_auth_forms() {
    let v5 = ProtocolVersion::V5;
    assert_eq!(
        enc(&Packet::Disconnect(Disconnect::normal()), v5),
        vec![0xE0, 0]
    );
    let d = Disconnect::with_reason(ReasonCode::SESSION_TAKEN_OVER);
    // Reason code plus an empty property length (rumqttc cannot read the 1-byte form).
    assert_eq!(
        enc(&Packet::Disconnect(d.clone()), v5),
        vec![0xE0, 2, 0x8E, 0]
    );
    assert_eq!(packet(&[0xE0, 1, 0x8E], V5), Packet::Disconnect(d.clone()));
    assert_eq!(
        enc(&Packet::Disconnect(d), ProtocolVersion::V311),
        vec![0xE0, 0]
    );
    assert_eq!(
        packet(&[0xE0, 0], V5),
        Packet::Disconnect(Disconnect::normal())
    );
    assert_eq!(
        packet(&[0xE0, 2, 0, 0], V5),
        Packet::Disconnect(Disconnect::normal())
    );
    malformed(&[0xE0, 1, 0], V3);
    protocol_error(&[0xE0, 1, 0x18], V5);
    let a = packet(&[0xF0, 1, 0x18], V5);
    assert_eq!(enc(&a, v5), vec![0xF0, 2, 0x18, 0]);
    protocol_error(&[0xF0, 1, 0x04], V5);
    // Session Expiry Interval is allowed in DISCONNECT, Authentication Method is not (malformed).
    assert!(dec(&[0xE0, 7, 0, 5, 0x11, 0, 0, 0, 9], V5).is_ok());
    malformed(&[0xE0, 6, 0, 4, 0x15, 0, 1, b'm'], V5);
}

#[test]
fn ping_has_no_body() {
    assert_eq!(packet(&[0xC0, 0], V3), Packet::PingReq);
    assert_eq!(packet(&[0xD0, 0], V5), Packet::PingResp);
    malformed(&[0xC0, 1, 0], V5);
    assert_eq!(enc(&Packet::PingReq, ProtocolVersion::V311), vec![0xC0, 0]);
}

#[test]
fn incomplete_input_consumes_nothing_and_reserves() {
    let mut buf = BytesMut::from(&[0x30u8, 0x80][..]);
    assert!(decode(&mut buf, V5, 1 << 20).unwrap().is_none());
    assert_eq!(buf.len(), 2);
    buf.extend_from_slice(&[0x01]); // remaining length 128
    assert!(decode(&mut buf, V5, 1 << 20).unwrap().is_none());
    assert!(
        buf.capacity() >= 131,
        "room for the whole packet is reserved"
    );
    malformed(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01], V5);
    malformed(&[0x30, 0x80, 0x00], V5); // non-minimal remaining length
}

#[test]
fn packet_too_large_before_the_body() {
    let mut buf = BytesMut::from(&[0x30u8, 0xFF, 0xFF, 0x03][..]);
    match decode(&mut buf, V5, 1000) {
        Err(DecodeError::PacketTooLarge { size, max }) => {
            assert_eq!((size, max), (65_535 + 4, 1000))
        }
        other => panic!("{other:?}"),
    }
    // Exactly at the limit is fine.
    assert!(matches!(dec(&[0xC0, 0], V5), Ok(Some(Packet::PingReq))));
    assert!(decode(&mut BytesMut::from(&[0xC0u8, 0][..]), V5, 2)
        .unwrap()
        .is_some());
    assert!(decode(&mut BytesMut::from(&[0xC0u8, 0][..]), V5, 1).is_err());
}

#[test]
fn tokio_codec_tracks_the_version() {
    use tokio_util::codec::{Decoder, Encoder};
    let mut server = MqttCodec::new(1024);
    let mut buf = BytesMut::from(&connect_v3(0x02, &[])[..]);
    buf.extend_from_slice(&[0xC0, 0]);
    assert!(matches!(
        server.decode(&mut buf).unwrap(),
        Some(Packet::Connect(_))
    ));
    assert_eq!(server.version, Some(ProtocolVersion::V311));
    assert_eq!(server.decode(&mut buf).unwrap(), Some(Packet::PingReq));
    let mut out = BytesMut::new();
    server.encode(&Packet::PingResp, &mut out).unwrap();
    assert_eq!(&out[..], &[0xD0, 0]);
    let mut fresh = MqttCodec::default();
    assert!(matches!(
        fresh.encode(Packet::PingResp, &mut out),
        Err(EncodeError::NoProtocolVersion)
    ));
}

/// MQTT 3.1 (protocol level 3) has no Session Present flag: the first CONNACK byte is
/// reserved and 0 (MQTT 3.1 §3.2), whatever the server resumed. 3.1.1 sets it.
#[test]
fn mqtt31_connack_has_no_session_present() {
    use tokio_util::codec::{Decoder, Encoder};
    let connack = Packet::ConnAck(ConnAck {
        session_present: true,
        reason_code: ReasonCode::SUCCESS,
        properties: Default::default(),
    });
    // "MQIsdp", level 3, clean session 0, keep alive 0, client id "c".
    let v31 = [
        0x10, 15, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x00, 0, 0, 0, 1, b'c',
    ];
    let mut server = MqttCodec::new(1024);
    let mut buf = BytesMut::from(&v31[..]);
    assert!(matches!(
        server.decode(&mut buf),
        Ok(Some(Packet::Connect(_)))
    ));
    let mut out = BytesMut::new();
    server.encode(&connack, &mut out).unwrap();
    assert_eq!(&out[..], &[0x20, 2, 0x00, 0x00]);

    let mut server = MqttCodec::new(1024);
    let mut buf = BytesMut::from(&connect_v3(0x00, &[])[..]);
    assert!(matches!(
        server.decode(&mut buf),
        Ok(Some(Packet::Connect(_)))
    ));
    let mut out = BytesMut::new();
    server.encode(&connack, &mut out).unwrap();
    assert_eq!(&out[..], &[0x20, 2, 0x01, 0x00]);
}

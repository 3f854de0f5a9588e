//! Property tests of the codec: round trips of every packet type in both versions, exact
//! `encoded_len`, robustness against random and mutated input, incremental feeding and the
//! early Packet Too Large check.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use proptest::strategy::Union;
use tiermq_common::codec::*;
use tiermq_common::session_api::SubscriptionOptions;
use tiermq_common::{ProtocolVersion, QoS, ReasonCode};

const V311: ProtocolVersion = ProtocolVersion::V311;
const V5: ProtocolVersion = ProtocolVersion::V5;

fn string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9/+#$]{0,12}",
        // Multi-byte UTF-8 and control characters other than U+0000 are valid strings.
        "[a-zé€😀\u{1}\u{7f} ]{0,8}",
    ]
}

fn bin() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..40).prop_map(Bytes::from)
}

fn user_props() -> impl Strategy<Value = Vec<(String, String)>> {
    proptest::collection::vec((string(), string()), 0..3)
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn one_of(codes: &'static [u8]) -> impl Strategy<Value = ReasonCode> {
    proptest::sample::select(codes).prop_map(ReasonCode)
}

fn sub_id() -> impl Strategy<Value = u32> {
    prop_oneof![1u32..200, 1u32..=MAX_VAR_INT]
}

fn opt<T: std::fmt::Debug>(s: impl Strategy<Value = T>) -> impl Strategy<Value = Option<T>> {
    proptest::option::of(s)
}

fn non_zero_u16() -> impl Strategy<Value = u16> {
    1u16..=u16::MAX
}

fn connect_props() -> impl Strategy<Value = ConnectProperties> {
    (
        opt(any::<u32>()),
        opt(non_zero_u16()),
        opt(1u32..),
        opt(any::<u16>()),
        opt(any::<bool>()),
        opt(any::<bool>()),
        user_props(),
        opt(string()),
        opt(bin()),
    )
        .prop_map(|(a, b, c, d, e, f, g, h, i)| ConnectProperties {
            session_expiry_interval: a,
            receive_maximum: b,
            maximum_packet_size: c,
            topic_alias_maximum: d,
            request_response_information: e,
            request_problem_information: f,
            user_properties: g,
            authentication_method: h,
            authentication_data: i,
        })
}

fn will_props() -> impl Strategy<Value = WillProperties> {
    (
        opt(any::<u32>()),
        opt(0u8..=1),
        opt(any::<u32>()),
        opt(string()),
        opt(string()),
        opt(bin()),
        user_props(),
    )
        .prop_map(|(a, b, c, d, e, f, g)| WillProperties {
            will_delay_interval: a,
            payload_format_indicator: b,
            message_expiry_interval: c,
            content_type: d,
            response_topic: e,
            correlation_data: f,
            user_properties: g,
        })
}

fn connect(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let will = (string(), bin(), qos(), any::<bool>(), will_props()).prop_map(
        move |(topic, payload, qos, retain, properties)| LastWill {
            topic,
            payload,
            qos,
            retain,
            properties: if v.is_v5() {
                properties
            } else {
                Default::default()
            },
        },
    );
    (
        any::<bool>(),
        any::<u16>(),
        string(),
        opt(will),
        opt(string()),
        opt(bin()),
        connect_props(),
    )
        .prop_map(
            move |(clean_start, keep_alive, client_id, will, mut username, password, props)| {
                if !v.is_v5() && password.is_some() && username.is_none() {
                    username = Some("user".into());
                }
                Packet::Connect(Connect {
                    protocol: v,
                    clean_start,
                    keep_alive,
                    client_id,
                    will,
                    username,
                    password,
                    properties: if v.is_v5() { props } else { Default::default() },
                })
            },
        )
}

fn connack_props() -> impl Strategy<Value = ConnAckProperties> {
    (
        (
            opt(any::<u32>()),
            opt(non_zero_u16()),
            opt(prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce)]),
            opt(any::<bool>()),
            opt(1u32..),
            opt(string()),
            opt(any::<u16>()),
            opt(string()),
            user_props(),
        ),
        (
            opt(any::<bool>()),
            opt(any::<bool>()),
            opt(any::<bool>()),
            opt(any::<u16>()),
            opt(string()),
            opt(string()),
            opt(string()),
            opt(bin()),
        ),
    )
        .prop_map(|((a, b, c, d, e, f, g, h, i), (j, k, l, m, n, o, p, q))| {
            ConnAckProperties {
                session_expiry_interval: a,
                receive_maximum: b,
                maximum_qos: c,
                retain_available: d,
                maximum_packet_size: e,
                assigned_client_identifier: f,
                topic_alias_maximum: g,
                reason_string: h,
                user_properties: i,
                wildcard_subscription_available: j,
                subscription_identifiers_available: k,
                shared_subscription_available: l,
                server_keep_alive: m,
                response_information: n,
                server_reference: o,
                authentication_method: p,
                authentication_data: q,
            }
        })
}

const CONNACK_V5: &[u8] = &[
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97,
    0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
];
const CONNACK_V311: &[u8] = &[0x00, 0x84, 0x85, 0x88, 0x86, 0x87];
const PUBACK_V5: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
const PUBREL_V5: &[u8] = &[0x00, 0x92];
const SUBACK_V5: &[u8] = &[
    0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
];
const SUBACK_V311: &[u8] = &[0x00, 0x01, 0x02, 0x80];
const UNSUBACK_V5: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];
const DISCONNECT_V5: &[u8] = &[
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95,
    0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
];
const AUTH_V5: &[u8] = &[0x00, 0x18, 0x19];
const SUCCESS: &[u8] = &[0x00];

fn connack(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let codes = if v.is_v5() { CONNACK_V5 } else { CONNACK_V311 };
    (any::<bool>(), one_of(codes), connack_props()).prop_map(move |(sp, rc, props)| {
        Packet::ConnAck(ConnAck {
            session_present: sp,
            reason_code: rc,
            properties: if v.is_v5() { props } else { Default::default() },
        })
    })
}

fn ack_props(v: ProtocolVersion) -> impl Strategy<Value = AckProperties> {
    (opt(string()), user_props()).prop_map(move |(reason_string, user_properties)| {
        if v.is_v5() {
            AckProperties {
                reason_string,
                user_properties,
            }
        } else {
            AckProperties::default()
        }
    })
}

fn publish(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let props = (
        opt(0u8..=1),
        opt(any::<u32>()),
        opt(any::<u16>()),
        opt(string()),
        opt(bin()),
        user_props(),
        proptest::collection::vec(sub_id(), 0..3),
        opt(string()),
    )
        .prop_map(|(a, b, c, d, e, f, g, h)| PublishProperties {
            payload_format_indicator: a,
            message_expiry_interval: b,
            topic_alias: c,
            response_topic: d,
            correlation_data: e,
            user_properties: f,
            subscription_identifiers: g,
            content_type: h,
        });
    (
        qos(),
        any::<bool>(),
        any::<bool>(),
        string(),
        non_zero_u16(),
        props,
        bin(),
    )
        .prop_map(move |(qos, dup, retain, topic, id, props, payload)| {
            let qos0 = qos == QoS::AtMostOnce;
            Packet::Publish(Publish {
                dup: dup && !qos0,
                qos,
                retain,
                topic,
                packet_id: if qos0 { None } else { Some(id) },
                properties: if v.is_v5() { props } else { Default::default() },
                payload,
            })
        })
}

fn acks(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let (puback, pubrel) = if v.is_v5() {
        (PUBACK_V5, PUBREL_V5)
    } else {
        (SUCCESS, SUCCESS)
    };
    (
        0..4u8,
        non_zero_u16(),
        one_of(puback),
        one_of(pubrel),
        ack_props(v),
    )
        .prop_map(|(kind, packet_id, ack_rc, rel_rc, properties)| match kind {
            0 => Packet::PubAck(PubAck {
                packet_id,
                reason_code: ack_rc,
                properties,
            }),
            1 => Packet::PubRec(PubRec {
                packet_id,
                reason_code: ack_rc,
                properties,
            }),
            2 => Packet::PubRel(PubRel {
                packet_id,
                reason_code: rel_rc,
                properties,
            }),
            _ => Packet::PubComp(PubComp {
                packet_id,
                reason_code: rel_rc,
                properties,
            }),
        })
}

fn sub_options(v: ProtocolVersion) -> impl Strategy<Value = SubscriptionOptions> {
    (qos(), any::<bool>(), any::<bool>(), 0u8..=2).prop_map(move |(qos, nl, rap, rh)| {
        if v.is_v5() {
            SubscriptionOptions {
                qos,
                no_local: nl,
                retain_as_published: rap,
                retain_handling: rh,
            }
        } else {
            SubscriptionOptions {
                qos,
                ..Default::default()
            }
        }
    })
}

fn subscribe(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let filters = proptest::collection::vec((string(), sub_options(v)), 1..4);
    (non_zero_u16(), filters, opt(sub_id()), user_props()).prop_map(
        move |(packet_id, filters, sid, user_properties)| {
            let properties = if v.is_v5() {
                SubscribeProperties {
                    subscription_identifier: sid,
                    user_properties,
                }
            } else {
                Default::default()
            };
            Packet::Subscribe(Subscribe {
                packet_id,
                filters,
                properties,
            })
        },
    )
}

fn suback(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let codes = if v.is_v5() { SUBACK_V5 } else { SUBACK_V311 };
    (
        non_zero_u16(),
        proptest::collection::vec(one_of(codes), 1..5),
        ack_props(v),
    )
        .prop_map(|(packet_id, reason_codes, properties)| {
            Packet::SubAck(SubAck {
                packet_id,
                reason_codes,
                properties,
            })
        })
}

fn unsubscribe(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
    (
        non_zero_u16(),
        proptest::collection::vec(string(), 1..4),
        user_props(),
    )
        .prop_map(move |(packet_id, filters, user_properties)| {
            let properties = if v.is_v5() {
                UnsubscribeProperties { user_properties }
            } else {
                Default::default()
            };
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                filters,
                properties,
            })
        })
}

fn unsuback(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let n = if v.is_v5() { 1..5 } else { 0..1 };
    (
        non_zero_u16(),
        proptest::collection::vec(one_of(UNSUBACK_V5), n),
        ack_props(v),
    )
        .prop_map(|(packet_id, reason_codes, properties)| {
            Packet::UnsubAck(UnsubAck {
                packet_id,
                reason_codes,
                properties,
            })
        })
}

fn disconnect(v: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let props = (
        opt(any::<u32>()),
        opt(string()),
        user_props(),
        opt(string()),
    )
        .prop_map(|(a, b, c, d)| DisconnectProperties {
            session_expiry_interval: a,
            reason_string: b,
            user_properties: c,
            server_reference: d,
        });
    let codes = if v.is_v5() { DISCONNECT_V5 } else { SUCCESS };
    (one_of(codes), props).prop_map(move |(reason_code, props)| {
        Packet::Disconnect(Disconnect {
            reason_code,
            properties: if v.is_v5() { props } else { Default::default() },
        })
    })
}

fn auth() -> impl Strategy<Value = Packet> {
    let props =
        (opt(string()), opt(bin()), opt(string()), user_props()).prop_map(|(a, b, c, d)| {
            AuthProperties {
                authentication_method: a,
                authentication_data: b,
                reason_string: c,
                user_properties: d,
            }
        });
    (one_of(AUTH_V5), props).prop_map(|(reason_code, properties)| {
        Packet::Auth(Auth {
            reason_code,
            properties,
        })
    })
}

/// Any packet valid in `v`.
fn packet(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    let mut all = vec![
        connect(v).boxed(),
        connack(v).boxed(),
        publish(v).boxed(),
        publish(v).boxed(),
        acks(v).boxed(),
        subscribe(v).boxed(),
        suback(v).boxed(),
        unsubscribe(v).boxed(),
        unsuback(v).boxed(),
        Just(Packet::PingReq).boxed(),
        Just(Packet::PingResp).boxed(),
        disconnect(v).boxed(),
    ];
    if v.is_v5() {
        all.push(auth().boxed());
    }
    Union::new(all).boxed()
}

fn versioned_packet() -> impl Strategy<Value = (ProtocolVersion, Packet)> {
    prop_oneof![
        packet(V311).prop_map(|p| (V311, p)),
        packet(V5).prop_map(|p| (V5, p))
    ]
}

/// The version a receiver passes to `decode` for this packet.
fn decode_version(p: &Packet, v: ProtocolVersion) -> Option<ProtocolVersion> {
    match p {
        Packet::Connect(_) => None,
        _ => Some(v),
    }
}

fn encoded(p: &Packet, v: ProtocolVersion) -> BytesMut {
    let mut out = BytesMut::new();
    encode(p, v, &mut out).unwrap_or_else(|e| panic!("encode {p:?}: {e}"));
    out
}

/// Decodes until the buffer is exhausted, needs more, or fails; must never panic.
fn drain(mut buf: BytesMut, mut version: Option<ProtocolVersion>) {
    for _ in 0..64 {
        match decode(&mut buf, version, 4096) {
            Ok(Some(Packet::Connect(c))) => version = Some(c.protocol),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn round_trip((v, p) in versioned_packet()) {
        let mut buf = encoded(&p, v);
        prop_assert_eq!(buf.len(), encoded_len(&p, v));
        let back = decode(&mut buf, decode_version(&p, v), MAX_PACKET_SIZE).unwrap();
        prop_assert_eq!(back, Some(p));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn round_trip_through_tokio_codec((v, p) in versioned_packet()) {
        use tokio_util::codec::{Decoder, Encoder};
        let mut tx = MqttCodec { version: Some(v), ..MqttCodec::new(MAX_PACKET_SIZE) };
        let mut rx = MqttCodec { version: decode_version(&p, v), ..tx };
        let mut buf = BytesMut::new();
        tx.encode(&p, &mut buf).unwrap();
        tx.encode(p.clone(), &mut buf).unwrap();
        let first = rx.decode(&mut buf).unwrap();
        prop_assert_eq!(first.as_ref(), Some(&p));
        prop_assert_eq!(rx.version, Some(v));
        if !matches!(p, Packet::Connect(_)) {
            prop_assert_eq!(rx.decode(&mut buf).unwrap(), Some(p));
            prop_assert!(buf.is_empty());
        }
    }

    #[test]
    fn byte_by_byte_is_none_until_the_last_byte((v, p) in versioned_packet()) {
        let full = encoded(&p, v);
        let version = decode_version(&p, v);
        let mut buf = BytesMut::new();
        for (i, &b) in full.iter().enumerate() {
            buf.extend_from_slice(&[b]);
            let got = decode(&mut buf, version, MAX_PACKET_SIZE).unwrap();
            if i + 1 < full.len() {
                prop_assert!(got.is_none(), "complete after {} of {} bytes", i + 1, full.len());
                prop_assert_eq!(buf.len(), i + 1);
            } else {
                prop_assert_eq!(got, Some(p.clone()));
            }
        }
    }

    #[test]
    fn oversize_is_refused_after_the_header_only((v, p) in versioned_packet(), cut in 1usize..16) {
        let full = encoded(&p, v);
        let header = 1 + (1..=4).find(|&n| full[n] & 0x80 == 0).unwrap();
        let max = full.len().saturating_sub(cut) as u32;
        let mut buf = BytesMut::from(&full[..header]);
        match decode(&mut buf, decode_version(&p, v), max) {
            Err(DecodeError::PacketTooLarge { size, max: m }) => {
                prop_assert_eq!(size as usize, full.len());
                prop_assert_eq!(m, max);
            }
            other => prop_assert!(false, "{:?}", other),
        }
    }

    #[test]
    fn declared_oversize_remaining_length(rl in 0u32..=MAX_VAR_INT, max in 0u32..1_000_000) {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[0x30]);
        let mut n = rl;
        loop {
            let mut b = (n & 0x7F) as u8;
            n >>= 7;
            if n > 0 { b |= 0x80; }
            buf.extend_from_slice(&[b]);
            if n == 0 { break; }
        }
        let total = buf.len() as u64 + rl as u64;
        let res = decode(&mut buf, Some(V5), max);
        if total > max as u64 {
            prop_assert!(
                matches!(res, Err(DecodeError::PacketTooLarge { .. })),
                "{:?}", res
            );
        } else {
            prop_assert!(matches!(res, Ok(None) | Ok(Some(_)) | Err(_)));
        }
    }

    #[test]
    fn random_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        version in proptest::sample::select(vec![None, Some(V311), Some(V5)]),
    ) {
        drain(BytesMut::from(&bytes[..]), version);
    }

    #[test]
    fn random_bodies_behind_valid_headers_never_panic(
        first in any::<u8>(),
        body in proptest::collection::vec(any::<u8>(), 0..120),
        version in proptest::sample::select(vec![None, Some(V311), Some(V5)]),
    ) {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[first, body.len() as u8]);
        buf.extend_from_slice(&body);
        drain(buf, version);
    }

    #[test]
    fn mutated_encodings_never_panic(
        (v, p) in versioned_packet(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..6),
    ) {
        let mut bytes = encoded(&p, v).to_vec();
        for (at, byte, op) in edits {
            if bytes.is_empty() { break; }
            let i = at.index(bytes.len());
            match op {
                0 => bytes[i] = byte,
                1 => { bytes.remove(i); }
                _ => bytes.insert(i, byte),
            }
        }
        drain(BytesMut::from(&bytes[..]), decode_version(&p, v));
    }
}

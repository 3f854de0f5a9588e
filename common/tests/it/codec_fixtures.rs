//! Byte-exact fixtures captured from real clients (mosquitto 2.0.11 `mosquitto_pub` /
//! `mosquitto_sub`) talking to a real mosquitto 2.0.11 through a recording loopback proxy
//! (`common/tests/fixtures/capture_proxy.py`). Each `.hex` file holds one packet per line,
//! `c2s` or `s2c`.
//!
//! Every packet must decode, and re-encode to the same bytes unless listed in
//! [`NOT_CANONICAL`] (with the reason).

use bytes::{Bytes, BytesMut};
use tiermq_common::codec::*;
use tiermq_common::session_api::SubscriptionOptions;
use tiermq_common::{ProtocolVersion, QoS, ReasonCode};

const FIXTURES: &[&str] = &[
    "v311_pub_qos0",
    "v311_pub_qos1_retain_will_auth",
    "v311_pub_qos2",
    "v311_sub_qos2",
    "v311_unsub",
    "v31_pub",
    "v5_ping",
    "v5_pub_alias",
    "v5_pub_qos1_props",
    "v5_pub_qos2_retain_will",
    "v5_sub_qos2_subid",
    "v5_unsub",
];

/// (fixture, line index among packets): packets whose client encoding is not the one we
/// produce, and why.
const NOT_CANONICAL: &[(&str, usize, &str)] = &[
    // MQTT 3.1 CONNECT ("MQIsdp", level 3) is decoded as 3.1.1 and re-encoded as "MQTT"/4.
    ("v31_pub", 0, "MQTT 3.1 protocol name"),
    // mosquitto sends DISCONNECT 0x04 as the reason code alone; we add an empty property
    // length, which every client can read.
    ("v5_ping", 6, "DISCONNECT property length"),
    // mosquitto writes properties in command-line order; we write them in identifier order.
    ("v5_pub_qos1_props", 0, "CONNECT property order"),
    ("v5_pub_qos1_props", 2, "PUBLISH property order"),
    ("v5_pub_qos2_retain_will", 0, "will property order"),
    (
        "v5_pub_alias",
        0,
        "CONNECT property order (user-given before library default)",
    ),
    // The mosquitto broker's CONNACK lists Topic Alias Maximum (0x22) before Receive Maximum
    // (0x21); `v5_*` matches every v5 fixture.
    ("v5_*", 1, "CONNACK property order"),
];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Dir {
    C2S,
    S2C,
}

fn load(name: &str) -> Vec<(Dir, Bytes)> {
    let path = format!("{}/tests/fixtures/{name}.hex", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (dir, hex) = l.split_once(' ').expect("direction and hex");
            let dir = match dir {
                "c2s" => Dir::C2S,
                "s2c" => Dir::S2C,
                d => panic!("bad direction {d}"),
            };
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect::<Vec<u8>>();
            (dir, Bytes::from(bytes))
        })
        .collect()
}

/// Decodes every packet of a fixture as the server (c2s) and the client (s2c) would.
fn decode_fixture(name: &str) -> (ProtocolVersion, Vec<(Dir, Bytes, Packet)>) {
    let mut version = None;
    let mut out = Vec::new();
    for (i, (dir, raw)) in load(name).into_iter().enumerate() {
        let mut buf = BytesMut::from(&raw[..]);
        let packet = decode(&mut buf, version, MAX_PACKET_SIZE)
            .unwrap_or_else(|e| panic!("{name}[{i}] {dir:?}: {e}"))
            .unwrap_or_else(|| panic!("{name}[{i}]: incomplete"));
        assert!(buf.is_empty(), "{name}[{i}]: bytes left over");
        if let Packet::Connect(c) = &packet {
            version = Some(c.protocol);
        }
        out.push((dir, raw, packet));
    }
    (version.expect("fixture starts with CONNECT"), out)
}

#[test]
fn every_fixture_decodes_and_reencodes() {
    for name in FIXTURES {
        let (version, packets) = decode_fixture(name);
        for (i, (_, raw, packet)) in packets.iter().enumerate() {
            let mut out = BytesMut::new();
            encode(packet, version, &mut out).unwrap_or_else(|e| panic!("{name}[{i}]: {e}"));
            assert_eq!(encoded_len(packet, version), out.len(), "{name}[{i}]");
            let exempt = NOT_CANONICAL.iter().any(|(n, j, _)| {
                (n == name || (*n == "v5_*" && name.starts_with("v5_"))) && *j == i
            });
            if exempt {
                // Still equivalent: same size, decodes to the same packet.
                let mut again = out.clone();
                let v = if matches!(packet, Packet::Connect(_)) {
                    None
                } else {
                    Some(version)
                };
                let back = decode(&mut again, v, MAX_PACKET_SIZE).unwrap().unwrap();
                assert_eq!(&back, packet, "{name}[{i}]");
                if *name != "v31_pub" && !(*name == "v5_ping" && i == 6) {
                    assert_eq!(out.len(), raw.len(), "{name}[{i}]");
                }
            } else {
                assert_eq!(&out[..], &raw[..], "{name}[{i}] {packet:?}");
            }
        }
    }
}

fn packets(name: &str) -> Vec<Packet> {
    decode_fixture(name)
        .1
        .into_iter()
        .map(|(_, _, p)| p)
        .collect()
}

#[test]
fn v311_connect_with_will_and_credentials() {
    let p = packets("v311_pub_qos1_retain_will_auth");
    let Packet::Connect(c) = &p[0] else {
        panic!("{:?}", p[0])
    };
    assert_eq!(c.protocol, ProtocolVersion::V311);
    assert!(c.clean_start);
    assert_eq!(c.keep_alive, 30);
    assert_eq!(c.client_id, "fx-pub1");
    assert_eq!(c.username.as_deref(), Some("alice"));
    assert_eq!(c.password.as_deref(), Some(&b"s3cret"[..]));
    let will = c.will.as_ref().unwrap();
    assert_eq!(
        (
            will.topic.as_str(),
            &will.payload[..],
            will.qos,
            will.retain
        ),
        ("will/t", &b"bye"[..], QoS::AtLeastOnce, true)
    );
    assert_eq!(
        p[1],
        Packet::ConnAck(ConnAck {
            session_present: false,
            reason_code: ReasonCode::SUCCESS,
            properties: Default::default(),
        })
    );
    let Packet::Publish(pb) = &p[2] else { panic!() };
    assert_eq!(
        (pb.qos, pb.retain, pb.dup, pb.packet_id),
        (QoS::AtLeastOnce, true, false, Some(1))
    );
    assert_eq!(
        (pb.topic.as_str(), &pb.payload[..]),
        ("t/q1", &b"retained-1"[..])
    );
    assert_eq!(p[3], Packet::PubAck(PubAck::new(1)));
    assert_eq!(p[4], Packet::Disconnect(Disconnect::normal()));
}

#[test]
fn v311_qos2_flow_and_subscriptions() {
    let p = packets("v311_pub_qos2");
    assert_eq!(p[3], Packet::PubRec(PubRec::new(1)));
    assert_eq!(p[4], Packet::PubRel(PubRel::new(1)));
    assert_eq!(p[5], Packet::PubComp(PubComp::new(1)));

    let p = packets("v311_sub_qos2");
    let Packet::Connect(c) = &p[0] else { panic!() };
    assert!(!c.clean_start);
    let qos2 = SubscriptionOptions {
        qos: QoS::ExactlyOnce,
        ..Default::default()
    };
    assert_eq!(
        p[2],
        Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![("t/#".into(), qos2), ("x/+/y".into(), qos2)],
            properties: Default::default(),
        })
    );
    assert_eq!(
        p[3],
        Packet::SubAck(SubAck {
            packet_id: 1,
            reason_codes: vec![ReasonCode::GRANTED_QOS_2; 2],
            properties: Default::default(),
        })
    );

    let p = packets("v311_unsub");
    let unsubs: Vec<_> = p
        .iter()
        .filter_map(|p| match p {
            Packet::Unsubscribe(u) => Some(u.filters.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        unsubs,
        vec![vec!["t/#".to_string()], vec!["x/+/y".to_string()]]
    );
    assert!(p.iter().any(|p| *p
        == Packet::UnsubAck(UnsubAck {
            packet_id: 2,
            reason_codes: vec![],
            properties: Default::default(),
        })));
}

#[test]
fn mqtt31_connect_is_read_as_v311() {
    let p = packets("v31_pub");
    let Packet::Connect(c) = &p[0] else { panic!() };
    assert_eq!(c.protocol, ProtocolVersion::V311);
    assert_eq!(c.client_id, "fx31");
}

#[test]
fn v5_connect_and_publish_properties() {
    let p = packets("v5_pub_qos1_props");
    let Packet::Connect(c) = &p[0] else { panic!() };
    assert_eq!(c.protocol, ProtocolVersion::V5);
    assert_eq!(
        c.properties,
        ConnectProperties {
            session_expiry_interval: Some(60),
            receive_maximum: Some(10),
            maximum_packet_size: Some(65536),
            topic_alias_maximum: Some(4),
            request_problem_information: Some(false),
            user_properties: vec![("ck".into(), "cv".into())],
            ..Default::default()
        }
    );
    let Packet::ConnAck(ack) = &p[1] else {
        panic!()
    };
    assert_eq!(ack.properties.topic_alias_maximum, Some(10));
    assert_eq!(ack.properties.receive_maximum, Some(20));
    let Packet::Publish(pb) = &p[2] else { panic!() };
    assert_eq!(
        pb.properties,
        PublishProperties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(30),
            response_topic: Some("r/t".into()),
            correlation_data: Some(Bytes::from_static(b"abc")),
            user_properties: vec![("a".into(), "b".into())],
            content_type: Some("text/plain".into()),
            ..Default::default()
        }
    );
    assert_eq!(&pb.payload[..], b"five");
    assert_eq!(
        p[3],
        Packet::PubAck(PubAck {
            packet_id: 1,
            reason_code: ReasonCode::NO_MATCHING_SUBSCRIBERS,
            properties: Default::default(),
        })
    );
}

#[test]
fn v5_will_properties_and_disconnect_properties() {
    let p = packets("v5_pub_qos2_retain_will");
    let Packet::Connect(c) = &p[0] else { panic!() };
    let will = c.will.as_ref().unwrap();
    assert_eq!((will.qos, will.retain), (QoS::ExactlyOnce, false));
    assert_eq!(
        will.properties,
        WillProperties {
            will_delay_interval: Some(5),
            message_expiry_interval: Some(100),
            content_type: Some("text/x".into()),
            user_properties: vec![("wa".into(), "wb".into())],
            ..Default::default()
        }
    );
    assert_eq!(
        (c.username.as_deref(), c.password.as_deref()),
        (Some("bob"), Some(&b"pw"[..]))
    );
    let Packet::Disconnect(d) = p.last().unwrap() else {
        panic!()
    };
    assert_eq!(d.reason_code, ReasonCode::NORMAL_DISCONNECTION);
    assert_eq!(d.properties.session_expiry_interval, Some(0));
    assert_eq!(
        d.properties.user_properties,
        vec![("dk".into(), "dv".into())]
    );
}

#[test]
fn v5_subscription_identifier_and_unsubscribe() {
    let p = packets("v5_sub_qos2_subid");
    let Packet::Subscribe(s) = &p[2] else {
        panic!()
    };
    assert_eq!(s.properties.subscription_identifier, Some(7));
    assert_eq!(
        s.properties.user_properties,
        vec![("sk".into(), "sv".into())]
    );
    assert_eq!(s.filters[0].1.qos, QoS::ExactlyOnce);
    let Packet::Publish(pb) = &p[4] else { panic!() };
    assert_eq!(pb.properties.subscription_identifiers, vec![7]);
    assert!(pb.retain);

    let p = packets("v5_unsub");
    let Packet::Unsubscribe(u) = &p[4] else {
        panic!("{:?}", p[4])
    };
    assert_eq!(u.filters, vec!["t/#".to_string()]);
    assert_eq!(
        u.properties.user_properties,
        vec![("uk".into(), "uv".into())]
    );
    assert_eq!(
        p[5],
        Packet::UnsubAck(UnsubAck {
            packet_id: 2,
            reason_codes: vec![ReasonCode::NO_SUBSCRIPTION_EXISTED],
            properties: Default::default(),
        })
    );
}

#[test]
fn v5_ping_topic_alias_and_disconnect_with_will() {
    let p = packets("v5_ping");
    assert!(p.contains(&Packet::PingReq));
    assert!(p.contains(&Packet::PingResp));
    assert_eq!(
        p.last(),
        Some(&Packet::Disconnect(Disconnect::with_reason(
            ReasonCode::DISCONNECT_WITH_WILL
        )))
    );
    let p = packets("v5_pub_alias");
    let Packet::Publish(pb) = &p[2] else { panic!() };
    assert_eq!(pb.properties.topic_alias, Some(1));
    assert_eq!(pb.topic, "al/1");
}

#[test]
fn a_whole_session_decodes_from_one_buffer() {
    // All client packets of a session concatenated, as they would sit in a socket buffer.
    let mut buf = BytesMut::new();
    for (dir, raw) in load("v5_pub_qos2_retain_will") {
        if dir == Dir::C2S {
            buf.extend_from_slice(&raw);
        }
    }
    let mut codec = MqttCodec::default();
    let mut n = 0;
    while let Some(p) = tokio_util::codec::Decoder::decode(&mut codec, &mut buf).unwrap() {
        n += 1;
        if n == 1 {
            assert!(matches!(p, Packet::Connect(_)));
        }
    }
    assert_eq!(n, 4);
    assert_eq!(codec.version, Some(ProtocolVersion::V5));
}

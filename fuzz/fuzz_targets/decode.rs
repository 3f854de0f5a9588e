//! Fuzz target for the MQTT decoder.
//!
//! The first input byte picks the decoder state (before CONNECT, 3.1.1 or 5) and the maximum
//! packet size; the rest is fed to `decode` until it needs more bytes or fails. Every packet
//! that decodes must encode again and decode to the same value: what we accept we can also
//! produce, and the two sides agree on its meaning.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tiermq_common::codec::{decode, encode, encoded_len, Packet};
use tiermq_common::ProtocolVersion;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let mut version = match selector % 3 {
        0 => None,
        1 => Some(ProtocolVersion::V311),
        _ => Some(ProtocolVersion::V5),
    };
    let max = if selector & 0x80 != 0 { 64 } else { 1 << 20 };
    let mut buf = BytesMut::from(rest);
    while let Ok(Some(packet)) = decode(&mut buf, version, max) {
        let before = version;
        let v = match &packet {
            Packet::Connect(c) => {
                version = Some(c.protocol);
                c.protocol
            }
            _ => version.expect("only CONNECT decodes without a version"),
        };
        let mut out = BytesMut::new();
        encode(&packet, v, &mut out).expect("a decoded packet encodes");
        assert_eq!(out.len(), encoded_len(&packet, v));
        let again = decode(&mut out, before, u32::MAX)
            .expect("re-encoded packet decodes")
            .expect("re-encoded packet is complete");
        assert_eq!(again, packet);
        assert!(out.is_empty());
    }
});

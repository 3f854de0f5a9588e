//! Decode and encode of a PUBLISH with a 64-byte payload, the packet that dominates a
//! broker's traffic, in both protocol versions.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tiermq_common::codec::{decode, encode, encoded_len, Packet, Publish, PublishProperties};
use tiermq_common::{ProtocolVersion, QoS};

fn publish(v: ProtocolVersion) -> Packet {
    let properties = if v.is_v5() {
        PublishProperties {
            message_expiry_interval: Some(60),
            user_properties: vec![("k".into(), "v".into())],
            ..Default::default()
        }
    } else {
        PublishProperties::default()
    };
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "sensors/building-1/floor-3/temperature".into(),
        packet_id: Some(42),
        properties,
        payload: Bytes::from(vec![0xA5; 64]),
    })
}

fn bench(c: &mut Criterion) {
    for (name, v) in [("v311", ProtocolVersion::V311), ("v5", ProtocolVersion::V5)] {
        let packet = publish(v);
        let mut wire = BytesMut::new();
        encode(&packet, v, &mut wire).unwrap();
        let wire = wire.freeze();

        let mut g = c.benchmark_group(format!("publish_64b_{name}"));
        g.throughput(Throughput::Bytes(wire.len() as u64));
        g.bench_function("decode", |b| {
            // Refill a reused buffer, as a connection's read buffer is reused.
            let mut buf = BytesMut::with_capacity(4096);
            b.iter(|| {
                buf.extend_from_slice(&wire);
                black_box(decode(&mut buf, Some(v), 1 << 20).unwrap().unwrap())
            })
        });
        g.bench_function("encode", |b| {
            let mut out = BytesMut::with_capacity(4096);
            b.iter(|| {
                out.clear();
                encode(black_box(&packet), v, &mut out).unwrap();
                black_box(out.len())
            })
        });
        g.bench_function("encoded_len", |b| {
            b.iter(|| encoded_len(black_box(&packet), v))
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! A seeded-random fuzzer for the MQTT decoder and the connection handler, on stable Rust.
//!
//! cargo-fuzz needs nightly and a libFuzzer build; this harness needs neither, so it runs in
//! CI (a short run, `tests/it/fuzz.rs`) and for long runs on any machine (the `#[ignore]`d test
//! with `FUZZ_INPUTS` / `FUZZ_SEED` / `FUZZ_SECS`). Inputs come from a SplitMix64 generator,
//! so a seed names a run exactly (the order connections interleave in the broker is the only
//! thing that varies).
//!
//! * **Decoder inputs**: a buffer of valid packets of every kind (random fields, v3.1.1 and v5
//!   properties), mutated (bit flips, random bytes, inserted and deleted runs, truncation,
//!   remaining-length bytes set to 0xFF, splices) or pure random bytes, decoded in one of the
//!   three decoder states (before CONNECT, 3.1.1, 5) with a small or large maximum packet size.
//!   Every packet that decodes must encode again and decode to the same value.
//! * **Connection inputs**: one client connection to a real connection handler
//!   (`serve_connection`) over an in-memory duplex stream, in front of an in-process
//!   `LocalBroker`: a CONNECT (sometimes mutated), then random packets (sometimes mutated),
//!   sometimes a truncated frame or garbage at the end, written in random-sized chunks while
//!   the replies are read; then the client closes. The handler must end (no hang) and no task
//!   anywhere may panic. Client ids and topics come from small pools, so sessions are taken
//!   over, resumed, and receive each other's messages.
//!
//! Panics are counted by a process-wide panic hook, which sees panics in every task (the
//! broker's partition tasks included), not only in the connection's.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tiermq_backend::local::{LocalBroker, LocalPartitions};
use tiermq_common::codec::{
    decode, encode, encoded_len, AckProperties, Auth, AuthProperties, ConnAck, Connect,
    ConnectProperties, Disconnect, DisconnectProperties, LastWill, Packet, PubAck, PubComp, PubRec,
    PubRel, Publish, PublishProperties, SubAck, Subscribe, SubscribeProperties, UnsubAck,
    Unsubscribe, UnsubscribeProperties, WillProperties,
};
use tiermq_common::config::Settings;
use tiermq_common::router::Router;
use tiermq_common::session_api::SubscriptionOptions;
use tiermq_common::{ProtocolVersion, QoS, ReasonCode};
use tiermq_frontend::handler::serve_connection;
use tiermq_frontend::ConnectionInfo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------------
// Randomness
// ---------------------------------------------------------------------------------------------

/// SplitMix64: tiny, fast, and the same sequence for the same seed everywhere.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.byte()).collect()
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// Mostly small numbers, sometimes the edges.
    fn u32_edge(&mut self) -> u32 {
        match self.below(6) {
            0 => 0,
            1 => 1,
            2 => u32::MAX,
            3 => self.below(100) as u32,
            4 => 268_435_455,
            _ => self.next_u64() as u32,
        }
    }

    fn u16_edge(&mut self) -> u16 {
        match self.below(5) {
            0 => 0,
            1 => 1,
            2 => u16::MAX,
            3 => self.below(20) as u16,
            _ => self.next_u64() as u16,
        }
    }

    fn opt<T>(&mut self, f: impl FnOnce(&mut Rng) -> T) -> Option<T> {
        self.chance(30).then(|| f(self))
    }
}

// ---------------------------------------------------------------------------------------------
// Packets
// ---------------------------------------------------------------------------------------------

const CLIENT_IDS: &[&str] = &["a", "b", "c", "d", "e", "f", "g", "h"];
const SEGMENTS: &[&str] = &[
    "t", "u", "", "$SYS", "é", "x y", "\u{FEFF}", "a\u{0}b", "$share",
];

fn text(rng: &mut Rng) -> String {
    match rng.below(4) {
        0 => String::new(),
        1 => rng.pick(SEGMENTS).to_string(),
        _ => (0..rng.below(6))
            .map(|_| *rng.pick(&['a', 'z', '/', '+', '#', '$', 'é', '\u{0}', '\u{7F}']))
            .collect(),
    }
}

fn topic(rng: &mut Rng) -> String {
    if rng.chance(10) {
        return text(rng);
    }
    let n = 1 + rng.below(3);
    (0..n)
        .map(|_| *rng.pick(&["t", "u", "v", "$SYS", ""]))
        .collect::<Vec<_>>()
        .join("/")
}

fn filter(rng: &mut Rng) -> String {
    if rng.chance(10) {
        return text(rng);
    }
    let n = 1 + rng.below(3);
    let f = (0..n)
        .map(|_| *rng.pick(&["t", "u", "+", "#", ""]))
        .collect::<Vec<_>>()
        .join("/");
    if rng.chance(15) {
        format!("$share/{}/{f}", rng.pick(&["g", "h", "", "+"]))
    } else {
        f
    }
}

fn user_properties(rng: &mut Rng) -> Vec<(String, String)> {
    (0..rng.below(3)).map(|_| (text(rng), text(rng))).collect()
}

fn qos(rng: &mut Rng) -> QoS {
    *rng.pick(&[QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce])
}

fn reason(rng: &mut Rng) -> ReasonCode {
    ReasonCode(*rng.pick(&[
        0x00, 0x01, 0x02, 0x04, 0x10, 0x80, 0x81, 0x87, 0x8E, 0x92, 0x97,
    ]))
}

fn ack_properties(rng: &mut Rng) -> AckProperties {
    AckProperties {
        reason_string: rng.opt(text),
        user_properties: user_properties(rng),
    }
}

fn publish_properties(rng: &mut Rng) -> PublishProperties {
    PublishProperties {
        payload_format_indicator: rng.opt(|r| r.below(3) as u8),
        message_expiry_interval: rng.opt(Rng::u32_edge),
        topic_alias: rng.opt(|r| r.below(12) as u16),
        response_topic: rng.opt(topic),
        correlation_data: rng.opt(|r| Bytes::from(r.bytes(8))),
        user_properties: user_properties(rng),
        subscription_identifiers: if rng.chance(10) {
            vec![rng.u32_edge()]
        } else {
            Vec::new()
        },
        content_type: rng.opt(text),
    }
}

/// A CONNECT with random fields; `clean` keeps the session store from growing.
pub fn random_connect(rng: &mut Rng, version: ProtocolVersion) -> Connect {
    let v5 = version == ProtocolVersion::V5;
    let will = rng.chance(25).then(|| LastWill {
        topic: topic(rng),
        payload: Bytes::from(rng.bytes(16)),
        qos: qos(rng),
        retain: rng.chance(30),
        properties: if v5 {
            WillProperties {
                will_delay_interval: rng.opt(|r| r.below(3) as u32),
                payload_format_indicator: rng.opt(|r| r.below(3) as u8),
                message_expiry_interval: rng.opt(Rng::u32_edge),
                content_type: rng.opt(text),
                response_topic: rng.opt(topic),
                correlation_data: rng.opt(|r| Bytes::from(r.bytes(4))),
                user_properties: user_properties(rng),
            }
        } else {
            WillProperties::default()
        },
    });
    Connect {
        protocol: version,
        clean_start: rng.chance(60),
        keep_alive: *rng.pick(&[0, 1, 60, u16::MAX]),
        client_id: if rng.chance(10) {
            String::new()
        } else {
            rng.pick(CLIENT_IDS).to_string()
        },
        will,
        username: rng.opt(text),
        password: rng.opt(|r| Bytes::from(r.bytes(8))),
        properties: if v5 {
            ConnectProperties {
                session_expiry_interval: rng.opt(|r| *r.pick(&[0, 1, 30, u32::MAX])),
                receive_maximum: rng.opt(Rng::u16_edge),
                maximum_packet_size: rng.opt(|r| *r.pick(&[0, 1, 20, 64, 1 << 20])),
                topic_alias_maximum: rng.opt(Rng::u16_edge),
                request_response_information: rng.opt(|r| r.chance(50)),
                request_problem_information: rng.opt(|r| r.chance(50)),
                user_properties: user_properties(rng),
                authentication_method: rng.chance(5).then(|| text(rng)),
                authentication_data: rng.opt(|r| Bytes::from(r.bytes(4))),
            }
        } else {
            ConnectProperties::default()
        },
    }
}

/// Any packet, mostly the ones a client sends.
pub fn random_packet(rng: &mut Rng, version: ProtocolVersion) -> Packet {
    let v5 = version == ProtocolVersion::V5;
    let id = |r: &mut Rng| {
        if r.chance(5) {
            0
        } else {
            1 + r.below(8) as u16
        }
    };
    let kind = rng.below(16);
    match kind {
        0..=3 => {
            let q = qos(rng);
            Packet::Publish(Publish {
                dup: rng.chance(10),
                qos: q,
                retain: rng.chance(15),
                topic: if rng.chance(10) {
                    String::new()
                } else {
                    topic(rng)
                },
                packet_id: (q != QoS::AtMostOnce).then(|| id(rng)),
                properties: if v5 {
                    publish_properties(rng)
                } else {
                    PublishProperties::default()
                },
                payload: Bytes::from(rng.bytes(32)),
            })
        }
        4..=7 => {
            let (packet_id, reason_code, properties) = (id(rng), reason(rng), ack_properties(rng));
            match kind {
                4 => Packet::PubAck(PubAck {
                    packet_id,
                    reason_code,
                    properties,
                }),
                5 => Packet::PubRec(PubRec {
                    packet_id,
                    reason_code,
                    properties,
                }),
                6 => Packet::PubRel(PubRel {
                    packet_id,
                    reason_code,
                    properties,
                }),
                _ => Packet::PubComp(PubComp {
                    packet_id,
                    reason_code,
                    properties,
                }),
            }
        }
        8 | 9 => Packet::Subscribe(Subscribe {
            packet_id: id(rng),
            filters: (0..1 + rng.below(3))
                .map(|_| {
                    let opts = SubscriptionOptions {
                        qos: qos(rng),
                        no_local: rng.chance(20),
                        retain_as_published: rng.chance(20),
                        retain_handling: rng.below(3) as u8,
                    };
                    (filter(rng), opts)
                })
                .collect(),
            properties: SubscribeProperties {
                subscription_identifier: if v5 { rng.opt(Rng::u32_edge) } else { None },
                user_properties: if v5 { user_properties(rng) } else { Vec::new() },
            },
        }),
        10 => Packet::Unsubscribe(Unsubscribe {
            packet_id: id(rng),
            filters: (0..1 + rng.below(3)).map(|_| filter(rng)).collect(),
            properties: UnsubscribeProperties {
                user_properties: if v5 { user_properties(rng) } else { Vec::new() },
            },
        }),
        11 => Packet::PingReq,
        12 => Packet::Disconnect(Disconnect {
            reason_code: reason(rng),
            properties: DisconnectProperties {
                session_expiry_interval: rng.opt(|r| r.below(3) as u32),
                reason_string: rng.opt(text),
                user_properties: user_properties(rng),
                server_reference: None,
            },
        }),
        13 => Packet::Auth(Auth {
            reason_code: ReasonCode(*rng.pick(&[0x00, 0x18, 0x19])),
            properties: AuthProperties {
                authentication_method: rng.opt(text),
                authentication_data: rng.opt(|r| Bytes::from(r.bytes(4))),
                reason_string: None,
                user_properties: Vec::new(),
            },
        }),
        14 => Packet::Connect(random_connect(rng, version)),
        // Packets only a server sends: a client sending them is a protocol error.
        _ => match rng.below(4) {
            0 => Packet::ConnAck(ConnAck {
                session_present: rng.chance(50),
                reason_code: reason(rng),
                properties: Default::default(),
            }),
            1 => Packet::SubAck(SubAck {
                packet_id: id(rng),
                reason_codes: vec![reason(rng)],
                properties: ack_properties(rng),
            }),
            2 => Packet::UnsubAck(UnsubAck {
                packet_id: id(rng),
                reason_codes: vec![reason(rng)],
                properties: ack_properties(rng),
            }),
            _ => Packet::PingResp,
        },
    }
}

/// The packet's bytes, or nothing when the encoder refuses it (an invalid combination the
/// generator produced; refusing is the encoder's job).
fn encoded(packet: &Packet, version: ProtocolVersion) -> Vec<u8> {
    let mut out = BytesMut::new();
    match encode(packet, version, &mut out) {
        Ok(()) => out.to_vec(),
        Err(_) => Vec::new(),
    }
}

/// 1 to 3 of: bit flip, random byte, inserted run, deleted run, truncation, a length byte set
/// to 0xFF, a run copied elsewhere.
pub fn mutate(rng: &mut Rng, data: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(3) {
        let len = data.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = rng.byte();
            }
            2 => {
                let i = rng.below(len + 1);
                let run = rng.bytes(8);
                data.splice(i..i, run);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let j = (i + 1 + rng.below(8)).min(len);
                data.drain(i..j);
            }
            4 if len > 0 => data.truncate(rng.below(len)),
            5 if len > 1 => {
                // The remaining length starts at byte 1 of a packet at the front.
                let i = 1 + rng.below((len - 1).min(4));
                data[i] = 0xFF;
            }
            6 if len > 1 => {
                let i = rng.below(len);
                let j = (i + 1 + rng.below(16)).min(len);
                let run = data[i..j].to_vec();
                let at = rng.below(len + 1);
                data.splice(at..at, run);
            }
            _ => data.push(rng.byte()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Panic accounting
// ---------------------------------------------------------------------------------------------

static PANICS: AtomicU64 = AtomicU64::new(0);
static FIRST_PANIC: Mutex<Option<String>> = Mutex::new(None);

/// Counts every panic in the process (all threads, all tasks) and keeps the first message.
fn install_panic_counter() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // A failed assertion of the tests themselves (the fuzz tests, or any other test
            // of this binary running beside them) is reported by the test harness.
            if info.location().is_some_and(|l| {
                l.file().contains("tests/it/") && !l.file().contains("fuzz_support")
            }) {
                return previous(info);
            }
            PANICS.fetch_add(1, Ordering::SeqCst);
            let mut first = FIRST_PANIC.lock().unwrap_or_else(|e| e.into_inner());
            if first.is_none() {
                *first = Some(info.to_string());
            }
            drop(first);
            previous(info);
        }));
    });
}

pub fn panics() -> (u64, Option<String>) {
    let first = FIRST_PANIC
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    (PANICS.load(Ordering::SeqCst), first)
}

// ---------------------------------------------------------------------------------------------
// Decoder runs
// ---------------------------------------------------------------------------------------------

/// One decoder input from `rng`: the decoder state, its maximum packet size, the bytes.
pub fn decoder_input(rng: &mut Rng) -> (Option<ProtocolVersion>, u32, Vec<u8>) {
    let state = *rng.pick(&[None, Some(ProtocolVersion::V311), Some(ProtocolVersion::V5)]);
    let max = if rng.chance(20) { 64 } else { 1 << 20 };
    if rng.chance(10) {
        return (state, max, rng.bytes(64));
    }
    let version = state.unwrap_or(if rng.chance(50) {
        ProtocolVersion::V5
    } else {
        ProtocolVersion::V311
    });
    let mut data = Vec::new();
    if state.is_none() {
        data.extend(encoded(
            &Packet::Connect(random_connect(rng, version)),
            version,
        ));
    }
    for _ in 0..rng.below(4) {
        data.extend(encoded(&random_packet(rng, version), version));
    }
    if rng.chance(80) {
        mutate(rng, &mut data);
    }
    (state, max, data)
}

/// Decodes `data` until it needs more bytes or fails; every decoded packet must survive an
/// encode/decode round trip unchanged. Returns a description of a violation.
pub fn check_decoder_input(
    mut version: Option<ProtocolVersion>,
    max: u32,
    data: &[u8],
) -> Result<usize, String> {
    let mut buf = BytesMut::from(data);
    let mut decoded = 0;
    while let Ok(Some(packet)) = decode(&mut buf, version, max) {
        decoded += 1;
        let before = version;
        let v = match &packet {
            Packet::Connect(c) => {
                version = Some(c.protocol);
                c.protocol
            }
            _ => version.ok_or("a packet other than CONNECT decoded without a version")?,
        };
        let mut out = BytesMut::new();
        encode(&packet, v, &mut out)
            .map_err(|e| format!("decoded {packet:?} does not encode: {e}"))?;
        if out.len() != encoded_len(&packet, v) {
            return Err(format!(
                "encoded_len differs from the encoding of {packet:?}"
            ));
        }
        match decode(&mut out, before, u32::MAX) {
            Ok(Some(again)) if again == packet && out.is_empty() => {}
            other => return Err(format!("{packet:?} re-decoded as {other:?}")),
        }
    }
    Ok(decoded)
}

/// What a run did.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub inputs: u64,
    /// Decoder: packets decoded; connections: connections that got a CONNACK byte back.
    pub accepted: u64,
    /// Round-trip violations (decoder) or handlers that did not end (connections).
    pub failures: Vec<String>,
    pub panics: u64,
    pub first_panic: Option<String>,
    pub elapsed: Duration,
}

/// `inputs` decoder inputs from `seed` (stopping early at `deadline`).
pub fn fuzz_decoder(seed: u64, inputs: u64, deadline: Option<Instant>) -> Report {
    install_panic_counter();
    let panics_before = panics().0;
    let started = Instant::now();
    let mut rng = Rng::new(seed);
    let mut report = Report::default();
    for i in 0..inputs {
        if i % 4096 == 0 && deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let (state, max, data) = decoder_input(&mut rng);
        report.inputs += 1;
        let outcome = std::panic::catch_unwind(|| check_decoder_input(state, max, &data));
        match outcome {
            Ok(Ok(n)) => report.accepted += n as u64,
            Ok(Err(e)) => {
                if report.failures.len() < 10 {
                    report.failures.push(format!(
                        "input {i} ({state:?}, max {max}, {data:02x?}): {e}"
                    ));
                }
            }
            Err(_) => {
                if report.failures.len() < 10 {
                    report.failures.push(format!(
                        "input {i} ({state:?}, max {max}, {data:02x?}) panicked"
                    ));
                }
            }
        }
    }
    let (count, first) = panics();
    report.panics = count - panics_before;
    report.first_panic = first;
    report.elapsed = started.elapsed();
    report
}

// ---------------------------------------------------------------------------------------------
// Connection runs
// ---------------------------------------------------------------------------------------------

/// One connection's bytes and how they are cut into writes.
pub fn connection_input(rng: &mut Rng) -> (Vec<u8>, Vec<usize>) {
    let version = if rng.chance(50) {
        ProtocolVersion::V5
    } else {
        ProtocolVersion::V311
    };
    let mut data = encoded(&Packet::Connect(random_connect(rng, version)), version);
    if data.is_empty() {
        // The encoder refused the random fields (a NUL in a string, say): a plain CONNECT
        // instead, so the rest of the input reaches a connected session.
        let mut plain = random_connect(rng, version);
        plain.will = None;
        plain.username = None;
        plain.password = None;
        plain.properties.user_properties.clear();
        plain.properties.authentication_method = None;
        data = encoded(&Packet::Connect(plain), version);
    }
    if rng.chance(15) {
        mutate(rng, &mut data);
    }
    for _ in 0..rng.below(12) {
        let mut p = encoded(&random_packet(rng, version), version);
        if rng.chance(10) {
            mutate(rng, &mut p);
        }
        data.extend(p);
    }
    match rng.below(10) {
        // A frame cut short, or garbage, at the end.
        0 => {
            let mut p = encoded(&random_packet(rng, version), version);
            p.truncate(rng.below(p.len().max(1)));
            data.extend(p);
        }
        1 => data.extend(rng.bytes(32)),
        _ => {}
    }
    let mut cuts = Vec::new();
    let mut left = data.len();
    while left > 0 {
        let n = if rng.chance(50) {
            left
        } else {
            1 + rng.below(left)
        };
        cuts.push(n);
        left -= n;
    }
    (data, cuts)
}

/// The broker and the handler's settings a run shares between its connections.
pub struct Target {
    broker: Arc<Router<LocalPartitions>>,
    config: Arc<tiermq_frontend::FrontendConfig>,
    shutdown: CancellationToken,
}

impl Target {
    /// A `LocalBroker` on `dir` (2 partitions) with default handler settings, except a short
    /// connect timeout and a small maximum packet size (so the size checks are hit too).
    pub fn open(dir: &Path) -> Target {
        let mut settings = Settings::default();
        settings.storage.partitions = 2;
        settings.mqtt.connect_timeout_secs = 1;
        settings.mqtt.max_packet_size = 4096;
        let broker = LocalBroker::open(dir, tiermq::standalone::local_config(&settings))
            .expect("broker opens");
        Target {
            broker: Arc::new(broker.router().clone()),
            config: Arc::new(tiermq::standalone::frontend_config(&settings)),
            shutdown: CancellationToken::new(),
        }
    }

    /// Runs one connection: writes `data` in `cuts`, reads every reply, closes, and waits for
    /// the handler to end. `Ok(true)` when a reply came back.
    pub async fn connection(&self, data: Vec<u8>, cuts: Vec<usize>) -> Result<bool, String> {
        let (client, server) = tokio::io::duplex(16 * 1024);
        let info = ConnectionInfo::tcp("127.0.0.1:1".parse().expect("address"));
        let handler = tokio::spawn(serve_connection(
            server,
            info,
            self.broker.clone(),
            self.config.clone(),
            self.shutdown.clone(),
        ));
        let (mut rd, mut wr) = tokio::io::split(client);
        let writer = async move {
            let mut at = 0;
            for n in cuts {
                if wr.write_all(&data[at..at + n]).await.is_err() {
                    return;
                }
                at += n;
            }
            let _ = wr.shutdown().await;
        };
        let reader = async move {
            let mut got = 0usize;
            let mut buf = [0u8; 4096];
            while let Ok(n) = rd.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                got += n;
            }
            got
        };
        let both = async { tokio::join!(writer, reader).1 };
        let got = tokio::time::timeout(Duration::from_secs(10), both)
            .await
            .map_err(|_| "the connection did not close within 10 s".to_string())?;
        match tokio::time::timeout(Duration::from_secs(10), handler).await {
            Ok(Ok(())) => Ok(got > 0),
            Ok(Err(e)) => Err(format!("handler task failed: {e}")),
            Err(_) => Err("handler did not end within 10 s of the close".into()),
        }
    }
}

/// `inputs` connections from `seed`, `parallel` at a time (stopping early at `deadline`).
pub async fn fuzz_connections(
    target: &Target,
    seed: u64,
    inputs: u64,
    parallel: usize,
    deadline: Option<Instant>,
) -> Report {
    install_panic_counter();
    let panics_before = panics().0;
    let started = Instant::now();
    let mut rng = Rng::new(seed);
    let mut report = Report::default();
    let mut running = futures::stream::FuturesUnordered::new();
    let mut next = 0u64;
    use futures::StreamExt;
    loop {
        while running.len() < parallel
            && next < inputs
            && deadline.is_none_or(|d| Instant::now() < d)
        {
            let (data, cuts) = connection_input(&mut rng);
            let i = next;
            next += 1;
            running.push(async move { (i, target.connection(data, cuts).await) });
        }
        let Some((i, outcome)) = running.next().await else {
            break;
        };
        report.inputs += 1;
        match outcome {
            Ok(replied) => report.accepted += u64::from(replied),
            Err(e) => {
                if report.failures.len() < 10 {
                    report.failures.push(format!("connection {i}: {e}"));
                }
            }
        }
    }
    let (count, first) = panics();
    report.panics = count - panics_before;
    report.first_panic = first;
    report.elapsed = started.elapsed();
    report
}

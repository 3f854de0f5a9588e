//! Hostile input and limits. Each attack runs against a `tiermq standalone` child process
//! (so its memory can be read from /proc) while a witness pair of real clients keeps
//! publishing and receiving, and ends with the broker's resident memory checked against a
//! generous bound. The limit tests check the reason code each `[limits]` setting answers with
//! and that the hit is counted in `tiermq_limit_hits_total`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::support::*;
use bytes::BytesMut;
use tempfile::TempDir;
use tiermq_common::codec::{encode, Packet, Subscribe};
use tiermq_common::config::{ListenerKind, ListenerSettings};
use tiermq_common::{ProtocolVersion, QoS, ReasonCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{timeout, Instant};

const V5: ProtocolVersion = ProtocolVersion::V5;
const V3: ProtocolVersion = ProtocolVersion::V311;
const MB: u64 = 1024 * 1024;

/// A broker process started with a TOML config, and its metrics endpoint.
struct Target {
    broker: ProcBroker,
    metrics: SocketAddr,
    _dir: TempDir,
}

impl Target {
    async fn start(toml: &str) -> Target {
        let dir = tempfile::tempdir().unwrap();
        let config: PathBuf = dir.path().join("tiermq.toml");
        std::fs::write(&config, toml).unwrap();
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let args = [
            "--config".to_string(),
            config.display().to_string(),
            "--metrics-listen".to_string(),
            metrics.to_string(),
        ];
        let broker = ProcBroker::start_with_args(
            &dir.path().join("data"),
            &dir.path().join("broker.log"),
            &args,
        )
        .await;
        Target {
            broker,
            metrics,
            _dir: dir,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.broker.addr
    }

    /// Resident memory of the broker process, bytes.
    fn rss(&self) -> u64 {
        proc_status_kb(self.broker.pid(), "VmRSS:") * 1024
    }

    /// Open file descriptors of the broker process.
    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.broker.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Asserts the resident memory grew by less than `bound` since `before`; prints the growth.
    fn assert_rss_below(&self, what: &str, before: u64, bound: u64) {
        let after = self.rss();
        let grown = after.saturating_sub(before);
        println!(
            "{what}: broker RSS {} -> {} MiB (+{:.1} MiB, bound {} MiB)",
            before / MB,
            after / MB,
            grown as f64 / MB as f64,
            bound / MB
        );
        assert!(grown < bound, "{what}: RSS grew by {grown} bytes");
    }

    async fn limit_hits(&self, limit: &str) -> f64 {
        metric(
            self.metrics,
            &format!("tiermq_limit_hits_total{{limit=\"{limit}\"}}"),
        )
        .await
    }
}

fn proc_status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field} missing in /proc/{pid}/status"))
}

/// One sample of the metrics endpoint at `addr`.
async fn metric(addr: SocketAddr, series: &str) -> f64 {
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    sample(&body, series).unwrap_or_else(|| panic!("{series} missing:\n{body}"))
}

/// Two real clients (rumqttc) that must keep working through an attack: every
/// [`Witness::check`] is a QoS1 publish acknowledged and delivered.
struct Witness {
    sub: V5,
    publ: V5,
    n: u32,
}

impl Witness {
    async fn new(addr: SocketAddr) -> Witness {
        let (mut sub, _) = V5::connect(addr, "witness-sub", |_| {}).await;
        sub.subscribe("witness/t", Q5::AtLeastOnce).await;
        let (publ, _) = V5::connect(addr, "witness-pub", |_| {}).await;
        let mut w = Witness { sub, publ, n: 0 };
        w.check().await;
        w
    }

    async fn check(&mut self) {
        self.n += 1;
        let body = format!("check {}", self.n);
        let reason = self.publ.publish_qos1("witness/t", body.as_bytes()).await;
        assert_eq!(
            reason,
            rumqttc::v5::mqttbytes::v5::PubAckReason::Success,
            "witness publish {}",
            self.n
        );
        let got = self.sub.next_publish().await;
        assert_eq!(&got.payload[..], body.as_bytes());
    }
}

/// The bytes of a v5 CONNECT with client id `id` (raw, so it may be ill-formed UTF-8).
fn raw_connect(level: u8, id: &[u8]) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level, 0x02, 0, 0];
    if level == 5 {
        body.push(0); // no properties
    }
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id);
    let mut out = vec![0x10];
    put_var_int(&mut out, body.len());
    out.extend(body);
    out
}

fn put_var_int(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

fn encoded(packets: &[Packet]) -> BytesMut {
    let mut buf = BytesMut::new();
    for p in packets {
        encode(p, V5, &mut buf).unwrap();
    }
    buf
}

/// Raises this process's open-file limit to its hard limit (children inherit it); returns the
/// soft limit now in force.
fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a stack value.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    lim.rlim_cur
}

// ---------------------------------------------------------------------------------------------
// Attacks
// ---------------------------------------------------------------------------------------------

/// Slowloris: sockets that send a CONNECT one byte at a time and never finish it are closed
/// at the connect timeout, which counts from accept, not from the last byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_closed_at_the_connect_timeout() {
    let t = Target::start("[mqtt]\nconnect_timeout_secs = 2\n").await;
    let mut w = Witness::new(t.addr()).await;
    let before = t.rss();
    let connect = raw_connect(5, &[b'x'; 200]);
    let started = Instant::now();
    let lorises: Vec<_> = (0..50)
        .map(|_| {
            let addr = t.addr();
            let connect = connect.clone();
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                // 100 ms per byte: the CONNECT would take 20 s.
                for (i, b) in connect.iter().enumerate() {
                    if s.write_all(&[*b]).await.is_err() {
                        return i;
                    }
                    let mut one = [0u8; 1];
                    match timeout(Duration::from_millis(100), s.read(&mut one)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => return i,
                        Ok(Ok(_)) => panic!("the broker answered an unfinished CONNECT"),
                        Err(_) => {}
                    }
                }
                connect.len()
            })
        })
        .collect();
    w.check().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    w.check().await;
    for l in lorises {
        let sent = timeout(Duration::from_secs(8), l).await.unwrap().unwrap();
        assert!(sent < connect.len(), "closed only after the whole CONNECT");
    }
    println!(
        "50 slowloris sockets closed {:?} after they opened (timeout 2 s)",
        started.elapsed()
    );
    w.check().await;
    t.assert_rss_below("slowloris", before, 32 * MB);
}

/// A fixed header announcing 256 MB is refused from the header alone: nothing is buffered,
/// before CONNECT (closed) or after (DISCONNECT 0x95).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_256_mb_packet_is_refused_from_its_header() {
    let t = Target::start("").await;
    let mut w = Witness::new(t.addr()).await;
    let before = t.rss();
    // 0xff 0xff 0xff 0x7f: 268,435,455 bytes, the largest length MQTT can express.
    let mut head = vec![0x10, 0xff, 0xff, 0xff, 0x7f];
    head.extend(std::iter::repeat_n(0u8, 64 * 1024));
    let mut attackers = Vec::new();
    for _ in 0..50 {
        let mut raw = Raw::open(t.addr(), V5).await;
        raw.send_bytes(&head).await;
        attackers.push(raw);
    }
    w.check().await;
    for mut raw in attackers {
        assert!(raw.expect_closed().await.is_empty());
    }
    // After CONNECT: a PUBLISH announcing 256 MB.
    let mut c = Raw::v5(t.addr(), "huge").await;
    c.send_bytes(&[0x30, 0xff, 0xff, 0xff, 0x7f, 0, 1, b'a'])
        .await;
    c.expect_disconnect(ReasonCode::PACKET_TOO_LARGE).await;
    w.check().await;
    t.assert_rss_below("256 MB headers", before, 32 * MB);
}

/// Up to 10,000 sockets that never send CONNECT (fewer if the open-file limit cannot be
/// raised that far): the broker holds them cheaply, serves others meanwhile, and closes them
/// all at the connect timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_sockets_without_connect() {
    let _heavy = heavy().await;
    let limit = raise_fd_limit();
    let n = 10_000usize.min(limit.saturating_sub(300) as usize);
    assert!(n >= 500, "open-file limit {limit} too low for this test");
    let t = Target::start("[mqtt]\nconnect_timeout_secs = 10\n").await;
    let mut w = Witness::new(t.addr()).await;
    let before = t.rss();
    let fds_before = t.fds();
    let started = Instant::now();
    let mut sockets = Vec::with_capacity(n);
    while sockets.len() < n {
        let batch = (n - sockets.len()).min(500);
        let opened =
            futures::future::join_all((0..batch).map(|_| TcpStream::connect(t.addr()))).await;
        sockets.extend(opened.into_iter().map(|s| s.expect("connect")));
    }
    let opened_in = started.elapsed();
    // All accepted (the broker holds one descriptor each) before the first timeout.
    let deadline = started + Duration::from_secs(9);
    while t.fds() < fds_before + n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let held = t.fds().saturating_sub(fds_before);
    w.check().await;
    let grown = t.rss().saturating_sub(before);
    println!(
        "{n} silent sockets opened in {opened_in:?} (fd limit {limit}); broker holds {held}, \
         +{:.1} MiB RSS, {} bytes per socket",
        grown as f64 / MB as f64,
        grown / n as u64
    );
    // The first ones may already have timed out when the last ones arrive on a busy machine.
    assert!(held * 10 >= n * 9, "only {held} of {n} sockets accepted");
    t.assert_rss_below("silent sockets", before, 16 * MB + n as u64 * 40 * 1024);
    // The connect timeout (10 s from each accept) closes every one of them; on a loaded
    // machine the accepts themselves trail the connects, so allow a generous margin.
    let deadline = Instant::now() + Duration::from_secs(30);
    while t.fds() > fds_before + 10 {
        assert!(
            Instant::now() < deadline,
            "{} sockets still open",
            t.fds() - fds_before
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut probe = sockets.pop().unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(probe.read(&mut buf).await.unwrap_or(0), 0);
    drop(sockets);
    w.check().await;
}

/// A subscribe storm (10,000 filters from one client in 10 packets) is cut at
/// `session.max_subscriptions` (0x97), and filters over `[limits]` get 0x8F.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_storm_is_bounded_by_max_subscriptions() {
    let t = Target::start("[session]\nmax_subscriptions = 1000\n").await;
    let mut w = Witness::new(t.addr()).await;
    let before = t.rss();
    let mut c = Raw::v5(t.addr(), "storm").await;
    let mut granted = 0;
    let mut quota = 0;
    for batch in 0..10u16 {
        let filters = (0..1000)
            .map(|i| (format!("storm/{batch}/{i}/+"), sub_opts(QoS::AtLeastOnce)))
            .collect();
        c.send(&Packet::Subscribe(Subscribe {
            packet_id: batch + 1,
            filters,
            properties: Default::default(),
        }))
        .await;
        let Packet::SubAck(ack) = c.recv().await else {
            panic!("expected SUBACK")
        };
        granted += ack.reason_codes.iter().filter(|r| !r.is_error()).count();
        quota += ack
            .reason_codes
            .iter()
            .filter(|r| **r == ReasonCode::QUOTA_EXCEEDED)
            .count();
        if batch == 4 {
            w.check().await;
        }
    }
    assert_eq!((granted, quota), (1000, 9000));
    // Deeper than max_topic_levels (128), longer than max_topic_length (4096).
    let deep = "d/".repeat(200) + "#";
    let long = "l".repeat(5000);
    c.send(&Packet::Subscribe(Subscribe {
        packet_id: 99,
        filters: vec![
            (deep, sub_opts(QoS::AtMostOnce)),
            (long, sub_opts(QoS::AtMostOnce)),
        ],
        properties: Default::default(),
    }))
    .await;
    let Packet::SubAck(ack) = c.recv().await else {
        panic!("expected SUBACK")
    };
    assert_eq!(ack.reason_codes, vec![ReasonCode::TOPIC_FILTER_INVALID; 2]);
    c.ping().await;
    w.check().await;
    assert!(t.limit_hits("max_topic_levels").await >= 1.0);
    assert!(t.limit_hits("max_topic_length").await >= 1.0);
    t.assert_rss_below("subscribe storm", before, 48 * MB);
}

/// A client that subscribes to a busy topic and never reads: QoS0 to it is dropped once its
/// write buffer is full, and once QoS1 deliveries pile up past 4 × the write buffer it is
/// disconnected (its in-flight window could otherwise hold 65,535 packets); the publisher and
/// everyone else carry on, and the broker's memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_bounded() {
    let t =
        Target::start("[mqtt]\nmax_write_buffer = 262144\n[session]\nmax_queued_messages = 500\n")
            .await;
    let mut w = Witness::new(t.addr()).await;
    let before = t.rss();
    let mut lazy = Raw::v5(t.addr(), "lazy").await;
    lazy.subscribe("flood/0", sub_opts(QoS::AtMostOnce)).await;
    lazy.subscribe("flood/1", sub_opts(QoS::AtLeastOnce)).await;
    let mut publ = Raw::v5(t.addr(), "flood-pub").await;
    let payload = vec![b'f'; 16 * 1024];
    // 40 rounds of 50 QoS0 + 50 QoS1 messages of 16 KiB: 64 MiB towards a client that reads
    // nothing.
    for round in 0..40u16 {
        let mut packets = Vec::new();
        for i in 0..50u16 {
            packets.push(Packet::Publish(publish_packet(
                "flood/0",
                QoS::AtMostOnce,
                None,
                &payload,
            )));
            let pid = round * 50 + i + 1;
            packets.push(Packet::Publish(publish_packet(
                "flood/1",
                QoS::AtLeastOnce,
                Some(pid),
                &payload,
            )));
        }
        publ.send_bytes(&encoded(&packets)).await;
        for _ in 0..50 {
            let Packet::PubAck(a) = publ.recv().await else {
                panic!("expected PUBACK")
            };
            assert!(!a.reason_code.is_error(), "{a:?}");
        }
        if round % 10 == 0 {
            w.check().await;
        }
    }
    w.check().await;
    let dropped = metric(
        t.metrics,
        "tiermq_publishes_dropped_total{reason=\"slow_reader\"}",
    )
    .await;
    // 64 MiB went through the broker; what stays is mostly the storage log's cache.
    t.assert_rss_below("never-reading client", before, 160 * MB);
    assert!(dropped > 0.0, "no QoS0 dropped for the slow reader");
    assert_eq!(t.limit_hits("slow_reader").await, 1.0);
    lazy.expect_closed_within(Duration::from_secs(10)).await;
}

/// Ill-formed UTF-8: in a v5 CONNECT's client id, CONNACK 0x81 Malformed Packet; in 3.1.1,
/// closed; in a topic or filter after CONNECT, DISCONNECT 0x81. A client id over
/// `mqtt.max_client_id_len` gets 0x85.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_and_long_client_ids_are_refused() {
    let t = Target::start("").await;
    let mut w = Witness::new(t.addr()).await;
    let before = t.rss();
    let bad = [b'a', 0xc3, 0x28, b'z'];
    let mut c = Raw::open(t.addr(), V5).await;
    c.send_bytes(&raw_connect(5, &bad)).await;
    match c.expect_closed().await.as_slice() {
        [Packet::ConnAck(a)] => assert_eq!(a.reason_code, ReasonCode::MALFORMED_PACKET),
        other => panic!("expected CONNACK 0x81, got {other:?}"),
    }
    let mut c = Raw::open(t.addr(), V3).await;
    c.send_bytes(&raw_connect(4, &bad)).await;
    assert!(c.expect_closed().await.is_empty());
    // PUBLISH topic "t\xff".
    let mut c = Raw::v5(t.addr(), "utf8-pub").await;
    c.send_bytes(&[0x30, 0x06, 0x00, 0x02, b't', 0xff, 0x00, b'x'])
        .await;
    c.expect_disconnect(ReasonCode::MALFORMED_PACKET).await;
    // SUBSCRIBE filter "\xfe/#".
    let mut c = Raw::v5(t.addr(), "utf8-sub").await;
    c.send_bytes(&[
        0x82, 0x09, 0x00, 0x01, 0x00, 0x00, 0x03, 0xfe, b'/', b'#', 0x01,
    ])
    .await;
    c.expect_disconnect(ReasonCode::MALFORMED_PACKET).await;
    w.check().await;
    // Longer than max_client_id_len (256).
    let (mut c, ack) = Raw::connect(t.addr(), V5, &"i".repeat(300), |_| {}).await;
    assert_eq!(ack.reason_code, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID);
    c.expect_closed().await;
    assert_eq!(t.limit_hits("max_client_id_len").await, 1.0);
    w.check().await;
    t.assert_rss_below("ill-formed UTF-8", before, 16 * MB);
}

/// A publish flood from one connection: `limits.publish_rate` pauses its reads, so at most the
/// burst plus the rate reaches subscribers; the witness (its own rate) is not slowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_flood_is_throttled_and_others_are_not() {
    let _heavy = heavy().await;
    let t = Target::start("[limits]\npublish_rate = 100\npublish_burst = 50\n").await;
    let mut w = Witness::new(t.addr()).await;
    let before = t.rss();
    let mut sub = Raw::v5(t.addr(), "flood-sub").await;
    sub.subscribe("flood/t", sub_opts(QoS::AtMostOnce)).await;
    let mut flooder = Raw::v5(t.addr(), "flooder").await;
    let flood: Vec<Packet> = (0..5000)
        .map(|_| {
            Packet::Publish(publish_packet(
                "flood/t",
                QoS::AtMostOnce,
                None,
                &[b'x'; 64],
            ))
        })
        .collect();
    let bytes = encoded(&flood);
    let started = Instant::now();
    // The broker stops reading: this write blocks once the socket buffers are full.
    let writer = tokio::spawn(async move {
        flooder.send_bytes(&bytes).await;
        flooder
    });
    for _ in 0..5 {
        w.check().await;
    }
    // Count what reached the subscriber for a second and a half.
    let mut got = 0u64;
    let until = started + Duration::from_millis(1500);
    while let Recv::Packet(Packet::Publish(_)) = sub
        .recv_within(until.saturating_duration_since(Instant::now()))
        .await
    {
        got += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let allowed = 50.0 + 100.0 * elapsed;
    println!("publish flood: {got} of 5000 delivered in {elapsed:.2} s (limit {allowed:.0})");
    assert!(got >= 50, "the burst should pass ({got})");
    assert!(
        (got as f64) <= allowed + 10.0,
        "{got} delivered, the rate allows {allowed:.0}"
    );
    assert!(t.limit_hits("publish_rate").await > 0.0);
    w.check().await;
    writer.abort();
    t.assert_rss_below("publish flood", before, 32 * MB);
}

// ---------------------------------------------------------------------------------------------
// Limits: reason codes (in-process brokers)
// ---------------------------------------------------------------------------------------------

/// With `publish_rate_disconnect`, a v5 client over the rate is told DISCONNECT 0x96 Message
/// rate too high instead of being paused; a client within the rate is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_rate_disconnect_gets_0x96() {
    let b = start_broker_with(|s| {
        s.metrics.listen = Some("127.0.0.1:0".into());
        s.limits.publish_rate = 20;
        s.limits.publish_burst = 5;
        s.limits.publish_rate_disconnect = true;
    })
    .await;
    let mut calm = Raw::v5(b.addr, "calm").await;
    for i in 0..3u16 {
        let ack = calm
            .publish_qos1(publish_packet(
                "rate/t",
                QoS::AtLeastOnce,
                Some(i + 1),
                b"x",
            ))
            .await;
        assert_eq!(ack.reason_code, ReasonCode::NO_MATCHING_SUBSCRIBERS);
    }
    let mut flooder = Raw::v5(b.addr, "flooder").await;
    let flood: Vec<Packet> = (0..200)
        .map(|_| Packet::Publish(publish_packet("rate/t", QoS::AtMostOnce, None, b"x")))
        .collect();
    flooder.send_bytes(&encoded(&flood)).await;
    flooder
        .expect_disconnect(ReasonCode::MESSAGE_RATE_TOO_HIGH)
        .await;
    // The calm client is still served.
    let ack = calm
        .publish_qos1(publish_packet("rate/t", QoS::AtLeastOnce, Some(9), b"x"))
        .await;
    assert_eq!(ack.reason_code, ReasonCode::NO_MATCHING_SUBSCRIBERS);
}

/// A socket from `source` (a loopback address) to `addr`.
async fn open_from(source: IpAddr, addr: SocketAddr, version: ProtocolVersion) -> Raw {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    Raw::over(socket.connect(addr).await.unwrap(), version)
}

async fn connack(mut raw: Raw, id: &str) -> (Raw, ReasonCode) {
    let version = raw.version;
    raw.send(&Packet::Connect(connect_packet(version, id)))
        .await;
    match raw.recv().await {
        Packet::ConnAck(a) => (raw, a.reason_code),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

async fn scrape_hits(b: &Broker, limit: &str) -> f64 {
    let addr = b.metrics_addr().expect("metrics enabled");
    metric(
        addr,
        &format!("tiermq_limit_hits_total{{limit=\"{limit}\"}}"),
    )
    .await
}

/// `limits.max_connections` and a listener's `max_connections`: CONNACK 0x97 (3.1.1: 3);
/// a slot frees when a connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_get_quota_exceeded() {
    let b = start_broker_with(|s| {
        s.metrics.listen = Some("127.0.0.1:0".into());
        s.limits.max_connections = 3;
        let tcp = |name: &str, max| ListenerSettings {
            name: Some(name.into()),
            max_connections: max,
            ..ListenerSettings::new(ListenerKind::Tcp, "127.0.0.1:0".parse().unwrap())
        };
        s.listeners = vec![tcp("open", None), tcp("small", Some(1))];
    })
    .await;
    let listeners = b.standalone().listeners();
    let (open, small) = (
        listeners.addr_of("open").unwrap(),
        listeners.addr_of("small").unwrap(),
    );
    let lo = IpAddr::from([127, 0, 0, 1]);
    let (s1, code) = connack(open_from(lo, small, V5).await, "s1").await;
    assert_eq!(code, ReasonCode::SUCCESS);
    let (_, code) = connack(open_from(lo, small, V5).await, "s2").await;
    assert_eq!(code, ReasonCode::QUOTA_EXCEEDED, "listener limit");
    let (_o1, code) = connack(open_from(lo, open, V5).await, "o1").await;
    assert_eq!(code, ReasonCode::SUCCESS);
    let (_o2, code) = connack(open_from(lo, open, V5).await, "o2").await;
    assert_eq!(code, ReasonCode::SUCCESS);
    let (_, code) = connack(open_from(lo, open, V5).await, "o3").await;
    assert_eq!(code, ReasonCode::QUOTA_EXCEEDED, "node limit");
    // 3.1.1: return code 3, Server unavailable.
    let (_, code) = connack(open_from(lo, open, V3).await, "o3").await;
    assert_eq!(code.to_v311_connack(), 3);
    assert_eq!(scrape_hits(&b, "listener_max_connections").await, 1.0);
    assert_eq!(scrape_hits(&b, "max_connections").await, 2.0);
    // Closing one frees its slot (the close is seen by the broker a moment later).
    drop(s1);
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, code) = connack(open_from(lo, open, V5).await, "again").await;
        if code == ReasonCode::SUCCESS {
            break;
        }
        assert!(Instant::now() < deadline, "the slot never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `limits.connection_rate` (node) and `connection_rate_per_ip`: CONNACK 0x9F.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_rate_gets_0x9f() {
    let b = start_broker_with(|s| {
        s.metrics.listen = Some("127.0.0.1:0".into());
        // One new socket per second after a burst of 4; 2 per second from one address.
        s.limits.connection_rate = 1;
        s.limits.connection_burst = 4;
        s.limits.connection_rate_per_ip = 2;
    })
    .await;
    let (one, two) = (IpAddr::from([127, 0, 0, 1]), IpAddr::from([127, 0, 0, 2]));
    let mut codes = Vec::new();
    for (i, ip) in [one, one, one, two, two, two].into_iter().enumerate() {
        let (_, code) = connack(open_from(ip, b.addr, V5).await, &format!("r{i}")).await;
        codes.push(code);
    }
    let (ok, rate) = (ReasonCode::SUCCESS, ReasonCode::CONNECTION_RATE_EXCEEDED);
    // 127.0.0.1: 2 then its own limit; 127.0.0.2: 2 (the node's burst of 4 is spent) then
    // its own limit again.
    assert_eq!(codes, vec![ok, ok, rate, ok, ok, rate]);
    // The node's burst is gone: a third address is refused by the node's rate.
    let (_, code) = connack(open_from([127, 0, 0, 3].into(), b.addr, V3).await, "r3").await;
    assert_eq!(code.to_v311_connack(), 3);
    assert_eq!(scrape_hits(&b, "connection_rate_per_ip").await, 2.0);
    assert_eq!(scrape_hits(&b, "connection_rate").await, 1.0);
}

/// `limits.max_topic_length` / `max_topic_levels` on PUBLISH: PUBACK 0x90 (v5, the
/// connection stays), closed (3.1.1); on a will: CONNACK 0x90.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_over_the_limits_get_0x90() {
    let b = start_broker_with(|s| {
        s.metrics.listen = Some("127.0.0.1:0".into());
        s.limits.max_topic_length = 32;
        s.limits.max_topic_levels = 4;
    })
    .await;
    let mut sub = Raw::v5(b.addr, "sub").await;
    sub.subscribe("#", sub_opts(QoS::AtLeastOnce)).await;
    let mut c = Raw::v5(b.addr, "pub").await;
    for (i, topic) in ["a/b/c/d/e", &"x".repeat(33)].into_iter().enumerate() {
        let ack = c
            .publish_qos1(publish_packet(
                topic,
                QoS::AtLeastOnce,
                Some(i as u16 + 1),
                b"x",
            ))
            .await;
        assert_eq!(ack.reason_code, ReasonCode::TOPIC_NAME_INVALID, "{topic}");
    }
    c.send(&Packet::Publish(publish_packet(
        "a/b/c/d/e",
        QoS::AtMostOnce,
        None,
        b"x",
    )))
    .await;
    // Within the limits: delivered; nothing else was.
    let ack = c
        .publish_qos1(publish_packet("a/b/c/d", QoS::AtLeastOnce, Some(9), b"ok"))
        .await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    assert_eq!(sub.recv_publish().await.topic, "a/b/c/d");
    sub.expect_silence().await;
    let mut c3 = Raw::v3(b.addr, "pub3").await;
    c3.send(&Packet::Publish(publish_packet(
        "a/b/c/d/e",
        QoS::AtLeastOnce,
        Some(1),
        b"x",
    )))
    .await;
    assert!(c3.expect_closed().await.is_empty());
    let (_, ack) = Raw::connect(b.addr, V5, "will", |c| {
        c.will = Some(tiermq_common::codec::LastWill {
            topic: "w/w/w/w/w".into(),
            payload: bytes::Bytes::from_static(b"x"),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Default::default(),
        });
    })
    .await;
    assert_eq!(ack.reason_code, ReasonCode::TOPIC_NAME_INVALID);
    assert_eq!(scrape_hits(&b, "max_topic_levels").await, 4.0);
    assert_eq!(scrape_hits(&b, "max_topic_length").await, 1.0);
}

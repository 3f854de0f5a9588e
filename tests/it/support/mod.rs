//! Shared helpers of the standalone broker's integration tests:
//!
//! * [`Broker`]: an in-process `Standalone` on `127.0.0.1:0` with a temporary data folder;
//! * [`ProcBroker`]: the `tiermq standalone` binary as a child process, for kill -9 and SIGTERM;
//! * [`Raw`]: a minimal client on our own codec, for packets real clients will not produce;
//! * [`V5`] and [`V3`]: rumqttc clients whose events are collected with short timeouts.
//!
//! Every wait has a deadline of a few seconds so a broken broker fails a test quickly
//! instead of hanging it.

#![allow(dead_code)]

pub mod cluster;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tempfile::TempDir;
use tiermq::standalone::Standalone;
use tiermq_common::codec::{
    decode, encode, ConnAck, Connect, ConnectProperties, Disconnect, Packet, PubAck, Publish,
    PublishProperties, SubAck, Subscribe, SubscribeProperties, MAX_PACKET_SIZE,
};
use tiermq_common::config::Settings;
use tiermq_common::session_api::SubscriptionOptions;
use tiermq_common::{ProtocolVersion, QoS, ReasonCode};
use tiermq_frontend::FrontendConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

/// Serializes the heavy tests. All integration tests share one process and run two at a time;
/// a test that loads the machine (thousands of sockets, a flood, fuzzing) or times what it
/// measures (failover, publish pauses) holds this guard for its whole run, so no two of them
/// overlap. Async tests: `let _heavy = heavy().await;`, plain `#[test]`s: [`heavy_blocking`].
pub async fn heavy() -> tokio::sync::MutexGuard<'static, ()> {
    HEAVY.lock().await
}

/// [`heavy`] for a plain (not async) test.
pub fn heavy_blocking() -> tokio::sync::MutexGuard<'static, ()> {
    HEAVY.blocking_lock()
}

// A tokio mutex: it is not poisoned by a failed test, and works from any test's runtime.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long any single expected event may take.
pub const WAIT: Duration = Duration::from_secs(5);
/// How long we watch for something that must *not* happen.
pub const QUIET: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------------------------
// In-process broker
// ---------------------------------------------------------------------------------------------

/// A standalone broker running in this process. Dropping it stops nothing gracefully; call
/// [`Broker::shutdown`] for the graceful path.
pub struct Broker {
    standalone: Option<Standalone>,
    dir: TempDir,
    pub addr: SocketAddr,
}

/// Starts a broker with default settings.
pub async fn start_broker() -> Broker {
    start_broker_with(|_| {}).await
}

/// Starts a broker after `tweak` adjusted the settings (listen address and data folder are
/// chosen by the harness).
pub async fn start_broker_with(tweak: impl FnOnce(&mut Settings)) -> Broker {
    start_broker_with_frontend(tweak, |_| {}).await
}

/// [`start_broker_with`], then `frontend` adjusts the frontend's protocol settings, for what
/// `Settings` cannot express (enhanced authentication methods).
pub async fn start_broker_with_frontend(
    tweak: impl FnOnce(&mut Settings),
    frontend: impl FnOnce(&mut FrontendConfig),
) -> Broker {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = Settings::default();
    // No metrics endpoint unless a test asks for one (`metrics.listen = "127.0.0.1:0"`).
    settings.metrics.listen = Some(String::new());
    tweak(&mut settings);
    settings.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    settings.storage.data_dir = dir.path().join("data");
    settings.validate().expect("valid test settings");
    let standalone = Standalone::start_with(&settings, frontend)
        .await
        .expect("broker starts");
    let addr = standalone.local_addr();
    Broker {
        standalone: Some(standalone),
        dir,
        addr,
    }
}

impl Broker {
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The running broker (listener addresses, TLS reload).
    pub fn standalone(&self) -> &Standalone {
        self.standalone.as_ref().expect("broker running")
    }

    /// The metrics endpoint's address, when the test enabled it.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.standalone.as_ref().and_then(Standalone::metrics_addr)
    }

    /// Graceful shutdown (DISCONNECT 0x8B to v5 clients, checkpoint).
    pub async fn shutdown(&mut self) {
        if let Some(s) = self.standalone.take() {
            timeout(WAIT, s.shutdown())
                .await
                .expect("graceful shutdown finishes in time");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Process harness
// ---------------------------------------------------------------------------------------------

/// A free TCP port on 127.0.0.1 for a child process to listen on, never the same twice in this
/// test process (all integration tests share one process, two at a time).
///
/// The ports come from below the kernel's ephemeral range (`ip_local_port_range`), walked from
/// an offset drawn from the process id: a port handed out here and not yet bound by its child
/// cannot be taken meanwhile by a listener on port 0 or an outgoing connection of another test.
/// Each one is checked free by binding it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::OnceLock;
    static RANGE: OnceLock<(u32, u32)> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, len) = *RANGE.get_or_init(|| {
        let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
            .unwrap_or(32768);
        let low = ephemeral_low.saturating_sub(12_000).max(10_000);
        let len = ephemeral_low.saturating_sub(low).max(1_000);
        NEXT.store(
            std::process::id().wrapping_mul(7919) % len,
            Ordering::Relaxed,
        );
        (low, len)
    });
    for _ in 0..len {
        let port = (low + NEXT.fetch_add(1, Ordering::Relaxed) % len) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {low}..{}", low + len)
}

/// A data folder that outlives broker processes.
pub struct ProcDir {
    dir: TempDir,
    starts: u32,
}

impl ProcDir {
    pub fn new() -> ProcDir {
        ProcDir {
            dir: tempfile::tempdir().expect("temp dir"),
            starts: 0,
        }
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts `tiermq standalone` on this folder and a fresh port; returns once it accepts.
    pub async fn start(&mut self) -> ProcBroker {
        self.starts += 1;
        let log = self.dir.path().join(format!("broker-{}.log", self.starts));
        ProcBroker::start(&self.data(), &log).await
    }
}

/// `tiermq standalone` as a child process. Dropping it kills the process.
pub struct ProcBroker {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl ProcBroker {
    pub async fn start(data: &Path, log: &Path) -> ProcBroker {
        ProcBroker::start_with_args(data, log, &[]).await
    }

    /// [`start`](Self::start) with extra command-line arguments (`--config FILE`, flags).
    pub async fn start_with_args(data: &Path, log: &Path, args: &[String]) -> ProcBroker {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let out = std::fs::File::create(log).expect("log file");
        let err = out.try_clone().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tiermq"))
            .arg("standalone")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(data)
            .args(args)
            .env("TIERMQ_LOG", "info")
            .env_remove("RUST_LOG")
            .env_remove("TIERMQ_CONFIG")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn tiermq");
        let mut broker = ProcBroker {
            child: Some(child),
            addr,
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if TcpStream::connect(addr).await.is_ok() {
                break;
            }
            if let Some(status) = broker.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "tiermq exited early ({status}); log:\n{}",
                    broker.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "tiermq did not listen in time; log:\n{}",
                broker.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        broker
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill -9");
            child.wait().expect("reap");
        }
    }

    /// SIGTERM, then wait (at most [`WAIT`]) for a clean exit. Returns the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "tiermq did not exit after SIGTERM; log:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ProcBroker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics endpoint
// ---------------------------------------------------------------------------------------------

/// Status code and body of `GET path` (HTTP/1.1, one request per connection).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect to the metrics endpoint");
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .expect("answer in time")
        .unwrap();
    let text = String::from_utf8(raw).expect("utf-8 answer");
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of the sample `series` (name with its labels, as exposed), if present.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?.strip_prefix(' ')?;
        rest.split(' ').next()?.parse().ok()
    })
}

// ---------------------------------------------------------------------------------------------
// Raw client on our codec
// ---------------------------------------------------------------------------------------------

/// What a raw read produced.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // short-lived, one at a time
pub enum Recv {
    Packet(Packet),
    /// The server closed the connection (EOF or reset).
    Closed,
    Timeout,
}

/// Any byte stream [`Raw`] can speak MQTT over (TCP, TLS, WebSocket adapters).
pub trait RawStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> RawStream for T {}

/// A bare MQTT connection: send any packet or bytes, read packets one by one.
pub struct Raw {
    stream: Box<dyn RawStream>,
    buf: BytesMut,
    pub version: ProtocolVersion,
}

/// A CONNECT with clean start, keep alive 0 and no properties.
pub fn connect_packet(version: ProtocolVersion, client_id: &str) -> Connect {
    Connect {
        protocol: version,
        clean_start: true,
        keep_alive: 0,
        client_id: client_id.to_string(),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties::default(),
    }
}

pub fn sub_opts(qos: QoS) -> SubscriptionOptions {
    SubscriptionOptions {
        qos,
        ..SubscriptionOptions::default()
    }
}

pub fn publish_packet(topic: &str, qos: QoS, packet_id: Option<u16>, payload: &[u8]) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.to_string(),
        packet_id,
        properties: PublishProperties::default(),
        payload: Bytes::copy_from_slice(payload),
    }
}

impl Raw {
    /// Opens a TCP connection; nothing is sent yet. The version decides how replies are read.
    pub async fn open(addr: SocketAddr, version: ProtocolVersion) -> Raw {
        let stream = timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect in time")
            .expect("tcp connect");
        stream.set_nodelay(true).unwrap();
        Raw::over(stream, version)
    }

    /// A client over an already established stream (TLS, WebSocket); nothing is sent yet.
    pub fn over(stream: impl RawStream + 'static, version: ProtocolVersion) -> Raw {
        Raw {
            stream: Box::new(stream),
            buf: BytesMut::new(),
            version,
        }
    }

    /// Connects with `tweak` applied to a default CONNECT and expects a CONNACK.
    pub async fn connect(
        addr: SocketAddr,
        version: ProtocolVersion,
        client_id: &str,
        tweak: impl FnOnce(&mut Connect),
    ) -> (Raw, ConnAck) {
        let mut c = connect_packet(version, client_id);
        tweak(&mut c);
        let mut raw = Raw::open(addr, version).await;
        raw.send(&Packet::Connect(c)).await;
        match raw.recv().await {
            Packet::ConnAck(ack) => (raw, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// A v5 connection with clean start and no properties; asserts success.
    pub async fn v5(addr: SocketAddr, client_id: &str) -> Raw {
        let (raw, ack) = Raw::connect(addr, ProtocolVersion::V5, client_id, |_| {}).await;
        assert_eq!(ack.reason_code, ReasonCode::SUCCESS, "{ack:?}");
        raw
    }

    /// A 3.1.1 connection with clean session; asserts success.
    pub async fn v3(addr: SocketAddr, client_id: &str) -> Raw {
        let (raw, ack) = Raw::connect(addr, ProtocolVersion::V311, client_id, |_| {}).await;
        assert_eq!(ack.reason_code, ReasonCode::SUCCESS, "{ack:?}");
        raw
    }

    pub async fn send(&mut self, packet: &Packet) {
        let mut out = BytesMut::new();
        encode(packet, self.version, &mut out).expect("encodable test packet");
        self.send_bytes(&out).await;
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        // A write to a connection the server already closed may fail; the read side tells.
        let _ = self.stream.write_all(bytes).await;
    }

    /// The next packet, the end of the connection, or a timeout.
    pub async fn recv_within(&mut self, wait: Duration) -> Recv {
        let deadline = Instant::now() + wait;
        loop {
            match decode(&mut self.buf, Some(self.version), MAX_PACKET_SIZE) {
                Ok(Some(p)) => return Recv::Packet(p),
                Ok(None) => {}
                Err(e) => panic!("server sent an undecodable packet: {e}"),
            }
            let read = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf));
            match read.await {
                Err(_) => return Recv::Timeout,
                Ok(Ok(0)) | Ok(Err(_)) => return Recv::Closed,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// The next packet; panics on close or timeout.
    pub async fn recv(&mut self) -> Packet {
        match self.recv_within(WAIT).await {
            Recv::Packet(p) => p,
            other => panic!("expected a packet, got {other:?}"),
        }
    }

    /// The next PUBLISH; panics on anything else.
    pub async fn recv_publish(&mut self) -> Publish {
        match self.recv().await {
            Packet::Publish(p) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Asserts nothing arrives for [`QUIET`].
    pub async fn expect_silence(&mut self) {
        match self.recv_within(QUIET).await {
            Recv::Timeout => {}
            other => panic!("expected silence, got {other:?}"),
        }
    }

    /// Reads until the server closes the connection; returns what arrived before the close.
    pub async fn expect_closed_within(&mut self, wait: Duration) -> Vec<Packet> {
        let deadline = Instant::now() + wait;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv_within(left).await {
                Recv::Packet(p) => seen.push(p),
                Recv::Closed => return seen,
                Recv::Timeout => panic!("connection not closed in time; received {seen:?}"),
            }
        }
    }

    pub async fn expect_closed(&mut self) -> Vec<Packet> {
        self.expect_closed_within(WAIT).await
    }

    /// Asserts the server sends DISCONNECT with `reason` and closes.
    pub async fn expect_disconnect(&mut self, reason: ReasonCode) {
        let seen = self.expect_closed().await;
        match seen.last() {
            Some(Packet::Disconnect(d)) => assert_eq!(d.reason_code, reason, "{seen:?}"),
            _ => panic!("expected DISCONNECT {reason} before close, got {seen:?}"),
        }
    }

    /// SUBSCRIBE one filter and wait for the SUBACK (asserting the granted code).
    pub async fn subscribe(&mut self, filter: &str, opts: SubscriptionOptions) -> SubAck {
        self.subscribe_with(filter, opts, SubscribeProperties::default())
            .await
    }

    pub async fn subscribe_with(
        &mut self,
        filter: &str,
        opts: SubscriptionOptions,
        properties: SubscribeProperties,
    ) -> SubAck {
        let pid = 4242;
        self.send(&Packet::Subscribe(Subscribe {
            packet_id: pid,
            filters: vec![(filter.to_string(), opts)],
            properties,
        }))
        .await;
        match self.recv().await {
            Packet::SubAck(s) => {
                assert_eq!(s.packet_id, pid);
                assert_eq!(s.reason_codes, vec![ReasonCode(opts.qos.as_u8())], "{s:?}");
                s
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// QoS1 PUBLISH and wait for its PUBACK; returns the PUBACK.
    pub async fn publish_qos1(&mut self, p: Publish) -> PubAck {
        let pid = p.packet_id.expect("QoS1 needs a packet id");
        self.send(&Packet::Publish(p)).await;
        match self.recv().await {
            Packet::PubAck(a) => {
                assert_eq!(a.packet_id, pid);
                a
            }
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }

    pub async fn puback(&mut self, packet_id: u16) {
        self.send(&Packet::PubAck(PubAck::new(packet_id))).await;
    }

    /// Sends DISCONNECT with `reason` and waits for the server to close.
    pub async fn disconnect(mut self, reason: ReasonCode) {
        self.send(&Packet::Disconnect(Disconnect::with_reason(reason)))
            .await;
        let _ = self.expect_closed().await;
    }

    /// A PINGREQ/PINGRESP round trip: everything the server did for earlier packets of this
    /// connection that produces a reply before it has been received first.
    pub async fn ping(&mut self) {
        self.send(&Packet::PingReq).await;
        match self.recv().await {
            Packet::PingResp => {}
            other => panic!("expected PINGRESP, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// rumqttc clients
// ---------------------------------------------------------------------------------------------

macro_rules! rumqttc_client {
    ($name:ident, $m:ident, $connack:ty, $incoming:ty, $publish:ty) => {
        /// A rumqttc client whose event loop runs in a task and reports into a channel.
        /// The loop stops at the first connection error (no automatic reconnect).
        pub struct $name {
            pub client: <$m as ClientTypes>::Client,
            events: mpsc::UnboundedReceiver<Result<$incoming, String>>,
            backlog: VecDeque<$incoming>,
            task: JoinHandle<()>,
            pub closed: Option<String>,
        }

        impl $name {
            /// Connects and waits for the CONNACK.
            pub async fn connect(
                addr: SocketAddr,
                client_id: &str,
                tweak: impl FnOnce(&mut <$m as ClientTypes>::Options),
            ) -> ($name, $connack) {
                let mut opts = <$m as ClientTypes>::options(client_id, addr);
                tweak(&mut opts);
                let (client, mut eventloop) = <$m as ClientTypes>::new(opts);
                let (tx, events) = mpsc::unbounded_channel();
                let task = tokio::spawn(async move {
                    loop {
                        match eventloop.poll().await {
                            Ok(ev) => {
                                if let Some(inc) = $m::incoming(ev) {
                                    if tx.send(Ok(inc)).is_err() {
                                        return;
                                    }
                                }
                            }
                            Err(e) => {
                                let _ = tx.send(Err(e.to_string()));
                                return;
                            }
                        }
                    }
                });
                let mut c = $name {
                    client,
                    events,
                    backlog: VecDeque::new(),
                    task,
                    closed: None,
                };
                let ack = c.next_matching(|p| $m::as_connack(p).is_some()).await;
                let ack = $m::as_connack(&ack).unwrap().clone();
                (c, ack)
            }

            /// The next incoming packet satisfying `pred` (others are kept for later reads).
            pub async fn next_matching(&mut self, pred: impl Fn(&$incoming) -> bool) -> $incoming {
                match self.try_next_matching(WAIT, &pred).await {
                    Some(p) => p,
                    None => panic!(
                        "expected packet did not arrive (closed: {:?}, backlog: {:?})",
                        self.closed, self.backlog
                    ),
                }
            }

            /// Like `next_matching`, `None` on timeout or connection end.
            pub async fn try_next_matching(
                &mut self,
                wait: Duration,
                pred: &impl Fn(&$incoming) -> bool,
            ) -> Option<$incoming> {
                if let Some(i) = self.backlog.iter().position(|p| pred(p)) {
                    return self.backlog.remove(i);
                }
                let deadline = Instant::now() + wait;
                loop {
                    match tokio::time::timeout_at(deadline, self.events.recv()).await {
                        Err(_) => return None,
                        Ok(None) => return None,
                        Ok(Some(Err(e))) => {
                            self.closed = Some(e);
                            return None;
                        }
                        Ok(Some(Ok(p))) => {
                            if pred(&p) {
                                return Some(p);
                            }
                            self.backlog.push_back(p);
                        }
                    }
                }
            }

            pub async fn next_publish(&mut self) -> $publish {
                let p = self.next_matching(|p| $m::as_publish(p).is_some()).await;
                $m::as_publish(&p).unwrap().clone()
            }

            pub async fn try_next_publish(&mut self, wait: Duration) -> Option<$publish> {
                let p = self
                    .try_next_matching(wait, &|p: &$incoming| $m::as_publish(p).is_some())
                    .await?;
                Some($m::as_publish(&p).unwrap().clone())
            }

            /// Asserts no PUBLISH arrives for [`QUIET`].
            pub async fn expect_no_publish(&mut self) {
                if let Some(p) = self.try_next_publish(QUIET).await {
                    panic!("unexpected PUBLISH {p:?}");
                }
            }

            /// Waits until the event loop reports the connection's end; returns its error text.
            pub async fn wait_closed(&mut self) -> String {
                if let Some(e) = &self.closed {
                    return e.clone();
                }
                let deadline = Instant::now() + WAIT;
                loop {
                    match tokio::time::timeout_at(deadline, self.events.recv()).await {
                        Err(_) => panic!("connection still open; backlog {:?}", self.backlog),
                        Ok(None) => return "event loop ended".to_string(),
                        Ok(Some(Err(e))) => {
                            self.closed = Some(e.clone());
                            return e;
                        }
                        Ok(Some(Ok(p))) => self.backlog.push_back(p),
                    }
                }
            }

            /// Drops the TCP connection without DISCONNECT.
            pub fn kill(self) {
                self.task.abort();
            }
        }

        impl Drop for $name {
            fn drop(&mut self) {
                self.task.abort();
            }
        }
    };
}

/// The few things that differ between rumqttc's v5 and 3.1.1 modules.
pub trait ClientTypes {
    type Client;
    type Options;
    type EventLoop;
    fn options(client_id: &str, addr: SocketAddr) -> Self::Options;
    fn new(o: Self::Options) -> (Self::Client, Self::EventLoop);
}

pub struct M5;
pub struct M3;

impl ClientTypes for M5 {
    type Client = rumqttc::v5::AsyncClient;
    type Options = rumqttc::v5::MqttOptions;
    type EventLoop = rumqttc::v5::EventLoop;
    fn options(client_id: &str, addr: SocketAddr) -> Self::Options {
        let mut o = rumqttc::v5::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o
    }
    fn new(o: Self::Options) -> (Self::Client, Self::EventLoop) {
        rumqttc::v5::AsyncClient::new(o, 100)
    }
}

impl M5 {
    fn incoming(ev: rumqttc::v5::Event) -> Option<rumqttc::v5::Incoming> {
        match ev {
            rumqttc::v5::Event::Incoming(i) => Some(i),
            rumqttc::v5::Event::Outgoing(_) => None,
        }
    }
    fn as_connack(p: &rumqttc::v5::Incoming) -> Option<&rumqttc::v5::mqttbytes::v5::ConnAck> {
        match p {
            rumqttc::v5::Incoming::ConnAck(a) => Some(a),
            _ => None,
        }
    }
    fn as_publish(p: &rumqttc::v5::Incoming) -> Option<&rumqttc::v5::mqttbytes::v5::Publish> {
        match p {
            rumqttc::v5::Incoming::Publish(a) => Some(a),
            _ => None,
        }
    }
}

impl ClientTypes for M3 {
    type Client = rumqttc::AsyncClient;
    type Options = rumqttc::MqttOptions;
    type EventLoop = rumqttc::EventLoop;
    fn options(client_id: &str, addr: SocketAddr) -> Self::Options {
        let mut o = rumqttc::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        o
    }
    fn new(o: Self::Options) -> (Self::Client, Self::EventLoop) {
        rumqttc::AsyncClient::new(o, 100)
    }
}

impl M3 {
    fn incoming(ev: rumqttc::Event) -> Option<rumqttc::Incoming> {
        match ev {
            rumqttc::Event::Incoming(i) => Some(i),
            rumqttc::Event::Outgoing(_) => None,
        }
    }
    fn as_connack(p: &rumqttc::Incoming) -> Option<&rumqttc::ConnAck> {
        match p {
            rumqttc::Incoming::ConnAck(a) => Some(a),
            _ => None,
        }
    }
    fn as_publish(p: &rumqttc::Incoming) -> Option<&rumqttc::Publish> {
        match p {
            rumqttc::Incoming::Publish(a) => Some(a),
            _ => None,
        }
    }
}

rumqttc_client!(
    V5,
    M5,
    rumqttc::v5::mqttbytes::v5::ConnAck,
    rumqttc::v5::Incoming,
    rumqttc::v5::mqttbytes::v5::Publish
);
rumqttc_client!(
    V3,
    M3,
    rumqttc::ConnAck,
    rumqttc::Incoming,
    rumqttc::Publish
);

/// rumqttc's v5 QoS type.
pub use rumqttc::v5::mqttbytes::QoS as Q5;
/// rumqttc's 3.1.1 QoS type.
pub use rumqttc::QoS as Q3;

impl V5 {
    pub async fn subscribe(&mut self, filter: &str, qos: Q5) {
        self.client
            .subscribe(filter, qos)
            .await
            .expect("queue SUBSCRIBE");
        self.next_matching(|p| matches!(p, rumqttc::v5::Incoming::SubAck(_)))
            .await;
    }

    /// Publishes at QoS1 and waits for the PUBACK; returns its reason.
    pub async fn publish_qos1(
        &mut self,
        topic: &str,
        payload: &[u8],
    ) -> rumqttc::v5::mqttbytes::v5::PubAckReason {
        self.client
            .publish(topic, Q5::AtLeastOnce, false, payload.to_vec())
            .await
            .expect("queue PUBLISH");
        self.wait_puback().await
    }

    pub async fn wait_puback(&mut self) -> rumqttc::v5::mqttbytes::v5::PubAckReason {
        match self
            .next_matching(|p| matches!(p, rumqttc::v5::Incoming::PubAck(_)))
            .await
        {
            rumqttc::v5::Incoming::PubAck(a) => a.reason,
            _ => unreachable!(),
        }
    }

    /// Clean DISCONNECT and wait for the event loop to see the end.
    pub async fn disconnect(mut self) {
        self.client.disconnect().await.expect("queue DISCONNECT");
        let _ = self.wait_closed().await;
    }
}

impl V3 {
    pub async fn subscribe(&mut self, filter: &str, qos: Q3) {
        self.client
            .subscribe(filter, qos)
            .await
            .expect("queue SUBSCRIBE");
        self.next_matching(|p| matches!(p, rumqttc::Incoming::SubAck(_)))
            .await;
    }

    pub async fn publish_qos1(&mut self, topic: &str, payload: &[u8]) {
        self.client
            .publish(topic, Q3::AtLeastOnce, false, payload.to_vec())
            .await
            .expect("queue PUBLISH");
        self.next_matching(|p| matches!(p, rumqttc::Incoming::PubAck(_)))
            .await;
    }

    pub async fn disconnect(mut self) {
        self.client.disconnect().await.expect("queue DISCONNECT");
        let _ = self.wait_closed().await;
    }
}

/// Polls `cond` every 20 ms until it holds; panics after [`WAIT`].
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A subscriber and a publisher (raw v5) proving the broker still serves other clients.
pub async fn assert_broker_healthy(addr: SocketAddr) {
    let mut sub = Raw::v5(addr, "health-sub").await;
    sub.subscribe("health/check", sub_opts(QoS::AtLeastOnce))
        .await;
    let mut publ = Raw::v5(addr, "health-pub").await;
    let ack = publ
        .publish_qos1(publish_packet(
            "health/check",
            QoS::AtLeastOnce,
            Some(1),
            b"ok",
        ))
        .await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    let p = sub.recv_publish().await;
    assert_eq!(&p.payload[..], b"ok");
}

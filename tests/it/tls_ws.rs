//! TLS, mTLS, WebSocket and secure WebSocket listeners (issue 9): certificates are made at
//! test time with rcgen — a CA, a server certificate for 127.0.0.1/localhost, a client
//! certificate, and a client certificate from another CA.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use tempfile::TempDir;
use tiermq::standalone::Standalone;
use tiermq_common::codec::Packet;
use tiermq_common::config::{ListenerKind, ListenerSettings, Settings};
use tiermq_common::{ProtocolVersion, QoS, ReasonCode};
use tiermq_frontend::ws::WsIo;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::ClientRequestBuilder;

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = p.self_signed(&key).unwrap();
        Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    /// (certificate PEM, key PEM)
    fn leaf(&self, cn: &str, sans: &[&str], server: bool) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut p = CertificateParams::new(sans).unwrap();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Two CAs and the files a broker reads, in a temporary folder.
struct Pki {
    dir: TempDir,
    ca: Ca,
    other_ca: Ca,
}

impl Pki {
    fn new() -> Pki {
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
            ca: Ca::new("tiermq test CA"),
            other_ca: Ca::new("another CA"),
        };
        pki.write_server_cert(&pki.ca);
        std::fs::write(pki.ca_file(), &pki.ca.cert_pem).unwrap();
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn cert_file(&self) -> PathBuf {
        self.path("server.pem")
    }
    fn key_file(&self) -> PathBuf {
        self.path("server.key")
    }
    fn ca_file(&self) -> PathBuf {
        self.path("ca.pem")
    }

    /// (Re)writes the server certificate, issued by `ca`. Written to a temporary name and
    /// renamed, as a certificate manager would.
    fn write_server_cert(&self, ca: &Ca) {
        let (cert, key) = ca.leaf("tiermq test server", &["localhost", "127.0.0.1"], true);
        let tmp_c = self.path("server.pem.tmp");
        let tmp_k = self.path("server.key.tmp");
        std::fs::write(&tmp_c, cert).unwrap();
        std::fs::write(&tmp_k, key).unwrap();
        std::fs::rename(&tmp_k, self.key_file()).unwrap();
        std::fs::rename(&tmp_c, self.cert_file()).unwrap();
    }

    fn tls_listener(&self, name: &str, kind: ListenerKind, mtls: bool) -> ListenerSettings {
        ListenerSettings {
            name: Some(name.into()),
            cert: Some(self.cert_file()),
            key: Some(self.key_file()),
            ca: mtls.then(|| self.ca_file()),
            ..ListenerSettings::new(kind, "127.0.0.1:0".parse().unwrap())
        }
    }
}

fn pem_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

/// A client configuration trusting `ca`, optionally presenting `client` (cert, key).
fn client_config(ca: &Ca, client: Option<(String, String)>) -> Arc<ClientConfig> {
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for c in pem_certs(&ca.cert_pem) {
        roots.add(c).unwrap();
    }
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                pem_certs(&cert),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    Arc::new(config)
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

async fn tls_stream(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    timeout(WAIT, TlsConnector::from(config).connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
}

/// Sends CONNECT over `stream`; the CONNACK, or what happened instead.
async fn mqtt_connect(stream: impl RawStream + 'static, client_id: &str) -> (Raw, Recv) {
    let mut raw = Raw::over(stream, ProtocolVersion::V5);
    raw.send(&Packet::Connect(connect_packet(
        ProtocolVersion::V5,
        client_id,
    )))
    .await;
    let got = raw.recv_within(WAIT).await;
    (raw, got)
}

fn assert_connack(got: &Recv) {
    match got {
        Recv::Packet(Packet::ConnAck(a)) => assert_eq!(a.reason_code, ReasonCode::SUCCESS),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// A v5 MQTT connection over TLS; panics unless it is accepted.
async fn tls_client(addr: SocketAddr, config: Arc<ClientConfig>, client_id: &str) -> Raw {
    let stream = tls_stream(addr, config).await.expect("TLS handshake");
    let (raw, got) = mqtt_connect(stream, client_id).await;
    assert_connack(&got);
    raw
}

/// Asserts the broker does not let this TLS client in: the handshake fails, or (TLS 1.3,
/// where the client finishes before the server checked its certificate) the connection ends
/// before any CONNACK.
async fn assert_tls_refused(addr: SocketAddr, config: Arc<ClientConfig>, client_id: &str) {
    let stream = match tls_stream(addr, config).await {
        Err(_) => return,
        Ok(s) => s,
    };
    let (_, got) = mqtt_connect(stream, client_id).await;
    assert!(matches!(got, Recv::Closed), "expected refusal, got {got:?}");
}

/// A WebSocket upgrade on `stream` offering `protocol`.
async fn ws_upgrade<S>(
    stream: S,
    url: &str,
    protocol: Option<&str>,
) -> Result<WsIo<S>, tokio_tungstenite::tungstenite::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut req = ClientRequestBuilder::new(url.parse().unwrap());
    if let Some(p) = protocol {
        req = req.with_sub_protocol(p);
    }
    let (ws, resp) = timeout(WAIT, tokio_tungstenite::client_async(req, stream))
        .await
        .expect("upgrade answered in time")?;
    if protocol == Some("mqtt") {
        assert_eq!(resp.headers()["sec-websocket-protocol"], "mqtt");
    }
    Ok(WsIo::new(ws))
}

/// Subscribe `sub` to `topic`, publish QoS1 from `publisher`, receive it.
async fn round_trip(sub: &mut Raw, publisher: &mut Raw, topic: &str, payload: &[u8]) {
    sub.subscribe(topic, sub_opts(QoS::AtLeastOnce)).await;
    let ack = publisher
        .publish_qos1(publish_packet(topic, QoS::AtLeastOnce, Some(7), payload))
        .await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    let p = sub.recv_publish().await;
    assert_eq!(p.topic, topic);
    assert_eq!(&p.payload[..], payload);
}

/// The next incoming rumqttc event.
async fn next(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<rumqttc::v5::Event>,
) -> rumqttc::v5::Incoming {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ev = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("rumqttc event in time")
            .expect("rumqttc event loop alive");
        if let rumqttc::v5::Event::Incoming(i) = ev {
            return i;
        }
    }
}

async fn broker_with(listeners: Vec<ListenerSettings>) -> Broker {
    start_broker_with(move |s| {
        s.listeners = listeners;
        s.mqtt.tls_reload_interval_secs = 0;
    })
    .await
}

fn addr_of(broker: &Broker, name: &str) -> SocketAddr {
    broker
        .standalone()
        .listeners()
        .addr_of(name)
        .unwrap_or_else(|| panic!("listener {name}"))
}

/// A broker with a TCP listener ("tcp") and a TLS one without client certificates; the
/// TLS listener's address.
async fn tcp_and_tls_broker(pki: &Pki) -> (Broker, SocketAddr) {
    let tls = pki.tls_listener("tls", ListenerKind::Tls, false);
    let broker = broker_with(vec![tcp_listener(), tls]).await;
    let addr = addr_of(&broker, "tls");
    (broker, addr)
}

fn tcp_listener() -> ListenerSettings {
    ListenerSettings {
        name: Some("tcp".into()),
        ..ListenerSettings::new(ListenerKind::Tcp, "127.0.0.1:0".parse().unwrap())
    }
}

// ---------------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn tls_pub_sub_with_rumqttc_and_raw() {
    let pki = Pki::new();
    let (broker, tls) = tcp_and_tls_broker(&pki).await;
    // rumqttc (MQTT 5) over TLS, subscribed; a plain TCP client publishes.
    let mut o = rumqttc::v5::MqttOptions::new("rumqttc-tls", "localhost", tls.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(
        client_config(&pki.ca, None),
    )));
    let (client, mut events) = rumqttc::v5::AsyncClient::new(o, 10);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(ev) = events.poll().await {
            if tx.send(ev).is_err() {
                break;
            }
        }
    });
    assert!(matches!(
        next(&mut rx).await,
        rumqttc::v5::Incoming::ConnAck(_)
    ));
    client
        .subscribe("tls/rumqttc", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    assert!(matches!(
        next(&mut rx).await,
        rumqttc::v5::Incoming::SubAck(_)
    ));
    let mut tcp = Raw::v5(addr_of(&broker, "tcp"), "tcp-pub").await;
    tcp.publish_qos1(publish_packet(
        "tls/rumqttc",
        QoS::AtLeastOnce,
        Some(1),
        b"over tls",
    ))
    .await;
    match next(&mut rx).await {
        rumqttc::v5::Incoming::Publish(p) => assert_eq!(&p.payload[..], b"over tls"),
        other => panic!("expected PUBLISH, got {other:?}"),
    }
    // And a TLS publisher reaching a TCP subscriber, on our own codec.
    let mut tls_pub = tls_client(tls, client_config(&pki.ca, None), "tls-pub").await;
    round_trip(&mut tcp, &mut tls_pub, "tls/raw", b"tls to tcp").await;
    drop(client);
}

#[tokio::test]
async fn mtls_accepts_the_right_client_cert_only() {
    let pki = Pki::new();
    let broker = broker_with(vec![pki.tls_listener("mtls", ListenerKind::Tls, true)]).await;
    let addr = addr_of(&broker, "mtls");
    let good = pki.ca.leaf("device-42", &[], false);
    let foreign = pki.other_ca.leaf("intruder", &[], false);
    // No client certificate, and one from another CA: refused.
    assert_tls_refused(addr, client_config(&pki.ca, None), "no-cert").await;
    assert_tls_refused(addr, client_config(&pki.ca, Some(foreign)), "foreign").await;
    // The right one: in, and it works.
    let mut a = tls_client(addr, client_config(&pki.ca, Some(good.clone())), "dev-a").await;
    let mut b = tls_client(addr, client_config(&pki.ca, Some(good)), "dev-b").await;
    round_trip(&mut a, &mut b, "mtls/t", b"mutual").await;
}

#[tokio::test]
async fn optional_client_cert_verified_when_presented() {
    let pki = Pki::new();
    let mut listener = pki.tls_listener("opt", ListenerKind::Tls, true);
    listener.require_client_cert = Some(false);
    let broker = broker_with(vec![listener]).await;
    let addr = addr_of(&broker, "opt");
    tls_client(addr, client_config(&pki.ca, None), "anon").await;
    let good = pki.ca.leaf("device-7", &[], false);
    tls_client(addr, client_config(&pki.ca, Some(good)), "dev").await;
    let foreign = pki.other_ca.leaf("intruder", &[], false);
    assert_tls_refused(addr, client_config(&pki.ca, Some(foreign)), "foreign").await;
}

#[tokio::test]
async fn plain_tcp_against_the_tls_port_fails_cleanly() {
    let pki = Pki::new();
    let (broker, tls) = tcp_and_tls_broker(&pki).await;
    for _ in 0..3 {
        // A v5 CONNECT in the clear: whatever the TLS layer answers (an alert), the
        // connection ends without any MQTT.
        let ended = timeout(WAIT, async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = TcpStream::connect(tls).await.unwrap();
            let _ = s
                .write_all(b"\x10\x0d\x00\x04MQTT\x05\x02\x00\x00\x00\x00\x00")
                .await;
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf).await;
            buf
        })
        .await;
        let answer = ended.expect("the broker closes a plain connection on its TLS port");
        assert!(
            answer.first() != Some(&0x20),
            "CONNACK in the clear: {answer:?}"
        );
    }
    // The broker keeps serving both listeners.
    let mut a = tls_client(tls, client_config(&pki.ca, None), "after-a").await;
    let mut b = Raw::v5(addr_of(&broker, "tcp"), "after-b").await;
    round_trip(&mut b, &mut a, "still/up", b"yes").await;
}

// ---------------------------------------------------------------------------------------------
// WebSocket
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn websocket_connect_subscribe_publish() {
    let broker = broker_with(vec![
        tcp_listener(),
        ListenerSettings {
            name: Some("ws".into()),
            ..ListenerSettings::new(ListenerKind::Ws, "127.0.0.1:0".parse().unwrap())
        },
    ])
    .await;
    let ws = addr_of(&broker, "ws");
    let url = format!("ws://{ws}/mqtt");
    let stream = TcpStream::connect(ws).await.unwrap();
    let io = ws_upgrade(stream, &url, Some("mqtt"))
        .await
        .expect("upgrade");
    let (mut sub, got) = mqtt_connect(io, "ws-sub").await;
    assert_connack(&got);
    // A second WebSocket client publishes; a TCP client sees it too.
    let stream = TcpStream::connect(ws).await.unwrap();
    let io = ws_upgrade(stream, &url, Some("mqtt"))
        .await
        .expect("upgrade");
    let (mut publisher, got) = mqtt_connect(io, "ws-pub").await;
    assert_connack(&got);
    let mut tcp = Raw::v5(addr_of(&broker, "tcp"), "tcp-sub").await;
    tcp.subscribe("ws/t", sub_opts(QoS::AtLeastOnce)).await;
    round_trip(&mut sub, &mut publisher, "ws/t", b"binary frames").await;
    assert_eq!(&tcp.recv_publish().await.payload[..], b"binary frames");
    // Large payloads span many TCP segments but still arrive whole.
    let big = vec![0x5a; 200_000];
    publisher
        .publish_qos1(publish_packet("ws/t", QoS::AtLeastOnce, Some(9), &big))
        .await;
    assert_eq!(sub.recv_publish().await.payload.len(), big.len());
    sub.ping().await;
}

#[tokio::test]
async fn websocket_wrong_path_is_404_and_other_subprotocols_are_refused() {
    let broker = broker_with(vec![ListenerSettings {
        name: Some("ws".into()),
        path: Some("/custom".into()),
        ..ListenerSettings::new(ListenerKind::Ws, "127.0.0.1:0".parse().unwrap())
    }])
    .await;
    let ws = addr_of(&broker, "ws");
    let status = |e: tokio_tungstenite::tungstenite::Error| match e {
        tokio_tungstenite::tungstenite::Error::Http(resp) => resp.status(),
        other => panic!("expected an HTTP refusal, got {other}"),
    };
    let stream = TcpStream::connect(ws).await.unwrap();
    let e = ws_upgrade(stream, &format!("ws://{ws}/mqtt"), Some("mqtt"))
        .await
        .err()
        .expect("wrong path refused");
    assert_eq!(status(e), StatusCode::NOT_FOUND);
    let stream = TcpStream::connect(ws).await.unwrap();
    let e = ws_upgrade(stream, &format!("ws://{ws}/custom"), Some("chat"))
        .await
        .err()
        .expect("other subprotocol refused");
    assert_eq!(status(e), StatusCode::BAD_REQUEST);
    // The configured path with `mqtt` works.
    let stream = TcpStream::connect(ws).await.unwrap();
    let io = ws_upgrade(stream, &format!("ws://{ws}/custom"), Some("mqtt"))
        .await
        .expect("upgrade");
    let (_c, got) = mqtt_connect(io, "custom-path").await;
    assert_connack(&got);
}

#[tokio::test]
async fn secure_websocket_with_client_certificate() {
    let pki = Pki::new();
    let broker = broker_with(vec![pki.tls_listener("wss", ListenerKind::Wss, true)]).await;
    let wss = addr_of(&broker, "wss");
    let url = format!("wss://localhost:{}/mqtt", wss.port());
    let good = pki.ca.leaf("browser", &[], false);
    let mut clients = Vec::new();
    for id in ["wss-a", "wss-b"] {
        let tls = tls_stream(wss, client_config(&pki.ca, Some(good.clone())))
            .await
            .expect("TLS handshake");
        let io = ws_upgrade(tls, &url, Some("mqtt")).await.expect("upgrade");
        let (raw, got) = mqtt_connect(io, id).await;
        assert_connack(&got);
        clients.push(raw);
    }
    let (mut a, mut b) = (clients.remove(0), clients.remove(0));
    round_trip(&mut a, &mut b, "wss/t", b"secure").await;
    // Without a client certificate the upgrade never happens.
    if let Ok(tls) = tls_stream(wss, client_config(&pki.ca, None)).await {
        let r = ws_upgrade(tls, &url, Some("mqtt")).await;
        assert!(r.is_err(), "a wss client without certificate got through");
    }
}

// ---------------------------------------------------------------------------------------------
// Reload
// ---------------------------------------------------------------------------------------------

/// Replaces the server certificate with one from the other CA and reloads: new connections
/// get the new certificate, an established one keeps working.
#[tokio::test]
async fn reload_serves_the_new_certificate_to_new_connections_only() {
    let pki = Pki::new();
    let broker = broker_with(vec![pki.tls_listener("tls", ListenerKind::Tls, false)]).await;
    let addr = addr_of(&broker, "tls");
    let mut old = tls_client(addr, client_config(&pki.ca, None), "old").await;
    pki.write_server_cert(&pki.other_ca);
    broker
        .standalone()
        .listeners()
        .reload_tls()
        .expect("reload");
    // A client trusting only the first CA no longer accepts the server...
    let r = tls_stream(addr, client_config(&pki.ca, None)).await;
    assert!(r.is_err(), "new connection still got the old certificate");
    // ...one trusting the new CA does.
    let mut new = tls_client(addr, client_config(&pki.other_ca, None), "new").await;
    // The connection made before the reload still works both ways.
    round_trip(&mut old, &mut new, "reload/a", b"old hears new").await;
    round_trip(&mut new, &mut old, "reload/b", b"new hears old").await;
    // A broken replacement keeps the current certificate.
    std::fs::write(pki.cert_file(), "not a certificate").unwrap();
    let e = broker.standalone().listeners().reload_tls().unwrap_err();
    assert!(e.to_string().contains("server.pem"), "{e}");
    tls_client(addr, client_config(&pki.other_ca, None), "after-bad").await;
}

#[tokio::test]
async fn reload_when_the_files_change() {
    let pki = Pki::new();
    let listeners = vec![pki.tls_listener("tls", ListenerKind::Tls, false)];
    let broker = start_broker_with(move |s| {
        s.listeners = listeners;
        s.mqtt.tls_reload_interval_secs = 1;
    })
    .await;
    let addr = addr_of(&broker, "tls");
    let mut old = tls_client(addr, client_config(&pki.ca, None), "old").await;
    pki.write_server_cert(&pki.other_ca);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if tls_stream(addr, client_config(&pki.other_ca, None))
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the changed certificate was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    old.ping().await;
}

/// The CONNACK reason code for a v5 CONNECT without user name or password over TLS.
async fn tls_connack(addr: SocketAddr, config: Arc<ClientConfig>, client_id: &str) -> ReasonCode {
    let stream = tls_stream(addr, config).await.expect("TLS handshake");
    match mqtt_connect(stream, client_id).await.1 {
        Recv::Packet(Packet::ConnAck(a)) => a.reason_code,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

#[tokio::test]
async fn certificate_identity_is_the_user_name_and_needs_no_password() {
    use tiermq_common::config::CertIdentity;
    let pki = Pki::new();
    // A password file that does not know the devices, and no anonymous clients.
    let passwd = pki.path("passwd");
    let mut users = tiermq_frontend::passwd::PasswordFile::default();
    users.set("alice", b"wonderland").unwrap();
    users.save(&passwd).unwrap();
    let mut by_cn = pki.tls_listener("by-cn", ListenerKind::Tls, true);
    by_cn.use_identity_as_username = Some(CertIdentity::Cn);
    let mut by_san = pki.tls_listener("by-san", ListenerKind::Tls, true);
    by_san.use_identity_as_username = Some(CertIdentity::San);
    by_san.require_client_cert = Some(false);
    let plain_mtls = pki.tls_listener("mtls", ListenerKind::Tls, true);
    let broker = start_broker_with(move |s| {
        s.listeners = vec![by_cn, by_san, plain_mtls];
        s.mqtt.password_file = Some(passwd);
        s.mqtt.allow_anonymous = Some(false);
        s.mqtt.auth_failure_delay_ms = 10;
    })
    .await;
    let device = pki.ca.leaf("device-1", &["device-1.example"], false);
    let ip_only = pki.ca.leaf("device-2", &["10.0.0.2"], false);
    let with = |cert: &(String, String)| client_config(&pki.ca, Some(cert.clone()));
    // cn: the certificate is the credential.
    let addr = addr_of(&broker, "by-cn");
    assert_eq!(
        tls_connack(addr, with(&device), "cn-1").await,
        ReasonCode::SUCCESS
    );
    assert_eq!(
        tls_connack(addr, with(&ip_only), "cn-2").await,
        ReasonCode::SUCCESS
    );
    // san: only a DNS or e-mail SAN names a user; without one (or without a certificate) the
    // client is checked like any other, and it sent no password.
    let addr = addr_of(&broker, "by-san");
    assert_eq!(
        tls_connack(addr, with(&device), "san-1").await,
        ReasonCode::SUCCESS
    );
    let refused = ReasonCode::NOT_AUTHORIZED;
    assert_eq!(tls_connack(addr, with(&ip_only), "san-2").await, refused);
    let no_cert = client_config(&pki.ca, None);
    assert_eq!(tls_connack(addr, no_cert, "san-3").await, refused);
    // The same verified certificate on an mTLS listener without the setting is no password.
    let addr = addr_of(&broker, "mtls");
    assert_eq!(tls_connack(addr, with(&device), "mtls-1").await, refused);
    // The setting needs client certificates.
    let bad = "[[listeners]]\nkind = \"tcp\"\nlisten = \"127.0.0.1:0\"\nuse_identity_as_username = \"cn\"\n";
    let err = Settings::from_toml(bad)
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
    assert!(err.contains("use_identity_as_username"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Configuration errors
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn missing_certificate_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::default();
    settings.metrics.listen = Some(String::new());
    settings.storage.data_dir = dir.path().join("data");
    settings.listeners = vec![ListenerSettings {
        cert: Some(dir.path().join("absent-cert.pem")),
        key: Some(dir.path().join("absent-key.pem")),
        ..ListenerSettings::new(ListenerKind::Tls, "127.0.0.1:0".parse().unwrap())
    }];
    settings.validate().unwrap();
    let err = match Standalone::start(&settings).await {
        Ok(_) => panic!("started without a certificate"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("absent-cert.pem"), "{err}");
}

fn run_tiermq(args: &[&str], data: &Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tiermq"))
        .arg("standalone")
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", ""])
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .env_remove("TIERMQ_CONFIG")
        .env_remove("RUST_LOG")
        .output()
        .expect("run tiermq")
}

#[test]
fn binary_exits_non_zero_naming_the_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let missing = dir.path().join("no-such-cert.pem");
    let key = dir.path().join("no-such-key.pem");
    let out = run_tiermq(
        &[
            "--tls-listen",
            "127.0.0.1:0",
            "--tls-cert",
            missing.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        &data,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("no-such-cert.pem"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // TLS files without a TLS listener: a configuration error (exit 2).
    let out = run_tiermq(&["--tls-cert", missing.to_str().unwrap()], &data);
    assert_eq!(out.status.code(), Some(2));
    // A TOML listener without its key.
    let toml = dir.path().join("tiermq.toml");
    std::fs::write(
        &toml,
        "[[listeners]]\nkind = \"tls\"\nlisten = \"127.0.0.1:0\"\ncert = \"x.pem\"\n",
    )
    .unwrap();
    let out = run_tiermq(&["--config", toml.to_str().unwrap()], &data);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("key"), "{stderr}");
}

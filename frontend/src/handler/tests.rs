//! The connection handler against a scripted session service: the test decides which events
//! reach the connection, in which order relative to the client's packets, and what the
//! answers say — orders a real cluster produces only by chance (events and answers to
//! commands travel apart).

use std::sync::Mutex;

use tiermq_common::codec::ConnectProperties;
use tiermq_common::session_api::Connected;
use tiermq_common::Message;
use tokio::io::DuplexStream;

use super::*;

/// A session service whose events the test sends by hand; a PUBREC is answered with the log
/// index the test set.
#[derive(Default)]
struct Scripted {
    events: Mutex<Option<mpsc::UnboundedSender<SessionEvent>>>,
    pubrec_index: Mutex<Option<u64>>,
    acks: Mutex<Vec<(AckKind, u16)>>,
}

impl Scripted {
    fn send(&self, event: SessionEvent) {
        let events = self.events.lock().unwrap();
        events.as_ref().expect("connected").send(event).unwrap();
    }
}

impl SessionService for Scripted {
    async fn connect(&self, req: ConnectRequest) -> ServiceResult<Connected> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.events.lock().unwrap() = Some(tx);
        Ok(Connected {
            session: SessionRef {
                client_id: req.client_id,
                epoch: 1,
            },
            session_present: false,
            events: rx,
        })
    }

    async fn subscribe(
        &self,
        _session: &SessionRef,
        _subs: Vec<SubscribeRequest>,
    ) -> ServiceResult<Vec<ReasonCode>> {
        Err(ServiceError::Unavailable("not scripted".into()))
    }

    async fn unsubscribe(
        &self,
        _session: &SessionRef,
        _filters: Vec<String>,
    ) -> ServiceResult<Vec<ReasonCode>> {
        Err(ServiceError::Unavailable("not scripted".into()))
    }

    fn publish(
        &self,
        _session: &SessionRef,
        _message: Message,
        _inbound_packet_id: Option<u16>,
    ) -> impl Future<Output = ServiceResult<Published>> + Send + 'static {
        std::future::ready(Err(ServiceError::Unavailable("not scripted".into())))
    }

    fn release(
        &self,
        _session: &SessionRef,
        _packet_id: u16,
    ) -> impl Future<Output = ServiceResult<bool>> + Send + 'static {
        std::future::ready(Ok(false))
    }

    fn ack(
        &self,
        _session: &SessionRef,
        kind: AckKind,
        packet_id: u16,
    ) -> impl Future<Output = ServiceResult<Option<u64>>> + Send + 'static {
        self.acks.lock().unwrap().push((kind, packet_id));
        let index = match kind {
            AckKind::PubRec => *self.pubrec_index.lock().unwrap(),
            _ => None,
        };
        std::future::ready(Ok(index))
    }

    async fn disconnect(
        &self,
        _session: &SessionRef,
        _req: DisconnectRequest,
    ) -> ServiceResult<()> {
        Ok(())
    }
}

/// A QoS2 delivery of packet id `packet_id` computed at log index `index`.
fn qos2(packet_id: u16, dup: bool, index: u64, payload: &'static str) -> SessionEvent {
    SessionEvent::Deliver(Delivery {
        packet_id: Some(packet_id),
        qos: QoS::ExactlyOnce,
        retain: false,
        dup,
        subscription_ids: Vec::new(),
        expiry_secs: None,
        message: Arc::new(Message::new("t", payload, QoS::ExactlyOnce, false)),
        index: Some(index),
    })
}

async fn connect(service: &Arc<Scripted>) -> Framed<DuplexStream, MqttCodec> {
    let (client, server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(serve_connection(
        server,
        ConnectionInfo::tcp("127.0.0.1:1883".parse().unwrap()),
        service.clone(),
        Arc::new(FrontendConfig::default()),
        CancellationToken::new(),
    ));
    let mut framed = Framed::new(client, MqttCodec::default());
    framed
        .send(&Packet::Connect(Connect {
            protocol: ProtocolVersion::V5,
            clean_start: true,
            keep_alive: 0,
            client_id: "sub".into(),
            will: None,
            username: None,
            password: None,
            properties: ConnectProperties::default(),
        }))
        .await
        .unwrap();
    match next(&mut framed).await {
        Packet::ConnAck(a) => assert_eq!(a.reason_code, ReasonCode::SUCCESS),
        p => panic!("expected CONNACK, got {p:?}"),
    }
    framed
}

async fn next(framed: &mut Framed<DuplexStream, MqttCodec>) -> Packet {
    tokio::time::timeout(Duration::from_secs(5), framed.next())
        .await
        .expect("a packet within 5 s")
        .expect("connection open")
        .expect("a well-formed packet")
}

/// The packet id and payload of a PUBLISH.
fn published(p: Packet) -> (u16, bool, String) {
    match p {
        Packet::Publish(p) => (
            p.packet_id.expect("QoS2"),
            p.dup,
            String::from_utf8_lossy(&p.payload).into_owned(),
        ),
        p => panic!("expected PUBLISH, got {p:?}"),
    }
}

/// Issue 19, found by the simulation (seeds 5041, 5092, ...): a leader's replay computed
/// before the subscriber's PUBREC was applied reaches the connection after the client's
/// PUBCOMP. The client has completed and forgotten the packet id, so a PUBLISH DUP with it
/// would be taken for a new message: QoS2 delivered twice. A later, legitimate use of the id
/// (computed after the PUBREC) still goes out.
#[tokio::test]
async fn a_replay_older_than_the_pubrec_is_not_sent_after_pubcomp() {
    let service = Arc::new(Scripted::default());
    let mut client = connect(&service).await;

    service.send(qos2(1, false, 10, "a"));
    assert_eq!(published(next(&mut client).await), (1, false, "a".into()));
    // The PUBREC is applied at index 20; PUBREL goes out once it is durable.
    *service.pubrec_index.lock().unwrap() = Some(20);
    client.send(&Packet::PubRec(PubRec::new(1))).await.unwrap();
    match next(&mut client).await {
        Packet::PubRel(r) => assert_eq!(r.packet_id, 1),
        p => panic!("expected PUBREL, got {p:?}"),
    }
    client
        .send(&Packet::PubComp(PubComp::new(1)))
        .await
        .unwrap();
    // PINGRESP: the handler has read the PUBCOMP (packets are handled in order).
    client.send(&Packet::PingReq).await.unwrap();
    assert!(matches!(next(&mut client).await, Packet::PingResp));

    // The stale replay (computed at 15, before the PUBREC at 20), then a new message.
    service.send(qos2(1, true, 15, "a"));
    service.send(qos2(2, false, 30, "b"));
    assert_eq!(
        published(next(&mut client).await),
        (2, false, "b".into()),
        "the stale replay of packet id 1 reached the client"
    );
    // The id used again for a new message, computed after the PUBREC: sent.
    service.send(qos2(1, false, 40, "c"));
    assert_eq!(published(next(&mut client).await), (1, false, "c".into()));
}

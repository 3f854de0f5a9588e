//! The router over a scripted transport: what it submits where, and in which order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::oneshot;

use super::routes::RouteTable;
use super::*;
use crate::session_api::SubscriptionOptions;
use crate::QoS;

/// What the fake saw, in submission order: (partition, what).
type Log = Arc<Mutex<Vec<(u32, String)>>>;

/// A transport whose partitions answer at once, except the publishes held back by
/// [`Fake::hold_home`] (answered when the test says so).
#[derive(Clone)]
struct Fake {
    partitions: u32,
    routes: Arc<RwLock<RouteTable>>,
    log: Log,
    /// Held publishes: payload → the way to answer it.
    held: Arc<Mutex<HashMap<String, oneshot::Sender<Reply>>>>,
    hold: Arc<Mutex<Vec<String>>>,
    retained: Arc<HashMap<u32, Vec<Arc<Message>>>>,
}

impl Fake {
    fn new(partitions: u32) -> Fake {
        let mut routes = RouteTable::in_process(partitions);
        routes.add(0, "t/#");
        Fake {
            partitions,
            routes: Arc::new(RwLock::new(routes)),
            log: Arc::default(),
            held: Arc::default(),
            hold: Arc::default(),
            retained: Arc::default(),
        }
    }

    /// The publish of `payload` to the publisher's home is answered only by [`Fake::answer`].
    fn hold_home(&self, payload: &str) {
        self.hold.lock().unwrap().push(payload.to_string());
    }

    fn answer(&self, payload: &str, token: u64) {
        let tx = self.held.lock().unwrap().remove(payload).expect("held");
        let _ = tx.send(published(Some(token)));
    }

    fn log(&self) -> Vec<(u32, String)> {
        self.log.lock().unwrap().clone()
    }
}

fn published(qos2_token: Option<u64>) -> Reply {
    Reply::Published {
        matched: true,
        duplicate: false,
        refused: false,
        qos2_token,
    }
}

fn payload(m: &Message) -> String {
    String::from_utf8_lossy(&m.payload).into_owned()
}

impl PartitionCaller for Fake {
    fn partition_count(&self) -> u32 {
        self.partitions
    }

    fn call_partition(
        &self,
        partition: u32,
        command: Command,
    ) -> impl Future<Output = ServiceResult<Reply>> + Send + 'static {
        let (what, reply, held) = match &command {
            Command::Publish {
                message,
                inbound_qos2,
                ..
            } => {
                let p = payload(message);
                let at_home = inbound_qos2.as_ref().is_some_and(|m| m.token.is_none());
                let held = at_home && self.hold.lock().unwrap().contains(&p);
                let token = at_home.then_some(100);
                (format!("publish {p}"), published(token), held)
            }
            Command::Subscribe { subscriptions, .. } => (
                "subscribe".into(),
                Reply::Subscribed {
                    reason_codes: vec![ReasonCode::GRANTED_QOS_1; subscriptions.len()],
                    want_retained: subscriptions
                        .iter()
                        .map(|s| (s.filter.clone(), s.options, None))
                        .collect(),
                },
                false,
            ),
            Command::DeliverRetained { retained, .. } => {
                let topics: Vec<String> = retained[0]
                    .messages
                    .iter()
                    .map(|m| m.topic.clone())
                    .collect();
                (format!("retained {}", topics.join(",")), Reply::Done, false)
            }
            other => (format!("{other:?}"), Reply::Done, false),
        };
        self.log.lock().unwrap().push((partition, what.clone()));
        let (tx, rx) = oneshot::channel();
        if held {
            let key = what.trim_start_matches("publish ").to_string();
            self.held.lock().unwrap().insert(key, tx);
        } else {
            let _ = tx.send(reply);
        }
        async move { rx.await.map_err(|_| ServiceError::ShuttingDown) }
    }
}

impl Transport for Fake {
    fn routes(&self) -> &RwLock<RouteTable> {
        &self.routes
    }

    fn cast(&self, partition: u32, command: Command) {
        drop(self.call_partition(partition, command));
    }

    fn publish_qos0(&self, partition: u32, message: &Arc<Message>, _publisher: &Arc<str>) {
        let what = format!("qos0 {}", payload(message));
        self.log.lock().unwrap().push((partition, what));
    }

    fn retained(
        &self,
        partition: u32,
        _filter: String,
    ) -> impl Future<Output = ServiceResult<Vec<Arc<Message>>>> + Send + 'static {
        std::future::ready(Ok(self
            .retained
            .get(&partition)
            .cloned()
            .unwrap_or_default()))
    }

    fn connect(
        &self,
        _partition: u32,
        _command: Command,
    ) -> impl Future<Output = ServiceResult<(Reply, EventReceiver)>> + Send + 'static {
        std::future::ready(Err(ServiceError::ShuttingDown))
    }

    fn disconnected(&self, _session: &SessionRef) {}
}

/// A publisher whose home is not partition 0, where `t/#` is routed: every inbound QoS2
/// publish on `t/...` is two-stage.
fn publisher(partitions: u32) -> SessionRef {
    let client_id = (0..)
        .map(|i| format!("pub-{i}"))
        .find(|c| partition_of(c, partitions) != 0)
        .unwrap();
    SessionRef {
        client_id: Arc::from(client_id.as_str()),
        epoch: 1,
    }
}

fn message(payload: &str, qos: QoS) -> Message {
    Message::new("t/x", payload.to_string(), qos, false)
}

async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// Bug 11 of issue 19 in the cluster: the cluster client let a later QoS1 publish overtake
/// an earlier QoS2 one (its second stage waited only for the previous QoS2). The router
/// holds every later publish of the publisher behind a second stage.
#[tokio::test]
async fn a_later_publish_does_not_overtake_a_two_stage_qos2_publish() {
    let fake = Fake::new(2);
    let router = Router::new(fake.clone(), RouterConfig::default());
    let session = publisher(2);
    let home = partition_of(&session.client_id, 2);
    fake.hold_home("first");
    let first = router.publish(&session, message("first", QoS::ExactlyOnce), Some(1));
    let second = router.publish(&session, message("second", QoS::AtLeastOnce), None);
    let third = router.publish(&session, message("third", QoS::AtMostOnce), None);
    settle().await;
    assert_eq!(
        fake.log(),
        vec![(home, "publish first".into())],
        "nothing may reach partition 0 before the QoS2 message's second stage"
    );
    fake.answer("first", 100);
    let (a, b, c) = tokio::join!(first, second, third);
    assert!(a.is_ok() && b.is_ok() && c.is_ok());
    assert_eq!(
        fake.log(),
        vec![
            (home, "publish first".into()),
            (0, "publish first".into()),
            (0, "publish second".into()),
            (0, "qos0 third".into()),
        ]
    );
}

/// The home stages of consecutive QoS2 messages are submitted without waiting for one
/// another (the lane pipelines them); their second stages keep the client's order.
#[tokio::test]
async fn consecutive_qos2_home_stages_are_pipelined() {
    let fake = Fake::new(2);
    let router = Router::new(fake.clone(), RouterConfig::default());
    let session = publisher(2);
    let home = partition_of(&session.client_id, 2);
    fake.hold_home("a");
    fake.hold_home("b");
    let a = router.publish(&session, message("a", QoS::ExactlyOnce), Some(1));
    let b = router.publish(&session, message("b", QoS::ExactlyOnce), Some(2));
    settle().await;
    assert_eq!(
        fake.log(),
        vec![(home, "publish a".into()), (home, "publish b".into())]
    );
    // The second's home answers first: its second stage still waits for the first's.
    fake.answer("b", 101);
    settle().await;
    assert_eq!(fake.log().len(), 2);
    fake.answer("a", 100);
    let (a, b) = tokio::join!(a, b);
    assert!(a.is_ok() && b.is_ok());
    assert_eq!(
        fake.log()[2..],
        [(0, "publish a".to_string()), (0, "publish b".to_string())]
    );
}

/// A connection that goes away after sending (its publish future dropped unpolled) does not
/// stop the second stage half-way.
#[tokio::test]
async fn a_dropped_publish_still_completes_its_second_stage() {
    let fake = Fake::new(2);
    let router = Router::new(fake.clone(), RouterConfig::default());
    let session = publisher(2);
    drop(router.publish(&session, message("gone", QoS::ExactlyOnce), Some(1)));
    settle().await;
    assert!(fake.log().contains(&(0, "publish gone".to_string())));
}

/// With `queue_qos0_offline` QoS0 is logged (a `Publish` command, so offline sessions can
/// queue it); before, only the standalone broker did so and a cluster frontend handed QoS0
/// over unlogged.
#[tokio::test]
async fn qos0_is_logged_when_offline_sessions_queue_it() {
    for (queue, expected) in [(false, "qos0 m"), (true, "publish m")] {
        let fake = Fake::new(2);
        let config = RouterConfig {
            queue_qos0_offline: queue,
        };
        let router = Router::new(fake.clone(), config);
        router
            .publish(&publisher(2), message("m", QoS::AtMostOnce), None)
            .await
            .unwrap();
        assert_eq!(fake.log(), vec![(0, expected.to_string())]);
    }
}

/// Retained messages gathered from other partitions are queued in topic order, on both
/// tiers (before, only the cluster client sorted them).
#[tokio::test]
async fn retained_messages_from_other_partitions_come_in_topic_order() {
    let mut fake = Fake::new(3);
    let subscriber = (0..)
        .map(|i| format!("sub-{i}"))
        .find(|c| partition_of(c, 3) == 0)
        .unwrap();
    let retained = |topic: &str| Arc::new(Message::new(topic, "r", QoS::AtMostOnce, true));
    fake.retained = Arc::new(HashMap::from([
        (1, vec![retained("r/c"), retained("r/a")]),
        (2, vec![retained("r/b")]),
    ]));
    let router = Router::new(fake.clone(), RouterConfig::default());
    let session = SessionRef {
        client_id: Arc::from(subscriber.as_str()),
        epoch: 1,
    };
    let request = SubscribeRequest {
        filter: "r/#".into(),
        options: SubscriptionOptions::default(),
        subscription_id: None,
    };
    router.subscribe(&session, vec![request]).await.unwrap();
    assert_eq!(
        fake.log(),
        vec![
            (0, "subscribe".to_string()),
            (0, "retained r/a,r/b,r/c".to_string())
        ]
    );
}

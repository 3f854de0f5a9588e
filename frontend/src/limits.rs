//! Limits against greedy or hostile clients: how many sockets, how fast they arrive, how fast a
//! connection may publish, how long and deep its topics may be (`[limits]` in the settings).
//!
//! Everything here is plain bookkeeping with the time passed in, so the rate limiters
//! (`rates.rs`: governor for the connection and publish rates, a token bucket for bandwidth)
//! and the admission rules are unit-tested without sleeping; the listener and the handler only call
//! in at three points (a socket accepted, a packet read, a topic seen) and count what comes back
//! in `tiermq_limit_hits_total{limit=...}`.
//!
//! Why the limits act where they do:
//! - **Sockets** are counted from `accept`, not from CONNACK: a socket that never sends CONNECT
//!   holds a file descriptor and a task just the same. A socket over a limit is still served
//!   far enough to read its CONNECT and answer with the reason code (0x97 / 0x9F), so a client
//!   learns why; at most [`MAX_REFUSING`] such sockets wait at once, any more are closed at
//!   once, so refusing can never cost more than admitting.
//! - **Publish rate and bandwidth throttle** instead of disconnecting (0x96): the handler
//!   stops reading the socket until the bucket allows the next packet, TCP flow control pushes
//!   back on the client, nothing is lost and a client that bursts now and then is not kicked
//!   (and so does not come back as a reconnect storm). Deliveries to the throttled client and
//!   every other connection carry on.

mod rates;

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tiermq_common::config::LimitsSettings;
use tiermq_common::ReasonCode;

use rates::{Admit, AdmitPerIp, PublishRate, TokenBucket};

/// Sockets over a connection limit that may wait for their CONNECT (to be told why) at once.
pub const MAX_REFUSING: usize = 1024;

/// Which limit was hit: the `limit` label of `tiermq_limit_hits_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// `limits.max_connections`.
    Connections,
    /// A listener's `max_connections`.
    ListenerConnections,
    /// `limits.connection_rate`.
    ConnectionRate,
    /// `limits.connection_rate_per_ip`.
    ConnectionRatePerIp,
    /// `limits.publish_rate`: reads paused.
    PublishRate,
    /// `limits.publish_bandwidth`: reads paused.
    PublishBandwidth,
    /// `limits.max_topic_length`.
    TopicLength,
    /// `limits.max_topic_levels`.
    TopicLevels,
    /// `mqtt.max_client_id_len`.
    ClientIdLength,
    /// A client that does not read: its write buffer passed [`SLOW_READER_FACTOR`] ×
    /// `mqtt.max_write_buffer` with QoS1/2 deliveries, and it was disconnected.
    SlowReader,
}

/// A connection whose unwritten deliveries pass this many times `mqtt.max_write_buffer` is
/// closed (QoS0 is dropped already at 1×; QoS1/2 cannot be dropped, they stay in the session).
pub const SLOW_READER_FACTOR: usize = 4;

impl Limit {
    pub const ALL: [Limit; 10] = [
        Limit::Connections,
        Limit::ListenerConnections,
        Limit::ConnectionRate,
        Limit::ConnectionRatePerIp,
        Limit::PublishRate,
        Limit::PublishBandwidth,
        Limit::TopicLength,
        Limit::TopicLevels,
        Limit::ClientIdLength,
        Limit::SlowReader,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Limit::Connections => "max_connections",
            Limit::ListenerConnections => "listener_max_connections",
            Limit::ConnectionRate => "connection_rate",
            Limit::ConnectionRatePerIp => "connection_rate_per_ip",
            Limit::PublishRate => "publish_rate",
            Limit::PublishBandwidth => "publish_bandwidth",
            Limit::TopicLength => "max_topic_length",
            Limit::TopicLevels => "max_topic_levels",
            Limit::ClientIdLength => "max_client_id_len",
            Limit::SlowReader => "slow_reader",
        }
    }

    /// The CONNACK reason code of a refused connection (3.1.1 clients get the matching return
    /// code, 3 Server unavailable for the connection limits).
    pub fn connack_code(self) -> ReasonCode {
        match self {
            Limit::ConnectionRate | Limit::ConnectionRatePerIp => {
                ReasonCode::CONNECTION_RATE_EXCEEDED
            }
            Limit::ClientIdLength => ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
            Limit::TopicLength | Limit::TopicLevels => ReasonCode::TOPIC_NAME_INVALID,
            _ => ReasonCode::QUOTA_EXCEEDED,
        }
    }
}

/// The open sockets of one listener, against its own `max_connections`.
#[derive(Debug, Default)]
pub struct ListenerGauge {
    max: Option<usize>,
    open: AtomicUsize,
}

impl ListenerGauge {
    pub fn new(max: Option<usize>) -> Arc<ListenerGauge> {
        Arc::new(ListenerGauge {
            max: max.filter(|m| *m > 0),
            open: AtomicUsize::new(0),
        })
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

/// The node's limits and the counts they are checked against. Cloning shares them.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    settings: LimitsSettings,
    open: AtomicUsize,
    refusing: AtomicUsize,
    rate: Option<Admit>,
    per_ip: Option<AdmitPerIp>,
}

/// What a newly accepted socket may do. Holding it keeps the socket counted.
#[derive(Debug)]
pub struct Admission {
    /// `Some`: the socket is over this limit; read its CONNECT and refuse it.
    pub refused: Option<Limit>,
    _slot: Slot,
}

#[derive(Debug)]
enum Slot {
    Open(Limits, Arc<ListenerGauge>),
    Refusing(Limits),
}

impl Drop for Slot {
    fn drop(&mut self) {
        match self {
            Slot::Open(limits, listener) => {
                limits.inner.open.fetch_sub(1, Ordering::Relaxed);
                listener.open.fetch_sub(1, Ordering::Relaxed);
            }
            Slot::Refusing(limits) => {
                limits.inner.refusing.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

/// Increments `counter` unless that would pass `max`.
fn take_slot(counter: &AtomicUsize, max: Option<usize>) -> bool {
    let previous = counter.fetch_add(1, Ordering::Relaxed);
    if max.is_some_and(|m| previous >= m) {
        counter.fetch_sub(1, Ordering::Relaxed);
        false
    } else {
        true
    }
}

impl Limits {
    pub fn new(settings: LimitsSettings) -> Limits {
        let now = Instant::now();
        let rate = (settings.connection_rate > 0)
            .then(|| Admit::new(settings.connection_rate, settings.connection_burst, now));
        let per_ip = (settings.connection_rate_per_ip > 0)
            .then(|| AdmitPerIp::new(settings.connection_rate_per_ip, now));
        Limits {
            inner: Arc::new(Inner {
                settings,
                open: AtomicUsize::new(0),
                refusing: AtomicUsize::new(0),
                rate,
                per_ip,
            }),
        }
    }

    pub fn settings(&self) -> &LimitsSettings {
        &self.inner.settings
    }

    /// Open sockets counted against `max_connections`.
    pub fn open(&self) -> usize {
        self.inner.open.load(Ordering::Relaxed)
    }

    /// Admits a socket accepted on `listener` from `ip` at `now`. `Err`: over a limit while
    /// [`MAX_REFUSING`] refusals are already waiting; close the socket without a word.
    pub fn admit(
        &self,
        listener: &Arc<ListenerGauge>,
        ip: IpAddr,
        now: Instant,
    ) -> Result<Admission, Limit> {
        let refused = match self.check(listener, ip, now) {
            Ok(()) => {
                return Ok(Admission {
                    refused: None,
                    _slot: Slot::Open(self.clone(), listener.clone()),
                })
            }
            Err(limit) => limit,
        };
        if take_slot(&self.inner.refusing, Some(MAX_REFUSING)) {
            Ok(Admission {
                refused: Some(refused),
                _slot: Slot::Refusing(self.clone()),
            })
        } else {
            Err(refused)
        }
    }

    /// Rates first (a refused socket costs no connection slot), then the counts; on `Ok` the
    /// socket is counted in both.
    fn check(&self, listener: &ListenerGauge, ip: IpAddr, now: Instant) -> Result<(), Limit> {
        let s = &self.inner.settings;
        if let Some(per_ip) = &self.inner.per_ip {
            if !per_ip.try_take(ip, now) {
                return Err(Limit::ConnectionRatePerIp);
            }
        }
        if let Some(rate) = &self.inner.rate {
            if !rate.try_take(now) {
                return Err(Limit::ConnectionRate);
            }
        }
        let global = (s.max_connections > 0).then_some(s.max_connections);
        if !take_slot(&self.inner.open, global) {
            return Err(Limit::Connections);
        }
        if !take_slot(&listener.open, listener.max) {
            self.inner.open.fetch_sub(1, Ordering::Relaxed);
            return Err(Limit::ListenerConnections);
        }
        Ok(())
    }

    /// Checks a topic name or filter against `max_topic_length` and `max_topic_levels`.
    pub fn check_topic(&self, topic: &str) -> Result<(), Limit> {
        let s = &self.inner.settings;
        if topic.len() > s.max_topic_length {
            return Err(Limit::TopicLength);
        }
        // Levels are separators + 1; counting stops as soon as the limit is passed.
        if topic
            .bytes()
            .filter(|b| *b == b'/')
            .take(s.max_topic_levels)
            .count()
            >= s.max_topic_levels
        {
            return Err(Limit::TopicLevels);
        }
        Ok(())
    }

    /// A fresh throttle for one connection.
    pub fn throttle(&self, now: Instant) -> PublishThrottle {
        let s = &self.inner.settings;
        PublishThrottle {
            messages: (s.publish_rate > 0)
                .then(|| PublishRate::new(s.publish_rate, s.publish_burst, now)),
            bytes: (s.publish_bandwidth > 0).then(|| TokenBucket::new(s.publish_bandwidth, 0, now)),
        }
    }
}

/// One connection's publish rate and inbound bandwidth.
#[derive(Debug)]
pub struct PublishThrottle {
    messages: Option<PublishRate>,
    bytes: Option<TokenBucket>,
}

impl PublishThrottle {
    /// Whether packet sizes are needed (bandwidth limited).
    pub fn counts_bytes(&self) -> bool {
        self.bytes.is_some()
    }

    /// A packet of `size` bytes was read (`publish`: it is a PUBLISH). Returns how long to
    /// stop reading before the next packet, and which limit asks for it.
    pub fn on_packet(
        &mut self,
        publish: bool,
        size: usize,
        now: Instant,
    ) -> Option<(Duration, Limit)> {
        let by_rate = match (&mut self.messages, publish) {
            (Some(r), true) => r.on_publish(now),
            _ => None,
        };
        let by_bytes = self.bytes.as_mut().and_then(|b| b.take(size as f64, now));
        match (by_rate, by_bytes) {
            (Some(r), Some(b)) if b > r => Some((b, Limit::PublishBandwidth)),
            (Some(r), _) => Some((r, Limit::PublishRate)),
            (None, Some(b)) => Some((b, Limit::PublishBandwidth)),
            (None, None) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn limits(f: impl FnOnce(&mut LimitsSettings)) -> Limits {
        let mut s = LimitsSettings::default();
        f(&mut s);
        Limits::new(s)
    }

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn connection_counts_global_and_per_listener() {
        let l = limits(|s| s.max_connections = 3);
        let a = ListenerGauge::new(Some(2));
        let b = ListenerGauge::new(None);
        let t = Instant::now();
        let a1 = l.admit(&a, IP, t).unwrap();
        let a2 = l.admit(&a, IP, t).unwrap();
        assert_eq!((a1.refused, a2.refused), (None, None));
        let a3 = l.admit(&a, IP, t).unwrap();
        assert_eq!(a3.refused, Some(Limit::ListenerConnections));
        let b1 = l.admit(&b, IP, t).unwrap();
        assert_eq!(b1.refused, None);
        assert_eq!(
            l.admit(&b, IP, t).unwrap().refused,
            Some(Limit::Connections)
        );
        assert_eq!((l.open(), a.open(), b.open()), (3, 2, 1));
        // Refused sockets do not hold a slot; closing an admitted one frees one.
        drop(a3);
        drop(a1);
        assert_eq!((l.open(), a.open()), (2, 1));
        assert_eq!(l.admit(&a, IP, t).unwrap().refused, None);
    }

    #[test]
    fn refusals_waiting_are_bounded() {
        let l = limits(|s| s.max_connections = 1);
        let g = ListenerGauge::new(None);
        let t = Instant::now();
        let _open = l.admit(&g, IP, t).unwrap();
        let waiting: Vec<_> = (0..MAX_REFUSING)
            .map(|_| l.admit(&g, IP, t).unwrap())
            .collect();
        assert!(waiting
            .iter()
            .all(|a| a.refused == Some(Limit::Connections)));
        assert_eq!(l.admit(&g, IP, t).unwrap_err(), Limit::Connections);
        drop(waiting);
        assert!(l.admit(&g, IP, t).is_ok());
    }

    #[test]
    fn connection_rate_global_and_per_ip() {
        let l = limits(|s| {
            s.connection_rate = 100;
            s.connection_burst = 4;
            s.connection_rate_per_ip = 2;
        });
        let g = ListenerGauge::new(None);
        let t = Instant::now();
        let other = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
        let refused = |ip, at| l.admit(&g, ip, at).unwrap().refused;
        assert_eq!(refused(IP, t), None);
        assert_eq!(refused(IP, t), None);
        assert_eq!(refused(IP, t), Some(Limit::ConnectionRatePerIp));
        assert_eq!(refused(other, t), None);
        assert_eq!(refused(other, t), None);
        // Per IP fine, but the node's burst of 4 is spent.
        let third = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 3));
        assert_eq!(refused(third, t), Some(Limit::ConnectionRate));
        // 100/s global, 2/s per IP: after 500 ms both have a token again.
        assert_eq!(refused(IP, t + 500 * MS), None);
    }

    #[test]
    fn topic_length_and_levels() {
        let l = limits(|s| {
            s.max_topic_length = 10;
            s.max_topic_levels = 3;
        });
        assert_eq!(l.check_topic("a/b/c"), Ok(()));
        assert_eq!(l.check_topic("a/b/c/d"), Err(Limit::TopicLevels));
        assert_eq!(l.check_topic("//"), Ok(()));
        assert_eq!(l.check_topic("///"), Err(Limit::TopicLevels));
        assert_eq!(l.check_topic("0123456789"), Ok(()));
        assert_eq!(l.check_topic("0123456789a"), Err(Limit::TopicLength));
        let d = Limits::default();
        assert_eq!(d.check_topic(&"a/".repeat(127)), Ok(()));
        assert_eq!(d.check_topic(&"a/".repeat(128)), Err(Limit::TopicLevels));
    }

    #[test]
    fn throttle_pauses_for_the_tighter_limit() {
        let t = Instant::now();
        let none = limits(|_| {}).throttle(t);
        assert!(!none.counts_bytes());
        let mut open = none;
        assert!((0..10_000).all(|_| open.on_packet(true, 1 << 20, t).is_none()));

        let l = limits(|s| {
            s.publish_rate = 10;
            s.publish_burst = 2;
            s.publish_bandwidth = 1000;
        });
        let mut th = l.throttle(t);
        assert!(th.counts_bytes());
        assert_eq!(th.on_packet(true, 10, t), None);
        assert_eq!(th.on_packet(true, 10, t), None);
        // Third publish: 100 ms until the next token.
        let (wait, limit) = th.on_packet(true, 10, t).unwrap();
        assert_eq!(limit, Limit::PublishRate);
        assert!(wait > 99 * MS && wait <= 100 * MS, "{wait:?}");
        // A PINGREQ costs no message token, only bytes; a big packet: the bandwidth decides.
        let t2 = t + Duration::from_secs(10);
        assert_eq!(th.on_packet(false, 2, t2), None);
        let (wait, limit) = th.on_packet(true, 3000, t2).unwrap();
        assert_eq!(limit, Limit::PublishBandwidth);
        // 1000 saved up, 2 spent on the ping, 3000 more: 2002 bytes of debt at 1000/s.
        assert_eq!(wait, 2002 * MS);
    }
}

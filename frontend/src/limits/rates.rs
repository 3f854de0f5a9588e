//! The rate limits of [`super`]: connection rate (node and per source address) and publish
//! rate on `governor`'s GCRA limiters, inbound bandwidth on a token bucket of our own.
//!
//! Time is what the caller passes in ([`PassedClock`]), as before governor: the listener and
//! the handler read the clock once per event, and the tests step time without sleeping.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::HashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

/// Source addresses tracked by the per-IP connection rate; beyond it idle ones are forgotten.
pub(super) const MAX_TRACKED_IPS: usize = 65_536;

/// governor's clock, set by the caller: nanoseconds since the limiter was made. It never goes
/// back (a `now` older than one already seen, read by another thread a moment earlier, counts
/// as the newest one).
#[derive(Debug)]
pub struct PassedClock {
    base: Instant,
    nanos: AtomicU64,
}

impl PassedClock {
    fn new(base: Instant) -> PassedClock {
        PassedClock {
            base,
            nanos: AtomicU64::new(0),
        }
    }

    fn advance_to(&self, now: Instant) {
        let since = now.saturating_duration_since(self.base).as_nanos();
        self.nanos
            .fetch_max(u64::try_from(since).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

impl Clock for PassedClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.nanos.load(Ordering::Relaxed))
    }
}

type Direct = RateLimiter<NotKeyed, InMemoryState, PassedClock, NoOpMiddleware<Nanos>>;
type Keyed = RateLimiter<IpAddr, HashMapStateStore<IpAddr>, PassedClock, NoOpMiddleware<Nanos>>;

/// `rate` per second with `burst` saved up at most; a `burst` of 0 means one second's worth.
fn quota(rate: u32, burst: u32) -> Quota {
    let rate = NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(rate).allow_burst(NonZeroU32::new(burst).unwrap_or(rate))
}

/// All or nothing: admits an event when the rate allows it.
#[derive(Debug)]
pub struct Admit(Direct);

impl Admit {
    pub fn new(rate: u32, burst: u32, now: Instant) -> Admit {
        Admit(RateLimiter::direct_with_clock(
            quota(rate, burst),
            PassedClock::new(now),
        ))
    }

    pub fn try_take(&self, now: Instant) -> bool {
        self.0.clock().advance_to(now);
        self.0.check().is_ok()
    }
}

/// [`Admit`] per source address (governor's keyed limiter), one second's worth of burst each,
/// tracking at most [`MAX_TRACKED_IPS`] addresses: a new one past it makes the idle ones
/// (bucket full again) forgotten, and when every one is busy, all of them (the memory bound
/// wins over the limit).
#[derive(Debug)]
pub struct AdmitPerIp {
    quota: Quota,
    base: Instant,
    /// Replaced whole when every tracked source is busy (governor has no `clear`).
    limiter: RwLock<Keyed>,
}

impl AdmitPerIp {
    pub fn new(rate: u32, now: Instant) -> AdmitPerIp {
        let quota = quota(rate, 0);
        AdmitPerIp {
            quota,
            base: now,
            limiter: RwLock::new(Keyed::hashmap_with_clock(quota, PassedClock::new(now))),
        }
    }

    pub fn try_take(&self, ip: IpAddr, now: Instant) -> bool {
        let allowed = {
            let limiter = self.limiter.read().unwrap_or_else(|e| e.into_inner());
            limiter.clock().advance_to(now);
            // A new address is added here, so the count passes the bound by one at most
            // (per thread) before the housekeeping below.
            let allowed = limiter.check_key(&ip).is_ok();
            if limiter.len() <= MAX_TRACKED_IPS {
                return allowed;
            }
            limiter.retain_recent();
            if limiter.len() <= MAX_TRACKED_IPS {
                return allowed;
            }
            allowed
        };
        let mut limiter = self.limiter.write().unwrap_or_else(|e| e.into_inner());
        if limiter.len() > MAX_TRACKED_IPS {
            // Every tracked source is busy: forget them rather than grow; only this new one
            // keeps its charge. The clock keeps its base so that time stays comparable with
            // what other threads pass in.
            let clock = PassedClock::new(self.base);
            clock.advance_to(now);
            *limiter = Keyed::hashmap_with_clock(self.quota, clock);
            let _ = limiter.check_key(&ip);
        }
        allowed
    }

    /// Source addresses tracked now.
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.limiter.read().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// One connection's publish rate: the handler has read the PUBLISH already and lets it pass,
/// then stops reading until the rate allows the next one ("pause until allowed"). A PUBLISH
/// read while the rate has no room is *owed* and paid from the next cells the rate frees, so
/// pausing never makes the rate more generous than configured.
#[derive(Debug)]
pub struct PublishRate {
    limiter: Direct,
    /// PUBLISH packets let through without a cell, paid before any later one.
    owed: u32,
}

impl PublishRate {
    pub fn new(rate: u32, burst: u32, now: Instant) -> PublishRate {
        PublishRate {
            limiter: RateLimiter::direct_with_clock(quota(rate, burst), PassedClock::new(now)),
            owed: 0,
        }
    }

    /// Charges one PUBLISH; returns how long to stop reading, `None` when it was within the
    /// rate.
    pub fn on_publish(&mut self, now: Instant) -> Option<Duration> {
        let clock = self.limiter.clock();
        clock.advance_to(now);
        // Each `Ok` takes a cell, so the loop ends after `owed + 1` turns at most.
        let denied = loop {
            match self.limiter.check() {
                Ok(_) if self.owed > 0 => self.owed -= 1,
                Ok(_) => return None,
                Err(not_until) => break not_until,
            }
        };
        self.owed = self.owed.saturating_add(1);
        // Until the first owed cell is there, plus one interval for every further one.
        let rest = denied.quota().replenish_interval() * (self.owed - 1);
        Some(denied.wait_time_from(clock.now()) + rest)
    }
}

/// A token bucket for inbound bytes: `rate` bytes per second, one second's worth saved up.
///
/// Hand-written because governor cannot express it: governor's `check_n` refuses a cost
/// larger than the burst outright (`InsufficientCapacity`), but a packet larger than one
/// second's worth of bandwidth must still pass, followed by the silence it costs (a debt).
/// Its cost is also a `u32` of cells at one-nanosecond resolution at best, which a rate
/// above 10^9 bytes per second would not fit.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket; a `burst` of 0 means one second's worth of `rate`.
    pub fn new(rate: u64, burst: u64, now: Instant) -> TokenBucket {
        let rate = rate.max(1) as f64;
        let burst = if burst == 0 { rate } else { burst as f64 };
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = self.last.max(now);
    }

    /// Takes `cost` tokens even when that leaves a debt (one packet larger than the burst must
    /// still pass eventually) and says how long until the balance is back at zero, which is
    /// how long the caller should wait before the next packet. `None`: no wait.
    pub fn take(&mut self, cost: f64, now: Instant) -> Option<Duration> {
        self.refill(now);
        self.tokens -= cost;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn admit_bursts_then_refills_at_its_rate() {
        let t0 = Instant::now();
        let b = Admit::new(10, 3, t0);
        assert!((0..3).all(|_| b.try_take(t0)));
        assert!(!b.try_take(t0));
        // 10/s: one token every 100 ms.
        assert!(!b.try_take(t0 + 99 * MS));
        assert!(b.try_take(t0 + 100 * MS));
        assert!(!b.try_take(t0 + 150 * MS));
        // Never more than the burst saved up, however long it was idle.
        let later = t0 + Duration::from_secs(60);
        assert!((0..3).all(|_| b.try_take(later)));
        assert!(!b.try_take(later));
        // Time running backwards (another thread's `now`) gives nothing back.
        assert!(!b.try_take(t0));
    }

    #[test]
    fn burst_zero_is_one_seconds_worth() {
        let t0 = Instant::now();
        let b = Admit::new(5, 0, t0);
        assert_eq!((0..10).filter(|_| b.try_take(t0)).count(), 5);
    }

    #[test]
    fn per_ip_memory_is_bounded() {
        let t0 = Instant::now();
        let l = AdmitPerIp::new(1, t0);
        let ip = |i: usize| IpAddr::V6(std::net::Ipv6Addr::from(i as u128));
        for i in 0..MAX_TRACKED_IPS {
            assert!(l.try_take(ip(i), t0));
        }
        assert_eq!(l.tracked(), MAX_TRACKED_IPS);
        // A known address over its rate is refused, and nothing is forgotten for it.
        assert!(!l.try_take(ip(0), t0), "address 0 spent its second");
        assert_eq!(l.tracked(), MAX_TRACKED_IPS);
        // All busy: one more address forgets them all rather than grow.
        assert!(l.try_take(ip(MAX_TRACKED_IPS), t0));
        assert_eq!(l.tracked(), 1);
        // Fill up again; two seconds later they are idle and make room one by one.
        for i in 0..MAX_TRACKED_IPS - 1 {
            assert!(l.try_take(ip(i), t0));
        }
        let later = t0 + Duration::from_secs(2);
        assert!(l.try_take(ip(MAX_TRACKED_IPS + 1), later));
        assert_eq!(l.tracked(), 1);
    }

    #[test]
    fn publish_rate_pauses_until_allowed_and_charges_what_it_let_through() {
        let t0 = Instant::now();
        // 10/s, burst 2.
        let mut r = PublishRate::new(10, 2, t0);
        assert_eq!(r.on_publish(t0), None);
        assert_eq!(r.on_publish(t0), None);
        // The third is let through and owed: pause until its cell is there.
        assert_eq!(r.on_publish(t0), Some(100 * MS));
        // Read during the pause anyway: owed too, the pause covers both.
        assert_eq!(r.on_publish(t0 + 50 * MS), Some(150 * MS));
        // After the pause the debt is paid and the next publish waits its own turn: the rate
        // stays at 10/s however the reads were paced.
        assert_eq!(r.on_publish(t0 + 200 * MS), Some(100 * MS));
        // A client that sends as fast as it is read, for a second.
        let (mut read, mut at) = (0, t0 + 300 * MS);
        while at < t0 + 1300 * MS {
            read += 1;
            if let Some(pause) = r.on_publish(at) {
                at += pause;
            }
        }
        assert_eq!(read, 10, "publishes read in a second at 10/s");
    }

    #[test]
    fn bucket_debt_says_how_long_to_wait() {
        let t0 = Instant::now();
        // 1000 bytes/s, burst 1000: a 3000-byte packet passes and costs 2 s of silence.
        let mut b = TokenBucket::new(1000, 0, t0);
        assert_eq!(b.take(500.0, t0), None);
        assert_eq!(b.take(2500.0, t0), Some(2000 * MS));
        // Time running backwards (another thread's `now`) changes nothing.
        assert_eq!(b.take(0.0, t0 - 10 * MS), Some(2000 * MS));
        assert_eq!(b.take(0.0, t0 + 2000 * MS), None);
    }
}

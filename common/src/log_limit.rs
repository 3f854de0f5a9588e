//! Rate-limited warnings: at most one per key per interval.
//!
//! Some warnings repeat for as long as a condition lasts — a backend that stays unreachable,
//! a peer stream that keeps breaking, a client that keeps sending the same bad packet. Logged
//! every time, they bury everything else (and cost disk) exactly when an operator reads the
//! logs. [`LogLimiter`] lets the first one of a key through, swallows the repeats for
//! `interval`, and when the next one passes reports how many were swallowed meanwhile, in a
//! line of its own: `N similar warnings suppressed`. [`warn_limited!`](crate::warn_limited)
//! wraps it for call sites.
//!
//! The clock is injectable ([`LogLimiter::check_at`]) so the rule is tested without sleeping.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Keys remembered at most; beyond that, keys quiet for a whole interval are forgotten (a
/// bound for keys built from peer addresses or ids).
const MAX_KEYS: usize = 1024;

/// At most one warning per key per `interval` (see the module doc).
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    keys: Mutex<BTreeMap<String, Slot>>,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    /// When a warning of this key was last let through.
    logged: Instant,
    /// Repeats swallowed since then.
    suppressed: u64,
}

impl LogLimiter {
    /// A limiter letting one warning per key through every `interval`; `const` so that a
    /// call site can keep its own in a `static`.
    pub const fn new(interval: Duration) -> LogLimiter {
        LogLimiter {
            interval,
            keys: Mutex::new(BTreeMap::new()),
        }
    }

    /// Whether a warning of `key` may be logged now: `Some(n)` when it may, `n` being the
    /// warnings of that key swallowed since the last one logged; `None` when it is a repeat
    /// to swallow.
    pub fn check(&self, key: &str) -> Option<u64> {
        self.check_at(key, Instant::now())
    }

    /// [`check`](Self::check) at a given time (tests).
    pub fn check_at(&self, key: &str, now: Instant) -> Option<u64> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = keys.get_mut(key) {
            if now.saturating_duration_since(slot.logged) < self.interval {
                slot.suppressed += 1;
                return None;
            }
            let n = slot.suppressed;
            *slot = Slot {
                logged: now,
                suppressed: 0,
            };
            return Some(n);
        }
        if keys.len() >= MAX_KEYS {
            let interval = self.interval;
            keys.retain(|_, s| now.saturating_duration_since(s.logged) < interval);
            if keys.len() >= MAX_KEYS {
                // Still full of live keys: let this one through unremembered rather than
                // grow without bound.
                return Some(0);
            }
        }
        keys.insert(
            key.to_string(),
            Slot {
                logged: now,
                suppressed: 0,
            },
        );
        Some(0)
    }
}

/// `warn!` at most once per key per interval of `$limiter` (a [`LogLimiter`]); when repeats
/// were swallowed, a line `N similar warnings suppressed` precedes the next one let through.
///
/// ```ignore
/// static LIMIT: LogLimiter = LogLimiter::new(Duration::from_secs(30));
/// warn_limited!(LIMIT, &format!("ops-lost-{node}"), node, "ops stream to backend lost");
/// ```
#[macro_export]
macro_rules! warn_limited {
    ($limiter:expr, $key:expr, $($arg:tt)+) => {{
        let key: &str = $key;
        if let Some(suppressed) = $limiter.check(key) {
            if suppressed > 0 {
                ::tracing::warn!(suppressed, key, "{} similar warnings suppressed", suppressed);
            }
            ::tracing::warn!($($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn one_per_key_per_interval_then_the_count_of_the_swallowed() {
        let l = LogLimiter::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(l.check_at("a", t0), Some(0));
        assert_eq!(l.check_at("a", t0 + SEC), None);
        assert_eq!(l.check_at("a", t0 + 9 * SEC), None);
        // Another key has its own budget.
        assert_eq!(l.check_at("b", t0 + SEC), Some(0));
        // The interval is over: through, reporting the two swallowed.
        assert_eq!(l.check_at("a", t0 + 10 * SEC), Some(2));
        assert_eq!(l.check_at("a", t0 + 11 * SEC), None);
        // Quiet for long: through with nothing swallowed... except the one just above.
        assert_eq!(l.check_at("a", t0 + 100 * SEC), Some(1));
        assert_eq!(l.check_at("a", t0 + 200 * SEC), Some(0));
    }

    #[test]
    fn the_key_set_stays_bounded() {
        let l = LogLimiter::new(Duration::from_secs(10));
        let t0 = Instant::now();
        for i in 0..MAX_KEYS {
            assert_eq!(l.check_at(&format!("k{i}"), t0), Some(0));
        }
        // Full of live keys: a new one passes unremembered, so it passes again.
        assert_eq!(l.check_at("new", t0), Some(0));
        assert_eq!(l.check_at("new", t0), Some(0));
        // Once the old keys are quiet for an interval they make room.
        assert_eq!(l.check_at("new", t0 + 20 * SEC), Some(0));
        assert_eq!(l.check_at("new", t0 + 21 * SEC), None);
        assert_eq!(l.keys.lock().unwrap().len(), 1);
    }

    #[test]
    fn the_macro_logs_only_what_passes() {
        static LIMIT: LogLimiter = LogLimiter::new(Duration::from_secs(3600));
        for i in 0..5 {
            crate::warn_limited!(LIMIT, "macro-test", attempt = i, "something keeps failing");
        }
        // The first went through, the other four were counted.
        assert_eq!(LIMIT.keys.lock().unwrap()["macro-test"].suppressed, 4);
    }
}

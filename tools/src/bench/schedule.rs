//! Open-loop send schedule: message `k` of a publisher is due at `start + k / rate`, whatever
//! happened to the messages before it.

/// A fixed-rate schedule in [`super::payload::now_ns`] time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Due time of message 0.
    pub start_ns: u64,
    /// Messages per second; 0 = as fast as possible (then nothing is "due" in advance).
    pub rate: u64,
    /// No message is scheduled at or after this time.
    pub end_ns: u64,
}

impl Schedule {
    /// A schedule for publisher `index` of `count`: publishers are phase-shifted evenly within
    /// one interval so they do not all fire in the same instant.
    pub fn staggered(start_ns: u64, end_ns: u64, rate: u64, index: u64, count: u64) -> Schedule {
        let offset = if rate == 0 || count == 0 {
            0
        } else {
            (1_000_000_000u128 * u128::from(index % count) / (u128::from(rate) * u128::from(count)))
                as u64
        };
        Schedule {
            start_ns: start_ns + offset,
            rate,
            end_ns,
        }
    }

    /// Intended send time of message `k`.
    pub fn intended_ns(&self, k: u64) -> u64 {
        if self.rate == 0 {
            return self.start_ns;
        }
        self.start_ns + (u128::from(k) * 1_000_000_000 / u128::from(self.rate)) as u64
    }

    /// How many messages are due at `now` (messages `0..due` should have been sent), capped by
    /// the end of the schedule.
    pub fn due(&self, now_ns: u64) -> u64 {
        if now_ns < self.start_ns || self.rate == 0 {
            return 0;
        }
        let now = now_ns.min(self.end_ns.saturating_sub(1));
        if now < self.start_ns {
            return 0;
        }
        ((u128::from(now - self.start_ns) * u128::from(self.rate) / 1_000_000_000) + 1) as u64
    }

    /// Total messages in the schedule.
    pub fn total(&self) -> u64 {
        if self.rate == 0 {
            return u64::MAX;
        }
        self.due(self.end_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn due_counts_follow_the_rate() {
        let s = Schedule {
            start_ns: 10 * S,
            rate: 1000,
            end_ns: 12 * S,
        };
        assert_eq!(s.due(5 * S), 0);
        assert_eq!(s.due(10 * S), 1);
        assert_eq!(s.due(10 * S + 999_999), 1);
        assert_eq!(s.due(10 * S + 1_000_000), 2);
        assert_eq!(s.due(11 * S), 1001);
        assert_eq!(s.total(), 2000);
        assert_eq!(s.due(100 * S), 2000);
        assert_eq!(s.intended_ns(0), 10 * S);
        assert_eq!(s.intended_ns(1999), 10 * S + 1_999_000_000);
        // Every scheduled message is due strictly before the end.
        assert!(s.intended_ns(s.total() - 1) < s.end_ns);
        assert!(s.intended_ns(s.total()) >= s.end_ns);
    }

    #[test]
    fn odd_rates_do_not_drift() {
        let s = Schedule {
            start_ns: 0,
            rate: 3,
            end_ns: 10 * S,
        };
        assert_eq!(s.total(), 30);
        assert_eq!(s.intended_ns(3), S);
        assert_eq!(s.intended_ns(29), 9 * S + 666_666_666);
    }

    #[test]
    fn staggering_spreads_publishers_within_one_interval() {
        let a = Schedule::staggered(0, S, 100, 0, 4);
        let b = Schedule::staggered(0, S, 100, 1, 4);
        let d = Schedule::staggered(0, S, 100, 3, 4);
        assert_eq!(a.start_ns, 0);
        assert_eq!(b.start_ns, 2_500_000);
        assert_eq!(d.start_ns, 7_500_000);
        // The offset never reaches a whole interval, so totals stay within one message.
        assert!(d.total() >= a.total() - 1);
    }

    #[test]
    fn max_rate_has_no_schedule() {
        let s = Schedule::staggered(0, S, 0, 3, 4);
        assert_eq!(s.due(S / 2), 0);
        assert_eq!(s.total(), u64::MAX);
    }
}

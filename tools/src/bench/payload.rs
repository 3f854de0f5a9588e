//! The bench payload: a fixed header the subscribers read back, then padding.
//!
//! | bytes  | field                                                                      |
//! |--------|----------------------------------------------------------------------------|
//! | 0..8   | intended send time, ns since the bench's clock epoch ([`now_ns`]), LE       |
//! | 8..12  | publisher id, LE                                                           |
//! | 12..20 | sequence number within that publisher, LE (starts at 0)                    |
//! | 20..   | zero padding up to the requested payload size                              |
//!
//! The timestamp is the time the message was *scheduled*, not the time it was written: a
//! publisher that falls behind (socket full, flow-control window closed) still charges the
//! whole delay to the latency (coordinated-omission correction).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::BufMut;

/// Bytes taken by the header; smaller payloads are rounded up to this.
pub const HEADER_LEN: usize = 20;

/// The header of one bench message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub sent_ns: u64,
    pub publisher: u32,
    pub seq: u64,
}

impl Stamp {
    /// Writes the header into the first [`HEADER_LEN`] bytes of `out`.
    pub fn write_into(&self, out: &mut [u8]) {
        out[0..8].copy_from_slice(&self.sent_ns.to_le_bytes());
        out[8..12].copy_from_slice(&self.publisher.to_le_bytes());
        out[12..20].copy_from_slice(&self.seq.to_le_bytes());
    }

    /// A payload of `size` bytes (at least [`HEADER_LEN`]).
    pub fn to_payload(&self, size: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(size.max(HEADER_LEN));
        v.put_u64_le(self.sent_ns);
        v.put_u32_le(self.publisher);
        v.put_u64_le(self.seq);
        v.resize(size.max(HEADER_LEN), 0);
        v
    }

    /// Reads a header; `None` if the payload is too short to be a bench message.
    pub fn read(payload: &[u8]) -> Option<Stamp> {
        if payload.len() < HEADER_LEN {
            return None;
        }
        Some(Stamp {
            sent_ns: u64::from_le_bytes(payload[0..8].try_into().ok()?),
            publisher: u32::from_le_bytes(payload[8..12].try_into().ok()?),
            seq: u64::from_le_bytes(payload[12..20].try_into().ok()?),
        })
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Monotonic nanoseconds since the bench process's clock epoch (the first call).
pub fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

/// The `Instant` of a [`now_ns`] value, for timers.
pub fn instant_of(ns: u64) -> Instant {
    epoch() + Duration::from_nanos(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let s = Stamp {
            sent_ns: 0x0102_0304_0506_0708,
            publisher: 77,
            seq: u64::MAX - 3,
        };
        let p = s.to_payload(64);
        assert_eq!(p.len(), 64);
        assert_eq!(Stamp::read(&p), Some(s));
        assert!(p[HEADER_LEN..].iter().all(|&b| b == 0));
        let mut q = vec![0xFFu8; 30];
        s.write_into(&mut q);
        assert_eq!(Stamp::read(&q), Some(s));
    }

    #[test]
    fn small_payloads_are_rounded_up_and_short_ones_refused() {
        let s = Stamp {
            sent_ns: 5,
            publisher: 1,
            seq: 2,
        };
        assert_eq!(s.to_payload(4).len(), HEADER_LEN);
        assert_eq!(Stamp::read(&[0u8; HEADER_LEN - 1]), None);
    }

    #[test]
    fn clock_is_monotonic_and_convertible() {
        let a = now_ns();
        let b = now_ns();
        assert!(b >= a);
        let i = instant_of(b);
        assert!(i <= Instant::now());
    }
}

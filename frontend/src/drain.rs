//! Draining a frontend before maintenance: stop accepting, move every client elsewhere, exit.
//!
//! One [`Drain`] per node, shared by the listener and every connection (through
//! [`crate::FrontendConfig::drain`]). [`Drain::start`] is the signal; from then on:
//!
//! - the listener stops accepting new sockets (and a CONNECT still in progress is answered
//!   CONNACK 0x9C Use another server, with the Server Reference, for v5);
//! - every MQTT 5 connection answers what the partitions already accepted from it, tells the
//!   partitions it closes *normally* (the session stays, the will is discarded — see
//!   `docs/operations.md`), and gets DISCONNECT 0x9C Use another server with the configured
//!   Server Reference;
//! - MQTT 3.1.1 connections, which cannot be told where to go, are closed the same way but
//!   paced at `drain_rate` per second ([`Drain::reserve_slot`]), so their reconnects do not
//!   arrive at the other frontends all at once. They keep being served until their turn.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The drain signal and its settings. Cloning shares it.
#[derive(Clone)]
pub struct Drain {
    inner: Arc<Inner>,
}

struct Inner {
    started: CancellationToken,
    /// Server Reference sent with 0x9C (§4.11: references separated by spaces); `None`:
    /// 0x9C alone.
    server_reference: Option<String>,
    /// Time between two paced closes; zero closes all at once.
    interval: Duration,
    /// The next free slot of the paced closes.
    next_slot: Mutex<Option<Instant>>,
    /// Connection tasks alive ([`Drain::track`]), whatever their listener.
    connections: AtomicUsize,
    /// Signalled when `connections` drops to 0.
    idle: Notify,
}

/// Counts one connection task while it lives.
pub struct ConnectionGuard(Drain);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.0.inner.connections.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.inner.idle.notify_waiters();
        }
    }
}

impl std::fmt::Debug for Drain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drain")
            .field("draining", &self.is_draining())
            .field("server_reference", &self.inner.server_reference)
            .field("interval", &self.inner.interval)
            .finish()
    }
}

/// Paced closes per second unless configured.
pub const DEFAULT_DRAIN_RATE: u32 = 500;

impl Default for Drain {
    fn default() -> Self {
        Drain::new(&[], DEFAULT_DRAIN_RATE)
    }
}

impl Drain {
    /// `server_references`: where clients should go (`host:port` each), joined with spaces
    /// into one Server Reference; `rate`: paced closes per second, 0 = no pacing.
    pub fn new(server_references: &[String], rate: u32) -> Drain {
        let refs: Vec<&str> = server_references
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .collect();
        Drain {
            inner: Arc::new(Inner {
                started: CancellationToken::new(),
                server_reference: (!refs.is_empty()).then(|| refs.join(" ")),
                interval: if rate == 0 {
                    Duration::ZERO
                } else {
                    Duration::from_secs(1) / rate
                },
                next_slot: Mutex::new(None),
                connections: AtomicUsize::new(0),
                idle: Notify::new(),
            }),
        }
    }

    /// Starts draining. Returns `false` when it had already started.
    pub fn start(&self) -> bool {
        let first = !self.inner.started.is_cancelled();
        self.inner.started.cancel();
        first
    }

    pub fn is_draining(&self) -> bool {
        self.inner.started.is_cancelled()
    }

    /// Resolves once draining has started.
    pub async fn started(&self) {
        self.inner.started.cancelled().await
    }

    pub fn server_reference(&self) -> Option<&str> {
        self.inner.server_reference.as_deref()
    }

    /// Counts a connection task until the guard is dropped.
    pub fn track(&self) -> ConnectionGuard {
        self.inner.connections.fetch_add(1, Ordering::AcqRel);
        ConnectionGuard(self.clone())
    }

    /// Connection tasks alive now (from CONNECT read to close).
    pub fn connections(&self) -> usize {
        self.inner.connections.load(Ordering::Acquire)
    }

    /// Resolves when no connection task is left.
    pub async fn idle(&self) {
        loop {
            let notified = self.inner.idle.notified();
            tokio::pin!(notified);
            // Registered before the check, so a drop to 0 in between is not missed.
            notified.as_mut().enable();
            if self.connections() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Reserves the next paced close and returns when it is due: slots are `1 / rate` apart,
    /// the first one now.
    pub fn reserve_slot(&self) -> Instant {
        let now = Instant::now();
        let mut next = self
            .inner
            .next_slot
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let at = next.map_or(now, |n| n.max(now));
        *next = Some(at + self.inner.interval);
        at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_joined_with_spaces() {
        let d = Drain::new(&["a:1883".into(), " ".into(), "b:1883 ".into()], 10);
        assert_eq!(d.server_reference(), Some("a:1883 b:1883"));
        assert_eq!(Drain::new(&[], 10).server_reference(), None);
    }

    #[test]
    fn start_is_idempotent() {
        let d = Drain::default();
        assert!(!d.is_draining());
        assert!(d.start());
        assert!(!d.start());
        assert!(d.clone().is_draining());
    }

    #[tokio::test]
    async fn idle_once_every_connection_is_gone() {
        let d = Drain::default();
        d.idle().await;
        let a = d.track();
        let b = d.track();
        assert_eq!(d.connections(), 2);
        let waiter = tokio::spawn({
            let d = d.clone();
            async move { d.idle().await }
        });
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(b);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("idle after the last connection")
            .unwrap();
    }

    #[test]
    fn slots_are_paced_at_the_rate() {
        let d = Drain::new(&[], 100);
        let slots: Vec<Instant> = (0..5).map(|_| d.reserve_slot()).collect();
        // Reserved faster than one per 10 ms: each slot is exactly one interval after the
        // previous one.
        for (i, s) in slots.iter().enumerate() {
            assert_eq!(*s - slots[0], Duration::from_millis(10 * i as u64));
        }
        let unpaced = Drain::new(&[], 0);
        unpaced.reserve_slot();
        assert!(
            unpaced.reserve_slot() <= Instant::now(),
            "no pacing: due at once"
        );
    }
}

//! The connections of this frontend by client id, so that a CONNECT taking over a session
//! first lets the connection it replaces finish reading what its client already sent.
//!
//! Why: a client that sends DISCONNECT 0x00, closes and reconnects at once has two connections
//! here. Were the new CONNECT to reach the session's partition before the old connection's
//! DISCONNECT, the partition would see the takeover of a live connection: it would publish the
//! will, which a DISCONNECT 0x00 discards (3.1.2-10, 3.14.4), and resume a session that the
//! DISCONNECT ended (Session Expiry Interval 0: Session Present 1 instead of 0). The bytes of
//! that DISCONNECT are already in the old socket's buffer when the new CONNECT is read, so the
//! new connection asks the old one to read what it has and waits until it did (and, if that
//! ended it, until its end is recorded) before it opens the session: the partition then sees
//! the two in the order the client sent them. The wait is bounded ([`TAKEOVER_WAIT`]): an old
//! connection busy elsewhere (a partition call during a failover) does not hold up the new one
//! for longer. A reconnect through another frontend is not ordered this way.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};

/// The longest a CONNECT waits for the connection it takes over to read what it has.
pub const TAKEOVER_WAIT: Duration = Duration::from_secs(1);

/// The live connections of one frontend by client id. Cloning shares them.
#[derive(Clone, Default)]
pub struct LiveConnections {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    by_client: Mutex<HashMap<Arc<str>, Arc<Live>>>,
    next_id: AtomicU64,
}

struct Live {
    id: u64,
    /// A newer connection of the same client asks this one to read what it has.
    wrap_up: Notify,
    /// Bumped each time the connection has done so (or recorded its end).
    settled: watch::Sender<u64>,
}

impl std::fmt::Debug for LiveConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.inner.by_client.lock().map(|m| m.len()).unwrap_or(0);
        f.debug_struct("LiveConnections")
            .field("connections", &n)
            .finish()
    }
}

impl LiveConnections {
    /// At CONNECT, before the session is opened: lets the connection of `client_id` on this
    /// frontend, if any, read what its client already sent (at most [`TAKEOVER_WAIT`]), then
    /// records this connection as the client's.
    pub async fn enter(&self, client_id: &Arc<str>) -> LiveEntry {
        let previous = self.lock().get(client_id).cloned();
        if let Some(old) = previous {
            let mut settled = old.settled.subscribe();
            settled.borrow_and_update();
            old.wrap_up.notify_one();
            // `changed` also returns when the old connection is gone (its sender dropped).
            let _ = tokio::time::timeout(TAKEOVER_WAIT, settled.changed()).await;
        }
        let live = Arc::new(Live {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            wrap_up: Notify::new(),
            settled: watch::Sender::new(0),
        });
        self.lock().insert(client_id.clone(), live.clone());
        LiveEntry {
            connections: self.clone(),
            client_id: client_id.clone(),
            live,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<Live>>> {
        self.inner
            .by_client
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

/// One connection's place in [`LiveConnections`], for as long as it lives.
pub struct LiveEntry {
    connections: LiveConnections,
    client_id: Arc<str>,
    live: Arc<Live>,
}

impl LiveEntry {
    /// Resolves when a newer connection of the same client asks this one to read what it has
    /// (a request made while nobody waits here is kept for the next call).
    pub async fn wrap_up_requested(&self) {
        self.live.wrap_up.notified().await
    }

    /// Tells the waiting newer connection that this one has read what it had, or recorded
    /// how it ended.
    pub fn settled(&self) {
        self.live.settled.send_modify(|n| *n += 1);
    }
}

impl Drop for LiveEntry {
    fn drop(&mut self) {
        let mut map = self.connections.lock();
        if map
            .get(&self.client_id)
            .is_some_and(|l| l.id == self.live.id)
        {
            map.remove(&self.client_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_takeover_waits_until_the_old_connection_settled() {
        let live = LiveConnections::default();
        let id: Arc<str> = Arc::from("c");
        let old = live.enter(&id).await;
        let taker = tokio::spawn({
            let live = live.clone();
            let id = id.clone();
            async move { live.enter(&id).await }
        });
        // The request is kept until the old connection looks.
        tokio::time::timeout(Duration::from_millis(500), old.wrap_up_requested())
            .await
            .expect("asked to wrap up");
        assert!(!taker.is_finished());
        old.settled();
        let new = tokio::time::timeout(Duration::from_millis(500), taker)
            .await
            .expect("the new connection proceeds once the old one settled")
            .unwrap();
        drop(old);
        assert_eq!(live.lock().get(&id).map(|l| l.id), Some(new.live.id));
        drop(new);
        assert!(live.lock().is_empty());
    }

    #[tokio::test]
    async fn an_old_connection_that_does_not_answer_holds_up_the_new_one_at_most_the_bound() {
        let live = LiveConnections::default();
        let id: Arc<str> = Arc::from("c");
        let _old = live.enter(&id).await;
        let started = tokio::time::Instant::now();
        let _new = tokio::time::timeout(TAKEOVER_WAIT * 3, live.enter(&id))
            .await
            .expect("bounded");
        assert!(started.elapsed() >= TAKEOVER_WAIT);
    }
}

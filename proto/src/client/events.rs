//! Events for this frontend's connections: the event streams from the backends
//! ([`event_stream`]) and the registry that hands each event to the connection owning
//! `(client id, epoch)`.

use super::*;

#[derive(Default)]
pub(super) struct Sessions {
    pub(super) live: HashMap<Arc<str>, (u64, mpsc::UnboundedSender<SessionEvent>)>,
    /// Events that arrived before their CONNECT's reply (the leader dispatches at apply).
    early: HashMap<(Arc<str>, u64), Vec<SessionEvent>>,
}

impl GrpcPartitions {
    /// Routes the events of connection `epoch` of `client_id` to `tx`. Two CONNECTs of one
    /// client id on this frontend can have their replies arrive in the other order: a newer
    /// epoch registered first has taken the session over, so the older connection is told so
    /// (DISCONNECT 0x8E) instead of replacing it, which would leave the live connection deaf.
    pub(super) fn register(
        &self,
        client_id: &Arc<str>,
        epoch: u64,
        tx: mpsc::UnboundedSender<SessionEvent>,
    ) {
        let mut s = self
            .inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if s.live.get(client_id).is_some_and(|(e, _)| *e > epoch) {
            s.early.remove(&(client_id.clone(), epoch));
            let _ = tx.send(SessionEvent::Disconnect {
                reason: ReasonCode::SESSION_TAKEN_OVER,
            });
            return;
        }
        if let Some(early) = s.early.remove(&(client_id.clone(), epoch)) {
            for e in early {
                let _ = tx.send(e);
            }
        }
        // Early events of newer epochs stay for their own CONNECT's reply.
        s.early.retain(|(c, e), _| c != client_id || *e > epoch);
        s.live.insert(client_id.clone(), (epoch, tx));
    }

    /// Closes every connection of this frontend whose session no longer belongs to it.
    ///
    /// Run when an event stream to a backend comes back. While it was down, a leader that
    /// had no stream from this frontend for its lease declared the frontend lost
    /// (`FrontendLost`) and detached its sessions there: their connections would stay open
    /// and deaf — nothing is delivered to a detached session's old epoch and nothing tells
    /// the connection (found by the deterministic simulation). A `Qos2Check` of packet id 0
    /// is a leader read that answers `Fenced`/`NoSession` for exactly those; they get
    /// DISCONNECT 0x80, and the client reconnects to its session.
    pub(super) fn audit_sessions(&self) {
        let live: Vec<(Arc<str>, u64)> = {
            let s = self
                .inner
                .sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            s.live.iter().map(|(c, (e, _))| (c.clone(), *e)).collect()
        };
        for (client_id, epoch) in live {
            let check = self.query::<Reply>(
                self.partition_of(&client_id),
                &Query::Qos2Check {
                    client_id: client_id.clone(),
                    epoch,
                    packet_id: 0,
                },
            );
            let inner = Arc::downgrade(&self.inner);
            tokio::spawn(async move {
                if !matches!(check.await, Ok(Reply::Fenced | Reply::NoSession)) {
                    return;
                }
                let Some(inner) = inner.upgrade() else { return };
                let s = inner.sessions.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((e, tx)) = s.live.get(&client_id) {
                    if *e == epoch {
                        info!(client_id = %client_id, epoch, "session detached while this frontend was cut off: closing its connection");
                        let _ = tx.send(SessionEvent::Disconnect {
                            reason: ReasonCode::UNSPECIFIED_ERROR,
                        });
                    }
                }
            });
        }
    }

    pub(super) fn forget(&self, session: &SessionRef) {
        let mut s = self
            .inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if s.live
            .get(&session.client_id)
            .is_some_and(|(e, _)| *e == session.epoch)
        {
            s.live.remove(&session.client_id);
        }
    }
}

/// Receives one node's events for this frontend's sessions. Ends with the node's link; a
/// retired node's broken stream is not reopened (see [`route_watch`]).
pub(super) async fn event_stream(
    inner: Weak<Inner>,
    node: u64,
    addr: String,
    mut control: watch::Receiver<bool>,
) {
    let mut opened_before = false;
    loop {
        let Some(alive) = inner.upgrade() else { return };
        let frontend_id = alive.frontend_id;
        let tls = alive.tls.clone();
        drop(alive);
        let open = async {
            match channel_to(&addr, tls.as_ref()).await {
                Ok(ch) => BrokerClient::new(ch)
                    .max_decoding_message_size(64 * 1024 * 1024)
                    .events(EventsRequest {
                        version: API_VERSION,
                        frontend_id,
                    })
                    .await
                    .map(|r| r.into_inner()),
                Err(e) => Err(tonic::Status::unavailable(e.to_string())),
            }
        };
        let stream = tokio::select! {
            opened = open => opened,
            _ = membership::closed(&mut control) => return,
        };
        match stream {
            Ok(mut stream) => {
                debug!(node, "event stream open");
                if opened_before {
                    if let Some(inner) = inner.upgrade() {
                        GrpcPartitions { inner }.audit_sessions();
                    }
                }
                opened_before = true;
                loop {
                    let batch = tokio::select! {
                        m = stream.message() => match m {
                            Ok(Some(batch)) => batch,
                            _ => break,
                        },
                        _ = membership::closed(&mut control) => return,
                    };
                    let Some(inner) = inner.upgrade() else { return };
                    deliver_events(&inner, batch);
                }
            }
            Err(e) => debug!(node, error = %e, "event stream unavailable"),
        }
        if *control.borrow() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = membership::closed(&mut control) => return,
        }
    }
}

/// Hands a batch of events to the connections owning them (or keeps them until the
/// CONNECT's reply registers the session).
fn deliver_events(inner: &Inner, batch: crate::broker::EventBatch) {
    let mut s = inner.sessions.lock().unwrap_or_else(|e| e.into_inner());
    for e in batch.events {
        let Some(event) = e.decode() else {
            continue;
        };
        let client_id: Arc<str> = Arc::from(e.client_id.as_str());
        match s.live.get(&client_id) {
            Some((epoch, tx)) if *epoch == e.epoch => {
                let _ = tx.send(event);
            }
            Some((epoch, _)) if *epoch > e.epoch => {} // stale
            _ => {
                let early = s.early.entry((client_id, e.epoch)).or_default();
                if early.len() < 65_536 {
                    early.push(event);
                }
            }
        }
    }
    if s.early.len() > 10_000 {
        s.early.clear();
    }
}

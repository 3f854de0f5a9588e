//! Raft messages between backend nodes over gRPC.
//!
//! Each node keeps one long-lived client stream to every peer, carrying [`RaftBatch`]es: all
//! messages the driver produced for that peer in one round, across every partition group. A
//! peer's outbound queue is bounded: when a peer is slow or down, batches are dropped rather
//! than buffered without limit — Raft re-sends what matters (heartbeats, appends, snapshots).
//! A broken stream is re-opened with exponential backoff.
//!
//! Peers can be added while running ([`GrpcTransport::add_peer`]): a node learns the members
//! of a newer membership record (`crate::members`) and must reach nodes that joined after it
//! started. Peers are never dropped: a removed node may still hold replicas until the moves
//! away from it finish, and a stream to a node that is gone costs one idle task.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tiermq_proto::raft::raft_envelope::Body;
use tiermq_proto::raft::raft_transport_client::RaftTransportClient;
use tiermq_proto::raft::raft_transport_server::{RaftTransport, RaftTransportServer};
use tiermq_proto::raft::{RaftBatch, RaftEnvelope, RemovalQuery, Removed, StreamAck};
use tiermq_proto::tls::{self, GrpcTls};
use tiermq_proto::API_VERSION;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info};

use super::node::{decode_message, encode_message, PeerMessage, RaftHandle, Transport};
use crate::placement::NodeId;

/// Batches queued per peer before new ones are dropped.
const PEER_QUEUE: usize = 1024;

/// The sending side: one queue and one stream task per peer.
pub struct GrpcTransport {
    node_id: NodeId,
    peers: RwLock<BTreeMap<NodeId, Peer>>,
    tls: Option<GrpcTls>,
    dropped: AtomicU64,
}

/// One peer's address and outbound queue (its stream task ends when the queue is dropped).
struct Peer {
    addr: String,
    queue: mpsc::Sender<RaftBatch>,
}

impl GrpcTransport {
    /// `peers` maps node ids to gRPC addresses (`host:port`); this node's own entry is skipped.
    /// With `tls`, each peer stream runs over mutual TLS (this node's certificate, the
    /// cluster CA).
    pub fn start(
        node_id: NodeId,
        peers: &BTreeMap<NodeId, String>,
        tls: Option<GrpcTls>,
    ) -> Arc<GrpcTransport> {
        let transport = Arc::new(GrpcTransport {
            node_id,
            peers: RwLock::new(BTreeMap::new()),
            tls,
            dropped: AtomicU64::new(0),
        });
        for (&id, addr) in peers {
            transport.add_peer(id, addr);
        }
        transport
    }

    /// Starts sending to `id` at `addr`. A known peer at the same address is left alone; at a
    /// new address its stream is replaced. This node's own id is ignored.
    pub fn add_peer(&self, id: NodeId, addr: &str) {
        if id == self.node_id {
            return;
        }
        let mut peers = self.peers.write().unwrap_or_else(|e| e.into_inner());
        if peers.get(&id).is_some_and(|p| p.addr == addr) {
            return;
        }
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        info!(peer = id, %addr, "raft peer added");
        // Replacing the entry drops the old queue, which ends the old stream task.
        peers.insert(
            id,
            Peer {
                addr: addr.to_string(),
                queue: tx,
            },
        );
        tokio::spawn(peer_stream(id, addr.to_string(), rx, self.tls.clone()));
    }

    /// Batches dropped because a peer's queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Transport for GrpcTransport {
    fn send(&self, to: NodeId, messages: Vec<(u32, PeerMessage)>) {
        let queue = {
            let peers = self.peers.read().unwrap_or_else(|e| e.into_inner());
            match peers.get(&to) {
                Some(p) => p.queue.clone(),
                None => return,
            }
        };
        let batch = RaftBatch {
            version: API_VERSION,
            from_node: self.node_id,
            to_node: to,
            messages: messages
                .iter()
                .map(|(p, m)| RaftEnvelope {
                    partition: *p,
                    body: Some(encode_body(m)),
                })
                .collect(),
        };
        if queue.try_send(batch).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Keeps a client stream open to one peer and feeds it from the peer's queue.
async fn peer_stream(
    peer: NodeId,
    addr: String,
    mut queue: mpsc::Receiver<RaftBatch>,
    tls: Option<GrpcTls>,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let endpoint = match tls::endpoint(&addr, tls.as_ref()) {
            Ok(e) => e
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(5)),
            Err(e) => {
                tracing::error!(peer, %addr, error = %e, "invalid peer address");
                return;
            }
        };
        let channel = match endpoint.connect().await {
            Ok(c) => c,
            Err(e) => {
                debug!(peer, error = %e, "peer unreachable; retrying");
                // Messages queued meanwhile are stale; drop them instead of replaying.
                while queue.try_recv().is_ok() {}
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        info!(peer, "raft stream connected");
        let (tx, rx) = mpsc::channel::<RaftBatch>(64);
        let outbound =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
        let mut client = RaftTransportClient::new(channel);
        let call = client.stream(outbound);
        tokio::pin!(call);
        loop {
            tokio::select! {
                batch = queue.recv() => match batch {
                    Some(b) => {
                        if tx.send(b).await.is_err() {
                            break;
                        }
                    }
                    None => return,
                },
                r = &mut call => {
                    debug!(peer, result = ?r.err(), "raft stream ended");
                    break;
                }
            }
        }
    }
}

/// The receiving side: hands every message to the local driver.
pub struct RaftService {
    node_id: NodeId,
    handle: RaftHandle,
}

impl RaftService {
    pub fn new(node_id: NodeId, handle: RaftHandle) -> RaftTransportServer<RaftService> {
        RaftTransportServer::new(RaftService { node_id, handle })
            .max_decoding_message_size(64 * 1024 * 1024)
    }
}

#[tonic::async_trait]
impl RaftTransport for RaftService {
    async fn stream(
        &self,
        request: Request<Streaming<RaftBatch>>,
    ) -> Result<Response<StreamAck>, Status> {
        let mut stream = request.into_inner();
        while let Some(batch) = stream.message().await? {
            if batch.version != API_VERSION {
                return Err(Status::failed_precondition(format!(
                    "raft transport version {} not supported (this node speaks {API_VERSION})",
                    batch.version
                )));
            }
            if batch.to_node != self.node_id {
                return Err(Status::invalid_argument(format!(
                    "batch for node {} reached node {}",
                    batch.to_node, self.node_id
                )));
            }
            for env in batch.messages {
                match decode_body(batch.from_node, env.body) {
                    Some(m) => {
                        if !self.handle.deliver(env.partition, m) {
                            // This node's driver stopped: end the stream so the peer
                            // reconnects to whatever serves this address next.
                            return Err(Status::unavailable("raft driver stopped"));
                        }
                    }
                    None => debug!(from = batch.from_node, "undecodable raft message dropped"),
                }
            }
        }
        Ok(Response::new(StreamAck {}))
    }
}

/// The wire form of a driver's message.
fn encode_body(m: &PeerMessage) -> Body {
    match m {
        PeerMessage::Raft(m) => Body::Message(encode_message(m)),
        PeerMessage::RemovalQuery { .. } => Body::RemovalQuery(RemovalQuery {}),
        PeerMessage::Removed { applied, .. } => Body::Removed(Removed { applied: *applied }),
    }
}

/// A driver's message from its wire form; the sender of our own messages is the batch's.
/// `None` for an envelope without a body or with bytes that are no Raft message.
fn decode_body(from: NodeId, body: Option<Body>) -> Option<PeerMessage> {
    match body? {
        Body::Message(bytes) => decode_message(&bytes).map(PeerMessage::Raft),
        Body::RemovalQuery(RemovalQuery {}) => Some(PeerMessage::RemovalQuery { from }),
        Body::Removed(Removed { applied }) => Some(PeerMessage::Removed { from, applied }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our membership messages survive the wire, the sender taken from the batch; an envelope
    /// without a body (or from a sender that set none) is dropped, not stepped as an empty
    /// Raft message.
    #[test]
    fn removal_messages_round_trip_and_an_empty_envelope_is_dropped() {
        let query = decode_body(7, Some(encode_body(&PeerMessage::RemovalQuery { from: 7 })));
        assert!(matches!(query, Some(PeerMessage::RemovalQuery { from: 7 })));
        let removed = PeerMessage::Removed {
            from: 2,
            applied: 41,
        };
        let back = decode_body(2, Some(encode_body(&removed)));
        assert!(matches!(
            back,
            Some(PeerMessage::Removed {
                from: 2,
                applied: 41
            })
        ));
        assert!(decode_body(2, None).is_none());
    }
}

//! Following the partitions' leaders' route changes into the route table, and renewing
//! the route leases ([`tiermq_common::route_lease`]) by acknowledging them.

use super::*;

/// Applies one node's route update to the shared table.
pub(super) fn apply_route_update(inner: &Inner, node: u64, u: crate::broker::RouteUpdate) {
    let partition = u.partition;
    let update = RouteUpdate {
        partition,
        leader: u.leader,
        term: u.term,
        reset: u.reset,
        added: u.added,
        removed: u.removed,
    };
    let mut routes = inner.routes.write().unwrap_or_else(|e| e.into_inner());
    if routes.apply_update(node, update) {
        if let Some(slot) = inner
            .leaders
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(partition as usize)
        {
            *slot = node;
        }
    }
}

/// Follows one node's route changes into the shared table, acknowledging each.
///
/// `generation` names the link this task belongs to: an update is applied only while that
/// link is the node's current one (checked under the `nodes` lock), so the watch of an old
/// address cannot write into the table after the node's entries were reset for the new one.
/// Once the node is retired (left the record) a broken stream is not reopened.
pub(super) async fn route_watch(
    inner: Weak<Inner>,
    node: u64,
    addr: String,
    generation: u64,
    mut control: watch::Receiver<bool>,
) {
    loop {
        let Some(alive) = inner.upgrade() else {
            return;
        };
        // Unique per (client, node): the node waits for this watcher's acknowledgements.
        let watcher_id = alive
            .frontend_id
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(node);
        let tls = alive.tls.clone();
        drop(alive);
        let open = async {
            match channel_to(&addr, tls.as_ref()).await {
                Ok(ch) => (
                    BrokerClient::new(ch.clone())
                        .routes(RoutesRequest {
                            version: API_VERSION,
                            watcher_id,
                        })
                        .await
                        .map(|r| r.into_inner()),
                    Some(BrokerClient::new(ch)),
                ),
                Err(e) => (Err(tonic::Status::unavailable(e.to_string())), None),
            }
        };
        let (stream, mut acker) = tokio::select! {
            opened = open => opened,
            _ = membership::closed(&mut control) => return,
        };
        if let Ok(mut stream) = stream {
            // Renewals of the route lease (`route_lease`): with every acknowledgement of new
            // updates, and every `RENEW_EVERY` without one.
            let mut renew = tokio::time::interval(route_lease::RENEW_EVERY);
            renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut applied = 0;
            loop {
                let mut next = tokio::select! {
                    m = stream.message() => match m {
                        Ok(Some(u)) => Some(u),
                        _ => break,
                    },
                    _ = renew.tick() => None,
                    _ = membership::closed(&mut control) => return,
                };
                // Apply every update that is already here, then acknowledge the last one.
                while let Some(u) = next.take() {
                    applied = u.seq;
                    tracing::trace!(node, seq = u.seq, partition = u.partition, "route update");
                    let Some(alive) = inner.upgrade() else { return };
                    {
                        let nodes = alive.nodes.read().unwrap_or_else(|e| e.into_inner());
                        if nodes.get(&node).map(|l| l.generation) != Some(generation) {
                            return;
                        }
                        apply_route_update(&alive, node, u);
                    }
                    if let Some(Ok(Some(u))) = stream.message().now_or_never() {
                        next = Some(u);
                    }
                }
                let Some(acker) = acker.as_mut() else {
                    continue;
                };
                let sent_at = Instant::now();
                // An answer later than the lease is worth nothing: do not stall the stream.
                let r = tokio::time::timeout(
                    route_lease::LEASE,
                    acker.ack_routes(RoutesAck {
                        version: API_VERSION,
                        watcher_id,
                        seq: applied,
                    }),
                )
                .await;
                let granted = matches!(&r, Ok(Ok(reply)) if reply.get_ref().granted);
                let outcome = match &r {
                    Ok(Ok(_)) if granted => "granted",
                    Ok(Ok(_)) => "refused",
                    _ => "failed",
                };
                if let Some(alive) = inner.upgrade() {
                    alive
                        .metrics
                        .route_renewals
                        .get_or_create(&OutcomeLabel { outcome })
                        .inc();
                }
                tracing::trace!(node, seq = applied, granted, "route updates acknowledged");
                if granted {
                    let Some(alive) = inner.upgrade() else { return };
                    let nodes = alive.nodes.read().unwrap_or_else(|e| e.into_inner());
                    if nodes.get(&node).map(|l| l.generation) != Some(generation) {
                        return;
                    }
                    alive
                        .routes
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .renew(node, sent_at + route_lease::LEASE);
                }
                renew.reset();
            }
        }
        // The stream broke: whatever this node told us is no longer known.
        if let Some(inner) = inner.upgrade() {
            let nodes = inner.nodes.read().unwrap_or_else(|e| e.into_inner());
            if nodes.get(&node).map(|l| l.generation) != Some(generation) {
                return;
            }
            let mut routes = inner.routes.write().unwrap_or_else(|e| e.into_inner());
            routes.forget(node);
        }
        if *control.borrow() {
            // Retired: it led nothing we can still hear about; the refresher closes the link.
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = membership::closed(&mut control) => return,
        }
    }
}

//! The runtime side of shared subscriptions: carrying out a [`SharedWork`] by calling the
//! partitions involved. Written once over [`PartitionCaller`], which the standalone broker
//! (in-process partitions) and the cluster (gRPC to partition leaders) both implement.
//!
//! The first call of each step is *submitted when [`carry_out`] is called*, so steps that a
//! partition emits in order reach the member's partition in that order (a member sees a
//! publisher's messages in order); only the follow-up waits inside the returned future.

use std::future::Future;

use crate::hashing::partition_of;
use crate::partition_api::{will_key, Command, HandoffOutcome, Reply, SharedWork};
use crate::session_api::ServiceResult;

/// Something that can submit a command to a partition and wait for its reply.
pub trait PartitionCaller: Clone + Send + Sync + 'static {
    fn partition_count(&self) -> u32;

    /// Submits `command` to `partition` now (in call order per partition) and returns the
    /// wait for its reply.
    fn call_partition(
        &self,
        partition: u32,
        command: Command,
    ) -> impl Future<Output = ServiceResult<Reply>> + Send + 'static;
}

/// Starts `work`, emitted by partition `origin`, and returns the rest of it.
pub fn carry_out<C: PartitionCaller>(
    work: SharedWork,
    origin: u32,
    caller: &C,
) -> impl Future<Output = ()> + Send + 'static {
    let partitions = caller.partition_count();
    let caller = caller.clone();
    match work {
        SharedWork::Handoff {
            group,
            seq,
            member,
            message,
            require_online,
        } => {
            let deliver = caller.call_partition(
                partition_of(&member, partitions),
                Command::SharedDeliver {
                    client_id: member.clone(),
                    group: group.clone(),
                    message,
                    require_online,
                },
            );
            Box::pin(async move {
                let outcome = match deliver.await {
                    Ok(Reply::SharedDelivered(o)) => o,
                    Ok(Reply::NoSession) => HandoffOutcome::Gone,
                    // Unreachable or shutting down: try another member (a duplicate at worst
                    // if this one did take it).
                    _ => HandoffOutcome::Offline,
                };
                if let Some(seq) = seq {
                    let done = Command::SharedHandoffDone {
                        group,
                        seq,
                        member,
                        outcome,
                    };
                    if let Err(e) = caller.call_partition(origin, done).await {
                        tracing::debug!(error = %e, "shared handoff outcome not recorded");
                    }
                }
            }) as std::pin::Pin<Box<dyn Future<Output = ()> + Send>>
        }
        SharedWork::Return {
            seq,
            group,
            from,
            messages,
        } => {
            let enqueue = caller.call_partition(
                partition_of(&group, partitions),
                Command::SharedEnqueue {
                    group,
                    from,
                    messages,
                },
            );
            Box::pin(async move {
                match enqueue.await {
                    Ok(Reply::Done) => {
                        let _ = caller
                            .call_partition(origin, Command::SharedReturnDone { seq })
                            .await;
                    }
                    // Kept in the member's partition: carried out again by the next leader
                    // or start-up.
                    other => tracing::warn!(?other, "shared messages not returned to the group"),
                }
            })
        }
        SharedWork::Will {
            seq,
            client_id,
            message,
        } => {
            // Every partition: a will is rare, and routing it by the route table would need a
            // router here. A partition without a matching subscription queues nothing.
            let key = will_key(&client_id, seq);
            let retained_home = message
                .retain
                .then(|| partition_of(&message.topic, partitions));
            let waits: Vec<_> = (0..partitions)
                .map(|p| {
                    caller.call_partition(
                        p,
                        Command::Publish {
                            message: message.clone(),
                            publisher: None,
                            store_retained: Some(p) == retained_home,
                            inbound_qos2: Some(key.clone()),
                        },
                    )
                })
                .collect();
            let topic = message.topic.clone();
            Box::pin(async move {
                for wait in waits {
                    match wait.await {
                        Ok(Reply::Published { .. }) => {}
                        // Kept in the session's partition: published again by the next leader
                        // or start-up, once per subscriber all the same.
                        other => {
                            tracing::warn!(%topic, ?other, "will not published yet");
                            return;
                        }
                    }
                }
                let done = Command::WillPublished { seq };
                if let Err(e) = caller.call_partition(origin, done).await {
                    tracing::debug!(error = %e, "will publication not recorded");
                }
            })
        }
        SharedWork::Leave { group, client_id } => {
            let leave = caller.call_partition(
                partition_of(&group, partitions),
                Command::SharedLeave { group, client_id },
            );
            Box::pin(async move {
                if let Err(e) = leave.await {
                    // Harmless: the group drops a member whose handoffs come back "gone".
                    tracing::debug!(error = %e, "shared leave not recorded");
                }
            })
        }
    }
}

/// The shared subscriptions among `filters` that the member's partition accepted (their
/// reason code is not an error): the groups a SUBSCRIBE joins or an UNSUBSCRIBE leaves next.
pub fn shared_groups(filters: &[String], codes: &[crate::ReasonCode]) -> Vec<String> {
    filters
        .iter()
        .zip(codes)
        .filter(|(f, code)| !code.is_error() && crate::topic::is_shared(f))
        .filter(|(f, _)| matches!(crate::topic::parse_subscription(f), Ok((Some(_), _))))
        .map(|(f, _)| f.clone())
        .collect()
}

/// After the member's partition accepted a SUBSCRIBE (`join`) or UNSUBSCRIBE, joins or leaves
/// the groups of the accepted shared subscriptions in their own partitions. The caller
/// answers the client only after this, so a SUBACK means the group routes to the member.
pub async fn update_memberships<C: PartitionCaller>(
    caller: &C,
    client_id: &std::sync::Arc<str>,
    filters: &[String],
    codes: &[crate::ReasonCode],
    join: bool,
) -> ServiceResult<()> {
    for group in shared_groups(filters, codes) {
        let partition = partition_of(&group, caller.partition_count());
        let client_id = client_id.clone();
        let command = if join {
            Command::SharedJoin { group, client_id }
        } else {
            Command::SharedLeave { group, client_id }
        };
        match caller.call_partition(partition, command).await? {
            Reply::Done => {}
            other => {
                return Err(crate::session_api::ServiceError::Unavailable(format!(
                    "unexpected reply to a shared subscription change: {other:?}"
                )))
            }
        }
    }
    Ok(())
}

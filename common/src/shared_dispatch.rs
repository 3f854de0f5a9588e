//! The runtime side of shared subscriptions: carrying out a [`SharedWork`] by calling the
//! partitions involved. Written once over [`PartitionCaller`], which the standalone broker
//! (in-process partitions) and the cluster (gRPC to partition leaders) both implement.
//!
//! The first call of each step is *submitted when [`carry_out`] is called*, so steps that a
//! partition emits in order reach the member's partition in that order (a member sees a
//! publisher's messages in order); only the follow-up waits inside the returned future.

use std::future::Future;
use std::time::Duration;

use crate::hashing::partition_of;
use crate::partition_api::{will_key, Command, HandoffOutcome, Reply, SharedWork};
use crate::session_api::{ServiceError, ServiceResult};

pub use crate::router::transport::PartitionCaller;

/// The first pause before a will's publication is tried again on partitions that failed; it
/// doubles up to [`WILL_RETRY_MAX`].
pub const WILL_RETRY_FIRST: Duration = Duration::from_millis(500);
pub const WILL_RETRY_MAX: Duration = Duration::from_secs(30);

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
            let publish = move |p: u32| Command::Publish {
                message: message.clone(),
                publisher: None,
                store_retained: Some(p) == retained_home,
                inbound_qos2: Some(key.clone()),
            };
            // Submitted now, in order; retried below (the key makes a retry a no-op where the
            // first attempt arrived).
            type Call = std::pin::Pin<Box<dyn Future<Output = ServiceResult<Reply>> + Send>>;
            let first: Vec<(u32, Call)> = (0..partitions)
                .map(|p| (p, Box::pin(caller.call_partition(p, publish(p))) as Call))
                .collect();
            Box::pin(async move {
                let mut round = first;
                let mut pause = WILL_RETRY_FIRST;
                loop {
                    let mut failed = Vec::new();
                    for (p, wait) in round {
                        match wait.await {
                            Ok(Reply::Published { .. }) => {}
                            // This runtime is going away; the will stays in the outbox of its
                            // session's partition, and the next leader or start-up publishes it.
                            Err(ServiceError::ShuttingDown) => return,
                            other => {
                                tracing::warn!(partition = p, ?other, "will not published yet");
                                failed.push(p);
                            }
                        }
                    }
                    if failed.is_empty() {
                        break;
                    }
                    // A partition unavailable past the call's deadline: try again rather than
                    // wait for a change of leader or a restart to re-do it.
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(WILL_RETRY_MAX);
                    round = failed
                        .into_iter()
                        .map(|p| (p, Box::pin(caller.call_partition(p, publish(p))) as Call))
                        .collect();
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::{Message, QoS};

    /// Partition 1 fails its first `failures` calls; every call is recorded.
    #[derive(Clone)]
    struct Flaky {
        failures: Arc<Mutex<u32>>,
        calls: Arc<Mutex<Vec<(u32, &'static str)>>>,
    }

    impl PartitionCaller for Flaky {
        fn partition_count(&self) -> u32 {
            3
        }

        fn call_partition(
            &self,
            partition: u32,
            command: Command,
        ) -> impl Future<Output = ServiceResult<Reply>> + Send + 'static {
            let kind = match command {
                Command::Publish { .. } => "publish",
                Command::WillPublished { .. } => "will-published",
                _ => "other",
            };
            self.calls.lock().unwrap().push((partition, kind));
            let fail = partition == 1 && {
                let mut f = self.failures.lock().unwrap();
                let fail = *f > 0;
                *f = f.saturating_sub(1);
                fail
            };
            std::future::ready(if fail {
                Err(ServiceError::Unavailable("deadline".into()))
            } else if kind == "publish" {
                Ok(Reply::Published {
                    matched: true,
                    duplicate: false,
                    refused: false,
                    qos2_token: None,
                })
            } else {
                Ok(Reply::Done)
            })
        }
    }

    /// A will whose publication fails on one partition (unavailable past the call's deadline)
    /// is tried again there until it is published, then confirmed. Before, it waited in the
    /// outbox for a change of leader or a restart, which may never come (noticed by the
    /// simulation's author, not seen in a seed).
    #[tokio::test(start_paused = true)]
    async fn a_will_is_published_again_where_it_failed_until_it_is_published() {
        let caller = Flaky {
            failures: Arc::new(Mutex::new(3)),
            calls: Arc::default(),
        };
        let work = SharedWork::Will {
            seq: 7,
            client_id: Arc::from("gone"),
            message: Arc::new(Message::new("w/gone", "bye", QoS::AtLeastOnce, false)),
        };
        let started = tokio::time::Instant::now();
        carry_out(work, 2, &caller).await;
        let calls = caller.calls.lock().unwrap().clone();
        assert_eq!(
            calls,
            vec![
                (0, "publish"),
                (1, "publish"),
                (2, "publish"),
                (1, "publish"),
                (1, "publish"),
                (1, "publish"),
                (2, "will-published"),
            ]
        );
        // 0.5 s, 1 s, 2 s between the attempts.
        assert_eq!(started.elapsed(), Duration::from_millis(3_500));
    }
}

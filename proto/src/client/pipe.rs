//! The ordered pipes to the partitions' leaders: one per partition, each sending its
//! operations to one node at a time over that node's ordered stream ([`op_stream`]), and
//! switching nodes without reordering (see [`Pipe`]).

use super::*;

use crate::API_VERSION;

/// How long an operation keeps trying (leader changes, a node restarting) before it fails.
pub(super) const OP_DEADLINE: Duration = Duration::from_secs(15);

/// What one attempt of an operation came back with.
pub(super) enum Outcome {
    Reply(Vec<u8>),
    NotLeader(u64),
    Unavailable(String),
    /// Not sent: the client has no link to the node (a hint named a node that joined after
    /// the client's last read of the membership record).
    UnknownNode,
}

pub(super) type OpSender = mpsc::UnboundedSender<(Op, Option<oneshot::Sender<Outcome>>)>;

/// How long one attempt waits for its answer before trying elsewhere (a paused or cut-off
/// node never answers; the gRPC stream would take its keep-alive timeout to notice).
pub(super) const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// An operation not yet answered.
pub(super) struct Held {
    kind: op::Kind,
    /// None: nobody waits for the answer (QoS0).
    done: Option<oneshot::Sender<ServiceResult<Vec<u8>>>>,
    deadline: Instant,
}

/// The ordered path of one partition's operations.
///
/// All operations of a partition go to one node at a time, in call order on its ordered
/// stream. When one fails (not the leader, unreachable, no answer in time), the pipe stops
/// sending, waits until every operation in flight to that node has its answer, then picks the
/// next node (the hint, the leader the route watch reported, or the next replica) and re-sends
/// everything that failed or queued meanwhile, in call order. So a publisher's messages enter
/// the partition log in the order it sent them, across leader changes (duplicates possible,
/// as MQTT allows; reordering not).
#[derive(Default)]
pub(super) struct Pipe {
    /// Where operations go now; 0 = not chosen yet.
    node: u64,
    inflight: usize,
    held: BTreeMap<u64, Held>,
    switching: bool,
    switch_scheduled: bool,
    failed_node: u64,
    hint: u64,
    attempts: usize,
    /// Nodes tried in a row that neither answered nor named a leader (unreachable, or "not
    /// the leader, no idea who is"). Reaching the replica count means every replica this
    /// client knows failed: the map it holds may be stale, so it asks for a fresh one.
    dead_ends: usize,
    /// Sent with every operation; grows at each switch. A node that refused one operation
    /// refuses the later ones of the same generation (they were sent before the refusal was
    /// known here), so a node that becomes leader meanwhile cannot commit them ahead of it.
    generation: u64,
}

impl Pipe {
    /// A pipe that sends to `node` first (0: not chosen yet).
    pub(super) fn starting_at(node: u64) -> Pipe {
        Pipe {
            node,
            ..Pipe::default()
        }
    }
}

impl GrpcPartitions {
    /// Queues `kind` on the stream to `node` now; the receiver yields the outcome.
    fn send_op(
        &self,
        node: u64,
        partition: u32,
        generation: u64,
        kind: op::Kind,
        reply: bool,
    ) -> Option<oneshot::Receiver<Outcome>> {
        let id = if reply {
            self.inner.next_id.fetch_add(1, Ordering::Relaxed)
        } else {
            0
        };
        let (tx, rx) = if reply {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let op = Op {
            version: API_VERSION,
            id,
            partition,
            kind: Some(kind),
            generation,
        };
        let nodes = self.inner.nodes.read().unwrap_or_else(|e| e.into_inner());
        match nodes.get(&node) {
            Some(link) => {
                // A closed stream drops `tx`: the waiter sees "stream closed" and retries.
                let _ = link.ops.send((op, tx));
            }
            None => {
                drop(nodes);
                if let Some(tx) = tx {
                    let _ = tx.send(Outcome::UnknownNode);
                }
            }
        }
        rx
    }

    /// Sends `kind` to the leader of `partition` now and returns the wait for its answer,
    /// retrying elsewhere on NotLeader / unavailable until [`OP_DEADLINE`]. See [`Pipe`]:
    /// operations of a partition reach the log in the order of their calls, across retries.
    pub(super) fn call_op(
        &self,
        partition: u32,
        kind: op::Kind,
    ) -> impl Future<Output = ServiceResult<Vec<u8>>> + Send + 'static {
        let (done, rx) = oneshot::channel();
        self.dispatch(
            partition,
            Held {
                kind,
                done: Some(done),
                deadline: Instant::now() + OP_DEADLINE,
            },
        );
        async move {
            rx.await
                .unwrap_or_else(|_| Err(ServiceError::Unavailable("client stopped".into())))
        }
    }

    /// Sends an operation that wants no answer (QoS0), in order with the others.
    pub(super) fn cast_op(&self, partition: u32, kind: op::Kind) {
        self.dispatch(
            partition,
            Held {
                kind,
                done: None,
                deadline: Instant::now() + OP_DEADLINE,
            },
        );
    }

    fn dispatch(&self, partition: u32, held: Held) {
        let seq = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut pipe = self.inner.pipes[partition as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if pipe.switching || pipe.node == 0 {
            pipe.held.insert(seq, held);
            if !pipe.switching {
                pipe.switching = true;
                drop(pipe);
                self.schedule_switch(partition, Duration::ZERO);
            }
            return;
        }
        let node = pipe.node;
        self.send_tracked(&mut pipe, partition, node, seq, held);
    }

    /// Sends one operation to `node` and watches its outcome (in a task, so the pipe stays
    /// consistent even when the caller stops waiting).
    fn send_tracked(&self, pipe: &mut Pipe, partition: u32, node: u64, seq: u64, held: Held) {
        let Held {
            kind,
            done,
            deadline,
        } = held;
        if done.is_none() {
            self.send_op(node, partition, pipe.generation, kind, false);
            return;
        }
        let rx = self.send_op(node, partition, pipe.generation, kind.clone(), true);
        pipe.inflight += 1;
        let client = self.clone();
        tokio::spawn(async move {
            let outcome = match rx {
                Some(rx) => match tokio::time::timeout(ATTEMPT_TIMEOUT, rx).await {
                    Ok(Ok(o)) => o,
                    Ok(Err(_)) => Outcome::Unavailable("stream closed".into()),
                    Err(_) => Outcome::Unavailable("no answer in time".into()),
                },
                None => Outcome::Unavailable("not sent".into()),
            };
            client.on_outcome(
                partition,
                node,
                seq,
                Held {
                    kind,
                    done,
                    deadline,
                },
                outcome,
            );
        });
    }

    fn on_outcome(&self, partition: u32, node: u64, seq: u64, held: Held, outcome: Outcome) {
        let mut pipe = self.inner.pipes[partition as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        pipe.inflight = pipe.inflight.saturating_sub(1);
        let mut held = held;
        // Never sent: the node is not to be avoided next time (it was never tried), and it
        // says nothing about the replicas.
        let never_sent = matches!(outcome, Outcome::UnknownNode);
        let hint = match outcome {
            Outcome::Reply(bytes) => {
                if let Some(done) = held.done.take() {
                    let _ = done.send(Ok(bytes));
                }
                pipe.dead_ends = 0;
                None
            }
            Outcome::NotLeader(hint) => {
                debug!(partition, node, hint, "not the leader");
                if hint != 0 && !self.inner.knows(hint) {
                    // A leader this client has no address for: it joined after our last
                    // read of the record.
                    self.inner.wake_refresh();
                }
                Some(hint)
            }
            Outcome::Unavailable(why) => {
                debug!(partition, node, %why, "node unavailable");
                Some(0)
            }
            Outcome::UnknownNode => {
                debug!(partition, node, "no link to the node yet");
                self.inner.wake_refresh();
                Some(0)
            }
        };
        if let Some(hint) = hint {
            if Instant::now() >= held.deadline {
                if let Some(done) = held.done {
                    let _ = done.send(Err(ServiceError::Unavailable(format!(
                        "no leader for partition {partition}"
                    ))));
                }
            } else {
                pipe.held.insert(seq, held);
            }
            if !pipe.switching && pipe.node == node {
                pipe.switching = true;
                pipe.failed_node = if never_sent { 0 } else { node };
                pipe.hint = hint;
                if hint == 0 && !never_sent {
                    pipe.dead_ends += 1;
                    let known = self
                        .inner
                        .replicas
                        .read()
                        .unwrap_or_else(|e| e.into_inner())[partition as usize]
                        .len();
                    if pipe.dead_ends >= known.max(1) {
                        pipe.dead_ends = 0;
                        self.inner.wake_refresh();
                    }
                }
            }
        }
        // Switch only once nothing is in flight to the old node: an answer still to come from
        // it could otherwise land after a later operation sent elsewhere.
        if pipe.switching && pipe.inflight == 0 && !pipe.switch_scheduled {
            pipe.switch_scheduled = true;
            pipe.attempts += 1;
            let delay = Duration::from_millis(20 * pipe.attempts.min(10) as u64);
            drop(pipe);
            self.schedule_switch(partition, delay);
        }
    }

    fn schedule_switch(&self, partition: u32, delay: Duration) {
        let client = self.clone();
        tokio::spawn(async move {
            if !delay.is_zero() {
                // A newer membership record ends the back-off: the node the pipe was waiting
                // for may just have become reachable.
                let taken_up = client.inner.membership.taken_up.clone();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = taken_up.notified() => {}
                }
            }
            client.switch(partition);
        });
    }

    /// Picks the node to use next and re-sends every held operation to it, in call order.
    fn switch(&self, partition: u32) {
        let mut pipe = self.inner.pipes[partition as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        pipe.switch_scheduled = false;
        if pipe.inflight > 0 {
            return; // on_outcome schedules again when the last answer is in
        }
        let cached =
            self.inner.leaders.read().unwrap_or_else(|e| e.into_inner())[partition as usize];
        let replicas = self
            .inner
            .replicas
            .read()
            .unwrap_or_else(|e| e.into_inner())[partition as usize]
            .clone();
        // A hint naming the node that failed is a leader that refused an operation sent before
        // it led (or before an earlier refusal): back to it, under a new generation.
        let node = if pipe.hint != 0 {
            pipe.hint
        } else if cached != 0 && cached != pipe.failed_node {
            cached
        } else {
            // No better idea: the next replica after the one that failed (or, when that one
            // is not a replica, one further along with every attempt).
            let pos = replicas.iter().position(|r| *r == pipe.failed_node);
            let next = pos.map_or(pipe.attempts, |i| i + 1);
            replicas
                .get(next % replicas.len().max(1))
                .copied()
                .unwrap_or(cached)
        };
        pipe.node = node;
        pipe.hint = 0;
        pipe.switching = false;
        pipe.generation += 1;
        let held = std::mem::take(&mut pipe.held);
        for (seq, h) in held {
            self.send_tracked(&mut pipe, partition, node, seq, h);
        }
        if pipe.inflight == 0 {
            pipe.attempts = 0;
        }
    }
}

/// Keeps the ordered operation stream to one node and matches replies to waiters. Ends when
/// the node's link is closed (its queue's sender dropped: the node left, moved address, or
/// the client was dropped); operations still waiting then fail over like on a lost stream.
pub(super) async fn op_stream(
    node: u64,
    addr: String,
    mut queue: mpsc::UnboundedReceiver<(Op, Option<oneshot::Sender<Outcome>>)>,
    tls: Option<GrpcTls>,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        if queue.is_closed() && queue.is_empty() {
            return;
        }
        let channel = match channel_to(&addr, tls.as_ref()).await {
            Ok(c) => c,
            Err(e) => {
                // Fail what is queued: the callers retry on another replica.
                loop {
                    match queue.try_recv() {
                        Ok((_, Some(tx))) => {
                            let _ = tx.send(Outcome::Unavailable(e.to_string()));
                        }
                        Ok((_, None)) => {}
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => return,
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        let (tx, rx) = mpsc::unbounded_channel::<Op>();
        let outbound =
            futures::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|op| (op, rx)) },
            );
        let mut client = BrokerClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
        let mut waiting: HashMap<u64, oneshot::Sender<Outcome>> = HashMap::new();
        let mut replies = match client.ops(outbound).await {
            Ok(r) => r.into_inner(),
            Err(e) => {
                debug!(node, error = %e, "ops stream refused");
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        loop {
            tokio::select! {
                item = queue.recv() => match item {
                    Some((op, reply)) => {
                        if let Some(r) = reply {
                            waiting.insert(op.id, r);
                        }
                        if tx.send(op).is_err() {
                            break;
                        }
                    }
                    None => return,
                },
                reply = replies.message() => match reply {
                    Ok(Some(OpReply { id, result })) => {
                        if let Some(w) = waiting.remove(&id) {
                            let _ = w.send(match result {
                                Some(op_reply::Result::Reply(b)) => Outcome::Reply(b),
                                Some(op_reply::Result::NotLeader(n)) => Outcome::NotLeader(n.leader),
                                Some(op_reply::Result::Error(e)) => Outcome::Unavailable(e),
                                None => Outcome::Unavailable("empty reply".into()),
                            });
                        }
                    }
                    Ok(None) | Err(_) => break,
                },
            }
        }
        tiermq_common::warn_limited!(
            STREAM_WARNINGS,
            &format!("ops-stream-{node}"),
            node,
            pending = waiting.len(),
            "ops stream to backend lost; reconnecting"
        );
        for (_, w) in waiting.drain() {
            let _ = w.send(Outcome::Unavailable("stream lost".into()));
        }
    }
}

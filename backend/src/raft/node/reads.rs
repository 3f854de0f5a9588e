//! Linearizable leader reads (ReadIndex, raft thesis §6.4; issue 19 §2).
//!
//! A leader cut off from its followers believes it leads until its quorum check, while the
//! majority may already have elected another leader that commits: answering a query at once
//! from the applied state could miss what the new leader committed. So a query is answered
//! only after a ReadIndex round has confirmed the leadership:
//!
//! 1. queries that arrive during one round of the loop wait together ([`Reads::push`]);
//! 2. in the propose step **one** `read_index` per group covers them all, with a context
//!    unique in the group ([`Reads::ask`]). raft-rs ignores the request of a leader that has
//!    not committed an entry of its own term yet (its commit index may lag what an earlier
//!    leader committed), so the queries wait until it has;
//! 3. with `ReadOnlyOption::Safe` (the default: no clock assumption) raft piggybacks the
//!    context on a heartbeat; once a quorum answered, the ready holds a read state carrying
//!    the commit index as of the request ([`Reads::confirm`]);
//! 4. the queries are answered once the group has applied that index ([`Reads::settle`]).
//!
//! A node that loses the leadership answers the waiting queries `NotLeader`; the client
//! retries on the new leader. A leader
//! that does not know it was deposed never gets a read state: its check-quorum steps it down
//! within an election timeout, and then its queries fail the same way.

use std::collections::VecDeque;

use raft::{RawNode, ReadState, StateRole};
use tokio::sync::oneshot;

use super::super::storage::SledRaftStorage;
use super::{ProposeError, Query, Reply};
use crate::partition::Partition;

pub(super) type QueryReply = oneshot::Sender<Result<Vec<u8>, ProposeError>>;

/// One group's queries, from arrival to answer.
#[derive(Default)]
pub(super) struct Reads {
    /// Arrived since the last `read_index` (or waiting for the term's first commit).
    arrived: Vec<(Query, QueryReply)>,
    /// Asked of raft, oldest first: waiting for their read state.
    asked: VecDeque<Batch>,
    /// Leadership confirmed, oldest first: waiting until the read index is applied.
    confirmed: VecDeque<(u64, Vec<(Query, QueryReply)>)>,
    /// The context of the next `read_index` (never reused in this group's life).
    next_ctx: u64,
}

struct Batch {
    ctx: u64,
    term: u64,
    queries: Vec<(Query, QueryReply)>,
}

impl Reads {
    pub(super) fn push(&mut self, query: Query, reply: QueryReply) {
        self.arrived.push((query, reply));
    }

    /// Asks raft for one read index covering every query that arrived (step 2 of the loop).
    pub(super) fn ask(&mut self, raw: &mut RawNode<SledRaftStorage>) {
        let leading = raw.raft.state == StateRole::Leader;
        if self.arrived.is_empty() || !leading || !raw.raft.commit_to_current_term() {
            return;
        }
        let ctx = self.next_ctx;
        self.next_ctx += 1;
        raw.read_index(ctx.to_be_bytes().to_vec());
        self.asked.push_back(Batch {
            ctx,
            term: raw.raft.term,
            queries: std::mem::take(&mut self.arrived),
        });
    }

    /// Takes the read states of a ready: their batches wait for their index to be applied.
    pub(super) fn confirm(&mut self, states: Vec<ReadState>) {
        for state in states {
            let Ok(ctx) = <[u8; 8]>::try_from(state.request_ctx.as_slice()) else {
                continue;
            };
            let ctx = u64::from_be_bytes(ctx);
            if let Some(i) = self.asked.iter().position(|b| b.ctx == ctx) {
                let batch = self.asked.remove(i).expect("position is in range");
                self.confirmed.push_back((state.index, batch.queries));
            }
        }
    }

    /// After a round's apply, on a leader of `term`: answers what is confirmed and applied.
    pub(super) fn settle(&mut self, sm: &Partition, applied: u64, term: u64, now: u64) {
        // Raft drops its pending requests at a term change: ask again in this term.
        while let Some(i) = self.asked.iter().position(|b| b.term != term) {
            let batch = self.asked.remove(i).expect("position is in range");
            self.arrived.extend(batch.queries);
        }
        while self
            .confirmed
            .front()
            .is_some_and(|(index, _)| *index <= applied)
        {
            let (_, queries) = self.confirmed.pop_front().expect("front exists");
            for (query, reply) in queries {
                let _ = reply.send(Ok(answer(sm, query, now)));
            }
        }
    }

    /// Answers every waiting query with `err`.
    pub(super) fn fail(&mut self, err: ProposeError) {
        refuse(std::mem::take(&mut self.arrived), err.clone());
        for b in std::mem::take(&mut self.asked) {
            refuse(b.queries, err.clone());
        }
        for (_, queries) in std::mem::take(&mut self.confirmed) {
            refuse(queries, err.clone());
        }
    }
}

fn refuse(queries: Vec<(Query, QueryReply)>, err: ProposeError) {
    for (_, reply) in queries {
        let _ = reply.send(Err(err.clone()));
    }
}

/// The postcard-encoded answer to `query` from the applied state (see [`Query`]).
fn answer(sm: &Partition, query: Query, now: u64) -> Vec<u8> {
    match query {
        Query::Retained { filter } => postcard::to_stdvec(&sm.retained_matching(&filter, now)),
        Query::Qos2Check {
            client_id,
            epoch,
            packet_id,
        } => postcard::to_stdvec(&match sm.session(&client_id) {
            None => Reply::NoSession,
            Some(s) if s.epoch() != Some(epoch) => Reply::Fenced,
            Some(s) => Reply::Qos2Received {
                duplicate: s.inbound_qos2.contains_key(&packet_id),
            },
        }),
    }
    .unwrap_or_default()
}

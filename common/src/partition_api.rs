//! The commands a partition applies and the replies it gives: the language in which both
//! tiers speak to a partition (in-process for standalone, inside gRPC for the cluster). The
//! state machine that interprets them lives in `tiermq-backend`.
//!
//! Commands are what gets logged (standalone write-ahead log today, the Raft log in the
//! cluster), so they are serializable and carry everything apply needs — including the time,
//! which the proposer stamps. Effects are what the runtime must do after apply: push a delivery
//! to a connection, publish a will, update the route table. Replies answer the proposer.

use std::sync::Arc;

use crate::session_api::{AckKind, SubscribeRequest, SubscriptionOptions, Will};
use crate::{Message, ProtocolVersion, ReasonCode};
use serde::{Deserialize, Serialize};

/// How a shared subscription group picks the member that gets a message (§4.8.2). Part of
/// the deterministic configuration of a partition: every replica must pick the same member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SharedStrategy {
    /// Members in turn.
    #[default]
    RoundRobin,
    /// A member chosen by a hash of the log index (the same on every replica).
    Random,
    /// The same member for every message of one publisher while membership is unchanged.
    StickyByPublisher,
}

impl std::str::FromStr for SharedStrategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "round-robin" | "round_robin" => Ok(SharedStrategy::RoundRobin),
            "random" => Ok(SharedStrategy::Random),
            "sticky-by-publisher" | "sticky_by_publisher" | "sticky" => {
                Ok(SharedStrategy::StickyByPublisher)
            }
            other => Err(format!(
                "unknown shared subscription strategy {other:?} \
                 (expected round-robin, random or sticky-by-publisher)"
            )),
        }
    }
}

/// What a session does with a new message when its queue already holds
/// `max_queued_messages` (deterministic configuration of a partition, like the limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QueueFullPolicy {
    /// Keep the newest: the oldest queued message is dropped (as Mosquitto does).
    #[default]
    DropOldest,
    /// Keep what is queued: the new message is not queued for that session, and a v5
    /// publisher gets PUBACK/PUBREC 0x97 Quota exceeded (other subscribers still got it).
    RefuseNew,
}

impl std::str::FromStr for QueueFullPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "drop-oldest" | "drop_oldest" => Ok(QueueFullPolicy::DropOldest),
            "refuse-new" | "refuse_new" => Ok(QueueFullPolicy::RefuseNew),
            other => Err(format!(
                "unknown queue policy {other:?} (expected drop-oldest or refuse-new)"
            )),
        }
    }
}

/// How a member's partition answered a [`Command::SharedDeliver`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HandoffOutcome {
    /// Queued in the member's session.
    Accepted,
    /// The member has a session but no connection, and an online member was asked for.
    Offline,
    /// No session, or the session no longer holds this shared subscription: not a member.
    Gone,
}

/// A cross-partition step that a partition asks its runtime to carry out: the steps of shared
/// subscriptions (see `tiermq_backend::partition::shared` for the protocol) and the
/// publishing of fired wills; [`crate::shared_dispatch`] is the runtime side. Steps with a
/// `seq` stay recorded in the partition until confirmed, and a runtime that starts or a
/// replica that becomes leader carries them out again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SharedWork {
    /// Offer `message` to `member` (`SharedDeliver` on its partition); with `seq`, report the
    /// outcome to the group's partition (`SharedHandoffDone`).
    Handoff {
        group: String,
        seq: Option<u64>,
        member: Arc<str>,
        message: Arc<Message>,
        require_online: bool,
    },
    /// Give a departed member's unacknowledged messages back to the group (`SharedEnqueue`),
    /// then confirm to the member's partition (`SharedReturnDone`).
    Return {
        seq: u64,
        group: String,
        from: Arc<str>,
        messages: Vec<Arc<Message>>,
    },
    /// A member's session ended: leave the group (`SharedLeave` on the group's partition).
    Leave { group: String, client_id: Arc<str> },
    /// A will fired by `client_id`'s session: publish `message` to every partition (each
    /// deduplicates on [`will_key`]), then confirm to the session's partition
    /// (`WillPublished`). The will was recorded in the entry that fired it, so a crash before
    /// the confirmation publishes it again — once per subscriber all the same.
    Will {
        seq: u64,
        client_id: Arc<str>,
        message: Arc<Message>,
    },
}

/// The idempotency key under which the other partitions take will `seq` of `client_id`
/// (the same mechanism as an inbound QoS2 message's token, [`InboundQos2`]): one key per will,
/// so the wills of one client never stand in for one another.
pub fn will_key(client_id: &str, seq: u64) -> InboundQos2 {
    InboundQos2 {
        client_id: Arc::from(format!("{client_id}\u{0}will\u{0}{seq}")),
        epoch: 0,
        packet_id: 0,
        token: Some(seq),
    }
}

/// The publisher of an inbound QoS2 message: its session, the packet id it used and, outside
/// the publisher's own partition, the message's idempotency token.
///
/// Exactly once across partitions works in two steps. The publisher's partition (its *home*)
/// applies the publish first: it records the packet id with a **token** — the log index of
/// that entry, unique forever in that partition's log — or, if the id is already recorded,
/// answers `duplicate` with the token recorded then. Every other target partition then gets
/// the publish with `token: Some(t)` and keeps, per publisher and packet id, the last token it
/// delivered: the same token again (a retry after a lost answer, a re-send after a reconnect)
/// is not delivered twice. A new message under a reused packet id has a new token, so a key
/// never swallows a new message, and a key left by an ended session never matches its
/// successor's messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundQos2 {
    pub client_id: Arc<str>,
    /// The publisher's connection. Checked (fenced) at home; elsewhere it orders attempts: an
    /// attempt from an older connection than the one that last used this packet id is stale.
    pub epoch: u64,
    pub packet_id: u16,
    /// `None` at the publisher's own partition; `Some(token)` from the home's answer elsewhere.
    pub token: Option<u64>,
}

/// One log entry: a command plus the time at which its proposer stamped it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub now_ms: u64,
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AckCmd {
    PubAck,
    PubRec,
    PubComp,
}

impl From<AckKind> for AckCmd {
    fn from(k: AckKind) -> Self {
        match k {
            AckKind::PubAck => AckCmd::PubAck,
            AckKind::PubRec => AckCmd::PubRec,
            AckKind::PubComp => AckCmd::PubComp,
        }
    }
}

/// A retained message sent because of a subscribe, with the subscription it answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetainedForSubscription {
    pub filter: String,
    pub options: SubscriptionOptions,
    pub subscription_id: Option<u32>,
    pub messages: Vec<Arc<Message>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// CONNECT: create, resume or take over the session. The new connection's epoch is the
    /// log index of this entry, so epochs are unique and grow.
    Connect {
        client_id: Arc<str>,
        protocol: ProtocolVersion,
        clean_start: bool,
        session_expiry_secs: u32,
        receive_maximum: u16,
        will: Option<Will>,
        frontend_id: u64,
        /// The frontend's number for this connection attempt (unique per frontend process;
        /// 0: none). A CONNECT whose answer was lost is re-sent with the same number, and a
        /// partition that applied it already answers the re-sent copy as the first instead of
        /// taking it for a new connection taking over (which would publish the will of a
        /// client that never lost its connection).
        connection: u64,
    },
    Disconnect {
        client_id: Arc<str>,
        epoch: u64,
        normal: bool,
        with_will: bool,
        session_expiry_secs: Option<u32>,
    },
    Subscribe {
        client_id: Arc<str>,
        epoch: u64,
        subscriptions: Vec<SubscribeRequest>,
    },
    Unsubscribe {
        client_id: Arc<str>,
        epoch: u64,
        filters: Vec<String>,
    },
    /// Match `message` against this partition's subscriptions and queue it for each session.
    /// `store_retained` is set on the partition that owns the topic of a retained message.
    Publish {
        message: Arc<Message>,
        publisher: Option<Arc<str>>,
        store_retained: bool,
        /// Set for an inbound QoS2 PUBLISH. On the publisher's own partition the packet id is
        /// recorded in the same entry that delivers the message there (a re-sent PUBLISH with
        /// a recorded id is not delivered again); on the other partitions, its token is (see
        /// [`InboundQos2`]).
        inbound_qos2: Option<InboundQos2>,
    },
    /// An inbound QoS2 PUBLISH with this packet id was accepted from the client.
    Qos2Received {
        client_id: Arc<str>,
        epoch: u64,
        packet_id: u16,
    },
    /// PUBREL from the client for an inbound QoS2 packet id.
    Qos2Release {
        client_id: Arc<str>,
        epoch: u64,
        packet_id: u16,
    },
    Ack {
        client_id: Arc<str>,
        epoch: u64,
        kind: AckCmd,
        packet_id: u16,
    },
    /// Retained messages held by other partitions for a subscription of this session.
    DeliverRetained {
        client_id: Arc<str>,
        epoch: u64,
        retained: Vec<RetainedForSubscription>,
    },
    /// Time passes: fire due wills, end expired sessions.
    Tick,
    /// The frontend holding these connections is gone: treat them as abnormally disconnected.
    FrontendLost { frontend_id: u64 },
    /// On the partition of the group key `$share/<group>/<filter>`: `client_id` is a member.
    SharedJoin { group: String, client_id: Arc<str> },
    /// On the group's partition: `client_id` is no longer a member.
    SharedLeave { group: String, client_id: Arc<str> },
    /// On the member's partition: queue `message` for this member of `group` (the session's
    /// own subscription decides QoS, retain and subscription id). With `require_online` an
    /// offline member refuses it, so the group can try a connected one first.
    SharedDeliver {
        client_id: Arc<str>,
        group: String,
        message: Arc<Message>,
        require_online: bool,
    },
    /// On the group's partition: how the member answered handoff `seq`.
    SharedHandoffDone {
        group: String,
        seq: u64,
        member: Arc<str>,
        outcome: HandoffOutcome,
    },
    /// On the group's partition: messages a member did not acknowledge before it
    /// disconnected, to be handed to another member.
    SharedEnqueue {
        group: String,
        from: Arc<str>,
        messages: Vec<Arc<Message>>,
    },
    /// On the member's partition: the group has taken back return batch `seq`.
    SharedReturnDone { seq: u64 },
    /// Stores `message` as the retained message of its topic only if the one stored now has
    /// the payload `expected` (`None`: no retained message) — a compare-and-swap decided where
    /// the entry is applied, in log order, for records kept as retained messages (the cluster's
    /// membership record): a change computed from a stale read is refused, whoever proposed
    /// it. Nothing is delivered to subscribers. Answered with [`Reply::Replaced`].
    ReplaceRetained {
        message: Arc<Message>,
        expected: Option<bytes::Bytes>,
    },
    /// On the session's partition: will `seq` reached every partition ([`SharedWork::Will`]).
    WillPublished { seq: u64 },
}

impl Command {
    /// Whether the proposer must wait for the entry to be durable before answering.
    /// Acks and ticks may be lost in a crash (the message is redelivered, time ticks again) —
    /// except PUBREC: the PUBREL that follows it lets the client complete the exchange and
    /// forget the packet id, so a PUBREC lost after that would re-send the PUBLISH, and the
    /// client would take it for a new message (QoS2 delivered twice).
    pub fn needs_durability(&self) -> bool {
        match self {
            Command::Ack { kind, .. } => *kind == AckCmd::PubRec,
            // Losing one of these in a crash re-runs a handoff: a duplicate, never a loss.
            Command::Tick
            | Command::SharedHandoffDone { .. }
            | Command::SharedReturnDone { .. }
            | Command::WillPublished { .. } => false,
            Command::SharedDeliver { message, .. } => message.qos != crate::QoS::AtMostOnce,
            // QoS0 is logged only to queue it for offline sessions; it is never acknowledged.
            Command::Publish { message, .. } => message.qos != crate::QoS::AtMostOnce,
            _ => true,
        }
    }
}

/// The answer to one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Connected {
        epoch: u64,
        session_present: bool,
    },
    Subscribed {
        reason_codes: Vec<ReasonCode>,
        /// Subscriptions that want retained messages from *other* partitions.
        want_retained: Vec<(String, SubscriptionOptions, Option<u32>)>,
    },
    Unsubscribed(Vec<ReasonCode>),
    Published {
        matched: bool,
        /// Inbound QoS2 whose packet id was already recorded: not delivered again.
        duplicate: bool,
        /// At least one session's queue was full and refused it (`QueueFullPolicy::RefuseNew`).
        refused: bool,
        /// Inbound QoS2: the message's idempotency token ([`InboundQos2`]), which the home
        /// partition assigned (or had assigned, for a duplicate).
        qos2_token: Option<u64>,
    },
    Qos2Received {
        duplicate: bool,
    },
    Released {
        found: bool,
    },
    SharedDelivered(HandoffOutcome),
    Done,
    /// The command named a connection that is no longer the session's current one.
    Fenced,
    /// The answer to [`Command::ReplaceRetained`]: whether the stored message was the expected
    /// one (and is now replaced).
    Replaced {
        done: bool,
    },
    NoSession,
    /// The answer to [`Command::Ack`]: the index at which it was applied. A connection drops
    /// a delivery of a PUBREC'd packet id computed at a lower index: a stale replay
    /// (`crate::released_ids`). Last in the enum so the other variants keep their encoding.
    Acked {
        index: u64,
    },
}

/// A read a partition's leader answers without logging anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Query {
    /// Retained messages matching a filter; answered with `Vec<Arc<Message>>`.
    Retained { filter: String },
    /// Whether a session has recorded an inbound QoS2 packet id; answered with a [`Reply`]:
    /// `Qos2Received { duplicate }`, `Fenced` or `NoSession`.
    Qos2Check {
        client_id: Arc<str>,
        epoch: u64,
        packet_id: u16,
    },
}

/// Adds one partition's answer to a publish to `out`; returns the inbound QoS2 token it
/// carries, or gives back an answer that is not [`Reply::Published`].
pub fn merge_published(
    out: &mut crate::session_api::Published,
    reply: Reply,
) -> Result<Option<u64>, Reply> {
    match reply {
        Reply::Published {
            matched,
            duplicate,
            refused,
            qos2_token,
        } => {
            out.matched |= matched;
            out.duplicate |= duplicate;
            out.refused |= refused;
            Ok(qos2_token)
        }
        other => Err(other),
    }
}

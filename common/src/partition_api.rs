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

/// The publisher of an inbound QoS2 message: its session and the packet id it used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundQos2 {
    pub client_id: Arc<str>,
    pub epoch: u64,
    pub packet_id: u16,
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
        /// Set on the publisher's own partition for an inbound QoS2 PUBLISH: the packet id is
        /// recorded in the same entry that delivers the message, and a re-sent PUBLISH with a
        /// recorded id is not delivered again (exactly once, atomically).
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
}

impl Command {
    /// Whether the proposer must wait for the entry to be durable before answering.
    /// Acks and ticks may be lost in a crash (the message is redelivered, time ticks again).
    pub fn needs_durability(&self) -> bool {
        match self {
            Command::Ack { .. } | Command::Tick => false,
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
    },
    Qos2Received {
        duplicate: bool,
    },
    Released {
        found: bool,
    },
    Done,
    /// The command named a connection that is no longer the session's current one.
    Fenced,
    NoSession,
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

//! MQTT 5 properties (§2.2.2): the identifier table, the generic decoding loop that enforces
//! where each property may appear and how often, and one struct per property set.
//!
//! A property set is decoded in two steps: [`read`] parses the length-prefixed list, checks each
//! identifier against the table (unknown or not valid for the packet → Malformed, §2.2.2.2;
//! repeated → Protocol Error, out-of-range value → Protocol Error) and hands each value to the set's
//! [`Properties::apply`], which only has to store it. Encoding writes properties in identifier
//! order; the length prefix is measured with the same code that writes them.

use bytes::Bytes;

use super::error::{DecodeError, EncodeError};
use super::primitives::{measure, Reader, Sink};
use crate::types::QoS;

// Where a property may appear: one bit per packet (or will) that carries properties.
pub const IN_CONNECT: u16 = 1 << 0;
pub const IN_CONNACK: u16 = 1 << 1;
pub const IN_PUBLISH: u16 = 1 << 2;
pub const IN_WILL: u16 = 1 << 3;
/// PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK and UNSUBACK allow exactly the same properties.
pub const IN_ACK: u16 = 1 << 4;
pub const IN_SUBSCRIBE: u16 = 1 << 5;
pub const IN_UNSUBSCRIBE: u16 = 1 << 6;
pub const IN_DISCONNECT: u16 = 1 << 7;
pub const IN_AUTH: u16 = 1 << 8;
const EVERYWHERE: u16 = (1 << 9) - 1;

/// Property identifiers (§2.2.2.2).
pub mod id {
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub const RESPONSE_INFORMATION: u8 = 0x1A;
    pub const SERVER_REFERENCE: u8 = 0x1C;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;
}

/// The wire type of a property value (§2.2.2.2).
#[derive(Clone, Copy)]
enum Ty {
    /// A byte. Every byte property defined by MQTT 5 (Payload Format Indicator, Maximum QoS,
    /// the Request/Available flags) only allows 0 or 1.
    Flag,
    U16,
    U32,
    VarInt,
    Str,
    Bin,
    Pair,
}

/// Type and allowed packets of a property identifier, `None` if the identifier is unknown.
fn spec(pid: u32) -> Option<(Ty, u16)> {
    use id::*;
    let pid = u8::try_from(pid).ok()?;
    Some(match pid {
        PAYLOAD_FORMAT_INDICATOR => (Ty::Flag, IN_PUBLISH | IN_WILL),
        MESSAGE_EXPIRY_INTERVAL => (Ty::U32, IN_PUBLISH | IN_WILL),
        CONTENT_TYPE => (Ty::Str, IN_PUBLISH | IN_WILL),
        RESPONSE_TOPIC => (Ty::Str, IN_PUBLISH | IN_WILL),
        CORRELATION_DATA => (Ty::Bin, IN_PUBLISH | IN_WILL),
        SUBSCRIPTION_IDENTIFIER => (Ty::VarInt, IN_PUBLISH | IN_SUBSCRIBE),
        SESSION_EXPIRY_INTERVAL => (Ty::U32, IN_CONNECT | IN_CONNACK | IN_DISCONNECT),
        ASSIGNED_CLIENT_IDENTIFIER => (Ty::Str, IN_CONNACK),
        SERVER_KEEP_ALIVE => (Ty::U16, IN_CONNACK),
        AUTHENTICATION_METHOD => (Ty::Str, IN_CONNECT | IN_CONNACK | IN_AUTH),
        AUTHENTICATION_DATA => (Ty::Bin, IN_CONNECT | IN_CONNACK | IN_AUTH),
        REQUEST_PROBLEM_INFORMATION => (Ty::Flag, IN_CONNECT),
        WILL_DELAY_INTERVAL => (Ty::U32, IN_WILL),
        REQUEST_RESPONSE_INFORMATION => (Ty::Flag, IN_CONNECT),
        RESPONSE_INFORMATION => (Ty::Str, IN_CONNACK),
        SERVER_REFERENCE => (Ty::Str, IN_CONNACK | IN_DISCONNECT),
        REASON_STRING => (Ty::Str, IN_CONNACK | IN_ACK | IN_DISCONNECT | IN_AUTH),
        RECEIVE_MAXIMUM => (Ty::U16, IN_CONNECT | IN_CONNACK),
        TOPIC_ALIAS_MAXIMUM => (Ty::U16, IN_CONNECT | IN_CONNACK),
        TOPIC_ALIAS => (Ty::U16, IN_PUBLISH),
        MAXIMUM_QOS => (Ty::Flag, IN_CONNACK),
        RETAIN_AVAILABLE => (Ty::Flag, IN_CONNACK),
        USER_PROPERTY => (Ty::Pair, EVERYWHERE),
        MAXIMUM_PACKET_SIZE => (Ty::U32, IN_CONNECT | IN_CONNACK),
        WILDCARD_SUBSCRIPTION_AVAILABLE => (Ty::Flag, IN_CONNACK),
        SUBSCRIPTION_IDENTIFIER_AVAILABLE => (Ty::Flag, IN_CONNACK),
        SHARED_SUBSCRIPTION_AVAILABLE => (Ty::Flag, IN_CONNACK),
        _ => return None,
    })
}

/// A decoded property value; its variant is fixed by the identifier.
#[derive(Debug)]
pub enum Value {
    Byte(u8),
    U16(u16),
    U32(u32),
    Str(String),
    Bin(Bytes),
    Pair(String, String),
}

const TYPE_MISMATCH: DecodeError = DecodeError::MalformedPacket("property of unexpected type");

impl Value {
    fn u8(self) -> Result<u8, DecodeError> {
        match self {
            Value::Byte(v) => Ok(v),
            _ => Err(TYPE_MISMATCH),
        }
    }
    fn flag(self) -> Result<bool, DecodeError> {
        Ok(self.u8()? == 1)
    }
    fn u16(self) -> Result<u16, DecodeError> {
        match self {
            Value::U16(v) => Ok(v),
            _ => Err(TYPE_MISMATCH),
        }
    }
    fn u32(self) -> Result<u32, DecodeError> {
        match self {
            Value::U32(v) => Ok(v),
            _ => Err(TYPE_MISMATCH),
        }
    }
    fn string(self) -> Result<String, DecodeError> {
        match self {
            Value::Str(v) => Ok(v),
            _ => Err(TYPE_MISMATCH),
        }
    }
    fn bytes(self) -> Result<Bytes, DecodeError> {
        match self {
            Value::Bin(v) => Ok(v),
            _ => Err(TYPE_MISMATCH),
        }
    }
    fn pair(self) -> Result<(String, String), DecodeError> {
        match self {
            Value::Pair(k, v) => Ok((k, v)),
            _ => Err(TYPE_MISMATCH),
        }
    }
}

/// A set of properties belonging to one packet type.
pub trait Properties: Default + PartialEq {
    /// The `IN_*` bit of the packet this set belongs to.
    const CONTEXT: u16;
    /// Stores one already validated property.
    fn apply(&mut self, id: u8, value: Value) -> Result<(), DecodeError>;
    /// Writes every present property (without the length prefix), in identifier order.
    fn write<S: Sink>(&self, s: &mut S);

    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Reads a property length and the properties it covers (§2.2.2.1).
pub fn read<P: Properties>(r: &mut Reader) -> Result<P, DecodeError> {
    let len = r.var_int()? as usize;
    if len > r.remaining() {
        return Err(DecodeError::MalformedPacket(
            "property length exceeds packet",
        ));
    }
    let mut props = Reader::new(r.take(len)?);
    let mut out = P::default();
    let mut seen: u64 = 0;
    while !props.is_empty() {
        let pid = props.var_int()?;
        let (ty, allowed) =
            spec(pid).ok_or(DecodeError::MalformedPacket("unknown property identifier"))?;
        let pid = pid as u8;
        if allowed & P::CONTEXT == 0 {
            return Err(NOT_HERE);
        }
        let repeatable = pid == id::USER_PROPERTY
            || (pid == id::SUBSCRIPTION_IDENTIFIER && P::CONTEXT == IN_PUBLISH);
        if !repeatable {
            if seen & (1 << pid) != 0 {
                return Err(DecodeError::ProtocolError(
                    "property included more than once",
                ));
            }
            seen |= 1 << pid;
        }
        let value = match ty {
            Ty::Flag => match props.u8()? {
                v @ (0 | 1) => Value::Byte(v),
                _ => return Err(DecodeError::ProtocolError("property value must be 0 or 1")),
            },
            Ty::U16 => Value::U16(props.u16()?),
            Ty::U32 => Value::U32(props.u32()?),
            Ty::VarInt => Value::U32(props.var_int()?),
            Ty::Str => Value::Str(props.string()?),
            Ty::Bin => Value::Bin(props.binary()?),
            Ty::Pair => Value::Pair(props.string()?, props.string()?),
        };
        check_value(pid, &value)?;
        out.apply(pid, value)?;
    }
    Ok(out)
}

/// Values the spec calls a Protocol Error although their type allows them.
fn check_value(pid: u8, v: &Value) -> Result<(), DecodeError> {
    match (pid, v) {
        (id::SUBSCRIPTION_IDENTIFIER, Value::U32(0)) => {
            Err(DecodeError::ProtocolError("subscription identifier 0"))
        }
        (id::RECEIVE_MAXIMUM, Value::U16(0)) => {
            Err(DecodeError::ProtocolError("receive maximum 0"))
        }
        (id::MAXIMUM_PACKET_SIZE, Value::U32(0)) => {
            Err(DecodeError::ProtocolError("maximum packet size 0"))
        }
        _ => Ok(()),
    }
}

/// Writes the property length followed by the properties.
pub fn write<S: Sink, P: Properties>(s: &mut S, p: &P) {
    let len = measure(|c| p.write(c));
    s.put_var_int(len);
    p.write(s);
}

// Small writers for one optional property each.

fn w_u8<S: Sink>(s: &mut S, pid: u8, v: Option<u8>) {
    if let Some(v) = v {
        s.put_u8(pid);
        s.put_u8(v);
    }
}
fn w_flag<S: Sink>(s: &mut S, pid: u8, v: Option<bool>) {
    w_u8(s, pid, v.map(u8::from))
}
fn w_u16<S: Sink>(s: &mut S, pid: u8, v: Option<u16>) {
    if let Some(v) = v {
        s.put_u8(pid);
        s.put_u16(v);
    }
}
fn w_u32<S: Sink>(s: &mut S, pid: u8, v: Option<u32>) {
    if let Some(v) = v {
        s.put_u8(pid);
        s.put_u32(v);
    }
}
fn w_var<S: Sink>(s: &mut S, pid: u8, v: u32) {
    if v == 0 {
        s.fail(EncodeError::InvalidPacket("subscription identifier 0"));
    }
    s.put_u8(pid);
    s.put_var_int(v as usize);
}
fn w_str<S: Sink>(s: &mut S, pid: u8, v: &Option<String>) {
    if let Some(v) = v {
        s.put_u8(pid);
        s.put_str(v);
    }
}
fn w_bin<S: Sink>(s: &mut S, pid: u8, v: &Option<Bytes>) {
    if let Some(v) = v {
        s.put_u8(pid);
        s.put_binary(v);
    }
}
fn w_user<S: Sink>(s: &mut S, v: &[(String, String)]) {
    for (k, v) in v {
        s.put_u8(id::USER_PROPERTY);
        s.put_str(k);
        s.put_str(v);
    }
}

/// "A Control Packet which contains an Identifier which is not valid for its packet type ...
/// is a Malformed Packet" (§2.2.2.2): 0x81, not 0x82.
const NOT_HERE: DecodeError = DecodeError::MalformedPacket("property not allowed in this packet");

/// CONNECT properties (§3.1.2.11).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectProperties {
    pub session_expiry_interval: Option<u32>,
    pub receive_maximum: Option<u16>,
    pub maximum_packet_size: Option<u32>,
    pub topic_alias_maximum: Option<u16>,
    pub request_response_information: Option<bool>,
    pub request_problem_information: Option<bool>,
    pub user_properties: Vec<(String, String)>,
    pub authentication_method: Option<String>,
    pub authentication_data: Option<Bytes>,
}

impl Properties for ConnectProperties {
    const CONTEXT: u16 = IN_CONNECT;
    fn apply(&mut self, pid: u8, v: Value) -> Result<(), DecodeError> {
        match pid {
            id::SESSION_EXPIRY_INTERVAL => self.session_expiry_interval = Some(v.u32()?),
            id::RECEIVE_MAXIMUM => self.receive_maximum = Some(v.u16()?),
            id::MAXIMUM_PACKET_SIZE => self.maximum_packet_size = Some(v.u32()?),
            id::TOPIC_ALIAS_MAXIMUM => self.topic_alias_maximum = Some(v.u16()?),
            id::REQUEST_RESPONSE_INFORMATION => self.request_response_information = Some(v.flag()?),
            id::REQUEST_PROBLEM_INFORMATION => self.request_problem_information = Some(v.flag()?),
            id::USER_PROPERTY => self.user_properties.push(v.pair()?),
            id::AUTHENTICATION_METHOD => self.authentication_method = Some(v.string()?),
            id::AUTHENTICATION_DATA => self.authentication_data = Some(v.bytes()?),
            _ => return Err(NOT_HERE),
        }
        Ok(())
    }
    fn write<S: Sink>(&self, s: &mut S) {
        if self.receive_maximum == Some(0) {
            s.fail(EncodeError::InvalidPacket("receive maximum 0"));
        }
        if self.maximum_packet_size == Some(0) {
            s.fail(EncodeError::InvalidPacket("maximum packet size 0"));
        }
        w_u32(s, id::SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        w_str(s, id::AUTHENTICATION_METHOD, &self.authentication_method);
        w_bin(s, id::AUTHENTICATION_DATA, &self.authentication_data);
        w_flag(
            s,
            id::REQUEST_PROBLEM_INFORMATION,
            self.request_problem_information,
        );
        w_flag(
            s,
            id::REQUEST_RESPONSE_INFORMATION,
            self.request_response_information,
        );
        w_u16(s, id::RECEIVE_MAXIMUM, self.receive_maximum);
        w_u16(s, id::TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        w_user(s, &self.user_properties);
        w_u32(s, id::MAXIMUM_PACKET_SIZE, self.maximum_packet_size);
    }
}

/// Will properties, carried in the CONNECT payload (§3.1.3.2).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WillProperties {
    pub will_delay_interval: Option<u32>,
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
}

impl Properties for WillProperties {
    const CONTEXT: u16 = IN_WILL;
    fn apply(&mut self, pid: u8, v: Value) -> Result<(), DecodeError> {
        match pid {
            id::WILL_DELAY_INTERVAL => self.will_delay_interval = Some(v.u32()?),
            id::PAYLOAD_FORMAT_INDICATOR => self.payload_format_indicator = Some(v.u8()?),
            id::MESSAGE_EXPIRY_INTERVAL => self.message_expiry_interval = Some(v.u32()?),
            id::CONTENT_TYPE => self.content_type = Some(v.string()?),
            id::RESPONSE_TOPIC => self.response_topic = Some(v.string()?),
            id::CORRELATION_DATA => self.correlation_data = Some(v.bytes()?),
            id::USER_PROPERTY => self.user_properties.push(v.pair()?),
            _ => return Err(NOT_HERE),
        }
        Ok(())
    }
    fn write<S: Sink>(&self, s: &mut S) {
        check_pfi(s, self.payload_format_indicator);
        w_u8(
            s,
            id::PAYLOAD_FORMAT_INDICATOR,
            self.payload_format_indicator,
        );
        w_u32(s, id::MESSAGE_EXPIRY_INTERVAL, self.message_expiry_interval);
        w_str(s, id::CONTENT_TYPE, &self.content_type);
        w_str(s, id::RESPONSE_TOPIC, &self.response_topic);
        w_bin(s, id::CORRELATION_DATA, &self.correlation_data);
        w_u32(s, id::WILL_DELAY_INTERVAL, self.will_delay_interval);
        w_user(s, &self.user_properties);
    }
}

fn check_pfi<S: Sink>(s: &mut S, v: Option<u8>) {
    if matches!(v, Some(v) if v > 1) {
        s.fail(EncodeError::InvalidPacket(
            "payload format indicator must be 0 or 1",
        ));
    }
}

/// CONNACK properties (§3.2.2.3).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnAckProperties {
    pub session_expiry_interval: Option<u32>,
    pub receive_maximum: Option<u16>,
    /// Only `AtMostOnce` or `AtLeastOnce` can be announced; absent means QoS 2 is supported.
    pub maximum_qos: Option<QoS>,
    pub retain_available: Option<bool>,
    pub maximum_packet_size: Option<u32>,
    pub assigned_client_identifier: Option<String>,
    pub topic_alias_maximum: Option<u16>,
    pub reason_string: Option<String>,
    pub user_properties: Vec<(String, String)>,
    pub wildcard_subscription_available: Option<bool>,
    pub subscription_identifiers_available: Option<bool>,
    pub shared_subscription_available: Option<bool>,
    pub server_keep_alive: Option<u16>,
    pub response_information: Option<String>,
    pub server_reference: Option<String>,
    pub authentication_method: Option<String>,
    pub authentication_data: Option<Bytes>,
}

impl Properties for ConnAckProperties {
    const CONTEXT: u16 = IN_CONNACK;
    fn apply(&mut self, pid: u8, v: Value) -> Result<(), DecodeError> {
        match pid {
            id::SESSION_EXPIRY_INTERVAL => self.session_expiry_interval = Some(v.u32()?),
            id::RECEIVE_MAXIMUM => self.receive_maximum = Some(v.u16()?),
            id::MAXIMUM_QOS => self.maximum_qos = QoS::from_u8(v.u8()?),
            id::RETAIN_AVAILABLE => self.retain_available = Some(v.flag()?),
            id::MAXIMUM_PACKET_SIZE => self.maximum_packet_size = Some(v.u32()?),
            id::ASSIGNED_CLIENT_IDENTIFIER => self.assigned_client_identifier = Some(v.string()?),
            id::TOPIC_ALIAS_MAXIMUM => self.topic_alias_maximum = Some(v.u16()?),
            id::REASON_STRING => self.reason_string = Some(v.string()?),
            id::USER_PROPERTY => self.user_properties.push(v.pair()?),
            id::WILDCARD_SUBSCRIPTION_AVAILABLE => {
                self.wildcard_subscription_available = Some(v.flag()?)
            }
            id::SUBSCRIPTION_IDENTIFIER_AVAILABLE => {
                self.subscription_identifiers_available = Some(v.flag()?)
            }
            id::SHARED_SUBSCRIPTION_AVAILABLE => {
                self.shared_subscription_available = Some(v.flag()?)
            }
            id::SERVER_KEEP_ALIVE => self.server_keep_alive = Some(v.u16()?),
            id::RESPONSE_INFORMATION => self.response_information = Some(v.string()?),
            id::SERVER_REFERENCE => self.server_reference = Some(v.string()?),
            id::AUTHENTICATION_METHOD => self.authentication_method = Some(v.string()?),
            id::AUTHENTICATION_DATA => self.authentication_data = Some(v.bytes()?),
            _ => return Err(NOT_HERE),
        }
        Ok(())
    }
    fn write<S: Sink>(&self, s: &mut S) {
        if self.maximum_qos == Some(QoS::ExactlyOnce) {
            s.fail(EncodeError::InvalidPacket(
                "maximum QoS can only announce 0 or 1",
            ));
        }
        if self.receive_maximum == Some(0) {
            s.fail(EncodeError::InvalidPacket("receive maximum 0"));
        }
        if self.maximum_packet_size == Some(0) {
            s.fail(EncodeError::InvalidPacket("maximum packet size 0"));
        }
        w_u32(s, id::SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        w_str(
            s,
            id::ASSIGNED_CLIENT_IDENTIFIER,
            &self.assigned_client_identifier,
        );
        w_u16(s, id::SERVER_KEEP_ALIVE, self.server_keep_alive);
        w_str(s, id::AUTHENTICATION_METHOD, &self.authentication_method);
        w_bin(s, id::AUTHENTICATION_DATA, &self.authentication_data);
        w_str(s, id::RESPONSE_INFORMATION, &self.response_information);
        w_str(s, id::SERVER_REFERENCE, &self.server_reference);
        w_str(s, id::REASON_STRING, &self.reason_string);
        w_u16(s, id::RECEIVE_MAXIMUM, self.receive_maximum);
        w_u16(s, id::TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        w_u8(s, id::MAXIMUM_QOS, self.maximum_qos.map(QoS::as_u8));
        w_flag(s, id::RETAIN_AVAILABLE, self.retain_available);
        w_user(s, &self.user_properties);
        w_u32(s, id::MAXIMUM_PACKET_SIZE, self.maximum_packet_size);
        w_flag(
            s,
            id::WILDCARD_SUBSCRIPTION_AVAILABLE,
            self.wildcard_subscription_available,
        );
        w_flag(
            s,
            id::SUBSCRIPTION_IDENTIFIER_AVAILABLE,
            self.subscription_identifiers_available,
        );
        w_flag(
            s,
            id::SHARED_SUBSCRIPTION_AVAILABLE,
            self.shared_subscription_available,
        );
    }
}

/// PUBLISH properties (§3.3.2.3).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishProperties {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    /// Passed through as received; whether it is 0 or above the Topic Alias Maximum is the
    /// connection's business (it answers with 0x94 Topic Alias invalid, not a codec error).
    pub topic_alias: Option<u16>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
    /// May repeat in a PUBLISH sent to a client matching several subscriptions.
    pub subscription_identifiers: Vec<u32>,
    pub content_type: Option<String>,
}

impl Properties for PublishProperties {
    const CONTEXT: u16 = IN_PUBLISH;
    fn apply(&mut self, pid: u8, v: Value) -> Result<(), DecodeError> {
        match pid {
            id::PAYLOAD_FORMAT_INDICATOR => self.payload_format_indicator = Some(v.u8()?),
            id::MESSAGE_EXPIRY_INTERVAL => self.message_expiry_interval = Some(v.u32()?),
            id::TOPIC_ALIAS => self.topic_alias = Some(v.u16()?),
            id::RESPONSE_TOPIC => self.response_topic = Some(v.string()?),
            id::CORRELATION_DATA => self.correlation_data = Some(v.bytes()?),
            id::USER_PROPERTY => self.user_properties.push(v.pair()?),
            id::SUBSCRIPTION_IDENTIFIER => self.subscription_identifiers.push(v.u32()?),
            id::CONTENT_TYPE => self.content_type = Some(v.string()?),
            _ => return Err(NOT_HERE),
        }
        Ok(())
    }
    fn write<S: Sink>(&self, s: &mut S) {
        check_pfi(s, self.payload_format_indicator);
        w_u8(
            s,
            id::PAYLOAD_FORMAT_INDICATOR,
            self.payload_format_indicator,
        );
        w_u32(s, id::MESSAGE_EXPIRY_INTERVAL, self.message_expiry_interval);
        w_str(s, id::CONTENT_TYPE, &self.content_type);
        w_str(s, id::RESPONSE_TOPIC, &self.response_topic);
        w_bin(s, id::CORRELATION_DATA, &self.correlation_data);
        for &sid in &self.subscription_identifiers {
            w_var(s, id::SUBSCRIPTION_IDENTIFIER, sid);
        }
        w_u16(s, id::TOPIC_ALIAS, self.topic_alias);
        w_user(s, &self.user_properties);
    }
}

/// Properties of PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK and UNSUBACK: they all allow only a
/// Reason String and User Properties.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AckProperties {
    pub reason_string: Option<String>,
    pub user_properties: Vec<(String, String)>,
}

impl Properties for AckProperties {
    const CONTEXT: u16 = IN_ACK;
    fn apply(&mut self, pid: u8, v: Value) -> Result<(), DecodeError> {
        match pid {
            id::REASON_STRING => self.reason_string = Some(v.string()?),
            id::USER_PROPERTY => self.user_properties.push(v.pair()?),
            _ => return Err(NOT_HERE),
        }
        Ok(())
    }
    fn write<S: Sink>(&self, s: &mut S) {
        w_str(s, id::REASON_STRING, &self.reason_string);
        w_user(s, &self.user_properties);
    }
}

/// SUBSCRIBE properties (§3.8.2.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscribeProperties {
    /// 1..=268,435,455; 0 is a Protocol Error.
    pub subscription_identifier: Option<u32>,
    pub user_properties: Vec<(String, String)>,
}

impl Properties for SubscribeProperties {
    const CONTEXT: u16 = IN_SUBSCRIBE;
    fn apply(&mut self, pid: u8, v: Value) -> Result<(), DecodeError> {
        match pid {
            id::SUBSCRIPTION_IDENTIFIER => self.subscription_identifier = Some(v.u32()?),
            id::USER_PROPERTY => self.user_properties.push(v.pair()?),
            _ => return Err(NOT_HERE),
        }
        Ok(())
    }
    fn write<S: Sink>(&self, s: &mut S) {
        if let Some(sid) = self.subscription_identifier {
            w_var(s, id::SUBSCRIPTION_IDENTIFIER, sid);
        }
        w_user(s, &self.user_properties);
    }
}

/// UNSUBSCRIBE properties (§3.10.2.1): only User Properties.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnsubscribeProperties {
    pub user_properties: Vec<(String, String)>,
}

impl Properties for UnsubscribeProperties {
    const CONTEXT: u16 = IN_UNSUBSCRIBE;
    fn apply(&mut self, pid: u8, v: Value) -> Result<(), DecodeError> {
        match pid {
            id::USER_PROPERTY => self.user_properties.push(v.pair()?),
            _ => return Err(NOT_HERE),
        }
        Ok(())
    }
    fn write<S: Sink>(&self, s: &mut S) {
        w_user(s, &self.user_properties);
    }
}

/// DISCONNECT properties (§3.14.2.2).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DisconnectProperties {
    pub session_expiry_interval: Option<u32>,
    pub reason_string: Option<String>,
    pub user_properties: Vec<(String, String)>,
    pub server_reference: Option<String>,
}

impl Properties for DisconnectProperties {
    const CONTEXT: u16 = IN_DISCONNECT;
    fn apply(&mut self, pid: u8, v: Value) -> Result<(), DecodeError> {
        match pid {
            id::SESSION_EXPIRY_INTERVAL => self.session_expiry_interval = Some(v.u32()?),
            id::REASON_STRING => self.reason_string = Some(v.string()?),
            id::USER_PROPERTY => self.user_properties.push(v.pair()?),
            id::SERVER_REFERENCE => self.server_reference = Some(v.string()?),
            _ => return Err(NOT_HERE),
        }
        Ok(())
    }
    fn write<S: Sink>(&self, s: &mut S) {
        w_u32(s, id::SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        w_str(s, id::SERVER_REFERENCE, &self.server_reference);
        w_str(s, id::REASON_STRING, &self.reason_string);
        w_user(s, &self.user_properties);
    }
}

/// AUTH properties (§3.15.2.2).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthProperties {
    pub authentication_method: Option<String>,
    pub authentication_data: Option<Bytes>,
    pub reason_string: Option<String>,
    pub user_properties: Vec<(String, String)>,
}

impl Properties for AuthProperties {
    const CONTEXT: u16 = IN_AUTH;
    fn apply(&mut self, pid: u8, v: Value) -> Result<(), DecodeError> {
        match pid {
            id::AUTHENTICATION_METHOD => self.authentication_method = Some(v.string()?),
            id::AUTHENTICATION_DATA => self.authentication_data = Some(v.bytes()?),
            id::REASON_STRING => self.reason_string = Some(v.string()?),
            id::USER_PROPERTY => self.user_properties.push(v.pair()?),
            _ => return Err(NOT_HERE),
        }
        Ok(())
    }
    fn write<S: Sink>(&self, s: &mut S) {
        w_str(s, id::AUTHENTICATION_METHOD, &self.authentication_method);
        w_bin(s, id::AUTHENTICATION_DATA, &self.authentication_data);
        w_str(s, id::REASON_STRING, &self.reason_string);
        w_user(s, &self.user_properties);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn decode<P: Properties>(raw: &'static [u8]) -> Result<P, DecodeError> {
        read::<P>(&mut Reader::new(Bytes::from_static(raw)))
    }

    #[test]
    fn every_property_set_round_trips() {
        let p = ConnAckProperties {
            session_expiry_interval: Some(7),
            receive_maximum: Some(10),
            maximum_qos: Some(QoS::AtLeastOnce),
            retain_available: Some(false),
            maximum_packet_size: Some(1024),
            assigned_client_identifier: Some("auto-1".into()),
            topic_alias_maximum: Some(5),
            reason_string: Some("ok".into()),
            user_properties: vec![("a".into(), "b".into()), ("a".into(), "c".into())],
            wildcard_subscription_available: Some(true),
            subscription_identifiers_available: Some(true),
            shared_subscription_available: Some(false),
            server_keep_alive: Some(30),
            response_information: Some("resp/".into()),
            server_reference: Some("other".into()),
            authentication_method: Some("SCRAM".into()),
            authentication_data: Some(Bytes::from_static(b"\x00\x01")),
        };
        let mut b = BytesMut::new();
        write(&mut b, &p);
        assert_eq!(b.len(), measure(|c| write(c, &p)));
        let got: ConnAckProperties = read(&mut Reader::new(b.freeze())).unwrap();
        assert_eq!(got, p);
    }

    #[test]
    fn empty_list() {
        let p: AckProperties = decode(b"\x00").unwrap();
        assert!(p.is_empty());
    }

    #[test]
    fn wrong_packet_is_malformed() {
        // Topic Alias in CONNECT, Session Expiry Interval in SUBSCRIBE and UNSUBSCRIBE.
        let e = decode::<ConnectProperties>(b"\x03\x23\x00\x01").unwrap_err();
        assert!(matches!(e, DecodeError::MalformedPacket(_)), "{e}");
        let e = decode::<SubscribeProperties>(b"\x05\x11\x00\x00\x00\x09").unwrap_err();
        assert!(matches!(e, DecodeError::MalformedPacket(_)), "{e}");
        let e = decode::<UnsubscribeProperties>(b"\x05\x11\x00\x00\x00\x09").unwrap_err();
        assert!(matches!(e, DecodeError::MalformedPacket(_)), "{e}");
    }

    #[test]
    fn duplicate_is_protocol_error_except_user_property_and_publish_sub_id() {
        let e = decode::<ConnectProperties>(b"\x0A\x11\x00\x00\x00\x01\x11\x00\x00\x00\x02")
            .unwrap_err();
        assert!(matches!(e, DecodeError::ProtocolError(_)));
        let p: PublishProperties = decode(b"\x04\x0B\x01\x0B\x02").unwrap();
        assert_eq!(p.subscription_identifiers, vec![1, 2]);
        let e = decode::<SubscribeProperties>(b"\x04\x0B\x01\x0B\x02").unwrap_err();
        assert!(matches!(e, DecodeError::ProtocolError(_)));
        let p: AckProperties = decode(b"\x0E\x26\x00\x01k\x00\x01v\x26\x00\x01k\x00\x01w").unwrap();
        assert_eq!(p.user_properties.len(), 2);
    }

    #[test]
    fn unknown_identifier_is_malformed() {
        let e = decode::<AckProperties>(b"\x02\x7F\x00").unwrap_err();
        assert!(matches!(e, DecodeError::MalformedPacket(_)));
        // Identifiers are variable byte integers; a large one is simply unknown.
        let e = decode::<AckProperties>(b"\x03\x80\x01\x00").unwrap_err();
        assert!(matches!(e, DecodeError::MalformedPacket(_)));
    }

    #[test]
    fn bad_values_are_protocol_errors() {
        for raw in [
            &b"\x03\x21\x00\x00"[..],
            b"\x05\x27\x00\x00\x00\x00",
            b"\x02\x17\x02",
            b"\x02\x19\x05",
        ] {
            let e =
                read::<ConnectProperties>(&mut Reader::new(Bytes::from_static(raw))).unwrap_err();
            assert!(matches!(e, DecodeError::ProtocolError(_)), "{raw:?}");
        }
        let e = decode::<SubscribeProperties>(b"\x02\x0B\x00").unwrap_err();
        assert!(matches!(e, DecodeError::ProtocolError(_)));
        let e = decode::<PublishProperties>(b"\x02\x01\x02").unwrap_err();
        assert!(matches!(e, DecodeError::ProtocolError(_)));
    }

    #[test]
    fn truncated_lists_are_malformed() {
        for raw in [&b"\x05\x11\x00"[..], b"\x03\x11\x00\x00", b"\x02\x26\x00"] {
            let e =
                read::<ConnectProperties>(&mut Reader::new(Bytes::from_static(raw))).unwrap_err();
            assert!(matches!(e, DecodeError::MalformedPacket(_)), "{raw:?}");
        }
    }
}

//! Authorization: which client may publish to, subscribe to and receive which topics.
//!
//! Rules come from a text file (`mqtt.acl_file`, or `acl_file` on one listener), one per line:
//!
//! ```text
//! # comment
//! allow|deny  publish|subscribe|all  <topic pattern>  [user <name> | client <id> | anonymous]
//! ```
//!
//! - **Order matters, the first rule that applies wins**, and when the file holds any rule,
//!   what no rule allows is denied. Without a file everything is allowed.
//! - Patterns are MQTT topic filters (`+` one level, `#` the rest; a leading wildcard does not
//!   reach `$` topics, §4.7.2). `%u` and `%c` stand for the connection's user name and client
//!   id. A rule with `%u` never applies to a client without a user name, and a user name or
//!   client id that contains `+`, `#` or `/` (or is empty) makes such a rule not apply: a value
//!   is never read as a wildcard or as more than one level, so it cannot widen a rule.
//! - `publish` covers PUBLISH and the will of CONNECT; `subscribe` covers SUBSCRIBE **and every
//!   message delivered** (read access); `all` both.
//!
//! How a SUBSCRIBE filter meets the rules: a rule applies to a filter when its pattern covers
//! the **whole** filter (every topic the filter can match, the pattern matches too: `a/#`
//! covers `a/#` and `a/b`, `a/b` does not cover `a/#`). Rules that overlap only part of the
//! filter are skipped, so `deny subscribe secret/#` followed by `allow subscribe #` still lets a
//! client subscribe to `#` — and then every delivered message is checked on its own topic, which
//! keeps `secret/...` from that client. This is mosquitto's model (check the filter at SUBSCRIBE,
//! the topic at delivery), and it is why delivery is checked at all: it is also how a reload
//! reaches existing subscriptions.
//!
//! This module is pure except for [`Acl`], the reloadable holder of the current rules, which
//! [`crate::reload::watch`] reloads on SIGHUP and when the file changes.
//!
//! The module's files: `rules.rs` parses a rule file and decides a request; `pattern.rs`
//! matches a rule's pattern (placeholders filled in) against a topic or a filter; `file.rs`
//! holds a file's current rules and reloads them; `view.rs` is one connection's access to
//! them.

mod file;
mod pattern;
mod rules;
#[cfg(test)]
mod tests;
mod view;

pub use file::{Acl, AclSet};
pub use rules::{AclError, AclRules};
pub use view::AclView;

/// What a client wants to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// PUBLISH (and the will of a CONNECT) to a topic name.
    Publish,
    /// SUBSCRIBE to a topic filter (the `$share/<group>/` prefix removed).
    Subscribe,
    /// Receive a message with this topic name (each delivery, retained ones included).
    Deliver,
}

impl Access {
    pub const ALL: [Access; 3] = [Access::Publish, Access::Subscribe, Access::Deliver];

    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Access::Publish => "publish",
            Access::Subscribe => "subscribe",
            Access::Deliver => "deliver",
        }
    }
}

/// Whom a request comes from.
#[derive(Debug, Clone, Copy)]
pub struct Who<'a> {
    /// The connection's user name; `None` for an anonymous client.
    pub username: Option<&'a str>,
    pub client_id: &'a str,
}

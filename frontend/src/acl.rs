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

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tiermq_common::topic;
use tokio::sync::watch as channel;
use tracing::info;

use crate::reload::{Attempted, FileStamp, Reload};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    Publish,
    Subscribe,
    All,
}

impl Verb {
    fn grants(self, access: Access) -> bool {
        match self {
            Verb::All => true,
            Verb::Publish => access == Access::Publish,
            Verb::Subscribe => access != Access::Publish,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Subject {
    Everyone,
    User(String),
    Client(String),
    Anonymous,
}

impl Subject {
    fn applies(&self, who: &Who) -> bool {
        match self {
            Subject::Everyone => true,
            Subject::User(u) => who.username == Some(u.as_str()),
            Subject::Client(c) => who.client_id == c,
            Subject::Anonymous => who.username.is_none(),
        }
    }
}

/// One level of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    /// `+`
    One,
    /// `#` (always last)
    Rest,
    /// Literal text, possibly with `%u` / `%c` inside.
    Text { text: String, placeholders: bool },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    allow: bool,
    verb: Verb,
    pattern: Vec<Level>,
    subject: Subject,
    line: usize,
}

/// A parsed ACL file: the rules in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AclRules {
    rules: Vec<Rule>,
}

/// A line of an ACL file that is not a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AclError {
    #[error("cannot read ACL file {path}: {message}")]
    Read { path: String, message: String },
    #[error("ACL file line {line}: {message}")]
    Parse { line: usize, message: String },
}

const FORMAT: &str =
    "expected `allow|deny publish|subscribe|all <pattern> [user <name>|client <id>|anonymous]`";

fn parse_pattern(p: &str) -> Result<Vec<Level>, String> {
    if topic::is_shared(p) {
        return Err(
            "a pattern cannot be a shared subscription ($share/...): rules apply to \
                    the filter after the group"
                .into(),
        );
    }
    // Placeholders stand for one literal level part; validate the pattern with them filled in.
    let probe = p.replace("%u", "u").replace("%c", "c");
    topic::validate_topic_filter(&probe).map_err(|e| format!("pattern {p:?}: {e}"))?;
    Ok(p.split('/')
        .map(|l| match l {
            "+" => Level::One,
            "#" => Level::Rest,
            t => Level::Text {
                text: t.to_string(),
                placeholders: t.contains("%u") || t.contains("%c"),
            },
        })
        .collect())
}

impl AclRules {
    pub fn parse(text: &str) -> Result<AclRules, AclError> {
        let mut rules = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let err = |message: String| AclError::Parse { line, message };
            let mut words: Vec<&str> = raw.split_whitespace().collect();
            // A comment is a line starting with `#`, or a word starting with `#` after the
            // pattern (`#` as the pattern itself is the wildcard).
            if words.first().is_some_and(|w| w.starts_with('#')) {
                continue;
            }
            if let Some(i) = words.iter().skip(3).position(|w| w.starts_with('#')) {
                words.truncate(3 + i);
            }
            if words.is_empty() {
                continue;
            }
            let allow = match words[0] {
                "allow" => true,
                "deny" => false,
                w => return Err(err(format!("unknown decision {w:?}; {FORMAT}"))),
            };
            let verb = match words.get(1).copied() {
                Some("publish") => Verb::Publish,
                Some("subscribe") => Verb::Subscribe,
                Some("all") => Verb::All,
                Some(w) => return Err(err(format!("unknown action {w:?}; {FORMAT}"))),
                None => return Err(err(FORMAT.into())),
            };
            let Some(pattern) = words.get(2) else {
                return Err(err(format!("missing topic pattern; {FORMAT}")));
            };
            let pattern = parse_pattern(pattern).map_err(err)?;
            let subject = match &words[3..] {
                [] => Subject::Everyone,
                ["anonymous"] => Subject::Anonymous,
                ["user", name] => Subject::User(name.to_string()),
                ["client", id] => Subject::Client(id.to_string()),
                other => {
                    return Err(err(format!(
                        "unexpected {:?} after the pattern; {FORMAT}",
                        other.join(" ")
                    )))
                }
            };
            rules.push(Rule {
                allow,
                verb,
                pattern,
                subject,
                line,
            });
        }
        Ok(AclRules { rules })
    }

    pub fn load(path: &Path) -> Result<AclRules, AclError> {
        let text = std::fs::read_to_string(path).map_err(|e| AclError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        AclRules::parse(&text)
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether `who` may do `access` on `topic` (a topic name for publish and deliver, a
    /// filter for subscribe, `$share/<group>/` already removed). No rules: allowed.
    pub fn check(&self, who: &Who, access: Access, topic: &str) -> bool {
        match self.deciding(who, access, topic) {
            Some(rule) => rule.allow,
            None => self.rules.is_empty(),
        }
    }

    /// The line of the rule that decides, if any applies (for tests and logs).
    pub fn deciding_line(&self, who: &Who, access: Access, topic: &str) -> Option<usize> {
        self.deciding(who, access, topic).map(|r| r.line)
    }

    /// The first rule that applies.
    fn deciding(&self, who: &Who, access: Access, topic: &str) -> Option<&Rule> {
        let levels: Vec<&str> = topic.split('/').collect();
        self.rules.iter().find(|r| {
            if !r.verb.grants(access) || !r.subject.applies(who) {
                return false;
            }
            let Some(pattern) = substitute(&r.pattern, who) else {
                return false;
            };
            match access {
                Access::Subscribe => covers(&pattern, &levels),
                Access::Publish | Access::Deliver => matches_name(&pattern, &levels),
            }
        })
    }
}

/// A pattern level after `%u`/`%c` substitution.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pat<'a> {
    One,
    Rest,
    Text(Cow<'a, str>),
}

/// Fills in `%u` and `%c`. `None` when the rule cannot apply: a placeholder without a value
/// (anonymous client) or with one that is empty or holds `+`, `#` or `/`. Such a value is
/// refused rather than escaped: it would otherwise turn a literal level into a wildcard or
/// into several levels, and so reach topics of other users.
fn substitute<'a>(pattern: &'a [Level], who: &Who) -> Option<Vec<Pat<'a>>> {
    fn literal(v: &str) -> Option<&str> {
        (!v.is_empty() && !v.contains(['+', '#', '/'])).then_some(v)
    }
    pattern
        .iter()
        .map(|l| match l {
            Level::One => Some(Pat::One),
            Level::Rest => Some(Pat::Rest),
            Level::Text {
                text,
                placeholders: false,
            } => Some(Pat::Text(Cow::Borrowed(text))),
            Level::Text { text, .. } => {
                let mut out = text.clone();
                if out.contains("%u") {
                    out = out.replace("%u", literal(who.username?)?);
                }
                if out.contains("%c") {
                    out = out.replace("%c", literal(who.client_id)?);
                }
                Some(Pat::Text(Cow::Owned(out)))
            }
        })
        .collect()
}

/// §4.7.2: a leading wildcard does not reach topics starting with `$`.
fn dollar_excluded(pattern: &[Pat], levels: &[&str]) -> bool {
    levels.first().is_some_and(|l| l.starts_with('$'))
        && matches!(pattern.first(), Some(Pat::One | Pat::Rest))
}

/// Whether `pattern` matches the topic name `levels` (MQTT matching, §4.7).
fn matches_name(pattern: &[Pat], levels: &[&str]) -> bool {
    if dollar_excluded(pattern, levels) {
        return false;
    }
    for (i, p) in pattern.iter().enumerate() {
        match (p, levels.get(i)) {
            (Pat::Rest, _) => return true,
            (Pat::One, Some(_)) => {}
            (Pat::Text(t), Some(l)) if t == l => {}
            _ => return false,
        }
    }
    pattern.len() == levels.len()
}

/// Whether every topic the filter `levels` matches is matched by `pattern` too.
fn covers(pattern: &[Pat], filter: &[&str]) -> bool {
    // A filter starting with a literal `$...` level reaches `$` topics, a pattern with a
    // leading wildcard does not.
    if dollar_excluded(pattern, filter) {
        return false;
    }
    for (i, p) in pattern.iter().enumerate() {
        match (p, filter.get(i).copied()) {
            // `#` in the pattern takes every remaining level, the parent level included.
            (Pat::Rest, _) => return true,
            // The filter ended (only a trailing `#` would still match), or its `#` reaches
            // deeper than anything but `#`.
            (_, None | Some("#")) => return false,
            (Pat::One, Some(_)) => {}
            // A pattern level is never `+`, so equal text means a literal filter level.
            (Pat::Text(t), Some(l)) if t == l => {}
            _ => return false,
        }
    }
    pattern.len() == filter.len()
}

/// The ACL of a listener (or of the node), replaced as a whole on reload. Connections hold a
/// [`AclView`], which sees a reload at its next check.
pub struct Acl {
    path: PathBuf,
    current: channel::Sender<Arc<AclRules>>,
    attempted: Attempted,
}

impl std::fmt::Debug for Acl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acl").field("path", &self.path).finish()
    }
}

impl Acl {
    /// Reads the file now; an unreadable or invalid file is an error (the node does not start).
    pub fn load(path: &Path) -> Result<Arc<Acl>, AclError> {
        let stamp = FileStamp::of([path]);
        let rules = AclRules::load(path)?;
        info!(file = %path.display(), rules = rules.len(), "ACL loaded");
        Ok(Acl::from_rules(path, rules, stamp))
    }

    fn from_rules(path: &Path, rules: AclRules, stamp: FileStamp) -> Arc<Acl> {
        Arc::new(Acl {
            path: path.to_path_buf(),
            current: channel::Sender::new(Arc::new(rules)),
            attempted: Attempted::new(stamp),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn rules(&self) -> Arc<AclRules> {
        self.current.borrow().clone()
    }

    /// Reads the file again; on success every connection re-checks at its next step (its
    /// granted subscriptions included). On error the previous rules stay.
    pub fn reload_rules(&self) -> Result<(), AclError> {
        self.attempted.set(FileStamp::of([self.path.as_path()]));
        let rules = AclRules::load(&self.path)?;
        info!(file = %self.path.display(), rules = rules.len(), "ACL reloaded");
        self.current.send_replace(Arc::new(rules));
        Ok(())
    }

    /// The per-connection view for a client.
    pub fn view(&self, username: Option<Arc<str>>, client_id: Arc<str>) -> AclView {
        let mut rx = self.current.subscribe();
        let rules = rx.borrow_and_update().clone();
        AclView {
            rx,
            rules,
            username,
            client_id,
            cache: HashMap::new(),
            granted: HashSet::new(),
            recheck_due: false,
        }
    }
}

/// Reloaded with the certificates and the password file ([`crate::reload::watch`]: SIGHUP,
/// and polling for file changes).
impl Reload for Acl {
    fn what(&self) -> String {
        format!("ACL file {}", self.path.display())
    }

    fn reload(&self) -> Result<(), String> {
        self.reload_rules().map_err(|e| e.to_string())
    }

    fn changed(&self) -> bool {
        self.attempted
            .differs(&FileStamp::of([self.path.as_path()]))
    }
}

/// The node's ACLs: one for every listener without its own, and per-listener overrides.
#[derive(Debug, Clone, Default)]
pub struct AclSet {
    pub default: Option<Arc<Acl>>,
    /// By listener name.
    pub listeners: HashMap<String, Arc<Acl>>,
}

impl AclSet {
    /// The ACL that governs connections of `listener`; `None`: everything allowed.
    pub fn for_listener(&self, listener: &str) -> Option<&Arc<Acl>> {
        self.listeners.get(listener).or(self.default.as_ref())
    }

    pub fn is_empty(&self) -> bool {
        self.default.is_none() && self.listeners.is_empty()
    }

    /// Every ACL, for the reload watcher.
    pub fn reloaders(&self) -> Vec<Arc<dyn Reload>> {
        self.default
            .iter()
            .chain(self.listeners.values())
            .map(|a| a.clone() as Arc<dyn Reload>)
            .collect()
    }
}

/// Deliveries' decisions kept per connection, by topic; cleared on reload and when full.
const CACHE_MAX: usize = 1024;

/// One connection's access to the current rules: its identity, a cache of delivery decisions
/// and the filters it was granted (re-checked on reload).
#[derive(Debug)]
pub struct AclView {
    rx: channel::Receiver<Arc<AclRules>>,
    rules: Arc<AclRules>,
    username: Option<Arc<str>>,
    client_id: Arc<str>,
    cache: HashMap<String, bool>,
    /// Filters (as subscribed, `$share/...` included) granted on this connection.
    granted: HashSet<String>,
    /// The rules changed and the granted filters have not been re-checked yet.
    recheck_due: bool,
}

impl AclView {
    fn who(&self) -> Who<'_> {
        Who {
            username: self.username.as_deref(),
            client_id: &self.client_id,
        }
    }

    /// Takes the newest rules if there are (cheap: one atomic load when nothing changed).
    fn refresh(&mut self) {
        if self.rx.has_changed().unwrap_or(false) {
            self.rules = self.rx.borrow_and_update().clone();
            self.cache.clear();
            self.recheck_due = true;
        }
    }

    pub fn may_publish(&mut self, topic: &str) -> bool {
        self.refresh();
        self.rules.check(&self.who(), Access::Publish, topic)
    }

    /// `filter` as the client sent it: a shared subscription is checked on its filter part.
    pub fn may_subscribe(&mut self, filter: &str) -> bool {
        self.refresh();
        let plain = match topic::parse_subscription(filter) {
            Ok((_, f)) => f,
            // Invalid filters are refused by the partitions with their own reason code.
            Err(_) => return true,
        };
        self.rules.check(&self.who(), Access::Subscribe, plain)
    }

    pub fn may_deliver(&mut self, topic: &str) -> bool {
        self.refresh();
        if let Some(&ok) = self.cache.get(topic) {
            return ok;
        }
        let ok = self.rules.check(&self.who(), Access::Deliver, topic);
        if self.cache.len() >= CACHE_MAX {
            self.cache.clear();
        }
        self.cache.insert(topic.to_string(), ok);
        ok
    }

    /// The session now holds `filter` (a SUBACK granted it).
    pub fn granted(&mut self, filter: &str) {
        self.granted.insert(filter.to_string());
    }

    /// The session no longer holds `filter`.
    pub fn removed(&mut self, filter: &str) {
        self.granted.remove(filter);
    }

    /// Resolves when the rules were reloaded since the last call (never without an ACL).
    pub async fn reloaded(view: &mut Option<AclView>) {
        let Some(v) = view.as_mut() else {
            return std::future::pending().await;
        };
        if !v.recheck_due {
            if v.rx.changed().await.is_err() {
                return std::future::pending().await;
            }
            v.rules = v.rx.borrow_and_update().clone();
            v.cache.clear();
        }
        v.recheck_due = false;
    }

    /// The granted filters the current rules no longer allow; they are forgotten here (the
    /// caller unsubscribes them).
    pub fn revoked(&mut self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let filters: Vec<String> = self.granted.iter().cloned().collect();
        for f in filters {
            if !self.may_subscribe(&f) {
                self.granted.remove(&f);
                out.push(f);
            }
        }
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn who<'a>(user: Option<&'a str>, client: &'a str) -> Who<'a> {
        Who {
            username: user,
            client_id: client,
        }
    }

    fn rules(text: &str) -> AclRules {
        AclRules::parse(text).unwrap()
    }

    #[test]
    fn no_rules_allow_everything_any_rule_denies_the_rest() {
        let alice = who(Some("alice"), "c1");
        assert!(AclRules::default().check(&alice, Access::Publish, "x"));
        let r = rules("# only one rule\nallow publish a/b\n");
        assert!(r.check(&alice, Access::Publish, "a/b"));
        assert!(!r.check(&alice, Access::Publish, "a/c"));
        assert!(!r.check(&alice, Access::Subscribe, "a/b"));
        assert!(!r.check(&alice, Access::Deliver, "a/b"));
    }

    #[test]
    fn first_match_wins() {
        let c = who(Some("u"), "c");
        let deny_first = rules("deny all a/secret\nallow all a/#\n");
        assert!(!deny_first.check(&c, Access::Publish, "a/secret"));
        assert!(deny_first.check(&c, Access::Publish, "a/open"));
        let allow_first = rules("allow all a/#\ndeny all a/secret\n");
        assert!(allow_first.check(&c, Access::Publish, "a/secret"));
        assert_eq!(
            allow_first.deciding_line(&c, Access::Publish, "a/secret"),
            Some(1)
        );
    }

    #[test]
    fn subjects() {
        let r = rules(
            "allow publish u/alice user alice\n\
             allow publish dev/7 client dev-7\n\
             allow publish pub anonymous\n",
        );
        assert!(r.check(&who(Some("alice"), "x"), Access::Publish, "u/alice"));
        assert!(!r.check(&who(Some("bob"), "x"), Access::Publish, "u/alice"));
        assert!(r.check(&who(None, "dev-7"), Access::Publish, "dev/7"));
        assert!(!r.check(&who(None, "dev-8"), Access::Publish, "dev/7"));
        assert!(r.check(&who(None, "x"), Access::Publish, "pub"));
        assert!(!r.check(&who(Some("a"), "x"), Access::Publish, "pub"));
    }

    #[test]
    fn placeholders() {
        let r = rules("allow all users/%u/#\nallow publish devices/%c/up\n");
        let alice = who(Some("alice"), "dev1");
        assert!(r.check(&alice, Access::Subscribe, "users/alice/#"));
        assert!(r.check(&alice, Access::Deliver, "users/alice/inbox"));
        assert!(!r.check(&alice, Access::Subscribe, "users/bob/#"));
        assert!(!r.check(&alice, Access::Subscribe, "users/+/#"));
        assert!(r.check(&alice, Access::Publish, "devices/dev1/up"));
        assert!(!r.check(&alice, Access::Publish, "devices/dev2/up"));
        // %u never matches an anonymous client.
        assert!(!r.check(&who(None, "c"), Access::Publish, "users//x"));
        // Wildcards or separators in the value never widen the rule.
        for evil in ["+", "#", "a/b", "", "al+ce"] {
            let w = who(Some(evil), "c");
            for t in [
                "users/+/x",
                "users/#",
                "users/a/b/x",
                "users//x",
                "users/al+ce/x",
            ] {
                assert!(!r.check(&w, Access::Subscribe, t), "{evil} {t}");
            }
            assert!(!r.check(&w, Access::Deliver, "users/bob/x"), "{evil}");
        }
        let w = who(None, "+");
        assert!(!r.check(&w, Access::Publish, "devices/x/up"));
        // A placeholder inside a level.
        let r = rules("allow publish t/%u-%c\n");
        assert!(r.check(&who(Some("a"), "b"), Access::Publish, "t/a-b"));
        assert!(!r.check(&who(Some("a"), "b"), Access::Publish, "t/a-c"));
    }

    #[test]
    fn subscribe_needs_a_covering_pattern() {
        let c = who(None, "c");
        let r = rules("allow subscribe a/#\nallow subscribe b/+/c\nallow subscribe x/y\n");
        for ok in ["a/#", "a", "a/b", "a/+/c", "a/+", "b/+/c", "b/q/c", "x/y"] {
            assert!(r.check(&c, Access::Subscribe, ok), "{ok}");
        }
        for no in [
            "#", "+/#", "b/#", "b/+/#", "b/+/+", "x/+", "x/#", "x/y/z", "x", "+/y",
        ] {
            assert!(!r.check(&c, Access::Subscribe, no), "{no}");
        }
        // `$` topics are not reached by a leading wildcard.
        let all = rules("allow all #\n");
        assert!(!all.check(&c, Access::Subscribe, "$SYS/#"));
        assert!(!all.check(&c, Access::Deliver, "$SYS/broker/uptime"));
        assert!(all.check(&c, Access::Subscribe, "+/x"));
        let sys = rules("allow subscribe $SYS/#\n");
        assert!(sys.check(&c, Access::Deliver, "$SYS/broker/uptime"));
    }

    #[test]
    fn partial_deny_is_enforced_per_message() {
        let c = who(None, "c");
        let r = rules("deny subscribe secret/#\nallow subscribe #\n");
        assert!(r.check(&c, Access::Subscribe, "#"));
        assert!(!r.check(&c, Access::Subscribe, "secret/+"));
        assert!(!r.check(&c, Access::Deliver, "secret/x"));
        assert!(r.check(&c, Access::Deliver, "public/x"));
    }

    #[test]
    fn shared_subscriptions_are_checked_on_their_filter() {
        let text = "allow subscribe jobs/#\n";
        let path = Path::new("/nonexistent");
        let acl = Acl::from_rules(path, rules(text), FileStamp::of([path]));
        let mut v = acl.view(None, Arc::from("c"));
        assert!(v.may_subscribe("$share/workers/jobs/#"));
        assert!(!v.may_subscribe("$share/workers/other/#"));
    }

    #[test]
    fn bad_lines_are_named() {
        for (text, line, what) in [
            ("allow publish a\nmaybe publish a\n", 2, "unknown decision"),
            ("allow read a\n", 1, "unknown action"),
            ("allow publish\n", 1, "missing topic pattern"),
            ("allow publish a/#/b\n", 1, "pattern"),
            ("allow publish $share/g/a\n", 1, "shared"),
            ("allow publish a user\n", 1, "unexpected"),
            ("allow publish a group x\n", 1, "unexpected"),
        ] {
            match AclRules::parse(text) {
                Err(AclError::Parse { line: l, message }) => {
                    assert_eq!(l, line, "{text}");
                    assert!(message.contains(what), "{text}: {message}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        // Comments: whole lines and after white space; `#` in a pattern stays a wildcard.
        let r = rules("  # note\nallow all a/# # trailing\n\n");
        assert_eq!(r.len(), 1);
        assert!(r.check(&who(None, "c"), Access::Publish, "a/b"));
    }

    #[test]
    fn views_see_reloads_and_revoke_denied_filters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acl");
        std::fs::write(&path, "allow all a/#\nallow all b/#\n").unwrap();
        let acl = Acl::load(&path).unwrap();
        let mut v = acl.view(Some(Arc::from("u")), Arc::from("c"));
        assert!(v.may_subscribe("a/#") && v.may_subscribe("$share/g/b/#"));
        v.granted("a/#");
        v.granted("$share/g/b/#");
        assert!(v.may_deliver("b/x"));
        std::fs::write(&path, "allow all a/#\n").unwrap();
        acl.reload_rules().unwrap();
        assert!(!v.may_deliver("b/x"), "the cache is dropped on reload");
        assert_eq!(v.revoked(), vec!["$share/g/b/#".to_string()]);
        assert!(v.revoked().is_empty());
        // A broken file keeps the rules.
        std::fs::write(&path, "allow nonsense\n").unwrap();
        assert!(acl.reload_rules().is_err());
        assert!(v.may_deliver("a/x"));
        assert_eq!(acl.rules().len(), 1);
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("+".to_string()),
            Just("#".to_string()),
            Just("%u".to_string()),
            Just("%c".to_string()),
            Just("".to_string()),
            "[a-c$]{1,2}",
        ]
    }

    fn path(levels: impl Strategy<Value = String>) -> impl Strategy<Value = String> {
        proptest::collection::vec(levels, 1..5).prop_map(|v| v.join("/"))
    }

    proptest! {
        /// Random rules and requests never panic, and subscribe/deliver agree: a filter that
        /// is a plain topic is allowed exactly when delivering that topic is.
        #[test]
        fn random_rules_never_panic(
            pattern in path(level()),
            request in path(level()),
            user in proptest::option::of("[a-c+#/]{0,3}"),
            client in "[a-c+#/]{0,3}",
        ) {
            let text = format!("deny subscribe a/b\nallow all {pattern}\n");
            let Ok(r) = AclRules::parse(&text) else { return Ok(()); };
            let w = Who { username: user.as_deref(), client_id: &client };
            let _ = r.check(&w, Access::Publish, &request);
            let sub = r.check(&w, Access::Subscribe, &request);
            let del = r.check(&w, Access::Deliver, &request);
            if !request.contains(['+', '#']) {
                prop_assert_eq!(sub, del, "{} {}", text, request);
            }
        }

        /// A user name or client id with wildcard characters never gets more than the same
        /// rule gives a harmless name: whatever `%u`/`%c` rules allow it, it is allowed only
        /// on topics that do not depend on the value.
        #[test]
        fn wildcards_in_names_never_widen(
            pattern in path(prop_oneof![Just("%u".to_string()), Just("%c".to_string()), "[a-b]{1}"]),
            evil in "[a+#/]{0,2}[+#/][a+#/]{0,2}",
            request in path(prop_oneof![Just("+".to_string()), Just("#".to_string()), "[a-b+#/]{1,2}"]),
        ) {
            prop_assume!(pattern.contains('%'));
            let r = AclRules::parse(&format!("allow all {pattern}\n")).unwrap();
            let w = Who { username: Some(&evil), client_id: &evil };
            for access in Access::ALL {
                prop_assert!(!r.check(&w, access, &request), "{} {} {}", pattern, evil, request);
            }
        }
    }

    /// Cross-check of topic matching against the common matcher.
    #[test]
    fn name_matching_agrees_with_the_common_matcher() {
        let filters = [
            "#", "+", "a/#", "a/+", "+/b", "a/b", "$SYS/#", "+/+/c", "a//b", "/#",
        ];
        let topics = ["a", "a/b", "b", "a/b/c", "$SYS/x", "a//b", "/x", "x/y/c"];
        for f in filters {
            let r = rules(&format!("allow publish {f}\n"));
            for t in topics {
                assert_eq!(
                    r.check(&who(None, "c"), Access::Publish, t),
                    topic::filter_matches(f, t),
                    "{f} {t}"
                );
            }
        }
    }
}

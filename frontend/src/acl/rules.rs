//! A rule file: its syntax (one rule a line, parsed into [`AclRules`]) and the decision
//! (the first rule that applies wins; with rules, what none allows is denied).

use std::path::Path;

use tiermq_common::topic;

use super::pattern::{covers, matches_name, substitute};
use super::{Access, Who};

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
pub(super) enum Level {
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

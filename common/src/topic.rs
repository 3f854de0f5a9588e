//! Topic names and topic filters (MQTT 5.0 §4.7, §4.8.2; MQTT 3.1.1 §4.7).
//!
//! * A **topic name** is what a PUBLISH carries: non-empty, no wildcards, no U+0000,
//!   at most 65535 bytes.
//! * A **topic filter** is what a SUBSCRIBE carries: non-empty, `#` only as the whole last
//!   level, `+` only as a whole level, no U+0000, at most 65535 bytes.
//! * A **shared subscription** is `$share/<group>/<filter>`: the group is non-empty and contains
//!   none of `/`, `+`, `#`; the filter is a valid topic filter.
//!
//! Levels are separated by `/`; empty levels are legal (`a//b` has three levels, `/finance` two).
//! [`filter_matches`] is the plain reference matcher; the subscription trie
//! ([`crate::trie::TopicTrie`]) and the retained index
//! ([`crate::retained_index::TopicTree`]) must agree with it.

use crate::types::ReasonCode;

/// Longest topic name or filter an MQTT UTF-8 string can carry.
pub const MAX_TOPIC_LEN: usize = 65535;

/// The prefix of a shared subscription (§4.8.2).
pub const SHARE_PREFIX: &str = "$share/";

/// Why a topic name, topic filter or shared subscription is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic name is empty")]
    EmptyTopicName,
    #[error("topic filter is empty")]
    EmptyTopicFilter,
    #[error("topic name is {0} bytes, more than 65535")]
    TopicNameTooLong(usize),
    #[error("topic filter is {0} bytes, more than 65535")]
    TopicFilterTooLong(usize),
    #[error("topic name contains U+0000")]
    NullInTopicName,
    #[error("topic filter contains U+0000")]
    NullInTopicFilter,
    #[error("topic name contains a wildcard character ('+' or '#')")]
    WildcardInTopicName,
    #[error("'#' must be the whole last level of a topic filter")]
    MisplacedMultiLevelWildcard,
    #[error("'+' must occupy a whole level of a topic filter")]
    MisplacedSingleLevelWildcard,
    #[error("shared subscription has an empty share name")]
    EmptyShareName,
    #[error("shared subscription share name contains '+', '#' or '/'")]
    InvalidShareName,
    #[error("shared subscription has no topic filter after the share name")]
    MissingSharedFilter,
}

impl TopicError {
    /// The v5 reason code for this error: 0x90 Topic Name invalid for PUBLISH topic names,
    /// 0x8F Topic Filter invalid for everything about filters and shared subscriptions.
    pub fn reason_code(&self) -> ReasonCode {
        if self.is_topic_name_error() {
            ReasonCode::TOPIC_NAME_INVALID
        } else {
            ReasonCode::TOPIC_FILTER_INVALID
        }
    }

    /// Whether a subscription string with this error breaks the topic filter syntax itself
    /// (§4.7.1, §4.7.3: empty, `#` not the whole last level, `+` not a whole level, U+0000) —
    /// a protocol violation that closes the connection — as opposed to a well-formed filter
    /// that is not a valid shared subscription (§4.8.2), which a SUBACK can refuse (0x8F).
    pub fn is_ill_formed_filter(&self) -> bool {
        matches!(
            self,
            TopicError::EmptyTopicFilter
                | TopicError::TopicFilterTooLong(_)
                | TopicError::NullInTopicFilter
                | TopicError::MisplacedMultiLevelWildcard
                | TopicError::MisplacedSingleLevelWildcard
        )
    }

    /// Whether this error is about a PUBLISH topic name (as opposed to a filter).
    pub fn is_topic_name_error(&self) -> bool {
        matches!(
            self,
            TopicError::EmptyTopicName
                | TopicError::TopicNameTooLong(_)
                | TopicError::NullInTopicName
                | TopicError::WildcardInTopicName
        )
    }
}

/// Validates the topic name of a PUBLISH (§4.7.3, §3.3.2.1): non-empty, no `+`/`#`,
/// no U+0000, at most 65535 bytes. Topics starting with `$` are accepted here; whether a
/// client may publish to them is policy, not syntax.
pub fn validate_topic_name(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::EmptyTopicName);
    }
    if s.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TopicNameTooLong(s.len()));
    }
    for b in s.bytes() {
        match b {
            0 => return Err(TopicError::NullInTopicName),
            b'+' | b'#' => return Err(TopicError::WildcardInTopicName),
            _ => {}
        }
    }
    Ok(())
}

/// Validates a (non-shared) topic filter (§4.7.1, §4.7.3): non-empty, no U+0000, at most
/// 65535 bytes, `#` only as the whole last level, `+` only as a whole level.
///
/// `$share/...` is *not* interpreted here — use [`parse_subscription`] for what a SUBSCRIBE
/// carries. (`$share/g/f` happens to be a syntactically valid plain filter too.)
pub fn validate_topic_filter(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::EmptyTopicFilter);
    }
    if s.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TopicFilterTooLong(s.len()));
    }
    if s.as_bytes().contains(&0) {
        return Err(TopicError::NullInTopicFilter);
    }
    let mut levels = s.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(TopicError::MisplacedMultiLevelWildcard);
        }
        if level.contains('+') && level != "+" {
            return Err(TopicError::MisplacedSingleLevelWildcard);
        }
    }
    Ok(())
}

/// Whether a subscription string is a shared subscription (starts with `$share/`).
/// It may still be an invalid one; [`parse_subscription`] says.
pub fn is_shared(s: &str) -> bool {
    s.starts_with(SHARE_PREFIX)
}

/// Whether a (valid) topic filter contains a wildcard level.
pub fn has_wildcards(filter: &str) -> bool {
    filter.bytes().any(|b| b == b'+' || b == b'#')
}

/// A parsed `$share/<group>/<filter>` subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SharedFilter<'a> {
    pub group: &'a str,
    pub filter: &'a str,
}

impl<'a> SharedFilter<'a> {
    /// `Ok(Some(_))` for a valid shared subscription, `Ok(None)` for a valid plain filter.
    pub fn parse(s: &'a str) -> Result<Option<SharedFilter<'a>>, TopicError> {
        let (group, filter) = parse_subscription(s)?;
        Ok(group.map(|group| SharedFilter { group, filter }))
    }
}

/// Validates what a SUBSCRIBE / UNSUBSCRIBE carries and splits off a shared subscription's
/// group: `"$share/g/a/+"` → `(Some("g"), "a/+")`, `"a/+"` → `(None, "a/+")` (§4.8.2).
///
/// A shared subscription needs a non-empty share name without `/`, `+` or `#`, followed by
/// `/` and a valid non-empty topic filter.
pub fn parse_subscription(s: &str) -> Result<(Option<&str>, &str), TopicError> {
    let Some(rest) = s.strip_prefix(SHARE_PREFIX) else {
        validate_topic_filter(s)?;
        return Ok((None, s));
    };
    if s.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TopicFilterTooLong(s.len()));
    }
    if s.as_bytes().contains(&0) {
        return Err(TopicError::NullInTopicFilter);
    }
    let (group, filter) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    if group.is_empty() {
        return Err(TopicError::EmptyShareName);
    }
    if group.contains(['+', '#']) {
        return Err(TopicError::InvalidShareName);
    }
    if filter.is_empty() {
        return Err(TopicError::MissingSharedFilter);
    }
    validate_topic_filter(filter)?;
    Ok((Some(group), filter))
}

/// The reference matcher: whether topic name `topic` matches topic filter `filter`.
///
/// `#` matches its parent level and any number of levels below (`sport/#` matches `sport`);
/// `+` matches exactly one level, possibly empty. A filter whose first level is a wildcard
/// does not match a topic whose first level starts with `$` (§4.7.2). Both arguments are
/// assumed valid (no `$share/` prefix on the filter); for invalid input the answer is
/// unspecified but the function never panics.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') {
        let first = filter.split('/').next().unwrap_or("");
        if first == "+" || first == "#" {
            return false;
        }
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        assert!(validate_topic_name("a").is_ok());
        assert!(validate_topic_name("/").is_ok());
        assert!(validate_topic_name("a//b").is_ok());
        assert!(validate_topic_name("$SYS/broker/load").is_ok());
        assert!(validate_topic_name(" ").is_ok());
        assert_eq!(validate_topic_name(""), Err(TopicError::EmptyTopicName));
        assert_eq!(
            validate_topic_name("a/+/b"),
            Err(TopicError::WildcardInTopicName)
        );
        assert_eq!(
            validate_topic_name("a/#"),
            Err(TopicError::WildcardInTopicName)
        );
        assert_eq!(
            validate_topic_name("sport+"),
            Err(TopicError::WildcardInTopicName)
        );
        assert_eq!(
            validate_topic_name("a\0b"),
            Err(TopicError::NullInTopicName)
        );
        let long = "a".repeat(MAX_TOPIC_LEN);
        assert!(validate_topic_name(&long).is_ok());
        let too_long = "a".repeat(MAX_TOPIC_LEN + 1);
        assert_eq!(
            validate_topic_name(&too_long),
            Err(TopicError::TopicNameTooLong(MAX_TOPIC_LEN + 1))
        );
    }

    #[test]
    fn topic_filters_spec_examples() {
        // §4.7.1.2
        assert!(validate_topic_filter("sport/tennis/player1/#").is_ok());
        assert!(validate_topic_filter("sport/#").is_ok());
        assert!(validate_topic_filter("#").is_ok());
        assert!(validate_topic_filter("sport/tennis/#").is_ok());
        assert_eq!(
            validate_topic_filter("sport/tennis#"),
            Err(TopicError::MisplacedMultiLevelWildcard)
        );
        assert_eq!(
            validate_topic_filter("sport/tennis/#/ranking"),
            Err(TopicError::MisplacedMultiLevelWildcard)
        );
        // §4.7.1.3
        assert!(validate_topic_filter("+").is_ok());
        assert!(validate_topic_filter("+/tennis/#").is_ok());
        assert!(validate_topic_filter("sport/+/player1").is_ok());
        assert!(validate_topic_filter("+/+").is_ok());
        assert!(validate_topic_filter("/+").is_ok());
        assert_eq!(
            validate_topic_filter("sport+"),
            Err(TopicError::MisplacedSingleLevelWildcard)
        );
        assert_eq!(
            validate_topic_filter("sport/+x/a"),
            Err(TopicError::MisplacedSingleLevelWildcard)
        );
        assert_eq!(
            validate_topic_filter("##"),
            Err(TopicError::MisplacedMultiLevelWildcard)
        );
        assert_eq!(
            validate_topic_filter("#/"),
            Err(TopicError::MisplacedMultiLevelWildcard)
        );
        assert!(validate_topic_filter("a//b").is_ok());
        assert!(validate_topic_filter("/").is_ok());
        assert!(validate_topic_filter("//#").is_ok());
        assert!(validate_topic_filter("$SYS/#").is_ok());
        assert_eq!(validate_topic_filter(""), Err(TopicError::EmptyTopicFilter));
        assert_eq!(
            validate_topic_filter("a/\0"),
            Err(TopicError::NullInTopicFilter)
        );
        let too_long = "a".repeat(MAX_TOPIC_LEN + 1);
        assert_eq!(
            validate_topic_filter(&too_long),
            Err(TopicError::TopicFilterTooLong(MAX_TOPIC_LEN + 1))
        );
    }

    #[test]
    fn reason_codes() {
        assert_eq!(
            validate_topic_name("").unwrap_err().reason_code(),
            ReasonCode::TOPIC_NAME_INVALID
        );
        assert_eq!(
            validate_topic_name("a/+").unwrap_err().reason_code(),
            ReasonCode::TOPIC_NAME_INVALID
        );
        assert_eq!(
            validate_topic_filter("").unwrap_err().reason_code(),
            ReasonCode::TOPIC_FILTER_INVALID
        );
        assert_eq!(
            validate_topic_filter("a#").unwrap_err().reason_code(),
            ReasonCode::TOPIC_FILTER_INVALID
        );
        assert_eq!(
            parse_subscription("$share//a").unwrap_err().reason_code(),
            ReasonCode::TOPIC_FILTER_INVALID
        );
    }

    #[test]
    fn ill_formed_filters_and_refusable_shared_subscriptions() {
        for f in ["#/a", "a/b#", "a+/b", "", "$share/g/a#", "$share/g/+x"] {
            let e = parse_subscription(f).unwrap_err();
            assert!(e.is_ill_formed_filter(), "{f:?}: {e}");
        }
        for f in ["$share//t", "$share/g", "$share/g+/t", "$share/g/"] {
            let e = parse_subscription(f).unwrap_err();
            assert!(!e.is_ill_formed_filter(), "{f:?}: {e}");
        }
    }

    #[test]
    fn shared_subscriptions() {
        assert_eq!(parse_subscription("a/b"), Ok((None, "a/b")));
        assert_eq!(parse_subscription("$share/g/a/b"), Ok((Some("g"), "a/b")));
        assert_eq!(parse_subscription("$share/g/#"), Ok((Some("g"), "#")));
        assert_eq!(parse_subscription("$share/g/+/x"), Ok((Some("g"), "+/x")));
        assert_eq!(parse_subscription("$share/g//"), Ok((Some("g"), "/")));
        assert_eq!(
            parse_subscription("$share/consumer1/sport/tennis/+"),
            Ok((Some("consumer1"), "sport/tennis/+"))
        );
        assert_eq!(
            parse_subscription("$share/g/$SYS/#"),
            Ok((Some("g"), "$SYS/#"))
        );
        assert_eq!(
            parse_subscription("$share//a"),
            Err(TopicError::EmptyShareName)
        );
        assert_eq!(
            parse_subscription("$share/"),
            Err(TopicError::EmptyShareName)
        );
        assert_eq!(
            parse_subscription("$share/g"),
            Err(TopicError::MissingSharedFilter)
        );
        assert_eq!(
            parse_subscription("$share/g/"),
            Err(TopicError::MissingSharedFilter)
        );
        assert_eq!(
            parse_subscription("$share/g+/a"),
            Err(TopicError::InvalidShareName)
        );
        assert_eq!(
            parse_subscription("$share/#/a"),
            Err(TopicError::InvalidShareName)
        );
        assert_eq!(
            parse_subscription("$share/g/a#"),
            Err(TopicError::MisplacedMultiLevelWildcard)
        );
        assert_eq!(
            parse_subscription("$share/g/a\0"),
            Err(TopicError::NullInTopicFilter)
        );
        // Not shared: "$share" without the slash, "$shared/...".
        assert_eq!(parse_subscription("$share"), Ok((None, "$share")));
        assert_eq!(parse_subscription("$shared/g/a"), Ok((None, "$shared/g/a")));
        assert!(is_shared("$share/g/a"));
        assert!(is_shared("$share/"));
        assert!(!is_shared("$share"));
        assert!(!is_shared("a/$share/g"));
        assert_eq!(
            SharedFilter::parse("$share/g/a"),
            Ok(Some(SharedFilter {
                group: "g",
                filter: "a"
            }))
        );
        assert_eq!(SharedFilter::parse("a"), Ok(None));
        assert!(SharedFilter::parse("$share/g").is_err());
    }

    #[test]
    fn matching_spec_examples() {
        // §4.7.1.2 multi-level wildcard
        let f = "sport/tennis/player1/#";
        assert!(filter_matches(f, "sport/tennis/player1"));
        assert!(filter_matches(f, "sport/tennis/player1/ranking"));
        assert!(filter_matches(f, "sport/tennis/player1/score/wimbledon"));
        assert!(!filter_matches(f, "sport/tennis/player2"));
        assert!(!filter_matches(f, "sport/tennis"));
        assert!(filter_matches("sport/#", "sport"));
        assert!(filter_matches("#", "sport/tennis"));
        assert!(filter_matches("#", "/"));
        // §4.7.1.3 single-level wildcard
        assert!(filter_matches("sport/tennis/+", "sport/tennis/player1"));
        assert!(filter_matches("sport/tennis/+", "sport/tennis/player2"));
        assert!(!filter_matches(
            "sport/tennis/+",
            "sport/tennis/player1/ranking"
        ));
        assert!(!filter_matches("sport/+", "sport"));
        assert!(filter_matches("sport/+", "sport/"));
        assert!(filter_matches("+/+", "/finance"));
        assert!(filter_matches("/+", "/finance"));
        assert!(!filter_matches("+", "/finance"));
        assert!(filter_matches("+/tennis/#", "sport/tennis/x"));
        assert!(filter_matches("sport/+/player1", "sport/tennis/player1"));
        // §4.7.2 topics beginning with $
        assert!(!filter_matches("#", "$SYS/broker/clients"));
        assert!(!filter_matches("#", "$SYS"));
        assert!(!filter_matches("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(filter_matches("$SYS/#", "$SYS/monitor/Clients"));
        assert!(filter_matches("$SYS/#", "$SYS"));
        assert!(filter_matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
        assert!(!filter_matches("+", "$SYS"));
        // '$' only matters at the start of the topic
        assert!(filter_matches("a/+", "a/$b"));
        assert!(filter_matches("a/#", "a/$b/c"));
        assert!(filter_matches("+/$b", "a/$b"));
    }

    #[test]
    fn matching_empty_levels_and_literals() {
        assert!(filter_matches("a//b", "a//b"));
        assert!(filter_matches("a/+/b", "a//b"));
        assert!(!filter_matches("a/b", "a//b"));
        assert!(filter_matches("a/#", "a//b"));
        assert!(filter_matches("/", "/"));
        assert!(filter_matches("+/+", "/"));
        assert!(!filter_matches("+", "/"));
        assert!(filter_matches("/#", "/"));
        assert!(filter_matches("/#", "/a/b"));
        assert!(!filter_matches("/#", "a"));
        assert!(filter_matches("a/b/", "a/b/"));
        assert!(!filter_matches("a/b/", "a/b"));
        assert!(!filter_matches("a/b", "a/b/"));
        assert!(filter_matches("a/b/#", "a/b/"));
        assert!(!filter_matches("a/b", "a/bc"));
        assert!(!filter_matches("a/bc", "a/b"));
        assert!(!filter_matches("A", "a"));
        assert!(filter_matches("a/+/+", "a//"));
    }

    #[test]
    fn wildcards_helper() {
        assert!(has_wildcards("a/+"));
        assert!(has_wildcards("#"));
        assert!(!has_wildcards("a/b"));
    }
}

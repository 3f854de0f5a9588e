//! Matching a rule's pattern: `%u`/`%c` filled in without letting a value widen the rule,
//! then MQTT topic matching for a topic name and "covers the whole filter" for a SUBSCRIBE.

use std::borrow::Cow;

use super::rules::Level;
use super::Who;

/// A pattern level after `%u`/`%c` substitution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Pat<'a> {
    One,
    Rest,
    Text(Cow<'a, str>),
}

/// Fills in `%u` and `%c`. `None` when the rule cannot apply: a placeholder without a value
/// (anonymous client) or with one that is empty or holds `+`, `#` or `/`. Such a value is
/// refused rather than escaped: it would otherwise turn a literal level into a wildcard or
/// into several levels, and so reach topics of other users.
pub(super) fn substitute<'a>(pattern: &'a [Level], who: &Who) -> Option<Vec<Pat<'a>>> {
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
pub(super) fn matches_name(pattern: &[Pat], levels: &[&str]) -> bool {
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
pub(super) fn covers(pattern: &[Pat], filter: &[&str]) -> bool {
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

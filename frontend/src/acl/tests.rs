//! Unit tests of the rules, the pattern matching and the views (reload included).

use std::path::Path;
use std::sync::Arc;

use tiermq_common::topic;

use crate::reload::FileStamp;

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

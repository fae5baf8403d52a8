//! The fuzz targets' shared oracle: how a fuzz input becomes annotations or a CNI call, and the
//! invariants every outcome must meet — not just "no crash".
//!
//! - An accepted configuration yields a `Redirect` whose rendered transaction, in each family (the
//!   IPv6 pass included even where it is off, since Kuma turns it on later), passes the allow-list
//!   of `tproxy_cni::core::rules::shape`: known tables, chains, options and targets, and only canonical
//!   numbers and addresses of that family. Text from the input can reach a rule only as a value
//!   re-printed from its parsed form. The transaction starts with nat (where a repeated ADD
//!   fails first), stays within the rule budget, and renders the same twice.
//! - A refused one is our typed error, whose message is one line of bounded length.
//!
//! Inputs made of several strings (annotations, environment variables) are NUL-separated
//! `key=value` records, so a seed corpus stays readable and mutations stay cheap.

use tproxy_cni::core::limits::MAX_RULES_PER_FAMILY;
use tproxy_cni::core::mesh::{AnnotationError, Annotations};
use tproxy_cni::core::redirect::{Family, Redirect};
use tproxy_cni::core::rules::{self, shape};

/// The longest message a refusal may carry. Values are quoted shortened (64 characters); a message
/// longer than this echoes input it should not.
pub const MAX_MESSAGE_BYTES: usize = 512;

/// Splits `data` into NUL-separated `key=value` records (a record without `=` has an empty value).
pub fn records(data: &[u8]) -> Vec<(String, String)> {
    data.split(|b| *b == 0)
        .filter(|r| !r.is_empty())
        .map(|r| {
            let r = String::from_utf8_lossy(r);
            match r.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => (r.into_owned(), String::new()),
            }
        })
        .collect()
}

/// Annotations from records, with `defaults` set first (a record may override them).
pub fn annotations(data: &[u8], defaults: &[(&str, &str)]) -> Annotations {
    let mut a: Annotations = defaults.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    a.extend(records(data));
    a
}

/// Checks what a dialect answered.
pub fn check_outcome(outcome: &Result<Option<Redirect>, AnnotationError>) {
    match outcome {
        Ok(Some(r)) => check_redirect(r),
        Ok(None) => {}
        Err(e) => check_message(&e.to_string()),
    }
}

/// The invariants of an accepted redirect (see the module documentation).
pub fn check_redirect(redirect: &Redirect) {
    for r in [redirect.clone(), redirect.clone().with_ipv6()] {
        let sets = rules::build(&r);
        let families: Vec<Family> = sets.iter().map(|s| s.family).collect();
        assert_eq!(families, r.families().iter().collect::<Vec<_>>(), "one rule set per family, IPv4 first");
        for (set, again) in sets.iter().zip(rules::build(&r)) {
            let text = rules::render_fresh(set);
            let summary = shape::check(&text, set.family)
                .unwrap_or_else(|e| panic!("rendered rules outside the allow-list: {e}\n{text}"));
            assert_eq!(summary.tables.first().map(String::as_str), Some("nat"), "nat first:\n{text}");
            assert!(summary.rules <= MAX_RULES_PER_FAMILY, "{} rules exceed the budget", summary.rules);
            assert_eq!(text, rules::render_fresh(&again), "rendering is deterministic");
        }
    }
}

/// A refusal's message: one line, not empty, of bounded length.
pub fn check_message(msg: &str) {
    assert!(!msg.is_empty(), "an empty message");
    assert!(!msg.contains(['\n', '\r']), "a message of more than one line: {msg:?}");
    assert!(
        msg.len() <= MAX_MESSAGE_BYTES,
        "a message of {} bytes: {:?}…",
        msg.len(),
        &msg[..msg.floor_char_boundary(200)]
    );
}

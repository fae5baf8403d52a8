//! CHECK's comparison: what the kernel holds in our tables against what ADD would install, as
//! one line per difference, each naming the element in `nft` words (`missing set ip tproxy-cni
//! consul_proxy_output_daddr`, `unexpected in ip tproxy-cni CONSUL_PROXY_OUTPUT: ip daddr
//! 192.0.2.1 return comment "x"`).

use std::collections::BTreeSet;

use super::decode::SeenRule;
use super::{Seen, SeenTable};
use crate::core::nft::render::{self, interval};
use crate::core::nft::{BaseHook, NftTable, Ruleset, TABLE, nft_family};
use crate::core::redirect::Family;

/// Every way `seen` differs from `want`.
pub fn diff(want: &Ruleset, seen: &Seen) -> Vec<String> {
    let mut diffs = Vec::new();
    for family in Family::ALL {
        let at = format!("{} {TABLE}", nft_family(family));
        let w = want.tables.iter().find(|t| t.family == family);
        let s = seen.tables.iter().find(|t| t.family == family);
        match (w, s) {
            (None, None) => {}
            (Some(_), None) => diffs.push(format!("missing table {at}")),
            (None, Some(_)) => diffs.push(format!("unexpected table {at}")),
            (Some(w), Some(s)) => table(&at, w, s, &mut diffs),
        }
    }
    diffs
}

fn table(at: &str, w: &NftTable, s: &SeenTable, diffs: &mut Vec<String>) {
    for ws in &w.sets {
        let Some((ss, elements)) = s.sets.iter().find(|(ss, _)| ss.name == ws.name) else {
            diffs.push(format!("missing set {at} {}", ws.name));
            continue;
        };
        if ss.key != Some(ws.key) {
            diffs.push(format!("set {at} {} is not an interval set of type {}", ws.name, ws.key.name()));
            continue;
        }
        let missing: Vec<String> =
            ws.intervals.iter().filter(|i| !elements.contains(i)).map(|i| interval(ws.key, *i)).collect();
        let extra: Vec<String> =
            elements.iter().filter(|i| !ws.intervals.contains(i)).map(|i| interval(ws.key, *i)).collect();
        if !missing.is_empty() {
            diffs.push(format!("missing in set {at} {}: {}", ws.name, missing.join(", ")));
        }
        if !extra.is_empty() {
            diffs.push(format!("unexpected in set {at} {}: {}", ws.name, extra.join(", ")));
        }
    }
    for (ss, _) in &s.sets {
        if !w.sets.iter().any(|ws| ws.name == ss.name) {
            diffs.push(format!("unexpected set {at} {}", ss.name));
        }
    }
    for wc in &w.chains {
        match s.chains.iter().find(|c| c.name == wc.name) {
            None => diffs.push(format!("missing chain {at} {}", wc.name)),
            Some(sc) => {
                let seen_hook = sc.hook.clone().map(|h| h.map_err(|e| e.to_string()));
                if seen_hook != wc.hook.map(Ok) {
                    diffs.push(format!(
                        "chain {at} {} is {} instead of {}",
                        wc.name,
                        describe_seen(&seen_hook),
                        describe(wc.hook)
                    ));
                }
            }
        }
    }
    for sc in &s.chains {
        if w.chain(&sc.name).is_none() {
            diffs.push(format!("unexpected chain {at} {}", sc.name));
        }
    }
    let mut chains: BTreeSet<&str> = w.chains.iter().map(|c| c.name.as_str()).collect();
    chains.extend(s.rules.iter().map(|(c, _)| c.as_str()));
    for chain in chains {
        let expected: Vec<String> =
            w.chain(chain).map(|c| c.rules.iter().map(|r| render::rule(r, w.family)).collect()).unwrap_or_default();
        let actual: Vec<String> =
            s.rules.iter().filter(|(c, _)| c == chain).map(|(_, r)| seen_rule(r, w.family)).collect();
        if expected == actual {
            continue;
        }
        let missing: Vec<&String> = expected.iter().filter(|r| !actual.contains(r)).collect();
        let extra: Vec<&String> = actual.iter().filter(|r| !expected.contains(r)).collect();
        for r in &missing {
            diffs.push(format!("missing in {at} {chain}: {r}"));
        }
        for r in &extra {
            diffs.push(format!("unexpected in {at} {chain}: {r}"));
        }
        if missing.is_empty() && extra.is_empty() {
            diffs.push(format!("rules out of order or duplicated in {at} {chain}"));
        }
    }
}

fn seen_rule(r: &SeenRule, family: Family) -> String {
    match r {
        SeenRule::Ours(r) => render::rule(r, family),
        SeenRule::Foreign(names) => format!("a rule tproxy-cni does not write (expressions: {})", names.join(", ")),
    }
}

fn describe(h: Option<BaseHook>) -> String {
    match h {
        None => "a regular chain".to_owned(),
        Some(h) => format!("type {} hook {} priority {}", h.kind.name(), h.hook.name(), h.priority),
    }
}

fn describe_seen(h: &Option<Result<BaseHook, String>>) -> String {
    match h {
        None => describe(None),
        Some(Ok(h)) => describe(Some(*h)),
        Some(Err(text)) => text.clone(),
    }
}

//! 64 pods ADDed at once, on each engine (iptables with iptables-nft, iptables with
//! iptables-legacy, nftables), Consul and Kuma mixed, each with a configuration of its
//! own: every call succeeds with no lock error, and every namespace holds exactly its own pod's
//! rules (no cross-talk between namespaces); then all are ADDed again at once (still one copy
//! each) and DELed at once (nothing of ours left, canaries intact).
//!
//! "Its own rules" is, for the iptables engine, what the pure rule builder gives
//! (`harden::expected`) read back from `iptables-save`; for the nftables engine, the namespace's
//! `tproxy-cni` tables equal what `nft -f` makes of `tproxy-cni render --backend nftables` for the
//! pod's annotations (`support::nft_reference`), and the iptables canary is intact byte for byte.

use std::collections::HashMap;
use std::time::Instant;

use crate::support::harden::*;
use crate::support::*;
use serde_json::{Value, json};

const PODS: usize = 64;

/// Pod `i`'s own configuration: its ports and excluded network carry its number.
fn config(i: usize) -> (Value, bool) {
    let v6 = i.is_multiple_of(3);
    let annotations = if i.is_multiple_of(2) {
        consul_pod(
            json!({"ProxyUserID": "5995", "ProxyInboundPort": 20000 + i, "ProxyOutboundPort": 15001,
                "ConsulDNSPort": if i.is_multiple_of(4) { 8600 } else { 0 }, "ExcludeOutboundCIDRs": [format!("10.{i}.0.0/16"), format!("fd00:{i:x}::/32")],
                "ExcludeUIDs": [format!("{}", 7000 + i)]}),
            &[],
        )
    } else {
        let dns = if i % 4 == 1 { "  dns: {enabled: true, captureAll: true}\n" } else { "" };
        kuma_pod(
            Some(&format!(
                "cniMode: true\nkumaDPUser: {}\nredirect:\n  inbound: {{port: {}, excludePortsForIPs: [\"10.{i}.0.0/16\"]}}\n{dns}\
                 dropInvalidPackets: {}\n",
                6000 + i,
                16000 + i,
                i % 8 == 1
            )),
            &[],
        )
    };
    (annotations, v6)
}

fn wave(command: &str, engine: Engine, namespaces: &[Netns]) -> Vec<std::process::Output> {
    let start = Instant::now();
    let children: Vec<_> = namespaces
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let (annotations, v6) = config(i);
            spawn_plugin(
                command,
                ns.path().to_str().unwrap(),
                &format!("p{i}"),
                &stdin_with(engine.conf(), &annotations, &prev_result(v6)),
            )
        })
        .collect();
    let outs: Vec<_> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    eprintln!("{engine:?}: {PODS} concurrent {command}s in {:.2} s", start.elapsed().as_secs_f64());
    outs
}

fn assert_clean_outputs(what: &str, engine: Engine, outs: &[std::process::Output]) {
    for (i, out) in outs.iter().enumerate() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{engine:?} pod {i}: {what} failed: {}{stderr}",
            String::from_utf8_lossy(&out.stdout)
        );
        for sign in ["lock", "Resource temporarily unavailable", "Another app"] {
            assert!(!stderr.contains(sign), "{engine:?} pod {i}: {what}: {stderr}");
        }
    }
}

/// What pod `i`'s namespace must hold of ours after ADD, as the engine lists it.
enum Reference {
    Iptables(std::collections::BTreeMap<Fam, Ours>),
    Nftables(String),
}

/// Each pod's reference, each distinct configuration's computed once.
fn references(engine: Engine) -> Vec<Reference> {
    let mut nft: HashMap<String, String> = HashMap::new();
    (0..PODS)
        .map(|i| {
            let (annotations, v6) = config(i);
            match engine {
                Engine::Iptables(_) => Reference::Iptables(expected(&annotations, v6)),
                Engine::Nftables => Reference::Nftables(
                    nft.entry(format!("{annotations} {v6}")).or_insert_with(|| nft_reference(&annotations, v6)).clone(),
                ),
            }
        })
        .collect()
}

/// Asserts that pod `i`'s namespace holds exactly `reference` of ours (nothing when `None`), ::6
/// on lo for a dual-stack Kuma pod while ADDed, and the canary intact: for the iptables engine its
/// rules among the foreign ones, for the nftables engine the namespace's iptables rulesets byte
/// for byte as before (`before`, [`Netns::snapshot`]).
fn assert_state(engine: Engine, i: usize, ns: &Netns, reference: Option<&Reference>, canary: &[String], before: &str) {
    let kuma_v6 = reference.is_some() && i % 2 == 1 && config(i).1;
    assert_eq!(ns.passthrough_v6(), usize::from(kuma_v6), "{engine:?} pod {i}: ::6");
    match engine {
        Engine::Iptables(backend) => {
            let (ours, foreign) = state(ns, backend);
            match reference {
                Some(Reference::Iptables(want)) => assert_eq!(&ours, want, "{engine:?} pod {i}: not its own rules"),
                _ => assert!(ours.values().all(Ours::is_empty), "{engine:?} pod {i}: DEL left rules"),
            }
            assert!(foreign.values().all(|f| *f == canary), "{engine:?} pod {i}: canary");
        }
        Engine::Nftables => {
            let tables = nft_tables(ns);
            match reference {
                Some(Reference::Nftables(want)) => assert_eq!(&tables, want, "{engine:?} pod {i}: not its own tables"),
                _ => assert_eq!(tables, "", "{engine:?} pod {i}: DEL left a table"),
            }
            assert_eq!(ns.snapshot(), before, "{engine:?} pod {i}: canary (iptables rulesets)");
        }
    }
}

fn sixty_four_pods_at_once_each_get_exactly_their_own_rules(engine: Engine) {
    if !privileged() {
        return;
    }
    let _load = busy();
    let mut canary = canary_rules();
    canary.sort();
    // The canary lives in iptables' tables; the nftables engine's namespaces get iptables-nft's.
    let canary_backend = match engine {
        Engine::Iptables(backend) => backend,
        Engine::Nftables => "nft",
    };
    let references = references(engine);
    let namespaces: Vec<Netns> = (0..PODS).map(|_| Netns::new("tpc")).collect();
    let before: Vec<String> = namespaces
        .iter()
        .map(|ns| {
            plant_canary(ns, canary_backend);
            ns.snapshot()
        })
        .collect();
    for command in ["ADD", "ADD"] {
        let outs = wave(command, engine, &namespaces);
        assert_clean_outputs(command, engine, &outs);
        for (i, ns) in namespaces.iter().enumerate() {
            assert_state(engine, i, ns, Some(&references[i]), &canary, &before[i]);
        }
    }
    let outs = wave("DEL", engine, &namespaces);
    assert_clean_outputs("DEL", engine, &outs);
    for (i, ns) in namespaces.iter().enumerate() {
        assert_state(engine, i, ns, None, &canary, &before[i]);
    }
}

/// One test per engine: `iptables_nft`, `iptables_legacy` and `nftables`.
mod sixty_four_pods_at_once_each_get_exactly_their_own_rules {
    use crate::support::Engine;

    #[test]
    fn iptables_nft() {
        super::sixty_four_pods_at_once_each_get_exactly_their_own_rules(Engine::Iptables("nft"))
    }

    #[test]
    fn iptables_legacy() {
        super::sixty_four_pods_at_once_each_get_exactly_their_own_rules(Engine::Iptables("legacy"))
    }

    #[test]
    fn nftables() {
        super::sixty_four_pods_at_once_each_get_exactly_their_own_rules(Engine::Nftables)
    }
}

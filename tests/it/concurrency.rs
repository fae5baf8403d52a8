//! 64 pods ADDed at once, on each backend, Consul and Kuma mixed, each with a configuration of its
//! own: every call succeeds with no lock error, and every namespace holds exactly its own pod's
//! rules (no cross-talk between namespaces); then all are ADDed again at once (still one copy
//! each) and DELed at once (nothing of ours left, canaries intact).

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

fn wave(command: &str, backend: &str, namespaces: &[Netns]) -> Vec<std::process::Output> {
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
                &stdin(backend, &annotations, &prev_result(v6)),
            )
        })
        .collect();
    let outs: Vec<_> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    eprintln!("{backend}: {PODS} concurrent {command}s in {:.2} s", start.elapsed().as_secs_f64());
    outs
}

fn assert_clean_outputs(what: &str, backend: &str, outs: &[std::process::Output]) {
    for (i, out) in outs.iter().enumerate() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{backend} pod {i}: {what} failed: {}{stderr}",
            String::from_utf8_lossy(&out.stdout)
        );
        for sign in ["lock", "Resource temporarily unavailable", "Another app"] {
            assert!(!stderr.contains(sign), "{backend} pod {i}: {what}: {stderr}");
        }
    }
}

#[test]
fn sixty_four_pods_at_once_each_get_exactly_their_own_rules() {
    if !privileged() {
        return;
    }
    let _load = busy();
    let mut canary = canary_rules();
    canary.sort();
    for backend in BACKENDS {
        let namespaces: Vec<Netns> = (0..PODS).map(|_| Netns::new("tpc")).collect();
        for ns in &namespaces {
            plant_canary(ns, backend);
        }
        for command in ["ADD", "ADD"] {
            let outs = wave(command, backend, &namespaces);
            assert_clean_outputs(command, backend, &outs);
            for (i, ns) in namespaces.iter().enumerate() {
                let (annotations, v6) = config(i);
                let (ours, foreign) = state(ns, backend);
                assert_eq!(ours, expected(&annotations, v6), "{backend} pod {i}: not its own rules");
                let kuma_v6 = i % 2 == 1 && v6;
                assert_eq!(ns.passthrough_v6(), usize::from(kuma_v6), "{backend} pod {i}: ::6");
                assert!(foreign.values().all(|f| *f == canary), "{backend} pod {i}: canary");
            }
        }
        let outs = wave("DEL", backend, &namespaces);
        assert_clean_outputs("DEL", backend, &outs);
        for (i, ns) in namespaces.iter().enumerate() {
            let (ours, foreign) = state(ns, backend);
            assert!(ours.values().all(Ours::is_empty), "{backend} pod {i}: DEL left rules");
            assert_eq!(ns.passthrough_v6(), 0, "{backend} pod {i}: DEL left ::6");
            assert!(foreign.values().all(|f| *f == canary), "{backend} pod {i}: canary");
        }
    }
}

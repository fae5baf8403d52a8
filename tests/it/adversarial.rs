//! An adversarial annotation corpus, for Consul and Kuma: newlines, option text (`-A`, `-j`), shell
//! metacharacters, look-alike unicode, huge lists, duplicate keys, ports 0 and 65536, CIDRs of the
//! wrong family, negative UIDs. Each input gets a clear refusal (code 100, one line, the annotation
//! named, nothing changed in the namespace) or a documented normalisation (`docs/reliability.md`),
//! and every accepted one renders only rules of the allowed shapes.
//!
//! Also the regression tests of bugs that fuzzing and this corpus found, each named after what it pins.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use std::process::Output;

use crate::both_engines;
use crate::support::*;
use serde_json::{Value, json};
use tproxy_cni::core::limits::{MAX_ANNOTATION_BYTES, MAX_LIST_ENTRIES, MAX_RULES_PER_FAMILY};
use tproxy_cni::core::mesh::{self, AnnotationError, Annotations, PodNetwork};
use tproxy_cni::core::redirect::{Family, Redirect};
use tproxy_cni::core::rules::{self, shape};

/// What a case must give.
enum Want {
    /// Refused; the message names `annotation` and contains `text`.
    Refused { annotation: &'static str, text: &'static str },
    /// Accepted; the rendered rules of the given family contain `present` and none of `absent`.
    Accepted { family: Family, present: &'static [&'static str], absent: &'static [&'static str] },
}

struct Case {
    name: &'static str,
    annotations: Value,
    ipv6: bool,
    want: Want,
}

const CONSUL_CONFIG: &str = "consul.hashicorp.com/redirect-traffic-config";
const CONSUL_IN: &str = "consul.hashicorp.com/transparent-proxy-exclude-inbound-ports";
const CONSUL_OUT: &str = "consul.hashicorp.com/transparent-proxy-exclude-outbound-ports";
const CONSUL_CIDRS: &str = "consul.hashicorp.com/transparent-proxy-exclude-outbound-cidrs";
const CONSUL_UIDS: &str = "consul.hashicorp.com/transparent-proxy-exclude-uids";
const KUMA_YAML: &str = "traffic.kuma.io/transparent-proxy-config";
const KUMA_OUT_PORTS: &str = "traffic.kuma.io/exclude-outbound-ports";
const KUMA_OUT_IPS: &str = "traffic.kuma.io/exclude-outbound-ips";
const KUMA_IN_IPS: &str = "traffic.kuma.io/exclude-inbound-ips";
const KUMA_UID: &str = "kuma.io/sidecar-uid";
const KUMA_PER_UID: &str = "traffic.kuma.io/exclude-outbound-ports-for-uids";
const KUMA_IN_PORT: &str = "kuma.io/transparent-proxying-inbound-port";
const KUMA_PROBE: &str = "kuma.io/application-probe-proxy-port";
const KUMA_FAMILY: &str = "kuma.io/transparent-proxying-ip-family-mode";

/// A Consul pod whose JSON config is the typical one with `patch` merged in.
fn consul_json(patch: Value) -> Value {
    let mut c = json!({"ConsulDNSIP": "127.0.0.1", "ConsulDNSPort": 8600, "ProxyUserID": "5995",
        "ProxyInboundPort": 20000, "ProxyOutboundPort": 15001, "ExcludeUIDs": ["5996"]});
    for (k, v) in patch.as_object().unwrap() {
        c[k] = v.clone();
    }
    consul_pod(c, &[])
}

/// A Consul pod with a raw JSON text as its config.
fn consul_raw(json: &str) -> Value {
    let mut a = consul_pod(json!({}), &[]);
    a[CONSUL_CONFIG] = Value::from(json);
    a
}

/// A Consul pod without the JSON (individual annotations only).
fn consul_individual(pairs: &[(&str, &str)]) -> Value {
    let mut a = consul_pod(json!({}), pairs);
    a.as_object_mut().unwrap().remove(CONSUL_CONFIG);
    a
}

fn kuma_yaml(y: &str) -> Value {
    kuma_pod(Some(y), &[])
}

fn kuma_legacy(pairs: &[(&str, &str)]) -> Value {
    kuma_pod(None, pairs)
}

/// `n` comma-separated ports.
fn port_list(n: usize) -> String {
    (0..n).map(|i| (1 + i % 65535).to_string()).collect::<Vec<_>>().join(",")
}

fn refused(annotation: &'static str, text: &'static str) -> Want {
    Want::Refused { annotation, text }
}

fn cases() -> Vec<Case> {
    let c = |name, annotations, want| Case { name, annotations, ipv6: false, want };
    let c6 = |name, annotations, want| Case { name, annotations, ipv6: true, want };
    let huge = port_list(100_000);
    let just_too_many = port_list(MAX_LIST_ENTRIES + 1);
    let yaml_huge = format!("redirect:\n  outbound:\n    excludePorts: [{huge}]\n");
    let yaml_too_many = format!("redirect:\n  outbound:\n    excludePorts: [{just_too_many}]\n");
    let full = MAX_LIST_ENTRIES;
    let full_cidrs: Vec<String> = (0..full).map(|i| format!("10.{}.{}.0/24", i / 256, i % 256)).collect();
    let full_ports: Vec<String> = (1..=full).map(|p| p.to_string()).collect();
    let uid_entries = |n: usize| (0..n).map(|i| format!("tcp:80:{i}")).collect::<Vec<_>>().join(";");
    vec![
        // ---- newlines
        c(
            "consul: newline and a rule in a port",
            consul_json(json!({"ExcludeInboundPorts": ["22\n-A OUTPUT -j ACCEPT"]})),
            refused(CONSUL_CONFIG, r#"ExcludeInboundPorts entry "22\n-A OUTPUT -j ACCEPT" is not a number"#),
        ),
        c(
            "consul: CRLF after a CIDR (individual)",
            consul_individual(&[(CONSUL_CIDRS, "10.0.0.0/8\r\n")]),
            refused(CONSUL_CIDRS, r#""10.0.0.0/8\r\n" is not a CIDR"#),
        ),
        c(
            "kuma: newline in a YAML port string",
            kuma_yaml("redirect:\n  outbound:\n    excludePorts: \"80\\n-A OUTPUT -j ACCEPT\"\n"),
            refused(KUMA_YAML, r#"redirect.outbound.excludePorts entry "80\n-A OUTPUT -j ACCEPT" is not a number"#),
        ),
        c(
            "kuma: newline in a legacy port list",
            kuma_legacy(&[(KUMA_OUT_PORTS, "80\n-A OUTPUT -j ACCEPT")]),
            refused(KUMA_OUT_PORTS, "is not a number"),
        ),
        // ---- option text
        c(
            "consul: -j in a CIDR",
            consul_json(json!({"ExcludeOutboundCIDRs": ["0.0.0.0/0 -j ACCEPT"]})),
            refused(CONSUL_CONFIG, r#""0.0.0.0/0 -j ACCEPT" is not a CIDR"#),
        ),
        c(
            "consul: -A in a UID",
            consul_json(json!({"ExcludeUIDs": ["5996 -A OUTPUT"]})),
            refused(CONSUL_CONFIG, r#"ExcludeUIDs entry "5996 -A OUTPUT" is not a number"#),
        ),
        c(
            "consul: option text in the DNS address",
            consul_json(json!({"ConsulDNSIP": "127.0.0.1 --to-destination 10.0.0.1"})),
            refused(CONSUL_CONFIG, "is not an IP address"),
        ),
        c(
            "kuma: -j in an excluded address",
            kuma_legacy(&[(KUMA_OUT_IPS, "10.0.0.0/8 -j ACCEPT")]),
            refused(KUMA_OUT_IPS, r#""10.0.0.0/8 -j ACCEPT" is not a CIDR"#),
        ),
        c(
            "kuma: option text in kumaDPUser",
            kuma_yaml("kumaDPUser: \"5678 -m owner ! --uid-owner 0\"\n"),
            refused(KUMA_YAML, "is not a number (a numeric UID is required)"),
        ),
        // ---- shell metacharacters
        c(
            "consul: command substitution in a port (individual)",
            consul_individual(&[(CONSUL_OUT, "80,$(reboot)")]),
            refused(CONSUL_OUT, r#""$(reboot)" is not a number"#),
        ),
        c(
            "consul: backticks and a pipe in the proxy UID",
            consul_json(json!({"ProxyUserID": "`id -u`|sh"})),
            refused(CONSUL_CONFIG, "ProxyUserID \"`id -u`|sh\" is not a number"),
        ),
        c(
            "kuma: semicolons and redirection in the sidecar UID",
            kuma_legacy(&[(KUMA_UID, "5678; rm -rf / > /dev/null")]),
            refused(KUMA_UID, "is not a number"),
        ),
        c(
            "kuma: shell text in a per-UID entry",
            kuma_legacy(&[(KUMA_PER_UID, "tcp:80:$(id -u)")]),
            refused(KUMA_PER_UID, "is not a number"),
        ),
        // ---- unicode
        c(
            "consul: fullwidth digits in a port",
            consul_json(json!({"ExcludeOutboundPorts": ["８０"]})),
            refused(CONSUL_CONFIG, r#""８０" is not a number"#),
        ),
        c(
            "consul: a division slash in a CIDR",
            consul_individual(&[(CONSUL_CIDRS, "10.0.0.0\u{2215}8")]),
            refused(CONSUL_CIDRS, "is not a CIDR"),
        ),
        c(
            "kuma: a zero-width space after a port",
            kuma_legacy(&[(KUMA_OUT_PORTS, "80\u{200b}")]),
            refused(KUMA_OUT_PORTS, r#""80\u{200b}" is not a number"#),
        ),
        c(
            "kuma: a dotless i in the IP family mode",
            kuma_legacy(&[(KUMA_FAMILY, "\u{131}pv4")]),
            refused(KUMA_FAMILY, "is not one of dualstack, ipv4"),
        ),
        c(
            "kuma: a right-to-left override in YAML",
            kuma_yaml("ipFamilyMode: \"\u{202e}4vpi\"\n"),
            refused(KUMA_YAML, r#"ipFamilyMode "\u{202e}4vpi" is not one of dualstack, ipv4"#),
        ),
        // ---- huge lists
        c(
            "consul: 10^5 ports in an individual annotation",
            consul_individual(&[(CONSUL_IN, &huge)]),
            refused(CONSUL_IN, "bytes long, more than the limit of 65536 bytes"),
        ),
        c(
            "consul: 10^5 ports in the JSON",
            consul_json(json!({"ExcludeOutboundPorts": huge.split(',').collect::<Vec<_>>()})),
            refused(CONSUL_CONFIG, "more than the limit of 65536 bytes"),
        ),
        c(
            "consul: one entry over the list limit",
            consul_individual(&[(CONSUL_OUT, &just_too_many)]),
            refused(CONSUL_OUT, "the list has 1025 entries, more than the limit of 1024"),
        ),
        c(
            "consul: four full lists exceed the rule budget",
            consul_json(json!({
                "ExcludeInboundPorts": full_ports, "ExcludeOutboundPorts": full_ports,
                "ExcludeOutboundCIDRs": full_cidrs, "ExcludeUIDs": (0..full).map(|u| u.to_string()).collect::<Vec<_>>(),
            })),
            refused(CONSUL_CONFIG, "rules per address family, more than the limit of 4096"),
        ),
        c(
            "kuma: 10^5 ports in YAML",
            kuma_yaml(&yaml_huge),
            refused(KUMA_YAML, "bytes long, more than the limit of 65536 bytes"),
        ),
        c(
            "kuma: one port over the list limit in YAML",
            kuma_yaml(&yaml_too_many),
            refused(KUMA_YAML, "redirect.outbound.excludePorts has 1025 entries, more than the limit of 1024"),
        ),
        c(
            "kuma: 10^5 per-UID entries",
            kuma_legacy(&[(KUMA_PER_UID, &uid_entries(100_000))]),
            refused(KUMA_PER_UID, "more than the limit of 65536 bytes"),
        ),
        c(
            "kuma: one per-UID entry over the list limit",
            kuma_legacy(&[(KUMA_PER_UID, &uid_entries(MAX_LIST_ENTRIES + 1))]),
            refused(KUMA_PER_UID, "the list has 1025 entries"),
        ),
        // ---- duplicate keys
        c(
            "consul: a JSON key twice",
            consul_raw(r#"{"ProxyUserID":"5995","ProxyUserID":"0","ProxyInboundPort":20000}"#),
            refused(CONSUL_CONFIG, "duplicate field `ProxyUserID`"),
        ),
        c(
            "kuma: a YAML key twice",
            kuma_yaml("kumaDPUser: 5678\nkumaDPUser: 0\n"),
            refused(KUMA_YAML, "duplicate mapping key: kumaDPUser (remove one)"),
        ),
        c(
            "kuma: a nested YAML key twice",
            kuma_yaml("redirect:\n  inbound: {port: 15006}\n  inbound: {enabled: false}\n"),
            refused(KUMA_YAML, "duplicate mapping key: inbound"),
        ),
        // ---- ports 0 and 65536
        c(
            "consul: inbound port 0 is a missing port",
            consul_json(json!({"ProxyInboundPort": 0})),
            refused(CONSUL_CONFIG, "ProxyInboundPort is required"),
        ),
        c(
            "consul: inbound port 65536",
            consul_json(json!({"ProxyInboundPort": 65536})),
            refused(CONSUL_CONFIG, r#"ProxyInboundPort "65536" is out of range (1-65535)"#),
        ),
        c(
            "consul: outbound port 0 means 15001, as upstream",
            consul_json(json!({"ProxyOutboundPort": 0})),
            Want::Accepted { family: Family::V4, present: &["-j REDIRECT --to-ports 15001"], absent: &[] },
        ),
        c(
            "consul: excluded port 0",
            consul_individual(&[(CONSUL_IN, "0")]),
            refused(CONSUL_IN, r#"entry "0" is out of range (1-65535)"#),
        ),
        c(
            "consul: a range ending at 65536",
            consul_json(json!({"ExcludeOutboundPorts": ["1000-65536"]})),
            refused(CONSUL_CONFIG, r#"ExcludeOutboundPorts entry "1000-65536" is not a number"#),
        ),
        c(
            "consul: DNS port 65536",
            consul_json(json!({"ConsulDNSPort": 65536})),
            refused(CONSUL_CONFIG, r#"ConsulDNSPort "65536" is out of range"#),
        ),
        c(
            "kuma: inbound port 0 while inbound is on",
            kuma_yaml("redirect:\n  inbound: {port: 0}\n"),
            refused(KUMA_YAML, "redirect.inbound.port is 0 but the feature is enabled"),
        ),
        c(
            "kuma: DNS port 0 while DNS is off is the webhook's way of writing 'off'",
            kuma_yaml("redirect:\n  dns: {enabled: false, port: 0}\n"),
            Want::Accepted { family: Family::V4, present: &["-j REDIRECT --to-ports 15001"], absent: &["15053"] },
        ),
        c(
            "kuma: outbound port 65536",
            kuma_yaml("redirect:\n  outbound: {port: 65536}\n"),
            refused(KUMA_YAML, r#"redirect.outbound.port "65536" is out of range"#),
        ),
        c(
            "kuma: legacy inbound port 0",
            kuma_legacy(&[(KUMA_IN_PORT, "0")]),
            refused(KUMA_IN_PORT, r#""0" is out of range"#),
        ),
        c(
            "kuma: probe proxy port 0 turns the probe exclusion off",
            kuma_legacy(&[(KUMA_PROBE, "0")]),
            Want::Accepted { family: Family::V4, present: &["--dport 9901 "], absent: &["--dport 9001 "] },
        ),
        c(
            "kuma: probe proxy port 65536",
            kuma_legacy(&[(KUMA_PROBE, "65536")]),
            refused(KUMA_PROBE, "is out of range"),
        ),
        c(
            "kuma: per-UID port 0",
            kuma_legacy(&[(KUMA_PER_UID, "tcp:0:1000")]),
            refused(KUMA_PER_UID, "is out of range"),
        ),
        // ---- CIDRs of the wrong family
        c(
            "consul: an IPv6 CIDR on an IPv4-only pod is kept out of the IPv4 pass",
            consul_json(json!({"ExcludeOutboundCIDRs": ["2001:db8::/32", "192.0.2.0/24"]})),
            Want::Accepted { family: Family::V4, present: &["-d 192.0.2.0/24"], absent: &["2001:db8"] },
        ),
        c6(
            "consul: ...and goes to the IPv6 pass of a dual-stack pod",
            consul_json(json!({"ExcludeOutboundCIDRs": ["2001:db8::/32", "192.0.2.0/24"]})),
            Want::Accepted { family: Family::V6, present: &["-d 2001:db8::/32"], absent: &["192.0.2"] },
        ),
        c(
            "consul: an IPv6 DNS address on a single-stack pod",
            consul_json(json!({"ConsulDNSIP": "::1"})),
            refused(CONSUL_CONFIG, "ConsulDNSIP ::1 is IPv6 but dual-stack mode is off"),
        ),
        c(
            "consul: an IPv4-mapped IPv6 network is IPv6",
            consul_json(json!({"ExcludeOutboundCIDRs": ["::ffff:10.0.0.0/104"]})),
            Want::Accepted { family: Family::V4, present: &[], absent: &["10.0.0.0", "ffff"] },
        ),
        c(
            "consul: a prefix too long for IPv4",
            consul_json(json!({"ExcludeOutboundCIDRs": ["10.0.0.0/64"]})),
            refused(CONSUL_CONFIG, r#""10.0.0.0/64" is not a CIDR"#),
        ),
        c(
            "consul: a zone index",
            consul_json(json!({"ExcludeOutboundCIDRs": ["fe80::1%eth0/64"]})),
            refused(CONSUL_CONFIG, "is not a CIDR"),
        ),
        c(
            "kuma: IPv6 exclusions in ipv4 mode never reach a rule",
            kuma_legacy(&[(KUMA_FAMILY, "ipv4"), (KUMA_IN_IPS, "fd00::/8,10.0.0.0/8")]),
            Want::Accepted { family: Family::V4, present: &["-s 10.0.0.0/8"], absent: &["fd00"] },
        ),
        c6(
            "kuma: a mixed YAML list is split per family",
            kuma_yaml("redirect:\n  outbound:\n    excludePortsForIPs: [\"10.0.0.0/8,fd00::/8\"]\n"),
            Want::Accepted { family: Family::V6, present: &["-d fd00::/8"], absent: &["10.0.0.0"] },
        ),
        // ---- negative UIDs
        c(
            "consul: a negative proxy UID",
            consul_json(json!({"ProxyUserID": "-1"})),
            refused(CONSUL_CONFIG, r#"ProxyUserID "-1" is not a number"#),
        ),
        c(
            "consul: the proxy UID as a negative JSON number",
            consul_json(json!({"ProxyUserID": -1})),
            refused(CONSUL_CONFIG, "is not the redirect JSON: invalid type: integer `-1`, expected a string"),
        ),
        c(
            "consul: a negative excluded UID (individual)",
            consul_individual(&[(CONSUL_UIDS, "-5")]),
            refused(CONSUL_UIDS, r#"entry "-5" is not a number"#),
        ),
        c(
            "consul: the kernel's 'no user' (2^32-1)",
            consul_json(json!({"ExcludeUIDs": ["4294967295"]})),
            refused(CONSUL_CONFIG, "is out of range (0-4294967294)"),
        ),
        c(
            "kuma: a negative kumaDPUser in YAML",
            kuma_yaml("kumaDPUser: -1\n"),
            refused(KUMA_YAML, r#"kumaDPUser "-1" is not a number (a numeric UID is required)"#),
        ),
        c(
            "kuma: a negative legacy sidecar UID",
            kuma_legacy(&[(KUMA_UID, "-1")]),
            refused(KUMA_UID, r#""-1" is not a number"#),
        ),
        c(
            "kuma: a negative per-UID range",
            kuma_legacy(&[(KUMA_PER_UID, "tcp:80:-5-10")]),
            refused(KUMA_PER_UID, "is not a number"),
        ),
        c(
            "kuma: a negative port in a YAML list",
            kuma_yaml("redirect:\n  inbound:\n    excludePorts: [-80]\n"),
            refused(KUMA_YAML, r#"redirect.inbound.excludePorts entry "-80" is not a number"#),
        ),
    ]
}

fn annotations_of(v: &Value) -> Annotations {
    v.as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned())).collect()
}

/// Every family's rendered transaction, after holding it to the allow-list.
fn rendered(r: &Redirect) -> BTreeMap<Family, String> {
    rules::build(r)
        .iter()
        .map(|set| {
            let text = rules::render_fresh(set);
            let summary = shape::check(&text, set.family).unwrap_or_else(|e| panic!("allow-list: {e}\n{text}"));
            assert!(summary.rules <= MAX_RULES_PER_FAMILY);
            (set.family, text)
        })
        .collect()
}

fn check_refusal(name: &str, e: &AnnotationError, annotation: &str, text: &str) {
    let msg = e.to_string();
    assert_eq!(e.annotation, annotation, "{name}: names the wrong annotation: {msg}");
    assert!(msg.contains(text), "{name}: {msg}");
    assert!(!msg.contains(['\n', '\r']), "{name}: one line: {msg}");
    assert!(msg.len() <= 512, "{name}: {} bytes: {msg}", msg.len());
}

#[test]
fn every_adversarial_annotation_is_refused_clearly_or_normalised_as_documented() {
    for case in cases() {
        let a = annotations_of(&case.annotations);
        let outcome = mesh::classify(&a, PodNetwork { has_ipv6: case.ipv6 });
        match (&case.want, outcome) {
            (Want::Refused { annotation, text }, Err(e)) => check_refusal(case.name, &e, annotation, text),
            (Want::Accepted { family, present, absent }, Ok(Some(r))) => {
                let text = rendered(&r).remove(family).unwrap_or_else(|| panic!("{}: no {family:?} pass", case.name));
                for p in *present {
                    assert!(text.contains(p), "{}: {p:?} missing from\n{text}", case.name);
                }
                for p in *absent {
                    assert!(!text.contains(p), "{}: {p:?} must not be in\n{text}", case.name);
                }
            }
            (_, Ok(r)) => panic!("{}: accepted ({} redirect)", case.name, r.map_or("no", |r| r.mesh())),
            (_, Err(e)) => panic!("{}: refused: {e}", case.name),
        }
    }
}

/// Calls the plugin's ADD, CHECK or DEL on `ns` with `engine` and a pod's annotations.
fn call_with(engine: Engine, command: &str, ns: &Netns, annotations: &Value, prev_result: Option<&Value>) -> Output {
    let mut stdin = json!({"cniVersion": "1.0.0", "name": "adv", "type": "tproxy-cni",
        "runtimeConfig": {"io.kubernetes.cri.pod-annotations": annotations}});
    for (k, v) in engine.conf().as_object().unwrap() {
        stdin[k] = v.clone();
    }
    if let Some(p) = prev_result {
        stdin["prevResult"] = p.clone();
    }
    let netns = ns.path();
    call_plugin(
        &[
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "adv0"),
            ("CNI_NETNS", netns.to_str().unwrap()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=adv"),
        ],
        &stdin.to_string(),
    )
}

/// A namespace holding a foreign iptables-nft canary, and its snapshot for `engine`.
fn canary_ns(engine: Engine) -> (Netns, String) {
    let ns = Netns::new("tpa");
    ns.restore(Fam::V4, "nft", "*nat\n:CANARY - [0:0]\n-A OUTPUT -p tcp -m tcp --dport 9999 -j CANARY\nCOMMIT\n");
    let before = engine.snapshot(&ns);
    (ns, before)
}

both_engines!(adversarial_refusals_through_the_plugin_are_code_100_and_change_nothing);
/// The same corpus through the real binary into a real namespace: refusals are code 100 with a
/// one-line message, and leave the namespace (canary included) exactly as it was.
fn adversarial_refusals_through_the_plugin_are_code_100_and_change_nothing(engine: Engine) {
    if !privileged() {
        return;
    }
    let (ns, before) = canary_ns(engine);
    let mut refusals = 0;
    for case in cases() {
        let Want::Refused { annotation, .. } = case.want else { continue };
        let out = call_with(engine, "ADD", &ns, &case.annotations, None);
        assert!(!out.status.success(), "{engine:?} {}", case.name);
        let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(doc["code"], 100, "{engine:?} {}: {doc}", case.name);
        let msg = doc["msg"].as_str().unwrap();
        assert!(msg.contains(annotation) && !msg.contains('\n'), "{engine:?} {}: {msg}", case.name);
        refusals += 1;
    }
    assert!(refusals >= 40, "the corpus has {refusals} refusals");
    assert_eq!(engine.snapshot(&ns), before, "{engine:?}: no refusal changed the namespace");
}

both_engines!(adversarial_acceptances_through_the_plugin_install_check_and_delete_cleanly);
/// Every accepted input of the corpus through the real binary: ADD installs it (the nftables
/// engine exactly the tables `nft -f` makes of `render --backend nftables`), CHECK accepts it, and
/// DEL leaves nothing of ours, the canary intact.
fn adversarial_acceptances_through_the_plugin_install_check_and_delete_cleanly(engine: Engine) {
    if !privileged() {
        return;
    }
    let mut accepted = 0;
    for case in cases() {
        let Want::Accepted { .. } = case.want else { continue };
        let (ns, before) = canary_ns(engine);
        let mut ips = vec![json!({"address": "198.18.0.9/24"})];
        if case.ipv6 {
            ips.push(json!({"address": "fd18::9/64"}));
        }
        let prev = json!({"cniVersion": "1.0.0", "ips": ips});
        let add = call_with(engine, "ADD", &ns, &case.annotations, Some(&prev));
        assert!(add.status.success(), "{engine:?} {}: {}", case.name, text(&add));
        assert_ne!(engine.snapshot(&ns), before, "{engine:?} {}: nothing installed", case.name);
        if engine == Engine::Nftables {
            assert_eq!(nft_tables(&ns), nft_reference(&case.annotations, case.ipv6), "{}", case.name);
        }
        let check = call_with(engine, "CHECK", &ns, &case.annotations, Some(&prev));
        assert!(check.status.success(), "{engine:?} {}: {}", case.name, text(&check));
        let del = call_with(engine, "DEL", &ns, &case.annotations, None);
        assert!(del.status.success(), "{engine:?} {}: {}", case.name, text(&del));
        let after = engine.snapshot(&ns);
        match engine {
            Engine::Nftables => assert_eq!(after, before, "{}: DEL leaves the namespace as it was", case.name),
            // iptables-nft may keep an empty table it created (see lifecycle.rs): no line of ours.
            Engine::Iptables(_) => {
                let ours: Vec<&str> = after
                    .lines()
                    .filter(|l| ["tproxy-cni", "kuma/mesh", "CONSUL_", "KUMA_"].iter().any(|o| l.contains(o)))
                    .collect();
                assert!(ours.is_empty(), "{engine:?} {}: left after DEL: {ours:?}", case.name);
                assert!(after.contains("-A OUTPUT -p tcp -m tcp --dport 9999 -j CANARY"), "{}: canary", case.name);
            }
        }
        assert_eq!(ns.passthrough_v6(), 0, "{engine:?} {}", case.name);
        accepted += 1;
    }
    assert!(accepted >= 8, "the corpus has {accepted} accepted inputs");
}

#[test]
fn the_largest_accepted_configuration_stays_within_every_limit() {
    // Exactly at the limits: a full list of each kind is accepted and renders within budget.
    let ports: Vec<String> = (1..=MAX_LIST_ENTRIES).map(|p| p.to_string()).collect();
    let a = annotations_of(&consul_json(json!({"ExcludeInboundPorts": ports, "ExcludeOutboundPorts": ports})));
    let r = mesh::classify(&a, PodNetwork::default()).unwrap().unwrap();
    let rules = rendered(&r)[&Family::V4].lines().filter(|l| l.starts_with("-A ")).count();
    assert!(rules > 2 * MAX_LIST_ENTRIES && rules <= MAX_RULES_PER_FAMILY, "{rules}");
    // An annotation of exactly the byte limit is read (and here refused for what it says, not its size).
    let mut padded = String::from("9901");
    while padded.len() + 6 <= MAX_ANNOTATION_BYTES {
        padded.push_str(", 9901");
    }
    padded.push_str(&" ".repeat(MAX_ANNOTATION_BYTES - padded.len()));
    assert_eq!(padded.len(), MAX_ANNOTATION_BYTES);
    let e = mesh::classify(&annotations_of(&kuma_legacy(&[(KUMA_OUT_PORTS, &padded)])), PodNetwork::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("the list has") && !e.contains("bytes long"), "{e}");
}

#[test]
fn every_golden_transaction_passes_the_allow_list() {
    let mut checked = 0;
    for dir in ["tests/golden/consul", "tests/golden/kuma"] {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "rules") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let mut family = None;
            let mut block = String::new();
            let mut flush = |family: Option<Family>, block: &mut String| {
                if let Some(f) = family {
                    shape::check(block, f).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    checked += 1;
                }
                block.clear();
            };
            for line in text.lines() {
                match line {
                    "# ipv4" | "# ipv6" => {
                        flush(family, &mut block);
                        family = Some(if line == "# ipv4" { Family::V4 } else { Family::V6 });
                    }
                    l => writeln!(block, "{l}").unwrap(),
                }
            }
            flush(family, &mut block);
        }
    }
    assert!(checked >= 20, "{checked} transactions");
}

// ---- Regression tests of bugs found by fuzzing and by this corpus ----

#[test]
fn kubeconfig_errors_never_carry_the_token() {
    let token = "c2VjcmV0LXRva2VuLXZhbHVlLTEyMzQ1";
    let path = std::path::Path::new("/nonexistent/kubeconfig");
    // A YAML syntax error a few lines from the token: the parser's source snippet used to quote it.
    let syntax = format!(
        "current-context: node\nusers:\n- name: plugin\n  user2\n    exec: {{command: x}}\n    token: {token}\n"
    );
    // A missing space after `token:` makes the line a plain string where a mapping is expected:
    // the decoder's "invalid type: string …" used to quote it.
    let shape = format!(
        "current-context: node\ncontexts: []\nclusters: []\nusers:\n- name: plugin\n  user:\n    token:\"{token}\"\n"
    );
    for text in [syntax, shape] {
        let e = tproxy_cni::kube::Kubeconfig::parse(path, text.as_bytes()).unwrap_err();
        let msg = tproxy_cni::text::chain(&e);
        assert!(!msg.contains(token), "{msg}");
    }
}

#[test]
fn error_messages_quote_runtime_and_annotation_text_bounded() {
    let long = "\u{19}".repeat(500);
    let messages = [
        tproxy_cni::plugin::args::CniArgs::parse(&format!("{long}=1")).unwrap_err().to_string(),
        tproxy_cni::plugin::args::CniArgs::parse(&long).unwrap_err().to_string(),
        mesh::classify(&annotations_of(&consul_json(json!({"ProxyInboundPort": long}))), PodNetwork::default())
            .unwrap_err()
            .to_string(),
        mesh::classify(
            &annotations_of(&kuma_legacy(&[(KUMA_PER_UID, &format!("tcp:{long}:1"))])),
            PodNetwork::default(),
        )
        .unwrap_err()
        .to_string(),
    ];
    for msg in messages {
        assert!(msg.len() <= 512 && !msg.contains('\n'), "{} bytes: {msg}", msg.len());
    }
    // Through the binary: an unknown CNI_COMMAND of 600 control characters.
    let out = call_plugin(&[("CNI_COMMAND", &"\u{7f}".repeat(600))], "{}");
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["code"], 4);
    assert!(doc["msg"].as_str().unwrap().len() <= 200, "{doc}");
}

#[test]
fn kuma_per_uid_protocols_named_twice_give_one_rule() {
    let r =
        mesh::classify(&annotations_of(&kuma_legacy(&[(KUMA_PER_UID, "udp,UDP,udp:53:1000")])), PodNetwork::default())
            .unwrap()
            .unwrap();
    let text = &rendered(&r)[&Family::V4];
    assert_eq!(text.matches("--uid-owner 1000").count(), 1, "{text}");
}

#[test]
fn kuma_yaml_scalars_of_any_kind_get_a_value_error() {
    for (yaml, want) in [
        ("kumaDPUser: -1\n", r#"kumaDPUser "-1" is not a number"#),
        ("kumaDPUser: 1e3\n", r#"kumaDPUser "1000.0" is not a number"#),
        ("kumaDPUser: true\n", r#"kumaDPUser "true" is not a number"#),
        ("redirect: {inbound: {excludePorts: [1.5]}}\n", r#"excludePorts entry "1.5" is not a number"#),
        ("redirect: {inbound: {excludePorts: {a: 1}}}\n", "a list of ports, or a string of comma-separated ports"),
    ] {
        let e = mesh::classify(&annotations_of(&kuma_yaml(yaml)), PodNetwork::default()).unwrap_err().to_string();
        assert!(e.contains(want), "{yaml:?}: {e}");
        assert!(!e.contains("untagged enum"), "{e}");
    }
}

#[test]
fn consul_individual_annotation_errors_name_that_annotation() {
    for (key, value) in [(CONSUL_IN, "x"), (CONSUL_OUT, "70000"), (CONSUL_CIDRS, "10.0.0.0/33"), (CONSUL_UIDS, "root")]
    {
        let e =
            mesh::classify(&annotations_of(&consul_individual(&[(key, value)])), PodNetwork::default()).unwrap_err();
        assert_eq!(e.annotation, key, "{e}");
    }
    let mut metrics = consul_individual(&[("consul.hashicorp.com/enable-metrics", "true")]);
    metrics["consul.hashicorp.com/prometheus-scrape-port"] = json!("http");
    let e = mesh::classify(&annotations_of(&metrics), PodNetwork::default()).unwrap_err();
    assert_eq!(e.annotation, "consul.hashicorp.com/prometheus-scrape-port", "{e}");
}

#[test]
fn log_lines_escape_what_annotations_say() {
    let dir = TempDir::new("adv-log");
    let log = dir.path().join("plugin.log");
    let yaml =
        "cniMode: true\nredirect:\n  dns: {enabled: true, resolvConfigPath: \"/x\\nERROR tproxy-cni: forged line\"}\n";
    let stdin = json!({"cniVersion": "1.0.0", "name": "adv", "type": "tproxy-cni",
        "log_level": "info", "log_file": log,
        "runtimeConfig": {"io.kubernetes.cri.pod-annotations": kuma_yaml(yaml)}});
    // The namespace does not exist: ADD fails after reading the annotations (and logging about them).
    call_plugin(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "adv1"),
            ("CNI_NETNS", "/nonexistent/netns"),
            ("CNI_IFNAME", "eth0"),
        ],
        &stdin.to_string(),
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("\\nERROR tproxy-cni: forged line"), "{text}");
    assert!(!text.lines().any(|l| l.starts_with("ERROR tproxy-cni: forged")), "{text}");
}

#[test]
fn kubeconfig_naming_a_fifo_or_a_device_fails_at_once() {
    let dir = TempDir::new("adv-kc");
    let fifo = dir.path().join("ca.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // Safety: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for ca in [fifo.to_str().unwrap(), "/dev/zero"] {
        let text = format!(
            "current-context: c\ncontexts: [{{name: c, context: {{cluster: k}}}}]\n\
             clusters: [{{name: k, cluster: {{server: \"https://127.0.0.1:6443\", certificate-authority: \"{ca}\"}}}}]\n"
        );
        let start = std::time::Instant::now();
        let e = tproxy_cni::kube::Kubeconfig::parse(&dir.path().join("kubeconfig"), text.as_bytes()).unwrap_err();
        assert!(start.elapsed() < std::time::Duration::from_secs(2), "{ca}: took {:?}", start.elapsed());
        assert!(tproxy_cni::text::chain(&e).contains("is not a regular file"), "{ca}: {e}");
    }
}

#[test]
fn a_container_id_with_multibyte_characters_does_not_panic() {
    // STATUS and GC do not validate CNI_CONTAINERID; the log context used to cut it at byte 12.
    let id = "c\"k8\u{fffd}\u{fffd}\u{fffd}.cncf.io";
    let conf = json!({"cniVersion": "1.1.0", "name": "n", "type": "tproxy-cni"});
    for command in ["STATUS", "GC"] {
        let out = call_plugin(&[("CNI_COMMAND", command), ("CNI_CONTAINERID", id)], &conf.to_string());
        if !out.status.success() {
            let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_ne!(doc["code"], 199, "{command}: {doc}");
        }
    }
}

#[test]
fn a_configuration_decoding_error_is_quoted_once_and_bounded() {
    // The decoder's message (which quotes the value) used to be repeated in full as the cause.
    let long = "x".repeat(2000);
    let stdin = format!(r#"{{"cniVersion":"1.0.0","name":"n","type":"tproxy-cni","exclude_namespaces":"{long}"}}"#);
    let out = call_plugin(
        &[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c"), ("CNI_IFNAME", "eth0"), ("CNI_NETNS", "/nonexistent")],
        &stdin,
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let msg = doc["msg"].as_str().unwrap();
    assert_eq!(doc["code"], 7, "{doc}");
    assert!(msg.len() <= 512 && msg.matches("invalid type").count() == 1, "{} bytes: {msg}", msg.len());
}

#[test]
fn a_server_url_with_a_multibyte_character_is_refused_not_a_panic() {
    // Found by fuzzing: the scheme check cut the URL at byte 8, inside a character.
    for server in ["https:/\u{224}fd00::1", "\u{e9}ttps://x", "https://\u{e9}xample.org"] {
        let text = format!(
            "current-context: c\ncontexts: [{{name: c, context: {{cluster: k}}}}]\nclusters: [{{name: k, cluster: {{server: \"{server}\"}}}}]\n"
        );
        let e = tproxy_cni::kube::Kubeconfig::parse(std::path::Path::new("/nonexistent/kubeconfig"), text.as_bytes())
            .unwrap_err();
        assert!(e.to_string().contains("is not usable"), "{server}: {e}");
    }
}

#[test]
fn conflist_chaining_keeps_every_number_the_primary_wrote() {
    // Found by fuzzing the installer's merger: numbers went through f64, so an integer beyond 64
    // bits became 4.4444444444444455e+91 and some decimals were written back differently.
    use tproxy_cni::installer::conflist::{self, Primary, Shape};
    let numbers = [
        "44444444444444444444444444444444444444444444444444444444444444444444444444444444444444444440",
        "18446744073709551616",
        "0.30000000000000004",
        "1.0",
        "-0",
        "123456789.123456789123456789",
    ];
    let fields: Vec<String> = numbers.iter().enumerate().map(|(i, n)| format!(r#""n{i}": {n}"#)).collect();
    let text = format!(r#"{{"cniVersion": "1.0.0", "name": "k8s", "type": "calico", {}}}"#, fields.join(", "));
    let doc = conflist::parse(text.as_bytes(), Shape::Single).unwrap();
    let primary = Primary {
        path: "/etc/cni/net.d/10-calico.conf".into(),
        shape: Shape::Single,
        bytes: text.clone().into_bytes(),
        doc,
    };
    let entry = json!({"type": "tproxy-cni", "name": "tproxy-cni"});
    let written = String::from_utf8(conflist::render(&conflist::inject(&primary, &entry).unwrap().unwrap())).unwrap();
    for (i, n) in numbers.iter().enumerate() {
        assert!(written.contains(&format!(r#""n{i}": {n}"#)), "{n} not kept:\n{written}");
    }
}

#[test]
fn a_conflist_with_a_number_beyond_float64_is_skipped_as_libcni_skips_it() {
    // Numbers now keep their text; libcni (Go) still refuses a file with a number no float64 holds,
    // so the installer must not pick such a file either.
    use tproxy_cni::installer::conflist::{self, Shape};
    let text = br#"{"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "bridge", "mtu": 1e400}]}"#;
    assert!(conflist::parse(text, Shape::List).is_err());
}

#[test]
fn the_installer_quotes_an_unsupported_cni_version_bounded() {
    // Found by fuzzing the conflist merger: the version was quoted whole, however long.
    use tproxy_cni::installer::conflist::{self, Primary, Shape};
    let text =
        format!(r#"{{"cniVersion": "0{}", "name": "k8s", "plugins": [{{"type": "bridge"}}]}}"#, "z\u{7f}".repeat(300));
    let doc = conflist::parse(text.as_bytes(), Shape::List).unwrap();
    let primary =
        Primary { path: "/etc/cni/net.d/10-bridge.conflist".into(), shape: Shape::List, bytes: text.into_bytes(), doc };
    let msg = conflist::inject(&primary, &json!({"type": "tproxy-cni"})).unwrap_err().to_string();
    assert!(msg.len() <= 512 && msg.contains("is not one tproxy-cni supports"), "{} bytes: {msg}", msg.len());
}

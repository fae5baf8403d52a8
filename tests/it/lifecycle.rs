//! The rule set's lifecycle in a real pod namespace, on both iptables backends: ADD, repeated ADD,
//! CHECK, DEL, a namespace that is gone, bad input, and a transaction that fails half way.
//!
//! Every namespace carries a foreign "canary" (a rule in a built-in chain and a chain of its own, in
//! both families) that must survive everything we do.

use std::process::Output;

use crate::support::*;
use serde_json::{Value, json};

fn config(inbound: u16) -> Value {
    json!({
        "ConsulDNSIP": "127.0.0.1", "ConsulDNSPort": 8600, "ProxyUserID": "5995",
        "ProxyInboundPort": inbound, "ProxyOutboundPort": 15001,
        "ExcludeInboundPorts": ["9090"], "ExcludeOutboundPorts": ["5432"],
        "ExcludeOutboundCIDRs": ["192.0.2.0/24", "2001:db8::/32"], "ExcludeUIDs": ["5996"]
    })
}

/// The network configuration a runtime hands our plugin as the last link of the chain.
fn plugin_stdin(backend: &str, annotations: Option<&Value>, prev_result: Option<&Value>) -> String {
    let mut conf = json!({"cniVersion": "1.0.0", "name": "lifecycle", "type": "tproxy-cni", "iptables_mode": backend});
    if let Some(a) = annotations {
        conf["runtimeConfig"] = json!({"io.kubernetes.cri.pod-annotations": a});
    }
    if let Some(p) = prev_result {
        conf["prevResult"] = p.clone();
    }
    conf.to_string()
}

fn call(command: &str, ns: &Netns, stdin: &str) -> Output {
    let netns = ns.path();
    call_plugin(
        &[
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "lifecycle0"),
            ("CNI_NETNS", netns.to_str().unwrap()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/usr/lib/cni"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=lifecycle"),
        ],
        stdin,
    )
}

/// The error document a failed call printed, checked for shape.
fn error_of(out: &Output) -> Value {
    assert!(!out.status.success(), "the call must fail");
    let doc: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is one JSON document ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    assert!(doc["code"].is_u64() && doc["msg"].is_string(), "{doc}");
    assert!(!doc["msg"].as_str().unwrap().contains('\n'), "one-line message: {doc}");
    doc
}

fn stdout_json(out: &Output) -> Value {
    assert!(out.status.success(), "call failed: {}", text(out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn repeated_add_leaves_exactly_one_copy() {
    for net in Fixture::backends(json!({})) {
        let backend = net.backend;
        let (pod, _) = net.canary_pod("web");
        let annotations = consul_pod(config(20000), &[]);
        let result = stdout_json(&pod.add(Some(&annotations)));
        let once = pod.ns.snapshot();
        assert_eq!(pod.ns.our_rule_count(Fam::V4, backend), 16, "{backend}: {once}");

        // A runtime retrying ADD calls the plugin again with the same input.
        for _ in 0..2 {
            let again = stdout_json(&call("ADD", &pod.ns, &plugin_stdin(backend, Some(&annotations), Some(&result))));
            assert_eq!(again, result, "{backend}: the previous result passes through unchanged");
            assert_eq!(pod.ns.snapshot(), once, "{backend}: a repeated ADD must leave the namespace as one ADD did");
        }
        assert!(pod.check(Some(&annotations)).status.success(), "{backend}: CHECK after repeated ADD");
    }
}

#[test]
fn repeated_add_with_a_new_configuration_replaces_the_old_one() {
    for net in Fixture::backends(json!({})) {
        let backend = net.backend;
        let (pod, before) = net.canary_pod("web");
        let old = consul_pod(config(20000), &[]);
        let result = stdout_json(&pod.add(Some(&old)));
        let new = consul_pod(config(21000), &[]);
        // Without IPv6 in the previous result, the new set is IPv4 only: the IPv6 pass must go.
        let mut v4_only = result.clone();
        v4_only["ips"] = json!([result["ips"][0]]);
        stdout_json(&call("ADD", &pod.ns, &plugin_stdin(backend, Some(&new), Some(&v4_only))));
        let v4 = pod.ns.save(Fam::V4, backend);
        assert!(v4.contains("--to-ports 21000") && !v4.contains("--to-ports 20000"), "{backend}: {v4}");
        assert_eq!(pod.ns.our_rule_count(Fam::V6, backend), 0, "{backend}: IPv6 pass removed");
        assert!(call("CHECK", &pod.ns, &plugin_stdin(backend, Some(&new), Some(&v4_only))).status.success());
        assert!(pod.ns.save(Fam::V6, backend).contains("-A OUTPUT -p tcp -m tcp --dport 9999 -j RETURN"));

        assert!(pod.del(Some(&new)).status.success());
        assert_eq!(pod.ns.snapshot(), before, "{backend}: DEL restores the namespace exactly, canary included");
    }
}

#[test]
fn check_passes_after_add_and_names_what_was_tampered_with() {
    for net in Fixture::backends(json!({})) {
        let backend = net.backend;
        let annotations = consul_pod(config(20000), &[]);
        let pod = net.pod_unstarted("web");
        let result = stdout_json(&pod.add(Some(&annotations)));
        assert!(pod.check(Some(&annotations)).status.success(), "{backend}: CHECK right after ADD");

        // A foreign rule in one of the built-in chains we use does not bother CHECK.
        pod.ns.restore(Fam::V4, backend, "*nat\n-A OUTPUT -p udp -j RETURN\nCOMMIT\n");
        assert!(pod.check(Some(&annotations)).status.success(), "{backend}: foreign rules are ignored");

        let proxy_return = "-A CONSUL_PROXY_OUTPUT -m owner --uid-owner 5995 -m comment --comment tproxy-cni -j RETURN";
        pod.ns.restore(Fam::V4, backend, &format!("*nat\n{}\nCOMMIT\n", proxy_return.replacen("-A", "-D", 1)));
        let out = pod.check(Some(&annotations));
        assert!(!out.status.success(), "{backend}: CHECK must fail once a rule is gone");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("missing in ipv4 nat/CONSUL_PROXY_OUTPUT: -m owner --uid-owner 5995"), "{backend}: {err}");

        // Repair with ADD (as a runtime would), then add a stray rule of ours: CHECK names it.
        assert_eq!(
            stdout_json(&call("ADD", &pod.ns, &plugin_stdin(backend, Some(&annotations), Some(&result)))),
            result
        );
        assert!(pod.check(Some(&annotations)).status.success(), "{backend}: repaired by ADD");
        pod.ns.restore(Fam::V6, backend, "*nat\n-A OUTPUT -p udp -m comment --comment tproxy-cni -j RETURN\nCOMMIT\n");
        let err = String::from_utf8_lossy(&pod.check(Some(&annotations)).stderr).into_owned();
        assert!(
            err.contains("unexpected in ipv6 nat/OUTPUT: -p udp -m comment --comment tproxy-cni -j RETURN"),
            "{backend}: {err}"
        );
    }
}

#[test]
fn del_removes_only_ours_and_succeeds_again_when_the_namespace_is_gone() {
    for net in Fixture::backends(json!({})) {
        let backend = net.backend;
        let (pod, before) = net.canary_pod("web");
        let annotations = consul_pod(config(20000), &[]);
        assert!(pod.add(Some(&annotations)).status.success());
        assert_ne!(pod.ns.snapshot(), before);

        let stdin = plugin_stdin(backend, Some(&annotations), None);
        for _ in 0..2 {
            let out = call("DEL", &pod.ns, &stdin);
            assert!(
                out.status.success() && out.stdout.is_empty(),
                "{backend}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            assert_eq!(pod.ns.snapshot(), before, "{backend}: DEL leaves no rule of ours and every foreign one");
        }
        assert!(pod.del(Some(&annotations)).status.success(), "{backend}: DEL through the whole chain");

        // The runtime may call DEL after the namespace is gone, and again.
        let path = pod.ns.path();
        sh(std::process::Command::new("ip").args(["netns", "del", &pod.ns.name]));
        assert!(!path.exists());
        for _ in 0..2 {
            assert!(call("DEL", &pod.ns, &stdin).status.success(), "{backend}: DEL of a gone namespace succeeds");
        }
    }
}

#[test]
fn non_mesh_pod_is_byte_for_byte_untouched() {
    let Some(net) = Fixture::new("nft", json!({})) else { return };
    let cases = [
        None,
        Some(json!({"app": "web"})),
        // Injected but transparent proxy off.
        Some(json!({"consul.hashicorp.com/connect-inject-status": "injected"})),
    ];
    for annotations in cases {
        let (pod, before) = net.canary_pod("plain");
        assert!(pod.add(annotations.as_ref()).status.success());
        assert_eq!(pod.ns.snapshot(), before, "annotations {annotations:?}");
        assert!(pod.check(annotations.as_ref()).status.success(), "CHECK expects nothing of ours: {annotations:?}");
        assert!(pod.del(annotations.as_ref()).status.success());
        assert_eq!(pod.ns.snapshot(), before);
    }
}

#[test]
fn bad_input_gets_its_code_and_a_readable_message_and_changes_nothing() {
    if !privileged() {
        return;
    }
    let (ns, before) = Netns::with_canary("tpe", "nft");
    let with_config = |c: Value| plugin_stdin("nft", Some(&consul_pod(c, &[])), None);
    let mut bad_port = config(20000);
    bad_port["ProxyInboundPort"] = json!(65536);
    let mut bad_cidr = config(20000);
    bad_cidr["ExcludeOutboundCIDRs"] = json!(["10.0.0.0/33"]);
    let mut bad_uid = config(20000);
    bad_uid["ProxyUserID"] = json!("envoy");
    let mut injected = config(20000);
    injected["ExcludeInboundPorts"] = json!(["22\n-A OUTPUT -j ACCEPT"]);
    let mut option_text = config(20000);
    option_text["ExcludeOutboundCIDRs"] = json!(["0.0.0.0/0 -j ACCEPT"]);

    let cases: Vec<(&str, String, u64, &str)> = vec![
        ("malformed stdin", "{\"cniVersion\": \"1.0.0\",".into(), 6, "not valid JSON"),
        (
            "unknown cniVersion",
            r#"{"cniVersion":"0.2.0","name":"n","type":"tproxy-cni"}"#.into(),
            1,
            "CNI version \"0.2.0\" is not supported",
        ),
        (
            "bad iptables_mode",
            r#"{"cniVersion":"1.0.0","name":"n","type":"tproxy-cni","iptables_mode":"ebtables"}"#.into(),
            7,
            "iptables_mode",
        ),
        ("port out of range", with_config(bad_port), 100, "ProxyInboundPort \"65536\" is out of range"),
        ("bad CIDR", with_config(bad_cidr), 100, "ExcludeOutboundCIDRs entry \"10.0.0.0/33\" is not a CIDR"),
        ("non-numeric UID", with_config(bad_uid), 100, "ProxyUserID \"envoy\" is not a number"),
        ("newline and option text", with_config(injected), 100, r#""22\n-A OUTPUT -j ACCEPT" is not a number"#),
        ("option text in a CIDR", with_config(option_text), 100, "is not a CIDR"),
    ];
    for (what, stdin, code, msg) in cases {
        let doc = error_of(&call("ADD", &ns, &stdin));
        assert_eq!(doc["code"], code, "{what}: {doc}");
        assert!(doc["msg"].as_str().unwrap().contains(msg), "{what}: {doc}");
        assert_eq!(ns.snapshot(), before, "{what}: the namespace must be untouched");
    }

    // Missing environment.
    let stdin = with_config(config(20000));
    let netns = ns.path();
    for (drop, msg) in [
        ("CNI_CONTAINERID", "CNI_CONTAINERID is required"),
        ("CNI_NETNS", "CNI_NETNS is required"),
        ("CNI_IFNAME", "CNI_IFNAME is required"),
    ] {
        let env: Vec<(&str, &str)> = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", netns.to_str().unwrap()),
            ("CNI_IFNAME", "eth0"),
        ]
        .into_iter()
        .filter(|(k, _)| *k != drop)
        .collect();
        let doc = error_of(&call_plugin(&env, &stdin));
        assert_eq!(doc["code"], 4, "{doc}");
        assert!(doc["msg"].as_str().unwrap().contains(msg), "{doc}");
    }
    let doc = error_of(&call_plugin(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", netns.to_str().unwrap()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "K8S_POD_NAME"),
        ],
        &stdin,
    ));
    assert_eq!(doc["code"], 4, "malformed CNI_ARGS: {doc}");
    assert_eq!(ns.snapshot(), before, "missing environment: the namespace must be untouched");
}

#[test]
fn a_failed_transaction_leaves_the_namespace_as_it_was() {
    if !privileged() {
        return;
    }
    // Someone's native nftables rules in `ip6 nat`, in a chain with one of our names, that
    // iptables-nft cannot parse: the IPv6 transaction fails after the IPv4 one has been applied.
    let (ns, _) = Netns::with_canary("tpf", "nft");
    ns.exec(&["nft", "add table ip6 nat; add chain ip6 nat CONSUL_PROXY_INBOUND; add rule ip6 nat CONSUL_PROXY_INBOUND meta mark set 0x1 counter"]);
    let v4_before = ns.save(Fam::V4, "nft");
    let ip6_before = ns.exec(&["nft", "list", "table", "ip6", "nat"]);
    let prev = json!({"cniVersion": "1.0.0", "ips": [{"address": "198.18.0.9/24"}, {"address": "fd18::9/64"}]});
    let out = call("ADD", &ns, &plugin_stdin("nft", Some(&consul_pod(config(20000), &[])), Some(&prev)));
    let doc = error_of(&out);
    assert_eq!(doc["code"], 101, "{doc}");
    assert!(doc["msg"].as_str().unwrap().contains("ip6tables-nft-"), "{doc}");
    assert_eq!(ns.save(Fam::V4, "nft"), v4_before, "the IPv4 pass applied first must be undone");
    // (iptables-nft may leave an empty built-in base chain behind: iptables shows those always.)
    assert_eq!(ns.exec(&["nft", "list", "table", "ip6", "nat"]), ip6_before, "the failed IPv6 table is untouched");
}

// ---- Kuma: three tables, Kuma's comments, and ::6 on the loopback ----

const KUMA_CONFIG: &str = "cniMode: true\nredirect:\n  outbound: {excludePorts: [5432]}\n  \
                           dns: {enabled: true, port: 15053, captureAll: true}\ndropInvalidPackets: true\n";

/// A snapshot without the tables that hold nothing: iptables-nft creates a table's built-in chains
/// on first use and never deletes them, so an empty raw or mangle table may outlive our rules.
fn without_empty_tables(snapshot: &str) -> String {
    let mut out = String::new();
    let mut block = String::new();
    for line in snapshot.lines() {
        if line.starts_with('*') || !block.is_empty() {
            block.push_str(line);
            block.push('\n');
            if line == "COMMIT" {
                let used = block.lines().any(|l| l.starts_with("-A ") || (l.starts_with(':') && l.contains(" - [")));
                if used {
                    out.push_str(&block);
                }
                block.clear();
            }
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Rules carrying Kuma's comment prefix in one family.
fn kuma_rule_count(ns: &Netns, family: Fam, backend: &str) -> usize {
    ns.save(family, backend)
        .lines()
        .filter(|l| l.starts_with("-A ") && l.contains("--comment \"kuma/mesh/transparent/proxy/"))
        .count()
}

#[test]
fn kuma_repeated_add_check_and_del_on_both_backends() {
    let annotations = kuma_pod(Some(KUMA_CONFIG), &[]);
    for net in Fixture::backends(json!({})) {
        let backend = net.backend;
        let (pod, before) = net.canary_pod("kuma");
        let result = stdout_json(&pod.add(Some(&annotations)));
        let once = pod.ns.snapshot();
        for fam in [Fam::V4, Fam::V6] {
            let saved = pod.ns.save(fam, backend);
            for table in ["*nat", "*raw", "*mangle"] {
                assert!(saved.contains(table), "{backend} {fam:?}: {table} missing:\n{saved}");
            }
            assert_eq!(kuma_rule_count(&pod.ns, fam, backend), 20, "{backend} {fam:?}:\n{saved}");
        }
        assert!(pod.ns.passthrough_v6() > 0, "{backend}: ::6 on lo");

        // A runtime retrying ADD: exactly one copy of everything, ::6 included.
        for _ in 0..2 {
            let again = stdout_json(&call("ADD", &pod.ns, &plugin_stdin(backend, Some(&annotations), Some(&result))));
            assert_eq!(again, result);
            assert_eq!(pod.ns.snapshot(), once, "{backend}: a repeated ADD changes nothing");
        }
        assert_eq!(pod.ns.passthrough_v6(), 1);
        assert!(pod.check(Some(&annotations)).status.success(), "{backend}: CHECK after ADD");

        // CHECK names what is missing: a rule of the raw table, and the loopback address.
        let zone_rule = pod
            .ns
            .save(Fam::V4, backend)
            .lines()
            .find(|l| l.contains("-j CT --zone 2") && l.contains("--uid-owner"))
            .unwrap()
            .to_owned();
        pod.ns.restore(Fam::V4, backend, &format!("*raw\n{}\nCOMMIT\n", zone_rule.replacen("-A", "-D", 1)));
        pod.ns.exec(&["ip", "-6", "addr", "del", "::6/128", "dev", "lo"]);
        let err = String::from_utf8_lossy(&pod.check(Some(&annotations)).stderr).into_owned();
        assert!(err.contains("missing in ipv4 raw/OUTPUT: -p udp -m udp --sport 15053"), "{backend}: {err}");
        assert!(err.contains("missing address ::6/128 on lo"), "{backend}: {err}");
        // ADD repairs both.
        stdout_json(&call("ADD", &pod.ns, &plugin_stdin(backend, Some(&annotations), Some(&result))));
        assert_eq!(pod.ns.snapshot(), once, "{backend}: repaired");
        assert!(pod.ns.passthrough_v6() > 0);
        assert!(pod.check(Some(&annotations)).status.success(), "{backend}: CHECK after repair");

        // DEL removes every rule of ours in every table, and ::6; the canary stays.
        assert!(pod.del(Some(&annotations)).status.success());
        assert_eq!(
            without_empty_tables(&pod.ns.snapshot()),
            without_empty_tables(&before),
            "{backend}: DEL leaves no rule or chain of ours and every foreign one"
        );
        assert_eq!(pod.ns.passthrough_v6(), 0, "{backend}: ::6 removed by DEL");
    }
}

#[test]
fn kuma_ipv6_pass_follows_the_namespace_not_only_the_previous_result() {
    if !privileged() {
        return;
    }
    let annotations = kuma_pod(None, &[]);
    let prev_v4 = json!({"cniVersion": "1.0.0", "ips": [{"address": "198.18.0.9/24"}]});

    // Only a link-local address (a veth whose both ends are inside): Kuma counts it.
    let ns = Netns::new("tpk");
    ns.exec(&["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"]);
    ns.exec(&["ip", "link", "set", "eth0", "up"]);
    ns.exec(&["ip", "link", "set", "eth0p", "up"]);
    stdout_json(&call("ADD", &ns, &plugin_stdin("nft", Some(&annotations), Some(&prev_v4))));
    assert!(kuma_rule_count(&ns, Fam::V6, "nft") > 0, "link-local IPv6 is enough for the IPv6 pass");
    assert!(ns.passthrough_v6() > 0);
    assert!(call("CHECK", &ns, &plugin_stdin("nft", Some(&annotations), Some(&prev_v4))).status.success());
    assert!(call("DEL", &ns, &plugin_stdin("nft", Some(&annotations), None)).status.success());
    assert_eq!(ns.passthrough_v6(), 0);

    // IPv6 turned off in the namespace: IPv4 pass only, no ::6.
    let ns = Netns::new("tpk");
    ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    stdout_json(&call("ADD", &ns, &plugin_stdin("nft", Some(&annotations), Some(&prev_v4))));
    assert!(kuma_rule_count(&ns, Fam::V4, "nft") > 0);
    assert_eq!(kuma_rule_count(&ns, Fam::V6, "nft"), 0);
    assert!(call("CHECK", &ns, &plugin_stdin("nft", Some(&annotations), Some(&prev_v4))).status.success());
}

#[test]
fn kuma_bad_input_is_code_100_and_changes_nothing() {
    if !privileged() {
        return;
    }
    let (ns, before) = Netns::with_canary("tpe", "nft");
    let yaml = |y: &str| plugin_stdin("nft", Some(&kuma_pod(Some(y), &[])), None);
    let legacy = |k: &str, v: &str| plugin_stdin("nft", Some(&kuma_pod(None, &[(k, v)])), None);
    let mut two_meshes = kuma_pod(None, &[]);
    two_meshes["consul.hashicorp.com/connect-inject-status"] = json!("injected");
    two_meshes["consul.hashicorp.com/transparent-proxy-status"] = json!("enabled");
    let cases: Vec<(&str, String, &str)> = vec![
        ("bad YAML", yaml("redirect: {inbound: [}"), "is not Kuma's transparent proxy configuration"),
        ("unknown ipFamilyMode", yaml("ipFamilyMode: ipv6only\n"), "ipFamilyMode \"ipv6only\" is not one of"),
        ("unknown boolean", legacy("kuma.io/gateway", "maybe"), "\"maybe\" is not one of enabled, disabled"),
        ("port 0, DNS on", yaml("redirect:\n  dns: {enabled: true, port: 0}\n"), "redirect.dns.port is 0"),
        (
            "per-UID: protocol",
            legacy("traffic.kuma.io/exclude-outbound-ports-for-uids", "icmp:80:1000"),
            "protocol \"icmp\" is not tcp or udp",
        ),
        ("per-UID: UID list", yaml("redirect:\n  outbound: {excludePortsForUIDs: [\"tcp:80:1,2\"]}\n"), "not a list"),
        (
            "per-UID: reversed range",
            legacy("traffic.kuma.io/exclude-outbound-ports-for-uids", "udp:53:2000-1000"),
            "not a valid range",
        ),
        (
            "injected text",
            legacy("traffic.kuma.io/exclude-outbound-ips", "10.0.0.0/8\n-A OUTPUT -j ACCEPT"),
            "is not a CIDR",
        ),
        ("two meshes", plugin_stdin("nft", Some(&two_meshes), None), "injected by both meshes"),
    ];
    for (what, stdin, msg) in cases {
        let doc = error_of(&call("ADD", &ns, &stdin));
        assert_eq!(doc["code"], 100, "{what}: {doc}");
        assert!(doc["msg"].as_str().unwrap().contains(msg), "{what}: {doc}");
        assert_eq!(ns.snapshot(), before, "{what}: the namespace must be untouched");
        assert_eq!(ns.passthrough_v6(), 0, "{what}: no ::6");
    }
}

#[test]
fn a_kuma_table_failing_after_nat_committed_leaves_nothing_behind() {
    if !privileged() {
        return;
    }
    // A native nftables base chain OUTPUT in `ip raw` with a priority iptables-nft does not use:
    // the nat table of our transaction commits, then the raw table fails.
    let (ns, _) = Netns::with_canary("tpf", "nft");
    ns.exec(&["nft", "add table ip raw; add chain ip raw OUTPUT { type filter hook output priority 10; }"]);
    let before = ns.snapshot();
    let ruleset_before = ns.exec(&["nft", "list", "ruleset"]);
    let prev_v4 = json!({"cniVersion": "1.0.0", "ips": [{"address": "198.18.0.9/24"}]});
    let doc =
        error_of(&call("ADD", &ns, &plugin_stdin("nft", Some(&kuma_pod(Some(KUMA_CONFIG), &[])), Some(&prev_v4))));
    assert_eq!(doc["code"], 101, "{doc}");
    assert_eq!(ns.snapshot(), before, "no rule or chain of ours is left in any table");
    assert_eq!(ns.passthrough_v6(), 0, "the ::6 this ADD added is removed again");
    assert!(!ns.exec(&["nft", "list", "ruleset"]).contains("KUMA_MESH"), "{ruleset_before}");
}

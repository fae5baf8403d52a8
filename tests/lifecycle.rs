//! The rule set's lifecycle in a real pod namespace, on both iptables backends: ADD, repeated ADD,
//! CHECK, DEL, a namespace that is gone, bad input, and a transaction that fails half way.
//!
//! Every namespace carries a foreign "canary" (a rule in a built-in chain and a chain of its own, in
//! both families) that must survive everything we do.

mod support;

use std::process::Output;

use serde_json::{Value, json};
use support::*;

const BACKENDS: [&str; 2] = ["nft", "legacy"];

fn config(inbound: u16) -> Value {
    json!({
        "ConsulDNSIP": "127.0.0.1", "ConsulDNSPort": 8600, "ProxyUserID": "5995",
        "ProxyInboundPort": inbound, "ProxyOutboundPort": 15001,
        "ExcludeInboundPorts": ["9090"], "ExcludeOutboundPorts": ["5432"],
        "ExcludeOutboundCIDRs": ["192.0.2.0/24", "2001:db8::/32"], "ExcludeUIDs": ["5996"]
    })
}

const CANARY: &str =
    "*nat\n:CANARY - [0:0]\n-A OUTPUT -p tcp -m tcp --dport 9999 -j RETURN\n-A CANARY -j RETURN\nCOMMIT\n";

fn plant_canary(ns: &Netns, backend: &str) {
    ns.restore(Fam::V4, backend, CANARY);
    ns.restore(Fam::V6, backend, CANARY);
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
    assert!(
        out.status.success(),
        "call failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn repeated_add_leaves_exactly_one_copy() {
    if !privileged() {
        return;
    }
    for backend in BACKENDS {
        let net = Network::new(json!({"iptables_mode": backend}));
        let pod = net.pod_unstarted("web");
        plant_canary(&pod.ns, backend);
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
    if !privileged() {
        return;
    }
    for backend in BACKENDS {
        let net = Network::new(json!({"iptables_mode": backend}));
        let pod = net.pod_unstarted("web");
        plant_canary(&pod.ns, backend);
        let before = pod.ns.snapshot();
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
    if !privileged() {
        return;
    }
    for backend in BACKENDS {
        let net = Network::new(json!({"iptables_mode": backend}));
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
    if !privileged() {
        return;
    }
    for backend in BACKENDS {
        let net = Network::new(json!({"iptables_mode": backend}));
        let pod = net.pod_unstarted("web");
        plant_canary(&pod.ns, backend);
        let before = pod.ns.snapshot();
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
    if !privileged() {
        return;
    }
    let net = Network::new(json!({"iptables_mode": "nft"}));
    let cases = [
        None,
        Some(json!({"app": "web"})),
        // Injected but transparent proxy off.
        Some(json!({"consul.hashicorp.com/connect-inject-status": "injected"})),
    ];
    for annotations in cases {
        let pod = net.pod_unstarted("plain");
        plant_canary(&pod.ns, "nft");
        let before = pod.ns.snapshot();
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
    let ns = Netns::new("tpe");
    plant_canary(&ns, "nft");
    let before = ns.snapshot();
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
    let ns = Netns::new("tpf");
    plant_canary(&ns, "nft");
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

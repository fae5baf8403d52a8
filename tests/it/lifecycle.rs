//! The rule set's lifecycle in a real pod namespace, on every engine (the iptables engine with
//! iptables-nft and iptables-legacy, and the nftables engine): ADD, repeated ADD, CHECK, DEL, a
//! namespace that is gone, bad input, a transaction that fails half way, and an ADD that fails after
//! its rules were committed.
//!
//! Every namespace carries a foreign "canary" (an iptables rule in a built-in chain and a chain of
//! its own, in both families; beside the nftables engine, in iptables-nft) that must survive
//! everything we do. The nftables engine's snapshots hold every nftables table as well.

use std::process::{Command, Output};

use crate::both_engines;
use crate::support::*;
use serde_json::{Value, json};

/// The network configuration a runtime hands our plugin as the last link of the chain.
fn plugin_stdin(engine: Engine, annotations: Option<&Value>, prev_result: Option<&Value>) -> String {
    let mut conf = json!({"cniVersion": "1.0.0", "name": "lifecycle", "type": "tproxy-cni"});
    for (k, v) in engine.conf().as_object().unwrap() {
        conf[k] = v.clone();
    }
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

/// A previous result with an IPv4 address, and an IPv6 one when `ipv6`.
fn prev_result(ipv6: bool) -> Value {
    let mut ips = vec![json!({"address": "198.18.0.9/24"})];
    if ipv6 {
        ips.push(json!({"address": "fd18::9/64"}));
    }
    json!({"cniVersion": "1.0.0", "ips": ips})
}

/// The iptables backend the canary lives in: the engine's own, or iptables-nft beside the
/// nftables engine.
fn canary_backend(engine: Engine) -> &'static str {
    match engine {
        Engine::Iptables(mode) => mode,
        Engine::Nftables => "nft",
    }
}

/// A network whose tproxy-cni entry uses `engine`; `None` when the test cannot run here.
fn network(engine: Engine) -> Option<Network> {
    privileged().then(|| Network::new(engine.conf()))
}

/// A pod not ADDed yet whose namespace holds the canary, and the namespace's snapshot.
fn canary_pod<'n>(net: &'n Network, engine: Engine, name: &str) -> (Pod<'n>, String) {
    let pod = net.pod_unstarted(name);
    pod.ns.plant_canary(canary_backend(engine));
    let before = engine.snapshot(&pod.ns);
    (pod, before)
}

/// A namespace holding the canary, and its snapshot.
fn canary_ns(engine: Engine, prefix: &str) -> (Netns, String) {
    let ns = Netns::new(prefix);
    ns.plant_canary(canary_backend(engine));
    let before = engine.snapshot(&ns);
    (ns, before)
}

/// Asserts that `ns` holds exactly one copy of the rules of these annotations for a pod with
/// both families: the iptables engine's rule count, or the nftables engine's tables equal to
/// what `nft -f` makes of `render --backend nftables`.
fn assert_one_copy(engine: Engine, ns: &Netns, annotations: &Value) {
    match engine {
        Engine::Iptables(mode) => {
            assert_eq!(ns.our_rule_count(Fam::V4, mode), 18, "{engine:?}: {}", ns.save(Fam::V4, mode));
            assert_eq!(ns.our_rule_count(Fam::V6, mode), 13, "{engine:?}: {}", ns.save(Fam::V6, mode));
        }
        Engine::Nftables => assert_eq!(nft_tables(ns), nft_reference(annotations, true), "{engine:?}"),
    }
}

/// Does our `family` redirect send inbound traffic to `port`?
fn redirects_inbound_to(engine: Engine, ns: &Netns, family: Fam, port: u16) -> bool {
    match engine {
        Engine::Iptables(mode) => ns.save(family, mode).contains(&format!("--to-ports {port}")),
        Engine::Nftables => ns.nft_table(family).contains(&format!("redirect to :{port}")),
    }
}

/// What a failed call printed, both streams.
fn all_output(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout)
}

/// Does CHECK's output name `want` (in its log line, or quoted in its JSON error)?
fn names(err: &str, want: &str) -> bool {
    err.contains(want) || err.contains(&want.replace('"', "\\\""))
}

/// The handle of the rule of our `family` table's `chain` whose text contains `needle`.
fn rule_handle(ns: &Netns, family: &str, chain: &str, needle: &str) -> String {
    let listing = ns.exec(&["nft", "-a", "list", "chain", family, "tproxy-cni", chain]);
    let line = listing.lines().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle} in {listing}"));
    line.rsplit("# handle ").next().unwrap().trim().to_owned()
}

/// Damages our Consul rules as someone editing them by hand would; returns what CHECK must name.
fn tamper(engine: Engine, ns: &Netns) -> Vec<&'static str> {
    match engine {
        Engine::Iptables(mode) => {
            let proxy_return =
                "-D CONSUL_PROXY_OUTPUT -m owner --uid-owner 5995 -m comment --comment tproxy-cni -j RETURN";
            ns.restore(Fam::V4, mode, &format!("*nat\n{proxy_return}\nCOMMIT\n"));
            ns.restore(
                Fam::V4,
                mode,
                "*nat\n-D CONSUL_PROXY_OUTPUT -d 198.51.100.0/24 -m comment --comment tproxy-cni -j RETURN\nCOMMIT\n",
            );
            vec![
                "missing in ipv4 nat/CONSUL_PROXY_OUTPUT: -m owner --uid-owner 5995",
                "missing in ipv4 nat/CONSUL_PROXY_OUTPUT: -d 198.51.100.0/24",
            ]
        }
        Engine::Nftables => {
            let nft = |args: &[&str]| ns.exec(&[&["nft"], args].concat());
            let h = rule_handle(ns, "ip", "CONSUL_PROXY_OUTPUT", "meta skuid 5995");
            nft(&["delete", "rule", "ip", "tproxy-cni", "CONSUL_PROXY_OUTPUT", "handle", &h]);
            nft(&["delete", "element", "ip", "tproxy-cni", "consul_proxy_output_daddr", "{ 198.51.100.0/24 }"]);
            nft(&["add", "element", "ip", "tproxy-cni", "consul_proxy_output_dport", "{ 8443 }"]);
            nft(&["add", "rule", "ip", "tproxy-cni", "nat_output", "meta", "l4proto", "udp", "return"]);
            nft(&["add", "chain", "ip", "tproxy-cni", "STRAY"]);
            nft(&["add", "set", "ip", "tproxy-cni", "stray", "{ type ipv4_addr; }"]);
            nft(&["delete", "table", "ip6", "tproxy-cni"]);
            vec![
                "missing in ip tproxy-cni CONSUL_PROXY_OUTPUT: meta skuid 5995 counter return comment \"tproxy-cni\"",
                "missing in set ip tproxy-cni consul_proxy_output_daddr: 198.51.100.0/24",
                "unexpected in set ip tproxy-cni consul_proxy_output_dport: 8443",
                "unexpected in ip tproxy-cni nat_output: a rule tproxy-cni does not write (expressions: meta, cmp, immediate)",
                "unexpected chain ip tproxy-cni STRAY",
                "unexpected set ip tproxy-cni stray",
                "missing table ip6 tproxy-cni",
            ]
        }
    }
}

/// Adds a rule that looks like ours but that ADD never writes; returns what CHECK must name.
fn add_a_stray_rule_of_ours(engine: Engine, ns: &Netns) -> &'static str {
    match engine {
        Engine::Iptables(mode) => {
            ns.restore(Fam::V6, mode, "*nat\n-A OUTPUT -p udp -m comment --comment tproxy-cni -j RETURN\nCOMMIT\n");
            "unexpected in ipv6 nat/OUTPUT: -p udp -m comment --comment tproxy-cni -j RETURN"
        }
        Engine::Nftables => {
            ns.exec(&[
                "nft",
                "add",
                "rule",
                "ip6",
                "tproxy-cni",
                "nat_prerouting",
                "tcp",
                "dport",
                "7",
                "counter",
                "return",
                "comment",
                "\"tproxy-cni\"",
            ]);
            "unexpected in ip6 tproxy-cni nat_prerouting: tcp dport 7 counter return comment \"tproxy-cni\""
        }
    }
}

both_engines!(repeated_add_leaves_exactly_one_copy, nft, legacy);
fn repeated_add_leaves_exactly_one_copy(engine: Engine) {
    let Some(net) = network(engine) else { return };
    let (pod, _) = canary_pod(&net, engine, "web");
    let annotations = consul_pod(consul_config(20000), &[]);
    let result = stdout_json(&pod.add(Some(&annotations)));
    let once = engine.snapshot(&pod.ns);
    assert_one_copy(engine, &pod.ns, &annotations);

    // A runtime retrying ADD calls the plugin again with the same input.
    for _ in 0..2 {
        let again = stdout_json(&call("ADD", &pod.ns, &plugin_stdin(engine, Some(&annotations), Some(&result))));
        assert_eq!(again, result, "{engine:?}: the previous result passes through unchanged");
        assert_eq!(
            engine.snapshot(&pod.ns),
            once,
            "{engine:?}: a repeated ADD must leave the namespace as one ADD did"
        );
    }
    assert!(pod.check(Some(&annotations)).status.success(), "{engine:?}: CHECK after repeated ADD");
}

both_engines!(repeated_add_with_a_new_configuration_replaces_the_old_one, nft, legacy);
fn repeated_add_with_a_new_configuration_replaces_the_old_one(engine: Engine) {
    let Some(net) = network(engine) else { return };
    let (pod, before) = canary_pod(&net, engine, "web");
    let old = consul_pod(consul_config(20000), &[]);
    let result = stdout_json(&pod.add(Some(&old)));
    let new = consul_pod(consul_config(21000), &[]);
    // Without IPv6 in the previous result, the new set is IPv4 only: the IPv6 pass must go.
    let mut v4_only = result.clone();
    v4_only["ips"] = json!([result["ips"][0]]);
    stdout_json(&call("ADD", &pod.ns, &plugin_stdin(engine, Some(&new), Some(&v4_only))));
    assert!(
        redirects_inbound_to(engine, &pod.ns, Fam::V4, 21000) && !redirects_inbound_to(engine, &pod.ns, Fam::V4, 20000),
        "{engine:?}: {}",
        engine.snapshot(&pod.ns)
    );
    assert_eq!(pod.ns.our_rule_count(Fam::V6, engine.backend()), 0, "{engine:?}: IPv6 pass removed");
    assert!(call("CHECK", &pod.ns, &plugin_stdin(engine, Some(&new), Some(&v4_only))).status.success());
    assert!(
        pod.ns.save(Fam::V6, canary_backend(engine)).contains("-A OUTPUT -p tcp -m tcp --dport 9999 -j RETURN"),
        "{engine:?}: the canary stays"
    );

    assert!(pod.del(Some(&new)).status.success());
    assert_eq!(engine.snapshot(&pod.ns), before, "{engine:?}: DEL restores the namespace exactly, canary included");
}

both_engines!(check_passes_after_add_and_names_what_was_tampered_with, nft, legacy);
fn check_passes_after_add_and_names_what_was_tampered_with(engine: Engine) {
    let Some(net) = network(engine) else { return };
    let annotations = consul_pod(consul_config(20000), &[]);
    let pod = net.pod_unstarted("web");
    let result = stdout_json(&pod.add(Some(&annotations)));
    assert!(pod.check(Some(&annotations)).status.success(), "{engine:?}: CHECK right after ADD");
    if engine == Engine::Nftables {
        assert!(pod.ns.nft_table(Fam::V4).contains("set consul_proxy_output_daddr"), "the CIDRs are a set");
    }

    // A foreign rule in one of the built-in chains we hook into does not bother CHECK.
    pod.ns.restore(Fam::V4, canary_backend(engine), "*nat\n-A OUTPUT -p udp -j RETURN\nCOMMIT\n");
    assert!(pod.check(Some(&annotations)).status.success(), "{engine:?}: foreign rules are ignored");

    let wants = tamper(engine, &pod.ns);
    let out = pod.check(Some(&annotations));
    assert!(!out.status.success(), "{engine:?}: CHECK must fail once our rules are damaged");
    let err = all_output(&out);
    for want in wants {
        assert!(names(&err, want), "{engine:?}: {want:?} not named in {err}");
    }

    // Repair with ADD (as a runtime would), then add a stray rule of ours: CHECK names it.
    assert_eq!(stdout_json(&call("ADD", &pod.ns, &plugin_stdin(engine, Some(&annotations), Some(&result)))), result);
    assert!(pod.check(Some(&annotations)).status.success(), "{engine:?}: repaired by ADD");
    let want = add_a_stray_rule_of_ours(engine, &pod.ns);
    let err = all_output(&pod.check(Some(&annotations)));
    assert!(names(&err, want), "{engine:?}: {want:?} not named in {err}");
}

both_engines!(del_removes_only_ours_and_succeeds_again_when_the_namespace_is_gone, nft, legacy);
fn del_removes_only_ours_and_succeeds_again_when_the_namespace_is_gone(engine: Engine) {
    let Some(net) = network(engine) else { return };
    let (pod, before) = canary_pod(&net, engine, "web");
    let annotations = consul_pod(consul_config(20000), &[]);
    assert!(pod.add(Some(&annotations)).status.success());
    assert_ne!(engine.snapshot(&pod.ns), before);

    let stdin = plugin_stdin(engine, Some(&annotations), None);
    for _ in 0..2 {
        let out = call("DEL", &pod.ns, &stdin);
        assert!(out.status.success() && out.stdout.is_empty(), "{engine:?}: {}", text(&out));
        assert_eq!(engine.snapshot(&pod.ns), before, "{engine:?}: DEL leaves no rule of ours and every foreign one");
    }
    assert!(pod.del(Some(&annotations)).status.success(), "{engine:?}: DEL through the whole chain");

    // The runtime may call DEL after the namespace is gone, and again.
    let path = pod.ns.path();
    sh(Command::new("ip").args(["netns", "del", &pod.ns.name]));
    assert!(!path.exists());
    for _ in 0..2 {
        assert!(call("DEL", &pod.ns, &stdin).status.success(), "{engine:?}: DEL of a gone namespace succeeds");
    }
}

/// The default engine: a configuration with no `backend` key installs our nftables tables and no
/// iptables rule of ours (in either iptables), CHECK and DEL work on them; `"backend": "iptables"`
/// still chooses the iptables engine, which makes no table of ours.
#[test]
fn without_a_backend_key_the_nftables_engine_installs_and_iptables_stays_a_choice() {
    if !privileged() {
        return;
    }
    let annotations = consul_pod(consul_config(20000), &[]);
    let stdin = |engine_keys: Value| {
        let mut conf = json!({"cniVersion": "1.0.0", "name": "lifecycle", "type": "tproxy-cni",
            "runtimeConfig": {"io.kubernetes.cri.pod-annotations": annotations}, "prevResult": prev_result(true)});
        for (k, v) in engine_keys.as_object().unwrap() {
            conf[k] = v.clone();
        }
        conf.to_string()
    };
    let iptables_rules = |ns: &Netns| -> usize {
        BACKENDS.iter().map(|b| ns.our_rule_count(Fam::V4, b) + ns.our_rule_count(Fam::V6, b)).sum()
    };

    // No `backend` key: the nftables engine.
    let (ns, before) = canary_ns(Engine::Nftables, "tpd");
    let default = stdin(json!({}));
    stdout_json(&call("ADD", &ns, &default));
    let v4 = ns.exec(&["nft", "list", "table", "ip", "tproxy-cni"]);
    assert!(v4.contains("chain CONSUL_PROXY_INBOUND") && v4.contains("redirect to :20000"), "{v4}");
    assert_eq!(nft_tables(&ns), nft_reference(&annotations, true), "the default installs the nftables engine's tables");
    assert_eq!(iptables_rules(&ns), 0, "the default installs no iptables rule of ours:\n{}", ns.snapshot());
    assert!(call("CHECK", &ns, &default).status.success());
    assert!(call("DEL", &ns, &default).status.success());
    assert_eq!(nft_tables(&ns), "", "DEL removes the default engine's tables");
    assert_eq!(ns.snapshot_with_nft(), before);

    // `"backend": "iptables"`: the iptables engine, and no table of ours.
    let engine = Engine::Iptables("nft");
    let (ns, before) = canary_ns(engine, "tpi");
    let explicit = stdin(json!({"backend": "iptables"}));
    stdout_json(&call("ADD", &ns, &explicit));
    // `iptables_mode` left to `auto`: whichever iptables the node uses holds all 18 + 13 rules.
    assert_eq!(iptables_rules(&ns), 18 + 13, "{}", ns.snapshot());
    assert_eq!(nft_tables(&ns), "", "the iptables engine makes no nftables table of ours");
    assert!(call("CHECK", &ns, &explicit).status.success());
    assert!(call("DEL", &ns, &explicit).status.success());
    assert_eq!(engine.snapshot(&ns), before);
}

both_engines!(non_mesh_pod_is_byte_for_byte_untouched);
fn non_mesh_pod_is_byte_for_byte_untouched(engine: Engine) {
    let Some(net) = network(engine) else { return };
    let cases = [
        None,
        Some(json!({"app": "web"})),
        // Injected but transparent proxy off.
        Some(json!({"consul.hashicorp.com/connect-inject-status": "injected"})),
    ];
    for annotations in cases {
        let (pod, before) = canary_pod(&net, engine, "plain");
        assert!(pod.add(annotations.as_ref()).status.success());
        assert_eq!(engine.snapshot(&pod.ns), before, "{engine:?}: annotations {annotations:?}");
        assert!(pod.check(annotations.as_ref()).status.success(), "CHECK expects nothing of ours: {annotations:?}");
        assert!(pod.del(annotations.as_ref()).status.success());
        assert_eq!(engine.snapshot(&pod.ns), before, "{engine:?}");
    }
}

both_engines!(bad_input_gets_its_code_and_a_readable_message_and_changes_nothing);
fn bad_input_gets_its_code_and_a_readable_message_and_changes_nothing(engine: Engine) {
    if !privileged() {
        return;
    }
    let (ns, before) = canary_ns(engine, "tpe");
    let with_config = |c: Value| plugin_stdin(engine, Some(&consul_pod(c, &[])), None);
    // A configuration of this engine with `keys` added.
    let conf_with = |keys: Value| {
        let mut conf: Value = serde_json::from_str(&plugin_stdin(engine, None, None)).unwrap();
        for (k, v) in keys.as_object().unwrap() {
            conf[k] = v.clone();
        }
        conf.to_string()
    };
    let mut bad_port = consul_config(20000);
    bad_port["ProxyInboundPort"] = json!(65536);
    let mut bad_cidr = consul_config(20000);
    bad_cidr["ExcludeOutboundCIDRs"] = json!(["10.0.0.0/33"]);
    let mut bad_uid = consul_config(20000);
    bad_uid["ProxyUserID"] = json!("envoy");
    let mut injected = consul_config(20000);
    injected["ExcludeInboundPorts"] = json!(["22\n-A OUTPUT -j ACCEPT"]);
    let mut option_text = consul_config(20000);
    option_text["ExcludeOutboundCIDRs"] = json!(["0.0.0.0/0 -j ACCEPT"]);

    let cases: Vec<(&str, String, u64, &str)> = vec![
        ("malformed stdin", "{\"cniVersion\": \"1.0.0\",".into(), 6, "not valid JSON"),
        ("unknown cniVersion", conf_with(json!({"cniVersion": "0.2.0"})), 1, "CNI version \"0.2.0\" is not supported"),
        ("bad iptables_mode", conf_with(json!({"iptables_mode": "ebtables"})), 7, "iptables_mode"),
        ("bad backend", conf_with(json!({"backend": "ebpf"})), 7, "backend \"ebpf\" is not one of iptables, nftables"),
        ("port out of range", with_config(bad_port), 100, "ProxyInboundPort \"65536\" is out of range"),
        ("bad CIDR", with_config(bad_cidr), 100, "ExcludeOutboundCIDRs entry \"10.0.0.0/33\" is not a CIDR"),
        ("non-numeric UID", with_config(bad_uid), 100, "ProxyUserID \"envoy\" is not a number"),
        ("newline and option text", with_config(injected), 100, r#""22\n-A OUTPUT -j ACCEPT" is not a number"#),
        ("option text in a CIDR", with_config(option_text), 100, "is not a CIDR"),
    ];
    for (what, stdin, code, msg) in cases {
        let doc = error_of(&call("ADD", &ns, &stdin));
        assert_eq!(doc["code"], code, "{engine:?} {what}: {doc}");
        assert!(doc["msg"].as_str().unwrap().contains(msg), "{engine:?} {what}: {doc}");
        assert_eq!(engine.snapshot(&ns), before, "{engine:?} {what}: the namespace must be untouched");
    }

    // Missing environment.
    let stdin = with_config(consul_config(20000));
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
    assert_eq!(engine.snapshot(&ns), before, "{engine:?}: missing environment: the namespace must be untouched");
}

/// What makes the IPv6 part of an ADD fail after its IPv4 part was accepted: for the iptables
/// engine, native nftables rules in `ip6 nat` in a chain with one of our names, which
/// ip6tables-nft cannot parse (the IPv4 transaction has been committed by then); for the
/// nftables engine, a table of our name in the IPv6 family owned by another program (the kernel
/// refuses the whole batch).
enum Fault {
    NativeChain,
    Owned(OwnedTable),
}

impl Fault {
    fn plant(engine: Engine, ns: &Netns) -> Fault {
        match engine {
            Engine::Iptables(_) => {
                ns.exec(&[
                    "nft",
                    "add table ip6 nat; add chain ip6 nat CONSUL_PROXY_INBOUND; \
                     add rule ip6 nat CONSUL_PROXY_INBOUND meta mark set 0x1 counter",
                ]);
                Fault::NativeChain
            }
            Engine::Nftables => Fault::Owned(OwnedTable::hold(ns)),
        }
    }

    /// What the error must say.
    fn says(&self) -> &'static [&'static str] {
        match self {
            Fault::NativeChain => &["ip6tables-nft-"],
            Fault::Owned(_) => &["ip6 tproxy-cni", "Operation not permitted"],
        }
    }

    /// Takes the fault away again.
    fn clear(self, ns: &Netns) {
        match self {
            Fault::NativeChain => {
                ns.exec(&[
                    "nft",
                    "flush chain ip6 nat CONSUL_PROXY_INBOUND; delete chain ip6 nat CONSUL_PROXY_INBOUND",
                ]);
            }
            Fault::Owned(owner) => {
                drop(owner);
                // The kernel removes an owned table with its owner's socket.
                wait_for(std::time::Duration::from_secs(5), "the owner's table to go", || {
                    ns.nft_table(Fam::V6).is_empty()
                });
            }
        }
    }
}

/// What a failed transaction must leave as it was. For the iptables engine, the IPv4 rules and
/// the native `ip6 nat` table (ip6tables-nft-save cannot list a table it cannot parse, and
/// iptables-nft may leave an empty built-in base chain it created behind, which iptables shows
/// always); for the nftables engine, its whole snapshot.
fn transaction_state(engine: Engine, ns: &Netns) -> String {
    match engine {
        Engine::Iptables(mode) => ns.save(Fam::V4, mode) + &ns.exec(&["nft", "list", "table", "ip6", "nat"]),
        Engine::Nftables => engine.snapshot(ns),
    }
}

both_engines!(a_failed_transaction_leaves_the_namespace_as_it_was);
fn a_failed_transaction_leaves_the_namespace_as_it_was(engine: Engine) {
    if !privileged() {
        return;
    }
    let first = consul_pod(consul_config(21000), &[]);
    // Into a namespace with nothing of ours, and over an IPv4-only copy of another configuration.
    for earlier in [None, Some(&first)] {
        let (ns, _) = canary_ns(engine, "tpf");
        if let Some(first) = earlier {
            stdout_json(&call("ADD", &ns, &plugin_stdin(engine, Some(first), Some(&prev_result(false)))));
        }
        let fault = Fault::plant(engine, &ns);
        let before = transaction_state(engine, &ns);
        let out = call(
            "ADD",
            &ns,
            &plugin_stdin(engine, Some(&consul_pod(consul_config(20000), &[])), Some(&prev_result(true))),
        );
        let doc = error_of(&out);
        assert_eq!(doc["code"], 101, "{engine:?}: {doc}");
        for s in fault.says() {
            assert!(doc["msg"].as_str().unwrap().contains(s), "{engine:?}: {s:?} in {doc}");
        }
        assert_eq!(transaction_state(engine, &ns), before, "{engine:?} over {earlier:?}: nothing changed");
        fault.clear(&ns);
        if let Some(first) = earlier {
            let check = call("CHECK", &ns, &plugin_stdin(engine, Some(first), Some(&prev_result(false))));
            assert!(check.status.success(), "{engine:?}: the first copy is intact: {}", text(&check));
        }
    }
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

/// Kuma's rules of ours in one family, whichever the engine.
fn kuma_rules(engine: Engine, ns: &Netns, family: Fam) -> usize {
    match engine {
        Engine::Iptables(mode) => kuma_rule_count(ns, family, mode),
        Engine::Nftables => ns.our_rule_count(family, "nftables"),
    }
}

/// A snapshot to compare once our rules are gone: the iptables engine may leave empty tables
/// behind (see [`without_empty_tables`]); the nftables engine leaves nothing.
fn after_removal(engine: Engine, snapshot: &str) -> String {
    match engine {
        Engine::Iptables(_) => without_empty_tables(snapshot),
        Engine::Nftables => snapshot.to_owned(),
    }
}

/// Asserts that `ns` holds exactly one copy of Kuma's rules for a pod with both families.
fn assert_one_kuma_copy(engine: Engine, ns: &Netns, annotations: &Value) {
    match engine {
        Engine::Iptables(mode) => {
            for fam in [Fam::V4, Fam::V6] {
                let saved = ns.save(fam, mode);
                for table in ["*nat", "*raw", "*mangle"] {
                    assert!(saved.contains(table), "{engine:?} {fam:?}: {table} missing:\n{saved}");
                }
                assert_eq!(kuma_rule_count(ns, fam, mode), 20, "{engine:?} {fam:?}:\n{saved}");
            }
        }
        Engine::Nftables => assert_eq!(nft_tables(ns), nft_reference(annotations, true), "{engine:?}"),
    }
}

/// Removes the rule that puts the DNS proxy's answers in conntrack zone 2; returns what CHECK
/// must name.
fn remove_the_zone_rule_of_dns_answers(engine: Engine, ns: &Netns) -> &'static str {
    match engine {
        Engine::Iptables(mode) => {
            let zone_rule = ns
                .save(Fam::V4, mode)
                .lines()
                .find(|l| l.contains("-j CT --zone 2") && l.contains("--uid-owner"))
                .unwrap()
                .to_owned();
            ns.restore(Fam::V4, mode, &format!("*raw\n{}\nCOMMIT\n", zone_rule.replacen("-A", "-D", 1)));
            "missing in ipv4 raw/OUTPUT: -p udp -m udp --sport 15053"
        }
        Engine::Nftables => {
            let h = rule_handle(ns, "ip", "raw_output", "udp sport 15053");
            ns.exec(&["nft", "delete", "rule", "ip", "tproxy-cni", "raw_output", "handle", &h]);
            "missing in ip tproxy-cni raw_output: udp sport 15053 meta skuid"
        }
    }
}

both_engines!(kuma_repeated_add_check_and_del, nft, legacy);
fn kuma_repeated_add_check_and_del(engine: Engine) {
    let Some(net) = network(engine) else { return };
    let annotations = kuma_pod(Some(KUMA_CONFIG), &[]);
    let (pod, before) = canary_pod(&net, engine, "kuma");
    let result = stdout_json(&pod.add(Some(&annotations)));
    let once = engine.snapshot(&pod.ns);
    assert_one_kuma_copy(engine, &pod.ns, &annotations);
    assert!(pod.ns.passthrough_v6() > 0, "{engine:?}: ::6 on lo");

    // A runtime retrying ADD: exactly one copy of everything, ::6 included.
    for _ in 0..2 {
        let again = stdout_json(&call("ADD", &pod.ns, &plugin_stdin(engine, Some(&annotations), Some(&result))));
        assert_eq!(again, result);
        assert_eq!(engine.snapshot(&pod.ns), once, "{engine:?}: a repeated ADD changes nothing");
    }
    assert_eq!(pod.ns.passthrough_v6(), 1);
    assert!(pod.check(Some(&annotations)).status.success(), "{engine:?}: CHECK after ADD");

    // CHECK names what is missing: a rule of the raw table, and the loopback address.
    let want = remove_the_zone_rule_of_dns_answers(engine, &pod.ns);
    pod.ns.exec(&["ip", "-6", "addr", "del", "::6/128", "dev", "lo"]);
    let err = all_output(&pod.check(Some(&annotations)));
    assert!(names(&err, want), "{engine:?}: {want:?} not named in {err}");
    assert!(err.contains("missing address ::6/128 on lo"), "{engine:?}: {err}");
    // ADD repairs both.
    stdout_json(&call("ADD", &pod.ns, &plugin_stdin(engine, Some(&annotations), Some(&result))));
    assert_eq!(engine.snapshot(&pod.ns), once, "{engine:?}: repaired");
    assert!(pod.ns.passthrough_v6() > 0);
    assert!(pod.check(Some(&annotations)).status.success(), "{engine:?}: CHECK after repair");

    // DEL removes every rule of ours in every table, and ::6; the canary stays.
    assert!(pod.del(Some(&annotations)).status.success());
    assert_eq!(
        after_removal(engine, &engine.snapshot(&pod.ns)),
        after_removal(engine, &before),
        "{engine:?}: DEL leaves no rule or chain of ours and every foreign one"
    );
    assert_eq!(pod.ns.passthrough_v6(), 0, "{engine:?}: ::6 removed by DEL");
}

both_engines!(kuma_ipv6_pass_follows_the_namespace_not_only_the_previous_result);
fn kuma_ipv6_pass_follows_the_namespace_not_only_the_previous_result(engine: Engine) {
    if !privileged() {
        return;
    }
    let annotations = kuma_pod(None, &[]);
    let prev_v4 = prev_result(false);
    let stdin = |prev: Option<&Value>| plugin_stdin(engine, Some(&annotations), prev);

    // Only a link-local address (a veth whose both ends are inside): Kuma counts it.
    let ns = Netns::new("tpk");
    ns.exec(&["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"]);
    ns.exec(&["ip", "link", "set", "eth0", "up"]);
    ns.exec(&["ip", "link", "set", "eth0p", "up"]);
    stdout_json(&call("ADD", &ns, &stdin(Some(&prev_v4))));
    assert!(kuma_rules(engine, &ns, Fam::V6) > 0, "{engine:?}: link-local IPv6 is enough for the IPv6 pass");
    assert!(ns.passthrough_v6() > 0);
    assert!(call("CHECK", &ns, &stdin(Some(&prev_v4))).status.success());
    assert!(call("DEL", &ns, &stdin(None)).status.success());
    assert_eq!(ns.passthrough_v6(), 0);
    assert_eq!(kuma_rules(engine, &ns, Fam::V4) + kuma_rules(engine, &ns, Fam::V6), 0);

    // IPv6 turned off in the namespace: IPv4 pass only, no ::6.
    let ns = Netns::new("tpk");
    ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    stdout_json(&call("ADD", &ns, &stdin(Some(&prev_v4))));
    assert!(kuma_rules(engine, &ns, Fam::V4) > 0);
    assert_eq!(kuma_rules(engine, &ns, Fam::V6), 0, "{engine:?}");
    assert!(call("CHECK", &ns, &stdin(Some(&prev_v4))).status.success());
}

both_engines!(kuma_bad_input_is_code_100_and_changes_nothing);
fn kuma_bad_input_is_code_100_and_changes_nothing(engine: Engine) {
    if !privileged() {
        return;
    }
    let (ns, before) = canary_ns(engine, "tpe");
    let yaml = |y: &str| plugin_stdin(engine, Some(&kuma_pod(Some(y), &[])), None);
    let legacy = |k: &str, v: &str| plugin_stdin(engine, Some(&kuma_pod(None, &[(k, v)])), None);
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
        ("two meshes", plugin_stdin(engine, Some(&two_meshes), None), "injected by both meshes"),
    ];
    for (what, stdin, msg) in cases {
        let doc = error_of(&call("ADD", &ns, &stdin));
        assert_eq!(doc["code"], 100, "{engine:?} {what}: {doc}");
        assert!(doc["msg"].as_str().unwrap().contains(msg), "{engine:?} {what}: {doc}");
        assert_eq!(engine.snapshot(&ns), before, "{engine:?} {what}: the namespace must be untouched");
        assert_eq!(ns.passthrough_v6(), 0, "{engine:?} {what}: no ::6");
    }
}

both_engines!(a_kuma_add_failing_after_its_rules_were_committed_leaves_the_namespace_as_it_was, nft, legacy);
fn a_kuma_add_failing_after_its_rules_were_committed_leaves_the_namespace_as_it_was(engine: Engine) {
    if !privileged() {
        return;
    }
    let annotations = kuma_pod(Some(KUMA_CONFIG), &[]);
    let stdin = |ipv6: bool| plugin_stdin(engine, Some(&annotations), Some(&prev_result(ipv6)));
    let (ns, fresh) = canary_ns(engine, "tpk");
    // The loopback refuses IPv6 addresses: Kuma's `::6`, added once the rules are in, cannot be.
    ns.exec(&["sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=1"]);

    // The first ADD into the namespace: what it committed is removed again.
    let doc = error_of(&call("ADD", &ns, &stdin(true)));
    let msg = doc["msg"].as_str().unwrap().to_owned();
    assert_eq!(doc["code"], 102, "{engine:?}: {doc}");
    assert!(msg.contains("cannot add an address to lo") && msg.contains("Permission denied"), "{engine:?}: {doc}");
    assert_eq!(after_removal(engine, &engine.snapshot(&ns)), after_removal(engine, &fresh), "{engine:?}");

    // An IPv4-only pod needs no `::6`: its ADD succeeds.
    stdout_json(&call("ADD", &ns, &stdin(false)));
    let first = engine.snapshot(&ns);
    assert!(kuma_rules(engine, &ns, Fam::V4) > 0 && kuma_rules(engine, &ns, Fam::V6) == 0, "{engine:?}: {first}");

    // A repeated ADD that now has IPv6: its rules replace the first copy, then `::6` fails. The
    // first copy is put back, exactly.
    let doc = error_of(&call("ADD", &ns, &stdin(true)));
    assert_eq!(doc["msg"].as_str().unwrap(), msg, "{engine:?}: the same failure");
    assert_eq!(
        after_removal(engine, &engine.snapshot(&ns)),
        after_removal(engine, &first),
        "{engine:?}: the namespace holds exactly the first copy"
    );
    assert_eq!(ns.passthrough_v6(), 0);
    let check = call("CHECK", &ns, &stdin(false));
    assert!(check.status.success(), "{engine:?}: CHECK of the first configuration: {}", text(&check));
}

/// iptables-nft only: a native nftables chain in `ip raw` breaks iptables-nft's raw transaction
/// after the nat one committed. (The nftables engine commits all its tables in one batch, which
/// the kernel takes whole or not at all; its failure after the commit is Kuma's `::6`, above.)
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
    let doc = error_of(&call(
        "ADD",
        &ns,
        &plugin_stdin(Engine::Iptables("nft"), Some(&kuma_pod(Some(KUMA_CONFIG), &[])), Some(&prev_v4)),
    ));
    assert_eq!(doc["code"], 101, "{doc}");
    assert_eq!(ns.snapshot(), before, "no rule or chain of ours is left in any table");
    assert_eq!(ns.passthrough_v6(), 0, "the ::6 this ADD added is removed again");
    assert!(!ns.exec(&["nft", "list", "ruleset"]).contains("KUMA_MESH"), "{ruleset_before}");
}

//! The nftables engine's own promises, in real pod namespaces: ADD / CHECK / DEL with no
//! `iptables` and no `nft` program anywhere the plugin could find one; foreign nftables tables
//! and foreign iptables-nft rules that survive everything byte for byte; what `nft -f` makes of
//! `render --backend nftables` is what the engine installs; the kernel probed once per boot.
//!
//! (The traffic itself — every verdict of Consul's and Kuma's layouts — is tested on both engines
//! by `consul_traffic.rs` and `kuma_traffic.rs`; the lifecycle both engines share — repeated ADD,
//! CHECK naming every missing or unexpected element, DEL, a refused batch changing nothing, an
//! ADD failing after its batch committed — by `lifecycle.rs`; ADDs killed mid-flight leaving the
//! old tables or the new ones by `crash.rs`, random lifecycles with tampering by
//! `lifecycle_random.rs`, each on every engine.)

use std::io::Write;
use std::process::{Command, Output, Stdio};

use crate::support::*;
use serde_json::{Value, json};

/// Foreign things that must survive: an nftables table of another program (with a set, a base
/// chain and a rule), a table with our name in a family we never use, and an iptables-nft rule
/// and chain in the nat table our base chains share hooks with.
fn plant_foreigners(ns: &Netns) {
    let script = "table inet foreign {\n\
        \tset blocked { type ipv4_addr; flags interval; elements = { 203.0.113.0/24 }; }\n\
        \tchain out {\n\
        \t\ttype filter hook output priority 0; policy accept;\n\
        \t\tip daddr @blocked counter drop comment \"theirs\"\n\
        \t}\n\
        }\n\
        table inet tproxy-cni {\n\
        \tchain c {\n\
        \t\tcomment \"not ours: another family\"\n\
        \t}\n\
        }\n";
    harden::nft_in(ns, &["-f", "-"], Some(script));
    let canary = "*nat\n:CANARY - [0:0]\n-A OUTPUT -p tcp -m tcp --dport 9999 -j RETURN\n-A CANARY -j RETURN\nCOMMIT\n";
    ns.restore(Fam::V4, "nft", canary);
    ns.restore(Fam::V6, "nft", canary);
}

/// The foreign objects exactly, handles included (a table deleted and made again would differ).
fn foreigners(ns: &Netns) -> String {
    let mut s = harden::nft_in(ns, &["-a", "list", "table", "inet", "foreign"], None);
    s += &harden::nft_in(ns, &["-a", "list", "table", "inet", "tproxy-cni"], None);
    s + &ns.save(Fam::V4, "nft") + &ns.save(Fam::V6, "nft")
}

fn plugin_stdin(annotations: &Value, prev_result: Option<&Value>) -> String {
    let mut conf = json!({
        "cniVersion": "1.0.0", "name": "nftables", "type": "tproxy-cni", "backend": "nftables",
        "runtimeConfig": {"io.kubernetes.cri.pod-annotations": annotations},
    });
    if let Some(p) = prev_result {
        conf["prevResult"] = p.clone();
    }
    conf.to_string()
}

fn env(command: &str, ns: &Netns) -> Vec<(String, String)> {
    [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "nftables0"),
        ("CNI_NETNS", ns.path().to_str().unwrap()),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/usr/lib/cni"),
        ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=nftables"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn call(command: &str, ns: &Netns, stdin: &str) -> Output {
    let env = env(command, ns);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    call_plugin(&env, stdin)
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "call failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The previous result of a bridge plugin that gave the pod both families.
fn prev_result(ipv6: bool) -> Value {
    let mut ips = vec![json!({"address": "198.18.0.9/24"})];
    if ipv6 {
        ips.push(json!({"address": "fd18::9/64"}));
    }
    json!({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}], "ips": ips})
}

#[test]
fn add_check_del_need_no_iptables_and_no_nft_program() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("tpn");
    let annotations = consul_pod(consul_config(20000), &[]);
    let prev = prev_result(true);
    // A mount namespace of the plugin's own in which every directory that holds iptables or nft
    // programs is an empty tmpfs, and PATH names an empty directory: if the plugin started any
    // such program, it would fail.
    let run = |command: &str| -> Output {
        let hidden = ["/usr/sbin", "/usr/local/sbin", "/usr/local/bin"];
        let mut script = String::from("set -e\n");
        for d in hidden {
            script += &format!("/usr/bin/mount -t tmpfs -o size=1m none {d}\n");
        }
        // Proof, from inside, that nothing of the kind is reachable any more.
        script += "for t in nft iptables iptables-restore iptables-nft-restore ip6tables-restore xtables-nft-multi; do\n\
                   \tif command -v $t >/dev/null 2>&1 || [ -e /usr/sbin/$t ] || [ -e /sbin/$t ]; then echo \"$t is reachable\" >&2; exit 99; fi\n\
                   done\n";
        script += "exec \"$@\"\n";
        let mut cmd = Command::new("/usr/bin/unshare");
        cmd.args(["--mount", "--propagation", "private", "/bin/sh", "-c", &script, "sh", plugin().to_str().unwrap()])
            .env_clear()
            .env("PATH", "/nonexistent-empty")
            .envs(env(command, &ns))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        child.stdin.take().unwrap().write_all(plugin_stdin(&annotations, Some(&prev)).as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    assert!(!ns.nft_table(Fam::V4).contains("tproxy-cni"));
    let added: Value = serde_json::from_str(&ok(&run("ADD"))).unwrap();
    assert_eq!(added, prev, "the previous result passes through");
    assert!(ns.nft_table(Fam::V4).contains("redirect to :15001"), "{}", ns.nft_ruleset());
    assert!(ns.nft_table(Fam::V6).contains("redirect to :15001"), "{}", ns.nft_ruleset());
    ok(&run("CHECK"));
    ok(&run("DEL"));
    assert!(ns.nft_table(Fam::V4).is_empty() && ns.nft_table(Fam::V6).is_empty(), "{}", ns.nft_ruleset());

    // The same call with the iptables engine cannot work there: the hiding is real.
    let mut iptables = plugin_stdin(&annotations, Some(&prev));
    iptables = iptables.replace("\"backend\":\"nftables\"", "\"backend\":\"iptables\",\"iptables_mode\":\"nft\"");
    assert!(iptables.contains("iptables_mode"));
    let mut cmd = Command::new("/usr/bin/unshare");
    let script = "/usr/bin/mount -t tmpfs none /usr/sbin && exec \"$@\"";
    cmd.args(["--mount", "--propagation", "private", "/bin/sh", "-c", script, "sh", plugin().to_str().unwrap()])
        .env_clear()
        .envs(env("ADD", &ns))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child.stdin.take().unwrap().write_all(iptables.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("not found"), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn foreign_tables_and_iptables_rules_survive_add_check_del_byte_for_byte() {
    if !privileged() {
        return;
    }
    let net = Network::new(Engine::Nftables.conf());
    let pod = net.pod_unstarted("web");
    plant_foreigners(&pod.ns);
    let before = pod.ns.snapshot_with_nft();
    let theirs = foreigners(&pod.ns);
    let annotations = consul_pod(consul_config(20000), &[]);
    let result: Value = serde_json::from_str(&ok(&pod.add(Some(&annotations)))).unwrap();
    let once = pod.ns.snapshot_with_nft();
    assert_ne!(once, before);
    assert_eq!(foreigners(&pod.ns), theirs, "ADD leaves every foreign object as it was");

    // A runtime retrying ADD: exactly one copy, nothing foreign touched.
    for _ in 0..2 {
        let again: Value =
            serde_json::from_str(&ok(&call("ADD", &pod.ns, &plugin_stdin(&annotations, Some(&result))))).unwrap();
        assert_eq!(again, result);
        assert_eq!(pod.ns.snapshot_with_nft(), once, "a repeated ADD leaves the namespace as one ADD did");
    }
    ok(&pod.check(Some(&annotations)));
    assert_eq!(foreigners(&pod.ns), theirs, "CHECK leaves every foreign object as it was");

    for _ in 0..2 {
        let out = call("DEL", &pod.ns, &plugin_stdin(&annotations, None));
        assert!(out.status.success() && out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
        assert_eq!(pod.ns.snapshot_with_nft(), before, "DEL removes our tables and nothing else");
        assert_eq!(foreigners(&pod.ns), theirs, "DEL leaves every foreign object as it was");
    }
}

#[test]
fn a_copy_edited_by_hand_is_removed_not_restored_when_add_fails_after_its_batch() {
    if !privileged() {
        return;
    }
    // (A copy the engine wrote is put back exactly: lifecycle.rs, on both engines.)
    let ns = Netns::new("tpn");
    let annotations = kuma_pod(None, &[]);
    ok(&call("ADD", &ns, &plugin_stdin(&annotations, Some(&prev_result(false)))));
    // Someone adds a rule to our table that the engine does not write: that copy cannot be
    // written back as it was.
    harden::nft_in(&ns, &["add", "rule", "ip", "tproxy-cni", "nat_output", "meta", "l4proto", "udp", "return"], None);
    // A repeated ADD with IPv6 whose `::6` fails (the loopback refuses IPv6 addresses) after its
    // batch replaced that copy.
    ns.exec(&["sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=1"]);
    let out = call("ADD", &ns, &plugin_stdin(&annotations, Some(&prev_result(true))));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "the previous copy of our nftables tables cannot be restored (it held a rule in ip tproxy-cni \
             nat_output that tproxy-cni does not write): removing ours"
        ),
        "{err}"
    );
    assert!(ns.nft_table(Fam::V4).is_empty() && ns.nft_table(Fam::V6).is_empty(), "{}", ns.nft_ruleset());
    assert_eq!(ns.passthrough_v6(), 0);
}

#[test]
fn nft_makes_of_the_rendered_script_what_the_engine_installs() {
    if !privileged() {
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut cases: Vec<std::path::PathBuf> = ["consul", "kuma"]
        .iter()
        .flat_map(|mesh| std::fs::read_dir(dir.join(mesh)).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 8);
    for path in cases {
        let golden = path.display();
        let case: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        if std::fs::read_to_string(path.with_extension("rules")).unwrap().is_empty() {
            continue; // a pod in no mesh: nothing to install
        }
        let annotations = &case["annotations"];
        let by_engine = Netns::new("tpn");
        ok(&call("ADD", &by_engine, &plugin_stdin(annotations, Some(&prev_result(true)))));

        let mut render = Command::new(plugin());
        render
            .args(["render", "--backend", "nftables", "--pod-ipv6", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = render.spawn().unwrap();
        child.stdin.take().unwrap().write_all(annotations.to_string().as_bytes()).unwrap();
        let script = ok(&child.wait_with_output().unwrap());
        let by_nft = Netns::new("tpn");
        harden::nft_in(&by_nft, &["-f", "-"], Some(&script));
        // Kuma's IPv6 pass also needs ::6 on lo, which the engine's ADD added besides the rules.
        by_nft.exec(&["ip", "-6", "addr", "add", "::6/128", "dev", "lo"]);
        assert_eq!(by_engine.nft_ruleset(), by_nft.nft_ruleset(), "{golden}: the engine and nft -f differ");
        // And CHECK accepts what nft made of the script.
        ok(&call("CHECK", &by_nft, &plugin_stdin(annotations, Some(&prev_result(true)))));
    }
}

#[test]
fn status_probes_the_kernel_once_per_boot_and_reports_ready() {
    if !privileged() {
        return;
    }
    let cache = std::path::Path::new("/run/tproxy-cni/nftables-features");
    let _ = std::fs::remove_file(cache);
    let stdin = r#"{"cniVersion":"1.1.0","name":"nftables","type":"tproxy-cni","backend":"nftables"}"#;
    let out = call_plugin(&[("CNI_COMMAND", "STATUS")], stdin);
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // Every feature is there on this kernel: remembered with this boot's id.
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(std::fs::read_to_string(cache).unwrap().trim(), boot.trim());
    // A bad backend name is a configuration error (code 7), for every command.
    let bad = r#"{"cniVersion":"1.1.0","name":"nftables","type":"tproxy-cni","backend":"ebpf"}"#;
    let out = call_plugin(&[("CNI_COMMAND", "STATUS")], bad);
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["code"], 7, "{doc}");
    assert!(doc["msg"].as_str().unwrap().contains("backend \"ebpf\" is not one of iptables, nftables"), "{doc}");
}

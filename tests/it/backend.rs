//! Backend choice and locking, observed from outside: which iptables the plugin writes to in
//! `auto` mode, and that the legacy backend does not queue behind the node-wide xtables lock.

use std::fs;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::*;
use serde_json::json;

fn annotations() -> serde_json::Value {
    consul_pod(json!({"ProxyUserID": "5995", "ProxyInboundPort": 20000}), &[])
}

fn stdin(mode: &str) -> String {
    json!({
        "cniVersion": "1.0.0", "name": "backend", "type": "tproxy-cni", "backend": "iptables", "iptables_mode": mode,
        "runtimeConfig": {"io.kubernetes.cri.pod-annotations": annotations()},
    })
    .to_string()
}

/// Runs an ADD for `pod` with the plugin's own network namespace being `host` (a stand-in for the
/// node) and a private, empty `/run/tproxy-cni`; returns the backend it cached, if any.
fn add_from_simulated_host(host: &Netns, pod: &Netns) -> Option<String> {
    let dir = TempDir::new("backend");
    let input = dir.path().join("stdin.json");
    fs::write(&input, stdin("auto")).unwrap();
    let script = format!(
        "set -e; mkdir -p /run/tproxy-cni; mount -t tmpfs none /run/tproxy-cni; \
         CNI_COMMAND=ADD CNI_CONTAINERID=c1 CNI_IFNAME=eth0 CNI_NETNS={pod} ip netns exec {host} {plugin} < {input} > /dev/null; \
         cat /run/tproxy-cni/iptables-backend 2>/dev/null || true",
        pod = pod.path().display(),
        host = host.name,
        plugin = plugin().display(),
        input = input.display(),
    );
    let out =
        Command::new("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &script]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cached = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (!cached.is_empty()).then_some(cached)
}

#[test]
fn auto_mode_follows_kubelets_hint_on_the_node() {
    if !privileged() {
        return;
    }
    let hint = "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n";
    for backend in ["legacy", "nft"] {
        let host = Netns::new("tph");
        host.restore(Fam::V4, backend, hint);
        let pod = Netns::new("tpp");
        assert_eq!(add_from_simulated_host(&host, &pod).as_deref(), Some(backend), "the hint is remembered");
        let other = if backend == "nft" { "legacy" } else { "nft" };
        assert!(pod.our_rule_count(Fam::V4, backend) > 0, "rules must be in the {backend} tables");
        assert_eq!(pod.our_rule_count(Fam::V4, other), 0, "and none in the {other} tables");
    }
    // No hint at all: nft, and no backend remembered until reboot (a hint may appear once kubelet
    // starts; see the next test).
    let host = Netns::new("tph");
    let pod = Netns::new("tpp");
    assert_eq!(add_from_simulated_host(&host, &pod), None);
    assert!(pod.our_rule_count(Fam::V4, "nft") > 0);
    assert_eq!(pod.our_rule_count(Fam::V4, "legacy"), 0);
}

#[test]
fn a_missing_hint_is_trusted_for_a_minute_then_the_host_is_probed_again() {
    if !privileged() {
        return;
    }
    // One private /run/tproxy-cni for three ADDs from a simulated node without kubelet's hint:
    // the first probes and notes the absence; kubelet then starts (a legacy hint appears) — the
    // second ADD, within the minute, trusts the note and spawns no probe; once the note is older
    // than a minute, the third probes again and follows the hint.
    let host = Netns::new("tph");
    let pods = [Netns::new("tpp"), Netns::new("tpp"), Netns::new("tpp")];
    let dir = TempDir::new("backend");
    let input = dir.path().join("stdin.json");
    fs::write(&input, stdin("auto")).unwrap();
    let hint = dir.path().join("hint");
    fs::write(&hint, "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n").unwrap();
    let add = |pod: &Netns| {
        format!(
            "CNI_COMMAND=ADD CNI_CONTAINERID=c1 CNI_IFNAME=eth0 CNI_NETNS={pod} ip netns exec {host} {plugin} < {input} > /dev/null",
            pod = pod.path().display(),
            host = host.name,
            plugin = plugin().display(),
            input = input.display(),
        )
    };
    let script = format!(
        "set -e; mkdir -p /run/tproxy-cni; mount -t tmpfs none /run/tproxy-cni; \
         {first}; test -f /run/tproxy-cni/iptables-backend.no-hint; test ! -e /run/tproxy-cni/iptables-backend; \
         ip netns exec {host} iptables-legacy-restore --wait 10 --noflush < {hint}; \
         {second}; touch -d '2 minutes ago' /run/tproxy-cni/iptables-backend.no-hint; \
         {third}; cat /run/tproxy-cni/iptables-backend",
        first = add(&pods[0]),
        second = add(&pods[1]),
        third = add(&pods[2]),
        host = host.name,
        hint = hint.display(),
    );
    let out =
        Command::new("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &script]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "legacy", "the hint found by the third ADD is kept");
    for (pod, backend) in pods.iter().zip(["nft", "nft", "legacy"]) {
        let other = if backend == "nft" { "legacy" } else { "nft" };
        assert!(pod.our_rule_count(Fam::V4, backend) > 0, "rules must be in the {backend} tables");
        assert_eq!(pod.our_rule_count(Fam::V4, other), 0, "and none in the {other} tables");
    }
}

#[test]
fn legacy_pods_do_not_wait_for_the_node_wide_xtables_lock() {
    if !privileged() {
        return;
    }
    // Someone (kube-proxy, say) holds the node-wide lock for longer than our restore would wait.
    let global = fs::OpenOptions::new().create(true).truncate(false).write(true).open("/run/xtables.lock").unwrap();
    // Safety: flock on a descriptor we own; released when `global` is dropped at the end.
    assert_eq!(
        unsafe { libc::flock(global.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0,
        "another process holds /run/xtables.lock"
    );
    let pod = Netns::new("tpl");
    let netns = pod.path();
    let env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", netns.to_str().unwrap()),
    ];
    let started = Instant::now();
    let out = call_plugin(&env, &stdin("legacy"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "ADD waited {:?} on a lock it should not share",
        started.elapsed()
    );
    assert!(pod.our_rule_count(Fam::V4, "legacy") > 0);
    drop(global);

    let del = [
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", netns.to_str().unwrap()),
    ];
    assert!(call_plugin(&del, &stdin("legacy")).status.success());
    assert_eq!(pod.our_rule_count(Fam::V4, "legacy"), 0);
}

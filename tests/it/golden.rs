//! Golden tests of the rendered rules: `tproxy-cni render` on representative pods, compared with
//! the reviewed transactions in `tests/golden/` (`.rules`: the iptables engine's restore input;
//! `.nft`: the nftables engine's rule set as an `nft -f` script). Run with `UPDATE_GOLDEN=1` to
//! rewrite them after a deliberate change, then review the diff.
//!
//! A second test loads every golden transaction into a throwaway namespace with both iptables
//! backends and checks the kernel reports each rule back in exactly the spelling we render: that is
//! what lets CHECK compare rules as text.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::*;

fn cases() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut cases: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .flat_map(|mesh| fs::read_dir(mesh.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 8, "golden cases missing from {}", dir.display());
    cases
}

/// Runs `tproxy-cni render` for a case file and returns stdout.
fn render(case: &Path) -> String {
    render_for(case, "iptables")
}

/// Runs `tproxy-cni render --backend BACKEND` for a case file and returns stdout.
fn render_for(case: &Path, backend: &str) -> String {
    let doc: serde_json::Value = serde_json::from_str(&fs::read_to_string(case).unwrap()).unwrap();
    render_annotations_for(&doc["annotations"], doc["pod_ipv6"].as_bool().unwrap(), backend)
        .unwrap_or_else(|e| panic!("render {}: {e}", case.display()))
}

/// Runs `tproxy-cni render` for a pod's annotations: stdout, or stderr if it fails.
fn render_annotations(annotations: &serde_json::Value, pod_ipv6: bool) -> Result<String, String> {
    render_annotations_for(annotations, pod_ipv6, "iptables")
}

fn render_annotations_for(annotations: &serde_json::Value, pod_ipv6: bool, backend: &str) -> Result<String, String> {
    let dir = TempDir::new("golden");
    let file = dir.path().join("annotations.json");
    fs::write(&file, annotations.to_string()).unwrap();
    let mut cmd = Command::new(plugin());
    cmd.arg("render").arg(&file).args(["--backend", backend]);
    if pod_ipv6 {
        cmd.arg("--pod-ipv6");
    }
    let out = cmd.output().unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8(out.stdout).unwrap())
}

#[test]
fn rendered_rules_match_the_golden_files() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut failures = Vec::new();
    for (case, backend, ext) in
        cases().into_iter().flat_map(|c| [(c.clone(), "iptables", "rules"), (c, "nftables", "nft")])
    {
        let got = render_for(&case, backend);
        let golden = case.with_extension(ext);
        if update {
            fs::write(&golden, &got).unwrap();
            continue;
        }
        let want = fs::read_to_string(&golden)
            .unwrap_or_else(|_| panic!("{} is missing (UPDATE_GOLDEN=1 writes it)", golden.display()));
        if got != want {
            failures.push(format!("{}:\n--- golden\n{want}\n--- rendered\n{got}", case.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_pod_in_no_mesh_renders_nothing() {
    let case = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/consul/not-in-mesh.json");
    assert_eq!(render(&case), "");
    assert_eq!(render_for(&case, "nftables"), "");
}

#[test]
fn render_refuses_bad_annotations_with_a_clear_message() {
    let dir = TempDir::new("golden");
    let f = dir.path().join("a.json");
    fs::write(&f, r#"{"consul.hashicorp.com/connect-inject-status":"injected","consul.hashicorp.com/transparent-proxy-status":"enabled","consul.hashicorp.com/redirect-traffic-config":"{\"ProxyUserID\":\"5995\",\"ProxyInboundPort\":0}"}"#).unwrap();
    let out = Command::new(plugin()).arg("render").arg(&f).output().unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ProxyInboundPort is required"));
    fs::write(&f, "[1,2]").unwrap();
    let out = Command::new(plugin()).arg("render").arg(&f).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("JSON object of strings"));
}

/// A Kuma pod (CNI mode) with these extra annotations.
fn kuma(extra: serde_json::Value) -> serde_json::Value {
    let mut a = serde_json::json!({"kuma.io/sidecar-injected": "true", "k8s.v1.cni.cncf.io/networks": "kuma-cni"});
    for (k, v) in extra.as_object().unwrap() {
        a[k] = v.clone();
    }
    a
}

#[test]
fn a_legacy_annotation_pod_and_a_yaml_pod_with_the_same_meaning_get_the_same_rules() {
    let pairs = [
        (
            "defaults",
            kuma(serde_json::json!({})),
            "redirect:\n  inbound: {excludePorts: [9901, 9001]}\n  outbound: {excludePorts: [9901]}\n",
        ),
        (
            "every knob",
            kuma(serde_json::json!({
                "kuma.io/sidecar-uid": "1234",
                "kuma.io/transparent-proxying-inbound-port": "16006",
                "kuma.io/transparent-proxying-outbound-port": "16001",
                "traffic.kuma.io/exclude-inbound-ports": "8080",
                "kuma.io/application-probe-proxy-port": "9001",
                "traffic.kuma.io/exclude-outbound-ports": "5432,6379",
                "traffic.kuma.io/exclude-inbound-ips": "10.0.0.0/8,fd00::/8",
                "traffic.kuma.io/exclude-outbound-ips": "192.0.2.0/24,2001:db8::/32",
                "traffic.kuma.io/exclude-outbound-ports-for-uids": "tcp:22,8000-8010:1000-2000;udp:53:42",
                "kuma.io/builtin-dns": "enabled",
                "kuma.io/builtin-dns-port": "25053",
                "traffic.kuma.io/drop-invalid-packets": "true",
                "traffic.kuma.io/iptables-logs": "true",
            })),
            "kumaDPUser: \"1234\"\nredirect:\n  inbound:\n    port: 16006\n    excludePorts: [8080, 9001]\n    \
             excludePortsForIPs: [10.0.0.0/8, \"fd00::/8\"]\n  outbound:\n    port: 16001\n    excludePorts: [5432, 6379]\n    \
             excludePortsForIPs: [\"192.0.2.0/24,2001:db8::/32\"]\n    \
             excludePortsForUIDs: [\"tcp:22,8000-8010:1000-2000\", \"udp:53:42\"]\n  \
             dns: {enabled: true, port: 25053, captureAll: true}\ndropInvalidPackets: true\nlog: {enabled: true}\n",
        ),
        (
            "gateway, IPv4 only",
            kuma(
                serde_json::json!({"kuma.io/gateway": "enabled", "kuma.io/transparent-proxying-ip-family-mode": "IPv4"}),
            ),
            "ipFamilyMode: ipv4\nredirect:\n  inbound: {enabled: false, port: 0}\n  outbound: {excludePorts: [9901]}\n",
        ),
    ];
    for (what, legacy, yaml) in pairs {
        let yaml_pod = kuma(serde_json::json!({"traffic.kuma.io/transparent-proxy-config": yaml}));
        for pod_ipv6 in [false, true] {
            let from_legacy = render_annotations(&legacy, pod_ipv6).unwrap();
            let from_yaml = render_annotations(&yaml_pod, pod_ipv6).unwrap();
            assert!(from_legacy.contains("KUMA_MESH_OUTBOUND"), "{what}: {from_legacy}");
            assert_eq!(from_legacy, from_yaml, "{what} (pod IPv6: {pod_ipv6})");
        }
    }
}

#[test]
fn a_pod_injected_by_two_meshes_is_refused() {
    let mut a = kuma(serde_json::json!({}));
    a["consul.hashicorp.com/connect-inject-status"] = "injected".into();
    a["consul.hashicorp.com/transparent-proxy-status"] = "enabled".into();
    let e = render_annotations(&a, false).unwrap_err();
    assert!(e.contains("injected by both meshes"), "{e}");
}

#[test]
fn the_kernel_reports_every_golden_rule_back_verbatim() {
    if !privileged() {
        return;
    }
    for case in cases() {
        let rendered = render(&case);
        for section in rendered.split("# ").filter(|s| !s.is_empty()) {
            let (family, body) = section.split_once('\n').unwrap();
            let fam = if family == "ipv4" { Fam::V4 } else { Fam::V6 };
            for backend in ["nft", "legacy"] {
                let ns = Netns::new("tpg");
                ns.restore(fam, backend, body);
                let saved = ns.save(fam, backend);
                for line in body.lines().filter(|l| l.starts_with("-A ")) {
                    assert!(
                        saved.lines().any(|l| l == line),
                        "{} {family} {backend}: {line:?} not reported back:\n{saved}",
                        case.display()
                    );
                }
            }
        }
    }
}

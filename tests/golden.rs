//! Golden tests of the rendered rules: `tproxy-cni render` on representative pods, compared with
//! the reviewed transactions in `tests/golden/`. Run with `UPDATE_GOLDEN=1` to rewrite them after a
//! deliberate change, then review the diff.
//!
//! A second test loads every golden transaction into a throwaway namespace with both iptables
//! backends and checks the kernel reports each rule back in exactly the spelling we render: that is
//! what lets CHECK compare rules as text.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::*;

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
    let doc: serde_json::Value = serde_json::from_str(&fs::read_to_string(case).unwrap()).unwrap();
    let dir = TempDir::new("golden");
    let annotations = dir.path().join("annotations.json");
    fs::write(&annotations, doc["annotations"].to_string()).unwrap();
    let mut cmd = Command::new(plugin());
    cmd.arg("render").arg(&annotations);
    if doc["pod_ipv6"].as_bool().unwrap() {
        cmd.arg("--pod-ipv6");
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "render {}: {}", case.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn rendered_rules_match_the_golden_files() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut failures = Vec::new();
    for case in cases() {
        let got = render(&case);
        let golden = case.with_extension("rules");
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

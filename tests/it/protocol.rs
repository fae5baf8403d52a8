//! The CNI protocol as the runtime sees it: the real binary, its stdout (exactly one JSON document),
//! its exit code, and its log file.

use std::process::Command;

use crate::support::*;
use serde_json::{Value, json};

const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

fn json_out(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("stdout must be one JSON document ({e}): {:?}", String::from_utf8_lossy(&out.stdout))
    })
}

#[test]
fn version_answers_with_every_supported_version() {
    for v in VERSIONS {
        let out = call_plugin(&[("CNI_COMMAND", "VERSION")], &json!({"cniVersion": v}).to_string());
        assert!(out.status.success());
        let doc = json_out(&out);
        assert_eq!(doc["cniVersion"], v);
        assert_eq!(doc["supportedVersions"], json!(VERSIONS));
    }
}

#[test]
fn add_passes_the_previous_result_through_in_every_version() {
    for v in VERSIONS {
        let ip = if v.starts_with('0') {
            json!({"version": "4", "address": "198.18.0.7/24"})
        } else {
            json!({"address": "198.18.0.7/24"})
        };
        let prev = json!({"cniVersion": v, "interfaces": [{"name": "eth0", "sandbox": "/x"}], "ips": [ip], "routes": [], "dns": {"nameservers": ["10.96.0.10"]}, "vendor-field": {"kept": true}});
        let stdin = json!({"cniVersion": v, "name": "n", "type": "tproxy-cni", "prevResult": prev}).to_string();
        let out = call_plugin(
            &[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c1"), ("CNI_NETNS", "/nonexistent"), ("CNI_IFNAME", "eth0")],
            &stdin,
        );
        assert!(out.status.success(), "{v}: {}", String::from_utf8_lossy(&out.stdout));
        assert_eq!(json_out(&out), prev, "{v}: prevResult must pass through unchanged");
        // Without prevResult (Multus, non-chained): a valid empty result in the requested version.
        let stdin = json!({"cniVersion": v, "name": "n", "type": "tproxy-cni"}).to_string();
        let out = call_plugin(
            &[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c1"), ("CNI_NETNS", "/nonexistent"), ("CNI_IFNAME", "eth0")],
            &stdin,
        );
        assert_eq!(json_out(&out)["cniVersion"], v);
    }
}

#[test]
fn errors_are_one_json_document_on_stdout_and_a_non_zero_exit() {
    let out = call_plugin(&[("CNI_COMMAND", "UPGRADE")], r#"{"cniVersion":"0.4.0"}"#);
    assert_eq!(out.status.code(), Some(1));
    let doc = json_out(&out);
    assert_eq!(
        doc,
        json!({"cniVersion": "0.4.0", "code": 4, "msg": "CNI_COMMAND \"UPGRADE\" is not one of ADD, DEL, CHECK, VERSION, STATUS, GC"})
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not one of"), "the error is logged on stderr too");
}

#[test]
fn log_lines_name_the_container_and_the_pod() {
    let dir = TempDir::new("log");
    let log = dir.path().join("plugin.log");
    // A pod without annotations, as containerd sends it.
    let stdin = json!({"cniVersion": "1.0.0", "name": "n", "type": "tproxy-cni", "log_level": "debug", "log_file": log,
        "runtimeConfig": {"io.kubernetes.cri.pod-annotations": null}})
    .to_string();
    let out = call_plugin(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "0123456789abcdef"),
            ("CNI_NETNS", "/nonexistent"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-1"),
        ],
        &stdin,
    );
    assert!(out.status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.is_empty());
    for line in text.lines() {
        assert!(line.contains("container=0123456789ab pod=shop/cart-1:"), "{line}");
    }
}

#[test]
fn status_is_ready_when_iptables_is_installed_and_code_50_when_it_is_not() {
    if !privileged() {
        return;
    }
    let stdin = r#"{"cniVersion":"1.1.0","name":"n","type":"tproxy-cni","backend":"iptables","iptables_mode":"nft"}"#;
    let out = call_plugin(&[("CNI_COMMAND", "STATUS")], stdin);
    assert!(out.status.success() && out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));

    // A private mount namespace where /usr/sbin (and so every iptables tool) is empty.
    let script = format!("mount -t tmpfs none /usr/sbin && echo '{stdin}' | CNI_COMMAND=STATUS {}", plugin().display());
    let out =
        Command::new("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &script]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let doc = json_out(&out);
    assert_eq!(doc["code"], 50);
    assert!(doc["msg"].as_str().unwrap().contains("iptables-nft-restore not found"), "{doc}");
}

/// The default engine is nftables: with no `backend` key, STATUS is ready where no iptables tool
/// exists at all (the same namespace makes the explicit iptables engine answer 50 above).
#[test]
fn status_of_the_default_engine_needs_no_iptables_tools() {
    if !privileged() {
        return;
    }
    let stdin = r#"{"cniVersion":"1.1.0","name":"n","type":"tproxy-cni"}"#;
    let script = format!(
        "mount -t tmpfs none /usr/sbin && test -z \"$(ls /usr/sbin)\" && echo '{stdin}' | CNI_COMMAND=STATUS {}",
        plugin().display()
    );
    let out =
        Command::new("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &script]).output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A kernel without an nf_tables feature the default engine needs: ADD's error (101) and STATUS's
/// (50) name the feature and the way out, one line.
#[test]
fn a_missing_kernel_feature_names_itself_and_the_iptables_engine() {
    use tproxy_cni::kernel::engine::NotReady;
    use tproxy_cni::kernel::nftables::NftablesError;
    use tproxy_cni::kernel::nftables::features::{Feature, FeatureError};
    use tproxy_cni::plugin::{Error, to_cni_error};

    let missing = || FeatureError::Missing(vec![Feature::CtZone, Feature::Log]);
    for (what, err, code) in [
        ("ADD", Error::Nftables(NftablesError::Feature(missing())), 101),
        ("STATUS", Error::NotReady(NotReady::Nftables(missing())), 50),
    ] {
        let e = to_cni_error(&err);
        assert_eq!(e.code.number(), code, "{what}: {e:?}");
        assert_eq!(e.msg.lines().count(), 1, "{what}: one line: {}", e.msg);
        for part in ["ct zone set", "log (nft_log)", r#"set "backend": "iptables" in the plugin configuration"#] {
            assert!(e.msg.contains(part), "{what}: {part:?} missing from: {}", e.msg);
        }
    }
}

#[test]
fn gc_accepts_the_attachment_lists() {
    for key in ["cni.dev/valid-attachments", "cni.dev/attachments"] {
        let stdin = json!({"cniVersion": "1.1.0", "name": "n", "type": "tproxy-cni", key: [{"containerID": "c1", "ifname": "eth0"}]}).to_string();
        let out = call_plugin(&[("CNI_COMMAND", "GC")], &stdin);
        assert!(out.status.success() && out.stdout.is_empty(), "{key}");
    }
}

#[test]
fn the_example_conflists_are_accepted() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cni-conf");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "conflist") {
            continue;
        }
        let list: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let Some(ours) = list["plugins"].as_array().unwrap().iter().find(|p| p["type"] == "tproxy-cni") else {
            continue;
        };
        assert_eq!(
            list["plugins"].as_array().unwrap().last(),
            Some(ours),
            "{}: tproxy-cni must be last",
            path.display()
        );
        // What libcni hands the plugin: our entry plus the list's name and version.
        let mut conf = ours.clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["name"] = list["name"].clone();
        // No annotations: a pass-through, which still validates every key.
        let out = call_plugin(
            &[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c1"), ("CNI_NETNS", "/nonexistent"), ("CNI_IFNAME", "eth0")],
            &conf.to_string(),
        );
        assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stdout));
        seen += 1;
    }
    assert!(seen >= 2);
}

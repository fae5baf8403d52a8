//! The installer as a real process against temporary directories standing in for the host paths:
//! chaining into each golden primary configuration, re-runs, the `.conf` conversion, unknown keys,
//! uninstall byte for byte, the watch under 200 rewrites, overlapping installers during an upgrade,
//! token rotation, readiness, refusal of bad input; and restarts that never open a window: mesh
//! pods ADDed through libcni while the installer is killed and restarted, and `--cleanup-on-exit`
//! telling an uninstall from a restart against the stand-in API server's DaemonSet.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::support::apiserver;
use crate::support::install::{BIN, Host, Installer, free_port, golden, http_status};
use crate::support::{punctual, wait_for};

/// How long the tests give the installer's directory watch to react. The installers here resync
/// once a minute (`--resync-interval 60s`), so an answer within this bound can only be the watch's;
/// the bound is generous because a test asserts behaviour, not speed, on a loaded two-core machine.
const WATCH_BOUND: Duration = Duration::from_secs(10);

const PRIMARIES: [&str; 4] = ["10-bridge.conflist", "10-flannel.conf", "10-calico.conflist", "05-cilium.conflist"];

fn list_name(primary: &str) -> String {
    primary.strip_suffix(".conf").map(|s| format!("{s}.conflist")).unwrap_or_else(|| primary.to_owned())
}

/// Chaining into each golden primary gives the golden output; stopping restores both dirs exactly.
#[test]
fn chains_into_every_golden_primary_and_uninstalls_byte_for_byte() {
    for primary in PRIMARIES {
        let host = Host::new("golden");
        host.put_conf(primary, &golden("primary", primary));
        host.put_conf("calico-kubeconfig", b"# the primary's own file\n");
        let (conf_before, bin_before) = (Host::snapshot(&host.conf), Host::snapshot(&host.bin));
        let plugin = host.fake_plugin("1");

        let inst = host.start(&plugin, &[]);
        wait_for(Duration::from_secs(10), "ready file", || host.ready_file().exists());
        let list = list_name(primary);
        let written = fs::read(host.conf.join(&list)).unwrap();
        let expected = golden("chained", &list);
        assert_eq!(
            String::from_utf8_lossy(&written),
            String::from_utf8_lossy(&expected),
            "{primary}: chained output differs from cni-conf/chained/{list}"
        );
        if primary.ends_with(".conf") {
            assert!(!host.conf.join(primary).exists(), "the converted .conf must be removed");
        }
        assert_eq!(fs::read(host.bin.join("tproxy-cni")).unwrap(), fs::read(&plugin).unwrap());
        assert_eq!(fs::metadata(host.kubeconfig()).unwrap().mode() & 0o777, 0o600);
        assert_eq!(fs::read(host.token_copy()).unwrap(), b"token-1");

        let (status, log) = inst.terminate();
        assert!(status.success(), "{primary}: exit {status}; log:\n{log}");
        assert_eq!(Host::snapshot(&host.conf), conf_before, "{primary}: conf dir not restored; log:\n{log}");
        assert_eq!(Host::snapshot(&host.bin), bin_before, "{primary}: bin dir not restored; log:\n{log}");
        assert!(!host.ready_file().exists());
    }
}

/// The binary we install is the real plugin and answers the runtime.
#[test]
fn the_installed_binary_is_the_plugin_and_answers_version() {
    let host = Host::new("real");
    host.put_conf("10-bridge.conflist", &golden("primary", "10-bridge.conflist"));
    let inst = host.start(std::path::Path::new(BIN), &[]);
    wait_for(Duration::from_secs(20), "ready file", || host.ready_file().exists());
    let out = Command::new(host.bin.join("tproxy-cni"))
        .env("CNI_COMMAND", "VERSION")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(doc["supportedVersions"].as_array().unwrap().iter().any(|v| v == "1.0.0"), "{doc}");
    assert!(inst.terminate().0.success());
    assert!(!host.bin.join("tproxy-cni").exists());
}

/// A restart (crash, or cleanup turned off) finds everything in place and rewrites nothing; the
/// pristine bytes survive, so the final uninstall is still exact.
#[test]
fn re_runs_are_idempotent() {
    let host = Host::new("rerun");
    host.put_conf("10-calico.conflist", &golden("primary", "10-calico.conflist"));
    let conf_before = Host::snapshot(&host.conf);
    let plugin = host.fake_plugin("1");

    let first = host.start(&plugin, &["--cleanup-on-exit", "false"]);
    wait_for(Duration::from_secs(10), "ready", || host.ready_file().exists());
    let (status, log) = first.terminate();
    assert!(status.success(), "{log}");
    assert!(log.contains("leaving the install in place (--cleanup-on-exit=false)"), "{log}");
    let ids = |h: &Host| -> Vec<(u64, i64, i64)> {
        ["10-calico.conflist", "ZZZ-tproxy-cni-kubeconfig", "ZZZ-tproxy-cni-token"]
            .iter()
            .map(|n| fs::metadata(h.conf.join(n)).unwrap())
            .chain([fs::metadata(h.bin.join("tproxy-cni")).unwrap()])
            .map(|m| (m.ino(), m.mtime(), m.mtime_nsec()))
            .collect()
    };
    let before = ids(&host);
    let undo_before = fs::read(host.state.join("undo.log")).unwrap();

    for _ in 0..2 {
        let again = host.start(&plugin, &[]);
        wait_for(Duration::from_secs(10), "ready", || host.ready_file().exists());
        // Let it settle through at least one watch cycle.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(ids(&host), before, "a re-run rewrote a file that was already right");
        assert_eq!(fs::read(host.state.join("undo.log")).unwrap(), undo_before, "a re-run added undo records");
        again.kill(); // a crash: no cleanup
        let _ = fs::remove_file(host.ready_file());
    }
    let last = host.start(&plugin, &[]);
    wait_for(Duration::from_secs(10), "ready", || host.ready_file().exists());
    let (status, log) = last.terminate();
    assert!(status.success(), "{log}");
    assert_eq!(Host::snapshot(&host.conf), conf_before);
}

/// Keys we do not know, at every level, keep their values and their order.
#[test]
fn unknown_keys_and_key_order_survive() {
    let host = Host::new("keys");
    let primary = br#"{"zz-vendor":{"b":1,"a":[true,null,1.5]},"name":"n","cniVersion":"1.0.0","disableCheck":true,"plugins":[{"type":"bridge","zeta":"z","alpha":{"y":2,"x":1},"ipam":{"type":"host-local","subnet":"10.1.0.0/16"}},{"type":"vendor-x","capabilities":{"portMappings":true},"m":{}}],"aa-last":"kept"}"#;
    host.put_conf("10-odd.conflist", primary);
    let inst = host.start(
        &host.fake_plugin("1"),
        &["--plugin-config", write_settings(&host, r#"{"iptables_mode":"nft","zz_future":[1]}"#).to_str().unwrap()],
    );
    wait_for(Duration::from_secs(10), "ready", || host.ready_file().exists());
    let written = fs::read_to_string(host.conf.join("10-odd.conflist")).unwrap();
    let compact = serde_json::to_string(&serde_json::from_str::<serde_json::Value>(&written).unwrap()).unwrap();
    let original = std::str::from_utf8(primary).unwrap();
    let (head, tail) = original.split_at(original.find(r#"],"aa-last""#).unwrap());
    assert!(compact.starts_with(head), "primary keys or order changed:\n{compact}");
    assert!(compact.ends_with(tail), "keys after plugins lost:\n{compact}");
    assert!(
        compact.contains(r#",{"type":"tproxy-cni","name":"tproxy-cni","capabilities":{"io.kubernetes.cri.pod-annotations":true},"kubeconfig":"/etc/cni/net.d/ZZZ-tproxy-cni-kubeconfig","log_level":"info","iptables_mode":"nft","zz_future":[1]}]"#),
        "our entry is not last, or the settings were not passed through:\n{compact}"
    );
    let (status, _) = inst.terminate();
    assert!(status.success());
    assert_eq!(fs::read(host.conf.join("10-odd.conflist")).unwrap(), primary);
}

fn write_settings(host: &Host, json: &str) -> std::path::PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let p = host.root.join(format!("plugin-{}.json", N.fetch_add(1, Ordering::SeqCst)));
    fs::write(&p, json).unwrap();
    p
}

/// With no configuration yet the installer waits, says so, and chains as soon as one appears.
#[test]
fn waits_for_the_primary_then_chains_by_the_watch() {
    let _load = punctual();
    let host = Host::new("wait");
    let inst = host.start(&host.fake_plugin("1"), &[]);
    wait_for(Duration::from_secs(10), "the waiting log line", || inst.log().contains("waiting for the primary CNI"));
    assert!(!host.ready_file().exists());
    host.replace_conf("10-calico.conflist", &golden("primary", "10-calico.conflist"));
    // The resync is a minute away: only the watch chains within the bound (a bound, not a speed
    // claim: the time taken is printed, and measured in docs/installer.md).
    let took = wait_for(WATCH_BOUND, "our entry", || host.chained("10-calico.conflist"));
    wait_for(WATCH_BOUND, "ready", || host.ready_file().exists());
    eprintln!("chained {took:?} after the primary wrote its file");
    assert!(inst.terminate().0.success());
}

/// A new file that sorts first takes over; our entry moves there and the old file is restored.
#[test]
fn follows_the_configuration_the_runtime_uses() {
    let host = Host::new("move");
    let calico = golden("primary", "10-calico.conflist");
    host.put_conf("10-calico.conflist", &calico);
    let inst = host.start(&host.fake_plugin("1"), &[]);
    wait_for(Duration::from_secs(10), "chained into calico", || host.chained("10-calico.conflist"));
    host.put_conf("00-broken.conflist", b"{ not json"); // old and broken: the runtime skips it
    let old = std::time::SystemTime::now() - Duration::from_secs(60);
    fs::File::options().write(true).open(host.conf.join("00-broken.conflist")).unwrap().set_modified(old).unwrap();
    host.replace_conf("05-cilium.conflist", &golden("primary", "05-cilium.conflist"));
    wait_for(Duration::from_secs(2), "chained into cilium", || host.chained("05-cilium.conflist"));
    wait_for(Duration::from_secs(2), "calico restored", || {
        fs::read(host.conf.join("10-calico.conflist")).unwrap() == calico
    });
    assert_eq!(fs::read(host.conf.join("00-broken.conflist")).unwrap(), b"{ not json");
    let (status, log) = inst.terminate();
    assert!(status.success(), "{log}");
    assert_eq!(fs::read(host.conf.join("05-cilium.conflist")).unwrap(), golden("primary", "05-cilium.conflist"));
}

/// Another process rewrites the primary's file 200 times; after each, our entry is back well before
/// the resync could have put it there, and a reader polling the file never sees anything but valid JSON.
#[test]
fn the_watch_re_injects_after_200_rewrites_and_readers_never_see_invalid_json() {
    let _load = punctual();
    let host = Host::new("watch");
    let calico = golden("primary", "10-calico.conflist");
    host.put_conf("10-calico.conflist", &calico);
    // A one-minute resync: only the watch can be fast enough.
    let inst = host.start(&host.fake_plugin("1"), &["--log-level", "info"]);
    wait_for(Duration::from_secs(10), "first injection", || host.chained("10-calico.conflist"));

    let stop = Arc::new(AtomicBool::new(false));
    let (reads, bad) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let reader = {
        let (stop, reads, bad, path) = (stop.clone(), reads.clone(), bad.clone(), host.conf.join("10-calico.conflist"));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let bytes = fs::read(&path).unwrap();
                reads.fetch_add(1, Ordering::Relaxed);
                if serde_json::from_slice::<serde_json::Value>(&bytes).is_err() {
                    bad.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let mut worst = Duration::ZERO;
    let mut total = Duration::ZERO;
    for i in 0..200 {
        // The primary rewrites its file (a new MTU each time), without our entry.
        let text = String::from_utf8(calico.clone()).unwrap().replace("\"mtu\": 0", &format!("\"mtu\": {}", 1400 + i));
        host.replace_conf("10-calico.conflist", text.as_bytes());
        let took = wait_for(WATCH_BOUND, &format!("our entry back after rewrite {i}"), || {
            host.conf_json("10-calico.conflist")
                .is_some_and(|d| d["plugins"][0]["mtu"] == 1400 + i && d["plugins"][3]["type"] == "tproxy-cni")
        });
        worst = worst.max(took);
        total += took;
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    eprintln!(
        "200 rewrites: re-injected in {:?} on average, {worst:?} at worst; reader: {} reads, {} invalid",
        total / 200,
        reads.load(Ordering::Relaxed),
        bad.load(Ordering::Relaxed)
    );
    assert_eq!(bad.load(Ordering::Relaxed), 0, "a reader saw invalid JSON");
    assert!(reads.load(Ordering::Relaxed) > 200);
    let (status, log) = inst.terminate();
    assert!(status.success(), "{log}");
    assert!(log.contains("cni.exclusive=false"), "a primary that keeps reverting us must be named in the log:\n{log}");
    // The last rewrite is what the primary wrote: that is what uninstall restores.
    let last = String::from_utf8(calico).unwrap().replace("\"mtu\": 0", "\"mtu\": 1599");
    assert_eq!(fs::read_to_string(host.conf.join("10-calico.conflist")).unwrap(), last);
}

/// Kubelet swaps the projected token's `..data` symlink; the copy the plugin reads follows.
#[test]
fn the_token_copy_follows_kubelet_rotation() {
    let _load = punctual();
    let mut host = Host::new("token");
    host.put_conf("10-bridge.conflist", &golden("primary", "10-bridge.conflist"));
    let inst = host.start(&host.fake_plugin("1"), &[]);
    wait_for(Duration::from_secs(10), "ready", || host.ready_file().exists());
    let kc: serde_json::Value = serde_json::from_slice(&fs::read(host.kubeconfig()).unwrap()).unwrap();
    // The kubeconfig names the token copy by its path on the host, beside the host kubeconfig.
    assert_eq!(kc["users"][0]["user"]["tokenFile"], "/etc/cni/net.d/ZZZ-tproxy-cni-token");
    assert_eq!(kc["clusters"][0]["cluster"]["server"], "https://10.96.0.1:443");
    for i in 2..=4 {
        let token = format!("token-{i}");
        host.rotate_token(&token);
        let took = wait_for(WATCH_BOUND, "token copy", || fs::read(host.token_copy()).unwrap() == token.as_bytes());
        eprintln!("token {i} followed in {took:?}");
        assert_eq!(fs::metadata(host.token_copy()).unwrap().mode() & 0o777, 0o600);
    }
    assert!(inst.terminate().0.success());
    assert!(!host.token_copy().exists() && !host.kubeconfig().exists());
}

/// A rolling update with surge: the new installer starts while the old one runs, then the old one
/// gets SIGTERM. The new install must be intact; the old one must have left it alone.
#[test]
fn an_old_installer_shutting_down_leaves_the_new_install_intact() {
    let host = Host::new("upgrade");
    host.put_conf("10-calico.conflist", &golden("primary", "10-calico.conflist"));
    let (conf_before, bin_before) = (Host::snapshot(&host.conf), Host::snapshot(&host.bin));
    let (v1, v2) = (host.fake_plugin("1"), host.fake_plugin("2"));
    let settings_v2 = write_settings(&host, r#"{"log_level":"debug"}"#);

    // Each pod has its own ready file (an emptyDir), so each process gets its own here.
    let new_ready = host.root.join("new-ready");
    // Both pods share the host network, so the same probe address.
    let probe = free_port().to_string();
    let old = host.start(&v1, &["--generation", "1", "--pod-name", "tproxy-cni-old", "--probe-addr", &probe]);
    wait_for(Duration::from_secs(10), "v1 installed", || host.ready_file().exists());
    let new = host.start(
        &v2,
        &[
            "--generation",
            "2",
            "--pod-name",
            "tproxy-cni-new",
            "--plugin-config",
            settings_v2.to_str().unwrap(),
            "--ready-file",
            new_ready.to_str().unwrap(),
            "--probe-addr",
            &probe,
        ],
    );
    let v2_bytes = fs::read(&v2).unwrap();
    wait_for(Duration::from_secs(10), "v2 installed", || fs::read(host.bin.join("tproxy-cni")).unwrap() == v2_bytes);
    wait_for(Duration::from_secs(10), "v2 entry", || {
        host.conf_json("10-calico.conflist").is_some_and(|d| d["plugins"][3]["log_level"] == "debug")
    });
    // The old one lets go of the probe address, so the new one answers kubelet while both run.
    let addr = probe.parse().unwrap();
    wait_for(Duration::from_secs(5), "the new pod's /readyz", || {
        new.log().contains(&format!("serving probes on {probe}"))
    });
    assert_eq!(http_status(addr, "/readyz"), Some(200));
    let (status, log) = old.terminate();
    assert!(status.success(), "{log}");
    assert!(log.contains("tproxy-cni-new (generation 2) owns the install: leaving it in place"), "{log}");
    assert_eq!(http_status(addr, "/readyz"), Some(200));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        fs::read(host.bin.join("tproxy-cni")).unwrap(),
        v2_bytes,
        "the old pod removed or replaced the new binary"
    );
    assert!(host.chained("10-calico.conflist"));
    assert!(host.kubeconfig().exists() && host.token_copy().exists());
    assert!(new_ready.exists());

    // The old pod's container restarts mid-rollout: it must not take the install back.
    let restarted = host.start(
        &v1,
        &["--generation", "1", "--pod-name", "tproxy-cni-old", "--ready-file", host.root.join("r2").to_str().unwrap()],
    );
    wait_for(Duration::from_secs(10), "the restarted old pod to defer", || {
        inst_log_contains(&restarted, "staying passive")
    });
    let (status, _) = restarted.terminate();
    assert!(status.success());
    assert_eq!(fs::read(host.bin.join("tproxy-cni")).unwrap(), v2_bytes);

    // The new one is the owner: its exit removes everything, exactly.
    let (status, log) = new.terminate();
    assert!(status.success(), "{log}");
    assert_eq!(Host::snapshot(&host.conf), conf_before, "{log}");
    assert_eq!(Host::snapshot(&host.bin), bin_before, "{log}");
}

fn inst_log_contains(i: &Installer, s: &str) -> bool {
    i.log().contains(s)
}

/// The same overlap with the old pod's SIGTERM racing the new pod's start, several times: whatever
/// the interleaving, the new install ends intact.
#[test]
fn a_racing_upgrade_always_ends_with_the_new_install() {
    let host = Host::new("race");
    host.put_conf("10-flannel.conf", &golden("primary", "10-flannel.conf"));
    let (v1, v2) = (host.fake_plugin("1"), host.fake_plugin("2"));
    let v2_bytes = fs::read(&v2).unwrap();
    for round in 0..5u64 {
        let old = host.start(&v1, &["--generation", &(2 * round + 1).to_string()]);
        wait_for(Duration::from_secs(10), "old ready", || {
            host.chained("10-flannel.conflist") && host.ready_file().exists()
        });
        let new = host.start(&v2, &["--generation", &(2 * round + 2).to_string()]);
        std::thread::sleep(Duration::from_millis(round * 7));
        let (status, log) = old.terminate();
        assert!(status.success(), "round {round}: {log}");
        wait_for(Duration::from_secs(5), "new install", || {
            fs::read(host.bin.join("tproxy-cni")).is_ok_and(|b| b == v2_bytes)
                && host.chained("10-flannel.conflist")
                && host.kubeconfig().exists()
                && host.token_copy().exists()
        });
        let (status, log) = new.terminate();
        assert!(status.success(), "round {round}: {log}");
        assert_eq!(fs::read(host.conf.join("10-flannel.conf")).unwrap(), golden("primary", "10-flannel.conf"));
        assert!(!host.conf.join("10-flannel.conflist").exists());
        assert!(!host.bin.join("tproxy-cni").exists());
    }
}

/// `/readyz` is 503 until everything is in place, 200 then, and 503 again when a part disappears.
#[test]
fn readyz_reports_the_three_parts() {
    let host = Host::new("readyz");
    let addr = free_port();
    let inst = host.start(&host.fake_plugin("1"), &["--probe-addr", &addr.to_string()]);
    wait_for(Duration::from_secs(10), "the probe listener", || http_status(addr, "/livez") == Some(200));
    assert_eq!(http_status(addr, "/readyz"), Some(503), "no primary config yet");
    host.replace_conf("10-bridge.conflist", &golden("primary", "10-bridge.conflist"));
    wait_for(Duration::from_secs(2), "ready", || http_status(addr, "/readyz") == Some(200));
    fs::remove_file(host.bin.join("tproxy-cni")).unwrap();
    assert_eq!(http_status(addr, "/readyz"), Some(503), "binary gone");
    assert!(inst.terminate().0.success());
}

/// Bad input: a one-line message naming the fix, a failure exit, and nothing changed on disk.
#[test]
fn bad_input_is_refused_before_anything_changes() {
    let host = Host::new("bad");
    host.put_conf("10-calico.conflist", &golden("primary", "10-calico.conflist"));
    let plugin = host.fake_plugin("1");
    let (conf_before, bin_before) = (Host::snapshot(&host.conf), Host::snapshot(&host.bin));
    let broken_sa = host.root.join("broken-sa");
    fs::create_dir_all(&broken_sa).unwrap();
    fs::write(broken_sa.join("token"), "t").unwrap();
    fs::write(broken_sa.join("ca.crt"), "").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--plugin-config".into(), write_settings(&host, r#"{"type":"other"}"#).to_string_lossy().into()],
            "plugin setting \"type\" is set by the installer",
        ),
        (
            vec!["--plugin-config".into(), write_settings(&host, r#"{"iptables_mode":"xt"}"#).to_string_lossy().into()],
            "iptables_mode \"xt\" is not one of auto, nft, legacy",
        ),
        (
            vec!["--plugin-config".into(), write_settings(&host, "[1]").to_string_lossy().into()],
            "must hold a JSON object",
        ),
        (vec!["--cni-bin-dir".into(), "/nonexistent/bin".into()], "set --cni-bin-dir"),
        (vec!["--api-server".into(), "http://10.0.0.1".into()], "only https:// servers are supported"),
        (vec!["--resync-interval".into(), "soon".into()], "is not a duration"),
        (vec!["--startup-taint".into(), "Bad Key".into()], "is not a qualified name"),
        (vec!["--cleanup-on-exit".into(), "maybe".into()], "[possible values: auto, true, false]"),
        (
            // auto in a pod needs the pod's service account to ask the API server.
            vec![
                "--cleanup-on-exit".into(),
                "auto".into(),
                "--pod-namespace".into(),
                "kube-system".into(),
                "--pod-name".into(),
                "tproxy-cni-x1".into(),
                "--service-account-dir".into(),
                broken_sa.to_string_lossy().into(),
            ],
            "--cleanup-on-exit=auto needs the pod's service account",
        ),
        (vec!["--startup-taint".into(), "tproxy-cni.io/not-ready".into()], "--startup-taint needs --node-name"),
        (
            // The projected CA holds no certificate: the API client cannot be built.
            vec![
                "--startup-taint".into(),
                "tproxy-cni.io/not-ready".into(),
                "--node-name".into(),
                "n1".into(),
                "--service-account-dir".into(),
                broken_sa.to_string_lossy().into(),
            ],
            "--startup-taint needs the pod's service account",
        ),
    ];
    for (extra, message) in cases {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let args = host.args_with(&plugin, &extra);
        // Bounded: an input wrongly accepted would otherwise run the installer forever.
        let mut run = Installer::spawn(&args, &host.root);
        let status = run.wait(Duration::from_secs(10));
        let stderr = run.log();
        assert!(!status.success(), "{message}: accepted");
        assert!(stderr.contains(message), "expected {message:?} in:\n{stderr}");
        assert_eq!(
            stderr.trim_end().lines().filter(|l| l.contains("error") || l.starts_with("tproxy-cni install:")).count(),
            1,
            "{stderr}"
        );
        assert_eq!(Host::snapshot(&host.conf), conf_before, "{message}: conf dir changed");
        assert_eq!(Host::snapshot(&host.bin), bin_before, "{message}: bin dir changed");
        assert!(!host.state.exists(), "{message}: state dir created");
    }
}

/// Idle, the installer sleeps: its own writes and locks do not wake it into a loop.
#[test]
fn an_idle_installer_uses_next_to_no_cpu() {
    let host = Host::new("idle");
    host.put_conf("10-calico.conflist", &golden("primary", "10-calico.conflist"));
    let probe = free_port();
    let inst = host.start(&host.fake_plugin("1"), &["--probe-addr", &probe.to_string(), "--resync-interval", "1s"]);
    wait_for(Duration::from_secs(10), "ready", || host.ready_file().exists());
    let cpu = |pid: i32| -> u64 {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap() // utime + stime, in ticks
    };
    let before = cpu(inst.pid());
    std::thread::sleep(Duration::from_secs(3));
    let ticks = cpu(inst.pid()) - before;
    eprintln!("idle for 3 s with a 1 s resync: {ticks} clock ticks of CPU");
    assert!(ticks < 30, "the installer is busy while idle: {ticks} ticks in 3 s");
    assert!(inst.terminate().0.success());
}

/// The DaemonSet runs the installer as UID 0 with every capability dropped and no privileged mode:
/// that is enough to install into and uninstall from root-owned host directories.
#[test]
fn root_without_any_capability_is_enough() {
    let host = Host::new("nocaps");
    host.put_conf("10-calico.conflist", &golden("primary", "10-calico.conflist"));
    let (conf_before, bin_before) = (Host::snapshot(&host.conf), Host::snapshot(&host.bin));
    let mut args: Vec<String> =
        ["--reuid=0", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs", BIN]
            .iter()
            .map(|s| s.to_string())
            .collect();
    args.extend(host.args(&host.fake_plugin("1")));
    let mut inst = Installer::spawn_program("setpriv", &args, &host.root);
    wait_for(Duration::from_secs(10), "ready", || host.ready_file().exists());
    let status = fs::read_to_string(format!("/proc/{}/status", inst.pid())).unwrap();
    let cap_eff = status.lines().find(|l| l.starts_with("CapEff:")).unwrap();
    assert!(cap_eff.ends_with("0000000000000000"), "the installer still has capabilities: {cap_eff}");
    assert!(host.chained("10-calico.conflist"));
    inst.signal(libc::SIGTERM);
    assert!(inst.wait(Duration::from_secs(10)).success(), "{}", inst.log());
    assert_eq!(Host::snapshot(&host.conf), conf_before);
    assert_eq!(Host::snapshot(&host.bin), bin_before);
}

/// The state dir is lost (a node rebuilt with the same disk for /etc and /opt, a wiped /var): the
/// next installer records what it finds of ours, so uninstall still removes all of it.
#[test]
fn a_lost_state_dir_still_uninstalls_everything_of_ours() {
    let host = Host::new("lost");
    let calico = golden("primary", "10-calico.conflist");
    host.put_conf("10-calico.conflist", &calico);
    let bin_before = Host::snapshot(&host.bin);
    let plugin = host.fake_plugin("1");
    let first = host.start(&plugin, &[]);
    wait_for(Duration::from_secs(10), "ready", || host.ready_file().exists());
    first.kill();
    fs::remove_dir_all(&host.state).unwrap();
    let _ = fs::remove_file(host.ready_file());

    let second = host.start(&plugin, &[]);
    wait_for(Duration::from_secs(10), "ready", || host.ready_file().exists());
    let (status, log) = second.terminate();
    assert!(status.success(), "{log}");
    assert_eq!(Host::snapshot(&host.bin), bin_before, "{log}");
    let names: Vec<_> = fs::read_dir(&host.conf).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["10-calico.conflist"], "kubeconfig and token copy removed");
    // Without the pristine bytes, only our entry is taken out: same document, our formatting.
    let now: serde_json::Value =
        serde_json::from_slice(&fs::read(host.conf.join("10-calico.conflist")).unwrap()).unwrap();
    assert_eq!(now, serde_json::from_slice::<serde_json::Value>(&calico).unwrap());
}

/// The start-up taint stays until the plugin is in place, then goes (and only it), through the real
/// API client over TLS to the stand-in API server; an API server refusing at first is retried.
#[test]
fn the_start_up_taint_is_removed_once_ready_and_retried_when_refused() {
    let server = apiserver::ApiServer::start();
    let other = serde_json::json!({"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"});
    server.add_node(
        "node-1",
        vec![serde_json::json!({"key": "tproxy-cni.io/not-ready", "effect": "NoSchedule"}), other.clone()],
    );
    let mut host = Host::new("taint");
    host.ca_pem = server.ca_pem().to_owned();
    host.rotate_token(apiserver::TOKEN);
    let url = server.url();
    let args = ["--api-server", &url, "--startup-taint", "tproxy-cni.io/not-ready", "--node-name", "node-1"];
    let inst = host.start(&host.fake_plugin("1"), &args);

    // Not ready (no primary configuration yet): the taint stays and the API is not even asked.
    wait_for(Duration::from_secs(10), "waiting", || inst.log().contains("waiting for the primary CNI"));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(server.node("node-1").unwrap()["spec"]["taints"].as_array().unwrap().len(), 2);
    assert!(server.requests().is_empty(), "{:?}", server.requests());

    // The API server refuses (RBAC not applied yet): the installer keeps trying.
    server.set_fault(Some(apiserver::Fault::Status(403)));
    host.replace_conf("10-calico.conflist", &golden("primary", "10-calico.conflist"));
    wait_for(Duration::from_secs(10), "a refused attempt", || inst.log().contains("cannot remove the start-up taint"));
    assert!(host.ready_file().exists(), "readiness does not wait for the API server");
    server.set_fault(None);
    let took = wait_for(Duration::from_secs(15), "the taint removed", || {
        server.node("node-1").unwrap()["spec"]["taints"].as_array().unwrap().len() == 1
    });
    eprintln!("taint removed {took:?} after the API server stopped refusing");
    assert_eq!(server.node("node-1").unwrap()["spec"]["taints"], serde_json::json!([other]));
    assert!(server.requests().iter().all(|r| r.bearer.as_deref() == Some(apiserver::TOKEN)));
    let status = fs::read_to_string(format!("/proc/{}/status", inst.pid())).unwrap();
    let peak = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap_or("VmHWM: ?").to_owned();
    eprintln!("installer memory after TLS calls to the API server: {peak}");
    let (status, log) = inst.terminate();
    assert!(status.success(), "{log}");
}

/// A runtime exec'ing the plugin while an upgrade replaces it always runs a whole binary, old or
/// new, and never meets "text file busy".
#[test]
fn replacing_the_binary_never_breaks_an_exec() {
    let host = Host::new("exec");
    host.put_conf("10-bridge.conflist", &golden("primary", "10-bridge.conflist"));
    let (v1, v2) = (host.fake_plugin("1"), host.fake_plugin("2"));
    let old = host.start(&v1, &["--generation", "1"]);
    wait_for(Duration::from_secs(10), "v1", || host.ready_file().exists());

    let stop = Arc::new(AtomicBool::new(false));
    let runner = {
        let (stop, bin) = (stop.clone(), host.bin.join("tproxy-cni"));
        std::thread::spawn(move || {
            let mut seen = std::collections::BTreeMap::<String, usize>::new();
            while !stop.load(Ordering::Relaxed) {
                let out = Command::new(&bin).output().unwrap_or_else(|e| panic!("exec failed: {e}"));
                let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                assert!(out.status.success(), "exec of a replaced binary failed: {:?}", out);
                *seen.entry(text).or_default() += 1;
            }
            seen
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let new = host.start(&v2, &["--generation", "2", "--ready-file", host.root.join("r2").to_str().unwrap()]);
    let v2_bytes = fs::read(&v2).unwrap();
    wait_for(Duration::from_secs(10), "v2", || fs::read(host.bin.join("tproxy-cni")).is_ok_and(|b| b == v2_bytes));
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let seen = runner.join().unwrap();
    eprintln!("execs during the upgrade: {seen:?}");
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["tproxy-cni 1", "tproxy-cni 2"], "only whole binaries ran");
    assert!(old.terminate().0.success());
    assert!(new.terminate().0.success());
}

// Restarts never open a window. While our entry is in the configuration the runtime reads, a mesh
// pod that starts is redirected or fails; once it is gone, the runtime never calls us. So a
// restart, a crash, an upgrade or an unreachable API server must leave the entry in place — never
// absent, not even for a moment — and only an uninstall (the DaemonSet deleted) removes it.

const NS: &str = "kube-system";
const DS: &str = "tproxy-cni";

/// A node of a cluster: the stand-in API server holds the installer's DaemonSet and its pod, and
/// the fake host's service-account volume carries the stand-in's CA and token.
struct Cluster {
    server: apiserver::ApiServer,
    host: Host,
    uid: String,
    plugin_config: std::path::PathBuf,
}

impl Cluster {
    fn new(tag: &str) -> Cluster {
        let server = apiserver::ApiServer::start();
        let uid = server.add_daemonset(NS, DS);
        let mut host = Host::new(tag);
        host.ca_pem = server.ca_pem().to_owned();
        host.rotate_token(apiserver::TOKEN);
        // The plugin reads the annotations the runtime passes; it needs nothing from the API server.
        let plugin_config = write_settings(
            &host,
            &serde_json::json!({"consul_status_annotation": false, "log_level": "debug",
                                "log_file": host.root.join("plugin.log")})
            .to_string(),
        );
        Cluster { server, host, uid, plugin_config }
    }

    /// Serves the pod `name` of our DaemonSet.
    fn pod(&self, name: &str) {
        self.server.add_pod(apiserver::PodFixture::new(NS, name).owned_by_daemonset(DS, &self.uid));
    }

    /// Starts an installer as pod `pod` (served by the stand-in) with `--cleanup-on-exit mode`,
    /// installing `plugin`.
    fn start(&self, plugin: &std::path::Path, pod: &str, mode: &str, extra: &[&str]) -> Installer {
        let url = self.server.url();
        let kubeconfig = self.host.kubeconfig();
        let mut args = vec![
            "--api-server",
            &url,
            "--pod-namespace",
            NS,
            "--pod-name",
            pod,
            "--cleanup-on-exit",
            mode,
            "--host-kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--plugin-config",
            self.plugin_config.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let _ = fs::remove_file(self.host.ready_file()); // a killed installer leaves its ready file
        self.host.start(plugin, &args)
    }

    /// The number of watch requests the stand-in has received.
    fn watches(&self) -> usize {
        self.server.requests().iter().filter(|r| r.path.contains("watch=true")).count()
    }

    /// Starts an installer and waits until it is ready and its watch on the DaemonSet is open.
    fn start_watching(&self, plugin: &std::path::Path, pod: &str, mode: &str) -> Installer {
        let before = self.watches();
        let inst = self.start(plugin, pod, mode, &[]);
        wait_for(Duration::from_secs(30), "ready", || self.host.ready_file().exists());
        wait_for(Duration::from_secs(30), "the watch on the DaemonSet", || self.watches() > before);
        inst
    }

    /// Is everything of ours in place: the entry, the binary, the kubeconfig and its token?
    fn installed(&self, list: &str) -> bool {
        self.host.chained(list)
            && self.host.bin.join("tproxy-cni").exists()
            && self.host.kubeconfig().exists()
            && self.host.token_copy().exists()
    }
}

/// SIGTERM, then the exit (the API check may wait out its 5 s deadline when the server is down).
fn stop(mut inst: Installer) -> (std::process::ExitStatus, String) {
    inst.signal(libc::SIGTERM);
    let status = inst.wait(Duration::from_secs(20));
    (status, inst.log())
}

/// What one ADD did.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// Succeeded with our rules in the pod's namespace.
    Redirected,
    /// Failed: the pod does not start (fail closed).
    Failed(String),
    /// Succeeded without our rules: a mesh pod passed through. Never acceptable.
    PassedThrough,
    /// The configuration read had no entry of ours, so the runtime ran the primary alone: allowed
    /// only after an uninstall.
    NotChained,
}

/// The part of a container runtime that runs CNI, done the way libcni does it: at each ADD it reads
/// the configuration directory afresh, takes the first file by name (`.conf`, `.conflist`,
/// `.json`) that is a valid configuration (a single plugin becomes a one-plugin list), and runs
/// that list's plugins in order through libcni itself (`cnidrv`), finding binaries in the node's
/// CNI bin dir after the reference plugins.
struct Runtime {
    conf: std::path::PathBuf,
    bin: std::path::PathBuf,
    work: crate::support::TempDir,
    bridge: String,
}

impl Runtime {
    /// A runtime on `host`, whose primary CNI (bridge + host-local, IPv4, no gateway, no route
    /// off the machine) it writes into the conf dir.
    fn new(host: &Host, primary_name: &str) -> Runtime {
        let bridge = crate::support::unique("tpi");
        crate::support::sh(Command::new("ip").args(["link", "add", &bridge, "type", "bridge"]));
        crate::support::sh(Command::new("ip").args(["link", "set", &bridge, "address", "02:00:5e:00:53:02", "up"]));
        let work = crate::support::TempDir::new("rt");
        let primary = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": bridge,
            "plugins": [{
                "type": "bridge", "bridge": bridge, "isGateway": false, "ipMasq": false,
                "ipam": {"type": "host-local", "dataDir": work.path().join("ipam"),
                         "ranges": [[{"subnet": "198.19.0.0/20"}]]},
            }],
        });
        host.put_conf(primary_name, &serde_json::to_vec_pretty(&primary).unwrap());
        Runtime { conf: host.conf.clone(), bin: host.bin.clone(), work, bridge }
    }

    /// The network configuration the runtime would use now, as a list.
    fn config(&self) -> Option<serde_json::Value> {
        let mut names: Vec<String> = fs::read_dir(&self.conf)
            .ok()?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| [".conf", ".conflist", ".json"].iter().any(|x| n.ends_with(x)))
            .collect();
        names.sort();
        for name in names {
            let Ok(bytes) = fs::read(self.conf.join(&name)) else { continue };
            let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&bytes) else { continue };
            if name.ends_with(".conflist") {
                if doc["name"].is_string()
                    && doc["plugins"]
                        .as_array()
                        .is_some_and(|p| !p.is_empty() && p.iter().all(|x| x["type"].is_string()))
                {
                    return Some(doc);
                }
            } else if doc["type"].is_string() {
                return Some(
                    serde_json::json!({"cniVersion": doc["cniVersion"], "name": doc["name"], "plugins": [doc]}),
                );
            }
        }
        None
    }

    /// Starts the Consul pod `n`: a new namespace, ADD through the configuration read now, a look
    /// for our rules, DEL, and the namespace removed.
    fn add(&self, n: usize) -> Outcome {
        let Some(config) = self.config() else { return Outcome::Failed("no network configuration".into()) };
        let chained = config["plugins"].as_array().unwrap().iter().any(|p| p["type"] == "tproxy-cni");
        let list = self.work.path().join(format!("add-{n}.conflist"));
        fs::write(&list, config.to_string()).unwrap();
        let ns = crate::support::Netns::new("tpi");
        let id = format!("c{n}x{}", std::process::id());
        let args =
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-{n};K8S_POD_INFRA_CONTAINER_ID={id}");
        let annotations = crate::support::consul_pod(
            serde_json::json!({"ProxyUserID": "5995", "ProxyInboundPort": 20000, "ProxyOutboundPort": 15001}),
            &[],
        );
        let caps = serde_json::json!({"io.kubernetes.cri.pod-annotations": annotations}).to_string();
        let drive = |verb: &str| {
            Command::new(crate::support::cnidrv())
                .args([verb, list.to_str().unwrap(), ns.path().to_str().unwrap(), &id, &args, &caps])
                .env("CNI_PATH", format!("/usr/lib/cni:{}", self.bin.display()))
                .env("CNIDRV_CACHE", self.work.path().join("cache"))
                .output()
                .unwrap()
        };
        let out = drive("add");
        let outcome = if !out.status.success() {
            Outcome::Failed(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        } else if !chained {
            Outcome::NotChained
        } else {
            // The installer's entry names no engine: the default one, nftables, holds our rules.
            let table = ns.nft_table(crate::support::Fam::V4);
            if table.lines().any(|l| l.contains("jump CONSUL_PROXY_OUTPUT")) {
                Outcome::Redirected
            } else {
                Outcome::PassedThrough
            }
        };
        let _ = drive("del");
        let _ = fs::remove_file(&list);
        outcome
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).status();
    }
}

/// ADDs in a loop on one thread and a tight watch of the configuration on another, until stopped.
struct Traffic {
    stop: Arc<AtomicBool>,
    adds: Arc<std::sync::Mutex<Vec<(std::time::Instant, Outcome)>>>,
    /// Reads of the conf dir, and when one found no entry of ours in the configuration in use.
    reads: Arc<AtomicUsize>,
    unchained: Arc<std::sync::Mutex<Vec<std::time::Instant>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(runtime: Arc<Runtime>) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let adds = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (reads, unchained) = (Arc::new(AtomicUsize::new(0)), Arc::new(std::sync::Mutex::new(Vec::new())));
        let adder = {
            let (stop, adds, rt) = (stop.clone(), adds.clone(), runtime.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                // Bounded: a test that hangs elsewhere still ends this loop.
                while !stop.load(Ordering::Relaxed) && n < 2000 {
                    let at = std::time::Instant::now();
                    let outcome = rt.add(n);
                    adds.lock().unwrap().push((at, outcome));
                    n += 1;
                }
            })
        };
        let reader = {
            let (stop, reads, unchained, rt) = (stop.clone(), reads.clone(), unchained.clone(), runtime);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let chained = rt
                        .config()
                        .is_some_and(|c| c["plugins"].as_array().unwrap().iter().any(|p| p["type"] == "tproxy-cni"));
                    reads.fetch_add(1, Ordering::Relaxed);
                    if !chained {
                        unchained.lock().unwrap().push(std::time::Instant::now());
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        Traffic { stop, adds, reads, unchained, threads: vec![adder, reader] }
    }

    fn count(&self) -> usize {
        self.adds.lock().unwrap().len()
    }

    /// Waits for `n` more ADDs.
    fn more(&self, n: usize) {
        let target = self.count() + n;
        wait_for(Duration::from_secs(60), "ADDs", || self.count() >= target);
    }

    fn finish(mut self) -> (Vec<(std::time::Instant, Outcome)>, usize, Vec<std::time::Instant>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        let adds = self.adds.lock().unwrap().clone();
        (adds, self.reads.load(Ordering::Relaxed), self.unchained.lock().unwrap().clone())
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Mesh pods start in a loop while the installer is SIGKILLed, SIGTERMed with its DaemonSet in
/// place, SIGTERMed during a rolling update, SIGTERMed with the API server unreachable, and killed
/// in a crash loop: every ADD installs the redirect or fails, our entry is never missing from the
/// configuration in use, and the pods that start while no installer runs are redirected. Then the
/// DaemonSet is deleted: the SIGTERM that follows removes everything, byte for byte.
#[test]
fn restarts_crashes_and_upgrades_never_open_a_window_and_only_an_uninstall_removes_the_chain() {
    if !crate::support::privileged() {
        return;
    }
    let c = Cluster::new("window");
    let runtime = Arc::new(Runtime::new(&c.host, "10-bridge.conflist"));
    let (conf_before, bin_before) = (Host::snapshot(&c.host.conf), Host::snapshot(&c.host.bin));
    // The real plugin, without its debug information (the installer copies and checksums it at
    // every start: 14 MB instead of 70).
    let plugin = c.host.root.join("tproxy-cni-stripped");
    crate::support::sh(Command::new("strip").args(["-o", plugin.to_str().unwrap(), BIN]));
    let plugin = plugin.as_path();
    c.pod("tproxy-cni-aaaaa");
    let mut inst = c.start_watching(plugin, "tproxy-cni-aaaaa", "auto");
    let traffic = Traffic::start(runtime.clone());
    traffic.more(2);
    // The stretches of time with no installer process: pods must still be redirected in them.
    let mut gaps = Vec::new();

    // 1. kill -9 (an OOM kill, a liveness kill past the grace period): nothing can be removed.
    let t = std::time::Instant::now();
    inst.kill();
    traffic.more(2);
    inst = c.start_watching(plugin, "tproxy-cni-aaaaa", "auto");
    gaps.push((t, std::time::Instant::now()));

    // 2. SIGTERM with the DaemonSet in place (a container restart, a node reboot).
    let t = std::time::Instant::now();
    let (status, log) = stop(inst);
    assert!(status.success(), "{log}");
    assert!(log.contains("leaving the install in place (DaemonSet kube-system/tproxy-cni is in place"), "{log}");
    assert!(c.installed("10-bridge.conflist"));
    traffic.more(2);
    inst = c.start_watching(plugin, "tproxy-cni-aaaaa", "auto");
    gaps.push((t, std::time::Instant::now()));

    // 3. A rolling update without surge: the template changes, the owner gets SIGTERM first, the
    //    new pod (a newer generation) comes up after it.
    c.server.roll_daemonset(NS, DS);
    let t = std::time::Instant::now();
    let (status, log) = stop(inst);
    assert!(status.success() && log.contains("is in place (a restart or an upgrade)"), "{log}");
    traffic.more(2);
    c.pod("tproxy-cni-bbbbb");
    inst = c.start(plugin, "tproxy-cni-bbbbb", "auto", &["--generation", "2"]);
    wait_for(Duration::from_secs(30), "the new pod ready", || c.host.ready_file().exists());
    gaps.push((t, std::time::Instant::now()));
    wait_for(Duration::from_secs(30), "its watch", || inst.log().contains("watching it"));
    std::thread::sleep(Duration::from_millis(300));

    // 4. The API server unreachable at SIGTERM (and the open watch cut): nothing can be told.
    c.server.set_fault(Some(apiserver::Fault::Hangup));
    c.server.cut_watches();
    let t = std::time::Instant::now();
    let (status, log) = stop(inst);
    assert!(status.success(), "{log}");
    assert!(log.contains("leaving the install in place"), "{log}");
    assert!(c.installed("10-bridge.conflist"));
    traffic.more(2);
    c.server.set_fault(None);

    // 5. A crash loop: killed again and again, sometimes before it is even ready.
    for delay in [0, 30, 150] {
        let i = c.start(plugin, "tproxy-cni-bbbbb", "auto", &["--generation", "2"]);
        std::thread::sleep(Duration::from_millis(delay));
        i.kill();
        traffic.more(1);
    }
    inst = c.start_watching(plugin, "tproxy-cni-bbbbb", "auto");
    gaps.push((t, std::time::Instant::now()));
    traffic.more(3);

    // 6. The uninstall: `kubectl delete ds` (background cascade) removes the DaemonSet, then the
    //    pod gets SIGTERM.
    c.server.delete_daemonset(NS, DS, false);
    wait_for(Duration::from_secs(30), "the watch to see it", || inst.log().contains("will be removed on exit"));
    let uninstall = std::time::Instant::now();
    let (status, log) = stop(inst);
    assert!(status.success(), "{log}");
    assert!(log.contains("uninstalling: DaemonSet kube-system/tproxy-cni is deleted"), "{log}");
    traffic.more(3);
    let (adds, reads, unchained) = traffic.finish();

    let count = |f: &dyn Fn(&Outcome) -> bool| adds.iter().filter(|(_, o)| f(o)).count();
    let before: Vec<_> = adds.iter().filter(|(at, _)| *at < uninstall).collect();
    eprintln!(
        "{} ADDs: {} redirected, {} failed, {} not chained (after the uninstall); {reads} reads of the conf dir",
        adds.len(),
        count(&|o| *o == Outcome::Redirected),
        count(&|o| matches!(o, Outcome::Failed(_))),
        count(&|o| *o == Outcome::NotChained),
    );
    for (_, o) in &adds {
        assert_ne!(*o, Outcome::PassedThrough, "a mesh pod started without its redirect");
    }
    // Before the uninstall every pod is redirected; only the last one may fail, when the removal
    // took the binary away while it was starting.
    let failed: Vec<_> = before.iter().enumerate().filter(|(_, (_, o))| *o != Outcome::Redirected).collect();
    assert!(
        failed.iter().all(|(i, (_, o))| i + 1 == before.len() && matches!(o, Outcome::Failed(_))),
        "before the uninstall: {failed:?}"
    );
    let in_gaps = before.iter().filter(|(at, _)| gaps.iter().any(|(a, b)| at > a && at < b)).count();
    assert!(in_gaps >= 4, "pods started while no installer ran: {in_gaps}");
    assert!(
        unchained.iter().all(|at| *at > uninstall),
        "our entry was missing from the configuration in use before the uninstall"
    );
    assert!(reads > 1000, "{reads}");
    assert!(adds.iter().any(|(at, o)| *at > uninstall && *o == Outcome::NotChained), "the uninstall took effect");
    assert_eq!(Host::snapshot(&c.host.conf), conf_before, "conf dir not restored");
    assert_eq!(Host::snapshot(&c.host.bin), bin_before, "bin dir not restored");
}

/// One way the cluster can stand when the owning installer gets SIGTERM, and what must follow.
struct Case {
    name: &'static str,
    /// `--cleanup-on-exit`.
    mode: &'static str,
    /// Serve the installer's pod as one of the DaemonSet's (false: a bare pod).
    owned: bool,
    /// Pass the pod's name and namespace (the downward API).
    identity: bool,
    /// What happens in the cluster before SIGTERM.
    before: fn(&Cluster, &Installer),
    removed: bool,
    /// In the installer's log.
    says: &'static [&'static str],
}

fn nothing(_: &Cluster, _: &Installer) {}

/// Waits until the installer's watch has seen the DaemonSet's removal or deletion.
fn watch_saw_it(c: &Cluster, inst: &Installer) {
    let _ = c;
    wait_for(Duration::from_secs(30), "the watch to see the deletion", || {
        inst.log().contains("the install will be removed on exit")
    });
}

fn run_cases(cases: &[Case]) {
    for case in cases {
        let c = Cluster::new("exit");
        c.host.put_conf("10-flannel.conf", &golden("primary", "10-flannel.conf"));
        let (conf_before, bin_before) = (Host::snapshot(&c.host.conf), Host::snapshot(&c.host.bin));
        let pod = "tproxy-cni-x7k2p";
        if case.owned {
            c.pod(pod);
        } else {
            c.server.add_pod(apiserver::PodFixture::new(NS, pod));
        }
        let plugin = c.host.fake_plugin("1");
        let inst = if case.identity && case.owned && case.mode == "auto" {
            c.start_watching(&plugin, pod, case.mode)
        } else {
            let extra: &[&str] = if case.identity { &[] } else { &["--pod-name", "", "--pod-namespace", ""] };
            let i = c.start(&plugin, pod, case.mode, extra);
            wait_for(Duration::from_secs(30), "ready", || c.host.ready_file().exists());
            i
        };
        (case.before)(&c, &inst);
        let (status, log) = stop(inst);
        assert!(status.success(), "{}: {log}", case.name);
        for says in case.says {
            assert!(log.contains(says), "{}: expected {says:?} in:\n{log}", case.name);
        }
        if case.mode != "auto" {
            assert!(c.server.requests().is_empty(), "{}: only auto asks the API server", case.name);
        }
        if case.removed {
            assert_eq!(Host::snapshot(&c.host.conf), conf_before, "{}: conf dir not restored\n{log}", case.name);
            assert_eq!(Host::snapshot(&c.host.bin), bin_before, "{}: bin dir not restored\n{log}", case.name);
        } else {
            assert!(c.installed("10-flannel.conflist"), "{}: the install must stay\n{log}", case.name);
        }
        eprintln!("{}: {}", case.name, if case.removed { "removed" } else { "left in place" });
    }
}

/// `auto` tells an uninstall however it is done: `kubectl delete` with a background or foreground
/// cascade, `helm uninstall` (the DaemonSet first, then the RBAC objects, so the GET at SIGTERM is
/// refused: the watch saw the deletion), `kubectl delete -k` (the ServiceAccount first: the token
/// is dead before the DaemonSet goes), a DaemonSet deleted and made again under the same name, and a
/// deletion that happens while the watch is reconnecting.
#[test]
fn auto_removes_the_install_when_the_daemonset_is_deleted() {
    run_cases(&[
        Case {
            name: "kubectl delete ds (background cascade)",
            mode: "auto",
            owned: true,
            identity: true,
            before: |c, _| c.server.delete_daemonset(NS, DS, false),
            removed: true,
            says: &["uninstalling: DaemonSet kube-system/tproxy-cni is deleted"],
        },
        Case {
            name: "kubectl delete ds --cascade=foreground",
            mode: "auto",
            owned: true,
            identity: true,
            before: |c, _| c.server.delete_daemonset(NS, DS, true),
            removed: true,
            says: &["uninstalling: DaemonSet kube-system/tproxy-cni is being deleted"],
        },
        Case {
            name: "helm uninstall: the DaemonSet, then the Role and its binding",
            mode: "auto",
            owned: true,
            identity: true,
            before: |c, inst| {
                c.server.delete_daemonset(NS, DS, false);
                watch_saw_it(c, inst);
                c.server.set_fault(Some(apiserver::Fault::Status(403)));
            },
            removed: true,
            says: &["is deleted (seen by the watch", "with 403 Forbidden"],
        },
        Case {
            name: "kubectl delete -k: the ServiceAccount first, the DaemonSet last",
            mode: "auto",
            owned: true,
            identity: true,
            before: |c, inst| {
                c.server.set_fault(Some(apiserver::Fault::Status(401)));
                c.server.delete_daemonset(NS, DS, false);
                watch_saw_it(c, inst);
            },
            removed: true,
            says: &["is deleted (seen by the watch", "with 401 Unauthorized"],
        },
        Case {
            name: "deleted and made again: another DaemonSet of the same name",
            mode: "auto",
            owned: true,
            identity: true,
            before: |c, _| {
                c.server.delete_daemonset(NS, DS, false);
                c.server.add_daemonset(NS, DS);
            },
            removed: true,
            says: &[
                "uninstalling: DaemonSet kube-system/tproxy-cni (uid",
                "the one of that name now is another object",
            ],
        },
        Case {
            name: "the watch cut off, the DaemonSet deleted while it reconnects, then RBAC gone",
            mode: "auto",
            owned: true,
            identity: true,
            before: |c, inst| {
                let watches = c.watches();
                c.server.cut_watches();
                c.server.delete_daemonset(NS, DS, false);
                wait_for(Duration::from_secs(30), "the watch resumed", || c.watches() > watches);
                watch_saw_it(c, inst);
                c.server.set_fault(Some(apiserver::Fault::Status(403)));
            },
            removed: true,
            says: &["is deleted (seen by the watch"],
        },
    ]);
}

/// `auto` keeps the install on a restart or an upgrade (a new DaemonSet adopting the pod included),
/// and whenever it cannot tell: the API server
/// unreachable, RBAC refusing the GET with the DaemonSet last seen in place (the pod's token dead
/// after a forced deletion, the Role not applied), a 404 that names no object, no pod identity, a
/// pod that no DaemonSet runs.
#[test]
fn auto_keeps_the_install_on_a_restart_and_whenever_it_cannot_tell() {
    run_cases(&[
        Case {
            name: "a restart: the DaemonSet in place",
            mode: "auto",
            owned: true,
            identity: true,
            before: nothing,
            removed: false,
            says: &[
                "leaving the install in place (DaemonSet kube-system/tproxy-cni is in place (a restart or an upgrade))",
            ],
        },
        Case {
            name: "a rolling update: a new template, the same DaemonSet",
            mode: "auto",
            owned: true,
            identity: true,
            before: |c, _| c.server.roll_daemonset(NS, DS),
            removed: false,
            says: &["is in place (a restart or an upgrade)"],
        },
        Case {
            name: "kubectl delete ds --cascade=orphan, then a new DaemonSet adopting this pod",
            mode: "auto",
            owned: true,
            identity: true,
            before: |c, inst| {
                c.server.delete_daemonset(NS, DS, false);
                c.server.add_pod(apiserver::PodFixture::new(NS, "tproxy-cni-x7k2p")); // orphaned
                let uid = c.server.add_daemonset(NS, DS);
                // The new DaemonSet's controller adopts the pod later than the watch sees it.
                wait_for(Duration::from_secs(30), "the new one seen", || inst.log().contains("another object"));
                c.server.add_pod(apiserver::PodFixture::new(NS, "tproxy-cni-x7k2p").owned_by_daemonset(DS, &uid));
            },
            removed: false,
            says: &["is in place (a restart or an upgrade)"],
        },
        Case {
            name: "the API server unreachable",
            mode: "auto",
            owned: true,
            identity: true,
            before: |c, _| {
                c.server.set_fault(Some(apiserver::Fault::Hangup));
                c.server.cut_watches();
            },
            removed: false,
            says: &["as last seen by the watch", "did not answer GET daemonset kube-system/tproxy-cni"],
        },
        Case {
            name: "403 with the DaemonSet in place (no RBAC for it)",
            mode: "auto",
            owned: true,
            identity: true,
            before: |c, _| c.server.set_fault(Some(apiserver::Fault::Status(403))),
            removed: false,
            says: &["as last seen by the watch", "with 403 Forbidden"],
        },
        Case {
            name: "401 with the DaemonSet in place (the pod force-deleted, its token dead)",
            mode: "auto",
            owned: true,
            identity: true,
            before: |c, _| c.server.set_fault(Some(apiserver::Fault::Status(401))),
            removed: false,
            says: &["as last seen by the watch", "with 401 Unauthorized"],
        },
        Case {
            name: "a 404 that names no object (a proxy, an API group not served)",
            mode: "auto",
            owned: true,
            identity: true,
            before: |c, _| c.server.set_fault(Some(apiserver::Fault::Status(404))),
            removed: false,
            says: &["as last seen by the watch", "with 404 but not with the Status the API server sends"],
        },
        Case {
            name: "no pod identity (not run by Kubernetes)",
            mode: "auto",
            owned: true,
            identity: false,
            before: |c, _| c.server.delete_daemonset(NS, DS, false),
            removed: false,
            says: &[
                "cannot tell an uninstall from a restart without the pod's name and namespace",
                "leaving the install in place",
            ],
        },
        Case {
            name: "a pod that no DaemonSet runs",
            mode: "auto",
            owned: false,
            identity: true,
            before: |c, inst| {
                let _ = c;
                wait_for(Duration::from_secs(30), "the warning", || inst.log().contains("is not run by a DaemonSet"));
            },
            removed: false,
            says: &["leaving the install in place (pod kube-system/tproxy-cni-x7k2p is not run by a DaemonSet)"],
        },
    ]);
}

/// `true` removes the install on exit whatever the cluster says (today's behaviour before `auto`);
/// `false` never removes it, even when the DaemonSet is deleted.
#[test]
fn cleanup_on_exit_true_always_removes_and_false_never_does() {
    run_cases(&[
        Case {
            name: "true, the DaemonSet in place",
            mode: "true",
            owned: true,
            identity: true,
            before: nothing,
            removed: true,
            says: &["uninstalling: --cleanup-on-exit=true", "install removed"],
        },
        Case {
            name: "false, the DaemonSet deleted",
            mode: "false",
            owned: true,
            identity: true,
            before: |c, _| c.server.delete_daemonset(NS, DS, false),
            removed: false,
            says: &["leaving the install in place (--cleanup-on-exit=false)"],
        },
    ]);
}

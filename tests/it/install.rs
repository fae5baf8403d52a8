//! The installer as a real process against temporary directories standing in for the host paths:
//! chaining into each golden primary configuration, re-runs, the `.conf` conversion, unknown keys,
//! uninstall byte for byte, the watch under 200 rewrites, overlapping installers during an upgrade,
//! token rotation, readiness, and refusal of bad input.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::support::apiserver;
use crate::support::install::{BIN, Host, Installer, free_port, golden, http_status};
use crate::support::{punctual, wait_for};

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
    assert!(log.contains("cleanup on exit is off"), "{log}");
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
fn waits_for_the_primary_then_chains_within_a_second() {
    let _load = punctual();
    let host = Host::new("wait");
    let inst = host.start(&host.fake_plugin("1"), &[]);
    wait_for(Duration::from_secs(10), "the waiting log line", || inst.log().contains("waiting for the primary CNI"));
    assert!(!host.ready_file().exists());
    host.replace_conf("10-calico.conflist", &golden("primary", "10-calico.conflist"));
    let took = wait_for(Duration::from_secs(1), "our entry", || host.chained("10-calico.conflist"));
    wait_for(Duration::from_secs(1), "ready", || host.ready_file().exists());
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

/// Another process rewrites the primary's file 200 times; after each, our entry is back within a
/// second, and a reader polling the file never sees anything but valid JSON.
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
        let took = wait_for(Duration::from_secs(1), &format!("our entry back after rewrite {i}"), || {
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
        let took =
            wait_for(Duration::from_secs(1), "token copy", || fs::read(host.token_copy()).unwrap() == token.as_bytes());
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

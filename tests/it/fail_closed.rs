//! Fail closed (issue 13): the windows through which a pod could start, or a namespace be left,
//! without its redirect — each forced open on purpose, with the real binary in real namespaces.
//!
//! - DEL is best effort: a missing tool, a tool that refuses or hangs (the nftables engine: its
//!   netlink socket refused, the kernel refusing the batch, the kernel never answering), netlink
//!   refused, a lock held past the deadline, a namespace gone — logged, exit 0; only malformed
//!   input fails it.
//! - Calls on one namespace never undo each other's work: 50 racing ADD/ADD and ADD/DEL pairs,
//!   and an ADD that fails after changing the namespace puts back the copy it replaced.
//! - Nothing hangs: a hung `iptables-restore`, or a kernel that never answers the nftables
//!   engine, ends ADD with a clear error inside `netns_timeout`, the namespace holding what it
//!   held before.
//!
//! Every test runs on both engines ([`both_engines!`]); where a fault belongs to one engine (a
//! hung `iptables-restore`), the other engine meets its own counterpart of it in the same test.
//!
//! Faults are injected from outside the plugin: a tool is replaced in a private mount namespace
//! (`unshare(1)` around the plugin process, a bind mount over `/usr/sbin`), the kernel refuses a
//! table through a native nftables chain, a table of our name owned by another program (`nft`'s
//! `flags owner`), or a loopback without IPv6; netlink sockets are refused, or every netlink
//! request is swallowed unsent, by a seccomp filter on the plugin process; a lock is held by the
//! test itself. The plugin binary has no test hooks.
//!
//! Needs root (skips on a laptop, fails in CI without it).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::both_engines;
use crate::support::harden::{self, Ours};
use crate::support::*;
use serde_json::{Value, json};

/// `netns_timeout` of the calls that meet a hung tool or a held lock (not the nftables engine's
/// own bound on an exchange, two seconds: the message must name the one that applied).
const BUDGET: Duration = Duration::from_millis(1500);
/// How far past its deadlines a call may end on a loaded machine: a behaviour check, not a benchmark.
const SLACK: Duration = Duration::from_secs(3);

/// Kuma configurations that use the nat table only and IPv4 only: they install even where raw
/// cannot be used and where the loopback takes no IPv6 address.
const NAT_A: &str = "cniMode: true\nipFamilyMode: ipv4\nredirect:\n  outbound: {excludePorts: [5432]}\n";
const NAT_B: &str = "cniMode: true\nipFamilyMode: ipv4\nredirect:\n  outbound: {excludePorts: [6543]}\n";
/// One that fails after changing the namespace, in a [`Sandbox::refusing`]: it needs the raw
/// table too (DNS conntrack zones), so the iptables engine's nat commits and then raw fails; and
/// it is dual-stack in a namespace with IPv6, so the nftables engine's batch commits and then
/// Kuma's `::6` cannot be added to the loopback.
const FAILING: &str = "cniMode: true\nredirect:\n  dns: {enabled: true, port: 15053, captureAll: true}\n";
/// One whose rules carry a port no other configuration here has, for a tool to recognise it.
const MARKED: &str = "cniMode: true\nipFamilyMode: ipv4\nredirect:\n  outbound: {excludePorts: [15999]}\n";
/// Kuma's defaults (dual-stack): an IPv6 pass with `::6` on the loopback when the namespace has IPv6.
const DUAL_STACK: &str = "cniMode: true\nredirect:\n  outbound: {excludePorts: [5432]}\n";

fn kuma(yaml: &str) -> Value {
    kuma_pod(Some(yaml), &[])
}

/// The network configuration of a call: `engine`, the pod's annotations, `extra` keys.
fn conf(engine: Engine, annotations: Option<&Value>, extra: Value) -> String {
    let mut c = json!({"cniVersion": "1.0.0", "name": "fc", "type": "tproxy-cni",
        "prevResult": harden::prev_result(false), "log_level": "debug"});
    if let Some(a) = annotations {
        c["runtimeConfig"] = json!({"io.kubernetes.cri.pod-annotations": a});
    }
    for (k, v) in engine.conf().as_object().unwrap().iter().chain(extra.as_object().unwrap()) {
        c[k] = v.clone();
    }
    c.to_string()
}

/// One finished call of the plugin.
struct Call {
    out: Output,
    took: Duration,
}

impl Call {
    fn code(&self) -> u64 {
        if self.out.status.success() { 0 } else { harden::code_of(&self.out) }
    }

    fn msg(&self) -> String {
        let v: Value = serde_json::from_slice(&self.out.stdout).unwrap_or_default();
        v["msg"].as_str().unwrap_or_default().to_owned()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
}

/// Runs `cmd` (the plugin, or a wrapper that ends by exec'ing it) as the runtime would.
fn run(mut cmd: Command, command: &str, ns: &Path, stdin: &str) -> Call {
    let netns = ns.to_str().unwrap();
    cmd.env_clear()
        .envs(harden::env(command, netns, "fc0"))
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t = Instant::now();
    let mut child = cmd.spawn().unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    Call { out, took: t.elapsed() }
}

fn call(command: &str, ns: &Netns, stdin: &str) -> Call {
    run(Command::new(plugin()), command, &ns.path(), stdin)
}

/// A private `/usr/sbin` for one plugin process: every real tool, except the ones replaced by
/// scripts. Inside the scripts, `$REAL` is the directory of the real tools.
struct ToolView {
    dir: TempDir,
}

impl ToolView {
    fn new(replaced: &[(&str, &str)]) -> ToolView {
        let dir = TempDir::new("fct");
        let (real, view) = (dir.path().join("real"), dir.path().join("sbin"));
        fs::create_dir_all(&real).unwrap();
        fs::create_dir_all(&view).unwrap();
        for entry in fs::read_dir("/usr/sbin").unwrap() {
            let name = entry.unwrap().file_name();
            std::os::unix::fs::symlink(real.join(&name), view.join(&name)).unwrap();
        }
        for (name, script) in replaced {
            let path = view.join(name);
            let _ = fs::remove_file(&path);
            fs::write(&path, format!("#!/bin/bash\nREAL={}\n{script}\n", real.display())).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        }
        ToolView { dir }
    }

    /// The plugin, started inside a mount namespace of its own where `/usr/sbin` is this view.
    fn plugin(&self) -> Command {
        ToolView::command_in(self.dir.path())
    }

    /// [`ToolView::plugin`] of the view in `dir`.
    fn command_in(dir: &Path) -> Command {
        let mut c = Command::new("/usr/bin/unshare");
        c.args(["--mount", "--propagation", "private", "/bin/sh", "-c"])
            .arg(r#"mount --bind /usr/sbin "$0/real" && mount --bind "$0/sbin" /usr/sbin && exec "$1""#)
            .arg(dir)
            .arg(plugin());
        c
    }

    fn call(&self, command: &str, ns: &Netns, stdin: &str) -> Call {
        run(self.plugin(), command, &ns.path(), stdin)
    }
}

/// A replacement `iptables-nft-restore` that hangs (and is the process the plugin started, so the
/// plugin's kill reaches it) when its input mentions `marker`, and is the real tool otherwise.
fn restore_hanging_on(marker: &str) -> String {
    format!(
        r#"input=$(cat)
case "$input" in *"{marker}"*) exec sleep 600 ;; esac
printf '%s\n' "$input" | exec "$REAL/iptables-nft-restore" "$@""#
    )
}

/// What of ours the namespace holds, both families, as `engine` installs it: the iptables
/// engine's chains and rules (`iptables-save`), or our nftables tables (`nft list table`).
fn ours(engine: Engine, ns: &Netns) -> String {
    match engine {
        Engine::Iptables(backend) => format!("{:#?}", harden::ours(ns, backend)),
        Engine::Nftables => nft_tables(ns),
    }
}

/// What `engine` must install for a Kuma pod with `yaml` and no IPv6.
fn expected(engine: Engine, yaml: &str) -> String {
    expected_for(engine, &kuma(yaml), false)
}

/// What `engine` must install for a pod with `annotations` (with an IPv6 pass when `v6`): the
/// library's rule builder for the iptables engine, what `nft -f` makes of `render --backend
/// nftables` for the nftables engine.
fn expected_for(engine: Engine, annotations: &Value, v6: bool) -> String {
    match engine {
        Engine::Iptables(_) => format!("{:#?}", harden::expected(annotations, v6)),
        Engine::Nftables => nft_reference(annotations, v6),
    }
}

/// Nothing of ours, as [`ours`] shows it.
fn nothing(engine: Engine) -> String {
    match engine {
        Engine::Iptables(_) => {
            format!("{:#?}", BTreeMap::from([(Fam::V4, Ours::default()), (Fam::V6, Ours::default())]))
        }
        Engine::Nftables => String::new(),
    }
}

/// Does the namespace hold an IPv6 pass of ours?
fn has_v6(engine: Engine, ns: &Netns) -> bool {
    match engine {
        Engine::Iptables(backend) => !harden::ours(ns, backend)[&Fam::V6].is_empty(),
        Engine::Nftables => !ns.nft_table(Fam::V6).is_empty(),
    }
}

/// A pod's namespace with foreign rules in it (the canary), and those rules as planted.
struct Sandbox {
    ns: Netns,
    foreign: BTreeMap<Fam, Vec<String>>,
}

impl Sandbox {
    /// The canary in every table of both families.
    fn new() -> Sandbox {
        let ns = Netns::new("tfc");
        harden::plant_canary(&ns, "nft");
        let foreign = harden::foreign(&ns, "nft");
        Sandbox { ns, foreign }
    }

    /// A namespace where [`FAILING`] fails after changing it, on either engine. Its kernel
    /// refuses iptables' raw table (IPv4): a native nftables base chain named like
    /// iptables-nft's, at a priority iptables-nft does not use, so an iptables transaction's nat
    /// table commits, then its raw table fails. (So the IPv4 canary has no raw rule.) And it has
    /// IPv6 (on a veth of its own) but its loopback takes no IPv6 address, so the nftables
    /// engine's batch for a dual-stack Kuma pod commits, then `::6` cannot be added.
    fn refusing() -> Sandbox {
        let ns = Netns::new("tfr");
        ns.exec(&["nft", "add table ip raw; add chain ip raw OUTPUT { type filter hook output priority 10; }"]);
        ns.exec(&["ip", "link", "add", "fcv0", "type", "veth", "peer", "name", "fcv1"]);
        ns.exec(&["ip", "-6", "addr", "add", "fd18::9/64", "dev", "fcv0", "nodad"]);
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=1"]);
        let v4: String = harden::CANARY.split_inclusive("COMMIT\n").filter(|t| !t.starts_with("*raw")).collect();
        ns.restore(Fam::V4, "nft", &v4);
        ns.restore(Fam::V6, "nft", harden::CANARY);
        let foreign = harden::foreign(&ns, "nft");
        assert_eq!(foreign[&Fam::V4].len(), 3, "{foreign:?}");
        Sandbox { ns, foreign }
    }

    fn canary_intact(&self, what: &str) {
        assert_eq!(harden::foreign(&self.ns, "nft"), self.foreign, "{what}: foreign rules must be untouched");
    }
}

impl std::ops::Deref for Sandbox {
    type Target = Netns;
    fn deref(&self) -> &Netns {
        &self.ns
    }
}

// ---------------------------------------------------------------------------------------------
// Item 5: nothing hangs.

/// Plugin processes for `engine` whose exchange with netfilter hangs: for the iptables engine an
/// `iptables-nft-restore` that hangs (on every input, or only on rules mentioning [`MARKED`]'s
/// port when `marked_only`); for the nftables engine a kernel that never answers (every request
/// the plugin sends over netlink is swallowed unsent, so the plugin's reads wait for an answer
/// that never comes). The view of tools must outlive the calls.
fn hanging(engine: Engine, marked_only: bool) -> (Option<ToolView>, impl Fn() -> Command) {
    let script = if marked_only { restore_hanging_on("--dport 15999") } else { "exec sleep 600".to_owned() };
    let tools = matches!(engine, Engine::Iptables(_)).then(|| ToolView::new(&[("iptables-nft-restore", &script)]));
    let dir = tools.as_ref().map(|t| t.dir.path().to_owned());
    let command = move || match &dir {
        Some(dir) => ToolView::command_in(dir),
        None => faulty(Fault::NetlinkUnanswered),
    };
    (tools, command)
}

/// What a call that met [`hanging`] says.
fn hung_message(engine: Engine) -> [String; 2] {
    let ms = BUDGET.as_millis();
    match engine {
        Engine::Iptables(_) => {
            ["iptables-nft-restore in /run/netns/".into(), format!("did not finish within {ms} ms and was killed")]
        }
        Engine::Nftables => ["nftables in /run/netns/".into(), format!("the kernel did not answer within {ms} ms")],
    }
}

both_engines!(a_hung_exchange_with_netfilter_ends_add_with_a_clear_error_and_the_old_state_kept);
fn a_hung_exchange_with_netfilter_ends_add_with_a_clear_error_and_the_old_state_kept(engine: Engine) {
    if !privileged() {
        return;
    }
    let (_tools, hung) = hanging(engine, true);
    let budget = json!({"netns_timeout": format!("{}ms", BUDGET.as_millis())});

    // A namespace holding a previous copy (put there without the fault).
    let ns = Sandbox::new();
    let first = call("ADD", &ns, &conf(engine, Some(&kuma(NAT_A)), budget.clone()));
    assert_eq!(first.code(), 0, "{}{}", first.msg(), first.stderr());
    assert_eq!(ours(engine, &ns), expected(engine, NAT_A));
    let c = run(hung(), "ADD", &ns.path(), &conf(engine, Some(&kuma(MARKED)), budget.clone()));
    assert_eq!(c.code(), 101, "{}", c.msg());
    assert!(hung_message(engine).iter().all(|m| c.msg().contains(m.as_str())), "{}", c.msg());
    assert!(c.took < BUDGET + BUDGET + SLACK, "ADD ended within netns_timeout (and the undo's budget): {:?}", c.took);
    assert_eq!(ours(engine, &ns), expected(engine, NAT_A), "the namespace holds what it held before the call");
    ns.canary_intact("after the hung ADD");

    // A fresh namespace: nothing of ours afterwards.
    let fresh = Sandbox::new();
    let c = run(hung(), "ADD", &fresh.path(), &conf(engine, Some(&kuma(MARKED)), budget.clone()));
    assert_eq!(c.code(), 101, "{}", c.msg());
    assert!(c.took < BUDGET + BUDGET + SLACK, "{:?}", c.took);
    assert_eq!(ours(engine, &fresh), nothing(engine));
    fresh.canary_intact("after the hung ADD into a fresh namespace");

    // DEL meeting the same hang is best effort, below.
    let del = call("DEL", &ns, &conf(engine, None, json!({})));
    assert_eq!(del.code(), 0, "{}", del.msg());
    assert_eq!(ours(engine, &ns), nothing(engine));
}

both_engines!(a_lock_held_past_the_deadline_fails_add_with_try_again_later_and_never_blocks_del);
fn a_lock_held_past_the_deadline_fails_add_with_try_again_later_and_never_blocks_del(engine: Engine) {
    if !privileged() {
        return;
    }
    let ns = Sandbox::new();
    let budget = json!({"netns_timeout": "1s"});
    let meta = fs::metadata(ns.path()).unwrap();
    let path = PathBuf::from(format!("/run/tproxy-cni/netns/{}-{}.lock", meta.dev(), meta.ino()));
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    // The test holds the namespace's lock, as a call that hangs would.
    let held = fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).unwrap();
    // Safety: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX) }, 0);
    fs::write(&path, format!("pid {}", std::process::id())).unwrap();

    let c = call("ADD", &ns, &conf(engine, Some(&kuma(NAT_A)), budget.clone()));
    assert_eq!(c.code(), 11, "{}", c.msg());
    assert!(
        c.msg().contains(&format!("(pid {}) held its lock", std::process::id())) && c.msg().contains("1000 ms"),
        "{}",
        c.msg()
    );
    assert!(c.took < Duration::from_secs(1) + SLACK, "{:?}", c.took);
    assert_eq!(ours(engine, &ns), nothing(engine), "ADD changed nothing");

    let c = call("DEL", &ns, &conf(engine, None, budget.clone()));
    assert_eq!(c.code(), 0, "{}", c.msg());
    assert!(c.took < Duration::from_secs(1) + SLACK, "{:?}", c.took);
    assert!(c.stderr().contains("held its lock") && c.stderr().contains("nothing removed"), "{}", c.stderr());

    // Released: the next ADD goes through.
    drop(held);
    let c = call("ADD", &ns, &conf(engine, Some(&kuma(NAT_A)), budget));
    assert_eq!(c.code(), 0, "{}", c.msg());
    assert_eq!(ours(engine, &ns), expected(engine, NAT_A));
    assert_eq!(call("DEL", &ns, &conf(engine, None, json!({}))).code(), 0);
    assert!(!path.exists(), "DEL removes the namespace's lock file");
}

// ---------------------------------------------------------------------------------------------
// Item 4: no cross-talk between calls on one namespace.

/// What an ADD of NAT_A races against, in one pair.
#[derive(Debug, Clone, Copy)]
enum Against {
    /// ADD of NAT_A against ADD of FAILING, which fails after changing the namespace.
    FailingAdd,
    /// ADD of NAT_A against ADD of NAT_B.
    OtherAdd,
    /// ADD of NAT_A against DEL.
    Del,
}

/// The code of [`FAILING`]'s ADD in a [`Sandbox::refusing`]: the iptables engine's rules are
/// refused (101), the nftables engine's `::6` (102, the namespace).
fn failing_code(engine: Engine) -> u64 {
    match engine {
        Engine::Iptables(_) => 101,
        Engine::Nftables => 102,
    }
}

both_engines!(fifty_racing_pairs_on_one_namespace_never_undo_each_other);
fn fifty_racing_pairs_on_one_namespace_never_undo_each_other(engine: Engine) {
    if !privileged() {
        return;
    }
    let ns = Sandbox::refusing();
    let netns = ns.path();
    let netns = netns.to_str().unwrap();
    let (a, b, none) = (expected(engine, NAT_A), expected(engine, NAT_B), nothing(engine));
    let conf = |annotations: Option<&Value>| conf(engine, annotations, json!({}));
    let pairs = [Against::FailingAdd, Against::OtherAdd, Against::Del];
    let starts: [Option<&str>; 3] = [None, Some(NAT_A), Some(NAT_B)];
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let t = Instant::now();
    for i in 0..50 {
        let (pair, start) = (pairs[i % 3], starts[(i / 3) % 3]);
        // The state the pair starts from: nothing, or a previous copy of one configuration.
        assert_eq!(call("DEL", &ns, &conf(None)).code(), 0);
        if let Some(yaml) = start {
            assert_eq!(call("ADD", &ns, &conf(Some(&kuma(yaml)))).code(), 0);
        }
        let first = conf(Some(&kuma(NAT_A)));
        let (verb, second) = match pair {
            Against::FailingAdd => ("ADD", conf(Some(&kuma(FAILING)))),
            Against::OtherAdd => ("ADD", conf(Some(&kuma(NAT_B)))),
            Against::Del => ("DEL", conf(None)),
        };
        // Alternate which one starts first.
        let (x, y) = if i % 2 == 0 { (("ADD", &first), (verb, &second)) } else { ((verb, &second), ("ADD", &first)) };
        let px = harden::spawn_plugin(x.0, netns, "fc0", x.1);
        let py = harden::spawn_plugin(y.0, netns, "fc0", y.1);
        let (ox, oy) = (px.wait_with_output().unwrap(), py.wait_with_output().unwrap());
        let (add_a, other) = if i % 2 == 0 { (ox, oy) } else { (oy, ox) };
        let what = format!("pair {i} ({pair:?}, from {start:?})");
        assert!(add_a.status.success(), "{what}: ADD of A: {}", String::from_utf8_lossy(&add_a.stdout));
        let now = ours(engine, &ns);
        match pair {
            Against::FailingAdd => {
                assert_eq!(harden::code_of(&other), failing_code(engine), "{what}: the failing ADD");
                // Whichever ran first, A's copy stands: the failing call undid only its own work.
                assert_eq!(now, a, "{what}");
            }
            Against::OtherAdd => {
                assert!(other.status.success(), "{what}: ADD of B: {}", String::from_utf8_lossy(&other.stdout));
                assert!(now == a || now == b, "{what}: exactly one whole copy of A or of B: {now}");
            }
            Against::Del => {
                assert!(other.status.success(), "{what}: DEL: {}", String::from_utf8_lossy(&other.stdout));
                assert!(now == a || now == none, "{what}: A's whole copy, or nothing: {now}");
            }
        }
        ns.canary_intact(&what);
        let outcome = if now == a {
            "A"
        } else if now == b {
            "B"
        } else {
            "nothing"
        };
        *seen.entry(format!("{pair:?} -> {outcome}")).or_default() += 1;
    }
    eprintln!("50 racing pairs on one namespace in {:.1} s: {seen:?}", t.elapsed().as_secs_f64());
    assert_eq!(call("DEL", &ns, &conf(None)).code(), 0);
}

both_engines!(a_failed_repeated_add_restores_the_previous_copy);
fn a_failed_repeated_add_restores_the_previous_copy(engine: Engine) {
    if !privileged() {
        return;
    }
    // Without a race: a copy of A in place, then an ADD that fails after changing the namespace
    // (iptables: its nat table committed over A's, then raw refused; nftables: its batch
    // committed over A's tables, then `::6` refused). A's copy is put back, not removed.
    let ns = Sandbox::refusing();
    assert_eq!(call("ADD", &ns, &conf(engine, Some(&kuma(NAT_A)), json!({}))).code(), 0);
    let c = call("ADD", &ns, &conf(engine, Some(&kuma(FAILING)), json!({})));
    assert_eq!(c.code(), failing_code(engine), "{}", c.msg());
    assert_eq!(ours(engine, &ns), expected(engine, NAT_A), "the previous copy, whole");
    assert_eq!(ns.passthrough_v6(), 0);
    ns.canary_intact("after the failed ADD");
    // Into a fresh namespace, the same failure leaves nothing of ours.
    let fresh = Sandbox::refusing();
    let c = call("ADD", &fresh, &conf(engine, Some(&kuma(FAILING)), json!({})));
    assert_eq!(c.code(), failing_code(engine), "{}", c.msg());
    assert_eq!(ours(engine, &fresh), nothing(engine));
}

// ---------------------------------------------------------------------------------------------
// Item 3: DEL never blocks a pod's teardown.

/// A namespace holding A's rules, for a DEL to meet a fault in.
fn installed(engine: Engine) -> Sandbox {
    let ns = Sandbox::new();
    let c = call("ADD", &ns, &conf(engine, Some(&kuma(NAT_A)), json!({})));
    assert_eq!(c.code(), 0, "{}", c.msg());
    ns
}

both_engines!(del_succeeds_whatever_fails_and_says_so);
fn del_succeeds_whatever_fails_and_says_so(engine: Engine) {
    if !privileged() {
        return;
    }
    let del = || conf(engine, None, json!({"netns_timeout": format!("{}ms", BUDGET.as_millis())}));
    let ns = installed(engine);
    match engine {
        Engine::Iptables(_) => {
            // The iptables tools are missing (an empty /usr/sbin).
            let c = {
                let mut cmd = Command::new("/usr/bin/unshare");
                cmd.args([
                    "--mount",
                    "--propagation",
                    "private",
                    "/bin/sh",
                    "-c",
                    r#"mount -t tmpfs none /usr/sbin && exec "$0""#,
                ])
                .arg(plugin());
                run(cmd, "DEL", &ns.path(), &del())
            };
            assert_eq!(c.code(), 0, "missing tools: {}", c.msg());
            assert!(
                c.stderr().contains("cannot remove our rules") && c.stderr().contains("not found"),
                "{}",
                c.stderr()
            );
            assert_eq!(ours(engine, &ns), expected(engine, NAT_A), "nothing could be removed; nothing else happened");

            // iptables-restore refuses.
            let refusing = ToolView::new(&[(
                "iptables-nft-restore",
                "cat >/dev/null; echo 'iptables-nft-restore: line 2 failed: injected' >&2; exit 1",
            )]);
            let c = refusing.call("DEL", &ns, &del());
            assert_eq!(c.code(), 0, "{}", c.msg());
            assert!(
                c.stderr().contains("cannot remove our rules") && c.stderr().contains("injected"),
                "{}",
                c.stderr()
            );
        }
        Engine::Nftables => {
            // The plugin may not open a netfilter netlink socket (its counterpart of missing tools).
            let c = run(faulty(Fault::NetlinkRefused(libc::NETLINK_NETFILTER)), "DEL", &ns.path(), &del());
            assert_eq!(c.code(), 0, "netfilter socket refused: {}", c.msg());
            assert!(
                c.stderr().contains("cannot remove our rules")
                    && c.stderr().contains("cannot open a netfilter netlink socket"),
                "{}",
                c.stderr()
            );
            assert_eq!(ours(engine, &ns), expected(engine, NAT_A), "nothing could be removed; nothing else happened");

            // The kernel refuses the batch: a table of our name in the other family belongs to
            // another program, and the one batch that deletes both is refused whole.
            let owned = OwnedTable::hold(&ns);
            let before = ns.nft_table(Fam::V4);
            let c = call("DEL", &ns, &del());
            assert_eq!(c.code(), 0, "{}", c.msg());
            assert!(
                c.stderr().contains("cannot remove our rules") && c.stderr().contains("Operation not permitted"),
                "{}",
                c.stderr()
            );
            assert_eq!(ns.nft_table(Fam::V4), before, "the refused batch removed nothing");
            drop(owned);
            assert_eq!(ours(engine, &ns), expected(engine, NAT_A));
        }
    }

    // The exchange with netfilter hangs (a hung iptables-restore; a kernel that never answers):
    // DEL ends within its budget.
    let (_tools, hung) = hanging(engine, false);
    let c = run(hung(), "DEL", &ns.path(), &del());
    assert_eq!(c.code(), 0, "{}", c.msg());
    assert!(c.took < BUDGET + SLACK, "{:?}", c.took);
    assert!(c.stderr().contains(hung_message(engine)[1].as_str()), "{}", c.stderr());
    assert_eq!(ours(engine, &ns), expected(engine, NAT_A));

    // With nothing failing, the same DEL removes everything.
    assert_eq!(call("DEL", &ns, &del()).code(), 0);
    assert_eq!(ours(engine, &ns), nothing(engine));
    ns.canary_intact("after the DELs");

    // The namespace is gone, or is not a namespace any more.
    let gone = Netns::new("tfg");
    let path = gone.path();
    drop(gone);
    assert_eq!(run(Command::new(plugin()), "DEL", &path, &del()).code(), 0);
    let file = TempDir::new("fcf");
    let not_ns = file.path().join("netns");
    fs::write(&not_ns, "").unwrap();
    assert_eq!(run(Command::new(plugin()), "DEL", &not_ns, &del()).code(), 0);
    // A FIFO where the namespace should be is refused, not waited on (ADD: 102).
    let fifo = file.path().join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let c = run(Command::new(plugin()), "DEL", &fifo, &del());
    assert_eq!(c.code(), 0, "{}", c.msg());
    let c = run(Command::new(plugin()), "ADD", &fifo, &conf(engine, Some(&kuma(NAT_A)), json!({})));
    assert_eq!(c.code(), 102, "{}", c.msg());
    assert!(c.took < SLACK, "{:?}", c.took);

    // Malformed input still fails DEL: it is not a DEL the runtime meant.
    let c = call("DEL", &ns, "{not json");
    assert_eq!(c.code(), 6, "{}", c.msg());
    let c = run(Command::new(plugin()), "DEL", &ns.path(), r#"{"cniVersion":"0.2.0","name":"x","type":"tproxy-cni"}"#);
    assert_eq!(c.code(), 1, "{}", c.msg());
}

both_engines!(del_with_netlink_refused_removes_the_rules_and_succeeds);
fn del_with_netlink_refused_removes_the_rules_and_succeeds(engine: Engine) {
    if !privileged() {
        return;
    }
    // A Kuma pod with an IPv6 pass: its DEL must also remove ::6 from lo, over netlink.
    let ns = Sandbox::new();
    ns.exec(&["ip", "-6", "addr", "add", "fd18::9/128", "dev", "lo", "nodad"]);
    let c = call("ADD", &ns, &conf(engine, Some(&kuma(DUAL_STACK)), json!({})));
    assert_eq!(c.code(), 0, "{}", c.msg());
    assert_eq!(ns.passthrough_v6(), 1);
    assert!(has_v6(engine, &ns));

    // The plugin may not open a NETLINK_ROUTE socket (seccomp); netfilter's NETLINK_NETFILTER
    // (the iptables tools', the nftables engine's) is unaffected.
    let c = run(faulty(Fault::NetlinkRefused(libc::NETLINK_ROUTE)), "DEL", &ns.path(), &conf(engine, None, json!({})));
    assert_eq!(c.code(), 0, "{}", c.msg());
    assert!(c.stderr().contains("cannot open a netlink socket"), "{}", c.stderr());
    assert_eq!(ours(engine, &ns), nothing(engine), "the rules are removed all the same");
    assert_eq!(ns.passthrough_v6(), 1, "only the address was left behind");
    ns.canary_intact("after DEL");
}

/// A fault a seccomp filter on the plugin process (inherited by what it execs) injects.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// `socket(AF_NETLINK, _, protocol)` fails with EACCES.
    NetlinkRefused(i32),
    /// Every `sendto(2)` — how the plugin sends each netlink request — reports success and sends
    /// nothing: the kernel never sees a request, so it never answers.
    NetlinkUnanswered,
}

/// The plugin, with `fault` injected.
fn faulty(fault: Fault) -> Command {
    let mut cmd = Command::new(plugin());
    // Safety: the hook runs in the forked child before exec and only builds a filter on its
    // stack and calls prctl(2) twice, both async-signal-safe.
    unsafe { cmd.pre_exec(move || seccomp(fault)) };
    cmd
}

/// Installs the seccomp filter of `fault` for the calling process; every other system call is
/// allowed.
fn seccomp(fault: Fault) -> std::io::Result<()> {
    #[cfg(target_arch = "x86_64")]
    const ARCH: u32 = 0xc000_003e; // AUDIT_ARCH_X86_64
    #[cfg(target_arch = "aarch64")]
    const ARCH: u32 = 0xc000_00b7; // AUDIT_ARCH_AARCH64
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let stmt = |code, k| libc::sock_filter { code, jt: 0, jf: 0, k };
    let jump = |k, jt, jf| libc::sock_filter { code: JEQ, jt, jf, k };
    let allow = stmt(RET, libc::SECCOMP_RET_ALLOW);
    // seccomp_data: nr at 0, arch at 4, args[i] at 16 + 8i (the low half, on little-endian).
    let refused = [
        stmt(LD_W_ABS, 4),
        jump(ARCH, 0, 6),
        stmt(LD_W_ABS, 0),
        jump(libc::SYS_socket as u32, 0, 4),
        stmt(LD_W_ABS, 16),
        jump(libc::AF_NETLINK as u32, 0, 2),
        stmt(LD_W_ABS, 32),
        jump(
            match fault {
                Fault::NetlinkRefused(protocol) => protocol as u32,
                Fault::NetlinkUnanswered => u32::MAX,
            },
            1,
            0,
        ),
        allow,
        stmt(RET, libc::SECCOMP_RET_ERRNO | libc::EACCES as u32),
    ];
    let unanswered = [
        stmt(LD_W_ABS, 4),
        jump(ARCH, 0, 2),
        stmt(LD_W_ABS, 0),
        jump(libc::SYS_sendto as u32, 1, 0),
        allow,
        // ERRNO with no errno: the call returns 0 (bytes sent).
        stmt(RET, libc::SECCOMP_RET_ERRNO),
    ];
    let filter: &[libc::sock_filter] = match fault {
        Fault::NetlinkRefused(_) => &refused,
        Fault::NetlinkUnanswered => &unanswered,
    };
    let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr() as *mut libc::sock_filter };
    // Safety: plain prctl calls; `prog` and `filter` outlive them.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog as *const libc::sock_fprog) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Item 2, the non-chained case: nothing says whether the pod has IPv6.

both_engines!(without_a_previous_result_the_namespace_says_whether_the_pod_needs_an_ipv6_pass);
fn without_a_previous_result_the_namespace_says_whether_the_pod_needs_an_ipv6_pass(engine: Engine) {
    if !privileged() {
        return;
    }
    let consul = consul_pod(json!({"ProxyUserID": "5995", "ProxyInboundPort": 20000}), &[]);
    let unchained = |ns: &Netns| {
        let mut c: Value = serde_json::from_str(&conf(engine, Some(&consul), json!({}))).unwrap();
        c.as_object_mut().unwrap().remove("prevResult");
        call("ADD", ns, &c.to_string())
    };
    // A namespace with an IPv6 address: its IPv6 traffic must go through the proxy too.
    let v6 = Sandbox::new();
    v6.exec(&["ip", "-6", "addr", "add", "fd18::9/128", "dev", "lo", "nodad"]);
    let c = unchained(&v6);
    assert_eq!(c.code(), 0, "{}", c.msg());
    assert_eq!(ours(engine, &v6), expected_for(engine, &consul, true));
    assert!(has_v6(engine, &v6));
    // One without: no IPv6 pass.
    let v4 = Sandbox::new();
    let c = unchained(&v4);
    assert_eq!(c.code(), 0, "{}", c.msg());
    assert_eq!(ours(engine, &v4), expected_for(engine, &consul, false));
    assert!(!has_v6(engine, &v4));
    // Chained, the previous plugin's result decides, as before.
    let chained = Sandbox::new();
    chained.exec(&["ip", "-6", "addr", "add", "fd18::9/128", "dev", "lo", "nodad"]);
    let c = call("ADD", &chained, &conf(engine, Some(&consul), json!({})));
    assert_eq!(c.code(), 0, "{}", c.msg());
    assert_eq!(ours(engine, &chained), expected_for(engine, &consul, false));
}

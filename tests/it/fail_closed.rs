//! Fail closed (issue 13): the windows through which a pod could start, or a namespace be left,
//! without its redirect — each forced open on purpose, with the real binary in real namespaces.
//!
//! - DEL is best effort: a missing tool, a tool that refuses or hangs, netlink refused, a lock
//!   held past the deadline, a namespace gone — logged, exit 0; only malformed input fails it.
//! - Calls on one namespace never undo each other's work: 50 racing ADD/ADD and ADD/DEL pairs.
//! - Nothing hangs: a hung `iptables-restore` ends ADD with a clear error inside `netns_timeout`,
//!   the namespace holding what it held before.
//!
//! Faults are injected from outside the plugin: a tool is replaced in a private mount namespace
//! (`unshare(1)` around the plugin process, a bind mount over `/usr/sbin`), the kernel refuses a
//! table through a native nftables chain, netlink sockets are refused by a seccomp filter on the
//! plugin process, and a lock is held by the test itself. The plugin binary has no test hooks.
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

use crate::support::harden::{self, Ours};
use crate::support::*;
use serde_json::{Value, json};

/// `netns_timeout` of the calls that meet a hung tool or a held lock.
const BUDGET: Duration = Duration::from_secs(2);
/// How far past its deadlines a call may end on a loaded machine: a behaviour check, not a benchmark.
const SLACK: Duration = Duration::from_secs(3);

/// Kuma configurations that use the nat table only: they install even where raw cannot be used.
const NAT_A: &str = "cniMode: true\nredirect:\n  outbound: {excludePorts: [5432]}\n";
const NAT_B: &str = "cniMode: true\nredirect:\n  outbound: {excludePorts: [6543]}\n";
/// One that needs the raw table too (DNS conntrack zones): nat commits, then raw fails where it
/// cannot be used.
const WITH_RAW: &str = "cniMode: true\nredirect:\n  dns: {enabled: true, port: 15053, captureAll: true}\n";
/// One whose rules carry a port no other configuration here has, for a tool to recognise it.
const MARKED: &str = "cniMode: true\nredirect:\n  outbound: {excludePorts: [15999]}\n";

fn kuma(yaml: &str) -> Value {
    kuma_pod(Some(yaml), &[])
}

/// The network configuration of a call: backend nft, the pod's annotations, `extra` keys.
fn conf(annotations: Option<&Value>, extra: Value) -> String {
    let mut c = json!({"cniVersion": "1.0.0", "name": "fc", "type": "tproxy-cni", "iptables_mode": "nft",
        "prevResult": harden::prev_result(false), "log_level": "debug"});
    if let Some(a) = annotations {
        c["runtimeConfig"] = json!({"io.kubernetes.cri.pod-annotations": a});
    }
    for (k, v) in extra.as_object().unwrap() {
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
        let mut c = Command::new("/usr/bin/unshare");
        c.args(["--mount", "--propagation", "private", "/bin/sh", "-c"])
            .arg(r#"mount --bind /usr/sbin "$0/real" && mount --bind "$0/sbin" /usr/sbin && exec "$1""#)
            .arg(self.dir.path())
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

/// What of ours the namespace holds, both families.
fn ours(ns: &Netns) -> BTreeMap<Fam, Ours> {
    harden::ours(ns, "nft")
}

fn expected(yaml: &str) -> BTreeMap<Fam, Ours> {
    harden::expected(&kuma(yaml), false)
}

fn nothing() -> BTreeMap<Fam, Ours> {
    [(Fam::V4, Ours::default()), (Fam::V6, Ours::default())].into()
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

    /// A namespace whose kernel refuses iptables' raw table (IPv4): a native nftables base chain
    /// named like iptables-nft's, at a priority iptables-nft does not use. A transaction's nat
    /// table commits, then its raw table fails. (So the IPv4 canary has no raw rule.)
    fn refusing_raw() -> Sandbox {
        let ns = Netns::new("tfr");
        ns.exec(&["nft", "add table ip raw; add chain ip raw OUTPUT { type filter hook output priority 10; }"]);
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

#[test]
fn a_hung_iptables_restore_ends_add_with_a_clear_error_and_the_old_state_kept() {
    if !privileged() {
        return;
    }
    let tools = ToolView::new(&[("iptables-nft-restore", &restore_hanging_on("--dport 15999"))]);
    let budget = json!({"netns_timeout": format!("{}s", BUDGET.as_secs())});

    // A namespace holding a previous copy (the same tools, which hang only for the new rules).
    let ns = Sandbox::new();
    let first = tools.call("ADD", &ns, &conf(Some(&kuma(NAT_A)), budget.clone()));
    assert_eq!(first.code(), 0, "{}{}", first.msg(), first.stderr());
    assert_eq!(ours(&ns), expected(NAT_A));
    let c = tools.call("ADD", &ns, &conf(Some(&kuma(MARKED)), budget.clone()));
    assert_eq!(c.code(), 101, "{}", c.msg());
    assert!(
        c.msg().contains("iptables-nft-restore in /run/netns/")
            && c.msg().contains("did not finish within 2000 ms and was killed"),
        "{}",
        c.msg()
    );
    assert!(c.took < BUDGET + BUDGET + SLACK, "ADD ended within netns_timeout (and the undo's budget): {:?}", c.took);
    assert_eq!(ours(&ns), expected(NAT_A), "the namespace holds what it held before the call");
    ns.canary_intact("after the hung ADD");

    // A fresh namespace: nothing of ours afterwards.
    let fresh = Sandbox::new();
    let c = tools.call("ADD", &fresh, &conf(Some(&kuma(MARKED)), budget.clone()));
    assert_eq!(c.code(), 101, "{}", c.msg());
    assert!(c.took < BUDGET + BUDGET + SLACK, "{:?}", c.took);
    assert_eq!(ours(&fresh), nothing());
    fresh.canary_intact("after the hung ADD into a fresh namespace");

    // CHECK and DEL meet a hung tool only through ADD here (they run no restore but DEL's): DEL
    // with every restore hanging is best effort, below.
    let del = call("DEL", &ns, &conf(None, json!({})));
    assert_eq!(del.code(), 0, "{}", del.msg());
    assert_eq!(ours(&ns), nothing());
}

#[test]
fn a_lock_held_past_the_deadline_fails_add_with_try_again_later_and_never_blocks_del() {
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

    let c = call("ADD", &ns, &conf(Some(&kuma(NAT_A)), budget.clone()));
    assert_eq!(c.code(), 11, "{}", c.msg());
    assert!(
        c.msg().contains(&format!("(pid {}) held its lock", std::process::id())) && c.msg().contains("1000 ms"),
        "{}",
        c.msg()
    );
    assert!(c.took < Duration::from_secs(1) + SLACK, "{:?}", c.took);
    assert_eq!(ours(&ns), nothing(), "ADD changed nothing");

    let c = call("DEL", &ns, &conf(None, budget.clone()));
    assert_eq!(c.code(), 0, "{}", c.msg());
    assert!(c.took < Duration::from_secs(1) + SLACK, "{:?}", c.took);
    assert!(c.stderr().contains("held its lock") && c.stderr().contains("nothing removed"), "{}", c.stderr());

    // Released: the next ADD goes through.
    drop(held);
    let c = call("ADD", &ns, &conf(Some(&kuma(NAT_A)), budget));
    assert_eq!(c.code(), 0, "{}", c.msg());
    assert_eq!(ours(&ns), expected(NAT_A));
    assert_eq!(call("DEL", &ns, &conf(None, json!({}))).code(), 0);
    assert!(!path.exists(), "DEL removes the namespace's lock file");
}

// ---------------------------------------------------------------------------------------------
// Item 4: no cross-talk between calls on one namespace.

/// What an ADD of NAT_A races against, in one pair.
#[derive(Debug, Clone, Copy)]
enum Against {
    /// ADD of NAT_A against ADD of WITH_RAW, which fails after committing its nat table.
    FailingAdd,
    /// ADD of NAT_A against ADD of NAT_B.
    OtherAdd,
    /// ADD of NAT_A against DEL.
    Del,
}

#[test]
fn fifty_racing_pairs_on_one_namespace_never_undo_each_other() {
    if !privileged() {
        return;
    }
    let ns = Sandbox::refusing_raw();
    let netns = ns.path();
    let netns = netns.to_str().unwrap();
    let (a, b) = (expected(NAT_A), expected(NAT_B));
    let pairs = [Against::FailingAdd, Against::OtherAdd, Against::Del];
    let starts: [Option<&str>; 3] = [None, Some(NAT_A), Some(NAT_B)];
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let t = Instant::now();
    for i in 0..50 {
        let (pair, start) = (pairs[i % 3], starts[(i / 3) % 3]);
        // The state the pair starts from: nothing, or a previous copy of one configuration.
        assert_eq!(call("DEL", &ns, &conf(None, json!({}))).code(), 0);
        if let Some(yaml) = start {
            assert_eq!(call("ADD", &ns, &conf(Some(&kuma(yaml)), json!({}))).code(), 0);
        }
        let first = conf(Some(&kuma(NAT_A)), json!({}));
        let (verb, second) = match pair {
            Against::FailingAdd => ("ADD", conf(Some(&kuma(WITH_RAW)), json!({}))),
            Against::OtherAdd => ("ADD", conf(Some(&kuma(NAT_B)), json!({}))),
            Against::Del => ("DEL", conf(None, json!({}))),
        };
        // Alternate which one starts first.
        let (x, y) = if i % 2 == 0 { (("ADD", &first), (verb, &second)) } else { ((verb, &second), ("ADD", &first)) };
        let px = harden::spawn_plugin(x.0, netns, "fc0", x.1);
        let py = harden::spawn_plugin(y.0, netns, "fc0", y.1);
        let (ox, oy) = (px.wait_with_output().unwrap(), py.wait_with_output().unwrap());
        let (add_a, other) = if i % 2 == 0 { (ox, oy) } else { (oy, ox) };
        let what = format!("pair {i} ({pair:?}, from {start:?})");
        assert!(add_a.status.success(), "{what}: ADD of A: {}", String::from_utf8_lossy(&add_a.stdout));
        let now = ours(&ns);
        match pair {
            Against::FailingAdd => {
                assert_eq!(harden::code_of(&other), 101, "{what}: the failing ADD");
                // Whichever ran first, A's copy stands: the failing call undid only its own work.
                assert_eq!(now, a, "{what}");
            }
            Against::OtherAdd => {
                assert!(other.status.success(), "{what}: ADD of B: {}", String::from_utf8_lossy(&other.stdout));
                assert!(now == a || now == b, "{what}: exactly one whole copy of A or of B: {now:?}");
            }
            Against::Del => {
                assert!(other.status.success(), "{what}: DEL: {}", String::from_utf8_lossy(&other.stdout));
                assert!(now == a || now == nothing(), "{what}: A's whole copy, or nothing: {now:?}");
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
    assert_eq!(call("DEL", &ns, &conf(None, json!({}))).code(), 0);
}

#[test]
fn a_failed_repeated_add_restores_the_previous_copy() {
    if !privileged() {
        return;
    }
    // Without a race: a copy of A in place, then an ADD whose raw table the kernel refuses after
    // its nat table was committed over A's. A's copy is put back, not removed.
    let ns = Sandbox::refusing_raw();
    assert_eq!(call("ADD", &ns, &conf(Some(&kuma(NAT_A)), json!({}))).code(), 0);
    let c = call("ADD", &ns, &conf(Some(&kuma(WITH_RAW)), json!({})));
    assert_eq!(c.code(), 101, "{}", c.msg());
    assert_eq!(ours(&ns), expected(NAT_A), "the previous copy, whole");
    ns.canary_intact("after the failed ADD");
    // Into a fresh namespace, the same failure leaves nothing of ours.
    let fresh = Sandbox::refusing_raw();
    let c = call("ADD", &fresh, &conf(Some(&kuma(WITH_RAW)), json!({})));
    assert_eq!(c.code(), 101, "{}", c.msg());
    assert_eq!(ours(&fresh), nothing());
}

// ---------------------------------------------------------------------------------------------
// Item 3: DEL never blocks a pod's teardown.

/// A namespace holding A's rules, for a DEL to meet a fault in.
fn installed() -> Sandbox {
    let ns = Sandbox::new();
    let c = call("ADD", &ns, &conf(Some(&kuma(NAT_A)), json!({})));
    assert_eq!(c.code(), 0, "{}", c.msg());
    ns
}

#[test]
fn del_succeeds_whatever_fails_and_says_so() {
    if !privileged() {
        return;
    }
    let del = || conf(None, json!({"netns_timeout": format!("{}s", BUDGET.as_secs())}));

    // The iptables tools are missing (an empty /usr/sbin).
    let ns = installed();
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
    assert!(c.stderr().contains("cannot remove our rules") && c.stderr().contains("not found"), "{}", c.stderr());
    assert_eq!(ours(&ns), expected(NAT_A), "nothing could be removed; nothing else happened");

    // iptables-restore refuses.
    let refusing = ToolView::new(&[(
        "iptables-nft-restore",
        "cat >/dev/null; echo 'iptables-nft-restore: line 2 failed: injected' >&2; exit 1",
    )]);
    let c = refusing.call("DEL", &ns, &del());
    assert_eq!(c.code(), 0, "{}", c.msg());
    assert!(c.stderr().contains("cannot remove our rules") && c.stderr().contains("injected"), "{}", c.stderr());

    // iptables-restore hangs: DEL ends within its budget.
    let hanging = ToolView::new(&[("iptables-nft-restore", "exec sleep 600")]);
    let c = hanging.call("DEL", &ns, &del());
    assert_eq!(c.code(), 0, "{}", c.msg());
    assert!(c.took < BUDGET + SLACK, "{:?}", c.took);
    assert!(c.stderr().contains("did not finish within 2000 ms and was killed"), "{}", c.stderr());
    assert_eq!(ours(&ns), expected(NAT_A));

    // With the real tools, the same DEL removes everything.
    assert_eq!(call("DEL", &ns, &del()).code(), 0);
    assert_eq!(ours(&ns), nothing());
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
    let c = run(Command::new(plugin()), "ADD", &fifo, &conf(Some(&kuma(NAT_A)), json!({})));
    assert_eq!(c.code(), 102, "{}", c.msg());
    assert!(c.took < SLACK, "{:?}", c.took);

    // Malformed input still fails DEL: it is not a DEL the runtime meant.
    let c = call("DEL", &ns, "{not json");
    assert_eq!(c.code(), 6, "{}", c.msg());
    let c = run(Command::new(plugin()), "DEL", &ns.path(), r#"{"cniVersion":"0.2.0","name":"x","type":"tproxy-cni"}"#);
    assert_eq!(c.code(), 1, "{}", c.msg());
}

#[test]
fn del_with_netlink_refused_removes_the_rules_and_succeeds() {
    if !privileged() {
        return;
    }
    // A Kuma pod with an IPv6 pass: its DEL must also remove ::6 from lo, over netlink.
    let ns = Sandbox::new();
    ns.exec(&["ip", "-6", "addr", "add", "fd18::9/128", "dev", "lo", "nodad"]);
    let c = call("ADD", &ns, &conf(Some(&kuma(NAT_A)), json!({})));
    assert_eq!(c.code(), 0, "{}", c.msg());
    assert_eq!(ns.passthrough_v6(), 1);
    assert!(!ours(&ns)[&Fam::V6].is_empty());

    // The plugin may not open a NETLINK_ROUTE socket (seccomp); the iptables tools use
    // NETLINK_NETFILTER and are unaffected.
    let mut cmd = Command::new(plugin());
    // Safety: the hook runs in the forked child before exec and only builds a filter on its
    // stack and calls prctl(2) twice, both async-signal-safe.
    unsafe { cmd.pre_exec(refuse_netlink_route) };
    let c = run(cmd, "DEL", &ns.path(), &conf(None, json!({})));
    assert_eq!(c.code(), 0, "{}", c.msg());
    assert!(c.stderr().contains("cannot open a netlink socket"), "{}", c.stderr());
    assert_eq!(ours(&ns), nothing(), "the rules are removed all the same");
    assert_eq!(ns.passthrough_v6(), 1, "only the address was left behind");
    ns.canary_intact("after DEL");
}

/// A seccomp filter for the calling process (inherited by what it execs): `socket(AF_NETLINK, _,
/// NETLINK_ROUTE)` fails with EACCES; every other system call is allowed.
fn refuse_netlink_route() -> std::io::Result<()> {
    #[cfg(target_arch = "x86_64")]
    const ARCH: u32 = 0xc000_003e; // AUDIT_ARCH_X86_64
    #[cfg(target_arch = "aarch64")]
    const ARCH: u32 = 0xc000_00b7; // AUDIT_ARCH_AARCH64
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let stmt = |code, k| libc::sock_filter { code, jt: 0, jf: 0, k };
    let jump = |k, jt, jf| libc::sock_filter { code: JEQ, jt, jf, k };
    // seccomp_data: nr at 0, arch at 4, args[i] at 16 + 8i (the low half, on little-endian).
    let filter = [
        stmt(LD_W_ABS, 4),
        jump(ARCH, 0, 6),
        stmt(LD_W_ABS, 0),
        jump(libc::SYS_socket as u32, 0, 4),
        stmt(LD_W_ABS, 16),
        jump(libc::AF_NETLINK as u32, 0, 2),
        stmt(LD_W_ABS, 32),
        jump(libc::NETLINK_ROUTE as u32, 1, 0),
        stmt(RET, libc::SECCOMP_RET_ALLOW),
        stmt(RET, libc::SECCOMP_RET_ERRNO | libc::EACCES as u32),
    ];
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

#[test]
fn without_a_previous_result_the_namespace_says_whether_the_pod_needs_an_ipv6_pass() {
    if !privileged() {
        return;
    }
    let consul = consul_pod(json!({"ProxyUserID": "5995", "ProxyInboundPort": 20000}), &[]);
    let unchained = |ns: &Netns| {
        let mut c: Value = serde_json::from_str(&conf(Some(&consul), json!({}))).unwrap();
        c.as_object_mut().unwrap().remove("prevResult");
        call("ADD", ns, &c.to_string())
    };
    // A namespace with an IPv6 address: its IPv6 traffic must go through the proxy too.
    let v6 = Sandbox::new();
    v6.exec(&["ip", "-6", "addr", "add", "fd18::9/128", "dev", "lo", "nodad"]);
    let c = unchained(&v6);
    assert_eq!(c.code(), 0, "{}", c.msg());
    assert_eq!(ours(&v6), harden::expected(&consul, true));
    assert!(!ours(&v6)[&Fam::V6].is_empty());
    // One without: no IPv6 pass.
    let v4 = Sandbox::new();
    let c = unchained(&v4);
    assert_eq!(c.code(), 0, "{}", c.msg());
    assert_eq!(ours(&v4), harden::expected(&consul, false));
    assert!(ours(&v4)[&Fam::V6].is_empty());
    // Chained, the previous plugin's result decides, as before.
    let chained = Sandbox::new();
    chained.exec(&["ip", "-6", "addr", "add", "fd18::9/128", "dev", "lo", "nodad"]);
    let c = call("ADD", &chained, &conf(Some(&consul), json!({})));
    assert_eq!(c.code(), 0, "{}", c.msg());
    assert_eq!(ours(&chained), harden::expected(&consul, false));
}

//! What a pod's ADD costs, measured side by side in one run on the same rule set in fresh pod
//! namespaces: tproxy-cni against the strategies the other mesh CNIs use. Prints a table; never
//! fails on a slow machine (it is a benchmark, not a test). Needs root.
//!
//!   cargo bench --bench cni_add            (hack/bench.sh builds and runs it)
//!   BENCH_RUNS=200 (default) runs per strategy; BENCH_QUICK=1 for a smoke run.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tproxy_cni::mesh::{self, PodNetwork};
use tproxy_cni::rules;

fn plugin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tproxy-cni"))
}

/// A fresh, empty network namespace, removed on drop.
struct Ns(String);

impl Ns {
    fn new() -> Ns {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!("tpbench{}x{}", std::process::id() % 100_000, N.fetch_add(1, Ordering::Relaxed));
        run(Command::new("ip").args(["netns", "add", &name]));
        Ns(name)
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.0)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `cmd` with `stdin`, waits with wait4, returns (elapsed, max RSS in KiB, success).
fn timed(cmd: &mut Command, stdin: &str) -> (Duration, i64, bool) {
    let start = Instant::now();
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    if let Some(mut s) = child.stdin.take() {
        let _ = s.write_all(stdin.as_bytes());
    }
    let (mut status, pid) = (0, child.id() as libc::pid_t);
    // Safety: an all-zero rusage is valid; wait4 reaps our own child and fills both out-params.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // Safety: pid is our unreaped child; the pointers are to locals.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let elapsed = start.elapsed();
    std::mem::forget(child); // Already reaped by wait4.
    (elapsed, ru.ru_maxrss, rc == pid && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0)
}

fn cni_env(ns: &Ns, cmd: &mut Command) {
    cmd.env_clear()
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "bench")
        .env("CNI_NETNS", ns.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=bench");
}

fn stdin_for(annotations: &Value, mode: &str) -> String {
    json!({
        "cniVersion": "1.0.0", "name": "bench", "type": "tproxy-cni", "iptables_mode": mode,
        "runtimeConfig": {"io.kubernetes.cri.pod-annotations": annotations},
        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "198.18.0.2/24"}]},
    })
    .to_string()
}

fn consul_pod(cidrs: usize, ports: usize) -> Value {
    let cidr_list: Vec<String> = (0..cidrs).map(|i| format!("10.{}.{}.0/24", i / 256, i % 256)).collect();
    let port_list: Vec<String> = (0..ports).map(|i| (10_000 + i).to_string()).collect();
    let config = json!({
        "ConsulDNSIP": "127.0.0.1", "ConsulDNSPort": 8600, "ProxyUserID": "5995",
        "ProxyInboundPort": 20000, "ProxyOutboundPort": 15001,
        "ExcludeInboundPorts": ["9090"], "ExcludeOutboundPorts": port_list,
        "ExcludeOutboundCIDRs": cidr_list, "ExcludeUIDs": ["5996"],
    });
    json!({
        "consul.hashicorp.com/connect-inject-status": "injected",
        "consul.hashicorp.com/transparent-proxy-status": "enabled",
        "consul.hashicorp.com/redirect-traffic-config": config.to_string(),
    })
}

/// The IPv4 restore transaction tproxy-cni installs for these annotations.
fn transaction(annotations: &Value) -> String {
    let a: mesh::Annotations = serde_json::from_value(annotations.clone()).unwrap();
    let r = mesh::classify(&a, PodNetwork::default()).unwrap().unwrap();
    rules::render_fresh(&rules::build(&r)[0])
}

#[derive(Default)]
struct Stats {
    samples: Vec<Duration>,
    failures: usize,
    max_rss_kib: i64,
}

impl Stats {
    fn add(&mut self, (d, rss, ok): (Duration, i64, bool)) {
        self.samples.push(d);
        self.max_rss_kib = self.max_rss_kib.max(rss);
        self.failures += usize::from(!ok);
    }

    fn pct(&self, p: f64) -> f64 {
        let mut s = self.samples.clone();
        s.sort();
        let i = ((s.len() as f64 - 1.0) * p).round() as usize;
        s[i].as_secs_f64() * 1e3
    }
}

/// Measures `f` on `runs` fresh namespaces (namespace creation is not timed).
fn measure(runs: usize, mut f: impl FnMut(&Ns) -> (Duration, i64, bool)) -> Stats {
    let mut st = Stats::default();
    for _ in 0..runs {
        let ns = Ns::new();
        st.add(f(&ns));
    }
    st
}

fn tproxy_add(annotations: &Value, mode: &'static str) -> impl FnMut(&Ns) -> (Duration, i64, bool) {
    let stdin = stdin_for(annotations, mode);
    move |ns| {
        let mut cmd = Command::new(plugin());
        cni_env(ns, &mut cmd);
        timed(&mut cmd, &stdin)
    }
}

/// consul-cni's way: one `iptables` process per rule, entered with nsenter.
fn per_rule(tx: &str) -> impl FnMut(&Ns) -> (Duration, i64, bool) {
    let lines: Vec<Vec<String>> = tx
        .lines()
        .filter(|l| l.starts_with('-'))
        .map(|l| {
            let mut args = vec!["-t".to_owned(), "nat".to_owned()];
            args.extend(shell_words(l));
            args
        })
        .collect();
    move |ns| {
        let start = Instant::now();
        let mut ok = true;
        let mut rss = 0;
        for args in &lines {
            let mut cmd = Command::new("nsenter");
            cmd.arg(format!("--net={}", ns.path().display())).arg("iptables-nft").args(args);
            let (_, r, good) = timed(&mut cmd, "");
            ok &= good;
            rss = rss.max(r);
        }
        (start.elapsed(), rss, ok)
    }
}

/// Istio's and kuma-cni's way: iptables-save, then one iptables-restore, each entered with nsenter.
fn save_then_restore(tx: &str) -> impl FnMut(&Ns) -> (Duration, i64, bool) {
    let tx = tx.to_owned();
    move |ns| {
        let start = Instant::now();
        let net = format!("--net={}", ns.path().display());
        let (_, r1, ok1) = timed(Command::new("nsenter").args([&net, "iptables-nft-save"]), "");
        let (_, r2, ok2) =
            timed(Command::new("nsenter").args([net.as_str(), "iptables-nft-restore", "--noflush"]), &tx);
        (start.elapsed(), r1.max(r2), ok1 && ok2)
    }
}

/// The floor of any approach that runs iptables-restore: one bare restore, entered by setns in the
/// child exactly as the plugin does it.
fn bare_restore(tx: &str) -> impl FnMut(&Ns) -> (Duration, i64, bool) {
    let tx = tx.to_owned();
    move |ns| {
        let f = File::open(ns.path()).unwrap();
        let fd = f.as_raw_fd();
        let mut cmd = Command::new("/usr/sbin/iptables-nft-restore");
        cmd.arg("--noflush");
        // Safety: setns in the forked child only, before exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
            });
        }
        timed(&mut cmd, &tx)
    }
}

/// The same restore, entered the way an operator would: `nsenter --net=… iptables-restore`.
fn nsenter_restore(tx: &str) -> impl FnMut(&Ns) -> (Duration, i64, bool) {
    let tx = tx.to_owned();
    move |ns| {
        timed(
            Command::new("nsenter")
                .arg(format!("--net={}", ns.path().display()))
                .args(["iptables-nft-restore", "--noflush"]),
            &tx,
        )
    }
}

fn shell_words(line: &str) -> Vec<String> {
    line.split_whitespace().map(str::to_owned).collect()
}

/// 64 pods ADDed at once: wall time and failures.
fn concurrent(annotations: &Value, mode: &'static str, n: usize) -> (Duration, usize) {
    let namespaces: Vec<Ns> = (0..n).map(|_| Ns::new()).collect();
    let stdin = stdin_for(annotations, mode);
    let start = Instant::now();
    let children: Vec<_> = namespaces
        .iter()
        .map(|ns| {
            let mut cmd = Command::new(plugin());
            cni_env(ns, &mut cmd);
            let mut c = cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
            c.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
            c
        })
        .collect();
    let failures = children.into_iter().map(|c| c.wait_with_output().unwrap()).filter(|o| !o.status.success()).count();
    (start.elapsed(), failures)
}

fn main() {
    // Cargo passes --bench; nothing else is accepted.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("cni_add: needs root (network namespaces, iptables); run hack/bench.sh as root");
        std::process::exit(1);
    }
    let quick = std::env::var_os("BENCH_QUICK").is_some();
    let runs: usize =
        std::env::var("BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(if quick { 10 } else { 200 });
    let consul = consul_pod(1, 1);
    let tx = transaction(&consul);
    let plain = json!({"app": "web"});

    println!("ADD latency, {runs} runs each, fresh namespace per run (ms)\n");
    println!("| strategy | programs exec'd | p50 | p95 | failures | vs tproxy-cni p50 |");
    println!("|---|---:|---:|---:|---:|---:|");
    let mut rows: BTreeMap<u8, (String, String, Stats)> = BTreeMap::new();
    rows.insert(
        0,
        (
            "tproxy-cni ADD, Consul pod (annotations from runtimeConfig)".into(),
            "2".into(),
            measure(runs, tproxy_add(&consul, "nft")),
        ),
    );
    rows.insert(
        1,
        (
            "one iptables process per rule via nsenter (consul-cni)".into(),
            format!("{}", 2 * tx.lines().filter(|l| l.starts_with('-')).count()),
            measure(runs, per_rule(&tx)),
        ),
    );
    rows.insert(
        2,
        (
            "iptables-save + iptables-restore via nsenter (istio-cni, kuma-cni)".into(),
            "4".into(),
            measure(runs, save_then_restore(&tx)),
        ),
    );
    rows.insert(
        3,
        (
            "one bare iptables-restore, setns before exec (the floor)".into(),
            "1".into(),
            measure(runs, bare_restore(&tx)),
        ),
    );
    rows.insert(
        4,
        (
            "one iptables-restore via nsenter (the same rules applied by hand)".into(),
            "2".into(),
            measure(runs, nsenter_restore(&tx)),
        ),
    );
    rows.insert(
        5,
        (
            "ip netns exec NS true (entering a netns, nothing else)".into(),
            "1".into(),
            measure(runs, |ns: &Ns| timed(Command::new("ip").args(["netns", "exec", &ns.0, "true"]), "")),
        ),
    );
    rows.insert(
        6,
        ("tproxy-cni ADD, pod in no mesh (pass-through)".into(), "1".into(), measure(runs, tproxy_add(&plain, "nft"))),
    );
    rows.insert(
        7,
        (
            "/bin/cat reading the same stdin (the cost of starting any process)".into(),
            "1".into(),
            measure(runs, |_: &Ns| timed(&mut Command::new("cat"), "{}")),
        ),
    );
    let base = rows[&0].2.pct(0.5);
    for (name, procs, st) in rows.values() {
        println!(
            "| {name} | {procs} | {:.2} | {:.2} | {} | {:.2}x |",
            st.pct(0.5),
            st.pct(0.95),
            st.failures,
            st.pct(0.5) / base
        );
    }
    let ours = &rows[&0].2;
    println!(
        "\ntproxy-cni / per-rule = {:.2} (target <= 0.3); tproxy-cni / nsenter + restore = {:.2}; \
         tproxy-cni / bare restore = {:.2} (target <= 1.1); tproxy-cni - bare restore = {:.2} ms, \
         starting any process = {:.2} ms",
        ours.pct(0.5) / rows[&1].2.pct(0.5),
        ours.pct(0.5) / rows[&4].2.pct(0.5),
        ours.pct(0.5) / rows[&3].2.pct(0.5),
        ours.pct(0.5) - rows[&3].2.pct(0.5),
        rows[&7].2.pct(0.5),
    );

    println!("\n64 concurrent ADDs (Consul pod)\n");
    println!("| backend | wall time (ms) | failures |");
    println!("|---|---:|---:|");
    for mode in ["nft", "legacy"] {
        let (wall, failures) = concurrent(&consul, mode, 64);
        println!("| {mode} | {:.1} | {failures} |", wall.as_secs_f64() * 1e3);
    }

    let scale_runs = if quick { 5 } else { 30 };
    println!("\nRule-count scaling: excluded outbound CIDRs and ports, {scale_runs} runs each (ms)\n");
    println!("| excluded CIDRs + ports | rules (IPv4) | tproxy-cni p50 | bare restore p50 |");
    println!("|---:|---:|---:|---:|");
    for n in [10, 100, 1000] {
        let pod = consul_pod(n, n);
        let tx = transaction(&pod);
        let ours = measure(scale_runs, tproxy_add(&pod, "nft"));
        let bare = measure(scale_runs, bare_restore(&tx));
        println!(
            "| {n} + {n} | {} | {:.2} | {:.2} |",
            tx.lines().filter(|l| l.starts_with("-A")).count(),
            ours.pct(0.5),
            bare.pct(0.5)
        );
    }

    let stripped = std::env::temp_dir().join(format!("tproxy-cni-stripped-{}", std::process::id()));
    std::fs::copy(plugin(), &stripped).unwrap();
    run(Command::new("strip").arg(&stripped));
    let size = std::fs::metadata(&stripped).unwrap().len();
    let _ = std::fs::remove_file(&stripped);
    println!("\nResources\n");
    println!("| what | value |");
    println!("|---|---:|");
    println!("| max RSS, pass-through ADD (the plugin alone) | {} KiB |", rows[&6].2.max_rss_kib);
    println!("| max RSS, Consul ADD (the plugin or the iptables-restore it runs) | {} KiB |", ours.max_rss_kib);
    println!("| stripped binary size | {} KiB |", size / 1024);
}

//! What a pod's ADD costs, measured side by side in one run on the same rule sets in fresh pod
//! namespaces: tproxy-cni for a Consul pod and a Kuma pod, with annotations from the runtime
//! (`runtimeConfig`) and from the API-server stand-in over real TLS, against the strategies the
//! other mesh CNIs use on the same rules. Prints markdown tables (the figures in
//! `docs/performance.md` come from here); never fails on a slow machine (it is a benchmark, not a
//! test). Needs root.
//!
//! The nftables engine is measured the same way, against the iptables engine, one bare
//! iptables-restore of the same rules and a pass-through ADD, and by the rate of new connections
//! through the redirect with a thousand excluded networks.
//!
//!   cargo bench --bench cni_add            (hack/bench.sh builds and runs it)
//!   BENCH_RUNS=200 (default) runs per row; BENCH_QUICK=1 for a smoke run; BENCH_PLUGIN=PATH
//!   measures that binary instead of cargo's build (hack/bench.sh: the static musl build).

// The API-server stand-in of the integration tests; the benchmark uses part of it.
#[allow(dead_code)]
#[path = "../tests/it/support/apiserver.rs"]
mod apiserver;

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use apiserver::{ApiServer, PodFixture};
use serde_json::{Value, json};
use tproxy_cni::core::mesh::{self, PodNetwork};
use tproxy_cni::core::redirect::Family;
use tproxy_cni::core::{nft, rules};

/// The plugin measured: `BENCH_PLUGIN` (hack/bench.sh sets it to the statically linked musl
/// build, the binary the image ships), else the build cargo made for this benchmark.
fn plugin() -> PathBuf {
    std::env::var_os("BENCH_PLUGIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_tproxy-cni")), PathBuf::from)
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

/// One measured run: elapsed time, success.
type Sample = (Duration, bool);

/// Runs `cmd` with `stdin` and measures it, from spawn to reaping.
fn timed(cmd: &mut Command, stdin: &str) -> Sample {
    let start = Instant::now();
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    if let Some(mut s) = child.stdin.take() {
        let _ = s.write_all(stdin.as_bytes());
    }
    let ok = child.wait().is_ok_and(|s| s.success());
    (start.elapsed(), ok)
}

/// The peak RSS in KiB of the plugin's ADD (or of the iptables-restore it runs, whichever is
/// larger), as GNU time reports it. time forks the program from its own small process; the figure
/// `wait4` gives for a child spawned straight from this (larger) process would include this
/// process's own memory, because Linux carries the old memory's peak across `exec`.
fn peak_rss(stdin: &str, name: &str) -> Option<i64> {
    let ns = Ns::new();
    let out_file = std::env::temp_dir().join(format!("tproxy-cni-rss-{}", std::process::id()));
    let mut cmd = Command::new("/usr/bin/time");
    cni_env(&ns, "ADD", name, &mut cmd);
    cmd.arg("-f").arg("%M").arg("-o").arg(&out_file).arg(plugin());
    let (_, ok) = timed(&mut cmd, stdin);
    let kib = std::fs::read_to_string(&out_file).ok().and_then(|s| s.trim().parse().ok());
    let _ = std::fs::remove_file(&out_file);
    kib.filter(|_| ok)
}

/// The CNI environment of an ADD (or `command`) for pod `default/name` in `ns`.
fn cni_env(ns: &Ns, command: &str, name: &str, cmd: &mut Command) {
    cmd.env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "bench")
        .env("CNI_NETNS", ns.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}"));
}

/// Where the plugin finds the pod's annotations.
enum Source<'a> {
    /// `runtimeConfig`, as containerd and CRI-O pass them.
    Runtime(&'a Value),
    /// The API server, through this kubeconfig; `status`: Consul's status annotation on or off.
    Api { kubeconfig: &'a Path, status: bool },
    /// `runtimeConfig`, with a kubeconfig for Consul's status annotation (what the installer sets
    /// up on a containerd or CRI-O node).
    RuntimeReporting(&'a Value, &'a Path),
}

/// The plugin's stdin; `mode` is an `iptables_mode` (`nft`, `legacy`, `auto`), or `nftables` for
/// the nftables engine.
fn stdin_for(source: &Source, mode: &str) -> String {
    let mut conf = json!({
        "cniVersion": "1.0.0", "name": "bench", "type": "tproxy-cni",
        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "198.18.0.2/24"}]},
    });
    if mode == "nftables" {
        conf["backend"] = json!("nftables");
    } else {
        // The iptables engine is not the default: named, as the ConfigMap of a node that keeps it.
        conf["backend"] = json!("iptables");
        conf["iptables_mode"] = json!(mode);
    }
    match source {
        Source::Runtime(annotations) => {
            conf["runtimeConfig"] = json!({"io.kubernetes.cri.pod-annotations": annotations});
        }
        Source::Api { kubeconfig, status } => {
            conf["kubeconfig"] = json!(kubeconfig);
            conf["consul_status_annotation"] = json!(status);
        }
        Source::RuntimeReporting(annotations, kubeconfig) => {
            conf["runtimeConfig"] = json!({"io.kubernetes.cri.pod-annotations": annotations});
            conf["kubeconfig"] = json!(kubeconfig);
        }
    }
    conf.to_string()
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

/// A Kuma pod as a current webhook in CNI mode annotates it (the `webhook-yaml` golden case: DNS
/// captured with conntrack zones, an excluded inbound port).
fn kuma_pod() -> Value {
    let case: Value = serde_json::from_str(include_str!("../tests/golden/kuma/webhook-yaml.json")).unwrap();
    case["annotations"].clone()
}

/// The pod as the API server serves it: the same annotations, and (for Kuma) its containers.
fn fixture(name: &str, annotations: &Value, containers: &[&str]) -> PodFixture {
    let mut pod = PodFixture::new("default", name);
    for (k, v) in annotations.as_object().unwrap() {
        pod = pod.annotation(k, v.as_str().unwrap());
    }
    containers.iter().fold(pod, |p, c| p.container(c))
}

/// The IPv4 restore transaction tproxy-cni installs for these annotations.
fn transaction(annotations: &Value) -> String {
    let a: mesh::Annotations = serde_json::from_value(annotations.clone()).unwrap();
    let r = mesh::classify(&a, PodNetwork::default()).unwrap().unwrap();
    rules::render_fresh(&rules::build(&r)[0])
}

/// The restore transactions of both families, for a pod with IPv6.
fn transactions_dual(annotations: &Value) -> (String, String) {
    let a: mesh::Annotations = serde_json::from_value(annotations.clone()).unwrap();
    let r = mesh::classify(&a, PodNetwork { has_ipv6: true }).unwrap().unwrap();
    let sets = rules::build(&r);
    (rules::render_fresh(&sets[0]), rules::render_fresh(&sets[1]))
}

/// The `nft -f` script of the nftables engine's batch for these annotations.
fn nft_script(annotations: &Value, has_ipv6: bool) -> String {
    let a: mesh::Annotations = serde_json::from_value(annotations.clone()).unwrap();
    let r = mesh::classify(&a, PodNetwork { has_ipv6 }).unwrap().unwrap();
    nft::render::script(&nft::from_rules(&rules::build(&r)), &Family::ALL)
}

/// `stdin` with an IPv6 address in the previous result too (a dual-stack pod).
fn dual_stack(stdin: &str) -> String {
    let mut conf: Value = serde_json::from_str(stdin).unwrap();
    conf["prevResult"]["ips"].as_array_mut().unwrap().push(json!({"address": "fd18::2/64"}));
    conf.to_string()
}

#[derive(Default)]
struct Stats {
    samples: Vec<Duration>,
    failures: usize,
}

impl Stats {
    fn add(&mut self, (d, ok): Sample) {
        self.samples.push(d);
        self.failures += usize::from(!ok);
    }

    fn pct(&self, p: f64) -> f64 {
        let mut s = self.samples.clone();
        s.sort();
        let i = ((s.len() as f64 - 1.0) * p).round() as usize;
        s[i].as_secs_f64() * 1e3
    }
}

/// One way of doing the work: what it is, how many programs it execs, and one run of it.
struct Strategy<'a> {
    what: String,
    programs: String,
    run: Box<dyn FnMut(&Ns) -> Sample + 'a>,
}

fn strategy<'a>(what: &str, programs: impl ToString, run: impl FnMut(&Ns) -> Sample + 'a) -> Strategy<'a> {
    Strategy { what: what.to_owned(), programs: programs.to_string(), run: Box::new(run) }
}

/// Measures every strategy `runs` times, interleaved — one run of each in turn, each in a fresh
/// namespace (creating and removing it is not timed) — so that whatever else the machine is
/// doing weighs on all of them alike.
fn measure_all(runs: usize, mut strategies: Vec<Strategy>) -> Vec<Row> {
    let mut stats: Vec<Stats> = strategies.iter().map(|_| Stats::default()).collect();
    for _ in 0..runs {
        for (s, st) in strategies.iter_mut().zip(&mut stats) {
            let ns = Ns::new();
            st.add((s.run)(&ns));
        }
    }
    strategies.into_iter().zip(stats).map(|(s, stats)| Row { what: s.what, programs: s.programs, stats }).collect()
}

fn tproxy_add(stdin: String, name: &'static str) -> impl FnMut(&Ns) -> Sample {
    move |ns| {
        let mut cmd = Command::new(plugin());
        cni_env(ns, "ADD", name, &mut cmd);
        timed(&mut cmd, &stdin)
    }
}

/// Splits a restore line into words, keeping a double-quoted comment whole.
fn words(line: &str) -> Vec<String> {
    let (mut out, mut word, mut quoted) = (Vec::new(), String::new(), false);
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !word.is_empty() {
                    out.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        out.push(word);
    }
    out
}

/// The transaction as separate `iptables` invocations: `-t TABLE` and one chain or rule each.
fn per_rule_commands(tx: &str) -> Vec<Vec<String>> {
    let mut table = String::new();
    let mut cmds = Vec::new();
    for line in tx.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.to_owned();
        } else if line.starts_with('-') {
            let mut args = vec!["-t".to_owned(), table.clone()];
            args.extend(words(line));
            cmds.push(args);
        }
    }
    cmds
}

/// consul-cni's way: one `iptables` process per rule, entered with nsenter.
fn per_rule(tx: &str) -> impl FnMut(&Ns) -> Sample {
    let commands = per_rule_commands(tx);
    move |ns| {
        let start = Instant::now();
        let mut ok = true;
        for args in &commands {
            let mut cmd = Command::new("nsenter");
            cmd.arg(format!("--net={}", ns.path().display())).arg("iptables-nft").args(args);
            ok &= timed(&mut cmd, "").1;
        }
        (start.elapsed(), ok)
    }
}

/// Istio's and kuma-cni's way: iptables-save, then one iptables-restore, each entered with nsenter.
fn save_then_restore(tx: &str) -> impl FnMut(&Ns) -> Sample {
    let tx = tx.to_owned();
    move |ns| {
        let start = Instant::now();
        let net = format!("--net={}", ns.path().display());
        let (_, ok1) = timed(Command::new("nsenter").args([&net, "iptables-nft-save"]), "");
        let (_, ok2) = timed(Command::new("nsenter").args([net.as_str(), "iptables-nft-restore", "--noflush"]), &tx);
        (start.elapsed(), ok1 && ok2)
    }
}

/// The same two programs, each entered by setns in the forked child (as a plugin that enters the
/// namespace in-process would run them), without nsenter's own exec.
fn save_then_restore_setns(tx: &str) -> impl FnMut(&Ns) -> Sample {
    let tx = tx.to_owned();
    move |ns| {
        let f = File::open(ns.path()).unwrap();
        let start = Instant::now();
        let (_, ok1) = timed(in_ns(&mut Command::new("/usr/sbin/iptables-nft-save"), &f), "");
        let (_, ok2) = timed(in_ns(Command::new("/usr/sbin/iptables-nft-restore").arg("--noflush"), &f), &tx);
        (start.elapsed(), ok1 && ok2)
    }
}

/// Makes `cmd` enter the namespace open as `ns` in its forked child, before exec.
fn in_ns<'c>(cmd: &'c mut Command, ns: &File) -> &'c mut Command {
    let fd = ns.as_raw_fd();
    // Safety: setns in the forked child only, before exec; `ns` outlives the spawn.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
        })
    }
}

/// The floor of any approach that runs iptables-restore: one bare restore, entered by setns in the
/// forked child exactly as the plugin does it.
fn bare_restore(tx: &str) -> impl FnMut(&Ns) -> Sample {
    let tx = tx.to_owned();
    move |ns| {
        let f = File::open(ns.path()).unwrap();
        timed(in_ns(Command::new("/usr/sbin/iptables-nft-restore").arg("--noflush"), &f), &tx)
    }
}

/// `iptables-restore` then `ip6tables-restore` of a dual-stack pod's rules, both entered by setns
/// in the forked child: the floor of the iptables engine for such a pod.
fn bare_restore_both(tx4: &str, tx6: &str) -> impl FnMut(&Ns) -> Sample {
    let (tx4, tx6) = (tx4.to_owned(), tx6.to_owned());
    move |ns| {
        let f = File::open(ns.path()).unwrap();
        let start = Instant::now();
        let (_, ok4) = timed(in_ns(Command::new("/usr/sbin/iptables-nft-restore").arg("--noflush"), &f), &tx4);
        let (_, ok6) = timed(in_ns(Command::new("/usr/sbin/ip6tables-nft-restore").arg("--noflush"), &f), &tx6);
        (start.elapsed(), ok4 && ok6)
    }
}

/// `nft -f` of the nftables engine's rule set, entered by setns in the forked child: what the
/// nftables-based peers do (they all run the `nft` program).
fn nft_program(script: &str) -> impl FnMut(&Ns) -> Sample {
    let script = script.to_owned();
    move |ns| {
        let f = File::open(ns.path()).unwrap();
        timed(in_ns(Command::new("/usr/sbin/nft").args(["-f", "-"]), &f), &script)
    }
}

/// New outbound TCP connections per second through the redirect of a Consul pod with `cidrs`
/// excluded networks, installed by the engine of `mode`: a pod namespace with a veth to a sibling
/// namespace (the only route it has), a listener on the proxy's outbound port, and one thread that
/// dials the sibling's address `conns` times, accepts each redirected connection and closes both.
/// Setting up the namespaces and the ADD is not timed.
fn connection_rate(mode: &str, annotations: &Value, conns: usize) -> f64 {
    let (pod, remote) = (Ns::new(), Ns::new());
    run(Command::new("ip").args(["-n", &pod.0, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1"]));
    run(Command::new("ip").args(["-n", &pod.0, "link", "set", "veth1", "netns", &remote.0]));
    for (ns, dev, addr) in [(&pod, "veth0", "198.18.0.1/24"), (&remote, "veth1", "198.18.0.2/24")] {
        run(Command::new("ip").args(["-n", &ns.0, "addr", "add", addr, "dev", dev]));
        run(Command::new("ip").args(["-n", &ns.0, "link", "set", dev, "up"]));
        run(Command::new("ip").args(["-n", &ns.0, "link", "set", "lo", "up"]));
    }
    let mut cmd = Command::new(plugin());
    cni_env(&pod, "ADD", "bench", &mut cmd);
    let stdin = stdin_for(&Source::Runtime(annotations), mode).replace("198.18.0.2/24", "198.18.0.1/24");
    assert!(timed(&mut cmd, &stdin).1, "ADD for the connection benchmark failed ({mode})");
    let f = File::open(pod.path()).unwrap();
    let elapsed = std::thread::scope(|s| {
        s.spawn(|| {
            // Safety: only this thread changes namespace, and it ends with the scope.
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let listener = std::net::TcpListener::bind("0.0.0.0:15001").unwrap();
            let target: std::net::SocketAddr = "198.18.0.2:8080".parse().unwrap();
            let start = Instant::now();
            for _ in 0..conns {
                let client = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2))
                    .expect("the redirect takes the connection to the proxy's port");
                let (server, _) = listener.accept().unwrap();
                // A reset instead of TIME_WAIT: thousands of connections leave no state behind.
                socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO)).unwrap();
                drop(client);
                drop(server);
            }
            start.elapsed()
        })
        .join()
        .unwrap()
    });
    conns as f64 / elapsed.as_secs_f64()
}

/// The same restore spawned (vfork, no fork) by a short-lived thread that entered the namespace:
/// the other way to start a program in a namespace without nsenter. Includes the thread.
fn threaded_restore(tx: &str) -> impl FnMut(&Ns) -> Sample {
    let tx = tx.to_owned();
    move |ns| {
        let f = File::open(ns.path()).unwrap();
        let start = Instant::now();
        let (_, ok) = std::thread::scope(|s| {
            s.spawn(|| {
                // Safety: only this thread changes namespace, and it ends with the scope.
                assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
                timed(Command::new("/usr/sbin/iptables-nft-restore").arg("--noflush"), &tx)
            })
            .join()
            .unwrap()
        });
        (start.elapsed(), ok)
    }
}

/// The same restore, entered the way an operator would: `nsenter --net=… iptables-restore`.
fn nsenter_restore(tx: &str) -> impl FnMut(&Ns) -> Sample {
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

/// `n` pods ADDed at once: wall time and failures. Each is DELeted afterwards (not timed), so
/// the legacy backend's per-namespace lock files do not outlive the run.
fn concurrent(annotations: &Value, mode: &'static str, n: usize) -> (Duration, usize) {
    let namespaces: Vec<Ns> = (0..n).map(|_| Ns::new()).collect();
    let stdin = stdin_for(&Source::Runtime(annotations), mode);
    let start = Instant::now();
    let children: Vec<_> = namespaces
        .iter()
        .map(|ns| {
            let mut cmd = Command::new(plugin());
            cni_env(ns, "ADD", "bench", &mut cmd);
            let mut c = cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
            c.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
            c
        })
        .collect();
    let failures = children.into_iter().map(|c| c.wait_with_output().unwrap()).filter(|o| !o.status.success()).count();
    let wall = start.elapsed();
    for ns in &namespaces {
        let mut cmd = Command::new(plugin());
        cni_env(ns, "DEL", "bench", &mut cmd);
        let _ = timed(&mut cmd, &stdin);
    }
    (wall, failures)
}

/// A table row: what, how many programs it execs per ADD, and the measurements.
struct Row {
    what: String,
    programs: String,
    stats: Stats,
}

fn print_rows(rows: &[Row], base: f64, base_name: &str) {
    println!("| strategy | programs exec'd | p50 | p95 | failures | vs {base_name} p50 |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in rows {
        let st = &r.stats;
        println!(
            "| {} | {} | {:.2} | {:.2} | {} | {:.2}x |",
            r.what,
            r.programs,
            st.pct(0.5),
            st.pct(0.95),
            st.failures,
            st.pct(0.5) / base
        );
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() {
    // Cargo passes --bench; nothing else is accepted.
    // Safety: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("cni_add: needs root (network namespaces, iptables); run hack/bench.sh as root");
        std::process::exit(1);
    }
    let quick = std::env::var_os("BENCH_QUICK").is_some();
    let runs: usize =
        std::env::var("BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(if quick { 10 } else { 200 });
    let started = Instant::now();
    println!("load average at start: {}", loadavg());
    println!("plugin measured: {}\n", plugin().display());

    let api = ApiServer::start();
    let kubeconfig = api.default_kubeconfig();
    let consul = consul_pod(1, 1);
    let kuma = kuma_pod();
    let plain = json!({"app": "web"});
    api.add_pod(fixture("consul-api-status", &consul, &[]));
    api.add_pod(fixture("consul-api", &consul, &[]));
    api.add_pod(fixture("consul-reporting", &consul, &[]));
    api.add_pod(fixture("kuma-api", &kuma, &["kuma-sidecar"]));
    api.add_pod(fixture("plain-api", &plain, &[]));
    // A second stand-in that answers every request 5 ms late, as an API server does whose writes go
    // through etcd: what the status reports cost is then mostly waiting, not this machine's CPU.
    let slow_api = ApiServer::start();
    slow_api.set_fault(Some(apiserver::Fault::Delay(Duration::from_millis(5))));
    slow_api.add_pod(fixture("consul-reporting", &consul, &[]));
    let slow_kubeconfig = slow_api.default_kubeconfig();
    let with_status = Source::Api { kubeconfig: &kubeconfig, status: true };
    let without_status = Source::Api { kubeconfig: &kubeconfig, status: false };
    // The API requests one ADD of pod `name` made.
    let requests = |name: &str| {
        let n = api.requests().iter().filter(|r| r.path.ends_with(&format!("/pods/{name}"))).count();
        n as f64 / runs as f64
    };

    let consul_tx = transaction(&consul);
    let consul_rules = per_rule_commands(&consul_tx).len();
    println!(
        "## Consul pod: {consul_rules} chains and rules (IPv4), {runs} runs of each, interleaved, fresh namespace \
         per run (ms)\n"
    );
    let mut c = measure_all(
        runs,
        vec![
            strategy(
                "tproxy-cni ADD, annotations from runtimeConfig",
                2,
                tproxy_add(stdin_for(&Source::Runtime(&consul), "nft"), "bench"),
            ),
            strategy("tproxy-cni ADD, from the API stand-in: GET + status PATCHes", 2, {
                tproxy_add(stdin_for(&with_status, "nft"), "consul-api-status")
            }),
            strategy("tproxy-cni ADD, from the API stand-in: GET only, status annotation off", 2, {
                tproxy_add(stdin_for(&without_status, "nft"), "consul-api")
            }),
            strategy(
                "tproxy-cni ADD, annotations from runtimeConfig, status PATCHes to the API stand-in",
                2,
                tproxy_add(stdin_for(&Source::RuntimeReporting(&consul, &kubeconfig), "nft"), "consul-reporting"),
            ),
            strategy(
                "tproxy-cni ADD, annotations from runtimeConfig, status PATCHes to a stand-in answering in 5 ms",
                2,
                tproxy_add(stdin_for(&Source::RuntimeReporting(&consul, &slow_kubeconfig), "nft"), "consul-reporting"),
            ),
            strategy(
                "tproxy-cni ADD, runtimeConfig, `iptables_mode: auto` (no kubelet hint on this host)",
                "2 (+1 probe a minute)",
                tproxy_add(stdin_for(&Source::Runtime(&consul), "auto"), "bench"),
            ),
            strategy("one iptables process per rule via nsenter (consul-cni)", 2 * consul_rules, per_rule(&consul_tx)),
            strategy("iptables-save + iptables-restore via nsenter (istio-cni, kuma-cni)", 4, {
                save_then_restore(&consul_tx)
            }),
            strategy("iptables-save + iptables-restore, each entered by setns in the child", 2, {
                save_then_restore_setns(&consul_tx)
            }),
            strategy("one bare iptables-restore, setns in the forked child (the floor)", 1, bare_restore(&consul_tx)),
            strategy("one bare iptables-restore, vfork'd by a thread inside the namespace", 1, {
                threaded_restore(&consul_tx)
            }),
            strategy(
                "one iptables-restore via nsenter (the same rules applied by hand)",
                2,
                nsenter_restore(&consul_tx),
            ),
        ],
    );
    c[1].what += &format!(" ({:.0} requests)", requests("consul-api-status"));
    c[2].what += &format!(" ({:.0} request)", requests("consul-api"));
    c[3].what += &format!(" ({:.0} requests)", requests("consul-reporting"));
    let slow_requests = slow_api.requests().len() as f64 / runs as f64;
    c[4].what += &format!(" ({slow_requests:.0} requests)");
    let base = c[0].stats.pct(0.5);
    print_rows(&c, base, "tproxy-cni");

    let kuma_tx = transaction(&kuma);
    let kuma_rules = per_rule_commands(&kuma_tx).len();
    println!("\n## Kuma pod: {kuma_rules} chains and rules (IPv4, nat + raw), {runs} runs of each, interleaved (ms)\n");
    let mut k = measure_all(
        runs,
        vec![
            strategy(
                "tproxy-cni ADD, annotations from runtimeConfig",
                2,
                tproxy_add(stdin_for(&Source::Runtime(&kuma), "nft"), "bench"),
            ),
            strategy(
                "tproxy-cni ADD, from the API stand-in",
                2,
                tproxy_add(stdin_for(&without_status, "nft"), "kuma-api"),
            ),
            strategy("iptables-save + iptables-restore via nsenter (kuma-cni)", 4, save_then_restore(&kuma_tx)),
            strategy("iptables-save + iptables-restore, each entered by setns in the child", 2, {
                save_then_restore_setns(&kuma_tx)
            }),
            strategy("one iptables process per rule via nsenter", 2 * kuma_rules, per_rule(&kuma_tx)),
            strategy("one bare iptables-restore, setns in the forked child (the floor)", 1, bare_restore(&kuma_tx)),
            strategy("one iptables-restore via nsenter", 2, nsenter_restore(&kuma_tx)),
        ],
    );
    k[1].what += &format!(" ({:.0} request)", requests("kuma-api"));
    let kuma_base = k[0].stats.pct(0.5);
    print_rows(&k, kuma_base, "tproxy-cni");

    println!("\n## What any plugin pays, {runs} runs of each, interleaved (ms)\n");
    let mut common = measure_all(
        runs,
        vec![
            strategy(
                "tproxy-cni ADD, pod in no mesh (pass-through, runtimeConfig)",
                1,
                tproxy_add(stdin_for(&Source::Runtime(&plain), "nft"), "bench"),
            ),
            strategy("tproxy-cni ADD, pod in no mesh, from the API stand-in", 1, {
                tproxy_add(stdin_for(&without_status, "nft"), "plain-api")
            }),
            strategy("/bin/cat reading the same stdin (the cost of starting any process)", 1, |_: &Ns| {
                timed(&mut Command::new("cat"), "{}")
            }),
            strategy("ip netns exec NS true (entering a netns, nothing else)", 1, |ns: &Ns| {
                timed(Command::new("ip").args(["netns", "exec", &ns.0, "true"]), "")
            }),
        ],
    );
    common[1].what += &format!(" ({:.0} request)", requests("plain-api"));
    print_rows(&common, base, "tproxy-cni Consul");

    let p50 = |r: &Row| r.stats.pct(0.5);
    println!(
        "\nConsul: tproxy-cni / per-rule = {:.2} (target <= 0.3); / save + restore = {:.2} (setns: {:.2}); \
         / nsenter + restore = {:.2}; / bare restore = {:.2} (target <= 1.1); tproxy-cni - bare restore = {:.2} ms; \
         starting /bin/cat = {:.2} ms",
        base / p50(&c[6]),
        base / p50(&c[7]),
        base / p50(&c[8]),
        base / p50(&c[11]),
        base / p50(&c[9]),
        base - p50(&c[9]),
        p50(&common[2]),
    );
    println!(
        "Kuma: tproxy-cni / save + restore (kuma-cni) = {:.2} (setns: {:.2}); / per-rule = {:.2}; \
         / nsenter + restore = {:.2}; / bare restore = {:.2}; tproxy-cni - bare restore = {:.2} ms",
        kuma_base / p50(&k[2]),
        kuma_base / p50(&k[3]),
        kuma_base / p50(&k[4]),
        kuma_base / p50(&k[6]),
        kuma_base / p50(&k[5]),
        kuma_base - p50(&k[5]),
    );

    println!(
        "\n## The nftables engine: Consul pod (IPv4, runtimeConfig), {runs} runs of each, interleaved, fresh \
         namespace per run (ms)\n"
    );
    let consul_script = nft_script(&consul, false);
    let n = measure_all(
        runs,
        vec![
            strategy(
                "tproxy-cni ADD, nftables engine (one netlink batch)",
                1,
                tproxy_add(stdin_for(&Source::Runtime(&consul), "nftables"), "bench"),
            ),
            strategy(
                "tproxy-cni ADD, iptables engine (iptables-nft)",
                2,
                tproxy_add(stdin_for(&Source::Runtime(&consul), "nft"), "bench"),
            ),
            strategy("one bare iptables-restore of the same rules, setns in the forked child", 1, {
                bare_restore(&consul_tx)
            }),
            strategy("nft -f of the same rule set, setns in the forked child", 1, nft_program(&consul_script)),
            strategy(
                "tproxy-cni ADD, pod in no mesh (pass-through, runtimeConfig)",
                1,
                tproxy_add(stdin_for(&Source::Runtime(&plain), "nftables"), "bench"),
            ),
        ],
    );
    let nft_base = n[0].stats.pct(0.5);
    print_rows(&n, nft_base, "nftables ADD");

    let (kuma_tx4, kuma_tx6) = transactions_dual(&kuma);
    let kuma_script = nft_script(&kuma, true);
    println!(
        "\n## The nftables engine: dual-stack Kuma pod (IPv4 + IPv6, nat + raw), {runs} runs of each, interleaved (ms)\n"
    );
    let nk = measure_all(
        runs,
        vec![
            strategy(
                "tproxy-cni ADD, nftables engine (one netlink batch, ::6 on lo)",
                1,
                tproxy_add(dual_stack(&stdin_for(&Source::Runtime(&kuma), "nftables")), "bench"),
            ),
            strategy(
                "tproxy-cni ADD, iptables engine (iptables-nft, both families)",
                3,
                tproxy_add(dual_stack(&stdin_for(&Source::Runtime(&kuma), "nft")), "bench"),
            ),
            strategy("bare iptables-restore + ip6tables-restore of the same rules", 2, {
                bare_restore_both(&kuma_tx4, &kuma_tx6)
            }),
            strategy("one bare iptables-restore of the IPv4 rules only", 1, bare_restore(&kuma_tx4)),
            strategy("nft -f of the same rule set (both families)", 1, nft_program(&kuma_script)),
            strategy(
                "tproxy-cni ADD, pod in no mesh (pass-through, runtimeConfig)",
                1,
                tproxy_add(dual_stack(&stdin_for(&Source::Runtime(&plain), "nftables")), "bench"),
            ),
        ],
    );
    let nk_base = nk[0].stats.pct(0.5);
    print_rows(&nk, nk_base, "nftables ADD");
    println!(
        "\nnftables engine, Consul: / bare iptables-restore = {:.2} (target <= 0.5); / pass-through ADD = {:.2} \
         (target <= 1.5); / iptables engine = {:.2}; / nft -f = {:.2}",
        nft_base / p50(&n[2]),
        nft_base / p50(&n[4]),
        nft_base / p50(&n[1]),
        nft_base / p50(&n[3]),
    );
    println!(
        "nftables engine, dual-stack Kuma: / bare restores of both families = {:.2} (target <= 0.5; IPv4 restore \
         alone: {:.2}); / pass-through ADD = {:.2} (target <= 1.5); / iptables engine = {:.2}; / nft -f = {:.2}",
        nk_base / p50(&nk[2]),
        nk_base / p50(&nk[3]),
        nk_base / p50(&nk[5]),
        nk_base / p50(&nk[1]),
        nk_base / p50(&nk[4]),
    );

    println!("\n## 64 concurrent ADDs (Consul pod, runtimeConfig)\n");
    println!("| backend | wall time (ms) | failures |");
    println!("|---|---:|---:|");
    for mode in ["nft", "legacy", "nftables"] {
        let (wall, failures) = concurrent(&consul, mode, 64);
        println!("| {mode} | {:.1} | {failures} |", wall.as_secs_f64() * 1e3);
    }

    let scale_runs = if quick { 5 } else { 30 };
    println!("\n## Rule-count scaling: excluded outbound CIDRs and ports, {scale_runs} runs each (ms)\n");
    println!(
        "| excluded CIDRs + ports | rules (IPv4) | tproxy-cni p50 | bare restore p50 | ratio | nftables engine p50 \
         | nftables / its 10-CIDR p50 |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut nft_first = None;
    for n in [10, 100, 1000] {
        let pod = consul_pod(n, n);
        let tx = transaction(&pod);
        let rows = measure_all(
            scale_runs,
            vec![
                strategy("tproxy-cni", 2, tproxy_add(stdin_for(&Source::Runtime(&pod), "nft"), "bench")),
                strategy("bare restore", 1, bare_restore(&tx)),
                strategy("nftables", 1, tproxy_add(stdin_for(&Source::Runtime(&pod), "nftables"), "bench")),
            ],
        );
        let (ours, bare, nft) = (rows[0].stats.pct(0.5), rows[1].stats.pct(0.5), rows[2].stats.pct(0.5));
        let first = *nft_first.get_or_insert(nft);
        println!(
            "| {n} + {n} | {} | {ours:.2} | {bare:.2} | {:.2}x | {nft:.2} | {:.2}x |",
            tx.lines().filter(|l| l.starts_with("-A")).count(),
            ours / bare,
            nft / first
        );
    }

    let rate_rounds = if quick { 2 } else { 5 };
    let rate_conns = if quick { 300 } else { 2000 };
    println!(
        "\n## New outbound TCP connections per second through the redirect, Consul pod with 1000 excluded CIDRs + \
         1000 ports ({rate_rounds} rounds of {rate_conns} connections per engine, interleaved)\n"
    );
    let big = consul_pod(1000, 1000);
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..rate_rounds {
        for (i, mode) in ["nft", "nftables"].into_iter().enumerate() {
            rates[i].push(connection_rate(mode, &big, rate_conns));
        }
    }
    println!("| engine | connections/s (median) | min | max |");
    println!("|---|---:|---:|---:|");
    for (i, what) in ["iptables engine (iptables-nft: 2000 rules in a chain)", "nftables engine (interval sets)"]
        .into_iter()
        .enumerate()
    {
        let mut r = rates[i].clone();
        r.sort_by(f64::total_cmp);
        println!("| {what} | {:.0} | {:.0} | {:.0} |", r[r.len() / 2], r[0], r[r.len() - 1]);
    }

    let stripped = std::env::temp_dir().join(format!("tproxy-cni-stripped-{}", std::process::id()));
    std::fs::copy(plugin(), &stripped).unwrap();
    run(Command::new("strip").arg(&stripped));
    let size = std::fs::metadata(&stripped).unwrap().len();
    let _ = std::fs::remove_file(&stripped);
    let rss_runs = if quick { 3 } else { 21 };
    let consul_stdin = stdin_for(&Source::Runtime(&consul), "nft");
    let status_stdin = stdin_for(&with_status, "nft");
    let kuma_stdin = stdin_for(&Source::Runtime(&kuma), "nft");
    println!("\n## Resources (peak RSS: median of {rss_runs} ADDs under GNU time)\n");
    println!("| what | value |");
    println!("|---|---:|");
    let rss_rows = [
        ("pass-through ADD (the plugin alone)", stdin_for(&Source::Runtime(&plain), "nft"), "bench"),
        ("Consul ADD, runtimeConfig (the plugin, or the iptables-restore it runs)", consul_stdin.clone(), "bench"),
        ("Consul ADD, API stand-in (the plugin with TLS, or iptables-restore)", status_stdin, "consul-api-status"),
        ("Kuma ADD, runtimeConfig (the plugin, or the iptables-restore it runs)", kuma_stdin, "bench"),
        (
            "Consul ADD, nftables engine (the whole ADD: no other program)",
            stdin_for(&Source::Runtime(&consul), "nftables"),
            "bench",
        ),
        (
            "dual-stack Kuma ADD, nftables engine (the whole ADD: no other program)",
            dual_stack(&stdin_for(&Source::Runtime(&kuma), "nftables")),
            "bench",
        ),
        (
            "Consul ADD with 1000 CIDRs + 1000 ports, nftables engine",
            stdin_for(&Source::Runtime(&consul_pod(1000, 1000)), "nftables"),
            "bench",
        ),
    ];
    for (what, stdin, name) in rss_rows {
        let mut kib: Vec<i64> = (0..rss_runs).filter_map(|_| peak_rss(&stdin, name)).collect();
        kib.sort();
        match kib.get(kib.len() / 2) {
            Some(k) => println!("| peak RSS, {what} | {k} KiB |"),
            None => println!("| peak RSS, {what} | n/a (needs /usr/bin/time: apt-get install time) |"),
        }
    }
    println!("| stripped binary size | {} KiB |", size / 1024);
    println!("\nload average at the end: {}; the run took {:.0} s", loadavg(), started.elapsed().as_secs_f64());
}

//! Shared harness for the integration tests: real network namespaces, a real CNI chain driven by
//! libcni (`cnidrv`), real sockets, and guards that clean up even when a test fails.
//!
//! Rules every test here follows (TESTING.md): traffic only goes to addresses of namespaces the test
//! made itself; pods get no default route (so a missing rule can never send a packet off the
//! machine); every loop is bounded; every namespace, bridge and process is removed on drop.

pub mod apiserver;
pub mod cri;
pub mod harden;
pub mod install;

use std::fs;
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The plugin binary cargo built for this test run.
pub fn plugin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tproxy-cni"))
}

/// Is this a CI run (where missing privileges or tools are failures, never skips)?
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Returns true when the test can run as root with the tools it needs. Outside CI a test without
/// them is skipped with a message; in CI the same situation panics, so nothing passes silently.
#[must_use]
pub fn privileged() -> bool {
    privileged_with(&[])
}

/// [`privileged`], for a test that also needs the programs at `extra_tools` (absolute paths), such
/// as a container runtime.
#[must_use]
pub fn privileged_with(extra_tools: &[&str]) -> bool {
    let mut missing = Vec::new();
    // Safety: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root".to_owned());
    }
    let base = [
        "/usr/sbin/ip",
        "/usr/sbin/iptables-nft-restore",
        "/usr/sbin/iptables-legacy-restore",
        "/usr/sbin/nft",
        "/usr/lib/cni/bridge",
        "/usr/lib/cni/host-local",
    ];
    for tool in base.iter().chain(extra_tools) {
        if !Path::new(tool).exists() {
            missing.push((*tool).to_owned());
        }
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("needs {} (run hack/test.sh, which installs them, as root)", missing.join(", "));
    if in_ci() {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    false
}

/// The engine a test runs the plugin with: the iptables engine with one iptables backend, or
/// the nftables engine. Tests of behaviour both engines share take it as a parameter (see
/// [`both_engines!`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// `iptables_mode` `nft` or `legacy`.
    Iptables(&'static str),
    Nftables,
}

impl Engine {
    /// The keys of the plugin's configuration that choose the engine.
    pub fn conf(self) -> serde_json::Value {
        match self {
            Engine::Iptables(mode) => serde_json::json!({"backend": "iptables", "iptables_mode": mode}),
            Engine::Nftables => serde_json::json!({"backend": "nftables"}),
        }
    }

    /// The name [`Netns::our_rule_count`] takes.
    pub fn backend(self) -> &'static str {
        match self {
            Engine::Iptables(mode) => mode,
            Engine::Nftables => "nftables",
        }
    }

    /// The namespace's rules as this engine's tests compare them ([`Netns::snapshot`], and for the
    /// nftables engine every nftables table too).
    pub fn snapshot(self, ns: &Netns) -> String {
        match self {
            Engine::Iptables(_) => ns.snapshot(),
            Engine::Nftables => ns.snapshot_with_nft(),
        }
    }

    /// How many rules of ours `ns` holds, both families.
    pub fn our_rules(self, ns: &Netns) -> usize {
        ns.our_rule_count(Fam::V4, self.backend()) + ns.our_rule_count(Fam::V6, self.backend())
    }
}

/// Makes a test of each engine from `fn NAME(engine: Engine)`: `NAME::iptables` (with iptables-nft,
/// or the mode given) and `NAME::nftables`. Given the modes as names (`both_engines!(NAME, nft,
/// legacy)`), the iptables engine runs once per mode: `NAME::iptables::nft`, `NAME::iptables::legacy`.
#[macro_export]
macro_rules! both_engines {
    ($name:ident) => {
        both_engines!($name, "nft");
    };
    ($name:ident, $($mode:ident),+) => {
        mod $name {
            mod iptables {
                $(
                    #[test]
                    fn $mode() {
                        super::super::$name($crate::support::Engine::Iptables(stringify!($mode)))
                    }
                )+
            }
            #[test]
            fn nftables() {
                super::$name($crate::support::Engine::Nftables)
            }
        }
    };
    ($name:ident, $mode:literal) => {
        mod $name {
            #[test]
            fn iptables() {
                super::$name($crate::support::Engine::Iptables($mode))
            }
            #[test]
            fn nftables() {
                super::$name($crate::support::Engine::Nftables)
            }
        }
    };
}

/// The environment variable that tells a child test process which one test it runs, in
/// [`in_own_process`].
const OWN_PROCESS: &str = "TPROXY_CNI_OWN_PROCESS";

/// For a test that must change something process-wide (such as becoming the subreaper of its
/// children's orphans): every test shares one process and runs on a thread of it, so such a test's
/// body runs in a child process of its own, which runs that test alone. `module` is the caller's
/// `module_path!()` and `test` its function name.
///
/// Returns true in that child: run the body. In the test process it runs the child (ended after
/// `deadline`), passes its output on, panics if the test failed there or did not run exactly once,
/// and returns false: the test is done.
#[must_use]
pub fn in_own_process(module: &str, test: &str, deadline: Duration) -> bool {
    // The name libtest knows the test by: its path without the crate's name.
    let name = match module.split_once("::") {
        Some((_, path)) => format!("{path}::{test}"),
        None => test.to_owned(),
    };
    if std::env::var(OWN_PROCESS).is_ok_and(|v| v == name) {
        return true;
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([&name, "--exact", "--nocapture", "--test-threads=1"])
        .env(OWN_PROCESS, &name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let read = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let out = read(Box::new(child.stdout.take().unwrap()));
    let err = read(Box::new(child.stderr.take().unwrap()));
    let end = Instant::now() + deadline;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    // Through the test's own output capture: shown when it fails, or with --nocapture.
    print!("{out}");
    eprint!("{err}");
    let status = status.unwrap_or_else(|| panic!("{name} did not end within {deadline:?} in its own process"));
    assert!(status.success(), "{name} failed in its own process ({status})");
    assert!(out.contains("test result: ok. 1 passed"), "{name} did not run in its own process");
    false
}

/// Tests that load the whole machine for a while (a container runtime with its disk work, 64
/// plugins at once, a kill loop) and tests that give another process a deadline tight enough for
/// that load to break (the installer re-chaining through its watch) must not overlap. As test binaries
/// of their own they never did; in the one binary [`busy`] and [`punctual`] keep them apart.
static LOAD: RwLock<()> = RwLock::new(());

/// Held by a test that loads the machine: any number of them run together, never beside a
/// [`punctual`] one.
pub fn busy() -> RwLockReadGuard<'static, ()> {
    // A test that panicked while holding it poisoned nothing of ours: the lock guards no data.
    LOAD.read().unwrap_or_else(|e| e.into_inner())
}

/// Held by a test whose deadlines a [`busy`] test's load could break: it runs with none of them.
pub fn punctual() -> RwLockWriteGuard<'static, ()> {
    LOAD.write().unwrap_or_else(|e| e.into_inner())
}

/// A short name unique across this machine's concurrent test processes (interface names are
/// limited to 15 bytes).
pub fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{prefix}{}x{}", std::process::id() % 100_000, N.fetch_add(1, Ordering::Relaxed))
}

/// `nft` output with every `packets N bytes M` shown as zero: traffic is not a change of rules.
pub fn zero_counters(text: &str) -> String {
    let mut words: Vec<String> = text.split(' ').map(str::to_owned).collect();
    for i in 1..words.len() {
        if matches!(words[i - 1].as_str(), "packets" | "bytes") {
            words[i] = format!("0{}", words[i].trim_start_matches(|c: char| c.is_ascii_digit()));
        }
    }
    words.join(" ")
}

/// Our two nftables tables (`ip tproxy-cni`, `ip6 tproxy-cni`) as `nft list table` prints them in
/// `ns`, counters zeroed; empty when there are none.
pub fn nft_tables(ns: &(impl NsPath + ?Sized)) -> String {
    let mut out = String::new();
    for family in ["ip", "ip6"] {
        let listed = Command::new("nsenter")
            .arg(format!("--net={}", ns.ns_path().display()))
            .args(["nft", "list", "table", family, "tproxy-cni"])
            .output()
            .expect("nft runs");
        if listed.status.success() {
            out += &zero_counters(&String::from_utf8_lossy(&listed.stdout));
        }
    }
    out
}

/// The `nft -f` script `tproxy-cni render --backend nftables` prints for a pod with these
/// annotations (and an IPv6 address when `v6`).
pub fn render_nftables(annotations: &serde_json::Value, v6: bool) -> String {
    let mut render = Command::new(plugin());
    render.args(["render", "--backend", "nftables"]);
    if v6 {
        render.arg("--pod-ipv6");
    }
    render.arg("-").stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = render.spawn().expect("the plugin runs");
    child.stdin.take().unwrap().write_all(annotations.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "render --backend nftables failed");
    String::from_utf8(out.stdout).unwrap()
}

/// What the nftables engine must install for a pod with these annotations (and an IPv6 address
/// when `v6`), as [`nft_tables`] lists it: what the `nft` program makes, in a namespace of the
/// test's own, of the script [`render_nftables`] gives (the nftables tests pin that script against
/// the golden cases).
pub fn nft_reference(annotations: &serde_json::Value, v6: bool) -> String {
    let script = render_nftables(annotations, v6);
    let reference = Netns::new("tpr");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &reference.name, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("nft runs");
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "nft -f of the rendered script:\n{script}");
    nft_tables(&reference)
}

/// Runs a command, panicking with its output if it fails.
pub fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `cond` every 5 ms until it holds or `limit` passes; returns how long it took.
pub fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Removes a cgroup and everything below it, children first. A process on its way out may hold a
/// cgroup for a moment, so each removal is retried for a bounded while; returns what failed,
/// naming the processes still inside.
pub fn remove_cgroup_tree(dir: &Path) -> Vec<String> {
    let mut errors = Vec::new();
    let mut dirs = walk_dirs(dir);
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in dirs {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match fs::remove_dir(&d) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => {
                    let procs = fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
                    errors.push(format!("rmdir {}: {e} (processes: {procs:?})", d.display()));
                    break;
                }
            }
        }
    }
    errors
}

/// `dir` and every directory below it (cgroup trees, to remove them children first).
pub fn walk_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_owned()];
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(walk_dirs(&e.path()));
            }
        }
    }
    out
}

/// The addresses host-local has handed out from its data directory for one network (`dir`): one
/// file per address, beside its lock and last-reserved markers.
pub fn host_local_reservations(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|f| f.file_name().to_string_lossy().into_owned())
                .filter(|f| f != "lock" && !f.starts_with("last_reserved_ip"))
                .collect()
        })
        .unwrap_or_default()
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique(tag));
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A named network namespace (`/run/netns/NAME`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Netns {
        let name = unique(prefix);
        sh(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        // Addresses must be usable at once: no duplicate address detection, loopback up.
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"]);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> String {
        sh(Command::new("ip").args(["netns", "exec", &self.name]).args(args))
    }

    /// The full `iptables-save` output of one family with one backend, without comment lines and
    /// with packet counters zeroed (traffic is not a change of rules).
    pub fn save(&self, family: Fam, backend: &str) -> String {
        let tool = format!("{}-{backend}-save", family.tool());
        self.exec(&[&tool])
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| match (l.starts_with(':'), l.rfind(" [")) {
                (true, Some(at)) => format!("{} [0:0]\n", &l[..at]),
                _ => format!("{l}\n"),
            })
            .collect()
    }

    /// Every ruleset of the namespace, both families, both backends: for "untouched" comparisons.
    pub fn snapshot(&self) -> String {
        let mut s = String::new();
        for b in ["nft", "legacy"] {
            for f in [Fam::V4, Fam::V6] {
                s += &format!("## {} {b}\n{}", f.tool(), self.save(f, b));
            }
        }
        s
    }

    /// [`Netns::snapshot`] and every nftables table (`nft list ruleset`), for the nftables
    /// engine's "untouched" comparisons. (iptables-nft leaves a built-in chain it created in
    /// nftables after its last rule is gone, which `iptables-save` does not tell from a chain it
    /// never created, so the iptables engine's tests compare what `iptables-save` shows.)
    pub fn snapshot_with_nft(&self) -> String {
        self.snapshot() + "## nft list ruleset\n" + &self.nft_ruleset()
    }

    /// `nft list ruleset`, with counters zeroed (traffic is not a change of rules).
    pub fn nft_ruleset(&self) -> String {
        zero_counters(&self.exec(&["nft", "list", "ruleset"]))
    }

    /// Our nftables table of one family, as `nft list table` prints it; empty when there is none.
    pub fn nft_table(&self, family: Fam) -> String {
        let fam = if family == Fam::V4 { "ip" } else { "ip6" };
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "list", "table", fam, "tproxy-cni"])
            .output()
            .expect("nft runs");
        if out.status.success() { String::from_utf8_lossy(&out.stdout).into_owned() } else { String::new() }
    }

    /// Applies restore input in this namespace (to plant canaries or tamper with rules).
    pub fn restore(&self, family: Fam, backend: &str, input: &str) {
        let tool = format!("{}-{backend}-restore", family.tool());
        let mut child = Command::new("ip")
            // --wait: a test may briefly hold the node-wide xtables lock (tests/backend.rs).
            .args(["netns", "exec", &self.name, &tool, "--wait", "10", "--noflush"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{tool}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Applies `rules` (restore input) in both families with `backend`.
    pub fn plant(&self, backend: &str, rules: &str) {
        self.restore(Fam::V4, backend, rules);
        self.restore(Fam::V6, backend, rules);
    }

    /// Plants the foreign canary ([`NAT_CANARY`]) in both families.
    pub fn plant_canary(&self, backend: &str) {
        self.plant(backend, NAT_CANARY);
    }

    /// A new namespace holding the canary in `backend`'s tables, and its [`Netns::snapshot`].
    pub fn with_canary(prefix: &str, backend: &str) -> (Netns, String) {
        let ns = Netns::new(prefix);
        ns.plant_canary(backend);
        let before = ns.snapshot();
        (ns, before)
    }

    /// How many times `::6/128` (Kuma's IPv6 inbound passthrough address) is on the loopback.
    pub fn passthrough_v6(&self) -> usize {
        // Run from a thread inside the namespace: cheaper than `ip netns exec`, and the crash tests
        // ask often.
        let out = in_netns(self, None, || {
            Command::new("/usr/sbin/ip").args(["-6", "-o", "addr", "show", "dev", "lo"]).output()
        })
        .unwrap();
        String::from_utf8_lossy(&out.stdout).matches(" ::6/128 ").count()
    }

    /// Counts the rules of ours in one family: for the iptables engine (`backend` `nft` or
    /// `legacy`) those carrying our ownership comment, for the nftables engine (`nftables`) the
    /// rules of our table.
    pub fn our_rule_count(&self, family: Fam, backend: &str) -> usize {
        if backend == "nftables" {
            return self.nft_table(family).lines().filter(|l| l.contains(" comment \"")).count();
        }
        self.save(family, backend)
            .lines()
            .filter(|l| l.starts_with("-A ") && l.contains("--comment tproxy-cni"))
            .count()
    }

    /// The namespace's global IPv6 / IPv4 address on `eth0`.
    pub fn addr(&self, family: Fam) -> IpAddr {
        let flag = if family == Fam::V4 { "-4" } else { "-6" };
        let out = self.exec(&["ip", "-o", flag, "addr", "show", "dev", "eth0", "scope", "global"]);
        let word =
            out.split_whitespace().skip_while(|w| *w != "inet" && *w != "inet6").nth(1).expect("eth0 has an address");
        word.split('/').next().unwrap().parse().unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Foreign rules that must survive whatever the plugin does: a rule of someone else's in a built-in
/// chain we also use, and a chain of their own, in nat.
const NAT_CANARY: &str =
    "*nat\n:CANARY - [0:0]\n-A OUTPUT -p tcp -m tcp --dport 9999 -j RETURN\n-A CANARY -j RETURN\nCOMMIT\n";

/// The iptables backends, in the order tests go through them.
pub const BACKENDS: [&str; 2] = ["nft", "legacy"];

/// A network namespace that can be entered through a path: a test's own [`Netns`], or one a
/// container runtime made (its bind mount, or `/proc/PID/ns/net`).
pub trait NsPath {
    fn ns_path(&self) -> PathBuf;
}

impl NsPath for Netns {
    fn ns_path(&self) -> PathBuf {
        self.path()
    }
}

impl NsPath for Path {
    fn ns_path(&self) -> PathBuf {
        self.to_owned()
    }
}

/// An address family, for choosing tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fam {
    V4,
    V6,
}

impl Fam {
    pub fn tool(self) -> &'static str {
        match self {
            Fam::V4 => "iptables",
            Fam::V6 => "ip6tables",
        }
    }
}

static CNIDRV: OnceLock<PathBuf> = OnceLock::new();

/// Builds (once per machine, under a lock) the libcni driver from `shared/tools/cnidrv`.
pub fn cnidrv() -> PathBuf {
    CNIDRV
        .get_or_init(|| {
            let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cnidrv");
            let lock = fs::File::create(out.with_extension("lock")).unwrap();
            // Safety: flock on an open descriptor; released when `lock` is dropped.
            unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
            if !out.exists() {
                sh(Command::new("bash").arg(shared_tool("cnidrv/build.sh")).arg(&out));
            }
            out
        })
        .clone()
}

/// A file under the project's `shared/tools`, which sits beside the checkout: next to it in CI and
/// in the main clone, a level higher in a worktree under `wt/`.
pub fn shared_tool(path: &str) -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .skip(1)
        .map(|dir| dir.join("shared/tools").join(path))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("shared/tools/{path} not found beside {} or above it", manifest.display()))
}

/// A CNI network: a Linux bridge with host-local IPAM (IPv4 and IPv6, no gateway, no default
/// route, no masquerade) and tproxy-cni chained after it.
pub struct Network {
    pub bridge: String,
    pub dir: TempDir,
    pub conflist: PathBuf,
}

/// The pod subnets. Every test network uses them: each network is its own bridge and each pod its
/// own namespace, and the host holds no address in them, so networks never see each other.
pub const SUBNET4: &str = "198.18.0.0/24";
pub const SUBNET6: &str = "fd18::/64";

impl Network {
    /// A network whose tproxy-cni entry carries `plugin_conf` (extra JSON keys) in addition to the
    /// annotations capability.
    pub fn new(plugin_conf: serde_json::Value) -> Network {
        let bridge = unique("tpb");
        // A bridge made beforehand with a fixed MAC keeps it as ports join; left to itself, Linux
        // changes the bridge's address and the bridge plugin's CHECK then reports a mismatch.
        sh(Command::new("ip").args(["link", "add", &bridge, "type", "bridge"]));
        sh(Command::new("ip").args(["link", "set", &bridge, "address", "02:00:5e:00:53:01", "up"]));
        let dir = TempDir::new("net");
        let mut ours = serde_json::json!({
            "type": "tproxy-cni",
            "log_level": "debug",
            "log_file": dir.path().join("plugin.log"),
            "capabilities": {"io.kubernetes.cri.pod-annotations": true},
        });
        for (k, v) in plugin_conf.as_object().expect("plugin_conf is an object") {
            ours[k] = v.clone();
        }
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": bridge,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": bridge,
                    "isGateway": false,
                    "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": dir.path().join("ipam"),
                        "ranges": [[{"subnet": SUBNET4}], [{"subnet": SUBNET6}]],
                    },
                },
                ours,
            ],
        });
        let conflist = dir.path().join("net.conflist");
        fs::write(&conflist, serde_json::to_vec_pretty(&conf).unwrap()).unwrap();
        Network { bridge, dir, conflist }
    }

    /// The log file the plugin writes for this network.
    pub fn plugin_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("plugin.log")).unwrap_or_default()
    }

    /// Drives the whole chain through libcni, as containerd and CRI-O do.
    pub fn cnidrv(
        &self,
        verb: &str,
        ns: &Netns,
        container_id: &str,
        cni_args: &str,
        annotations: Option<&serde_json::Value>,
    ) -> Output {
        let plugin_dir = plugin().parent().unwrap().to_owned();
        let mut cmd = Command::new(cnidrv());
        cmd.args([verb, self.conflist.to_str().unwrap(), ns.path().to_str().unwrap(), container_id, cni_args])
            .env("CNI_PATH", format!("/usr/lib/cni:{}", plugin_dir.display()))
            .env("CNIDRV_CACHE", self.dir.path().join("cache"));
        // As containerd does: a pod without annotations is sent as `null`, never left out.
        let a = annotations.cloned().unwrap_or(serde_json::Value::Null);
        cmd.arg(serde_json::json!({"io.kubernetes.cri.pod-annotations": a}).to_string());
        cmd.output().unwrap()
    }

    /// Starts a pod: a fresh namespace attached through the chain. Panics if ADD fails.
    pub fn pod(&self, name: &str, annotations: Option<&serde_json::Value>) -> Pod<'_> {
        let pod = self.pod_unstarted(name);
        let out = pod.add(annotations);
        assert!(
            out.status.success(),
            "ADD of {name} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        pod
    }

    /// A pod whose namespace exists but which has not been ADDed yet.
    pub fn pod_unstarted(&self, name: &str) -> Pod<'_> {
        Pod {
            net: self,
            ns: Netns::new("tpp"),
            id: unique("c"),
            name: name.to_owned(),
            deleted: AtomicBool::new(false),
        }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).status();
    }
}

/// The start of the iptables engine's network tests: the privileged guard and a [`Network`] whose
/// tproxy-cni entry uses one iptables backend. Derefs to its network.
pub struct Fixture {
    /// The backend of the network's tproxy-cni entry (`iptables_mode`).
    pub backend: &'static str,
    pub net: Network,
}

impl Fixture {
    /// A network on `backend` with `conf`'s keys added to the tproxy-cni entry; `None` when the
    /// test cannot run here (see [`privileged`]: skipped outside CI, a failure in CI).
    pub fn new(backend: &'static str, conf: serde_json::Value) -> Option<Fixture> {
        privileged().then(|| Fixture::on(backend, &conf))
    }

    /// One fixture per backend, each made when the loop reaches it (the previous one is gone by
    /// then); none when the test cannot run here.
    pub fn backends(conf: serde_json::Value) -> impl Iterator<Item = Fixture> {
        let run = privileged();
        BACKENDS.into_iter().filter(move |_| run).map(move |backend| Fixture::on(backend, &conf))
    }

    fn on(backend: &'static str, conf: &serde_json::Value) -> Fixture {
        let mut conf = conf.clone();
        conf["backend"] = "iptables".into();
        conf["iptables_mode"] = backend.into();
        Fixture { backend, net: Network::new(conf) }
    }
}

impl std::ops::Deref for Fixture {
    type Target = Network;

    fn deref(&self) -> &Network {
        &self.net
    }
}

/// A pod sandbox on a [`Network`]. Dropping it DELs it through the chain and removes its namespace.
pub struct Pod<'n> {
    pub net: &'n Network,
    pub ns: Netns,
    pub id: String,
    pub name: String,
    deleted: AtomicBool,
}

impl Pod<'_> {
    pub fn cni_args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
            self.name, self.id
        )
    }

    pub fn add(&self, annotations: Option<&serde_json::Value>) -> Output {
        self.net.cnidrv("add", &self.ns, &self.id, &self.cni_args(), annotations)
    }

    pub fn check(&self, annotations: Option<&serde_json::Value>) -> Output {
        self.net.cnidrv("check", &self.ns, &self.id, &self.cni_args(), annotations)
    }

    pub fn del(&self, annotations: Option<&serde_json::Value>) -> Output {
        self.deleted.store(true, Ordering::Relaxed);
        self.net.cnidrv("del", &self.ns, &self.id, &self.cni_args(), annotations)
    }

    pub fn addr(&self, family: Fam) -> IpAddr {
        self.ns.addr(family)
    }
}

impl Drop for Pod<'_> {
    fn drop(&mut self) {
        // Without a driver (its build failed and the test is already unwinding) there is nothing
        // to DEL with, and panicking again here would abort before the namespace is removed.
        if !self.deleted.load(Ordering::Relaxed) && CNIDRV.get().is_some() {
            let _ = self.net.cnidrv("del", &self.ns, &self.id, &self.cni_args(), None);
        }
    }
}

/// A finished command's stdout and stderr, for messages.
pub fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Calls the plugin binary directly (as a runtime would), with a CNI environment and stdin.
pub fn call_plugin(env: &[(&str, &str)], stdin: &str) -> Output {
    let mut child = Command::new(plugin())
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// Runs `f` on a thread that has entered `ns` (and, if given, switched to `uid`/`gid` — for that
/// thread only). Sockets made there stay in that namespace and carry that owner.
pub fn in_netns<T: Send>(ns: &(impl NsPath + ?Sized), uid: Option<u32>, f: impl FnOnce() -> T + Send) -> T {
    let file = fs::File::open(ns.ns_path()).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            // Safety: setns on a valid namespace descriptor affects only this thread, which ends
            // when the scope does; nothing else ever runs on it.
            assert_eq!(
                unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
                0,
                "setns: {}",
                std::io::Error::last_os_error()
            );
            if let Some(uid) = uid {
                // Raw syscalls change this thread's credentials only (glibc's wrappers would change
                // every thread of the test process).
                // Safety: plain system calls with integer arguments.
                unsafe {
                    assert_eq!(libc::syscall(libc::SYS_setresgid, uid, uid, uid), 0);
                    assert_eq!(libc::syscall(libc::SYS_setresuid, uid, uid, uid), 0);
                }
            }
            f()
        })
        .join()
        .expect("thread in netns panicked")
    })
}

/// How long a dial or a UDP question waits for its answer.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// A TCP server in a namespace that answers every connection with `"<name> <original-dst>\n"`,
/// where original-dst is what `SO_ORIGINAL_DST` reports (the address the client dialled before any
/// redirect). Stops and joins on drop.
pub struct Responder {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Responder {
    pub fn tcp(ns: &(impl NsPath + ?Sized), bind: SocketAddr, name: &str) -> Responder {
        let listener = in_netns(ns, None, || bind_tcp(bind)).unwrap_or_else(|e| panic!("bind {bind}: {e}"));
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, name) = (stop.clone(), name.to_owned());
        let handle = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        let dst = tproxy_cni::kernel::origdst::original_dst(&conn)
                            .map(|a| a.to_string())
                            .unwrap_or_else(|e| format!("none({e})"));
                        let _ = conn.write_all(format!("{name} {dst}\n").as_bytes());
                        let _ = conn.shutdown(Shutdown::Write);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Responder { stop, handle: Some(handle) }
    }

    /// A UDP server that answers every datagram with `"<name>"`.
    pub fn udp(ns: &Netns, bind: SocketAddr, name: &str) -> Responder {
        Responder::udp_as(ns, None, bind, name)
    }

    /// [`Responder::udp`] with a socket owned by `uid` (what `-m owner` sees on its answers).
    pub fn udp_as(ns: &Netns, uid: Option<u32>, bind: SocketAddr, name: &str) -> Responder {
        let sock = in_netns(ns, uid, || bind_udp(bind)).unwrap_or_else(|e| panic!("bind udp {bind}: {e}"));
        sock.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, name) = (stop.clone(), name.to_owned());
        let handle = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !stop2.load(Ordering::Relaxed) {
                if let Ok((_, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(name.as_bytes(), from);
                }
            }
        });
        Responder { stop, handle: Some(handle) }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A TCP listener; an IPv6 one is IPv6-only, so IPv4 and IPv6 listeners on one port are distinct.
fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(64)?;
    Ok(s.into())
}

fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::DGRAM, None)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// A socket address, for brevity in tests.
pub fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Who answered a [`dial`]: the first word of the answer (a [`Responder`]'s name), or "refused".
pub fn who(answer: &Result<String, String>) -> &str {
    match answer {
        Ok(s) => s.split_whitespace().next().unwrap_or(""),
        Err(_) => "refused",
    }
}

/// A plain pod that plays the remote host: on each of `ports`, TCP responders named
/// `server:<port>` (IPv4) and `server6:<port>` (IPv6); `extra` addresses (CIDR notation) are added
/// to its eth0 after the chain gave it `v4` and `v6`.
pub struct Sibling<'n> {
    pub pod: Pod<'n>,
    pub v4: IpAddr,
    pub v6: IpAddr,
    pub listeners: Vec<Responder>,
}

impl<'n> Sibling<'n> {
    pub fn new(net: &'n Network, ports: &[u16], extra: &[&str]) -> Sibling<'n> {
        let pod = net.pod("server", None);
        let (v4, v6) = (pod.addr(Fam::V4), pod.addr(Fam::V6));
        for a in extra {
            let mut args = vec!["ip", "addr", "add", a, "dev", "eth0"];
            if a.contains(':') {
                args.push("nodad");
            }
            pod.ns.exec(&args);
        }
        let mut listeners = Vec::new();
        for &port in ports {
            listeners.push(Responder::tcp(
                &pod.ns,
                sa(std::net::Ipv4Addr::UNSPECIFIED, port),
                &format!("server:{port}"),
            ));
            listeners.push(Responder::tcp(
                &pod.ns,
                sa(std::net::Ipv6Addr::UNSPECIFIED, port),
                &format!("server6:{port}"),
            ));
        }
        Sibling { pod, v4, v6, listeners }
    }
}

/// A Consul app pod's listeners: the proxy's outbound (15001) and inbound (20000) ports in both
/// families, an app port (9090, excluded from inbound redirection in the tests' configs), a
/// loopback-only service (127.0.0.1:8080) and Consul DNS on 127.0.0.1:8600 (UDP and TCP).
pub fn consul_app_listeners(ns: &Netns) -> Vec<Responder> {
    use std::net::{Ipv4Addr, Ipv6Addr};
    let (any4, any6, lo) = (Ipv4Addr::UNSPECIFIED, Ipv6Addr::UNSPECIFIED, Ipv4Addr::LOCALHOST);
    vec![
        Responder::tcp(ns, sa(any4, 15001), "outbound"),
        Responder::tcp(ns, sa(any6, 15001), "outbound6"),
        Responder::tcp(ns, sa(any4, 20000), "inbound"),
        Responder::tcp(ns, sa(any6, 20000), "inbound6"),
        Responder::tcp(ns, sa(any4, 9090), "app:9090"),
        Responder::tcp(ns, sa(lo, 8080), "app-local"),
        Responder::udp(ns, sa(lo, 8600), "consul-dns-udp"),
        Responder::tcp(ns, sa(lo, 8600), "consul-dns-tcp"),
    ]
}

/// Dials `to` from inside `ns` as `uid` (None: root) and returns the first line the server sent,
/// or the error (for example "connection refused" when nothing listens).
pub fn dial(ns: &(impl NsPath + ?Sized), uid: Option<u32>, to: SocketAddr) -> Result<String, String> {
    in_netns(ns, uid, || {
        let mut s = TcpStream::connect_timeout(&to, TIMEOUT).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| e.to_string())?;
        Ok(out.trim().to_owned())
    })
}

/// [`dial`] from a given local address (which must exist in `ns`).
pub fn dial_from(ns: &Netns, uid: Option<u32>, from: IpAddr, to: SocketAddr) -> Result<String, String> {
    in_netns(ns, uid, || {
        let s = socket2::Socket::new(socket2::Domain::for_address(to), socket2::Type::STREAM, None)
            .map_err(|e| e.to_string())?;
        s.bind(&SocketAddr::new(from, 0).into()).map_err(|e| format!("bind {from}: {e}"))?;
        s.connect_timeout(&to.into(), TIMEOUT).map_err(|e| e.to_string())?;
        let mut s: TcpStream = s.into();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| e.to_string())?;
        Ok(out.trim().to_owned())
    })
}

/// Sends one UDP datagram to `to` from inside `ns` and returns the reply, if one comes in time.
pub fn udp_ask(ns: &Netns, uid: Option<u32>, to: SocketAddr) -> Result<String, String> {
    in_netns(ns, uid, || {
        let bind: SocketAddr = if to.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
        let s = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
        s.connect(to).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let deadline = Instant::now() + TIMEOUT;
        let mut buf = [0u8; 512];
        // UDP may be lost: retry a bounded number of times until the deadline.
        while Instant::now() < deadline {
            s.send(b"query").map_err(|e| e.to_string())?;
            if let Ok(n) = s.recv(&mut buf) {
                return Ok(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        Err("no reply".into())
    })
}

/// Kuma annotations as a webhook in CNI mode writes them, with the given transparent-proxy YAML
/// (`None`: the per-knob annotations of webhooks up to v2.14, from `extra`).
pub fn kuma_pod(yaml: Option<&str>, extra: &[(&str, &str)]) -> serde_json::Value {
    let mut a = serde_json::json!({
        "kuma.io/sidecar-injected": "true",
        "k8s.v1.cni.cncf.io/networks": "kuma-cni",
    });
    if let Some(y) = yaml {
        a["traffic.kuma.io/transparent-proxy-config"] = serde_json::Value::from(y);
    }
    for (k, v) in extra {
        a[*k] = serde_json::Value::from(*v);
    }
    a
}

/// A Consul webhook's `redirect-traffic-config` with both families' exclusions (ports, CIDRs, a
/// UID) and `inbound` as the proxy's inbound port: the lifecycle and nftables suites' pod.
pub fn consul_config(inbound: u16) -> serde_json::Value {
    serde_json::json!({
        "ConsulDNSIP": "127.0.0.1", "ConsulDNSPort": 8600, "ProxyUserID": "5995",
        "ProxyInboundPort": inbound, "ProxyOutboundPort": 15001,
        "ExcludeInboundPorts": ["9090"], "ExcludeOutboundPorts": ["5432", "6379"],
        "ExcludeOutboundCIDRs": ["192.0.2.0/24", "198.51.100.0/24", "2001:db8::/32"], "ExcludeUIDs": ["5996"]
    })
}

/// Consul annotations as the webhook writes them, with the given redirect-traffic-config JSON.
pub fn consul_pod(config: serde_json::Value, extra: &[(&str, &str)]) -> serde_json::Value {
    let mut a = serde_json::json!({
        "consul.hashicorp.com/connect-inject-status": "injected",
        "consul.hashicorp.com/transparent-proxy-status": "enabled",
        "consul.hashicorp.com/redirect-traffic-config": config.to_string(),
    });
    for (k, v) in extra {
        a[*k] = serde_json::Value::from(*v);
    }
    a
}

/// Another program's `nft` session holding a table of our name, `ip6 tproxy-cni` with `flags
/// owner`: the kernel lets only that program's socket change or delete it, so a batch of ours that
/// names it is refused whole. The session (and with it the table) ends on drop.
pub struct OwnedTable(std::process::Child);

impl OwnedTable {
    pub fn hold(ns: &Netns) -> OwnedTable {
        let mut owner = Command::new("ip")
            .args(["netns", "exec", &ns.name, "nft", "-i"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = owner.stdin.as_mut().unwrap();
        stdin.write_all(b"add table ip6 tproxy-cni { flags owner; }\n").unwrap();
        stdin.flush().unwrap();
        let held = OwnedTable(owner);
        wait_for(Duration::from_secs(5), "the owner's table", || ns.nft_table(Fam::V6).contains("flags owner"));
        held
    }
}

impl Drop for OwnedTable {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

//! A private containerd (1.6, with its CRI plugin) for end-to-end tests, driven over its CRI socket
//! the way kubelet drives it.
//!
//! [`Containerd::start`] writes a configuration of its own — `root`, `state`, the gRPC and ttrpc
//! sockets, runc's root, the `opt` plugin's directory and the network namespaces' mounts all under
//! one temporary directory, a cgroup parent per instance — and starts `containerd --config` on it,
//! so nothing of a system containerd (there need not be one) is read or touched. The CRI plugin's
//! CNI `bin_dir` holds the reference plugins from `/usr/lib/cni` and the plugin cargo built, its
//! `conf_dir` one conflist: bridge + host-local on a bridge of the instance's own (no gateway, no
//! masquerade, a `198.18.72.0/24` / `fd18:72::/64` range no other test uses), then tproxy-cni with
//! the `io.kubernetes.cri.pod-annotations` capability, so containerd hands the plugin each pod's
//! annotations in `runtimeConfig`.
//!
//! No registry is reachable, so the sandbox ("pause") image is made here: a static C program that
//! waits for a signal, built with `gcc -static`, packed as a `docker save` archive and imported
//! with `ctr images import`. The CRI option `restrict_oom_score_adj` is set because this machine
//! drops `CAP_SYS_RESOURCE`, without which runc cannot give the sandbox its `oom_score_adj`.
//!
//! The test talks CRI `runtime.v1` with the `k8s-cri` bindings over tonic, on a current-thread
//! tokio runtime of its own; every call has a deadline. [`Containerd::finish`] stops and removes
//! every sandbox, stops containerd and asserts that nothing is left: sandbox, rule, veth, IP
//! reservation, network namespace, mount, libcni cache entry, shim process or socket, cgroup,
//! bridge, lock file. When a test fails first, `Drop` removes what it can.
//!
//! Only `tests/cri.rs` includes this file (`#[path]`, beside `mod support`), so the other test
//! binaries neither compile nor link the gRPC client.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::support::{
    Fam, NsPath, TempDir, harden, host_local_reservations, nft_reference, nft_tables, plugin, remove_cgroup_tree, sh,
    unique,
};

/// The programs a CRI test needs besides those of every network test.
pub const TOOLS: &[&str] = &[
    "/usr/bin/containerd",
    "/usr/bin/containerd-shim-runc-v2",
    "/usr/bin/ctr",
    "/usr/sbin/runc",
    "/usr/bin/gcc",
    "/usr/lib/x86_64-linux-gnu/libc.a",
    "/usr/bin/nsenter",
    "/usr/sbin/nft",
];

/// The sandbox image every instance imports and names in `sandbox_image`.
pub const PAUSE_IMAGE: &str = "localhost/tproxy-cni-e2e/pause:1";
/// The Kubernetes namespace of every pod (`K8S_POD_NAMESPACE`).
pub const NAMESPACE: &str = "e2e";
const SUBNET4: &str = "198.18.72.0/24";
const SUBNET6: &str = "fd18:72::/64";
/// Every CRI call ends within this.
const CRI_DEADLINE: Duration = Duration::from_secs(60);
/// Every `ctr` call ends within this (seconds), or is killed.
const CTR_DEADLINE: &str = "60";

/// The pause program: PID 1 of each sandbox, waiting until it is told to stop. As PID 1 of a PID
/// namespace it gets no default signal action, hence the handlers.
const PAUSE_C: &str = r#"#include <signal.h>
#include <unistd.h>
static void stop(int sig) { (void)sig; _exit(0); }
int main(void) {
    signal(SIGTERM, stop);
    signal(SIGINT, stop);
    for (;;) pause();
}
"#;

/// A packet-filtering engine of the plugin, as a test selects it in the conflist and reads back
/// what it installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// The iptables engine with iptables-nft.
    IptablesNft,
    /// The iptables engine with iptables-legacy (which keeps a lock file per namespace).
    IptablesLegacy,
    /// The native nftables engine: the tables `ip tproxy-cni` and `ip6 tproxy-cni`.
    Nftables,
}

impl Engine {
    /// The keys of the plugin's conflist entry that choose this engine.
    pub fn conf(self) -> Value {
        match self {
            Engine::IptablesNft => json!({"backend": "iptables", "iptables_mode": "nft"}),
            Engine::IptablesLegacy => json!({"backend": "iptables", "iptables_mode": "legacy"}),
            Engine::Nftables => json!({"backend": "nftables"}),
        }
    }

    fn iptables_backend(self) -> &'static str {
        match self {
            Engine::IptablesNft => "nft",
            Engine::IptablesLegacy => "legacy",
            Engine::Nftables => unreachable!("the nftables engine has no iptables backend"),
        }
    }

    /// What of ours the namespace holds, per family, read from the engine's own listing with the
    /// harness's notion of ownership (`harden::read`).
    fn installed(self, ns: &(impl NsPath + ?Sized)) -> BTreeMap<Fam, harden::Ours> {
        [Fam::V4, Fam::V6]
            .into_iter()
            .map(|f| (f, harden::read(&nsenter(ns, &[&format!("{}-{}-save", f.tool(), self.iptables_backend())])).0))
            .collect()
    }

    /// Every chain and rule of ours in the namespace, one line each (empty when it holds
    /// nothing of ours).
    pub fn ours(self, ns: &(impl NsPath + ?Sized)) -> Vec<String> {
        if self == Engine::Nftables {
            return nft_tables(ns).lines().map(str::to_owned).collect();
        }
        let mut v = Vec::new();
        for (fam, o) in self.installed(ns) {
            v.extend(o.chains.iter().map(|(t, c)| format!("{} {t} :{c}", fam.tool())));
            for ((t, c), specs) in &o.rules {
                v.extend(specs.iter().map(|s| format!("{} {t} -A {c} {s}", fam.tool())));
            }
        }
        v
    }

    /// Asserts that the namespace holds exactly what a pod with `annotations` and an IPv6
    /// address must get, as the library's pure rule builder gives it (pinned by the golden tests):
    /// every chain and rule, in order, in both families, and nothing more.
    ///
    /// For the nftables engine the reference is what the `nft` program makes, in a namespace of
    /// the test's own, of the script `tproxy-cni render --backend nftables` prints (the nftables
    /// tests pin that script against the golden cases).
    pub fn assert_installed(self, ns: &(impl NsPath + ?Sized), annotations: &Value, what: &str) {
        if self == Engine::Nftables {
            assert_eq!(nft_tables(ns), nft_reference(annotations, true), "{what}: the tables in its namespace");
            return;
        }
        assert_eq!(self.installed(ns), harden::expected(annotations, true), "{what}: the rules in its namespace");
    }

    /// Whether this engine keeps a lock file per namespace under `/run/tproxy-cni/xtables`.
    pub fn locks(self) -> bool {
        self == Engine::IptablesLegacy
    }
}

/// All netfilter state of a namespace, whoever made it: every nftables table (iptables-nft's
/// included) and every legacy iptables rule. Empty for a namespace nobody touched.
pub fn netfilter(ns: &(impl NsPath + ?Sized)) -> String {
    let mut s = nsenter(ns, &["nft", "list", "ruleset"]);
    for tool in ["iptables-legacy-save", "ip6tables-legacy-save"] {
        s += &nsenter(ns, &[tool]);
    }
    s
}

/// Runs a program inside the network namespace and returns its stdout.
pub fn nsenter(ns: &(impl NsPath + ?Sized), args: &[&str]) -> String {
    sh(Command::new("nsenter").arg(format!("--net={}", ns.ns_path().display())).args(args))
}

/// A sandbox's network namespace held open by the test: it lives as long as this value, whatever
/// containerd does with its own mount, so the test can look inside after StopPodSandbox.
pub struct HeldNetns {
    file: File,
}

impl HeldNetns {
    fn open(path: &Path) -> HeldNetns {
        HeldNetns { file: File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display())) }
    }

    /// The namespace's identity (device and inode), as tproxy-cni names its lock files.
    pub fn id(&self) -> String {
        let m = self.file.metadata().unwrap();
        format!("{}-{}", m.dev(), m.ino())
    }
}

impl NsPath for HeldNetns {
    fn ns_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), self.file.as_raw_fd()))
    }
}

/// A running pod sandbox, as PodSandboxStatus describes it.
pub struct Sandbox {
    pub name: String,
    pub id: String,
    /// containerd's bind mount of the sandbox's network namespace.
    pub netns: PathBuf,
    pub ns: HeldNetns,
    pub v4: IpAddr,
    pub v6: IpAddr,
}

/// What a RunPodSandbox that failed left to be seen: containerd's message.
#[derive(Debug)]
pub struct Refused(pub String);

/// One private containerd, its CNI network and a CRI client connected to it.
pub struct Containerd {
    dir: TempDir,
    /// The conflist's network name, which is also its bridge's name.
    pub bridge: String,
    cgroup_parent: String,
    engine: Engine,
    child: Option<Child>,
    rt: tokio::runtime::Runtime,
    client: Option<RuntimeServiceClient<Channel>>,
    /// Every sandbox this instance ran: ID, namespace mount, namespace identity.
    seen: RefCell<Vec<(String, PathBuf, String)>>,
    finished: bool,
}

impl Containerd {
    /// Starts a containerd whose conflist's tproxy-cni entry selects `engine` and carries `extra`
    /// (more keys, such as a `kubeconfig`), with the pause image imported; panics if it cannot.
    pub fn start(engine: Engine, extra: Value) -> Containerd {
        let dir = TempDir::new("crid");
        let bridge = unique("tpc");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
        let mut c = Containerd {
            cgroup_parent: format!("/{bridge}"),
            dir,
            bridge,
            engine,
            child: None,
            rt,
            client: None,
            seen: RefCell::new(Vec::new()),
            finished: false,
        };
        c.write_cni(extra);
        let config = c.write_config();
        let log = File::create(c.path("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        c.child = Some(child);
        c.connect();
        c.import_pause_image();
        c
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// containerd's gRPC socket.
    pub fn socket(&self) -> PathBuf {
        self.path("containerd.sock")
    }

    /// The CNI directories: the reference plugins and ours, and the one conflist.
    fn write_cni(&self, extra: Value) {
        let bin = self.path("cni/bin");
        fs::create_dir_all(&bin).unwrap();
        fs::create_dir_all(self.path("cni/conf")).unwrap();
        for p in ["bridge", "host-local", "loopback"] {
            std::os::unix::fs::symlink(Path::new("/usr/lib/cni").join(p), bin.join(p)).unwrap();
        }
        std::os::unix::fs::symlink(plugin(), bin.join("tproxy-cni")).unwrap();
        let mut ours = json!({
            "type": "tproxy-cni",
            "log_level": "debug",
            "log_file": self.path("plugin.log"),
            "capabilities": {"io.kubernetes.cri.pod-annotations": true},
        });
        for (k, v) in self.engine.conf().as_object().unwrap().iter().chain(extra.as_object().expect("an object")) {
            ours[k] = v.clone();
        }
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": self.bridge,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": false,
                    "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": self.path("ipam"),
                        "ranges": [[{"subnet": SUBNET4}], [{"subnet": SUBNET6}]],
                    },
                },
                ours,
            ],
        });
        fs::write(self.path("cni/conf/10-e2e.conflist"), serde_json::to_vec_pretty(&conflist).unwrap()).unwrap();
    }

    /// containerd's configuration: everything it keeps under this instance's directory.
    fn write_config(&self) -> PathBuf {
        let p = |rel: &str| self.path(rel).display().to_string();
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
# Snapshotters and tracing a test does not use (some would probe the host).
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        Root = "{runc}"
        SystemdCgroup = false
"#,
            root = p("root"),
            state = p("state"),
            sock = self.socket().display(),
            opt = p("opt"),
            cni_bin = p("cni/bin"),
            cni_conf = p("cni/conf"),
            runc = p("runc"),
        );
        let path = self.path("config.toml");
        fs::write(&path, config).unwrap();
        path
    }

    /// containerd's own log, for failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(self.path("containerd.log")).unwrap_or_default()
    }

    /// The plugin's log file.
    pub fn plugin_log(&self) -> String {
        fs::read_to_string(self.path("plugin.log")).unwrap_or_default()
    }

    /// Waits (bounded) for the CRI service to answer `Version`.
    fn connect(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let sock = self.socket();
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("containerd exited ({status}): {}", self.log());
            }
            if sock.exists() {
                let attempt = self.rt.block_on(async {
                    let channel =
                        tokio::time::timeout(Duration::from_secs(5), channel(sock.clone())).await.ok()?.ok()?;
                    let mut client = RuntimeServiceClient::new(channel);
                    let v =
                        tokio::time::timeout(Duration::from_secs(5), client.version(cri::VersionRequest::default()))
                            .await
                            .ok()?
                            .ok()?;
                    Some((client, v.into_inner()))
                });
                if let Some((client, version)) = attempt {
                    assert_eq!(version.runtime_name, "containerd", "{version:?}");
                    self.client = Some(client);
                    return;
                }
            }
            assert!(Instant::now() < deadline, "containerd's CRI service did not come up: {}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Builds the pause program, packs it as a `docker save` archive and imports it.
    fn import_pause_image(&self) {
        let d = self.path("pause");
        fs::create_dir_all(d.join("rootfs")).unwrap();
        fs::create_dir_all(d.join("image")).unwrap();
        fs::write(d.join("pause.c"), PAUSE_C).unwrap();
        sh(Command::new("gcc").args(["-static", "-Os", "-s", "-o"]).arg(d.join("rootfs/pause")).arg(d.join("pause.c")));
        let image = d.join("image");
        sh(Command::new("tar")
            .args(["--owner=0", "--group=0", "--numeric-owner", "-C"])
            .arg(d.join("rootfs"))
            .arg("-cf")
            .arg(image.join("layer.tar"))
            .arg("pause"));
        let diff_id = hex(&Sha256::digest(fs::read(image.join("layer.tar")).unwrap()));
        let config = json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": ["/pause"]},
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{diff_id}")]},
        })
        .to_string();
        let config_name = format!("{}.json", hex(&Sha256::digest(config.as_bytes())));
        fs::write(image.join(&config_name), &config).unwrap();
        let manifest = json!([{"Config": config_name, "RepoTags": [PAUSE_IMAGE], "Layers": ["layer.tar"]}]);
        fs::write(image.join("manifest.json"), manifest.to_string()).unwrap();
        let archive = d.join("pause.tar");
        sh(Command::new("tar").arg("-C").arg(&image).arg("-cf").arg(&archive).args([
            "manifest.json",
            &config_name,
            "layer.tar",
        ]));
        sh(Command::new("timeout")
            .args(["--kill-after=5", CTR_DEADLINE, "ctr", "--address"])
            .arg(self.socket())
            .args(["--namespace", "k8s.io", "images", "import", "--platform", "linux/amd64"])
            .arg(&archive));
    }

    /// Runs one CRI call with the deadline.
    fn call<T, F, Fut>(&self, f: F) -> Result<T, tonic::Status>
    where
        F: FnOnce(RuntimeServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = self.client.clone().expect("connected");
        self.rt.block_on(async {
            match tokio::time::timeout(CRI_DEADLINE, f(client)).await {
                Ok(r) => r.map(tonic::Response::into_inner),
                Err(_) => Err(tonic::Status::deadline_exceeded(format!("no answer within {CRI_DEADLINE:?}"))),
            }
        })
    }
}

/// The sandboxes' lives: RunPodSandbox, PodSandboxStatus, StopPodSandbox, RemovePodSandbox.
impl Containerd {
    /// RunPodSandbox of pod `name` in [`NAMESPACE`] with `annotations` (an object of strings;
    /// `None`: no annotations at all, which containerd passes on as `null`), then its status.
    pub fn try_run(&self, name: &str, annotations: Option<&Value>) -> Result<Sandbox, Refused> {
        let annotations: HashMap<String, String> = annotations
            .map(|a| {
                let a = a.as_object().expect("annotations are an object");
                a.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().expect("annotation values are strings").to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.to_owned(),
                uid: unique("uid-"),
                namespace: NAMESPACE.to_owned(),
                attempt: 0,
            }),
            hostname: name.to_owned(),
            labels: HashMap::from([("app".to_owned(), name.to_owned())]),
            annotations,
            linux: Some(cri::LinuxPodSandboxConfig { cgroup_parent: self.cgroup_parent.clone(), ..Default::default() }),
            ..Default::default()
        };
        let request = cri::RunPodSandboxRequest { config: Some(config), runtime_handler: String::new() };
        let id = self
            .call(|mut c| async move { c.run_pod_sandbox(request).await })
            .map_err(|s| Refused(s.message().to_owned()))?
            .pod_sandbox_id;
        Ok(self.inspect(name, &id))
    }

    /// [`Containerd::try_run`], panicking if containerd refuses.
    pub fn run(&self, name: &str, annotations: Option<&Value>) -> Sandbox {
        self.try_run(name, annotations).unwrap_or_else(|Refused(msg)| panic!("RunPodSandbox {name}: {msg}"))
    }

    /// A ready sandbox's addresses and network namespace, from PodSandboxStatus (verbose).
    fn inspect(&self, name: &str, id: &str) -> Sandbox {
        let request = cri::PodSandboxStatusRequest { pod_sandbox_id: id.to_owned(), verbose: true };
        let answer = self
            .call(|mut c| async move { c.pod_sandbox_status(request).await })
            .unwrap_or_else(|s| panic!("PodSandboxStatus {name}: {s}"));
        let status = answer.status.expect("a status");
        assert_eq!(status.state, cri::PodSandboxState::SandboxReady as i32, "{name}: {status:?}");
        let network = status.network.expect("a network status");
        let ips: Vec<IpAddr> = std::iter::once(network.ip.as_str())
            .chain(network.additional_ips.iter().map(|p| p.ip.as_str()))
            .map(|ip| ip.parse().unwrap_or_else(|e| panic!("{name}'s address {ip:?}: {e}")))
            .collect();
        let v4 = *ips.iter().find(|ip| ip.is_ipv4()).unwrap_or_else(|| panic!("{name} has no IPv4 address: {ips:?}"));
        let v6 = *ips.iter().find(|ip| ip.is_ipv6()).unwrap_or_else(|| panic!("{name} has no IPv6 address: {ips:?}"));
        let info = answer.info.get("info").unwrap_or_else(|| panic!("{name}: no verbose info"));
        let netns = netns_path(info).unwrap_or_else(|| panic!("{name}: no network namespace in {info}"));
        let ns = HeldNetns::open(&netns);
        self.seen.borrow_mut().push((id.to_owned(), netns.clone(), ns.id()));
        Sandbox { name: name.to_owned(), id: id.to_owned(), netns, ns, v4, v6 }
    }

    /// StopPodSandbox.
    pub fn stop(&self, id: &str) -> Result<(), tonic::Status> {
        let request = cri::StopPodSandboxRequest { pod_sandbox_id: id.to_owned() };
        self.call(|mut c| async move { c.stop_pod_sandbox(request).await }).map(drop)
    }

    /// RemovePodSandbox.
    pub fn remove(&self, id: &str) -> Result<(), tonic::Status> {
        let request = cri::RemovePodSandboxRequest { pod_sandbox_id: id.to_owned() };
        self.call(|mut c| async move { c.remove_pod_sandbox(request).await }).map(drop)
    }

    /// The sandboxes containerd knows: `name id state` for each.
    pub fn list(&self) -> Vec<String> {
        let answer = self
            .call(|mut c| async move { c.list_pod_sandbox(cri::ListPodSandboxRequest::default()).await })
            .unwrap_or_else(|s| panic!("ListPodSandbox: {s}"));
        answer
            .items
            .iter()
            .map(|p| {
                let name = p.metadata.as_ref().map_or("?", |m| m.name.as_str());
                let state = cri::PodSandboxState::try_from(p.state).map_or("?", |s| s.as_str_name());
                format!("{name} {} {state}", p.id)
            })
            .collect()
    }

    /// The ports of the instance's bridge: one host-side veth per attached sandbox.
    pub fn bridge_ports(&self) -> Vec<String> {
        fs::read_dir(Path::new("/sys/class/net").join(&self.bridge).join("brif"))
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    }

    /// The addresses host-local holds (one file per address).
    pub fn reserved(&self) -> Vec<String> {
        host_local_reservations(&self.path("ipam").join(&self.bridge))
    }

    /// The network namespaces containerd has mounted (under its state directory).
    pub fn netns_mounts(&self) -> Vec<String> {
        let state = self.path("state").display().to_string();
        mount_points().into_iter().filter(|m| m.starts_with(&state) && m.contains("/netns/")).collect()
    }

    /// The legacy engine's lock file for a namespace (by its identity).
    pub fn lock_file(id: &str) -> PathBuf {
        Path::new("/run/tproxy-cni/xtables").join(format!("{id}.lock"))
    }

    /// The socket containerd 1.6 gives the shim of sandbox `id`: named by a hash of the gRPC
    /// address, namespace and ID, under the machine-wide `/run/containerd/s`.
    fn shim_socket(&self, id: &str) -> PathBuf {
        let key = self.socket().join("k8s.io").join(id);
        Path::new("/run/containerd/s").join(hex(&Sha256::digest(key.as_os_str().as_encoded_bytes())))
    }

    /// The cgroup parent's directory in every hierarchy where it exists.
    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        let rel = self.cgroup_parent.trim_start_matches('/');
        let mut found: Vec<PathBuf> = fs::read_dir("/sys/fs/cgroup")
            .map(|h| h.flatten().map(|h| h.path().join(rel)).filter(|p| p.is_dir()).collect())
            .unwrap_or_default();
        let unified = Path::new("/sys/fs/cgroup").join(rel);
        if unified.is_dir() && !found.contains(&unified) {
            found.push(unified);
        }
        found
    }

    /// Processes whose command line names this instance's directory: containerd and its shims.
    fn processes(&self) -> Vec<(i32, String)> {
        let needle = self.dir.path().to_string_lossy().into_owned();
        let Ok(procs) = fs::read_dir("/proc") else { return Vec::new() };
        procs
            .flatten()
            .filter_map(|p| {
                let pid: i32 = p.file_name().to_str()?.parse().ok()?;
                let cmdline = fs::read(p.path().join("cmdline")).ok()?;
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                cmdline.contains(&needle).then_some((pid, cmdline))
            })
            .collect()
    }

    /// What of sandbox `id` containerd still holds or left on the machine: its entry, its
    /// directories, its mounts (the shm, the netns, the pause rootfs), libcni's cached results
    /// (which containerd keeps in the machine-wide `/var/lib/cni`) for the pod network and the
    /// loopback, and its shim's socket.
    pub fn traces_of(&self, id: &str) -> Vec<String> {
        let mut left: Vec<String> =
            self.list().into_iter().filter(|s| s.contains(id)).map(|s| format!("sandbox {s}")).collect();
        for dir in ["root", "state"] {
            let d = self.path(dir).join("io.containerd.grpc.v1.cri/sandboxes").join(id);
            if d.exists() {
                left.push(format!("directory {}", d.display()));
            }
        }
        left.extend(mount_points().into_iter().filter(|m| m.contains(id)).map(|m| format!("mount {m}")));
        for name in [format!("{}-{id}-eth0", self.bridge), format!("cni-loopback-{id}-lo")] {
            let cached = Path::new("/var/lib/cni/results").join(name);
            if cached.exists() {
                left.push(format!("CNI cache {}", cached.display()));
            }
        }
        let shim = self.shim_socket(id);
        if shim.exists() {
            left.push(format!("shim socket {}", shim.display()));
        }
        left
    }

    /// What of the sandboxes is left while containerd still runs.
    fn sandbox_leftovers(&self) -> Vec<String> {
        let mut left: Vec<String> = self.list().into_iter().map(|s| format!("sandbox {s}")).collect();
        left.extend(self.bridge_ports().into_iter().map(|p| format!("bridge port {p}")));
        left.extend(self.reserved().into_iter().map(|ip| format!("IP reservation {ip}")));
        left.extend(self.netns_mounts().into_iter().map(|m| format!("network namespace mount {m}")));
        for (id, netns, ns_id) in self.seen.borrow().iter() {
            left.extend(self.traces_of(id));
            if netns.exists() {
                left.push(format!("network namespace {}", netns.display()));
            }
            // Lock files are named after the namespace's inode, which the kernel reuses: only an
            // engine that makes them can be blamed for one under our name.
            let lock = Containerd::lock_file(ns_id);
            if self.engine.locks() && lock.exists() {
                left.push(format!("lock file {}", lock.display()));
            }
        }
        left
    }

    /// What of the instance is left once containerd is gone.
    fn host_leftovers(&self) -> Vec<String> {
        let mut left: Vec<String> =
            self.processes().into_iter().map(|(pid, c)| format!("process {pid}: {c}")).collect();
        let root = self.dir.path().display().to_string();
        left.extend(mount_points().into_iter().filter(|m| m.starts_with(&root)).map(|m| format!("mount {m}")));
        if Path::new("/sys/class/net").join(&self.bridge).exists() {
            left.push(format!("bridge {}", self.bridge));
        }
        left.extend(self.cgroup_dirs().into_iter().map(|d| format!("cgroup {}", d.display())));
        left
    }

    /// Stops and removes every sandbox containerd knows; returns what failed.
    fn remove_all(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let Some(client) = self.client.clone() else { return errors };
        let listed = self.rt.block_on(async move {
            let mut c = client;
            tokio::time::timeout(CRI_DEADLINE, c.list_pod_sandbox(cri::ListPodSandboxRequest::default())).await
        });
        let ids: Vec<String> = match listed {
            Ok(Ok(r)) => r.into_inner().items.into_iter().map(|p| p.id).collect(),
            Ok(Err(s)) => return vec![format!("ListPodSandbox: {s}")],
            Err(_) => return vec!["ListPodSandbox: no answer".to_owned()],
        };
        for id in ids {
            if let Err(s) = self.stop(&id).and_then(|()| self.remove(&id)) {
                errors.push(format!("sandbox {id}: {s}"));
            }
        }
        errors
    }

    /// Stops containerd (SIGTERM, then SIGKILL after a while), then any shim still running.
    fn shut_down(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id() as i32;
            // Safety: signalling our own child, which has not been reaped yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.client = None;
        // Shims outlive containerd by design; those of this instance (named by its socket) go too.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = self.processes();
            if left.is_empty() || Instant::now() > deadline {
                break;
            }
            for (pid, _) in left {
                // Safety: a process this test's containerd started (its command line names the
                // test's own directory), signalled by its ID.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Removes the bridge and the cgroup parent (children first; a process on its way out may
    /// hold one for a moment, so each is retried for a bounded while); returns what failed.
    fn remove_host_state(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).stderr(Stdio::null()).status();
        for dir in self.cgroup_dirs() {
            errors.extend(remove_cgroup_tree(&dir));
        }
        errors
    }

    /// Removes every sandbox, stops containerd and asserts that nothing of this instance is left.
    pub fn finish(mut self) {
        self.finished = true;
        let errors = self.remove_all();
        assert!(errors.is_empty(), "teardown failed: {errors:#?}\n{}", self.log());
        // Shims leave on their own once their sandbox is removed: give them a bounded while.
        eventually_empty("sandbox leftovers", || self.sandbox_leftovers());
        self.shut_down();
        let errors = self.remove_host_state();
        assert!(errors.is_empty(), "teardown failed: {errors:#?}");
        eventually_empty("host leftovers", || self.host_leftovers());
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let errors = self.remove_all();
        if !errors.is_empty() {
            eprintln!("containerd teardown after a failure: {errors:#?}");
        }
        self.shut_down();
        // Mounts of sandboxes containerd could not remove would keep the files busy.
        let root = self.dir.path().display().to_string();
        let mut points: Vec<String> = mount_points().into_iter().filter(|m| m.starts_with(&root)).collect();
        points.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in points {
            let _ = Command::new("umount").args(["--lazy", &m]).status();
        }
        for e in self.remove_host_state() {
            eprintln!("containerd teardown after a failure: {e}");
        }
    }
}

/// Waits (bounded) for `left` to come back empty, then asserts it is.
fn eventually_empty(what: &str, mut left: impl FnMut() -> Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut now = left();
    while !now.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        now = left();
    }
    assert!(now.is_empty(), "{what}: {now:#?}");
}

/// Every mount point on the machine (as this process sees them).
fn mount_points() -> Vec<String> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .collect()
}

/// The sandbox's network namespace in PodSandboxStatus's verbose info: the runtime spec's
/// `network` namespace path.
fn netns_path(info: &str) -> Option<PathBuf> {
    let info: Value = serde_json::from_str(info).ok()?;
    let namespaces = info["runtimeSpec"]["linux"]["namespaces"].as_array()?;
    let network = namespaces.iter().find(|n| n["type"] == "network")?;
    network["path"].as_str().filter(|p| !p.is_empty()).map(PathBuf::from)
}

/// A tonic channel over the unix socket at `path` (the URI is required and unused).
async fn channel(path: PathBuf) -> Result<Channel, tonic::transport::Error> {
    Endpoint::try_from("http://localhost")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

//! End to end under a real container runtime: podman 4 with its CNI backend (runc, overlay
//! storage) starts containers on a network whose conflist chains tproxy-cni after bridge +
//! host-local, and the plugin finds each container's pod through the API-server stand-in. podman
//! hands plugins no annotations: it sends `K8S_POD_NAME=<container name>` and no namespace, which
//! the conflist's `default_namespace` supplies.
//!
//! Each test gets a podman of its own — storage (`--root`, `--runroot`), a `tmp_dir` holding file
//! locks and the event log, a network configuration directory, a cgroup parent, an image (a
//! busybox rootfs imported with `podman import`, no registry), a network and its bridge — so tests
//! run concurrently with each other and with any other podman on the machine, and touch nothing
//! of theirs. The bridge has no address on the host and no masquerade: traffic only goes between
//! the test's own containers. [`Podman::finish`] removes everything and asserts that nothing was
//! left behind (container, image, network, bridge, namespace, CNI cache entry, IP reservation,
//! cgroup, mount, process, lock file); when a test fails first, `Drop` removes what it can.
//!
//! The containers' own processes make the traffic (busybox `nc` run with `podman exec`); the
//! stand-in proxies and servers are the harness's listeners, placed in each container's network
//! namespace through a descriptor the test holds. Holding it also keeps the namespace alive after
//! podman has let go of it, which is how the tests see that `podman stop` removed our rules rather
//! than just the namespace.
//!
//! Every test runs on both engines of the plugin (`…::iptables`, `…::nftables`:
//! [`both_engines!`]).
//!
//! Needs root, podman, runc and busybox-static (`hack/deps.sh` installs them): skipped without
//! them on a laptop, a failure in CI.

use std::cell::RefCell;
use std::fs::{self, File};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::both_engines;
use crate::support::apiserver::{ApiServer, Fault, PodFixture};
use crate::support::*;
use serde_json::{Value, json};

/// The programs these tests need besides those of every network test.
const TOOLS: &[&str] = &["/usr/bin/podman", "/usr/sbin/runc", "/usr/bin/conmon", "/bin/busybox", "/usr/bin/nsenter"];
/// The namespace the conflist's `default_namespace` gives every container.
const NAMESPACE: &str = "e2e";
const IMAGE: &str = "localhost/tproxy-cni-e2e/busybox:latest";
const SUBNET4: &str = "198.18.64.0/24";
const SUBNET6: &str = "fd18:64::/64";
/// Every podman command ends within this, or is killed.
const PODMAN_DEADLINE: &str = "120";

const CONSUL_PROXY_UID: u32 = 5995;
const KUMA_PROXY_UID: u32 = 5678;
const ANY4: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
const ANY6: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

/// A network namespace held open by the test: it lives as long as this value, whatever podman
/// does with its own reference.
struct HeldNs {
    file: File,
}

impl HeldNs {
    fn open(path: &Path) -> HeldNs {
        HeldNs { file: File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display())) }
    }

    /// The namespace's identity (device and inode), as tproxy-cni names it.
    fn id(&self) -> String {
        let m = self.file.metadata().unwrap();
        format!("{}-{}", m.dev(), m.ino())
    }

    /// Runs a program inside the namespace and returns its stdout.
    fn run(&self, args: &[&str]) -> String {
        sh(Command::new("nsenter").arg(format!("--net={}", self.ns_path().display())).args(args))
    }

    /// Every chain and rule of ours in one family and backend: our chains' declarations, rules in
    /// them or jumping to them, and rules carrying our comments.
    fn ours(&self, family: Fam, backend: &str) -> Vec<String> {
        let marks = ["CONSUL_", "KUMA_MESH", "--comment tproxy-cni", "kuma/mesh/transparent/proxy"];
        self.run(&[&format!("{}-{backend}-save", family.tool())])
            .lines()
            .filter(|l| !l.starts_with('#') && marks.iter().any(|m| l.contains(m)))
            .map(|l| l.split(" [").next().unwrap_or(l).to_owned())
            .collect()
    }

    /// Ours in both families, as `engine` installs them: the iptables engine's chains and rules,
    /// or our nftables tables as `nft list table` prints them.
    fn all_ours(&self, engine: Engine) -> Vec<String> {
        let Engine::Iptables(backend) = engine else {
            return nft_tables(self).lines().map(str::to_owned).collect();
        };
        let mut v = self.ours(Fam::V4, backend);
        v.extend(self.ours(Fam::V6, backend).into_iter().map(|l| format!("ipv6 {l}")));
        v
    }

    /// Nothing at all in the namespace's netfilter: no nftables table, no legacy iptables rule.
    fn netfilter(&self) -> String {
        let mut s = self.run(&["nft", "list", "ruleset"]);
        for tool in ["iptables-legacy-save", "ip6tables-legacy-save"] {
            s += &self.run(&[tool]);
        }
        s
    }
}

impl NsPath for HeldNs {
    fn ns_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), self.file.as_raw_fd()))
    }
}

/// A running container, as `podman inspect` describes it.
struct Container {
    name: String,
    id: String,
    /// The bind mount podman made for the container's network namespace.
    sandbox: PathBuf,
    ns: HeldNs,
    v4: IpAddr,
    v6: IpAddr,
}

impl Container {
    /// The stand-in proxy of a mesh container: outbound and inbound listeners in both families,
    /// each answering with `<prefix>outbound` / `<prefix>inbound` (`…6` for IPv6).
    fn proxy(&self, prefix: &str, outbound: u16, inbound: u16) -> Vec<Responder> {
        let mut l = Vec::new();
        for (any, sfx) in [(ANY4, ""), (ANY6, "6")] {
            l.push(Responder::tcp(&self.ns, sa(any, outbound), &format!("{prefix}outbound{sfx}")));
            l.push(Responder::tcp(&self.ns, sa(any, inbound), &format!("{prefix}inbound{sfx}")));
        }
        l
    }

    /// Plain servers on `port`, answering `server` / `server6`.
    fn server(&self, port: u16) -> Vec<Responder> {
        vec![Responder::tcp(&self.ns, sa(ANY4, port), "server"), Responder::tcp(&self.ns, sa(ANY6, port), "server6")]
    }
}

/// One isolated podman, its network (bridge + host-local + tproxy-cni), and the stand-in API
/// server the plugin asks about each container.
struct Podman {
    dir: TempDir,
    network: String,
    cgroup_parent: String,
    api: ApiServer,
    /// Every namespace podman gave a container, and its identity: all must be gone at the end.
    sandboxes: RefCell<Vec<(PathBuf, String)>>,
    /// The plugin uses the legacy backend, which keeps a lock file per namespace.
    legacy: bool,
    finished: bool,
}

impl Podman {
    /// A podman whose network's tproxy-cni entry carries `plugin_conf` (extra keys) besides the
    /// stand-in's kubeconfig and `default_namespace`.
    fn new(plugin_conf: Value) -> Podman {
        let dir = TempDir::new("podman");
        let network = unique("tpm");
        let api = ApiServer::start();
        let pm = Podman {
            cgroup_parent: format!("/{network}"),
            sandboxes: RefCell::new(Vec::new()),
            legacy: plugin_conf["iptables_mode"] == "legacy",
            finished: false,
            dir,
            network,
            api,
        };
        let d = pm.dir.path();
        for sub in ["net", "tmp", "storage", "run"] {
            fs::create_dir_all(d.join(sub)).unwrap();
        }
        let plugin_dir = plugin().parent().unwrap().to_owned();
        // No system file is read: podman takes this containers.conf and storage.conf only (and
        // passes them on to the cleanup processes conmon starts when a container exits).
        let containers_conf = format!(
            r#"[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
lock_type = "file"
tmp_dir = "{tmp}"
[network]
network_backend = "cni"
cni_plugin_dirs = ["/usr/lib/cni", "{plugin_dir}"]
network_config_dir = "{net}"
"#,
            tmp = d.join("tmp").display(),
            plugin_dir = plugin_dir.display(),
            net = d.join("net").display(),
        );
        fs::write(d.join("containers.conf"), containers_conf).unwrap();
        let storage_conf = format!(
            "[storage]\ndriver = \"overlay\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
            d.join("storage").display(),
            d.join("run").display()
        );
        fs::write(d.join("storage.conf"), storage_conf).unwrap();

        let mut ours = json!({
            "type": "tproxy-cni",
            "log_level": "debug",
            "log_file": d.join("plugin.log"),
            "kubeconfig": pm.api.default_kubeconfig(),
            "default_namespace": NAMESPACE,
            "api_timeout": "2s",
            "capabilities": {"io.kubernetes.cri.pod-annotations": true},
        });
        for (k, v) in plugin_conf.as_object().expect("plugin_conf is an object") {
            ours[k] = v.clone();
        }
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": pm.network,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": pm.network,
                    "isGateway": false,
                    "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": d.join("ipam"),
                        "ranges": [[{"subnet": SUBNET4}], [{"subnet": SUBNET6}]],
                    },
                },
                ours,
            ],
        });
        fs::write(d.join("net").join(format!("{}.conflist", pm.network)), conflist.to_string()).unwrap();
        pm.import_image();
        pm
    }

    /// A podman command with this instance's configuration, bounded in time.
    fn command(&self) -> Command {
        let mut cmd = Command::new("timeout");
        cmd.args(["--kill-after=5", PODMAN_DEADLINE, "podman"]);
        self.configure(&mut cmd);
        cmd
    }

    fn configure(&self, cmd: &mut Command) {
        let d = self.dir.path();
        cmd.arg("--root")
            .arg(d.join("storage"))
            .arg("--runroot")
            .arg(d.join("run"))
            .args(["--storage-driver", "overlay"])
            .env("CONTAINERS_CONF", d.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", d.join("storage.conf"))
            .env_remove("CNI_ARGS")
            .stdin(Stdio::null());
    }

    fn podman(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("run podman")
    }

    /// Runs podman, panicking with its output if it fails; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.podman(args);
        assert!(out.status.success(), "podman {}: {}", args.join(" "), text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Imports the image from a busybox rootfs. c/image records every import in a machine-wide
    /// cache (`/var/lib/containers/cache`); the import runs in a mount namespace of its own with a
    /// private `/var/lib`, so that nothing outside this test's directory is written.
    fn import_image(&self) {
        let d = self.dir.path();
        let bin = d.join("rootfs/bin");
        fs::create_dir_all(&bin).unwrap();
        fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
        let applets = sh(Command::new("/bin/busybox").arg("--list"));
        for applet in applets.lines().filter(|a| !a.is_empty() && *a != "busybox") {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
        let tar = d.join("rootfs.tar");
        sh(Command::new("tar").arg("-C").arg(d.join("rootfs")).arg("-cf").arg(&tar).arg("."));
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount -t tmpfs tmpfs /var/lib && exec \"$@\"",
            "sh",
        ])
        .args(["timeout", "--kill-after=5", PODMAN_DEADLINE, "podman"]);
        self.configure(&mut cmd);
        cmd.args(["import", "--quiet", "--change", "ENV PATH=/bin"]).arg(&tar).arg(IMAGE);
        sh(&mut cmd);
        fs::remove_file(&tar).unwrap();
    }

    /// `podman run -d` of a long-running container named `name` on the network.
    fn try_run(&self, name: &str, command: &[&str]) -> Output {
        let mut args = vec!["run", "-d", "--name", name, "--network", &self.network];
        args.extend(["--cgroup-parent", &self.cgroup_parent, IMAGE]);
        args.extend(command);
        self.podman(&args)
    }

    /// Starts a container that sleeps, panicking if podman cannot.
    fn run(&self, name: &str) -> Container {
        let out = self.try_run(name, &["sleep", "3600"]);
        assert!(out.status.success(), "podman run {name}: {}", text(&out));
        self.inspect(name)
    }

    /// A running container's identity, namespace and addresses.
    fn inspect(&self, name: &str) -> Container {
        let net = format!(r#"(index .NetworkSettings.Networks "{}")"#, self.network);
        let format = format!(
            "{{{{.Id}}}} {{{{.NetworkSettings.SandboxKey}}}} {{{{{net}.IPAddress}}}} {{{{{net}.GlobalIPv6Address}}}}"
        );
        let out = self.ok(&["inspect", "--format", &format, name]);
        let words: Vec<&str> = out.split_whitespace().collect();
        let [id, sandbox, v4, v6] = words[..] else { panic!("podman inspect {name}: {out:?}") };
        let sandbox = PathBuf::from(sandbox);
        let ns = HeldNs::open(&sandbox);
        self.sandboxes.borrow_mut().push((sandbox.clone(), ns.id()));
        Container {
            name: name.to_owned(),
            id: id.to_owned(),
            sandbox,
            ns,
            v4: v4.parse().unwrap_or_else(|e| panic!("{name}'s IPv4 address {v4:?}: {e}")),
            v6: v6.parse().unwrap_or_else(|e| panic!("{name}'s IPv6 address {v6:?}: {e}")),
        }
    }

    /// The container's state as podman reports it (`running`, `exited`, `created`…).
    fn state(&self, name: &str) -> String {
        self.ok(&["inspect", "--format", "{{.State.Status}}", name]).trim().to_owned()
    }

    /// `nc` inside container `name`, as `user` (None: the image's root): the first line the peer
    /// sent, or what went wrong.
    fn nc(&self, name: &str, user: Option<u32>, to: SocketAddr) -> Result<String, String> {
        let user = user.map(|u| u.to_string());
        let mut args = vec!["exec"];
        if let Some(u) = &user {
            args.extend(["--user", u]);
        }
        let (ip, port) = (to.ip().to_string(), to.port().to_string());
        args.extend([name, "nc", "-w", "2", &ip, &port]);
        let out = self.podman(&args);
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if out.status.success() && !answer.is_empty() { Ok(answer) } else { Err(text(&out)) }
    }

    fn plugin_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("plugin.log")).unwrap_or_default()
    }

    /// The values of `transparent-proxy-status` the plugin reported for pod `name`, in order.
    fn status_reports(&self, name: &str) -> Vec<String> {
        self.api.status_reports(NAMESPACE, name)
    }

    /// Removes every container, the network, the image and the cgroups; returns what failed.
    fn teardown(&self) -> Vec<String> {
        let mut errors = Vec::new();
        for args in [
            vec!["rm", "--all", "--force", "--time", "0"],
            vec!["network", "rm", "--force", &self.network],
            vec!["rmi", "--all", "--force"],
        ] {
            // podman's own cleanup process (started by conmon when a container stops) may hold a
            // container for a moment: try again, a bounded number of times.
            let mut out = self.podman(&args);
            for _ in 0..3 {
                if out.status.success() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(500));
                out = self.podman(&args);
            }
            if !out.status.success() {
                errors.push(format!("podman {}: {}", args.join(" "), text(&out)));
            }
        }
        // podman removes the bridge with the network; make sure even if it could not.
        let _ = Command::new("ip").args(["link", "del", &self.network]).stderr(Stdio::null()).status();
        // conmon may still be on its way out: wait (bounded) for this podman's processes to end.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.processes().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        // Children first: podman's per-container cgroups (normally gone), conmon's, the parent.
        for dir in self.cgroup_dirs() {
            errors.extend(remove_cgroup_tree(&dir));
        }
        errors
    }

    /// The cgroup parent's directory in every hierarchy where it exists.
    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") else { return Vec::new() };
        let mut found: Vec<PathBuf> = hierarchies
            .flatten()
            .map(|h| h.path().join(self.cgroup_parent.trim_start_matches('/')))
            .filter(|p| p.is_dir())
            .collect();
        let unified_root = Path::new("/sys/fs/cgroup").join(self.cgroup_parent.trim_start_matches('/'));
        if unified_root.is_dir() && !found.contains(&unified_root) {
            found.push(unified_root);
        }
        found
    }

    /// Processes whose command line names this podman's directory (conmon, a cleanup process).
    fn processes(&self) -> Vec<String> {
        let needle = self.dir.path().to_string_lossy().into_owned();
        let Ok(procs) = fs::read_dir("/proc") else { return Vec::new() };
        procs
            .flatten()
            .filter(|p| p.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
            .filter_map(|p| {
                let cmdline = fs::read(p.path().join("cmdline")).ok()?;
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                cmdline.contains(&needle).then(|| format!("{}: {cmdline}", p.file_name().to_string_lossy()))
            })
            .collect()
    }

    /// Everything of this test still on the machine after [`Podman::teardown`].
    fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        for (what, args) in [
            ("container", vec!["ps", "--all", "--quiet"]),
            ("image", vec!["images", "--all", "--quiet"]),
            ("volume", vec!["volume", "ls", "--quiet"]),
        ] {
            let out = self.ok(&args);
            left.extend(out.lines().filter(|l| !l.is_empty()).map(|l| format!("{what} {l}")));
        }
        let networks = self.ok(&["network", "ls", "--format", "{{.Name}}"]);
        left.extend(networks.lines().filter(|n| *n == self.network).map(|n| format!("network {n}")));
        if Path::new("/sys/class/net").join(&self.network).exists() {
            left.push(format!("bridge {}", self.network));
        }
        let lock_dir = Path::new("/run/tproxy-cni/xtables");
        for (sandbox, id) in self.sandboxes.borrow().iter() {
            if sandbox.exists() {
                left.push(format!("network namespace {}", sandbox.display()));
            }
            // Lock files are named after the namespace's inode, which the kernel reuses: only a
            // legacy-mode plugin makes them, so only then is one under our name ours.
            let lock = lock_dir.join(format!("{id}.lock"));
            if self.legacy && lock.exists() {
                left.push(format!("xtables lock {}", lock.display()));
            }
        }
        // libcni's result cache (podman has no setting for its directory): one file per attachment.
        if let Ok(results) = fs::read_dir("/var/lib/cni/results") {
            let prefix = format!("{}-", self.network);
            left.extend(
                results
                    .flatten()
                    .filter(|f| f.file_name().to_string_lossy().starts_with(&prefix))
                    .map(|f| format!("CNI cache {}", f.path().display())),
            );
        }
        // host-local keeps one file per address it handed out.
        let ipam = self.dir.path().join("ipam").join(&self.network);
        left.extend(host_local_reservations(&ipam).into_iter().map(|f| format!("IP reservation {f}")));
        left.extend(self.cgroup_dirs().into_iter().map(|d| format!("cgroup {}", d.display())));
        let root = self.dir.path().to_string_lossy().into_owned();
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        left.extend(
            mounts
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .filter(|m| m.starts_with(&root))
                .map(|m| format!("mount {m}")),
        );
        left.extend(self.processes().into_iter().map(|p| format!("process {p}")));
        left
    }

    /// Removes everything this podman made and asserts that nothing is left behind.
    fn finish(mut self) {
        self.finished = true;
        let errors = self.teardown();
        assert!(errors.is_empty(), "teardown failed: {errors:#?}");
        // podman finishes some of its work in processes of its own (conmon's cleanup command):
        // give them a bounded while.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut left = self.leftovers();
        while !left.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            left = self.leftovers();
        }
        assert!(left.is_empty(), "left behind: {left:#?}");
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        if !self.finished {
            let errors = self.teardown();
            if !errors.is_empty() {
                eprintln!("podman teardown after a failure: {errors:#?}");
            }
            // Overlay mounts of a container podman could not remove would keep the files busy.
            let root = self.dir.path().to_string_lossy().into_owned();
            let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            let mut points: Vec<&str> =
                mounts.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| m.starts_with(&root)).collect();
            points.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for m in points {
                let _ = Command::new("umount").args(["--lazy", m]).status();
            }
        }
    }
}

/// A Kuma pod as the stand-in serves it: injected, with a `kuma-sidecar` container and no
/// `kuma-init` (so the plugin owns its redirect); Kuma's defaults.
fn kuma(name: &str) -> PodFixture {
    PodFixture::new(NAMESPACE, name).annotation("kuma.io/sidecar-injected", "true").container("kuma-sidecar")
}

both_engines!(mesh_containers_are_redirected_and_plain_ones_are_untouched);
fn mesh_containers_are_redirected_and_plain_ones_are_untouched(engine: Engine) {
    if !privileged_with(TOOLS) {
        return;
    }
    let _load = busy();
    let pm = Podman::new(engine.conf());
    pm.api.add_pod(PodFixture::new(NAMESPACE, "server").label("app", "server"));
    pm.api.add_pod(PodFixture::consul(NAMESPACE, "web"));
    pm.api.add_pod(kuma("shop"));
    // "plain" is not served at all: the API server does not know it, so it carries no mesh.

    let server = pm.run("server");
    let _server = server.server(8080);
    let web = pm.run("web");
    let _web_proxy = web.proxy("", 15001, 20000);
    let shop = pm.run("shop");
    let _shop_proxy = shop.proxy("kuma-", 15001, 15006);
    let plain = pm.run("plain");
    let (s4, s6) = (server.v4, server.v6);

    // The Consul container's own process dials the server: its proxy's outbound listener takes
    // the connection and sees where it was going, in both families; the proxy's UID goes straight.
    assert_eq!(pm.nc("web", None, sa(s4, 8080)), Ok(format!("outbound {s4}:8080")));
    assert_eq!(pm.nc("web", None, sa(s6, 8080)), Ok(format!("outbound6 [{s6}]:8080")));
    assert_eq!(who(&pm.nc("web", Some(CONSUL_PROXY_UID), sa(s4, 8080))), "server");
    assert_eq!(who(&pm.nc("web", Some(CONSUL_PROXY_UID), sa(s6, 8080))), "server6");
    // The same for the Kuma container, with Kuma's ports and UID.
    assert_eq!(pm.nc("shop", None, sa(s4, 8080)), Ok(format!("kuma-outbound {s4}:8080")));
    assert_eq!(pm.nc("shop", None, sa(s6, 8080)), Ok(format!("kuma-outbound6 [{s6}]:8080")));
    assert_eq!(who(&pm.nc("shop", Some(KUMA_PROXY_UID), sa(s4, 8080))), "server");
    // Inbound: a plain container dialling any port of a mesh container reaches its proxy.
    let (w4, k4) = (web.v4, shop.v4);
    assert_eq!(pm.nc("plain", None, sa(w4, 7000)), Ok(format!("inbound {w4}:7000")));
    assert_eq!(pm.nc("plain", None, sa(k4, 7000)), Ok(format!("kuma-inbound {k4}:7000")));

    // Plain containers — served without mesh annotations, or not known to the API server — reach
    // the server directly, and their namespaces hold no netfilter state at all.
    assert_eq!(who(&pm.nc("plain", None, sa(s4, 8080))), "server");
    assert_eq!(who(&pm.nc("plain", None, sa(s6, 8080))), "server6");
    for c in [&plain, &server] {
        assert_eq!(c.ns.netfilter(), "", "{}'s namespace must be untouched", c.name);
    }
    assert!(!web.ns.all_ours(engine).is_empty() && !shop.ns.all_ours(engine).is_empty());
    if engine == Engine::Nftables {
        // Exactly the tables of the served Consul pod's annotations (the container has IPv6).
        let served = json!(PodFixture::consul(NAMESPACE, "web").annotations);
        assert_eq!(nft_tables(&web.ns), nft_reference(&served, true));
    }

    // consul-cni's progress report on the Consul pod, and only there.
    assert_eq!(pm.status_reports("web"), ["waiting", "complete"]);
    for name in ["server", "shop", "plain"] {
        assert!(pm.status_reports(name).is_empty(), "{name} got a status report");
    }
    let log = pm.plugin_log();
    for (c, line) in [(&web, "consul redirect installed"), (&shop, "kuma redirect installed")] {
        let short = &c.id[..12];
        assert!(log.lines().any(|l| l.contains(short) && l.contains(line)), "{}: {log}", c.name);
    }
    assert!(log.contains(&format!("using default_namespace \"{NAMESPACE}\"")), "{log}");
    pm.finish();
}

// The iptables engine with the legacy backend: each namespace also gets an xtables lock file,
// which DEL must remove.
both_engines!(stop_start_and_restart_remove_and_reapply_the_rules, "legacy");
fn stop_start_and_restart_remove_and_reapply_the_rules(engine: Engine) {
    if !privileged_with(TOOLS) {
        return;
    }
    let _load = busy();
    let pm = Podman::new(engine.conf());
    // Lock files are named after the namespace's inode, which the kernel reuses: only where the
    // plugin makes one (legacy) is one under this name expected, or its removal checked.
    let legacy = pm.legacy;
    pm.api.add_pod(PodFixture::new(NAMESPACE, "server"));
    pm.api.add_pod(PodFixture::consul(NAMESPACE, "web"));
    pm.api.add_pod(PodFixture::consul(NAMESPACE, "job"));
    let server = pm.run("server");
    let _server = server.server(8080);
    let s4 = server.v4;
    let lock = |c: &Container| Path::new("/run/tproxy-cni/xtables").join(format!("{}.lock", c.ns.id()));

    let first = pm.run("web");
    let installed = first.ns.all_ours(engine);
    let v6 = if engine == Engine::Nftables { "table ip6 tproxy-cni" } else { "ipv6 " };
    assert!(installed.iter().any(|l| l.starts_with(v6)), "both families: {installed:#?}");
    assert!(!legacy || lock(&first).exists());
    {
        let _proxy = first.proxy("", 15001, 20000);
        assert_eq!(pm.nc("web", None, sa(s4, 8080)), Ok(format!("outbound {s4}:8080")));
    }

    // podman stop: DEL removes our rules from the namespace (held open here, so we can look) and
    // the lock file; podman then drops the namespace.
    pm.ok(&["stop", "--time", "0", "web"]);
    assert_eq!(first.ns.all_ours(engine), Vec::<String>::new(), "rules left after podman stop");
    assert!(!first.sandbox.exists(), "podman dropped the namespace");
    assert!(!(legacy && lock(&first).exists()), "lock file left after podman stop");

    // podman start: a new namespace, the same rules, the redirect works again.
    pm.ok(&["start", "web"]);
    let second = pm.inspect("web");
    assert_ne!(second.ns.id(), first.ns.id(), "podman start makes a new namespace");
    assert_eq!(second.ns.all_ours(engine), installed);
    {
        let _proxy = second.proxy("", 15001, 20000);
        assert_eq!(pm.nc("web", None, sa(s4, 8080)), Ok(format!("outbound {s4}:8080")));
    }

    // podman restart: both at once.
    pm.ok(&["restart", "--time", "0", "web"]);
    let third = pm.inspect("web");
    assert_ne!(third.ns.id(), second.ns.id());
    assert_eq!(second.ns.all_ours(engine), Vec::<String>::new(), "rules left after podman restart");
    assert_eq!(third.ns.all_ours(engine), installed);
    {
        let _proxy = third.proxy("", 15001, 20000);
        assert_eq!(pm.nc("web", None, sa(s4, 8080)), Ok(format!("outbound {s4}:8080")));
        assert_eq!(who(&pm.nc("web", Some(CONSUL_PROXY_UID), sa(s4, 8080))), "server");
    }
    assert_eq!(pm.status_reports("web"), ["waiting", "complete"].repeat(3));

    // A container whose process ends by itself: podman's cleanup process, started by conmon,
    // tears the network down, and DEL runs there just the same.
    let out = pm.try_run("job", &["sleep", "3"]);
    assert!(out.status.success(), "podman run job: {}", text(&out));
    let job = pm.inspect("job");
    assert_eq!(job.ns.all_ours(engine), installed);
    wait_for(Duration::from_secs(30), "the job's network teardown", || !job.sandbox.exists());
    assert_eq!(pm.state("job"), "exited");
    assert_eq!(job.ns.all_ours(engine), Vec::<String>::new(), "rules left after the job ended");
    assert!(!(legacy && lock(&job).exists()));
    pm.finish();
}

both_engines!(a_failed_add_fails_the_container_with_our_message);
fn a_failed_add_fails_the_container_with_our_message(engine: Engine) {
    if !privileged_with(TOOLS) {
        return;
    }
    let _load = busy();
    let pm = Podman::new(engine.conf());
    let bad_config = r#"{"ProxyUserID":"5995","ProxyInboundPort":65536,"ProxyOutboundPort":15001}"#;
    pm.api.add_pod(
        PodFixture::consul(NAMESPACE, "broken").annotation("consul.hashicorp.com/redirect-traffic-config", bad_config),
    );
    pm.api.add_pod(PodFixture::consul(NAMESPACE, "late"));

    // Annotations that cannot be honoured: the container does not start, and podman says why in
    // our words.
    let out = pm.try_run("broken", &["sleep", "3600"]);
    assert!(!out.status.success(), "a mesh container whose redirect is impossible must not start");
    let msg = text(&out);
    assert!(msg.contains(r#"plugin type="tproxy-cni" failed (add)"#), "{msg}");
    assert!(msg.contains(r#"ProxyInboundPort "65536" is out of range"#), "{msg}");
    assert_eq!(pm.state("broken"), "created");
    assert!(!pm.plugin_log().contains("redirect installed"), "{}", pm.plugin_log());

    // The API server is failing: the plugin cannot tell whether the pod is in a mesh, so it does
    // not guess; the container fails, and starts once the API server answers again.
    pm.api.set_fault(Some(Fault::Status(503)));
    let out = pm.try_run("late", &["sleep", "3600"]);
    assert!(!out.status.success(), "a pod that cannot be classified must not start");
    let msg = text(&out);
    assert!(msg.contains(&format!("cannot tell whether pod {NAMESPACE}/late is in a mesh")), "{msg}");
    assert_ne!(pm.state("late"), "running");
    pm.api.set_fault(None);
    pm.ok(&["start", "late"]);
    let late = pm.inspect("late");
    assert!(!late.ns.all_ours(engine).is_empty(), "late's redirect once the API server is back");
    pm.finish();
}

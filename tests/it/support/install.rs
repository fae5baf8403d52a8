//! Helpers for the installer's integration tests: a fake host (temporary directories standing in for
//! `/opt/cni/bin`, `/etc/cni/net.d`, the state dir and the projected service-account volume, laid out
//! the way kubelet lays it out) and a guard around a real `tproxy-cni install` process.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_tproxy-cni");
/// The kubeconfig path our entry names on a real node.
pub const HOST_KUBECONFIG: &str = "/etc/cni/net.d/ZZZ-tproxy-cni-kubeconfig";

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A fake node: every host path the installer touches, under one temporary root.
pub struct Host {
    pub root: PathBuf,
    pub bin: PathBuf,
    pub conf: PathBuf,
    pub state: PathBuf,
    pub sa: PathBuf,
    pub run: PathBuf,
    /// The CA certificate projected beside the token.
    pub ca_pem: String,
    sa_generation: usize,
}

impl Host {
    pub fn new(tag: &str) -> Host {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let root = std::env::temp_dir().join(format!("ti{}-{tag}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let h = Host {
            bin: root.join("opt/cni/bin"),
            conf: root.join("etc/cni/net.d"),
            state: root.join("var/lib/tproxy-cni"),
            sa: root.join("sa"),
            run: root.join("run"),
            root,
            ca_pem: "-----BEGIN CERTIFICATE-----\nMIIBtest\n-----END CERTIFICATE-----\n".into(),
            sa_generation: 0,
        };
        for d in [&h.bin, &h.conf, &h.sa, &h.run] {
            fs::create_dir_all(d).unwrap();
        }
        // Plugins the node already has; they must be left exactly as they are.
        for (name, body) in [("bridge", "#!/bin/sh\necho bridge\n"), ("host-local", "#!/bin/sh\necho ipam\n")] {
            fs::write(h.bin.join(name), body).unwrap();
            fs::set_permissions(h.bin.join(name), fs::Permissions::from_mode(0o755)).unwrap();
        }
        let mut h = h;
        h.rotate_token("token-1");
        h
    }

    /// Projects `token` the way kubelet's atomic writer does: a new timestamped directory, a
    /// `..data_tmp` symlink to it renamed over `..data`, the old directory removed. `token` and
    /// `ca.crt` are stable symlinks through `..data`.
    pub fn rotate_token(&mut self, token: &str) {
        self.sa_generation += 1;
        let dir_name = format!("..2026_11_21_10_00_00.{:09}", self.sa_generation);
        let dir = self.sa.join(&dir_name);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("token"), token).unwrap();
        fs::write(dir.join("ca.crt"), &self.ca_pem).unwrap();
        fs::write(dir.join("namespace"), "kube-system").unwrap();
        let old = fs::read_link(self.sa.join("..data")).ok();
        symlink(&dir_name, self.sa.join("..data_tmp")).unwrap();
        fs::rename(self.sa.join("..data_tmp"), self.sa.join("..data")).unwrap();
        for f in ["token", "ca.crt", "namespace"] {
            if fs::symlink_metadata(self.sa.join(f)).is_err() {
                symlink(format!("..data/{f}"), self.sa.join(f)).unwrap();
            }
        }
        if let Some(old) = old {
            fs::remove_dir_all(self.sa.join(old)).unwrap();
        }
    }

    /// Writes a primary configuration file into the conf dir.
    pub fn put_conf(&self, name: &str, bytes: &[u8]) {
        fs::write(self.conf.join(name), bytes).unwrap();
    }

    /// Replaces a conf file the way a careful primary CNI does: temporary file, then rename.
    pub fn replace_conf(&self, name: &str, bytes: &[u8]) {
        let tmp = self.root.join(format!("{name}.writer-tmp"));
        fs::write(&tmp, bytes).unwrap();
        fs::rename(&tmp, self.conf.join(name)).unwrap();
    }

    /// A small stand-in plugin binary, distinct per `version`.
    pub fn fake_plugin(&self, version: &str) -> PathBuf {
        let p = self.root.join(format!("plugin-{version}"));
        // A runnable script that prints its version; the padding after `exit` is never read.
        let mut body = format!("#!/bin/sh\necho tproxy-cni {version}\nexit 0\n# ").into_bytes();
        body.extend(std::iter::repeat_n(version.as_bytes()[0], 100_000));
        body.push(b'\n');
        fs::write(&p, body).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    pub fn ready_file(&self) -> PathBuf {
        self.run.join("ready")
    }

    /// The arguments of an installer on this host, with `plugin` as the source binary.
    pub fn args(&self, plugin: &Path) -> Vec<String> {
        [
            "install",
            "--cni-bin-dir",
            self.bin.to_str().unwrap(),
            "--cni-conf-dir",
            self.conf.to_str().unwrap(),
            "--state-dir",
            self.state.to_str().unwrap(),
            "--service-account-dir",
            self.sa.to_str().unwrap(),
            "--source-binary",
            plugin.to_str().unwrap(),
            "--host-kubeconfig",
            HOST_KUBECONFIG,
            "--api-server",
            "https://10.96.0.1:443",
            "--ready-file",
            self.ready_file().to_str().unwrap(),
            "--probe-addr",
            "off",
            "--resync-interval",
            "60s",
            "--log-level",
            "debug",
            // Most tests check the removal byte for byte; the default (auto) is tested on its own.
            "--cleanup-on-exit",
            "true",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// The default arguments with `extra` (`--flag value` pairs) overriding or adding to them.
    pub fn args_with(&self, plugin: &Path, extra: &[&str]) -> Vec<String> {
        let mut args = self.args(plugin);
        for pair in extra.chunks(2) {
            match args.iter().position(|a| a == pair[0]) {
                Some(i) => args[i + 1] = pair[1].to_string(),
                None => args.extend(pair.iter().map(|s| s.to_string())),
            }
        }
        args
    }

    /// Starts an installer with the default arguments, `extra` overriding or adding to them.
    pub fn start(&self, plugin: &Path, extra: &[&str]) -> Installer {
        Installer::spawn(&self.args_with(plugin, extra), &self.root)
    }

    /// Every file under `dir` (recursively) with its bytes and mode: a byte-for-byte picture.
    pub fn snapshot(dir: &Path) -> BTreeMap<String, (Vec<u8>, u32)> {
        let mut out = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let m = fs::symlink_metadata(e.path()).unwrap();
                if m.is_dir() {
                    stack.push(e.path());
                } else {
                    let rel = e.path().strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                    out.insert(rel, (fs::read(e.path()).unwrap(), m.permissions().mode() & 0o7777));
                }
            }
        }
        out
    }

    /// Reads a conf file as JSON.
    pub fn conf_json(&self, name: &str) -> Option<serde_json::Value> {
        serde_json::from_slice(&fs::read(self.conf.join(name)).ok()?).ok()
    }

    /// Does the list `name` end with our entry?
    pub fn chained(&self, name: &str) -> bool {
        self.conf_json(name)
            .and_then(|d| d["plugins"].as_array().and_then(|p| p.last().cloned()))
            .is_some_and(|last| last["type"] == "tproxy-cni")
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.conf.join("ZZZ-tproxy-cni-kubeconfig")
    }

    pub fn token_copy(&self) -> PathBuf {
        self.conf.join("ZZZ-tproxy-cni-token")
    }
}

impl Drop for Host {
    /// Removes the whole fake node, also when the test failed (its message carries the installer's
    /// log): a failed run must not leave a copy of the plugin binary behind in the temporary
    /// directory.
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// A running `tproxy-cni install`, killed if the test drops it while it runs.
pub struct Installer {
    child: Option<Child>,
    log: PathBuf,
}

impl Installer {
    pub fn spawn(args: &[String], log_dir: &Path) -> Installer {
        Installer::spawn_program(BIN, args, log_dir)
    }

    /// Runs `program` (a wrapper such as `setpriv` that execs the installer) with `args`.
    pub fn spawn_program(program: &str, args: &[String], log_dir: &Path) -> Installer {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let log = log_dir.join(format!("installer-{n}.log"));
        let child = Command::new(program)
            .args(args)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Installer { child: Some(child), log }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// The installer's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal`.
    pub fn signal(&self, signal: i32) {
        // Safety: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.pid(), signal) }, 0);
    }

    /// Sends SIGTERM and waits (at most 10 s) for the exit.
    pub fn terminate(mut self) -> (ExitStatus, String) {
        self.signal(libc::SIGTERM);
        let status = self.wait(Duration::from_secs(10));
        (status, self.log())
    }

    /// Waits for the process to exit by itself.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                self.child = None;
                return s;
            }
            assert!(Instant::now() < deadline, "installer did not exit in {limit:?}; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the process without letting it clean up (a crash, or SIGKILL after the grace period).
    pub fn kill(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Installer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            if std::thread::panicking() {
                eprintln!("--- installer log ---\n{}", self.log());
            }
        }
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// `GET path` on `addr`: the status code, or `None` when nothing listens.
pub fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    std::io::Write::write_all(&mut s, format!("GET {path} HTTP/1.1\r\nHost: probe\r\n\r\n").as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_whitespace().nth(1)?.parse().ok()
}

/// The golden inputs and outputs in `cni-conf/`.
pub fn golden(dir: &str, name: &str) -> Vec<u8> {
    fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("cni-conf").join(dir).join(name)).unwrap()
}

//! Which iptables the node uses (nft or legacy), and where its restore and save tools are.
//!
//! A pod namespace starts empty, so it cannot tell us; the node can. Like kubelet's iptables wrapper
//! we look for the `KUBE-IPTABLES-HINT` chain kubelet creates in the host's mangle table, first with
//! the nft tools, then with the legacy ones (only when the legacy mangle table exists at all, so we
//! never load legacy modules on an nft node). A hint found is cached under `/run/tproxy-cni` (tmpfs:
//! a reboot clears it) so later ADDs spawn no probe. Without a hint we choose nft, the default of
//! every current distribution, and trust that answer for [`NO_HINT_TTL`] only: a node without
//! kubelet (Nomad, podman) must not pay the probe — a process or two on the host, as costly as the
//! pod's whole transaction — on every ADD and DEL, yet a kubelet that starts later must still be
//! followed. `iptables_mode` in the conflist skips all of this.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use thiserror::Error;

use crate::core::redirect::Family;
use crate::kernel::deadline::Deadline;

/// How long reading the host's mangle table for kubelet's hint may take.
const PROBE_BUDGET: Duration = Duration::from_secs(5);

/// The conflist's `iptables_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Auto,
    Nft,
    Legacy,
}

/// A concrete iptables backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Nft,
    Legacy,
}

/// Where executables are looked up, in order. A CNI plugin inherits the runtime's environment,
/// whose `PATH` is not ours to trust, so the standard directories are searched instead.
const TOOL_DIRS: &[&str] = &["/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/sbin", "/usr/local/bin"];

/// The hint chain kubelet creates in the host's mangle table with the iptables it uses.
const KUBE_HINT_CHAIN: &str = ":KUBE-IPTABLES-HINT ";

/// Where the detected backend is remembered until reboot.
pub const RUNTIME_DIR: &str = "/run/tproxy-cni";

/// How long "no hint on the host, so nft" is trusted before the host is probed again.
pub const NO_HINT_TTL: Duration = Duration::from_secs(60);

/// The file holding a found hint's backend, in [`RUNTIME_DIR`].
const HINT_CACHE: &str = "iptables-backend";
/// The file whose age says when the host last had no hint, in [`RUNTIME_DIR`].
const NO_HINT_CACHE: &str = "iptables-backend.no-hint";

#[derive(Debug, Error)]
pub enum BackendError {
    #[error("{tool} not found in {dirs} (install the iptables package with the {backend} backend)", dirs = TOOL_DIRS.join(":"))]
    ToolMissing { tool: String, backend: &'static str },
}

/// The restore and save executables of one backend and family.
#[derive(Debug, Clone)]
pub struct Tools {
    pub restore: PathBuf,
    pub save: PathBuf,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }

    /// Resolves the conflist's mode to a backend, probing the host when asked to.
    pub fn resolve(mode: Mode) -> Backend {
        match mode {
            Mode::Nft => Backend::Nft,
            Mode::Legacy => Backend::Legacy,
            Mode::Auto => detect(Path::new(RUNTIME_DIR)),
        }
    }

    /// The tools of this backend for `family`.
    pub fn tools(self, family: Family) -> Result<Tools, BackendError> {
        Ok(Tools { restore: self.find(family, "restore")?, save: self.find(family, "save")? })
    }

    fn find(self, family: Family, verb: &str) -> Result<PathBuf, BackendError> {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        let specific = format!("{base}-{}-{verb}", self.name());
        if let Some(p) = lookup(&specific) {
            return Ok(p);
        }
        // Distributions that ship one backend only may have just `iptables-restore`, a link to
        // xtables-nft-multi or xtables-legacy-multi: accept it when it is the backend we want.
        let generic = format!("{base}-{verb}");
        if let Some(p) = lookup(&generic) {
            let target = fs::canonicalize(&p).unwrap_or_else(|_| p.clone());
            let name = target.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name.contains(self.name()) {
                return Ok(p);
            }
        }
        Err(BackendError::ToolMissing { tool: specific, backend: self.name() })
    }
}

fn lookup(name: &str) -> Option<PathBuf> {
    TOOL_DIRS.iter().map(|d| Path::new(d).join(name)).find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn detect(runtime_dir: &Path) -> Backend {
    let cache = runtime_dir.join(HINT_CACHE);
    match fs::read_to_string(&cache).as_deref().map(str::trim) {
        Ok("nft") => return Backend::Nft,
        Ok("legacy") => return Backend::Legacy,
        _ => {}
    }
    let no_hint = runtime_dir.join(NO_HINT_CACHE);
    if younger_than(&no_hint, NO_HINT_TTL) {
        return Backend::Nft;
    }
    let legacy_mangle_exists =
        fs::read_to_string("/proc/net/ip_tables_names").is_ok_and(|t| t.lines().any(|l| l == "mangle"));
    let hinted = [Backend::Nft, Backend::Legacy]
        .into_iter()
        .filter(|b| *b == Backend::Nft || legacy_mangle_exists)
        .find(|b| host_has_hint(*b));
    match hinted {
        Some(b) => {
            log::debug!(
                "kubelet's {} chain is in the {} tables: using iptables-{}",
                KUBE_HINT_CHAIN.trim(),
                b.name(),
                b.name()
            );
            if let Err(e) = remember(&cache, b) {
                log::debug!("cannot cache the iptables backend in {}: {e}", cache.display());
            }
            b
        }
        None => {
            log::debug!(
                "no kubelet hint chain on the host: using iptables-nft (not probing again for {}s)",
                NO_HINT_TTL.as_secs()
            );
            if let Err(e) = remember(&no_hint, Backend::Nft) {
                log::debug!("cannot note the missing hint in {}: {e}", no_hint.display());
            }
            Backend::Nft
        }
    }
}

/// Was `path` written less than `ttl` ago? (A time in the future — the clock was set back — is
/// not trusted.)
fn younger_than(path: &Path, ttl: Duration) -> bool {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|written| SystemTime::now().duration_since(written).ok())
        .is_some_and(|age| age < ttl)
}

fn host_has_hint(b: Backend) -> bool {
    let Ok(tools) = b.tools(Family::V4) else { return false };
    let mut cmd = Command::new(&tools.save);
    cmd.args(["-t", "mangle"]);
    match crate::kernel::exec::run(&mut cmd, None, Deadline::after(PROBE_BUDGET)) {
        Ok(o) => String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with(KUBE_HINT_CHAIN)),
        Err(e) => {
            log::warn!("cannot read the host's mangle table with {}: {e}", tools.save.display());
            false
        }
    }
}

/// Writes `b` to `cache` atomically (concurrent ADDs may race to write it).
fn remember(cache: &Path, b: Backend) -> io::Result<()> {
    let dir = cache.parent().expect("cache file has a directory");
    fs::create_dir_all(dir)?;
    let name = cache.file_name().and_then(|n| n.to_str()).unwrap_or(HINT_CACHE);
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    fs::write(&tmp, b.name())?;
    fs::rename(&tmp, cache)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::TestDir;

    #[test]
    fn a_cached_decision_is_used_without_probing() {
        let dir = TestDir::new("backend");
        remember(&dir.join("iptables-backend"), Backend::Legacy).unwrap();
        assert_eq!(detect(&dir), Backend::Legacy);
        remember(&dir.join("iptables-backend"), Backend::Nft).unwrap();
        assert_eq!(detect(&dir), Backend::Nft);
    }

    #[test]
    fn a_missing_hint_is_trusted_for_a_while_only() {
        let dir = TestDir::new("nohint");
        let marker = dir.join(NO_HINT_CACHE);
        assert!(!younger_than(&marker, NO_HINT_TTL), "no marker yet");
        remember(&marker, Backend::Nft).unwrap();
        assert!(younger_than(&marker, NO_HINT_TTL));
        assert_eq!(detect(&dir), Backend::Nft);
        let file = fs::File::options().write(true).open(&marker).unwrap();
        file.set_modified(SystemTime::now() - NO_HINT_TTL - Duration::from_secs(1)).unwrap();
        assert!(!younger_than(&marker, NO_HINT_TTL), "an old marker is stale");
        file.set_modified(SystemTime::now() + Duration::from_secs(3600)).unwrap();
        assert!(!younger_than(&marker, NO_HINT_TTL), "a marker from the future is not trusted");
    }

    #[test]
    fn explicit_modes_do_not_probe() {
        assert_eq!(Backend::resolve(Mode::Legacy), Backend::Legacy);
        assert_eq!(Backend::resolve(Mode::Nft), Backend::Nft);
    }
}

//! Who owns the node's install: the marker that makes rolling updates safe.
//!
//! Several installer processes can run on one node at once: during a DaemonSet rolling update with
//! `maxSurge`, the new pod starts before the old one gets SIGTERM; a container restart overlaps with
//! nothing but reuses the node's state. Exactly one of them — the *owner* — writes to the host. The
//! others stay passive and never remove anything on exit.
//!
//! The state directory (a hostPath) holds:
//! - `lock`: `flock(2)`ed exclusively around every read-decide-write step, so an owner's uninstall
//!   and a newcomer's install never interleave;
//! - `owner.json`: the [`Marker`] — the owner's instance id, its pod, its *generation* (the
//!   DaemonSet's `pod-template-generation` label, which grows with every template change, rollbacks
//!   included) and whether the install is active or was removed;
//! - `instances/<id>.lock`: each process holds a lock on its own file for its whole life. The kernel
//!   drops it when the process dies, however it dies, so others can tell a live owner from a dead one
//!   without sharing a PID namespace.
//!
//! The rule ([`decide`]): a starting process claims the install unless a live owner has a *newer*
//! generation. A running, passive process claims it only when the owner died without uninstalling,
//! or when a strictly older generation removed it. So a newer pod always wins, an old pod restarting
//! mid-rollout stays passive, and an old pod never resurrects an install that a newer one removed.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::atomic;

/// This process, as the marker names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Unique per process: the pod UID (when known) and a random suffix.
    pub instance: String,
    /// `namespace/name` of the pod, for log lines; empty outside Kubernetes.
    pub pod: String,
    /// The DaemonSet's `pod-template-generation` (0 when unknown).
    pub generation: u64,
}

impl Identity {
    /// A fresh identity; `pod_uid` and `pod` come from the downward API.
    pub fn new(pod_uid: Option<&str>, pod: String, generation: u64) -> io::Result<Identity> {
        let mut bytes = [0u8; 6];
        io::Read::read_exact(&mut File::open("/dev/urandom")?, &mut bytes)?;
        let nonce: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let instance = match pod_uid {
            Some(uid) if !uid.is_empty() => format!("{}-{nonce}", sanitize(uid)),
            _ => format!("pid{}-{nonce}", std::process::id()),
        };
        Ok(Identity { instance, pod, generation })
    }
}

fn sanitize(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(64).collect()
}

/// Whether the install named by the marker is in place or was removed by its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstallState {
    Active,
    Removed,
}

/// The content of `owner.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    pub instance: String,
    pub pod: String,
    pub generation: u64,
    pub state: InstallState,
}

/// What a process should do, given the marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Own the install (claim it if the marker names someone else).
    Own,
    /// Stay passive: someone else owns it, or a newer generation removed it.
    Defer,
}

/// The ownership rule. `starting` is true for a process's first decision; `owner_alive` tells whether
/// the process the marker names still holds its instance lock.
pub fn decide(me: &Identity, marker: Option<&Marker>, owner_alive: bool, starting: bool) -> Decision {
    let Some(m) = marker else { return Decision::Own };
    if m.instance == me.instance {
        return match m.state {
            InstallState::Active => Decision::Own,
            InstallState::Removed => Decision::Defer, // we uninstalled: never reinstall on our own
        };
    }
    match (m.state, starting) {
        (InstallState::Active, true) if owner_alive && m.generation > me.generation => Decision::Defer,
        (InstallState::Active, true) => Decision::Own,
        (InstallState::Active, false) if owner_alive => Decision::Defer,
        (InstallState::Active, false) => Decision::Own,
        // A fresh start always installs (a new DaemonSet starts again at generation 1).
        (InstallState::Removed, true) => Decision::Own,
        (InstallState::Removed, false) if m.generation < me.generation => Decision::Own,
        (InstallState::Removed, false) => Decision::Defer,
    }
}

/// The node's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

/// The exclusive lock on the state directory, held while deciding and writing; released on drop.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

/// This process's life lock: held until the process exits.
#[derive(Debug)]
pub struct LifeLock {
    _file: File,
    path: PathBuf,
}

impl LifeLock {
    /// Removes the lock file; the lock itself dies with the process.
    pub fn release(self) {
        let _ = fs::remove_file(&self.path);
    }
}

impl StateDir {
    /// Opens (creating it if needed) the state directory at `root`.
    pub fn open(root: &Path) -> io::Result<StateDir> {
        fs::create_dir_all(root.join("instances"))?;
        fs::create_dir_all(root.join("pristine"))?;
        Ok(StateDir { root: root.to_path_buf() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the undo log lives.
    pub fn undo_log(&self) -> PathBuf {
        self.root.join("undo.log")
    }

    /// Where the pristine bytes of the primary's file `original` are kept.
    pub fn pristine(&self, original: &Path) -> PathBuf {
        let name = original.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        self.root.join("pristine").join(name)
    }

    /// Where a binary that was in the bin dir before our first install is kept.
    pub fn saved_binary(&self) -> PathBuf {
        self.root.join("saved-binary")
    }

    /// Takes the exclusive state lock, waiting for it.
    pub fn lock(&self) -> io::Result<StateLock> {
        let file = open_lock_file(&self.root.join("lock"))?;
        flock(&file, libc::LOCK_EX)?;
        Ok(StateLock { _file: file })
    }

    /// Takes this process's life lock.
    pub fn life_lock(&self, me: &Identity) -> io::Result<LifeLock> {
        let path = self.instance_lock(&me.instance);
        let file = open_lock_file(&path)?;
        flock(&file, libc::LOCK_EX | libc::LOCK_NB)?;
        Ok(LifeLock { _file: file, path })
    }

    /// Is the process with this instance id still alive (holding its life lock)?
    pub fn alive(&self, instance: &str) -> io::Result<bool> {
        let path = self.instance_lock(instance);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        match flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => {
                // Nobody holds it: the process is gone. Tidy its file (we hold the state lock).
                let _ = fs::remove_file(&path);
                Ok(false)
            }
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Removes the life-lock files of processes that died without removing them (crashes).
    pub fn sweep_dead(&self) -> io::Result<usize> {
        let mut n = 0;
        for e in fs::read_dir(self.root.join("instances"))? {
            let name = e?.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".lock")
                && !self.alive(id)?
            {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Reads the marker. An unreadable marker is treated as absent (and said so).
    pub fn marker(&self) -> io::Result<Option<Marker>> {
        let path = self.root.join("owner.json");
        let Some(bytes) = atomic::read_optional(&path)? else { return Ok(None) };
        match serde_json::from_slice(&bytes) {
            Ok(m) => Ok(Some(m)),
            Err(e) => {
                log::warn!("{} is not a marker ({e}): ignoring it", path.display());
                Ok(None)
            }
        }
    }

    /// Writes the marker atomically.
    pub fn set_marker(&self, marker: &Marker) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(marker).expect("a marker always serialises");
        atomic::write(&self.root.join("owner.json"), &bytes, 0o644)
    }

    fn instance_lock(&self, instance: &str) -> PathBuf {
        self.root.join("instances").join(format!("{}.lock", sanitize(instance)))
    }
}

/// Opens a lock file read-only (creating it first if needed): a read-only open and close raises no
/// inotify event the installer watches for, so taking a lock never wakes the installer itself.
fn open_lock_file(path: &Path) -> io::Result<File> {
    match File::open(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            OpenOptions::new().create(true).truncate(false).write(true).open(path)?;
            File::open(path)
        }
        other => other,
    }
}

fn flock(file: &File, op: libc::c_int) -> io::Result<()> {
    loop {
        // Safety: flock(2) on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::TestDir;

    fn me(generation: u64) -> Identity {
        Identity { instance: "me".into(), pod: "ns/me".into(), generation }
    }

    fn marker(instance: &str, generation: u64, state: InstallState) -> Marker {
        Marker { instance: instance.into(), pod: String::new(), generation, state }
    }

    #[test]
    fn a_newer_generation_wins_and_an_older_one_defers() {
        use Decision::*;
        use InstallState::*;
        assert_eq!(decide(&me(2), None, false, true), Own);
        // Rolling update with surge: the new pod (gen 2) starts while gen 1 is alive.
        assert_eq!(decide(&me(2), Some(&marker("old", 1, Active)), true, true), Own);
        // The old pod's container restarts mid-rollout: it must not take over.
        assert_eq!(decide(&me(1), Some(&marker("new", 2, Active)), true, true), Defer);
        // Same generation (container restart, or a pod recreated): the newest process wins.
        assert_eq!(decide(&me(1), Some(&marker("other", 1, Active)), true, true), Own);
        // A live owner is never taken over by a running process.
        assert_eq!(decide(&me(3), Some(&marker("other", 1, Active)), true, false), Defer);
        // An owner that died without uninstalling: the node must not stay without an installer.
        assert_eq!(decide(&me(1), Some(&marker("new", 2, Active)), false, false), Own);
        // A newer generation removed the install (DaemonSet deleted): an older one does not bring it back.
        assert_eq!(decide(&me(1), Some(&marker("new", 2, Removed)), false, false), Defer);
        assert_eq!(decide(&me(2), Some(&marker("peer", 2, Removed)), false, false), Defer);
        assert_eq!(decide(&me(3), Some(&marker("old", 2, Removed)), false, false), Own);
        // A fresh start installs even after a removal.
        assert_eq!(decide(&me(1), Some(&marker("new", 5, Removed)), false, true), Own);
        // Our own marker.
        assert_eq!(decide(&me(1), Some(&marker("me", 1, Active)), true, false), Own);
        assert_eq!(decide(&me(1), Some(&marker("me", 1, Removed)), true, false), Defer);
    }

    #[test]
    fn life_locks_tell_live_processes_from_dead_ones() {
        let t = TestDir::new("owner");
        let d = t.join("state");
        let state = StateDir::open(&d).unwrap();
        let a = Identity { instance: "a-1".into(), pod: String::new(), generation: 0 };
        let lock = state.life_lock(&a).unwrap();
        assert!(state.alive("a-1").unwrap());
        let b = Identity { instance: "b-2".into(), pod: String::new(), generation: 0 };
        let _b = state.life_lock(&b).unwrap();
        drop(lock); // what the kernel does when the process dies
        assert_eq!(state.sweep_dead().unwrap(), 1, "only the dead one is swept");
        assert!(!d.join("instances/a-1.lock").exists() && d.join("instances/b-2.lock").exists());
        assert!(!state.alive("a-1").unwrap());
        assert!(!state.alive("never-was").unwrap());
    }
}

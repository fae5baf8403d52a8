//! One call at a time per network namespace.
//!
//! Two calls on one namespace — two ADDs (a runtime's retry racing the first attempt), ADD and
//! DEL, CHECK and ADD — must not interleave: each reads what of ours is there and then changes it,
//! and a call that undoes its own failed work must not undo the other's. So every ADD, CHECK and
//! DEL holds an exclusive `flock(2)` on a file named after the namespace's device and inode
//! (`/run/tproxy-cni/netns/<dev>-<ino>.lock`) for all of its work in the namespace, whichever
//! netfilter engine does it. Calls on different namespaces never wait for each other.
//!
//! The wait is bounded by the call's deadline: a holder that hangs cannot hold the others forever
//! (its own tools are killed at its deadline, which releases the lock when it exits; a killed
//! process's locks go with it). The holder's pid is written into the file, for the message of a
//! call that gave up waiting.
//!
//! This is not the legacy iptables lock (`/run/tproxy-cni/xtables/`, taken by `iptables-legacy`
//! itself around each table change): that one serialises processes touching the tables, this one
//! whole calls of ours; they are different files, so neither ever waits for itself.
//!
//! DEL removes the file once the namespace is done with, while holding it. A call that was waiting
//! on the removed file notices (the path no longer names the file it locked) and takes the lock
//! again on a fresh one.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use crate::kernel::deadline::Deadline;
use crate::kernel::netfilter::backend::RUNTIME_DIR;
use crate::kernel::netns::Netns;

/// The directory of the lock files, under [`RUNTIME_DIR`].
pub const LOCK_DIR: &str = "netns";

/// Waiting for a lock is polling: at first often (the holder usually needs milliseconds), then at
/// most this often.
const MAX_POLL: Duration = Duration::from_millis(20);

#[derive(Debug, Error)]
pub enum LockError {
    /// The lock file cannot be made or locked.
    #[error("cannot lock {} for network namespace {netns}", path.display())]
    Io {
        netns: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Another call held the namespace past this call's deadline.
    #[error(
        "another call on network namespace {netns} ({holder}) held its lock {} for more than {} ms: not waiting longer",
        path.display(),
        budget.as_millis()
    )]
    Busy { netns: String, path: PathBuf, holder: String, budget: Duration },
}

/// The lock of one namespace, held until dropped.
#[derive(Debug)]
pub struct NetnsLock {
    /// Holding the locked file open is holding the lock; closing it releases it.
    _held: File,
    path: PathBuf,
}

impl NetnsLock {
    /// Takes the namespace's lock, waiting until `deadline` at most.
    pub fn acquire(ns: &Netns, deadline: Deadline) -> Result<NetnsLock, LockError> {
        let netns = ns.path().display().to_string();
        let dir = Path::new(RUNTIME_DIR).join(LOCK_DIR);
        let id = ns.id().map_err(|source| LockError::Io { netns: netns.clone(), path: dir.clone(), source })?;
        let path = dir.join(format!("{id}.lock"));
        let fail = |source| LockError::Io { netns: netns.clone(), path: path.clone(), source };
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC)
                .open(&path)
        };
        let mut pause = Duration::from_millis(1);
        loop {
            // The directory exists but on a node's first call after boot: make it only then.
            let mut file = match open() {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    std::fs::create_dir_all(&dir).map_err(|source| LockError::Io {
                        netns: netns.clone(),
                        path: dir.clone(),
                        source,
                    })?;
                    open()
                }
                opened => opened,
            }
            .map_err(fail)?;
            loop {
                // Safety: flock on a descriptor we own; non-blocking, so it returns at once.
                if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                    break;
                }
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                    return Err(fail(e));
                }
                let left = deadline.remaining();
                if left.is_zero() {
                    let holder = holder(&mut file);
                    return Err(LockError::Busy { netns, path, holder, budget: deadline.budget() });
                }
                std::thread::sleep(pause.min(left));
                pause = (pause * 2).min(MAX_POLL);
            }
            // A DEL may have removed the file while we waited on it: then the lock we hold is on
            // a file nobody else will ever open. Start over on the one the path names now.
            let same = std::fs::metadata(&path)
                .ok()
                .zip(file.metadata().ok())
                .is_some_and(|(named, held)| (named.dev(), named.ino()) == (held.dev(), held.ino()));
            if !same {
                continue;
            }
            // For the message of a call that gives up waiting; failing to write it costs nothing
            // else. Always the same length, so that it overwrites an earlier holder's without
            // truncating (a truncated file on a disk file system is written back when closed).
            let _ = file.write_all(format!("pid {:<10}\n", std::process::id()).as_bytes());
            return Ok(NetnsLock { _held: file, path });
        }
    }

    /// Deletes the lock file (the namespace is done with), then releases the lock.
    pub fn remove(self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            log::debug!("cannot remove {}: {e}", self.path.display());
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Who holds the lock, as its holder wrote it.
fn holder(file: &mut File) -> String {
    let mut text = String::new();
    let _ = file.rewind().and_then(|()| file.take(64).read_to_string(&mut text));
    let text = text.trim();
    if text.starts_with("pid ") && text[4..].bytes().all(|b| b.is_ascii_digit()) {
        text.to_owned()
    } else {
        "holder unknown".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn own_netns() -> Netns {
        Netns::open(Path::new("/proc/self/ns/net")).unwrap()
    }

    #[test]
    fn a_second_taker_waits_then_gives_up_at_its_deadline_naming_the_holder() {
        if !Path::new(RUNTIME_DIR).parent().is_some_and(|p| p.exists()) || unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: needs root for {RUNTIME_DIR}");
            return;
        }
        let ns = own_netns();
        let first = NetnsLock::acquire(&ns, Deadline::after(Duration::from_secs(5))).unwrap();
        // flock is per open file, so a second open in this process contends like another process.
        let t = Instant::now();
        let e = NetnsLock::acquire(&ns, Deadline::after(Duration::from_millis(200))).unwrap_err();
        assert!(t.elapsed() >= Duration::from_millis(200) && t.elapsed() < Duration::from_secs(3));
        let msg = e.to_string();
        assert!(msg.contains(&format!("pid {}", std::process::id())) && msg.contains("200 ms"), "{msg}");
        drop(first);
        let again = NetnsLock::acquire(&ns, Deadline::after(Duration::from_secs(5))).unwrap();
        again.remove();
    }
}

//! A pod's network namespace: an owned file descriptor, entered only by child processes.
//!
//! We never move a long-lived thread of the plugin into the pod's namespace. A command that must
//! run there is given a `pre_exec` hook that calls `setns(2)` in the forked child, just before
//! `exec`; the parent stays in the host namespace whatever happens in the child. In-process work
//! (reading the namespace's `/proc/net` files, making `validate`'s sockets there) runs on a thread
//! made for it, which enters the namespace and ends with the work ([`Netns::run_on_thread`]);
//! nothing else ever runs on that thread. A netlink socket, which every mesh pod's ADD needs, is
//! made without a thread ([`Netns::socket`]): the calling thread enters the namespace for the one
//! `socket(2)` call and comes straight back, with no code in between that could fail to.
//!
//! When the namespace is the one the process already runs in (the host command without `--netns`,
//! or run by an init container), nothing is entered: `setns(2)` needs `CAP_SYS_ADMIN`, which such a
//! container lacks even when it holds the `CAP_NET_ADMIN` that the rules need.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

/// The namespace of the calling thread (every thread of ours stays in the process's namespace).
const CURRENT: &str = "/proc/thread-self/ns/net";

/// `f_type` of files on nsfs (`/proc/*/ns/*` and their bind mounts under `/run/netns`).
const NSFS_MAGIC: i64 = 0x6e73_6673;

#[derive(Debug, Error)]
pub enum NetnsError {
    /// The namespace no longer exists. DEL treats this as success: the pod's rules died with it.
    #[error("network namespace {0} does not exist")]
    Gone(PathBuf),
    #[error("{0} is not a network namespace (is the netns bind mount gone?)")]
    NotANetns(PathBuf),
    #[error("cannot open network namespace {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot enter network namespace {path}")]
    Enter {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl NetnsError {
    /// Is the namespace simply gone (so there is nothing left to clean up)?
    pub fn is_gone(&self) -> bool {
        matches!(self, NetnsError::Gone(_) | NetnsError::NotANetns(_))
    }
}

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
    /// The process already runs in this namespace.
    current: bool,
}

impl Netns {
    /// Opens the namespace at `path` and checks it really is one. Opening never blocks: a FIFO
    /// or a device named by mistake is opened without waiting, then refused as not a namespace.
    pub fn open(path: &Path) -> Result<Netns, NetnsError> {
        let file = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC).open(path).map_err(
            |source| match source.kind() {
                io::ErrorKind::NotFound => NetnsError::Gone(path.to_owned()),
                _ => NetnsError::Open { path: path.to_owned(), source },
            },
        )?;
        // Safety: `statfs` is plain data; an all-zero value is valid and fstatfs overwrites it.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // Safety: the descriptor is open for the duration of the call and `st` is a valid out-pointer.
        if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
            return Err(NetnsError::Open { path: path.to_owned(), source: io::Error::last_os_error() });
        }
        #[allow(clippy::unnecessary_cast)] // f_type's width differs between architectures.
        if st.f_type as i64 != NSFS_MAGIC {
            return Err(NetnsError::NotANetns(path.to_owned()));
        }
        let m = file.metadata().map_err(|source| NetnsError::Open { path: path.to_owned(), source })?;
        let current = std::fs::metadata(CURRENT).is_ok_and(|here| (here.dev(), here.ino()) == (m.dev(), m.ino()));
        Ok(Netns { file, path: path.to_owned(), current })
    }

    /// The namespace this process runs in.
    pub fn current() -> Result<Netns, NetnsError> {
        Netns::open(Path::new(CURRENT))
    }

    /// Is this the namespace the process runs in?
    pub fn is_current(&self) -> bool {
        self.current
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A name for this namespace that is stable while it lives: its device and inode.
    pub fn id(&self) -> io::Result<String> {
        let m = self.file.metadata()?;
        Ok(format!("{}-{}", m.dev(), m.ino()))
    }

    /// Runs `f` on a new thread that has entered this namespace and returns its result. The thread
    /// is used for nothing else and ends with `f`, so no other code ever runs in the namespace; a
    /// socket `f` creates stays in the namespace for its whole life. In the process's own
    /// namespace, `f` simply runs here.
    pub fn run_on_thread<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        if self.current {
            return Ok(f());
        }
        let fd = self.file.as_raw_fd();
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // Safety: `fd` is an open namespace descriptor for the whole scope (it borrows
                    // `self`); setns(2) changes the namespace of this thread only, and this thread
                    // runs nothing but `f` before it ends.
                    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                        return Err(NetnsError::Enter { path: self.path.clone(), source: io::Error::last_os_error() });
                    }
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Creates a socket inside this namespace (a socket stays in the namespace it was made in,
    /// for its whole life), without a thread: the calling thread enters the namespace for the one
    /// `socket(2)` call and comes straight back. Nothing but those three system calls runs in
    /// between — no Rust code that could panic — and should the way back fail, the process aborts
    /// rather than go on in the wrong namespace. In the process's own namespace, the socket is
    /// simply made here. As with [`Netns::run_on_thread`], the outer error says the namespace could
    /// not be entered, the inner one that `socket(2)` failed.
    pub fn socket(
        &self,
        domain: libc::c_int,
        ty: libc::c_int,
        protocol: libc::c_int,
    ) -> Result<io::Result<OwnedFd>, NetnsError> {
        let make = || {
            // Safety: plain socket(2) call; the result is checked before use.
            let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, protocol) };
            if fd < 0 {
                Err(io::Error::last_os_error())
            } else {
                // Safety: `fd` was just returned by socket(2) and is owned by nothing else.
                Ok(unsafe { OwnedFd::from_raw_fd(fd) })
            }
        };
        if self.current {
            return Ok(make());
        }
        let enter = |source| NetnsError::Enter { path: self.path.clone(), source };
        let home = File::open(CURRENT).map_err(enter)?;
        // Safety: both descriptors are open namespace files for the duration of the calls;
        // setns(2) changes the namespace of this thread only, and the thread returns to `home`
        // before anything else runs (or the process aborts).
        unsafe {
            if libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(enter(io::Error::last_os_error()));
            }
            let made = make();
            if libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                libc::abort();
            }
            Ok(made)
        }
    }

    /// Reads one file of `/proc/net` (`tcp`, `tcp6`, `if_inet6`, …) as this namespace sees it.
    pub fn read_proc_net(&self, name: &str) -> io::Result<String> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{name:?} is not a /proc/net file name")));
        }
        let file = Path::new("/proc/thread-self/net").join(name);
        self.run_on_thread(|| std::fs::read_to_string(&file)).map_err(|e| match e {
            NetnsError::Enter { source, .. } => source,
            other => io::Error::other(other),
        })?
    }

    /// Makes `cmd` run inside this namespace. The namespace must stay open until `cmd` is spawned.
    /// Nothing is done when it is the process's own namespace.
    pub fn enter_on_spawn(&self, cmd: &mut Command) {
        if self.current {
            return;
        }
        let fd: RawFd = self.file.as_raw_fd();
        // Safety: the hook runs in the forked child before exec and only calls setns(2), a single
        // async-signal-safe system call; it touches no memory shared with the parent.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_path_is_gone() {
        let e = Netns::open(Path::new("/nonexistent/netns/x")).unwrap_err();
        assert!(matches!(e, NetnsError::Gone(_)) && e.is_gone());
    }

    #[test]
    fn a_fifo_is_not_a_netns_and_opening_it_does_not_wait_for_a_writer() {
        let dir = std::env::temp_dir().join(format!("tproxy-cni-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("netns");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // Safety: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = Netns::open(&fifo).unwrap_err();
        assert!(matches!(e, NetnsError::NotANetns(_)), "{e:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_regular_file_is_not_a_netns() {
        let e = Netns::open(Path::new("/proc/self/status")).unwrap_err();
        assert!(matches!(e, NetnsError::NotANetns(_)), "{e:?}");
    }

    #[test]
    fn work_on_a_namespace_thread_leaves_the_caller_where_it_was() {
        let ns = Netns::open(Path::new("/proc/self/ns/net")).unwrap();
        let here = std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino();
        let there = ns.run_on_thread(|| std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino()).unwrap();
        assert_eq!(here, there, "our own namespace: the work runs where we are");
        assert_eq!(std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino(), here);
    }

    #[test]
    fn a_socket_made_for_a_namespace_leaves_the_thread_where_it_was() {
        let here = std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino();
        let ns = Netns::open(Path::new("/proc/self/ns/net")).unwrap();
        let fd = ns.socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE).unwrap().unwrap();
        assert!(fd.as_raw_fd() >= 0);
        assert_eq!(std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino(), here);
    }

    #[test]
    fn our_own_namespace_opens_and_is_known_as_current() {
        let ns = Netns::open(Path::new("/proc/self/ns/net")).unwrap();
        assert!(!ns.id().unwrap().is_empty());
        assert!(ns.is_current() && Netns::current().unwrap().is_current());
    }

    #[test]
    fn proc_net_files_are_read_as_the_namespace_sees_them() {
        let ns = Netns::current().unwrap();
        let names = |dev: &str| dev.lines().skip(2).map(|l| l.split(':').next().unwrap().trim().to_owned()).collect();
        let ours: Vec<String> = names(&std::fs::read_to_string("/proc/self/net/dev").unwrap());
        assert_eq!(names(&ns.read_proc_net("dev").unwrap()), ours);
        assert!(ns.read_proc_net("../../etc/passwd").is_err());
    }
}

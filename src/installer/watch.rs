//! What wakes the installer: directory changes, termination signals, and the clock.
//!
//! One thread waits in `poll(2)` on an inotify descriptor (the CNI conf dir, the service-account
//! token dir) and a `signalfd(2)` for SIGTERM and SIGINT, with a timeout for the periodic resync.
//! The signals are blocked in every thread ([`block_termination_signals`] runs before any thread is
//! started), so they arrive only through the descriptor — there is no signal handler and nothing
//! async-signal-unsafe to worry about. As PID 1 in a container, this is also how SIGTERM is received
//! at all: PID 1 gets no default action for it.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use inotify::{Inotify, WatchDescriptor, WatchMask};

/// What happened while waiting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wake {
    /// A termination signal arrived (its number).
    pub signal: Option<i32>,
    /// Something changed in the CNI conf dir.
    pub conf_dir: bool,
    /// Something changed in one of the other watched dirs (the token dir, the state dir).
    pub other_dir: bool,
}

/// Blocks SIGTERM and SIGINT in the calling thread and every thread it starts later.
pub fn block_termination_signals() -> io::Result<()> {
    let set = termination_set();
    // Safety: `set` is an initialised sigset_t; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

fn termination_set() -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // Safety: sigemptyset initialises the set; sigaddset only writes into it.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigaddset(set.as_mut_ptr(), libc::SIGTERM);
        libc::sigaddset(set.as_mut_ptr(), libc::SIGINT);
        set.assume_init()
    }
}

/// The installer's event sources.
pub struct Watcher {
    inotify: Inotify,
    signals: OwnedFd,
    conf_dir: PathBuf,
    conf_wd: Option<WatchDescriptor>,
    other_wds: Vec<WatchDescriptor>,
    buffer: Vec<u8>,
}

impl Watcher {
    /// Watches `conf_dir` and the `others`. Call [`block_termination_signals`] first.
    pub fn new(conf_dir: &Path, others: &[&Path]) -> io::Result<Watcher> {
        let set = termination_set();
        // Safety: -1 asks for a new descriptor; `set` is initialised.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // Safety: `fd` is a fresh descriptor that nothing else owns.
        let signals = unsafe { OwnedFd::from_raw_fd(fd) };
        let inotify = Inotify::init()?;
        let mut w = Watcher {
            inotify,
            signals,
            conf_dir: conf_dir.to_path_buf(),
            conf_wd: None,
            other_wds: Vec::new(),
            buffer: vec![0; 16 * 1024],
        };
        w.conf_wd = Some(w.inotify.watches().add(conf_dir, dir_mask())?);
        for dir in others {
            match w.inotify.watches().add(dir, dir_mask()) {
                Ok(wd) => w.other_wds.push(wd),
                // No such dir (yet): the periodic resync still notices its changes.
                Err(e) => log::warn!("cannot watch {}: {e}; relying on the periodic resync", dir.display()),
            }
        }
        Ok(w)
    }

    /// Waits up to `timeout` for anything to happen and reports it. Returns an empty [`Wake`] on
    /// timeout.
    pub fn wait(&mut self, timeout: Duration) -> io::Result<Wake> {
        let mut fds = [
            libc::pollfd { fd: self.inotify.as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: self.signals.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // Safety: `fds` is a valid array of two pollfd for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(Wake::default()) } else { Err(e) };
        }
        let mut wake = Wake::default();
        if fds[1].revents & libc::POLLIN != 0 {
            wake.signal = self.read_signal()?;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            self.read_events(&mut wake)?;
        }
        Ok(wake)
    }

    fn read_signal(&mut self) -> io::Result<Option<i32>> {
        let mut info = MaybeUninit::<libc::signalfd_siginfo>::uninit();
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // Safety: reads at most `size` bytes into `info`, which is that large.
        let n = unsafe { libc::read(self.signals.as_raw_fd(), info.as_mut_ptr().cast(), size) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock { Ok(None) } else { Err(e) };
        }
        if n as usize != size {
            return Ok(None);
        }
        // Safety: the kernel filled the whole struct.
        Ok(Some(unsafe { info.assume_init() }.ssi_signo as i32))
    }

    fn read_events(&mut self, wake: &mut Wake) -> io::Result<()> {
        loop {
            let events = match self.inotify.read_events(&mut self.buffer) {
                Ok(events) => events,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            };
            let mut conf_gone = false;
            let mut any = false;
            for ev in events {
                any = true;
                if Some(&ev.wd) == self.conf_wd.as_ref() {
                    // Our own temporary files come and go with every write; they change nothing.
                    let ours = ev.name.is_some_and(|n| n.to_string_lossy().ends_with(super::atomic::TEMP_SUFFIX));
                    wake.conf_dir |= !ours;
                    conf_gone |= ev.mask.intersects(inotify::EventMask::DELETE_SELF | inotify::EventMask::MOVE_SELF);
                } else if self.other_wds.contains(&ev.wd) {
                    let ours = ev.name.is_some_and(|n| n.to_string_lossy().ends_with(super::atomic::TEMP_SUFFIX));
                    wake.other_dir |= !ours;
                } else if ev.mask.contains(inotify::EventMask::Q_OVERFLOW) {
                    wake.conf_dir = true;
                    wake.other_dir = true;
                }
            }
            if conf_gone {
                // The directory itself was replaced: watch the new one.
                wake.conf_dir = true;
                self.conf_wd = Some(self.inotify.watches().add(&self.conf_dir, dir_mask())?);
            }
            if !any {
                return Ok(());
            }
        }
    }
}

fn dir_mask() -> WatchMask {
    WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::TestDir;
    use std::fs;
    use std::time::Instant;

    #[test]
    fn reports_renames_into_the_watched_dir_and_ignores_our_temporaries() {
        let d = TestDir::new("watch");
        fs::create_dir_all(d.join("conf")).unwrap();
        fs::create_dir_all(d.join("sa")).unwrap();
        let mut w = Watcher::new(&d.join("conf"), &[&d.join("sa")]).unwrap();
        assert_eq!(w.wait(Duration::from_millis(10)).unwrap(), Wake::default());

        fs::write(d.join("conf/.x.1.tproxy-cni-tmp"), b"{}").unwrap();
        assert!(!w.wait(Duration::from_millis(50)).unwrap().conf_dir, "our temporaries wake nobody");

        fs::write(d.join("new"), b"{}").unwrap();
        fs::rename(d.join("new"), d.join("conf/10-a.conflist")).unwrap();
        let t = Instant::now();
        let wake = w.wait(Duration::from_secs(5)).unwrap();
        assert!(wake.conf_dir && !wake.other_dir && wake.signal.is_none(), "{wake:?}");
        assert!(t.elapsed() < Duration::from_secs(1));

        std::os::unix::fs::symlink("x", d.join("sa/..data_tmp")).unwrap();
        fs::rename(d.join("sa/..data_tmp"), d.join("sa/..data")).unwrap();
        assert!(w.wait(Duration::from_secs(5)).unwrap().other_dir);
    }
}

//! Running a tool to completion, or killing it at a deadline.
//!
//! [`run`] feeds the child its input and reads its output with `poll(2)` on non-blocking pipes, so
//! neither a child that never reads its input nor one that never writes can block the plugin; once
//! both output pipes are closed it waits for the exit in short steps. When the deadline passes, the
//! child is killed (`SIGKILL`) and reaped, for a short while at most: a process stuck in the kernel
//! dies only when it leaves it, and the plugin does not wait for that. Whatever the child itself
//! started (a `modprobe`) is not waited for either: output pipes it still holds are simply no
//! longer read once the deadline has passed.
//!
//! The child stays in the plugin's process group, so a runtime that kills the plugin's group kills
//! the tool with it (`tests/crash.rs` relies on it).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use thiserror::Error;

use super::deadline::Deadline;

/// How long a killed child is waited for before it is left to whoever reaps orphans.
const REAP: Duration = Duration::from_secs(1);
/// At most this much of a child's stderr is kept: it ends up in a one-line message.
const MAX_STDERR: usize = 64 * 1024;

/// What a finished child left.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Why a child gave no [`Output`].
#[derive(Debug, Error)]
pub enum ExecError {
    #[error("cannot start it")]
    Spawn(#[source] io::Error),
    #[error("cannot exchange data with it")]
    Io(#[source] io::Error),
    /// The deadline passed first; the child was killed.
    #[error("it did not finish within {} ms and was killed{}", .budget.as_millis(), stderr_note(.stderr))]
    TimedOut { budget: Duration, stderr: String },
}

fn stderr_note(stderr: &str) -> String {
    if stderr.is_empty() { String::new() } else { format!(" (it had said: {stderr})") }
}

/// Runs `cmd` with `input` on its stdin (none: `/dev/null`), collecting stdout and stderr, until it
/// exits or `deadline` passes. `cmd`'s stdio settings are replaced.
pub fn run(cmd: &mut Command, input: Option<&[u8]>, deadline: Deadline) -> Result<Output, ExecError> {
    cmd.stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(ExecError::Spawn)?;
    match exchange(&mut child, input.unwrap_or_default(), deadline) {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(stderr)) => {
            kill(&mut child);
            let stderr = String::from_utf8_lossy(&stderr).trim().to_owned();
            Err(ExecError::TimedOut { budget: deadline.budget(), stderr })
        }
        Err(e) => {
            kill(&mut child);
            Err(ExecError::Io(e))
        }
    }
}

/// Feeds and drains the child; `Ok(Err(stderr so far))` when the deadline passed first.
fn exchange(child: &mut Child, input: &[u8], deadline: Deadline) -> io::Result<Result<Output, Vec<u8>>> {
    let mut stdin = child.stdin.take();
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    if let Some(s) = &stdin {
        nonblocking(s.as_raw_fd())?;
        if input.is_empty() {
            stdin = None;
        }
    }
    nonblocking(stdout.as_raw_fd())?;
    nonblocking(stderr.as_raw_fd())?;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let (mut out_open, mut err_open) = (true, true);
    let mut written = 0;
    let mut buf = vec![0u8; 64 * 1024];
    while out_open || err_open || stdin.is_some() {
        let left = deadline.remaining();
        if left.is_zero() {
            return Ok(Err(err));
        }
        let mut fds = Vec::with_capacity(3);
        if let Some(s) = &stdin {
            fds.push(libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLOUT, revents: 0 });
        }
        if out_open {
            fds.push(libc::pollfd { fd: stdout.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        if err_open {
            fds.push(libc::pollfd { fd: stderr.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
        // Safety: `fds` is a valid array of `fds.len()` pollfd structures for the whole call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for fd in fds.iter().filter(|f| f.revents != 0) {
            if stdin.as_ref().is_some_and(|s| s.as_raw_fd() == fd.fd) {
                let s = stdin.as_mut().expect("checked");
                match s.write(&input[written..]) {
                    Ok(n) => written += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // The tool closed its input (it exited early, or needs no more): its status
                    // and stderr say why.
                    Err(_) => written = input.len(),
                }
                if written == input.len() {
                    stdin = None;
                }
            } else if fd.fd == stdout.as_raw_fd() {
                out_open = drain(&mut stdout, &mut buf, &mut out, usize::MAX)?;
            } else if fd.fd == stderr.as_raw_fd() {
                err_open = drain(&mut stderr, &mut buf, &mut err, MAX_STDERR)?;
            }
        }
    }
    // Both output pipes are closed: the child is exiting, or has.
    let mut pause = Duration::from_micros(50);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Ok(Output { status, stdout: out, stderr: err }));
        }
        let left = deadline.remaining();
        if left.is_zero() {
            return Ok(Err(err));
        }
        std::thread::sleep(pause.min(left));
        pause = (pause * 2).min(Duration::from_millis(5));
    }
}

/// Reads what is there; `Ok(false)` at end of file. Keeps at most `limit` bytes.
fn drain(r: &mut impl Read, buf: &mut [u8], into: &mut Vec<u8>, limit: usize) -> io::Result<bool> {
    loop {
        match r.read(buf) {
            Ok(0) => return Ok(false),
            Ok(n) => {
                let room = limit.saturating_sub(into.len());
                into.extend_from_slice(&buf[..n.min(room)]);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn nonblocking(fd: RawFd) -> io::Result<()> {
    // Safety: fcntl on a descriptor we own, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // Safety: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Kills the child and reaps it, waiting [`REAP`] at most.
fn kill(child: &mut Child) {
    let _ = child.kill();
    let mut waited = Duration::ZERO;
    while waited < REAP {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
        waited += Duration::from_millis(5);
    }
    log::warn!("pid {} did not exit within {} ms of SIGKILL; not waiting for it", child.id(), REAP.as_millis());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("/bin/sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn collects_output_and_status_and_feeds_input() {
        let out = run(&mut sh("cat; echo oops >&2; exit 3"), Some(b"hello"), Deadline::after(Duration::from_secs(10)))
            .unwrap();
        assert_eq!(out.stdout, b"hello");
        assert_eq!(out.stderr, b"oops\n");
        assert_eq!(out.status.code(), Some(3));
    }

    #[test]
    fn a_large_input_a_child_never_reads_does_not_block() {
        let input = vec![b'x'; 1 << 20];
        let out = run(&mut sh("exit 0"), Some(&input), Deadline::after(Duration::from_secs(10))).unwrap();
        assert!(out.status.success());
        // Large in both directions at once.
        let out = run(&mut sh("cat"), Some(&input), Deadline::after(Duration::from_secs(10))).unwrap();
        assert_eq!(out.stdout.len(), input.len());
    }

    #[test]
    fn a_hung_child_is_killed_at_the_deadline() {
        let t = Instant::now();
        let e = run(&mut sh("exec sleep 30"), None, Deadline::after(Duration::from_millis(300))).unwrap_err();
        assert!(matches!(e, ExecError::TimedOut { budget, .. } if budget == Duration::from_millis(300)), "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(e.to_string().contains("did not finish within 300 ms and was killed"), "{e}");
    }

    #[test]
    fn a_child_that_closed_its_output_but_runs_on_is_killed_too() {
        let t = Instant::now();
        let e = run(&mut sh("exec sleep 30 >&- 2>&-"), None, Deadline::after(Duration::from_millis(300))).unwrap_err();
        assert!(matches!(e, ExecError::TimedOut { .. }), "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_grandchild_holding_the_pipes_does_not_hold_the_caller() {
        // The shell forks `sleep`, which inherits stdout; the shell is killed, `sleep` keeps the pipe.
        let t = Instant::now();
        let e = run(&mut sh("sleep 5; true"), None, Deadline::after(Duration::from_millis(300))).unwrap_err();
        assert!(matches!(e, ExecError::TimedOut { .. }), "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_missing_program_is_a_spawn_error() {
        let e = run(&mut Command::new("/nonexistent/tool"), None, Deadline::after(Duration::from_secs(1))).unwrap_err();
        assert!(matches!(e, ExecError::Spawn(_)), "{e:?}");
    }
}

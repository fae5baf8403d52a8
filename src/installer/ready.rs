//! Readiness for kubelet: `GET /readyz` on a plain TCP listener, and a ready file.
//!
//! `/readyz` answers 200 only when the binary, our conflist entry and the kubeconfig are in place,
//! checked against the disk at the moment of the request (not a cached flag), and 503 with the
//! missing part otherwise. `/livez` answers 200 while the main loop keeps turning. One thread serves
//! the requests one at a time with short socket timeouts: probes are rare and tiny, and a stuck client
//! cannot hold the thread for long. No async runtime.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use thiserror::Error;

use super::atomic;

/// A readiness check: `Ok` when ready, else what is missing.
pub type Check = Arc<dyn Fn() -> Result<(), NotReady> + Send + Sync>;

/// Which of the three parts (binary, kubeconfig, conflist entry) is not in place, as `/readyz`
/// says it.
#[derive(Debug, Error)]
pub enum NotReady {
    #[error("the plugin binary {} is missing or not ours", .0.display())]
    BinaryMissing(PathBuf),
    #[error("cannot check {}", .path.display())]
    BinaryUnreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the kubeconfig {} or its token is missing or stale", .0.display())]
    Credentials(PathBuf),
    #[error("{} does not end with our entry", .0.display())]
    NotOurEntry(PathBuf),
    #[error("no network configuration in {} yet", .0.display())]
    NoConfiguration(PathBuf),
    #[error("{} is being written", .0.display())]
    Unsettled(PathBuf),
    #[error("cannot read {}", .path.display())]
    ConfDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The main loop's heartbeat, read by `/livez`.
#[derive(Debug, Default)]
pub struct Heartbeat(AtomicU64);

impl Heartbeat {
    /// Records that the loop is alive now.
    pub fn beat(&self) {
        self.0.store(now_secs(), Ordering::Relaxed);
    }

    fn age(&self) -> Duration {
        Duration::from_secs(now_secs().saturating_sub(self.0.load(Ordering::Relaxed)))
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// Binds the probe listener. An address another installer on this node holds (a rolling update
/// with surge: both pods share the host network) is not an error: `Ok(None)`, and [`serve`] binds
/// it once that installer lets go.
pub fn bind(addr: SocketAddr) -> io::Result<Option<TcpListener>> {
    match TcpListener::bind(addr) {
        Ok(l) => Ok(Some(l)),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            log::info!("probe address {addr} is in use (another installer on this node?): will bind it when free");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Serves probes on `addr` from a new thread, forever, while `serving` is true. When it turns false
/// (this installer became passive) the listener is closed, so the installer that owns the node's
/// install can take the address; when it turns true again the address is bound again.
pub fn serve(
    addr: SocketAddr,
    listener: Option<TcpListener>,
    serving: Arc<AtomicBool>,
    check: Check,
    heartbeat: Arc<Heartbeat>,
    stale_after: Duration,
) {
    std::thread::Builder::new()
        .name("probes".into())
        .spawn(move || {
            let mut listener = listener;
            loop {
                let want = serving.load(Ordering::Relaxed);
                match (&listener, want) {
                    (Some(l), true) => {
                        if readable(l, 200) {
                            match l.accept() {
                                Ok((stream, _)) => {
                                    if let Err(e) = answer(stream, &check, &heartbeat, stale_after) {
                                        log::debug!("probe connection: {e}");
                                    }
                                }
                                Err(e) => log::debug!("probe accept: {e}"),
                            }
                        }
                    }
                    (Some(_), false) => {
                        log::info!("passive: releasing the probe address {addr}");
                        listener = None;
                    }
                    (None, true) => match TcpListener::bind(addr) {
                        Ok(l) => {
                            log::info!("serving probes on {addr}");
                            listener = Some(l);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(200)),
                    },
                    (None, false) => std::thread::sleep(Duration::from_millis(200)),
                }
            }
        })
        .expect("spawning the probe thread");
}

/// Waits up to `ms` for a connection to accept.
fn readable(l: &TcpListener, ms: i32) -> bool {
    let mut fd = libc::pollfd { fd: l.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // Safety: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut fd, 1, ms) > 0 }
}

fn answer(stream: TcpStream, check: &Check, heartbeat: &Heartbeat, stale_after: Duration) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.by_ref().take(4096).read_line(&mut request_line)?;
    // Drain the headers so the client sees a clean close.
    let mut line = String::new();
    while reader.by_ref().take(8192).read_line(&mut line)? > 2 {
        line.clear();
    }
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, body) = match (method, path) {
        ("GET" | "HEAD", "/readyz") => match check() {
            Ok(()) => ("200 OK", "ready\n".to_owned()),
            Err(why) => ("503 Service Unavailable", format!("not ready: {}\n", crate::text::chain(&why))),
        },
        ("GET" | "HEAD", "/livez") if heartbeat.age() <= stale_after => ("200 OK", "alive\n".to_owned()),
        ("GET" | "HEAD", "/livez") => {
            ("503 Service Unavailable", format!("main loop silent for {}s\n", heartbeat.age().as_secs()))
        }
        ("GET" | "HEAD", _) => ("404 Not Found", "not found\n".to_owned()),
        _ => ("405 Method Not Allowed", "method not allowed\n".to_owned()),
    };
    let mut out = stream;
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    out.write_all(head.as_bytes())?;
    if method != "HEAD" {
        out.write_all(body.as_bytes())?;
    }
    out.flush()
}

/// The ready file: present exactly while the installer reports ready.
#[derive(Debug)]
pub struct ReadyFile {
    path: Option<PathBuf>,
    state: Option<bool>,
}

impl ReadyFile {
    pub fn new(path: Option<PathBuf>) -> ReadyFile {
        ReadyFile { path, state: None }
    }

    /// Creates or removes the file to match `ready`.
    pub fn set(&mut self, ready: bool) -> io::Result<()> {
        let Some(path) = &self.path else { return Ok(()) };
        if self.state == Some(ready) && path.exists() == ready {
            return Ok(());
        }
        if ready {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            atomic::write(path, b"ready\n", 0o644)?;
        } else {
            atomic::remove(path)?;
        }
        self.state = Some(ready);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn readyz_follows_the_check_and_livez_the_heartbeat() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap().unwrap();
        let addr = listener.local_addr().unwrap();
        let ready = Arc::new(AtomicBool::new(false));
        let r = ready.clone();
        let check: Check = Arc::new(move || {
            if r.load(Ordering::SeqCst) { Ok(()) } else { Err(NotReady::NoConfiguration("/etc/cni/net.d".into())) }
        });
        let hb = Arc::new(Heartbeat::default());
        hb.beat();
        let serving = Arc::new(AtomicBool::new(true));
        serve(addr, Some(listener), serving.clone(), check, hb, Duration::from_secs(60));
        let resp = get(addr, "/readyz");
        assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
        assert!(resp.ends_with("not ready: no network configuration in /etc/cni/net.d yet\n"), "{resp}");
        ready.store(true, Ordering::SeqCst);
        assert!(get(addr, "/readyz").starts_with("HTTP/1.1 200 OK"));
        assert!(get(addr, "/livez").starts_with("HTTP/1.1 200 OK"));
        assert!(get(addr, "/other").starts_with("HTTP/1.1 404"));
        // Passive: the address is released for the owner, and taken back when we own again.
        serving.store(false, Ordering::SeqCst);
        let start = std::time::Instant::now();
        let taken = loop {
            if let Ok(l) = TcpListener::bind(addr) {
                break l;
            }
            assert!(start.elapsed() < Duration::from_secs(5), "the address was not released");
            std::thread::sleep(Duration::from_millis(20));
        };
        serving.store(true, Ordering::SeqCst);
        drop(taken);
        let start = std::time::Instant::now();
        while TcpStream::connect(addr).is_err() {
            assert!(start.elapsed() < Duration::from_secs(5), "the address was not bound again");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(get(addr, "/livez").starts_with("HTTP/1.1 200 OK"));
    }

    #[test]
    fn the_ready_file_tracks_the_state() {
        let d = crate::test_dir::TestDir::new("ready");
        let p = d.join("run/ready");
        let mut f = ReadyFile::new(Some(p.clone()));
        f.set(true).unwrap();
        assert!(p.exists());
        f.set(false).unwrap();
        assert!(!p.exists());
    }
}

//! Readiness for kubelet: `GET /readyz` on a plain TCP listener, and a ready file.
//!
//! `/readyz` answers 200 only when the binary, our conflist entry and the kubeconfig are in place,
//! checked against the disk at the moment of the request (not a cached flag), and 503 with the
//! missing part otherwise. `/livez` answers 200 while the main loop keeps turning. One thread serves
//! the requests one at a time with short socket timeouts: probes are rare and tiny, and a stuck client
//! cannot hold the thread for long. No async runtime.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::atomic;

/// A readiness check: `Ok` when ready, else what is missing.
pub type Check = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

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

/// Binds the probe listener (before anything is installed, so a busy port fails fast).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr)
}

/// Serves probes on `listener` from a new thread, forever.
pub fn serve(listener: TcpListener, check: Check, heartbeat: Arc<Heartbeat>, stale_after: Duration) {
    std::thread::Builder::new()
        .name("probes".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        if let Err(e) = answer(stream, &check, &heartbeat, stale_after) {
                            log::debug!("probe connection: {e}");
                        }
                    }
                    Err(e) => log::debug!("probe accept: {e}"),
                }
            }
        })
        .expect("spawning the probe thread");
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
            Err(why) => ("503 Service Unavailable", format!("not ready: {why}\n")),
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
    use std::sync::atomic::AtomicBool;

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn readyz_follows_the_check_and_livez_the_heartbeat() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let ready = Arc::new(AtomicBool::new(false));
        let r = ready.clone();
        let check: Check =
            Arc::new(move || if r.load(Ordering::SeqCst) { Ok(()) } else { Err("no conflist entry".into()) });
        let hb = Arc::new(Heartbeat::default());
        hb.beat();
        serve(listener, check, hb, Duration::from_secs(60));
        let resp = get(addr, "/readyz");
        assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
        assert!(resp.ends_with("not ready: no conflist entry\n"), "{resp}");
        ready.store(true, Ordering::SeqCst);
        assert!(get(addr, "/readyz").starts_with("HTTP/1.1 200 OK"));
        assert!(get(addr, "/livez").starts_with("HTTP/1.1 200 OK"));
        assert!(get(addr, "/other").starts_with("HTTP/1.1 404"));
    }

    #[test]
    fn the_ready_file_tracks_the_state() {
        let p = std::env::temp_dir().join(format!("tproxy-ready-{}/ready", std::process::id()));
        let mut f = ReadyFile::new(Some(p.clone()));
        f.set(true).unwrap();
        assert!(p.exists());
        f.set(false).unwrap();
        assert!(!p.exists());
        std::fs::remove_dir_all(p.parent().unwrap()).unwrap();
    }
}

//! `tproxy-cni validate`: prove with real traffic that a namespace's redirect is in place.
//!
//! Run where the application runs (an unprivileged init container, or an operator with
//! `--netns`), before the proxy starts: validate listens on the proxy's outbound port, dials an
//! address the redirect must capture, and sends a random token. The check passes only when the
//! token comes back from its own listener and the listener saw, through `SO_ORIGINAL_DST`, that
//! the connection was dialled to the target: proof that netfilter rewrote it, not that something
//! happened to answer.
//!
//! The default target, `192.0.2.1:80`, is in TEST-NET-1 (RFC 5737), reserved for documentation:
//! nothing answers there, and routers drop it. The probe's packets also carry a TTL (hop limit) of
//! 1, so if the redirect is missing, the first router on the way — the node itself, for a pod on a
//! bridge — discards the probe: it never travels further. A redirected connection never leaves the
//! namespace, and local delivery does not spend a hop. A route to the target must exist (normally
//! the default route): netfilter redirects after routing, so without one there is nothing to test.
//!
//! The exit status says what happened; see the `EXIT_*` constants and `docs/hosts.md`.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::Args;
use socket2::{Domain, SockAddr, Socket, Type};
use thiserror::Error;

use crate::core::redirect::{Port, ValueError, parse_port};
use crate::kernel::netns::{Netns, NetnsError};
use crate::kernel::origdst::original_dst;

/// The redirect is in place.
pub const EXIT_OK: u8 = 0;
/// validate could not do its work: the namespace cannot be opened or entered, a socket cannot be
/// made. Says nothing about the redirect.
pub const EXIT_ERROR: u8 = 1;
/// The command line is wrong (clap's status).
pub const EXIT_USAGE: u8 = 2;
/// The redirect is missing or goes elsewhere: the connection was refused or reset, reached
/// something that is not validate's listener, or arrived with another original destination.
pub const EXIT_REDIRECT_MISSING: u8 = 3;
/// Nothing answered within `--timeout`. A redirected connection completes in microseconds, so the
/// probe almost certainly left the namespace unredirected and was dropped on the way.
pub const EXIT_TIMEOUT: u8 = 4;
/// validate cannot listen on the proxy's port: the proxy (or something else) already holds it, or
/// the port needs privileges. Run validate before the proxy starts.
pub const EXIT_CANNOT_BIND: u8 = 5;
/// The namespace has no route to the target, so no packet was sent and nothing was tested. Give a
/// `--target` the namespace can route to.
pub const EXIT_NO_ROUTE: u8 = 6;

/// `tproxy-cni validate` arguments. Every flag but the inbound ones also reads its environment
/// variable, for init containers configured through `env`.
#[derive(Debug, Clone, Args)]
pub struct ValidateArgs {
    /// The proxy's outbound port, where redirected connections must arrive. validate listens on it.
    #[arg(
        long,
        value_name = "PORT",
        value_parser = port,
        env = "TPROXY_CNI_VALIDATE_OUTBOUND_PORT",
        default_value = "15001"
    )]
    pub outbound_port: Port,

    /// Where to dial: an address the redirect must capture, reachable by the namespace's routes.
    /// Repeatable (one per family: add `[2001:db8::1]:80` for IPv6).
    #[arg(
        long = "target",
        value_name = "ADDR:PORT",
        env = "TPROXY_CNI_VALIDATE_TARGET",
        value_delimiter = ',',
        default_value = "192.0.2.1:80"
    )]
    pub targets: Vec<SocketAddr>,

    /// How long the whole check may take (`500ms`, `5s`, `1m`; a bare number is seconds).
    #[arg(long, value_name = "DURATION", value_parser = duration, env = "TPROXY_CNI_VALIDATE_TIMEOUT", default_value = "5s")]
    pub timeout: Duration,

    /// Check the namespace at this path instead of the current one (needs CAP_SYS_ADMIN). The
    /// listeners and the outbound probe are made inside it, as the user validate runs as.
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,

    /// Also check the inbound redirect to this port (the proxy's inbound port). Needs --netns:
    /// inbound traffic must come from outside the namespace, and validate dials from where it runs.
    #[arg(long, value_name = "PORT", value_parser = port, requires_all = ["netns", "inbound_target"])]
    pub inbound_port: Option<Port>,

    /// An address of the checked namespace, reachable from where validate runs, to dial for the
    /// inbound check (any port the redirect captures).
    #[arg(long, value_name = "ADDR:PORT", requires = "inbound_port")]
    pub inbound_target: Option<SocketAddr>,
}

fn port(s: &str) -> Result<Port, ValueError> {
    parse_port(s, "port")
}

/// A `--timeout` that is not a duration from 1 ms to 1 hour.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DurationError {
    #[error("{0:?} is not a duration such as 500ms, 5s or 1m")]
    Syntax(String),
    #[error("{0:?} is out of range (1ms to 1h)")]
    Range(String),
}

/// A duration: a number with `ms`, `s` or `m`, or a bare number of seconds; 1 ms to 1 hour.
fn duration(s: &str) -> Result<Duration, DurationError> {
    let (digits, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, "s"), |at| s.split_at(at));
    let n: u64 = digits.parse().map_err(|_| DurationError::Syntax(s.to_owned()))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        _ => return Err(DurationError::Syntax(s.to_owned())),
    };
    if d.is_zero() || d > Duration::from_secs(3600) {
        return Err(DurationError::Range(s.to_owned()));
    }
    Ok(d)
}

/// Why validate did not pass. [`ValidateError::exit_code`] maps each to its exit status.
#[derive(Debug, Error)]
pub enum ValidateError {
    #[error("redirect missing: the connection to {target} {how}")]
    Missing {
        target: SocketAddr,
        #[source]
        how: Missing,
    },
    #[error("no answer within {timeout:?} from {target}: the probe most likely left unredirected and was dropped")]
    Timeout { target: SocketAddr, timeout: Duration },
    #[error("cannot listen on {addr} ({hint})")]
    Bind {
        addr: SocketAddr,
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "no route to {target} in the namespace, so nothing was tested (redirection happens after routing): \
         give a --target the namespace can route to"
    )]
    NoRoute {
        target: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("cannot create a socket")]
    Socket(#[source] io::Error),
}

/// What the probe's connection met instead of validate's listener reached through the redirect.
#[derive(Debug, Error)]
pub enum Missing {
    #[error("was refused: nothing listens where it went (no redirect, or a redirect to another port)")]
    Refused,
    #[error("failed")]
    Failed(#[source] io::Error),
    #[error("reached something that is not validate's listener (it did not take the probe)")]
    NotTaken(#[source] io::Error),
    #[error("reached something that is not validate's listener (no answer)")]
    NoAnswer(#[source] io::Error),
    #[error("reached something that is not validate's listener (it answered {0})")]
    Stranger(crate::text::Quoted),
    #[error("reached validate's listener with original destination {0}: another rule rewrote it")]
    Rewritten(SocketAddr),
    #[error("reached validate's listener without any address translation")]
    Untranslated,
}

impl ValidateError {
    /// The exit status that reports this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            ValidateError::Missing { .. } => EXIT_REDIRECT_MISSING,
            ValidateError::Timeout { .. } => EXIT_TIMEOUT,
            ValidateError::Bind { .. } => EXIT_CANNOT_BIND,
            ValidateError::NoRoute { .. } => EXIT_NO_ROUTE,
            ValidateError::Netns(_) | ValidateError::Socket(_) => EXIT_ERROR,
        }
    }
}

/// Sockets made inside the checked namespace.
struct Sockets {
    /// One listener per family on the outbound port, and the inbound listener if asked for.
    listeners: Vec<TcpListener>,
    /// One probe per target, not yet connected.
    probes: Vec<(SocketAddr, Socket)>,
}

/// Runs the check; returns one line per verified redirect.
pub fn run(args: &ValidateArgs) -> Result<String, ValidateError> {
    let deadline = Instant::now() + args.timeout;
    let token = token()?;
    let sockets = match &args.netns {
        Some(path) => {
            let ns = Netns::open(path)?;
            ns.run_on_thread(|| make_sockets(args))??
        }
        None => make_sockets(args)?,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let acceptors: Vec<JoinHandle<()>> = sockets.listeners.into_iter().map(|l| answer(l, stop.clone())).collect();
    let result = (|| {
        let mut report = String::new();
        for (target, probe) in sockets.probes {
            let reply = exchange(probe, target, &token, deadline, args.timeout)?;
            verify(&reply, &token, target)?;
            report += &format!(
                "outbound: {target} was redirected to port {} (token and original destination verified)\n",
                args.outbound_port
            );
        }
        if let (Some(port), Some(target)) = (args.inbound_port, args.inbound_target) {
            let probe = Socket::new(Domain::for_address(target), Type::STREAM, None).map_err(ValidateError::Socket)?;
            let reply = exchange(probe, target, &token, deadline, args.timeout)?;
            verify(&reply, &token, target)?;
            report +=
                &format!("inbound: {target} was redirected to port {port} (token and original destination verified)\n");
        }
        Ok(report)
    })();
    stop.store(true, Ordering::Relaxed);
    for a in acceptors {
        let _ = a.join();
    }
    result
}

fn make_sockets(args: &ValidateArgs) -> Result<Sockets, ValidateError> {
    let mut listeners = Vec::new();
    let mut families: Vec<bool> = args.targets.iter().map(SocketAddr::is_ipv6).collect();
    families.sort_unstable();
    families.dedup();
    for v6 in families {
        listeners.push(listen(
            args.outbound_port,
            v6,
            "the proxy is probably running already: run validate before it starts",
        )?);
    }
    if let (Some(port), Some(target)) = (args.inbound_port, args.inbound_target) {
        listeners.push(listen(port, target.is_ipv6(), "the proxy is probably running already")?);
    }
    let mut probes = Vec::new();
    for &target in &args.targets {
        let s = Socket::new(Domain::for_address(target), Type::STREAM, None).map_err(ValidateError::Socket)?;
        // One hop: if the redirect is missing, the first router discards the probe.
        if target.is_ipv6() { s.set_unicast_hops_v6(1) } else { s.set_ttl_v4(1) }.map_err(ValidateError::Socket)?;
        probes.push((target, s));
    }
    Ok(Sockets { listeners, probes })
}

/// Listens on every address of one family; an IPv6 listener is IPv6 only.
fn listen(port: Port, v6: bool, in_use_hint: &'static str) -> Result<TcpListener, ValidateError> {
    let addr: SocketAddr = if v6 { ([0u16; 8], port.get()).into() } else { ([0u8; 4], port.get()).into() };
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(ValidateError::Socket)?;
    let bind = || {
        if v6 {
            s.set_only_v6(true)?;
        }
        s.set_reuse_address(true)?;
        s.bind(&SockAddr::from(addr))?;
        s.listen(16)?;
        s.set_nonblocking(true)
    };
    bind().map_err(|source| ValidateError::Bind {
        addr,
        hint: match source.kind() {
            io::ErrorKind::AddrInUse => in_use_hint,
            io::ErrorKind::PermissionDenied => "ports below 1024 need privileges",
            _ => "see the cause",
        },
        source,
    })?;
    Ok(s.into())
}

/// Answers every connection on `listener` with `"<token it sent> <original destination>\n"` until
/// `stop` is set.
fn answer(listener: TcpListener, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((conn, _)) => {
                    let _ = reply(conn);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(2)),
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    })
}

fn reply(conn: TcpStream) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(1)))?;
    let dst = original_dst(&conn).map_or_else(|_| "-".to_owned(), |a| a.to_string());
    let line = read_line(&conn)?;
    (&conn).write_all(format!("{} {dst}\n", line.trim_end()).as_bytes())
}

/// Reads one line of at most 128 bytes.
fn read_line(from: impl io::Read) -> io::Result<String> {
    let mut line = String::new();
    BufReader::new(from.take(128)).read_line(&mut line)?;
    Ok(line)
}

/// Connects the probe, sends the token, and returns the line that came back.
fn exchange(
    probe: Socket,
    target: SocketAddr,
    token: &str,
    deadline: Instant,
    timeout: Duration,
) -> Result<String, ValidateError> {
    let timed_out = || ValidateError::Timeout { target, timeout };
    let left = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()).ok_or_else(timed_out)?;
    if let Err(e) = probe.connect_timeout(&SockAddr::from(target), left) {
        return Err(match e.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => timed_out(),
            io::ErrorKind::NetworkUnreachable => ValidateError::NoRoute { target, source: e },
            io::ErrorKind::ConnectionRefused => ValidateError::Missing { target, how: Missing::Refused },
            _ => ValidateError::Missing { target, how: Missing::Failed(e) },
        });
    }
    let conn: TcpStream = probe.into();
    let left = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()).ok_or_else(timed_out)?;
    conn.set_read_timeout(Some(left)).map_err(ValidateError::Socket)?;
    let missing = |how| ValidateError::Missing { target, how };
    (&conn).write_all(format!("{token}\n").as_bytes()).map_err(|e| missing(Missing::NotTaken(e)))?;
    read_line(&conn).map_err(|e| missing(Missing::NoAnswer(e)))
}

/// The reply must carry our token and the target as the original destination.
fn verify(reply: &str, token: &str, target: SocketAddr) -> Result<(), ValidateError> {
    let mut words = reply.split_whitespace();
    let (got_token, got_dst) = (words.next(), words.next());
    let missing = |how| Err(ValidateError::Missing { target, how });
    if got_token != Some(token) {
        return missing(Missing::Stranger(crate::text::Quoted::new(reply.trim_end())));
    }
    match got_dst.map(str::parse::<SocketAddr>) {
        Some(Ok(dst)) if dst == target => Ok(()),
        Some(Ok(dst)) => missing(Missing::Rewritten(dst)),
        _ => missing(Missing::Untranslated),
    }
}

/// 128 random bits, in hex.
fn token() -> Result<String, ValidateError> {
    let mut bytes = [0u8; 16];
    // Safety: getrandom writes at most `bytes.len()` bytes into the buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        return Err(ValidateError::Socket(io::Error::last_os_error()));
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_unit_or_mean_seconds() {
        assert_eq!(duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(duration("3"), Ok(Duration::from_secs(3)));
        for bad in ["", "s", "0", "5h", "-1s", "1.5s", "2m30s", "61m"] {
            assert!(duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tokens_are_random() {
        let (a, b) = (token().unwrap(), token().unwrap());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }

    #[test]
    fn a_reply_must_carry_the_token_and_the_target() {
        let t: SocketAddr = "192.0.2.1:80".parse().unwrap();
        assert!(verify("abc 192.0.2.1:80\n", "abc", t).is_ok());
        let how = |reply: &str| match verify(reply, "abc", t) {
            Err(ValidateError::Missing { target, how }) if target == t => how,
            other => panic!("{reply:?}: {other:?}"),
        };
        assert!(matches!(how("abc 192.0.2.2:80\n"), Missing::Rewritten(dst) if dst.to_string() == "192.0.2.2:80"));
        assert!(matches!(how("abc -\n"), Missing::Untranslated));
        let stranger = verify("HTTP/1.1 400\r\n", "abc", t).unwrap_err().to_string();
        assert_eq!(
            stranger,
            "redirect missing: the connection to 192.0.2.1:80 reached something that is not validate's listener \
             (it answered \"HTTP/1.1 400\")"
        );
    }

    #[test]
    fn exit_codes_are_distinct() {
        let mut codes =
            [EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_REDIRECT_MISSING, EXIT_TIMEOUT, EXIT_CANNOT_BIND, EXIT_NO_ROUTE];
        codes.sort_unstable();
        assert!(codes.windows(2).all(|w| w[0] != w[1]));
    }
}

//! The pod's loopback IPv6 address for Kuma's IPv6 pass, over a raw `NETLINK_ROUTE` socket.
//!
//! Kuma's proxy sends its inbound passthrough connections from `::6`, and its IPv6 rules recognise
//! them by that source, so `::6/128` must exist on the pod's `lo` whenever the IPv6 pass does.
//! Kuma's dual-stack mode also wants the IPv6 pass whenever the namespace has any IPv6 address at
//! all, which only the namespace itself can tell (the previous plugin may report none while eth0
//! has a link-local one).
//!
//! No `ip` process and no netlink crate: three small messages (dump addresses, add one, delete one).
//! The socket is made inside the pod's namespace ([`Netns::socket`]: the calling thread enters it
//! for that one `socket(2)` call and comes straight back); a netlink socket stays bound to the
//! namespace it was created in, so everything after that runs in the host namespace.
//!
//! Every exchange is bounded by the caller's [`Deadline`]: each send and receive waits at most
//! what is left of it (`SO_SNDTIMEO`, `SO_RCVTIMEO`), and a kernel that stays silent past it ends
//! the call with [`NetlinkError::TimedOut`].

use std::io;
use std::net::Ipv6Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use thiserror::Error;

use crate::core::redirect::{Family, KUMA_INBOUND_PASSTHROUGH_V6, Redirect};
use crate::kernel::deadline::Deadline;
use crate::kernel::netfilter::Removed;
use crate::kernel::netns::{Netns, NetnsError};

/// The loopback's interface index: the kernel creates `lo` first in every namespace, as index 1.
const LOOPBACK_IFINDEX: u32 = 1;

const NLMSG_HDRLEN: usize = 16;
const NLMSG_DONE: u16 = libc::NLMSG_DONE as u16;
const NLMSG_ERROR: u16 = libc::NLMSG_ERROR as u16;
const IFADDRMSG_LEN: usize = 8;

#[derive(Debug, Error)]
pub enum NetlinkError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("cannot {what} in the pod's network namespace")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot {what} in the pod's network namespace: malformed netlink answer")]
    Malformed { what: &'static str },
    /// The kernel did not answer within the deadline.
    #[error("cannot {what} in the pod's network namespace: no answer from the kernel within {} ms", .budget.as_millis())]
    TimedOut { what: &'static str, budget: Duration },
}

/// A `NETLINK_ROUTE` socket bound to a pod's network namespace.
#[derive(Debug)]
pub struct RouteSocket {
    fd: OwnedFd,
    seq: u32,
    deadline: Deadline,
}

impl RouteSocket {
    /// Opens a socket in `ns`, from a thread that entered it and ends right after; every exchange
    /// on it must end by `deadline`.
    pub fn open_in(ns: &Netns, deadline: Deadline) -> Result<RouteSocket, NetlinkError> {
        let fd = ns.socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE)?;
        let fd = fd.map_err(|source| NetlinkError::Io { what: "open a netlink socket", source })?;
        Ok(RouteSocket { fd, seq: 0, deadline })
    }

    /// Lets the next send (`SO_SNDTIMEO`) or receive (`SO_RCVTIMEO`) wait at most what is left
    /// of the deadline.
    fn bound(&self, option: libc::c_int, what: &'static str) -> Result<(), NetlinkError> {
        let left = self.deadline.remaining();
        if left.is_zero() {
            return Err(NetlinkError::TimedOut { what, budget: self.deadline.budget() });
        }
        // A zero timeout means "wait forever": never ask for less than a microsecond.
        let left = Some(left.max(Duration::from_micros(1)));
        let sock = socket2::SockRef::from(&self.fd);
        let set = if option == libc::SO_SNDTIMEO { sock.set_write_timeout(left) } else { sock.set_read_timeout(left) };
        set.map_err(|source| NetlinkError::Io { what: "set a netlink timeout", source })
    }

    /// A failed send or receive: a timeout when the socket gave up waiting.
    fn failed(&self, what: &'static str, source: io::Error) -> NetlinkError {
        match source.raw_os_error() {
            Some(libc::EAGAIN) => NetlinkError::TimedOut { what, budget: self.deadline.budget() },
            _ => NetlinkError::Io { what, source },
        }
    }

    /// Every IPv6 address in the namespace, with its interface index.
    pub fn ipv6_addresses(&mut self) -> Result<Vec<(u32, Ipv6Addr)>, NetlinkError> {
        const WHAT: &str = "list IPv6 addresses";
        let msg = self.message(libc::RTM_GETADDR, libc::NLM_F_REQUEST | libc::NLM_F_DUMP, 0, None);
        self.send(&msg, WHAT)?;
        let mut found = Vec::new();
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = self.recv(&mut buf, WHAT)?;
            for (kind, payload) in messages(&buf[..n]).ok_or(NetlinkError::Malformed { what: WHAT })? {
                match kind {
                    NLMSG_DONE => return Ok(found),
                    NLMSG_ERROR => {
                        ack_error(payload, WHAT)?;
                        return Err(NetlinkError::Malformed { what: WHAT });
                    }
                    libc::RTM_NEWADDR => found.extend(parse_address(payload)),
                    _ => {}
                }
            }
        }
    }

    /// Adds `addr/128` to `lo`. `Ok(true)` when we added it, `Ok(false)` when it was already there.
    pub fn add_loopback_address(&mut self, addr: Ipv6Addr) -> Result<bool, NetlinkError> {
        const WHAT: &str = "add an address to lo";
        let flags = libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL;
        let msg = self.message(libc::RTM_NEWADDR, flags, LOOPBACK_IFINDEX, Some(addr));
        match self.request(&msg, WHAT) {
            Ok(()) => Ok(true),
            Err(NetlinkError::Io { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Removes `addr/128` from `lo`. `Ok(true)` when we removed it, `Ok(false)` when it was not there.
    pub fn del_loopback_address(&mut self, addr: Ipv6Addr) -> Result<bool, NetlinkError> {
        const WHAT: &str = "remove an address from lo";
        let msg = self.message(libc::RTM_DELADDR, libc::NLM_F_REQUEST | libc::NLM_F_ACK, LOOPBACK_IFINDEX, Some(addr));
        match self.request(&msg, WHAT) {
            Ok(()) => Ok(true),
            Err(NetlinkError::Io { source, .. })
                if matches!(source.raw_os_error(), Some(libc::EADDRNOTAVAIL | libc::ENOENT | libc::ENODEV)) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// An `nlmsghdr` + `ifaddrmsg` (+ the address as `IFA_LOCAL` and `IFA_ADDRESS`).
    fn message(&mut self, kind: u16, flags: libc::c_int, ifindex: u32, addr: Option<Ipv6Addr>) -> Vec<u8> {
        self.seq += 1;
        let mut m = Vec::with_capacity(64);
        m.extend_from_slice(&[0; 4]); // length, filled in below
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&(flags as u16).to_ne_bytes());
        m.extend_from_slice(&self.seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills in ours
        // ifaddrmsg: family, prefix length, flags, scope, interface index.
        m.extend_from_slice(&[libc::AF_INET6 as u8, if addr.is_some() { 128 } else { 0 }, 0, libc::RT_SCOPE_UNIVERSE]);
        m.extend_from_slice(&ifindex.to_ne_bytes());
        if let Some(a) = addr {
            for attr in [libc::IFA_LOCAL, libc::IFA_ADDRESS] {
                m.extend_from_slice(&(4u16 + 16).to_ne_bytes());
                m.extend_from_slice(&attr.to_ne_bytes());
                m.extend_from_slice(&a.octets());
            }
        }
        let len = m.len() as u32;
        m[..4].copy_from_slice(&len.to_ne_bytes());
        m
    }

    /// Sends a request that asks for an acknowledgement and reads it.
    fn request(&mut self, msg: &[u8], what: &'static str) -> Result<(), NetlinkError> {
        self.send(msg, what)?;
        let mut buf = vec![0u8; 8 * 1024];
        loop {
            let n = self.recv(&mut buf, what)?;
            for (kind, payload) in messages(&buf[..n]).ok_or(NetlinkError::Malformed { what })? {
                if kind == NLMSG_ERROR {
                    return ack_error(payload, what);
                }
            }
        }
    }

    fn send(&self, msg: &[u8], what: &'static str) -> Result<(), NetlinkError> {
        self.bound(libc::SO_SNDTIMEO, what)?;
        // Safety: an all-zero sockaddr_nl is valid; it addresses the kernel (port id 0).
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // Safety: `msg` and `kernel` are valid for the lengths passed; the descriptor is open.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(self.failed(what, io::Error::last_os_error()));
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8], what: &'static str) -> Result<usize, NetlinkError> {
        self.bound(libc::SO_RCVTIMEO, what)?;
        // Safety: `buf` is valid for writes of its length; the descriptor is open.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(self.failed(what, io::Error::last_os_error()));
        }
        Ok(n as usize)
    }
}

/// Splits a datagram into (message type, payload) pairs, or `None` if a length is inconsistent.
fn messages(mut buf: &[u8]) -> Option<Vec<(u16, &[u8])>> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(buf[..4].try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(buf[4..6].try_into().ok()?);
        if len < NLMSG_HDRLEN || len > buf.len() {
            return None;
        }
        out.push((kind, &buf[NLMSG_HDRLEN..len]));
        buf = &buf[align(len).min(buf.len())..];
    }
    Some(out)
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// An `NLMSG_ERROR` payload: errno 0 is the acknowledgement of success.
fn ack_error(payload: &[u8], what: &'static str) -> Result<(), NetlinkError> {
    let errno = payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(i32::from_ne_bytes)
        .ok_or(NetlinkError::Malformed { what })?;
    match errno {
        0 => Ok(()),
        e => Err(NetlinkError::Io { what, source: io::Error::from_raw_os_error(-e) }),
    }
}

/// An `RTM_NEWADDR` payload → (interface index, IPv6 address), if it is an IPv6 one.
fn parse_address(payload: &[u8]) -> Option<(u32, Ipv6Addr)> {
    if payload.len() < IFADDRMSG_LEN || payload[0] != libc::AF_INET6 as u8 {
        return None;
    }
    let ifindex = u32::from_ne_bytes(payload[4..8].try_into().ok()?);
    let mut attrs = &payload[IFADDRMSG_LEN..];
    let mut found = None;
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes(attrs[..2].try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(attrs[2..4].try_into().ok()?);
        if len < 4 || len > attrs.len() {
            return None;
        }
        if (kind == libc::IFA_ADDRESS || kind == libc::IFA_LOCAL) && len == 4 + 16 {
            let octets: [u8; 16] = attrs[4..20].try_into().ok()?;
            found = found.or(Some(Ipv6Addr::from(octets)));
        }
        attrs = &attrs[align(len).min(attrs.len())..];
    }
    found.map(|a| (ifindex, a))
}

/// A redirect made ready for a pod's namespace: its IPv6 pass decided from what the namespace has,
/// and the loopback address that pass needs, to be added once the rules are in place.
#[derive(Debug)]
pub struct Prepared {
    pub redirect: Redirect,
    /// The socket that read the namespace's addresses, kept for adding the address.
    sock: Option<RouteSocket>,
}

/// Decides the IPv6 pass, reading the namespace's addresses; changes nothing. Costs nothing (no
/// socket) for redirects that do not depend on the namespace.
pub fn prepare(ns: &Netns, redirect: Redirect, deadline: Deadline) -> Result<Prepared, NetlinkError> {
    if !redirect.ipv6_follows_netns() {
        return Ok(Prepared { redirect, sock: None });
    }
    let mut sock = RouteSocket::open_in(ns, deadline)?;
    Ok(Prepared { redirect: resolve_ipv6(&mut sock, redirect)?, sock: Some(sock) })
}

/// Does the namespace have any IPv6 address besides `::1`? (Link-local ones count: traffic to
/// link-local peers would bypass a proxy as well as any other.)
pub fn has_ipv6(ns: &Netns, deadline: Deadline) -> Result<bool, NetlinkError> {
    let mut sock = RouteSocket::open_in(ns, deadline)?;
    Ok(sock.ipv6_addresses()?.iter().any(|(_, a)| *a != Ipv6Addr::LOCALHOST))
}

impl Prepared {
    /// Adds the loopback address the IPv6 pass needs (Kuma's `::6`), if any, after the rules are
    /// installed: an ADD killed before this point leaves rules, which DEL removes together with
    /// the address, never an address without the rules that account for it.
    pub fn add_address(&mut self, ns: &Netns, deadline: Deadline) -> Result<(), NetlinkError> {
        let Some(addr) = self.redirect.ipv6_passthrough_address() else { return Ok(()) };
        let sock = match &mut self.sock {
            Some(sock) => sock,
            None => self.sock.insert(RouteSocket::open_in(ns, deadline)?),
        };
        if sock.add_loopback_address(addr)? {
            log::debug!("added {addr}/128 to lo");
        } else {
            log::debug!("{addr}/128 is already on lo");
        }
        Ok(())
    }
}

/// CHECK's view: the redirect with its IPv6 pass decided as ADD decided it, and the differences
/// in the namespace's addresses (a missing `::6`), as CHECK mismatch lines.
pub fn inspect(ns: &Netns, redirect: Redirect, deadline: Deadline) -> Result<(Redirect, Vec<String>), NetlinkError> {
    if !redirect.ipv6_follows_netns() && redirect.ipv6_passthrough_address().is_none() {
        return Ok((redirect, Vec::new()));
    }
    let mut sock = RouteSocket::open_in(ns, deadline)?;
    let redirect = resolve_ipv6(&mut sock, redirect)?;
    let mut diffs = Vec::new();
    if let Some(addr) = redirect.ipv6_passthrough_address() {
        let present = sock.ipv6_addresses()?.contains(&(LOOPBACK_IFINDEX, addr));
        if !present {
            diffs.push(format!("missing address {addr}/128 on lo"));
        }
    }
    Ok((redirect, diffs))
}

/// Removes Kuma's loopback address when DEL removed a Kuma IPv6 pass of ours (it exists only for
/// that pass; nothing else of the pod's is touched). Any of Kuma's four IPv6 chains tells: one
/// deleted by hand (an operator, another program) must not keep the address for good.
pub fn release(ns: &Netns, removed: &Removed, deadline: Deadline) -> Result<(), NetlinkError> {
    use crate::core::rules::kuma::{INBOUND, INBOUND_REDIRECT, OUTBOUND, OUTBOUND_REDIRECT};
    if ![INBOUND, OUTBOUND, INBOUND_REDIRECT, OUTBOUND_REDIRECT].iter().any(|c| removed.had_chain(Family::V6, c.0)) {
        return Ok(());
    }
    if RouteSocket::open_in(ns, deadline)?.del_loopback_address(KUMA_INBOUND_PASSTHROUGH_V6)? {
        log::debug!("removed {KUMA_INBOUND_PASSTHROUGH_V6}/128 from lo");
    }
    Ok(())
}

/// Turns the IPv6 pass on when the redirect follows the namespace and the namespace has any IPv6
/// address besides `::1` (Kuma counts link-local ones).
fn resolve_ipv6(sock: &mut RouteSocket, redirect: Redirect) -> Result<Redirect, NetlinkError> {
    if !redirect.ipv6_follows_netns() {
        return Ok(redirect);
    }
    let has_ipv6 = sock.ipv6_addresses()?.iter().any(|(_, a)| *a != Ipv6Addr::LOCALHOST);
    if has_ipv6 {
        log::debug!("the pod's namespace has IPv6: adding the IPv6 pass");
        Ok(redirect.with_ipv6())
    } else {
        log::debug!("the pod's namespace has no IPv6 address: IPv4 pass only");
        Ok(redirect)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_kernel_sends() {
        // Two messages in one datagram: an address on interface 2, then the end of the dump.
        let mut sock_msg = Vec::new();
        let mut addr = vec![libc::AF_INET6 as u8, 64, 0, 0];
        addr.extend_from_slice(&2u32.to_ne_bytes());
        addr.extend_from_slice(&20u16.to_ne_bytes());
        addr.extend_from_slice(&libc::IFA_ADDRESS.to_ne_bytes());
        addr.extend_from_slice(&"fe80::1".parse::<Ipv6Addr>().unwrap().octets());
        for (kind, payload) in [(libc::RTM_NEWADDR, addr.as_slice()), (NLMSG_DONE, &[0u8; 4][..])] {
            sock_msg.extend_from_slice(&((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
            sock_msg.extend_from_slice(&kind.to_ne_bytes());
            sock_msg.extend_from_slice(&[0; 10]);
            sock_msg.extend_from_slice(payload);
        }
        let msgs = messages(&sock_msg).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(parse_address(msgs[0].1), Some((2, "fe80::1".parse().unwrap())));
        assert_eq!(msgs[1].0, NLMSG_DONE);
        assert!(messages(&sock_msg[..20]).is_none(), "a truncated message is refused");
    }

    #[test]
    fn a_kernel_that_does_not_answer_times_out() {
        // Nothing was asked, so nothing will come: the receive must end at the deadline.
        let ns = Netns::current().unwrap();
        let sock = RouteSocket::open_in(&ns, Deadline::after(Duration::from_millis(200))).unwrap();
        let t = std::time::Instant::now();
        let e = sock.recv(&mut [0u8; 64], "wait for nothing").unwrap_err();
        assert!(matches!(e, NetlinkError::TimedOut { budget, .. } if budget == Duration::from_millis(200)), "{e:?}");
        assert!(t.elapsed() >= Duration::from_millis(150) && t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert!(e.to_string().contains("no answer from the kernel within 200 ms"), "{e}");
        // Once the deadline has passed, nothing waits at all.
        let t = std::time::Instant::now();
        assert!(matches!(sock.recv(&mut [0u8; 64], "x"), Err(NetlinkError::TimedOut { .. })));
        assert!(t.elapsed() < Duration::from_millis(50));
    }

    #[test]
    fn acknowledgements_carry_errno() {
        assert!(ack_error(&0i32.to_ne_bytes(), "x").is_ok());
        let e = ack_error(&(-libc::EEXIST).to_ne_bytes(), "x").unwrap_err();
        assert!(matches!(e, NetlinkError::Io { ref source, .. } if source.raw_os_error() == Some(libc::EEXIST)));
    }
}

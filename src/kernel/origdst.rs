//! The destination a redirected TCP connection was originally sent to.
//!
//! After a nat REDIRECT or DNAT, the accepted socket's local address is the proxy's; the kernel
//! keeps the address the client dialled and hands it out through `SO_ORIGINAL_DST` (IPv4) and
//! `IP6T_SO_ORIGINAL_DST` (IPv6, the same option number at the IPv6 level). Proxies, `validate`,
//! and the tests all read it through [`original_dst`].

use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;

/// `SO_ORIGINAL_DST` and `IP6T_SO_ORIGINAL_DST` (linux/netfilter_ipv4.h, netfilter_ipv6/ip6_tables.h).
const SO_ORIGINAL_DST: libc::c_int = 80;

/// The original destination of an accepted connection. Fails with `ENOENT` when the connection was
/// not translated (no conntrack NAT entry).
pub fn original_dst(conn: &TcpStream) -> io::Result<SocketAddr> {
    let level = match conn.local_addr()? {
        SocketAddr::V4(_) => libc::SOL_IP,
        SocketAddr::V6(_) => libc::SOL_IPV6,
    };
    // Safety: an all-zero sockaddr_storage is valid; getsockopt writes at most `len` bytes into it.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // Safety: the descriptor is open for the call; the pointers refer to `ss` and `len` above.
    let rc = unsafe { libc::getsockopt(conn.as_raw_fd(), level, SO_ORIGINAL_DST, (&raw mut ss).cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    match libc::c_int::from(ss.ss_family) {
        libc::AF_INET => {
            // Safety: the kernel filled an AF_INET address, which fits in sockaddr_storage.
            let sin = unsafe { &*(&raw const ss).cast::<libc::sockaddr_in>() };
            let ip = IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes());
            Ok(SocketAddr::new(ip, u16::from_be(sin.sin_port)))
        }
        libc::AF_INET6 => {
            // Safety: the kernel filled an AF_INET6 address, which fits in sockaddr_storage.
            let sin6 = unsafe { &*(&raw const ss).cast::<libc::sockaddr_in6>() };
            Ok(SocketAddr::new(IpAddr::from(sin6.sin6_addr.s6_addr), u16::from_be(sin6.sin6_port)))
        }
        f => Err(io::Error::new(io::ErrorKind::InvalidData, format!("unexpected address family {f}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn an_untranslated_connection_has_no_original_destination() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        assert_eq!(original_dst(&s).unwrap_err().raw_os_error(), Some(libc::ENOENT));
    }
}

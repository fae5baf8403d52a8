//! The SSH guard: `tproxy-cni redirect` refuses to capture SSH sessions in the namespace it
//! changes, unless told otherwise.
//!
//! Why a session is at risk: nat rules only see connections that conntrack has not seen before. A
//! host that never used NAT tracks nothing, so once our rules load, the next packet of a running
//! SSH session looks new and is sent to the proxy's inbound port, which resets it. Whatever
//! conntrack knew, every new login is sent to the proxy for as long as the rules stay.
//!
//! The signals, both read without changing anything:
//! - the namespace's TCP connection tables (`/proc/net/tcp` and `tcp6`, as the target namespace
//!   sees them): every established connection whose local port is an SSH port and whose peer is
//!   not a loopback address is a session (loopback traffic never crosses `PREROUTING`);
//! - `SSH_CONNECTION`, which sshd sets for the session the command runs in (read once, at the
//!   command line's edge): its server port counts as an SSH port besides 22, and the session it
//!   names is called "your session" in the message. A session that is not in the target
//!   namespace's tables cannot be cut by rules there and is ignored.
//!
//! A session is at risk when the redirect would capture new inbound TCP from its client to its
//! port; excluding the port (or, for Kuma, the client's address) makes it safe.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::core::redirect::{Family, Redirect};

/// The port sshd listens on unless configured otherwise.
pub const SSH_PORT: u16 = 22;

/// The state of a socket in the connection table, as far as the guard cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Established,
    Listen,
    Other,
}

/// One line of `/proc/net/tcp` or `tcp6`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Socket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: State,
}

/// Parses a connection table. Lines that do not parse are skipped: the format has been stable
/// since Linux 2.6, and the guard only needs the addresses and the state.
pub fn parse_tcp_table(text: &str) -> Vec<Socket> {
    text.lines().skip(1).filter_map(parse_tcp_line).collect()
}

fn parse_tcp_line(line: &str) -> Option<Socket> {
    let mut fields = line.split_whitespace().skip(1);
    let local = hex_socket(fields.next()?)?;
    let remote = hex_socket(fields.next()?)?;
    let state = match fields.next()? {
        "01" => State::Established,
        "0A" => State::Listen,
        _ => State::Other,
    };
    Some(Socket { local, remote, state })
}

/// `0100007F:0016` or `00000000000000000000000001000000:0016`: the address as the kernel's 32-bit
/// words printed in hex in host byte order, then the port.
fn hex_socket(s: &str) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| addr.get(i * 8..i * 8 + 8).and_then(|h| u32::from_str_radix(h, 16).ok());
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?.to_ne_bytes())),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip.to_canonical(), port))
}

/// The session sshd describes in `SSH_CONNECTION`: `CLIENT_IP CLIENT_PORT SERVER_IP SERVER_PORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SshConnection {
    pub client: SocketAddr,
    pub server: SocketAddr,
}

impl SshConnection {
    /// Parses the variable's value; `None` when it is not what sshd writes (it is then ignored:
    /// the connection tables are the guard's main signal).
    pub fn parse(s: &str) -> Option<SshConnection> {
        let f: Vec<&str> = s.split_whitespace().collect();
        let [client_ip, client_port, server_ip, server_port] = f.as_slice() else { return None };
        let ip = |s: &str| s.split('%').next()?.parse::<IpAddr>().ok().map(|ip| ip.to_canonical());
        Some(SshConnection {
            client: SocketAddr::new(ip(client_ip)?, client_port.parse().ok()?),
            server: SocketAddr::new(ip(server_ip)?, server_port.parse().ok()?),
        })
    }
}

/// An SSH session found in the target namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    pub client: SocketAddr,
    pub server: SocketAddr,
    /// It is the session this command runs in (`SSH_CONNECTION`).
    pub yours: bool,
}

impl fmt::Display for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whose = if self.yours { "your SSH session" } else { "the SSH session" };
        write!(f, "{whose} {} -> {}", self.client, self.server)
    }
}

/// The ports treated as SSH ports: 22, and the server port of `SSH_CONNECTION`.
pub fn ssh_ports(current: Option<&SshConnection>) -> Vec<u16> {
    let mut ports = vec![SSH_PORT];
    ports.extend(current.map(|c| c.server.port()).filter(|p| *p != SSH_PORT));
    ports
}

/// The SSH sessions in a namespace's connection tables.
pub fn sessions(sockets: &[Socket], current: Option<&SshConnection>) -> Vec<Session> {
    let ports = ssh_ports(current);
    sockets
        .iter()
        .filter(|s| s.state == State::Established && ports.contains(&s.local.port()))
        .filter(|s| !s.remote.ip().is_loopback())
        .map(|s| Session {
            client: s.remote,
            server: s.local,
            yours: current.is_some_and(|c| c.client == s.remote && c.server == s.local),
        })
        .collect()
}

/// The SSH ports something listens on, beyond loopback.
pub fn listening_ssh_ports(sockets: &[Socket], current: Option<&SshConnection>) -> Vec<u16> {
    let ports = ssh_ports(current);
    let mut found: Vec<u16> = sockets
        .iter()
        .filter(|s| s.state == State::Listen && ports.contains(&s.local.port()) && !s.local.ip().is_loopback())
        .map(|s| s.local.port())
        .collect();
    found.sort_unstable();
    found.dedup();
    found
}

/// Would `redirect` send new inbound TCP from `client` to local `port` to the proxy?
pub fn captures_inbound(redirect: &Redirect, client: IpAddr, port: u16) -> bool {
    let family = Family::of(client.to_canonical());
    if !redirect.families().iter().any(|f| f == family) {
        return false;
    }
    match redirect {
        // Every inbound TCP connection except to an excluded port (no source exclusions).
        Redirect::Consul(c) => !c.exclude_inbound_ports.iter().any(|r| r.contains(port)),
        // Nothing with inbound off (gateway mode); otherwise not from an excluded source, and only
        // the included ports when there are any, else every port but the excluded ones.
        Redirect::Kuma(k) => k.inbound.as_ref().is_some_and(|inbound| {
            let client = client.to_canonical();
            if inbound.exclude_cidrs.of(family).iter().any(|net| net.contains(&client)) {
                return false;
            }
            if !inbound.include_ports.is_empty() {
                return inbound.include_ports.iter().any(|p| p.get() == port);
            }
            !inbound.exclude_ports.iter().any(|p| p.get() == port)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::mesh::consul::Settings;
    use crate::core::mesh::{PodNetwork, consul};
    use crate::core::redirect::{Port, parse_port_range};

    // Captured from a Debian 12 VM: sshd on 0.0.0.0:22 and [::]:22, one session over IPv4 from
    // 192.168.122.1, one over IPv6 from fd00::1, one local (loopback) session, a web listener.
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 17364 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 20001 1 0000000000000000 100 0 0 10 0
   2: 0A7AA8C0:0016 017AA8C0:C35A 01 00000000:00000000 02:00091D56 00000000     0        0 21511 4 0000000000000000 20 4 29 10 -1
   3: 0100007F:0016 0100007F:B0C4 01 00000000:00000000 02:0009C8C1 00000000     0        0 22210 2 0000000000000000 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 17366 1 0000000000000000 100 0 0 10 0
   1: 000000FD000000000000000002000000:0016 000000FD000000000000000001000000:D9B2 01 00000000:00000000 02:000A1F8C 00000000     0        0 23012 2 0000000000000000 20 4 31 10 -1
";

    fn table() -> Vec<Socket> {
        let mut t = parse_tcp_table(TCP);
        t.extend(parse_tcp_table(TCP6));
        t
    }

    fn consul(exclude_inbound: &[&str], ipv6: bool) -> Redirect {
        let settings = Settings {
            proxy_uid: Some(5995),
            inbound_port: Port::new(20000),
            exclude_inbound_ports: exclude_inbound.iter().map(|p| parse_port_range(p, "p").unwrap()).collect(),
            ..Settings::default()
        };
        crate::core::mesh::consul_host(settings, &consul::Spelling::JSON, PodNetwork { has_ipv6: ipv6 }).unwrap()
    }

    #[test]
    fn reads_the_kernels_connection_tables() {
        let t = table();
        assert_eq!(t.len(), 6);
        assert_eq!(t[2].local, "192.168.122.10:22".parse().unwrap());
        assert_eq!(t[2].remote, "192.168.122.1:50010".parse().unwrap());
        assert_eq!(t[2].state, State::Established);
        assert_eq!(t[5].local, "[fd00::2]:22".parse().unwrap());
        assert_eq!(t[4].state, State::Listen);
    }

    #[test]
    fn sessions_are_established_connections_to_an_ssh_port_from_off_the_host() {
        let found = sessions(&table(), None);
        let clients: Vec<String> = found.iter().map(|s| s.client.to_string()).collect();
        assert_eq!(clients, ["192.168.122.1:50010", "[fd00::1]:55730"], "the loopback session is not at risk");
        assert!(found.iter().all(|s| !s.yours));
        assert_eq!(listening_ssh_ports(&table(), None), [22]);
    }

    #[test]
    fn ssh_connection_names_your_session_and_its_port() {
        let yours = SshConnection::parse("192.168.122.1 50010 192.168.122.10 22").unwrap();
        let found = sessions(&table(), Some(&yours));
        assert!(found[0].yours && !found[1].yours);
        assert_eq!(found[0].to_string(), "your SSH session 192.168.122.1:50010 -> 192.168.122.10:22");
        // sshd on another port: that port counts too.
        let other = SshConnection::parse("fe80::1%eth0 40000 ::ffff:10.0.0.5 8022").unwrap();
        assert_eq!(other.client, "[fe80::1]:40000".parse().unwrap());
        assert_eq!(other.server, "10.0.0.5:8022".parse().unwrap());
        assert_eq!(ssh_ports(Some(&other)), [22, 8022]);
        assert_eq!(SshConnection::parse("garbage"), None);
    }

    fn kuma(yaml: &str) -> Redirect {
        crate::core::mesh::kuma_host(Some(yaml), &Default::default(), PodNetwork { has_ipv6: true }).unwrap()
    }

    #[test]
    fn kuma_exclusions_by_port_source_or_allow_list_and_gateway_mode_are_safe() {
        let client: IpAddr = "192.168.122.1".parse().unwrap();
        assert!(captures_inbound(&kuma("{}"), client, 22));
        assert!(!captures_inbound(&kuma("redirect: {inbound: {excludePorts: [22]}}"), client, 22));
        assert!(!captures_inbound(&kuma("redirect: {inbound: {excludePortsForIPs: [192.168.122.0/24]}}"), client, 22));
        assert!(captures_inbound(&kuma("redirect: {inbound: {excludePortsForIPs: [10.0.0.0/8]}}"), client, 22));
        assert!(!captures_inbound(&kuma("redirect: {inbound: {includePorts: [8080]}}"), client, 22));
        assert!(captures_inbound(&kuma("redirect: {inbound: {includePorts: [22]}}"), client, 22));
        assert!(!captures_inbound(&kuma("redirect: {inbound: {enabled: false}}"), client, 22), "gateway mode");
        assert!(!captures_inbound(&kuma("ipFamilyMode: ipv4"), "fd00::1".parse().unwrap(), 22));
    }

    #[test]
    fn an_excluded_port_or_a_family_without_a_pass_is_safe() {
        let v4: IpAddr = "192.168.122.1".parse().unwrap();
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert!(captures_inbound(&consul(&[], true), v4, 22));
        assert!(captures_inbound(&consul(&[], true), v6, 22));
        assert!(!captures_inbound(&consul(&["22"], true), v4, 22));
        assert!(!captures_inbound(&consul(&["20:30"], true), v6, 22));
        assert!(captures_inbound(&consul(&["2222"], true), v4, 22));
        assert!(!captures_inbound(&consul(&[], false), v6, 22), "no IPv6 pass: IPv6 sessions are untouched");
    }
}

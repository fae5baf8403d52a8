//! The `Redirect`: a typed, validated description of what a pod's traffic redirection must do.
//!
//! Dialects (`mesh::*`) build it from annotations, the host command builds it from flags; the rule
//! builders (`rules::*`) turn it into rules. Everything here is a number, an address or a closed
//! enum: no text from an annotation survives into a `Redirect`, so none can reach a rule.
//!
//! Each mesh lays its chains out differently (names, order, which tables), so the model is one
//! variant per mesh, each holding exactly the knobs that mesh has: an invalid combination cannot be
//! represented, and the rule builder for a mesh needs no "unsupported here" checks. A shared
//! "superset" struct would instead carry fields one mesh ignores (Consul has no conntrack zones,
//! Kuma no DNAT to a DNS IP) and every builder would have to reject or silently drop them.

use std::fmt;
use std::net::IpAddr;

use crate::text::Quoted;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use thiserror::Error;

/// What to install in a pod's network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redirect {
    Consul(ConsulRedirect),
    Kuma(KumaRedirect),
}

impl Redirect {
    /// Which address families get a pass.
    pub fn families(&self) -> Families {
        match self {
            Redirect::Consul(c) => c.families,
            Redirect::Kuma(k) => k.families,
        }
    }

    /// The mesh this redirect follows, for logs.
    pub fn mesh(&self) -> &'static str {
        match self {
            Redirect::Consul(_) => "consul",
            Redirect::Kuma(_) => "kuma",
        }
    }

    /// Does this redirect get an IPv6 pass as soon as the pod's namespace has any IPv6 address,
    /// even one the previous plugin did not report (Kuma's dual-stack mode counts eth0's
    /// link-local address)? Then the caller looks at the namespace and calls [`Redirect::with_ipv6`].
    pub fn ipv6_follows_netns(&self) -> bool {
        matches!(self, Redirect::Kuma(k) if k.dual_stack && !k.families.ipv6)
    }

    /// The same redirect with its IPv6 pass on.
    pub fn with_ipv6(mut self) -> Redirect {
        match &mut self {
            Redirect::Consul(c) => c.families.ipv6 = true,
            Redirect::Kuma(k) => k.families.ipv6 = true,
        }
        self
    }

    /// The address the proxy's IPv6 inbound passthrough uses as its source, which must exist on the
    /// pod's loopback for the IPv6 pass to work (Kuma: `::6`), when there is one.
    pub fn ipv6_passthrough_address(&self) -> Option<std::net::Ipv6Addr> {
        match self {
            Redirect::Kuma(k) if k.families.ipv6 => Some(KUMA_INBOUND_PASSTHROUGH_V6),
            _ => None,
        }
    }
}

/// An IP address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    /// The loopback host route of this family (`127.0.0.1/32`, `::1/128`).
    pub fn loopback(self) -> IpNet {
        match self {
            Family::V4 => IpNet::V4(Ipv4Net::new([127, 0, 0, 1].into(), 32).expect("valid prefix")),
            Family::V6 => IpNet::V6(Ipv6Net::new(std::net::Ipv6Addr::LOCALHOST, 128).expect("valid prefix")),
        }
    }

    pub fn of(addr: IpAddr) -> Family {
        if addr.is_ipv4() { Family::V4 } else { Family::V6 }
    }
}

/// The set of families a redirect applies to. IPv4 is always on: every pod has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Families {
    pub ipv6: bool,
}

impl Families {
    pub fn iter(self) -> impl Iterator<Item = Family> {
        Family::ALL.into_iter().filter(move |f| *f == Family::V4 || self.ipv6)
    }
}

/// A TCP/UDP port or an inclusive port range, as `--dport` takes it. Never contains port 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    first: u16,
    last: u16,
}

impl PortRange {
    /// Every port, `1:65535`.
    pub const ALL: PortRange = PortRange { first: 1, last: 65535 };

    pub fn single(port: Port) -> PortRange {
        PortRange { first: port.get(), last: port.get() }
    }

    /// How many of `-m multiport`'s 15 slots this takes: one for a port, two for a range.
    pub fn multiport_slots(self) -> usize {
        if self.first == self.last { 1 } else { 2 }
    }

    /// [`PortRange::single`] for constants.
    pub const fn single_const(port: Port) -> PortRange {
        PortRange { first: port.0.get(), last: port.0.get() }
    }

    /// The range `first..=last`, when it is one (`first` does not exceed `last`).
    pub fn new(first: Port, last: Port) -> Option<PortRange> {
        (first <= last).then_some(PortRange { first: first.get(), last: last.get() })
    }

    /// The first port of the range.
    pub fn first(self) -> u16 {
        self.first
    }

    /// The last port of the range (the first, for a single port).
    pub fn last(self) -> u16 {
        self.last
    }

    /// Is `port` in the range?
    pub fn contains(self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last { write!(f, "{}", self.first) } else { write!(f, "{}:{}", self.first, self.last) }
    }
}

/// A non-zero port number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Port(std::num::NonZeroU16);

impl Port {
    pub const fn new(n: u16) -> Option<Port> {
        match std::num::NonZeroU16::new(n) {
            Some(n) => Some(Port(n)),
            None => None,
        }
    }

    pub fn get(self) -> u16 {
        self.0.get()
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A user ID or an inclusive range of them, as `-m owner --uid-owner` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UidRange {
    first: u32,
    last: u32,
}

impl UidRange {
    pub fn single(uid: u32) -> UidRange {
        UidRange { first: uid, last: uid }
    }

    /// The range `first..=last`, when it is one: `first` does not exceed `last`, and neither is
    /// `u32::MAX` (the kernel's "no user").
    pub fn new(first: u32, last: u32) -> Option<UidRange> {
        (first <= last && last != u32::MAX).then_some(UidRange { first, last })
    }

    /// The first UID of the range.
    pub fn first(self) -> u32 {
        self.first
    }

    /// The last UID of the range (the first, for a single UID).
    pub fn last(self) -> u32 {
        self.last
    }
}

impl fmt::Display for UidRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last { write!(f, "{}", self.first) } else { write!(f, "{}-{}", self.first, self.last) }
    }
}

/// Networks split by family; host bits are cleared (`192.0.2.130/25` becomes `192.0.2.128/25`,
/// exactly what iptables stores), so rendered rules match what `iptables-save` prints back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cidrs {
    pub v4: Vec<Ipv4Net>,
    pub v6: Vec<Ipv6Net>,
}

impl Cidrs {
    pub fn push(&mut self, net: IpNet) {
        match net.trunc() {
            IpNet::V4(n) => self.v4.push(n),
            IpNet::V6(n) => self.v6.push(n),
        }
    }

    /// The networks of one family, as `IpNet`s.
    pub fn of(&self, family: Family) -> Vec<IpNet> {
        match family {
            Family::V4 => self.v4.iter().copied().map(IpNet::V4).collect(),
            Family::V6 => self.v6.iter().copied().map(IpNet::V6).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }
}

/// Consul's transparent proxy, as consul-k8s's webhook and `consul connect redirect-traffic` describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsulRedirect {
    pub proxy_uid: u32,
    pub inbound_port: Port,
    pub outbound_port: Port,
    pub exclude_inbound_ports: Vec<PortRange>,
    pub exclude_outbound_ports: Vec<PortRange>,
    pub exclude_outbound_cidrs: Cidrs,
    pub exclude_uids: Vec<UidRange>,
    pub dns: Option<ConsulDns>,
    /// Consul's dual-stack mode: DNS is served on `::1` and the IPv4 pass carries no DNS rules.
    pub dual_stack: bool,
    pub families: Families,
}

/// Where Consul DNS traffic goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsulDns {
    /// Port 53 traffic to `ip` is sent to `ip:port` (the dataplane's DNS proxy).
    /// `ip` is `None` when the config gave only a port: then it is the family's loopback address.
    Port { ip: Option<IpAddr>, port: Port },
    /// All port 53 traffic is sent to `ip`, port unchanged (a DNS service IP).
    All { ip: IpAddr },
}

/// Kuma's transparent proxy, as kuma-cni and `kumactl install transparent-proxy` describe it.
///
/// Everything Kuma's rule builder reads, typed. Knobs of Kuma's that only change how its
/// installer runs (retries, lock waits, executables, comment toggling) are not part of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KumaRedirect {
    /// The kuma-dp user: its traffic is never redirected outbound.
    pub proxy_uid: u32,
    /// Where `KUMA_MESH_INBOUND_REDIRECT` sends connections. The chain exists in gateway mode too:
    /// the proxy calling its own pod address is sent there.
    pub inbound_port: Port,
    /// Where `KUMA_MESH_OUTBOUND_REDIRECT` sends connections.
    pub outbound_port: Port,
    /// Inbound redirection; `None` when it is off (gateway mode, `redirect.inbound.enabled: false`).
    pub inbound: Option<KumaInbound>,
    /// Outbound redirection; `None` when it is off (`redirect.outbound.enabled: false`).
    pub outbound: Option<KumaOutbound>,
    /// Destinations never redirected outbound, any protocol (`RETURN` at the top of nat OUTPUT).
    pub exclude_outbound_cidrs: Cidrs,
    /// Per-UID outbound port exclusions (`RETURN` at the top of nat OUTPUT), one per protocol.
    pub exclude_outbound_ports_for_uids: Vec<UidPortExclusion>,
    /// DNS capture; `None` when it is off.
    pub dns: Option<KumaDns>,
    /// Drop packets conntrack finds invalid (mangle PREROUTING).
    pub drop_invalid_packets: bool,
    /// Log the packets entering nat OUTPUT and PREROUTING at this syslog level (0-7).
    pub log_level: Option<u8>,
    /// Kuma's `dualstack` IP family mode (the default); `false` is `ipv4`.
    pub dual_stack: bool,
    pub families: Families,
}

/// The source address of Kuma's IPv6 inbound passthrough (`127.0.0.6` is the IPv4 one).
pub const KUMA_INBOUND_PASSTHROUGH_V6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// Kuma's inbound redirection knobs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KumaInbound {
    /// Destination ports not redirected (ignored when `include_ports` is set, as Kuma does).
    pub exclude_ports: Vec<Port>,
    /// When not empty, only these destination ports are redirected.
    pub include_ports: Vec<Port>,
    /// Source networks not redirected.
    pub exclude_cidrs: Cidrs,
}

/// Kuma's outbound redirection knobs (the chain `KUMA_MESH_OUTBOUND`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KumaOutbound {
    /// Destination ports not redirected (ignored when `include_ports` is set, as Kuma does).
    pub exclude_ports: Vec<Port>,
    /// When not empty, only these destination ports are redirected.
    pub include_ports: Vec<Port>,
}

/// A transport protocol named by configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
}

/// Outbound traffic of some UIDs to some ports that is never redirected: one protocol of a
/// `[proto:][ports:]uids` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UidPortExclusion {
    pub transport: Transport,
    /// At most 15 port slots (a range takes two), the limit of `-m multiport`.
    pub ports: Vec<PortRange>,
    pub uids: UidRange,
}

/// Kuma's DNS capture: every UDP query to port 53 goes to kuma-dp's DNS proxy on `port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KumaDns {
    pub port: Port,
    /// Separate the proxy's and the application's DNS flows into conntrack zones (raw table).
    pub conntrack_zone_split: bool,
}

/// Why a value cannot become part of a `Redirect`. The value is quoted with escapes, so a newline or
/// an option smuggled into an annotation is visible in the message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ValueError {
    #[error("{what} {value} is not a number")]
    NotANumber { what: &'static str, value: Quoted },
    #[error("{what} {value} is out of range ({range})")]
    OutOfRange { what: &'static str, value: Quoted, range: &'static str },
    #[error("{what} {value} is not a valid range (first must not exceed last)")]
    BadRange { what: &'static str, value: Quoted },
    #[error("{what} {value} is not an IP address")]
    NotAnIp { what: &'static str, value: Quoted },
    #[error("{what} {value} is not a CIDR or IP address")]
    NotACidr { what: &'static str, value: Quoted },
    #[error("{what} has {count} entries, more than the limit of {limit}")]
    TooMany { what: &'static str, count: usize, limit: usize },
}

/// Parses a decimal number made only of ASCII digits: no sign, no spaces, no `0x`.
fn digits(s: &str, what: &'static str) -> Result<u64, ValueError> {
    if s.is_empty() || s.len() > 12 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ValueError::NotANumber { what, value: Quoted::new(s) });
    }
    Ok(s.parse().expect("at most 12 ASCII digits fit in u64"))
}

/// A port 1-65535 from its decimal text.
pub fn parse_port(s: &str, what: &'static str) -> Result<Port, ValueError> {
    port_from_number(digits(s, what)?, s, what)
}

/// A port 1-65535 from a JSON/YAML number.
pub fn port_from_number(n: u64, text: &str, what: &'static str) -> Result<Port, ValueError> {
    u16::try_from(n).ok().and_then(Port::new).ok_or_else(|| ValueError::OutOfRange {
        what,
        value: Quoted::new(text),
        range: "1-65535",
    })
}

/// A port or `first:last` range (iptables' syntax; `first-last` is accepted too).
pub fn parse_port_range(s: &str, what: &'static str) -> Result<PortRange, ValueError> {
    match s.split_once([':', '-']) {
        None => Ok(PortRange::single(parse_port(s, what)?)),
        Some((a, b)) => {
            let whole = |_| ValueError::NotANumber { what, value: Quoted::new(s) };
            let (first, last) = (parse_port(a, what).map_err(whole)?.get(), parse_port(b, what).map_err(whole)?.get());
            if first > last {
                return Err(ValueError::BadRange { what, value: Quoted::new(s) });
            }
            Ok(PortRange { first, last })
        }
    }
}

/// A user ID 0-4294967294 (`-1`, the kernel's "no user", is refused).
pub fn parse_uid(s: &str, what: &'static str) -> Result<u32, ValueError> {
    let n = digits(s, what)?;
    u32::try_from(n).ok().filter(|&n| n != u32::MAX).ok_or_else(|| ValueError::OutOfRange {
        what,
        value: Quoted::new(s),
        range: "0-4294967294",
    })
}

/// A UID or `first-last` range of UIDs.
pub fn parse_uid_range(s: &str, what: &'static str) -> Result<UidRange, ValueError> {
    match s.split_once('-') {
        None => Ok(UidRange::single(parse_uid(s, what)?)),
        Some((a, b)) => {
            let whole = |_| ValueError::NotANumber { what, value: Quoted::new(s) };
            let (first, last) = (parse_uid(a, what).map_err(whole)?, parse_uid(b, what).map_err(whole)?);
            if first > last {
                return Err(ValueError::BadRange { what, value: Quoted::new(s) });
            }
            Ok(UidRange { first, last })
        }
    }
}

/// An IP address, written plainly (no brackets, no zone).
pub fn parse_ip(s: &str, what: &'static str) -> Result<IpAddr, ValueError> {
    s.parse().map_err(|_| ValueError::NotAnIp { what, value: Quoted::new(s) })
}

/// A CIDR, or a bare address meaning a host route. Host bits are accepted, as iptables accepts them.
pub fn parse_cidr(s: &str, what: &'static str) -> Result<IpNet, ValueError> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| ValueError::NotACidr { what, value: Quoted::new(s) })
}

/// Splits a comma-separated annotation value, trimming spaces around entries and skipping empty
/// ones (`"80, 443,"` is `80`, `443`). Other whitespace, such as a newline, is kept and so refused.
pub fn split_list(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(|e| e.trim_matches(' ')).filter(|e| !e.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_strict_decimal_1_to_65535() {
        assert_eq!(parse_port("8080", "port").unwrap().get(), 8080);
        for bad in ["0", "65536", "-1", "+80", " 80", "80\n", "0x50", "", "80 -j ACCEPT", "99999999999999"] {
            assert!(parse_port(bad, "port").is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn port_ranges_use_iptables_syntax() {
        assert_eq!(parse_port_range("8000:9000", "p").unwrap().to_string(), "8000:9000");
        assert_eq!(parse_port_range("8000-9000", "p").unwrap().to_string(), "8000:9000");
        assert_eq!(parse_port_range("53", "p").unwrap().to_string(), "53");
        assert!(matches!(parse_port_range("9000:8000", "p"), Err(ValueError::BadRange { .. })));
        assert!(parse_port_range("1:2:3", "p").is_err());
        let r = parse_port_range("8000:9000", "p").unwrap();
        assert!(r.contains(8000) && r.contains(9000) && !r.contains(7999) && !r.contains(9001));
    }

    #[test]
    fn uids_are_numbers_or_ranges() {
        assert_eq!(parse_uid("5995", "uid").unwrap(), 5995);
        assert_eq!(parse_uid_range("1000-2000", "uid").unwrap().to_string(), "1000-2000");
        for bad in ["-1", "root", "4294967295", "5995 ", "1-", "2-1"] {
            assert!(parse_uid_range(bad, "uid").is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn cidrs_accept_bare_addresses_and_clear_host_bits_per_family() {
        let mut c = Cidrs::default();
        c.push(parse_cidr("192.0.2.130/25", "cidr").unwrap());
        c.push(parse_cidr("2001:db8::1", "cidr").unwrap());
        c.push(parse_cidr("198.51.100.7", "cidr").unwrap());
        assert_eq!(
            c.of(Family::V4).iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["192.0.2.128/25", "198.51.100.7/32"]
        );
        assert_eq!(c.of(Family::V6)[0].to_string(), "2001:db8::1/128");
        assert!(parse_cidr("10.0.0.0/33", "cidr").is_err());
        assert!(parse_cidr("10.0.0.0/8\n-A", "cidr").is_err());
    }

    #[test]
    fn lists_trim_spaces_but_not_newlines() {
        assert_eq!(split_list(" 80, 443,,").collect::<Vec<_>>(), ["80", "443"]);
        assert_eq!(split_list("80\n").collect::<Vec<_>>(), ["80\n"]);
    }
}

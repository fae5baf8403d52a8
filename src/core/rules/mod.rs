//! Rules as data: a [`RuleSet`] per address family, rendered to `iptables-restore` input.
//!
//! Pure functions, no I/O. A [`Rule`] has a fixed set of typed fields and renders them in the exact
//! order and spelling `iptables-save` prints them, so what we apply can be compared line by line with
//! what the kernel reports back (that is how CHECK works, and the golden tests pin it).
//!
//! Every rule carries an ownership comment (ours, or for Kuma's layout Kuma's comment prefix); every
//! chain we create has a name from a mesh's fixed set. Nothing here is built from text that came
//! from outside.
//!
//! A family's tables are committed by `iptables-restore` one at a time, in the order of
//! [`RuleSet::tables`]. Builders put first a table that creates chains of ours (`-N`): on a
//! namespace that already holds them, that first table fails and nothing at all is committed,
//! which is what lets a repeated ADD be told from a fresh one without reading the namespace.

pub mod consul;
pub mod kuma;
pub mod shape;

use std::fmt::{self, Write};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::core::redirect::{Family, Port, PortRange, Redirect, UidRange};

/// The comment every rule of Consul's layout carries; with our chain names it marks what we own.
pub const OWNER_COMMENT: &str = "tproxy-cni";

/// The prefix of the comment on every rule of Kuma's layout. It is Kuma's own, so `kumactl` and
/// Kuma's troubleshooting guides recognise the rules; what follows it is our own description.
pub const KUMA_COMMENT_PREFIX: &str = "kuma/mesh/transparent/proxy/";

/// The rules for one address family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSet {
    pub family: Family,
    /// In commit order; the first one creates chains of ours (see the module docs).
    pub tables: Vec<TableRules>,
}

/// The chains we create in one table, and every rule we add to it (in our chains or built-in ones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRules {
    pub table: Table,
    pub chains: Vec<Chain>,
    pub rules: Vec<Rule>,
}

/// A netfilter table we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Raw,
    Mangle,
    Nat,
}

impl Table {
    /// Every table we use, in the order a transaction commits them: nat (where our chains live,
    /// so it fails first on a namespace that already has them), then raw, then mangle.
    pub const COMMIT_ORDER: [Table; 3] = [Table::Nat, Table::Raw, Table::Mangle];

    pub fn name(self) -> &'static str {
        match self {
            Table::Raw => "raw",
            Table::Mangle => "mangle",
            Table::Nat => "nat",
        }
    }

    pub fn from_name(s: &str) -> Option<Table> {
        [Table::Raw, Table::Mangle, Table::Nat].into_iter().find(|t| t.name() == s)
    }
}

/// A chain name: a built-in chain or one from a mesh's fixed set, never text from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Chain(pub &'static str);

impl Chain {
    pub const PREROUTING: Chain = Chain("PREROUTING");
    pub const OUTPUT: Chain = Chain("OUTPUT");
}

/// A network interface name from a fixed set (the loopback), never text from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Interface(pub &'static str);

impl Interface {
    pub const LOOPBACK: Interface = Interface("lo");
}

/// A match that may be negated (`! -d …`, `! --uid-owner …`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cond<T> {
    Is(T),
    Not(T),
}

impl<T> Cond<T> {
    /// The `! ` that precedes a negated option, or nothing.
    fn bang(&self) -> &'static str {
        match self {
            Cond::Is(_) => "",
            Cond::Not(_) => "! ",
        }
    }

    fn value(&self) -> &T {
        match self {
            Cond::Is(v) | Cond::Not(v) => v,
        }
    }
}

/// Conntrack states we match (`-m conntrack --ctstate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtState {
    Invalid,
}

impl fmt::Display for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// A transport protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// What a rule does with a matching packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Jump(Chain),
    Return,
    Drop,
    /// `CT --zone N` (raw table): put the connection in conntrack zone N.
    CtZone(u16),
    /// `LOG` with a fixed prefix at a syslog level 0-7.
    Log {
        prefix: &'static str,
        level: u8,
    },
    /// REDIRECT to a local port.
    Redirect(Port),
    /// DNAT to an address, keeping the port.
    DnatAddr(IpAddr),
    /// DNAT to an address and port.
    DnatSocket(IpAddr, Port),
}

/// One rule. Unset fields match everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub chain: Chain,
    pub source: Option<IpNet>,
    pub destination: Option<Cond<IpNet>>,
    pub in_interface: Option<Interface>,
    pub out_interface: Option<Interface>,
    pub proto: Option<Proto>,
    pub sport: Option<PortRange>,
    pub dport: Option<Cond<PortRange>>,
    /// `-m multiport --dports`: up to 15 ports, a range counting as two.
    pub dports: Option<Vec<PortRange>>,
    pub uid_owner: Option<Cond<UidRange>>,
    pub ctstate: Option<CtState>,
    /// The ownership comment: [`OWNER_COMMENT`], or a Kuma comment (see [`crate::kuma_comment!`]).
    pub comment: &'static str,
    pub target: Target,
}

/// A Kuma rule comment: Kuma's prefix followed by our description, as one `&'static str`.
#[macro_export]
macro_rules! kuma_comment {
    ($text:literal) => {
        concat!("kuma/mesh/transparent/proxy/", $text)
    };
}

impl Rule {
    /// A rule in `chain` that matches everything and does `target`, with our ownership comment.
    pub fn new(chain: Chain, target: Target) -> Rule {
        Rule {
            chain,
            source: None,
            destination: None,
            in_interface: None,
            out_interface: None,
            proto: None,
            sport: None,
            dport: None,
            dports: None,
            uid_owner: None,
            ctstate: None,
            comment: OWNER_COMMENT,
            target,
        }
    }

    pub fn source(mut self, net: IpNet) -> Rule {
        self.source = Some(net);
        self
    }

    pub fn destination(mut self, net: IpNet) -> Rule {
        self.destination = Some(Cond::Is(net));
        self
    }

    pub fn not_destination(mut self, net: IpNet) -> Rule {
        self.destination = Some(Cond::Not(net));
        self
    }

    pub fn in_interface(mut self, iface: Interface) -> Rule {
        self.in_interface = Some(iface);
        self
    }

    pub fn out_interface(mut self, iface: Interface) -> Rule {
        self.out_interface = Some(iface);
        self
    }

    pub fn proto(mut self, proto: Proto) -> Rule {
        self.proto = Some(proto);
        self
    }

    /// Matches a source port; sets the protocol.
    pub fn sport(mut self, proto: Proto, ports: PortRange) -> Rule {
        self.proto = Some(proto);
        self.sport = Some(ports);
        self
    }

    /// Matches a destination port; sets the protocol.
    pub fn dport(mut self, proto: Proto, ports: PortRange) -> Rule {
        self.proto = Some(proto);
        self.dport = Some(Cond::Is(ports));
        self
    }

    /// Matches any destination port but `ports`; sets the protocol.
    pub fn not_dport(mut self, proto: Proto, ports: PortRange) -> Rule {
        self.proto = Some(proto);
        self.dport = Some(Cond::Not(ports));
        self
    }

    /// Matches a list of destination ports (`-m multiport`); sets the protocol.
    pub fn dports(mut self, proto: Proto, ports: Vec<PortRange>) -> Rule {
        self.proto = Some(proto);
        self.dports = Some(ports);
        self
    }

    pub fn uid_owner(mut self, uid: UidRange) -> Rule {
        self.uid_owner = Some(Cond::Is(uid));
        self
    }

    pub fn not_uid_owner(mut self, uid: UidRange) -> Rule {
        self.uid_owner = Some(Cond::Not(uid));
        self
    }

    pub fn ctstate(mut self, state: CtState) -> Rule {
        self.ctstate = Some(state);
        self
    }

    /// Replaces the ownership comment (Kuma's layout carries Kuma-prefixed comments).
    pub fn comment(mut self, comment: &'static str) -> Rule {
        self.comment = comment;
        self
    }

    /// The rule's specification after the chain name, as `iptables-save` prints it: addresses,
    /// interfaces and protocol first, then each match module in a fixed order, then the target.
    pub fn spec(&self) -> String {
        let mut s = String::new();
        if let Some(src) = self.source {
            write!(s, " -s {src}").unwrap();
        }
        if let Some(d) = &self.destination {
            write!(s, " {}-d {}", d.bang(), d.value()).unwrap();
        }
        if let Some(i) = self.in_interface {
            write!(s, " -i {}", i.0).unwrap();
        }
        if let Some(o) = self.out_interface {
            write!(s, " -o {}", o.0).unwrap();
        }
        if let Some(p) = self.proto {
            write!(s, " -p {}", p.name()).unwrap();
            if self.sport.is_some() || self.dport.is_some() {
                write!(s, " -m {}", p.name()).unwrap();
            }
            if let Some(ports) = self.sport {
                write!(s, " --sport {ports}").unwrap();
            }
            if let Some(d) = &self.dport {
                write!(s, " {}--dport {}", d.bang(), d.value()).unwrap();
            }
            if let Some(list) = &self.dports {
                let list: Vec<String> = list.iter().map(ToString::to_string).collect();
                write!(s, " -m multiport --dports {}", list.join(",")).unwrap();
            }
        }
        if let Some(uid) = &self.uid_owner {
            write!(s, " -m owner {}--uid-owner {}", uid.bang(), uid.value()).unwrap();
        }
        if let Some(CtState::Invalid) = self.ctstate {
            s.push_str(" -m conntrack --ctstate INVALID");
        }
        write!(s, " -m comment --comment {}", save_string(self.comment)).unwrap();
        match self.target {
            Target::Jump(c) => write!(s, " -j {c}"),
            Target::Return => write!(s, " -j RETURN"),
            Target::Drop => write!(s, " -j DROP"),
            Target::CtZone(zone) => write!(s, " -j CT --zone {zone}"),
            Target::Log { prefix, level } => {
                write!(s, " -j LOG --log-prefix {} --log-level {level}", save_string(prefix))
            }
            Target::Redirect(port) => write!(s, " -j REDIRECT --to-ports {port}"),
            Target::DnatAddr(ip) => write!(s, " -j DNAT --to-destination {ip}"),
            Target::DnatSocket(ip @ IpAddr::V4(_), port) => write!(s, " -j DNAT --to-destination {ip}:{port}"),
            Target::DnatSocket(ip @ IpAddr::V6(_), port) => write!(s, " -j DNAT --to-destination [{ip}]:{port}"),
        }
        .unwrap();
        s.remove(0);
        s
    }

    /// The `-A CHAIN spec` line.
    pub fn append_line(&self) -> String {
        format!("-A {} {}", self.chain, self.spec())
    }
}

/// A string argument as `iptables-save` prints it: bare when it is made of letters, digits, `_`
/// and `-` only, otherwise in double quotes with double quotes, backslashes and single quotes escaped.
fn save_string(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return s.to_owned();
    }
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        if matches!(c, '"' | '\\' | '\'') {
            q.push('\\');
        }
        q.push(c);
    }
    q.push('"');
    q
}

/// Builds the rule sets (one per family) a redirect needs.
pub fn build(redirect: &Redirect) -> Vec<RuleSet> {
    match redirect {
        Redirect::Consul(c) => redirect.families().iter().map(|f| consul::build(c, f)).collect(),
        Redirect::Kuma(k) => redirect.families().iter().map(|f| kuma::build(k, f)).collect(),
    }
}

/// The most rules any address family of `redirect` gets, over all its tables, counting the IPv6
/// pass even when it is not on yet (Kuma turns it on later if the namespace has IPv6).
pub fn most_rules_per_family(redirect: &Redirect) -> usize {
    build(&redirect.clone().with_ipv6()).iter().map(|s| s.tables.iter().map(|t| t.rules.len()).sum()).max().unwrap_or(0)
}

/// The transaction for a namespace that has none of our rules: create our chains with `-N` (so it
/// fails, changing nothing, if any of them already exists) and append every rule.
pub fn render_fresh(set: &RuleSet) -> String {
    debug_assert!(
        set.tables.first().is_none_or(|t| !t.chains.is_empty()),
        "the first table committed must create chains: it is what fails on a repeated ADD"
    );
    let mut out = String::new();
    for t in &set.tables {
        writeln!(out, "*{}", t.table.name()).unwrap();
        for c in &t.chains {
            writeln!(out, "-N {c}").unwrap();
        }
        for r in &t.rules {
            writeln!(out, "{}", r.append_line()).unwrap();
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// What `tproxy-cni render` prints: every family's fresh transaction, each under a `# family` line.
pub fn render_all(sets: &[RuleSet]) -> String {
    sets.iter().map(|s| format!("# {}\n{}", s.family.name(), render_fresh(s))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::redirect::{parse_port_range, parse_uid_range};

    #[test]
    fn rule_specs_are_in_iptables_save_order_and_spelling() {
        let r = Rule::new(Chain("X"), Target::Return)
            .destination("192.0.2.0/24".parse().unwrap())
            .dport(Proto::Tcp, parse_port_range("8000:9000", "p").unwrap())
            .uid_owner(parse_uid_range("10-20", "u").unwrap());
        assert_eq!(
            r.append_line(),
            "-A X -d 192.0.2.0/24 -p tcp -m tcp --dport 8000:9000 -m owner --uid-owner 10-20 -m comment --comment tproxy-cni -j RETURN"
        );
        let port = Port::new(8600).unwrap();
        let v6 = Rule::new(Chain("X"), Target::DnatSocket("::1".parse().unwrap(), port)).proto(Proto::Udp);
        assert_eq!(v6.spec(), "-p udp -m comment --comment tproxy-cni -j DNAT --to-destination [::1]:8600");
    }
}

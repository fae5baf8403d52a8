//! Rules as data: a [`RuleSet`] per address family, rendered to `iptables-restore` input.
//!
//! Pure functions, no I/O. A [`Rule`] has a fixed set of typed fields and renders them in the exact
//! order and spelling `iptables-save` prints them, so what we apply can be compared line by line with
//! what the kernel reports back (that is how CHECK works, and the golden tests pin it).
//!
//! Every rule carries our ownership comment; every chain we create has a name from a mesh's fixed
//! set. Nothing here is built from text that came from outside.

pub mod consul;

use std::fmt::{self, Write};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::redirect::{Family, Port, PortRange, Redirect, UidRange};

/// The comment every rule of ours carries; with our chain names it marks what we own.
pub const OWNER_COMMENT: &str = "tproxy-cni";

/// The rules for one address family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSet {
    pub family: Family,
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
    pub destination: Option<IpNet>,
    pub proto: Option<Proto>,
    pub dport: Option<PortRange>,
    pub uid_owner: Option<UidRange>,
    pub target: Target,
}

impl Rule {
    /// A rule in `chain` that matches everything and does `target`.
    pub fn new(chain: Chain, target: Target) -> Rule {
        Rule { chain, destination: None, proto: None, dport: None, uid_owner: None, target }
    }

    pub fn destination(mut self, net: IpNet) -> Rule {
        self.destination = Some(net);
        self
    }

    pub fn proto(mut self, proto: Proto) -> Rule {
        self.proto = Some(proto);
        self
    }

    /// Matches a destination port; the protocol must be set.
    pub fn dport(mut self, proto: Proto, ports: PortRange) -> Rule {
        self.proto = Some(proto);
        self.dport = Some(ports);
        self
    }

    pub fn uid_owner(mut self, uid: UidRange) -> Rule {
        self.uid_owner = Some(uid);
        self
    }

    /// The rule's specification after the chain name, as `iptables-save` prints it.
    pub fn spec(&self) -> String {
        let mut s = String::new();
        if let Some(d) = self.destination {
            write!(s, " -d {d}").unwrap();
        }
        if let Some(p) = self.proto {
            write!(s, " -p {}", p.name()).unwrap();
            if let Some(ports) = self.dport {
                write!(s, " -m {} --dport {ports}", p.name()).unwrap();
            }
        }
        if let Some(uid) = self.uid_owner {
            write!(s, " -m owner --uid-owner {uid}").unwrap();
        }
        write!(s, " -m comment --comment {OWNER_COMMENT}").unwrap();
        match self.target {
            Target::Jump(c) => write!(s, " -j {c}"),
            Target::Return => write!(s, " -j RETURN"),
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

/// Builds the rule sets (one per family) a redirect needs.
pub fn build(redirect: &Redirect) -> Vec<RuleSet> {
    match redirect {
        Redirect::Consul(c) => redirect.families().iter().map(|f| consul::build(c, f)).collect(),
    }
}

/// The transaction for a namespace that has none of our rules: create our chains with `-N` (so it
/// fails, changing nothing, if any of them already exists) and append every rule.
pub fn render_fresh(set: &RuleSet) -> String {
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
    use crate::redirect::{parse_port_range, parse_uid_range};

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

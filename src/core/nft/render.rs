//! A [`Ruleset`] in `nft -f` syntax: what `render --backend nftables` prints for people, and the
//! words CHECK uses to name a rule, a chain or a set.
//!
//! The text is a script `nft -f` accepts and that does exactly what the engine's batch does: each
//! family's table is created if missing, deleted with everything in it, and created anew, in one
//! transaction.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use super::{
    Action, Interval, Match, NftChain, NftRule, NftSet, NftTable, Ruleset, SetKey, TABLE, TABLE_COMMENT, nft_family,
};
use crate::core::redirect::{Family, PortRange, UidRange};
use crate::core::rules::{Cond, CtState, Proto};

/// The whole script: replaces our tables of every family in `families` with `rules`' (a family
/// of `families` without a table in `rules` loses ours).
pub fn script(rules: &Ruleset, families: &[Family]) -> String {
    let mut out = String::new();
    for f in families {
        let fam = nft_family(*f);
        writeln!(out, "add table {fam} {TABLE}\ndelete table {fam} {TABLE}").unwrap();
    }
    for t in &rules.tables {
        out.push_str(&table(t));
    }
    out
}

/// One table, as `nft list table` would print it (with our indentation).
pub fn table(t: &NftTable) -> String {
    let mut out = format!("table {} {TABLE} {{\n\tcomment \"{TABLE_COMMENT}\"\n", nft_family(t.family));
    for s in &t.sets {
        out.push_str(&set(s));
    }
    for c in &t.chains {
        out.push_str(&chain(c, t.family));
    }
    out.push_str("}\n");
    out
}

fn set(s: &NftSet) -> String {
    let elements: Vec<String> = s.intervals.iter().map(|i| interval(s.key, *i)).collect();
    format!(
        "\tset {} {{\n\t\ttype {}\n\t\tflags interval\n\t\telements = {{ {} }}\n\t}}\n",
        s.name,
        s.key.name(),
        elements.join(", ")
    )
}

fn chain(c: &NftChain, family: Family) -> String {
    let mut out = format!("\tchain {} {{\n", c.name);
    if let Some(h) = c.hook {
        writeln!(out, "\t\ttype {} hook {} priority {}; policy accept;", h.kind.name(), h.hook.name(), h.priority)
            .unwrap();
    }
    for r in &c.rules {
        writeln!(out, "\t\t{}", rule(r, family)).unwrap();
    }
    out.push_str("\t}\n");
    out
}

/// A rule in `nft` syntax.
pub fn rule(r: &NftRule, family: Family) -> String {
    let fam = nft_family(family);
    let proto = r.matches.iter().find_map(|m| match m {
        Match::L4Proto(p) => Some(proto_name(*p)),
        _ => None,
    });
    let has_port = r.matches.iter().any(|m| matches!(m, Match::Sport(_) | Match::Dport(_) | Match::DportIn(_)));
    let mut words: Vec<String> = Vec::new();
    for m in &r.matches {
        let p = proto.unwrap_or("th");
        words.push(match m {
            Match::L4Proto(_) if has_port => continue,
            Match::L4Proto(p) => format!("meta l4proto {}", proto_name(*p)),
            Match::Saddr(c) => format!("{fam} saddr {}{}", bang(c), net(value(c))),
            Match::Daddr(c) => format!("{fam} daddr {}{}", bang(c), net(value(c))),
            Match::SaddrIn(s) => format!("{fam} saddr @{s}"),
            Match::DaddrIn(s) => format!("{fam} daddr @{s}"),
            Match::Sport(c) => format!("{p} sport {}{}", bang(c), ports(*value(c))),
            Match::Dport(c) => format!("{p} dport {}{}", bang(c), ports(*value(c))),
            Match::DportIn(s) => format!("{p} dport @{s}"),
            Match::SkUid(c) => format!("meta skuid {}{}", bang(c), uids(*value(c))),
            Match::SkUidIn(s) => format!("meta skuid @{s}"),
            Match::IifName(i) => format!("iifname \"{}\"", i.0),
            Match::OifName(i) => format!("oifname \"{}\"", i.0),
            Match::CtState(CtState::Invalid) => "ct state invalid".to_owned(),
        });
    }
    words.push("counter".to_owned());
    words.push(action(&r.action));
    words.push(format!("comment \"{}\"", r.comment));
    words.join(" ")
}

fn action(a: &Action) -> String {
    match a {
        Action::Jump(c) => format!("jump {c}"),
        Action::Return => "return".to_owned(),
        Action::Drop => "drop".to_owned(),
        Action::CtZone(z) => format!("ct zone set {z}"),
        Action::Log { prefix, level } => format!("log prefix \"{prefix}\" level {}", log_level(*level)),
        Action::Redirect(p) => format!("redirect to :{p}"),
        Action::Dnat(IpAddr::V4(a), None) => format!("dnat to {a}"),
        Action::Dnat(IpAddr::V6(a), None) => format!("dnat to {a}"),
        Action::Dnat(IpAddr::V4(a), Some(p)) => format!("dnat to {a}:{p}"),
        Action::Dnat(IpAddr::V6(a), Some(p)) => format!("dnat to [{a}]:{p}"),
    }
}

/// `nft`'s names of the syslog levels.
fn log_level(level: u8) -> &'static str {
    ["emerg", "alert", "crit", "err", "warn", "notice", "info", "debug"]
        .get(usize::from(level))
        .copied()
        .unwrap_or("debug")
}

fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    }
}

fn bang<T>(c: &Cond<T>) -> &'static str {
    match c {
        Cond::Is(_) => "",
        Cond::Not(_) => "!= ",
    }
}

fn value<T>(c: &Cond<T>) -> &T {
    match c {
        Cond::Is(v) | Cond::Not(v) => v,
    }
}

/// A network as `nft` prints it: a host without its prefix length.
fn net(n: &IpNet) -> String {
    if n.prefix_len() == n.max_prefix_len() { n.addr().to_string() } else { n.trunc().to_string() }
}

fn ports(p: PortRange) -> String {
    if p.first() == p.last() { p.first().to_string() } else { format!("{}-{}", p.first(), p.last()) }
}

fn uids(u: UidRange) -> String {
    if u.first() == u.last() { u.first().to_string() } else { format!("{}-{}", u.first(), u.last()) }
}

/// A set element: a network when the interval is one, else `first-last`.
pub fn interval(key: SetKey, i: Interval) -> String {
    let one = |v: u128| match key {
        SetKey::Ipv4Addr => Ipv4Addr::from(v as u32).to_string(),
        SetKey::Ipv6Addr => Ipv6Addr::from(v).to_string(),
        SetKey::InetService | SetKey::Uid => v.to_string(),
    };
    if i.first == i.last {
        return one(i.first);
    }
    if matches!(key, SetKey::Ipv4Addr | SetKey::Ipv6Addr) {
        let size = i.last - i.first;
        let bits = 8 * key.bytes() as u32;
        // A network: the size is 2^k - 1 and the first address is aligned to it.
        if size.checked_add(1).is_none_or(|n| n.is_power_of_two()) && i.first & size == 0 {
            let host_bits = if size == u128::MAX { 128 } else { (size + 1).trailing_zeros() };
            return format!("{}/{}", one(i.first), bits - host_bits);
        }
    }
    format!("{}-{}", one(i.first), one(i.last))
}

//! The nftables rule set of a redirect, as data: what the nftables engine sends the kernel in one
//! batch, what CHECK expects to read back, and what `render --backend nftables` prints.
//!
//! Pure, no I/O. The rule set is a translation of the iptables rule sets ([`RuleSet`], one per
//! family) that the mesh layouts build, so both engines give every packet the same verdict by
//! construction: each family becomes one table named [`TABLE`] (`ip tproxy-cni`, `ip6 tproxy-cni`)
//! whose base chains stand for the built-in iptables chains (nat, raw and mangle PREROUTING and
//! OUTPUT) and whose regular chains keep the mesh's chain names; each iptables rule becomes one
//! nftables rule with the same matches, in the same order, and the same verdict.
//!
//! One change is made on the way: a run of consecutive rules of a chain that differ only in one
//! value (the excluded CIDRs, ports or UIDs of a list) and share a verdict becomes a single rule
//! that looks the value up in a named set with intervals. The verdicts are the same — the first
//! matching rule of the run and the set lookup both end in that one verdict — and a thousand
//! excluded networks cost one lookup instead of a thousand rules.

pub mod render;

use std::borrow::Cow;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::core::redirect::{Family, Port, PortRange, UidRange};
use crate::core::rules::{Chain, Cond, CtState, Interface, Proto, Rule, RuleSet, Table, Target};

/// The name of our table in each family. Nothing else of ours exists outside these tables.
pub const TABLE: &str = "tproxy-cni";

/// The comment on each of our tables, so `nft list ruleset` says whose they are.
pub const TABLE_COMMENT: &str = "tproxy-cni: transparent-proxy redirect of a service mesh";

/// How much earlier than the iptables chain of the same table and hook each of our base chains
/// runs: ours sees every packet first (see docs/configuration.md for why).
pub const PRIORITY_OFFSET: i32 = -10;

/// Everything of ours: one table per family, in batch order (IPv4 first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub tables: Vec<NftTable>,
}

/// One family's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftTable {
    pub family: Family,
    /// Sets first: rules refer to them.
    pub sets: Vec<NftSet>,
    /// Base chains first, then the regular (mesh) chains, in creation order.
    pub chains: Vec<NftChain>,
}

impl NftTable {
    /// The chain named `name`.
    pub fn chain(&self, name: &str) -> Option<&NftChain> {
        self.chains.iter().find(|c| c.name == name)
    }
}

/// A named set of intervals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftSet {
    pub name: String,
    pub key: SetKey,
    /// Disjoint, non-adjacent inclusive intervals in ascending order (see [`normalize`]).
    pub intervals: Vec<Interval>,
}

/// An inclusive interval of keys, as unsigned numbers (an address, a port, a UID).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Interval {
    pub first: u128,
    pub last: u128,
}

/// What a set holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetKey {
    Ipv4Addr,
    Ipv6Addr,
    /// A TCP or UDP port.
    InetService,
    /// A socket's owner.
    Uid,
}

impl SetKey {
    /// The key's length in bytes.
    pub fn bytes(self) -> usize {
        match self {
            SetKey::Ipv4Addr | SetKey::Uid => 4,
            SetKey::Ipv6Addr => 16,
            SetKey::InetService => 2,
        }
    }

    /// The largest key.
    pub fn max(self) -> u128 {
        match self {
            SetKey::Ipv6Addr => u128::MAX,
            k => (1u128 << (8 * k.bytes())) - 1,
        }
    }

    /// The type's name in `nft` syntax.
    pub fn name(self) -> &'static str {
        match self {
            SetKey::Ipv4Addr => "ipv4_addr",
            SetKey::Ipv6Addr => "ipv6_addr",
            SetKey::InetService => "inet_service",
            SetKey::Uid => "uid",
        }
    }

    /// The address key of a family.
    pub fn addr(family: Family) -> SetKey {
        match family {
            Family::V4 => SetKey::Ipv4Addr,
            Family::V6 => SetKey::Ipv6Addr,
        }
    }
}

/// Sorts intervals and merges overlapping and adjacent ones: the kernel refuses overlapping
/// intervals, and adjacent ones would need an end and a start on the same key.
pub fn normalize(mut v: Vec<Interval>) -> Vec<Interval> {
    v.sort();
    let mut out: Vec<Interval> = Vec::with_capacity(v.len());
    for i in v {
        match out.last_mut() {
            Some(prev) if i.first <= prev.last.saturating_add(1) => prev.last = prev.last.max(i.last),
            _ => out.push(i),
        }
    }
    out
}

/// A chain: a base chain when it has a hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftChain {
    pub name: String,
    pub hook: Option<BaseHook>,
    pub rules: Vec<NftRule>,
}

/// Where a base chain hooks in, and as what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseHook {
    pub kind: ChainKind,
    pub hook: Hook,
    pub priority: i32,
}

/// A base chain's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainKind {
    Nat,
    Filter,
}

impl ChainKind {
    pub fn name(self) -> &'static str {
        match self {
            ChainKind::Nat => "nat",
            ChainKind::Filter => "filter",
        }
    }
}

/// A netfilter hook we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Prerouting,
    Output,
}

impl Hook {
    pub fn name(self) -> &'static str {
        match self {
            Hook::Prerouting => "prerouting",
            Hook::Output => "output",
        }
    }

    /// The kernel's hook number (`NF_INET_PRE_ROUTING`, `NF_INET_LOCAL_OUT`).
    pub fn number(self) -> u32 {
        match self {
            Hook::Prerouting => 0,
            Hook::Output => 3,
        }
    }
}

/// One rule: every match must hold, then the action runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftRule {
    pub matches: Vec<Match>,
    pub action: Action,
    /// The ownership comment, as on the iptables rule (borrowed from the rule set, owned when
    /// read back from the kernel).
    pub comment: Cow<'static, str>,
}

/// A condition on a packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// The transport protocol (`meta l4proto`).
    L4Proto(Proto),
    Saddr(Cond<IpNet>),
    Daddr(Cond<IpNet>),
    /// The source address is in the named set.
    SaddrIn(String),
    DaddrIn(String),
    /// The transport source port (the protocol is matched before it).
    Sport(Cond<PortRange>),
    Dport(Cond<PortRange>),
    DportIn(String),
    /// The owner of the packet's socket.
    SkUid(Cond<UidRange>),
    SkUidIn(String),
    IifName(Interface),
    OifName(Interface),
    CtState(CtState),
}

impl Match {
    /// The value a run of rules may differ in to become one set lookup, as (field, key, interval).
    fn set_value(&self, family: Family) -> Option<(Field, SetKey, Interval)> {
        match self {
            Match::Saddr(Cond::Is(n)) => Some((Field::Saddr, SetKey::addr(family), net_interval(n))),
            Match::Daddr(Cond::Is(n)) => Some((Field::Daddr, SetKey::addr(family), net_interval(n))),
            Match::Dport(Cond::Is(p)) => Some((Field::Dport, SetKey::InetService, port_interval(*p))),
            Match::SkUid(Cond::Is(u)) => Some((Field::SkUid, SetKey::Uid, uid_interval(*u))),
            _ => None,
        }
    }
}

/// A match that a set can replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Saddr,
    Daddr,
    Dport,
    SkUid,
}

impl Field {
    fn name(self) -> &'static str {
        match self {
            Field::Saddr => "saddr",
            Field::Daddr => "daddr",
            Field::Dport => "dport",
            Field::SkUid => "skuid",
        }
    }

    fn lookup(self, set: String) -> Match {
        match self {
            Field::Saddr => Match::SaddrIn(set),
            Field::Daddr => Match::DaddrIn(set),
            Field::Dport => Match::DportIn(set),
            Field::SkUid => Match::SkUidIn(set),
        }
    }
}

/// The interval of addresses a network covers.
pub fn net_interval(n: &IpNet) -> Interval {
    match n.trunc() {
        IpNet::V4(n) => Interval { first: u32::from(n.network()).into(), last: u32::from(n.broadcast()).into() },
        IpNet::V6(n) => Interval { first: u128::from(n.network()), last: u128::from(n.broadcast()) },
    }
}

fn port_interval(p: PortRange) -> Interval {
    Interval { first: p.first().into(), last: p.last().into() }
}

fn uid_interval(u: UidRange) -> Interval {
    Interval { first: u.first().into(), last: u.last().into() }
}

/// What a rule does with a matching packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// To the named chain (borrowed from the rule set, owned when read back from the kernel).
    Jump(Cow<'static, str>),
    Return,
    Drop,
    /// `ct zone set N`: the connection is tracked in zone N.
    CtZone(u16),
    Log {
        prefix: String,
        level: u8,
    },
    /// `redirect to :PORT`.
    Redirect(Port),
    /// `dnat to ADDR[:PORT]`.
    Dnat(IpAddr, Option<Port>),
}

impl Action {
    /// Does the action end the evaluation of the rule's chain (so that rules before it in a run
    /// may be merged)? `jump` returns, but to the rule after it, like the next rule of a run would.
    fn ends_run(&self) -> bool {
        matches!(self, Action::Jump(_) | Action::Return | Action::Drop | Action::Redirect(_) | Action::Dnat(..))
    }
}

/// The nftables rule set for the iptables rule sets `sets` (one per family).
pub fn from_rules(sets: &[RuleSet]) -> Ruleset {
    Ruleset { tables: sets.iter().map(table).collect() }
}

/// The name of the base chain that stands for a built-in iptables chain: `nat_output`, ….
pub fn base_chain_name(table: Table, chain: Chain) -> String {
    format!("{}_{}", table.name(), chain.0.to_ascii_lowercase())
}

/// The hook of a built-in iptables chain, with the priority of ours (see [`PRIORITY_OFFSET`]).
fn base_hook(table: Table, chain: Chain) -> BaseHook {
    let hook = if chain == Chain::OUTPUT { Hook::Output } else { Hook::Prerouting };
    // iptables-nft's priorities: raw -300, mangle -150, nat -100 (PREROUTING and OUTPUT).
    let (kind, iptables_priority) = match table {
        Table::Raw => (ChainKind::Filter, -300),
        Table::Mangle => (ChainKind::Filter, -150),
        Table::Nat => (ChainKind::Nat, -100),
    };
    BaseHook { kind, hook, priority: iptables_priority + PRIORITY_OFFSET }
}

fn is_builtin(chain: Chain) -> bool {
    chain == Chain::OUTPUT || chain == Chain::PREROUTING
}

fn table(set: &RuleSet) -> NftTable {
    let family = set.family;
    let mut base: Vec<NftChain> = Vec::new();
    let mut regular: Vec<NftChain> = Vec::new();
    for t in &set.tables {
        for c in &t.chains {
            debug_assert!(regular.iter().all(|r| r.name != c.0), "chain {c} is created in two tables");
            regular.push(NftChain { name: c.0.to_owned(), hook: None, rules: Vec::new() });
        }
        // A chain's rules come one after the other: its place is looked up once per run of them.
        let mut at: Option<(Chain, bool, usize)> = None;
        for r in &t.rules {
            let (is_base, i) = match at {
                Some((chain, is_base, i)) if chain == r.chain => (is_base, i),
                _ => {
                    let (name, hook) = if is_builtin(r.chain) {
                        (base_chain_name(t.table, r.chain), Some(base_hook(t.table, r.chain)))
                    } else {
                        (r.chain.0.to_owned(), None)
                    };
                    let list = if hook.is_some() { &mut base } else { &mut regular };
                    let i = list.iter().position(|c| c.name == name).unwrap_or_else(|| {
                        list.push(NftChain { name, hook, rules: Vec::new() });
                        list.len() - 1
                    });
                    (hook.is_some(), i)
                }
            };
            at = Some((r.chain, is_base, i));
            let list = if is_base { &mut base } else { &mut regular };
            push_rules(r, &mut list[i].rules);
        }
    }
    let mut chains = base;
    chains.extend(regular);
    let mut sets = Vec::new();
    for chain in &mut chains {
        chain.rules = merge_runs(family, &chain.name, std::mem::take(&mut chain.rules), &mut sets);
    }
    NftTable { family, sets, chains }
}

/// One iptables rule as nftables rules, appended to `out`: one, or one per port of a
/// `-m multiport --dports` list (a run that [`merge_runs`] turns into one set lookup).
fn push_rules(r: &Rule, out: &mut Vec<NftRule>) {
    match &r.dports {
        Some(list) if r.proto.is_some() => out.extend(list.iter().map(|p| rule(r, Some(Cond::Is(*p))))),
        _ => out.push(rule(r, r.dport)),
    }
}

/// One iptables rule as nftables matches and an action, in `iptables-save`'s order of options,
/// with `dport` as its destination port match (one port of a multiport list, or the rule's own).
fn rule(r: &Rule, dport: Option<Cond<PortRange>>) -> NftRule {
    let mut m = Vec::with_capacity(4);
    if let Some(n) = r.source {
        m.push(Match::Saddr(Cond::Is(n)));
    }
    if let Some(d) = r.destination {
        m.push(Match::Daddr(d));
    }
    if let Some(i) = r.in_interface {
        m.push(Match::IifName(i));
    }
    if let Some(o) = r.out_interface {
        m.push(Match::OifName(o));
    }
    if let Some(p) = r.proto {
        m.push(Match::L4Proto(p));
        if let Some(s) = r.sport {
            m.push(Match::Sport(Cond::Is(s)));
        }
        if let Some(d) = dport {
            m.push(Match::Dport(d));
        }
    }
    if let Some(u) = r.uid_owner {
        m.push(Match::SkUid(u));
    }
    if let Some(s) = r.ctstate {
        m.push(Match::CtState(s));
    }
    let action = match r.target {
        Target::Jump(c) => Action::Jump(Cow::Borrowed(c.0)),
        Target::Return => Action::Return,
        Target::Drop => Action::Drop,
        Target::CtZone(z) => Action::CtZone(z),
        Target::Log { prefix, level } => Action::Log { prefix: prefix.to_owned(), level },
        Target::Redirect(p) => Action::Redirect(p),
        Target::DnatAddr(ip) => Action::Dnat(ip, None),
        Target::DnatSocket(ip, p) => Action::Dnat(ip, Some(p)),
    };
    NftRule { matches: m, action, comment: Cow::Borrowed(r.comment) }
}

/// Merges each run of rules that differ in one set-able value into one set lookup (see the
/// module docs); the sets made are appended to `sets`.
fn merge_runs(family: Family, chain: &str, rules: Vec<NftRule>, sets: &mut Vec<NftSet>) -> Vec<NftRule> {
    // First where each run ends and which match varies along it (`None`: kept as they are)...
    let mut runs: Vec<(usize, Option<usize>)> = Vec::new();
    let mut i = 0;
    while i < rules.len() {
        let first = &rules[i];
        let mut end = i + 1;
        let mut field_at = None;
        if first.action.ends_run() {
            while end < rules.len() {
                match single_difference(family, first, &rules[end]) {
                    Some(pos) if field_at.is_none_or(|p| p == pos) => {
                        field_at = Some(pos);
                        end += 1;
                    }
                    _ => break,
                }
            }
        }
        runs.push((end - i, field_at.filter(|_| end - i >= 2)));
        i = end;
    }
    // ...then the rules, moved: a run's first rule becomes its lookup, the others only give
    // their values to the set.
    let mut out = Vec::with_capacity(runs.len());
    let mut rules = rules.into_iter();
    for (len, field_at) in runs {
        let mut run = rules.by_ref().take(len);
        let Some(pos) = field_at else {
            out.extend(run);
            continue;
        };
        let value = |r: &NftRule| r.matches[pos].set_value(family).expect("checked by single_difference");
        let mut merged = run.next().expect("a run has a rule");
        let (field, key, first) = value(&merged);
        let intervals = std::iter::once(first).chain(run.map(|r| value(&r).2)).collect();
        let name = set_name(chain, field, sets);
        sets.push(NftSet { name: name.clone(), key, intervals: normalize(intervals) });
        merged.matches[pos] = field.lookup(name);
        out.push(merged);
    }
    out
}

/// Where `a` and `b` differ, when they differ in exactly one match that a set can replace.
fn single_difference(family: Family, a: &NftRule, b: &NftRule) -> Option<usize> {
    if a.action != b.action || a.comment != b.comment || a.matches.len() != b.matches.len() {
        return None;
    }
    let mut diff = None;
    for (pos, (x, y)) in a.matches.iter().zip(&b.matches).enumerate() {
        if x == y {
            continue;
        }
        let (fx, fy) = (x.set_value(family)?, y.set_value(family)?);
        if diff.is_some() || fx.0 != fy.0 {
            return None;
        }
        diff = Some(pos);
    }
    diff
}

/// `<chain>_<field>` in lower case, with a number after it when the chain has several such sets.
fn set_name(chain: &str, field: Field, sets: &[NftSet]) -> String {
    let base = format!("{}_{}", chain.to_ascii_lowercase(), field.name());
    let mut name = base.clone();
    let mut n = 1;
    while sets.iter().any(|s| s.name == name) {
        n += 1;
        name = format!("{base}_{n}");
    }
    name
}

/// The `nft` name of a family's table type: `ip`, `ip6`.
pub fn nft_family(f: Family) -> &'static str {
    match f {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::redirect::{parse_port_range, parse_uid_range};
    use crate::core::rules::Rule;

    fn set(table: &NftTable, name: &str) -> Vec<String> {
        let s = table.sets.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no set {name}: {table:?}"));
        s.intervals.iter().map(|i| render::interval(s.key, *i)).collect()
    }

    #[test]
    fn intervals_are_sorted_merged_and_deduplicated() {
        let i = |first, last| Interval { first, last };
        assert_eq!(
            normalize(vec![i(10, 20), i(5, 7), i(8, 9), i(15, 30), i(40, 40), i(40, 40)]),
            vec![i(5, 30), i(40, 40)]
        );
        assert_eq!(normalize(vec![i(0, u128::MAX), i(3, 4)]), vec![i(0, u128::MAX)]);
    }

    #[test]
    fn runs_of_rules_differing_in_one_value_become_one_set_lookup() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let chain = Chain("CONSUL_PROXY_OUTPUT");
        let rules = vec![
            Rule::new(chain, Target::Return).uid_owner(parse_uid_range("5996", "u").unwrap()),
            Rule::new(chain, Target::Return).uid_owner(parse_uid_range("1000-1999", "u").unwrap()),
            Rule::new(chain, Target::Return).destination(net("10.0.0.0/8")),
            Rule::new(chain, Target::Return).destination(net("192.0.2.130/25")),
            Rule::new(chain, Target::Return).destination(net("10.1.0.0/16")),
            // Not part of a run: a different verdict, then a different match.
            Rule::new(chain, Target::Jump(Chain("X"))).destination(net("198.51.100.0/24")),
            Rule::new(chain, Target::Return).dport(Proto::Tcp, parse_port_range("80", "p").unwrap()),
        ];
        let sets = [RuleSet {
            family: Family::V4,
            tables: vec![crate::core::rules::TableRules { table: Table::Nat, chains: vec![chain], rules }],
        }];
        let rs = from_rules(&sets);
        let t = &rs.tables[0];
        assert_eq!(set(t, "consul_proxy_output_skuid"), ["1000-1999", "5996"]);
        assert_eq!(set(t, "consul_proxy_output_daddr"), ["10.0.0.0/8", "192.0.2.128/25"], "10.1/16 is inside 10/8");
        let rules: Vec<String> =
            t.chain("CONSUL_PROXY_OUTPUT").unwrap().rules.iter().map(|r| render::rule(r, Family::V4)).collect();
        assert_eq!(
            rules,
            [
                "meta skuid @consul_proxy_output_skuid counter return comment \"tproxy-cni\"",
                "ip daddr @consul_proxy_output_daddr counter return comment \"tproxy-cni\"",
                "ip daddr 198.51.100.0/24 counter jump X comment \"tproxy-cni\"",
                "tcp dport 80 counter return comment \"tproxy-cni\"",
            ]
        );
    }

    #[test]
    fn built_in_chains_become_base_chains_ten_before_iptables() {
        let rules = [
            Rule::new(Chain::OUTPUT, Target::CtZone(1)),
            Rule::new(Chain::PREROUTING, Target::Drop).ctstate(CtState::Invalid),
        ];
        let sets = [RuleSet {
            family: Family::V6,
            tables: vec![
                crate::core::rules::TableRules { table: Table::Nat, chains: vec![Chain("M")], rules: Vec::new() },
                crate::core::rules::TableRules { table: Table::Raw, chains: Vec::new(), rules: rules[..1].to_vec() },
                crate::core::rules::TableRules { table: Table::Mangle, chains: Vec::new(), rules: rules[1..].to_vec() },
            ],
        }];
        let t = &from_rules(&sets).tables[0];
        let names: Vec<&str> = t.chains.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["raw_output", "mangle_prerouting", "M"], "base chains first, then the mesh's");
        assert_eq!(t.chains[0].hook, Some(BaseHook { kind: ChainKind::Filter, hook: Hook::Output, priority: -310 }));
        assert_eq!(
            t.chains[1].hook,
            Some(BaseHook { kind: ChainKind::Filter, hook: Hook::Prerouting, priority: -160 })
        );
        assert_eq!(t.chains[2].hook, None);
    }

    #[test]
    fn multiport_lists_become_sets() {
        let ports = ["6000-6010", "7000", "8000"].map(|p| parse_port_range(p, "p").unwrap()).to_vec();
        let rule = Rule::new(Chain::OUTPUT, Target::Return)
            .dports(Proto::Tcp, ports)
            .uid_owner(parse_uid_range("4000-4100", "u").unwrap());
        let sets = [RuleSet {
            family: Family::V4,
            tables: vec![crate::core::rules::TableRules { table: Table::Nat, chains: Vec::new(), rules: vec![rule] }],
        }];
        let t = &from_rules(&sets).tables[0];
        assert_eq!(set(t, "nat_output_dport"), ["6000-6010", "7000", "8000"]);
        assert_eq!(
            render::rule(&t.chains[0].rules[0], Family::V4),
            "tcp dport @nat_output_dport meta skuid 4000-4100 counter return comment \"tproxy-cni\""
        );
    }

    #[test]
    fn set_elements_print_as_networks_when_they_are_one() {
        let v4 = |a: &str, b: &str| Interval {
            first: u32::from(a.parse::<std::net::Ipv4Addr>().unwrap()).into(),
            last: u32::from(b.parse::<std::net::Ipv4Addr>().unwrap()).into(),
        };
        assert_eq!(render::interval(SetKey::Ipv4Addr, v4("10.0.0.0", "10.255.255.255")), "10.0.0.0/8");
        assert_eq!(render::interval(SetKey::Ipv4Addr, v4("0.0.0.0", "255.255.255.255")), "0.0.0.0/0");
        assert_eq!(render::interval(SetKey::Ipv4Addr, v4("10.0.0.1", "10.0.0.1")), "10.0.0.1");
        assert_eq!(render::interval(SetKey::Ipv4Addr, v4("10.0.0.1", "10.0.0.2")), "10.0.0.1-10.0.0.2");
        assert_eq!(render::interval(SetKey::Ipv6Addr, Interval { first: 0, last: u128::MAX }), "::/0");
        assert_eq!(render::interval(SetKey::InetService, Interval { first: 80, last: 90 }), "80-90");
    }
}

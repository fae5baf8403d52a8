//! Reading our tables back: the kernel's dump of a table, its sets (with their elements), chains
//! and rules, turned back into the [`crate::core::nft`] model so CHECK can compare it with what
//! ADD would install and name each difference in `nft` words.
//!
//! A rule is read back by recognising the expression sequences [`super::encode`] writes. A rule
//! that is not such a sequence (someone edited our table) is kept as [`SeenRule::Foreign`], with
//! the names of its expressions, so CHECK can still point at it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use netlink_packet_core::{DefaultNla, Nla};
use netlink_packet_netfilter::nftables::{
    Bitwise, ChainAttribute, Cmp, DataAttribute, ExpressionAttribute, Expressions, Hook, Immediate, ListAttribute,
    Lookup, Meta, MetaKey, Operator, Payload, Register, RuleAttribute, SetAttribute, SetElementAttribute,
    SetElementFlags, SetElementList, Verdict, VerdictAttribute,
};

use super::encode::{
    NF_CT_STATE_INVALID_BIT, NF_DROP, NFT_BYTEORDER_HTON, NFT_CT_STATE, NFT_CT_ZONE, NFT_NAT_DNAT, NFT_RANGE_NEQ,
    NFTA_BYTEORDER_OP, NFTA_CT_DREG, NFTA_CT_KEY, NFTA_CT_SREG, NFTA_LOG_LEVEL, NFTA_LOG_PREFIX,
    NFTA_NAT_REG_PROTO_MIN, NFTA_NAT_TYPE, NFTA_RANGE_FROM_DATA, NFTA_RANGE_OP, NFTA_RANGE_TO_DATA,
    NFTA_REDIR_REG_PROTO_MIN, UDATA_COMMENT,
};
use crate::core::nft::{Action, BaseHook, ChainKind, Hook as NftHook, Interval, Match, NftRule, SetKey};
use crate::core::redirect::{Family, Port, PortRange, UidRange};
use crate::core::rules::{Cond, CtState, Interface, Proto};

/// A chain as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenChain {
    pub name: String,
    /// `None` for a regular chain; for a base chain, its hook as far as we can name it.
    pub hook: Option<Result<BaseHook, String>>,
}

/// A rule as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeenRule {
    /// A rule we can read (whoever wrote it).
    Ours(NftRule),
    /// A rule made of other expressions: their names, in order.
    Foreign(Vec<String>),
}

/// A set as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenSet {
    pub name: String,
    /// `None` when the key is not one of ours.
    pub key: Option<SetKey>,
}

/// Reads a chain message's name and hook.
pub fn chain(attrs: &[ChainAttribute]) -> Option<SeenChain> {
    let mut name = None;
    let mut hook: Option<(Option<u32>, Option<i32>)> = None;
    let mut kind = None;
    for a in attrs {
        match a {
            ChainAttribute::Name(n) => name = Some(n.clone()),
            ChainAttribute::Type(t) => kind = Some(t.clone()),
            ChainAttribute::Hook(h) => {
                let mut num = None;
                let mut prio = None;
                for x in h {
                    match x {
                        Hook::Number(n) => num = Some(u32::from(*n)),
                        Hook::Priority(p) => prio = Some(*p as i32),
                        _ => {}
                    }
                }
                hook = Some((num, prio));
            }
            _ => {}
        }
    }
    let hook = hook.map(|(num, prio)| {
        let h = match num {
            Some(0) => Some(NftHook::Prerouting),
            Some(3) => Some(NftHook::Output),
            _ => None,
        };
        let k = match kind.as_deref() {
            Some("nat") => Some(ChainKind::Nat),
            Some("filter") => Some(ChainKind::Filter),
            _ => None,
        };
        match (h, k, prio) {
            (Some(hook), Some(kind), Some(priority)) => Ok(BaseHook { kind, hook, priority }),
            _ => Err(format!("type {} hook {num:?} priority {prio:?}", kind.as_deref().unwrap_or("?"))),
        }
    });
    Some(SeenChain { name: name?, hook })
}

/// Reads a set message's name and key.
pub fn set(attrs: &[SetAttribute], family: Family) -> Option<SeenSet> {
    let mut name = None;
    let (mut key_type, mut key_len, mut interval) = (None, None, false);
    for a in attrs {
        match a {
            SetAttribute::Name(n) => name = Some(n.clone()),
            SetAttribute::KeyType(t) => key_type = Some(*t),
            SetAttribute::KeyLen(l) => key_len = Some(*l),
            SetAttribute::Flags(f) => interval = f.contains(netlink_packet_netfilter::nftables::SetFlags::Interval),
            _ => {}
        }
    }
    let key = [SetKey::addr(family), SetKey::InetService, SetKey::Uid]
        .into_iter()
        .find(|k| Some(super::encode::key_type(*k)) == key_type && Some(k.bytes() as u32) == key_len)
        .filter(|_| interval);
    Some(SeenSet { name: name?, key })
}

/// The intervals a dump of an interval set's elements describes (each interval is a start
/// element and an end element holding the key after it; the last may run to the largest key).
pub fn intervals(key: SetKey, dumps: &[Vec<SetElementList>]) -> Vec<Interval> {
    let mut points: Vec<(u128, bool)> = Vec::new();
    for list in dumps {
        for l in list {
            let SetElementList::Elements(elems) = l else { continue };
            for e in elems {
                let ListAttribute::Element(attrs) = e else { continue };
                let mut k = None;
                let mut end = false;
                for a in attrs {
                    match a {
                        SetElementAttribute::Key(DataAttribute::Value(v)) if v.len() == key.bytes() => {
                            k = Some(v.iter().fold(0u128, |acc, b| (acc << 8) | u128::from(*b)));
                        }
                        SetElementAttribute::Flags(f) => end = f.contains(SetElementFlags::IntervalEnd),
                        _ => {}
                    }
                }
                if let Some(k) = k {
                    points.push((k, end));
                }
            }
        }
    }
    points.sort();
    let mut out = Vec::new();
    let mut open: Option<u128> = None;
    for (k, end) in points {
        match (open, end) {
            (Some(first), true) if k > first => {
                out.push(Interval { first, last: k - 1 });
                open = None;
            }
            (None, false) => open = Some(k),
            (Some(first), false) => {
                // Two starts in a row: the first runs up to the second.
                out.push(Interval { first, last: k - 1 });
                open = Some(k);
            }
            _ => {}
        }
    }
    if let Some(first) = open {
        out.push(Interval { first, last: key.max() });
    }
    out
}

/// Reads a rule message: its chain and the rule.
pub fn rule(attrs: &[RuleAttribute], family: Family) -> Option<(String, SeenRule)> {
    let mut chain = None;
    let mut exprs: &[ListAttribute<ExpressionAttribute>] = &[];
    let mut comment = String::new();
    for a in attrs {
        match a {
            RuleAttribute::Chain(c) => chain = Some(c.clone()),
            RuleAttribute::Expressions(e) => exprs = e,
            RuleAttribute::UserData(u) => comment = udata_comment(u).unwrap_or_default(),
            _ => {}
        }
    }
    let list: Vec<&Expressions> = exprs
        .iter()
        .filter_map(|e| match e {
            ListAttribute::Element(attrs) => attrs.iter().find_map(|a| match a {
                ExpressionAttribute::Data(d) => Some(d),
                _ => None,
            }),
            _ => None,
        })
        .collect();
    let mut reader = Reader { e: &list, at: 0, family };
    let seen = match reader.rule(comment) {
        Some(r) => SeenRule::Ours(r),
        None => SeenRule::Foreign(list.iter().map(|e| expression_name(e)).collect()),
    };
    Some((chain?, seen))
}

/// The comment in a rule's or a table's user data.
pub fn udata_comment(udata: &[u8]) -> Option<String> {
    let mut rest = udata;
    while rest.len() >= 2 {
        let (kind, len) = (rest[0], usize::from(rest[1]));
        let value = rest.get(2..2 + len)?;
        if kind == UDATA_COMMENT {
            let text = value.strip_suffix(&[0]).unwrap_or(value);
            return String::from_utf8(text.to_vec()).ok();
        }
        rest = &rest[2 + len..];
    }
    None
}

fn expression_name(e: &Expressions) -> String {
    match e {
        Expressions::Bitwise(_) => "bitwise",
        Expressions::Cmp(_) => "cmp",
        Expressions::Immediate(_) => "immediate",
        Expressions::Lookup(_) => "lookup",
        Expressions::Meta(_) => "meta",
        Expressions::Payload(_) => "payload",
        Expressions::Other { expression_type, .. } => expression_type,
        _ => "?",
    }
    .to_owned()
}

/// A cursor over a rule's expressions that recognises our sequences.
struct Reader<'a> {
    e: &'a [&'a Expressions],
    at: usize,
    family: Family,
}

impl<'a> Reader<'a> {
    fn next(&mut self) -> Option<&'a Expressions> {
        let e = self.e.get(self.at)?;
        self.at += 1;
        Some(e)
    }

    fn peek(&self) -> Option<&'a Expressions> {
        self.e.get(self.at).copied()
    }

    fn rule(&mut self, comment: String) -> Option<NftRule> {
        let mut matches = Vec::new();
        loop {
            // Every rule of ours counts; the counter comes right before the action.
            if self.is_next(|e| matches!(e, Expressions::Other { expression_type, .. } if expression_type == "counter"))
            {
                self.at += 1;
                return self.action().filter(|_| self.at == self.e.len()).map(|action| NftRule {
                    matches,
                    action,
                    comment: comment.into(),
                });
            }
            matches.push(self.matcher()?);
        }
    }

    /// The action at the cursor (the cursor moves past it).
    fn action(&mut self) -> Option<Action> {
        match self.next()? {
            Expressions::Immediate(attrs) if reg(attrs) == Some(Register::Verdict) => {
                let v = attrs.iter().find_map(|a| match a {
                    Immediate::Data(DataAttribute::Verdict(v)) => Some(v),
                    _ => None,
                })?;
                let code = v.iter().find_map(|a| match a {
                    VerdictAttribute::Code(c) => Some(*c),
                    _ => None,
                })?;
                let chain = v.iter().find_map(|a| match a {
                    VerdictAttribute::Chain(c) => Some(c.clone()),
                    _ => None,
                });
                match (code, chain) {
                    (Verdict::Jump, Some(c)) => Some(Action::Jump(c.into())),
                    (Verdict::Return, None) => Some(Action::Return),
                    (Verdict::Other(NF_DROP), None) => Some(Action::Drop),
                    _ => None,
                }
            }
            Expressions::Immediate(attrs) if reg(attrs) == Some(Register::Reg1) => {
                let data = imm_data(attrs)?;
                match self.next()? {
                    Expressions::Other { expression_type, attributes } if expression_type == "ct" => {
                        (attr_u32(attributes, NFTA_CT_KEY)? == NFT_CT_ZONE && attr_u32(attributes, NFTA_CT_SREG)? == 1)
                            .then_some(())?;
                        Some(Action::CtZone(u16::from_ne_bytes(data.try_into().ok()?)))
                    }
                    Expressions::Other { expression_type, attributes } if expression_type == "redir" => {
                        (attr_u32(attributes, NFTA_REDIR_REG_PROTO_MIN)? == 1).then_some(())?;
                        Some(Action::Redirect(port(&data)?))
                    }
                    Expressions::Immediate(second) if reg(second) == Some(Register::Reg2) => {
                        let p = port(&imm_data(second)?)?;
                        let Expressions::Other { expression_type, attributes } = self.next()? else { return None };
                        (expression_type == "nat"
                            && attr_u32(attributes, NFTA_NAT_TYPE)? == NFT_NAT_DNAT
                            && attr_u32(attributes, NFTA_NAT_REG_PROTO_MIN)? == 2)
                            .then_some(())?;
                        Some(Action::Dnat(addr(&data)?, Some(p)))
                    }
                    Expressions::Other { expression_type, attributes } if expression_type == "nat" => {
                        (attr_u32(attributes, NFTA_NAT_TYPE)? == NFT_NAT_DNAT
                            && attr_u32(attributes, NFTA_NAT_REG_PROTO_MIN).is_none())
                        .then_some(())?;
                        Some(Action::Dnat(addr(&data)?, None))
                    }
                    _ => None,
                }
            }
            Expressions::Other { expression_type, attributes } if expression_type == "log" => {
                let prefix = attr(attributes, NFTA_LOG_PREFIX)?;
                let prefix = String::from_utf8(prefix.strip_suffix(&[0]).unwrap_or(&prefix).to_vec()).ok()?;
                let level = u8::try_from(attr_u32(attributes, NFTA_LOG_LEVEL)?).ok()?;
                Some(Action::Log { prefix, level })
            }
            _ => None,
        }
    }

    fn matcher(&mut self) -> Option<Match> {
        match self.next()? {
            Expressions::Meta(attrs) => {
                let key = attrs.iter().find_map(|a| match a {
                    Meta::Key(k) => Some(u32::from(*k)),
                    _ => None,
                })?;
                match key {
                    k if k == u32::from(MetaKey::L4Proto) => {
                        let (op, data) = self.cmp()?;
                        match (op, data.as_slice()) {
                            (Operator::Equal, [6]) => Some(Match::L4Proto(Proto::Tcp)),
                            (Operator::Equal, [17]) => Some(Match::L4Proto(Proto::Udp)),
                            _ => None,
                        }
                    }
                    k if k == u32::from(MetaKey::SocketUserId) => self.uid(),
                    k if k == u32::from(MetaKey::Oifname) || k == u32::from(MetaKey::Iifname) => {
                        let (op, data) = self.cmp()?;
                        let iface = interface(&data).filter(|_| op == Operator::Equal)?;
                        Some(if k == u32::from(MetaKey::Oifname) {
                            Match::OifName(iface)
                        } else {
                            Match::IifName(iface)
                        })
                    }
                    _ => None,
                }
            }
            Expressions::Payload(attrs) => {
                let (base, offset, len) = payload(attrs)?;
                let full = addr_len(self.family) as u32;
                // An address, or (as `nft` writes a byte-aligned prefix) its first bytes.
                let loads_addr = len >= 1 && len <= full;
                match (base, offset, len, self.family) {
                    (1, 12, _, Family::V4) | (1, 8, _, Family::V6) if loads_addr => self.address(true, len as usize),
                    (1, 16, _, Family::V4) | (1, 24, _, Family::V6) if loads_addr => self.address(false, len as usize),
                    (2, 0, 2, _) => self.port_match(true),
                    (2, 2, 2, _) => self.port_match(false),
                    _ => None,
                }
            }
            Expressions::Other { expression_type, attributes } if expression_type == "ct" => {
                (attr_u32(attributes, NFTA_CT_KEY)? == NFT_CT_STATE && attr_u32(attributes, NFTA_CT_DREG)? == 1)
                    .then_some(())?;
                let (mask, xor) = self.bitwise()?;
                (mask == NF_CT_STATE_INVALID_BIT.to_ne_bytes() && xor == [0; 4]).then_some(())?;
                let (op, data) = self.cmp()?;
                (op == Operator::NotEqual && data == [0; 4]).then_some(Match::CtState(CtState::Invalid))
            }
            _ => None,
        }
    }

    fn cmp(&mut self) -> Option<(Operator, Vec<u8>)> {
        let Expressions::Cmp(attrs) = self.next()? else { return None };
        let op = attrs.iter().find_map(|a| match a {
            Cmp::Op(o) => Some(*o),
            _ => None,
        })?;
        let data = attrs.iter().find_map(|a| match a {
            Cmp::Data(DataAttribute::Value(v)) => Some(v.clone()),
            _ => None,
        })?;
        Some((op, data))
    }

    fn bitwise(&mut self) -> Option<(Vec<u8>, Vec<u8>)> {
        let Expressions::Bitwise(attrs) = self.next()? else { return None };
        let mask = attrs.iter().find_map(|a| match a {
            Bitwise::Mask(DataAttribute::Value(v)) => Some(v.clone()),
            _ => None,
        })?;
        let xor = attrs.iter().find_map(|a| match a {
            Bitwise::Xor(DataAttribute::Value(v)) => Some(v.clone()),
            _ => None,
        })?;
        Some((mask, xor))
    }

    /// A lookup at the cursor: the set's name, if it is a plain (not inverted, not a map) one.
    fn lookup(&mut self) -> Option<String> {
        let Some(Expressions::Lookup(attrs)) = self.peek() else { return None };
        self.at += 1;
        let inverted = attrs.iter().any(|a| matches!(a, Lookup::Flags(f) if *f != 0));
        let map = attrs.iter().any(|a| matches!(a, Lookup::DestinationRegister(_)));
        (!inverted && !map).then_some(())?;
        attrs.iter().find_map(|a| match a {
            Lookup::Set(s) => Some(s.clone()),
            _ => None,
        })
    }

    fn is_next(&self, f: impl Fn(&Expressions) -> bool) -> bool {
        self.peek().is_some_and(f)
    }

    /// An address match whose payload load took the first `len` bytes of the address.
    fn address(&mut self, source: bool, len: usize) -> Option<Match> {
        let wrap = |c: Cond<IpNet>| if source { Match::Saddr(c) } else { Match::Daddr(c) };
        let full = addr_len(self.family);
        if len == full
            && let Some(set) = self.lookup()
        {
            return Some(if source { Match::SaddrIn(set) } else { Match::DaddrIn(set) });
        }
        let prefix = if self.is_next(|e| matches!(e, Expressions::Bitwise(_))) {
            let (mask, xor) = self.bitwise()?;
            (mask.len() == len && xor.iter().all(|b| *b == 0)).then_some(())?;
            prefix_len(&mask)?
        } else {
            (8 * len) as u8
        };
        let (op, mut data) = self.cmp()?;
        (data.len() == len).then_some(())?;
        data.resize(full, 0);
        let net = IpNet::new(addr(&data)?, prefix).ok()?;
        (net.trunc() == net).then_some(())?;
        (Family::of(net.addr()) == self.family).then_some(())?;
        match op {
            Operator::Equal => Some(wrap(Cond::Is(net))),
            Operator::NotEqual => Some(wrap(Cond::Not(net))),
            _ => None,
        }
    }

    fn port_match(&mut self, source: bool) -> Option<Match> {
        if let Some(set) = self.lookup() {
            return (!source).then_some(Match::DportIn(set));
        }
        let c = self.range_of(2)?;
        let to_range = |(a, b): (u128, u128)| {
            PortRange::new(Port::new(u16::try_from(a).ok()?)?, Port::new(u16::try_from(b).ok()?)?)
        };
        let c = match c {
            Cond::Is(r) => Cond::Is(to_range(r)?),
            Cond::Not(r) => Cond::Not(to_range(r)?),
        };
        Some(if source { Match::Sport(c) } else { Match::Dport(c) })
    }

    fn uid(&mut self) -> Option<Match> {
        let hton = self.is_next(|e| {
            matches!(e, Expressions::Other { expression_type, attributes }
                if expression_type == "byteorder" && attr_u32(attributes, NFTA_BYTEORDER_OP) == Some(NFT_BYTEORDER_HTON))
        });
        if !hton {
            let (op, data) = self.cmp()?;
            let uid = UidRange::single(u32::from_ne_bytes(data.try_into().ok()?));
            return match op {
                Operator::Equal => Some(Match::SkUid(Cond::Is(uid))),
                Operator::NotEqual => Some(Match::SkUid(Cond::Not(uid))),
                _ => None,
            };
        }
        self.at += 1;
        if let Some(set) = self.lookup() {
            return Some(Match::SkUidIn(set));
        }
        let to_range = |(a, b): (u128, u128)| UidRange::new(u32::try_from(a).ok()?, u32::try_from(b).ok()?);
        Some(match self.range_of(4)? {
            Cond::Is(r) => Match::SkUid(Cond::Is(to_range(r)?)),
            Cond::Not(r) => Match::SkUid(Cond::Not(to_range(r)?)),
        })
    }

    /// A big-endian value or range of `len` bytes: `cmp eq|neq`, `cmp gte` + `cmp lte`, or `range neq`.
    fn range_of(&mut self, len: usize) -> Option<Cond<(u128, u128)>> {
        let be = |v: &[u8]| (v.len() == len).then(|| v.iter().fold(0u128, |acc, b| (acc << 8) | u128::from(*b)));
        if let Some(Expressions::Other { expression_type, attributes }) = self.peek() {
            if expression_type != "range" || attr_u32(attributes, NFTA_RANGE_OP)? != NFT_RANGE_NEQ {
                return None;
            }
            let from = nested_value(attributes, NFTA_RANGE_FROM_DATA)?;
            let to = nested_value(attributes, NFTA_RANGE_TO_DATA)?;
            self.at += 1;
            return Some(Cond::Not((be(&from)?, be(&to)?)));
        }
        let (op, data) = self.cmp()?;
        let v = be(&data)?;
        match op {
            Operator::Equal => Some(Cond::Is((v, v))),
            Operator::NotEqual => Some(Cond::Not((v, v))),
            Operator::GreatherThanEqual => {
                let (op2, data2) = self.cmp()?;
                (op2 == Operator::LessThanEqual).then_some(())?;
                Some(Cond::Is((v, be(&data2)?)))
            }
            _ => None,
        }
    }
}

fn reg(attrs: &[Immediate]) -> Option<Register> {
    attrs.iter().find_map(|a| match a {
        Immediate::DestinationRegister(r) => Some(*r),
        _ => None,
    })
}

fn imm_data(attrs: &[Immediate]) -> Option<Vec<u8>> {
    attrs.iter().find_map(|a| match a {
        Immediate::Data(DataAttribute::Value(v)) => Some(v.clone()),
        _ => None,
    })
}

fn payload(attrs: &[Payload]) -> Option<(u32, u32, u32)> {
    let (mut base, mut offset, mut len) = (None, None, None);
    for a in attrs {
        match a {
            Payload::Base(b) => base = Some(*b),
            Payload::Offset(o) => offset = Some(*o),
            Payload::Len(l) => len = Some(*l),
            _ => {}
        }
    }
    Some((base?, offset?, len?))
}

/// An attribute's value bytes (the crate keeps unknown expressions' attributes raw).
fn attr(attrs: &[DefaultNla], kind: u16) -> Option<Vec<u8>> {
    attrs.iter().find(|a| a.kind() & 0x3fff == kind).map(|a| {
        let mut v = vec![0u8; a.value_len()];
        a.emit_value(&mut v);
        v
    })
}

fn attr_u32(attrs: &[DefaultNla], kind: u16) -> Option<u32> {
    Some(u32::from_be_bytes(attr(attrs, kind)?.try_into().ok()?))
}

/// The `NFTA_DATA_VALUE` inside a nested data attribute.
fn nested_value(attrs: &[DefaultNla], kind: u16) -> Option<Vec<u8>> {
    let inner = attr(attrs, kind)?;
    let len = usize::from(u16::from_ne_bytes(inner.get(..2)?.try_into().ok()?));
    let kind = u16::from_ne_bytes(inner.get(2..4)?.try_into().ok()?) & 0x3fff;
    (kind == 1).then(|| inner.get(4..len).map(<[u8]>::to_vec))?
}

fn port(data: &[u8]) -> Option<Port> {
    Port::new(u16::from_be_bytes(data.try_into().ok()?))
}

fn addr(data: &[u8]) -> Option<IpAddr> {
    match data.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(data).ok()?))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(data).ok()?))),
        _ => None,
    }
}

fn addr_len(f: Family) -> usize {
    match f {
        Family::V4 => 4,
        Family::V6 => 16,
    }
}

/// The prefix length of a contiguous netmask.
fn prefix_len(mask: &[u8]) -> Option<u8> {
    let width = 8 * mask.len() as u32;
    if width == 0 || width > 128 {
        return None;
    }
    let bits = mask.iter().fold(0u128, |acc, b| (acc << 8) | u128::from(*b));
    let ones = (bits << (128 - width)).leading_ones().min(width);
    let expected = if ones == 0 { 0 } else { (u128::MAX << (128 - ones)) >> (128 - width) };
    (expected == bits).then_some(ones as u8)
}

/// The interface a 16-byte, NUL-padded name is, if it is one we use.
fn interface(data: &[u8]) -> Option<Interface> {
    let name = data.split(|b| *b == 0).next()?;
    (name == Interface::LOOPBACK.0.as_bytes()).then_some(Interface::LOOPBACK)
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
    use netlink_packet_netfilter::nftables::{NfTablesMessage, SetElementMessage};
    use netlink_packet_netfilter::{NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily};

    use super::*;
    use crate::core::mesh::{self, PodNetwork};
    use crate::core::nft::{self, Ruleset};
    use crate::core::rules;

    /// Every golden case's nftables rule set.
    fn golden_rule_sets() -> Vec<(String, Ruleset)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
        let mut out = Vec::new();
        for mesh_dir in ["consul", "kuma"] {
            for e in std::fs::read_dir(dir.join(mesh_dir)).unwrap() {
                let path = e.unwrap().path();
                if path.extension().is_none_or(|x| x != "json") {
                    continue;
                }
                let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
                let a: mesh::Annotations = serde_json::from_value(doc["annotations"].clone()).unwrap();
                let net = PodNetwork { has_ipv6: true };
                if let Some(r) = mesh::classify(&a, net).unwrap() {
                    out.push((path.display().to_string(), nft::from_rules(&rules::build(&r))));
                }
            }
        }
        assert!(out.len() >= 8, "golden cases: {}", out.len());
        out
    }

    /// The nf_tables messages of a batch, parsed back from its bytes, with their families.
    fn parse(mut bytes: &[u8]) -> Vec<(Family, NfTablesMessage)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len = u32::from_ne_bytes(bytes[..4].try_into().unwrap()) as usize;
            let msg = NetlinkMessage::<NetfilterMessage>::deserialize(&bytes[..len]).unwrap();
            if let NetlinkPayload::InnerMessage(NetfilterMessage {
                header,
                inner: NetfilterMessageInner::NfTables(m),
                ..
            }) = msg.payload
            {
                let family = match header.family {
                    NetfilterProtoFamily::IPv4 => Family::V4,
                    NetfilterProtoFamily::IPv6 => Family::V6,
                    f => panic!("family {f:?}"),
                };
                out.push((family, m));
            }
            bytes = &bytes[(len + 3) & !3..];
        }
        out
    }

    #[test]
    fn every_rule_and_set_of_every_golden_case_reads_back_as_written() {
        for (case, ruleset) in golden_rule_sets() {
            let batch = super::super::encode::replace(&ruleset, 0);
            let msgs = parse(&batch.end_bytes());
            for t in &ruleset.tables {
                let want: Vec<(String, SeenRule)> = t
                    .chains
                    .iter()
                    .flat_map(|c| c.rules.iter().map(|r| (c.name.clone(), SeenRule::Ours(r.clone()))))
                    .collect();
                let got: Vec<(String, SeenRule)> = msgs
                    .iter()
                    .filter(|(f, _)| *f == t.family)
                    .filter_map(|(_, m)| match m {
                        NfTablesMessage::NewRule(r) => rule(&r.attributes, t.family),
                        _ => None,
                    })
                    .collect();
                assert_eq!(got, want, "{case} {:?}", t.family);
                for s in &t.sets {
                    let dumps: Vec<Vec<SetElementList>> = msgs
                        .iter()
                        .filter(|(f, _)| *f == t.family)
                        .filter_map(|(_, m)| match m {
                            NfTablesMessage::NewSetElement(SetElementMessage { attributes })
                                if attributes.iter().any(|a| matches!(a, SetElementList::Set(n) if *n == s.name)) =>
                            {
                                Some(attributes.clone())
                            }
                            _ => None,
                        })
                        .collect();
                    assert_eq!(intervals(s.key, &dumps), s.intervals, "{case} set {}", s.name);
                }
                let chains: Vec<SeenChain> = msgs
                    .iter()
                    .filter(|(f, _)| *f == t.family)
                    .filter_map(|(_, m)| match m {
                        NfTablesMessage::NewChain(c) => chain(&c.attributes),
                        _ => None,
                    })
                    .collect();
                let want: Vec<SeenChain> =
                    t.chains.iter().map(|c| SeenChain { name: c.name.clone(), hook: c.hook.map(Ok) }).collect();
                assert_eq!(chains, want, "{case}");
            }
        }
    }

    #[test]
    fn intervals_to_the_largest_key_and_single_keys_read_back() {
        let key = SetKey::InetService;
        let set = vec![
            Interval { first: 1, last: 1 },
            Interval { first: 80, last: 90 },
            Interval { first: 65000, last: 65535 },
        ];
        let elements = super::super::encode::interval_elements(key, &set);
        assert_eq!(elements.len(), 5, "no end element after the largest key");
        assert_eq!(intervals(key, &[vec![SetElementList::Elements(elements)]]), set);
    }

    #[test]
    fn netmasks_give_their_prefix_length() {
        assert_eq!(prefix_len(&[255, 255, 255, 0]), Some(24));
        assert_eq!(prefix_len(&[255, 255, 255, 255]), Some(32));
        assert_eq!(prefix_len(&[0, 0, 0, 0]), Some(0));
        assert_eq!(prefix_len(&[255, 0, 255, 0]), None);
        assert_eq!(prefix_len(&[0xff; 16]), Some(128));
    }

    #[test]
    fn comments_come_out_of_user_data() {
        assert_eq!(udata_comment(&super::super::encode::comment_udata("kuma/mesh/x")).as_deref(), Some("kuma/mesh/x"));
        assert_eq!(udata_comment(&[1, 2, 0, 0]), None);
    }
}

//! A [`Ruleset`] as one nf_tables batch: the netlink messages the kernel commits atomically.
//!
//! The messages are built with `netlink-packet-netfilter`'s types; the few expressions it has no
//! type for (`ct`, `nat`, `redir`, `log`, `byteorder`, `range`) are written as raw attributes
//! from the kernel's uapi numbers below. Every message asks for an acknowledgement, so the reply
//! names the element the kernel refused.
//!
//! The expression sequences are the ones `nft` itself generates for the same rule (see
//! `nft --debug=netlink`), so `nft list ruleset` shows our rules in familiar words.

use std::net::IpAddr;

use netlink_packet_core::{
    DefaultNla, NLA_F_NESTED, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkMessage,
};
use netlink_packet_netfilter::nftables::{
    ChainAttribute, ChainMessage, Cmp, DataAttribute, ExpressionAttribute, Expressions, Hook, Immediate, ListAttribute,
    Lookup, Meta, MetaKey, NfTablesMessage, Operator, Payload, Register, RuleAttribute, RuleMessage, SetAttribute,
    SetElementAttribute, SetElementFlags, SetElementList, SetElementMessage, SetFlags, SetMessage, TableAttribute,
    TableFlags, TableMessage, Verdict, VerdictAttribute,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};

use crate::core::nft::render;
use crate::core::nft::{
    Action, Interval, Match, NftChain, NftRule, NftSet, NftTable, Ruleset, SetKey, TABLE, TABLE_COMMENT, nft_family,
};
use crate::core::redirect::Family;
use crate::core::rules::{Cond, CtState, Proto};

/// `NFNL_SUBSYS_NFTABLES`: the batch's resource id.
const NFNL_SUBSYS_NFTABLES: u16 = 10;

// Payload bases and offsets.
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;

// Expressions without a type in the crate: their attribute numbers (include/uapi/linux/netfilter/nf_tables.h).
const NFTA_BYTEORDER_SREG: u16 = 1;
const NFTA_BYTEORDER_DREG: u16 = 2;
pub(super) const NFTA_BYTEORDER_OP: u16 = 3;
const NFTA_BYTEORDER_LEN: u16 = 4;
const NFTA_BYTEORDER_SIZE: u16 = 5;
pub(super) const NFT_BYTEORDER_HTON: u32 = 1;
const NFTA_RANGE_SREG: u16 = 1;
pub(super) const NFTA_RANGE_OP: u16 = 2;
pub(super) const NFTA_RANGE_FROM_DATA: u16 = 3;
pub(super) const NFTA_RANGE_TO_DATA: u16 = 4;
pub(super) const NFT_RANGE_NEQ: u32 = 1;
const NFTA_DATA_VALUE: u16 = 1;
pub(super) const NFTA_CT_DREG: u16 = 1;
pub(super) const NFTA_CT_KEY: u16 = 2;
pub(super) const NFTA_CT_SREG: u16 = 4;
pub(super) const NFT_CT_STATE: u32 = 0;
pub(super) const NFT_CT_ZONE: u32 = 17;
pub(super) const NF_CT_STATE_INVALID_BIT: u32 = 1;
pub(super) const NFTA_LOG_PREFIX: u16 = 2;
pub(super) const NFTA_LOG_LEVEL: u16 = 5;
pub(super) const NFTA_REDIR_REG_PROTO_MIN: u16 = 1;
const NFTA_REDIR_FLAGS: u16 = 3;
pub(super) const NFTA_NAT_TYPE: u16 = 1;
const NFTA_NAT_FAMILY: u16 = 2;
const NFTA_NAT_REG_ADDR_MIN: u16 = 3;
pub(super) const NFTA_NAT_REG_PROTO_MIN: u16 = 5;
const NFTA_NAT_FLAGS: u16 = 7;
pub(super) const NFT_NAT_DNAT: u32 = 1;
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 2;
pub(super) const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const NFPROTO_IPV4: u32 = 2;
const NFPROTO_IPV6: u32 = 10;
/// `NFT_REG_1`, `NFT_REG_2` as the kernel numbers them in attributes.
const REG1: u32 = 1;
const REG2: u32 = 2;

// nft's own type numbers and user data, so `nft list` prints our sets and comments.
const NFT_TYPE_IPADDR: u32 = 7;
const NFT_TYPE_IP6ADDR: u32 = 8;
const NFT_TYPE_INET_SERVICE: u32 = 13;
const NFT_TYPE_UID: u32 = 24;
/// The user-data TLV that holds a comment (tables, rules).
pub(super) const UDATA_COMMENT: u8 = 0;
/// The set user-data TLV that holds the key's byte order.
const UDATA_SET_KEYBYTEORDER: u8 = 0;
const BYTEORDER_HOST_ENDIAN: u32 = 1;
const BYTEORDER_BIG_ENDIAN: u32 = 2;

/// The largest number of set elements in one message (each is well under 64 bytes).
const ELEMENTS_PER_MESSAGE: usize = 1024;

/// A batch ready to send, and what each of its messages does (for error messages).
///
/// Only the last message asks for an acknowledgement: the kernel reports every refused message
/// anyway (it checks the whole batch before it gives up), so the answers are the refusals, if
/// any, then the acknowledgement of the last message — one answer in the common case instead of
/// one per message.
#[derive(Debug)]
pub struct Batch {
    bytes: Vec<u8>,
    /// Where the last message added starts in `bytes`.
    last_at: usize,
    /// The name of the tables the batch works on.
    table: &'static str,
    /// The tables it creates are dormant (their base chains hook into nothing).
    dormant: bool,
    /// The sequence number of the batch-begin message; the messages follow it.
    pub first_seq: u32,
    /// What each message does, by sequence number after `first_seq`.
    pub what: Vec<String>,
}

impl Batch {
    /// A batch on our tables whose sequence numbers start after `seq`.
    pub fn new(seq: u32) -> Batch {
        Batch::on_table(TABLE, seq)
    }

    /// A batch on tables named `table`.
    pub fn on_table(table: &'static str, seq: u32) -> Batch {
        let mut b = Batch {
            bytes: Vec::with_capacity(4096),
            last_at: 0,
            table,
            dormant: false,
            first_seq: seq + 1,
            what: Vec::new(),
        };
        b.control(ControlMessage::BatchBegin, seq + 1);
        b
    }

    /// A batch whose tables, named `table`, are created dormant: the kernel checks and loads
    /// everything they use, but their base chains hook into nothing (the feature probe, which
    /// runs in the host's namespace).
    pub fn dormant(table: &'static str, seq: u32) -> Batch {
        Batch { dormant: true, ..Batch::on_table(table, seq) }
    }

    /// The sequence number of the last message added.
    pub fn last_seq(&self) -> u32 {
        self.first_seq + self.what.len() as u32
    }

    /// Does the batch hold any message besides its begin?
    pub fn is_empty(&self) -> bool {
        self.what.is_empty()
    }

    /// What the message with sequence number `seq` does.
    pub fn describe(&self, seq: u32) -> &str {
        match seq.checked_sub(self.first_seq + 1) {
            Some(i) => self.what.get(i as usize).map_or("the batch", String::as_str),
            None => "the batch",
        }
    }

    /// The batch's bytes with its end message: the kernel commits it.
    pub fn end_bytes(&self) -> Vec<u8> {
        let mut ended = Batch {
            bytes: self.acked_bytes(),
            last_at: self.last_at,
            table: self.table,
            dormant: self.dormant,
            first_seq: self.first_seq,
            what: Vec::new(),
        };
        ended.control(ControlMessage::BatchEnd, self.last_seq() + 1);
        ended.bytes
    }

    /// The batch's bytes without an end message: the kernel checks every message, then aborts
    /// (a dry run; `nft --check` works the same way).
    pub fn dry_run_bytes(&self) -> Vec<u8> {
        self.acked_bytes()
    }

    /// The messages, the last one asking for an acknowledgement.
    fn acked_bytes(&self) -> Vec<u8> {
        let mut bytes = self.bytes.clone();
        if !self.what.is_empty() {
            // nlmsghdr: length (4 bytes), type (2), flags (2), …
            let at = self.last_at + 6;
            let flags = u16::from_ne_bytes([bytes[at], bytes[at + 1]]) | NLM_F_ACK;
            bytes[at..at + 2].copy_from_slice(&flags.to_ne_bytes());
        }
        bytes
    }

    fn control(&mut self, msg: ControlMessage, seq: u32) {
        let header = NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES);
        self.emit(NetfilterMessage::new(header, msg), NLM_F_REQUEST, seq);
    }

    fn emit(&mut self, msg: NetfilterMessage, flags: u16, seq: u32) {
        let mut m = NetlinkMessage::from(msg);
        m.header.flags = flags;
        m.header.sequence_number = seq;
        // finalize() measures the message once (a walk of every nested attribute) and records it in
        // the header; measuring it again would walk it all again.
        m.finalize();
        let at = self.bytes.len();
        self.bytes.resize(at + m.header.length as usize, 0);
        m.serialize(&mut self.bytes[at..]);
    }

    /// Adds an nf_tables message; `what` says what it does.
    pub fn push(&mut self, family: Family, msg: NfTablesMessage, flags: u16, what: String) {
        let seq = self.last_seq() + 1;
        self.what.push(what);
        self.last_at = self.bytes.len();
        let header = NetfilterHeader::new(proto_family(family), 0, 0);
        self.emit(NetfilterMessage::new(header, msg), NLM_F_REQUEST | flags, seq);
    }

    /// Deletes our table in `family` if there is one: creates it if missing, then deletes it
    /// (a delete alone would fail on a namespace without it).
    pub fn delete_table(&mut self, family: Family) {
        let (fam, table) = (nft_family(family), self.table);
        self.push(
            family,
            table_msg_plain(table, NfTablesMessage::NewTable),
            NLM_F_CREATE,
            format!("add table {fam} {table}"),
        );
        self.push(
            family,
            table_msg_plain(table, NfTablesMessage::DeleteTable),
            0,
            format!("delete table {fam} {table}"),
        );
    }

    /// Creates a table with everything in it.
    pub fn add_table(&mut self, t: &NftTable, set_ids: &mut u32) {
        let (family, fam, table) = (t.family, nft_family(t.family), self.table);
        self.push(
            family,
            table_msg(table, if self.dormant { TableFlags::Dormant } else { TableFlags::empty() }),
            NLM_F_CREATE | NLM_F_EXCL,
            format!("create table {fam} {table}"),
        );
        let mut ids = Vec::new();
        for s in &t.sets {
            *set_ids += 1;
            ids.push((s.name.as_str(), *set_ids));
            self.add_set(family, s, *set_ids);
        }
        for c in &t.chains {
            self.push(
                family,
                chain_msg(table, c),
                NLM_F_CREATE | NLM_F_EXCL,
                format!("add chain {fam} {table} {}", c.name),
            );
        }
        for c in &t.chains {
            for (i, r) in c.rules.iter().enumerate() {
                let what = format!("rule {} of chain {fam} {table} {} ({})", i + 1, c.name, render::rule(r, family));
                self.push(family, rule_msg(table, family, &c.name, r, &ids), NLM_F_CREATE | NLM_F_APPEND, what);
            }
        }
    }

    fn add_set(&mut self, family: Family, s: &NftSet, id: u32) {
        let (fam, table) = (nft_family(family), self.table);
        let order = if s.key == SetKey::Uid { BYTEORDER_HOST_ENDIAN } else { BYTEORDER_BIG_ENDIAN };
        let key_type = key_type(s.key);
        let mut udata = vec![UDATA_SET_KEYBYTEORDER, 4];
        udata.extend_from_slice(&order.to_ne_bytes());
        let msg = NfTablesMessage::NewSet(SetMessage {
            attributes: vec![
                SetAttribute::Table(table.into()),
                SetAttribute::Name(s.name.clone()),
                SetAttribute::Flags(SetFlags::Interval),
                SetAttribute::KeyType(key_type),
                SetAttribute::KeyLen(s.key.bytes() as u32),
                SetAttribute::Id(id),
                SetAttribute::UserData(udata),
            ],
        });
        self.push(family, msg, NLM_F_CREATE | NLM_F_EXCL, format!("add set {fam} {table} {}", s.name));
        let elements = interval_elements(s.key, &s.intervals);
        for (n, chunk) in elements.chunks(ELEMENTS_PER_MESSAGE).enumerate() {
            let msg = NfTablesMessage::NewSetElement(SetElementMessage {
                attributes: vec![
                    SetElementList::Table(table.into()),
                    SetElementList::Set(s.name.clone()),
                    SetElementList::SetId(id),
                    SetElementList::Elements(chunk.to_vec()),
                ],
            });
            let what = format!("add elements (part {}) to set {fam} {table} {}", n + 1, s.name);
            self.push(family, msg, NLM_F_CREATE | NLM_F_EXCL, what);
        }
    }
}

/// nft's number for a key type (what `nft list` prints the elements as).
pub(super) fn key_type(key: SetKey) -> u32 {
    match key {
        SetKey::Ipv4Addr => NFT_TYPE_IPADDR,
        SetKey::Ipv6Addr => NFT_TYPE_IP6ADDR,
        SetKey::InetService => NFT_TYPE_INET_SERVICE,
        SetKey::Uid => NFT_TYPE_UID,
    }
}

pub(super) fn proto_family(f: Family) -> NetfilterProtoFamily {
    match f {
        Family::V4 => NetfilterProtoFamily::IPv4,
        Family::V6 => NetfilterProtoFamily::IPv6,
    }
}

/// A comment as nft stores it in user data: a TLV holding the NUL-terminated text.
pub fn comment_udata(text: &str) -> Vec<u8> {
    let mut v = vec![UDATA_COMMENT, (text.len() + 1) as u8];
    v.extend_from_slice(text.as_bytes());
    v.push(0);
    v
}

/// A table message naming the table only.
fn table_msg_plain(table: &str, kind: fn(TableMessage) -> NfTablesMessage) -> NfTablesMessage {
    kind(TableMessage { attributes: vec![TableAttribute::Name(table.into())] })
}

/// The message that creates a table, with its flags and our comment.
fn table_msg(table: &str, flags: TableFlags) -> NfTablesMessage {
    NfTablesMessage::NewTable(TableMessage {
        attributes: vec![
            TableAttribute::Name(table.into()),
            TableAttribute::Flags(flags),
            TableAttribute::UserData(comment_udata(TABLE_COMMENT)),
        ],
    })
}

fn chain_msg(table: &str, c: &NftChain) -> NfTablesMessage {
    let mut attributes = vec![ChainAttribute::Table(table.into()), ChainAttribute::Name(c.name.clone())];
    if let Some(h) = c.hook {
        attributes.push(ChainAttribute::Hook(vec![
            Hook::Number(netlink_packet_netfilter::nftables::HookNumber::Other(h.hook.number())),
            Hook::Priority(h.priority as u32),
        ]));
        attributes.push(ChainAttribute::Policy(NF_ACCEPT));
        attributes.push(ChainAttribute::Type(h.kind.name().into()));
    }
    NfTablesMessage::NewChain(ChainMessage { attributes })
}

fn rule_msg(table: &str, family: Family, chain: &str, r: &NftRule, set_ids: &[(&str, u32)]) -> NfTablesMessage {
    NfTablesMessage::NewRule(RuleMessage {
        attributes: vec![
            RuleAttribute::Table(table.into()),
            RuleAttribute::Chain(chain.into()),
            RuleAttribute::Expressions(expressions(family, r, set_ids)),
            RuleAttribute::UserData(comment_udata(&r.comment)),
        ],
    })
}

/// The expressions of a rule: each match loads a value into register 1 and compares it, then the
/// action.
pub fn expressions(family: Family, r: &NftRule, set_ids: &[(&str, u32)]) -> Vec<ListAttribute<ExpressionAttribute>> {
    let mut e = Exprs(Vec::new());
    for m in &r.matches {
        match m {
            Match::L4Proto(p) => {
                e.meta(MetaKey::L4Proto);
                e.cmp(Operator::Equal, vec![proto_number(*p)]);
            }
            Match::Saddr(c) | Match::Daddr(c) => {
                let n = value(c);
                e.addr(family, matches!(m, Match::Saddr(_)));
                if n.prefix_len() < n.max_prefix_len() {
                    e.bitwise(addr_bytes(n.netmask()), vec![0; addr_len(family)]);
                }
                e.cmp(op(c), addr_bytes(n.trunc().network()));
            }
            Match::SaddrIn(s) | Match::DaddrIn(s) => {
                e.addr(family, matches!(m, Match::SaddrIn(_)));
                e.lookup(s, set_ids);
            }
            Match::Sport(c) | Match::Dport(c) => {
                e.port(matches!(m, Match::Sport(_)));
                let p = *value(c);
                e.range(c, p.first() == p.last(), p.first().to_be_bytes().to_vec(), p.last().to_be_bytes().to_vec());
            }
            Match::DportIn(s) => {
                e.port(false);
                e.lookup(s, set_ids);
            }
            Match::SkUid(c) => {
                e.meta(MetaKey::SocketUserId);
                let u = *value(c);
                if u.first() == u.last() {
                    e.cmp(op(c), u.first().to_ne_bytes().to_vec());
                } else {
                    e.hton32();
                    e.range(c, false, u.first().to_be_bytes().to_vec(), u.last().to_be_bytes().to_vec());
                }
            }
            Match::SkUidIn(s) => {
                e.meta(MetaKey::SocketUserId);
                e.hton32();
                e.lookup(s, set_ids);
            }
            Match::IifName(i) | Match::OifName(i) => {
                e.meta(if matches!(m, Match::IifName(_)) { MetaKey::Iifname } else { MetaKey::Oifname });
                let mut name = [0u8; 16];
                name[..i.0.len()].copy_from_slice(i.0.as_bytes());
                e.cmp(Operator::Equal, name.to_vec());
            }
            Match::CtState(CtState::Invalid) => {
                e.other("ct", vec![u32_attr(NFTA_CT_KEY, NFT_CT_STATE), u32_attr(NFTA_CT_DREG, REG1)]);
                e.bitwise(NF_CT_STATE_INVALID_BIT.to_ne_bytes().to_vec(), vec![0; 4]);
                e.cmp(Operator::NotEqual, vec![0; 4]);
            }
        }
    }
    // Every rule counts what it matched, as iptables' rules do: `nft list ruleset` shows it.
    e.other("counter", Vec::new());
    match &r.action {
        Action::Jump(c) => e.verdict(Verdict::Jump, Some(c)),
        Action::Return => e.verdict(Verdict::Return, None),
        Action::Drop => e.verdict(Verdict::Other(NF_DROP), None),
        Action::CtZone(z) => {
            e.immediate(REG1, z.to_ne_bytes().to_vec());
            e.other("ct", vec![u32_attr(NFTA_CT_KEY, NFT_CT_ZONE), u32_attr(NFTA_CT_SREG, REG1)]);
        }
        Action::Log { prefix, level } => {
            let mut text = prefix.as_bytes().to_vec();
            text.push(0);
            e.other("log", vec![DefaultNla::new(NFTA_LOG_PREFIX, text), u32_attr(NFTA_LOG_LEVEL, u32::from(*level))]);
        }
        Action::Redirect(p) => {
            e.immediate(REG1, p.get().to_be_bytes().to_vec());
            e.other(
                "redir",
                vec![
                    u32_attr(NFTA_REDIR_REG_PROTO_MIN, REG1),
                    u32_attr(NFTA_REDIR_FLAGS, NF_NAT_RANGE_PROTO_SPECIFIED),
                ],
            );
        }
        Action::Dnat(ip, port) => {
            let (nfproto, bytes) = match ip {
                IpAddr::V4(a) => (NFPROTO_IPV4, a.octets().to_vec()),
                IpAddr::V6(a) => (NFPROTO_IPV6, a.octets().to_vec()),
            };
            e.immediate(REG1, bytes);
            let mut attrs = vec![
                u32_attr(NFTA_NAT_TYPE, NFT_NAT_DNAT),
                u32_attr(NFTA_NAT_FAMILY, nfproto),
                u32_attr(NFTA_NAT_REG_ADDR_MIN, REG1),
            ];
            if let Some(p) = port {
                e.immediate(REG2, p.get().to_be_bytes().to_vec());
                attrs.push(u32_attr(NFTA_NAT_REG_PROTO_MIN, REG2));
                attrs.push(u32_attr(NFTA_NAT_FLAGS, NF_NAT_RANGE_PROTO_SPECIFIED));
            }
            e.other("nat", attrs);
        }
    }
    e.0
}

/// A rule's expressions under construction.
struct Exprs(Vec<ListAttribute<ExpressionAttribute>>);

impl Exprs {
    fn meta(&mut self, key: MetaKey) {
        self.0.push(Expressions::Meta(vec![Meta::Key(key), Meta::DestinationRegister(Register::Reg1)]).into());
    }

    fn cmp(&mut self, op: Operator, data: Vec<u8>) {
        self.0.push(
            Expressions::Cmp(vec![
                Cmp::SourceRegister(Register::Reg1),
                Cmp::Op(op),
                Cmp::Data(DataAttribute::Value(data)),
            ])
            .into(),
        );
    }

    fn payload(&mut self, base: u32, offset: u32, len: u32) {
        self.0.push(
            Expressions::Payload(vec![
                Payload::DestinationRegister(Register::Reg1),
                Payload::Base(base),
                Payload::Offset(offset),
                Payload::Len(len),
            ])
            .into(),
        );
    }

    /// Loads the source or destination address.
    fn addr(&mut self, family: Family, source: bool) {
        let (offset, len) = match (family, source) {
            (Family::V4, true) => (12, 4),
            (Family::V4, false) => (16, 4),
            (Family::V6, true) => (8, 16),
            (Family::V6, false) => (24, 16),
        };
        self.payload(NFT_PAYLOAD_NETWORK_HEADER, offset, len);
    }

    /// Loads the transport source or destination port.
    fn port(&mut self, source: bool) {
        self.payload(NFT_PAYLOAD_TRANSPORT_HEADER, if source { 0 } else { 2 }, 2);
    }

    fn bitwise(&mut self, mask: Vec<u8>, xor: Vec<u8>) {
        use netlink_packet_netfilter::nftables::Bitwise;
        self.0.push(
            Expressions::Bitwise(vec![
                Bitwise::SourceRegister(Register::Reg1),
                Bitwise::DestinationRegister(Register::Reg1),
                Bitwise::Length(mask.len() as u32),
                Bitwise::Mask(DataAttribute::Value(mask)),
                Bitwise::Xor(DataAttribute::Value(xor)),
            ])
            .into(),
        );
    }

    /// Converts the 4-byte host-order value in register 1 to network order (UID ranges and sets
    /// compare bytes, so they hold big-endian keys).
    fn hton32(&mut self) {
        self.other(
            "byteorder",
            vec![
                u32_attr(NFTA_BYTEORDER_SREG, REG1),
                u32_attr(NFTA_BYTEORDER_DREG, REG1),
                u32_attr(NFTA_BYTEORDER_OP, NFT_BYTEORDER_HTON),
                u32_attr(NFTA_BYTEORDER_LEN, 4),
                u32_attr(NFTA_BYTEORDER_SIZE, 4),
            ],
        );
    }

    /// Compares register 1 with a value (`single`) or an inclusive range of big-endian values.
    fn range<T>(&mut self, c: &Cond<T>, single: bool, first: Vec<u8>, last: Vec<u8>) {
        match (c, single) {
            (_, true) => self.cmp(op(c), first),
            (Cond::Is(_), false) => {
                self.cmp(Operator::GreatherThanEqual, first);
                self.cmp(Operator::LessThanEqual, last);
            }
            (Cond::Not(_), false) => self.other(
                "range",
                vec![
                    u32_attr(NFTA_RANGE_SREG, REG1),
                    u32_attr(NFTA_RANGE_OP, NFT_RANGE_NEQ),
                    DefaultNla::new(NFTA_RANGE_FROM_DATA | NLA_F_NESTED, nla(NFTA_DATA_VALUE, &first)),
                    DefaultNla::new(NFTA_RANGE_TO_DATA | NLA_F_NESTED, nla(NFTA_DATA_VALUE, &last)),
                ],
            ),
        }
    }

    fn lookup(&mut self, set: &str, set_ids: &[(&str, u32)]) {
        let mut attrs = vec![Lookup::Set(set.into()), Lookup::SourceRegister(Register::Reg1)];
        if let Some((_, id)) = set_ids.iter().find(|(n, _)| *n == set) {
            attrs.push(Lookup::SetId(*id));
        }
        self.0.push(Expressions::Lookup(attrs).into());
    }

    fn immediate(&mut self, reg: u32, data: Vec<u8>) {
        let reg = if reg == REG2 { Register::Reg2 } else { Register::Reg1 };
        self.0.push(
            Expressions::Immediate(vec![
                Immediate::DestinationRegister(reg),
                Immediate::Data(DataAttribute::Value(data)),
            ])
            .into(),
        );
    }

    fn verdict(&mut self, code: Verdict, chain: Option<&str>) {
        let mut v = vec![VerdictAttribute::Code(code)];
        if let Some(c) = chain {
            v.push(VerdictAttribute::Chain(c.into()));
        }
        self.0.push(
            Expressions::Immediate(vec![
                Immediate::DestinationRegister(Register::Verdict),
                Immediate::Data(DataAttribute::Verdict(v)),
            ])
            .into(),
        );
    }

    fn other(&mut self, name: &str, attributes: Vec<DefaultNla>) {
        self.0.push(Expressions::Other { expression_type: name.into(), attributes }.into());
    }
}

fn u32_attr(kind: u16, v: u32) -> DefaultNla {
    DefaultNla::new(kind, v.to_be_bytes().to_vec())
}

/// One attribute's bytes (for a nested attribute written by hand).
fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + value.len() + 3);
    v.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    v.extend_from_slice(&kind.to_ne_bytes());
    v.extend_from_slice(value);
    v.resize((v.len() + 3) & !3, 0);
    v
}

fn op<T>(c: &Cond<T>) -> Operator {
    match c {
        Cond::Is(_) => Operator::Equal,
        Cond::Not(_) => Operator::NotEqual,
    }
}

fn value<T>(c: &Cond<T>) -> &T {
    match c {
        Cond::Is(v) | Cond::Not(v) => v,
    }
}

fn proto_number(p: Proto) -> u8 {
    match p {
        Proto::Tcp => libc::IPPROTO_TCP as u8,
        Proto::Udp => libc::IPPROTO_UDP as u8,
    }
}

fn addr_len(f: Family) -> usize {
    match f {
        Family::V4 => 4,
        Family::V6 => 16,
    }
}

fn addr_bytes(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// A key's bytes: big-endian, `len` bytes.
pub fn key_bytes(key: SetKey, v: u128) -> Vec<u8> {
    v.to_be_bytes()[16 - key.bytes()..].to_vec()
}

/// The elements of an interval set: each interval's first key, and the key after its last
/// marked as an interval end (none when the interval runs to the largest key).
pub(super) fn interval_elements(key: SetKey, intervals: &[Interval]) -> Vec<ListAttribute<SetElementAttribute>> {
    let mut out = Vec::with_capacity(2 * intervals.len());
    for i in intervals {
        out.push(ListAttribute::Element(vec![SetElementAttribute::Key(DataAttribute::Value(key_bytes(key, i.first)))]));
        if i.last < key.max() {
            out.push(ListAttribute::Element(vec![
                SetElementAttribute::Key(DataAttribute::Value(key_bytes(key, i.last + 1))),
                SetElementAttribute::Flags(SetElementFlags::IntervalEnd),
            ]));
        }
    }
    out
}

/// The batch that replaces our tables: for every family, ours is deleted if there, then the
/// family's table of `rules` (if any) is created with everything in it.
pub fn replace(rules: &Ruleset, seq: u32) -> Batch {
    install(rules, &Family::ALL, seq)
}

/// The batch that installs `rules` where our tables exist in the families `present` only: those
/// are deleted first (with everything in them), the others are only created. Creating is done
/// with `NLM_F_EXCL`, so the batch fails, changing nothing, if a table of ours appeared in a
/// family not in `present` meanwhile. On a namespace without our tables nothing is deleted,
/// which keeps the kernel from having anything to free (see `Nftables::apply`).
pub fn install(rules: &Ruleset, present: &[Family], seq: u32) -> Batch {
    let mut b = Batch::new(seq);
    let mut set_ids = 0;
    for family in Family::ALL {
        if present.contains(&family) {
            b.delete_table(family);
        }
        if let Some(t) = rules.tables.iter().find(|t| t.family == family) {
            b.add_table(t, &mut set_ids);
        }
    }
    b
}

//! The nftables engine: our rules as tables of our own, programmed over `NETLINK_NETFILTER`
//! from the plugin's own process — no `nft`, no `iptables`, no library besides libc.
//!
//! Each operation is one exchange of netlink messages with the kernel in the pod's namespace:
//!
//! - ADD sends **one nf_tables batch** that creates each wanted table with its sets, chains and
//!   rules — in a fresh namespace, every pod's first ADD, nothing else: no read before it. The
//!   kernel commits a batch atomically: the namespace goes from nothing of ours to exactly one
//!   complete copy, or — if the kernel refuses any message — stays exactly as it was. Where a
//!   table of ours exists already (a repeated ADD), the kernel refuses that batch; ADD then reads
//!   the older copy whole, so that a caller failing after the batch (Kuma's `::6`) can put it
//!   back ([`Nftables::undo`]), and sends the batch that deletes it and creates the new one.
//! - CHECK dumps our tables (sets and their elements, chains, rules) and compares them, element by
//!   element, with what ADD would install ([`check`]).
//! - DEL reads which of our tables exist and deletes them in one batch.
//!
//! Nothing outside our tables is touched: other tables (a foreign `nft` table, iptables-nft's own
//! `ip nat`, …) are never named in a batch. The rule set comes from [`crate::core::nft`], the same
//! translation `render --backend nftables` prints.

mod check;
pub mod decode;
pub mod encode;
pub mod features;
pub mod socket;

use thiserror::Error;

use self::decode::{SeenChain, SeenRule, SeenSet};
use self::features::FeatureError;
use self::socket::{NfSocket, SocketError};
use crate::core::nft::{self, NftChain, NftSet, NftTable, Ruleset, TABLE, nft_family};
use crate::core::redirect::Family;
use crate::core::rules::RuleSet;
use crate::kernel::deadline::Deadline;
use crate::kernel::netfilter::{Mismatch, Removed, UNDO_BUDGET};
use crate::kernel::netns::{Netns, NetnsError};
use netlink_packet_netfilter::NetfilterProtoFamily;
use netlink_packet_netfilter::nftables::{
    ChainAttribute, ChainMessage, NfTablesMessage, RuleAttribute, RuleMessage, SetAttribute, SetElementList,
    SetElementMessage, SetMessage, TableAttribute, TableMessage,
};

#[derive(Debug, Error)]
pub enum NftablesError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("nftables in {netns}")]
    Socket {
        netns: String,
        #[source]
        source: SocketError,
    },
    #[error(transparent)]
    Feature(#[from] FeatureError),
}

/// The nftables engine. It keeps no state besides its deadline: everything it needs is in the
/// namespace.
#[derive(Debug, Clone, Copy)]
pub struct Nftables {
    deadline: Deadline,
}

/// What [`Nftables::apply`] replaced, for [`Nftables::undo`].
#[derive(Debug)]
#[must_use = "a caller that fails after apply must undo what it applied"]
pub struct Applied {
    before: Before,
}

/// What of ours the namespace held before an apply.
#[derive(Debug)]
enum Before {
    /// No table of ours (every pod's first ADD).
    Nothing,
    /// Our tables, read back whole before the batch replaced them (a repeated ADD).
    Copy(Ruleset),
    /// Our tables held something the engine does not write (someone edited them): what it was.
    Unrecognisable(String),
}

impl Before {
    /// What `seen` was, as something [`Nftables::undo`] can put back.
    fn of(seen: &Seen) -> Before {
        if seen.tables.is_empty() {
            return Before::Nothing;
        }
        match seen.tables.iter().map(SeenTable::to_table).collect() {
            Ok(tables) => Before::Copy(Ruleset { tables }),
            Err(what) => Before::Unrecognisable(what),
        }
    }
}

/// What of ours a namespace holds, as read back from the kernel.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub tables: Vec<SeenTable>,
}

/// One of our tables as the kernel reports it.
#[derive(Debug, Clone)]
pub struct SeenTable {
    pub family: Family,
    /// With their intervals (`None` for a set whose key is not one of ours).
    pub sets: Vec<(SeenSet, Vec<nft::Interval>)>,
    pub chains: Vec<SeenChain>,
    /// By chain, in order.
    pub rules: Vec<(String, SeenRule)>,
}

/// What an operation would do, for `--dry-run`: the `nft -f` script of it, and what of ours the
/// namespace holds before it.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The rule set to install (`None`: only remove).
    pub install: Option<Ruleset>,
    /// Our tables in the namespace now.
    pub before: Seen,
}

impl Plan {
    /// Is there nothing to do (a removal with nothing of ours there)?
    pub fn is_empty(&self) -> bool {
        self.install.is_none() && self.before.tables.is_empty()
    }

    /// The plan as an `nft -f` script.
    pub fn render(&self) -> String {
        match &self.install {
            Some(r) => format!("# nft -f -\n{}", nft::render::script(r, &Family::ALL)),
            None => {
                let families: Vec<Family> = self.before.tables.iter().map(|t| t.family).collect();
                format!("# nft -f -\n{}", nft::render::script(&Ruleset { tables: Vec::new() }, &families))
            }
        }
    }

    /// The chains the plan removes (what DEL's [`Nftables::remove`] reports).
    pub fn removed(&self) -> Removed {
        self.before.removed()
    }
}

impl SeenTable {
    /// The table as a rule set the engine can write again, or the first thing in it that it
    /// cannot: a set of a key type we do not use, a base chain on another hook or of another
    /// type, a rule of expressions we do not write. (As CHECK, it does not read a base chain's
    /// policy, which we never set: ours accept.)
    fn to_table(&self) -> Result<NftTable, String> {
        let at = format!("{} {TABLE}", nft_family(self.family));
        let mut sets = Vec::with_capacity(self.sets.len());
        for (set, intervals) in &self.sets {
            let Some(key) = set.key else {
                return Err(format!("set {at} {} is not an interval set of a type tproxy-cni writes", set.name));
            };
            sets.push(NftSet { name: set.name.clone(), key, intervals: intervals.clone() });
        }
        let mut chains = Vec::with_capacity(self.chains.len());
        for c in &self.chains {
            let hook = match &c.hook {
                None => None,
                Some(Ok(hook)) => Some(*hook),
                Some(Err(other)) => return Err(format!("chain {at} {} is a base chain of {other}", c.name)),
            };
            chains.push(NftChain { name: c.name.clone(), hook, rules: Vec::new() });
        }
        for (chain, rule) in &self.rules {
            let SeenRule::Ours(rule) = rule else {
                return Err(format!("a rule in {at} {chain} that tproxy-cni does not write"));
            };
            let Some(c) = chains.iter_mut().find(|c| c.name == *chain) else {
                return Err(format!("a rule in {at} {chain}, a chain the kernel did not list"));
            };
            c.rules.push(rule.clone());
        }
        Ok(NftTable { family: self.family, sets, chains })
    }
}

impl Seen {
    /// Every chain of our tables, with its family.
    pub fn removed(&self) -> Removed {
        let chains = self.tables.iter().flat_map(|t| t.chains.iter().map(move |c| (t.family, c.name.clone())));
        Removed { chains: chains.collect() }
    }
}

impl Nftables {
    /// The engine, with every exchange with the kernel ending by `deadline`.
    pub fn new(deadline: Deadline) -> Nftables {
        Nftables { deadline }
    }

    /// Can ADD work? The kernel must have every nf_tables feature a redirect may use; the error
    /// names the ones it lacks.
    pub fn ready(&self) -> Result<(), FeatureError> {
        let missing = features::probe_cached()?;
        if missing.is_empty() { Ok(()) } else { Err(FeatureError::Missing(missing)) }
    }

    /// Installs `sets` (one per family) as our tables, replacing whatever of ours is there, in one
    /// atomic batch: afterwards the namespace holds exactly one copy, or, on failure, what it
    /// held before. Families not in `sets` lose our table.
    pub fn apply(&self, ns: &Netns, sets: &[RuleSet]) -> Result<Applied, NftablesError> {
        let rules = nft::from_rules(sets);
        features::require(&rules)?;
        let mut sock = self.open(ns)?;
        let before = install(&mut sock, &rules).map_err(|e| socket_error(ns, e))?;
        Ok(Applied { before })
    }

    /// Undoes an [`Nftables::apply`] whose caller failed afterwards (Kuma's `::6` could not be
    /// added): the namespace holds again what of ours it held before — nothing after a first ADD
    /// (our tables are removed), the previous copy after a repeated one (one batch replaces ours
    /// with it, atomically). A previous copy holding something the engine does not write (edited
    /// by hand) cannot be written back: ours are removed, with a warning, and the runtime's DEL and
    /// retry start afresh, as after any failed ADD. Best effort, within a budget of its own
    /// ([`UNDO_BUDGET`] at most): a failure is logged, since the caller is already failing with
    /// the error that matters.
    pub fn undo(&self, ns: &Netns, applied: Applied) {
        let recovery = Nftables { deadline: Deadline::after(self.deadline.budget().min(UNDO_BUDGET)) };
        let undone = match &applied.before {
            Before::Nothing => recovery.remove(ns).map(drop),
            Before::Copy(rules) => recovery.put_back(ns, rules),
            Before::Unrecognisable(what) => {
                log::warn!(
                    "the previous copy of our nftables tables cannot be restored (it held {what}): removing ours"
                );
                recovery.remove(ns).map(drop)
            }
        };
        match undone {
            Ok(()) => log::debug!("undid this call's nftables changes"),
            Err(e) => log::warn!("cannot undo this call's nftables changes: {}", crate::text::chain(&e)),
        }
    }

    /// Replaces our tables with `rules`, in one batch.
    fn put_back(&self, ns: &Netns, rules: &Ruleset) -> Result<(), NftablesError> {
        let mut sock = self.open(ns)?;
        let batch = encode::replace(rules, sock.next_seq());
        sock.send(&batch, &batch.end_bytes()).map_err(|e| socket_error(ns, e))?;
        log::debug!("put the previous copy of our nftables tables back");
        Ok(())
    }

    /// Removes our tables from the namespace (both families), in one batch.
    pub fn remove(&self, ns: &Netns) -> Result<Removed, NftablesError> {
        let mut sock = self.open(ns)?;
        let seen = read(&mut sock, false).map_err(|e| socket_error(ns, e))?;
        if seen.tables.is_empty() {
            return Ok(Removed::default());
        }
        let mut batch = encode::Batch::new(sock.next_seq());
        for t in &seen.tables {
            batch.delete_table(t.family);
        }
        let bytes = batch.end_bytes();
        sock.send(&batch, &bytes).map_err(|e| socket_error(ns, e))?;
        log::debug!("removed our nftables tables");
        Ok(seen.removed())
    }

    /// Verifies the namespace holds exactly `sets` in our tables: every expected table, set
    /// (and element), chain and rule, in order, and nothing else in our tables.
    pub fn check(&self, ns: &Netns, sets: &[RuleSet]) -> Result<(), CheckError> {
        let mut sock = self.open(ns)?;
        let seen = read(&mut sock, true).map_err(|e| socket_error(ns, e))?;
        let diffs = check::diff(&nft::from_rules(sets), &seen);
        if diffs.is_empty() { Ok(()) } else { Err(Mismatch(diffs).into()) }
    }

    /// What [`Nftables::apply`] would send (the same batch, whatever the namespace holds).
    pub fn plan_apply(&self, ns: &Netns, sets: &[RuleSet]) -> Result<Plan, NftablesError> {
        let mut sock = self.open(ns)?;
        let before = read(&mut sock, true).map_err(|e| socket_error(ns, e))?;
        Ok(Plan { install: Some(nft::from_rules(sets)), before })
    }

    /// What [`Nftables::remove`] would send.
    pub fn plan_removal(&self, ns: &Netns) -> Result<Plan, NftablesError> {
        let mut sock = self.open(ns)?;
        let before = read(&mut sock, true).map_err(|e| socket_error(ns, e))?;
        Ok(Plan { install: None, before })
    }

    /// Carries out a plan.
    pub fn execute(&self, ns: &Netns, plan: &Plan) -> Result<(), NftablesError> {
        match &plan.install {
            Some(r) => {
                features::require(r)?;
                let mut sock = self.open(ns)?;
                install(&mut sock, r).map(drop).map_err(|e| socket_error(ns, e))
            }
            None => self.remove(ns).map(drop),
        }
    }
}

/// Installs `rules` and returns what of ours was there before.
///
/// Most ADDs are a pod's first, into a namespace without tables of ours, so the first batch only
/// creates ours, without asking what is there: creating is done with `NLM_F_EXCL`, and should a
/// table of ours exist, the kernel refuses the whole batch, changing nothing. Such a repeated ADD
/// then reads our tables whole (for [`Nftables::undo`]) and sends the batch that deletes exactly
/// those and creates the new ones. A batch that deletes nothing also leaves the kernel nothing to
/// free after a grace period, which the socket's close would wait for (milliseconds on a busy
/// node). Should a table of ours appear between that read and the second batch (a concurrent
/// ADD), what appeared is read and the batch that replaces every family is sent instead.
fn install(sock: &mut NfSocket, rules: &Ruleset) -> Result<Before, SocketError> {
    let exists = |r: &Result<(), SocketError>| matches!(r, Err(SocketError::Refused { source, .. }) if source.raw_os_error() == Some(libc::EEXIST));
    let batch = encode::install(rules, &[], sock.next_seq());
    let bytes = batch.end_bytes();
    let sent = sock.send(&batch, &bytes);
    if !exists(&sent) {
        sent?;
        log::debug!(
            "created our nftables tables with one batch ({} messages, {} bytes)",
            batch.what.len(),
            bytes.len()
        );
        return Ok(Before::Nothing);
    }
    let present = our_families(sock)?;
    let before = Before::of(&read_families(sock, &present, true)?);
    let batch = encode::install(rules, &present, sock.next_seq());
    let bytes = batch.end_bytes();
    let sent = sock.send(&batch, &bytes);
    if !exists(&sent) {
        sent?;
        log::debug!("replaced our nftables tables ({present:?}) with one batch ({} messages)", batch.what.len());
        return Ok(before);
    }
    log::debug!("a table of ours appeared meanwhile: replacing every family");
    let before = Before::of(&read(sock, true)?);
    let batch = encode::replace(rules, sock.next_seq());
    sock.send(&batch, &batch.end_bytes())?;
    Ok(before)
}

/// CHECK's failures.
#[derive(Debug, Error)]
pub enum CheckError {
    #[error(transparent)]
    Nftables(#[from] NftablesError),
    #[error(transparent)]
    Mismatch(#[from] Mismatch),
}

impl From<NetnsError> for CheckError {
    fn from(e: NetnsError) -> CheckError {
        CheckError::Nftables(e.into())
    }
}

fn socket_error(ns: &Netns, source: SocketError) -> NftablesError {
    NftablesError::Socket { netns: ns.path().display().to_string(), source }
}

impl Nftables {
    /// Opens a netfilter socket in `ns` ([`Netns::socket`]) whose exchanges end by the engine's
    /// deadline.
    fn open(&self, ns: &Netns) -> Result<NfSocket, NftablesError> {
        let fd = ns
            .socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_NETFILTER)?
            .map_err(|source| socket_error(ns, SocketError::Io { what: "open a netfilter netlink socket", source }))?;
        NfSocket::from_fd(fd, self.deadline).map_err(|e| socket_error(ns, e))
    }
}

/// Reads our tables: their chains always, their sets and rules when `full`.
fn read(sock: &mut NfSocket, full: bool) -> Result<Seen, SocketError> {
    let families = our_families(sock)?;
    read_families(sock, &families, full)
}

/// The families where a table of ours exists (one dump of the namespace's tables).
fn our_families(sock: &mut NfSocket) -> Result<Vec<Family>, SocketError> {
    let tables = sock.dump(
        NetfilterProtoFamily::Unspec,
        NfTablesMessage::GetTable(TableMessage { attributes: Vec::new() }),
        "list nftables tables",
    )?;
    let mut families = Vec::new();
    for (family, msg) in tables {
        let NfTablesMessage::NewTable(TableMessage { attributes }) = msg else { continue };
        let ours = attributes.iter().any(|a| matches!(a, TableAttribute::Name(n) if n == TABLE));
        if let Some(family) = family.filter(|_| ours) {
            families.push(family);
        }
    }
    families.sort();
    Ok(families)
}

/// Reads our tables of `families` ([`read`]).
fn read_families(sock: &mut NfSocket, families: &[Family], full: bool) -> Result<Seen, SocketError> {
    let mut seen = Seen::default();
    for family in families {
        seen.tables.push(read_table(sock, *family, full)?);
    }
    Ok(seen)
}

fn read_table(sock: &mut NfSocket, family: Family, full: bool) -> Result<SeenTable, SocketError> {
    let fam = encode::proto_family(family);
    let table_attr = || ChainAttribute::Table(TABLE.into());
    let mut t = SeenTable { family, sets: Vec::new(), chains: Vec::new(), rules: Vec::new() };
    let in_table = |attrs: &[ChainAttribute]| attrs.iter().any(|a| matches!(a, ChainAttribute::Table(n) if n == TABLE));
    for (_, msg) in sock.dump(
        fam,
        NfTablesMessage::GetChain(ChainMessage { attributes: vec![table_attr()] }),
        "list nftables chains",
    )? {
        if let NfTablesMessage::NewChain(ChainMessage { attributes }) = msg
            && in_table(&attributes)
            && let Some(c) = decode::chain(&attributes)
        {
            t.chains.push(c);
        }
    }
    if !full {
        return Ok(t);
    }
    let request = NfTablesMessage::GetSet(SetMessage { attributes: vec![SetAttribute::Table(TABLE.into())] });
    for (_, msg) in sock.dump(fam, request, "list nftables sets")? {
        let NfTablesMessage::NewSet(SetMessage { attributes }) = msg else { continue };
        if !attributes.iter().any(|a| matches!(a, SetAttribute::Table(n) if n == TABLE)) {
            continue;
        }
        let Some(set) = decode::set(&attributes, family) else { continue };
        let intervals = match set.key {
            Some(key) => {
                let request = NfTablesMessage::GetSetElement(SetElementMessage {
                    attributes: vec![SetElementList::Table(TABLE.into()), SetElementList::Set(set.name.clone())],
                });
                let dumps: Vec<Vec<SetElementList>> = sock
                    .dump(fam, request, "list nftables set elements")?
                    .into_iter()
                    .filter_map(|(_, m)| match m {
                        NfTablesMessage::NewSetElement(SetElementMessage { attributes }) => Some(attributes),
                        _ => None,
                    })
                    .collect();
                decode::intervals(key, &dumps)
            }
            None => Vec::new(),
        };
        t.sets.push((set, intervals));
    }
    let request = NfTablesMessage::GetRule(RuleMessage { attributes: vec![RuleAttribute::Table(TABLE.into())] });
    for (_, msg) in sock.dump(fam, request, "list nftables rules")? {
        let NfTablesMessage::NewRule(RuleMessage { attributes }) = msg else { continue };
        if !attributes.iter().any(|a| matches!(a, RuleAttribute::Table(n) if n == TABLE)) {
            continue;
        }
        if let Some(r) = decode::rule(&attributes, family) {
            t.rules.push(r);
        }
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::decode::{SeenChain, SeenRule, SeenSet};
    use super::*;
    use crate::core::mesh::{self, Annotations, PodNetwork};
    use crate::core::rules;

    /// What reading `t` back from the kernel gives (the decoder's own round trip of every golden
    /// case is pinned in decode.rs).
    fn seen(t: &NftTable) -> SeenTable {
        SeenTable {
            family: t.family,
            sets: t
                .sets
                .iter()
                .map(|s| (SeenSet { name: s.name.clone(), key: Some(s.key) }, s.intervals.clone()))
                .collect(),
            chains: t.chains.iter().map(|c| SeenChain { name: c.name.clone(), hook: c.hook.map(Ok) }).collect(),
            rules: t
                .chains
                .iter()
                .flat_map(|c| c.rules.iter().map(|r| (c.name.clone(), SeenRule::Ours(r.clone()))))
                .collect(),
        }
    }

    /// A dual-stack Consul pod with sets of CIDRs and ports, and a dual-stack Kuma pod.
    fn rule_sets() -> Vec<Ruleset> {
        let consul = serde_json::json!({"ProxyUserID": "5995", "ProxyInboundPort": 20000,
            "ExcludeOutboundPorts": ["5432", "6379"], "ExcludeOutboundCIDRs": ["192.0.2.0/24", "198.51.100.0/24"]});
        let pods: [Vec<(&str, String)>; 2] = [
            vec![
                ("consul.hashicorp.com/connect-inject-status", "injected".into()),
                ("consul.hashicorp.com/transparent-proxy-status", "enabled".into()),
                ("consul.hashicorp.com/redirect-traffic-config", consul.to_string()),
            ],
            vec![("kuma.io/sidecar-injected", "true".into()), ("k8s.v1.cni.cncf.io/networks", "kuma-cni".into())],
        ];
        pods.iter()
            .map(|pod| {
                let a: Annotations = pod.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
                let r = mesh::classify(&a, PodNetwork { has_ipv6: true }).unwrap().unwrap();
                nft::from_rules(&rules::build(&r))
            })
            .collect()
    }

    #[test]
    fn a_copy_the_engine_wrote_reads_back_as_the_rule_set_it_came_from() {
        let sets = rule_sets();
        assert!(!sets[0].tables[0].sets.is_empty(), "the Consul pod's CIDRs and ports are sets");
        for rs in sets {
            let seen = Seen { tables: rs.tables.iter().map(seen).collect() };
            match Before::of(&seen) {
                Before::Copy(back) => assert_eq!(back, rs),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(Before::of(&Seen::default()), Before::Nothing));
    }

    #[test]
    fn a_copy_edited_by_hand_names_what_the_engine_cannot_write_back() {
        let rs = &rule_sets()[0];
        let t = &rs.tables[0];
        let unrecognisable = |edit: &dyn Fn(&mut SeenTable)| {
            let mut s = seen(t);
            edit(&mut s);
            match Before::of(&Seen { tables: vec![s] }) {
                Before::Unrecognisable(what) => what,
                other => panic!("{other:?}"),
            }
        };
        let foreign = unrecognisable(&|s| s.rules.push(("nat_output".into(), SeenRule::Foreign(vec!["meta".into()]))));
        assert_eq!(foreign, "a rule in ip tproxy-cni nat_output that tproxy-cni does not write");
        let set = unrecognisable(&|s| s.sets[0].0.key = None);
        assert!(
            set.starts_with("set ip tproxy-cni ")
                && set.ends_with("is not an interval set of a type tproxy-cni writes")
        );
        let hook = unrecognisable(&|s| s.chains[0].hook = Some(Err("type route hook Some(3) priority Some(0)".into())));
        assert!(hook.ends_with("is a base chain of type route hook Some(3) priority Some(0)"), "{hook}");
    }
}

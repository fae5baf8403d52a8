//! The nftables engine: our rules as tables of our own, programmed over `NETLINK_NETFILTER`
//! from the plugin's own process — no `nft`, no `iptables`, no library besides libc.
//!
//! Each operation is one exchange of netlink messages with the kernel in the pod's namespace:
//!
//! - ADD reads which of our tables exist (one small dump: none, in a fresh namespace) and sends
//!   **one nf_tables batch** that deletes those with everything in them and creates each wanted
//!   table anew with its sets, chains and rules. The kernel commits a batch atomically: the
//!   namespace goes from whatever it held (nothing, or an older copy of ours) to exactly one
//!   complete copy, or — if the kernel refuses any message — stays exactly as it was.
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
use crate::core::nft::{self, Ruleset, TABLE};
use crate::core::redirect::Family;
use crate::core::rules::RuleSet;
use crate::kernel::deadline::Deadline;
use crate::kernel::netfilter::{Mismatch, Removed};
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

/// What [`Nftables::apply`] replaced: the families where our tables existed before it, and the
/// copy of ours they held, as read back before the batch (`None` when there was none, or one
/// with something in it we cannot read: see [`Seen::ruleset`]).
#[derive(Debug)]
#[must_use = "a caller that fails after apply must undo what it applied"]
pub struct Applied {
    replaced: Vec<Family>,
    previous: Option<Ruleset>,
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

impl Seen {
    /// Our tables as a rule set [`install`] can send again; `None` when anything in them is not
    /// ours to read (a set with another key, a chain with another hook, a rule of other
    /// expressions), which no batch of ours could make again.
    pub fn ruleset(&self) -> Option<Ruleset> {
        let mut tables = Vec::new();
        for t in &self.tables {
            let mut sets = Vec::new();
            for (set, intervals) in &t.sets {
                sets.push(nft::NftSet { name: set.name.clone(), key: set.key?, intervals: intervals.clone() });
            }
            let mut chains = Vec::new();
            for c in &t.chains {
                let hook = match &c.hook {
                    None => None,
                    Some(Ok(hook)) => Some(*hook),
                    Some(Err(_)) => return None,
                };
                let mut rules = Vec::new();
                for (_, rule) in t.rules.iter().filter(|(chain, _)| *chain == c.name) {
                    match rule {
                        SeenRule::Ours(r) => rules.push(r.clone()),
                        SeenRule::Foreign(_) => return None,
                    }
                }
                chains.push(nft::NftChain { name: c.name.clone(), hook, rules });
            }
            tables.push(nft::NftTable { family: t.family, sets, chains });
        }
        Some(Ruleset { tables })
    }

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

    /// Can ADD work? The kernel must have every nf_tables feature a redirect may use.
    pub fn ready(&self) -> Result<(), FeatureError> {
        features::probe_cached().map(drop)
    }

    /// Installs `sets` (one per family) as our tables, replacing whatever of ours is there, in one
    /// atomic batch: afterwards the namespace holds exactly one copy, or, on failure, what it
    /// held before. Families not in `sets` lose our table.
    pub fn apply(&self, ns: &Netns, sets: &[RuleSet]) -> Result<Applied, NftablesError> {
        let rules = nft::from_rules(sets);
        features::require(&rules)?;
        let mut sock = self.open(ns)?;
        let (replaced, previous) = install(&mut sock, &rules).map_err(|e| socket_error(ns, e))?;
        Ok(Applied { replaced, previous })
    }

    /// Undoes an [`Nftables::apply`] whose caller failed afterwards (Kuma's `::6` could not be
    /// added): puts back the copy of ours the apply replaced, with the same one batch an ADD
    /// sends, or removes the tables it made when there was none (a fresh namespace — every pod's
    /// first ADD — is then exactly as it was). Best effort: a failure is logged.
    pub fn undo(&self, ns: &Netns, applied: Applied) {
        let done = match &applied.previous {
            Some(previous) => self
                .open(ns)
                .and_then(|mut sock| install(&mut sock, previous).map(drop).map_err(|e| socket_error(ns, e))),
            None => {
                if !applied.replaced.is_empty() {
                    log::warn!(
                        "the previous copy of our tables ({:?}) cannot be restored: removing ours",
                        applied.replaced
                    );
                }
                self.remove(ns).map(drop)
            }
        };
        match done {
            Ok(()) => log::debug!("undid this call's nftables changes"),
            Err(e) => log::warn!("cannot undo this call's nftables changes: {}", crate::text::chain(&e)),
        }
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

/// Installs `rules` with one batch that deletes only the tables of ours that exist, and returns
/// the families it replaced with the copy they held (read whole first, for an undo to put back;
/// a fresh namespace has nothing to read, so a first ADD costs no more). Deleting
/// costs the kernel a grace period before it frees what was deleted, which the socket's close
/// then waits for (milliseconds on a busy node); a first ADD into a fresh namespace deletes
/// nothing and does not wait. Should a table of ours appear between the read and the batch (a
/// concurrent ADD), the kernel refuses the batch, changing nothing, and the batch that replaces
/// every family is sent instead.
fn install(sock: &mut NfSocket, rules: &Ruleset) -> Result<(Vec<Family>, Option<Ruleset>), SocketError> {
    let before = read(sock, true)?;
    let present: Vec<Family> = before.tables.iter().map(|t| t.family).collect();
    let previous = if present.is_empty() { None } else { before.ruleset() };
    let batch = encode::install(rules, &present, sock.next_seq());
    let bytes = batch.end_bytes();
    match sock.send(&batch, &bytes) {
        Err(SocketError::Refused { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {
            log::debug!("a table of ours appeared meanwhile: replacing every family");
            let batch = encode::replace(rules, sock.next_seq());
            sock.send(&batch, &batch.end_bytes())?;
            // Not the copy read above: another call's, which this call had no right to keep.
            Ok((Family::ALL.to_vec(), None))
        }
        Ok(()) => {
            log::debug!(
                "installed our nftables tables with one batch ({} messages, {} bytes, replacing {present:?})",
                batch.what.len(),
                bytes.len()
            );
            Ok((present, previous))
        }
        Err(e) => Err(e),
    }
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
    let tables = sock.dump(
        NetfilterProtoFamily::Unspec,
        NfTablesMessage::GetTable(TableMessage { attributes: Vec::new() }),
        "list nftables tables",
    )?;
    let mut seen = Seen::default();
    for (family, msg) in tables {
        let NfTablesMessage::NewTable(TableMessage { attributes }) = msg else { continue };
        let ours = attributes.iter().any(|a| matches!(a, TableAttribute::Name(n) if n == TABLE));
        let Some(family) = family.filter(|_| ours) else { continue };
        seen.tables.push(read_table(sock, family, full)?);
    }
    seen.tables.sort_by_key(|t| t.family);
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

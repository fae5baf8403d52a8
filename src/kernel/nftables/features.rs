//! Which nf_tables features the kernel has, probed once per boot.
//!
//! Each feature the engine may use (NAT chains, `redirect`, `dnat`, `ct zone set`, `ct state`,
//! `log`, interval sets, IPv6 NAT) is tried with a dry-run batch: a small table that uses it,
//! sent without the batch's end message, so the kernel checks every message (loading the modules
//! it needs, as it does for a real batch) and then commits nothing. The probe runs in the
//! process's own namespace under a table name of its own, so it can never meet our real tables,
//! and its tables are dormant: their chains never hook into the namespace's traffic, not even for
//! the moment the kernel holds the batch.
//!
//! A kernel with every feature is remembered under `/run/tproxy-cni` (tmpfs: a reboot clears it)
//! with the boot's id, so later ADDs read one small file instead of probing. A kernel that lacks
//! a feature is probed again next time (a module may be loaded meanwhile); ADD then fails with an
//! error that names what is missing, for a redirect that needs it.

use std::path::Path;

use thiserror::Error;

use super::encode::Batch;
use super::socket::{NfSocket, SocketError};
use crate::core::nft::{
    Action, BaseHook, ChainKind, Hook, Interval, Match, NftChain, NftRule, NftSet, NftTable, Ruleset, SetKey,
};
use crate::core::redirect::{Family, Port};
use crate::core::rules::{Cond, CtState, Proto};
use crate::kernel::netfilter::backend::RUNTIME_DIR;

/// The table name of the probe (never committed).
const PROBE_TABLE: &str = "tproxy-cni-probe";
/// The file that remembers, for one boot, that the kernel has every feature.
const CACHE: &str = "nftables-features";
/// The kernel's id of this boot.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// An nf_tables feature the engine may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    NatChain,
    Redirect,
    Dnat,
    CtZone,
    CtState,
    Log,
    IntervalSet,
    Ipv6Nat,
}

impl Feature {
    pub const ALL: [Feature; 8] = [
        Feature::NatChain,
        Feature::Redirect,
        Feature::Dnat,
        Feature::CtZone,
        Feature::CtState,
        Feature::Log,
        Feature::IntervalSet,
        Feature::Ipv6Nat,
    ];

    /// What it is, and what provides it.
    pub fn describe(self) -> &'static str {
        match self {
            Feature::NatChain => "nat chains (nft_chain_nat)",
            Feature::Redirect => "redirect (nft_redir)",
            Feature::Dnat => "dnat (nft_nat)",
            Feature::CtZone => "ct zone set (nft_ct with CONFIG_NF_CONNTRACK_ZONES)",
            Feature::CtState => "ct state (nft_ct)",
            Feature::Log => "log (nft_log)",
            Feature::IntervalSet => "interval sets (nft_set_rbtree)",
            Feature::Ipv6Nat => "IPv6 nat (nft_chain_nat with IPv6)",
        }
    }

    /// A small table that uses the feature, in `family`.
    fn probe(self) -> NftTable {
        let port = Port::new(1).expect("1 is a port");
        let nat = |rules| NftChain {
            name: "probe".into(),
            hook: Some(BaseHook { kind: ChainKind::Nat, hook: Hook::Output, priority: -110 }),
            rules,
        };
        let filter = |priority, rules| NftChain {
            name: "probe".into(),
            hook: Some(BaseHook { kind: ChainKind::Filter, hook: Hook::Prerouting, priority }),
            rules,
        };
        let rule = |matches, action| NftRule { matches, action, comment: PROBE_TABLE.into() };
        let tcp = || vec![Match::L4Proto(Proto::Tcp)];
        let (family, sets, chain) = match self {
            Feature::NatChain => (Family::V4, Vec::new(), nat(Vec::new())),
            Feature::Redirect => (Family::V4, Vec::new(), nat(vec![rule(tcp(), Action::Redirect(port))])),
            Feature::Dnat => {
                (Family::V4, Vec::new(), nat(vec![rule(tcp(), Action::Dnat([127, 0, 0, 1].into(), Some(port)))]))
            }
            Feature::CtZone => (Family::V4, Vec::new(), filter(-310, vec![rule(Vec::new(), Action::CtZone(1))])),
            Feature::CtState => {
                (Family::V4, Vec::new(), filter(-160, vec![rule(vec![Match::CtState(CtState::Invalid)], Action::Drop)]))
            }
            Feature::Log => (
                Family::V4,
                Vec::new(),
                filter(-160, vec![rule(Vec::new(), Action::Log { prefix: "probe:".into(), level: 6 })]),
            ),
            Feature::IntervalSet => {
                let set = NftSet {
                    name: "probe".into(),
                    key: SetKey::Ipv4Addr,
                    intervals: vec![Interval { first: 0x0a00_0000, last: 0x0aff_ffff }],
                };
                let m = vec![
                    Match::DaddrIn("probe".into()),
                    Match::SkUid(Cond::Not(crate::core::redirect::UidRange::single(0))),
                ];
                (Family::V4, vec![set], filter(-160, vec![rule(m, Action::Return)]))
            }
            Feature::Ipv6Nat => (Family::V6, Vec::new(), nat(vec![rule(tcp(), Action::Redirect(port))])),
        };
        NftTable { family, sets, chains: vec![chain] }
    }

    /// Does `rules` use the feature?
    fn used_by(self, rules: &Ruleset) -> bool {
        let mut rule_list = rules.tables.iter().flat_map(|t| t.chains.iter().flat_map(|c| &c.rules));
        match self {
            Feature::NatChain => {
                rules.tables.iter().any(|t| t.chains.iter().any(|c| c.hook.is_some_and(|h| h.kind == ChainKind::Nat)))
            }
            Feature::Redirect => rule_list.any(|r| matches!(r.action, Action::Redirect(_))),
            Feature::Dnat => rule_list.any(|r| matches!(r.action, Action::Dnat(..))),
            Feature::CtZone => rule_list.any(|r| matches!(r.action, Action::CtZone(_))),
            Feature::CtState => rule_list.any(|r| r.matches.iter().any(|m| matches!(m, Match::CtState(_)))),
            Feature::Log => rule_list.any(|r| matches!(r.action, Action::Log { .. })),
            Feature::IntervalSet => rules.tables.iter().any(|t| !t.sets.is_empty()),
            Feature::Ipv6Nat => rules.tables.iter().any(|t| t.family == Family::V6),
        }
    }
}

#[derive(Debug, Error)]
pub enum FeatureError {
    #[error("cannot probe the kernel's nf_tables features")]
    Probe(#[source] SocketError),
    #[error(
        "the kernel lacks nf_tables feature(s) the nftables engine needs: {}; load the module(s), or set \"backend\": \"iptables\" in the plugin configuration (Helm value pluginConfig.backend, ConfigMap key plugin-config.json; host commands: --backend iptables)",
        .0.iter().map(|f| f.describe()).collect::<Vec<_>>().join(", ")
    )]
    Missing(Vec<Feature>),
}

/// Fails, naming them, when the kernel lacks features `rules` uses.
pub fn require(rules: &Ruleset) -> Result<(), FeatureError> {
    let missing: Vec<Feature> = probe_cached()?.into_iter().filter(|f| f.used_by(rules)).collect();
    if missing.is_empty() { Ok(()) } else { Err(FeatureError::Missing(missing)) }
}

/// The features the kernel lacks (none, usually), from this boot's cache or a probe.
pub fn probe_cached() -> Result<Vec<Feature>, FeatureError> {
    let cache = Path::new(RUNTIME_DIR).join(CACHE);
    let boot = std::fs::read_to_string(BOOT_ID).unwrap_or_default();
    let boot = boot.trim();
    if !boot.is_empty() && std::fs::read_to_string(&cache).is_ok_and(|c| c.trim() == boot) {
        return Ok(Vec::new());
    }
    let missing = probe()?;
    if missing.is_empty() && !boot.is_empty() {
        if let Err(e) = remember(&cache, boot) {
            log::debug!("cannot remember the kernel's nf_tables features in {}: {e}", cache.display());
        }
    } else if !missing.is_empty() {
        let names: Vec<&str> = missing.iter().map(|f| f.describe()).collect();
        log::warn!("the kernel lacks nf_tables features: {}", names.join(", "));
    }
    Ok(missing)
}

/// Tries every feature with a dry-run batch in this process's namespace.
pub fn probe() -> Result<Vec<Feature>, FeatureError> {
    let mut sock = NfSocket::open().map_err(FeatureError::Probe)?;
    let mut missing = Vec::new();
    for f in Feature::ALL {
        let mut batch = Batch::dormant(PROBE_TABLE, sock.next_seq());
        let mut ids = 0;
        batch.add_table(&f.probe(), &mut ids);
        match sock.send(&batch, &batch.dry_run_bytes()) {
            Ok(()) => {}
            Err(SocketError::Refused { what, source }) => {
                log::debug!("nf_tables probe of {}: {what}: {source}", f.describe());
                missing.push(f);
            }
            Err(e) => return Err(FeatureError::Probe(e)),
        }
    }
    Ok(missing)
}

/// Writes `boot` to `cache` atomically (concurrent ADDs may race to write it).
fn remember(cache: &Path, boot: &str) -> std::io::Result<()> {
    let dir = cache.parent().expect("cache file has a directory");
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{CACHE}.{}", std::process::id()));
    std::fs::write(&tmp, boot)?;
    std::fs::rename(&tmp, cache)
}

//! The one place that picks an engine: the iptables engine ([`super::netfilter`], which runs
//! `iptables-restore`) or the nftables engine ([`super::nftables`], which talks netlink itself).
//!
//! Both take the same per-family [`RuleSet`]s and give every packet the same verdict; callers
//! (the plugin, the host commands) hold an [`Engine`] and never look inside it.

use thiserror::Error;

use super::deadline::Deadline;
use super::netfilter::{self, Backend, Mismatch, Mode, Netfilter, NetfilterError, Removed};
use super::netns::Netns;
use super::nftables::{self, Nftables, NftablesError};
use crate::core::nft::TABLE;
use crate::core::rules::RuleSet;

/// The conflist's `backend` (the host commands' `--backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineKind {
    /// `iptables-restore` / `iptables-save` of the node's iptables: the explicit choice for a
    /// node whose kernel lacks an nf_tables feature the nftables engine needs.
    Iptables,
    /// nf_tables over netlink, from the plugin's own process (the default).
    #[default]
    Nftables,
}

impl EngineKind {
    /// The name the configuration uses.
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Iptables => "iptables",
            EngineKind::Nftables => "nftables",
        }
    }

    /// Parses the configuration's name.
    pub fn from_name(s: &str) -> Option<EngineKind> {
        match s {
            "iptables" => Some(EngineKind::Iptables),
            "nftables" => Some(EngineKind::Nftables),
            _ => None,
        }
    }
}

/// A chosen engine, ready to work on namespaces.
#[derive(Debug, Clone)]
pub enum Engine {
    Iptables(Netfilter),
    Nftables(Nftables),
}

#[derive(Debug, Error)]
pub enum EngineError {
    #[error(transparent)]
    Iptables(#[from] NetfilterError),
    #[error(transparent)]
    Nftables(#[from] NftablesError),
}

/// What an engine's [`Engine::apply`] changed.
#[derive(Debug)]
#[must_use = "a caller that fails after apply must undo what it applied"]
pub enum Applied {
    Iptables(netfilter::Applied),
    Nftables(nftables::Applied),
}

/// CHECK's failures, whichever the engine.
#[derive(Debug, Error)]
pub enum CheckError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Mismatch(#[from] Mismatch),
}

/// Why a plan could not be made.
#[derive(Debug, Error)]
pub enum PlanError {
    #[error(transparent)]
    Iptables(#[from] netfilter::PlanError),
    #[error(transparent)]
    Nftables(#[from] NftablesError),
}

/// What an operation would send, for the host commands' `--dry-run` and reports.
#[derive(Debug, Clone)]
pub enum Plan {
    Iptables(netfilter::Plan),
    Nftables(nftables::Plan),
}

impl Plan {
    /// Is there nothing to do?
    pub fn is_empty(&self) -> bool {
        match self {
            Plan::Iptables(p) => p.steps.is_empty(),
            Plan::Nftables(p) => p.is_empty(),
        }
    }

    /// The plan as text for a person: the restore input per family, or the `nft -f` script.
    pub fn render(&self) -> String {
        match self {
            Plan::Iptables(p) => p.render(),
            Plan::Nftables(p) => p.render(),
        }
    }

    /// The chains the plan removes.
    pub fn removed(&self) -> Removed {
        match self {
            Plan::Iptables(p) => p.removed(),
            Plan::Nftables(p) => p.removed(),
        }
    }

    /// Does the namespace already hold something of ours?
    pub fn replaces(&self) -> bool {
        match self {
            Plan::Iptables(p) => p.steps.iter().any(|s| s.ours_before.rules > 0),
            Plan::Nftables(p) => !p.before.tables.is_empty(),
        }
    }

    /// What of ours the namespace holds before the plan, per family, for a person.
    pub fn before(&self) -> Vec<String> {
        match self {
            Plan::Iptables(p) => p
                .steps
                .iter()
                .map(|s| {
                    let o = &s.ours_before;
                    format!("{}: {} rule(s), {} chain(s)", s.family.name(), o.rules, o.chains.len())
                })
                .collect(),
            Plan::Nftables(p) => p
                .before
                .tables
                .iter()
                .map(|t| {
                    let (sets, chains, rules) = (t.sets.len(), t.chains.len(), t.rules.len());
                    format!("{}: table {}: {rules} rule(s), {chains} chain(s), {sets} set(s)", t.family.name(), TABLE)
                })
                .collect(),
        }
    }
}

/// Why an engine cannot serve ADD (STATUS).
#[derive(Debug, Error)]
pub enum NotReady {
    #[error(transparent)]
    Iptables(#[from] netfilter::backend::BackendError),
    #[error(transparent)]
    Nftables(#[from] nftables::features::FeatureError),
}

impl Engine {
    /// The engine of `kind`, every tool it runs and every kernel exchange bounded by `deadline`;
    /// `mode` says which iptables the iptables engine uses (resolving `auto` may probe the host,
    /// so the nftables engine never resolves it).
    pub fn new(kind: EngineKind, mode: Mode, deadline: Deadline) -> Engine {
        match kind {
            EngineKind::Iptables => Engine::Iptables(Netfilter::new(Backend::resolve(mode)).with_deadline(deadline)),
            EngineKind::Nftables => Engine::Nftables(Nftables::new(deadline)),
        }
    }

    /// The engine's name for logs and reports: `iptables-nft`, `iptables-legacy`, `nftables`.
    pub fn name(&self) -> String {
        match self {
            Engine::Iptables(nf) => format!("iptables-{}", nf.backend().name()),
            Engine::Nftables(_) => "nftables".to_owned(),
        }
    }

    /// Can ADD work?
    pub fn ready(&self) -> Result<(), NotReady> {
        match self {
            Engine::Iptables(nf) => Ok(nf.ready()?),
            Engine::Nftables(n) => Ok(n.ready()?),
        }
    }

    /// Installs `sets`, replacing whatever of ours the engine finds (see each engine). On failure
    /// the namespace holds what of ours it held before; on success the returned [`Applied`] lets a
    /// caller that fails later undo it ([`Engine::undo`]).
    pub fn apply(&self, ns: &Netns, sets: &[RuleSet]) -> Result<Applied, EngineError> {
        match self {
            Engine::Iptables(nf) => Ok(Applied::Iptables(nf.apply(ns, sets)?)),
            Engine::Nftables(n) => Ok(Applied::Nftables(n.apply(ns, sets)?)),
        }
    }

    /// Puts back what [`Engine::apply`] changed, best effort (failures are logged).
    pub fn undo(&self, ns: &Netns, applied: Applied) {
        match (self, applied) {
            (Engine::Iptables(nf), Applied::Iptables(a)) => nf.undo(ns, a),
            (Engine::Nftables(n), Applied::Nftables(a)) => n.undo(ns, a),
            _ => unreachable!("an apply is undone by the engine that made it"),
        }
    }

    /// Removes everything of ours the engine installs.
    pub fn remove(&self, ns: &Netns) -> Result<Removed, EngineError> {
        match self {
            Engine::Iptables(nf) => Ok(nf.remove(ns)?),
            Engine::Nftables(n) => Ok(n.remove(ns)?),
        }
    }

    /// Verifies the namespace holds exactly `sets` of ours.
    pub fn check(&self, ns: &Netns, sets: &[RuleSet]) -> Result<(), CheckError> {
        match self {
            Engine::Iptables(nf) => nf.check(ns, sets).map_err(|e| match e {
                netfilter::CheckError::Netfilter(e) => CheckError::Engine(e.into()),
                netfilter::CheckError::Mismatch(m) => CheckError::Mismatch(m),
            }),
            Engine::Nftables(n) => n.check(ns, sets).map_err(|e| match e {
                nftables::CheckError::Nftables(e) => CheckError::Engine(e.into()),
                nftables::CheckError::Mismatch(m) => CheckError::Mismatch(m),
            }),
        }
    }

    /// What [`Engine::apply`] would send, given what the namespace holds now. The iptables engine
    /// refuses when our chain names hold rules that we did not install.
    pub fn plan_apply(&self, ns: &Netns, sets: &[RuleSet]) -> Result<Plan, PlanError> {
        match self {
            Engine::Iptables(nf) => Ok(Plan::Iptables(nf.plan_apply(ns, sets)?)),
            Engine::Nftables(n) => Ok(Plan::Nftables(n.plan_apply(ns, sets)?)),
        }
    }

    /// What [`Engine::remove`] would send.
    pub fn plan_removal(&self, ns: &Netns) -> Result<Plan, PlanError> {
        match self {
            Engine::Iptables(nf) => Ok(Plan::Iptables(nf.plan_removal(ns)?)),
            Engine::Nftables(n) => Ok(Plan::Nftables(n.plan_removal(ns)?)),
        }
    }

    /// Carries out a plan made by this engine.
    pub fn execute(&self, ns: &Netns, plan: &Plan) -> Result<(), EngineError> {
        match (self, plan) {
            (Engine::Iptables(nf), Plan::Iptables(p)) => Ok(nf.execute(ns, p)?),
            (Engine::Nftables(n), Plan::Nftables(p)) => Ok(n.execute(ns, p)?),
            _ => unreachable!("a plan is executed by the engine that made it"),
        }
    }

    /// Forgets per-namespace state once the namespace is done with (the legacy iptables lock).
    pub fn forget(&self, ns: &Netns) {
        if let Engine::Iptables(nf) = self {
            nf.forget_lock(ns);
        }
    }
}

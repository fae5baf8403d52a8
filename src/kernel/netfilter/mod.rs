//! Applying, checking and removing rule sets in a pod's network namespace.
//!
//! The only code that runs `iptables-restore`. Each operation is one restore transaction per family.
//! `iptables-restore` commits a transaction table by table (each `COMMIT` is atomic in the kernel,
//! the whole input is not), so the order of the tables is part of the design:
//!
//! - The common case — the first ADD into a fresh namespace — is a single process per family. Its
//!   first table is nat, which creates our chains with `-N`: on a namespace that already has them
//!   (a repeated ADD) that first table fails and nothing at all is committed. Only then do we read
//!   the namespace with `iptables-save` and send one transaction that deletes what we own and
//!   installs the new set.
//! - If a later table fails (raw or mangle: a kernel without conntrack zones, say), the tables before
//!   it are committed. A failed ADD therefore ends by undoing what it changed, family by family
//!   ([`Applied`], [`Netfilter::undo`]): a family that held nothing of ours loses whatever this call
//!   committed; a family that held a copy of ours (a previous ADD's) gets that copy back. What a
//!   family held is known without reading it first on the fast path: a fresh transaction commits
//!   only into tables without our chains, so when it fails, what of ours is there is either a
//!   previous copy, untouched, or — when it is exactly a leading part of this very transaction's
//!   tables — this call's own partial commit. Foreign rules are never touched.
//! - A process killed between two tables leaves the committed ones. The runtime then sees ADD fail
//!   and calls DEL (which removes everything of ours), or retries ADD, which finds our chains,
//!   replaces whatever is there, and ends with exactly one complete copy. Either way the pod's
//!   containers never start on a half-installed set: a runtime starts them only after ADD succeeds.
//!
//! Every tool runs with the [`Deadline`] the [`Netfilter`] was made with ([`exec::run`]): a tool
//! that hangs is killed and the operation fails with [`NetfilterError::TimedOut`]. Undoing a failed
//! operation gets a budget of its own, [`UNDO_BUDGET`] at most.
//!
//! The host command also wants to see a transaction before it runs: [`Netfilter::plan_apply`] and
//! [`Netfilter::plan_removal`] read the namespace and return the [`Plan`] that applying or removing
//! would send (built by the same renderers), refusing when our chain names hold rules that we did
//! not install; [`Netfilter::execute`] runs a plan.

pub mod backend;
pub mod save;

use std::cell::OnceCell;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use thiserror::Error;

pub use backend::{Backend, Mode};
use save::SavedTable;

use crate::core::redirect::Family;
use crate::core::rules::{self, RuleSet, Table, TableRules};
use crate::kernel::deadline::Deadline;
use crate::kernel::exec::{self, ExecError};
use crate::kernel::netns::Netns;

/// The deadline of a [`Netfilter`] made without one (the host commands'): a whole operation.
pub const DEFAULT_BUDGET: Duration = Duration::from_secs(30);
/// The most that undoing a failed operation may take, on top of the operation's own deadline.
pub const UNDO_BUDGET: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum NetfilterError {
    #[error(transparent)]
    Backend(#[from] backend::BackendError),
    #[error("cannot run {tool} in {netns}")]
    Spawn {
        tool: String,
        netns: String,
        #[source]
        source: ExecError,
    },
    /// The tool hung; it was killed.
    #[error("{tool} in {netns}: {source}")]
    TimedOut {
        tool: String,
        netns: String,
        #[source]
        source: ExecError,
    },
    #[error("{tool} failed in {netns}: {stderr}")]
    Failed { tool: String, netns: String, stderr: String, input: String },
}

/// CHECK found the namespace's rules differ from the expected ones.
#[derive(Debug, Error)]
#[error("{} difference(s) from the expected rules: {}", .0.len(), .0.join("; "))]
pub struct Mismatch(pub Vec<String>);

#[derive(Debug, Error)]
pub enum CheckError {
    #[error(transparent)]
    Netfilter(#[from] NetfilterError),
    #[error(transparent)]
    Mismatch(#[from] Mismatch),
}

/// Rules under our chain names that we did not install: the mesh's own tool put them there, and
/// replacing or removing them behind its back would leave it and its operator confused.
#[derive(Debug, Error)]
#[error(
    "{family} {table} has {count} rule(s) under tproxy-cni's chain names without its ownership comment \
     (e.g. `-A {chain} {spec}`): the mesh's own tool installed them (consul connect redirect-traffic, kuma-init, \
     kumactl install transparent-proxy); remove them with that tool (or by hand), then run this again",
    family = .family.name()
)]
pub struct Lookalikes {
    pub family: Family,
    pub table: String,
    pub chain: String,
    pub spec: String,
    pub count: usize,
}

/// Why a plan could not be made.
#[derive(Debug, Error)]
pub enum PlanError {
    #[error(transparent)]
    Netfilter(#[from] NetfilterError),
    #[error(transparent)]
    Lookalikes(#[from] Lookalikes),
}

/// The transactions an operation would send, in order, one per family; empty when there is
/// nothing to do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
}

/// One family's transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub family: Family,
    /// The restore tool it is fed to (with `--noflush`).
    pub tool: PathBuf,
    /// The restore input.
    pub input: String,
    /// What of ours the family holds before the step.
    pub ours_before: Owned,
}

/// What of ours a family holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owned {
    /// Our chains, by name.
    pub chains: Vec<String>,
    /// How many rules of ours (in our chains and elsewhere).
    pub rules: usize,
}

impl Plan {
    /// The plan as text for a person: each step under a `# family: tool --noflush` line.
    pub fn render(&self) -> String {
        self.steps
            .iter()
            .map(|s| format!("# {}: {} --noflush\n{}", s.family.name(), s.tool.display(), s.input))
            .collect()
    }

    /// The chains a removal plan removes (what DEL's [`Netfilter::remove`] reports), so the
    /// namespace's other traces of a layout (Kuma's `::6`) can follow.
    pub fn removed(&self) -> Removed {
        let chains = self.steps.iter().flat_map(|s| s.ours_before.chains.iter().map(move |c| (s.family, c.clone())));
        Removed { chains: chains.collect() }
    }
}

/// What [`Netfilter::remove`] found and removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Removed {
    /// Every chain of ours that was removed, with its family.
    pub chains: Vec<(Family, String)>,
}

impl Removed {
    /// Was the chain `name` of ours in `family` removed?
    pub fn had_chain(&self, family: Family, name: &str) -> bool {
        self.chains.iter().any(|(f, c)| *f == family && c == name)
    }
}

impl NetfilterError {
    /// Did a tool hang (and get killed)?
    pub fn is_timeout(&self) -> bool {
        matches!(self, NetfilterError::TimedOut { .. })
    }
}

/// What a family held of ours before an operation changed it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Prior {
    /// Nothing of ours.
    Nothing,
    /// A copy of ours (a previous ADD's): every table holding something of ours, as read.
    Copy(Vec<SavedTable>),
}

/// What [`Netfilter::apply`] changed, family by family, so that [`Netfilter::undo`] can put back
/// exactly that and nothing else.
#[derive(Debug, Default)]
#[must_use = "a caller that fails after apply must undo what it applied"]
pub struct Applied {
    priors: Vec<(Family, Prior)>,
}

/// The budget for recovering from a failed operation, started at the first failure and shared by
/// everything the recovery does.
struct Recovery<'a> {
    nf: &'a Netfilter,
    made: OnceCell<Netfilter>,
}

impl Recovery<'_> {
    fn get(&self) -> &Netfilter {
        self.made.get_or_init(|| self.nf.for_recovery())
    }
}

/// A chosen backend, ready to work on namespaces within a deadline.
#[derive(Debug, Clone)]
pub struct Netfilter {
    backend: Backend,
    deadline: Deadline,
}

impl Netfilter {
    /// A backend whose operations must end within [`DEFAULT_BUDGET`] from now.
    pub fn new(backend: Backend) -> Netfilter {
        Netfilter { backend, deadline: Deadline::after(DEFAULT_BUDGET) }
    }

    /// The same, with every tool it runs bounded by `deadline`.
    pub fn with_deadline(self, deadline: Deadline) -> Netfilter {
        Netfilter { deadline, ..self }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Can ADD work? (STATUS asks this.) Every tool we would run must be there.
    pub fn ready(&self) -> Result<(), backend::BackendError> {
        Family::ALL.into_iter().try_for_each(|f| self.backend.tools(f).map(drop))
    }

    /// Installs `sets`, replacing whatever of ours is there, so that afterwards the namespace holds
    /// exactly one copy of them. Families not in `sets` lose any rules of ours they held.
    /// On failure, what this call changed is undone: the namespace holds what of ours it held
    /// before (see the module docs). On success, the returned [`Applied`] lets a caller that fails
    /// later undo the same way.
    pub fn apply(&self, ns: &Netns, sets: &[RuleSet]) -> Result<Applied, NetfilterError> {
        let recovery = Recovery { nf: self, made: OnceCell::new() };
        let mut applied = Applied::default();
        for set in sets {
            match self.apply_family(ns, set, &recovery) {
                Ok(prior) => applied.priors.push((set.family, prior)),
                Err((e, prior)) => {
                    applied.priors.push((set.family, prior));
                    recovery.get().undo_all(ns, applied);
                    return Err(e);
                }
            }
        }
        // A repeated ADD may follow a configuration with more families than this one.
        if applied.priors.iter().any(|(_, p)| *p != Prior::Nothing) {
            for family in Family::ALL.into_iter().filter(|f| sets.iter().all(|s| s.family != *f)) {
                match self.save(ns, family) {
                    Ok(saved) if !saved.iter().any(SavedTable::has_owned) => {}
                    Ok(saved) => {
                        applied.priors.push((family, Prior::Copy(owned_tables(&saved))));
                        if let Err(e) = self.restore(ns, family, &render_replace(&[], &saved)) {
                            recovery.get().undo_all(ns, applied);
                            return Err(e);
                        }
                    }
                    Err(e) => {
                        recovery.get().undo_all(ns, applied);
                        return Err(e);
                    }
                }
            }
        }
        Ok(applied)
    }

    /// Installs one family's set; returns what the family held of ours before, also on failure.
    fn apply_family(
        &self,
        ns: &Netns,
        set: &RuleSet,
        recovery: &Recovery<'_>,
    ) -> Result<Prior, (NetfilterError, Prior)> {
        let first = match self.restore(ns, set.family, &rules::render_fresh(set)) {
            Ok(()) => {
                log::debug!("installed the {} rules with one transaction", set.family.name());
                return Ok(Prior::Nothing);
            }
            Err(e) => e,
        };
        // Without a reading there is no telling what got committed: treat everything of ours as
        // this call's (undoing then removes it, if the tables can be read by then). After a hung
        // tool the call's budget is spent: the reading is part of the recovery.
        let reader = if first.is_timeout() { recovery.get() } else { self };
        let saved = reader.save(ns, set.family).map_err(|e| (e, Prior::Nothing))?;
        if !saved.iter().any(SavedTable::has_owned) {
            return Err((first, Prior::Nothing));
        }
        let prior = if own_partial_commit(set, &saved) {
            log::debug!("the failed {} transaction committed its first table(s)", set.family.name());
            Prior::Nothing
        } else {
            Prior::Copy(owned_tables(&saved))
        };
        if first.is_timeout() {
            // The budget is spent: do not start another transaction.
            return Err((first, prior));
        }
        // A repeated ADD, or tables of this very transaction committed before a later one failed:
        // either way, replacing what is there gives one complete copy, or fails again for real.
        log::debug!("rules of ours are already in the {} tables: replacing them", set.family.name());
        match self.restore(ns, set.family, &render_replace(&set.tables, &saved)) {
            Ok(()) => Ok(prior),
            Err(e) => Err((e, prior)),
        }
    }

    /// Puts back what [`Netfilter::apply`] changed: each family it touched holds again what of ours
    /// it held before (nothing, or the previous copy), foreign rules untouched. Best effort, within
    /// a budget of its own ([`UNDO_BUDGET`] at most): a failure is logged, since the caller is
    /// already failing with the error that matters.
    pub fn undo(&self, ns: &Netns, applied: Applied) {
        self.for_recovery().undo_all(ns, applied);
    }

    /// The same backend with a budget of its own for recovering from a failure: the operation's
    /// budget, [`UNDO_BUDGET`] at most.
    fn for_recovery(&self) -> Netfilter {
        Netfilter { backend: self.backend, deadline: Deadline::after(self.deadline.budget().min(UNDO_BUDGET)) }
    }

    /// [`Netfilter::undo`], within this one's own deadline.
    fn undo_all(&self, ns: &Netns, applied: Applied) {
        for (family, prior) in applied.priors.into_iter().rev() {
            let done = match &prior {
                Prior::Nothing => self.remove_family(ns, family).map(drop),
                Prior::Copy(before) => self.restore_copy(ns, family, before),
            };
            match done {
                Ok(()) => log::debug!("undid this call's {} changes", family.name()),
                Err(e) => log::warn!("cannot undo this call's {} changes: {}", family.name(), crate::text::chain(&e)),
            }
        }
    }

    /// Makes what of ours `family` holds exactly `before` again.
    fn restore_copy(&self, ns: &Netns, family: Family, before: &[SavedTable]) -> Result<(), NetfilterError> {
        let now = self.save(ns, family)?;
        if owned_tables(&now) == before {
            return Ok(());
        }
        self.restore(ns, family, &render_restore(before, &now))
    }

    /// Removes every rule and chain of ours from the namespace, in both families.
    pub fn remove(&self, ns: &Netns) -> Result<Removed, NetfilterError> {
        let mut removed = Removed::default();
        for family in Family::ALL {
            removed.chains.extend(self.remove_family(ns, family)?.into_iter().map(|c| (family, c)));
        }
        Ok(removed)
    }

    /// Removes everything of ours in one family; returns the names of the chains removed.
    fn remove_family(&self, ns: &Netns, family: Family) -> Result<Vec<String>, NetfilterError> {
        let saved = self.save(ns, family)?;
        if !saved.iter().any(SavedTable::has_owned) {
            return Ok(Vec::new());
        }
        self.restore(ns, family, &render_replace(&[], &saved))?;
        log::debug!("removed our {} rules", family.name());
        Ok(saved.iter().flat_map(|t| t.owned_chains().map(str::to_owned)).collect())
    }

    /// What [`Netfilter::apply`] would send to install `sets`, given what the namespace holds now:
    /// the fresh transaction for a family without rules of ours, the replacing one otherwise (and,
    /// when replacing, the removal of ours from a family no longer wanted). Refuses when our chain
    /// names hold rules we did not install.
    pub fn plan_apply(&self, ns: &Netns, sets: &[RuleSet]) -> Result<Plan, PlanError> {
        let mut plan = Plan::default();
        let mut repeated = false;
        for set in sets {
            let saved = self.save_checked(ns, set.family)?;
            let ours_before = owned(&saved);
            let input = if saved.iter().any(SavedTable::has_owned) {
                repeated = true;
                render_replace(&set.tables, &saved)
            } else {
                rules::render_fresh(set)
            };
            plan.steps.push(Step { family: set.family, tool: self.restore_tool(set.family)?, input, ours_before });
        }
        if repeated {
            for family in Family::ALL.into_iter().filter(|f| sets.iter().all(|s| s.family != *f)) {
                plan.steps.extend(self.removal_step(ns, family)?);
            }
        }
        Ok(plan)
    }

    /// What removing every rule and chain of ours from the namespace would send. Refuses when our
    /// chain names hold rules we did not install (removing ours would then break theirs).
    pub fn plan_removal(&self, ns: &Netns) -> Result<Plan, PlanError> {
        let mut plan = Plan::default();
        for family in Family::ALL {
            plan.steps.extend(self.removal_step(ns, family)?);
        }
        Ok(plan)
    }

    /// Sends a plan's transactions, in order. Each is atomic; if one fails, the ones before it
    /// stay applied (run the operation again: plans are built to be repeated).
    pub fn execute(&self, ns: &Netns, plan: &Plan) -> Result<(), NetfilterError> {
        plan.steps.iter().try_for_each(|s| self.restore(ns, s.family, &s.input))
    }

    fn removal_step(&self, ns: &Netns, family: Family) -> Result<Option<Step>, PlanError> {
        let saved = self.save_checked(ns, family)?;
        if !saved.iter().any(SavedTable::has_owned) {
            return Ok(None);
        }
        let input = render_replace(&[], &saved);
        Ok(Some(Step { family, tool: self.restore_tool(family)?, input, ours_before: owned(&saved) }))
    }

    /// Reads a family's tables and refuses if our chain names hold rules we did not install.
    fn save_checked(&self, ns: &Netns, family: Family) -> Result<Vec<SavedTable>, PlanError> {
        let saved = self.save(ns, family)?;
        for table in &saved {
            let mut lookalikes = table.lookalikes();
            if let Some(first) = lookalikes.next() {
                return Err(Lookalikes {
                    family,
                    table: table.name.clone(),
                    chain: first.chain.clone(),
                    spec: first.spec.clone(),
                    count: 1 + lookalikes.count(),
                }
                .into());
            }
        }
        Ok(saved)
    }

    fn restore_tool(&self, family: Family) -> Result<PathBuf, NetfilterError> {
        Ok(self.backend.tools(family)?.restore)
    }

    /// Verifies the namespace holds exactly `sets` of ours: every expected chain and rule, in order,
    /// and nothing else of ours (foreign rules are ignored).
    pub fn check(&self, ns: &Netns, sets: &[RuleSet]) -> Result<(), CheckError> {
        let mut diffs = Vec::new();
        for family in Family::ALL {
            let saved = self.save(ns, family)?;
            let wanted = sets.iter().find(|s| s.family == family).map(|s| s.tables.as_slice()).unwrap_or(&[]);
            diff(family, wanted, &saved, &mut diffs);
        }
        if diffs.is_empty() { Ok(()) } else { Err(Mismatch(diffs).into()) }
    }

    /// Deletes the namespace's lock file (legacy only), once the namespace is done with.
    pub fn forget_lock(&self, ns: &Netns) {
        if self.backend == Backend::Legacy {
            let _ = std::fs::remove_file(lock_file(ns));
        }
    }

    fn save(&self, ns: &Netns, family: Family) -> Result<Vec<SavedTable>, NetfilterError> {
        let tools = self.backend.tools(family)?;
        let out = self.run(ns, &tools.save, &[], None)?;
        Ok(save::parse(&out))
    }

    fn restore(&self, ns: &Netns, family: Family, input: &str) -> Result<(), NetfilterError> {
        let tools = self.backend.tools(family)?;
        let mut args = vec!["--noflush"];
        if self.backend == Backend::Legacy {
            args.extend(["--wait", "10"]);
        }
        self.run(ns, &tools.restore, &args, Some(input)).map(drop)
    }

    /// Runs a tool inside `ns`, feeding it `input`; returns its stdout. Bounded by the deadline.
    fn run(
        &self,
        ns: &Netns,
        tool: &std::path::Path,
        args: &[&str],
        input: Option<&str>,
    ) -> Result<String, NetfilterError> {
        let name = tool.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let netns = ns.path().display().to_string();
        let mut cmd = Command::new(tool);
        cmd.args(args).env_clear().env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin");
        if self.backend == Backend::Legacy {
            // Legacy iptables serialises on one node-wide lock file by default; pods do not share
            // tables, so each namespace gets a lock of its own.
            cmd.env("XTABLES_LOCKFILE", lock_file(ns));
        }
        ns.enter_on_spawn(&mut cmd);
        let out = match exec::run(&mut cmd, input.map(str::as_bytes), self.deadline) {
            Ok(out) => out,
            Err(source @ ExecError::TimedOut { .. }) => {
                return Err(NetfilterError::TimedOut { tool: name, netns, source });
            }
            Err(source) => return Err(NetfilterError::Spawn { tool: name, netns, source }),
        };
        if !out.status.success() {
            return Err(NetfilterError::Failed {
                tool: name,
                netns,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                input: input.unwrap_or_default().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn lock_file(ns: &Netns) -> PathBuf {
    let dir = PathBuf::from(backend::RUNTIME_DIR).join("xtables");
    if let Err(e) = std::fs::create_dir_all(&dir) {
        log::debug!("cannot create {}: {e}", dir.display());
    }
    dir.join(format!("{}.lock", ns.id().unwrap_or_else(|_| "unknown".into())))
}

/// Is what of ours `saved` holds exactly the first table(s) of `set`, and not all of them? Then a
/// fresh transaction of `set` committed those and failed on the next: this call's own work. (A
/// previous copy would be complete: an ADD installs every table or fails and undoes them.)
fn own_partial_commit(set: &RuleSet, saved: &[SavedTable]) -> bool {
    (1..set.tables.len()).any(|k| {
        let mut diffs = Vec::new();
        diff(set.family, &set.tables[..k], saved, &mut diffs);
        diffs.is_empty()
    })
}

/// The tables of `saved` that hold something of ours, with only our chains and rules in them: what
/// a family held of ours, comparable across readings whatever foreign rules came and went.
fn owned_tables(saved: &[SavedTable]) -> Vec<SavedTable> {
    saved
        .iter()
        .filter(|t| t.has_owned())
        .map(|t| SavedTable {
            name: t.name.clone(),
            chains: t.owned_chains().map(str::to_owned).collect(),
            rules: t.rules.iter().filter(|r| r.is_owned()).cloned().collect(),
        })
        .collect()
}

/// One transaction that turns what of ours `now` holds back into `before` (both as
/// [`owned_tables`] or full readings): our rules in built-in chains deleted, our chains emptied or
/// created, chains `before` did not have removed, then `before`'s rules appended in the order
/// they were read.
fn render_restore(before: &[SavedTable], now: &[SavedTable]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for t in before.iter().chain(now.iter()).filter(|t| t.has_owned()) {
        if !names.contains(&t.name.as_str()) {
            names.push(&t.name);
        }
    }
    names.sort_by_key(|n| {
        Table::from_name(n)
            .map_or(usize::MAX, |t| Table::COMMIT_ORDER.iter().position(|c| *c == t).unwrap_or(usize::MAX))
    });
    let mut out = String::new();
    for name in names {
        let was = before.iter().find(|t| t.name == name);
        let is = now.iter().find(|t| t.name == name);
        writeln!(out, "*{name}").unwrap();
        for r in is.into_iter().flat_map(|t| t.owned_rules_outside()) {
            writeln!(out, "-D {} {}", r.chain, r.spec).unwrap();
        }
        let chains: Vec<&str> = was.map(|t| t.owned_chains().collect()).unwrap_or_default();
        for c in &chains {
            writeln!(out, ":{c} - [0:0]").unwrap();
        }
        let stale: Vec<&str> =
            is.map(|t| t.owned_chains().filter(|c| !chains.contains(c)).collect()).unwrap_or_default();
        for c in &stale {
            writeln!(out, "-F {c}").unwrap();
        }
        for c in &stale {
            writeln!(out, "-X {c}").unwrap();
        }
        for r in was.into_iter().flat_map(|t| t.rules.iter().filter(|r| r.is_owned())) {
            writeln!(out, "-A {} {}", r.chain, r.spec).unwrap();
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// What of ours `saved` holds.
fn owned(saved: &[SavedTable]) -> Owned {
    Owned {
        chains: saved.iter().flat_map(|t| t.owned_chains().map(str::to_owned)).collect(),
        rules: saved.iter().map(|t| t.rules.iter().filter(|r| r.is_owned()).count()).sum(),
    }
}

/// One transaction that removes everything of ours found in `saved` and installs `wanted`.
fn render_replace(wanted: &[TableRules], saved: &[SavedTable]) -> String {
    let mut out = String::new();
    for name in tables_to_touch(wanted, saved) {
        let want = wanted.iter().find(|t| t.table.name() == name);
        let have = saved.iter().find(|t| t.name == name);
        writeln!(out, "*{name}").unwrap();
        if let Some(have) = have {
            for r in have.owned_rules_outside() {
                writeln!(out, "-D {} {}", r.chain, r.spec).unwrap();
            }
        }
        let wanted_chains: Vec<&str> = want.map(|t| t.chains.iter().map(|c| c.0).collect()).unwrap_or_default();
        // `:CHAIN` creates a chain, or empties it if it exists.
        for c in &wanted_chains {
            writeln!(out, ":{c} - [0:0]").unwrap();
        }
        let stale: Vec<&str> =
            have.map(|h| h.owned_chains().filter(|c| !wanted_chains.contains(c)).collect()).unwrap_or_default();
        for c in &stale {
            writeln!(out, "-F {c}").unwrap();
        }
        for c in &stale {
            writeln!(out, "-X {c}").unwrap();
        }
        for r in want.map(|t| t.rules.as_slice()).unwrap_or_default() {
            writeln!(out, "{}", r.append_line()).unwrap();
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// The tables a transaction must touch: the wanted ones and every one holding something of ours,
/// in commit order (ours first, any other table holding a rule of ours after them).
fn tables_to_touch<'a>(wanted: &[TableRules], saved: &'a [SavedTable]) -> Vec<&'a str> {
    let mut names: Vec<&str> = Vec::new();
    for t in Table::COMMIT_ORDER {
        let name = t.name();
        if wanted.iter().any(|w| w.table == t) || saved.iter().any(|s| s.name == name && s.has_owned()) {
            names.push(name);
        }
    }
    let others: BTreeSet<&str> = saved
        .iter()
        .filter(|s| s.has_owned() && Table::from_name(&s.name).is_none())
        .map(|s| s.name.as_str())
        .collect();
    names.extend(others);
    names
}

/// Appends to `diffs` every way `saved` differs from `wanted` in what we own.
fn diff(family: Family, wanted: &[TableRules], saved: &[SavedTable], diffs: &mut Vec<String>) {
    let mut names: BTreeSet<&str> = wanted.iter().map(|t| t.table.name()).collect();
    names.extend(saved.iter().filter(|t| t.has_owned()).map(|t| t.name.as_str()));
    for name in names {
        let want = wanted.iter().find(|t| t.table.name() == name);
        let have = saved.iter().find(|t| t.name == name);
        let at = |chain: &str| format!("{} {name}/{chain}", family.name());
        let want_chains: BTreeSet<&str> = want.map(|t| t.chains.iter().map(|c| c.0).collect()).unwrap_or_default();
        let have_chains: BTreeSet<&str> = have.map(|t| t.owned_chains().collect()).unwrap_or_default();
        for c in want_chains.difference(&have_chains) {
            diffs.push(format!("missing chain {}", at(c)));
        }
        for c in have_chains.difference(&want_chains) {
            diffs.push(format!("unexpected chain {}", at(c)));
        }
        // Rules per chain, in order: in our chains all of them, elsewhere only ours.
        let mut chains: BTreeSet<&str> = want.map(|t| t.rules.iter().map(|r| r.chain.0).collect()).unwrap_or_default();
        if let Some(h) = have {
            chains.extend(h.rules.iter().filter(|r| r.is_owned()).map(|r| r.chain.as_str()));
        }
        for chain in chains {
            let expected: Vec<String> = want
                .map(|t| t.rules.iter().filter(|r| r.chain.0 == chain).map(|r| r.spec()).collect())
                .unwrap_or_default();
            let actual: Vec<String> = have
                .map(|t| t.rules.iter().filter(|r| r.chain == chain && r.is_owned()).map(|r| r.spec.clone()).collect())
                .unwrap_or_default();
            if expected == actual {
                continue;
            }
            let missing: Vec<_> = expected.iter().filter(|r| !actual.contains(r)).collect();
            let extra: Vec<_> = actual.iter().filter(|r| !expected.contains(r)).collect();
            for r in &missing {
                diffs.push(format!("missing in {}: {r}", at(chain)));
            }
            for r in &extra {
                diffs.push(format!("unexpected in {}: {r}", at(chain)));
            }
            if missing.is_empty() && extra.is_empty() {
                diffs.push(format!("rules out of order or duplicated in {}", at(chain)));
            }
        }
    }
}

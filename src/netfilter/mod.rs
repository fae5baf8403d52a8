//! Applying, checking and removing rule sets in a pod's network namespace.
//!
//! The only code that runs `iptables-restore`. Each operation is one restore transaction per family
//! (per table, atomic in the kernel). The common case — the first ADD into a fresh namespace — is a
//! single process per family: the transaction creates our chains with `-N`, so it fails as a whole,
//! changing nothing, if they are already there. Only then do we read the namespace with
//! `iptables-save` and send one transaction that deletes what we own and installs the new set.

pub mod backend;
pub mod save;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use thiserror::Error;

pub use backend::{Backend, Mode};
use save::SavedTable;

use crate::netns::Netns;
use crate::redirect::Family;
use crate::rules::{self, RuleSet, TableRules};

#[derive(Debug, Error)]
pub enum NetfilterError {
    #[error(transparent)]
    Backend(#[from] backend::BackendError),
    #[error("cannot run {tool} in {netns}")]
    Spawn {
        tool: String,
        netns: String,
        #[source]
        source: std::io::Error,
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

/// How a family's rules got installed.
enum Applied {
    /// Into tables that held nothing of ours: one transaction.
    Fresh,
    /// Over rules of ours already there: read, then one replacing transaction.
    Replaced,
}

/// A chosen backend, ready to work on namespaces.
#[derive(Debug, Clone)]
pub struct Netfilter {
    backend: Backend,
}

impl Netfilter {
    pub fn new(backend: Backend) -> Netfilter {
        Netfilter { backend }
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
    pub fn apply(&self, ns: &Netns, sets: &[RuleSet]) -> Result<(), NetfilterError> {
        let mut installed_fresh = Vec::new();
        let mut repeated = false;
        for set in sets {
            let step = self.apply_family(ns, set);
            match step {
                Ok(Applied::Fresh) => installed_fresh.push(set.family),
                Ok(Applied::Replaced) => repeated = true,
                Err(e) => {
                    // Leave the namespace as we found it: undo the families this call installed
                    // into empty tables (a replaced set cannot be restored, but a retried ADD
                    // replaces it again).
                    for family in installed_fresh {
                        if let Err(undo) = self.remove_family(ns, family) {
                            log::warn!("cannot undo the {} rules after a failure: {undo}", family.name());
                        }
                    }
                    return Err(e);
                }
            }
        }
        // A repeated ADD may follow a configuration with more families than this one.
        if repeated {
            for family in Family::ALL.into_iter().filter(|f| sets.iter().all(|s| s.family != *f)) {
                self.remove_family(ns, family)?;
            }
        }
        Ok(())
    }

    fn apply_family(&self, ns: &Netns, set: &RuleSet) -> Result<Applied, NetfilterError> {
        let first = match self.restore(ns, set.family, &rules::render_fresh(set)) {
            Ok(()) => {
                log::debug!("installed the {} rules with one transaction", set.family.name());
                return Ok(Applied::Fresh);
            }
            Err(e) => e,
        };
        let saved = self.save(ns, set.family)?;
        if !saved.iter().any(SavedTable::has_owned) {
            return Err(first);
        }
        log::debug!("rules of ours are already in the {} tables: replacing them", set.family.name());
        self.restore(ns, set.family, &render_replace(&set.tables, &saved))?;
        Ok(Applied::Replaced)
    }

    /// Removes every rule and chain of ours from the namespace, in both families.
    pub fn remove(&self, ns: &Netns) -> Result<(), NetfilterError> {
        Family::ALL.into_iter().try_for_each(|f| self.remove_family(ns, f))
    }

    fn remove_family(&self, ns: &Netns, family: Family) -> Result<(), NetfilterError> {
        let saved = self.save(ns, family)?;
        if saved.iter().any(SavedTable::has_owned) {
            self.restore(ns, family, &render_replace(&[], &saved))?;
            log::debug!("removed our {} rules", family.name());
        }
        Ok(())
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

    /// Runs a tool inside `ns`, feeding it `input`; returns its stdout.
    fn run(
        &self,
        ns: &Netns,
        tool: &std::path::Path,
        args: &[&str],
        input: Option<&str>,
    ) -> Result<String, NetfilterError> {
        let name = tool.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let netns = ns.path().display().to_string();
        let spawn_err = |source| NetfilterError::Spawn { tool: name.clone(), netns: netns.clone(), source };
        let mut cmd = Command::new(tool);
        cmd.args(args)
            .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_clear()
            .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin");
        if self.backend == Backend::Legacy {
            // Legacy iptables serialises on one node-wide lock file by default; pods do not share
            // tables, so each namespace gets a lock of its own.
            cmd.env("XTABLES_LOCKFILE", lock_file(ns));
        }
        ns.enter_on_spawn(&mut cmd);
        let mut child = cmd.spawn().map_err(spawn_err)?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            // A write error means the tool exited early; its status and stderr say why.
            let _ = stdin.write_all(text.as_bytes());
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
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

/// One transaction that removes everything of ours found in `saved` and installs `wanted`.
fn render_replace(wanted: &[TableRules], saved: &[SavedTable]) -> String {
    let mut tables: BTreeSet<String> = wanted.iter().map(|t| t.table.name().to_owned()).collect();
    tables.extend(saved.iter().filter(|t| t.has_owned()).map(|t| t.name.clone()));
    let mut out = String::new();
    for name in tables {
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

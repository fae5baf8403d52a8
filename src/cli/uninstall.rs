//! `tproxy-cni uninstall`: remove every rule and chain of ours from a namespace, and nothing else.
//!
//! What is ours is decided by the marks `netfilter::save` knows (our chain names, our comment).
//! When our chain names hold rules without our comment — installed by `consul connect
//! redirect-traffic`, kuma-init or `kumactl install transparent-proxy` — nothing is removed and the
//! command says why: removing our half would leave theirs broken.

use clap::Args;
use thiserror::Error;

use super::Report;
use super::namespace::NamespaceArgs;
use crate::netfilter::{NetfilterError, PlanError};
use crate::netns::NetnsError;

/// `tproxy-cni uninstall` arguments.
#[derive(Debug, Clone, Args)]
pub struct UninstallArgs {
    #[command(flatten)]
    pub namespace: NamespaceArgs,

    /// Print the transactions that would be sent, and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Why `uninstall` removed nothing.
#[derive(Debug, Error)]
pub enum UninstallError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Netfilter(#[from] NetfilterError),
}

/// Removes (or, with `--dry-run`, prints the removal of) everything of ours.
pub(super) fn run(args: &UninstallArgs) -> Result<Report, UninstallError> {
    let ns = args.namespace.open()?;
    let nf = args.namespace.netfilter();
    let plan = nf.plan_removal(&ns)?;
    let where_ = args.namespace.describe();
    if plan.steps.is_empty() {
        let note =
            format!("tproxy-cni: nothing of ours in {where_} (iptables-{}): nothing to remove\n", nf.backend().name());
        // A dry run prints only transactions on stdout: there is none.
        return Ok(if args.dry_run { Report { stdout: String::new(), stderr: note } } else { Report::out(note) });
    }
    if args.dry_run {
        return Ok(Report::out(plan.render()));
    }
    nf.execute(&ns, &plan)?;
    let what: Vec<String> = plan
        .steps
        .iter()
        .map(|s| format!("{}: {} rule(s), {} chain(s)", s.family.name(), s.ours_before.rules, s.ours_before.chains))
        .collect();
    Ok(Report::out(format!(
        "tproxy-cni: removed from {where_} (iptables-{}): {}\n",
        nf.backend().name(),
        what.join("; ")
    )))
}

//! `tproxy-cni uninstall`: remove every rule and chain of ours from a namespace, and nothing else.
//!
//! What is ours is decided by the marks `netfilter::save` knows (our chain names, our comments:
//! `tproxy-cni`, and Kuma's prefix on Kuma's layout). With Kuma's IPv6 pass goes the `::6/128` it
//! needs on `lo`, as on DEL.
//! When our chain names hold rules without our comment — installed by `consul connect
//! redirect-traffic`, kuma-init or `kumactl install transparent-proxy` — nothing is removed and the
//! command says why: removing our half would leave theirs broken.

use clap::Args;
use thiserror::Error;

use super::Report;
use super::namespace::NamespaceArgs;
use crate::core::redirect::{Family, KUMA_INBOUND_PASSTHROUGH_V6};
use crate::core::rules::kuma;
use crate::kernel::deadline::Deadline;
use crate::kernel::netfilter::{DEFAULT_BUDGET, NetfilterError, PlanError};
use crate::kernel::netlink::{self, NetlinkError};
use crate::kernel::netns::NetnsError;

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
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

/// Removes (or, with `--dry-run`, prints the removal of) everything of ours.
pub fn run(args: &UninstallArgs) -> Result<Report, UninstallError> {
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
    // Kuma's IPv6 pass needs ::6 on lo; it goes with the pass, as on DEL.
    let removed = plan.removed();
    let kuma_ipv6 = removed.had_chain(Family::V6, kuma::INBOUND.0);
    if args.dry_run {
        let mut out = plan.render();
        if kuma_ipv6 {
            out += &format!(
                "# lo: remove {KUMA_INBOUND_PASSTHROUGH_V6}/128 (the source of Kuma's IPv6 inbound passthrough)\n"
            );
        }
        return Ok(Report::out(out));
    }
    nf.execute(&ns, &plan)?;
    netlink::release(&ns, &removed, Deadline::after(DEFAULT_BUDGET))?;
    let what: Vec<String> = plan
        .steps
        .iter()
        .map(|s| {
            format!("{}: {} rule(s), {} chain(s)", s.family.name(), s.ours_before.rules, s.ours_before.chains.len())
        })
        .collect();
    Ok(Report::out(format!(
        "tproxy-cni: removed from {where_} (iptables-{}): {}\n",
        nf.backend().name(),
        what.join("; ")
    )))
}

//! `tproxy-cni uninstall`: remove every rule and chain of ours from a namespace, and nothing else.
//!
//! What is ours is decided, for the iptables engine, by the marks `netfilter::save` knows (our
//! chain names, our comments: `tproxy-cni`, and Kuma's prefix on Kuma's layout); for the nftables
//! engine it is our tables, `ip tproxy-cni` and `ip6 tproxy-cni`. With Kuma's IPv6 pass goes the `::6/128` it
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
use crate::kernel::engine::{EngineError, PlanError};
use crate::kernel::netfilter::DEFAULT_BUDGET;
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
    Engine(#[from] EngineError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

/// Removes (or, with `--dry-run`, prints the removal of) everything of ours.
pub fn run(args: &UninstallArgs) -> Result<Report, UninstallError> {
    let ns = args.namespace.open()?;
    let engine = args.namespace.engine(Deadline::after(DEFAULT_BUDGET));
    let plan = engine.plan_removal(&ns)?;
    let where_ = args.namespace.describe();
    if plan.is_empty() {
        let note = format!("tproxy-cni: nothing of ours in {where_} ({}): nothing to remove\n", engine.name());
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
    engine.execute(&ns, &plan)?;
    netlink::release(&ns, &removed, Deadline::after(DEFAULT_BUDGET))?;
    Ok(Report::out(format!("tproxy-cni: removed from {where_} ({}): {}\n", engine.name(), plan.before().join("; "))))
}

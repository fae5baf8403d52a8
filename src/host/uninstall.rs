//! `tproxy-cni uninstall`: remove every rule and chain of ours from a namespace, and nothing else.
//!
//! What is ours is decided, for the iptables engine, by the marks `netfilter::save` knows (our
//! chain names, our comments: `tproxy-cni`, and Kuma's prefix on Kuma's layout); for the nftables
//! engine it is our tables, `ip tproxy-cni` and `ip6 tproxy-cni`. Both engines are asked, whichever
//! `--backend` says: rules of ours the other engine installed (with the other `--backend`, or
//! before an upgrade changed the default) are removed too. With Kuma's IPv6 pass goes the
//! `::6/128` it needs on `lo`, as on DEL.
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

/// Removes (or, with `--dry-run`, prints the removal of) everything of ours: what the chosen engine
/// installed, and what the other engine did — a `redirect` made with the other `--backend`, or
/// before an upgrade changed the default engine, is ours too. The other engine is asked only as
/// far as it can answer (its tools or the kernel's nf_tables may be missing: then it holds nothing).
pub fn run(args: &UninstallArgs) -> Result<Report, UninstallError> {
    let ns = args.namespace.open()?;
    let chosen = args.namespace.engine(Deadline::after(DEFAULT_BUDGET));
    let chosen_name = chosen.name();
    let mut plans = vec![(chosen.plan_removal(&ns)?, chosen)];
    let other = args.namespace.other_engine(Deadline::after(DEFAULT_BUDGET));
    match other.plan_removal(&ns) {
        Ok(plan) => plans.push((plan, other)),
        Err(e) => log::debug!("{} holds nothing that can be read: {}", other.name(), crate::text::chain(&e)),
    }
    plans.retain(|(plan, _)| !plan.is_empty());
    let where_ = args.namespace.describe();
    if plans.is_empty() {
        let note = format!("tproxy-cni: nothing of ours in {where_} ({chosen_name}): nothing to remove\n");
        // A dry run prints only transactions on stdout: there is none.
        return Ok(if args.dry_run { Report { stdout: String::new(), stderr: note } } else { Report::out(note) });
    }
    if args.dry_run {
        let mut out = String::new();
        for (plan, _) in &plans {
            out += &plan.render();
            // Kuma's IPv6 pass needs ::6 on lo; it goes with the pass, as on DEL.
            if plan.removed().had_chain(Family::V6, kuma::INBOUND.0) {
                out += &format!(
                    "# lo: remove {KUMA_INBOUND_PASSTHROUGH_V6}/128 (the source of Kuma's IPv6 inbound passthrough)\n"
                );
            }
        }
        return Ok(Report::out(out));
    }
    let mut out = String::new();
    for (plan, engine) in &plans {
        engine.execute(&ns, plan)?;
        netlink::release(&ns, &plan.removed(), Deadline::after(DEFAULT_BUDGET))?;
        out += &format!("tproxy-cni: removed from {where_} ({}): {}\n", engine.name(), plan.before().join("; "));
    }
    Ok(Report::out(out))
}

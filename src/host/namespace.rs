//! The namespace a host command works on, and with which engine and iptables: flags shared by
//! `redirect` and `uninstall`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::kernel::deadline::Deadline;
use crate::kernel::engine::{Engine, EngineKind};
use crate::kernel::netfilter::Mode;
use crate::kernel::netns::{Netns, NetnsError};

/// Where the rules go.
#[derive(Debug, Clone, Args)]
pub struct NamespaceArgs {
    /// The network namespace to work in, as a path (`/run/netns/NAME`, `/proc/PID/ns/net`).
    /// Default: the namespace this command runs in.
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,

    /// Which iptables the iptables engine uses (`--backend iptables`). `auto` follows the node's kubelet (its KUBE-IPTABLES-HINT chain) and
    /// picks nft otherwise. `redirect` and `uninstall` must use the same one.
    #[arg(long, value_enum, value_name = "MODE", env = "TPROXY_CNI_IPTABLES_MODE", default_value = "auto")]
    pub iptables_mode: IptablesMode,

    /// Which engine installs the rules: `nftables` programs tables of our own over netlink and
    /// needs no program at all; `iptables` runs the node's iptables-restore (for a kernel that
    /// lacks an nf_tables feature). `redirect` and `uninstall` must use the same one.
    #[arg(long, value_enum, value_name = "ENGINE", env = "TPROXY_CNI_BACKEND", default_value = "nftables")]
    pub backend: BackendArg,
}

/// `--backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    Iptables,
    Nftables,
}

impl From<BackendArg> for EngineKind {
    fn from(b: BackendArg) -> EngineKind {
        match b {
            BackendArg::Iptables => EngineKind::Iptables,
            BackendArg::Nftables => EngineKind::Nftables,
        }
    }
}

/// `--iptables-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IptablesMode {
    Auto,
    Nft,
    Legacy,
}

impl NamespaceArgs {
    /// Opens the namespace.
    pub fn open(&self) -> Result<Netns, NetnsError> {
        match &self.netns {
            Some(path) => Netns::open(path),
            None => Netns::current(),
        }
    }

    /// The chosen engine, every tool it runs and every kernel exchange ending by `deadline`.
    pub fn engine(&self, deadline: Deadline) -> Engine {
        let mode = match self.iptables_mode {
            IptablesMode::Auto => Mode::Auto,
            IptablesMode::Nft => Mode::Nft,
            IptablesMode::Legacy => Mode::Legacy,
        };
        Engine::new(self.backend.into(), mode, deadline)
    }

    /// The engine not chosen, for rules of ours it may hold: a `redirect` made with the other
    /// `--backend`, or before an upgrade changed the default engine.
    pub fn other_engine(&self, deadline: Deadline) -> Engine {
        let mut other = self.clone();
        other.backend = match self.backend {
            BackendArg::Iptables => BackendArg::Nftables,
            BackendArg::Nftables => BackendArg::Iptables,
        };
        other.engine(deadline)
    }

    /// How to name the namespace in messages.
    pub fn describe(&self) -> String {
        match &self.netns {
            Some(p) => format!("network namespace {}", p.display()),
            None => "this network namespace".to_owned(),
        }
    }
}

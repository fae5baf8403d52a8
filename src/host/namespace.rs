//! The namespace a host command works on, and with which iptables: flags shared by `redirect`
//! and `uninstall`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::kernel::netfilter::{Backend, Mode, Netfilter};
use crate::kernel::netns::{Netns, NetnsError};

/// Where the rules go.
#[derive(Debug, Clone, Args)]
pub struct NamespaceArgs {
    /// The network namespace to work in, as a path (`/run/netns/NAME`, `/proc/PID/ns/net`).
    /// Default: the namespace this command runs in.
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,

    /// Which iptables to use. `auto` follows the node's kubelet (its KUBE-IPTABLES-HINT chain) and
    /// picks nft otherwise. `redirect` and `uninstall` must use the same one.
    #[arg(long, value_enum, value_name = "MODE", env = "TPROXY_CNI_IPTABLES_MODE", default_value = "auto")]
    pub iptables_mode: IptablesMode,
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

    /// The netfilter engine for the chosen backend.
    pub fn netfilter(&self) -> Netfilter {
        Netfilter::new(Backend::resolve(match self.iptables_mode {
            IptablesMode::Auto => Mode::Auto,
            IptablesMode::Nft => Mode::Nft,
            IptablesMode::Legacy => Mode::Legacy,
        }))
    }

    /// How to name the namespace in messages.
    pub fn describe(&self) -> String {
        match &self.netns {
            Some(p) => format!("network namespace {}", p.display()),
            None => "this network namespace".to_owned(),
        }
    }
}

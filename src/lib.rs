//! tproxy-cni: a service mesh's transparent-proxy redirect, installed in a pod's network namespace
//! by a chained CNI plugin, so application pods need no privileged init container.
//!
//! Three products over one core (see `docs/architecture.md`):
//!
//! - [`plugin`]: the CNI plugin a container runtime calls (ADD, DEL, CHECK, …) for every pod;
//! - [`installer`]: the node DaemonSet that drops the plugin in place and chains it;
//! - [`host`]: the same redirect as a command for hosts and VMs.
//!
//! They share [`core`] (pure: the mesh dialects, the typed redirect, the rules as data), [`kernel`]
//! (everything that talks to the kernel: namespaces, netlink, the netfilter engine) and [`kube`]
//! (the API-server client). [`text`] and [`log`] are the small pieces every layer writes with;
//! [`cli`] is the command line that leads to the host commands and the installer.

pub mod cli;
pub mod core;
pub mod host;
pub mod installer;
pub mod kernel;
pub mod kube;
pub mod log;
pub mod plugin;
pub mod text;

#[cfg(test)]
mod test_dir;

//! Everything that talks to the kernel: entering a pod's network namespace ([`netns`]), the
//! netfilter engine that applies, reads back and removes our rules there ([`netfilter`]), the
//! netlink requests for what a namespace needs besides rules ([`netlink`]), and reading a redirected
//! connection's original destination ([`origdst`]). Every tool it runs ([`exec`]) and every netlink
//! exchange has a [`deadline`].
//!
//! The core decides what to install; this layer only carries it out and reports what it found.

pub mod deadline;
pub mod engine;
pub mod exec;
pub mod netfilter;
pub mod netlink;
pub mod netns;
pub mod nftables;
pub mod origdst;

//! tproxy-cni: a chained CNI plugin that installs a service mesh's transparent-proxy redirect in a
//! pod's network namespace, so application pods need no privileged init container.
//!
//! The pipeline (see `docs/architecture.md`):
//! [`cni`] (protocol) → [`pod`] (annotations) → [`mesh`] (dialect) → [`redirect`] (typed model) →
//! [`rules`] (rules as data) → [`netfilter`] (one transaction in the pod's [`netns`]), with
//! [`netlink`] for what the namespace needs besides rules (Kuma's `::6` on the loopback).

pub mod cli;
pub mod cni;
pub mod install;
pub mod kube;
pub mod limits;
pub mod log;
pub mod mesh;
pub mod netfilter;
pub mod netlink;
pub mod netns;
pub mod origdst;
pub mod pod;
pub mod redirect;
pub mod rules;

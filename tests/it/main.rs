//! The integration tests, as one test binary: the harness (`support/`) is compiled once, and each
//! area is a module, so `cargo test --test it AREA::` runs one area (`cargo test --test it podman::`)
//! and `cargo test --test it NAME` one test, by the same names as before.
//!
//! Every test shares this one process with the others, running on parallel threads. So a test may
//! change only its own thread (a network namespace entered with `setns`, credentials switched with
//! raw system calls: see `support::in_netns`) and its own child processes (a mount namespace is
//! always made by `unshare(1)` around the command that needs it). A test that must change something
//! process-wide runs its body in a child process of its own (`support::in_own_process`: the crash
//! tests, which become the subreaper of their plugins' orphans). Names are unique per process
//! (`support::unique`), and everything a test makes is removed on drop.

mod support;

mod admission_policy;
mod adversarial;
mod architecture;
mod backend;
mod concurrency;
mod consul_traffic;
mod crash;
mod cri;
mod fail_closed;
mod golden;
mod host;
mod install;
mod kube_chain;
mod kube_client;
mod kube_plugin;
mod kuma_traffic;
mod libcni;
mod lifecycle;
mod lifecycle_random;
mod manifests;
mod nftables;
mod podman;
mod protocol;
mod validate;

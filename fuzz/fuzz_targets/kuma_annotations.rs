//! Kuma's per-knob annotations (webhooks up to v2.14), `[proto:][ports:]uids` included, through
//! the whole classification (so a pod that also looks like Consul's is exercised too).
//!
//! The input is NUL-separated `key=value` annotations, over the two that make a pod Kuma's in CNI mode.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tproxy_cni::core::mesh::kuma::{CNCF_NETWORKS, KUMA_CNI_NETWORK, SIDECAR_INJECTED};
use tproxy_cni::core::mesh::{self, PodNetwork};
use tproxy_cni_fuzz::{annotations, check_outcome};

fuzz_target!(|data: &[u8]| {
    let a = annotations(data, &[(SIDECAR_INJECTED, "true"), (CNCF_NETWORKS, KUMA_CNI_NETWORK)]);
    for has_ipv6 in [false, true] {
        check_outcome(&mesh::classify(&a, PodNetwork { has_ipv6 }));
    }
});

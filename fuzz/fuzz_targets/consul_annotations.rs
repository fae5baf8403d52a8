//! Consul's individual annotations (a webhook run without its CNI flag), alone or with the JSON.
//!
//! The input is NUL-separated `key=value` annotations, over the two that make a pod Consul's.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tproxy_cni::core::mesh::consul::{INJECT_STATUS, TPROXY_STATUS};
use tproxy_cni::core::mesh::{self, PodNetwork};
use tproxy_cni_fuzz::{annotations, check_outcome};

fuzz_target!(|data: &[u8]| {
    let a = annotations(data, &[(INJECT_STATUS, "injected"), (TPROXY_STATUS, "enabled")]);
    for has_ipv6 in [false, true] {
        check_outcome(&mesh::classify(&a, PodNetwork { has_ipv6 }));
    }
});

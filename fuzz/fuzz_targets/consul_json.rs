//! Consul's `redirect-traffic-config` JSON, from a pod annotation and from Nomad's `CNI_ARGS`.
//!
//! The first byte chooses the pod's network and the `dual-stack` annotation; the rest is the JSON.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tproxy_cni::core::mesh::consul::{DUAL_STACK, INJECT_STATUS, REDIRECT_CONFIG, TPROXY_STATUS};
use tproxy_cni::core::mesh::{self, Annotations, PodNetwork};
use tproxy_cni_fuzz::{check_message, check_outcome, check_redirect};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let Ok(json) = std::str::from_utf8(rest) else { return };
    let net = PodNetwork { has_ipv6: flags & 1 != 0 };
    let mut a = Annotations::new();
    a.insert(INJECT_STATUS.into(), "injected".into());
    a.insert(TPROXY_STATUS.into(), "enabled".into());
    a.insert(REDIRECT_CONFIG.into(), json.into());
    match (flags >> 1) & 3 {
        0 => {}
        1 => drop(a.insert(DUAL_STACK.into(), "true".into())),
        2 => drop(a.insert(DUAL_STACK.into(), "false".into())),
        _ => drop(a.insert(DUAL_STACK.into(), "TRUE ".into())),
    }
    let outcome = mesh::classify(&a, net);
    check_outcome(&outcome);
    if let Ok(r) = &outcome {
        assert!(r.is_some(), "an injected transparent-proxy pod is Consul's");
    }
    match mesh::nomad(json, net) {
        Ok(r) => check_redirect(&r),
        Err(e) => check_message(&e.to_string()),
    }
});

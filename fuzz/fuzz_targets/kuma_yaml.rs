//! Kuma's `traffic.kuma.io/transparent-proxy-config` YAML, as a CNI-mode webhook writes it.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tproxy_cni::core::mesh::kuma::{
    CNCF_NETWORKS, KUMA_CNI_NETWORK, SIDECAR_CONTAINER, SIDECAR_INJECTED, TPROXY_CONFIG,
};
use tproxy_cni::core::mesh::{self, Annotations, PodContainers, PodNetwork};
use tproxy_cni_fuzz::check_outcome;

fuzz_target!(|data: &[u8]| {
    let Ok(yaml) = std::str::from_utf8(data) else { return };
    let mut a = Annotations::new();
    a.insert(SIDECAR_INJECTED.into(), "true".into());
    a.insert(TPROXY_CONFIG.into(), yaml.into());
    // With the pod spec (the API path), and from annotations alone with and without Multus' list.
    let spec = PodContainers { containers: vec!["app".into(), SIDECAR_CONTAINER.into()], init_containers: vec![] };
    check_outcome(&mesh::classify_pod(&a, Some(&spec), PodNetwork::default()));
    check_outcome(&mesh::classify_pod(&a, None, PodNetwork { has_ipv6: true }));
    a.insert(CNCF_NETWORKS.into(), KUMA_CNI_NETWORK.into());
    let outcome = mesh::classify(&a, PodNetwork::default());
    check_outcome(&outcome);
    if let Ok(r) = &outcome {
        assert!(r.is_some(), "a CNI-mode Kuma pod is ours");
    }
});

//! Whose rules a Kuma pod's are: ours, or its own `kuma-init` container's.
//!
//! `kuma.io/sidecar-injected` is `"true"`, and, when the pod spec is known (the API path supplies
//! [`PodContainers`]), a `kuma-sidecar` container or native-sidecar init container exists and no
//! `kuma-init` init container does (that pod installs its own rules). When only annotations are
//! known (the runtime path), `kuma-init` cannot be seen; the webhook then tells us instead: it
//! writes `cniMode: true` into the configuration YAML, and `k8s.v1.cni.cncf.io/networks: kuma-cni`,
//! exactly when it runs in CNI mode, that is when it does **not** inject `kuma-init`. A pod with
//! neither is left to its `kuma-init` container.

use serde::Deserialize;

use super::{CNCF_NETWORKS, INIT_CONTAINER, KUMA_CNI_NETWORK, SIDECAR_CONTAINER, SIDECAR_INJECTED, TPROXY_CONFIG};
use crate::core::mesh::{Annotations, PodContainers};

/// Is this pod Kuma's, with its transparent proxy left to the CNI? `config_cni_mode` is the YAML
/// configuration's `cniMode`, when the pod has the YAML annotation.
pub(super) fn owns(a: &Annotations, containers: Option<&PodContainers>, config_cni_mode: Option<bool>) -> bool {
    if a.get(SIDECAR_INJECTED).map(String::as_str) != Some("true") {
        return false;
    }
    match containers {
        Some(c) => {
            let sidecar = c.containers.iter().chain(&c.init_containers).any(|n| n == SIDECAR_CONTAINER);
            let init = c.init_containers.iter().any(|n| n == INIT_CONTAINER);
            if init {
                log::debug!("kuma pod has a {INIT_CONTAINER} init container: it installs its own rules");
            } else if !sidecar {
                log::debug!("kuma pod has no {SIDECAR_CONTAINER} container: nothing to redirect to");
            }
            sidecar && !init
        }
        None => {
            let cni_mode = config_cni_mode == Some(true) || names_kuma_cni(a.get(CNCF_NETWORKS));
            if !cni_mode {
                log::info!(
                    "kuma pod injected without CNI mode ({TPROXY_CONFIG} has no cniMode: true, {CNCF_NETWORKS} does \
                     not name {KUMA_CNI_NETWORK}): its {INIT_CONTAINER} container installs the rules; passing through"
                );
            }
            cni_mode
        }
    }
}

/// Does Multus' network list (`a,b`, `ns/name@ifname`, or a JSON list of `{"name": …}`) name kuma-cni?
pub(super) fn names_kuma_cni(networks: Option<&String>) -> bool {
    let Some(v) = networks else { return false };
    let is_kuma = |entry: &str| {
        let name = entry.trim().split('@').next().unwrap_or_default();
        name.rsplit('/').next() == Some(KUMA_CNI_NETWORK)
    };
    if v.trim_start().starts_with('[') {
        #[derive(Deserialize)]
        struct Net {
            name: String,
        }
        return serde_json::from_str::<Vec<Net>>(v).is_ok_and(|nets| nets.iter().any(|n| is_kuma(&n.name)));
    }
    v.split(',').any(is_kuma)
}

#[cfg(test)]
mod tests {
    use super::super::redirect;
    use super::super::tests::pod;
    use super::*;
    use crate::core::mesh::PodNetwork;

    #[test]
    fn in_mesh_test_follows_the_injected_annotation_and_the_containers() {
        assert!(matches!(redirect(&Annotations::new(), None, PodNetwork::default()), Ok(None)));
        let mut a = pod(&[]);
        a.insert(SIDECAR_INJECTED.into(), "false".into());
        assert!(matches!(redirect(&a, None, PodNetwork::default()), Ok(None)));

        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let a = pod(&[]);
        let spec = |containers: &[&str], init: &[&str]| PodContainers {
            containers: names(containers),
            init_containers: names(init),
        };
        assert!(redirect(&a, Some(&spec(&["app", SIDECAR_CONTAINER], &[])), PodNetwork::default()).unwrap().is_some());
        assert!(
            redirect(&a, Some(&spec(&["app"], &[SIDECAR_CONTAINER])), PodNetwork::default()).unwrap().is_some(),
            "a native sidecar counts"
        );
        assert!(matches!(redirect(&a, Some(&spec(&["app"], &[])), PodNetwork::default()), Ok(None)), "no sidecar");
        assert!(
            matches!(
                redirect(&a, Some(&spec(&["app", SIDECAR_CONTAINER], &[INIT_CONTAINER])), PodNetwork::default()),
                Ok(None)
            ),
            "kuma-init installs its own rules"
        );
        let mut broken = a.clone();
        broken.insert(TPROXY_CONFIG.into(), "redirect: [".into());
        assert!(
            matches!(
                redirect(&broken, Some(&spec(&["app", SIDECAR_CONTAINER], &[INIT_CONTAINER])), PodNetwork::default()),
                Ok(None)
            ),
            "a kuma-init pod is not ours, whatever its YAML says"
        );
        assert!(redirect(&broken, Some(&spec(&[SIDECAR_CONTAINER], &[])), PodNetwork::default()).is_err());
    }

    #[test]
    fn without_the_pod_spec_the_webhooks_cni_mode_decides() {
        let mut a = pod(&[]);
        a.remove(CNCF_NETWORKS);
        assert!(matches!(redirect(&a, None, PodNetwork::default()), Ok(None)), "no CNI mode: kuma-init's pod");
        a.insert(TPROXY_CONFIG.into(), "cniMode: true\n".into());
        assert!(redirect(&a, None, PodNetwork::default()).unwrap().is_some());
        a.insert(TPROXY_CONFIG.into(), "kumaDPUser: \"5678\"\n".into());
        assert!(matches!(redirect(&a, None, PodNetwork::default()), Ok(None)));
        for networks in ["kuma-cni", "other,kube-system/kuma-cni@eth1", r#"[{"name":"kuma-cni","namespace":"x"}]"#] {
            a.insert(CNCF_NETWORKS.into(), networks.into());
            assert!(redirect(&a, None, PodNetwork::default()).unwrap().is_some(), "{networks}");
        }
        a.insert(CNCF_NETWORKS.into(), "kuma-cni-other".into());
        assert!(matches!(redirect(&a, None, PodNetwork::default()), Ok(None)));
    }
}

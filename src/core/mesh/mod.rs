//! Mesh dialects: which mesh, if any, owns a pod, and what redirect its annotations ask for.
//!
//! Each dialect reads exactly the annotations its mesh's webhook writes (see `docs/meshes.md`) and
//! answers `None` (not ours: pass through, touch nothing) or a validated [`Redirect`].

pub mod consul;
pub mod kuma;

use std::collections::BTreeMap;

use thiserror::Error;

use crate::core::redirect::Redirect;

/// A pod's annotations, as the runtime or the API server gave them.
pub type Annotations = BTreeMap<String, String>;

/// What the dialects need to know about the pod's network besides its annotations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodNetwork {
    /// The pod has an IPv6 address (from the previous plugin's result).
    pub has_ipv6: bool,
}

/// The names of a pod's containers, when its spec is known (the API path). The runtime path
/// knows only annotations and passes `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodContainers {
    pub containers: Vec<String>,
    /// Init containers, including native sidecars (`restartPolicy: Always`).
    pub init_containers: Vec<String>,
}

/// The pod asks for a redirect that cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{mesh} pod: annotation {annotation}: {reason}")]
pub struct AnnotationError {
    pub mesh: &'static str,
    pub annotation: &'static str,
    pub reason: String,
}

/// Decides which mesh owns the pod and builds its redirect, from annotations alone.
pub fn classify(annotations: &Annotations, net: PodNetwork) -> Result<Option<Redirect>, AnnotationError> {
    classify_pod(annotations, None, net)
}

/// Decides which mesh owns the pod and builds its redirect, with the pod's containers when its
/// spec is known. A pod injected by two meshes is refused: each would redirect the other's proxy,
/// and no choice of ours could be right.
pub fn classify_pod(
    annotations: &Annotations,
    containers: Option<&PodContainers>,
    net: PodNetwork,
) -> Result<Option<Redirect>, AnnotationError> {
    let kuma_injected = annotations.get(kuma::SIDECAR_INJECTED).is_some_and(|v| v == "true");
    if consul::owns(annotations) && kuma_injected {
        return Err(AnnotationError {
            mesh: "consul and kuma",
            annotation: kuma::SIDECAR_INJECTED,
            reason: format!(
                "the pod is injected by both meshes ({} and {} are set too); a pod can be in one mesh only: \
                 disable the injection of the other",
                consul::INJECT_STATUS,
                consul::TPROXY_STATUS
            ),
        });
    }
    if let Some(c) = consul::redirect(annotations, net)? {
        return Ok(Some(Redirect::Consul(c)));
    }
    Ok(kuma::redirect(annotations, containers, net)?.map(Redirect::Kuma))
}

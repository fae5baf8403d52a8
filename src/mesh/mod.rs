//! Mesh dialects: which mesh, if any, owns a pod, and what redirect its annotations ask for.
//!
//! Each dialect reads exactly the annotations its mesh's webhook writes (see `docs/meshes.md`) and
//! answers `None` (not ours: pass through, touch nothing) or a validated [`Redirect`].

pub mod consul;

use std::collections::BTreeMap;

use thiserror::Error;

use crate::redirect::Redirect;

/// A pod's annotations, as the runtime or the API server gave them.
pub type Annotations = BTreeMap<String, String>;

/// What the dialects need to know about the pod's network besides its annotations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodNetwork {
    /// The pod has an IPv6 address (from the previous plugin's result).
    pub has_ipv6: bool,
}

/// The pod asks for a redirect that cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{mesh} pod: annotation {annotation}: {reason}")]
pub struct AnnotationError {
    pub mesh: &'static str,
    pub annotation: &'static str,
    pub reason: String,
}

/// Decides which mesh owns the pod and builds its redirect.
pub fn classify(annotations: &Annotations, net: PodNetwork) -> Result<Option<Redirect>, AnnotationError> {
    Ok(consul::redirect(annotations, net)?.map(Redirect::Consul))
}

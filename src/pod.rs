//! Who the pod is, and where its mesh configuration comes from.
//!
//! Sources, in order: Nomad's `CONSUL_IPTABLES_CONFIG` in `CNI_ARGS`; the annotations the runtime
//! passed as the `io.kubernetes.cri.pod-annotations` capability (containerd, CRI-O). With neither,
//! the pod is passed through untouched.

use crate::cni::args::CniArgs;
use crate::cni::config::NetConf;
use crate::mesh::{self, AnnotationError, PodNetwork};
use crate::redirect::Redirect;

/// The pod a CNI call is about, as far as the runtime told us.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub uid: Option<String>,
}

impl PodRef {
    pub fn from_args(args: &CniArgs) -> PodRef {
        PodRef { namespace: args.pod_namespace.clone(), name: args.pod_name.clone(), uid: args.pod_uid.clone() }
    }
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let part = |s: &Option<String>| s.clone().unwrap_or_else(|| "?".into());
        write!(f, "{}/{}", part(&self.namespace), part(&self.name))
    }
}

/// The redirect the pod asks for, or `None` when it asks for none (or we cannot tell).
pub fn redirect(conf: &NetConf, args: &CniArgs, net: PodNetwork) -> Result<Option<Redirect>, AnnotationError> {
    if let Some(json) = &args.consul_iptables_config {
        log::debug!("redirect configuration from CNI_ARGS CONSUL_IPTABLES_CONFIG (Nomad)");
        return mesh::consul::from_json(json, net).map(|c| Some(Redirect::Consul(c)));
    }
    match &conf.pod_annotations {
        Some(annotations) => {
            log::debug!("{} pod annotations from the runtime", annotations.len());
            mesh::classify(annotations, net)
        }
        None => {
            log::debug!("the runtime passed no pod annotations: passing the pod through");
            Ok(None)
        }
    }
}

//! Who the pod is, and where its mesh configuration comes from.
//!
//! [`lookup`] decides, in this order, and stops at the first that applies:
//!
//! 1. `CONSUL_IPTABLES_CONFIG` in `CNI_ARGS` (Nomad): the Consul redirect configuration itself.
//! 2. The pod's namespace is in `exclude_namespaces`, or the pod is one of the installer's
//!    (`installer_pods`): pass through. Decided from `CNI_ARGS` alone, so these pods start even
//!    when the API server is down or the plugin is misconfigured — the installer that would fix
//!    things must never be blocked by them.
//! 3. The annotations the runtime passed as the `io.kubernetes.cri.pod-annotations` capability
//!    (containerd, CRI-O): no network call.
//! 4. GET the pod from the API server with the conflist's `kubeconfig`. A pod the API server does
//!    not know (404) is passed through: it cannot carry a mesh's annotations. When the API server
//!    cannot be reached the pod cannot be classified, and the caller fails the call with "try again
//!    later" rather than guess.
//!
//! Exclusions come before the runtime's annotations so that a pod is treated the same whichever
//! runtime starts it. With no source at all (no runtime annotations, no kubeconfig) the pod is
//! passed through.
//!
//! [`ConsulStatus`] then reports progress on a Consul pod's `transparent-proxy-status` annotation,
//! as consul-cni does; its failures are logged, never fatal.

use std::cell::OnceCell;

use thiserror::Error;

use crate::core::mesh::{self, AnnotationError, Annotations, PodContainers, PodNetwork};
use crate::core::redirect::Redirect;
use crate::kube::{self, Class};
use crate::plugin::args::CniArgs;
use crate::plugin::config::NetConf;

/// The pod a CNI call is about, as far as the runtime told us.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub uid: Option<String>,
}

impl PodRef {
    /// The pod `CNI_ARGS` names.
    pub fn from_args(args: &CniArgs) -> PodRef {
        PodRef { namespace: args.pod_namespace.clone(), name: args.pod_name.clone(), uid: args.pod_uid.clone() }
    }

    /// The pod's namespace, or the conflist's `default_namespace` when the runtime sent none
    /// (podman sends `K8S_POD_NAME` only).
    pub fn namespace_or_default<'a>(&'a self, conf: &'a NetConf) -> &'a str {
        match &self.namespace {
            Some(ns) => ns,
            None => {
                log::debug!("no K8S_POD_NAMESPACE in CNI_ARGS: using default_namespace {:?}", conf.default_namespace);
                &conf.default_namespace
            }
        }
    }
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let part = |s: &Option<String>| s.clone().unwrap_or_else(|| "?".into());
        write!(f, "{}/{}", part(&self.namespace), part(&self.name))
    }
}

/// Where a pod's mesh configuration came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `CONSUL_IPTABLES_CONFIG` in `CNI_ARGS`.
    Nomad,
    /// The runtime's `io.kubernetes.cri.pod-annotations` capability.
    Runtime,
    /// A GET of the pod from the API server.
    ApiServer,
}

/// Why a pod is passed through without its annotations being read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pass {
    /// Its namespace is in `exclude_namespaces`.
    ExcludedNamespace,
    /// It is one of the installer's pods (`installer_pods`).
    InstallerPod,
    /// No annotations from the runtime, and no `kubeconfig` to look the pod up with.
    NoSource,
    /// No `K8S_POD_NAME`, or a name Kubernetes could not have issued: not a Kubernetes pod.
    NotAKubernetesPod,
    /// The API server has no such pod.
    UnknownToApiServer,
}

/// What [`lookup`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Nomad's Consul configuration JSON.
    Nomad(String),
    /// The pod's annotations (and, from the API server, its container names).
    Pod { source: Source, annotations: Annotations, containers: Option<PodContainers> },
    /// Pass the pod through, untouched.
    Pass(Pass),
}

impl Lookup {
    /// The redirect the pod asks for, or `None` when it asks for none.
    pub fn redirect(&self, net: PodNetwork) -> Result<Option<Redirect>, AnnotationError> {
        match self {
            Lookup::Nomad(json) => mesh::nomad(json, net).map(Some),
            Lookup::Pod { annotations, containers, .. } => mesh::classify_pod(annotations, containers.as_ref(), net),
            Lookup::Pass(_) => Ok(None),
        }
    }

    /// Where the configuration came from, when one was found.
    pub fn source(&self) -> Option<Source> {
        match self {
            Lookup::Nomad(_) => Some(Source::Nomad),
            Lookup::Pod { source, .. } => Some(*source),
            Lookup::Pass(_) => None,
        }
    }
}

/// The pod could not be classified.
#[derive(Debug, Error)]
pub enum PodError {
    /// The API server could not tell us the pod's annotations.
    #[error("cannot tell whether pod {pod} is in a mesh")]
    Api {
        pod: String,
        #[source]
        source: Box<kube::Error>,
    },
}

impl PodError {
    /// What the underlying API failure means for the caller.
    pub fn class(&self) -> Class {
        match self {
            PodError::Api { source, .. } => source.class(),
        }
    }
}

/// The API server, as the conflist's `kubeconfig` describes it; the kubeconfig is read on first use
/// only, so a pod decided without the API server never depends on it.
#[derive(Debug)]
pub struct Api<'c> {
    conf: &'c NetConf,
    client: OnceCell<kube::Client>,
}

impl<'c> Api<'c> {
    /// The API server of `conf`'s `kubeconfig` (not read yet).
    pub fn new(conf: &'c NetConf) -> Api<'c> {
        Api { conf, client: OnceCell::new() }
    }

    /// The client, or `None` when no kubeconfig is configured.
    pub fn client(&self) -> Result<Option<&kube::Client>, kube::Error> {
        let Some(path) = &self.conf.kubeconfig else { return Ok(None) };
        if let Some(c) = self.client.get() {
            return Ok(Some(c));
        }
        let client = kube::Client::from_kubeconfig(path, self.conf.api_timeout)?;
        Ok(Some(self.client.get_or_init(|| client)))
    }
}

/// Finds where the pod's mesh configuration comes from (see the module documentation for the order).
pub fn lookup(conf: &NetConf, args: &CniArgs, api: &Api<'_>) -> Result<Lookup, PodError> {
    if let Some(json) = &args.consul_iptables_config {
        log::debug!("redirect configuration from CNI_ARGS CONSUL_IPTABLES_CONFIG (Nomad)");
        return Ok(Lookup::Nomad(json.clone()));
    }
    let pod = PodRef::from_args(args);
    let namespace = pod.namespace_or_default(conf);
    if conf.exclude_namespaces.iter().any(|ns| ns == namespace) {
        log::debug!("namespace {namespace} is in exclude_namespaces: passing the pod through");
        return Ok(Lookup::Pass(Pass::ExcludedNamespace));
    }
    if let (Some(installer), Some(name)) = (&conf.installer_pods, &pod.name)
        && installer.matches(namespace, name)
    {
        log::debug!("pod {namespace}/{name} is one of the installer's (installer_pods): passing it through");
        return Ok(Lookup::Pass(Pass::InstallerPod));
    }
    if let Some(annotations) = &conf.pod_annotations {
        log::debug!("{} pod annotations from the runtime", annotations.len());
        return Ok(Lookup::Pod { source: Source::Runtime, annotations: annotations.clone(), containers: None });
    }
    let Some(name) = pod.name.as_deref().filter(|n| kube::is_valid_name(n) && kube::is_valid_name(namespace)) else {
        log::debug!("no Kubernetes pod name and namespace in CNI_ARGS ({pod}): passing the pod through");
        return Ok(Lookup::Pass(Pass::NotAKubernetesPod));
    };
    let fail = |source| PodError::Api { pod: format!("{namespace}/{name}"), source: Box::new(source) };
    let Some(client) = api.client().map_err(fail)? else {
        log::info!(
            "no pod annotations from the runtime and no kubeconfig configured: pod {namespace}/{name} cannot be \
             looked up, passing it through (declare the io.kubernetes.cri.pod-annotations capability or set kubeconfig)"
        );
        return Ok(Lookup::Pass(Pass::NoSource));
    };
    match client.get_pod(namespace, name) {
        Ok(p) => {
            log::debug!("{} pod annotations from the API server {}", p.metadata.annotations.len(), client.server());
            let containers = PodContainers {
                containers: p.container_names().map(str::to_owned).collect(),
                init_containers: p.init_container_names().map(str::to_owned).collect(),
            };
            Ok(Lookup::Pod {
                source: Source::ApiServer,
                annotations: p.metadata.annotations,
                containers: Some(containers),
            })
        }
        Err(e) if e.class() == Class::NotFound => {
            log::warn!("{e}: passing the pod through (a pod the API server does not know carries no mesh annotations)");
            Ok(Lookup::Pass(Pass::UnknownToApiServer))
        }
        Err(e) => Err(fail(e)),
    }
}

/// Reports progress on a Consul pod's `consul.hashicorp.com/transparent-proxy-status` annotation:
/// `waiting` before the rules are applied, `complete` after, with a merge patch of that one key.
/// Failures are logged and never fail the call; after a failure that time could cure (the API
/// server down or slow), the second report is skipped so ADD does not wait out another deadline.
#[derive(Debug)]
pub struct ConsulStatus<'a> {
    client: &'a kube::Client,
    namespace: String,
    name: String,
    gave_up: std::cell::Cell<bool>,
}

/// The value before the rules are applied.
pub const CONSUL_STATUS_WAITING: &str = "waiting";
/// The value once they are.
pub const CONSUL_STATUS_COMPLETE: &str = "complete";

impl<'a> ConsulStatus<'a> {
    /// A reporter when the pod is a Kubernetes Consul pod, the switch is on and there is an API
    /// server to report to; `None` otherwise.
    pub fn new(
        conf: &NetConf,
        args: &CniArgs,
        found: &Lookup,
        redirect: &Redirect,
        api: &'a Api<'_>,
    ) -> Option<ConsulStatus<'a>> {
        if !conf.consul_status_annotation || !matches!(redirect, Redirect::Consul(_)) {
            return None;
        }
        if !matches!(found.source(), Some(Source::Runtime | Source::ApiServer)) {
            return None;
        }
        let pod = PodRef::from_args(args);
        let namespace = pod.namespace_or_default(conf).to_owned();
        let name = pod.name.filter(|n| kube::is_valid_name(n))?;
        match api.client() {
            Ok(Some(client)) => Some(ConsulStatus { client, namespace, name, gave_up: Default::default() }),
            Ok(None) => {
                log::debug!("no kubeconfig: not reporting {}", mesh::consul::TPROXY_STATUS);
                None
            }
            Err(e) => {
                log::warn!("not reporting {}: {}", mesh::consul::TPROXY_STATUS, crate::text::chain(&e));
                None
            }
        }
    }

    /// Sets the annotation to `value`, logging (not returning) any failure.
    pub fn report(&self, value: &str) {
        if self.gave_up.get() {
            log::info!(
                "not setting {}={value}: the API server failed the previous report",
                mesh::consul::TPROXY_STATUS
            );
            return;
        }
        match self.client.patch_pod_annotation(&self.namespace, &self.name, mesh::consul::TPROXY_STATUS, value) {
            Ok(_) => log::debug!("set {}={value}", mesh::consul::TPROXY_STATUS),
            Err(e) => {
                log::warn!(
                    "cannot set {}={value} (carrying on, the annotation is informational): {}",
                    mesh::consul::TPROXY_STATUS,
                    crate::text::chain(&e)
                );
                if e.class() == Class::Transient {
                    self.gave_up.set(true);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(extra: &str) -> NetConf {
        NetConf::parse(format!(r#"{{"cniVersion":"1.0.0","name":"n","type":"tproxy-cni"{extra}}}"#).as_bytes()).unwrap()
    }

    fn args(s: &str) -> CniArgs {
        CniArgs::parse(s).unwrap()
    }

    const CONSUL: &str = r#","runtimeConfig":{"io.kubernetes.cri.pod-annotations":{
        "consul.hashicorp.com/connect-inject-status":"injected","consul.hashicorp.com/transparent-proxy-status":"enabled",
        "consul.hashicorp.com/redirect-traffic-config":"{\"ProxyUserID\":\"5995\",\"ProxyInboundPort\":20000}"}}"#;

    /// A kubeconfig that must never be read: the tests below prove decisions made without it.
    const UNREADABLE_KUBECONFIG: &str = r#","kubeconfig":"/nonexistent/tproxy-cni-test/kubeconfig""#;

    #[test]
    fn nomad_comes_first() {
        let c = conf(UNREADABLE_KUBECONFIG);
        let a =
            args(r#"K8S_POD_NAMESPACE=kube-system;CONSUL_IPTABLES_CONFIG={"ProxyUserID":"1","ProxyInboundPort":2}"#);
        let l = lookup(&c, &a, &Api::new(&c)).unwrap();
        assert_eq!(l.source(), Some(Source::Nomad));
        assert!(l.redirect(PodNetwork::default()).unwrap().is_some());
    }

    #[test]
    fn exclusions_and_installer_pods_pass_before_any_source() {
        let c = conf(&format!(
            r#"{UNREADABLE_KUBECONFIG}{CONSUL},"installer_pods":{{"namespace":"mesh-system","name_prefix":"tproxy-cni-"}}"#
        ));
        let api = Api::new(&c);
        let l = lookup(&c, &args("K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1"), &api).unwrap();
        assert_eq!(l, Lookup::Pass(Pass::ExcludedNamespace));
        let l = lookup(&c, &args("K8S_POD_NAMESPACE=mesh-system;K8S_POD_NAME=tproxy-cni-x7k2p"), &api).unwrap();
        assert_eq!(l, Lookup::Pass(Pass::InstallerPod));
        // Any other pod of that namespace is looked at as usual.
        let l = lookup(&c, &args("K8S_POD_NAMESPACE=mesh-system;K8S_POD_NAME=web-0"), &api).unwrap();
        assert_eq!(l.source(), Some(Source::Runtime));
        assert!(l.redirect(PodNetwork::default()).unwrap().is_some());
    }

    #[test]
    fn the_default_namespace_stands_in_for_a_missing_one() {
        let c = conf(r#","exclude_namespaces":["podman"],"default_namespace":"podman""#);
        let l = lookup(&c, &args("IgnoreUnknown=1;K8S_POD_NAME=my_container"), &Api::new(&c)).unwrap();
        assert_eq!(l, Lookup::Pass(Pass::ExcludedNamespace));
    }

    #[test]
    fn without_annotations_or_kubeconfig_the_pod_passes() {
        let c = conf("");
        let l = lookup(&c, &args("K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0"), &Api::new(&c)).unwrap();
        assert_eq!(l, Lookup::Pass(Pass::NoSource));
        let l = lookup(&c, &args(""), &Api::new(&c)).unwrap();
        assert_eq!(l, Lookup::Pass(Pass::NotAKubernetesPod));
    }

    #[test]
    fn names_kubernetes_could_not_issue_are_not_looked_up() {
        let c = conf(UNREADABLE_KUBECONFIG);
        let l = lookup(&c, &args("IgnoreUnknown=1;K8S_POD_NAME=My_Container"), &Api::new(&c)).unwrap();
        assert_eq!(l, Lookup::Pass(Pass::NotAKubernetesPod));
    }

    #[test]
    fn an_unreadable_kubeconfig_is_a_config_failure_naming_the_pod() {
        let c = conf(UNREADABLE_KUBECONFIG);
        let e = lookup(&c, &args("K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0"), &Api::new(&c)).unwrap_err();
        assert_eq!(e.class(), Class::Config);
        let msg = crate::text::chain(&e);
        assert!(msg.contains("pod shop/web-0") && msg.contains("/nonexistent/tproxy-cni-test/kubeconfig"), "{msg}");
    }

    #[test]
    fn status_reports_only_for_kubernetes_consul_pods_with_the_switch_on() {
        let c = conf(CONSUL);
        let api = Api::new(&c);
        let a = args("K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0");
        let found = lookup(&c, &a, &api).unwrap();
        let r = found.redirect(PodNetwork::default()).unwrap().unwrap();
        // No kubeconfig: nobody to report to.
        assert!(ConsulStatus::new(&c, &a, &found, &r, &api).is_none());
        let off = conf(&format!(r#"{CONSUL},"consul_status_annotation":false,"kubeconfig":"/x/kc""#));
        assert!(ConsulStatus::new(&off, &a, &found, &r, &Api::new(&off)).is_none());
        // Nomad has no pod object to annotate.
        let nomad = Lookup::Nomad(String::new());
        let with_kc = conf(UNREADABLE_KUBECONFIG);
        assert!(ConsulStatus::new(&with_kc, &a, &nomad, &r, &Api::new(&with_kc)).is_none());
    }
}

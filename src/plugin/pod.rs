//! Who the pod is, and where its mesh configuration comes from.
//!
//! [`lookup`] decides, in this order, and stops at the first that applies:
//!
//! 1. `CONSUL_IPTABLES_CONFIG` in `CNI_ARGS` (Nomad): the Consul redirect configuration itself.
//! 2. The pod's namespace is in `exclude_namespaces`: pass through, decided from `CNI_ARGS` alone,
//!    so these pods start even when the API server is down or the plugin is misconfigured.
//! 3. The annotations the runtime passed as the `io.kubernetes.cri.pod-annotations` capability
//!    (containerd, CRI-O): no network call. The key's presence is what counts: containerd sends
//!    `null` for a pod without annotations, and that pod is in no mesh.
//! 4. No Kubernetes pod name in `CNI_ARGS` (or one Kubernetes could not have issued), or no
//!    `K8S_POD_NAMESPACE` and no `kubeconfig` to look the pod up in `default_namespace` with: not
//!    a Kubernetes pod — every Kubernetes runtime sends both — so no webhook annotated it. Pass.
//! 5. GET the pod from the API server with the conflist's `kubeconfig`. A pod the API server says
//!    does not exist (404 with the `Status` naming that pod) is passed through: it cannot carry a
//!    mesh's annotations. Any other failure leaves the pod unclassified.
//!
//! A pod that none of these classifies — a Kubernetes pod whose runtime passed no annotations and
//! for which there is no `kubeconfig`, or whose lookup failed — is an error ([`PodError`]): it may
//! be a mesh pod, and ADD must not let it start without its redirect. Two exceptions pass it
//! through instead, with a warning: the installer's own pods (`installer_pods`), so that the
//! component that repairs the node is never blocked by what it repairs; and every such pod when the
//! conflist says `"unclassified_pods": "pass"`. The installer's pods are recognised by namespace
//! and name prefix, but only when nothing better is known: with the runtime's annotations, or an
//! answer from the API server, they are classified like any pod, so a mesh pod named like them
//! is still redirected.
//!
//! Exclusions come before the runtime's annotations so that a pod is treated the same whichever
//! runtime starts it.
//!
//! [`ConsulStatus`] then reports progress on a Consul pod's `transparent-proxy-status` annotation,
//! as consul-cni does; its failures are logged, never fatal.

use std::cell::OnceCell;

use thiserror::Error;

use crate::core::mesh::{self, AnnotationError, Annotations, PodContainers, PodNetwork};
use crate::core::redirect::Redirect;
use crate::kube::{self, Class};
use crate::plugin::args::CniArgs;
use crate::plugin::config::{NetConf, Unclassified};

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
    /// It could not be classified, and it is one of the installer's pods (`installer_pods`).
    InstallerPod,
    /// No `K8S_POD_NAME`, or a name Kubernetes could not have issued, or no `K8S_POD_NAMESPACE`
    /// and no `kubeconfig`: not a Kubernetes pod.
    NotAKubernetesPod,
    /// The API server says there is no such pod.
    UnknownToApiServer,
    /// It could not be classified, and the conflist says `"unclassified_pods": "pass"`.
    Unclassified,
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
    /// A Kubernetes pod whose runtime passed no annotations, with no kubeconfig to look it up with.
    #[error(
        "cannot tell whether pod {pod} is in a mesh: the runtime passed no pod annotations and no kubeconfig is \
         set; declare the {cap} capability in tproxy-cni's conflist entry (containerd, CRI-O) or set kubeconfig \
         (or, to start such pods without a redirect, set unclassified_pods to \"pass\")",
        cap = crate::plugin::config::POD_ANNOTATIONS_CAPABILITY
    )]
    NoSource { pod: String },
}

impl PodError {
    /// What the failure means for the caller: an API failure's own class; no source at all is
    /// a configuration to fix.
    pub fn class(&self) -> Class {
        match self {
            PodError::Api { source, .. } => source.class(),
            PodError::NoSource { .. } => Class::Config,
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

/// Finds where the pod's mesh configuration comes from (see the module documentation for the
/// order), passing an unclassified pod through when `installer_pods` or `unclassified_pods` says so.
pub fn lookup(conf: &NetConf, args: &CniArgs, api: &Api<'_>) -> Result<Lookup, PodError> {
    let err = match classify(conf, args, api) {
        Ok(found) => return Ok(found),
        Err(e) => e,
    };
    let pod = PodRef::from_args(args);
    let namespace = pod.namespace_or_default(conf);
    if let (Some(installer), Some(name)) = (&conf.installer_pods, &pod.name)
        && installer.matches(namespace, name)
    {
        log::warn!(
            "{}: pod {namespace}/{name} is named like the installer's (installer_pods): passing it through",
            crate::text::chain(&err)
        );
        return Ok(Lookup::Pass(Pass::InstallerPod));
    }
    if conf.unclassified_pods == Unclassified::Pass {
        log::warn!("{}: passing the pod through (unclassified_pods is \"pass\")", crate::text::chain(&err));
        return Ok(Lookup::Pass(Pass::Unclassified));
    }
    Err(err)
}

/// [`lookup`] without the exceptions for pods it cannot classify.
fn classify(conf: &NetConf, args: &CniArgs, api: &Api<'_>) -> Result<Lookup, PodError> {
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
        if pod.namespace.is_none() {
            log::debug!(
                "no K8S_POD_NAMESPACE in CNI_ARGS, which every Kubernetes runtime sends, and no kubeconfig to look \
                 {name} up in {namespace} with: not a Kubernetes pod, passing it through"
            );
            return Ok(Lookup::Pass(Pass::NotAKubernetesPod));
        }
        return Err(PodError::NoSource { pod: format!("{namespace}/{name}") });
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
    fn exclusions_pass_before_any_source() {
        let c = conf(&format!(r#"{UNREADABLE_KUBECONFIG}{CONSUL}"#));
        let l = lookup(&c, &args("K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1"), &Api::new(&c)).unwrap();
        assert_eq!(l, Lookup::Pass(Pass::ExcludedNamespace));
    }

    const INSTALLER: &str = r#","installer_pods":{"namespace":"mesh-system","name_prefix":"tproxy-cni-"}"#;

    #[test]
    fn installer_pods_pass_only_when_nothing_better_is_known() {
        // With the runtime's annotations, a pod named like the installer's is classified like any
        // other: these put it in Consul's mesh.
        let c = conf(&format!("{UNREADABLE_KUBECONFIG}{CONSUL}{INSTALLER}"));
        let l =
            lookup(&c, &args("K8S_POD_NAMESPACE=mesh-system;K8S_POD_NAME=tproxy-cni-x7k2p"), &Api::new(&c)).unwrap();
        assert_eq!(l.source(), Some(Source::Runtime));
        assert!(l.redirect(PodNetwork::default()).unwrap().is_some());
        // Without them, and with a kubeconfig that cannot be used: it cannot be classified, and as
        // the installer's it passes; any other pod of that namespace does not.
        let c = conf(&format!("{UNREADABLE_KUBECONFIG}{INSTALLER}"));
        let l =
            lookup(&c, &args("K8S_POD_NAMESPACE=mesh-system;K8S_POD_NAME=tproxy-cni-x7k2p"), &Api::new(&c)).unwrap();
        assert_eq!(l, Lookup::Pass(Pass::InstallerPod));
        let e = lookup(&c, &args("K8S_POD_NAMESPACE=mesh-system;K8S_POD_NAME=web-0"), &Api::new(&c)).unwrap_err();
        assert_eq!(e.class(), Class::Config);
        // The same name in another namespace is not the installer's.
        let e = lookup(&c, &args("K8S_POD_NAMESPACE=shop;K8S_POD_NAME=tproxy-cni-x7k2p"), &Api::new(&c)).unwrap_err();
        assert_eq!(e.class(), Class::Config);
        // No source at all: the installer's pod passes.
        let c = conf(INSTALLER);
        let l =
            lookup(&c, &args("K8S_POD_NAMESPACE=mesh-system;K8S_POD_NAME=tproxy-cni-x7k2p"), &Api::new(&c)).unwrap();
        assert_eq!(l, Lookup::Pass(Pass::InstallerPod));
    }

    #[test]
    fn a_null_annotation_map_is_a_pod_in_no_mesh_without_any_lookup() {
        let c =
            conf(&format!(r#"{UNREADABLE_KUBECONFIG},"runtimeConfig":{{"io.kubernetes.cri.pod-annotations":null}}"#));
        let l = lookup(&c, &args("K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0"), &Api::new(&c)).unwrap();
        assert_eq!(l.source(), Some(Source::Runtime));
        assert_eq!(l.redirect(PodNetwork::default()).unwrap(), None);
    }

    #[test]
    fn the_default_namespace_stands_in_for_a_missing_one() {
        let c = conf(r#","exclude_namespaces":["podman"],"default_namespace":"podman""#);
        let l = lookup(&c, &args("IgnoreUnknown=1;K8S_POD_NAME=my_container"), &Api::new(&c)).unwrap();
        assert_eq!(l, Lookup::Pass(Pass::ExcludedNamespace));
    }

    #[test]
    fn a_kubernetes_pod_without_annotations_or_kubeconfig_fails_unless_told_to_pass() {
        let c = conf("");
        let e = lookup(&c, &args("K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0"), &Api::new(&c)).unwrap_err();
        assert_eq!(e.class(), Class::Config);
        let msg = crate::text::chain(&e);
        for want in ["pod shop/web-0", "io.kubernetes.cri.pod-annotations", "kubeconfig", "unclassified_pods"] {
            assert!(msg.contains(want), "{want:?} not in {msg}");
        }
        let c = conf(r#","unclassified_pods":"pass""#);
        let l = lookup(&c, &args("K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0"), &Api::new(&c)).unwrap();
        assert_eq!(l, Lookup::Pass(Pass::Unclassified));
    }

    #[test]
    fn calls_that_are_not_about_a_kubernetes_pod_pass() {
        let c = conf("");
        // No pod at all.
        let l = lookup(&c, &args(""), &Api::new(&c)).unwrap();
        assert_eq!(l, Lookup::Pass(Pass::NotAKubernetesPod));
        // podman: a container name and no namespace, and no kubeconfig to look it up with.
        let l = lookup(&c, &args("IgnoreUnknown=1;K8S_POD_NAME=web"), &Api::new(&c)).unwrap();
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

//! Mesh dialects: which mesh, if any, owns a pod, and what redirect its configuration asks for.
//!
//! Each dialect reads exactly the annotations its mesh's webhook writes (see `docs/meshes.md`) and
//! answers `None` (not ours: pass through, touch nothing) or a validated redirect. The dialects
//! are private to this module in what they build: every [`Redirect`] leaves `core::mesh` through
//! one of its functions — [`classify_pod`] (and [`classify`]) for a pod's annotations, [`nomad`]
//! for Nomad's `CNI_ARGS`, [`consul_host`] and [`kuma_host`] for the host command — and each of
//! them holds it to the rule budget (`within_budget`, the one place rules are counted), so no
//! configuration, from whatever source, becomes more than [`limits::MAX_RULES_PER_FAMILY`] rules
//! per family. (A `Redirect` built by hand, as the golden tests do, is not a configuration.)

pub mod consul;
pub mod kuma;

use std::collections::BTreeMap;

use thiserror::Error;

use crate::core::limits::{self, TooLong, TooManyRules};
use crate::core::redirect::{Redirect, ValueError};
use crate::core::rules;
use crate::text::Quoted;

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

/// The pod asks for a redirect that cannot be built: which mesh, which annotation, and why.
#[derive(Debug, Error)]
#[error("{mesh} pod: annotation {annotation}: {problem}")]
pub struct AnnotationError {
    pub mesh: &'static str,
    /// The annotation to fix (or, for a whole configuration, the family of annotations).
    pub annotation: &'static str,
    /// Boxed: an error path is rare, and a small `Result` keeps the common one cheap.
    #[source]
    pub problem: Box<Problem>,
}

/// Why an annotation cannot become a redirect. Messages are one line; values from the pod are
/// quoted escaped and shortened.
#[derive(Debug, Error)]
pub enum Problem {
    /// A value that does not parse into its type, or a list over its limit.
    #[error(transparent)]
    Value(#[from] ValueError),
    #[error(transparent)]
    TooLong(#[from] TooLong),
    #[error(transparent)]
    TooManyRules(#[from] TooManyRules),
    /// Consul's configuration (the webhook's JSON, or the one rebuilt from the individual
    /// annotations) taken as a whole.
    #[error(transparent)]
    Consul(#[from] consul::SettingsError),
    /// Kuma's transparent-proxy configuration YAML.
    #[error(transparent)]
    Kuma(#[from] kuma::TproxyConfigError),
    /// A word outside the closed set the annotation takes (`allowed` reads "true or false", "one
    /// of dualstack, ipv4", …).
    #[error("{value} is not {allowed}")]
    NotOneOf { value: Quoted, allowed: &'static str },
    /// One entry of Kuma's per-knob `[proto:][ports:]uids` list.
    #[error("entry {0}")]
    UidPorts(#[source] kuma::UidPortError),
    /// The pod carries both meshes' injection annotations.
    #[error(
        "the pod is injected by both meshes ({} and {} are set too); a pod can be in one mesh only: \
         disable the injection of the other",
        consul::INJECT_STATUS,
        consul::TPROXY_STATUS
    )]
    TwoMeshes,
}

/// What a dialect read from a pod: its redirect, and the annotation its configuration as a whole
/// came from (what a refusal of the whole, such as the rule budget's, names).
#[derive(Debug)]
struct Configured<R> {
    redirect: R,
    annotation: &'static str,
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
            problem: Box::new(Problem::TwoMeshes),
        });
    }
    if let Some(c) = consul::redirect(annotations, net)? {
        return admit(c.annotation, Redirect::Consul(c.redirect)).map(Some);
    }
    match kuma::redirect(annotations, containers, net)? {
        Some(k) => admit(k.annotation, Redirect::Kuma(k.redirect)).map(Some),
        None => Ok(None),
    }
}

/// Nomad's path: Consul's redirect JSON straight from `CNI_ARGS` (Nomad does not do dual-stack).
pub fn nomad(json: &str, net: PodNetwork) -> Result<Redirect, AnnotationError> {
    admit(consul::NOMAD_CNI_ARG, Redirect::Consul(consul::from_json(json, net)?))
}

/// The host command's Consul redirect, from its flags or a `--consul-config` file: the settings
/// checked together (`names` says how the errors spell them), then the rule budget.
pub fn consul_host(
    settings: consul::Settings,
    names: &consul::Spelling,
    net: PodNetwork,
) -> Result<Redirect, consul::SettingsError> {
    Ok(within_budget(Redirect::Consul(settings.validate(net, names)?))?)
}

/// The host command's Kuma redirect: Kuma's configuration YAML (`--kuma-config`), `flags` applied
/// over it, validated as a pod's, then the rule budget.
pub fn kuma_host(
    yaml: Option<&str>,
    flags: &kuma::HostFlags,
    net: PodNetwork,
) -> Result<Redirect, kuma::TproxyConfigError> {
    Ok(within_budget(Redirect::Kuma(kuma::host_redirect(yaml, flags, net)?))?)
}

/// A pod's redirect through the rule budget; a refusal names `annotation`.
fn admit(annotation: &'static str, redirect: Redirect) -> Result<Redirect, AnnotationError> {
    let mesh = redirect.mesh();
    within_budget(redirect).map_err(|e| AnnotationError { mesh, annotation, problem: Box::new(e.into()) })
}

/// The rule budget, the one place it is checked: refuses a redirect whose busiest family would
/// get more than [`limits::MAX_RULES_PER_FAMILY`] rules, counting the IPv6 pass even when it is not
/// on yet (Kuma turns it on later when the namespace has IPv6).
fn within_budget(redirect: Redirect) -> Result<Redirect, TooManyRules> {
    limits::rules_per_family(rules::most_rules_per_family(&redirect))?;
    Ok(redirect)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::limits::MAX_LIST_ENTRIES;

    fn annotations(pairs: &[(&str, &str)]) -> Annotations {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// `n` comma-separated items made by `item`.
    fn list(n: usize, item: impl Fn(usize) -> String) -> Vec<String> {
        (0..n).map(item).collect()
    }

    fn over_budget(e: &AnnotationError, annotation: &str) {
        assert!(matches!(*e.problem, Problem::TooManyRules(_)), "{e}");
        assert_eq!(e.annotation, annotation, "{e}");
        assert!(e.to_string().contains("more than the limit of 4096"), "{e}");
    }

    /// Consul's four lists, each full: more rules than one family may get (4 107).
    fn consul_lists() -> [Vec<String>; 4] {
        [
            list(MAX_LIST_ENTRIES, |i| (i + 1).to_string()),
            list(MAX_LIST_ENTRIES, |i| (i + 1).to_string()),
            list(MAX_LIST_ENTRIES, |i| format!("10.{}.{}.0/24", i / 256, i % 256)),
            list(MAX_LIST_ENTRIES, |i| (i + 1).to_string()),
        ]
    }

    fn consul_json() -> String {
        let [inbound, outbound, cidrs, uids] = consul_lists();
        serde_json::json!({
            "ProxyUserID": "5995", "ProxyInboundPort": 20000, "ExcludeInboundPorts": inbound,
            "ExcludeOutboundPorts": outbound, "ExcludeOutboundCIDRs": cidrs, "ExcludeUIDs": uids,
        })
        .to_string()
    }

    /// Kuma's YAML with full lists: each per-UID entry is a rule per protocol.
    fn kuma_yaml() -> String {
        let ports = list(MAX_LIST_ENTRIES, |i| (i + 1).to_string()).join(", ");
        let uids = list(MAX_LIST_ENTRIES, |i| format!("\"{}\"", i + 1)).join(", ");
        format!(
            "redirect:\n  inbound: {{excludePorts: [{ports}]}}\n  outbound: {{excludePorts: [{ports}], \
             excludePortsForUIDs: [{uids}]}}\ncniMode: true\n"
        )
    }

    #[test]
    fn every_pod_path_is_held_to_the_rule_budget_naming_what_to_shorten() {
        let consul_pod = |extra: &[(&str, &str)]| {
            let mut a = annotations(&[(consul::INJECT_STATUS, "injected"), (consul::TPROXY_STATUS, "enabled")]);
            a.extend(annotations(extra));
            a
        };
        let json = consul_json();
        let e = classify(&consul_pod(&[(consul::REDIRECT_CONFIG, &json)]), PodNetwork::default()).unwrap_err();
        over_budget(&e, consul::REDIRECT_CONFIG);

        let [inbound, outbound, cidrs, mut uids] = consul_lists();
        uids.pop(); // The webhook's default UID, 5996, is added to the individual annotations' list.
        let [inbound, outbound, cidrs, uids] = [inbound, outbound, cidrs, uids].map(|l| l.join(","));
        let individual = consul_pod(&[
            (consul::EXCLUDE_INBOUND_PORTS, &inbound),
            (consul::EXCLUDE_OUTBOUND_PORTS, &outbound),
            (consul::EXCLUDE_OUTBOUND_CIDRS, &cidrs),
            (consul::EXCLUDE_UIDS, &uids),
        ]);
        let e = classify(&individual, PodNetwork::default()).unwrap_err();
        over_budget(&e, "consul.hashicorp.com/transparent-proxy-exclude-*");

        over_budget(&nomad(&json, PodNetwork::default()).unwrap_err(), consul::NOMAD_CNI_ARG);

        let yaml = kuma_yaml();
        let kuma_pod = annotations(&[(kuma::SIDECAR_INJECTED, "true"), (kuma::TPROXY_CONFIG, &yaml)]);
        over_budget(&classify(&kuma_pod, PodNetwork::default()).unwrap_err(), kuma::TPROXY_CONFIG);
        let containers = PodContainers { containers: vec![kuma::SIDECAR_CONTAINER.into()], init_containers: vec![] };
        let e = classify_pod(&kuma_pod, Some(&containers), PodNetwork::default()).unwrap_err();
        over_budget(&e, kuma::TPROXY_CONFIG);

        let ports = list(MAX_LIST_ENTRIES, |i| (i + 1).to_string()).join(",");
        let per_uid = list(MAX_LIST_ENTRIES, |i| (i + 1).to_string()).join(";");
        let legacy = annotations(&[
            (kuma::SIDECAR_INJECTED, "true"),
            (kuma::CNCF_NETWORKS, kuma::KUMA_CNI_NETWORK),
            (kuma::EXCLUDE_INBOUND_PORTS, &ports),
            (kuma::EXCLUDE_OUTBOUND_PORTS, &ports),
            (kuma::EXCLUDE_OUTBOUND_PORTS_FOR_UIDS, &per_uid),
        ]);
        over_budget(&classify(&legacy, PodNetwork::default()).unwrap_err(), "traffic.kuma.io/exclude-*");
    }

    #[test]
    fn the_host_commands_constructors_are_held_to_the_rule_budget_too() {
        let settings = consul::parse_config(&consul_json()).unwrap();
        let e = consul_host(settings, &consul::Spelling::JSON, PodNetwork::default()).unwrap_err();
        assert!(matches!(e, consul::SettingsError::TooManyRules(_)), "{e}");

        let e = kuma_host(Some(&kuma_yaml()), &kuma::HostFlags::default(), PodNetwork::default()).unwrap_err();
        assert!(matches!(e, kuma::TproxyConfigError::TooManyRules(_)), "{e}");
        // The same budget whether the lists come from the file or from flags.
        let flags = kuma::HostFlags {
            exclude_inbound_ports: Some((1..=1024).map(|p| crate::core::redirect::Port::new(p).unwrap()).collect()),
            exclude_outbound_ports: Some((1..=1024).map(|p| crate::core::redirect::Port::new(p).unwrap()).collect()),
            exclude_outbound_ips: Some(
                list(MAX_LIST_ENTRIES, |i| format!("10.{}.{}.0/24", i / 256, i % 256))
                    .iter()
                    .map(|c| c.parse().unwrap())
                    .collect(),
            ),
            exclude_inbound_ips: Some(
                list(MAX_LIST_ENTRIES, |i| format!("10.{}.{}.0/24", i / 256, i % 256))
                    .iter()
                    .map(|c| c.parse().unwrap())
                    .collect(),
            ),
            ..kuma::HostFlags::default()
        };
        let e = kuma_host(None, &flags, PodNetwork::default()).unwrap_err();
        assert!(matches!(e, kuma::TproxyConfigError::TooManyRules(_)), "{e}");
    }

    #[test]
    fn a_pod_injected_by_both_meshes_is_refused() {
        let a = annotations(&[
            (consul::INJECT_STATUS, "injected"),
            (consul::TPROXY_STATUS, "enabled"),
            (kuma::SIDECAR_INJECTED, "true"),
        ]);
        let e = classify(&a, PodNetwork::default()).unwrap_err();
        assert!(matches!(*e.problem, Problem::TwoMeshes), "{e}");
        assert!(e.to_string().starts_with("consul and kuma pod: annotation kuma.io/sidecar-injected: "), "{e}");
    }
}

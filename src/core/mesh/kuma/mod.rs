//! The Kuma (and Kong Mesh) dialect: the webhook's annotations → [`KumaRedirect`].
//!
//! **Is the pod ours?** `ownership.rs`: `kuma.io/sidecar-injected` is `"true"`, the pod has a
//! `kuma-sidecar` and no `kuma-init` container (or, from annotations alone, the webhook says it ran
//! in CNI mode).
//!
//! **Configuration.** Current webhooks write `traffic.kuma.io/transparent-proxy-config`: YAML
//! merged over Kuma's defaults, unknown keys ignored (`config.rs`). Webhooks up to v2.14 write one
//! annotation per knob instead (`legacy.rs`). Both become the same [`KumaRedirect`], so a pod gets
//! the same rules whichever form its webhook wrote. On a host, `kumactl install
//! transparent-proxy`'s flags are the same YAML keys (`host.rs`). The `[proto:][ports:]uids`
//! exclusion entry both forms share is parsed in `uid_ports.rs`. See `docs/meshes.md` for every
//! key, its default, and where we differ from Kuma's own builder.

mod config;
mod host;
mod legacy;
mod ownership;
mod uid_ports;

pub use config::TproxyConfigError;
pub use host::HostFlags;
pub(super) use host::host_redirect;
pub use uid_ports::{UidPortError, parse_uid_port_exclusion};

use self::legacy::from_legacy_annotations;
use self::ownership::{names_kuma_cni, owns};
use super::{AnnotationError, Annotations, Configured, PodContainers, PodNetwork, Problem};
use crate::core::limits;
use crate::core::redirect::{Cidrs, Families, KumaRedirect, Port, ValueError, parse_cidr, split_list};

const MESH: &str = "kuma";

pub const SIDECAR_INJECTED: &str = "kuma.io/sidecar-injected";
pub const TPROXY_CONFIG: &str = "traffic.kuma.io/transparent-proxy-config";
/// Multus' network list; Kuma's webhook names `kuma-cni` there when it runs in CNI mode.
pub const CNCF_NETWORKS: &str = "k8s.v1.cni.cncf.io/networks";
pub const KUMA_CNI_NETWORK: &str = "kuma-cni";
pub const SIDECAR_CONTAINER: &str = "kuma-sidecar";
pub const INIT_CONTAINER: &str = "kuma-init";

// The per-knob annotations of webhooks up to v2.14.
pub const INBOUND_PORT: &str = "kuma.io/transparent-proxying-inbound-port";
pub const OUTBOUND_PORT: &str = "kuma.io/transparent-proxying-outbound-port";
pub const SIDECAR_UID: &str = "kuma.io/sidecar-uid";
pub const BUILTIN_DNS: &str = "kuma.io/builtin-dns";
pub const BUILTIN_DNS_PORT: &str = "kuma.io/builtin-dns-port";
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.kuma.io/exclude-inbound-ports";
pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.kuma.io/exclude-outbound-ports";
pub const EXCLUDE_INBOUND_IPS: &str = "traffic.kuma.io/exclude-inbound-ips";
pub const EXCLUDE_OUTBOUND_IPS: &str = "traffic.kuma.io/exclude-outbound-ips";
pub const EXCLUDE_OUTBOUND_PORTS_FOR_UIDS: &str = "traffic.kuma.io/exclude-outbound-ports-for-uids";
pub const APPLICATION_PROBE_PROXY_PORT: &str = "kuma.io/application-probe-proxy-port";
pub const IP_FAMILY_MODE: &str = "kuma.io/transparent-proxying-ip-family-mode";
pub const GATEWAY: &str = "kuma.io/gateway";
pub const DROP_INVALID_PACKETS: &str = "traffic.kuma.io/drop-invalid-packets";
pub const IPTABLES_LOGS: &str = "traffic.kuma.io/iptables-logs";

/// What an error about the per-knob annotations taken together names (the rule budget).
pub(super) const LEGACY_EXCLUSIONS: &str = "traffic.kuma.io/exclude-*";

/// Every annotation this dialect reads (each is held to [`crate::core::limits::MAX_ANNOTATION_BYTES`]).
const READ: [&str; 18] = [
    SIDECAR_INJECTED,
    TPROXY_CONFIG,
    CNCF_NETWORKS,
    INBOUND_PORT,
    OUTBOUND_PORT,
    SIDECAR_UID,
    BUILTIN_DNS,
    BUILTIN_DNS_PORT,
    EXCLUDE_INBOUND_PORTS,
    EXCLUDE_OUTBOUND_PORTS,
    EXCLUDE_INBOUND_IPS,
    EXCLUDE_OUTBOUND_IPS,
    EXCLUDE_OUTBOUND_PORTS_FOR_UIDS,
    APPLICATION_PROBE_PROXY_PORT,
    IP_FAMILY_MODE,
    GATEWAY,
    DROP_INVALID_PACKETS,
    IPTABLES_LOGS,
];

/// Kuma's defaults (`DefaultConfig()` and kuma-cni's annotation defaults).
pub const DEFAULT_PROXY_UID: u32 = 5678;
pub const DEFAULT_INBOUND_PORT: u16 = 15006;
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
pub const DEFAULT_DNS_PORT: u16 = 15053;
/// Envoy's admin port, excluded both ways by kuma-cni when the annotations say nothing.
pub const DEFAULT_EXCLUDED_PORT: u16 = 9901;
/// kuma-cni's application probe proxy port when `kuma.io/application-probe-proxy-port` is absent:
/// `defaultAppProbeProxyPort` in kuma's `app/cni/pkg/cni/annotations_linux.go`, 9001 in every
/// release from 2.9 to 2.14.3 (it was 9000 only on master before 2.9, for three weeks, while
/// virtual probes still held 9000).
pub const DEFAULT_PROBE_PROXY_PORT: u16 = 9001;
pub const DEFAULT_LOG_LEVEL: u8 = 7;

pub(super) fn port_const(n: u16) -> Port {
    Port::new(n).expect("defaults are non-zero")
}

/// The pod's Kuma redirect, or `None` when the pod is not a Kuma pod whose rules are ours. The
/// rule budget is checked by the caller, `core::mesh::classify_pod`, which names the annotation
/// this returns with the redirect.
pub(super) fn redirect(
    a: &Annotations,
    containers: Option<&PodContainers>,
    net: PodNetwork,
) -> Result<Option<Configured<KumaRedirect>>, AnnotationError> {
    if a.get(SIDECAR_INJECTED).map(String::as_str) != Some("true") {
        return Ok(None);
    }
    for key in READ {
        if let Some(v) = a.get(key) {
            limits::annotation_size(v).map_err(|e| err(key, e))?;
        }
    }
    let yaml_err = |e: TproxyConfigError| err(TPROXY_CONFIG, e);
    match a.get(TPROXY_CONFIG).filter(|v| !v.trim().is_empty()) {
        Some(yaml) => {
            // The YAML's cniMode is needed only when neither the pod spec nor Multus' list tells
            // whose pod it is: a kuma-init pod is then passed through without reading its YAML.
            let settled = containers.is_some() || names_kuma_cni(a.get(CNCF_NETWORKS));
            if settled && !owns(a, containers, None) {
                return Ok(None);
            }
            let config = config::parse_yaml(yaml).map_err(yaml_err)?;
            if !settled && !owns(a, containers, config.cni_mode) {
                return Ok(None);
            }
            let redirect = config::from_config(config, net).map_err(yaml_err)?;
            Ok(Some(Configured { redirect, annotation: TPROXY_CONFIG }))
        }
        None if owns(a, containers, None) => {
            Ok(Some(Configured { redirect: from_legacy_annotations(a, net)?, annotation: LEGACY_EXCLUSIONS }))
        }
        None => Ok(None),
    }
}

/// Decides the families: IPv6 in dual-stack mode when the pod has it (the caller may also find it
/// in the namespace later, see [`crate::core::redirect::Redirect::ipv6_follows_netns`]).
pub(super) fn finish(mut k: KumaRedirect, net: PodNetwork) -> KumaRedirect {
    k.families = Families { ipv6: k.dual_stack && net.has_ipv6 };
    if !k.dual_stack && net.has_ipv6 {
        log::warn!("kuma pod in ipFamilyMode ipv4 has an IPv6 address: its IPv6 traffic is not redirected");
    }
    k
}

/// `dualstack` → true, `ipv4` → false, any case.
pub(super) fn ip_family_mode(m: &str) -> Option<bool> {
    match m.to_ascii_lowercase().as_str() {
        "dualstack" => Some(true),
        "ipv4" => Some(false),
        _ => None,
    }
}

/// IPs or CIDRs, each item possibly a comma-separated list (Kuma splits them too).
pub(super) fn cidrs<'a>(
    items: impl Iterator<Item = &'a (impl AsRef<str> + 'a + ?Sized)>,
    what: &'static str,
) -> Result<Cidrs, ValueError> {
    let mut out = Cidrs::default();
    let mut entries = 0;
    for item in items {
        for s in split_list(item.as_ref()) {
            out.push(parse_cidr(s, what)?);
            entries += 1;
        }
    }
    limits::list_entries(list_name(what), entries)?;
    Ok(out)
}

/// The list an entry's description (`"… entry"`) belongs to, for a limit's message.
pub(super) fn list_name(entry: &'static str) -> &'static str {
    match entry.strip_suffix(" entry") {
        Some(list) => list,
        None => "the list",
    }
}

/// A refusal naming one of this dialect's annotations.
pub(super) fn err(annotation: &'static str, problem: impl Into<Problem>) -> AnnotationError {
    AnnotationError { mesh: MESH, annotation, problem: Box::new(problem.into()) }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(crate) fn pod(pairs: &[(&str, &str)]) -> Annotations {
        let mut a: Annotations = [(SIDECAR_INJECTED, "true"), (CNCF_NETWORKS, KUMA_CNI_NETWORK)]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (k, v) in pairs {
            a.insert(k.to_string(), v.to_string());
        }
        a
    }

    pub(crate) fn ok(a: &Annotations) -> KumaRedirect {
        redirect(a, None, PodNetwork::default()).unwrap().expect("a kuma pod").redirect
    }

    pub(crate) fn refused(a: &Annotations) -> String {
        let e = redirect(a, None, PodNetwork::default()).unwrap_err().to_string();
        assert!(!e.contains('\n'), "one line: {e}");
        e
    }

    pub(crate) fn yaml(y: &str) -> Annotations {
        pod(&[(TPROXY_CONFIG, y)])
    }
}

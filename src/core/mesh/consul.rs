//! The Consul dialect: consul-k8s's webhook annotations → [`ConsulRedirect`].
//!
//! A pod is Consul's when it carries a non-empty `connect-inject-status` (or `mesh-inject-status`)
//! and a non-empty `transparent-proxy-status`. Its configuration is the JSON the webhook writes into
//! `redirect-traffic-config` (keys are Go field names); when that is missing (a webhook run without
//! its CNI flag) the same configuration is rebuilt from the individual annotations and the webhook's
//! defaults. Nomad hands the same JSON in `CNI_ARGS`, parsed by [`from_json`].
//!
//! Every source — the JSON, the individual annotations, Nomad's `CNI_ARGS`, and the host command's
//! flags or `--consul-config` file — first becomes [`Settings`] (each value parsed into its type),
//! and `Settings::validate` is the one place where the rules that tie values together are
//! checked and the [`ConsulRedirect`] is built. The rule budget is checked after it, for every
//! source, by `core::mesh` (see its module documentation).

use std::net::IpAddr;

use serde::Deserialize;
use thiserror::Error;

use super::{AnnotationError, Annotations, Configured, PodNetwork, Problem};
use crate::core::limits::{self, TooManyRules};
use crate::core::redirect::{
    Cidrs, ConsulDns, ConsulRedirect, Families, Port, PortRange, UidRange, ValueError, parse_cidr, parse_ip,
    parse_port_range, parse_uid, parse_uid_range, port_from_number, split_list,
};

const MESH: &str = "consul";

pub const INJECT_STATUS: &str = "consul.hashicorp.com/connect-inject-status";
pub const MESH_INJECT_STATUS: &str = "consul.hashicorp.com/mesh-inject-status";
pub const TPROXY_STATUS: &str = "consul.hashicorp.com/transparent-proxy-status";
pub const REDIRECT_CONFIG: &str = "consul.hashicorp.com/redirect-traffic-config";
pub const DUAL_STACK: &str = "consul.hashicorp.com/dual-stack";
pub const EXCLUDE_INBOUND_PORTS: &str = "consul.hashicorp.com/transparent-proxy-exclude-inbound-ports";
pub const EXCLUDE_OUTBOUND_PORTS: &str = "consul.hashicorp.com/transparent-proxy-exclude-outbound-ports";
pub const EXCLUDE_OUTBOUND_CIDRS: &str = "consul.hashicorp.com/transparent-proxy-exclude-outbound-cidrs";
pub const EXCLUDE_UIDS: &str = "consul.hashicorp.com/transparent-proxy-exclude-uids";
pub const CONSUL_DNS: &str = "consul.hashicorp.com/consul-dns";
pub const ENABLE_METRICS: &str = "consul.hashicorp.com/enable-metrics";
pub const PROMETHEUS_SCRAPE_PORT: &str = "consul.hashicorp.com/prometheus-scrape-port";
pub const USE_PROXY_HEALTH_CHECK: &str = "consul.hashicorp.com/use-proxy-health-check";
/// Where Nomad's configuration comes from, for error messages.
pub const NOMAD_CNI_ARG: &str = "CNI_ARGS CONSUL_IPTABLES_CONFIG";

/// The webhook's defaults (consul-k8s constants).
pub const DEFAULT_PROXY_UID: u32 = 5995;
pub const DEFAULT_CONNECT_INIT_UID: u32 = 5996;
pub const DEFAULT_INBOUND_PORT: u16 = 20000;
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
pub const DEFAULT_DNS_PORT: u16 = 8600;
pub const DEFAULT_PROMETHEUS_PORT: u16 = 20200;
pub const PROXY_HEALTH_PORT: u16 = 21000;

/// Every annotation this dialect reads (each is held to [`crate::core::limits::MAX_ANNOTATION_BYTES`]).
const READ: [&str; 13] = [
    INJECT_STATUS,
    MESH_INJECT_STATUS,
    TPROXY_STATUS,
    REDIRECT_CONFIG,
    DUAL_STACK,
    EXCLUDE_INBOUND_PORTS,
    EXCLUDE_OUTBOUND_PORTS,
    EXCLUDE_OUTBOUND_CIDRS,
    EXCLUDE_UIDS,
    CONSUL_DNS,
    ENABLE_METRICS,
    PROMETHEUS_SCRAPE_PORT,
    USE_PROXY_HEALTH_CHECK,
];

/// What an error about the individual annotations taken together names (the rule budget).
const INDIVIDUAL_EXCLUSIONS: &str = "consul.hashicorp.com/transparent-proxy-exclude-*";

/// Is this pod in Consul's mesh with transparent proxy on?
pub fn owns(annotations: &Annotations) -> bool {
    let set = |k: &str| annotations.get(k).is_some_and(|v| !v.is_empty());
    (set(INJECT_STATUS) || set(MESH_INJECT_STATUS)) && set(TPROXY_STATUS)
}

/// The pod's Consul redirect, or `None` when the pod is not a Consul transparent-proxy pod. The
/// rule budget is checked by the caller, `core::mesh::classify_pod`, which names the annotation
/// this returns with the redirect.
pub(super) fn redirect(
    annotations: &Annotations,
    net: PodNetwork,
) -> Result<Option<Configured<ConsulRedirect>>, AnnotationError> {
    if !owns(annotations) {
        return Ok(None);
    }
    for key in READ {
        if let Some(v) = annotations.get(key) {
            limits::annotation_size(v).map_err(|e| err(key, e))?;
        }
    }
    let dual_stack = match annotations.get(DUAL_STACK).map(String::as_str) {
        None | Some("") => false,
        Some(v) if v.eq_ignore_ascii_case("true") => true,
        Some(v) if v.eq_ignore_ascii_case("false") => false,
        Some(v) => {
            return Err(err(
                DUAL_STACK,
                Problem::NotOneOf { value: crate::text::Quoted::new(v), allowed: "true or false" },
            ));
        }
    };
    let (settings, source) = match annotations.get(REDIRECT_CONFIG) {
        Some(json) => (parse_config(json), REDIRECT_CONFIG),
        None => (typed(from_individual_annotations(annotations, dual_stack)?), INDIVIDUAL_EXCLUSIONS),
    };
    let invalid = |e: SettingsError| err(source, e);
    let settings = Settings { dual_stack, ..settings.map_err(invalid)? };
    let redirect = settings.validate(net, &Spelling::JSON).map_err(invalid)?;
    Ok(Some(Configured { redirect, annotation: source }))
}

/// Nomad's path: the configuration JSON straight from `CNI_ARGS`. Nomad does not do dual-stack.
/// The rule budget is checked by the caller, `core::mesh::nomad`.
pub(super) fn from_json(json: &str, net: PodNetwork) -> Result<ConsulRedirect, AnnotationError> {
    limits::annotation_size(json).map_err(|e| err(NOMAD_CNI_ARG, e))?;
    parse_config(json).and_then(|s| s.validate(net, &Spelling::JSON)).map_err(|e| err(NOMAD_CNI_ARG, e))
}

/// Parses consul's redirect JSON (what the webhook writes, what Nomad passes, what
/// `consul connect redirect-traffic` is configured with) into typed settings, dual-stack off.
pub fn parse_config(json: &str) -> Result<Settings, SettingsError> {
    serde_json::from_str(json).map_err(SettingsError::Json).and_then(typed)
}

/// A Consul redirect whose values are each parsed into their type but not yet checked together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    /// The proxy's UID, whose own traffic is never redirected. Required.
    pub proxy_uid: Option<u32>,
    /// The proxy's inbound listener. Required.
    pub inbound_port: Option<Port>,
    /// The proxy's outbound listener; `None` means consul's default, 15001.
    pub outbound_port: Option<Port>,
    pub exclude_inbound_ports: Vec<PortRange>,
    pub exclude_outbound_ports: Vec<PortRange>,
    pub exclude_outbound_cidrs: Cidrs,
    pub exclude_uids: Vec<UidRange>,
    /// Where Consul DNS listens; with only an IP, all DNS goes to that IP on port 53.
    pub dns_ip: Option<IpAddr>,
    pub dns_port: Option<Port>,
    /// Consul's dual-stack mode: DNS on `::1`, an IPv6 pass always, no DNS rules in the IPv4 pass.
    pub dual_stack: bool,
}

/// What each setting is called where it was written, so that a refusal names what the user wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spelling {
    pub proxy_uid: &'static str,
    pub inbound_port: &'static str,
    pub dns_ip: &'static str,
    /// How dual-stack mode is switched on.
    pub dual_stack: &'static str,
}

impl Spelling {
    /// consul's JSON, with dual-stack mode from the pod's annotation.
    pub const JSON: Spelling = Spelling {
        proxy_uid: "ProxyUserID",
        inbound_port: "ProxyInboundPort",
        dns_ip: "ConsulDNSIP",
        dual_stack: DUAL_STACK,
    };
}

/// Why a Consul configuration cannot become a redirect. Messages are one line.
#[derive(Debug, Error)]
pub enum SettingsError {
    /// The decoder's message may quote the value it choked on: it is shortened, and not repeated
    /// as a cause.
    #[error("is not the redirect JSON: {}", crate::text::bounded(&.0.to_string(), limits::MAX_QUOTED_MESSAGE_BYTES))]
    Json(serde_json::Error),
    #[error(transparent)]
    Value(#[from] ValueError),
    #[error("{0} is required")]
    Required(&'static str),
    /// More rules than one family may get: only the host command's constructor
    /// (`core::mesh::consul_host`) gives this one; a pod's is a [`crate::core::mesh::Problem`].
    #[error(transparent)]
    TooManyRules(#[from] TooManyRules),
    #[error("{what} {ip} is IPv4 but dual-stack mode is on (expected an IPv6 address such as ::1)")]
    Ipv4DnsInDualStack { what: &'static str, ip: IpAddr },
    #[error("{what} {ip} is IPv6 but dual-stack mode is off ({switch} is not set)")]
    Ipv6DnsWithoutDualStack { what: &'static str, ip: IpAddr, switch: &'static str },
}

impl Settings {
    /// Checks the settings together and builds the redirect: the required values are there, the DNS
    /// address has the family the dual-stack mode expects, and the families follow the mode and
    /// the network (`net.has_ipv6` adds an IPv6 pass, without DNS rules, outside dual-stack mode).
    /// Outside `core::mesh`, go through `core::mesh::consul_host`, which checks the rule budget too.
    pub(super) fn validate(self, net: PodNetwork, names: &Spelling) -> Result<ConsulRedirect, SettingsError> {
        let proxy_uid = self.proxy_uid.ok_or(SettingsError::Required(names.proxy_uid))?;
        let inbound_port = self.inbound_port.ok_or(SettingsError::Required(names.inbound_port))?;
        let dual_stack = self.dual_stack;
        match self.dns_ip {
            Some(ip) if dual_stack && ip.is_ipv4() => {
                return Err(SettingsError::Ipv4DnsInDualStack { what: names.dns_ip, ip });
            }
            Some(ip) if !dual_stack && ip.is_ipv6() => {
                return Err(SettingsError::Ipv6DnsWithoutDualStack {
                    what: names.dns_ip,
                    ip,
                    switch: names.dual_stack,
                });
            }
            _ => {}
        }
        let dns = match (self.dns_ip, self.dns_port) {
            (ip, Some(port)) => Some(ConsulDns::Port { ip, port }),
            (Some(ip), None) => Some(ConsulDns::All { ip }),
            (None, None) => None,
        };
        Ok(ConsulRedirect {
            proxy_uid,
            inbound_port,
            outbound_port: self.outbound_port.unwrap_or(const { Port::new(DEFAULT_OUTBOUND_PORT).expect("non-zero") }),
            exclude_inbound_ports: self.exclude_inbound_ports,
            exclude_outbound_ports: self.exclude_outbound_ports,
            exclude_outbound_cidrs: self.exclude_outbound_cidrs,
            exclude_uids: self.exclude_uids,
            dns,
            dual_stack,
            families: Families { ipv6: dual_stack || net.has_ipv6 },
        })
    }
}

/// consul sdk's `iptables.Config`, as the webhook marshals it (Go field names, no tags).
#[derive(Debug, Default, Deserialize)]
struct Config {
    #[serde(rename = "ConsulDNSIP", default)]
    consul_dns_ip: String,
    #[serde(rename = "ConsulDNSPort", default)]
    consul_dns_port: i64,
    #[serde(rename = "ProxyUserID", default)]
    proxy_user_id: String,
    #[serde(rename = "ProxyInboundPort", default)]
    proxy_inbound_port: i64,
    #[serde(rename = "ProxyOutboundPort", default)]
    proxy_outbound_port: i64,
    #[serde(rename = "ExcludeInboundPorts", default)]
    exclude_inbound_ports: Option<Vec<String>>,
    #[serde(rename = "ExcludeOutboundPorts", default)]
    exclude_outbound_ports: Option<Vec<String>>,
    #[serde(rename = "ExcludeOutboundCIDRs", default)]
    exclude_outbound_cidrs: Option<Vec<String>>,
    #[serde(rename = "ExcludeUIDs", default)]
    exclude_uids: Option<Vec<String>>,
    /// The CNI's netns wins; accepted and ignored.
    #[serde(rename = "NetNS", default)]
    _net_ns: Option<serde_json::Value>,
    /// Always null in what the webhook writes; accepted and ignored.
    #[serde(rename = "IptablesProvider", default)]
    _iptables_provider: Option<serde_json::Value>,
}

/// Rebuilds what the webhook would have written, from the individual annotations. Each list is
/// checked here, under its own annotation's name, so an error names the annotation the pod really
/// has (the rebuilt configuration is checked again by [`typed`], which then cannot fail on it).
fn from_individual_annotations(a: &Annotations, dual_stack: bool) -> Result<Config, AnnotationError> {
    let list = |k: &'static str, check: fn(&str, &'static str) -> Result<(), ValueError>| {
        let entries: Vec<String> = a.get(k).map(|v| split_list(v).map(str::to_owned).collect()).unwrap_or_default();
        limits::list_entries("the list", entries.len()).map_err(|e| err(k, e))?;
        for e in &entries {
            check(e, "entry").map_err(|e| err(k, e))?;
        }
        Ok::<_, AnnotationError>(entries)
    };
    let port_range = |s: &str, what| parse_port_range(s, what).map(drop);
    let cidr = |s: &str, what| parse_cidr(s, what).map(drop);
    let uid_range = |s: &str, what| parse_uid_range(s, what).map(drop);
    let is_true = |k: &str| a.get(k).is_some_and(|v| v.eq_ignore_ascii_case("true"));

    let mut inbound = Vec::new();
    if is_true(ENABLE_METRICS) {
        let port = a.get(PROMETHEUS_SCRAPE_PORT).cloned().unwrap_or_else(|| DEFAULT_PROMETHEUS_PORT.to_string());
        parse_port_range(&port, "port").map_err(|e| err(PROMETHEUS_SCRAPE_PORT, e))?;
        inbound.push(port);
    }
    if is_true(USE_PROXY_HEALTH_CHECK) {
        inbound.push(PROXY_HEALTH_PORT.to_string());
    }
    inbound.extend(list(EXCLUDE_INBOUND_PORTS, port_range)?);
    let mut uids = vec![DEFAULT_CONNECT_INIT_UID.to_string()];
    uids.extend(list(EXCLUDE_UIDS, uid_range)?);
    let (dns_ip, dns_port) = if is_true(CONSUL_DNS) {
        (if dual_stack { "::1" } else { "127.0.0.1" }.to_owned(), i64::from(DEFAULT_DNS_PORT))
    } else {
        (String::new(), 0)
    };
    Ok(Config {
        consul_dns_ip: dns_ip,
        consul_dns_port: dns_port,
        proxy_user_id: DEFAULT_PROXY_UID.to_string(),
        proxy_inbound_port: i64::from(DEFAULT_INBOUND_PORT),
        proxy_outbound_port: i64::from(DEFAULT_OUTBOUND_PORT),
        exclude_inbound_ports: Some(inbound),
        exclude_outbound_ports: Some(list(EXCLUDE_OUTBOUND_PORTS, port_range)?),
        exclude_outbound_cidrs: Some(list(EXCLUDE_OUTBOUND_CIDRS, cidr)?),
        exclude_uids: Some(uids),
        ..Config::default()
    })
}

/// Parses each value of consul's JSON into its type. Zero and empty mean "not set", as in consul.
fn typed(c: Config) -> Result<Settings, SettingsError> {
    let entries = |l: Option<Vec<String>>, what| {
        let l = l.unwrap_or_default();
        limits::list_entries(what, l.len()).map(|()| l)
    };
    let ports = |l: Option<Vec<String>>, what, entry| {
        entries(l, what)?.iter().map(|p| parse_port_range(p, entry)).collect::<Result<Vec<_>, _>>()
    };
    let mut exclude_outbound_cidrs = Cidrs::default();
    for s in entries(c.exclude_outbound_cidrs, "ExcludeOutboundCIDRs")? {
        exclude_outbound_cidrs.push(parse_cidr(&s, "ExcludeOutboundCIDRs entry")?);
    }
    Ok(Settings {
        proxy_uid: match c.proxy_user_id.as_str() {
            "" => None,
            s => Some(parse_uid(s, "ProxyUserID")?),
        },
        inbound_port: optional_port(c.proxy_inbound_port, "ProxyInboundPort")?,
        outbound_port: optional_port(c.proxy_outbound_port, "ProxyOutboundPort")?,
        exclude_inbound_ports: ports(c.exclude_inbound_ports, "ExcludeInboundPorts", "ExcludeInboundPorts entry")?,
        exclude_outbound_ports: ports(c.exclude_outbound_ports, "ExcludeOutboundPorts", "ExcludeOutboundPorts entry")?,
        exclude_outbound_cidrs,
        exclude_uids: entries(c.exclude_uids, "ExcludeUIDs")?
            .iter()
            .map(|u| parse_uid_range(u, "ExcludeUIDs entry"))
            .collect::<Result<_, _>>()?,
        dns_ip: match c.consul_dns_ip.as_str() {
            "" => None,
            s => Some(parse_ip(s, "ConsulDNSIP")?),
        },
        dns_port: optional_port(c.consul_dns_port, "ConsulDNSPort")?,
        dual_stack: false,
    })
}

/// A port from a JSON number where 0 means "not set".
fn optional_port(n: i64, what: &'static str) -> Result<Option<Port>, ValueError> {
    match n {
        0 => Ok(None),
        n => number_port(n, what).map(Some),
    }
}

fn number_port(n: i64, what: &'static str) -> Result<Port, ValueError> {
    let text = n.to_string();
    u64::try_from(n)
        .map_err(|_| ValueError::OutOfRange { what, value: crate::text::Quoted::new(&text), range: "1-65535" })
        .and_then(|n| port_from_number(n, &text, what))
}

/// A refusal naming one of this dialect's annotations.
fn err(annotation: &'static str, problem: impl Into<Problem>) -> AnnotationError {
    AnnotationError { mesh: MESH, annotation, problem: Box::new(problem.into()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::redirect::Family;

    pub(crate) fn pod(pairs: &[(&str, &str)]) -> Annotations {
        let mut a: Annotations = [(INJECT_STATUS, "injected"), (TPROXY_STATUS, "enabled")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (k, v) in pairs {
            a.insert(k.to_string(), v.to_string());
        }
        a
    }

    const TYPICAL: &str = r#"{"ConsulDNSIP":"127.0.0.1","ConsulDNSPort":8600,"ProxyUserID":"5995","ProxyInboundPort":20000,"ProxyOutboundPort":15001,"ExcludeInboundPorts":null,"ExcludeOutboundPorts":null,"ExcludeOutboundCIDRs":null,"ExcludeUIDs":["5996"],"NetNS":"","IptablesProvider":null}"#;

    fn ok(a: &Annotations) -> ConsulRedirect {
        redirect(a, PodNetwork::default()).unwrap().unwrap().redirect
    }

    fn refused(a: &Annotations) -> String {
        redirect(a, PodNetwork::default()).unwrap_err().to_string()
    }

    #[test]
    fn only_injected_tproxy_pods_are_ours() {
        let mut a = Annotations::new();
        assert!(!owns(&a));
        a.insert(INJECT_STATUS.into(), "injected".into());
        assert!(!owns(&a), "transparent proxy not on");
        a.insert(TPROXY_STATUS.into(), "".into());
        assert!(!owns(&a), "empty status is off");
        a.insert(TPROXY_STATUS.into(), "enabled".into());
        assert!(owns(&a));
        a.remove(INJECT_STATUS);
        a.insert(MESH_INJECT_STATUS.into(), "injected".into());
        assert!(owns(&a), "mesh v2 status counts too");
        assert!(matches!(redirect(&Annotations::new(), PodNetwork::default()), Ok(None)));
    }

    #[test]
    fn reads_the_typical_webhook_json() {
        let r = ok(&pod(&[(REDIRECT_CONFIG, TYPICAL)]));
        assert_eq!(r.proxy_uid, 5995);
        assert_eq!(r.inbound_port.get(), 20000);
        assert_eq!(r.outbound_port.get(), 15001);
        assert_eq!(r.exclude_uids.iter().map(ToString::to_string).collect::<Vec<_>>(), ["5996"]);
        assert_eq!(
            r.dns,
            Some(ConsulDns::Port { ip: Some("127.0.0.1".parse().unwrap()), port: Port::new(8600).unwrap() })
        );
        assert_eq!(r.families.iter().collect::<Vec<_>>(), [Family::V4]);
    }

    #[test]
    fn outbound_port_zero_means_15001() {
        let r = ok(&pod(&[(REDIRECT_CONFIG, r#"{"ProxyUserID":"1","ProxyInboundPort":1,"ProxyOutboundPort":0}"#)]));
        assert_eq!(r.outbound_port.get(), 15001);
        assert_eq!(r.dns, None);
    }

    #[test]
    fn dns_ip_alone_sends_all_dns_there() {
        let r =
            ok(&pod(&[(REDIRECT_CONFIG, r#"{"ProxyUserID":"1","ProxyInboundPort":1,"ConsulDNSIP":"10.96.0.10"}"#)]));
        assert_eq!(r.dns, Some(ConsulDns::All { ip: "10.96.0.10".parse().unwrap() }));
    }

    #[test]
    fn falls_back_to_individual_annotations_with_webhook_defaults() {
        let r = ok(&pod(&[
            (EXCLUDE_INBOUND_PORTS, "8080, 9090"),
            (EXCLUDE_OUTBOUND_PORTS, "5432"),
            (EXCLUDE_OUTBOUND_CIDRS, "10.0.0.0/8,2001:db8::/32"),
            (EXCLUDE_UIDS, "42"),
            (CONSUL_DNS, "true"),
            (ENABLE_METRICS, "true"),
            (USE_PROXY_HEALTH_CHECK, "true"),
        ]));
        assert_eq!(r.proxy_uid, 5995);
        assert_eq!(r.inbound_port.get(), 20000);
        assert_eq!(
            r.exclude_inbound_ports.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["20200", "21000", "8080", "9090"]
        );
        assert_eq!(r.exclude_uids.iter().map(ToString::to_string).collect::<Vec<_>>(), ["5996", "42"]);
        assert_eq!(r.exclude_outbound_cidrs.v4.len(), 1);
        assert_eq!(r.exclude_outbound_cidrs.v6.len(), 1);
        assert!(matches!(r.dns, Some(ConsulDns::Port { port, .. }) if port.get() == 8600));
    }

    #[test]
    fn dual_stack_turns_on_ipv6_and_wants_an_ipv6_dns_ip() {
        let json = r#"{"ProxyUserID":"5995","ProxyInboundPort":20000,"ConsulDNSIP":"::1","ConsulDNSPort":8600}"#;
        let r = ok(&pod(&[(REDIRECT_CONFIG, json), (DUAL_STACK, "true")]));
        assert!(r.dual_stack && r.families.ipv6);
        let e = refused(&pod(&[(REDIRECT_CONFIG, TYPICAL), (DUAL_STACK, "true")]));
        assert!(e.contains("ConsulDNSIP 127.0.0.1 is IPv4 but dual-stack mode is on"), "{e}");
        let e = refused(&pod(&[(REDIRECT_CONFIG, json)]));
        assert!(
            e.contains(
                "ConsulDNSIP ::1 is IPv6 but dual-stack mode is off (consul.hashicorp.com/dual-stack is not set)"
            ),
            "{e}"
        );
        assert!(refused(&pod(&[(REDIRECT_CONFIG, json), (DUAL_STACK, "yes")])).contains("not true or false"));
    }

    #[test]
    fn a_pod_with_ipv6_gets_an_ipv6_pass_even_without_dual_stack() {
        let r = redirect(&pod(&[(REDIRECT_CONFIG, TYPICAL)]), PodNetwork { has_ipv6: true }).unwrap().unwrap().redirect;
        assert!(r.families.ipv6 && !r.dual_stack);
    }

    #[test]
    fn refuses_what_upstream_refuses_and_what_could_inject() {
        let cases = [
            (r#"{"ProxyInboundPort":20000}"#, "ProxyUserID is required"),
            (r#"{"ProxyUserID":"5995"}"#, "ProxyInboundPort is required"),
            (r#"{"ProxyUserID":"5995","ProxyInboundPort":70000}"#, "out of range"),
            (r#"{"ProxyUserID":"5995","ProxyInboundPort":-1}"#, "out of range"),
            (r#"{"ProxyUserID":"root","ProxyInboundPort":1}"#, "not a number"),
            (
                r#"{"ProxyUserID":"5995","ProxyInboundPort":1,"ConsulDNSIP":"dns.local","ConsulDNSPort":53}"#,
                "not an IP",
            ),
            (
                r#"{"ProxyUserID":"5995","ProxyInboundPort":1,"ExcludeOutboundCIDRs":["10.0.0.0/8 -j ACCEPT"]}"#,
                "not a CIDR",
            ),
            (
                r#"{"ProxyUserID":"5995","ProxyInboundPort":1,"ExcludeInboundPorts":["22\n-A OUTPUT -j ACCEPT"]}"#,
                "not a number",
            ),
            (r#"{"ProxyUserID":"5995","ProxyInboundPort":1,"ExcludeUIDs":[5996]}"#, "not the redirect JSON"),
            (r#"{"ProxyUserID":"5995","ProxyUserID":"1","ProxyInboundPort":1}"#, "duplicate field"),
            ("not json", "not the redirect JSON"),
        ];
        for (json, want) in cases {
            let e = refused(&pod(&[(REDIRECT_CONFIG, json)]));
            assert!(e.contains(want), "{json}: {e}");
            assert!(e.starts_with("consul pod: annotation consul.hashicorp.com/redirect-traffic-config: "), "{e}");
            assert!(!e.contains('\n'), "messages are one line: {e}");
        }
    }

    #[test]
    fn refuses_bad_individual_annotations() {
        let e = refused(&pod(&[(EXCLUDE_OUTBOUND_PORTS, "65536")]));
        assert!(e.contains("out of range"), "{e}");
        let e = refused(&pod(&[(EXCLUDE_UIDS, "-1")]));
        assert!(e.contains("not a number"), "{e}");
    }

    #[test]
    fn settings_from_any_source_are_checked_together_and_named_as_written() {
        const FLAGS: Spelling = Spelling {
            proxy_uid: "--proxy-uid",
            inbound_port: "--proxy-inbound-port",
            dns_ip: "--consul-dns-ip",
            dual_stack: "--dual-stack",
        };
        let port = |n| Port::new(n);
        let base = Settings { proxy_uid: Some(5995), inbound_port: port(20000), ..Settings::default() };
        let r = base.clone().validate(PodNetwork::default(), &FLAGS).unwrap();
        assert_eq!((r.outbound_port.get(), r.dns, r.families.ipv6), (15001, None, false));

        let e = Settings { proxy_uid: None, ..base.clone() }.validate(PodNetwork::default(), &FLAGS).unwrap_err();
        assert_eq!(e.to_string(), "--proxy-uid is required");
        let v6 = Settings { dns_ip: Some("::1".parse().unwrap()), ..base.clone() };
        let e = v6.clone().validate(PodNetwork::default(), &FLAGS).unwrap_err();
        assert_eq!(e.to_string(), "--consul-dns-ip ::1 is IPv6 but dual-stack mode is off (--dual-stack is not set)");
        let r = Settings { dual_stack: true, ..v6 }.validate(PodNetwork::default(), &FLAGS).unwrap();
        assert_eq!(r.dns, Some(ConsulDns::All { ip: "::1".parse().unwrap() }));
        assert!(r.families.ipv6, "dual-stack mode always has an IPv6 pass");
    }

    #[test]
    fn nomad_json_comes_without_annotations() {
        let r = from_json(TYPICAL, PodNetwork::default()).unwrap();
        assert_eq!(r.proxy_uid, 5995);
        let e = from_json("{}", PodNetwork::default()).unwrap_err();
        assert_eq!(e.annotation, NOMAD_CNI_ARG);
    }
}

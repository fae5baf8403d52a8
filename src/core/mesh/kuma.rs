//! The Kuma (and Kong Mesh) dialect: the webhook's annotations → [`KumaRedirect`].
//!
//! **Is the pod ours?** `kuma.io/sidecar-injected` is `"true"`, and, when the pod spec is known
//! (the API path supplies [`PodContainers`]), a `kuma-sidecar` container or native-sidecar init
//! container exists and no `kuma-init` init container does (that pod installs its own rules).
//! When only annotations are known (the runtime path), `kuma-init` cannot be seen; the webhook
//! then tells us instead: it writes `cniMode: true` into the configuration YAML, and
//! `k8s.v1.cni.cncf.io/networks: kuma-cni`, exactly when it runs in CNI mode, that is when it does
//! **not** inject `kuma-init`. A pod with neither is left to its `kuma-init` container.
//!
//! **Configuration.** Current webhooks write `traffic.kuma.io/transparent-proxy-config`: YAML
//! merged over Kuma's defaults, unknown keys ignored. Webhooks up to v2.14 write one annotation
//! per knob instead ([`from_legacy_annotations`]). Both become the same [`KumaRedirect`], so a pod
//! gets the same rules whichever form its webhook wrote. See `docs/meshes.md` for every key, its
//! default, and where we differ from Kuma's own builder.

use serde::Deserialize;

use super::{AnnotationError, Annotations, PodContainers, PodNetwork};
use crate::core::redirect::{
    Cidrs, Families, KumaDns, KumaInbound, KumaOutbound, KumaRedirect, Port, PortRange, Transport, UidPortExclusion,
    ValueError, parse_cidr, parse_port, parse_port_range, parse_uid, parse_uid_range, port_from_number, split_list,
};
use crate::text::Quoted;

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
const LEGACY_EXCLUSIONS: &str = "traffic.kuma.io/exclude-*";

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
/// kuma-cni's application probe proxy port when the annotation is absent (older webhooks, which
/// served virtual probes on 9000).
pub const DEFAULT_PROBE_PROXY_PORT: u16 = 9000;
pub const DEFAULT_LOG_LEVEL: u8 = 7;

fn port_const(n: u16) -> Port {
    Port::new(n).expect("defaults are non-zero")
}

/// Is this pod Kuma's, with its transparent proxy left to the CNI? `config_cni_mode` is the YAML
/// configuration's `cniMode`, when the pod has the YAML annotation.
fn owns(a: &Annotations, containers: Option<&PodContainers>, config_cni_mode: Option<bool>) -> bool {
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
fn names_kuma_cni(networks: Option<&String>) -> bool {
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

/// The pod's Kuma redirect, or `None` when the pod is not a Kuma pod whose rules are ours.
pub fn redirect(
    a: &Annotations,
    containers: Option<&PodContainers>,
    net: PodNetwork,
) -> Result<Option<KumaRedirect>, AnnotationError> {
    if a.get(SIDECAR_INJECTED).map(String::as_str) != Some("true") {
        return Ok(None);
    }
    for key in READ {
        if let Some(v) = a.get(key) {
            crate::core::limits::annotation_size(v).map_err(|reason| err(key, reason))?;
        }
    }
    match a.get(TPROXY_CONFIG).filter(|v| !v.trim().is_empty()) {
        Some(yaml) => {
            // The YAML's cniMode is needed only when neither the pod spec nor Multus' list tells
            // whose pod it is: a kuma-init pod is then passed through without reading its YAML.
            let settled = containers.is_some() || names_kuma_cni(a.get(CNCF_NETWORKS));
            if settled && !owns(a, containers, None) {
                return Ok(None);
            }
            let config = parse_yaml(yaml)?;
            if !settled && !owns(a, containers, config.cni_mode) {
                return Ok(None);
            }
            from_config(config, net).map(Some)
        }
        None if owns(a, containers, None) => from_legacy_annotations(a, net).map(Some),
        None => Ok(None),
    }
}

/// `traffic.kuma.io/transparent-proxy-config`: the subset of Kuma's configuration that shapes the
/// rules. Every field is optional (absent means Kuma's default) and unknown keys are ignored, so
/// newer webhooks' additions do not break parsing.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct Config {
    #[serde(rename = "kumaDPUser")]
    kuma_dp_user: Option<Scalar>,
    ip_family_mode: Option<String>,
    redirect: RedirectConfig,
    drop_invalid_packets: Option<bool>,
    log: LogConfig,
    cni_mode: Option<bool>,
    ebpf: EbpfConfig,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RedirectConfig {
    inbound: FlowConfig,
    outbound: FlowConfig,
    dns: DnsConfig,
    vnet: VnetConfig,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct FlowConfig {
    enabled: Option<bool>,
    port: Option<u64>,
    exclude_ports: Option<PortList>,
    include_ports: Option<PortList>,
    #[serde(rename = "excludePortsForIPs")]
    exclude_ports_for_ips: Option<Vec<String>>,
    #[serde(rename = "excludePortsForUIDs")]
    exclude_ports_for_uids: Option<Vec<String>>,
    /// Kuma inserts its jump at the top of the built-in chain instead of appending it; in a pod's
    /// fresh namespace both are the same, so it is accepted and has no effect.
    #[allow(dead_code)]
    insert_redirect_instead_of_append: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct DnsConfig {
    enabled: Option<bool>,
    port: Option<u64>,
    capture_all: Option<bool>,
    skip_conntrack_zone_split: Option<bool>,
    /// A file in the pod's filesystem, which a CNI plugin cannot read (see `docs/meshes.md`).
    resolv_config_path: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct VnetConfig {
    networks: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct LogConfig {
    enabled: Option<bool>,
    level: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct EbpfConfig {
    enabled: Option<bool>,
}

/// A YAML scalar that Kuma reads as text: `5678` and `"5678"` are the same UID. Any scalar is
/// taken as its text (`-1`, `1.5`, `true` included) so that the value checks that follow refuse it
/// with a message naming the key and quoting the value; a list or a mapping is refused here.
#[derive(Debug)]
struct Scalar(String);

impl Scalar {
    fn text(&self) -> String {
        self.0.clone()
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl serde::de::Visitor<'_> for ScalarVisitor {
    type Value = Scalar;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a number or a string")
    }

    fn visit_u64<E>(self, n: u64) -> Result<Scalar, E> {
        Ok(Scalar(n.to_string()))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Scalar, E> {
        Ok(Scalar(n.to_string()))
    }

    fn visit_f64<E>(self, n: f64) -> Result<Scalar, E> {
        // `{:?}` keeps the decimal point, so `1e3` stays a non-integer and is refused as one.
        Ok(Scalar(format!("{n:?}")))
    }

    fn visit_bool<E>(self, b: bool) -> Result<Scalar, E> {
        Ok(Scalar(b.to_string()))
    }

    fn visit_str<E>(self, s: &str) -> Result<Scalar, E> {
        Ok(Scalar(s.to_owned()))
    }
}

/// Kuma's port lists: a YAML list of numbers or strings, or one string of comma-separated ports.
#[derive(Debug)]
enum PortList {
    List(Vec<Scalar>),
    One(Scalar),
}

impl<'de> Deserialize<'de> for PortList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = PortList;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of ports, or a string of comma-separated ports")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<PortList, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Scalar>()? {
                    items.push(item);
                }
                Ok(PortList::List(items))
            }

            fn visit_u64<E>(self, n: u64) -> Result<PortList, E> {
                Ok(PortList::One(Scalar(n.to_string())))
            }

            fn visit_i64<E>(self, n: i64) -> Result<PortList, E> {
                Ok(PortList::One(Scalar(n.to_string())))
            }

            fn visit_f64<E>(self, n: f64) -> Result<PortList, E> {
                Ok(PortList::One(Scalar(format!("{n:?}"))))
            }

            fn visit_bool<E>(self, b: bool) -> Result<PortList, E> {
                Ok(PortList::One(Scalar(b.to_string())))
            }

            fn visit_str<E>(self, s: &str) -> Result<PortList, E> {
                Ok(PortList::One(Scalar(s.to_owned())))
            }
        }
        d.deserialize_any(V)
    }
}

impl PortList {
    fn parse(&self, what: &'static str) -> Result<Vec<Port>, ValueError> {
        let items = match self {
            PortList::List(items) => items.iter().map(Scalar::text).collect(),
            PortList::One(s) => vec![s.text()],
        };
        let mut ports = Vec::new();
        for item in &items {
            for p in split_list(item) {
                ports.push(parse_port(p, what)?);
            }
        }
        crate::core::limits::list_entries(list_name(what), ports.len())?;
        Ok(ports)
    }
}

fn parse_yaml(yaml: &str) -> Result<Config, AnnotationError> {
    // An annotation is at most 256 KiB; our configuration is a few dozen nodes. The budget refuses
    // alias bombs and deep nesting long before they cost anything.
    let options = serde_saphyr::options! {
        with_snippet: false,
        budget: serde_saphyr::budget! {
            max_events: 20_000,
            max_aliases: 64,
            max_anchors: 64,
            max_depth: 32,
        },
    };
    serde_saphyr::from_str_with_options::<Option<Config>>(yaml, options).map(Option::unwrap_or_default).map_err(|e| {
        // The parser's advice on duplicate keys is for programmers: the fix is to remove one.
        let e = e.to_string().replace(", set DuplicateKeyPolicy in Options if acceptable", " (remove one)");
        let e = crate::text::bounded(&e, crate::core::limits::MAX_QUOTED_MESSAGE_BYTES);
        yaml_err(format!("is not Kuma's transparent proxy configuration: {e}"))
    })
}

/// What `kumactl install transparent-proxy`'s flags set, typed. A flag given overrides the
/// configuration file's value, as in kumactl; one not given leaves the file's value, or Kuma's
/// default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFlags {
    /// `--kuma-dp-user`, already resolved to a UID.
    pub kuma_dp_uid: Option<u32>,
    pub redirect_inbound_port: Option<Port>,
    pub redirect_outbound_port: Option<Port>,
    /// `--redirect-dns`: capture DNS (Kuma: only to resolv.conf's servers; here all, see docs).
    pub redirect_dns: bool,
    /// `--redirect-all-dns-traffic`: capture all DNS.
    pub redirect_all_dns_traffic: bool,
    pub redirect_dns_port: Option<Port>,
    pub exclude_inbound_ports: Option<Vec<Port>>,
    pub exclude_outbound_ports: Option<Vec<Port>>,
    pub exclude_inbound_ips: Option<Vec<ipnet::IpNet>>,
    pub exclude_outbound_ips: Option<Vec<ipnet::IpNet>>,
    /// `--ip-family-mode`: `true` for dualstack, `false` for ipv4.
    pub dual_stack: Option<bool>,
}

/// Kuma's redirect for a host: `yaml` is Kuma's transparent-proxy configuration (as
/// `kumactl install transparent-proxy --config-file` reads it, and as the webhook writes it for a
/// pod), `flags` are applied over it, and the result goes through the same validation as a pod's
/// annotation. Errors name the configuration's keys.
pub fn host_redirect(yaml: Option<&str>, flags: &HostFlags, net: PodNetwork) -> Result<KumaRedirect, AnnotationError> {
    let mut c = yaml.map_or(Ok(Config::default()), parse_yaml)?;
    flags.apply(&mut c);
    from_config(c, net)
}

impl HostFlags {
    /// Sets the configuration's fields the flags give. The values are typed already; the
    /// configuration's own validation runs on them afterwards, as on a file's.
    fn apply(&self, c: &mut Config) {
        let number = |n: u64| Scalar(n.to_string());
        let port_list = |ports: &[Port]| PortList::List(ports.iter().map(|p| number(u64::from(p.get()))).collect());
        let ip_list = |nets: &[ipnet::IpNet]| nets.iter().map(ToString::to_string).collect::<Vec<_>>();
        if let Some(uid) = self.kuma_dp_uid {
            c.kuma_dp_user = Some(number(u64::from(uid)));
        }
        if let Some(p) = self.redirect_inbound_port {
            c.redirect.inbound.port = Some(u64::from(p.get()));
        }
        if let Some(p) = self.redirect_outbound_port {
            c.redirect.outbound.port = Some(u64::from(p.get()));
        }
        if self.redirect_dns || self.redirect_all_dns_traffic {
            c.redirect.dns.enabled = Some(true);
        }
        if self.redirect_all_dns_traffic {
            c.redirect.dns.capture_all = Some(true);
        }
        if let Some(p) = self.redirect_dns_port {
            c.redirect.dns.port = Some(u64::from(p.get()));
        }
        if let Some(ports) = &self.exclude_inbound_ports {
            c.redirect.inbound.exclude_ports = Some(port_list(ports));
        }
        if let Some(ports) = &self.exclude_outbound_ports {
            c.redirect.outbound.exclude_ports = Some(port_list(ports));
        }
        if let Some(nets) = &self.exclude_inbound_ips {
            c.redirect.inbound.exclude_ports_for_ips = Some(ip_list(nets));
        }
        if let Some(nets) = &self.exclude_outbound_ips {
            c.redirect.outbound.exclude_ports_for_ips = Some(ip_list(nets));
        }
        if let Some(dual) = self.dual_stack {
            c.ip_family_mode = Some(if dual { "dualstack" } else { "ipv4" }.to_owned());
        }
    }
}

/// Validates the YAML configuration, merged over Kuma's defaults, into a redirect.
fn from_config(c: Config, net: PodNetwork) -> Result<KumaRedirect, AnnotationError> {
    let v = |e: ValueError| yaml_err(e.to_string());
    if c.ebpf.enabled == Some(true) {
        return Err(yaml_err("ebpf.enabled is true: eBPF redirection is not supported, only iptables".into()));
    }
    if c.redirect.vnet.networks.as_ref().is_some_and(|n| !n.is_empty()) {
        return Err(yaml_err(
            "redirect.vnet.networks is set: virtual networks (a host's container bridges) are not supported".into(),
        ));
    }
    if c.redirect.inbound.exclude_ports_for_uids.as_ref().is_some_and(|u| !u.is_empty()) {
        return Err(yaml_err(
            "redirect.inbound.excludePortsForUIDs is set: inbound packets have no owner UID; \
             use redirect.outbound.excludePortsForUIDs"
                .into(),
        ));
    }
    let proxy_uid = match c.kuma_dp_user.as_ref().map(Scalar::text).filter(|u| !u.is_empty()) {
        None => DEFAULT_PROXY_UID,
        Some(u) => parse_uid(&u, "kumaDPUser").map_err(|e| yaml_err(format!("{e} (a numeric UID is required)")))?,
    };
    let dual_stack = match c.ip_family_mode.as_deref() {
        None => true,
        Some(m) => ip_family_mode(m)
            .ok_or_else(|| yaml_err(format!("ipFamilyMode {} is not one of dualstack, ipv4", Quoted::new(m))))?,
    };

    let flow = &c.redirect.inbound;
    let inbound_enabled = flow.enabled.unwrap_or(true);
    let inbound_port = feature_port(flow.port, inbound_enabled, DEFAULT_INBOUND_PORT, "redirect.inbound.port")?;
    let inbound = if inbound_enabled {
        Some(KumaInbound {
            exclude_ports: ports(&flow.exclude_ports, "redirect.inbound.excludePorts entry").map_err(v)?,
            include_ports: ports(&flow.include_ports, "redirect.inbound.includePorts entry").map_err(v)?,
            exclude_cidrs: cidrs(
                flow.exclude_ports_for_ips.iter().flatten(),
                "redirect.inbound.excludePortsForIPs entry",
            )
            .map_err(v)?,
        })
    } else {
        None
    };

    let flow = &c.redirect.outbound;
    let outbound_enabled = flow.enabled.unwrap_or(true);
    let outbound_port = feature_port(flow.port, outbound_enabled, DEFAULT_OUTBOUND_PORT, "redirect.outbound.port")?;
    let outbound = if outbound_enabled {
        Some(KumaOutbound {
            exclude_ports: ports(&flow.exclude_ports, "redirect.outbound.excludePorts entry").map_err(v)?,
            include_ports: ports(&flow.include_ports, "redirect.outbound.includePorts entry").map_err(v)?,
        })
    } else {
        None
    };
    let exclude_outbound_cidrs =
        cidrs(flow.exclude_ports_for_ips.iter().flatten(), "redirect.outbound.excludePortsForIPs entry").map_err(v)?;
    let uid_entries = flow.exclude_ports_for_uids.as_ref().map_or(0, Vec::len);
    crate::core::limits::list_entries("redirect.outbound.excludePortsForUIDs", uid_entries).map_err(v)?;
    let mut exclude_outbound_ports_for_uids = Vec::new();
    for entry in flow.exclude_ports_for_uids.iter().flatten() {
        exclude_outbound_ports_for_uids.extend(
            parse_uid_port_exclusion(entry)
                .map_err(|reason| yaml_err(format!("redirect.outbound.excludePortsForUIDs entry {reason}")))?,
        );
    }

    let dns = &c.redirect.dns;
    let dns_enabled = dns.enabled.unwrap_or(false);
    let dns_port = feature_port(dns.port, dns_enabled, DEFAULT_DNS_PORT, "redirect.dns.port")?;
    let dns = dns_enabled.then(|| {
        if dns.capture_all != Some(true) {
            let path = dns.resolv_config_path.as_deref().unwrap_or("/etc/resolv.conf");
            log::info!(
                "{TPROXY_CONFIG} asks to capture DNS only to the nameservers of the pod's {path}, which a CNI \
                 plugin cannot read: capturing all DNS (UDP port 53) instead"
            );
        }
        KumaDns { port: dns_port, conntrack_zone_split: !dns.skip_conntrack_zone_split.unwrap_or(false) }
    });

    let log_level = match (c.log.enabled.unwrap_or(false), c.log.level) {
        (false, _) => None,
        (true, None) => Some(DEFAULT_LOG_LEVEL),
        (true, Some(l)) => Some(log_level(&l.to_string(), "log.level").map_err(v)?),
    };

    within_rule_budget(
        finish(
            KumaRedirect {
                proxy_uid,
                inbound_port,
                outbound_port,
                inbound,
                outbound,
                exclude_outbound_cidrs,
                exclude_outbound_ports_for_uids,
                dns,
                drop_invalid_packets: c.drop_invalid_packets.unwrap_or(false),
                log_level,
                dual_stack,
                families: Families { ipv6: false },
            },
            net,
        ),
        TPROXY_CONFIG,
    )
}

/// The same configuration from the per-knob annotations of webhooks up to v2.14, with kuma-cni's
/// defaults for the ones that are absent.
pub fn from_legacy_annotations(a: &Annotations, net: PodNetwork) -> Result<KumaRedirect, AnnotationError> {
    let get = |k: &str| a.get(k).map(String::as_str);
    let flag = |k: &'static str| -> Result<bool, AnnotationError> {
        match get(k) {
            None => Ok(false),
            Some(v) => enabled(v)
                .ok_or_else(|| err(k, format!("{} is not one of enabled, disabled, true, false", Quoted::new(v)))),
        }
    };
    let single_port = |k: &'static str, default: u16| -> Result<Port, AnnotationError> {
        get(k).map_or(Ok(port_const(default)), |v| parse_port(v.trim(), "port").map_err(|e| err(k, e.to_string())))
    };
    let port_list = |k: &'static str, default: Option<u16>| -> Result<Vec<Port>, AnnotationError> {
        match get(k) {
            None => Ok(default.map(port_const).into_iter().collect()),
            Some(v) => {
                let ports = split_list(v)
                    .map(|p| parse_port(p, "port").map_err(|e| err(k, e.to_string())))
                    .collect::<Result<Vec<_>, _>>()?;
                crate::core::limits::list_entries("the list", ports.len()).map_err(|e| err(k, e.to_string()))?;
                Ok(ports)
            }
        }
    };
    let cidr_list = |k: &'static str| -> Result<Cidrs, AnnotationError> {
        cidrs(get(k).into_iter(), "address").map_err(|e| err(k, e.to_string()))
    };

    let proxy_uid = match get(SIDECAR_UID) {
        None => DEFAULT_PROXY_UID,
        Some(v) => parse_uid(v.trim(), "UID").map_err(|e| err(SIDECAR_UID, e.to_string()))?,
    };
    let dual_stack = match get(IP_FAMILY_MODE) {
        None => true,
        Some(m) => ip_family_mode(m)
            .ok_or_else(|| err(IP_FAMILY_MODE, format!("{} is not one of dualstack, ipv4", Quoted::new(m))))?,
    };
    let gateway = flag(GATEWAY)?;
    let inbound_port =
        if gateway { port_const(DEFAULT_INBOUND_PORT) } else { single_port(INBOUND_PORT, DEFAULT_INBOUND_PORT)? };
    let inbound = if gateway {
        None
    } else {
        let mut exclude_ports = port_list(EXCLUDE_INBOUND_PORTS, Some(DEFAULT_EXCLUDED_PORT))?;
        // The application probe proxy listens for the kubelet's probes: never redirected.
        match get(APPLICATION_PROBE_PROXY_PORT).map(str::trim) {
            Some("0") => {}
            None => exclude_ports.push(port_const(DEFAULT_PROBE_PROXY_PORT)),
            Some(p) => {
                exclude_ports.push(parse_port(p, "port").map_err(|e| err(APPLICATION_PROBE_PROXY_PORT, e.to_string()))?)
            }
        }
        Some(KumaInbound { exclude_ports, include_ports: Vec::new(), exclude_cidrs: cidr_list(EXCLUDE_INBOUND_IPS)? })
    };
    let outbound = Some(KumaOutbound {
        exclude_ports: port_list(EXCLUDE_OUTBOUND_PORTS, Some(DEFAULT_EXCLUDED_PORT))?,
        include_ports: Vec::new(),
    });
    let uid_entries =
        get(EXCLUDE_OUTBOUND_PORTS_FOR_UIDS).map_or(0, |v| v.split(';').filter(|e| !e.trim().is_empty()).count());
    crate::core::limits::list_entries("the list", uid_entries)
        .map_err(|e| err(EXCLUDE_OUTBOUND_PORTS_FOR_UIDS, e.to_string()))?;
    let mut exclude_outbound_ports_for_uids = Vec::new();
    for entry in get(EXCLUDE_OUTBOUND_PORTS_FOR_UIDS).into_iter().flat_map(|v| v.split(';')) {
        if entry.trim().is_empty() {
            continue;
        }
        exclude_outbound_ports_for_uids.extend(
            parse_uid_port_exclusion(entry)
                .map_err(|reason| err(EXCLUDE_OUTBOUND_PORTS_FOR_UIDS, format!("entry {reason}")))?,
        );
    }
    let dns = if flag(BUILTIN_DNS)? {
        Some(KumaDns { port: single_port(BUILTIN_DNS_PORT, DEFAULT_DNS_PORT)?, conntrack_zone_split: true })
    } else {
        None
    };
    within_rule_budget(
        finish(
            KumaRedirect {
                proxy_uid,
                inbound_port,
                outbound_port: single_port(OUTBOUND_PORT, DEFAULT_OUTBOUND_PORT)?,
                inbound,
                outbound,
                exclude_outbound_cidrs: cidr_list(EXCLUDE_OUTBOUND_IPS)?,
                exclude_outbound_ports_for_uids,
                dns,
                drop_invalid_packets: flag(DROP_INVALID_PACKETS)?,
                log_level: flag(IPTABLES_LOGS)?.then_some(DEFAULT_LOG_LEVEL),
                dual_stack,
                families: Families { ipv6: false },
            },
            net,
        ),
        LEGACY_EXCLUSIONS,
    )
}

/// Decides the families: IPv6 in dual-stack mode when the pod has it (the caller may also find it
/// in the namespace later, see [`crate::core::redirect::Redirect::ipv6_follows_netns`]).
fn finish(mut k: KumaRedirect, net: PodNetwork) -> KumaRedirect {
    k.families = Families { ipv6: k.dual_stack && net.has_ipv6 };
    if !k.dual_stack && net.has_ipv6 {
        log::warn!("kuma pod in ipFamilyMode ipv4 has an IPv6 address: its IPv6 traffic is not redirected");
    }
    k
}

/// Kuma's booleans in annotations: `enabled|disabled|true|false`, any case.
fn enabled(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "enabled" | "true" => Some(true),
        "disabled" | "false" => Some(false),
        _ => None,
    }
}

/// `dualstack` → true, `ipv4` → false, any case.
fn ip_family_mode(m: &str) -> Option<bool> {
    match m.to_ascii_lowercase().as_str() {
        "dualstack" => Some(true),
        "ipv4" => Some(false),
        _ => None,
    }
}

/// A feature's port: `0` (or absent) is accepted when the feature is off, the webhook writes it
/// so; an enabled feature needs a real port.
fn feature_port(n: Option<u64>, enabled: bool, default: u16, what: &'static str) -> Result<Port, AnnotationError> {
    match n {
        None => Ok(port_const(default)),
        Some(0) if !enabled => Ok(port_const(default)),
        Some(0) => Err(yaml_err(format!("{what} is 0 but the feature is enabled (a port 1-65535 is required)"))),
        Some(n) => port_from_number(n, &n.to_string(), what).map_err(|e| yaml_err(e.to_string())),
    }
}

fn ports(list: &Option<PortList>, what: &'static str) -> Result<Vec<Port>, ValueError> {
    list.as_ref().map_or(Ok(Vec::new()), |l| l.parse(what))
}

/// IPs or CIDRs, each item possibly a comma-separated list (Kuma splits them too).
fn cidrs<'a>(
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
    crate::core::limits::list_entries(list_name(what), entries)?;
    Ok(out)
}

/// The list an entry's description (`"… entry"`) belongs to, for a limit's message.
fn list_name(entry: &'static str) -> &'static str {
    match entry.strip_suffix(" entry") {
        Some(list) => list,
        None => "the list",
    }
}

/// Refuses a redirect with more rules per family than [`crate::core::limits::MAX_RULES_PER_FAMILY`];
/// `annotation` is what the error names.
fn within_rule_budget(k: KumaRedirect, annotation: &'static str) -> Result<KumaRedirect, AnnotationError> {
    let rules = crate::core::rules::most_rules_per_family(&crate::core::redirect::Redirect::Kuma(k.clone()));
    crate::core::limits::rules_per_family(rules).map_err(|reason| err(annotation, reason))?;
    Ok(k)
}

fn log_level(s: &str, what: &'static str) -> Result<u8, ValueError> {
    s.parse::<u8>().ok().filter(|l| *l <= 7).ok_or(ValueError::OutOfRange { what, value: Quoted::new(s), range: "0-7" })
}

/// One `[proto:][ports:]uids` entry: protocol `tcp`, `udp`, both comma-separated, or `*`/empty for
/// both; ports a comma-separated list of ports and `first-last` ranges, or `*`/empty for all; UIDs
/// one UID or a `first-last` range. Gives one exclusion per protocol. Errors say why, quoting.
pub fn parse_uid_port_exclusion(entry: &str) -> Result<Vec<UidPortExclusion>, String> {
    let quoted = Quoted::new(entry);
    let parts: Vec<&str> = entry.trim_matches(' ').split(':').collect();
    let (protos, ports, uids) = match parts.as_slice() {
        [uids] => ("*", "*", *uids),
        [ports, uids] => ("*", *ports, *uids),
        [protos, ports, uids] => (*protos, *ports, *uids),
        _ => return Err(format!("{quoted} has more than three parts (expected [proto:][ports:]uids)")),
    };
    let transports = match protos.trim_matches(' ') {
        "" | "*" => vec![Transport::Tcp, Transport::Udp],
        list => list
            .split(',')
            .map(|p| match p.trim_matches(' ').to_ascii_lowercase().as_str() {
                "tcp" => Ok(Transport::Tcp),
                "udp" => Ok(Transport::Udp),
                _ => Err(format!("{quoted}: protocol {} is not tcp or udp", Quoted::new(p))),
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    // `tcp,TCP` names one protocol: one rule, not two identical ones.
    let transports: Vec<Transport> =
        [Transport::Tcp, Transport::Udp].into_iter().filter(|t| transports.contains(t)).collect();
    let ports = match ports.trim_matches(' ') {
        "" | "*" => vec![PortRange::ALL],
        list => list
            .split(',')
            .map(|p| parse_port_range(p.trim_matches(' '), "port").map_err(|e| format!("{quoted}: {e}")))
            .collect::<Result<Vec<_>, _>>()?,
    };
    if ports.iter().map(|p| p.multiport_slots()).sum::<usize>() > 15 {
        return Err(format!("{quoted}: more than 15 ports (a range counts as two), the limit of one iptables rule"));
    }
    let uids = match uids.trim_matches(' ') {
        "*" => return Err(format!("{quoted}: UIDs must be given, * is not allowed")),
        u if u.contains(',') => return Err(format!("{quoted}: give one UID or one first-last range, not a list")),
        u => parse_uid_range(u, "UID").map_err(|e| format!("{quoted}: {e}"))?,
    };
    Ok(transports.into_iter().map(|transport| UidPortExclusion { transport, ports: ports.clone(), uids }).collect())
}

fn err(annotation: &'static str, reason: String) -> AnnotationError {
    AnnotationError { mesh: MESH, annotation, reason }
}

fn yaml_err(reason: String) -> AnnotationError {
    err(TPROXY_CONFIG, reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::redirect::Family;

    fn pod(pairs: &[(&str, &str)]) -> Annotations {
        let mut a: Annotations = [(SIDECAR_INJECTED, "true"), (CNCF_NETWORKS, KUMA_CNI_NETWORK)]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (k, v) in pairs {
            a.insert(k.to_string(), v.to_string());
        }
        a
    }

    fn ok(a: &Annotations) -> KumaRedirect {
        redirect(a, None, PodNetwork::default()).unwrap().expect("a kuma pod")
    }

    fn refused(a: &Annotations) -> String {
        let e = redirect(a, None, PodNetwork::default()).unwrap_err().to_string();
        assert!(!e.contains('\n'), "one line: {e}");
        e
    }

    fn yaml(y: &str) -> Annotations {
        pod(&[(TPROXY_CONFIG, y)])
    }

    #[test]
    fn in_mesh_test_follows_the_injected_annotation_and_the_containers() {
        assert_eq!(redirect(&Annotations::new(), None, PodNetwork::default()), Ok(None));
        let mut a = pod(&[]);
        a.insert(SIDECAR_INJECTED.into(), "false".into());
        assert_eq!(redirect(&a, None, PodNetwork::default()), Ok(None));

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
        assert_eq!(redirect(&a, Some(&spec(&["app"], &[])), PodNetwork::default()), Ok(None), "no sidecar");
        assert_eq!(
            redirect(&a, Some(&spec(&["app", SIDECAR_CONTAINER], &[INIT_CONTAINER])), PodNetwork::default()),
            Ok(None),
            "kuma-init installs its own rules"
        );
        let mut broken = a.clone();
        broken.insert(TPROXY_CONFIG.into(), "redirect: [".into());
        assert_eq!(
            redirect(&broken, Some(&spec(&["app", SIDECAR_CONTAINER], &[INIT_CONTAINER])), PodNetwork::default()),
            Ok(None),
            "a kuma-init pod is not ours, whatever its YAML says"
        );
        assert!(redirect(&broken, Some(&spec(&[SIDECAR_CONTAINER], &[])), PodNetwork::default()).is_err());
    }

    #[test]
    fn without_the_pod_spec_the_webhooks_cni_mode_decides() {
        let mut a = pod(&[]);
        a.remove(CNCF_NETWORKS);
        assert_eq!(redirect(&a, None, PodNetwork::default()), Ok(None), "no CNI mode: kuma-init's pod");
        a.insert(TPROXY_CONFIG.into(), "cniMode: true\n".into());
        assert!(redirect(&a, None, PodNetwork::default()).unwrap().is_some());
        a.insert(TPROXY_CONFIG.into(), "kumaDPUser: \"5678\"\n".into());
        assert_eq!(redirect(&a, None, PodNetwork::default()), Ok(None));
        for networks in ["kuma-cni", "other,kube-system/kuma-cni@eth1", r#"[{"name":"kuma-cni","namespace":"x"}]"#] {
            a.insert(CNCF_NETWORKS.into(), networks.into());
            assert!(redirect(&a, None, PodNetwork::default()).unwrap().is_some(), "{networks}");
        }
        a.insert(CNCF_NETWORKS.into(), "kuma-cni-other".into());
        assert_eq!(redirect(&a, None, PodNetwork::default()), Ok(None));
    }

    #[test]
    fn an_empty_yaml_gets_kumas_defaults() {
        let r = ok(&yaml("{}"));
        assert_eq!((r.proxy_uid, r.inbound_port.get(), r.outbound_port.get()), (5678, 15006, 15001));
        assert_eq!(r.inbound, Some(KumaInbound::default()));
        assert_eq!(r.outbound, Some(KumaOutbound::default()));
        assert_eq!(r.dns, None);
        assert!(r.dual_stack && !r.drop_invalid_packets && r.log_level.is_none());
        assert_eq!(r.families.iter().collect::<Vec<_>>(), [Family::V4]);
        let with_v6 = redirect(&yaml("{}"), None, PodNetwork { has_ipv6: true }).unwrap().unwrap();
        assert!(with_v6.families.ipv6);
    }

    #[test]
    fn reads_what_the_webhook_writes_and_ignores_unknown_keys() {
        let r = ok(&yaml(
            "kumaDPUser: \"5679\"\nipFamilyMode: ipv4\ncniMode: true\nfutureKey: {nested: [1, 2]}\n\
             redirect:\n  inbound:\n    enabled: true\n    port: 15016\n    excludePorts: [9901, \"8080\"]\n    \
             excludePortsForIPs: [\"10.0.0.0/8,fd00::/8\"]\n    insertRedirectInsteadOfAppend: false\n  \
             outbound:\n    enabled: true\n    port: 15011\n    excludePorts: \"5432, 6379\"\n    \
             includePorts: []\n    excludePortsForUIDs: [\"tcp:22:1000-2000\", \"udp:53,60-70:42\"]\n    \
             excludePortsForIPs: [192.0.2.1]\n  dns:\n    enabled: true\n    port: 15063\n    captureAll: true\n    \
             skipConntrackZoneSplit: true\n    resolvConfigPath: /etc/resolv.conf\n  vnet:\n    networks: []\n\
             dropInvalidPackets: true\nlog:\n  enabled: true\n  level: 4\nretry:\n  maxRetries: 4\nwait: 5\n",
        ));
        assert_eq!((r.proxy_uid, r.inbound_port.get(), r.outbound_port.get()), (5679, 15016, 15011));
        assert!(!r.dual_stack);
        let inbound = r.inbound.unwrap();
        assert_eq!(inbound.exclude_ports.iter().map(|p| p.get()).collect::<Vec<_>>(), [9901, 8080]);
        assert_eq!((inbound.exclude_cidrs.v4.len(), inbound.exclude_cidrs.v6.len()), (1, 1));
        assert_eq!(r.outbound.unwrap().exclude_ports.iter().map(|p| p.get()).collect::<Vec<_>>(), [5432, 6379]);
        assert_eq!(r.exclude_outbound_cidrs.v4[0].to_string(), "192.0.2.1/32");
        assert_eq!(r.exclude_outbound_ports_for_uids.len(), 2);
        assert_eq!(r.dns, Some(KumaDns { port: Port::new(15063).unwrap(), conntrack_zone_split: false }));
        assert!(r.drop_invalid_packets);
        assert_eq!(r.log_level, Some(4));
    }

    #[test]
    fn port_zero_is_accepted_only_for_disabled_features() {
        let r = ok(&yaml("redirect:\n  dns: {enabled: false, port: 0}\n  inbound: {enabled: false, port: 0}\n"));
        assert_eq!((r.dns, r.inbound), (None, None));
        assert_eq!(r.inbound_port.get(), 15006, "the inbound redirect chain keeps Kuma's default port");
        let e = refused(&yaml("redirect:\n  dns: {enabled: true, port: 0}\n"));
        assert!(e.contains("redirect.dns.port is 0 but the feature is enabled"), "{e}");
        let e = refused(&yaml("redirect:\n  outbound: {port: 0}\n"));
        assert!(e.contains("redirect.outbound.port is 0"), "{e}");
    }

    #[test]
    fn resolv_conf_dns_falls_back_to_capturing_all() {
        let r = ok(&yaml("redirect:\n  dns: {enabled: true, captureAll: false}\n"));
        assert_eq!(r.dns, Some(KumaDns { port: Port::new(15053).unwrap(), conntrack_zone_split: true }));
    }

    #[test]
    fn refuses_bad_yaml_and_values_with_one_line_each() {
        let cases = [
            ("redirect: [unclosed", "is not Kuma's transparent proxy configuration"),
            ("- a list\n- not a map\n", "is not Kuma's transparent proxy configuration"),
            ("ipFamilyMode: ipv6\n", "ipFamilyMode \"ipv6\" is not one of dualstack, ipv4"),
            ("kumaDPUser: kuma-dp\n", "kumaDPUser \"kuma-dp\" is not a number (a numeric UID is required)"),
            ("redirect:\n  inbound: {port: 70000}\n", "redirect.inbound.port \"70000\" is out of range"),
            ("redirect:\n  outbound: {excludePorts: [\"22 -j ACCEPT\"]}\n", "is not a number"),
            ("redirect:\n  inbound: {excludePortsForIPs: [\"10.0.0.0/33\"]}\n", "is not a CIDR"),
            ("redirect:\n  outbound: {excludePortsForUIDs: [\"sctp:22:1\"]}\n", "protocol \"sctp\" is not tcp or udp"),
            ("redirect:\n  inbound: {enabled: \"maybe\"}\n", "is not Kuma's transparent proxy configuration"),
            ("ebpf: {enabled: true}\n", "eBPF redirection is not supported"),
            ("redirect:\n  vnet: {networks: [\"docker0:172.17.0.0/16\"]}\n", "virtual networks"),
            ("redirect:\n  inbound: {excludePortsForUIDs: [\"1000\"]}\n", "inbound packets have no owner"),
            ("log: {enabled: true, level: 9}\n", "log.level \"9\" is out of range (0-7)"),
            ("a: &a [*a, *a]\n", "is not Kuma's transparent proxy configuration"),
        ];
        for (y, want) in cases {
            let e = refused(&yaml(y));
            assert!(e.starts_with("kuma pod: annotation traffic.kuma.io/transparent-proxy-config: "), "{e}");
            assert!(e.contains(want), "{y:?}: {e}");
        }
    }

    #[test]
    fn legacy_annotations_get_kuma_cnis_defaults() {
        let r = ok(&pod(&[]));
        assert_eq!((r.proxy_uid, r.inbound_port.get(), r.outbound_port.get()), (5678, 15006, 15001));
        let inbound = r.inbound.unwrap();
        assert_eq!(inbound.exclude_ports.iter().map(|p| p.get()).collect::<Vec<_>>(), [9901, 9000]);
        assert_eq!(r.outbound.unwrap().exclude_ports.iter().map(|p| p.get()).collect::<Vec<_>>(), [9901]);
        assert_eq!(r.dns, None);
        assert!(r.dual_stack);
    }

    #[test]
    fn legacy_annotations_override_each_knob() {
        let r = ok(&pod(&[
            (SIDECAR_UID, "1234"),
            (INBOUND_PORT, "16006"),
            (OUTBOUND_PORT, "16001"),
            (EXCLUDE_INBOUND_PORTS, "8080,8081"),
            (APPLICATION_PROBE_PROXY_PORT, "0"),
            (EXCLUDE_OUTBOUND_PORTS, ""),
            (EXCLUDE_INBOUND_IPS, "10.1.0.0/16, fd01::/16"),
            (EXCLUDE_OUTBOUND_IPS, "192.0.2.0/24"),
            (EXCLUDE_OUTBOUND_PORTS_FOR_UIDS, "tcp:80:100;udp:53:200-300;7"),
            (BUILTIN_DNS, "Enabled"),
            (BUILTIN_DNS_PORT, "25053"),
            (IP_FAMILY_MODE, "ipv4"),
            (DROP_INVALID_PACKETS, "true"),
            (IPTABLES_LOGS, "disabled"),
        ]));
        assert_eq!((r.proxy_uid, r.inbound_port.get(), r.outbound_port.get()), (1234, 16006, 16001));
        let inbound = r.inbound.unwrap();
        assert_eq!(inbound.exclude_ports.iter().map(|p| p.get()).collect::<Vec<_>>(), [8080, 8081]);
        assert_eq!((inbound.exclude_cidrs.v4.len(), inbound.exclude_cidrs.v6.len()), (1, 1));
        assert!(r.outbound.unwrap().exclude_ports.is_empty());
        assert_eq!(r.exclude_outbound_ports_for_uids.len(), 4, "tcp, udp, and both for the bare UID");
        assert_eq!(r.dns, Some(KumaDns { port: Port::new(25053).unwrap(), conntrack_zone_split: true }));
        assert!(!r.dual_stack && r.drop_invalid_packets && r.log_level.is_none());
    }

    #[test]
    fn gateway_mode_has_no_inbound_redirection() {
        let r = ok(&pod(&[(GATEWAY, "enabled"), (INBOUND_PORT, "1")]));
        assert_eq!(r.inbound, None);
        assert_eq!(r.inbound_port.get(), 15006, "kuma-cni ignores the inbound port in gateway mode");
    }

    #[test]
    fn refuses_bad_legacy_annotations() {
        let cases = [
            (GATEWAY, "yes", "\"yes\" is not one of enabled, disabled, true, false"),
            (BUILTIN_DNS, "on", "is not one of enabled"),
            (IP_FAMILY_MODE, "ipv6", "is not one of dualstack, ipv4"),
            (SIDECAR_UID, "kuma", "is not a number"),
            (INBOUND_PORT, "0", "out of range"),
            (EXCLUDE_OUTBOUND_PORTS, "80\n-A OUTPUT -j ACCEPT", "is not a number"),
            (EXCLUDE_OUTBOUND_IPS, "10.0.0.0/8 -j ACCEPT", "is not a CIDR"),
            (EXCLUDE_OUTBOUND_PORTS_FOR_UIDS, "tcp:80:1:2", "more than three parts"),
            (EXCLUDE_OUTBOUND_PORTS_FOR_UIDS, "tcp:80:*", "* is not allowed"),
            (EXCLUDE_OUTBOUND_PORTS_FOR_UIDS, "tcp:80:1,2", "not a list"),
            (EXCLUDE_OUTBOUND_PORTS_FOR_UIDS, "tcp:90-80:1", "not a valid range"),
            (EXCLUDE_OUTBOUND_PORTS_FOR_UIDS, "tcp:80:2-1", "not a valid range"),
            (EXCLUDE_OUTBOUND_PORTS_FOR_UIDS, "tcp:0:1", "out of range"),
            (EXCLUDE_OUTBOUND_PORTS_FOR_UIDS, "1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16:1", "more than 15 ports"),
            (APPLICATION_PROBE_PROXY_PORT, "x", "is not a number"),
            (DROP_INVALID_PACKETS, "1", "is not one of"),
        ];
        for (k, v, want) in cases {
            let e = refused(&pod(&[(k, v)]));
            assert!(e.starts_with(&format!("kuma pod: annotation {k}: ")), "{e}");
            assert!(e.contains(want), "{k}={v:?}: {e}");
        }
    }

    #[test]
    fn uid_port_exclusions_expand_per_protocol() {
        let all = parse_uid_port_exclusion("1000").unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!((all[0].transport, all[1].transport), (Transport::Tcp, Transport::Udp));
        assert_eq!(all[0].ports, [PortRange::ALL]);
        let r = parse_uid_port_exclusion("TCP,udp:22,8000-8010:1000-1999").unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].ports.iter().map(ToString::to_string).collect::<Vec<_>>(), ["22", "8000:8010"]);
        assert_eq!(r[0].uids.to_string(), "1000-1999");
        assert_eq!(parse_uid_port_exclusion("*:*:5").unwrap().len(), 2);
        assert_eq!(parse_uid_port_exclusion("::5").unwrap()[0].ports, [PortRange::ALL]);
    }

    #[test]
    fn host_flags_are_the_yaml_they_stand_for_and_override_a_file() {
        let net = PodNetwork { has_ipv6: true };
        let yaml = "kumaDPUser: 1234\nredirect:\n  inbound: {port: 16006, excludePorts: [22], excludePortsForIPs: [10.0.0.0/8]}\n  outbound: {excludePorts: [5432], excludePortsForIPs: [\"fd00::/8\"]}\n  dns: {enabled: true, port: 16053, captureAll: true}\nipFamilyMode: ipv4\n";
        let flags = HostFlags {
            kuma_dp_uid: Some(1234),
            redirect_inbound_port: Port::new(16006),
            exclude_inbound_ports: Some(vec![port_const(22)]),
            exclude_inbound_ips: Some(vec!["10.0.0.0/8".parse().unwrap()]),
            exclude_outbound_ports: Some(vec![port_const(5432)]),
            exclude_outbound_ips: Some(vec!["fd00::/8".parse().unwrap()]),
            redirect_all_dns_traffic: true,
            redirect_dns_port: Port::new(16053),
            dual_stack: Some(false),
            ..HostFlags::default()
        };
        let from_yaml = host_redirect(Some(yaml), &HostFlags::default(), net).unwrap();
        assert_eq!(host_redirect(None, &flags, net).unwrap(), from_yaml);
        assert!(!from_yaml.families.ipv6, "ipv4 mode");

        // Flags win over the file; what they do not set stays as the file says.
        let over =
            HostFlags { redirect_inbound_port: Port::new(17000), dual_stack: Some(true), ..HostFlags::default() };
        let r = host_redirect(Some(yaml), &over, net).unwrap();
        assert_eq!((r.inbound_port.get(), r.proxy_uid, r.families.ipv6), (17000, 1234, true));
        assert_eq!(r.inbound.unwrap().exclude_ports, [port_const(22)]);
        // No file, no flags: Kuma's defaults.
        let d = host_redirect(None, &HostFlags::default(), net).unwrap();
        assert_eq!((d.proxy_uid, d.inbound_port.get(), d.outbound_port.get(), d.dns), (5678, 15006, 15001, None));
        // --redirect-dns alone turns DNS capture on at the default port.
        let dns = host_redirect(None, &HostFlags { redirect_dns: true, ..HostFlags::default() }, net).unwrap();
        assert_eq!(dns.dns.map(|d| d.port.get()), Some(15053));
    }
}

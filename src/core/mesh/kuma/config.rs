//! Kuma's transparent-proxy configuration (`traffic.kuma.io/transparent-proxy-config`): the YAML
//! schema, read with a budget, and its validation into a [`KumaRedirect`].
//!
//! Only the keys that shape the rules are read; every one is optional (absent means Kuma's
//! default) and unknown keys are ignored, so newer webhooks' additions do not break parsing. The
//! host command's flags are applied over this same schema (see `host.rs`). A refusal is a
//! [`TproxyConfigError`] naming the key; the caller says where the YAML came from (the pod's
//! annotation, or the host command's file and flags).

use serde::Deserialize;
use thiserror::Error;

use super::uid_ports::{UidPortError, parse_uid_port_exclusion};
use super::{
    DEFAULT_DNS_PORT, DEFAULT_INBOUND_PORT, DEFAULT_LOG_LEVEL, DEFAULT_OUTBOUND_PORT, DEFAULT_PROXY_UID, TPROXY_CONFIG,
    cidrs, finish, ip_family_mode, list_name, port_const,
};
use crate::core::limits::{self, TooManyRules};
use crate::core::mesh::PodNetwork;
use crate::core::redirect::{
    Families, KumaDns, KumaInbound, KumaOutbound, KumaRedirect, Port, ValueError, parse_port, parse_uid,
    port_from_number, split_list,
};
use crate::text::Quoted;

/// Why Kuma's transparent-proxy configuration cannot become a redirect. Messages are one line and
/// name the key, as the YAML spells it.
#[derive(Debug, Error)]
pub enum TproxyConfigError {
    /// The parser's message may quote the text it choked on: it is shortened, and not repeated as
    /// a cause.
    #[error("is not Kuma's transparent proxy configuration: {}", syntax_message(.0))]
    Syntax(Box<serde_saphyr::Error>),
    #[error("ebpf.enabled is true: eBPF redirection is not supported, only iptables")]
    Ebpf,
    #[error("redirect.vnet.networks is set: virtual networks (a host's container bridges) are not supported")]
    VirtualNetworks,
    #[error(
        "redirect.inbound.excludePortsForUIDs is set: inbound packets have no owner UID; \
         use redirect.outbound.excludePortsForUIDs"
    )]
    InboundUidExclusion,
    #[error("{0} (a numeric UID is required)")]
    DpUser(#[source] ValueError),
    #[error("ipFamilyMode {0} is not one of dualstack, ipv4")]
    IpFamilyMode(Quoted),
    #[error("{0} is 0 but the feature is enabled (a port 1-65535 is required)")]
    PortZero(&'static str),
    #[error(transparent)]
    Value(#[from] ValueError),
    #[error("redirect.outbound.excludePortsForUIDs entry {0}")]
    UidPorts(#[source] UidPortError),
    /// More rules than one family may get: only the host command's constructor
    /// (`core::mesh::kuma_host`) gives this one; a pod's is an [`crate::core::mesh::Problem`].
    #[error(transparent)]
    TooManyRules(#[from] TooManyRules),
}

/// The YAML parser's message, shortened; its advice on duplicate keys is for programmers (the fix
/// is to remove one).
fn syntax_message(e: &serde_saphyr::Error) -> String {
    let e = e.to_string().replace(", set DuplicateKeyPolicy in Options if acceptable", " (remove one)");
    crate::text::bounded(&e, limits::MAX_QUOTED_MESSAGE_BYTES).into_owned()
}

/// `traffic.kuma.io/transparent-proxy-config`: the subset of Kuma's configuration that shapes the
/// rules. Every field is optional (absent means Kuma's default) and unknown keys are ignored, so
/// newer webhooks' additions do not break parsing.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct Config {
    #[serde(rename = "kumaDPUser")]
    pub(super) kuma_dp_user: Option<Scalar>,
    pub(super) ip_family_mode: Option<String>,
    pub(super) redirect: RedirectConfig,
    pub(super) drop_invalid_packets: Option<bool>,
    pub(super) log: LogConfig,
    pub(super) cni_mode: Option<bool>,
    pub(super) ebpf: EbpfConfig,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RedirectConfig {
    pub(super) inbound: FlowConfig,
    pub(super) outbound: FlowConfig,
    pub(super) dns: DnsConfig,
    pub(super) vnet: VnetConfig,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct FlowConfig {
    pub(super) enabled: Option<bool>,
    pub(super) port: Option<u64>,
    pub(super) exclude_ports: Option<PortList>,
    pub(super) include_ports: Option<PortList>,
    #[serde(rename = "excludePortsForIPs")]
    pub(super) exclude_ports_for_ips: Option<Vec<String>>,
    #[serde(rename = "excludePortsForUIDs")]
    pub(super) exclude_ports_for_uids: Option<Vec<String>>,
    /// Kuma inserts its jump at the top of the built-in chain instead of appending it; in a pod's
    /// fresh namespace both are the same, so it is accepted and has no effect.
    #[allow(dead_code)]
    pub(super) insert_redirect_instead_of_append: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(super) struct DnsConfig {
    pub(super) enabled: Option<bool>,
    pub(super) port: Option<u64>,
    pub(super) capture_all: Option<bool>,
    pub(super) skip_conntrack_zone_split: Option<bool>,
    /// A file in the pod's filesystem, which a CNI plugin cannot read (see `docs/meshes.md`).
    pub(super) resolv_config_path: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct VnetConfig {
    pub(super) networks: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct LogConfig {
    pub(super) enabled: Option<bool>,
    pub(super) level: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct EbpfConfig {
    pub(super) enabled: Option<bool>,
}

/// A YAML scalar that Kuma reads as text: `5678` and `"5678"` are the same UID. Any scalar is
/// taken as its text (`-1`, `1.5`, `true` included) so that the value checks that follow refuse it
/// with a message naming the key and quoting the value; a list or a mapping is refused here.
#[derive(Debug)]
pub(super) struct Scalar(pub(super) String);

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
pub(super) enum PortList {
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
        limits::list_entries(list_name(what), ports.len())?;
        Ok(ports)
    }
}

/// Reads the YAML, with a budget. An empty document is Kuma's defaults.
pub(super) fn parse_yaml(yaml: &str) -> Result<Config, TproxyConfigError> {
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
    serde_saphyr::from_str_with_options::<Option<Config>>(yaml, options)
        .map(Option::unwrap_or_default)
        .map_err(|e| TproxyConfigError::Syntax(Box::new(e)))
}

/// Validates the YAML configuration, merged over Kuma's defaults, into a redirect.
pub(super) fn from_config(c: Config, net: PodNetwork) -> Result<KumaRedirect, TproxyConfigError> {
    if c.ebpf.enabled == Some(true) {
        return Err(TproxyConfigError::Ebpf);
    }
    if c.redirect.vnet.networks.as_ref().is_some_and(|n| !n.is_empty()) {
        return Err(TproxyConfigError::VirtualNetworks);
    }
    if c.redirect.inbound.exclude_ports_for_uids.as_ref().is_some_and(|u| !u.is_empty()) {
        return Err(TproxyConfigError::InboundUidExclusion);
    }
    let proxy_uid = match c.kuma_dp_user.as_ref().map(Scalar::text).filter(|u| !u.is_empty()) {
        None => DEFAULT_PROXY_UID,
        Some(u) => parse_uid(&u, "kumaDPUser").map_err(TproxyConfigError::DpUser)?,
    };
    let dual_stack = match c.ip_family_mode.as_deref() {
        None => true,
        Some(m) => ip_family_mode(m).ok_or_else(|| TproxyConfigError::IpFamilyMode(Quoted::new(m)))?,
    };

    let flow = &c.redirect.inbound;
    let inbound_enabled = flow.enabled.unwrap_or(true);
    let inbound_port = feature_port(flow.port, inbound_enabled, DEFAULT_INBOUND_PORT, "redirect.inbound.port")?;
    let inbound = if inbound_enabled {
        Some(KumaInbound {
            exclude_ports: ports(&flow.exclude_ports, "redirect.inbound.excludePorts entry")?,
            include_ports: ports(&flow.include_ports, "redirect.inbound.includePorts entry")?,
            exclude_cidrs: cidrs(
                flow.exclude_ports_for_ips.iter().flatten(),
                "redirect.inbound.excludePortsForIPs entry",
            )?,
        })
    } else {
        None
    };

    let flow = &c.redirect.outbound;
    let outbound_enabled = flow.enabled.unwrap_or(true);
    let outbound_port = feature_port(flow.port, outbound_enabled, DEFAULT_OUTBOUND_PORT, "redirect.outbound.port")?;
    let outbound = if outbound_enabled {
        Some(KumaOutbound {
            exclude_ports: ports(&flow.exclude_ports, "redirect.outbound.excludePorts entry")?,
            include_ports: ports(&flow.include_ports, "redirect.outbound.includePorts entry")?,
        })
    } else {
        None
    };
    let exclude_outbound_cidrs =
        cidrs(flow.exclude_ports_for_ips.iter().flatten(), "redirect.outbound.excludePortsForIPs entry")?;
    let uid_entries = flow.exclude_ports_for_uids.as_ref().map_or(0, Vec::len);
    limits::list_entries("redirect.outbound.excludePortsForUIDs", uid_entries)?;
    let mut exclude_outbound_ports_for_uids = Vec::new();
    for entry in flow.exclude_ports_for_uids.iter().flatten() {
        exclude_outbound_ports_for_uids.extend(parse_uid_port_exclusion(entry).map_err(TproxyConfigError::UidPorts)?);
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
        (true, Some(l)) => Some(log_level(&l.to_string(), "log.level")?),
    };

    Ok(finish(
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
    ))
}

/// A feature's port: `0` (or absent) is accepted when the feature is off, the webhook writes it
/// so; an enabled feature needs a real port.
fn feature_port(n: Option<u64>, enabled: bool, default: u16, what: &'static str) -> Result<Port, TproxyConfigError> {
    match n {
        None => Ok(port_const(default)),
        Some(0) if !enabled => Ok(port_const(default)),
        Some(0) => Err(TproxyConfigError::PortZero(what)),
        Some(n) => Ok(port_from_number(n, &n.to_string(), what)?),
    }
}

fn ports(list: &Option<PortList>, what: &'static str) -> Result<Vec<Port>, ValueError> {
    list.as_ref().map_or(Ok(Vec::new()), |l| l.parse(what))
}

fn log_level(s: &str, what: &'static str) -> Result<u8, ValueError> {
    s.parse::<u8>().ok().filter(|l| *l <= 7).ok_or(ValueError::OutOfRange { what, value: Quoted::new(s), range: "0-7" })
}

#[cfg(test)]
mod tests {
    use super::super::redirect;
    use super::super::tests::{ok, refused, yaml};
    use super::*;
    use crate::core::redirect::Family;

    #[test]
    fn an_empty_yaml_gets_kumas_defaults() {
        let r = ok(&yaml("{}"));
        assert_eq!((r.proxy_uid, r.inbound_port.get(), r.outbound_port.get()), (5678, 15006, 15001));
        assert_eq!(r.inbound, Some(KumaInbound::default()));
        assert_eq!(r.outbound, Some(KumaOutbound::default()));
        assert_eq!(r.dns, None);
        assert!(r.dual_stack && !r.drop_invalid_packets && r.log_level.is_none());
        assert_eq!(r.families.iter().collect::<Vec<_>>(), [Family::V4]);
        let with_v6 = redirect(&yaml("{}"), None, PodNetwork { has_ipv6: true }).unwrap().unwrap().redirect;
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
}

//! The per-knob annotations of Kuma's webhooks up to v2.14 (`kuma.io/transparent-proxying-*`,
//! `traffic.kuma.io/exclude-*`, …), read with kuma-cni's defaults for the ones that are absent,
//! into the same [`KumaRedirect`] the YAML configuration gives.

use super::uid_ports::parse_uid_port_exclusion;
use super::{
    APPLICATION_PROBE_PROXY_PORT, BUILTIN_DNS, BUILTIN_DNS_PORT, DEFAULT_DNS_PORT, DEFAULT_EXCLUDED_PORT,
    DEFAULT_INBOUND_PORT, DEFAULT_LOG_LEVEL, DEFAULT_OUTBOUND_PORT, DEFAULT_PROBE_PROXY_PORT, DEFAULT_PROXY_UID,
    DROP_INVALID_PACKETS, EXCLUDE_INBOUND_IPS, EXCLUDE_INBOUND_PORTS, EXCLUDE_OUTBOUND_IPS, EXCLUDE_OUTBOUND_PORTS,
    EXCLUDE_OUTBOUND_PORTS_FOR_UIDS, GATEWAY, INBOUND_PORT, IP_FAMILY_MODE, IPTABLES_LOGS, OUTBOUND_PORT, SIDECAR_UID,
    cidrs, err, finish, ip_family_mode, port_const,
};
use crate::core::limits;
use crate::core::mesh::{AnnotationError, Annotations, PodNetwork, Problem};
use crate::core::redirect::{
    Cidrs, Families, KumaDns, KumaInbound, KumaOutbound, KumaRedirect, Port, parse_port, parse_uid, split_list,
};
use crate::text::Quoted;

/// The same configuration from the per-knob annotations of webhooks up to v2.14, with kuma-cni's
/// defaults for the ones that are absent.
pub(super) fn from_legacy_annotations(a: &Annotations, net: PodNetwork) -> Result<KumaRedirect, AnnotationError> {
    let get = |k: &str| a.get(k).map(String::as_str);
    let flag = |k: &'static str| -> Result<bool, AnnotationError> {
        match get(k) {
            None => Ok(false),
            Some(v) => enabled(v).ok_or_else(|| {
                err(k, Problem::NotOneOf { value: Quoted::new(v), allowed: "one of enabled, disabled, true, false" })
            }),
        }
    };
    let single_port = |k: &'static str, default: u16| -> Result<Port, AnnotationError> {
        get(k).map_or(Ok(port_const(default)), |v| parse_port(v.trim(), "port").map_err(|e| err(k, e)))
    };
    let port_list = |k: &'static str, default: Option<u16>| -> Result<Vec<Port>, AnnotationError> {
        match get(k) {
            None => Ok(default.map(port_const).into_iter().collect()),
            Some(v) => {
                let ports = split_list(v)
                    .map(|p| parse_port(p, "port").map_err(|e| err(k, e)))
                    .collect::<Result<Vec<_>, _>>()?;
                limits::list_entries("the list", ports.len()).map_err(|e| err(k, e))?;
                Ok(ports)
            }
        }
    };
    let cidr_list = |k: &'static str| -> Result<Cidrs, AnnotationError> {
        cidrs(get(k).into_iter(), "address").map_err(|e| err(k, e))
    };

    let proxy_uid = match get(SIDECAR_UID) {
        None => DEFAULT_PROXY_UID,
        Some(v) => parse_uid(v.trim(), "UID").map_err(|e| err(SIDECAR_UID, e))?,
    };
    let dual_stack = match get(IP_FAMILY_MODE) {
        None => true,
        Some(m) => ip_family_mode(m).ok_or_else(|| {
            err(IP_FAMILY_MODE, Problem::NotOneOf { value: Quoted::new(m), allowed: "one of dualstack, ipv4" })
        })?,
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
            Some(p) => exclude_ports.push(parse_port(p, "port").map_err(|e| err(APPLICATION_PROBE_PROXY_PORT, e))?),
        }
        Some(KumaInbound { exclude_ports, include_ports: Vec::new(), exclude_cidrs: cidr_list(EXCLUDE_INBOUND_IPS)? })
    };
    let outbound = Some(KumaOutbound {
        exclude_ports: port_list(EXCLUDE_OUTBOUND_PORTS, Some(DEFAULT_EXCLUDED_PORT))?,
        include_ports: Vec::new(),
    });
    let uid_entries =
        get(EXCLUDE_OUTBOUND_PORTS_FOR_UIDS).map_or(0, |v| v.split(';').filter(|e| !e.trim().is_empty()).count());
    limits::list_entries("the list", uid_entries).map_err(|e| err(EXCLUDE_OUTBOUND_PORTS_FOR_UIDS, e))?;
    let mut exclude_outbound_ports_for_uids = Vec::new();
    for entry in get(EXCLUDE_OUTBOUND_PORTS_FOR_UIDS).into_iter().flat_map(|v| v.split(';')) {
        if entry.trim().is_empty() {
            continue;
        }
        exclude_outbound_ports_for_uids.extend(
            parse_uid_port_exclusion(entry).map_err(|e| err(EXCLUDE_OUTBOUND_PORTS_FOR_UIDS, Problem::UidPorts(e)))?,
        );
    }
    let dns = if flag(BUILTIN_DNS)? {
        Some(KumaDns { port: single_port(BUILTIN_DNS_PORT, DEFAULT_DNS_PORT)?, conntrack_zone_split: true })
    } else {
        None
    };
    Ok(finish(
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
    ))
}

/// Kuma's booleans in annotations: `enabled|disabled|true|false`, any case.
fn enabled(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "enabled" | "true" => Some(true),
        "disabled" | "false" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{ok, pod, refused};
    use super::*;

    #[test]
    fn legacy_annotations_get_kuma_cnis_defaults() {
        let r = ok(&pod(&[]));
        assert_eq!((r.proxy_uid, r.inbound_port.get(), r.outbound_port.get()), (5678, 15006, 15001));
        let inbound = r.inbound.unwrap();
        assert_eq!(inbound.exclude_ports.iter().map(|p| p.get()).collect::<Vec<_>>(), [9901, 9001]);
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
}

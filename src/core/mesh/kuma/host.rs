//! `kumactl install transparent-proxy`'s flags, typed, for the host command: each flag stands
//! for a key of Kuma's configuration YAML and is applied over a `--config-file`, as kumactl does,
//! so a host and a pod with the same settings get the same rules.

use super::config::{Config, PortList, Scalar, TproxyConfigError, from_config, parse_yaml};
use crate::core::mesh::PodNetwork;
use crate::core::redirect::{KumaRedirect, Port};

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
/// annotation. Errors name the configuration's keys. The rule budget is checked by the caller,
/// `core::mesh::kuma_host`.
pub(in crate::core::mesh) fn host_redirect(
    yaml: Option<&str>,
    flags: &HostFlags,
    net: PodNetwork,
) -> Result<KumaRedirect, TproxyConfigError> {
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

#[cfg(test)]
mod tests {
    use super::super::port_const;
    use super::*;

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

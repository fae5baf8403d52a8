//! Real traffic through a real chain: a Consul pod's connections land where Consul's rules send them.
//!
//! Each test builds a bridge network with two pods attached through libcni (bridge + host-local +
//! tproxy-cni): a mesh pod ("app") and a plain pod ("server") that plays the remote host. Every
//! listener answers with its own name and the destination the client originally dialled, so a test
//! tells "redirected to the proxy" from "went straight to the server" from "refused".

use std::net::IpAddr;

use crate::both_engines;
use crate::support::*;
use serde_json::json;

const PROXY_UID: u32 = 5995;
const CONNECT_INIT_UID: u32 = 5996;
const OTHER_UID: u32 = 4242;

/// The sibling host: answers on 8080 and 5432 (both families) and holds an extra address per
/// family (`.200`, `::200`) that the app's configuration excludes.
fn server(net: &Network) -> Sibling<'_> {
    Sibling::new(net, &[8080, 5432], &["198.18.0.200/24", "fd18::200/64"])
}

fn typical_config() -> serde_json::Value {
    json!({
        "ConsulDNSIP": "127.0.0.1", "ConsulDNSPort": 8600,
        "ProxyUserID": PROXY_UID.to_string(), "ProxyInboundPort": 20000, "ProxyOutboundPort": 15001,
        "ExcludeInboundPorts": ["9090"], "ExcludeOutboundPorts": ["5432"],
        "ExcludeOutboundCIDRs": ["198.18.0.200/32", "fd18::200/128"],
        "ExcludeUIDs": [CONNECT_INIT_UID.to_string()],
        "NetNS": "", "IptablesProvider": null
    })
}

both_engines!(consul_pod_outbound_inbound_and_dns_follow_consuls_rules);
fn consul_pod_outbound_inbound_and_dns_follow_consuls_rules(engine: Engine) {
    if !privileged() {
        return;
    }
    let net = Network::new(engine.conf());
    let srv = server(&net);
    let app = net.pod("app", Some(&consul_pod(typical_config(), &[])));
    let _l = consul_app_listeners(&app.ns);
    let s4 = srv.v4;
    let app4 = app.addr(Fam::V4);

    // Outbound: the application's connection lands on the proxy, which can see where it was going.
    let r = dial(&app.ns, None, sa(s4, 8080));
    assert_eq!(r, Ok(format!("outbound {s4}:8080")), "app -> server:8080 must reach the outbound listener");
    assert_eq!(who(&dial(&app.ns, Some(OTHER_UID), sa(s4, 8080))), "outbound", "any non-excluded UID is redirected");

    // The proxy itself and the excluded UID go straight out.
    assert_eq!(who(&dial(&app.ns, Some(PROXY_UID), sa(s4, 8080))), "server:8080");
    assert_eq!(who(&dial(&app.ns, Some(CONNECT_INIT_UID), sa(s4, 8080))), "server:8080");
    // Excluded port and excluded CIDR go straight out.
    assert_eq!(who(&dial(&app.ns, None, sa(s4, 5432))), "server:5432");
    assert_eq!(who(&dial(&app.ns, None, sa("198.18.0.200".parse::<IpAddr>().unwrap(), 8080))), "server:8080");
    // 127.0.0.1 is never redirected.
    assert_eq!(who(&dial(&app.ns, None, sa("127.0.0.1".parse::<IpAddr>().unwrap(), 8080))), "app-local");

    // Inbound: connections to the pod land on the inbound listener, except the excluded port.
    let r = dial(&srv.pod.ns, None, sa(app4, 7000));
    assert_eq!(r, Ok(format!("inbound {app4}:7000")));
    assert_eq!(who(&dial(&srv.pod.ns, None, sa(app4, 9090))), "app:9090");

    // DNS to 127.0.0.1:53, UDP and TCP, reaches Consul DNS on 8600.
    assert_eq!(udp_ask(&app.ns, None, sa("127.0.0.1".parse::<IpAddr>().unwrap(), 53)).as_deref(), Ok("consul-dns-udp"));
    assert_eq!(
        dial(&app.ns, None, sa("127.0.0.1".parse::<IpAddr>().unwrap(), 53)),
        Ok("consul-dns-tcp 127.0.0.1:53".into())
    );

    // The pod has IPv6, so it gets an IPv6 pass too (without DNS: Consul's DNS address is IPv4).
    let s6 = srv.v6;
    let app6 = app.addr(Fam::V6);
    assert_eq!(dial(&app.ns, None, sa(s6, 8080)), Ok(format!("outbound6 [{s6}]:8080")));
    assert_eq!(who(&dial(&app.ns, Some(PROXY_UID), sa(s6, 8080))), "server6:8080");
    assert_eq!(who(&dial(&app.ns, None, sa(s6, 5432))), "server6:5432");
    assert_eq!(who(&dial(&app.ns, None, sa("fd18::200".parse::<IpAddr>().unwrap(), 8080))), "server6:8080");
    assert_eq!(dial(&srv.pod.ns, None, sa(app6, 7000)), Ok(format!("inbound6 [{app6}]:7000")));

    // The plain pod was passed through: nothing of ours in its namespace.
    assert_eq!(engine.our_rules(&srv.pod.ns), 0);
}

both_engines!(dual_stack_consul_pod_resolves_through_ipv6_loopback_only);
fn dual_stack_consul_pod_resolves_through_ipv6_loopback_only(engine: Engine) {
    if !privileged() {
        return;
    }
    let net = Network::new(engine.conf());
    let srv = server(&net);
    let mut config = typical_config();
    config["ConsulDNSIP"] = json!("::1");
    let app = net.pod("app", Some(&consul_pod(config, &[("consul.hashicorp.com/dual-stack", "true")])));
    let _dns6 = Responder::udp(&app.ns, "[::1]:8600".parse().unwrap(), "consul-dns6-udp");
    let _dns6t = Responder::tcp(&app.ns, "[::1]:8600".parse().unwrap(), "consul-dns6-tcp");
    let _l = consul_app_listeners(&app.ns);

    assert_eq!(udp_ask(&app.ns, None, "[::1]:53".parse().unwrap()).as_deref(), Ok("consul-dns6-udp"));
    assert_eq!(dial(&app.ns, None, "[::1]:53".parse().unwrap()), Ok("consul-dns6-tcp [::1]:53".into()));
    // In dual-stack mode the IPv4 pass has no DNS rules: nothing answers on 127.0.0.1:53.
    assert!(udp_ask(&app.ns, None, "127.0.0.1:53".parse().unwrap()).is_err());
    // TCP redirection works in both families.
    let (s4, s6) = (srv.v4, srv.v6);
    assert_eq!(who(&dial(&app.ns, None, sa(s4, 8080))), "outbound");
    assert_eq!(who(&dial(&app.ns, None, sa(s6, 8080))), "outbound6");
}

both_engines!(dns_ip_without_port_sends_all_dns_to_that_address, "legacy");
fn dns_ip_without_port_sends_all_dns_to_that_address(engine: Engine) {
    if !privileged() {
        return;
    }
    let net = Network::new(engine.conf());
    let srv = server(&net);
    let s4 = srv.v4;
    let _dns = Responder::udp(&srv.pod.ns, sa("0.0.0.0".parse::<IpAddr>().unwrap(), 53), "server-dns");
    let config = json!({"ProxyUserID": "5995", "ProxyInboundPort": 20000, "ConsulDNSIP": s4.to_string()});
    let app = net.pod("app", Some(&consul_pod(config, &[])));
    // A resolver address that does not exist on the network: only the DNAT can make it answer.
    assert_eq!(udp_ask(&app.ns, None, "198.18.0.99:53".parse().unwrap()).as_deref(), Ok("server-dns"));
}

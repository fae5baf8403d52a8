//! Real traffic through a real chain: a Kuma pod's connections land where Kuma's rules send them.
//!
//! Each test builds a bridge network with pods attached through libcni (bridge + host-local +
//! tproxy-cni): Kuma pods ("app") and a plain pod ("server") that plays the remote host. Every TCP
//! listener answers with its name and the destination the client originally dialled, every UDP one
//! with its name, so a test tells "redirected to the proxy" from "went straight to the server".

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::both_engines;
use crate::support::*;

const PROXY_UID: u32 = 5678;
/// Inside the per-UID exclusion's range (4000-4100), and outside it.
const EXCLUDED_UID: u32 = 4042;
const OTHER_UID: u32 = 4500;

const ANY4: Ipv4Addr = Ipv4Addr::UNSPECIFIED;
const ANY6: Ipv6Addr = Ipv6Addr::UNSPECIFIED;

/// The remote host: TCP 8080, 5432, 6000 and DNS (UDP and TCP 53) in both families, and two
/// extra addresses per family: `.200` (an excluded destination) and `.201` (an excluded source).
fn server(net: &Network) -> Sibling<'_> {
    let mut srv =
        Sibling::new(net, &[8080, 5432, 6000], &["198.18.0.200/24", "198.18.0.201/24", "fd18::200/64", "fd18::201/64"]);
    let (pod, v4, v6) = (&srv.pod, srv.v4, srv.v6);
    // Bound to the primary addresses, so answers leave from the address the query went to.
    let dns = [
        Responder::udp(&pod.ns, sa(v4, 53), "server-dns"),
        Responder::udp(&pod.ns, sa(v6, 53), "server-dns6"),
        Responder::tcp(&pod.ns, sa(ANY4, 53), "server-dns-tcp"),
        Responder::tcp(&pod.ns, sa(ANY6, 53), "server-dns-tcp6"),
    ];
    srv.listeners.extend(dns);
    srv
}

/// The Kuma pod's listeners: the proxy's outbound (15001), inbound (15006) and DNS ports (15053 on
/// the loopback address, owned by the proxy's UID, as kuma-dp's is), and two application ports,
/// 7000 and 9090.
fn app_listeners(ns: &Netns) -> Vec<Responder> {
    let mut l = Vec::new();
    let loopbacks = [IpAddr::from(Ipv4Addr::LOCALHOST), IpAddr::from(Ipv6Addr::LOCALHOST)];
    for ((any, sfx), lo) in [(IpAddr::from(ANY4), ""), (IpAddr::from(ANY6), "6")].into_iter().zip(loopbacks) {
        l.push(Responder::tcp(ns, sa(any, 15001), &format!("outbound{sfx}")));
        l.push(Responder::tcp(ns, sa(any, 15006), &format!("inbound{sfx}")));
        l.push(Responder::tcp(ns, sa(any, 7000), &format!("app{sfx}:7000")));
        l.push(Responder::tcp(ns, sa(any, 9090), &format!("app{sfx}:9090")));
        l.push(Responder::udp_as(ns, Some(PROXY_UID), sa(lo, 15053), &format!("kuma-dns{sfx}")));
    }
    l
}

const FULL_CONFIG: &str = r#"cniMode: true
kumaDPUser: "5678"
redirect:
  inbound:
    port: 15006
    excludePorts: [9090]
    excludePortsForIPs: ["198.18.0.201/32,fd18::201/128"]
  outbound:
    port: 15001
    excludePorts: [5432]
    excludePortsForIPs: [198.18.0.200, "fd18::200"]
    excludePortsForUIDs: ["tcp:6000-6010:4000-4100", "udp:53:4000-4100"]
  dns: {enabled: true, port: 15053, captureAll: true, skipConntrackZoneSplit: false}
dropInvalidPackets: true
"#;

both_engines!(kuma_pod_traffic_follows_kumas_rules_in_both_families);
fn kuma_pod_traffic_follows_kumas_rules_in_both_families(engine: Engine) {
    if !privileged() {
        return;
    }
    let net = Network::new(engine.conf());
    let srv = server(&net);
    let app = net.pod("app", Some(&kuma_pod(Some(FULL_CONFIG), &[])));
    let _l = app_listeners(&app.ns);
    let (s4, a4) = (srv.v4, app.addr(Fam::V4));

    // Outbound: the application's connection lands on the proxy, which sees where it was going.
    assert_eq!(dial(&app.ns, None, sa(s4, 8080)), Ok(format!("outbound {s4}:8080")));
    assert_eq!(who(&dial(&app.ns, Some(OTHER_UID), sa(s4, 8080))), "outbound");
    // The proxy's own connections go straight out.
    assert_eq!(who(&dial(&app.ns, Some(PROXY_UID), sa(s4, 8080))), "server:8080");
    // Exclusions: port, destination address, and per-UID ports (UID and port both in range).
    assert_eq!(who(&dial(&app.ns, None, sa(s4, 5432))), "server:5432");
    assert_eq!(who(&dial(&app.ns, None, sa([198, 18, 0, 200], 8080))), "server:8080");
    assert_eq!(who(&dial(&app.ns, Some(EXCLUDED_UID), sa(s4, 6000))), "server:6000");
    assert_eq!(who(&dial(&app.ns, Some(EXCLUDED_UID), sa(s4, 8080))), "outbound", "port outside the exclusion");
    assert_eq!(who(&dial(&app.ns, Some(OTHER_UID), sa(s4, 6000))), "outbound", "UID outside the exclusion");

    // Inbound: connections to the pod land on the inbound listener, except the excluded port and
    // connections from the excluded source address.
    // (The server dials from a chosen address: it has several, and only .201 is excluded.)
    assert_eq!(dial_from(&srv.pod.ns, None, s4, sa(a4, 7000)), Ok(format!("inbound {a4}:7000")));
    assert_eq!(who(&dial_from(&srv.pod.ns, None, s4, sa(a4, 9090))), "app:9090");
    assert_eq!(who(&dial_from(&srv.pod.ns, None, [198, 18, 0, 201].into(), sa(a4, 7000))), "app:7000");

    // The proxy calling its own pod address (a service that resolves to this pod) is sent to its
    // inbound listener; the application calling it, or anyone calling 127.0.0.1, is not.
    assert_eq!(dial(&app.ns, Some(PROXY_UID), sa(a4, 7000)), Ok(format!("inbound {a4}:7000")));
    assert_eq!(who(&dial(&app.ns, None, sa(a4, 7000))), "app:7000");
    assert_eq!(who(&dial(&app.ns, Some(PROXY_UID), sa(Ipv4Addr::LOCALHOST, 7000))), "app:7000");
    // The proxy's inbound passthrough (source 127.0.0.6) reaches the application unredirected.
    assert_eq!(who(&dial_from(&app.ns, Some(PROXY_UID), [127, 0, 0, 6].into(), sa(a4, 7000))), "app:7000");

    // DNS: the application's UDP queries go to kuma-dp's DNS proxy, the proxy's own go out; DNS
    // over TCP is never captured; the per-UID exclusion covers UDP port 53 too.
    assert_eq!(udp_ask(&app.ns, None, sa(s4, 53)).as_deref(), Ok("kuma-dns"));
    assert_eq!(udp_ask(&app.ns, Some(OTHER_UID), sa(s4, 53)).as_deref(), Ok("kuma-dns"));
    assert_eq!(udp_ask(&app.ns, Some(PROXY_UID), sa(s4, 53)).as_deref(), Ok("server-dns"));
    assert_eq!(udp_ask(&app.ns, Some(EXCLUDED_UID), sa(s4, 53)).as_deref(), Ok("server-dns"));
    assert_eq!(who(&dial(&app.ns, None, sa(s4, 53))), "server-dns-tcp");

    // IPv6: the same, with ::6 as the passthrough source (which the plugin put on lo) and ::1.
    let (s6, a6) = (srv.v6, app.addr(Fam::V6));
    assert_eq!(dial(&app.ns, None, sa(s6, 8080)), Ok(format!("outbound6 [{s6}]:8080")));
    assert_eq!(who(&dial(&app.ns, Some(PROXY_UID), sa(s6, 8080))), "server6:8080");
    assert_eq!(who(&dial(&app.ns, None, sa(s6, 5432))), "server6:5432");
    assert_eq!(who(&dial(&app.ns, None, sa("fd18::200".parse::<IpAddr>().unwrap(), 8080))), "server6:8080");
    assert_eq!(who(&dial(&app.ns, Some(EXCLUDED_UID), sa(s6, 6000))), "server6:6000");
    assert_eq!(dial_from(&srv.pod.ns, None, s6, sa(a6, 7000)), Ok(format!("inbound6 [{a6}]:7000")));
    assert_eq!(who(&dial_from(&srv.pod.ns, None, s6, sa(a6, 9090))), "app6:9090");
    assert_eq!(who(&dial_from(&srv.pod.ns, None, "fd18::201".parse().unwrap(), sa(a6, 7000))), "app6:7000");
    assert_eq!(dial(&app.ns, Some(PROXY_UID), sa(a6, 7000)), Ok(format!("inbound6 [{a6}]:7000")));
    assert_eq!(who(&dial(&app.ns, None, sa(a6, 7000))), "app6:7000");
    assert_eq!(who(&dial_from(&app.ns, Some(PROXY_UID), "::6".parse().unwrap(), sa(a6, 7000))), "app6:7000");
    assert_eq!(udp_ask(&app.ns, None, sa(s6, 53)).as_deref(), Ok("kuma-dns6"));
    assert_eq!(udp_ask(&app.ns, Some(PROXY_UID), sa(s6, 53)).as_deref(), Ok("server-dns6"));
    assert_eq!(who(&dial(&app.ns, None, sa(s6, 53))), "server-dns-tcp6");

    // The plain pod was passed through: nothing in its namespace, and no ::6 on its loopback.
    assert_eq!(srv.pod.ns.save(Fam::V4, "nft").lines().filter(|l| l.starts_with("-A")).count(), 0);
    assert_eq!(srv.pod.ns.passthrough_v6(), 0);
}

both_engines!(include_ports_gateway_mode_and_ipv4_mode, "legacy");
fn include_ports_gateway_mode_and_ipv4_mode(engine: Engine) {
    if !privileged() {
        return;
    }
    let net = Network::new(engine.conf());
    let srv = server(&net);
    let (s4, s6) = (srv.v4, srv.v6);

    // Allow-lists: only the included ports are redirected, each way.
    let include = "cniMode: true\nredirect:\n  inbound: {includePorts: [7000]}\n  outbound: {includePorts: [8080]}\n";
    let app = net.pod("include", Some(&kuma_pod(Some(include), &[])));
    let _l = app_listeners(&app.ns);
    let a4 = app.addr(Fam::V4);
    assert_eq!(who(&dial(&app.ns, None, sa(s4, 8080))), "outbound");
    assert_eq!(who(&dial(&app.ns, None, sa(s4, 5432))), "server:5432");
    assert_eq!(dial(&srv.pod.ns, None, sa(a4, 7000)), Ok(format!("inbound {a4}:7000")));
    assert_eq!(who(&dial(&srv.pod.ns, None, sa(a4, 9090))), "app:9090");

    // Gateway mode (per-knob annotations of a v2.14 webhook): no inbound redirection at all.
    let gw = net.pod("gateway", Some(&kuma_pod(None, &[("kuma.io/gateway", "enabled")])));
    let _g = app_listeners(&gw.ns);
    let g4 = gw.addr(Fam::V4);
    assert_eq!(who(&dial(&srv.pod.ns, None, sa(g4, 7000))), "app:7000");
    assert_eq!(who(&dial(&gw.ns, None, sa(s4, 8080))), "outbound", "outbound is still redirected");

    // ipFamilyMode ipv4: the pod has IPv6, but only IPv4 goes through the proxy, and no ::6.
    let v4only = net.pod("v4only", Some(&kuma_pod(None, &[("kuma.io/transparent-proxying-ip-family-mode", "ipv4")])));
    let _v = app_listeners(&v4only.ns);
    assert_eq!(who(&dial(&v4only.ns, None, sa(s4, 8080))), "outbound");
    assert_eq!(who(&dial(&v4only.ns, None, sa(s6, 8080))), "server6:8080");
    assert_eq!(v4only.ns.passthrough_v6(), 0);
    assert!(gw.ns.passthrough_v6() > 0, "dual-stack gets ::6");
}

both_engines!(legacy_annotations_exclude_the_application_probe_proxy_port_as_kuma_cni_does);
/// Kuma's per-knob form (webhooks up to v2.14): the application probe proxy's port is excluded from
/// inbound redirection as kuma-cni excludes it — 9001 when `kuma.io/application-probe-proxy-port` is
/// absent, the annotated port otherwise, none for `0` — so the kubelet's probes (played by the
/// server pod) reach kuma-dp's probe proxy and not the inbound listener.
fn legacy_annotations_exclude_the_application_probe_proxy_port_as_kuma_cni_does(engine: Engine) {
    if !privileged() {
        return;
    }
    let net = Network::new(engine.conf());
    let srv = server(&net);
    let s4 = srv.v4;
    let probe_listeners =
        |ns: &Netns| [9000, 9001, 9555].map(|port| Responder::tcp(ns, sa(ANY4, port), &format!("probe-proxy:{port}")));
    /// A pod's name, its probe annotation, the ports that reach the probe proxy, those redirected.
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [u16], &'a [u16]);
    let cases: [Case; 3] = [
        ("absent", &[], &[9001], &[9000, 9555]),
        ("custom", &[("kuma.io/application-probe-proxy-port", "9555")], &[9555], &[9000, 9001]),
        ("zero", &[("kuma.io/application-probe-proxy-port", "0")], &[], &[9000, 9001, 9555]),
    ];
    for (name, annotations, reach_probe_proxy, redirected) in cases {
        let app = net.pod(name, Some(&kuma_pod(None, annotations)));
        let _l = app_listeners(&app.ns);
        let _p = probe_listeners(&app.ns);
        let a4 = app.addr(Fam::V4);
        for port in reach_probe_proxy {
            let got = dial_from(&srv.pod.ns, None, s4, sa(a4, *port));
            assert_eq!(who(&got), format!("probe-proxy:{port}"), "{name}: port {port}: {got:?}");
        }
        for port in redirected {
            let got = dial_from(&srv.pod.ns, None, s4, sa(a4, *port));
            assert_eq!(got, Ok(format!("inbound {a4}:{port}")), "{name}: port {port}");
        }
        // Envoy's admin port (kuma-cni's other default exclusion) stays excluded whatever the probe port.
        let _admin = Responder::tcp(&app.ns, sa(ANY4, 9901), "envoy-admin");
        assert_eq!(who(&dial_from(&srv.pod.ns, None, s4, sa(a4, 9901))), "envoy-admin", "{name}");
    }
}

both_engines!(drop_invalid_packets_drops_what_conntrack_finds_invalid);
fn drop_invalid_packets_drops_what_conntrack_finds_invalid(engine: Engine) {
    if !privileged() {
        return;
    }
    let net = Network::new(engine.conf());
    let srv = server(&net);
    let app = net.pod("app", Some(&kuma_pod(Some(FULL_CONFIG), &[])));
    let _l = app_listeners(&app.ns);
    let a4 = app.addr(Fam::V4);
    // The drop rule's packet counter.
    let dropped = || match engine {
        Engine::Iptables(_) => {
            let saved = app.ns.exec(&["iptables-nft-save", "-c", "-t", "mangle"]);
            let line = saved.lines().find(|l| l.contains("--ctstate INVALID")).expect("the drop rule is installed");
            line.trim_start_matches('[').split(':').next().unwrap().parse::<u64>().unwrap()
        }
        Engine::Nftables => {
            let table = app.ns.nft_table(Fam::V4);
            let line = table.lines().find(|l| l.contains("ct state invalid")).expect("the drop rule is installed");
            let count = line.split_whitespace().skip_while(|w| *w != "packets").nth(1).expect("the rule counts");
            count.parse::<u64>().unwrap()
        }
    };
    assert_eq!(dropped(), 0);
    // Valid connections are untouched by the rule.
    assert_eq!(dial(&srv.pod.ns, None, sa(a4, 7000)), Ok(format!("inbound {a4}:7000")));
    assert_eq!(dropped(), 0);
    // A TCP segment with SYN and FIN both set is a flag combination conntrack calls invalid.
    let (s4, IpAddr::V4(dst)) = (srv.v4, a4) else { unreachable!() };
    let IpAddr::V4(src) = s4 else { unreachable!() };
    for _ in 0..3 {
        in_netns(&srv.pod.ns, None, || send_tcp_flags(src, dst, 7000, 0x01 | 0x02));
    }
    assert_eq!(dropped(), 3, "every invalid segment is dropped in mangle PREROUTING");
}

/// Sends one bare TCP segment with the given flags over a raw socket (the kernel adds the IP header).
fn send_tcp_flags(src: Ipv4Addr, dst: Ipv4Addr, port: u16, flags: u8) {
    let mut seg = [0u8; 20];
    seg[0..2].copy_from_slice(&40000u16.to_be_bytes());
    seg[2..4].copy_from_slice(&port.to_be_bytes());
    seg[4..8].copy_from_slice(&1u32.to_be_bytes());
    seg[12] = 5 << 4; // data offset: five 32-bit words
    seg[13] = flags;
    seg[14..16].copy_from_slice(&1024u16.to_be_bytes());
    // Checksum over the pseudo-header (addresses, protocol, length) and the segment.
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| b.chunks(2).for_each(|c| sum += u32::from(u16::from_be_bytes([c[0], c[1]])));
    add(&src.octets());
    add(&dst.octets());
    add(&[0, 6, 0, 20]);
    add(&seg);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    seg[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::RAW, Some(socket2::Protocol::TCP)).unwrap();
    sock.send_to(&seg, &sa(dst, 0).into()).unwrap();
}

//! Kuma's rule layout: Kuma's chain names, Kuma's comment prefix, and the order Kuma's own builder
//! produces, so `kumactl`, Kuma's docs and its troubleshooting guides apply to a pod set up by
//! tproxy-cni. The comment texts after the prefix are our own.
//!
//! Tables, in commit order: nat (the four `KUMA_MESH_*` chains, inbound and outbound redirection,
//! DNS capture), raw (conntrack zones that keep the proxy's DNS flows apart from the application's),
//! mangle (dropping packets conntrack finds invalid). Kuma inserts its early OUTPUT rules at the top
//! of the chain; in a pod's fresh namespace that is the same as appending them in order.

use std::net::IpAddr;

use ipnet::IpNet;

use super::{Chain, CtState, Interface, Proto, Rule, RuleSet, Table, TableRules, Target};
use crate::core::redirect::{Family, KumaRedirect, Port, PortRange, Transport, UidRange};
use crate::kuma_comment;

pub const INBOUND: Chain = Chain("KUMA_MESH_INBOUND");
pub const OUTBOUND: Chain = Chain("KUMA_MESH_OUTBOUND");
pub const INBOUND_REDIRECT: Chain = Chain("KUMA_MESH_INBOUND_REDIRECT");
pub const OUTBOUND_REDIRECT: Chain = Chain("KUMA_MESH_OUTBOUND_REDIRECT");

/// Every chain Kuma's layout creates, in Kuma's order.
pub const CHAINS: [Chain; 4] = [INBOUND, OUTBOUND, INBOUND_REDIRECT, OUTBOUND_REDIRECT];

const DNS_PORT: PortRange = match Port::new(53) {
    Some(p) => PortRange::single_const(p),
    None => unreachable!(),
};

/// Kuma's LOG prefixes (they identify the hook in the kernel log).
const OUTPUT_LOG_PREFIX: &str = "OUTPUT:";
const PREROUTING_LOG_PREFIX: &str = "PREROUTING:";

/// The rules of one family's pass.
pub fn build(k: &KumaRedirect, family: Family) -> RuleSet {
    let mut tables = vec![TableRules { table: Table::Nat, chains: CHAINS.to_vec(), rules: nat(k, family) }];
    let raw = raw(k);
    if !raw.is_empty() {
        tables.push(TableRules { table: Table::Raw, chains: Vec::new(), rules: raw });
    }
    if k.drop_invalid_packets {
        let drop = Rule::new(Chain::PREROUTING, Target::Drop)
            .ctstate(CtState::Invalid)
            .comment(kuma_comment!("drop packets conntrack finds invalid"));
        tables.push(TableRules { table: Table::Mangle, chains: Vec::new(), rules: vec![drop] });
    }
    RuleSet { family, tables }
}

fn nat(k: &KumaRedirect, family: Family) -> Vec<Rule> {
    let uid = UidRange::single(k.proxy_uid);
    let loopback = family.loopback();
    let mut rules = Vec::new();

    // nat OUTPUT: logging, exclusions, DNS, then every TCP packet into KUMA_MESH_OUTBOUND.
    if let Some(level) = k.log_level {
        let log = Target::Log { prefix: OUTPUT_LOG_PREFIX, level };
        rules.push(Rule::new(Chain::OUTPUT, log).comment(kuma_comment!("log packets entering nat OUTPUT")));
    }
    for ex in &k.exclude_outbound_ports_for_uids {
        rules.push(
            Rule::new(Chain::OUTPUT, Target::Return)
                .dports(proto(ex.transport), ex.ports.clone())
                .uid_owner(ex.uids)
                .comment(kuma_comment!("outbound of excluded UIDs to excluded ports is not redirected")),
        );
    }
    for net in k.exclude_outbound_cidrs.of(family) {
        rules.push(
            Rule::new(Chain::OUTPUT, Target::Return)
                .destination(net)
                .comment(kuma_comment!("outbound to an excluded address is not redirected")),
        );
    }
    if let Some(dns) = k.dns {
        rules.push(
            Rule::new(Chain::OUTPUT, Target::Return)
                .dport(Proto::Udp, DNS_PORT)
                .uid_owner(uid)
                .comment(kuma_comment!("DNS queries of the proxy itself go out unchanged")),
        );
        rules.push(
            Rule::new(Chain::OUTPUT, Target::Return)
                .dport(Proto::Tcp, DNS_PORT)
                .not_uid_owner(uid)
                .comment(kuma_comment!("DNS over TCP of the application goes out unchanged")),
        );
        rules.push(
            Rule::new(Chain::OUTPUT, Target::Redirect(dns.port))
                .dport(Proto::Udp, DNS_PORT)
                .comment(kuma_comment!("DNS queries go to the DNS proxy of kuma-dp")),
        );
    }
    rules.push(
        Rule::new(Chain::OUTPUT, Target::Jump(OUTBOUND))
            .proto(Proto::Tcp)
            .comment(kuma_comment!("outbound TCP goes through KUMA_MESH_OUTBOUND")),
    );

    // nat PREROUTING: logging, then every TCP packet into KUMA_MESH_INBOUND.
    if let Some(level) = k.log_level {
        let log = Target::Log { prefix: PREROUTING_LOG_PREFIX, level };
        rules.push(Rule::new(Chain::PREROUTING, log).comment(kuma_comment!("log packets entering nat PREROUTING")));
    }
    rules.push(
        Rule::new(Chain::PREROUTING, Target::Jump(INBOUND))
            .proto(Proto::Tcp)
            .comment(kuma_comment!("inbound TCP goes through KUMA_MESH_INBOUND")),
    );

    // KUMA_MESH_INBOUND.
    match &k.inbound {
        None => rules.push(
            Rule::new(INBOUND, Target::Return).proto(Proto::Tcp).comment(kuma_comment!("inbound redirection is off")),
        ),
        Some(inbound) => {
            for net in inbound.exclude_cidrs.of(family) {
                rules.push(
                    Rule::new(INBOUND, Target::Return)
                        .source(net)
                        .comment(kuma_comment!("inbound from an excluded address is not redirected")),
                );
            }
            for port in &inbound.include_ports {
                rules.push(
                    Rule::new(INBOUND, Target::Jump(INBOUND_REDIRECT))
                        .dport(Proto::Tcp, PortRange::single(*port))
                        .comment(kuma_comment!("inbound to an included port is redirected")),
                );
            }
            if inbound.include_ports.is_empty() {
                for port in &inbound.exclude_ports {
                    rules.push(
                        Rule::new(INBOUND, Target::Return)
                            .dport(Proto::Tcp, PortRange::single(*port))
                            .comment(kuma_comment!("inbound to an excluded port is not redirected")),
                    );
                }
                rules.push(
                    Rule::new(INBOUND, Target::Jump(INBOUND_REDIRECT))
                        .proto(Proto::Tcp)
                        .comment(kuma_comment!("other inbound TCP is redirected")),
                );
            }
        }
    }

    // KUMA_MESH_OUTBOUND.
    match &k.outbound {
        None => rules.push(
            Rule::new(OUTBOUND, Target::Return).proto(Proto::Tcp).comment(kuma_comment!("outbound redirection is off")),
        ),
        Some(outbound) => {
            if outbound.include_ports.is_empty() {
                for port in &outbound.exclude_ports {
                    rules.push(
                        Rule::new(OUTBOUND, Target::Return)
                            .dport(Proto::Tcp, PortRange::single(*port))
                            .comment(kuma_comment!("outbound to an excluded port is not redirected")),
                    );
                }
            }
            rules.push(
                Rule::new(OUTBOUND, Target::Return)
                    .source(inbound_passthrough(family))
                    .out_interface(Interface::LOOPBACK)
                    .comment(kuma_comment!("inbound passthrough of the proxy to the application is not redirected")),
            );
            rules.push(
                Rule::new(OUTBOUND, Target::Jump(INBOUND_REDIRECT))
                    .not_destination(loopback)
                    .out_interface(Interface::LOOPBACK)
                    .proto(Proto::Tcp)
                    .uid_owner(uid)
                    .comment(kuma_comment!("the proxy calling its own pod address goes to the inbound listener")),
            );
            rules.push(
                Rule::new(OUTBOUND, Target::Return)
                    .out_interface(Interface::LOOPBACK)
                    .proto(Proto::Tcp)
                    .not_uid_owner(uid)
                    .comment(kuma_comment!("local traffic of the application is not redirected")),
            );
            rules.push(
                Rule::new(OUTBOUND, Target::Return)
                    .uid_owner(uid)
                    .comment(kuma_comment!("traffic of the proxy itself is not redirected")),
            );
            rules.push(
                Rule::new(OUTBOUND, Target::Return)
                    .destination(loopback)
                    .comment(kuma_comment!("traffic to the loopback address is not redirected")),
            );
            for port in &outbound.include_ports {
                rules.push(
                    Rule::new(OUTBOUND, Target::Jump(OUTBOUND_REDIRECT))
                        .dport(Proto::Tcp, PortRange::single(*port))
                        .comment(kuma_comment!("outbound to an included port is redirected")),
                );
            }
            if outbound.include_ports.is_empty() {
                rules.push(
                    Rule::new(OUTBOUND, Target::Jump(OUTBOUND_REDIRECT))
                        .comment(kuma_comment!("other outbound TCP is redirected")),
                );
            }
        }
    }

    rules.push(
        Rule::new(INBOUND_REDIRECT, Target::Redirect(k.inbound_port))
            .proto(Proto::Tcp)
            .comment(kuma_comment!("to the inbound listener of the proxy")),
    );
    rules.push(
        Rule::new(OUTBOUND_REDIRECT, Target::Redirect(k.outbound_port))
            .proto(Proto::Tcp)
            .comment(kuma_comment!("to the outbound listener of the proxy")),
    );
    rules
}

/// Conntrack zones for DNS: the proxy's queries upstream (zone 1) and its answers to the
/// application (zone 2) are different flows with the same addresses; without zones, conntrack
/// can merge them and answers get lost.
fn raw(k: &KumaRedirect) -> Vec<Rule> {
    let Some(dns) = k.dns.filter(|d| d.conntrack_zone_split) else { return Vec::new() };
    let uid = UidRange::single(k.proxy_uid);
    vec![
        Rule::new(Chain::OUTPUT, Target::CtZone(1))
            .dport(Proto::Udp, DNS_PORT)
            .uid_owner(uid)
            .comment(kuma_comment!("zone 1 for DNS queries of the proxy")),
        Rule::new(Chain::OUTPUT, Target::CtZone(2))
            .sport(Proto::Udp, PortRange::single(dns.port))
            .uid_owner(uid)
            .comment(kuma_comment!("zone 2 for answers of the DNS proxy")),
        Rule::new(Chain::OUTPUT, Target::CtZone(2))
            .dport(Proto::Udp, DNS_PORT)
            .comment(kuma_comment!("zone 2 for DNS queries of the application")),
        Rule::new(Chain::PREROUTING, Target::CtZone(1))
            .sport(Proto::Udp, DNS_PORT)
            .comment(kuma_comment!("zone 1 for DNS answers arriving")),
    ]
}

fn proto(t: Transport) -> Proto {
    match t {
        Transport::Tcp => Proto::Tcp,
        Transport::Udp => Proto::Udp,
    }
}

/// The source address of the proxy's inbound passthrough connections to the application.
fn inbound_passthrough(family: Family) -> IpNet {
    match family {
        Family::V4 => IpNet::from(IpAddr::from([127, 0, 0, 6])),
        Family::V6 => IpNet::from(IpAddr::from(crate::core::redirect::KUMA_INBOUND_PASSTHROUGH_V6)),
    }
}

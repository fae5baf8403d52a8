//! Consul's rule layout: the nat table only, with consul's chain names, so Consul's docs and
//! troubleshooting guides apply unchanged to a pod set up by tproxy-cni.
//!
//! Chain contents are in the order consul's own builder leaves them (it appends the defaults, then
//! inserts exclusions at the top one by one, so the exclusions end up in reverse order of the list).

use std::net::IpAddr;

use super::{Chain, Proto, Rule, RuleSet, Table, TableRules, Target};
use crate::core::redirect::{ConsulDns, ConsulRedirect, Family, Port, PortRange, UidRange};

pub const INBOUND: Chain = Chain("CONSUL_PROXY_INBOUND");
pub const IN_REDIRECT: Chain = Chain("CONSUL_PROXY_IN_REDIRECT");
pub const OUTPUT: Chain = Chain("CONSUL_PROXY_OUTPUT");
pub const REDIRECT: Chain = Chain("CONSUL_PROXY_REDIRECT");
pub const DNS_REDIRECT: Chain = Chain("CONSUL_DNS_REDIRECT");

/// Every chain consul's layout creates, always all five (the DNS chain even when DNS is off).
pub const CHAINS: [Chain; 5] = [INBOUND, IN_REDIRECT, OUTPUT, REDIRECT, DNS_REDIRECT];

const DNS_PORT: PortRange = match Port::new(53) {
    Some(p) => PortRange::single_const(p),
    None => unreachable!(),
};

/// The rules of one family's pass.
pub fn build(c: &ConsulRedirect, family: Family) -> RuleSet {
    let mut rules = Vec::new();

    // Port 53 jumps come first in OUTPUT so DNS over TCP is not caught by the catch-all below.
    // In dual-stack mode only the IPv6 pass carries DNS rules (the webhook points DNS at ::1).
    let dns_in_this_pass = (family == Family::V6) == c.dual_stack;
    if let Some(dns) = c.dns.filter(|_| dns_in_this_pass) {
        for proto in [Proto::Udp, Proto::Tcp] {
            let (to_dest, target) = match dns {
                ConsulDns::Port { ip, port } => {
                    let ip = ip.unwrap_or_else(|| loopback_addr(family));
                    (Some(ip), Target::DnatSocket(ip, port))
                }
                ConsulDns::All { ip } => (None, Target::DnatAddr(ip)),
            };
            let mut jump = Rule::new(Chain::OUTPUT, Target::Jump(DNS_REDIRECT)).dport(proto, DNS_PORT);
            let mut dnat = Rule::new(DNS_REDIRECT, target).dport(proto, DNS_PORT);
            if let Some(ip) = to_dest {
                jump = jump.destination(ip.into());
                dnat = dnat.destination(ip.into());
            }
            rules.push(jump);
            rules.push(dnat);
        }
    }
    rules.push(Rule::new(Chain::OUTPUT, Target::Jump(OUTPUT)).proto(Proto::Tcp));

    for uid in c.exclude_uids.iter().rev() {
        rules.push(Rule::new(OUTPUT, Target::Return).uid_owner(*uid));
    }
    for net in c.exclude_outbound_cidrs.of(family).into_iter().rev() {
        rules.push(Rule::new(OUTPUT, Target::Return).destination(net));
    }
    for ports in c.exclude_outbound_ports.iter().rev() {
        rules.push(Rule::new(OUTPUT, Target::Return).dport(Proto::Tcp, *ports));
    }
    rules.push(Rule::new(OUTPUT, Target::Return).uid_owner(UidRange::single(c.proxy_uid)));
    rules.push(Rule::new(OUTPUT, Target::Return).destination(family.loopback()));
    rules.push(Rule::new(OUTPUT, Target::Jump(REDIRECT)));
    rules.push(Rule::new(REDIRECT, Target::Redirect(c.outbound_port)).proto(Proto::Tcp));

    rules.push(Rule::new(Chain::PREROUTING, Target::Jump(INBOUND)).proto(Proto::Tcp));
    for ports in c.exclude_inbound_ports.iter().rev() {
        rules.push(Rule::new(INBOUND, Target::Return).dport(Proto::Tcp, *ports));
    }
    rules.push(Rule::new(INBOUND, Target::Jump(IN_REDIRECT)).proto(Proto::Tcp));
    rules.push(Rule::new(IN_REDIRECT, Target::Redirect(c.inbound_port)).proto(Proto::Tcp));

    RuleSet { family, tables: vec![TableRules { table: Table::Nat, chains: CHAINS.to_vec(), rules }] }
}

fn loopback_addr(family: Family) -> IpAddr {
    family.loopback().addr()
}

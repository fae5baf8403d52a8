//! Kuma's `[proto:][ports:]uids` exclusion entry (`excludePortsForUIDs` in the YAML,
//! `traffic.kuma.io/exclude-outbound-ports-for-uids` in the per-knob form): the outbound traffic
//! of some users, on some ports, that is not redirected.

use thiserror::Error;

use crate::core::redirect::{PortRange, Transport, UidPortExclusion, ValueError, parse_port_range, parse_uid_range};
use crate::text::Quoted;

/// Why an entry is not `[proto:][ports:]uids`; every message quotes the entry.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum UidPortError {
    #[error("{0} has more than three parts (expected [proto:][ports:]uids)")]
    Parts(Quoted),
    #[error("{entry}: protocol {protocol} is not tcp or udp")]
    Protocol { entry: Quoted, protocol: Quoted },
    #[error("{entry}: {source}")]
    Port {
        entry: Quoted,
        #[source]
        source: ValueError,
    },
    #[error("{0}: more than 15 ports (a range counts as two), the limit of one iptables rule")]
    TooManyPorts(Quoted),
    #[error("{0}: UIDs must be given, * is not allowed")]
    AnyUid(Quoted),
    #[error("{0}: give one UID or one first-last range, not a list")]
    UidList(Quoted),
    #[error("{entry}: {source}")]
    Uid {
        entry: Quoted,
        #[source]
        source: ValueError,
    },
}

/// One `[proto:][ports:]uids` entry: protocol `tcp`, `udp`, both comma-separated, or `*`/empty for
/// both; ports a comma-separated list of ports and `first-last` ranges, or `*`/empty for all; UIDs
/// one UID or a `first-last` range. Gives one exclusion per protocol.
pub fn parse_uid_port_exclusion(entry: &str) -> Result<Vec<UidPortExclusion>, UidPortError> {
    let quoted = || Quoted::new(entry);
    let parts: Vec<&str> = entry.trim_matches(' ').split(':').collect();
    let (protos, ports, uids) = match parts.as_slice() {
        [uids] => ("*", "*", *uids),
        [ports, uids] => ("*", *ports, *uids),
        [protos, ports, uids] => (*protos, *ports, *uids),
        _ => return Err(UidPortError::Parts(quoted())),
    };
    let transports = match protos.trim_matches(' ') {
        "" | "*" => vec![Transport::Tcp, Transport::Udp],
        list => list
            .split(',')
            .map(|p| match p.trim_matches(' ').to_ascii_lowercase().as_str() {
                "tcp" => Ok(Transport::Tcp),
                "udp" => Ok(Transport::Udp),
                _ => Err(UidPortError::Protocol { entry: quoted(), protocol: Quoted::new(p) }),
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
            .map(|p| {
                parse_port_range(p.trim_matches(' '), "port")
                    .map_err(|source| UidPortError::Port { entry: quoted(), source })
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    if ports.iter().map(|p| p.multiport_slots()).sum::<usize>() > 15 {
        return Err(UidPortError::TooManyPorts(quoted()));
    }
    let uids = match uids.trim_matches(' ') {
        "*" => return Err(UidPortError::AnyUid(quoted())),
        u if u.contains(',') => return Err(UidPortError::UidList(quoted())),
        u => parse_uid_range(u, "UID").map_err(|source| UidPortError::Uid { entry: quoted(), source })?,
    };
    Ok(transports.into_iter().map(|transport| UidPortExclusion { transport, ports: ports.clone(), uids }).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}

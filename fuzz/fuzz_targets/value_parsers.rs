//! The value parsers every annotation goes through: ports, port ranges, UIDs, UID ranges,
//! addresses, CIDRs, comma lists, Kuma's `[proto:][ports:]uids`, and `api_timeout` durations.
//!
//! The first byte chooses the parser; the rest is the text. An accepted value must print back in a
//! form that parses to the same value (that printed form is what reaches a rule); a refused one
//! gives a bounded one-line message.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tproxy_cni::core::mesh::kuma::parse_uid_port_exclusion;
use tproxy_cni::core::redirect::{
    Cidrs, Family, parse_cidr, parse_ip, parse_port, parse_port_range, parse_uid, parse_uid_range, split_list,
};
use tproxy_cni::plugin::config::parse_duration;
use tproxy_cni_fuzz::check_message;

fn round_trip<T: PartialEq + std::fmt::Debug + ToString, E: ToString>(
    parsed: Result<T, E>,
    parse: impl Fn(&str) -> Result<T, E>,
) -> Option<T> {
    match parsed {
        Ok(v) => {
            let printed = v.to_string();
            assert!(printed.bytes().all(|b| b.is_ascii_graphic()), "{printed:?}");
            match parse(&printed) {
                Ok(again) => assert_eq!(again, v, "{printed:?} parses back to another value"),
                Err(e) => panic!("{printed:?} does not parse back: {}", e.to_string()),
            }
            Some(v)
        }
        Err(e) => {
            check_message(&e.to_string());
            None
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    let Ok(s) = std::str::from_utf8(rest) else { return };
    match which % 9 {
        0 => {
            if let Some(p) = round_trip(parse_port(s, "port"), |t| parse_port(t, "port")) {
                assert!(p.get() >= 1);
            }
        }
        1 => {
            if let Some(r) = round_trip(parse_port_range(s, "ports"), |t| parse_port_range(t, "ports")) {
                let text = r.to_string();
                let (a, b) = text.split_once(':').unwrap_or((&text, &text));
                assert!(a.parse::<u16>().unwrap() <= b.parse::<u16>().unwrap() && a != "0");
            }
        }
        2 => {
            if let Some(u) = round_trip(parse_uid(s, "uid"), |t| parse_uid(t, "uid")) {
                assert!(u != u32::MAX, "the kernel's no-user is refused");
            }
        }
        3 => drop(round_trip(parse_uid_range(s, "uids"), |t| parse_uid_range(t, "uids"))),
        4 => drop(round_trip(parse_ip(s, "address"), |t| parse_ip(t, "address"))),
        5 => {
            if let Ok(net) = parse_cidr(s, "cidr") {
                // What reaches a rule is the network with its host bits cleared, in its family.
                let mut c = Cidrs::default();
                c.push(net);
                let family = if net.addr().is_ipv4() { Family::V4 } else { Family::V6 };
                let other = if family == Family::V4 { Family::V6 } else { Family::V4 };
                let stored = c.of(family);
                assert_eq!(stored.len(), 1);
                assert!(c.of(other).is_empty(), "a CIDR lands in its own family only");
                assert_eq!(parse_cidr(&stored[0].to_string(), "cidr").unwrap(), stored[0]);
                assert_eq!(stored[0].trunc(), stored[0]);
            } else if let Err(e) = parse_cidr(s, "cidr") {
                check_message(&e.to_string());
            }
        }
        6 => {
            for entry in split_list(s) {
                assert!(!entry.is_empty() && !entry.contains(',') && !entry.starts_with(' ') && !entry.ends_with(' '));
            }
        }
        7 => match parse_uid_port_exclusion(s) {
            Ok(exclusions) => {
                assert!(matches!(exclusions.len(), 1 | 2), "one exclusion per protocol");
                for ex in &exclusions {
                    let slots: usize = ex.ports.iter().map(|p| p.multiport_slots()).sum();
                    assert!((1..=15).contains(&slots), "{slots} multiport slots");
                }
            }
            Err(e) => check_message(&e.to_string()),
        },
        _ => match parse_duration(s) {
            Ok(d) => assert!(d.as_secs_f64() < 1e12),
            Err(e) => check_message(e),
        },
    }
});

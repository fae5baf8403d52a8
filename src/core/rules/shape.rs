//! The allow-list of rule shapes: an independent reader of `iptables-restore` text that accepts
//! only what tproxy-cni may ever install.
//!
//! The renderer (`Rule::spec`) builds text from typed values; this module reads that text back with
//! no help from the renderer's types and refuses anything outside a closed grammar: the three tables
//! we use, the built-in chains we hook and the meshes' chain names, a fixed vocabulary of options
//! and targets, and values that are canonical numbers and addresses of the pass's family. Any word
//! that is neither a keyword nor a value re-printed from its parsed form is refused, so text from
//! an annotation cannot hide in a rule. The fuzz targets and the adversarial tests hold every
//! rendered transaction to it; it is not on the plugin's path.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::core::redirect::Family;

/// The chains a transaction may create: the meshes' names, written out here rather than taken
/// from the rule builders, so this check does not trust what it checks.
const MESH_CHAINS: [&str; 9] = [
    "CONSUL_PROXY_INBOUND",
    "CONSUL_PROXY_IN_REDIRECT",
    "CONSUL_PROXY_OUTPUT",
    "CONSUL_PROXY_REDIRECT",
    "CONSUL_DNS_REDIRECT",
    "KUMA_MESH_INBOUND",
    "KUMA_MESH_OUTBOUND",
    "KUMA_MESH_INBOUND_REDIRECT",
    "KUMA_MESH_OUTBOUND_REDIRECT",
];

/// The built-in chains we hook, per table.
fn builtin(table: &str, chain: &str) -> bool {
    matches!((table, chain), ("nat" | "raw" | "mangle", "PREROUTING" | "OUTPUT"))
}

/// The ownership comments: ours, or Kuma's prefix followed by plain words.
const OWNER_COMMENT: &str = "tproxy-cni";
const KUMA_PREFIX: &str = "kuma/mesh/transparent/proxy/";

/// What an accepted transaction holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Tables in the order they are committed.
    pub tables: Vec<String>,
    /// `-A` lines.
    pub rules: usize,
}

/// Why a text is not an allowed transaction: the line (1-based) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeError {
    pub line: usize,
    pub reason: String,
}

impl fmt::Display for ShapeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

impl std::error::Error for ShapeError {}

/// Checks one family's restore transaction (as `render_fresh` writes it) against the allow-list.
pub fn check(text: &str, family: Family) -> Result<Summary, ShapeError> {
    let mut summary = Summary::default();
    let mut table: Option<(String, BTreeSet<String>)> = None;
    let mut seen_rule = false;
    if !text.is_empty() && !text.ends_with('\n') {
        return Err(ShapeError { line: text.lines().count(), reason: "the text does not end with a newline".into() });
    }
    for (i, line) in text.split_terminator('\n').enumerate() {
        let n = i + 1;
        let fail = |reason: String| ShapeError { line: n, reason };
        if line.bytes().any(|b| !(b.is_ascii_graphic() || b == b' ')) {
            return Err(fail(format!("{line:?} has a byte that is not printable ASCII")));
        }
        if let Some(name) = line.strip_prefix('*') {
            if table.is_some() {
                return Err(fail(format!("table {name:?} starts before the previous one is committed")));
            }
            if !matches!(name, "nat" | "raw" | "mangle") {
                return Err(fail(format!("table {name:?} is not one of nat, raw, mangle")));
            }
            if summary.tables.iter().any(|t| t == name) {
                return Err(fail(format!("table {name} appears twice")));
            }
            summary.tables.push(name.to_owned());
            table = Some((name.to_owned(), BTreeSet::new()));
            seen_rule = false;
            continue;
        }
        let Some((name, created)) = table.as_mut() else {
            return Err(fail(format!("{line:?} is outside a table")));
        };
        if line == "COMMIT" {
            table = None;
            continue;
        }
        if let Some(chain) = line.strip_prefix("-N ") {
            if seen_rule {
                return Err(fail("a chain is created after the first rule".into()));
            }
            if name != "nat" || !MESH_CHAINS.contains(&chain) {
                return Err(fail(format!("chain {chain:?} may not be created in table {name}")));
            }
            if !created.insert(chain.to_owned()) {
                return Err(fail(format!("chain {chain} is created twice")));
            }
            continue;
        }
        let Some(rest) = line.strip_prefix("-A ") else {
            return Err(fail(format!("{line:?} is not -N, -A or COMMIT")));
        };
        seen_rule = true;
        let (chain, spec) = rest.split_once(' ').ok_or_else(|| fail("a rule has no specification".into()))?;
        if !builtin(name, chain) && !created.contains(chain) {
            return Err(fail(format!("rule in chain {chain:?}, which is neither hooked nor created in {name}")));
        }
        rule(name, chain, created, spec, family).map_err(fail)?;
        summary.rules += 1;
    }
    if let Some((name, _)) = table {
        return Err(ShapeError { line: text.lines().count(), reason: format!("table {name} is not committed") });
    }
    Ok(summary)
}

/// Splits a specification into words; a double-quoted word may hold spaces (no escapes: none of
/// the allowed words needs one).
fn words(spec: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let mut rest = spec;
    while !rest.is_empty() {
        if let Some(q) = rest.strip_prefix('"') {
            let end = q.find('"').ok_or("an unterminated quote")?;
            out.push(&rest[..end + 2]);
            rest = &q[end + 1..];
        } else {
            let end = rest.find(' ').unwrap_or(rest.len());
            out.push(&rest[..end]);
            rest = &rest[end..];
        }
        match rest.strip_prefix(' ') {
            Some(r) if !r.is_empty() && !r.starts_with(' ') => rest = r,
            None if rest.is_empty() => {}
            _ => return Err("words are not separated by exactly one space".into()),
        }
    }
    Ok(out)
}

/// Checks one rule specification.
fn rule(table: &str, chain: &str, created: &BTreeSet<String>, spec: &str, family: Family) -> Result<(), String> {
    let words = words(spec)?;
    let mut it = words.iter().copied().peekable();
    let mut modules: Vec<&str> = Vec::new();
    let mut proto: Option<&str> = None;
    let mut options: BTreeSet<&str> = BTreeSet::new();
    let mut comment = false;
    while let Some(w) = it.next() {
        let negated = w == "!";
        let opt = if negated { it.next().ok_or("a ! at the end")? } else { w };
        if opt == "-j" {
            if negated {
                return Err("-j cannot be negated".into());
            }
            if !comment {
                return Err("the rule carries no ownership comment".into());
            }
            let rest: Vec<&str> = it.collect();
            return target(table, chain, created, &rest, family);
        }
        if opt != "-m" && !options.insert(opt) {
            return Err(format!("option {opt} appears twice"));
        }
        if negated && !matches!(opt, "-d" | "--dport" | "--uid-owner") {
            return Err(format!("option {opt} cannot be negated"));
        }
        let mut value = || it.next().ok_or_else(|| format!("option {opt} has no value"));
        match opt {
            "-s" | "-d" => network(value()?, family)?,
            "-i" | "-o" => {
                let v = value()?;
                if v != "lo" {
                    return Err(format!("interface {v:?} is not lo"));
                }
            }
            "-p" => {
                let v = value()?;
                if !matches!(v, "tcp" | "udp") {
                    return Err(format!("protocol {v:?} is not tcp or udp"));
                }
                proto = Some(v);
            }
            "-m" => {
                let v = value()?;
                let ok = match v {
                    "tcp" | "udp" => proto == Some(v),
                    "multiport" => proto.is_some(),
                    "owner" | "conntrack" | "comment" => true,
                    _ => false,
                };
                if !ok || modules.contains(&v) {
                    return Err(format!("match module {v:?} is not allowed here"));
                }
                modules.push(v);
            }
            "--sport" | "--dport" => {
                if !proto.is_some_and(|p| modules.contains(&p)) {
                    return Err(format!("{opt} without -p and -m of that protocol"));
                }
                port_range(value()?)?;
            }
            "--dports" => {
                if !modules.contains(&"multiport") {
                    return Err("--dports without -m multiport".into());
                }
                let mut slots = 0;
                for p in value()?.split(',') {
                    slots += if port_range(p)? { 2 } else { 1 };
                }
                if slots > 15 {
                    return Err(format!("--dports takes {slots} slots, more than 15"));
                }
            }
            "--uid-owner" => {
                if !modules.contains(&"owner") {
                    return Err("--uid-owner without -m owner".into());
                }
                uid_range(value()?)?;
            }
            "--ctstate" => {
                if !modules.contains(&"conntrack") || value()? != "INVALID" {
                    return Err("only -m conntrack --ctstate INVALID is allowed".into());
                }
            }
            "--comment" => {
                if !modules.contains(&"comment") {
                    return Err("--comment without -m comment".into());
                }
                owner_comment(value()?)?;
                comment = true;
            }
            _ => return Err(format!("option {opt:?} is not allowed")),
        }
    }
    Err("the rule has no target (-j)".into())
}

/// Checks a `-j` target and its arguments.
fn target(table: &str, chain: &str, created: &BTreeSet<String>, args: &[&str], family: Family) -> Result<(), String> {
    let hooked = |c: &str| builtin(table, c) || created.contains(c);
    match args {
        // The caller has checked that the rule's own chain is hooked or created.
        ["RETURN"] => Ok(()),
        ["DROP"] if table == "mangle" => Ok(()),
        ["REDIRECT", "--to-ports", p] if table == "nat" => port(p).map(drop),
        ["DNAT", "--to-destination", d] if table == "nat" => dnat(d, family),
        ["CT", "--zone", z] if table == "raw" => {
            let zone = number(z, u64::from(u16::MAX)).map_err(|e| format!("zone {e}"))?;
            if zone == 0 { Err("zone 0 is the default zone, not a split".into()) } else { Ok(()) }
        }
        ["LOG", "--log-prefix", prefix, "--log-level", level] => {
            if !matches!(*prefix, "\"OUTPUT:\"" | "\"PREROUTING:\"") {
                return Err(format!("log prefix {prefix:?} is not allowed"));
            }
            number(level, 7).map(drop).map_err(|e| format!("log level {e}"))
        }
        [c] if MESH_CHAINS.contains(c) => {
            if hooked(c) && *c != chain {
                Ok(())
            } else {
                Err(format!("jump to {c}, which this table does not create (or to itself)"))
            }
        }
        _ => Err(format!("target {:?} is not allowed in table {table}", args.join(" "))),
    }
}

/// A decimal number with no sign, no leading zero and no more than `max`.
fn number(s: &str, max: u64) -> Result<u64, String> {
    let canonical = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    match s.parse::<u64>() {
        Ok(n) if canonical && n <= max => Ok(n),
        _ => Err(format!("{s:?} is not a canonical number up to {max}")),
    }
}

/// A port 1-65535.
fn port(s: &str) -> Result<u64, String> {
    match number(s, 65535)? {
        0 => Err("port 0".into()),
        n => Ok(n),
    }
}

/// A port or a `first:last` range; returns whether it is a range.
fn port_range(s: &str) -> Result<bool, String> {
    match s.split_once(':') {
        None => port(s).map(|_| false),
        Some((a, b)) => {
            if port(a)? >= port(b)? {
                return Err(format!("port range {s:?} is empty or reversed"));
            }
            Ok(true)
        }
    }
}

/// A UID or `first-last` range, 0-4294967294.
fn uid_range(s: &str) -> Result<(), String> {
    const MAX: u64 = u32::MAX as u64 - 1;
    match s.split_once('-') {
        None => number(s, MAX).map(drop),
        Some((a, b)) if number(a, MAX)? < number(b, MAX)? => Ok(()),
        Some(_) => Err(format!("UID range {s:?} is empty or reversed")),
    }
}

/// A network of the pass's family, written exactly as it prints after parsing, host bits clear.
fn network(s: &str, family: Family) -> Result<(), String> {
    let net: IpNet = s.parse().map_err(|_| format!("{s:?} is not a network"))?;
    if net.trunc() != net || net.to_string() != s {
        return Err(format!("network {s:?} is not in canonical form"));
    }
    if Family::of(net.addr()) != family {
        return Err(format!("network {s} is not {}", family.name()));
    }
    Ok(())
}

/// DNAT's `--to-destination`: an address, or `addr:port` (`[addr]:port` for IPv6), of the family.
fn dnat(s: &str, family: Family) -> Result<(), String> {
    let (addr, port_text) = match (family, s.strip_prefix('[')) {
        (Family::V6, Some(rest)) => {
            let (a, p) = rest.split_once("]:").ok_or_else(|| format!("{s:?} is not [address]:port"))?;
            (a, Some(p))
        }
        (Family::V4, None) => match s.split_once(':') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        },
        _ => (s, None),
    };
    let ip: IpAddr = addr.parse().map_err(|_| format!("DNAT address {addr:?} is not an address"))?;
    if ip.to_string() != addr || Family::of(ip) != family {
        return Err(format!("DNAT address {addr:?} is not a canonical {} address", family.name()));
    }
    port_text.map_or(Ok(()), |p| port(p).map(drop))
}

/// `tproxy-cni`, or Kuma's prefix and a description of letters, digits, spaces and `_ . / : -`
/// (quoted, as `iptables-save` quotes anything but letters, digits, `_` and `-`).
fn owner_comment(w: &str) -> Result<(), String> {
    if w == OWNER_COMMENT {
        return Ok(());
    }
    let inner = w.strip_prefix('"').and_then(|w| w.strip_suffix('"')).unwrap_or_default();
    let text = inner.strip_prefix(KUMA_PREFIX).unwrap_or_default();
    let plain = |b: u8| b.is_ascii_alphanumeric() || b" _./:-".contains(&b);
    if text.is_empty() || !text.bytes().all(plain) || text.starts_with(' ') || text.ends_with(' ') {
        return Err(format!("comment {w:?} is not an ownership comment"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "*nat\n-N CONSUL_PROXY_OUTPUT\n-N CONSUL_PROXY_REDIRECT\n\
        -A OUTPUT -p tcp -m comment --comment tproxy-cni -j CONSUL_PROXY_OUTPUT\n\
        -A CONSUL_PROXY_OUTPUT ! -d 192.0.2.0/24 -p tcp -m tcp --dport 8000:9000 -m owner ! --uid-owner 10-20 -m comment --comment tproxy-cni -j RETURN\n\
        -A CONSUL_PROXY_OUTPUT -m comment --comment tproxy-cni -j CONSUL_PROXY_REDIRECT\n\
        -A CONSUL_PROXY_REDIRECT -p tcp -m comment --comment tproxy-cni -j REDIRECT --to-ports 15001\n\
        -A OUTPUT -d 127.0.0.1/32 -p udp -m udp --dport 53 -m comment --comment tproxy-cni -j DNAT --to-destination 127.0.0.1:8600\n\
        COMMIT\n\
        *raw\n-A OUTPUT -p udp -m udp --sport 15053 -m owner --uid-owner 5678 -m comment --comment \"kuma/mesh/transparent/proxy/zone 2\" -j CT --zone 2\nCOMMIT\n\
        *mangle\n-A PREROUTING -m conntrack --ctstate INVALID -m comment --comment \"kuma/mesh/transparent/proxy/drop\" -j DROP\nCOMMIT\n";

    #[test]
    fn accepts_every_allowed_shape() {
        let s = check(GOOD, Family::V4).unwrap();
        assert_eq!(s.tables, ["nat", "raw", "mangle"]);
        assert_eq!(s.rules, 7);
    }

    #[test]
    fn refuses_whatever_is_outside_the_allow_list() {
        let rule = |spec: &str| format!("*nat\n-N CONSUL_PROXY_OUTPUT\n-A CONSUL_PROXY_OUTPUT {spec}\nCOMMIT\n");
        let c = "-m comment --comment tproxy-cni";
        let cases = [
            ("*filter\n-A INPUT -j ACCEPT\nCOMMIT\n".to_owned(), "table \"filter\""),
            ("*nat\n-N EVIL\nCOMMIT\n".to_owned(), "may not be created"),
            ("*nat\n-A POSTROUTING -j RETURN\nCOMMIT\n".to_owned(), "neither hooked nor created"),
            ("*nat\n-F OUTPUT\nCOMMIT\n".to_owned(), "is not -N, -A or COMMIT"),
            ("*nat\n-A OUTPUT -m comment --comment tproxy-cni -j RETURN\n".to_owned(), "not committed"),
            (rule(&format!("{c} -j ACCEPT")), "target \"ACCEPT\""),
            (rule("-j RETURN"), "no ownership comment"),
            (rule("-m comment --comment \"tproxy-cni evil\" -j RETURN"), "not an ownership comment"),
            (rule(&format!("-d 10.0.0.1/8 {c} -j RETURN")), "canonical form"),
            (rule(&format!("-d 2001:db8::/32 {c} -j RETURN")), "is not ipv4"),
            (rule(&format!("-p tcp -m tcp --dport 080 {c} -j RETURN")), "canonical number"),
            (rule(&format!("-p tcp -m tcp --dport 0 {c} -j RETURN")), "port 0"),
            (rule(&format!("-p tcp -m tcp --dport 65536 {c} -j RETURN")), "canonical number"),
            (rule(&format!("-p tcp --dport 80 {c} -j RETURN")), "without -p and -m"),
            (rule(&format!("-m owner --uid-owner 4294967295 {c} -j RETURN")), "canonical number"),
            (rule(&format!("-p icmp {c} -j RETURN")), "not tcp or udp"),
            (rule(&format!("-i eth0 {c} -j RETURN")), "not lo"),
            (rule(&format!("! -s 10.0.0.0/8 {c} -j RETURN")), "cannot be negated"),
            (rule(&format!("{c} -j REDIRECT --to-ports 80 --random")), "target"),
            (rule(&format!("{c} -j DNAT --to-destination [::1]:53")), "not an address"),
            (rule(&format!("{c} -j CONSUL_PROXY_OUTPUT")), "or to itself"),
            (rule(&format!("{c}  -j RETURN")), "exactly one space"),
            (rule(&format!("{c} -j RETURN\n-A OUTPUT -j ACCEPT")), "line 4: the rule carries no ownership comment"),
            (rule(&format!("{c} -j RETURN\r")), "printable ASCII"),
            (
                rule(&format!(
                    "-p tcp -m tcp -m multiport --dports 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16 {c} -j RETURN"
                )),
                "more than 15",
            ),
        ];
        for (text, want) in cases {
            let e = check(&text, Family::V4).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn ipv6_passes_want_ipv6_values() {
        let t = "*nat\n-A OUTPUT -d ::1/128 -p udp -m udp --dport 53 -m comment --comment tproxy-cni -j DNAT --to-destination [::1]:8600\nCOMMIT\n";
        assert!(check(t, Family::V6).is_ok());
        assert!(check(t, Family::V4).is_err());
    }
}

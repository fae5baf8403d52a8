//! Harness of the hardening tests (random lifecycles, crash consistency, concurrency): mesh
//! configurations to install, calls of the plugin binary, and an independent reading of what of
//! ours a namespace holds, compared with what the configuration must give, for each engine.
//!
//! For the iptables engine "ours" is decided here without the plugin's own classification: a
//! chain is ours when it has a mesh's chain name, a rule when it sits in such a chain, jumps to
//! one, or carries our comment or Kuma's. Expected rules come from the library's pure rule builder
//! (`rules::build`), whose output the golden tests pin. For the nftables engine ours are the
//! `tproxy-cni` tables as `nft` lists them, expected to equal what `nft -f` makes of
//! `render --backend nftables` (pinned by the golden `.nft` files); everything else `nft` lists is
//! foreign and must stay as it was, handles included.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};
use tproxy_cni::core::mesh::{self, Annotations, PodNetwork};
use tproxy_cni::core::redirect::Family;
use tproxy_cni::core::rules;

use super::{Engine, Fam, Netns, consul_pod, in_netns, kuma_pod, nft_reference, zero_counters};

/// A mesh configuration a pod can carry.
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: &'static str,
    pub mesh: &'static str,
    pub annotations: Value,
}

/// A few configurations per mesh that differ in ports, exclusions, tables (Kuma's YAML one uses
/// nat, raw and mangle) and form (JSON, YAML, per-knob annotations).
pub fn specs() -> Vec<Spec> {
    vec![
        Spec {
            name: "consul-dns",
            mesh: "consul",
            annotations: consul_pod(
                json!({"ConsulDNSIP": "127.0.0.1", "ConsulDNSPort": 8600, "ProxyUserID": "5995",
                    "ProxyInboundPort": 20000, "ProxyOutboundPort": 15001, "ExcludeInboundPorts": ["9090"],
                    "ExcludeOutboundPorts": ["5432"], "ExcludeOutboundCIDRs": ["192.0.2.0/24", "2001:db8::/32"],
                    "ExcludeUIDs": ["5996"]}),
                &[],
            ),
        },
        Spec {
            name: "consul-plain",
            mesh: "consul",
            annotations: consul_pod(
                json!({"ProxyUserID": "6000", "ProxyInboundPort": 21000,
                    "ExcludeInboundPorts": ["8080", "9000-9100"], "ExcludeUIDs": ["1000-1999"]}),
                &[],
            ),
        },
        Spec {
            name: "kuma-yaml",
            mesh: "kuma",
            annotations: kuma_pod(
                Some(
                    "cniMode: true\nredirect:\n  outbound: {excludePorts: [5432]}\n  \
                     dns: {enabled: true, port: 15053, captureAll: true}\ndropInvalidPackets: true\n",
                ),
                &[],
            ),
        },
        Spec {
            name: "kuma-legacy",
            mesh: "kuma",
            annotations: kuma_pod(
                None,
                &[
                    ("traffic.kuma.io/exclude-outbound-ports-for-uids", "tcp:22,8000-8010:1000-2000;udp:53:42"),
                    ("traffic.kuma.io/exclude-outbound-ips", "198.51.100.0/24,fd99::/16"),
                    ("kuma.io/transparent-proxying-inbound-port", "16006"),
                ],
            ),
        },
    ]
}

/// A configuration of `mesh` that the dialect refuses (code 100).
pub fn invalid(mesh: &str) -> Value {
    match mesh {
        "consul" => consul_pod(json!({"ProxyUserID": "5995", "ProxyInboundPort": 70000}), &[]),
        _ => kuma_pod(Some("redirect: ["), &[]),
    }
}

/// The previous plugin's result: IPv4, and IPv6 too when `v6`.
pub fn prev_result(v6: bool) -> Value {
    let mut ips = vec![json!({"address": "198.18.0.9/24"})];
    if v6 {
        ips.push(json!({"address": "fd18::9/64"}));
    }
    json!({"cniVersion": "1.0.0", "ips": ips})
}

/// The network configuration the runtime hands the plugin as the last link of a chain, with the
/// engine chosen by `engine_conf` (an [`Engine::conf`](super::Engine::conf)).
pub fn stdin_with(engine_conf: Value, annotations: &Value, prev: &Value) -> String {
    let mut conf = json!({"cniVersion": "1.0.0", "name": "harden", "type": "tproxy-cni",
        "prevResult": prev, "runtimeConfig": {"io.kubernetes.cri.pod-annotations": annotations}});
    for (k, v) in engine_conf.as_object().expect("engine keys").clone() {
        conf[k] = v;
    }
    conf.to_string()
}

/// The CNI environment of one call.
pub fn env<'a>(command: &'a str, netns: &'a str, container_id: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", container_id),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/usr/lib/cni"),
        ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=harden"),
    ]
}

/// A plugin process started but not waited for (stdin written and closed), in a process group of
/// its own so a test can kill it with everything it started.
pub fn spawn_plugin(command: &str, netns: &str, container_id: &str, stdin: &str) -> std::process::Child {
    use std::io::Write as _;
    use std::os::unix::process::CommandExt as _;
    let mut child = Command::new(super::plugin())
        .env_clear()
        .envs(env(command, netns, container_id))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child
}

/// The CNI error code of a failed call (panics unless stdout is one error document).
pub fn code_of(out: &Output) -> u64 {
    let doc: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: stdout {:?}", String::from_utf8_lossy(&out.stdout)));
    doc["code"].as_u64().unwrap_or_else(|| panic!("no code: {doc}"))
}

/// What of ours one family holds: chain declarations and rules per (table, chain), in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ours {
    pub chains: BTreeSet<(String, String)>,
    pub rules: BTreeMap<(String, String), Vec<String>>,
}

impl Ours {
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.rules.is_empty()
    }
}

const OUR_CHAIN_PREFIXES: [&str; 3] = ["CONSUL_PROXY_", "CONSUL_DNS_REDIRECT", "KUMA_MESH_"];

fn our_chain(name: &str) -> bool {
    OUR_CHAIN_PREFIXES.iter().any(|p| name.starts_with(p))
}

fn our_rule(chain: &str, spec: &str) -> bool {
    our_chain(chain)
        || spec.contains("--comment tproxy-cni")
        || spec.contains("--comment \"kuma/mesh/transparent/proxy/")
        || spec.split(" -j ").nth(1).is_some_and(|t| our_chain(t.split(' ').next().unwrap_or_default()))
}

/// `iptables-save` of one family, run from a thread inside the namespace (no `ip netns exec`).
pub fn save(ns: &Netns, fam: Fam, backend: &str) -> String {
    let tool = format!("/usr/sbin/{}-{backend}-save", fam.tool());
    let out = in_netns(ns, None, || Command::new(&tool).stdin(Stdio::null()).output()).unwrap();
    assert!(out.status.success(), "{tool}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Splits a save dump into ours and the foreign rules (`table -A chain spec`).
pub fn read(dump: &str) -> (Ours, Vec<String>) {
    let (mut ours, mut foreign) = (Ours::default(), Vec::new());
    let mut table = String::new();
    for line in dump.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.to_owned();
        } else if let Some(decl) = line.strip_prefix(':') {
            let chain = decl.split(' ').next().unwrap_or_default();
            if our_chain(chain) {
                ours.chains.insert((table.clone(), chain.to_owned()));
            }
        } else if let Some((chain, spec)) = line.strip_prefix("-A ").and_then(|r| r.split_once(' ')) {
            if our_rule(chain, spec) {
                ours.rules.entry((table.clone(), chain.to_owned())).or_default().push(spec.to_owned());
            } else {
                foreign.push(format!("{table} -A {chain} {spec}"));
            }
        }
    }
    (ours, foreign)
}

/// What of ours the namespace holds, per family.
pub fn ours(ns: &Netns, backend: &str) -> BTreeMap<Fam, Ours> {
    [Fam::V4, Fam::V6].into_iter().map(|f| (f, read(&save(ns, f, backend)).0)).collect()
}

/// What `annotations` must give in a namespace whose previous result has IPv6 when `v6` (and no
/// other IPv6 address than the ones ADD itself adds), per family; empty when not a mesh pod.
pub fn expected(annotations: &Value, v6: bool) -> BTreeMap<Fam, Ours> {
    let a: Annotations =
        annotations.as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned())).collect();
    let mut out: BTreeMap<Fam, Ours> = [(Fam::V4, Ours::default()), (Fam::V6, Ours::default())].into();
    let Some(redirect) = mesh::classify(&a, PodNetwork { has_ipv6: v6 }).unwrap() else { return out };
    for set in rules::build(&redirect) {
        let fam = if set.family == Family::V4 { Fam::V4 } else { Fam::V6 };
        let o = out.get_mut(&fam).unwrap();
        for t in &set.tables {
            for c in &t.chains {
                o.chains.insert((t.table.name().to_owned(), c.0.to_owned()));
            }
            for r in &t.rules {
                o.rules.entry((t.table.name().to_owned(), r.chain.0.to_owned())).or_default().push(r.spec());
            }
        }
    }
    out
}

/// The same table's part of two `Ours`.
pub fn table_part(o: &Ours, table: &str) -> Ours {
    Ours {
        chains: o.chains.iter().filter(|(t, _)| t == table).cloned().collect(),
        rules: o.rules.iter().filter(|((t, _), _)| t == table).map(|(k, v)| (k.clone(), v.clone())).collect(),
    }
}

/// Foreign rules in nat, raw and mangle of both families, to be found intact after anything we do.
pub const CANARY: &str = "*nat\n:CANARY - [0:0]\n-A OUTPUT -p tcp -m tcp --dport 9999 -j CANARY\n-A CANARY -j RETURN\nCOMMIT\n\
*raw\n-A OUTPUT -p udp -m udp --dport 9999 -j ACCEPT\nCOMMIT\n\
*mangle\n-A PREROUTING -p tcp -m tcp --dport 9999 -j ACCEPT\nCOMMIT\n";

/// The canary's rules as [`read`] reports foreign rules.
pub fn canary_rules() -> Vec<String> {
    vec![
        "nat -A OUTPUT -p tcp -m tcp --dport 9999 -j CANARY".into(),
        "nat -A CANARY -j RETURN".into(),
        "raw -A OUTPUT -p udp -m udp --dport 9999 -j ACCEPT".into(),
        "mangle -A PREROUTING -p tcp -m tcp --dport 9999 -j ACCEPT".into(),
    ]
}

/// Plants the canary in both families.
pub fn plant_canary(ns: &Netns, backend: &str) {
    ns.plant(backend, CANARY);
}

/// The foreign rules of both families, sorted (to compare with the canary).
pub fn foreign(ns: &Netns, backend: &str) -> BTreeMap<Fam, Vec<String>> {
    [Fam::V4, Fam::V6]
        .into_iter()
        .map(|f| {
            let mut v = read(&save(ns, f, backend)).1;
            v.sort();
            (f, v)
        })
        .collect()
}

/// What of ours the namespace holds and its foreign rules (sorted), per family, from one save each.
pub fn state(ns: &Netns, backend: &str) -> (BTreeMap<Fam, Ours>, BTreeMap<Fam, Vec<String>>) {
    let (mut ours, mut foreign) = (BTreeMap::new(), BTreeMap::new());
    for f in [Fam::V4, Fam::V6] {
        let (o, mut v) = read(&save(ns, f, backend));
        v.sort();
        ours.insert(f, o);
        foreign.insert(f, v);
    }
    (ours, foreign)
}

/// The engines the hardening tests spread their runs over: the iptables engine with each backend,
/// and the nftables engine.
pub const ENGINES: [Engine; 3] = [Engine::Iptables("nft"), Engine::Iptables("legacy"), Engine::Nftables];

/// What of ours a namespace holds, as one engine's tests compare it: for the iptables engine our
/// chains and rules per family ([`ours`]), for the nftables engine our `tproxy-cni` tables of both
/// families as `nft list table` prints them, counters zeroed ([`super::nft_tables`]; empty: none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    Iptables(BTreeMap<Fam, Ours>),
    Nftables(String),
}

impl Held {
    /// Nothing of ours.
    pub fn nothing(engine: Engine) -> Held {
        match engine {
            Engine::Iptables(_) => Held::Iptables(expected(&json!({}), false)),
            Engine::Nftables => Held::Nftables(String::new()),
        }
    }

    pub fn is_nothing(&self) -> bool {
        match self {
            Held::Iptables(o) => o.values().all(Ours::is_empty),
            Held::Nftables(t) => t.is_empty(),
        }
    }
}

/// What of ours `ns` holds now, read the way `engine`'s tests compare it.
pub fn held(engine: Engine, ns: &Netns) -> Held {
    held_and_foreign(engine, ns).0
}

/// What a configuration must give on each engine, the nftables engine's reference made once per
/// configuration (it costs a namespace, a render and an `nft -f`).
#[derive(Default)]
pub struct Wanted {
    nft: HashMap<String, String>,
}

impl Wanted {
    /// What `annotations` must give on `engine` for a pod with IPv6 when `v6`.
    pub fn get(&mut self, engine: Engine, annotations: &Value, v6: bool) -> Held {
        let iptables = expected(annotations, v6);
        match engine {
            Engine::Iptables(_) => Held::Iptables(iptables),
            // A pod in no mesh: no table (`render` would print an empty script).
            Engine::Nftables if iptables.values().all(Ours::is_empty) => Held::Nftables(String::new()),
            Engine::Nftables => Held::Nftables(
                self.nft.entry(format!("{annotations} {v6}")).or_insert_with(|| nft_reference(annotations, v6)).clone(),
            ),
        }
    }
}

/// A foreign nftables table of another program, planted for the nftables engine beside the
/// iptables canary: a set, a base chain on a hook our chains use, a rule.
pub const NFT_CANARY: &str = "table inet canary {\n\
    \tset blocked { type ipv4_addr; flags interval; elements = { 203.0.113.0/24 }; }\n\
    \tchain out {\n\
    \t\ttype filter hook output priority 0; policy accept;\n\
    \t\tip daddr @blocked counter return comment \"theirs\"\n\
    \t}\n\
    }\n";

/// Runs `nft` with `args` (and `script` on its stdin) from a thread inside `ns`, panicking if it
/// fails; its stdout.
pub fn nft_in(ns: &Netns, args: &[&str], script: Option<&str>) -> String {
    use std::io::Write as _;
    let out = in_netns(ns, None, || {
        let mut child = Command::new("/usr/sbin/nft")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(script.unwrap_or_default().as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    });
    assert!(out.status.success(), "nft {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Plants the foreign canaries `engine`'s tests watch: the iptables [`CANARY`] in the engine's
/// backend's tables — iptables-nft's for the nftables engine, whose chains share hooks with them —
/// and, for the nftables engine, [`NFT_CANARY`].
pub fn plant_canaries(engine: Engine, ns: &Netns) {
    match engine {
        Engine::Iptables(backend) => plant_canary(ns, backend),
        Engine::Nftables => {
            plant_canary(ns, "nft");
            nft_in(ns, &["-f", "-"], Some(NFT_CANARY));
        }
    }
}

/// Everything foreign `engine`'s tests watch, to be found as it was after [`plant_canaries`]:
/// for the iptables engine the foreign rules of both families (sorted, [`foreign`]); for the
/// nftables engine the whole `nft -a list ruleset` but our two tables — iptables-nft's tables with
/// the canary and the foreign table, handles included, so a foreign object deleted and made again
/// would show.
pub fn foreign_state(engine: Engine, ns: &Netns) -> String {
    held_and_foreign(engine, ns).1
}

/// [`held`] and [`foreign_state`] together, from one `iptables-save` per family for the iptables
/// engine, one `nft -a list ruleset` for the nftables engine (our tables cut out of it, their
/// handles dropped: as [`super::nft_tables`] lists them).
pub fn held_and_foreign(engine: Engine, ns: &Netns) -> (Held, String) {
    match engine {
        Engine::Iptables(backend) => {
            let (ours, foreign) = state(ns, backend);
            (Held::Iptables(ours), format!("{foreign:?}"))
        }
        Engine::Nftables => {
            let (mut ours, mut foreign) = (String::new(), String::new());
            let mut in_ours = false;
            for line in zero_counters(&nft_in(ns, &["-a", "list", "ruleset"], None)).lines() {
                if line.starts_with("table ip tproxy-cni ") || line.starts_with("table ip6 tproxy-cni ") {
                    in_ours = true;
                }
                if in_ours {
                    ours += line.split(" # handle ").next().unwrap();
                    ours.push('\n');
                } else {
                    foreign += line;
                    foreign.push('\n');
                }
                if line == "}" {
                    in_ours = false;
                }
            }
            (Held::Nftables(ours), foreign)
        }
    }
}

/// A small, seedable generator (SplitMix64): runs are reproducible from their seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The seed of a run: `TPROXY_CNI_SEED` when set, else one from the clock (printed by the caller).
pub fn seed() -> u64 {
    match std::env::var("TPROXY_CNI_SEED") {
        Ok(s) => s.parse().unwrap_or_else(|_| panic!("TPROXY_CNI_SEED={s:?} is not a number")),
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64,
    }
}

/// Is the long version of the hardening tests asked for (`TPROXY_CNI_LONG=1`)?
pub fn long() -> bool {
    std::env::var("TPROXY_CNI_LONG").is_ok_and(|v| !v.is_empty() && v != "0")
}

//! Random lifecycles in real namespaces: seeded sequences of ADD, repeated ADD, ADD with another
//! configuration, refused ADD, CHECK, DEL, the namespace deleted (and the pod's sandbox recreated),
//! and rules tampered with, across several pods on every engine (the iptables engine with each
//! backend, the nftables engine) and both meshes.
//!
//! After every call of the plugin each pod's namespace holds exactly zero or one copy of our rules
//! — precisely the rules its configuration gives, or none — and every foreign canary rule (for the
//! nftables engine also a foreign nftables table, handles included); CHECK passes exactly when the
//! namespace holds the configuration's rules untouched, and on the nftables engine names what was
//! tampered with; a refused ADD changes nothing; DEL always succeeds.
//!
//! `cargo test --test it lifecycle_random::` runs a short run (a few dozen sequences); with
//! `TPROXY_CNI_LONG=1` it runs 1000. `TPROXY_CNI_SEED=N` replays a run; a failure prints its seed.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::support::harden::*;
use crate::support::*;
use serde_json::Value;

/// One pod of a sequence and what its namespace must hold.
struct PodState {
    ns: Option<Netns>,
    id: String,
    engine: Engine,
    /// The foreign state of the namespace as planted ([`foreign_state`]).
    foreign: String,
    mesh: &'static str,
    v6: bool,
    /// The configuration the pod carries now (ADD and CHECK use it).
    spec: Spec,
    /// What the last successful ADD installed (None: nothing of ours).
    installed: Option<Spec>,
    /// Rules of ours were tampered with since.
    tampered: bool,
    /// What a CHECK must name after the last tampering (the nftables engine's CHECK names every
    /// difference; the iptables engine's is only required to fail).
    names: Option<String>,
}

/// The context a failure is reported with.
struct Run {
    seed: u64,
    sequence: usize,
    log: String,
    /// Steps taken, by kind, over the whole run.
    counts: BTreeMap<&'static str, usize>,
    /// What each configuration must give, per engine.
    wanted: Wanted,
}

impl Run {
    fn fail(&self, what: String) -> ! {
        panic!(
            "{what}\n\nsequence {} of the run with seed {} (replay: TPROXY_CNI_SEED={} cargo test --test it lifecycle_random::); \
             steps:\n{}",
            self.sequence, self.seed, self.seed, self.log
        )
    }

    fn check(&self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.fail(what());
        }
    }
}

fn new_pod(rng: &mut Rng, specs: &[Spec], engine: Engine) -> PodState {
    let spec = rng.pick(specs).clone();
    let ns = Netns::new("tpr");
    plant_canaries(engine, &ns);
    let foreign = foreign_state(engine, &ns);
    PodState {
        ns: Some(ns),
        id: unique("r"),
        engine,
        foreign,
        mesh: spec.mesh,
        v6: rng.chance(50),
        spec,
        installed: None,
        tampered: false,
        names: None,
    }
}

fn call(p: &PodState, command: &str, annotations: &Value) -> std::process::Output {
    let netns = match &p.ns {
        Some(ns) => ns.path().to_string_lossy().into_owned(),
        None => format!("/run/netns/{}-gone", p.id),
    };
    call_plugin(&env(command, &netns, &p.id), &stdin_with(p.engine.conf(), annotations, &prev_result(p.v6)))
}

/// Damages our rules in one of several ways (the namespace holds a copy of ours): what was done,
/// and what CHECK must name.
fn tamper(rng: &mut Rng, p: &PodState) -> (String, Option<String>) {
    match p.engine {
        Engine::Iptables(backend) => (tamper_iptables(rng, p, backend), None),
        Engine::Nftables => {
            let (what, names) = tamper_nftables(rng, p);
            (what, Some(names))
        }
    }
}

fn tamper_iptables(rng: &mut Rng, p: &PodState, backend: &str) -> String {
    let ns = p.ns.as_ref().unwrap();
    let fam = if p.v6 && rng.chance(50) { Fam::V6 } else { Fam::V4 };
    let (ours, _) = read(&save(ns, fam, backend));
    let rules: Vec<(&(String, String), &String)> =
        ours.rules.iter().flat_map(|(k, v)| v.iter().map(move |s| (k, s))).collect();
    let ((table, chain), spec) = *rng.pick(&rules);
    let (what, input) = match rng.below(5) {
        0 => ("deleted a rule", format!("*{table}\n-D {chain} {spec}\nCOMMIT\n")),
        1 => ("duplicated a rule", format!("*{table}\n-A {chain} {spec}\nCOMMIT\n")),
        2 => ("added a stray rule of ours", format!("*{table}\n-I {chain} 1 {spec}\nCOMMIT\n")),
        3 if chain.starts_with("CONSUL") || chain.starts_with("KUMA") => {
            ("flushed a chain", format!("*{table}\n-F {chain}\nCOMMIT\n"))
        }
        _ => {
            let stray = if p.mesh == "consul" {
                "-p udp -m udp --dport 7 -m comment --comment tproxy-cni -j RETURN"
            } else {
                "-p udp -m udp --dport 7 -m comment --comment \"kuma/mesh/transparent/proxy/stray\" -j RETURN"
            };
            ("added a rule with our comment", format!("*nat\n-A OUTPUT {stray}\nCOMMIT\n"))
        }
    };
    ns.restore(fam, backend, &input);
    format!("{what} in {fam:?} {table}/{chain}")
}

/// One of our nftables tables as `nft -a` lists it: its sets with their key types, its chains
/// with whether they are base chains, and each rule's chain, text and handle.
#[derive(Default)]
struct Listed {
    sets: Vec<(String, String)>,
    chains: Vec<(String, bool)>,
    rules: Vec<(String, String, String)>,
}

fn list(ns: &Netns, family: &str) -> Listed {
    let text = nft_in(ns, &["-a", "list", "table", family, "tproxy-cni"], None);
    let mut l = Listed::default();
    let (mut set, mut chain) = (None::<String>, None::<String>);
    for line in text.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("set ") {
            set = Some(rest.split(' ').next().unwrap().to_owned());
            chain = None;
        } else if let Some(rest) = t.strip_prefix("chain ") {
            let name = rest.split(' ').next().unwrap().to_owned();
            l.chains.push((name.clone(), false));
            chain = Some(name);
            set = None;
        } else if let (Some(s), Some(key)) = (&set, t.strip_prefix("type ")) {
            l.sets.push((s.clone(), key.to_owned()));
        } else if let (Some(c), Some(_)) = (&chain, t.strip_prefix("type ")) {
            l.chains.iter_mut().find(|(n, _)| n == c).unwrap().1 = true;
        } else if let (Some(c), Some((rule, handle))) = (&chain, t.split_once(" # handle ")) {
            l.rules.push((c.clone(), rule.to_owned(), handle.to_owned()));
        }
    }
    l
}

/// Deletes `chain` of our table of `family` (listed as `l`), with the rules that jump to it, in
/// one `nft -f` transaction.
fn delete_nft_chain(ns: &Netns, family: &str, chain: &str, l: &Listed) {
    let at = format!("{family} tproxy-cni");
    let mut script = String::new();
    for (c, rule, handle) in &l.rules {
        if rule.contains(&format!("jump {chain} ")) || rule.contains(&format!("goto {chain} ")) {
            script += &format!("delete rule {at} {c} handle {handle}\n");
        }
    }
    script += &format!("flush chain {at} {chain}\ndelete chain {at} {chain}\n");
    nft_in(ns, &["-f", "-"], Some(&script));
}

/// Damages our nftables tables with `nft`, as an operator or another program might: a rule
/// deleted, an element added to a set, a chain deleted (with the rules that jump to it), a stray
/// rule added. Returns what was done and what CHECK must name.
fn tamper_nftables(rng: &mut Rng, p: &PodState) -> (String, String) {
    let ns = p.ns.as_ref().unwrap();
    let family = if p.v6 && rng.chance(50) { "ip6" } else { "ip" };
    let at = format!("{family} tproxy-cni");
    let l = list(ns, family);
    // A stray rule added by an earlier tampering is not deleted again (CHECK would not miss it).
    let rules: Vec<&(String, String, String)> = l.rules.iter().filter(|(_, r, _)| !r.contains("dport 7 ")).collect();
    let mut kind = rng.below(4);
    if kind == 1 && l.sets.is_empty() {
        kind = 0;
    }
    match kind {
        1 => {
            let (set, key) = rng.pick(&l.sets);
            let element = match key.as_str() {
                "ipv4_addr" => "203.0.113.77",
                "ipv6_addr" => "fd00:7::7",
                "inet_service" => "7",
                "uid" => "4242",
                other => panic!("set {set} of type {other}: no element to add"),
            };
            nft_in(ns, &["add", "element", family, "tproxy-cni", set, &format!("{{ {element} }}")], None);
            (format!("added {element} to set {at} {set}"), format!("unexpected in set {at} {set}: {element}"))
        }
        2 => {
            let (chain, _) = rng.pick(&l.chains);
            delete_nft_chain(ns, family, chain, &l);
            (format!("deleted chain {at} {chain}"), format!("missing chain {at} {chain}"))
        }
        3 => {
            let (chain, _) = rng.pick(&l.chains);
            nft_in(ns, &["add", "rule", family, "tproxy-cni", chain, "udp", "dport", "7", "return"], None);
            (format!("added a stray rule to {at} {chain}"), format!("unexpected in {at} {chain}: "))
        }
        _ => {
            let (chain, rule, handle) = *rng.pick(&rules);
            nft_in(ns, &["delete", "rule", family, "tproxy-cni", chain, "handle", handle], None);
            (format!("deleted rule {rule:?} of {at} {chain}"), format!("missing in {at} {chain}: "))
        }
    }
}

/// The checks after every call of the plugin.
fn check_namespace(run: &mut Run, p: &PodState) {
    let Some(ns) = &p.ns else { return };
    let (have, foreign) = held_and_foreign(p.engine, ns);
    let want = match &p.installed {
        Some(spec) => run.wanted.get(p.engine, &spec.annotations, p.v6),
        None => Held::nothing(p.engine),
    };
    if !p.tampered {
        run.check(have == want, || {
            format!("the namespace does not hold exactly the expected copy\nhave {have:#?}\nwant {want:#?}")
        });
    }
    run.check(foreign == p.foreign, || format!("foreign rules changed:\nhave {foreign}\nplanted {}", p.foreign));
    let kuma_v6 = p.installed.as_ref().is_some_and(|s| s.mesh == "kuma") && p.v6;
    let addresses = ns.passthrough_v6();
    run.check(addresses == usize::from(kuma_v6), || format!("::6 on lo {addresses} times, want {}", u8::from(kuma_v6)));
}

/// CHECK, and what it must say: success exactly when the namespace holds the pod's configuration
/// untouched, 103 otherwise (102 when the namespace is gone), naming the last tampering on the
/// nftables engine.
fn check(run: &mut Run, p: &PodState) {
    let out = call(p, "CHECK", &p.spec.annotations);
    let intact = p.installed.as_ref().is_some_and(|s| s.name == p.spec.name) && !p.tampered;
    let want_code = if p.ns.is_none() {
        Some(102)
    } else if intact {
        None
    } else {
        Some(103)
    };
    let got = (!out.status.success()).then(|| code_of(&out));
    run.check(got == want_code, || {
        format!("CHECK gave {got:?}, want {want_code:?}: {}", String::from_utf8_lossy(&out.stdout))
    });
    if let (Some(names), true, Some(_)) = (&p.names, p.tampered, &p.ns) {
        let said = text(&out).replace("\\\"", "\"");
        run.check(said.contains(names.as_str()), || format!("CHECK does not name {names:?}: {said}"));
        *run.counts.entry("CHECK naming the tampering").or_default() += 1;
    }
}

fn sequence(run: &mut Run, rng: &mut Rng, specs: &[Spec], steps: usize) {
    let mut pods: Vec<PodState> = Vec::new();
    for _ in 0..3 {
        let engine = *rng.pick(&ENGINES);
        pods.push(new_pod(rng, specs, engine));
    }
    for (i, p) in pods.iter().enumerate() {
        writeln!(run.log, "  pod {i}: {:?} {} v6={} {}", p.engine, p.spec.name, p.v6, p.id).unwrap();
    }
    for step in 0..steps {
        let i = rng.below(pods.len() as u64) as usize;
        let p = &mut pods[i];
        let op = rng.below(100);
        let same_mesh: Vec<Spec> = specs.iter().filter(|s| s.mesh == p.mesh).cloned().collect();
        let label = match op {
            0..=24 => "ADD",
            25..=34 => "ADD (another configuration)",
            35..=41 => "ADD (refused configuration)",
            42..=59 => "CHECK",
            60..=74 => "DEL",
            75..=81 => "namespace deleted",
            82..=86 => "sandbox recreated",
            _ => "tamper",
        };
        *run.counts.entry(label).or_default() += 1;
        if label == "ADD (another configuration)" {
            p.spec = rng.pick(&same_mesh).clone();
        }
        write!(run.log, "  {step}: pod {i} {label} [{}]", p.spec.name).unwrap();
        match label {
            "ADD" | "ADD (another configuration)" => {
                let out = call(p, "ADD", &p.spec.annotations);
                if p.ns.is_some() {
                    run.check(out.status.success(), || format!("ADD failed: {}", String::from_utf8_lossy(&out.stdout)));
                    p.installed = Some(p.spec.clone());
                    p.tampered = false;
                    p.names = None;
                } else {
                    run.check(!out.status.success() && code_of(&out) == 102, || {
                        format!("ADD into a gone namespace: {}", String::from_utf8_lossy(&out.stdout))
                    });
                }
            }
            "ADD (refused configuration)" => {
                let out = call(p, "ADD", &invalid(p.mesh));
                run.check(!out.status.success() && code_of(&out) == 100, || {
                    format!("refused ADD: {}", String::from_utf8_lossy(&out.stdout))
                });
            }
            "CHECK" => check(run, p),
            "DEL" => {
                let out = call(p, "DEL", &p.spec.annotations);
                run.check(out.status.success() && out.stdout.is_empty(), || {
                    format!("DEL failed: {}", String::from_utf8_lossy(&out.stdout))
                });
                p.installed = None;
                p.tampered = false;
                p.names = None;
            }
            "namespace deleted" => {
                p.ns = None;
                p.installed = None;
                p.tampered = false;
                p.names = None;
            }
            "sandbox recreated" => {
                if p.ns.is_none() {
                    let fresh = new_pod(rng, specs, p.engine);
                    *p = PodState { spec: p.spec.clone(), mesh: p.mesh, ..fresh };
                }
            }
            _ => {
                if p.ns.is_some() && p.installed.is_some() {
                    let (what, names) = tamper(rng, p);
                    write!(run.log, ": {what}; CHECK").unwrap();
                    p.tampered = true;
                    p.names = names;
                    // What a monitoring CHECK would see at once (a later CHECK may see more).
                    check(run, p);
                }
            }
        }
        run.log.push('\n');
        check_namespace(run, &pods[i]);
    }
    // The end of a pod's life: DEL leaves nothing of ours, whatever happened before.
    for p in &mut pods {
        let out = call(p, "DEL", &p.spec.annotations);
        run.check(out.status.success(), || format!("final DEL: {}", String::from_utf8_lossy(&out.stdout)));
        p.installed = None;
        p.tampered = false;
        p.names = None;
        check_namespace(run, p);
    }
}

#[test]
fn random_lifecycles_leave_zero_or_one_copy_and_every_canary() {
    if !privileged() {
        return;
    }
    let (sequences, steps) = if long() { (1000, 12) } else { (24, 10) };
    let seed = seed();
    eprintln!("random lifecycles: {sequences} sequences of {steps} steps, seed {seed}");
    let specs = specs();
    let start = std::time::Instant::now();
    let mut counts = BTreeMap::<&str, usize>::new();
    let mut wanted = Wanted::default();
    for sequence_index in 0..sequences {
        let mut rng = Rng::new(seed ^ (sequence_index as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
        let mut run = Run { seed, sequence: sequence_index, log: String::new(), counts: BTreeMap::new(), wanted };
        sequence(&mut run, &mut rng, &specs, steps);
        for (k, n) in run.counts {
            *counts.entry(k).or_default() += n;
        }
        wanted = run.wanted;
    }
    eprintln!(
        "random lifecycles: {sequences} sequences in {:.1} s, seed {seed}; steps by kind: {counts:?}",
        start.elapsed().as_secs_f64()
    );
}

/// Regression test, pinned from a long random run: DEL removed Kuma's `::6` only when it removed
/// the IPv6 `KUMA_MESH_INBOUND` chain, so a namespace where that chain had been deleted by hand
/// kept the address after DEL (on either engine; the iptables tampering above only flushes
/// chains, the nftables one also deletes them). On each engine: a dual-stack Kuma pod, its IPv6
/// inbound chain deleted with the rule that jumps to it, then DEL: nothing of ours, no `::6`.
#[test]
fn del_removes_the_kuma_address_when_the_inbound_chain_was_deleted_by_hand() {
    if !privileged() {
        return;
    }
    let kuma = specs().into_iter().find(|s| s.name == "kuma-yaml").unwrap();
    let inbound = "KUMA_MESH_INBOUND";
    for engine in ENGINES {
        let ns = Netns::new("tpr");
        plant_canaries(engine, &ns);
        let foreign = foreign_state(engine, &ns);
        let path = ns.path().to_string_lossy().into_owned();
        let stdin = stdin_with(engine.conf(), &kuma.annotations, &prev_result(true));
        let out = call_plugin(&env("ADD", &path, "pinned"), &stdin);
        assert!(out.status.success(), "{engine:?} ADD: {}", text(&out));
        assert_eq!(ns.passthrough_v6(), 1, "{engine:?}: ::6 after ADD");
        match engine {
            Engine::Iptables(backend) => {
                let (ours, _) = read(&save(&ns, Fam::V6, backend));
                let mut input = String::from("*nat\n");
                for ((table, chain), rules) in &ours.rules {
                    for rule in rules
                        .iter()
                        .filter(|r| r.split(" -j ").nth(1).is_some_and(|t| t.split(' ').next() == Some(inbound)))
                    {
                        assert_eq!(table, "nat");
                        input += &format!("-D {chain} {rule}\n");
                    }
                }
                input += &format!("-F {inbound}\n-X {inbound}\nCOMMIT\n");
                ns.restore(Fam::V6, backend, &input);
                assert!(!read(&save(&ns, Fam::V6, backend)).0.chains.iter().any(|(_, c)| c == inbound));
            }
            Engine::Nftables => {
                delete_nft_chain(&ns, "ip6", inbound, &list(&ns, "ip6"));
                assert!(!list(&ns, "ip6").chains.iter().any(|(c, _)| c == inbound));
            }
        }
        let out = call_plugin(&env("DEL", &path, "pinned"), &stdin);
        assert!(out.status.success(), "{engine:?} DEL: {}", text(&out));
        assert!(held(engine, &ns).is_nothing(), "{engine:?}: DEL left rules of ours");
        assert_eq!(ns.passthrough_v6(), 0, "{engine:?}: DEL left ::6 on lo");
        assert_eq!(foreign_state(engine, &ns), foreign, "{engine:?}: foreign rules changed");
    }
}

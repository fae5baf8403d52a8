//! Random lifecycles in real namespaces: seeded sequences of ADD, repeated ADD, ADD with another
//! configuration, refused ADD, CHECK, DEL, the namespace deleted (and the pod's sandbox recreated),
//! and rules tampered with, across several pods on both backends and both meshes.
//!
//! After every call of the plugin each pod's namespace holds exactly zero or one copy of our rules
//! — precisely the rules its configuration gives, or none — and every foreign canary rule; CHECK
//! passes exactly when the namespace holds the configuration's rules untouched; a refused ADD
//! changes nothing; DEL always succeeds.
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
    backend: &'static str,
    mesh: &'static str,
    v6: bool,
    /// The configuration the pod carries now (ADD and CHECK use it).
    spec: Spec,
    /// What the last successful ADD installed (None: nothing of ours).
    installed: Option<Spec>,
    /// Rules of ours were tampered with since.
    tampered: bool,
}

/// The context a failure is reported with.
struct Run {
    seed: u64,
    sequence: usize,
    log: String,
    /// Steps taken, by kind, over the whole run.
    counts: BTreeMap<&'static str, usize>,
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

fn new_pod(rng: &mut Rng, specs: &[Spec], backend: &'static str) -> PodState {
    let spec = rng.pick(specs).clone();
    let ns = Netns::new("tpr");
    plant_canary(&ns, backend);
    PodState {
        ns: Some(ns),
        id: unique("r"),
        backend,
        mesh: spec.mesh,
        v6: rng.chance(50),
        spec,
        installed: None,
        tampered: false,
    }
}

fn call(p: &PodState, command: &str, annotations: &Value) -> std::process::Output {
    let netns = match &p.ns {
        Some(ns) => ns.path().to_string_lossy().into_owned(),
        None => format!("/run/netns/{}-gone", p.id),
    };
    call_plugin(&env(command, &netns, &p.id), &stdin(p.backend, annotations, &prev_result(p.v6)))
}

/// Damages our rules in one of several ways (the namespace holds a copy of ours).
fn tamper(rng: &mut Rng, p: &PodState) -> String {
    let ns = p.ns.as_ref().unwrap();
    let fam = if p.v6 && rng.chance(50) { Fam::V6 } else { Fam::V4 };
    let (ours, _) = read(&save(ns, fam, p.backend));
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
    ns.restore(fam, p.backend, &input);
    format!("{what} in {fam:?} {table}/{chain}")
}

/// The checks after every call of the plugin.
fn check_namespace(run: &Run, p: &PodState) {
    let Some(ns) = &p.ns else { return };
    let (have, foreign) = state(ns, p.backend);
    let want = match &p.installed {
        Some(spec) => expected(&spec.annotations, p.v6),
        None => expected(&Value::Object(Default::default()), false),
    };
    if !p.tampered {
        for fam in [Fam::V4, Fam::V6] {
            run.check(have[&fam] == want[&fam], || {
                format!(
                    "{fam:?}: the namespace does not hold exactly the expected copy\nhave {:#?}\nwant {:#?}",
                    have[&fam], want[&fam]
                )
            });
        }
    }
    let mut canary = canary_rules();
    canary.sort();
    for fam in [Fam::V4, Fam::V6] {
        run.check(foreign[&fam] == canary, || format!("{fam:?}: foreign rules changed: {:?}", foreign[&fam]));
    }
    let kuma_v6 = p.installed.as_ref().is_some_and(|s| s.mesh == "kuma") && p.v6;
    let addresses = ns.passthrough_v6();
    run.check(addresses == usize::from(kuma_v6), || format!("::6 on lo {addresses} times, want {}", u8::from(kuma_v6)));
}

fn sequence(run: &mut Run, rng: &mut Rng, specs: &[Spec], steps: usize) {
    let mut pods: Vec<PodState> = Vec::new();
    for _ in 0..3 {
        let backend = *rng.pick(&BACKENDS);
        pods.push(new_pod(rng, specs, backend));
    }
    for (i, p) in pods.iter().enumerate() {
        writeln!(run.log, "  pod {i}: {} {} v6={} {}", p.backend, p.spec.name, p.v6, p.id).unwrap();
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
            "CHECK" => {
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
            }
            "DEL" => {
                let out = call(p, "DEL", &p.spec.annotations);
                run.check(out.status.success() && out.stdout.is_empty(), || {
                    format!("DEL failed: {}", String::from_utf8_lossy(&out.stdout))
                });
                p.installed = None;
                p.tampered = false;
            }
            "namespace deleted" => {
                p.ns = None;
                p.installed = None;
                p.tampered = false;
            }
            "sandbox recreated" => {
                if p.ns.is_none() {
                    let backend = p.backend;
                    let fresh = new_pod(rng, specs, backend);
                    *p = PodState { spec: p.spec.clone(), mesh: p.mesh, ..fresh };
                }
            }
            _ => {
                if p.ns.is_some() && p.installed.is_some() {
                    let what = tamper(rng, p);
                    write!(run.log, ": {what}").unwrap();
                    p.tampered = true;
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
    for sequence_index in 0..sequences {
        let mut rng = Rng::new(seed ^ (sequence_index as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
        let mut run = Run { seed, sequence: sequence_index, log: String::new(), counts: BTreeMap::new() };
        sequence(&mut run, &mut rng, &specs, steps);
        for (k, n) in run.counts {
            *counts.entry(k).or_default() += n;
        }
    }
    eprintln!(
        "random lifecycles: {sequences} sequences in {:.1} s, seed {seed}; steps by kind: {counts:?}",
        start.elapsed().as_secs_f64()
    );
}

//! Crash consistency: ADD killed with SIGKILL at random moments, many times, on every engine (the
//! iptables engine with each backend, the nftables engine) and both meshes, into a fresh namespace
//! and over a previous configuration.
//!
//! What must hold after the kill (see `docs/reliability.md`):
//! - the iptables engine: within each table of each family, the namespace holds either the old
//!   rules of ours or the new ones, never a part: `iptables-restore` commits a table at once;
//!   across tables and families there is no such guarantee, but an order: tables are committed
//!   IPv4 then IPv6, and nat, raw, mangle within a family, so the tables already new are always a
//!   prefix of that order;
//! - the nftables engine: our tables of both families hold the old copy or the new copy, never a
//!   mix: one batch replaces them all at once;
//! - foreign rules are intact (for the nftables engine also a foreign nftables table, handles
//!   included);
//! - the runtime's next step repairs it: another ADD leaves exactly one copy of the new rules (and
//!   Kuma's `::6` once), a DEL leaves nothing of ours (and no `::6`).
//!
//! Two ways to die: the plugin alone (an `iptables-restore` it started runs on to its end, or sees
//! its input cut short), or its whole process group (the `iptables-restore` dies too, as when a node
//! loses power or the OOM killer takes the cgroup); the nftables engine starts no process, so for
//! it both are the plugin's death alone. `TPROXY_CNI_LONG=1` runs 1000 kills instead of a few
//! dozen, spread over the engines; `TPROXY_CNI_SEED=N` replays a run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::support::harden::*;
use crate::support::*;

/// How long one of these tests may take in its own process (`TPROXY_CNI_LONG`'s 1000 kills too).
const DEADLINE: Duration = Duration::from_secs(30 * 60);

/// The commit order of (family, table).
const ORDER: [(Fam, &str); 6] =
    [(Fam::V4, "nat"), (Fam::V4, "raw"), (Fam::V4, "mangle"), (Fam::V6, "nat"), (Fam::V6, "raw"), (Fam::V6, "mangle")];

/// Waits until every process of the group `pgid` has ended, reaping the orphans (an
/// `iptables-restore` whose plugin was killed) ourselves: see [`become_subreaper`].
fn wait_group(pgid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut status = 0;
        // Safety: waitpid on our own process group with a valid out-pointer.
        let r = unsafe { libc::waitpid(-pgid, &mut status, libc::WNOHANG) };
        if r > 0 {
            continue;
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
            return;
        }
        assert!(Instant::now() < deadline, "process group {pgid} did not end");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Makes this process the reaper of its orphaned descendants, so a tool whose plugin was killed
/// is waited for here (the machine's init may take seconds to reap it). That is process-wide: each
/// test that does it runs in a process of its own ([`in_own_process`]), or every other test's
/// orphans (a container runtime's monitor, say) would become zombies of the shared test process.
fn become_subreaper() {
    // Safety: prctl with integer arguments.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) }, 0);
}

/// One namespace reused across kills, with its canaries and how their state reads when intact.
struct Slot {
    ns: Netns,
    engine: Engine,
    foreign: String,
}

impl Slot {
    fn new(engine: Engine) -> Slot {
        let ns = Netns::new("tpk");
        plant_canaries(engine, &ns);
        let foreign = foreign_state(engine, &ns);
        Slot { ns, engine, foreign }
    }

    fn stdin(&self, spec: &Spec, v6: bool) -> String {
        stdin_with(self.engine.conf(), &spec.annotations, &prev_result(v6))
    }

    fn assert_foreign_intact(&self, context: &str) {
        assert_eq!(foreign_state(self.engine, &self.ns), self.foreign, "{context}: foreign rules changed");
    }
}

fn reset(slot: &Slot, spec: &Spec, id: &str) {
    let out = call_plugin(&env("DEL", slot.ns.path().to_str().unwrap(), id), &slot.stdin(spec, true));
    assert!(out.status.success(), "reset DEL: {}", String::from_utf8_lossy(&out.stdout));
    assert!(held(slot.engine, &slot.ns).is_nothing(), "{:?}: reset left rules", slot.engine);
    assert_eq!(slot.ns.passthrough_v6(), 0, "reset left ::6");
}

fn add(slot: &Slot, spec: &Spec, v6: bool, id: &str) -> std::process::Output {
    call_plugin(&env("ADD", slot.ns.path().to_str().unwrap(), id), &slot.stdin(spec, v6))
}

/// Where a kill left `have` between the `old` and the `new` state, as the units the engine commits
/// at once ("V4 nat new", "tables old"); panics on a part of a unit, or (the iptables engine)
/// units committed out of order.
fn judge(context: &str, have: &Held, old: &Held, new: &Held) -> Vec<String> {
    let mut signature = Vec::new();
    match (have, old, new) {
        (Held::Iptables(have), Held::Iptables(old), Held::Iptables(new)) => {
            let mut seen_old_after_change = false;
            let mut prefix_broken = false;
            for (fam, table) in ORDER {
                let (h, o, n) =
                    (table_part(&have[&fam], table), table_part(&old[&fam], table), table_part(&new[&fam], table));
                if o == n {
                    assert_eq!(h, n, "{context}: {fam:?} {table} changed although old and new agree");
                    continue;
                }
                let state = if h == n {
                    prefix_broken |= seen_old_after_change;
                    "new"
                } else if h == o {
                    seen_old_after_change = true;
                    "old"
                } else {
                    panic!(
                        "{context}: {fam:?} {table} holds a part of a rule set:\nhave {h:#?}\nold {o:#?}\nnew {n:#?}"
                    )
                };
                signature.push(format!("{fam:?} {table} {state}"));
            }
            assert!(!prefix_broken, "{context}: tables were committed out of order: {signature:?}");
        }
        (Held::Nftables(h), Held::Nftables(o), Held::Nftables(n)) => {
            // Both families' tables come and go in one batch: the pair is old or new as a whole.
            if o == n {
                assert_eq!(h, n, "{context}: our tables changed although old and new agree");
            } else if h == n {
                signature.push("tables new".to_owned());
            } else if h == o {
                signature.push("tables old".to_owned());
            } else {
                panic!("{context}: our tables are neither the old copy nor the new one:\nhave {h}\nold {o}\nnew {n}")
            }
        }
        _ => unreachable!("one engine's readings"),
    }
    signature
}

#[test]
fn add_killed_at_random_moments_leaves_whole_tables_and_the_next_call_repairs() {
    if !privileged() {
        return;
    }
    let _load = busy();
    let test = "add_killed_at_random_moments_leaves_whole_tables_and_the_next_call_repairs";
    if !in_own_process(module_path!(), test, DEADLINE) {
        return;
    }
    become_subreaper();
    let kills = if long() { 1000 } else { 32 };
    let seed = seed();
    let mut rng = Rng::new(seed);
    eprintln!("crash consistency: {kills} kills, seed {seed}");
    let specs = specs();
    let slots: Vec<Slot> = ENGINES.iter().map(|&e| Slot::new(e)).collect();
    let mut wanted = Wanted::default();

    // How long an ADD takes (the fastest of three), per engine, mesh and path, so kill delays
    // spread over the whole call.
    let mut duration: BTreeMap<(&str, &str, bool), Duration> = BTreeMap::new();
    for slot in &slots {
        for spec in &specs {
            for over_old in [false, true] {
                for _ in 0..3 {
                    reset(slot, spec, "calib");
                    if over_old {
                        assert!(add(slot, spec, true, "calib").status.success());
                    }
                    let start = Instant::now();
                    assert!(add(slot, spec, true, "calib").status.success());
                    let d = start.elapsed();
                    let e = duration.entry((slot.engine.backend(), spec.name, over_old)).or_insert(d);
                    *e = (*e).min(d);
                }
            }
        }
        reset(slot, &specs[0], "calib");
    }

    let start = Instant::now();
    let mut states: BTreeMap<String, usize> = BTreeMap::new();
    for kill in 0..kills {
        let slot = rng.pick(&slots);
        let engine = slot.engine;
        let new = rng.pick(&specs).clone();
        let same_mesh: Vec<&Spec> = specs.iter().filter(|s| s.mesh == new.mesh).collect();
        let old = rng.chance(40).then(|| (*rng.pick(&same_mesh)).clone());
        let v6 = rng.chance(60);
        let whole_group = rng.chance(50);
        let id = format!("k{kill}");
        let context = format!(
            "kill {kill} (seed {seed}, replay with TPROXY_CNI_SEED={seed}): {engine:?} {} over {:?}, v6={v6}, {}",
            new.name,
            old.as_ref().map(|s| s.name),
            if whole_group { "whole group killed" } else { "plugin alone killed" }
        );

        reset(slot, &new, &id);
        let old_rules = match &old {
            Some(o) => {
                assert!(add(slot, o, v6, &id).status.success(), "{context}: installing the old configuration");
                wanted.get(engine, &o.annotations, v6)
            }
            None => Held::nothing(engine),
        };
        let new_rules = wanted.get(engine, &new.annotations, v6);

        let d = duration[&(engine.backend(), new.name, old.is_some())];
        let delay = Duration::from_micros(rng.below(d.as_micros() as u64 + 1));
        let mut child = spawn_plugin("ADD", slot.ns.path().to_str().unwrap(), &id, &slot.stdin(&new, v6));
        let pid = child.id() as i32;
        std::thread::sleep(delay);
        // Safety: signalling our own child (and its process group, which it leads).
        unsafe { libc::kill(if whole_group { -pid } else { pid }, libc::SIGKILL) };
        let status = child.wait().unwrap();
        wait_group(pid);

        // Whole units only (iptables: tables, committed in order; nftables: both families at once).
        let signature = judge(&context, &held(engine, &slot.ns), &old_rules, &new_rules);
        slot.assert_foreign_intact(&context);
        let partial = signature.iter().any(|s| s.ends_with("new")) && signature.iter().any(|s| s.ends_with("old"));
        let what = if status.success() {
            "finished before the kill".to_owned()
        } else if signature.iter().all(|s| s.ends_with("old")) {
            "killed before any commit".to_owned()
        } else if partial {
            format!(
                "killed between commits: {}",
                signature.iter().filter(|s| s.ends_with("new")).cloned().collect::<Vec<_>>().join(", ")
            )
        } else {
            "killed after the last commit".to_owned()
        };
        *states.entry(format!("{}: {what}", engine.backend())).or_default() += 1;

        // The runtime's next step repairs it.
        let kuma_v6 = new.mesh == "kuma" && v6;
        if rng.chance(50) {
            let out = add(slot, &new, v6, &id);
            assert!(out.status.success(), "{context}: repairing ADD failed: {}", String::from_utf8_lossy(&out.stdout));
            assert_eq!(held(engine, &slot.ns), new_rules, "{context}: the repairing ADD left other rules");
            assert_eq!(slot.ns.passthrough_v6(), usize::from(kuma_v6), "{context}: ::6 after the repairing ADD");
        } else {
            let out = call_plugin(&env("DEL", slot.ns.path().to_str().unwrap(), &id), &slot.stdin(&new, v6));
            assert!(out.status.success(), "{context}: DEL failed: {}", String::from_utf8_lossy(&out.stdout));
            assert!(held(engine, &slot.ns).is_nothing(), "{context}: DEL left rules of ours");
            assert_eq!(slot.ns.passthrough_v6(), 0, "{context}: DEL left ::6 on lo");
        }
        slot.assert_foreign_intact(&context);
    }
    eprintln!(
        "crash consistency: {kills} kills in {:.1} s, seed {seed}; outcomes: {states:#?}",
        start.elapsed().as_secs_f64()
    );
    assert!(states.len() >= 2, "the kills all landed at the same point: {states:?}");
}

/// The children of `pid`, from `/proc/PID/task/PID/children`.
fn children(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .collect()
}

/// Is Kuma's `::6/128` on the loopback of the namespace this thread is in? (`if_inet6` is one
/// small read, cheap enough to poll for.)
fn passthrough_here() -> bool {
    std::fs::read_to_string("/proc/thread-self/net/if_inet6")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("00000000000000000000000000000006 ") && l.trim_end().ends_with(" lo"))
}

/// Regression test: Kuma's `::6` used to be added to `lo` before the first table was committed,
/// so an ADD killed in between left an address that no DEL ever removed. The plugin is frozen
/// (SIGSTOP on its process group) mid-ADD, then killed; DEL must leave nothing. When it is frozen
/// depends on the engine:
/// - the iptables engine: the moment it has started its first `iptables-restore`, when no rule can
///   be in yet: the address must not be there either;
/// - the nftables engine starts no process; it is frozen the moment `::6` appears on `lo` (polled
///   from a thread inside the namespace), and our IPv6 table must already be there — an ADD that
///   added the address before its batch would be caught before the batch.
#[test]
fn kuma_loopback_address_never_precedes_the_rules() {
    if !privileged() {
        return;
    }
    let _load = busy();
    if !in_own_process(module_path!(), "kuma_loopback_address_never_precedes_the_rules", DEADLINE) {
        return;
    }
    become_subreaper();
    let kuma = specs().into_iter().find(|s| s.name == "kuma-yaml").unwrap();
    for engine in ENGINES {
        let slot = Slot::new(engine);
        let (mut frozen, mut attempts) = (0, 0);
        while frozen < 2 {
            attempts += 1;
            assert!(attempts <= 30, "{engine:?}: the plugin finished before it could be frozen, 30 times");
            let round = frozen;
            let id = format!("s{attempts}");
            reset(&slot, &kuma, &id);
            let mut child = spawn_plugin("ADD", slot.ns.path().to_str().unwrap(), &id, &slot.stdin(&kuma, true));
            let pid = child.id() as i32;
            // Poll until the moment to freeze; on a busy machine the plugin may finish first: try again.
            let caught = match engine {
                Engine::Iptables(_) => loop {
                    if !children(pid).is_empty() {
                        break true;
                    }
                    if child.try_wait().unwrap().is_some() {
                        break false;
                    }
                    std::hint::spin_loop();
                },
                Engine::Nftables => in_netns(&slot.ns, None, || {
                    loop {
                        if passthrough_here() {
                            // Safety: signals to our own child's process group.
                            unsafe { libc::kill(-pid, libc::SIGSTOP) };
                            break child.try_wait().unwrap().is_none();
                        }
                        if child.try_wait().unwrap().is_some() {
                            break false;
                        }
                        std::hint::spin_loop();
                    }
                }),
            };
            if !caught {
                let _ = child.wait();
                wait_group(pid);
                continue;
            }
            frozen += 1;
            // Safety: signals to our own child's process group.
            unsafe { libc::kill(-pid, libc::SIGSTOP) };
            let v6_rules = match held(engine, &slot.ns) {
                Held::Iptables(ours) => !table_part(&ours[&Fam::V6], "nat").chains.is_empty(),
                Held::Nftables(_) => !slot.ns.nft_table(Fam::V6).is_empty(),
            };
            let address = slot.ns.passthrough_v6();
            assert!(address == 0 || v6_rules, "{engine:?} round {round}: ::6 on lo before the IPv6 rules");
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            let _ = child.wait();
            wait_group(pid);
            let out = call_plugin(&env("DEL", slot.ns.path().to_str().unwrap(), &id), &slot.stdin(&kuma, true));
            assert!(out.status.success());
            assert!(held(engine, &slot.ns).is_nothing(), "{engine:?}: DEL left rules");
            assert_eq!(slot.ns.passthrough_v6(), 0, "{engine:?} round {round}: DEL after the kill left ::6 on lo");
            slot.assert_foreign_intact(&format!("{engine:?} round {round}"));
        }
    }
}

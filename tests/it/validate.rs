//! `tproxy-cni validate` with real traffic, run the way an init container runs it: a whole process
//! under a non-root UID (`setpriv`) inside the namespace. It passes where the redirect is in place
//! and fails with its documented exit status where it is not.
//!
//! The "VM" namespace gets routes for the documentation prefixes (192.0.2.0/24, 2001:db8::/32)
//! via a sibling namespace the test owns, which does not forward: an unredirected probe ends
//! there, never off the machine.

use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::both_engines;
use crate::support::*;
use serde_json::json;
use tproxy_cni::host::validate::{EXIT_CANNOT_BIND, EXIT_NO_ROUTE, EXIT_OK, EXIT_REDIRECT_MISSING, EXIT_TIMEOUT};

const APP_UID: u32 = 4242;
const PROXY_UID: u32 = 5995;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `tproxy-cni validate ARGS` inside `ns` as `uid` (a whole process, as an init container).
fn validate(ns: &Netns, uid: u32, args: &[&str], env: &[(&str, &str)]) -> Output {
    let id = uid.to_string();
    Command::new("ip")
        .args(["netns", "exec", &ns.name, "setpriv", "--reuid", &id, "--regid", &id, "--clear-groups"])
        .arg(plugin())
        .arg("validate")
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn status(out: &Output) -> i32 {
    out.status.code().expect("exited")
}

/// A bridge with a sibling "server" and a "vm" routed to the documentation prefixes through it.
struct Setup<'n> {
    server: Pod<'n>,
    vm: Pod<'n>,
}

fn setup(net: &Network) -> Setup<'_> {
    let server = net.pod("server", None);
    let vm = net.pod("vm", None);
    let (s4, s6) = (server.addr(Fam::V4).to_string(), server.addr(Fam::V6).to_string());
    vm.ns.exec(&["ip", "route", "add", "192.0.2.0/24", "via", &s4]);
    vm.ns.exec(&["ip", "-6", "route", "add", "2001:db8::/32", "via", &s6]);
    Setup { server, vm }
}

/// Installs Consul's redirect (proxy UID 5995) in `ns` with the host command.
fn redirect(ns: &Netns) {
    redirect_with(ns, Engine::Iptables("nft"), &["--proxy-uid", &PROXY_UID.to_string()]);
}

/// Installs a redirect in `ns` with the host command and `engine`.
fn redirect_with(ns: &Netns, engine: Engine, flags: &[&str]) {
    let engine_flags = match engine {
        Engine::Iptables(mode) => vec!["--backend", "iptables", "--iptables-mode", mode],
        Engine::Nftables => vec!["--backend", "nftables"],
    };
    let out = Command::new(plugin())
        .env_clear()
        .args(["redirect", "--netns", ns.path().to_str().unwrap()])
        .args(engine_flags)
        .args(flags)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

both_engines!(passes_in_a_redirected_namespace_as_a_non_root_user);
fn passes_in_a_redirected_namespace_as_a_non_root_user(engine: Engine) {
    let Some(net) = Fixture::new("nft", json!({})) else { return };
    let s = setup(&net);
    redirect_with(&s.vm.ns, engine, &["--proxy-uid", &PROXY_UID.to_string()]);

    let out = validate(&s.vm.ns, APP_UID, &[], &[]);
    assert_eq!(status(&out), i32::from(EXIT_OK), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "outbound: 192.0.2.1:80 was redirected to port 15001 (token and original destination verified)\n\
         tproxy-cni validate: the redirect is in place\n"
    );

    // Both families, the targets from the environment (as an init container's `env` sets them).
    let out = validate(&s.vm.ns, APP_UID, &[], &[("TPROXY_CNI_VALIDATE_TARGET", "192.0.2.7:443,[2001:db8::7]:443")]);
    assert_eq!(status(&out), i32::from(EXIT_OK), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("outbound: 192.0.2.7:443 was redirected")
            && stdout.contains("outbound: [2001:db8::7]:443 was redirected"),
        "{stdout}"
    );

    // An operator on the node: from the sibling namespace, as root, into the VM's namespace, with
    // the inbound redirect checked too (inbound traffic must come from outside).
    let vm4 = s.vm.addr(Fam::V4);
    let inbound_target = SocketAddr::new(vm4, 7000).to_string();
    let vm_path = s.vm.ns.path();
    let out = validate(
        &s.server.ns,
        0,
        &["--netns", vm_path.to_str().unwrap(), "--inbound-port", "20000", "--inbound-target", &inbound_target],
        &[],
    );
    assert_eq!(status(&out), i32::from(EXIT_OK), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&format!("inbound: {inbound_target} was redirected to port 20000")),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn fails_with_its_documented_status_where_the_redirect_is_missing() {
    let Some(net) = Fixture::new("nft", json!({})) else { return };
    let s = setup(&net);
    let s4 = s.server.addr(Fam::V4);
    let _web = Responder::tcp(&s.server.ns, SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 8080), "server:8080");

    // Unredirected: the probe goes to the sibling, which drops it; nothing answers in time.
    let started = Instant::now();
    let out = validate(&s.vm.ns, APP_UID, &["--timeout", "1s"], &[]);
    assert_eq!(status(&out), i32::from(EXIT_TIMEOUT), "{}", text(&out.stderr));
    assert!(started.elapsed() < Duration::from_secs(5), "the timeout bounds the run");
    assert_eq!(
        text(&out.stderr),
        "tproxy-cni validate: no answer within 1s from 192.0.2.1:80: the probe most likely left unredirected and was dropped\n"
    );
    assert!(out.stdout.is_empty());

    // A target that answers by itself is not mistaken for the redirect; a refusal is a miss too.
    let target = SocketAddr::new(s4, 8080).to_string();
    let out = validate(&s.vm.ns, APP_UID, &["--target", &target], &[]);
    assert_eq!(status(&out), i32::from(EXIT_REDIRECT_MISSING), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(&format!("redirect missing: the connection to {target} reached something that is not validate's listener (it answered \"server:8080")), "{}", text(&out.stderr));
    let target = SocketAddr::new(s4, 7).to_string();
    let out = validate(&s.vm.ns, APP_UID, &["--target", &target], &[]);
    assert_eq!(status(&out), i32::from(EXIT_REDIRECT_MISSING), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("was refused"), "{}", text(&out.stderr));

    // No route at all: nothing could be tested, and validate says so rather than guess.
    let out = validate(&s.vm.ns, APP_UID, &["--target", "203.0.113.1:80"], &[]);
    assert_eq!(status(&out), i32::from(EXIT_NO_ROUTE), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("no route to 203.0.113.1:80"), "{}", text(&out.stderr));

    // Redirected, but validate runs as the proxy's user, whose traffic is never redirected.
    redirect(&s.vm.ns);
    let out = validate(&s.vm.ns, PROXY_UID, &["--timeout", "1s"], &[]);
    assert_eq!(status(&out), i32::from(EXIT_TIMEOUT), "{}", text(&out.stderr));
    assert_eq!(status(&validate(&s.vm.ns, APP_UID, &[], &[])), i32::from(EXIT_OK));
}

#[test]
fn cannot_bind_when_the_port_is_taken_or_privileged() {
    let Some(net) = Fixture::new("nft", json!({})) else { return };
    let s = setup(&net);
    redirect(&s.vm.ns);
    let proxy = Responder::tcp(&s.vm.ns, SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 15001), "proxy");
    let out = validate(&s.vm.ns, APP_UID, &[], &[]);
    assert_eq!(status(&out), i32::from(EXIT_CANNOT_BIND), "{}", text(&out.stderr));
    assert!(text(&out.stderr).starts_with("tproxy-cni validate: cannot listen on 0.0.0.0:15001 (the proxy is probably running already: run validate before it starts): "), "{}", text(&out.stderr));
    drop(proxy);
    let out = validate(&s.vm.ns, APP_UID, &["--outbound-port", "80"], &[]);
    assert_eq!(status(&out), i32::from(EXIT_CANNOT_BIND), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("ports below 1024 need privileges"), "{}", text(&out.stderr));

    // Bad usage is status 2, from the flags or their environment variables.
    for (args, env) in [
        (vec!["--timeout", "forever"], vec![]),
        (vec!["--inbound-port", "20000"], vec![]),
        (vec![], vec![("TPROXY_CNI_VALIDATE_OUTBOUND_PORT", "0")]),
    ] {
        let out = validate(&s.vm.ns, APP_UID, &args, &env);
        assert_eq!(status(&out), 2, "{args:?} {env:?}: {}", text(&out.stderr));
    }
}

both_engines!(passes_under_kumas_rules_too);
fn passes_under_kumas_rules_too(engine: Engine) {
    // Kuma returns loopback traffic of everyone but the proxy: the probe's off-host target is what
    // exercises its outbound redirect.
    let Some(net) = Fixture::new("nft", json!({})) else { return };
    let s = setup(&net);
    redirect_with(&s.vm.ns, engine, &["--kuma-dp-user", "5678"]);
    let out = validate(&s.vm.ns, APP_UID, &["--target", "192.0.2.1:80", "--target", "[2001:db8::1]:80"], &[]);
    assert_eq!(status(&out), i32::from(EXIT_OK), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("outbound: [2001:db8::1]:80 was redirected"), "{}", text(&out.stdout));
    let out = validate(&s.vm.ns, 5678, &["--timeout", "1s"], &[]);
    assert_eq!(status(&out), i32::from(EXIT_TIMEOUT), "kuma-dp's own UID is not redirected: {}", text(&out.stderr));
}

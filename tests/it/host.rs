//! The host commands in real namespaces: `redirect` installs exactly what the CNI plugin installs
//! for a pod with the same configuration (Consul's and Kuma's) and real traffic follows it; `uninstall` restores the
//! namespace byte for byte (a foreign canary included); `--dry-run` changes nothing; the SSH guard
//! refuses to cut a live session and `--force` overrides it; rules under our names that we did not
//! install are refused; user names resolve.
//!
//! Never run in the machine's own namespace: every command gets `--netns` of a namespace the test
//! made, and every command runs with a clean environment (a CI runner's own `SSH_CONNECTION` must
//! not leak in).

use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
use std::process::{Command, Output};

use crate::both_engines;
use crate::support::*;
use serde_json::{Value, json};

const PROXY_UID: u32 = 5995;
const CONNECT_INIT_UID: u32 = 5996;
const APP_UID: u32 = 4242;

/// Runs `tproxy-cni ARGS` with only `PATH` (and `env`) in its environment.
fn tproxy(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(plugin())
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(env.iter().copied())
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "command failed: {}{}", text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

/// A refusal: status 1, nothing on stdout, one line on stderr; returns that line.
fn refused(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(1), "must be refused: {}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.stdout.is_empty(), "nothing on stdout when refused: {}", text(&out.stdout));
    let err = text(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    err
}

/// The flags that choose the engine: `--backend iptables --iptables-mode BACKEND` for `nft` and
/// `legacy`, `--backend nftables` for `nftables`.
fn engine_flags(backend: &str) -> Vec<&str> {
    if backend == "nftables" {
        vec!["--backend", "nftables"]
    } else {
        vec!["--backend", "iptables", "--iptables-mode", backend]
    }
}

/// `redirect --netns NS --backend iptables --iptables-mode BACKEND FLAGS…` (or `--backend nftables`).
fn redirect(ns: &Netns, backend: &str, flags: &[&str], env: &[(&str, &str)]) -> Output {
    let path = ns.path();
    let mut args = vec!["redirect", "--netns", path.to_str().unwrap()];
    args.extend(engine_flags(backend));
    args.extend_from_slice(flags);
    tproxy(&args, env)
}

fn uninstall(ns: &Netns, backend: &str, flags: &[&str]) -> Output {
    let path = ns.path();
    let mut args = vec!["uninstall", "--netns", path.to_str().unwrap()];
    args.extend(engine_flags(backend));
    args.extend_from_slice(flags);
    tproxy(&args, &[])
}

/// The typical Consul pod of the traffic tests, as the webhook's JSON…
fn consul_json() -> Value {
    json!({
        "ConsulDNSIP": "127.0.0.1", "ConsulDNSPort": 8600,
        "ProxyUserID": PROXY_UID.to_string(), "ProxyInboundPort": 20000, "ProxyOutboundPort": 15001,
        "ExcludeInboundPorts": ["9090", "8000:8100"], "ExcludeOutboundPorts": ["5432"],
        "ExcludeOutboundCIDRs": ["198.18.0.200/32", "fd18::200/128"],
        "ExcludeUIDs": [CONNECT_INIT_UID.to_string(), "7000-7999"],
        "NetNS": "", "IptablesProvider": null
    })
}

/// …and as `consul connect redirect-traffic`'s flags.
const CONSUL_FLAGS: &[&str] = &[
    "--proxy-uid",
    "5995",
    "--proxy-inbound-port",
    "20000",
    "--proxy-outbound-port",
    "15001",
    "--exclude-inbound-port",
    "9090",
    "--exclude-inbound-port",
    "8000:8100",
    "--exclude-outbound-port",
    "5432",
    "--exclude-outbound-cidr",
    "198.18.0.200/32",
    "--exclude-outbound-cidr",
    "fd18::200/128",
    "--exclude-uid",
    "5996",
    "--exclude-uid",
    "7000-7999",
    "--consul-dns-ip",
    "127.0.0.1",
    "--consul-dns-port",
    "8600",
];

#[test]
fn redirect_with_consul_flags_installs_what_a_consul_pod_gets() {
    for net in Fixture::backends(json!({})) {
        let backend = net.backend;
        let pod = net.pod("web", Some(&consul_pod(consul_json(), &[])));
        let from_cni = pod.ns.snapshot();
        assert!(from_cni.contains("CONSUL_PROXY_OUTPUT"), "{backend}: the pod got its rules");

        // The "VM": a namespace with the same kind of addresses (IPv4, IPv6), attached without
        // annotations so the plugin leaves it alone.
        let host = net.pod("vm", None);
        let out = redirect(&host.ns, backend, CONSUL_FLAGS, &[]);
        assert_eq!(
            ok(&out),
            format!(
                "tproxy-cni: consul redirect installed in network namespace {} (ipv4+ipv6, iptables-{backend})\n",
                host.ns.path().display()
            )
        );
        assert_eq!(host.ns.snapshot(), from_cni, "{backend}: flags must give exactly the pod's rules");

        // The same JSON the webhook wrote, from a file.
        let file = TempDir::new("cfg");
        let json_path = file.path().join("consul.json");
        std::fs::write(&json_path, consul_json().to_string()).unwrap();
        let host = net.pod("vm", None);
        ok(&redirect(&host.ns, backend, &["--consul-config", json_path.to_str().unwrap()], &[]));
        assert_eq!(host.ns.snapshot(), from_cni, "{backend}: --consul-config must give exactly the pod's rules");
    }

    // Consul's dual-stack mode: DNS on ::1, no DNS rules in the IPv4 pass.
    let Some(net) = Fixture::new("nft", json!({})) else { return };
    let mut config = consul_json();
    config["ConsulDNSIP"] = json!("::1");
    let pod = net.pod("web", Some(&consul_pod(config, &[("consul.hashicorp.com/dual-stack", "true")])));
    let host = net.pod("vm", None);
    let mut flags: Vec<&str> = CONSUL_FLAGS.iter().map(|f| if *f == "127.0.0.1" { "::1" } else { f }).collect();
    flags.push("--dual-stack");
    ok(&redirect(&host.ns, "nft", &flags, &[]));
    assert_eq!(host.ns.snapshot(), pod.ns.snapshot(), "dual-stack: flags must give exactly the pod's rules");
}

both_engines!(traffic_follows_the_redirect_and_flows_directly_again_after_uninstall);
fn traffic_follows_the_redirect_and_flows_directly_again_after_uninstall(engine: Engine) {
    if !privileged() {
        return;
    }
    let net = Network::new(engine.conf());
    let sibling = Sibling::new(&net, &[8080, 5432], &["198.18.0.200/24", "fd18::200/64"]);
    let (server, s4, s6) = (&sibling.pod, sibling.v4, sibling.v6);
    // The "VM": attached without annotations, so the plugin leaves it alone; the host command
    // installs the redirect.
    let vm = net.pod("vm", None);
    let _l = consul_app_listeners(&vm.ns);
    let (vm4, vm6) = (vm.addr(Fam::V4), vm.addr(Fam::V6));
    ok(&redirect(&vm.ns, engine.backend(), CONSUL_FLAGS, &[]));

    assert_eq!(dial(&vm.ns, None, sa(s4, 8080)), Ok(format!("outbound {s4}:8080")));
    assert_eq!(who(&dial(&vm.ns, Some(APP_UID), sa(s4, 8080))), "outbound");
    assert_eq!(who(&dial(&vm.ns, Some(PROXY_UID), sa(s4, 8080))), "server:8080", "the proxy goes straight out");
    assert_eq!(who(&dial(&vm.ns, Some(CONNECT_INIT_UID), sa(s4, 8080))), "server:8080", "excluded UID");
    assert_eq!(who(&dial(&vm.ns, Some(7500), sa(s4, 8080))), "server:8080", "excluded UID range");
    assert_eq!(who(&dial(&vm.ns, None, sa(s4, 5432))), "server:5432", "excluded port");
    assert_eq!(who(&dial(&vm.ns, None, sa([198, 18, 0, 200], 8080))), "server:8080", "excluded CIDR");
    assert_eq!(who(&dial(&vm.ns, None, sa(Ipv4Addr::LOCALHOST, 8080))), "app-local");
    assert_eq!(dial(&server.ns, None, sa(vm4, 7000)), Ok(format!("inbound {vm4}:7000")));
    assert_eq!(who(&dial(&server.ns, None, sa(vm4, 9090))), "app:9090", "excluded inbound port");
    assert_eq!(udp_ask(&vm.ns, None, "127.0.0.1:53".parse().unwrap()).as_deref(), Ok("consul-dns-udp"));
    assert_eq!(dial(&vm.ns, None, sa(s6, 8080)), Ok(format!("outbound6 [{s6}]:8080")));
    assert_eq!(who(&dial(&vm.ns, None, sa("fd18::200".parse::<IpAddr>().unwrap(), 8080))), "server6:8080");
    assert_eq!(dial(&server.ns, None, sa(vm6, 7000)), Ok(format!("inbound6 [{vm6}]:7000")));

    ok(&uninstall(&vm.ns, engine.backend(), &[]));
    assert_eq!(who(&dial(&vm.ns, None, sa(s4, 8080))), "server:8080", "no redirect once uninstalled");
    assert_eq!(who(&dial(&vm.ns, None, sa(s6, 8080))), "server6:8080");
    assert_eq!(who(&dial(&server.ns, None, sa(vm4, 7000))), "refused", "nothing listens on 7000 itself");
    assert_eq!(engine.our_rules(&vm.ns), 0);
}

/// A host upgraded across the change of the default engine (or a `redirect` run with the other
/// `--backend`) must not keep two redirects that disagree: the one left by the other engine would
/// still redirect what the new one excludes. `redirect` removes the other engine's rules once its
/// own are in place, and `uninstall` removes both engines' rules, whichever `--backend` it is given.
#[test]
fn the_other_engines_earlier_redirect_is_replaced_and_uninstalled_too() {
    if !privileged() {
        return;
    }
    let net = Network::new(Engine::Nftables.conf());
    let sibling = Sibling::new(&net, &[8080, 5432], &["198.18.0.200/24", "fd18::200/64"]);
    let s4 = sibling.v4;
    let vm = net.pod("vm", None);
    let _l = consul_app_listeners(&vm.ns);
    let path = vm.ns.path();
    let netns = path.to_str().unwrap();
    let proxy = ["--proxy-uid", "5995", "--proxy-outbound-port", "15001", "--proxy-inbound-port", "20000"];
    let iptables = Engine::Iptables("nft");

    // Before the upgrade: the iptables engine, every port redirected.
    ok(&redirect(&vm.ns, "nft", &proxy, &[]));
    assert_eq!(who(&dial(&vm.ns, None, sa(s4, 5432))), "outbound");
    // After it: the default engine, no --backend, and port 5432 now excluded.
    let mut args = vec!["redirect", "--netns", netns, "--exclude-outbound-port", "5432"];
    args.extend_from_slice(&proxy);
    let out = ok(&tproxy(&args, &[]));
    assert!(out.contains(", nftables)") && out.contains("removed the earlier rules of iptables-nft"), "{out}");
    assert_eq!(iptables.our_rules(&vm.ns), 0, "{}", vm.ns.snapshot());
    assert_eq!(who(&dial(&vm.ns, None, sa(s4, 5432))), "server:5432", "the new exclusion holds");
    assert_eq!(who(&dial(&vm.ns, None, sa(s4, 8080))), "outbound");

    // The other way round, then an uninstall with the default engine removes the iptables rules.
    let out = ok(&redirect(&vm.ns, "nft", &proxy, &[]));
    assert!(out.contains("removed the earlier rules of nftables"), "{out}");
    assert_eq!(Engine::Nftables.our_rules(&vm.ns), 0, "{}", vm.ns.nft_ruleset());
    let out = ok(&tproxy(&["uninstall", "--netns", netns], &[]));
    assert!(out.contains("(iptables-nft): ipv4"), "{out}");
    assert_eq!(iptables.our_rules(&vm.ns) + Engine::Nftables.our_rules(&vm.ns), 0);
    assert_eq!(who(&dial(&vm.ns, None, sa(s4, 8080))), "server:8080", "no redirect once uninstalled");
    assert!(ok(&tproxy(&["uninstall", "--netns", netns], &[])).contains("nothing to remove"));
}

#[test]
fn uninstall_restores_the_namespace_exactly_and_dry_runs_change_nothing() {
    if !privileged() {
        return;
    }
    for backend in BACKENDS {
        let (ns, before) = Netns::with_canary("tpu", backend);

        let dry = ok(&redirect(&ns, backend, &["--proxy-uid", "5995", "--dry-run"], &[]));
        assert!(
            dry.starts_with(&format!(
                "# ipv4: /usr/sbin/iptables-{backend}-restore --noflush\n*nat\n-N CONSUL_PROXY_INBOUND\n"
            )),
            "{backend}: {dry}"
        );
        assert!(dry.contains("-j REDIRECT --to-ports 15001"), "{dry}");
        // IPv6 only on lo (::1): nothing there to redirect, so no IPv6 pass.
        assert!(!dry.contains("# ipv6"), "{backend}: {dry}");
        assert_eq!(ns.snapshot(), before, "{backend}: redirect --dry-run changes nothing");
        let out = uninstall(&ns, backend, &["--dry-run"]);
        assert!(ok(&out).is_empty(), "{backend}: no transaction to print");
        assert!(text(&out.stderr).contains("nothing of ours"), "{backend}: {}", text(&out.stderr));

        ok(&redirect(&ns, backend, &["--proxy-uid", "5995"], &[]));
        let installed = ns.snapshot();
        assert_ne!(installed, before);
        assert_eq!(ns.our_rule_count(Fam::V4, backend), 8, "{backend}: {installed}");
        let again = ok(&redirect(&ns, backend, &["--proxy-uid", "5995"], &[]));
        assert!(again.contains("consul redirect replaced"), "{again}");
        assert_eq!(ns.snapshot(), installed, "{backend}: a second redirect leaves one copy");

        // A dry run over our own rules shows the replacing transaction, and still changes nothing.
        let dry =
            ok(&redirect(&ns, backend, &["--proxy-uid", "5995", "--proxy-inbound-port", "21000", "--dry-run"], &[]));
        assert!(
            dry.contains("-D OUTPUT -p tcp -m comment --comment tproxy-cni -j CONSUL_PROXY_OUTPUT")
                && dry.contains(":CONSUL_PROXY_INBOUND - [0:0]")
                && dry.contains("--to-ports 21000"),
            "{dry}"
        );
        let dry = ok(&uninstall(&ns, backend, &["--dry-run"]));
        assert!(dry.contains("-X CONSUL_PROXY_OUTPUT") && !dry.contains("CANARY"), "{backend}: {dry}");
        assert_eq!(ns.snapshot(), installed, "{backend}: dry runs change nothing");

        let out = ok(&uninstall(&ns, backend, &[]));
        assert_eq!(
            out,
            format!(
                "tproxy-cni: removed from network namespace {} (iptables-{backend}): ipv4: 8 rule(s), 5 chain(s)\n",
                ns.path().display()
            )
        );
        assert_eq!(ns.snapshot(), before, "{backend}: uninstall restores the namespace exactly, canary included");
        assert!(ok(&uninstall(&ns, backend, &[])).contains("nothing to remove"));
        assert_eq!(ns.snapshot(), before);
    }
}

#[test]
fn rules_under_our_names_that_we_did_not_install_are_refused() {
    if !privileged() {
        return;
    }
    // What `consul connect redirect-traffic` leaves (no comments), and what an old kuma-init left.
    let foreign = [
        (
            "consul",
            "*nat\n:CONSUL_PROXY_OUTPUT - [0:0]\n:CONSUL_PROXY_REDIRECT - [0:0]\n-A OUTPUT -p tcp -j CONSUL_PROXY_OUTPUT\n\
             -A CONSUL_PROXY_OUTPUT -m owner --uid-owner 5995 -j RETURN\n-A CONSUL_PROXY_OUTPUT -j CONSUL_PROXY_REDIRECT\n\
             -A CONSUL_PROXY_REDIRECT -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n",
        ),
        ("kuma", "*nat\n:KUMA_MESH_OUTBOUND - [0:0]\n-A OUTPUT -p tcp -j KUMA_MESH_OUTBOUND\nCOMMIT\n"),
    ];
    for (who, rules) in foreign {
        for backend in BACKENDS {
            let (ns, _) = Netns::with_canary("tpx", backend);
            ns.restore(Fam::V4, backend, rules);
            let before = ns.snapshot();
            for out in [uninstall(&ns, backend, &[]), uninstall(&ns, backend, &["--dry-run"])] {
                let err = refused(&out);
                assert!(
                    err.contains("ipv4 nat has") && err.contains("without its ownership comment"),
                    "{who} {backend}: {err}"
                );
                assert!(err.contains("remove them with that tool"), "{err}");
            }
            let err = refused(&redirect(&ns, backend, &["--proxy-uid", "5995"], &[]));
            assert!(err.contains("without its ownership comment"), "{who} {backend}: {err}");
            assert_eq!(ns.snapshot(), before, "{who} {backend}: nothing may change");
        }
    }
}

/// An "sshd" in one namespace with one client connection from another, both held open.
struct SshSession {
    _listener: TcpListener,
    _server_side: TcpStream,
    client_side: TcpStream,
}

fn ssh_session(server: &Netns, server_ip: IpAddr, port: u16, client: &Netns) -> SshSession {
    let listener = in_netns(server, None, || TcpListener::bind(sa(Ipv4Addr::UNSPECIFIED, port))).unwrap();
    let client_side = in_netns(client, None, || TcpStream::connect_timeout(&sa(server_ip, port), TIMEOUT)).unwrap();
    let (server_side, _) = listener.accept().unwrap();
    SshSession { _listener: listener, _server_side: server_side, client_side }
}

#[test]
fn the_ssh_guard_refuses_to_cut_a_session_unless_excluded_or_forced() {
    let Some(net) = Fixture::new("nft", json!({})) else { return };
    let vm = net.pod("vm", None);
    let laptop = net.pod("laptop", None);
    let vm4 = vm.addr(Fam::V4);
    let session = ssh_session(&vm.ns, vm4, 22, &laptop.ns);
    let client = session.client_side.local_addr().unwrap();
    vm.ns.plant_canary("nft");
    let before = vm.ns.snapshot();

    for dry in [false, true] {
        let mut flags = vec!["--proxy-uid", "5995"];
        if dry {
            flags.push("--dry-run");
        }
        let err = refused(&redirect(&vm.ns, "nft", &flags, &[]));
        assert_eq!(
            err,
            format!(
                "tproxy-cni: refusing to install: the redirect would send inbound TCP port 22 to the proxy, cutting \
                 the SSH session {client} -> {vm4}:22 and every new login; exclude it with --exclude-inbound-port 22, \
                 or pass --force to install anyway\n"
            )
        );
        assert_eq!(vm.ns.snapshot(), before, "refused: nothing changed");
    }

    // Excluding the port makes it safe.
    ok(&redirect(&vm.ns, "nft", &["--proxy-uid", "5995", "--exclude-inbound-port", "22"], &[]));
    ok(&uninstall(&vm.ns, "nft", &[]));
    // So does a range that covers it; a config file's refusal names the file's key.
    let file = TempDir::new("cfg");
    let path = file.path().join("consul.json");
    std::fs::write(&path, r#"{"ProxyUserID":"5995","ProxyInboundPort":20000}"#).unwrap();
    let err = refused(&redirect(&vm.ns, "nft", &["--consul-config", path.to_str().unwrap()], &[]));
    assert!(err.contains(&format!("exclude it with \"22\" in ExcludeInboundPorts of {}", path.display())), "{err}");
    std::fs::write(&path, r#"{"ProxyUserID":"5995","ProxyInboundPort":20000,"ExcludeInboundPorts":["20:30"]}"#)
        .unwrap();
    ok(&redirect(&vm.ns, "nft", &["--consul-config", path.to_str().unwrap()], &[]));
    ok(&uninstall(&vm.ns, "nft", &[]));
    assert_eq!(vm.ns.snapshot(), before);

    // --force installs anyway, and the guard was right: a new login now lands on the proxy.
    ok(&redirect(&vm.ns, "nft", &["--proxy-uid", "5995", "--force"], &[]));
    let _proxy = Responder::tcp(&vm.ns, sa(Ipv4Addr::UNSPECIFIED, 20000), "proxy-inbound");
    assert_eq!(dial(&laptop.ns, None, sa(vm4, 22)), Ok(format!("proxy-inbound {vm4}:22")));
    ok(&uninstall(&vm.ns, "nft", &[]));
    drop(session);

    // sshd on another port: only SSH_CONNECTION tells the guard which port is SSH.
    let session = ssh_session(&vm.ns, vm4, 2222, &laptop.ns);
    let client = session.client_side.local_addr().unwrap();
    ok(&redirect(&vm.ns, "nft", &["--proxy-uid", "5995"], &[]));
    ok(&uninstall(&vm.ns, "nft", &[]));
    let ssh_connection = format!("{} {} {vm4} 2222", client.ip(), client.port());
    let err = refused(&redirect(&vm.ns, "nft", &["--proxy-uid", "5995"], &[("SSH_CONNECTION", &ssh_connection)]));
    assert!(err.contains(&format!("cutting your SSH session {client} -> {vm4}:2222")), "{err}");
    assert!(err.contains("--exclude-inbound-port 2222"), "{err}");
    // A session named by SSH_CONNECTION but living in another namespace is not at risk here.
    let elsewhere = Netns::new("tpo");
    ok(&redirect(&elsewhere, "nft", &["--proxy-uid", "5995"], &[("SSH_CONNECTION", &ssh_connection)]));
    assert_eq!(vm.ns.snapshot(), before);
}

#[test]
fn user_names_resolve_and_bad_input_is_refused_with_nothing_changed() {
    if !privileged() {
        return;
    }
    let (ns, before) = Netns::with_canary("tpn", "nft");
    let nobody = sh(Command::new("id").args(["-u", "nobody"])).trim().to_owned();
    let dry = ok(&redirect(&ns, "nft", &["--proxy-uid", "nobody", "--exclude-uid", "root", "--dry-run"], &[]));
    assert!(dry.contains(&format!("-m owner --uid-owner {nobody} -m comment")), "{dry}");
    assert!(dry.contains("-m owner --uid-owner 0 -m comment"), "{dry}");

    let file = TempDir::new("cfg");
    let bad_json = file.path().join("bad.json");
    std::fs::write(
        &bad_json,
        r#"{"ProxyUserID":"5995","ProxyInboundPort":20000,"ExcludeOutboundCIDRs":["10.0.0.0/8 -j ACCEPT"]}"#,
    )
    .unwrap();
    let refusals: [(&[&str], &str); 6] = [
        (&["--proxy-uid", "no-such-user-x"], "--proxy-uid: no user named \"no-such-user-x\""),
        (&["--proxy-uid", "5995", "--exclude-uid", "ghost-user"], "--exclude-uid: no user named \"ghost-user\""),
        (
            &["--proxy-uid", "5995", "--consul-dns-ip", "::1"],
            "--consul-dns-ip ::1 is IPv6 but dual-stack mode is off (--dual-stack is not set)",
        ),
        (&["--proxy-uid", "5995", "--dual-stack", "--consul-dns-ip", "127.0.0.1"], "is IPv4 but dual-stack mode is on"),
        (
            &["--consul-config", bad_json.to_str().unwrap()],
            "ExcludeOutboundCIDRs entry \"10.0.0.0/8 -j ACCEPT\" is not a CIDR",
        ),
        (&["--consul-config", "/nonexistent/consul.json"], "cannot read /nonexistent/consul.json"),
    ];
    for (flags, want) in refusals {
        let err = refused(&redirect(&ns, "nft", flags, &[]));
        assert!(err.contains(want), "{flags:?}: {err}");
    }
    // Values that do not parse are usage errors (status 2), caught before anything is opened.
    let usage: [(&[&str], &str); 5] = [
        (&["--proxy-uid", "5995", "--proxy-inbound-port", "70000"], "port \"70000\" is out of range"),
        (&["--proxy-uid", "5995", "--exclude-outbound-cidr", "10.0.0.0/8\n-A OUTPUT -j ACCEPT"], "is not a CIDR"),
        (&["--proxy-uid", "a b"], "is neither a UID nor a user name"),
        (&[], "say which mesh: give Consul's flags (--proxy-uid USER, or --consul-config FILE) or Kuma's"),
        (&["--consul-config", "x.json", "--proxy-inbound-port", "1"], "cannot be used with"),
    ];
    for (flags, want) in usage {
        let out = redirect(&ns, "nft", flags, &[]);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(want), "{flags:?}: {}", text(&out.stderr));
    }
    let out = tproxy(&["redirect", "--netns", "/nonexistent/netns", "--proxy-uid", "5995"], &[]);
    assert!(refused(&out).contains("network namespace /nonexistent/netns does not exist"));
    assert_eq!(ns.snapshot(), before, "nothing changed");
}

/// The unit files shipped in `installer/host/`, read as systemd reads them.
fn unit_file(name: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("installer/host").join(name)).unwrap()
}

/// A `Key=` line's value in a unit or environment file.
fn setting(text: &str, key: &str) -> String {
    let prefix = format!("{key}=");
    let line = text.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no {key}= in:\n{text}"));
    line[prefix.len()..].to_owned()
}

#[test]
fn the_systemd_units_verify_and_bracket_the_proxy_with_redirect_and_uninstall() {
    if !privileged() {
        return;
    }
    let binary = plugin();
    let unit = unit_file("tproxy-cni-redirect@.service").replace("/usr/local/bin/tproxy-cni", binary.to_str().unwrap());
    let env_file = unit_file("tproxy-cni.env");

    // systemd itself loads the pair: the redirect unit for envoy.service, and envoy.service with
    // the drop-in. Its dump shows the ordering both ways and the stop propagation.
    let dir = TempDir::new("units");
    std::fs::write(dir.path().join("tproxy-cni-redirect@envoy.service"), &unit).unwrap();
    std::fs::write(
        dir.path().join("envoy.service"),
        "[Unit]\nDescription=stand-in proxy\n[Service]\nExecStart=/bin/sleep infinity\n",
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("envoy.service.d")).unwrap();
    std::fs::write(dir.path().join("envoy.service.d/tproxy-cni.conf"), unit_file("proxy-dropin.conf")).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join("tproxy-cni-redirect@envoy.service"))
        .arg(dir.path().join("envoy.service"))
        .env("SYSTEMD_LOG_LEVEL", "debug")
        .output()
        .expect("systemd-analyze (Debian package systemd; hack/deps.sh installs it)");
    assert!(out.status.success(), "systemd-analyze verify: {}", text(&out.stderr));
    let dump = text(&out.stdout);
    let unit_dump = |name: &str| -> String {
        let start = dump.find(&format!("-> Unit {name}:")).unwrap_or_else(|| panic!("{name} not in the dump:\n{dump}"));
        dump[start..]
            .lines()
            .skip(1)
            .take_while(|l| !l.trim_start().starts_with("-> Unit "))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let ours = unit_dump("tproxy-cni-redirect@envoy.service");
    let proxy = unit_dump("envoy.service");
    for want in ["Before: envoy.service", "PartOf: envoy.service", "EnvironmentFile: /etc/tproxy-cni/envoy.env"] {
        assert!(ours.contains(want), "{want}:\n{ours}");
    }
    // `(origin-file)`: set by envoy.service's own files, that is the drop-in.
    for want in [
        "DropIn Path: ",
        "Requires: tproxy-cni-redirect@envoy.service (origin-file)",
        "After: tproxy-cni-redirect@envoy.service (origin-file",
        "ConsistsOf: tproxy-cni-redirect@envoy.service",
    ] {
        assert!(proxy.contains(want), "envoy.service must have {want:?}:\n{proxy}");
    }

    // What systemd would run, with the shipped environment file, in a namespace of ours.
    let flags = setting(&env_file, "TPROXY_CNI_REDIRECT_FLAGS");
    let mode = setting(&env_file, "TPROXY_CNI_IPTABLES_MODE");
    let backend = setting(&env_file, "TPROXY_CNI_BACKEND");
    assert_eq!(backend, "nftables", "the shipped file states the default engine");
    let run = |line: &str, ns: &Netns| {
        let words: Vec<String> = setting(&unit, line)
            .split_whitespace()
            .flat_map(|w| match w {
                "$TPROXY_CNI_REDIRECT_FLAGS" => flags.split_whitespace().map(str::to_owned).collect(),
                w => vec![w.to_owned()],
            })
            .collect();
        let out = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .args(&words)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("TPROXY_CNI_IPTABLES_MODE", &mode)
            .env("TPROXY_CNI_BACKEND", &backend)
            .output()
            .unwrap();
        assert!(out.status.success(), "{line} {words:?}: {}", text(&out.stderr));
    };
    let ns = Netns::new("tps");
    ns.plant_canary("nft");
    let before = ns.snapshot_with_nft();
    run("ExecStart", &ns);
    let v4 = ns.nft_table(Fam::V4);
    assert!(v4.contains("tcp dport 22 counter packets 0 bytes 0 return"), "{v4}");
    assert!(v4.contains("dnat to 127.0.0.1:8600"), "{v4}");
    assert_eq!(ns.our_rule_count(Fam::V4, "nft") + ns.our_rule_count(Fam::V6, "nft"), 0, "no iptables rule of ours");
    run("ExecStart", &ns);
    run("ExecStop", &ns);
    assert_eq!(ns.snapshot_with_nft(), before, "ExecStop leaves the namespace as it was");
}

/// A Kuma VM's configuration, as Kuma's YAML…
const KUMA_YAML: &str = r#"kumaDPUser: "5678"
redirect:
  inbound: {port: 15006, excludePorts: [9090], excludePortsForIPs: ["198.18.0.201/32", "fd18::201/128"]}
  outbound: {port: 15001, excludePorts: [5432], excludePortsForIPs: ["198.18.0.200/32", "fd18::200/128"]}
  dns: {enabled: true, port: 15053, captureAll: true}
"#;

/// …and as `kumactl install transparent-proxy`'s flags.
const KUMA_FLAGS: &[&str] = &[
    "--kuma-dp-user",
    "5678",
    "--redirect-inbound-port",
    "15006",
    "--redirect-outbound-port",
    "15001",
    "--exclude-inbound-ports",
    "9090",
    "--exclude-outbound-ports",
    "5432",
    "--exclude-inbound-ips",
    "198.18.0.201/32,fd18::201/128",
    "--exclude-outbound-ips",
    "198.18.0.200/32",
    "--exclude-outbound-ips",
    "fd18::200/128",
    "--redirect-all-dns-traffic",
    "--redirect-dns-port",
    "15053",
];
const KUMA_PROXY_UID: u32 = 5678;

#[test]
fn redirect_with_kuma_flags_installs_what_a_kuma_pod_gets() {
    for net in Fixture::backends(json!({})) {
        let backend = net.backend;
        let pod = net.pod("web", Some(&kuma_pod(Some(&format!("cniMode: true\n{KUMA_YAML}")), &[])));
        let from_cni = pod.ns.snapshot();
        assert!(from_cni.contains("KUMA_MESH_OUTBOUND") && pod.ns.passthrough_v6() > 0, "{backend}: {from_cni}");

        let host = net.pod("vm", None);
        let out = ok(&redirect(&host.ns, backend, KUMA_FLAGS, &[]));
        assert!(out.starts_with("tproxy-cni: kuma redirect installed in network namespace"), "{out}");
        assert_eq!(host.ns.snapshot(), from_cni, "{backend}: kumactl's flags must give exactly the pod's rules");
        assert!(host.ns.passthrough_v6() > 0, "{backend}: ::6 on lo, as for the pod");

        // Kuma's YAML from a file; flags given override it, as kumactl's do.
        let file = TempDir::new("cfg");
        let path = file.path().join("tproxy.yaml");
        std::fs::write(&path, KUMA_YAML).unwrap();
        let host = net.pod("vm", None);
        ok(&redirect(&host.ns, backend, &["--kuma-config", path.to_str().unwrap()], &[]));
        assert_eq!(host.ns.snapshot(), from_cni, "{backend}: --kuma-config must give exactly the pod's rules");
        ok(&redirect(
            &host.ns,
            backend,
            &["--kuma-config", path.to_str().unwrap(), "--redirect-inbound-port", "16000"],
            &[],
        ));
        let v4 = host.ns.save(Fam::V4, backend);
        assert!(v4.contains("--to-ports 16000") && !v4.contains("--to-ports 15006"), "{backend}: {v4}");
        assert!(v4.contains("--dport 9090"), "{backend}: the file's other settings stay");
    }
}

both_engines!(kuma_traffic_follows_the_redirect_and_uninstall_restores_everything);
fn kuma_traffic_follows_the_redirect_and_uninstall_restores_everything(engine: Engine) {
    if !privileged() {
        return;
    }
    let net = Network::new(engine.conf());
    let sibling = Sibling::new(&net, &[8080, 5432], &["198.18.0.200/24", "198.18.0.201/24"]);
    let (server, s4, s6) = (&sibling.pod, sibling.v4, sibling.v6);
    let _dns = Responder::udp(&server.ns, sa(s4, 53), "server-dns");
    let vm = net.pod("vm", None);
    let vm4 = vm.addr(Fam::V4);
    // Foreign rules in every table Kuma's layout uses, in both families.
    let canary_raw = "*raw\n:CANARY_RAW - [0:0]\n-A OUTPUT -p udp -m udp --dport 9999 -j CANARY_RAW\nCOMMIT\n";
    vm.ns.plant_canary("nft");
    vm.ns.plant("nft", canary_raw);
    let before = engine.snapshot(&vm.ns);
    let lo_before = vm.ns.exec(&["ip", "-6", "addr", "show", "dev", "lo"]);

    ok(&redirect(&vm.ns, engine.backend(), KUMA_FLAGS, &[]));
    let any4 = IpAddr::from(Ipv4Addr::UNSPECIFIED);
    let any6 = IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED);
    let _l = [
        Responder::tcp(&vm.ns, sa(any4, 15001), "outbound"),
        Responder::tcp(&vm.ns, sa(any6, 15001), "outbound6"),
        Responder::tcp(&vm.ns, sa(any4, 15006), "inbound"),
        Responder::tcp(&vm.ns, sa(any4, 9090), "app:9090"),
        Responder::udp_as(&vm.ns, Some(KUMA_PROXY_UID), sa(Ipv4Addr::LOCALHOST, 15053), "kuma-dns"),
    ];
    assert_eq!(dial(&vm.ns, None, sa(s4, 8080)), Ok(format!("outbound {s4}:8080")));
    assert_eq!(who(&dial(&vm.ns, Some(APP_UID), sa(s4, 8080))), "outbound");
    assert_eq!(who(&dial(&vm.ns, Some(KUMA_PROXY_UID), sa(s4, 8080))), "server:8080", "kuma-dp goes straight out");
    assert_eq!(who(&dial(&vm.ns, None, sa(s4, 5432))), "server:5432", "excluded port");
    assert_eq!(who(&dial(&vm.ns, None, sa([198, 18, 0, 200], 8080))), "server:8080", "excluded destination");
    assert_eq!(dial_from(&server.ns, None, s4, sa(vm4, 7000)), Ok(format!("inbound {vm4}:7000")));
    assert_eq!(who(&dial_from(&server.ns, None, s4, sa(vm4, 9090))), "app:9090", "excluded inbound port");
    assert_eq!(
        who(&dial_from(&server.ns, None, [198, 18, 0, 201].into(), sa(vm4, 7000))),
        "refused",
        "excluded source"
    );
    assert_eq!(udp_ask(&vm.ns, None, sa(s4, 53)).as_deref(), Ok("kuma-dns"));
    assert_eq!(udp_ask(&vm.ns, Some(KUMA_PROXY_UID), sa(s4, 53)).as_deref(), Ok("server-dns"));
    assert_eq!(dial(&vm.ns, None, sa(s6, 8080)), Ok(format!("outbound6 [{s6}]:8080")));
    assert!(vm.ns.passthrough_v6() > 0);

    let dry = ok(&uninstall(&vm.ns, engine.backend(), &["--dry-run"]));
    let removes = match engine {
        Engine::Iptables(_) => "-X KUMA_MESH_OUTBOUND",
        Engine::Nftables => "delete table ip6 tproxy-cni",
    };
    assert!(
        dry.contains(removes)
            && dry.ends_with("# lo: remove ::6/128 (the source of Kuma's IPv6 inbound passthrough)\n"),
        "{dry}"
    );
    let out = ok(&uninstall(&vm.ns, engine.backend(), &[]));
    assert!(out.contains("ipv4: ") && out.contains("ipv6: "), "{out}");
    assert_eq!(engine.snapshot(&vm.ns), before, "uninstall restores every table exactly, canaries included");
    assert_eq!(vm.ns.exec(&["ip", "-6", "addr", "show", "dev", "lo"]), lo_before, "::6 goes with the IPv6 pass");
    assert_eq!(who(&dial(&vm.ns, None, sa(s4, 8080))), "server:8080", "no redirect once uninstalled");
}

#[test]
fn kuma_dry_run_ip_family_mode_ssh_guard_and_bad_input() {
    let Some(net) = Fixture::new("nft", json!({})) else { return };
    let vm = net.pod("vm", None);
    let laptop = net.pod("laptop", None);
    vm.ns.plant_canary("nft");
    let before = vm.ns.snapshot();

    // A dry run changes nothing, not even lo, and says what it would add there.
    let dry = ok(&redirect(&vm.ns, "nft", &["--kuma-dp-user", "5678", "--dry-run"], &[]));
    assert!(dry.contains("-N KUMA_MESH_INBOUND") && dry.contains("# ipv6: "), "{dry}");
    assert!(dry.ends_with("# lo: add ::6/128 (the source of Kuma's IPv6 inbound passthrough)\n"), "{dry}");
    assert_eq!(vm.ns.snapshot(), before);
    assert_eq!(vm.ns.passthrough_v6(), 0);

    // ipv4 mode: no IPv6 pass, no ::6.
    ok(&redirect(&vm.ns, "nft", &["--kuma-dp-user", "root", "--ip-family-mode", "ipv4"], &[]));
    assert_eq!(vm.ns.our_rule_count(Fam::V6, "nft"), 0);
    assert!(vm.ns.save(Fam::V4, "nft").contains("--uid-owner 0 "), "a user name resolves for Kuma too");
    assert_eq!(vm.ns.passthrough_v6(), 0);
    ok(&uninstall(&vm.ns, "nft", &[]));
    assert_eq!(vm.ns.snapshot(), before);

    // The SSH guard names Kuma's flags; excluding the client's address is enough.
    let vm4 = vm.addr(Fam::V4);
    let session = ssh_session(&vm.ns, vm4, 22, &laptop.ns);
    let client = session.client_side.local_addr().unwrap();
    let err = refused(&redirect(&vm.ns, "nft", &["--redirect-dns"], &[]));
    assert!(
        err.contains(&format!("cutting the SSH session {client} -> {vm4}:22"))
            && err.contains("exclude it with --exclude-inbound-ports 22 (or the client with --exclude-inbound-ips)"),
        "{err}"
    );
    assert_eq!(vm.ns.snapshot(), before);
    let file = TempDir::new("cfg");
    let yaml = file.path().join("tproxy.yaml");
    std::fs::write(&yaml, "redirect: {dns: {enabled: true}}\n").unwrap();
    let err = refused(&redirect(&vm.ns, "nft", &["--kuma-config", yaml.to_str().unwrap()], &[]));
    assert!(
        err.contains(&format!("exclude it with 22 in redirect.inbound.excludePorts of {}", yaml.display())),
        "{err}"
    );
    let client_net = format!("{}/32", client.ip());
    ok(&redirect(&vm.ns, "nft", &["--redirect-dns", "--exclude-inbound-ips", &client_net], &[]));
    ok(&uninstall(&vm.ns, "nft", &[]));
    drop(session);

    // (DNS capture used the raw table: iptables-nft leaves it behind, empty, after removal.)
    let before = vm.ns.snapshot();
    let bad = file.path().join("bad.yaml");
    std::fs::write(&bad, "redirect: {inbound: {port: 0}}\n").unwrap();
    let err = refused(&redirect(&vm.ns, "nft", &["--kuma-config", bad.to_str().unwrap()], &[]));
    assert!(err.contains(&format!("--kuma-config {}: redirect.inbound.port is 0", bad.display())), "{err}");
    std::fs::write(&bad, "redirect: [\n").unwrap();
    let err = refused(&redirect(&vm.ns, "nft", &["--kuma-config", bad.to_str().unwrap()], &[]));
    assert!(err.contains("is not Kuma's transparent proxy configuration"), "{err}");
    let err = refused(&redirect(&vm.ns, "nft", &["--kuma-dp-user", "ghost-user"], &[]));
    assert!(err.contains("--kuma-dp-user: no user named \"ghost-user\""), "{err}");
    for flags in [
        &["--exclude-inbound-ports", "22,70000"][..],
        &["--exclude-outbound-ips", "10.0.0.0/8 -j ACCEPT"],
        &["--ip-family-mode", "ipv6"],
        &["--redirect-dns", "--redirect-all-dns-traffic"],
        &["--proxy-uid", "5995", "--kuma-dp-user", "5678"],
    ] {
        assert_eq!(redirect(&vm.ns, "nft", flags, &[]).status.code(), Some(2), "{flags:?}");
    }
    assert_eq!(vm.ns.snapshot(), before, "nothing changed");
}

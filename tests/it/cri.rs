//! End to end through the runtime Kubernetes nodes run: containerd 1.6's CRI plugin, started
//! privately by each test (`support/cri.rs`), driven over its CRI socket as kubelet drives it —
//! RunPodSandbox, PodSandboxStatus, StopPodSandbox, RemovePodSandbox — with tproxy-cni chained after
//! bridge + host-local in containerd's CNI configuration. containerd hands the plugin each pod's
//! annotations in `runtimeConfig` (the conflist declares the `io.kubernetes.cri.pod-annotations`
//! capability), so no API server is involved.
//!
//! The sandboxes run a pause program and make no traffic themselves: threads of the test enter a
//! sandbox's network namespace to listen (the stand-in proxies and servers) and to dial. A pod in
//! no mesh plays the remote server; every address dialled belongs to a sandbox of the test.
//!
//! Every scenario runs once per engine of the plugin ([`engine_tests!`]); each test has a
//! containerd of its own and ends by checking that nothing of it is left on the machine.
//!
//! Needs root, containerd, runc and a static libc (`hack/deps.sh` installs them): skipped without
//! them on a laptop, a failure in CI.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::support::apiserver::{ApiServer, Fault, PodFixture};
use crate::support::cri::{Containerd, Engine, NAMESPACE, Refused, Sandbox, TOOLS, netfilter, nsenter};
use crate::support::*;
use serde_json::{Value, json};

const CONSUL_PROXY_UID: u32 = 5995;
const KUMA_PROXY_UID: u32 = 5678;
const ANY4: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
const ANY6: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
/// Kuma's transparent-proxy configuration as its webhook writes it for a CNI-mode pod (defaults
/// spelled out).
const KUMA_CONFIG: &str =
    "cniMode: true\nkumaDPUser: \"5678\"\nredirect:\n  inbound: {port: 15006}\n  outbound: {port: 15001}\n";

/// The scenarios, once per engine: an engine is one line of the invocation below.
macro_rules! engine_tests {
    ($($module:ident => $engine:expr),* $(,)?) => {$(
        mod $module {
            #[test]
            fn sandboxes_are_redirected_or_untouched_and_leave_nothing_behind() {
                super::sandboxes_through_the_cri($engine);
            }

            #[test]
            fn annotations_from_containerd_need_no_api_server() {
                super::with_an_api_server($engine);
            }
        }
    )*};
}

engine_tests! {
    iptables_nft => super::Engine::IptablesNft,
    iptables_legacy => super::Engine::IptablesLegacy,
    nftables => super::Engine::Nftables,
}

/// A Consul pod's annotations as consul-k8s's webhook writes them (CNI mode).
fn consul_annotations(inbound: u32) -> Value {
    consul_pod(
        json!({"ConsulDNSIP": "", "ConsulDNSPort": 0, "ProxyUserID": CONSUL_PROXY_UID.to_string(),
            "ProxyInboundPort": inbound, "ProxyOutboundPort": 15001, "ExcludeInboundPorts": null,
            "ExcludeOutboundPorts": null, "ExcludeOutboundCIDRs": null, "ExcludeUIDs": ["5996"],
            "NetNS": "", "IptablesProvider": null}),
        &[],
    )
}

/// The stand-in proxy of a mesh sandbox: outbound and inbound listeners in both families, each
/// answering with `<prefix>outbound` / `<prefix>inbound` (`…6` for IPv6).
fn proxy(sb: &Sandbox, prefix: &str, outbound: u16, inbound: u16) -> Vec<Responder> {
    let mut l = Vec::new();
    for (any, sfx) in [(ANY4, ""), (ANY6, "6")] {
        l.push(Responder::tcp(&sb.ns, sa(any, outbound), &format!("{prefix}outbound{sfx}")));
        l.push(Responder::tcp(&sb.ns, sa(any, inbound), &format!("{prefix}inbound{sfx}")));
    }
    l
}

/// The sandbox ID in containerd's message about a RunPodSandbox whose network setup failed.
fn sandbox_id(msg: &str) -> &str {
    let rest = msg.split_once("sandbox \"").map(|(_, r)| r).unwrap_or_else(|| panic!("no sandbox ID in {msg:?}"));
    rest.split('"').next().unwrap()
}

/// The plugin's log lines about sandbox `id`.
fn log_of(ctd: &Containerd, id: &str) -> Vec<String> {
    let tag = format!("container={} ", &id[..12]);
    ctd.plugin_log().lines().filter(|l| l.contains(&tag)).map(str::to_owned).collect()
}

/// How many times the plugin was called with `verb` (`Add`, `Del`) for sandbox `id`.
fn calls(ctd: &Containerd, id: &str, verb: &str) -> usize {
    let what = format!(": {verb} (cniVersion");
    log_of(ctd, id).iter().filter(|l| l.contains(&what)).count()
}

fn sandboxes_through_the_cri(engine: Engine) {
    if !privileged_with(TOOLS) {
        return;
    }
    let _load = busy();
    let ctd = Containerd::start(engine, json!({}));

    // A pod with no annotations at all (containerd passes `null`), which plays the remote server;
    // a pod with annotations of no mesh (as kubelet's own); a Consul pod and a Kuma pod.
    let server = ctd.run("server", None);
    let plain = ctd.run("plain", Some(&json!({"kubernetes.io/config.source": "api", "team": "web"})));
    let (web_annotations, shop_annotations) = (consul_annotations(20000), kuma_pod(Some(KUMA_CONFIG), &[]));
    let web = ctd.run("web", Some(&web_annotations));
    let shop = ctd.run("shop", Some(&shop_annotations));
    let sandboxes = [&server, &plain, &web, &shop];
    // What a running sandbox holds, so that the checks of its absence below can fail: one veth,
    // two addresses and a namespace mount each; containerd's entry, directories under its root
    // and state, the shm and pause rootfs mounts, libcni's two cached results, the shim's socket.
    assert_eq!(ctd.bridge_ports().len(), 4, "one veth per sandbox");
    assert_eq!(ctd.reserved().len(), 8, "two addresses per sandbox");
    assert_eq!(ctd.netns_mounts().len(), 4, "one namespace per sandbox");
    for sb in sandboxes {
        let traces = ctd.traces_of(&sb.id);
        let kinds = [("sandbox ", 1), ("directory ", 2), ("mount ", 2), ("CNI cache ", 2), ("shim socket ", 1)];
        for (kind, n) in kinds {
            assert_eq!(traces.iter().filter(|t| t.starts_with(kind)).count(), n, "{}: {traces:#?}", sb.name);
        }
    }

    // In each mesh sandbox's namespace, exactly the rules its annotations must give, in both
    // families; the plugin says so in its log.
    engine.assert_installed(&web.ns, &web_annotations, "web");
    engine.assert_installed(&shop.ns, &shop_annotations, "shop");
    for (sb, line) in [(&web, "consul redirect installed"), (&shop, "kuma redirect installed")] {
        assert!(log_of(&ctd, &sb.id).iter().any(|l| l.contains(line)), "{}: {:#?}", sb.name, log_of(&ctd, &sb.id));
    }

    // Real traffic. The servers and proxies are the harness's listeners in the sandboxes' namespaces.
    let _server =
        [Responder::tcp(&server.ns, sa(ANY4, 8080), "server"), Responder::tcp(&server.ns, sa(ANY6, 8080), "server6")];
    let _web_proxy = proxy(&web, "", 15001, 20000);
    let _shop_proxy = proxy(&shop, "kuma-", 15001, 15006);
    let (s4, s6) = (server.v4, server.v6);
    // Outbound from a mesh pod lands on its proxy, which sees where it was going; the proxy's own
    // UID goes straight to the server.
    assert_eq!(dial(&web.ns, None, sa(s4, 8080)), Ok(format!("outbound {s4}:8080")));
    assert_eq!(dial(&web.ns, None, sa(s6, 8080)), Ok(format!("outbound6 [{s6}]:8080")));
    assert_eq!(who(&dial(&web.ns, Some(CONSUL_PROXY_UID), sa(s4, 8080))), "server");
    assert_eq!(who(&dial(&web.ns, Some(CONSUL_PROXY_UID), sa(s6, 8080))), "server6");
    assert_eq!(dial(&shop.ns, None, sa(s4, 8080)), Ok(format!("kuma-outbound {s4}:8080")));
    assert_eq!(dial(&shop.ns, None, sa(s6, 8080)), Ok(format!("kuma-outbound6 [{s6}]:8080")));
    assert_eq!(who(&dial(&shop.ns, Some(KUMA_PROXY_UID), sa(s4, 8080))), "server");
    assert_eq!(who(&dial(&shop.ns, Some(KUMA_PROXY_UID), sa(s6, 8080))), "server6");
    // Inbound: another pod dialling any port of a mesh pod reaches that pod's proxy.
    let (w4, w6, k4) = (web.v4, web.v6, shop.v4);
    assert_eq!(dial(&plain.ns, None, sa(w4, 7000)), Ok(format!("inbound {w4}:7000")));
    assert_eq!(dial(&plain.ns, None, sa(w6, 7000)), Ok(format!("inbound6 [{w6}]:7000")));
    assert_eq!(dial(&plain.ns, None, sa(k4, 7000)), Ok(format!("kuma-inbound {k4}:7000")));
    // Pods in no mesh reach the server directly, and hold no netfilter state at all.
    assert_eq!(who(&dial(&plain.ns, None, sa(s4, 8080))), "server");
    assert_eq!(who(&dial(&plain.ns, None, sa(s6, 8080))), "server6");
    for sb in [&server, &plain] {
        assert_eq!(netfilter(&sb.ns), "", "{}'s namespace must be untouched", sb.name);
    }

    // A Consul pod whose annotation is malformed: RunPodSandbox fails with our message, and
    // containerd's cleanup (DEL, netns removal) leaves nothing of it.
    let Err(Refused(msg)) = ctd.try_run("broken", Some(&consul_annotations(65536))) else {
        panic!("RunPodSandbox of a pod with an impossible redirect must fail");
    };
    assert!(msg.contains(r#"plugin type="tproxy-cni" failed (add)"#), "{msg}");
    assert!(msg.contains(r#"ProxyInboundPort "65536" is out of range (1-65535)"#), "{msg}");
    let broken = sandbox_id(&msg);
    assert_eq!(ctd.traces_of(broken), Vec::<String>::new(), "the refused sandbox left something");
    assert_eq!(ctd.bridge_ports().len(), 4, "the refused sandbox's veth is gone");
    assert_eq!(ctd.reserved().len(), 8, "the refused sandbox's addresses are released");
    assert_eq!(ctd.netns_mounts().len(), 4, "the refused sandbox's namespace is gone");
    assert!(!log_of(&ctd, broken).iter().any(|l| l.contains("redirect installed")), "{:#?}", log_of(&ctd, broken));
    // containerd's cleanup after a failed ADD is one DEL, with the namespace.
    assert_eq!(calls(&ctd, broken, "Del"), 1, "{:#?}", log_of(&ctd, broken));

    // StopPodSandbox: DEL, with the namespace, removes our rules (the namespace is held open here,
    // so this is seen in it rather than inferred from its removal) and the lock file; containerd
    // then releases the veth, the addresses and the namespace. RemovePodSandbox: DEL again, and
    // the sandbox is gone without a trace.
    for (n, sb) in sandboxes.iter().enumerate() {
        let had_rules = !engine.ours(&sb.ns).is_empty();
        assert_eq!(had_rules, [&web.id, &shop.id].contains(&&sb.id), "{}", sb.name);
        // Lock files are named after the namespace's inode, which the kernel reuses, and other
        // tests on the machine may leave one behind: only where the plugin makes one is one under
        // this name expected, and only DEL by such a plugin is expected to take it away.
        let lock = Containerd::lock_file(&sb.ns.id());
        if engine.locks() && had_rules {
            assert!(lock.exists(), "{}: no {}", sb.name, lock.display());
        }
        let six = |sb: &Sandbox| nsenter(&sb.ns, &["ip", "-6", "addr", "show", "dev", "lo"]).contains("::6/128");
        assert_eq!(six(sb), sb.id == shop.id, "{}: Kuma's ::6 on lo, and only there", sb.name);

        ctd.stop(&sb.id).unwrap_or_else(|s| panic!("StopPodSandbox {}: {s}", sb.name));
        assert_eq!(engine.ours(&sb.ns), Vec::<String>::new(), "{}: rules left after StopPodSandbox", sb.name);
        assert!(!(engine.locks() && lock.exists()), "{}: lock file left after StopPodSandbox", sb.name);
        assert!(!six(sb), "{}: Kuma's ::6 left after StopPodSandbox", sb.name);
        assert!(!sb.netns.exists(), "{}: namespace mount left after StopPodSandbox", sb.name);
        assert_eq!(ctd.bridge_ports().len(), 3 - n, "{}: veth left after StopPodSandbox", sb.name);
        let reserved = ctd.reserved();
        for ip in [sb.v4, sb.v6] {
            assert!(!reserved.contains(&ip.to_string()), "{}: {ip} still reserved: {reserved:?}", sb.name);
        }
        assert_eq!(calls(&ctd, &sb.id, "Del"), 1, "{}: {:#?}", sb.name, log_of(&ctd, &sb.id));

        ctd.remove(&sb.id).unwrap_or_else(|s| panic!("RemovePodSandbox {}: {s}", sb.name));
        assert_eq!(ctd.traces_of(&sb.id), Vec::<String>::new(), "{}: left after RemovePodSandbox", sb.name);
        assert_eq!(calls(&ctd, &sb.id, "Add"), 1, "{}", sb.name);
        assert_eq!(calls(&ctd, &sb.id, "Del"), 2, "{}: {:#?}", sb.name, log_of(&ctd, &sb.id));
        assert_eq!(calls(&ctd, &sb.id, "Check"), 0, "{}: containerd 1.6 never calls CHECK", sb.name);
    }
    ctd.finish();
}

/// With a `kubeconfig` in the conflist too (the stand-in API server): containerd's annotations are
/// used as they come, so a mesh pod needs no API call and starts while the API server is failing;
/// the Consul status report still goes to the API server.
fn with_an_api_server(engine: Engine) {
    if !privileged_with(TOOLS) {
        return;
    }
    let _load = busy();
    let api = ApiServer::start();
    api.add_pod(PodFixture::consul(NAMESPACE, "web"));
    let ctd = Containerd::start(engine, json!({"kubeconfig": api.default_kubeconfig(), "api_timeout": "2s"}));
    let gets = |name: &str| {
        let path = format!("/api/v1/namespaces/{NAMESPACE}/pods/{name}");
        api.requests().iter().filter(|r| r.method == "GET" && r.path == path).count()
    };
    let reports = |name: &str| api.status_reports(NAMESPACE, name);

    let annotations = consul_annotations(20000);
    let web = ctd.run("web", Some(&annotations));
    engine.assert_installed(&web.ns, &annotations, "web");
    assert_eq!(gets("web"), 0, "the annotations came from containerd");
    assert_eq!(reports("web"), ["waiting", "complete"]);

    // The API server failing: a mesh pod still starts (its status report fails, which is logged
    // and not fatal), and so does a pod whose annotations name no mesh.
    api.set_fault(Some(Fault::Status(503)));
    let late = ctd.run("late", Some(&annotations));
    engine.assert_installed(&late.ns, &annotations, "late");
    let plain = ctd.run("plain", Some(&json!({"kubernetes.io/config.source": "api"})));
    assert_eq!(netfilter(&plain.ns), "");
    assert_eq!(gets("late") + gets("plain"), 0);

    // A pod with no annotations at all reaches the plugin as `"io.kubernetes.cri.pod-annotations":
    // null`: the runtime did pass them, and there are none. So it starts untouched, with no GET,
    // while the API server is failing (issue 13; before, the plugin read `null` as "no annotations
    // passed", looked the pod up and failed it).
    let bare = ctd.run("bare", None);
    assert_eq!(netfilter(&bare.ns), "", "a pod without annotations is passed through");
    assert_eq!(gets("bare"), 0, "containerd's null is an answer: no lookup");
    api.set_fault(None);
    ctd.finish();
}

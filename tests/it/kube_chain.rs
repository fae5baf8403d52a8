//! The API-server path through the real chain: libcni (`cnidrv`) drives bridge + host-local +
//! tproxy-cni with no runtime annotations, and the plugin finds each pod through the stand-in API
//! server over real TLS. Real rules in real namespaces, proven with real traffic. Every test runs
//! on both engines (`…::iptables` with iptables-nft, `…::nftables`: [`both_engines!`]).
//!
//! Needs root (skips on a laptop, fails in CI without it).

use crate::support::apiserver;

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::Command;

use crate::both_engines;
use crate::support::*;
use apiserver::{ApiServer, Fault, KubeconfigSpec, PodFixture, TOKEN};
use serde_json::{Value, json};

const PROXY_UID: u32 = 5995;
const ANY4: Ipv4Addr = Ipv4Addr::UNSPECIFIED;
const TPROXY_STATUS: &str = "consul.hashicorp.com/transparent-proxy-status";

/// A network on `engine` whose tproxy-cni entry looks pods up through `kubeconfig`, with
/// `extra`'s keys; `None` when the test cannot run here. It declares no capability, so libcni
/// hands the plugin no annotations, as a runtime that does not know the capability would.
fn network(engine: Engine, kubeconfig: &Path, extra: Value) -> Option<Network> {
    let mut conf = json!({"kubeconfig": kubeconfig, "api_timeout": "2s", "capabilities": {}});
    for (k, v) in engine.conf().as_object().unwrap().iter().chain(extra.as_object().unwrap()) {
        conf[k] = v.clone();
    }
    privileged().then(|| Network::new(conf))
}

/// How many rules of ours one family of `ns` holds, as `engine` installs them.
fn rules(engine: Engine, ns: &Netns, family: Fam) -> usize {
    ns.our_rule_count(family, engine.backend())
}

/// Everything of ours in one family of `ns`, as text: `iptables-save`, or our nftables table.
fn listing(engine: Engine, ns: &Netns, family: Fam) -> String {
    match engine {
        Engine::Iptables(backend) => ns.save(family, backend),
        Engine::Nftables => ns.nft_table(family),
    }
}

/// The sibling pod that plays the remote host: answers "server …" on 8080.
fn server<'n>(net: &'n Network, annotations: Option<&Value>) -> (Pod<'n>, IpAddr, Responder) {
    let pod = net.pod("server", annotations);
    let ip = pod.addr(Fam::V4);
    let r = Responder::tcp(&pod.ns, sa(ANY4, 8080), "server");
    (pod, ip, r)
}

/// The stand-in proxy of a mesh pod: its outbound and inbound listeners.
fn proxy(ns: &Netns) -> Vec<Responder> {
    vec![Responder::tcp(ns, sa(ANY4, 15001), "outbound"), Responder::tcp(ns, sa(ANY4, 20000), "inbound")]
}

/// The merge-patch bodies the stand-in received for one pod, in order.
fn status_patches(api: &ApiServer, pod: &str) -> Vec<(Value, u16)> {
    api.patches()
        .into_iter()
        .filter(|r| r.path == format!("/api/v1/namespaces/default/pods/{pod}"))
        .map(|r| {
            assert_eq!(r.content_type.as_deref(), Some("application/merge-patch+json"));
            (serde_json::from_str(&r.body).unwrap(), r.status)
        })
        .collect()
}

fn status_body(value: &str) -> Value {
    json!({"metadata": {"annotations": {TPROXY_STATUS: value}}})
}

both_engines!(a_consul_pod_found_through_the_api_server_gets_its_redirect);
fn a_consul_pod_found_through_the_api_server_gets_its_redirect(engine: Engine) {
    let api = ApiServer::start();
    api.add_pod(PodFixture::consul("default", "app"));
    api.add_pod(PodFixture::new("default", "server"));
    let Some(net) = network(engine, &api.default_kubeconfig(), json!({})) else { return };
    let (srv, s4, _srv_listener) = server(&net, None);
    let app = net.pod("app", None);
    let _proxy = proxy(&app.ns);

    // Outbound from the application lands on the proxy, which sees where it was going; the proxy's
    // own traffic goes straight out.
    assert_eq!(dial(&app.ns, None, sa(s4, 8080)), Ok(format!("outbound {s4}:8080")));
    assert_eq!(who(&dial(&app.ns, Some(PROXY_UID), sa(s4, 8080))), "server");
    // Inbound to the pod lands on the proxy's inbound listener.
    let a4 = app.addr(Fam::V4);
    assert_eq!(dial(&srv.ns, None, sa(a4, 7000)), Ok(format!("inbound {a4}:7000")));
    // The pod outside the mesh got nothing.
    assert_eq!(engine.our_rules(&srv.ns), 0);
    assert!(rules(engine, &app.ns, Fam::V4) > 0 && rules(engine, &app.ns, Fam::V6) > 0);
    if engine == Engine::Nftables {
        // Exactly the tables of the served pod's annotations (the pod has IPv6).
        let served = json!(PodFixture::consul("default", "app").annotations);
        assert_eq!(nft_tables(&app.ns), nft_reference(&served, true));
    }

    // consul-cni's progress report: waiting, then complete, as merge patches of that one key.
    assert_eq!(status_patches(&api, "app"), [(status_body("waiting"), 200), (status_body("complete"), 200)]);
    assert_eq!(api.pod_annotation("default", "app", TPROXY_STATUS).as_deref(), Some("complete"));
    assert!(status_patches(&api, "server").is_empty());

    // CHECK finds the pod the same way and agrees with what is installed.
    let out = app.check(None);
    assert!(out.status.success(), "CHECK: {}", text(&out));

    let log = net.plugin_log();
    assert!(!log.contains(TOKEN), "the token is in the log");
    assert!(log.contains("pod=default/app") && log.contains("consul redirect installed"), "{log}");
    let out = app.del(None);
    assert!(out.status.success(), "DEL: {}", text(&out));
    assert_eq!(engine.our_rules(&app.ns), 0);
}

both_engines!(a_pod_outside_the_mesh_passes_through_untouched);
fn a_pod_outside_the_mesh_passes_through_untouched(engine: Engine) {
    let api = ApiServer::start();
    api.add_pod(PodFixture::new("default", "server"));
    api.add_pod(PodFixture::new("default", "plain").annotation("app.kubernetes.io/name", "plain"));
    let Some(net) = network(engine, &api.default_kubeconfig(), json!({})) else { return };
    let (_srv, s4, _l) = server(&net, None);
    let plain = net.pod("plain", None);
    let before = engine.snapshot(&plain.ns);
    assert_eq!(engine.our_rules(&plain.ns), 0);
    assert_eq!(who(&dial(&plain.ns, None, sa(s4, 8080))), "server");
    let out = plain.check(None);
    assert!(out.status.success(), "CHECK: {}", text(&out));
    assert_eq!(engine.snapshot(&plain.ns), before);
    assert!(api.patches().is_empty());
}

both_engines!(a_pod_in_an_excluded_namespace_starts_while_the_api_server_is_down);
fn a_pod_in_an_excluded_namespace_starts_while_the_api_server_is_down(engine: Engine) {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let files = ApiServer::start(); // only writes the kubeconfig; nothing listens where it points
    let kc =
        files.kubeconfig("down", &KubeconfigSpec { server: Some(format!("https://{dead}")), ..Default::default() });
    let Some(net) = network(engine, &kc, json!({"api_timeout": "1s"})) else { return };

    let system = net.pod_unstarted("coredns");
    let args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns;K8S_POD_INFRA_CONTAINER_ID={}",
        system.id
    );
    let out = net.cnidrv("add", &system.ns, &system.id, &args, None);
    assert!(out.status.success(), "ADD in kube-system: {}", text(&out));
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(result["ips"].as_array().is_some_and(|ips| !ips.is_empty()), "the chain's result is passed on: {result}");
    assert_eq!(engine.our_rules(&system.ns), 0);

    // A pod that does need the API server to be classified cannot start: try again later.
    let web = net.pod_unstarted("web");
    let out = web.add(None);
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(
        msg.contains("cannot tell whether pod default/web is in a mesh") && msg.contains(&dead.to_string()),
        "{msg}"
    );
    // ...and its sandbox can still be torn down: DEL never needs the API server.
    let out = web.del(None);
    assert!(out.status.success(), "DEL: {}", text(&out));
    let out = net.cnidrv("del", &system.ns, &system.id, &args, None);
    assert!(out.status.success(), "DEL: {}", text(&out));
}

both_engines!(a_failed_status_patch_does_not_fail_add);
fn a_failed_status_patch_does_not_fail_add(engine: Engine) {
    let api = ApiServer::start();
    api.add_pod(PodFixture::consul("default", "app-a"));
    api.add_pod(PodFixture::consul("default", "app-b"));
    let Some(net) = network(engine, &api.default_kubeconfig(), json!({"api_timeout": "1s"})) else { return };

    // RBAC without "patch pods": both reports are refused at once; the pod starts redirected.
    api.fail_patches(Some(403));
    let a = net.pod("app-a", None);
    assert!(rules(engine, &a.ns, Fam::V4) > 0);
    assert_eq!(status_patches(&api, "app-a"), [(status_body("waiting"), 403), (status_body("complete"), 403)]);

    // The API server fails every patch: "waiting" is retried until the deadline, then "complete"
    // is not attempted (it would only wait out another deadline); the pod starts redirected.
    api.fail_patches(Some(500));
    let b = net.pod("app-b", None);
    assert!(rules(engine, &b.ns, Fam::V4) > 0);
    let patches = status_patches(&api, "app-b");
    assert!(patches.len() > 1 && patches.iter().all(|p| *p == (status_body("waiting"), 500)), "{patches:?}");
    let log = net.plugin_log();
    assert!(log.contains("cannot set consul.hashicorp.com/transparent-proxy-status=waiting"), "{log}");
    assert!(log.contains("not setting consul.hashicorp.com/transparent-proxy-status=complete"), "{log}");
}

both_engines!(the_status_annotation_can_be_switched_off);
fn the_status_annotation_can_be_switched_off(engine: Engine) {
    let api = ApiServer::start();
    api.add_pod(PodFixture::consul("default", "app"));
    let Some(net) = network(engine, &api.default_kubeconfig(), json!({"consul_status_annotation": false})) else {
        return;
    };
    let app = net.pod("app", None);
    assert!(rules(engine, &app.ns, Fam::V4) > 0);
    assert!(api.patches().is_empty());
}

both_engines!(nomad_hands_the_configuration_in_cni_args_and_no_api_call_is_made);
fn nomad_hands_the_configuration_in_cni_args_and_no_api_call_is_made(engine: Engine) {
    let api = ApiServer::start();
    api.set_fault(Some(Fault::Status(503)));
    let Some(net) = network(
        engine,
        &api.default_kubeconfig(),
        json!({"capabilities": {"io.kubernetes.cri.pod-annotations": true}}),
    ) else {
        return;
    };
    // The sibling gets (empty) runtime annotations: no lookup for it either.
    let (_srv, s4, _l) = server(&net, Some(&json!({})));
    let task = net.pod_unstarted("nomad-task");
    let config = r#"{"ConsulDNSIP":"","ConsulDNSPort":0,"ProxyUserID":"5995","ProxyInboundPort":20000,"ProxyOutboundPort":15001,"ExcludeInboundPorts":null,"ExcludeOutboundPorts":null,"ExcludeOutboundCIDRs":null,"ExcludeUIDs":null,"NetNS":"","IptablesProvider":null}"#;
    let out =
        net.cnidrv("add", &task.ns, &task.id, &format!("IgnoreUnknown=true;CONSUL_IPTABLES_CONFIG={config}"), None);
    assert!(out.status.success(), "ADD: {}", text(&out));
    let _proxy = proxy(&task.ns);
    assert_eq!(dial(&task.ns, None, sa(s4, 8080)), Ok(format!("outbound {s4}:8080")));
    assert_eq!(who(&dial(&task.ns, Some(PROXY_UID), sa(s4, 8080))), "server");
    assert!(api.requests().is_empty(), "Nomad's path made an API call: {:?}", api.requests());
}

both_engines!(without_a_previous_result_the_plugin_answers_an_empty_result_and_still_redirects);
fn without_a_previous_result_the_plugin_answers_an_empty_result_and_still_redirects(engine: Engine) {
    if !privileged() {
        return;
    }
    // A NetworkAttachmentDefinition-style list with tproxy-cni alone (Multus calls it after the
    // pod's primary network is up): no prevResult.
    let api = ApiServer::start();
    api.add_pod(PodFixture::consul("default", "multus-app"));
    let dir = TempDir::new("tkn");
    let conflist = dir.path().join("nad.conflist");
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": "tproxy-cni",
        "plugins": [{
            "type": "tproxy-cni", "kubeconfig": api.default_kubeconfig(),
            "log_level": "debug", "log_file": dir.path().join("plugin.log"),
        }],
    });
    let mut conf = conf;
    for (k, v) in engine.conf().as_object().unwrap() {
        conf["plugins"][0][k] = v.clone();
    }
    std::fs::write(&conflist, conf.to_string()).unwrap();
    let ns = Netns::new("tk");
    let id = unique("tkc");
    let args =
        format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=multus-app;K8S_POD_INFRA_CONTAINER_ID={id}");
    let drive = |verb: &str| {
        Command::new(cnidrv())
            .args([verb, conflist.to_str().unwrap(), ns.path().to_str().unwrap(), &id, &args])
            .env("CNI_PATH", plugin().parent().unwrap())
            .env("CNIDRV_CACHE", dir.path().join("cache"))
            .output()
            .unwrap()
    };
    let out = drive("add");
    assert!(out.status.success(), "ADD: {}", text(&out));
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["cniVersion"], "1.0.0");
    assert!(result.get("ips").is_none() && result.get("interfaces").is_none(), "{result}");
    assert!(rules(engine, &ns, Fam::V4) > 0);
    assert_eq!(status_patches(&api, "multus-app").len(), 2);
    let out = drive("del");
    assert!(out.status.success(), "DEL: {}", text(&out));
    assert_eq!(engine.our_rules(&ns), 0);
}

both_engines!(a_kuma_pod_found_through_the_api_server_is_judged_by_its_containers);
fn a_kuma_pod_found_through_the_api_server_is_judged_by_its_containers(engine: Engine) {
    let api = ApiServer::start();
    api.add_pod(PodFixture::new("default", "server"));
    // No CNI-mode marks on the annotations: from annotations alone this would be a kuma-init pod.
    // The spec says otherwise: a kuma-sidecar container and no kuma-init.
    api.add_pod(
        PodFixture::new("default", "kapp")
            .annotation("kuma.io/sidecar-injected", "true")
            .container("app")
            .container("kuma-sidecar"),
    );
    // The CNI-mode mark is there, but the spec shows kuma-init: that container installs the rules.
    api.add_pod(
        PodFixture::new("default", "kinit")
            .annotation("kuma.io/sidecar-injected", "true")
            .annotation("k8s.v1.cni.cncf.io/networks", "kuma-cni")
            .init_container("kuma-init")
            .container("app")
            .container("kuma-sidecar"),
    );
    let Some(net) = network(engine, &api.default_kubeconfig(), json!({})) else { return };
    let (_srv, s4, _srv_listener) = server(&net, None);

    let app = net.pod("kapp", None);
    let _outbound = Responder::tcp(&app.ns, sa(ANY4, 15001), "outbound");
    assert_eq!(dial(&app.ns, None, sa(s4, 8080)), Ok(format!("outbound {s4}:8080")));
    assert!(listing(engine, &app.ns, Fam::V4).contains("KUMA_MESH_OUTBOUND"));
    let out = app.check(None);
    assert!(out.status.success(), "CHECK: {}", text(&out));

    let init = net.pod("kinit", None);
    assert_eq!(who(&dial(&init.ns, None, sa(s4, 8080))), "server");
    assert!(!listing(engine, &init.ns, Fam::V4).contains("KUMA_MESH"), "a kuma-init pod is left alone");
    assert_eq!(engine.our_rules(&init.ns), 0);
}

//! The podman scenarios (`tests/podman.rs`) once more through libcni itself (`cnidrv`), the way
//! containerd and CRI-O drive a conflist — with CHECK, which podman never calls, and with the
//! annotations given as capability args as well as served by the API-server stand-in. What
//! `consul_traffic.rs`, `kube_chain.rs` and `lifecycle.rs` already show is not repeated here; this
//! adds a sandbox's whole life as a runtime lives it (ADD, CHECK, DEL, a new sandbox for the same
//! container), ADD failures as libcni reports them and the DEL a runtime sends after one, CHECK
//! against annotations that changed after ADD, and that nothing of ours — rule, cached result, IP
//! reservation, lock file — outlives DEL. Every test runs on both engines (`…::iptables`,
//! `…::nftables`: [`both_engines!`]); the sandbox's life runs the iptables engine with each
//! backend.
//!
//! Needs root (skipped on a laptop without it, a failure in CI).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use crate::both_engines;
use crate::support::apiserver::{ApiServer, PodFixture};
use crate::support::*;
use serde_json::{Value, json};

const PROXY_UID: u32 = 5995;
const REDIRECT_CONFIG: &str = "consul.hashicorp.com/redirect-traffic-config";

fn config(inbound: u16) -> Value {
    json!({"ProxyUserID": PROXY_UID.to_string(), "ProxyInboundPort": inbound, "ProxyOutboundPort": 15001})
}

/// A network whose tproxy-cni entry runs `engine`, with `conf`'s keys; `None` when the test cannot
/// run here (see [`privileged`]).
fn network(engine: Engine, conf: Value) -> Option<Network> {
    let mut conf = conf;
    for (k, v) in engine.conf().as_object().unwrap() {
        conf[k] = v.clone();
    }
    privileged().then(|| Network::new(conf))
}

/// Every chain and rule of ours in the namespace, both families: for the iptables engine from
/// `iptables-save`, for the nftables engine our tables as `nft list table` prints them.
fn ours(ns: &Netns, engine: Engine) -> Vec<String> {
    let Engine::Iptables(backend) = engine else {
        return nft_tables(ns).lines().map(str::to_owned).collect();
    };
    let mut v = Vec::new();
    for family in [Fam::V4, Fam::V6] {
        v.extend(
            ns.save(family, backend)
                .lines()
                .filter(|l| l.contains("CONSUL_") || l.contains("--comment tproxy-cni"))
                .map(|l| format!("{} {l}", family.tool())),
        );
    }
    v
}

/// What of a sandbox outlives it on the node: libcni's cached result, the address host-local
/// reserved, the legacy backend's lock file.
struct Traces {
    cache: PathBuf,
    ipam: PathBuf,
    lock: PathBuf,
}

impl Traces {
    fn of(net: &Network, container_id: &str, ns: &Netns) -> Traces {
        let meta = fs::metadata(ns.path()).unwrap();
        Traces {
            cache: net.dir.path().join("cache/results").join(format!("{}-{container_id}-eth0", net.bridge)),
            ipam: net.dir.path().join("ipam").join(&net.bridge),
            lock: PathBuf::from(format!("/run/tproxy-cni/xtables/{}-{}.lock", meta.dev(), meta.ino())),
        }
    }

    /// The addresses host-local holds for this network.
    fn reserved(&self) -> Vec<String> {
        host_local_reservations(&self.ipam)
    }
}

/// How CHECK names a redirect to `port` that differs: in iptables' words or in nft's.
fn to_port(engine: Engine, port: u16) -> String {
    match engine {
        Engine::Iptables(_) => format!("--to-ports {port}"),
        Engine::Nftables => format!("redirect to :{port}"),
    }
}

both_engines!(a_sandbox_life_add_check_del_and_a_new_sandbox_for_the_same_container);
fn a_sandbox_life_add_check_del_and_a_new_sandbox_for_the_same_container(engine: Engine) {
    let engines = match engine {
        Engine::Iptables(_) => vec![Engine::Iptables("nft"), Engine::Iptables("legacy")],
        Engine::Nftables => vec![Engine::Nftables],
    };
    for engine in engines {
        let Some(net) = network(engine, json!({})) else { return };
        let backend = engine.backend();
        let server = net.pod("server", None);
        let s4 = server.addr(Fam::V4);
        let _server = Responder::tcp(&server.ns, sa(std::net::Ipv4Addr::UNSPECIFIED, 8080), "server");
        let annotations = consul_pod(config(20000), &[]);
        let id = unique("life");
        let args =
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID={id}");

        // The first sandbox, and the one the runtime makes when the container is restarted: the
        // same container ID, a new namespace.
        let mut installed = None;
        for round in ["first", "restarted"] {
            let ns = Netns::new("tpl");
            let traces = Traces::of(&net, &id, &ns);
            // A namespace number can be reused: a lock file another test's gone namespace left
            // behind may already be there, so what counts is whether this ADD made one.
            let lock_before = traces.lock.exists();
            let out = net.cnidrv("add", &ns, &id, &args, Some(&annotations));
            assert!(out.status.success(), "{backend} {round} ADD: {}", text(&out));
            assert!(traces.cache.exists(), "libcni caches the result");
            assert_eq!(traces.reserved().len(), 4, "{backend} {round}: the server's and web's, both families");
            let now = ours(&ns, engine);
            assert!(!now.is_empty());
            if engine == Engine::Nftables {
                assert_eq!(nft_tables(&ns), nft_reference(&annotations, true), "{round}: the tables ADD made");
            }
            // Each sandbox gets exactly the same rules.
            assert_eq!(installed.get_or_insert_with(|| now.clone()), &now, "{backend} {round}");
            if backend == "legacy" {
                assert!(traces.lock.exists(), "legacy: a lock file per namespace");
            } else {
                assert_eq!(traces.lock.exists(), lock_before, "{backend}: ADD made a lock file (legacy only)");
            }

            let out = net.cnidrv("check", &ns, &id, &args, Some(&annotations));
            assert!(out.status.success(), "{backend} {round} CHECK: {}", text(&out));
            {
                let _proxy = Responder::tcp(&ns, sa(std::net::Ipv4Addr::UNSPECIFIED, 15001), "outbound");
                assert_eq!(dial(&ns, None, sa(s4, 8080)), Ok(format!("outbound {s4}:8080")), "{backend} {round}");
                assert_eq!(who(&dial(&ns, Some(PROXY_UID), sa(s4, 8080))), "server", "{backend} {round}");
            }

            // DEL, the namespace still there: our rules, the cached result, the address and the
            // lock file go; the namespace keeps nothing of ours.
            let out = net.cnidrv("del", &ns, &id, &args, Some(&annotations));
            assert!(out.status.success(), "{backend} {round} DEL: {}", text(&out));
            assert_eq!(ours(&ns, engine), Vec::<String>::new(), "{backend} {round}: rules left after DEL");
            assert!(!traces.cache.exists(), "{backend} {round}: cached result left after DEL");
            // Legacy's DEL removes its lock file; the nft backend never touches one.
            let lock_after_del = backend != "legacy" && lock_before;
            assert_eq!(traces.lock.exists(), lock_after_del, "{backend} {round}: lock file after DEL");
            assert_eq!(traces.reserved().len(), 2, "{backend} {round}: only the server's addresses remain");
            // A runtime repeats DEL (after a restart of its own, say): still fine.
            let out = net.cnidrv("del", &ns, &id, &args, Some(&annotations));
            assert!(out.status.success(), "{backend} {round} second DEL: {}", text(&out));
        }
    }
}

both_engines!(a_failed_add_reaches_the_runtime_in_our_words_and_its_del_cleans_up);
fn a_failed_add_reaches_the_runtime_in_our_words_and_its_del_cleans_up(engine: Engine) {
    let api = ApiServer::start();
    let mut bad = config(20000);
    bad["ProxyInboundPort"] = json!(65536);
    api.add_pod(PodFixture::consul("default", "served-broken").annotation(REDIRECT_CONFIG, &bad.to_string()));
    let Some(net) = network(engine, json!({"kubeconfig": api.default_kubeconfig(), "api_timeout": "2s"})) else {
        return;
    };
    // The same list without the capability: libcni passes no annotations, the pod is looked up.
    let lookup =
        network(engine, json!({"kubeconfig": api.default_kubeconfig(), "api_timeout": "2s", "capabilities": {}}))
            .unwrap();
    let server = net.pod("server", Some(&json!({})));

    // The same impossible configuration, once as capability args and once served by the API server.
    let capability = consul_pod(bad.clone(), &[]);
    for (name, net, annotations) in [("capability-broken", &net, Some(&capability)), ("served-broken", &lookup, None)] {
        let pod = net.pod_unstarted(name);
        let traces = Traces::of(net, &pod.id, &pod.ns);
        let out = pod.add(annotations);
        assert!(!out.status.success(), "{name}: ADD must fail");
        let msg = text(&out);
        assert!(msg.contains(r#"plugin type="tproxy-cni" failed (add)"#), "{name}: {msg}");
        assert!(msg.contains(r#"ProxyInboundPort "65536" is out of range"#), "{name}: {msg}");
        // bridge had attached the pod before us; we touched nothing.
        let untouched = Netns::new("tpe");
        assert_eq!(engine.snapshot(&pod.ns), engine.snapshot(&untouched), "{name}: no netfilter state in the pod");
        // The runtime then sends DEL, which releases what the chain had set up.
        let out = pod.del(annotations);
        assert!(out.status.success(), "{name} DEL: {}", text(&out));
        assert!(!traces.cache.exists());
        let server_addresses = if name == "served-broken" { 0 } else { 2 };
        assert_eq!(traces.reserved().len(), server_addresses, "{name}: only the server's addresses remain");
    }
    drop(server);
}

both_engines!(check_follows_the_annotations_as_they_are_now);
fn check_follows_the_annotations_as_they_are_now(engine: Engine) {
    let api = ApiServer::start();
    api.add_pod(PodFixture::consul("default", "served"));
    let Some(net) = network(engine, json!({"kubeconfig": api.default_kubeconfig(), "api_timeout": "2s"})) else {
        return;
    };
    let (new, old) = (to_port(engine, 21000), to_port(engine, 20000));

    // Annotations as capability args: CHECK with other annotations than ADD had names the rules
    // that differ; with the same ones it passes again.
    let before = consul_pod(config(20000), &[]);
    let after = consul_pod(config(21000), &[]);
    let pod = net.pod("capability", Some(&before));
    let out = pod.check(Some(&after));
    assert!(!out.status.success(), "CHECK against changed annotations must fail");
    let msg = text(&out);
    assert!(msg.contains("difference(s) from the expected rules"), "{msg}");
    assert!(msg.contains(&new) && msg.contains(&old), "{msg}");
    let out = pod.check(Some(&before));
    assert!(out.status.success(), "CHECK: {}", text(&out));

    // Annotations from the API server (the list without the capability, so libcni passes none):
    // CHECK asks again, so a pod changed since ADD is noticed.
    let lookup =
        network(engine, json!({"kubeconfig": api.default_kubeconfig(), "api_timeout": "2s", "capabilities": {}}))
            .unwrap();
    let served = lookup.pod("served", None);
    let out = served.check(None);
    assert!(out.status.success(), "CHECK: {}", text(&out));
    api.add_pod(PodFixture::consul("default", "served").annotation(REDIRECT_CONFIG, &config(21000).to_string()));
    let out = served.check(None);
    assert!(!out.status.success(), "CHECK against the changed pod must fail");
    let msg = text(&out);
    assert!(msg.contains(&new) && msg.contains(&old), "{msg}");
    let gets = api.requests().iter().filter(|r| r.method == "GET" && r.path.ends_with("/pods/served")).count();
    assert_eq!(gets, 3, "one GET per ADD and CHECK");
}

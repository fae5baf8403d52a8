//! The plugin binary on the API-server path, against the stand-in: every fault gives its
//! documented CNI code and message within `api_timeout`, pods that must not depend on the API
//! server never call it, and the token appears nowhere — not in stdout, stderr or the log file.
//!
//! Every call here is decided before the pod's namespace would be opened (`CNI_NETNS` does not
//! exist, so anything that tried to touch it would fail): no root needed. The real chain with real
//! rules and traffic is in `kube_chain.rs`.

use crate::support::apiserver;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use crate::support::{TempDir, call_plugin};
use apiserver::{ApiServer, Auth, Fault, KubeconfigSpec, PodFixture, TOKEN, Trust};
use serde_json::{Value, json};

/// `api_timeout` of these tests.
const DEADLINE: Duration = Duration::from_secs(1);
/// How far past the deadline a call may end (process start, a loaded machine): generous, this is
/// a behaviour check and not a benchmark.
const SLACK: Duration = Duration::from_millis(2000);
const PREV: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/x"}],"ips":[{"address":"10.1.0.5/24","interface":0}]}"#;

struct Call {
    out: Output,
    took: Duration,
    log: String,
}

impl Call {
    fn code(&self) -> u64 {
        if self.out.status.success() {
            return 0;
        }
        let v: Value = serde_json::from_slice(&self.out.stdout).expect("an error result on stdout");
        v["code"].as_u64().unwrap()
    }

    fn msg(&self) -> String {
        let v: Value = serde_json::from_slice(&self.out.stdout).unwrap_or_default();
        v["msg"].as_str().unwrap_or_default().to_owned()
    }

    fn assert_no(&self, secret: &str) {
        let all = format!(
            "{}{}{}",
            String::from_utf8_lossy(&self.out.stdout),
            String::from_utf8_lossy(&self.out.stderr),
            self.log
        );
        assert!(!all.contains(secret), "the token leaked:\n{all}");
    }
}

/// Calls the plugin with a conflist entry holding `extra` keys, as CNI `command`.
fn call(dir: &Path, command: &str, cni_args: &str, extra: Value) -> Call {
    let log = dir.join("plugin.log");
    let _ = std::fs::remove_file(&log);
    let mut conf = json!({
        "cniVersion": "1.0.0", "name": "net", "type": "tproxy-cni",
        "log_level": "debug", "log_file": log, "api_timeout": "1s",
        "prevResult": serde_json::from_str::<Value>(PREV).unwrap(),
    });
    for (k, v) in extra.as_object().unwrap() {
        conf[k] = v.clone();
    }
    let env = [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "0123456789abcdef0123"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", "/nonexistent/tproxy-cni/netns"),
        ("CNI_ARGS", cni_args),
        ("CNI_PATH", "/usr/lib/cni"),
    ];
    let t = Instant::now();
    let out = call_plugin(&env, &conf.to_string());
    Call { took: t.elapsed(), log: std::fs::read_to_string(&log).unwrap_or_default(), out }
}

const WEB: &str =
    "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=0123456789abcdef0123";

fn with_kubeconfig(path: &Path) -> Value {
    json!({ "kubeconfig": path })
}

#[test]
fn a_pod_outside_the_mesh_passes_through_after_one_get() {
    let api = ApiServer::start();
    api.add_pod(PodFixture::new("shop", "web-0").annotation("app.kubernetes.io/name", "web"));
    let dir = TempDir::new("tkp");
    let c = call(dir.path(), "ADD", WEB, with_kubeconfig(&api.default_kubeconfig()));
    assert_eq!(c.code(), 0, "{}", c.msg());
    assert_eq!(String::from_utf8_lossy(&c.out.stdout), PREV, "prevResult passed on byte for byte");
    let reqs = api.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!((reqs[0].method.as_str(), reqs[0].path.as_str()), ("GET", "/api/v1/namespaces/shop/pods/web-0"));
    assert!(c.log.contains("pod annotations from the API server"), "{}", c.log);
    // Every line says which pod and container it is about.
    for line in c.log.lines() {
        assert!(line.contains("container=0123456789ab pod=shop/web-0"), "{line}");
    }
    c.assert_no(TOKEN);
}

/// One fault, and what the plugin must answer.
struct Case {
    name: &'static str,
    code: u64,
    says: &'static [&'static str],
}

#[test]
fn every_api_fault_gives_its_documented_outcome_within_the_deadline() {
    let dir = TempDir::new("tkp");
    let run = |api: &ApiServer, kubeconfig: PathBuf, case: Case| {
        let c = call(dir.path(), "ADD", WEB, with_kubeconfig(&kubeconfig));
        assert_eq!(c.code(), case.code, "{}: {}", case.name, c.msg());
        assert!(c.took <= DEADLINE + SLACK, "{}: took {:?}", case.name, c.took);
        for want in case.says {
            assert!(c.msg().contains(want), "{}: {want:?} not in {:?}", case.name, c.msg());
        }
        if case.code != 0 {
            assert!(!c.msg().contains('\n'));
            // The same line is logged with the pod it concerns.
            assert!(c.log.contains(&c.msg()), "{}: {}", case.name, c.log);
        }
        c.assert_no(TOKEN);
        assert!(api.patches().is_empty(), "{}: a pod outside the mesh is never patched", case.name);
    };

    // The API server is down: nothing listens on its port.
    let api = ApiServer::start();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let kc = api.kubeconfig("down", &KubeconfigSpec { server: Some(format!("https://{dead}")), ..Default::default() });
    run(
        &api,
        kc,
        Case {
            name: "down",
            code: 11,
            says: &["cannot tell whether pod shop/web-0 is in a mesh", "did not answer GET pod shop/web-0", "refused"],
        },
    );

    // Slower than the deadline.
    let api = ApiServer::start();
    api.add_pod(PodFixture::new("shop", "web-0"));
    api.set_fault(Some(Fault::Delay(Duration::from_secs(30))));
    run(&api, api.default_kubeconfig(), Case { name: "slow", code: 11, says: &["within 1000 ms", "timeout"] });
    assert_eq!(api.requests().len(), 1, "one attempt took the whole deadline");

    // 5xx all along.
    let api = ApiServer::start();
    api.add_pod(PodFixture::new("shop", "web-0"));
    api.set_fault(Some(Fault::Status(503)));
    run(&api, api.default_kubeconfig(), Case { name: "503", code: 11, says: &["HTTP 503"] });

    // 500s, then an answer: retried, and the pod (outside the mesh) passes.
    let api = ApiServer::start();
    api.add_pod(PodFixture::new("shop", "web-0"));
    api.fail_next(2, Fault::Status(500));
    run(&api, api.default_kubeconfig(), Case { name: "500 then ok", code: 0, says: &[] });
    assert_eq!(api.requests().len(), 3);

    // The connection breaks mid-answer, then works.
    let api = ApiServer::start();
    api.add_pod(PodFixture::new("shop", "web-0"));
    api.fail_next(1, Fault::CloseMidResponse);
    run(&api, api.default_kubeconfig(), Case { name: "cut", code: 0, says: &[] });

    // 401: the token is wrong.
    let api = ApiServer::start();
    api.add_pod(PodFixture::new("shop", "web-0"));
    let kc = api
        .kubeconfig("bad-token", &KubeconfigSpec { auth: Auth::Token("expired-0xdead".into()), ..Default::default() });
    let c = call(dir.path(), "ADD", WEB, with_kubeconfig(&kc));
    assert_eq!(c.code(), 104, "{}", c.msg());
    assert!(c.msg().contains("401 Unauthorized") && c.took < DEADLINE, "{} {:?}", c.msg(), c.took);
    c.assert_no("expired-0xdead");
    assert_eq!(api.requests().len(), 1, "401 is not retried");

    // 403: RBAC does not allow reading pods.
    let api = ApiServer::start();
    api.add_pod(PodFixture::new("shop", "web-0"));
    api.set_fault(Some(Fault::Status(403)));
    run(&api, api.default_kubeconfig(), Case { name: "403", code: 104, says: &["403 Forbidden", "cannot get"] });
    assert_eq!(api.requests().len(), 1, "403 is not retried");

    // The kubeconfig trusts another CA.
    let api = ApiServer::start();
    api.add_pod(PodFixture::new("shop", "web-0"));
    let kc = api.kubeconfig("wrong-ca", &KubeconfigSpec { trust: Trust::OtherCa, ..Default::default() });
    run(
        &api,
        kc,
        Case { name: "wrong CA", code: 104, says: &["is not trusted by the kubeconfig's certificate authority"] },
    );
    assert!(api.requests().is_empty());

    // 404 with the Status naming the pod: the API server does not know it; it carries no mesh
    // annotations, so it passes.
    let api = ApiServer::start();
    let c = call(dir.path(), "ADD", WEB, with_kubeconfig(&api.default_kubeconfig()));
    assert_eq!(c.code(), 0, "{}", c.msg());
    assert!(c.log.contains("not found") && c.log.contains("passing the pod through"), "{}", c.log);

    // Any other 404 says nothing about the pod: a proxy's (or a mux's) plain-text answer...
    let api = ApiServer::start();
    api.set_fault(Some(Fault::PlainNotFound));
    run(
        &api,
        api.default_kubeconfig(),
        Case { name: "plain 404", code: 104, says: &["answered GET pod shop/web-0 with 404", "404 page not found"] },
    );
    assert_eq!(api.requests().len(), 1, "404 is not retried");
    // ...or the API server's own answer for a path it does not serve (a server URL with a wrong
    // path): a NotFound Status, but about no pod.
    let api = ApiServer::start();
    api.add_pod(PodFixture::new("shop", "web-0"));
    let kc = api
        .kubeconfig("wrong-path", &KubeconfigSpec { server: Some(format!("{}/k8s", api.url())), ..Default::default() });
    run(
        &api,
        kc,
        Case {
            name: "wrong path",
            code: 104,
            says: &[
                "with 404 but not with the Status",
                "the server could not find the requested resource",
                "server URL",
            ],
        },
    );
    assert_eq!(api.requests()[0].path, "/k8s/api/v1/namespaces/shop/pods/web-0");

    // The kubeconfig is not there: a configuration error naming the file.
    let api = ApiServer::start();
    let missing = api.dir().join("no-such-kubeconfig");
    run(&api, missing, Case { name: "no kubeconfig", code: 7, says: &["no-such-kubeconfig", "does not exist"] });
}

#[test]
fn a_rotated_token_file_is_used_by_the_next_add() {
    let api = ApiServer::start();
    api.add_pod(PodFixture::new("shop", "web-0"));
    let token_file = api.dir().join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let kc =
        api.kubeconfig("rotating", &KubeconfigSpec { auth: Auth::TokenFile(token_file.clone()), ..Default::default() });
    let dir = TempDir::new("tkp");
    assert_eq!(call(dir.path(), "ADD", WEB, with_kubeconfig(&kc)).code(), 0);
    api.set_token("second-token-after-rotation");
    // Before the file is rotated the old token is refused...
    let c = call(dir.path(), "ADD", WEB, with_kubeconfig(&kc));
    assert_eq!(c.code(), 104, "{}", c.msg());
    // ...and once the kubelet has rotated it, the next ADD uses the new one.
    std::fs::write(&token_file, "second-token-after-rotation\n").unwrap();
    let c = call(dir.path(), "ADD", WEB, with_kubeconfig(&kc));
    assert_eq!(c.code(), 0, "{}", c.msg());
    c.assert_no("second-token-after-rotation");
    let bearers: Vec<String> = api.requests().into_iter().map(|r| r.bearer.unwrap_or_default()).collect();
    assert_eq!(bearers, [TOKEN, TOKEN, "second-token-after-rotation"]);
}

#[test]
fn excluded_namespaces_never_reach_the_api_server() {
    let api = ApiServer::start();
    api.set_fault(Some(Fault::Status(503)));
    let dir = TempDir::new("tkp");
    let conf = json!({"kubeconfig": api.default_kubeconfig(), "exclude_namespaces": ["kube-system", "monitoring"]});
    for args in [
        "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-5d78c9869d-x2x7q",
        "K8S_POD_NAMESPACE=monitoring;K8S_POD_NAME=prometheus-0",
    ] {
        let c = call(dir.path(), "ADD", args, conf.clone());
        assert_eq!(c.code(), 0, "{args}: {}", c.msg());
        assert!(c.took < DEADLINE, "{args}: no lookup, no waiting");
    }
    assert!(api.requests().is_empty(), "not one request: {:?}", api.requests());
}

const INSTALLER: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=mesh-system;K8S_POD_NAME=tproxy-cni-node-7k2pq";

#[test]
fn installer_pods_start_when_they_cannot_be_classified_and_never_as_a_mesh_pod() {
    let dir = TempDir::new("tkp");
    let installer = json!({"namespace": "mesh-system", "name_prefix": "tproxy-cni-node-"});

    // The API server fails: the installer's pod cannot be classified, and starts anyway (after
    // the lookup's deadline), with a warning; any other pod of its namespace does not.
    let api = ApiServer::start();
    api.set_fault(Some(Fault::Status(503)));
    let conf = json!({"kubeconfig": api.default_kubeconfig(), "installer_pods": installer});
    let c = call(dir.path(), "ADD", INSTALLER, conf.clone());
    assert_eq!(c.code(), 0, "{}", c.msg());
    assert!(c.took <= DEADLINE + SLACK, "{:?}", c.took);
    assert!(c.log.contains("is named like the installer's (installer_pods): passing it through"), "{}", c.log);
    let c = call(dir.path(), "ADD", "K8S_POD_NAMESPACE=mesh-system;K8S_POD_NAME=web-0", conf.clone());
    assert_eq!(c.code(), 11, "{}", c.msg());
    // The same name in another namespace is not the installer's.
    let c = call(dir.path(), "ADD", "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=tproxy-cni-node-7k2pq", conf);
    assert_eq!(c.code(), 11, "{}", c.msg());

    // No kubeconfig and no annotations: it passes at once.
    let c = call(dir.path(), "ADD", INSTALLER, json!({"installer_pods": installer}));
    assert_eq!(c.code(), 0, "{}", c.msg());

    // A pod named like the installer's that its annotations put in a mesh is a mesh pod, whether the
    // API server or the runtime says so: ADD goes on to install its redirect (and fails only
    // because this test's CNI_NETNS does not exist: 102, not a pass).
    let api = ApiServer::start();
    api.add_pod(PodFixture::consul("mesh-system", "tproxy-cni-node-7k2pq"));
    let conf = json!({"kubeconfig": api.default_kubeconfig(), "installer_pods": installer});
    let c = call(dir.path(), "ADD", INSTALLER, conf);
    assert_eq!(c.code(), 102, "{}", c.msg());
    let consul = api.pod("mesh-system", "tproxy-cni-node-7k2pq").unwrap()["metadata"]["annotations"].clone();
    let conf = json!({"installer_pods": installer, "runtimeConfig": {"io.kubernetes.cri.pod-annotations": consul}});
    let c = call(dir.path(), "ADD", INSTALLER, conf);
    assert_eq!(c.code(), 102, "{}", c.msg());
}

#[test]
fn a_kubernetes_pod_that_cannot_be_classified_fails_add_unless_the_conflist_says_pass() {
    let dir = TempDir::new("tkp");
    // No annotations from the runtime and no kubeconfig: the pod may be a mesh pod. Code 7, with
    // what to do.
    let c = call(dir.path(), "ADD", WEB, json!({}));
    assert_eq!(c.code(), 7, "{}", c.msg());
    for want in [
        "cannot tell whether pod shop/web-0 is in a mesh",
        "declare the io.kubernetes.cri.pod-annotations capability",
        "set kubeconfig",
        "unclassified_pods",
    ] {
        assert!(c.msg().contains(want), "{want:?} not in {:?}", c.msg());
    }
    assert!(c.log.contains(&c.msg()), "{}", c.log);
    // CHECK classifies the same way.
    assert_eq!(call(dir.path(), "CHECK", WEB, json!({})).code(), 7);
    // DEL needs no classification.
    assert_eq!(call(dir.path(), "DEL", WEB, json!({})).code(), 0);

    // The explicit opt-out: the pod passes, with a warning saying why.
    let c = call(dir.path(), "ADD", WEB, json!({"unclassified_pods": "pass"}));
    assert_eq!(c.code(), 0, "{}", c.msg());
    assert_eq!(String::from_utf8_lossy(&c.out.stdout), PREV);
    assert!(
        c.log.contains("cannot tell whether pod shop/web-0 is in a mesh")
            && c.log.contains("unclassified_pods is \"pass\""),
        "{}",
        c.log
    );
    // It covers the API server's failures too: down, after api_timeout.
    let api = ApiServer::start();
    api.set_fault(Some(Fault::Status(503)));
    let c = call(dir.path(), "ADD", WEB, json!({"kubeconfig": api.default_kubeconfig(), "unclassified_pods": "pass"}));
    assert_eq!(c.code(), 0, "{}", c.msg());
    assert!(c.took <= DEADLINE + SLACK && c.log.contains("HTTP 503"), "{:?} {}", c.took, c.log);
    // A mesh pod whose annotations are known is never passed by it: its redirect is installed
    // (here: the namespace does not exist, 102).
    let api = ApiServer::start();
    api.add_pod(PodFixture::consul("shop", "web-0"));
    let c = call(dir.path(), "ADD", WEB, json!({"kubeconfig": api.default_kubeconfig(), "unclassified_pods": "pass"}));
    assert_eq!(c.code(), 102, "{}", c.msg());
}

#[test]
fn a_null_annotation_map_is_a_pod_without_annotations_and_needs_no_lookup() {
    // containerd 1.6 for a pod without annotations: the capability's key, with null.
    let api = ApiServer::start();
    api.set_fault(Some(Fault::Status(503)));
    let dir = TempDir::new("tkp");
    let conf = json!({
        "kubeconfig": api.default_kubeconfig(),
        "runtimeConfig": {"io.kubernetes.cri.pod-annotations": null},
    });
    let c = call(dir.path(), "ADD", WEB, conf);
    assert_eq!(c.code(), 0, "{}", c.msg());
    assert!(c.took < DEADLINE);
    assert!(api.requests().is_empty(), "{:?}", api.requests());
    assert!(c.log.contains("0 pod annotations from the runtime"), "{}", c.log);
    assert!(!c.log.contains("declare the"), "no hint to declare a capability the runtime honours: {}", c.log);
    // Without a kubeconfig either: no error.
    let c = call(dir.path(), "ADD", WEB, json!({"runtimeConfig": {"io.kubernetes.cri.pod-annotations": null}}));
    assert_eq!(c.code(), 0, "{}", c.msg());
}

#[test]
fn a_runtime_that_is_not_kubernetes_is_not_asked_for_annotations() {
    let dir = TempDir::new("tkp");
    // podman: a container name, no namespace, no kubeconfig to look it up with.
    let c = call(dir.path(), "ADD", "IgnoreUnknown=1;K8S_POD_NAME=web", json!({}));
    assert_eq!(c.code(), 0, "{}", c.msg());
    // No pod at all.
    let c = call(dir.path(), "ADD", "", json!({}));
    assert_eq!(c.code(), 0, "{}", c.msg());
}

#[test]
fn runtime_annotations_need_no_api_call() {
    let api = ApiServer::start();
    api.set_fault(Some(Fault::Status(503)));
    let dir = TempDir::new("tkp");
    let conf = json!({
        "kubeconfig": api.default_kubeconfig(),
        "runtimeConfig": {"io.kubernetes.cri.pod-annotations": {"app.kubernetes.io/name": "web"}},
    });
    let c = call(dir.path(), "ADD", WEB, conf);
    assert_eq!(c.code(), 0, "{}", c.msg());
    assert!(api.requests().is_empty());
}

#[test]
fn a_mesh_pod_whose_redirect_cannot_be_built_fails_before_anything_is_changed() {
    let api = ApiServer::start();
    api.add_pod(PodFixture::consul("shop", "web-0").annotation(
        "consul.hashicorp.com/redirect-traffic-config",
        r#"{"ProxyUserID":"5995","ProxyInboundPort":70000}"#,
    ));
    let dir = TempDir::new("tkp");
    let c = call(dir.path(), "ADD", WEB, with_kubeconfig(&api.default_kubeconfig()));
    assert_eq!(c.code(), 100, "{}", c.msg());
    assert!(c.msg().contains("ProxyInboundPort") && c.msg().contains("out of range"), "{}", c.msg());
    assert!(api.patches().is_empty(), "no status is reported for a pod that will not be redirected");
}

#[test]
fn without_a_namespace_the_default_namespace_is_looked_up_and_said_so() {
    let api = ApiServer::start();
    api.add_pod(PodFixture::new("apps", "web-0"));
    let dir = TempDir::new("tkp");
    let conf = json!({"kubeconfig": api.default_kubeconfig(), "default_namespace": "apps"});
    // What podman sends: the container's name, no namespace.
    let c = call(dir.path(), "ADD", "IgnoreUnknown=1;K8S_POD_NAME=web-0", conf.clone());
    assert_eq!(c.code(), 0, "{}", c.msg());
    assert_eq!(api.requests()[0].path, "/api/v1/namespaces/apps/pods/web-0");
    assert!(c.log.contains("no K8S_POD_NAMESPACE in CNI_ARGS: using default_namespace \"apps\""), "{}", c.log);
    // A podman container name Kubernetes could not have issued is not looked up at all.
    let c = call(dir.path(), "ADD", "IgnoreUnknown=1;K8S_POD_NAME=My_Container", conf);
    assert_eq!(c.code(), 0, "{}", c.msg());
    assert_eq!(api.requests().len(), 1);
}

#[test]
fn del_never_needs_the_api_server() {
    let api = ApiServer::start();
    api.set_fault(Some(Fault::Delay(Duration::from_secs(30))));
    let dir = TempDir::new("tkp");
    let c = call(dir.path(), "DEL", WEB, with_kubeconfig(&api.default_kubeconfig()));
    assert_eq!(c.code(), 0, "{}", c.msg());
    assert!(c.took < DEADLINE, "DEL does not wait on the API server: {:?}", c.took);
    assert!(api.requests().is_empty());
}

#[test]
fn nomad_configuration_needs_no_api_call() {
    let api = ApiServer::start();
    api.set_fault(Some(Fault::Status(503)));
    let dir = TempDir::new("tkp");
    // A broken configuration fails on its own merits (code 100), without a lookup.
    let args = r#"IgnoreUnknown=1;CONSUL_IPTABLES_CONFIG={"ProxyUserID":"5995"}"#;
    let c = call(dir.path(), "ADD", args, with_kubeconfig(&api.default_kubeconfig()));
    assert_eq!(c.code(), 100, "{}", c.msg());
    assert!(
        c.msg().contains("CONSUL_IPTABLES_CONFIG") && c.msg().contains("ProxyInboundPort is required"),
        "{}",
        c.msg()
    );
    assert!(api.requests().is_empty());
}

#[test]
fn the_multus_attachment_example_is_accepted() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("cni-conf/multus-nad.yaml");
    let nad: Value = serde_saphyr::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(nad["kind"], "NetworkAttachmentDefinition");
    let conf: Value = serde_json::from_str(nad["spec"]["config"].as_str().unwrap()).unwrap();
    assert_eq!(conf["type"], "tproxy-cni");
    // As Multus calls it: no prevResult. A pod of an excluded namespace, so no kubeconfig is needed
    // to get past validation of every key.
    let env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", "/nonexistent"),
        ("CNI_IFNAME", "net1"),
        ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-0"),
    ];
    let out = call_plugin(&env, &conf.to_string());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["cniVersion"], conf["cniVersion"]);
}

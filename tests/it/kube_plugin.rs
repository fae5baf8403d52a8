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

    // 404: the API server does not know the pod; it carries no mesh annotations, so it passes.
    let api = ApiServer::start();
    let c = call(dir.path(), "ADD", WEB, with_kubeconfig(&api.default_kubeconfig()));
    assert_eq!(c.code(), 0, "{}", c.msg());
    assert!(c.log.contains("not found") && c.log.contains("passing the pod through"), "{}", c.log);

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
fn excluded_namespaces_and_installer_pods_never_reach_the_api_server() {
    let api = ApiServer::start();
    api.set_fault(Some(Fault::Status(503)));
    let dir = TempDir::new("tkp");
    let conf = json!({
        "kubeconfig": api.default_kubeconfig(),
        "exclude_namespaces": ["kube-system", "monitoring"],
        "installer_pods": {"namespace": "mesh-system", "name_prefix": "tproxy-cni-node-"},
    });
    for args in [
        "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-5d78c9869d-x2x7q",
        "K8S_POD_NAMESPACE=monitoring;K8S_POD_NAME=prometheus-0",
        "K8S_POD_NAMESPACE=mesh-system;K8S_POD_NAME=tproxy-cni-node-7k2pq",
    ] {
        let c = call(dir.path(), "ADD", args, conf.clone());
        assert_eq!(c.code(), 0, "{args}: {}", c.msg());
        assert!(c.took < DEADLINE, "{args}: no lookup, no waiting");
    }
    assert!(api.requests().is_empty(), "not one request: {:?}", api.requests());
    // Any other pod of the installer's namespace does need the API server (which is failing).
    let c = call(dir.path(), "ADD", "K8S_POD_NAMESPACE=mesh-system;K8S_POD_NAME=web-0", conf);
    assert_eq!(c.code(), 11, "{}", c.msg());
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

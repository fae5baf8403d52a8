//! The API client against the API-server stand-in, over real TLS: every fault gives its documented
//! outcome within the deadline, credentials are read the way a node has them, and the token never
//! shows in an error.
//!
//! Needs no root: the stand-in listens on loopback only.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::apiserver::{ApiServer, Auth, Fault, KubeconfigSpec, PodFixture, TOKEN, Trust};
use serde_json::json;
use tproxy_cni::kube::{Class, Client, Error, Patch, WatchEvent};
use tproxy_cni::text::chain;

/// Generous bound for "returned without waiting for the deadline" (a behaviour, not a benchmark).
const PROMPTLY: Duration = Duration::from_millis(1500);
/// How far past its deadline a lookup may return, on a loaded machine.
const SLACK: Duration = Duration::from_millis(1500);

fn client(path: &Path, timeout: Duration) -> Client {
    Client::from_kubeconfig(path, timeout).expect("kubeconfig loads")
}

fn spec(auth: Auth, trust: Trust, inline: bool) -> KubeconfigSpec {
    KubeconfigSpec { auth, trust, inline, server: None }
}

/// Asserts neither the message chain nor the debug form of `e` holds the token.
fn assert_no_token(e: &Error, token: &str) {
    assert!(!chain(e).contains(token), "token in message: {}", chain(e));
    assert!(!format!("{e:?}").contains(token), "token in debug form: {e:?}");
}

#[test]
fn reads_a_pod_with_its_annotations_labels_and_containers() {
    let api = ApiServer::start();
    api.add_pod(PodFixture::consul("shop", "web-0").annotation("extra", "x"));
    let c = client(&api.default_kubeconfig(), Duration::from_secs(5));
    let pod = c.get_pod("shop", "web-0").unwrap();
    assert_eq!(pod.metadata.name, "web-0");
    assert_eq!(pod.metadata.namespace.as_deref(), Some("shop"));
    assert!(pod.metadata.uid.as_deref().is_some_and(|u| !u.is_empty()));
    assert_eq!(pod.metadata.annotations["consul.hashicorp.com/transparent-proxy-status"], "enabled");
    assert_eq!(pod.metadata.annotations["extra"], "x");
    assert_eq!(pod.metadata.labels["consul.hashicorp.com/connect-inject-status"], "injected");
    assert_eq!(pod.container_names().collect::<Vec<_>>(), ["app", "consul-dataplane"]);
    assert_eq!(pod.init_container_names().collect::<Vec<_>>(), ["consul-connect-inject-init"]);
    let reqs = api.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!((reqs[0].method.as_str(), reqs[0].path.as_str()), ("GET", "/api/v1/namespaces/shop/pods/web-0"));
    assert_eq!(reqs[0].bearer.as_deref(), Some(TOKEN));
}

#[test]
fn reaches_an_ipv6_server_url() {
    let api = ApiServer::start_v6();
    api.add_pod(PodFixture::new("default", "p"));
    let kc = api.kubeconfig("v6", &spec(Auth::Token(TOKEN.into()), Trust::Ca, true));
    assert!(std::fs::read_to_string(&kc).unwrap().contains("server: https://[::1]:"));
    let c = client(&kc, Duration::from_secs(5));
    assert!(c.server().starts_with("https://[::1]:"));
    assert_eq!(c.get_pod("default", "p").unwrap().metadata.name, "p");
}

#[test]
fn authenticates_with_a_client_certificate_inline_or_kubelet_style() {
    let api = ApiServer::start();
    api.add_pod(PodFixture::new("default", "p"));
    for inline in [true, false] {
        let kc = api.kubeconfig(&format!("cert-{inline}"), &spec(Auth::ClientCert, Trust::Ca, inline));
        client(&kc, Duration::from_secs(5)).get_pod("default", "p").unwrap();
    }
    let reqs = api.requests();
    assert_eq!(reqs.len(), 2);
    assert!(reqs.iter().all(|r| r.client_cert && r.bearer.is_none() && r.status == 200));
}

#[test]
fn insecure_skip_tls_verify_is_honoured_when_set() {
    let api = ApiServer::start();
    api.add_pod(PodFixture::new("default", "p"));
    let kc = api.kubeconfig("insecure", &spec(Auth::Token(TOKEN.into()), Trust::Insecure, false));
    client(&kc, Duration::from_secs(5)).get_pod("default", "p").unwrap();
}

#[test]
fn a_missing_pod_is_not_found_at_once() {
    let api = ApiServer::start();
    let c = client(&api.default_kubeconfig(), Duration::from_secs(5));
    let t = Instant::now();
    let e = c.get_pod("shop", "gone").unwrap_err();
    assert!(t.elapsed() < PROMPTLY);
    assert_eq!(e.class(), Class::NotFound);
    let msg = chain(&e);
    assert!(msg.contains("GET pod shop/gone") && msg.contains(&api.url()), "{msg}");
    assert_eq!(api.requests().len(), 1, "404 is not retried");
}

#[test]
fn a_bad_token_is_401_at_once_and_never_shown() {
    let api = ApiServer::start();
    api.add_pod(PodFixture::new("default", "p"));
    let bad = "not-the-token-4f9a";
    let kc = api.kubeconfig("bad", &spec(Auth::Token(bad.into()), Trust::Ca, false));
    let t = Instant::now();
    let e = client(&kc, Duration::from_secs(5)).get_pod("default", "p").unwrap_err();
    assert!(t.elapsed() < PROMPTLY);
    assert!(matches!(e, Error::Unauthorized { .. }), "{e:?}");
    assert_eq!(e.class(), Class::Access);
    assert!(chain(&e).contains("401 Unauthorized"), "{}", chain(&e));
    assert_no_token(&e, bad);
    assert_eq!(api.requests().len(), 1, "401 is not retried");
}

#[test]
fn forbidden_is_403_at_once_with_the_servers_reason() {
    let api = ApiServer::start();
    api.add_pod(PodFixture::new("default", "p"));
    api.set_fault(Some(Fault::Status(403)));
    let t = Instant::now();
    let e = client(&api.default_kubeconfig(), Duration::from_secs(5)).get_pod("default", "p").unwrap_err();
    assert!(t.elapsed() < PROMPTLY);
    assert!(matches!(e, Error::Forbidden { .. }), "{e:?}");
    assert_eq!(e.class(), Class::Access);
    let msg = chain(&e);
    assert!(msg.contains("403 Forbidden") && msg.contains("system:serviceaccount:kube-system:tproxy-cni"), "{msg}");
    assert_no_token(&e, TOKEN);
    assert_eq!(api.requests().len(), 1, "403 is not retried");
}

#[test]
fn server_errors_are_retried_until_an_answer_comes() {
    let api = ApiServer::start();
    api.add_pod(PodFixture::new("default", "p"));
    api.fail_next(3, Fault::Status(500));
    let deadline = Duration::from_secs(5);
    let t = Instant::now();
    let pod = client(&api.default_kubeconfig(), deadline).get_pod("default", "p").unwrap();
    assert!(t.elapsed() < deadline);
    assert_eq!(pod.metadata.name, "p");
    let statuses: Vec<u16> = api.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [500, 500, 500, 200]);
}

#[test]
fn too_many_requests_waits_as_long_as_retry_after_says() {
    let api = ApiServer::start();
    api.add_pod(PodFixture::new("default", "p"));
    api.fail_next(1, Fault::Status(429));
    let t = Instant::now();
    client(&api.default_kubeconfig(), Duration::from_secs(5)).get_pod("default", "p").unwrap();
    assert!(t.elapsed() >= Duration::from_millis(950), "Retry-After: 1 was not honoured: {:?}", t.elapsed());
    assert_eq!(api.requests().len(), 2);
}

#[test]
fn a_server_that_keeps_failing_is_unavailable_within_the_deadline() {
    let api = ApiServer::start();
    api.add_pod(PodFixture::new("default", "p"));
    api.set_fault(Some(Fault::Status(500)));
    let deadline = Duration::from_secs(2);
    let t = Instant::now();
    let e = client(&api.default_kubeconfig(), deadline).get_pod("default", "p").unwrap_err();
    assert!(t.elapsed() <= deadline + SLACK, "{:?}", t.elapsed());
    assert_eq!(e.class(), Class::Transient);
    let Error::Unavailable { attempts, .. } = &e else { panic!("{e:?}") };
    assert!(*attempts > 1 && *attempts as usize == api.requests().len(), "{attempts} attempts");
    let msg = chain(&e);
    assert!(msg.contains("did not answer GET pod default/p within 2000 ms") && msg.contains("HTTP 500"), "{msg}");
    assert!(msg.contains("etcdserver: request timed out"), "the server's reason is kept: {msg}");
    assert_no_token(&e, TOKEN);
}

#[test]
fn a_slow_server_times_out_at_the_deadline() {
    let api = ApiServer::start();
    api.add_pod(PodFixture::new("default", "p"));
    api.set_fault(Some(Fault::Delay(Duration::from_secs(20))));
    let deadline = Duration::from_secs(1);
    let t = Instant::now();
    let e = client(&api.default_kubeconfig(), deadline).get_pod("default", "p").unwrap_err();
    let took = t.elapsed();
    assert!(took >= deadline - Duration::from_millis(100) && took <= deadline + SLACK, "{took:?}");
    assert_eq!(e.class(), Class::Transient);
    assert!(chain(&e).contains("timeout"), "{}", chain(&e));
}

#[test]
fn a_connection_cut_mid_answer_is_retried() {
    let api = ApiServer::start();
    api.add_pod(PodFixture::new("default", "p"));
    api.fail_next(2, Fault::CloseMidResponse);
    api.fail_next(1, Fault::Hangup);
    let pod = client(&api.default_kubeconfig(), Duration::from_secs(5)).get_pod("default", "p").unwrap();
    assert_eq!(pod.metadata.name, "p");
    assert_eq!(api.requests().len(), 4);
}

#[test]
fn a_connection_that_always_breaks_is_unavailable() {
    let api = ApiServer::start();
    api.add_pod(PodFixture::new("default", "p"));
    api.set_fault(Some(Fault::CloseMidResponse));
    let deadline = Duration::from_secs(2);
    let t = Instant::now();
    let e = client(&api.default_kubeconfig(), deadline).get_pod("default", "p").unwrap_err();
    assert!(t.elapsed() <= deadline + SLACK);
    assert_eq!(e.class(), Class::Transient, "{}", chain(&e));
}

#[test]
fn an_api_server_that_is_down_is_unavailable_within_the_deadline() {
    // A port on loopback that nobody listens on: connections are refused at once.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let api = ApiServer::start();
    let kc = api
        .kubeconfig("down", &KubeconfigSpec { server: Some(format!("https://{free}")), ..KubeconfigSpec::default() });
    let deadline = Duration::from_secs(2);
    let t = Instant::now();
    let e = client(&kc, deadline).get_pod("default", "p").unwrap_err();
    assert!(t.elapsed() <= deadline + SLACK);
    let Error::Unavailable { attempts, server, .. } = &e else { panic!("{e:?}") };
    assert!(*attempts > 1, "connection errors are retried");
    assert_eq!(server, &format!("https://{free}"));
    assert_eq!(e.class(), Class::Transient);
    assert!(chain(&e).to_lowercase().contains("refused"), "{}", chain(&e));
}

#[test]
fn a_server_certificate_from_another_ca_is_untrusted_at_once() {
    let api = ApiServer::start();
    api.add_pod(PodFixture::new("default", "p"));
    for inline in [false, true] {
        let kc =
            api.kubeconfig(&format!("wrong-ca-{inline}"), &spec(Auth::Token(TOKEN.into()), Trust::OtherCa, inline));
        let t = Instant::now();
        let e = client(&kc, Duration::from_secs(5)).get_pod("default", "p").unwrap_err();
        assert!(t.elapsed() < PROMPTLY, "a bad certificate is not retried");
        assert!(matches!(e, Error::Untrusted { .. }), "{e:?}");
        assert_eq!(e.class(), Class::Access);
        let msg = chain(&e);
        assert!(msg.contains("not trusted") && msg.contains(&api.url()), "{msg}");
        assert_no_token(&e, TOKEN);
    }
    assert!(api.requests().is_empty(), "no request got through a failed handshake");
}

#[test]
fn a_rotated_token_file_is_read_again_for_the_next_call() {
    let api = ApiServer::start();
    api.add_pod(PodFixture::new("default", "p"));
    let token_file = api.dir().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let kc = api.kubeconfig("rotating", &spec(Auth::TokenFile(token_file.clone()), Trust::Ca, false));
    let c = client(&kc, Duration::from_secs(5));
    c.get_pod("default", "p").unwrap();
    // The kubelet rotates the projected token: the server stops accepting the old one.
    api.set_token("rotated-token-2");
    std::fs::write(&token_file, "rotated-token-2").unwrap();
    c.get_pod("default", "p").unwrap();
    let bearers: Vec<_> = api.requests().into_iter().map(|r| r.bearer.unwrap_or_default()).collect();
    assert_eq!(bearers, [TOKEN, "rotated-token-2"]);
    // A token file that went missing is a kubeconfig problem, not an outage.
    std::fs::remove_file(&token_file).unwrap();
    let e = c.get_pod("default", "p").unwrap_err();
    assert_eq!(e.class(), Class::Config, "{}", chain(&e));
    assert!(chain(&e).contains("tokenFile"), "{}", chain(&e));
}

#[test]
fn patches_one_pod_annotation_with_a_merge_patch() {
    let api = ApiServer::start();
    api.add_pod(PodFixture::consul("shop", "web-0"));
    let c = client(&api.default_kubeconfig(), Duration::from_secs(5));
    let key = "consul.hashicorp.com/transparent-proxy-status";
    let pod = c.patch_pod_annotation("shop", "web-0", key, "waiting").unwrap();
    assert_eq!(pod.metadata.annotations[key], "waiting");
    let patches = api.patches();
    assert_eq!(patches.len(), 1);
    assert_eq!(patches[0].path, "/api/v1/namespaces/shop/pods/web-0");
    assert_eq!(patches[0].content_type.as_deref(), Some("application/merge-patch+json"));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&patches[0].body).unwrap(),
        json!({"metadata": {"annotations": {key: "waiting"}}})
    );
    assert_eq!(api.pod_annotation("shop", "web-0", key).as_deref(), Some("waiting"));
    assert_eq!(
        api.pod_annotation("shop", "web-0", "consul.hashicorp.com/connect-inject-status").as_deref(),
        Some("injected"),
        "other annotations are untouched"
    );
}

#[test]
fn removes_a_node_taint_despite_a_concurrent_change() {
    let api = ApiServer::start();
    let ours = json!({"key": "tproxy-cni.io/not-ready", "effect": "NoSchedule"});
    let other =
        json!({"key": "example.com/other", "value": "x", "effect": "NoExecute", "timeAdded": "2026-11-21T10:00:00Z"});
    api.add_node("node-1", vec![other.clone(), ours]);
    // Between our read and our patch, another writer puts a taint in front of ours.
    let newcomer = json!({"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"});
    let inserted = newcomer.clone();
    api.change_node_after_next_get(move |node| {
        node["spec"]["taints"].as_array_mut().unwrap().insert(0, inserted);
    });
    let c = client(&api.default_kubeconfig(), Duration::from_secs(5));
    assert!(c.remove_node_taint("node-1", "tproxy-cni.io/not-ready").unwrap());
    let statuses: Vec<(String, u16)> = api.requests().into_iter().map(|r| (r.method, r.status)).collect();
    assert_eq!(
        statuses,
        [("GET".into(), 200), ("PATCH".into(), 422), ("GET".into(), 200), ("PATCH".into(), 200)],
        "the stale patch is refused as a whole, then redone from a fresh read"
    );
    assert_eq!(api.node("node-1").unwrap()["spec"]["taints"], json!([newcomer, other]));
    let last = api.patches().pop().unwrap();
    assert_eq!(last.content_type.as_deref(), Some("application/json-patch+json"));
    assert!(last.body.contains(r#""op":"test""#) && last.body.contains(r#""op":"remove""#), "{}", last.body);
    // Nothing left to remove: no patch at all.
    assert!(!c.remove_node_taint("node-1", "tproxy-cni.io/not-ready").unwrap());
    assert_eq!(api.patches().len(), 2);
}

#[test]
fn a_merge_patch_with_a_stale_resource_version_is_a_conflict() {
    let api = ApiServer::start();
    api.add_node("node-1", vec![]);
    let c = client(&api.default_kubeconfig(), Duration::from_secs(5));
    let node = c.get_node("node-1").unwrap();
    let rv = node.metadata.resource_version.clone().unwrap();
    c.patch_node("node-1", Patch::Merge(json!({"metadata": {"resourceVersion": rv, "labels": {"a": "1"}}}))).unwrap();
    let e = c
        .patch_node("node-1", Patch::Merge(json!({"metadata": {"resourceVersion": rv, "labels": {"a": "2"}}})))
        .unwrap_err();
    assert!(e.is_conflict(), "{e:?}");
    assert_eq!(e.class(), Class::Rejected);
    assert_eq!(api.node("node-1").unwrap()["metadata"]["labels"]["a"], "1");
}

#[test]
fn finds_the_newest_versioned_kubeconfig_when_the_named_one_is_missing() {
    let api = ApiServer::start();
    api.add_pod(PodFixture::new("default", "p"));
    // CA inline: a CA file beside it would itself be a `<name>-*` candidate, and a newer one.
    let real = api.kubeconfig("ZZZ-consul-cni-kubeconfig-7f3a", &spec(Auth::Token(TOKEN.into()), Trust::Ca, true));
    let named = real.with_file_name("ZZZ-consul-cni-kubeconfig");
    client(&named, Duration::from_secs(5)).get_pod("default", "p").unwrap();
    let e = Client::from_kubeconfig(&real.with_file_name("nothing-here"), Duration::from_secs(5)).unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
}

#[test]
fn names_that_kubernetes_cannot_issue_never_reach_the_server() {
    let api = ApiServer::start();
    let c = client(&api.default_kubeconfig(), Duration::from_secs(5));
    for (ns, name) in [("default", "../nodes/x"), ("a/b", "p"), ("default", "My_Container")] {
        let e = c.get_pod(ns, name).unwrap_err();
        assert_eq!(e.class(), Class::Config, "{e}");
    }
    assert!(api.requests().is_empty());
}

/// A DaemonSet is read, listed by name (with the list's resource version) and watched from that
/// version: a rolling update, a foreground deletion and the removal arrive in order, and a 404 that
/// names it tells it is gone, where a 404 that names nothing does not.
#[test]
fn reads_lists_and_watches_a_daemonset() {
    let api = ApiServer::start();
    let uid = api.add_daemonset("kube-system", "tproxy-cni");
    api.add_daemonset("kube-system", "other");
    let c = client(&api.default_kubeconfig(), Duration::from_secs(5));
    let ds = c.get_daemonset("kube-system", "tproxy-cni").unwrap();
    assert_eq!((ds.metadata.uid.as_deref(), ds.metadata.deletion_timestamp.as_deref()), (Some(uid.as_str()), None));
    let (listed, version) = c.list_daemonset("kube-system", "tproxy-cni").unwrap();
    assert_eq!(listed.unwrap().metadata.uid.as_deref(), Some(uid.as_str()));
    assert!(!version.is_empty());

    let watch = c.watch_daemonset("kube-system", "tproxy-cni", &version, Duration::from_secs(5)).unwrap();
    let events = std::thread::spawn(move || watch.take(3).collect::<Result<Vec<_>, _>>());
    api.roll_daemonset("kube-system", "tproxy-cni");
    api.roll_daemonset("kube-system", "other"); // another name: not in this watch
    api.delete_daemonset("kube-system", "tproxy-cni", true);
    api.delete_daemonset("kube-system", "tproxy-cni", false);
    let events = events.join().unwrap().unwrap();
    let seen: Vec<(&str, Option<&str>, bool)> = events
        .iter()
        .map(|e| match e {
            WatchEvent::Modified(d) => ("MODIFIED", d.metadata.uid.as_deref(), d.metadata.deletion_timestamp.is_some()),
            WatchEvent::Deleted(d) => ("DELETED", d.metadata.uid.as_deref(), d.metadata.deletion_timestamp.is_some()),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    let u = Some(uid.as_str());
    assert_eq!(seen, [("MODIFIED", u, false), ("MODIFIED", u, true), ("DELETED", u, true)]);

    let e = c.get_daemonset("kube-system", "tproxy-cni").unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    let (listed, _) = c.list_daemonset("kube-system", "tproxy-cni").unwrap();
    assert!(listed.is_none());
    api.fail_next(1, Fault::Status(404));
    let e = c.get_daemonset("kube-system", "other").unwrap_err();
    assert!(matches!(e, Error::NotFoundElsewhere { .. }), "a 404 naming nothing proves nothing: {e:?}");

    let paths: Vec<String> = api.requests().iter().map(|r| r.path.clone()).collect();
    assert!(
        paths.iter().any(|p| p.starts_with(
            "/apis/apps/v1/namespaces/kube-system/daemonsets?fieldSelector=metadata.name%3Dtproxy-cni&watch=true"
        ) && p.contains(&format!("&resourceVersion={version}&timeoutSeconds=5"))),
        "{paths:?}"
    );
    assert!(api.requests().iter().all(|r| r.bearer.as_deref() == Some(TOKEN)));
}

/// A watch ends when the server ends it (after `timeoutSeconds`) and soon after the connection is
/// cut; opening one on a server that refuses is an error at once.
#[test]
fn a_watch_ends_when_the_server_ends_it_or_the_connection_drops() {
    let api = ApiServer::start();
    api.add_daemonset("kube-system", "tproxy-cni");
    let c = client(&api.default_kubeconfig(), Duration::from_secs(5));
    let (_, version) = c.list_daemonset("kube-system", "tproxy-cni").unwrap();
    let start = Instant::now();
    let events: Vec<_> =
        c.watch_daemonset("kube-system", "tproxy-cni", &version, Duration::from_secs(1)).unwrap().collect();
    assert!(events.is_empty(), "{events:?}");
    assert!(start.elapsed() >= Duration::from_secs(1) && start.elapsed() < Duration::from_secs(1) + SLACK);

    let watch = c.watch_daemonset("kube-system", "tproxy-cni", &version, Duration::from_secs(60)).unwrap();
    let ended = std::thread::spawn(move || watch.collect::<Vec<_>>());
    std::thread::sleep(Duration::from_millis(200));
    let cut = Instant::now();
    api.cut_watches();
    let events = ended.join().unwrap();
    assert!(cut.elapsed() < PROMPTLY, "the watch outlived its connection by {:?}", cut.elapsed());
    assert!(events.iter().all(|e| e.is_err()), "{events:?}");

    api.set_fault(Some(Fault::Status(403)));
    let start = Instant::now();
    let e = c.watch_daemonset("kube-system", "tproxy-cni", &version, Duration::from_secs(60)).unwrap_err();
    assert_eq!(e.class(), Class::Access, "{e}");
    assert!(start.elapsed() < PROMPTLY);
}

//! A stand-in for the Kubernetes API server, in process, over real TLS, for integration tests.
//!
//! There is no API server binary to be had on a test machine, so this plays the part for what the
//! plugin and the installer use: HTTPS with a test CA (rcgen), `Authorization: Bearer` checked
//! (or a client certificate signed by the test CA), real Pod, Node and DaemonSet JSON (a DaemonSet
//! can be read, listed by name and watched: a chunked stream of events, as the real server sends
//! them), `Status` objects for errors (401, 403, 404, 409, 422, 429, 5xx), merge-patch and JSON-patch, and faults on demand:
//! a delay, N error answers then success, a connection closed mid-response. Every request is
//! recorded (method, path, content type, body, which token it carried) for tests to assert on.
//! A test can put validating admission in the write path ([`ApiServer::set_admission`]): every
//! patch is then shown, before it is stored, as the API server shows an update to admission
//! ([`AdmissionAttributes`]), and refused when the hook says so.
//!
//! It writes kubeconfig files that point at itself, exactly as an installer writes one on a node,
//! with the CA as a file or as `-data`, a token inline or in a `tokenFile`, a client certificate,
//! or the CA of an unrelated authority (the "wrong CA" fault).
//!
//! Self-contained on purpose (depends only on the crate's dev-dependencies), so that the benchmark
//! (`benches/cni_add.rs`) can include it too.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine as _;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection, StreamOwned};
use serde_json::{Map, Value, json};

/// The token the stand-in accepts unless a test changes it.
pub const TOKEN: &str = "stand-in-token.0123456789abcdef";

/// How long an idle kept-alive connection stays open.
const IDLE: Duration = Duration::from_secs(5);

/// A certificate authority for tests.
pub struct TestCa {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().expect("generate CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("self-sign CA");
        TestCa { pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A server certificate for these names and addresses: (certificate PEM, key PEM).
    pub fn server_cert(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().expect("generate key");
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("server params");
        params.distinguished_name.push(DnType::CommonName, "kube-apiserver");
        params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
        let cert = params.signed_by(&key, &self.issuer).expect("sign server cert");
        (cert.pem(), key.serialize_pem())
    }

    /// A client certificate for user `cn`: (certificate PEM, key PEM).
    pub fn client_cert(&self, cn: &str) -> (String, String) {
        let key = KeyPair::generate().expect("generate key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages.push(ExtendedKeyUsagePurpose::ClientAuth);
        let cert = params.signed_by(&key, &self.issuer).expect("sign client cert");
        (cert.pem(), key.serialize_pem())
    }
}

/// Something to go wrong with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and a matching `Status` body (429 and 503 carry `Retry-After: 1`).
    Status(u16),
    /// Send the status line, the headers and half the body of the real answer, then close.
    CloseMidResponse,
    /// Read the request, then close the connection without a word.
    Hangup,
    /// Wait this long, then answer normally.
    Delay(Duration),
    /// 404 with Go's plain-text "404 page not found", as a proxy in front of the API server (or a
    /// mux that does not know the path) answers: it says nothing about the pod.
    PlainNotFound,
}

/// One request as the stand-in received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub content_type: Option<String>,
    pub body: String,
    /// The bearer token it carried, if any.
    pub bearer: Option<String>,
    /// It presented a client certificate signed by the test CA.
    pub client_cert: bool,
    /// The status it was answered with (0 when the connection was cut instead).
    pub status: u16,
}

/// A pod to serve.
#[derive(Debug, Clone)]
pub struct PodFixture {
    pub namespace: String,
    pub name: String,
    pub annotations: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub containers: Vec<String>,
    pub init_containers: Vec<String>,
    /// `spec.nodeName`: `node-1` unless [`PodFixture::on_node`] says otherwise.
    pub node_name: String,
    /// The DaemonSet that controls the pod: (name, uid).
    pub daemonset: Option<(String, String)>,
}

impl PodFixture {
    pub fn new(namespace: &str, name: &str) -> PodFixture {
        PodFixture {
            namespace: namespace.into(),
            name: name.into(),
            annotations: BTreeMap::new(),
            labels: BTreeMap::new(),
            containers: vec!["app".into()],
            init_containers: Vec::new(),
            node_name: "node-1".into(),
            daemonset: None,
        }
    }

    /// The pod is bound to this node.
    pub fn on_node(mut self, node: &str) -> Self {
        self.node_name = node.into();
        self
    }

    /// The pod belongs to the DaemonSet `name` with `uid` (its controller `ownerReference`).
    pub fn owned_by_daemonset(mut self, name: &str, uid: &str) -> Self {
        self.daemonset = Some((name.into(), uid.into()));
        self
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    pub fn container(mut self, name: &str) -> Self {
        self.containers.push(name.into());
        self
    }

    pub fn init_container(mut self, name: &str) -> Self {
        self.init_containers.push(name.into());
        self
    }

    /// A Consul transparent-proxy pod as the consul-k8s webhook leaves it (CNI mode), with the
    /// webhook's typical redirect configuration.
    pub fn consul(namespace: &str, name: &str) -> PodFixture {
        PodFixture::new(namespace, name)
            .annotation("consul.hashicorp.com/connect-inject-status", "injected")
            .annotation("consul.hashicorp.com/transparent-proxy-status", "enabled")
            .annotation(
                "consul.hashicorp.com/redirect-traffic-config",
                r#"{"ConsulDNSIP":"","ConsulDNSPort":0,"ProxyUserID":"5995","ProxyInboundPort":20000,"ProxyOutboundPort":15001,"ExcludeInboundPorts":null,"ExcludeOutboundPorts":null,"ExcludeOutboundCIDRs":null,"ExcludeUIDs":["5996"],"NetNS":"","IptablesProvider":null}"#,
            )
            .label("consul.hashicorp.com/connect-inject-status", "injected")
            .container("consul-dataplane")
            .init_container("consul-connect-inject-init")
    }

    fn to_json(&self, uid: &str, resource_version: u64) -> Value {
        let containers = |names: &[String]| -> Vec<Value> {
            names.iter().map(|n| json!({"name": n, "image": "registry.example/app:1", "resources": {}})).collect()
        };
        let mut spec = json!({
            "containers": containers(&self.containers),
            "nodeName": self.node_name,
            "restartPolicy": "Always",
        });
        if !self.init_containers.is_empty() {
            spec["initContainers"] = Value::from(containers(&self.init_containers));
        }
        let mut metadata = json!({
            "name": self.name,
            "namespace": self.namespace,
            "uid": uid,
            "resourceVersion": resource_version.to_string(),
            "creationTimestamp": "2026-11-21T10:00:00Z",
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1"}],
        });
        if !self.annotations.is_empty() {
            metadata["annotations"] = json!(self.annotations);
        }
        if !self.labels.is_empty() {
            metadata["labels"] = json!(self.labels);
        }
        if let Some((name, uid)) = &self.daemonset {
            metadata["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": name,
                "uid": uid, "controller": true, "blockOwnerDeletion": true}]);
        }
        json!({
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": metadata,
            "spec": spec,
            "status": {"phase": "Pending", "qosClass": "BestEffort"},
        })
    }
}

/// How a kubeconfig written by [`ApiServer::kubeconfig`] authenticates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// `token:` inline.
    Token(String),
    /// `tokenFile:` pointing at this file.
    TokenFile(PathBuf),
    /// `client-certificate` / `client-key` signed by the stand-in's CA.
    ClientCert,
    /// No credentials at all.
    Anonymous,
}

/// How a kubeconfig written by [`ApiServer::kubeconfig`] checks the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// The stand-in's own CA.
    Ca,
    /// An unrelated CA: the handshake must fail.
    OtherCa,
    /// `insecure-skip-tls-verify: true`.
    Insecure,
}

/// What to put in a kubeconfig.
#[derive(Debug, Clone)]
pub struct KubeconfigSpec {
    pub auth: Auth,
    pub trust: Trust,
    /// CA and client certificate inline as `-data` (true) or as files beside the kubeconfig.
    pub inline: bool,
    /// Use this `server:` instead of the stand-in's own URL (e.g. an address nobody listens on).
    pub server: Option<String>,
}

impl Default for KubeconfigSpec {
    fn default() -> Self {
        KubeconfigSpec { auth: Auth::Token(TOKEN.into()), trust: Trust::Ca, inline: false, server: None }
    }
}

/// A one-shot change to a stored node, made by a "concurrent writer".
type NodeChange = Box<dyn FnOnce(&mut Value) + Send>;

/// A patch as validating admission sees it on a real API server, where a PATCH is an `UPDATE` of
/// the main resource (RBAC in this stand-in grants no subresource).
#[derive(Debug, Clone)]
pub struct AdmissionAttributes {
    /// `pods` or `nodes`.
    pub resource: &'static str,
    /// The pod's namespace; `None` for a node.
    pub namespace: Option<String>,
    pub name: String,
    /// The stored object ([`admission_view`] of it).
    pub old_object: Value,
    /// The object after the patch, as handed to validating admission ([`admission_view`]).
    pub object: Value,
    /// The bearer token the request carried (tests map it to a user).
    pub bearer: Option<String>,
}

/// Why admission refused a write: the HTTP status, the `Status` reason and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: String,
    pub message: String,
}

/// Validating admission: `Err` refuses the write, which is then not stored.
pub type Admission = Arc<dyn Fn(&AdmissionAttributes) -> Result<(), Refusal> + Send + Sync>;

/// An object as the API server hands it to validating admission, from its JSON as stored (`old`
/// is `None`) or as patched (`old` is the stored object): decoded into the Go type and converted
/// back, so `null` members and the empty maps and lists of the `omitempty` fields our patches can
/// empty (`metadata.annotations`, `metadata.labels`, `spec.taints`) are absent; for an update,
/// `status` is the stored one (the pod and node strategies' `PrepareForUpdate` reset it on the
/// main resource) and `metadata.managedFields` holds an entry for the writer (the field manager
/// runs before admission).
pub fn admission_view(object: &Value, old: Option<&Value>) -> Value {
    fn drop_nulls(v: &mut Value) {
        match v {
            Value::Object(m) => {
                m.retain(|_, v| !v.is_null());
                m.values_mut().for_each(drop_nulls);
            }
            Value::Array(a) => a.iter_mut().for_each(drop_nulls),
            _ => {}
        }
    }
    let mut view = object.clone();
    drop_nulls(&mut view);
    for (parent, key) in [("/metadata", "annotations"), ("/metadata", "labels"), ("/spec", "taints")] {
        if let Some(Value::Object(m)) = view.pointer_mut(parent) {
            let empty = match m.get(key) {
                Some(Value::Object(o)) => o.is_empty(),
                Some(Value::Array(a)) => a.is_empty(),
                _ => false,
            };
            if empty {
                m.remove(key);
            }
        }
    }
    if let Some(old) = old {
        match old.get("status") {
            Some(status) => view["status"] = status.clone(),
            None => {
                view.as_object_mut().map(|m| m.remove("status"));
            }
        }
        let entry = json!({"manager": "tproxy-cni", "operation": "Update", "apiVersion": "v1",
                           "time": "2026-11-21T10:05:00Z", "fieldsType": "FieldsV1", "fieldsV1": {}});
        let mut entries: Vec<Value> = view["metadata"]["managedFields"].as_array().cloned().unwrap_or_default();
        entries.retain(|e| e["manager"] != "tproxy-cni");
        entries.push(entry);
        view["metadata"]["managedFields"] = Value::from(entries);
    }
    view
}

struct State {
    tokens: Vec<String>,
    pods: BTreeMap<(String, String), Value>,
    nodes: BTreeMap<String, Value>,
    daemonsets: BTreeMap<(String, String), Value>,
    /// Every change to a DaemonSet, for watches: (resource version, event type, object).
    ds_events: Vec<(u64, &'static str, Value)>,
    /// Bumped by [`ApiServer::cut_watches`]: open watches see it and drop their connections.
    watch_epoch: u64,
    queued: VecDeque<Fault>,
    sticky: Option<Fault>,
    patch_status: Option<u16>,
    after_node_get: Option<NodeChange>,
    admission: Option<Admission>,
    requests: Vec<Recorded>,
    resource_version: u64,
    uid: u64,
}

struct Shared {
    state: Mutex<State>,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The running stand-in. Dropping it stops it and removes its files.
pub struct ApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    ca: TestCa,
    other_ca: TestCa,
    dir: PathBuf,
    accept: Option<JoinHandle<()>>,
}

static INSTANCE: AtomicU64 = AtomicU64::new(0);

impl ApiServer {
    /// Starts a stand-in on 127.0.0.1, on a free port.
    pub fn start() -> ApiServer {
        ApiServer::start_on(IpAddr::V4(Ipv4Addr::LOCALHOST))
    }

    /// Starts a stand-in on `::1`, for IPv6 server URLs.
    pub fn start_v6() -> ApiServer {
        ApiServer::start_on(IpAddr::V6(Ipv6Addr::LOCALHOST))
    }

    pub fn start_on(ip: IpAddr) -> ApiServer {
        let ca = TestCa::new("stand-in cluster CA");
        let other_ca = TestCa::new("some other CA");
        let (cert_pem, key_pem) = ca.server_cert(&["127.0.0.1", "::1", "localhost", "kubernetes.default.svc"]);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots.add(cert_der(ca.pem())).expect("add CA");
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .allow_unauthenticated()
            .build()
            .expect("client verifier");
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![cert_der(&cert_pem)], private_key(&key_pem))
            .expect("server certificate");
        let config = Arc::new(config);

        let listener = TcpListener::bind(SocketAddr::new(ip, 0)).expect("bind the stand-in");
        let addr = listener.local_addr().expect("local addr");
        let n = INSTANCE.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("tproxy-apiserver-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("stand-in dir");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                tokens: vec![TOKEN.into()],
                pods: BTreeMap::new(),
                nodes: BTreeMap::new(),
                daemonsets: BTreeMap::new(),
                ds_events: Vec::new(),
                watch_epoch: 0,
                queued: VecDeque::new(),
                sticky: None,
                patch_status: None,
                after_node_get: None,
                admission: None,
                requests: Vec::new(),
                resource_version: 1000,
                uid: 0,
            }),
            stop: AtomicBool::new(false),
        });
        let accept_shared = shared.clone();
        let accept = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if accept_shared.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let (shared, config) = (accept_shared.clone(), config.clone());
                std::thread::spawn(move || serve(stream, shared, config));
            }
        });
        ApiServer { addr, shared, ca, other_ca, dir, accept: Some(accept) }
    }

    /// `https://127.0.0.1:PORT` or `https://[::1]:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The stand-in's CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        self.ca.pem()
    }

    /// A directory for this stand-in's files, removed with it.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Serves `pod` (replacing any pod of the same name).
    pub fn add_pod(&self, pod: PodFixture) {
        let mut st = self.shared.lock();
        st.uid += 1;
        st.resource_version += 1;
        let uid = format!("6c3f0a52-0000-4000-8000-{:012x}", st.uid);
        let json = pod.to_json(&uid, st.resource_version);
        st.pods.insert((pod.namespace, pod.name), json);
    }

    /// The pod as the stand-in holds it now (after any patches).
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Value> {
        self.shared.lock().pods.get(&(namespace.to_owned(), name.to_owned())).cloned()
    }

    /// One annotation of a served pod, as it is now.
    pub fn pod_annotation(&self, namespace: &str, name: &str, key: &str) -> Option<String> {
        self.pod(namespace, name)?["metadata"]["annotations"][key].as_str().map(str::to_owned)
    }

    /// Serves a node with these taints (JSON objects as in `spec.taints`).
    pub fn add_node(&self, name: &str, taints: Vec<Value>) {
        let mut st = self.shared.lock();
        st.uid += 1;
        st.resource_version += 1;
        let node = json!({
            "kind": "Node",
            "apiVersion": "v1",
            "metadata": {"name": name, "uid": format!("node-uid-{}", st.uid), "resourceVersion": st.resource_version.to_string(),
                         "labels": {"kubernetes.io/hostname": name}},
            "spec": {"podCIDR": "10.244.0.0/24", "taints": taints},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        });
        st.nodes.insert(name.into(), node);
    }

    /// The node as the stand-in holds it now.
    pub fn node(&self, name: &str) -> Option<Value> {
        self.shared.lock().nodes.get(name).cloned()
    }

    /// Serves a DaemonSet (as `kubectl apply` creates it) and returns its UID.
    pub fn add_daemonset(&self, namespace: &str, name: &str) -> String {
        let mut st = self.shared.lock();
        st.uid += 1;
        st.resource_version += 1;
        let uid = format!("d5e7a3b1-0000-4000-8000-{:012x}", st.uid);
        let rv = st.resource_version;
        let ds = daemonset_json(namespace, name, &uid, rv);
        st.ds_events.push((rv, "ADDED", ds.clone()));
        st.daemonsets.insert((namespace.into(), name.into()), ds);
        uid
    }

    /// A template change (a rolling update): the generation grows, the UID stays.
    pub fn roll_daemonset(&self, namespace: &str, name: &str) {
        self.change_daemonset(namespace, name, |ds| {
            let g = ds["metadata"]["generation"].as_u64().unwrap_or(1) + 1;
            ds["metadata"]["generation"] = g.into();
            ds["metadata"]["annotations"]["deprecated.daemonset.template.generation"] = g.to_string().into();
            ds["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"] =
                format!("2026-11-21T10:{:02}:00Z", g % 60).into();
        });
    }

    /// Deletes the DaemonSet as `kubectl delete` does. Background (the default cascade): the object
    /// is gone at once, watches see DELETED. Foreground: it stays, with a `deletionTimestamp` and
    /// the `foregroundDeletion` finalizer, until its pods are gone (here: until deleted again).
    pub fn delete_daemonset(&self, namespace: &str, name: &str, foreground: bool) {
        if foreground {
            self.change_daemonset(namespace, name, |ds| {
                ds["metadata"]["deletionTimestamp"] = "2026-11-21T10:30:00Z".into();
                ds["metadata"]["deletionGracePeriodSeconds"] = 0.into();
                ds["metadata"]["finalizers"] = json!(["foregroundDeletion"]);
            });
            return;
        }
        let mut st = self.shared.lock();
        st.resource_version += 1;
        let rv = st.resource_version;
        let mut ds = st.daemonsets.remove(&(namespace.to_owned(), name.to_owned())).expect("no such DaemonSet");
        ds["metadata"]["resourceVersion"] = rv.to_string().into();
        st.ds_events.push((rv, "DELETED", ds));
    }

    fn change_daemonset(&self, namespace: &str, name: &str, change: impl FnOnce(&mut Value)) {
        let mut st = self.shared.lock();
        st.resource_version += 1;
        let rv = st.resource_version;
        let ds = st.daemonsets.get_mut(&(namespace.to_owned(), name.to_owned())).expect("no such DaemonSet");
        change(ds);
        ds["metadata"]["resourceVersion"] = rv.to_string().into();
        let ds = ds.clone();
        st.ds_events.push((rv, "MODIFIED", ds));
    }

    /// Drops every open watch connection mid-stream (an API server restart, a load balancer's idle
    /// timeout): clients must watch again from where they were.
    pub fn cut_watches(&self) {
        self.shared.lock().watch_epoch += 1;
    }

    /// Changes the node right after the next GET of a node has been answered: a concurrent writer.
    pub fn change_node_after_next_get(&self, change: impl FnOnce(&mut Value) + Send + 'static) {
        self.shared.lock().after_node_get = Some(Box::new(change));
    }

    /// Accept only this token from now on (a rotation: the old one is refused with 401).
    pub fn set_token(&self, token: &str) {
        self.shared.lock().tokens = vec![token.into()];
    }

    /// Accept this token as well as the ones accepted already.
    pub fn add_token(&self, token: &str) {
        self.shared.lock().tokens.push(token.into());
    }

    /// Puts validating admission in front of every patch (`None` removes it).
    pub fn set_admission(&self, admission: Option<Admission>) {
        self.shared.lock().admission = admission;
    }

    /// The next `times` requests meet `fault`, one each, before anything else.
    pub fn fail_next(&self, times: usize, fault: Fault) {
        let mut st = self.shared.lock();
        st.queued.extend(std::iter::repeat_n(fault, times));
    }

    /// Every request meets `fault` (after any queued ones) until cleared with `None`.
    pub fn set_fault(&self, fault: Option<Fault>) {
        self.shared.lock().sticky = fault;
    }

    /// Answer every PATCH with this status (e.g. 500 or 403) until cleared with `None`.
    pub fn fail_patches(&self, status: Option<u16>) {
        self.shared.lock().patch_status = status;
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.lock().requests.clone()
    }

    /// The PATCH requests received so far.
    pub fn patches(&self) -> Vec<Recorded> {
        self.requests().into_iter().filter(|r| r.method == "PATCH").collect()
    }

    /// The values of Consul's `transparent-proxy-status` annotation that the accepted PATCHes of pod
    /// `namespace/name` set, in order (the plugin's progress reports).
    pub fn status_reports(&self, namespace: &str, name: &str) -> Vec<String> {
        let path = format!("/api/v1/namespaces/{namespace}/pods/{name}");
        self.patches()
            .iter()
            .filter(|r| r.path == path && r.status == 200)
            .map(|r| {
                let body: Value = serde_json::from_str(&r.body).expect("a JSON patch body");
                body["metadata"]["annotations"][tproxy_cni::core::mesh::consul::TPROXY_STATUS]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect()
    }

    /// Writes a kubeconfig file named `name` in [`ApiServer::dir`], as an installer would on a node.
    pub fn kubeconfig(&self, name: &str, spec: &KubeconfigSpec) -> PathBuf {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let ca_pem = match spec.trust {
            Trust::Ca => Some(self.ca.pem()),
            Trust::OtherCa => Some(self.other_ca.pem()),
            Trust::Insecure => None,
        };
        let mut cluster = format!("    server: {}\n", spec.server.clone().unwrap_or_else(|| self.url()));
        match (ca_pem, spec.inline) {
            (Some(pem), true) => cluster += &format!("    certificate-authority-data: {}\n", b64(pem)),
            (Some(pem), false) => {
                let file = self.dir.join(format!("{name}.ca.crt"));
                std::fs::write(&file, pem).expect("write CA file");
                cluster += &format!("    certificate-authority: {}\n", file.display());
            }
            (None, _) => cluster += "    insecure-skip-tls-verify: true\n",
        }
        let user = match &spec.auth {
            Auth::Token(t) => format!("    token: {t}\n"),
            Auth::TokenFile(f) => format!("    tokenFile: {}\n", f.display()),
            Auth::Anonymous => "    {}\n".to_string(),
            Auth::ClientCert => {
                let (cert, key) = self.ca.client_cert("system:node:node-1");
                if spec.inline {
                    format!("    client-certificate-data: {}\n    client-key-data: {}\n", b64(&cert), b64(&key))
                } else {
                    // As on a kubelet: one file holding both the certificate and the key, named twice.
                    let file = self.dir.join(format!("{name}.client.pem"));
                    std::fs::write(&file, format!("{cert}{key}")).expect("write client cert");
                    format!("    client-certificate: {0}\n    client-key: {0}\n", file.display())
                }
            }
        };
        let user = if spec.auth == Auth::Anonymous { "  user: {}\n".to_string() } else { format!("  user:\n{user}") };
        let text = format!(
            "apiVersion: v1\nkind: Config\npreferences: {{}}\ncurrent-context: tproxy-cni\nclusters:\n- name: local\n  cluster:\n{cluster}\
             contexts:\n- name: tproxy-cni\n  context:\n    cluster: local\n    user: tproxy-cni\n    namespace: default\n\
             users:\n- name: tproxy-cni\n{user}"
        );
        let path = self.dir.join(name);
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    /// A kubeconfig with the defaults: the stand-in's CA in a file, the default token inline.
    pub fn default_kubeconfig(&self) -> PathBuf {
        self.kubeconfig("kubeconfig", &KubeconfigSpec::default())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn cert_der(pem: &str) -> CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).expect("certificate PEM")
}

fn private_key(pem: &str) -> PrivateKeyDer<'static> {
    use rustls::pki_types::pem::PemObject;
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).expect("key PEM"))
}

struct Incoming {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

/// What to send back.
enum Reply {
    Answer {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    Cut {
        status: u16,
        body: String,
    },
    Hangup,
    /// A watch of DaemonSets.
    Watch(WatchSpec),
}

/// A watch to stream: the DaemonSet events after `from` (a resource version) for `name` (or every
/// name) in `namespace`, after the `initial` objects, until `until`; `metadata`: as
/// `PartialObjectMetadata`.
struct WatchSpec {
    namespace: String,
    name: Option<String>,
    from: u64,
    initial: Vec<Value>,
    until: Instant,
    metadata: bool,
}

fn serve(stream: TcpStream, shared: Arc<Shared>, config: Arc<ServerConfig>) {
    let _ = stream.set_read_timeout(Some(IDLE));
    let _ = stream.set_nodelay(true);
    let Ok(conn) = ServerConnection::new(config) else { return };
    let mut reader = BufReader::new(StreamOwned::new(conn, stream));
    loop {
        let Some(req) = read_request(&mut reader) else { return };
        let client_cert = reader.get_ref().conn.peer_certificates().is_some_and(|c| !c.is_empty());
        let (reply, delay) = handle(&shared, &req, client_cert);
        if let Some(d) = delay {
            let until = Instant::now() + d;
            while Instant::now() < until {
                if shared.stop.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20).min(until.saturating_duration_since(Instant::now())));
            }
        }
        let tls = reader.get_mut();
        match reply {
            Reply::Answer { status, headers, body } => {
                if write_response(tls, status, &headers, body.as_bytes(), body.len()).is_err() {
                    return;
                }
            }
            Reply::Cut { status, body } => {
                let half = &body.as_bytes()[..body.len() / 2];
                let _ = write_response(tls, status, &[], half, body.len());
                let _ = tls.sock.shutdown(Shutdown::Both);
                return;
            }
            Reply::Hangup => {
                let _ = tls.sock.shutdown(Shutdown::Both);
                return;
            }
            Reply::Watch(spec) => {
                if !stream_watch(tls, &shared, spec) {
                    return;
                }
            }
        }
        if req.headers.get("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
            return;
        }
    }
}

fn read_request<R: Read>(reader: &mut BufReader<R>) -> Option<Incoming> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let path = parts.next()?.to_owned();
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
    }
    let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some(Incoming { method, path, headers, body })
}

fn write_response<W: Write>(
    w: &mut W,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
    length: usize,
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n",
        reason(status)
    );
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += "Audit-Id: 00000000-0000-0000-0000-000000000000\r\n\r\n";
    w.write_all(head.as_bytes())?;
    w.write_all(body)?;
    w.flush()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        406 => "Not Acceptable",
        405 => "Method Not Allowed",
        409 => "Conflict",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

/// A `Status` object as the API server sends it, with the headers that go with it.
fn status_reply(code: u16, message: &str, reason: &str) -> Reply {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    })
    .to_string();
    let headers =
        if code == 429 || code == 503 { vec![("Retry-After".to_string(), "1".to_string())] } else { Vec::new() };
    Reply::Answer { status: code, headers, body }
}

fn fault_reply(code: u16, req: &Incoming) -> Reply {
    match code {
        401 => status_reply(401, "Unauthorized", "Unauthorized"),
        403 => status_reply(
            403,
            &format!(
                "{} is forbidden: User \"system:serviceaccount:kube-system:tproxy-cni\" cannot {} resource at this path",
                req.path,
                req.method.to_ascii_lowercase()
            ),
            "Forbidden",
        ),
        404 => status_reply(404, "the server could not find the requested resource", "NotFound"),
        429 => status_reply(429, "Too many requests, please try again later.", "TooManyRequests"),
        500 => status_reply(500, "Internal error occurred: etcdserver: request timed out", "InternalError"),
        503 => status_reply(503, "the server is currently unable to handle the request", "ServiceUnavailable"),
        504 => status_reply(504, "the server was unable to return a response in the time allotted", "Timeout"),
        c => status_reply(c, "injected failure", "InternalError"),
    }
}

fn handle(shared: &Shared, req: &Incoming, client_cert: bool) -> (Reply, Option<Duration>) {
    let mut st = shared.lock();
    let bearer = req.headers.get("authorization").and_then(|v| v.strip_prefix("Bearer ")).map(str::to_owned);
    let fault = st.queued.pop_front().or_else(|| st.sticky.clone());
    let mut delay = None;
    let reply = match fault {
        Some(Fault::Status(code)) => fault_reply(code, req),
        Some(Fault::Hangup) => Reply::Hangup,
        Some(Fault::PlainNotFound) => {
            Reply::Answer { status: 404, headers: Vec::new(), body: "404 page not found\n".into() }
        }
        Some(Fault::Delay(d)) => {
            delay = Some(d);
            route(&mut st, req, bearer.as_deref(), client_cert)
        }
        Some(Fault::CloseMidResponse) => match route(&mut st, req, bearer.as_deref(), client_cert) {
            Reply::Answer { status, body, .. } => Reply::Cut { status, body },
            other => other,
        },
        None => route(&mut st, req, bearer.as_deref(), client_cert),
    };
    let status = match &reply {
        Reply::Answer { status, .. } => *status,
        _ => 0,
    };
    st.requests.push(Recorded {
        method: req.method.clone(),
        path: req.path.clone(),
        content_type: req.headers.get("content-type").cloned(),
        body: String::from_utf8_lossy(&req.body).into_owned(),
        bearer,
        client_cert,
        status,
    });
    (reply, delay)
}

fn route(st: &mut State, req: &Incoming, bearer: Option<&str>, client_cert: bool) -> Reply {
    let authorized = client_cert || bearer.is_some_and(|t| st.tokens.iter().any(|ok| ok == t));
    if !authorized {
        return status_reply(401, "Unauthorized", "Unauthorized");
    }
    let segments: Vec<&str> = req.path.split('?').next().unwrap_or("").trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["api", "v1", "namespaces", ns, "pods", name] => {
            let key = ((*ns).to_owned(), (*name).to_owned());
            pod_request(st, req, key, bearer)
        }
        ["api", "v1", "nodes", name] => node_request(st, req, (*name).to_owned(), bearer),
        ["apis", "apps", "v1", "namespaces", ns, "daemonsets", name] if req.method == "GET" => {
            let metadata = match view(req, "PartialObjectMetadata") {
                Ok(m) => m,
                Err(reply) => return reply,
            };
            match st.daemonsets.get(&((*ns).to_owned(), (*name).to_owned())) {
                Some(ds) if metadata => ok(&partial(ds)),
                Some(ds) => ok(ds),
                None => not_found_in_group("daemonsets", "apps", name),
            }
        }
        ["apis", "apps", "v1", "namespaces", ns, "daemonsets"] if req.method == "GET" => {
            daemonset_collection(st, req, ns)
        }
        _ => status_reply(404, "the server could not find the requested resource", "NotFound"),
    }
}

/// The API server's answer for a missing object: `NotFound`, with the resource and the name in
/// `details` (apimachinery's `NewNotFound`).
fn not_found(resource: &str, name: &str) -> Reply {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("{resource} \"{name}\" not found"), "reason": "NotFound",
        "details": {"name": name, "kind": resource}, "code": 404,
    })
    .to_string();
    Reply::Answer { status: 404, headers: Vec::new(), body }
}

fn pod_request(st: &mut State, req: &Incoming, key: (String, String), bearer: Option<&str>) -> Reply {
    let not_found = |st: &State| {
        let _ = st;
        not_found("pods", &key.1)
    };
    match req.method.as_str() {
        "GET" => match st.pods.get(&key) {
            Some(p) => ok(p),
            None => not_found(st),
        },
        "PATCH" => {
            if let Some(code) = st.patch_status {
                return fault_reply(code, req);
            }
            if !st.pods.contains_key(&key) {
                return not_found(st);
            }
            st.resource_version += 1;
            let rv = st.resource_version;
            let admission = st.admission.clone();
            let pod = st.pods.get_mut(&key).expect("checked above");
            let target = Target { resource: "pods", namespace: Some(&key.0), name: &key.1 };
            patch_object(pod, req, rv, target, admission.as_ref(), bearer)
        }
        _ => status_reply(405, "method not allowed", "MethodNotAllowed"),
    }
}

fn node_request(st: &mut State, req: &Incoming, name: String, bearer: Option<&str>) -> Reply {
    match req.method.as_str() {
        "GET" => {
            let Some(node) = st.nodes.get(&name).cloned() else {
                return not_found("nodes", &name);
            };
            if let Some(change) = st.after_node_get.take() {
                st.resource_version += 1;
                let rv = st.resource_version;
                let stored = st.nodes.get_mut(&name).expect("present");
                change(stored);
                stored["metadata"]["resourceVersion"] = Value::from(rv.to_string());
            }
            ok(&node)
        }
        "PATCH" => {
            if let Some(code) = st.patch_status {
                return fault_reply(code, req);
            }
            st.resource_version += 1;
            let rv = st.resource_version;
            let admission = st.admission.clone();
            let target = Target { resource: "nodes", namespace: None, name: &name };
            match st.nodes.get_mut(&name) {
                Some(node) => patch_object(node, req, rv, target, admission.as_ref(), bearer),
                None => not_found("nodes", &name),
            }
        }
        _ => status_reply(405, "method not allowed", "MethodNotAllowed"),
    }
}

fn ok(obj: &Value) -> Reply {
    Reply::Answer { status: 200, headers: Vec::new(), body: obj.to_string() }
}

/// The object a patch is for.
struct Target<'a> {
    resource: &'static str,
    namespace: Option<&'a str>,
    name: &'a str,
}

/// Applies a merge patch or a JSON patch to `obj`, all or nothing, as the API server does, and
/// stores the result if validating admission (when there is one) lets it through.
fn patch_object(
    obj: &mut Value,
    req: &Incoming,
    rv: u64,
    target: Target<'_>,
    admission: Option<&Admission>,
    bearer: Option<&str>,
) -> Reply {
    let (resource, name) = (target.resource, target.name);
    let Ok(patch) = serde_json::from_slice::<Value>(&req.body) else {
        return status_reply(400, "the patch is not valid JSON", "BadRequest");
    };
    let mut updated = obj.clone();
    match req.headers.get("content-type").map(String::as_str) {
        Some("application/merge-patch+json") => {
            let want_rv = patch.pointer("/metadata/resourceVersion").and_then(Value::as_str);
            let have_rv = obj.pointer("/metadata/resourceVersion").and_then(Value::as_str);
            if want_rv.is_some() && want_rv != have_rv {
                return status_reply(
                    409,
                    &format!(
                        "Operation cannot be fulfilled on {resource} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                    ),
                    "Conflict",
                );
            }
            merge(&mut updated, &patch);
        }
        Some("application/json-patch+json") => {
            let Some(ops) = patch.as_array() else {
                return status_reply(400, "a JSON patch is a list of operations", "BadRequest");
            };
            for op in ops {
                if let Err(msg) = json_patch_op(&mut updated, op) {
                    return status_reply(422, &msg, "Invalid");
                }
            }
        }
        other => {
            return status_reply(
                415,
                &format!("the body of the request was in an unknown format: {other:?}"),
                "UnsupportedMediaType",
            );
        }
    }
    if let Some(admit) = admission {
        let attributes = AdmissionAttributes {
            resource,
            namespace: target.namespace.map(str::to_owned),
            name: name.to_owned(),
            old_object: admission_view(obj, None),
            object: admission_view(&updated, Some(obj)),
            bearer: bearer.map(str::to_owned),
        };
        if let Err(refusal) = admit(&attributes) {
            return status_reply(refusal.status, &refusal.message, &refusal.reason);
        }
    }
    updated["metadata"]["resourceVersion"] = Value::from(rv.to_string());
    *obj = updated;
    ok(obj)
}

/// A patch applied to a copy of `obj` as this stand-in applies one it receives: `content_type`
/// `application/merge-patch+json` or `application/json-patch+json`.
pub fn apply_patch(obj: &Value, content_type: &str, patch: &Value) -> Result<Value, String> {
    let mut updated = obj.clone();
    match content_type {
        "application/merge-patch+json" => merge(&mut updated, patch),
        "application/json-patch+json" => {
            for op in patch.as_array().ok_or("a JSON patch is a list of operations")? {
                json_patch_op(&mut updated, op)?;
            }
        }
        other => return Err(format!("unknown patch type {other}")),
    }
    Ok(updated)
}

/// RFC 7386.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("made an object");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// One RFC 6902 operation (test, remove, add, replace).
fn json_patch_op(doc: &mut Value, op: &Value) -> Result<(), String> {
    let kind = op["op"].as_str().ok_or("operation without op")?;
    let path = op["path"].as_str().ok_or("operation without path")?;
    match kind {
        "test" => match doc.pointer(path) {
            Some(v) if *v == op["value"] => Ok(()),
            _ => Err(format!("testing value {path} failed")),
        },
        "remove" => {
            let (parent, last) = parent_of(doc, path)?;
            match parent {
                Value::Array(a) => {
                    let i: usize = last.parse().map_err(|_| format!("bad index in {path}"))?;
                    if i >= a.len() {
                        return Err(format!("remove operation does not apply: doc is missing path: {path}"));
                    }
                    a.remove(i);
                    Ok(())
                }
                Value::Object(m) => m
                    .remove(&last)
                    .map(drop)
                    .ok_or(format!("remove operation does not apply: doc is missing path: {path}")),
                _ => Err(format!("doc is missing path: {path}")),
            }
        }
        "add" | "replace" => {
            let value = op["value"].clone();
            let (parent, last) = parent_of(doc, path)?;
            match parent {
                Value::Array(a) if last == "-" && kind == "add" => {
                    a.push(value);
                    Ok(())
                }
                Value::Array(a) => {
                    let i: usize = last.parse().map_err(|_| format!("bad index in {path}"))?;
                    match kind {
                        "add" if i <= a.len() => a.insert(i, value),
                        "replace" if i < a.len() => a[i] = value,
                        _ => return Err(format!("{kind} operation does not apply: doc is missing path: {path}")),
                    }
                    Ok(())
                }
                Value::Object(m) => {
                    if kind == "replace" && !m.contains_key(&last) {
                        return Err(format!("replace operation does not apply: doc is missing key: {path}"));
                    }
                    m.insert(last, value);
                    Ok(())
                }
                _ => Err(format!("doc is missing path: {path}")),
            }
        }
        other => Err(format!("unexpected operation {other:?}")),
    }
}

fn parent_of<'a>(doc: &'a mut Value, path: &str) -> Result<(&'a mut Value, String), String> {
    let (parent, last) = path.rsplit_once('/').ok_or(format!("bad path {path}"))?;
    let last = last.replace("~1", "/").replace("~0", "~");
    let parent = doc.pointer_mut(parent).ok_or(format!("doc is missing path: {path}"))?;
    Ok((parent, last))
}

/// A DaemonSet as the API server returns it, with the fields a real one has.
fn daemonset_json(namespace: &str, name: &str, uid: &str, rv: u64) -> Value {
    let labels = json!({"app.kubernetes.io/name": name});
    json!({
        "kind": "DaemonSet",
        "apiVersion": "apps/v1",
        "metadata": {
            "name": name, "namespace": namespace, "uid": uid, "resourceVersion": rv.to_string(), "generation": 1,
            "creationTimestamp": "2026-11-21T10:00:00Z", "labels": labels,
            "annotations": {"deprecated.daemonset.template.generation": "1"},
        },
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels, "annotations": {}},
                "spec": {"containers": [{"name": "install", "image": "tproxy-cni:0.1.0", "command": ["/tproxy-cni", "install"]}],
                         "serviceAccountName": name, "hostNetwork": true, "tolerations": [{"operator": "Exists"}]},
            },
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "revisionHistoryLimit": 10,
        },
        "status": {"currentNumberScheduled": 1, "desiredNumberScheduled": 1, "numberMisscheduled": 0,
                   "numberReady": 1, "observedGeneration": 1, "updatedNumberScheduled": 1, "numberAvailable": 1},
    })
}

/// [`not_found`] for a resource of an API group (`daemonsets.apps "NAME" not found`).
fn not_found_in_group(resource: &str, group: &str, name: &str) -> Reply {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("{resource}.{group} \"{name}\" not found"), "reason": "NotFound",
        "details": {"name": name, "group": group, "kind": resource}, "code": 404,
    })
    .to_string();
    Reply::Answer { status: 404, headers: Vec::new(), body }
}

/// The query parameters of a request path, percent-decoded.
fn query(path: &str) -> BTreeMap<String, String> {
    let decode = |s: &str| -> String {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            match (b[i], b.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok())) {
                (b'%', Some(v)) => {
                    out.push(v);
                    i += 3;
                }
                (c, _) => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    let q = path.split_once('?').map(|(_, q)| q).unwrap_or("");
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

/// Whether the client asked for metadata only (`Accept: application/json;as=KIND;g=meta.k8s.io;v=v1`,
/// as metadata informers do) or for whole objects; a 406 for a representation not served here.
fn view(req: &Incoming, kind: &str) -> Result<bool, Reply> {
    let accept = req.headers.get("accept").map(String::as_str).unwrap_or("application/json");
    let mut whole = false;
    for media in accept.split(',').map(str::trim) {
        let mut params = media.split(';').map(str::trim);
        if !matches!(params.next(), Some("application/json" | "*/*")) {
            continue;
        }
        let params: Vec<&str> = params.collect();
        if params.is_empty() {
            whole = true;
        } else if params.contains(&format!("as={kind}").as_str())
            && params.contains(&"g=meta.k8s.io")
            && params.contains(&"v=v1")
        {
            return Ok(true);
        }
    }
    if whole {
        Ok(false)
    } else {
        Err(status_reply(406, &format!("only application/json and as={kind} are served"), "NotAcceptable"))
    }
}

/// An object's metadata only, as the API server sends a `PartialObjectMetadata`.
fn partial(obj: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]})
}

/// A list (or, with `watch=true`, a watch) of the DaemonSets in a namespace, optionally selected by
/// `fieldSelector=metadata.name=NAME`, whole or metadata only.
fn daemonset_collection(st: &mut State, req: &Incoming, ns: &str) -> Reply {
    let q = query(&req.path);
    let watch = q.get("watch").is_some_and(|w| w == "true" || w == "1");
    let metadata = match view(req, if watch { "PartialObjectMetadata" } else { "PartialObjectMetadataList" }) {
        Ok(m) => m,
        Err(reply) => return reply,
    };
    let name = match q.get("fieldSelector").map(String::as_str) {
        None | Some("") => None,
        Some(sel) => match sel.strip_prefix("metadata.name=") {
            Some(n) if !n.contains(',') => Some(n.to_owned()),
            _ => return status_reply(400, &format!("unsupported field selector {sel:?}"), "BadRequest"),
        },
    };
    let selected: Vec<Value> = st
        .daemonsets
        .iter()
        .filter(|((n, d), _)| n == ns && name.as_ref().is_none_or(|want| want == d))
        .map(|(_, v)| if metadata { partial(v) } else { v.clone() })
        .collect();
    if watch {
        let seconds: u64 = q.get("timeoutSeconds").and_then(|t| t.parse().ok()).unwrap_or(1800);
        let until = Instant::now() + Duration::from_secs(seconds);
        let (from, initial) = match q.get("resourceVersion").map(String::as_str) {
            // "Start at most recent": the current objects as ADDED, then what changes.
            None | Some("") | Some("0") => (st.resource_version, selected),
            Some(v) => match v.parse::<u64>() {
                Ok(rv) => (rv, Vec::new()),
                Err(_) => return status_reply(400, &format!("invalid resourceVersion {v:?}"), "BadRequest"),
            },
        };
        return Reply::Watch(WatchSpec { namespace: ns.to_owned(), name, from, initial, until, metadata });
    }
    let (kind, api_version) =
        if metadata { ("PartialObjectMetadataList", "meta.k8s.io/v1") } else { ("DaemonSetList", "apps/v1") };
    ok(&json!({
        "kind": kind,
        "apiVersion": api_version,
        "metadata": {"resourceVersion": st.resource_version.to_string()},
        "items": selected,
    }))
}

/// Streams a watch (of whole objects, or of their metadata) as chunked JSON lines until its deadline (then ends it cleanly), until the
/// stand-in stops, or until [`ApiServer::cut_watches`] (then drops the connection). Returns
/// whether the connection can carry another request.
fn stream_watch(w: &mut StreamOwned<ServerConnection, TcpStream>, shared: &Shared, spec: WatchSpec) -> bool {
    let WatchSpec { namespace, name, from, initial, until, metadata } = spec;
    let name = name.as_deref();
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\
                Audit-Id: 00000000-0000-0000-0000-000000000000\r\n\r\n";
    let chunk = |w: &mut StreamOwned<ServerConnection, TcpStream>, ty: &str, obj: &Value| -> bool {
        let line = format!("{}\n", json!({"type": ty, "object": obj}));
        w.write_all(format!("{:x}\r\n{line}\r\n", line.len()).as_bytes()).and_then(|_| w.flush()).is_ok()
    };
    if w.write_all(head.as_bytes()).and_then(|_| w.flush()).is_err() {
        return false;
    }
    for obj in &initial {
        if !chunk(w, "ADDED", obj) {
            return false;
        }
    }
    let epoch = shared.lock().watch_epoch;
    let mut cursor = from;
    loop {
        let (events, cut) = {
            let st = shared.lock();
            let events: Vec<(u64, &'static str, Value)> = st
                .ds_events
                .iter()
                .filter(|(rv, _, obj)| {
                    *rv > cursor
                        && obj["metadata"]["namespace"] == namespace
                        && name.is_none_or(|n| obj["metadata"]["name"] == n)
                })
                .cloned()
                .collect();
            (events, st.watch_epoch != epoch)
        };
        if cut || shared.stop.load(Ordering::SeqCst) {
            let _ = w.sock.shutdown(Shutdown::Both);
            return false;
        }
        for (rv, ty, obj) in events {
            let obj = if metadata { partial(&obj) } else { obj };
            if !chunk(w, ty, &obj) {
                return false;
            }
            cursor = rv;
        }
        if Instant::now() >= until {
            return w.write_all(b"0\r\n\r\n").and_then(|_| w.flush()).is_ok();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

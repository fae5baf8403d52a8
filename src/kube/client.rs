//! The API client: one blocking HTTPS request at a time, each call bounded by a deadline.
//!
//! Every public call (a GET or a PATCH) is one *lookup* with its own deadline ([`Client::timeout`]):
//! attempts are retried with exponential backoff and jitter while the failure is one that time can
//! cure — connection refused, reset or cut short, timeouts, 429 and 5xx answers (honouring a
//! `Retry-After` that fits) — and never past the deadline: when the next wait would not fit, the
//! call gives up at once with [`Error::Unavailable`], carrying the last failure. 401, 403, 404,
//! other 4xx answers and an untrusted server certificate end the call on the first attempt.
//!
//! Requests go straight to the server named in the kubeconfig: `HTTPS_PROXY` and friends are
//! ignored (the plugin's environment is the container runtime's, whose proxy is meant for image
//! pulls), and redirects are not followed.

use std::io::{BufRead, BufReader, Read};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use ureq::tls::{Certificate, ClientCert as UreqClientCert, RootCerts, TlsConfig, TlsProvider};

use super::error::{Cause, Error, KubeconfigError};
use super::kubeconfig::{Kubeconfig, Secret, TokenSource, Trust, resolve_path};
use super::objects::{
    JsonPatchOp, Node, PartialObjectMetadata, PartialObjectMetadataList, Patch, Pod, Status, WatchEvent,
};

/// The deadline of one lookup when the configuration does not say otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many attempts per lookup, however long the deadline.
const MAX_ATTEMPTS: u32 = 8;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// A pod is a few kilobytes; anything near this is not a pod.
const MAX_BODY: u64 = 8 << 20;
/// Server messages are quoted in one-line errors; longer ones are cut.
const MAX_MESSAGE: usize = 300;
/// Rounds of read-patch when a concurrent change defeats a guarded node patch.
const PATCH_ROUNDS: u32 = 5;
/// How long after a watch's `timeoutSeconds` the client stops waiting for the server to end it.
pub const WATCH_SLACK: Duration = Duration::from_secs(30);

/// A client of one API server, as one kubeconfig describes it.
pub struct Client {
    agent: ureq::Agent,
    server: String,
    kubeconfig: PathBuf,
    token: TokenSource,
    timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.server)
            .field("kubeconfig", &self.kubeconfig)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

enum Method {
    /// A GET accepting this media type.
    Get(&'static str),
    Patch(Patch),
}

/// The media type of a whole object.
const JSON: &str = "application/json";
/// An object's metadata only (as metadata informers ask): no spec, no status.
const METADATA: &str = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1";
/// A list's items, metadata only.
const METADATA_LIST: &str = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1";

/// One request, and how to name it in messages.
struct Request {
    method: Method,
    path: String,
    what: String,
    /// The resource and object asked for, which a 404 must name to mean "no such object".
    object: (&'static str, String),
}

/// Why one attempt failed: worth another try, or final.
enum Failure {
    Retry { cause: Cause, retry_after: Option<Duration> },
    Final(Error),
}

impl Client {
    /// Reads the kubeconfig at `path` (or its newest versioned sibling, see
    /// [`resolve_path`]) and makes a client whose lookups each end within `timeout`.
    pub fn from_kubeconfig(path: &Path, timeout: Duration) -> Result<Client, KubeconfigError> {
        let resolved = resolve_path(path)?;
        Ok(Client::new(Kubeconfig::load(&resolved)?, timeout))
    }

    /// Makes a client from a loaded kubeconfig.
    pub fn new(config: Kubeconfig, timeout: Duration) -> Client {
        let mut tls = TlsConfig::builder().provider(TlsProvider::Rustls);
        tls = match &config.trust {
            Trust::Authorities(cas) => tls.root_certs(RootCerts::Specific(Arc::new(
                cas.iter().map(|c| Certificate::from_der(c).to_owned()).collect(),
            ))),
            Trust::PublicRoots => tls.root_certs(RootCerts::WebPki),
            Trust::Insecure => {
                log::warn!(
                    "kubeconfig {} sets insecure-skip-tls-verify: the API server is not authenticated",
                    config.path.display()
                );
                tls.disable_verification(true)
            }
        };
        if let Some(cert) = &config.client_cert {
            let chain: Vec<Certificate<'static>> =
                cert.chain.iter().map(|c| Certificate::from_der(c).to_owned()).collect();
            tls = tls.client_cert(Some(UreqClientCert::new_with_certs(&chain, cert.key.to_owned())));
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .https_only(true)
            .proxy(None)
            .max_redirects(0)
            .user_agent(concat!("tproxy-cni/", env!("CARGO_PKG_VERSION")))
            .tls_config(tls.build())
            .timeout_global(Some(timeout))
            .build()
            .new_agent();
        Client { agent, server: config.server, kubeconfig: config.path, token: config.token, timeout }
    }

    /// The API server's URL, for messages.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The deadline of each lookup.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Reads a pod.
    pub fn get_pod(&self, namespace: &str, name: &str) -> Result<Pod, Error> {
        check_name("namespace", namespace)?;
        check_name("pod name", name)?;
        let req = Request {
            method: Method::Get(JSON),
            path: format!("/api/v1/namespaces/{namespace}/pods/{name}"),
            what: format!("GET pod {namespace}/{name}"),
            object: ("pods", name.to_owned()),
        };
        self.decode(&req, self.send(&req)?, "Pod")
    }

    /// Sets one annotation of a pod with a JSON merge patch. Other annotations, and concurrent
    /// writers of other keys, are unaffected: a merge patch merges maps key by key.
    pub fn patch_pod_annotation(&self, namespace: &str, name: &str, key: &str, value: &str) -> Result<Pod, Error> {
        check_name("namespace", namespace)?;
        check_name("pod name", name)?;
        let patch = Patch::Merge(serde_json::json!({ "metadata": { "annotations": { key: value } } }));
        let req = Request {
            method: Method::Patch(patch),
            path: format!("/api/v1/namespaces/{namespace}/pods/{name}"),
            what: format!("PATCH pod {namespace}/{name} annotation {key}={value}"),
            object: ("pods", name.to_owned()),
        };
        self.decode(&req, self.send(&req)?, "Pod")
    }

    /// Reads a node.
    pub fn get_node(&self, name: &str) -> Result<Node, Error> {
        check_name("node name", name)?;
        let req = Request {
            method: Method::Get(JSON),
            path: format!("/api/v1/nodes/{name}"),
            what: format!("GET node {name}"),
            object: ("nodes", name.to_owned()),
        };
        self.decode(&req, self.send(&req)?, "Node")
    }

    /// Patches a node. To guard against concurrent writers, put `metadata.resourceVersion` in a
    /// merge patch (the server answers 409 if the node changed) or `test` operations in a JSON
    /// patch (422 if a tested value changed); either way [`Error::is_conflict`] is true: re-read
    /// the node and try again.
    pub fn patch_node(&self, name: &str, patch: Patch) -> Result<Node, Error> {
        check_name("node name", name)?;
        let req = Request {
            method: Method::Patch(patch),
            path: format!("/api/v1/nodes/{name}"),
            what: format!("PATCH node {name}"),
            object: ("nodes", name.to_owned()),
        };
        self.decode(&req, self.send(&req)?, "Node")
    }

    /// Removes every taint with `key` from the node, leaving any other change made meanwhile alone.
    ///
    /// Each round reads the node and sends one JSON patch that, for each of our taints, first
    /// `test`s that the taint is still exactly at the index it was read at, then removes it (from
    /// the highest index down, so removals do not shift each other). If anything moved, the server
    /// refuses the whole patch and the next round starts over from a fresh read. Testing the taints
    /// themselves, rather than the node's `resourceVersion`, means the node's frequent status
    /// updates do not force pointless retries.
    ///
    /// Returns `true` when this call removed a taint, `false` when none was there.
    pub fn remove_node_taint(&self, node: &str, key: &str) -> Result<bool, Error> {
        let mut round = 0;
        loop {
            round += 1;
            let current = self.get_node(node)?;
            let ours: Vec<_> = current.spec.taints.iter().enumerate().filter(|(_, t)| t.key == key).collect();
            if ours.is_empty() {
                return Ok(false);
            }
            let mut ops = Vec::with_capacity(ours.len() * 2);
            for (i, taint) in ours.iter().rev() {
                let path = format!("/spec/taints/{i}");
                let value = serde_json::to_value(taint).expect("a taint serialises");
                ops.push(JsonPatchOp::Test { path: path.clone(), value });
                ops.push(JsonPatchOp::Remove { path });
            }
            match self.patch_node(node, Patch::Json(ops)) {
                Ok(_) => {
                    log::info!("removed taint {key} from node {node}");
                    return Ok(true);
                }
                Err(e) if e.is_conflict() && round < PATCH_ROUNDS => {
                    log::debug!("node {node} changed while removing taint {key} ({e}); reading it again");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads a DaemonSet's metadata (its spec and status are not sent: they are large and change
    /// with every rollout step).
    pub fn get_daemonset(&self, namespace: &str, name: &str) -> Result<PartialObjectMetadata, Error> {
        check_name("namespace", namespace)?;
        check_name("DaemonSet name", name)?;
        let req = Request {
            method: Method::Get(METADATA),
            path: format!("/apis/apps/v1/namespaces/{namespace}/daemonsets/{name}"),
            what: format!("GET daemonset {namespace}/{name}"),
            object: ("daemonsets", name.to_owned()),
        };
        self.decode(&req, self.send(&req)?, "PartialObjectMetadata")
    }

    /// Lists the DaemonSet named `name` (a list selected by `metadata.name`, which RBAC authorises
    /// with `resourceNames`), metadata only: the object if it exists, and the list's resource
    /// version, from which [`Client::watch_daemonset`] sees every later change.
    pub fn list_daemonset(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<(Option<PartialObjectMetadata>, String), Error> {
        check_name("namespace", namespace)?;
        check_name("DaemonSet name", name)?;
        let req = Request {
            method: Method::Get(METADATA_LIST),
            path: format!("/apis/apps/v1/namespaces/{namespace}/daemonsets?fieldSelector=metadata.name%3D{name}"),
            what: format!("LIST daemonset {namespace}/{name}"),
            object: ("daemonsets", name.to_owned()),
        };
        let list: PartialObjectMetadataList = self.decode(&req, self.send(&req)?, "PartialObjectMetadataList")?;
        let version = list.metadata.resource_version.unwrap_or_default();
        Ok((list.items.into_iter().find(|d| d.metadata.name == name), version))
    }

    /// Watches the DaemonSet named `name` from `resource_version` on, metadata only (a status
    /// change still sends an event, of about a kilobyte). The server ends the watch after about
    /// `duration`; the client gives up [`WATCH_SLACK`] later if it has not. One attempt: the caller
    /// decides when to try again.
    pub fn watch_daemonset(
        &self,
        namespace: &str,
        name: &str,
        resource_version: &str,
        duration: Duration,
    ) -> Result<Watch<PartialObjectMetadata>, Error> {
        check_name("namespace", namespace)?;
        check_name("DaemonSet name", name)?;
        let req = Request {
            method: Method::Get(METADATA),
            path: format!(
                "/apis/apps/v1/namespaces/{namespace}/daemonsets?fieldSelector=metadata.name%3D{name}&watch=true\
                 &allowWatchBookmarks=true&resourceVersion={}&timeoutSeconds={}",
                query_escape(resource_version),
                duration.as_secs().max(1)
            ),
            what: format!("WATCH daemonset {namespace}/{name}"),
            object: ("daemonsets", name.to_owned()),
        };
        let limit = duration + WATCH_SLACK;
        let (token, mut response) = self.open(&req, limit).map_err(|f| self.give_up(&req, f, limit))?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            let body = response.body_mut().with_config().limit(MAX_BODY).read_to_vec().unwrap_or_default();
            return Err(self.give_up(&req, self.refusal(&req, status, None, &body, token.as_ref()), limit));
        }
        Ok(Watch {
            lines: BufReader::new(response.into_body().into_reader()),
            server: self.server.clone(),
            what: req.what,
            limit,
            kind: "PartialObjectMetadata",
            _object: PhantomData,
        })
    }

    /// The error of a one-attempt call.
    fn give_up(&self, req: &Request, failure: Failure, limit: Duration) -> Error {
        match failure {
            Failure::Final(e) => e,
            Failure::Retry { cause, .. } => Error::Unavailable {
                server: self.server.clone(),
                request: req.what.clone(),
                deadline: limit,
                attempts: 1,
                last: cause,
            },
        }
    }

    /// Sends a request, retrying what time can cure, within the deadline.
    fn send(&self, req: &Request) -> Result<Vec<u8>, Error> {
        let deadline = Instant::now() + self.timeout;
        let mut backoff = Backoff::new();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let (cause, retry_after) = match self.attempt(req, remaining) {
                Ok(body) => return Ok(body),
                Err(Failure::Final(e)) => return Err(e),
                Err(Failure::Retry { cause, retry_after }) => (cause, retry_after),
            };
            let wait = backoff.next(retry_after);
            let left = deadline.saturating_duration_since(Instant::now());
            if attempts >= MAX_ATTEMPTS || wait >= left {
                return Err(Error::Unavailable {
                    server: self.server.clone(),
                    request: req.what.clone(),
                    deadline: self.timeout,
                    attempts,
                    last: cause,
                });
            }
            log::debug!(
                "{} to {} failed ({cause}); attempt {} in {} ms",
                req.what,
                self.server,
                attempts + 1,
                wait.as_millis()
            );
            std::thread::sleep(wait);
        }
    }

    fn attempt(&self, req: &Request, remaining: Duration) -> Result<Vec<u8>, Failure> {
        let (token, mut response) = self.open(req, remaining)?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = match response.body_mut().with_config().limit(MAX_BODY).read_to_vec() {
            Ok(body) => body,
            // A body cut short is a transport failure; for an error status the status says enough.
            Err(e) if (200..300).contains(&status) => return Err(self.transport_failure(req, e)),
            Err(_) => Vec::new(),
        };
        match status {
            200..=299 => Ok(body),
            _ => Err(self.refusal(req, status, retry_after, &body, token.as_ref())),
        }
    }

    /// Sends the request and returns the response with its body unread (and the token it carried).
    fn open(
        &self,
        req: &Request,
        remaining: Duration,
    ) -> Result<(Option<Secret>, ureq::http::Response<ureq::Body>), Failure> {
        let token = self.token.current().map_err(|problem| {
            Failure::Final(Error::Kubeconfig(KubeconfigError { path: self.kubeconfig.clone(), problem }))
        })?;
        let url = format!("{}{}", self.server, req.path);
        let bearer = token.as_ref().map(|t| format!("Bearer {}", t.expose()));
        let sent = match &req.method {
            Method::Get(accept) => {
                let mut r = self.agent.get(&url).config().timeout_global(Some(remaining)).build();
                r = r.header("Accept", *accept);
                if let Some(b) = &bearer {
                    r = r.header("Authorization", b);
                }
                r.call()
            }
            Method::Patch(patch) => {
                let mut r = self.agent.patch(&url).config().timeout_global(Some(remaining)).build();
                r = r.header("Accept", "application/json");
                if let Some(b) = &bearer {
                    r = r.header("Authorization", b);
                }
                r.content_type(patch.content_type()).send(patch.body())
            }
        };
        let response = sent.map_err(|e| self.transport_failure(req, e))?;
        Ok((token, response))
    }

    /// What a non-2xx answer means: worth another try (429, 5xx) or final.
    fn refusal(
        &self,
        req: &Request,
        status: u16,
        retry_after: Option<Duration>,
        body: &[u8],
        token: Option<&Secret>,
    ) -> Failure {
        let server = || self.server.clone();
        let request = || req.what.clone();
        match status {
            401 => Failure::Final(Error::Unauthorized { server: server(), request: request() }),
            403 => {
                Failure::Final(Error::Forbidden { server: server(), request: request(), message: message(body, token) })
            }
            404 if names_missing_object(body, &req.object) => {
                Failure::Final(Error::NotFound { server: server(), request: request() })
            }
            404 => Failure::Final(Error::NotFoundElsewhere {
                server: server(),
                request: request(),
                answer: message(body, token),
            }),
            429 | 500..=599 => {
                Failure::Retry { cause: Cause::Status { status, message: message(body, token) }, retry_after }
            }
            _ => Failure::Final(Error::Rejected {
                server: server(),
                request: request(),
                status,
                message: message(body, token),
            }),
        }
    }

    fn transport_failure(&self, req: &Request, e: ureq::Error) -> Failure {
        match transport_class(&e) {
            Transport::Transient => Failure::Retry { cause: Cause::Transport(Box::new(e)), retry_after: None },
            Transport::Untrusted => {
                Failure::Final(Error::Untrusted { server: self.server.clone(), source: Box::new(e) })
            }
            Transport::Permanent => Failure::Final(Error::Request {
                server: self.server.clone(),
                request: req.what.clone(),
                source: Box::new(e),
            }),
        }
    }

    fn decode<T: DeserializeOwned + HasKind>(
        &self,
        req: &Request,
        body: Vec<u8>,
        kind: &'static str,
    ) -> Result<T, Error> {
        let fail = |source| Error::Decode { server: self.server.clone(), request: req.what.clone(), kind, source };
        let obj: T = serde_json::from_slice(&body).map_err(fail)?;
        match obj.kind() {
            Some(k) if k != kind => Err(fail(serde::de::Error::custom(format!("its kind is {k:?}")))),
            _ => Ok(obj),
        }
    }
}

/// Objects that say what kind they are.
trait HasKind {
    fn kind(&self) -> Option<&str>;
}

impl HasKind for Pod {
    fn kind(&self) -> Option<&str> {
        self.kind.as_deref()
    }
}

impl HasKind for Node {
    fn kind(&self) -> Option<&str> {
        self.kind.as_deref()
    }
}

impl HasKind for PartialObjectMetadata {
    fn kind(&self) -> Option<&str> {
        self.kind.as_deref()
    }
}

impl HasKind for PartialObjectMetadataList {
    fn kind(&self) -> Option<&str> {
        self.kind.as_deref()
    }
}

/// A watch in progress: an iterator over its events, ending when the server ends the watch or the
/// connection drops (an error item, then the end).
pub struct Watch<T> {
    lines: BufReader<ureq::BodyReader<'static>>,
    server: String,
    what: String,
    limit: Duration,
    kind: &'static str,
    _object: PhantomData<T>,
}

impl<T> std::fmt::Debug for Watch<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").field("server", &self.server).field("what", &self.what).finish_non_exhaustive()
    }
}

/// One line of a watch stream.
#[derive(serde::Deserialize)]
struct RawEvent {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    object: serde_json::Value,
}

impl<T: DeserializeOwned> Iterator for Watch<T> {
    type Item = Result<WatchEvent<T>, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut line = Vec::new();
        loop {
            line.clear();
            match (&mut self.lines).take(MAX_BODY).read_until(b'\n', &mut line) {
                Ok(0) => return None,
                Ok(_) if line.trim_ascii().is_empty() => continue,
                Ok(_) => return Some(self.event(&line)),
                Err(e) => {
                    return Some(Err(Error::Unavailable {
                        server: self.server.clone(),
                        request: self.what.clone(),
                        deadline: self.limit,
                        attempts: 1,
                        last: Cause::Transport(Box::new(ureq::Error::Io(e))),
                    }));
                }
            }
        }
    }
}

impl<T: DeserializeOwned> Watch<T> {
    fn event(&self, line: &[u8]) -> Result<WatchEvent<T>, Error> {
        let fail = |source| Error::Decode {
            server: self.server.clone(),
            request: self.what.clone(),
            kind: "watch event",
            source,
        };
        let raw: RawEvent = serde_json::from_slice(line).map_err(fail)?;
        let object = |v: serde_json::Value| -> Result<T, Error> {
            let kind = v.get("kind").and_then(|k| k.as_str()).map(str::to_owned);
            match kind {
                Some(k) if k != self.kind => Err(fail(serde::de::Error::custom(format!("its object's kind is {k:?}")))),
                _ => serde_json::from_value(v).map_err(fail),
            }
        };
        match raw.kind.as_str() {
            "ADDED" => object(raw.object).map(WatchEvent::Added),
            "MODIFIED" => object(raw.object).map(WatchEvent::Modified),
            "DELETED" => object(raw.object).map(WatchEvent::Deleted),
            "BOOKMARK" => {
                let rv = raw.object.pointer("/metadata/resourceVersion").and_then(|v| v.as_str()).unwrap_or_default();
                Ok(WatchEvent::Bookmark { resource_version: rv.to_owned() })
            }
            "ERROR" => {
                let status: Status = serde_json::from_value(raw.object).unwrap_or_default();
                Ok(WatchEvent::Error { code: status.code, reason: status.reason, message: status.message })
            }
            other => Err(fail(serde::de::Error::custom(format!("unknown event type {other:?}")))),
        }
    }
}

/// Percent-encodes a query value (resource versions are opaque strings from the server).
fn query_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

enum Transport {
    Transient,
    Untrusted,
    Permanent,
}

/// Sorts transport errors: which ones another attempt may cure.
fn transport_class(e: &ureq::Error) -> Transport {
    use ureq::Error as E;
    let tls = match e {
        E::Rustls(t) => Some(t),
        E::Io(io) => io.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        _ => None,
    };
    match tls {
        Some(rustls::Error::InvalidCertificate(_)) => return Transport::Untrusted,
        Some(_) => return Transport::Permanent,
        None => {}
    }
    match e {
        E::Io(_) | E::Timeout(_) | E::ConnectionFailed | E::HostNotFound | E::Protocol(_) | E::BodyStalled => {
            Transport::Transient
        }
        _ => Transport::Permanent,
    }
}

/// The message of a `Status` answer (or the start of whatever the body is), on one line, short,
/// and without the token even if a misbehaving server echoed it.
fn message(body: &[u8], token: Option<&Secret>) -> String {
    let text = match serde_json::from_slice::<Status>(body) {
        Ok(s) if s.kind.as_deref() == Some("Status") => s.message.or(s.reason).unwrap_or_default(),
        _ => String::from_utf8_lossy(body).into_owned(),
    };
    let mut text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if let Some(t) = token {
        text = text.replace(t.expose(), "<redacted>");
    }
    if text.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// Is `body` the `Status` the API server sends when the object asked for does not exist? It says
/// `reason: NotFound` and names the resource and the object in `details` (apimachinery's
/// `NewNotFound`). A path the server does not serve gets `NotFound` without those details, or plain
/// text; a proxy's 404 is anything at all: neither says the object is missing.
fn names_missing_object(body: &[u8], (resource, name): &(&'static str, String)) -> bool {
    let Ok(s) = serde_json::from_slice::<Status>(body) else { return false };
    let details = s.details.unwrap_or_default();
    s.kind.as_deref() == Some("Status")
        && s.reason.as_deref() == Some("NotFound")
        && details.kind.as_deref() == Some(*resource)
        && details.name.as_deref().is_none_or(|n| n == name)
}

/// Kubernetes names that can appear in a URL path: DNS-1123 subdomains (which include labels).
/// Anything else (a `/`, `..`, upper case) cannot name a real object, and must not reach a URL.
fn check_name(what: &'static str, value: &str) -> Result<(), Error> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok { Ok(()) } else { Err(Error::InvalidName { what, value: value.to_owned() }) }
}

/// Is `value` a name Kubernetes could have given a pod or namespace?
pub fn is_valid_name(value: &str) -> bool {
    check_name("name", value).is_ok()
}

/// Exponential backoff with ±20 % jitter, so that the pods of a node that failed together do not
/// all retry in step.
struct Backoff {
    next: Duration,
    state: u64,
}

impl Backoff {
    fn new() -> Backoff {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        Backoff { next: FIRST_BACKOFF, state: (u64::from(nanos) << 16) ^ u64::from(std::process::id()) | 1 }
    }

    fn next(&mut self, at_least: Option<Duration>) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        // xorshift64: plenty for spreading retries.
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        let percent = 80 + (self.state % 41) as u32;
        let jittered = base * percent / 100;
        at_least.map_or(jittered, |floor| jittered.max(floor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_bounded_jitter_and_honours_retry_after() {
        let mut b = Backoff::new();
        let waits: Vec<Duration> = (0..8).map(|_| b.next(None)).collect();
        for (i, w) in waits.iter().enumerate() {
            let base = (FIRST_BACKOFF * 2u32.pow(i as u32)).min(MAX_BACKOFF);
            assert!(*w >= base * 80 / 100 && *w <= base * 120 / 100, "attempt {i}: {w:?} vs {base:?}");
        }
        assert!(b.next(Some(Duration::from_secs(3))) >= Duration::from_secs(3));
    }

    #[test]
    fn names_that_could_escape_the_url_path_are_refused() {
        for good in ["default", "web-0", "a.b-c", "0"] {
            assert!(is_valid_name(good), "{good}");
        }
        for bad in ["", "..", "a/b", "Web", "a_b", "-a", "a-", "a b", "a%2f", &"a".repeat(254)] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn server_messages_are_one_short_line_without_the_token() {
        let t = Secret::new("tok-123").unwrap();
        let body = br#"{"kind":"Status","message":"bad\ntoken tok-123 here","reason":"Unauthorized"}"#;
        assert_eq!(message(body, Some(&t)), "bad token <redacted> here");
        assert_eq!(message(br#"{"kind":"Status","reason":"NotFound"}"#, None), "NotFound");
        let long = "é".repeat(400);
        let m = message(long.as_bytes(), None);
        assert!(m.len() <= MAX_MESSAGE + '…'.len_utf8() && m.ends_with('…'));
        assert_eq!(message(b"<html>\n oops </html>", None), "<html> oops </html>");
    }

    #[test]
    fn only_a_status_naming_the_object_means_it_does_not_exist() {
        let pod = ("pods", "web-0".to_owned());
        let missing = br#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"pods \"web-0\" not found","reason":"NotFound","details":{"name":"web-0","kind":"pods"},"code":404}"#;
        assert!(names_missing_object(missing, &pod));
        // What the API server answers for a path it does not serve: NotFound, but about no object.
        let no_path = br#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"the server could not find the requested resource","reason":"NotFound","details":{},"code":404}"#;
        assert!(!names_missing_object(no_path, &pod));
        assert!(!names_missing_object(b"404 page not found", &pod));
        assert!(!names_missing_object(b"<html><body>Not Found</body></html>", &pod));
        let other_object = br#"{"kind":"Status","reason":"NotFound","details":{"name":"web-1","kind":"pods"}}"#;
        assert!(!names_missing_object(other_object, &pod));
        let other_kind = br#"{"kind":"Status","reason":"NotFound","details":{"name":"web-0","kind":"nodes"}}"#;
        assert!(!names_missing_object(other_kind, &pod));
        let not_status = br#"{"kind":"Pod","reason":"NotFound","details":{"name":"web-0","kind":"pods"}}"#;
        assert!(!names_missing_object(not_status, &pod));
    }
}

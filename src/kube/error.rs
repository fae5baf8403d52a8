//! Errors of the API client, typed so that a caller can tell what must happen next.
//!
//! [`Error::class`] sorts every failure into what it means for the caller: try again later (the API
//! server is down, slow or overloaded), an operator must fix access (the server refused our
//! credentials, RBAC forbids the request, or its certificate is not the one the kubeconfig trusts),
//! the object does not exist, or the kubeconfig itself is unusable. No message here ever carries
//! the bearer token: the client never formats it, and server messages are scrubbed of it.

use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

/// A kubeconfig that cannot be used, and which file it is.
#[derive(Debug, Error)]
#[error("kubeconfig {}: {problem}", path.display())]
pub struct KubeconfigError {
    /// The kubeconfig file.
    pub path: PathBuf,
    /// What is wrong with it.
    #[source]
    pub problem: Problem,
}

/// What is wrong with a kubeconfig.
#[derive(Debug, Error)]
pub enum Problem {
    /// Neither the file nor a versioned sibling (`<name>-*`) exists.
    #[error("does not exist (nor does any versioned file named like it with a -suffix)")]
    Missing,
    #[error("cannot be read")]
    Read(#[source] std::io::Error),
    #[error("is not valid YAML")]
    Yaml(#[source] Box<serde_saphyr::Error>),
    /// The decoder's message, with the values it quoted left out (they may be secrets).
    #[error("is not a valid kubeconfig: {0}")]
    Shape(String),
    #[error("is not a YAML mapping (is it really a kubeconfig?)")]
    NotAMapping,
    #[error("has no current-context")]
    NoCurrentContext,
    #[error("current-context {0:?} is not among its contexts")]
    NoContext(String),
    #[error("context {context:?} names cluster {cluster:?}, which is not among its clusters")]
    NoCluster { context: String, cluster: String },
    #[error("context {context:?} names user {user:?}, which is not among its users")]
    NoUser { context: String, user: String },
    #[error("cluster server {url:?} is not usable: {reason}")]
    Server { url: String, reason: &'static str },
    #[error("{0} and {1} are both set; keep only one")]
    Both(&'static str, &'static str),
    #[error("cannot read {what} {}", file.display())]
    File {
        what: &'static str,
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is not valid base64")]
    Base64 {
        what: &'static str,
        #[source]
        source: base64::DecodeError,
    },
    #[error("{what} {reason}")]
    Pem { what: &'static str, reason: &'static str },
    #[error("the client certificate and client key do not go together")]
    ClientKey(#[source] rustls::Error),
    #[error("has a client {0} but no client {1}")]
    HalfClientCert(&'static str, &'static str),
    #[error("user token: {0}")]
    Token(&'static str),
    #[error("user token file {}: {reason}", file.display())]
    TokenFile { file: PathBuf, reason: &'static str },
    #[error("{what} is not supported: {hint}")]
    Unsupported { what: &'static str, hint: &'static str },
}

/// One failed attempt of a request: what the transport said, or the status the server answered.
#[derive(Debug, Error)]
pub enum Cause {
    #[error(transparent)]
    Transport(Box<ureq::Error>),
    #[error("HTTP {status}{}{message}", if message.is_empty() { "" } else { ": " })]
    Status { status: u16, message: String },
}

/// A failed API request.
///
/// `server` is the API server's URL and `request` says what was asked (e.g. `GET pod shop/web-0`):
/// every message names both, so an operator reading one line knows where to look.
#[derive(Debug, Error)]
pub enum Error {
    /// The kubeconfig (or a file it names) cannot be used.
    #[error(transparent)]
    Kubeconfig(#[from] KubeconfigError),
    /// No usable answer before the deadline: connection refused or reset, timeouts, 429 or 5xx.
    #[error(
        "Kubernetes API server {server} did not answer {request} within {} ms ({attempts} attempt(s)); last failure",
        deadline.as_millis()
    )]
    Unavailable {
        server: String,
        request: String,
        deadline: Duration,
        attempts: u32,
        #[source]
        last: Cause,
    },
    /// 401: the token or client certificate was not accepted.
    #[error(
        "Kubernetes API server {server} refused {request} with 401 Unauthorized: the kubeconfig's token or client \
         certificate is not valid (expired or rotated?)"
    )]
    Unauthorized { server: String, request: String },
    /// 403: authenticated, but RBAC does not allow the request.
    #[error("Kubernetes API server {server} refused {request} with 403 Forbidden: {message}")]
    Forbidden { server: String, request: String, message: String },
    /// 404 with the `Status` the API server sends for a missing object (`reason: NotFound`, naming
    /// the resource and the object): the object does not exist.
    #[error("{request}: not found on Kubernetes API server {server}")]
    NotFound { server: String, request: String },
    /// 404 without that `Status`: a wrong server path, or something in front of the API server
    /// answering for it. It says nothing about the object.
    #[error(
        "Kubernetes API server {server} answered {request} with 404 but not with the Status the API server sends \
         for a missing object ({answer}): check the kubeconfig's server URL (no path; no proxy in front)"
    )]
    NotFoundElsewhere { server: String, request: String, answer: String },
    /// The server's certificate is not signed by the CA the kubeconfig trusts (or does not name it).
    #[error(
        "the certificate of Kubernetes API server {server} is not trusted by the kubeconfig's certificate authority"
    )]
    Untrusted {
        server: String,
        #[source]
        source: Box<ureq::Error>,
    },
    /// Any other refusal (400, 409, 422, …); 409 and 422 mean a concurrent change, see [`Error::is_conflict`].
    #[error("Kubernetes API server {server} refused {request} with HTTP {status}: {message}")]
    Rejected { server: String, request: String, status: u16, message: String },
    /// A 2xx answer that is not the object we asked for.
    #[error("Kubernetes API server {server} answered {request} with something that is not a {kind}")]
    Decode {
        server: String,
        request: String,
        kind: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// The request could not be made at all for a reason that retrying would not change.
    #[error("cannot send {request} to Kubernetes API server {server}")]
    Request {
        server: String,
        request: String,
        #[source]
        source: Box<ureq::Error>,
    },
    /// A namespace or object name that Kubernetes could not have issued.
    #[error("{what} {value:?} is not a valid Kubernetes name")]
    InvalidName { what: &'static str, value: String },
}

/// What a failure means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The API server is unreachable, slow or overloaded: try again later.
    Transient,
    /// The server cannot be used with these credentials or this CA: an operator must act.
    Access,
    /// The object does not exist.
    NotFound,
    /// The kubeconfig or the request itself is wrong: fix the configuration.
    Config,
    /// The server refused this particular request (e.g. a conflict with a concurrent change).
    Rejected,
}

impl Error {
    /// Sorts the failure by what the caller must do about it.
    pub fn class(&self) -> Class {
        match self {
            Error::Unavailable { .. } => Class::Transient,
            Error::Unauthorized { .. }
            | Error::Forbidden { .. }
            | Error::Untrusted { .. }
            | Error::NotFoundElsewhere { .. } => Class::Access,
            Error::NotFound { .. } => Class::NotFound,
            Error::Kubeconfig(_) | Error::InvalidName { .. } => Class::Config,
            Error::Rejected { .. } | Error::Decode { .. } | Error::Request { .. } => Class::Rejected,
        }
    }

    /// 410 Gone: a watch's resource version is too old (compacted away); list again.
    pub fn is_gone(&self) -> bool {
        matches!(self, Error::Rejected { status: 410, .. })
    }

    /// Did the server refuse a write because the object changed underneath it (409, or 422 from a
    /// failed JSON-patch `test`)? Re-read and try again.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Rejected { status: 409 | 422, .. })
    }
}

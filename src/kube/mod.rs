//! A small synchronous Kubernetes API client: what a node component needs, and nothing more.
//!
//! The plugin reads one pod (and may patch one annotation of it); the installer reads its node and
//! removes a taint, and watches its own DaemonSet to tell an uninstall from a restart. That does not justify an async runtime or a generated client: this is ureq
//! (blocking HTTP/1.1) over rustls, serde_json for the objects, and a YAML reader for the
//! kubeconfig. See `docs/dependencies.md` for why these crates.
//!
//! - [`kubeconfig`]: which server, which CA, which credentials (`tokenFile` re-read per request).
//! - [`Client`]: GET/PATCH with a deadline per lookup, bounded retries with backoff for what time
//!   can cure (connection failures, 429, 5xx), none for what it cannot (401, 403, 404, bad CA);
//!   and a watch of one DaemonSet by name ([`Watch`]), one attempt, the caller retrying.
//! - [`Error`]: typed so callers can tell "try again later" ([`Class::Transient`]) from "an operator
//!   must fix access" ([`Class::Access`]) from "no such object" ([`Class::NotFound`]).
//!
//! The bearer token never appears in a message or a log line: it is held in a [`Secret`] whose
//! `Debug` is redacted, it is only ever formatted into the `Authorization` header, and server
//! messages quoted in errors are scrubbed of it.

mod client;
mod error;
pub mod kubeconfig;
mod objects;

pub use client::{Client, DEFAULT_TIMEOUT, WATCH_SLACK, Watch, is_valid_name};
pub use error::{Cause, Class, Error, KubeconfigError, Problem};
pub use kubeconfig::{Kubeconfig, Secret};
pub use objects::{
    Container, JsonPatchOp, ListMeta, Node, NodeSpec, ObjectMeta, OwnerReference, PartialObjectMetadata,
    PartialObjectMetadataList, Patch, Pod, PodSpec, Taint, WatchEvent, json_pointer_escape,
};

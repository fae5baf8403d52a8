//! The few Kubernetes objects we read and write, typed to what we use of them.
//!
//! Fields the plugin never reads are not declared (serde skips them), except in [`Taint`], which
//! keeps every field it is given: a JSON-patch `test` must compare the taint exactly as stored.
//! Maps and lists that the API server may send as `null` or omit read as empty.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

fn null_default<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `metadata` of any object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    /// `None` for cluster-scoped objects (nodes).
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub uid: Option<String>,
    /// Changes with every write; a merge patch carrying it fails with 409 if the object moved on.
    #[serde(default)]
    pub resource_version: Option<String>,
    #[serde(default, deserialize_with = "null_default")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "null_default")]
    pub labels: BTreeMap<String, String>,
    /// Set when the object is being deleted (graceful or foreground deletion); it still exists.
    #[serde(default)]
    pub deletion_timestamp: Option<String>,
    /// The objects this one belongs to; a pod's controller is the DaemonSet (or other workload)
    /// that made it.
    #[serde(default, deserialize_with = "null_default")]
    pub owner_references: Vec<OwnerReference>,
}

impl ObjectMeta {
    /// The owner that manages this object (`controller: true`), if any.
    pub fn controller(&self) -> Option<&OwnerReference> {
        self.owner_references.iter().find(|o| o.controller == Some(true))
    }
}

/// One entry of `metadata.ownerReferences`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnerReference {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub controller: Option<bool>,
}

/// A container of a pod spec; only its name matters to us (meshes recognise their sidecars by it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Container {
    pub name: String,
}

/// The parts of a pod's spec the plugin reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default, deserialize_with = "null_default")]
    pub containers: Vec<Container>,
    #[serde(default, deserialize_with = "null_default")]
    pub init_containers: Vec<Container>,
    #[serde(default)]
    pub node_name: Option<String>,
}

/// A pod, as far as the plugin cares.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Pod {
    /// `"Pod"` when the server says (checked on decoding).
    #[serde(default)]
    pub kind: Option<String>,
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_default")]
    pub spec: PodSpec,
}

impl Pod {
    /// Names of the regular containers.
    pub fn container_names(&self) -> impl Iterator<Item = &str> {
        self.spec.containers.iter().map(|c| c.name.as_str())
    }

    /// Names of the init containers (native sidecars are init containers too).
    pub fn init_container_names(&self) -> impl Iterator<Item = &str> {
        self.spec.init_containers.iter().map(|c| c.name.as_str())
    }
}

/// A node taint, with every field the server sent (so it can be tested for equality in a JSON patch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Taint {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    pub effect: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_added: Option<String>,
    /// Fields of newer API versions, kept as sent.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// The parts of a node's spec the installer needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct NodeSpec {
    #[serde(default, deserialize_with = "null_default")]
    pub taints: Vec<Taint>,
}

/// A node, as far as the installer cares.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Node {
    /// `"Node"` when the server says (checked on decoding).
    #[serde(default)]
    pub kind: Option<String>,
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_default")]
    pub spec: NodeSpec,
}

/// An object's metadata without its spec or status, as the API server sends it when asked for
/// `as=PartialObjectMetadata`: which object it is (its UID), whether it is being deleted.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PartialObjectMetadata {
    /// `"PartialObjectMetadata"` when the server says (checked on decoding).
    #[serde(default)]
    pub kind: Option<String>,
    pub metadata: ObjectMeta,
}

/// `metadata` of a list: the collection's resource version, where a watch starts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListMeta {
    #[serde(default)]
    pub resource_version: Option<String>,
}

/// A list of objects' metadata (`as=PartialObjectMetadataList`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PartialObjectMetadataList {
    /// `"PartialObjectMetadataList"` when the server says (checked on decoding).
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: ListMeta,
    #[serde(default, deserialize_with = "null_default")]
    pub items: Vec<PartialObjectMetadata>,
}

/// One event of a watch, as the API server streams it (one JSON object per line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent<T> {
    Added(T),
    Modified(T),
    Deleted(T),
    /// Nothing changed, but the watch has seen everything up to this resource version.
    Bookmark {
        resource_version: String,
    },
    /// The server ends the watch with a `Status`: 410 (Gone / Expired) means the resource version
    /// is too old, and the client must list again.
    Error {
        code: Option<u16>,
        reason: Option<String>,
        message: Option<String>,
    },
}

/// One operation of a JSON patch (RFC 6902).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum JsonPatchOp {
    /// Fails the whole patch unless the value at `path` equals `value`: the guard against
    /// concurrent changes.
    Test {
        path: String,
        value: Value,
    },
    Remove {
        path: String,
    },
    Add {
        path: String,
        value: Value,
    },
    Replace {
        path: String,
        value: Value,
    },
}

/// A patch of an object, in one of the formats the API server takes.
#[derive(Debug, Clone, PartialEq)]
pub enum Patch {
    /// JSON merge patch (RFC 7386): maps merge, `null` deletes, lists are replaced whole.
    Merge(Value),
    /// JSON patch (RFC 6902): a list of operations applied atomically, or not at all.
    Json(Vec<JsonPatchOp>),
}

impl Patch {
    /// The `Content-Type` the API server expects for this format.
    pub fn content_type(&self) -> &'static str {
        match self {
            Patch::Merge(_) => "application/merge-patch+json",
            Patch::Json(_) => "application/json-patch+json",
        }
    }

    /// The request body.
    pub fn body(&self) -> String {
        match self {
            Patch::Merge(v) => v.to_string(),
            Patch::Json(ops) => serde_json::to_string(ops).expect("patch operations serialise"),
        }
    }
}

/// A `Status` object: what the API server sends with an error.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Status {
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    /// The HTTP status, in a watch's `ERROR` event (410 when its resource version is too old).
    #[serde(default)]
    pub code: Option<u16>,
    /// What the status is about: for `NotFound`, the resource (`pods`) and the object's name.
    #[serde(default)]
    pub details: Option<StatusDetails>,
}

/// `Status.details`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct StatusDetails {
    /// The resource, as the API server names it in the URL (`pods`, `nodes`).
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

/// Escapes a map key for a JSON pointer (RFC 6901): `~` → `~0`, `/` → `~1`.
pub fn json_pointer_escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_real_pod_and_tolerates_nulls() {
        let json = r#"{"kind":"Pod","apiVersion":"v1","metadata":{"name":"web-0","namespace":"shop","uid":"u-1",
            "resourceVersion":"42","labels":{"app":"web"},"annotations":{"a":"b"},"managedFields":[{"x":1}]},
            "spec":{"containers":[{"name":"web","image":"nginx","ports":[{"containerPort":80}]},{"name":"consul-dataplane"}],
            "initContainers":[{"name":"consul-connect-inject-init"}],"nodeName":"n1"},"status":{"phase":"Pending"}}"#;
        let p: Pod = serde_json::from_str(json).unwrap();
        assert_eq!(p.metadata.name, "web-0");
        assert_eq!(p.metadata.annotations["a"], "b");
        assert_eq!(p.metadata.labels["app"], "web");
        assert_eq!(p.container_names().collect::<Vec<_>>(), ["web", "consul-dataplane"]);
        assert_eq!(p.init_container_names().collect::<Vec<_>>(), ["consul-connect-inject-init"]);
        let p: Pod =
            serde_json::from_str(r#"{"metadata":{"name":"x","annotations":null,"labels":null},"spec":null}"#).unwrap();
        assert!(p.metadata.annotations.is_empty() && p.spec.containers.is_empty());
    }

    #[test]
    fn taints_round_trip_exactly() {
        let json = r#"{"key":"k","effect":"NoSchedule","timeAdded":"2026-01-01T00:00:00Z","future":{"x":1}}"#;
        let t: Taint = serde_json::from_str(json).unwrap();
        assert_eq!(serde_json::to_value(&t).unwrap(), serde_json::from_str::<Value>(json).unwrap());
        let t: Taint = serde_json::from_str(r#"{"key":"k","effect":"NoSchedule"}"#).unwrap();
        assert_eq!(serde_json::to_string(&t).unwrap(), r#"{"key":"k","effect":"NoSchedule"}"#);
    }

    #[test]
    fn patches_have_their_content_types_and_bodies() {
        let p = Patch::Json(vec![
            JsonPatchOp::Test { path: "/spec/taints/0".into(), value: serde_json::json!({"key":"k"}) },
            JsonPatchOp::Remove { path: "/spec/taints/0".into() },
        ]);
        assert_eq!(p.content_type(), "application/json-patch+json");
        assert_eq!(
            p.body(),
            r#"[{"op":"test","path":"/spec/taints/0","value":{"key":"k"}},{"op":"remove","path":"/spec/taints/0"}]"#
        );
        assert_eq!(Patch::Merge(serde_json::json!({})).content_type(), "application/merge-patch+json");
        assert_eq!(json_pointer_escape("a/b~c"), "a~1b~0c");
    }
}

//! Removing the node's start-up taint once the plugin is in place.
//!
//! A node registered with `--register-with-taints=tproxy-cni.io/not-ready=:NoSchedule` accepts no
//! ordinary pod until the installer has the binary, the conflist entry and the kubeconfig in place
//! and removes the taint: a mesh pod can then never start on a node where it would not be redirected.
//! The installer tolerates the taint itself.
//!
//! The API calls go through [`NodeApi`], which the Kubernetes client implements; the logic here —
//! read, drop exactly our taint, write back under optimistic concurrency, retry on conflict — is
//! independent of HTTP and tested against a fake.

use serde_json::Value;
use thiserror::Error;

/// The start-up taint's default key.
pub const DEFAULT_KEY: &str = "tproxy-cni.io/not-ready";

/// How many times a write that lost a race with another writer (kubelet, the node controller) is
/// retried with fresh data.
const CONFLICT_RETRIES: usize = 5;

/// A node's taints at one resourceVersion.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeTaints {
    /// `spec.taints`, each kept whole (unknown fields included).
    pub taints: Vec<Value>,
    /// `metadata.resourceVersion` when read.
    pub resource_version: String,
}

/// The two calls the taint logic needs from the API server.
pub trait NodeApi {
    type Error: std::error::Error + Send + Sync + 'static;

    /// `GET /api/v1/nodes/{node}`: its taints and resourceVersion.
    fn node_taints(&self, node: &str) -> Result<NodeTaints, Self::Error>;

    /// Sets `spec.taints` to `taints` if the node is still at `resource_version` (a merge patch that
    /// carries `metadata.resourceVersion`). `Ok(false)` when the node changed since (HTTP 409).
    fn set_node_taints(&self, node: &str, taints: &[Value], resource_version: &str) -> Result<bool, Self::Error>;
}

/// What happened to the taint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    Removed,
    /// The node did not carry it (already removed, or never added): nothing to do.
    Absent,
}

#[derive(Debug, Error)]
pub enum TaintError<E: std::error::Error + Send + Sync + 'static> {
    #[error("cannot read node {node}")]
    Read {
        node: String,
        #[source]
        source: E,
    },
    #[error("cannot update the taints of node {node}")]
    Write {
        node: String,
        #[source]
        source: E,
    },
    #[error(
        "node {node} kept changing while its taint {key} was being removed ({CONFLICT_RETRIES} conflicts); will retry"
    )]
    Conflicts { node: String, key: String },
}

/// Removes every taint with `key` (whatever its effect or value) from `node`.
pub fn remove<A: NodeApi>(api: &A, node: &str, key: &str) -> Result<Removal, TaintError<A::Error>> {
    for _ in 0..CONFLICT_RETRIES {
        let current = api.node_taints(node).map_err(|source| TaintError::Read { node: node.into(), source })?;
        let kept: Vec<Value> =
            current.taints.iter().filter(|t| t.get("key").and_then(Value::as_str) != Some(key)).cloned().collect();
        if kept.len() == current.taints.len() {
            return Ok(Removal::Absent);
        }
        match api.set_node_taints(node, &kept, &current.resource_version) {
            Ok(true) => return Ok(Removal::Removed),
            Ok(false) => log::debug!("node {node} changed while removing taint {key}: retrying"),
            Err(source) => return Err(TaintError::Write { node: node.into(), source }),
        }
    }
    Err(TaintError::Conflicts { node: node.into(), key: key.into() })
}

/// Checks a taint key as the API server would (a qualified name: optional DNS prefix, `/`, name).
pub fn validate_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && l.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && l.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            })
    });
    if name_ok && prefix_ok {
        Ok(())
    } else {
        Err(format!("taint key {key:?} is not a qualified name (e.g. {DEFAULT_KEY})"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::cell::RefCell;

    #[derive(Debug, thiserror::Error)]
    #[error("fake API error")]
    struct FakeError;

    /// An API server holding one node, which can be made to lose races.
    struct FakeApi {
        taints: RefCell<Vec<Value>>,
        version: RefCell<u64>,
        /// How many writes to refuse with a conflict (someone else wrote in between).
        conflicts: RefCell<usize>,
        writes: RefCell<usize>,
    }

    impl FakeApi {
        fn new(taints: Vec<Value>, conflicts: usize) -> FakeApi {
            FakeApi {
                taints: RefCell::new(taints),
                version: RefCell::new(1),
                conflicts: RefCell::new(conflicts),
                writes: RefCell::new(0),
            }
        }
    }

    impl NodeApi for FakeApi {
        type Error = FakeError;
        fn node_taints(&self, node: &str) -> Result<NodeTaints, FakeError> {
            if node != "n1" {
                return Err(FakeError);
            }
            Ok(NodeTaints { taints: self.taints.borrow().clone(), resource_version: self.version.borrow().to_string() })
        }
        fn set_node_taints(&self, _: &str, taints: &[Value], rv: &str) -> Result<bool, FakeError> {
            *self.writes.borrow_mut() += 1;
            if *self.conflicts.borrow() > 0 {
                *self.conflicts.borrow_mut() -= 1;
                // Another writer added a taint meanwhile.
                self.taints
                    .borrow_mut()
                    .push(json!({"key": format!("other{}", self.version.borrow()), "effect": "NoExecute"}));
                *self.version.borrow_mut() += 1;
                return Ok(false);
            }
            if rv != self.version.borrow().to_string() {
                return Ok(false);
            }
            *self.taints.borrow_mut() = taints.to_vec();
            *self.version.borrow_mut() += 1;
            Ok(true)
        }
    }

    #[test]
    fn removes_only_our_taint_and_keeps_the_others_whole() {
        let others =
            json!({"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule", "timeAdded": "2026-01-01T00:00:00Z"});
        let api = FakeApi::new(vec![json!({"key": DEFAULT_KEY, "effect": "NoSchedule"}), others.clone()], 0);
        assert_eq!(remove(&api, "n1", DEFAULT_KEY).unwrap(), Removal::Removed);
        assert_eq!(*api.taints.borrow(), vec![others]);
        assert_eq!(remove(&api, "n1", DEFAULT_KEY).unwrap(), Removal::Absent);
        assert_eq!(*api.writes.borrow(), 1, "an absent taint costs no write");
    }

    #[test]
    fn retries_on_conflict_with_fresh_data_and_gives_up_in_the_end() {
        let api = FakeApi::new(vec![json!({"key": DEFAULT_KEY, "effect": "NoSchedule"})], 2);
        assert_eq!(remove(&api, "n1", DEFAULT_KEY).unwrap(), Removal::Removed);
        let keys: Vec<_> = api.taints.borrow().iter().map(|t| t["key"].as_str().unwrap().to_owned()).collect();
        assert_eq!(keys, ["other1", "other2"], "the taints other writers added in between survive");

        let api = FakeApi::new(vec![json!({"key": DEFAULT_KEY, "effect": "NoSchedule"})], 100);
        assert!(matches!(remove(&api, "n1", DEFAULT_KEY), Err(TaintError::Conflicts { .. })));
        assert!(matches!(remove(&api, "nope", DEFAULT_KEY), Err(TaintError::Read { .. })));
    }

    #[test]
    fn keys_are_qualified_names() {
        assert!(validate_key(DEFAULT_KEY).is_ok());
        assert!(validate_key("not-ready").is_ok());
        for bad in ["", "Bad_Prefix/x", "a/", "/x", "x y", "tproxy-cni.io/-x"] {
            assert!(validate_key(bad).is_err(), "{bad}");
        }
    }
}

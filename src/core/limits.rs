//! What one CNI call may consume, whatever a pod's annotations say.
//!
//! A pod author controls the mesh annotations, and the plugin reads them as root on every node, on
//! the path that starts every pod. Each limit here turns "as much as the text asks for" into a
//! clear refusal (code 100, the annotation named) long before the cost matters: the size of each
//! mesh annotation we read, the entries of each list, and the rules per address family (every
//! rule is matched against every new connection of the pod, and a transaction of tens of thousands
//! of rules takes `iptables-restore` seconds). The YAML parser has its own budget (events,
//! aliases, anchors, depth: `mesh::kuma`), and files a kubeconfig names are read up to a size.
//! `docs/reliability.md` lists them with the reasoning behind each number.

use thiserror::Error;

use crate::core::redirect::ValueError;

/// The most bytes of one mesh annotation we read. The webhooks write a few hundred bytes; a list
/// of a thousand CIDRs fits in 32 KiB. (Kubernetes caps all of a pod's annotations together at
/// 256 KiB, but the runtime path and Nomad's `CNI_ARGS` do not go through that check.)
pub const MAX_ANNOTATION_BYTES: usize = 64 * 1024;

/// The most entries in one list (ports, CIDRs, UIDs, per-UID exclusions), after splitting.
pub const MAX_LIST_ENTRIES: usize = 1024;

/// The most rules one address family may get, over all its tables.
pub const MAX_RULES_PER_FAMILY: usize = 4096;

/// The most bytes read from a file a kubeconfig names (CA, client certificate and key, token), or
/// from the kubeconfig itself; only regular files are read.
pub const MAX_CONFIG_FILE_BYTES: u64 = 1024 * 1024;

/// The most bytes of a parser's own message (serde's, the YAML parser's) quoted in an error: they
/// may quote the value they choked on, which is the pod author's text.
pub const MAX_QUOTED_MESSAGE_BYTES: usize = 200;

/// The most bytes of the one-line message of a CNI error result.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 1024;

/// An annotation value longer than [`MAX_ANNOTATION_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("is {bytes} bytes long, more than the limit of {MAX_ANNOTATION_BYTES} bytes (see docs/reliability.md)")]
pub struct TooLong {
    /// How long the value is.
    pub bytes: usize,
}

/// A redirect whose busiest family would get more than [`MAX_RULES_PER_FAMILY`] rules.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "asks for {rules} rules per address family, more than the limit of {MAX_RULES_PER_FAMILY}: \
     shorten the exclusion lists (a CIDR that covers several ranges is one rule)"
)]
pub struct TooManyRules {
    /// How many rules the busiest family would get.
    pub rules: usize,
}

/// Refuses an annotation value longer than [`MAX_ANNOTATION_BYTES`]; the error says by how much.
pub fn annotation_size(value: &str) -> Result<(), TooLong> {
    if value.len() > MAX_ANNOTATION_BYTES {
        return Err(TooLong { bytes: value.len() });
    }
    Ok(())
}

/// Refuses a list of more than [`MAX_LIST_ENTRIES`] entries.
pub fn list_entries(what: &'static str, entries: usize) -> Result<(), ValueError> {
    if entries > MAX_LIST_ENTRIES {
        return Err(ValueError::TooMany { what, count: entries, limit: MAX_LIST_ENTRIES });
    }
    Ok(())
}

/// Refuses a rule count over [`MAX_RULES_PER_FAMILY`]. Only `core::mesh` calls it, on every
/// redirect it hands out (see `core::mesh`'s module documentation).
pub fn rules_per_family(rules: usize) -> Result<(), TooManyRules> {
    if rules > MAX_RULES_PER_FAMILY {
        return Err(TooManyRules { rules });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_limit_lets_its_maximum_through_and_refuses_one_more() {
        assert!(annotation_size(&"x".repeat(MAX_ANNOTATION_BYTES)).is_ok());
        let e = annotation_size(&"x".repeat(MAX_ANNOTATION_BYTES + 1)).unwrap_err();
        assert_eq!(e, TooLong { bytes: 65537 });
        assert!(e.to_string().contains("65537 bytes long, more than the limit of 65536"), "{e}");
        assert!(list_entries("ports", MAX_LIST_ENTRIES).is_ok());
        let e = list_entries("ExcludeInboundPorts", MAX_LIST_ENTRIES + 1).unwrap_err().to_string();
        assert_eq!(e, "ExcludeInboundPorts has 1025 entries, more than the limit of 1024");
        assert!(rules_per_family(MAX_RULES_PER_FAMILY).is_ok());
        let e = rules_per_family(MAX_RULES_PER_FAMILY + 1).unwrap_err();
        assert_eq!(e, TooManyRules { rules: 4097 });
        assert!(e.to_string().contains("asks for 4097 rules per address family"), "{e}");
    }
}

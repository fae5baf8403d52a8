//! The CNI error result: a code from the spec (or one of ours, >= 100), a one-line message, details.
//!
//! Every failure of the plugin ends here, in [`CniError`], and is printed as the spec's error JSON on
//! stdout. The codes of our own (100 and up) are a contract with operators and are documented in
//! `docs/errors.md`; never renumber them.

use serde::Serialize;

/// An error code: the spec's well-known codes, then ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Code {
    /// The configuration asks for a CNI version (or operation) this plugin does not speak.
    IncompatibleVersion = 1,
    /// A configuration field has a value we cannot honour.
    UnsupportedField = 2,
    /// The container (its network namespace) does not exist.
    UnknownContainer = 3,
    /// A required `CNI_*` environment variable is missing or malformed.
    InvalidEnvironment = 4,
    /// An I/O failure (reading stdin, writing output).
    Io = 5,
    /// stdin is not the JSON document the spec describes.
    Decode = 6,
    /// The network configuration is well-formed JSON but invalid.
    InvalidConfig = 7,
    /// A transient failure; the runtime should retry. Ours: the Kubernetes API server could not be
    /// reached (or kept failing) within `api_timeout`, for a pod we could not classify without it;
    /// or another call on the pod's namespace held it past `netns_timeout`.
    TryAgainLater = 11,
    /// STATUS: the plugin cannot serve ADD right now.
    PluginNotAvailable = 50,
    /// The pod's mesh annotations are invalid: the pod must be redirected but cannot be.
    InvalidAnnotation = 100,
    /// The netfilter transaction failed (iptables-restore refused it, could not run, or hung past
    /// `netns_timeout` and was killed).
    Netfilter = 101,
    /// The pod's network namespace could not be opened, entered or locked, or its loopback address
    /// (Kuma's `::6`) could not be set (or the kernel did not answer within `netns_timeout`).
    Netns = 102,
    /// CHECK: the rules in the pod's namespace differ from what the pod should have.
    CheckMismatch = 103,
    /// The Kubernetes API server refused us (401, 403), its certificate is not trusted by the
    /// kubeconfig's CA, or it answered something that is not the pod: an operator must fix the
    /// kubeconfig or RBAC; retrying alone will not help.
    ApiAccess = 104,
    /// A bug in tproxy-cni (it panicked); the message says where.
    Internal = 199,
}

impl Code {
    pub fn number(self) -> u32 {
        self as u32
    }
}

/// A failure to report to the runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: Code,
    /// One line an operator can act on.
    pub msg: String,
    /// Longer context (the tool's stderr, the cause chain); may be empty.
    pub details: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>) -> Self {
        let msg = crate::text::one_line(&msg.into());
        let msg = crate::text::bounded(&msg, crate::core::limits::MAX_ERROR_MESSAGE_BYTES).into_owned();
        CniError { code, msg, details: String::new() }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The spec's error document, in the given version's `cniVersion`.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        struct Doc<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        serde_json::to_string(&Doc { cni_version, code: self.code.number(), msg: &self.msg, details: &self.details })
            .expect("serialising plain strings cannot fail")
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[code {}] {}", self.code.number(), self.msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_the_spec_fields() {
        let e = CniError::new(Code::InvalidConfig, "bad").with_details("more");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.0.0")).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["code"], 7);
        assert_eq!(v["msg"], "bad");
        assert_eq!(v["details"], "more");
    }

    #[test]
    fn details_are_omitted_when_empty_and_messages_stay_on_one_line() {
        let e = CniError::new(Code::Netfilter, "line one\nline two\n");
        assert_eq!(e.msg, "line one / line two");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("0.4.0")).unwrap();
        assert!(v.get("details").is_none());
    }

    #[test]
    fn our_codes_are_100_and_up() {
        for c in [Code::InvalidAnnotation, Code::Netfilter, Code::Netns, Code::CheckMismatch, Code::ApiAccess] {
            assert!(c.number() >= 100);
        }
    }
}

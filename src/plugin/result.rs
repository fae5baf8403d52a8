//! The result we print on ADD: the previous plugin's result passed through, or an empty one.
//!
//! A chained plugin that changes nothing about interfaces or addresses must hand the previous result
//! on unchanged. When it is already in the requested version (libcni converts it before calling us)
//! we print the exact bytes we were given, so every field, known or not, survives. Otherwise we
//! rewrite only what differs between result formats: `cniVersion`, and the per-IP `version` field
//! that 1.0.0 removed.

use serde_json::value::RawValue;
use serde_json::{Map, Value};
use thiserror::Error;

use super::version::{UnsupportedVersion, Version};

#[derive(Debug, Error)]
pub enum ResultError {
    #[error("prevResult is not a JSON object")]
    NotAnObject,
    #[error("prevResult has no cniVersion")]
    MissingVersion,
    #[error("prevResult: {0}")]
    Version(#[from] UnsupportedVersion),
    #[error("prevResult ips[{0}] has no parsable address")]
    BadAddress(usize),
}

/// The result to print for `version`, given the previous result if any.
pub fn passthrough(prev: Option<&RawValue>, version: Version) -> Result<String, ResultError> {
    let Some(prev) = prev else {
        return Ok(empty(version));
    };
    let mut doc: Map<String, Value> = match serde_json::from_str(prev.get()) {
        Ok(Value::Object(m)) => m,
        _ => return Err(ResultError::NotAnObject),
    };
    let from: Version = doc.get("cniVersion").and_then(Value::as_str).ok_or(ResultError::MissingVersion)?.parse()?;
    if from == version {
        return Ok(prev.get().to_owned());
    }
    doc.insert("cniVersion".into(), Value::from(version.as_str()));
    if let Some(Value::Array(ips)) = doc.get_mut("ips") {
        for (i, ip) in ips.iter_mut().enumerate() {
            let Some(ip) = ip.as_object_mut() else { continue };
            if version.ips_carry_version() {
                if !ip.contains_key("version") {
                    let family = ip
                        .get("address")
                        .and_then(Value::as_str)
                        .and_then(|a| a.parse::<ipnet::IpNet>().ok())
                        .map(|n| if n.addr().is_ipv4() { "4" } else { "6" })
                        .ok_or(ResultError::BadAddress(i))?;
                    ip.insert("version".into(), Value::from(family));
                }
            } else {
                ip.remove("version");
            }
        }
    }
    Ok(Value::Object(doc).to_string())
}

/// A valid result with nothing in it, for the non-chained case (e.g. a Multus attachment).
pub fn empty(version: Version) -> String {
    format!(r#"{{"cniVersion":"{version}","dns":{{}}}}"#)
}

/// Does the previous result give the pod an IPv6 address?
pub fn has_ipv6(prev: Option<&RawValue>) -> bool {
    let Some(prev) = prev else { return false };
    let Ok(Value::Object(doc)) = serde_json::from_str::<Value>(prev.get()) else { return false };
    doc.get("ips").and_then(Value::as_array).is_some_and(|ips| {
        ips.iter().any(|ip| {
            ip.get("address")
                .and_then(Value::as_str)
                .and_then(|a| a.parse::<ipnet::IpNet>().ok())
                .is_some_and(|n| n.addr().is_ipv6())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn same_version_is_printed_byte_for_byte() {
        let s = r#"{"cniVersion":"1.0.0",  "interfaces":[{"name":"eth0","sandbox":"/x"}],"ips":[{"address":"10.0.0.2/24","interface":0}],"zz":{"unknown":true}}"#;
        assert_eq!(passthrough(Some(&raw(s)), Version::V1_0_0).unwrap(), s);
    }

    #[test]
    fn converting_down_adds_ip_versions_and_keeps_unknown_fields_in_order() {
        let s = r#"{"cniVersion":"1.0.0","zz":1,"ips":[{"address":"10.0.0.2/24"},{"address":"fd00::2/64"}],"aa":2}"#;
        let out = passthrough(Some(&raw(s)), Version::V0_4_0).unwrap();
        assert_eq!(
            out,
            r#"{"cniVersion":"0.4.0","zz":1,"ips":[{"address":"10.0.0.2/24","version":"4"},{"address":"fd00::2/64","version":"6"}],"aa":2}"#
        );
    }

    #[test]
    fn converting_up_drops_ip_versions() {
        let s = r#"{"cniVersion":"0.3.1","ips":[{"version":"4","address":"10.0.0.2/24"}]}"#;
        let out = passthrough(Some(&raw(s)), Version::V1_1_0).unwrap();
        assert_eq!(out, r#"{"cniVersion":"1.1.0","ips":[{"address":"10.0.0.2/24"}]}"#);
    }

    #[test]
    fn no_prev_result_gives_a_valid_empty_result() {
        let out = passthrough(None, Version::V0_3_1).unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["cniVersion"], "0.3.1");
    }

    #[test]
    fn rejects_broken_prev_results() {
        assert!(matches!(passthrough(Some(&raw("[]")), Version::V1_0_0), Err(ResultError::NotAnObject)));
        assert!(matches!(passthrough(Some(&raw("{}")), Version::V1_0_0), Err(ResultError::MissingVersion)));
        assert!(matches!(
            passthrough(Some(&raw(r#"{"cniVersion":"0.2.0"}"#)), Version::V1_0_0),
            Err(ResultError::Version(_))
        ));
    }

    #[test]
    fn detects_ipv6_addresses() {
        assert!(has_ipv6(Some(&raw(r#"{"ips":[{"address":"10.0.0.2/24"},{"address":"fd00::2/64"}]}"#))));
        assert!(!has_ipv6(Some(&raw(r#"{"ips":[{"address":"10.0.0.2/24"}]}"#))));
        assert!(!has_ipv6(None));
    }
}

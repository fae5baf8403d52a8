//! `CNI_ARGS`: the runtime's `KEY=VALUE;KEY=VALUE` list, parsed per the spec.
//!
//! Unknown keys are an error unless the list carries `IgnoreUnknown=1` (or `true`), exactly as the
//! reference plugins do. Values stay strings here; the layers that use them type them.

use thiserror::Error;

use crate::text::Quoted;

/// The keys we understand in `CNI_ARGS`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CniArgs {
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
    pub pod_uid: Option<String>,
    pub infra_container_id: Option<String>,
    /// Nomad hands the Consul redirect configuration (JSON) here instead of on a pod.
    pub consul_iptables_config: Option<String>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ArgsError {
    #[error("CNI_ARGS entry {} is not of the form KEY=VALUE", Quoted::new(.0))]
    NotAPair(String),
    #[error("CNI_ARGS key {} is not known (set IgnoreUnknown=1 to ignore it)", Quoted::new(.0))]
    UnknownKey(String),
    #[error("CNI_ARGS key {} appears twice", Quoted::new(.0))]
    Duplicate(String),
}

/// Keys we accept and ignore: they are common in the field and mean nothing to us.
const ACCEPTED_IGNORED: &[&str] = &["IgnoreUnknown", "IP", "MAC", "K8S_POD_NETWORK"];

impl CniArgs {
    /// Parses the raw `CNI_ARGS` value. An empty value yields no arguments.
    pub fn parse(raw: &str) -> Result<CniArgs, ArgsError> {
        let pairs: Vec<(&str, &str)> = raw
            .split(';')
            .filter(|p| !p.is_empty())
            .map(|p| p.split_once('=').ok_or_else(|| ArgsError::NotAPair(p.to_owned())))
            .collect::<Result<_, _>>()?;
        let ignore_unknown =
            pairs.iter().any(|(k, v)| *k == "IgnoreUnknown" && (v.eq_ignore_ascii_case("true") || *v == "1"));

        let mut args = CniArgs::default();
        for (key, value) in pairs {
            let slot = match key {
                "K8S_POD_NAME" => &mut args.pod_name,
                "K8S_POD_NAMESPACE" => &mut args.pod_namespace,
                "K8S_POD_UID" => &mut args.pod_uid,
                "K8S_POD_INFRA_CONTAINER_ID" => &mut args.infra_container_id,
                "CONSUL_IPTABLES_CONFIG" => &mut args.consul_iptables_config,
                k if ACCEPTED_IGNORED.contains(&k) => continue,
                k if ignore_unknown => {
                    log::debug!("ignoring unknown CNI_ARGS key {k:?}");
                    continue;
                }
                k => return Err(ArgsError::UnknownKey(k.to_owned())),
            };
            if slot.is_some() {
                return Err(ArgsError::Duplicate(key.to_owned()));
            }
            if !value.is_empty() {
                *slot = Some(value.to_owned());
            }
        }
        Ok(args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kubernetes_keys() {
        let a = CniArgs::parse(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;\
             K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=2f1c",
        )
        .unwrap();
        assert_eq!(a.pod_namespace.as_deref(), Some("shop"));
        assert_eq!(a.pod_name.as_deref(), Some("web-0"));
        assert_eq!(a.infra_container_id.as_deref(), Some("abc123"));
        assert_eq!(a.pod_uid.as_deref(), Some("2f1c"));
    }

    #[test]
    fn empty_is_no_args() {
        assert_eq!(CniArgs::parse("").unwrap(), CniArgs::default());
    }

    #[test]
    fn unknown_keys_need_ignore_unknown() {
        assert_eq!(CniArgs::parse("FOO=bar"), Err(ArgsError::UnknownKey("FOO".into())));
        assert!(CniArgs::parse("FOO=bar;IgnoreUnknown=true").is_ok());
        assert!(CniArgs::parse("IgnoreUnknown=1;FOO=bar").is_ok());
        assert_eq!(CniArgs::parse("IgnoreUnknown=0;FOO=bar"), Err(ArgsError::UnknownKey("FOO".into())));
    }

    #[test]
    fn malformed_pairs_and_duplicates_are_errors() {
        assert_eq!(CniArgs::parse("K8S_POD_NAME"), Err(ArgsError::NotAPair("K8S_POD_NAME".into())));
        assert_eq!(CniArgs::parse("K8S_POD_NAME=a;K8S_POD_NAME=b"), Err(ArgsError::Duplicate("K8S_POD_NAME".into())));
    }

    #[test]
    fn values_keep_equals_signs() {
        let a = CniArgs::parse(r#"CONSUL_IPTABLES_CONFIG={"a":"b=c"}"#).unwrap();
        assert_eq!(a.consul_iptables_config.as_deref(), Some(r#"{"a":"b=c"}"#));
    }
}

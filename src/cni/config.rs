//! The network configuration on stdin: decoded, defaulted and validated here, once.
//!
//! Keys of our own: `log_level`, `log_file`, `iptables_mode`. Keys of consul-cni are accepted so that a
//! conflist written for it keeps working when only `type` changes: `cni_bin_dir`, `cni_net_dir`,
//! `kubeconfig`, `log_level`, `multus`. Any other key is ignored, as the spec asks of plugins.
//! `prevResult` stays raw JSON: we pass it through, we never reinterpret it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use serde_json::value::RawValue;
use thiserror::Error;

use super::version::{UnsupportedVersion, Version};
use crate::netfilter::Mode;

/// The runtime capability through which containerd and CRI-O hand us the pod's annotations.
pub const POD_ANNOTATIONS_CAPABILITY: &str = "io.kubernetes.cri.pod-annotations";

/// A validated network configuration.
#[derive(Debug)]
pub struct NetConf {
    pub cni_version: Version,
    pub name: String,
    pub plugin_type: String,
    /// The previous plugin's result, byte for byte; `None` when we are not chained (e.g. Multus).
    pub prev_result: Option<Box<RawValue>>,
    /// The pod's annotations, when the runtime passed them as a capability argument.
    pub pod_annotations: Option<BTreeMap<String, String>>,
    pub log_level: log::LevelFilter,
    pub log_file: Option<PathBuf>,
    pub iptables_mode: Mode,
    /// Kubeconfig path, resolved against `cni_net_dir` the way consul-cni does (used by the API path).
    pub kubeconfig: Option<PathBuf>,
    /// GC: the attachments the runtime still considers valid.
    pub valid_attachments: Option<Vec<Attachment>>,
}

/// One attachment named by GC.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("network configuration on stdin is not valid JSON: {0}")]
    Syntax(#[source] serde_json::Error),
    #[error("network configuration is invalid: {0}")]
    Invalid(#[source] serde_json::Error),
    #[error("network configuration has no cniVersion")]
    MissingVersion,
    #[error(transparent)]
    Version(#[from] UnsupportedVersion),
    #[error("log_level {0:?} is not one of error, warn, info, debug, trace")]
    LogLevel(String),
    #[error("iptables_mode {0:?} is not one of auto, nft, legacy")]
    IptablesMode(String),
}

#[derive(Deserialize)]
struct Raw {
    #[serde(rename = "cniVersion")]
    cni_version: Option<String>,
    #[serde(default)]
    name: String,
    #[serde(default, rename = "type")]
    plugin_type: String,
    #[serde(rename = "prevResult")]
    prev_result: Option<Box<RawValue>>,
    #[serde(rename = "runtimeConfig")]
    runtime_config: Option<RawRuntimeConfig>,
    log_level: Option<String>,
    log_file: Option<PathBuf>,
    iptables_mode: Option<String>,
    // consul-cni's keys.
    #[allow(dead_code)]
    cni_bin_dir: Option<PathBuf>,
    cni_net_dir: Option<PathBuf>,
    kubeconfig: Option<PathBuf>,
    #[allow(dead_code)]
    multus: Option<bool>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<Attachment>>,
    #[serde(rename = "cni.dev/attachments")]
    attachments: Option<Vec<Attachment>>,
}

#[derive(Deserialize)]
struct RawRuntimeConfig {
    #[serde(rename = "io.kubernetes.cri.pod-annotations")]
    pod_annotations: Option<BTreeMap<String, String>>,
}

impl NetConf {
    /// Decodes and validates stdin.
    pub fn parse(stdin: &[u8]) -> Result<NetConf, ConfigError> {
        let raw: Raw = serde_json::from_slice(stdin).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => ConfigError::Invalid(e),
            _ => ConfigError::Syntax(e),
        })?;
        let cni_version: Version = raw.cni_version.ok_or(ConfigError::MissingVersion)?.parse()?;
        let log_level = match raw.log_level.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("") | Some("info") => log::LevelFilter::Info,
            Some("error") => log::LevelFilter::Error,
            Some("warn") | Some("warning") => log::LevelFilter::Warn,
            Some("debug") => log::LevelFilter::Debug,
            Some("trace") => log::LevelFilter::Trace,
            Some(_) => return Err(ConfigError::LogLevel(raw.log_level.unwrap_or_default())),
        };
        let iptables_mode = match raw.iptables_mode.as_deref() {
            None | Some("") | Some("auto") => Mode::Auto,
            Some("nft") => Mode::Nft,
            Some("legacy") => Mode::Legacy,
            Some(other) => return Err(ConfigError::IptablesMode(other.to_owned())),
        };
        // consul-cni joins `kubeconfig` (a file name) onto `cni_net_dir`; an absolute path stands alone.
        let kubeconfig = raw.kubeconfig.map(|k| match raw.cni_net_dir {
            Some(dir) if k.is_relative() => dir.join(k),
            _ => k,
        });
        Ok(NetConf {
            cni_version,
            name: raw.name,
            plugin_type: raw.plugin_type,
            prev_result: raw.prev_result,
            pod_annotations: raw.runtime_config.and_then(|r| r.pod_annotations),
            log_level,
            log_file: raw.log_file.filter(|p| !p.as_os_str().is_empty()),
            iptables_mode,
            kubeconfig,
            valid_attachments: raw.valid_attachments.or(raw.attachments),
        })
    }
}

/// Reads just `cniVersion`, for answering in the caller's version even when the rest is broken.
pub fn peek_version(stdin: &[u8]) -> Option<Version> {
    #[derive(Deserialize)]
    struct Peek {
        #[serde(rename = "cniVersion")]
        cni_version: String,
    }
    serde_json::from_slice::<Peek>(stdin).ok()?.cni_version.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(version: &str, extra: &str) -> String {
        format!(r#"{{"cniVersion":"{version}","name":"k8s-pod-network","type":"tproxy-cni"{extra}}}"#)
    }

    #[test]
    fn parses_a_minimal_config_in_every_supported_version() {
        for v in Version::SUPPORTED {
            let c = NetConf::parse(conf(v.as_str(), "").as_bytes()).unwrap();
            assert_eq!(c.cni_version, v);
            assert_eq!(c.iptables_mode, Mode::Auto);
            assert_eq!(c.log_level, log::LevelFilter::Info);
            assert!(c.prev_result.is_none() && c.pod_annotations.is_none());
        }
    }

    #[test]
    fn keeps_prev_result_byte_for_byte() {
        let prev = r#"{"cniVersion":"1.0.0","ips":[{"address":"10.1.0.5/24"}],"x-vendor":{"k":[1,2]}}"#;
        let c = NetConf::parse(conf("1.0.0", &format!(r#","prevResult":{prev}"#)).as_bytes()).unwrap();
        assert_eq!(c.prev_result.unwrap().get(), prev);
    }

    #[test]
    fn reads_pod_annotations_from_runtime_config() {
        let c = NetConf::parse(
            conf("1.0.0", r#","runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"a":"b"},"portMappings":[]}"#)
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(c.pod_annotations.unwrap()["a"], "b");
    }

    #[test]
    fn accepts_consul_cni_keys_and_joins_the_kubeconfig() {
        let c = NetConf::parse(
            conf(
                "0.3.1",
                r#","cni_bin_dir":"/opt/cni/bin","cni_net_dir":"/etc/cni/net.d","kubeconfig":"ZZZ-consul-cni-kubeconfig","log_level":"debug","multus":false"#,
            )
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(c.kubeconfig.unwrap(), PathBuf::from("/etc/cni/net.d/ZZZ-consul-cni-kubeconfig"));
        assert_eq!(c.log_level, log::LevelFilter::Debug);
    }

    #[test]
    fn classifies_bad_input() {
        assert!(matches!(NetConf::parse(b"{not json"), Err(ConfigError::Syntax(_))));
        assert!(matches!(NetConf::parse(b""), Err(ConfigError::Syntax(_))));
        assert!(matches!(NetConf::parse(b"[]"), Err(ConfigError::Invalid(_))));
        assert!(matches!(NetConf::parse(br#"{"name":"x"}"#), Err(ConfigError::MissingVersion)));
        assert!(matches!(NetConf::parse(conf("0.2.0", "").as_bytes()), Err(ConfigError::Version(_))));
        assert!(matches!(
            NetConf::parse(conf("1.0.0", r#","iptables_mode":"xt""#).as_bytes()),
            Err(ConfigError::IptablesMode(_))
        ));
        assert!(matches!(
            NetConf::parse(conf("1.0.0", r#","log_level":"loud""#).as_bytes()),
            Err(ConfigError::LogLevel(_))
        ));
        assert!(matches!(
            NetConf::parse(
                conf("1.0.0", r#","runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"a":1}}"#).as_bytes()
            ),
            Err(ConfigError::Invalid(_))
        ));
    }

    #[test]
    fn peeks_the_version_of_a_broken_config() {
        assert_eq!(peek_version(br#"{"cniVersion":"0.4.0","iptables_mode":7}"#), Some(Version::V0_4_0));
        assert_eq!(peek_version(b"garbage"), None);
    }
}

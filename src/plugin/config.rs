//! The network configuration on stdin: decoded, defaulted and validated here, once.
//!
//! Keys of our own: `log_level`, `log_file`, `iptables_mode`, `backend`, `unclassified_pods`,
//! `netns_timeout`, and for the API-server path `exclude_namespaces`, `installer_pods`, `api_timeout`, `default_namespace`,
//! `consul_status_annotation`. Keys of consul-cni are accepted so that a conflist written for it
//! keeps working when only `type` changes: `cni_bin_dir`, `cni_net_dir`, `kubeconfig`, `log_level`,
//! `multus`. Any other key is ignored, as the spec asks of plugins. `prevResult` stays raw JSON: we
//! pass it through, we never reinterpret it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;
use thiserror::Error;

use super::version::{UnsupportedVersion, Version};
use crate::kernel::engine::EngineKind;
use crate::kernel::netfilter::Mode;

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
    /// The pod's annotations, when the runtime passed them as a capability argument. The key's
    /// presence is what counts: containerd sends `null` for a pod without annotations, which is
    /// `Some` of an empty map here, not `None`.
    pub pod_annotations: Option<BTreeMap<String, String>>,
    /// What ADD does with a pod it cannot classify.
    pub unclassified_pods: Unclassified,
    /// The deadline of a call's work in the pod's namespace: the wait for another call's lock,
    /// every tool, every netlink exchange.
    pub netns_timeout: Duration,
    pub log_level: log::LevelFilter,
    pub log_file: Option<PathBuf>,
    pub iptables_mode: Mode,
    /// Which engine installs the rules: `nftables` (the default) or `iptables`.
    pub backend: EngineKind,
    /// Kubeconfig path, resolved against `cni_net_dir` the way consul-cni does (used by the API path).
    pub kubeconfig: Option<PathBuf>,
    /// Pods in these namespaces are passed through before any lookup (default: `kube-system`).
    pub exclude_namespaces: Vec<String>,
    /// The installer's own pods, passed through before any lookup.
    pub installer_pods: Option<InstallerPods>,
    /// The deadline of each API-server lookup.
    pub api_timeout: Duration,
    /// The namespace of a pod whose runtime sends no `K8S_POD_NAMESPACE` (podman).
    pub default_namespace: String,
    /// Report progress on a Consul pod's `transparent-proxy-status` annotation, as consul-cni does.
    pub consul_status_annotation: bool,
    /// GC: the attachments the runtime still considers valid.
    pub valid_attachments: Option<Vec<Attachment>>,
}

/// The conflist's `unclassified_pods`: what to do with a pod whose annotations cannot be had (the
/// runtime passed none and the API server cannot be asked, or did not answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unclassified {
    /// ADD fails: the pod may be a mesh pod, and must not start without its redirect (the default).
    Fail,
    /// ADD passes the pod through with a warning: availability over the mesh's guarantee.
    Pass,
}

/// The installer's pods: those in `namespace` whose name starts with `name_prefix` (a DaemonSet
/// names its pods `<daemonset name>-<suffix>`). They are recognised from `CNI_ARGS` alone, so the
/// installer can start even when the API server cannot be reached or the plugin is misconfigured.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallerPods {
    pub namespace: String,
    pub name_prefix: String,
}

impl InstallerPods {
    /// Is the pod `namespace`/`name` one of the installer's?
    pub fn matches(&self, namespace: &str, name: &str) -> bool {
        namespace == self.namespace && name.starts_with(&self.name_prefix)
    }
}

/// Default of `exclude_namespaces`.
pub const DEFAULT_EXCLUDE_NAMESPACES: &[&str] = &["kube-system"];
/// Default of `default_namespace`.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Bounds of `api_timeout`: shorter cannot complete a TLS handshake on a busy node; longer holds the
/// runtime's pod creation for no benefit (it retries a failed ADD anyway).
pub const API_TIMEOUT_RANGE: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(300));
/// Default of `netns_timeout`: far above what the work takes (milliseconds; about a second for 64
/// pods at once on two loaded cores), far below kubelet's two minutes for the whole sandbox.
pub const DEFAULT_NETNS_TIMEOUT: Duration = Duration::from_secs(30);
/// Bounds of `netns_timeout`.
pub const NETNS_TIMEOUT_RANGE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(300));

/// One attachment named by GC.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("network configuration on stdin is not valid JSON: {}", bounded_message(.0))]
    Syntax(serde_json::Error),
    #[error("network configuration is invalid: {}", bounded_message(.0))]
    Invalid(serde_json::Error),
    #[error("network configuration has no cniVersion")]
    MissingVersion,
    #[error(transparent)]
    Version(#[from] UnsupportedVersion),
    #[error("log_level {} is not one of error, warn, info, debug, trace", crate::text::Quoted::new(.0))]
    LogLevel(String),
    #[error("iptables_mode {} is not one of auto, nft, legacy", crate::text::Quoted::new(.0))]
    IptablesMode(String),
    #[error("backend {} is not one of iptables, nftables", crate::text::Quoted::new(.0))]
    Backend(String),
    #[error("unclassified_pods {} is not one of fail, pass", crate::text::Quoted::new(.0))]
    UnclassifiedPods(String),
    #[error("{key} {} is not a valid Kubernetes namespace name", crate::text::Quoted::new(value))]
    Namespace { key: &'static str, value: String },
    #[error("installer_pods: {0}")]
    InstallerPods(&'static str),
    #[error("{key} {value}: {reason}")]
    Timeout { key: &'static str, value: String, reason: &'static str },
    #[error("kubeconfig {} is a relative path: make it absolute, or set cni_net_dir for it to be joined onto", crate::text::Quoted::new(&.0.to_string_lossy()))]
    RelativeKubeconfig(PathBuf),
}

/// A decoder's message, which may quote the value it choked on, shortened.
fn bounded_message(e: &serde_json::Error) -> String {
    crate::text::bounded(&e.to_string(), crate::core::limits::MAX_QUOTED_MESSAGE_BYTES).into_owned()
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
    backend: Option<String>,
    unclassified_pods: Option<String>,
    // consul-cni's keys.
    #[allow(dead_code)]
    cni_bin_dir: Option<PathBuf>,
    cni_net_dir: Option<PathBuf>,
    kubeconfig: Option<PathBuf>,
    #[allow(dead_code)]
    multus: Option<bool>,
    // The API-server path.
    exclude_namespaces: Option<Vec<String>>,
    installer_pods: Option<InstallerPods>,
    api_timeout: Option<serde_json::Value>,
    netns_timeout: Option<serde_json::Value>,
    default_namespace: Option<String>,
    consul_status_annotation: Option<bool>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<Attachment>>,
    #[serde(rename = "cni.dev/attachments")]
    attachments: Option<Vec<Attachment>>,
}

#[derive(Deserialize)]
struct RawRuntimeConfig {
    #[serde(rename = "io.kubernetes.cri.pod-annotations", default, deserialize_with = "present")]
    pod_annotations: Option<BTreeMap<String, String>>,
}

/// A key that is present: `null` (containerd's way of sending a pod without annotations) is an
/// empty map; only an absent key (`default`) is `None`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    Ok(Some(Option::<BTreeMap<String, String>>::deserialize(d)?.unwrap_or_default()))
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
        let backend = match raw.backend.as_deref() {
            None | Some("") => EngineKind::default(),
            Some(name) => EngineKind::from_name(name).ok_or_else(|| ConfigError::Backend(name.to_owned()))?,
        };
        let unclassified_pods = match raw.unclassified_pods.as_deref() {
            None | Some("fail") => Unclassified::Fail,
            Some("pass") => Unclassified::Pass,
            Some(other) => return Err(ConfigError::UnclassifiedPods(other.to_owned())),
        };
        // consul-cni joins `kubeconfig` (a file name) onto `cni_net_dir`; an absolute path stands alone.
        let kubeconfig = match (raw.kubeconfig.filter(|k| !k.as_os_str().is_empty()), raw.cni_net_dir) {
            (Some(k), _) if k.is_absolute() => Some(k),
            (Some(k), Some(dir)) if !dir.as_os_str().is_empty() => Some(dir.join(k)),
            (Some(k), _) => return Err(ConfigError::RelativeKubeconfig(k)),
            (None, _) => None,
        };
        let exclude_namespaces = match raw.exclude_namespaces {
            None => DEFAULT_EXCLUDE_NAMESPACES.iter().map(|s| s.to_string()).collect(),
            Some(list) => list,
        };
        for ns in &exclude_namespaces {
            check_namespace("exclude_namespaces entry", ns)?;
        }
        if let Some(p) = &raw.installer_pods {
            check_namespace("installer_pods.namespace", &p.namespace)?;
            if p.name_prefix.is_empty()
                || !p
                    .name_prefix
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            {
                return Err(ConfigError::InstallerPods(
                    "name_prefix must be the non-empty start of a pod name (lower case letters, digits, '-', '.')",
                ));
            }
        }
        let api_timeout = match raw.api_timeout {
            None => crate::kube::DEFAULT_TIMEOUT,
            Some(v) => timeout("api_timeout", &v, API_TIMEOUT_RANGE, "must be between 100ms and 5m")?,
        };
        let netns_timeout = match raw.netns_timeout {
            None => DEFAULT_NETNS_TIMEOUT,
            Some(v) => timeout("netns_timeout", &v, NETNS_TIMEOUT_RANGE, "must be between 1s and 5m")?,
        };
        let default_namespace = raw.default_namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
        check_namespace("default_namespace", &default_namespace)?;
        Ok(NetConf {
            cni_version,
            name: raw.name,
            plugin_type: raw.plugin_type,
            prev_result: raw.prev_result,
            pod_annotations: raw.runtime_config.and_then(|r| r.pod_annotations),
            unclassified_pods,
            netns_timeout,
            log_level,
            log_file: raw.log_file.filter(|p| !p.as_os_str().is_empty()),
            iptables_mode,
            backend,
            kubeconfig,
            exclude_namespaces,
            installer_pods: raw.installer_pods,
            api_timeout,
            default_namespace,
            consul_status_annotation: raw.consul_status_annotation.unwrap_or(true),
            valid_attachments: raw.valid_attachments.or(raw.attachments),
        })
    }
}

fn check_namespace(key: &'static str, value: &str) -> Result<(), ConfigError> {
    // Namespaces are DNS-1123 labels.
    let ok = crate::kube::is_valid_name(value) && value.len() <= 63 && !value.contains('.');
    if ok { Ok(()) } else { Err(ConfigError::Namespace { key, value: value.to_owned() }) }
}

/// `api_timeout`, `netns_timeout`: a duration as Kubernetes writes them (`"3s"`, `"500ms"`,
/// `"1m30s"`, `"1.5s"`) or a number of seconds, within `range`.
fn timeout(
    key: &'static str,
    v: &serde_json::Value,
    range: (Duration, Duration),
    out_of_range: &'static str,
) -> Result<Duration, ConfigError> {
    let fail = |reason| ConfigError::Timeout { key, value: v.to_string(), reason };
    let d = match v {
        serde_json::Value::String(s) => parse_duration(s).map_err(fail)?,
        serde_json::Value::Number(n) => {
            let secs = n.as_f64().ok_or_else(|| fail("is not a number"))?;
            if !secs.is_finite() || !(0.0..=1e6).contains(&secs) {
                return Err(fail("is out of range"));
            }
            Duration::from_secs_f64(secs)
        }
        _ => return Err(fail("must be a duration such as \"5s\" or a number of seconds")),
    };
    let (min, max) = range;
    if d < min || d > max {
        return Err(fail(out_of_range));
    }
    Ok(d)
}

/// Parses `"1m30s"`, `"500ms"`, `"1.5s"`, `"2h"`: numbers (decimals allowed) each followed by a
/// unit among `ms`, `s`, `m`, `h`.
pub fn parse_duration(text: &str) -> Result<Duration, &'static str> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err("is empty");
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (number, after) = rest.split_at(digits);
        if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
            return Err("needs a number before each unit, e.g. 5s or 1.5s");
        }
        let value: f64 = number.parse().map_err(|_| "has a malformed number")?;
        let unit_len = after.find(|c: char| c.is_ascii_digit()).unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let scale = match unit {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err("needs a unit (ms, s, m or h)"),
            _ => return Err("has a unit that is not ms, s, m or h"),
        };
        let secs = value * scale;
        if secs > 1e6 {
            return Err("is out of range");
        }
        total += Duration::from_secs_f64(secs);
        rest = next;
    }
    Ok(total)
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
    fn a_null_annotation_map_means_the_runtime_passed_none_not_that_it_passed_nothing() {
        let parse = |rc: &str| NetConf::parse(conf("1.0.0", rc).as_bytes()).unwrap().pod_annotations;
        // containerd 1.6 for a pod without annotations: the key, with null.
        assert_eq!(parse(r#","runtimeConfig":{"io.kubernetes.cri.pod-annotations":null}"#), Some(BTreeMap::new()));
        assert_eq!(parse(r#","runtimeConfig":{"io.kubernetes.cri.pod-annotations":{}}"#), Some(BTreeMap::new()));
        // A runtime that does not honour the capability: no key at all.
        assert_eq!(parse(r#","runtimeConfig":{"portMappings":[]}"#), None);
        assert_eq!(parse(r#","runtimeConfig":null"#), None);
        assert_eq!(parse(""), None);
    }

    #[test]
    fn unclassified_pods_fail_unless_the_conflist_says_pass() {
        let parse = |extra: &str| NetConf::parse(conf("1.0.0", extra).as_bytes());
        assert_eq!(parse("").unwrap().unclassified_pods, Unclassified::Fail);
        assert_eq!(parse(r#","unclassified_pods":"fail""#).unwrap().unclassified_pods, Unclassified::Fail);
        assert_eq!(parse(r#","unclassified_pods":"pass""#).unwrap().unclassified_pods, Unclassified::Pass);
        let e = parse(r#","unclassified_pods":"allow""#).unwrap_err();
        assert!(matches!(e, ConfigError::UnclassifiedPods(_)) && e.to_string().contains("not one of fail, pass"));
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
    fn api_path_keys_have_defaults() {
        let c = NetConf::parse(conf("1.0.0", "").as_bytes()).unwrap();
        assert_eq!(c.exclude_namespaces, ["kube-system"]);
        assert_eq!(c.api_timeout, crate::kube::DEFAULT_TIMEOUT);
        assert_eq!(c.default_namespace, "default");
        assert!(c.consul_status_annotation && c.installer_pods.is_none() && c.kubeconfig.is_none());
        assert_eq!(c.netns_timeout, DEFAULT_NETNS_TIMEOUT);
        let c = NetConf::parse(conf("1.0.0", r#","netns_timeout":"2s""#).as_bytes()).unwrap();
        assert_eq!(c.netns_timeout, Duration::from_secs(2));
    }

    #[test]
    fn reads_the_api_path_keys() {
        let c = NetConf::parse(
            conf(
                "1.0.0",
                r#","kubeconfig":"/etc/cni/net.d/tproxy-cni/kubeconfig","exclude_namespaces":["kube-system","istio-system"],
                   "installer_pods":{"namespace":"tproxy-cni","name_prefix":"tproxy-cni-node-"},
                   "api_timeout":"1m30s","default_namespace":"podman","consul_status_annotation":false"#,
            )
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(c.kubeconfig.unwrap(), PathBuf::from("/etc/cni/net.d/tproxy-cni/kubeconfig"));
        assert_eq!(c.exclude_namespaces, ["kube-system", "istio-system"]);
        let p = c.installer_pods.unwrap();
        assert!(p.matches("tproxy-cni", "tproxy-cni-node-x7k2p") && !p.matches("default", "tproxy-cni-node-x7k2p"));
        assert!(!p.matches("tproxy-cni", "web-0"));
        assert_eq!(c.api_timeout, Duration::from_secs(90));
        assert_eq!(c.default_namespace, "podman");
        assert!(!c.consul_status_annotation);
        let c = NetConf::parse(conf("1.0.0", r#","exclude_namespaces":[],"api_timeout":2.5"#).as_bytes()).unwrap();
        assert!(c.exclude_namespaces.is_empty());
        assert_eq!(c.api_timeout, Duration::from_millis(2500));
    }

    #[test]
    fn durations_are_read_as_kubernetes_writes_them() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "5", "s", "5 s", "-1s", "1.s", ".5s", "5sec", "1d", "1e3s", "1..5s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn refuses_bad_api_path_keys_with_the_key_named() {
        let cases = [
            (r#","api_timeout":"5""#, "api_timeout \"5\": needs a unit"),
            (r#","api_timeout":"10ms""#, "between 100ms and 5m"),
            (r#","api_timeout":"1h""#, "between 100ms and 5m"),
            (r#","api_timeout":true"#, "must be a duration"),
            (r#","netns_timeout":"500ms""#, "netns_timeout \"500ms\": must be between 1s and 5m"),
            (r#","netns_timeout":"6m""#, "netns_timeout \"6m\": must be between 1s and 5m"),
            (r#","exclude_namespaces":["Kube_System"]"#, "exclude_namespaces entry \"Kube_System\""),
            (r#","default_namespace":"a.b""#, "default_namespace"),
            (r#","installer_pods":{"namespace":"x","name_prefix":""}"#, "name_prefix"),
            (r#","kubeconfig":"ZZZ-consul-cni-kubeconfig""#, "relative path"),
        ];
        for (extra, want) in cases {
            let e = NetConf::parse(conf("1.0.0", extra).as_bytes()).unwrap_err().to_string();
            assert!(e.contains(want), "{extra}: {e}");
        }
        assert!(matches!(
            NetConf::parse(conf("1.0.0", r#","installer_pods":{"namespace":"x"}"#).as_bytes()),
            Err(ConfigError::Invalid(_))
        ));
        assert!(matches!(
            NetConf::parse(conf("1.0.0", r#","exclude_namespaces":"kube-system""#).as_bytes()),
            Err(ConfigError::Invalid(_))
        ));
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
